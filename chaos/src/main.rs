//! `tally-chaos` (also `tally chaos`): the chaos monkey over real `tallyd` processes.
//!
//! ```text
//! tally chaos --nodes 3 --duration 60 --seed 7                       # every fault kind
//! tally chaos --nodes 5 --duration 600 --faults kill,pause,partition,leader
//! tally chaos --duration 60 --plant ack-before-commit                # must report a violation
//! ```
//! Exits 1 on any violation, printing the seed.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tally_chaos::monkey::{self, Faults, MonkeyConfig};

#[derive(Debug, Parser)]
#[command(name = "tally chaos", about = "Chaos monkey: real tallyd processes, forced failovers, a checked history")]
struct Args {
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of faults (then everything is healed and checked).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Comma-separated: kill, pause, partition, leader, delay, disk; `all` is every kind but disk
    /// (which puts each replica's data on its own tmpfs and needs root).
    #[arg(long, default_value = "all")]
    faults: Faults,
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Cluster directory, logs, report.json and timeline.png.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Client ports start right above this (peer ports 100 above the client ports).
    #[arg(long, default_value_t = 7400)]
    base_port: u16,
    /// A failpoint armed on every replica (debug builds of tallyd): ack-before-commit.
    #[arg(long)]
    plant: Option<String>,
    /// The tallyd binary (default: next to this program).
    #[arg(long)]
    tallyd: Option<PathBuf>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.nodes != 3 && a.nodes != 5 {
        eprintln!("--nodes must be 3 or 5");
        return ExitCode::from(2);
    }
    let tallyd = a.tallyd.clone().unwrap_or_else(tally_cli::up::find_tallyd);
    let cfg = MonkeyConfig {
        nodes: a.nodes,
        duration: Duration::from_secs(a.duration),
        seed: a.seed,
        faults: a.faults,
        clients: a.clients,
        out: a.out.clone(),
        tallyd,
        base_port: a.base_port,
        plant: a.plant.clone(),
        progress: true,
    };
    let report = match monkey::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tally chaos: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", monkey::summary(&report));
    match monkey::write_report(&report, &a.out) {
        Ok(()) => {
            println!("  wrote {} and {}", a.out.join("report.json").display(), a.out.join("timeline.png").display())
        }
        Err(e) => eprintln!("could not write the report: {e}"),
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        eprintln!("violation with seed {}: replay with tally chaos --seed {} --nodes {}", a.seed, a.seed, a.nodes);
        ExitCode::FAILURE
    }
}
