//! The peer-message gate: every Raft message from a peer is judged against this replica's own
//! state before raft-rs sees it.
//!
//! raft-rs 0.7 trusts its peers: a message it cannot reconcile with its log ends the process
//! (`fatal!`, `panic!`, an `unwrap`, an index out of bounds, an arithmetic overflow; overflow
//! checks are on in release builds). Mutual TLS keeps strangers out, but a replica whose key
//! leaked, or one with a bug, is a member. A crash-fault-tolerant replica must still survive one
//! malformed message, so whatever raft-rs would panic on is refused here, with a typed reason,
//! and so is whatever no honest replica can ever send (checked where it is cheap and exact).
//!
//! ```text
//!  peer message ─▶ kind · address · term ─▶ per kind: leader claim, indices, entries, commit,
//!                                            snapshot metadata and configuration, response bounds
//!        │ Ok: raft-rs steps it                      Err(Refusal): dropped, counted, link cut
//! ```
//!
//! Every check names the raft-rs code it keeps from running (see `docs/security.md`). A liar can
//! still say what an honest leader or voter could have said (a vote, an acknowledgement, an
//! append at a higher term that matches this log): Raft tolerates crashes, not lies, and
//! `docs/testing.md` lists which invariants such lies can break.
//!
//! Pure: the functions read the `RawNode` and the message, nothing else.

use crate::lease::parse_probe_context;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
};
use raft::{Changer, ProgressTracker, RawNode, StateRole, Storage, INVALID_ID};
use tally_codec::batch::next_state_digest;
use tally_codec::batch::ChainHead;
use tally_codec::BatchHeader;

/// Terms above this are refused. raft-rs adds one to its term when it campaigns, and overflow
/// checks are on: a peer that made a replica adopt a term near `u64::MAX` would end it at its
/// next election.
pub const TERM_MAX: u64 = 1 << 62;
/// How far a replica's term may be moved by peers at once, and per millisecond after that
/// (a token bucket, [`TermBudget`]). A bound on each jump would let a liar part the replicas
/// for good (push one further than the bound from the others, and no message crosses the gap
/// again); a bound on the rate cannot: once the liar stops, replicas catch up with each other
/// at the same rate. Pushing a replica to [`TERM_MAX`] takes a liar 2^52 ms (140,000 years);
/// an honest replica lagging a million terms catches up within a second.
pub const TERM_JUMP_BURST: u64 = 1 << 20;
pub const TERM_JUMP_PER_MS: u64 = 1 << 10;

/// The term increase peers may still cause now ([`TERM_JUMP_BURST`], [`TERM_JUMP_PER_MS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermBudget {
    available: u64,
    at_ms: u64,
}

impl TermBudget {
    pub fn new(now_ms: u64) -> Self {
        TermBudget { available: TERM_JUMP_BURST, at_ms: now_ms }
    }

    /// The increase allowed at `now_ms`.
    pub fn available(&self, now_ms: u64) -> u64 {
        let refill = now_ms.saturating_sub(self.at_ms).saturating_mul(TERM_JUMP_PER_MS);
        self.available.saturating_add(refill).min(TERM_JUMP_BURST)
    }

    /// Records an increase of `jump` caused by a peer at `now_ms`.
    pub fn spend(&mut self, jump: u64, now_ms: u64) {
        self.available = self.available(now_ms).saturating_sub(jump);
        self.at_ms = self.at_ms.max(now_ms);
    }
}

/// Why a peer message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Local to a replica (`MsgHup`, `MsgBeat`, …) or never sent between tally replicas
    /// (proposals, read-index forwarding, leadership transfer).
    #[error("{0:?} is never sent between replicas")]
    Kind(MessageType),
    #[error("a message from node {from} to node {to} is misaddressed")]
    Address { from: u64, to: u64 },
    #[error("term {0} is 0 or above the bound {TERM_MAX}")]
    Term(u64),
    /// A term further above this replica's than peers may move it now ([`TermBudget`]).
    #[error("term {term} is {jump} above this replica's, more than the {available} peers may add now")]
    TermJump { term: u64, jump: u64, available: u64 },
    /// A response from a node this replica's configuration does not hold (raft-rs ignores it).
    #[error("a response from node {0}, which is not in the configuration")]
    NotMember(u64),
    /// Raft elects at most one leader per term: a heartbeat (a commit claim) from another node
    /// at the term of the leader this replica follows.
    #[error("a heartbeat at term {term}, whose leader is node {leader}")]
    SecondLeader { term: u64, leader: u64 },
    #[error("commit {commit} is beyond the log's last index {last_index}")]
    CommitBeyondLog { commit: u64, last_index: u64 },
    /// A leader of a term this replica has not joined yet knows nothing it matched: its
    /// heartbeat carries commit 0 (raft-rs sends `min(matched, committed)`).
    #[error("a heartbeat at a new term {term} claims commit {commit} above this replica's {committed}")]
    CommitFromNewLeader { term: u64, commit: u64, committed: u64 },
    #[error("{what}")]
    Index { what: String },
    #[error("entries are not contiguous after index {after}: entry {found}")]
    NotContiguous { after: u64, found: u64 },
    #[error("entry {index} has term {term}, outside {low}..={high}")]
    EntryTerm { index: u64, term: u64, low: u64, high: u64 },
    /// An entry this replica could never apply (a batch that does not decode or does not chain,
    /// a conf change that does not parse).
    #[error("entry {index}: {why}")]
    Entry { index: u64, why: String },
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A heartbeat response acknowledging a lease probe this leader never sent.
    #[error("a heartbeat response acknowledges a probe never sent ({0})")]
    Probe(String),
}

