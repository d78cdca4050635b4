//! Checks a cluster's committed history against what clients were told.

use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tally_client::Connection;
use tally_codec::wire::{AuditInfo, BatchInfo, ClientMessage, ServerMessage, StatusInfo};
use tally_codec::{Digest, PublicKey, Receipt, RequestId};

/// The verdict of one check, with every violation found (not just the first).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Verdict {
    pub heights: u64,
    pub replicas: usize,
    pub requests_in_history: usize,
    pub acknowledged: usize,
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// How the checker reaches a cluster: its TLS and the admin key that scans need.
#[derive(Clone)]
pub struct Access {
    pub dial: tally_net::Dial,
    pub admin: ed25519_dalek::SigningKey,
}

impl Access {
    fn connect(&self, addr: &str) -> Option<Connection> {
        Connection::connect_with(addr, &self.dial, Duration::from_secs(2)).ok()
    }
}

pub fn status(access: &Access, addr: &str) -> Option<StatusInfo> {
    let conn = access.connect(addr)?;
    match conn.call_timeout(ClientMessage::Status, Duration::from_secs(10)).ok()? {
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

/// Waits until every reachable replica has applied `height`, up to `timeout`.
pub fn wait_converged(access: &Access, addrs: &[String], timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let statuses: Vec<StatusInfo> = addrs.iter().filter_map(|a| status(access, a)).collect();
        let top = statuses.iter().map(|s| s.committed_height).max().unwrap_or(0);
        if statuses.len() == addrs.len() && statuses.iter().all(|s| s.applied_height >= top) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads every batch from every replica and checks:
/// * I1: every acknowledged request is in the history exactly once, at the height and with the
///   outcome it was acknowledged with; no request id appears twice anywhere;
/// * I2: one header per height across replicas, each signed by the operator, chained unbroken;
/// * I3: replicas that applied a height agree on its state digest (part of the header);
/// * I4: every replica at the same height reports the same balance total, equal to `supply`.
pub fn check(
    access: &Access,
    addrs: &[String],
    operator: &PublicKey,
    acked: &HashMap<RequestId, Receipt>,
    supply: u128,
) -> Verdict {
    let mut v = Verdict { replicas: addrs.len(), acknowledged: acked.len(), ..Verdict::default() };
    let top: u64 = addrs.iter().filter_map(|a| status(access, a)).map(|s| s.applied_height).max().unwrap_or(0);
    v.heights = top;
    let mut conns: Vec<(String, Connection)> =
        addrs.iter().filter_map(|a| access.connect(a).map(|c| (a.clone(), c))).collect();
    if conns.len() < addrs.len() {
        v.violations.push(format!("only {} of {} replicas reachable for the check", conns.len(), addrs.len()));
    }
    let mut prev = Digest::ZERO;
    let mut seen: HashSet<RequestId> = HashSet::new();
    let mut found: HashMap<RequestId, (u64, tally_codec::Outcome)> = HashMap::new();
    for h in 1..=top {
        let mut chosen: Option<BatchInfo> = None;
        for (addr, conn) in &mut conns {
            let Ok(ServerMessage::Batch(Some(b))) =
                conn.call_timeout(ClientMessage::Batch { height: h }, Duration::from_secs(10))
            else {
                continue;
            };
            if let Err(e) = b.header.verify(operator, &b.signature) {
                v.violations.push(format!("I2: {addr} height {h}: {e}"));
            }
            match &chosen {
                None => chosen = Some(b),
                Some(c) => {
                    if c.header != b.header {
                        v.violations.push(format!("I2/I3: {addr} holds a different header at height {h}"));
                    }
                    if !c.body_available && b.body_available {
                        chosen = Some(b);
                    }
                }
            }
        }
        let Some(b) = chosen else {
            v.violations.push(format!("I2: no replica holds height {h}"));
            continue;
        };
        if b.header.prev_hash != prev {
            v.violations.push(format!("I2: chain broken at height {h}"));
        }
        prev = b.header.hash();
        if !b.body_available {
            v.violations.push(format!("I1: no replica holds the body of height {h}"));
            continue;
        }
        for (id, o) in b.request_ids.iter().zip(&b.outcomes) {
            if !seen.insert(*id) {
                v.violations.push(format!("I1: request {id} executed twice (again at height {h})"));
            }
            found.insert(*id, (h, o.clone()));
        }
    }
    v.requests_in_history = seen.len();
    for (id, r) in acked {
        match found.get(id) {
            None => v
                .violations
                .push(format!("I1: acknowledged request {id} (height {}) is not in the history", r.header.height)),
            Some((h, o)) => {
                if *h != r.header.height || *o != r.outcome {
                    v.violations.push(format!(
                        "I1: request {id} acknowledged at {} with {:?}, history has {h} with {o:?}",
                        r.header.height, r.outcome
                    ));
                }
            }
        }
        if let Err(e) = r.verify(operator) {
            v.violations.push(format!("I1: acknowledged receipt for {id} does not verify: {e}"));
        }
    }
    for addr in addrs {
        match audit(access, addr) {
            Some(a) if a.balance_total != supply => v.violations.push(format!(
                "I4: {addr} at height {} holds {} in total, genesis had {supply}",
                a.applied_height, a.balance_total
            )),
            Some(_) => {}
            None => v.violations.push(format!("I4: {addr} did not answer the audit")),
        }
    }
    v
}
