//! Wiring: the threads of one replica and the state they share.
//!
//! ```text
//!  conn readers (s1,s2) ──seq queue──▶ sequencer (s3,s4,s5) ──propose──▶ Replicator
//!        ▲                                                                  │ committed, in order
//!        └──────── replies ◀── confirm (s6) ◀───────────────────────────────┘
//!                                   └──▶ store thread (s7) ──▶ LevelDB + segments
//! ```

use crate::s5_propose::Pending;
use crate::s6_confirm::{ChainHead, ToStore};
use crossbeam::channel::{bounded, Receiver, Sender};
use ed25519_dalek::SigningKey;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tally_codec::wire::{Envelope, ServerMessage, SubmitReply, WireError};
use tally_codec::{ClusterId, DocKey, DocMeta, ErrorCode, PublicKey, RequestLocation, Tables};
use tally_core::state::SeenIds;
use tally_failover::env::Env;
use tally_failover::{Committed, Replicator};
use tally_store::state::Store;

/// Client frames waiting for the sequencer, at most. A full queue refuses with `Overloaded`
/// (retryable), so memory stays bounded: 128 frames × 8,189 requests × ~200 B ≈ 200 MB worst case,
/// and far more than the ~100 ms of work a batch interval holds.
pub const SUBMISSIONS_QUEUED_MAX: usize = 128;
/// Committed entries waiting for the confirm thread.
pub const COMMITTED_QUEUED_MAX: usize = 1024;
/// Confirmed batches waiting for the store thread.
pub const STORE_QUEUED_MAX: usize = 256;

/// Settings of one replica's pipeline.
#[derive(Clone)]
pub struct NodeOptions {
    pub node_id: u64,
    pub cluster_id: ClusterId,
    pub operator_key: SigningKey,
    pub batch_interval_ms: u64,
    pub batch_requests_max: usize,
    pub listen: String,
    /// How often the store is fsynced so the log can be compacted behind it.
    pub store_sync_interval_ms: u64,
    /// A batch closes before its entry would pass this many bytes.
    pub batch_bytes_max: usize,
    /// TLS on the client port (`None`: plaintext, an explicit opt-in).
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// How this node reaches the leader's client port to relay frames.
    pub relay_dial: tally_net::Dial,
    /// Keys that may change the cluster (membership, scans).
    pub admin_keys: Vec<PublicKey>,
}

/// A request that passed stage 2 and the slot its answer goes to.
pub struct Submission {
    pub req: crate::s2_validate::Validated,
    pub waiter: Waiter,
}

/// The reply of one client frame, sent once every request in it is answered.
pub struct FrameReply {
    id: u64,
    slots: Mutex<Vec<Option<SubmitReply>>>,
    remaining: AtomicUsize,
    out: Sender<Envelope<ServerMessage>>,
}

impl FrameReply {
    pub fn new(id: u64, n: usize, out: Sender<Envelope<ServerMessage>>) -> Arc<Self> {
        Arc::new(FrameReply { id, slots: Mutex::new(vec![None; n]), remaining: AtomicUsize::new(n), out })
    }

    fn fill(&self, slot: usize, reply: SubmitReply) {
        {
            let mut slots = self.slots.lock();
            assert!(slots[slot].is_none(), "a request is answered once");
            slots[slot] = Some(reply);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let replies: Vec<SubmitReply> =
                std::mem::take(&mut *self.slots.lock()).into_iter().map(|r| r.expect("every slot filled")).collect();
            // A client that doesn't read its replies is dropped rather than buffered without bound.
            if self.out.try_send(Envelope { id: self.id, msg: ServerMessage::Submitted(replies) }).is_err() {
                tracing::debug!(frame = self.id, "client gone or not reading; reply dropped");
            }
        }
    }
}

/// Where one request's answer goes.
pub struct Waiter {
    pub frame: Arc<FrameReply>,
    pub slot: usize,
}

