//! The tally client library: what a program embedding a tally client needs, and nothing of the
//! `tally` command line (that is the `tally-cli` crate).
//!
//! ```text
//!  your program ─▶ Client ──failover──▶ Connection ──frames──▶ tallyd
//!                    │  └─ heartbeat thread (Status ≈1 s, events)
//!                    ├─▶ coord     (leases, compare-and-set, claims, watches)
//!                    └─▶ sign_request / sign_admin (request signing)
//!  keyfile, receipt_file, txn_file: the files a user holds (keys, receipts to verify offline,
//!  transactions to submit)
//! ```
//! Everything the server sees goes through `tally_codec`; this crate adds transport, retries and
//! the user's files.
#![forbid(unsafe_code)]

pub mod client;
pub mod connection;
pub mod coord;
pub mod error;
pub mod keyfile;
pub mod receipt_file;
pub mod txn_file;

/// An in-process fake node for tests, here and in `tally-cli` (feature `testkit`).
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;

pub use client::{Client, ClientEvent, ClientOptions, Committed, ConnectionReport};
pub use connection::{Connection, PendingReply};
pub use coord::{ClaimResult, Lease, LeaseKeeper};
pub use error::ClientError;
pub use keyfile::{default_key_path, keygen, load_key, load_or_create};
pub use receipt_file::{
    load_receipt, parse_cluster_id, parse_operator_key, save_receipt, verified_summary, verify_receipt_file,
    verify_receipt_file_for, ReceiptFile,
};
