//! Snapshots built by shape (`tally_fuzz::snapshot::SnapGen`): members, revoked certificates, arbitrary pairs, batch
//! records under the batch table, and bodies of generated requests and outcomes, some with a
//! nested request or outcome spliced in; then maybe mutated. Decoded layer by layer as a
//! follower does (`pipeline/src/store_ledger.rs` `decode_envelope`: `SnapshotEnvelope` and
//! `StateSnapshot` within `SNAPSHOT_BYTES_MAX`; the store's `BatchRecord` bound; a body as a
//! `BatchBody` when it is read back).
//!
//! Properties: every layer decodes to what was built; a body is refused for exactly the bound
//! it breaks; after a mutation, no panic and canonical if accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::limits::{ENTRY_BYTES_MAX, SNAPSHOT_BYTES_MAX};
use tally_codec::{encode, BatchBody, BatchRecord};
use tally_failover::snapshot::SnapshotEnvelope;
use tally_fuzz::snapshot::SnapGen;
use tally_fuzz::{check_any, Budget, Mutation};
use tally_store::state::StateSnapshot;

/// The store's bound for one batch record (`store/src/state.rs` `BATCH_RECORD_BYTES_MAX`).
const BATCH_RECORD_BYTES_MAX: usize = 4096;

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    snapshot: SnapGen,
    mutation: Mutation,
}

fuzz_target!(|input: Input| {
    let built = input.snapshot.build(&mut Budget::default());
    let mut bytes = built.envelope;
    if input.mutation.apply(&mut bytes) {
        if let Ok(env) = tally_codec::decode::<SnapshotEnvelope>(&bytes, SNAPSHOT_BYTES_MAX) {
            assert_eq!(encode(&env), bytes, "SnapshotEnvelope decode accepted a non-canonical encoding");
            if let Ok(state) = tally_codec::decode::<StateSnapshot>(&env.state, SNAPSHOT_BYTES_MAX) {
                assert_eq!(encode(&state), env.state, "StateSnapshot decode accepted a non-canonical encoding");
                for (_, body) in &state.bodies {
                    check_any(body, tally_codec::decode::<BatchBody>(body, ENTRY_BYTES_MAX));
                }
            }
        }
        return;
    }
    let env = tally_codec::decode::<SnapshotEnvelope>(&bytes, SNAPSHOT_BYTES_MAX).expect("a built envelope decodes");
    assert_eq!(env.members, built.members);
    assert_eq!(env.revoked, built.revoked);
    let state = tally_codec::decode::<StateSnapshot>(&env.state, SNAPSHOT_BYTES_MAX).expect("a built state decodes");
    assert_eq!(state, built.state);
    for record in &built.records {
        let bytes = encode(record);
        if bytes.len() <= BATCH_RECORD_BYTES_MAX {
            assert_eq!(&tally_codec::decode::<BatchRecord>(&bytes, BATCH_RECORD_BYTES_MAX).expect("record"), record);
        }
    }
    for ((_, body), refusal) in state.bodies.iter().zip(&built.bodies) {
        let decoded = tally_codec::decode::<BatchBody>(body, ENTRY_BYTES_MAX);
        match (decoded, refusal) {
            (Ok(b), None) => assert_eq!(&encode(&b), body, "a body is not canonical"),
            (Err(e), Some(why)) => assert_eq!(&e, why),
            (got, why) => panic!("body: expected {why:?}, got {:?}", got.map(|_| "a body")),
        }
    }
});
