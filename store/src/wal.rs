//! The write-ahead log: checksummed, fsynced, segmented. It is the source of truth of a replica
//! and backs the Raft log; the state store is a cache rebuilt from it.
//!
//! ```text
//!   dir/00000000000000000001.wal   record* ; record = u32 len ‖ u32 crc32(index‖term‖data)
//!   dir/00000000000000000002.wal                      ‖ u64 index ‖ u64 term ‖ data   (LE)
//!   dir/snapshot   crc ‖ borsh(index, term)      } written tmp → fsync → rename → fsync dir
//!   dir/hardstate  crc ‖ borsh(HardStateRecord)  }
//!   dir/meta.NAME  crc ‖ bytes                   }
//! ```
//!
//! Segments are named by a sequence number; the indices they hold come from their records. A
//! torn or corrupt record at the tail of the last segment (a crash mid-append) is cut off on
//! open; damage anywhere else is reported, never skipped.
//!
//! The record format and the poisoning rule are those of the segment files
//! ([`crate::record`]); the files are reached through a [`Disk`], the operating system's in
//! production and a [`crate::disk::MemDisk`] that loses what was not fsynced in tests.

use crate::disk::{Disk, OsDisk};
use crate::fsutil::{read_atomic, sync_dir, sync_files, write_atomic};
use crate::record::{self, Poison};
use crate::StoreError;
use borsh::{BorshDeserialize, BorshSerialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tally_codec::limits::ENTRY_BYTES_MAX;

/// One Raft log entry as the log stores it; `data` is opaque here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Raft index, contiguous within the log.
    pub index: u64,
    /// Raft term the entry was proposed in.
    pub term: u64,
    /// The encoded entry.
    pub data: Vec<u8>,
}

/// Tuning knobs; the defaults are what production uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// A new segment file starts once the active one would grow past this.
    pub segment_bytes_max: u64,
    /// `false` turns [`Wal::sync`] into a no-op: only for tests and benchmarks that accept loss.
    pub fsync: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes_max: 64 * 1024 * 1024, fsync: true }
    }
}

/// Raft's hard state: what a replica must never forget once it has voted or learned a commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct HardStateRecord {
    /// Current term.
    pub term: u64,
    /// Node voted for in `term` (0 = none).
    pub vote: u64,
    /// Highest index known committed.
    pub commit: u64,
}

/// Bytes of a log record's prefix: index, term.
const PREFIX_BYTES: usize = 16;
const SNAPSHOT_FILE: &str = "snapshot";
const HARD_STATE_FILE: &str = "hardstate";
const META_PREFIX: &str = "meta.";
const SEGMENT_SUFFIX: &str = ".wal";
/// Meta blobs are small side records (e.g. Raft conf state); anything bigger is a misuse.
pub const META_BLOB_BYTES_MAX: usize = 1024 * 1024;

/// One segment file.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    len: u64,
    /// Indices of the records in this file (compacted ones included); `None` when empty.
    first: Option<u64>,
    last: Option<u64>,
}

/// Where one held entry lives, and its term (so `term()` needs no I/O).
#[derive(Debug, Clone, Copy)]
struct Loc {
    seq: u64,
    offset: u64,
    data_len: u32,
    term: u64,
}

/// The durable log. See the module docs for the layout.
#[derive(Debug)]
pub struct Wal {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    opts: WalOptions,
    /// By sequence number; the greatest is the active segment.
    segments: BTreeMap<u64, Segment>,
    next_seq: u64,
    /// `locs[i]` is index `snapshot.0 + 1 + i`.
    locs: VecDeque<Loc>,
    snapshot: (u64, u64),
    hard_state: HardStateRecord,
    meta: BTreeMap<String, Vec<u8>>,
    /// Segments written since the last sync.
    dirty: BTreeSet<u64>,
    /// A segment was created since the last sync.
    dir_dirty: bool,
    poison: Poison,
}

fn prefix(index: u64, term: u64) -> [u8; PREFIX_BYTES] {
    let mut p = [0u8; PREFIX_BYTES];
    p[..8].copy_from_slice(&index.to_le_bytes());
    p[8..].copy_from_slice(&term.to_le_bytes());
    p
}

fn encode_record(e: &LogEntry, out: &mut Vec<u8>) {
    record::encode(&prefix(e.index, e.term), &e.data, out);
}

fn record_bytes(e: &LogEntry) -> u64 {
    record::size(PREFIX_BYTES, e.data.len())
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_SUFFIX}")
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("slice of 8 bytes"))
}

/// One record read and checked at `offset`.
struct Parsed {
    index: u64,
    term: u64,
    data: Vec<u8>,
    next: u64,
}

/// Reads the record at `offset`; `Err(reason)` when it is truncated or fails its checksum.
fn parse_record(disk: &dyn Disk, path: &Path, file_len: u64, offset: u64) -> std::io::Result<Result<Parsed, String>> {
    let read_at = |buf: &mut [u8], at: u64| disk.read_exact_at(path, buf, at);
    Ok(record::parse(read_at, file_len, offset, PREFIX_BYTES)?.map(|p| Parsed {
        index: le_u64(&p.prefix[..8]),
        term: le_u64(&p.prefix[8..]),
        data: p.data,
        next: p.next,
    }))
}

