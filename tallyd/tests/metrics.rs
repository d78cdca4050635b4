//! The metrics port of a live 3-replica cluster: `/metrics` under load passes `promtool check
//! metrics` (Debian's `prometheus` package, installed by `.ci/run`) and carries the operator's
//! series; `/health/ready` answers 200 while a replica can serve and 503 once it is cut off.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `promtool check metrics` on `exposition`: `Ok` when it exits 0, else its complaints.
fn promtool_check(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child.stdin.take().expect("stdin").write_all(exposition.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool exit {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn metrics_addrs(layout: &tally_cli::cluster::ClusterLayout) -> Vec<String> {
    layout.configs.iter().map(|c| c.metrics_listen.clone().expect("cluster init sets metrics_listen")).collect()
}

/// The check fails on what it must catch: a counter without `_total`, a missing `# HELP`, a
/// millisecond unit, and text that does not parse.
#[test]
fn promtool_check_rejects_lint_problems() {
    assert!(promtool_check("# HELP tally_x_total Things.\n# TYPE tally_x_total counter\ntally_x_total 1\n").is_ok());
    for bad in [
        "# HELP tally_x Things.\n# TYPE tally_x counter\ntally_x 1\n",
        "# TYPE tally_y_total counter\ntally_y_total 1\n",
        "# HELP tally_z_ms Time.\n# TYPE tally_z_ms gauge\ntally_z_ms 1\n",
        "tally_broken{{ 1\n",
    ] {
        assert!(promtool_check(bad).is_err(), "promtool accepted:\n{bad}");
    }
}

#[test]
fn live_metrics_pass_promtool_and_answer_the_operator_questions() {
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let (leader, _) = wait_leader(&nodes, Duration::from_secs(20));
    let metrics = metrics_addrs(&layout);
    let writer = Writer::start(&layout.client_addrs(), account_key(&layout, 0), 64, 2);
    assert!(wait_until(Duration::from_secs(30), || writer.acked_len() >= 2_000), "the load did not commit");
    // Refusals by reason: a transfer the account cannot fund.
    let poor = tally_client::keyfile::generate_key();
    let addrs = layout.client_addrs();
    let c = tally_client::Client::connect(&addrs, poor, opts_for(&addrs, short_opts())).expect("connect");
    let r = c.sign(tally_codec::Operation::Transfer { to: fresh_key(), amount: 5 }).expect("sign");
    let _ = c.submit(vec![r]);
    // Disk sizes are measured every 5 s; the Raft thread's gauges every tick.
    std::thread::sleep(Duration::from_secs(6));

    for (i, addr) in metrics.iter().enumerate() {
        let (code, body) = http_get(addr, "/metrics").expect("metrics answer");
        assert_eq!(code, 200);
        if let Err(e) = promtool_check(&body) {
            panic!("promtool check metrics failed for node {}: {e}\n{body}", i + 1);
        }
        for name in [
            "tally_term ",
            "tally_leader_id ",
            "tally_is_leader ",
            "tally_commit_index ",
            "tally_applied_height ",
            "tally_apply_lag_entries ",
            "tally_lease_remaining_seconds ",
            "tally_log_bytes ",
            "tally_store_bytes{part=\"state\"}",
            "tally_wal_fsync_seconds_bucket",
            "tally_stage_seconds_bucket{stage=\"persist\"",
            "tally_stage_seconds_bucket{stage=\"apply\"",
            "tally_committed_requests_total ",
            "tally_connections{pool=\"client\"}",
            "tally_leader_changes_total ",
            "tally_elections_total{kind=",
            "# HELP tally_wal_fsync_seconds ",
        ] {
            assert!(body.contains(name), "node {} /metrics lacks {name}:\n{body}", i + 1);
        }
        assert!(!body.contains("_ms"), "a metric still in milliseconds:\n{body}");
        assert!(metric_value(&body, "tally_log_bytes").is_some_and(|b| b > 0.0), "log size:\n{body}");
        let leader_id = metric_value(&body, "tally_leader_id").expect("leader id");
        assert_eq!(leader_id as usize, leader + 1, "node {} names the leader", i + 1);
        if i == leader {
            assert_eq!(metric_value(&body, "tally_is_leader"), Some(1.0));
            for peer in (1..=3).filter(|p| *p != leader + 1) {
                let series = format!("tally_follower_lag_entries{{peer=\"{peer}\"}}");
                assert!(body.contains(&series), "leader lacks {series}:\n{body}");
            }
            for name in [
                "tally_quorum_ack_age_seconds ",
                "tally_batch_requests_bucket",
                "tally_batch_bytes_bucket",
                "tally_batch_interval_seconds_bucket",
                "tally_stage_seconds_bucket{stage=\"validate\"",
                "tally_stage_seconds_bucket{stage=\"sequence\"",
                "tally_stage_seconds_bucket{stage=\"raft\"",
                "tally_refused_total{stage=\"optimistic\",reason=\"InsufficientFunds\"}",
            ] {
                assert!(body.contains(name), "leader /metrics lacks {name}:\n{body}");
            }
            assert!(metric_value(&body, "tally_lease_remaining_seconds").is_some_and(|s| s > 0.0), "lease:\n{body}");
        } else {
            assert_eq!(metric_value(&body, "tally_is_leader"), Some(0.0));
            assert!(!body.contains("tally_follower_lag_entries"), "a follower exports follower lag:\n{body}");
        }
    }
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}

#[test]
fn health_ready_only_while_a_leader_is_known() {
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let metrics = metrics_addrs(&layout);
    for addr in &metrics {
        assert!(
            wait_until(Duration::from_secs(20), || http_get(addr, "/health/ready").is_some_and(|(c, _)| c == 200)),
            "{addr} never ready: {:?}",
            http_get(addr, "/health/ready")
        );
        let (code, body) = http_get(addr, "/health/live").expect("live answers");
        assert_eq!((code, body.as_str()), (200, "live\n"));
    }
    // A lone replica of the three: the others are killed, it loses its leader (pre-vote drops
    // it) and says why, while it stays live.
    nodes[1].kill9();
    nodes[2].kill9();
    let lone = &metrics[0];
    assert!(
        wait_until(Duration::from_secs(20), || http_get(lone, "/health/ready").is_some_and(|(c, _)| c == 503)),
        "the lone replica stays ready: {:?}",
        http_get(lone, "/health/ready")
    );
    let (_, why) = http_get(lone, "/health/ready").expect("ready answers");
    assert!(why.starts_with("not ready: no leader known"), "{why}");
    assert_eq!(why.lines().count(), 1, "one line: {why}");
    assert_eq!(http_get(lone, "/health/live").map(|(c, _)| c), Some(200));
    // The others come back: it is ready again.
    nodes[1] = Daemon::spawn(&layout.config_paths[1], &layout.configs[1].listen, &nodes[1].log.clone());
    nodes[2] = Daemon::spawn(&layout.config_paths[2], &layout.configs[2].listen, &nodes[2].log.clone());
    assert!(
        wait_until(Duration::from_secs(30), || http_get(lone, "/health/ready").is_some_and(|(c, _)| c == 200)),
        "not ready again after the others came back: {:?}",
        http_get(lone, "/health/ready")
    );
}
