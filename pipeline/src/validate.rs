//! Stage 2: pure validation. No state: canonical form, sizes (the value's, then the whole signed
//! request's), UUID4, JSON, amounts, expiry, keys, then signatures. Runs in parallel on the rayon pool. Signatures are checked in batches
//! (`verify_batch`, ~2.8× cheaper per signature); a failed batch is re-checked one by one with
//! `verify_strict` to find the culprits, so a single bad request can't sink its neighbours and a
//! batch pass can't admit a signature that strict verification would refuse.

use ed25519_dalek::{Signature, VerifyingKey};
use rayon::prelude::*;
use tally_codec::{limits, ClusterId, Compare, ErrorCode, Operation, PublicKey, SignedRequest};

/// Requests may not expire later than this after the node's clock: the executed-id set holds
/// ids until expiry, so this bounds its memory (≈ window × throughput × ~100 B: 2 min at 25k/s
/// is ~300 MB). Clients retry within seconds; two minutes covers a failover and a restart.
pub const EXPIRY_WINDOW_MAX_MS: u64 = 2 * 60 * 1000;
/// Signatures per `verify_batch` call.
pub const VERIFY_CHUNK: usize = 1024;

/// A request that passed stage 2: what enters the replica core.
pub use tally_core::Validated;

/// Keys already decompressed and checked (point decompression is ~3 µs; accounts repeat).
/// Bounded: cleared when full. Invalid and weak keys are remembered as such.
pub struct KeyCache {
    map: parking_lot::RwLock<std::collections::HashMap<[u8; 32], Result<VerifyingKey, ErrorCode>>>,
    entries_max: usize,
}

/// Keys a node's cache holds at most.
pub const KEY_CACHE_ENTRIES_MAX: usize = 1 << 18;

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache::new(KEY_CACHE_ENTRIES_MAX)
    }
}

impl KeyCache {
    pub fn new(entries_max: usize) -> Self {
        KeyCache { map: parking_lot::RwLock::new(std::collections::HashMap::new()), entries_max }
    }

    /// A valid, non-weak key, or why not: `invalid` names the code for bytes that are no point.
    ///
    /// # Errors
    /// `invalid` when the bytes don't decompress, [`ErrorCode::WeakKey`] for small order.
    pub fn key(&self, bytes: &[u8; 32], invalid: ErrorCode) -> Result<VerifyingKey, ErrorCode> {
        if let Some(r) = self.map.read().get(bytes) {
            return r.map_err(|_| invalid_or_weak(*r, invalid));
        }
        let r = match VerifyingKey::from_bytes(bytes) {
            Err(_) => Err(ErrorCode::Malformed),
            Ok(k) if k.is_weak() => Err(ErrorCode::WeakKey),
            Ok(k) => Ok(k),
        };
        let mut map = self.map.write();
        if map.len() >= self.entries_max {
            map.clear();
        }
        map.insert(*bytes, r);
        r.map_err(|_| invalid_or_weak(r, invalid))
    }
}

