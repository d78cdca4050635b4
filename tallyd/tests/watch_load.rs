//! Watches cost what they are given (docs/coordination.md, docs/security.md): 200 watchers
//! catching up from height 0 on the leader and 50 on a follower, beside a writer, are each
//! answered (a page, or `Busy` with a retry hint) within 1 s, and the writer keeps committing;
//! the named limits on concurrent watches refuse the watch beyond them at once.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_client::Connection;
use tally_codec::wire::{ClientMessage, ServerMessage, WatchFilter};
use tally_codec::{DocKey, Operation};

/// Documents loaded before the watchers start (each watcher's history to catch up on).
const DOCS: usize = 20_000;
/// How long the watchers run beside the writer.
const WATCH_FOR: Duration = Duration::from_secs(8);
/// Every answer (page or `Busy`) must arrive within this long of its request.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// What one watcher saw.
#[derive(Debug, Default)]
struct Seen {
    pages: u64,
    busy: u64,
    /// Answers that were neither a page nor `Busy` (or no answer at all).
    wrong: Vec<String>,
    slowest: Duration,
    next_height: u64,
}

fn load_docs(layout: &tally_cli::cluster::ClusterLayout, n: usize) {
    let c = Arc::new(client(layout, 1));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for chunk in (t..n).step_by(2).collect::<Vec<_>>().chunks(1_000) {
                    let reqs: Vec<_> = chunk
                        .iter()
                        .map(|i| {
                            let key = DocKey::parse(&format!("0d5d3807-5fbf-4228-a657-{i:012x}")).expect("uuid4");
                            let value = format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(80)).into_bytes();
                            c.sign(Operation::Set { key, value }).expect("sign")
                        })
                        .collect();
                    c.submit(reqs).expect("documents committed");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("loader");
    }
}

/// Pulls `AllDocs` pages from `addr` from height 0 until `stop`, timing every answer. A `Busy`
/// answer is honoured: the next request waits for its retry hint.
fn watcher(addr: String, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let conn = match Connection::connect_with(&addr, &dial_for(&addr), Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => {
            seen.wrong.push(format!("connect: {e}"));
            return seen;
        }
    };
    let mut from = 0;
    while !stop.load(Ordering::Acquire) {
        let msg =
            ClientMessage::Watch { filter: WatchFilter::AllDocs, from_height: from, max_batches: 256, wait_ms: 500 };
        let sent = Instant::now();
        let reply = conn.send(msg).and_then(|p| p.wait(Duration::from_secs(15)));
        seen.slowest = seen.slowest.max(sent.elapsed());
        match reply {
            Ok(ServerMessage::Watched(p)) => {
                seen.pages += 1;
                from = p.next_height;
            }
            Ok(ServerMessage::Busy(b)) => {
                seen.busy += 1;
                std::thread::sleep(Duration::from_millis(u64::from(b.retry_after_ms).min(2_000)));
            }
            Ok(other) => seen.wrong.push(format!("{other:?}")),
            Err(e) => {
                seen.wrong.push(e.to_string());
                break;
            }
        }
    }
    seen.next_height = from;
    seen
}

/// 200 watchers from height 0 on the leader and 50 on a follower, beside a writer: each answer
/// within 1 s, and the writer keeps committing.
#[test]
fn two_hundred_watchers_catching_up_are_each_answered_within_a_second() {
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let leader = nodes[li].addr.clone();
    let follower = nodes[(li + 1) % 3].addr.clone();
    load_docs(&layout, DOCS);
    let writer = Writer::start(std::slice::from_ref(&leader), account_key(&layout, 0), 64, 2);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 256), "the writer commits");

    let stop = Arc::new(AtomicBool::new(false));
    let targets = std::iter::repeat_n(leader.clone(), 200).chain(std::iter::repeat_n(follower.clone(), 50));
    let watchers: Vec<_> = targets
        .map(|addr| {
            let stop = stop.clone();
            std::thread::spawn(move || watcher(addr, stop))
        })
        .collect();
    let acked_before = writer.acked_len();
    std::thread::sleep(WATCH_FOR);
    let acked_during = writer.acked_len() - acked_before;
    stop.store(true, Ordering::Release);
    let seen: Vec<Seen> = watchers.into_iter().map(|t| t.join().expect("watcher")).collect();
    let _ = writer.finish();

    let pages: u64 = seen.iter().map(|s| s.pages).sum();
    let busy: u64 = seen.iter().map(|s| s.busy).sum();
    let slowest = seen.iter().map(|s| s.slowest).max().unwrap_or_default();
    let late = seen.iter().filter(|s| s.slowest > ANSWER_WITHIN).count();
    eprintln!(
        "watchers: {pages} pages, {busy} busy, slowest answer {slowest:?}, {late} of {} watchers answered late; \
         the writer committed {acked_during} meanwhile",
        seen.len()
    );
    for (i, s) in seen.iter().enumerate() {
        assert!(s.wrong.is_empty(), "watcher {i}: {:?}", s.wrong);
        assert!(s.pages + s.busy > 0, "watcher {i} got no answer: {s:?}");
        assert!(s.slowest <= ANSWER_WITHIN, "watcher {i} waited {:?} for an answer: {s:?}", s.slowest);
    }
    assert!(pages > 0, "some pages were served");
    assert!(acked_during > 0, "the writer kept committing beside the watchers");
}

