//! The Raft log as raft-rs reads it: entries in memory (raft-rs's `MemStorage`), made durable by
//! the shell through [`crate::Effect::Persist`], plus state snapshots built from the ledger for
//! followers that fell behind the log's first index.
//!
//! raft-rs asks for a snapshot from inside `step`/`tick`, where the ledger is out of reach; the
//! first request fails as temporarily unavailable and records what is wanted, the replica builds
//! the snapshot from its ledger after the event, and raft-rs's next attempt gets it.

use raft::eraftpb::{Entry, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use std::cell::{Cell, RefCell};

pub struct CoreLog {
    pub mem: MemStorage,
    prepared: RefCell<Option<Snapshot>>,
    wanted: Cell<u64>,
}

impl CoreLog {
    pub fn new(mem: MemStorage) -> Self {
        CoreLog { mem, prepared: RefCell::new(None), wanted: Cell::new(0) }
    }
    /// The index a snapshot was asked for and not yet prepared (0: none).
    pub fn snapshot_wanted(&self) -> u64 {
        self.wanted.get()
    }
    pub fn prepare_snapshot(&self, s: Snapshot) {
        self.wanted.set(0);
        *self.prepared.borrow_mut() = Some(s);
    }
}

impl Storage for CoreLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if let Some(s) = self.prepared.borrow().as_ref() {
            if s.get_metadata().index >= request_index && s.get_metadata().index >= self.mem.first_index()? - 1 {
                return Ok(s.clone());
            }
        }
        self.wanted.set(request_index.max(1));
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}