impl Refusal {
    /// A short fixed label, for metrics (one series per peer and reason).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Kind(_) => "kind",
            Refusal::Address { .. } => "address",
            Refusal::Term(_) | Refusal::TermJump { .. } => "term",
            Refusal::NotMember(_) => "not_member",
            Refusal::SecondLeader { .. } => "second_leader",
            Refusal::CommitBeyondLog { .. } | Refusal::CommitFromNewLeader { .. } => "commit",
            Refusal::Index { .. } => "index",
            Refusal::NotContiguous { .. } | Refusal::EntryTerm { .. } => "entries",
            Refusal::Entry { .. } => "entry",
            Refusal::Snapshot(_) => "snapshot",
            Refusal::Probe(_) => "probe",
        }
    }

    /// Every label [`Refusal::reason`] returns.
    pub const REASONS: [&'static str; 11] = [
        "kind",
        "address",
        "term",
        "not_member",
        "second_leader",
        "commit",
        "index",
        "entries",
        "entry",
        "snapshot",
        "probe",
    ];

    /// Whether the sender's link is cut: for everything no honest replica sends. Not for a
    /// response from a node that just left the configuration (a normal race after a membership
    /// change; raft-rs ignores it too); nor for a second leader's heartbeat: when a liar claimed
    /// the term first, the honest leader's heartbeats are the second ones, until its next append
    /// (which raft-rs follows) or this replica's election timeout; nor for a term over the
    /// budget, which a liar may have spent.
    pub fn cuts_link(&self) -> bool {
        !matches!(self, Refusal::NotMember(_) | Refusal::SecondLeader { .. } | Refusal::TermJump { .. })
    }
}

fn index(what: String) -> Refusal {
    Refusal::Index { what }
}

/// The kinds tally replicas send each other. Everything else is local to raft-rs or belongs
/// to features tally does not use (proposal forwarding, read-index forwarding, leadership
/// transfer), and several of those panic raft-rs when they arrive with a term.
pub fn is_peer_kind(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::MsgAppend
            | MessageType::MsgAppendResponse
            | MessageType::MsgHeartbeat
            | MessageType::MsgHeartbeatResponse
            | MessageType::MsgSnapshot
            | MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestPreVoteResponse
    )
}

/// Judges `m` against `raw`'s state at monotonic time `now_ms`, with `terms` the term increase
/// peers may still cause. Batches in entries and the snapshot's state are judged by the
/// replica, which knows the chain and the ledger ([`check_entry_kind`] here judges conf
/// changes).
///
/// # Errors
/// The first check that failed.
pub fn check<S: Storage>(raw: &RawNode<S>, now_ms: u64, terms: &TermBudget, m: &Message) -> Result<(), Refusal> {
    let r = &raw.raft;
    let t = m.get_msg_type();
    if !is_peer_kind(t) {
        return Err(Refusal::Kind(t));
    }
    if m.to != r.id || m.from == r.id || m.from == INVALID_ID {
        return Err(Refusal::Address { from: m.from, to: m.to });
    }
    // Term 0 marks a local message: raft-rs skips its term checks, then a vote request is
    // answered with term 0 (`fatal!` in `send`) and a heartbeat commits unchecked.
    if m.term == 0 || m.term > TERM_MAX {
        return Err(Refusal::Term(m.term));
    }
    let (jump, available) = (m.term.saturating_sub(r.term), terms.available(now_ms));
    if jump > available {
        return Err(Refusal::TermJump { term: m.term, jump, available });
    }
    match t {
        MessageType::MsgAppend => check_append(m),
        MessageType::MsgHeartbeat => check_heartbeat(raw, m),
        MessageType::MsgSnapshot => check_snapshot(m),
        MessageType::MsgAppendResponse => check_append_response(raw, m),
        MessageType::MsgHeartbeatResponse => check_heartbeat_response(raw, now_ms, m),
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => check_vote(m),
        _ => check_vote_response(raw, m),
    }
}

