//! The disk under the write-ahead log, behind a trait: the operating system's in production, an
//! in-memory one that knows what was written and what was fsynced for tests and simulation.
//!
//! [`MemDisk`] models what a crash does to a POSIX file system, the way the simulator's disk
//! does: file contents survive up to their last fsync (plus, optionally, a torn prefix of what
//! was written after it), and a file's name survives only once its directory was fsynced after
//! it was created, renamed or removed. It also fails on command: the next fsync, every write
//! (a full disk).

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File operations the log needs, by path.
pub trait Disk: Send + Sync + std::fmt::Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Fills `buf` from `offset`; `UnexpectedEof` past the end.
    fn read_exact_at(&self, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The whole file; `None` when it does not exist.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Creates an empty file; `AlreadyExists` if there is one.
    fn create_new(&self, path: &Path) -> io::Result<()>;
    /// Creates or empties `path`.
    fn create_truncate(&self, path: &Path) -> io::Result<()>;
    fn write_all_at(&self, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Makes the file's contents durable (fdatasync).
    fn sync(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
}

/// The operating system's file system. Open files are kept, so an append is one `pwrite`.
#[derive(Debug, Default)]
pub struct OsDisk {
    open: Mutex<HashMap<PathBuf, Arc<File>>>,
}

impl OsDisk {
    pub fn new() -> Arc<OsDisk> {
        Arc::new(OsDisk::default())
    }

    fn file(&self, path: &Path) -> io::Result<Arc<File>> {
        let mut open = self.open.lock();
        if let Some(f) = open.get(path) {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenOptions::new().read(true).write(true).open(path)?);
        open.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    fn forget(&self, path: &Path) {
        self.open.lock().remove(path);
    }
}

impl Disk for OsDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(self.file(path)?.metadata()?.len())
    }
    fn read_exact_at(&self, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file(path)?.read_exact_at(buf, offset)
    }
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn create_new(&self, path: &Path) -> io::Result<()> {
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        self.open.lock().insert(path.to_path_buf(), Arc::new(f));
        Ok(())
    }
    fn create_truncate(&self, path: &Path) -> io::Result<()> {
        self.forget(path);
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        self.open.lock().insert(path.to_path_buf(), Arc::new(f));
        Ok(())
    }
    fn write_all_at(&self, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.file(path)?.write_all_at(bytes, offset)
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        self.file(path)?.set_len(len)
    }
    fn sync(&self, path: &Path) -> io::Result<()> {
        self.file(path)?.sync_data()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.forget(from);
        self.forget(to);
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.forget(path);
        fs::remove_file(path)
    }
}

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    /// The contents as of the last fsync.
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct MemState {
    next_inode: u64,
    inodes: HashMap<u64, Inode>,
    /// Names as the running process sees them.
    names: BTreeMap<PathBuf, u64>,
    /// Names as of each directory's last fsync.
    durable_names: BTreeMap<PathBuf, u64>,
    fail_next_sync: bool,
    full: bool,
    fsyncs: u64,
}

/// An in-memory disk that loses, on [`MemDisk::crash`], exactly what was not fsynced.
#[derive(Debug, Default, Clone)]
pub struct MemDisk {
    state: Arc<Mutex<MemState>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} does not exist", path.display()))
}

impl MemDisk {
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// The next fsync (of a file or a directory) fails, as on a failing device.
    pub fn fail_next_sync(&self) {
        self.state.lock().fail_next_sync = true;
    }

    /// Every write that would grow a file fails with "no space left" while `full`.
    pub fn set_full(&self, full: bool) {
        self.state.lock().full = full;
    }

    /// How many fsyncs were made (files and directories).
    pub fn fsyncs(&self) -> u64 {
        self.state.lock().fsyncs
    }

    /// A power cut: every file goes back to its last fsync, plus the first `torn` bytes of what
    /// was written after it (a torn write), and names go back to the last fsync of their
    /// directory.
    pub fn crash(&self, torn: usize) {
        let mut s = self.state.lock();
        for inode in s.inodes.values_mut() {
            let mut data = inode.synced.clone();
            if inode.data.len() > data.len() && inode.data.starts_with(&data) {
                let extra = (inode.data.len() - data.len()).min(torn);
                data.extend_from_slice(&inode.data[inode.synced.len()..inode.synced.len() + extra]);
            }
            inode.data = data;
        }
        s.names = s.durable_names.clone();
        let live: std::collections::HashSet<u64> = s.names.values().copied().collect();
        s.inodes.retain(|i, _| live.contains(i));
        s.fail_next_sync = false;
        s.full = false;
    }

    fn with_inode<T>(&self, path: &Path, f: impl FnOnce(&mut Inode) -> T) -> io::Result<T> {
        let mut s = self.state.lock();
        let i = *s.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(f(s.inodes.get_mut(&i).expect("names point at inodes")))
    }

