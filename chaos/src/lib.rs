//! Chaos testing on real processes: the monkey (workload and fault injection), the
//! fault-injecting proxy, and the read-back of a live cluster into the history model whose
//! invariants (`docs/architecture.md` §2) `tally_check` checks, as it does the simulator's.
//!
//! ```text
//!  workload ──history (invoke, ack / refusal / nothing)──┐
//!  every replica ──Batch · Audit · Status── readback ────┴─▶ tally_check::history::RunRecord
//!                                                              └─▶ tally_check::check: I1–I6
//! ```
//! Product crates never depend on this one.
#![forbid(unsafe_code)]

pub mod monkey;
pub mod proxy;
pub mod readback;
