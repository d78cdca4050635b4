//! Upgrades that lose nothing: a cluster written by release 0.3 (`tallyd/tests/fixtures/v0.3.0`,
//! made by that release's own binaries with `scripts/make-release-fixtures.sh`) opens with this
//! release, its data directories are migrated to the current format, every receipt 0.3 issued
//! is served again with the same bytes and still verifies, and the cluster takes new writes.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tally_client::{Client, ClientOptions};
use tally_codec::{encode, Operation, PublicKey, Receipt};

const FIXTURE: &str = "tests/fixtures/v0.3.0";
/// The fixture cluster's client ports (its configs and stored membership name them).
const CLIENT_ADDRS: [&str; 3] = ["127.0.0.1:15001", "127.0.0.1:15002", "127.0.0.1:15003"];

/// Held by each test that runs the fixture cluster: its ports are fixed.
static FIXTURE_PORTS: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// A copy of the fixture cluster in a temporary directory, its configs pointing there.
fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE).join("cluster"), &dir);
    for i in 1..=3 {
        let path = dir.join(format!("node-{i}.toml"));
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, text.replace("@DIR@", dir.to_str().expect("utf-8"))).expect("config");
    }
    (tmp, dir)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

fn receipt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE).join("receipts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).expect("receipts").map(|e| e.expect("entry").path()).collect();
    files.sort();
    files
}

fn start(dir: &Path) -> Vec<Daemon> {
    start_program(Path::new(env!("CARGO_BIN_EXE_tallyd")), dir)
}

/// The fixture cluster in `dir`, run by `program`.
fn start_program(program: &Path, dir: &Path) -> Vec<Daemon> {
    let dial = tally_net::Dial::cluster(&dir.join("ca.pem")).expect("CA");
    for a in CLIENT_ADDRS {
        register_dial(a, dial.clone());
    }
    let nodes: Vec<Daemon> = (1..=3)
        .map(|i| {
            let (config, log) = (dir.join(format!("node-{i}.toml")), dir.join(format!("node-{i}.log")));
            Daemon::spawn_program(program, &config, CLIENT_ADDRS[i - 1], &log, &[], &[])
        })
        .collect();
    for d in &nodes {
        d.wait_ready(Duration::from_secs(30));
    }
    nodes
}

fn connect(dir: &Path) -> Client {
    let addrs: Vec<String> = CLIENT_ADDRS.iter().map(|a| a.to_string()).collect();
    let key = tally_client::keyfile::load_key(&dir.join("accounts/0.key")).expect("account key");
    Client::connect(&addrs, key, opts_for(&addrs, ClientOptions::default())).expect("connect")
}

fn operator(dir: &Path) -> PublicKey {
    PublicKey::from_hex(std::fs::read_to_string(dir.join("operator.pub")).expect("operator.pub").trim())
        .expect("operator key")
}

#[test]
fn a_release_0_3_cluster_opens_migrated_and_serves_every_old_receipt_with_the_same_bytes() {
    let _ports = FIXTURE_PORTS.lock();
    let (_tmp, dir) = copy_fixture();
    for i in 1..=3 {
        assert!(!dir.join(format!("node-{i}/FORMAT")).exists(), "release 0.3 wrote no FORMAT file");
    }
    let nodes = start(&dir);
    for i in 1..=3 {
        let format = std::fs::read_to_string(dir.join(format!("node-{i}/FORMAT"))).expect("migrated");
        assert_eq!(format, format!("tally data format {}\n", tally_store::format::DATA_FORMAT));
        let log = std::fs::read_to_string(dir.join(format!("node-{i}.log"))).expect("log");
        assert!(log.contains("data directory migrated"), "node {i} says it migrated:\n{log}");
    }
    wait_leader(&nodes, Duration::from_secs(30));
    let client = connect(&dir);
    let op = operator(&dir);
    let files = receipt_files();
    assert!(files.len() >= 6, "the fixture holds a receipt of each kind of request: {files:?}");
    for f in &files {
        let old: Receipt = tally_client::receipt_file::verify_receipt_file(f, &op)
            .unwrap_or_else(|e| panic!("{}: 0.3's receipt no longer verifies: {e}", f.display()));
        let served = client
            .receipt_at(old.request_id(), old.header.height)
            .expect("receipt query")
            .unwrap_or_else(|| panic!("{}: not served any more", f.display()));
        assert_eq!(encode(&served), encode(&old), "{}: served with other bytes", f.display());
    }
    // And it goes on: a transfer commits on the upgraded cluster, chained to 0.3's batches.
    let last = files.iter().map(|f| tally_client::receipt_file::load_receipt(f).expect("load").header.height).max();
    let to = PublicKey(tally_client::keyfile::generate_key().verifying_key().to_bytes());
    let req = client.sign(Operation::Transfer { to, amount: 1 }).expect("sign");
    let receipt = client.submit_one(req).expect("a new write commits").receipt;
    assert!(receipt.header.height > last.expect("heights"), "the new batch follows 0.3's");
    assert!(receipt.verify(&op).is_ok(), "the new receipt verifies");
    drop(nodes);
}

