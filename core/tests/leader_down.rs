//! A follower told that its leader is down (`Event::PeerDown`: the leader's link closed and its
//! port refuses connections) campaigns within a heartbeat interval, where waiting for the
//! election timeout would take 500–1,000 ms. Three cores wired by hand, messages delivered 1 ms
//! after they are sent.

mod common;

use common::Net;
use tally_core::Event;

use common::{ELECTION_TICKS, HEARTBEAT_TICKS, TICK_MS};

#[test]
fn followers_told_the_leader_is_down_elect_a_new_one_within_a_heartbeat_interval() {
    let (mut n, old) = Net::settled(true, &[]);
    n.nodes[old] = None; // kill -9
    for f in (0..3).filter(|&i| i != old) {
        let _ = n.handle(f, Event::PeerDown(old as u64 + 1));
    }
    let took = n.until_leader(2_000).expect("a new leader");
    let bound = TICK_MS * HEARTBEAT_TICKS as u64 + 20;
    assert!(took <= bound, "a new leader after {took} ms, more than a heartbeat interval ({bound} ms)");
    let new = n.leader().expect("leads");
    let s = n.nodes[new].as_ref().expect("alive").status();
    assert!(
        s.leader_down_campaigns + {
            let other = (0..3).find(|&i| i != old && i != new).expect("third");
            n.nodes[other].as_ref().expect("alive").status().leader_down_campaigns
        } >= 1
    );
}

#[test]
fn without_the_report_or_with_it_turned_off_the_election_timeout_decides() {
    for (report, enabled) in [(false, true), (true, false)] {
        let (mut n, old) = Net::settled(enabled, &[]);
        n.nodes[old] = None;
        if report {
            for f in (0..3).filter(|&i| i != old) {
                let _ = n.handle(f, Event::PeerDown(old as u64 + 1));
            }
        }
        let took = n.until_leader(5_000).expect("a new leader");
        let floor = TICK_MS * (ELECTION_TICKS as u64 - 1);
        assert!(took >= floor, "report {report}, enabled {enabled}: a new leader after {took} ms");
    }
}

#[test]
fn a_report_about_a_replica_that_does_not_lead_changes_nothing() {
    let (mut n, leader) = Net::settled(true, &[]);
    let (a, b) = {
        let f: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        (f[0], f[1])
    };
    let term = n.nodes[leader].as_ref().expect("alive").term();
    let _ = n.handle(a, Event::PeerDown(b as u64 + 1));
    for _ in 0..2_000 {
        n.step();
    }
    assert_eq!(n.leader(), Some(leader));
    assert_eq!(n.nodes[leader].as_ref().expect("alive").term(), term, "no election");
    assert_eq!(n.nodes[a].as_ref().expect("alive").status().leader_down_campaigns, 0);
}

/// A false report (the leader is alive and reachable) costs no leadership: the follower's
/// pre-vote is refused by the other follower, which still hears the leader, and the term stays.
#[test]
fn a_false_report_from_one_follower_does_not_depose_a_live_leader() {
    let (mut n, leader) = Net::settled(true, &[]);
    let f = (0..3).find(|&i| i != leader).expect("a follower");
    let term = n.nodes[leader].as_ref().expect("alive").term();
    let _ = n.handle(f, Event::PeerDown(leader as u64 + 1));
    for _ in 0..2_000 {
        n.step();
    }
    assert_eq!(n.leader(), Some(leader));
    assert_eq!(n.nodes[leader].as_ref().expect("alive").term(), term, "no new term");
}

/// The second follower learns of the death 150 ms after the first: the first's pre-vote is
/// ignored (the second still counts itself inside the leader's lease), yet a leader follows
/// within a few heartbeat intervals of the second report, not after the election timeout.
#[test]
fn a_follower_that_learns_late_still_gets_a_leader_within_a_few_heartbeats() {
    let (mut n, old) = Net::settled(true, &[]);
    n.nodes[old] = None;
    let f: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let _ = n.handle(f[0], Event::PeerDown(old as u64 + 1));
    for _ in 0..150 {
        n.step();
    }
    assert_eq!(n.leader(), None, "the second follower still counts itself in the lease");
    let _ = n.handle(f[1], Event::PeerDown(old as u64 + 1));
    let took = n.until_leader(2_000).expect("a new leader") + 150;
    let bound = 150 + 2 * TICK_MS * HEARTBEAT_TICKS as u64 + 20;
    assert!(took <= bound, "a new leader after {took} ms (bound {bound} ms)");
}
