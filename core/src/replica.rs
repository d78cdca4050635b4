//! One replica as a state machine: events in, effects out (raft-rs's `tick`/`step`/`ready`/
//! `advance` shape, one level up).
//!
//! ```text
//!  Event::Tick{now}    ─┐                                         ┌─▶ Effect::Send(peer message)
//!  Event::Submit       ─┤   sequencer (s3, s4) ─propose─▶ raft-rs ├─▶ Effect::Persist(entries, hs; fsync)
//!  Event::Read         ─┼─▶                                       ├─▶ Effect::Reply / ReadIndex
//!  Event::Peer(msg)    ─┤   confirm (s6) ◀─committed─ raft-rs     └─▶ Effect::Signed(header)
//!  Event::LogFailed    ─┘   apply (s7) ─▶ Ledger
//! ```
//!
//! Nothing here owns a thread, socket, file or clock, or draws randomness of its own: time comes
//! with each event, randomness from a seed the shell chooses, the log's durability from the
//! shell executing [`Effect::Persist`] before any effect after it, and committed state from the
//! [`Ledger`] the shell provides. The same seed and events give the same effects.
//!
//! Effects are ordered: the shell executes them in order and must not execute anything after a
//! `Persist` that failed; it reports the failure with [`Event::LogFailed`], and the replica
//! poisons itself and goes silent, so the others elect a leader.

use crate::confirm::confirm;
use crate::ledger::{Ledger, LedgerHead};
use crate::optimistic::{Intake, LedgerBacking, Mode, Sequencer, Submission, Verdict};
use crate::pending::PendingBatch;
use crate::restart::{raft_config, restore_log, unexpired_seen};
use crate::retention::Retention;
use crate::sequence::{batch_time, execute_batch, BatchContext, Tip, BATCHES_IN_FLIGHT_MAX};
use crate::{LogFailure, Plant, Validated};
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::{RawNode, StateRole, Storage};
use std::collections::BTreeMap;
use std::sync::Arc;
use tally_codec::batch::ChainHead;
use tally_codec::wire::{SubmitReply, WireError};
use tally_codec::{decode, encode, limits, BatchHeader, ClusterId, Committed, ErrorCode, Signature, Tables};
use tally_failover::election::{ElectionSettings, Elections};
use tally_failover::lease::{ignore_vote_while_starting, lease_duration_ms, probe_context, LeaseTracker};
use tally_failover::membership::{Flow, LeaderView, MemberChange, MembershipError, Step};
use tally_failover::peer_gate::{self, Refusal};
use tally_failover::raft_log::CoreLog;

pub use crate::restart::{RestoredLog, StartError};

/// Checked batches kept between append and commit, at most (a cache: an entry not kept is
/// decoded and checked again when it commits).
const APPENDED_MAX: usize = 1024;

/// Who is waiting for an answer: opaque to the core (a connection slot, a simulated client).
pub type ClientTag = u64;

/// Settings of one replica's core.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub node_id: u64,
    pub cluster_id: ClusterId,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub batch_interval_ms: u64,
    pub batch_requests_max: usize,
    pub batch_bytes_max: usize,
    /// Entries kept in memory behind the applied index for followers that lag; one further
    /// behind gets a snapshot.
    pub log_retain_entries: u64,
    /// At most this many bytes of entry data are kept behind the applied index (the log lives
    /// in memory: 2,000 full batches would be gigabytes).
    pub log_retain_bytes: u64,
    /// The operator key that signs committed headers (deterministic ed25519: every replica
    /// signs the same bytes the same way).
    pub operator_key: ed25519_dalek::SigningKey,
    /// Seeds the election timeouts (from the OS in production, from the run's seed in the
    /// simulator).
    pub election_seed: u64,
    /// A bug planted on purpose, for the simulator to prove it can catch it. `Plant::None` in
    /// production.
    pub plant: Plant,
    /// Whether the shell reports each snapshot once it has been streamed
    /// ([`Event::SnapshotReport`]). Otherwise a snapshot handed to the shell counts as sent at
    /// once (the simulator's network delivers a message whole or not at all).
    pub snapshot_reports_by_shell: bool,
    /// Whether [`Event::PeerDown`] of the leader starts a campaign at once. Safe for leases only
    /// when "down" means no process of that replica runs: the old leader serves no reads.
    pub campaign_on_leader_down: bool,
}

/// What happens to a replica.
#[derive(Debug)]
pub enum Event {
    /// Time passes: `now_ms` is monotonic, `wall_ms` is the (possibly jumping) wall clock.
    Tick { now_ms: u64, wall_ms: u64 },
    /// A request that passed stage 2 (decoded, signature checked, not expired by the shell's
    /// clock).
    Submit { client: ClientTag, req: Validated },
    /// A linearizable read arrived at monotonic time `now_ms`: answered with the index the
    /// shell's state must have applied before it reads ([`Effect::ReadIndex`]), or a refusal.
    /// The lease is judged by the time the read is served, not by the last tick (a replica
    /// resuming from a pause must not serve held reads under a lease that ran out while it was
    /// stopped).
    Read { client: ClientTag, now_ms: u64 },
    /// A message from a peer replica.
    Peer(Message),
    /// The shell could not make a [`Persist`] durable (a failed write or fsync, a full disk).
    LogFailed(LogFailure),
    /// A membership change ([`tally_failover::membership`]); leader only, one at a time. Its `context`
    /// (opaque to the core: an added node's addresses, a revoked certificate) reaches every
    /// replica in [`Effect::Reconfigured`]. Answered with [`Effect::MembershipChanged`] carrying
    /// `ticket` once it is done, failed or timed out.
    ChangeMembers { ticket: u64, change: MemberChange },
    /// The shell streamed (or failed to stream) the snapshot for follower `to` (only with
    /// [`ReplicaConfig::snapshot_reports_by_shell`]).
    SnapshotReport { to: u64, delivered: bool },
    /// The shell knows peer `id` is down: its connection was closed and a new one was refused,
    /// so no process listens on its peer port (a kill -9, not a slow scheduler or a partition).
    /// A follower of that leader forgets it and campaigns (pre-vote) within a heartbeat interval
    /// instead of waiting out the election timeout; see [`ReplicaConfig::campaign_on_leader_down`].
    PeerDown(u64),
}