/// `tallyd` of release 0.3, built from its tag once (`scripts/release-binaries.sh`, cached
/// under `target/releases/v0.3.0`). `.ci/run` builds it before the suite.
fn release_0_3_tallyd() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/release-binaries.sh"))
        .arg("v0.3.0")
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/release-binaries.sh");
    assert!(out.status.success(), "building release 0.3 from its tag failed");
    let bin = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim()).join("tallyd");
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// Leader changes seen by polling every running node's status every 20 ms: the leader of the
/// highest term reported, recorded each time it differs from the last one recorded.
struct LeaderWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<parking_lot::Mutex<Vec<(u64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaderWatch {
    fn start(addrs: Vec<String>) -> LeaderWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (st, se) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let best = addrs.iter().filter_map(|a| status_of(a)).filter_map(|s| Some((s.term, s.leader_id?))).max();
                if let Some((term, leader)) = best {
                    let mut seen = se.lock();
                    if seen.last().is_none_or(|(t, l)| *l != leader && term > *t) {
                        seen.push((term, leader));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        LeaderWatch { stop, seen, thread: Some(thread) }
    }

    /// Leaders recorded so far.
    fn count(&self) -> usize {
        self.seen.lock().len()
    }

    fn finish(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().clone()
    }
}

/// Release 0.3 and this release in one cluster: replaced one replica at a time (followers
/// first, the leader last, each stopped with SIGTERM and started again on its data directory)
/// while a writer keeps submitting transfers. The replicas link across versions (peer
/// protocol 2), nothing acknowledged is lost or doubled, every restart changes the leader at
/// most once, and at the end every link runs protocol 3.
#[test]
fn a_rolling_upgrade_from_release_0_3_under_load_loses_nothing() {
    let old = release_0_3_tallyd();
    let (_dir, layout) = init_cluster(3, 8);
    let log = |i: usize| layout.dir.join(format!("node-{}.log", i + 1));
    let mut nodes: Vec<Daemon> = (0..3)
        .map(|i| Daemon::spawn_program(&old, &layout.config_paths[i], &layout.configs[i].listen, &log(i), &[], &[]))
        .collect();
    for d in &nodes {
        d.wait_ready(Duration::from_secs(30));
    }
    let addrs = layout.client_addrs();
    let writer = Writer::start(&addrs, account_key(&layout, 0), 16, 2);
    assert!(wait_until(Duration::from_secs(20), || writer.acked_len() > 200), "release 0.3 takes writes");
    let (leader, _) = wait_leader(&nodes, Duration::from_secs(10));
    let order: Vec<usize> = (0..3).filter(|i| *i != leader).chain([leader]).collect();
    let watch = LeaderWatch::start(addrs.clone());
    assert!(wait_until(Duration::from_secs(5), || watch.count() == 1), "the watch sees the leader");
    for (step, i) in order.iter().copied().enumerate() {
        let before = watch.count();
        let acked_before = writer.acked_len();
        nodes[i].terminate();
        nodes[i] = Daemon::spawn(&layout.config_paths[i], &layout.configs[i].listen, &log(i));
        nodes[i].wait_ready(Duration::from_secs(30));
        let target = status_of(&addrs[i]).map(|s| s.committed_height).unwrap_or(0);
        assert!(
            wait_until(Duration::from_secs(30), || status_of(&addrs[i]).is_some_and(|s| s.applied_height >= target)),
            "node {} (this release) catches up",
            i + 1
        );
        assert!(
            wait_until(Duration::from_secs(30), || writer.acked_len() > acked_before + 200),
            "writes go on after step {step} (node {} upgraded)",
            i + 1
        );
        let changes = watch.count() - before;
        assert!(changes <= 1, "restarting node {} changed the leader {changes} times: {:?}", i + 1, watch.seen.lock());
        let text = std::fs::read_to_string(log(i)).expect("log");
        if step < 2 {
            assert!(text.contains("version=2"), "node {} links to release 0.3 at peer protocol 2:\n{text}", i + 1);
            // The status of an upgraded replica names the replicas of release 0.3 it is linked to:
            // at least the leader, which is upgraded last.
            let old_leader = leader as u64 + 1;
            let said = |s: &tally_codec::wire::StatusInfo| {
                s.warnings.iter().any(|w| w.starts_with(&format!("node {old_leader} speaks peer protocol 2")))
            };
            assert!(
                wait_until(Duration::from_secs(10), || status_of(&addrs[i]).is_some_and(|s| said(&s))),
                "node {} warns that node {old_leader} runs release 0.3: {:?}",
                i + 1,
                status_of(&addrs[i]).map(|s| s.warnings)
            );
        }
    }
    let leaders = watch.finish();
    let acked = writer.finish();
    for a in &addrs {
        let upgraded = |s: &tally_codec::wire::StatusInfo| !s.warnings.iter().any(|w| w.contains("peer protocol 2"));
        assert!(
            wait_until(Duration::from_secs(10), || status_of(a).is_some_and(|s| upgraded(&s))),
            "{a}: no warning of an older release once every replica runs this one: {:?}",
            status_of(a).map(|s| s.warnings)
        );
    }
    assert!(acked.len() > 600, "{} requests acknowledged", acked.len());
    assert_invariants(&addrs, &layout, &acked);
    // Each replica restarted last dialled only replicas of this release: protocol 3 throughout.
    let last = std::fs::read_to_string(log(*order.last().expect("three"))).expect("log");
    let after_restart = last.rsplit("data directory migrated").next().expect("restarted");
    assert!(after_restart.contains("version=3") && !after_restart.contains("version=2"), "{after_restart}");
    eprintln!("rolling upgrade: {} acknowledged, leaders {leaders:?}", acked.len());
    drop(nodes);
}

/// A downgrade before any newer format is written: the fixture cluster, migrated and written to
/// by this release, stopped, then run by release 0.3 again, serves what this release committed.
#[test]
fn a_downgrade_to_release_0_3_after_the_migration_keeps_everything() {
    let old = release_0_3_tallyd();
    let _ports = FIXTURE_PORTS.lock();
    let (_tmp, dir) = copy_fixture();
    let mut nodes = start(&dir);
    wait_leader(&nodes, Duration::from_secs(30));
    let client = connect(&dir);
    let to = PublicKey(tally_client::keyfile::generate_key().verifying_key().to_bytes());
    let req = client.sign(Operation::Transfer { to, amount: 3 }).expect("sign");
    let written = client.submit_one(req).expect("commits").receipt;
    drop(client);
    for n in &mut nodes {
        n.terminate();
    }
    for i in 1..=3 {
        assert!(dir.join(format!("node-{i}/FORMAT")).exists(), "migrated to format 2");
    }
    let nodes = start_program(&old, &dir);
    wait_leader(&nodes, Duration::from_secs(30));
    let client = connect(&dir);
    let served = client
        .receipt_at(written.request_id(), written.header.height)
        .expect("receipt query")
        .expect("release 0.3 serves what this release committed");
    assert_eq!(encode(&served), encode(&written));
    assert_eq!(client.balance(to, false).expect("balance"), Some(3));
    drop(nodes);
}