/// The stateless checks of one operation (and of a transaction's operations, `in_txn`).
fn check_op(op: &Operation, signer: &PublicKey, keys: &KeyCache, in_txn: bool) -> Result<(), ErrorCode> {
    match op {
        Operation::Set { key, value } | Operation::SetIf { key, value, .. } => {
            if !key.is_uuid4() {
                return Err(ErrorCode::NotUuid4);
            }
            if value.len() > limits::VALUE_BYTES_MAX {
                return Err(ErrorCode::ValueTooLarge);
            }
            if serde_json::from_slice::<serde::de::IgnoredAny>(value).is_err() {
                return Err(ErrorCode::InvalidJson);
            }
        }
        Operation::Delete { key } | Operation::DeleteIf { key, .. } => {
            if !key.is_uuid4() {
                return Err(ErrorCode::NotUuid4);
            }
        }
        Operation::Transfer { to, amount } => {
            if *amount == 0 {
                return Err(ErrorCode::ZeroAmount);
            }
            if to == signer {
                return Err(ErrorCode::TransferToSelf);
            }
            // Money sent to a key nobody can sign for is burned: refuse it.
            keys.key(&to.0, ErrorCode::Malformed)?;
        }
        Operation::LeaseGrant { ttl_ms } => {
            if in_txn {
                // Its id is the request's position in the batch: one per request.
                return Err(ErrorCode::BadTxn);
            }
            if !(limits::LEASE_TTL_MIN_MS..=limits::LEASE_TTL_MAX_MS).contains(ttl_ms) {
                return Err(ErrorCode::TtlOutOfRange);
            }
        }
        Operation::LeaseKeepAlive { .. } | Operation::LeaseRevoke { .. } => {}
        Operation::Claim { domain, .. } => {
            if !claim_domain_ok(domain) {
                return Err(ErrorCode::BadClaimDomain);
            }
        }
        Operation::Txn(t) => {
            if in_txn
                || t.compares.len() > limits::TXN_ITEMS_MAX
                || t.then.len() > limits::TXN_ITEMS_MAX
                || t.otherwise.len() > limits::TXN_ITEMS_MAX
            {
                return Err(ErrorCode::BadTxn);
            }
            for c in &t.compares {
                if let Compare::Revision { key, .. } | Compare::Exists { key } = c {
                    if !key.is_uuid4() {
                        return Err(ErrorCode::NotUuid4);
                    }
                }
            }
            for op in t.then.iter().chain(&t.otherwise) {
                check_op(op, signer, keys, true)?;
            }
        }
    }
    Ok(())
}

/// 1 to 64 bytes of `[A-Za-z0-9._:/-]`.
pub fn claim_domain_ok(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= limits::CLAIM_DOMAIN_BYTES_MAX
        && domain.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
}

fn invalid_or_weak(r: Result<VerifyingKey, ErrorCode>, invalid: ErrorCode) -> ErrorCode {
    match r {
        Err(ErrorCode::WeakKey) => ErrorCode::WeakKey,
        _ => invalid,
    }
}

/// Checks everything about one request that needs no state, except its signature. Keys come
/// from the shared cache.
///
/// # Errors
/// The [`ErrorCode`] naming the first problem found.
pub fn check_fields_with(
    req: &SignedRequest,
    cluster_id: &ClusterId,
    now_ms: u64,
    keys: &KeyCache,
) -> Result<VerifyingKey, ErrorCode> {
    let r = &req.request;
    if r.cluster_id != *cluster_id {
        return Err(ErrorCode::WrongCluster);
    }
    if r.expires_at_ms < now_ms {
        return Err(ErrorCode::Expired);
    }
    if r.expires_at_ms > now_ms.saturating_add(EXPIRY_WINDOW_MAX_MS) {
        return Err(ErrorCode::ExpiryTooFar);
    }
    check_op(&r.op, &r.signer, keys, false)?;
    keys.key(&r.signer.0, ErrorCode::BadSignature)
}

/// Validates a frame's requests in parallel. Returns one result per request, in order.
pub fn validate_all(
    requests: Vec<SignedRequest>,
    cluster_id: &ClusterId,
    now_ms: u64,
) -> Vec<Result<Validated, ErrorCode>> {
    validate_all_with(requests, cluster_id, now_ms, &KeyCache::default())
}

/// [`validate_all`] with the node's shared key cache.
pub fn validate_all_with(
    requests: Vec<SignedRequest>,
    cluster_id: &ClusterId,
    now_ms: u64,
    keys: &KeyCache,
) -> Vec<Result<Validated, ErrorCode>> {
    requests
        .into_par_iter()
        .chunks(VERIFY_CHUNK)
        .flat_map_iter(|chunk| validate_chunk(chunk, cluster_id, now_ms, keys))
        .collect()
}

