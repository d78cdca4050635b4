//! Raft entry payloads built by shape (`tally_fuzz::batch::BatchGen`): up to 64 generated
//! requests and outcomes (transactions wide past their bounds, values past the request bound),
//! a sorted write set, a header that agrees with them or not, maybe a request or outcome nested
//! 2 to 200,000 levels spliced in; then maybe mutated. Decoded as a follower judges an append
//! (`core::confirm::check_batch_entry`), as it decodes a committed entry
//! (`decode::<BatchEntry>(ENTRY_BYTES_MAX)`), and as the store reads a body back (the same bytes
//! after the header are a `BatchBody`).
//!
//! Properties: a batch decodes to its value, or is refused for exactly the first bound it
//! breaks; the follower's check passes exactly for a consistent, decodable batch of its cluster
//! above height 0; after a mutation, no panic and canonical if accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::{encode, limits, BatchBody, BatchEntry};
use tally_core::confirm::{check_batch_entry, EntryError};
use tally_fuzz::batch::BatchGen;
use tally_fuzz::{check_any, check_decode, Budget, Mutation, CLUSTER};

/// Encoded `BatchHeader` size: a body's bytes are the entry's after it.
const HEADER_BYTES: usize = 172;

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    batch: BatchGen,
    mutation: Mutation,
}

fuzz_target!(|input: Input| {
    let built = input.batch.build(&mut Budget::default());
    let mut bytes = built.bytes;
    if input.mutation.apply(&mut bytes) {
        check_any(&bytes, tally_codec::decode::<BatchEntry>(&bytes, limits::ENTRY_BYTES_MAX));
        let _ = check_batch_entry(&bytes, &CLUSTER);
        if bytes.len() >= HEADER_BYTES {
            check_any(
                &bytes[HEADER_BYTES..],
                tally_codec::decode::<BatchBody>(&bytes[HEADER_BYTES..], limits::ENTRY_BYTES_MAX),
            );
        }
        return;
    }
    let entry = built.entry;
    let decoded = tally_codec::decode::<BatchEntry>(&bytes, limits::ENTRY_BYTES_MAX);
    let body_bytes = &bytes[HEADER_BYTES..];
    let body = tally_codec::decode::<BatchBody>(body_bytes, limits::ENTRY_BYTES_MAX);
    if input.batch.deep.is_some() {
        assert_eq!(decoded.err(), built.refusal, "spliced entry");
        assert_eq!(body.err(), built.refusal, "spliced body");
    } else {
        check_decode(&bytes, decoded, &entry, built.refusal.clone());
        let value = BatchBody {
            requests: entry.requests.clone(),
            outcomes: entry.outcomes.clone(),
            write_set: entry.write_set.clone(),
        };
        assert_eq!(encode(&value), body_bytes);
        check_decode(body_bytes, body, &value, built.refusal.clone());
    }
    let judged = check_batch_entry(&bytes, &CLUSTER);
    match (&built.refusal, judged) {
        (Some(why), Err(EntryError::NotABatch(e))) => assert_eq!(&e, why),
        (Some(why), other) => panic!("expected NotABatch({why:?}), got {other:?}"),
        (None, Ok(())) => assert!(built.consistent && entry.header.height != 0, "an inconsistent batch passed"),
        (None, Err(EntryError::HeightZero)) => assert_eq!(entry.header.height, 0),
        (None, Err(EntryError::Inconsistent { .. })) => assert!(!built.consistent, "a consistent batch was refused"),
        (None, Err(e)) => panic!("unexpected refusal of a batch of this cluster: {e}"),
    }
});