/// A heartbeat at this replica's term must come from the leader it knows for that term: a
/// commit claimed by anyone else is refused. Appends and snapshots pass (raft-rs follows their
/// sender), so that an honest leader whose term a liar claimed first is followed again.
fn check_leader_claim<S: Storage>(raw: &RawNode<S>, m: &Message) -> Result<(), Refusal> {
    let r = &raw.raft;
    if m.term == r.term && r.leader_id != INVALID_ID && r.leader_id != m.from {
        return Err(Refusal::SecondLeader { term: m.term, leader: r.leader_id });
    }
    Ok(())
}

/// `MsgAppend`: what `handle_append_entries` → `maybe_append` would do with it.
fn check_append(m: &Message) -> Result<(), Refusal> {
    if m.log_term > m.term {
        return Err(index(format!("previous entry's term {} is above the message's term {}", m.log_term, m.term)));
    }
    // `match_term(index, 0)` holds for any index beyond the log: raft-rs would append there
    // (`unstable.truncate_and_append` out of bounds) or commit there (`commit_to`).
    if m.log_term == 0 && m.index != 0 {
        return Err(index(format!("previous entry {} with term 0", m.index)));
    }
    check_entries(m)?;
    for e in m.get_entries() {
        check_entry_kind(e)?;
    }
    // With contiguous entries after an index at or above the commit index (raft-rs answers
    // one below it without reading it), no entry can conflict with a committed one:
    // `maybe_append`'s `fatal!("entry … conflict with committed entry")` is unreachable.
    Ok(())
}

/// Whether raft-rs appends what `m` carries: not stale (raft-rs answers an append of a lower
/// term, or below its commit index, without reading it) and its previous entry is in this log
/// (otherwise it is rejected).
pub fn appends<S: Storage>(raw: &RawNode<S>, m: &Message) -> bool {
    let r = &raw.raft;
    let log = &r.raft_log;
    m.get_msg_type() == MessageType::MsgAppend
        && m.term >= r.term
        && m.index >= log.committed
        && log.match_term(m.index, m.log_term)
}

/// Whether the batch with `header` follows the batch whose link is `prev` (the checks stage 6
/// asserts when the batch commits, made before it is appended).
///
/// # Errors
/// Which link is broken.
pub fn chain_follows(prev: &ChainHead, header: &BatchHeader) -> Result<(), String> {
    if prev.height.checked_add(1) != Some(header.height) {
        return Err(format!("a batch at height {} does not follow height {}", header.height, prev.height));
    }
    if header.prev_hash != prev.hash {
        return Err(format!("batch {} does not chain to the previous header", header.height));
    }
    if header.state_digest != next_state_digest(&prev.state_digest, &header.write_set_digest) {
        return Err(format!("batch {} has a state digest that does not follow", header.height));
    }
    Ok(())
}

/// Entries follow the previous entry one by one (`maybe_append` slices with
/// `conflict - (index + 1)`), with terms that never go down, from the previous entry's term up
/// to the message's (a leader holds no entry of a later term than its own).
fn check_entries(m: &Message) -> Result<(), Refusal> {
    let mut next = m.index;
    let mut low = m.log_term.max(1);
    for e in m.get_entries() {
        next = next.checked_add(1).ok_or_else(|| index(format!("entries after index {}", m.index)))?;
        if e.index != next {
            return Err(Refusal::NotContiguous { after: m.index, found: e.index });
        }
        if e.term < low || e.term > m.term {
            return Err(Refusal::EntryTerm { index: e.index, term: e.term, low, high: m.term });
        }
        low = e.term;
    }
    Ok(())
}

/// A conf change entry parses and names real nodes (applying one that does not parse is an
/// `expect` in the replica).
///
/// # Errors
/// [`Refusal::Entry`] naming what is wrong.
pub fn check_entry_kind(e: &Entry) -> Result<(), Refusal> {
    let bad = |why: String| Err(Refusal::Entry { index: e.index, why });
    match e.get_entry_type() {
        EntryType::EntryNormal => Ok(()),
        EntryType::EntryConfChange => match protobuf::Message::parse_from_bytes(&e.data) {
            Ok(ConfChange { node_id: 0, .. }) => bad("a conf change naming node 0".into()),
            Ok(_) => Ok(()),
            Err(x) => bad(format!("a conf change that does not parse: {x}")),
        },
        EntryType::EntryConfChangeV2 => match <ConfChangeV2 as protobuf::Message>::parse_from_bytes(&e.data) {
            Ok(cc) if cc.get_changes().iter().any(|c| c.node_id == 0) => bad("a conf change naming node 0".into()),
            Ok(_) => Ok(()),
            Err(x) => bad(format!("a conf change that does not parse: {x}")),
        },
    }
}

