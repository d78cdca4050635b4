//! Wiring: the threads of one replica and the state they share.
//!
//! ```text
//!  conn readers (s1,s2) ──submission queue──▶ replica thread (replica_thread.rs: tally_core::Replica)
//!        ▲     │                                    │ peers, WAL, store (LevelDB + segments)
//!        └─────┼────────── replies ◀────────────────┘
//!              └─ Watch frames ──▶ watch-0, watch-1, watch-timer (watch/mod.rs) ──▶ conn writers
//! ```

use crossbeam::channel::{bounded, Receiver, Sender};
use ed25519_dalek::SigningKey;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tally_codec::wire::{Envelope, ServerMessage, SubmitReply, WireError};
use tally_codec::{ClusterId, ErrorCode, PublicKey, Tables};
use tally_failover::env::Env;
use tally_failover::Replicator;
use tally_store::state::Store;
use tally_store::wal::Wal;

/// Client frames waiting for the sequencer, at most. A full queue refuses with `Overloaded`
/// (retryable), so memory stays bounded: 128 frames × 8,189 requests × ~200 B ≈ 200 MB worst case,
/// and far more than the ~100 ms of work a batch interval holds.
pub const SUBMISSIONS_QUEUED_MAX: usize = 128;

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
    pub req: crate::validate::Validated,
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
    poisoned: Option<tally_core::LogFailure>,
}

/// State shared by the connection threads and the replica thread.
pub struct Shared {
    pub opts: NodeOptions,
    pub tables: Tables,
    pub operator_pub: PublicKey,
    /// The applied state; the replica thread writes it, the connection threads read it.
    pub store: Arc<Mutex<Store>>,
    pub submit_tx: Sender<Vec<Submission>>,
    pub submit_rx: Receiver<Vec<Submission>>,
    replicator: OnceLock<Arc<dyn Replicator>>,
    progress: Mutex<Progress>,
    progress_cv: Condvar,
    stopping: AtomicBool,
    /// Who may hold a connection to the client port (see [`tally_net::admission`]).
    pub admission: Arc<tally_net::Admission>,
    /// A follower's link to the leader for forwarded frames.
    pub forwarder: crate::forward::Forwarder,
    /// Decompressed, checked public keys (stage 2).
    pub keys: crate::validate::KeyCache,
    /// Admin commands taken and not yet expired (replay protection).
    pub admin_seen: crate::admin_replay::SeenAdmin,
    /// Watch serving: its own threads, limits and budgets (see [`crate::watch`]).
    pub watch: Arc<crate::watch::WatchService>,
    /// The admin scans' budget (see [`crate::queries::audit_page`]).
    pub audit: crate::queries::AuditGate,
}

impl Shared {
    pub fn replicator(&self) -> &Arc<dyn Replicator> {
        self.replicator.get().expect("the replicator starts before any stage uses it")
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
    pub fn poisoned(&self) -> Option<tally_core::LogFailure> {
        self.progress.lock().poisoned.clone()
    }
    pub fn poison(&self, failure: tally_core::LogFailure) {
        self.progress.lock().poisoned = Some(failure);
        self.progress_cv.notify_all();
    }
    /// The commit index the replica thread knows (published before it answers anyone).
    pub fn publish_commit(&self, commit_index: u64) {
        let mut p = self.progress.lock();
        if commit_index > p.committed.index {
            p.committed.index = commit_index;
        }
    }
    /// What the store holds (the store thread, after each write): reads wait for it.
    pub fn publish_applied(&self, index: u64, height: u64) {
        let mut p = self.progress.lock();
        if index <= p.applied.index && height <= p.applied.height {
            return;
        }
        p.applied = Applied { index: index.max(p.applied.index), height: height.max(p.applied.height) };
        if p.committed.index < p.applied.index {
            p.committed.index = p.applied.index;
        }
        p.committed.height = p.committed.height.max(p.applied.height);
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
    /// The leader's client address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        let r = self.replicator.get()?;
        let leader = r.role().leader_id?;
        r.members().into_iter().find(|m| m.node_id == leader).map(|m| m.client_addr)
    }
}

/// A running replica.
pub struct Node {
    pub shared: Arc<Shared>,
    pub local_addr: std::net::SocketAddr,
}

impl Node {
    /// Starts the client port and the replica thread. The store must already hold genesis.
    ///
    /// # Errors
    /// When the listener can't bind or the replica can't start.
    pub fn start(
        opts: NodeOptions,
        store: Store,
        shell: crate::replica_thread::ShellConfig,
        wal: Wal,
        env: Box<dyn Env>,
    ) -> Result<Node, String> {
        let listener =
            std::net::TcpListener::bind(&opts.listen).map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
        let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let applied = store.applied();
        let (submit_tx, submit_rx) = bounded(SUBMISSIONS_QUEUED_MAX);
        let operator_pub = PublicKey(opts.operator_key.verifying_key().to_bytes());
        let progress = Applied { index: applied.index, height: applied.height };
        let relay_dial = opts.relay_dial.clone();
        let shared = Arc::new(Shared {
            tables: *store.tables(),
            opts,
            operator_pub,
            store: Arc::new(Mutex::new(store)),
            submit_tx,
            submit_rx,
            replicator: OnceLock::new(),
            progress: Mutex::new(Progress { committed: progress, applied: progress, poisoned: None }),
            progress_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            admission: tally_net::Admission::new(tally_net::AdmissionLimits::CLIENT_PORT),
            keys: crate::validate::KeyCache::default(),
            forwarder: crate::forward::Forwarder::new(relay_dial),
            admin_seen: crate::admin_replay::SeenAdmin::default(),
            watch: crate::watch::WatchService::new(crate::watch::WatchLimits::DEFAULT),
            audit: crate::queries::AuditGate::default(),
        });
        let replicator = crate::replica_thread::start(&shared, shell, wal, env)?;
        if shared.replicator.set(replicator).is_err() {
            return Err("replicator set twice".into());
        }
        shared.watch.start(&shared)?;
        spawn("listener", {
            let s = shared.clone();
            move || crate::client_port::listen(s, listener)
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
