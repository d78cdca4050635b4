//! The core's [`Ledger`] on the production store: LevelDB and the segment files
//! ([`tally_store::state::Store`]), shared with the connection threads that read it.
//!
//! Writes are behind: the replica thread applies a committed batch to an in-memory overlay
//! (its write set, its request ids, the batch itself) and queues the store write for the
//! store thread, which writes LevelDB and fsyncs the segment file off the replica thread.
//! Reads look in the overlay first. The store's own applied index (what the store thread
//! wrote) is what the client port's read barrier waits for and what the log is compacted
//! behind; the log is the source of truth for anything newer, so a crash loses nothing.
//! A failed store write is reported by the next apply, and the core stops.
//!
//! Snapshots: a large state is exported on its own thread ([`BackgroundExports`]), never on the
//! replica's. Until it is ready, [`Ledger::export`] says "not yet" and raft-rs asks again. The
//! data handed to raft-rs is a [`SnapshotEnvelope`] with the members' addresses and an empty
//! state: the peer transport streams the held export in its place, in chunks, so the state is
//! never copied on the replica thread. The follower's transport reassembles the whole envelope.

use crate::warming::{WarmHandle, WARM_RECEIPTS_MAX};
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally_codec::limits::SNAPSHOT_BYTES_MAX;
use tally_codec::{
    BatchEntry, Committed, DocKey, DocMeta, PublicKey, Receipt, RequestId, RequestLocation, Signature, TableId,
};
use tally_core::ledger::{Exported, LedgerError};
use tally_core::{Ledger, LedgerHead, LogFailure};
use tally_failover::revocation::{Revocation, RevokedCerts};
use tally_failover::snapshot::{BackgroundExports, ExportedState, SnapshotEnvelope, SnapshotSource};
use tally_failover::storage::MemberAddr;
use tally_store::state::{StateSnapshot, Store};

/// How long an unused export is kept for the next follower that needs one.
pub const EXPORT_KEEP: Duration = Duration::from_secs(60);

/// The members' addresses as the replica thread knows them, shared with the ledger (snapshots
/// carry them) and the API (status, leader address).
pub type Members = Arc<Mutex<std::collections::BTreeMap<u64, MemberAddr>>>;

/// Store writes queued for the store thread, at most: about 13 s of batches (a few hundred MB
/// at full load, held by the overlay anyway). A full queue makes the replica thread wait, which
/// slows commits rather than memory growing, but also stops its heartbeats: the queue must
/// outlast a store stall (rusty-leveldb compacts inside `write`), or a slow store costs the
/// leader its leadership. At 32 (3.2 s) a 10-minute full-load run saw a 3 s leader silence.
pub const STORE_QUEUED_MAX: usize = 128;

/// A wait for the store this long on the replica thread is logged (a store write this long times
/// five too).
pub const STORE_WAIT_WARN_MS: u64 = 100;

/// Values the store holds, kept in memory after the overlay forgets them, at most this many
/// bytes (keys and values): the replica thread's reads of recently written keys never wait for
/// the store thread, which holds the store through each write (and any LevelDB compaction
/// inside it: up to seconds).
pub const CLEAN_CACHE_BYTES: usize = 64 << 20;

/// Recently written keys with the value the store now holds (`None`: absent), evicted oldest
/// first past a byte budget; also the values the warmer read for requests not yet executed.
struct CleanCache {
    map: HashMap<Vec<u8>, CleanEntry>,
    /// (key, generation) in insertion order; an entry is stale when its key was inserted again.
    order: VecDeque<(Vec<u8>, u64)>,
    bytes: usize,
    budget: usize,
    generation: u64,
    /// Values the warmer read at a store index below this may be stale: a write of that index
    /// or later was evicted (a read of its key could no longer tell), or a snapshot replaced
    /// the state.
    stale_below: u64,
}

/// A value of the clean cache.
struct CleanEntry {
    value: Option<Vec<u8>>,
    generation: u64,
    /// The log index the value is current as of.
    index: u64,
}

impl CleanCache {
    fn new(budget: usize) -> Self {
        CleanCache { map: HashMap::new(), order: VecDeque::new(), bytes: 0, budget, generation: 0, stale_below: 0 }
    }

    fn cost(key: &[u8], value: Option<&Vec<u8>>) -> usize {
        key.len() + value.map_or(0, Vec::len) + 40
    }

