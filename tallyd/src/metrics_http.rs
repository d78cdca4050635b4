//! The metrics port: `GET /metrics` (Prometheus text exposition), `GET /health/live` and
//! `GET /health/ready` (for load balancers). Every metric is listed in [`CATALOGUE`], which gives
//! the `# HELP` lines; `docs/metrics.md` explains each one and the dashboard panels using it.

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What kind of metric a catalogue entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `(name, kind, help)` of every metric tallyd exports.
pub const CATALOGUE: &[(&str, Kind, &str)] = &[
    // Leadership and Raft (the Raft thread, and the main loop once a second).
    ("tally_term", Kind::Gauge, "Current Raft term as this replica sees it."),
    ("tally_leader_id", Kind::Gauge, "Node id of the leader this replica knows; 0 when it knows none."),
    ("tally_is_leader", Kind::Gauge, "1 while this replica is the leader, else 0."),
    ("tally_commit_index", Kind::Gauge, "Raft commit index of this replica's log."),
    ("tally_applied_height", Kind::Gauge, "Height of the last batch applied to this replica's store."),
    (
        "tally_apply_lag_entries",
        Kind::Gauge,
        "Committed log entries this replica has not applied yet (leader's commit as last heard minus applied index).",
    ),
    (
        "tally_follower_lag_entries",
        Kind::Gauge,
        "Leader only: entries committed by the leader that peer has not yet persisted (commit index minus the peer's matched index).",
    ),
    (
        "tally_quorum_ack_age_seconds",
        Kind::Gauge,
        "Leader only: seconds since the latest heartbeat a majority acknowledged was sent.",
    ),
    (
        "tally_lease_remaining_seconds",
        Kind::Gauge,
        "Seconds left on the leader lease (linearizable local reads); 0 on followers and without a lease.",
    ),
    (
        "tally_elections_total",
        Kind::Counter,
        "Campaigns this replica started: kind=pre_vote (pre-vote rounds) and kind=vote (term bumps).",
    ),
    ("tally_leader_changes_total", Kind::Counter, "Times this replica saw a new leader (or the same one in a new term) take over."),
    ("tally_snapshot_installs_total", Kind::Counter, "State snapshots this replica installed from a leader."),
    (
        "tally_peer_messages_refused_total",
        Kind::Counter,
        "Raft messages from a peer refused before raft-rs saw them, by peer (node id) and reason.",
    ),
    (
        "tally_store_read_waits_total",
        Kind::Counter,
        "Reads on the replica thread that waited 100 ms or more for the store (held by a slow write or export).",
    ),
    (
        "tally_warmed_keys_total",
        Kind::Counter,
        "Leader only: state keys of new requests no cache held, read by the warmer thread before the core saw them.",
    ),
    (
        "tally_warm_reads_stale_total",
        Kind::Counter,
        "Warmer reads refused as possibly stale (a newer write had left the cache); those requests read the store.",
    ),
    ("tally_snapshot_sends_total", Kind::Counter, "State snapshots this replica (as leader) sent to a follower, by result."),
    ("tally_log_stopped", Kind::Gauge, "1 when this replica's log failed or its disk is full and it stepped down."),
    // Batches and stages.
    ("tally_committed_batches_total", Kind::Counter, "Batches committed and confirmed on this replica."),
    ("tally_committed_requests_total", Kind::Counter, "Requests in the batches committed and confirmed on this replica."),
    ("tally_batch_requests", Kind::Histogram, "Requests per batch built by the leader."),
    ("tally_batch_bytes", Kind::Histogram, "Encoded size of each batch entry proposed by the leader, in bytes."),
    ("tally_batch_interval_seconds", Kind::Histogram, "Time between two consecutive batches built by the leader."),
    (
        "tally_stage_seconds",
        Kind::Histogram,
        "Time spent in one stage: validate (per frame); sequence, apply, raft (per pass of the replica core, named by what it did); persist (log write and fsync); store (one store write).",
    ),
    ("tally_refused_total", Kind::Counter, "Requests refused, by stage and reason (the wire error code)."),
    ("tally_verify_batch_fallbacks_total", Kind::Counter, "Frames whose ed25519 batch verification failed and were checked one by one."),
    // Storage.
    ("tally_wal_fsync_seconds", Kind::Histogram, "Duration of each fsync of the Raft log (write-ahead log)."),
    ("tally_log_bytes", Kind::Gauge, "Size of the Raft log directory on disk, measured every 5 s."),
    ("tally_store_bytes", Kind::Gauge, "Size of the state store on disk by part (state: LevelDB, segments: batch bodies), measured every 5 s."),
    // Connections.
    ("tally_connections", Kind::Gauge, "Open connections on the client port, by pool (client, replica, handshake)."),
    ("tally_connections_refused_total", Kind::Counter, "Connections refused or cut at admission, by reason."),
    ("tally_connections_closed_total", Kind::Counter, "Client connections closed by the server, by reason."),
    ("tally_bad_frames_total", Kind::Counter, "Client frames that did not decode."),
    ("tally_forwarded_frames_total", Kind::Counter, "Client frames this follower relayed to the leader."),
];

