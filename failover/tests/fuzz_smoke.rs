//! A stable-toolchain smoke fuzzer for the decoders behind the peer port (the nightly,
//! coverage-guided versions are `fuzz/fuzz_targets/{peer_hello,peer_message,batch_entry,snapshot}.rs`).
//!
//! Seeded random bytes and mutations of valid inputs (`codec/tests/mutate/`) go into:
//! - `handshake()` over an in-memory stream that yields the input (the remote's hello and
//!   verdict frames), and `decode::<Hello>` of the input;
//! - `Message::parse_from_bytes` (a peer frame after the handshake), then for every entry the
//!   log record round trip (`encode_entry` / `decode_entry`) and its payload: `BatchEntry` (and
//!   `check()`), `ConfChange` / `ConfChangeV2` and the `MemberAddr` context; and a snapshot's
//!   `SnapshotEnvelope` and `StateSnapshot`;
//! - `SnapshotEnvelope` / `StateSnapshot` decoding of snapshot data.
//!
//! Any panic fails the test, as does a valid input that is refused, a non-canonical borsh value
//! that is accepted, or a protobuf message that does not survive re-encoding.
//!
//! ```text
//! TALLY_FUZZ_ITERS (default 20_000)  TALLY_FUZZ_SECS (default 5)  TALLY_FUZZ_SEED (replay)
//! TALLY_FUZZ_WRITE_SEEDS=fuzz/seeds  write starting corpora for the cargo-fuzz targets instead
//! cargo test -p tally-failover --test fuzz_smoke -- --nocapture
//! ```
// raft-rs's protobuf messages are built field by field after `default()`, as in the crate itself.
#![allow(clippy::field_reassign_with_default)]
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

#[path = "../../codec/tests/mutate/mod.rs"]
mod mutate;

use mutate::{batch_entry, env_or, input, write_seeds, Rng};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot,
};
use std::io::{self, Cursor, Read, Write};
use std::time::{Duration, Instant};
use tally_codec::{encode, limits, BatchEntry, BatchRecord, Digest, Signature, Tables};
use tally_failover::frame::write_frame;
use tally_failover::handshake::{handshake, Hello, LocalPeer, Side, HANDSHAKE_BYTES_MAX, PEER_PROTOCOL_VERSION};
use tally_failover::lease::{parse_probe_context, probe_context};
use tally_failover::snapshot::SnapshotEnvelope;
use tally_failover::storage::{decode_entry, encode_entry};
use tally_failover::MemberAddr;
use tally_store::state::StateSnapshot;
use tally_store::{Applied, LogEntry};

const CLUSTER: &str = "smoke-cluster";
const FINGERPRINT: [u8; 32] = [7; 32];

// ---------------------------------------------------------------------------------------------
// Valid values.

fn member_addr(rng: &mut Rng) -> MemberAddr {
    MemberAddr { node_id: rng.interesting_u64(), client_addr: rng.text(), peer_addr: rng.text() }
}

/// What a well-behaved remote sends during the handshake: its hello, then its verdict
/// (`Verdict` is private to the handshake; borsh: tag 0 = Accept, 1 = Refuse(String)).
fn handshake_stream(rng: &mut Rng) -> Vec<u8> {
    let hello = if rng.chance(4) {
        Hello::new(&rng.text(), rng.interesting_u64(), rng.bytes())
    } else {
        Hello::new(CLUSTER, 2 + rng.below(3) as u64, FINGERPRINT)
    };
    let verdict = if rng.chance(4) {
        let mut v = vec![1u8];
        v.extend_from_slice(&encode(&rng.text()));
        v
    } else {
        vec![0u8]
    };
    let mut s = Vec::new();
    write_frame(&mut s, &encode(&hello)).unwrap();
    write_frame(&mut s, &verdict).unwrap();
    s
}

fn state_snapshot(rng: &mut Rng) -> StateSnapshot {
    let batches = Tables::v1().batches.0;
    let pairs = (0..rng.below(4))
        .map(|_| {
            if rng.chance(2) {
                let mut k = batches.to_vec();
                k.extend_from_slice(&rng.next_u64().to_be_bytes());
                let record = BatchRecord {
                    header: mutate::header(rng),
                    signature: Signature(rng.bytes()),
                    body_ref: Vec::new(),
                };
                (k, encode(&record))
            } else {
                (rng.vec(36), rng.vec(48))
            }
        })
        .collect();
    let bodies = (0..rng.below(3)).map(|_| (rng.interesting_u64(), rng.vec(64))).collect();
    StateSnapshot {
        applied: Applied {
            index: rng.interesting_u64(),
            height: rng.interesting_u64(),
            header_hash: Digest(rng.bytes()),
            state_digest: Digest(rng.bytes()),
            term: rng.interesting_u64(),
            time_ms: rng.interesting_u64(),
        },
        pairs,
        bodies,
    }
}

