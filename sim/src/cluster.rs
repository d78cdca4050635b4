//! One simulated run: a 3- or 5-replica cluster of real [`Replica`] cores and their clients, in
//! one thread, driven by one seed.
//!
//! ```text
//!  seed ─▶ ChaCha20 ─┬─▶ network: delay · loss · duplication · reordering · partitions · clogging
//!                    ├─▶ processes: crash (and crash mid-write) · restart · pause · resume
//!                    ├─▶ disks: unsynced writes lost or torn on crash · fsync failure
//!                    ├─▶ clocks: drift and wall-clock jumps within the bound
//!                    └─▶ clients: transfers · Set/Get/Delete on hot keys · retries of the same bytes
//!                                 · garbage, bad signatures, expired requests, replays
//!  event queue (time, sequence) ─▶ one event at a time ─▶ Replica::handle ─▶ effects ─▶ queue
//! ```
//! A safety phase with faults, then a liveness phase with every fault healed. The run's record
//! goes to the checkers ([`crate::check`]).

use crate::disk::SimDisk;
use raft::eraftpb::Message;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::{BTreeMap, BTreeSet};
use tally_check::history::{DocRead, History, Op, OpKind, OpResult, ReplicaFinal, RunRecord, SeenHeader, StoredBatch};
use tally_codec::wire::{SubmitReply, WireError};
use tally_codec::{ClusterId, DocKey, ErrorCode, Operation, PublicKey, Receipt, Request, Signature, SignedRequest};
use tally_core::replica::READ_WAIT_MS;
use tally_core::{
    ClientTag, Effect, Event, Ledger, MemLedger, MemberChange, MembershipError, Plant, Replica, ReplicaConfig,
    Validated,
};

/// Simulated wall clock at time zero.
const WALL_BASE_MS: u64 = 1_700_000_000_000;
/// How often each replica gets a tick event.
const TICK_EVENT_MS: u64 = 10;
/// Production timing (codec/src/config.rs defaults).
const TICK_MS: u64 = 50;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
const BATCH_INTERVAL_MS: u64 = 100;
/// The clock bound the simulator stays inside: rates differ by at most 5%, the wall clock jumps
/// by at most 2 s.
pub const DRIFT_PPM_MAX: i64 = 50_000;
pub const WALL_JUMP_MS_MAX: i64 = 2_000;
/// A client gives up on an answer after this long and retries elsewhere.
const CLIENT_TIMEOUT_MS: u64 = 600;
/// Requests expire this long after they are made.
const REQUEST_TTL_MS: u64 = 4_000;
/// The ledger is made durable every this many applied entries (and at every snapshot install).
const LEDGER_SYNC_ENTRIES: u64 = 16;
const GENESIS_BALANCE: u64 = 20_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// 3 or 5; `None`: drawn from the seed.
    pub nodes: Option<usize>,
    pub safety_ms: u64,
    pub liveness_ms: u64,
    pub plant: Plant,
    /// Whether a forging peer holds a member's identity through the safety phase; `None`:
    /// drawn from the seed (one seed in [`FORGER_ONE_IN`]).
    pub forger: Option<bool>,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig { seed, nodes: None, safety_ms: 20_000, liveness_ms: 10_000, plant: Plant::None, forger: None }
    }
}

/// Seeds drawn with a forging peer: one in this many.
pub const FORGER_ONE_IN: u64 = 4;

/// Whether `seed` runs a forging peer when the configuration leaves it to the seed. Drawn apart
/// from the run's random stream, so a seed without one runs exactly as it did before forgers.
pub fn forger_drawn(seed: u64) -> bool {
    u64::from_le_bytes(derived_key(seed, "forger", 0)[..8].try_into().unwrap_or_default()) % FORGER_ONE_IN == 0
}

/// What the forging peer did in a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ForgerStats {
    /// The member identity it held.
    pub identity: u64,
    pub sent: u64,
    /// Refused by the peer gate, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Stepped into raft-rs (consistent with the target's state, or a lie the gate can't see).
    pub passed: u64,
    /// Honest messages refused while the forger was active (a consequence of its lies, e.g. a
    /// log it truncated), by reason.
    pub honest_refused: BTreeMap<String, u64>,
    /// The first forged message that moved a replica where only a lie can (its commit index,
    /// its log, a snapshot, leadership won with a forged vote, a lease from a forged ack), if any.
    pub taint: Option<String>,
}

/// What the simulator notes of a replica around a forged message.
struct Seen {
    status: tally_core::Status,
    /// A candidate of a real election.
    candidate: bool,
    /// This log's term at its commit index.
    commit_term: Option<u64>,
    /// This log's term at each index the message carries entries for.
    entry_terms: Vec<Option<u64>>,
    /// The match index this leader holds for the node the message claims to be from, and this
    /// log's term there.
    claimed_match: Option<(u64, Option<u64>)>,
}

impl Seen {
    fn of(r: &Replica<MemLedger>, m: &Message) -> Seen {
        let status = r.status();
        let claimed_match = status.matched.iter().find(|(n, _)| *n == m.from).map(|(_, i)| (*i, r.log_term(*i)));
        Seen {
            candidate: r.campaign().0,
            commit_term: r.log_term(status.commit_index),
            entry_terms: m.get_entries().iter().map(|e| r.log_term(e.index)).collect(),
            claimed_match,
            status,
        }
    }
}

/// Counters of one run, for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunStats {
    pub nodes: usize,
    pub sim_ms: u64,
    pub faults: BTreeMap<String, u64>,
    pub failovers: u64,
    /// Configuration changes applied (voters removed and added back).
    pub reconfigurations: u64,
    /// Membership changes through the leader's flow (as `cluster add`/`remove` run them): done,
    /// and refused or failed by reason.
    pub membership_done: u64,
    pub membership_failed: BTreeMap<String, u64>,
    /// Nodes replaced by an empty one (its disk wiped), added back as a learner that catches up
    /// by a snapshot, then promoted; and snapshots such learners installed.
    pub replaced: u64,
    pub learner_snapshots: u64,
    /// Linearizable reads served after their replica judged them (`Event::Read`).
    pub reads_served: u64,
    pub ops: u64,
    pub acked: u64,
    pub bad_inputs: u64,
    pub messages: u64,
    pub max_height: u64,
    /// The forging peer, when the run had one.
    pub forger: Option<ForgerStats>,
}

/// What a run leaves: the record for the checkers, counters, and problems found on the way
/// (wrong answers to bad input).
pub struct RunOutput {
    pub record: RunRecord,
    pub stats: RunStats,
    pub bad_input_violations: Vec<String>,
    /// A digest of the whole history and final state: equal for equal seeds.
    pub digest: [u8; 32],
}

enum Frame {
    Submit(Vec<u8>),
    Get(DocKey),
}

/// How long a snapshot stream that reaches nobody takes to fail.
const SNAPSHOT_STREAM_GIVE_UP_MS: u64 = 1_000;

/// A read's answer: the document at the state the read was served from.
type DocResult = Result<Option<(tally_codec::DocMeta, Vec<u8>)>, WireError>;

enum Resp {
    Submit(SubmitReply),
    Read(DocResult),
}

/// A read judged by its replica, waiting for that replica's state to apply `index` (as the client
/// port waits for its store).
#[derive(Clone)]
struct HeldRead {
    node: usize,
    life: u64,
    tag: ClientTag,
    key: DocKey,
    index: u64,
    until: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Time for the next operation.
    Next,
    /// No answer in time: try the next replica.
    Timeout,
    /// Refused as retryable: resend to the (possibly new) target.
    Retry,
}

enum Ev {
    Tick {
        node: usize,
        life: u64,
    },
    /// Replica `to` learns that `down` is down (its link closed and a reconnect was refused),
    /// as production's transport reports it; only while `down` is still down in `life`.
    PeerDown {
        down: usize,
        to: usize,
        life: u64,
    },
    Peer {
        from: usize,
        to: usize,
        msg: Message,
    },
    Request {
        node: usize,
        client: usize,
        attempt: u64,
        frame: Frame,
    },
    Response {
        client: usize,
        attempt: u64,
        resp: Resp,
    },
    ClientWake {
        client: usize,
        attempt: u64,
        why: Wake,
    },
    Chaos,
    Restart {
        node: usize,
    },
    Resume {
        node: usize,
        pause: u64,
    },
    HealPartition {
        generation: u64,
    },
    /// Asks the leader to make `node` a voter again, until it is one.
    AddVoter {
        node: usize,
    },
    /// A held read looks again whether its replica's state has applied far enough.
    ReadWait(HeldRead),
    /// Replica `node` (in `life`) learns whether the snapshot it sent `to` arrived, as
    /// production's transport reports a streamed snapshot.
    SnapshotReport {
        node: usize,
        life: u64,
        to: usize,
        delivered: bool,
    },
    Unclog {
        link: (usize, usize),
    },
    Heal,
    /// The forging peer sends its next message.
    Forge,
    /// A forged message arrives at replica `to`.
    Forged {
        to: usize,
        msg: Message,
    },
}

