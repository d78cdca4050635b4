//! The production shell around the replica core: one thread runs [`tally_core::Replica`] and
//! executes its effects on the real network, log, store and clock.
//!
//! ```text
//!  client port (stage 2 done) ── Vec<Submission> ─┐
//!  peers ── TcpTransport ── raft messages ────────┤
//!  client port ── Control (membership, reads) ────┤
//!  clock (Env) ── ticks ──────────────────────────┤
//!                                                 ▼
//!                         replica thread: Replica::handle(event) → effects, in order:
//!                           Send       → TcpTransport (snapshots streamed in chunks)
//!                           Persist    → WAL append, fsync, hard state (a failure poisons)
//!                           Reply      → the client's frame
//!                           Signed     → metrics
//!                           Reconfigured → member addresses (durable), transport peers
//!                         then publishes its status on the StatusBoard (status.rs)
//!  every store_sync_interval_ms: fsync the store, then drop the log below what it holds
//! ```
//!
//! The core decides everything (stages 3–7, Raft, leases, membership, snapshots); this file
//! only moves bytes and keeps time. The simulator (`sim/`) drives the same core with an
//! in-memory network, disk and clock.

use crate::client_port::{Submission, Waiter};
use crate::control::{Control, PeerProbe, ReplicaControl, CONTROL_QUEUED_MAX};
use crate::forward::Forwarder;
use crate::node::NodeOptions;
use crate::status::{Published, StatusBoard};
use crate::store_ledger::{Members, StoreLedger};
use crate::warming::{start_warmer, WarmHandle, WarmJob, Warmed};
use crossbeam::channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, ConfState, Message};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::wire::SubmitReply;
use tally_codec::wire::WireError;
use tally_codec::{ErrorCode, Tables};
use tally_core::{Effect, Event, LogFailure, Persist, Plant, Refusal, Replica, ReplicaConfig, RestoredLog, Status};
use tally_failover::config::{check_conf_context, check_entry, ConfContext, INBOX_MESSAGES_MAX};
use tally_failover::env::Env;
use tally_failover::handshake::{LocalPeer, PEER_PROTOCOL_VERSION};
use tally_failover::revocation::{fingerprint_hex, Revocation, RevokedCerts};
use tally_failover::storage::{conf_ids, log_failure, MemberAddr, WalStorage};
use tally_failover::transport::{PeerSecurity, TcpTransport, Transport};
use tally_failover::{Member, MemberChange, MembershipError};
use tally_store::state::Store;
use tally_store::wal::Wal;

/// Inputs handled between two status publications.
const INPUTS_PER_PASS_MAX: usize = 256;
/// The longest the replica thread sleeps without input.
const IDLE_WAKE_MS: u64 = 10;
/// Entry bytes the core keeps in memory behind the applied index for lagging followers (about
/// 200 full batches); a follower further behind gets a snapshot. The WAL keeps more on disk.
pub const LOG_RETAIN_BYTES: u64 = 256 << 20;

/// A refused peer message is logged at most once per this long per peer and reason.
pub const PEER_REFUSAL_LOG_MS: u64 = 5_000;
/// Peer and reason pairs remembered for that; past this the memory starts over.
const PEER_REFUSAL_KEYS_MAX: usize = 1024;

/// Rate limit of the refusal log lines: when each (peer, reason) was last logged, and how many
/// refusals were not logged since.
#[derive(Default)]
struct RefusalLog {
    seen: HashMap<(u64, &'static str), (Instant, u64)>,
}

impl RefusalLog {
    /// `Some(suppressed since the last line)` when this refusal is to be logged.
    fn admit(&mut self, peer: u64, reason: &'static str, now: Instant) -> Option<u64> {
        if self.seen.len() >= PEER_REFUSAL_KEYS_MAX && !self.seen.contains_key(&(peer, reason)) {
            self.seen.clear();
        }
        match self.seen.get_mut(&(peer, reason)) {
            Some((last, suppressed)) if now.duration_since(*last) < Duration::from_millis(PEER_REFUSAL_LOG_MS) => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.seen.insert((peer, reason), (now, 0));
                Some(0)
            }
        }
    }
}

/// What the replica thread needs besides the pipeline's shared state.
pub struct ShellConfig {
    pub node_id: u64,
    /// The initial voters of a new cluster (this node among them), or empty for a node that
    /// waits to be added.
    pub initial_voters: Vec<u64>,
    /// Addresses known from the configuration file (the log's record wins).
    pub known_members: Vec<MemberAddr>,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// See `NodeConfig::campaign_on_leader_down`.
    pub campaign_on_leader_down: bool,
    pub log_retain_entries: u64,
    pub store_sync_interval_ms: u64,
    /// The peer port and how links are protected; `None` for a cluster of one without one.
    pub peers: Option<PeerPort>,
    /// A bug planted on purpose (tests of the chaos monkey only; `Plant::None` otherwise).
    pub plant: Plant,
}

/// The replication port.
pub struct PeerPort {
    pub listener: TcpListener,
    pub hello: LocalPeer,
    pub security: PeerSecurity,
}

/// What the replica thread is given by the wiring: the store it applies to, the queue it takes
/// submissions from, the board it publishes its status on, and the relay link it tells when the
/// leader changes.
pub struct Wiring {
    pub store: Arc<Mutex<Store>>,
    pub submissions: Receiver<Vec<Submission>>,
    pub status: Arc<StatusBoard>,
    pub forwarder: Arc<Forwarder>,
}

