//! Snapshot data as a follower decodes it on install: the Raft snapshot's data is a
//! `SnapshotEnvelope` (`pipeline/src/store_ledger.rs` `check_snapshot` and `install`) whose `state` is
//! the store's `StateSnapshot` (bound `SNAPSHOT_BYTES_MAX`), whose batch-table values are
//! `BatchRecord`s (store `install_snapshot`).
//!
//! The input is decoded both as an envelope (then its state) and directly as a `StateSnapshot`,
//! so the inner layer is reached without the fuzzer building the outer one first.
//!
//! Properties: no panic; every decoded layer re-encodes to its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::{encode, limits, BatchRecord, Tables};
use tally_failover::snapshot::SnapshotEnvelope;
use tally_store::state::StateSnapshot;

/// Store's bound for one batch record (`state.rs` `BATCH_RECORD_BYTES_MAX`).
const BATCH_RECORD_BYTES_MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = tally_codec::decode::<SnapshotEnvelope>(data, limits::FRAME_BYTES_MAX) {
        assert_eq!(encode(&env), data, "SnapshotEnvelope decode accepted a non-canonical encoding");
        state(&env.state);
    }
    state(data);
});

fn state(bytes: &[u8]) {
    let Ok(snap) = tally_codec::decode::<StateSnapshot>(bytes, usize::MAX) else { return };
    assert_eq!(encode(&snap), bytes, "StateSnapshot decode accepted a non-canonical encoding");
    let batches = Tables::v1().batches.0;
    for (k, v) in &snap.pairs {
        if k.starts_with(&batches) {
            if let Ok(r) = tally_codec::decode::<BatchRecord>(v, BATCH_RECORD_BYTES_MAX) {
                assert_eq!(&encode(&r), v, "BatchRecord decode accepted a non-canonical encoding");
            }
        }
    }
}
