//! Stage 2: pure validation. No state: canonical form, sizes, UUID4, JSON, amounts, expiry,
//! keys, then signatures. Runs in parallel on the rayon pool. Signatures are checked in batches
//! (`verify_batch`, ~2.8× cheaper per signature); a failed batch is re-checked one by one with
//! `verify_strict` to find the culprits, so a single bad request can't sink its neighbours and a
//! batch pass can't admit a signature that strict verification would refuse.

use ed25519_dalek::{Signature, VerifyingKey};
use rayon::prelude::*;
use tally_codec::{limits, ClusterId, ErrorCode, Operation, SignedRequest};

/// Requests may not expire later than this after the node's clock: the seen-id set holds ids
/// until expiry, so this bounds its memory.
pub const EXPIRY_WINDOW_MAX_MS: u64 = 10 * 60 * 1000;
/// Signatures per `verify_batch` call.
pub const VERIFY_CHUNK: usize = 256;

/// A request that passed stage 2, with the bytes derived while checking it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub request: SignedRequest,
    pub id: tally_codec::RequestId,
}

/// Checks everything about one request that needs no state, except its signature.
///
/// # Errors
/// The [`ErrorCode`] naming the first problem found.
pub fn check_fields(req: &SignedRequest, cluster_id: &ClusterId, now_ms: u64) -> Result<VerifyingKey, ErrorCode> {
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
    match &r.op {
        Operation::Set { key, value } => {
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
        Operation::Delete { key } => {
            if !key.is_uuid4() {
                return Err(ErrorCode::NotUuid4);
            }
        }
        Operation::Transfer { to, amount } => {
            if *amount == 0 {
                return Err(ErrorCode::ZeroAmount);
            }
            if *to == r.signer {
                return Err(ErrorCode::TransferToSelf);
            }
            // Money sent to a key nobody can sign for is burned: refuse it.
            let to_key = VerifyingKey::from_bytes(&to.0).map_err(|_| ErrorCode::Malformed)?;
            if to_key.is_weak() {
                return Err(ErrorCode::WeakKey);
            }
        }
    }
    let key = VerifyingKey::from_bytes(&r.signer.0).map_err(|_| ErrorCode::BadSignature)?;
    if key.is_weak() {
        return Err(ErrorCode::WeakKey);
    }
    Ok(key)
}

/// Validates a frame's requests in parallel. Returns one result per request, in order.
pub fn validate_all(
    requests: Vec<SignedRequest>,
    cluster_id: &ClusterId,
    now_ms: u64,
) -> Vec<Result<Validated, ErrorCode>> {
    requests
        .into_par_iter()
        .chunks(VERIFY_CHUNK)
        .flat_map_iter(|chunk| validate_chunk(chunk, cluster_id, now_ms))
        .collect()
}

fn validate_chunk(chunk: Vec<SignedRequest>, cluster_id: &ClusterId, now_ms: u64) -> Vec<Result<Validated, ErrorCode>> {
    let mut results: Vec<Result<Validated, ErrorCode>> = Vec::with_capacity(chunk.len());
    let mut msgs = Vec::with_capacity(chunk.len());
    let mut keys = Vec::with_capacity(chunk.len());
    let mut sigs = Vec::with_capacity(chunk.len());
    let mut slots = Vec::with_capacity(chunk.len());
    for req in chunk {
        match check_fields(&req, cluster_id, now_ms) {
            Ok(key) => {
                let bytes = req.request.signing_bytes();
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

/// R must decompress to a point whose canonical encoding is the given bytes and is not of
/// small order; `verify_strict` enforces this, `verify_batch` does not.
fn r_is_canonical(sig: &Signature) -> bool {
    let r = sig.r_bytes();
    match curve25519_dalek::edwards::CompressedEdwardsY(*r).decompress() {
        Some(point) => point.compress().as_bytes() == r && !point.is_small_order(),
        None => false,
    }
}