/// Starts the replica thread; returns the client port's handle on it.
///
/// # Errors
/// A log the core refuses, or a thread or port that cannot start.
pub fn start(
    opts: &NodeOptions,
    mut cfg: ShellConfig,
    wiring: Wiring,
    wal: Wal,
    env: Box<dyn Env>,
) -> Result<ReplicaControl, String> {
    let members: Members = Arc::default();
    let (log, ledger, revoked) = open_log_and_ledger(&wiring, &cfg, wal, &members)?;
    let restored = restore(&log)?;
    let (net_tx, net_rx) = bounded(INBOX_MESSAGES_MAX);
    let (transport, probe) = start_transport(cfg.peers.take(), &revoked, &ledger, net_tx)?;
    let mut env = env;
    let (replica, now_ms) = start_replica(opts, &cfg, ledger, restored, &mut env)?;
    let env = Arc::new(Mutex::new(env));
    let stop = Arc::new(AtomicBool::new(false));
    let (control_tx, control_rx) = bounded(CONTROL_QUEUED_MAX);
    let (warm_tx, warm_rx) = start_warmer(wiring.store.clone())?;
    let warm = replica.ledger().warm_handle();
    let tables = *wiring.store.lock().tables();
    let mut thread = ReplicaThread {
        id: cfg.node_id,
        replica,
        log,
        transport,
        status: wiring.status.clone(),
        forwarder: wiring.forwarder,
        tables,
        env: env.clone(),
        members,
        revoked: revoked.clone(),
        waiters: HashMap::new(),
        next_tag: 0,
        change_replies: HashMap::new(),
        read_replies: HashMap::new(),
        store_sync_interval_ms: cfg.store_sync_interval_ms.max(1),
        last_store_sync_ms: now_ms,
        log_retain_entries: cfg.log_retain_entries,
        leader_commit_seen: 0,
        metrics: MetricsSeen::default(),
        refusal_log: RefusalLog::default(),
        stopped: None,
        last_batch_at: None,
        warm_tx,
        warm,
        warming: VecDeque::new(),
        warming_requests: 0,
        next_warm_ticket: 0,
    };
    thread.update_transport_peers();
    thread.publish();
    let inputs = Inputs { net: net_rx, warmed: warm_rx };
    spawn_replica_thread(thread, wiring.submissions, inputs, control_rx, stop.clone())?;
    Ok(ReplicaControl::new(wiring.status, env, control_tx, stop, probe, revoked))
}

/// Opens the log and the ledger on the store (bootstrapping a new cluster's first
/// configuration), and makes the log continue from the state the store holds.
fn open_log_and_ledger(
    wiring: &Wiring,
    cfg: &ShellConfig,
    wal: Wal,
    members: &Members,
) -> Result<(WalStorage, StoreLedger, RevokedCerts), String> {
    let mut log = WalStorage::open(Box::new(wal), None, &cfg.known_members).map_err(|e| format!("log: {e}"))?;
    *members.lock() = log.members().clone();
    let on_flushed = {
        let status = Arc::downgrade(&wiring.status);
        move |index, height| {
            if let Some(s) = status.upgrade() {
                s.publish_applied(index, height);
            }
        }
    };
    let revoked = RevokedCerts::new(log.revoked());
    let mut ledger = StoreLedger::new(wiring.store.clone(), members.clone(), on_flushed)?.with_revoked(revoked.clone());
    // A new cluster's first configuration is applied at (1, 1), as if a first entry had been
    // compacted: a node added later has no entry to learn it from, so it gets a snapshot.
    if ledger_is_fresh(&ledger) && cfg.initial_voters.contains(&cfg.node_id) {
        tally_core::ledger::bootstrap(&mut ledger, &cfg.initial_voters).map_err(|e| format!("bootstrap: {e}"))?;
        ledger.drain().map_err(|e| format!("bootstrap: {e}"))?;
        wiring.store.lock().sync_all().map_err(|e| format!("bootstrap sync: {e}"))?;
    }
    mark_log_at_state(&mut log, &ledger)?;
    Ok((log, ledger, revoked))
}

/// The log must continue from the durable state: a fresh log (or one whose entries the state
/// already holds) starts with a marker at the state's applied entry.
fn mark_log_at_state(log: &mut WalStorage, ledger: &StoreLedger) -> Result<(), String> {
    let head = tally_core::Ledger::head(ledger);
    if head.index > 0 && log.log().last_index() < head.index {
        let mut meta = raft::eraftpb::SnapshotMetadata::default();
        meta.index = head.index;
        meta.term = head.term.max(1);
        if let Some(bytes) = tally_core::Ledger::conf_state(ledger) {
            meta.set_conf_state(ConfState::parse_from_bytes(&bytes).map_err(|e| format!("stored configuration: {e}"))?);
        }
        log.apply_snapshot(&meta, &[], &[]).map_err(|e| format!("log marker at {}: {e}", head.index))?;
    }
    Ok(())
}

/// Whether the members in `others` can apply a revocation: none of them is linked at peer
/// protocol 2 (release 0.3 would refuse the entry that carries it). `versions`: each linked
/// peer's protocol version. A member that is not linked (down, say) does not hold a revocation
/// back: shutting a leaked key out must not wait for it.
fn revocation_followable(
    others: impl Iterator<Item = u64>,
    versions: &BTreeMap<u64, u16>,
) -> Result<(), MembershipError> {
    for node in others {
        if let Some(v) = versions.get(&node).filter(|v| **v < 3) {
            return Err(MembershipError::Refused(format!(
                "node {node} speaks peer protocol {v} (release 0.3), which cannot apply a revocation: upgrade it first"
            )));
        }
    }
    Ok(())
}

