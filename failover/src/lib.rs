//! Who leads, for how long, and who is a member, and how a replica reaches its peers: tally's
//! replication and failover around raft-rs.
//!
//! ```text
//!                   I/O-free decisions (always built; tally_core's replica drives them)
//!  raft_log ─ the replica's Raft log in memory (raft-rs `Storage`)
//!  election ─ seeded timeouts, a campaign when the leader is reported down, the term budget
//!  lease ──── the leader lease: acks matched to send times, a drift margin, the probe context
//!  membership the learner → catch-up → promote flow, one change at a time
//!  peer_gate ─ peer messages judged before raft-rs sees them
//!  failure ── why the log stopped (`LogFailure`, with the OS error kind)
//!
//!                   I/O (feature `io`, on by default; the shell and the tools use it)
//!  storage ── the durable Raft log on the WAL ─┐
//!  transport, handshake, frame ── TLS peer links ├─ pipeline/src/replica_thread.rs wires them
//!  snapshot, snapshot_stream ── chunked state    ┘
//!  revocation ── revoked node certificates, refused by the transport
//! ```
//!
//! `tally_core` depends on this crate without `io`, so the replica core and the simulator
//! compile none of the I/O (`core/tests/io_free.rs` checks the dependency tree). Time and
//! randomness come from the caller (the decisions) or an [`env::Env`] (the I/O).
//!
//! Modules with I/O:
//! - [`config`]: peer settings all replicas share, and the checks applied to what peers send.
//! - [`storage`]: the durable log on the Wal ([`LogStore`]); conf state and members in meta
//!   blobs. A new cluster's log starts with a marker at (1, 1) holding the initial voters, so a
//!   node added later always starts from a snapshot.
//! - [`snapshot`], [`snapshot_stream`]: exports off the replica thread, streamed in chunks.
//! - [`transport`], [`handshake`], [`frame`]: TCP peer links behind the [`Transport`] trait.
//! - [`revocation`]: revoked node certificates, replicated through the log and refused by the
//!   transport.
#![forbid(unsafe_code)]
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod election;
pub mod failure;
pub mod lease;
pub mod membership;
pub mod peer_gate;
pub mod raft_log;

pub use failure::LogFailure;
pub use membership::{MemberChange, MembershipError};
pub use peer_gate::Refusal;

/// Declares the modules that touch the outside world, each built only with the `io` feature.
macro_rules! io_modules {
    ($($m:ident),* $(,)?) => { $( #[cfg(feature = "io")] pub mod $m; )* };
}

io_modules!(config, env, frame, handshake, raft_log_bridge, revocation, snapshot, snapshot_stream, storage, transport);

#[cfg(feature = "io")]
pub use config::RaftConfig;
#[cfg(feature = "io")]
pub use snapshot::SnapshotSource;
#[cfg(feature = "io")]
pub use storage::{LogStore, MemberAddr};
#[cfg(feature = "io")]
pub use transport::{TcpTransport, Transport};

/// A replica of the cluster as configured.
#[cfg(feature = "io")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    pub is_voter: bool,
    /// Highest index known durable on that replica (leader's view; 0 when unknown).
    pub matched_index: u64,
}
