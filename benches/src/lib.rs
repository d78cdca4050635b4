//! Fixtures for the micro benchmarks in `benches/micro.rs`: deterministic keys, signed
//! transfers, and a batch built the way stage 4 builds one.
//!
//! ```text
//!  accounts(n) ──▶ transfers(keys, n) ──▶ execute_transfers (View + FixedBacking)
//!                                          └─▶ batch_entry: outcomes, Merkle root, write set, header
//! ```
//! Everything is derived from fixed seeds, so two runs bench the same bytes.
#![forbid(unsafe_code)]

use ed25519_dalek::SigningKey;
use tally_codec::batch::next_state_digest;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{
    BatchEntry, BatchHeader, ClusterId, Digest, DocKey, DocMeta, Operation, Outcome, PublicKey, Request, RequestId,
    SignedRequest, Tables,
};
use tally_core::state::{execute, At, Backing, BatchWrites, View};

/// The cluster every fixture request names.
pub const CLUSTER: ClusterId = ClusterId([0x7a; 16]);
/// The "now" stage 2 is benched at; fixture requests expire a minute later.
pub const NOW_MS: u64 = 1_700_000_000_000;
/// Expiry of every fixture request (inside stage 2's window).
pub const EXPIRES_AT_MS: u64 = NOW_MS + 60_000;
/// What [`FixedBacking`] says every account holds: enough that no fixture transfer bounces.
pub const BALANCE: u64 = 1_000_000_000;

/// `n` distinct signing keys, the same on every run.
pub fn accounts(n: usize) -> Vec<SigningKey> {
    (0..n as u64)
        .map(|i| {
            let seed = blake3::hash(&i.to_le_bytes());
            SigningKey::from_bytes(seed.as_bytes())
        })
        .collect()
}

/// `n` signed transfers of 1 unit. Request `i` is sent by account `i % k` to another account
/// (never itself), so every account sends and receives about `n / k` times: a batch touches all
/// `k` accounts and coalesces their writes, as stage 4 does.
///
/// # Panics
/// If `keys` has fewer than two accounts.
pub fn transfers(keys: &[SigningKey], n: usize) -> Vec<SignedRequest> {
    assert!(keys.len() >= 2, "transfers need two accounts");
    let publics: Vec<PublicKey> = keys.iter().map(|k| PublicKey(k.verifying_key().to_bytes())).collect();
    let k = keys.len();
    (0..n)
        .map(|i| {
            let from = i % k;
            let to = (from + 1 + i % (k - 1)) % k;
            Request {
                cluster_id: CLUSTER,
                signer: publics[from],
                nonce: i as u64,
                expires_at_ms: EXPIRES_AT_MS,
                op: Operation::Transfer { to: publics[to], amount: 1 },
            }
            .sign(&keys[from])
        })
        .collect()
}

/// A [`Backing`] with no I/O: every account holds [`BALANCE`], no document exists. Benchmarks of
/// `execute` then measure the state machine, not the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedBacking;

impl Backing for FixedBacking {
    fn balance(&mut self, _account: &PublicKey) -> Option<u64> {
        Some(BALANCE)
    }
    fn doc_meta(&mut self, _key: &DocKey) -> Option<DocMeta> {
        None
    }
}

/// Stage 4's inner loop on a fresh view: prefetch every account, then execute in order.
pub fn execute_transfers(requests: &[SignedRequest], time_ms: u64) -> (Vec<Outcome>, BatchWrites) {
    let mut view = View::default();
    view.prefetch(requests.iter().map(|r| (&r.request.signer, &r.request.op)), &mut FixedBacking);
    let mut cur = BatchWrites::default();
    let outcomes = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = At { height: 1, time_ms, position: i as u32 };
            execute(&mut view, &mut FixedBacking, &mut cur, &r.request, at)
        })
        .collect();
    (outcomes, cur)
}

/// Request ids, as stage 2 hands them to stage 4.
pub fn ids(requests: &[SignedRequest]) -> Vec<RequestId> {
    requests.iter().map(SignedRequest::id).collect()
}

/// Merkle leaves of (id, outcome) pairs.
pub fn leaves(ids: &[RequestId], outcomes: &[Outcome]) -> Vec<[u8; 32]> {
    ids.iter().zip(outcomes).map(|(id, o)| leaf_hash(id, o)).collect()
}

/// A batch at height 1 built like stage 4 builds one: it passes [`BatchEntry::check`].
///
/// # Panics
/// If the request count does not fit in a `u32`, or the built entry fails its own check.
pub fn batch_entry(requests: Vec<SignedRequest>) -> BatchEntry {
    let (outcomes, writes) = execute_transfers(&requests, NOW_MS);
    let tree = Tree::from_leaves(&leaves(&ids(&requests), &outcomes));
    let write_set = writes.to_write_set(&Tables::v1());
    let write_set_digest = write_set.digest();
    let header = BatchHeader {
        cluster_id: CLUSTER,
        height: 1,
        prev_hash: Digest::ZERO,
        merkle_root: tree.root(),
        leaf_count: u32::try_from(requests.len()).expect("fixture batches fit in u32"),
        write_set_digest,
        state_digest: next_state_digest(&Digest::ZERO, &write_set_digest),
        term: 1,
        time_ms: NOW_MS,
    };
    let entry = BatchEntry { header, requests, outcomes, write_set };
    assert!(entry.check().is_ok(), "fixture batch must be consistent");
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_batch_is_consistent_and_all_transfers_succeed() {
        let keys = accounts(16);
        let entry = batch_entry(transfers(&keys, 100));
        assert_eq!(entry.requests.len(), 100);
        assert!(entry.outcomes.iter().all(Outcome::is_success));
        // One coalesced write per account.
        assert_eq!(entry.write_set.ops.len(), 16);
        let results = tally_pipeline::validate::validate_all(entry.requests.clone(), &CLUSTER, NOW_MS);
        assert!(results.iter().all(Result::is_ok));
    }
}
