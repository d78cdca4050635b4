//! Operating `tallyd` and `tally` as a service, through the real binaries: `--version`, shell
//! completions, structured (JSON) logs, one-line config errors that name the file and the key,
//! and the systemd unit in `deploy/systemd/`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tallyd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tallyd"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn both_binaries_print_their_version() {
    let want = env!("CARGO_PKG_VERSION");
    for (bin, name) in [(tallyd_bin(), "tallyd"), (tally_bin(), "tally")] {
        let o = Command::new(&bin).arg("--version").output().expect("run --version");
        assert!(o.status.success(), "{name} --version: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), format!("{name} {want}"), "{name} --version");
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let run = |shell: &str| {
        let o = Command::new(tally_bin()).args(["completions", shell]).env_remove("TALLY_CA").output().expect("run");
        assert!(o.status.success(), "completions {shell}: {}", stderr(&o));
        stdout(&o)
    };
    let bash = run("bash");
    assert!(bash.contains("_tally()"), "not a bash completion function:\n{bash}");
    for sub in ["status", "transfer", "receipt", "cluster", "completions", "verify"] {
        assert!(bash.contains(sub), "bash completion lacks the subcommand {sub}");
    }
    assert!(bash.contains("--output"), "bash completion lacks the global --output flag");
    assert!(bash.contains("complete -F _tally"), "the function is not registered for tally");
    let zsh = run("zsh");
    assert!(zsh.starts_with("#compdef tally"), "{}", &zsh[..zsh.len().min(200)]);
    assert!(zsh.contains("status"));
    let fish = run("fish");
    assert!(fish.contains("complete -c tally"), "{}", &fish[..fish.len().min(200)]);
    assert!(fish.contains("transfer"));
    let o = Command::new(tally_bin()).args(["completions", "powershell-or-so"]).output().expect("run");
    assert!(!o.status.success(), "an unknown shell is refused");
}

// ---------------------------------------------------------------------------------------------
// Config errors.

/// Runs `tallyd --config path`; it must exit (non-zero) within 10 s without serving.
fn tallyd_fails(config: &Path) -> String {
    let mut child = Command::new(tallyd_bin())
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tallyd");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tallyd started with the bad config {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("output");
    assert!(!o.status.success(), "tallyd exited 0 with a bad config");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "the error is one line:\n{err}");
    assert!(err.starts_with("Error: "), "{err}");
    err
}

/// A one-node cluster's files, and its config as text.
fn one_node() -> (tempfile::TempDir, tally_cli::ClusterLayout, String) {
    let (dir, layout) = init_cluster(1, 1);
    let text = std::fs::read_to_string(&layout.config_paths[0]).expect("config");
    (dir, layout, text)
}

/// Writes `text` as a config next to the cluster's and returns its path.
fn variant(layout: &tally_cli::ClusterLayout, name: &str, text: &str) -> PathBuf {
    let p = layout.dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("write config");
    p
}

