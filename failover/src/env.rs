//! The environment failover logic reads time and randomness from. Production uses
//! [`SystemEnv`]; the simulator drives the core with its own virtual clock and seeded RNG.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub trait Env: Send + 'static {
    /// Monotonic milliseconds since an arbitrary start (leases, ticks, timeouts).
    fn monotonic_ms(&self) -> u64;
    /// Unix time in ms (batch header time, request expiry). May jump.
    fn wall_ms(&self) -> u64;
    fn next_u64(&mut self) -> u64;
}

/// Real clocks and a ChaCha RNG seeded once at start (from the seed given, or the OS).
pub struct SystemEnv {
    start: Instant,
    rng: ChaCha20Rng,
}

impl SystemEnv {
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_entropy(),
        };
        SystemEnv { start: Instant::now(), rng }
    }
}

impl Env for SystemEnv {
    fn monotonic_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn wall_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
}
