//! Stage 5: propose. The batch (header, requests, outcomes, write set) is proposed to the
//! replicated log; it commits once a majority has fsynced it. Until then its waiters sit in
//! [`Pending`], keyed by height. Batches commit in order; if leadership is lost, every batch
//! still pending is discarded and its clients are told to retry (the same bytes, so the retry is
//! exactly-once).

use crate::node::{Shared, Waiter};
use tally_codec::{encode, ErrorCode};
use tally_failover::ProposeError;

/// A batch proposed but not yet committed, with the connection slots waiting for it.
pub type PendingBatch = tally_core::pending::PendingBatch<Waiter>;
/// Batches in flight and an index of their request ids (see [`tally_core::pending`]).
pub type Pending = tally_core::pending::Pending<Waiter>;

/// Proposes a batch for `term`. The pending entry is registered first so the commit can never
/// arrive before its waiters.
///
/// # Errors
/// When the log refuses the proposal (not leader in `term`, queue full, stopped); the batch's
/// waiters have then been answered with a retryable error.
pub fn propose(shared: &Shared, term: u64, batch: PendingBatch) -> Result<(), ProposeError> {
    let data = encode(&batch.entry);
    metrics::histogram!("tally_batch_bytes").record(data.len() as f64);
    let height = batch.entry.header.height;
    shared.pending.lock().insert(batch);
    let started = std::time::Instant::now();
    let result = if crate::failpoint::claim("refuse-proposal") {
        Err(ProposeError::Busy)
    } else {
        shared.replicator().propose(term, data)
    };
    crate::measure::stage_time("propose", started);
    if result.is_ok() && crate::failpoint::enabled("ack-before-commit") {
        ack_before_commit(shared, height);
    }
    if let Err(e) = &result {
        if let Some(b) = shared.pending.lock().take(height) {
            fail_batch(shared, b, "propose", refusal_code(e));
        }
        tracing::debug!(error = %e, height, "proposal refused");
    }
    result
}

/// A planted bug for the chaos monkey's self-test: the batch's clients get their receipts now,
/// before it is committed (debug builds, failpoint `ack-before-commit`).
fn ack_before_commit(shared: &Shared, height: u64) {
    let mut pending = shared.pending.lock();
    let Some(b) = pending.batches.get_mut(&height) else { return };
    let signature = b.entry.header.sign(&shared.opts.operator_key);
    for leaf in 0..b.waiters.len() {
        let receipt = b.receipt(leaf, &signature);
        for w in std::mem::take(&mut b.waiters[leaf]) {
            w.fill(tally_codec::wire::SubmitReply::Committed {
                receipt: Box::new(receipt.clone()),
                durable_replicas: 1,
            });
        }
    }
}

/// What clients are told when the log refuses a proposal: its real cause.
pub fn refusal_code(e: &ProposeError) -> ErrorCode {
    match e {
        ProposeError::TooLarge { .. } => ErrorCode::ProposalTooLarge,
        ProposeError::Stopped(why) if is_disk_full(why) => ErrorCode::StorageFull,
        ProposeError::Stopped(_) => ErrorCode::LogFailed,
        ProposeError::Busy => ErrorCode::Overloaded,
        _ => ErrorCode::Retry,
    }
}

/// Whether a log failure's text is the disk running out of space (ENOSPC).
pub fn is_disk_full(why: &str) -> bool {
    why.contains("No space left") || why.contains("StorageFull") || why.contains("os error 28")
}

/// Answers every waiter of every pending batch with `code`.
/// Answers every waiter of every pending batch with `code` (counted as refused in `stage`).
pub fn fail_all_pending(shared: &Shared, stage: &'static str, code: ErrorCode) {
    let drained = shared.pending.lock().drain();
    for b in drained {
        fail_batch(shared, b, stage, code);
    }
}

pub fn fail_batch(shared: &Shared, b: PendingBatch, stage: &'static str, code: ErrorCode) {
    crate::measure::refused(stage, code, b.waiters.iter().map(|w| w.len() as u64).sum());
    for waiters in b.waiters {
        for w in waiters {
            if code == ErrorCode::NotLeader {
                w.refuse_not_leader(shared);
            } else {
                w.refuse(code);
            }
        }
    }
}
