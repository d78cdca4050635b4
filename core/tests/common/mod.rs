//! What the core's integration tests share.

#![allow(dead_code)] // each test binary uses part of it

use raft::eraftpb::Message;
use std::collections::VecDeque;
use tally_codec::{ClusterId, PublicKey};
use tally_core::{Effect, Event, MemLedger, Plant, Replica, ReplicaConfig, RestoredLog};

pub const TICK_MS: u64 = 50;
pub const ELECTION_TICKS: usize = 10;
pub const HEARTBEAT_TICKS: usize = 2;
pub const WALL_MS: u64 = 1_700_000_000_000;

/// A replica of the voters 1, 2 and 3 with 50 ms ticks, elections after 10–20 ticks and
/// heartbeats every 2.
pub fn replica_config(node_id: u64, election_seed: u64) -> ReplicaConfig {
    ReplicaConfig {
        node_id,
        cluster_id: ClusterId([5; 16]),
        tick_ms: TICK_MS,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: HEARTBEAT_TICKS,
        batch_interval_ms: 100,
        batch_requests_max: 100,
        batch_bytes_max: 1 << 20,
        log_retain_entries: 16,
        log_retain_bytes: 64 << 20,
        operator_key: ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        election_seed,
        plant: Plant::None,
        snapshot_reports_by_shell: false,
        campaign_on_leader_down: true,
    }
}

pub fn cfg(id: u64, campaign_on_leader_down: bool) -> ReplicaConfig {
    let mut c = replica_config(id, id * 7919);
    c.campaign_on_leader_down = campaign_on_leader_down;
    c
}

/// Three cores wired by hand, messages delivered 1 ms after they are sent (none while
/// `cut` holds).
pub struct Net {
    pub nodes: Vec<Option<Replica<MemLedger>>>,
    pub now: u64,
    /// (deliver at, message)
    wire: VecDeque<(u64, Message)>,
    /// Every message is dropped (the leader cut off from its followers).
    pub cut: bool,
}

impl Net {
    /// Voters 1, 2 and 3, `funded` holding their balances.
    pub fn new(campaign_on_leader_down: bool, funded: &[(PublicKey, u64)]) -> Net {
        Net::with_config(|id| cfg(id, campaign_on_leader_down), funded)
    }

    /// Voters 1, 2 and 3 configured by `config(id)`, `funded` holding their balances.
    pub fn with_config(config: impl Fn(u64) -> ReplicaConfig, funded: &[(PublicKey, u64)]) -> Net {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let nodes = (1..=3)
            .map(|id| {
                Some(
                    Replica::start(
                        config(id),
                        MemLedger::new_cluster(funded, &[1, 2, 3]),
                        RestoredLog::default(),
                        0,
                        WALL_MS,
                        &logger,
                    )
                    .expect("starts"),
                )
            })
            .collect();
        Net { nodes, now: 0, wire: VecDeque::new(), cut: false }
    }

    /// `ev` to replica `i`; its messages go on the wire, its other effects are returned.
    pub fn handle(&mut self, i: usize, ev: Event) -> Vec<Effect> {
        let Some(r) = self.nodes[i].as_mut() else { return Vec::new() };
        let mut rest = Vec::new();
        for e in r.handle(ev) {
            match e {
                Effect::Send(m) if !self.cut => self.wire.push_back((self.now + 1, m)),
                Effect::Send(_) => {}
                e => rest.push(e),
            }
        }
        rest
    }

    /// One millisecond: messages due are delivered, then every replica sees the time.
    pub fn step(&mut self) {
        self.now += 1;
        while self.wire.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.wire.pop_front().expect("front");
            let to = (m.to - 1) as usize;
            if self.nodes[to].is_some() && self.nodes[(m.from - 1) as usize].is_some() {
                let _ = self.handle(to, Event::Peer(m));
            }
        }
        for i in 0..3 {
            let _ = self.handle(i, Event::Tick { now_ms: self.now, wall_ms: WALL_MS + self.now });
        }
    }

    pub fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| self.nodes[i].as_ref().is_some_and(|r| r.is_leader()))
    }

    /// Runs until a replica leads (at most `ms`); the time it took.
    pub fn until_leader(&mut self, ms: u64) -> Option<u64> {
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
    pub fn settled(campaign_on_leader_down: bool, funded: &[(PublicKey, u64)]) -> (Net, usize) {
        Net::settle(Net::new(campaign_on_leader_down, funded))
    }

    /// Elects a first leader of `n` and lets it settle for a few heartbeats.
    pub fn settle(mut n: Net) -> (Net, usize) {
        n.until_leader(10_000).expect("a first leader");
        for _ in 0..500 {
            n.step();
        }
        let l = n.leader().expect("still leads");
        (n, l)
    }
}
