//! Reading one batch's changes for watches, with the store lock held for one small read at a
//! time: the batch record and where its body lies are read under the lock; the body is checked
//! and decoded from the memory-mapped segment after the lock is let go; the few document bodies
//! a write set does not carry are read at most [`READS_PER_LOCK_MAX`] per hold. A small cache of
//! decoded batches lets many watchers at the same heights share one decode.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tally_codec::wire::Change;
use tally_codec::Tables;
use tally_store::state::Store;
use tally_store::Kv;

/// Store reads done under one hold of the store lock, at most, when a watch looks up document
/// bodies a batch's write set does not carry.
pub const READS_PER_LOCK_MAX: usize = 16;

/// The changes one batch made that a watch can follow, every kind (filters pick from them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchChanges {
    pub height: u64,
    /// The batch's header time.
    pub time_ms: u64,
    pub changes: Vec<Change>,
    /// What holding these costs, about ([`change_bytes`] summed, plus the entry itself).
    pub bytes: usize,
}

/// Why a batch's changes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// This replica holds no body at that height (it installed a snapshot past it).
    #[error("the history before height {oldest} is not on this replica (it installed a snapshot); watch from {oldest} or later, or from a replica that has it")]
    Compacted { oldest: u64 },
    #[error("store read failed: {0}")]
    Failed(String),
    /// The store lock was not free before the watch's answer time: the store thread holds it
    /// through a write (rusty-leveldb compacts inside `write`, for seconds at full load).
    #[error("the store is busy with a write")]
    StoreBusy,
}

/// The store lock, waited for until `deadline` at most: a watch never sits behind a long store
/// write past its answer time.
fn lock_until<K: Kv>(
    store: &Mutex<Store<K>>,
    deadline: Instant,
) -> Result<parking_lot::MutexGuard<'_, Store<K>>, ReadError> {
    store.try_lock_until(deadline).ok_or(ReadError::StoreBusy)
}

/// What one event costs a page, about: its fixed fields, and the bytes it carries.
pub fn change_bytes(c: &Change) -> usize {
    64 + match c {
        Change::DocSet { value, .. } => value.len(),
        Change::ClaimGranted { domain, .. } | Change::ClaimReleased { domain, .. } => domain.len(),
        _ => 0,
    }
}

/// Where a batch's body lies, read under one short hold of the store lock.
pub struct Located {
    pub height: u64,
    pub time_ms: u64,
    pub body: tally_store::segments::MappedValue,
}

