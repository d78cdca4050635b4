//! `tally-sim` (also `tally sim`): runs the whole-cluster simulator over one seed or many.
//!
//! ```text
//! tally sim --seed 634                       # one seed, with its timeline
//! tally sim --seeds 1000 [--first-seed 1]    # many seeds, a progress bar, a summary
//! tally sim --seeds 300 --plant ack-before-commit   # must fail: the checkers can catch it
//! ```
//! Writes `summary.json` and `sim.png` to `--out` (default `target/sim`). Exits 1 when any seed
//! broke an invariant, printing the seed and the command that replays it.

use clap::Parser;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tally_core::Plant;
use tally_sim::{run_seed, SeedResult, SimConfig};

#[derive(Debug, Parser)]
#[command(
    name = "tally sim",
    about = "Deterministic whole-cluster simulation: real replica core, simulated network, disks and clocks"
)]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// The first of `--seeds`.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// 3 or 5 replicas (default: drawn from each seed, one in three runs has 5).
    #[arg(long, value_parser = clap::builder::ValueParser::new(parse_nodes))]
    nodes: Option<usize>,
    /// Simulated milliseconds with faults, then `--liveness-ms` with every fault healed.
    #[arg(long, default_value_t = 20_000)]
    safety_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    liveness_ms: u64,
    /// A bug planted in the core, to prove the checkers catch it: ack-before-commit,
    /// sign-before-commit, skip-fsync, stale-lease-read, no-peer-gate.
    #[arg(long, default_value = "none")]
    plant: Plant,
    /// A forging peer holding a member's identity through the safety phase: `on`, `off`, or
    /// `seed` (one seed in 4).
    #[arg(long, default_value = "seed", value_parser = ["on", "off", "seed"])]
    forger: String,
    /// Where the summary JSON and PNG go.
    #[arg(long, default_value = "target/sim")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(serde::Serialize)]
struct Summary {
    seeds: u64,
    first_seed: u64,
    plant: String,
    failed_seeds: Vec<u64>,
    wall_s: f64,
    seeds_per_minute: f64,
    simulated_s: f64,
    simulated_s_per_wall_s: f64,
    faults: std::collections::BTreeMap<String, u64>,
    failovers: u64,
    reconfigurations: u64,
    membership: MembershipSummary,
    ops: u64,
    acked_checked: u64,
    bad_inputs: u64,
    keys_checked: u64,
    linearizability_gave_up: u64,
    coordination_checked: u64,
    five_node_runs: u64,
    forger: ForgerSummary,
    results: Vec<SeedResult>,
}

/// The forging peer over all seeds.
#[derive(serde::Serialize, Default)]
struct ForgerSummary {
    seeds: u64,
    sent: u64,
    passed: u64,
    refused: std::collections::BTreeMap<String, u64>,
    honest_refused: std::collections::BTreeMap<String, u64>,
    /// Seeds where a lie passed the gate and moved a replica where only a lie can.
    tainted_seeds: Vec<u64>,
    /// Of those, the seeds with excused violations, and the violations by invariant.
    tainted_with_violations: Vec<u64>,
    excused: std::collections::BTreeMap<String, u64>,
}

fn forger_summary(results: &[SeedResult]) -> ForgerSummary {
    let mut f = ForgerSummary::default();
    for r in results {
        let Some(s) = &r.stats.forger else { continue };
        f.seeds += 1;
        f.sent += s.sent;
        f.passed += s.passed;
        for (k, v) in &s.refused {
            *f.refused.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &s.honest_refused {
            *f.honest_refused.entry(k.clone()).or_default() += v;
        }
        if s.taint.is_some() {
            f.tainted_seeds.push(r.seed);
        }
        if !r.excused.is_empty() {
            f.tainted_with_violations.push(r.seed);
        }
        for v in &r.excused {
            *f.excused.entry(v.invariant.to_string()).or_default() += 1;
        }
    }
    f
}

fn config(a: &Args, seed: u64) -> SimConfig {
    let forger = match a.forger.as_str() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    };
    SimConfig { seed, nodes: a.nodes, safety_ms: a.safety_ms, liveness_ms: a.liveness_ms, plant: a.plant, forger }
}

fn replay_command(a: &Args, seed: u64) -> String {
    let mut cmd = format!("tally sim --seed {seed}");
    if let Some(n) = a.nodes {
        cmd.push_str(&format!(" --nodes {n}"));
    }
    if a.safety_ms != 20_000 || a.liveness_ms != 10_000 {
        cmd.push_str(&format!(" --safety-ms {} --liveness-ms {}", a.safety_ms, a.liveness_ms));
    }
    if a.plant != Plant::None {
        cmd.push_str(&format!(" --plant {}", plant_name(a.plant)));
    }
    if a.forger != "seed" {
        cmd.push_str(&format!(" --forger {}", a.forger));
    }
    cmd
}

