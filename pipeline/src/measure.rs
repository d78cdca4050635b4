//! Metric helpers for the stages. Every name is listed, with its meaning, in `docs/metrics.md`
//! and described (`# HELP`) by `tallyd`. Nothing here runs per request on the success path:
//! stage times are recorded per frame or per batch, refusals per refused request only.

use std::time::Instant;
use tally_codec::ErrorCode;

/// Records how long one pass of `stage` took (a frame in `validate`, a batch elsewhere).
pub fn stage_time(stage: &'static str, started: Instant) {
    metrics::histogram!("tally_stage_seconds", "stage" => stage).record(started.elapsed().as_secs_f64());
}

/// Counts `n` requests (or commands) refused with `code` in `stage`.
pub fn refused(stage: &'static str, code: ErrorCode, n: u64) {
    if n > 0 {
        metrics::counter!("tally_refused_total", "stage" => stage, "reason" => code.name()).increment(n);
    }
}

/// Every stage that refuses, with the reasons it refuses for: the series of
/// `tally_refused_total` exported at 0 from the start ([`export_refusals_at_zero`]), so a
/// dashboard's refusal panel shows a healthy cluster's zero instead of "No data", and `rate()`
/// sees a refusal's first event.
pub const REFUSALS: [(&str, &[ErrorCode]); 7] = [
    ("receive", &[ErrorCode::NotLeader, ErrorCode::Overloaded]),
    (
        "validate",
        &[
            ErrorCode::Malformed,
            ErrorCode::BadSignature,
            ErrorCode::WeakKey,
            ErrorCode::Expired,
            ErrorCode::ExpiryTooFar,
            ErrorCode::WrongCluster,
            ErrorCode::RequestTooLarge,
            ErrorCode::ValueTooLarge,
            ErrorCode::BadTxn,
        ],
    ),
    ("optimistic", &[ErrorCode::InsufficientFunds]),
    ("sequence", &[ErrorCode::Expired, ErrorCode::ProposalTooLarge]),
    ("propose", &[ErrorCode::NotLeader, ErrorCode::Retry, ErrorCode::Overloaded]),
    ("persist", &[ErrorCode::LogFailed, ErrorCode::StorageFull]),
    ("admin", &[ErrorCode::NotAuthorized, ErrorCode::Duplicate, ErrorCode::Overloaded]),
];

/// Exports every [`REFUSALS`] series at 0 (once, after the recorder is installed).
pub fn export_refusals_at_zero() {
    for (stage, codes) in REFUSALS {
        for code in codes {
            metrics::counter!("tally_refused_total", "stage" => stage, "reason" => code.name()).increment(0);
        }
    }
}

/// The refusals of one frame or batch, counted locally and added to the counters once.
pub struct Refusals {
    stage: &'static str,
    counts: Vec<(ErrorCode, u64)>,
}

impl Refusals {
    pub fn new(stage: &'static str) -> Refusals {
        Refusals { stage, counts: Vec::new() }
    }

    pub fn add(&mut self, code: ErrorCode) {
        match self.counts.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((code, 1)),
        }
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        for (code, n) in self.counts.drain(..) {
            refused(self.stage, code, n);
        }
    }
}
