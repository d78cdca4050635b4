//! The application state store: the view rebuilt from the log. One committed batch is one
//! atomic [`Kv::write`] that also moves the applied index, so the state and the point in the log
//! it reflects can never disagree.

use crate::kv::{Kv, LevelKv, MemKv};
use crate::segments::{SegmentRef, Segments, SEGMENT_REF_BYTES};
use crate::StoreError;
use borsh::{BorshDeserialize, BorshSerialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use tally_codec::limits::ENTRY_BYTES_MAX;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{
    decode, encode, BatchBody, BatchEntry, BatchIds, BatchRecord, Digest, DocKey, DocMeta, PublicKey, Receipt,
    RequestId, RequestLocation, Signature, Tables, WriteOp,
};

/// Segment files for batch bodies roll at this size.
pub const BODY_SEGMENT_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Bound for decoding a stored [`BatchRecord`] (fixed-size header, signature, small body ref).
const BATCH_RECORD_BYTES_MAX: usize = 4096;
/// Bound for decoding small stored values ([`DocMeta`], [`RequestLocation`], [`Applied`]).
const SMALL_VALUE_BYTES_MAX: usize = 1024;

const META_SCHEMA: &str = "schema";
const META_APPLIED: &str = "applied";
const META_GENESIS: &str = "genesis";
const META_INSTALLING: &str = "installing";
const META_CONF: &str = "conf";

/// What the `requests` table holds per batch: the batch's time and latest expiry, and where
/// the batch's [`BatchIds`] are in the segment files. The ids (40 bytes a request, ~1.6 MB/s
/// at 40k requests/s) stay out of LevelDB, whose compactions run inside `write` and held the
/// store for seconds once they were there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
struct IdsRecord {
    time_ms: u64,
    expires_max_ms: u64,
    at: SegmentRef,
}

/// Bound for decoding an [`IdsRecord`].
const IDS_RECORD_BYTES: usize = 16 + SEGMENT_REF_BYTES;

/// Batch bodies inlined in a state snapshot (the most recent ones).
pub const SNAPSHOT_BODIES_MAX: u64 = 64;

/// What [`Store::export_snapshot`] produces and [`Store::install_snapshot`] consumes.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct StateSnapshot {
    pub applied: Applied,
    /// Every non-meta key and value, batch records with an empty body reference, and the
    /// `requests` table's values as whole [`BatchIds`] (a store keeps them in its segments).
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// (height, encoded body) of the most recent batches.
    pub bodies: Vec<(u64, Vec<u8>)>,
}

/// Where the state is in the log and the chain: replay resumes after `index`, the next batch
/// must have height `height + 1` and `prev_hash == header_hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Applied {
    /// Last log index applied (batch or not).
    pub index: u64,
    /// Height of the last batch applied (0 before the first).
    pub height: u64,
    /// Hash of that batch's header (zeros before the first).
    pub header_hash: Digest,
    /// That batch's state digest (zeros before the first).
    pub state_digest: Digest,
    /// Raft term of the entry at `index` (0 when unknown: a store written before terms were
    /// recorded, or fresh).
    pub term: u64,
    /// Header time of the last batch (0 before the first).
    pub time_ms: u64,
}

impl Default for Applied {
    fn default() -> Self {
        Applied { index: 0, height: 0, header_hash: Digest::ZERO, state_digest: Digest::ZERO, term: 0, time_ms: 0 }
    }
}

/// The state of one replica: documents, balances, batches, request locations.
///
/// `Store<LevelKv>` is `Send` but not `Sync` (see the crate docs): one thread owns it at a time.
pub struct Store<K: Kv = LevelKv> {
    kv: K,
    segments: Segments,
    tables: Tables,
    applied: Applied,
    initialized: bool,
    /// The batches that may hold unexpired ids, oldest first: a receipt looked up by id alone
    /// is found among them (8 bytes per id in memory; the ids themselves are on disk).
    recent: VecDeque<RecentIds>,
}

/// The ids of one recent batch, as 8-byte prefixes in leaf order.
#[derive(Debug)]
struct RecentIds {
    height: u64,
    expires_max_ms: u64,
    prefixes: Vec<u64>,
}

impl RecentIds {
    fn of(height: u64, ids: &[(RequestId, u64)]) -> RecentIds {
        RecentIds {
            height,
            expires_max_ms: ids.iter().map(|(_, e)| *e).max().unwrap_or(0),
            prefixes: ids.iter().map(|(id, _)| id_prefix(id)).collect(),
        }
    }
}

fn id_prefix(id: &RequestId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// Decodes a batch body's stored bytes (see [`Store::batch_body_mapped`]).
///
/// # Errors
/// [`StoreError::Decode`] for bytes that are not a body.
pub fn decode_batch_body(bytes: &[u8]) -> Result<BatchBody, StoreError> {
    decode(bytes, ENTRY_BYTES_MAX).map_err(|e| StoreError::decode("batch body", e))
}

/// How far before the applied batch's time a batch may still hold an unexpired id: stage 2
/// refuses expiries more than 2 minutes ahead; the rest is room for clocks.
const RECENT_SCAN_SLACK_MS: u64 = 5 * 60 * 1000;

impl<K: Kv> std::fmt::Debug for Store<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("applied", &self.applied).field("initialized", &self.initialized).finish()
    }
}

impl Store<LevelKv> {
    /// Opens the on-disk store: LevelDB in `dir/state`, body segments in `dir/segments`.
    ///
    /// # Errors
    /// [`StoreError::SchemaMismatch`] for a store of another schema; LevelDB and I/O errors.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let kv = LevelKv::open(&dir.join("state"))?;
        Store::from_parts(kv, &dir.join("segments"))
    }
}

impl Store<MemKv> {
    /// A store with in-memory keys (bodies still go to real segment files), for tests.
    ///
    /// # Errors
    /// I/O errors on the segment directory.
    pub fn in_memory(dir_for_segments: &Path) -> Result<Self, StoreError> {
        Store::from_parts(MemKv::new(), dir_for_segments)
    }
}

