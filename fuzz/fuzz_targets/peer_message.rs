//! A peer frame after the handshake: the body is a protobuf `raft::eraftpb::Message`
//! (failover `transport.rs`: `Message::parse_from_bytes`). Then every payload a replica later
//! decodes from that message, as it does when the message is a MsgAppend / MsgSnapshot:
//!
//! ```text
//! Message ─┬─ context ──────────────▶ lease::parse_probe_context
//!          ├─ entries[i] ─▶ storage::encode_entry ─▶ decode_entry (the log record round trip)
//!          │     ├─ EntryNormal, data ≠ ∅ ─▶ decode::<BatchEntry>(ENTRY_BYTES_MAX) ─▶ check()
//!          │     ├─ EntryConfChange       ─▶ ConfChange::parse_from_bytes, context ─▶ MemberAddr
//!          │     └─ EntryConfChangeV2     ─▶ ConfChangeV2::parse_from_bytes, context ─▶ MemberAddr
//!          └─ snapshot.data ─▶ SnapshotEnvelope (FRAME_BYTES_MAX) ─▶ state ─▶ StateSnapshot
//! ```
//!
//! Properties: no panic; a parsed message re-encodes and the result parses; a log record
//! written for an entry reads back as that entry (type, data, context).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use tally_codec::{limits, BatchEntry};
use tally_failover::lease::parse_probe_context;
use tally_failover::snapshot::SnapshotEnvelope;
use tally_failover::storage::{decode_entry, encode_entry};
use tally_failover::MemberAddr;
use tally_store::state::StateSnapshot;
use tally_store::LogEntry;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::parse_from_bytes(data) else { return };
    // Not `== msg`: protobuf 2 keeps unknown fields and merges repeated singular messages, so a
    // re-parse can differ from the first parse in ways tally never sees (it does not relay peer
    // messages; entries are rewritten field by field for the log, checked below).
    let again = msg.write_to_bytes().expect("a parsed message re-encodes");
    Message::parse_from_bytes(&again).expect("a re-encoded message parses");

    let _ = parse_probe_context(&msg.context);
    let _ = msg.get_msg_type();
    for e in &msg.entries {
        log_round_trip(e);
        payload(e);
    }
    if msg.has_snapshot() {
        let snap = msg.get_snapshot();
        let _ = snap.get_metadata().get_conf_state();
        if let Ok(env) = tally_codec::decode::<SnapshotEnvelope>(&snap.data, limits::FRAME_BYTES_MAX) {
            let _ = tally_codec::decode::<StateSnapshot>(&env.state, usize::MAX);
        }
    }
});

/// The follower appends the entry to its log and reads it back on restart or for peers.
fn log_round_trip(e: &Entry) {
    let Ok(bytes) = encode_entry(e) else { return };
    let le = LogEntry { index: e.index, term: e.term, data: bytes };
    let back = decode_entry(&le).expect("a log record written for an entry decodes");
    assert_eq!(back.get_entry_type(), e.get_entry_type(), "log record changed the entry type");
    assert_eq!(back.data, e.data, "log record changed the entry data");
    assert_eq!(back.context, e.context, "log record changed the entry context");
    assert_eq!((back.index, back.term), (e.index, e.term));
}

/// What the replica decodes once the entry commits (`core/src/replica.rs` `apply_committed` and
/// `confirm_batch`).
fn payload(e: &Entry) {
    match e.get_entry_type() {
        EntryType::EntryNormal if e.data.is_empty() => {}
        EntryType::EntryNormal => {
            if let Ok(entry) = tally_codec::decode::<BatchEntry>(&e.data, limits::ENTRY_BYTES_MAX) {
                let _ = entry.check();
            }
        }
        EntryType::EntryConfChange => {
            if ConfChange::parse_from_bytes(&e.data).is_ok() {
                context(&e.context);
            }
        }
        EntryType::EntryConfChangeV2 => {
            if let Ok(cc) = ConfChangeV2::parse_from_bytes(&e.data) {
                let _ = cc.get_changes().iter().map(|c| (c.node_id, c.get_change_type())).count();
                context(&e.context);
            }
        }
    }
}

fn context(ctx: &[u8]) {
    if !ctx.is_empty() {
        let _ = tally_codec::decode::<MemberAddr>(ctx, 64 * 1024);
    }
}
