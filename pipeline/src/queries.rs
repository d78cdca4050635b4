//! Read-only queries of the store for the client port: batches, receipts, audit pages.

use crate::node::Shared;
use tally_codec::{Receipt, RequestId};

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

/// Whether a log failure's text is the disk running out of space (ENOSPC).
pub fn is_disk_full(why: &str) -> bool {
    why.contains("No space left") || why.contains("StorageFull") || why.contains("os error 28")
}
