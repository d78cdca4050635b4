//! Replication and failover around the replica core: the durable Raft log on the WAL, the
//! peer transport, snapshots streamed in chunks, and the handle the client port reads.
//!
//! ```text
//!  tally_core::Replica ◀── shell (pipeline/src/replica_thread.rs) ──▶ storage (WalStorage on the Wal)
//!                                  │                        ──▶ transport (TLS peer links)
//!                                  └── Replicator (role, lease, members) ◀── client port
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

use std::fmt;

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

/// A snapshot of who leads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Role {
    pub node_id: u64,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub is_leader: bool,
    pub commit_index: u64,
}

pub use tally_core::MembershipError;

/// The replica as the client port sees it: who leads, the lease, the members, membership
/// changes. The replica thread publishes what these read.
pub trait Replicator: Send + Sync {
    fn role(&self) -> Role;
    /// A linearizable read, judged by the replica now: the log index this replica's state must
    /// have applied before it serves the read (a leader under its lease answers its commit
    /// index), or why it may not serve it.
    ///
    /// # Errors
    /// `NotLeader` (with no lease), or `Overloaded` when the replica cannot judge it in time.
    fn read_index(&self) -> Result<u64, tally_codec::wire::WireError>;
    fn members(&self) -> Vec<Member>;
    /// How many replicas hold `index` durably (this one included), as far as this replica knows.
    fn durable_replicas(&self, index: u64) -> u8;
    /// Number of voters configured.
    fn voters(&self) -> usize;
    /// Why this replica stopped replicating (a failed log write or fsync, a full disk), if it
    /// did. A stopped replica sends nothing, so a leader's followers elect another.
    fn stopped(&self) -> Option<tally_core::LogFailure> {
        None
    }
    /// The leader's commit index as far as this replica knows (its own commit index when it
    /// leads or runs alone). Readiness compares the applied index with it.
    fn leader_commit_index(&self) -> u64 {
        self.role().commit_index
    }
    /// Adds a voter (joint consensus). Returns once the change is committed.
    ///
    /// # Errors
    /// When not leader or the change fails.
    fn add_member(&self, member: Member) -> Result<(), MembershipError>;
    /// Removes a voter. Returns once the change is committed.
    ///
    /// # Errors
    /// When not leader or the change fails.
    fn remove_member(&self, node_id: u64) -> Result<(), MembershipError>;
    /// Removes `node_id` (if it is a member) and revokes its certificate with fingerprint
    /// `cert_fingerprint` on every replica. Returns once both are committed and applied here.
    ///
    /// # Errors
    /// When not leader, the change fails, or too many certificates are revoked already.
    fn revoke_member(&self, node_id: u64, cert_fingerprint: [u8; 32]) -> Result<(), MembershipError>;
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.leader_id {
            Some(l) => write!(f, "leader: node {l}, term {}", self.term),
            None => write!(f, "leader: none, term {}", self.term),
        }
    }
}
