use borsh::{BorshDeserialize, BorshSerialize};
use std::fmt;

/// Errors from decoding or checking canonical bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("input of {size} bytes is over the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// A vector longer than its bound, refused on its count before any element is decoded.
    #[error("{count} {what}; at most {max}")]
    TooMany { count: usize, max: usize, what: &'static str },
    /// A recursive value nested deeper than [`crate::limits::NESTING_DEPTH_MAX`], refused before
    /// the nested part is read.
    #[error("{what} nested deeper than the limit of {max} level: a transaction may not hold a transaction")]
    TooDeep { what: &'static str, max: usize },
    /// A signed request whose encoding is over [`crate::limits::REQUEST_BYTES_MAX`], refused
    /// when its decoder reached the bound.
    #[error("a signed request is over the limit of {max} bytes encoded")]
    RequestTooLarge { max: usize },
    #[error("malformed encoding: {0}")]
    Malformed(String),
    #[error("Key is not a proper UUID4")]
    NotUuid4,
    #[error("invalid hex: {0}")]
    BadHex(String),
    #[error("receipt does not verify: {0}")]
    ReceiptInvalid(&'static str),
    /// The Merkle proof is not exactly as long as the leaf's path calls for (see
    /// [`crate::merkle::proof_len`]): one receipt has one byte form.
    #[error(
        "receipt does not verify: Merkle proof has {hashes} hashes; leaf {leaf_index} of {leaf_count} needs exactly {expected}"
    )]
    ProofLength { hashes: usize, leaf_index: u32, leaf_count: u32, expected: usize },
    /// The request had expired by its batch's header time; an honest operator refuses such a
    /// request before executing it, so it never signs a batch holding one.
    #[error("receipt does not verify: request expired at {expires_at_ms} ms, before its batch's header time {header_time_ms} ms")]
    ExpiredBeforeBatch { expires_at_ms: u64, header_time_ms: u64 },
    /// The receipt is genuine but for another cluster than the one asked for (two clusters may
    /// share an operator key).
    #[error("receipt does not verify: it is a receipt of cluster {got}, not of cluster {expected}")]
    WrongCluster { expected: crate::ClusterId, got: crate::ClusterId },
}

/// Why a request was refused, at any stage. Stable on the wire: append only.
///
/// Stage 2 and 3 refusals are answered at once and never enter a batch; stage 4 refusals are
/// executed (the id is consumed) and carried in the batch as [`crate::Outcome::Rejected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, BorshSerialize, BorshDeserialize)]
#[borsh(use_discriminant = true)]
#[repr(u8)]
#[non_exhaustive]
pub enum ErrorCode {
    Malformed = 0,
    BadSignature = 1,
    WeakKey = 2,
    Expired = 3,
    ExpiryTooFar = 4,
    NotUuid4 = 5,
    InvalidJson = 6,
    ValueTooLarge = 7,
    InsufficientFunds = 8,
    ZeroAmount = 9,
    TransferToSelf = 10,
    NotOwner = 11,
    NotFound = 12,
    WrongCluster = 13,
    NotLeader = 14,
    Overloaded = 15,
    /// Leadership was lost before the batch committed: retry the same bytes.
    Retry = 16,
    TooManyRequests = 17,
    Internal = 18,
    /// Only an admin key named in the configuration may do this.
    NotAuthorized = 19,
    /// The replica's disk is full (or its log failed): it stepped down; retry elsewhere.
    StorageFull = 20,
    /// The request alone is bigger than a batch may be.
    ProposalTooLarge = 21,
    /// The peer was too slow or idle too long.
    Timeout = 22,
    /// This replica's log failed (fsync error); it stepped down and serves no writes.
    LogFailed = 23,
    /// The lease does not exist or has ended.
    LeaseNotFound = 24,
    /// The lease is another key's.
    NotLeaseHolder = 25,
    /// A lease TTL outside the allowed range.
    TtlOutOfRange = 26,
    /// A claim domain that is empty, too long or not `[A-Za-z0-9._:/-]`.
    BadClaimDomain = 27,
    /// A transaction that nests another or is over its item bound.
    BadTxn = 28,
    /// The lease has as many attachments as it may hold.
    LeaseFull = 29,
    /// The history asked for is no longer on this replica (it installed a snapshot).
    Compacted = 30,
    /// An admin command this replica already took (a replay within its validity).
    Duplicate = 31,
    /// The signed request's encoding is over `limits::REQUEST_BYTES_MAX` (69,632 bytes), e.g.
    /// a transaction whose values together pass it.
    RequestTooLarge = 32,
}

