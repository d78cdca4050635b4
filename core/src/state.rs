//! The state machine (documents and ledger) and the sequencer's speculative view of state.
//!
//! ```text
//!  lookup:  current batch ─▶ uncommitted/unapplied layers (newest first) ─▶ committed cache ─▶ store
//!                                                                            (filled by prefetch)
//! ```
//! Layers hold the writes of batches executed but not yet applied to the store. When the store
//! applies height h, layers ≤ h move into the cache (their values are now committed). The cache
//! is bounded (two generations); nothing here grows with the state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use tally_codec::{
    encode, limits, DocKey, DocMeta, ErrorCode, Operation, Outcome, PublicKey, Tables, WriteOp, WriteSet,
};
use tally_codec::{Attached, ClaimMeta, Compare, LeaseMeta, Txn};
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
    pub leases: HashMap<u64, Option<LeaseMeta>>,
    pub claims: HashMap<ClaimKey, Option<ClaimMeta>>,
}

/// A claim's `(domain, slot)`.
pub type ClaimKey = (String, u64);

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
        for (id, v) in &self.leases {
            ops.insert(tables.lease(*id).into_bytes(), v.as_ref().map(encode));
        }
        for ((domain, slot), v) in &self.claims {
            ops.insert(tables.claim(domain, *slot).into_bytes(), v.as_ref().map(encode));
        }
        WriteSet { ops: ops.into_iter().map(|(key, value)| WriteOp { key, value }).collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
            && self.docs.is_empty()
            && self.bodies.is_empty()
            && self.leases.is_empty()
            && self.claims.is_empty()
    }

    /// Takes `child`'s writes over (a transaction's branch that succeeded).
    fn merge(&mut self, child: BatchWrites) {
        self.accounts.extend(child.accounts);
        self.docs.extend(child.docs);
        self.bodies.extend(child.bodies);
        self.leases.extend(child.leases);
        self.claims.extend(child.claims);
    }
}

/// Where the view reads what it has not cached.
pub trait Backing {
    fn balance(&mut self, account: &PublicKey) -> Option<u64>;
    fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta>;
    fn lease(&mut self, id: u64) -> Option<LeaseMeta> {
        let _ = id;
        None
    }
    fn claim(&mut self, domain: &str, slot: u64) -> Option<ClaimMeta> {
        let _ = (domain, slot);
        None
    }
    /// Many claims at once (prefetch: one store access per batch).
    fn claims(&mut self, keys: &[ClaimKey]) -> Vec<Option<ClaimMeta>> {
        keys.iter().map(|(d, s)| self.claim(d, *s)).collect()
    }
}