struct Clock {
    anchor_sim: u64,
    anchor_mono: u64,
    drift_ppm: i64,
    wall_offset_ms: i64,
}

impl Clock {
    fn mono(&self, sim_ms: u64) -> u64 {
        let d = (sim_ms - self.anchor_sim) as i128 * (1_000_000 + self.drift_ppm as i128) / 1_000_000;
        self.anchor_mono + d as u64
    }
    fn wall(&self, sim_ms: u64) -> u64 {
        (WALL_BASE_MS as i64 + sim_ms as i64 + self.wall_offset_ms) as u64
    }
    fn set_drift(&mut self, sim_ms: u64, ppm: i64) {
        self.anchor_mono = self.mono(sim_ms);
        self.anchor_sim = sim_ms;
        self.drift_ppm = ppm;
    }
}

struct Node {
    replica: Option<Replica<MemLedger>>,
    disk: SimDisk,
    /// The ledger as of its last sync: what a crash leaves.
    durable: MemLedger,
    life: u64,
    paused: Option<u64>,
    held: Vec<Ev>,
    clock: Clock,
    crash_on_next_write: bool,
    fail_next_fsync: bool,
    was_leader_term: Option<u64>,
    /// Whether the node is one the cluster started with; a replacement starts empty and waits
    /// to be added (as a node `cluster add` brings in).
    initial: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    Transfer { account: usize },
    Docs,
    Mischief,
}

struct Current {
    hist: usize,
    /// The first attempt of this operation: an answer to any later attempt answers it.
    first_attempt: u64,
    frame_bytes: Option<Vec<u8>>,
    read_key: Option<DocKey>,
    expires_wall: u64,
}

struct Client {
    kind: ClientKind,
    target: usize,
    nonce: u64,
    attempt: u64,
    op: Option<Current>,
    /// For the mischief client: what the answer to its probe must be.
    expect: Option<Expect>,
}

enum Expect {
    Code(ErrorCode),
    /// A replay of an acknowledged request: its original receipt (or a retryable refusal).
    SameReceipt(Box<Receipt>),
}

pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha20Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    cluster_id: ClusterId,
    operator: ed25519_dalek::SigningKey,
    replica_cfg: ReplicaConfig,
    accounts: Vec<PublicKey>,
    doc_owner: PublicKey,
    hot_keys: Vec<DocKey>,
    /// Create-only documents (never deleted): I6 checks each is created once.
    cas_keys: Vec<DocKey>,
    /// Leases granted to the document owner, as receipts told the clients (for keepalives).
    leases: Vec<u64>,
    history: History,
    headers: Vec<SeenHeader>,
    acked_bytes: Vec<(Vec<u8>, Box<Receipt>)>,
    // Network.
    blocked: BTreeSet<(usize, usize)>,
    clogged: BTreeSet<(usize, usize)>,
    clog_held: BTreeMap<(usize, usize), Vec<Message>>,
    partition_generation: u64,
    loss_pct: u32,
    dup_pct: u32,
    delay_max_ms: u64,
    // Phases.
    faults_on: bool,
    clients_on: bool,
    healed_at: u64,
    height_at_heal: u64,
    first_commit_after_heal: Option<u64>,
    stats: RunStats,
    bad_input_violations: Vec<String>,
    logger: slog::Logger,
    /// The forging peer: the identity it holds, its own random stream, what it saw.
    forger: Option<(u64, ChaCha20Rng, crate::forger::Samples)>,
    /// Set while a forged message is being handled.
    forging: bool,
    /// The document each read being judged asks for, by its tag.
    read_keys: BTreeMap<ClientTag, DocKey>,
    /// What each membership change sent to a leader was for, by ticket.
    tickets: BTreeMap<u64, Purpose>,
    next_ticket: u64,
}

/// How a write to a simulated disk went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persisted {
    Written,
    /// The process crashed in the middle of the write, or its log failed: the effects after
    /// the write are not carried out.
    Failed,
}

/// Why the simulator asked for a membership change.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    Remove,
    /// Remove `node`, then replace it by an empty one.
    Replace {
        node: usize,
    },
    /// Make a node a voter again.
    AddBack,
}

fn client_tag(client: usize, attempt: u64) -> ClientTag {
    ((client as u64) << 32) | (attempt & 0xffff_ffff)
}

fn split_tag(tag: ClientTag) -> (usize, u64) {
    ((tag >> 32) as usize, tag & 0xffff_ffff)
}

/// The simulation's stand-in for ed25519 on requests (stage 2 stays in the shell; production
/// always verifies for real): a keyed blake3 of the signing bytes.
pub fn fake_sign(signer: &PublicKey, signing_bytes: &[u8]) -> Signature {
    let mut out = [0u8; 64];
    let mut h = blake3::Hasher::new_keyed(&signer.0);
    h.update(signing_bytes);
    h.finalize_xof().fill(&mut out);
    Signature(out)
}

fn fake_verify(req: &SignedRequest) -> bool {
    fake_sign(&req.request.signer, &req.request.signing_bytes()) == req.signature
}

fn derived_key(seed: u64, what: &str, i: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(what.as_bytes());
    h.update(&i.to_le_bytes());
    *h.finalize().as_bytes()
}

fn doc_key(seed: u64, i: u64) -> DocKey {
    let mut b = [0u8; 16];
    b.copy_from_slice(&derived_key(seed, "doc", i)[..16]);
    // A UUID version 4, RFC 4122 variant.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    DocKey(b)
}

impl Node {
    /// A node the cluster starts with: down until booted, its durable ledger the new cluster's.
    fn initial(genesis: &[(PublicKey, u64)], voters: &[u64]) -> Node {
        Node {
            replica: None,
            disk: SimDisk::default(),
            durable: MemLedger::new_cluster(genesis, voters),
            life: 0,
            paused: None,
            held: Vec::new(),
            clock: Clock { anchor_sim: 0, anchor_mono: 0, drift_ppm: 0, wall_offset_ms: 0 },
            crash_on_next_write: false,
            fail_next_fsync: false,
            was_leader_term: None,
            initial: true,
        }
    }
}

impl Client {
    /// A client of `kind` that sends first to node `target`, with nothing in flight.
    fn new(kind: ClientKind, target: usize) -> Client {
        Client { kind, target, nonce: 0, attempt: 0, op: None, expect: None }
    }
}

/// Four transfer clients (one account each), two document clients and the mischief client,
/// spread over the `n` nodes.
fn initial_clients(n: usize) -> Vec<Client> {
    let transfer_clients = 4usize;
    let mut clients = Vec::new();
    for i in 0..transfer_clients {
        clients.push(Client::new(ClientKind::Transfer { account: i }, i % n));
    }
    for i in 0..2 {
        clients.push(Client::new(ClientKind::Docs, i % n));
    }
    clients.push(Client::new(ClientKind::Mischief, 0));
    clients
}

/// The configuration every replica starts with (production timing); `boot` sets the node id
/// and election seed.
fn replica_config(cluster_id: ClusterId, operator: &ed25519_dalek::SigningKey, plant: Plant) -> ReplicaConfig {
    ReplicaConfig {
        node_id: 0,
        cluster_id,
        tick_ms: TICK_MS,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: HEARTBEAT_TICKS,
        batch_interval_ms: BATCH_INTERVAL_MS,
        batch_requests_max: 256,
        batch_bytes_max: 64 * 1024,
        log_retain_entries: 48,
        log_retain_bytes: 64 << 20,
        operator_key: operator.clone(),
        election_seed: 0,
        plant,
        snapshot_reports_by_shell: true,
        campaign_on_leader_down: true,
    }
}

