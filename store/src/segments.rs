//! Append-only segment files for bulky values (batch bodies), read through memory maps so that
//! memory stays bounded whatever the state size: the OS pages bodies in and out; nothing is cached.
//!
//! ```text
//!   dir/0000000001.seg   record* ; record = u32 len ‖ u32 crc32(data) ‖ data   (LE)
//!                        (the log's record format, crate::record, with no prefix)
//!   SegmentRef { segment, offset (of the record), len (of data) }  → stored in LevelDB
//! ```
//!
//! `unsafe` is allowed only in this module, for `memmap2::Mmap::map`.
#![allow(unsafe_code)]

use crate::disk::{Disk, OsDisk};
use crate::fsutil::sync_files;
use crate::record::{self, Poison};
use crate::StoreError;
use borsh::{BorshDeserialize, BorshSerialize};
use memmap2::Mmap;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tally_codec::limits::ENTRY_BYTES_MAX;

/// Where one value lives; small and borsh-encoded into `BatchRecord.body_ref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct SegmentRef {
    /// Segment file number.
    pub segment: u32,
    /// Byte offset of the record (its header) in the file.
    pub offset: u64,
    /// Length of the value (without the record header).
    pub len: u32,
}

/// Most bytes of an encoded [`SegmentRef`] (borsh: 4 + 8 + 4).
pub const SEGMENT_REF_BYTES: usize = 16;
/// Bytes of a record header: len, crc.
const HEADER_BYTES: u64 = 8;
const SUFFIX: &str = ".seg";

/// One value in a segment's memory map (see [`Segments::read_mapped`]). The map stays valid
/// while this lives, whatever the segments do meanwhile: files are append-only.
#[derive(Debug, Clone)]
pub struct MappedValue {
    map: Arc<Mmap>,
    /// The record (header and data) in the map.
    start: usize,
    end: usize,
    file: PathBuf,
    offset: u64,
}

impl MappedValue {
    /// Bytes of the value (without the record header).
    pub fn len(&self) -> usize {
        self.end - self.start - HEADER_BYTES as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value's bytes once their checksum matches.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the bytes fail their checks.
    pub fn check(&self) -> Result<&[u8], StoreError> {
        record::check_mapped(&self.map[self.start..self.end], 0).map_err(|reason| StoreError::Corrupt {
            file: self.file.clone(),
            offset: self.offset,
            reason,
        })
    }
}

#[derive(Debug)]
struct SegFile {
    path: PathBuf,
    len: u64,
}

/// The set of segment files in one directory.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    segment_bytes_max: u64,
    files: BTreeMap<u32, SegFile>,
    /// Current maps, replaced when a read reaches past the mapped length (the file grew).
    maps: Mutex<HashMap<u32, Arc<Mmap>>>,
    dirty: BTreeSet<u32>,
    dir_dirty: bool,
    poison: Poison,
    /// Writes and fsyncs; reads go through memory maps of the same files.
    disk: OsDisk,
}