/// What the log must hold durably, in this order, before any later effect is executed.
#[derive(Debug, Default)]
pub struct Persist {
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// Whether the shell must fsync (always, unless a bug is planted).
    pub sync: bool,
}

/// A read's answer: the log index the state must have applied before the read is served.
pub type ReadResult = Result<u64, WireError>;

/// How long a shell waits for its state to apply a read's index before answering `Overloaded`.
pub const READ_WAIT_MS: u64 = 5_000;

/// Requests the sequencer holds for batches not yet closed, in full batches
/// (`batch_requests_max` each), before it says it has no room ([`Replica::submission_room`]):
/// two batches are more than one interval's work. A shell stops handing over submissions then
/// (they wait in its own bounded queue); since it hands over a client frame whole, the core
/// takes one frame more ([`limits::FRAME_REQUESTS_MAX`]) and answers `Overloaded` past that,
/// so a leader whose batches cannot close (8 in flight, a slow quorum) never grows without
/// bound whatever its shell does.
pub const QUEUED_BATCHES_MAX: usize = 2;

/// What a replica asks its shell to do, in order.
#[derive(Debug)]
pub enum Effect {
    Send(Message),
    Persist(Persist),
    Reply {
        client: ClientTag,
        reply: SubmitReply,
    },
    ReadIndex {
        client: ClientTag,
        result: ReadResult,
    },
    /// A header this replica signed, once committed (for auditors, and the simulator's checker).
    Signed {
        header: tally_codec::BatchHeader,
        signature: Signature,
    },
    /// A configuration change was applied at log `index`: the configuration now, the context
    /// it was proposed with, and the change when it changed one node (which says what the
    /// context is: an added node's address, a removed node's revoked certificate).
    Reconfigured {
        index: u64,
        conf_state: ConfState,
        context: Vec<u8>,
        single: Option<(u64, raft::eraftpb::ConfChangeType)>,
    },
    /// A peer's message was refused before raft-rs saw it ([`tally_failover::peer_gate`]): the shell
    /// counts it by peer and reason, logs it (rate-limited) and cuts the sender's link when
    /// [`Refusal::cuts_link`].
    PeerRefused {
        from: u64,
        refusal: Refusal,
    },
    /// A committed configuration change raft-rs cannot apply (only a lying member can get one
    /// committed): every replica skips it at the same index, as a no-op.
    ConfChangeSkipped {
        index: u64,
        why: String,
    },
    /// The leader proposed a batch (for the shell's metrics).
    Proposed {
        height: u64,
        requests: usize,
        bytes: usize,
    },
    /// The answer to [`Event::ChangeMembers`].
    MembershipChanged {
        ticket: u64,
        result: Result<(), MembershipError>,
    },
}

/// What a shell publishes about its replica (role, progress, configuration), read after each
/// event.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub is_leader: bool,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub commit_index: u64,
    pub applied: LedgerHead,
    /// The last index handed to the shell to persist (durable once its `Persist` ran).
    pub last_index: u64,
    pub conf_state: ConfState,
    /// `(node, matched)`: the leader knows everyone's, a follower only its own.
    pub matched: Vec<(u64, u64)>,
    /// Followers a snapshot is on its way to (leader only).
    pub snapshotting: Vec<u64>,
    /// When the leader's lease ends (monotonic ms), if it holds one.
    pub lease_until_ms: Option<u64>,
    /// Whether the sequencer takes requests now.
    pub sequencing: bool,
    /// Why the replica stopped, if it did.
    pub poisoned: Option<LogFailure>,
    /// The first log index held in memory.
    pub first_index: u64,
    /// When a quorum of voters last acknowledged this leader (monotonic ms; leader only).
    pub quorum_ack_ms: Option<u64>,
    /// Pre-vote campaigns this replica started, and vote campaigns (new terms it asked votes
    /// for), since it started.
    pub pre_vote_campaigns: u64,
    pub vote_campaigns: u64,
    /// Campaigns started because the leader was reported down ([`Event::PeerDown`]).
    pub leader_down_campaigns: u64,
}

/// One replica.
pub struct Replica<L: Ledger> {
    cfg: ReplicaConfig,
    tables: Tables,
    raw: RawNode<CoreLog>,
    ledger: L,
    operator_key: ed25519_dalek::SigningKey,
    seq: Sequencer,
    /// Stage 6's chain head.
    head: ChainHead,
    lease: LeaseTracker,
    lease_ms: u64,
    leader_term: u64,
    term_start_index: u64,
    now_ms: u64,
    wall_ms: u64,
    next_tick_ms: u64,
    ticks: u64,
    last_probe_tick: u64,
    poisoned: Option<LogFailure>,
    /// Followers a snapshot was handed to the shell for, since the last report to raft-rs.
    snapshots_sent: Vec<u64>,
    /// A test hook: the next batch proposal is refused as if raft-rs had dropped it.
    refuse_next_proposal: bool,
    elections: Elections,
    retention: Retention,
    /// Batches checked when their entries were appended, by log index: `(term, blake3 of the
    /// entry's bytes, batch)`. Only entries above the commit index are kept.
    appended: BTreeMap<u64, (u64, [u8; 32], Committed)>,
    /// The membership change in flight.
    membership: Option<Flow>,
    out: Vec<Effect>,
}

/// A batch checked when its append arrived: `(index, term, blake3 of the entry's bytes, batch)`.
type AppendedBatch = (u64, u64, [u8; 32], Committed);

#[derive(Debug, thiserror::Error)]
enum InstallError {
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("raft log: {0}")]
    Log(#[from] raft::Error),
}

impl InstallError {
    fn into_failure(self) -> LogFailure {
        match self {
            InstallError::Ledger(e) => e.into_failure(),
            // The in-memory log: no OS error is behind it.
            InstallError::Log(e) => LogFailure::other(format!("raft log: {e}")),
        }
    }
}