/// The sequencer's view: latest state, including batches not yet committed.
pub struct View {
    layers: VecDeque<(u64, Arc<BatchWrites>)>,
    accounts: GenCache<PublicKey, Option<u64>>,
    docs: GenCache<DocKey, Option<DocMeta>>,
    leases: GenCache<u64, Option<LeaseMeta>>,
    claims: GenCache<ClaimKey, Option<ClaimMeta>>,
    /// `(expires_at_ms, lease)` of every lease that may be alive: loaded from the ledger when
    /// leading starts, added to as leases are granted and renewed. An entry is checked against
    /// the state when due, so stale entries (a renewed or revoked lease) cost one lookup.
    due: BTreeSet<(u64, u64)>,
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
            leases: GenCache::new(cache_entries_max),
            claims: GenCache::new(cache_entries_max),
            due: BTreeSet::new(),
        }
    }

    /// Forgets everything (leadership lost, or gained after others wrote). A leader then loads
    /// the leases with [`View::load_leases`].
    pub fn reset(&mut self) {
        self.layers.clear();
        self.accounts.clear();
        self.docs.clear();
        self.leases.clear();
        self.claims.clear();
        self.due.clear();
    }

    /// The committed leases, when leading starts: their expiries are what the batch clock checks.
    pub fn load_leases(&mut self, leases: impl IntoIterator<Item = (u64, LeaseMeta)>) {
        for (id, m) in leases {
            self.due.insert((m.expires_at_ms, id));
        }
    }

    /// The earliest time a lease may end, if any may.
    pub fn next_lease_due(&self) -> Option<u64> {
        self.due.first().map(|(at, _)| *at)
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
            for (k, v) in &w.leases {
                self.leases.insert(*k, v.clone());
            }
            for (k, v) in &w.claims {
                self.claims.insert(k.clone(), v.clone());
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
    /// Leases and claims (rarer) are read on a miss instead.
    pub fn prefetch<'a>(
        &mut self,
        ops: impl Iterator<Item = (&'a PublicKey, &'a Operation)>,
        backing: &mut dyn Backing,
    ) {
        let mut claims = Vec::new();
        for (signer, op) in ops {
            self.prefetch_op(signer, op, backing, &mut claims);
        }
        // Claims are fresh keys (a miss each): read them together.
        claims.sort_unstable();
        claims.dedup();
        claims.retain(|k| !self.claims.contains(k) && !self.layers.iter().any(|(_, w)| w.claims.contains_key(k)));
        if !claims.is_empty() {
            let found = backing.claims(&claims);
            for (k, v) in claims.into_iter().zip(found) {
                self.claims.insert(k, v);
            }
        }
    }

    fn prefetch_op(
        &mut self,
        signer: &PublicKey,
        op: &Operation,
        backing: &mut dyn Backing,
        claims: &mut Vec<ClaimKey>,
    ) {
        match op {
            Operation::Transfer { to, .. } => {
                self.committed_balance(signer, backing);
                self.committed_balance(to, backing);
            }
            Operation::Set { key, .. }
            | Operation::Delete { key }
            | Operation::SetIf { key, .. }
            | Operation::DeleteIf { key, .. } => {
                self.committed_doc(key, backing);
            }
            Operation::Txn(t) => {
                for op in t.then.iter().chain(&t.otherwise) {
                    self.prefetch_op(signer, op, backing, claims);
                }
            }
            Operation::Claim { domain, slot, .. } => claims.push((domain.clone(), *slot)),
            Operation::LeaseGrant { .. } | Operation::LeaseKeepAlive { .. } | Operation::LeaseRevoke { .. } => {}
        }
    }

    /// The balance as of the batches executed so far (not those of the batch being built).
    fn committed_balance(&mut self, k: &PublicKey, backing: &mut dyn Backing) -> u64 {
        if let Some(v) = self.layered_balance(k) {
            return v;
        }
        if let Some(v) = self.accounts.get(k) {
            return v.unwrap_or(0);
        }
        let v = backing.balance(k);
        self.accounts.insert(*k, v);
        v.unwrap_or(0)
    }

    fn committed_doc(&mut self, k: &DocKey, backing: &mut dyn Backing) -> Option<DocMeta> {
        if let Some(v) = self.layered_doc(k) {
            return v;
        }
        if let Some(v) = self.docs.get(k) {
            return v;
        }
        let v = backing.doc_meta(k);
        self.docs.insert(*k, v.clone());
        v
    }

    fn committed_lease(&mut self, id: u64, backing: &mut dyn Backing) -> Option<LeaseMeta> {
        if let Some(v) = self.layers.iter().rev().find_map(|(_, w)| w.leases.get(&id).cloned()) {
            return v;
        }
        if let Some(v) = self.leases.get(&id) {
            return v;
        }
        let v = backing.lease(id);
        self.leases.insert(id, v.clone());
        v
    }

    fn committed_claim(&mut self, k: &ClaimKey, backing: &mut dyn Backing) -> Option<ClaimMeta> {
        if let Some(v) = self.layers.iter().rev().find_map(|(_, w)| w.claims.get(k).cloned()) {
            return v;
        }
        if let Some(v) = self.claims.get(k) {
            return v;
        }
        let v = backing.claim(&k.0, k.1);
        self.claims.insert(k.clone(), v.clone());
        v
    }

    /// The balance as of `cur` (the batch being built), after prefetch.
    ///
    /// # Panics
    /// If prefetch did not load the account.
    pub fn balance(&mut self, cur: &BatchWrites, k: &PublicKey) -> u64 {
        if let Some(v) = cur.accounts.get(k) {
            return *v;
        }
        if let Some(v) = self.layered_balance(k) {
            return v;
        }
        self.accounts.get(k).expect("prefetch loads every account a batch touches").unwrap_or(0)
    }
}

/// The state keys executing `op` for `signer` may read (accounts, documents, leases, claims), as
/// the ledger stores them. The shell reads the cold ones off the replica thread before the core
/// sees the request, so a batch never waits on the store there (where heartbeats would wait too).
/// What a lease's end reads (its attachments) is not included: leases end rarely.
pub fn state_keys(tables: &Tables, signer: &PublicKey, op: &Operation, out: &mut Vec<Vec<u8>>) {
    match op {
        Operation::Transfer { to, .. } => {
            out.push(tables.account(signer).into_bytes());
            out.push(tables.account(to).into_bytes());
        }
        Operation::Set { key, .. } | Operation::Delete { key } | Operation::DeleteIf { key, .. } => {
            out.push(tables.doc(key).into_bytes());
        }
        Operation::SetIf { key, lease, .. } => {
            out.push(tables.doc(key).into_bytes());
            out.extend(lease.map(|id| tables.lease(id).into_bytes()));
        }
        Operation::LeaseGrant { .. } => {}
        Operation::LeaseKeepAlive { lease } | Operation::LeaseRevoke { lease } => {
            out.push(tables.lease(*lease).into_bytes());
        }
        Operation::Claim { domain, slot, lease } => {
            out.push(tables.claim(domain, *slot).into_bytes());
            out.extend(lease.map(|id| tables.lease(id).into_bytes()));
        }
        Operation::Txn(t) => {
            for c in &t.compares {
                match c {
                    Compare::Revision { key, .. } | Compare::Exists { key } => out.push(tables.doc(key).into_bytes()),
                    Compare::BalanceAtLeast { account, .. } => out.push(tables.account(account).into_bytes()),
                    Compare::LeaseAlive { lease } => out.push(tables.lease(*lease).into_bytes()),
                }
            }
            for op in t.then.iter().chain(&t.otherwise) {
                state_keys(tables, signer, op, out);
            }
        }
    }
}

/// Content digest of a document body (the content-addressed key's digest).
pub fn body_digest(value: &[u8]) -> Digest {
    tally_codec::hash_with_domain(b"tally/doc-body/v1\0", value)
}

