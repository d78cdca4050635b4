//! Raft's view of the durable log: [`WalStorage`] implements [`raft::Storage`] on a
//! [`LogStore`] (production: [`tally_store::Wal`]), and persists what raft-rs leaves to the
//! application: the conf state (with the index it took effect at) and the members' addresses.
//!
//! ```text
//!  raft-rs ──Storage (reads)──▶ WalStorage ──▶ LogStore (Wal: entries, marker, hard state)
//!  ready loop ──append/sync/set_hard_state/set_conf/apply_snapshot──▶      └─ meta blobs:
//!                                                         raft-conf (history), raft-members
//! ```
//!
//! Log entry data on disk: `[]` is an empty normal entry (a leader's no-op); `0x00 ‖ data` is a
//! normal entry; `0x01 ‖ protobuf(Entry)` is anything else (conf changes, entries with context).

use crate::snapshot::{SnapshotEnvelope, StateSnapshots};
use borsh::{BorshDeserialize, BorshSerialize};
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::storage::{GetEntriesContext, RaftState, Storage};
use raft::{Error as RaftError, StorageError};
use std::collections::BTreeMap;
use std::sync::Arc;
use tally_store::wal::{HardStateRecord, LogEntry, Wal};
use tally_store::StoreError;

/// Meta blob holding the conf-state history.
pub const CONF_BLOB: &str = "raft-conf";
/// Meta blob holding the members' addresses.
pub const MEMBERS_BLOB: &str = "raft-members";
/// The initial voters' configuration takes effect at this index (a no-op for the state).
pub const BOOTSTRAP_INDEX: u64 = 1;
/// The term of the bootstrap marker.
pub const BOOTSTRAP_TERM: u64 = 1;
/// Conf states kept, newest last, so a snapshot at an older index carries the right one.
pub const CONF_HISTORY_MAX: usize = 16;
/// Bound on decoding a meta blob.
const META_DECODE_BYTES_MAX: usize = 1024 * 1024;

const TAG_NORMAL: u8 = 0x00;
const TAG_PROTOBUF: u8 = 0x01;

/// The durable log as failover needs it. [`Wal`] is the production implementation; a simulator
/// can substitute a faulty or in-memory one.
#[allow(missing_docs)]
pub trait LogStore: Send {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StoreError>;
    fn sync(&mut self) -> Result<(), StoreError>;
    fn first_index(&self) -> u64;
    fn last_index(&self) -> u64;
    fn term(&self, index: u64) -> Result<Option<u64>, StoreError>;
    fn entries(&self, lo: u64, hi: u64, bytes_max: Option<u64>) -> Result<Vec<LogEntry>, StoreError>;
    fn compact_to(&mut self, index: u64, term: u64) -> Result<(), StoreError>;
    fn snapshot_marker(&self) -> (u64, u64);
    fn hard_state(&self) -> HardStateRecord;
    fn set_hard_state(&mut self, hs: HardStateRecord) -> Result<(), StoreError>;
    fn meta_blob(&self, name: &str) -> Option<Vec<u8>>;
    fn set_meta_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError>;
}

impl LogStore for Wal {
    fn append(&mut self, entries: &[LogEntry]) -> Result<(), StoreError> {
        Wal::append(self, entries)
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        Wal::sync(self)
    }
    fn first_index(&self) -> u64 {
        Wal::first_index(self)
    }
    fn last_index(&self) -> u64 {
        Wal::last_index(self)
    }
    fn term(&self, index: u64) -> Result<Option<u64>, StoreError> {
        Wal::term(self, index)
    }
    fn entries(&self, lo: u64, hi: u64, bytes_max: Option<u64>) -> Result<Vec<LogEntry>, StoreError> {
        Wal::entries(self, lo, hi, bytes_max)
    }
    fn compact_to(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        Wal::compact_to(self, index, term)
    }
    fn snapshot_marker(&self) -> (u64, u64) {
        Wal::snapshot_marker(self)
    }
    fn hard_state(&self) -> HardStateRecord {
        Wal::hard_state(self)
    }
    fn set_hard_state(&mut self, hs: HardStateRecord) -> Result<(), StoreError> {
        Wal::set_hard_state(self, hs)
    }
    fn meta_blob(&self, name: &str) -> Option<Vec<u8>> {
        Wal::meta_blob(self, name)
    }
    fn set_meta_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        Wal::set_meta_blob(self, name, bytes)
    }
}

