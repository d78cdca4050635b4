//! Batches, their headers, write sets and receipts.

use crate::merkle::{leaf_hash, proof_len, verify_proof};
use crate::{
    encode, hash_with_domain, ClusterId, CodecError, Digest, ErrorCode, PublicKey, RequestId, Signature, SignedRequest,
};
use borsh::{BorshDeserialize, BorshSerialize};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

pub const HEADER_DOMAIN: &[u8] = b"tally/header/v1\0";
pub const HEADER_SIG_DOMAIN: &[u8] = b"tally/header-signature/v1\0";
pub const WRITE_SET_DOMAIN: &[u8] = b"tally/write-set/v1\0";
pub const STATE_DOMAIN: &[u8] = b"tally/state/v1\0";

/// The result of executing one request in stage 4. It is a Merkle leaf, so it is what the
/// operator commits to.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Outcome {
    DocCreated {
        revision: u64,
    },
    DocUpdated {
        revision: u64,
    },
    DocDeleted,
    Transferred {
        sender_balance: u64,
    },
    /// Executed but refused (e.g. funds spent by an earlier request in the same batch). The id is
    /// consumed: a retry returns this receipt.
    Rejected(ErrorCode),
    /// A compare-and-set refused: the document's revision is `current` (0: it does not exist).
    RevisionMismatch {
        current: u64,
    },
    /// Lease `lease` lives until `expires_at_ms` in batch time unless kept alive.
    LeaseGranted {
        lease: u64,
        expires_at_ms: u64,
    },
    LeaseRenewed {
        expires_at_ms: u64,
    },
    LeaseRevoked,
    /// The claim is the signer's, recorded at batch `height`.
    ClaimGranted {
        height: u64,
    },
    /// `holder` claimed it first, at batch `height`.
    ClaimDenied {
        holder: PublicKey,
        height: u64,
    },
    /// Every comparison held (`then` ran) or one did not (`otherwise` ran); one outcome per
    /// operation of the branch that ran. A branch with a refused operation writes nothing and
    /// is reported as `Rejected` / `RevisionMismatch` / `ClaimDenied` of that operation instead.
    TxnApplied {
        then: bool,
        /// At most `TXN_ITEMS_MAX`, none a `TxnApplied` (`NESTING_DEPTH_MAX`): refused when
        /// decoded.
        #[borsh(deserialize_with = "crate::bounded::txn_outcomes")]
        outcomes: Vec<Outcome>,
    },
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        !matches!(self, Outcome::Rejected(_) | Outcome::RevisionMismatch { .. } | Outcome::ClaimDenied { .. })
    }
}

/// What the operator signs for each committed batch.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BatchHeader {
    pub cluster_id: ClusterId,
    pub height: u64,
    pub prev_hash: Digest,
    pub merkle_root: Digest,
    pub leaf_count: u32,
    pub write_set_digest: Digest,
    /// blake3(STATE_DOMAIN ‖ previous state digest ‖ write-set digest): equal on every replica
    /// that applied the same history (invariant I3).
    pub state_digest: Digest,
    pub term: u64,
    pub time_ms: u64,
}

impl BatchHeader {
    pub fn hash(&self) -> Digest {
        hash_with_domain(HEADER_DOMAIN, &encode(self))
    }

    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = HEADER_SIG_DOMAIN.to_vec();
        out.extend_from_slice(&self.hash().0);
        out
    }

    /// Deterministic ed25519 (RFC 8032): every replica holding the operator key produces the
    /// same signature for the same header.
    pub fn sign(&self, key: &SigningKey) -> Signature {
        Signature(key.sign(&self.signing_bytes()).to_bytes())
    }

    /// # Errors
    /// [`CodecError::ReceiptInvalid`] when the key is malformed or weak or the signature fails.
    pub fn verify(&self, operator: &PublicKey, signature: &Signature) -> Result<(), CodecError> {
        let vk = VerifyingKey::from_bytes(&operator.0)
            .map_err(|_| CodecError::ReceiptInvalid("operator key is not a valid ed25519 point"))?;
        if vk.is_weak() {
            return Err(CodecError::ReceiptInvalid("operator key is weak"));
        }
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        vk.verify_strict(&self.signing_bytes(), &sig)
            .map_err(|_| CodecError::ReceiptInvalid("header signature does not verify against the operator key"))
    }
}

