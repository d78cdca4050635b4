//! A panic in one pipeline thread must end the whole replica, so a backup takes over. Before the
//! fix, a leader whose sequencer thread died kept heartbeating and the cluster never committed again.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

#[test]
fn a_panicking_replica_thread_ends_the_leader_and_a_backup_takes_over() {
    fault_ends_the_leader("replica-thread", "failpoint replica-thread fired");
}

/// A proposal the log refuses while this replica still leads the term (its queue is full):
/// before, the sequencer took up the chain again from the applied head, so a new batch could
/// take a height an earlier, not yet applied batch of the term held, and every replica would
/// stop at that height once both committed. Now the leader ends and a backup continues from the
/// log as it is.
#[test]
fn a_refused_proposal_ends_the_leader_instead_of_reusing_a_height() {
    fault_ends_the_leader("refuse-proposal", "batch proposal refused in term");
}

/// Arms `failpoint` under a write load; the leader must abort with `expect_log` in its log, a
/// backup must take over, and every acknowledged write must be on the survivors.
fn fault_ends_the_leader(failpoint: &str, expect_log: &str) {
    let (dir, layout) = init_cluster(3, 1);
    let failpoints = dir.path().join("failpoints");
    std::fs::create_dir_all(&failpoints).expect("mkdir");
    let addrs = layout.client_addrs();
    let mut nodes = start_all_env(&layout, |_| vec![("TALLY_FAILPOINT_DIR", failpoints.clone())]);
    let (li, before) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 8, 1);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 16), "no commits before the fault");
    // Arm the failpoint: the leader's sequencer panics at its next batch.
    std::fs::write(failpoints.join(failpoint), b"").expect("arm");
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = nodes[li].exited();
            status.is_some()
        }),
        "the leader kept running with a dead sequencer"
    );
    let status = status.expect("exited");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "the replica aborted: {status:?}");
    let log = nodes[li].log_text();
    assert!(log.contains(expect_log), "the panic is in the log:\n{log}");
    assert!(!log.contains('\x1b'), "a log written to a file has no ANSI colour codes");
    let rest: Vec<Daemon> = nodes.drain(..).enumerate().filter(|(i, _)| *i != li).map(|(_, d)| d).collect();
    let (_, after) = wait_leader(&rest, Duration::from_secs(10));
    assert_ne!(after.node_id, before.node_id, "a backup leads");
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 16), "no commits after the failover");
    let acked = writer.finish();
    let live: Vec<String> = rest.iter().map(|d| d.addr.clone()).collect();
    assert_invariants(&live, &layout, &acked);
}
