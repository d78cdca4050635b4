//! A stable-toolchain smoke fuzzer for the decoders that face untrusted bytes.
//!
//! It is not coverage guided (that is what the cargo-fuzz targets in `fuzz/` are for, on
//! nightly). It feeds pseudo-random bytes and mutations of valid encodings (bit flips,
//! truncations, insertions, splices, appended bytes, tampered length fields) from one seeded RNG
//! into `wire::decode_client`, `wire::decode_server`, `SignedRequest::decode`,
//! `wire::read_frame`, the Raft entry payload (`BatchEntry` decode, then `check()`) and receipts
//! (`Receipt` decode, then `verify()`). Any panic fails the test; so does a successful decode
//! whose re-encoding is not the input (the encoding must be canonical), a valid encoding that
//! fails to decode, and a valid signed receipt that fails to verify. The RNG and mutations are in
//! `mutate/`, shared with the smoke fuzzers of `failover` and `client`.
//!
//! ```text
//! TALLY_FUZZ_ITERS  iterations (default 200_000)     TALLY_FUZZ_SECS  time bound (default 10)
//! TALLY_FUZZ_SEED   replay a run (printed at start; default: from the clock)
//! TALLY_FUZZ_ITERS=200000 TALLY_FUZZ_SECS=20 cargo test --release -p tally-codec --test fuzz_smoke -- --nocapture
//! ```
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

mod mutate;

use ed25519_dalek::SigningKey;
use mutate::{batch_entry, env_or, error_code, input, receipt, request, Rng};
use std::io::Cursor;
use std::time::{Duration, Instant};
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::wire::{self, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, SubmitReply};
use tally_codec::{encode, limits, BatchEntry, ClusterId, DocKey, PublicKey, Receipt, RequestId, SignedRequest};

// ---------------------------------------------------------------------------------------------
// Valid values.

fn wire_error(rng: &mut Rng) -> wire::WireError {
    let mut e = wire::WireError::from_code(error_code(rng));
    if rng.chance(2) {
        e.leader_hint = Some(rng.text());
    }
    e
}

fn client_envelope(rng: &mut Rng) -> Envelope<ClientMessage> {
    let msg = match rng.below(7) {
        0 | 1 => ClientMessage::Submit((0..rng.below(5)).map(|_| request(rng)).collect()),
        2 => ClientMessage::Get { key: DocKey(rng.bytes()), stale: rng.chance(2) },
        3 => ClientMessage::Balance { account: PublicKey(rng.bytes()), stale: rng.chance(2) },
        4 => ClientMessage::Status,
        5 => ClientMessage::Receipt { id: RequestId(rng.bytes()) },
        _ if rng.chance(2) => {
            ClientMessage::ClusterAdd { node_id: rng.interesting_u64(), client_addr: rng.text(), peer_addr: rng.text() }
        }
        _ => match rng.below(3) {
            0 => ClientMessage::ClusterRemove { node_id: rng.interesting_u64() },
            1 => ClientMessage::Batch { height: rng.interesting_u64() },
            _ => ClientMessage::Audit,
        },
    };
    // One hop of forwarding, as a follower relays it.
    let msg = if rng.chance(6) {
        tally_codec::wire::Relayed::from_client(msg).map_or_else(|m| m, ClientMessage::Forwarded)
    } else {
        msg
    };
    Envelope { id: rng.interesting_u64(), msg }
}