impl<L: Ledger> Replica<L> {
    /// A replica starting on `ledger` (its durable state) and `log` (what its disk holds), at
    /// monotonic time `now_ms`.
    ///
    /// # Errors
    /// A log that raft-rs refuses.
    pub fn start(
        cfg: ReplicaConfig,
        ledger: L,
        log: RestoredLog,
        now_ms: u64,
        wall_ms: u64,
        logger: &slog::Logger,
    ) -> Result<Self, StartError> {
        let storage = CoreLog::new(restore_log(&ledger, log)?);
        let raft_cfg = raft_config(&cfg, ledger.head().index)?;
        let retention = Retention::of_log(&storage)?;
        let raw = RawNode::new(&raft_cfg, storage, logger)?;
        let head = ledger.head();
        let seq = Sequencer::new(unexpired_seen(&ledger));
        Ok(Replica {
            tables: Tables::v1(),
            raw,
            operator_key: cfg.operator_key.clone(),
            seq,
            head: ChainHead { height: head.height, hash: head.header_hash, state_digest: head.state_digest },
            ledger,
            lease: LeaseTracker::default(),
            lease_ms: lease_duration_ms(cfg.tick_ms, cfg.election_ticks as u64),
            leader_term: 0,
            term_start_index: 0,
            now_ms,
            wall_ms,
            next_tick_ms: now_ms + cfg.tick_ms,
            ticks: 0,
            last_probe_tick: 0,
            poisoned: None,
            snapshots_sent: Vec::new(),
            refuse_next_proposal: false,
            elections: Elections::new(election_settings(&cfg), cfg.election_seed, now_ms),
            retention,
            appended: BTreeMap::new(),
            membership: None,
            out: Vec::new(),
            cfg,
        })
    }

