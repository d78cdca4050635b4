//! The durable Raft log: [`WalStorage`] writes what the replica core asks to persist
//! (entries, hard state, snapshot markers) to a [`LogStore`] (production: [`tally_store::Wal`]),
//! reads it back at start, and keeps what raft-rs leaves to the application: the conf state
//! (with the index it took effect at) and the members' addresses.
//!
//! ```text
//!  replica thread ──append/sync/set_hard_state/apply_snapshot/compact──▶ WalStorage ──▶ LogStore
//!                                                                             └─ meta blobs:
//!                                               raft-conf (history), raft-members, raft-revoked
//! ```
//!
//! Log entry data on disk: `[]` is an empty normal entry (a leader's no-op); `0x00 ‖ data` is a
//! normal entry; `0x01 ‖ protobuf(Entry)` is anything else (conf changes, entries with context).

use crate::revocation::Revocation;
use borsh::{BorshDeserialize, BorshSerialize};
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, SnapshotMetadata};
use raft::{Error as RaftError, StorageError};
use std::collections::BTreeMap;
use tally_store::wal::{HardStateRecord, LogEntry, Wal};
use tally_store::StoreError;

/// Meta blob holding the conf-state history.
pub const CONF_BLOB: &str = "raft-conf";
/// Meta blob holding the members' addresses.
pub const MEMBERS_BLOB: &str = "raft-members";
/// Meta blob holding the revoked node certificates (`Vec<Revocation>`, borsh). A log without
/// it has revoked none.
pub const REVOKED_BLOB: &str = "raft-revoked";
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

