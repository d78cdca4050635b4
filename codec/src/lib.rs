//! Canonical bytes for everything tally hashes, signs, stores or sends.
//!
//! ```text
//!   SignedRequest ──blake3(signing bytes)──▶ RequestId
//!        │                                       │
//!        ▼ stage 4                               ▼
//!   Outcome ──leaf_hash(0x00‖id‖outcome)──▶ Merkle tree (0x01‖l‖r) ──▶ BatchHeader.merkle_root
//!                                                                       │
//!                                   header_hash(domain‖borsh(header)) ◀─┘ ──ed25519──▶ Receipt
//! ```
//!
//! This crate is pure: no I/O, no clock. All encoding is borsh; decoding is bounded by
//! [`limits`] and rejects trailing bytes. It is the only place that turns values into bytes for
//! hashing or signing, so a change here is a deliberate change of the wire and disk formats
//! (pinned by fixture hashes in the tests).
#![forbid(unsafe_code)]

pub mod admin;
pub mod batch;
mod bounded;
pub mod config;
pub mod error;
pub mod genesis;
pub mod keys;
pub mod limits;
pub mod merkle;
pub mod request;
pub mod types;
pub mod wire;

pub use batch::{
    Attached, BatchBody, BatchEntry, BatchHeader, BatchIds, BatchRecord, ClaimMeta, Committed, DocMeta, LeaseMeta,
    Outcome, Receipt, RequestLocation, WriteOp, WriteSet,
};
pub use error::{CodecError, ErrorCode};
pub use keys::{ContentKey, IntentKey, TableId, Tables};
pub use request::{Compare, Operation, Request, SignedRequest, Txn};
pub use types::{ClusterId, Digest, DocKey, PublicKey, RequestId, Signature};

use borsh::{BorshDeserialize, BorshSerialize};

/// Encodes a value canonically.
pub fn encode<T: BorshSerialize>(value: &T) -> Vec<u8> {
    borsh::to_vec(value).expect("borsh encoding into a Vec cannot fail")
}

/// Decodes a value, rejecting trailing bytes and inputs over `bytes_max`.
///
/// Every type of this crate carries its own inner bounds into its decoder (nesting depth,
/// element counts, the size of a signed request: see `docs/security.md`, "Decoders and their
/// bounds"), so no input makes decoding recurse deeper than [`limits::NESTING_DEPTH_MAX`]
/// levels of transaction or allocate ahead of the bytes it has read.
///
/// # Errors
/// [`CodecError::TooLarge`] when the input is over the bound; [`CodecError::TooDeep`],
/// [`CodecError::TooMany`] or [`CodecError::RequestTooLarge`] when an inner bound is broken;
/// [`CodecError::Malformed`] when it is not the canonical encoding of a `T` (truncated, trailing
/// bytes, invalid tag).
pub fn decode<T: BorshDeserialize>(bytes: &[u8], bytes_max: usize) -> Result<T, CodecError> {
    if bytes.len() > bytes_max {
        return Err(CodecError::TooLarge { size: bytes.len(), max: bytes_max });
    }
    T::try_from_slice(bytes).map_err(|e| bounded::codec_error(&e))
}

/// blake3 of `domain ‖ bytes`: every hash in tally is domain-separated.
pub fn hash_with_domain(domain: &[u8], bytes: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    h.update(bytes);
    Digest(*h.finalize().as_bytes())
}
