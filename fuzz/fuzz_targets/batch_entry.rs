//! The Raft entry payload: what a follower decodes from every committed normal entry
//! (the core's confirm step, `core/src/replica.rs` `confirm_batch`: `decode::<BatchEntry>(data,
//! ENTRY_BYTES_MAX)`, after `check_batch_entry` judged it on arrival). The same bytes are also
//! parsed as the conf-change payloads a replica decodes from `EntryConfChange` /
//! `EntryConfChangeV2` entries (`core/src/replica.rs` `apply_committed`, `failover/src/config.rs`
//! `check_entry`),
//! and as the conf-change context (`MemberAddr`).
//!
//! Properties: no panic (decode and `check()` return errors); a decoded value re-encodes to its
//! input (borsh values are canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2};
use tally_codec::{encode, limits, BatchEntry};
use tally_failover::MemberAddr;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = tally_codec::decode::<BatchEntry>(data, limits::ENTRY_BYTES_MAX) {
        assert_eq!(encode(&entry), data, "BatchEntry decode accepted a non-canonical encoding");
        let _ = entry.check();
        let _ = entry.header.hash();
    }
    if let Ok(cc) = ConfChangeV2::parse_from_bytes(data) {
        let again = cc.write_to_bytes().expect("a parsed ConfChangeV2 re-encodes");
        assert_eq!(ConfChangeV2::parse_from_bytes(&again).expect("re-parse"), cc);
    }
    if let Ok(cc) = ConfChange::parse_from_bytes(data) {
        let _ = cc.get_change_type();
    }
    if let Ok(addr) = tally_codec::decode::<MemberAddr>(data, 64 * 1024) {
        assert_eq!(encode(&addr), data, "MemberAddr decode accepted a non-canonical encoding");
    }
});
