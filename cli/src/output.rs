//! `tally -o json`: the JSON documents the commands print, one per run, on stdout. The field
//! names are documented in `docs/cli.md` and are a stable interface: add fields, never rename.

use serde_json::{json, Value};
use tally_client::client::Committed;
use tally_client::error::ClientError;
use tally_codec::wire::{DocView, StatusInfo};
use tally_codec::{Outcome, PublicKey, RequestId};

/// `-o text` (default) or `-o json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document on stdout (fields in docs/cli.md).
    Json,
}

/// A time in milliseconds since the Unix epoch as people read it: `2026-12-08 01:50:07.250 UTC`.
/// (Batch times and lease ends are the leader's clock, in UTC; JSON keeps the milliseconds.)
pub fn utc(ms: u64) -> String {
    let (days, in_day) = (ms / 86_400_000, ms % 86_400_000);
    // Howard Hinnant's civil_from_days: the proleptic Gregorian date of a day count.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1_000 % 60, in_day % 1_000);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{milli:03} UTC")
}

/// Prints one JSON document on stdout.
pub fn print(v: &Value) {
    // A `Value` always serialises; `to_string_pretty` can only fail for non-string map keys.
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// The error document of `-o json` (the same message goes to stderr): `error`, and
/// `error_code` when a node answered with one (`InsufficientFunds`, `NotAuthorized`, ...).
pub fn error(e: &ClientError) -> Value {
    let code = match e {
        ClientError::Refused(w) | ClientError::Server(w) => Some(format!("{:?}", w.code)),
        ClientError::Rejected { code, .. } => Some(format!("{code:?}")),
        _ => None,
    };
    json!({ "error": e.to_string(), "error_code": code })
}

/// An outcome as `{ "outcome": name, ... }` fields merged into `into`.
fn outcome_fields(outcome: &Outcome, into: &mut serde_json::Map<String, Value>) {
    let (name, extra): (&str, Value) = match outcome {
        Outcome::DocCreated { revision } => ("created", json!({ "revision": revision })),
        Outcome::DocUpdated { revision } => ("updated", json!({ "revision": revision })),
        Outcome::DocDeleted => ("deleted", json!({})),
        Outcome::Transferred { sender_balance } => ("transferred", json!({ "sender_balance": sender_balance })),
        Outcome::Rejected(code) => {
            ("rejected", json!({ "error_code": format!("{code:?}"), "error": code.to_string() }))
        }
        Outcome::RevisionMismatch { current } => ("revision_mismatch", json!({ "current_revision": current })),
        Outcome::LeaseGranted { lease, expires_at_ms } => {
            ("lease_granted", json!({ "lease": lease, "expires_at_ms": expires_at_ms }))
        }
        Outcome::LeaseRenewed { expires_at_ms } => ("lease_renewed", json!({ "expires_at_ms": expires_at_ms })),
        Outcome::LeaseRevoked => ("lease_revoked", json!({})),
        Outcome::ClaimGranted { height } => ("claim_granted", json!({ "granted_height": height })),
        Outcome::ClaimDenied { holder, height } => {
            ("claim_denied", json!({ "holder": holder.to_string(), "granted_height": height }))
        }
        Outcome::TxnApplied { then, outcomes } => {
            let each: Vec<Value> = outcomes
                .iter()
                .map(|o| {
                    let mut m = serde_json::Map::new();
                    outcome_fields(o, &mut m);
                    Value::Object(m)
                })
                .collect();
            ("txn_applied", json!({ "branch": if *then { "then" } else { "else" }, "outcomes": each }))
        }
    };
    into.insert("outcome".into(), Value::String(name.into()));
    if let Value::Object(m) = extra {
        into.extend(m);
    }
}

/// `set`, `delete`, `transfer`: the committed outcome (a rejection included).
pub fn write(c: &Committed, receipt_saved_to: Option<&std::path::Path>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("request_id".into(), json!(c.request_id.to_string()));
    m.insert("height".into(), json!(c.receipt.header.height));
    m.insert("durable_replicas".into(), json!(c.durable_replicas));
    outcome_fields(&c.receipt.outcome, &mut m);
    m.insert("receipt_file".into(), json!(receipt_saved_to.map(|p| p.display().to_string())));
    Value::Object(m)
}

/// `get`: the document, its value parsed as JSON.
pub fn get(doc: &str, view: Option<&DocView>) -> Value {
    match view {
        Some(d) => {
            let value: Value = serde_json::from_slice(&d.value)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.value).into_owned()));
            json!({ "doc": doc, "found": true, "owner": d.owner.to_string(), "revision": d.revision, "value": value })
        }
        None => json!({ "doc": doc, "found": false }),
    }
}

/// `watch -o json`: one compact JSON object per change, one per line.
pub fn watch_event(e: &tally_codec::wire::WatchEvent) -> Value {
    use tally_codec::wire::Change;
    let change = match &e.change {
        Change::DocSet { key, owner, revision, lease, value } => {
            let value: Value = serde_json::from_slice(value)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(value).into_owned()));
            json!({ "change": "doc_set", "doc": key.to_string(), "owner": owner.to_string(), "revision": revision, "lease": lease, "value": value })
        }
        Change::DocDeleted { key } => json!({ "change": "doc_deleted", "doc": key.to_string() }),
        Change::ClaimGranted { domain, slot, holder, lease } => {
            json!({ "change": "claim_granted", "domain": domain, "slot": slot, "holder": holder.to_string(), "lease": lease })
        }
        Change::ClaimReleased { domain, slot } => json!({ "change": "claim_released", "domain": domain, "slot": slot }),
        Change::LeaseSet { lease, owner, expires_at_ms } => {
            json!({ "change": "lease_set", "lease": lease, "owner": owner.to_string(), "expires_at_ms": expires_at_ms })
        }
        Change::LeaseEnded { lease } => json!({ "change": "lease_ended", "lease": lease }),
    };
    let mut m = serde_json::Map::new();
    m.insert("height".into(), json!(e.height));
    m.insert("time_ms".into(), json!(e.time_ms));
    if let Value::Object(c) = change {
        m.extend(c);
    }
    Value::Object(m)
}

