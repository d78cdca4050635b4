//! Decoding must be bounded in stack as well as in bytes. `ClientMessage::Forwarded` once held a
//! `Box<ClientMessage>`, which borsh decoded recursively without a depth limit: a frame of a few
//! hundred KB of nested `Forwarded` tags overflowed the decoding thread's stack and aborted the
//! whole process. `Forwarded` now holds a `Relayed`, which cannot hold a `Forwarded`, so one hop
//! is all the type allows (the encoding of that hop is unchanged). The other recursive types,
//! `Operation` and `Outcome`, are bounded by count: `decode_bounds.rs`.
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use tally_codec::wire::{self, ClientMessage, Envelope};

/// borsh tag of `ClientMessage::Forwarded` (its variant index).
fn forwarded_tag() -> u8 {
    let bytes = tally_codec::encode(&ClientMessage::Forwarded(tally_codec::wire::Relayed::Get {
        key: tally_codec::DocKey::from_random([1; 16]),
        stale: false,
    }));
    bytes[0]
}

#[test]
fn one_hop_of_forwarding_decodes() {
    let env = Envelope {
        id: 7,
        msg: ClientMessage::Forwarded(tally_codec::wire::Relayed::Get {
            key: tally_codec::DocKey::from_random([1; 16]),
            stale: false,
        }),
    };
    assert_eq!(wire::decode_client(&tally_codec::encode(&env)), Ok(env));
}

#[test]
fn deeply_nested_forwarding_is_refused_without_overflow() {
    let mut bytes = 7u64.to_le_bytes().to_vec();
    bytes.extend(std::iter::repeat_n(forwarded_tag(), 1_000_000));
    bytes.push(tally_codec::encode(&ClientMessage::Status)[0]);
    assert!(bytes.len() < tally_codec::limits::FRAME_BYTES_MAX, "fits in one frame");
    assert!(wire::decode_client(&bytes).is_err(), "nested forwarding must be refused");
}
