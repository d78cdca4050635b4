//! The cluster as it is deployed: static binaries in a `FROM scratch` image, three containers
//! from `deploy/compose.yaml` on a private network, configured by `tally cluster init --hosts`,
//! driven from the host through the ports published on 127.0.0.1.
//!
//! Each replica first takes one write directly (the followers relay theirs to the leader by its
//! host name). Under write load it then `docker kill`s the leader's container (printing kill → next
//! acknowledged write), starts it again, cuts a follower off the network (`docker network
//! disconnect`), keeps writing, reconnects it, and then checks that every acknowledged write is
//! in the batch it was acknowledged at on every replica, that sampled receipts are served
//! identically by every replica, and the shared checks of committed history (chain, signatures,
//! exactly once, money). Then `compose down` (volumes kept) and `up` again: the same checks
//! hold over the restarted containers, which take writes again.
//!
//! Skipped (passes, saying so) when the Docker engine does not answer `docker info` or neither
//! `docker compose` nor `docker-compose` exists. `TALLY_DOCKER_TEST=require` makes that a
//! failure, `TALLY_DOCKER_TEST=skip` skips it anyway. The static build goes to
//! `<target>/docker-static` (a separate target directory: the `cargo test` running this holds
//! the lock of its own); `TALLY_DOCKER_PROFILE` picks its profile (default `release`, without
//! LTO and debug info: measured, that is the cheapest build from clean; the `dev` profile's full
//! debug info of optimised dependencies costs nearly twice the CPU).
//! Everything it creates carries the project name `tally-test-<pid>` or the image tag
//! `tally-test:<pid>` and is removed by name when the test ends, failed or not.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_cli::cluster::{cluster_init_with, ClusterLayout, ContainerHosts};
use tally_client::ClientOptions;
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{Operation, Receipt, RequestId};

/// The whole run after the build (docker waits included) must fit in this.
const RUN_BOUND: Duration = Duration::from_secs(300);
const BUILD_BOUND: Duration = Duration::from_secs(1800);
const NODES: usize = 3;
/// Container-side base port (client 7001.., peer 7101.., metrics 7201..): what compose.yaml maps.
const CONTAINER_BASE_PORT: u16 = 7000;