/// The batch at `height`: its record under the lock, its body's place in the segments.
///
/// # Errors
/// [`ReadError::Compacted`] when this store has no body there; [`ReadError::Failed`].
pub fn locate<K: Kv>(store: &Mutex<Store<K>>, height: u64, deadline: Instant) -> Result<Located, ReadError> {
    let found = {
        let s = lock_until(store, deadline)?;
        match s.batch(height) {
            Ok(Some(r)) if !r.body_ref.is_empty() => Some(s.batch_body_mapped(&r).map(|b| (r.header.time_ms, b))),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    };
    match found {
        Some(Ok((time_ms, body))) => Ok(Located { height, time_ms, body }),
        Some(Err(e)) => Err(ReadError::Failed(e.to_string())),
        None => Err(ReadError::Compacted { oldest: oldest_height(store, height, deadline)? }),
    }
}

/// Decodes a located body outside the lock and turns its write set into changes; document
/// bodies the write set does not carry are read from the store a few per lock hold.
///
/// # Errors
/// [`ReadError::Failed`] for a body or value that does not decode, or a failed read.
pub fn changes<K: Kv>(
    store: &Mutex<Store<K>>,
    tables: &Tables,
    at: &Located,
    deadline: Instant,
) -> Result<BatchChanges, ReadError> {
    let bytes = at.body.check().map_err(|e| ReadError::Failed(e.to_string()))?;
    let body = tally_store::state::decode_batch_body(bytes).map_err(|e| ReadError::Failed(e.to_string()))?;
    let ops = &body.write_set.ops;
    let mut changes = Vec::new();
    // (index in `changes`, the body key to read) for document bodies the write set lacks.
    let mut missing: Vec<(usize, Vec<u8>)> = Vec::new();
    for op in ops {
        let Some((mut change, body_digest)) = change_of(tables, &op.key, op.value.as_deref())? else { continue };
        if let (Change::DocSet { value, .. }, Some(digest)) = (&mut change, body_digest) {
            let key = tables.doc_body(&digest).to_bytes();
            match ops.iter().find(|o| o.key == key) {
                Some(o) => *value = o.value.clone().unwrap_or_default(),
                None => missing.push((changes.len(), key)),
            }
        }
        changes.push(change);
    }
    for chunk in missing.chunks(READS_PER_LOCK_MAX) {
        let values: Vec<Option<Vec<u8>>> = {
            let s = lock_until(store, deadline)?;
            chunk
                .iter()
                .map(|(_, k)| s.get_raw(k))
                .collect::<Result<_, _>>()
                .map_err(|e| ReadError::Failed(e.to_string()))?
        };
        for ((i, _), v) in chunk.iter().zip(values) {
            if let Change::DocSet { value, .. } = &mut changes[*i] {
                *value = v.unwrap_or_default();
            }
        }
    }
    let bytes = 64 + changes.iter().map(change_bytes).sum::<usize>();
    Ok(BatchChanges { height: at.height, time_ms: at.time_ms, changes, bytes })
}

fn bad(what: &str) -> ReadError {
    ReadError::Failed(format!("a stored {what} does not decode"))
}

/// The change a write-set op makes, if watches follow its table, and for a set document the
/// digest of its body (the caller fills the value in).
fn change_of(
    tables: &Tables,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<Option<(Change, Option<tally_codec::Digest>)>, ReadError> {
    if let Some(doc) = tables.doc_of(key) {
        let Some(v) = value else { return Ok(Some((Change::DocDeleted { key: doc }, None))) };
        let meta: tally_codec::DocMeta = tally_codec::decode(v, 1024).map_err(|_| bad("document"))?;
        let set = Change::DocSet {
            key: doc,
            owner: meta.owner,
            revision: meta.revision,
            lease: meta.lease,
            value: Vec::new(),
        };
        return Ok(Some((set, Some(meta.body))));
    }
    if let Some((domain, slot)) = tables.claim_of(key) {
        let Some(v) = value else { return Ok(Some((Change::ClaimReleased { domain, slot }, None))) };
        let c: tally_codec::ClaimMeta = tally_codec::decode(v, 1024).map_err(|_| bad("claim"))?;
        return Ok(Some((Change::ClaimGranted { domain, slot, holder: c.holder, lease: c.lease }, None)));
    }
    if let Some(lease) = tables.lease_id_of(key) {
        let Some(v) = value else { return Ok(Some((Change::LeaseEnded { lease }, None))) };
        let m: tally_codec::LeaseMeta =
            tally_codec::decode(v, tally_codec::limits::REQUEST_BYTES_MAX * 2).map_err(|_| bad("lease"))?;
        return Ok(Some((Change::LeaseSet { lease, owner: m.owner, expires_at_ms: m.expires_at_ms }, None)));
    }
    Ok(None)
}

/// The oldest height at or above `missing` this store holds a body for (they are contiguous up
/// to the applied height): a binary search, one read per lock hold.
fn oldest_height<K: Kv>(store: &Mutex<Store<K>>, missing: u64, deadline: Instant) -> Result<u64, ReadError> {
    let has = |h: u64| -> Result<bool, ReadError> {
        Ok(lock_until(store, deadline)?.batch(h).ok().flatten().is_some_and(|r| !r.body_ref.is_empty()))
    };
    let (mut lo, mut hi) = (missing + 1, lock_until(store, deadline)?.applied().height.max(missing + 1));
    if !has(hi)? {
        return Ok(hi + 1);
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if has(mid)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// Decoded batches shared by every watcher, the oldest inserted evicted first, within
/// `bytes_max` (an entry over a quarter of it is not kept).
pub struct Cache {
    bytes_max: usize,
    bytes: usize,
    map: HashMap<u64, Arc<BatchChanges>>,
    order: VecDeque<u64>,
}

impl Cache {
    pub fn new(bytes_max: usize) -> Cache {
        Cache { bytes_max, bytes: 0, map: HashMap::new(), order: VecDeque::new() }
    }

    pub fn get(&self, height: u64) -> Option<Arc<BatchChanges>> {
        self.map.get(&height).cloned()
    }

    pub fn contains(&self, height: u64) -> bool {
        self.map.contains_key(&height)
    }

    pub fn insert(&mut self, b: Arc<BatchChanges>) {
        if b.bytes > self.bytes_max / 4 || self.map.contains_key(&b.height) {
            return;
        }
        while self.bytes + b.bytes > self.bytes_max {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(e) = self.map.remove(&old) {
                self.bytes -= e.bytes;
            }
        }
        self.bytes += b.bytes;
        self.order.push_back(b.height);
        self.map.insert(b.height, b);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_codec::{BatchEntry, BatchHeader, Digest, DocMeta, PublicKey, Signature, WriteOp, WriteSet};

    fn doc_ops(tables: &Tables, n: u8, with_body: bool) -> Vec<WriteOp> {
        let value = format!(r#"{{"n":{n}}}"#).into_bytes();
        let digest = Digest([n; 32]);
        let meta = DocMeta { owner: PublicKey([1; 32]), revision: 1, body: digest, lease: None };
        let mut ops = vec![WriteOp {
            key: tables.doc(&tally_codec::DocKey([n; 16])).into_bytes(),
            value: Some(tally_codec::encode(&meta)),
        }];
        if with_body {
            ops.push(WriteOp { key: tables.doc_body(&digest).to_bytes(), value: Some(value) });
        }
        ops
    }

    fn entry(height: u64, prev_hash: Digest, ops: Vec<WriteOp>) -> BatchEntry {
        let write_set = WriteSet { ops };
        let header = BatchHeader {
            cluster_id: tally_codec::ClusterId([0; 16]),
            height,
            prev_hash,
            merkle_root: Digest([0; 32]),
            leaf_count: 0,
            write_set_digest: write_set.digest(),
            state_digest: Digest([0; 32]),
            term: 1,
            time_ms: 1_000 + height,
        };
        BatchEntry { header, requests: Vec::new(), outcomes: Vec::new(), write_set }
    }

    #[test]
    fn a_batch_is_read_in_short_holds_and_its_document_bodies_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("store");
        store.init_genesis(&[]).expect("genesis");
        let tables = *store.tables();
        // Height 1 writes the bodies; height 2 sets the same values again (bodies not rewritten).
        let first: Vec<WriteOp> = (0..40).flat_map(|n| doc_ops(&tables, n, true)).collect();
        let again: Vec<WriteOp> = (0..40).flat_map(|n| doc_ops(&tables, n, false)).collect();
        let one = entry(1, Digest([0; 32]), first);
        store.apply_batch(1, &one, &Signature([0; 64])).expect("apply 1");
        store.apply_batch(2, &entry(2, one.header.hash(), again), &Signature([0; 64])).expect("apply 2");
        let store = Mutex::new(store);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        for h in [1, 2] {
            let at = locate(&store, h, deadline).expect("located");
            let got = changes(&store, &tables, &at, deadline).expect("changes");
            assert_eq!((got.height, got.time_ms, got.changes.len()), (h, 1_000 + h, 40));
            for (n, c) in got.changes.iter().enumerate() {
                match c {
                    Change::DocSet { value, .. } => assert_eq!(value, &format!(r#"{{"n":{n}}}"#).into_bytes()),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    /// A store write holding the lock (a LevelDB compaction inside `write` takes seconds) keeps
    /// a watch waiting until its answer time, not longer.
    #[test]
    fn a_read_gives_up_at_its_deadline_while_a_write_holds_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("store");
        store.init_genesis(&[]).expect("genesis");
        let tables = *store.tables();
        let one = entry(1, Digest([0; 32]), (0..4).flat_map(|n| doc_ops(&tables, n, true)).collect());
        store.apply_batch(1, &one, &Signature([0; 64])).expect("apply 1");
        let store = Mutex::new(store);
        let writing = store.lock();
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_millis(50);
        assert!(matches!(locate(&store, 1, deadline), Err(ReadError::StoreBusy)));
        let waited = started.elapsed();
        assert!(waited < std::time::Duration::from_secs(2), "waited {waited:?} for a held store");
        drop(writing);
        assert!(locate(&store, 1, Instant::now() + std::time::Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn the_cache_keeps_within_its_bytes_evicting_the_oldest() {
        let mut c = Cache::new(1_000);
        let b = |h: u64, bytes: usize| Arc::new(BatchChanges { height: h, time_ms: 0, changes: Vec::new(), bytes });
        for h in 1..=6 {
            c.insert(b(h, 200));
        }
        assert!(c.bytes() <= 1_000 && c.contains(2));
        assert!(!c.contains(1) && c.contains(6), "the oldest went first");
        c.insert(b(9, 300));
        assert!(!c.contains(9), "an entry over a quarter of the cache is not kept");
    }
}
