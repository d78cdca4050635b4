//! Follower catch-up by snapshot (`docs/architecture.md` §6): a follower killed with -9 stays down
//! while the others commit so many batches that the leader compacts its log past the follower;
//! restarted, the follower gets a state snapshot, converges, and the history passes the checker.
//!
//! The test's nodes keep `LOG_RETAIN_ENTRIES` = 1,000 entries below the compaction hint, and
//! their store syncs every second and hints its applied index; one batch is one entry. With
//! `batch_requests_max = 1` and a 1 ms batch interval, each one-request frame is its own batch,
//! which reaches ~700 batches/s here: 1,500 entries take a few seconds.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Log entries the test's nodes retain behind the durable store.
const LOG_RETAIN_ENTRIES: u64 = 1_000;
/// Entries the leader must commit past the follower before a sync tick compacts past it.
const ENTRIES_PAST_FOLLOWER: u64 = LOG_RETAIN_ENTRIES + 500;

#[test]
fn follower_catches_up_by_snapshot_after_compaction() {
    let started = Instant::now();
    let (_dir, mut layout) = init_cluster(3, 2);
    for (cfg, path) in layout.configs.iter_mut().zip(&layout.config_paths) {
        cfg.batch_requests_max = 1;
        cfg.batch_interval_ms = 1;
        cfg.store_sync_interval_ms = 1_000;
        cfg.log_retain_entries = LOG_RETAIN_ENTRIES;
        write_config(path, cfg);
    }
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 1, 16);
    std::thread::sleep(Duration::from_secs(1));

    let fi = (li + 1) % 3;
    let f_height = status_of(&addrs[fi]).expect("follower status").applied_height;
    nodes[fi].kill9();
    let killed_at = Instant::now();
    let target = f_height + ENTRIES_PAST_FOLLOWER;
    let mut leader_height = 0;
    let reached = wait_until(Duration::from_secs(45), || {
        leader_height =
            running_addrs(&nodes).iter().filter_map(|a| status_of(a)).map(|s| s.committed_height).max().unwrap_or(0);
        leader_height >= target
    });
    assert!(reached, "only reached height {leader_height} of {target} in 45 s");
    eprintln!(
        "follower node {} down at height {f_height}; leader at {leader_height} after {:?}",
        fi + 1,
        killed_at.elapsed()
    );
    // Past one store sync (every second here), which lets Raft compact below applied - 1,000.
    std::thread::sleep(Duration::from_millis(2500));
    let mut acked = writer.finish();
    let leader_height = status_of(&running_addrs(&nodes)[0]).expect("status").committed_height;

    // The follower comes back under a light load and converges.
    let light = Writer::start(&addrs, account_key(&layout, 1), 8, 1);
    let restarted_at = Instant::now();
    nodes[fi] = Daemon::start(
        &layout.config_paths[fi],
        &layout.configs[fi].listen,
        &layout.dir.join(format!("node-{}.log", fi + 1)),
    );
    let caught_up = wait_until(Duration::from_secs(30), || {
        status_of(&addrs[fi]).is_some_and(|s| s.applied_height >= leader_height)
    });
    assert!(caught_up, "restarted follower did not reach height {leader_height}:\n{}", nodes[fi].log_text());
    eprintln!("follower caught up {} heights in {:?}", leader_height - f_height, restarted_at.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    acked.extend(light.finish());

    // It got there by a snapshot: it holds the state but not the history of heights it skipped
    // (a snapshot carries only the last batches), yet serves their receipts by asking the leader.
    let probe = f_height + (leader_height - f_height) / 2;
    let conn = tally_client::Connection::connect_with(&addrs[fi], &dial_for(&addrs[fi]), Duration::from_secs(2))
        .expect("connect");
    let skipped = match conn.call(tally_codec::wire::ClientMessage::Batch { height: probe }) {
        Ok(tally_codec::wire::ServerMessage::Batch(None)) => true,
        Ok(tally_codec::wire::ServerMessage::Batch(Some(b))) => !b.body_available,
        other => panic!("height {probe} on the restarted follower: {other:?}"),
    };
    let old =
        acked.values().find(|r| r.header.height > f_height && r.header.height < probe).expect("a skipped receipt");
    // By height (a follower lacking the batch relays to the leader), so the request's expiry
    // passing during the test does not matter.
    match conn.call(tally_codec::wire::ClientMessage::ReceiptAt { id: old.request_id(), height: old.header.height }) {
        Ok(tally_codec::wire::ServerMessage::Receipt(Some(r))) => {
            assert_eq!(&*r, old, "the relayed receipt is the original")
        }
        other => panic!("the follower could not serve a receipt from before its snapshot: {other:?}"),
    }
    // A watch from a height the snapshot skipped is refused, naming the oldest height it has;
    // from that height on it is served.
    let watch = |from: u64| {
        conn.call(tally_codec::wire::ClientMessage::Watch {
            filter: tally_codec::wire::WatchFilter::AllDocs,
            from_height: from,
            max_batches: 4,
            wait_ms: 0,
        })
    };
    let oldest = match watch(probe) {
        Ok(tally_codec::wire::ServerMessage::Error(e)) if e.code == tally_codec::ErrorCode::Compacted => {
            let oldest: u64 = e
                .message
                .split_whitespace()
                .nth(4)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("the error names the oldest height: {}", e.message));
            assert!(oldest > probe, "{}", e.message);
            oldest
        }
        other => panic!("a watch from skipped height {probe}: {other:?}"),
    };
    match watch(oldest) {
        Ok(tally_codec::wire::ServerMessage::Watched(p)) => assert!(p.next_height > oldest, "{p:?}"),
        other => panic!("a watch from the oldest height {oldest}: {other:?}"),
    }
    let installed = nodes[fi].log_text().contains("installing snapshot");
    assert!(
        skipped && installed,
        "the follower caught up from the log, not a snapshot (body at {probe} present: {}, log mentions install: {installed})",
        !skipped
    );

    // The metrics count it: an install on the follower, a snapshot sent by a leader.
    let scrape = |i: usize| {
        let addr = layout.configs[i].metrics_listen.clone().expect("metrics address");
        http_get(&addr, "/metrics").expect("metrics answer").1
    };
    let installs = metric_value(&scrape(fi), "tally_snapshot_installs_total");
    assert!(installs.is_some_and(|n| n >= 1.0), "tally_snapshot_installs_total on the follower: {installs:?}");
    let sent: f64 = (0..3)
        .filter(|i| *i != fi)
        .filter_map(|i| metric_value(&scrape(i), "tally_snapshot_sends_total{result=\"sent\"}"))
        .sum();
    assert!(sent >= 1.0, "no leader counted a snapshot sent");

    assert_invariants(&addrs, &layout, &acked);
    eprintln!("{} acknowledged; took {:?}", acked.len(), started.elapsed());
}
