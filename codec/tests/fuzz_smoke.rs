//! A stable-toolchain smoke fuzzer for the decoders that face untrusted bytes.
//!
//! It is not coverage guided (that is what the cargo-fuzz targets in `fuzz/` are for, on
//! nightly). It feeds pseudo-random bytes and mutations of valid encodings (bit flips,
//! truncations, insertions, splices, appended bytes, tampered length fields) from one seeded RNG
//! into `wire::decode_client`, `wire::decode_server`, `SignedRequest::decode` and
//! `wire::read_frame`. Any panic fails the test; so does a successful decode whose re-encoding
//! is not the input (the encoding must be canonical), and a valid encoding that fails to decode.
//!
//! ```text
//! TALLY_FUZZ_ITERS  iterations (default 200_000)     TALLY_FUZZ_SECS  time bound (default 10)
//! TALLY_FUZZ_SEED   replay a run (printed at start; default: from the clock)
//! TALLY_FUZZ_ITERS=200000 TALLY_FUZZ_SECS=20 cargo test --release -p tally-codec --test fuzz_smoke -- --nocapture
//! ```
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::io::Cursor;
use std::time::{Duration, Instant};
use tally_codec::wire::{self, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, SubmitReply};
use tally_codec::{
    encode, limits, BatchHeader, ClusterId, Digest, DocKey, ErrorCode, Operation, Outcome, PublicKey, Receipt, Request,
    RequestId, Signature, SignedRequest,
};

/// SplitMix64: tiny, seedable, good enough to drive mutations. One seed replays one run.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.next_u64() as u8;
        }
        out
    }
    fn vec(&mut self, len_max: usize) -> Vec<u8> {
        let len = self.below(len_max + 1);
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
    /// Mostly small numbers, sometimes extremes: the values decoders branch on.
    fn interesting_u64(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(4) as u64,
            1 => u64::MAX - self.below(2) as u64,
            _ => self.next_u64(),
        }
    }
    fn text(&mut self) -> String {
        const PIECES: &[&str] = &["127.0.0.1:7000", "a", "", "é", "日本", "🦀", "\u{0}", "leader"];
        (0..self.below(4)).map(|_| PIECES[self.below(PIECES.len())]).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Valid values.

fn error_code(rng: &mut Rng) -> ErrorCode {
    const CODES: &[ErrorCode] = &[
        ErrorCode::Malformed,
        ErrorCode::BadSignature,
        ErrorCode::InsufficientFunds,
        ErrorCode::NotLeader,
        ErrorCode::Retry,
        ErrorCode::Internal,
    ];
    CODES[rng.below(CODES.len())]
}

fn request(rng: &mut Rng) -> SignedRequest {
    let op = match rng.below(3) {
        0 => Operation::Set { key: DocKey::from_random(rng.bytes()), value: rng.vec(96) },
        1 => Operation::Delete { key: DocKey(rng.bytes()) },
        _ => Operation::Transfer { to: PublicKey(rng.bytes()), amount: rng.interesting_u64() },
    };
    SignedRequest {
        request: Request {
            cluster_id: ClusterId(rng.bytes()),
            signer: PublicKey(rng.bytes()),
            nonce: rng.interesting_u64(),
            expires_at_ms: rng.interesting_u64(),
            op,
        },
        signature: Signature(rng.bytes()),
    }
}

fn outcome(rng: &mut Rng) -> Outcome {
    match rng.below(5) {
        0 => Outcome::DocCreated { revision: rng.interesting_u64() },
        1 => Outcome::DocUpdated { revision: rng.interesting_u64() },
        2 => Outcome::DocDeleted,
        3 => Outcome::Transferred { sender_balance: rng.interesting_u64() },
        _ => Outcome::Rejected(error_code(rng)),
    }
}

fn header(rng: &mut Rng) -> BatchHeader {
    BatchHeader {
        cluster_id: ClusterId(rng.bytes()),
        height: rng.interesting_u64(),
        prev_hash: Digest(rng.bytes()),
        merkle_root: Digest(rng.bytes()),
        leaf_count: rng.interesting_u64() as u32,
        write_set_digest: Digest(rng.bytes()),
        state_digest: Digest(rng.bytes()),
        term: rng.interesting_u64(),
        time_ms: rng.interesting_u64(),
    }
}

fn receipt(rng: &mut Rng) -> Receipt {
    Receipt {
        request: request(rng),
        outcome: outcome(rng),
        leaf_index: rng.interesting_u64() as u32,
        proof: (0..rng.below(6)).map(|_| Digest(rng.bytes())).collect(),
        header: header(rng),
        signature: Signature(rng.bytes()),
    }
}

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
        4 => ServerMessage::Receipt(rng.chance(2).then(|| receipt(rng))),
        5 => ServerMessage::Done,
        _ => ServerMessage::Error(wire_error(rng)),
    };
    Envelope { id: rng.interesting_u64(), msg }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Offsets of 4-byte windows that could be borsh length prefixes: their little-endian value fits
/// in the bytes after them. Real length fields are always among them.
fn length_candidates(bytes: &[u8]) -> Vec<usize> {
    (0..bytes.len().saturating_sub(3))
        .filter(|&i| {
            let v = u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
            v <= bytes.len() - i - 4
        })
        .collect()
}

fn tamper_length(rng: &mut Rng, bytes: &mut [u8]) {
    let candidates = length_candidates(bytes);
    if candidates.is_empty() {
        return;
    }
    let at = candidates[rng.below(candidates.len())];
    let old = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let new = match rng.below(9) {
        0 => old.wrapping_add(1),
        1 => old.wrapping_sub(1),
        2 => 0,
        3 => old.wrapping_mul(2),
        4 => u32::MAX,
        5 => 0x8000_0000,
        6 => (limits::FRAME_REQUESTS_MAX + 1) as u32,
        7 => limits::FRAME_BYTES_MAX as u32 + 1,
        _ => rng.next_u64() as u32,
    };
    bytes[at..at + 4].copy_from_slice(&new.to_le_bytes());
}

/// One input: random bytes, or a valid encoding (from `valid`) mutated zero or more times.
/// Returns the bytes and whether they are exactly a valid encoding.
fn input(rng: &mut Rng, valid: &mut dyn FnMut(&mut Rng) -> Vec<u8>) -> (Vec<u8>, bool) {
    if rng.chance(8) {
        return (rng.vec(1024), false);
    }
    let mut bytes = valid(rng);
    if rng.chance(8) {
        return (bytes, true);
    }
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    if !bytes.is_empty() {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= 1 << rng.below(8);
                    }
                }
            }
            1 => {
                let cut = rng.below(bytes.len() + 1);
                bytes.truncate(cut);
            }
            2 => tamper_length(rng, &mut bytes),
            3 => {
                let at = rng.below(bytes.len() + 1);
                let extra = rng.vec(8);
                bytes.splice(at..at, extra);
            }
            4 => {
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    let n = 1 + rng.below((bytes.len() - at).min(16));
                    bytes.drain(at..at + n);
                }
            }
            5 => {
                // Splice: head of this one, tail of another valid encoding.
                let other = valid(rng);
                let cut = rng.below(bytes.len() + 1);
                let from = rng.below(other.len() + 1);
                bytes.truncate(cut);
                bytes.extend_from_slice(&other[from..]);
            }
            _ => bytes.push(rng.next_u64() as u8),
        }
    }
    (bytes, false)
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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
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
            match rng.below(5) {
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