/// Waits that stay open (from a height far ahead, each waits 500 ms): 8 on one connection fill
/// `WATCHES_PER_CONNECTION_MAX`, 200 over 25 connections fill `WATCHES_PER_ADDRESS_MAX`; the
/// watch beyond either is refused at once with `Busy`, naming the limit.
#[test]
fn a_watch_beyond_the_named_limits_is_refused_busy_at_once() {
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let (li, status) = wait_leader(&nodes, Duration::from_secs(10));
    let leader = nodes[li].addr.clone();
    let ahead = status.committed_height + 1_000_000;
    let wait =
        || ClientMessage::Watch { filter: WatchFilter::AllDocs, from_height: ahead, max_batches: 1, wait_ms: 500 };
    let connect = || Connection::connect_with(&leader, &dial_for(&leader), Duration::from_secs(5)).expect("connect");

    // Per connection: the ninth is refused while the eight wait.
    let one = connect();
    let sent = Instant::now();
    let held: Vec<_> = (0..8).map(|_| one.send(wait()).expect("send")).collect();
    let ninth = one.send(wait()).expect("send").wait(Duration::from_secs(10)).expect("an answer");
    let took = sent.elapsed();
    match &ninth {
        ServerMessage::Busy(b) => {
            assert_eq!(b.limit, "WATCHES_PER_CONNECTION_MAX", "{b:?}");
            assert!(b.retry_after_ms > 0, "{b:?}");
        }
        other => panic!("the ninth watch on one connection was not refused: {other:?} after {took:?}"),
    }
    assert!(took < Duration::from_millis(400), "refused at once, not after the others: {took:?}");
    for p in held {
        assert!(matches!(p.wait(Duration::from_secs(10)), Ok(ServerMessage::Watched(_))), "the eight are served");
    }

    // Per address: 200 waits over 25 connections, then one more once the replica counts the 200
    // open (its gauge). They must still be open when the probe arrives, so a machine too slow to
    // get there within 300 ms tries again.
    let metrics_addr = layout.configs[li].metrics_listen.clone().expect("a metrics address");
    let open = || {
        let (_, body) = http_get(&metrics_addr, "/metrics").expect("metrics");
        metric_value(&body, "tally_watches_active").unwrap_or(0.0)
    };
    let conns: Vec<Connection> = (0..26).map(|_| connect()).collect();
    for attempt in 0..5 {
        let sent = Instant::now();
        let held: Vec<_> = conns[..25].iter().flat_map(|c| (0..8).map(|_| c.send(wait()).expect("send"))).collect();
        let counted = wait_until(Duration::from_millis(300), || open() >= 200.0);
        if !counted || sent.elapsed() > Duration::from_millis(300) {
            eprintln!("attempt {attempt}: 200 open after {:?}: {counted}; again", sent.elapsed());
            for p in held {
                let _ = p.wait(Duration::from_secs(10));
            }
            continue;
        }
        let r = conns[25].send(wait()).expect("send").wait(Duration::from_secs(10)).expect("an answer");
        match &r {
            ServerMessage::Busy(b) => assert_eq!(b.limit, "WATCHES_PER_ADDRESS_MAX", "{b:?}"),
            other => panic!("the 201st concurrent watch from one address was not refused: {other:?}"),
        }
        assert!(sent.elapsed() < Duration::from_millis(450), "refused at once: {:?}", sent.elapsed());
        for p in held {
            let r = p.wait(Duration::from_secs(10));
            assert!(matches!(r, Ok(ServerMessage::Watched(_))), "the 200 are served: {r:?}");
        }
        return;
    }
    panic!("200 watches were not open within 300 ms in 5 attempts");
}

