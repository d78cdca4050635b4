//! The leader lease: how long the leader may serve reads locally.
//!
//! With `check_quorum`, a follower that heard from the leader rejects (pre-)votes for
//! `election_ticks` ticks, i.e. at least `(election_ticks - 1) * tick_ms` after it received the
//! message. So once a quorum acknowledged a message the leader *sent* at time `s`, no other
//! leader can be elected before `s + (election_ticks - 1) * tick_ms`. The lease ends earlier by a
//! drift margin (a quarter of the election timeout) for clocks that run at different rates.
//!
//! Acks are matched to send times exactly: the leader issues a ReadIndex request whose context
//! carries `(term, send time)` each heartbeat interval; raft-rs puts that context on heartbeats
//! and followers echo it in their responses. A delayed response therefore never extends the
//! lease past what its send time allows.
//!
//! A restarted voter forgets it acknowledged a leader, so the raft loop ignores vote requests
//! for one election timeout after start (see `node.rs`).

use std::collections::HashMap;

/// Tag of a lease probe context.
const PROBE_TAG: u8 = b'L';
const PROBE_BYTES: usize = 17;

/// How long a quorum ack keeps the lease: strictly shorter than the election timeout.
pub fn lease_duration_ms(tick_ms: u64, election_ticks: u64) -> u64 {
    assert!(election_ticks >= 2, "election_ticks must be at least 2");
    let election_ms = tick_ms * election_ticks;
    let protected_ms = tick_ms * (election_ticks - 1);
    let lease_ms = protected_ms.saturating_sub(election_ms / 4);
    assert!(lease_ms < election_ms, "the lease must be shorter than the election timeout");
    lease_ms
}

/// The context of a lease probe sent at `sent_ms` in `term`.
pub fn probe_context(term: u64, sent_ms: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(PROBE_BYTES);
    ctx.push(PROBE_TAG);
    ctx.extend_from_slice(&term.to_le_bytes());
    ctx.extend_from_slice(&sent_ms.to_le_bytes());
    ctx
}

/// `(term, sent_ms)` of a probe context; `None` for any other context.
pub fn parse_probe_context(ctx: &[u8]) -> Option<(u64, u64)> {
    if ctx.len() != PROBE_BYTES || ctx[0] != PROBE_TAG {
        return None;
    }
    let term = u64::from_le_bytes(ctx[1..9].try_into().ok()?);
    let sent = u64::from_le_bytes(ctx[9..17].try_into().ok()?);
    Some((term, sent))
}

/// Per-term record of the latest acknowledged send time of each follower.
#[derive(Debug, Default)]
pub struct LeaseTracker {
    term: u64,
    acked_sent_ms: HashMap<u64, u64>,
}

impl LeaseTracker {
    /// Forgets acks from other terms.
    pub fn reset(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.acked_sent_ms.clear();
        }
    }

    /// Records that `from` acknowledged the probe sent at `sent_ms` in `term`.
    pub fn on_ack(&mut self, from: u64, term: u64, sent_ms: u64) {
        if term != self.term {
            return;
        }
        let e = self.acked_sent_ms.entry(from).or_insert(0);
        *e = (*e).max(sent_ms);
    }

    /// When the lease ends, or `None` if some quorum has not acknowledged anything yet.
    /// `voter_sets` holds one set, or two in a joint configuration (both must agree).
    pub fn lease_until_ms(&self, voter_sets: &[&[u64]], self_id: u64, now_ms: u64, lease_ms: u64) -> Option<u64> {
        quorum_ack_ms(voter_sets, self_id, now_ms, &self.acked_sent_ms).map(|t| t + lease_ms)
    }

    /// The latest send time a quorum acknowledged in this term (see [`quorum_ack_ms`]).
    pub fn quorum_ack_ms(&self, voter_sets: &[&[u64]], self_id: u64, now_ms: u64) -> Option<u64> {
        quorum_ack_ms(voter_sets, self_id, now_ms, &self.acked_sent_ms)
    }
}

impl LeaseTracker {
    /// Records the ack a heartbeat response to this leader's probe carries (any other message,
    /// or one from another term, is no ack).
    pub fn observe<S: raft::Storage>(&mut self, m: &raft::eraftpb::Message, raft: &raft::Raft<S>) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeatResponse
            && raft.state == raft::StateRole::Leader
            && m.term == raft.term
        {
            if let Some((term, sent_ms)) = parse_probe_context(&m.context) {
                self.on_ack(m.from, term, sent_ms);
            }
        }
    }
}

