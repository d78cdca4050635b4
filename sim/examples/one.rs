fn main() {
    let a: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let b: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(a);
    let plant: tally_core::Plant = std::env::args().nth(3).map(|s| s.parse().unwrap()).unwrap_or_default();
    let t = std::time::Instant::now();
    let mut bad = 0;
    for seed in a..=b {
        let mut cfg = tally_sim::SimConfig::new(seed);
        cfg.plant = plant;
        let r = tally_sim::run_seed(cfg);
        if !r.ok() {
            bad += 1;
            println!("seed {seed}: {:?}", r.violations.iter().map(|v| format!("{}: {}", v.invariant, v.what.chars().take(250).collect::<String>())).collect::<Vec<_>>());
        }
    }
    println!("{bad} failing seeds in {:?}", t.elapsed());
}
