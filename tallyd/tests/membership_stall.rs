//! Membership changes never stall the leader's replica thread (docs/architecture.md, "Membership").
//!
//! Removing a replica that is dead (kill -9) or stopped (SIGSTOP), under a write load: the
//! removal commits, `cluster remove` answers as soon as it does, and the remaining replicas keep
//! committing batches. Each test samples the leader's committed height every few milliseconds and
//! prints the longest time it stood still (the commit gap).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::wire::StatusInfo;

/// How often the gap monitor asks the leader for its committed height.
const SAMPLE_MS: u64 = 10;
/// The longest commit gap a removal may cause in these tests: generous for a busy 2-core CI
/// machine, but an order of magnitude under the stalls of a replica thread blocked on a dead link
/// (seconds to tens of seconds).
const GAP_MS_MAX: u128 = 1_500;
/// How long `cluster remove` may take to answer.
const REMOVE_MS_MAX: u128 = 3_000;

fn voters(s: &StatusInfo) -> Vec<u64> {
    let mut v: Vec<u64> = s.members.iter().filter(|m| m.is_voter).map(|m| m.node_id).collect();
    v.sort_unstable();
    v
}

/// Samples `addr`'s committed height and records the longest interval it did not move.
struct GapMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Duration, u64)>>,
}

impl GapMonitor {
    fn start(addr: &str) -> GapMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, flag) = (addr.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let conn = tally_client::Connection::connect_with(&addr, &dial_for(&addr), Duration::from_secs(2))
                .expect("monitor connects");
            let (mut last_height, mut last_move, mut gap_max) = (0u64, Instant::now(), Duration::ZERO);
            while !flag.load(Ordering::Acquire) {
                if let Ok(tally_codec::wire::ServerMessage::Status(s)) =
                    conn.call_timeout(tally_codec::wire::ClientMessage::Status, Duration::from_secs(30))
                {
                    if s.committed_height != last_height {
                        gap_max = gap_max.max(last_move.elapsed());
                        last_height = s.committed_height;
                        last_move = Instant::now();
                    }
                }
                std::thread::sleep(Duration::from_millis(SAMPLE_MS));
            }
            (gap_max.max(last_move.elapsed()), last_height)
        });
        GapMonitor { stop, thread: Some(thread) }
    }

    /// The longest gap seen and the last committed height.
    fn finish(mut self) -> (Duration, u64) {
        self.stop.store(true, Ordering::Release);
        self.thread.take().expect("monitor thread").join().expect("monitor")
    }
}

/// A 3-replica cluster under load loses follower `victim` to `fault`, then the admin removes it.
/// Returns the longest commit gap and how long `cluster remove` took.
fn remove_faulted_follower(fault: fn(&mut Daemon)) -> (Duration, Duration) {
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, leader) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 64, 2);
    std::thread::sleep(Duration::from_millis(1_000));
    let vi = (li + 1) % 3;
    let victim = layout.configs[vi].node_id;
    fault(&mut nodes[vi]);
    // The leader has noticed the link is gone and queued messages for it meanwhile.
    std::thread::sleep(Duration::from_millis(1_500));
    let monitor = GapMonitor::start(&addrs[li]);
    std::thread::sleep(Duration::from_millis(500));
    let admin = tally_client::Client::connect(
        &[addrs[li].clone()],
        account_key(&layout, 0),
        opts_for(&addrs, tally_client::ClientOptions::default()),
    )
    .expect("admin connects");
    let t = Instant::now();
    let removed = admin.cluster_remove(&layout.admin_key().expect("admin key"), victim);
    let remove_took = t.elapsed();
    // Commits must keep flowing for a while after the change too (the links are rebuilt then).
    std::thread::sleep(Duration::from_millis(3_000));
    let (gap, height) = monitor.finish();
    if removed.is_err() || gap.as_millis() > GAP_MS_MAX {
        dump_logs(&nodes);
    }
    removed.unwrap_or_else(|e| panic!("cluster remove {victim} failed after {remove_took:?}: {e}"));
    let rest: Vec<String> = addrs.iter().enumerate().filter(|(i, _)| *i != vi).map(|(_, a)| a.clone()).collect();
    let s = status_of(&addrs[li]).expect("leader status");
    assert_eq!(s.leader_id, Some(leader.node_id), "the leader kept its leadership");
    assert!(!voters(&s).contains(&victim), "node {victim} is still a voter: {:?}", s.members);
    let acked = writer.finish();
    nodes[vi].kill9();
    assert_invariants(&rest, &layout, &acked);
    eprintln!(
        "removed node {victim}: cluster remove answered in {remove_took:?}; longest commit gap {gap:?} \
         (sampled every {SAMPLE_MS} ms); committed height {height}"
    );
    (gap, remove_took)
}

#[test]
fn removing_a_killed_replica_under_load_keeps_commits_flowing() {
    let (gap, took) = remove_faulted_follower(Daemon::kill9);
    assert!(took.as_millis() <= REMOVE_MS_MAX, "cluster remove took {took:?}");
    assert!(gap.as_millis() <= GAP_MS_MAX, "the leader stopped committing for {gap:?}");
}

#[test]
fn removing_a_stopped_replica_under_load_keeps_commits_flowing() {
    let (gap, took) = remove_faulted_follower(|d| d.signal("STOP"));
    assert!(took.as_millis() <= REMOVE_MS_MAX, "cluster remove took {took:?}");
    assert!(gap.as_millis() <= GAP_MS_MAX, "the leader stopped committing for {gap:?}");
}

/// `cluster add` of a node that accepts connections and never answers: the add fails (naming
/// the node as unreachable) and leaves no learner, and the leader commits throughout.
#[test]
fn adding_a_node_that_never_answers_keeps_commits_flowing() {
    let (_dir, layout) = init_cluster(3, 1);
    let nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 64, 2);
    std::thread::sleep(Duration::from_millis(1_000));
    // Accepts TCP and holds every connection open without a byte.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let monitor = GapMonitor::start(&addrs[li]);
    let admin = tally_client::Client::connect(
        &[addrs[li].clone()],
        account_key(&layout, 0),
        opts_for(&addrs, tally_client::ClientOptions::default()),
    )
    .expect("admin connects");
    let t = Instant::now();
    let e = admin
        .cluster_add(&layout.admin_key().expect("admin key"), 4, "127.0.0.1:1", &silent_addr)
        .expect_err("a node that never answers is not added");
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(1_000));
    let (gap, height) = monitor.finish();
    assert!(e.to_string().contains("not reachable as a replica"), "{e}");
    let s = status_of(&addrs[li]).expect("leader status");
    assert_eq!(voters(&s), [1, 2, 3]);
    assert_eq!(s.members.len(), 3, "no learner left behind: {:?}", s.members);
    eprintln!("cluster add of a silent node refused in {took:?}; longest commit gap {gap:?}; height {height}");
    assert!(gap.as_millis() <= GAP_MS_MAX, "the leader stopped committing for {gap:?}");
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}