/// `MsgHeartbeat`: `handle_heartbeat` calls `commit_to(commit)`, which is `fatal!` beyond the
/// last index.
fn check_heartbeat<S: Storage>(raw: &RawNode<S>, m: &Message) -> Result<(), Refusal> {
    check_leader_claim(raw, m)?;
    let r = &raw.raft;
    if m.term < r.term {
        return Ok(()); // answered without being read
    }
    let (last_index, committed) = (r.raft_log.last_index(), r.raft_log.committed);
    if m.commit > last_index {
        return Err(Refusal::CommitBeyondLog { commit: m.commit, last_index });
    }
    // A leader's progress for this replica starts at 0 in its term and moves only with this
    // replica's acknowledgements in that term; this replica has not acknowledged anything at
    // a term it has not reached.
    if m.term > r.term && m.commit > committed {
        return Err(Refusal::CommitFromNewLeader { term: m.term, commit: m.commit, committed });
    }
    Ok(())
}

/// `MsgSnapshot`: `restore` commits to a snapshot matching the log (`commit_to`, unchecked when
/// the term is 0), rebuilds the configuration (`fatal!` when it does not restore or restores to
/// something else), and the replica installs the state.
fn check_snapshot(m: &Message) -> Result<(), Refusal> {
    let meta = m.get_snapshot().get_metadata();
    if meta.index == 0 || meta.term == 0 {
        return Err(Refusal::Snapshot(format!("metadata at index {} term {}", meta.index, meta.term)));
    }
    if meta.term > m.term {
        return Err(Refusal::Snapshot(format!("metadata term {} above the message's term {}", meta.term, m.term)));
    }
    check_conf_state(meta.get_conf_state()).map_err(Refusal::Snapshot)
}

/// Whether raft-rs can restore `cs` exactly (`confchange::restore` then `conf_state_eq`, both
/// `fatal!` otherwise): the same changes applied to an empty tracker, compared with `cs`.
///
/// # Errors
/// Why it cannot.
pub fn check_conf_state(cs: &ConfState) -> Result<(), String> {
    let lists: [(&str, &[u64]); 4] = [
        ("voters", cs.get_voters()),
        ("learners", cs.get_learners()),
        ("outgoing voters", cs.get_voters_outgoing()),
        ("next learners", cs.get_learners_next()),
    ];
    for (name, ids) in lists {
        if ids.contains(&INVALID_ID) {
            return Err(format!("configuration {name} name node 0"));
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return Err(format!("configuration {name} repeat a node"));
        }
    }
    if cs.get_voters().is_empty() {
        return Err("a configuration without voters".into());
    }
    let mut tracker = ProgressTracker::new(1);
    let (outgoing, incoming) = to_conf_change_single(cs);
    if outgoing.is_empty() {
        for cc in &incoming {
            restore_step(&mut tracker, std::slice::from_ref(cc), None)?;
        }
    } else {
        for cc in &outgoing {
            restore_step(&mut tracker, std::slice::from_ref(cc), None)?;
        }
        restore_step(&mut tracker, &incoming, Some(cs.auto_leave))?;
    }
    let got = tracker.conf().to_conf_state();
    let same = |a: &[u64], b: &[u64]| a.len() == b.len() && a.iter().all(|x| b.contains(x));
    let equal = same(got.get_voters(), cs.get_voters())
        && same(got.get_learners(), cs.get_learners())
        && same(got.get_voters_outgoing(), cs.get_voters_outgoing())
        && same(got.get_learners_next(), cs.get_learners_next())
        && got.auto_leave == cs.auto_leave;
    if !equal {
        return Err(format!("configuration restores to {got:?}, not to itself"));
    }
    Ok(())
}

/// One step of raft-rs's `confchange::restore`: a simple change, or entering the joint state.
fn restore_step(tracker: &mut ProgressTracker, ccs: &[ConfChangeSingle], joint: Option<bool>) -> Result<(), String> {
    let changed = match joint {
        Some(auto_leave) => Changer::new(tracker).enter_joint(auto_leave, ccs),
        None => Changer::new(tracker).simple(ccs),
    };
    let (cfg, changes) = changed.map_err(|e| format!("configuration does not restore: {e}"))?;
    tracker.apply_conf(cfg, changes, 1);
    Ok(())
}