fn validate_chunk(
    chunk: Vec<SignedRequest>,
    cluster_id: &ClusterId,
    now_ms: u64,
    key_cache: &KeyCache,
) -> Vec<Result<Validated, ErrorCode>> {
    let mut results: Vec<Result<Validated, ErrorCode>> = Vec::with_capacity(chunk.len());
    let mut msgs = Vec::with_capacity(chunk.len());
    let mut keys = Vec::with_capacity(chunk.len());
    let mut sigs = Vec::with_capacity(chunk.len());
    let mut slots = Vec::with_capacity(chunk.len());
    for req in chunk {
        match check_fields_with(&req, cluster_id, now_ms, key_cache) {
            Ok(key) => {
                let bytes = req.request.signing_bytes();
                if !encoded_within_bound(&bytes) {
                    results.push(Err(ErrorCode::RequestTooLarge));
                    continue;
                }
                let id = tally_codec::Request::id_of_signing_bytes(&bytes);
                slots.push(results.len());
                msgs.push(bytes);
                keys.push(key);
                sigs.push(Signature::from_bytes(&req.signature.0));
                results.push(Ok(Validated { request: req, id }));
            }
            Err(code) => results.push(Err(code)),
        }
    }
    if msgs.is_empty() {
        return results;
    }
    let msg_refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    if ed25519_dalek::verify_batch(&msg_refs, &sigs, &keys).is_ok() {
        // verify_batch is not verify_strict: it accepts non-canonical R/A encodings that strict
        // rejects. Weak keys were refused above; canonical S is checked by Signature parsing.
        // Re-check the (cheap) canonical-encoding condition strict adds for R.
        for (i, slot) in slots.iter().enumerate() {
            if !r_is_canonical(&sigs[i]) {
                results[*slot] = strict(&keys[i], &msgs[i], &sigs[i], results[*slot].clone());
            }
        }
        return results;
    }
    metrics::counter!("tally_verify_batch_fallbacks_total").increment(1);
    for (i, slot) in slots.iter().enumerate() {
        results[*slot] = strict(&keys[i], &msgs[i], &sigs[i], results[*slot].clone());
    }
    results
}

/// Whether the signed request whose signing bytes these are encodes within
/// `REQUEST_BYTES_MAX`: its encoding is the signing bytes without the domain tag, plus the
/// signature. The decoder refuses bigger ones on the wire; this refuses them however they were
/// made, at no cost (the signing bytes are needed for the signature anyway).
fn encoded_within_bound(signing_bytes: &[u8]) -> bool {
    let encoded = signing_bytes.len() - tally_codec::request::REQUEST_DOMAIN.len() + tally_codec::Signature::LEN;
    encoded <= limits::REQUEST_BYTES_MAX
}

fn strict(
    key: &VerifyingKey,
    msg: &[u8],
    sig: &Signature,
    ok: Result<Validated, ErrorCode>,
) -> Result<Validated, ErrorCode> {
    match key.verify_strict(msg, sig) {
        Ok(()) => ok,
        Err(_) => Err(ErrorCode::BadSignature),
    }
}

/// R must be the canonical encoding of a point that is not of small order; `verify_strict`
/// enforces this, `verify_batch` does not. Checked on the bytes (no point decompression): `y < p`,
/// no "negative zero" x, and not one of the eight small-order points' encodings. A `y` that is
/// not on the curve at all fails the batch equation anyway.
fn r_is_canonical(sig: &Signature) -> bool {
    let r = sig.r_bytes();
    let sign = r[31] >> 7;
    let mut y = *r;
    y[31] &= 0x7f;
    // p = 2^255 - 19, little-endian: ed ff .. ff 7f
    let y_ge_p = y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] >= 0xed;
    if y_ge_p {
        return false;
    }
    // x = 0 exactly when y = 1 or y = p - 1; then the sign bit must be 0.
    let y_is_one = y[0] == 1 && y[1..].iter().all(|b| *b == 0);
    let y_is_p_minus_one = y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] == 0xec;
    if sign == 1 && (y_is_one || y_is_p_minus_one) {
        return false;
    }
    !small_order_encodings().contains(r)
}

