//! What watchers and admin scanners cost a bench (docs/coordination.md "Watch", docs/security.md
//! "Watches and admin scans"): after loading documents, `tally bench` runs alone, then beside
//! watchers catching up from height 0 on the leader, beside watchers on a follower, beside admin
//! scanners paging `AuditPage` in a loop, each between two benches alone. Each loaded bench's
//! throughput is printed as a share of the mean of the benches alone either side of it, with
//! every watcher's and scanner's answers (pages, `Busy`, the slowest).
//! `scripts/watch-load.sh` starts a release cluster, runs this, and cleans up.
//!
//! ```text
//! cargo build --release -p tally-cli --bins --example watch_load
//! ./target/release/examples/watch_load --cluster-dir DIR [--docs 95000] [--duration 20] [--json FILE]
//! ```

use clap::Parser;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_cli::cli::{Cli, Target};
use tally_client::{Client, Connection};
use tally_codec::admin::{AdminOp, AuditTable};
use tally_codec::wire::{ClientMessage, ServerMessage, WatchFilter};
use tally_codec::{ClusterId, DocKey, Operation};

#[derive(Parser)]
struct Args {
    #[arg(long, required_unless_present = "plot_from")]
    cluster_dir: Option<PathBuf>,
    /// Only draw the PNG of an earlier run's JSON (next to it), then exit.
    #[arg(long)]
    plot_from: Option<PathBuf>,
    /// Documents loaded before the first bench (what each watcher catches up on).
    #[arg(long, default_value_t = 95_000)]
    docs: usize,
    /// Seconds of each bench.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// `tally bench --clients`.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 200)]
    watchers_leader: usize,
    #[arg(long, default_value_t = 50)]
    watchers_follower: usize,
    #[arg(long, default_value_t = 4)]
    scanners: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `tally` binary (default: next to this example's directory).
    #[arg(long)]
    tally: Option<PathBuf>,
}

/// A watcher or scanner's answer is late past this (the target: every watcher answered within 1 s).
const LATE: Duration = Duration::from_secs(1);
/// How long one request is waited for before it counts as unanswered.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// What the background load of one phase saw.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct LoadStats {
    actors: usize,
    pages: u64,
    busy: u64,
    errors: u64,
    /// Actors with an answer later than 1 s (or none within 5 s).
    late_actors: usize,
    /// Actors that got no answer at all.
    silent_actors: usize,
    answer_ms_p50: f64,
    answer_ms_p99: f64,
    answer_ms_max: f64,
    /// Watchers: the mean height reached; scanners: keys read.
    progress: f64,
}

#[derive(Default)]
struct Actor {
    pages: u64,
    busy: u64,
    errors: u64,
    answers: Vec<f64>,
    slowest: Duration,
    progress: u64,
}

fn target(dir: &Path) -> Target {
    let cli = Cli::try_parse_from(["tally", "--cluster-dir", &dir.display().to_string(), "status"]).expect("args");
    Target::resolve(&cli).expect("cluster directory")
}