impl Segments {
    /// Opens (creating if missing) the segment directory. Appends continue at the end of the
    /// newest file; bytes after the last referenced record (a crash mid-append) are never read.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path, segment_bytes_max: u64) -> Result<Segments, StoreError> {
        assert!(segment_bytes_max > 0, "segment_bytes_max must be positive");
        fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(SUFFIX).and_then(|s| s.parse::<u32>().ok()) else { continue };
            let path = entry.path();
            let len = entry.metadata().map_err(|e| StoreError::io(&path, e))?.len();
            files.insert(id, SegFile { path, len });
        }
        Ok(Segments {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            files,
            maps: Mutex::new(HashMap::new()),
            dirty: BTreeSet::new(),
            dir_dirty: false,
            poison: Poison::default(),
            disk: OsDisk::default(),
        })
    }

    /// Appends one checksummed value and says where it is. Does not sync.
    ///
    /// # Errors
    /// [`StoreError::TooLarge`] over `ENTRY_BYTES_MAX`, [`StoreError::Poisoned`], I/O errors
    /// (which poison the segments).
    pub fn append(&mut self, bytes: &[u8]) -> Result<SegmentRef, StoreError> {
        self.poison.check()?;
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(StoreError::TooLarge {
                what: "segment value",
                size: bytes.len() as u64,
                max: ENTRY_BYTES_MAX as u64,
            });
        }
        let len = u32::try_from(bytes.len()).expect("ENTRY_BYTES_MAX fits in u32");
        let r = self.append_inner(bytes, len);
        self.poison.on_err("segment files", r)
    }

    fn append_inner(&mut self, bytes: &[u8], len: u32) -> Result<SegmentRef, StoreError> {
        let record_bytes = record::size(0, bytes.len());
        let id = self.active_with_room(record_bytes)?;
        let seg = self.files.get_mut(&id).expect("active segment exists");
        let mut buf = Vec::with_capacity(record_bytes as usize);
        record::encode(&[], bytes, &mut buf);
        let offset = seg.len;
        self.disk.write_all_at(&seg.path, &buf, offset).map_err(|e| StoreError::io(&seg.path, e))?;
        seg.len += record_bytes;
        self.dirty.insert(id);
        Ok(SegmentRef { segment: id, offset, len })
    }

    fn active_with_room(&mut self, record_bytes: u64) -> Result<u32, StoreError> {
        if let Some((id, seg)) = self.files.iter().next_back() {
            if seg.len == 0 || seg.len + record_bytes <= self.segment_bytes_max {
                return Ok(*id);
            }
        }
        let id = self.files.keys().next_back().map_or(1, |id| id + 1);
        let path = self.dir.join(format!("{id:010}{SUFFIX}"));
        self.disk.create_new(&path).map_err(|e| StoreError::io(&path, e))?;
        self.files.insert(id, SegFile { path, len: 0 });
        self.dir_dirty = true;
        Ok(id)
    }

    /// Reads a value back, checking its length and checksum.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the reference points outside the file or the bytes fail
    /// their checks; [`StoreError::InvalidArgument`] for an unknown segment.
    pub fn read(&self, r: &SegmentRef) -> Result<Vec<u8>, StoreError> {
        Ok(self.read_mapped(r)?.check()?.to_vec())
    }

    /// A value where it lies in its segment's memory map, its header checked but its bytes not
    /// yet: [`MappedValue::check`] verifies them and borrows them without copying. A caller
    /// holding a lock over the store takes this under it and checks and decodes after letting go.
    ///
    /// # Errors
    /// As [`Segments::read`], except a checksum mismatch, which `check` reports.
    pub fn read_mapped(&self, r: &SegmentRef) -> Result<MappedValue, StoreError> {
        let seg = self
            .files
            .get(&r.segment)
            .ok_or_else(|| StoreError::InvalidArgument(format!("segment {} does not exist", r.segment)))?;
        let corrupt = |reason: String| StoreError::Corrupt { file: seg.path.clone(), offset: r.offset, reason };
        let end =
            r.offset.checked_add(HEADER_BYTES + u64::from(r.len)).ok_or_else(|| corrupt("offset overflows".into()))?;
        if end > seg.len {
            return Err(corrupt(format!("reference ends at {end}, past the segment's {} bytes", seg.len)));
        }
        let map = self.map_covering(r.segment, seg, end)?;
        let start = usize::try_from(r.offset).map_err(|_| corrupt("offset does not fit in memory".into()))?;
        let end = usize::try_from(end).map_err(|_| corrupt("offset does not fit in memory".into()))?;
        let len = u32::from_le_bytes(map[start..start + 4].try_into().expect("4 bytes"));
        if len != r.len {
            return Err(corrupt(format!("record holds {len} bytes, reference says {}", r.len)));
        }
        Ok(MappedValue { map, start, end, file: seg.path.clone(), offset: r.offset })
    }

    /// A map of segment `id` at least `end` bytes long, remapping if the file grew since.
    fn map_covering(&self, id: u32, seg: &SegFile, end: u64) -> Result<Arc<Mmap>, StoreError> {
        let mut maps = self.maps.lock();
        if let Some(m) = maps.get(&id) {
            if m.len() as u64 >= end {
                return Ok(Arc::clone(m));
            }
        }
        // SAFETY: segment files are append-only: this process never truncates or rewrites bytes
        // that were written, and only appends past the mapped length, so mapped bytes never
        // change under a reader. The data directory belongs to one replica process (the state
        // LevelDB's LOCK is held alongside), so no other process modifies the files either.
        let file = File::open(&seg.path).map_err(|e| StoreError::io(&seg.path, e))?;
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io(&seg.path, e))?;
        if (map.len() as u64) < end {
            // Only possible if something outside this process shortened the file.
            return Err(StoreError::Corrupt {
                file: seg.path.clone(),
                offset: map.len() as u64,
                reason: format!("file is shorter than the {end} bytes written to it"),
            });
        }
        let map = Arc::new(map);
        maps.insert(id, Arc::clone(&map));
        Ok(map)
    }

    /// Makes every append durable (fdatasync of written files, fsync of the directory after a
    /// file was created).
    ///
    /// # Errors
    /// [`StoreError::Poisoned`]; an fsync error poisons the segments.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.poison.check()?;
        let r = self.sync_inner();
        self.poison.on_err("segment files", r)
    }

    fn sync_inner(&mut self) -> Result<(), StoreError> {
        let dirty = std::mem::take(&mut self.dirty);
        let files = &self.files;
        let segs = dirty.iter().map(|id| files.get(id).expect("dirty segments are held").path.as_path());
        sync_files(&self.disk, segs, &self.dir, &mut self.dir_dirty)
    }

    /// Number of segment files, for tests and metrics.
    pub fn segment_count(&self) -> usize {
        self.files.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_reopen_and_roll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let values: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 10 + i as usize * 7]).collect();
        let refs: Vec<SegmentRef> = {
            let mut s = Segments::open(dir.path(), 200).expect("open");
            let refs: Vec<_> = values.iter().map(|v| s.append(v).expect("append")).collect();
            // Reads interleaved with appends exercise the remap-when-grown path.
            for (v, r) in values.iter().zip(&refs) {
                assert_eq!(&s.read(r).expect("read"), v);
            }
            s.append(b"more").expect("append after read");
            s.sync().expect("sync");
            assert!(s.segment_count() > 1, "small segments must roll");
            refs
        };
        let mut s = Segments::open(dir.path(), 200).expect("reopen");
        for (v, r) in values.iter().zip(&refs) {
            assert_eq!(&s.read(r).expect("read after reopen"), v);
        }
        let r = s.append(b"after reopen").expect("append");
        assert_eq!(s.read(&r).expect("read"), b"after reopen");
        assert!(refs.iter().all(|old| (old.segment, old.offset) != (r.segment, r.offset)));
        assert_eq!(borsh::to_vec(&r).expect("encode").len(), SEGMENT_REF_BYTES);
    }

    #[test]
    fn checksum_mismatch_and_bad_refs_are_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Segments::open(dir.path(), 1 << 20).expect("open");
        let a = s.append(b"first value").expect("append");
        let b = s.append(b"second value").expect("append");
        s.sync().expect("sync");
        drop(s);
        let path = dir.path().join(format!("{:010}{SUFFIX}", b.segment));
        let mut bytes = fs::read(&path).expect("read file");
        bytes[(b.offset + HEADER_BYTES + 3) as usize] ^= 0x40;
        fs::write(&path, &bytes).expect("write file");
        let s = Segments::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(s.read(&a).expect("untouched value"), b"first value");
        assert!(matches!(s.read(&b), Err(StoreError::Corrupt { .. })), "flipped byte must fail the checksum");
        // Mapped reads find the same: the header at once, the checksum when checked.
        let mapped = s.read_mapped(&b).expect("the header is intact");
        assert_eq!(mapped.len(), b.len as usize);
        assert!(matches!(mapped.check(), Err(StoreError::Corrupt { .. })), "checked when borrowed");
        assert_eq!(s.read_mapped(&a).expect("mapped").check().expect("checked"), b"first value");
        let past_end = SegmentRef { len: b.len + 100, ..b };
        assert!(matches!(s.read(&past_end), Err(StoreError::Corrupt { .. })));
        let wrong_len = SegmentRef { len: a.len - 1, ..a };
        assert!(matches!(s.read(&wrong_len), Err(StoreError::Corrupt { .. })));
        assert!(matches!(s.read(&SegmentRef { segment: 99, ..a }), Err(StoreError::InvalidArgument(_))));
    }
}
