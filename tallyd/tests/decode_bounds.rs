//! The frames that killed a replica before any signature was checked, sent over TLS to a real
//! single-replica `tallyd`: a `Submit` whose one request nests `Txn` 5,000 (and 100,000) levels
//! deep, a properly signed 2 MB transaction (32 sets of 64 KiB), and 8,190 requests in one frame.
//! Each is answered `Malformed` naming the bound it broke, the connection stays usable, the node
//! keeps serving, and nothing of the refused frames is committed.

mod common;

use common::*;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tally_codec::wire::{self, ClientMessage, Envelope, ServerMessage, WireError};
use tally_codec::{encode, limits, DocKey, ErrorCode, Operation, PublicKey, Request, Txn};

const TXN_TAG: u8 = 9;

/// A `Submit` of one request (as bytes) whose operation is a `Txn` nested `depth` levels.
fn nested_submit(depth: usize) -> Vec<u8> {
    let mut frame = 7u64.to_le_bytes().to_vec();
    frame.push(0); // Submit
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.extend_from_slice(&[0x11; 16 + 32]); // cluster_id, signer
    frame.extend_from_slice(&[0; 16]); // nonce, expires_at_ms
    for _ in 1..depth {
        frame.push(TXN_TAG);
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&1u32.to_le_bytes());
    }
    frame.push(TXN_TAG);
    frame.extend_from_slice(&[0; 12]);
    frame.extend(std::iter::repeat_n(0u8, 4 * (depth - 1)));
    frame.extend_from_slice(&[0x33; 64]);
    frame
}

fn open(addr: &str) -> tally_net::Stream {
    let s = dial_for(addr)
        .open(TcpStream::connect(addr).expect("connect"), Instant::now() + Duration::from_secs(5))
        .expect("tls");
    s.tcp().set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// Sends one frame body and reads the reply; a closed connection (the node died) fails here.
fn call(stream: &mut tally_net::Stream, body: &[u8]) -> ServerMessage {
    wire::write_frame(stream, body).expect("write");
    let mut buf = Vec::new();
    let got = wire::read_frame(stream, &mut buf, limits::FRAME_BYTES_MAX);
    assert!(matches!(got, Ok(true)), "no reply to a {} byte frame: {got:?} (did the node die?)", body.len());
    wire::decode_server(&buf).expect("decode reply").msg
}

fn malformed(reply: ServerMessage, what: &str) -> WireError {
    match reply {
        ServerMessage::Error(e) if e.code == ErrorCode::Malformed => e,
        other => panic!("{what}: expected a Malformed error, got {other:?}"),
    }
}

#[test]
fn frames_over_a_decoding_bound_are_refused_and_the_node_keeps_serving() {
    let (_dir, layout) = init_cluster(1, 1);
    let mut nodes = start_all(&layout);
    let addr = nodes[0].addr.clone();
    let alice_key = account_key(&layout, 0);
    let alice = client(&layout, 0);
    let cluster_id = alice.cluster_id().expect("cluster id");
    let mut s = open(&addr);

    for depth in [5_000, 100_000] {
        let e = malformed(call(&mut s, &nested_submit(depth)), &format!("depth {depth}"));
        assert!(e.message.contains("nested deeper than the limit of 1 level"), "depth {depth}: {}", e.message);
        assert!(nodes[0].exited().is_none(), "tallyd died on the {depth}-level frame");
    }

    // 32 sets of 64 KiB in one signed transaction: every value within the document bound, the
    // request 30 times over its own.
    let expires_at_ms = now_ms() + 60_000;
    let keys: Vec<DocKey> = (0..limits::TXN_ITEMS_MAX as u8).map(|i| DocKey::from_random([i; 16])).collect();
    let value = {
        let mut v = vec![b' '; limits::VALUE_BYTES_MAX];
        v[0] = b'1';
        v
    };
    let then = keys.iter().map(|k| Operation::Set { key: *k, value: value.clone() }).collect();
    let big = Request {
        cluster_id,
        signer: PublicKey(alice_key.verifying_key().to_bytes()),
        nonce: 1,
        expires_at_ms,
        op: Operation::Txn(Txn { compares: vec![], then, otherwise: vec![] }),
    }
    .sign(&alice_key);
    assert!(big.encode().len() > 2_000_000);
    // The client library refuses to sign it for sending, naming the bound.
    let refused = alice.sign(big.request.op.clone()).expect_err("the library refuses an oversize request");
    assert!(refused.to_string().contains(&format!("at most {}", limits::REQUEST_BYTES_MAX)), "{refused}");
    let e = malformed(call(&mut s, &encode(&Envelope { id: 8, msg: ClientMessage::Submit(vec![big]) })), "2 MB txn");
    assert!(e.message.contains(&format!("over the limit of {} bytes", limits::REQUEST_BYTES_MAX)), "{}", e.message);

    // 8,190 requests: named as requests, not bytes.
    let one = Request {
        cluster_id,
        signer: PublicKey(alice_key.verifying_key().to_bytes()),
        nonce: 2,
        expires_at_ms,
        op: Operation::LeaseRevoke { lease: 1 },
    }
    .sign(&alice_key);
    let many = vec![one; limits::FRAME_REQUESTS_MAX + 1];
    let e = malformed(call(&mut s, &encode(&Envelope { id: 9, msg: ClientMessage::Submit(many) })), "8,190 requests");
    assert!(e.message.contains("8190 requests in one frame; at most 8189"), "{}", e.message);

    // The same connection still works, other clients are served, and nothing refused committed.
    assert!(matches!(
        call(&mut s, &encode(&Envelope { id: 10, msg: ClientMessage::Status })),
        ServerMessage::Status(_)
    ));
    let c = alice.transfer(fresh_key(), 5).expect("still serving");
    c.receipt.verify(&operator(&layout)).expect("verifies");
    for k in &keys {
        assert_eq!(alice.get(*k, false).expect("get"), None, "a document of the refused transaction exists");
    }
    assert!(nodes[0].exited().is_none(), "tallyd died");
    nodes[0].kill9();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
