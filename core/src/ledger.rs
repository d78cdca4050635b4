//! The committed state a replica reads and applies to, as the core sees it.
//!
//! The production shell implements [`Ledger`] on the LevelDB store and the segment files; the
//! simulator uses [`MemLedger`]. Applying a batch applies its write set (the same key/value
//! operations the store writes), so both hold the same bytes for the same history.

use borsh::{BorshDeserialize, BorshSerialize};
use std::collections::{BTreeMap, HashMap};
use tally_codec::merkle::Tree;
use tally_codec::{
    decode, encode, limits, BatchEntry, ClaimMeta, Committed, Digest, DocKey, DocMeta, LeaseMeta, PublicKey, Receipt,
    RequestId, RequestLocation, Signature, TableId, Tables,
};

/// Where the applied state stands: the last applied log entry and batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct LedgerHead {
    pub index: u64,
    pub term: u64,
    pub height: u64,
    pub header_hash: Digest,
    pub state_digest: Digest,
    /// Header time of the last applied batch (0 before the first).
    pub time_ms: u64,
}

impl LedgerHead {
    /// Moves the head to log entry `index` of `term`: a batch with `header`, or (`None`) a no-op
    /// or a configuration change. Every ledger moves its head through here, so the simulator's
    /// ledger checks what the store-backed one does; stage 6 (`confirm`) checked the chain
    /// before, and this checks it again where the state is handed to the ledger.
    ///
    /// # Panics
    /// An entry out of log order, a term that goes back, or a batch that does not follow the
    /// chain or commits in another term than it was built in: the replica must stop.
    pub fn advance(&mut self, index: u64, term: u64, header: Option<&tally_codec::BatchHeader>) {
        assert!(index > self.index, "log entries apply in order: {index} after {}", self.index);
        assert!(term >= self.term, "the term never goes back: {term} after {}", self.term);
        let Some(h) = header else {
            self.index = index;
            self.term = term;
            return;
        };
        assert_eq!(h.height, self.height + 1, "chain broken: batch height does not follow");
        assert_eq!(h.prev_hash, self.header_hash, "chain broken: prev_hash is not the last header's hash");
        assert_eq!(h.term, term, "a batch commits in the term it was built in");
        *self = LedgerHead::after_batch(index, term, h);
    }

