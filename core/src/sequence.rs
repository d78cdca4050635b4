//! Stage 4: the sequential batch. On the leader only, it executes the requests that passed
//! stage 3, in order, on the latest state (batches not yet committed included), builds the Merkle
//! tree over (id, outcome) leaves and the header chained to the previous one.
//!
//! Cost per request (budget: ~10 µs for everything but the signature check): one hash map probe
//! for in-batch duplicates, the execution itself (two view lookups and two inserts for a
//! transfer), one leaf hash; per batch: one Merkle tree and one write-set digest.

use crate::pending::PendingBatch;
use crate::state::{At, Backing, BatchWrites, Exec, View};
use crate::Validated;
use std::collections::HashMap;
use std::sync::Arc;
use tally_codec::batch::next_state_digest;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{BatchEntry, BatchHeader, ClusterId, Digest, ErrorCode, Operation, RequestId, SignedRequest, Tables};

/// Batches executed but not yet committed, at most. Past this the sequencer waits.
pub const BATCHES_IN_FLIGHT_MAX: usize = 8;

/// The head of the speculative chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    pub height: u64,
    pub hash: Digest,
    pub state_digest: Digest,
    pub time_ms: u64,
}

/// Bytes a request adds to a batch entry, at most: the request itself, its copy in the write
/// set (a document body), and room for its outcome and write-set key.
pub fn entry_bytes_estimate(req: &SignedRequest) -> usize {
    let (op, copied) = match &req.request.op {
        Operation::Set { value, .. } => (16 + 4 + value.len(), value.len()),
        Operation::Delete { .. } => (16, 0),
        Operation::Transfer { .. } => (40, 0),
        // Rarer operations: measured. A transaction's values may be copied into the write set.
        Operation::Txn(_) => {
            let n = tally_codec::encode(&req.request.op).len();
            (n, n)
        }
        op @ Operation::SetIf { value, .. } => (tally_codec::encode(op).len(), value.len()),
        op => (tally_codec::encode(op).len(), 0),
    };
    // signer, signature, cluster, nonce, expiry, op tag: fixed; the value dominates. Then its
    // copy in the write set, and room for its outcome and write-set key.
    16 + 32 + 8 + 8 + 1 + op + 64 + copied + 192
}

/// Keeps what fits in one batch of `bytes_max` (estimated); the rest waits for the next batch,
/// in order. An item that alone is over the bound is handed to `too_large`.
pub fn split_by_bytes<T>(
    items: Vec<T>,
    bytes_max: usize,
    request: impl Fn(&T) -> &SignedRequest,
    mut too_large: impl FnMut(T),
) -> (Vec<T>, Vec<T>) {
    let mut used = 0usize;
    let mut now = Vec::with_capacity(items.len());
    let mut later = Vec::new();
    for item in items {
        let b = entry_bytes_estimate(request(&item));
        if b > bytes_max {
            too_large(item);
            continue;
        }
        if !later.is_empty() || used + b > bytes_max {
            later.push(item);
            continue;
        }
        used += b;
        now.push(item);
    }
    (now, later)
}

/// The header time of the next batch: the leader's wall clock, never behind the chain.
pub fn batch_time(wall_ms: u64, tip: &Tip) -> u64 {
    wall_ms.max(tip.time_ms)
}

/// Hands the requests expired by the batch clock to `expired` before stage 3 looks at them. An
/// executed id is forgotten once its expiry passes in batch time, so a replay after that must be
/// told `Expired`, never given a fresh verdict (stage 2's clock may lag the chain's).
pub fn drop_expired<T>(
    items: Vec<T>,
    time_ms: u64,
    request: impl Fn(&T) -> &SignedRequest,
    mut expired: impl FnMut(T),
) -> Vec<T> {
    let mut live = Vec::with_capacity(items.len());
    for item in items {
        if request(&item).request.expires_at_ms < time_ms {
            expired(item);
        } else {
            live.push(item);
        }
    }
    live
}

/// What the batch is built for.
pub struct BatchContext<'a> {
    pub cluster_id: ClusterId,
    pub tables: &'a Tables,
    pub term: u64,
    /// The leader's wall clock; the header time never goes backwards whatever the clock does.
    pub wall_ms: u64,
}

/// Executes `subs` (already through stage 3) on `view` and builds the batch chained to `tip`,
/// which then moves to the new head. A duplicate inside the batch waits on the first copy's leaf;
/// a request expired by the batch clock is handed to `refuse` without executing, so an id
/// forgotten after its expiry can never be executed twice. Leases due by the batch time end
/// first. Returns `None` when nothing is left to execute and no lease ended.
pub fn execute_batch<W>(
    ctx: &BatchContext<'_>,
    view: &mut View,
    backing: &mut dyn Backing,
    tip: &mut Tip,
    subs: Vec<(Validated, W)>,
    mut refuse: impl FnMut(W, ErrorCode),
) -> Option<PendingBatch<W>> {
    let mut in_batch: HashMap<RequestId, usize> = HashMap::new();
    let time_ms = batch_time(ctx.wall_ms, tip);
    let mut cur = BatchWrites::default();
    let height = tip.height + 1;
    let mut exec = Exec { view, backing, at: At { height, time_ms, position: 0 } };
    exec.end_due_leases(&mut cur);
    let mut requests = Vec::with_capacity(subs.len());
    let mut outcomes = Vec::with_capacity(subs.len());
    let mut ids = Vec::with_capacity(subs.len());
    let mut waiters: Vec<Vec<W>> = Vec::with_capacity(subs.len());
    for (req, waiter) in subs {
        if let Some(&pos) = in_batch.get(&req.id) {
            waiters[pos].push(waiter);
            continue;
        }
        if req.request.request.expires_at_ms < time_ms {
            refuse(waiter, ErrorCode::Expired);
            continue;
        }
        exec.at.position = u32::try_from(requests.len()).expect("a batch holds fewer than 2^32 requests");
        let outcome = exec.execute(&mut cur, &req.request.request);
        in_batch.insert(req.id, requests.len());
        ids.push(req.id);
        requests.push(req.request);
        outcomes.push(outcome);
        waiters.push(vec![waiter]);
    }
    let view = exec.view;
    if requests.is_empty() && cur.is_empty() {
        // Nothing to execute and no lease ended: no batch.
        return None;
    }
    let leaves: Vec<[u8; 32]> = ids.iter().zip(&outcomes).map(|(id, o)| leaf_hash(id, o)).collect();
    let tree = Tree::from_leaves(&leaves);
    let write_set = cur.to_write_set(ctx.tables);
    let write_set_digest = write_set.digest();
    let header = BatchHeader {
        cluster_id: ctx.cluster_id,
        height,
        prev_hash: tip.hash,
        merkle_root: tree.root(),
        leaf_count: u32::try_from(requests.len()).expect("batch_requests_max fits in u32"),
        write_set_digest,
        state_digest: next_state_digest(&tip.state_digest, &write_set_digest),
        term: ctx.term,
        time_ms,
    };
    let header_hash = header.hash();
    *tip = Tip { height: header.height, hash: header_hash, state_digest: header.state_digest, time_ms };
    view.push_layer(header.height, Arc::new(cur));
    Some(PendingBatch { entry: BatchEntry { header, requests, outcomes, write_set }, header_hash, tree, ids, waiters })
}
