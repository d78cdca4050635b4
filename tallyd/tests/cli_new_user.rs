//! What a new user does, through the real `tally` binary against a real `tallyd`: init a
//! cluster, transfer with a saved receipt, verify it offline (and see a tampered one refused),
//! use the REPL, and run the bench (JSON + PNG).

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tally(args: &[&str]) -> Output {
    tally_with_ca(args, None)
}

/// `tally` with `TALLY_CA` set for this one run (tests of this binary run in parallel, each with
/// its own cluster and CA).
fn tally_with_ca(args: &[&str], ca: Option<&Path>) -> Output {
    let mut c = Command::new(tally_bin());
    c.args(args).env_remove("TALLY_ADDR").env_remove("TALLY_KEY").env_remove("TALLY_CA");
    if let Some(ca) = ca {
        c.env("TALLY_CA", ca);
    }
    c.output().expect("run tally")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn public_of(key_file: &Path) -> String {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(key_file).expect("key")).expect("json");
    v["public"].as_str().expect("public").to_string()
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

#[test]
fn new_user_flow_through_the_cli() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let base = free_base_port(1).to_string();
    let ds = d.to_str().expect("utf8");
    let o = tally(&["cluster", "init", "--nodes", "1", "--dir", ds, "--accounts", "2", "--base-port", &base]);
    assert!(o.status.success(), "{}", text(&o));
    for f in ["node-1.toml", "operator.pub", "operator.key", "genesis.json", "accounts/0.key", "accounts/1.key"] {
        assert!(d.join(f).exists(), "cluster init wrote no {f}");
    }
    let cfg: tally_codec::config::NodeConfig =
        toml::from_str(&std::fs::read_to_string(d.join("node-1.toml")).expect("toml")).expect("config parses");
    let ca = d.join("ca.pem");
    let tally = |args: &[&str]| tally_with_ca(args, Some(&ca));
    register_dial(&cfg.listen, tally_net::Dial::cluster(&d.join("ca.pem")).expect("CA"));
    let _node = Daemon::start(&d.join("node-1.toml"), &cfg.listen, &d.join("node-1.log"));
    let addr = cfg.listen.as_str();
    let k0 = d.join("accounts/0.key");
    let k1 = d.join("accounts/1.key");
    let receipt = d.join("r.json");

    // Transfer with a saved receipt; verify it offline; a tampered copy is refused.
    let to = public_of(&k1);
    let o = tally(&[
        "--addr",
        addr,
        "--key",
        k0.to_str().expect("p"),
        "transfer",
        "--to",
        &to,
        "--amount",
        "7",
        "--receipt",
        receipt.to_str().expect("p"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let op = d.join("operator.pub");
    let o = tally(&["verify", receipt.to_str().expect("p"), "--operator-key", op.to_str().expect("p")]);
    assert!(o.status.success(), "a fresh receipt verifies: {}", text(&o));
    let other = tally_client::keyfile::generate_key();
    let o = tally(&[
        "verify",
        receipt.to_str().expect("p"),
        "--operator-key",
        &hex::encode(other.verifying_key().to_bytes()),
    ]);
    assert!(!o.status.success(), "another operator key must not verify it");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&receipt).expect("read")).expect("json");
    let hexr = doc["receipt"].as_str().expect("receipt hex").to_string();
    let mid = hexr.len() / 2;
    let flipped = if &hexr[mid..mid + 1] == "0" { "1" } else { "0" };
    doc["receipt"] = serde_json::Value::String(format!("{}{}{}", &hexr[..mid], flipped, &hexr[mid + 1..]));
    let tampered = d.join("tampered.json");
    std::fs::write(&tampered, doc.to_string()).expect("write");
    let o = tally(&["verify", tampered.to_str().expect("p"), "--operator-key", op.to_str().expect("p")]);
    assert!(!o.status.success(), "a tampered receipt must not verify: {}", text(&o));
    let o = tally(&["--addr", addr, "--key", k1.to_str().expect("p"), "balance"]);
    assert!(text(&o).contains("1000000007"), "{}", text(&o));

    // The REPL session (`tally repl`, `docs/cli.md`) on one replica, scripted on stdin.
    let mut child = Command::new(tally_bin())
        .args(["--addr", addr, "--key", k0.to_str().expect("p"), "--ca", d.join("ca.pem").to_str().expect("p"), "repl"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("repl");
    let script = "SET 12345 '{\"name\": \"Chapayev's Mustache comb\"}'\n\
                  SET 0d5d3807-5fbf-4228-a657-5a091c4e497f '{\"name\": \"Chapayev's Mustache comb\"}'\n\
                  GET 0d5d3807-5fbf-4228-a657-5a091c4e497f\n\
                  DELETE 0d5d3807-5fbf-4228-a657-5a091c4e497f\n\
                  GET 0d5d3807-5fbf-4228-a657-5a091c4e497f\n";
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("repl output");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let expected = [
        "Error: Key is not a proper UUID4",
        "Created (durable on 1 replica)",
        "'{\"name\": \"Chapayev's Mustache comb\"}'",
        "Deleted (durable on 1 replica)",
        "Not found",
    ];
    let mut at = 0;
    for want in expected {
        let found =
            lines[at..].iter().position(|l| l == want).unwrap_or_else(|| panic!("no line {want:?} in {lines:#?}"));
        at += found + 1;
    }
    assert!(lines.first().is_some_and(|l| l.starts_with("Connected to tally cluster at")), "{lines:#?}");

    // Prometheus metrics on the port cluster init assigned.
    let metrics_addr = cfg.metrics_listen.clone().expect("cluster init sets a metrics address");
    let body = http_get(&metrics_addr, "/metrics");
    for name in
        ["tally_term", "tally_is_leader", "tally_batch_requests", "tally_stage_seconds_bucket{stage=\"validate\""]
    {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }

    // The bench: progress, JSON summary with the documented fields, a PNG plot.
    let json = d.join("b.json");
    let png = d.join("b.png");
    let o = tally(&[
        "--addr",
        addr,
        "bench",
        "--duration",
        "2",
        "--clients",
        "2",
        "--rate-max",
        "5000",
        "--accounts-dir",
        ds,
        "--json",
        json.to_str().expect("p"),
        "--plot",
        png.to_str().expect("p"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    for field in
        ["committed", "errors", "duration_s", "throughput_per_s", "latency_ms_p50", "latency_ms_p99", "latency_ms_p999"]
    {
        assert!(b[field].is_number(), "bench JSON lacks {field}: {b}");
    }
    assert!(b["committed"].as_u64().expect("n") > 0, "the bench committed nothing: {b}");
    let png_bytes = std::fs::read(&png).expect("png");
    assert!(png_bytes.starts_with(b"\x89PNG"), "the plot is a PNG");
    assert!(b["machine"]["cores"].as_u64().is_some_and(|c| c >= 1), "the JSON names the machine: {b}");
    assert!(b["loadgen_cpu_s"].as_f64().is_some_and(|c| c > 0.0), "the load generator's CPU time: {b}");

    // Open loop: 1,000 requests/s offered for 2 s, far below what the closed loop above did,
    // so the committed count follows the offered rate, not the server's capacity.
    let o = tally(&[
        "--addr",
        addr,
        "bench",
        "--duration",
        "2",
        "--clients",
        "2",
        "--batch",
        "50",
        "--rate",
        "1000",
        "--rate-max",
        "50000",
        "--accounts-dir",
        ds,
        "--json",
        json.to_str().expect("p"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let open: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    let committed = open["committed"].as_u64().expect("n");
    assert_eq!(open["offered_rate_per_s"], 1000, "{open}");
    assert!((1_000..=2_400).contains(&committed), "about 2,000 committed at 1,000/s for 2 s: {open}");
    // Spread over the run on the schedule, not sent at once (the signed requests would allow it).
    let second = open["series"][1]["committed"].as_u64().unwrap_or(0);
    assert!(second >= 500, "the second second committed its share ({second}): {open}");

    // A run whose every request is refused says why (an unfunded key's transfers).
    let broke = d.join("broke.key");
    assert!(tally(&["keygen", "--out", broke.to_str().expect("p")]).status.success());
    let o = tally(&[
        "--addr",
        addr,
        "--key",
        broke.to_str().expect("p"),
        "bench",
        "--duration",
        "1",
        "--clients",
        "1",
        "--batch",
        "10",
        "--rate-max",
        "200",
    ]);
    assert!(!o.status.success(), "nothing committed is a failure: {}", text(&o));
    assert!(text(&o).contains("No request succeeded") && text(&o).contains("InsufficientFunds"), "{}", text(&o));

    // A sweep: open-loop steps of 500 and 1,000 requests/s under a generous limit; both points
    // are in the JSON, in order, and the plot is drawn.
    let sweep_png = d.join("sweep.png");
    let o = tally(&[
        "--addr",
        addr,
        "bench",
        "--sweep",
        "--sweep-start",
        "500",
        "--sweep-step",
        "500",
        "--sweep-steps-max",
        "2",
        "--p99-limit-ms",
        "5000",
        "--duration",
        "1",
        "--clients",
        "1",
        "--batch",
        "50",
        "--accounts-dir",
        ds,
        "--json",
        json.to_str().expect("p"),
        "--plot",
        sweep_png.to_str().expect("p"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let sweep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    let offered: Vec<u64> =
        sweep["points"].as_array().expect("points").iter().map(|p| p["offered_per_s"].as_u64().expect("n")).collect();
    assert_eq!(offered, vec![500, 1_000], "{sweep}");
    assert_eq!(sweep["max_rate_within_limit_per_s"], 1_000, "{sweep}");
    assert!(sweep["points"][1]["throughput_per_s"].as_f64().is_some_and(|t| t > 600.0), "{sweep}");
    assert!(std::fs::read(&sweep_png).expect("png").starts_with(b"\x89PNG"), "the sweep plot is a PNG");
    assert!(b["committed"].as_u64().expect("n") > 2_400, "the closed loop did more than the open loop offered: {b}");
}

/// `tally up`: a 3-node cluster from nothing, a demo load, a verified receipt, and every child
/// stopped again (`--no-wait`).
#[test]
fn tally_up_starts_a_three_node_cluster_and_runs_the_demo() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = dir.path().join("up");
    let base = free_base_port(3).to_string();
    let o = Command::new(tally_bin())
        .args(["up", "--nodes", "3", "--dir", cluster.to_str().expect("p"), "--base-port", &base, "--no-wait"])
        .output()
        .expect("tally up");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("tally cluster is up (leader: node"), "{out}");
    let demo = out.lines().find(|l| l.starts_with("Demo: ")).unwrap_or_else(|| panic!("no demo line: {out}"));
    let parts: Vec<&str> = demo.split_whitespace().collect();
    assert_eq!(parts[1], parts[3], "every demo request committed: {demo}");
    assert!(out.contains("verified against operator key"), "{out}");
    let receipt = cluster.join("demo-receipt.json");
    let op = cluster.join("operator.pub");
    let o = tally(&["verify", receipt.to_str().expect("p"), "--operator-key", op.to_str().expect("p")]);
    assert!(o.status.success(), "the saved demo receipt verifies offline: {}", text(&o));
    // --no-wait stops exactly what it started: the client ports are free again.
    for i in 1..=3u16 {
        let port: u16 = base.parse::<u16>().expect("port") + i;
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "node {i} still listening after up --no-wait"
        );
    }
}

/// `tally up` without `--dir` makes its cluster directory under the temporary directory and
/// removes it when it stops, saying so; with `--dir` (above) the files stay.
#[test]
fn tally_up_removes_the_directory_it_made_for_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = free_base_port(3).to_string();
    let o = Command::new(tally_bin())
        .env("TMPDIR", tmp.path())
        .args(["up", "--nodes", "3", "--base-port", &base, "--no-wait"])
        .output()
        .expect("tally up");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("tally cluster is up"), "{out}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("tmp").map(|e| e.expect("entry").file_name()).collect();
    assert!(left.is_empty(), "tally up left {left:?} behind:\n{out}");
    assert!(out.contains("Removed ") && out.contains("give --dir to keep"), "{out}");
}