/// raft-rs's `to_conf_change_single` (private in raft 0.7): the changes building `cs` from an
/// empty configuration, as `(outgoing, incoming)`.
fn to_conf_change_single(cs: &ConfState) -> (Vec<ConfChangeSingle>, Vec<ConfChangeSingle>) {
    let single = |id: u64, t: ConfChangeType| {
        let mut c = ConfChangeSingle::default();
        c.node_id = id;
        c.set_change_type(t);
        c
    };
    let outgoing: Vec<_> = cs.get_voters_outgoing().iter().map(|id| single(*id, ConfChangeType::AddNode)).collect();
    let mut incoming: Vec<_> =
        cs.get_voters_outgoing().iter().map(|id| single(*id, ConfChangeType::RemoveNode)).collect();
    incoming.extend(cs.get_voters().iter().map(|id| single(*id, ConfChangeType::AddNode)));
    incoming.extend(cs.get_learners().iter().map(|id| single(*id, ConfChangeType::AddLearnerNode)));
    incoming.extend(cs.get_learners_next().iter().map(|id| single(*id, ConfChangeType::AddLearnerNode)));
    (outgoing, incoming)
}

/// A response must come from a node of the configuration (raft-rs ignores it otherwise).
fn check_member<S: Storage>(raw: &RawNode<S>, m: &Message) -> Result<(), Refusal> {
    if raw.raft.prs().get(m.from).is_none() {
        return Err(Refusal::NotMember(m.from));
    }
    Ok(())
}

/// `MsgAppendResponse` to the leader of its term: `maybe_update(index)` (`index + 1` overflows
/// at `u64::MAX`), then `send_append` slices the log from the new next index (`fatal!` when
/// the slice starts beyond the last index); a rejection's hint feeds `match_hint + 1`. An honest
/// follower answers the leader's own appends, which never reach beyond the leader's log.
fn check_append_response<S: Storage>(raw: &RawNode<S>, m: &Message) -> Result<(), Refusal> {
    check_member(raw, m)?;
    // Set only by `request_snapshot`, which tally never calls; a leader that honours one
    // exports its whole state again and again.
    if m.request_snapshot != 0 {
        return Err(index(format!("a snapshot request at {}", m.request_snapshot)));
    }
    let r = &raw.raft;
    if r.state != StateRole::Leader || m.term != r.term {
        return Ok(()); // raft-rs acts on the term only
    }
    let last_index = r.raft_log.last_index();
    if m.index > last_index {
        return Err(index(format!("an acknowledgement of index {} beyond the leader's last {last_index}", m.index)));
    }
    if m.reject && m.reject_hint > last_index {
        return Err(index(format!("a rejection hint {} beyond the leader's last {last_index}", m.reject_hint)));
    }
    Ok(())
}

/// `MsgHeartbeatResponse`: a lease probe's acknowledgement echoes the context the leader sent,
/// with its term and a send time that is not in the future.
fn check_heartbeat_response<S: Storage>(raw: &RawNode<S>, now_ms: u64, m: &Message) -> Result<(), Refusal> {
    check_member(raw, m)?;
    let r = &raw.raft;
    if r.state != StateRole::Leader || m.term != r.term {
        return Ok(());
    }
    if let Some((term, sent_ms)) = parse_probe_context(&m.context) {
        if term != r.term {
            return Err(Refusal::Probe(format!("a probe of term {term} in term {}", r.term)));
        }
        if sent_ms > now_ms {
            return Err(Refusal::Probe(format!("sent at {sent_ms} ms, now is {now_ms} ms")));
        }
    }
    Ok(())
}

/// Vote requests: a candidate's last entry is of a term below the one it asks for, and its
/// commit is in its log.
fn check_vote(m: &Message) -> Result<(), Refusal> {
    if m.log_term > m.term {
        return Err(index(format!("last entry's term {} above the campaign's term {}", m.log_term, m.term)));
    }
    if m.commit > m.index || m.commit_term > m.log_term {
        return Err(index(format!(
            "commit {} (term {}) beyond the last entry {} (term {})",
            m.commit, m.commit_term, m.index, m.log_term
        )));
    }
    Ok(())
}

/// Vote responses: from a voter this candidate asked; a refusal's commit term is not above the
/// refusing voter's term.
fn check_vote_response<S: Storage>(raw: &RawNode<S>, m: &Message) -> Result<(), Refusal> {
    check_member(raw, m)?;
    if m.commit_term > m.term {
        return Err(index(format!("commit term {} above the voter's term {}", m.commit_term, m.term)));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