fn small_order_encodings() -> &'static [[u8; 32]; 8] {
    static ENCODINGS: std::sync::OnceLock<[[u8; 32]; 8]> = std::sync::OnceLock::new();
    ENCODINGS.get_or_init(|| curve25519_dalek::constants::EIGHT_TORSION.map(|p| p.compress().to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::edwards::CompressedEdwardsY;
    use tally_codec::{DocKey, Txn};

    /// Coordination requests are checked before they reach the sequencer: claim domains, lease
    /// TTLs, and transactions (bounded, not nested, no lease grant, every operation checked).
    #[test]
    fn coordination_fields_are_checked_statelessly() {
        let keys = KeyCache::new(16);
        let me = PublicKey(ed25519_dalek::SigningKey::from_bytes(&[5; 32]).verifying_key().to_bytes());
        let check = |op: Operation| check_op(&op, &me, &keys, false);
        let claim = |d: &str| Operation::Claim { domain: d.into(), slot: 1, lease: None };
        assert_eq!(check(claim("validator-1.slots:a/b")), Ok(()));
        assert_eq!(check(claim("")), Err(ErrorCode::BadClaimDomain));
        assert_eq!(check(claim(&"x".repeat(65))), Err(ErrorCode::BadClaimDomain));
        assert_eq!(check(claim(&"x".repeat(64))), Ok(()));
        assert_eq!(check(claim("white space")), Err(ErrorCode::BadClaimDomain));
        assert_eq!(check(claim("é")), Err(ErrorCode::BadClaimDomain));
        let grant = |ttl_ms| Operation::LeaseGrant { ttl_ms };
        assert_eq!(check(grant(limits::LEASE_TTL_MIN_MS - 1)), Err(ErrorCode::TtlOutOfRange));
        assert_eq!(check(grant(limits::LEASE_TTL_MAX_MS + 1)), Err(ErrorCode::TtlOutOfRange));
        assert_eq!(check(grant(limits::LEASE_TTL_MAX_MS)), Ok(()));
        let txn = |then: Vec<Operation>| Operation::Txn(Txn { compares: vec![], then, otherwise: vec![] });
        assert_eq!(check(txn(vec![grant(1_000)])), Err(ErrorCode::BadTxn));
        assert_eq!(check(txn(vec![txn(vec![])])), Err(ErrorCode::BadTxn));
        assert_eq!(check(txn(vec![claim(""); 1])), Err(ErrorCode::BadClaimDomain), "each operation is checked");
        assert_eq!(check(txn(vec![claim("d"); limits::TXN_ITEMS_MAX + 1])), Err(ErrorCode::BadTxn));
        let bad_json = Operation::SetIf {
            key: DocKey::parse("0d5d3807-5fbf-4228-a657-5a091c4e497f").expect("uuid"),
            value: b"{".to_vec(),
            if_revision: Some(0),
            lease: None,
        };
        assert_eq!(check(txn(vec![bad_json])), Err(ErrorCode::InvalidJson));
    }

    /// A signed request over `REQUEST_BYTES_MAX` is refused `RequestTooLarge` however it was
    /// built (the decoder refuses it on the wire; this holds for requests made in process too):
    /// the 2 MB transaction of 32 maximal sets, and one byte over the bound, while a request of
    /// exactly the bound passes.
    #[test]
    fn requests_over_the_size_bound_are_refused() {
        let signer = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let cluster = ClusterId([1; 16]);
        let now_ms = 1_000_000;
        let sign = |op: Operation| {
            tally_codec::Request {
                cluster_id: cluster,
                signer: PublicKey(signer.verifying_key().to_bytes()),
                nonce: 1,
                expires_at_ms: now_ms + 1_000,
                op,
            }
            .sign(&signer)
        };
        let key = |i: u8| DocKey::from_random([i; 16]);
        let json = |n: usize| {
            let mut v = vec![b' '; n];
            v[0] = b'1';
            v
        };
        let set = |i: u8| Operation::Set { key: key(i), value: json(limits::VALUE_BYTES_MAX) };
        let big = sign(Operation::Txn(Txn { compares: vec![], then: (0..32).map(set).collect(), otherwise: vec![] }));
        assert!(big.encode().len() > 2_000_000);
        let fixed = sign(Operation::Set { key: key(1), value: vec![] }).encode().len();
        // A transaction of exactly the bound, and one byte more (values within the document bound).
        let two_sets = |extra: usize| {
            let half = (limits::REQUEST_BYTES_MAX - fixed) / 2 - 64;
            let base = sign(Operation::Txn(Txn {
                compares: vec![],
                then: vec![
                    Operation::Set { key: key(1), value: json(half) },
                    Operation::Set { key: key(2), value: json(half) },
                ],
                otherwise: vec![],
            }));
            let room = limits::REQUEST_BYTES_MAX - base.encode().len() + extra;
            sign(Operation::Txn(Txn {
                compares: vec![],
                then: vec![
                    Operation::Set { key: key(1), value: json(half) },
                    Operation::Set { key: key(2), value: json(half + room) },
                ],
                otherwise: vec![],
            }))
        };
        let (at, over) = (two_sets(0), two_sets(1));
        assert_eq!(at.encode().len(), limits::REQUEST_BYTES_MAX);
        assert_eq!(over.encode().len(), limits::REQUEST_BYTES_MAX + 1);
        let results = validate_all(vec![big, at, over], &cluster, now_ms);
        assert_eq!(results[0].as_ref().err(), Some(&ErrorCode::RequestTooLarge));
        assert!(results[1].is_ok(), "{:?}", results[1].as_ref().err());
        assert_eq!(results[2].as_ref().err(), Some(&ErrorCode::RequestTooLarge));
    }

    /// The byte-level check agrees with decompress/compress/is_small_order on every R that
    /// decompresses, including the edge encodings.
    #[test]
    fn r_check_matches_point_arithmetic() {
        let reference = |r: &[u8; 32]| {
            CompressedEdwardsY(*r).decompress().map(|p| p.compress().as_bytes() == r && !p.is_small_order())
        };
        let mut cases: Vec<[u8; 32]> = Vec::new();
        for p in curve25519_dalek::constants::EIGHT_TORSION {
            let mut b = p.compress().to_bytes();
            cases.push(b);
            b[31] ^= 0x80;
            cases.push(b);
        }
        let mut p_minus_one = [0xffu8; 32];
        p_minus_one[0] = 0xec;
        p_minus_one[31] = 0x7f;
        let mut one = [0u8; 32];
        one[0] = 1;
        for base in [p_minus_one, one] {
            cases.push(base);
            let mut b = base;
            b[31] |= 0x80;
            cases.push(b);
        }
        // y >= p encodings, with and without the sign bit.
        for low in [0xedu8, 0xee, 0xf0, 0xff] {
            let mut b = [0xffu8; 32];
            b[0] = low;
            b[31] = 0x7f;
            cases.push(b);
            b[31] = 0xff;
            cases.push(b);
        }
        // Real signatures' R values.
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        for i in 0..200u32 {
            use ed25519_dalek::Signer;
            let sig = key.sign(&i.to_le_bytes());
            cases.push(*sig.r_bytes());
        }
        let mut checked = 0;
        for r in cases {
            if let Some(expected) = reference(&r) {
                let mut sig_bytes = [0u8; 64];
                sig_bytes[..32].copy_from_slice(&r);
                let sig = Signature::from_bytes(&sig_bytes);
                assert_eq!(r_is_canonical(&sig), expected, "R = {}", hex_of(&r));
                checked += 1;
            }
        }
        assert!(checked > 200, "only {checked} cases decompressed");
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
