//! Read-only queries of the store for the client port: batches, receipts, audit pages (watches:
//! [`crate::watch`]).

use crate::client_port::ClientPort;
use tally_codec::{Receipt, RequestId};

/// Keys an audit page reads under one hold of the store lock, at most.
pub const AUDIT_KEYS_PER_LOCK_MAX: usize = 1_000;
/// Keys all admin scans of this replica read a second, at most (a page that finds the budget
/// spent is answered `Busy` with the time until it refills).
pub const AUDIT_KEYS_PER_S_MAX: u64 = 25_000;
/// Audit pages served at once, at most.
pub const AUDIT_SCANS_MAX: usize = 2;
/// An audit page is answered within this long: the store lock is waited for until then at most
/// (the store thread holds it through each write, for seconds during a LevelDB compaction), and
/// a page that could not read ends where it is, or is answered `Busy`.
pub const AUDIT_ANSWER_MS: u64 = 500;

/// Why an audit page was not served.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{}", .0.message)]
    Busy(tally_codec::wire::BusyInfo),
    #[error("{0}")]
    Failed(String),
}

/// The admin scans' share of the machine: pages at once and keys a second.
pub struct AuditGate {
    state: parking_lot::Mutex<(usize, crate::watch::budget::Budget)>,
}

impl Default for AuditGate {
    fn default() -> Self {
        let budget = crate::watch::budget::Budget::new(AUDIT_KEYS_PER_S_MAX, AUDIT_KEYS_PER_S_MAX / 4);
        AuditGate { state: parking_lot::Mutex::new((0, budget)) }
    }
}

/// One page being scanned; the gate's slot is freed when it is dropped.
struct AuditScan<'a> {
    gate: &'a AuditGate,
    /// Keys this page may read (what the budget holds now, at least one lock's worth).
    keys_max: usize,
}

impl AuditGate {
    fn begin(&self) -> Result<AuditScan<'_>, AuditError> {
        let mut st = self.state.lock();
        let now = std::time::Instant::now();
        if st.0 >= AUDIT_SCANS_MAX {
            let m = format!("{AUDIT_SCANS_MAX} audit pages are being served (AUDIT_SCANS_MAX); retry after the hint");
            return Err(AuditError::Busy(crate::watch::busy_info("AUDIT_SCANS_MAX", 100, m)));
        }
        if !st.1.available(now) {
            let wait = st.1.ready_in(now).as_millis() as u64;
            let m = format!("admin scans read {AUDIT_KEYS_PER_S_MAX} keys a second at most (AUDIT_KEYS_PER_S_MAX); retry after the hint");
            return Err(AuditError::Busy(crate::watch::busy_info("AUDIT_KEYS_PER_S_MAX", wait, m)));
        }
        st.0 += 1;
        let keys_max = (st.1.tokens(now) as usize).max(AUDIT_KEYS_PER_LOCK_MAX);
        Ok(AuditScan { gate: self, keys_max })
    }
}

impl AuditScan<'_> {
    fn charge(&self, keys: usize) {
        self.gate.state.lock().1.charge(keys as u64, std::time::Instant::now());
        metrics::counter!("tally_audit_keys_total").increment(keys as u64);
    }
}

impl Drop for AuditScan<'_> {
    fn drop(&mut self) {
        self.gate.state.lock().0 -= 1;
    }
}

/// One page of an admin scan: at most [`AUDIT_KEYS_PER_LOCK_MAX`] keys per hold of the store
/// lock, within the scans' budget ([`AUDIT_KEYS_PER_S_MAX`], [`AUDIT_SCANS_MAX`]). Every key of a
/// page is read at one applied state: when the state moves between two holds the page ends
/// there, and `next_after` says where the next one starts.
///
/// # Errors
/// [`AuditError::Busy`] over the budget; store read failures or an undecodable balance.
pub fn audit_page(
    port: &ClientPort,
    table: tally_codec::admin::AuditTable,
    after: Option<&[u8]>,
    limit: u32,
) -> Result<tally_codec::wire::AuditPageInfo, AuditError> {
    let scan = port.audit.begin()?;
    let limit = (limit.clamp(1, tally_codec::admin::AUDIT_PAGE_MAX) as usize).min(scan.keys_max);
    let prefix = match table {
        tally_codec::admin::AuditTable::Accounts => port.tables.accounts.0,
        tally_codec::admin::AuditTable::Documents => port.tables.docs.0,
    };
    let failed = |e: &dyn std::fmt::Display| AuditError::Failed(e.to_string());
    let (mut applied, mut keys, mut balance_total, mut done) = (None, 0usize, 0u128, false);
    let mut after = after.map(<[u8]>::to_vec);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(AUDIT_ANSWER_MS);
    while keys < limit && !done {
        let want = (limit - keys).min(AUDIT_KEYS_PER_LOCK_MAX);
        let Some(store) = port.store.try_lock_until(deadline) else {
            if applied.is_some() {
                break; // the page ends where it is; `next_after` resumes it
            }
            let m = format!(
                "the store was busy with a write for the whole {AUDIT_ANSWER_MS} ms a page may take (AUDIT_ANSWER_MS); retry after the hint"
            );
            return Err(AuditError::Busy(crate::watch::busy_info("STORE_BUSY", 0, m)));
        };
        let (now, chunk) =
            (store.applied(), store.kv_scan_page(&prefix, after.as_deref(), want).map_err(|e| failed(&e))?);
        drop(store);
        scan.charge(chunk.len());
        if applied.is_some_and(|a| a != now) {
            break;
        }
        applied = Some(now);
        if table == tally_codec::admin::AuditTable::Accounts {
            for (_, v) in &chunk {
                balance_total += u128::from(tally_codec::decode::<u64>(v, 8).map_err(|e| failed(&e))?);
            }
        }
        keys += chunk.len();
        done = chunk.len() < want;
        if let Some((k, _)) = chunk.last() {
            after = Some(k.clone());
        }
    }
    let applied = applied.expect("a page reads at least once");
    Ok(tally_codec::wire::AuditPageInfo {
        applied_height: applied.height,
        state_digest: applied.state_digest,
        keys: keys as u64,
        balance_total,
        next_after: if done { None } else { after },
    })
}

/// A stored batch with its leaves, for auditors and invariant checks.
pub fn batch_info(port: &ClientPort, height: u64) -> Option<tally_codec::wire::BatchInfo> {
    let store = port.store.lock();
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
/// By id alone until the request's expiry passes; with `height`, at any age.
pub fn stored_receipt(port: &ClientPort, id: &RequestId, height: Option<u64>) -> Option<Receipt> {
    let store = port.store.lock();
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
