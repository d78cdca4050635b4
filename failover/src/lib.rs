//! Replication and failover: the seam between the pipeline and the replicated log.
//!
//! ```text
//!  pipeline (leader)            failover                          every replica
//!  ─────────────────            ────────                          ─────────────
//!  stage 4 ──propose(entry)──▶ Replicator ──▶ log (fsync) ──▶ Committed{index,term,data}
//!        ◀──role()/lease────                 peers (raft)        └─▶ pipeline applier
//! ```
//!
//! The pipeline never talks to raft-rs directly. It proposes encoded batches, reads the role
//! (term, leader, lease), and consumes committed entries, in order, from a channel. A
//! single-replica cluster and a Raft cluster implement the same trait. Time and randomness come
//! from an [`env::Env`], so a seeded simulation can drive failover exactly.
//!
//! Modules, in the order a message travels:
//! - [`solo`]: the one-replica log (no Raft).
//! - [`node`]: [`RaftReplicator`], the raft-rs loop (ready handling, ticks, membership).
//! - [`storage`]: raft-rs `Storage` on the Wal ([`LogStore`]); conf state and members in meta
//!   blobs. A new cluster's log starts with a snapshot marker at (1, 1) holding the initial
//!   voters, so a node added later always starts from a snapshot.
//! - [`snapshot`]: [`SnapshotSource`] / [`SnapshotSink`], state transfer with the pipeline.
//! - the leader lease lives in `tally_core::lease` (acks matched to send times).
//! - [`transport`], [`handshake`], [`frame`]: TCP peer links behind the [`Transport`] trait.
//!
//! The Raft log's entry encoding (see [`storage`]) differs from [`solo`]'s raw entries: a data
//! directory cannot switch between the two.
#![forbid(unsafe_code)]
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod env;
pub mod frame;
pub mod handshake;

pub mod node;
pub mod raft_log_bridge;
pub mod snapshot;
pub mod snapshot_stream;
pub mod solo;
pub mod storage;
pub mod transport;

pub use node::{FailoverError, RaftConfig, RaftReplicator};
pub use snapshot::{NoSnapshots, SnapshotSink, SnapshotSource, StateSnapshots};
pub use storage::{LogStore, MemberAddr};
pub use transport::{TcpTransport, Transport};

use std::fmt;

/// What a committed log entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// An encoded `BatchEntry`.
    Batch,
    /// A Raft no-op (new leader) or membership change: advances the applied index only.
    Noop,
}

/// One committed entry, delivered to the applier in log order, exactly once per process run.
#[derive(Debug, Clone)]
pub struct Committed {
    pub index: u64,
    pub term: u64,
    pub kind: EntryKind,
    pub data: Vec<u8>,
}

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
    /// The first index of this leader's term (its no-op). The leader may execute new batches
    /// only once everything before it is applied.
    pub term_start_index: u64,
    pub commit_index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("proposal queue full")]
    Busy,
    #[error("replication stopped: {0}")]
    Stopped(String),
    /// The entry would not fit one peer frame.
    #[error("entry of {bytes} bytes is over the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
}

/// Why a membership change did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("membership changes need a Raft cluster")]
    Unsupported,
    #[error("not the leader")]
    NotLeader,
    #[error("node id 0 is reserved")]
    ReservedId,
    #[error("node {0} is already a voter")]
    AlreadyVoter(u64),
    #[error("node {node} is not reachable as a replica of this cluster: {reason}")]
    Unreachable { node: u64, reason: String },
    #[error("the raft thread is busy or stopped")]
    Busy,
    #[error("conf change refused: {0}")]
    Refused(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("replicator stopped: {0}")]
    Stopped(String),
    /// A learner was proposed but never caught up; it was removed again.
    #[error("{cause}; node {node} was not added")]
    NotAdded { node: u64, cause: Box<MembershipError> },
}

/// The replicated log as the pipeline sees it.
pub trait Replicator: Send + Sync {
    /// Appends `data` (an encoded batch) to the log if this replica leads in `term`. The entry
    /// comes back through the committed channel once a majority holds it durably, or never.
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`] when this replica is not the leader of `term`.
    fn propose(&self, term: u64, data: Vec<u8>) -> Result<(), ProposeError>;
    fn role(&self) -> Role;
    /// Whether the leader's lease covers now: a linearizable read may be served locally.
    fn lease_valid(&self) -> bool;
    fn members(&self) -> Vec<Member>;
    /// How many replicas hold `index` durably (this one included), as far as this replica knows.
    fn durable_replicas(&self, index: u64) -> u8;
    /// Number of voters configured.
    fn voters(&self) -> usize;
    /// Why this replica stopped replicating (a failed log write or fsync, a full disk), if it
    /// did. A stopped replica sends nothing, so a leader's followers elect another.
    fn stopped(&self) -> Option<String> {
        None
    }
    /// The leader's commit index as far as this replica knows (its own commit index when it
    /// leads or runs alone). Readiness compares the applied index with it.
    fn leader_commit_index(&self) -> u64 {
        self.role().commit_index
    }
    /// Tells the log the state machine is durable up to `index` (store fsynced), so entries up to
    /// there may be compacted.
    fn compact_hint(&self, index: u64);
    /// Adds a voter (joint consensus). Returns once the change is committed.
    ///
    /// # Errors
    /// When not leader or the change fails.
    fn add_member(&self, member: Member) -> Result<(), MembershipError> {
        let _ = member;
        Err(MembershipError::Unsupported)
    }
    /// Removes a voter. Returns once the change is committed.
    ///
    /// # Errors
    /// When not leader or the change fails.
    fn remove_member(&self, node_id: u64) -> Result<(), MembershipError> {
        let _ = node_id;
        Err(MembershipError::Unsupported)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.leader_id {
            Some(l) => write!(f, "leader: node {l}, term {}", self.term),
            None => write!(f, "leader: none, term {}", self.term),
        }
    }
}