/// Whether a (pre-)vote request must be ignored because this replica started less than one
/// election timeout ago (`ticks` ticks): it may have acknowledged a leader's lease just before it
/// restarted, and stays silent until that lease can have run out.
pub fn ignore_vote_while_starting(m: &raft::eraftpb::Message, ticks: u64, election_ticks: u64) -> bool {
    let t = m.get_msg_type();
    (t == raft::eraftpb::MessageType::MsgRequestVote || t == raft::eraftpb::MessageType::MsgRequestPreVote)
        && ticks < election_ticks
}

/// The latest send time acknowledged by a quorum of every non-empty voter set: the quorum-th
/// most recent ack. The leader counts itself as acking at `now_ms`.
pub fn quorum_ack_ms(voter_sets: &[&[u64]], self_id: u64, now_ms: u64, acks: &HashMap<u64, u64>) -> Option<u64> {
    let mut result: Option<u64> = None;
    for voters in voter_sets.iter().filter(|v| !v.is_empty()) {
        let mut times: Vec<u64> =
            voters.iter().filter_map(|id| if *id == self_id { Some(now_ms) } else { acks.get(id).copied() }).collect();
        let quorum = voters.len() / 2 + 1;
        if times.len() < quorum {
            return None;
        }
        times.sort_unstable_by(|a, b| b.cmp(a));
        let t = times[quorum - 1];
        result = Some(result.map_or(t, |r| r.min(t)));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_is_shorter_than_the_election_timeout() {
        // Defaults: 50 ms ticks, 10-tick elections: protected 450 ms, margin 125 ms.
        assert_eq!(lease_duration_ms(50, 10), 325);
        for (tick, n) in [(1, 2), (10, 3), (50, 10), (100, 20)] {
            assert!(lease_duration_ms(tick, n) < tick * n);
        }
    }

    #[test]
    fn quorum_th_most_recent_ack() {
        let acks: HashMap<u64, u64> = [(2, 900), (3, 700), (4, 800), (5, 100)].into_iter().collect();
        // Five voters, quorum 3: self at now=1000, then 900, 800 → third most recent is 800.
        assert_eq!(quorum_ack_ms(&[&[1, 2, 3, 4, 5]], 1, 1000, &acks), Some(800));
        // Three voters, quorum 2: self 1000, then 900.
        assert_eq!(quorum_ack_ms(&[&[1, 2, 3]], 1, 1000, &acks), Some(900));
        // No ack from a quorum yet.
        assert_eq!(quorum_ack_ms(&[&[1, 6, 7]], 1, 1000, &acks), None);
        // A single voter leads alone.
        assert_eq!(quorum_ack_ms(&[&[1]], 1, 1000, &acks), Some(1000));
        // Joint: the older of the two quorums' times.
        // {1,2,3} → 900; {1,3,5} → 1000, 700, 100 → 700.
        assert_eq!(quorum_ack_ms(&[&[1, 2, 3], &[1, 3, 5]], 1, 1000, &acks), Some(700));
    }

    #[test]
    fn tracker_ignores_other_terms_and_keeps_the_latest() {
        let mut t = LeaseTracker::default();
        t.reset(7);
        t.on_ack(2, 7, 500);
        t.on_ack(2, 7, 400); // a reordered older ack does not move the lease back
        t.on_ack(3, 6, 900); // a stale term's ack is ignored
        assert_eq!(t.lease_until_ms(&[&[1, 2, 3]], 1, 1000, 325), Some(825));
        assert_eq!(t.quorum_ack_ms(&[&[1, 2, 3]], 1, 1000), Some(500));
        t.reset(8);
        assert_eq!(t.lease_until_ms(&[&[1, 2, 3]], 1, 1000, 325), None);
    }

    #[test]
    fn probe_context_round_trip() {
        let c = probe_context(9, 12345);
        assert_eq!(parse_probe_context(&c), Some((9, 12345)));
        assert_eq!(parse_probe_context(&c[..16]), None);
        assert_eq!(parse_probe_context(b""), None);
    }
}
