//! The invariants of `docs/architecture.md` §2 (I1–I6), checked over one run's history: what the
//! clients were told and what every replica committed. The simulator (`sim/`) and the chaos
//! monkey (`chaos/`) both record their runs into this model and run these checks, so a check
//! written once holds for the simulated cluster and for real processes alike (`docs/testing.md`).
//!
//! ```text
//!  sim: Sim::finish ─────────────┐
//!  chaos: clients + read back ───┴─▶ history::RunRecord ─▶ check::check_all ─▶ Verdicts
//!  cluster tests: acked receipts + read back ─▶ RunRecord ─▶ check::check_committed ─▶ Verdicts
//! ```
//!
//! No I/O: the drivers gather the record, this crate only judges it. Product crates never
//! depend on it.
#![forbid(unsafe_code)]

pub mod check;
pub mod history;
