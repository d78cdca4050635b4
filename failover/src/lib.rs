//! Replication and failover around the replica core: the durable Raft log on the WAL, the
//! peer transport, and snapshots streamed in chunks.
//!
//! ```text
//!  tally_core::Replica ◀── shell (pipeline/src/replica_thread.rs) ──▶ storage (WalStorage on the Wal)
//!                                                           ──▶ transport (TLS peer links)
//! ```
//!
//! The consensus decisions live in `tally_core` (raft-rs's `RawNode` over an in-memory log);
//! this crate holds what touches the outside world. Time and randomness come from an
//! [`env::Env`].
//!
//! Modules:
//! - [`config`]: peer settings all replicas share, and the checks applied to what peers send.
//! - [`storage`]: the durable log on the Wal ([`LogStore`]); conf state and members in meta
//!   blobs. A new cluster's log starts with a marker at (1, 1) holding the initial voters, so a
//!   node added later always starts from a snapshot.
//! - [`snapshot`], [`snapshot_stream`]: exports off the replica thread, streamed in chunks.
//! - [`transport`], [`handshake`], [`frame`]: TCP peer links behind the [`Transport`] trait.
//! - [`revocation`]: revoked node certificates, replicated through the log and refused by the
//!   transport.
//! - the leader lease lives in `tally_core::lease` (acks matched to send times).
#![forbid(unsafe_code)]
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod env;
pub mod frame;
pub mod handshake;

pub mod config;
pub mod raft_log_bridge;
pub mod revocation;
pub mod snapshot;
pub mod snapshot_stream;
pub mod storage;
pub mod transport;

pub use config::RaftConfig;
pub use snapshot::SnapshotSource;
pub use storage::{LogStore, MemberAddr};
pub use transport::{TcpTransport, Transport};

/// A replica of the cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    pub is_voter: bool,
    /// Highest index known durable on that replica (leader's view; 0 when unknown).
    pub matched_index: u64,
}

pub use tally_core::MembershipError;
