//! Property tests of the decoding bounds (`docs/security.md`, "Decoders and their bounds"):
//! every valid value round-trips (decode gives it back, and its bytes are canonical) up to each
//! bound, and every value over a bound (nested too deep, too many requests, a request too big, a
//! proof too long, too many outcomes) is refused with the error naming that bound, never a
//! panic, wherever the value is embedded (alone, in a frame, a relayed frame, a batch entry, a
//! stored body, a receipt).
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use borsh::BorshSerialize;
use proptest::collection::vec;
use proptest::prelude::*;
use std::fmt::Debug;
use tally_codec::wire::{self, ClientMessage, Envelope, Relayed};
use tally_codec::{
    encode, limits, BatchBody, BatchEntry, BatchHeader, ClusterId, CodecError, Compare, Digest, DocKey, Operation,
    Outcome, PublicKey, Receipt, Request, Signature, SignedRequest, Txn, WriteSet,
};

// ---------------------------------------------------------------------------------------------
// Valid values, up to their bounds.

fn key() -> impl Strategy<Value = DocKey> {
    any::<[u8; 16]>().prop_map(DocKey)
}

/// Any operation but a transaction; `value_max` bounds document values.
fn leaf(value_max: usize) -> impl Strategy<Value = Operation> {
    prop_oneof![
        (key(), vec(any::<u8>(), 0..=value_max)).prop_map(|(key, value)| Operation::Set { key, value }),
        key().prop_map(|key| Operation::Delete { key }),
        (any::<[u8; 32]>(), any::<u64>()).prop_map(|(to, amount)| Operation::Transfer { to: PublicKey(to), amount }),
        (key(), vec(any::<u8>(), 0..=value_max), any::<Option<u64>>(), any::<Option<u64>>())
            .prop_map(|(key, value, if_revision, lease)| Operation::SetIf { key, value, if_revision, lease }),
        (key(), any::<Option<u64>>()).prop_map(|(key, if_revision)| Operation::DeleteIf { key, if_revision }),
        any::<u64>().prop_map(|ttl_ms| Operation::LeaseGrant { ttl_ms }),
        any::<u64>().prop_map(|lease| Operation::LeaseKeepAlive { lease }),
        any::<u64>().prop_map(|lease| Operation::LeaseRevoke { lease }),
        ("[a-z0-9._:/-]{0,64}", any::<u64>(), any::<Option<u64>>())
            .prop_map(|(domain, slot, lease)| Operation::Claim { domain, slot, lease }),
    ]
}

fn compare() -> impl Strategy<Value = Compare> {
    prop_oneof![
        (key(), any::<u64>()).prop_map(|(key, revision)| Compare::Revision { key, revision }),
        key().prop_map(|key| Compare::Exists { key }),
        (any::<[u8; 32]>(), any::<u64>())
            .prop_map(|(a, amount)| Compare::BalanceAtLeast { account: PublicKey(a), amount }),
        any::<u64>().prop_map(|lease| Compare::LeaseAlive { lease }),
    ]
}

/// A leaf, or a transaction of up to `TXN_ITEMS_MAX` comparisons and leaves per branch.
fn operation() -> impl Strategy<Value = Operation> {
    let n = limits::TXN_ITEMS_MAX;
    prop_oneof![
        leaf(2048),
        (vec(compare(), 0..=n), vec(leaf(512), 0..=n), vec(leaf(512), 0..=n))
            .prop_map(|(compares, then, otherwise)| Operation::Txn(Txn { compares, then, otherwise })),
    ]
}

fn sign(op: Operation, nonce: u64) -> SignedRequest {
    let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    Request {
        cluster_id: ClusterId([1; 16]),
        signer: PublicKey(signer.verifying_key().to_bytes()),
        nonce,
        expires_at_ms: u64::MAX,
        op,
    }
    .sign(&signer)
}

/// A request whose encoding is exactly `len` bytes (at least the size of an empty `Set`).
fn request_of_len(len: usize, nonce: u64) -> SignedRequest {
    let fixed = sign(Operation::Set { key: DocKey([1; 16]), value: vec![] }, nonce).encode().len();
    let r = sign(Operation::Set { key: DocKey([1; 16]), value: vec![b' '; len - fixed] }, nonce);
    assert_eq!(r.encode().len(), len);
    r
}

fn leaf_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        any::<u64>().prop_map(|revision| Outcome::DocCreated { revision }),
        Just(Outcome::DocDeleted),
        (0u8..32).prop_map(|c| Outcome::Rejected(tally_codec::decode(&[c], 1).unwrap())),
        (any::<u64>(), any::<u64>()).prop_map(|(lease, expires_at_ms)| Outcome::LeaseGranted { lease, expires_at_ms }),
        (any::<[u8; 32]>(), any::<u64>()).prop_map(|(h, height)| Outcome::ClaimDenied { holder: PublicKey(h), height }),
    ]
}

