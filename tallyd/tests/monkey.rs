//! The chaos monkey (`tally chaos`, `tally_chaos::monkey`) as CI runs it: one short run with every
//! fault kind on real processes, and its self-test against a planted bug. The 30-minute soak is
//! `tally chaos --nodes 3 --duration 1800` (see the README).

mod common;

use std::path::PathBuf;
use std::time::Duration;
use tally_chaos::monkey::{self, Faults, MonkeyConfig};

fn config(seed: u64, secs: u64, faults: &str, plant: Option<&str>) -> (tempfile::TempDir, MonkeyConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = MonkeyConfig {
        nodes: 3,
        duration: Duration::from_secs(secs),
        seed,
        faults: faults.parse().expect("faults"),
        clients: 6,
        out: dir.path().to_path_buf(),
        tallyd: PathBuf::from(env!("CARGO_BIN_EXE_tallyd")),
        base_port: common::free_base_port(3),
        plant: plant.map(str::to_string),
        progress: false,
    };
    (dir, cfg)
}

/// Every fault kind; the disk fault needs `mount -t tmpfs` (root) and is left out, with a
/// message, where that is refused.
#[test]
fn a_short_monkey_run_with_every_fault_kind_keeps_every_invariant() {
    let (dir, cfg) = config(11, 60, "all,disk", None);
    assert_eq!(cfg.faults, Faults { kill: true, pause: true, partition: true, leader: true, delay: true, disk: true });
    let r = match monkey::run(&cfg) {
        Err(e) if e.contains("root") => {
            eprintln!("the disk fault is left out: {e}");
            let mut cfg = cfg.clone();
            cfg.faults.disk = false;
            cfg.base_port = common::free_base_port(3);
            monkey::run(&cfg).unwrap_or_else(|e| panic!("monkey run: {e}"))
        }
        other => other.unwrap_or_else(|e| panic!("monkey run: {e}")),
    };
    let text = monkey::summary(&r);
    eprintln!("{text}");
    monkey::write_report(&r, dir.path()).expect("report");
    assert!(r.ok(), "violations:\n{text}");
    assert!(r.converged, "every replica converged after healing");
    assert!(r.fault_events.len() >= 10, "faults were injected: {:?}", r.faults);
    assert!(r.faults.len() >= 3, "several kinds: {:?}", r.faults);
    assert!(r.failovers >= 1, "a failover happened");
    assert!(r.verdicts.acked_checked > 200, "acknowledged requests were checked: {}", r.verdicts.acked_checked);
    assert!(r.verdicts.keys_checked >= 3, "documents were checked for linearizability");
    assert!(dir.path().join("report.json").is_file() && dir.path().join("timeline.png").is_file());
}

/// A monkey that cannot fail is a defect: with acknowledgements sent before commit (a failpoint
/// in debug builds of tallyd), killing and cutting off leaders loses acknowledged requests, and
/// the run must say so.
#[test]
fn the_monkey_reports_acknowledgements_sent_before_commit() {
    let (_dir, cfg) = config(3, 30, "leader,partition", Some("ack-before-commit"));
    let r = monkey::run(&cfg).unwrap_or_else(|e| panic!("monkey run: {e}"));
    let text = monkey::summary(&r);
    eprintln!("{text}");
    assert!(!r.ok(), "the planted bug went unnoticed:\n{text}");
    assert!(
        r.verdicts.violations.iter().any(|v| v.invariant == "I1" || v.invariant == "I2"),
        "lost acknowledgements or two headers at one height are reported:\n{text}"
    );
}
