//! The operator pipeline: seven stages from a client's frame to its receipt.
//!
//! ```text
//!  s1_receive ─▶ s2_validate ─▶ s3_optimistic ─▶ s4_sequence ─▶ s5_propose ─▶ s6_confirm ─▶ s7_apply
//!  (TCP frames,   (rayon, batch   (seen ids,       (one thread,   (propose to   (sign committed  (stored per
//!   per-conn       ed25519)        prefetch)        Merkle,        Replicator)   header, answer)  height; serve
//!   threads)                                        header)                                      receipts)
//! ```
//! Open the files in that order to follow a request. [`node::Node`] wires the stages together.
#![forbid(unsafe_code)]

pub mod failpoint;
pub mod forward;
pub mod measure;
pub mod node;
pub mod s1_receive;
pub mod s2_validate;
pub mod s3_optimistic;
pub mod s4_sequence;
pub mod s5_propose;
pub mod s6_confirm;
pub mod s7_apply;
pub mod snapshots;

pub use node::{Node, NodeOptions};
