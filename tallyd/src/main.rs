//! `tallyd`: one replica of a tally cluster.
//!
//! ```text
//! tallyd --data-dir DIR --listen HOST:PORT   # a cluster of one; creates key + genesis on first start
//! tallyd --config FILE                       # settings from a node TOML (see `tally cluster init`)
//! ```
#![forbid(unsafe_code)]

mod metrics_http;
mod setup;

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "tallyd", version, about = "tally operator server: one replica")]
struct Args {
    /// Node configuration (TOML), as written by `tally cluster init`.
    #[arg(long, conflicts_with_all = ["data_dir", "listen"])]
    config: Option<PathBuf>,
    /// Data directory of a single-replica cluster (created on first start).
    #[arg(long, requires = "listen")]
    data_dir: Option<PathBuf>,
    /// Client address of a single-replica cluster.
    #[arg(long)]
    listen: Option<String>,
    /// Genesis file for a new single-replica cluster (default: an empty ledger).
    #[arg(long)]
    genesis: Option<PathBuf>,
    /// Prometheus /metrics address.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Batch interval in ms (single-replica mode).
    #[arg(long, default_value_t = tally_codec::config::default_batch_interval_ms())]
    batch_interval_ms: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = match (&args.config, &args.data_dir, &args.listen) {
        (Some(path), _, _) => setup::load_config(path),
        (None, Some(dir), Some(listen)) => setup::single_replica_config(
            dir,
            listen,
            args.genesis.as_deref(),
            args.metrics_listen.clone(),
            args.batch_interval_ms,
        ),
        _ => Err("give --config FILE, or --data-dir DIR --listen HOST:PORT".to_string()),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(2);
        }
    };
    match setup::run(cfg) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(1);
        }
    }
}