    fn get(&self, key: &[u8]) -> Option<Option<&Vec<u8>>> {
        self.map.get(key).map(|e| e.value.as_ref())
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    /// `key` holds `value` in the store as of log index `index`.
    fn insert(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, index: u64) {
        self.generation += 1;
        self.bytes += Self::cost(&key, value.as_ref());
        let entry = CleanEntry { value, generation: self.generation, index };
        if let Some(old) = self.map.insert(key.clone(), entry) {
            self.bytes -= Self::cost(&key, old.value.as_ref());
        }
        self.order.push_back((key, self.generation));
        while self.bytes > self.budget {
            let Some((k, g)) = self.order.pop_front() else { break };
            if self.map.get(&k).is_some_and(|e| e.generation == g) {
                let e = self.map.remove(&k).expect("present");
                self.bytes -= Self::cost(&k, e.value.as_ref());
                self.stale_below = self.stale_below.max(e.index);
            }
        }
        // Stale order entries are dropped when they reach the front; keep them bounded too.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// Forgets everything: a snapshot at `index` replaced the state.
    fn clear(&mut self, index: u64) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
        self.stale_below = self.stale_below.max(index);
    }
}

/// How long the `slow-store-write` failpoint holds the store: past the longest election timeout
/// (2 s by default).
pub const SLOW_STORE_WRITE_FAILPOINT: Duration = Duration::from_secs(4);

/// A write for the store thread.
enum StoreOp {
    Batch {
        index: u64,
        batch: Committed,
        signature: Signature,
    },
    Noop {
        index: u64,
        term: u64,
    },
    Conf {
        index: u64,
        term: u64,
        conf: Vec<u8>,
    },
    /// Make everything written so far durable (fsync LevelDB's files and the segments).
    Sync,
}

/// What the store thread reports back.
#[derive(Default)]
struct Flushed {
    /// The last log index the store holds, and its batch height.
    index: AtomicU64,
    height: AtomicU64,
    /// Why a store write or sync failed, if one did (the store thread stops then), and whether
    /// it was a sync.
    failed: Mutex<Option<(LogFailure, bool)>>,
    /// The last log index made durable by a `Sync` (the log may be compacted up to it).
    synced: AtomicU64,
}

/// Writes of one applied entry not yet in the store.
struct Unflushed {
    index: u64,
    keys: Vec<Vec<u8>>,
    height: Option<u64>,
    ids: Arc<Vec<RequestId>>,
}

/// The production ledger.
pub struct StoreLedger {
    store: Arc<Mutex<Store>>,
    tables: tally_codec::Tables,
    exports: Arc<BackgroundExports>,
    members: Members,
    /// The revoked node certificates, carried by the snapshots this ledger exports.
    revoked: RevokedCerts,
    /// The members and revoked certificates an installed snapshot carried, for the shell to
    /// persist with its marker.
    installed_members: Mutex<Option<Vec<MemberAddr>>>,
    installed_revoked: Mutex<Vec<Revocation>>,
    /// Where the applied state stands (ahead of the store by what is queued).
    head: LedgerHead,
    conf: Option<Vec<u8>>,
    /// Key → (value, log index that wrote it) for writes not yet in the store.
    overlay: HashMap<Vec<u8>, (Option<Vec<u8>>, u64)>,
    /// What the overlay forgot, as the store holds it (bounded).
    clean: CleanCache,
    /// The lease table as applied (loaded once at start, kept by every apply and install): a new
    /// leader loads it without reading the store on the replica thread.
    leases: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    /// Reads that went to the store (the caches missed).
    store_reads: std::sync::atomic::AtomicU64,
    /// Receipts of duplicate requests the warmer read, by (id, height).
    warm_receipts: HashMap<(RequestId, u64), Option<Receipt>>,
    /// The warmer's reads, handed over by the replica thread (taken in by `refresh`).
    warm_inbox: WarmHandle,
    /// Batches not yet in the store, by height, and where their requests are.
    batches: HashMap<u64, (Arc<BatchEntry>, Signature)>,
    ids: HashMap<RequestId, RequestLocation>,
    unflushed: VecDeque<Unflushed>,
    tx: Sender<StoreOp>,
    flushed: Arc<Flushed>,
}

pub(crate) fn store_failed(what: &str, e: impl std::fmt::Display) -> ! {
    // A store that cannot be read cannot serve the state machine; the replica ends and a backup
    // takes over (`docs/architecture.md` §9: a panic anywhere ends the replica).
    panic!("store {what} failed: {e}")
}

impl StoreLedger {
    /// A ledger on `store`, with its store thread. `on_flushed(index, height)` is called by the
    /// store thread after each write (the client port's read barrier waits on it).
    ///
    /// # Errors
    /// When the store thread cannot start or the stored configuration cannot be read.
    pub fn new(
        store: Arc<Mutex<Store>>,
        members: Members,
        on_flushed: impl Fn(u64, u64) + Send + 'static,
    ) -> Result<Self, String> {
        let source = store.clone();
        let exports = Arc::new(BackgroundExports::new(EXPORT_KEEP, move || export(&source)));
        let (head, conf, tables, leases) = {
            let s = store.lock();
            let tables = *s.tables();
            let leases = s.kv_scan(&tables.leases.0).map_err(|e| format!("stored leases: {e}"))?;
            (
                head_of(&s.applied()),
                s.conf().map_err(|e| format!("stored configuration: {e}"))?,
                tables,
                leases.into_iter().collect(),
            )
        };
        let flushed = Arc::new(Flushed {
            index: AtomicU64::new(head.index),
            height: AtomicU64::new(head.height),
            failed: Mutex::new(None),
            // Nothing is known durable before the first sync of this process.
            synced: AtomicU64::new(0),
        });
        let (tx, rx) = bounded(STORE_QUEUED_MAX);
        let (s2, f2) = (store.clone(), flushed.clone());
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || store_thread(&s2, &rx, &f2, &on_flushed))
            .map_err(|e| format!("cannot start the store thread: {e}"))?;
        Ok(StoreLedger {
            store,
            tables,
            exports,
            members,
            revoked: RevokedCerts::default(),
            installed_members: Mutex::new(None),
            installed_revoked: Mutex::new(Vec::new()),
            head,
            conf,
            overlay: HashMap::new(),
            clean: CleanCache::new(CLEAN_CACHE_BYTES),
            leases,
            warm_receipts: HashMap::new(),
            warm_inbox: WarmHandle::default(),
            store_reads: std::sync::atomic::AtomicU64::new(0),
            batches: HashMap::new(),
            ids: HashMap::new(),
            unflushed: VecDeque::new(),
            tx,
            flushed,
        })
    }