impl ErrorCode {
    /// Whether resending the same bytes later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::Overloaded
                | ErrorCode::Retry
                | ErrorCode::StorageFull
                | ErrorCode::LogFailed
        )
    }

    /// The variant's name (a metric label: `tally_refused_total{reason="InsufficientFunds"}`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "Malformed",
            ErrorCode::BadSignature => "BadSignature",
            ErrorCode::WeakKey => "WeakKey",
            ErrorCode::Expired => "Expired",
            ErrorCode::ExpiryTooFar => "ExpiryTooFar",
            ErrorCode::NotUuid4 => "NotUuid4",
            ErrorCode::InvalidJson => "InvalidJson",
            ErrorCode::ValueTooLarge => "ValueTooLarge",
            ErrorCode::InsufficientFunds => "InsufficientFunds",
            ErrorCode::ZeroAmount => "ZeroAmount",
            ErrorCode::TransferToSelf => "TransferToSelf",
            ErrorCode::NotOwner => "NotOwner",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::WrongCluster => "WrongCluster",
            ErrorCode::NotLeader => "NotLeader",
            ErrorCode::Overloaded => "Overloaded",
            ErrorCode::Retry => "Retry",
            ErrorCode::TooManyRequests => "TooManyRequests",
            ErrorCode::Internal => "Internal",
            ErrorCode::NotAuthorized => "NotAuthorized",
            ErrorCode::StorageFull => "StorageFull",
            ErrorCode::ProposalTooLarge => "ProposalTooLarge",
            ErrorCode::Timeout => "Timeout",
            ErrorCode::LogFailed => "LogFailed",
            ErrorCode::LeaseNotFound => "LeaseNotFound",
            ErrorCode::NotLeaseHolder => "NotLeaseHolder",
            ErrorCode::TtlOutOfRange => "TtlOutOfRange",
            ErrorCode::BadClaimDomain => "BadClaimDomain",
            ErrorCode::BadTxn => "BadTxn",
            ErrorCode::LeaseFull => "LeaseFull",
            ErrorCode::Compacted => "Compacted",
            ErrorCode::Duplicate => "Duplicate",
            ErrorCode::RequestTooLarge => "RequestTooLarge",
        }
    }

    /// The message a user sees.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed request",
            ErrorCode::BadSignature => "bad signature",
            ErrorCode::WeakKey => "weak (small-order) public key",
            ErrorCode::Expired => "request expired",
            ErrorCode::ExpiryTooFar => "request expiry is too far in the future",
            ErrorCode::NotUuid4 => "Key is not a proper UUID4",
            ErrorCode::InvalidJson => "value is not valid JSON",
            ErrorCode::ValueTooLarge => "value is over the size limit",
            ErrorCode::InsufficientFunds => "insufficient funds",
            ErrorCode::ZeroAmount => "amount must be greater than zero",
            ErrorCode::TransferToSelf => "transfer to self",
            ErrorCode::NotOwner => "document is owned by another key",
            ErrorCode::NotFound => "Not found",
            ErrorCode::WrongCluster => "request is for another cluster",
            ErrorCode::NotLeader => "this replica is not the leader",
            ErrorCode::Overloaded => "server overloaded, retry later",
            ErrorCode::Retry => "leadership changed before commit; retry",
            ErrorCode::TooManyRequests => "too many requests in one frame",
            ErrorCode::Internal => "internal error",
            ErrorCode::NotAuthorized => "not authorized: this needs an admin key named in the cluster configuration",
            ErrorCode::StorageFull => "the replica's disk is full; it stepped down, retry at the new leader",
            ErrorCode::ProposalTooLarge => "request is larger than a whole batch may be",
            ErrorCode::Timeout => "timed out",
            ErrorCode::LogFailed => "the replica's log failed; it stepped down, retry at the new leader",
            ErrorCode::LeaseNotFound => "lease not found: it never existed, was revoked or has expired",
            ErrorCode::NotLeaseHolder => "the lease is held by another key",
            ErrorCode::TtlOutOfRange => "lease TTL out of range (500 ms to 24 h)",
            ErrorCode::BadClaimDomain => "claim domain must be 1 to 64 characters of A-Z a-z 0-9 . _ : / -",
            ErrorCode::BadTxn => {
                "transaction refused: at most 32 comparisons and 32 operations per branch, none a transaction"
            }
            ErrorCode::LeaseFull => "the lease already has 1024 documents and claims attached",
            ErrorCode::Compacted => "that history is compacted on this replica",
            ErrorCode::Duplicate => "this admin command was already taken; sign a new one",
            ErrorCode::RequestTooLarge => {
                "signed request is over 69632 bytes encoded (a transaction's values together must fit it)"
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}
