//! An HA validator on tally's claims (docs/coordination.md): several instances stand ready, and
//! every slot each one asks tally for permission; only the one granted the slot signs it.
//!
//! ```text
//! cargo build --example ha_validator -p tally-cli
//! ha_validator run   --cluster-dir DIR --key DIR/accounts/0.key --log v0.log [--domain D] [--slot-ms 500] [--genesis-ms T]
//! ha_validator check --cluster-dir DIR --logs v0.log v1.log v2.log [--domain D] [--kills-ms T1,T2] [--margin-ms 2000]
//! ```
//! `run` claims slot `(now - genesis) / slot_ms` at the start of every slot and "signs" it (one
//! fsynced line in its log) only when the claim is granted while the slot is still current: a
//! grant that arrives after the slot ended (a failover took the time) is not signed. `check`
//! reads every log and the claim history (a watch of the domain from height 1) and prints a
//! JSON verdict: no slot signed twice, every signature backed by the claim tally granted to that
//! signer, and the slots nobody signed, with those not within `margin` of a kill called out.
//! It exits 0 only if nothing was signed twice or without its grant and no slot was missed away
//! from the kills.

use clap::{Parser, Subcommand};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tally_cli::cli::{Cli, Target};
use tally_client::{ClaimResult, Client};
use tally_codec::wire::{Change, WatchFilter};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// The cluster and the slot clock every instance and the checker share.
#[derive(clap::Args)]
struct Slots {
    #[arg(long)]
    cluster_dir: PathBuf,
    #[arg(long, default_value = "validator")]
    domain: String,
    #[arg(long, default_value_t = 500)]
    slot_ms: u64,
    /// Slot 0 starts here (unix ms); every instance must use the same value.
    #[arg(long, default_value_t = 0)]
    genesis_ms: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Play one validator instance until killed (or for --slots slots).
    Run {
        #[command(flatten)]
        slots_of: Slots,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        slots: Option<u64>,
    },
    /// Check the logs against the claim history.
    Check {
        #[command(flatten)]
        slots_of: Slots,
        #[arg(long, num_args = 1..)]
        logs: Vec<PathBuf>,
        /// When instances or replicas were killed (unix ms, comma-separated).
        #[arg(long, value_delimiter = ',')]
        kills_ms: Vec<u64>,
        /// A missed slot this close to a kill is expected.
        #[arg(long, default_value_t = 2_000)]
        margin_ms: u64,
        /// Only slots from here (default: the first signed slot).
        #[arg(long)]
        from_slot: Option<u64>,
        /// Up to here (default: the last signed slot).
        #[arg(long)]
        to_slot: Option<u64>,
    },
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn connect(dir: &std::path::Path, key: ed25519_dalek::SigningKey) -> Result<Client, String> {
    let cli = Cli::try_parse_from(["tally", "--cluster-dir", &dir.display().to_string(), "status"])
        .map_err(|e| e.to_string())?;
    let t = Target::resolve(&cli).map_err(|e| e.to_string())?;
    Client::connect(&t.addrs, key, t.options()).map_err(|e| e.to_string())
}

fn run(
    dir: &std::path::Path,
    key: &std::path::Path,
    log: &std::path::Path,
    domain: &str,
    slot_ms: u64,
    genesis_ms: u64,
    slots: Option<u64>,
) -> Result<(), String> {
    let key = tally_client::load_key(key).map_err(|e| e.to_string())?;
    let me = tally_client::keyfile::public_of(&key);
    let client = connect(dir, key)?;
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(|e| e.to_string())?;
    let mut done = 0;
    loop {
        // Wait for the next slot boundary, then claim that slot.
        let now = now_ms().max(genesis_ms);
        let slot = (now - genesis_ms) / slot_ms + 1;
        let start = genesis_ms + slot * slot_ms;
        std::thread::sleep(Duration::from_millis(start.saturating_sub(now_ms())));
        match client.claim(domain, slot, None) {
            Ok((ClaimResult::Granted { height }, _)) if now_ms() < start + slot_ms => {
                // "Sign": durably, before anything else could be done with the signature.
                writeln!(out, "{slot} {me} {height}").map_err(|e| e.to_string())?;
                out.sync_data().map_err(|e| e.to_string())?;
            }
            Ok((ClaimResult::Granted { .. }, _)) => eprintln!("slot {slot}: granted too late, not signed"),
            Ok((ClaimResult::Denied { .. }, _)) => {}
            Err(e) => eprintln!("slot {slot}: {e}"),
        }
        done += 1;
        if slots.is_some_and(|n| done >= n) {
            return Ok(());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    dir: &std::path::Path,
    logs: &[PathBuf],
    domain: &str,
    slot_ms: u64,
    genesis_ms: u64,
    kills_ms: &[u64],
    margin_ms: u64,
    from_slot: Option<u64>,
    to_slot: Option<u64>,
) -> Result<bool, String> {
    // Every signature in every log: slot → (signer, log).
    let mut signed: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    for log in logs {
        let f = std::fs::File::open(log).map_err(|e| format!("{}: {e}", log.display()))?;
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(|e| e.to_string())?;
            let mut words = line.split_whitespace();
            let (Some(slot), Some(signer)) = (words.next(), words.next()) else { continue };
            let slot: u64 = slot.parse().map_err(|_| format!("{}: bad line {line:?}", log.display()))?;
            signed.entry(slot).or_default().push((signer.to_string(), log.display().to_string()));
        }
    }
    // The claim history, from tally.
    let client = connect(dir, tally_client::keyfile::generate_key())?;
    let top = client.status().map_err(|e| e.to_string())?.committed_height;
    let mut granted: BTreeMap<u64, String> = BTreeMap::new();
    let filter = WatchFilter::Domain(domain.to_string());
    let mut next = 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while next <= top {
        if std::time::Instant::now() > deadline {
            return Err(format!("the claim history stopped at height {next} of {top} for 60 s"));
        }
        let page = client.watch_page(&filter, next).map_err(|e| e.to_string())?;
        for e in page.events {
            if let Change::ClaimGranted { slot, holder, .. } = e.change {
                granted.insert(slot, holder.to_string());
            }
        }
        next = page.next_height.max(next);
    }
    let first = from_slot.or_else(|| signed.keys().next().copied()).unwrap_or(0);
    let last = to_slot.or_else(|| signed.keys().last().copied()).unwrap_or(0);
    let twice: Vec<u64> = signed.iter().filter(|(_, v)| v.len() > 1).map(|(s, _)| *s).collect();
    let unbacked: Vec<u64> = signed
        .iter()
        .filter(|(s, v)| v.iter().any(|(signer, _)| granted.get(s) != Some(signer)))
        .map(|(s, _)| *s)
        .collect();
    let missed: BTreeSet<u64> = (first..=last).filter(|s| !signed.contains_key(s)).collect();
    let near_kill = |s: &u64| {
        let t = genesis_ms + s * slot_ms;
        kills_ms.iter().any(|k| t + slot_ms + margin_ms >= *k && t <= k + margin_ms)
    };
    let unexplained: Vec<u64> = missed.iter().filter(|s| !near_kill(s)).copied().collect();
    let ok = twice.is_empty() && unbacked.is_empty() && unexplained.is_empty();
    let verdict = serde_json::json!({
        "ok": ok,
        "slots": last.saturating_sub(first) + 1,
        "signed": signed.len(),
        "signed_twice": twice,
        "signed_without_grant": unbacked,
        "missed": missed,
        "missed_away_from_kills": unexplained,
        "claims_granted": granted.len(),
        "signers": signed.values().flatten().map(|(s, _)| s.clone()).collect::<BTreeSet<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&verdict).map_err(|e| e.to_string())?);
    Ok(ok)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.command {
        Command::Run { slots_of: c, key, log, slots } => {
            run(&c.cluster_dir, &key, &log, &c.domain, c.slot_ms.max(1), c.genesis_ms, slots).map(|()| true)
        }
        Command::Check { slots_of: c, logs, kills_ms, margin_ms, from_slot, to_slot } => check(
            &c.cluster_dir,
            &logs,
            &c.domain,
            c.slot_ms.max(1),
            c.genesis_ms,
            &kills_ms,
            margin_ms,
            from_slot,
            to_slot,
        ),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
