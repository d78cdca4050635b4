//! Coordination primitives (`docs/coordination.md`) end to end on three replicas, through the real
//! `tally` binary and the client library: leases with attached documents, compare-and-set,
//! first-claim permissions with an offline-verifiable receipt, transactions, and a leader failover
//! while a lease is live.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tally_client::{ClaimResult, LeaseKeeper};
use tally_codec::Outcome;

/// `tally --cluster-dir DIR --key accounts/<account>.key ARGS`.
fn tally(dir: &Path, account: usize, args: &[&str]) -> Output {
    let key = dir.join(format!("accounts/{account}.key"));
    tally_command().arg("--cluster-dir").arg(dir).arg("--key").arg(&key).args(args).output().expect("run tally")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `-o json`, whatever the exit status; the document on stdout.
fn json(dir: &Path, account: usize, args: &[&str]) -> (bool, Value) {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let o = tally(dir, account, &all);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&o)));
    (o.status.success(), v)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

const DOC: &str = "0d5d3807-5fbf-4228-a657-5a091c4e497f";
const DOC2: &str = "9a1c3b4e-2f6d-4e8a-9b7c-1d2e3f4a5b6c";

#[test]
fn leases_compare_and_set_claims_and_transactions_from_the_cli() {
    let (dir, layout) = init_cluster(3, 2);
    let d = dir.path();
    let _nodes = start_all(&layout);

    // A lease, and a create-only document attached to it.
    let (ok, v) = json(d, 0, &["lease", "grant", "--ttl-ms", "3000"]);
    assert!(ok && v["outcome"] == "lease_granted", "{v}");
    let lease = v["lease"].as_u64().expect("lease id");
    let lease_s = lease.to_string();
    let (ok, v) = json(d, 0, &["set", DOC, r#"{"leader":"a"}"#, "--lease", &lease_s, "--if-revision", "0"]);
    assert!(ok && v["outcome"] == "created", "{v}");
    // The race's loser: create-only again is refused, with the current revision, exit non-zero.
    let (ok, v) = json(d, 0, &["set", DOC, r#"{"leader":"b"}"#, "--if-revision", "0"]);
    assert!(!ok && v["outcome"] == "revision_mismatch" && v["current_revision"] == 1, "{v}");
    let (ok, v) = json(d, 0, &["delete", DOC, "--if-revision", "7"]);
    assert!(!ok && v["current_revision"] == 1, "{v}");
    // Another key may not renew or revoke it.
    let (ok, v) = json(d, 1, &["lease", "keepalive", &lease_s]);
    assert!(!ok && v["error_code"] == "NotLeaseHolder", "{v}");

    // Claims: the first is granted, with a receipt that verifies offline; the next is denied
    // and names the holder.
    let receipt = d.join("claim.json");
    let o = tally(d, 0, &["claim", "--domain", "slots", "--slot", "42", "--receipt", receipt.to_str().expect("utf8")]);
    assert!(o.status.success() && text(&o).contains("Granted"), "{}", text(&o));
    let o = tally(d, 1, &["claim", "--domain", "slots", "--slot", "42"]);
    let holder = public_of(&d.join("accounts/0.key"));
    assert!(!o.status.success(), "a denied claim exits non-zero: {}", text(&o));
    assert!(text(&o).contains(&format!("Denied: held by {holder} since height")), "{}", text(&o));
    let o = Command::new(tally_bin())
        .args(["verify", receipt.to_str().expect("utf8"), "--operator-key"])
        .arg(d.join("operator.pub"))
        .output()
        .expect("verify");
    assert!(o.status.success(), "the claim's receipt verifies offline: {}", text(&o));
    // The REPL's verbs, from stdin.
    let mut repl = Command::new(tally_bin())
        .arg("--cluster-dir")
        .arg(d)
        .arg("--key")
        .arg(d.join("accounts/1.key"))
        .arg("repl")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("repl");
    {
        use std::io::Write;
        let mut stdin = repl.stdin.take().expect("stdin");
        writeln!(stdin, "CLAIM slots 43\nCLAIM slots 42\nLEASE GRANT 100\nLEASE GRANT 5000").expect("write");
    }
    let session = repl.wait_with_output().expect("repl output");
    let session = String::from_utf8_lossy(&session.stdout);
    assert!(session.contains("Granted ("), "{session}");
    assert!(session.contains(&format!("Denied: held by {holder} since height")), "{session}");
    assert!(session.contains("Error: lease TTL out of range"), "{session}");
    assert!(session.contains("Lease ") && session.contains(" granted ("), "{session}");
    let o = tally(d, 0, &["claim", "--domain", "", "--slot", "1"]);
    assert!(!o.status.success() && text(&o).contains("claim domain"), "{}", text(&o));
    let o = tally(d, 0, &["lease", "grant", "--ttl-ms", "10"]);
    assert!(!o.status.success() && text(&o).contains("TTL out of range"), "{}", text(&o));

    // A transaction: the document is at revision 1, so `then` runs, whole.
    let to = public_of(&d.join("accounts/1.key"));
    let txn = d.join("txn.json");
    std::fs::write(
        &txn,
        format!(
            r#"{{ "compares": [ {{ "revision": {{ "key": "{DOC}", "revision": 1 }} }} ],
                "then": [ {{ "transfer": {{ "to": "{to}", "amount": 5 }} }},
                          {{ "set": {{ "key": "{DOC2}", "value": {{ "paid": 5 }}, "if_revision": 0 }} }} ],
                "else": [] }}"#
        ),
    )
    .expect("write txn");
    let (ok, v) = json(d, 0, &["txn", "--file", txn.to_str().expect("utf8")]);
    assert!(ok && v["outcome"] == "txn_applied" && v["branch"] == "then", "{v}");
    assert_eq!(v["outcomes"].as_array().map(Vec::len), Some(2), "{v}");
    // Again: DOC2 exists now, so the branch's create-only set fails and nothing is written,
    // the transfer included.
    let before = tally(d, 0, &["balance"]);
    let (ok, v) = json(d, 0, &["txn", "--file", txn.to_str().expect("utf8")]);
    assert!(!ok && v["outcome"] == "revision_mismatch", "{v}");
    assert_eq!(tally(d, 0, &["balance"]).stdout, before.stdout, "a failed transaction moved no money");

    // The lease was never kept alive: it ends, and its document with it.
    let gone = wait_until(Duration::from_secs(15), || {
        let o = tally(d, 0, &["get", DOC]);
        !o.status.success() && text(&o).contains("Not found")
    });
    assert!(gone, "the lease's document was deleted when the lease ended");
    let (ok, v) = json(d, 0, &["lease", "keepalive", &lease_s]);
    assert!(!ok && v["error_code"] == "LeaseNotFound", "{v}");
    assert!(tally(d, 0, &["get", DOC2]).status.success(), "a document written without the lease stays");
}

/// A watcher sees every committed change of what it follows, in commit order with no gap, and
/// resumes from its height on another replica after the one it read from is killed.
#[test]
fn a_watch_follows_commits_in_order_and_resumes_after_a_kill() {
    let (_dir, layout) = init_cluster(3, 2);
    let mut nodes = start_all(&layout);
    let writer = client(&layout, 0);
    let keys: Vec<tally_codec::DocKey> = (0..4u8)
        .map(|i| tally_codec::DocKey::parse(&format!("0d5d3807-5fbf-4228-a657-5a091c4e49{i:02x}")).expect("uuid"))
        .collect();
    let first = writer.status().expect("status").committed_height + 1;
    for (n, k) in keys.iter().enumerate() {
        writer.set(*k, &format!(r#"{{"n":{n}}}"#)).expect("set");
    }
    writer.delete(keys[0]).expect("delete");
    // A watcher on one follower only, from before the writes.
    let (l, _) = wait_leader(&nodes, Duration::from_secs(10));
    let f = (l + 1) % 3;
    let dial_addr = vec![layout.client_addrs()[f].clone(), layout.client_addrs()[(f + 1) % 3].clone()];
    let reader = tally_client::Client::connect(
        &dial_addr,
        account_key(&layout, 1),
        opts_for(&dial_addr, tally_client::ClientOptions::default()),
    )
    .expect("connect");
    let mut w = reader.watch(tally_codec::wire::WatchFilter::AllDocs, Some(first)).expect("watch");
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(w.next().expect("endless").expect("event"));
    }
    let kinds: Vec<String> = got
        .iter()
        .map(|e| match &e.change {
            tally_codec::wire::Change::DocSet { key, revision, value, .. } => {
                format!("set {} r{revision} {}", key, String::from_utf8_lossy(value))
            }
            tally_codec::wire::Change::DocDeleted { key } => format!("del {key}"),
            c => format!("{c:?}"),
        })
        .collect();
    let want: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(n, k)| format!(r#"set {k} r1 {{"n":{n}}}"#))
        .chain([format!("del {}", keys[0])])
        .collect();
    assert_eq!(kinds, want, "every change, in commit order");
    assert!(got.windows(2).all(|p| p[0].height <= p[1].height), "heights never go back");
    // Kill the replica the watcher reads from; it resumes on another, from its height, and
    // sees the next change and nothing twice.
    nodes[f].kill9();
    writer.set(keys[1], r#"{"n":"after"}"#).expect("set after the kill");
    let e = w.next().expect("endless").expect("event after the kill");
    match &e.change {
        tally_codec::wire::Change::DocSet { key, revision, .. } => assert_eq!((*key, *revision), (keys[1], 2)),
        c => panic!("expected the write after the kill, got {c:?}"),
    }
    // The CLI: the same history from the same height, as lines.
    let out = Command::new(tally_bin())
        .arg("--cluster-dir")
        .arg(&layout.dir)
        .args(["watch", "--all", "--from-height", &first.to_string(), "--count", "6"])
        .output()
        .expect("tally watch");
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect::<Vec<_>>();
    assert!(out.status.success() && lines.len() == 6, "{}", text(&out));
    assert!(lines[4].contains(&format!("deleted {}", keys[0])) && lines[5].contains("revision 2"), "{lines:?}");
}

fn public_of(key_file: &Path) -> String {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(key_file).expect("key")).expect("json");
    v["public"].as_str().expect("public").to_string()
}

/// Kill -9 the leader while a kept-alive lease and a plain one are live: the kept-alive lease
/// survives the failover (the new leader loaded it, nothing expired early), and the plain one
/// ends within its TTL plus the election, in batch time.
#[test]
fn leases_survive_a_leader_failover_and_end_on_time_after_it() {
    let (_dir, layout) = init_cluster(3, 2);
    let mut nodes = start_all(&layout);
    let client = Arc::new(client(&layout, 0));
    let keeper = LeaseKeeper::grant(client.clone(), 2_000, Duration::from_millis(200)).expect("keeper");
    let (plain, _) = client.lease_grant(6_000).expect("plain lease");
    let doc = tally_codec::DocKey::parse(DOC).expect("uuid");
    client.set_if(doc, r#"{"held":true}"#, Some(0), Some(plain.id)).expect("attached");
    let (l, _) = wait_leader(&nodes, Duration::from_secs(10));
    nodes[l].kill9();
    // Up to just before its expiry the attached document is there, read (linearizably) through
    // the new leader: the failover ended nothing early.
    let deadline = plain.expires_at_ms.saturating_sub(500);
    let mut last_seen = 0;
    while now_ms() < deadline {
        match client.get(doc, false) {
            Ok(Some(_)) => last_seen = now_ms(),
            Ok(None) => {
                panic!("the document went before its lease's expiry ({} ms early)", plain.expires_at_ms - now_ms())
            }
            Err(_) => {} // the election
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(last_seen + 1_500 >= deadline, "read through the new leader shortly before the expiry: {last_seen}");
    // After: gone within TTL plus the election (generous bound for a loaded machine).
    let ended = wait_until(Duration::from_secs(10), || matches!(client.get(doc, false), Ok(None)));
    assert!(ended, "the plain lease ended after the failover, and its document with it");
    // The kept-alive lease is still alive, renewed through the new leader.
    std::thread::sleep(Duration::from_millis(2_500));
    assert!(keeper.is_valid(), "the keeper kept its lease through the failover: {:?}", keeper.lost());
    let (exp, _) = client.lease_keepalive(keeper.lease().id).expect("still alive after the failover");
    assert!(exp > now_ms(), "renewed into the future");
    // A claim under the kept lease, denied to another key while the lease lives.
    let (granted, _) = client.claim("validator", 1, Some(keeper.lease().id)).expect("claim");
    assert!(matches!(granted, ClaimResult::Granted { .. }));
    let other = common::client(&layout, 1);
    let (denied, c) = other.claim("validator", 1, None).expect("claim");
    assert!(matches!(denied, ClaimResult::Denied { .. }), "{:?}", c.receipt.outcome);
    assert!(matches!(c.receipt.outcome, Outcome::ClaimDenied { .. }));
}