/// A leaf outcome, or a transaction's of up to `TXN_ITEMS_MAX` leaf outcomes.
fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        leaf_outcome(),
        (any::<bool>(), vec(leaf_outcome(), 0..=limits::TXN_ITEMS_MAX))
            .prop_map(|(then, outcomes)| Outcome::TxnApplied { then, outcomes }),
    ]
}

fn header() -> BatchHeader {
    BatchHeader {
        cluster_id: ClusterId([1; 16]),
        height: 9,
        prev_hash: Digest([2; 32]),
        merkle_root: Digest([3; 32]),
        leaf_count: 1,
        write_set_digest: Digest([4; 32]),
        state_digest: Digest([5; 32]),
        term: 2,
        time_ms: 1,
    }
}

fn receipt(request: SignedRequest, outcome: Outcome, proof: Vec<Digest>) -> Receipt {
    Receipt { request, outcome, leaf_index: 0, proof, header: header(), signature: Signature([6; 64]) }
}

fn entry(requests: Vec<SignedRequest>, outcomes: Vec<Outcome>) -> BatchEntry {
    BatchEntry { header: header(), requests, outcomes, write_set: WriteSet::default() }
}

fn submit(requests: Vec<SignedRequest>) -> Envelope<ClientMessage> {
    Envelope { id: 1, msg: ClientMessage::Submit(requests) }
}

fn relayed(requests: Vec<SignedRequest>) -> Envelope<ClientMessage> {
    Envelope { id: 1, msg: ClientMessage::Forwarded(Relayed::Submit(requests)) }
}

fn generic<T: borsh::BorshDeserialize>(bytes: &[u8]) -> Result<T, CodecError> {
    tally_codec::decode(bytes, limits::ENTRY_BYTES_MAX)
}

/// Decoding gives the value back and its bytes are canonical.
fn round_trips<T, F>(value: &T, decode: F) -> Result<(), TestCaseError>
where
    T: BorshSerialize + PartialEq + Debug,
    F: Fn(&[u8]) -> Result<T, CodecError>,
{
    let bytes = encode(value);
    let back = decode(&bytes);
    prop_assert!(back.is_ok(), "a valid value was refused: {:?}", back.err());
    let back = back.unwrap();
    prop_assert_eq!(&back, value);
    prop_assert_eq!(encode(&back), bytes);
    Ok(())
}

