//! Watch delivery latency (docs/coordination.md): one writer sets documents one after another,
//! a watcher follows every document from another connection, and each change's delivery is
//! timed from the writer's receipt (the commit as a client sees it) and from its batch's header
//! time (when the leader closed the batch).
//!
//! ```text
//! cargo build --release --example watch_latency -p tally-cli
//! ./target/release/examples/watch_latency --cluster-dir DIR --key DIR/accounts/0.key [--count 300] [--json FILE]
//! ```

use clap::Parser;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tally_cli::cli::{Cli, Target};
use tally_client::Client;
use tally_codec::wire::{Change, WatchFilter};
use tally_codec::DocKey;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    cluster_dir: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value_t = 300)]
    count: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn connect(dir: &std::path::Path, key: ed25519_dalek::SigningKey) -> Client {
    let cli = Cli::try_parse_from(["tally", "--cluster-dir", &dir.display().to_string(), "status"]).expect("args");
    let t = Target::resolve(&cli).expect("cluster directory");
    Client::connect(&t.addrs, key, t.options()).expect("connect")
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn percentiles(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    serde_json::json!({ "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "n": v.len() })
}

fn main() {
    let a = Args::parse();
    let key = tally_client::load_key(&a.key).expect("key");
    let writer = connect(&a.cluster_dir, key);
    let reader = connect(&a.cluster_dir, tally_client::keyfile::generate_key());
    let from = writer.status().expect("status").committed_height + 1;
    let (tx, rx) = mpsc::channel::<(DocKey, Instant, u64)>();
    let count = a.count;
    let watcher = std::thread::spawn(move || {
        let mut w = reader.watch(WatchFilter::AllDocs, Some(from)).expect("watch");
        for _ in 0..count {
            let e = w.next().expect("endless").expect("watch event");
            if let Change::DocSet { key, .. } = e.change {
                let _ = tx.send((key, Instant::now(), e.time_ms));
            }
        }
    });
    let mut acked: HashMap<DocKey, Instant> = HashMap::new();
    let started = Instant::now();
    for i in 0..a.count {
        let key = DocKey::from_random(rand_bytes());
        writer.set(key, &format!(r#"{{"i":{i}}}"#)).expect("set");
        acked.insert(key, Instant::now());
    }
    let elapsed = started.elapsed();
    watcher.join().expect("watcher");
    let (mut from_ack, mut from_header) = (Vec::new(), Vec::new());
    let seen_wall = wall_ms();
    let seen_now = Instant::now();
    for (key, seen, header_ms) in rx.try_iter() {
        if let Some(ack) = acked.get(&key) {
            from_ack.push(seen.saturating_duration_since(*ack).as_secs_f64() * 1e3);
        }
        // The moment seen on the wall clock, against the header time (same machine's clock).
        let seen_wall_ms = seen_wall as f64 - seen_now.duration_since(seen).as_secs_f64() * 1e3;
        from_header.push(seen_wall_ms - header_ms as f64);
    }
    let report = serde_json::json!({
        "writes": a.count,
        "write_rate_per_s": a.count as f64 / elapsed.as_secs_f64(),
        "delivery_after_the_writer_s_receipt": percentiles(from_ack),
        "delivery_after_the_batch_header_time": percentiles(from_header),
        "note": "a delivery after the receipt counts from when the writer got its receipt; one seen before it counts as 0",
    });
    let text = serde_json::to_string_pretty(&report).expect("json");
    println!("{text}");
    if let Some(p) = a.json {
        std::fs::write(p, text).expect("write json");
    }
}

/// A fresh UUID4's random bytes.
fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b
}