/// `balance`.
pub fn balance(account: &PublicKey, balance: u64) -> Value {
    json!({ "account": account.to_string(), "balance": balance })
}

/// `receipt`: the summary and the receipt file's content.
pub fn receipt(id: &RequestId, r: &tally_codec::Receipt, file: &Value, saved_to: Option<&std::path::Path>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("request_id".into(), json!(id.to_string()));
    m.insert("height".into(), json!(r.header.height));
    outcome_fields(&r.outcome, &mut m);
    m.insert("receipt_file".into(), json!(saved_to.map(|p| p.display().to_string())));
    m.insert("receipt".into(), file.clone());
    Value::Object(m)
}

/// `cluster init`: what was written where.
pub fn cluster_init(layout: &crate::cluster::ClusterLayout) -> Value {
    let nodes: Vec<Value> = layout
        .configs
        .iter()
        .zip(&layout.config_paths)
        .map(|(c, p)| {
            json!({
                "node_id": c.node_id,
                "client_addr": c.listen,
                "peer_addr": c.peer_listen,
                "metrics_addr": c.metrics_listen,
                "config_file": p.display().to_string(),
                "data_dir": c.data_dir,
            })
        })
        .collect();
    let path = |name: &str| layout.dir.join(name).display().to_string();
    json!({
        "dir": layout.dir.display().to_string(),
        "cluster_id": layout.cluster_id,
        "operator_key": layout.operator_public,
        "operator_pub_file": layout.operator_pub_path.display().to_string(),
        "genesis_file": layout.genesis_path.display().to_string(),
        "ca_file": path(crate::cluster::CA_FILE),
        "admin_key_file": path(crate::cluster::ADMIN_KEY_FILE),
        "nodes": nodes,
        "account_key_files": layout.account_keys.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

/// A member's role as `status` shows it.
pub fn role(s: &StatusInfo, m: &tally_codec::wire::MemberInfo) -> &'static str {
    if Some(m.node_id) == s.leader_id {
        "leader"
    } else if m.is_voter {
        "voter"
    } else {
        "learner"
    }
}

/// `status`: the view of the node in `s` (the leader when it could be reached), each member's
/// reachability from here (`reachable[i]` for `s.members[i]`), and who answered first.
/// Of the voters of `s`, how many `reachable` (by member, in `s.members` order) says answer,
/// and how many replicas the configuration has.
pub fn voters_reachable(s: &StatusInfo, reachable: &[bool]) -> (usize, usize) {
    let voters = s.members.iter().filter(|m| m.is_voter).count();
    let answering = s.members.iter().zip(reachable).filter(|(m, r)| m.is_voter && **r).count();
    (answering, (s.replicas_configured as usize).max(voters))
}

pub fn status(s: &StatusInfo, answered_by: u64, reachable: &[bool]) -> Value {
    let top = s.members.iter().map(|m| m.matched_index).max().unwrap_or(0);
    let members: Vec<Value> = s
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            json!({
                "node_id": m.node_id,
                "client_addr": m.client_addr,
                "peer_addr": m.peer_addr,
                "role": role(s, m),
                "voter": m.is_voter,
                "match_index": m.matched_index,
                "lag": top - m.matched_index,
                "reachable": reachable.get(i).copied().unwrap_or(false),
            })
        })
        .collect();
    let (voters_reachable, configured) = voters_reachable(s, reachable);
    json!({
        "cluster_id": s.cluster_id.to_string(),
        "operator_key": s.operator_key.to_string(),
        "answered_by": answered_by,
        "view_of": s.node_id,
        "leader_id": s.leader_id,
        "leader_addr": s.leader_addr,
        "term": s.term,
        "committed_height": s.committed_height,
        "applied_height": s.applied_height,
        "replicas_configured": s.replicas_configured,
        "members": members,
        "reachable": voters_reachable,
        "majority_reachable": voters_reachable > configured / 2,
        "warnings": s.warnings,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000 UTC", "a leap day");
        assert_eq!(utc(1_796_693_407_250), "2026-12-08 01:30:07.250 UTC");
        assert_eq!(utc(4_102_444_799_999), "2099-12-31 23:59:59.999 UTC");
    }
    use super::*;

    #[test]
    fn outcomes_have_stable_names() {
        let mut m = serde_json::Map::new();
        outcome_fields(&Outcome::Rejected(tally_codec::ErrorCode::InsufficientFunds), &mut m);
        assert_eq!(m["outcome"], "rejected");
        assert_eq!(m["error_code"], "InsufficientFunds");
        let mut m = serde_json::Map::new();
        outcome_fields(&Outcome::Transferred { sender_balance: 5 }, &mut m);
        assert_eq!(m["outcome"], "transferred");
        assert_eq!(m["sender_balance"], 5);
    }
}
