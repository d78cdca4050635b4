//! Elections as this replica runs them around raft-rs: the seeded election timeouts, the
//! campaign for a leader reported down, how far peers may still move the term, and the
//! campaigns counted for the shell's status.
//!
//! ```text
//!  tick ─▶ seeded timeout (when raft-rs reset its election clock) ─▶ raft-rs tick ─▶ count
//!  PeerDown(leader) ─▶ forget it ─▶ campaign after a random part of a heartbeat ─▶ again every
//!                                   one to two heartbeats, until a leader is heard of or an
//!                                   election timeout has passed
//!  step(msg) ─▶ a term moved ─▶ spend the term budget ─▶ count
//! ```
//!
//! raft-rs draws its own timeouts from the thread RNG; here every random draw comes from one
//! seeded generator, in the order events arrive, so a seed replays a run exactly.

use crate::peer_gate::TermBudget;
use crate::raft_log::CoreLog;
use raft::{RawNode, StateRole};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The replica's settings elections read (fixed for its life).
#[derive(Debug, Clone, Copy)]
pub struct ElectionSettings {
    pub node_id: u64,
    pub tick_ms: u64,
    pub election_ticks: u64,
    pub heartbeat_ticks: u64,
    /// Whether a follower campaigns at once when its leader is reported down.
    pub campaign_on_leader_down: bool,
}

impl ElectionSettings {
    fn heartbeat_ms(&self) -> u64 {
        (self.tick_ms * self.heartbeat_ticks).max(1)
    }
}

/// The election state the replica keeps beside raft-rs.
pub struct Elections {
    settings: ElectionSettings,
    rng: ChaCha20Rng,
    /// When this follower campaigns because its leader is down (see `Event::PeerDown`).
    campaign_at_ms: Option<u64>,
    /// Campaigns for a dead leader stop at this time (the election timeout takes over).
    leader_down_until_ms: u64,
    /// How far peers may still move the term ([`TermBudget`]).
    term_budget: TermBudget,
    /// The role and term the campaigns were last counted from.
    seen_role: StateRole,
    seen_term: u64,
    /// Campaigns counted since the replica started (see `Status`).
    pub pre_vote_campaigns: u64,
    pub vote_campaigns: u64,
    pub leader_down_campaigns: u64,
}

impl Elections {
    pub fn new(settings: ElectionSettings, election_seed: u64, now_ms: u64) -> Self {
        Elections {
            settings,
            rng: ChaCha20Rng::seed_from_u64(election_seed),
            campaign_at_ms: None,
            leader_down_until_ms: 0,
            term_budget: TermBudget::new(now_ms),
            seen_role: StateRole::Follower,
            seen_term: 0,
            pre_vote_campaigns: 0,
            vote_campaigns: 0,
            leader_down_campaigns: 0,
        }
    }

    pub fn term_budget(&self) -> &TermBudget {
        &self.term_budget
    }

    /// When a campaign for a dead leader is due, if one is.
    pub fn campaign_at_ms(&self) -> Option<u64> {
        self.campaign_at_ms
    }

    /// A follower whose leader is down forgets it, so that it and the other followers grant
    /// pre-votes at once (raft-rs counts a follower that knows a leader as inside that leader's
    /// lease), and campaigns after a random part of one heartbeat interval, so that two
    /// followers that both saw it rarely split the vote. Until a leader is known, or one election
    /// timeout has passed, it campaigns again every one to two heartbeat intervals: the other
    /// follower may learn of the death a little later and ignore the first pre-vote, or both may
    /// have campaigned at once and split the vote.
    pub fn on_peer_down(&mut self, raw: &mut RawNode<CoreLog>, id: u64, now_ms: u64) {
        let raft = &mut raw.raft;
        if !self.settings.campaign_on_leader_down
            || raft.state != StateRole::Follower
            || raft.leader_id != id
            || id == self.settings.node_id
        {
            return;
        }
        raft.leader_id = raft::INVALID_ID;
        let at = now_ms + self.rng.next_u64() % self.settings.heartbeat_ms();
        self.campaign_at_ms = Some(at);
        self.leader_down_until_ms = now_ms + self.settings.tick_ms * self.settings.election_ticks;
    }

    /// Campaigns if the leader-down timer is due and no leader was heard of since. `ticks`: the
    /// ticks since the replica started (it campaigns only once it could have heard a leader).
    pub fn maybe_campaign_leader_down(&mut self, raw: &mut RawNode<CoreLog>, now_ms: u64, ticks: u64) {
        let Some(at) = self.campaign_at_ms else { return };
        let raft = &raw.raft;
        // A candidate that split the vote with the other follower tries again too.
        let waiting = matches!(raft.state, StateRole::Follower | StateRole::PreCandidate | StateRole::Candidate);
        if !waiting || raft.leader_id != raft::INVALID_ID || now_ms >= self.leader_down_until_ms {
            self.campaign_at_ms = None; // a leader (new or old) was heard of, or it is too late
            return;
        }
        if now_ms < at {
            return;
        }
        let hb = self.settings.heartbeat_ms();
        self.campaign_at_ms = Some(now_ms + hb + self.rng.next_u64() % hb);
        if raft.promotable() && ticks >= self.settings.election_ticks {
            self.leader_down_campaigns += 1;
            let _ = raw.campaign();
            self.count_campaigns(raw);
        }
    }

    /// One raft-rs tick, with the election timeout drawn from the seeded generator whenever
    /// raft-rs has just reset its election clock (only `tick_election` reads the value).
    pub fn tick(&mut self, raw: &mut RawNode<CoreLog>) {
        if raw.raft.election_elapsed == 0 {
            let span = self.settings.election_ticks;
            let timeout = self.settings.election_ticks + self.rng.next_u64() % span;
            raw.raft.set_randomized_election_timeout(timeout as usize);
        }
        raw.tick();
        // A pre-candidate whose election timed out campaigns again in the same role.
        let raft = &raw.raft;
        if raft.state == StateRole::PreCandidate && raft.election_elapsed == 0 {
            self.pre_vote_campaigns += 1;
            self.seen_role = StateRole::PreCandidate;
        }
        self.count_campaigns(raw);
    }

    /// After a peer's message was stepped: a term moved by `term_before` → now spends the
    /// budget, and a campaign it started is counted.
    pub fn after_step(&mut self, raw: &RawNode<CoreLog>, term_before: u64, now_ms: u64) {
        let jump = raw.raft.term.saturating_sub(term_before);
        if jump > 0 {
            self.term_budget.spend(jump, now_ms);
        }
        self.count_campaigns(raw);
    }

    /// Counts the campaigns this replica starts (checked after every tick and step).
    fn count_campaigns(&mut self, raw: &RawNode<CoreLog>) {
        let raft = &raw.raft;
        if raft.state != self.seen_role {
            if raft.state == StateRole::PreCandidate {
                self.pre_vote_campaigns += 1;
            }
            self.seen_role = raft.state;
        }
        if raft.term > self.seen_term {
            // A vote campaign bumps the term and votes for itself, even when it wins at once.
            if raft.vote == self.settings.node_id && matches!(raft.state, StateRole::Candidate | StateRole::Leader) {
                self.vote_campaigns += 1;
            }
            self.seen_term = raft.term;
        }
    }
}
