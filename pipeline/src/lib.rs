//! The operator pipeline's shell: from a client's frame to its receipt.
//!
//! ```text
//!  client_port ─▶ validate ──────▶ replica_thread ─────────▶ tally_core::Replica
//!  (TCP frames,    (rayon, batch    (events in, effects      (stages 3–7: optimistic checks,
//!   per-conn        ed25519)         out: peers, WAL, store,  sequence, propose, confirm, apply;
//!   threads)                         replies)                 Raft, leases, membership)
//! ```
//! Open the files in that order to follow a request (stages 1 and 2, then the thread that runs
//! the core); the core's stages are in `core/src`. `store_ledger` is the core's ledger on the
//! store, `forward` relays a follower's clients to the leader, `queries` and `watch` serve reads
//! of the store. The replica thread publishes its status on a [`status::StatusBoard`] that
//! everyone else reads, and answers the client port's questions (membership, read judgements)
//! through [`control::ReplicaControl`]. [`node::Node`] wires them together.
#![forbid(unsafe_code)]
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod admin_replay;
pub mod client_port;
pub mod control;
pub mod failpoint;
pub mod forward;
pub mod measure;
pub mod node;
pub mod queries;
pub mod replica_thread;
pub mod status;
pub mod store_ledger;
pub mod validate;
pub mod warming;
pub mod watch;

pub use node::{Node, NodeOptions};
