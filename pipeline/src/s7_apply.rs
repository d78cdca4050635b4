//! Stage 7: apply. Committed batches and their signatures are stored, keyed by height, so any replica can serve
//! any receipt later. This module owns the store thread, which applies committed batches in
//! order (one atomic write each), makes the store durable before the log may be compacted, and
//! serves stored receipts.

use crate::node::{Applied, Shared, Waiter};
use crate::s6_confirm::ToStore;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::wire::SubmitReply;
use tally_codec::{ErrorCode, Receipt, RequestId};

pub fn run(shared: Arc<Shared>, rx: crossbeam::channel::Receiver<ToStore>) {
    let mut last_sync = Instant::now();
    while let Ok(msg) = rx.recv() {
        let started = Instant::now();
        let applied = {
            let mut store = shared.store.lock();
            let (result, term) = match &msg {
                ToStore::Batch { index, term, entry, signature } => {
                    (store.apply_batch(*index, entry, signature), *term)
                }
                ToStore::Noop { index, term } => (store.apply_noop(*index), *term),
                ToStore::Install { snapshot, term } => (store.install_snapshot(snapshot), *term),
            };
            if let Err(e) = result {
                // The log still holds the batch; a restart replays it. Refusing to go on is
                // safer than serving a state that skipped a batch.
                tracing::error!(error = %e, "store apply failed; stopping the store thread");
                shared.poison(format!("store apply failed: {e}"));
                return;
            }
            shared.applied_term.store(term, std::sync::atomic::Ordering::Release);
            let a = store.applied();
            Applied { index: a.index, height: a.height }
        };
        if let ToStore::Install { .. } = msg {
            shared.after_install(applied);
        }
        shared.set_applied(applied);
        crate::measure::stage_time("apply", started);
        // The store is made durable now and then so the log can be compacted behind it (the
        // replicator keeps `log_retain_entries` more for lagging followers).
        if last_sync.elapsed() >= Duration::from_millis(shared.opts.store_sync_interval_ms) {
            last_sync = Instant::now();
            let synced = shared.store.lock().sync_all();
            match synced {
                Ok(()) => shared.replicator().compact_hint(applied.index),
                Err(e) => tracing::warn!(error = %e, "store sync failed; log not compacted"),
            }
        }
    }
}

/// Sums over the applied state under the store lock (one consistent view).
///
/// # Errors
/// Store read failures.
/// One page of an admin scan, read under the store lock for at most
/// [`tally_codec::admin::AUDIT_PAGE_MAX`] keys, so a scan never stalls the pipeline for long.
///
/// # Errors
/// Store read failures or an undecodable balance.
pub fn audit_page(
    shared: &Shared,
    table: tally_codec::admin::AuditTable,
    after: Option<&[u8]>,
    limit: u32,
) -> Result<tally_codec::wire::AuditPageInfo, String> {
    let limit = limit.clamp(1, tally_codec::admin::AUDIT_PAGE_MAX) as usize;
    let prefix = match table {
        tally_codec::admin::AuditTable::Accounts => shared.tables.accounts.0,
        tally_codec::admin::AuditTable::Documents => shared.tables.docs.0,
    };
    let store = shared.store.lock();
    let applied = store.applied();
    let page = store.kv_scan_page(&prefix, after, limit).map_err(|e| e.to_string())?;
    drop(store);
    let mut balance_total: u128 = 0;
    if table == tally_codec::admin::AuditTable::Accounts {
        for (_, v) in &page {
            balance_total += u128::from(tally_codec::decode::<u64>(v, 8).map_err(|e| e.to_string())?);
        }
    }
    let next_after = if page.len() == limit { page.last().map(|(k, _)| k.clone()) } else { None };
    Ok(tally_codec::wire::AuditPageInfo {
        applied_height: applied.height,
        state_digest: applied.state_digest,
        keys: page.len() as u64,
        balance_total,
        next_after,
    })
}

/// A stored batch with its leaves, for auditors and invariant checks.
pub fn batch_info(shared: &Shared, height: u64) -> Option<tally_codec::wire::BatchInfo> {
    let store = shared.store.lock();
    let record = store.batch(height).ok()??;
    let body = if record.body_ref.is_empty() { None } else { store.batch_body(&record).ok() };
    let (request_ids, outcomes) = match &body {
        Some(b) => (b.requests.iter().map(tally_codec::SignedRequest::id).collect(), b.outcomes.clone()),
        None => (Vec::new(), Vec::new()),
    };
    Some(tally_codec::wire::BatchInfo {
        header: record.header,
        signature: record.signature,
        body_available: body.is_some(),
        request_ids,
        outcomes,
    })
}

/// Builds the receipt of an executed request from the stored batch and signature.
pub fn stored_receipt(shared: &Shared, id: &RequestId) -> Option<Receipt> {
    match shared.store.lock().receipt(id) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "reading a stored receipt failed");
            None
        }
    }
}

/// Answers a resubmitted, already executed request with its original receipt, once the store
/// holds that height. Runs off the sequencer thread.
pub fn answer_with_stored_receipt(shared: &Shared, id: RequestId, height: u64, waiter: Waiter) {
    let shared = shared.self_arc();
    rayon::spawn(move || {
        if !shared.wait_applied_height(height, Duration::from_secs(5)) {
            crate::measure::refused("apply", ErrorCode::Retry, 1);
            waiter.refuse(ErrorCode::Retry);
            return;
        }
        match stored_receipt(&shared, &id) {
            Some(receipt) => {
                let durable = crate::s6_confirm::committed_durable(&shared, shared.applied_index());
                waiter.fill(SubmitReply::Committed { receipt: Box::new(receipt), durable_replicas: durable });
            }
            None => {
                crate::measure::refused("apply", ErrorCode::Internal, 1);
                waiter.refuse(ErrorCode::Internal);
            }
        }
    });
}