    /// Queues a store write, after reporting an earlier failure (the core then stops).
    fn queue(&mut self, op: StoreOp, written: Unflushed) -> Result<(), LedgerError> {
        if let Some(failure) = self.failed() {
            return Err(LedgerError::Write(failure));
        }
        let sent = match self.tx.try_send(op) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(op)) => {
                // The replica thread waits, and sends no heartbeat meanwhile: say so.
                let waited = std::time::Instant::now();
                let sent = self.tx.send(op).map_err(|_| ());
                let waited_ms = waited.elapsed().as_millis();
                if waited_ms >= 100 {
                    tracing::warn!(
                        waited_ms,
                        queued = STORE_QUEUED_MAX,
                        "store queue full: the replica thread waited for the store"
                    );
                }
                sent
            }
            Err(TrySendError::Disconnected(_)) => Err(()),
        };
        if sent.is_err() {
            // The store thread records why before it returns and drops the receiver: a send
            // that raced with its failure reports the failure itself (a full disk must be
            // called a full disk, or tallyd exits instead of waiting for space).
            let failure = self.failed().unwrap_or_else(|| LogFailure::other("the store thread stopped"));
            return Err(LedgerError::Write(failure));
        }
        self.unflushed.push_back(written);
        self.forget_flushed();
        Ok(())
    }

    /// Whether the store thread is half a queue behind: the shell stops taking new submissions
    /// until it catches up.
    pub fn store_behind(&self) -> bool {
        self.tx.len() >= STORE_QUEUED_MAX / 2
    }

    /// Asks the store thread to make what it wrote durable (behind the writes queued before).
    /// A full queue skips this round.
    pub fn request_sync(&self) {
        let _ = self.tx.try_send(StoreOp::Sync);
    }

    /// The last log index the store made durable ([`StoreLedger::request_sync`]).
    pub fn synced_index(&self) -> u64 {
        self.flushed.synced.load(Ordering::Acquire)
    }

    /// Drops from the overlay what the store now holds.
    fn forget_flushed(&mut self) {
        let flushed = self.flushed.index.load(Ordering::Acquire);
        while self.unflushed.front().is_some_and(|u| u.index <= flushed) {
            let u = self.unflushed.pop_front().expect("front exists");
            for k in u.keys {
                if self.overlay.get(&k).is_some_and(|(_, i)| *i == u.index) {
                    let (v, _) = self.overlay.remove(&k).expect("present");
                    self.clean.insert(k, v, u.index);
                }
            }
            if let Some(h) = u.height {
                self.batches.remove(&h);
            }
            for &id in u.ids.iter() {
                if self.ids.get(&id).and_then(|l| u.height.map(|h| l.height == h)).unwrap_or(false) {
                    self.ids.remove(&id);
                }
            }
        }
    }

    /// Why a store write or sync failed, if one did (the store thread has stopped then).
    pub fn failed(&self) -> Option<LogFailure> {
        self.flushed.failed.lock().as_ref().map(|(f, _)| f.clone())
    }

    /// Why a store sync failed, if one did.
    pub fn failed_sync(&self) -> Option<LogFailure> {
        self.flushed.failed.lock().as_ref().filter(|(_, sync)| *sync).map(|(f, _)| f.clone())
    }

    /// The log index and batch height the store holds (behind [`Ledger::head`] by what is
    /// queued).
    pub fn flushed(&self) -> (u64, u64) {
        (self.flushed.index.load(Ordering::Acquire), self.flushed.height.load(Ordering::Acquire))
    }

    /// Waits until the store holds everything applied (before a snapshot install, or a sync).
    ///
    /// # Errors
    /// A store write that failed.
    pub fn drain(&mut self) -> Result<(), LedgerError> {
        while self.flushed.index.load(Ordering::Acquire) < self.head.index {
            if let Some(failure) = self.failed() {
                return Err(LedgerError::Write(failure));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.forget_flushed();
        Ok(())
    }

    /// The store, for a read the overlay could not answer (on the replica thread). A wait of
    /// `STORE_WAIT_WARN_MS` or more is logged: the replica sends no heartbeat meanwhile.
    fn read_store(&self) -> parking_lot::MutexGuard<'_, Store> {
        self.store_reads.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let guard = self.store.lock();
        let waited = started.elapsed();
        if waited >= Duration::from_millis(STORE_WAIT_WARN_MS) {
            tracing::warn!(ms = waited.as_millis() as u64, "a read on the replica thread waited for the store");
            metrics::counter!("tally_store_read_waits_total").increment(1);
        }
        guard
    }

    /// The value of `key` if the overlay or the clean cache knows it (`Some(None)`: absent).
    fn overlay_get(&self, key: &[u8]) -> Option<Option<&Vec<u8>>> {
        match self.overlay.get(key) {
            Some((v, _)) => Some(v.as_ref()),
            None => self.clean.get(key),
        }
    }

    /// Reads that had to go to the store so far (for tests and diagnosis).
    pub fn store_reads(&self) -> u64 {
        self.store_reads.load(Ordering::Relaxed)
    }

    /// Of `keys`, those neither the overlay nor the clean cache answers (each once): executing a
    /// request that reads them would go to the store.
    pub fn cold_keys(&self, keys: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut cold: Vec<Vec<u8>> = keys.into_iter().filter(|k| self.overlay_get(k).is_none()).collect();
        cold.sort_unstable();
        cold.dedup();
        cold
    }

    /// Whether the receipt of `id`, executed at `height`, would be read from the store (the
    /// batch is no longer in memory and the warmer has not read it).
    pub fn receipt_is_cold(&self, id: &RequestId, height: u64) -> bool {
        !self.batches.contains_key(&height) && !self.warm_receipts.contains_key(&(*id, height))
    }

    /// Where the replica thread hands this ledger the warmer's reads.
    pub fn warm_handle(&self) -> WarmHandle {
        self.warm_inbox.clone()
    }

    /// Keeps receipts of duplicates the warmer read (a committed batch never changes).
    fn warm_receipts(&mut self, receipts: Vec<(RequestId, u64, Option<Receipt>)>) {
        if self.warm_receipts.len() + receipts.len() > WARM_RECEIPTS_MAX {
            self.warm_receipts.clear();
        }
        for (id, height, r) in receipts {
            self.warm_receipts.insert((id, height), r);
        }
    }

    /// Takes what the warmer read at store index `read_at` into the clean cache, for the keys no
    /// newer value is known for. Returns false, taking nothing, when the read may be stale (a
    /// write after it was evicted from the cache, or a snapshot was installed since); the
    /// requests then read the store themselves, which is correct, only slower.
    fn warm(&mut self, read_at: u64, values: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> bool {
        if read_at < self.clean.stale_below {
            return false;
        }
        for (k, v) in values {
            // A key in the overlay was written after the read, or is in the store unchanged
            // since: either way the overlay is right. One in the clean cache is as the store
            // holds it now.
            if !self.overlay.contains_key(&k) && !self.clean.contains(&k) {
                self.clean.insert(k, v, read_at);
            }
        }
        true
    }

    /// What the peer transport streams in place of a snapshot's empty state.
    pub fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(Source(self.exports.clone()))
    }

    /// The members the last installed snapshot carried (taken once).
    pub fn take_installed_members(&self) -> Option<Vec<MemberAddr>> {
        self.installed_members.lock().take()
    }

    /// The revoked certificates installed snapshots carried since the last call.
    pub fn take_installed_revoked(&self) -> Vec<Revocation> {
        std::mem::take(&mut *self.installed_revoked.lock())
    }

    /// Exports carry the certificates `revoked` holds (shared with the replica thread).
    #[must_use]
    pub fn with_revoked(mut self, revoked: RevokedCerts) -> Self {
        self.revoked = revoked;
        self
    }
}

