//! A small key-value trait so the state store can run on rusty-leveldb in production, a
//! `BTreeMap` in tests, and a fault-injecting wrapper in failure tests.

use crate::fsutil::sync_dir;
use crate::StoreError;
use rusty_leveldb::{LdbIterator, Options, WriteBatch, DB};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use tally_codec::WriteOp;

/// Key/value pairs in key order, as [`Kv::scan_prefix`] returns them.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The only storage operations the state store needs; small so that fakes are easy to write.
pub trait Kv {
    /// Reads one key.
    ///
    /// # Errors
    /// When the backend fails to read (never for a missing key).
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// All ops applied atomically (one LevelDB WriteBatch): one batch is one write
    /// (`docs/architecture.md` §7).
    ///
    /// # Errors
    /// When the backend fails; then none of the ops may be visible.
    fn write(&mut self, ops: &[WriteOp]) -> Result<(), StoreError>;

    /// Keys/values with this prefix, in key order, at most `limit` (for snapshots / debugging).
    ///
    /// # Errors
    /// When the backend fails to read.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError>;

    /// One page of a prefix scan: keys with `prefix` strictly after `after` (from the start when
    /// `None`), in key order, at most `limit`.
    ///
    /// # Errors
    /// When the backend fails to read.
    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KvPairs, StoreError>;

    /// Make every file durable: flush memtables if possible, fsync every file of the db and its
    /// directory. Called before the log is compacted past the applied index.
    ///
    /// # Errors
    /// When a flush or fsync fails.
    fn sync_all(&mut self) -> Result<(), StoreError>;
}

/// In-memory [`Kv`] for tests and the simulator: same semantics, no files.
#[derive(Debug, Default, Clone)]
pub struct MemKv {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> Self {
        MemKv::default()
    }

