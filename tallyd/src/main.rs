//! `tallyd`: one replica of a tally cluster.
//!
//! ```text
//! tallyd --data-dir DIR --listen HOST:PORT   # a cluster of one; creates key + genesis on first start
//! tallyd --config FILE                       # settings from a node TOML (see `tally cluster init`)
//! tallyd --config FILE --log-format json      # one JSON object per log line (or `log_format` in FILE)
//! ```
#![forbid(unsafe_code)]

mod metrics_http;
mod setup;

use clap::Parser;
use std::path::PathBuf;
use tally_codec::config::LogFormat;

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
    /// Serve plaintext on a non-loopback address in single-replica mode (anyone on the network
    /// can read the traffic). Loopback quick starts are plaintext without it.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Batch interval in ms (single-replica mode).
    #[arg(long, default_value_t = tally_codec::config::default_batch_interval_ms())]
    batch_interval_ms: u64,
    /// Log format on stderr: text, or json (one object per line); overrides `log_format` of
    /// the config file.
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("'{s}' is not a log format: text or json")),
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Every line is cut at `LINE_BYTES_MAX`, so the rate-limited kinds bound the log's growth.
    let text = || tally_net::log_limit::LineCap::text(std::io::stderr().lock());
    let json = || tally_net::log_limit::LineCap::json(std::io::stderr().lock());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        // Colour only on a terminal: logs redirected to a file stay plain text.
        LogFormat::Text => {
            builder.with_writer(text).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
        // One object per line; the message and the event's fields at the top level, next to
        // `timestamp`, `level` and `target`. Never ANSI.
        LogFormat::Json => {
            builder.with_writer(json).json().flatten_event(true).with_current_span(false).with_ansi(false).init()
        }
    }
}

fn main() {
    // A broken invariant in any thread ends the replica, so that a backup takes over: a panic
    // that only ended its own thread would leave a leader heartbeating with a dead stage.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("tallyd: a thread panicked; aborting the replica so a backup takes over");
        std::process::abort();
    }));
    let args = Args::parse();
    let cfg = match (&args.config, &args.data_dir, &args.listen) {
        (Some(path), _, _) => setup::load_config(path).and_then(|c| setup::check_config(&c, path).map(|()| c)),
        (None, Some(dir), Some(listen)) => setup::single_replica_config(
            dir,
            listen,
            args.genesis.as_deref(),
            args.metrics_listen.clone(),
            args.batch_interval_ms,
        ),
        _ => Err("give --config FILE, or --data-dir DIR --listen HOST:PORT".to_string()),
    };
    let cfg = cfg.and_then(|c| {
        if args.config.is_none() && !tally_net::tls::is_loopback(&c.listen) && !args.insecure_plaintext {
            return Err(format!(
                "--listen {} is not a loopback address: the quick start serves plaintext only on loopback; \
                 use tally cluster init (TLS) and --config, or pass --insecure-plaintext",
                c.listen
            ));
        }
        Ok(c)
    });
    let mut cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(2);
        }
    };
    cfg.log_format = args.log_format.unwrap_or(cfg.log_format);
    init_logging(cfg.log_format);
    match setup::run(cfg) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(1);
        }
    }
}
