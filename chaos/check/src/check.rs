//! Checkers of the invariants (`docs/architecture.md` §2) over a [`crate::history::RunRecord`].
//!
//! - **I1** every acknowledged request is in the committed history exactly once, where and with
//!   the outcome its receipt says, and no request id is executed twice; every committed height's
//!   body is held by some replica; with real signatures, every receipt verifies offline
//!   ([`check_receipts_offline`]).
//! - **I2** one operator-signed header per height, every signature valid, every replica's chain
//!   unbroken (from the zero hash at height 1) and its stored leaves matching the signed Merkle
//!   root.
//! - **I3** replicas agree: equal headers at every common height, equal state digests at equal
//!   applied heights.
//! - **I4** money is conserved on every replica, and the document operations of the clients'
//!   history are linearizable ([`check_linearizable`]).
//! - **I5** the cluster makes progress, soon enough, once the faults are healed.
//! - **I6** coordination outcomes (claims, create-only documents, leases) are consistent.
//!
//! [`check_all`] runs them all over a full client history (the simulator, the monkey);
//! [`check_committed`] runs those that a history of acknowledgements alone can feed (a cluster
//! test that kept only its receipts).
//!
//! Every checker returns its violations in a deterministic order (no hash-map iteration order
//! leaks into a report), so a seed reproduces its report byte for byte.

use crate::history::{History, Op, OpKind, OpResult, ReplicaFinal, RunRecord, StoredBatch};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tally_codec::merkle::{leaf_hash, verify_proof, Tree};
use tally_codec::{BatchHeader, Digest, DocKey, ErrorCode, Outcome, PublicKey, RequestId, Signature};

/// The per-key step budget [`check_all`] gives [`check_linearizable`].
pub const LINEARIZABILITY_BUDGET_STEPS: u64 = 1_000_000;

/// At most this many violations of one kind are listed one by one; the rest are summed up in one
/// more violation, so a wholesale failure (say every ack lost) gives a readable report.
const LISTED_PER_KIND: usize = 20;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// "I1" … "I5".
    pub invariant: &'static str,
    pub what: String,
}

impl Violation {
    pub fn new(invariant: &'static str, what: impl Into<String>) -> Self {
        Violation { invariant, what: what.into() }
    }
}

/// Everything the checkers found in one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verdicts {
    pub violations: Vec<Violation>,
    /// Acknowledged (committed) operations checked by I1.
    pub acked_checked: u64,
    /// Document keys whose history the linearizability search looked at (including those it gave
    /// up on).
    pub keys_checked: u64,
    /// Keys whose search exceeded the budget: no verdict for them.
    pub linearizability_gave_up: u64,
    /// Committed coordination outcomes (claims, create-only sets, lease grants and renewals,
    /// refusals of ended leases) checked by I6.
    pub coordination_checked: u64,
}

impl Verdicts {
    /// No violation found.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

fn acknowledged(run: &RunRecord) -> u64 {
    run.history.ops.iter().filter(|op| matches!(op.result, OpResult::Committed(_))).count() as u64
}

/// Runs every checker over a full client history (every operation invoked, with its times).
/// Receipts are checked offline too only by [`check_receipts_offline`], which needs real
/// request signatures.
pub fn check_all(run: &RunRecord, liveness_bound_ms: u64) -> Verdicts {
    let mut verdicts = Verdicts { acked_checked: acknowledged(run), ..Verdicts::default() };
    verdicts.violations.extend(check_i1(run));
    verdicts.violations.extend(check_i2(run));
    verdicts.violations.extend(check_i3(run));
    verdicts.violations.extend(check_i4_money(run));
    let (lin, keys, gave_up) = check_linearizable(&run.history, LINEARIZABILITY_BUDGET_STEPS);
    verdicts.violations.extend(lin);
    verdicts.keys_checked = keys;
    verdicts.linearizability_gave_up = gave_up;
    verdicts.violations.extend(check_i5(run, liveness_bound_ms));
    let (i6, coordination) = check_i6_counted(run);
    verdicts.violations.extend(i6);
    verdicts.coordination_checked = coordination;
    verdicts
}

/// The checks a history of acknowledgements alone can feed (no invocation times, no heal, no
/// unanswered operations): I1 with every receipt verified offline, I2, I3 and I4's money. A
/// cluster test that kept only the receipts it was given runs these.
pub fn check_committed(run: &RunRecord) -> Verdicts {
    let mut verdicts = Verdicts { acked_checked: acknowledged(run), ..Verdicts::default() };
    verdicts.violations.extend(check_i1(run));
    verdicts.violations.extend(check_receipts_offline(run));
    verdicts.violations.extend(check_i2(run));
    verdicts.violations.extend(check_i3(run));
    verdicts.violations.extend(check_i4_money(run));
    verdicts
}

/// I6, coordination: in the committed history (every batch, in height order), a claimed slot
/// is granted once and every denial names that grant; a create-only document is created once; a
/// lease is renewed only before its expiry in batch time and refused as unknown only after it
/// (no lease ends early, across failovers and clock faults).
pub fn check_i6(run: &RunRecord) -> Vec<Violation> {
    check_i6_counted(run).0
}

/// [`check_i6`], and how many committed coordination outcomes it checked.
pub fn check_i6_counted(run: &RunRecord) -> (Vec<Violation>, u64) {
    let ops = coordination_ops(run);
    let batches = every_committed_batch(run);
    if batches.first_key_value().is_none_or(|(h, _)| *h != 1) {
        return (Vec::new(), 0);
    }
    let mut checked = 0u64;
    let mut coordination = Coordination::default();
    for (height, b) in &batches {
        let t = b.header.time_ms;
        for (id, outcome) in b.request_ids.iter().zip(&b.outcomes) {
            let Some(&(signer, op)) = ops.get(id) else { continue };
            checked += 1;
            coordination.check(*height, t, signer, op, outcome);
        }
    }
    let mut v = Vec::new();
    coordination.out.finish(&mut v);
    (v, checked)
}

/// The coordination operations of the clients' history, by request id, with their signers.
fn coordination_ops(run: &RunRecord) -> HashMap<RequestId, (&PublicKey, &tally_codec::Operation)> {
    run.history
        .ops
        .iter()
        .filter_map(|o| match &o.kind {
            OpKind::Coord { id, signer, op } => Some((*id, (signer, op))),
            _ => None,
        })
        .collect()
}

/// Every committed batch once, by height (replicas agree by I2/I3; a replica that installed
/// a snapshot lacks the early ones).
fn every_committed_batch(run: &RunRecord) -> BTreeMap<u64, &StoredBatch> {
    let mut batches: BTreeMap<u64, &StoredBatch> = BTreeMap::new();
    for r in &run.replicas {
        for b in &r.batches {
            batches.entry(b.header.height).or_insert(b);
        }
    }
    batches
}

/// What the committed coordination outcomes established so far, read in height order, and the
/// I6 violations found.
struct Coordination {
    /// Each granted slot's holder and the height of its grant.
    claims: HashMap<(String, u64), (PublicKey, u64)>,
    /// Each create-only document's creation height.
    created: HashMap<DocKey, u64>,
    /// Each lease's expiry in batch time.
    leases: HashMap<u64, u64>,
    out: Capped,
}

impl Default for Coordination {
    fn default() -> Self {
        Coordination {
            claims: HashMap::new(),
            created: HashMap::new(),
            leases: HashMap::new(),
            out: Capped::new("I6", "coordination"),
        }
    }
}

impl Coordination {
    /// Checks one committed outcome of `op`, signed by `signer`, at `height` and batch time `t`.
    fn check(&mut self, height: u64, t: u64, signer: &PublicKey, op: &tally_codec::Operation, outcome: &Outcome) {
        use tally_codec::Operation;
        match op {
            Operation::Claim { domain, slot, .. } => self.check_claim(height, signer, domain, *slot, outcome),
            Operation::SetIf { key, if_revision: Some(0), .. } => self.check_create_only(height, key, outcome),
            Operation::LeaseGrant { ttl_ms } => self.check_lease_grant(t, *ttl_ms, outcome),
            Operation::LeaseKeepAlive { lease } => self.check_keepalive(height, t, *lease, outcome),
            _ => {}
        }
    }

    /// A slot is granted once, at the height it says; every denial names that grant.
    fn check_claim(&mut self, height: u64, signer: &PublicKey, domain: &str, slot: u64, outcome: &Outcome) {
        let grant = self.claims.get(&(domain.to_string(), slot));
        match outcome {
            Outcome::ClaimGranted { height: h } => {
                if let Some((holder, at)) = grant {
                    self.out.push(format!(
                        "claim {domain}/{slot} granted again at height {height}, held by {holder} since {at}"
                    ));
                }
                if *h != height {
                    self.out.push(format!("claim {domain}/{slot} granted at height {height} says {h}"));
                }
                self.claims.insert((domain.to_string(), slot), (*signer, height));
            }
            Outcome::ClaimDenied { holder, height: h } if grant != Some(&(*holder, *h)) => {
                self.out.push(format!(
                    "claim {domain}/{slot} denied at height {height} naming {holder} at {h}, but the grant is {grant:?}"
                ));
            }
            _ => {}
        }
    }

    /// A create-only document is created once, and refused only after it was.
    fn check_create_only(&mut self, height: u64, key: &DocKey, outcome: &Outcome) {
        match outcome {
            Outcome::DocCreated { .. } => {
                if let Some(at) = self.created.insert(*key, height) {
                    self.out.push(format!("create-only {key} created at height {at} and again at {height}"));
                }
            }
            Outcome::RevisionMismatch { current } if *current == 0 || !self.created.contains_key(key) => {
                self.out.push(format!(
                    "create-only {key} refused at height {height} (revision {current}) before any create"
                ));
            }
            _ => {}
        }
    }

    /// A lease expires its TTL after the batch time of its grant.
    fn check_lease_grant(&mut self, t: u64, ttl_ms: u64, outcome: &Outcome) {
        if let Outcome::LeaseGranted { lease, expires_at_ms } = outcome {
            if *expires_at_ms != t + ttl_ms {
                self.out.push(format!(
                    "lease {lease} granted at batch time {t} with TTL {ttl_ms} expires at {expires_at_ms}"
                ));
            }
            self.leases.insert(*lease, *expires_at_ms);
        }
    }

