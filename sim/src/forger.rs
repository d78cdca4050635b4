//! A forging peer: a member's identity in the wrong hands (a leaked node key), sending
//! well-formed but wrong Raft messages to the honest replicas.
//!
//! ```text
//!  every 5–80 ms of the safety phase: pick an honest replica, read its term and indices
//!    ─▶ a message of any kind, "from" the stolen identity, with values on the gate's edges:
//!       terms 0, ±1..3, +1000, TERM_MAX, u64::MAX; indices around the commit and last index,
//!       10^9, u64::MAX; entries gapped, reversed, of later terms, no-ops, junk, batches and
//!       conf changes seen on the wire; snapshots of odd configurations and replayed states
//! ```
//! The values are drawn near what the target holds, so they hit each check of the peer gate
//! (`failover/src/peer_gate.rs`) on both sides of its edge; some of them are lies Raft cannot tell
//! from the truth (an append at a higher term matching the log, a granted vote, an
//! acknowledgement), which the simulator records as taint (see `docs/testing.md`).

use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha20Rng;
use tally_failover::peer_gate::TERM_MAX;

/// What the forger reads of its target before it lies to it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub id: u64,
    pub term: u64,
    pub committed: u64,
    pub last_index: u64,
    /// Replicas in the cluster (ids 1..=nodes).
    pub nodes: u64,
}

/// Entries and snapshot states seen on the simulated network, replayed in forged messages.
#[derive(Default)]
pub struct Samples {
    entries: Vec<Entry>,
    states: Vec<Vec<u8>>,
}

/// Samples kept of each kind.
const SAMPLES_MAX: usize = 8;

impl Samples {
    /// Keeps some of what an honest replica sent.
    pub fn observe(&mut self, rng: &mut ChaCha20Rng, m: &Message) {
        for e in m.get_entries() {
            if !e.data.is_empty() && rng.gen_ratio(1, 4) {
                keep(&mut self.entries, e.clone(), rng);
            }
        }
        if m.get_msg_type() == MessageType::MsgSnapshot && !m.get_snapshot().data.is_empty() {
            keep(&mut self.states, m.get_snapshot().data.to_vec(), rng);
        }
    }
}

fn keep<T>(v: &mut Vec<T>, x: T, rng: &mut ChaCha20Rng) {
    if v.len() < SAMPLES_MAX {
        v.push(x);
    } else {
        let i = rng.gen_range(0..v.len());
        v[i] = x;
    }
}

/// Every Raft message kind.
const KINDS: [MessageType; 19] = [
    MessageType::MsgHup,
    MessageType::MsgBeat,
    MessageType::MsgPropose,
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgUnreachable,
    MessageType::MsgSnapStatus,
    MessageType::MsgCheckQuorum,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
];

/// A term around the target's.
fn term(rng: &mut ChaCha20Rng, t: &Target) -> u64 {
    match rng.gen_range(0..20) {
        0 => 0,
        1 => TERM_MAX,
        2 => TERM_MAX + 1,
        3 => u64::MAX,
        4 => rng.next_u64(),
        5 => t.term + 1000,
        6..=8 => t.term.saturating_sub(rng.gen_range(0..3)).max(1),
        _ => t.term + rng.gen_range(0..4),
    }
}

/// An index around the target's commit and last index.
fn index(rng: &mut ChaCha20Rng, t: &Target) -> u64 {
    let near =
        |rng: &mut ChaCha20Rng, x: u64| x.saturating_add(rng.gen_range(0..4)).saturating_sub(rng.gen_range(0..4));
    match rng.gen_range(0..16) {
        0 => 0,
        1 => 1_000_000_000,
        2 => u64::MAX,
        3 => rng.next_u64(),
        4..=8 => near(rng, t.committed),
        _ => near(rng, t.last_index),
    }
}

fn node(rng: &mut ChaCha20Rng, t: &Target) -> u64 {
    if rng.gen_ratio(1, 10) {
        *[0, t.nodes + 1, t.nodes + 7, u64::MAX].choose(rng).unwrap_or(&0)
    } else {
        rng.gen_range(1..=t.nodes)
    }
}

