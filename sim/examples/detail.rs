fn main() {
    let seed: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let r = tally_sim::run_seed(tally_sim::SimConfig::new(seed));
    for v in &r.violations {
        println!("{}: {}", v.invariant, v.what);
    }
}