/// The peers linked at an older protocol than this replica's newest, among the links that are
/// fresh: a leader writes to every member (heartbeats), a follower only to its leader; a link
/// nothing was written on since its peer restarted still shows the version it had.
fn older_peers(versions: &BTreeMap<u64, u16>, is_leader: bool, leader: Option<u64>) -> Vec<(u64, u16)> {
    let fresh = |id: u64| is_leader || Some(id) == leader;
    versions.iter().filter(|(id, v)| fresh(**id) && **v < PEER_PROTOCOL_VERSION).map(|(id, v)| (*id, *v)).collect()
}

/// The peer transport (its listener started, snapshots streamed from the ledger's exports) and
/// what probes a peer address, or no peers for a cluster of one without a peer port.
fn start_transport(
    peers: Option<PeerPort>,
    revoked: &RevokedCerts,
    ledger: &StoreLedger,
    net_tx: Sender<Message>,
) -> Result<(Box<dyn Transport>, Option<PeerProbe>), String> {
    Ok(match peers {
        Some(p) => {
            let security = p.security.with_revoked(revoked.clone());
            let t = TcpTransport::start(p.listener, p.hello.clone(), security.clone(), net_tx)
                .map_err(|e| format!("peer port: {e}"))?
                .with_snapshots(ledger.snapshot_source());
            (Box::new(t), Some((p.hello, security)))
        }
        None => (Box::new(NoPeers), None),
    })
}

/// Starts the replica core on the ledger and the restored log, at `env`'s time. Returns it and
/// the monotonic time it started at.
fn start_replica(
    opts: &NodeOptions,
    cfg: &ShellConfig,
    ledger: StoreLedger,
    restored: RestoredLog,
    env: &mut Box<dyn Env>,
) -> Result<(Replica<StoreLedger>, u64), String> {
    let now_ms = env.monotonic_ms();
    let wall_ms = env.wall_ms();
    let election_seed = env.next_u64();
    let replica_cfg = ReplicaConfig {
        node_id: cfg.node_id,
        cluster_id: opts.cluster_id,
        tick_ms: cfg.tick_ms,
        election_ticks: cfg.election_ticks,
        heartbeat_ticks: cfg.heartbeat_ticks,
        batch_interval_ms: opts.batch_interval_ms,
        batch_requests_max: opts.batch_requests_max,
        batch_bytes_max: opts.batch_bytes_max,
        log_retain_entries: cfg.log_retain_entries,
        log_retain_bytes: LOG_RETAIN_BYTES,
        operator_key: opts.operator_key.clone(),
        election_seed,
        plant: cfg.plant,
        snapshot_reports_by_shell: true,
        campaign_on_leader_down: cfg.campaign_on_leader_down,
    };
    let logger = tally_failover::raft_log_bridge::logger(cfg.node_id);
    let replica =
        Replica::start(replica_cfg, ledger, restored, now_ms, wall_ms, &logger).map_err(|e| format!("replica: {e}"))?;
    tracing::info!(
        node = cfg.node_id,
        applied = replica.applied().index,
        voters = ?replica.voters(),
        "replica core started"
    );
    Ok((replica, now_ms))
}

/// Runs `thread` on its own OS thread until `stop`.
fn spawn_replica_thread(
    mut thread: ReplicaThread,
    submit_rx: Receiver<Vec<Submission>>,
    inputs: Inputs,
    control_rx: Receiver<Control>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name(format!("replica-{}", thread.id))
        .spawn(move || {
            // A panic here (a broken invariant) ends the process: a replica must never keep
            // heartbeating while its core is dead (`docs/architecture.md` §9).
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                thread.run(&submit_rx, &inputs, &control_rx, &stop)
            }));
            if r.is_err() {
                tracing::error!("the replica thread panicked; aborting so a backup takes over");
                std::process::abort();
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the replica thread: {e}"))
}

fn ledger_is_fresh(l: &StoreLedger) -> bool {
    tally_core::Ledger::head(l).index == 0
}

/// What the log on disk holds, for the core to restart from.
fn restore(log: &WalStorage) -> Result<RestoredLog, String> {
    let wal = log.log();
    let (first, last) = (wal.first_index(), wal.last_index());
    let mut entries = Vec::new();
    if last >= first {
        for le in wal.entries(first, last + 1, None).map_err(|e| format!("log read: {e}"))? {
            entries.push(tally_failover::storage::decode_entry(&le).map_err(|e| format!("log entry: {e}"))?);
        }
    }
    let rec = wal.hard_state();
    let mut hs = raft::eraftpb::HardState::default();
    hs.term = rec.term.max(1);
    hs.vote = rec.vote;
    hs.commit = rec.commit;
    Ok(RestoredLog { records: vec![Persist { snapshot: None, entries, hard_state: Some(hs), sync: true }] })
}

/// A cluster of one: nobody to send to.
struct NoPeers;

impl Transport for NoPeers {
    fn send(&mut self, _msg: Message) -> bool {
        false
    }
    fn set_peers(&mut self, _peers: &BTreeMap<u64, String>) {}
    fn stop(&mut self) {}
}

#[derive(Default)]
struct MetricsSeen {
    pre_vote_campaigns: u64,
    leader_down_campaigns: u64,
    vote_campaigns: u64,
    leader: (u64, u64),
}

/// Where an answer goes.
enum Pending {
    Submit(Waiter),
}

