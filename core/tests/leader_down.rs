//! A follower told that its leader is down (`Event::PeerDown`: the leader's link closed and its
//! port refuses connections) campaigns within a heartbeat interval, where waiting for the
//! election timeout would take 500–1,000 ms. Three cores wired by hand, messages delivered 1 ms
//! after they are sent.

mod common;

use std::collections::VecDeque;

use raft::eraftpb::Message;
use tally_core::{Effect, Event, MemLedger, Replica, ReplicaConfig, RestoredLog};

const TICK_MS: u64 = 50;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;

fn cfg(id: u64, campaign_on_leader_down: bool) -> ReplicaConfig {
    let mut c = common::replica_config(id, id * 7919);
    c.campaign_on_leader_down = campaign_on_leader_down;
    c
}

struct Net {
    nodes: Vec<Option<Replica<MemLedger>>>,
    now: u64,
    /// (deliver at, message)
    wire: VecDeque<(u64, Message)>,
}

impl Net {
    fn new(campaign_on_leader_down: bool) -> Net {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let nodes = (1..=3)
            .map(|id| {
                Some(
                    Replica::start(
                        cfg(id, campaign_on_leader_down),
                        MemLedger::new_cluster(&[], &[1, 2, 3]),
                        RestoredLog::default(),
                        0,
                        1_700_000_000_000,
                        &logger,
                    )
                    .expect("starts"),
                )
            })
            .collect();
        Net { nodes, now: 0, wire: VecDeque::new() }
    }

    fn handle(&mut self, i: usize, ev: Event) {
        let Some(r) = self.nodes[i].as_mut() else { return };
        for e in r.handle(ev) {
            if let Effect::Send(m) = e {
                self.wire.push_back((self.now + 1, m));
            }
        }
    }

    /// One millisecond: messages due are delivered, then every replica sees the time.
    fn step(&mut self) {
        self.now += 1;
        while self.wire.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.wire.pop_front().expect("front");
            let to = (m.to - 1) as usize;
            if self.nodes[to].is_some() && self.nodes[(m.from - 1) as usize].is_some() {
                self.handle(to, Event::Peer(m));
            }
        }
        for i in 0..3 {
            self.handle(i, Event::Tick { now_ms: self.now, wall_ms: 1_700_000_000_000 + self.now });
        }
    }

    fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| self.nodes[i].as_ref().is_some_and(|r| r.is_leader()))
    }

    /// Runs until a replica leads (at most `ms`); the time it took.
    fn until_leader(&mut self, ms: u64) -> Option<u64> {
        let start = self.now;
        while self.now - start < ms {
            self.step();
            if self.leader().is_some() {
                return Some(self.now - start);
            }
        }
        None
    }

    /// Elects a first leader and lets it settle for a few heartbeats.
    fn settled(campaign_on_leader_down: bool) -> (Net, usize) {
        let mut n = Net::new(campaign_on_leader_down);
        n.until_leader(10_000).expect("a first leader");
        for _ in 0..500 {
            n.step();
        }
        let l = n.leader().expect("still leads");
        (n, l)
    }
}

#[test]
fn followers_told_the_leader_is_down_elect_a_new_one_within_a_heartbeat_interval() {
    let (mut n, old) = Net::settled(true);
    n.nodes[old] = None; // kill -9
    for f in (0..3).filter(|&i| i != old) {
        n.handle(f, Event::PeerDown(old as u64 + 1));
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
        let (mut n, old) = Net::settled(enabled);
        n.nodes[old] = None;
        if report {
            for f in (0..3).filter(|&i| i != old) {
                n.handle(f, Event::PeerDown(old as u64 + 1));
            }
        }
        let took = n.until_leader(5_000).expect("a new leader");
        let floor = TICK_MS * (ELECTION_TICKS as u64 - 1);
        assert!(took >= floor, "report {report}, enabled {enabled}: a new leader after {took} ms");
    }
}

#[test]
fn a_report_about_a_replica_that_does_not_lead_changes_nothing() {
    let (mut n, leader) = Net::settled(true);
    let (a, b) = {
        let f: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        (f[0], f[1])
    };
    let term = n.nodes[leader].as_ref().expect("alive").term();
    n.handle(a, Event::PeerDown(b as u64 + 1));
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
    let (mut n, leader) = Net::settled(true);
    let f = (0..3).find(|&i| i != leader).expect("a follower");
    let term = n.nodes[leader].as_ref().expect("alive").term();
    n.handle(f, Event::PeerDown(leader as u64 + 1));
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
    let (mut n, old) = Net::settled(true);
    n.nodes[old] = None;
    let f: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    n.handle(f[0], Event::PeerDown(old as u64 + 1));
    for _ in 0..150 {
        n.step();
    }
    assert_eq!(n.leader(), None, "the second follower still counts itself in the lease");
    n.handle(f[1], Event::PeerDown(old as u64 + 1));
    let took = n.until_leader(2_000).expect("a new leader") + 150;
    let bound = 150 + 2 * TICK_MS * HEARTBEAT_TICKS as u64 + 20;
    assert!(took <= bound, "a new leader after {took} ms (bound {bound} ms)");
}
