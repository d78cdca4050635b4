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

use crate::fsutil::{read_atomic, sync_dir, write_atomic};
use crate::StoreError;
use borsh::{BorshDeserialize, BorshSerialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

/// Bytes of the fixed record header: len, crc, index, term.
const HEADER_BYTES: u64 = 24;
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
    file: File,
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
    poisoned: bool,
}

fn record_crc(index: u64, term: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(&term.to_le_bytes());
    h.update(data);
    h.finalize()
}

fn encode_record(e: &LogEntry, out: &mut Vec<u8>) {
    let len = u32::try_from(e.data.len()).expect("entry size was checked against ENTRY_BYTES_MAX");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(e.index, e.term, &e.data).to_le_bytes());
    out.extend_from_slice(&e.index.to_le_bytes());
    out.extend_from_slice(&e.term.to_le_bytes());
    out.extend_from_slice(&e.data);
}

fn record_bytes(e: &LogEntry) -> u64 {
    HEADER_BYTES + e.data.len() as u64
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}{SEGMENT_SUFFIX}")
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("slice of 4 bytes"))
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
fn parse_record(file: &File, file_len: u64, offset: u64) -> Result<Result<Parsed, String>, std::io::Error> {
    if file_len.saturating_sub(offset) < HEADER_BYTES {
        return Ok(Err("truncated record header".into()));
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    file.read_exact_at(&mut header, offset)?;
    let len = le_u32(&header[0..4]);
    if len as usize > ENTRY_BYTES_MAX {
        return Ok(Err(format!("record length {len} over the limit of {ENTRY_BYTES_MAX}")));
    }
    let next = offset + HEADER_BYTES + u64::from(len);
    if next > file_len {
        return Ok(Err(format!("record of {len} bytes runs past the end of the file")));
    }
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset + HEADER_BYTES)?;
    let index = le_u64(&header[8..16]);
    let term = le_u64(&header[16..24]);
    if le_u32(&header[4..8]) != record_crc(index, term, &data) {
        return Ok(Err("checksum mismatch".into()));
    }
    Ok(Ok(Parsed { index, term, data, next }))
}

/// Whether a valid record follows the damaged one at `offset` (using its declared length): then
/// the damage is in the middle of the log, not a torn tail, and must not be cut off silently.
fn valid_record_follows(file: &File, file_len: u64, offset: u64) -> Result<bool, std::io::Error> {
    if file_len.saturating_sub(offset) < HEADER_BYTES {
        return Ok(false);
    }
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, offset)?;
    let next = offset + HEADER_BYTES + u64::from(le_u32(&len));
    if next >= file_len {
        return Ok(false);
    }
    Ok(parse_record(file, file_len, next)?.is_ok())
}

impl Wal {
    /// Opens the log in `dir` (created if missing) and recovers it: checks every record, cuts a
    /// torn tail off the last segment, drops segments wholly below the snapshot marker.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming file and offset for damage outside the last segment's tail
    /// or a gap in the indices; [`StoreError::Io`] for I/O failures.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Wal, StoreError> {
        assert!(opts.segment_bytes_max > 0, "segment_bytes_max must be positive");
        fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let mut wal = Wal {
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
            poisoned: false,
        };
        if let Some(bytes) = read_atomic(dir, SNAPSHOT_FILE)? {
            wal.snapshot = tally_codec::decode(&bytes, 16).map_err(|e| StoreError::decode("snapshot marker", e))?;
        }
        if let Some(bytes) = read_atomic(dir, HARD_STATE_FILE)? {
            wal.hard_state = tally_codec::decode(&bytes, 24).map_err(|e| StoreError::decode("hard state", e))?;
        }
        let mut seqs = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A crash between write and rename of an atomic file: the old file is intact.
                fs::remove_file(entry.path()).map_err(|e| StoreError::io(entry.path(), e))?;
            } else if let Some(meta_name) = name.strip_prefix(META_PREFIX) {
                if let Some(bytes) = read_atomic(dir, &name)? {
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
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut seg = Segment { path: path.clone(), file, len: 0, first: None, last: None };
        let mut offset = 0;
        while offset < file_len {
            let parsed = match parse_record(&seg.file, file_len, offset).map_err(io)? {
                Ok(p) => p,
                Err(reason) => {
                    if !is_last || valid_record_follows(&seg.file, file_len, offset).map_err(io)? {
                        return Err(StoreError::Corrupt { file: path, offset, reason });
                    }
                    tracing::warn!(file = %path.display(), offset, %reason, dropped_bytes = file_len - offset,
                        "cutting a torn record off the tail of the log");
                    seg.file.set_len(offset).map_err(io)?;
                    seg.file.sync_all().map_err(io)?;
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
            fs::remove_file(&seg.path).map_err(|e| StoreError::io(&seg.path, e))?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(())
    }

    /// Marks the log poisoned when `r` failed: the disk state is unknown after a failed write or
    /// fsync (fsyncgate), so guessing is worse than stopping.
    fn poison_on_err<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_err() {
            tracing::error!("write-ahead log poisoned after a failed write or fsync");
            self.poisoned = true;
        }
        r
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
            seg.file.write_all_at(&buf, start).map_err(|e| StoreError::io(&seg.path, e))?;
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        self.next_seq += 1;
        self.dir_dirty = true;
        self.segments.insert(seq, Segment { path, file, len: 0, first: None, last: None });
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
            fs::remove_file(&seg.path).map_err(|e| StoreError::io(&seg.path, e))?;
        }
        if !later.is_empty() {
            // Make the deletions durable now: stale later segments reappearing after a crash
            // would leave a gap in the indices.
            sync_dir(&self.dir)?;
        }
        let seg = self.segments.get_mut(&loc.seq).expect("index points at a held segment");
        seg.file.set_len(loc.offset).map_err(|e| StoreError::io(&seg.path, e))?;
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
        let r = self.sync_inner();
        self.poison_on_err(r)
    }

    fn sync_inner(&mut self) -> Result<(), StoreError> {
        for seq in std::mem::take(&mut self.dirty) {
            let seg = self.segments.get(&seq).expect("dirty segments are held");
            seg.file.sync_data().map_err(|e| StoreError::io(&seg.path, e))?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
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
        let p = match parse_record(&seg.file, seg.len, loc.offset).map_err(|e| StoreError::io(&seg.path, e))? {
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
        let r = write_atomic(&self.dir, SNAPSHOT_FILE, &tally_codec::encode(&(index, term)));
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
        let r = write_atomic(&self.dir, HARD_STATE_FILE, &tally_codec::encode(&hs));
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
        let r = write_atomic(&self.dir, &format!("{META_PREFIX}{name}"), bytes);
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
        self.poisoned = true;
    }
}
