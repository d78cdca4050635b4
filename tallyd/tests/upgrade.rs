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
    let dial = tally_net::Dial::cluster(&dir.join("ca.pem")).expect("CA");
    for a in CLIENT_ADDRS {
        register_dial(a, dial.clone());
    }
    let nodes: Vec<Daemon> = (1..=3)
        .map(|i| Daemon::spawn(&dir.join(format!("node-{i}.toml")), CLIENT_ADDRS[i - 1], &dir.join(format!("node-{i}.log"))))
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