fn envelope(rng: &mut Rng) -> SnapshotEnvelope {
    SnapshotEnvelope {
        members: (0..rng.below(4)).map(|_| member_addr(rng)).collect(),
        revoked: (0..rng.below(3))
            .map(|_| tally_failover::revocation::Revocation {
                node_id: rng.interesting_u64(),
                cert_fingerprint: rng.bytes(),
            })
            .collect(),
        state: encode(&state_snapshot(rng)),
    }
}

fn entry(rng: &mut Rng) -> Entry {
    let mut e = Entry::default();
    e.index = rng.interesting_u64();
    e.term = rng.interesting_u64();
    match rng.below(4) {
        0 => {} // a leader's no-op
        1 => {
            e.data = {
                let consistent = !rng.chance(4);
                encode(&batch_entry(rng, consistent))
            }
            .into()
        }
        2 => {
            let mut cc = ConfChangeV2::default();
            for _ in 0..1 + rng.below(2) {
                let mut s = ConfChangeSingle::default();
                s.node_id = rng.interesting_u64();
                s.set_change_type(if rng.chance(2) { ConfChangeType::AddNode } else { ConfChangeType::RemoveNode });
                cc.mut_changes().push(s);
            }
            e.set_entry_type(EntryType::EntryConfChangeV2);
            e.data = cc.write_to_bytes().unwrap().into();
            e.context = encode(&member_addr(rng)).into();
        }
        _ => {
            let mut cc = ConfChange::default();
            cc.node_id = rng.interesting_u64();
            cc.set_change_type(ConfChangeType::AddLearnerNode);
            e.set_entry_type(EntryType::EntryConfChange);
            e.data = cc.write_to_bytes().unwrap().into();
        }
    }
    e
}

/// A peer frame body: a Raft message from node 2 to node 1.
fn message(rng: &mut Rng) -> Vec<u8> {
    let mut m = Message::default();
    m.from = 2;
    m.to = 1;
    m.term = rng.interesting_u64();
    m.index = rng.interesting_u64();
    m.log_term = rng.interesting_u64();
    m.commit = rng.interesting_u64();
    match rng.below(4) {
        0 => {
            m.set_msg_type(MessageType::MsgSnapshot);
            let mut snap = Snapshot::default();
            snap.data = encode(&envelope(rng)).into();
            snap.mut_metadata().index = rng.interesting_u64();
            snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
            m.set_snapshot(snap);
        }
        1 => {
            m.set_msg_type(MessageType::MsgHeartbeat);
            m.context = probe_context(rng.interesting_u64(), rng.interesting_u64()).into();
        }
        _ => {
            m.set_msg_type(MessageType::MsgAppend);
            m.entries = (0..rng.below(4)).map(|_| entry(rng)).collect::<Vec<_>>().into();
        }
    }
    m.write_to_bytes().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Targets. Each panics on a property violation.

/// A remote that sends `input` and swallows what this replica writes.
struct Peer<'a>(Cursor<&'a [u8]>);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn target_handshake(bytes: &[u8], valid: bool) {
    if let Ok(h) = tally_codec::decode::<Hello>(bytes, HANDSHAKE_BYTES_MAX) {
        assert_eq!(encode(&h), bytes, "Hello: accepted a non-canonical encoding");
    }
    let local = LocalPeer::fixed(CLUSTER, 1, FINGERPRINT);
    let r = handshake(&mut Peer(Cursor::new(bytes)), &local, Side::Listener);
    if let Ok(linked) = &r {
        assert!(
            local.judge(&linked.peer, linked.version, None).is_ok(),
            "handshake accepted a hello its judge refuses"
        );
    }
    let dialled =
        handshake(&mut Peer(Cursor::new(bytes)), &local, Side::Dialler { node: 2, version: PEER_PROTOCOL_VERSION });
    if let Ok(linked) = &dialled {
        assert_eq!(linked.version, PEER_PROTOCOL_VERSION, "a dialler links at the version it offered");
        assert!(
            local.judge(&linked.peer, linked.version, Some(2)).is_ok(),
            "handshake accepted a hello its judge refuses"
        );
    }
    if valid {
        // A well-formed exchange ends in a verdict, never in `Malformed`.
        assert!(
            !matches!(r, Err(tally_failover::handshake::HandshakeError::Malformed(_))),
            "a well-formed handshake was called malformed: {r:?}"
        );
    }
}

