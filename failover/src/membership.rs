//! Membership changes as the leader runs them, one at a time: adding a node (as a learner, caught
//! up, then promoted), removing one, and removing one with its certificate revoked.
//!
//! ```text
//!  Add:    ready ─▶ join as learner ─▶ catch up (entries or a snapshot) ─▶ promote (joint) ─▶ done
//!                                          └── no progress ─▶ withdraw the learner ─▶ NotAdded
//!  Remove: ready ─▶ remove (joint, left automatically) ─▶ done
//!  Revoke: ready ─▶ remove with the revocation (one step when it removes this leader) ─▶ done
//! ```
//!
//! A [`Flow`] decides; the replica executes: after every event it shows the flow what the leader
//! knows now (a [`LeaderView`]) and gets back a [`Step`]: wait, propose this change, or answer.
//! Time is the replica's (the event's), so the simulator runs exactly what a node runs. "Ready"
//! is a leader that has applied its log up to its own term's first entry: only then does its
//! configuration hold every committed change (a leader elected a moment ago, or one replaying
//! its log after a restart, holds an older one, in which a node removed since still looks like a
//! voter).
//!
//! Every wait is bounded ([`MEMBERSHIP_TIMEOUT_MS`], [`CATCH_UP_STALL_MS`],
//! [`CATCH_UP_TIMEOUT_MS`]), and a leader that loses its leadership answers
//! [`MembershipError::NotLeader`]: the change may still commit under the next leader, and the
//! same command sent to it finds it done (an add of a learner goes on from its catch-up, a
//! removal of a node that is gone succeeds).

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState};

/// How long each step of a membership change (the leader getting ready, a proposal applying)
/// may take before the change gives up.
pub const MEMBERSHIP_TIMEOUT_MS: u64 = 30_000;
/// How long a learner may make no progress (no match advance, no snapshot on its way) before
/// the change gives up on it.
pub const CATCH_UP_STALL_MS: u64 = 60_000;
/// How long a learner may take to catch up at most.
pub const CATCH_UP_TIMEOUT_MS: u64 = 30 * 60_000;
/// The longest a change can take before it is answered: every step at its bound.
pub const CHANGE_ANSWER_MS_MAX: u64 = 4 * MEMBERSHIP_TIMEOUT_MS + CATCH_UP_TIMEOUT_MS;

/// A membership change an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// Adds `node` as a voter: first a learner, promoted once it holds what was committed when
    /// it joined. `context` travels with both changes to every replica (the node's addresses).
    Add { node: u64, context: Vec<u8> },
    /// Removes `node` through a joint configuration, left automatically.
    Remove { node: u64 },
    /// Removes `node` if it is a member, with `context` (its revoked certificate) applied by every
    /// replica: through a joint configuration when it is another member; in one step when it is
    /// this leader (the others cut it off as they apply the revocation, so it could never lead
    /// them out of a joint one); as a change of nothing otherwise (a removed node's key can leak).
    Revoke { node: u64, context: Vec<u8> },
}

impl MemberChange {
    pub fn node(&self) -> u64 {
        match self {
            MemberChange::Add { node, .. } | MemberChange::Remove { node } | MemberChange::Revoke { node, .. } => *node,
        }
    }
}

/// Why a membership change did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("not the leader")]
    NotLeader,
    #[error("node id 0 is reserved")]
    ReservedId,
    #[error("node {0} is already a voter")]
    AlreadyVoter(u64),
    #[error("node {node} is not reachable as a replica of this cluster: {reason}")]
    Unreachable { node: u64, reason: String },
    /// Another change is in flight (one at a time), or the replica could not take the command.
    #[error("another membership change is in flight, or the replica is busy")]
    Busy,
    #[error("conf change refused: {0}")]
    Refused(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("replica stopped: {0}")]
    Stopped(String),
    /// A learner was proposed but never caught up; it was removed again.
    #[error("{cause}; node {node} was not added")]
    NotAdded { node: u64, cause: Box<MembershipError> },
}