    /// The head after applying the batch with `header` at log entry `index` of `term`.
    pub fn after_batch(index: u64, term: u64, header: &tally_codec::BatchHeader) -> LedgerHead {
        LedgerHead {
            index,
            term,
            height: header.height,
            header_hash: header.hash(),
            state_digest: header.state_digest,
            time_ms: header.time_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger write failed: {0}")]
    Write(crate::LogFailure),
    #[error("snapshot refused: {0}")]
    Snapshot(String),
}

impl LedgerError {
    /// What stops the replica: a failed write keeps its OS error's kind.
    pub fn into_failure(self) -> crate::LogFailure {
        match self {
            LedgerError::Write(f) => f,
            refused @ LedgerError::Snapshot(_) => crate::LogFailure::other(refused.to_string()),
        }
    }
}

/// A state exported for a snapshot: where it stands in the log, and its bytes.
#[derive(Debug, Clone)]
pub struct Exported {
    pub index: u64,
    pub term: u64,
    pub data: Vec<u8>,
}

/// A new cluster's first configuration (`voters`), applied at log index 1 of term 1 as if a
/// first entry had been compacted: every replica of a new cluster starts from it, and a node
/// added later, which has no entry to learn it from, gets a snapshot. A node that waits to be
/// added starts with no configuration at all.
///
/// # Errors
/// The ledger's own (a store that cannot write).
pub fn bootstrap(ledger: &mut impl Ledger, voters: &[u64]) -> Result<(), LedgerError> {
    use protobuf::Message as _;
    let cs = raft::eraftpb::ConfState::from((voters.to_vec(), vec![]));
    let bytes = cs.write_to_bytes().expect("a configuration encodes");
    ledger.apply_conf(1, 1, bytes)
}

/// Committed state, applied in log order.
pub trait Ledger {
    /// Takes in what the shell handed this ledger beside the core (a production ledger's
    /// values read ahead by its warmer), before the core reads anything in a pass. The default
    /// has nothing to take.
    fn refresh(&mut self) {}
    fn head(&self) -> LedgerHead;
    fn balance(&self, account: &PublicKey) -> Option<u64>;
    fn doc_meta(&self, key: &DocKey) -> Option<DocMeta>;
    /// A document and its body.
    fn doc(&self, key: &DocKey) -> Option<(DocMeta, Vec<u8>)>;
    /// The value of a state key (a lease, a claim).
    fn get_raw(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// The values of many keys at once (one store access for a whole batch's claims).
    fn get_raw_many(&self, keys: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
        keys.iter().map(|k| self.get_raw(k)).collect()
    }
    /// Every key and value of one table, in key order.
    fn scan(&self, table: &TableId) -> Vec<(Vec<u8>, Vec<u8>)>;
    /// A lease that has not been deleted (it may be past its expiry: the next batch ends it).
    fn lease(&self, id: u64) -> Option<LeaseMeta> {
        let v = self.get_raw(tables().lease(id).as_bytes())?;
        Some(decode(&v, limits::REQUEST_BYTES_MAX * 2).expect("lease metadata decodes"))
    }
    /// Every lease, by id.
    fn leases(&self) -> Vec<(u64, LeaseMeta)> {
        self.scan(&tables().leases)
            .into_iter()
            .map(|(k, v)| {
                let id = tables().lease_id_of(&k).expect("a key of the lease table");
                (id, decode(&v, limits::REQUEST_BYTES_MAX * 2).expect("lease metadata decodes"))
            })
            .collect()
    }
    /// Who holds each of `claims`, if anyone (one store access).
    fn claims(&self, claims: &[(String, u64)]) -> Vec<Option<ClaimMeta>> {
        let keys: Vec<Vec<u8>> = claims.iter().map(|(d, s)| tables().claim(d, *s).into_bytes()).collect();
        self.get_raw_many(&keys)
            .into_iter()
            .map(|v| v.map(|v| decode(&v, 1024).expect("claim metadata decodes")))
            .collect()
    }
    /// Who holds `(domain, slot)`, if anyone.
    fn claim(&self, domain: &str, slot: u64) -> Option<ClaimMeta> {
        let v = self.get_raw(tables().claim(domain, slot).as_bytes())?;
        Some(decode(&v, 1024).expect("claim metadata decodes"))
    }
    /// The receipt of an executed request, rebuilt from the stored batch.
    fn receipt(&self, id: &RequestId) -> Option<Receipt>;
    /// The receipt of request `id`, executed in the batch at `height` (the location the
    /// replica remembers for a duplicate: no search by id).
    fn receipt_at(&self, id: &RequestId, height: u64) -> Option<Receipt>;
    /// Executed ids whose expiry is not before `now_ms` (exactly-once after a restart).
    fn unexpired_ids(&self, now_ms: u64) -> Vec<(RequestId, RequestLocation)>;
    /// Applies committed batch `batch` at log `index`, with the operator's signature.
    ///
    /// # Errors
    /// A write that failed; the replica poisons itself.
    fn apply_batch(
        &mut self,
        index: u64,
        term: u64,
        batch: &Committed,
        signature: &Signature,
    ) -> Result<(), LedgerError>;
    /// Applies a no-op or configuration entry: only the applied index moves.
    ///
    /// # Errors
    /// A write that failed.
    fn apply_noop(&mut self, index: u64, term: u64) -> Result<(), LedgerError>;
    /// Applies a configuration change entry: the configuration from `index` on (raft-rs's
    /// `ConfState`, protobuf-encoded, joint states included).
    ///
    /// # Errors
    /// A write that failed.
    fn apply_conf(&mut self, index: u64, term: u64, conf_state: Vec<u8>) -> Result<(), LedgerError>;
    /// The configuration as of the applied index; `None` while the initial one holds.
    fn conf_state(&self) -> Option<Vec<u8>>;
    /// The whole state, to send to a replica that fell behind the log: a state at log index
    /// `at_least` or later, as `(index, term, bytes)`. `None` while it is not ready yet (a shell
    /// may export a large state off the replica's thread); raft-rs asks again.
    fn export(&self, at_least: u64) -> Option<Exported>;
    /// Whether `data` is a snapshot this ledger could install as the state after log entry
    /// `index` (judged before raft-rs sees it: a state that does not install, or stands at
    /// another index, would stop the replica when raft-rs hands it over).
    ///
    /// # Errors
    /// Why it could not be installed.
    fn check_snapshot(&self, index: u64, data: &[u8]) -> Result<(), LedgerError>;
    /// Replaces the state with an exported one, the state after log entry `index` of `term`,
    /// in configuration `conf_state` (protobuf `ConfState`), durably before returning.
    ///
    /// # Errors
    /// Bytes that are not a snapshot; nothing is changed then.
    fn install(&mut self, index: u64, term: u64, conf_state: Vec<u8>, data: &[u8]) -> Result<(), LedgerError>;
}

/// A ledger in memory: the store's key/value pairs, and every batch with its signature.
#[derive(Clone, Default, BorshSerialize, BorshDeserialize)]
pub struct MemLedger {
    head: LedgerHead,
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    batches: Vec<(BatchEntry, Signature)>,
    conf_state: Option<Vec<u8>>,
    #[borsh(skip)]
    ids: HashMap<RequestId, RequestLocation>,
    /// The last export, handed out again while it is at the index asked for or later, as the
    /// shell's background exports do (so the simulator meets stale snapshots too).
    #[borsh(skip)]
    last_export: std::cell::RefCell<Option<Exported>>,
}

/// The receipt of the request at `loc` in committed batch `entry`, signed with `signature`.
pub fn receipt_in(entry: &BatchEntry, signature: &Signature, loc: &RequestLocation) -> Option<Receipt> {
    let leaf = loc.leaf_index as usize;
    Some(Receipt {
        request: entry.requests.get(leaf)?.clone(),
        outcome: entry.outcomes.get(leaf)?.clone(),
        leaf_index: loc.leaf_index,
        proof: Tree::from_leaves(&entry.leaves()).proof(leaf),
        header: entry.header.clone(),
        signature: *signature,
    })
}

/// The store's table ids (derived by hashing; computed once).
pub fn tables() -> &'static Tables {
    static TABLES: std::sync::LazyLock<Tables> = std::sync::LazyLock::new(Tables::v1);
    &TABLES
}

impl MemLedger {
    /// A ledger holding the genesis balances.
    pub fn genesis(balances: &[(PublicKey, u64)]) -> Self {
        let mut l = MemLedger::default();
        for (k, v) in balances {
            l.kv.insert(tables().account(k).into_bytes(), encode(v));
        }
        l
    }

    /// The genesis state of a new cluster of `voters` ([`bootstrap`]).
    pub fn new_cluster(balances: &[(PublicKey, u64)], voters: &[u64]) -> Self {
        let mut l = MemLedger::genesis(balances);
        bootstrap(&mut l, voters).expect("an in-memory ledger applies a configuration");
        l
    }

    pub fn batches(&self) -> &[(BatchEntry, Signature)] {
        &self.batches
    }

    /// Every account and its balance.
    pub fn balances(&self) -> Vec<(PublicKey, u64)> {
        let prefix = tables().accounts.0;
        self.kv
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| {
                let key: [u8; 32] = k[prefix.len()..].try_into().ok()?;
                Some((PublicKey(key), decode::<u64>(v, 8).ok()?))
            })
            .collect()
    }

    /// A digest of every key and value: equal on replicas that applied the same history.
    pub fn state_digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        for (k, v) in &self.kv {
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k);
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v);
        }
        Digest(*h.finalize().as_bytes())
    }

    fn index_ids(&mut self) {
        self.ids.clear();
        for (entry, _) in &self.batches {
            self.ids.extend(entry.locations());
        }
    }
}

