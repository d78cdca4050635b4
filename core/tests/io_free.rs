//! The replica core compiles no I/O: its dependency tree (normal edges, as an embedder or the
//! simulator builds it) holds none of the crates that reach the network, the disk or threads.
//! `tally-failover` is in it only without its `io` feature.

use std::process::Command;

/// Crates that only the shell's I/O needs.
const IO_CRATES: [&str; 9] = [
    "rustls",
    "tally-store",
    "tally-net",
    "crossbeam",
    "parking_lot",
    "tracing",
    "metrics",
    "rusty-leveldb",
    "memmap2",
];

#[test]
fn the_core_depends_on_no_io_crate() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", "tally-core", "-e", "normal", "--prefix", "none", "-f", "{p} [{f}]"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(
        names.contains(&"tally-failover"),
        "the core's elections, lease and membership come from tally-failover:\n{tree}"
    );
    for io in IO_CRATES {
        assert!(!names.contains(&io), "tally-core pulls in {io}:\n{tree}");
    }
    let failover = tree.lines().find(|l| l.starts_with("tally-failover")).expect("listed");
    assert!(!failover.contains("io"), "tally-failover built with its io feature for the core: {failover}");
}