    /// A lease is renewed only before its expiry, and unknown only after it.
    fn check_keepalive(&mut self, height: u64, t: u64, lease: u64, outcome: &Outcome) {
        match outcome {
            Outcome::LeaseRenewed { expires_at_ms } => {
                match self.leases.get(&lease) {
                    Some(e) if *e > t => {}
                    e => self.out.push(format!(
                        "lease {lease} renewed at height {height}, batch time {t}, after its expiry {e:?}"
                    )),
                }
                self.leases.insert(lease, *expires_at_ms);
            }
            Outcome::Rejected(ErrorCode::LeaseNotFound) => {
                if let Some(e) = self.leases.get(&lease).filter(|e| **e > t) {
                    self.out.push(format!(
                        "lease {lease} ended early: unknown at height {height}, batch time {t}, before its expiry {e}"
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Collects violations of one kind, listing the first [`LISTED_PER_KIND`] and counting the rest.
struct Capped {
    invariant: &'static str,
    kind: &'static str,
    listed: Vec<Violation>,
    more: usize,
}

impl Capped {
    fn new(invariant: &'static str, kind: &'static str) -> Self {
        Capped { invariant, kind, listed: Vec::new(), more: 0 }
    }

    fn push(&mut self, what: String) {
        if self.listed.len() < LISTED_PER_KIND {
            self.listed.push(Violation::new(self.invariant, what));
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self, out: &mut Vec<Violation>) {
        if self.more > 0 {
            self.listed.push(Violation::new(
                self.invariant,
                format!("… and {} more violations of this kind: {}", self.more, self.kind),
            ));
        }
        out.append(&mut self.listed);
    }
}

fn short_id(id: &RequestId) -> String {
    id.to_hex()[..16].to_string()
}

fn short_digest(d: &Digest) -> String {
    d.to_hex()[..16].to_string()
}

fn describe_client_op(index: usize, op: &Op) -> String {
    format!("op #{index} (client {}, invoked at {} ms)", op.client, op.invoke_ms)
}

/// The committed history I1 reads, by height: the batches of the replica holding the most (the
/// first such replica on a tie), then, at heights it lacks (a real replica restored from a
/// snapshot holds only the later ones), those of the next longest replica holding them. I2 and
/// I3 check separately that replicas agree wherever two hold the same height. Also returns the
/// replicas read, for the report.
fn committed_history(run: &RunRecord) -> (BTreeMap<u64, &StoredBatch>, String) {
    let mut replicas: Vec<&ReplicaFinal> = run.replicas.iter().collect();
    replicas.sort_by_key(|r| std::cmp::Reverse(r.batches.len()));
    let mut by_height: BTreeMap<u64, &StoredBatch> = BTreeMap::new();
    let mut read = Vec::new();
    for r in replicas {
        let mut used = false;
        for b in &r.batches {
            if let std::collections::btree_map::Entry::Vacant(e) = by_height.entry(b.header.height) {
                e.insert(b);
                used = true;
            }
        }
        if used {
            read.push(r.node_id.to_string());
        }
    }
    let node = match read.as_slice() {
        [] => "no replica".to_string(),
        [one] => format!("node {one}"),
        many => format!("nodes {}", many.join(", ")),
    };
    (by_height, node)
}

/// The highest height any replica applied or holds.
fn top_height(run: &RunRecord) -> u64 {
    let held = run.replicas.iter().filter_map(|r| r.batches.last()).map(|b| b.header.height);
    run.replicas.iter().map(|r| r.applied_height).chain(held).max().unwrap_or(0)
}

/// I1: every acknowledged request is in the committed history exactly once, at the height and
/// leaf of its receipt, with the receipt's outcome, under the receipt's header, and the receipt's
/// Merkle proof leads to that header's root. Also: no request id appears twice in the committed
/// history, acknowledged or not.
pub fn check_i1(run: &RunRecord) -> Vec<Violation> {
    let mut out = Vec::new();
    let committed = Committed::of(run);
    let mut bodiless = Capped::new("I1", "committed heights whose body no replica holds");
    for height in (1..=top_height(run)).filter(|h| !committed.by_height.contains_key(h)) {
        bodiless.push(format!("no replica holds the body of height {height} (the requests committed there are lost)"));
    }
    bodiless.finish(&mut out);

    let mut acked_ids = BTreeSet::new();
    let mut acked = Capped::new("I1", "acknowledged requests not committed as acknowledged");
    for (index, op) in run.history.ops.iter().enumerate() {
        let OpResult::Committed(receipt) = &op.result else { continue };
        acked_ids.insert(receipt.request.id());
        committed.check_acknowledged(&describe_client_op(index, op), op, receipt, &mut acked);
    }
    acked.finish(&mut out);

    let mut duplicates = Capped::new("I1", "request ids executed more than once");
    for (id, found) in &committed.locations {
        if found.len() > 1 && !acked_ids.contains(id) {
            duplicates.push(format!(
                "duplicate execution: request {} appears {} times in the committed history ({}), at (height, \
                 leaf) {found:?}",
                short_id(id),
                found.len(),
                committed.node
            ));
        }
    }
    duplicates.finish(&mut out);
    out
}

/// The committed history I1 reads ([`committed_history`]), and where each request id sits in it.
struct Committed<'a> {
    by_height: BTreeMap<u64, &'a StoredBatch>,
    /// The replicas read, for the report.
    node: String,
    /// Every (height, leaf) each request id was committed at.
    locations: BTreeMap<RequestId, Vec<(u64, u32)>>,
}

impl<'a> Committed<'a> {
    fn of(run: &'a RunRecord) -> Self {
        let (by_height, node) = committed_history(run);
        let mut locations: BTreeMap<RequestId, Vec<(u64, u32)>> = BTreeMap::new();
        for batch in by_height.values() {
            for (leaf, id) in batch.request_ids.iter().enumerate() {
                locations.entry(*id).or_default().push((batch.header.height, leaf as u32));
            }
        }
        Committed { by_height, node, locations }
    }

    /// The client operation `who` was acknowledged with `receipt`: the receipt is for its
    /// request, its proof leads to its header's root, and the request is committed once, as
    /// the receipt says.
    fn check_acknowledged(&self, who: &str, op: &Op, receipt: &tally_codec::Receipt, acked: &mut Capped) {
        let id = receipt.request.id();
        if op.kind.id() != Some(id) {
            acked.push(format!(
                "{who}: its receipt is for request {} but the op is request {}",
                short_id(&id),
                op.kind.id().map_or_else(|| "(a read, no id)".to_string(), |k| short_id(&k))
            ));
        }
        let (height, leaf) = (receipt.header.height, receipt.leaf_index);
        let leaf_ok = verify_proof(
            &receipt.header.merkle_root,
            leaf as usize,
            leaf_hash(&id, &receipt.outcome),
            receipt.header.leaf_count as usize,
            &receipt.proof,
        );
        if !leaf_ok {
            acked.push(format!(
                "{who}: the receipt's Merkle proof of request {} with {:?} at leaf {leaf} does not lead to its header's root",
                short_id(&id),
                receipt.outcome
            ));
        }
        let found = self.locations.get(&id).map_or(&[][..], Vec::as_slice);
        match found {
            [] => acked.push(format!(
                "lost: {who} was acknowledged (request {} at height {height} leaf {leaf}, {:?}) but is not in the \
                 committed history ({}, {} batches)",
                short_id(&id),
                receipt.outcome,
                self.node,
                self.by_height.len()
            )),
            [(h, l)] => self.check_committed_as_receipt(who, receipt, (*h, *l), acked),
            many => acked.push(format!(
                "duplicated: {who}, request {}, was acknowledged once but committed {} times, at (height, leaf) {many:?}",
                short_id(&id),
                many.len()
            )),
        }
    }

    /// The request of `receipt`, committed once at `(h, l)`: there, with the receipt's outcome,
    /// under the receipt's header.
    fn check_committed_as_receipt(
        &self,
        who: &str,
        receipt: &tally_codec::Receipt,
        (h, l): (u64, u32),
        acked: &mut Capped,
    ) {
        let id = receipt.request.id();
        let (height, leaf) = (receipt.header.height, receipt.leaf_index);
        if (h, l) != (height, leaf) {
            acked.push(format!(
                "{who}: request {} was acknowledged at height {height} leaf {leaf} but committed at height {h} \
                 leaf {l}",
                short_id(&id)
            ));
        }
        let batch = self.by_height.get(&h).copied();
        let stored_outcome = batch.and_then(|b| b.outcomes.get(l as usize));
        if stored_outcome != Some(&receipt.outcome) {
            acked.push(format!(
                "{who}: request {} was acknowledged with {:?} but committed with {stored_outcome:?}",
                short_id(&id),
                receipt.outcome
            ));
        }
        match self.by_height.get(&height) {
            Some(b) if b.header == receipt.header => {}
            Some(b) => acked.push(format!(
                "{who}: the receipt's header at height {height} ({}) is not the committed one ({})",
                short_digest(&receipt.header.hash()),
                short_digest(&b.header.hash())
            )),
            None => acked
                .push(format!("{who}: the receipt's height {height} is not in the committed history ({})", self.node)),
        }
    }
}

/// I1 where requests carry real signatures (the monkey, the cluster tests; the simulator signs
/// them with a keyed hash, `docs/testing.md`): every acknowledged receipt passes the offline check
/// `tally verify` makes (`docs/receipt-format.md`): the request's signature, one cluster, not
/// expired at its header's time, the proof's length and path to the root, the operator's
/// signature over the header.
pub fn check_receipts_offline(run: &RunRecord) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut capped = Capped::new("I1", "acknowledged receipts that do not verify offline");
    for (index, op) in run.history.ops.iter().enumerate() {
        let OpResult::Committed(receipt) = &op.result else { continue };
        if let Err(e) = receipt.verify(&run.operator) {
            capped.push(format!(
                "{}: the receipt of request {} does not verify offline: {e}",
                describe_client_op(index, op),
                short_id(&receipt.request.id())
            ));
        }
    }
    capped.finish(&mut out);
    out
}

/// Does this stored batch hold exactly the leaves its header signs for?
fn leaves_match(batch: &StoredBatch) -> Result<(), String> {
    let n = batch.header.leaf_count as usize;
    if batch.request_ids.len() != n || batch.outcomes.len() != n {
        return Err(format!(
            "holds {} request ids and {} outcomes but its header says {n} leaves",
            batch.request_ids.len(),
            batch.outcomes.len()
        ));
    }
    let leaves: Vec<[u8; 32]> = batch.request_ids.iter().zip(&batch.outcomes).map(|(id, o)| leaf_hash(id, o)).collect();
    let root = Tree::from_leaves(&leaves).root();
    if root != batch.header.merkle_root {
        return Err(format!(
            "its leaves hash to root {} but its signed header says {}",
            short_digest(&root),
            short_digest(&batch.header.merkle_root)
        ));
    }
    Ok(())
}

/// I2: every header seen anywhere (announcements, stored batches, receipts) carries a valid
/// operator signature; all validly signed headers of one height are equal; every replica's
/// batches follow each other by height without gaps, each linked to the previous header by
/// `prev_hash` (height 1 to the zero hash), and each holds the leaves (ids and outcomes) its
/// header's Merkle root and leaf count sign for.
pub fn check_i2(run: &RunRecord) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut seen: Vec<(&BatchHeader, &Signature, String)> = Vec::new();
    for h in &run.headers {
        seen.push((&h.header, &h.signature, h.source.clone()));
    }
    for r in &run.replicas {
        for b in &r.batches {
            seen.push((&b.header, &b.signature, format!("node {} stored batch {}", r.node_id, b.header.height)));
        }
    }
    for (index, op) in run.history.ops.iter().enumerate() {
        if let OpResult::Committed(receipt) = &op.result {
            seen.push((&receipt.header, &receipt.signature, format!("receipt of {}", describe_client_op(index, op))));
        }
    }

    // Verify each distinct (header, signature) once.
    let mut verified: HashMap<(Digest, Signature), bool> = HashMap::new();
    let mut bad_signatures = Capped::new("I2", "headers with an invalid operator signature");
    // height → distinct valid header hashes, each with the first place it was seen.
    let mut by_height: BTreeMap<u64, Vec<(Digest, &str)>> = BTreeMap::new();
    for (header, signature, source) in &seen {
        let hash = header.hash();
        let valid = match verified.get(&(hash, **signature)) {
            Some(v) => *v,
            None => {
                let v = header.verify(&run.operator, signature).is_ok();
                verified.insert((hash, **signature), v);
                if !v {
                    bad_signatures.push(format!(
                        "header {} at height {} from {source}: the signature does not verify against the operator key",
                        short_digest(&hash),
                        header.height
                    ));
                }
                v
            }
        };
        if valid {
            let distinct = by_height.entry(header.height).or_default();
            if !distinct.iter().any(|(d, _)| *d == hash) {
                distinct.push((hash, source.as_str()));
            }
        }
    }
    bad_signatures.finish(&mut out);

    let mut forks = Capped::new("I2", "heights with two different signed headers");
    for (height, distinct) in &by_height {
        if let [(first, first_source), rest @ ..] = distinct.as_slice() {
            for (other, other_source) in rest {
                forks.push(format!(
                    "height {height}: two different signed headers: {} (from {first_source}) and {} (from \
                     {other_source})",
                    short_digest(first),
                    short_digest(other)
                ));
            }
        }
    }
    forks.finish(&mut out);

    check_chains(run, &mut out);
    out
}

/// I2 within each replica: its batches follow each other by height, each chained to the one
/// before (height 1 to the zero hash), each holding the leaves its header signs for.
fn check_chains(run: &RunRecord, out: &mut Vec<Violation>) {
    let mut chains = Capped::new("I2", "broken replica chains");
    for r in &run.replicas {
        for (i, b) in r.batches.iter().enumerate() {
            if b.header.height == 1 && b.header.prev_hash != Digest::ZERO {
                chains.push(format!(
                    "node {}: height 1 chains to {}, not to the zero hash",
                    r.node_id,
                    short_digest(&b.header.prev_hash)
                ));
            }
            if i > 0 {
                let expected = r.batches[i - 1].header.height + 1;
                if b.header.height != expected {
                    chains.push(format!(
                        "node {}: the batch after height {} has height {} (heights must follow without gaps)",
                        r.node_id,
                        expected - 1,
                        b.header.height
                    ));
                }
                let prev = r.batches[i - 1].header.hash();
                if b.header.prev_hash != prev {
                    chains.push(format!(
                        "node {}: broken chain at height {}: prev_hash {} but the previous header hashes to {}",
                        r.node_id,
                        b.header.height,
                        short_digest(&b.header.prev_hash),
                        short_digest(&prev)
                    ));
                }
            }
            if let Err(why) = leaves_match(b) {
                chains.push(format!("node {}: stored batch at height {} {why}", r.node_id, b.header.height));
            }
        }
    }
    chains.finish(out);
}

/// The batch replica `r` holds at `height`, if any (its batches follow each other by height).
fn batch_at(r: &ReplicaFinal, height: u64) -> Option<&StoredBatch> {
    let first = r.batches.first()?.header.height;
    let b = r.batches.get(usize::try_from(height.checked_sub(first)?).ok()?)?;
    (b.header.height == height).then_some(b)
}

/// I3: every two replicas hold equal headers at every common height; replicas at equal applied
/// height have equal state digests; no replica has applied beyond the batches it holds.
pub fn check_i3(run: &RunRecord) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut capped = Capped::new("I3", "replica disagreements");
    for r in &run.replicas {
        let last = r.batches.last().map_or(0, |b| b.header.height);
        if r.applied_height > last {
            capped.push(format!(
                "node {}: applied height {} is beyond the batches it holds (the last at height {last})",
                r.node_id, r.applied_height
            ));
        }
    }
    for (i, a) in run.replicas.iter().enumerate() {
        for b in &run.replicas[i + 1..] {
            let differing: Vec<(&StoredBatch, &StoredBatch)> = a
                .batches
                .iter()
                .filter_map(|x| batch_at(b, x.header.height).map(|y| (x, y)))
                .filter(|(x, y)| x.header != y.header)
                .collect();
            if let Some((x, y)) = differing.first() {
                capped.push(format!(
                    "nodes {} and {} hold different headers at {} common heights, first at height {}: {} vs {}",
                    a.node_id,
                    b.node_id,
                    differing.len(),
                    x.header.height,
                    short_digest(&x.header.hash()),
                    short_digest(&y.header.hash())
                ));
            }
            if a.applied_height == b.applied_height && a.state_digest != b.state_digest {
                capped.push(format!(
                    "nodes {} and {} both applied height {} but their states differ: digest {} vs {}",
                    a.node_id,
                    b.node_id,
                    a.applied_height,
                    short_digest(&a.state_digest),
                    short_digest(&b.state_digest)
                ));
            }
        }
    }
    capped.finish(&mut out);
    out
}

/// I4 (money): every replica's balances sum to the genesis total.
pub fn check_i4_money(run: &RunRecord) -> Vec<Violation> {
    run.replicas
        .iter()
        .filter_map(|r| {
            let total: u128 = r.balances.iter().map(|(_, b)| u128::from(*b)).sum();
            (total != run.genesis_total).then(|| {
                Violation::new(
                    "I4",
                    format!(
                        "node {}: balances sum to {total} at applied height {}, genesis total is {}",
                        r.node_id, r.applied_height, run.genesis_total
                    ),
                )
            })
        })
        .collect()
}

/// I5: after the faults heal the committed height grows, and the first commit comes within
/// `bound_ms`.
pub fn check_i5(run: &RunRecord, bound_ms: u64) -> Vec<Violation> {
    let mut out = Vec::new();
    match run.height_at_end {
        Some(end) if end > run.height_at_heal => {}
        end => out.push(Violation::new(
            "I5",
            format!(
                "no progress after healing: height {} at the heal ({} ms), {} at the end",
                run.height_at_heal,
                run.healed_at_ms,
                end.map_or_else(|| "no leader".to_string(), |h| format!("height {h}"))
            ),
        )),
    }
    match run.first_commit_after_heal_ms {
        Some(t) if t.saturating_sub(run.healed_at_ms) <= bound_ms => {}
        Some(t) => out.push(Violation::new(
            "I5",
            format!(
                "first commit after healing came {} ms after the heal (at {t} ms), over the bound of {bound_ms} ms",
                t.saturating_sub(run.healed_at_ms)
            ),
        )),
        None => out.push(Violation::new(
            "I5",
            format!("no commit after healing (healed at {} ms, bound {bound_ms} ms)", run.healed_at_ms),
        )),
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Linearizability of documents.
// ---------------------------------------------------------------------------------------------

/// The body of a model document that no read of its key ever returned. Which such body a
/// document holds can't change any step of the search, so they are all one body: more states
/// coincide in the memo, and unknown writes of such bodies become interchangeable.
const UNREAD_BODY: u32 = u32::MAX;

/// A document in the model: revision and interned body (an index into the key's body table, or
/// [`UNREAD_BODY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Doc {
    revision: u64,
    body: u32,
}

/// The model of one key: the document, or `None` when it does not exist.
type DocState = Option<Doc>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// `body` is the model's body, `shown` the real one (for the report). `outcome` is `None`
    /// when the client never learnt it (the op may or may not have happened).
    Set {
        body: u32,
        shown: u32,
        outcome: Option<Outcome>,
    },
    Delete {
        outcome: Option<Outcome>,
    },
    Read(DocState),
}

/// One operation on one key, as the search sees it.
#[derive(Debug, Clone)]
struct KeyOp {
    /// Index in `History::ops`, for the report.
    op_index: usize,
    invoke: u64,
    /// `u64::MAX` for an op with unknown outcome.
    complete: u64,
    /// Completed ops must be linearized; ops with unknown outcome may be left out.
    required: bool,
    action: Action,
    /// For an unknown op: the previous unknown op (in invocation order) with the same effect.
    /// Such ops are interchangeable, so only a prefix of each class is ever linearized.
    twin_before: Option<usize>,
}

/// Applies `action` to `state`: the next state if the op may take effect there, `None` if its
/// observed result is impossible from that state. The semantics are `core::state::execute`'s
/// with a single owner (see [`check_linearizable`]).
fn step(state: DocState, action: &Action) -> Option<DocState> {
    match action {
        Action::Read(seen) => (state == *seen).then_some(state),
        Action::Set { body, outcome, .. } => {
            let (expected, next) = match state {
                None => (Outcome::DocCreated { revision: 1 }, Doc { revision: 1, body: *body }),
                Some(d) => {
                    let revision = d.revision.saturating_add(1);
                    (Outcome::DocUpdated { revision }, Doc { revision, body: *body })
                }
            };
            match outcome {
                None => Some(Some(next)),
                // Executed but refused (NotOwner: another signer's document): no change.
                Some(Outcome::Rejected(code)) if *code != ErrorCode::NotFound => Some(state),
                Some(o) => (*o == expected).then_some(Some(next)),
            }
        }
        Action::Delete { outcome } => {
            let expected = match state {
                None => Outcome::Rejected(ErrorCode::NotFound),
                Some(_) => Outcome::DocDeleted,
            };
            match outcome {
                None => Some(None),
                Some(Outcome::Rejected(code)) if *code != ErrorCode::NotFound => Some(state),
                Some(o) => (*o == expected).then_some(None),
            }
        }
    }
}

/// The ops of one key, plus its body table.
#[derive(Default)]
struct KeyHistory {
    ops: Vec<KeyOp>,
    bodies: Vec<Vec<u8>>,
    body_ids: HashMap<Vec<u8>, u32>,
}

impl KeyHistory {
    fn intern(&mut self, body: &[u8]) -> u32 {
        if let Some(id) = self.body_ids.get(body) {
            return *id;
        }
        let id = self.bodies.len() as u32;
        self.bodies.push(body.to_vec());
        self.body_ids.insert(body.to_vec(), id);
        id
    }

    fn add(&mut self, op_index: usize, op: &Op) {
        let known = |complete: Option<u64>| complete.unwrap_or(u64::MAX);
        let (required, complete, action) = match (&op.kind, &op.result) {
            // Refused: it did not happen. Unanswered reads constrain nothing.
            (_, OpResult::Refused(_))
            | (OpKind::Transfer { .. } | OpKind::Coord { .. }, _)
            | (OpKind::Get { .. }, OpResult::Unknown) => return,
            (OpKind::Get { .. }, OpResult::Read(seen)) => {
                let state = seen.as_ref().map(|d| Doc { revision: d.revision, body: self.intern(&d.body) });
                (true, known(op.complete_ms), Action::Read(state))
            }
            // A read with a receipt is not a read: it matches nothing.
            (OpKind::Get { .. }, OpResult::Committed(_)) => return,
            (OpKind::Set { body, .. }, OpResult::Committed(receipt)) => {
                let body = self.intern(body);
                (true, known(op.complete_ms), Action::Set { body, shown: body, outcome: Some(receipt.outcome.clone()) })
            }
            // Unknown (or a nonsensical read answer to a write): it may have happened, at any time
            // after its invocation.
            (OpKind::Set { body, .. }, _) => {
                let body = self.intern(body);
                (false, u64::MAX, Action::Set { body, shown: body, outcome: None })
            }
            (OpKind::Delete { .. }, OpResult::Committed(receipt)) => {
                (true, known(op.complete_ms), Action::Delete { outcome: Some(receipt.outcome.clone()) })
            }
            (OpKind::Delete { .. }, _) => (false, u64::MAX, Action::Delete { outcome: None }),
        };
        self.ops.push(KeyOp { op_index, invoke: op.invoke_ms, complete, required, action, twin_before: None });
    }

    /// Sorts the ops by invocation, folds unread bodies into [`UNREAD_BODY`] and links each
    /// unknown op to its previous twin.
    fn prepare(&mut self) {
        self.ops.sort_by_key(|o| (o.invoke, o.op_index));
        let read: HashSet<u32> = self
            .ops
            .iter()
            .filter_map(|o| match o.action {
                Action::Read(Some(d)) => Some(d.body),
                _ => None,
            })
            .collect();
        for o in &mut self.ops {
            if let Action::Set { body, .. } = &mut o.action {
                if !read.contains(body) {
                    *body = UNREAD_BODY;
                }
            }
        }
        let mut last_of_class: HashMap<Option<u32>, usize> = HashMap::new();
        for (i, o) in self.ops.iter_mut().enumerate() {
            if o.required {
                continue;
            }
            let class = match o.action {
                Action::Set { body, .. } => Some(body),
                _ => None,
            };
            o.twin_before = last_of_class.insert(class, i);
        }
    }
}

/// Where the search got furthest, for the report.
struct Stuck {
    /// Ops linearized, in order (indices into the key's ops).
    path: Vec<usize>,
    bits: Vec<u64>,
    state: DocState,
}

enum SearchResult {
    Linearizable,
    NotLinearizable(Stuck),
    GaveUp,
}

fn bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn flip(bits: &mut [u64], i: usize) {
    bits[i / 64] ^= 1 << (i % 64);
}

/// The latest time the next linearized op may have been invoked: the earliest completion of the
/// completed ops not linearized yet.
fn frontier(ops: &[KeyOp], bits: &[u64]) -> u64 {
    ops.iter()
        .enumerate()
        .filter(|(i, o)| o.required && !bit(bits, *i))
        .map(|(_, o)| o.complete)
        .min()
        .unwrap_or(u64::MAX)
}

struct Frame {
    state: DocState,
    /// The op linearized to reach this frame (`None` for the root).
    chosen: Option<usize>,
    /// Ops `0..limit` (sorted by invocation) were invoked by the frontier.
    limit: usize,
    /// Next candidate: `0..limit` walks the completed ops, `limit..2*limit` the unknown ones, so a
    /// valid history is usually linearized without backtracking.
    cursor: usize,
    /// A completed op that may go next and leaves the state as it is (a read that matches, a
    /// refusal): taking it first loses nothing, so it is the only move tried.
    forced: Option<usize>,
}

impl Frame {
    fn new(ops: &[KeyOp], bits: &[u64], state: DocState, chosen: Option<usize>) -> Frame {
        let f = frontier(ops, bits);
        let limit = ops.partition_point(|o| o.invoke <= f);
        let forced =
            (0..limit).find(|&i| ops[i].required && !bit(bits, i) && step(state, &ops[i].action) == Some(state));
        Frame { state, chosen, limit, cursor: 0, forced }
    }

    /// The next op to try from this frame.
    fn next_candidate(&mut self, ops: &[KeyOp], bits: &[u64]) -> Option<usize> {
        if let Some(i) = self.forced.take() {
            self.cursor = 2 * self.limit;
            return Some(i);
        }
        let after_unknown = self.chosen.is_some_and(|c| !ops[c].required);
        while self.cursor < 2 * self.limit {
            let (i, want_required) =
                if self.cursor < self.limit { (self.cursor, true) } else { (self.cursor - self.limit, false) };
            self.cursor += 1;
            let o = &ops[i];
            if o.required != want_required || bit(bits, i) {
                continue;
            }
            if !o.required {
                // Only a prefix of each class of interchangeable unknown ops.
                if o.twin_before.is_some_and(|t| !bit(bits, t)) {
                    continue;
                }
                // A run of unknown ops followed by an unknown delete leaves what the delete alone
                // leaves, with fewer ops used: that run is tried without its head.
                if after_unknown && matches!(o.action, Action::Delete { .. }) {
                    continue;
                }
            }
            return Some(i);
        }
        None
    }
}

/// Wing & Gong's search with Lowe's memoisation of (linearized set, model state): depth-first,
/// each step linearizes one op invoked no later than the earliest completion among the completed
/// ops not yet linearized. `ops` must be prepared ([`KeyHistory::prepare`]). Succeeds once every
/// completed op is linearized (ops of unknown outcome may be left out). Besides the memo, three
/// pruning rules, each keeping some valid linearization if there is one: state-preserving
/// completed ops are taken greedily, interchangeable unknown ops are taken in invocation order,
/// and unknown ops that change nothing are not taken.
fn search(ops: &[KeyOp], budget_steps: u64) -> SearchResult {
    let required_total = ops.iter().filter(|o| o.required).count();
    if required_total == 0 {
        return SearchResult::Linearizable;
    }
    let mut bits = vec![0u64; ops.len().div_ceil(64)];
    // Keyed also by "reached by an unknown op", the one thing besides (linearized set, state)
    // that decides which moves a frame tries.
    let mut cache: HashSet<(Box<[u64]>, DocState, bool)> = HashSet::new();
    let mut stack = vec![Frame::new(ops, &bits, None, None)];
    let (mut done, mut steps) = (0usize, 0u64);
    let mut best = Stuck { path: Vec::new(), bits: bits.clone(), state: None };
    let mut best_done = 0;
    while let Some(top) = stack.last_mut() {
        let Some(i) = top.next_candidate(ops, &bits) else {
            if let Some(chosen) = top.chosen {
                flip(&mut bits, chosen);
                done -= usize::from(ops[chosen].required);
            }
            stack.pop();
            continue;
        };
        steps += 1;
        if steps > budget_steps {
            return SearchResult::GaveUp;
        }
        let Some(next) = step(top.state, &ops[i].action) else { continue };
        if !ops[i].required && next == top.state {
            continue;
        }
        flip(&mut bits, i);
        let now_done = done + usize::from(ops[i].required);
        if now_done == required_total {
            return SearchResult::Linearizable;
        }
        if !cache.insert((bits.clone().into_boxed_slice(), next, !ops[i].required)) {
            flip(&mut bits, i);
            continue;
        }
        done = now_done;
        stack.push(Frame::new(ops, &bits, next, Some(i)));
        if done > best_done {
            best_done = done;
            best = Stuck { path: stack.iter().filter_map(|f| f.chosen).collect(), bits: bits.clone(), state: next };
        }
    }
    SearchResult::NotLinearizable(best)
}

fn show_body(body: &[u8]) -> String {
    const MAX: usize = 24;
    let cut = &body[..body.len().min(MAX)];
    let more = if body.len() > MAX { "…" } else { "" };
    if cut.iter().all(|b| (0x20..0x7f).contains(b)) {
        format!("{:?}{more}", String::from_utf8_lossy(cut))
    } else {
        format!("0x{}{more}", cut.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

fn show_body_id(body: u32, bodies: &[Vec<u8>]) -> String {
    bodies.get(body as usize).map_or_else(|| "(a body no read returned)".to_string(), |b| show_body(b))
}

fn show_state(state: DocState, bodies: &[Vec<u8>]) -> String {
    match state {
        None => "absent".to_string(),
        Some(d) => format!("rev {} {}", d.revision, show_body_id(d.body, bodies)),
    }
}

fn show_outcome(outcome: &Option<Outcome>) -> String {
    outcome.as_ref().map_or_else(|| "unknown".to_string(), |o| format!("{o:?}"))
}

fn show_op(op: &KeyOp, history: &History, bodies: &[Vec<u8>]) -> String {
    let client = history.ops.get(op.op_index).map_or(0, |o| o.client);
    let complete = if op.complete == u64::MAX { "?".to_string() } else { op.complete.to_string() };
    let what = match &op.action {
        Action::Read(seen) => format!("Get → {}", show_state(*seen, bodies)),
        Action::Set { shown, outcome, .. } => {
            format!("Set {} → {}", show_body_id(*shown, bodies), show_outcome(outcome))
        }
        Action::Delete { outcome } => format!("Delete → {}", show_outcome(outcome)),
    };
    format!("#{} c{client} [{}..{complete}] {what}", op.op_index, op.invoke)
}

fn describe_stuck(key: &DocKey, kh: &KeyHistory, stuck: &Stuck, history: &History) -> String {
    const SHOWN: usize = 6;
    let required = kh.ops.iter().filter(|o| o.required).count();
    let unknown = kh.ops.len() - required;
    let done = stuck.path.iter().filter(|&&k| kh.ops[k].required).count();
    let tail: Vec<String> = stuck.path[stuck.path.len().saturating_sub(SHOWN)..]
        .iter()
        .map(|&k| show_op(&kh.ops[k], history, &kh.bodies))
        .collect();
    // The state with real bodies rather than folded ones.
    let state = stuck
        .path
        .iter()
        .try_fold(None, |state, &k| {
            let action = match &kh.ops[k].action {
                Action::Set { shown, outcome, .. } => {
                    Action::Set { body: *shown, shown: *shown, outcome: outcome.clone() }
                }
                other => other.clone(),
            };
            step(state, &action)
        })
        .unwrap_or(stuck.state);
    let f = frontier(&kh.ops, &stuck.bits);
    let blocked: Vec<String> = kh
        .ops
        .iter()
        .enumerate()
        .filter(|(i, o)| !bit(&stuck.bits, *i) && o.invoke <= f)
        .take(SHOWN)
        .map(|(_, o)| show_op(o, history, &kh.bodies))
        .collect();
    format!(
        "document {key} (hex {}): its {required} completed ops ({unknown} more of unknown outcome) are not \
         linearizable; at best {done} linearized{}, leaving the document {}, and none of these fits next: [{}]",
        key.0.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        if tail.is_empty() { String::new() } else { format!(" (last: {})", tail.join("; ")) },
        show_state(state, &kh.bodies),
        blocked.join("; ")
    )
}

/// Linearizability (I4) of the document operations, key by key, against a register-like model
/// `Option<(revision, body)>` that starts absent: a Set creates revision 1 or bumps the revision,
/// a Delete removes the document (or is refused NotFound), a Set after a Delete creates revision 1
/// again, a Get returns the current document.
///
/// **Assumption: every document write in the history comes from one owner.** The history's
/// [`OpKind::Set`]/[`OpKind::Delete`] don't carry the signer, so the model can't tell whose
/// document it is: it never predicts `Rejected(NotOwner)`. A committed `Rejected(_)` outcome other
/// than a Delete's `NotFound` is taken as "executed, no state change" and constrains nothing.
///
/// Ops per key: completed writes (with a receipt) and answered reads must be linearized within
/// [invoke, complete]; refused ops did not happen and are dropped; unanswered reads are dropped;
/// writes of unknown outcome may take effect at any time after their invocation, or never.
///
/// Each key's search is bounded by `budget_steps` attempted linearizations; a key over budget is
/// counted in the third returned number ("gave up") and yields no violation. Returns the
/// violations (one per non-linearizable key), the number of keys checked (every key with at least
/// one op left after dropping, including those given up on) and the number given up on.
pub fn check_linearizable(history: &History, budget_steps: u64) -> (Vec<Violation>, u64, u64) {
    let mut keys: BTreeMap<DocKey, KeyHistory> = BTreeMap::new();
    for (index, op) in history.ops.iter().enumerate() {
        if let Some(key) = op.kind.doc_key() {
            keys.entry(key).or_default().add(index, op);
        }
    }
    let (mut violations, mut checked, mut gave_up) = (Vec::new(), 0u64, 0u64);
    for (key, mut kh) in keys {
        if kh.ops.is_empty() {
            continue;
        }
        checked += 1;
        kh.prepare();
        match search(&kh.ops, budget_steps) {
            SearchResult::Linearizable => {}
            SearchResult::GaveUp => gave_up += 1,
            SearchResult::NotLinearizable(stuck) => {
                violations.push(Violation::new("I4", describe_stuck(&key, &kh, &stuck, history)));
            }
        }
    }
    (violations, checked, gave_up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{DocRead, ReplicaFinal, SeenHeader};
    use ed25519_dalek::SigningKey;
    use tally_codec::{ClusterId, Operation, PublicKey, Receipt, Request, SignedRequest};

    const CLUSTER: ClusterId = ClusterId([1; 16]);

    fn operator_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn alice() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    fn public(key: &SigningKey) -> PublicKey {
        PublicKey(key.verifying_key().to_bytes())
    }

    fn bob() -> PublicKey {
        public(&SigningKey::from_bytes(&[11; 32]))
    }

    fn doc(n: u8) -> DocKey {
        DocKey::from_random([n; 16])
    }

    fn request(nonce: u64, op: Operation) -> SignedRequest {
        Request { cluster_id: CLUSTER, signer: public(&alice()), nonce, expires_at_ms: 1_000_000, op }.sign(&alice())
    }

    /// A signed batch chained to `prev`, and the receipts of its leaves.
    fn batch(height: u64, prev: Digest, entries: &[(SignedRequest, Outcome)]) -> (StoredBatch, Vec<Receipt>) {
        let leaves: Vec<[u8; 32]> = entries.iter().map(|(r, o)| leaf_hash(&r.id(), o)).collect();
        let tree = Tree::from_leaves(&leaves);
        let header = BatchHeader {
            cluster_id: CLUSTER,
            height,
            prev_hash: prev,
            merkle_root: tree.root(),
            leaf_count: entries.len() as u32,
            write_set_digest: Digest([height as u8; 32]),
            state_digest: Digest([0x50 + height as u8; 32]),
            term: 1,
            time_ms: 100 * height,
        };
        let signature = header.sign(&operator_key());
        let receipts = entries
            .iter()
            .enumerate()
            .map(|(i, (r, o))| Receipt {
                request: r.clone(),
                outcome: o.clone(),
                leaf_index: i as u32,
                proof: tree.proof(i),
                header: header.clone(),
                signature,
            })
            .collect();
        let stored = StoredBatch {
            header,
            signature,
            request_ids: entries.iter().map(|(r, _)| r.id()).collect(),
            outcomes: entries.iter().map(|(_, o)| o.clone()).collect(),
        };
        (stored, receipts)
    }

    fn op(client: u64, invoke_ms: u64, complete_ms: Option<u64>, kind: OpKind, result: OpResult) -> Op {
        Op { client, invoke_ms, complete_ms, kind, result }
    }

    fn committed(r: &Receipt) -> OpResult {
        OpResult::Committed(Box::new(r.clone()))
    }

    fn read(revision: u64, body: &str) -> OpResult {
        OpResult::Read(Some(DocRead { revision, body: body.as_bytes().to_vec() }))
    }

    fn kind_of(r: &SignedRequest) -> OpKind {
        let id = r.id();
        match &r.request.op {
            Operation::Set { key, value } => OpKind::Set { id, key: *key, body: value.clone() },
            Operation::Delete { key } => OpKind::Delete { id, key: *key },
            Operation::Transfer { to, amount } => {
                OpKind::Transfer { id, from: r.request.signer, to: *to, amount: *amount }
            }
            op => panic!("the fixture builds no {op:?}"),
        }
    }

    /// A valid run: three batches (two replicas hold all three, one lags at two), a history of
    /// sets, deletes, a transfer and reads, each read consistent with the writes.
    fn fixture() -> RunRecord {
        let k = doc(0xa);
        let set_a = request(1, Operation::Set { key: k, value: b"a".to_vec() });
        let transfer = request(2, Operation::Transfer { to: bob(), amount: 10 });
        let set_b = request(3, Operation::Set { key: k, value: b"b".to_vec() });
        let del_missing = request(4, Operation::Delete { key: doc(0xb) });
        let del = request(5, Operation::Delete { key: k });
        let set_c = request(6, Operation::Set { key: k, value: b"c".to_vec() });
        let refused = request(7, Operation::Set { key: doc(0xc), value: b"x".to_vec() });
        let unknown = request(8, Operation::Set { key: doc(0xc), value: b"y".to_vec() });

        let (b1, r1) = batch(
            1,
            Digest::ZERO,
            &[
                (set_a.clone(), Outcome::DocCreated { revision: 1 }),
                (transfer.clone(), Outcome::Transferred { sender_balance: 990 }),
            ],
        );
        let (b2, r2) = batch(
            2,
            b1.header.hash(),
            &[
                (set_b.clone(), Outcome::DocUpdated { revision: 2 }),
                (del_missing.clone(), Outcome::Rejected(ErrorCode::NotFound)),
            ],
        );
        let (b3, r3) = batch(
            3,
            b2.header.hash(),
            &[(del.clone(), Outcome::DocDeleted), (set_c.clone(), Outcome::DocCreated { revision: 1 })],
        );

        let get = OpKind::Get { key: k };
        let ops = vec![
            op(1, 10, Some(20), kind_of(&set_a), committed(&r1[0])),
            op(1, 21, Some(30), kind_of(&transfer), committed(&r1[1])),
            op(2, 25, Some(28), get.clone(), read(1, "a")),
            op(1, 31, Some(40), kind_of(&set_b), committed(&r2[0])),
            op(1, 41, Some(50), kind_of(&del_missing), committed(&r2[1])),
            op(2, 45, Some(46), get.clone(), read(2, "b")),
            op(1, 51, Some(60), kind_of(&del), committed(&r3[0])),
            op(2, 61, Some(62), get.clone(), OpResult::Read(None)),
            op(1, 63, Some(70), kind_of(&set_c), committed(&r3[1])),
            op(3, 64, Some(65), kind_of(&refused), OpResult::Refused(ErrorCode::NotLeader)),
            op(3, 66, None, kind_of(&unknown), OpResult::Unknown),
            op(2, 71, Some(72), get, read(1, "c")),
        ];
        let balances = vec![(public(&alice()), 990), (bob(), 10)];
        let replica = |node_id: u64, batches: &[&StoredBatch], digest: u8| ReplicaFinal {
            node_id,
            batches: batches.iter().map(|b| (*b).clone()).collect(),
            applied_height: batches.len() as u64,
            state_digest: Digest([digest; 32]),
            balances: balances.clone(),
        };
        let headers = [&b1, &b2, &b3]
            .iter()
            .map(|b| SeenHeader {
                header: b.header.clone(),
                signature: b.signature,
                source: format!("announcement of height {}", b.header.height),
            })
            .collect();
        RunRecord {
            operator: public(&operator_key()),
            genesis_total: 1000,
            history: History { ops },
            replicas: vec![
                replica(1, &[&b1, &b2, &b3], 3),
                replica(2, &[&b1, &b2, &b3], 3),
                replica(3, &[&b1, &b2], 2),
            ],
            headers,
            healed_at_ms: 1000,
            height_at_heal: 2,
            height_at_end: Some(3),
            first_commit_after_heal_ms: Some(1150),
        }
    }

    fn has(violations: &[Violation], invariant: &str, needle: &str) -> bool {
        violations.iter().any(|v| v.invariant == invariant && v.what.contains(needle))
    }

    /// Replaces every replica's batch at `height` with `f` applied, re-signed by the operator.
    fn edit_batches(run: &mut RunRecord, height: u64, f: impl Fn(&mut StoredBatch)) {
        for r in &mut run.replicas {
            if let Some(b) = r.batches.iter_mut().find(|b| b.header.height == height) {
                f(b);
                b.signature = b.header.sign(&operator_key());
            }
        }
    }

    /// I6 over a committed history of coordination requests: a clean one passes; a slot granted
    /// twice, a create-only document created twice, a lease renewed after its expiry and one
    /// refused as unknown before it are each reported.
    #[test]
    fn coordination_outcomes_are_checked_by_i6() {
        let claim = request(1, Operation::Claim { domain: "d".into(), slot: 1, lease: None });
        let claim_again = request(2, Operation::Claim { domain: "d".into(), slot: 1, lease: None });
        let cas =
            |n| request(n, Operation::SetIf { key: doc(1), value: b"{}".to_vec(), if_revision: Some(0), lease: None });
        let grant = request(5, Operation::LeaseGrant { ttl_ms: 1_000 });
        let keep = |n| request(n, Operation::LeaseKeepAlive { lease: 7 });
        let me = public(&alice());
        let run = |second: Vec<(SignedRequest, Outcome)>| {
            let (b1, _) = batch(
                1,
                Digest::ZERO,
                &[
                    (claim.clone(), Outcome::ClaimGranted { height: 1 }),
                    (cas(3), Outcome::DocCreated { revision: 1 }),
                    (grant.clone(), Outcome::LeaseGranted { lease: 7, expires_at_ms: 1_100 }),
                ],
            );
            let (b2, _) = batch(2, b1.header.hash(), &second);
            let all: Vec<&SignedRequest> =
                [&claim, &claim_again, &grant].into_iter().chain(second.iter().map(|(r, _)| r)).collect();
            let mut ops: Vec<Op> = all
                .iter()
                .map(|r| Op {
                    client: 0,
                    invoke_ms: 0,
                    complete_ms: None,
                    kind: OpKind::Coord { id: r.id(), signer: me, op: r.request.op.clone() },
                    result: OpResult::Unknown,
                })
                .collect();
            ops.push(Op {
                client: 0,
                invoke_ms: 0,
                complete_ms: None,
                kind: OpKind::Coord { id: cas(3).id(), signer: me, op: cas(3).request.op.clone() },
                result: OpResult::Unknown,
            });
            let mut r = fixture();
            r.history = History { ops };
            r.replicas = vec![ReplicaFinal {
                node_id: 1,
                batches: vec![b1, b2],
                applied_height: 2,
                state_digest: Digest([2; 32]),
                balances: Vec::new(),
            }];
            check_i6(&r)
        };
        // Batch 1 is at time 100, batch 2 at 200: the lease (expiry 1,100) is alive in batch 2.
        let clean = run(vec![
            (claim_again.clone(), Outcome::ClaimDenied { holder: me, height: 1 }),
            (cas(4), Outcome::RevisionMismatch { current: 1 }),
            (keep(6), Outcome::LeaseRenewed { expires_at_ms: 1_200 }),
        ]);
        assert_eq!(clean, vec![], "a clean history");
        let bad = run(vec![
            (claim_again.clone(), Outcome::ClaimGranted { height: 2 }),
            (cas(4), Outcome::DocCreated { revision: 1 }),
            (keep(6), Outcome::Rejected(ErrorCode::LeaseNotFound)),
        ]);
        let text = format!("{bad:?}");
        assert!(text.contains("granted again"), "{text}");
        assert!(text.contains("created at height 1 and again at 2"), "{text}");
        assert!(
            text.contains("lease 7 ended early: unknown at height 2, batch time 200, before its expiry 1100"),
            "{text}"
        );
    }

    #[test]
    fn clean_fixture_passes_every_checker() {
        let run = fixture();
        let verdicts = check_all(&run, 500);
        assert_eq!(verdicts.violations, vec![], "{verdicts:#?}");
        assert!(verdicts.ok());
        assert_eq!(verdicts.acked_checked, 6);
        assert_eq!(verdicts.keys_checked, 3);
        assert_eq!(verdicts.linearizability_gave_up, 0);
        for (i, op) in run.history.ops.iter().enumerate() {
            if let OpResult::Committed(r) = &op.result {
                r.verify_for_cluster(&run.operator, &CLUSTER).expect("fixture receipts verify");
                assert_eq!(op.kind.id(), Some(r.request_id()), "op {i}");
            }
        }
    }

    #[test]
    fn lost_ack_is_an_i1_violation() {
        let mut run = fixture();
        // The transfer (leaf 1 of height 1) vanishes from every replica.
        for r in &mut run.replicas {
            r.batches[0].request_ids.truncate(1);
            r.batches[0].outcomes.truncate(1);
        }
        let v = check_i1(&run);
        assert!(has(&v, "I1", "lost: op #1"), "{v:#?}");
        assert_eq!(v.len(), 1, "{v:#?}");
        // The stored leaves no longer match the signed root.
        assert!(has(&check_i2(&run), "I2", "request ids"));
    }

    #[test]
    fn a_committed_history_without_replicas_loses_every_ack() {
        let mut run = fixture();
        run.replicas.clear();
        let v = check_i1(&run);
        assert_eq!(v.iter().filter(|v| v.what.starts_with("lost")).count(), 6, "{v:#?}");
    }

    #[test]
    fn duplicate_is_an_i1_violation() {
        let mut run = fixture();
        let transfer_id = run.replicas[0].batches[0].request_ids[1];
        let unknown_id = run.history.ops[10].kind.id().expect("a set has an id");
        for r in &mut run.replicas {
            let b = &mut r.batches[1];
            b.request_ids.push(transfer_id);
            b.outcomes.push(Outcome::Transferred { sender_balance: 980 });
            // An unacknowledged request executed twice.
            for _ in 0..2 {
                b.request_ids.push(unknown_id);
                b.outcomes.push(Outcome::DocCreated { revision: 1 });
            }
        }
        let v = check_i1(&run);
        assert!(has(&v, "I1", "duplicated: op #1"), "{v:#?}");
        assert!(has(&v, "I1", &format!("duplicate execution: request {}", short_id(&unknown_id))), "{v:#?}");
        assert_eq!(v.len(), 2, "{v:#?}");
    }

    #[test]
    fn acked_result_differing_from_the_committed_one_is_an_i1_violation() {
        let mut run = fixture();
        let OpResult::Committed(r) = &mut run.history.ops[1].result else { panic!("op 1 is acked") };
        r.outcome = Outcome::Transferred { sender_balance: 989 };
        let v = check_i1(&run);
        assert!(has(&v, "I1", "acknowledged with Transferred { sender_balance: 989 }"), "{v:#?}");
        assert!(has(&v, "I1", "Merkle proof"), "{v:#?}");
    }

    #[test]
    fn committed_outcome_changed_under_a_resigned_header_is_an_i1_violation() {
        // The replicas store (and sign) another outcome than the one acknowledged: the receipt
        // itself still verifies, so only the comparison with the committed history finds it.
        let mut run = fixture();
        edit_batches(&mut run, 1, |b| {
            b.outcomes[1] = Outcome::Transferred { sender_balance: 0 };
            let leaves: Vec<[u8; 32]> = b.request_ids.iter().zip(&b.outcomes).map(|(id, o)| leaf_hash(id, o)).collect();
            b.header.merkle_root = Tree::from_leaves(&leaves).root();
        });
        let v = check_i1(&run);
        assert!(has(&v, "I1", "committed with Some(Transferred { sender_balance: 0 })"), "{v:#?}");
        assert!(has(&v, "I1", "is not the committed one"), "{v:#?}");
    }

    #[test]
    fn receipt_for_another_request_than_the_op_is_an_i1_violation() {
        let mut run = fixture();
        let other = run.history.ops[3].result.clone();
        run.history.ops[1].result = other;
        let v = check_i1(&run);
        assert!(has(&v, "I1", "op #1 (client 1, invoked at 21 ms): its receipt is for request"), "{v:#?}");
    }

    #[test]
    fn acked_at_another_leaf_is_an_i1_violation() {
        let mut run = fixture();
        // Swap the two leaves of height 2 on every replica and re-sign: the receipts now name the
        // wrong leaves.
        edit_batches(&mut run, 2, |b| {
            b.request_ids.swap(0, 1);
            b.outcomes.swap(0, 1);
            let leaves: Vec<[u8; 32]> = b.request_ids.iter().zip(&b.outcomes).map(|(id, o)| leaf_hash(id, o)).collect();
            b.header.merkle_root = Tree::from_leaves(&leaves).root();
        });
        let v = check_i1(&run);
        assert!(has(&v, "I1", "acknowledged at height 2 leaf 0 but committed at height 2 leaf 1"), "{v:#?}");
    }

    #[test]
    fn two_signed_headers_at_one_height_is_an_i2_violation() {
        let mut run = fixture();
        let mut forged = run.replicas[0].batches[1].header.clone();
        forged.merkle_root = Digest([0xee; 32]);
        let signature = forged.sign(&operator_key());
        run.headers.push(SeenHeader { header: forged, signature, source: "the evil twin".into() });
        let v = check_i2(&run);
        assert!(has(&v, "I2", "height 2: two different signed headers"), "{v:#?}");
        assert!(has(&v, "I2", "(from the evil twin)"), "{v:#?}");
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(check_i2(&fixture()).is_empty());
    }

    #[test]
    fn bad_signature_is_an_i2_violation() {
        let mut run = fixture();
        run.headers[0].signature.0[0] ^= 1;
        let v = check_i2(&run);
        assert!(has(&v, "I2", "from announcement of height 1: the signature does not verify"), "{v:#?}");
        assert_eq!(v.len(), 1, "{v:#?}");

        // Signed by someone else.
        let mut run = fixture();
        let stranger = SigningKey::from_bytes(&[3; 32]);
        run.replicas[2].batches[0].signature = run.replicas[2].batches[0].header.sign(&stranger);
        assert!(has(&check_i2(&run), "I2", "node 3 stored batch 1: the signature does not verify"));
    }

    #[test]
    fn broken_chain_is_an_i2_violation() {
        let mut run = fixture();
        run.replicas[1].batches[2].header.prev_hash = Digest([0xee; 32]);
        run.replicas[1].batches[2].signature = run.replicas[1].batches[2].header.sign(&operator_key());
        let v = check_i2(&run);
        assert!(has(&v, "I2", "node 2: broken chain at height 3"), "{v:#?}");

        // A gap in the heights.
        let mut run = fixture();
        run.replicas[0].batches.remove(1);
        let v = check_i2(&run);
        assert!(has(&v, "I2", "node 1: the batch after height 1 has height 3"), "{v:#?}");

        // Height 1 chained to something else than the zero hash.
        let mut run = fixture();
        edit_batches(&mut run, 1, |b| b.header.prev_hash = Digest([0xee; 32]));
        let v = check_i2(&run);
        assert!(has(&v, "I2", "node 1: height 1 chains to eeeeeeeeeeeeeeee, not to the zero hash"), "{v:#?}");
    }

    /// A real replica restored from a snapshot holds only the later batches: every check passes
    /// while another replica holds the early ones, and I3 compares the heights they share.
    #[test]
    fn a_replica_holding_only_later_batches_passes_and_is_compared_by_height() {
        let mut run = fixture();
        run.replicas[1].batches.drain(..2);
        assert_eq!(check_all(&run, 500).violations, vec![]);
        assert_eq!(check_committed(&run).violations, vec![]);

        run.replicas[1].batches[0].header.time_ms += 1;
        let v = check_i3(&run);
        assert!(has(&v, "I3", "nodes 1 and 2 hold different headers at 1 common heights, first at height 3"), "{v:#?}");
    }

    #[test]
    fn a_height_whose_body_no_replica_holds_is_an_i1_violation() {
        let mut run = fixture();
        // Node 3 holds heights 1 and 2, the others only 3, yet all applied 3: height 2's
        // requests live on node 3 alone, height 3's are fine; take height 2 away from node 3.
        for r in &mut run.replicas[..2] {
            r.batches.drain(..2);
        }
        run.replicas[2].batches.truncate(1);
        let v = check_i1(&run);
        assert!(has(&v, "I1", "no replica holds the body of height 2"), "{v:#?}");
        assert!(has(&v, "I1", "lost: op #3"), "{v:#?}");
    }

    #[test]
    fn a_receipt_that_does_not_verify_offline_is_an_i1_violation() {
        let run = fixture();
        assert_eq!(check_receipts_offline(&run), vec![]);
        // The request's own signature is broken: the simulator's checks cannot see it (its
        // requests carry a keyed hash), the offline check must.
        let mut run = fixture();
        let OpResult::Committed(r) = &mut run.history.ops[1].result else { panic!("op 1 is acked") };
        r.request.signature.0[0] ^= 1;
        let v = check_receipts_offline(&run);
        assert!(has(&v, "I1", "op #1 (client 1, invoked at 21 ms): the receipt of request"), "{v:#?}");
        assert!(has(&v, "I1", "request signature does not verify"), "{v:#?}");
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(has(&check_committed(&run).violations, "I1", "does not verify offline"));
    }

    #[test]
    fn diverging_replicas_are_i3_violations() {
        let mut run = fixture();
        run.replicas[1].state_digest = Digest([4; 32]);
        let v = check_i3(&run);
        assert!(has(&v, "I3", "nodes 1 and 2 both applied height 3 but their states differ"), "{v:#?}");
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(check_i3(&fixture()).is_empty());

        let mut run = fixture();
        run.replicas[2].batches[1].header.time_ms += 1;
        let v = check_i3(&run);
        assert!(has(&v, "I3", "nodes 1 and 3 hold different headers at 1 common heights, first at height 2"), "{v:#?}");

        let mut run = fixture();
        run.replicas[2].applied_height = 3;
        assert!(has(
            &check_i3(&run),
            "I3",
            "node 3: applied height 3 is beyond the batches it holds (the last at height 2)"
        ));
    }

    #[test]
    fn money_created_is_an_i4_violation() {
        let mut run = fixture();
        run.replicas[2].balances[1].1 += 1;
        let v = check_i4_money(&run);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(has(&v, "I4", "node 3: balances sum to 1001"), "{v:#?}");
        assert!(check_i4_money(&fixture()).is_empty());
    }

    #[test]
    fn long_lists_of_one_kind_are_summed_up() {
        let mut capped = Capped::new("I1", "test violations");
        for i in 0..25 {
            capped.push(format!("violation {i}"));
        }
        let mut out = Vec::new();
        capped.finish(&mut out);
        assert_eq!(out.len(), LISTED_PER_KIND + 1);
        assert_eq!(out[0].what, "violation 0");
        assert_eq!(out[LISTED_PER_KIND].what, "… and 5 more violations of this kind: test violations");
    }

    #[test]
    fn liveness_after_healing_is_i5() {
        let run = fixture();
        assert!(check_i5(&run, 500).is_empty());
        assert!(has(&check_i5(&run, 100), "I5", "150 ms after the heal"));

        let mut stalled = fixture();
        stalled.height_at_end = Some(2);
        stalled.first_commit_after_heal_ms = None;
        let v = check_i5(&stalled, 500);
        assert!(has(&v, "I5", "no progress after healing"), "{v:#?}");
        assert!(has(&v, "I5", "no commit after healing"), "{v:#?}");

        let mut leaderless = fixture();
        leaderless.height_at_end = None;
        assert!(has(&check_i5(&leaderless, 500), "I5", "no leader at the end"));
    }

    // --- Linearizability -------------------------------------------------------------------

    /// A receipt carrying `outcome` (the linearizability checker reads only the outcome).
    fn receipt_with(outcome: Outcome) -> OpResult {
        let request = Request {
            cluster_id: CLUSTER,
            signer: PublicKey([0; 32]),
            nonce: 0,
            expires_at_ms: 0,
            op: Operation::Delete { key: doc(0) },
        };
        let header = BatchHeader {
            cluster_id: CLUSTER,
            height: 1,
            prev_hash: Digest::ZERO,
            merkle_root: Digest::ZERO,
            leaf_count: 1,
            write_set_digest: Digest::ZERO,
            state_digest: Digest::ZERO,
            term: 1,
            time_ms: 0,
        };
        OpResult::Committed(Box::new(Receipt {
            request: SignedRequest { request, signature: Signature([0; 64]) },
            outcome,
            leaf_index: 0,
            proof: Vec::new(),
            header,
            signature: Signature([0; 64]),
        }))
    }

    fn set(client: u64, at: (u64, u64), key: DocKey, body: &str, outcome: Outcome) -> Op {
        let id = RequestId(*blake3::hash(format!("{client} {at:?} {body}").as_bytes()).as_bytes());
        op(client, at.0, Some(at.1), OpKind::Set { id, key, body: body.as_bytes().to_vec() }, receipt_with(outcome))
    }

    fn unknown_set(client: u64, invoke: u64, key: DocKey, body: &str) -> Op {
        let id = RequestId(*blake3::hash(format!("{client} {invoke} {body} ?").as_bytes()).as_bytes());
        op(client, invoke, None, OpKind::Set { id, key, body: body.as_bytes().to_vec() }, OpResult::Unknown)
    }

    fn delete(client: u64, at: (u64, u64), key: DocKey, outcome: Outcome) -> Op {
        let id = RequestId(*blake3::hash(format!("del {client} {at:?}").as_bytes()).as_bytes());
        op(client, at.0, Some(at.1), OpKind::Delete { id, key }, receipt_with(outcome))
    }

    fn get(client: u64, at: (u64, u64), key: DocKey, result: OpResult) -> Op {
        op(client, at.0, Some(at.1), OpKind::Get { key }, result)
    }

    fn lin(ops: Vec<Op>) -> (Vec<Violation>, u64, u64) {
        let mut ops = ops;
        ops.sort_by_key(|o| o.invoke_ms);
        check_linearizable(&History { ops }, 100_000)
    }

    const CREATED: Outcome = Outcome::DocCreated { revision: 1 };
    const UPDATED2: Outcome = Outcome::DocUpdated { revision: 2 };

    #[test]
    fn stale_read_after_a_later_write_is_not_linearizable() {
        let k = doc(1);
        let (v, checked, gave_up) = lin(vec![
            set(1, (0, 10), k, "a", CREATED),
            set(1, (20, 30), k, "b", UPDATED2),
            get(2, (40, 50), k, read(1, "a")),
        ]);
        assert_eq!((checked, gave_up), (1, 0));
        assert_eq!(v.len(), 1, "{v:#?}");
        assert_eq!(v[0].invariant, "I4");
        assert!(v[0].what.contains(&k.to_string()), "{v:#?}");
        assert!(v[0].what.contains("Get → rev 1 \"a\""), "{v:#?}");
        assert!(v[0].what.contains("leaving the document rev 2 \"b\""), "{v:#?}");
    }

    #[test]
    fn read_overlapping_the_second_write_may_see_the_first() {
        let k = doc(1);
        let (v, checked, gave_up) = lin(vec![
            set(1, (0, 10), k, "a", CREATED),
            set(1, (20, 30), k, "b", UPDATED2),
            get(2, (25, 50), k, read(1, "a")),
        ]);
        assert_eq!((v, checked, gave_up), (vec![], 1, 0));
    }

    #[test]
    fn unknown_write_may_explain_a_read() {
        let k = doc(1);
        let (v, _, gave_up) =
            lin(vec![set(1, (0, 10), k, "a", CREATED), unknown_set(1, 20, k, "b"), get(2, (40, 50), k, read(2, "b"))]);
        assert_eq!((v, gave_up), (vec![], 0));
        // But not one invoked after the read completed.
        let (v, _, _) =
            lin(vec![set(1, (0, 10), k, "a", CREATED), unknown_set(1, 60, k, "b"), get(2, (40, 50), k, read(2, "b"))]);
        assert_eq!(v.len(), 1, "{v:#?}");
        // And an unknown write may also never have happened.
        let (v, _, _) =
            lin(vec![set(1, (0, 10), k, "a", CREATED), unknown_set(1, 20, k, "b"), get(2, (40, 50), k, read(1, "a"))]);
        assert_eq!(v, vec![]);
    }

    #[test]
    fn read_of_a_value_nobody_wrote_is_not_linearizable() {
        let k = doc(1);
        let (v, _, _) = lin(vec![set(1, (0, 10), k, "a", CREATED), get(2, (5, 50), k, read(1, "zzz"))]);
        assert_eq!(v.len(), 1, "{v:#?}");
        let (v, _, _) = lin(vec![get(2, (5, 50), k, read(1, "a"))]);
        assert_eq!(v.len(), 1, "{v:#?}");
    }

    #[test]
    fn refused_writes_did_not_happen() {
        let k = doc(1);
        let id = RequestId([5; 32]);
        let refused =
            op(1, 0, Some(1), OpKind::Set { id, key: k, body: b"a".to_vec() }, OpResult::Refused(ErrorCode::NotLeader));
        let (v, checked, _) = lin(vec![refused.clone(), get(2, (5, 6), k, OpResult::Read(None))]);
        assert_eq!((v, checked), (vec![], 1));
        let (v, _, _) = lin(vec![refused, get(2, (5, 6), k, read(1, "a"))]);
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn delete_and_recreate_semantics() {
        let k = doc(1);
        let ok = vec![
            delete(1, (0, 1), k, Outcome::Rejected(ErrorCode::NotFound)),
            set(1, (2, 3), k, "a", CREATED),
            set(1, (4, 5), k, "b", UPDATED2),
            delete(1, (6, 7), k, Outcome::DocDeleted),
            get(2, (8, 9), k, OpResult::Read(None)),
            set(1, (10, 11), k, "c", CREATED),
            get(2, (12, 13), k, read(1, "c")),
            // Another owner's refusal changes nothing.
            set(3, (14, 15), k, "evil", Outcome::Rejected(ErrorCode::NotOwner)),
            get(2, (16, 17), k, read(1, "c")),
        ];
        assert_eq!(lin(ok.clone()).0, vec![]);

        // A revision that skips one.
        let mut bad = ok.clone();
        bad[5] = set(1, (10, 11), k, "c", Outcome::DocUpdated { revision: 3 });
        assert_eq!(lin(bad).0.len(), 1);
        // A delete of a missing document that "succeeds".
        let mut bad = ok.clone();
        bad[0] = delete(1, (0, 1), k, Outcome::DocDeleted);
        assert_eq!(lin(bad).0.len(), 1);
        // NotFound while the document exists.
        let mut bad = ok;
        bad[3] = delete(1, (6, 7), k, Outcome::Rejected(ErrorCode::NotFound));
        assert_eq!(lin(bad).0.len(), 1);
    }

    #[test]
    fn concurrent_writers_are_ordered_by_their_outcomes() {
        let k = doc(1);
        // Two overlapping creates: exactly one may be the creation.
        let (v, _, _) = lin(vec![set(1, (0, 10), k, "a", CREATED), set(2, (1, 11), k, "b", CREATED)]);
        assert_eq!(v.len(), 1);
        // Overlapping, the second-invoked one linearized first.
        let (v, _, _) = lin(vec![
            set(1, (0, 10), k, "a", UPDATED2),
            set(2, (1, 11), k, "b", CREATED),
            get(3, (12, 13), k, read(2, "a")),
        ]);
        assert_eq!(v, vec![]);
    }

    #[test]
    fn keys_are_checked_separately() {
        let (k1, k2) = (doc(1), doc(2));
        let (v, checked, _) = lin(vec![
            set(1, (0, 10), k1, "a", CREATED),
            set(1, (20, 30), k2, "a", CREATED),
            get(2, (40, 50), k2, read(1, "a")),
            get(2, (60, 70), k1, OpResult::Read(None)),
        ]);
        assert_eq!(checked, 2);
        assert_eq!(v.len(), 1);
        assert!(v[0].what.contains(&k1.to_string()), "{v:#?}");
    }

    /// Many clients hammering one key, with unknown writes and reads in flight: `n` rounds, each
    /// with a write per client, overlapping reads, and (every fifth round) an unknown write.
    fn busy_history(k: DocKey, rounds: u64) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut revision = 0u64;
        for round in 0..rounds {
            let t = round * 100;
            for c in 0..3u64 {
                // Writes of one round overlap; they take effect in client order.
                revision += 1;
                let outcome = if revision == 1 { CREATED } else { Outcome::DocUpdated { revision } };
                ops.push(set(c, (t + c, t + 50 + c), k, &format!("{round}.{c}"), outcome));
            }
            // A read overlapping the writes may see any of them, or the state before the round.
            ops.push(get(10, (t + 1, t + 60), k, read(revision - 1, &format!("{round}.1"))));
            // A read after the round sees its last write.
            ops.push(get(11, (t + 70, t + 80), k, read(revision, &format!("{round}.2"))));
            if round % 5 == 4 {
                ops.push(unknown_set(20, t + 85, k, "lost?"));
            }
        }
        ops
    }

    #[test]
    fn a_busy_key_is_checked_within_budget() {
        let k = doc(9);
        let ops = busy_history(k, 80);
        assert!(ops.len() > 400);
        let (v, checked, gave_up) = lin(ops.clone());
        assert_eq!((v, checked, gave_up), (vec![], 1, 0));

        // One stale read near the end is found.
        let mut bad = ops;
        let last_read = bad.iter().rposition(|o| matches!(o.kind, OpKind::Get { .. })).expect("there are reads");
        bad[last_read].result = read(1, "0.0");
        let (v, _, gave_up) = lin(bad);
        assert_eq!((v.len(), gave_up), (1, 0), "{v:#?}");
    }

    #[test]
    fn many_unknown_writes_stay_cheap() {
        // 40 writes of unknown outcome, each with its own body (never read), between committed
        // writes that leave no room for them, and an impossible read at the end: without folding
        // unread bodies the search would try every subset of the unknown writes.
        let k = doc(5);
        let mut ops = vec![set(1, (0, 5), k, "w0", CREATED)];
        for i in 1..=40u64 {
            ops.push(unknown_set(2, 10 * i, k, &format!("lost {i}")));
            ops.push(set(1, (10 * i + 1, 10 * i + 5), k, &format!("w{i}"), Outcome::DocUpdated { revision: i + 1 }));
        }
        ops.push(get(3, (1000, 1001), k, read(41, "w40")));
        let (v, _, gave_up) = lin(ops.clone());
        assert_eq!((v, gave_up), (vec![], 0));
        let last = ops.len() - 1;
        ops[last].result = read(40, "w40");
        let (v, _, gave_up) = lin(ops);
        assert_eq!((v.len(), gave_up), (1, 0), "{v:#?}");
        assert!(v[0].what.contains("leaving the document rev 41 \"w40\""), "{v:#?}");
    }

    #[test]
    fn over_budget_gives_up_without_a_verdict() {
        let k = doc(9);
        let mut ops = busy_history(k, 20);
        let last_read = ops.iter().rposition(|o| matches!(o.kind, OpKind::Get { .. })).expect("there are reads");
        ops[last_read].result = read(1, "0.0");
        ops.sort_by_key(|o| o.invoke_ms);
        let (v, checked, gave_up) = check_linearizable(&History { ops }, 10);
        assert_eq!((v, checked, gave_up), (vec![], 1, 1));
    }

    #[test]
    fn check_all_reports_a_non_linearizable_fixture() {
        let mut run = fixture();
        // The last read sees the deleted revision.
        run.history.ops[11].result = read(2, "b");
        let verdicts = check_all(&run, 500);
        assert_eq!(verdicts.violations.len(), 1, "{verdicts:#?}");
        assert!(has(&verdicts.violations, "I4", "not linearizable"));
    }

    // --- The search against brute force ---------------------------------------------------

    type Model = Option<(u64, Vec<u8>)>;

    /// The model's semantics written out a second time, straight from the history types.
    fn brute_step(state: &Model, op: &Op) -> Option<Model> {
        let bumped = |body: &Vec<u8>| Some((state.as_ref().map_or(1, |(r, _)| r + 1), body.clone()));
        match (&op.kind, &op.result) {
            (OpKind::Get { .. }, OpResult::Read(seen)) => {
                let seen = seen.as_ref().map(|d| (d.revision, d.body.clone()));
                (*state == seen).then(|| state.clone())
            }
            (OpKind::Set { body, .. }, OpResult::Committed(r)) => match (&r.outcome, state) {
                (Outcome::DocCreated { revision: 1 }, None) => Some(Some((1, body.clone()))),
                (Outcome::DocUpdated { revision }, Some((r, _))) if *revision == r + 1 => {
                    Some(Some((*revision, body.clone())))
                }
                (Outcome::Rejected(ErrorCode::NotOwner), _) => Some(state.clone()),
                _ => None,
            },
            (OpKind::Set { body, .. }, OpResult::Unknown) => Some(bumped(body)),
            (OpKind::Delete { .. }, OpResult::Committed(r)) => match (&r.outcome, state) {
                (Outcome::DocDeleted, Some(_)) | (Outcome::Rejected(ErrorCode::NotFound), None) => Some(None),
                (Outcome::Rejected(ErrorCode::NotOwner), _) => Some(state.clone()),
                _ => None,
            },
            (OpKind::Delete { .. }, OpResult::Unknown) => Some(None),
            _ => None,
        }
    }

    /// Every order of every subset holding all completed ops, respecting real time.
    fn brute_linearizable(ops: &[Op]) -> bool {
        let ops: Vec<&Op> = ops
            .iter()
            .filter(|o| match (&o.kind, &o.result) {
                (_, OpResult::Refused(_)) => false,
                (OpKind::Get { .. }, r) => matches!(r, OpResult::Read(_)),
                _ => true,
            })
            .collect();
        let required = |o: &Op| !matches!(o.result, OpResult::Unknown);
        let complete = |o: &Op| if required(o) { o.complete_ms.unwrap_or(u64::MAX) } else { u64::MAX };
        fn go(
            ops: &[&Op],
            used: &mut Vec<bool>,
            state: &Model,
            required: &dyn Fn(&Op) -> bool,
            complete: &dyn Fn(&Op) -> u64,
        ) -> bool {
            if ops.iter().zip(used.iter()).all(|(o, u)| *u || !required(o)) {
                return true;
            }
            for i in 0..ops.len() {
                if used[i] {
                    continue;
                }
                let must_wait = (0..ops.len())
                    .any(|j| j != i && !used[j] && required(ops[j]) && complete(ops[j]) < ops[i].invoke_ms);
                if must_wait {
                    continue;
                }
                if let Some(next) = brute_step(state, ops[i]) {
                    used[i] = true;
                    if go(ops, used, &next, required, complete) {
                        return true;
                    }
                    used[i] = false;
                }
            }
            false
        }
        go(&ops, &mut vec![false; ops.len()], &None, &required, &complete)
    }

    /// xorshift64*: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A small history of one key: a true execution (each op takes effect at a random point of
    /// its window), then, sometimes, one result changed.
    fn random_history(rng: &mut Rng, k: DocKey) -> Vec<Op> {
        let n = 1 + rng.below(8) as usize;
        let mut planned: Vec<(u64, u64, u64, usize)> = (0..n)
            .map(|i| {
                let invoke = rng.below(40);
                let point = invoke + rng.below(10);
                (point, invoke, point + rng.below(10), i)
            })
            .collect();
        planned.sort();
        let mut truth: Model = None;
        let mut ops = Vec::new();
        for (_, invoke, complete, i) in planned {
            let client = rng.below(3);
            let id = RequestId([i as u8; 32]);
            let choice = rng.below(10);
            let (kind, result) = if choice < 4 {
                let body = [b'a' + rng.below(3) as u8].to_vec();
                let kind = OpKind::Set { id, key: k, body: body.clone() };
                if rng.chance(10) {
                    (kind, OpResult::Refused(ErrorCode::NotLeader))
                } else if rng.chance(20) {
                    if rng.chance(50) {
                        truth = Some((truth.as_ref().map_or(1, |(r, _)| r + 1), body));
                    }
                    (kind, OpResult::Unknown)
                } else if rng.chance(5) {
                    (kind, receipt_with(Outcome::Rejected(ErrorCode::NotOwner)))
                } else {
                    let outcome = match &truth {
                        None => CREATED,
                        Some((r, _)) => Outcome::DocUpdated { revision: r + 1 },
                    };
                    truth = Some((truth.as_ref().map_or(1, |(r, _)| r + 1), body));
                    (kind, receipt_with(outcome))
                }
            } else if choice < 6 {
                let kind = OpKind::Delete { id, key: k };
                if rng.chance(20) {
                    if rng.chance(50) {
                        truth = None;
                    }
                    (kind, OpResult::Unknown)
                } else {
                    let outcome =
                        if truth.is_some() { Outcome::DocDeleted } else { Outcome::Rejected(ErrorCode::NotFound) };
                    truth = None;
                    (kind, receipt_with(outcome))
                }
            } else {
                let kind = OpKind::Get { key: k };
                if rng.chance(10) {
                    (kind, OpResult::Unknown)
                } else {
                    let seen =
                        truth.as_ref().map(|(revision, body)| DocRead { revision: *revision, body: body.clone() });
                    (kind, OpResult::Read(seen))
                }
            };
            let complete_ms = (!matches!(result, OpResult::Unknown)).then_some(complete);
            ops.push(op(client, invoke, complete_ms, kind, result));
        }
        if rng.chance(40) {
            let victim = rng.below(ops.len() as u64) as usize;
            let o = &mut ops[victim];
            o.result = match &o.kind {
                OpKind::Get { .. } => match rng.below(3) {
                    0 => OpResult::Read(None),
                    1 => read(1 + rng.below(3), ["a", "b", "c"][rng.below(3) as usize]),
                    _ => OpResult::Unknown,
                },
                _ => match rng.below(5) {
                    0 => receipt_with(CREATED),
                    1 => receipt_with(Outcome::DocUpdated { revision: 1 + rng.below(3) }),
                    2 => receipt_with(Outcome::DocDeleted),
                    3 => receipt_with(Outcome::Rejected(ErrorCode::NotFound)),
                    _ => OpResult::Unknown,
                },
            };
            o.complete_ms = match o.result {
                OpResult::Unknown => None,
                _ => Some(o.invoke_ms + rng.below(20)),
            };
        }
        ops.sort_by_key(|o| o.invoke_ms);
        ops
    }

    #[test]
    fn search_agrees_with_brute_force() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let k = doc(3);
        let (mut bad, mut good) = (0, 0);
        for case in 0..20_000 {
            let ops = random_history(&mut rng, k);
            let expected = brute_linearizable(&ops);
            let history = History { ops };
            let (v, _, gave_up) = check_linearizable(&history, 1_000_000);
            assert_eq!(gave_up, 0);
            assert_eq!(v.is_empty(), expected, "case {case}: {:#?}\n{v:#?}", history.ops);
            if expected {
                good += 1;
            } else {
                bad += 1;
            }
        }
        // Both verdicts are well represented.
        assert!(good > 5_000 && bad > 2_000, "{good} linearizable, {bad} not");
    }
}
