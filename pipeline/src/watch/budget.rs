//! A token bucket for work that must not take more than its share of the machine (watch pages,
//! admin scans): `rate_per_s` units a second, at most `burst` saved up. A charge may overdraw
//! it (one batch's events go out whole); nothing more is granted until the debt is paid back.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Budget {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64) -> Budget {
        assert!(rate_per_s > 0, "a budget must refill");
        Budget { rate_per_s: rate_per_s as f64, burst: burst as f64, tokens: burst as f64, at: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate_per_s).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Units that may be spent now (negative: the debt).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Whether any work may start now.
    pub fn available(&mut self, now: Instant) -> bool {
        self.tokens(now) > 0.0
    }

    pub fn charge(&mut self, units: u64, now: Instant) {
        self.refill(now);
        self.tokens -= units as f64;
    }

    /// How long until [`Budget::available`] (zero when it is).
    pub fn ready_in(&mut self, now: Instant) -> Duration {
        let t = self.tokens(now);
        if t > 0.0 {
            Duration::ZERO
        } else {
            // One unit past the debt, so that a caller waking then finds work allowed.
            Duration::from_secs_f64((1.0 - t) / self.rate_per_s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_overdraws_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(1_000, 100);
        assert!(b.available(t0));
        b.charge(600, t0);
        assert!(!b.available(t0), "overdrawn by 500");
        let wait = b.ready_in(t0);
        assert!(wait > Duration::from_millis(500) && wait < Duration::from_millis(505), "{wait:?}");
        assert!(b.available(t0 + wait));
        // Never more than the burst saved up, however long it rested.
        assert!(b.tokens(t0 + Duration::from_secs(60)) <= 100.0);
    }
}