/// Histogram buckets by metric (exact names, so no two matchers overlap).
fn buckets() -> Vec<(&'static str, Vec<f64>)> {
    let latency = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
    vec![
        ("tally_stage_seconds", latency.clone()),
        ("tally_wal_fsync_seconds", latency),
        ("tally_batch_interval_seconds", vec![0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0]),
        ("tally_batch_requests", vec![1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16384.0]),
        (
            "tally_batch_bytes",
            vec![1024.0, 16384.0, 65536.0, 262_144.0, 1_048_576.0, 2_097_152.0, 4_194_304.0, 8_388_608.0, 16_777_216.0],
        ),
    ]
}

/// Gauges not set for this long disappear from `/metrics`: a deposed leader's per-follower
/// lag stops being exported. Every gauge is set at least once a second (disk sizes every 5 s).
const GAUGE_IDLE: Duration = Duration::from_secs(15);

/// Installs the Prometheus recorder with histogram buckets and `# HELP` text.
///
/// # Errors
/// When a recorder is already installed or a bucket list is empty.
pub fn install() -> Result<PrometheusHandle, String> {
    let mut b = PrometheusBuilder::new().idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE));
    for (name, values) in buckets() {
        b = b.set_buckets_for_metric(Matcher::Full(name.to_string()), &values).map_err(|e| e.to_string())?;
    }
    let handle = b.install_recorder().map_err(|e| format!("metrics recorder: {e}"))?;
    describe();
    // Counters exist from the start (at 0), so `rate()` and `increase()` see their first event.
    for name in [
        "tally_leader_changes_total",
        "tally_snapshot_installs_total",
        "tally_committed_batches_total",
        "tally_committed_requests_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in ["pre_vote", "vote"] {
        metrics::counter!("tally_elections_total", "kind" => kind).increment(0);
    }
    for result in ["sent", "failed"] {
        metrics::counter!("tally_snapshot_sends_total", "result" => result).increment(0);
    }
    Ok(handle)
}

