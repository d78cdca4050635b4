//! The shapes that random bytes never build: values nested thousands of levels deep, a request
//! far over its size bound hidden inside a frame, and more requests than a frame may hold. Each
//! must be refused with an error that names the bound it broke, without recursing or allocating
//! by the input (before the depth guard, the 5,000-level frame overflowed the decoding thread's
//! stack and aborted the whole test binary, as it aborted `tallyd`).
//!
//! The deep inputs are built as bytes, not as values: encoding or dropping a 100,000-level value
//! would itself recurse that deep.
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use tally_codec::wire::{self, ClientMessage, Envelope, Relayed};
use tally_codec::{
    encode, limits, BatchEntry, BatchHeader, ClusterId, CodecError, Digest, DocKey, Operation, Outcome, PublicKey,
    Receipt, Request, Signature, SignedRequest, Txn,
};

/// borsh tag of `Operation::Txn`.
const TXN_TAG: u8 = 9;
/// borsh tag of `Outcome::TxnApplied`.
const TXN_APPLIED_TAG: u8 = 11;

/// A `Txn` whose `then` holds a `Txn` whose `then` holds … `depth` levels in all.
fn nested_txn_bytes(depth: usize) -> Vec<u8> {
    assert!(depth >= 1);
    let mut out = Vec::with_capacity(depth * 13);
    for _ in 1..depth {
        out.push(TXN_TAG);
        out.extend_from_slice(&0u32.to_le_bytes()); // compares
        out.extend_from_slice(&1u32.to_le_bytes()); // then: one operation, the next level
    }
    out.push(TXN_TAG);
    out.extend_from_slice(&[0; 12]); // the innermost: no compares, empty branches
    for _ in 1..depth {
        out.extend_from_slice(&0u32.to_le_bytes()); // otherwise of each outer level
    }
    out
}

/// `TxnApplied { then: true, outcomes: [TxnApplied { … }] }`, `depth` levels in all.
fn nested_outcome_bytes(depth: usize) -> Vec<u8> {
    assert!(depth >= 1);
    let mut out = Vec::with_capacity(depth * 6);
    for _ in 1..depth {
        out.extend_from_slice(&[TXN_APPLIED_TAG, 1]);
        out.extend_from_slice(&1u32.to_le_bytes());
    }
    out.extend_from_slice(&[TXN_APPLIED_TAG, 1, 0, 0, 0, 0]);
    out
}

fn request_with(op: Operation) -> SignedRequest {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    Request {
        cluster_id: ClusterId([0x11; 16]),
        signer: PublicKey(key.verifying_key().to_bytes()),
        nonce: 1,
        expires_at_ms: 1_700_000_600_000,
        op,
    }
    .sign(&key)
}

/// The bytes of a signed request whose operation is `op_bytes` (the signature is not checked by
/// decoding, so any 64 bytes do).
fn signed_request_bytes(op_bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0x11; 16]); // cluster_id
    out.extend_from_slice(&[0x22; 32]); // signer
    out.extend_from_slice(&1u64.to_le_bytes()); // nonce
    out.extend_from_slice(&u64::MAX.to_le_bytes()); // expires_at_ms
    out.extend_from_slice(op_bytes);
    out.extend_from_slice(&[0x33; 64]); // signature
    out
}

/// `Envelope { id: 7, Submit([request]) }` with the request given as bytes.
fn submit_frame(request: &[u8]) -> Vec<u8> {
    let mut out = 7u64.to_le_bytes().to_vec();
    out.push(0); // ClientMessage::Submit
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(request);
    out
}

fn header() -> BatchHeader {
    BatchHeader {
        cluster_id: ClusterId([0x11; 16]),
        height: 3,
        prev_hash: Digest([1; 32]),
        merkle_root: Digest([2; 32]),
        leaf_count: 1,
        write_set_digest: Digest([3; 32]),
        state_digest: Digest([4; 32]),
        term: 1,
        time_ms: 1_700_000_000_000,
    }
}