fn plant_name(p: Plant) -> &'static str {
    match p {
        Plant::None => "none",
        Plant::AckBeforeCommit => "ack-before-commit",
        Plant::SignBeforeCommit => "sign-before-commit",
        Plant::SkipFsync => "skip-fsync",
        Plant::StaleLeaseRead => "stale-lease-read",
        Plant::NoPeerGate => "no-peer-gate",
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let (first, count) = match (a.seed, a.seeds) {
        (Some(s), _) => (s, 1),
        (None, Some(n)) => (a.first_seed, n),
        (None, None) => (a.first_seed, 100),
    };
    let started = Instant::now();
    let (results, failed) = run_seeds(&a, first, count);
    let summary = summarize(&a, first, count, started.elapsed().as_secs_f64(), failed.clone(), results);
    print_summary(&summary);
    if let Err(e) = write_outputs(&a.out, &summary) {
        eprintln!("could not write {}: {e}", a.out.display());
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{} of {count} seeds broke an invariant: {:?}", failed.len(), &failed[..failed.len().min(20)]);
        eprintln!("replay the first: {}", replay_command(&a, failed[0]));
        ExitCode::FAILURE
    }
}

/// A progress bar over `count` seeds, hidden for one seed or `--quiet`.
fn progress_bar(quiet: bool, count: u64) -> indicatif::ProgressBar {
    if quiet || count == 1 {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(count);
    b.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} seeds  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// Runs seeds `first..first + count` in order, printing each failure and how to replay it as it
/// happens. Returns every seed's result and the failed seeds.
fn run_seeds(a: &Args, first: u64, count: u64) -> (Vec<SeedResult>, Vec<u64>) {
    let bar = progress_bar(a.quiet, count);
    let mut results = Vec::with_capacity(count as usize);
    let mut failed = Vec::new();
    for seed in first..first + count {
        let r = run_seed(config(a, seed));
        if !r.ok() {
            failed.push(seed);
            bar.suspend(|| {
                eprintln!("seed {seed} FAILED ({} violations):", r.violations.len());
                for v in r.violations.iter().take(5) {
                    eprintln!("  {}: {}", v.invariant, v.what.chars().take(600).collect::<String>());
                }
                eprintln!("  replay: {}", replay_command(a, seed));
            });
        }
        bar.set_message(format!("{} failed", failed.len()));
        bar.inc(1);
        results.push(r);
    }
    bar.finish_and_clear();
    (results, failed)
}

/// The figures over all seeds.
fn summarize(a: &Args, first: u64, count: u64, wall_s: f64, failed: Vec<u64>, results: Vec<SeedResult>) -> Summary {
    let simulated_s: f64 = results.iter().map(|r| r.stats.sim_ms as f64 / 1e3).sum();
    let mut faults = std::collections::BTreeMap::new();
    for r in &results {
        for (k, v) in &r.stats.faults {
            *faults.entry(k.clone()).or_insert(0) += v;
        }
    }
    Summary {
        seeds: count,
        first_seed: first,
        plant: plant_name(a.plant).into(),
        failed_seeds: failed,
        wall_s,
        seeds_per_minute: count as f64 / wall_s * 60.0,
        simulated_s,
        simulated_s_per_wall_s: simulated_s / wall_s,
        faults,
        failovers: results.iter().map(|r| r.stats.failovers).sum(),
        reconfigurations: results.iter().map(|r| r.stats.reconfigurations).sum(),
        membership: membership_summary(&results),
        ops: results.iter().map(|r| r.stats.ops).sum(),
        acked_checked: results.iter().map(|r| r.acked_checked).sum(),
        bad_inputs: results.iter().map(|r| r.stats.bad_inputs).sum(),
        keys_checked: results.iter().map(|r| r.keys_checked).sum(),
        linearizability_gave_up: results.iter().map(|r| r.linearizability_gave_up).sum(),
        coordination_checked: results.iter().map(|r| r.coordination_checked).sum(),
        five_node_runs: results.iter().filter(|r| r.stats.nodes == 5).count() as u64,
        forger: forger_summary(&results),
        results,
    }
}

/// Membership changes run as `cluster add` and `cluster remove` run them.
#[derive(Debug, Default, serde::Serialize)]
struct MembershipSummary {
    done: u64,
    failed: std::collections::BTreeMap<String, u64>,
    replaced: u64,
    learner_snapshots: u64,
}

fn membership_summary(results: &[SeedResult]) -> MembershipSummary {
    let mut m = MembershipSummary::default();
    for r in results {
        m.done += r.stats.membership_done;
        m.replaced += r.stats.replaced;
        m.learner_snapshots += r.stats.learner_snapshots;
        for (k, v) in &r.stats.membership_failed {
            *m.failed.entry(k.clone()).or_default() += v;
        }
    }
    m
}

fn print_summary(s: &Summary) {
    println!(
        "{} seeds ({} with 5 replicas), plant {}: {} failed",
        s.seeds,
        s.five_node_runs,
        s.plant,
        s.failed_seeds.len()
    );
    println!(
        "  {:.1} s wall, {:.0} seeds/min, {:.0} simulated s ({:.0} simulated s per wall s)",
        s.wall_s, s.seeds_per_minute, s.simulated_s, s.simulated_s_per_wall_s
    );
    println!(
        "  {} failovers, {} membership changes, {} client ops, {} acknowledged and checked, {} bad inputs, {} document keys checked ({} gave up)",
        s.failovers, s.reconfigurations, s.ops, s.acked_checked, s.bad_inputs, s.keys_checked, s.linearizability_gave_up
    );
    let m = &s.membership;
    let failed: Vec<String> = m.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "  membership changes through the leader's flow: {} done, failed {{{}}}; {} nodes replaced by empty ones, {} snapshots installed by them",
        m.done,
        failed.join(", "),
        m.replaced,
        m.learner_snapshots
    );
    println!("  {} committed coordination outcomes checked (claims, create-only sets, leases)", s.coordination_checked);
    let faults: Vec<String> = s.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  faults: {}", faults.join(", "));
    let f = &s.forger;
    if f.seeds > 0 {
        let refused: u64 = f.refused.values().sum();
        let reasons: Vec<String> = f.refused.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "  forging peer in {} seeds: {} messages, {refused} refused ({}), {} passed",
            f.seeds,
            f.sent,
            reasons.join(", "),
            f.passed
        );
        let honest: Vec<String> = f.honest_refused.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "    honest messages refused meanwhile: {}",
            if honest.is_empty() { "none".into() } else { honest.join(", ") }
        );
        let excused: Vec<String> = f.excused.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "    lies Raft can't tell from the truth moved a replica in {} seeds; {} of them broke an invariant ({})",
            f.tainted_seeds.len(),
            f.tainted_with_violations.len(),
            if excused.is_empty() { "none".into() } else { excused.join(", ") }
        );
    }
    if s.seeds == 1 {
        if let Some(r) = s.results.first() {
            println!("  history digest {}", r.digest);
        }
    }
}

