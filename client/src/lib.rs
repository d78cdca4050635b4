//! The tally client library and the guts of the `tally` binary.
//!
//! ```text
//!  tally (main.rs) ─▶ cli ─▶ Client ──failover──▶ Connection ──frames──▶ tallyd
//!                       │        └─ heartbeat thread (Status ≈1 s, events)
//!                       ├─▶ repl   (line parsing + session output, docs/cli.md)
//!                       ├─▶ bench  (load signed as it is sent, hdrhistogram, JSON + PNG)
//!                       ├─▶ cluster::cluster_init, up (local cluster + demo)
//!                       └─▶ keyfile, receipt_file (offline: keygen, verify)
//! ```
//! Everything the server sees goes through `tally_codec`; this crate adds transport, retries and
//! user-facing text.
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod connection;
pub mod coord;
pub mod error;
pub mod keyfile;
pub mod output;
pub mod receipt_file;
pub mod repl;
pub mod txn_file;
pub mod up;

#[cfg(test)]
mod testkit;

pub use client::{Client, ClientEvent, ClientOptions, Committed, ConnectionReport};
pub use cluster::{cluster_init, ClusterLayout};
pub use connection::{Connection, PendingReply};
pub use coord::{ClaimResult, Lease, LeaseKeeper};
pub use error::ClientError;
pub use keyfile::{default_key_path, keygen, load_key, load_or_create};
pub use receipt_file::{
    load_receipt, parse_cluster_id, parse_operator_key, save_receipt, verified_summary, verify_receipt_file,
    verify_receipt_file_for, ReceiptFile,
};
