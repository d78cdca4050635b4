//! Wiring: starts the threads of one replica, each given what it uses, once. Read it to see
//! what exists; to follow a request, read `client_port` → `validate` → `replica_thread`.
//!
//! ```text
//!  client port (client_port/) ──submissions──▶ replica thread (replica_thread.rs: tally_core::Replica)
//!     │  ▲  │                                     │ peers, WAL, store (LevelDB + segments)
//!     │  │  └─ membership, read judgements ──────▶│ (control.rs)
//!     │  └──── replies (each frame's slots) ◀─────┤
//!     │                                           ▼
//!     └─ reads ──▶ StatusBoard (status.rs) ◀── publishes: role, members, commit, applied, stop
//!  watch threads (watch/): pages read from the store, written by each connection's writer
//! ```

use crate::client_port::ClientPort;
use crate::status::{Applied, StatusBoard};
use crossbeam::channel::bounded;
use ed25519_dalek::SigningKey;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tally_codec::{ClusterId, PublicKey};
use tally_failover::env::Env;
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

/// A running replica: what `tallyd` reads (status, connections) and how it stops.
pub struct Node {
    /// The replica's status (health, gauges).
    pub status: Arc<StatusBoard>,
    /// The client port (its admission counts).
    pub port: Arc<ClientPort>,
    pub local_addr: std::net::SocketAddr,
    store: Arc<Mutex<Store>>,
    stopping: Arc<AtomicBool>,
}

impl Node {
    /// Starts the replica thread, the watch threads and the client port. The store must already
    /// hold genesis.
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
        let status = Arc::new(StatusBoard::new(opts.node_id, Applied { index: applied.index, height: applied.height }));
        let store = Arc::new(Mutex::new(store));
        let stopping = Arc::new(AtomicBool::new(false));
        let (submit_tx, submit_rx) = bounded(SUBMISSIONS_QUEUED_MAX);
        let forwarder = Arc::new(crate::forward::Forwarder::new(opts.relay_dial.clone()));
        let wiring = crate::replica_thread::Wiring {
            store: store.clone(),
            submissions: submit_rx,
            status: status.clone(),
            forwarder: forwarder.clone(),
        };
        let control = crate::replica_thread::start(&opts, shell, wiring, wal, env)?;
        let watch = crate::watch::WatchService::new(crate::watch::WatchLimits::DEFAULT);
        watch.start(&store, &status, &stopping)?;
        let port = Arc::new(ClientPort::new(crate::client_port::PortParts {
            opts,
            store: store.clone(),
            submit_tx,
            status: status.clone(),
            control,
            forwarder,
            watch,
            stopping: stopping.clone(),
        }));
        crate::client_port::start(&port, listener)?;
        Ok(Node { status, port, local_addr, store, stopping })
    }

    /// Makes the store durable (every file fsynced): for a graceful shutdown. The log is the
    /// source of truth either way; this only spares the next start a replay.
    ///
    /// # Errors
    /// When the store can't be synced.
    pub fn sync_store(&self) -> Result<(), String> {
        self.stopping.store(true, Ordering::Release);
        self.store.lock().sync_all().map_err(|e| e.to_string())
    }
}

/// A thread that runs for the life of the process (a graceful stop syncs the store and exits).
///
/// # Errors
/// When the thread cannot start.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("cannot start {name} thread: {e}"))
}
