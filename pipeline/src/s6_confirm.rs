//! Stage 6: confirm. Runs on every replica, for every committed entry, in log order.
//!
//! For a committed batch it checks the chain (I2) and the state digest (I3), signs the header
//! (deterministic ed25519: every replica holding the operator key produces the same signature),
//! records the ids as executed, answers the leader's waiting clients with their receipts, and
//! hands the batch to the store thread. Nothing claiming success is sent before this point.

use crate::node::{Applied, Shared};
use crate::s5_propose::fail_batch;
use std::sync::Arc;
use tally_codec::wire::SubmitReply;
use tally_codec::{decode, limits, BatchEntry, ErrorCode, RequestLocation};
use tally_failover::{Committed, EntryKind};

/// Work for the store thread.
pub enum ToStore {
    Batch {
        index: u64,
        term: u64,
        entry: Box<BatchEntry>,
        signature: tally_codec::Signature,
    },
    Noop {
        index: u64,
        term: u64,
    },
    /// Replace the state with a snapshot from the leader.
    Install {
        snapshot: Box<tally_store::state::StateSnapshot>,
        term: u64,
    },
}

pub use tally_core::confirm::ChainHead;

pub fn run(shared: Arc<Shared>, committed_rx: crossbeam::channel::Receiver<Committed>, mut head: ChainHead) {
    while let Ok(c) = committed_rx.recv() {
        shared.confirm_busy.store(true, std::sync::atomic::Ordering::Release);
        if let Some(h) = shared.head_reset.lock().take() {
            head = h;
        }
        let msg = match c.kind {
            EntryKind::Noop => ToStore::Noop { index: c.index, term: c.term },
            EntryKind::Batch => confirm_batch(&shared, &mut head, c),
        };
        let sent = shared.store_tx.send(msg);
        shared.confirm_busy.store(false, std::sync::atomic::Ordering::Release);
        if sent.is_err() {
            return;
        }
    }
}

fn confirm_batch(shared: &Shared, head: &mut ChainHead, c: Committed) -> ToStore {
    let started = std::time::Instant::now();
    let entry: BatchEntry =
        decode(&c.data, limits::ENTRY_BYTES_MAX).expect("a committed entry is a batch this cluster encoded");
    let h = &entry.header;
    // I2 and I3 (tally_core::confirm): the chain is unbroken, the state digest follows from the
    // write sets; a follower re-derives the root and write-set digest from the entry, the leader
    // built this batch and still holds its tree.
    let built_here = shared.pending.lock().batches.get(&h.height).is_some_and(|b| b.header_hash == h.hash());
    let header_hash = tally_core::confirm::confirm(head, &entry, &shared.opts.cluster_id, built_here);
    let signature = h.sign(&shared.opts.operator_key);

    // Ids are recorded as executed before they leave the pending index, so stage 3 always finds
    // a request in one or the other.
    {
        let mut seen = shared.seen.lock();
        for (leaf, r) in entry.requests.iter().enumerate() {
            let loc =
                RequestLocation { height: h.height, leaf_index: leaf as u32, expires_at_ms: r.request.expires_at_ms };
            seen.insert(r.id(), loc);
        }
        seen.prune(h.time_ms);
    }
    let pending = {
        let mut p = shared.pending.lock();
        let mine = p.take(h.height);
        // A pending batch at this height with another hash was built on a chain that lost.
        match mine {
            Some(b) if b.header_hash != header_hash => {
                let mut lost = vec![b];
                lost.extend(p.drain());
                Err(lost)
            }
            other => Ok(other),
        }
    };
    shared.set_committed(Applied { index: c.index, height: h.height });
    match pending {
        Ok(Some(b)) => answer(shared, c.index, b, &signature),
        Ok(None) => {}
        Err(lost) => {
            for b in lost {
                fail_batch(shared, b, "confirm", ErrorCode::Retry);
            }
        }
    }
    crate::measure::stage_time("confirm", started);
    metrics::counter!("tally_committed_batches_total").increment(1);
    metrics::counter!("tally_committed_requests_total").increment(entry.requests.len() as u64);
    ToStore::Batch { index: c.index, term: c.term, entry: Box::new(entry), signature }
}

fn answer(shared: &Shared, index: u64, mut b: crate::s5_propose::PendingBatch, signature: &tally_codec::Signature) {
    let durable = committed_durable(shared, index);
    for (leaf, waiters) in std::mem::take(&mut b.waiters).into_iter().enumerate() {
        if waiters.is_empty() {
            continue;
        }
        let receipt = b.receipt(leaf, signature);
        for w in waiters {
            w.fill(SubmitReply::Committed { receipt: Box::new(receipt.clone()), durable_replicas: durable });
        }
    }
}

/// Replicas holding a committed index durably. Committed means a majority fsynced it, so the
/// count is never below a majority, even when the replicator's view of follower progress lags.
pub fn committed_durable(shared: &Shared, index: u64) -> u8 {
    let r = shared.replicator();
    let majority = u8::try_from(r.voters() / 2 + 1).unwrap_or(u8::MAX);
    r.durable_replicas(index).max(majority)
}