fn write_outputs(dir: &Path, s: &Summary) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(s)?)?;
    let png = dir.join("sim.png");
    {
        let root = BitMapBackend::new(&png, (1000, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_acked = s.results.iter().map(|r| r.acked_checked).max().unwrap_or(1).max(1);
        let max_fo = s.results.iter().map(|r| r.stats.failovers).max().unwrap_or(1).max(1);
        let first = s.first_seed;
        let last = first + s.seeds.max(1);
        // Without a font the plot is drawn without text rather than not at all.
        let font = tally_plot::register_font();
        let mut builder = ChartBuilder::on(&root);
        builder.margin(10);
        if font {
            builder
                .caption(
                    format!("tally sim: {} seeds, {} failed (red), plant {}", s.seeds, s.failed_seeds.len(), s.plant),
                    ("sans-serif", 20),
                )
                .x_label_area_size(35)
                .y_label_area_size(60)
                .right_y_label_area_size(50);
        }
        let mut chart =
            builder.build_cartesian_2d(first..last, 0..max_acked + 1)?.set_secondary_coord(first..last, 0..max_fo + 1);
        if font {
            chart.configure_mesh().x_desc("seed").y_desc("acknowledged requests checked").draw()?;
            chart.configure_secondary_axes().y_desc("failovers (green)").draw()?;
        }
        chart.draw_series(s.results.iter().map(|r| {
            let style = if r.ok() { BLUE.filled() } else { RED.filled() };
            Circle::new((r.seed, r.acked_checked), 2, style)
        }))?;
        chart.draw_secondary_series(
            s.results.iter().map(|r| Cross::new((r.seed, r.stats.failovers), 3, GREEN.stroke_width(1))),
        )?;
        root.present()?;
    }
    println!("  wrote {} and {}", dir.join("summary.json").display(), png.display());
    Ok(())
}

fn parse_nodes(s: &str) -> Result<usize, String> {
    match s {
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("{s}: a simulated cluster has 3 or 5 replicas")),
    }
}