/// Where a member can be reached. Carried in conf-change contexts and snapshots.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct MemberAddr {
    pub node_id: u64,
    pub client_addr: String,
    pub peer_addr: String,
}

#[derive(BorshSerialize, BorshDeserialize)]
struct ConfHistory {
    /// `(index the conf state took effect at, protobuf ConfState)`, ascending.
    entries: Vec<(u64, Vec<u8>)>,
}

fn store_err(e: StoreError) -> RaftError {
    match e {
        StoreError::Compacted { .. } => RaftError::Store(StorageError::Compacted),
        StoreError::Unavailable { .. } => RaftError::Store(StorageError::Unavailable),
        other => RaftError::Store(StorageError::Other(Box::new(other))),
    }
}

/// Encodes a raft entry's payload for the log (see the module docs).
pub fn encode_entry(e: &Entry) -> Result<Vec<u8>, RaftError> {
    if e.get_entry_type() == EntryType::EntryNormal && e.context.is_empty() {
        if e.data.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(1 + e.data.len());
        out.push(TAG_NORMAL);
        out.extend_from_slice(&e.data);
        return Ok(out);
    }
    let mut bare = Entry::default();
    bare.set_entry_type(e.get_entry_type());
    bare.data = e.data.clone();
    bare.context = e.context.clone();
    let mut out = vec![TAG_PROTOBUF];
    out.extend_from_slice(&bare.write_to_bytes()?);
    Ok(out)
}

/// Decodes a log record back into a raft entry.
///
/// # Errors
/// When the record has an unknown tag or a bad protobuf body (corruption or a foreign log).
pub fn decode_entry(le: &LogEntry) -> Result<Entry, RaftError> {
    let mut e = match le.data.first() {
        None => Entry::default(),
        Some(&TAG_NORMAL) => {
            let mut e = Entry::default();
            e.data = le.data[1..].to_vec().into();
            e
        }
        Some(&TAG_PROTOBUF) => Entry::parse_from_bytes(&le.data[1..])?,
        Some(tag) => {
            return Err(RaftError::Store(StorageError::Other(
                format!("log entry {} has unknown tag {tag:#x}", le.index).into(),
            )))
        }
    };
    e.index = le.index;
    e.term = le.term;
    Ok(e)
}

/// Conf-state helpers: raft-rs's `ConfState` has no `PartialEq` on content order, so compare
/// sorted id lists.
pub fn conf_ids(cs: &ConfState) -> Vec<u64> {
    let mut ids: Vec<u64> =
        cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing).chain(&cs.learners_next).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The Raft storage over the durable log. Owned by the raft thread (inside the `RawNode`).
pub struct WalStorage {
    log: Box<dyn LogStore>,
    /// Newest last; never empty once initialised.
    conf_history: Vec<(u64, ConfState)>,
    members: BTreeMap<u64, MemberAddr>,
    snapshots: Arc<dyn StateSnapshots>,
}