/// The lease id granted by the request at `position` of batch `height`: unique, and the same on
/// every replica.
pub fn lease_id(height: u64, position: u32) -> u64 {
    assert!((position as usize) < limits::BATCH_REQUESTS_MAX, "a batch holds at most BATCH_REQUESTS_MAX requests");
    (height << 20) | u64::from(position)
}

/// Where a request executes: the batch's height and time, and the request's position in it.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub height: u64,
    pub time_ms: u64,
    pub position: u32,
}

/// Executes requests on the view. Reads go through the writes of the batch being built (and of
/// an enclosing transaction's branch) to the view and, on a miss, to the backing.
pub struct Exec<'a> {
    pub view: &'a mut View,
    pub backing: &'a mut dyn Backing,
    pub at: At,
}

impl Exec<'_> {
    fn balance(&mut self, parents: &[&BatchWrites], top: &BatchWrites, k: &PublicKey) -> u64 {
        if let Some(v) = top.accounts.get(k).or_else(|| parents.iter().rev().find_map(|w| w.accounts.get(k))) {
            return *v;
        }
        self.view.committed_balance(k, self.backing)
    }
    fn doc(&mut self, parents: &[&BatchWrites], top: &BatchWrites, k: &DocKey) -> Option<DocMeta> {
        if let Some(v) = top.docs.get(k).or_else(|| parents.iter().rev().find_map(|w| w.docs.get(k))) {
            return v.clone();
        }
        self.view.committed_doc(k, self.backing)
    }
    fn lease(&mut self, parents: &[&BatchWrites], top: &BatchWrites, id: u64) -> Option<LeaseMeta> {
        if let Some(v) = top.leases.get(&id).or_else(|| parents.iter().rev().find_map(|w| w.leases.get(&id))) {
            return v.clone();
        }
        self.view.committed_lease(id, self.backing)
    }
    fn claim(&mut self, parents: &[&BatchWrites], top: &BatchWrites, k: &ClaimKey) -> Option<ClaimMeta> {
        if let Some(v) = top.claims.get(k).or_else(|| parents.iter().rev().find_map(|w| w.claims.get(k))) {
            return v.clone();
        }
        self.view.committed_claim(k, self.backing)
    }

    /// A live lease of `signer`'s that can take one more attachment.
    fn attachable(
        &mut self,
        parents: &[&BatchWrites],
        top: &BatchWrites,
        signer: &PublicKey,
        id: u64,
    ) -> Result<LeaseMeta, ErrorCode> {
        let lease = self.lease(parents, top, id).ok_or(ErrorCode::LeaseNotFound)?;
        if lease.owner != *signer {
            return Err(ErrorCode::NotLeaseHolder);
        }
        if lease.attached.len() >= limits::LEASE_ATTACHED_MAX {
            return Err(ErrorCode::LeaseFull);
        }
        Ok(lease)
    }

    /// Ends lease `id` in `top`: its attached documents (still at the attached revision and
    /// under this lease) and claims (still under it) go too.
    fn end_lease(&mut self, parents: &[&BatchWrites], top: &mut BatchWrites, id: u64, lease: LeaseMeta) {
        for a in lease.attached {
            match a {
                Attached::Doc { key, revision } => {
                    if self.doc(parents, top, &key).is_some_and(|m| m.revision == revision && m.lease == Some(id)) {
                        top.docs.insert(key, None);
                    }
                }
                Attached::Claim { domain, slot } => {
                    let k = (domain, slot);
                    if self.claim(parents, top, &k).is_some_and(|c| c.lease == Some(id)) {
                        top.claims.insert(k, None);
                    }
                }
            }
        }
        top.leases.insert(id, None);
    }

    /// Ends, in `cur`, every lease whose expiry is not after this batch's time (before the
    /// batch's requests execute: a keepalive in the same batch is too late).
    pub fn end_due_leases(&mut self, cur: &mut BatchWrites) {
        let now = self.at.time_ms;
        let due: Vec<(u64, u64)> = self.view.due.range(..=(now, u64::MAX)).copied().collect();
        for entry in due {
            self.view.due.remove(&entry);
            let id = entry.1;
            if let Some(lease) = self.lease(&[], cur, id) {
                if lease.expires_at_ms <= now {
                    self.end_lease(&[], cur, id, lease);
                }
            }
        }
    }

    fn write_lease(&mut self, top: &mut BatchWrites, id: u64, lease: LeaseMeta) {
        self.view.due.insert((lease.expires_at_ms, id));
        top.leases.insert(id, Some(lease));
    }

    /// Applies one request, recording its writes in `cur`. Deterministic: the outcome depends only
    /// on the state, the request and where it executes.
    ///
    /// # Panics
    /// If the request expired before the batch time: stage 4 refuses those without executing them.
    pub fn execute(&mut self, cur: &mut BatchWrites, req: &tally_codec::Request) -> Outcome {
        assert!(req.expires_at_ms >= self.at.time_ms, "stage 4 refuses expired requests before executing them");
        self.op(&[], cur, &req.signer, &req.op)
    }

    fn op(&mut self, parents: &[&BatchWrites], top: &mut BatchWrites, signer: &PublicKey, op: &Operation) -> Outcome {
        match op {
            Operation::Transfer { to, amount } => self.transfer(parents, top, signer, to, *amount),
            Operation::Set { key, value } => self.set(parents, top, signer, key, value, None, None),
            Operation::SetIf { key, value, if_revision, lease } => {
                self.set(parents, top, signer, key, value, *if_revision, *lease)
            }
            Operation::Delete { key } => self.delete(parents, top, signer, key, None),
            Operation::DeleteIf { key, if_revision } => self.delete(parents, top, signer, key, *if_revision),
            Operation::LeaseGrant { ttl_ms } => self.lease_grant(parents, top, signer, *ttl_ms),
            Operation::LeaseKeepAlive { lease: id } => self.lease_keep_alive(parents, top, signer, *id),
            Operation::LeaseRevoke { lease: id } => match self.lease(parents, top, *id) {
                None => Outcome::Rejected(ErrorCode::LeaseNotFound),
                Some(l) if l.owner != *signer => Outcome::Rejected(ErrorCode::NotLeaseHolder),
                Some(l) => {
                    self.end_lease(parents, top, *id, l);
                    Outcome::LeaseRevoked
                }
            },
            Operation::Claim { domain, slot, lease } => self.claim_slot(parents, top, signer, domain, *slot, *lease),
            Operation::Txn(t) => self.txn(parents, top, signer, t),
        }
    }

    fn transfer(
        &mut self,
        parents: &[&BatchWrites],
        top: &mut BatchWrites,
        signer: &PublicKey,
        to: &PublicKey,
        amount: u64,
    ) -> Outcome {
        let from_balance = self.balance(parents, top, signer);
        if from_balance < amount {
            return Outcome::Rejected(ErrorCode::InsufficientFunds);
        }
        let to_balance = self.balance(parents, top, to);
        let sender_balance = from_balance - amount;
        // The supply is fixed at genesis and fits in u64, so a receiver can't overflow.
        let receiver = to_balance.checked_add(amount).expect("total supply fits in u64");
        top.accounts.insert(*signer, sender_balance);
        top.accounts.insert(*to, receiver);
        Outcome::Transferred { sender_balance }
    }

    fn lease_grant(
        &mut self,
        parents: &[&BatchWrites],
        top: &mut BatchWrites,
        signer: &PublicKey,
        ttl_ms: u64,
    ) -> Outcome {
        if !(limits::LEASE_TTL_MIN_MS..=limits::LEASE_TTL_MAX_MS).contains(&ttl_ms) {
            return Outcome::Rejected(ErrorCode::TtlOutOfRange);
        }
        if !parents.is_empty() {
            return Outcome::Rejected(ErrorCode::BadTxn);
        }
        let id = lease_id(self.at.height, self.at.position);
        let expires_at_ms = self.at.time_ms + ttl_ms;
        let lease = LeaseMeta { owner: *signer, ttl_ms, expires_at_ms, attached: Vec::new() };
        self.write_lease(top, id, lease);
        Outcome::LeaseGranted { lease: id, expires_at_ms }
    }

    fn lease_keep_alive(
        &mut self,
        parents: &[&BatchWrites],
        top: &mut BatchWrites,
        signer: &PublicKey,
        id: u64,
    ) -> Outcome {
        match self.lease(parents, top, id) {
            None => Outcome::Rejected(ErrorCode::LeaseNotFound),
            Some(l) if l.owner != *signer => Outcome::Rejected(ErrorCode::NotLeaseHolder),
            Some(mut l) => {
                // Its old expiry is no longer due: a lease renewed many times keeps one
                // entry, so the due set stays bounded by the live leases.
                self.view.due.remove(&(l.expires_at_ms, id));
                l.expires_at_ms = self.at.time_ms + l.ttl_ms;
                let expires_at_ms = l.expires_at_ms;
                self.write_lease(top, id, l);
                Outcome::LeaseRenewed { expires_at_ms }
            }
        }
    }

    fn claim_slot(
        &mut self,
        parents: &[&BatchWrites],
        top: &mut BatchWrites,
        signer: &PublicKey,
        domain: &str,
        slot: u64,
        lease: Option<u64>,
    ) -> Outcome {
        // Stage 2 refuses these; the key's one-byte length must never see a longer one.
        if domain.is_empty() || domain.len() > limits::CLAIM_DOMAIN_BYTES_MAX {
            return Outcome::Rejected(ErrorCode::BadClaimDomain);
        }
        let k = (domain.to_owned(), slot);
        if let Some(c) = self.claim(parents, top, &k) {
            return Outcome::ClaimDenied { holder: c.holder, height: c.height };
        }
        if let Some(id) = lease {
            match self.attachable(parents, top, signer, id) {
                Ok(mut l) => {
                    l.attached.push(Attached::Claim { domain: domain.to_owned(), slot });
                    top.leases.insert(id, Some(l));
                }
                Err(code) => return Outcome::Rejected(code),
            }
        }
        let height = self.at.height;
        top.claims.insert(k, Some(ClaimMeta { holder: *signer, height, lease }));
        Outcome::ClaimGranted { height }
    }

    /// A transaction: its comparisons pick a branch, and the branch applies all or nothing.
    fn txn(&mut self, parents: &[&BatchWrites], top: &mut BatchWrites, signer: &PublicKey, t: &Txn) -> Outcome {
        if !parents.is_empty() {
            return Outcome::Rejected(ErrorCode::BadTxn);
        }
        let holds = t.compares.iter().all(|c| self.compare(top, c));
        let branch = if holds { &t.then } else { &t.otherwise };
        let mut child = BatchWrites::default();
        let mut outcomes = Vec::with_capacity(branch.len());
        for op in branch {
            let o = self.op(&[&*top], &mut child, signer, op);
            if !o.is_success() {
                // All or nothing: the branch's writes so far are dropped with `child`.
                return o;
            }
            outcomes.push(o);
        }
        top.merge(child);
        Outcome::TxnApplied { then: holds, outcomes }
    }

    fn compare(&mut self, top: &BatchWrites, c: &Compare) -> bool {
        match c {
            Compare::Revision { key, revision } => self.doc(&[], top, key).map_or(0, |m| m.revision) == *revision,
            Compare::Exists { key } => self.doc(&[], top, key).is_some(),
            Compare::BalanceAtLeast { account, amount } => self.balance(&[], top, account) >= *amount,
            Compare::LeaseAlive { lease } => {
                self.lease(&[], top, *lease).is_some_and(|l| l.expires_at_ms > self.at.time_ms)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn set(
        &mut self,
        parents: &[&BatchWrites],
        top: &mut BatchWrites,
        signer: &PublicKey,
        key: &DocKey,
        value: &[u8],
        if_revision: Option<u64>,
        lease: Option<u64>,
    ) -> Outcome {
        let existing = self.doc(parents, top, key);
        let current = existing.as_ref().map_or(0, |m| m.revision);
        // The revision first: the loser of a create-only race learns the winner's revision.
        if if_revision.is_some_and(|r| r != current) {
            return Outcome::RevisionMismatch { current };
        }
        if let Some(m) = &existing {
            if m.owner != *signer {
                return Outcome::Rejected(ErrorCode::NotOwner);
            }
        }
        let revision = current + 1;
        if let Some(id) = lease {
            match self.attachable(parents, top, signer, id) {
                Ok(mut l) => {
                    l.attached.push(Attached::Doc { key: *key, revision });
                    top.leases.insert(id, Some(l));
                }
                Err(code) => return Outcome::Rejected(code),
            }
        }
        let body = body_digest(value);
        top.bodies.entry(body).or_insert_with(|| value.to_vec());
        top.docs.insert(*key, Some(DocMeta { owner: *signer, revision, body, lease }));
        if revision == 1 {
            Outcome::DocCreated { revision }
        } else {
            Outcome::DocUpdated { revision }
        }
    }

    fn delete(
        &mut self,
        parents: &[&BatchWrites],
        top: &mut BatchWrites,
        signer: &PublicKey,
        key: &DocKey,
        if_revision: Option<u64>,
    ) -> Outcome {
        let existing = self.doc(parents, top, key);
        let current = existing.as_ref().map_or(0, |m| m.revision);
        if if_revision.is_some_and(|r| r != current) {
            return Outcome::RevisionMismatch { current };
        }
        match existing {
            None => Outcome::Rejected(ErrorCode::NotFound),
            Some(m) if m.owner != *signer => Outcome::Rejected(ErrorCode::NotOwner),
            Some(_) => {
                top.docs.insert(*key, None);
                Outcome::DocDeleted
            }
        }
    }
}

/// Applies one request to the view at `at` (see [`Exec::execute`]).
pub fn execute(
    view: &mut View,
    backing: &mut dyn Backing,
    cur: &mut BatchWrites,
    req: &tally_codec::Request,
    at: At,
) -> Outcome {
    Exec { view, backing, at }.execute(cur, req)
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
    use tally_codec::{ClusterId, Request, RequestLocation, Txn};

    /// The committed state a test starts from.
    #[derive(Default)]
    struct Mem {
        balances: HashMap<PublicKey, u64>,
        docs: HashMap<DocKey, DocMeta>,
        leases: HashMap<u64, LeaseMeta>,
        claims: HashMap<ClaimKey, ClaimMeta>,
    }

    impl Backing for Mem {
        fn balance(&mut self, account: &PublicKey) -> Option<u64> {
            self.balances.get(account).copied()
        }
        fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta> {
            self.docs.get(key).cloned()
        }
        fn lease(&mut self, id: u64) -> Option<LeaseMeta> {
            self.leases.get(&id).cloned()
        }
        fn claim(&mut self, domain: &str, slot: u64) -> Option<ClaimMeta> {
            self.claims.get(&(domain.to_string(), slot)).cloned()
        }
    }

    const ALICE: PublicKey = PublicKey([1; 32]);
    const BOB: PublicKey = PublicKey([2; 32]);

    fn req(signer: PublicKey, op: Operation) -> Request {
        Request { cluster_id: ClusterId([0; 16]), signer, nonce: 0, expires_at_ms: u64::MAX, op }
    }

    fn doc(n: u8) -> DocKey {
        DocKey([n; 16])
    }

    /// A sequencer over batches: `run` executes one batch of requests at `time_ms` and commits it
    /// into the view's layers, as stage 4 does.
    struct Seq {
        view: View,
        backing: Mem,
        height: u64,
    }

    impl Seq {
        fn new(backing: Mem) -> Self {
            Seq { view: View::default(), backing, height: 0 }
        }
        fn run(&mut self, time_ms: u64, reqs: &[Request]) -> (Vec<Outcome>, BatchWrites) {
            self.height += 1;
            let mut cur = BatchWrites::default();
            let mut exec = Exec {
                view: &mut self.view,
                backing: &mut self.backing,
                at: At { height: self.height, time_ms, position: 0 },
            };
            exec.end_due_leases(&mut cur);
            let mut outcomes = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                exec.at.position = i as u32;
                outcomes.push(exec.execute(&mut cur, r));
            }
            self.view.push_layer(self.height, Arc::new(cur.clone()));
            (outcomes, cur)
        }
        fn one(&mut self, time_ms: u64, r: Request) -> Outcome {
            self.run(time_ms, &[r]).0.remove(0)
        }
    }

    fn set_if(key: DocKey, value: &str, if_revision: Option<u64>, lease: Option<u64>) -> Operation {
        Operation::SetIf { key, value: value.as_bytes().to_vec(), if_revision, lease }
    }

    /// A backing that records the store key of every read.
    struct Recording(Mem, Vec<Vec<u8>>);

    impl Backing for Recording {
        fn balance(&mut self, account: &PublicKey) -> Option<u64> {
            self.1.push(Tables::v1().account(account).into_bytes());
            self.0.balance(account)
        }
        fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta> {
            self.1.push(Tables::v1().doc(key).into_bytes());
            self.0.doc_meta(key)
        }
        fn lease(&mut self, id: u64) -> Option<LeaseMeta> {
            self.1.push(Tables::v1().lease(id).into_bytes());
            self.0.lease(id)
        }
        fn claim(&mut self, domain: &str, slot: u64) -> Option<ClaimMeta> {
            self.1.push(Tables::v1().claim(domain, slot).into_bytes());
            self.0.claim(domain, slot)
        }
    }

    /// The shell warms exactly `state_keys` off the replica thread: executing any operation on a
    /// cold view must read nothing else.
    #[test]
    fn executing_an_operation_reads_only_its_state_keys() {
        let lease =
            |_id: u64| LeaseMeta { owner: ALICE, ttl_ms: 1_000_000, expires_at_ms: 1_000_000, attached: Vec::new() };
        let txn = Operation::Txn(Txn {
            compares: vec![
                Compare::Revision { key: doc(3), revision: 0 },
                Compare::Exists { key: doc(4) },
                Compare::BalanceAtLeast { account: BOB, amount: 1 },
                Compare::LeaseAlive { lease: 8 },
            ],
            then: vec![Operation::Transfer { to: PublicKey([5; 32]), amount: 1 }, set_if(doc(6), "x", None, Some(7))],
            otherwise: vec![Operation::Claim { domain: "d".into(), slot: 2, lease: Some(7) }],
        });
        let ops = vec![
            Operation::Transfer { to: BOB, amount: 5 },
            Operation::Set { key: doc(1), value: b"1".to_vec() },
            Operation::Delete { key: doc(2) },
            Operation::DeleteIf { key: doc(2), if_revision: Some(1) },
            set_if(doc(1), "1", Some(0), Some(7)),
            Operation::LeaseGrant { ttl_ms: 10 },
            Operation::LeaseKeepAlive { lease: 7 },
            Operation::LeaseRevoke { lease: 7 },
            Operation::Claim { domain: "d".into(), slot: 1, lease: Some(7) },
            txn.clone(),
            Operation::Txn(Txn {
                compares: Vec::new(),
                ..match txn {
                    Operation::Txn(t) => t,
                    _ => unreachable!(),
                }
            }),
            // Compares stop at the first that fails: each kind first in a transaction of its own.
            Operation::Txn(Txn {
                compares: vec![Compare::LeaseAlive { lease: 8 }, Compare::BalanceAtLeast { account: BOB, amount: 1 }],
                then: Vec::new(),
                otherwise: Vec::new(),
            }),
        ];
        for op in ops {
            let mut mem = Mem::default();
            mem.balances.insert(ALICE, 100);
            mem.balances.insert(BOB, 100);
            mem.leases.insert(7, lease(7));
            mem.leases.insert(8, lease(8));
            mem.docs.insert(doc(2), DocMeta { owner: ALICE, revision: 1, body: Digest([0; 32]), lease: None });
            let mut backing = Recording(mem, Vec::new());
            let mut view = View::default();
            let mut cur = BatchWrites::default();
            execute(
                &mut view,
                &mut backing,
                &mut cur,
                &req(ALICE, op.clone()),
                At { height: 1, time_ms: 1, position: 0 },
            );
            assert!(!backing.1.is_empty() || matches!(op, Operation::LeaseGrant { .. }), "{op:?} read nothing");
            let mut keys = Vec::new();
            state_keys(&Tables::v1(), &ALICE, &op, &mut keys);
            for read in &backing.1 {
                assert!(keys.contains(read), "{op:?} read a key state_keys does not name");
            }
        }
    }

    #[test]
    fn compare_and_set_takes_the_expected_revision_and_zero_means_create_only() {
        let mut s = Seq::new(Mem::default());
        let k = doc(1);
        assert_eq!(s.one(1, req(ALICE, set_if(k, "1", Some(0), None))), Outcome::DocCreated { revision: 1 });
        assert_eq!(s.one(2, req(ALICE, set_if(k, "2", Some(0), None))), Outcome::RevisionMismatch { current: 1 });
        assert_eq!(s.one(3, req(ALICE, set_if(k, "2", Some(1), None))), Outcome::DocUpdated { revision: 2 });
        let del = |r| req(ALICE, Operation::DeleteIf { key: k, if_revision: Some(r) });
        assert_eq!(s.one(4, del(1)), Outcome::RevisionMismatch { current: 2 });
        assert_eq!(s.one(5, del(2)), Outcome::DocDeleted);
        assert_eq!(s.one(6, del(2)), Outcome::RevisionMismatch { current: 0 }, "gone: current revision 0");
        // Ownership still holds under compare-and-set.
        assert_eq!(s.one(7, req(ALICE, set_if(k, "a", Some(0), None))), Outcome::DocCreated { revision: 1 });
        assert_eq!(s.one(8, req(BOB, set_if(k, "b", Some(1), None))), Outcome::Rejected(ErrorCode::NotOwner));
    }

    /// Two clients race to create the same document in one batch: exactly one wins.
    #[test]
    fn a_create_only_race_has_exactly_one_winner() {
        let mut s = Seq::new(Mem::default());
        let k = doc(2);
        let (o, _) = s.run(1, &[req(ALICE, set_if(k, "a", Some(0), None)), req(BOB, set_if(k, "b", Some(0), None))]);
        assert_eq!(o, vec![Outcome::DocCreated { revision: 1 }, Outcome::RevisionMismatch { current: 1 }]);
    }

    #[test]
    fn the_first_claim_is_granted_forever_and_later_ones_name_the_holder() {
        let mut s = Seq::new(Mem::default());
        let claim = |who, slot| req(who, Operation::Claim { domain: "slots".into(), slot, lease: None });
        assert_eq!(s.one(10, claim(ALICE, 7)), Outcome::ClaimGranted { height: 1 });
        assert_eq!(s.one(20, claim(BOB, 7)), Outcome::ClaimDenied { holder: ALICE, height: 1 });
        assert_eq!(s.one(30, claim(ALICE, 7)), Outcome::ClaimDenied { holder: ALICE, height: 1 }, "even to its holder");
        assert_eq!(s.one(40, claim(BOB, 8)), Outcome::ClaimGranted { height: 4 }, "another slot is free");
        let other = req(BOB, Operation::Claim { domain: "other".into(), slot: 7, lease: None });
        assert_eq!(s.one(50, other), Outcome::ClaimGranted { height: 5 }, "domains are separate");
        // In one batch, the first of two claims wins.
        let (o, _) = s.run(60, &[claim(BOB, 9), claim(ALICE, 9)]);
        assert_eq!(o, vec![Outcome::ClaimGranted { height: 6 }, Outcome::ClaimDenied { holder: BOB, height: 6 }]);
        let long = req(BOB, Operation::Claim { domain: "d".repeat(300), slot: 1, lease: None });
        assert_eq!(s.one(45, long), Outcome::Rejected(ErrorCode::BadClaimDomain), "refused, not a panic");
    }

    fn grant(s: &mut Seq, time_ms: u64, who: PublicKey, ttl_ms: u64) -> u64 {
        match s.one(time_ms, req(who, Operation::LeaseGrant { ttl_ms })) {
            Outcome::LeaseGranted { lease, expires_at_ms } => {
                assert_eq!(expires_at_ms, time_ms + ttl_ms);
                lease
            }
            o => panic!("not granted: {o:?}"),
        }
    }

    #[test]
    fn a_lease_ends_at_its_expiry_in_batch_time_with_what_is_attached() {
        let mut s = Seq::new(Mem::default());
        let lease = grant(&mut s, 1_000, ALICE, 1_000);
        let (kept, detached) = (doc(3), doc(4));
        assert_eq!(s.one(1_100, req(ALICE, set_if(kept, "x", None, Some(lease)))), Outcome::DocCreated { revision: 1 });
        assert_eq!(
            s.one(1_100, req(ALICE, set_if(detached, "y", None, Some(lease)))),
            Outcome::DocCreated { revision: 1 }
        );
        let claim = req(ALICE, Operation::Claim { domain: "d".into(), slot: 1, lease: Some(lease) });
        assert_eq!(s.one(1_200, claim), Outcome::ClaimGranted { height: 4 });
        // A write without the lease detaches the document.
        let plain = req(ALICE, Operation::Set { key: detached, value: b"z".to_vec() });
        assert_eq!(s.one(1_300, plain), Outcome::DocUpdated { revision: 2 });
        assert_eq!(s.view.next_lease_due(), Some(2_000));
        // Before the expiry nothing ends; at it, the lease, its document and its claim go.
        let (_, w) = s.run(1_999, &[]);
        assert!(w.is_empty(), "nothing is due before 2,000: {w:?}");
        let (_, w) = s.run(2_000, &[]);
        assert_eq!(w.leases.get(&lease), Some(&None));
        assert_eq!(w.docs.get(&kept), Some(&None));
        assert!(!w.docs.contains_key(&detached), "a detached document stays");
        assert_eq!(w.claims.get(&("d".to_string(), 1)), Some(&None));
        let again = req(BOB, Operation::Claim { domain: "d".into(), slot: 1, lease: None });
        assert_eq!(s.one(2_100, again), Outcome::ClaimGranted { height: 8 }, "the slot is free again");
        let late = req(ALICE, Operation::LeaseKeepAlive { lease });
        assert_eq!(s.one(2_200, late), Outcome::Rejected(ErrorCode::LeaseNotFound));
    }

    #[test]
    fn keepalive_and_revoke_are_the_holders_and_keepalive_moves_the_expiry() {
        let mut s = Seq::new(Mem::default());
        let lease = grant(&mut s, 1_000, ALICE, 1_000);
        let keep = |who| req(who, Operation::LeaseKeepAlive { lease });
        assert_eq!(s.one(1_500, keep(BOB)), Outcome::Rejected(ErrorCode::NotLeaseHolder));
        assert_eq!(s.one(1_900, keep(ALICE)), Outcome::LeaseRenewed { expires_at_ms: 2_900 });
        let (_, w) = s.run(2_500, &[]);
        assert!(w.is_empty(), "renewed: not ended at the first expiry");
        for t in 0..1_000 {
            s.one(2_000 + t / 10, keep(ALICE));
        }
        assert_eq!(s.view.due.len(), 1, "a thousand renewals of one lease leave one due entry");
        let unknown = req(ALICE, Operation::LeaseKeepAlive { lease: lease + 1 });
        assert_eq!(s.one(2_600, unknown), Outcome::Rejected(ErrorCode::LeaseNotFound));
        assert_eq!(
            s.one(2_700, req(BOB, Operation::LeaseRevoke { lease })),
            Outcome::Rejected(ErrorCode::NotLeaseHolder)
        );
        assert_eq!(s.one(2_700, req(ALICE, Operation::LeaseRevoke { lease })), Outcome::LeaseRevoked);
        assert_eq!(s.one(2_800, keep(ALICE)), Outcome::Rejected(ErrorCode::LeaseNotFound));
        let short = req(ALICE, Operation::LeaseGrant { ttl_ms: limits::LEASE_TTL_MIN_MS - 1 });
        assert_eq!(s.one(2_900, short), Outcome::Rejected(ErrorCode::TtlOutOfRange));
        let lease_of_bob = grant(&mut s, 3_000, BOB, 1_000);
        let attach = req(ALICE, set_if(doc(5), "x", None, Some(lease_of_bob)));
        assert_eq!(s.one(3_100, attach), Outcome::Rejected(ErrorCode::NotLeaseHolder));
    }

    /// A leader that takes over loads the committed leases: one granted under the old leader
    /// ends at its expiry, not before and not never.
    #[test]
    fn a_new_leader_ends_the_leases_it_loaded() {
        let mut committed = Mem::default();
        let m = LeaseMeta { owner: ALICE, ttl_ms: 1_000, expires_at_ms: 5_000, attached: vec![] };
        committed.leases.insert(77, m.clone());
        let mut s = Seq::new(committed);
        let (_, w) = s.run(6_000, &[]);
        assert!(w.is_empty(), "a view that never loaded the leases ends nothing (so leading must load them)");
        s.view.reset();
        s.view.load_leases([(77, m)]);
        let (_, w) = s.run(4_999, &[]);
        assert!(w.is_empty());
        let (_, w) = s.run(5_000, &[]);
        assert_eq!(w.leases.get(&77), Some(&None));
    }

    #[test]
    fn a_transaction_is_all_or_nothing() {
        let mut mem = Mem::default();
        mem.balances.insert(ALICE, 100);
        let mut s = Seq::new(mem);
        let k = doc(6);
        let owned_by_bob = doc(7);
        assert_eq!(s.one(1, req(BOB, set_if(owned_by_bob, "b", None, None))), Outcome::DocCreated { revision: 1 });
        let transfer = Operation::Transfer { to: BOB, amount: 40 };
        let txn = |then: Vec<Operation>| {
            req(
                ALICE,
                Operation::Txn(Txn {
                    compares: vec![
                        Compare::Revision { key: k, revision: 0 },
                        Compare::BalanceAtLeast { account: ALICE, amount: 40 },
                    ],
                    then,
                    otherwise: vec![set_if(k, "\"else\"", None, None)],
                }),
            )
        };
        // A refused operation in the branch: nothing is written, the transfer included.
        let (o, w) = s.run(2, &[txn(vec![transfer.clone(), set_if(owned_by_bob, "x", None, None)])]);
        assert_eq!(o, vec![Outcome::Rejected(ErrorCode::NotOwner)]);
        assert!(w.is_empty(), "{w:?}");
        // Every comparison holds: `then` runs whole.
        let (o, w) = s.run(3, &[txn(vec![transfer.clone(), set_if(k, "1", None, None)])]);
        assert_eq!(
            o,
            vec![Outcome::TxnApplied {
                then: true,
                outcomes: vec![Outcome::Transferred { sender_balance: 60 }, Outcome::DocCreated { revision: 1 }]
            }]
        );
        assert_eq!(w.accounts.get(&BOB), Some(&40));
        // Now the document exists: `otherwise` runs.
        let (o, _) = s.run(4, &[txn(vec![transfer])]);
        assert_eq!(o, vec![Outcome::TxnApplied { then: false, outcomes: vec![Outcome::DocUpdated { revision: 2 }] }]);
        // No lease grant (its id is one per request) and no nesting inside a transaction.
        let nested = req(
            ALICE,
            Operation::Txn(Txn {
                compares: vec![],
                then: vec![Operation::LeaseGrant { ttl_ms: 1_000 }],
                otherwise: vec![],
            }),
        );
        assert_eq!(s.one(5, nested), Outcome::Rejected(ErrorCode::BadTxn));
    }

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
