//! `tally -o json` parsed from the real binary against a real cluster, and the runbook
//! (`docs/runbook.md`) walked through the real binaries: add a replica, replace a dead disk,
//! remove a replica, back up and restore a stopped cluster.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn run(args: &[&str]) -> Output {
    tally_command().args(args).output().expect("run tally")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `tally --cluster-dir DIR -o json ARGS`: exit 0 and one JSON document on stdout.
fn json_ok(dir: &Path, args: &[&str]) -> Value {
    let o = json_run(dir, args);
    assert!(o.status.success(), "tally {args:?}: {}", text(&o));
    parse(&o)
}

fn json_run(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--cluster-dir", dir.to_str().expect("utf8"), "-o", "json"];
    all.extend_from_slice(args);
    run(&all)
}

fn parse(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", text(o)))
}

fn public_of(key_file: &Path) -> String {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(key_file).expect("key")).expect("json");
    v["public"].as_str().expect("public").to_string()
}

/// `cluster init -o json` through the binary; registers the cluster's TLS for the helpers.
fn init(nodes: usize, dir: &Path) -> Value {
    let base = free_base_port(nodes + 1).to_string();
    let o = run(&[
        "-o",
        "json",
        "cluster",
        "init",
        "--nodes",
        &nodes.to_string(),
        "--dir",
        dir.to_str().expect("utf8"),
        "--accounts",
        "2",
        "--base-port",
        &base,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v = parse(&o);
    let dial = tally_net::Dial::cluster(&dir.join("ca.pem")).expect("CA");
    for n in v["nodes"].as_array().expect("nodes") {
        register_dial(n["client_addr"].as_str().expect("client_addr"), dial.clone());
    }
    v
}

fn start(dir: &Path, node: &Value) -> Daemon {
    let id = node["node_id"].as_u64().expect("node_id");
    Daemon::spawn(
        Path::new(node["config_file"].as_str().expect("config_file")),
        node["client_addr"].as_str().expect("client_addr"),
        &dir.join(format!("node-{id}.log")),
    )
}

/// `status -o json` members as (id, role, reachable).
fn members(status: &Value) -> Vec<(u64, String, bool)> {
    let mut v: Vec<(u64, String, bool)> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["node_id"].as_u64().expect("node_id"),
                m["role"].as_str().expect("role").to_string(),
                m["reachable"].as_bool().expect("reachable"),
            )
        })
        .collect();
    v.sort();
    v
}

/// Polls `status -o json` until `cond` holds (20 s).
fn wait_status(dir: &Path, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        let o = json_run(dir, &["status"]);
        if !o.status.success() {
            return false;
        }
        last = parse(&o);
        cond(&last)
    });
    assert!(ok, "status never showed {what}; last:\n{last:#}");
    last
}

fn is_hex(s: &Value, len: usize) -> bool {
    s.as_str().is_some_and(|s| s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit()))
}

