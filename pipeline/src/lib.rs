//! The operator pipeline's shell: from a client's frame to its receipt.
//!
//! ```text
//!  s1_receive ─▶ s2_validate ─▶ shell (replica thread) ─▶ tally_core::Replica
//!  (TCP frames,   (rayon, batch   (events in, effects      (stages 3–7: optimistic checks,
//!   per-conn       ed25519)        out: peers, WAL, store,   sequence, propose, confirm, apply;
//!   threads)                       replies)                  Raft, leases, membership)
//! ```
//! Open the files in that order to follow a request; the core's stages are in `core/src`.
//! [`node::Node`] wires them together.
#![forbid(unsafe_code)]
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod admin_replay;
pub mod failpoint;
pub mod forward;
pub mod ledger;
pub mod measure;
pub mod node;
pub mod queries;
pub mod s1_receive;
pub mod s2_validate;
pub mod shell;
pub mod watch;

pub use node::{Node, NodeOptions};