fn load_docs(t: &Target, n: usize) {
    let key = tally_client::keyfile::generate_key();
    let c = Arc::new(Client::connect(&t.addrs, key, t.options()).expect("connect"));
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                for chunk in (i..n).step_by(2).collect::<Vec<_>>().chunks(1_000) {
                    let reqs: Vec<_> = chunk
                        .iter()
                        .map(|j| {
                            let key = DocKey::parse(&format!("0d5d3807-5fbf-4228-a657-{j:012x}")).expect("uuid4");
                            let value = format!(r#"{{"n":{j},"pad":"{}"}}"#, "x".repeat(80)).into_bytes();
                            c.sign(Operation::Set { key, value }).expect("sign")
                        })
                        .collect();
                    c.submit(reqs).expect("documents committed");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("loader");
    }
    eprintln!("loaded {n} documents in {:.1} s", started.elapsed().as_secs_f64());
}

/// One request's answer, timed, into `a`; `Busy` waits for its hint. Returns the reply.
fn timed(conn: &Connection, msg: ClientMessage, a: &mut Actor) -> Option<ServerMessage> {
    let sent = Instant::now();
    let r = conn.send(msg).and_then(|p| p.wait(ANSWER_WAIT));
    let took = sent.elapsed();
    a.slowest = a.slowest.max(took);
    match r {
        Ok(ServerMessage::Busy(b)) => {
            a.answers.push(took.as_secs_f64() * 1e3);
            a.busy += 1;
            std::thread::sleep(tally_client::coord::busy_wait(&b));
            None
        }
        Ok(m) => {
            a.answers.push(took.as_secs_f64() * 1e3);
            Some(m)
        }
        Err(_) => {
            a.errors += 1;
            std::thread::sleep(Duration::from_millis(200));
            None
        }
    }
}

fn watcher(conn: &Connection, stop: &AtomicBool) -> Actor {
    let mut a = Actor::default();
    let mut from = 0;
    while !stop.load(Ordering::Acquire) {
        let msg =
            ClientMessage::Watch { filter: WatchFilter::AllDocs, from_height: from, max_batches: 256, wait_ms: 500 };
        match timed(conn, msg, &mut a) {
            Some(ServerMessage::Watched(p)) => {
                a.pages += 1;
                from = p.next_height;
            }
            Some(_) => a.errors += 1,
            None => {}
        }
    }
    a.progress = from;
    a
}

fn scanner(conn: &Connection, admin: &ed25519_dalek::SigningKey, cluster: ClusterId, stop: &AtomicBool) -> Actor {
    let mut a = Actor::default();
    let mut at = (AuditTable::Accounts, None);
    while !stop.load(Ordering::Acquire) {
        let op = AdminOp::AuditPage { table: at.0, after: at.1.clone(), limit: tally_codec::admin::AUDIT_PAGE_MAX };
        let msg = ClientMessage::Admin(tally_client::client::sign_admin(admin, cluster, op));
        match timed(conn, msg, &mut a) {
            Some(ServerMessage::AuditPage(p)) => {
                a.pages += 1;
                a.progress += p.keys;
                at = match (p.next_after, at.0) {
                    (Some(k), t) => (t, Some(k)),
                    (None, AuditTable::Accounts) => (AuditTable::Documents, None),
                    (None, AuditTable::Documents) => (AuditTable::Accounts, None),
                };
            }
            Some(_) => a.errors += 1,
            None => {}
        }
    }
    a
}

/// The background load of a phase.
#[derive(Clone)]
enum Load {
    None,
    Watchers { addr: String, n: usize },
    Scanners { addr: String, n: usize },
}

/// Starts `load`; the returned closure stops it and sums up what it saw.
fn start(load: &Load, t: &Target, cluster: ClusterId) -> impl FnOnce() -> LoadStats {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, n, scan) = match load {
        Load::None => (String::new(), 0, false),
        Load::Watchers { addr, n } => (addr.clone(), *n, false),
        Load::Scanners { addr, n } => (addr.clone(), *n, true),
    };
    let actors: Arc<Mutex<Vec<Actor>>> = Arc::default();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (stop, actors, dial, addr) = (stop.clone(), actors.clone(), t.dial.clone(), addr.clone());
            let admin = if scan { Some(t.admin().expect("the admin key")) } else { None };
            std::thread::spawn(move || {
                let Ok(conn) = Connection::connect_with(&addr, &dial, Duration::from_secs(5)) else {
                    actors.lock().push(Actor { errors: 1, ..Actor::default() });
                    return;
                };
                let a = match &admin {
                    Some(k) => scanner(&conn, k, cluster, &stop),
                    None => watcher(&conn, &stop),
                };
                actors.lock().push(a);
            })
        })
        .collect();
    move || {
        stop.store(true, Ordering::Release);
        for th in threads {
            let _ = th.join();
        }
        let actors = std::mem::take(&mut *actors.lock());
        summarize(&actors, scan)
    }
}

