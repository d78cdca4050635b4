//! Attacks on offline receipt verification (`docs/receipt-format.md` §4): each test builds a
//! real receipt with the codec's own types, changes it the way an attacker could, and checks that
//! `Receipt::verify` refuses it and says why.
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use ed25519_dalek::SigningKey;
use tally_codec::merkle::{leaf_hash, verify_proof, Tree};
use tally_codec::{
    BatchHeader, ClusterId, CodecError, Digest, DocKey, Operation, Outcome, PublicKey, Receipt, Request, SignedRequest,
};

const CLUSTER: ClusterId = ClusterId([0x11; 16]);
const HEADER_TIME_MS: u64 = 1_700_000_000_000;

fn operator() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

fn operator_pub() -> PublicKey {
    PublicKey(operator().verifying_key().to_bytes())
}

fn user(i: u64) -> SigningKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&i.to_le_bytes());
    SigningKey::from_bytes(&seed)
}

fn request(cluster_id: ClusterId, i: u64, expires_at_ms: u64) -> SignedRequest {
    let key = user(i);
    Request {
        cluster_id,
        signer: PublicKey(key.verifying_key().to_bytes()),
        nonce: i,
        expires_at_ms,
        op: Operation::Set { key: DocKey::from_random([i as u8; 16]), value: b"{}".to_vec() },
    }
    .sign(&key)
}

/// A batch of `n` requests of `cluster_id`, where request `expiry_of.0` expires at `expiry_of.1`
/// (every other request a minute after the header time), signed by the operator; returns the
/// receipt of leaf `index`.
fn receipt_in(cluster_id: ClusterId, n: usize, index: usize, expiry_of: (usize, u64)) -> Receipt {
    let requests: Vec<SignedRequest> = (0..n)
        .map(|i| {
            let expiry = if i == expiry_of.0 { expiry_of.1 } else { HEADER_TIME_MS + 60_000 };
            request(cluster_id, i as u64, expiry)
        })
        .collect();
    let outcomes: Vec<Outcome> = (0..n).map(|i| Outcome::DocCreated { revision: i as u64 + 1 }).collect();
    let leaves: Vec<[u8; 32]> = requests.iter().zip(&outcomes).map(|(r, o)| leaf_hash(&r.id(), o)).collect();
    let tree = Tree::from_leaves(&leaves);
    let header = BatchHeader {
        cluster_id,
        height: 12,
        prev_hash: Digest([0x22; 32]),
        merkle_root: tree.root(),
        leaf_count: n as u32,
        write_set_digest: Digest([0x44; 32]),
        state_digest: Digest([0x55; 32]),
        term: 2,
        time_ms: HEADER_TIME_MS,
    };
    let signature = header.sign(&operator());
    Receipt {
        request: requests[index].clone(),
        outcome: outcomes[index].clone(),
        leaf_index: index as u32,
        proof: tree.proof(index),
        header,
        signature,
    }
}

fn receipt(n: usize, index: usize) -> Receipt {
    receipt_in(CLUSTER, n, index, (usize::MAX, 0))
}

#[test]
fn honest_receipts_verify() {
    for n in [1, 2, 3, 10, 33] {
        for i in 0..n {
            receipt(n, i).verify(&operator_pub()).unwrap_or_else(|e| panic!("n={n} i={i}: {e}"));
        }
    }
}

/// (a) One receipt, one byte form: a hash appended to the proof must be refused, naming the
/// lengths.
#[test]
fn proof_with_an_appended_hash_is_refused() {
    let mut r = receipt(10, 3);
    assert_eq!(r.proof.len(), 4);
    r.proof.push(Digest([0xab; 32]));
    let err = r.verify(&operator_pub()).expect_err("a proof with an extra hash must be refused");
    assert_eq!(err.to_string(), "receipt does not verify: Merkle proof has 5 hashes; leaf 3 of 10 needs exactly 4");

    // Also for a one-leaf batch, whose proof is empty.
    let mut r = receipt(1, 0);
    assert!(r.proof.is_empty());
    r.proof.push(Digest::ZERO);
    let err = r.verify(&operator_pub()).expect_err("a 1-leaf proof with a hash must be refused");
    assert!(err.to_string().contains("Merkle proof has 1 hashes; leaf 0 of 1 needs exactly 0"), "{err}");

    // And for the last, promoted leaf of an odd batch, whose proof is shorter than the others.
    let mut r = receipt(5, 4);
    assert_eq!(r.proof.len(), 1);
    let copy = r.proof[0];
    r.proof.push(copy);
    let err = r.verify(&operator_pub()).expect_err("extra hash after a promoted leaf");
    assert!(err.to_string().contains("Merkle proof has 2 hashes; leaf 4 of 5 needs exactly 1"), "{err}");
}

/// (a) The bare Merkle check refuses extra hashes too, for every leaf of trees of 1..=300 leaves.
#[test]
fn verify_proof_refuses_any_other_length() {
    for n in 1..=300usize {
        let leaves: Vec<[u8; 32]> = (0..n as u64)
            .map(|i| leaf_hash(&tally_codec::RequestId([i as u8; 32]), &Outcome::DocCreated { revision: i }))
            .collect();
        let tree = Tree::from_leaves(&leaves);
        let root = tree.root();
        for (i, &leaf) in leaves.iter().enumerate() {
            let proof = tree.proof(i);
            assert!(verify_proof(&root, i, leaf, n, &proof), "n={n} i={i}");
            let mut longer = proof.clone();
            longer.push(Digest([0x5a; 32]));
            assert!(!verify_proof(&root, i, leaf, n, &longer), "n={n} i={i}: appended hash accepted");
            if let Some((_, shorter)) = proof.split_last() {
                assert!(!verify_proof(&root, i, leaf, n, shorter), "n={n} i={i}: shortened proof accepted");
            }
        }
    }
}

