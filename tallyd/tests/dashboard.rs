//! The Grafana dashboard `deploy/grafana/tally.json` against real data: a real Prometheus
//! (Debian's `/usr/bin/prometheus`, its own config, data dir and port) scrapes a local 3-replica
//! cluster under write load while the leader is killed once; then every panel query of the
//! dashboard must return data. Two panels are drawn from Prometheus's answers to a PNG.
//!
//! No Grafana runs here: the test substitutes the template variables as Grafana would
//! (`$instance` → `.*`, `$__rate_interval` → `5s`, what Grafana derives from a 1 s scrape
//! interval) and asks Prometheus's query API.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/tally.json");

/// Every panel target of the dashboard: `(panel title, expr)`.
fn panel_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target has an expr");
            out.push((p["title"].as_str().unwrap_or("?").to_string(), expr.to_string()));
        }
    }
    out
}

/// The expr as Grafana would send it with "All" replicas selected.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5s").replace("${instance}", ".*").replace("$instance", ".*")
}

fn load_dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard")).expect("dashboard JSON")
}

/// Static checks: every query names only documented metrics and known template variables, and
/// the dashboard's variables are what the panels use.
#[test]
fn dashboard_queries_use_documented_metrics_and_known_variables() {
    let d = load_dashboard();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).expect("docs");
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().expect("templating").iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(vars.contains(&"datasource") && vars.contains(&"instance"), "{vars:?}");
    let exprs = panel_exprs(&d);
    assert!(exprs.len() >= 15, "{} panel queries", exprs.len());
    for (title, expr) in &exprs {
        for var in expr.split('$').skip(1) {
            let name: String = var.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(["instance", "__rate_interval"].contains(&name.as_str()), "{title}: unknown ${name} in {expr}");
        }
        let metrics = metric_names(expr);
        assert!(!metrics.is_empty(), "{title}: no tally metric in {expr}");
        for m in metrics {
            assert!(doc.contains(&format!("`{m}`")), "{title}: {m} is not in docs/metrics.md ({expr})");
        }
    }
}

/// The `tally_…` metric names an expr reads (histogram suffixes removed).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tally_") {
        let word: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        rest = &rest[at + word.len()..];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(&word);
        names.push(base.to_string());
    }
    names
}

// ---------------------------------------------------------------------------------------------
// A Prometheus of the test's own.

/// A `prometheus` child process with its temp config and data dir. Dropping it kills the PID
/// and reaps it; the temp dir goes with it.
struct Prometheus {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tally\n    static_configs:\n      - targets: [{list}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("/usr/bin/prometheus (Debian package prometheus; .ci/run installs it)");
        let p = Prometheus { child: Some(child), addr, log, _dir: dir };
        let ready =
            wait_until(Duration::from_secs(20), || http_get(&p.addr, "/-/ready").is_some_and(|(c, _)| c == 200));
        assert!(ready, "prometheus not ready; log:\n{}", std::fs::read_to_string(&p.log).unwrap_or_default());
        // Data from the start of the load: wait until every target was scraped.
        let all_up = wait_until(Duration::from_secs(20), || {
            let now = unix_now();
            p.query_range("count(up == 1)", now - 1.0, now)
                .ok()
                .and_then(|r| r.first()?["values"].as_array()?.last()?[1].as_str()?.parse::<f64>().ok())
                .is_some_and(|n| n as usize == targets.len())
        });
        assert!(
            all_up,
            "prometheus did not scrape every replica; log:\n{}",
            std::fs::read_to_string(&p.log).unwrap_or_default()
        );
        p
    }