impl<K: Kv> Store<K> {
    /// Builds a store on any [`Kv`] (e.g. a fault-injecting one), checking the schema.
    ///
    /// # Errors
    /// [`StoreError::SchemaMismatch`] when the kv holds data of another schema (or data without
    /// a schema marker); backend errors.
    pub fn from_parts(mut kv: K, segments_dir: &Path) -> Result<Self, StoreError> {
        let tables = Tables::v1();
        let expected = tables.fingerprint();
        let schema_key = tables.meta(META_SCHEMA).into_bytes();
        match kv.get(&schema_key)? {
            Some(found) if found == expected => {}
            Some(found) => {
                return Err(StoreError::SchemaMismatch { found: hex(&found), expected: hex(&expected) });
            }
            None if kv.scan_prefix(&[], 1)?.is_empty() => {
                kv.write(&[WriteOp { key: schema_key, value: Some(expected) }])?;
            }
            None => {
                return Err(StoreError::SchemaMismatch { found: "(missing)".into(), expected: hex(&expected) });
            }
        }
        let applied = match kv.get(tables.meta(META_APPLIED).as_bytes())? {
            Some(bytes) => {
                decode(&bytes, SMALL_VALUE_BYTES_MAX).map_err(|e| StoreError::decode("applied marker", e))?
            }
            None => Applied::default(),
        };
        if kv.get(tables.meta(META_INSTALLING).as_bytes())?.is_some() {
            return Err(StoreError::Inconsistent(
                "a snapshot install was interrupted; remove this replica's data directory and let it resync".into(),
            ));
        }
        let initialized = kv.get(tables.meta(META_GENESIS).as_bytes())?.is_some();
        let segments = Segments::open(segments_dir, BODY_SEGMENT_BYTES_MAX)?;
        let mut store = Store { kv, segments, tables, applied, initialized, recent: VecDeque::new() };
        store.load_recent()?;
        Ok(store)
    }

    /// Rebuilds the in-memory index of recent ids from the per-batch records, newest first,
    /// back to the first batch too old to hold an unexpired id.
    fn load_recent(&mut self) -> Result<(), StoreError> {
        self.recent.clear();
        let now = self.applied.time_ms;
        let mut height = self.applied.height;
        while height > 0 {
            let Some(record) = self.ids_record(height)? else { break };
            if record.time_ms.saturating_add(RECENT_SCAN_SLACK_MS) < now {
                break;
            }
            if record.expires_max_ms >= now {
                let rec = self.ids_at(&record)?;
                self.recent.push_front(RecentIds::of(height, &rec.ids));
            }
            height -= 1;
        }
        Ok(())
    }

    /// The ids record of the batch at `height`.
    ///
    /// # Errors
    /// Backend and decode errors.
    pub fn batch_ids(&self, height: u64) -> Result<Option<BatchIds>, StoreError> {
        match self.ids_record(height)? {
            Some(record) => Ok(Some(self.ids_at(&record)?)),
            None => Ok(None),
        }
    }

    fn ids_record(&self, height: u64) -> Result<Option<IdsRecord>, StoreError> {
        self.get_decoded(self.tables.batch_ids(height).as_bytes(), IDS_RECORD_BYTES, "batch ids record")
    }

    fn ids_at(&self, record: &IdsRecord) -> Result<BatchIds, StoreError> {
        let bytes = self.segments.read(&record.at)?;
        decode(&bytes, ENTRY_BYTES_MAX).map_err(|e| StoreError::decode("batch ids", e))
    }

    /// Appends `ids` to the segments (made durable by the caller's segment sync) and returns
    /// the write that records where they are.
    fn ids_op(&mut self, height: u64, ids: &BatchIds) -> Result<WriteOp, StoreError> {
        let at = self.segments.append(&encode(ids))?;
        let record = IdsRecord { time_ms: ids.time_ms, expires_max_ms: ids.expires_max_ms, at };
        Ok(WriteOp { key: self.tables.batch_ids(height).into_bytes(), value: Some(encode(&record)) })
    }