/// A failed log write as the replica stops on it: `what` was being done, and the kind of the OS
/// error behind it (a full disk is waited out, anything else ends the replica).
pub fn log_failure(what: &str, e: &RaftError) -> crate::LogFailure {
    let kind = match e {
        RaftError::Io(io) => io.kind(),
        RaftError::Store(StorageError::Other(inner)) => {
            inner.downcast_ref::<StoreError>().map_or(std::io::ErrorKind::Other, StoreError::os_kind)
        }
        _ => std::io::ErrorKind::Other,
    };
    crate::LogFailure::new(kind, format!("{what}: {e}"))
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

pub use crate::membership::conf_ids;

/// The Raft storage over the durable log. Owned by the raft thread (inside the `RawNode`).
pub struct WalStorage {
    log: Box<dyn LogStore>,
    /// Newest last; never empty once initialised.
    conf_history: Vec<(u64, ConfState)>,
    members: BTreeMap<u64, MemberAddr>,
    /// Certificates revoked, in the order they were (never withdrawn).
    revoked: Vec<Revocation>,
}

impl WalStorage {
    /// Loads the conf state and members from the log's meta blobs. On a fresh log,
    /// `bootstrap` (the initial voters) becomes the conf state at index 0; a node that is not an
    /// initial voter passes `None` and waits to be added by the leader.
    ///
    /// # Errors
    /// When a meta blob does not decode or cannot be written.
    pub fn open(log: Box<dyn LogStore>, bootstrap: Option<ConfState>, known: &[MemberAddr]) -> Result<Self, RaftError> {
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
        let revoked: Vec<Revocation> = match log.meta_blob(REVOKED_BLOB) {
            Some(bytes) => tally_codec::decode(&bytes, META_DECODE_BYTES_MAX)
                .map_err(|e| RaftError::ConfigInvalid(format!("revoked-certificates blob does not decode: {e}")))?,
            None => Vec::new(),
        };
        let fresh = conf_history.is_empty() && log.last_index() == 0;
        let mut s = WalStorage { log, conf_history, members, revoked };
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

    /// The certificates revoked so far.
    pub fn revoked(&self) -> &[Revocation] {
        &self.revoked
    }

    /// Records revocations, durably; returns the ones that were new.
    ///
    /// # Errors
    /// When the meta blob cannot be written.
    pub fn add_revocations(&mut self, list: &[Revocation]) -> Result<Vec<Revocation>, RaftError> {
        let new: Vec<Revocation> = list
            .iter()
            .filter(|r| !self.revoked.iter().any(|o| o.cert_fingerprint == r.cert_fingerprint))
            .copied()
            .collect();
        if new.is_empty() {
            return Ok(new);
        }
        self.revoked.extend(&new);
        self.log.set_meta_blob(REVOKED_BLOB, &tally_codec::encode(&self.revoked)).map_err(store_err)?;
        Ok(new)
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
    /// and adopts its conf state, members and revoked certificates.
    ///
    /// # Errors
    /// Log write errors.
    pub fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        members: &[MemberAddr],
        revoked: &[Revocation],
    ) -> Result<(), RaftError> {
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
        self.persist_members()?;
        self.add_revocations(revoked).map(|_| ())
    }

    /// Drops entries up to `index` (they are in the state store, durably).
    ///
    /// # Errors
    /// Log errors; `index` must be held.
    pub fn compact(&mut self, index: u64) -> Result<(), RaftError> {
        if index < self.log.first_index() {
            return Ok(());
        }
        let term = self.log.term(index).map_err(store_err)?.ok_or(RaftError::Store(StorageError::Unavailable))?;
        self.log.compact_to(index, term).map_err(store_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_store::wal::WalOptions;

    #[test]
    fn a_full_disk_under_the_log_keeps_its_kind_through_raft_errors() {
        let enospc = StoreError::Io { path: "log/segment".into(), source: std::io::Error::from_raw_os_error(28) };
        let failure = log_failure("log append", &store_err(enospc));
        assert!(failure.disk_full(), "{failure}");
        assert!(failure.why.starts_with("log append: "), "{failure}");
        let eio = store_err(StoreError::Poisoned);
        assert!(!log_failure("log fsync", &eio).disk_full());
        assert!(!log_failure("log", &RaftError::Store(StorageError::Unavailable)).disk_full());
    }

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

    fn open(dir: &std::path::Path) -> WalStorage {
        let wal = Wal::open(dir, WalOptions::default()).expect("wal");
        WalStorage::open(Box::new(wal), Some(voters(&[1, 2, 3])), &[]).expect("storage")
    }

    fn read_all(s: &WalStorage) -> Vec<Entry> {
        let log = s.log();
        if log.last_index() < log.first_index() {
            return Vec::new();
        }
        let records = log.entries(log.first_index(), log.last_index() + 1, None).expect("entries");
        records.iter().map(|r| decode_entry(r).expect("decodes")).collect()
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

    /// What the replica thread writes is what a restart reads back: entries (a conflicting
    /// append truncates the suffix), compaction keeping the marker's term.
    #[test]
    fn appends_truncations_and_compaction_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = open(dir.path());
        assert_eq!(s.log().snapshot_marker(), (BOOTSTRAP_INDEX, BOOTSTRAP_TERM), "bootstrap marker at (1, 1)");
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        let ents: Vec<Entry> = (2..=6).map(|i| entry(i, 1 + i / 4, format!("e{i}").as_bytes())).collect();
        s.append(&ents).expect("append");
        s.sync().expect("sync");
        assert_eq!(read_all(&s), ents);
        s.append(&[entry(5, 3, b"x")]).expect("append");
        assert_eq!(s.log().last_index(), 5, "a conflicting append truncates the suffix");
        assert_eq!(s.log().term(5).expect("term"), Some(3));
        s.compact(4).expect("compact");
        assert_eq!(s.log().first_index(), 5);
        assert_eq!(s.log().snapshot_marker(), (4, 2), "the marker keeps the compacted entry's term");
        drop(s);
        let s = open(dir.path());
        assert_eq!(read_all(&s), vec![entry(5, 3, b"x")], "what survives a reopen");
    }

    #[test]
    fn a_joining_node_starts_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("wal");
        let s = WalStorage::open(Box::new(wal), None, &[]).expect("storage");
        assert!(s.conf_state().voters.is_empty(), "no configuration until the leader's snapshot");
        assert_eq!((s.log().first_index(), s.log().last_index()), (1, 0));
    }

    #[test]
    fn hard_state_conf_and_members_survive_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let mut s = open(dir.path());
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
        let s = open(dir.path());
        let hs = s.log().hard_state();
        assert_eq!((hs.term, hs.vote, hs.commit), (1, 2, 3));
        assert_eq!(s.conf_state().voters, vec![1, 2, 3, 4], "the stored conf state wins over bootstrap");
        assert_eq!(s.conf_index(), 3);
        assert_eq!(s.conf_at(2).expect("old conf").voters, vec![1, 2, 3]);
        assert!(s.conf_at(0).is_none());
        assert_eq!(s.members()[&4].peer_addr, "p4");
    }

    /// Revocations are durable, never duplicated, and a log written before they existed (no
    /// blob) has none.
    #[test]
    fn revoked_certificates_survive_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let r = |b| Revocation { node_id: 3, cert_fingerprint: [b; 32] };
        {
            let mut s = open(dir.path());
            assert!(s.revoked().is_empty());
            assert_eq!(s.add_revocations(&[r(1)]).expect("add"), [r(1)]);
            assert!(s.add_revocations(&[r(1)]).expect("again").is_empty(), "nothing new");
            s.add_revocations(&[r(1), r(2)]).expect("add");
        }
        assert_eq!(open(dir.path()).revoked(), [r(1), r(2)]);
    }

    /// Installing a snapshot on a follower: the log is replaced by the marker, the conf state and
    /// the members come from the snapshot.
    #[test]
    fn a_snapshot_replaces_the_log_with_its_marker() {
        let dir = tempfile::tempdir().expect("dir");
        let mut f = open(dir.path());
        f.append(&[entry(2, 1, b"d"), entry(3, 1, b"stale")]).expect("append");
        let mut meta = SnapshotMetadata::default();
        meta.index = 10;
        meta.term = 4;
        meta.set_conf_state(voters(&[1, 2, 9]));
        let m = MemberAddr { node_id: 9, client_addr: "c".into(), peer_addr: "p".into() };
        let r = Revocation { node_id: 3, cert_fingerprint: [3; 32] };
        f.apply_snapshot(&meta, &[m], &[r]).expect("install");
        assert_eq!(f.revoked(), &[r]);
        assert_eq!((f.log().first_index(), f.log().last_index()), (11, 10));
        assert_eq!(f.log().snapshot_marker(), (10, 4));
        assert_eq!(f.log().hard_state().commit, 10);
        assert_eq!(f.conf_index(), 10);
        assert_eq!(f.conf_state().voters, vec![1, 2, 9]);
        assert!(f.members().contains_key(&9));
    }
}