    pub fn id(&self) -> u64 {
        self.cfg.node_id
    }
    pub fn ledger(&self) -> &L {
        &self.ledger
    }
    /// The height of the batch that executed request `id`, if this replica remembers it: a
    /// duplicate is answered with its receipt (read from the ledger), not executed again.
    pub fn executed_at(&self, id: &tally_codec::RequestId) -> Option<u64> {
        self.seq.seen.get(id).map(|(height, _)| height)
    }
    pub fn is_leader(&self) -> bool {
        self.poisoned.is_none() && self.raw.raft.state == StateRole::Leader
    }
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }
    pub fn leader_id(&self) -> Option<u64> {
        let l = self.raw.raft.leader_id;
        (l != raft::INVALID_ID).then_some(l)
    }
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }
    /// The term of log entry `index`, if this replica's log holds it (the simulator compares
    /// logs with it to tell what a lying peer moved).
    pub fn log_term(&self, index: u64) -> Option<u64> {
        let log = &self.raw.raft.raft_log;
        if index == 0 || index > log.last_index() || index < log.first_index() - 1 {
            return None;
        }
        log.term(index).ok()
    }
    /// Whether this replica is a candidate of a real election (not a pre-vote), and the node it
    /// voted for in its term (0: none).
    pub fn campaign(&self) -> (bool, u64) {
        (self.raw.raft.state == StateRole::Candidate, self.raw.raft.vote)
    }
    pub fn applied(&self) -> LedgerHead {
        self.ledger.head()
    }
    /// The leader's view of each peer's replication progress (for diagnostics).
    pub fn progress_summary(&self) -> String {
        let raft = &self.raw.raft;
        let mut out: Vec<String> = raft
            .prs()
            .iter()
            .map(|(id, p)| {
                format!("{id}: match {} next {} {:?} snap {}", p.matched, p.next_idx, p.state, p.pending_snapshot)
            })
            .collect();
        out.sort();
        format!(
            "{} | conf {:?} | log {}..{}",
            out.join("; "),
            raft.prs().conf().to_conf_state(),
            raft.raft_log.first_index(),
            raft.raft_log.last_index()
        )
    }

    /// How many more requests the sequencer wants now ([`QUEUED_BATCHES_MAX`] batches less
    /// what it holds): a shell hands over no new frame at 0.
    pub fn submission_room(&self) -> usize {
        (QUEUED_BATCHES_MAX * self.cfg.batch_requests_max).saturating_sub(self.seq.queued())
    }

    /// Whether the sequencer takes requests (leading, with everything before its term applied),
    /// and how many are queued and in flight.
    pub fn sequencer_state(&self) -> (bool, usize, usize) {
        (self.seq.is_leading(), self.seq.queued(), self.seq.pending.len())
    }
    /// Why this replica stopped (a failed log write), if it did.
    pub fn poisoned(&self) -> Option<&LogFailure> {
        self.poisoned.as_ref()
    }
    /// A test hook: the next batch proposal is refused as if raft-rs had dropped it (the
    /// replica must then end; see `maybe_close_batch`).
    pub fn refuse_next_proposal(&mut self) {
        self.refuse_next_proposal = true;
    }

    /// Role, progress and configuration, for the shell to publish.
    pub fn status(&self) -> Status {
        let raft = &self.raw.raft;
        let is_leader = self.is_leader();
        let mut matched: Vec<(u64, u64)> = if is_leader {
            raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            vec![(self.cfg.node_id, raft.raft_log.last_index())]
        };
        matched.sort_unstable();
        let snapshotting = if is_leader {
            raft.prs().iter().filter(|(_, p)| p.state == raft::ProgressState::Snapshot).map(|(id, _)| *id).collect()
        } else {
            Vec::new()
        };
        Status {
            is_leader,
            term: raft.term,
            leader_id: self.leader_id(),
            commit_index: raft.raft_log.committed,
            applied: self.ledger.head(),
            last_index: raft.raft_log.last_index(),
            conf_state: raft.prs().conf().to_conf_state(),
            matched,
            snapshotting,
            lease_until_ms: if self.poisoned.is_none() { self.lease_until_ms() } else { None },
            sequencing: self.seq.is_leading(),
            poisoned: self.poisoned.clone(),
            first_index: raft.raft_log.first_index(),
            pre_vote_campaigns: self.elections.pre_vote_campaigns,
            vote_campaigns: self.elections.vote_campaigns,
            leader_down_campaigns: self.elections.leader_down_campaigns,
            quorum_ack_ms: if is_leader {
                let conf = raft.prs().conf().to_conf_state();
                let sets: [&[u64]; 2] = [&conf.voters, &conf.voters_outgoing];
                self.lease.quorum_ack_ms(&sets, self.cfg.node_id, self.now_ms)
            } else {
                None
            },
        }
    }

    /// The time of the next tick the replica wants.
    pub fn next_tick_ms(&self) -> u64 {
        self.next_tick_ms
    }

    /// When the replica next wants time to pass: its next tick, or the close of the open batch.
    pub fn next_wake_ms(&self) -> u64 {
        let close_ms = self.seq.close_ms(self.cfg.batch_interval_ms).unwrap_or(u64::MAX);
        self.next_tick_ms.min(close_ms).min(self.elections.campaign_at_ms().unwrap_or(u64::MAX))
    }

    /// Handles one event and returns the effects, in the order the shell must execute them.
    pub fn handle(&mut self, event: Event) -> Vec<Effect> {
        if let Some(failure) = &self.poisoned {
            // A poisoned replica sends nothing to its peers and refuses its clients.
            let refusal = WireError::new(failure.code(), format!("this replica stopped: {failure}"));
            match event {
                Event::Submit { client, .. } => self.reply(client, SubmitReply::Refused(refusal)),
                Event::Read { client, .. } => self.out.push(Effect::ReadIndex { client, result: Err(refusal) }),
                Event::ChangeMembers { ticket, .. } => self.out.push(Effect::MembershipChanged {
                    ticket,
                    result: Err(MembershipError::Stopped(failure.to_string())),
                }),
                _ => {}
            }
            return std::mem::take(&mut self.out);
        }
        self.ledger.refresh();
        match event {
            Event::Tick { now_ms, wall_ms } => self.on_tick(now_ms, wall_ms),
            Event::Submit { client, req } => self.on_submit(client, req),
            Event::Read { client, now_ms } => {
                self.now_ms = self.now_ms.max(now_ms);
                self.on_read(client)
            }
            Event::Peer(m) => self.on_peer(m),
            Event::PeerDown(id) => self.elections.on_peer_down(&mut self.raw, id, self.now_ms),
            Event::LogFailed(why) => {
                self.poison(why);
                return std::mem::take(&mut self.out);
            }
            Event::ChangeMembers { ticket, change } => self.on_change_members(ticket, change),
            Event::SnapshotReport { to, delivered } => {
                let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
        }
        self.drive();
        self.update_mode();
        self.advance_membership();
        self.maybe_close_batch();
        self.drive();
        self.retention.maintain(&self.cfg, &mut self.raw, &self.ledger);
        std::mem::take(&mut self.out)
    }

    fn poison(&mut self, failure: LogFailure) {
        let code = failure.code();
        if let Some(flow) = self.membership.take() {
            let result = Err(MembershipError::Stopped(failure.to_string()));
            self.out.push(Effect::MembershipChanged { ticket: flow.ticket, result });
        }
        self.poisoned = Some(failure);
        self.fail_all(code);
        // Nothing queued for peers goes out: the log behind it cannot be trusted.
        self.out.retain(|e| !matches!(e, Effect::Send(_) | Effect::Persist(_)));
    }

    fn on_tick(&mut self, now_ms: u64, wall_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.wall_ms = wall_ms;
        self.elections.maybe_campaign_leader_down(&mut self.raw, self.now_ms, self.ticks);
        if self.now_ms < self.next_tick_ms {
            return;
        }
        // One tick however late we are: after a pause the replica re-synchronises with the
        // cluster instead of firing a burst of elapsed timeouts.
        let late = (self.now_ms - self.next_tick_ms) / self.cfg.tick_ms;
        self.next_tick_ms += (late + 1) * self.cfg.tick_ms;
        self.elections.tick(&mut self.raw);
        self.ticks += 1;
        if self.raw.raft.state == StateRole::Leader
            && self.ticks - self.last_probe_tick >= self.cfg.heartbeat_ticks as u64
        {
            self.last_probe_tick = self.ticks;
            let term = self.raw.raft.term;
            self.raw.read_index(probe_context(term, self.now_ms));
        }
    }

    fn on_submit(&mut self, client: ClientTag, req: Validated) {
        if !self.seq.is_leading() {
            self.refuse_not_leader(client);
            return;
        }
        if self.seq.queued() >= self.queued_max() {
            let why = format!(
                "the leader holds {} requests for batches not yet closed (QUEUED_BATCHES_MAX full batches and a frame); retry",
                self.seq.queued()
            );
            self.reply(client, SubmitReply::Refused(WireError::new(ErrorCode::Overloaded, why)));
            return;
        }
        self.seq.enqueue((req, client), self.now_ms);
        assert!(self.seq.queued() <= self.queued_max(), "the sequencer's queue is bounded");
    }

    /// The most requests the sequencer holds: [`QUEUED_BATCHES_MAX`] batches and one frame.
    fn queued_max(&self) -> usize {
        QUEUED_BATCHES_MAX * self.cfg.batch_requests_max + limits::FRAME_REQUESTS_MAX
    }

    fn on_change_members(&mut self, ticket: u64, change: MemberChange) {
        if self.membership.is_some() {
            self.out.push(Effect::MembershipChanged { ticket, result: Err(MembershipError::Busy) });
            return;
        }
        self.membership = Some(Flow::new(ticket, change, self.now_ms));
    }

    /// Takes the membership change in flight as far as it goes now: proposes what it asks for,
    /// answers it when it is over.
    fn advance_membership(&mut self) {
        let Some(mut flow) = self.membership.take() else { return };
        let node = flow.change().node();
        let raft = &self.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        let progress = raft.prs().get(node).filter(|_| raft.state == StateRole::Leader);
        let view = LeaderView {
            now_ms: self.now_ms,
            id: self.cfg.node_id,
            leading: raft.state == StateRole::Leader,
            ready: self.seq.is_leading(),
            conf: &conf,
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            matched: progress.map_or(0, |p| p.matched),
            snapshotting: progress.is_some_and(|p| p.state == raft::ProgressState::Snapshot),
            conf_pending: raft.has_pending_conf(),
        };
        let result = match flow.step(&view) {
            Step::Wait => {
                self.membership = Some(flow);
                return;
            }
            Step::Answer(result) => result,
            Step::Propose { cc, context } => match self.raw.propose_conf_change(context, cc) {
                Ok(()) => {
                    flow.proposed(self.raw.raft.raft_log.last_index(), self.now_ms);
                    self.membership = Some(flow);
                    return;
                }
                Err(e) => flow.refused(e.to_string()),
            },
        };
        self.out.push(Effect::MembershipChanged { ticket: flow.ticket, result });
    }

    /// A linearizable read: only a leader holding its lease (judged at the read's time) serves
    /// one, at the state its commit index holds; the shell waits for its state to apply that
    /// far, then reads.
    fn on_read(&mut self, client: ClientTag) {
        let leading = self.seq.is_leading();
        let lease_ok = self.lease_until_ms().is_some_and(|t| t > self.now_ms);
        let allowed = if self.cfg.plant == Plant::StaleLeaseRead {
            self.raw.raft.state == StateRole::Leader
        } else {
            leading && lease_ok
        };
        let result = if allowed {
            Ok(self.commit_index())
        } else {
            Err(WireError::new(
                ErrorCode::NotLeader,
                "not the leader (or lease expired); read from the leader or use --stale",
            ))
        };
        self.out.push(Effect::ReadIndex { client, result });
    }

    /// When the lease ends: only a leader with a committed entry of its term has one.
    pub fn lease_until_ms(&self) -> Option<u64> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            return None;
        }
        let committed_in_term = raft.raft_log.term(raft.raft_log.committed).is_ok_and(|t| t == raft.term);
        if !committed_in_term {
            return None;
        }
        let conf = raft.prs().conf().to_conf_state();
        let sets: [&[u64]; 2] = [&conf.voters, &conf.voters_outgoing];
        self.lease.lease_until_ms(&sets, self.cfg.node_id, self.now_ms, self.lease_ms)
    }

    fn on_peer(&mut self, m: Message) {
        let checked = match self.admit(&m) {
            Ok(checked) => checked,
            Err(refusal) => {
                self.out.push(Effect::PeerRefused { from: m.from, refusal });
                return;
            }
        };
        if ignore_vote_while_starting(&m, self.ticks, self.cfg.election_ticks as u64) {
            return;
        }
        self.lease.observe(&m, &self.raw.raft);
        // Kept until the entry commits (or the commit passes an entry that was replaced), at
        // most APPENDED_MAX of them: past that, an entry is decoded again at commit.
        for (index, term, digest, batch) in checked {
            if index > self.raw.raft.raft_log.committed && self.appended.len() < APPENDED_MAX {
                self.appended.insert(index, (term, digest, batch));
            }
        }
        let term = self.raw.raft.term;
        let _ = self.raw.step(m);
        self.elections.after_step(&self.raw, term, self.now_ms);
    }

    /// The peer gate, then what only this replica can judge: every batch an append carries
    /// decodes, belongs to this cluster and follows the chain it would join; a snapshot's state
    /// is one this ledger installs at the snapshot's index. Returns the batches checked.
    fn admit(&self, m: &Message) -> Result<Vec<AppendedBatch>, Refusal> {
        if self.cfg.plant != Plant::NoPeerGate {
            peer_gate::check(&self.raw, self.now_ms, self.elections.term_budget(), m)?;
        }
        match m.get_msg_type() {
            MessageType::MsgAppend => self.admit_batches(m),
            MessageType::MsgSnapshot => {
                let snap = m.get_snapshot();
                if snap.data.is_empty() {
                    return Err(Refusal::Snapshot("no state".into()));
                }
                let index = snap.get_metadata().index;
                self.ledger.check_snapshot(index, &snap.data).map_err(|e| Refusal::Snapshot(e.to_string()))?;
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Decodes and checks each batch of an append. When raft-rs will append it, each batch it
    /// appends must follow the batch before it in the log it joins. raft-rs keeps the entries
    /// this log holds at the same index and term (it compares terms, not bytes) and appends from
    /// the first that differs, so the chain runs through this log's entries up to there (a lying
    /// member may have put others there than the leader's), then through the message's. A batch
    /// that does not follow would stop this replica when it commits (`confirm`'s assertions).
    fn admit_batches(&self, m: &Message) -> Result<Vec<AppendedBatch>, Refusal> {
        let appends = peer_gate::appends(&self.raw, m) && self.cfg.plant != Plant::NoPeerGate;
        let log = &self.raw.raft.raft_log;
        // Whether raft-rs keeps this log's entry at the index reached, and the last index kept.
        let (mut kept, mut kept_to) = (appends, m.index);
        // The link of the last batch appended from the message.
        let mut before: Option<ChainHead> = None;
        let mut checked = Vec::new();
        for e in m.get_entries() {
            kept = kept && log.match_term(e.index, e.term);
            if kept {
                kept_to = e.index;
            }
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            let batch = crate::confirm::decode_checked(&e.data, &self.cfg.cluster_id)
                .map_err(|why| Refusal::Entry { index: e.index, why: why.to_string() })?;
            let header = &batch.entry.header;
            if appends && !kept {
                let prev = before
                    .unwrap_or_else(|| self.retention.link_at_or_below(kept_to, self.ledger.head().index, self.head));
                peer_gate::chain_follows(&prev, header).map_err(|why| Refusal::Entry { index: e.index, why })?;
                before =
                    Some(ChainHead { height: header.height, hash: header.hash(), state_digest: header.state_digest });
            }
            checked.push((e.index, e.term, *blake3::hash(&e.data).as_bytes(), batch));
        }
        Ok(checked)
    }

    /// Handles every pending Ready following raft-rs's rules.
    fn drive(&mut self) {
        while self.poisoned.is_none() && self.raw.has_ready() {
            let mut rd = self.raw.ready();
            self.send(rd.take_messages());
            let mut persist = Persist { sync: self.cfg.plant != Plant::SkipFsync, ..Persist::default() };
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                if let Err(e) = self.install_snapshot(&snap) {
                    self.poison(e.into_failure().during("snapshot install"));
                    return;
                }
                persist.snapshot = Some(snap);
            }
            let committed = rd.take_committed_entries();
            self.apply_committed(committed);
            if self.poisoned.is_some() {
                return;
            }
            if !rd.entries().is_empty() {
                self.raw.mut_store().mem.wl().append(rd.entries()).expect("entries follow the in-memory log");
                self.retention.note_appended(rd.entries());
                persist.entries = rd.entries().to_vec();
            }
            if let Some(hs) = rd.hs() {
                self.raw.mut_store().mem.wl().set_hardstate(hs.clone());
                persist.hard_state = Some(hs.clone());
            }
            if persist.snapshot.is_some() || !persist.entries.is_empty() || persist.hard_state.is_some() {
                self.out.push(Effect::Persist(persist));
            }
            let _ = rd.take_read_states(); // lease probes: their acks were taken when stepped
            self.send(rd.take_persisted_messages());
            let mut light = self.raw.advance(rd);
            if let Some(c) = light.commit_index() {
                self.raw.mut_store().mem.wl().mut_hard_state().commit = c;
            }
            self.send(light.take_messages());
            let committed = light.take_committed_entries();
            self.apply_committed(committed);
            self.raw.advance_apply();
            // A snapshot handed to the shell counts as sent: raft-rs then probes the follower
            // and sends another if this one was lost. Without the report it waits for this one
            // forever (found by the simulator, seed 206408: a lost snapshot stalled the cluster).
            for to in std::mem::take(&mut self.snapshots_sent) {
                if !self.cfg.snapshot_reports_by_shell {
                    self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
                }
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent.push(m.to);
            }
            self.out.push(Effect::Send(m));
        }
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), InstallError> {
        let meta = snap.get_metadata();
        let conf = meta.get_conf_state().write_to_bytes().expect("a conf state encodes");
        self.ledger.install(meta.index, meta.term, conf, &snap.data)?;
        self.raw.mut_store().mem.wl().apply_snapshot(snap.clone())?;
        self.retention.clear();
        // The state installed is the one the peer gate checked at this index (`admit`), and
        // the log goes on right after it.
        let h = self.ledger.head();
        assert_eq!(h.index, meta.index, "the installed state stands at the snapshot's index");
        assert_eq!(h.term, meta.term, "the installed state stands at the snapshot's term");
        assert_eq!(self.raw.store().mem.first_index()?, h.index + 1, "the log goes on after the snapshot");
        self.head = ChainHead { height: h.height, hash: h.header_hash, state_digest: h.state_digest };
        self.seq.seen = unexpired_seen(&self.ledger);
        self.seq.view.reset();
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if self.poisoned.is_some() {
                return;
            }
            if e.index <= self.ledger.head().index {
                continue; // applied before a restart or covered by a snapshot
            }
            let r = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => self.ledger.apply_noop(e.index, e.term),
                EntryType::EntryNormal => {
                    self.confirm_batch(&e);
                    continue;
                }
                EntryType::EntryConfChange => {
                    let cc = raft::eraftpb::ConfChange::parse_from_bytes(&e.data)
                        .expect("conf changes were checked before they were appended");
                    let applied = self.raw.apply_conf_change(&cc);
                    self.on_conf_committed(&e, applied, Some((cc.node_id, cc.get_change_type())))
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .expect("conf changes were checked before they were appended");
                    let applied = self.raw.apply_conf_change(&cc);
                    let single = match cc.get_changes() {
                        [c] => Some((c.node_id, c.get_change_type())),
                        _ => None,
                    };
                    self.on_conf_committed(&e, applied, single)
                }
            };
            if let Err(err) = r {
                self.poison(err.into_failure());
            }
        }
    }

    /// A committed conf change: applied, or skipped as a no-op where raft-rs refuses it (the
    /// leader only proposes changes that apply; a lying member could get another committed, and
    /// every replica then skips it alike).
    fn on_conf_committed(
        &mut self,
        e: &Entry,
        applied: Result<ConfState, raft::Error>,
        single: Option<(u64, raft::eraftpb::ConfChangeType)>,
    ) -> Result<(), crate::ledger::LedgerError> {
        match applied {
            Ok(cs) => {
                self.raw.mut_store().mem.wl().set_conf_state(cs.clone());
                let last = step_down_if_removed(&mut self.raw);
                self.send(last);
                let bytes = cs.write_to_bytes().expect("a conf state encodes");
                self.out.push(Effect::Reconfigured {
                    index: e.index,
                    conf_state: cs,
                    context: e.context.to_vec(),
                    single,
                });
                self.ledger.apply_conf(e.index, e.term, bytes)
            }
            Err(why) => {
                self.out.push(Effect::ConfChangeSkipped { index: e.index, why: why.to_string() });
                self.ledger.apply_noop(e.index, e.term)
            }
        }
    }

    /// The voters of the configuration raft-rs is in now.
    pub fn voters(&self) -> Vec<u64> {
        self.raw.raft.prs().conf().to_conf_state().voters
    }

    fn majority(&self) -> u8 {
        u8::try_from(self.voters().len() / 2 + 1).unwrap_or(u8::MAX)
    }

    /// Stages 6 and 7 for one committed batch. The batch is decoded and checked once per
    /// replica: the leader uses the batch it built (same header hash, so same content), a
    /// follower the one it checked when the entry was appended (same index, term and bytes).
    fn confirm_batch(&mut self, e: &Entry) {
        // The header leads the entry's encoding: read alone, it says whether this is a batch
        // built here, without decoding the requests.
        let header = <BatchHeader as borsh::BorshDeserialize>::deserialize(&mut &e.data[..])
            .expect("a committed entry is a batch this cluster encoded");
        let height = header.height;
        let header_hash = header.hash();
        let built_here = self.seq.pending.batches.get(&height).map(|b| b.header_hash);
        let (mine, lost) = match built_here {
            Some(h) if h == header_hash => (self.seq.pending.take(height), Vec::new()),
            // A pending batch at this height with another hash was built on a chain that lost.
            Some(_) => (None, self.seq.pending.drain()),
            None => (None, Vec::new()),
        };
        let appended = if mine.is_some() { None } else { self.take_appended(e) };
        // Signed only once the chain checks passed (`confirm` stops the replica otherwise).
        let signature;
        let batch = if let Some(mut b) = mine {
            let confirmed = confirm(&mut self.head, &b.entry, &b.ids, &self.cfg.cluster_id, true);
            assert_eq!(confirmed, header_hash, "the batch built here is the one committed");
            signature = header.sign(&self.operator_key);
            for (leaf, id) in b.ids.iter().enumerate() {
                self.seq.seen.insert(*id, b.entry.location(leaf));
            }
            self.answer(&mut b, &signature);
            let PendingBatch { entry, ids, .. } = b;
            Committed { entry: Arc::new(entry), ids: Arc::new(ids) }
        } else {
            let checked = appended.is_some();
            let batch = appended.unwrap_or_else(|| {
                Committed::new(
                    decode(&e.data, limits::ENTRY_BYTES_MAX)
                        .expect("a committed entry is a batch this cluster encoded"),
                )
            });
            confirm(&mut self.head, &batch.entry, &batch.ids, &self.cfg.cluster_id, checked);
            signature = header.sign(&self.operator_key);
            for (id, loc) in batch.locations() {
                self.seq.seen.insert(id, loc);
            }
            batch
        };
        self.seq.seen.prune(header.time_ms);
        for b in lost {
            self.fail_batch(b, ErrorCode::Retry);
        }
        if let Err(err) = self.ledger.apply_batch(e.index, e.term, &batch, &signature) {
            self.poison(err.into_failure());
            return;
        }
        self.seq.view.on_applied(height);
        if self.cfg.plant != Plant::SignBeforeCommit {
            self.out.push(Effect::Signed { header, signature });
        }
    }

    /// The batch checked when entry `e` was appended, if these are the bytes that were checked
    /// (entries an older leader sent at this index are dropped as the commit passes them).
    fn take_appended(&mut self, e: &Entry) -> Option<Committed> {
        let later = self.appended.split_off(&(e.index + 1));
        let this = std::mem::replace(&mut self.appended, later).remove(&e.index)?;
        (this.0 == e.term && this.1 == *blake3::hash(&e.data).as_bytes()).then_some(this.2)
    }

    fn answer(&mut self, b: &mut PendingBatch<ClientTag>, signature: &Signature) {
        let durable = self.majority();
        for (leaf, waiters) in std::mem::take(&mut b.waiters).into_iter().enumerate() {
            if waiters.is_empty() {
                continue;
            }
            let receipt = b.receipt(leaf, signature);
            for w in waiters {
                self.reply(w, SubmitReply::Committed { receipt: Box::new(receipt.clone()), durable_replicas: durable });
            }
        }
    }

    fn reply(&mut self, client: ClientTag, reply: SubmitReply) {
        self.out.push(Effect::Reply { client, reply });
    }

    fn refuse(&mut self, client: ClientTag, code: ErrorCode) {
        if code == ErrorCode::NotLeader {
            self.refuse_not_leader(client);
        } else {
            self.reply(client, SubmitReply::Refused(WireError::from_code(code)));
        }
    }

    fn refuse_not_leader(&mut self, client: ClientTag) {
        let mut e = WireError::from_code(ErrorCode::NotLeader);
        e.leader_hint = self.leader_id().filter(|l| *l != self.cfg.node_id).map(|l| l.to_string());
        self.reply(client, SubmitReply::Refused(e));
    }

    fn fail_batch(&mut self, b: PendingBatch<ClientTag>, code: ErrorCode) {
        for waiters in b.waiters {
            for w in waiters {
                self.refuse(w, code);
            }
        }
    }

    /// Answers every waiting request (pending batches and the queue) with `code`.
    fn fail_all(&mut self, code: ErrorCode) {
        for b in self.seq.pending.drain() {
            self.fail_batch(b, code);
        }
        for client in self.seq.take_queued() {
            self.refuse(client, code);
        }
    }

    /// Drops speculative state when leadership is lost; takes up the chain once every entry
    /// before this term (up to its no-op) is applied.
    fn update_mode(&mut self) {
        let raft = &self.raw.raft;
        let is_leader = raft.state == StateRole::Leader;
        let term = raft.term;
        if is_leader && self.leader_term != term {
            self.leader_term = term;
            self.lease.reset(term);
            self.term_start_index = term_start(&self.raw);
        }
        match self.seq.mode {
            Mode::Leading { term: t, .. } if is_leader && t == term => {}
            Mode::Leading { .. } => {
                self.fail_all(ErrorCode::Retry);
                self.seq.view.reset();
                self.seq.mode = Mode::Following;
            }
            Mode::Following if is_leader && self.ledger.head().index >= self.term_start_index => {
                for b in self.seq.pending.drain() {
                    self.fail_batch(b, ErrorCode::Retry);
                }
                self.seq.view.reset();
                self.seq.view.load_leases(self.ledger.leases());
                let a = self.ledger.head();
                self.seq.mode = Mode::Leading {
                    term,
                    tip: Tip {
                        height: a.height,
                        hash: a.header_hash,
                        state_digest: a.state_digest,
                        time_ms: a.time_ms,
                    },
                };
            }
            Mode::Following => {
                for client in self.seq.take_queued() {
                    self.refuse_not_leader(client);
                }
            }
        }
    }

    /// Stages 3 to 5 for the next batch, when its interval has passed or it is full.
    fn maybe_close_batch(&mut self) {
        let Mode::Leading { term, mut tip } = self.seq.mode else { return };
        let cfg = &self.cfg;
        let due = self.seq.batch_due(self.now_ms, self.wall_ms, cfg.batch_interval_ms, cfg.batch_requests_max);
        if !due || self.seq.pending.len() >= BATCHES_IN_FLIGHT_MAX {
            return;
        }
        let subs = self.take_batch(&tip);
        let ctx = BatchContext { cluster_id: self.cfg.cluster_id, tables: &self.tables, term, wall_ms: self.wall_ms };
        let mut refused = Vec::new();
        let batch =
            execute_batch(&ctx, &mut self.seq.view, &mut LedgerBacking(&self.ledger), &mut tip, subs, |c, code| {
                refused.push((c, code))
            });
        for (c, code) in refused {
            self.refuse(c, code);
        }
        let Some(batch) = batch else { return };
        self.propose(batch, term, tip);
    }

    /// The requests of the batch that closes, through stage 3 ([`Sequencer::optimistic`]); the
    /// others are answered here.
    fn take_batch(&mut self, tip: &Tip) -> Vec<Submission> {
        let time_ms = batch_time(self.wall_ms, tip);
        let Intake { subs, too_large, expired } = self.seq.take_batch(self.cfg.batch_bytes_max, self.now_ms, time_ms);
        for c in too_large {
            self.refuse(c, ErrorCode::ProposalTooLarge);
        }
        for c in expired {
            self.refuse(c, ErrorCode::Expired);
        }
        let (subs, answers) = self.seq.optimistic(subs, &self.ledger);
        for (client, verdict) in answers {
            match verdict {
                Verdict::Receipt(receipt) => {
                    let durable_replicas = self.majority();
                    self.reply(client, SubmitReply::Committed { receipt, durable_replicas });
                }
                Verdict::Refused(code) => self.refuse(client, code),
            }
        }
        subs
    }

    /// Stage 5: proposes `batch` (built on the chain `tip` now ends with) to raft-rs, and
    /// registers it and its waiters in `Pending` before raft-rs runs again, so that its commit
    /// finds them.
    fn propose(&mut self, mut batch: PendingBatch<ClientTag>, term: u64, tip: Tip) {
        // Handed to raft-rs: a batch of this term at the tip. Checked again when it comes back
        // committed (`confirm_batch`).
        assert_eq!(batch.entry.header.term, term, "a batch is built for the term it is proposed in");
        assert_eq!(batch.header_hash, tip.hash, "the sequencer's tip is the batch proposed");
        let data = encode(&batch.entry);
        let proposed =
            Effect::Proposed { height: batch.entry.header.height, requests: batch.ids.len(), bytes: data.len() };
        let refused = if std::mem::take(&mut self.refuse_next_proposal) {
            Err(raft::Error::ProposalDropped)
        } else {
            self.raw.propose(Vec::new(), data)
        };
        if let Err(e) = refused {
            // A leader's proposal is refused only by a bug (tally never transfers leadership
            // and sets no uncommitted-size limit). The batches in flight hold the next heights:
            // building on the applied head again would reuse a height, so the replica ends and
            // a backup takes over.
            panic!("a batch proposal refused in term {term} while leading: {e}");
        }
        assert_eq!(self.raw.raft.raft_log.last_term(), term, "the batch joins the log in its term");
        self.seq.mode = Mode::Leading { term, tip };
        self.out.push(proposed);
        self.plant_before_commit(&mut batch);
        self.seq.pending.insert(batch);
    }

    /// The planted bugs that answer or sign a batch when it is proposed, not when it commits.
    fn plant_before_commit(&mut self, batch: &mut PendingBatch<ClientTag>) {
        match self.cfg.plant {
            Plant::AckBeforeCommit => {
                let signature = batch.entry.header.sign(&self.operator_key);
                let waiters = std::mem::replace(&mut batch.waiters, vec![Vec::new(); batch.ids.len()]);
                let mut early = PendingBatch {
                    entry: batch.entry.clone(),
                    header_hash: batch.header_hash,
                    tree: tally_codec::merkle::Tree::from_leaves(&batch.entry.leaves()),
                    ids: batch.ids.clone(),
                    waiters,
                };
                self.answer(&mut early, &signature);
            }
            Plant::SignBeforeCommit => {
                let signature = batch.entry.header.sign(&self.operator_key);
                self.out.push(Effect::Signed { header: batch.entry.header.clone(), signature });
            }
            _ => {}
        }
    }
}