/// Forges one message "from" node `me` to `t`.
pub fn forge(rng: &mut ChaCha20Rng, me: u64, t: &Target, samples: &Samples) -> Message {
    let kind = match rng.gen_range(0..20) {
        0..=3 => MessageType::MsgHeartbeat,
        4..=8 => MessageType::MsgAppend,
        9..=10 => MessageType::MsgSnapshot,
        11..=12 => MessageType::MsgAppendResponse,
        13 => MessageType::MsgHeartbeatResponse,
        14..=15 => *[MessageType::MsgRequestVote, MessageType::MsgRequestPreVote].choose(rng).unwrap_or(&KINDS[5]),
        16 => *[MessageType::MsgRequestVoteResponse, MessageType::MsgRequestPreVoteResponse]
            .choose(rng)
            .unwrap_or(&KINDS[6]),
        _ => *KINDS.choose(rng).unwrap_or(&KINDS[0]),
    };
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = if rng.gen_ratio(1, 25) { node(rng, t) } else { me };
    m.to = if rng.gen_ratio(1, 25) { node(rng, t) } else { t.id };
    m.term = term(rng, t);
    m.index = index(rng, t);
    m.log_term = if rng.gen_ratio(1, 3) { m.term } else { term(rng, t) };
    m.commit = index(rng, t);
    m.commit_term = if rng.gen_bool(0.5) { m.log_term } else { term(rng, t) };
    m.reject = rng.gen_ratio(1, 3);
    m.reject_hint = index(rng, t);
    if rng.gen_ratio(1, 20) {
        m.request_snapshot = index(rng, t);
    }
    if rng.gen_ratio(1, 4) {
        let sent = if rng.gen_bool(0.5) { rng.gen_range(0..100_000) } else { rng.next_u64() };
        m.context = tally_failover::lease::probe_context(term(rng, t), sent).into();
    }
    match kind {
        MessageType::MsgAppend
        | MessageType::MsgPropose
        | MessageType::MsgReadIndex
        | MessageType::MsgReadIndexResp => {
            m.set_entries(entries(rng, &m, t, samples).into());
        }
        MessageType::MsgSnapshot => snapshot(rng, &mut m, t, samples),
        _ => {}
    }
    m
}

fn entries(rng: &mut ChaCha20Rng, m: &Message, t: &Target, samples: &Samples) -> Vec<Entry> {
    let n = rng.gen_range(0..5);
    let mut out = Vec::with_capacity(n);
    let mut next = m.index.wrapping_add(1);
    for _ in 0..n {
        let mut e = match rng.gen_range(0..10) {
            0..=4 => Entry::default(),
            5 => {
                let mut e = Entry::default();
                let mut junk = vec![0u8; rng.gen_range(1..64)];
                rng.fill_bytes(&mut junk);
                e.data = junk.into();
                e
            }
            6..=7 => samples.entries.choose(rng).cloned().unwrap_or_default(),
            _ => conf_change(rng, t),
        };
        e.index = if rng.gen_ratio(1, 8) { index(rng, t) } else { next };
        e.term = if rng.gen_ratio(1, 6) { term(rng, t) } else { m.term };
        next = e.index.wrapping_add(1);
        out.push(e);
    }
    out
}

fn conf_change(rng: &mut ChaCha20Rng, t: &Target) -> Entry {
    let mut e = Entry::default();
    let ty = *[ConfChangeType::AddNode, ConfChangeType::RemoveNode, ConfChangeType::AddLearnerNode]
        .choose(rng)
        .unwrap_or(&ConfChangeType::AddNode);
    if rng.gen_ratio(1, 3) {
        e.set_entry_type(EntryType::EntryConfChange);
        let mut cc = ConfChange { node_id: node(rng, t), ..ConfChange::default() };
        cc.set_change_type(ty);
        e.data = protobuf::Message::write_to_bytes(&cc).unwrap_or_default().into();
    } else {
        e.set_entry_type(EntryType::EntryConfChangeV2);
        let mut cc = ConfChangeV2::default();
        let changes: Vec<ConfChangeSingle> = (0..rng.gen_range(0..3))
            .map(|_| {
                let mut c = ConfChangeSingle { node_id: node(rng, t), ..ConfChangeSingle::default() };
                c.set_change_type(ty);
                c
            })
            .collect();
        cc.set_changes(changes.into());
        e.data = protobuf::Message::write_to_bytes(&cc).unwrap_or_default().into();
    }
    if rng.gen_ratio(1, 5) {
        let mut junk = vec![0u8; rng.gen_range(1..16)];
        rng.fill_bytes(&mut junk);
        e.data = junk.into();
    }
    e
}

fn snapshot(rng: &mut ChaCha20Rng, m: &mut Message, t: &Target, samples: &Samples) {
    let voters: Vec<u64> = (1..=t.nodes).collect();
    let cs = match rng.gen_range(0..8) {
        0 => ConfState::default(),
        1 => ConfState::from((vec![t.id, t.id], vec![])),
        2 => ConfState::from((voters.clone(), vec![t.id])),
        3 => {
            let mut cs = ConfState::from((voters.clone(), vec![]));
            cs.set_learners_next(vec![t.nodes + 1]);
            cs
        }
        4 => ConfState::from((vec![node(rng, t)], vec![])),
        _ => ConfState::from((voters, vec![])),
    };
    let data = match rng.gen_range(0..4) {
        0 => Vec::new(),
        1 => {
            let mut junk = vec![0u8; rng.gen_range(1..256)];
            rng.fill_bytes(&mut junk);
            junk
        }
        _ => samples.states.choose(rng).cloned().unwrap_or_default(),
    };
    // A replayed state at its own index and term half of the time: a real committed state.
    let head =
        tally_codec::decode::<tally_core::MemLedger>(&data, usize::MAX).ok().map(|l| tally_core::Ledger::head(&l));
    let (at, at_term) = match head {
        Some(h) if rng.gen_bool(0.5) => (h.index, h.term),
        _ => (index(rng, t), term(rng, t)),
    };
    let snap = m.mut_snapshot();
    let meta = snap.mut_metadata();
    meta.index = at;
    meta.term = at_term;
    meta.set_conf_state(cs);
    snap.data = data.into();
}