impl WalStorage {
    /// Loads the conf state and members from the log's meta blobs. On a fresh log,
    /// `bootstrap` (the initial voters) becomes the conf state at index 0; a node that is not an
    /// initial voter passes `None` and waits to be added by the leader.
    ///
    /// # Errors
    /// When a meta blob does not decode or cannot be written.
    pub fn open(
        log: Box<dyn LogStore>,
        bootstrap: Option<ConfState>,
        known: &[MemberAddr],
        snapshots: Arc<dyn StateSnapshots>,
    ) -> Result<Self, RaftError> {
        let mut conf_history = Vec::new();
        if let Some(bytes) = log.meta_blob(CONF_BLOB) {
            let h: ConfHistory = tally_codec::decode(&bytes, META_DECODE_BYTES_MAX)
                .map_err(|e| RaftError::ConfigInvalid(format!("conf-state blob does not decode: {e}")))?;
            for (index, pb) in h.entries {
                conf_history.push((index, ConfState::parse_from_bytes(&pb)?));
            }
        }
        let mut members = BTreeMap::new();
        for m in known {
            members.insert(m.node_id, m.clone());
        }
        if let Some(bytes) = log.meta_blob(MEMBERS_BLOB) {
            let stored: Vec<MemberAddr> = tally_codec::decode(&bytes, META_DECODE_BYTES_MAX)
                .map_err(|e| RaftError::ConfigInvalid(format!("members blob does not decode: {e}")))?;
            // The log's record wins: it follows membership changes the config file never saw.
            for m in stored {
                members.insert(m.node_id, m);
            }
        }
        let fresh = conf_history.is_empty() && log.last_index() == 0;
        let mut s = WalStorage { log, conf_history, members, snapshots };
        if fresh {
            if let Some(cs) = bootstrap {
                // The initial configuration is a snapshot at (1, 1), as if entry 1 had been
                // compacted: a node that joins later has no entry to replay it from, so the
                // leader must send it a snapshot, which carries the configuration.
                s.log.compact_to(BOOTSTRAP_INDEX, BOOTSTRAP_TERM).map_err(store_err)?;
                let hs = HardStateRecord { term: BOOTSTRAP_TERM, vote: 0, commit: BOOTSTRAP_INDEX };
                s.log.set_hard_state(hs).map_err(store_err)?;
                s.set_conf_state(BOOTSTRAP_INDEX, cs)?;
            }
            s.persist_members()?;
        }
        Ok(s)
    }

    /// The conf state in force now (empty for a node waiting to join).
    pub fn conf_state(&self) -> ConfState {
        self.conf_history.last().map(|(_, cs)| cs.clone()).unwrap_or_default()
    }

    /// Index the current conf state took effect at: committed conf changes at or below it are
    /// already applied and must not be applied again after a restart.
    pub fn conf_index(&self) -> u64 {
        self.conf_history.last().map_or(0, |(i, _)| *i)
    }

    /// The conf state in force at `index`, if the history still reaches back that far.
    pub fn conf_at(&self, index: u64) -> Option<ConfState> {
        self.conf_history.iter().rev().find(|(i, _)| *i <= index).map(|(_, cs)| cs.clone())
    }

    pub fn members(&self) -> &BTreeMap<u64, MemberAddr> {
        &self.members
    }

    pub fn log(&self) -> &dyn LogStore {
        self.log.as_ref()
    }

    /// Records a conf state applied at `index`, durably.
    ///
    /// # Errors
    /// When the meta blob cannot be written.
    pub fn set_conf_state(&mut self, index: u64, cs: ConfState) -> Result<(), RaftError> {
        assert!(index >= self.conf_index(), "conf state at {index} goes back before {}", self.conf_index());
        self.conf_history.push((index, cs));
        if self.conf_history.len() > CONF_HISTORY_MAX {
            let excess = self.conf_history.len() - CONF_HISTORY_MAX;
            self.conf_history.drain(..excess);
        }
        self.persist_conf()
    }

    fn persist_conf(&mut self) -> Result<(), RaftError> {
        let mut entries = Vec::with_capacity(self.conf_history.len());
        for (i, cs) in &self.conf_history {
            entries.push((*i, cs.write_to_bytes()?));
        }
        let bytes = tally_codec::encode(&ConfHistory { entries });
        self.log.set_meta_blob(CONF_BLOB, &bytes).map_err(store_err)
    }

    /// Adds or updates a member's addresses, durably.
    ///
    /// # Errors
    /// When the meta blob cannot be written.
    pub fn upsert_member(&mut self, m: MemberAddr) -> Result<(), RaftError> {
        if self.members.get(&m.node_id) == Some(&m) {
            return Ok(());
        }
        self.members.insert(m.node_id, m);
        self.persist_members()
    }

    /// Forgets the addresses of nodes no longer in the configuration.
    ///
    /// # Errors
    /// When the meta blob cannot be written.
    pub fn retain_members(&mut self, keep: &[u64], self_id: u64) -> Result<(), RaftError> {
        let before = self.members.len();
        self.members.retain(|id, _| *id == self_id || keep.contains(id));
        if self.members.len() != before {
            self.persist_members()?;
        }
        Ok(())
    }