fn server_envelope(rng: &mut Rng) -> Envelope<ServerMessage> {
    let msg = match rng.below(7) {
        0 => ServerMessage::Submitted(
            (0..rng.below(3))
                .map(|_| {
                    if rng.chance(2) {
                        SubmitReply::Committed { receipt: Box::new(receipt(rng)), durable_replicas: rng.below(4) as u8 }
                    } else {
                        SubmitReply::Refused(wire_error(rng))
                    }
                })
                .collect(),
        ),
        1 => ServerMessage::Doc(rng.chance(2).then(|| DocView {
            owner: PublicKey(rng.bytes()),
            revision: rng.interesting_u64(),
            value: rng.vec(64),
        })),
        2 => ServerMessage::Balance(rng.chance(2).then(|| rng.interesting_u64())),
        3 => ServerMessage::Status(StatusInfo {
            node_id: rng.interesting_u64(),
            cluster_id: ClusterId(rng.bytes()),
            operator_key: PublicKey(rng.bytes()),
            leader_id: rng.chance(2).then(|| rng.interesting_u64()),
            leader_addr: rng.chance(2).then(|| rng.text()),
            term: rng.interesting_u64(),
            committed_height: rng.interesting_u64(),
            applied_height: rng.interesting_u64(),
            replicas_configured: rng.below(7) as u32,
            members: (0..rng.below(4))
                .map(|_| MemberInfo {
                    node_id: rng.interesting_u64(),
                    client_addr: rng.text(),
                    peer_addr: rng.text(),
                    matched_index: rng.interesting_u64(),
                    is_voter: rng.chance(2),
                })
                .collect(),
            warnings: (0..rng.below(3)).map(|_| rng.text()).collect(),
            time_ms: rng.interesting_u64(),
        }),
        4 => ServerMessage::Receipt(rng.chance(2).then(|| Box::new(receipt(rng)))),
        5 => ServerMessage::Done,
        _ => ServerMessage::Error(wire_error(rng)),
    };
    Envelope { id: rng.interesting_u64(), msg }
}

/// The operator key `signed_receipt` signs with.
fn operator_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn operator_public() -> PublicKey {
    PublicKey(operator_key().verifying_key().to_bytes())
}

/// A receipt that verifies against [`operator_public`]: a signed request, a Merkle proof into a
/// small batch, and the operator's header signature.
fn signed_receipt(rng: &mut Rng) -> Receipt {
    let user = SigningKey::from_bytes(&rng.bytes());
    let mut request = request(rng);
    request.request.signer = PublicKey(user.verifying_key().to_bytes());
    let request = request.request.sign(&user);
    let n = 1 + rng.below(5);
    let at = rng.below(n);
    let outcome = mutate::outcome(rng);
    let leaves: Vec<[u8; 32]> =
        (0..n).map(|i| if i == at { leaf_hash(&request.id(), &outcome) } else { rng.bytes() }).collect();
    let tree = Tree::from_leaves(&leaves);
    let mut header = mutate::header(rng);
    header.cluster_id = request.request.cluster_id;
    header.merkle_root = tree.root();
    header.leaf_count = n as u32;
    // An honest operator never signs a request that expired before its batch.
    header.time_ms = header.time_ms.min(request.request.expires_at_ms);
    let signature = header.sign(&operator_key());
    Receipt { request, outcome, leaf_index: at as u32, proof: tree.proof(at), header, signature }
}

// ---------------------------------------------------------------------------------------------
// Targets. Each panics on a property violation.

fn check_decoded<T: borsh::BorshSerialize, E: std::fmt::Debug>(
    what: &str,
    bytes: &[u8],
    was_valid: bool,
    r: Result<T, E>,
) {
    match r {
        Ok(v) => assert_eq!(encode(&v), bytes, "{what}: accepted a non-canonical encoding"),
        Err(e) => assert!(!was_valid, "{what}: a valid encoding was refused: {e:?}"),
    }
}

/// Reads frames from `stream` until the end or an error; each body read must be exactly the
/// bytes after its length prefix, and is handed to `decode_client`.
fn target_frames(stream: &[u8], frame_bytes_max: usize) {
    let mut cursor = Cursor::new(stream);
    let mut buf = Vec::new();
    for _ in 0..64 {
        let start = cursor.position() as usize;
        match wire::read_frame(&mut cursor, &mut buf, frame_bytes_max) {
            Ok(true) => {
                let end = cursor.position() as usize;
                assert!(buf.len() <= frame_bytes_max, "frame over the limit was returned");
                let mut again = Vec::new();
                wire::write_frame(&mut again, &buf).unwrap();
                assert_eq!(&again[..], &stream[start..end], "read_frame is not the inverse of write_frame");
                let _ = wire::decode_client(&buf);
            }
            Ok(false) => {
                assert_eq!(start, stream.len(), "clean end reported before the end");
                return;
            }
            Err(_) => return,
        }
    }
}