impl Ledger for MemLedger {
    fn head(&self) -> LedgerHead {
        self.head
    }
    fn balance(&self, account: &PublicKey) -> Option<u64> {
        let v = self.kv.get(tables().account(account).as_bytes())?;
        Some(decode(v, 8).expect("balances are borsh u64"))
    }
    fn doc_meta(&self, key: &DocKey) -> Option<DocMeta> {
        let v = self.kv.get(tables().doc(key).as_bytes())?;
        Some(decode(v, 1024).expect("document metadata decodes"))
    }
    fn doc(&self, key: &DocKey) -> Option<(DocMeta, Vec<u8>)> {
        let meta = self.doc_meta(key)?;
        let body = self.kv.get(&tables().doc_body(&meta.body).to_bytes()).cloned().unwrap_or_default();
        Some((meta, body))
    }
    fn get_raw(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.kv.get(key).cloned()
    }
    fn scan(&self, table: &TableId) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.kv
            .range(table.0.to_vec()..)
            .take_while(|(k, _)| k.starts_with(&table.0))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn receipt(&self, id: &RequestId) -> Option<Receipt> {
        let loc = self.ids.get(id)?;
        let (entry, signature) = self.batches.get(usize::try_from(loc.height).ok()?.checked_sub(1)?)?;
        receipt_in(entry, signature, loc)
    }
    fn receipt_at(&self, id: &RequestId, height: u64) -> Option<Receipt> {
        self.receipt(id).filter(|r| r.header.height == height)
    }
    fn unexpired_ids(&self, now_ms: u64) -> Vec<(RequestId, RequestLocation)> {
        self.ids.iter().filter(|(_, l)| l.expires_at_ms >= now_ms).map(|(id, l)| (*id, *l)).collect()
    }
    fn apply_batch(
        &mut self,
        index: u64,
        term: u64,
        batch: &Committed,
        signature: &Signature,
    ) -> Result<(), LedgerError> {
        let entry = &*batch.entry;
        self.head.advance(index, term, Some(&entry.header));
        for op in &entry.write_set.ops {
            match &op.value {
                Some(v) => self.kv.insert(op.key.clone(), v.clone()),
                None => self.kv.remove(&op.key),
            };
        }
        self.ids.extend(batch.locations());
        self.batches.push((entry.clone(), *signature));
        Ok(())
    }
    fn apply_noop(&mut self, index: u64, term: u64) -> Result<(), LedgerError> {
        self.head.advance(index, term, None);
        Ok(())
    }
    fn apply_conf(&mut self, index: u64, term: u64, conf_state: Vec<u8>) -> Result<(), LedgerError> {
        self.apply_noop(index, term)?;
        self.conf_state = Some(conf_state);
        Ok(())
    }
    fn conf_state(&self) -> Option<Vec<u8>> {
        self.conf_state.clone()
    }
    fn export(&self, at_least: u64) -> Option<Exported> {
        let mut last = self.last_export.borrow_mut();
        if let Some(e) = last.as_ref().filter(|e| e.index >= at_least) {
            return Some(e.clone());
        }
        let e = Exported { index: self.head.index, term: self.head.term, data: encode(self) };
        *last = Some(e.clone());
        Some(e)
    }
    fn check_snapshot(&self, index: u64, data: &[u8]) -> Result<(), LedgerError> {
        let l: MemLedger =
            decode(data, usize::MAX).map_err(|e| LedgerError::Snapshot(format!("does not decode: {e}")))?;
        if l.head.index != index {
            return Err(LedgerError::Snapshot(format!("state at index {}, the snapshot says {index}", l.head.index)));
        }
        Ok(())
    }
    fn install(&mut self, index: u64, _term: u64, _conf: Vec<u8>, data: &[u8]) -> Result<(), LedgerError> {
        // The exported ledger carries its own head and configuration.
        let mut l: MemLedger =
            decode(data, usize::MAX).map_err(|e| LedgerError::Snapshot(format!("does not decode: {e}")))?;
        if l.head.index != index {
            return Err(LedgerError::Snapshot(format!("state at index {}, the snapshot says {index}", l.head.index)));
        }
        l.index_ids();
        *self = l;
        Ok(())
    }
}