    /// The key layout, so callers build write sets with the same table ids the store reads.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Where the state is; replay the log from `applied().index + 1`. Zeros when fresh.
    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// Whether genesis balances were written (a replica must not apply batches before).
    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// Raw read of any key, for stage 3's snapshot reads of keys it builds from [`Tables`].
    ///
    /// # Errors
    /// Backend errors.
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv.get(key)
    }

    /// The underlying kv, for snapshots and debugging tools.
    /// Every key and value of one table (by table id prefix), in key order.
    ///
    /// # Errors
    /// Backend errors.
    /// One bounded page of a table (see [`crate::kv::Kv::scan_page`]).
    ///
    /// # Errors
    /// Backend read errors.
    pub fn kv_scan_page(
        &self,
        table: &[u8; 4],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::kv::KvPairs, StoreError> {
        self.kv.scan_page(table, after, limit)
    }

    pub fn kv_scan(&self, table: &[u8; 4]) -> Result<crate::kv::KvPairs, StoreError> {
        self.kv.scan_prefix(table, usize::MAX)
    }

    pub fn kv(&self) -> &K {
        &self.kv
    }

    /// Writes genesis balances and the genesis marker in one atomic write. Only once.
    ///
    /// # Errors
    /// [`StoreError::AlreadyInitialized`]; [`StoreError::InvalidArgument`] for a duplicate
    /// account; backend errors.
    pub fn init_genesis(&mut self, balances: &[(PublicKey, u64)]) -> Result<(), StoreError> {
        if self.initialized {
            return Err(StoreError::AlreadyInitialized);
        }
        let mut unique = BTreeMap::new();
        for (key, balance) in balances {
            if unique.insert(*key, *balance).is_some() {
                return Err(StoreError::InvalidArgument(format!("genesis lists account {key} twice")));
            }
        }
        let mut ops: Vec<WriteOp> = unique
            .iter()
            .map(|(key, balance)| WriteOp { key: self.tables.account(key).into_bytes(), value: Some(encode(balance)) })
            .collect();
        ops.push(WriteOp { key: self.tables.meta(META_GENESIS).into_bytes(), value: Some(vec![1]) });
        self.kv.write(&ops)?;
        self.initialized = true;
        Ok(())
    }

    /// Applies one committed batch as ONE atomic [`Kv::write`]: the write set, the
    /// [`BatchRecord`] at its height, a [`RequestLocation`] per request and the applied marker.
    /// The body goes to a segment file first and is synced, so a durable index never points at
    /// a lost body.
    ///
    /// # Errors
    /// Backend and I/O errors; then nothing of the batch is applied in the kv.
    ///
    /// # Panics
    /// If the chain is broken (height, previous hash), `index` does not advance, the entry's
    /// leaf counts disagree, or the write set touches the store's own meta table.
    pub fn apply_batch(&mut self, index: u64, entry: &BatchEntry, signature: &Signature) -> Result<(), StoreError> {
        self.apply_batch_with_ids(index, entry, &entry.ids(), signature)
    }

    /// [`Store::apply_batch`] with the request ids already computed (`ids[i]` is request `i`'s).
    ///
    /// # Errors
    /// As [`Store::apply_batch`].
    ///
    /// # Panics
    /// As [`Store::apply_batch`], and when `ids` has not one id per request.
    pub fn apply_batch_with_ids(
        &mut self,
        index: u64,
        entry: &BatchEntry,
        ids: &[tally_codec::RequestId],
        signature: &Signature,
    ) -> Result<(), StoreError> {
        let header = &entry.header;
        assert_eq!(ids.len(), entry.requests.len(), "one id per request");
        assert!(index > self.applied.index, "log index {index} does not advance past {}", self.applied.index);
        assert_eq!(header.height, self.applied.height + 1, "chain broken: batch height does not follow");
        assert_eq!(header.prev_hash, self.applied.header_hash, "chain broken: prev_hash is not the last header's hash");
        assert_eq!(entry.requests.len(), entry.outcomes.len(), "one outcome per request");
        assert_eq!(entry.requests.len(), header.leaf_count as usize, "leaf count matches requests");
        let meta_table = self.tables.meta.0;
        assert!(!entry.write_set.ops.iter().any(|op| op.key.starts_with(&meta_table)), "write set touches store meta");

        // Same bytes as `encode(&BatchBody { requests, outcomes, write_set })`, without cloning.
        let mut body = Vec::new();
        borsh::to_writer(&mut body, &entry.requests).expect("borsh into a Vec cannot fail");
        borsh::to_writer(&mut body, &entry.outcomes).expect("borsh into a Vec cannot fail");
        borsh::to_writer(&mut body, &entry.write_set).expect("borsh into a Vec cannot fail");
        let body_ref = self.segments.append(&body)?;
        let batch_ids = BatchIds::new(
            header.time_ms,
            ids.iter().zip(&entry.requests).map(|(id, r)| (*id, r.request.expires_at_ms)).collect(),
        );
        let ids_op = self.ids_op(header.height, &batch_ids)?;
        self.segments.sync()?;

        // A batch is proposed in the term it was built in, so its entry's term is the header's.
        let applied = Applied {
            index,
            height: header.height,
            header_hash: header.hash(),
            state_digest: header.state_digest,
            term: header.term,
            time_ms: header.time_ms,
        };
        let record = BatchRecord { header: header.clone(), signature: *signature, body_ref: encode(&body_ref) };
        let mut ops = Vec::with_capacity(entry.write_set.ops.len() + entry.requests.len() + 2);
        ops.extend(entry.write_set.ops.iter().cloned());
        ops.push(WriteOp { key: self.tables.batch(header.height).into_bytes(), value: Some(encode(&record)) });
        ops.push(ids_op);
        ops.push(self.applied_op(&applied));
        self.kv.write(&ops)?;
        self.applied = applied;
        self.recent.push_back(RecentIds::of(header.height, &batch_ids.ids));
        while self.recent.front().is_some_and(|r| r.expires_max_ms < header.time_ms) {
            self.recent.pop_front();
        }
        Ok(())
    }

    /// A log entry that is not a batch (Raft no-op / conf change): only advances the index.
    ///
    /// # Errors
    /// Backend errors.
    ///
    /// # Panics
    /// If `index` does not advance.
    pub fn apply_noop(&mut self, index: u64) -> Result<(), StoreError> {
        self.apply_noop_at(index, self.applied.term)
    }

    /// As [`Self::apply_noop`], recording the entry's Raft term.
    ///
    /// # Errors
    /// Backend errors.
    ///
    /// # Panics
    /// If `index` does not advance.
    pub fn apply_noop_at(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        assert!(index > self.applied.index, "log index {index} does not advance past {}", self.applied.index);
        let applied = Applied { index, term, ..self.applied };
        self.kv.write(&[self.applied_op(&applied)])?;
        self.applied = applied;
        Ok(())
    }

    /// A configuration change at `index`: the applied marker and the configuration (opaque
    /// bytes, raft-rs's `ConfState`) in one atomic write.
    ///
    /// # Errors
    /// Backend errors.
    ///
    /// # Panics
    /// If `index` does not advance.
    pub fn apply_conf(&mut self, index: u64, term: u64, conf: &[u8]) -> Result<(), StoreError> {
        assert!(index > self.applied.index, "log index {index} does not advance past {}", self.applied.index);
        let applied = Applied { index, term, ..self.applied };
        let conf_op = WriteOp { key: self.tables.meta(META_CONF).into_bytes(), value: Some(conf.to_vec()) };
        self.kv.write(&[conf_op, self.applied_op(&applied)])?;
        self.applied = applied;
        Ok(())
    }

    /// The configuration as of the applied index (`None` while the initial one holds).
    ///
    /// # Errors
    /// Backend errors.
    pub fn conf(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv.get(self.tables.meta(META_CONF).as_bytes())
    }

    fn applied_op(&self, applied: &Applied) -> WriteOp {
        WriteOp { key: self.tables.meta(META_APPLIED).into_bytes(), value: Some(encode(applied)) }
    }

    /// An account's balance; `None` for an account that never held money.
    ///
    /// # Errors
    /// Backend errors; [`StoreError::Decode`] for a malformed value.
    pub fn balance(&self, account: &PublicKey) -> Result<Option<u64>, StoreError> {
        self.get_decoded(self.tables.account(account).as_bytes(), 8, "balance")
    }

    /// A document's metadata and body.
    ///
    /// # Errors
    /// Backend and decode errors; [`StoreError::Inconsistent`] if the body is missing.
    pub fn doc(&self, key: &DocKey) -> Result<Option<(DocMeta, Vec<u8>)>, StoreError> {
        let Some(meta) = self.doc_meta(key)? else { return Ok(None) };
        let body = self
            .kv
            .get(&self.tables.doc_body(&meta.body).to_bytes())?
            .ok_or_else(|| StoreError::Inconsistent(format!("document {key} has no body {}", meta.body)))?;
        Ok(Some((meta, body)))
    }

    /// A document's owner, revision and body digest (ownership checks need no body).
    ///
    /// # Errors
    /// Backend and decode errors.
    pub fn doc_meta(&self, key: &DocKey) -> Result<Option<DocMeta>, StoreError> {
        self.get_decoded(self.tables.doc(key).as_bytes(), SMALL_VALUE_BYTES_MAX, "document meta")
    }

    /// The stored header, signature and body reference at `height`.
    ///
    /// # Errors
    /// Backend and decode errors.
    pub fn batch(&self, height: u64) -> Result<Option<BatchRecord>, StoreError> {
        self.get_decoded(self.tables.batch(height).as_bytes(), BATCH_RECORD_BYTES_MAX, "batch record")
    }

    /// Loads a batch's requests and outcomes from its segment.
    ///
    /// # Errors
    /// Decode errors; [`StoreError::Corrupt`] when the segment bytes fail their checksum.
    pub fn batch_body(&self, record: &BatchRecord) -> Result<BatchBody, StoreError> {
        decode_batch_body(self.batch_body_mapped(record)?.check()?)
    }

    /// Where a batch's body lies, unchecked and undecoded: a reader that shares the store
    /// behind a lock takes this under it, then checks and decodes it ([`decode_batch_body`])
    /// after letting go, so the lock is held for one small read whatever the body's size.
    ///
    /// # Errors
    /// Decode errors of the reference; [`StoreError::Corrupt`] for a reference outside its file.
    pub fn batch_body_mapped(&self, record: &BatchRecord) -> Result<crate::segments::MappedValue, StoreError> {
        let body_ref: SegmentRef =
            decode(&record.body_ref, SEGMENT_REF_BYTES).map_err(|e| StoreError::decode("body reference", e))?;
        self.segments.read_mapped(&body_ref)
    }

    /// Where an unexpired request's receipt can be rebuilt from; `None` for an id this store
    /// does not hold among its recent batches (unknown, or past its expiry: see
    /// [`Store::receipt_at`]).
    ///
    /// # Errors
    /// Backend and decode errors.
    pub fn request_location(&self, id: &RequestId) -> Result<Option<RequestLocation>, StoreError> {
        let prefix = id_prefix(id);
        for r in self.recent.iter().rev() {
            for (leaf, _) in r.prefixes.iter().enumerate().filter(|(_, p)| **p == prefix) {
                // 8 bytes can collide: the record on disk has the whole id.
                let Some(rec) = self.batch_ids(r.height)? else { continue };
                if let Some((found, expires_at_ms)) = rec.ids.get(leaf) {
                    if found == id {
                        let leaf_index = u32::try_from(leaf).expect("leaf counts are u32");
                        return Ok(Some(RequestLocation {
                            height: r.height,
                            leaf_index,
                            expires_at_ms: *expires_at_ms,
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Executed ids whose expiry is not before `now_ms`, with their locations (exactly-once
    /// after a restart), read from the recent batches' records.
    ///
    /// # Errors
    /// Backend and decode errors.
    pub fn unexpired_ids(&self, now_ms: u64) -> Result<Vec<(RequestId, RequestLocation)>, StoreError> {
        let mut out = Vec::new();
        for r in &self.recent {
            let Some(rec) = self.batch_ids(r.height)? else { continue };
            for (leaf, (id, expires_at_ms)) in rec.ids.iter().enumerate() {
                if *expires_at_ms >= now_ms {
                    let leaf_index = u32::try_from(leaf).expect("leaf counts are u32");
                    out.push((*id, RequestLocation { height: r.height, leaf_index, expires_at_ms: *expires_at_ms }));
                }
            }
        }
        Ok(out)
    }

    /// Rebuilds the Merkle proof from the stored body and returns a full receipt, verifiable
    /// offline with [`Receipt::verify`]. Ids are found by id alone until they expire; after
    /// that, [`Store::receipt_at`] with the height finds them.
    ///
    /// # Errors
    /// Backend, decode and segment errors; [`StoreError::Inconsistent`] when the location,
    /// the batch and its body disagree.
    pub fn receipt(&self, id: &RequestId) -> Result<Option<Receipt>, StoreError> {
        let Some(location) = self.request_location(id)? else { return Ok(None) };
        self.receipt_in(id, &location)
    }

    /// The receipt of request `id` executed in the batch at `height`: any receipt, however old,
    /// that this replica executed (one that installed a snapshot lacks the batches before it).
    ///
    /// # Errors
    /// As [`Store::receipt`].
    pub fn receipt_at(&self, id: &RequestId, height: u64) -> Result<Option<Receipt>, StoreError> {
        let Some(rec) = self.batch_ids(height)? else { return Ok(None) };
        let Some(leaf) = rec.ids.iter().position(|(found, _)| found == id) else { return Ok(None) };
        let leaf_index = u32::try_from(leaf).expect("leaf counts are u32");
        self.receipt_in(id, &RequestLocation { height, leaf_index, expires_at_ms: rec.ids[leaf].1 })
    }

    fn receipt_in(&self, id: &RequestId, location: &RequestLocation) -> Result<Option<Receipt>, StoreError> {
        let record = self.batch(location.height)?.ok_or_else(|| {
            StoreError::Inconsistent(format!("request {id} points at missing batch {}", location.height))
        })?;
        let body = self.batch_body(&record)?;
        let leaf_index = location.leaf_index as usize;
        let (Some(request), Some(outcome)) = (body.requests.get(leaf_index), body.outcomes.get(leaf_index)) else {
            return Err(StoreError::Inconsistent(format!(
                "request {id} points past the end of batch {}",
                location.height
            )));
        };
        if request.id() != *id {
            return Err(StoreError::Inconsistent(format!(
                "leaf {leaf_index} of batch {} is not request {id}",
                location.height
            )));
        }
        let leaves: Vec<[u8; 32]> =
            body.requests.iter().zip(&body.outcomes).map(|(r, o)| leaf_hash(&r.id(), o)).collect();
        let tree = Tree::from_leaves(&leaves);
        if tree.root() != record.header.merkle_root || leaves.len() != record.header.leaf_count as usize {
            return Err(StoreError::Inconsistent(format!(
                "body of batch {} does not match its header",
                location.height
            )));
        }
        Ok(Some(Receipt {
            request: request.clone(),
            outcome: outcome.clone(),
            leaf_index: location.leaf_index,
            proof: tree.proof(leaf_index),
            header: record.header,
            signature: record.signature,
        }))
    }
    /// A state snapshot for a follower that fell behind the compacted log. It carries the live
    /// state, not the history, so its size follows the state: every document, body and balance;
    /// the request ids still inside their expiry window (exactly-once needs them); the last
    /// [`SNAPSHOT_BODIES_MAX`] batch records with their bodies inlined; the applied marker. Older
    /// batches and receipts stay with the replicas that executed them.
    ///
    /// # Errors
    /// Backend errors.
    pub fn export_snapshot(&self) -> Result<StateSnapshot, StoreError> {
        let meta = self.tables.meta.0;
        let batches = self.tables.batches.0;
        let requests = self.tables.requests.0;
        let head_time_ms = self.batch(self.applied.height)?.map_or(0, |r| r.header.time_ms);
        let mut pairs = Vec::new();
        let mut bodies = Vec::new();
        for (k, v) in self.kv.scan_prefix(&[], usize::MAX)? {
            if k.starts_with(&meta) {
                continue;
            }
            if k.starts_with(&batches) {
                let mut record: BatchRecord =
                    decode(&v, BATCH_RECORD_BYTES_MAX).map_err(|e| StoreError::decode("batch record", e))?;
                if record.header.height + SNAPSHOT_BODIES_MAX <= self.applied.height {
                    continue;
                }
                let r: SegmentRef = decode(&record.body_ref, SEGMENT_REF_BYTES)
                    .map_err(|e| StoreError::decode("segment reference", e))?;
                bodies.push((record.header.height, self.segments.read(&r)?));
                record.body_ref = Vec::new();
                pairs.push((k, encode(&record)));
                continue;
            }
            if k.starts_with(&requests) {
                let record: IdsRecord =
                    decode(&v, IDS_RECORD_BYTES).map_err(|e| StoreError::decode("batch ids record", e))?;
                // Expired ids can never execute again (stage 4 refuses them), so they stay behind.
                if record.expires_max_ms < head_time_ms {
                    continue;
                }
                pairs.push((k, self.segments.read(&record.at)?));
                continue;
            }
            pairs.push((k, v));
        }
        Ok(StateSnapshot { applied: self.applied, pairs, bodies })
    }

    /// Replaces the whole state with `snap`, durably, before returning. A crash midway leaves
    /// an "installing" marker that makes the next open refuse the store (it must be resynced).
    ///
    /// # Errors
    /// Backend errors; [`StoreError::InvalidArgument`] for a snapshot behind this store.
    pub fn install_snapshot(&mut self, snap: &StateSnapshot) -> Result<(), StoreError> {
        self.install_snapshot_with_conf(snap, None)
    }

    /// As [`Self::install_snapshot`], also recording the configuration as of the snapshot
    /// (the same atomic write as the applied marker).
    ///
    /// # Errors
    /// As [`Self::install_snapshot`].
    pub fn install_snapshot_with_conf(&mut self, snap: &StateSnapshot, conf: Option<&[u8]>) -> Result<(), StoreError> {
        // Judged before anything is deleted: a refused snapshot leaves the current state.
        self.refuse_unfit_snapshot(snap)?;
        let installing = self.tables.meta(META_INSTALLING).into_bytes();
        self.kv.write(&[WriteOp { key: installing.clone(), value: Some(vec![1]) }])?;
        self.kv.sync_all()?;
        self.delete_all_but_meta()?;
        self.write_snapshot_pairs(snap)?;
        self.segments.sync()?;
        let mut ops = vec![
            self.applied_op(&snap.applied),
            WriteOp { key: self.tables.meta(META_GENESIS).into_bytes(), value: Some(vec![1]) },
            WriteOp { key: installing, value: None },
        ];
        if let Some(conf) = conf {
            ops.push(WriteOp { key: self.tables.meta(META_CONF).into_bytes(), value: Some(conf.to_vec()) });
        }
        self.kv.write(&ops)?;
        self.kv.sync_all()?;
        self.applied = snap.applied;
        self.initialized = true;
        self.load_recent()
    }

    /// Refuses a snapshot that is not ahead of this store, or that would overwrite the store's
    /// own metadata.
    fn refuse_unfit_snapshot(&self, snap: &StateSnapshot) -> Result<(), StoreError> {
        fn hex_prefix(k: &[u8]) -> String {
            k.iter().take(8).map(|b| format!("{b:02x}")).collect()
        }
        if snap.applied.index <= self.applied.index {
            return Err(StoreError::InvalidArgument(format!(
                "snapshot at index {} is not ahead of the store at {}",
                snap.applied.index, self.applied.index
            )));
        }
        let meta_prefix = self.tables.meta.0;
        if let Some((k, _)) = snap.pairs.iter().find(|(k, _)| k.starts_with(&meta_prefix)) {
            return Err(StoreError::InvalidArgument(format!(
                "snapshot carries a store metadata key ({}); refused",
                hex_prefix(k)
            )));
        }
        Ok(())
    }

    /// Deletes every key but the store's metadata, in bounded writes.
    fn delete_all_but_meta(&mut self) -> Result<(), StoreError> {
        let meta = self.tables.meta.0;
        let old: Vec<Vec<u8>> = self
            .kv
            .scan_prefix(&[], usize::MAX)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !k.starts_with(&meta))
            .collect();
        for chunk in old.chunks(10_000) {
            let ops: Vec<WriteOp> = chunk.iter().map(|k| WriteOp { key: k.clone(), value: None }).collect();
            self.kv.write(&ops)?;
        }
        Ok(())
    }

    /// Writes the snapshot's pairs, in bounded writes, as the store keeps them: batch ids and
    /// batch bodies go to segments, their records point there.
    fn write_snapshot_pairs(&mut self, snap: &StateSnapshot) -> Result<(), StoreError> {
        let bodies: BTreeMap<u64, &Vec<u8>> = snap.bodies.iter().map(|(h, b)| (*h, b)).collect();
        let meta = self.tables.meta.0;
        let batches = self.tables.batches.0;
        let requests = self.tables.requests.0;
        for chunk in snap.pairs.chunks(10_000) {
            let mut ops = Vec::with_capacity(chunk.len());
            for (k, v) in chunk {
                assert!(!k.starts_with(&meta), "snapshots carry no store meta");
                if k.starts_with(&requests) {
                    let ids: BatchIds = decode(v, ENTRY_BYTES_MAX).map_err(|e| StoreError::decode("batch ids", e))?;
                    let at = self.segments.append(v)?;
                    let record = IdsRecord { time_ms: ids.time_ms, expires_max_ms: ids.expires_max_ms, at };
                    ops.push(WriteOp { key: k.clone(), value: Some(encode(&record)) });
                    continue;
                }
                let mut value = v.clone();
                if k.starts_with(&batches) {
                    let mut record: BatchRecord =
                        decode(v, BATCH_RECORD_BYTES_MAX).map_err(|e| StoreError::decode("batch record", e))?;
                    if let Some(body) = bodies.get(&record.header.height) {
                        record.body_ref = encode(&self.segments.append(body)?);
                        value = encode(&record);
                    }
                }
                ops.push(WriteOp { key: k.clone(), value: Some(value) });
            }
            self.kv.write(&ops)?;
        }
        Ok(())
    }

    /// Makes segments and kv durable; call before compacting the log past `applied().index`.
    ///
    /// # Errors
    /// Flush and fsync errors.
    pub fn sync_all(&mut self) -> Result<(), StoreError> {
        self.segments.sync()?;
        self.kv.sync_all()
    }

    fn get_decoded<T: BorshDeserialize>(
        &self,
        key: &[u8],
        bytes_max: usize,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.kv.get(key)? {
            Some(bytes) => decode(&bytes, bytes_max).map(Some).map_err(|e| StoreError::decode(what, e)),
            None => Ok(None),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::FaultyKv;
    use ed25519_dalek::SigningKey;
    use tally_codec::batch::next_state_digest;
    use tally_codec::{BatchHeader, ClusterId, Operation, Outcome, Request, SignedRequest, WriteSet};

    const CLUSTER: ClusterId = ClusterId([1; 16]);

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn operator() -> SigningKey {
        key(7)
    }

    fn pk(k: &SigningKey) -> PublicKey {
        PublicKey(k.verifying_key().to_bytes())
    }

    fn request(signer: &SigningKey, nonce: u64, op: Operation) -> SignedRequest {
        Request { cluster_id: CLUSTER, signer: pk(signer), nonce, expires_at_ms: 60_000, op }.sign(signer)
    }

    /// A batch on top of `prev` with a real Merkle root, write-set digest and state digest.
    fn batch(prev: &Applied, requests: Vec<SignedRequest>, outcomes: Vec<Outcome>, ops: Vec<WriteOp>) -> BatchEntry {
        let write_set = WriteSet { ops };
        let leaves: Vec<[u8; 32]> = requests.iter().zip(&outcomes).map(|(r, o)| leaf_hash(&r.id(), o)).collect();
        let header = BatchHeader {
            cluster_id: CLUSTER,
            height: prev.height + 1,
            prev_hash: prev.header_hash,
            merkle_root: Tree::from_leaves(&leaves).root(),
            leaf_count: u32::try_from(leaves.len()).expect("small"),
            write_set_digest: write_set.digest(),
            state_digest: next_state_digest(&prev.state_digest, &write_set.digest()),
            term: 1,
            time_ms: 1_000 + prev.height,
        };
        let entry = BatchEntry { header, requests, outcomes, write_set };
        entry.check().expect("test batch is well formed");
        entry
    }

    fn balance_op(t: &Tables, who: &SigningKey, balance: u64) -> WriteOp {
        WriteOp { key: t.account(&pk(who)).into_bytes(), value: Some(encode(&balance)) }
    }

    fn doc_key() -> DocKey {
        DocKey::parse("0d5d3807-5fbf-4228-a657-5a091c4e497f").expect("uuid4")
    }

    const BODY: &[u8] = br#"{"name": "Chapayev's Mustache comb"}"#;

    /// Genesis, batch 1 at index 1, a no-op at 2, batch 2 at index 3. Returns all request ids.
    fn scenario<K: Kv>(store: &mut Store<K>) -> Vec<RequestId> {
        let (alice, bob) = (key(1), key(2));
        let t = *store.tables();
        store.init_genesis(&[(pk(&alice), 100), (pk(&bob), 50)]).expect("genesis");
        let digest = tally_codec::hash_with_domain(b"test/doc", BODY);
        let meta = DocMeta { owner: pk(&alice), revision: 1, body: digest, lease: None };
        let r1 = vec![
            request(&alice, 1, Operation::Transfer { to: pk(&bob), amount: 30 }),
            request(&alice, 2, Operation::Set { key: doc_key(), value: BODY.to_vec() }),
        ];
        let o1 = vec![Outcome::Transferred { sender_balance: 70 }, Outcome::DocCreated { revision: 1 }];
        let ops1 = vec![
            balance_op(&t, &alice, 70),
            balance_op(&t, &bob, 80),
            WriteOp { key: t.doc(&doc_key()).into_bytes(), value: Some(encode(&meta)) },
            WriteOp { key: t.doc_body(&digest).to_bytes(), value: Some(BODY.to_vec()) },
        ];
        let b1 = batch(&store.applied(), r1.clone(), o1, ops1);
        store.apply_batch(1, &b1, &b1.header.sign(&operator())).expect("apply 1");
        store.apply_noop(2).expect("noop");

        // Checked between batches: the document exists now.
        assert_eq!(store.doc(&doc_key()).expect("doc"), Some((meta, BODY.to_vec())));

        let r2 = vec![
            request(&bob, 1, Operation::Transfer { to: pk(&alice), amount: 5 }),
            request(&alice, 3, Operation::Delete { key: doc_key() }),
            request(&bob, 2, Operation::Transfer { to: pk(&alice), amount: 1_000 }),
        ];
        let o2 = vec![
            Outcome::Transferred { sender_balance: 75 },
            Outcome::DocDeleted,
            Outcome::Rejected(tally_codec::ErrorCode::InsufficientFunds),
        ];
        let ops2 = vec![
            balance_op(&t, &alice, 75),
            balance_op(&t, &bob, 75),
            WriteOp { key: t.doc(&doc_key()).into_bytes(), value: None },
        ];
        let b2 = batch(&store.applied(), r2.clone(), o2, ops2);
        store.apply_batch(3, &b2, &b2.header.sign(&operator())).expect("apply 2");
        r1.iter().chain(&r2).map(SignedRequest::id).collect()
    }

    fn check_after_scenario<K: Kv>(store: &Store<K>, ids: &[RequestId]) {
        let (alice, bob) = (key(1), key(2));
        let applied = store.applied();
        assert_eq!((applied.index, applied.height), (3, 2));
        let last = store.batch(2).expect("batch").expect("batch 2 stored");
        assert_eq!(applied.header_hash, last.header.hash());
        assert_eq!(applied.state_digest, last.header.state_digest);
        last.header.verify(&pk(&operator()), &last.signature).expect("stored signature verifies");
        assert!(store.is_initialized());
        assert_eq!(store.balance(&pk(&alice)).expect("balance"), Some(75));
        assert_eq!(store.balance(&pk(&bob)).expect("balance"), Some(75));
        assert_eq!(store.balance(&pk(&key(3))).expect("balance"), None);
        assert_eq!(store.doc(&doc_key()).expect("doc"), None, "deleted in batch 2");
        assert_eq!(store.doc_meta(&doc_key()).expect("doc meta"), None);
        assert_eq!(store.batch(3).expect("batch"), None);
        for (i, id) in ids.iter().enumerate() {
            let receipt = store.receipt(id).expect("receipt").expect("every applied request has a receipt");
            receipt.verify(&pk(&operator())).expect("receipt verifies offline");
            assert_eq!(receipt.request_id(), *id);
            let (height, leaf) = if i < 2 { (1, i) } else { (2, i - 2) };
            assert_eq!((receipt.header.height, receipt.leaf_index as usize), (height, leaf));
            let location = store.request_location(id).expect("location").expect("stored");
            assert_eq!(location.expires_at_ms, 60_000);
            assert!(receipt.verify(&pk(&key(9))).is_err(), "another operator key must not verify");
        }
        assert_eq!(store.receipt(&RequestId([0xAB; 32])).expect("receipt"), None);
        let body = store.batch_body(&last).expect("body");
        assert_eq!(body.requests.len(), 3);
        assert_eq!(body.outcomes[1], Outcome::DocDeleted);
    }

    #[test]
    fn level_store_applies_batches_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = {
            let mut store = Store::open(dir.path()).expect("open");
            assert_eq!(store.applied(), Applied::default());
            assert!(!store.is_initialized());
            let ids = scenario(&mut store);
            check_after_scenario(&store, &ids);
            store.sync_all().expect("sync");
            ids
        };
        let store = Store::open(dir.path()).expect("reopen");
        check_after_scenario(&store, &ids);
    }

    #[test]
    fn mem_store_applies_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("open");
        let ids = scenario(&mut store);
        check_after_scenario(&store, &ids);
    }

    #[test]
    #[should_panic(expected = "chain broken")]
    fn height_gap_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("open");
        let prev = Applied { height: 1, ..Applied::default() };
        let b = batch(&prev, vec![], vec![], vec![]);
        let _ = store.apply_batch(1, &b, &b.header.sign(&operator()));
    }

    #[test]
    #[should_panic(expected = "chain broken")]
    fn wrong_prev_hash_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("open");
        let prev = Applied { header_hash: Digest([9; 32]), ..Applied::default() };
        let b = batch(&prev, vec![], vec![], vec![]);
        let _ = store.apply_batch(1, &b, &b.header.sign(&operator()));
    }

    #[test]
    #[should_panic(expected = "does not advance")]
    fn index_must_advance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("open");
        store.apply_noop(5).expect("noop");
        let _ = store.apply_noop(5);
    }

    #[test]
    fn schema_mismatch_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("create"));
        {
            let mut kv = LevelKv::open(&dir.path().join("state")).expect("raw open");
            let schema_key = Tables::v1().meta(META_SCHEMA).into_bytes();
            kv.write(&[WriteOp { key: schema_key, value: Some(vec![0xEE; 24]) }]).expect("write");
        }
        match Store::open(dir.path()) {
            Err(StoreError::SchemaMismatch { found, expected }) => {
                assert_eq!(found, "ee".repeat(24));
                assert_eq!(expected, hex(&Tables::v1().fingerprint()));
            }
            other => panic!("expected SchemaMismatch, got {other:?}"),
        }
        // Data without any schema marker is refused too.
        let mut kv = MemKv::new();
        kv.write(&[WriteOp { key: b"stranger".to_vec(), value: Some(vec![1]) }]).expect("write");
        let seg_dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(Store::from_parts(kv, seg_dir.path()), Err(StoreError::SchemaMismatch { .. })));
    }

    #[test]
    fn level_data_dir_is_stock_leveldb_after_sync_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        scenario(&mut store);
        store.sync_all().expect("sync_all");
        let names: Vec<String> = fs_names(&dir.path().join("state"));
        assert!(names.iter().any(|n| n == "CURRENT"), "{names:?}");
        let current = std::fs::read_to_string(dir.path().join("state/CURRENT")).expect("CURRENT");
        assert!(current.starts_with("MANIFEST-") && current.ends_with('\n'), "{current:?}");
        assert!(names.contains(&current.trim().to_string()), "CURRENT names an existing manifest");
        assert!(names.iter().any(|n| n.ends_with(".ldb") || n.ends_with(".log")), "{names:?}");
        assert!(names.iter().all(|n| !n.ends_with(".seg")), "segments live outside the LevelDB dir");
    }

    fn fs_names(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn genesis_is_written_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::in_memory(dir.path()).expect("open");
        let a = pk(&key(1));
        assert!(matches!(store.init_genesis(&[(a, 1), (a, 2)]), Err(StoreError::InvalidArgument(_))));
        assert!(!store.is_initialized());
        store.init_genesis(&[(a, 10)]).expect("genesis");
        assert!(matches!(store.init_genesis(&[(a, 10)]), Err(StoreError::AlreadyInitialized)));
        assert_eq!(store.balance(&a).expect("balance"), Some(10));
    }

    #[test]
    fn failed_kv_write_leaves_applied_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::from_parts(FaultyKv::new(MemKv::new()), dir.path()).expect("open");
        store.init_genesis(&[(pk(&key(1)), 10)]).expect("genesis");
        let b = batch(&store.applied(), vec![], vec![], vec![balance_op(store.tables(), &key(1), 9)]);
        let sig = b.header.sign(&operator());
        store.kv.writes_ok_left = Some(0);
        assert!(matches!(store.apply_batch(1, &b, &sig), Err(StoreError::Injected(_))));
        assert_eq!(store.applied(), Applied::default());
        assert_eq!(store.balance(&pk(&key(1))).expect("balance"), Some(10));
        // The caller retries the same entry once the backend recovers.
        store.kv.writes_ok_left = None;
        store.apply_batch(1, &b, &sig).expect("retry");
        assert_eq!(store.applied().height, 1);
        assert_eq!(store.balance(&pk(&key(1))).expect("balance"), Some(9));
    }

    #[test]
    fn threading_model() {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send::<Store<LevelKv>>();
        assert_send::<crate::Wal>();
        assert_send_sync::<Store<MemKv>>();
        assert_send_sync::<Segments>();
    }

    /// A batch costs one write for its ids, not one per request, and an id is found by itself
    /// until a later batch's time passes its expiry, by its height at any age, also after a
    /// reopen.
    #[test]
    fn ids_are_one_record_per_batch_found_by_id_until_expiry_and_by_height_always() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let ids = scenario(&mut store);
        let t = *store.tables();
        let records = store.kv.scan_prefix(&t.requests.0, usize::MAX).expect("scan");
        assert_eq!(records.len(), 2, "two batches, two records");
        // The ids are in the segment files; LevelDB (which compacts inside its writes) holds a
        // fixed-size reference whatever the batch's size.
        for (_, v) in &records {
            assert_eq!(v.len(), IDS_RECORD_BYTES, "a reference, not the ids");
        }
        // Batch 3 at a time past every expiry so far (60 s).
        let alice = key(1);
        let late = Request {
            cluster_id: CLUSTER,
            signer: pk(&alice),
            nonce: 9,
            expires_at_ms: 200_000,
            op: Operation::Transfer { to: pk(&key(2)), amount: 1 },
        }
        .sign(&alice);
        let mut b3 = batch(
            &store.applied(),
            vec![late.clone()],
            vec![Outcome::Transferred { sender_balance: 74 }],
            vec![balance_op(&t, &alice, 74)],
        );
        b3.header.time_ms = 100_000;
        store.apply_batch(4, &b3, &b3.header.sign(&operator())).expect("apply 3");
        for reopened in [false, true] {
            if reopened {
                drop(store);
                store = Store::open(dir.path()).expect("reopen");
            }
            assert_eq!(store.receipt(&ids[0]).expect("read"), None, "expired: not found by id alone");
            let old = store.receipt_at(&ids[0], 1).expect("read").expect("found by height");
            old.verify(&pk(&operator())).expect("verifies");
            assert_eq!(store.receipt_at(&ids[0], 2).expect("read"), None, "not in batch 2");
            assert_eq!(store.receipt(&late.id()).expect("read").expect("unexpired").header.height, 3);
            let live = store.unexpired_ids(100_000).expect("ids");
            assert_eq!(live.len(), 1, "{live:?}");
            assert_eq!(live[0].0, late.id());
        }
    }

    #[test]
    fn snapshot_install_reproduces_the_state_and_receipts() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut source = Store::open(&dir.path().join("a")).expect("open a");
        let ids = scenario(&mut source);
        let snap = source.export_snapshot().expect("export");
        let bytes = encode(&snap);
        let snap: StateSnapshot = decode(&bytes, usize::MAX).expect("snapshot round trip");

        let mut target = Store::open(&dir.path().join("b")).expect("open b");
        target.init_genesis(&[(pk(&key(9)), 1)]).expect("other genesis, to be replaced");
        target.install_snapshot(&snap).expect("install");
        assert_eq!(target.applied(), source.applied());
        assert_eq!(target.balance(&pk(&key(9))).expect("read"), None, "old state is gone");
        check_after_scenario(&target, &ids);
        drop(target);
        let reopened = Store::open(&dir.path().join("b")).expect("reopen");
        check_after_scenario(&reopened, &ids);
        // A snapshot that is not ahead is refused.
        let mut again = reopened;
        assert!(again.install_snapshot(&snap).is_err());
    }

    /// A forged snapshot that would overwrite the store's own metadata is refused before anything
    /// is deleted (it used to trip an assert after the old state was gone).
    #[test]
    fn a_snapshot_with_store_metadata_is_refused_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut source = Store::open(&dir.path().join("a")).expect("open a");
        let _ = scenario(&mut source);
        let mut snap = source.export_snapshot().expect("export");
        snap.pairs.push((source.tables().meta.0.to_vec(), vec![1]));
        let mut target = Store::open(&dir.path().join("b")).expect("open b");
        target.init_genesis(&[(pk(&key(9)), 1)]).expect("genesis");
        let e = target.install_snapshot(&snap).expect_err("refused");
        assert!(e.to_string().contains("metadata"), "{e}");
        assert_eq!(target.balance(&pk(&key(9))).expect("read"), Some(1), "the current state stays");
    }
}
