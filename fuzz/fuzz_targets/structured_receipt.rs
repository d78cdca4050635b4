//! Receipts built by shape: a really signed request and an outcome as a leaf of a real Merkle
//! tree of 1 to 1,024 leaves, the header signed by the operator; then an over-long proof, a
//! tampered field, a nested outcome or request spliced in, and maybe a mutation. Checked as
//! `tally verify` does: receipt file JSON ─▶ `ReceiptFile::decode` (hex, borsh within
//! `RECEIPT_BYTES_MAX`, readable fields) ─▶ `Receipt::verify_for_cluster`.
//!
//! Properties: an untouched receipt of a valid request verifies, and is within
//! `RECEIPT_BYTES_MAX`; a proof longer than `PROOF_HASHES_MAX` is refused by its count, a
//! shorter extra one by its length; a tampered one does not verify; a nested one is refused
//! `TooDeep`; after a mutation, no panic and canonical if accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_client::ReceiptFile;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{encode, limits, CodecError, Digest, Outcome, Receipt};
use tally_fuzz::{check_any, operator, operator_key, outcome_refusal, request_refusal, Budget, Deep, DeepKind};
use tally_fuzz::{Header, Mutation, Out, Req, CLUSTER};

#[derive(arbitrary::Arbitrary, Debug)]
enum Tamper {
    None,
    Outcome(Out),
    LeafIndex(u32),
    Nonce(u64),
    HeaderTime(u64),
    Signature { at: u8, xor: u8 },
}

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    req: Req,
    out: Out,
    header: Header,
    leaves: u16,
    index: u16,
    extra_hashes: u8,
    tamper: Tamper,
    deep: Option<Deep>,
    mutation: Mutation,
}

fuzz_target!(|input: Input| {
    let receipt = build(&input);
    let request_refused = request_refusal(&receipt.request);
    let (mut bytes, expected) = match &input.deep {
        Some(d) if d.kind == DeepKind::Outcome => (splice(&receipt, d), request_refused.or(Some(d.refusal()))),
        Some(d) => (splice(&receipt, d), Some(d.refusal())),
        None => {
            let proof = (receipt.proof.len() > limits::PROOF_HASHES_MAX).then_some(CodecError::TooMany {
                count: receipt.proof.len(),
                max: limits::PROOF_HASHES_MAX,
                what: "hashes in one Merkle proof",
            });
            (encode(&receipt), request_refused.or_else(|| outcome_refusal(&receipt.outcome)).or(proof))
        }
    };
    let mutated = input.mutation.apply(&mut bytes);
    let decoded = tally_codec::decode::<Receipt>(&bytes, limits::RECEIPT_BYTES_MAX);
    if mutated {
        check_any(&bytes, decoded);
        return;
    }
    if bytes.len() > limits::RECEIPT_BYTES_MAX {
        assert!(expected.is_some(), "a receipt of a valid request is {} bytes, over RECEIPT_BYTES_MAX", bytes.len());
        return;
    }
    match (&expected, decoded) {
        (Some(why), Err(e)) => assert_eq!(&e, why),
        (Some(why), Ok(_)) => panic!("expected {why:?}, the receipt decoded"),
        (None, Err(e)) => panic!("a well-formed receipt was refused: {e}"),
        (None, Ok(r)) => {
            assert!(r == receipt);
            let verified = r.verify_for_cluster(&operator(), &CLUSTER);
            let untouched = matches!(input.tamper, Tamper::None) && input.extra_hashes % 80 == 0;
            assert_eq!(verified.is_ok(), untouched, "{verified:?}");
            file_form(&r, untouched);
        }
    }
});

/// A receipt of `input`'s request and outcome at a leaf of a real tree, signed.
fn build(input: &Input) -> Receipt {
    let mut budget = Budget::default();
    let mut req = input.req.clone();
    req.sign = true;
    let request = req.build(&mut budget);
    let outcome = input.out.build();
    let n = 1 + usize::from(input.leaves) % 1024;
    let i = usize::from(input.index) % n;
    let leaves: Vec<[u8; 32]> = (0..n)
        .map(|j| {
            if j == i {
                leaf_hash(&request.id(), &outcome)
            } else {
                tally_codec::hash_with_domain(b"other leaf", &j.to_le_bytes()).0
            }
        })
        .collect();
    let tree = Tree::from_leaves(&leaves);
    let mut header = input.header.build(tree.root(), n as u32, Digest([3; 32]));
    header.time_ms = header.time_ms.min(request.request.expires_at_ms);
    let signature = header.sign(operator_key());
    let mut proof = tree.proof(i);
    proof.extend((0..input.extra_hashes % 80).map(|k| Digest([k; 32])));
    let mut r = Receipt { request, outcome, leaf_index: i as u32, proof, header, signature };
    match &input.tamper {
        Tamper::None => {}
        Tamper::Outcome(o) => {
            let other = if r.outcome == Outcome::LeaseRevoked { Outcome::DocDeleted } else { Outcome::LeaseRevoked };
            r.outcome = if o.build() == r.outcome { other } else { o.build() };
        }
        Tamper::LeafIndex(k) => r.leaf_index = if *k == r.leaf_index { k.wrapping_add(1) } else { *k },
        Tamper::Nonce(k) => r.request.request.nonce ^= k | 1,
        Tamper::HeaderTime(t) => r.header.time_ms ^= t | 1,
        Tamper::Signature { at, xor } => r.signature.0[usize::from(*at) % 64] ^= xor | 1,
    }
    r
}

/// The receipt's bytes with a nested request or outcome in place of its own.
fn splice(r: &Receipt, d: &Deep) -> Vec<u8> {
    let (request, outcome) = match d.kind {
        DeepKind::Outcome => (encode(&r.request), d.outcome_bytes()),
        DeepKind::Then | DeepKind::Otherwise => (d.request_bytes(), encode(&r.outcome)),
    };
    let mut out = request;
    out.extend_from_slice(&outcome);
    out.extend_from_slice(&r.leaf_index.to_le_bytes());
    out.extend_from_slice(&encode(&r.proof));
    out.extend_from_slice(&encode(&r.header));
    out.extend_from_slice(&r.signature.0);
    out
}

/// The receipt through its file form, as `tally verify` reads it.
fn file_form(r: &Receipt, verifies: bool) {
    let json = serde_json::to_string(&ReceiptFile::new(r, Some(operator()))).expect("json");
    let file: ReceiptFile = serde_json::from_str(&json).expect("a written receipt file parses");
    let back = file.decode().expect("a written receipt file decodes");
    assert!(back == *r);
    assert_eq!(back.verify_for_cluster(&operator(), &CLUSTER).is_ok(), verifies);
    assert!(json.len() <= tally_client::receipt_file::RECEIPT_FILE_BYTES_MAX, "{} bytes", json.len());
}