struct ReplicaThread {
    id: u64,
    replica: Replica<StoreLedger>,
    log: WalStorage,
    transport: Box<dyn Transport>,
    /// Where this thread publishes its status (read by everyone else).
    status: Arc<StatusBoard>,
    /// The relay link to the leader: told when the leader changes.
    forwarder: Arc<Forwarder>,
    tables: Tables,
    env: Arc<Mutex<Box<dyn Env>>>,
    members: Members,
    /// Revoked node certificates (shared with the transport and the ledger's exports).
    revoked: RevokedCerts,
    waiters: HashMap<u64, Pending>,
    next_tag: u64,
    change_replies: HashMap<u64, Sender<Result<(), MembershipError>>>,
    read_replies: HashMap<u64, Sender<Result<u64, WireError>>>,
    store_sync_interval_ms: u64,
    last_store_sync_ms: u64,
    log_retain_entries: u64,
    leader_commit_seen: u64,
    metrics: MetricsSeen,
    refusal_log: RefusalLog,
    stopped: Option<LogFailure>,
    last_batch_at: Option<Instant>,
    /// Reads of keys no cache holds, done by the warmer thread (never on this one).
    warm_tx: Sender<WarmJob>,
    /// Where the warmer's reads go to the ledger (taken in before the core's next pass).
    warm: WarmHandle,
    /// Submissions waiting for their keys to be warmed, in arrival order: the core gets each
    /// group when it and every group before it is ready.
    warming: VecDeque<Warming>,
    /// Requests in `warming`.
    warming_requests: usize,
    next_warm_ticket: u64,
}

/// Submissions held until the warmer has read their cold keys.
struct Warming {
    ticket: u64,
    subs: Vec<Submission>,
    ready: bool,
}

/// What wakes the replica thread besides submissions and admin commands.
struct Inputs {
    net: Receiver<Message>,
    warmed: Receiver<Warmed>,
}

impl ReplicaThread {
    fn run(
        &mut self,
        submit_rx: &Receiver<Vec<Submission>>,
        inputs: &Inputs,
        control_rx: &Receiver<Control>,
        stop: &AtomicBool,
    ) {
        while !stop.load(Ordering::Relaxed) {
            // Asleep until an input arrives or the core wants time to pass (a tick, a batch to
            // close), and never longer than IDLE_WAKE_MS.
            let now = self.now().0;
            let wait = Duration::from_millis(self.replica.next_wake_ms().saturating_sub(now).min(IDLE_WAKE_MS));
            // Submissions wait in their bounded channel (the client port answers `Overloaded`
            // when it is full) while the core already holds enough for the batches it may build.
            let never = crossbeam::channel::never();
            let submissions = if self.core_queue_full() { &never } else { submit_rx };
            crossbeam::channel::select! {
                recv(inputs.net) -> m => if let Ok(m) = m { self.on_peer(m) },
                recv(inputs.warmed) -> w => if let Ok(w) = w { self.on_warmed(w) },
                recv(submissions) -> s => if let Ok(s) = s { self.on_submissions(s) },
                recv(control_rx) -> c => if let Ok(c) = c { self.on_control(c) },
                default(wait) => {},
            }
            for _ in 0..INPUTS_PER_PASS_MAX {
                let mut idle = true;
                if let Ok(m) = inputs.net.try_recv() {
                    self.on_peer(m);
                    idle = false;
                }
                if let Ok(w) = inputs.warmed.try_recv() {
                    self.on_warmed(w);
                    idle = false;
                }
                if let Ok(c) = control_rx.try_recv() {
                    self.on_control(c);
                    idle = false;
                }
                if !self.core_queue_full() {
                    if let Ok(s) = submit_rx.try_recv() {
                        self.on_submissions(s);
                        idle = false;
                    }
                }
                if idle {
                    break;
                }
            }
            self.tick();
            for (to, delivered) in self.transport.take_snapshot_reports() {
                let result = if delivered { "sent" } else { "failed" };
                metrics::counter!("tally_snapshot_sends_total", "result" => result).increment(1);
                self.handle(Event::SnapshotReport { to, delivered });
            }
            self.maybe_sync_store();
            self.publish();
        }
        self.transport.stop();
    }

    /// Whether the core has no room for more requests (it holds two full batches with those
    /// warming, waiting for one to close), or the store thread is half a queue behind: new work then waits in the submission
    /// channel (clients get `Overloaded` when it is full) instead of the replica thread blocking
    /// on a full store queue, where it would send no heartbeat.
    fn core_queue_full(&self) -> bool {
        self.replica.submission_room() <= self.warming_requests || self.replica.ledger().store_behind()
    }

    fn now(&self) -> (u64, u64) {
        let env = self.env.lock();
        (env.monotonic_ms(), env.wall_ms())
    }

    fn tick(&mut self) {
        let (now_ms, wall_ms) = self.now();
        self.handle(Event::Tick { now_ms, wall_ms });
    }

    fn on_peer(&mut self, m: Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgUnreachable {
            // Only the transport makes these (it refuses local message kinds from the wire).
            self.handle(Event::PeerDown(m.from));
            return;
        }
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgAppend {
            // Batches are judged by the core (decoded once); conf changes' addresses here.
            let batches_checked_by_core = |_: &[u8]| Ok(());
            for e in m.get_entries() {
                if let Err(why) = check_entry(e, &batches_checked_by_core) {
                    // Defence in depth behind mutual TLS: a peer that sends what can never be
                    // applied is refused as the core refuses what it judges.
                    self.refuse_peer(m.from, &Refusal::Entry { index: e.index, why });
                    return;
                }
            }
            if m.term >= self.replica.term() {
                self.leader_commit_seen = self.leader_commit_seen.max(m.commit);
            }
        }
        self.handle(Event::Peer(m));
    }