/// Replaces the line starting with `key =` (the first) by `line`.
fn with_line(text: &str, key: &str, line: &str) -> String {
    let mut done = false;
    text.lines()
        .map(|l| {
            if !done && l.starts_with(&format!("{key} =")) {
                done = true;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "the error does not say {p:?}:\n{err}");
    }
}

#[test]
fn config_errors_name_the_file_the_key_and_the_cause() {
    let (_dir, layout, good) = one_node();
    let path = |p: &Path| p.display().to_string();

    // An unknown key (a typo).
    let p = variant(&layout, "unknown", &format!("tick_msec = 5\n{good}"));
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "unknown field `tick_msec`", "docs/configuration.md"]);

    // A wrong type.
    let text = with_line(&good, "tick_ms", "tick_ms = \"fast\"");
    let line = text.lines().position(|l| l.starts_with("tick_ms")).expect("line") + 1;
    let p = variant(&layout, "wrong-type", &text);
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "key `tick_ms`", "invalid type: string \"fast\"", &format!("line {line}")]);

    // A wrong type in a table of the peers list.
    let text = good.replacen("node_id = 1\nclient", "node_id = \"one\"\nclient", 1);
    assert_ne!(text, good, "the config has a [[peers]] table:\n{good}");
    let p = variant(&layout, "wrong-peer", &text);
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "key `peers[0].node_id`", "invalid type"]);

    // A missing required key.
    let text: String = good.lines().filter(|l| !l.starts_with("genesis_file")).map(|l| format!("{l}\n")).collect();
    let p = variant(&layout, "missing-key", &text);
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "missing field `genesis_file`"]);

    // A batch larger than lease ids can number.
    let p = variant(&layout, "huge-batch", &with_line(&good, "batch_requests_max", "batch_requests_max = 2000000"));
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "batch_requests_max", "must be between 1 and 1048576"]);

    // Not TOML at all.
    let p = variant(&layout, "garbage", "node_id = 1\nthis is not toml\n");
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "line 2"]);

    // A missing config file, and one that cannot be read (a directory).
    let missing = layout.dir.join("no-such-node.toml");
    let e = tallyd_fails(&missing);
    assert_names(&e, &["cannot read config file", &path(&missing), "No such file or directory"]);
    let e = tallyd_fails(&layout.dir.join("accounts"));
    assert_names(&e, &["cannot read config file", "accounts", "Is a directory"]);

    // Files the config points to.
    for key in ["genesis_file", "operator_key_file", "tls_cert_file", "tls_key_file", "tls_ca_file"] {
        let gone = layout.dir.join(format!("gone-{key}"));
        let text = with_line(&good, key, &format!("{key} = {:?}", gone.display().to_string()));
        let p = variant(&layout, &format!("missing-{key}"), &text);
        let e = tallyd_fails(&p);
        assert_names(&e, &[&path(&p), &format!("key `{key}`"), &path(&gone), "No such file or directory"]);
    }

    // A config of another cluster id than its genesis file.
    let text = with_line(&good, "cluster_id", &format!("cluster_id = {:?}", "ab".repeat(16)));
    let p = variant(&layout, "other-cluster", &text);
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "key `cluster_id`", "genesis_file", &layout.cluster_id]);

    // An operator key that is not the genesis's.
    let other_key = layout.dir.join("other-operator.key");
    std::fs::write(&other_key, "11".repeat(32)).expect("write key");
    let text = with_line(&good, "operator_key_file", &format!("operator_key_file = {:?}", path(&other_key)));
    let p = variant(&layout, "other-operator", &text);
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "key `operator_key_file`", "genesis_file"]);

    // A bad admin key.
    let text = with_line(&good, "admin_keys", "admin_keys = [\"not-a-key\"]");
    let p = variant(&layout, "bad-admin", &text);
    let e = tallyd_fails(&p);
    assert_names(&e, &[&path(&p), "key `admin_keys`", "not-a-key"]);

    // The untouched config still starts (the checks above are not refusing everything).
    let mut d = Daemon::spawn(&layout.config_paths[0], &layout.configs[0].listen, &layout.dir.join("good.log"));
    d.wait_ready(Duration::from_secs(20));
    d.terminate();
}

// ---------------------------------------------------------------------------------------------
// Structured logs.

/// Starts node 1 of `layout` with `extra` arguments, stderr to `log`; waits for it to serve,
/// makes one write, then stops it with SIGTERM.
fn run_node_once(layout: &tally_cli::ClusterLayout, extra: &[&str], log: &Path) {
    let _ = std::fs::remove_file(log);
    let mut d = Daemon::spawn_with(&layout.config_paths[0], &layout.configs[0].listen, log, &[], extra);
    d.wait_ready(Duration::from_secs(20));
    let c = client(layout, 0);
    c.transfer(fresh_key(), 1).expect("a transfer commits");
    drop(c);
    d.terminate();
}

