//! Warming: the leader's replica thread never reads the store for a request. Before the core
//! sees a frame, the keys its requests may read that no cache holds (and the receipts of
//! duplicates) are read by the warmer thread, under the store lock, as of the store's applied
//! index; the replica thread hands what it read to the ledger through a [`WarmHandle`], and the
//! ledger takes it in at the start of the core's next pass. The replica thread holds the
//! frames meanwhile, in arrival order (`on_submissions` in `replica_thread.rs`).
//!
//! ```text
//!  replica thread ──WarmJob──▶ warmer thread (store lock, store.get_raw / receipt_at)
//!        ▲                           │
//!        └──────────Warmed───────────┘ ──deliver──▶ WarmHandle ──refresh──▶ StoreLedger caches
//! ```

use crossbeam::channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tally_codec::{Receipt, RequestId};
use tally_store::state::Store;

/// Keys (and receipts of duplicates) the warmer is asked to read, for the submissions with
/// `ticket`.
pub struct WarmJob {
    pub ticket: u64,
    pub keys: Vec<Vec<u8>>,
    /// (request id, height of the batch that executed it).
    pub receipts: Vec<(RequestId, u64)>,
}

/// What the warmer read: the values of a job's keys as the store held them at log index
/// `read_at`.
pub struct Warmed {
    pub ticket: u64,
    pub read_at: u64,
    pub values: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub receipts: Vec<(RequestId, u64, Option<Receipt>)>,
}

/// Where the replica thread hands the warmer's reads to the ledger: it delivers them here, and
/// the ledger takes them in at the start of the core's next pass ([`tally_core::Ledger::refresh`]), before
/// anything reads it. The shell never reaches into the ledger through the core.
#[derive(Clone, Default)]
pub struct WarmHandle(Arc<WarmInbox>);

#[derive(Default)]
struct WarmInbox {
    pending: AtomicBool,
    reads: Mutex<Vec<Warmed>>,
}

impl WarmHandle {
    /// Hands over one read; the ledger takes it before the core's next pass reads anything.
    pub fn deliver(&self, w: Warmed) {
        self.0.reads.lock().push(w);
        self.0.pending.store(true, Ordering::Release);
    }

    /// What was delivered since the last call (the ledger's `refresh`).
    pub(crate) fn take(&self) -> Vec<Warmed> {
        if !self.0.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.0.reads.lock())
    }
}

/// Receipts of duplicates the warmer read, kept at most this many (a committed batch never
/// changes, so they never go stale; the map is emptied when full).
pub const WARM_RECEIPTS_MAX: usize = 65_536;

/// Starts the warmer: a thread that reads keys the caches miss, so the replica thread never
/// waits for the store lock (the store thread holds it through each write, and rusty-leveldb
/// compacts inside `write`: up to seconds, during which a leader must still heartbeat).
///
/// # Errors
/// When the thread cannot start.
pub fn start_warmer(store: Arc<Mutex<Store>>) -> Result<(Sender<WarmJob>, Receiver<Warmed>), String> {
    let (job_tx, job_rx) = bounded::<WarmJob>(WARM_JOBS_MAX);
    let (done_tx, done_rx) = bounded(WARM_JOBS_MAX);
    std::thread::Builder::new()
        .name("warmer".into())
        .spawn(move || {
            for job in job_rx {
                let started = std::time::Instant::now();
                let s = store.lock();
                let read_at = s.applied().index;
                let values = job
                    .keys
                    .into_iter()
                    .map(|k| {
                        let v = s.get_raw(&k).unwrap_or_else(|e| crate::store_ledger::store_failed("read", e));
                        (k, v)
                    })
                    .collect();
                let receipts = job
                    .receipts
                    .into_iter()
                    .map(|(id, height)| {
                        (
                            id,
                            height,
                            s.receipt_at(&id, height).unwrap_or_else(|e| crate::store_ledger::store_failed("read", e)),
                        )
                    })
                    .collect();
                drop(s);
                crate::measure::stage_time("warm", started);
                if done_tx.send(Warmed { ticket: job.ticket, read_at, values, receipts }).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the warmer thread: {e}"))?;
    Ok((job_tx, done_rx))
}

/// Warm jobs in flight at most (the replica thread holds their submissions meanwhile).
pub const WARM_JOBS_MAX: usize = 1024;