impl Waiter {
    pub fn fill(self, reply: SubmitReply) {
        self.frame.fill(self.slot, reply);
    }
    pub fn refuse(self, code: ErrorCode) {
        self.fill(SubmitReply::Refused(WireError::from_code(code)));
    }
    pub fn refuse_not_leader(self, shared: &Shared) {
        let mut e = WireError::from_code(ErrorCode::NotLeader);
        e.leader_hint = shared.leader_addr();
        self.fill(SubmitReply::Refused(e));
    }
}

/// Log index and batch height together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub height: u64,
}

#[derive(Default)]
struct Progress {
    committed: Applied,
    applied: Applied,
    poisoned: Option<String>,
}

/// State shared by the stages of one replica.
pub struct Shared {
    pub opts: NodeOptions,
    pub tables: Tables,
    pub operator_pub: PublicKey,
    pub store: Mutex<Store>,
    pub seen: Mutex<SeenIds>,
    pub pending: Mutex<Pending>,
    pub seq_tx: Sender<Vec<Submission>>,
    pub seq_rx: Receiver<Vec<Submission>>,
    pub store_tx: Sender<ToStore>,
    replicator: OnceLock<Arc<dyn Replicator>>,
    progress: Mutex<Progress>,
    progress_cv: Condvar,
    stopping: AtomicBool,
    /// Who may hold a connection to the client port (see [`tally_net::admission`]).
    pub admission: Arc<tally_net::Admission>,
    /// A follower's link to the leader for forwarded frames.
    pub forwarder: crate::forward::Forwarder,
    /// Decompressed, checked public keys (stage 2).
    pub keys: crate::s2_validate::KeyCache,
    /// Set while the confirm thread holds an entry taken from the committed channel.
    pub confirm_busy: AtomicBool,
    /// The committed channel's receiving end, to tell when it is drained (snapshot installs).
    pub committed_rx: Receiver<Committed>,
    /// A new chain head for the confirm thread after a snapshot install.
    pub head_reset: Mutex<Option<ChainHead>>,
    /// Term of the entry at the store's applied index; written under the store lock.
    pub applied_term: std::sync::atomic::AtomicU64,
    me: Weak<Shared>,
}

impl Shared {
    pub fn replicator(&self) -> &Arc<dyn Replicator> {
        self.replicator.get().expect("the replicator starts before any stage uses it")
    }
    pub fn self_arc(&self) -> Arc<Shared> {
        self.me.upgrade().expect("shared state outlives its users")
    }
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    pub fn applied_index(&self) -> u64 {
        self.progress.lock().applied.index
    }
    pub fn applied_height(&self) -> u64 {
        self.progress.lock().applied.height
    }
    pub fn committed(&self) -> Applied {
        self.progress.lock().committed
    }
    pub fn poisoned(&self) -> Option<String> {
        self.progress.lock().poisoned.clone()
    }
    pub fn poison(&self, why: String) {
        self.progress.lock().poisoned = Some(why);
        self.progress_cv.notify_all();
    }
    pub fn set_committed(&self, c: Applied) {
        let mut p = self.progress.lock();
        assert!(c.height > p.committed.height || p.committed.height == 0, "commits go forward");
        p.committed = c;
    }
    /// After a snapshot install: the commit point is at least the snapshot, and the executed ids
    /// come from the installed request index.
    pub fn after_install(&self, a: Applied) {
        {
            let mut p = self.progress.lock();
            if p.committed.index < a.index {
                p.committed = a;
            }
        }
        // Forgotten by the chain's clock, not the wall clock (see `rebuild_seen_ids`).
        let chain_ms = self.store_time_ms();
        let seen = seen_from_index(&self.store.lock(), &self.tables, chain_ms);
        *self.seen.lock() = seen;
    }