fn describe() {
    for (name, kind, help) in CATALOGUE {
        let unit = if name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else if name.ends_with("_bytes") {
            Some(Unit::Bytes)
        } else {
            None
        };
        match (kind, unit) {
            (Kind::Counter, _) => metrics::describe_counter!(*name, *help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(*name, u, *help),
            (Kind::Gauge, None) => metrics::describe_gauge!(*name, *help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(*name, u, *help),
            (Kind::Histogram, None) => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// The readiness check, set once the node runs (until then the replica is "starting").
pub type ReadyCheck = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What `/health/ready` asks.
#[derive(Default)]
pub struct Health {
    ready: OnceLock<ReadyCheck>,
}

impl Health {
    pub fn set_ready_check(&self, check: ReadyCheck) {
        let _ = self.ready.set(check);
    }

    fn ready(&self) -> Result<String, String> {
        match self.ready.get() {
            Some(check) => check(),
            None => Err("starting: the store and log are being opened".into()),
        }
    }
}

/// Readiness from what a replica knows: a leader, a working log, and an applied index at most
/// `max_lag` entries behind the leader's commit index.
///
/// # Errors
/// The one-line reason the replica is not ready.
pub fn readiness(
    leader: Option<u64>,
    stopped: Option<&str>,
    applied_index: u64,
    leader_commit: u64,
    max_lag: u64,
) -> Result<String, String> {
    if let Some(why) = stopped {
        return Err(format!("log stopped: {why}"));
    }
    let Some(leader) = leader else {
        return Err("no leader known".into());
    };
    let lag = leader_commit.saturating_sub(applied_index);
    if lag > max_lag {
        return Err(format!(
            "applied index {applied_index} is {lag} entries behind the leader's commit {leader_commit} (ready_max_lag_batches = {max_lag})"
        ));
    }
    Ok(format!("ready: leader {leader}, {lag} entries behind"))
}

/// Serves the metrics port on `addr` from a background thread.
///
/// # Errors
/// When the address can't be bound.
pub fn serve(addr: &str, handle: PrometheusHandle, health: Arc<Health>) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let Ok(read) = stream.try_clone() else { continue };
                let mut r = BufReader::new(read);
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                // Read the headers too (bounded): closing a socket with unread bytes resets it,
                // and the client may lose the answer.
                let mut header = String::new();
                for _ in 0..100 {
                    header.clear();
                    match r.read_line(&mut header) {
                        Ok(n) if n > 2 && header.len() < 8192 => {}
                        _ => break,
                    }
                }
                let (status, body) = respond(&line, &handle, &health);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn respond(request_line: &str, handle: &PrometheusHandle, health: &Health) -> (&'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return ("405 Method Not Allowed", "only GET\n".into());
    }
    match path {
        "/metrics" => ("200 OK", handle.render()),
        "/health/live" => ("200 OK", "live\n".into()),
        "/health/ready" => match health.ready() {
            Ok(msg) => ("200 OK", format!("{msg}\n")),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        _ => ("404 Not Found", "try GET /metrics, /health/live or /health/ready\n".into()),
    }
}

/// Bytes of every file under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_leader_a_live_log_and_a_small_lag() {
        assert!(readiness(Some(1), None, 100, 105, 10).is_ok());
        assert!(readiness(Some(1), None, 100, 110, 10).is_ok(), "exactly at the bound");
        let e = readiness(Some(1), None, 100, 111, 10).expect_err("11 behind");
        assert!(e.contains("11 entries behind"), "{e}");
        assert_eq!(readiness(None, None, 100, 100, 10).expect_err("no leader"), "no leader known");
        let e = readiness(Some(2), Some("disk full"), 100, 100, 10).expect_err("stopped");
        assert!(e.contains("disk full"), "{e}");
        assert!(readiness(Some(1), None, 120, 110, 10).is_ok(), "applied past what was heard");
    }

    #[test]
    fn the_catalogue_names_follow_prometheus_conventions_and_are_documented() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
            .expect("docs/metrics.md");
        let mut seen = std::collections::HashSet::new();
        for (name, kind, help) in CATALOGUE {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(name.starts_with("tally_") && !help.is_empty(), "{name}");
            assert!(!name.ends_with("_ms"), "{name}: durations are in seconds");
            assert_eq!(
                *kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: counters, and only they, end in _total"
            );
            assert!(doc.contains(&format!("`{name}`")), "docs/metrics.md does not describe {name}");
        }
        for (name, _) in buckets() {
            assert!(CATALOGUE.iter().any(|(n, k, _)| *n == name && *k == Kind::Histogram), "{name}");
        }
    }

    /// Every metric the code records is in the catalogue (so it has `# HELP` and a doc line).
    #[test]
    fn every_recorded_metric_is_catalogued() {
        fn scan(dir: &std::path::Path, found: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).expect("source dir").flatten() {
                let path = e.path();
                if path.is_dir() {
                    scan(&path, found);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&path).expect("source");
                    for macro_call in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                        for part in text.split(macro_call).skip(1) {
                            let name: String = part.chars().take_while(|c| *c != '"').collect();
                            found.push(name);
                        }
                    }
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = Vec::new();
        for krate in ["tallyd", "pipeline", "failover", "store", "net", "core"] {
            scan(&root.join(krate).join("src"), &mut found);
        }
        assert!(found.len() > 20, "only {} metric calls found", found.len());
        for name in found {
            assert!(CATALOGUE.iter().any(|(n, _, _)| *n == name), "{name} is recorded but not in CATALOGUE");
        }
    }

    #[test]
    fn health_paths_answer_and_unknown_paths_do_not() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let health = Health::default();
        assert_eq!(respond("GET /health/live HTTP/1.1", &handle, &health).0, "200 OK");
        let (status, body) = respond("GET /health/ready HTTP/1.1", &handle, &health);
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.starts_with("not ready: starting"), "{body}");
        health.set_ready_check(Box::new(|| Ok("ready".into())));
        assert_eq!(respond("GET /health/ready?x=1 HTTP/1.1", &handle, &health).0, "200 OK");
        assert_eq!(respond("GET /nope HTTP/1.1", &handle, &health).0, "404 Not Found");
        assert_eq!(respond("POST /metrics HTTP/1.1", &handle, &health).0, "405 Method Not Allowed");
    }
}