/// A link of the batch chain: a batch's height, its header's hash and the state digest after
/// it. Stage 6 checks every committed batch against the confirmed head; the peer gate checks
/// every batch a follower is asked to append against the one before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainHead {
    pub height: u64,
    pub hash: Digest,
    pub state_digest: Digest,
}

pub fn next_state_digest(prev: &Digest, write_set_digest: &Digest) -> Digest {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(&prev.0);
    buf[32..].copy_from_slice(&write_set_digest.0);
    hash_with_domain(STATE_DOMAIN, &buf)
}

/// One store mutation. Values are absolute (never deltas) so replaying a suffix of the log over
/// a newer state converges to the same state.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WriteOp {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The state changes of one batch, in key order, one op per key.
#[derive(Debug, Clone, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WriteSet {
    pub ops: Vec<WriteOp>,
}

impl WriteSet {
    pub fn digest(&self) -> Digest {
        hash_with_domain(WRITE_SET_DOMAIN, &encode(self))
    }
}

/// One Raft/log entry: a whole batch. Followers apply `write_set` without re-executing.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BatchEntry {
    pub header: BatchHeader,
    #[borsh(deserialize_with = "crate::bounded::requests_in_batch")]
    pub requests: Vec<SignedRequest>,
    #[borsh(deserialize_with = "crate::bounded::outcomes_in_batch")]
    pub outcomes: Vec<Outcome>,
    pub write_set: WriteSet,
}

impl BatchEntry {
    /// Each request's id and where it lies in this batch, in leaf order.
    pub fn locations(&self) -> impl Iterator<Item = (crate::RequestId, RequestLocation)> + '_ {
        self.requests.iter().enumerate().map(|(leaf, r)| (r.id(), self.location(leaf)))
    }

    /// Where leaf `leaf` of this batch is.
    pub fn location(&self, leaf: usize) -> RequestLocation {
        RequestLocation {
            height: self.header.height,
            leaf_index: u32::try_from(leaf).expect("leaf_count is a u32"),
            expires_at_ms: self.requests[leaf].request.expires_at_ms,
        }
    }

    /// Every request's id, in leaf order: each id costs an encoding and a hash, so it is
    /// computed once per batch and replica and handed along ([`Committed`]).
    pub fn ids(&self) -> Vec<crate::RequestId> {
        self.requests.iter().map(SignedRequest::id).collect()
    }

    pub fn leaves(&self) -> Vec<[u8; 32]> {
        self.leaves_with(&self.ids())
    }

    /// The Merkle leaves, from ids already computed.
    pub fn leaves_with(&self, ids: &[crate::RequestId]) -> Vec<[u8; 32]> {
        ids.iter().zip(&self.outcomes).map(|(id, o)| leaf_hash(id, o)).collect()
    }

    /// Checks the entry against its header: leaf count, Merkle root, write-set digest.
    ///
    /// # Errors
    /// [`CodecError::Malformed`] naming the first mismatch.
    pub fn check(&self) -> Result<(), CodecError> {
        self.check_with(&self.ids())
    }

    /// [`BatchEntry::check`] with the ids already computed (`ids[i]` is request `i`'s).
    ///
    /// # Errors
    /// [`CodecError::Malformed`] naming the first mismatch.
    pub fn check_with(&self, ids: &[crate::RequestId]) -> Result<(), CodecError> {
        if self.requests.len() != self.outcomes.len()
            || self.requests.len() != self.header.leaf_count as usize
            || ids.len() != self.requests.len()
        {
            return Err(CodecError::Malformed("batch leaf count mismatch".into()));
        }
        if crate::merkle::Tree::from_leaves(&self.leaves_with(ids)).root() != self.header.merkle_root {
            return Err(CodecError::Malformed("batch merkle root mismatch".into()));
        }
        if self.write_set.digest() != self.header.write_set_digest {
            return Err(CodecError::Malformed("batch write-set digest mismatch".into()));
        }
        Ok(())
    }
}

