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

use crate::confirm::{confirm, ChainHead};
use crate::lease::{ignore_vote_while_starting, lease_duration_ms, probe_context, LeaseTracker};
use crate::ledger::{Ledger, LedgerHead};
use crate::log::CoreLog;
use crate::membership::{Flow, LeaderView, MemberChange, MembershipError, Step};
use crate::peer_gate::{self, Refusal};
use crate::pending::{Pending, PendingBatch};
use crate::sequence::{
    batch_time, drop_expired, execute_batch, split_by_bytes, BatchContext, Tip, BATCHES_IN_FLIGHT_MAX,
};
use crate::state::{Backing, BatchWrites, SeenIds, View};
use crate::{LogFailure, Plant, Validated};
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RawNode, StateRole, Storage};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use tally_codec::wire::{SubmitReply, WireError};
use tally_codec::{
    decode, encode, limits, BatchHeader, ClusterId, Committed, DocKey, DocMeta, ErrorCode, Operation, PublicKey,
    Signature, Tables,
};

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
    /// A membership change ([`crate::membership`]); leader only, one at a time. Its `context`
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
    /// A peer's message was refused before raft-rs saw it ([`crate::peer_gate`]): the shell
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

/// The log a restarting replica finds on its disk, in the order it was written.
#[derive(Debug, Default)]
pub struct RestoredLog {
    pub records: Vec<Persist>,
}

/// Leadership as the sequencer last saw it.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Following,
    Leading { term: u64, tip: Tip },
}

/// Stages 3 and 4: what the leader has accepted and not yet committed.
struct Sequencer {
    mode: Mode,
    view: View,
    /// Requests waiting for the next batch, and when the first of them arrived.
    queue: Vec<(Validated, ClientTag)>,
    opened_ms: Option<u64>,
    pending: Pending<ClientTag>,
    /// Ids executed and committed, until their expiry.
    seen: SeenIds,
}

/// One replica.
pub struct Replica<L: Ledger> {
    cfg: ReplicaConfig,
    tables: Tables,
    raw: RawNode<CoreLog>,
    ledger: L,
    operator_key: ed25519_dalek::SigningKey,
    rng: ChaCha20Rng,
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
    /// Data bytes of each entry in the in-memory log, and their sum (for `log_retain_bytes`).
    entry_bytes: std::collections::BTreeMap<u64, u64>,
    entry_bytes_total: u64,
    /// A test hook: the next batch proposal is refused as if raft-rs had dropped it.
    refuse_next_proposal: bool,
    /// Campaigns counted (see [`Status`]), and the role and term they were judged from.
    pre_vote_campaigns: u64,
    vote_campaigns: u64,
    seen_role: StateRole,
    seen_term: u64,
    /// Batches checked when their entries were appended, by log index: `(term, blake3 of the
    /// entry's bytes, batch)`. Only entries above the commit index are kept.
    appended: BTreeMap<u64, (u64, [u8; 32], Committed)>,
    /// The chain link (height, header hash, state digest) of every batch in the log above the
    /// applied index, by log index: what an appended batch must follow.
    batch_links: BTreeMap<u64, ChainHead>,
    /// How far peers may still move the term ([`peer_gate::TermBudget`]).
    term_budget: peer_gate::TermBudget,
    /// When this follower campaigns because its leader is down (see [`Event::PeerDown`]).
    campaign_at_ms: Option<u64>,
    /// Campaigns for a dead leader stop at this time (the election timeout takes over).
    leader_down_until_ms: u64,
    /// Campaigns started because the leader was reported down.
    leader_down_campaigns: u64,
    /// The membership change in flight.
    membership: Option<Flow>,
    out: Vec<Effect>,
}

/// A batch checked when its append arrived: `(index, term, blake3 of the entry's bytes, batch)`.
type AppendedBatch = (u64, u64, [u8; 32], Committed);

/// Reads the sequencer's cache misses from the ledger.
struct LedgerBacking<'a, L>(&'a L);