/// What elections read of the replica's configuration.
fn election_settings(cfg: &ReplicaConfig) -> ElectionSettings {
    ElectionSettings {
        node_id: cfg.node_id,
        tick_ms: cfg.tick_ms,
        election_ticks: cfg.election_ticks as u64,
        heartbeat_ticks: cfg.heartbeat_ticks as u64,
        campaign_on_leader_down: cfg.campaign_on_leader_down,
    }
}

/// A leader that just applied a configuration without itself steps down. raft-rs leaves it
/// leading (`post_conf_change`: "untested at the time of writing"), and the next response from a
/// follower then panics in `maybe_commit`, which looks up the leader's own progress (found by the
/// simulator). It steps down in the same term with no leader; not being a voter, it never
/// campaigns again.
#[must_use = "the last appends must be sent"]
pub fn step_down_if_removed<S: Storage>(raw: &mut RawNode<S>) -> Vec<Message> {
    let raft = &mut raw.raft;
    if raft.state != StateRole::Leader || raft.prs().conf().voters().contains(raft.id) {
        return Vec::new();
    }
    // The others learn that the change committed from a last append (they apply it, and a
    // revocation of this node's certificate cuts it off at once, which they see as their leader
    // going down); nobody would tell them until a new leader's first commit. Taken out of
    // raft-rs at once: a follower may have no messages of its own left when the ready advances.
    raft.bcast_append();
    let last = std::mem::take(&mut raft.msgs);
    let term = raft.term;
    raft.become_follower(term, raft::INVALID_ID);
    last
}

/// Index of the leader's first entry of its current term (its no-op).
pub fn term_start<S: Storage>(raw: &RawNode<S>) -> u64 {
    let log = &raw.raft.raft_log;
    let term = raw.raft.term;
    let mut i = log.last_index();
    while i > log.first_index() && log.term(i - 1).is_ok_and(|t| t == term) {
        i -= 1;
    }
    assert!(log.term(i).is_ok_and(|t| t == term), "a new leader's log ends with an entry of its term");
    i
}
