//! A simulated disk for one replica's log: it tracks what was written and what was fsynced, so a
//! crash loses exactly what was not fsynced (some prefix of the unsynced writes may survive, as
//! on a real disk, and the last surviving one may be torn: its checksum fails and recovery
//! drops it, as the WAL does).

use rand::Rng;
use rand_chacha::ChaCha20Rng;
use tally_core::{Persist, RestoredLog};

/// One write: a copy of what the replica asked to persist.
#[derive(Clone)]
struct Record {
    persist: PersistCopy,
}

#[derive(Clone)]
struct PersistCopy {
    snapshot: Option<raft::eraftpb::Snapshot>,
    entries: Vec<raft::eraftpb::Entry>,
    hard_state: Option<raft::eraftpb::HardState>,
}

/// What a crash did to the unsynced tail.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CrashLoss {
    pub records_lost: usize,
    pub torn: bool,
}

#[derive(Default, Clone)]
pub struct SimDisk {
    records: Vec<Record>,
    /// Records up to here are durable.
    synced: usize,
}

impl SimDisk {
    pub fn write(&mut self, p: &Persist) {
        self.records.push(Record {
            persist: PersistCopy {
                snapshot: p.snapshot.clone(),
                entries: p.entries.clone(),
                hard_state: p.hard_state.clone(),
            },
        });
    }

    pub fn fsync(&mut self) {
        self.synced = self.records.len();
    }

    pub fn unsynced(&self) -> usize {
        self.records.len() - self.synced
    }

    /// A crash: every unsynced record after a random prefix is gone; with `tear`, the last
    /// surviving unsynced record is torn and dropped at recovery.
    pub fn crash(&mut self, rng: &mut ChaCha20Rng, tear: bool) -> CrashLoss {
        let unsynced = self.unsynced();
        if unsynced == 0 {
            return CrashLoss::default();
        }
        let mut keep = rng.gen_range(0..=unsynced);
        let torn = tear && keep > 0;
        if torn {
            keep -= 1;
        }
        self.records.truncate(self.synced + keep);
        self.synced = self.records.len();
        CrashLoss { records_lost: unsynced - keep, torn }
    }

    /// What recovery reads back.
    pub fn restore(&self) -> RestoredLog {
        RestoredLog {
            records: self
                .records
                .iter()
                .map(|r| Persist {
                    snapshot: r.persist.snapshot.clone(),
                    entries: r.persist.entries.clone(),
                    hard_state: r.persist.hard_state.clone(),
                    sync: true,
                })
                .collect(),
        }
    }
}