/// Whether a valid record follows the damaged one at `offset` (using its declared length): then
/// the damage is in the middle of the log, not a torn tail, and must not be cut off silently.
fn valid_record_follows(disk: &dyn Disk, path: &Path, file_len: u64, offset: u64) -> std::io::Result<bool> {
    let head = record::size(PREFIX_BYTES, 0);
    if file_len.saturating_sub(offset) < head {
        return Ok(false);
    }
    let mut len = [0u8; 4];
    disk.read_exact_at(path, &mut len, offset)?;
    let next = offset + head + u64::from(u32::from_le_bytes(len));
    if next >= file_len {
        return Ok(false);
    }
    Ok(parse_record(disk, path, file_len, next)?.is_ok())
}

impl Wal {
    /// Opens the log in `dir` (created if missing) and recovers it: checks every record, cuts a
    /// torn tail off the last segment, drops segments wholly below the snapshot marker.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming file and offset for damage outside the last segment's tail
    /// or a gap in the indices; [`StoreError::Io`] for I/O failures.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Wal, StoreError> {
        Wal::open_on(OsDisk::new(), dir, opts)
    }

    /// [`Wal::open`] on any disk.
    ///
    /// # Errors
    /// As [`Wal::open`].
    pub fn open_on(disk: Arc<dyn Disk>, dir: &Path, opts: WalOptions) -> Result<Wal, StoreError> {
        assert!(opts.segment_bytes_max > 0, "segment_bytes_max must be positive");
        disk.create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let mut wal = Wal {
            disk,
            dir: dir.to_path_buf(),
            opts,
            segments: BTreeMap::new(),
            next_seq: 1,
            locs: VecDeque::new(),
            snapshot: (0, 0),
            hard_state: HardStateRecord::default(),
            meta: BTreeMap::new(),
            dirty: BTreeSet::new(),
            dir_dirty: false,
            poison: Poison::default(),
        };
        let disk = wal.disk.clone();
        if let Some(bytes) = read_atomic(disk.as_ref(), dir, SNAPSHOT_FILE)? {
            wal.snapshot = tally_codec::decode(&bytes, 16).map_err(|e| StoreError::decode("snapshot marker", e))?;
        }
        if let Some(bytes) = read_atomic(disk.as_ref(), dir, HARD_STATE_FILE)? {
            wal.hard_state = tally_codec::decode(&bytes, 24).map_err(|e| StoreError::decode("hard state", e))?;
        }
        let mut seqs = Vec::new();
        for name in disk.list(dir).map_err(|e| StoreError::io(dir, e))? {
            let path = dir.join(&name);
            if name.ends_with(".tmp") {
                // A crash between write and rename of an atomic file: the old file is intact.
                disk.remove(&path).map_err(|e| StoreError::io(&path, e))?;
            } else if let Some(meta_name) = name.strip_prefix(META_PREFIX) {
                if let Some(bytes) = read_atomic(disk.as_ref(), dir, &name)? {
                    wal.meta.insert(meta_name.to_string(), bytes);
                }
            } else if let Some(seq) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let count = seqs.len();
        for (i, seq) in seqs.into_iter().enumerate() {
            wal.recover_segment(seq, i + 1 == count)?;
            wal.next_seq = seq + 1;
        }
        wal.drop_compacted_segments()?;
        wal.check_invariants();
        Ok(wal)
    }

    /// Scans one segment, indexing live entries; repairs a torn tail when `is_last`.
    fn recover_segment(&mut self, seq: u64, is_last: bool) -> Result<(), StoreError> {
        let path = self.dir.join(segment_name(seq));
        let io = |e| StoreError::io(&path, e);
        let disk = self.disk.clone();
        let file_len = disk.len(&path).map_err(io)?;
        let mut seg = Segment { path: path.clone(), len: 0, first: None, last: None };
        let mut offset = 0;
        while offset < file_len {
            let parsed = match parse_record(disk.as_ref(), &path, file_len, offset).map_err(io)? {
                Ok(p) => p,
                Err(reason) => {
                    if !is_last || valid_record_follows(disk.as_ref(), &path, file_len, offset).map_err(io)? {
                        return Err(StoreError::Corrupt { file: path, offset, reason });
                    }
                    tracing::warn!(file = %path.display(), offset, %reason, dropped_bytes = file_len - offset,
                        "cutting a torn record off the tail of the log");
                    disk.set_len(&path, offset).map_err(io)?;
                    disk.sync(&path).map_err(io)?;
                    break;
                }
            };
            self.recover_record(&path, seq, offset, &parsed)?;
            seg.first.get_or_insert(parsed.index);
            seg.last = Some(parsed.index);
            offset = parsed.next;
        }
        seg.len = offset;
        self.segments.insert(seq, seg);
        Ok(())
    }

    /// Indexes one recovered record, checking that live indices are contiguous.
    fn recover_record(&mut self, path: &Path, seq: u64, offset: u64, p: &Parsed) -> Result<(), StoreError> {
        if p.index <= self.snapshot.0 && self.locs.is_empty() {
            return Ok(()); // Compacted; its segment is dropped once wholly below the marker.
        }
        let expected = self.last_index() + 1;
        if p.index != expected {
            return Err(StoreError::Corrupt {
                file: path.to_path_buf(),
                offset,
                reason: format!("record has index {} where {expected} was expected", p.index),
            });
        }
        let data_len = u32::try_from(p.data.len()).expect("parse_record bounds data by ENTRY_BYTES_MAX");
        self.locs.push_back(Loc { seq, offset, data_len, term: p.term });
        Ok(())
    }

    /// Deletes segment files holding nothing above the snapshot marker.
    fn drop_compacted_segments(&mut self) -> Result<(), StoreError> {
        let snapshot_index = self.snapshot.0;
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| s.last.is_none_or(|last| last <= snapshot_index))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &doomed {
            let seg = self.segments.remove(seq).expect("seq was just listed");
            self.dirty.remove(seq);
            self.disk.remove(&seg.path).map_err(|e| StoreError::io(&seg.path, e))?;
        }
        if !doomed.is_empty() {
            sync_dir(self.disk.as_ref(), &self.dir)?;
        }
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        self.poison.check()
    }

    /// Marks the log poisoned when `r` failed (see [`Poison`]).
    fn poison_on_err<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.poison.on_err("write-ahead log", r)
    }

    fn check_invariants(&self) {
        let live_in_segments = self.segments.values().filter(|s| s.last.is_some_and(|l| l > self.snapshot.0)).count();
        assert!(self.locs.is_empty() || live_in_segments > 0, "held entries without a segment");
        if let Some(first) = self.locs.front() {
            assert!(self.segments.contains_key(&first.seq), "index points at a missing segment");
        }
    }

    /// Appends entries (Raft conflict rule: an index at or below `last_index()` truncates the
    /// suffix from there first). Does not sync.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] for a gap, non-contiguous indices or an index at or below
    /// the snapshot marker; [`StoreError::TooLarge`]; I/O errors (which poison the log).
    pub fn append(&mut self, entries: &[LogEntry]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let Some(head) = entries.first() else { return Ok(()) };
        if head.index <= self.snapshot.0 {
            return Err(StoreError::InvalidArgument(format!(
                "append at index {} is at or below the snapshot index {}",
                head.index, self.snapshot.0
            )));
        }
        if head.index > self.last_index() + 1 {
            return Err(StoreError::InvalidArgument(format!(
                "append at index {} leaves a gap after last index {}",
                head.index,
                self.last_index()
            )));
        }
        for (i, e) in entries.iter().enumerate() {
            if e.index != head.index + i as u64 {
                return Err(StoreError::InvalidArgument(format!("entry indices not contiguous at {}", e.index)));
            }
            if e.data.len() > ENTRY_BYTES_MAX {
                return Err(StoreError::TooLarge {
                    what: "log entry",
                    size: e.data.len() as u64,
                    max: ENTRY_BYTES_MAX as u64,
                });
            }
        }
        if head.index <= self.last_index() {
            let r = self.truncate_from(head.index);
            self.poison_on_err(r)?;
        }
        let r = self.write_records(entries);
        self.poison_on_err(r)?;
        assert_eq!(self.last_index(), entries[entries.len() - 1].index, "append must end at the last entry");
        Ok(())
    }

    /// Writes records, one `write` per segment touched, rolling segments at the size bound.
    fn write_records(&mut self, entries: &[LogEntry]) -> Result<(), StoreError> {
        let mut i = 0;
        while i < entries.len() {
            let seq = self.active_with_room(record_bytes(&entries[i]))?;
            let seg = self.segments.get_mut(&seq).expect("active segment exists");
            let start = seg.len;
            let mut buf = Vec::new();
            let mut locs = Vec::new();
            while let Some(e) = entries.get(i) {
                let used = start + buf.len() as u64;
                if used > 0 && used + record_bytes(e) > self.opts.segment_bytes_max {
                    break;
                }
                let data_len = u32::try_from(e.data.len()).expect("checked against ENTRY_BYTES_MAX");
                locs.push(Loc { seq, offset: used, data_len, term: e.term });
                encode_record(e, &mut buf);
                seg.first.get_or_insert(e.index);
                seg.last = Some(e.index);
                i += 1;
            }
            self.disk.write_all_at(&seg.path, &buf, start).map_err(|e| StoreError::io(&seg.path, e))?;
            seg.len = start + buf.len() as u64;
            self.dirty.insert(seq);
            self.locs.extend(locs);
        }
        Ok(())
    }

    /// The active segment's seq, after starting a new one if a record of `bytes` does not fit.
    fn active_with_room(&mut self, bytes: u64) -> Result<u64, StoreError> {
        if let Some((seq, seg)) = self.segments.iter().next_back() {
            if seg.len == 0 || seg.len + bytes <= self.opts.segment_bytes_max {
                return Ok(*seq);
            }
        }
        let seq = self.next_seq;
        let path = self.dir.join(segment_name(seq));
        self.disk.create_new(&path).map_err(|e| StoreError::io(&path, e))?;
        self.next_seq += 1;
        self.dir_dirty = true;
        self.segments.insert(seq, Segment { path, len: 0, first: None, last: None });
        Ok(seq)
    }

    /// Removes entries `index..`, cutting the file that holds `index` and deleting later ones.
    fn truncate_from(&mut self, index: u64) -> Result<(), StoreError> {
        assert!(index > self.snapshot.0, "truncation below the snapshot");
        assert!(index <= self.last_index(), "truncation beyond the end");
        let pos = (index - self.snapshot.0 - 1) as usize;
        let loc = self.locs[pos];
        let later: Vec<u64> = self.segments.range(loc.seq + 1..).map(|(s, _)| *s).collect();
        for seq in &later {
            let seg = self.segments.remove(seq).expect("seq was just listed");
            self.dirty.remove(seq);
            self.disk.remove(&seg.path).map_err(|e| StoreError::io(&seg.path, e))?;
        }
        if !later.is_empty() {
            // Make the deletions durable now: stale later segments reappearing after a crash
            // would leave a gap in the indices.
            sync_dir(self.disk.as_ref(), &self.dir)?;
        }
        let seg = self.segments.get_mut(&loc.seq).expect("index points at a held segment");
        self.disk.set_len(&seg.path, loc.offset).map_err(|e| StoreError::io(&seg.path, e))?;
        seg.len = loc.offset;
        if seg.first.is_some_and(|f| f < index) {
            seg.last = Some(index - 1);
        } else {
            seg.first = None;
            seg.last = None;
        }
        self.dirty.insert(loc.seq);
        self.locs.truncate(pos);
        Ok(())
    }

    /// Makes every append so far durable: fdatasync of each written segment, and of the
    /// directory when a segment was created.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`] if an earlier fsync failed; an fsync error poisons the log.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.check_poisoned()?;
        if !self.opts.fsync {
            self.dirty.clear();
            self.dir_dirty = false;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let r = self.sync_inner();
        // Once per batch (the Raft thread syncs each ready's entries), never per request.
        metrics::histogram!("tally_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
        self.poison_on_err(r)
    }

    fn sync_inner(&mut self) -> Result<(), StoreError> {
        let dirty = std::mem::take(&mut self.dirty);
        let segments = &self.segments;
        let segs = dirty.iter().map(|seq| segments.get(seq).expect("dirty segments are held").path.as_path());
        sync_files(self.disk.as_ref(), segs, &self.dir, &mut self.dir_dirty)
    }

    /// The first index held (or that will be held): one past the snapshot marker.
    pub fn first_index(&self) -> u64 {
        self.snapshot.0 + 1
    }

    /// The last index held; the snapshot index when the log is empty.
    pub fn last_index(&self) -> u64 {
        self.snapshot.0 + self.locs.len() as u64
    }

    /// The term of `index`: `Some` for the snapshot index and held entries, `None` otherwise.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`].
    pub fn term(&self, index: u64) -> Result<Option<u64>, StoreError> {
        self.check_poisoned()?;
        if index == self.snapshot.0 {
            return Ok(Some(self.snapshot.1));
        }
        if index < self.snapshot.0 || index > self.last_index() {
            return Ok(None);
        }
        Ok(Some(self.locs[(index - self.snapshot.0 - 1) as usize].term))
    }

    /// Entries `[lo, hi)`: at least one if the range is not empty, then stop before the data
    /// bytes would exceed `bytes_max`.
    ///
    /// # Errors
    /// [`StoreError::Compacted`] when `lo < first_index()`, [`StoreError::Unavailable`] when
    /// `hi > last_index() + 1`, [`StoreError::Corrupt`] when a record fails its checks on read.
    pub fn entries(&self, lo: u64, hi: u64, bytes_max: Option<u64>) -> Result<Vec<LogEntry>, StoreError> {
        self.check_poisoned()?;
        if lo > hi {
            return Err(StoreError::InvalidArgument(format!("entries range [{lo}, {hi}) is reversed")));
        }
        if lo < self.first_index() {
            return Err(StoreError::Compacted { index: lo, first: self.first_index() });
        }
        if hi > self.last_index() + 1 {
            return Err(StoreError::Unavailable { index: hi - 1, last: self.last_index() });
        }
        let mut out = Vec::new();
        let mut total: u64 = 0;
        for index in lo..hi {
            let loc = self.locs[(index - self.snapshot.0 - 1) as usize];
            if !out.is_empty() && bytes_max.is_some_and(|max| total + u64::from(loc.data_len) > max) {
                break;
            }
            total += u64::from(loc.data_len);
            out.push(self.read_entry(index, loc)?);
        }
        Ok(out)
    }

    /// Reads and re-checks one record (checksum, index, term, length) before handing it out.
    fn read_entry(&self, index: u64, loc: Loc) -> Result<LogEntry, StoreError> {
        let seg = self.segments.get(&loc.seq).expect("index points at a held segment");
        let corrupt = |reason: String| StoreError::Corrupt { file: seg.path.clone(), offset: loc.offset, reason };
        let parsed = parse_record(self.disk.as_ref(), &seg.path, seg.len, loc.offset);
        let p = match parsed.map_err(|e| StoreError::io(&seg.path, e))? {
            Ok(p) => p,
            Err(reason) => return Err(corrupt(reason)),
        };
        if p.index != index || p.term != loc.term || p.data.len() != loc.data_len as usize {
            return Err(corrupt(format!(
                "record is index {} term {}, expected {index} term {}",
                p.index, p.term, loc.term
            )));
        }
        Ok(LogEntry { index, term: p.term, data: p.data })
    }

    /// Forgets entries `<= index` and durably records `(index, term)` as the snapshot marker.
    /// `index` may be beyond `last_index()` (a snapshot was installed): the log becomes empty
    /// with `last_index() == index`. If the held entry at `index` has another term, the suffix
    /// after it conflicts with the snapshot and is discarded too.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`]; I/O errors (which poison the log).
    pub fn compact_to(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        self.check_poisoned()?;
        if index <= self.snapshot.0 {
            return Ok(());
        }
        let last = self.last_index();
        let conflict = index < last && self.term(index)? != Some(term);
        if conflict {
            let r = self.truncate_from(index + 1);
            self.poison_on_err(r)?;
            self.sync()?;
        }
        let r = write_atomic(self.disk.as_ref(), &self.dir, SNAPSHOT_FILE, &tally_codec::encode(&(index, term)));
        self.poison_on_err(r)?;
        let dropped = (index.min(self.last_index()) - self.snapshot.0) as usize;
        self.locs.drain(..dropped);
        self.snapshot = (index, term);
        self.drop_compacted_segments()?;
        self.check_invariants();
        let expected_last = if conflict { index } else { last.max(index) };
        assert_eq!(self.last_index(), expected_last, "compaction must keep exactly the agreeing suffix");
        Ok(())
    }

    /// The durable snapshot marker `(index, term)`; `(0, 0)` when fresh.
    pub fn snapshot_marker(&self) -> (u64, u64) {
        self.snapshot
    }

    /// The last hard state stored; zeros when fresh.
    pub fn hard_state(&self) -> HardStateRecord {
        self.hard_state
    }

    /// Stores the hard state; it is durable when this returns.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`]; I/O errors (which poison the log).
    pub fn set_hard_state(&mut self, hs: HardStateRecord) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let r = write_atomic(self.disk.as_ref(), &self.dir, HARD_STATE_FILE, &tally_codec::encode(&hs));
        self.poison_on_err(r)?;
        self.hard_state = hs;
        Ok(())
    }

    /// A small durable side record (e.g. Raft conf state), if set.
    pub fn meta_blob(&self, name: &str) -> Option<Vec<u8>> {
        self.meta.get(name).cloned()
    }

    /// Stores a small side record durably (same atomic-file technique as the hard state).
    /// Names are 1 to 64 characters of `[A-Za-z0-9_-]`, so they are safe file names.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] for a bad name, [`StoreError::TooLarge`] over
    /// [`META_BLOB_BYTES_MAX`], [`StoreError::Poisoned`], I/O errors (which poison the log).
    pub fn set_meta_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(StoreError::InvalidArgument(format!("meta blob name {name:?} is not [A-Za-z0-9_-]{{1,64}}")));
        }
        if bytes.len() > META_BLOB_BYTES_MAX {
            return Err(StoreError::TooLarge {
                what: "meta blob",
                size: bytes.len() as u64,
                max: META_BLOB_BYTES_MAX as u64,
            });
        }
        let r = write_atomic(self.disk.as_ref(), &self.dir, &format!("{META_PREFIX}{name}"), bytes);
        self.poison_on_err(r)?;
        self.meta.insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    /// Number of segment files, for tests and metrics.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Test hook: behave as if an fsync had failed.
    #[cfg(test)]
    fn poison_for_test(&mut self) {
        self.poison.set_for_test();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};

    /// Bytes before a log record's data: len, crc, index, term.
    const HEADER_BYTES: u64 = 24;
    use proptest::prelude::*;

    fn entry(index: u64, term: u64) -> LogEntry {
        LogEntry { index, term, data: format!("entry {index} of term {term}").into_bytes() }
    }

    fn entries(lo: u64, hi: u64, term: u64) -> Vec<LogEntry> {
        (lo..hi).map(|i| entry(i, term)).collect()
    }

    fn small() -> WalOptions {
        WalOptions { segment_bytes_max: 200, fsync: true }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn append_sync_reopen_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), small()).expect("open");
            assert_eq!((wal.first_index(), wal.last_index()), (1, 0));
            assert_eq!(wal.term(0).expect("term"), Some(0));
            wal.append(&entries(1, 6, 1)).expect("append");
            wal.append(&entries(6, 11, 2)).expect("append");
            wal.sync().expect("sync");
            assert!(wal.segment_count() > 1, "200-byte segments must roll");
        }
        let wal = Wal::open(dir.path(), small()).expect("reopen");
        assert_eq!((wal.first_index(), wal.last_index()), (1, 10));
        let mut want = entries(1, 6, 1);
        want.extend(entries(6, 11, 2));
        assert_eq!(wal.entries(1, 11, None).expect("entries"), want);
        assert_eq!(wal.term(5).expect("term"), Some(1));
        assert_eq!(wal.term(6).expect("term"), Some(2));
        assert_eq!(wal.term(11).expect("term"), None);
        // bytes_max: at least one entry, then stop before exceeding.
        assert_eq!(wal.entries(3, 11, Some(0)).expect("entries").len(), 1);
        let one = want[2].data.len() as u64;
        assert_eq!(wal.entries(3, 11, Some(2 * one)).expect("entries").len(), 2);
        assert!(matches!(wal.entries(0, 3, None), Err(StoreError::Compacted { .. })));
        assert!(matches!(wal.entries(3, 12, None), Err(StoreError::Unavailable { .. })));
    }

    #[test]
    fn append_rejects_gaps_and_non_contiguous_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open(dir.path(), small()).expect("open");
        assert!(matches!(wal.append(&[entry(2, 1)]), Err(StoreError::InvalidArgument(_))));
        assert!(matches!(wal.append(&[entry(1, 1), entry(3, 1)]), Err(StoreError::InvalidArgument(_))));
        assert_eq!(wal.last_index(), 0, "a rejected append writes nothing");
    }

    #[test]
    fn torn_tail_is_cut_off_and_prefix_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
            wal.append(&entries(1, 6, 1)).expect("append");
            wal.sync().expect("sync");
        }
        let seg = segment_files(dir.path()).pop().expect("a segment");
        let len = fs::metadata(&seg).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&seg).expect("open seg");
        f.set_len(len - 5).expect("truncate mid-record");
        drop(f);
        {
            let mut wal = Wal::open(dir.path(), WalOptions::default()).expect("reopen repairs");
            assert_eq!(wal.last_index(), 4);
            assert_eq!(wal.entries(1, 5, None).expect("prefix"), entries(1, 5, 1));
            // The log continues cleanly after the repair.
            wal.append(&[entry(5, 2)]).expect("append after repair");
            wal.sync().expect("sync");
        }
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("reopen");
        assert_eq!(wal.entries(5, 6, None).expect("entries"), vec![entry(5, 2)]);
    }

    #[test]
    fn flipped_byte_in_last_record_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
            wal.append(&entries(1, 6, 1)).expect("append");
            wal.sync().expect("sync");
        }
        let seg = segment_files(dir.path()).pop().expect("a segment");
        let mut bytes = fs::read(&seg).expect("read");
        let n = bytes.len();
        bytes[n - 2] ^= 0x01;
        fs::write(&seg, &bytes).expect("write");
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("reopen repairs");
        assert_eq!(wal.last_index(), 4);
        assert_eq!(wal.entries(1, 5, None).expect("prefix"), entries(1, 5, 1));
        assert!(fs::metadata(&seg).expect("meta").len() < n as u64, "the bad record is gone from disk");
    }

    #[test]
    fn corruption_in_a_middle_record_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), WalOptions::default()).expect("open");
            wal.append(&entries(1, 6, 1)).expect("append");
            wal.sync().expect("sync");
        }
        let seg = segment_files(dir.path()).pop().expect("a segment");
        let mut bytes = fs::read(&seg).expect("read");
        // Record 2 starts after record 1; flip a data byte inside it.
        let first_len = HEADER_BYTES as usize + entry(1, 1).data.len();
        bytes[first_len + HEADER_BYTES as usize + 1] ^= 0x01;
        fs::write(&seg, &bytes).expect("write");
        match Wal::open(dir.path(), WalOptions::default()) {
            Err(StoreError::Corrupt { file, offset, .. }) => {
                assert_eq!(file, seg);
                assert_eq!(offset, first_len as u64);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn corruption_in_an_earlier_segment_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), small()).expect("open");
            wal.append(&entries(1, 20, 1)).expect("append");
            wal.sync().expect("sync");
        }
        let segs = segment_files(dir.path());
        assert!(segs.len() > 2);
        let mut bytes = fs::read(&segs[0]).expect("read");
        let n = bytes.len();
        bytes[n - 1] ^= 0x01; // Tail of a segment that is not the last one.
        fs::write(&segs[0], &bytes).expect("write");
        assert!(matches!(Wal::open(dir.path(), small()), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn truncate_on_conflict() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), small()).expect("open");
            wal.append(&entries(1, 15, 1)).expect("append");
            let before = wal.segment_count();
            wal.append(&entries(4, 6, 2)).expect("conflicting append");
            assert_eq!(wal.last_index(), 5);
            assert!(wal.segment_count() < before, "later segments are deleted");
            assert_eq!(wal.term(3).expect("term"), Some(1));
            assert_eq!(wal.term(4).expect("term"), Some(2));
            assert_eq!(wal.term(6).expect("term"), None);
            wal.sync().expect("sync");
        }
        let wal = Wal::open(dir.path(), small()).expect("reopen");
        let mut want = entries(1, 4, 1);
        want.extend(entries(4, 6, 2));
        assert_eq!(wal.entries(1, 6, None).expect("entries"), want);
    }

    #[test]
    fn compact_deletes_old_segments_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), small()).expect("open");
            wal.append(&entries(1, 30, 1)).expect("append");
            wal.sync().expect("sync");
            let before = segment_files(dir.path()).len();
            wal.compact_to(20, 1).expect("compact");
            assert!(segment_files(dir.path()).len() < before, "segments wholly <= 20 are deleted");
            assert_eq!((wal.first_index(), wal.last_index()), (21, 29));
            assert_eq!(wal.term(20).expect("term"), Some(1));
            assert_eq!(wal.term(19).expect("term"), None);
            assert!(matches!(wal.entries(20, 22, None), Err(StoreError::Compacted { .. })));
        }
        let wal = Wal::open(dir.path(), small()).expect("reopen");
        assert_eq!(wal.snapshot_marker(), (20, 1));
        assert_eq!((wal.first_index(), wal.last_index()), (21, 29));
        assert_eq!(wal.entries(21, 30, None).expect("entries"), entries(21, 30, 1));
    }

    #[test]
    fn compact_beyond_last_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut wal = Wal::open(dir.path(), small()).expect("open");
            wal.append(&entries(1, 10, 1)).expect("append");
            wal.compact_to(50, 3).expect("install snapshot");
            assert_eq!((wal.first_index(), wal.last_index()), (51, 50));
            assert!(segment_files(dir.path()).is_empty());
            assert!(matches!(wal.append(&[entry(52, 3)]), Err(StoreError::InvalidArgument(_))));
            wal.append(&entries(51, 53, 3)).expect("append after snapshot");
            wal.sync().expect("sync");
        }
        let wal = Wal::open(dir.path(), small()).expect("reopen");
        assert_eq!(wal.snapshot_marker(), (50, 3));
        assert_eq!(wal.entries(51, 53, None).expect("entries"), entries(51, 53, 3));
    }

    #[test]
    fn compact_with_conflicting_term_discards_suffix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open(dir.path(), small()).expect("open");
        wal.append(&entries(1, 10, 1)).expect("append");
        wal.compact_to(5, 2).expect("snapshot with another term at 5");
        assert_eq!(wal.last_index(), 5, "entries after a conflicting snapshot point are dropped");
        drop(wal);
        assert_eq!(Wal::open(dir.path(), small()).expect("reopen").last_index(), 5);
    }

    /// The log on a disk that loses what was not fsynced: after a crash, reopening finds every
    /// synced entry, then whichever unsynced records survived whole (a torn record is cut off),
    /// never anything else; the hard state is there; a failed fsync or a full disk poisons the log.
    #[test]
    fn a_crash_loses_exactly_what_was_not_fsynced() {
        use crate::disk::MemDisk;
        let dir = Path::new("/wal");
        for torn in [0, 5, 24, 30, 1000, usize::MAX] {
            let disk = MemDisk::new();
            let mut wal = Wal::open_on(Arc::new(disk.clone()), dir, small()).expect("open");
            wal.append(&entries(1, 40, 1)).expect("append");
            wal.sync().expect("sync");
            wal.set_hard_state(HardStateRecord { term: 1, vote: 2, commit: 30 }).expect("hard state");
            wal.append(&entries(40, 60, 1)).expect("append, not synced");
            drop(wal);
            disk.crash(torn);
            let wal = Wal::open_on(Arc::new(disk.clone()), dir, small()).expect("reopen after crash");
            let last = wal.last_index();
            assert!((39..60).contains(&last), "torn {torn}: last index {last}");
            assert_eq!(wal.entries(1, last + 1, None).expect("read"), entries(1, last + 1, 1));
            if torn == 0 {
                assert_eq!(last, 39, "nothing unsynced survives a clean cut");
            }
            assert_eq!(wal.hard_state(), HardStateRecord { term: 1, vote: 2, commit: 30 });
        }
        // A failed fsync: the log is poisoned, and what it had not synced is not on disk.
        let disk = MemDisk::new();
        let mut wal = Wal::open_on(Arc::new(disk.clone()), dir, small()).expect("open");
        wal.append(&entries(1, 10, 1)).expect("append");
        wal.sync().expect("sync");
        wal.append(&entries(10, 12, 1)).expect("append");
        disk.fail_next_sync();
        assert!(wal.sync().is_err());
        assert!(matches!(wal.append(&entries(12, 13, 1)), Err(StoreError::Poisoned)));
        assert!(matches!(wal.entries(1, 2, None), Err(StoreError::Poisoned)));
        drop(wal);
        disk.crash(0);
        assert_eq!(Wal::open_on(Arc::new(disk), dir, small()).expect("reopen").last_index(), 9);
        // A full disk: the append fails with the cause and poisons the log.
        let disk = MemDisk::new();
        let mut wal = Wal::open_on(Arc::new(disk.clone()), dir, small()).expect("open");
        disk.set_full(true);
        let err = wal.append(&entries(1, 2, 1)).expect_err("full");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert!(matches!(wal.sync(), Err(StoreError::Poisoned)));
    }

    #[test]
    fn hard_state_and_meta_blobs_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hs = HardStateRecord { term: 7, vote: 2, commit: 41 };
        {
            let mut wal = Wal::open(dir.path(), small()).expect("open");
            assert_eq!(wal.hard_state(), HardStateRecord::default());
            wal.set_hard_state(HardStateRecord { term: 1, vote: 1, commit: 0 }).expect("set");
            wal.set_hard_state(hs).expect("set");
            wal.set_meta_blob("conf_state", b"voters 1 2 3").expect("meta");
            assert!(matches!(wal.set_meta_blob("../evil", b"x"), Err(StoreError::InvalidArgument(_))));
        }
        let wal = Wal::open(dir.path(), small()).expect("reopen");
        assert_eq!(wal.hard_state(), hs);
        assert_eq!(wal.meta_blob("conf_state"), Some(b"voters 1 2 3".to_vec()));
        assert_eq!(wal.meta_blob("other"), None);
        // A damaged hard state is reported, not defaulted.
        let path = dir.path().join(HARD_STATE_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes[5] ^= 1;
        fs::write(&path, bytes).expect("write");
        assert!(matches!(Wal::open(dir.path(), small()), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn poisoned_wal_refuses_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open(dir.path(), small()).expect("open");
        wal.append(&entries(1, 3, 1)).expect("append");
        wal.poison_for_test();
        assert!(matches!(wal.sync(), Err(StoreError::Poisoned)));
        assert!(matches!(wal.append(&[entry(3, 1)]), Err(StoreError::Poisoned)));
        assert!(matches!(wal.entries(1, 2, None), Err(StoreError::Poisoned)));
        assert!(matches!(wal.term(1), Err(StoreError::Poisoned)));
        assert!(matches!(wal.compact_to(1, 1), Err(StoreError::Poisoned)));
        assert!(matches!(wal.set_hard_state(HardStateRecord::default()), Err(StoreError::Poisoned)));
        assert!(matches!(wal.set_meta_blob("x", b""), Err(StoreError::Poisoned)));
    }

    /// One step of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        /// Append `count` entries starting `back` entries before the end (conflict rule).
        Append {
            back: u64,
            count: u64,
            size: usize,
        },
        /// Compact to `last_index - back`, or beyond the end when `beyond > 0`.
        Compact {
            back: u64,
            beyond: u64,
        },
        Reopen,
        Sync,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..4, 1u64..6, 0usize..80).prop_map(|(back, count, size)| Op::Append { back, count, size }),
            1 => (0u64..8, prop_oneof![3 => Just(0u64), 1 => 1u64..5])
                .prop_map(|(back, beyond)| Op::Compact { back, beyond }),
            1 => Just(Op::Reopen),
            1 => Just(Op::Sync),
        ]
    }

    /// The simple model: a snapshot marker and a vector of entries after it.
    #[derive(Default)]
    struct Model {
        snapshot: (u64, u64),
        entries: Vec<LogEntry>,
    }

    impl Model {
        fn last(&self) -> u64 {
            self.snapshot.0 + self.entries.len() as u64
        }
        fn term(&self, index: u64) -> Option<u64> {
            if index == self.snapshot.0 {
                return Some(self.snapshot.1);
            }
            self.entries.iter().find(|e| e.index == index).map(|e| e.term)
        }
    }

    fn check(wal: &Wal, model: &Model) {
        assert_eq!(wal.snapshot_marker(), model.snapshot);
        assert_eq!(wal.first_index(), model.snapshot.0 + 1);
        assert_eq!(wal.last_index(), model.last());
        assert_eq!(wal.entries(wal.first_index(), wal.last_index() + 1, None).expect("entries"), model.entries);
        for index in model.snapshot.0.saturating_sub(1)..=model.last() + 1 {
            assert_eq!(wal.term(index).expect("term"), model.term(index), "term of {index}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn matches_in_memory_model(ops in proptest::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let opts = WalOptions { segment_bytes_max: 256, fsync: false };
            let mut wal = Wal::open(dir.path(), opts).expect("open");
            let mut model = Model::default();
            let mut term = 1;
            for op in ops {
                match op {
                    Op::Append { back, count, size } => {
                        let start = (model.last() + 1).saturating_sub(back).max(model.snapshot.0 + 1);
                        term += 1;
                        let new: Vec<LogEntry> = (start..start + count)
                            .map(|index| LogEntry { index, term, data: vec![(index % 251) as u8; size] })
                            .collect();
                        wal.append(&new).expect("append");
                        model.entries.truncate((start - model.snapshot.0 - 1) as usize);
                        model.entries.extend(new);
                    }
                    Op::Compact { back, beyond } => {
                        let index = if beyond > 0 { model.last() + beyond } else { model.last().saturating_sub(back) };
                        if index <= model.snapshot.0 {
                            continue;
                        }
                        let t = model.term(index).unwrap_or(term);
                        wal.compact_to(index, t).expect("compact");
                        let keep = model.last().saturating_sub(index) as usize;
                        let from = model.entries.len() - keep;
                        model.entries.drain(..from);
                        model.snapshot = (index, t);
                    }
                    Op::Reopen => {
                        drop(wal);
                        wal = Wal::open(dir.path(), opts).expect("reopen");
                    }
                    Op::Sync => wal.sync().expect("sync"),
                }
                check(&wal, &model);
            }
        }
    }
}