/// The output of a finished command, or why it did not finish.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with its output in files (no pipe can fill up) and kills it after `timeout`.
fn run(mut cmd: Command, timeout: Duration, scratch: &Path) -> Ran {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (scratch.join(format!("cmd-{n}.out")), scratch.join(format!("cmd-{n}.err")));
    let what = format!("{cmd:?}");
    let spawned = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Ran { ok: false, stdout: String::new(), stderr: format!("{what}: {e}") },
    };
    let deadline = Instant::now() + timeout;
    let ok = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::write(&err, format!("{what}: killed after {timeout:?}\n"));
                break false;
            }
        }
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Ran { ok, stdout: read(&out), stderr: read(&err) }
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args);
    c
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever answers.
fn compose_program(scratch: &Path) -> Option<Vec<String>> {
    let v2 = run(docker(&["compose", "version"]), Duration::from_secs(20), scratch);
    if v2.ok {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    let mut v1 = Command::new("docker-compose");
    v1.arg("version");
    run(v1, Duration::from_secs(20), scratch).ok.then(|| vec!["docker-compose".into()])
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The compose project, the image and the scratch directory of one run; dropping it removes
/// the containers, network and volumes of the project and the image, by their names.
struct DockerRun {
    project: String,
    image: String,
    compose: Vec<String>,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl DockerRun {
    fn scratch(&self) -> &Path {
        self.dir.path()
    }

    fn compose(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .arg("-f")
            .arg(workspace().join("deploy/compose.yaml"))
            .arg("-p")
            .arg(&self.project)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// Runs a docker or compose command that must succeed.
    fn must(&self, cmd: Command, timeout: Duration) -> String {
        let what = format!("{cmd:?}");
        let r = run(cmd, timeout, self.scratch());
        assert!(r.ok, "{what} failed:\n{}\n{}", r.stdout, r.stderr);
        r.stdout
    }

    /// The container of service `tally-<i>`.
    fn container(&self, i: usize) -> String {
        let out = self.must(self.compose(&["ps", "-q", &format!("tally-{i}")]), Duration::from_secs(30));
        let id = out.trim().to_string();
        assert!(!id.is_empty(), "no container for tally-{i}");
        id
    }

    /// The project's network (compose names it `<project>_tally`; found by its label).
    fn network(&self) -> String {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let out = self.must(docker(&["network", "ls", "-q", "--filter", &filter]), Duration::from_secs(30));
        let ids: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(ids.len(), 1, "networks of project {}: {ids:?}", self.project);
        ids[0].to_string()
    }

    fn logs(&self) -> String {
        let tail = if std::env::var_os("TALLY_TEST_LOGS").is_some() { "all" } else { "40" };
        let r = run(self.compose(&["logs", "--no-color", "--tail", tail]), Duration::from_secs(30), self.scratch());
        r.stdout
    }
}

impl Drop for DockerRun {
    fn drop(&mut self) {
        let t = Duration::from_secs(60);
        if std::thread::panicking() || std::env::var_os("TALLY_TEST_LOGS").is_some() {
            eprintln!("---- container logs ----\n{}", self.logs());
        }
        let down = run(self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]), t, self.scratch());
        // Whatever `down` missed, by the project's label.
        let filter = format!("label=com.docker.compose.project={}", self.project);
        for (kind, rm) in [("container", vec!["rm", "-f", "-v"]), ("volume", vec!["rm", "-f"]), ("network", vec!["rm"])]
        {
            let mut ls = vec![kind, "ls", "-q", "--filter", filter.as_str()];
            if kind == "container" {
                ls = vec!["ps", "-a", "-q", "--filter", filter.as_str()];
            }
            let ids = run(docker(&ls), t, self.scratch()).stdout;
            for id in ids.split_whitespace() {
                let mut args = if kind == "container" { vec![] } else { vec![kind] };
                args.extend(rm.iter().copied());
                args.push(id);
                let _ = run(docker(&args), t, self.scratch());
            }
        }
        let rmi = run(docker(&["rmi", "-f", &self.image]), t, self.scratch());
        eprintln!(
            "cleanup: compose down {}, image {} {}",
            if down.ok { "ok" } else { "failed" },
            self.image,
            if rmi.ok { "removed" } else { "not removed" }
        );
    }
}

/// Builds static tallyd and tally (glibc, +crt-static) into `<target>/docker-static`, as
/// scripts/build-static.sh does. Returns the directory holding them and the build time.
fn build_static(scratch: &Path) -> (PathBuf, Duration) {
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("docker-static");
    let profile = std::env::var("TALLY_DOCKER_PROFILE").unwrap_or_else(|_| "release".into());
    let mut c = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    c.current_dir(workspace())
        .args(["build", "--locked", "--profile", &profile, "--target", "x86_64-unknown-linux-gnu"])
        .args(["-p", "tallyd", "-p", "tally-cli", "--bin", "tallyd", "--bin", "tally"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Quicker to build than the shipped release profile; what is tested is the deployment.
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    let started = Instant::now();
    let r = run(c, BUILD_BOUND, scratch);
    assert!(r.ok, "static build failed:\n{}", r.stderr);
    let out = if profile == "dev" { "debug" } else { profile.as_str() };
    (target_dir.join("x86_64-unknown-linux-gnu").join(out), started.elapsed())
}

/// Per replica: every acknowledged request is in the batch at its acknowledged height (same
/// header), and every `step`-th receipt is served identically.
fn check_every_replica(addrs: &[String], acked: &HashMap<RequestId, Receipt>) {
    let mut by_height: BTreeMap<u64, Vec<&Receipt>> = BTreeMap::new();
    for r in acked.values() {
        by_height.entry(r.header.height).or_default().push(r);
    }
    let step = (acked.len() / 200).max(1);
    for addr in addrs {
        let conn = tally_client::Connection::connect_with(addr, &dial_for(addr), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        for (h, receipts) in &by_height {
            let b = match conn.call_timeout(ClientMessage::Batch { height: *h }, Duration::from_secs(10)) {
                Ok(ServerMessage::Batch(Some(b))) => b,
                other => panic!("{addr}: batch {h}: {other:?}"),
            };
            assert!(b.body_available, "{addr}: no body for height {h}");
            let ids: std::collections::HashSet<RequestId> = b.request_ids.iter().copied().collect();
            for r in receipts {
                assert_eq!(b.header, r.header, "{addr}: height {h} is not the acknowledged batch");
                assert!(ids.contains(&r.request_id()), "{addr}: acknowledged {} missing at {h}", r.request_id());
            }
        }
        for r in acked.values().step_by(step) {
            // By height: a request past its expiry is not found by id alone.
            let at = ClientMessage::ReceiptAt { id: r.request_id(), height: r.header.height };
            match conn.call_timeout(at, Duration::from_secs(5)) {
                Ok(ServerMessage::Receipt(Some(got))) => assert_eq!(&*got, r, "{addr}: receipt differs"),
                other => panic!("{addr}: receipt of {}: {other:?}", r.request_id()),
            }
        }
        eprintln!("{addr}: {} heights, {} acknowledged requests present", by_height.len(), acked.len());
    }
}

/// The node the replicas reachable at `addrs` agree leads, in the highest term.
fn leader(addrs: &[String], timeout: Duration) -> (usize, u64) {
    let deadline = Instant::now() + timeout;
    loop {
        let best =
            addrs.iter().filter_map(|a| status_of(a)).filter(|s| s.leader_id == Some(s.node_id)).max_by_key(|s| s.term);
        if let Some(s) = best {
            return (s.node_id as usize, s.term);
        }
        assert!(Instant::now() < deadline, "no leader among {addrs:?} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the replica at `addr` applied what the others committed.
fn wait_caught_up(addr: &str, others: &[String], timeout: Duration) {
    let target = others.iter().filter_map(|a| status_of(a)).map(|s| s.committed_height).max().unwrap_or(0);
    assert!(
        wait_until(timeout, || status_of(addr).is_some_and(|s| s.applied_height >= target)),
        "{addr} did not catch up to height {target} within {timeout:?}"
    );
}

fn acked_in_term_above(w: &Writer, p: &Prober, term: u64) -> bool {
    w.acked.lock().values().any(|r| r.header.term > term) || p.acked.lock().values().any(|r| r.header.term > term)
}

#[test]
fn docker_compose_cluster_fails_over_heals_a_partition_and_loses_nothing() {
    let mode = std::env::var("TALLY_DOCKER_TEST").unwrap_or_default();
    if mode == "skip" {
        cannot_run("docker_failover", "TALLY_DOCKER_TEST=skip");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir");
    let engine = run(docker(&["info"]), Duration::from_secs(30), dir.path());
    let compose = if engine.ok { compose_program(dir.path()) } else { None };
    let Some(compose) = compose else {
        let why = if engine.ok {
            "neither `docker compose` nor `docker-compose` runs".to_string()
        } else {
            format!("the Docker engine is not reachable (`docker info` failed: {})", engine.stderr.trim())
        };
        assert!(mode != "require", "TALLY_DOCKER_TEST=require, but {why}");
        cannot_run("docker_failover", &why);
        return;
    };
    let test_started = Instant::now();

    let (bin_dir, build_time) = build_static(dir.path());
    eprintln!("static build ({}): {:.1} s", bin_dir.display(), build_time.as_secs_f64());

    let pid = std::process::id();
    let published = free_base_port(NODES);
    let config_dir = dir.path().join("cluster");
    let mut run_ = DockerRun {
        project: format!("tally-test-{pid}"),
        image: format!("tally-test:{pid}"),
        compose,
        env: Vec::new(),
        dir,
    };
    let started = Instant::now();
    let left = || RUN_BOUND.saturating_sub(started.elapsed()).max(Duration::from_secs(1));

    // The image, from deploy/Dockerfile and a context holding only the two binaries.
    let ctx = run_.scratch().join("context");
    std::fs::create_dir_all(&ctx).expect("context dir");
    for b in ["tallyd", "tally"] {
        std::fs::copy(bin_dir.join(b), ctx.join(b)).expect("copy binary");
    }
    std::fs::copy(workspace().join("deploy/Dockerfile"), ctx.join("Dockerfile")).expect("copy Dockerfile");
    run_.must(docker(&["build", "-q", "-t", &run_.image, ctx.to_str().expect("utf8")]), Duration::from_secs(120));
    let size = run_.must(docker(&["image", "ls", "--format", "{{.Size}}", &run_.image]), Duration::from_secs(30));
    eprintln!("image {}: {}", run_.image, size.trim());

    // The configuration, as the docs say: cluster init --hosts.
    let hosts =
        ContainerHosts { hosts: (1..=NODES).map(|i| format!("tally-{i}")).collect(), published_base_port: published };
    let layout: ClusterLayout =
        cluster_init_with(NODES, &config_dir, 2, CONTAINER_BASE_PORT, Some(&hosts)).expect("cluster init --hosts");
    let addrs = layout.dial_addrs();
    let dial = layout.dial().expect("CA");
    for a in &addrs {
        register_dial(a, dial.clone());
    }
    run_.env = vec![
        ("TALLY_IMAGE".into(), run_.image.clone()),
        ("TALLY_CONFIG_DIR".into(), layout.dir.to_string_lossy().into_owned()),
    ];
    for i in 1..=NODES {
        run_.env.push((format!("TALLY_PORT_{i}"), (published as usize + i).to_string()));
    }
    run_.must(run_.compose(&["up", "-d"]), Duration::from_secs(120));
    let containers: Vec<String> = (1..=NODES).map(|i| run_.container(i)).collect();
    let net = run_.network();
    assert!(
        wait_until(Duration::from_secs(60).min(left()), || addrs
            .iter()
            .all(|a| status_of(a).is_some_and(|s| s.leader_id.is_some()))),
        "the containers did not form a cluster reachable at {addrs:?}"
    );
    eprintln!("cluster up after {:.1} s at {addrs:?}", started.elapsed().as_secs_f64());

    // One write sent to each replica as it is (no client library): the followers relay theirs
    // to the leader, whose address they know as `tally-<i>:PORT`. Refusals (no lease yet just after
    // the election) are retried for 10 s, the same request each time.
    let mut first: HashMap<RequestId, Receipt> = HashMap::new();
    let cluster = tally_codec::ClusterId::from_hex(&layout.cluster_id).expect("cluster id");
    let key = account_key(&layout, 1);
    for a in &addrs {
        let conn = tally_client::Connection::connect_with(a, &dial_for(a), Duration::from_secs(2)).expect("connect");
        let req = tally_client::client::sign_request(&key, cluster, Operation::Transfer { to: fresh_key(), amount: 1 });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = conn.call_timeout(ClientMessage::Submit(vec![req.clone()]), Duration::from_secs(5));
            if let Ok(ServerMessage::Submitted(rs)) = &reply {
                if let [SubmitReply::Committed { receipt, .. }] = rs.as_slice() {
                    first.insert(receipt.request_id(), (**receipt).clone());
                    break;
                }
            }
            assert!(Instant::now() < deadline, "{a}: a write sent here was not committed: {reply:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // `tally status` from the host, text and JSON alike: the leader's view, every member
    // reachable through the published ports (JSON said 0 of 3 when it dialled the advertised
    // tally-<i> names).
    let dir = layout.dir.to_str().expect("utf-8");
    let o = tally_command().args(["--cluster-dir", dir, "-o", "json", "status"]).output().expect("tally status");
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(s["reachable"], NODES, "JSON status from the host: {s:#}");
    assert_eq!(s["majority_reachable"], true, "{s:#}");
    assert_eq!(s["view_of"], s["leader_id"], "the leader's view: {s:#}");
    let o = tally_command().args(["--cluster-dir", dir, "status"]).output().expect("tally status");
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains(&format!("Reachable from here: {NODES} of {NODES} replicas")), "{t}");

    // Load from the host: the client library (members advertised as tally-<i>:PORT, dialled
    // through the map of client.toml) and one-request probes to every published port.
    let opts = ClientOptions { addr_map: Arc::new(layout.addr_map()), ..short_opts() };
    let writer = Writer::start_with(&addrs, account_key(&layout, 0), 32, 2, opts);
    let prober = Prober::start(&addrs, &layout, 1);
    assert!(wait_until(Duration::from_secs(20).min(left()), || writer.acked_len() > 100), "no writes acknowledged");

    // 1. docker kill the leader's container.
    let (old, old_term) = leader(&addrs, Duration::from_secs(10).min(left()));
    run_.must(docker(&["kill", &containers[old - 1]]), Duration::from_secs(30));
    let killed_at = Instant::now();
    // Until a write of a later term is acknowledged at the host; on the way, when a survivor
    // says it leads (server side, for comparison).
    let (mut elected, mut committed): (Option<Duration>, Option<Duration>) = (None, None);
    let failover = loop {
        if acked_in_term_above(&writer, &prober, old_term) {
            break killed_at.elapsed();
        }
        if committed.is_none() {
            for (_, a) in addrs.iter().enumerate().filter(|(i, _)| *i + 1 != old) {
                let Some(s) = status_of(a) else { continue };
                if s.leader_id != Some(s.node_id) || s.term <= old_term {
                    continue;
                }
                elected.get_or_insert(killed_at.elapsed());
                if header_at(a, s.committed_height).is_some_and(|h| h.term > old_term) {
                    committed = Some(killed_at.elapsed());
                }
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30).min(left()),
            "no write acknowledged in a term after {old_term} within 30 s of killing node {old}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let writer_first = writer.acked.lock().values().any(|r| r.header.term > old_term);
    eprintln!(
        "DOCKER FAILOVER: docker kill of leader node {old} (term {old_term}) -> next acknowledged write at the \
         host: {} ms (first by the {}); server side: a survivor leads after {:?} ms, has committed a batch of \
         its term after {:?} ms",
        failover.as_millis(),
        if writer_first { "client library" } else { "direct probes" },
        elected.map(|e| e.as_millis()),
        committed.map(|e| e.as_millis())
    );
    if std::env::var_os("TALLY_TEST_LOGS").is_some() {
        eprintln!("---- container logs after the kill ----\n{}", run_.logs());
    }
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10).min(left()), || writer.acked_len() > n + 100), "writes stopped");
    run_.must(docker(&["start", &containers[old - 1]]), Duration::from_secs(60));
    let others: Vec<String> = addrs.iter().enumerate().filter(|(i, _)| *i + 1 != old).map(|(_, a)| a.clone()).collect();
    wait_caught_up(&addrs[old - 1], &others, Duration::from_secs(60).min(left()));
    eprintln!("node {old} restarted and caught up");

    // 2. Partition a follower off the network, keep writing, reconnect it.
    let (lead, _) = leader(&addrs, Duration::from_secs(10).min(left()));
    let cut = (1..=NODES).find(|i| *i != lead).expect("a follower");
    run_.must(docker(&["network", "disconnect", &net, &containers[cut - 1]]), Duration::from_secs(30));
    let cut_at = Instant::now();
    let n = writer.acked_len();
    assert!(
        wait_until(Duration::from_secs(20).min(left()), || writer.acked_len() > n + 500),
        "the majority stopped committing while node {cut} was cut off"
    );
    std::thread::sleep(Duration::from_secs(3).min(left()));
    let alias = format!("tally-{cut}");
    run_.must(docker(&["network", "connect", "--alias", &alias, &net, &containers[cut - 1]]), Duration::from_secs(30));
    eprintln!("node {cut} was cut off for {:.1} s", cut_at.elapsed().as_secs_f64());
    let others: Vec<String> = addrs.iter().enumerate().filter(|(i, _)| *i + 1 != cut).map(|(_, a)| a.clone()).collect();
    wait_caught_up(&addrs[cut - 1], &others, Duration::from_secs(60).min(left()));
    eprintln!("node {cut} reconnected and caught up");
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10).min(left()), || writer.acked_len() > n + 100), "writes stopped");

    // 3. Every acknowledged write on every replica; the chain and the invariants.
    let mut acked = writer.finish();
    acked.extend(prober.finish());
    acked.extend(first);
    assert!(started.elapsed() < RUN_BOUND, "the run took {:?}", started.elapsed());
    check_every_replica(&addrs, &acked);
    assert_invariants(&addrs, &layout, &acked);

    // 4. `down` (volumes kept), `up` again: the volumes hold everything, every replica serves
    // the old receipts, and the cluster takes writes again.
    run_.must(run_.compose(&["down", "-t", "20"]), Duration::from_secs(120));
    assert!(addrs.iter().all(|a| status_of(a).is_none()), "a replica still answers after `down`");
    run_.must(run_.compose(&["up", "-d"]), Duration::from_secs(120));
    assert!(
        wait_until(Duration::from_secs(60).min(left()), || addrs
            .iter()
            .all(|a| status_of(a).is_some_and(|s| s.leader_id.is_some()))),
        "the cluster did not come back after down/up"
    );
    let opts = ClientOptions { addr_map: Arc::new(layout.addr_map()), ..short_opts() };
    let writer = Writer::start_with(&addrs, account_key(&layout, 0), 32, 1, opts);
    assert!(wait_until(Duration::from_secs(20).min(left()), || writer.acked_len() > 0), "no write after down/up");
    acked.extend(writer.finish());
    check_every_replica(&addrs, &acked);
    assert_invariants(&addrs, &layout, &acked);
    eprintln!("down and up again: every replica serves all {} acknowledged requests", acked.len());
    eprintln!(
        "docker test: {} acknowledged, failover {} ms, static build {:.1} s, run {:.1} s, total {:.1} s",
        acked.len(),
        failover.as_millis(),
        build_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
    drop(run_);
}
