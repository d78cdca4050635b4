//! Fixture hashes that pin the wire and disk formats.
//!
//! Each test builds one fixed value and compares blake3 of its canonical encoding with a constant
//! that was computed once and pasted in. If one of these fails, you changed the bytes that
//! clients sign, replicas log and stores keep: old receipts, logs and data directories would no
//! longer read back as the same values. That must be a deliberate act: bump the domain tags or
//! the schema version (`keys::SCHEMA_VERSION`), write the migration, and only then paste the new
//! hash here (run with `--nocapture` to see it) in the same commit, saying why.
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use ed25519_dalek::SigningKey;
use tally_codec::wire::{self, ClientMessage, Envelope};
use tally_codec::{
    encode, BatchHeader, ClusterId, Digest, DocKey, ErrorCode, Operation, Outcome, PublicKey, Receipt, Request,
    SignedRequest,
};

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn client_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn operator_key() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

fn fixed_request() -> SignedRequest {
    Request {
        cluster_id: ClusterId([0x11; 16]),
        signer: PublicKey(client_key().verifying_key().to_bytes()),
        nonce: 42,
        expires_at_ms: 1_700_000_600_000,
        op: Operation::Transfer { to: PublicKey(operator_key().verifying_key().to_bytes()), amount: 1_000 },
    }
    .sign(&client_key())
}

fn fixed_header() -> BatchHeader {
    BatchHeader {
        cluster_id: ClusterId([0x11; 16]),
        height: 7,
        prev_hash: Digest([0x22; 32]),
        merkle_root: Digest([0x33; 32]),
        leaf_count: 3,
        write_set_digest: Digest([0x44; 32]),
        state_digest: Digest([0x55; 32]),
        term: 2,
        time_ms: 1_700_000_000_000,
    }
}

fn fixed_receipt() -> Receipt {
    let header = fixed_header();
    let signature = header.sign(&operator_key());
    Receipt {
        request: fixed_request(),
        outcome: Outcome::Transferred { sender_balance: 9_000 },
        leaf_index: 1,
        proof: vec![Digest([0x66; 32]), Digest([0x77; 32])],
        header,
        signature,
    }
}

/// Asserts and, on failure, prints the hash actually computed so a deliberate change is easy.
fn assert_pinned(what: &str, bytes: &[u8], expected: &str) {
    let got = blake3_hex(bytes);
    println!("{what}: {} bytes, blake3 {got}", bytes.len());
    assert_eq!(got, expected, "{what}: the canonical encoding changed (see the module docs before updating)");
}

#[test]
fn signed_request_encoding_is_pinned() {
    let r = fixed_request();
    let bytes = r.encode();
    // Layout: cluster 16 ‖ signer 32 ‖ nonce 8 ‖ expiry 8 ‖ op tag 1 ‖ to 32 ‖ amount 8 ‖ sig 64.
    assert_eq!(bytes.len(), 16 + 32 + 8 + 8 + 1 + 32 + 8 + 64);
    assert_pinned("SignedRequest", &bytes, "7c0c59637039090f187ec21ba89dd26ec0038159936260d69f9dd5017a235130");
    // The request id (the exactly-once key) is blake3 of the signing bytes, so both hashes match.
    assert_pinned(
        "Request::signing_bytes",
        &r.request.signing_bytes(),
        "f540e4fc6cc71d18b17fe926abfb2f0f3a390d8cb0f1168679925b70b86086f2",
    );
    assert_eq!(r.id().to_hex(), "f540e4fc6cc71d18b17fe926abfb2f0f3a390d8cb0f1168679925b70b86086f2");
}

#[test]
fn batch_header_encoding_is_pinned() {
    let h = fixed_header();
    let bytes = encode(&h);
    assert_eq!(bytes.len(), 16 + 8 + 32 + 32 + 4 + 32 + 32 + 8 + 8);
    assert_pinned("BatchHeader", &bytes, "5a9cbb7e6af953aa28ff15ebc85bad7a12827d31ab44394a31d31e040b4c30d2");
    assert_eq!(h.hash().to_hex(), "38c5cdc6eeeb6e5e20cc9accf2327a5f90b5a438350c7f33bd3c1a4199ff67f2");
}

#[test]
fn receipt_encoding_is_pinned() {
    let r = fixed_receipt();
    assert_pinned("Receipt", &encode(&r), "02901ac484e29f5ddd0fae6aa84f6178387aa7564c22f1bcabcdd0c53fd58eea");
}

#[test]
fn client_frame_is_pinned() {
    let env = Envelope {
        id: 9,
        msg: ClientMessage::Submit(vec![
            fixed_request(),
            Request {
                cluster_id: ClusterId([0x11; 16]),
                signer: PublicKey(client_key().verifying_key().to_bytes()),
                nonce: 43,
                expires_at_ms: 1_700_000_600_000,
                op: Operation::Set { key: DocKey::from_random([0xab; 16]), value: br#"{"hello":"world"}"#.to_vec() },
            }
            .sign(&client_key()),
        ]),
    };
    let mut frame = Vec::new();
    wire::write_frame(&mut frame, &encode(&env)).unwrap();
    assert_pinned("client frame", &frame, "09ac94c2054fef145f076e9a576b53d71a68a86b52ae77625ab83309dd2cd8ca");
    // History: commit 9356462 inserted ServerMessage::Batch and ::Audit before Done and Error,
    // moving Error's tag from 6 to 8 (hash was f52db60a…c77d). Any client built before that
    // misreads every error reply. Append new variants at the end of an enum instead.
    let refused = Envelope { id: 9, msg: wire::ServerMessage::Error(wire::WireError::from_code(ErrorCode::NotLeader)) };
    assert_pinned(
        "server error frame body",
        &encode(&refused),
        "770f0ab8125777286c554013d910a24c19b8df7ec89e04b6929b91562320c349",
    );
}

/// Deterministic ed25519: the same key and header always give the same signature, and the
/// fixed receipt verifies offline.
#[test]
fn fixed_receipt_signature_is_deterministic() {
    let h = fixed_header();
    assert_eq!(h.sign(&operator_key()), h.sign(&operator_key()));
    let r = fixed_receipt();
    let op = PublicKey(operator_key().verifying_key().to_bytes());
    // The proof and root are made up, so the receipt fails at the Merkle step, after the request
    // signature passed.
    assert!(matches!(r.verify(&op), Err(tally_codec::CodecError::ReceiptInvalid(m)) if m.contains("Merkle")));
    assert!(h.verify(&op, &r.signature).is_ok());
}