fn summarize(actors: &[Actor], scan: bool) -> LoadStats {
    let mut all: Vec<f64> = actors.iter().flat_map(|a| a.answers.iter().copied()).collect();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all.get(((all.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    let progress: u64 = actors.iter().map(|a| a.progress).sum();
    LoadStats {
        actors: actors.len(),
        pages: actors.iter().map(|a| a.pages).sum(),
        busy: actors.iter().map(|a| a.busy).sum(),
        errors: actors.iter().map(|a| a.errors).sum(),
        late_actors: actors.iter().filter(|a| a.slowest > LATE || a.errors > 0).count(),
        silent_actors: actors.iter().filter(|a| a.answers.is_empty()).count(),
        answer_ms_p50: at(0.5),
        answer_ms_p99: at(0.99),
        answer_ms_max: at(1.0),
        progress: if scan { progress as f64 } else { progress as f64 / actors.len().max(1) as f64 },
    }
}

/// `tally bench` for `duration`; its throughput (requests/s).
fn bench(a: &Args, tally: &Path, json: &Path) -> f64 {
    let cluster_dir = a.cluster_dir.as_ref().expect("clap requires --cluster-dir");
    let dir = cluster_dir.display().to_string();
    // A key of the cluster's, so the bench creates none in the user's home.
    let key = cluster_dir.join("accounts/0.key").display().to_string();
    let status = std::process::Command::new(tally)
        .args(["--cluster-dir", &dir, "--key", &key, "bench", "--accounts-dir", &dir])
        .args(["--duration", &a.duration.to_string(), "--clients", &a.clients.to_string()])
        .arg("--json")
        .arg(json)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tally bench");
    assert!(status.success(), "tally bench failed: {status}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).expect("bench json")).expect("json");
    v["throughput_per_s"].as_f64().expect("throughput_per_s")
}

fn main() {
    let a = Args::parse();
    if let Some(json) = &a.plot_from {
        plot_json(json);
        return;
    }
    let t = target(a.cluster_dir.as_ref().expect("clap requires --cluster-dir"));
    let tally = a.tally.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("this program's path");
        exe.parent().and_then(Path::parent).expect("target/<profile>/examples").join("tally")
    });
    let client = Client::connect(&t.addrs, tally_client::keyfile::generate_key(), t.options()).expect("connect");
    let waited = Instant::now();
    let status = loop {
        match client.status() {
            Ok(s) if s.leader_addr.is_some() => break s,
            _ if waited.elapsed() > Duration::from_secs(30) => panic!("no leader within 30 s"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let leader = status.leader_addr.clone().expect("a leader");
    let follower = t.addrs.iter().find(|x| **x != leader).expect("a follower").clone();
    load_docs(&t, a.docs);
    // Each load runs between two benches alone, and is compared with their mean: runs here drift
    // by 5-10% over minutes, more than the targets' margins.
    let phases = [
        ("baseline", Load::None),
        ("leader_watchers", Load::Watchers { addr: leader.clone(), n: a.watchers_leader }),
        ("baseline", Load::None),
        ("follower_watchers", Load::Watchers { addr: follower, n: a.watchers_follower }),
        ("baseline", Load::None),
        ("scanners", Load::Scanners { addr: leader, n: a.scanners }),
        ("baseline", Load::None),
    ];
    let scratch = tempfile_dir();
    let mut runs = Vec::new();
    for (i, (name, load)) in phases.into_iter().enumerate() {
        let stop = start(&load, &t, status.cluster_id);
        std::thread::sleep(Duration::from_secs(1));
        let tput = bench(&a, &tally, &scratch.join(format!("{i}-{name}.json")));
        let stats = stop();
        println!("{name:<18} {tput:>9.0}/s");
        runs.push((name, tput, stats));
    }
    let mut rows = Vec::new();
    for (i, (name, tput, stats)) in runs.iter().enumerate() {
        // A baseline is compared with the first; a load with the baselines either side of it.
        let base = if *name == "baseline" { runs[0].1 } else { (runs[i - 1].1 + runs[i + 1].1) / 2.0 };
        let pct = 100.0 * tput / base;
        println!(
            "{name:<18} {tput:>9.0}/s {pct:>6.1}%  actors {:>3}: pages {:>6} busy {:>6} errors {:>4} late {:>3} silent {:>3} answer p50 {:>6.1} p99 {:>7.1} max {:>7.1} ms progress {:.0}",
            stats.actors, stats.pages, stats.busy, stats.errors, stats.late_actors, stats.silent_actors,
            stats.answer_ms_p50, stats.answer_ms_p99, stats.answer_ms_max, stats.progress
        );
        rows.push(serde_json::json!({
            "phase": name, "throughput_per_s": tput, "baseline_per_s": base, "pct_of_baseline": pct, "load": stats,
        }));
    }
    let doc = serde_json::json!({
        "docs": a.docs, "duration_s": a.duration, "clients": a.clients,
        "machine": tally_cli::bench::Machine::this(), "phases": rows,
    });
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json")).expect("write json");
        println!("wrote {}", path.display());
        plot_json(path);
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Draws `<json>.png` from a run's JSON: one bar per phase.
fn plot_json(json: &Path) {
    let text = std::fs::read_to_string(json).expect("read the run's JSON");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("the run's JSON parses");
    let phases = doc["phases"].as_array().expect("the JSON has phases");
    let bars: Vec<(&str, f64, f64)> = phases
        .iter()
        .map(|p| {
            let name = p["phase"].as_str().expect("a phase name");
            (name, p["throughput_per_s"].as_f64().unwrap_or(0.0), p["pct_of_baseline"].as_f64().unwrap_or(0.0))
        })
        .collect();
    let png = json.with_extension("png");
    plot(&bars, &png, tally_plot::register_font());
    println!("wrote {}", png.display());
}

/// One bar per phase: the bench's throughput, baselines grey, loads blue with their share of
/// the baselines either side.
fn plot(bars: &[(&str, f64, f64)], path: &Path, with_text: bool) {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).expect("fill");
    let y_max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder.caption(
            "tally bench beside watchers and admin scanners (requests/s; loads as % of the baselines either side)",
            ("sans-serif", 20),
        );
        builder.x_label_area_size(40).y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(0f64..bars.len() as f64, 0f64..y_max).expect("chart");
    if with_text {
        let names: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("requests/s")
            .draw()
            .expect("mesh");
    }
    for (i, (name, tput, pct)) in bars.iter().enumerate() {
        let x = i as f64;
        let colour = if *name == "baseline" { RGBColor(170, 170, 170) } else { BLUE };
        chart.draw_series([Rectangle::new([(x + 0.15, 0.0), (x + 0.85, *tput)], colour.filled())]).expect("bar");
        if with_text && *name != "baseline" {
            chart
                .draw_series([Text::new(format!("{pct:.1}%"), (x + 0.3, tput * 1.03), ("sans-serif", 16))])
                .expect("label");
        }
    }
    root.present().expect("write png");
}

/// A scratch directory for the bench summaries.
fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("tally-watch-load-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}