/// A receipt whose outcome is given as bytes.
fn receipt_bytes(outcome: &[u8]) -> Vec<u8> {
    let mut out = encode(&request_with(Operation::LeaseRevoke { lease: 1 }));
    out.extend_from_slice(outcome);
    out.extend_from_slice(&0u32.to_le_bytes()); // leaf_index
    out.extend_from_slice(&0u32.to_le_bytes()); // proof: no hashes
    out.extend_from_slice(&encode(&header()));
    out.extend_from_slice(&[0x44; 64]);
    out
}

fn assert_too_deep<T: std::fmt::Debug>(result: Result<T, CodecError>, what: &str) {
    match result {
        Err(e @ CodecError::TooDeep { max, .. }) => {
            assert_eq!(max, limits::NESTING_DEPTH_MAX, "{what}");
            let text = e.to_string();
            assert!(text.contains("nest") && text.contains(&max.to_string()), "{what}: {text}");
        }
        other => panic!("{what}: expected TooDeep, got {other:?}"),
    }
}

/// The frame of the attack: one `Submit` of one request whose `Txn` nests 5,000 levels (65 KB),
/// and the same at 100,000 levels (1.3 MB, still one frame).
#[test]
fn deeply_nested_txn_frames_are_refused_naming_the_depth() {
    for depth in [5_000, 100_000] {
        let frame = submit_frame(&signed_request_bytes(&nested_txn_bytes(depth)));
        assert!(frame.len() < limits::FRAME_BYTES_MAX, "fits in one frame");
        assert_too_deep(wire::decode_client(&frame), &format!("Submit, depth {depth}"));
        // The same request relayed by a follower, and on its own (as the store reads it).
        let mut relayed = 7u64.to_le_bytes().to_vec();
        relayed.push(encode(&ClientMessage::Forwarded(Relayed::Submit(vec![])))[0]);
        relayed.push(0); // Relayed::Submit
        relayed.extend_from_slice(&frame[9..]);
        assert_too_deep(wire::decode_client(&relayed), &format!("Forwarded, depth {depth}"));
        // Alone, as the store reads it: the depth is met long before the size bound.
        let alone = signed_request_bytes(&nested_txn_bytes(depth));
        assert_too_deep(tally_codec::decode::<SignedRequest>(&alone, usize::MAX), "request");
    }
}

/// Any nesting at all is over the bound: a transaction may not hold a transaction.
#[test]
fn a_txn_inside_a_txn_is_refused_and_one_level_decodes() {
    let flat = request_with(Operation::Txn(Txn {
        compares: vec![],
        then: vec![Operation::Delete { key: DocKey::from_random([1; 16]) }],
        otherwise: vec![],
    }));
    assert_eq!(SignedRequest::decode(&flat.encode()), Ok(flat));
    let nested = request_with(Operation::Txn(Txn {
        compares: vec![],
        then: vec![],
        otherwise: vec![Operation::Txn(Txn { compares: vec![], then: vec![], otherwise: vec![] })],
    }));
    assert_too_deep(SignedRequest::decode(&nested.encode()), "Txn in otherwise");
    assert_too_deep(SignedRequest::decode(&signed_request_bytes(&nested_txn_bytes(2))), "Txn in then");
}

/// `tally verify` decodes a receipt before checking anything: a deeply nested outcome (or
/// request) is refused, whatever the signatures.
#[test]
fn receipts_with_nested_outcomes_or_requests_are_refused() {
    for depth in [2, 15_000, 100_000] {
        let bytes = receipt_bytes(&nested_outcome_bytes(depth));
        assert_too_deep(tally_codec::decode::<Receipt>(&bytes, usize::MAX), &format!("outcome depth {depth}"));
    }
    let one_level = Outcome::TxnApplied { then: true, outcomes: vec![Outcome::DocCreated { revision: 1 }] };
    let bytes = receipt_bytes(&encode(&one_level));
    assert_eq!(tally_codec::decode::<Receipt>(&bytes, usize::MAX).unwrap().outcome, one_level);

    let mut deep_request = signed_request_bytes(&nested_txn_bytes(50_000));
    deep_request.push(2); // outcome DocDeleted
    deep_request.extend_from_slice(&[0; 8]); // leaf_index, proof count
    deep_request.extend_from_slice(&encode(&header()));
    deep_request.extend_from_slice(&[0x44; 64]);
    assert_too_deep(tally_codec::decode::<Receipt>(&deep_request, usize::MAX), "request in receipt");
}