#[test]
fn fuzz_smoke() {
    let iters_max: u64 = env_or("TALLY_FUZZ_ITERS", 200_000);
    let secs: u64 = env_or("TALLY_FUZZ_SECS", 10);
    let seed: u64 = env_or(
        "TALLY_FUZZ_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    );
    println!("fuzz_smoke: seed {seed} (replay with TALLY_FUZZ_SEED={seed}), up to {iters_max} iterations / {secs} s");
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut iters, mut accepted) = (0u64, 0u64);
    while iters < iters_max && Instant::now() < deadline {
        // Check the clock only every so often; the loop body is microseconds.
        for _ in 0..64.min(iters_max - iters) {
            iters += 1;
            match rng.below(7) {
                0 => {
                    let (bytes, valid) = input(&mut rng, &mut |r| encode(&client_envelope(r)));
                    let r = wire::decode_client(&bytes);
                    accepted += u64::from(r.is_ok());
                    check_decoded("decode_client", &bytes, valid, r);
                }
                1 => {
                    let (bytes, valid) = input(&mut rng, &mut |r| encode(&server_envelope(r)));
                    let r = wire::decode_server(&bytes);
                    accepted += u64::from(r.is_ok());
                    check_decoded("decode_server", &bytes, valid, r);
                }
                2 => {
                    let (bytes, valid) = input(&mut rng, &mut |r| request(r).encode());
                    let r = SignedRequest::decode(&bytes);
                    accepted += u64::from(r.is_ok());
                    check_decoded("SignedRequest::decode", &bytes, valid, r);
                }
                3 => {
                    // A Raft entry payload, as a follower decodes and checks it (stage 6).
                    let (bytes, valid) = input(&mut rng, &mut |r| {
                        let consistent = !r.chance(4);
                        encode(&batch_entry(r, consistent))
                    });
                    let r = tally_codec::decode::<BatchEntry>(&bytes, limits::ENTRY_BYTES_MAX);
                    if let Ok(entry) = &r {
                        let _ = entry.check();
                    }
                    accepted += u64::from(r.is_ok());
                    check_decoded("BatchEntry decode", &bytes, valid, r);
                }
                4 => {
                    // A receipt, as a client decodes and verifies it (node reply or receipt file).
                    let (bytes, valid) = input(&mut rng, &mut |r| encode(&signed_receipt(r)));
                    let r = tally_codec::decode::<Receipt>(&bytes, limits::FRAME_BYTES_MAX);
                    if let Ok(receipt) = &r {
                        let verified = receipt.verify(&operator_public());
                        assert!(!valid || verified.is_ok(), "a valid receipt failed to verify: {verified:?}");
                    }
                    accepted += u64::from(r.is_ok());
                    check_decoded("Receipt decode", &bytes, valid, r);
                }
                _ => {
                    // A stream of a few frames, mutated as a whole (length prefixes included).
                    let (stream, _) = input(&mut rng, &mut |r| {
                        let mut s = Vec::new();
                        for _ in 0..1 + r.below(3) {
                            wire::write_frame(&mut s, &encode(&client_envelope(r))).unwrap();
                        }
                        s
                    });
                    let limit = if rng.chance(2) { limits::FRAME_BYTES_MAX } else { 1 + rng.below(512) };
                    target_frames(&stream, limit);
                }
            }
        }
    }
    println!("fuzz_smoke: seed {seed}: {iters} iterations, {accepted} inputs decoded, no panics");
    assert!(iters > 0);
}
