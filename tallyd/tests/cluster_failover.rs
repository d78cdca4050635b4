//! kill -9 of the Raft leader of a 3-node cluster under write load, three times: a new leader
//! commits within a bounded time (`FAILOVER_BOUND`; `docs/architecture.md` §8; the measured figures
//! are printed), the killed node rejoins, and the whole history passes the invariant checker.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Generous bound on kill → first batch committed by the new leader.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

/// What one failover looked like, measured from the kill.
struct Failover {
    /// A survivor reports itself leader in a higher term.
    elected: Duration,
    /// The batch at that leader's committed height was made in its term.
    committed: Duration,
    /// The writer (client library, with its retry backoff) got a receipt of the new term.
    client: Option<Duration>,
    leader: u64,
    term: u64,
}

/// Polls the survivors until one leads in a term above `old_term` and the batch at its committed
/// height was made in that term.
fn wait_new_leader_commit(nodes: &[Daemon], writer: &Writer, old_term: u64, killed_at: Instant) -> Option<Failover> {
    let mut elected = None;
    let mut client = None;
    let mut server: Option<(Duration, u64, u64)> = None;
    while killed_at.elapsed() < FAILOVER_BOUND * 2 {
        if client.is_none() && writer.acked.lock().values().any(|r| r.header.term > old_term) {
            client = Some(killed_at.elapsed());
        }
        if let (Some(elected), Some((committed, leader, term))) = (elected, server) {
            if client.is_some() || killed_at.elapsed() > FAILOVER_BOUND {
                return Some(Failover { elected, committed, client, leader, term });
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        for d in nodes.iter().filter(|d| d.is_running()) {
            let Some(s) = status_of(&d.addr) else { continue };
            if s.leader_id != Some(s.node_id) || s.term <= old_term {
                continue;
            }
            elected.get_or_insert(killed_at.elapsed());
            if s.committed_height == 0 {
                continue;
            }
            if let Some(h) = header_at(&d.addr, s.committed_height) {
                if h.term > old_term && server.is_none() {
                    server = Some((killed_at.elapsed(), s.node_id, h.term));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn leader_kill_under_load_fails_over_and_loses_nothing() {
    let started = Instant::now();
    let (_dir, layout) = init_cluster(3, 2);
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    // The load: the client library (which fails over by itself, with its retry backoff) ...
    let writer = Writer::start(&addrs, account_key(&layout, 0), 32, 2);
    // ... and one-request probes to every node without backoff, so the server-side figure does
    // not depend on when the client library retries.
    let prober = Prober::start(&addrs, &layout, 1);
    let (mut times, mut elections, mut clients) = (Vec::new(), Vec::new(), Vec::new());

    // TALLY_FAILOVER_KILLS=10 (or more) for the failover-time distribution; CI runs 3.
    let kills: u32 = std::env::var("TALLY_FAILOVER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for round in 1..=kills {
        std::thread::sleep(Duration::from_millis(1500));
        let (li, ls) = wait_leader(&nodes, Duration::from_secs(10));
        let acked_before = writer.acked_len();
        assert!(acked_before > 0, "round {round}: nothing acknowledged before the kill");
        nodes[li].kill9();
        let killed_at = Instant::now();
        let Some(f) = wait_new_leader_commit(&nodes, &writer, ls.term, killed_at) else {
            dump_logs(&nodes);
            panic!("round {round}: no batch committed by a new leader within {:?}", FAILOVER_BOUND * 2);
        };
        eprintln!(
            "round {round}: killed leader node {} (term {}); node {} elected after {} ms, \
             committed a term-{} batch after {} ms; the writer's first new-term receipt after {:?} ms",
            ls.node_id,
            ls.term,
            f.leader,
            f.elected.as_millis(),
            f.term,
            f.committed.as_millis(),
            f.client.map(|c| c.as_millis())
        );
        let t = f.committed;
        assert!(t <= FAILOVER_BOUND, "round {round}: failover took {t:?}, bound {FAILOVER_BOUND:?}");
        assert!(
            f.client.is_some_and(|c| c <= FAILOVER_BOUND),
            "round {round}: the client library got no receipt of the new term within {FAILOVER_BOUND:?}"
        );
        elections.push(f.elected);
        clients.push(f.client.unwrap_or(FAILOVER_BOUND * 2));
        times.push(t);
        // Writes continue against the two survivors.
        let n = writer.acked_len();
        assert!(
            wait_until(Duration::from_secs(5), || writer.acked_len() > n),
            "round {round}: no write acknowledged after the failover"
        );
        std::thread::sleep(Duration::from_millis(500));
        // The killed node comes back and catches up before the next kill.
        let cfg = &layout.config_paths[li];
        nodes[li] = Daemon::start(cfg, &layout.configs[li].listen, &layout.dir.join(format!("node-{}.log", li + 1)));
        let target = status_of(&nodes[(li + 1) % 3].addr).map_or(0, |s| s.committed_height);
        assert!(
            wait_until(Duration::from_secs(15), || status_of(&nodes[li].addr)
                .is_some_and(|s| s.applied_height >= target)),
            "round {round}: the restarted node {} did not catch up to height {target}",
            li + 1
        );
    }

    std::thread::sleep(Duration::from_millis(500));
    let mut acked = writer.finish();
    acked.extend(prober.finish());
    if std::env::var_os("TALLY_TEST_LOGS").is_some() {
        for d in &nodes {
            eprintln!("==== {}\n{}", d.log.display(), d.log_text());
        }
    }
    assert_invariants(&addrs, &layout, &acked);

    let summary = |ds: &[Duration]| {
        let mut ms: Vec<u128> = ds.iter().map(Duration::as_millis).collect();
        ms.sort_unstable();
        format!("min {} ms, median {} ms, max {} ms (all {ms:?})", ms[0], ms[ms.len() / 2], ms[ms.len() - 1])
    };
    eprintln!("FAILOVER kill -9 leader -> new leader elected: {}", summary(&elections));
    eprintln!("FAILOVER kill -9 leader -> first batch committed by the new leader: {}", summary(&times));
    eprintln!("FAILOVER kill -9 leader -> first receipt of the new term at the client library: {}", summary(&clients));
    eprintln!("{} acknowledged; test took {:?}", acked.len(), started.elapsed());
}