    /// New submissions: to the core at once when a leader's caches hold every key they read
    /// (and none wait before them), else held while the warmer reads the cold keys. A leader's
    /// replica thread never reads the store itself for a request, so a store write that holds
    /// the store for seconds (a LevelDB compaction) delays batches, never heartbeats.
    fn on_submissions(&mut self, subs: Vec<Submission>) {
        let (mut cold, mut receipts) = (Vec::new(), Vec::new());
        if self.replica.is_leader() {
            let mut keys = Vec::with_capacity(2 * subs.len());
            for s in &subs {
                let r = &s.req.request.request;
                match self.replica.executed_at(&s.req.id) {
                    // A duplicate: answered with its receipt, which may be in the store only.
                    Some(height) => {
                        if self.replica.ledger().receipt_is_cold(&s.req.id, height) {
                            receipts.push((s.req.id, height));
                        }
                    }
                    None => tally_core::state::state_keys(&self.tables, &r.signer, &r.op, &mut keys),
                }
            }
            cold = self.replica.ledger().cold_keys(keys);
        }
        if cold.is_empty() && receipts.is_empty() && self.warming.is_empty() {
            self.submit(subs);
            return;
        }
        let ticket = self.next_warm_ticket;
        self.next_warm_ticket += 1;
        // A job the warmer cannot take (its queue is full) is read by the core as before.
        let ready = (cold.is_empty() && receipts.is_empty())
            || self.warm_tx.try_send(WarmJob { ticket, keys: cold, receipts }).is_err();
        self.warming_requests += subs.len();
        self.warming.push_back(Warming { ticket, subs, ready });
        self.release_warmed();
    }

    /// The warmer read a group's cold keys: handed to the ledger (its cache), then the ready
    /// groups at the front go to the core.
    fn on_warmed(&mut self, w: Warmed) {
        if let Some(g) = self.warming.iter_mut().find(|g| g.ticket == w.ticket) {
            g.ready = true;
        }
        // The ledger takes the values in before the core's next pass reads anything.
        self.warm.deliver(w);
        self.release_warmed();
    }

    fn release_warmed(&mut self) {
        while self.warming.front().is_some_and(|g| g.ready) {
            let g = self.warming.pop_front().expect("front exists");
            self.warming_requests -= g.subs.len();
            self.submit(g.subs);
        }
    }

    fn submit(&mut self, subs: Vec<Submission>) {
        crate::failpoint::hit("replica-thread");
        if crate::failpoint::claim("refuse-proposal") {
            self.replica.refuse_next_proposal();
        }
        for s in subs {
            let tag = self.next_tag;
            self.next_tag += 1;
            self.waiters.insert(tag, Pending::Submit(s.waiter));
            self.handle(Event::Submit { client: tag, req: s.req });
        }
    }

