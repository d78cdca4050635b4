//! A cluster of one: the log is the local WAL, and "a majority fsynced it" means "we fsynced it".
//! Proposals are group-committed: everything queued while one fsync runs goes into the next.

use crate::{Committed, EntryKind, Member, ProposeError, Replicator, Role};
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tally_store::wal::{LogEntry, Wal};

/// Bound on proposals waiting for the log thread.
pub const PROPOSALS_QUEUED_MAX: usize = 64;
/// The single replica's term never changes.
const SOLO_TERM: u64 = 1;

enum Cmd {
    Propose(Vec<u8>),
    Compact(u64),
}

pub struct SoloReplicator {
    node_id: u64,
    client_addr: String,
    tx: Sender<Cmd>,
    commit_index: Arc<AtomicU64>,
    term_start_index: u64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SoloReplicator {
    /// Opens the log thread. Every entry already in `wal` after `applied_index` is redelivered
    /// first (it was durable, so it was committed), then new proposals follow.
    ///
    /// # Errors
    /// When the WAL cannot be read or written.
    pub fn start(
        node_id: u64,
        client_addr: String,
        mut wal: Wal,
        applied_index: u64,
        committed_tx: Sender<Committed>,
    ) -> Result<Self, tally_store::StoreError> {
        let (tx, rx) = bounded(PROPOSALS_QUEUED_MAX);
        // Redeliver the durable suffix the state store has not applied yet.
        let last = wal.last_index();
        assert!(
            applied_index <= last || last < wal.first_index(),
            "store applied {applied_index} past the log end {last}"
        );
        if applied_index < last {
            for e in wal.entries(applied_index.max(wal.first_index() - 1) + 1, last + 1, None)? {
                let kind = if e.data.is_empty() { EntryKind::Noop } else { EntryKind::Batch };
                if committed_tx.send(Committed { index: e.index, term: e.term, kind, data: e.data }).is_err() {
                    break;
                }
            }
        }
        // A no-op marks the start of this run's "term" the way a Raft leader's first entry does.
        let start = last + 1;
        wal.append(&[LogEntry { index: start, term: SOLO_TERM, data: Vec::new() }])?;
        wal.sync()?;
        let _ = committed_tx.send(Committed { index: start, term: SOLO_TERM, kind: EntryKind::Noop, data: Vec::new() });
        let commit_index = Arc::new(AtomicU64::new(start));
        let ci = commit_index.clone();
        let thread = std::thread::Builder::new()
            .name("solo-log".into())
            .spawn(move || run(wal, rx, committed_tx, ci))
            .map_err(|e| tally_store::StoreError::Io { path: "solo-log thread".into(), source: e })?;
        Ok(SoloReplicator {
            node_id,
            client_addr,
            tx,
            commit_index,
            term_start_index: start,
            thread: Mutex::new(Some(thread)),
        })
    }
}

fn run(mut wal: Wal, rx: Receiver<Cmd>, committed_tx: Sender<Committed>, commit_index: Arc<AtomicU64>) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut compact = None;
        let mut next = Some(first);
        while let Some(cmd) = next {
            match cmd {
                Cmd::Propose(data) => batch.push(data),
                Cmd::Compact(i) => compact = Some(i),
            }
            next = rx.try_recv().ok();
        }
        let mut entries = Vec::with_capacity(batch.len());
        let mut index = wal.last_index();
        for data in batch {
            index += 1;
            entries.push(LogEntry { index, term: SOLO_TERM, data });
        }
        if !entries.is_empty() {
            // Nothing is delivered as committed unless the append and the fsync both succeeded.
            if let Err(e) = wal.append(&entries).and_then(|()| wal.sync()) {
                tracing::error!(error = %e, "log write failed; the replica stops committing");
                return;
            }
            commit_index.store(index, Ordering::Release);
            for e in entries {
                if committed_tx
                    .send(Committed { index: e.index, term: e.term, kind: EntryKind::Batch, data: e.data })
                    .is_err()
                {
                    return;
                }
            }
        }
        if let Some(i) = compact {
            let i = i.min(wal.last_index());
            if i >= wal.first_index() {
                if let Err(e) = wal.compact_to(i, SOLO_TERM) {
                    tracing::warn!(error = %e, "log compaction failed");
                }
            }
        }
    }
}

impl Replicator for SoloReplicator {
    fn propose(&self, term: u64, data: Vec<u8>) -> Result<(), ProposeError> {
        if term != SOLO_TERM {
            return Err(ProposeError::NotLeader { leader: Some(self.node_id) });
        }
        assert!(!data.is_empty(), "a batch entry is never empty");
        match self.tx.try_send(Cmd::Propose(data)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ProposeError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(ProposeError::Stopped("log thread ended".into())),
        }
    }

    fn role(&self) -> Role {
        Role {
            node_id: self.node_id,
            term: SOLO_TERM,
            leader_id: Some(self.node_id),
            is_leader: true,
            term_start_index: self.term_start_index,
            commit_index: self.commit_index.load(Ordering::Acquire),
        }
    }

    fn lease_valid(&self) -> bool {
        true
    }

    fn members(&self) -> Vec<Member> {
        vec![Member {
            node_id: self.node_id,
            client_addr: self.client_addr.clone(),
            peer_addr: String::new(),
            is_voter: true,
            matched_index: self.commit_index.load(Ordering::Acquire),
        }]
    }

    fn durable_replicas(&self, index: u64) -> u8 {
        u8::from(index <= self.commit_index.load(Ordering::Acquire))
    }

    fn voters(&self) -> usize {
        1
    }

    fn compact_hint(&self, index: u64) {
        let _ = self.tx.try_send(Cmd::Compact(index));
    }
}

impl Drop for SoloReplicator {
    fn drop(&mut self) {
        // Closing the channel ends the thread after it drains.
        let (dead_tx, _) = bounded(1);
        drop(std::mem::replace(&mut self.tx, dead_tx));
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_store::wal::WalOptions;

    /// Once the store is durable up to an index, the log forgets what is below it (whole
    /// segment files) and a restart resumes after the marker.
    #[test]
    fn compaction_hint_drops_old_segments() {
        let dir = tempfile::tempdir().expect("tmp");
        let opts = WalOptions { segment_bytes_max: 4096, fsync: false };
        let (tx, rx) = crossbeam::channel::bounded(1024);
        let wal = Wal::open(dir.path(), opts).expect("open");
        let solo = SoloReplicator::start(1, "127.0.0.1:1".into(), wal, 0, tx).expect("start");
        for i in 0..200u32 {
            solo.propose(SOLO_TERM, vec![7u8; 100 + (i % 3) as usize]).expect("propose");
            let _ = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("committed");
        }
        let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
        let segments_before = std::fs::read_dir(dir.path()).expect("ls").count();
        solo.compact_hint(150);
        // The hint is handled with the next proposal's group.
        solo.propose(SOLO_TERM, vec![1]).expect("propose");
        let _ = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("committed");
        drop(solo);
        let wal = Wal::open(dir.path(), opts).expect("reopen");
        assert!(wal.first_index() > 100, "log still starts at {}", wal.first_index());
        let segments_after = std::fs::read_dir(dir.path()).expect("ls").count();
        assert!(segments_after < segments_before, "{segments_after} files, was {segments_before}");
    }
}
