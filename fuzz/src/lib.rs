//! Structure-aware inputs for the `structured_*` fuzz targets: `arbitrary` turns libFuzzer's
//! bytes into shapes, so mutations change what a value holds rather than break its tags and
//! lengths (random bytes almost never build a transaction nested two levels, let alone 5,000).
//!
//! ```text
//!  fuzz bytes ─arbitrary─▶ generator ─┬─ value, valid by construction (wide: many requests,
//!                                     │   values up to and past 64 KiB, long lists), with what
//!                                     │   decoding it must give known in advance
//!                                     └─ byte shape no value can be (nesting 2..200,000 levels,
//!                                         counts past their bound), spliced where a value goes,
//!                                         whose refusal is known in advance too
//!            then an optional Mutation (flip, cut, insert, append): near-valid bytes, for which
//!            only "no panic, and canonical when accepted" is asserted
//! ```
//!
//! The decoders are the production ones (`tally_codec::decode`, `wire::decode_client`,
//! `core::confirm::check_batch_entry`, the receipt file path, the snapshot chain).
#![forbid(unsafe_code)]

use arbitrary::Arbitrary;
use borsh::BorshSerialize;
use ed25519_dalek::SigningKey;
use std::sync::LazyLock;
use tally_codec::{
    encode, limits, BatchHeader, ClusterId, CodecError, Compare, Digest, DocKey, ErrorCode, Operation, Outcome,
    PublicKey, Request, Signature, SignedRequest, Txn,
};

pub mod batch;
pub mod shapes;
pub mod snapshot;

pub use shapes::{Deep, DeepKind, Mutation};

/// The cluster every generated request and header names.
pub const CLUSTER: ClusterId = ClusterId([0x11; 16]);

/// The keys `[s; 32]` for every byte `s`, derived once: deriving a public key per execution
/// took a fifth of the receipt target's time.
static KEYS: LazyLock<Vec<SigningKey>> = LazyLock::new(|| (0..=255u8).map(|s| SigningKey::from_bytes(&[s; 32])).collect());

/// The signing key `[seed; 32]`.
pub fn key(seed: u8) -> &'static SigningKey {
    &KEYS[usize::from(seed)]
}

/// The operator key generated receipts are signed with.
pub fn operator_key() -> &'static SigningKey {
    key(1)
}

/// The operator's public key.
pub fn operator() -> PublicKey {
    PublicKey(operator_key().verifying_key().to_bytes())
}

/// Bytes of document values one input may generate in all: room for several requests past
/// their bound, while every execution stays around a millisecond however the fuzzer combines
/// wide values.
pub const GENERATED_VALUE_BYTES_MAX: usize = 512 << 10;

/// What is left of [`GENERATED_VALUE_BYTES_MAX`] for one input.
pub struct Budget(pub usize);

impl Default for Budget {
    fn default() -> Self {
        Budget(GENERATED_VALUE_BYTES_MAX)
    }
}

/// A document value: a few bytes of the input, or a wide one (up to 8 KiB past the document
/// bound, so the request bound is reached and passed) from five.
#[derive(Arbitrary, Debug, Clone)]
pub enum Value {
    Small(Vec<u8>),
    Wide { len: u32, fill: u8 },
}

impl Value {
    pub fn bytes(&self, budget: &mut Budget) -> Vec<u8> {
        match self {
            Value::Small(b) => b.clone(),
            Value::Wide { len, fill } => {
                let len = (*len as usize % (limits::VALUE_BYTES_MAX + 8192 + 1)).min(budget.0);
                budget.0 -= len;
                vec![*fill; len]
            }
        }
    }
}

/// Any operation that is not a transaction: what a transaction's branches hold.
#[derive(Arbitrary, Debug, Clone)]
pub enum LeafOp {
    Set { key: [u8; 16], value: Value },
    Delete { key: [u8; 16] },
    Transfer { to: [u8; 32], amount: u64 },
    SetIf { key: [u8; 16], value: Value, if_revision: Option<u64>, lease: Option<u64> },
    DeleteIf { key: [u8; 16], if_revision: Option<u64> },
    LeaseGrant { ttl_ms: u64 },
    LeaseKeepAlive { lease: u64 },
    LeaseRevoke { lease: u64 },
    Claim { domain: String, slot: u64, lease: Option<u64> },
}

