//! Reads a live cluster back into the shared history model (`tally_check::history`): every
//! replica's batches, the headers it holds without a body, and its audited state. The monkey and
//! the multi-process cluster tests judge what this reads with `tally_check`'s checks.
//!
//! ```text
//!  every replica ──Status · Batch{1..=applied} · AuditPage (admin-signed)──▶ ReadBack
//!  acknowledged receipts + ReadBack ──▶ RunRecord ──▶ tally_check::check::check_committed
//! ```

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tally_check::check::{check_committed, Verdicts, Violation};
use tally_check::history::{History, Op, OpKind, OpResult, ReplicaFinal, RunRecord, SeenHeader, StoredBatch};
use tally_client::Connection;
use tally_codec::wire::{AuditInfo, ClientMessage, ServerMessage, StatusInfo};
use tally_codec::{PublicKey, Receipt, RequestId};

/// How long a connection attempt to one replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one status, batch or audit call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How the read-back reaches a cluster: its TLS and the admin key that audits need.
#[derive(Clone)]
pub struct Access {
    pub dial: tally_net::Dial,
    pub admin: ed25519_dalek::SigningKey,
}

impl Access {
    fn connect(&self, addr: &str) -> Option<Connection> {
        Connection::connect_with(addr, &self.dial, CONNECT_TIMEOUT).ok()
    }
}

pub fn status(access: &Access, addr: &str) -> Option<StatusInfo> {
    let conn = access.connect(addr)?;
    match conn.call_timeout(ClientMessage::Status, CALL_TIMEOUT).ok()? {
        ServerMessage::Status(s) => Some(s),
        _ => None,
    }
}

/// Totals over one replica's state, paged, with the admin key.
pub fn audit(access: &Access, addr: &str) -> Option<AuditInfo> {
    let conn = access.connect(addr)?;
    let cluster = status(access, addr)?.cluster_id;
    tally_client::client::audit(&conn, &access.admin, cluster).ok()
}