/// Four admin scanners paging the documents in a loop share one budget of keys a second
/// (`AUDIT_KEYS_PER_S_MAX`, at most `AUDIT_SCANS_MAX` pages at once): over it they are answered
/// `Busy` with a retry hint, every answer comes within 1 s, and a writer keeps committing.
#[test]
fn admin_scanners_share_a_keys_a_second_budget() {
    const KEYS_PER_S_MAX: f64 = tally_pipeline::queries::AUDIT_KEYS_PER_S_MAX as f64;
    const SCAN_FOR: Duration = Duration::from_secs(4);
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let (li, status) = wait_leader(&nodes, Duration::from_secs(10));
    let leader = nodes[li].addr.clone();
    load_docs(&layout, DOCS);
    let writer = Writer::start(std::slice::from_ref(&leader), account_key(&layout, 0), 64, 1);
    let admin = layout.admin_key().expect("admin key");
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let scanners: Vec<_> = (0..4)
        .map(|_| {
            let (stop, admin, leader) = (stop.clone(), admin.clone(), leader.clone());
            std::thread::spawn(move || {
                let conn =
                    Connection::connect_with(&leader, &dial_for(&leader), Duration::from_secs(5)).expect("connect");
                let (mut keys, mut busy, mut slowest, mut after) = (0u64, Vec::new(), Duration::ZERO, None);
                while !stop.load(Ordering::Acquire) {
                    let op = tally_codec::admin::AdminOp::AuditPage {
                        table: tally_codec::admin::AuditTable::Documents,
                        after: after.clone(),
                        limit: tally_codec::admin::AUDIT_PAGE_MAX,
                    };
                    let msg = ClientMessage::Admin(tally_client::client::sign_admin(&admin, status.cluster_id, op));
                    let sent = Instant::now();
                    let r = conn.send(msg).and_then(|p| p.wait(Duration::from_secs(15)));
                    slowest = slowest.max(sent.elapsed());
                    match r.expect("an answer") {
                        ServerMessage::AuditPage(p) => {
                            keys += p.keys;
                            after = p.next_after;
                        }
                        ServerMessage::Busy(b) => {
                            std::thread::sleep(Duration::from_millis(u64::from(b.retry_after_ms).min(2_000)));
                            busy.push(b.limit);
                        }
                        other => panic!("a scanner got {other:?}"),
                    }
                }
                (keys, busy, slowest)
            })
        })
        .collect();
    let acked_before = writer.acked_len();
    std::thread::sleep(SCAN_FOR);
    stop.store(true, Ordering::Release);
    let seen: Vec<_> = scanners.into_iter().map(|t| t.join().expect("scanner")).collect();
    let elapsed = started.elapsed().as_secs_f64();
    let acked_during = writer.acked_len() - acked_before;
    let _ = writer.finish();
    let keys: u64 = seen.iter().map(|s| s.0).sum();
    let busy: Vec<&String> = seen.iter().flat_map(|s| &s.1).collect();
    let slowest = seen.iter().map(|s| s.2).max().unwrap_or_default();
    eprintln!(
        "scanners: {keys} keys in {elapsed:.1} s ({:.0}/s), {} busy, slowest answer {slowest:?}; the writer committed {acked_during}",
        keys as f64 / elapsed,
        busy.len()
    );
    // The budget, plus what it holds saved up and one page per scanner started before it ran out.
    let bound = KEYS_PER_S_MAX * elapsed + KEYS_PER_S_MAX / 4.0 + 4.0 * f64::from(tally_codec::admin::AUDIT_PAGE_MAX);
    assert!((keys as f64) <= bound, "the scanners read {keys} keys in {elapsed:.1} s (bound {bound:.0})");
    assert!(keys > 0, "the scanners were served");
    assert!(!busy.is_empty(), "scanners over the budget are answered Busy");
    assert!(
        busy.iter().all(|l| *l == "AUDIT_KEYS_PER_S_MAX" || *l == "AUDIT_SCANS_MAX"),
        "Busy names the scan limits: {busy:?}"
    );
    assert!(slowest <= ANSWER_WITHIN, "a scanner waited {slowest:?} for an answer");
    assert!(acked_during > 0, "the writer kept committing beside the scanners");
}