    pub fn set_applied(&self, a: Applied) {
        let mut p = self.progress.lock();
        assert!(a.index >= p.applied.index && a.height >= p.applied.height, "applied goes forward");
        p.applied = a;
        drop(p);
        self.progress_cv.notify_all();
    }
    /// Waits until the store has applied log index `index`.
    pub fn wait_applied_index(&self, index: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |p| p.applied.index >= index)
    }
    /// Waits until the store has applied batch `height`.
    pub fn wait_applied_height(&self, height: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |p| p.applied.height >= height)
    }
    fn wait_until(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.progress.lock();
        while !done(&p) {
            if p.poisoned.is_some() || self.progress_cv.wait_until(&mut p, deadline).timed_out() {
                return done(&p);
            }
        }
        true
    }
    /// Time of the applied head's header (0 before the first batch).
    pub fn store_time_ms(&self) -> u64 {
        let store = self.store.lock();
        let h = store.applied().height;
        if h == 0 {
            return 0;
        }
        store.batch(h).ok().flatten().map_or(0, |r| r.header.time_ms)
    }
    /// The leader's client address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        let r = self.replicator.get()?;
        let leader = r.role().leader_id?;
        r.members().into_iter().find(|m| m.node_id == leader).map(|m| m.client_addr)
    }
}

/// Lets the sequencer's view read what it has not cached.
/// The store lock is taken on the first miss and held for the rest of the prefetch pass.
pub struct StoreBacking<'a> {
    pub shared: &'a Shared,
    pub guard: Option<parking_lot::MutexGuard<'a, Store>>,
}

impl StoreBacking<'_> {
    fn store(&mut self) -> &Store {
        self.guard.get_or_insert_with(|| self.shared.store.lock())
    }
}

impl tally_core::state::Backing for StoreBacking<'_> {
    fn balance(&mut self, account: &PublicKey) -> Option<u64> {
        self.store().balance(account).expect("store reads succeed; a failing store poisons the node")
    }
    fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta> {
        self.store().doc_meta(key).expect("store reads succeed; a failing store poisons the node")
    }
}

/// A running replica pipeline.
pub struct Node {
    pub shared: Arc<Shared>,
    pub local_addr: std::net::SocketAddr,
}

/// Builds the replicator once the committed channel exists: `(committed_tx, applied_index)`.
/// Builds the replicator once the committed channel exists:
/// `(committed_tx, applied_index, state snapshots)`.
pub type ReplicatorFactory<'a> = Box<
    dyn FnOnce(
            Sender<Committed>,
            u64,
            Arc<dyn tally_failover::snapshot::StateSnapshots>,
        ) -> Result<Arc<dyn Replicator>, String>
        + 'a,
>;

impl Node {
    /// Starts every stage. The store must already hold genesis.
    ///
    /// # Errors
    /// When the listener can't bind or the replicator can't start.
    pub fn start(
        opts: NodeOptions,
        store: Store,
        env: Box<dyn Env>,
        make_replicator: ReplicatorFactory<'_>,
    ) -> Result<Node, String> {
        let listener =
            std::net::TcpListener::bind(&opts.listen).map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
        let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let applied = store.applied();
        let (seq_tx, seq_rx) = bounded(SUBMISSIONS_QUEUED_MAX);
        let (store_tx, store_rx) = bounded(STORE_QUEUED_MAX);
        let (committed_tx, committed_rx) = bounded(COMMITTED_QUEUED_MAX);
        let operator_pub = PublicKey(opts.operator_key.verifying_key().to_bytes());
        let progress = Applied { index: applied.index, height: applied.height };
        let relay_dial = opts.relay_dial.clone();
        let shared = Arc::new_cyclic(|me| Shared {
            tables: *store.tables(),
            opts,
            operator_pub,
            store: Mutex::new(store),
            seen: Mutex::new(SeenIds::default()),
            pending: Mutex::new(Pending::default()),
            seq_tx,
            seq_rx,
            store_tx,
            replicator: OnceLock::new(),
            progress: Mutex::new(Progress { committed: progress, applied: progress, poisoned: None }),
            progress_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            admission: tally_net::Admission::new(tally_net::AdmissionLimits::CLIENT_PORT),
            keys: crate::s2_validate::KeyCache::default(),
            forwarder: crate::forward::Forwarder::new(relay_dial),
            confirm_busy: AtomicBool::new(false),
            committed_rx: committed_rx.clone(),
            head_reset: Mutex::new(None),
            applied_term: std::sync::atomic::AtomicU64::new(0),
            me: me.clone(),
        });
        let chain_ms = shared.store_time_ms();
        rebuild_seen_ids(&shared, chain_ms);
        let head = ChainHead { height: applied.height, hash: applied.header_hash, state_digest: applied.state_digest };
        spawn("confirm", {
            let s = shared.clone();
            move || crate::s6_confirm::run(s, committed_rx, head)
        })?;
        spawn("store", {
            let s = shared.clone();
            move || crate::s7_apply::run(s, store_rx)
        })?;
        let snapshots = Arc::new(crate::snapshots::PipelineSnapshots::new(Arc::downgrade(&shared)));
        let replicator = make_replicator(committed_tx, applied.index, snapshots)?;
        if shared.replicator.set(replicator).is_err() {
            return Err("replicator set twice".into());
        }
        spawn("sequencer", {
            let s = shared.clone();
            move || crate::s4_sequence::run(s, env)
        })?;
        spawn("listener", {
            let s = shared.clone();
            move || crate::s1_receive::listen(s, listener)
        })?;
        Ok(Node { shared, local_addr })
    }