    fn persist_members(&mut self) -> Result<(), RaftError> {
        let list: Vec<MemberAddr> = self.members.values().cloned().collect();
        self.log.set_meta_blob(MEMBERS_BLOB, &tally_codec::encode(&list)).map_err(store_err)
    }

    /// Appends unstable entries (the log truncates a conflicting suffix). Not durable until
    /// [`Self::sync`].
    ///
    /// # Errors
    /// Log write errors.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), RaftError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(LogEntry { index: e.index, term: e.term, data: encode_entry(e)? });
        }
        self.log.append(&out).map_err(store_err)?;
        assert_eq!(self.log.last_index(), entries[entries.len() - 1].index, "append must end at the last entry");
        Ok(())
    }

    /// # Errors
    /// Fsync failure (the log is then poisoned).
    pub fn sync(&mut self) -> Result<(), RaftError> {
        self.log.sync().map_err(store_err)
    }

    /// Stores term, vote and commit durably.
    ///
    /// # Errors
    /// Log write errors.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), RaftError> {
        let rec = HardStateRecord { term: hs.term, vote: hs.vote, commit: hs.commit };
        if rec == self.log.hard_state() {
            return Ok(());
        }
        self.log.set_hard_state(rec).map_err(store_err)
    }

    /// Replaces the log with a snapshot's marker (the state was installed by the sink first),
    /// and adopts its conf state and members.
    ///
    /// # Errors
    /// Log write errors.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata, members: &[MemberAddr]) -> Result<(), RaftError> {
        let (index, term) = (meta.index, meta.term);
        assert!(index >= self.log.first_index() - 1, "snapshot at {index} is older than the log start");
        self.log.compact_to(index, term).map_err(store_err)?;
        assert_eq!(self.log.snapshot_marker(), (index, term), "snapshot marker must be recorded");
        let mut hs = self.log.hard_state();
        hs.term = hs.term.max(term);
        hs.commit = hs.commit.max(index);
        self.log.set_hard_state(hs).map_err(store_err)?;
        self.conf_history.clear();
        self.conf_history.push((index, meta.get_conf_state().clone()));
        self.persist_conf()?;
        for m in members {
            self.members.insert(m.node_id, m.clone());
        }
        self.persist_members()
    }

    /// Drops entries up to `index` (they are in the state store, durably).
    ///
    /// # Errors
    /// Log errors; `index` must be held.
    pub fn compact(&mut self, index: u64) -> Result<(), RaftError> {
        if index < self.log.first_index() {
            return Ok(());
        }
        let term = self.term(index)?;
        self.log.compact_to(index, term).map_err(store_err)
    }
}