/// A committed batch as the replica holds it after stage 6: decoded once, shared (not copied)
/// with the store, with its request ids computed once.
#[derive(Debug, Clone)]
pub struct Committed {
    pub entry: std::sync::Arc<BatchEntry>,
    /// `ids[i]` is the id of `entry.requests[i]`.
    pub ids: std::sync::Arc<Vec<crate::RequestId>>,
}

impl Committed {
    /// Computes the ids.
    pub fn new(entry: BatchEntry) -> Committed {
        let ids = entry.ids();
        Committed { entry: std::sync::Arc::new(entry), ids: std::sync::Arc::new(ids) }
    }

    /// `(id, location)` of every request, in leaf order.
    pub fn locations(&self) -> impl Iterator<Item = (crate::RequestId, RequestLocation)> + '_ {
        self.ids.iter().enumerate().map(|(leaf, id)| (*id, self.entry.location(leaf)))
    }
}

/// A batch's time and its requests' ids, in leaf order, each with its expiry: what the store
/// keeps per height (in its segment files, referenced from the `requests` table v3). One write
/// per batch instead of one per request: a request's location is its batch's height and its
/// position here.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BatchIds {
    pub time_ms: u64,
    /// The latest expiry among `ids` (also in the store's table record, read without the ids).
    pub expires_max_ms: u64,
    #[borsh(deserialize_with = "crate::bounded::id_expiries_in_batch")]
    pub ids: Vec<(crate::RequestId, u64)>,
}

impl BatchIds {
    pub fn new(time_ms: u64, ids: Vec<(crate::RequestId, u64)>) -> BatchIds {
        let expires_max_ms = ids.iter().map(|(_, e)| *e).max().unwrap_or(0);
        BatchIds { time_ms, expires_max_ms, ids }
    }
}

/// The body of a committed batch, kept so any replica can rebuild any proof later.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BatchBody {
    #[borsh(deserialize_with = "crate::bounded::requests_in_batch")]
    pub requests: Vec<SignedRequest>,
    #[borsh(deserialize_with = "crate::bounded::outcomes_in_batch")]
    pub outcomes: Vec<Outcome>,
    /// What the batch changed (watches read it back; `batches` table v2).
    pub write_set: WriteSet,
}

/// Stored per height: the header, its signature and where the body lives.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BatchRecord {
    pub header: BatchHeader,
    pub signature: Signature,
    /// Opaque body location (segment reference) written by the store.
    pub body_ref: Vec<u8>,
}

/// Stored per document key.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct DocMeta {
    pub owner: PublicKey,
    pub revision: u64,
    pub body: Digest,
    /// The lease the document was last written under: it is deleted when that lease ends.
    pub lease: Option<u64>,
}

/// Stored per lease id.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct LeaseMeta {
    pub owner: PublicKey,
    pub ttl_ms: u64,
    /// Batch time at which it ends unless kept alive first.
    pub expires_at_ms: u64,
    /// What goes when it ends (at most `limits::LEASE_ATTACHED_MAX`).
    pub attached: Vec<Attached>,
}

/// Something that goes with a lease.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Attached {
    /// The document, if it still has this revision (a later write without the lease detaches it).
    Doc { key: crate::DocKey, revision: u64 },
    /// The claim, if it is still held under this lease.
    Claim { domain: String, slot: u64 },
}