fn target_message(bytes: &[u8], valid: bool) -> bool {
    let msg = match Message::parse_from_bytes(bytes) {
        Ok(m) => m,
        Err(e) => {
            assert!(!valid, "a valid peer message was refused: {e}");
            return false;
        }
    };
    // Every known field survives re-encoding. `==` would also compare the crate's bookkeeping of
    // unknown fields, where a repeated sub-message merged at parse time leaves `Some({})` and its
    // re-parse `None` (seed 1795838781212527950); raft-rs never reads unknown fields.
    let again = Message::parse_from_bytes(&msg.write_to_bytes().unwrap()).unwrap();
    assert_eq!(
        protobuf::text_format::print_to_string(&again),
        protobuf::text_format::print_to_string(&msg),
        "a peer message did not survive re-encoding"
    );
    let _ = parse_probe_context(&msg.context);
    for e in &msg.entries {
        if let Ok(record) = encode_entry(e) {
            let back = decode_entry(&LogEntry { index: e.index, term: e.term, data: record }).unwrap();
            assert_eq!(
                (back.get_entry_type(), &back.data, &back.context),
                (e.get_entry_type(), &e.data, &e.context),
                "the log record changed an entry"
            );
        }
        match e.get_entry_type() {
            EntryType::EntryNormal if e.data.is_empty() => {}
            EntryType::EntryNormal => {
                if let Ok(b) = tally_codec::decode::<BatchEntry>(&e.data, limits::ENTRY_BYTES_MAX) {
                    let _ = b.check();
                }
            }
            EntryType::EntryConfChange => {
                let r = ConfChange::parse_from_bytes(&e.data);
                assert!(!valid || r.is_ok(), "a valid conf change was refused");
            }
            EntryType::EntryConfChangeV2 => {
                let r = ConfChangeV2::parse_from_bytes(&e.data);
                assert!(!valid || r.is_ok(), "a valid conf change was refused");
                let addr = tally_codec::decode::<MemberAddr>(&e.context, 64 * 1024);
                assert!(!valid || addr.is_ok(), "a valid conf change context was refused");
            }
        }
    }
    if msg.has_snapshot() {
        target_snapshot(&msg.get_snapshot().data, valid);
    }
    true
}

fn target_snapshot(bytes: &[u8], valid: bool) -> bool {
    let env = match tally_codec::decode::<SnapshotEnvelope>(bytes, limits::FRAME_BYTES_MAX) {
        Ok(env) => env,
        Err(e) => {
            assert!(!valid, "a valid snapshot envelope was refused: {e}");
            return target_state(bytes, false);
        }
    };
    assert_eq!(encode(&env), bytes, "SnapshotEnvelope: accepted a non-canonical encoding");
    target_state(&env.state, valid)
}

fn target_state(bytes: &[u8], valid: bool) -> bool {
    let snap = match tally_codec::decode::<StateSnapshot>(bytes, usize::MAX) {
        Ok(s) => s,
        Err(e) => {
            assert!(!valid, "a valid state snapshot was refused: {e}");
            return false;
        }
    };
    assert_eq!(encode(&snap), bytes, "StateSnapshot: accepted a non-canonical encoding");
    let batches = Tables::v1().batches.0;
    for (k, v) in &snap.pairs {
        if k.starts_with(&batches) {
            if let Ok(r) = tally_codec::decode::<BatchRecord>(v, 4096) {
                assert_eq!(&encode(&r), v, "BatchRecord: accepted a non-canonical encoding");
            }
        }
    }
    true
}

#[test]
fn fuzz_smoke() {
    let iters_max: u64 = env_or("TALLY_FUZZ_ITERS", 20_000);
    let secs: u64 = env_or("TALLY_FUZZ_SECS", 5);
    let seed: u64 = env_or(
        "TALLY_FUZZ_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    );
    let mut rng = Rng(seed);
    if write_seeds("peer_hello", 16, &mut rng, &mut handshake_stream) {
        write_seeds("peer_message", 32, &mut rng, &mut message);
        write_seeds("batch_entry", 16, &mut rng, &mut |r| {
            let consistent = !r.chance(4);
            encode(&batch_entry(r, consistent))
        });
        write_seeds("snapshot", 16, &mut rng, &mut |r| encode(&envelope(r)));
        return;
    }
    println!("fuzz_smoke: seed {seed} (replay with TALLY_FUZZ_SEED={seed}), up to {iters_max} iterations / {secs} s");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut iters, mut accepted) = (0u64, 0u64);
    while iters < iters_max && Instant::now() < deadline {
        for _ in 0..64.min(iters_max - iters) {
            iters += 1;
            match rng.below(3) {
                0 => {
                    let (bytes, valid) = input(&mut rng, &mut handshake_stream);
                    target_handshake(&bytes, valid);
                }
                1 => {
                    let (bytes, valid) = input(&mut rng, &mut message);
                    accepted += u64::from(target_message(&bytes, valid));
                }
                _ => {
                    let (bytes, valid) = input(&mut rng, &mut |r| encode(&envelope(r)));
                    accepted += u64::from(target_snapshot(&bytes, valid));
                }
            }
        }
    }
    println!("fuzz_smoke: seed {seed}: {iters} iterations, {accepted} inputs decoded, no panics");
    assert!(iters > 0);
}