    fn take_sync(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.fsyncs += 1;
        if std::mem::take(&mut s.fail_next_sync) {
            return Err(io::Error::other("fsync failed (injected)"));
        }
        Ok(())
    }

    fn check_room(&self, grows: bool) -> io::Result<()> {
        if grows && self.state.lock().full {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left on device (injected)"));
        }
        Ok(())
    }
}

impl Disk for MemDisk {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.state.lock();
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        self.with_inode(path, |i| i.data.len() as u64)
    }
    fn read_exact_at(&self, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_inode(path, |i| {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            match i.data.get(start..).and_then(|d| d.get(..buf.len())) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")),
            }
        })?
    }
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match self.with_inode(path, |i| i.data.clone()) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn create_new(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.names.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
        }
        s.next_inode += 1;
        let i = s.next_inode;
        s.inodes.insert(i, Inode::default());
        s.names.insert(path.to_path_buf(), i);
        Ok(())
    }
    fn create_truncate(&self, path: &Path) -> io::Result<()> {
        if self.with_inode(path, |i| i.data.clear()).is_err() {
            self.create_new(path)?;
        }
        Ok(())
    }
    fn write_all_at(&self, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        let grows = self.len(path)? < offset + bytes.len() as u64;
        self.check_room(grows)?;
        self.with_inode(path, |i| {
            let start = offset as usize;
            if i.data.len() < start + bytes.len() {
                i.data.resize(start + bytes.len(), 0);
            }
            i.data[start..start + bytes.len()].copy_from_slice(bytes);
        })
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        self.with_inode(path, |i| i.data.resize(len as usize, 0))
    }
    fn sync(&self, path: &Path) -> io::Result<()> {
        self.take_sync()?;
        self.with_inode(path, |i| i.synced = i.data.clone())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.take_sync()?;
        let mut s = self.state.lock();
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable_names.retain(|p, _| !in_dir(p));
        let now: Vec<(PathBuf, u64)> =
            s.names.iter().filter(|(p, _)| in_dir(p)).map(|(p, i)| (p.clone(), *i)).collect();
        s.durable_names.extend(now);
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state.lock();
        let i = s.names.remove(from).ok_or_else(|| not_found(from))?;
        s.names.insert(to.to_path_buf(), i);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.state.lock().names.remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_what_was_fsynced_and_a_torn_prefix_of_the_rest() {
        let d = MemDisk::new();
        let (dir, a, b) = (Path::new("/d"), Path::new("/d/a"), Path::new("/d/b"));
        d.create_new(a).expect("create");
        d.write_all_at(a, b"hello", 0).expect("write");
        d.sync(a).expect("sync");
        d.sync_dir(dir).expect("sync dir");
        d.write_all_at(a, b" world", 5).expect("write");
        d.create_new(b).expect("create b"); // its name is never made durable
        d.write_all_at(b, b"x", 0).expect("write");
        d.sync(b).expect("sync b");
        d.crash(3);
        assert_eq!(d.read(a).expect("read"), Some(b"hello wo".to_vec()), "synced part plus 3 torn bytes");
        assert_eq!(d.read(b).expect("read"), None, "a file whose directory was not synced is gone");
        assert_eq!(d.list(dir).expect("list"), vec!["a".to_string()]);
    }

    #[test]
    fn injected_failures() {
        let d = MemDisk::new();
        let a = Path::new("/d/a");
        d.create_new(a).expect("create");
        d.fail_next_sync();
        assert!(d.sync(a).is_err());
        assert!(d.sync(a).is_ok(), "only the next one fails");
        d.set_full(true);
        assert_eq!(d.write_all_at(a, b"x", 0).expect_err("full").kind(), io::ErrorKind::StorageFull);
        d.set_full(false);
        d.write_all_at(a, b"x", 0).expect("room again");
    }

    #[test]
    fn renames_survive_a_crash_only_after_the_directory_sync() {
        let d = MemDisk::new();
        let (dir, tmp, dst) = (Path::new("/d"), Path::new("/d/f.tmp"), Path::new("/d/f"));
        d.create_truncate(tmp).expect("create");
        d.write_all_at(tmp, b"v1", 0).expect("write");
        d.sync(tmp).expect("sync");
        d.rename(tmp, dst).expect("rename");
        d.crash(0);
        assert_eq!(d.read(dst).expect("read"), None, "rename not durable without the directory sync");
        d.create_truncate(tmp).expect("create");
        d.write_all_at(tmp, b"v2", 0).expect("write");
        d.sync(tmp).expect("sync");
        d.rename(tmp, dst).expect("rename");
        d.sync_dir(dir).expect("sync dir");
        d.crash(0);
        assert_eq!(d.read(dst).expect("read"), Some(b"v2".to_vec()));
    }
}