/// Decoding is refused with exactly `expected`.
fn refused<T: Debug>(got: Result<T, CodecError>, expected: &CodecError, what: &str) -> Result<(), TestCaseError> {
    match got {
        Err(e) => prop_assert_eq!(&e, expected, "{}", what),
        Ok(v) => prop_assert!(false, "{}: an over-bound value decoded: {:?}", what, v),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Requests of every operation, transactions full to their item bound, and requests of
    /// exactly the size bound, in every container.
    #[test]
    fn valid_values_round_trip_everywhere(
        ops in vec(operation(), 1..4),
        outcomes in vec(outcome(), 1..4),
        proof_len in 0..=limits::PROOF_HASHES_MAX,
        at_bound in any::<bool>(),
    ) {
        let mut requests: Vec<SignedRequest> = ops.into_iter().enumerate().map(|(i, op)| sign(op, i as u64)).collect();
        if at_bound {
            requests.push(request_of_len(limits::REQUEST_BYTES_MAX, 99));
        }
        for r in &requests {
            prop_assert!(r.encode().len() <= limits::REQUEST_BYTES_MAX);
            round_trips(r, SignedRequest::decode)?;
        }
        round_trips(&submit(requests.clone()), wire::decode_client)?;
        round_trips(&relayed(requests.clone()), wire::decode_client)?;
        let outs: Vec<Outcome> = requests.iter().zip(outcomes.iter().cycle()).map(|(_, o)| o.clone()).collect();
        round_trips(&entry(requests.clone(), outs.clone()), generic)?;
        let body = BatchBody { requests: requests.clone(), outcomes: outs, write_set: WriteSet::default() };
        round_trips(&body, generic)?;
        let proof: Vec<Digest> = (0..proof_len).map(|i| Digest([i as u8; 32])).collect();
        let r = receipt(requests[0].clone(), outcomes[0].clone(), proof);
        prop_assert!(encode(&r).len() <= limits::RECEIPT_BYTES_MAX);
        round_trips(&r, |b| tally_codec::decode(b, limits::RECEIPT_BYTES_MAX))?;
    }

    /// A transaction nested 2 to 40 levels, through `then` or `otherwise` at each level, is
    /// refused `TooDeep` alone, in a frame, a relayed frame, a batch and a receipt.
    #[test]
    fn nested_transactions_are_refused(path in vec(any::<bool>(), 1..40), inner in leaf(16)) {
        let mut op = Operation::Txn(Txn { compares: vec![], then: vec![inner], otherwise: vec![] });
        for through_then in &path {
            let (then, otherwise) = if *through_then { (vec![op], vec![]) } else { (vec![], vec![op]) };
            op = Operation::Txn(Txn { compares: vec![], then, otherwise });
        }
        let deep = CodecError::TooDeep { what: "transaction", max: limits::NESTING_DEPTH_MAX };
        let r = sign(op, 1);
        refused(SignedRequest::decode(&r.encode()), &deep, "alone")?;
        refused(wire::decode_client(&encode(&submit(vec![sign(Operation::LeaseRevoke { lease: 1 }, 2), r.clone()]))), &deep, "frame")?;
        refused(wire::decode_client(&encode(&relayed(vec![r.clone()]))), &deep, "relayed")?;
        refused(generic::<BatchEntry>(&encode(&entry(vec![r.clone()], vec![Outcome::DocDeleted]))), &deep, "batch")?;
        refused(generic::<Receipt>(&encode(&receipt(r, Outcome::DocDeleted, vec![]))), &deep, "receipt")?;
    }

    /// A transaction outcome nested 2 to 40 levels is refused `TooDeep`.
    #[test]
    fn nested_outcomes_are_refused(depth in 1usize..40, inner in leaf_outcome()) {
        let mut o = Outcome::TxnApplied { then: true, outcomes: vec![inner] };
        for _ in 0..depth {
            o = Outcome::TxnApplied { then: false, outcomes: vec![o] };
        }
        let deep = CodecError::TooDeep { what: "transaction outcome", max: limits::NESTING_DEPTH_MAX };
        let r = sign(Operation::LeaseRevoke { lease: 1 }, 1);
        refused(generic::<Receipt>(&encode(&receipt(r.clone(), o.clone(), vec![]))), &deep, "receipt")?;
        refused(generic::<BatchEntry>(&encode(&entry(vec![r], vec![o]))), &deep, "batch")?;
    }

    /// A request 1 to 100,000 bytes over its bound is refused `RequestTooLarge` wherever a new one
    /// arrives (alone, in a frame, relayed, in a receipt); a committed batch still holds it.
    #[test]
    fn oversize_requests_are_refused(over in 1usize..100_000, position in 0usize..3) {
        let big = request_of_len(limits::REQUEST_BYTES_MAX + over, 5);
        let mut requests: Vec<SignedRequest> = (0..2).map(|i| sign(Operation::LeaseRevoke { lease: i }, i)).collect();
        requests.insert(position, big.clone());
        let too_big = CodecError::RequestTooLarge { max: limits::REQUEST_BYTES_MAX };
        refused(SignedRequest::decode(&big.encode()), &too_big, "alone")?;
        refused(generic::<SignedRequest>(&big.encode()), &too_big, "alone, no outer bound")?;
        refused(wire::decode_client(&encode(&submit(requests.clone()))), &too_big, "frame")?;
        refused(wire::decode_client(&encode(&relayed(requests.clone()))), &too_big, "relayed")?;
        // Committed history keeps requests written before the bound (up to a frame's size).
        let e = entry(requests.clone(), vec![]);
        prop_assert_eq!(generic::<BatchEntry>(&encode(&e)), Ok(e), "batch");
        let body = BatchBody { requests, outcomes: vec![], write_set: WriteSet::default() };
        prop_assert_eq!(generic::<BatchBody>(&encode(&body)), Ok(body), "stored body");
        refused(generic::<Receipt>(&encode(&receipt(big, Outcome::DocDeleted, vec![]))), &too_big, "receipt")?;
    }

    /// Counts over their bound are refused by the count, before any item is read: the bytes
    /// carry the count alone.
    #[test]
    fn counts_over_their_bound_are_refused(extra in 1u32..=u32::MAX - limits::BATCH_REQUESTS_MAX as u32) {
        let count_only = |prefix: &[u8], count: usize| {
            let mut b = prefix.to_vec();
            b.extend_from_slice(&(count as u32).to_le_bytes());
            b
        };
        let n = limits::FRAME_REQUESTS_MAX + extra as usize;
        let frame = encode(&submit(vec![]));
        let many = CodecError::TooMany { count: n, max: limits::FRAME_REQUESTS_MAX, what: "requests in one frame" };
        refused(wire::decode_client(&count_only(&frame[..frame.len() - 4], n)), &many, "frame")?;
        let r = encode(&receipt(sign(Operation::LeaseRevoke { lease: 1 }, 1), Outcome::DocDeleted, vec![]));
        let at_proof = r.len() - 4 - 172 - 64;
        let n = limits::PROOF_HASHES_MAX + extra as usize;
        let long = CodecError::TooMany { count: n, max: limits::PROOF_HASHES_MAX, what: "hashes in one Merkle proof" };
        refused(generic::<Receipt>(&count_only(&r[..at_proof], n)), &long, "proof")?;
        let n = limits::BATCH_REQUESTS_MAX + extra as usize;
        let batch = CodecError::TooMany { count: n, max: limits::BATCH_REQUESTS_MAX, what: "requests in one batch" };
        refused(generic::<BatchEntry>(&count_only(&encode(&header()), n)), &batch, "batch")?;
        let n = limits::TXN_ITEMS_MAX + (extra as usize % 1000) + 1;
        let outs = CodecError::TooMany { count: n, max: limits::TXN_ITEMS_MAX, what: "outcomes in one transaction" };
        let o = Outcome::TxnApplied { then: true, outcomes: vec![Outcome::DocDeleted; n] };
        refused(generic::<Outcome>(&encode(&o)), &outs, "transaction outcomes")?;
    }

    /// Real requests just past the count bound, and real proofs just past theirs.
    #[test]
    fn values_just_past_a_count_bound_are_refused(extra in 1usize..50) {
        let one = sign(Operation::LeaseRevoke { lease: 1 }, 1);
        let n = limits::FRAME_REQUESTS_MAX + extra;
        let many = CodecError::TooMany { count: n, max: limits::FRAME_REQUESTS_MAX, what: "requests in one frame" };
        refused(wire::decode_client(&encode(&submit(vec![one.clone(); n]))), &many, "frame")?;
        refused(wire::decode_client(&encode(&relayed(vec![one.clone(); n]))), &many, "relayed")?;
        round_trips(&submit(vec![one.clone(); limits::FRAME_REQUESTS_MAX]), wire::decode_client)?;
        let n = limits::PROOF_HASHES_MAX + extra;
        let long = CodecError::TooMany { count: n, max: limits::PROOF_HASHES_MAX, what: "hashes in one Merkle proof" };
        refused(generic::<Receipt>(&encode(&receipt(one, Outcome::DocDeleted, vec![Digest([1; 32]); n]))), &long, "proof")?;
    }
}

/// The largest receipt the bounds admit (a request of exactly `REQUEST_BYTES_MAX`, a transaction
/// outcome of `TXN_ITEMS_MAX` of the largest outcomes, a proof of `PROOF_HASHES_MAX` hashes)
/// fits `RECEIPT_BYTES_MAX`, and decodes.
#[test]
fn the_largest_receipt_fits_its_bound() {
    let claim = Outcome::ClaimDenied { holder: PublicKey([9; 32]), height: u64::MAX };
    let outcome = Outcome::TxnApplied { then: true, outcomes: vec![claim; limits::TXN_ITEMS_MAX] };
    let r =
        receipt(request_of_len(limits::REQUEST_BYTES_MAX, 1), outcome, vec![Digest([1; 32]); limits::PROOF_HASHES_MAX]);
    let bytes = encode(&r);
    assert_eq!(bytes.len(), 73_242, "the size docs/receipt-format.md gives");
    assert!(bytes.len() <= limits::RECEIPT_BYTES_MAX);
    assert_eq!(tally_codec::decode::<Receipt>(&bytes, limits::RECEIPT_BYTES_MAX), Ok(r));
}

/// The error messages name the bound: what a client sees in a `Malformed` reply.
#[test]
fn bound_errors_name_their_bound() {
    let deep = CodecError::TooDeep { what: "transaction", max: limits::NESTING_DEPTH_MAX };
    assert_eq!(
        deep.to_string(),
        "transaction nested deeper than the limit of 1 level: a transaction may not hold a transaction"
    );
    let many = CodecError::TooMany { count: 8190, max: 8189, what: "requests in one frame" };
    assert_eq!(many.to_string(), "8190 requests in one frame; at most 8189");
    let big = CodecError::RequestTooLarge { max: limits::REQUEST_BYTES_MAX };
    assert_eq!(big.to_string(), "a signed request is over the limit of 69632 bytes encoded");
    assert!(tally_codec::ErrorCode::RequestTooLarge.message().contains(&limits::REQUEST_BYTES_MAX.to_string()));
}
