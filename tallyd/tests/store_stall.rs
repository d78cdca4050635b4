//! A leader whose store is held for seconds must keep leading, and what waits for the
//! store meanwhile stays bounded. rusty-leveldb compacts inside `write`, with the store held; a
//! 10-minute full-load soak saw writes of up to 6 s. Before the fix the leader's replica thread
//! read the balance of a transfer's fresh recipient from the store, waited behind that write,
//! sent no heartbeat meanwhile, and a follower took over (run d of 2026-11-28: one read waited
//! 2.9 s). Now the warmer thread reads cold keys before the core sees a request, so a stalled
//! store delays batches, never heartbeats; requests waiting to be warmed count towards the
//! core's queue bound, so a flood meanwhile is refused `Overloaded` at the door.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tally_client::Connection;
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{ErrorCode, Operation};

/// Requests the core may hold, waiting or being warmed, before the replica thread takes no more
/// (2 × the default `batch_requests_max`).
const CORE_QUEUE_BOUND: usize = 2 * 16_384;

#[test]
fn a_leader_whose_store_stalls_for_twice_the_election_timeout_keeps_leading() {
    let (_dir, layout) = init_cluster(3, 2);
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

    // A flood for the stall, signed beforehand: enough big frames to fill the bound on what waits
    // to be warmed, then small frames on a second connection (each connection well under its own
    // limit of frames in flight), which must be refused `Overloaded`, not held without limit.
    let signer = client(&layout, 1);
    let transfer = || signer.sign(Operation::Transfer { to: fresh_key(), amount: 1 }).expect("sign");
    let big: Vec<Vec<_>> = (0..CORE_QUEUE_BOUND / 1024 + 2).map(|_| (0..1024).map(|_| transfer()).collect()).collect();
    let small: Vec<_> = (0..250).map(|_| vec![transfer()]).collect();
    let leader_addr = &nodes[li].addr;
    let connect =
        || Connection::connect_with(leader_addr, &dial_for(leader_addr), Duration::from_secs(5)).expect("connect");
    let (big_conn, small_conn) = (connect(), connect());

    let metrics_addr = layout.configs[li].metrics_listen.clone().expect("a metrics address");
    let validated = || {
        let (_, body) = http_get(&metrics_addr, "/metrics").expect("leader metrics");
        metric_value(&body, "tally_stage_seconds_count{stage=\"validate\"}").unwrap_or(0.0)
    };
    let validated_before = validated();
    let armed = fp_dirs[li].join("slow-store-write");
    std::fs::write(&armed, b"").expect("arm");
    assert!(
        wait_until(Duration::from_secs(5), || !armed.exists()),
        "the leader's store thread never took the failpoint"
    );
    let stalled_at = Instant::now();
    let big: Vec<_> = big.into_iter().map(|f| big_conn.send(ClientMessage::Submit(f)).expect("send")).collect();
    // The big frames are validated and queued first (stage 2 counts each frame it validated).
    assert!(
        wait_until(Duration::from_secs(3), || validated() >= validated_before + big.len() as f64),
        "the big frames were not validated within 3 s"
    );
    let small: Vec<_> = small.into_iter().map(|f| small_conn.send(ClientMessage::Submit(f)).expect("send")).collect();
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
    // Answered once the store is back: every big frame whole, and some small ones refused at the
    // door (a frame refused there is answered at once, request by request).
    for p in big {
        let r = p.wait(Duration::from_secs(60)).expect("the big frames are answered");
        assert!(matches!(&r, ServerMessage::Submitted(v) if v.len() == 1024), "a big frame answered: {r:?}");
    }
    let overloaded = small
        .into_iter()
        .map(|p| p.wait(Duration::from_secs(60)).expect("a reply"))
        .filter(|r| {
            matches!(r, ServerMessage::Submitted(v)
                if matches!(v.as_slice(), [SubmitReply::Refused(e)] if e.code == ErrorCode::Overloaded))
        })
        .count();
    assert!(overloaded > 0, "frames arriving while the core's queue is full of requests being warmed are refused");
    // And it commits again once the store is back.
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(15), || writer.acked_len() > n + 32), "no commits after the stall");
    let after = status_of(&nodes[li].addr).expect("leader status");
    assert_eq!((after.term, after.leader_id), (before.term, Some(before.node_id)), "the same leader, the same term");
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}
