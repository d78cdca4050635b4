//! `tally bench` signs as it sends: a run longer than requests signed before the clock could
//! live (they expire 2 minutes after signing at most) sends no expired request, and its JSON says
//! what the signing cost.

mod common;

use common::*;

/// 95 s of open-loop load (longer than the 90 s pre-signing allowed): every request is
/// committed, none is refused `Expired`, and the JSON reports the signing CPU time and whether
/// signing fell behind.
#[test]
fn a_run_longer_than_presigned_requests_live_sends_none_expired() {
    let (dir, layout) = init_cluster(1, 2);
    let _nodes = start_all(&layout);
    let json = dir.path().join("bench.json");
    let out = tally_command()
        .args(["--cluster-dir", dir.path().to_str().expect("utf8"), "bench", "--duration", "95"])
        .args(["--clients", "2", "--batch", "10", "--rate", "400", "--rate-max", "1000"])
        .args(["--accounts-dir", layout.dir.join("accounts").to_str().expect("utf8")])
        .args(["--key", layout.account_keys[0].to_str().expect("utf8")])
        .args(["--json", json.to_str().expect("utf8")])
        .output()
        .expect("tally bench");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    println!("{b}");
    let refusals = b["refusals"].as_object().expect("refusals");
    assert!(!refusals.keys().any(|k| k.contains("Expired")), "expired requests were sent: {refusals:?}");
    assert_eq!(b["errors"].as_u64(), Some(0), "{b}");
    assert!(b["committed"].as_u64().expect("committed") >= 30_000, "{b}");
    assert!(b["signing_cpu_s"].as_f64().is_some_and(|s| s > 0.0), "signing CPU time: {b}");
    assert!(b["signing_fell_behind"].is_boolean(), "{b}");
    assert_eq!(b["expired_unsent"].as_u64(), Some(0), "{b}");
}