    /// Number of keys held, for tests that check nothing leaks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Kv for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.get(key).cloned())
    }

    fn write(&mut self, ops: &[WriteOp]) -> Result<(), StoreError> {
        for op in ops {
            match &op.value {
                Some(v) => self.map.insert(op.key.clone(), v.clone()),
                None => self.map.remove(&op.key),
            };
        }
        Ok(())
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KvPairs, StoreError> {
        let start = after.map_or_else(|| prefix.to_vec(), <[u8]>::to_vec);
        Ok(self
            .map
            .range(start..)
            .filter(|(k, _)| Some(k.as_slice()) != after)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        Ok(self
            .map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn sync_all(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Memtable size: larger than LevelDB's 4 MiB default so that fewer (blocking) memtable
/// compactions run inside `write` on the apply path.
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// [`Kv`] on rusty-leveldb, in stock LevelDB format (readable by LevelDB 1.23).
///
/// rusty-leveldb's `DB` takes `&mut self` even for reads, so it sits in a `RefCell`: getters stay
/// `&self`. `DB` is `Send` upstream (`unsafe impl`: its `Rc`s never leave it), and the snapshots
/// and iterators made here (which do share those `Rc`s) are dropped before each call returns, so
/// `LevelKv` is `Send` too; it is not `Sync`.
pub struct LevelKv {
    db: RefCell<DB>,
    dir: PathBuf,
}

impl LevelKv {
    /// Opens (creating if missing) a LevelDB directory with default options and a larger memtable.
    ///
    /// # Errors
    /// When LevelDB cannot open the directory (locked by another process, corrupt, I/O).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_write_buffer(dir, WRITE_BUFFER_BYTES)
    }

    /// Like [`LevelKv::open`] with another memtable size (small ones let tests reach table files).
    ///
    /// # Errors
    /// As [`LevelKv::open`].
    pub fn open_with_write_buffer(dir: &Path, write_buffer_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        // reuse_logs must be off: rusty-leveldb's default (on) appends new records after a torn
        // log tail left by a crash, and the next recovery stops at the tear, silently dropping
        // everything written since (tests/leveldb_torn_log.rs). Off, recovery writes the
        // recovered memtable to a table and starts a fresh log, as stock LevelDB does.
        let opts = Options {
            create_if_missing: true,
            write_buffer_size: write_buffer_bytes,
            reuse_logs: false,
            ..Options::default()
        };
        let db = DB::open(dir, opts).map_err(|s| match StoreError::from(s) {
            StoreError::Level { kind, message } => {
                StoreError::Level { kind, message: format!("opening {}: {message}", dir.display()) }
            }
            other => other,
        })?;
        Ok(LevelKv { db: RefCell::new(db), dir: dir.to_path_buf() })
    }

    /// The LevelDB directory, for tools that inspect or copy it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl std::fmt::Debug for LevelKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LevelKv").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Kv for LevelKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut db = self.db.borrow_mut();
        // `DB::get` turns read errors into `None`; `get_at` reports them, so a failed read is
        // never mistaken for a missing key.
        let snapshot = db.get_snapshot();
        Ok(db.get_at(&snapshot, key)?.map(|b| b.to_vec()))
    }

    fn write(&mut self, ops: &[WriteOp]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for op in ops {
            match &op.value {
                Some(v) => batch.put(&op.key, v),
                None => batch.delete(&op.key),
            }
        }
        self.db.get_mut().write(batch, false)?;
        Ok(())
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KvPairs, StoreError> {
        let mut db = self.db.borrow_mut();
        let mut it = db.new_iter()?;
        let mut out = Vec::new();
        it.seek(after.unwrap_or(prefix));
        while it.valid() && out.len() < limit {
            let Some((k, v)) = it.current() else { break };
            if !k.starts_with(prefix) {
                break;
            }
            if Some(&k[..]) != after {
                out.push((k.to_vec(), v.to_vec()));
            }
            it.advance();
        }
        Ok(out)
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        let mut db = self.db.borrow_mut();
        let mut it = db.new_iter()?;
        let mut out = Vec::new();
        it.seek(prefix);
        while it.valid() && out.len() < limit {
            let Some((k, v)) = it.current() else { break };
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
            it.advance();
        }
        Ok(out)
    }

    fn sync_all(&mut self) -> Result<(), StoreError> {
        // `flush` pushes the log writer's buffer to the OS; rusty-leveldb never fsyncs, so every
        // file of the directory (log, tables, MANIFEST, CURRENT) and the directory are synced here.
        self.db.get_mut().flush()?;
        let entries = std::fs::read_dir(&self.dir).map_err(|e| StoreError::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(&self.dir, e))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|e| StoreError::io(&path, e))?;
            if !file_type.is_file() {
                continue;
            }
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(|e| StoreError::io(&path, e))?,
                // Deleted by LevelDB between listing and opening: nothing left to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        }
        sync_dir(&crate::disk::OsDisk::default(), &self.dir)
    }
}

/// Wraps a [`Kv`] and fails on command, to test that callers survive and report backend errors.
#[derive(Debug, Default)]
pub struct FaultyKv<K: Kv> {
    inner: K,
    /// Writes that still succeed before every later write fails (`None`: never fail).
    pub writes_ok_left: Option<u64>,
    /// When set, every `sync_all` fails.
    pub fail_sync: bool,
}

impl<K: Kv> FaultyKv<K> {
    /// A wrapper that passes everything through until told otherwise.
    pub fn new(inner: K) -> Self {
        FaultyKv { inner, writes_ok_left: None, fail_sync: false }
    }

    /// The wrapped store, to check what reached it.
    pub fn inner(&self) -> &K {
        &self.inner
    }
}

impl<K: Kv> Kv for FaultyKv<K> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn write(&mut self, ops: &[WriteOp]) -> Result<(), StoreError> {
        match &mut self.writes_ok_left {
            Some(0) => Err(StoreError::Injected("write")),
            Some(n) => {
                *n -= 1;
                self.inner.write(ops)
            }
            None => self.inner.write(ops),
        }
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        self.inner.scan_prefix(prefix, limit)
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KvPairs, StoreError> {
        self.inner.scan_page(prefix, after, limit)
    }

    fn sync_all(&mut self) -> Result<(), StoreError> {
        if self.fail_sync {
            return Err(StoreError::Injected("sync_all"));
        }
        self.inner.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &[u8], v: &[u8]) -> WriteOp {
        WriteOp { key: k.to_vec(), value: Some(v.to_vec()) }
    }

    fn exercise(kv: &mut dyn Kv) {
        kv.write(&[put(b"a1", b"x"), put(b"a2", b"y"), put(b"b1", b"z"), put(b"a0", b"w")]).expect("write");
        kv.write(&[WriteOp { key: b"a0".to_vec(), value: None }]).expect("delete");
        assert_eq!(kv.get(b"a1").expect("get"), Some(b"x".to_vec()));
        assert_eq!(kv.get(b"a0").expect("get"), None);
        let scan = kv.scan_prefix(b"a", 10).expect("scan");
        assert_eq!(scan, vec![(b"a1".to_vec(), b"x".to_vec()), (b"a2".to_vec(), b"y".to_vec())]);
        assert_eq!(kv.scan_prefix(b"a", 1).expect("scan").len(), 1);
        assert!(kv.scan_prefix(b"c", 10).expect("scan").is_empty());
        // Pages: strictly after the given key, within the prefix, bounded.
        let first = kv.scan_page(b"a", None, 1).expect("page");
        assert_eq!(first, vec![(b"a1".to_vec(), b"x".to_vec())]);
        let second = kv.scan_page(b"a", Some(b"a1"), 1).expect("page");
        assert_eq!(second, vec![(b"a2".to_vec(), b"y".to_vec())]);
        assert!(kv.scan_page(b"a", Some(b"a2"), 10).expect("page").is_empty(), "b1 is outside the prefix");
        kv.sync_all().expect("sync");
    }

    #[test]
    fn mem_kv_semantics() {
        exercise(&mut MemKv::new());
    }

    #[test]
    fn level_kv_semantics_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut kv = LevelKv::open(dir.path()).expect("open");
            exercise(&mut kv);
        }
        let kv = LevelKv::open(dir.path()).expect("reopen");
        assert_eq!(kv.get(b"a2").expect("get"), Some(b"y".to_vec()));
        assert_eq!(kv.get(b"a0").expect("get"), None);
    }

    #[test]
    fn level_kv_survives_memtable_compactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = |i: u32| format!("key-{i:06}").into_bytes();
        {
            let mut kv = LevelKv::open_with_write_buffer(dir.path(), 32 * 1024).expect("open");
            for chunk in 0..40u32 {
                let ops: Vec<WriteOp> = (chunk * 50..chunk * 50 + 50).map(|i| put(&key(i), &[i as u8; 100])).collect();
                kv.write(&ops).expect("write");
            }
            kv.sync_all().expect("sync_all");
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.ends_with(".ldb")), "memtables were written to tables: {names:?}");
        let kv = LevelKv::open(dir.path()).expect("reopen");
        for i in [0u32, 777, 1999] {
            assert_eq!(kv.get(&key(i)).expect("get"), Some(vec![i as u8; 100]));
        }
        assert_eq!(kv.scan_prefix(b"key-", 5000).expect("scan").len(), 2000);
    }

    #[test]
    fn faulty_kv_fails_on_command() {
        let mut kv = FaultyKv::new(MemKv::new());
        kv.writes_ok_left = Some(1);
        kv.write(&[put(b"k", b"v")]).expect("first write passes");
        assert!(matches!(kv.write(&[put(b"k2", b"v")]), Err(StoreError::Injected(_))));
        assert_eq!(kv.inner().len(), 1);
        kv.fail_sync = true;
        assert!(kv.sync_all().is_err());
    }
}
