//! Small durable-file helpers shared by the log and the segment files.

use crate::disk::Disk;
use crate::StoreError;
use std::path::Path;

/// fsyncs a directory so that creations, renames and deletions in it survive a crash.
pub(crate) fn sync_dir(disk: &dyn Disk, dir: &Path) -> Result<(), StoreError> {
    disk.sync_dir(dir).map_err(|e| StoreError::io(dir, e))
}

/// fdatasyncs the given files, then the directory if entries were created or removed in it.
/// Shared by the log and the segment files, whose "dirty" bookkeeping is the same.
pub(crate) fn sync_files<'a>(
    disk: &dyn Disk,
    files: impl Iterator<Item = &'a Path>,
    dir: &Path,
    dir_dirty: &mut bool,
) -> Result<(), StoreError> {
    for path in files {
        disk.sync(path).map_err(|e| StoreError::io(path, e))?;
    }
    if *dir_dirty {
        sync_dir(disk, dir)?;
        *dir_dirty = false;
    }
    Ok(())
}

/// Writes `crc32(payload) ‖ payload` to `path` atomically and durably: tmp file, fsync, rename,
/// fsync of the directory. A reader sees the old or the new contents, never a mix.
pub(crate) fn write_atomic(disk: &dyn Disk, dir: &Path, name: &str, payload: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut bytes = Vec::with_capacity(4 + payload.len());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    let io = |e| StoreError::io(&tmp, e);
    disk.create_truncate(&tmp).map_err(io)?;
    disk.write_all_at(&tmp, &bytes, 0).map_err(io)?;
    disk.sync(&tmp).map_err(io)?;
    disk.rename(&tmp, &dst).map_err(|e| StoreError::io(&dst, e))?;
    sync_dir(disk, dir)
}

/// Reads a file written by [`write_atomic`]; `None` when it does not exist.
pub(crate) fn read_atomic(disk: &dyn Disk, dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let path = dir.join(name);
    let Some(bytes) = disk.read(&path).map_err(|e| StoreError::io(&path, e))? else { return Ok(None) };
    if bytes.len() < 4 {
        return Err(StoreError::Corrupt { file: path, offset: 0, reason: "file shorter than its checksum".into() });
    }
    let (crc, payload) = bytes.split_at(4);
    let crc = u32::from_le_bytes(crc.try_into().expect("split_at(4) gives 4 bytes"));
    if crc != crc32fast::hash(payload) {
        return Err(StoreError::Corrupt { file: path, offset: 0, reason: "checksum mismatch".into() });
    }
    Ok(Some(payload.to_vec()))
}