/// What the leader knows now, as a flow needs it.
#[derive(Debug, Clone, Copy)]
pub struct LeaderView<'a> {
    pub now_ms: u64,
    /// This replica's id.
    pub id: u64,
    pub leading: bool,
    /// Whether the leader has applied its log up to its own term's first entry.
    pub ready: bool,
    /// The configuration applied.
    pub conf: &'a ConfState,
    pub commit_index: u64,
    pub applied_index: u64,
    /// The node's match index as the leader tracks it (0 when it has no progress for it).
    pub matched: u64,
    /// Whether a snapshot is on its way to the node.
    pub snapshotting: bool,
    /// Whether a configuration change is in the log and not applied yet (raft-rs would turn
    /// another proposal into an empty entry): a proposal waits for it.
    pub conf_pending: bool,
}

impl LeaderView<'_> {
    fn is_member(&self, node: u64) -> bool {
        conf_ids(self.conf).contains(&node)
    }
    fn is_joint(&self) -> bool {
        !self.conf.voters_outgoing.is_empty()
    }
    fn is_voter(&self, node: u64) -> bool {
        self.conf.voters.contains(&node)
    }
}

/// Every node of a configuration: voters (incoming and outgoing) and learners (now and next).
pub fn conf_ids(cs: &ConfState) -> Vec<u64> {
    let mut ids: Vec<u64> =
        cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing).chain(&cs.learners_next).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// What the replica does next for a flow.
#[derive(Debug, PartialEq)]
pub enum Step {
    Wait,
    /// Propose this change; then tell the flow [`Flow::proposed`] (or answer the refusal).
    Propose {
        cc: ConfChangeV2,
        context: Vec<u8>,
    },
    /// The change is over: answer its ticket.
    Answer(Result<(), MembershipError>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the leader to be ready (see the module docs).
    Ready,
    /// The learner was proposed at log index `at`.
    Joining { at: u64 },
    /// The learner is catching up with `target`; `matched` moved (or a snapshot was on its way)
    /// last at `moved_ms`.
    CatchingUp { target: u64, matched: u64, moved_ms: u64, since_ms: u64 },
    /// The promotion was proposed at `at`.
    Promoting { at: u64 },
    /// A learner that did not catch up is being removed (proposed at `at`); the change then
    /// fails with `cause`.
    Withdrawing { at: u64, cause: MembershipError },
    /// The removal was proposed at `at`.
    Removing { at: u64 },
    /// A change is about to be proposed: the phase it leads to once the leader's log holds it.
    Proposing(Proposal),
}

/// What a proposed configuration change is for: the phase it starts once it is in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Proposal {
    Join,
    Promote,
    Withdraw { cause: MembershipError },
    Remove,
}

impl Proposal {
    /// The phase this proposal starts, proposed at log index `at`.
    fn at(self, at: u64) -> Phase {
        match self {
            Proposal::Join => Phase::Joining { at },
            Proposal::Promote => Phase::Promoting { at },
            Proposal::Withdraw { cause } => Phase::Withdrawing { at, cause },
            Proposal::Remove => Phase::Removing { at },
        }
    }
}

/// One membership change in flight.
#[derive(Debug)]
pub struct Flow {
    pub ticket: u64,
    change: MemberChange,
    phase: Phase,
    /// When the current phase started.
    phase_ms: u64,
    /// Whether the learner existed before this change (a retried add): a failed catch-up then
    /// leaves it in place.
    was_learner: bool,
}

impl Flow {
    pub fn new(ticket: u64, change: MemberChange, now_ms: u64) -> Flow {
        Flow { ticket, change, phase: Phase::Ready, phase_ms: now_ms, was_learner: false }
    }

    pub fn change(&self) -> &MemberChange {
        &self.change
    }

    /// The next step, given what the leader knows now.
    pub fn step(&mut self, v: &LeaderView<'_>) -> Step {
        let node = self.change.node();
        if node == 0 {
            return Step::Answer(Err(MembershipError::ReservedId));
        }
        match self.phase.clone() {
            Phase::Ready => self.when_ready(v),
            Phase::Joining { at } => {
                if v.applied_index >= at && v.conf.learners.contains(&node) {
                    return self.start_catch_up(v);
                }
                self.wait(v, "the learner to join")
            }
            Phase::CatchingUp { target, matched, moved_ms, since_ms } => {
                self.catching_up(v, target, matched, moved_ms, since_ms)
            }
            Phase::Promoting { at } => {
                if v.applied_index >= at && v.is_voter(node) && !v.is_joint() {
                    return Step::Answer(Ok(()));
                }
                self.wait(v, "the promotion to commit")
            }
            Phase::Withdrawing { at, cause } => {
                if v.applied_index >= at && !v.is_member(node) {
                    return Step::Answer(Err(MembershipError::NotAdded { node, cause: Box::new(cause) }));
                }
                if !v.leading || v.now_ms > self.phase_ms + MEMBERSHIP_TIMEOUT_MS {
                    // The learner stays; a retried add picks it up.
                    return Step::Answer(Err(MembershipError::NotAdded { node, cause: Box::new(cause) }));
                }
                Step::Wait
            }
            Phase::Removing { at } => {
                if v.applied_index >= at && !v.is_member(node) && !v.is_joint() {
                    return Step::Answer(Ok(()));
                }
                self.wait(v, "the removal to commit")
            }
            Phase::Proposing(_) => unreachable!("a proposal is answered by proposed() or refused()"),
        }
    }

