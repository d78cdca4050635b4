//! The Raft log as raft-rs reads it: entries in memory (raft-rs's `MemStorage`), made durable by
//! the shell through the core's `Effect::Persist`, plus state snapshots built from the ledger for
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
        // A snapshot is of use only if the log goes on right after it: at or past the entry
        // before the first one kept. Asking for less let a stale export (at an index the log
        // has since compacted past) be prepared again and again, and a follower that needed a
        // second snapshot waited forever.
        let at_least = request_index.max(self.mem.first_index()? - 1).max(1);
        if let Some(s) = self.prepared.borrow().as_ref() {
            if s.get_metadata().index >= at_least {
                return Ok(s.clone());
            }
        }
        self.wanted.set(at_least);
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_at(index: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = 1;
        s
    }

    fn log_from(first: u64, last: u64) -> CoreLog {
        let log = CoreLog::new(MemStorage::new());
        log.mem.wl().apply_snapshot(snapshot_at(first - 1)).expect("the base");
        let entries: Vec<Entry> = (first..=last)
            .map(|index| {
                let mut e = Entry::default();
                e.index = index;
                e.term = 1;
                e
            })
            .collect();
        log.mem.wl().append(&entries).expect("appended");
        log
    }

    /// A snapshot prepared before the log was compacted past it is not handed out again, and
    /// what is asked for is one the log goes on from. Before, the ask was "index 1 or later",
    /// which the stale export held by the ledger satisfied forever (a replica added to a
    /// cluster with large state stalled after its first snapshot).
    #[test]
    fn a_snapshot_behind_the_compacted_log_is_not_reused() {
        let log = log_from(10, 40);
        log.prepare_snapshot(snapshot_at(20));
        assert_eq!(log.snapshot(0, 4).expect("usable").get_metadata().index, 20, "the log goes on after 20");
        log.mem.wl().compact(30).expect("compacted");
        assert!(log.snapshot(0, 4).is_err(), "20 is behind the log's first entry, 30");
        assert_eq!(log.snapshot_wanted(), 29, "one the log goes on from is asked for");
        log.prepare_snapshot(snapshot_at(35));
        assert_eq!(log.snapshot(0, 4).expect("ready").get_metadata().index, 35);
        assert!(log.snapshot(38, 4).is_err(), "raft-rs may ask for a later one");
        assert_eq!(log.snapshot_wanted(), 38);
    }
}
