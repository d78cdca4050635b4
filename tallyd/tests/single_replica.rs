//! One real `tallyd` process: the operator end to end, and every kind of bad input.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tally_client::ClientError;
use tally_codec::wire::{self, ClientMessage, Envelope, ServerMessage, SubmitReply};
use tally_codec::{encode, DocKey, ErrorCode, Operation, Outcome, PublicKey, Request};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn pubkey(k: &ed25519_dalek::SigningKey) -> PublicKey {
    PublicKey(k.verifying_key().to_bytes())
}

/// Sends one frame body and reads one reply frame on a raw connection.
fn raw_call(stream: &mut tally_net::Stream, body: &[u8]) -> Envelope<ServerMessage> {
    wire::write_frame(stream, body).expect("write");
    let mut buf = Vec::new();
    assert!(wire::read_frame(stream, &mut buf, tally_codec::limits::FRAME_BYTES_MAX).expect("read"), "closed");
    wire::decode_server(&buf).expect("decode reply")
}

fn submit_raw(stream: &mut tally_net::Stream, reqs: Vec<tally_codec::SignedRequest>) -> Vec<SubmitReply> {
    let env = Envelope { id: 7, msg: ClientMessage::Submit(reqs) };
    match raw_call(stream, &encode(&env)).msg {
        ServerMessage::Submitted(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

fn refused_code(r: &SubmitReply) -> ErrorCode {
    match r {
        SubmitReply::Refused(e) => e.code,
        SubmitReply::Committed { receipt, .. } => match receipt.outcome {
            Outcome::Rejected(c) => c,
            ref o => panic!("expected a refusal, got {o:?}"),
        },
    }
}

#[test]
fn operator_end_to_end_on_one_replica() {
    let (_dir, layout) = init_cluster(1, 3);
    let _node = start_all(&layout);
    let operator = operator(&layout);
    let alice = client(&layout, 0);
    let bob_key = account_key(&layout, 1);
    let bob = client(&layout, 1);

    // Transfer: committed, durable on the one replica, receipt verifies offline.
    let c = alice.transfer(pubkey(&bob_key), 10).expect("transfer");
    assert_eq!(c.durable_replicas, 1);
    c.receipt.verify(&operator).expect("receipt verifies");
    assert_eq!(c.receipt.outcome, Outcome::Transferred { sender_balance: 1_000_000_000 - 10 });
    assert_eq!(alice.balance(alice.public_key(), false).expect("balance"), Some(1_000_000_000 - 10));
    assert_eq!(bob.balance(pubkey(&bob_key), false).expect("balance"), Some(1_000_000_000 + 10));
    // A receipt fetched later from the store is the same receipt.
    let stored = alice.receipt(c.request_id).expect("receipt call").expect("stored receipt");
    assert_eq!(stored, *c.receipt);
    // With its height (how receipts past their request's expiry are found), the same receipt;
    // at another height, none.
    let at = alice.receipt_at(c.request_id, c.receipt.header.height).expect("receipt call");
    assert_eq!(at.as_ref(), Some(&*c.receipt));
    assert_eq!(alice.receipt_at(c.request_id, c.receipt.header.height + 1_000).expect("receipt call"), None);
    // A tampered receipt does not verify.
    let mut bad = stored.clone();
    bad.outcome = Outcome::Transferred { sender_balance: 5 };
    assert!(bad.verify(&operator).is_err());

    // Documents: create, read at once, update, owner-only, delete, not found.
    let key = DocKey::parse("0d5d3807-5fbf-4228-a657-5a091c4e497f").expect("uuid");
    let json = r#"{"name": "Chapayev's Mustache comb"}"#;
    let c = alice.set(key, json).expect("set");
    assert_eq!(c.receipt.outcome, Outcome::DocCreated { revision: 1 });
    let doc = alice.get(key, false).expect("get").expect("exists");
    assert_eq!(doc.value, json.as_bytes());
    assert_eq!(doc.owner, alice.public_key());
    let c = alice.set(key, r#"{"v":2}"#).expect("update");
    assert_eq!(c.receipt.outcome, Outcome::DocUpdated { revision: 2 });
    match bob.set(key, r#"{"stolen":true}"#) {
        Err(ClientError::Rejected { code: ErrorCode::NotOwner, .. }) => {}
        other => panic!("expected NotOwner, got {other:?}"),
    }
    match bob.delete(key) {
        Err(ClientError::Rejected { code: ErrorCode::NotOwner, .. }) => {}
        other => panic!("expected NotOwner, got {other:?}"),
    }
    alice.delete(key).expect("delete");
    assert_eq!(alice.get(key, false).expect("get"), None);
    match alice.delete(key) {
        Err(ClientError::Rejected { code: ErrorCode::NotFound, .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Identical bodies under two keys are both readable (stored once, content-addressed).
    let k1 = DocKey::from_random([1; 16]);
    let k2 = DocKey::from_random([2; 16]);
    alice.set(k1, r#"{"same":1}"#).expect("set k1");
    alice.set(k2, r#"{"same":1}"#).expect("set k2");
    assert_eq!(alice.get(k2, false).expect("get").expect("k2").value, br#"{"same":1}"#);

    // Exactly-once: the same signed bytes twice give the same receipt and move money once.
    let before = alice.balance(alice.public_key(), false).expect("balance").expect("some");
    let req = alice.sign(Operation::Transfer { to: pubkey(&bob_key), amount: 3 }).expect("sign");
    let first = alice.submit_one(req.clone()).expect("first");
    let second = alice.submit_one(req.clone()).expect("retry");
    assert_eq!(first.receipt, second.receipt);
    // Both copies in one frame: one execution, two identical answers.
    let replies = alice.submit(vec![req.clone(), req]).expect("dup frame");
    assert!(matches!(&replies[0], SubmitReply::Committed { receipt, .. } if *receipt == first.receipt));
    assert!(matches!(&replies[1], SubmitReply::Committed { receipt, .. } if *receipt == first.receipt));
    assert_eq!(alice.balance(alice.public_key(), false).expect("balance"), Some(before - 3));

    // Client-side batching: 2,000 independently signed requests in one frame; money is conserved.
    let carol = tally_client::keyfile::generate_key();
    let reqs: Vec<_> =
        (0..2000).map(|_| alice.sign(Operation::Transfer { to: pubkey(&carol), amount: 1 }).expect("sign")).collect();
    let replies = alice.submit(reqs).expect("batch");
    assert_eq!(replies.len(), 2000);
    for r in &replies {
        match r {
            SubmitReply::Committed { receipt, .. } => receipt.verify(&operator).expect("verifies"),
            other => panic!("not committed: {other:?}"),
        }
    }
    let balances: u64 = [alice.public_key(), pubkey(&bob_key), pubkey(&account_key(&layout, 2)), pubkey(&carol)]
        .iter()
        .map(|k| alice.balance(*k, false).expect("balance").unwrap_or(0))
        .sum();
    assert_eq!(balances, 3 * 1_000_000_000, "the sum of balances never changes");
}

#[test]
fn bad_input_gets_named_errors_and_the_node_keeps_serving() {
    let (_dir, layout) = init_cluster(1, 2);
    let node = start_all(&layout);
    let addr = &node[0].addr;
    let alice_key = account_key(&layout, 0);
    let alice = client(&layout, 0);
    let cluster_id = alice.cluster_id().expect("cluster id");
    let bob = tally_client::keyfile::generate_key();
    let mk = |op: Operation, expires_at_ms: u64| {
        Request { cluster_id, signer: pubkey(&alice_key), nonce: rand_nonce(), expires_at_ms, op }.sign(&alice_key)
    };
    let later = now_ms() + 60_000;
    let mut s = dial_for(addr)
        .open(TcpStream::connect(addr).expect("connect"), std::time::Instant::now() + std::time::Duration::from_secs(5))
        .expect("tls");
    s.tcp().set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");

    // Bad signature.
    let mut forged = mk(Operation::Transfer { to: pubkey(&bob), amount: 1 }, later);
    forged.signature.0[5] ^= 1;
    // Weak (small-order) signer key: the identity point.
    let mut weak = mk(Operation::Transfer { to: pubkey(&bob), amount: 1 }, later);
    weak.request.signer = PublicKey({
        let mut b = [0u8; 32];
        b[0] = 1;
        b
    });
    let cases = vec![
        (forged, ErrorCode::BadSignature),
        (weak, ErrorCode::WeakKey),
        (mk(Operation::Transfer { to: pubkey(&bob), amount: 1 }, now_ms() - 1_000), ErrorCode::Expired),
        (mk(Operation::Transfer { to: pubkey(&bob), amount: 1 }, now_ms() + 3_600_000), ErrorCode::ExpiryTooFar),
        (mk(Operation::Set { key: DocKey([0; 16]), value: b"{}".to_vec() }, later), ErrorCode::NotUuid4),
        (
            mk(Operation::Set { key: DocKey::from_random([3; 16]), value: b"{not json".to_vec() }, later),
            ErrorCode::InvalidJson,
        ),
        (
            mk(
                Operation::Set {
                    key: DocKey::from_random([4; 16]),
                    // Over the 64 KiB document bound, within the 69,632-byte request bound (a
                    // request past that is refused with its whole frame when it is decoded:
                    // `tests/decode_bounds.rs`).
                    value: format!("\"{}\"", "x".repeat(66_000)).into_bytes(),
                },
                later,
            ),
            ErrorCode::ValueTooLarge,
        ),
        (mk(Operation::Transfer { to: pubkey(&bob), amount: 2_000_000_000 }, later), ErrorCode::InsufficientFunds),
        (mk(Operation::Transfer { to: pubkey(&bob), amount: 0 }, later), ErrorCode::ZeroAmount),
        (mk(Operation::Transfer { to: pubkey(&alice_key), amount: 1 }, later), ErrorCode::TransferToSelf),
        (
            Request {
                cluster_id: tally_codec::ClusterId([9; 16]),
                signer: pubkey(&alice_key),
                nonce: 1,
                expires_at_ms: later,
                op: Operation::Delete { key: DocKey::from_random([5; 16]) },
            }
            .sign(&alice_key),
            ErrorCode::WrongCluster,
        ),
    ];
    let (reqs, codes): (Vec<_>, Vec<_>) = cases.into_iter().unzip();
    // All in one frame next to a good request: each gets its own answer, the good one commits.
    let good = mk(Operation::Transfer { to: pubkey(&bob), amount: 1 }, later);
    let mut frame = reqs.clone();
    frame.push(good);
    let replies = submit_raw(&mut s, frame);
    assert_eq!(replies.len(), codes.len() + 1);
    for (r, code) in replies.iter().zip(&codes) {
        assert_eq!(refused_code(r), *code, "reply {r:?}");
        if let SubmitReply::Refused(e) = r {
            assert_eq!(e.message, code.message(), "the message names the problem");
        }
    }
    assert!(matches!(replies.last(), Some(SubmitReply::Committed { .. })));

    // A replayed request returns the original receipt rather than executing again.
    let replay = mk(Operation::Transfer { to: pubkey(&bob), amount: 1 }, later);
    let a = submit_raw(&mut s, vec![replay.clone()]);
    let b = submit_raw(&mut s, vec![replay]);
    assert_eq!(a, b);

    // A write to someone else's document.
    let key = DocKey::from_random([6; 16]);
    alice.set(key, "{}").expect("alice owns it");
    let bob_req = Request {
        cluster_id,
        signer: pubkey(&bob),
        nonce: 1,
        expires_at_ms: later,
        op: Operation::Set { key, value: b"{}".to_vec() },
    }
    .sign(&bob);
    assert_eq!(refused_code(&submit_raw(&mut s, vec![bob_req])[0]), ErrorCode::NotOwner);

    // Garbage that is a well-framed but undecodable body: an error reply, connection stays up.
    let reply = raw_call(&mut s, b"\xff\xfe garbage");
    match reply.msg {
        ServerMessage::Error(e) => assert!(e.message.contains("bad frame"), "{}", e.message),
        other => panic!("expected error, got {other:?}"),
    }
    // Trailing bytes after a valid message are refused too.
    let mut trailing = encode(&Envelope { id: 1, msg: ClientMessage::Status });
    trailing.push(0);
    assert!(matches!(raw_call(&mut s, &trailing).msg, ServerMessage::Error(_)));
    assert!(matches!(
        raw_call(&mut s, &encode(&Envelope { id: 2, msg: ClientMessage::Status })).msg,
        ServerMessage::Status(_)
    ));

    // A frame over the limit: named error, then that connection closes.
    let mut big = dial_for(addr)
        .open(TcpStream::connect(addr).expect("connect"), std::time::Instant::now() + std::time::Duration::from_secs(5))
        .expect("tls");
    big.tcp().set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    big.write_all(&u32::MAX.to_le_bytes()).expect("write");
    let mut buf = Vec::new();
    assert!(wire::read_frame(&mut big, &mut buf, tally_codec::limits::FRAME_BYTES_MAX).expect("reply"));
    match wire::decode_server(&buf).expect("decode").msg {
        ServerMessage::Error(e) => assert!(e.message.contains("over the limit"), "{}", e.message),
        other => panic!("expected error, got {other:?}"),
    }
    let mut rest = Vec::new();
    let _ = big.read_to_end(&mut rest);

    // A truncated frame followed by a hang-up, and raw random bytes: the node shrugs.
    let mut t = dial_for(addr)
        .open(TcpStream::connect(addr).expect("connect"), std::time::Instant::now() + std::time::Duration::from_secs(5))
        .expect("tls");
    t.write_all(&100u32.to_le_bytes()).and_then(|()| t.write_all(b"short")).expect("write");
    drop(t);
    let mut g = dial_for(addr)
        .open(TcpStream::connect(addr).expect("connect"), std::time::Instant::now() + std::time::Duration::from_secs(5))
        .expect("tls");
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let _ = g.write_all(&noise);
    drop(g);

    // Everyone else is still served, and nothing acknowledged was lost.
    let c = alice.transfer(pubkey(&bob), 5).expect("still serving");
    c.receipt.verify(&operator(&layout)).expect("verifies");
    assert_eq!(alice.balance(pubkey(&bob), false).expect("balance"), Some(1 + 1 + 5));
}

fn rand_nonce() -> u64 {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    u64::from_le_bytes(b)
}
