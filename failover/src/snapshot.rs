//! State transfer between the pipeline and Raft snapshots.
//!
//! A follower that needs entries the leader already compacted receives a Raft snapshot. Its data
//! is a [`SnapshotEnvelope`]: the members' addresses (a joining node learns the cluster from it)
//! and the state machine's own bytes, which only the pipeline understands.

use crate::storage::MemberAddr;
use borsh::{BorshDeserialize, BorshSerialize};

/// Produces the state machine's snapshot on the leader.
pub trait SnapshotSource: Send + Sync {
    /// The applied state as `(index, term, bytes)`: the index and term of the last entry it
    /// includes. Called on the raft thread; keep it quick or serve a cached snapshot.
    ///
    /// # Errors
    /// When no snapshot can be produced now; Raft retries later.
    fn snapshot(&self) -> Result<(u64, u64, Vec<u8>), String>;
}

/// Installs a snapshot on a follower.
pub trait SnapshotSink: Send + Sync {
    /// Replaces the state machine with `data` (the state after entry `index` of `term`), durably,
    /// before returning. Called on the raft thread after every earlier [`crate::Committed`]
    /// entry was sent on the committed channel (the applier may still be working through them;
    /// the sink must order the install after them). Entries after `index` follow on the
    /// committed channel.
    ///
    /// # Errors
    /// When the state cannot be installed; the replica then stops replicating.
    fn install(&self, index: u64, term: u64, data: &[u8]) -> Result<(), String>;

    /// Judges a batch entry's data as it arrives from the leader, before it is persisted or
    /// acknowledged: an entry that would not apply (not a batch of this cluster, inconsistent)
    /// is refused here rather than wedging the replica when it commits. The default accepts
    /// anything (replicators without a state machine).
    ///
    /// # Errors
    /// Why the entry can never be applied.
    fn check_entry(&self, _data: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Judges a snapshot's state bytes before anything of it is installed. Default: anything.
    ///
    /// # Errors
    /// Why the snapshot can never be installed.
    fn check_snapshot(&self, _state: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// Both halves; what the replicator is given.
pub trait StateSnapshots: SnapshotSource + SnapshotSink {}
impl<T: SnapshotSource + SnapshotSink> StateSnapshots for T {}

/// For replicas without state transfer: a follower that fell behind the compacted log cannot
/// catch up and says so in the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSnapshots;

impl SnapshotSource for NoSnapshots {
    fn snapshot(&self) -> Result<(u64, u64, Vec<u8>), String> {
        Err("this replica has no snapshot source".into())
    }
}

impl SnapshotSink for NoSnapshots {
    fn install(&self, index: u64, _term: u64, _data: &[u8]) -> Result<(), String> {
        Err(format!("this replica cannot install a snapshot (at index {index})"))
    }
}

/// What a Raft snapshot's data holds.
#[derive(Debug, Clone, BorshSerialize, BorshDeserialize)]
pub struct SnapshotEnvelope {
    pub members: Vec<MemberAddr>,
    pub state: Vec<u8>,
}