/// (c) An honest operator never signs a request that had expired by the batch's header time.
#[test]
fn request_expired_before_the_header_time_is_refused() {
    let r = receipt_in(CLUSTER, 4, 2, (2, HEADER_TIME_MS - 1));
    let err = r.verify(&operator_pub()).expect_err("expired request must be refused");
    assert_eq!(
        err.to_string(),
        format!(
            "receipt does not verify: request expired at {} ms, before its batch's header time {} ms",
            HEADER_TIME_MS - 1,
            HEADER_TIME_MS
        )
    );
    // Expiring exactly at the header time is still in time (the sequencer refuses only
    // `expires_at_ms < time_ms`).
    receipt_in(CLUSTER, 4, 2, (2, HEADER_TIME_MS)).verify(&operator_pub()).expect("expires at the header time");
}

/// (d) Two clusters sharing an operator key: a receipt of one must not verify for the other.
#[test]
fn receipt_is_bound_to_its_cluster() {
    let other = ClusterId([0x99; 16]);
    let r = receipt_in(other, 3, 1, (usize::MAX, 0));
    r.verify(&operator_pub()).expect("a genuine receipt of the other cluster");
    r.verify_for_cluster(&operator_pub(), &other).expect("verifies for its own cluster");
    let err = r.verify_for_cluster(&operator_pub(), &CLUSTER).expect_err("wrong cluster");
    assert!(matches!(err, CodecError::WrongCluster { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("receipt does not verify: it is a receipt of cluster {other}, not of cluster {CLUSTER}")
    );
}

/// The worked example in docs/receipt-format.md: leaf 1 of a 3-leaf batch. Its bytes and
/// intermediate values are printed here (`--nocapture`) and must appear verbatim in the doc, so
/// the doc cannot drift from the code.
#[test]
fn documented_example_matches_the_code() {
    let r = receipt(3, 1);
    r.verify_for_cluster(&operator_pub(), &CLUSTER).expect("the documented example verifies");
    let leaf = leaf_hash(&r.request_id(), &r.outcome);
    let values = [
        ("operator key", operator_pub().to_hex()),
        ("cluster id", CLUSTER.to_hex()),
        ("request id", r.request_id().to_hex()),
        ("leaf", hex::encode(leaf)),
        ("merkle root", r.header.merkle_root.to_hex()),
        ("header hash", r.header.hash().to_hex()),
        ("receipt", hex::encode(tally_codec::encode(&r))),
    ];
    let doc = include_str!("../../docs/receipt-format.md");
    let doc: String = doc.split_whitespace().collect();
    for (what, value) in values {
        println!("{what}: {value}");
        assert!(doc.contains(&value), "docs/receipt-format.md lacks the example's {what}: {value}");
    }
    let mut longer = r;
    longer.proof.push(Digest([0; 32]));
    let err = longer.verify(&operator_pub()).expect_err("one more hash");
    let message = "Merkle proof has 3 hashes; leaf 1 of 3 needs exactly 2";
    assert!(err.to_string().contains(message) && doc.contains(&message.replace(' ', "")), "{err}");
}

/// The readable form of every outcome, as a receipt file's `outcome` field holds it and
/// `docs/receipt-format.md` §5 lists it (Rust's `Debug` form): the document is checked against
/// the code here.
#[test]
fn readable_outcome_forms_are_as_documented() {
    let holder = PublicKey::from_hex("759155344a5246e01f06f259dfb4f4960f3b0b85a0b94a803c545e46702f6954").unwrap();
    let forms = [
        (Outcome::DocCreated { revision: 1 }, "DocCreated { revision: 1 }"),
        (Outcome::DocUpdated { revision: 2 }, "DocUpdated { revision: 2 }"),
        (Outcome::DocDeleted, "DocDeleted"),
        (Outcome::Transferred { sender_balance: 990 }, "Transferred { sender_balance: 990 }"),
        (Outcome::Rejected(tally_codec::ErrorCode::InsufficientFunds), "Rejected(InsufficientFunds)"),
        (Outcome::RevisionMismatch { current: 0 }, "RevisionMismatch { current: 0 }"),
        (
            Outcome::LeaseGranted { lease: 4194305, expires_at_ms: 1700000010000 },
            "LeaseGranted { lease: 4194305, expires_at_ms: 1700000010000 }",
        ),
        (Outcome::LeaseRenewed { expires_at_ms: 7 }, "LeaseRenewed { expires_at_ms: 7 }"),
        (Outcome::LeaseRevoked, "LeaseRevoked"),
        (Outcome::ClaimGranted { height: 12 }, "ClaimGranted { height: 12 }"),
        (Outcome::ClaimDenied { holder, height: 3 }, "ClaimDenied { holder: PublicKey(759155344a5246e0), height: 3 }"),
        (
            Outcome::TxnApplied {
                then: true,
                outcomes: vec![Outcome::DocCreated { revision: 1 }, Outcome::DocDeleted],
            },
            "TxnApplied { then: true, outcomes: [DocCreated { revision: 1 }, DocDeleted] }",
        ),
        (Outcome::TxnApplied { then: false, outcomes: vec![] }, "TxnApplied { then: false, outcomes: [] }"),
    ];
    for (outcome, form) in forms {
        assert_eq!(format!("{outcome:?}"), form);
    }
}