/// Every line of `log` is one JSON object with a timestamp, level, target and message.
fn assert_json_lines(log: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).expect("log");
    assert!(!text.contains('\x1b'), "ANSI escape codes in {}", log.display());
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nlog:\n{text}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "no {field} string in {line}");
        }
        assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&v["level"].as_str().unwrap_or("")), "{line}");
        out.push(v);
    }
    assert!(out.len() >= 2, "the log has a start and a stop line at least:\n{text}");
    out
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (_dir, layout) = init_cluster(1, 1);
    // The command-line flag.
    let log = layout.dir.join("flag.log");
    run_node_once(&layout, &["--log-format", "json"], &log);
    let lines = assert_json_lines(&log);
    let serving = lines.iter().find(|v| v["message"] == "tallyd serving").expect("a 'tallyd serving' line");
    assert_eq!(serving["node"], 1, "the event's fields are top-level keys: {serving}");
    assert!(serving["target"].as_str().is_some_and(|t| t.starts_with("tallyd")), "{serving}");
    assert!(lines.iter().any(|v| v["message"] == "stopped; store synced"), "the SIGTERM stop is logged");

    // The config key.
    let cfg = std::fs::read_to_string(&layout.config_paths[0]).expect("config");
    assert!(cfg.contains("log_format = \"text\""), "cluster init writes the key:\n{cfg}");
    std::fs::write(&layout.config_paths[0], cfg.replace("log_format = \"text\"", "log_format = \"json\""))
        .expect("write");
    let log = layout.dir.join("key.log");
    run_node_once(&layout, &[], &log);
    assert_json_lines(&log);

    // The flag wins over the key; text logs in a file carry no ANSI codes either.
    let log = layout.dir.join("text.log");
    run_node_once(&layout, &["--log-format", "text"], &log);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("tallyd serving"), "{text}");
    assert!(!text.contains('\x1b'), "ANSI escape codes in a text log file:\n{text}");
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()), "text, not JSON:\n{text}");

    // A bad value is refused by both.
    let o = Command::new(tallyd_bin())
        .args(["--log-format", "xml", "--config"])
        .arg(&layout.config_paths[0])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'xml' is not a log format"), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(&layout.config_paths[0]).expect("config");
    let p = variant(&layout, "xml", &cfg.replace("log_format = \"json\"", "log_format = \"xml\""));
    let e = tallyd_fails(&p);
    assert_names(&e, &["key `log_format`", "unknown variant `xml`"]);
}

// ---------------------------------------------------------------------------------------------
// The systemd unit.

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/tallyd.service")
}

/// `[section]` → key → values (a key may repeat).
fn parse_unit(text: &str) -> std::collections::HashMap<String, std::collections::HashMap<String, Vec<String>>> {
    let mut out: std::collections::HashMap<String, std::collections::HashMap<String, Vec<String>>> = Default::default();
    let mut section = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not a key=value line: {raw:?}"));
        assert!(!section.is_empty(), "{k} outside a section");
        out.entry(section.clone()).or_default().entry(k.trim().to_string()).or_default().push(v.trim().to_string());
    }
    out
}