/// The forging peer of a run that has one: the member identity it holds, its own random stream
/// (derived from the seed, so the run's stream is untouched) and empty samples.
fn forger_for(seed: u64, n: usize) -> (u64, ChaCha20Rng, crate::forger::Samples) {
    let identity = 1 + derived_key(seed, "forger-identity", 0)[0] as u64 % n as u64;
    (identity, ChaCha20Rng::from_seed(derived_key(seed, "forger-rng", 0)), crate::forger::Samples::default())
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
        let n = cfg.nodes.unwrap_or(if rng.gen_ratio(1, 3) { 5 } else { 3 });
        let seed = cfg.seed;
        let mut cluster = [0u8; 16];
        cluster.copy_from_slice(&derived_key(seed, "cluster", 0)[..16]);
        let cluster_id = ClusterId(cluster);
        let operator = ed25519_dalek::SigningKey::from_bytes(&derived_key(seed, "operator", 0));
        let accounts: Vec<PublicKey> = (0..6).map(|i| PublicKey(derived_key(seed, "account", i))).collect();
        let genesis: Vec<(PublicKey, u64)> = accounts.iter().map(|a| (*a, GENESIS_BALANCE)).collect();
        let voters: Vec<u64> = (1..=n as u64).collect();
        let mut stats = RunStats { nodes: n, ..RunStats::default() };
        let forger = cfg.forger.unwrap_or_else(|| forger_drawn(seed)).then(|| forger_for(seed, n));
        if let Some((identity, ..)) = &forger {
            stats.forger = Some(ForgerStats { identity: *identity, ..ForgerStats::default() });
        }
        Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: (0..n).map(|_| Node::initial(&genesis, &voters)).collect(),
            clients: initial_clients(n),
            cluster_id,
            replica_cfg: replica_config(cluster_id, &operator, cfg.plant),
            operator,
            accounts,
            doc_owner: PublicKey(derived_key(seed, "doc-owner", 0)),
            hot_keys: (0..3).map(|i| doc_key(seed, i)).collect(),
            cas_keys: (3..7).map(|i| doc_key(seed, i)).collect(),
            cfg,
            leases: Vec::new(),
            history: History::default(),
            headers: Vec::new(),
            acked_bytes: Vec::new(),
            blocked: BTreeSet::new(),
            clogged: BTreeSet::new(),
            clog_held: BTreeMap::new(),
            partition_generation: 0,
            loss_pct: 0,
            dup_pct: 0,
            delay_max_ms: 5,
            faults_on: false,
            clients_on: false,
            healed_at: 0,
            height_at_heal: 0,
            first_commit_after_heal: None,
            stats,
            bad_input_violations: Vec::new(),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            forger,
            forging: false,
            read_keys: BTreeMap::new(),
            tickets: BTreeMap::new(),
            next_ticket: 0,
        }
    }

    fn at(&mut self, delay_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + delay_ms, self.seq), ev);
    }

    /// Runs the whole scenario and returns its record.
    pub fn run(mut self) -> RunOutput {
        for i in 0..self.nodes.len() {
            self.boot(i);
        }
        let end = self.cfg.safety_ms + self.cfg.liveness_ms;
        self.faults_on = true;
        self.clients_on = true;
        for c in 0..self.clients.len() {
            let d = 300 + self.rng.gen_range(0..200);
            self.at(d, Ev::ClientWake { client: c, attempt: 0, why: Wake::Next });
        }
        self.at(1_000, Ev::Chaos);
        if self.forger.is_some() {
            self.at(1_000, Ev::Forge);
        }
        let heal_at = self.cfg.safety_ms;
        self.at(heal_at, Ev::Heal);
        let stop_clients_at = end.saturating_sub(1_500);
        while let Some((&(t, s), _)) = self.queue.first_key_value() {
            if t > end {
                break;
            }
            let ev = self.queue.remove(&(t, s)).expect("first key exists");
            self.now = t;
            if self.clients_on && t >= stop_clients_at {
                self.clients_on = false;
            }
            self.step(ev);
        }
        self.now = end;
        if std::env::var_os("TALLY_SIM_DESCRIBE").is_some() {
            eprintln!("{}", self.describe());
        }
        self.finish()
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Tick { node, life } => self.on_tick(node, life),
            Ev::PeerDown { down, to, life } => self.on_peer_down(down, to, life),
            Ev::Peer { from, to, msg } => self.on_peer(from, to, msg),
            Ev::Request { node, client, attempt, frame } => self.on_request_arrival(node, client, attempt, frame),
            Ev::Response { client, attempt, resp } => self.on_response(client, attempt, resp),
            Ev::ClientWake { client, attempt, why } => self.on_client_wake(client, attempt, why),
            Ev::Chaos => self.chaos(),
            Ev::Restart { node } => self.on_restart(node),
            Ev::Resume { node, pause } => {
                if self.nodes[node].paused == Some(pause) {
                    self.resume(node);
                }
            }
            Ev::HealPartition { generation } => {
                if generation == self.partition_generation {
                    self.blocked.clear();
                }
            }
            Ev::Unclog { link } => self.unclog(link),
            Ev::AddVoter { node } => self.on_add_voter(node),
            Ev::ReadWait(read) => self.serve_read(read),
            Ev::SnapshotReport { node, life, to, delivered } => {
                if self.nodes[node].life == life {
                    self.deliver(node, Event::SnapshotReport { to: to as u64 + 1, delivered });
                }
            }
            Ev::Heal => self.heal(),
            Ev::Forge => self.forge(),
            Ev::Forged { to, msg } => self.on_forged(to, msg),
        }
    }

    /// A tick for the life of node `node` that scheduled it, which schedules the next.
    fn on_tick(&mut self, node: usize, life: u64) {
        let nd = &self.nodes[node];
        if nd.life != life || nd.replica.is_none() || nd.paused.is_some() {
            return;
        }
        let (now_ms, wall_ms) = (nd.clock.mono(self.now), nd.clock.wall(self.now));
        self.deliver(node, Event::Tick { now_ms, wall_ms });
        self.at(TICK_EVENT_MS, Ev::Tick { node, life });
    }

    /// Node `to` finds node `down`'s port closed (unless `down` restarted meanwhile).
    fn on_peer_down(&mut self, down: usize, to: usize, life: u64) {
        if self.nodes[down].life != life || self.nodes[down].replica.is_some() {
            return; // restarted: the reconnect would have succeeded
        }
        if self.nodes[to].paused.is_some() {
            self.nodes[to].held.push(Ev::PeerDown { down, to, life });
            return;
        }
        if self.nodes[to].replica.is_some() {
            *self.stats.faults.entry("peer-down-reported".into()).or_default() += 1;
            self.deliver(to, Event::PeerDown(down as u64 + 1));
        }
    }

    // A paused node's process handles nothing: what reaches it waits in `held` until it resumes.

    fn on_peer(&mut self, from: usize, to: usize, msg: Message) {
        if self.nodes[to].paused.is_some() {
            self.nodes[to].held.push(Ev::Peer { from, to, msg });
            return;
        }
        if self.nodes[to].replica.is_some() {
            self.deliver(to, Event::Peer(msg));
        }
    }

    fn on_request_arrival(&mut self, node: usize, client: usize, attempt: u64, frame: Frame) {
        if self.nodes[node].paused.is_some() {
            self.nodes[node].held.push(Ev::Request { node, client, attempt, frame });
            return;
        }
        if self.nodes[node].replica.is_none() {
            return; // connection refused: the client times out and moves on
        }
        self.on_request(node, client, attempt, frame);
    }

    fn on_forged(&mut self, to: usize, msg: Message) {
        if self.nodes[to].paused.is_some() {
            self.nodes[to].held.push(Ev::Forged { to, msg });
            return;
        }
        if self.nodes[to].replica.is_some() {
            self.deliver_forged(to, msg);
        }
    }

    fn on_restart(&mut self, node: usize) {
        // A replica whose log failed runs poisoned until its supervisor restarts it; the
        // restart finds what a crash would leave.
        if self.nodes[node].replica.as_ref().is_some_and(|r| r.poisoned().is_some()) {
            self.crash(node, false);
        }
        if self.nodes[node].replica.is_none() {
            self.boot(node);
        }
    }

    /// Asks the leader to make `node` a voter again, and asks again later until it is one.
    fn on_add_voter(&mut self, node: usize) {
        let id = node as u64 + 1;
        // The leader's configuration is the one that counts (a restarting replica
        // replays older ones).
        if let Some(l) = self.leader() {
            let voters = self.nodes[l].replica.as_ref().map(Replica::voters).unwrap_or_default();
            if voters.contains(&id) {
                return;
            }
            let ticket = self.ticket(Purpose::AddBack);
            self.deliver(
                l,
                Event::ChangeMembers { ticket, change: MemberChange::Add { node: id, context: Vec::new() } },
            );
        }
        self.at(500, Ev::AddVoter { node });
    }

    // ---- replicas -------------------------------------------------------------------------

    fn boot(&mut self, i: usize) {
        if trace() {
            eprintln!(
                "{:>6} node {} starts (durable ledger at {})",
                self.now,
                i + 1,
                self.nodes[i].durable.head().index
            );
        }
        let node_seed = self.rng.next_u64();
        let nd = &mut self.nodes[i];
        nd.life += 1;
        nd.paused = None;
        nd.held.clear();
        nd.crash_on_next_write = false;
        nd.fail_next_fsync = false;
        nd.was_leader_term = None;
        let mut cfg = self.replica_cfg.clone();
        cfg.node_id = i as u64 + 1;
        cfg.election_seed = node_seed;
        let ledger = nd.durable.clone();
        let log = nd.disk.restore();
        let r = Replica::start(cfg, ledger, log, nd.clock.mono(self.now), nd.clock.wall(self.now), &self.logger)
            .unwrap_or_else(|e| panic!("replica {} does not restart from its own disk: {e}", i + 1));
        nd.replica = Some(r);
        let life = nd.life;
        let first = self.rng.gen_range(0..TICK_EVENT_MS);
        self.at(first, Ev::Tick { node: i, life });
    }

    fn crash(&mut self, i: usize, tear: bool) {
        if trace() && self.nodes[i].replica.is_some() {
            eprintln!("{:>6} node {} crashes", self.now, i + 1);
        }
        let nd = &mut self.nodes[i];
        if nd.replica.is_none() {
            return;
        }
        nd.replica = None;
        nd.paused = None;
        nd.held.clear();
        let loss = nd.disk.crash(&mut self.rng, tear);
        // Peers that can reach it find its port closed (a partition hides that, as in production).
        let life = nd.life;
        let reach: Vec<usize> = (0..self.nodes.len()).filter(|&j| j != i && !self.blocked.contains(&(i, j))).collect();
        for to in reach {
            let d = self.net_delay() + self.net_delay();
            self.at(d, Ev::PeerDown { down: i, to, life });
        }
        if loss.torn {
            *self.stats.faults.entry("torn-write".into()).or_default() += 1;
        }
        if loss.records_lost > 0 {
            *self.stats.faults.entry("unsynced-writes-lost".into()).or_default() += 1;
        }
    }

    fn resume(&mut self, i: usize) {
        self.nodes[i].paused = None;
        let held = std::mem::take(&mut self.nodes[i].held);
        for ev in held {
            self.step(ev);
        }
        let life = self.nodes[i].life;
        self.at(0, Ev::Tick { node: i, life });
    }

    /// Hands one event to replica `i` and carries out its effects in order.
    fn deliver(&mut self, i: usize, ev: Event) {
        let Some(r) = self.nodes[i].replica.as_mut() else { return };
        let effects = r.handle(ev);
        self.after_handling(i, effects);
    }

    /// Runs the effects of what replica `i` handled, and notes leadership changes.
    fn after_handling(&mut self, i: usize, effects: Vec<Effect>) {
        self.run_effects(i, effects);
        // Leadership changes (failovers).
        let nd = &mut self.nodes[i];
        if let Some(r) = nd.replica.as_ref() {
            if r.is_leader() && nd.was_leader_term != Some(r.term()) {
                if trace() {
                    eprintln!(
                        "{:>6} node {} leads term {} (applied {} height {}, voters {:?})",
                        self.now,
                        i + 1,
                        r.term(),
                        r.ledger().head().index,
                        r.ledger().head().height,
                        r.voters()
                    );
                }
                nd.was_leader_term = Some(r.term());
                self.stats.failovers += 1;
            }
            // The ledger is made durable now and then.
            if r.ledger().head().index >= nd.durable.head().index + LEDGER_SYNC_ENTRIES {
                nd.durable = r.ledger().clone();
            }
        }
    }

    fn run_effects(&mut self, i: usize, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Send(m) => self.send_peer(i, m),
                Effect::Persist(p) => {
                    if self.persist(i, &p) == Persisted::Failed {
                        return;
                    }
                }
                Effect::Reply { client, reply } => {
                    let (c, attempt) = split_tag(client);
                    let d = self.net_delay();
                    self.at(d, Ev::Response { client: c, attempt, resp: Resp::Submit(reply) });
                }
                Effect::ReadIndex { client, result } => self.on_read_index(i, client, result),
                Effect::MembershipChanged { ticket, result } => self.membership_changed(ticket, result),
                Effect::Reconfigured { ref conf_state, .. } => {
                    if trace() {
                        eprintln!("{:>6} node {} applied voters {:?}", self.now, i + 1, conf_state.voters);
                    }
                    if self.nodes[i].replica.as_ref().is_some_and(Replica::is_leader) {
                        self.stats.reconfigurations += 1;
                    }
                }
                Effect::Signed { header, signature } => self.on_signed(i, header, signature),
                Effect::PeerRefused { from, refusal } => self.on_refused(i, from, &refusal),
                Effect::ConfChangeSkipped { index, why } => {
                    let what =
                        format!("at {} ms node {} skipped committed conf change {index}: {why}", self.now, i + 1);
                    match self.stats.forger.as_mut() {
                        // Only a lie can get one committed.
                        Some(f) => {
                            f.taint.get_or_insert(what);
                        }
                        None => self.bad_input_violations.push(what),
                    }
                }
                Effect::Proposed { .. } => {}
            }
        }
    }

    /// Writes what replica `i` asked to persist to its disk, with the faults armed for it: a
    /// crash in the middle of the write, or a failed fsync (the replica then runs poisoned).
    /// Either way its supervisor restarts it later.
    fn persist(&mut self, i: usize, p: &tally_core::Persist) -> Persisted {
        let nd = &mut self.nodes[i];
        if p.snapshot.is_some() {
            // The installed state was written and synced before the log records
            // the snapshot (as the store does).
            if let Some(r) = nd.replica.as_ref() {
                nd.durable = r.ledger().clone();
            }
        }
        if p.snapshot.is_some() && !nd.initial {
            self.stats.learner_snapshots += 1;
        }
        nd.disk.write(p);
        if nd.crash_on_next_write {
            *self.stats.faults.entry("crash-mid-write".into()).or_default() += 1;
            let tear = self.rng.gen_bool(0.5);
            self.crash(i, tear);
            let d = self.rng.gen_range(200..2_000);
            self.at(d, Ev::Restart { node: i });
            return Persisted::Failed;
        }
        if nd.fail_next_fsync && p.sync {
            nd.fail_next_fsync = false;
            let r = nd.replica.as_mut().expect("a replica with effects is up");
            let more = r.handle(Event::LogFailed(tally_core::LogFailure::new(
                std::io::ErrorKind::Other,
                "log fsync: Input/output error (os error 5)",
            )));
            self.run_effects(i, more);
            // The supervisor restarts a replica whose log failed.
            let d = self.rng.gen_range(500..3_000);
            self.at(d, Ev::Restart { node: i });
            return Persisted::Failed;
        }
        if p.sync {
            nd.disk.fsync();
        }
        Persisted::Written
    }

    /// The core judged a read: serve it once the state has applied `index`, or answer the error.
    fn on_read_index(&mut self, i: usize, client: ClientTag, result: tally_core::replica::ReadResult) {
        match result {
            Ok(index) => {
                let key = self.read_keys.remove(&client).expect("a judged read was sent");
                let (life, until) = (self.nodes[i].life, self.now + READ_WAIT_MS);
                self.serve_read(HeldRead { node: i, life, tag: client, key, index, until });
            }
            Err(e) => {
                self.read_keys.remove(&client);
                let (c, attempt) = split_tag(client);
                let d = self.net_delay();
                self.at(d, Ev::Response { client: c, attempt, resp: Resp::Read(Err(e)) });
            }
        }
    }

    /// A batch header replica `i` signed: kept for the checkers, and the first after the heal
    /// times the recovery.
    fn on_signed(&mut self, i: usize, header: tally_codec::BatchHeader, signature: Signature) {
        if self.first_commit_after_heal.is_none()
            && !self.faults_on
            && self.healed_at > 0
            && header.height > self.height_at_heal
        {
            self.first_commit_after_heal = Some(self.now);
        }
        self.stats.max_height = self.stats.max_height.max(header.height);
        self.headers.push(SeenHeader { header, signature, source: format!("node {} signed", i + 1) });
    }

    fn send_peer(&mut self, from: usize, m: Message) {
        if let Some((_, rng, samples)) = self.forger.as_mut() {
            samples.observe(rng, &m);
        }
        let to = (m.to - 1) as usize;
        let snapshot = m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
        if to >= self.nodes.len() || self.blocked.contains(&(from, to)) {
            self.report_snapshot(snapshot, from, to, None);
            return;
        }
        self.stats.messages += 1;
        if self.clogged.contains(&(from, to)) {
            self.clog_held.entry((from, to)).or_default().push(m);
            self.report_snapshot(snapshot, from, to, None);
            return;
        }
        if self.rng.gen_range(0..100) < self.loss_pct {
            self.report_snapshot(snapshot, from, to, None);
            return;
        }
        if self.rng.gen_range(0..100) < self.dup_pct {
            let d = self.net_delay();
            self.at(d, Ev::Peer { from, to, msg: m.clone() });
        }
        let d = self.net_delay();
        self.at(d, Ev::Peer { from, to, msg: m });
        self.report_snapshot(snapshot, from, to, Some(d));
    }

    /// A snapshot is streamed by the shell, which reports to the sender whether it arrived:
    /// `arrives_in` ms and an acknowledgement later, or (lost, cut off) a failure once the
    /// stream gives up.
    fn report_snapshot(&mut self, snapshot: bool, from: usize, to: usize, arrives_in: Option<u64>) {
        if !snapshot {
            return;
        }
        let (delay, delivered) = match arrives_in {
            Some(d) => (d + self.net_delay(), true),
            None => (SNAPSHOT_STREAM_GIVE_UP_MS, false),
        };
        let life = self.nodes[from].life;
        self.at(delay, Ev::SnapshotReport { node: from, life, to, delivered });
    }

    fn net_delay(&mut self) -> u64 {
        if self.rng.gen_ratio(1, 50) {
            self.rng.gen_range(50..300)
        } else {
            self.rng.gen_range(1..=self.delay_max_ms)
        }
    }

    fn unclog(&mut self, link: (usize, usize)) {
        self.clogged.remove(&link);
        for m in self.clog_held.remove(&link).unwrap_or_default() {
            let d = self.net_delay();
            self.at(d, Ev::Peer { from: link.0, to: link.1, msg: m });
        }
    }

    /// Stage 2 in the shell: decode, cluster, signature, expiry by this replica's clock.
    fn on_request(&mut self, node: usize, client: usize, attempt: u64, frame: Frame) {
        let tag = client_tag(client, attempt);
        match frame {
            Frame::Get(key) => {
                if trace() {
                    let r = self.nodes[node].replica.as_ref().expect("up");
                    let mono = self.nodes[node].clock.mono(self.now);
                    eprintln!(
                        "{} read at node {} (client {client} attempt {attempt}): leader {} term {} lease_until {:?} mono {mono} height {} | {}",
                        self.now,
                        node + 1,
                        r.is_leader(),
                        r.term(),
                        r.lease_until_ms(),
                        r.ledger().head().height,
                        self.nodes
                            .iter()
                            .map(|n| n.replica.as_ref().map(|r| format!("{}:{}", r.term(), r.is_leader())).unwrap_or("down".into()))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                }
                let now_ms = self.nodes[node].clock.mono(self.now);
                self.read_keys.insert(tag, key);
                self.deliver(node, Event::Read { client: tag, now_ms });
                self.read_keys.remove(&tag);
            }
            Frame::Submit(bytes) => {
                let wall = self.nodes[node].clock.wall(self.now);
                match self.stage2(&bytes, wall) {
                    Ok(req) => self.deliver(node, Event::Submit { client: tag, req }),
                    Err(code) => {
                        let d = self.net_delay();
                        let resp = Resp::Submit(SubmitReply::Refused(WireError::from_code(code)));
                        self.at(d, Ev::Response { client, attempt, resp });
                    }
                }
            }
        }
    }

    fn stage2(&self, bytes: &[u8], wall_ms: u64) -> Result<Validated, ErrorCode> {
        let req = SignedRequest::decode(bytes).map_err(|_| ErrorCode::Malformed)?;
        if req.request.cluster_id != self.cluster_id {
            return Err(ErrorCode::WrongCluster);
        }
        if !fake_verify(&req) {
            return Err(ErrorCode::BadSignature);
        }
        if req.request.expires_at_ms < wall_ms {
            return Err(ErrorCode::Expired);
        }
        Ok(Validated { id: req.id(), request: req })
    }

    // ---- clients --------------------------------------------------------------------------

    fn client_wall(&self) -> u64 {
        WALL_BASE_MS + self.now
    }

    fn on_client_wake(&mut self, c: usize, attempt: u64, why: Wake) {
        if why != Wake::Next {
            if self.clients[c].attempt != attempt || self.clients[c].op.is_none() {
                return; // answered since
            }
            if why == Wake::Timeout {
                let n = self.nodes.len();
                self.clients[c].target = (self.clients[c].target + 1) % n;
            }
            self.resend(c);
            return;
        }
        if self.clients[c].op.is_some() || !self.clients_on {
            return;
        }
        if self.clients[c].kind == ClientKind::Mischief {
            self.mischief(c);
            return;
        }
        self.start_op(c);
    }

    /// A claim of a few contended slots, a create-only set raced by every account, a lease
    /// grant or a keepalive of a lease granted earlier (`docs/coordination.md`; checked by I6).
    fn coordination_op(&mut self, c: usize, nonce: u64) -> (PublicKey, Operation) {
        let account = *self.accounts.choose(&mut self.rng).expect("accounts");
        match self.rng.gen_range(0..4) {
            0 => (account, Operation::Claim { domain: "sim".into(), slot: self.rng.gen_range(0..16), lease: None }),
            1 => {
                let key = *self.cas_keys.choose(&mut self.rng).expect("cas keys");
                let value = format!("{{\"c\":{c},\"n\":{nonce}}}").into_bytes();
                (account, Operation::SetIf { key, value, if_revision: Some(0), lease: None })
            }
            2 if !self.leases.is_empty() => {
                let lease = *self.leases.choose(&mut self.rng).expect("leases");
                (self.doc_owner, Operation::LeaseKeepAlive { lease })
            }
            _ => (self.doc_owner, Operation::LeaseGrant { ttl_ms: self.rng.gen_range(500..3_000) }),
        }
    }

    fn sign(&self, signer: PublicKey, nonce: u64, op: Operation, expires_at_ms: u64) -> SignedRequest {
        let request = Request { cluster_id: self.cluster_id, signer, nonce, expires_at_ms, op };
        let signature = fake_sign(&signer, &request.signing_bytes());
        SignedRequest { request, signature }
    }

    fn start_op(&mut self, c: usize) {
        let expires = self.client_wall() + REQUEST_TTL_MS;
        self.clients[c].nonce += 1;
        let nonce = self.clients[c].nonce + ((c as u64) << 40);
        let (kind, frame) = match self.clients[c].kind {
            ClientKind::Transfer { .. } => {
                let account = self.rng.gen_range(0..self.accounts.len());
                let from = self.accounts[account];
                let mut to_i = self.rng.gen_range(0..self.accounts.len() - 1);
                if to_i >= account {
                    to_i += 1;
                }
                let to = self.accounts[to_i];
                let amount = self.rng.gen_range(1..=3_000);
                let req = self.sign(from, nonce, Operation::Transfer { to, amount }, expires);
                (OpKind::Transfer { id: req.id(), from, to, amount }, Frame::Submit(req.encode()))
            }
            ClientKind::Docs => {
                let key = *self.hot_keys.choose(&mut self.rng).expect("hot keys");
                match self.rng.gen_range(0..20) {
                    0..=8 => {
                        let body = format!("{{\"c\":{c},\"n\":{nonce}}}").into_bytes();
                        let req =
                            self.sign(self.doc_owner, nonce, Operation::Set { key, value: body.clone() }, expires);
                        (OpKind::Set { id: req.id(), key, body }, Frame::Submit(req.encode()))
                    }
                    9..=11 => {
                        let req = self.sign(self.doc_owner, nonce, Operation::Delete { key }, expires);
                        (OpKind::Delete { id: req.id(), key }, Frame::Submit(req.encode()))
                    }
                    12..=14 => {
                        let (signer, op) = self.coordination_op(c, nonce);
                        let req = self.sign(signer, nonce, op.clone(), expires);
                        (OpKind::Coord { id: req.id(), signer, op }, Frame::Submit(req.encode()))
                    }
                    _ => (OpKind::Get { key }, Frame::Get(key)),
                }
            }
            ClientKind::Mischief => unreachable!("mischief has no history ops"),
        };
        let hist = self.history.ops.len();
        self.history.ops.push(Op {
            client: c as u64,
            invoke_ms: self.now,
            complete_ms: None,
            kind,
            result: OpResult::Unknown,
        });
        self.stats.ops += 1;
        let (frame_bytes, read_key) = match frame {
            Frame::Submit(b) => (Some(b), None),
            Frame::Get(k) => (None, Some(k)),
        };
        let first_attempt = self.clients[c].attempt + 1;
        self.clients[c].op = Some(Current { hist, first_attempt, frame_bytes, read_key, expires_wall: expires });
        self.resend(c);
    }

    /// Sends the current operation (the same bytes every time) to the client's target.
    fn resend(&mut self, c: usize) {
        let Some(op) = self.clients[c].op.as_ref() else { return };
        if self.client_wall() > op.expires_wall {
            // Given up: it may or may not have happened.
            self.finish_op(c, None);
            return;
        }
        let frame = match (&op.frame_bytes, &op.read_key) {
            (Some(b), _) => Frame::Submit(b.clone()),
            (None, Some(k)) => Frame::Get(*k),
            (None, None) => unreachable!("an op is a submission or a read"),
        };
        if matches!(frame, Frame::Get(_)) && self.rng.gen_bool(0.5) {
            // Reads are spread over the replicas, as a load-balancing client would.
            self.clients[c].target = self.rng.gen_range(0..self.nodes.len());
        }
        self.clients[c].attempt += 1;
        let attempt = self.clients[c].attempt;
        let node = self.clients[c].target;
        let d = self.net_delay();
        self.at(d, Ev::Request { node, client: c, attempt, frame });
        self.at(CLIENT_TIMEOUT_MS, Ev::ClientWake { client: c, attempt, why: Wake::Timeout });
    }

    fn finish_op(&mut self, c: usize, result: Option<OpResult>) {
        let Some(op) = self.clients[c].op.take() else { return };
        if let Some(result) = result {
            let o = &mut self.history.ops[op.hist];
            o.complete_ms = Some(self.now);
            o.result = result;
        }
        self.clients[c].attempt += 1; // outstanding timeouts are now stale
        let think = self.rng.gen_range(0..60);
        let attempt = self.clients[c].attempt;
        self.at(think, Ev::ClientWake { client: c, attempt, why: Wake::Next });
    }

    fn on_response(&mut self, c: usize, attempt: u64, resp: Resp) {
        if self.clients[c].kind == ClientKind::Mischief {
            self.on_mischief_response(c, attempt, resp);
            return;
        }
        let Some(op) = self.clients[c].op.as_ref() else { return };
        let current = attempt == self.clients[c].attempt;
        match resp {
            Resp::Submit(SubmitReply::Committed { receipt, .. }) => {
                // Any attempt's receipt answers the operation (they all carry the same bytes);
                // a late answer to an earlier operation of this client does not.
                let op_id = self.history.ops[op.hist].kind.id();
                if op_id != Some(receipt.request.id()) {
                    return;
                }
                if let Some(b) = op.frame_bytes.clone() {
                    self.stats.acked += 1;
                    self.headers.push(SeenHeader {
                        header: receipt.header.clone(),
                        signature: receipt.signature,
                        source: format!("receipt to client {c}"),
                    });
                    if let tally_codec::Outcome::LeaseGranted { lease, .. } = receipt.outcome {
                        if self.leases.len() >= 16 {
                            self.leases.remove(0);
                        }
                        self.leases.push(lease);
                    }
                    self.acked_bytes.push((b, receipt.clone()));
                    self.finish_op(c, Some(OpResult::Committed(receipt)));
                }
            }
            Resp::Submit(SubmitReply::Refused(e)) if current => self.on_refusal(c, e),
            // A read answered late, after the client moved on to another replica, is still an
            // answer to this operation.
            Resp::Read(Ok(doc)) if attempt >= op.first_attempt => {
                let read = doc.map(|(meta, body)| DocRead { revision: meta.revision, body });
                self.finish_op(c, Some(OpResult::Read(read)));
            }
            Resp::Read(Err(e)) if current => self.on_refusal(c, e),
            _ => {}
        }
    }

    fn on_refusal(&mut self, c: usize, e: WireError) {
        let n = self.nodes.len();

        match e.code {
            // Refused before executing, for good: it did not happen and never will.
            ErrorCode::InsufficientFunds | ErrorCode::BadSignature | ErrorCode::Malformed | ErrorCode::WrongCluster => {
                self.finish_op(c, Some(OpResult::Refused(e.code)));
            }
            // Expired: an earlier attempt may have executed before the id was forgotten.
            ErrorCode::Expired => self.finish_op(c, None),
            _ => {
                let hinted =
                    e.leader_hint.as_deref().and_then(|h| h.parse::<usize>().ok()).filter(|h| *h >= 1 && *h <= n);
                self.clients[c].target = match hinted {
                    Some(h) => h - 1,
                    None => (self.clients[c].target + 1) % n,
                };
                self.clients[c].attempt += 1; // the pending timeout is stale
                let attempt = self.clients[c].attempt;
                let d = self.rng.gen_range(10..60);
                self.at(d, Ev::ClientWake { client: c, attempt, why: Wake::Retry });
            }
        }
    }

    /// Bad input: garbage, a bad signature, an expired request or a replay. Each must get its
    /// own answer and change nothing.
    fn mischief(&mut self, c: usize) {
        let n = self.nodes.len();
        let node = self.rng.gen_range(0..n);
        let expires = self.client_wall() + REQUEST_TTL_MS;
        self.clients[c].nonce += 1;
        let nonce = self.clients[c].nonce + ((c as u64) << 40);
        let account = self.accounts[0];
        let (bytes, expect) = match self.rng.gen_range(0..4) {
            0 => {
                let len = self.rng.gen_range(0..200);
                let mut b = vec![0u8; len];
                self.rng.fill_bytes(&mut b);
                (b, Expect::Code(ErrorCode::Malformed))
            }
            1 => {
                let to = self.accounts[1];
                let mut req = self.sign(account, nonce, Operation::Transfer { to, amount: 1 }, expires);
                req.signature.0[0] ^= 1;
                (req.encode(), Expect::Code(ErrorCode::BadSignature))
            }
            2 => {
                let to = self.accounts[1];
                let past = self.client_wall().saturating_sub(60_000);
                let req = self.sign(account, nonce, Operation::Transfer { to, amount: 1 }, past);
                (req.encode(), Expect::Code(ErrorCode::Expired))
            }
            _ => match self.acked_bytes.choose(&mut self.rng) {
                Some((b, r)) => (b.clone(), Expect::SameReceipt(r.clone())),
                None => (vec![0xff; 3], Expect::Code(ErrorCode::Malformed)),
            },
        };
        if bytes.len() > 3
            && matches!(expect, Expect::Code(ErrorCode::Malformed))
            && SignedRequest::decode(&bytes).is_ok()
        {
            // Random bytes that happen to decode: not a probe.
            let attempt = self.clients[c].attempt;
            self.at(100, Ev::ClientWake { client: c, attempt, why: Wake::Next });
            return;
        }
        self.clients[c].expect = Some(expect);
        self.clients[c].attempt += 1;
        let attempt = self.clients[c].attempt;
        self.stats.bad_inputs += 1;
        let d = self.net_delay();
        self.at(d, Ev::Request { node, client: c, attempt, frame: Frame::Submit(bytes) });
        let next = self.rng.gen_range(200..600);
        self.at(next, Ev::ClientWake { client: c, attempt, why: Wake::Next });
    }

    fn on_mischief_response(&mut self, c: usize, attempt: u64, resp: Resp) {
        if attempt != self.clients[c].attempt {
            return;
        }
        let Some(expect) = self.clients[c].expect.take() else { return };
        let Resp::Submit(reply) = resp else { return };
        let ok = match (&expect, &reply) {
            (Expect::Code(code), SubmitReply::Refused(e)) => e.code == *code,
            (Expect::SameReceipt(r), SubmitReply::Committed { receipt, .. }) => receipt == r,
            // A replay refused as retryable (not the leader, in a failover) or expired changes
            // nothing either.
            (Expect::SameReceipt(_), SubmitReply::Refused(e)) => matches!(
                e.code,
                ErrorCode::NotLeader
                    | ErrorCode::Retry
                    | ErrorCode::Expired
                    | ErrorCode::Overloaded
                    | ErrorCode::LogFailed
            ),
            _ => false,
        };
        if !ok {
            let what = match expect {
                Expect::Code(code) => format!("expected {code:?}"),
                Expect::SameReceipt(_) => "expected the original receipt".into(),
            };
            self.bad_input_violations.push(format!("bad input at {} ms: {what}, got {reply:?}", self.now));
        }
    }

    // ---- the forging peer -----------------------------------------------------------------

    /// The forger sends a message to an honest replica, until the faults heal.
    fn forge(&mut self) {
        if !self.faults_on {
            return;
        }
        let n = self.nodes.len();
        let Some((me, rng, samples)) = self.forger.as_mut() else { return };
        let targets: Vec<usize> = (0..n).filter(|i| *i as u64 + 1 != *me && self.nodes[*i].replica.is_some()).collect();
        let next = rng.gen_range(5..80);
        if let Some(&t) = targets.choose(rng) {
            let s = self.nodes[t].replica.as_ref().map(Replica::status).unwrap_or_default();
            let target = crate::forger::Target {
                id: t as u64 + 1,
                term: s.term,
                committed: s.commit_index,
                last_index: s.last_index,
                nodes: n as u64,
            };
            let msg = crate::forger::forge(rng, *me, &target, samples);
            let delay = rng.gen_range(1..=10);
            if let Some(f) = self.stats.forger.as_mut() {
                f.sent += 1;
            }
            self.at(delay, Ev::Forged { to: t, msg });
        }
        self.at(next, Ev::Forge);
    }

    /// Hands a forged message to replica `i`, and records whether it passed the gate and moved
    /// the replica where only a lie can ([`Sim::lie_effect`]). The replica is looked at right
    /// after its core handled the message, before the effects run: a crash while persisting
    /// them would otherwise hide what the message did.
    fn deliver_forged(&mut self, i: usize, msg: Message) {
        let refused_before = self.forged_refused();
        let Some(r) = self.nodes[i].replica.as_mut() else { return };
        let before = Seen::of(r, &msg);
        self.forging = true;
        let effects = r.handle(Event::Peer(msg.clone()));
        let after = Seen::of(r, &msg);
        self.after_handling(i, effects);
        self.forging = false;
        if self.forged_refused() != refused_before {
            return;
        }
        let moved = self.lie_effect(i, &msg, &before, &after);
        let now = self.now;
        if let Some(f) = self.stats.forger.as_mut() {
            f.passed += 1;
            if let Some(what) = moved {
                let kind = msg.get_msg_type();
                f.taint.get_or_insert_with(|| format!("at {now} ms a forged {kind:?} {what} on node {}", i + 1));
            }
        }
    }

    /// What a forged message that passed replica `i`'s gate moved that only a lie can, now or
    /// later: its commit index beyond what any other replica committed (no taint before this
    /// one, so theirs are true commits; Log Matching covers the entries below), what
    /// [`moved_by_a_lie`] sees in the replica's status, entries replaced, and state raft-rs or
    /// the lease keep for later (a match index for an entry the claimed node does not hold, a
    /// vote it did not give, a lease acknowledgement).
    fn lie_effect(&self, i: usize, msg: &Message, before: &Seen, after: &Seen) -> Option<String> {
        use raft::eraftpb::MessageType as T;
        let (from, to) = (before.status.commit_index, after.status.commit_index);
        if to > from {
            let known = self.nodes.iter().enumerate().any(|(j, n)| {
                j != i
                    && n.replica.as_ref().is_some_and(|o| o.commit_index() >= to && o.log_term(to) == after.commit_term)
            });
            if !known {
                return Some(format!(
                    "moved the commit index from {from} to {to}, past what any other replica committed"
                ));
            }
        }
        if let Some(what) = moved_by_a_lie(msg.get_msg_type(), &before.status, &after.status) {
            return Some(what);
        }
        let replaced = msg.get_entries().iter().zip(before.entry_terms.iter().zip(&after.entry_terms));
        if let Some((e, _)) = replaced.clone().find(|(_, (was, is))| was != is) {
            return Some(format!("replaced entry {}", e.index));
        }
        let claimed = self.nodes.get((msg.from as usize).wrapping_sub(1)).and_then(|n| n.replica.as_ref());
        let term = before.status.term;
        match msg.get_msg_type() {
            T::MsgAppendResponse if after.status.is_leader => {
                let (now, leader_term) = after.claimed_match?;
                let holds = claimed.and_then(|c| c.log_term(now)) == leader_term;
                (now > before.claimed_match.map_or(0, |(m, _)| m) && !holds)
                    .then(|| format!("set node {}'s match index to {now}, an entry it does not hold", msg.from))
            }
            T::MsgRequestVoteResponse if before.candidate && !msg.reject && msg.term == term => {
                let gave = claimed.is_some_and(|c| c.term() == term && c.campaign().1 == i as u64 + 1);
                (!gave).then(|| format!("counted a vote node {} did not give", msg.from))
            }
            T::MsgHeartbeatResponse if before.status.is_leader && msg.term == term => {
                tally_failover::lease::parse_probe_context(&msg.context)
                    .filter(|(t, _)| *t == term)
                    .map(|_| format!("recorded a lease acknowledgement node {} may not have sent", msg.from))
            }
            _ => None,
        }
    }

    fn forged_refused(&self) -> u64 {
        self.stats.forger.as_ref().map_or(0, |f| f.refused.values().sum())
    }

    /// A peer message refused by replica `i`'s gate: expected of the forger; of an honest
    /// replica, only as a consequence of the forger's lies, and never without a forger.
    fn on_refused(&mut self, i: usize, from: u64, refusal: &tally_core::Refusal) {
        let reason = refusal.reason().to_string();
        match (self.forging, self.stats.forger.as_mut()) {
            (true, Some(f)) => *f.refused.entry(reason).or_default() += 1,
            (false, Some(f)) => *f.honest_refused.entry(reason).or_default() += 1,
            (_, None) => {
                if !matches!(refusal, tally_core::Refusal::NotMember(_)) {
                    self.bad_input_violations.push(format!(
                        "at {} ms node {} refused an honest message from node {from}: {refusal}",
                        self.now,
                        i + 1
                    ));
                }
            }
        }
    }

    // ---- faults ---------------------------------------------------------------------------

    fn fault(&mut self, kind: &str) {
        if trace() {
            eprintln!("{:>6} fault {kind}", self.now);
        }
        *self.stats.faults.entry(kind.into()).or_default() += 1;
    }

    fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.replica.as_ref().is_some_and(|r| r.is_leader()))
    }

    /// Injects one fault drawn from the seed, then schedules the next.
    fn chaos(&mut self) {
        if !self.faults_on {
            return;
        }
        let pick = self.rng.gen_range(0..100);
        match pick {
            0..=13 => self.crash_any(),
            14..=23 => {
                if let Some(l) = self.leader() {
                    self.fault("crash-leader");
                    self.crash(l, false);
                    let d = self.rng.gen_range(100..3_000);
                    self.at(d, Ev::Restart { node: l });
                }
            }
            24..=29 => {
                let i = self.rng.gen_range(0..self.nodes.len());
                if self.nodes[i].replica.is_some() {
                    self.fault("crash-mid-write-armed");
                    self.nodes[i].crash_on_next_write = true;
                }
            }
            30..=41 => self.pause_one(),
            42..=55 => self.partition(),
            56..=63 => self.swizzle_clog(),
            64..=73 => {
                self.fault("network-weather");
                self.loss_pct = self.rng.gen_range(0..=10);
                self.dup_pct = self.rng.gen_range(0..=5);
                self.delay_max_ms = self.rng.gen_range(1..=40);
            }
            74..=79 => {
                let i = self.rng.gen_range(0..self.nodes.len());
                if self.nodes[i].replica.is_some() {
                    self.fault("fsync-failure");
                    self.nodes[i].fail_next_fsync = true;
                }
            }
            80..=89 => {
                let i = self.rng.gen_range(0..self.nodes.len());
                self.fault("clock-drift");
                let ppm = self.rng.gen_range(-DRIFT_PPM_MAX..=DRIFT_PPM_MAX);
                let now = self.now;
                self.nodes[i].clock.set_drift(now, ppm);
            }
            90..=94 => self.change_membership(),
            _ => {
                let i = self.rng.gen_range(0..self.nodes.len());
                self.fault("clock-jump");
                self.nodes[i].clock.wall_offset_ms = self.rng.gen_range(-WALL_JUMP_MS_MAX..=WALL_JUMP_MS_MAX);
            }
        }
        let d = self.rng.gen_range(100..1_200);
        self.at(d, Ev::Chaos);
    }

    /// Crashes a node drawn at random (down already or not) and restarts it later.
    fn crash_any(&mut self) {
        let i = self.rng.gen_range(0..self.nodes.len());
        self.fault("crash");
        self.crash(i, false);
        let d = self.rng.gen_range(100..3_000);
        self.at(d, Ev::Restart { node: i });
    }

    /// Pauses a running node (the leader half the time there is one) for shorter or longer than
    /// the election timeout (500 ms).
    fn pause_one(&mut self) {
        let n = self.nodes.len();
        let i = self.leader().filter(|_| self.rng.gen_bool(0.5)).unwrap_or_else(|| self.rng.gen_range(0..n));
        if self.nodes[i].replica.is_some() && self.nodes[i].paused.is_none() {
            let d = if self.rng.gen_bool(0.5) { self.rng.gen_range(50..400) } else { self.rng.gen_range(600..2_500) };
            self.fault("pause");
            self.seq += 1;
            let token = self.seq;
            self.nodes[i].paused = Some(token);
            self.at(d, Ev::Resume { node: i, pause: token });
        }
    }

    /// Membership, as `cluster remove` and `cluster add` run it: a voter (the leader too) is
    /// removed, and added back later as a learner that catches up, then is promoted; or a
    /// follower is removed and replaced by an empty node (its disk wiped), which catches up by
    /// a snapshot. Only while every node is a voter.
    fn change_membership(&mut self) {
        let n = self.nodes.len();
        let leader = self.leader();
        let full = leader.and_then(|l| self.nodes[l].replica.as_ref()).is_some_and(|r| r.voters().len() == n);
        let (true, Some(l)) = (full, leader) else { return };
        let i = self.rng.gen_range(0..n);
        let replace = i != l && self.rng.gen_bool(0.5);
        self.fault(if replace {
            "replace-node"
        } else if i == l {
            "remove-leader"
        } else {
            "remove-voter"
        });
        let ticket = self.ticket(if replace { Purpose::Replace { node: i } } else { Purpose::Remove });
        self.deliver(l, Event::ChangeMembers { ticket, change: MemberChange::Remove { node: i as u64 + 1 } });
        let d = self.rng.gen_range(1_000..4_000);
        self.at(d, Ev::AddVoter { node: i });
    }

    fn partition(&mut self) {
        let n = self.nodes.len();
        let mut ids: Vec<usize> = (0..n).collect();
        ids.shuffle(&mut self.rng);
        self.blocked.clear();
        let kind = self.rng.gen_range(0..3);
        let cut = |a: &[usize], b: &[usize], blocked: &mut BTreeSet<(usize, usize)>| {
            for &x in a {
                for &y in b {
                    blocked.insert((x, y));
                    blocked.insert((y, x));
                }
            }
        };
        match kind {
            0 => {
                // Minority / majority.
                let k = self.rng.gen_range(1..=n / 2);
                let (minority, majority) = ids.split_at(k);
                cut(minority, majority, &mut self.blocked);
                self.fault("partition-minority");
            }
            1 => {
                let l = self.leader().unwrap_or(ids[0]);
                let rest: Vec<usize> = (0..n).filter(|x| *x != l).collect();
                cut(&[l], &rest, &mut self.blocked);
                self.fault("partition-isolate-leader");
            }
            _ => {
                // A bridge: two sides that only the bridge node connects.
                let bridge = ids[0];
                let rest = &ids[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cut(a, b, &mut self.blocked);
                let _ = bridge;
                self.fault("partition-bridge");
            }
        }
        self.partition_generation += 1;
        let generation = self.partition_generation;
        let d = self.rng.gen_range(300..4_000);
        self.at(d, Ev::HealPartition { generation });
    }

    /// FoundationDB's swizzle-clog: clog a random subset of links one by one, then unclog them
    /// in random order.
    fn swizzle_clog(&mut self) {
        self.fault("swizzle-clog");
        let n = self.nodes.len();
        let mut links: Vec<(usize, usize)> =
            (0..n).flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b))).collect();
        links.shuffle(&mut self.rng);
        let k = self.rng.gen_range(1..=links.len());
        let chosen = &links[..k];
        let mut t = 0;
        for l in chosen {
            self.clogged.insert(*l);
            t += self.rng.gen_range(10..200);
        }
        let mut order = chosen.to_vec();
        order.shuffle(&mut self.rng);
        for l in order {
            t += self.rng.gen_range(50..500);
            self.at(t, Ev::Unclog { link: l });
        }
    }

    /// The end of the safety phase: every fault is healed.
    fn heal(&mut self) {
        self.faults_on = false;
        self.blocked.clear();
        self.partition_generation += 1;
        for l in self.clogged.clone() {
            self.unclog(l);
        }
        self.loss_pct = 0;
        self.dup_pct = 0;
        self.delay_max_ms = 5;
        for i in 0..self.nodes.len() {
            self.nodes[i].crash_on_next_write = false;
            self.nodes[i].fail_next_fsync = false;
            if self.nodes[i].paused.is_some() {
                self.resume(i);
            }
            if self.nodes[i].replica.as_ref().is_some_and(|r| r.poisoned().is_some()) {
                self.crash(i, false);
            }
            if self.nodes[i].replica.is_none() {
                self.boot(i);
            }
        }
        for i in 0..self.nodes.len() {
            self.at(0, Ev::AddVoter { node: i });
        }
        self.healed_at = self.now;
        self.height_at_heal = self.max_height();
    }

    fn ticket(&mut self, purpose: Purpose) -> u64 {
        self.next_ticket += 1;
        self.tickets.insert(self.next_ticket, purpose);
        self.next_ticket
    }

    /// A membership change was answered; a node removed to be replaced is wiped and started
    /// empty, waiting to be added.
    fn membership_changed(&mut self, ticket: u64, result: Result<(), MembershipError>) {
        let purpose = self.tickets.remove(&ticket);
        if trace() {
            eprintln!("{:>6} membership change {ticket} ({purpose:?}): {result:?}", self.now);
        }
        match result {
            Ok(()) => self.stats.membership_done += 1,
            Err(e) => {
                let reason = format!("{e:?}").split(['(', ' ', '{']).next().unwrap_or_default().to_string();
                *self.stats.membership_failed.entry(reason).or_default() += 1;
                return;
            }
        }
        if let Some(Purpose::Replace { node }) = purpose {
            self.crash(node, false);
            // Messages on their way to the old process die with its connections.
            self.queue.retain(|_, ev| !matches!(ev, Ev::Peer { to, .. } if *to == node));
            for (link, held) in &mut self.clog_held {
                if link.1 == node {
                    held.clear();
                }
            }
            let genesis: Vec<(PublicKey, u64)> = self.accounts.iter().map(|a| (*a, GENESIS_BALANCE)).collect();
            let nd = &mut self.nodes[node];
            nd.disk = SimDisk::default();
            nd.durable = MemLedger::genesis(&genesis);
            nd.initial = false;
            self.stats.replaced += 1;
            self.boot(node);
        }
    }

    /// A read its replica judged: served from that replica's state once it has applied the
    /// read's index, refused `Overloaded` when it has not within [`READ_WAIT_MS`], dropped with
    /// the replica (its client times out).
    fn serve_read(&mut self, read: HeldRead) {
        let nd = &self.nodes[read.node];
        let Some(r) = nd.replica.as_ref().filter(|_| nd.life == read.life) else { return };
        let result = if r.ledger().head().index >= read.index {
            self.stats.reads_served += 1;
            Ok(r.ledger().doc(&read.key))
        } else if self.now >= read.until {
            Err(WireError::new(ErrorCode::Overloaded, "store is behind the commit index; retry"))
        } else {
            self.at(1, Ev::ReadWait(read));
            return;
        };
        let (c, attempt) = split_tag(read.tag);
        let d = self.net_delay();
        self.at(d, Ev::Response { client: c, attempt, resp: Resp::Read(result) });
    }

    fn max_height(&self) -> u64 {
        self.nodes.iter().filter_map(|n| n.replica.as_ref()).map(|r| r.ledger().head().height).max().unwrap_or(0)
    }

    /// One line per replica: role, term, indexes, faults in force (for replaying a seed).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, nd) in self.nodes.iter().enumerate() {
            let state = match nd.replica.as_ref() {
                None => "down".to_string(),
                Some(r) => {
                    format!(
                    "term {} leader {:?} is_leader {} commit {} applied {} height {} poisoned {:?} paused {} seq {:?}",
                    r.term(),
                    r.leader_id(),
                    r.is_leader(),
                    r.commit_index(),
                    r.ledger().head().index,
                    r.ledger().head().height,
                    r.poisoned(),
                    nd.paused.is_some(),
                    r.sequencer_state()
                ) + &format!(" [{}]", r.progress_summary())
                }
            };
            out.push_str(&format!("node {}: {state}\n", i + 1));
        }
        out.push_str(&format!("blocked {:?} clogged {:?}\n", self.blocked, self.clogged));
        for (i, c) in self.clients.iter().enumerate() {
            out.push_str(&format!(
                "client {i}: target {} attempt {} op {:?}\n",
                c.target,
                c.attempt,
                c.op.as_ref().map(|o| (o.hist, o.expires_wall))
            ));
        }
        out
    }

    fn finish(self) -> RunOutput {
        let mut replicas = Vec::new();
        for (i, nd) in self.nodes.iter().enumerate() {
            let ledger = match nd.replica.as_ref() {
                Some(r) => r.ledger(),
                None => &nd.durable,
            };
            replicas.push(ReplicaFinal {
                node_id: i as u64 + 1,
                batches: ledger
                    .batches()
                    .iter()
                    .map(|(e, s)| StoredBatch {
                        header: e.header.clone(),
                        signature: *s,
                        request_ids: e.requests.iter().map(SignedRequest::id).collect(),
                        outcomes: e.outcomes.clone(),
                    })
                    .collect(),
                applied_height: ledger.head().height,
                state_digest: ledger.state_digest(),
                balances: ledger.balances(),
            });
        }
        let height_at_end = Some(self.max_height());
        let record = RunRecord {
            operator: PublicKey(self.operator.verifying_key().to_bytes()),
            genesis_total: u128::from(GENESIS_BALANCE) * self.accounts.len() as u128,
            history: self.history,
            replicas,
            headers: self.headers,
            healed_at_ms: self.healed_at,
            height_at_heal: self.height_at_heal,
            height_at_end,
            first_commit_after_heal_ms: self.first_commit_after_heal,
        };
        let mut stats = self.stats;
        stats.sim_ms = self.now;
        let digest = run_digest(&record);
        RunOutput { record, stats, bad_input_violations: self.bad_input_violations, digest }
    }
}

