//! Issue 9: a leader whose store is held for seconds must keep leading. rusty-leveldb compacts
//! inside `write`, with the store held; a 10-minute full-load soak saw writes of up to 6 s. Before
//! the fix the leader's replica thread read the balance of a transfer's fresh recipient from the
//! store, waited behind that write, sent no heartbeat meanwhile, and a follower took over (run d
//! of 2026-11-28: one read waited 2.9 s). Now the warmer thread reads cold keys before the core
//! sees a request, so a stalled store delays batches, never heartbeats.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_leader_whose_store_stalls_for_twice_the_election_timeout_keeps_leading() {
    let (_dir, layout) = init_cluster(3, 1);
    let addrs = layout.client_addrs();
    // One failpoint directory per node: the stall is planted in the leader's store only.
    let fp_dirs: Vec<std::path::PathBuf> = (0..3).map(|i| layout.dir.join(format!("failpoints-{}", i + 1))).collect();
    for d in &fp_dirs {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let nodes = start_all_env(&layout, |i| vec![("TALLY_FAILPOINT_DIR", fp_dirs[i].clone())]);
    let (li, before) = wait_leader(&nodes, Duration::from_secs(10));
    // Every transfer goes to a fresh account: each batch reads keys no cache holds.
    let writer = Writer::start(&addrs, account_key(&layout, 0), 8, 2);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 32), "no commits before the stall");

    let armed = fp_dirs[li].join("slow-store-write");
    std::fs::write(&armed, b"").expect("arm");
    assert!(
        wait_until(Duration::from_secs(5), || !armed.exists()),
        "the leader's store thread never took the failpoint"
    );
    let stalled_at = Instant::now();
    // The store is held for 4 s, twice the longest election timeout. Throughout, and a while
    // after, every replica must still see the same leader in the same term.
    let mut changes = Vec::new();
    while stalled_at.elapsed() < Duration::from_secs(6) {
        for d in &nodes {
            if let Some(s) = status_of(&d.addr) {
                if s.term != before.term || s.leader_id.is_some_and(|l| l != before.node_id) {
                    changes.push((s.node_id, s.term, s.leader_id, stalled_at.elapsed()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let leader_log = nodes[li].log_text();
    assert!(
        changes.is_empty(),
        "the leader (node {}, term {}) lost its leadership while its store stalled: {changes:?}\n{}",
        before.node_id,
        before.term,
        leader_log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect::<Vec<_>>().join("\n")
    );
    assert!(
        !leader_log.contains("a read on the replica thread waited for the store"),
        "the leader's replica thread waited for the store:\n{leader_log}"
    );
    // And it commits again once the store is back.
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(15), || writer.acked_len() > n + 32), "no commits after the stall");
    let after = status_of(&nodes[li].addr).expect("leader status");
    assert_eq!((after.term, after.leader_id), (before.term, Some(before.node_id)), "the same leader, the same term");
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}