    /// `query_range` over `[start, end]` (unix seconds) at 1 s steps: the result array.
    fn query_range(&self, expr: &str, start: f64, end: f64) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1", percent_encode(expr));
        let (code, body) = http_get(&self.addr, &path).ok_or("prometheus did not answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {code}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {code}: {} {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The dashboard check of one expr: it must parse and return at least one number.
    fn check_expr(&self, expr: &str, start: f64, end: f64) -> Result<usize, String> {
        let result = self.query_range(&substitute(expr), start, end)?;
        let samples = result
            .iter()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .filter(|v| v[1].as_str().and_then(|x| x.parse::<f64>().ok()).is_some_and(f64::is_finite))
            .count();
        if samples == 0 {
            return Err(format!("no data ({} series, none with a finite value)", result.len()));
        }
        Ok(samples)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[test]
fn every_dashboard_panel_has_data_across_a_leader_kill() {
    let t0 = Instant::now();
    let dashboard = load_dashboard();
    let (_dir, layout) = init_cluster(3, 2);
    let mut nodes = start_all(&layout);
    let targets: Vec<String> = layout.configs.iter().map(|c| c.metrics_listen.clone().expect("metrics")).collect();
    let prom = Prometheus::start(&targets);
    let start = unix_now();
    let addrs = layout.client_addrs();
    let writer = Writer::start(&addrs, account_key(&layout, 0), 64, 2);
    // A refusal with a reason: a transfer from an account with no money.
    let poor =
        tally_client::Client::connect(&addrs, tally_client::keyfile::generate_key(), opts_for(&addrs, short_opts()))
            .expect("connect");
    let _ =
        poor.submit(vec![poor.sign(tally_codec::Operation::Transfer { to: fresh_key(), amount: 5 }).expect("sign")]);
    assert!(wait_until(Duration::from_secs(30), || writer.acked_len() >= 3_000), "the load did not commit");
    std::thread::sleep(Duration::from_secs(12));

    let (old, _) = wait_leader(&nodes, Duration::from_secs(10));
    let before = writer.acked_len();
    nodes[old].kill9();
    let kill_at = unix_now();
    eprintln!("killed node {} (the leader) at +{:.1}s", old + 1, kill_at - start);
    let (new, _) = wait_leader(&nodes, Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(30), || writer.acked_len() >= before + 3_000), "no commits after the kill");
    std::thread::sleep(Duration::from_secs(15));
    let acked = writer.finish();
    // One more scrape of the final state.
    std::thread::sleep(Duration::from_secs(2));
    let end = unix_now();

    let mut failures = Vec::new();
    for (title, expr) in panel_exprs(&dashboard) {
        match prom.check_expr(&expr, start, end) {
            Ok(n) => eprintln!("ok   {n:5} samples  {title}: {expr}"),
            Err(e) => failures.push(format!("{title}: {expr}: {e}")),
        }
    }
    // The same check reports a broken query: a wrong metric name, and a syntax error.
    let wrong_name = prom.check_expr("max(rate(tally_commited_requests_total[$__rate_interval]))", start, end);
    assert!(wrong_name.as_ref().is_err_and(|e| e.contains("no data")), "{wrong_name:?}");
    let bad_syntax = prom.check_expr("sum(rate(tally_committed_requests_total[$__rate_interval])", start, end);
    assert!(bad_syntax.as_ref().is_err_and(|e| e.contains("bad_data")), "{bad_syntax:?}");
    assert!(failures.is_empty(), "dashboard queries without data:\n{}", failures.join("\n"));

    // What the leadership panels show across the kill: the survivors moved from the old leader to
    // the new one, and counted a leader change.
    let leader_ids = prom.query_range("tally_leader_id", start, end).expect("leader ids");
    let seen: std::collections::BTreeSet<u64> = leader_ids
        .iter()
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v[1].as_str()?.parse::<f64>().ok())
        .map(|x| x as u64)
        .filter(|x| *x != 0)
        .collect();
    assert!(seen.contains(&(old as u64 + 1)) && seen.contains(&(new as u64 + 1)), "leader ids seen: {seen:?}");
    let changes = prom.query_range("max(tally_leader_changes_total)", start, end).expect("leader changes");
    let last_change =
        changes.first().and_then(|s| s["values"].as_array()?.last()?[1].as_str()?.parse::<f64>().ok()).unwrap_or(0.0);
    assert!(last_change >= 1.0, "no leader change counted: {changes:?}");

    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-leader-kill.png");
    let throughput = series(&prom, "max(rate(tally_committed_requests_total[$__rate_interval]))", start, end);
    let leaders = series(&prom, "tally_leader_id{instance=~\"$instance\"}", start, end);
    draw(&png, start, kill_at - start, &throughput, &leaders);
    eprintln!(
        "dashboard check: {} queries with data; leader kill at +{:.1}s; plot {} (test took {:.1}s)",
        panel_exprs(&dashboard).len(),
        kill_at - start,
        png.display(),
        t0.elapsed().as_secs_f64()
    );
    let running: Vec<String> = running_addrs(&nodes);
    assert_invariants(&running, &layout, &acked);
}

/// A fresh cluster under a load nothing refuses: every panel has data from the first scrapes
/// (refusals, leader changes and elections are exported at 0 before anything happens), and the
/// refusal panel's data is all zero. Before the zero exports, the refusal panel of a healthy
/// cluster showed "No data".
#[test]
fn every_dashboard_panel_has_data_on_a_fresh_cluster_that_refused_nothing() {
    let dashboard = load_dashboard();
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    wait_leader(&nodes, Duration::from_secs(20));
    let targets: Vec<String> = layout.configs.iter().map(|c| c.metrics_listen.clone().expect("metrics")).collect();
    let prom = Prometheus::start(&targets);
    let start = unix_now();
    let addrs = layout.client_addrs();
    let writer = Writer::start(&addrs, account_key(&layout, 0), 64, 2);
    assert!(wait_until(Duration::from_secs(30), || writer.acked_len() >= 3_000), "the load did not commit");
    std::thread::sleep(Duration::from_secs(8));
    let acked = writer.finish();
    std::thread::sleep(Duration::from_secs(2));
    let end = unix_now();

    let refused = series(&prom, "sum(tally_refused_total)", start, end);
    let points: Vec<f64> = refused.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).collect();
    assert!(!points.is_empty(), "tally_refused_total is exported before any refusal");
    assert!(points.iter().all(|y| *y == 0.0), "this cluster refused something: {points:?}");
    let mut failures = Vec::new();
    for (title, expr) in panel_exprs(&dashboard) {
        match prom.check_expr(&expr, start, end) {
            Ok(n) => eprintln!("ok   {n:5} samples  {title}: {expr}"),
            Err(e) => failures.push(format!("{title}: {expr}: {e}")),
        }
    }
    assert!(failures.is_empty(), "dashboard queries without data on a fresh cluster:\n{}", failures.join("\n"));
    assert_invariants(&running_addrs(&nodes), &layout, &acked);
}

