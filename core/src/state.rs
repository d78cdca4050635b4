//! The state machine (documents and ledger) and the sequencer's speculative view of state.
//!
//! ```text
//!  lookup:  current batch ─▶ uncommitted/unapplied layers (newest first) ─▶ committed cache ─▶ store
//!                                                                            (filled by prefetch)
//! ```
//! Layers hold the writes of batches executed but not yet applied to the store. When the store
//! applies height h, layers ≤ h move into the cache (their values are now committed). The cache
//! is bounded (two generations); nothing here grows with the state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use tally_codec::{encode, DocKey, DocMeta, ErrorCode, Operation, Outcome, PublicKey, Tables, WriteOp, WriteSet};
use tally_codec::{Digest, RequestId};

/// Entries per cache generation (two generations are kept).
pub const CACHE_ENTRIES_MAX: usize = 1 << 17;

/// A bounded map that forgets the least recently inserted half when full.
pub struct GenCache<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> GenCache<K, V> {
    pub fn new(cap: usize) -> Self {
        GenCache { young: HashMap::new(), old: HashMap::new(), cap }
    }
    pub fn get(&mut self, k: &K) -> Option<V> {
        if let Some(v) = self.young.get(k) {
            return Some(v.clone());
        }
        let v = self.old.remove(k)?;
        self.insert(k.clone(), v.clone());
        Some(v)
    }
    pub fn contains(&self, k: &K) -> bool {
        self.young.contains_key(k) || self.old.contains_key(k)
    }
    pub fn insert(&mut self, k: K, v: V) {
        if self.young.len() >= self.cap {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writes of one batch, coalesced per key (a hot account is written once per batch).
#[derive(Debug, Default, Clone)]
pub struct BatchWrites {
    pub accounts: HashMap<PublicKey, u64>,
    pub docs: HashMap<DocKey, Option<DocMeta>>,
    pub bodies: HashMap<Digest, Vec<u8>>,
}

impl BatchWrites {
    /// The store write set, in key order, one op per key.
    pub fn to_write_set(&self, tables: &Tables) -> WriteSet {
        let mut ops: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for (k, v) in &self.accounts {
            ops.insert(tables.account(k).into_bytes(), Some(encode(v)));
        }
        for (k, v) in &self.docs {
            ops.insert(tables.doc(k).into_bytes(), v.as_ref().map(encode));
        }
        for (d, body) in &self.bodies {
            ops.insert(tables.doc_body(d).to_bytes(), Some(body.clone()));
        }
        WriteSet { ops: ops.into_iter().map(|(key, value)| WriteOp { key, value }).collect() }
    }
}

/// Where the view reads what it has not cached.
pub trait Backing {
    fn balance(&mut self, account: &PublicKey) -> Option<u64>;
    fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta>;
}

/// The sequencer's view: latest state, including batches not yet committed.
pub struct View {
    layers: VecDeque<(u64, Arc<BatchWrites>)>,
    accounts: GenCache<PublicKey, Option<u64>>,
    docs: GenCache<DocKey, Option<DocMeta>>,
}

impl Default for View {
    fn default() -> Self {
        Self::new(CACHE_ENTRIES_MAX)
    }
}

impl View {
    pub fn new(cache_entries_max: usize) -> Self {
        View {
            layers: VecDeque::new(),
            accounts: GenCache::new(cache_entries_max),
            docs: GenCache::new(cache_entries_max),
        }
    }

    /// Forgets everything (leadership lost, or gained after others wrote).
    pub fn reset(&mut self) {
        self.layers.clear();
        self.accounts.clear();
        self.docs.clear();
    }

    pub fn push_layer(&mut self, height: u64, writes: Arc<BatchWrites>) {
        if let Some((h, _)) = self.layers.back() {
            assert_eq!(*h + 1, height, "layers must be consecutive");
        }
        self.layers.push_back((height, writes));
    }

    /// The store has applied everything up to `height`: those layers' values are committed.
    pub fn on_applied(&mut self, height: u64) {
        while let Some((h, _)) = self.layers.front() {
            if *h > height {
                break;
            }
            let (_, w) = self.layers.pop_front().expect("front exists");
            for (k, v) in &w.accounts {
                self.accounts.insert(*k, Some(*v));
            }
            for (k, v) in &w.docs {
                self.docs.insert(*k, v.clone());
            }
        }
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    fn layered_balance(&self, k: &PublicKey) -> Option<u64> {
        self.layers.iter().rev().find_map(|(_, w)| w.accounts.get(k).copied())
    }
    fn layered_doc(&self, k: &DocKey) -> Option<Option<DocMeta>> {
        self.layers.iter().rev().find_map(|(_, w)| w.docs.get(k).cloned())
    }

    /// Loads into the cache every key the requests will touch that no layer or cache holds:
    /// one pass over the store per batch instead of a lookup per request (TigerBeetle's prefetch).
    pub fn prefetch<'a>(
        &mut self,
        ops: impl Iterator<Item = (&'a PublicKey, &'a Operation)>,
        backing: &mut dyn Backing,
    ) {
        for (signer, op) in ops {
            let mut need_account = |k: &PublicKey, this: &mut Self| {
                if this.layered_balance(k).is_none() && !this.accounts.contains(k) {
                    let v = backing.balance(k);
                    this.accounts.insert(*k, v);
                }
            };
            match op {
                Operation::Transfer { to, .. } => {
                    need_account(signer, self);
                    need_account(to, self);
                }
                Operation::Set { key, .. } | Operation::Delete { key } => {
                    if self.layered_doc(key).is_none() && !self.docs.contains(key) {
                        let v = backing.doc_meta(key);
                        self.docs.insert(*key, v);
                    }
                }
            }
        }
    }

    pub fn balance(&mut self, cur: &BatchWrites, k: &PublicKey) -> u64 {
        if let Some(v) = cur.accounts.get(k) {
            return *v;
        }
        if let Some(v) = self.layered_balance(k) {
            return v;
        }
        self.accounts.get(k).expect("prefetch loads every account a batch touches").unwrap_or(0)
    }

    pub fn doc(&mut self, cur: &BatchWrites, k: &DocKey) -> Option<DocMeta> {
        if let Some(v) = cur.docs.get(k) {
            return v.clone();
        }
        if let Some(v) = self.layered_doc(k) {
            return v;
        }
        self.docs.get(k).expect("prefetch loads every document a batch touches")
    }
}

/// Content digest of a document body (the content-addressed key's digest).
pub fn body_digest(value: &[u8]) -> Digest {
    tally_codec::hash_with_domain(b"tally/doc-body/v1\0", value)
}

/// Applies one request to the view, recording its writes in `cur`. Deterministic: the outcome
/// depends only on the state and the request.
///
/// # Panics
/// If the request expired before `time_ms`: stage 4 refuses those without executing them.
pub fn execute(view: &mut View, cur: &mut BatchWrites, req: &tally_codec::Request, time_ms: u64) -> Outcome {
    assert!(req.expires_at_ms >= time_ms, "stage 4 refuses expired requests before executing them");
    match &req.op {
        Operation::Transfer { to, amount } => {
            let from_balance = view.balance(cur, &req.signer);
            if from_balance < *amount {
                return Outcome::Rejected(ErrorCode::InsufficientFunds);
            }
            let to_balance = view.balance(cur, to);
            let sender_balance = from_balance - amount;
            // The supply is fixed at genesis and fits in u64, so a receiver can't overflow.
            let receiver = to_balance.checked_add(*amount).expect("total supply fits in u64");
            cur.accounts.insert(req.signer, sender_balance);
            cur.accounts.insert(*to, receiver);
            Outcome::Transferred { sender_balance }
        }
        Operation::Set { key, value } => {
            let existing = view.doc(cur, key);
            if let Some(m) = &existing {
                if m.owner != req.signer {
                    return Outcome::Rejected(ErrorCode::NotOwner);
                }
            }
            let revision = existing.as_ref().map_or(1, |m| m.revision + 1);
            let body = body_digest(value);
            cur.bodies.entry(body).or_insert_with(|| value.clone());
            cur.docs.insert(*key, Some(DocMeta { owner: req.signer, revision, body }));
            if revision == 1 {
                Outcome::DocCreated { revision }
            } else {
                Outcome::DocUpdated { revision }
            }
        }
        Operation::Delete { key } => match view.doc(cur, key) {
            None => Outcome::Rejected(ErrorCode::NotFound),
            Some(m) if m.owner != req.signer => Outcome::Rejected(ErrorCode::NotOwner),
            Some(_) => {
                cur.docs.insert(*key, None);
                Outcome::DocDeleted
            }
        },
    }
}

/// Ids executed and committed, kept until their expiry passes (then a resubmission is refused as
/// expired, so forgetting them is safe). Memory is bounded by the expiry window × throughput:
/// ~56 B per id (a 128-bit id prefix, height and leaf, and the expiry index), so two minutes at
/// 50k requests/s is ~340 MB. A prefix collision between two live ids has probability ~n²/2¹²⁹.
#[derive(Default)]
pub struct SeenIds {
    ids: HashMap<u128, (u64, u32), std::hash::BuildHasherDefault<IdHasher>>,
    by_expiry_s: BTreeMap<u64, Vec<u128>>,
}

/// Request ids are uniformly random (blake3): their low bits are already a good hash.
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

fn id_key(id: &RequestId) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&id.0[..16]);
    u128::from_le_bytes(b)
}

impl SeenIds {
    pub fn insert(&mut self, id: RequestId, loc: tally_codec::RequestLocation) {
        let k = id_key(&id);
        if self.ids.insert(k, (loc.height, loc.leaf_index)).is_none() {
            self.by_expiry_s.entry(loc.expires_at_ms / 1000).or_default().push(k);
        }
    }
    /// Height and leaf of an executed id.
    pub fn get(&self, id: &RequestId) -> Option<(u64, u32)> {
        self.ids.get(&id_key(id)).copied()
    }
    /// Forgets ids whose expiry is before `time_ms`.
    pub fn prune(&mut self, time_ms: u64) {
        let cutoff_s = time_ms / 1000;
        while let Some((&s, _)) = self.by_expiry_s.first_key_value() {
            if s >= cutoff_s {
                break;
            }
            let (_, ids) = self.by_expiry_s.pop_first().expect("first exists");
            for id in ids {
                self.ids.remove(&id);
            }
        }
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_codec::RequestLocation;

    #[test]
    fn seen_ids_forget_only_after_expiry() {
        let mut s = SeenIds::default();
        let id = |n: u8| RequestId([n; 32]);
        s.insert(id(1), RequestLocation { height: 3, leaf_index: 7, expires_at_ms: 10_000 });
        s.insert(id(2), RequestLocation { height: 4, leaf_index: 0, expires_at_ms: 20_000 });
        assert_eq!(s.get(&id(1)), Some((3, 7)));
        s.prune(10_500);
        assert_eq!(s.get(&id(1)), Some((3, 7)), "same second as its expiry: kept");
        s.prune(11_000);
        assert_eq!(s.get(&id(1)), None);
        assert_eq!(s.get(&id(2)), Some((4, 0)));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = GenCache::new(10);
        for i in 0..1000u32 {
            c.insert(i, i);
        }
        assert!(c.len() <= 20);
        assert_eq!(c.get(&999), Some(999));
    }
}