    /// The change proposed by the last [`Step::Propose`] is in the leader's log at `index`.
    pub fn proposed(&mut self, index: u64, now_ms: u64) {
        let Phase::Proposing(proposal) = std::mem::replace(&mut self.phase, Phase::Ready) else {
            panic!("proposed() without a proposal");
        };
        self.phase = proposal.at(index);
        self.phase_ms = now_ms;
    }

    /// raft-rs refused the last proposal: the answer.
    pub fn refused(&mut self, why: String) -> Result<(), MembershipError> {
        let node = self.change.node();
        match std::mem::replace(&mut self.phase, Phase::Ready) {
            Phase::Proposing(Proposal::Withdraw { cause }) => {
                Err(MembershipError::NotAdded { node, cause: Box::new(cause) })
            }
            Phase::Proposing(_) => Err(MembershipError::Refused(why)),
            other => panic!("refused() without a proposal (phase {other:?})"),
        }
    }

    fn when_ready(&mut self, v: &LeaderView<'_>) -> Step {
        if !v.leading {
            return Step::Answer(Err(MembershipError::NotLeader));
        }
        if !v.ready || v.conf_pending {
            return self.wait(v, "the new leader to apply its log");
        }
        let node = self.change.node();
        match self.change.clone() {
            MemberChange::Add { context, .. } => {
                if v.is_voter(node) && !v.is_joint() {
                    // The same add again (a retry whose first answer was lost).
                    return Step::Answer(Ok(()));
                }
                if v.conf.learners.contains(&node) {
                    self.was_learner = true;
                    return self.start_catch_up(v);
                }
                let cc = conf_change(node, ConfChangeType::AddLearnerNode, ConfChangeTransition::Auto);
                self.propose(Proposal::Join, cc, context)
            }
            MemberChange::Remove { .. } => {
                if !v.is_member(node) {
                    // Already gone: a retried remove succeeds.
                    return Step::Answer(Ok(()));
                }
                let cc = conf_change(node, ConfChangeType::RemoveNode, ConfChangeTransition::Implicit);
                self.propose(Proposal::Remove, cc, Vec::new())
            }
            MemberChange::Revoke { context, .. } => {
                let transition = if v.is_member(node) && node != v.id {
                    ConfChangeTransition::Implicit
                } else {
                    ConfChangeTransition::Auto
                };
                let cc = conf_change(node, ConfChangeType::RemoveNode, transition);
                self.propose(Proposal::Remove, cc, context)
            }
        }
    }

    fn catching_up(&mut self, v: &LeaderView<'_>, target: u64, matched: u64, moved_ms: u64, since_ms: u64) -> Step {
        let node = self.change.node();
        if !v.leading {
            return Step::Answer(Err(MembershipError::NotLeader));
        }
        if v.matched >= target && !v.conf_pending {
            let MemberChange::Add { context, .. } = self.change.clone() else { unreachable!("only an add catches up") };
            let cc = conf_change(node, ConfChangeType::AddNode, ConfChangeTransition::Implicit);
            return self.propose(Proposal::Promote, cc, context);
        }
        let moved_ms = if v.matched > matched || v.snapshotting { v.now_ms } else { moved_ms };
        self.phase = Phase::CatchingUp { target, matched: matched.max(v.matched), moved_ms, since_ms };
        if v.now_ms.saturating_sub(moved_ms) > CATCH_UP_STALL_MS
            || v.now_ms.saturating_sub(since_ms) > CATCH_UP_TIMEOUT_MS
        {
            let cause = MembershipError::Timeout(format!(
                "the learner to catch up (matched {} of {target})",
                matched.max(v.matched)
            ));
            if self.was_learner {
                return Step::Answer(Err(MembershipError::NotAdded { node, cause: Box::new(cause) }));
            }
            // A failed add leaves no learner behind.
            let cc = conf_change(node, ConfChangeType::RemoveNode, ConfChangeTransition::Auto);
            return self.propose(Proposal::Withdraw { cause }, cc, Vec::new());
        }
        Step::Wait
    }