/// `(label, points)` per series of an expr, times relative to `start`.
type Series = Vec<(String, Vec<(f64, f64)>)>;

fn series(prom: &Prometheus, expr: &str, start: f64, end: f64) -> Series {
    prom.query_range(&substitute(expr), start, end)
        .expect("query")
        .iter()
        .map(|s| {
            let label = s["metric"]["instance"].as_str().unwrap_or("cluster").to_string();
            let points = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| Some((v[0].as_f64()? - start, v[1].as_str()?.parse::<f64>().ok()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            (label, points)
        })
        .collect()
}

/// Two panels, as the dashboard draws them: committed requests/s (top) and the leader id each
/// replica reports (bottom), with the kill marked.
fn draw(path: &Path, _start: f64, kill_s: f64, throughput: &Series, leaders: &Series) {
    use plotters::prelude::*;
    let text = tally_plot::register_font();
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).expect("fill");
    let (top, bottom) = root.split_vertically(350);
    let x_max = throughput.iter().chain(leaders).flat_map(|(_, p)| p.iter().map(|(x, _)| *x)).fold(1.0, f64::max);
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (area, title, data, y_max_fixed) in [
        (&top, "Committed requests/s (max over replicas)", throughput, None),
        (&bottom, "Leader id as each replica sees it (0 = none; lines nudged apart)", leaders, Some(4.0)),
    ] {
        let y_max = y_max_fixed
            .unwrap_or_else(|| data.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(1.0, f64::max) * 1.1);
        let mut b = ChartBuilder::on(area);
        b.margin(15);
        if text {
            b.caption(title, ("sans-serif", 20)).x_label_area_size(35).y_label_area_size(70);
        }
        let mut chart = b.build_cartesian_2d(0f64..x_max, 0f64..y_max).expect("chart");
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("seconds since load start").label_style(("sans-serif", 14));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().expect("mesh");
        chart
            .draw_series(LineSeries::new(vec![(kill_s, 0.0), (kill_s, y_max)], BLACK.stroke_width(1)))
            .expect("kill line");
        let stepped = y_max_fixed.is_some();
        for (i, (label, points)) in data.iter().enumerate() {
            let color = colors[i % colors.len()];
            // Leader ids are levels: drawn as steps, each replica nudged so equal lines stay visible.
            let points: Vec<(f64, f64)> = if stepped {
                let nudge = (i as f64 - 1.0) * 0.05;
                let mut out: Vec<(f64, f64)> = Vec::new();
                for (x, y) in points {
                    if let Some(&(_, prev)) = out.last() {
                        out.push((*x, prev));
                    }
                    out.push((*x, y + nudge));
                }
                out
            } else {
                points.clone()
            };
            let drawn = chart.draw_series(LineSeries::new(points, color.stroke_width(2))).expect("series");
            if text {
                drawn.label(label.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .expect("legend");
        }
    }
    root.present().expect("write png");
}
