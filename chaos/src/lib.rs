//! Chaos testing: workloads, fault injection and the checkers of the invariants
//! (`docs/architecture.md` §2).
//!
//! ```text
//!  workload ──acked receipts──▶ checker ◀──Batch/Audit/Status── every replica
//!                                  │
//!                                  └─▶ I1 exactly once · I2 one chain · I3 same state · I4 money
//! ```
//! Product crates never depend on this one.
#![forbid(unsafe_code)]

pub mod checker;
pub mod monkey;
pub mod proxy;