/// A peer's batch entry with a deeply nested outcome is refused as well.
#[test]
fn batch_entries_with_nested_outcomes_are_refused() {
    let mut bytes = encode(&header());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&encode(&request_with(Operation::LeaseRevoke { lease: 1 })));
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&nested_outcome_bytes(100_000));
    bytes.extend_from_slice(&0u32.to_le_bytes()); // empty write set
    assert_too_deep(tally_codec::decode::<BatchEntry>(&bytes, limits::ENTRY_BYTES_MAX), "batch entry");
}

/// The attack of the 2 MB transaction: 32 sets of 64 KiB each in one `Txn`. Each value is within
/// the document bound, but the signed request is 30 times over its own.
#[test]
fn an_oversize_request_inside_submit_is_refused_naming_the_bound() {
    let set = |i: u8| Operation::Set { key: DocKey::from_random([i; 16]), value: vec![b' '; limits::VALUE_BYTES_MAX] };
    let big = request_with(Operation::Txn(Txn {
        compares: vec![],
        then: (0..limits::TXN_ITEMS_MAX as u8).map(set).collect(),
        otherwise: vec![],
    }));
    assert!(big.encode().len() > 2_000_000);
    let frame = encode(&Envelope { id: 1, msg: ClientMessage::Submit(vec![big.clone()]) });
    let expect = |r: Result<Envelope<ClientMessage>, CodecError>, what: &str| match r {
        Err(e @ CodecError::RequestTooLarge { max }) => {
            assert_eq!(max, limits::REQUEST_BYTES_MAX, "{what}");
            assert!(e.to_string().contains(&limits::REQUEST_BYTES_MAX.to_string()), "{what}: {e}");
        }
        other => panic!("{what}: expected RequestTooLarge, got {other:?}"),
    };
    expect(wire::decode_client(&frame), "Submit");
    let relayed = encode(&Envelope { id: 1, msg: ClientMessage::Forwarded(Relayed::Submit(vec![big.clone()])) });
    expect(wire::decode_client(&relayed), "Forwarded");
    assert!(matches!(SignedRequest::decode(&big.encode()), Err(CodecError::RequestTooLarge { .. })));

    // The largest request the bound admits decodes, one byte more does not.
    let fixed = request_with(Operation::Set { key: DocKey::from_random([1; 16]), value: vec![] }).encode().len();
    let at_bound = request_with(Operation::Set {
        key: DocKey::from_random([1; 16]),
        value: vec![b' '; limits::REQUEST_BYTES_MAX - fixed],
    });
    assert_eq!(at_bound.encode().len(), limits::REQUEST_BYTES_MAX);
    let frame = encode(&Envelope { id: 1, msg: ClientMessage::Submit(vec![at_bound.clone()]) });
    assert!(wire::decode_client(&frame).is_ok());
    let over = request_with(Operation::Set {
        key: DocKey::from_random([1; 16]),
        value: vec![b' '; limits::REQUEST_BYTES_MAX - fixed + 1],
    });
    let frame = encode(&Envelope { id: 1, msg: ClientMessage::Submit(vec![over]) });
    expect(wire::decode_client(&frame), "one byte over");
}