    /// The learner is in the configuration: it must now hold what is committed.
    fn start_catch_up(&mut self, v: &LeaderView<'_>) -> Step {
        let since = v.now_ms;
        self.enter(v, Phase::CatchingUp { target: v.commit_index, matched: 0, moved_ms: since, since_ms: since });
        self.step(v)
    }

    fn propose(&mut self, proposal: Proposal, cc: ConfChangeV2, context: Vec<u8>) -> Step {
        self.phase = Phase::Proposing(proposal);
        Step::Propose { cc, context }
    }

    fn enter(&mut self, v: &LeaderView<'_>, phase: Phase) {
        self.phase = phase;
        self.phase_ms = v.now_ms;
    }

    /// Waits for the phase's condition: not past [`MEMBERSHIP_TIMEOUT_MS`], and only as the
    /// leader.
    fn wait(&self, v: &LeaderView<'_>, what: &str) -> Step {
        if !v.leading {
            return Step::Answer(Err(MembershipError::NotLeader));
        }
        if v.now_ms > self.phase_ms + MEMBERSHIP_TIMEOUT_MS {
            return Step::Answer(Err(MembershipError::Timeout(what.to_string())));
        }
        Step::Wait
    }
}

/// A change of one node.
pub fn conf_change(node: u64, ty: ConfChangeType, transition: ConfChangeTransition) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.node_id = node;
    single.set_change_type(ty);
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single].into());
    cc.set_transition(transition);
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader of voters 1, 2 and 3 (and `learners`), ready, everything applied.
    struct Leader {
        conf: ConfState,
        now_ms: u64,
        applied: u64,
        commit: u64,
        matched: u64,
        snapshotting: bool,
        leading: bool,
        ready: bool,
    }

    impl Leader {
        fn new() -> Leader {
            let conf = ConfState::from((vec![1, 2, 3], vec![]));
            Leader {
                conf,
                now_ms: 0,
                applied: 10,
                commit: 10,
                matched: 0,
                snapshotting: false,
                leading: true,
                ready: true,
            }
        }
        fn view(&self) -> LeaderView<'_> {
            LeaderView {
                now_ms: self.now_ms,
                id: 1,
                leading: self.leading,
                ready: self.ready,
                conf: &self.conf,
                commit_index: self.commit,
                applied_index: self.applied,
                matched: self.matched,
                snapshotting: self.snapshotting,
                conf_pending: false,
            }
        }
        /// Steps `flow`; a proposal is appended at the next index and applied at once with
        /// `then` applied to the configuration.
        fn step(&mut self, flow: &mut Flow, then: impl FnOnce(&mut ConfState)) -> Step {
            let step = flow.step(&self.view());
            if let Step::Propose { .. } = step {
                self.commit += 1;
                flow.proposed(self.commit, self.now_ms);
                self.applied = self.commit;
                then(&mut self.conf);
            }
            step
        }
    }

    fn kinds(step: &Step) -> Vec<(u64, ConfChangeType)> {
        match step {
            Step::Propose { cc, .. } => cc.changes.iter().map(|c| (c.node_id, c.get_change_type())).collect(),
            other => panic!("expected a proposal, got {other:?}"),
        }
    }

    #[test]
    fn an_add_joins_as_a_learner_catches_up_then_is_promoted() {
        let mut l = Leader::new();
        let mut flow = Flow::new(7, MemberChange::Add { node: 4, context: b"addr".to_vec() }, 0);
        let step = l.step(&mut flow, |cs| cs.learners.push(4));
        assert_eq!(kinds(&step), vec![(4, ConfChangeType::AddLearnerNode)]);
        assert!(matches!(&step, Step::Propose { context, .. } if context == b"addr"));
        // The learner holds less than what was committed when it joined: no promotion yet.
        l.matched = 5;
        assert_eq!(l.step(&mut flow, |_| {}), Step::Wait);
        l.matched = 11;
        let step = l.step(&mut flow, |cs| {
            cs.learners.clear();
            cs.voters.push(4);
        });
        assert_eq!(kinds(&step), vec![(4, ConfChangeType::AddNode)]);
        assert_eq!(l.step(&mut flow, |_| {}), Step::Answer(Ok(())));
    }

    #[test]
    fn a_learner_that_makes_no_progress_is_withdrawn_and_the_add_fails() {
        let mut l = Leader::new();
        let mut flow = Flow::new(1, MemberChange::Add { node: 4, context: Vec::new() }, 0);
        l.step(&mut flow, |cs| cs.learners.push(4));
        assert_eq!(l.step(&mut flow, |_| {}), Step::Wait);
        // A snapshot on its way is progress.
        l.now_ms = CATCH_UP_STALL_MS;
        l.snapshotting = true;
        assert_eq!(l.step(&mut flow, |_| {}), Step::Wait);
        l.snapshotting = false;
        l.now_ms = 2 * CATCH_UP_STALL_MS;
        assert_eq!(l.step(&mut flow, |_| {}), Step::Wait, "exactly the stall bound is not past it");
        l.now_ms += 1;
        let step = l.step(&mut flow, |cs| cs.learners.clear());
        assert_eq!(kinds(&step), vec![(4, ConfChangeType::RemoveNode)]);
        let Step::Answer(Err(MembershipError::NotAdded { node: 4, cause })) = l.step(&mut flow, |_| {}) else {
            panic!("the add fails once the learner is gone")
        };
        assert!(matches!(*cause, MembershipError::Timeout(ref why) if why.contains("catch up")), "{cause}");
    }

    #[test]
    fn a_removal_waits_for_the_joint_configuration_to_be_left() {
        let mut l = Leader::new();
        let mut flow = Flow::new(1, MemberChange::Remove { node: 3 }, 0);
        let step = l.step(&mut flow, |cs| {
            cs.voters_outgoing = cs.voters.clone();
            cs.voters.retain(|v| *v != 3);
        });
        assert!(matches!(&step, Step::Propose { cc, .. } if cc.get_transition() == ConfChangeTransition::Implicit));
        assert_eq!(l.step(&mut flow, |_| {}), Step::Wait, "still joint");
        l.conf.voters_outgoing.clear();
        assert_eq!(l.step(&mut flow, |_| {}), Step::Answer(Ok(())));
        // Again: nothing to do.
        let mut again = Flow::new(2, MemberChange::Remove { node: 3 }, 0);
        assert_eq!(l.step(&mut again, |_| {}), Step::Answer(Ok(())));
    }

    #[test]
    fn a_leader_revoking_itself_changes_in_one_step() {
        let mut l = Leader::new();
        let mut flow = Flow::new(1, MemberChange::Revoke { node: 1, context: b"cert".to_vec() }, 0);
        let step = flow.step(&l.view());
        assert!(matches!(&step, Step::Propose { cc, .. } if cc.get_transition() == ConfChangeTransition::Auto));
        let mut other = Flow::new(2, MemberChange::Revoke { node: 2, context: b"cert".to_vec() }, 0);
        let step = l.step(&mut other, |_| {});
        assert!(matches!(&step, Step::Propose { cc, .. } if cc.get_transition() == ConfChangeTransition::Implicit));
    }

    #[test]
    fn no_change_before_the_leader_is_ready_and_none_after_it_lost_the_lead() {
        let mut l = Leader::new();
        l.ready = false;
        let mut flow = Flow::new(1, MemberChange::Remove { node: 3 }, 0);
        assert_eq!(l.step(&mut flow, |_| {}), Step::Wait);
        l.now_ms = MEMBERSHIP_TIMEOUT_MS + 1;
        assert!(matches!(l.step(&mut flow, |_| {}), Step::Answer(Err(MembershipError::Timeout(_)))));
        let mut l = Leader::new();
        let mut flow = Flow::new(1, MemberChange::Add { node: 4, context: Vec::new() }, 0);
        l.step(&mut flow, |cs| cs.learners.push(4));
        l.leading = false;
        assert_eq!(l.step(&mut flow, |_| {}), Step::Answer(Err(MembershipError::NotLeader)));
        let mut zero = Flow::new(1, MemberChange::Add { node: 0, context: Vec::new() }, 0);
        assert_eq!(Leader::new().step(&mut zero, |_| {}), Step::Answer(Err(MembershipError::ReservedId)));
    }
}