#[test]
fn the_systemd_unit_is_hardened_and_runs_tallyd_with_a_config() {
    let text = std::fs::read_to_string(unit_path()).expect("deploy/systemd/tallyd.service");
    let unit = parse_unit(&text);
    let service = &unit["Service"];
    let one = |k: &str| -> &str {
        let v = service.get(k).unwrap_or_else(|| panic!("[Service] has no {k}"));
        assert_eq!(v.len(), 1, "{k} set more than once");
        &v[0]
    };
    assert_eq!(one("User"), "tally");
    assert_eq!(one("Restart"), "on-failure");
    assert!(one("LimitNOFILE").parse::<u64>().is_ok_and(|n| n >= 4096), "LimitNOFILE {}", one("LimitNOFILE"));
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "true");
    let exec = one("ExecStart");
    assert!(exec.contains("tallyd --config /etc/tally/"), "{exec}");
    // The data directory the example config uses must be the writable one.
    let rw = one("ReadWritePaths");
    assert!(text.contains(&format!("data_dir = \"{rw}/")), "the install notes put data_dir under {rw}");
    // The flags of ExecStart are ones tallyd accepts.
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    let dir = tempfile::tempdir().expect("tmp");
    let o = Command::new(tallyd_bin())
        .args(args.iter().map(|a| if a.starts_with("/etc/tally/") { "/nonexistent/node-1.toml" } else { a }))
        .current_dir(dir.path())
        .output()
        .expect("run tallyd");
    assert!(stderr(&o).contains("cannot read config file /nonexistent/node-1.toml"), "{}", stderr(&o));
    assert!(unit["Install"]["WantedBy"].contains(&"multi-user.target".to_string()));

    // systemd's own check, where systemd-analyze exists (ExecStart pointed at the built binary).
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: only the key check ran");
        return;
    };
    if !probe.status.success() {
        eprintln!("systemd-analyze does not run here: only the key check ran");
        return;
    }
    let copy = dir.path().join("tallyd.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/tallyd", &tallyd_bin().display().to_string())).expect("copy");
    let o = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze verify");
    assert!(
        o.status.success() && stderr(&o).trim().is_empty(),
        "systemd-analyze verify:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// A replica of another cluster.

/// Waits until `d`'s log contains every one of `parts` (15 s).
fn wait_log(d: &Daemon, parts: &[&str]) {
    let ok = wait_until(Duration::from_secs(15), || {
        let t = d.log_text();
        t.lines().any(|l| parts.iter().all(|p| l.contains(p)))
    });
    assert!(ok, "{} never logged a line with {parts:?}:\n{}", d.log.display(), d.log_text());
}

/// Node 3 started with a config that is not this cluster's: another cluster id and genesis
/// (same CA), other Raft timings, then another cluster's files altogether (another CA). Each
/// time it never joins, and the logs on both sides say why.
#[test]
fn a_replica_with_another_clusters_config_refuses_to_join() {
    let (_dir, layout) = init_cluster(3, 1);
    let d = &layout.dir;
    let mut nodes: Vec<Daemon> = (0..2)
        .map(|i| {
            Daemon::spawn(&layout.config_paths[i], &layout.configs[i].listen, &d.join(format!("node-{}.log", i + 1)))
        })
        .collect();
    for n in &nodes {
        n.wait_ready(Duration::from_secs(30));
    }
    // A write, so that a joined node 3 would hold a batch.
    let addrs12: Vec<String> = layout.client_addrs()[..2].to_vec();
    let c = tally_client::Client::connect(
        &addrs12,
        account_key(&layout, 0),
        opts_for(&addrs12, tally_client::ClientOptions::default()),
    )
    .expect("connect");
    c.transfer(fresh_key(), 1).expect("a write commits on nodes 1 and 2");
    drop(c);
    let good3 = std::fs::read_to_string(&layout.config_paths[2]).expect("node-3.toml");
    let addr3 = layout.configs[2].listen.clone();
    let leader_sees_3_behind = |nodes: &[Daemon]| {
        let (_, s) = wait_leader(nodes, Duration::from_secs(10));
        let m = s.members.iter().find(|m| m.node_id == 3).expect("node 3 is a member");
        m.matched_index == 0
    };
    let not_joined =
        |n3: &Daemon| status_of(&n3.addr).is_some_and(|s| s.leader_id.is_none() && s.committed_height == 0);

    // 1. Another cluster id and genesis, same CA.
    let other = "cd".repeat(16);
    let mut genesis: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&layout.genesis_path).expect("genesis")).expect("json");
    genesis["cluster_id"] = serde_json::Value::String(other.clone());
    let g2 = d.join("genesis-other.json");
    std::fs::write(&g2, genesis.to_string()).expect("write genesis");
    let text = with_line(&good3, "cluster_id", &format!("cluster_id = {other:?}"));
    let text = with_line(&text, "genesis_file", &format!("genesis_file = {:?}", g2.display().to_string()));
    let p = variant(&layout, "node-3-other-cluster", &text);
    let n3 = Daemon::spawn(&p, &addr3, &d.join("node-3-a.log"));
    let mismatch = format!("cluster id \"{other}\" does not match this cluster \"{}\"", layout.cluster_id);
    let theirs = format!("cluster id \"{}\" does not match this cluster \"{other}\"", layout.cluster_id);
    wait_log(&n3, &["peer link refused", &theirs]);
    assert!(
        wait_until(Duration::from_secs(15), || nodes.iter().any(|n| n.log_text().contains(&mismatch))),
        "nodes 1 and 2 never said why they refuse node 3"
    );
    assert!(not_joined(&n3), "node 3 joined another cluster: {:?}", status_of(&n3.addr));
    assert!(leader_sees_3_behind(&nodes), "the leader replicated to a foreign node 3");
    drop(n3);

    // 2. Other Raft timings (the configuration fingerprint).
    let p = variant(&layout, "node-3-other-timing", &with_line(&good3, "tick_ms", "tick_ms = 60"));
    let n3 = Daemon::spawn(&p, &addr3, &d.join("node-3-b.log"));
    wait_log(&n3, &["peer link refused", "configuration fingerprint", "does not match"]);
    assert!(
        wait_until(Duration::from_secs(15), || nodes
            .iter()
            .any(|n| n.log_text().lines().any(|l| l.contains("refused peer connection") && l.contains("fingerprint")))),
        "nodes 1 and 2 never said why they refuse node 3"
    );
    assert!(not_joined(&n3));
    drop(n3);

    // 3. Another cluster's node 3 on this node 3's ports: its certificates are of another CA.
    let other_dir = tempfile::tempdir().expect("tmp");
    let base: u16 = addr3.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("port") - 3;
    let other_layout = tally_cli::cluster::cluster_init(3, other_dir.path(), 1, base).expect("other cluster");
    register_dial(&addr3, other_layout.dial().expect("CA"));
    let n3 = Daemon::spawn(&other_layout.config_paths[2], &addr3, &d.join("node-3-c.log"));
    wait_log(&n3, &["peer link refused", "TLS with node", "is it node"]);
    assert!(
        wait_until(Duration::from_secs(15), || nodes
            .iter()
            .any(|n| n.log_text().contains("peer TLS handshake failed (no certificate of this cluster?)"))),
        "nodes 1 and 2 never said why they refuse node 3"
    );
    assert!(not_joined(&n3));
    assert!(leader_sees_3_behind(&nodes));
    drop(n3);
    for n in &mut nodes {
        assert!(n.exited().is_none(), "a replica died on a foreign peer:\n{}", n.log_text());
    }
}

// ---------------------------------------------------------------------------------------------
// The references stay complete.

#[test]
fn every_config_key_and_every_command_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/configuration.md")).expect("configuration.md");
    // Every key `cluster init` writes (it writes all of them, defaults included).
    let (_dir, layout) = init_cluster(1, 1);
    let cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(&layout.config_paths[0]).expect("config")).expect("toml");
    assert!(cfg.len() >= 24, "{cfg:?}");
    for key in cfg.keys() {
        assert!(doc.contains(&format!("| `{key}` |")), "docs/configuration.md has no row for `{key}`");
    }
    let cli = std::fs::read_to_string(root.join("docs/cli.md")).expect("cli.md");
    let help = Command::new(tally_bin()).arg("--help").output().expect("tally --help");
    let help = stdout(&help);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 15, "{commands:?}");
    for c in commands {
        assert!(cli.contains(&format!("| `{c}")), "docs/cli.md has no row for `tally {c}`");
    }
}