/// 8,190 requests in one frame are refused as too many requests, not as too many bytes, and
/// before any of them is decoded: the count alone (with no requests behind it) is enough.
#[test]
fn too_many_requests_are_named_as_requests() {
    let one = request_with(Operation::LeaseRevoke { lease: 1 });
    let n = limits::FRAME_REQUESTS_MAX + 1;
    let frame = encode(&Envelope { id: 1, msg: ClientMessage::Submit(vec![one; n]) });
    let err = wire::decode_client(&frame).unwrap_err();
    assert_eq!(err, CodecError::TooMany { count: n, max: limits::FRAME_REQUESTS_MAX, what: "requests in one frame" });
    assert_eq!(err.to_string(), "8190 requests in one frame; at most 8189");
    let mut bare = 1u64.to_le_bytes().to_vec();
    bare.push(0);
    bare.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(wire::decode_client(&bare), Err(CodecError::TooMany { count, .. }) if count == u32::MAX as usize));
}

/// A receipt's proof longer than any batch could need is refused by its count, before the
/// hashes are read.
#[test]
fn an_overlong_proof_is_refused_by_its_count() {
    let mut bytes = encode(&request_with(Operation::LeaseRevoke { lease: 1 }));
    bytes.push(8); // LeaseRevoked
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = tally_codec::decode::<Receipt>(&bytes, usize::MAX).unwrap_err();
    assert_eq!(
        err,
        CodecError::TooMany {
            count: u32::MAX as usize,
            max: limits::PROOF_HASHES_MAX,
            what: "hashes in one Merkle proof"
        }
    );
    let _ = Signature([0; 64]);
}

/// History written before the request bound was enforced (a transaction of 32 full documents,
/// which stage 2 then accepted) must still replay from the log and serve receipts from the
/// store: inside a committed batch a request is bounded by a frame's size, not by the bound on
/// new requests. The same request in a frame is still refused, and so is the frame bound.
#[test]
fn a_committed_batch_keeps_requests_written_before_the_bound() {
    let set = |i: u8| Operation::Set { key: DocKey::from_random([i; 16]), value: vec![b' '; limits::VALUE_BYTES_MAX] };
    let big = request_with(Operation::Txn(Txn {
        compares: vec![],
        then: (0..limits::TXN_ITEMS_MAX as u8).map(set).collect(),
        otherwise: vec![],
    }));
    let entry = BatchEntry {
        header: header(),
        requests: vec![big.clone(), request_with(Operation::LeaseRevoke { lease: 1 })],
        outcomes: vec![Outcome::LeaseRevoked, Outcome::LeaseRevoked],
        write_set: tally_codec::WriteSet::default(),
    };
    let bytes = encode(&entry);
    let back: BatchEntry = tally_codec::decode(&bytes, limits::ENTRY_BYTES_MAX).expect("history decodes");
    assert_eq!(back, entry);
    let body = tally_codec::BatchBody {
        requests: entry.requests.clone(),
        outcomes: entry.outcomes.clone(),
        write_set: entry.write_set.clone(),
    };
    let back: tally_codec::BatchBody = tally_codec::decode(&encode(&body), limits::ENTRY_BYTES_MAX).expect("body");
    assert_eq!(back, body);
    // After the batch, a request alone is bounded again (the batch's bound does not leak).
    assert!(matches!(SignedRequest::decode(&big.encode()), Err(CodecError::RequestTooLarge { .. })));
    // A request past a frame's size is refused even inside a batch, naming that bound.
    let huge = signed_request_bytes(&{
        let mut op = vec![0u8]; // Operation::Set
        op.extend_from_slice(&[0x44; 16]);
        op.extend_from_slice(&((limits::COMMITTED_REQUEST_BYTES_MAX as u32) + 1).to_le_bytes());
        op.extend(std::iter::repeat_n(b' ', limits::COMMITTED_REQUEST_BYTES_MAX + 1));
        op
    });
    let mut bytes = encode(&header());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&huge);
    match tally_codec::decode::<BatchEntry>(&bytes, limits::ENTRY_BYTES_MAX) {
        Err(CodecError::RequestTooLarge { max }) => assert_eq!(max, limits::COMMITTED_REQUEST_BYTES_MAX),
        other => panic!("expected RequestTooLarge at the frame bound, got {other:?}"),
    }
}