struct Source(Arc<BackgroundExports>);

impl SnapshotSource for Source {
    fn snapshot(&self, at_least: u64) -> Result<Arc<ExportedState>, String> {
        self.0.get(at_least)
    }
}

/// Writes what the replica thread applied, in order; stops at the first failure.
fn store_thread(store: &Mutex<Store>, rx: &Receiver<StoreOp>, flushed: &Flushed, on_flushed: &dyn Fn(u64, u64)) {
    for op in rx {
        let started = std::time::Instant::now();
        let mut s = store.lock();
        if matches!(op, StoreOp::Sync) {
            // Seconds under a heavy write load: on this thread, never on the replica thread,
            // whose heartbeats must not wait for it.
            let durable = s.applied().index;
            let r = s.sync_all();
            drop(s);
            if let Err(e) = r {
                tracing::error!(error = %e, "store sync failed; the replica stops");
                *flushed.failed.lock() = Some((LogFailure::new(e.os_kind(), format!("store sync: {e}")), true));
                return;
            }
            crate::measure::stage_time("store_sync", started);
            flushed.synced.store(durable, Ordering::Release);
            continue;
        }
        if crate::failpoint::claim("slow-store-write") {
            // A test's stand-in for a long LevelDB compaction inside `write`, the store held.
            std::thread::sleep(SLOW_STORE_WRITE_FAILPOINT);
        }
        let (index, r) = match op {
            StoreOp::Sync => unreachable!("handled above"),
            StoreOp::Batch { index, batch, signature } => {
                (index, s.apply_batch_with_ids(index, &batch.entry, &batch.ids, &signature))
            }
            StoreOp::Noop { index, term } => (index, s.apply_noop_at(index, term)),
            StoreOp::Conf { index, term, conf } => (index, s.apply_conf(index, term, &conf)),
        };
        let height = s.applied().height;
        drop(s);
        if let Err(e) = r {
            tracing::error!(index, error = %e, "store write failed; the replica stops");
            *flushed.failed.lock() = Some((LogFailure::new(e.os_kind(), e.to_string()), false));
            return;
        }
        crate::measure::stage_time("store", started);
        let took = started.elapsed();
        if took >= Duration::from_millis(STORE_WAIT_WARN_MS * 5) {
            // rusty-leveldb compacts inside `write`, holding the store meanwhile.
            tracing::warn!(index, ms = took.as_millis() as u64, "a store write was slow");
        }
        flushed.height.store(height, Ordering::Release);
        flushed.index.store(index, Ordering::Release);
        on_flushed(index, height);
    }
}

/// Exports the store (on the export thread; the store lock is held while it is read, the
/// encoding is done after).
fn export(store: &Mutex<Store>) -> Result<ExportedState, String> {
    let snap = store.lock().export_snapshot().map_err(|e| format!("snapshot export: {e}"))?;
    let state = tally_codec::encode(&snap);
    if state.len() > SNAPSHOT_BYTES_MAX {
        return Err(format!("the state ({} bytes) is over the snapshot limit of {SNAPSHOT_BYTES_MAX}", state.len()));
    }
    tracing::info!(index = snap.applied.index, height = snap.applied.height, bytes = state.len(), "state exported");
    Ok(ExportedState { index: snap.applied.index, term: snap.applied.term, state })
}

/// The core's view of where the store stands.
fn head_of(a: &tally_store::state::Applied) -> LedgerHead {
    LedgerHead {
        index: a.index,
        term: a.term,
        height: a.height,
        header_hash: a.header_hash,
        state_digest: a.state_digest,
        time_ms: a.time_ms,
    }
}

fn decode_envelope(data: &[u8]) -> Result<(SnapshotEnvelope, StateSnapshot), LedgerError> {
    let env: SnapshotEnvelope = tally_codec::decode(data, SNAPSHOT_BYTES_MAX)
        .map_err(|e| LedgerError::Snapshot(format!("snapshot does not decode: {e}")))?;
    if env.members.iter().any(|m| m.node_id == 0) {
        return Err(LedgerError::Snapshot("snapshot names node 0".into()));
    }
    let snap: StateSnapshot = tally_codec::decode(&env.state, SNAPSHOT_BYTES_MAX)
        .map_err(|e| LedgerError::Snapshot(format!("snapshot state does not decode: {e}")))?;
    Ok((env, snap))
}

impl Ledger for StoreLedger {
    /// Takes in the warmer's reads the replica thread delivered since the last pass.
    fn refresh(&mut self) {
        for w in self.warm_inbox.take() {
            let keys = w.values.len() as u64;
            self.warm_receipts(w.receipts);
            if self.warm(w.read_at, w.values) {
                metrics::counter!("tally_warmed_keys_total").increment(keys);
            } else {
                metrics::counter!("tally_warm_reads_stale_total").increment(1);
            }
        }
    }