/// Stored per claimed `(domain, slot)`.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct ClaimMeta {
    pub holder: PublicKey,
    pub height: u64,
    /// The lease it was claimed under: the claim ends with it.
    pub lease: Option<u64>,
}

/// Stored per request id: where its receipt can be rebuilt from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct RequestLocation {
    pub height: u64,
    pub leaf_index: u32,
    pub expires_at_ms: u64,
}

/// What a client keeps: proof, checkable offline, that the operator accepted `request` with
/// `outcome` at `header.height`.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Receipt {
    pub request: SignedRequest,
    pub outcome: Outcome,
    pub leaf_index: u32,
    #[borsh(deserialize_with = "crate::bounded::proof_hashes")]
    pub proof: Vec<Digest>,
    pub header: BatchHeader,
    pub signature: Signature,
}

impl Receipt {
    pub fn request_id(&self) -> RequestId {
        self.request.id()
    }

    /// Offline check, in this order (docs/receipt-format.md): the request's own signature, the
    /// request and header name the same cluster, the request had not expired at the header's
    /// time, the proof has exactly the length the leaf's path calls for, the Merkle proof of
    /// (id, outcome) leads to the header's root, and the operator's signature over the header.
    /// It does not bind the receipt to a cluster: see [`Receipt::verify_for_cluster`].
    ///
    /// # Errors
    /// [`CodecError::ReceiptInvalid`], [`CodecError::ExpiredBeforeBatch`] or
    /// [`CodecError::ProofLength`], naming the first check that failed.
    pub fn verify(&self, operator: &PublicKey) -> Result<(), CodecError> {
        let signing = self.request.request.signing_bytes();
        let signer = VerifyingKey::from_bytes(&self.request.request.signer.0)
            .map_err(|_| CodecError::ReceiptInvalid("request signer is not a valid key"))?;
        signer
            .verify_strict(&signing, &ed25519_dalek::Signature::from_bytes(&self.request.signature.0))
            .map_err(|_| CodecError::ReceiptInvalid("request signature does not verify"))?;
        if self.request.request.cluster_id != self.header.cluster_id {
            return Err(CodecError::ReceiptInvalid("request and header name different clusters"));
        }
        // Stage 4 refuses `expires_at_ms < time_ms` without executing it.
        let (expires_at_ms, header_time_ms) = (self.request.request.expires_at_ms, self.header.time_ms);
        if expires_at_ms < header_time_ms {
            return Err(CodecError::ExpiredBeforeBatch { expires_at_ms, header_time_ms });
        }
        let (leaf_index, leaf_count) = (self.leaf_index, self.header.leaf_count);
        let Some(expected) = proof_len(leaf_index as usize, leaf_count as usize) else {
            return Err(CodecError::ReceiptInvalid("leaf index is not below the header's leaf count"));
        };
        if self.proof.len() != expected {
            return Err(CodecError::ProofLength { hashes: self.proof.len(), leaf_index, leaf_count, expected });
        }
        let leaf = leaf_hash(&self.request_id(), &self.outcome);
        if !verify_proof(
            &self.header.merkle_root,
            self.leaf_index as usize,
            leaf,
            self.header.leaf_count as usize,
            &self.proof,
        ) {
            return Err(CodecError::ReceiptInvalid("Merkle proof does not lead to the header's root"));
        }
        self.header.verify(operator, &self.signature)
    }

    /// [`Receipt::verify`], and the receipt must be of cluster `cluster_id`: the operator key
    /// alone does not name a cluster, since clusters may share one.
    ///
    /// # Errors
    /// [`CodecError::WrongCluster`] when the header names another cluster (checked first), else
    /// as [`Receipt::verify`].
    pub fn verify_for_cluster(&self, operator: &PublicKey, cluster_id: &ClusterId) -> Result<(), CodecError> {
        if self.header.cluster_id != *cluster_id {
            return Err(CodecError::WrongCluster { expected: *cluster_id, got: self.header.cluster_id });
        }
        self.verify(operator)
    }
}