impl Storage for WalStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let rec = self.log.hard_state();
        let mut hs = HardState::default();
        hs.term = rec.term;
        hs.vote = rec.vote;
        hs.commit = rec.commit;
        Ok(RaftState::new(hs, self.conf_state()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let records = self.log.entries(low, high, max_size.into()).map_err(store_err)?;
        let mut out = Vec::with_capacity(records.len());
        for r in &records {
            out.push(decode_entry(r)?);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        match self.log.term(idx).map_err(store_err)? {
            Some(t) => Ok(t),
            None if idx < self.log.snapshot_marker().0 => Err(RaftError::Store(StorageError::Compacted)),
            None => Err(RaftError::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log.last_index())
    }

    /// Builds a snapshot from the state machine. Any failure is reported as temporarily
    /// unavailable: raft-rs treats every other storage error here as fatal, and it retries.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = Err(RaftError::Store(StorageError::SnapshotTemporarilyUnavailable));
        // The follower continues from the log right after the snapshot: no older one will do.
        let at_least = request_index.max(self.log.first_index().saturating_sub(1));
        let exported = match self.snapshots.snapshot(at_least) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(to, error = %e, "state snapshot unavailable");
                return unavailable;
            }
        };
        let (index, term) = (exported.index, exported.term);
        if index < request_index || index == 0 || index + 1 < self.log.first_index() || index > self.log.last_index() {
            tracing::warn!(
                to,
                index,
                request_index,
                first = self.log.first_index(),
                "state snapshot does not fit the log"
            );
            return unavailable;
        }
        if self.log.term(index).ok().flatten().is_some_and(|t| t != term) {
            tracing::error!(to, index, term, "state snapshot term disagrees with the log");
            return unavailable;
        }
        let Some(cs) = self.conf_at(index) else {
            tracing::warn!(to, index, "no conf state recorded at the snapshot index");
            return unavailable;
        };
        // The members only: the transport streams the state from the source's export, so the
        // raft thread never copies a state that may be gigabytes (it held the leader long enough
        // for an election).
        let members: Vec<MemberAddr> = self.members.values().cloned().collect();
        let mut snap = Snapshot::default();
        snap.data = SnapshotEnvelope::encode_parts(&members, &[]).into();
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{NoSnapshots, SnapshotSink, SnapshotSource};
    use tally_store::wal::WalOptions;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    fn voters(ids: &[u64]) -> ConfState {
        let mut cs = ConfState::default();
        cs.voters = ids.to_vec();
        cs
    }

    fn open(dir: &std::path::Path, snaps: Arc<dyn StateSnapshots>) -> WalStorage {
        let wal = Wal::open(dir, WalOptions::default()).expect("wal");
        WalStorage::open(Box::new(wal), Some(voters(&[1, 2, 3])), &[], snaps).expect("storage")
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    #[test]
    fn entry_codec_round_trips_every_kind() {
        let mut cc = entry(3, 2, b"cc-bytes");
        cc.set_entry_type(EntryType::EntryConfChangeV2);
        cc.context = b"ctx".to_vec().into();
        for e in [entry(1, 1, b""), entry(2, 1, b"batch"), cc] {
            let le = LogEntry { index: e.index, term: e.term, data: encode_entry(&e).expect("encode") };
            assert_eq!(decode_entry(&le).expect("decode"), e);
        }
        assert!(encode_entry(&entry(1, 1, b"")).expect("encode").is_empty(), "a no-op costs no bytes");
        let bad = LogEntry { index: 1, term: 1, data: vec![0x7f, 1] };
        assert!(decode_entry(&bad).is_err());
    }

    #[test]
    fn raft_storage_contract() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = open(dir.path(), Arc::new(NoSnapshots));
        let st = s.initial_state().expect("state");
        assert!(st.initialized());
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((st.hard_state.term, st.hard_state.commit), (1, 1), "bootstrap marker at (1, 1)");
        assert_eq!((s.first_index().expect("f"), s.last_index().expect("l")), (2, 1));
        assert_eq!(s.term(1).expect("marker term"), 1);
        assert_eq!(s.term(0), Err(RaftError::Store(StorageError::Compacted)));
        assert_eq!(s.term(2), Err(RaftError::Store(StorageError::Unavailable)));
        assert_eq!(s.entries(1, 2, None, ctx()), Err(RaftError::Store(StorageError::Compacted)));

        let ents: Vec<Entry> = (2..=6).map(|i| entry(i, 1 + i / 4, format!("e{i}").as_bytes())).collect();
        s.append(&ents).expect("append");
        s.sync().expect("sync");
        assert_eq!(s.entries(3, 6, None, ctx()).expect("entries"), ents[1..4].to_vec());
        // max_size still returns at least one entry.
        assert_eq!(s.entries(3, 6, Some(0), ctx()).expect("entries").len(), 1);
        assert_eq!(s.term(5).expect("term"), 2);

        // A conflicting append truncates the suffix.
        s.append(&[entry(5, 3, b"x")]).expect("append");
        assert_eq!(s.last_index().expect("l"), 5);
        assert_eq!(s.term(5).expect("term"), 3);

        s.compact(4).expect("compact");
        assert_eq!(s.first_index().expect("f"), 5);
        assert_eq!(s.term(4).expect("term at marker"), 2, "the marker's term is retained");
        assert_eq!(s.term(3), Err(RaftError::Store(StorageError::Compacted)));
        assert_eq!(s.entries(3, 5, None, ctx()), Err(RaftError::Store(StorageError::Compacted)));
        assert_eq!(s.entries(5, 6, None, ctx()).expect("entries").len(), 1);

        // No snapshot source: temporarily unavailable, which raft-rs retries (anything else is fatal).
        assert_eq!(s.snapshot(0, 2), Err(RaftError::Store(StorageError::SnapshotTemporarilyUnavailable)));
    }

    #[test]
    fn a_joining_node_starts_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("wal");
        let s = WalStorage::open(Box::new(wal), None, &[], Arc::new(NoSnapshots)).expect("storage");
        let st = s.initial_state().expect("state");
        assert!(!st.initialized(), "no configuration until the leader's snapshot");
        assert_eq!((s.first_index().expect("f"), s.last_index().expect("l")), (1, 0));
    }

    #[test]
    fn hard_state_conf_and_members_survive_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut s = open(dir.path(), Arc::new(NoSnapshots));
            s.append(&[entry(2, 1, b""), entry(3, 1, b"a")]).expect("append");
            s.sync().expect("sync");
            let mut hs = HardState::default();
            hs.term = 1;
            hs.vote = 2;
            hs.commit = 3;
            s.set_hard_state(&hs).expect("hs");
            s.set_conf_state(3, voters(&[1, 2, 3, 4])).expect("conf");
            s.upsert_member(MemberAddr { node_id: 4, client_addr: "c4".into(), peer_addr: "p4".into() }).expect("m");
        }
        let s = open(dir.path(), Arc::new(NoSnapshots));
        let st = s.initial_state().expect("state");
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (1, 2, 3));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3, 4], "the stored conf state wins over bootstrap");
        assert_eq!(s.conf_index(), 3);
        assert_eq!(s.conf_at(2).expect("old conf").voters, vec![1, 2, 3]);
        assert!(s.conf_at(0).is_none());
        assert_eq!(s.members()[&4].peer_addr, "p4");
    }

    struct FixedSnapshot(u64, u64);
    impl SnapshotSource for FixedSnapshot {
        fn snapshot(&self, _at_least: u64) -> Result<Arc<crate::snapshot::ExportedState>, String> {
            Ok(Arc::new(crate::snapshot::ExportedState { index: self.0, term: self.1, state: b"state".to_vec() }))
        }
    }
    impl SnapshotSink for FixedSnapshot {
        fn install(&self, _: u64, _: u64, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn snapshot_carries_state_conf_and_members_and_installs() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = open(dir.path(), Arc::new(FixedSnapshot(3, 1)));
        s.append(&(2..=4).map(|i| entry(i, 1, b"d")).collect::<Vec<_>>()).expect("append");
        let snap = s.snapshot(0, 2).expect("snapshot");
        assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (3, 1));
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        let env: SnapshotEnvelope = tally_codec::decode(&snap.data, 1 << 20).expect("envelope");
        assert!(env.state.is_empty(), "the state is streamed by the transport, not carried by Raft");
        // A snapshot ahead of what the source can give is refused as "later".
        assert_eq!(s.snapshot(4, 2), Err(RaftError::Store(StorageError::SnapshotTemporarilyUnavailable)));

        // Installing on a follower: the log is replaced by the marker.
        let dir2 = tempfile::tempdir().expect("dir");
        let mut f = open(dir2.path(), Arc::new(NoSnapshots));
        f.append(&[entry(2, 1, b"d"), entry(3, 1, b"stale")]).expect("append");
        let mut meta = snap.get_metadata().clone();
        meta.index = 10;
        meta.term = 4;
        let m = MemberAddr { node_id: 9, client_addr: "c".into(), peer_addr: "p".into() };
        f.apply_snapshot(&meta, &[m]).expect("install");
        assert_eq!((f.first_index().expect("f"), f.last_index().expect("l")), (11, 10));
        assert_eq!(f.term(10).expect("marker term"), 4);
        assert_eq!(f.initial_state().expect("st").hard_state.commit, 10);
        assert_eq!(f.conf_index(), 10);
        assert!(f.members().contains_key(&9));
    }
}