    fn head(&self) -> LedgerHead {
        self.head
    }
    fn balance(&self, account: &PublicKey) -> Option<u64> {
        match self.overlay_get(self.tables.account(account).as_bytes()) {
            Some(v) => v.map(|v| tally_codec::decode(v, 8).expect("balances are borsh u64")),
            None => self.read_store().balance(account).unwrap_or_else(|e| store_failed("read", e)),
        }
    }
    fn doc_meta(&self, key: &DocKey) -> Option<DocMeta> {
        match self.overlay_get(self.tables.doc(key).as_bytes()) {
            Some(v) => v.map(|v| tally_codec::decode(v, 1024).expect("document metadata decodes")),
            None => self.read_store().doc_meta(key).unwrap_or_else(|e| store_failed("read", e)),
        }
    }
    fn get_raw(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.overlay_get(key) {
            Some(v) => v.cloned(),
            None => self.read_store().get_raw(key).unwrap_or_else(|e| store_failed("read", e)),
        }
    }
    fn get_raw_many(&self, keys: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
        let mut out: Vec<Option<Option<Vec<u8>>>> =
            keys.iter().map(|k| self.overlay_get(k).map(|v| v.cloned())).collect();
        if out.iter().any(Option::is_none) {
            // One lock for every miss: the store thread may hold it through a segment fsync.
            let store = self.read_store();
            for (slot, k) in out.iter_mut().zip(keys) {
                if slot.is_none() {
                    *slot = Some(store.get_raw(k).unwrap_or_else(|e| store_failed("read", e)));
                }
            }
        }
        out.into_iter().map(Option::flatten).collect()
    }
    fn scan(&self, table: &TableId) -> Vec<(Vec<u8>, Vec<u8>)> {
        if *table == self.tables.leases {
            return self.leases.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        let mut pairs: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
            self.read_store().kv_scan(&table.0).unwrap_or_else(|e| store_failed("read", e)).into_iter().collect();
        for (k, (v, _)) in self.overlay.iter().filter(|(k, _)| k.starts_with(&table.0)) {
            match v {
                Some(v) => pairs.insert(k.clone(), v.clone()),
                None => pairs.remove(k),
            };
        }
        pairs.into_iter().collect()
    }
    fn doc(&self, key: &DocKey) -> Option<(DocMeta, Vec<u8>)> {
        let meta = self.doc_meta(key)?;
        let body_key = self.tables.doc_body(&meta.body).to_bytes();
        let body = match self.overlay_get(&body_key) {
            Some(v) => v.cloned(),
            None => self.read_store().get_raw(&body_key).unwrap_or_else(|e| store_failed("read", e)),
        };
        Some((meta, body.unwrap_or_default()))
    }
    fn receipt(&self, id: &RequestId) -> Option<Receipt> {
        let Some(loc) = self.ids.get(id) else {
            return self.read_store().receipt(id).unwrap_or_else(|e| store_failed("read", e));
        };
        let (entry, signature) = self.batches.get(&loc.height)?;
        tally_core::ledger::receipt_in(entry, signature, loc)
    }
    fn unexpired_ids(&self, now_ms: u64) -> Vec<(RequestId, RequestLocation)> {
        let mut ids = self.read_store().unexpired_ids(now_ms).unwrap_or_else(|e| store_failed("read", e));
        ids.extend(self.ids.iter().filter(|(_, l)| l.expires_at_ms >= now_ms).map(|(id, l)| (*id, *l)));
        ids
    }
    fn receipt_at(&self, id: &RequestId, height: u64) -> Option<Receipt> {
        if let Some((entry, signature)) = self.batches.get(&height) {
            let leaf = self.ids.get(id).filter(|l| l.height == height)?;
            return tally_core::ledger::receipt_in(entry, signature, leaf);
        }
        if let Some(r) = self.warm_receipts.get(&(*id, height)) {
            return r.clone();
        }
        self.read_store().receipt_at(id, height).unwrap_or_else(|e| store_failed("read", e))
    }
    fn apply_batch(
        &mut self,
        index: u64,
        term: u64,
        batch: &Committed,
        signature: &Signature,
    ) -> Result<(), LedgerError> {
        let h = &batch.entry.header;
        self.head.advance(index, term, Some(h));
        let mut keys = Vec::with_capacity(batch.entry.write_set.ops.len());
        for op in &batch.entry.write_set.ops {
            if op.key.starts_with(&self.tables.leases.0) {
                match &op.value {
                    Some(v) => self.leases.insert(op.key.clone(), v.clone()),
                    None => self.leases.remove(&op.key),
                };
            }
            self.overlay.insert(op.key.clone(), (op.value.clone(), index));
            keys.push(op.key.clone());
        }
        for (id, loc) in batch.locations() {
            self.ids.insert(id, loc);
        }
        self.batches.insert(h.height, (batch.entry.clone(), *signature));
        let written = Unflushed { index, keys, height: Some(h.height), ids: batch.ids.clone() };
        self.queue(StoreOp::Batch { index, batch: batch.clone(), signature: *signature }, written)
    }
    fn apply_noop(&mut self, index: u64, term: u64) -> Result<(), LedgerError> {
        self.head.advance(index, term, None);
        let written = Unflushed { index, keys: Vec::new(), height: None, ids: Arc::default() };
        self.queue(StoreOp::Noop { index, term }, written)
    }
    fn apply_conf(&mut self, index: u64, term: u64, conf_state: Vec<u8>) -> Result<(), LedgerError> {
        self.head.advance(index, term, None);
        self.conf = Some(conf_state.clone());
        let written = Unflushed { index, keys: Vec::new(), height: None, ids: Arc::default() };
        self.queue(StoreOp::Conf { index, term, conf: conf_state }, written)
    }
    fn conf_state(&self) -> Option<Vec<u8>> {
        self.conf.clone()
    }
    fn export(&self, at_least: u64) -> Option<Exported> {
        match self.exports.get(at_least) {
            Ok(held) => {
                let members: Vec<MemberAddr> = self.members.lock().values().cloned().collect();
                Some(Exported {
                    index: held.index,
                    term: held.term,
                    data: SnapshotEnvelope::encode_parts(&members, &self.revoked.list(), &[]),
                })
            }
            Err(why) => {
                tracing::debug!(at_least, %why, "snapshot not ready");
                None
            }
        }
    }
    fn check_snapshot(&self, index: u64, data: &[u8]) -> Result<(), LedgerError> {
        let (_, snap) = decode_envelope(data)?;
        if snap.applied.index == 0 {
            return Err(LedgerError::Snapshot("snapshot at index 0".into()));
        }
        if snap.applied.index != index {
            return Err(LedgerError::Snapshot(format!(
                "snapshot data is at index {}, Raft says {index}",
                snap.applied.index
            )));
        }
        let meta = self.tables.meta.0;
        if snap.pairs.iter().any(|(k, _)| k.starts_with(&meta)) {
            return Err(LedgerError::Snapshot("snapshot carries the store's own metadata".into()));
        }
        Ok(())
    }
    fn install(&mut self, index: u64, term: u64, conf_state: Vec<u8>, data: &[u8]) -> Result<(), LedgerError> {
        let (env, mut snap) = decode_envelope(data)?;
        if snap.applied.index != index {
            return Err(LedgerError::Snapshot(format!(
                "snapshot data is at index {}, Raft says {index}",
                snap.applied.index
            )));
        }
        snap.applied.term = term;
        let leases = snap.pairs.iter().filter(|(k, _)| k.starts_with(&self.tables.leases.0)).cloned().collect();
        tracing::info!(index, height = snap.applied.height, bytes = data.len(), "installing snapshot");
        // Everything applied before goes to the store first; the install replaces it.
        self.drain()?;
        self.store
            .lock()
            .install_snapshot_with_conf(&snap, Some(&conf_state))
            .map_err(|e| LedgerError::Snapshot(e.to_string()))?;
        let a = snap.applied;
        self.head = head_of(&a);
        self.conf = Some(conf_state);
        self.overlay.clear();
        self.clean.clear(index);
        self.leases = leases;
        self.batches.clear();
        self.ids.clear();
        self.unflushed.clear();
        self.flushed.height.store(a.height, Ordering::Release);
        self.flushed.index.store(a.index, Ordering::Release);
        metrics::counter!("tally_snapshot_installs_total").increment(1);
        *self.installed_members.lock() = Some(env.members);
        self.installed_revoked.lock().extend(env.revoked);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warming::{start_warmer, WarmJob};
    use tally_codec::merkle::Tree;
    use tally_codec::{BatchHeader, ClusterId, Digest, WriteOp, WriteSet};

    fn entry(height: u64, prev_hash: Digest, ops: Vec<WriteOp>) -> BatchEntry {
        let write_set = WriteSet { ops };
        let header = BatchHeader {
            cluster_id: ClusterId([3; 16]),
            height,
            prev_hash,
            merkle_root: Tree::from_leaves(&[]).root(),
            leaf_count: 0,
            write_set_digest: write_set.digest(),
            state_digest: Digest([height as u8; 32]),
            term: 1,
            time_ms: 1_000 * height,
        };
        BatchEntry { header, requests: Vec::new(), outcomes: Vec::new(), write_set }
    }

    /// A store in `dir` and a ledger on it.
    fn ledger_in(dir: &std::path::Path) -> (Arc<Mutex<Store>>, StoreLedger) {
        ledger_in_store(Arc::new(Mutex::new(Store::open(dir).expect("store"))))
    }

    /// A new ledger on `store`, caches empty.
    fn ledger_in_store(store: Arc<Mutex<Store>>) -> (Arc<Mutex<Store>>, StoreLedger) {
        let ledger = StoreLedger::new(store.clone(), Members::default(), |_, _| {}).expect("ledger");
        (store, ledger)
    }

    /// Once the store holds a batch, its keys are still read from memory (the clean cache), so a
    /// store thread holding the store through a long write does not stall the replica thread;
    /// past the cache's budget the oldest keys are read from the store again, with the same
    /// values, deletions included.
    #[test]
    fn written_keys_are_read_from_memory_after_the_store_has_them() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let tables = *store.lock().tables();
        let accounts: Vec<PublicKey> = (0..50u8).map(|i| PublicKey([i; 32])).collect();
        let ops = |from: u64| -> Vec<WriteOp> {
            accounts
                .iter()
                .enumerate()
                .map(|(i, a)| WriteOp {
                    key: tables.account(a).into_bytes(),
                    value: (i != 7).then(|| tally_codec::encode(&(from + i as u64))),
                })
                .collect()
        };
        let e = entry(1, Digest::ZERO, ops(100));
        ledger.apply_batch(2, 1, &tally_codec::Committed::new(e), &Signature([0; 64])).expect("applied");
        ledger.drain().expect("drained");
        assert!(ledger.overlay.is_empty(), "the overlay forgot what the store holds");
        for (i, a) in accounts.iter().enumerate() {
            let want = (i != 7).then_some(100 + i as u64);
            assert_eq!(ledger.balance(a), want, "account {i}");
        }
        assert_eq!(ledger.store_reads(), 0, "every read was answered from memory, none waited for the store");

        // A budget of about ten keys: the oldest are evicted and read from the store.
        ledger.clean =
            CleanCache::new(10 * CleanCache::cost(&tables.account(&accounts[0]).into_bytes(), Some(&vec![0; 8])));
        let prev = ledger.head().header_hash;
        let e2 = entry(2, prev, ops(200));
        ledger.apply_batch(3, 1, &tally_codec::Committed::new(e2), &Signature([0; 64])).expect("applied");
        ledger.drain().expect("drained");
        assert!(ledger.clean.bytes <= ledger.clean.budget, "the cache stays within its budget");
        for (i, a) in accounts.iter().enumerate() {
            let want = (i != 7).then_some(200 + i as u64);
            assert_eq!(ledger.balance(a), want, "account {i} after eviction");
        }
        let reads = ledger.store_reads();
        assert!((39..50).contains(&reads), "evicted keys came from the store, the newest from memory: {reads}");
    }

    fn balance_op(tables: &tally_codec::Tables, who: &PublicKey, amount: u64) -> WriteOp {
        WriteOp { key: tables.account(who).into_bytes(), value: Some(tally_codec::encode(&amount)) }
    }

    /// The warmer reads cold keys while the store is held, off the replica thread; once warmed
    /// the replica thread's reads of them never go to the store. Keys the caches hold are not
    /// cold; absent keys are warmed as absent.
    #[test]
    fn warmed_keys_are_read_from_memory_and_only_cold_keys_are_read() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut first) = ledger_in(dir.path());
        let tables = *store.lock().tables();
        let (alice, bob, carol) = (PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32]));
        // Alice is in the store and in no cache (as after a restart).
        let e = entry(1, Digest::ZERO, vec![balance_op(&tables, &alice, 9)]);
        first.apply_batch(2, 1, &tally_codec::Committed::new(e), &Signature([0; 64])).expect("applied");
        first.drain().expect("drained");
        drop(first);
        let (_, mut ledger) = ledger_in_store(store.clone());
        let key = |p: &PublicKey| tables.account(p).into_bytes();
        let prev = ledger.head().header_hash;
        ledger
            .apply_batch(
                3,
                1,
                &tally_codec::Committed::new(entry(2, prev, vec![balance_op(&tables, &bob, 4)])),
                &Signature([0; 64]),
            )
            .expect("applied");
        let cold = ledger.cold_keys(vec![key(&alice), key(&bob), key(&carol), key(&alice)]);
        assert_eq!(
            cold,
            {
                let mut c = vec![key(&alice), key(&carol)];
                c.sort();
                c
            },
            "bob is in the overlay"
        );

        let (jobs, warmed) = start_warmer(store.clone()).expect("warmer");
        let held = store.lock(); // a long store write
        jobs.send(WarmJob { ticket: 7, keys: cold, receipts: Vec::new() }).expect("job");
        assert!(
            warmed.recv_timeout(Duration::from_millis(200)).is_err(),
            "the warmer waits for the store, not the caller"
        );
        drop(held);
        let w = warmed.recv_timeout(Duration::from_secs(10)).expect("warmed");
        assert_eq!(w.ticket, 7);
        // Handed over as the replica thread does: taken in at the start of the next pass.
        ledger.warm_handle().deliver(w);
        assert!(!ledger.cold_keys(vec![key(&alice)]).is_empty(), "nothing is taken before the pass");
        ledger.refresh();
        let reads = ledger.store_reads();
        assert_eq!(ledger.balance(&alice), Some(9));
        assert_eq!(ledger.balance(&carol), None, "warmed as absent");
        assert_eq!(ledger.balance(&bob), Some(4));
        assert_eq!(ledger.store_reads(), reads, "no read went to the store");
        assert!(ledger.cold_keys(vec![key(&alice), key(&carol)]).is_empty(), "nothing is cold any more");
    }

    /// The receipt of a duplicate whose batch is only in the store is read by the warmer, and
    /// then answered from memory: resubmissions after a failover do not read the store on the
    /// replica thread.
    #[test]
    fn a_duplicate_s_receipt_is_warmed_and_answered_from_memory() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let req = tally_codec::Request {
            cluster_id: ClusterId([3; 16]),
            signer: PublicKey(key.verifying_key().to_bytes()),
            nonce: 1,
            expires_at_ms: u64::MAX / 2,
            op: tally_codec::Operation::Transfer { to: PublicKey([9; 32]), amount: 1 },
        }
        .sign(&key);
        let id = req.id();
        let mut e = entry(1, Digest::ZERO, Vec::new());
        e.requests = vec![req];
        e.outcomes = vec![tally_codec::Outcome::Transferred { sender_balance: 0 }];
        e.header.leaf_count = 1;
        e.header.merkle_root = Tree::from_leaves(&e.leaves()).root();
        let committed = tally_codec::Committed::new(e);
        ledger.apply_batch(2, 1, &committed, &Signature([5; 64])).expect("applied");
        assert!(!ledger.receipt_is_cold(&id, 1), "in memory while the store lacks it");
        ledger.drain().expect("drained");
        assert!(ledger.receipt_is_cold(&id, 1), "in the store only");
        let (jobs, warmed) = start_warmer(store.clone()).expect("warmer");
        jobs.send(WarmJob { ticket: 1, keys: Vec::new(), receipts: vec![(id, 1)] }).expect("job");
        let w = warmed.recv_timeout(Duration::from_secs(10)).expect("warmed");
        ledger.warm_receipts(w.receipts);
        assert!(!ledger.receipt_is_cold(&id, 1));
        let reads = ledger.store_reads();
        let receipt = ledger.receipt_at(&id, 1).expect("a receipt");
        assert_eq!(ledger.store_reads(), reads, "answered from memory");
        assert_eq!(receipt.request_id(), id);
        assert_eq!(Some(receipt), store.lock().receipt_at(&id, 1).expect("read"), "the store's receipt");
    }

    /// A warm read is older than what the ledger knows: the overlay's newer value wins, and a read
    /// taken before a write the cache has since evicted is refused whole (it could bring back the
    /// old value); the store is then read, and has the new value.
    #[test]
    fn a_warm_read_never_brings_back_an_older_value() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let tables = *store.lock().tables();
        let key = |p: &PublicKey| tables.account(p).into_bytes();
        let (alice, bob) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let stale = |p: &PublicKey| (key(p), Some(tally_codec::encode(&1u64)));
        // Read at index 0 (empty store): alice and bob absent... then written at index 2.
        let e = entry(1, Digest::ZERO, vec![balance_op(&tables, &alice, 5), balance_op(&tables, &bob, 6)]);
        {
            let _held = store.lock();
            ledger.apply_batch(2, 1, &tally_codec::Committed::new(e.clone()), &Signature([0; 64])).expect("applied");
            assert!(ledger.warm(0, vec![stale(&alice)]), "nothing was evicted: the read is taken");
            assert_eq!(ledger.balance(&alice), Some(5), "the overlay's newer value wins over the read");
        }
        ledger.drain().expect("drained");
        assert_eq!(ledger.balance(&alice), Some(5), "and the clean cache's, once the store has it");
        // The cache forgets index 2's writes (a budget of one key): a read from before is refused.
        ledger.clean = CleanCache::new(CleanCache::cost(&key(&alice), Some(&vec![0; 8])));
        let prev = ledger.head().header_hash;
        let carol = PublicKey([3; 32]);
        ledger
            .apply_batch(
                3,
                1,
                &tally_codec::Committed::new(entry(
                    2,
                    prev,
                    vec![balance_op(&tables, &alice, 7), balance_op(&tables, &carol, 8)],
                )),
                &Signature([0; 64]),
            )
            .expect("applied");
        ledger.drain().expect("drained");
        assert!(ledger.clean.stale_below >= 2, "the eviction is remembered");
        assert!(!ledger.warm(1, vec![stale(&bob)]), "a read from before the evicted write is refused");
        assert_eq!(ledger.balance(&bob), Some(6), "read from the store, not the stale read");
        assert!(ledger.warm(3, vec![(key(&bob), Some(tally_codec::encode(&6u64)))]), "a read after it is taken");
    }

    /// A new leader loads every lease; that must not read the store on the replica thread (a
    /// LevelDB compaction may hold it for seconds). The ledger keeps the lease table as applied,
    /// loaded once when it opens.
    #[test]
    fn leases_are_listed_from_memory_as_applied_and_after_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let tables = *store.lock().tables();
        let meta = |ttl_ms| tally_codec::LeaseMeta {
            owner: PublicKey([1; 32]),
            ttl_ms,
            expires_at_ms: 9,
            attached: Vec::new(),
        };
        let put =
            |id: u64, ttl| WriteOp { key: tables.lease(id).into_bytes(), value: Some(tally_codec::encode(&meta(ttl))) };
        let e = entry(1, Digest::ZERO, vec![put(5, 50), put(6, 60)]);
        ledger.apply_batch(2, 1, &tally_codec::Committed::new(e.clone()), &Signature([0; 64])).expect("applied");
        let del = WriteOp { key: tables.lease(5).into_bytes(), value: None };
        let e2 = entry(2, e.header.hash(), vec![del, put(6, 61)]);
        ledger.apply_batch(3, 1, &tally_codec::Committed::new(e2), &Signature([0; 64])).expect("applied");
        ledger.drain().expect("drained");
        let reads = ledger.store_reads();
        assert_eq!(ledger.leases(), vec![(6, meta(61))], "lease 5 ended, lease 6 renewed");
        assert_eq!(ledger.store_reads(), reads, "listed without reading the store");
        drop(ledger);
        let (_, reopened) = ledger_in_store(store.clone());
        assert_eq!(reopened.leases(), vec![(6, meta(61))], "loaded from the store when the ledger opens");
        assert_eq!(reopened.store_reads(), 0);
        assert_eq!(store.lock().kv_scan(&tables.leases.0).expect("scan").len(), 1, "the store agrees");
    }

    /// Reads see an applied batch before the store thread wrote it (the overlay), and the store
    /// holds it once drained; what the store holds is what `flushed` says.
    #[test]
    fn applied_writes_are_read_before_the_store_has_them() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let tables = *store.lock().tables();
        let alice = PublicKey([7; 32]);
        let op = WriteOp { key: tables.account(&alice).into_bytes(), value: Some(tally_codec::encode(&5u64)) };
        let e = entry(1, Digest::ZERO, vec![op]);
        let signature = Signature([0; 64]);
        {
            // The store thread cannot write while this lock is held.
            let held = store.lock();
            ledger.apply_batch(2, 1, &tally_codec::Committed::new(e.clone()), &signature).expect("applied");
            assert_eq!(ledger.balance(&alice), Some(5), "read from the overlay");
            assert_eq!(ledger.head().height, 1);
            assert_eq!(ledger.flushed(), (0, 0), "the store has nothing yet");
            assert_eq!(held.balance(&alice).expect("read"), None);
        }
        ledger.drain().expect("drained");
        assert_eq!(ledger.flushed(), (2, 1));
        assert_eq!(store.lock().balance(&alice).expect("read"), Some(5), "the store thread wrote it");
        // A later batch deletes it: the overlay answers "absent", not the store's old value.
        let del = WriteOp { key: tables.account(&alice).into_bytes(), value: None };
        let e2 = entry(2, e.header.hash(), vec![del]);
        {
            let _held = store.lock();
            ledger.apply_batch(3, 1, &tally_codec::Committed::new(e2.clone()), &signature).expect("applied");
            assert_eq!(ledger.balance(&alice), None, "a deletion in the overlay hides the stored value");
        }
        ledger.drain().expect("drained");
        assert_eq!(store.lock().balance(&alice).expect("read"), None);
        assert!(ledger.overlay.is_empty(), "the overlay forgets what the store holds");
    }

    /// The replica thread asks for a store sync and goes on: the fsync runs on the store thread
    /// (while it holds the store, here while the test holds it, the request returns at once),
    /// and the log may be compacted only up to what that sync made durable.
    #[test]
    fn a_sync_is_requested_without_waiting_and_reports_what_it_made_durable() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let signature = Signature([0; 64]);
        let e = entry(1, Digest::ZERO, Vec::new());
        ledger.apply_batch(2, 1, &tally_codec::Committed::new(e), &signature).expect("applied");
        ledger.drain().expect("drained");
        {
            let _held = store.lock(); // a sync in progress holds the store this long
            let asked = std::time::Instant::now();
            ledger.request_sync();
            assert!(asked.elapsed() < std::time::Duration::from_millis(100), "the request does not wait for the store");
            assert_eq!(ledger.synced_index(), 0, "nothing is known durable before a sync ran");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.synced_index() < 2 {
            assert!(std::time::Instant::now() < deadline, "the store thread never synced");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(ledger.synced_index(), 2, "the sync covers what was written before it was asked");
    }

    /// A store that falls half a queue behind is reported (the shell then takes no new work),
    /// and stops being reported once it catches up.
    #[test]
    fn a_store_half_a_queue_behind_is_reported_until_it_catches_up() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, mut ledger) = ledger_in(dir.path());
        let signature = Signature([0; 64]);
        let mut prev = Digest::ZERO;
        {
            let _held = store.lock(); // the store thread is stuck
            for h in 1..=(STORE_QUEUED_MAX as u64 / 2 + 1) {
                assert!(!ledger.store_behind() || h > STORE_QUEUED_MAX as u64 / 2, "behind after only {h} batches");
                let e = entry(h, prev, Vec::new());
                prev = e.header.hash();
                ledger.apply_batch(h + 1, 1, &tally_codec::Committed::new(e), &signature).expect("applied");
            }
            assert!(ledger.store_behind(), "half a queue behind");
        }
        ledger.drain().expect("drained");
        assert!(!ledger.store_behind(), "caught up");
    }
}