/// Waits until every replica answers and has applied the highest committed height any of them
/// reports, and at least `acked_height` (the highest height a client was acknowledged at: a
/// leader answers once a batch is committed, and its store may write it a moment later), up to
/// `timeout`.
pub fn wait_converged(access: &Access, addrs: &[String], acked_height: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let statuses: Vec<StatusInfo> = addrs.iter().filter_map(|a| status(access, a)).collect();
        let top = statuses.iter().map(|s| s.committed_height).max().unwrap_or(0).max(acked_height);
        if statuses.len() == addrs.len() && statuses.iter().all(|s| s.applied_height >= top) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the replicas hold, as the shared model has it.
#[derive(Debug, Default)]
pub struct ReadBack {
    pub replicas: Vec<ReplicaFinal>,
    /// Headers replicas hold without a body (below the snapshot they were restored from): their
    /// signatures and agreement are checked too (I2).
    pub headers: Vec<SeenHeader>,
    /// The replicas that could not be read, and why.
    pub unread: Vec<String>,
}

impl ReadBack {
    /// A replica that could not be read back cannot be compared with the others (I3): a
    /// violation, naming each and why.
    pub fn unread_violation(&self) -> Option<Violation> {
        (!self.unread.is_empty()).then(|| {
            let of = self.replicas.len() + self.unread.len();
            Violation::new(
                "I3",
                format!(
                    "only {} of {of} replicas could be read back ({})",
                    self.replicas.len(),
                    self.unread.join("; ")
                ),
            )
        })
    }
}

/// Reads every replica of `addrs` (node `i + 1` at `addrs[i]`).
pub fn read_cluster(access: &Access, addrs: &[String]) -> ReadBack {
    let mut back = ReadBack::default();
    for (i, addr) in addrs.iter().enumerate() {
        match read_replica(access, addr) {
            Ok((replica, headers)) => {
                back.replicas.push(replica);
                back.headers.extend(headers);
            }
            Err(e) => back.unread.push(format!("replica {} ({addr}): {e}", i + 1)),
        }
    }
    back
}

/// Every batch the replica at `addr` has applied, the headers it holds without a body, and its
/// audit; or why they could not be read. Only a prefix may lack bodies (the heights a snapshot
/// skipped); a missing batch above one it holds is an error.
pub fn read_replica(access: &Access, addr: &str) -> Result<(ReplicaFinal, Vec<SeenHeader>), String> {
    let conn = access.connect(addr).ok_or("no connection")?;
    let status = match conn.call_timeout(ClientMessage::Status, CALL_TIMEOUT) {
        Ok(ServerMessage::Status(s)) => s,
        other => return Err(format!("status: {other:?}")),
    };
    let mut batches = Vec::new();
    let mut headers = Vec::new();
    for height in 1..=status.applied_height {
        match conn.call_timeout(ClientMessage::Batch { height }, CALL_TIMEOUT) {
            Ok(ServerMessage::Batch(Some(b))) if b.body_available => batches.push(StoredBatch {
                header: b.header,
                signature: b.signature,
                request_ids: b.request_ids,
                outcomes: b.outcomes,
            }),
            Ok(ServerMessage::Batch(Some(b))) if batches.is_empty() => headers.push(SeenHeader {
                header: b.header,
                signature: b.signature,
                source: format!("node {} header without a body at height {height}", status.node_id),
            }),
            Ok(ServerMessage::Batch(None)) if batches.is_empty() => {}
            other => return Err(format!("batch {height} of applied height {}: {other:?}", status.applied_height)),
        }
    }
    let audit = audit(access, addr).ok_or("no audit")?;
    let replica = ReplicaFinal {
        node_id: status.node_id,
        batches,
        applied_height: audit.applied_height,
        state_digest: audit.state_digest,
        balances: balances_summing_to(audit.balance_total),
    };
    Ok((replica, headers))
}

/// The audit gives the balance total, which is what conservation (I4) needs: as balances of an
/// unnamed account, in as many `u64` parts as the total takes.
fn balances_summing_to(mut total: u128) -> Vec<(PublicKey, u64)> {
    let mut parts = Vec::new();
    loop {
        let part = u64::try_from(total).unwrap_or(u64::MAX);
        parts.push((PublicKey([0; 32]), part));
        total -= u128::from(part);
        if total == 0 {
            return parts;
        }
    }
}

/// What [`check_cluster`] read and found.
#[derive(Debug)]
pub struct ClusterCheck {
    /// The highest height any replica applied.
    pub heights: u64,
    pub replicas: usize,
    /// Distinct request ids in the committed history of every replica read.
    pub requests_in_history: usize,
    pub acknowledged: usize,
    pub verdicts: Verdicts,
}

impl ClusterCheck {
    pub fn ok(&self) -> bool {
        self.verdicts.ok()
    }
}

/// Reads every replica back and checks the committed history against the receipts clients were
/// given (`acked`), with `tally_check::check::check_committed`: I1 (each receipt verified
/// offline too), I2, I3, and I4's money against `supply`. A replica that cannot be read is a
/// violation.
pub fn check_cluster(
    access: &Access,
    addrs: &[String],
    operator: &PublicKey,
    acked: &HashMap<RequestId, Receipt>,
    supply: u128,
) -> ClusterCheck {
    let back = read_cluster(access, addrs);
    let requests_in_history: HashSet<&RequestId> =
        back.replicas.iter().flat_map(|r| &r.batches).flat_map(|b| &b.request_ids).collect();
    let requests_in_history = requests_in_history.len();
    let record = RunRecord {
        operator: *operator,
        genesis_total: supply,
        history: acknowledged_history(acked),
        headers: back.headers.clone(),
        healed_at_ms: 0,
        height_at_heal: 0,
        height_at_end: None,
        first_commit_after_heal_ms: None,
        replicas: back.replicas.clone(),
    };
    let mut verdicts = check_committed(&record);
    verdicts.violations.extend(back.unread_violation());
    ClusterCheck {
        heights: back.replicas.iter().map(|r| r.applied_height).max().unwrap_or(0),
        replicas: back.replicas.len(),
        requests_in_history,
        acknowledged: acked.len(),
        verdicts,
    }
}

/// A history of acknowledgements alone, in commit order: no invocation times, so only the checks
/// of committed history ([`check_committed`]) read it.
fn acknowledged_history(acked: &HashMap<RequestId, Receipt>) -> History {
    let mut receipts: Vec<&Receipt> = acked.values().collect();
    receipts.sort_by_key(|r| (r.header.height, r.leaf_index));
    let ops = receipts
        .into_iter()
        .map(|r| Op {
            client: 0,
            invoke_ms: 0,
            complete_ms: Some(0),
            kind: OpKind::of_request(&r.request),
            result: OpResult::Committed(Box::new(r.clone())),
        })
        .collect();
    History { ops }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_totals_beyond_u64_are_split_without_loss() {
        let sum = |parts: Vec<(PublicKey, u64)>| parts.iter().map(|(_, b)| u128::from(*b)).sum::<u128>();
        for total in [0, 1, u128::from(u64::MAX), u128::from(u64::MAX) + 1, 3 * u128::from(u64::MAX) + 7] {
            assert_eq!(sum(balances_summing_to(total)), total);
        }
        assert_eq!(balances_summing_to(0).len(), 1);
    }
}