/// What a forged message of `kind` that passed the gate did, seen in the replica's status,
/// that only a lie can (commits are judged by [`Sim::lie_effect`]): change a follower's
/// entries, install a snapshot, win an election with a forged vote, or extend a leader's lease
/// with a forged probe ack. (The log's first index moves by compaction too: only a snapshot's
/// counts.)
fn moved_by_a_lie(
    kind: raft::eraftpb::MessageType,
    before: &tally_core::Status,
    after: &tally_core::Status,
) -> Option<String> {
    use raft::eraftpb::MessageType as T;
    let rewrote = || {
        format!(
            "rewrote the log ({}..={} to {}..={})",
            before.first_index, before.last_index, after.first_index, after.last_index
        )
    };
    match kind {
        T::MsgAppend if !after.is_leader && after.last_index != before.last_index => Some(rewrote()),
        T::MsgSnapshot if after.last_index != before.last_index || after.first_index > before.first_index => {
            Some(rewrote())
        }
        T::MsgRequestVoteResponse | T::MsgRequestPreVoteResponse if after.is_leader && !before.is_leader => {
            Some("won an election".into())
        }
        T::MsgHeartbeatResponse if after.lease_until_ms > before.lease_until_ms => Some("extended the lease".into()),
        _ => None,
    }
}

/// `TALLY_SIM_TRACE=1`: print faults, restarts, leaders and configurations as they happen.
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TALLY_SIM_TRACE").is_some())
}

/// A digest of everything a run produced: the history and every replica's final state.
pub fn run_digest(r: &RunRecord) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(format!("{:?}", r.history.ops).as_bytes());
    for rep in &r.replicas {
        h.update(&rep.applied_height.to_le_bytes());
        h.update(&rep.state_digest.0);
        for b in &rep.batches {
            h.update(&b.header.hash().0);
        }
    }
    h.update(format!("{:?}", r.headers).as_bytes());
    *h.finalize().as_bytes()
}