impl<L: Ledger> Backing for LedgerBacking<'_, L> {
    fn balance(&mut self, account: &PublicKey) -> Option<u64> {
        self.0.balance(account)
    }
    fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta> {
        self.0.doc_meta(key)
    }
    fn lease(&mut self, id: u64) -> Option<tally_codec::LeaseMeta> {
        self.0.lease(id)
    }
    fn claim(&mut self, domain: &str, slot: u64) -> Option<tally_codec::ClaimMeta> {
        self.0.claim(domain, slot)
    }
    fn claims(&mut self, keys: &[(String, u64)]) -> Vec<Option<tally_codec::ClaimMeta>> {
        self.0.claims(keys)
    }
}

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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the log on disk is not a log this replica wrote: {0}")]
    Log(String),
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
        // The configuration as of the durable ledger; conf changes after it replay from the log.
        let conf = match ledger.conf_state() {
            Some(bytes) => ConfState::parse_from_bytes(&bytes)
                .map_err(|e| StartError::Log(format!("the ledger's configuration does not decode: {e}")))?,
            // A node waiting to be added (a new cluster's ledger holds its first configuration:
            // `ledger::bootstrap`).
            None => ConfState::default(),
        };
        let storage = MemStorage::new_with_conf_state(conf);
        // The durable ledger stands in for the log up to its applied index: those entries are
        // applied, and the log on disk may not hold them any more (or may have lost its unsynced
        // tail after the state was made durable).
        let applied = ledger.head();
        if applied.index > 0 {
            let mut snap = Snapshot::default();
            let meta = snap.mut_metadata();
            meta.index = applied.index;
            meta.term = applied.term.max(1);
            meta.set_conf_state(storage.initial_state()?.conf_state);
            storage.wl().apply_snapshot(snap).map_err(|e| StartError::Log(format!("ledger marker: {e}")))?;
        }
        // The surviving log as written, below the applied index too (see below).
        let mut written: Vec<Entry> = Vec::new();
        for p in &log.records {
            if p.snapshot.is_some() {
                written.clear();
            }
            if let Some(first) = p.entries.first() {
                written.retain(|e| e.index < first.index);
                if written.last().is_some_and(|e| e.index + 1 != first.index) {
                    written.clear();
                }
                written.extend(p.entries.iter().cloned());
            }
        }
        let mut hs = HardState::default();
        for p in log.records {
            let covered = storage.first_index()? - 1;
            if let Some(s) = p.snapshot {
                if s.get_metadata().index > covered {
                    return Err(StartError::Log(format!(
                        "a snapshot at {} is ahead of the durable state at {covered}",
                        s.get_metadata().index
                    )));
                }
            }
            let entries: Vec<Entry> = p.entries.into_iter().filter(|e| e.index > covered).collect();
            if let Some(first) = entries.first() {
                let last = storage.last_index()?;
                if first.index > last + 1 {
                    return Err(StartError::Log(format!(
                        "entries from {} follow the log's last index {last}",
                        first.index
                    )));
                }
                storage.wl().append(&entries).map_err(|e| StartError::Log(format!("entries: {e}")))?;
            }
            if let Some(h) = p.hard_state {
                hs = h;
            }
        }
        hs.commit = hs.commit.max(applied.index).min(storage.last_index()?);
        // Entries the ledger already applied stay in the log when the disk still holds them and
        // they end exactly at the applied entry: a follower that lags a little behind a
        // restarted leader then catches up from the log, not from a snapshot.
        let applied_tail: Vec<Entry> = written.into_iter().filter(|e| e.index <= applied.index).collect();
        let storage = match applied_tail.last() {
            Some(last) if applied_tail.len() > 1 && last.index == applied.index && last.term == applied.term => {
                let conf = storage.initial_state()?.conf_state;
                let last = storage.last_index()?;
                let above = if last > applied.index {
                    storage.entries(applied.index + 1, last + 1, None, GetEntriesContext::empty(false))?
                } else {
                    Vec::new()
                };
                let longer = MemStorage::new_with_conf_state(conf.clone());
                let mut snap = Snapshot::default();
                let meta = snap.mut_metadata();
                meta.index = applied_tail[0].index;
                meta.term = applied_tail[0].term;
                meta.set_conf_state(conf);
                longer.wl().apply_snapshot(snap).map_err(|e| StartError::Log(format!("log marker: {e}")))?;
                longer.wl().append(&applied_tail[1..]).map_err(|e| StartError::Log(format!("entries: {e}")))?;
                longer.wl().append(&above).map_err(|e| StartError::Log(format!("entries: {e}")))?;
                longer
            }
            _ => storage,
        };
        storage.wl().set_hardstate(hs);
        let storage = CoreLog::new(storage);
        let applied = ledger.head().index;
        let raft_cfg = raft::Config {
            id: cfg.node_id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let mut entry_bytes = std::collections::BTreeMap::new();
        let mut batch_links = BTreeMap::new();
        let (first, last) = (storage.first_index()?, storage.last_index()?);
        if last >= first {
            for e in storage.entries(first, last + 1, None, GetEntriesContext::empty(false))? {
                entry_bytes.insert(e.index, entry_size(&e));
                if let Some(link) = batch_link(&e) {
                    batch_links.insert(e.index, link);
                }
            }
        }
        let entry_bytes_total = entry_bytes.values().sum();
        let raw = RawNode::new(&raft_cfg, storage, logger)?;
        let head = ledger.head();
        // Ids are forgotten by the chain's clock (header time, which never goes back), never by
        // this replica's wall clock: with a wall clock ahead of the chain, a restart would forget
        // ids a later batch, built after the clock stepped back, still takes as live (found by
        // the simulator, seed 207739).
        let mut seen = SeenIds::default();
        for (id, loc) in ledger.unexpired_ids(ledger.head().time_ms) {
            seen.insert(id, loc);
        }
        let lease_ms = lease_duration_ms(cfg.tick_ms, cfg.election_ticks as u64);
        Ok(Replica {
            tables: Tables::v1(),
            raw,
            operator_key: cfg.operator_key.clone(),
            rng: ChaCha20Rng::seed_from_u64(cfg.election_seed),
            seq: Sequencer {
                mode: Mode::Following,
                view: View::default(),
                queue: Vec::new(),
                opened_ms: None,
                pending: Pending::default(),
                seen,
            },
            head: ChainHead { height: head.height, hash: head.header_hash, state_digest: head.state_digest },
            ledger,
            lease: LeaseTracker::default(),
            lease_ms,
            leader_term: 0,
            term_start_index: 0,
            now_ms,
            wall_ms,
            next_tick_ms: now_ms + cfg.tick_ms,
            ticks: 0,
            last_probe_tick: 0,
            poisoned: None,
            snapshots_sent: Vec::new(),
            entry_bytes,
            entry_bytes_total,
            refuse_next_proposal: false,
            pre_vote_campaigns: 0,
            campaign_at_ms: None,
            appended: BTreeMap::new(),
            batch_links,
            term_budget: peer_gate::TermBudget::new(now_ms),
            leader_down_until_ms: 0,
            leader_down_campaigns: 0,
            membership: None,
            vote_campaigns: 0,
            seen_role: StateRole::Follower,
            seen_term: 0,
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
    pub fn ledger_mut(&mut self) -> &mut L {
        &mut self.ledger
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

    /// Whether the sequencer takes requests (leading, with everything before its term applied),
    /// and how many are queued and in flight.
    pub fn sequencer_state(&self) -> (bool, usize, usize) {
        (matches!(self.seq.mode, Mode::Leading { .. }), self.seq.queue.len(), self.seq.pending.len())
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
            sequencing: matches!(self.seq.mode, Mode::Leading { .. }),
            poisoned: self.poisoned.clone(),
            first_index: raft.raft_log.first_index(),
            pre_vote_campaigns: self.pre_vote_campaigns,
            vote_campaigns: self.vote_campaigns,
            leader_down_campaigns: self.leader_down_campaigns,
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
        match self.seq.opened_ms {
            Some(opened) if matches!(self.seq.mode, Mode::Leading { .. }) => {
                self.next_tick_ms.min(opened + self.cfg.batch_interval_ms)
            }
            _ => self.next_tick_ms,
        }
        .min(self.campaign_at_ms.unwrap_or(u64::MAX))
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
        match event {
            Event::Tick { now_ms, wall_ms } => self.on_tick(now_ms, wall_ms),
            Event::Submit { client, req } => self.on_submit(client, req),
            Event::Read { client, now_ms } => {
                self.now_ms = self.now_ms.max(now_ms);
                self.on_read(client)
            }
            Event::Peer(m) => self.on_peer(m),
            Event::PeerDown(id) => self.on_peer_down(id),
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
        self.maintain_log();
        std::mem::take(&mut self.out)
    }

    /// Builds a snapshot raft-rs asked for, and forgets log entries far behind the applied
    /// index (the shell's disk keeps them until the ledger is durable past them).
    fn maintain_log(&mut self) {
        let head = self.ledger.head();
        self.batch_links = self.batch_links.split_off(&(head.index + 1));
        let wanted = self.raw.store().snapshot_wanted();
        if wanted > 0 && head.index > 0 {
            if let Some(exported) = self.ledger.export(wanted) {
                let mut snap = Snapshot::default();
                snap.data = exported.data.into();
                let meta = snap.mut_metadata();
                meta.index = exported.index;
                meta.term = exported.term;
                meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
                self.raw.store().prepare_snapshot(snap);
            }
        }
        let first = self.raw.raft.raft_log.first_index();
        let limit = head.index.min(self.raw.raft.raft_log.applied);
        // The first entry to keep.
        let mut keep_from = limit.saturating_sub(self.cfg.log_retain_entries);
        let mut due = keep_from > first + self.cfg.log_retain_entries / 4;
        if self.entry_bytes_total > self.cfg.log_retain_bytes {
            // Over the byte bound: drop the oldest entries until under it, never past applied.
            let mut total = self.entry_bytes_total;
            for (i, b) in &self.entry_bytes {
                if total <= self.cfg.log_retain_bytes || *i >= limit {
                    break;
                }
                total -= b;
                keep_from = keep_from.max(i + 1);
            }
            due |= keep_from > first;
        }
        if due && keep_from > first {
            self.raw.mut_store().mem.wl().compact(keep_from).expect("compaction behind the applied index");
            let kept = self.entry_bytes.split_off(&keep_from);
            let dropped = std::mem::replace(&mut self.entry_bytes, kept);
            self.entry_bytes_total -= dropped.values().sum::<u64>();
        }
    }

    /// Records the sizes of entries appended to the in-memory log (a conflicting suffix is
    /// replaced).
    fn note_appended(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let replaced = self.entry_bytes.split_off(&first.index);
        self.entry_bytes_total -= replaced.values().sum::<u64>();
        drop(self.batch_links.split_off(&first.index));
        for e in entries {
            let b = entry_size(e);
            self.entry_bytes.insert(e.index, b);
            self.entry_bytes_total += b;
            if let Some(link) = batch_link(e) {
                self.batch_links.insert(e.index, link);
            }
        }
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

    /// A follower whose leader is down forgets it, so that it and the other followers grant
    /// pre-votes at once (raft-rs counts a follower that knows a leader as inside that leader's
    /// lease), and campaigns after a random part of one heartbeat interval, so that two
    /// followers that both saw it rarely split the vote. Until a leader is known, or one election
    /// timeout has passed, it campaigns again every one to two heartbeat intervals: the other
    /// follower may learn of the death a little later and ignore the first pre-vote, or both may
    /// have campaigned at once and split the vote.
    fn on_peer_down(&mut self, id: u64) {
        let raft = &mut self.raw.raft;
        if !self.cfg.campaign_on_leader_down
            || raft.state != StateRole::Follower
            || raft.leader_id != id
            || id == self.cfg.node_id
        {
            return;
        }
        raft.leader_id = raft::INVALID_ID;
        let at = self.now_ms + self.rng.next_u64() % self.heartbeat_ms();
        self.campaign_at_ms = Some(at);
        self.leader_down_until_ms = self.now_ms + self.cfg.tick_ms * self.cfg.election_ticks as u64;
    }

    fn heartbeat_ms(&self) -> u64 {
        (self.cfg.tick_ms * self.cfg.heartbeat_ticks as u64).max(1)
    }

    /// Campaigns if the leader-down timer is due and no leader was heard of since.
    fn maybe_campaign_leader_down(&mut self) {
        let Some(at) = self.campaign_at_ms else { return };
        let raft = &self.raw.raft;
        // A candidate that split the vote with the other follower tries again too.
        let waiting = matches!(raft.state, StateRole::Follower | StateRole::PreCandidate | StateRole::Candidate);
        if !waiting || raft.leader_id != raft::INVALID_ID || self.now_ms >= self.leader_down_until_ms {
            self.campaign_at_ms = None; // a leader (new or old) was heard of, or it is too late
            return;
        }
        if self.now_ms < at {
            return;
        }
        let hb = self.heartbeat_ms();
        self.campaign_at_ms = Some(self.now_ms + hb + self.rng.next_u64() % hb);
        if raft.promotable() && self.ticks >= self.cfg.election_ticks as u64 {
            self.leader_down_campaigns += 1;
            let _ = self.raw.campaign();
            self.count_campaigns();
        }
    }

    fn on_tick(&mut self, now_ms: u64, wall_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.wall_ms = wall_ms;
        self.maybe_campaign_leader_down();
        if self.now_ms < self.next_tick_ms {
            return;
        }
        // One tick however late we are: after a pause the replica re-synchronises with the
        // cluster instead of firing a burst of elapsed timeouts.
        let late = (self.now_ms - self.next_tick_ms) / self.cfg.tick_ms;
        self.next_tick_ms += (late + 1) * self.cfg.tick_ms;
        if self.raw.raft.election_elapsed == 0 {
            // raft-rs draws election timeouts from the thread RNG on reset; the seeded one
            // decides instead (only `tick_election` reads the value).
            let span = self.cfg.election_ticks as u64;
            let t = self.cfg.election_ticks as u64 + self.rng.next_u64() % span;
            self.raw.raft.set_randomized_election_timeout(t as usize);
        }
        self.raw.tick();
        // A pre-candidate whose election timed out campaigns again in the same role.
        let raft = &self.raw.raft;
        if raft.state == StateRole::PreCandidate && raft.election_elapsed == 0 {
            self.pre_vote_campaigns += 1;
            self.seen_role = StateRole::PreCandidate;
        }
        self.count_campaigns();
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
        if !matches!(self.seq.mode, Mode::Leading { .. }) {
            self.refuse_not_leader(client);
            return;
        }
        if self.seq.queue.is_empty() {
            self.seq.opened_ms = Some(self.now_ms);
        }
        self.seq.queue.push((req, client));
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
            ready: matches!(self.seq.mode, Mode::Leading { .. }),
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
        let leading = matches!(self.seq.mode, Mode::Leading { .. });
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
        let jump = self.raw.raft.term.saturating_sub(term);
        if jump > 0 {
            self.term_budget.spend(jump, self.now_ms);
        }
        self.count_campaigns();
    }

    /// The peer gate, then what only this replica can judge: every batch an append carries
    /// decodes, belongs to this cluster and follows the chain it would join; a snapshot's state
    /// is one this ledger installs at the snapshot's index. Returns the batches checked.
    fn admit(&self, m: &Message) -> Result<Vec<AppendedBatch>, Refusal> {
        if self.cfg.plant != Plant::NoPeerGate {
            peer_gate::check(&self.raw, self.now_ms, &self.term_budget, m)?;
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
                let prev = before.unwrap_or_else(|| self.link_at_or_below(kept_to));
                peer_gate::chain_follows(&prev, header).map_err(|why| Refusal::Entry { index: e.index, why })?;
                before =
                    Some(ChainHead { height: header.height, hash: header.hash(), state_digest: header.state_digest });
            }
            checked.push((e.index, e.term, *blake3::hash(&e.data).as_bytes(), batch));
        }
        Ok(checked)
    }

    /// The chain link of the last batch in this log at or below `index`: a batch above the
    /// applied index, or the applied head.
    fn link_at_or_below(&self, index: u64) -> ChainHead {
        let applied = self.ledger.head().index;
        if index <= applied {
            return self.head;
        }
        match self.batch_links.range(applied + 1..=index).next_back() {
            Some((_, link)) => *link,
            None => self.head,
        }
    }

    /// Counts the campaigns this replica starts (checked after every tick and step).
    fn count_campaigns(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != self.seen_role {
            if raft.state == StateRole::PreCandidate {
                self.pre_vote_campaigns += 1;
            }
            self.seen_role = raft.state;
        }
        if raft.term > self.seen_term {
            // A vote campaign bumps the term and votes for itself, even when it wins at once.
            if raft.vote == self.cfg.node_id && matches!(raft.state, StateRole::Candidate | StateRole::Leader) {
                self.vote_campaigns += 1;
            }
            self.seen_term = raft.term;
        }
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
                self.note_appended(rd.entries());
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
        self.entry_bytes.clear();
        self.entry_bytes_total = 0;
        self.batch_links.clear();
        let h = self.ledger.head();
        assert!(h.index <= meta.index, "a snapshot's state is not ahead of its index");
        self.head = ChainHead { height: h.height, hash: h.header_hash, state_digest: h.state_digest };
        let mut seen = SeenIds::default();
        for (id, loc) in self.ledger.unexpired_ids(h.time_ms) {
            seen.insert(id, loc);
        }
        self.seq.seen = seen;
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
        for (_, client) in std::mem::take(&mut self.seq.queue) {
            self.refuse(client, code);
        }
        self.seq.opened_ms = None;
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
                for (_, client) in std::mem::take(&mut self.seq.queue) {
                    self.refuse_not_leader(client);
                }
            }
        }
    }

    /// Stages 3 to 5 for the next batch, when its interval has passed or it is full.
    fn maybe_close_batch(&mut self) {
        let Mode::Leading { term, mut tip } = self.seq.mode else { return };
        // A lease that is due ends in a batch of its own when no request opens one.
        let lease_due = self.seq.view.next_lease_due().is_some_and(|at| at <= batch_time(self.wall_ms, &tip));
        let due = match self.seq.opened_ms {
            Some(opened) => {
                self.now_ms >= opened + self.cfg.batch_interval_ms
                    || self.seq.queue.len() >= self.cfg.batch_requests_max
            }
            None => lease_due,
        };
        if !due || self.seq.pending.len() >= BATCHES_IN_FLIGHT_MAX {
            return;
        }
        let queue = std::mem::take(&mut self.seq.queue);
        let mut too_large = Vec::new();
        let (subs, rest) =
            split_by_bytes(queue, self.cfg.batch_bytes_max, |(v, _)| &v.request, |(_, c)| too_large.push(c));
        for c in too_large {
            self.refuse(c, ErrorCode::ProposalTooLarge);
        }
        self.seq.opened_ms = if rest.is_empty() { None } else { Some(self.now_ms) };
        self.seq.queue = rest;
        let mut expired = Vec::new();
        let subs = drop_expired(subs, batch_time(self.wall_ms, &tip), |(v, _)| &v.request, |(_, c)| expired.push(c));
        for c in expired {
            self.refuse(c, ErrorCode::Expired);
        }
        let subs = self.optimistic(subs);
        let ctx = BatchContext { cluster_id: self.cfg.cluster_id, tables: &self.tables, term, wall_ms: self.wall_ms };
        let mut refused = Vec::new();
        let batch =
            execute_batch(&ctx, &mut self.seq.view, &mut LedgerBacking(&self.ledger), &mut tip, subs, |c, code| {
                refused.push((c, code))
            });
        for (c, code) in refused {
            self.refuse(c, code);
        }
        let Some(mut batch) = batch else { return };
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
        self.seq.mode = Mode::Leading { term, tip };
        self.out.push(proposed);
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
        self.seq.pending.insert(batch);
    }

    /// Stage 3: a request already executed gets its receipt, one in flight waits for its batch,
    /// and a transfer the pre-batch state can't fund is refused without consuming its id.
    fn optimistic(&mut self, subs: Vec<(Validated, ClientTag)>) -> Vec<(Validated, ClientTag)> {
        let mut out = Vec::with_capacity(subs.len());
        for (req, client) in subs {
            let Some(client) = self.seq.pending.attach(&req.id, client) else { continue };
            if let Some((height, _)) = self.seq.seen.get(&req.id) {
                match self.ledger.receipt_at(&req.id, height) {
                    Some(receipt) => {
                        let durable = self.majority();
                        self.reply(
                            client,
                            SubmitReply::Committed { receipt: Box::new(receipt), durable_replicas: durable },
                        );
                    }
                    None => self.refuse(client, ErrorCode::Internal),
                }
                continue;
            }
            out.push((req, client));
        }
        self.seq.view.prefetch(
            out.iter().map(|(v, _)| (&v.request.request.signer, &v.request.request.op)),
            &mut LedgerBacking(&self.ledger),
        );
        let empty = BatchWrites::default();
        let mut funded = Vec::with_capacity(out.len());
        for (req, client) in out {
            let r = &req.request.request;
            if let Operation::Transfer { amount, .. } = r.op {
                if self.seq.view.balance(&empty, &r.signer) < amount {
                    self.refuse(client, ErrorCode::InsufficientFunds);
                    continue;
                }
            }
            funded.push((req, client));
        }
        funded
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

/// The chain link of a batch entry, read from the header that leads its encoding (`None` for
/// anything else).
fn batch_link(e: &Entry) -> Option<ChainHead> {
    if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
        return None;
    }
    let header = <BatchHeader as borsh::BorshDeserialize>::deserialize(&mut &e.data[..]).ok()?;
    Some(ChainHead { height: header.height, hash: header.hash(), state_digest: header.state_digest })
}

fn entry_size(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64
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