impl LeafOp {
    pub fn build(&self, budget: &mut Budget) -> Operation {
        match self {
            LeafOp::Set { key, value } => Operation::Set { key: DocKey(*key), value: value.bytes(budget) },
            LeafOp::Delete { key } => Operation::Delete { key: DocKey(*key) },
            LeafOp::Transfer { to, amount } => Operation::Transfer { to: PublicKey(*to), amount: *amount },
            LeafOp::SetIf { key, value, if_revision, lease } => Operation::SetIf {
                key: DocKey(*key),
                value: value.bytes(budget),
                if_revision: *if_revision,
                lease: *lease,
            },
            LeafOp::DeleteIf { key, if_revision } => {
                Operation::DeleteIf { key: DocKey(*key), if_revision: *if_revision }
            }
            LeafOp::LeaseGrant { ttl_ms } => Operation::LeaseGrant { ttl_ms: *ttl_ms },
            LeafOp::LeaseKeepAlive { lease } => Operation::LeaseKeepAlive { lease: *lease },
            LeafOp::LeaseRevoke { lease } => Operation::LeaseRevoke { lease: *lease },
            LeafOp::Claim { domain, slot, lease } => {
                Operation::Claim { domain: domain.clone(), slot: *slot, lease: *lease }
            }
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Cmp {
    Revision { key: [u8; 16], revision: u64 },
    Exists { key: [u8; 16] },
    BalanceAtLeast { account: [u8; 32], amount: u64 },
    LeaseAlive { lease: u64 },
}

impl Cmp {
    pub fn build(&self) -> Compare {
        match self {
            Cmp::Revision { key, revision } => Compare::Revision { key: DocKey(*key), revision: *revision },
            Cmp::Exists { key } => Compare::Exists { key: DocKey(*key) },
            Cmp::BalanceAtLeast { account, amount } => {
                Compare::BalanceAtLeast { account: PublicKey(*account), amount: *amount }
            }
            Cmp::LeaseAlive { lease } => Compare::LeaseAlive { lease: *lease },
        }
    }
}

/// An operation: a leaf, or a transaction of leaves (one level, the most a valid value has),
/// widened by copies of its first operations past the item bound (stage 2's to refuse).
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    Leaf(LeafOp),
    Txn { compares: Vec<Cmp>, then: Vec<LeafOp>, otherwise: Vec<LeafOp>, copies: u8 },
}

impl Op {
    pub fn build(&self, budget: &mut Budget) -> Operation {
        match self {
            Op::Leaf(l) => l.build(budget),
            Op::Txn { compares, then, otherwise, copies } => {
                let widen = |ops: &[LeafOp], budget: &mut Budget| -> Vec<Operation> {
                    let mut out: Vec<Operation> = ops.iter().map(|o| o.build(budget)).collect();
                    if let Some(first) = ops.first() {
                        out.extend((0..*copies % 65).map(|_| first.build(budget)));
                    }
                    out
                };
                Operation::Txn(Txn {
                    compares: compares.iter().map(Cmp::build).collect(),
                    then: widen(then, budget),
                    otherwise: widen(otherwise, budget),
                })
            }
        }
    }
}

/// A signed request (really signed when `sign`: verification is reached; otherwise its
/// signature is made up, which decoding does not look at).
#[derive(Arbitrary, Debug, Clone)]
pub struct Req {
    pub signer: u8,
    pub nonce: u64,
    pub expires_at_ms: u64,
    pub op: Op,
    pub sign: bool,
}

impl Req {
    pub fn build(&self, budget: &mut Budget) -> SignedRequest {
        let key = key(self.signer);
        let request = Request {
            cluster_id: CLUSTER,
            signer: PublicKey(key.verifying_key().to_bytes()),
            nonce: self.nonce,
            expires_at_ms: self.expires_at_ms,
            op: self.op.build(budget),
        };
        if self.sign {
            request.sign(key)
        } else {
            SignedRequest { request, signature: Signature([0x5a; 64]) }
        }
    }
}

/// A small valid request: what `copies` repeat to pass a count bound cheaply.
pub fn small_request(nonce: u64) -> SignedRequest {
    SignedRequest {
        request: Request {
            cluster_id: CLUSTER,
            signer: PublicKey([0x22; 32]),
            nonce,
            expires_at_ms: u64::MAX,
            op: Operation::LeaseRevoke { lease: nonce },
        },
        signature: Signature([0x33; 64]),
    }
}

/// An outcome that is not a transaction's.
#[derive(Arbitrary, Debug, Clone)]
pub enum LeafOut {
    DocCreated(u64),
    DocUpdated(u64),
    DocDeleted,
    Transferred(u64),
    Rejected(u8),
    RevisionMismatch(u64),
    LeaseGranted(u64, u64),
    LeaseRenewed(u64),
    LeaseRevoked,
    ClaimGranted(u64),
    ClaimDenied([u8; 32], u64),
}

impl LeafOut {
    pub fn build(&self) -> Outcome {
        match self {
            LeafOut::DocCreated(revision) => Outcome::DocCreated { revision: *revision },
            LeafOut::DocUpdated(revision) => Outcome::DocUpdated { revision: *revision },
            LeafOut::DocDeleted => Outcome::DocDeleted,
            LeafOut::Transferred(b) => Outcome::Transferred { sender_balance: *b },
            // Through the decoder: every byte that is a code, and a fallback for those that are not.
            LeafOut::Rejected(c) => {
                Outcome::Rejected(tally_codec::decode::<ErrorCode>(&[*c % 40], 1).unwrap_or(ErrorCode::Malformed))
            }
            LeafOut::RevisionMismatch(c) => Outcome::RevisionMismatch { current: *c },
            LeafOut::LeaseGranted(lease, at) => Outcome::LeaseGranted { lease: *lease, expires_at_ms: *at },
            LeafOut::LeaseRenewed(at) => Outcome::LeaseRenewed { expires_at_ms: *at },
            LeafOut::LeaseRevoked => Outcome::LeaseRevoked,
            LeafOut::ClaimGranted(height) => Outcome::ClaimGranted { height: *height },
            LeafOut::ClaimDenied(holder, height) => {
                Outcome::ClaimDenied { holder: PublicKey(*holder), height: *height }
            }
        }
    }
}

/// An outcome: a leaf, or a transaction's (one level), widened past `TXN_ITEMS_MAX` by copies.
#[derive(Arbitrary, Debug, Clone)]
pub enum Out {
    Leaf(LeafOut),
    TxnApplied { then: bool, outcomes: Vec<LeafOut>, copies: u8 },
}

impl Out {
    pub fn build(&self) -> Outcome {
        match self {
            Out::Leaf(l) => l.build(),
            Out::TxnApplied { then, outcomes, copies } => {
                let mut out: Vec<Outcome> = outcomes.iter().map(LeafOut::build).collect();
                if let Some(first) = outcomes.first() {
                    out.extend((0..*copies % 65).map(|_| first.build()));
                }
                Outcome::TxnApplied { then: *then, outcomes: out }
            }
        }
    }
}

/// A batch header of [`CLUSTER`] (the fields a generator does not compute).
#[derive(Arbitrary, Debug, Clone)]
pub struct Header {
    pub height: u64,
    pub prev_hash: [u8; 32],
    pub state_digest: [u8; 32],
    pub term: u64,
    pub time_ms: u64,
}

impl Header {
    pub fn build(&self, merkle_root: Digest, leaf_count: u32, write_set_digest: Digest) -> BatchHeader {
        BatchHeader {
            cluster_id: CLUSTER,
            height: self.height,
            prev_hash: Digest(self.prev_hash),
            merkle_root,
            leaf_count,
            write_set_digest,
            state_digest: Digest(self.state_digest),
            term: self.term,
            time_ms: self.time_ms,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What decoding must give.

/// The refusal a well-formed encoding of `r` must get where a new request arrives (a frame, a
/// relayed frame, a receipt), if any: it is decoded within `REQUEST_BYTES_MAX` there.
pub fn request_refusal(r: &SignedRequest) -> Option<CodecError> {
    (encoded_len(r) > limits::REQUEST_BYTES_MAX)
        .then_some(CodecError::RequestTooLarge { max: limits::REQUEST_BYTES_MAX })
}

/// The refusal a well-formed encoding of `r` must get inside a committed batch (a Raft entry, a
/// stored body, a snapshot): history may hold requests up to
/// [`limits::COMMITTED_REQUEST_BYTES_MAX`], written before the request bound was enforced.
pub fn committed_request_refusal(r: &SignedRequest) -> Option<CodecError> {
    (encoded_len(r) > limits::COMMITTED_REQUEST_BYTES_MAX)
        .then_some(CodecError::RequestTooLarge { max: limits::COMMITTED_REQUEST_BYTES_MAX })
}

/// The refusal a well-formed encoding of `o` must get, if any.
pub fn outcome_refusal(o: &Outcome) -> Option<CodecError> {
    match o {
        Outcome::TxnApplied { outcomes, .. } if outcomes.len() > limits::TXN_ITEMS_MAX => Some(CodecError::TooMany {
            count: outcomes.len(),
            max: limits::TXN_ITEMS_MAX,
            what: "outcomes in one transaction",
        }),
        _ => None,
    }
}

pub fn encoded_len<T: BorshSerialize>(v: &T) -> usize {
    borsh::object_length(v).expect("borsh length of a value in memory")
}

/// Decoding a value's own encoding gives the value back, or exactly `refusal` when it breaks a
/// bound; then the encoding must be canonical (`encode ∘ decode = id`).
pub fn check_decode<T>(bytes: &[u8], decoded: Result<T, CodecError>, value: &T, refusal: Option<CodecError>)
where
    T: BorshSerialize + PartialEq + std::fmt::Debug,
{
    match (decoded, refusal) {
        (Ok(v), None) => {
            assert!(v == *value, "decoded value differs from the one encoded");
            assert_eq!(encode(&v), bytes, "not canonical");
        }
        (Err(e), Some(expected)) => assert_eq!(e, expected, "refused for another reason"),
        (got, expected) => panic!("expected {expected:?}, got {:?}", got.map(|_| "a value")),
    }
}

/// Bytes that may not be a valid encoding: anything but a panic is fine, and an accepted one
/// must re-encode to exactly its input.
pub fn check_any<T: BorshSerialize>(bytes: &[u8], decoded: Result<T, CodecError>) {
    if let Ok(v) = decoded {
        assert_eq!(encode(&v), bytes, "a decoder accepted a non-canonical encoding");
    }
}