    /// Makes the store durable (every file fsynced): for a graceful shutdown. The log is the
    /// source of truth either way; this only spares the next start a replay.
    ///
    /// # Errors
    /// When the store can't be synced.
    pub fn sync_store(&self) -> Result<(), String> {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.store.lock().sync_all().map_err(|e| e.to_string())
    }
}

/// The stage threads run for the life of the process (a graceful stop syncs the store and exits).
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("cannot start {name} thread: {e}"))
}

/// Every unexpired id in the store's request index (after a snapshot, or past its boundary).
fn seen_from_index(store: &Store, tables: &Tables, now_ms: u64) -> SeenIds {
    let mut seen = SeenIds::default();
    match store.kv_scan(&tables.requests.0) {
        Ok(pairs) => {
            for (k, v) in pairs {
                let (Ok(id), Ok(loc)) = (
                    <[u8; 32]>::try_from(&k[4..]).map(tally_codec::RequestId),
                    tally_codec::decode::<RequestLocation>(&v, 64),
                ) else {
                    continue;
                };
                if loc.expires_at_ms >= now_ms {
                    seen.insert(id, loc);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot rebuild seen ids from the request index"),
    }
    seen
}

/// After a restart, reload the ids of recent batches whose requests have not expired, so a
/// retry across the restart still gets its original receipt. Bounded by the expiry window.
///
/// `now_ms` is the chain's time (the last applied header's), never the wall clock: stage 4
/// refuses requests expired by the batch clock, which never goes back, so an id must be kept
/// until that clock passes its expiry. Judged by a wall clock ahead of the chain, a restart
/// forgot ids that a batch built after the clock stepped back still took as live, and executed
/// them again (found by the simulator in the core, seed 207739).
pub fn rebuild_seen_ids(shared: &Shared, now_ms: u64) {
    let window_start = now_ms.saturating_sub(crate::s2_validate::EXPIRY_WINDOW_MAX_MS);
    let store = shared.store.lock();
    let mut seen = shared.seen.lock();
    let mut height = store.applied().height;
    while height > 0 {
        let Ok(Some(record)) = store.batch(height) else {
            // A snapshot boundary: older batches live elsewhere, but the snapshot carried every
            // live id in the request index.
            *seen = seen_from_index(&store, &shared.tables, now_ms);
            tracing::info!(ids = seen.len(), "seen ids rebuilt from the request index");
            return;
        };
        if record.header.time_ms < window_start {
            break;
        }
        let Ok(body) = store.batch_body(&record) else { break };
        for (leaf, r) in body.requests.iter().enumerate() {
            seen.insert(
                r.id(),
                RequestLocation { height, leaf_index: leaf as u32, expires_at_ms: r.request.expires_at_ms },
            );
        }
        height -= 1;
    }
    seen.prune(now_ms);
    tracing::info!(ids = seen.len(), "seen ids rebuilt from recent batches");
}
