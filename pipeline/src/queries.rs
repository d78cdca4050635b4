//! Read-only queries of the store for the client port: batches, receipts, audit pages.

use crate::node::Shared;
use std::time::Duration;
use tally_codec::wire::{Change, WatchEvent, WatchFilter, WatchPage, WireError};
use tally_codec::{ErrorCode, Receipt, RequestId};

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

/// Batches one watch page covers, at most.
pub const WATCH_BATCHES_MAX: u32 = 256;
/// Bytes of events one watch page carries, about (the batch that crosses it ends the page).
pub const WATCH_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Longest a watch waits on the connection's reader for the next batch (the client's
/// heartbeats share the connection).
pub const WATCH_WAIT_MAX_MS: u32 = 500;

/// A page of committed changes from `from_height` (see [`tally_codec::wire::ClientMessage::Watch`]).
///
/// # Errors
/// `Compacted` (naming the oldest height this replica still holds) when `from_height` is older.
pub fn watch(
    shared: &Shared,
    filter: &WatchFilter,
    from_height: u64,
    max_batches: u32,
    wait_ms: u32,
) -> Result<WatchPage, WireError> {
    let from = from_height.max(1);
    let max = u64::from(max_batches.clamp(1, WATCH_BATCHES_MAX));
    if shared.applied_height() < from {
        let wait = Duration::from_millis(u64::from(wait_ms.min(WATCH_WAIT_MAX_MS)));
        shared.wait_applied_height(from, wait);
    }
    let top = shared.applied_height().min(from + max - 1);
    let mut events = Vec::new();
    let mut bytes = 0usize;
    let mut next = from;
    for h in from..=top {
        let store = shared.store.lock();
        let tables = *store.tables();
        let record = store.batch(h).map_err(read_failed)?;
        let Some(record) = record.filter(|r| !r.body_ref.is_empty()) else {
            let oldest = oldest_height(&store, h, top);
            return Err(WireError::new(
                ErrorCode::Compacted,
                format!(
                    "the history before height {oldest} is not on this replica (it installed a snapshot); watch from {oldest} or later, or from a replica that has it"
                ),
            ));
        };
        let body = store.batch_body(&record).map_err(read_failed)?;
        let (time_ms, writes) = (record.header.time_ms, &body.write_set);
        for op in &writes.ops {
            let Some(change) = change_of(&tables, filter, &op.key, op.value.as_deref(), writes, &store)? else {
                continue;
            };
            bytes += 64
                + match &change {
                    Change::DocSet { value, .. } => value.len(),
                    _ => 0,
                };
            events.push(WatchEvent { height: h, time_ms, change });
        }
        next = h + 1;
        if bytes >= WATCH_PAGE_BYTES {
            break;
        }
    }
    Ok(WatchPage { events, next_height: next })
}

fn read_failed(e: tally_store::StoreError) -> WireError {
    WireError::new(ErrorCode::Internal, format!("store read failed: {e}"))
}

/// The oldest height at or above `missing` this store holds a body for (they are contiguous up
/// to the applied height): a binary search.
fn oldest_height(store: &tally_store::state::Store, missing: u64, top: u64) -> u64 {
    let has = |h: u64| store.batch(h).ok().flatten().is_some_and(|r| !r.body_ref.is_empty());
    let (mut lo, mut hi) = (missing + 1, store.applied().height.max(top));
    if !has(hi) {
        return hi + 1;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if has(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// The change a write-set op makes, if `filter` selects it.
fn change_of(
    tables: &tally_codec::Tables,
    filter: &WatchFilter,
    key: &[u8],
    value: Option<&[u8]>,
    writes: &tally_codec::WriteSet,
    store: &tally_store::state::Store,
) -> Result<Option<Change>, WireError> {
    let bad = |what: &str| WireError::new(ErrorCode::Internal, format!("a stored {what} does not decode"));
    if let Some(doc) = tables.doc_of(key) {
        match filter {
            WatchFilter::AllDocs => {}
            WatchFilter::Doc(k) if *k == doc => {}
            _ => return Ok(None),
        }
        let Some(v) = value else { return Ok(Some(Change::DocDeleted { key: doc })) };
        let meta: tally_codec::DocMeta = tally_codec::decode(v, 1024).map_err(|_| bad("document"))?;
        let body_key = tables.doc_body(&meta.body).to_bytes();
        let body = match writes.ops.iter().find(|o| o.key == body_key) {
            Some(o) => o.value.clone(),
            None => store.get_raw(&body_key).map_err(read_failed)?,
        };
        return Ok(Some(Change::DocSet {
            key: doc,
            owner: meta.owner,
            revision: meta.revision,
            lease: meta.lease,
            value: body.unwrap_or_default(),
        }));
    }
    if let Some((domain, slot)) = tables.claim_of(key) {
        if !matches!(filter, WatchFilter::Domain(d) if *d == domain) {
            return Ok(None);
        }
        let Some(v) = value else { return Ok(Some(Change::ClaimReleased { domain, slot })) };
        let c: tally_codec::ClaimMeta = tally_codec::decode(v, 1024).map_err(|_| bad("claim"))?;
        return Ok(Some(Change::ClaimGranted { domain, slot, holder: c.holder, lease: c.lease }));
    }
    if let Some(lease) = tables.lease_id_of(key) {
        if *filter != WatchFilter::Leases {
            return Ok(None);
        }
        let Some(v) = value else { return Ok(Some(Change::LeaseEnded { lease })) };
        let m: tally_codec::LeaseMeta =
            tally_codec::decode(v, tally_codec::limits::REQUEST_BYTES_MAX * 2).map_err(|_| bad("lease"))?;
        return Ok(Some(Change::LeaseSet { lease, owner: m.owner, expires_at_ms: m.expires_at_ms }));
    }
    Ok(None)
}

/// Builds the receipt of an executed request from the stored batch and signature.
/// By id alone until the request's expiry passes; with `height`, at any age.
pub fn stored_receipt(shared: &Shared, id: &RequestId, height: Option<u64>) -> Option<Receipt> {
    let store = shared.store.lock();
    let found = match height {
        Some(h) => store.receipt_at(id, h),
        None => store.receipt(id),
    };
    match found {
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
