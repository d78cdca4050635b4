//! The HA-validator example (`cli/examples/ha_validator.rs`, docs/coordination.md) against
//! three replicas: three instances claim every 500 ms slot and sign only when granted; the active
//! instance and then the tally leader are killed with SIGKILL along the way. The checker then
//! shows no slot signed twice, every signature backed by tally's grant to its signer, and no slot
//! missed away from the kills.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn example() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_tallyd")).with_file_name("examples").join("ha_validator");
    assert!(
        p.exists(),
        "{} is missing: `cargo test` builds it (or cargo build --example ha_validator -p tally-cli)",
        p.display()
    );
    p
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

const SLOT_MS: u64 = 500;

struct Instance {
    child: Child,
    log: PathBuf,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instance(dir: &Path, j: usize, genesis_ms: u64) -> Instance {
    let log = dir.join(format!("validator-{j}.log"));
    let child = Command::new(example())
        .args(["run", "--cluster-dir"])
        .arg(dir)
        .arg("--key")
        .arg(dir.join(format!("accounts/{j}.key")))
        .arg("--log")
        .arg(&log)
        .args(["--slot-ms", &SLOT_MS.to_string(), "--genesis-ms", &genesis_ms.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn an instance");
    Instance { child, log }
}

/// The signer of the newest signed slot, across the logs.
fn active(instances: &[Instance]) -> Option<usize> {
    instances
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let text = std::fs::read_to_string(&v.log).ok()?;
            let slot: u64 = text.lines().last()?.split_whitespace().next()?.parse().ok()?;
            Some((slot, i))
        })
        .max()
        .map(|(_, i)| i)
}

#[test]
fn three_instances_never_sign_a_slot_twice_across_kills() {
    let (dir, layout) = init_cluster(3, 3);
    let d = dir.path();
    let mut nodes = start_all(&layout);
    let genesis_ms = now_ms();
    let mut instances: Vec<Instance> = (0..3).map(|j| instance(d, j, genesis_ms)).collect();
    let started = Instant::now();
    let mut kills = Vec::new();
    let at = |s: u64| started + Duration::from_millis(s);

    std::thread::sleep(at(3_000).saturating_duration_since(Instant::now()));
    let a = active(&instances).expect("some instance signed within 3 s");
    kills.push(now_ms());
    let _ = instances[a].child.kill();
    let _ = instances[a].child.wait();

    std::thread::sleep(at(6_000).saturating_duration_since(Instant::now()));
    let (l, _) = wait_leader(&nodes, Duration::from_secs(10));
    kills.push(now_ms());
    nodes[l].kill9();
    std::thread::sleep(Duration::from_millis(1_500));
    nodes[l] =
        Daemon::start(&layout.config_paths[l], &layout.configs[l].listen, &d.join(format!("node-{}.log", l + 1)));

    std::thread::sleep(at(11_000).saturating_duration_since(Instant::now()));
    let logs: Vec<PathBuf> = instances.iter().map(|v| v.log.clone()).collect();
    drop(instances);
    let kills_arg = kills.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new(example())
        .args(["check", "--cluster-dir"])
        .arg(d)
        .arg("--logs")
        .args(&logs)
        .args(["--slot-ms", &SLOT_MS.to_string(), "--genesis-ms", &genesis_ms.to_string()])
        .args(["--kills-ms", &kills_arg, "--margin-ms", "2500"])
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the checker prints JSON");
    assert_eq!(v["signed_twice"], serde_json::json!([]), "no slot signed twice: {v}");
    assert_eq!(v["signed_without_grant"], serde_json::json!([]), "every signature has tally's grant: {v}");
    assert_eq!(v["missed_away_from_kills"], serde_json::json!([]), "slots were missed only around the kills: {v}");
    assert!(out.status.success(), "{text}");
    assert!(v["signed"].as_u64().unwrap_or(0) >= 10, "most of the ~20 slots were signed: {v}");
    assert!(v["signers"].as_array().map_or(0, Vec::len) >= 2, "another instance took over after the kill: {v}");
}