#[test]
fn json_output_of_every_command() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("c");
    let init = init(3, &d);
    for f in ["cluster_id", "operator_key", "ca_file", "admin_key_file", "genesis_file", "operator_pub_file"] {
        assert!(init[f].is_string(), "cluster init JSON lacks {f}: {init:#}");
    }
    let nodes = init["nodes"].as_array().expect("nodes").clone();
    assert_eq!(nodes.len(), 3);
    for n in &nodes {
        assert!(Path::new(n["config_file"].as_str().expect("config")).exists(), "{n}");
        assert!(n["peer_addr"].is_string() && n["metrics_addr"].is_string() && n["data_dir"].is_string(), "{n}");
    }
    assert_eq!(init["account_key_files"].as_array().expect("accounts").len(), 2);
    let mut daemons: Vec<Daemon> = nodes.iter().map(|n| start(&d, n)).collect();
    for x in &daemons {
        x.wait_ready(Duration::from_secs(30));
    }

    // status: the leader's view of every member.
    let s = wait_status(&d, "three reachable members", |s| members(s).iter().filter(|m| m.2).count() == 3);
    assert_eq!(s["cluster_id"], init["cluster_id"]);
    assert_eq!(s["operator_key"], init["operator_key"]);
    let leader = s["leader_id"].as_u64().expect("a leader");
    assert_eq!(s["view_of"], leader, "the view is the leader's: {s:#}");
    assert!(s["answered_by"].is_u64() && s["term"].as_u64().expect("term") >= 1, "{s:#}");
    assert_eq!(s["replicas_configured"], 3);
    assert_eq!(s["reachable"], 3);
    assert_eq!(s["majority_reachable"], true);
    assert!(s["warnings"].as_array().is_some_and(Vec::is_empty), "{s:#}");
    let ms = members(&s);
    assert_eq!(ms.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(ms.iter().filter(|m| m.1 == "leader").map(|m| m.0).collect::<Vec<_>>(), [leader]);
    assert!(ms.iter().all(|m| m.1 == "leader" || m.1 == "voter"), "{ms:?}");
    for m in s["members"].as_array().expect("members") {
        assert!(m["match_index"].is_u64() && m["lag"].is_u64() && m["voter"] == true, "{m}");
        assert!(m["client_addr"].is_string() && m["peer_addr"].as_str().is_some_and(|p| !p.is_empty()), "{m}");
    }

    // Writes: outcome, request id, height.
    let k0 = d.join("accounts/0.key");
    let k0s = k0.to_str().expect("utf8");
    let to = public_of(&d.join("accounts/1.key"));
    let rfile = d.join("t.json");
    let t = json_ok(
        &d,
        &["--key", k0s, "transfer", "--to", &to, "--amount", "7", "--receipt", rfile.to_str().expect("utf8")],
    );
    assert_eq!(t["outcome"], "transferred", "{t:#}");
    assert!(is_hex(&t["request_id"], 64), "{t:#}");
    assert!(t["height"].as_u64().is_some_and(|h| h >= 1), "{t:#}");
    assert!(t["durable_replicas"].as_u64().is_some_and(|n| n >= 2), "a majority holds it: {t:#}");
    assert_eq!(t["sender_balance"], 999_999_993u64);
    assert_eq!(t["receipt_file"], rfile.to_str().expect("utf8"));
    assert!(rfile.exists());
    let doc = "0d5d3807-5fbf-4228-a657-5a091c4e497f";
    let set = json_ok(&d, &["--key", k0s, "set", doc, r#"{"name": "comb", "n": 2}"#]);
    assert_eq!(set["outcome"], "created", "{set:#}");
    assert_eq!(set["revision"], 1);
    assert!(set["height"].as_u64() >= t["height"].as_u64(), "{set:#}");
    let set2 = json_ok(&d, &["--key", k0s, "set", doc, r#"{"name": "comb", "n": 3}"#]);
    assert_eq!(set2["outcome"], "updated");
    assert_eq!(set2["revision"], 2);
    let g = json_ok(&d, &["get", doc]);
    assert_eq!(g["found"], true);
    assert_eq!(g["doc"], doc);
    assert_eq!(g["value"]["n"], 3, "the value is JSON, not a string: {g:#}");
    assert_eq!(g["revision"], 2);
    assert_eq!(g["owner"], public_of(&k0));
    let del = json_ok(&d, &["--key", k0s, "delete", doc]);
    assert_eq!(del["outcome"], "deleted", "{del:#}");
    let o = json_run(&d, &["get", doc]);
    assert_eq!(o.status.code(), Some(1), "get of a missing document exits 1");
    let g = parse(&o);
    assert_eq!(g["found"], false, "{g:#}");
    let b = json_ok(&d, &["balance", &to]);
    assert_eq!(b["account"], to);
    assert_eq!(b["balance"], 1_000_000_007u64);
    let b = json_ok(&d, &["--key", k0s, "balance", "--stale"]);
    assert_eq!(b["balance"], 999_999_993u64, "{b:#}");

    // receipt: the summary and the receipt file's content, which verifies.
    let id = set["request_id"].as_str().expect("id");
    let out = d.join("r.json");
    let r = json_ok(&d, &["receipt", id, "--out", out.to_str().expect("utf8")]);
    assert_eq!(r["request_id"], id);
    assert_eq!(r["height"], set["height"]);
    assert_eq!(r["outcome"], "created");
    assert_eq!(r["receipt"]["request_id"], id);
    assert!(r["receipt"]["receipt"].as_str().is_some_and(|h| h.len() > 100), "{r:#}");
    let v = run(&[
        "verify",
        out.to_str().expect("utf8"),
        "--operator-key",
        init["operator_key"].as_str().expect("op"),
        "--cluster-id",
        init["cluster_id"].as_str().expect("id"),
    ]);
    assert!(v.status.success(), "the saved receipt verifies: {}", text(&v));

    // Errors: exit 1, the message on stderr, an error object on stdout.
    let o = json_run(&d, &["--key", k0s, "transfer", "--to", &to, "--amount", "5000000000"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = parse(&o);
    assert_eq!(e["error_code"], "InsufficientFunds", "{e:#}");
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("Error: "), "{}", text(&o));
    assert!(e["error"].as_str().is_some_and(|m| String::from_utf8_lossy(&o.stderr).contains(m)), "{}", text(&o));
    let o = run(&["-o", "json", "--addr", &format!("127.0.0.1:{}", free_port()), "status"]);
    assert_eq!(o.status.code(), Some(1));
    let e = parse(&o);
    assert!(e["error"].as_str().is_some_and(|m| m.contains("connect")), "{e:#}");
    assert!(e["error_code"].is_null());

    // A follower down: the leader still lists it, unreachable from here and lagging.
    let fi = (0..3).find(|i| *i as u64 + 1 != leader).expect("a follower");
    daemons[fi].kill9();
    for _ in 0..3 {
        json_ok(&d, &["--key", k0s, "transfer", "--to", &to, "--amount", "1"]);
    }
    let s = wait_status(&d, "the follower unreachable and lagging", |s| {
        s["members"].as_array().is_some_and(|ms| {
            ms.iter().any(|m| {
                m["node_id"] == fi as u64 + 1 && m["reachable"] == false && m["lag"].as_u64().is_some_and(|l| l >= 3)
            })
        })
    });
    assert_eq!(s["reachable"], 2, "{s:#}");
    assert_eq!(s["majority_reachable"], true);
    assert_eq!(members(&s).len(), 3, "a stopped member is still a member");
    // Text status shows the leader's view too.
    let o = run(&["--cluster-dir", d.to_str().expect("utf8"), "status"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(&format!("Answered by node {leader}; leader: node {leader}")), "{t}");
    assert!(t.contains("Reachable from here: 2 of 3 replicas"), "{t}");
}

/// docs/runbook.md, step by step through the binaries: add node 4 (files, start, add), replace
/// node 3's dead disk under the same id (remove, wipe, start, add), remove node 4 again, then a
/// cold backup of every data directory and its restore.
#[test]
fn runbook_add_replace_remove_backup_restore() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("c");
    let init = init(3, &d);
    let nodes = init["nodes"].as_array().expect("nodes").clone();
    let mut daemons: Vec<Daemon> = nodes.iter().map(|n| start(&d, n)).collect();
    for x in &daemons {
        x.wait_ready(Duration::from_secs(30));
    }
    let k0 = d.join("accounts/0.key");
    let k0s = k0.to_str().expect("utf8");
    let to = public_of(&d.join("accounts/1.key"));
    let transfer = |amount: &str| json_ok(&d, &["--key", k0s, "transfer", "--to", &to, "--amount", amount]);
    transfer("1");

    // Add a replica: files, start, add.
    let base: u16 =
        nodes[0]["client_addr"].as_str().expect("a").rsplit(':').next().expect("port").parse::<u16>().expect("port")
            - 1;
    let (c4, p4) = (format!("127.0.0.1:{}", base + 4), format!("127.0.0.1:{}", base + 104));
    register_dial(&c4, tally_net::Dial::cluster(&d.join("ca.pem")).expect("CA"));
    let f = json_ok(&d, &["cluster", "add", "--node-id", "4", "--client", &c4, "--peer", &p4, "--files-only"]);
    assert_eq!(f["config_written"], true, "{f:#}");
    assert_eq!(f["added"], false);
    let config4 = f["config_file"].as_str().expect("config_file").to_string();
    assert_eq!(config4, d.join("node-4.toml").to_str().expect("utf8"));
    daemons.push(Daemon::spawn(Path::new(&config4), &c4, &d.join("node-4.log")));
    assert!(wait_until(Duration::from_secs(20), || status_of(&c4).is_some()), "node 4 does not answer");
    let a = json_ok(&d, &["cluster", "add", "--node-id", "4", "--client", &c4, "--peer", &p4]);
    assert_eq!(a["added"], true, "{a:#}");
    assert_eq!(a["config_written"], false, "the second run uses the file the first wrote: {a:#}");
    wait_status(&d, "four reachable voters", |s| {
        let m = members(s);
        m.len() == 4 && m.iter().all(|(_, role, r)| *r && role != "learner")
    });
    transfer("1");

    // Replace node 3's dead disk: stop it, remove it, wipe its data directory, start it empty,
    // add it again under the same id.
    let fi = 2;
    daemons[fi].kill9();
    let r = json_ok(&d, &["cluster", "remove", "3"]);
    assert_eq!(r, serde_json::json!({ "node_id": 3, "removed": true }));
    wait_status(&d, "node 3 gone", |s| members(s).iter().map(|m| m.0).collect::<Vec<_>>() == [1, 2, 4]);
    let data3 = PathBuf::from(nodes[fi]["data_dir"].as_str().expect("data_dir"));
    assert!(data3.join("log").exists(), "node 3 had a log in {}", data3.display());
    std::fs::remove_dir_all(&data3).expect("wipe node 3");
    transfer("1");
    // Its config afresh: the original names the members at creation only, not node 4 (when 4
    // leads, a node started from it could never answer it).
    let c3 = nodes[fi]["client_addr"].as_str().expect("a").to_string();
    let p3 = nodes[fi]["peer_addr"].as_str().expect("p").to_string();
    std::fs::rename(d.join("node-3.toml"), d.join("node-3.toml.old")).expect("move the old config");
    let f = json_ok(&d, &["cluster", "add", "--node-id", "3", "--client", &c3, "--peer", &p3, "--files-only"]);
    assert_eq!(f["added"], false);
    daemons[fi] = start(&d, &nodes[fi]);
    assert!(wait_until(Duration::from_secs(20), || status_of(&c3).is_some()), "the new node 3 does not answer");
    let a = json_ok(&d, &["cluster", "add", "--node-id", "3", "--client", &c3, "--peer", &p3]);
    assert_eq!(a["added"], true, "{a:#}");
    let s = wait_status(&d, "node 3 back, caught up", |s| {
        let m = members(s);
        m.len() == 4
            && m.iter().all(|(_, role, r)| *r && role != "learner")
            && s["members"].as_array().is_some_and(|ms| ms.iter().all(|m| m["lag"] == 0))
    });
    eprintln!("after the disk replacement: {s:#}");
    // Its state came back from the others: the same balance, read from node 3 alone.
    let ca = d.join("ca.pem");
    let stale_balance_on_3 =
        || run(&["--addr", &c3, "--ca", ca.to_str().expect("utf8"), "-o", "json", "balance", &to, "--stale"]);
    let b = stale_balance_on_3();
    assert!(b.status.success(), "{}", text(&b));
    let want = json_ok(&d, &["balance", &to]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let b = stale_balance_on_3();
            b.status.success() && parse(&b)["balance"] == want["balance"]
        }),
        "node 3 did not catch up to {want}"
    );

    // Remove a replica for good.
    json_ok(&d, &["cluster", "remove", "4"]);
    wait_status(&d, "three voters", |s| members(s).iter().map(|m| m.0).collect::<Vec<_>>() == [1, 2, 3]);
    daemons[3].terminate();
    let before = json_ok(&d, &["balance", &to]);

    // Cold backup: stop every replica (SIGTERM syncs the store), copy each data directory.
    for x in daemons.iter_mut().take(3) {
        x.terminate();
    }
    let backup = tmp.path().join("backup");
    std::fs::create_dir_all(&backup).expect("backup dir");
    for n in &nodes {
        let data = n["data_dir"].as_str().expect("data_dir");
        let st = Command::new("cp").args(["-a", data]).arg(&backup).status().expect("cp");
        assert!(st.success());
    }
    for (i, n) in nodes.iter().enumerate() {
        daemons[i] = start(&d, n);
    }
    for x in daemons.iter().take(3) {
        x.wait_ready(Duration::from_secs(30));
    }
    transfer("100");
    let after = json_ok(&d, &["balance", &to]);
    assert_eq!(after["balance"].as_u64(), before["balance"].as_u64().map(|b| b + 100));

    // Restore: stop every replica, put every data directory back, start them.
    for x in daemons.iter_mut().take(3) {
        x.terminate();
    }
    for n in &nodes {
        let data = PathBuf::from(n["data_dir"].as_str().expect("data_dir"));
        std::fs::remove_dir_all(&data).expect("remove");
        let st = Command::new("cp")
            .arg("-a")
            .arg(backup.join(data.file_name().expect("name")))
            .arg(data.parent().expect("parent"))
            .status()
            .expect("cp");
        assert!(st.success());
    }
    for (i, n) in nodes.iter().enumerate() {
        daemons[i] = start(&d, n);
    }
    for x in daemons.iter().take(3) {
        x.wait_ready(Duration::from_secs(30));
    }
    let restored = json_ok(&d, &["balance", &to]);
    assert_eq!(restored["balance"], before["balance"], "the cluster is back at the backup's state");
    wait_status(&d, "three reachable voters after the restore", |s| {
        members(s).iter().filter(|m| m.2 && m.1 != "learner").count() == 3
    });
    transfer("1");

    // Move the operator key file (same key, new place, 0600), one replica at a time.
    let old_key = d.join("operator.key");
    let keys = d.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let new_key = keys.join("operator.key");
    let st = Command::new("install").args(["-m", "0600"]).arg(&old_key).arg(&new_key).status().expect("install");
    assert!(st.success());
    for (i, n) in nodes.iter().enumerate() {
        daemons[i].terminate();
        let config = PathBuf::from(n["config_file"].as_str().expect("config"));
        let text = std::fs::read_to_string(&config).expect("config");
        let old_line = format!("operator_key_file = {:?}", old_key.display().to_string());
        assert!(text.contains(&old_line), "{text}");
        let text = text.replace(&old_line, &format!("operator_key_file = {:?}", new_key.display().to_string()));
        std::fs::write(&config, text).expect("write config");
        daemons[i] = start(&d, n);
        daemons[i].wait_ready(Duration::from_secs(30));
        let id = n["node_id"].as_u64().expect("id");
        wait_status(&d, "the restarted replica caught up", |s| {
            s["members"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["node_id"] == id && m["lag"] == 0 && m["reachable"] == true))
        });
    }
    std::fs::remove_file(&old_key).expect("remove the old key file");
    let out = d.join("after-move.json");
    let t = json_ok(
        &d,
        &["--key", k0s, "transfer", "--to", &to, "--amount", "1", "--receipt", out.to_str().expect("utf8")],
    );
    assert_eq!(t["outcome"], "transferred");
    let v =
        run(&["verify", out.to_str().expect("utf8"), "--operator-key", d.join("operator.pub").to_str().expect("utf8")]);
    assert!(v.status.success(), "receipts still verify against the same operator key: {}", text(&v));
}