    fn on_control(&mut self, c: Control) {
        let tag = self.next_tag;
        self.next_tag += 1;
        match c {
            Control::Change { change, reply } => {
                if let Err(e) = self.links_carry(&change) {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.change_replies.insert(tag, reply);
                self.handle(Event::ChangeMembers { ticket: tag, change });
            }
            Control::Read { now_ms, reply } => {
                self.read_replies.insert(tag, reply);
                self.handle(Event::Read { client: tag, now_ms });
            }
        }
    }

    /// Whether the other members can follow `change`: a revocation travels in a form release
    /// 0.3 (peer protocol 2) cannot read, so it waits while a member's link runs protocol 2.
    fn links_carry(&self, change: &MemberChange) -> Result<(), MembershipError> {
        let MemberChange::Revoke { node: revoked, .. } = change else { return Ok(()) };
        if !self.replica.is_leader() {
            return Ok(()); // a follower's core answers "not the leader"
        }
        let conf = self.replica.status().conf_state;
        let others = conf.voters.iter().chain(&conf.learners).copied().filter(|m| *m != self.id && m != revoked);
        revocation_followable(others, &self.transport.link_versions())
    }

    /// One event through the core, then its effects in order.
    fn handle(&mut self, event: Event) {
        if self.stopped.is_some() {
            // The log failed: the core is poisoned and answers clients itself; peers hear
            // nothing more from this replica.
            if matches!(event, Event::Peer(_) | Event::Tick { .. } | Event::SnapshotReport { .. } | Event::PeerDown(_))
            {
                return;
            }
        }
        let started = Instant::now();
        let effects = self.replica.handle(event);
        // The commit point is published before any answer of this pass leaves: a client that
        // reads right after its write waits for the store to hold it (the read barrier).
        self.status.publish_commit(self.replica.commit_index());
        // The core keeps no clock: its pass is timed here and named after what it did.
        let stage = if effects.iter().any(|e| matches!(e, Effect::Signed { .. })) {
            "apply"
        } else if effects.iter().any(|e| matches!(e, Effect::Proposed { .. })) {
            "sequence"
        } else {
            "raft"
        };
        crate::measure::stage_time(stage, started);
        if self.stopped.is_none() {
            if let Some(failure) = self.replica.poisoned() {
                // The core stopped itself (a store write failed while applying). Said before
                // any effect runs: a client answered by this pass must not then read this
                // replica's store, which lacks what it was told is committed.
                let failure = failure.clone();
                tracing::error!(node = self.id, error = %failure, "the replica core stopped; stepping down");
                self.mark_stopped(failure);
            }
        }
        self.execute(effects);
    }

    /// This replica stops: the client port sees it at once (no leader, no lease, no reads);
    /// peers hear nothing more; tallyd waits for disk space or exits.
    fn mark_stopped(&mut self, failure: LogFailure) {
        metrics::gauge!("tally_log_stopped").set(1.0);
        self.stopped = Some(failure.clone());
        self.status.stop(failure);
        self.transport.stop();
    }

    fn execute(&mut self, effects: Vec<Effect>) {
        let mut effects = effects.into_iter();
        while let Some(e) = effects.next() {
            match e {
                // A replica that stopped (a failed member write) sends nothing more.
                Effect::Send(_) | Effect::Persist(_) if self.stopped.is_some() => {}
                Effect::Send(m) => self.send(m),
                Effect::Persist(p) => {
                    let started = Instant::now();
                    let wrote = !p.entries.is_empty() || p.snapshot.is_some();
                    if let Err(failure) = self.persist(p) {
                        // Nothing after a failed persist may run: the messages behind it
                        // promise what the log does not hold.
                        tracing::error!(node = self.id, error = %failure, "log write failed; this replica stops and steps down");
                        self.mark_stopped(failure.clone());
                        drop(effects);
                        let rest = self.replica.handle(Event::LogFailed(failure));
                        // The poisoned core only answers clients now.
                        self.execute(rest);
                        return;
                    }
                    if wrote {
                        metrics::histogram!("tally_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
                        crate::measure::stage_time("persist", started);
                    }
                }
                Effect::Reply { client, reply } => {
                    if let SubmitReply::Refused(e) = &reply {
                        crate::measure::refused(refusal_stage(e.code), e.code, 1);
                    }
                    match self.waiters.remove(&client) {
                        Some(Pending::Submit(w)) => w.fill(reply),
                        None => tracing::warn!(client, "a reply for nobody"),
                    }
                }
                Effect::ReadIndex { client, result } => {
                    if let Some(reply) = self.read_replies.remove(&client) {
                        let _ = reply.try_send(result);
                    }
                }
                Effect::PeerRefused { from, refusal } => self.refuse_peer(from, &refusal),
                Effect::ConfChangeSkipped { index, why } => {
                    tracing::error!(node = self.id, index, %why, "a committed configuration change does not apply; skipped");
                }
                Effect::Proposed { requests, bytes, .. } => {
                    metrics::histogram!("tally_batch_requests").record(requests as f64);
                    metrics::histogram!("tally_batch_bytes").record(bytes as f64);
                    let now = Instant::now();
                    if let Some(prev) = self.last_batch_at.replace(now) {
                        metrics::histogram!("tally_batch_interval_seconds").record((now - prev).as_secs_f64());
                    }
                }
                Effect::Signed { header, .. } => {
                    metrics::counter!("tally_committed_batches_total").increment(1);
                    metrics::counter!("tally_committed_requests_total").increment(u64::from(header.leaf_count));
                }
                Effect::Reconfigured { index, conf_state, context, single } => {
                    self.reconfigured(index, conf_state, &context, single);
                }
                Effect::MembershipChanged { ticket, result } => {
                    if let Some(reply) = self.change_replies.remove(&ticket) {
                        let _ = reply.try_send(result);
                    }
                }
            }
        }
    }

    /// A peer's message was refused: counted by peer and reason, logged at most once per
    /// [`PEER_REFUSAL_LOG_MS`] per peer and reason (with how many were not), and the peer's
    /// links into this replica are cut.
    fn refuse_peer(&mut self, from: u64, refusal: &Refusal) {
        let reason = refusal.reason();
        metrics::counter!("tally_peer_messages_refused_total", "peer" => from.to_string(), "reason" => reason)
            .increment(1);
        if let Some(suppressed) = self.refusal_log.admit(from, reason, Instant::now()) {
            tracing::error!(node = self.id, from, reason, %refusal, suppressed, "raft message from a peer refused");
        }
        if refusal.cuts_link() {
            self.transport.cut_inbound(from);
        }
    }

    fn send(&mut self, m: Message) {
        let (to, snap) = (m.to, m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot);
        if !self.transport.send(m) && snap {
            metrics::counter!("tally_snapshot_sends_total", "result" => "failed").increment(1);
            let effects = self.replica.handle(Event::SnapshotReport { to, delivered: false });
            self.execute(effects);
        }
    }

    fn persist(&mut self, p: Persist) -> Result<(), LogFailure> {
        if let Some(snap) = &p.snapshot {
            let members = self.replica.ledger().take_installed_members().unwrap_or_default();
            let revoked = self.replica.ledger().take_installed_revoked();
            self.log
                .apply_snapshot(snap.get_metadata(), &members, &[])
                .map_err(|e| log_failure("snapshot marker", &e))?;
            self.revoke(&revoked).map_err(|e| log_failure("revoked certificates", &e))?;
            *self.members.lock() = self.log.members().clone();
            self.update_transport_peers();
        }
        if !p.entries.is_empty() {
            self.log.append(&p.entries).map_err(|e| log_failure("log append", &e))?;
            if p.sync {
                self.log.sync().map_err(|e| log_failure("log fsync", &e))?;
            }
        }
        if let Some(hs) = &p.hard_state {
            // Term and vote must be durable before any message that depends on them. The commit
            // index rides along but is not worth a write on its own.
            let stored = self.log.log().hard_state();
            if hs.term != stored.term || hs.vote != stored.vote {
                self.log.set_hard_state(hs).map_err(|e| log_failure("hard state", &e))?;
            }
        }
        Ok(())
    }

    fn reconfigured(&mut self, index: u64, cs: ConfState, context: &[u8], single: Option<(u64, ConfChangeType)>) {
        let decoded = match single {
            Some((node, ty)) => check_conf_context(node, ty, context),
            None if context.is_empty() => Ok(ConfContext::None),
            None => Err("a context on a change of several nodes".into()),
        };
        let written = match decoded {
            Ok(ConfContext::None) => Ok(()),
            Ok(ConfContext::Member(addr)) => self.log.upsert_member(addr).map_err(|e| log_failure("members", &e)),
            Ok(ConfContext::Revocation(r)) => self.revoke(&[r]).map_err(|e| log_failure("revoked certificates", &e)),
            Err(e) => {
                tracing::warn!(node = self.id, index, error = %e, "conf change context does not decode");
                Ok(())
            }
        };
        if let Err(e) = written {
            self.fail_log(e);
            return;
        }
        tracing::info!(node = self.id, index, voters = ?cs.voters, learners = ?cs.learners, outgoing = ?cs.voters_outgoing, "configuration changed");
        let ids = conf_ids(&cs);
        if let Err(e) = self.log.retain_members(&ids, self.id) {
            self.fail_log(log_failure("members", &e));
            return;
        }
        *self.members.lock() = self.log.members().clone();
        self.update_transport_peers();
    }

    /// Refuses the certificates of `list` from now on: durably in the log's meta blob, then in
    /// the transport, whose links presenting one are cut.
    fn revoke(&mut self, list: &[Revocation]) -> Result<(), raft::Error> {
        let new = self.log.add_revocations(list)?;
        self.revoked.extend(list);
        for r in &new {
            tracing::warn!(node = self.id, revoked_node = r.node_id, certificate = %fingerprint_hex(&r.cert_fingerprint), "node certificate revoked: refused on every peer link from now on");
        }
        if !new.is_empty() {
            self.transport.cut_revoked();
        }
        Ok(())
    }

    fn fail_log(&mut self, failure: LogFailure) {
        self.mark_stopped(failure.clone());
        let rest = self.replica.handle(Event::LogFailed(failure));
        self.execute(rest);
    }

    fn update_transport_peers(&mut self) {
        let peers: BTreeMap<u64, String> = self
            .members
            .lock()
            .values()
            .filter(|m| m.node_id != self.id && !m.peer_addr.is_empty())
            .map(|m| (m.node_id, m.peer_addr.clone()))
            .collect();
        self.transport.set_peers(&peers);
    }

    /// Makes the store durable now and then, so the log can be dropped below what it holds.
    fn maybe_sync_store(&mut self) {
        if self.stopped.is_some() {
            return;
        }
        let now = self.now().0;
        if now < self.last_store_sync_ms + self.store_sync_interval_ms {
            return;
        }
        self.last_store_sync_ms = now;
        // The store thread fsyncs (seconds under load: the replica thread must keep
        // heartbeating); the log is compacted behind what its last sync made durable.
        // A failed sync stops the replica here, as it did when the sync ran on this thread (a
        // failed write stops it through the core, at its next apply).
        if let Some(failure) = self.replica.ledger().failed_sync() {
            self.fail_log(failure);
            return;
        }
        self.replica.ledger().request_sync();
        let durable = self.replica.ledger().synced_index();
        // Entries a lagging follower may still need stay on disk too, so a restarted leader can
        // serve them from its log (the core keeps what the disk holds up to its applied entry).
        let target = durable.min(self.log.log().last_index()).saturating_sub(self.log_retain_entries);
        if target >= self.log.log().first_index() {
            if let Err(e) = self.log.compact(target) {
                self.fail_log(log_failure(&format!("log compaction to {target}"), &e));
            }
        }
    }

    fn publish(&mut self) {
        if self.stopped.is_none() {
            if let Some(failure) = self.replica.ledger().failed() {
                // The store thread stopped on a failed write: stop now, not at the next apply
                // (an idle replica would otherwise keep leading with a store that no longer moves).
                tracing::error!(node = self.id, error = %failure, "the store stopped; stepping down");
                self.fail_log(failure.during("ledger write failed"));
            }
        }
        let status = self.replica.status();
        self.status.publish_commit(status.commit_index);
        let (index, height) = self.replica.ledger().flushed();
        self.status.publish_applied(index, height);
        self.export_metrics(&status);
        let addrs = self.members.lock().clone();
        let leader_addr = status.leader_id.and_then(|l| addrs.get(&l)).map(|m| m.client_addr.clone());
        let leader_commit = if status.is_leader { status.commit_index } else { self.leader_commit_seen };
        let published = Published {
            term: status.term,
            leader_id: status.leader_id,
            is_leader: status.is_leader,
            leader_addr: leader_addr.clone(),
            members: members_of(&status, &addrs),
            voters: status.conf_state.voters.clone(),
            leader_commit: leader_commit.max(status.commit_index),
            older_peers: older_peers(&self.transport.link_versions(), status.is_leader, status.leader_id),
        };
        self.status.publish(published);
        // Frames relayed to a replica that no longer leads are answered (retryable) now.
        let leader_addr = if self.stopped.is_some() { None } else { leader_addr };
        self.forwarder.retain_leader(leader_addr.as_deref());
    }

    fn export_metrics(&mut self, s: &Status) {
        let pre = s.pre_vote_campaigns - self.metrics.pre_vote_campaigns;
        let vote = s.vote_campaigns - self.metrics.vote_campaigns;
        if pre > 0 {
            metrics::counter!("tally_elections_total", "kind" => "pre_vote").increment(pre);
        }
        if vote > 0 {
            metrics::counter!("tally_elections_total", "kind" => "vote").increment(vote);
        }
        let down = s.leader_down_campaigns - self.metrics.leader_down_campaigns;
        if down > 0 {
            metrics::counter!("tally_elections_total", "kind" => "leader_down").increment(down);
        }
        self.metrics.leader_down_campaigns = s.leader_down_campaigns;
        self.metrics.pre_vote_campaigns = s.pre_vote_campaigns;
        self.metrics.vote_campaigns = s.vote_campaigns;
        let leader = s.leader_id.unwrap_or(0);
        if leader != 0 && (s.term, leader) != self.metrics.leader {
            if self.metrics.leader.1 != 0 {
                metrics::counter!("tally_leader_changes_total").increment(1);
            }
            self.metrics.leader = (s.term, leader);
        }
        let now = self.now().0;
        let lease_left_ms = s.lease_until_ms.map_or(0, |u| u.saturating_sub(now));
        metrics::gauge!("tally_lease_remaining_seconds").set(lease_left_ms as f64 / 1e3);
        if s.is_leader {
            let acked = s.quorum_ack_ms.unwrap_or(now);
            metrics::gauge!("tally_quorum_ack_age_seconds").set(now.saturating_sub(acked) as f64 / 1e3);
            for (id, m) in &s.matched {
                if *id != self.id {
                    metrics::gauge!("tally_follower_lag_entries", "peer" => id.to_string())
                        .set(s.commit_index.saturating_sub(*m) as f64);
                }
            }
        }
    }
}

/// Every member of the configuration with the address the log recorded for it and, on a
/// leader, how far it matched.
fn members_of(status: &Status, addrs: &BTreeMap<u64, MemberAddr>) -> Vec<Member> {
    let conf = &status.conf_state;
    conf_ids(conf)
        .into_iter()
        .map(|id| {
            let addr = addrs.get(&id);
            Member {
                node_id: id,
                client_addr: addr.map(|a| a.client_addr.clone()).unwrap_or_default(),
                peer_addr: addr.map(|a| a.peer_addr.clone()).unwrap_or_default(),
                is_voter: conf.voters.contains(&id) || conf.voters_outgoing.contains(&id),
                matched_index: status.matched.iter().find(|(n, _)| *n == id).map_or(0, |(_, m)| *m),
            }
        })
        .collect()
}

/// The stage a core refusal comes from, for `tally_refused_total`: stage 3 refuses what the
/// applied state cannot fund, stage 4 what expired or does not fit a batch; leadership changes
/// refuse in stage 5 (not the leader, or a batch lost to a new leader).
fn refusal_stage(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InsufficientFunds => "optimistic",
        ErrorCode::Expired | ErrorCode::ProposalTooLarge => "sequence",
        ErrorCode::LogFailed | ErrorCode::StorageFull => "persist",
        _ => "propose",
    }
}

/// Answers every request still waiting when the replica thread ends (never in normal
/// operation: the thread runs for the life of the process).
impl Drop for ReplicaThread {
    fn drop(&mut self) {
        for (_, w) in self.waiters.drain() {
            let Pending::Submit(w) = w;
            w.refuse(ErrorCode::Retry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::revocation_followable;
    use std::collections::BTreeMap;

    /// A leader names every member linked at an older protocol; a follower only its leader (its
    /// links to other followers carry nothing, so their versions may be stale).
    #[test]
    fn older_peers_are_named_where_links_are_fresh() {
        let versions = BTreeMap::from([(1, 2), (2, 3), (3, 2)]);
        assert_eq!(super::older_peers(&versions, true, Some(4)), vec![(1, 2), (3, 2)]);
        assert_eq!(super::older_peers(&versions, false, Some(1)), vec![(1, 2)]);
        assert_eq!(super::older_peers(&versions, false, Some(2)), vec![]);
        assert_eq!(super::older_peers(&versions, false, None), vec![]);
    }

    /// A revocation waits while a member's link runs peer protocol 2 (release 0.3 could not
    /// apply it); a member that is not linked does not hold it back.
    #[test]
    fn a_revocation_waits_while_a_member_speaks_peer_protocol_2() {
        let versions = BTreeMap::from([(2, 3), (3, 2)]);
        assert!(revocation_followable([2].into_iter(), &versions).is_ok());
        let e = revocation_followable([2, 3].into_iter(), &versions).expect_err("node 3 speaks 2");
        assert!(e.to_string().contains("node 3 speaks peer protocol 2"), "{e}");
        assert!(revocation_followable([2, 4].into_iter(), &versions).is_ok(), "node 4 is down");
        assert!(revocation_followable([2, 3].into_iter(), &BTreeMap::from([(2, 3), (3, 3)])).is_ok());
    }

    /// A refusal the core answers is counted under a stage and reason that `/metrics` exports
    /// at 0 from the start (`measure::REFUSALS`), so its first event shows in `rate()`.
    #[test]
    fn core_refusals_are_counted_where_they_are_exported_at_zero() {
        for (stage, codes) in crate::measure::REFUSALS {
            if ["optimistic", "sequence", "propose", "persist"].contains(&stage) {
                for code in codes {
                    assert_eq!(super::refusal_stage(*code), stage, "{code:?}");
                }
            }
        }
    }
}
