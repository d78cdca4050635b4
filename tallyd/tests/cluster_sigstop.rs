//! SIGSTOP of the leader for longer than the election timeout, under writes: the others elect a
//! new leader; after SIGCONT the old leader rejoins as a follower, never signs a second header
//! for a height, and commits nothing in its old term after the pause.

mod common;

use common::*;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn paused_leader_is_deposed_and_rejoins_as_follower() {
    let started = Instant::now();
    let (_dir, layout) = init_cluster(3, 1);
    let nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let writer = Writer::start(&addrs, account_key(&layout, 0), 32, 2);
    std::thread::sleep(Duration::from_millis(1500));

    let (li, before) = wait_leader(&nodes, Duration::from_secs(10));
    let old_term = before.term;
    assert!(writer.acked_len() > 0, "nothing acknowledged before the pause");
    let stopped_wall = wall_ms();
    nodes[li].signal("STOP");
    let stopped_at = Instant::now();
    // Resume on any exit path, so the guard's SIGKILL is not the only way out of a stopped state.
    struct Cont<'a>(&'a Daemon);
    impl Drop for Cont<'_> {
        fn drop(&mut self) {
            self.0.signal("CONT");
        }
    }
    let cont = Cont(&nodes[li]);

    // The other two elect a leader of a higher term, and it commits a batch of its own term.
    let others: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let mut first_new: Option<(u64, u64, u64)> = None; // (node id, term, height)
    assert!(
        wait_until(Duration::from_secs(8), || {
            for &i in &others {
                let Some(s) = status_of(&nodes[i].addr) else { continue };
                if s.leader_id == Some(s.node_id) && s.term > old_term && s.committed_height > 0 {
                    if let Some(h) = header_at(&nodes[i].addr, s.committed_height) {
                        if h.term > old_term {
                            first_new = Some((s.node_id, s.term, s.committed_height));
                            return true;
                        }
                    }
                }
            }
            false
        }),
        "no new leader committed while node {} was stopped",
        li + 1
    );
    let (new_leader, new_term, new_height) = first_new.expect("set above");
    eprintln!(
        "node {} stopped in term {old_term}; node {new_leader} leads term {new_term} and committed height {new_height} \
         {} ms after the pause",
        li + 1,
        stopped_at.elapsed().as_millis()
    );
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(5), || writer.acked_len() > n), "no writes acknowledged during the pause");
    if let Some(rest) = Duration::from_secs(3).checked_sub(stopped_at.elapsed()) {
        std::thread::sleep(rest);
    }
    drop(cont);
    let resumed_wall = wall_ms();

    // The old leader learns of the new term and follows.
    let mut seen = None;
    let rejoined = wait_until(Duration::from_secs(10), || {
        seen = status_of(&nodes[li].addr);
        seen.as_ref().is_some_and(|s| s.term >= new_term && s.leader_id.is_some() && s.leader_id != Some(s.node_id))
    });
    assert!(rejoined, "old leader did not rejoin as a follower: {seen:?}");
    let s = seen.expect("status");
    let current = find_leader(&nodes).map(|(_, l)| l.node_id);
    assert_eq!(s.leader_id, current, "the old leader follows the current leader");
    eprintln!("old leader rejoined: term {}, follows node {:?}", s.term, s.leader_id);

    std::thread::sleep(Duration::from_millis(1000));
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);

    // Nothing was committed in the old term after the pause: every old-term header lies below the
    // new leader's first batch, and was made before the SIGSTOP.
    let top = status_of(&addrs[0]).expect("status").applied_height;
    let mut old_term_max = 0;
    for h in 1..=top {
        let header = header_at(&addrs[0], h).unwrap_or_else(|| panic!("height {h} missing"));
        if header.term == old_term {
            old_term_max = h;
            assert!(
                h < new_height,
                "height {h} has a header of the old term {old_term} above the new leader's {new_height}"
            );
            assert!(
                header.time_ms <= stopped_wall + 5,
                "height {h} of the old term was made at {} after the pause began at {stopped_wall} (resumed {resumed_wall})",
                header.time_ms
            );
        }
        if h >= new_height {
            assert!(header.term >= new_term, "height {h} has term {} after the new term began", header.term);
        }
    }
    assert!(old_term_max > 0, "the old leader committed nothing before the pause");
    eprintln!(
        "{} acknowledged; old term {old_term} ends at height {old_term_max}; top {top}; took {:?}",
        acked.len(),
        started.elapsed()
    );
}
