//! The metrics port: `GET /metrics` (Prometheus text exposition), `GET /health/live` and
//! `GET /health/ready` (for load balancers). Every metric is listed in [`CATALOGUE`], which gives
//! the `# HELP` lines; `docs/metrics.md` explains each one and the dashboard panels using it.

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::VecDeque;
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
    // Logging.
    (
        "tally_log_suppressed_total",
        Kind::Counter,
        "Log lines not written by the per-kind rate limit (refused commands, bad frames, failed handshakes), by kind.",
    ),
    // Watches and admin scans (their threads, limits and budgets).
    ("tally_watches_active", Kind::Gauge, "Watches open on this replica: being served, or their page not yet taken by the connection's writer."),
    ("tally_watch_pages_total", Kind::Counter, "Watch pages answered (empty ones included)."),
    ("tally_watch_batches_total", Kind::Counter, "Batches read for watch pages, by source (cache, store)."),
    ("tally_watch_decoded_bytes_total", Kind::Counter, "Batch-body bytes decoded for watches."),
    ("tally_watch_page_bytes_total", Kind::Counter, "Event bytes put in watch pages."),
    ("tally_busy_total", Kind::Counter, "Watches and audit pages answered Busy, by the limit that refused them."),
    ("tally_audit_keys_total", Kind::Counter, "Keys read by admin scans (audit pages)."),
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
    for kind in ["pre_vote", "vote", "leader_down"] {
        metrics::counter!("tally_elections_total", "kind" => kind).increment(0);
    }
    tally_pipeline::measure::export_refusals_at_zero();
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
    stopped: Option<&tally_core::LogFailure>,
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

/// Connections served at once on the metrics port. When a new one arrives with all taken, the
/// oldest is cut: a slow or hostile client loses its slot to a health check that completes in
/// a millisecond, as on the client port's handshake pool.
pub const HTTP_CONNECTIONS_MAX: usize = 64;
/// Request line and headers together, at most (hyper answers `431` beyond it). Apache's limit
/// per line is 8,190 bytes; our paths are a few bytes long.
pub const HTTP_HEAD_BYTES_MAX: usize = 8192;
/// Headers in one request, at most (hyper answers `431` beyond it).
pub const HTTP_HEADERS_MAX: usize = 32;
/// The request line and headers must arrive within this long of the connection's accept.
pub const HTTP_HEAD_TIMEOUT_MS: u64 = 2_000;
/// A connection lasts at most this long, answer included (one request per connection).
pub const HTTP_CONNECTION_MS_MAX: u64 = 5_000;

/// What the metrics port answers from.
struct Pages {
    handle: PrometheusHandle,
    health: Arc<Health>,
}

/// Serves the metrics port on `addr` from a background thread: hyper's HTTP/1 server on a
/// one-thread tokio runtime, with every bound above. Nothing here blocks on a client: a
/// connection is a task, and reads and writes wait without holding the thread.
///
/// # Errors
/// When the address can't be bound or the runtime can't start.
pub fn serve(addr: &str, handle: PrometheusHandle, health: Arc<Health>) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("metrics runtime: {e}"))?;
    let pages = Arc::new(Pages { handle, health });
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, pages)))
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, pages: Arc<Pages>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the metrics port cannot serve");
            return;
        }
    };
    let mut live: VecDeque<tokio::task::AbortHandle> = VecDeque::with_capacity(HTTP_CONNECTIONS_MAX);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of descriptors, say: wait rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        live.retain(|task| !task.is_finished());
        if live.len() >= HTTP_CONNECTIONS_MAX {
            if let Some(oldest) = live.pop_front() {
                oldest.abort();
            }
        }
        assert!(live.len() < HTTP_CONNECTIONS_MAX);
        let task = tokio::spawn(serve_connection(tcp, pages.clone()));
        live.push_back(task.abort_handle());
    }
}

/// One request on one connection, within [`HTTP_CONNECTION_MS_MAX`].
async fn serve_connection(tcp: tokio::net::TcpStream, pages: Arc<Pages>) {
    let _ = tcp.set_nodelay(true);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (status, body) = respond(req.method().as_str(), req.uri().path(), &pages.handle, &pages.health);
        let reply = hyper::Response::builder()
            .status(status)
            .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)));
        async move { reply }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(HTTP_HEAD_TIMEOUT_MS))
        .max_buf_size(HTTP_HEAD_BYTES_MAX)
        .max_header_size(HTTP_HEAD_BYTES_MAX)
        .max_headers(HTTP_HEADERS_MAX)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
    let _ = tokio::time::timeout(Duration::from_millis(HTTP_CONNECTION_MS_MAX), conn).await;
}

/// The status and body for `method` on `path`.
fn respond(method: &str, path: &str, handle: &PrometheusHandle, health: &Health) -> (u16, String) {
    if method != "GET" {
        return (405, "only GET\n".into());
    }
    match path {
        "/metrics" => (200, handle.render()),
        "/health/live" => (200, "live\n".into()),
        "/health/ready" => match health.ready() {
            Ok(msg) => (200, format!("{msg}\n")),
            Err(why) => (503, format!("not ready: {why}\n")),
        },
        _ => (404, "try GET /metrics, /health/live or /health/ready\n".into()),
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
        let e = readiness(
            Some(2),
            Some(&tally_core::LogFailure::new(std::io::ErrorKind::StorageFull, "disk full")),
            100,
            100,
            10,
        )
        .expect_err("stopped");
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
        assert_eq!(respond("GET", "/health/live", &handle, &health).0, 200);
        let (status, body) = respond("GET", "/health/ready", &handle, &health);
        assert_eq!(status, 503);
        assert!(body.starts_with("not ready: starting"), "{body}");
        health.set_ready_check(Box::new(|| Ok("ready".into())));
        assert_eq!(respond("GET", "/health/ready", &handle, &health).0, 200);
        assert_eq!(respond("GET", "/nope", &handle, &health).0, 404);
        assert_eq!(respond("POST", "/metrics", &handle, &health).0, 405);
    }
}
