//! Signed requests: the only thing a client can ask the operator to do.

use crate::{encode, hash_with_domain, limits, ClusterId, CodecError, DocKey, PublicKey, RequestId, Signature};
use borsh::{BorshDeserialize, BorshSerialize};

/// Domain tag prefixed to a request's canonical bytes before signing and hashing.
pub const REQUEST_DOMAIN: &[u8] = b"tally/request/v1\0";

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Operation {
    /// Create or replace a JSON document. The first writer owns the key.
    Set { key: DocKey, value: Vec<u8> },
    /// Delete a document; only its owner may.
    Delete { key: DocKey },
    /// Move `amount` from the signer's account to `to`.
    Transfer { to: PublicKey, amount: u64 },
    /// `Set` with conditions (`docs/coordination.md`): `if_revision` is the revision the document
    /// must have (0: it must not exist, a create-only write), `lease` a live lease of the signer's
    /// that the document goes with when it ends.
    SetIf { key: DocKey, value: Vec<u8>, if_revision: Option<u64>, lease: Option<u64> },
    /// `Delete` if the document has revision `if_revision`.
    DeleteIf { key: DocKey, if_revision: Option<u64> },
    /// A lease that ends `ttl_ms` after the batch that grants it, unless kept alive.
    LeaseGrant { ttl_ms: u64 },
    /// Restarts a live lease's TTL from this batch's time.
    LeaseKeepAlive { lease: u64 },
    /// Ends a lease now; what is attached to it goes in the same batch.
    LeaseRevoke { lease: u64 },
    /// The first claim of `(domain, slot)` is granted and recorded (forever, or until `lease`
    /// ends); every later claim is denied with the holder.
    Claim { domain: String, slot: u64, lease: Option<u64> },
    /// Comparisons, then `then` if all hold or `otherwise` if one does not: all or nothing.
    Txn(Txn),
}

/// An atomic transaction (etcd's `txn`). Its operations are any but `Txn`: decoding refuses a
/// transaction inside a transaction ([`limits::NESTING_DEPTH_MAX`]), so no input can make the
/// decoder recurse.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    #[borsh(deserialize_with = "crate::bounded::txn_branch")]
    pub then: Vec<Operation>,
    #[borsh(deserialize_with = "crate::bounded::txn_branch")]
    pub otherwise: Vec<Operation>,
}

/// One comparison of a transaction, on the state before it.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Compare {
    /// The document's revision is `revision` (0: it does not exist).
    Revision { key: DocKey, revision: u64 },
    /// The document exists.
    Exists { key: DocKey },
    /// The account holds at least `amount`.
    BalanceAtLeast { account: PublicKey, amount: u64 },
    /// The lease is alive.
    LeaseAlive { lease: u64 },
}

/// Everything a signature covers.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Request {
    pub cluster_id: ClusterId,
    pub signer: PublicKey,
    /// Distinguishes otherwise identical requests (two equal transfers are two requests).
    pub nonce: u64,
    /// Unix time in ms after which the request is void; compared with the batch header time.
    pub expires_at_ms: u64,
    pub op: Operation,
}

impl Request {
    /// The bytes that are signed, and whose blake3 is the request id.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REQUEST_DOMAIN.len() + 128);
        out.extend_from_slice(REQUEST_DOMAIN);
        borsh::to_writer(&mut out, self).expect("writing borsh into a Vec cannot fail");
        out
    }

    pub fn id_of_signing_bytes(signing_bytes: &[u8]) -> RequestId {
        RequestId(*blake3::hash(signing_bytes).as_bytes())
    }

    pub fn id(&self) -> RequestId {
        Self::id_of_signing_bytes(&self.signing_bytes())
    }
}

/// A request with the signer's ed25519 signature over [`Request::signing_bytes`].
///
/// Its encoding is at most [`limits::REQUEST_BYTES_MAX`] bytes, and its decoder stops reading
/// there, wherever the request is embedded (a frame, a batch, a receipt): see
/// [`crate::bounded`].
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize)]
pub struct SignedRequest {
    pub request: Request,
    pub signature: Signature,
}

impl BorshDeserialize for SignedRequest {
    fn deserialize_reader<R: borsh::io::Read>(reader: &mut R) -> borsh::io::Result<Self> {
        crate::bounded::signed_request(reader)
    }
}

impl SignedRequest {
    pub fn id(&self) -> RequestId {
        self.request.id()
    }

    /// Decodes one request with the request bound.
    ///
    /// # Errors
    /// [`CodecError::RequestTooLarge`] over [`limits::REQUEST_BYTES_MAX`], otherwise as
    /// [`crate::decode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        if bytes.len() > limits::REQUEST_BYTES_MAX {
            return Err(CodecError::RequestTooLarge { max: limits::REQUEST_BYTES_MAX });
        }
        crate::decode(bytes, limits::REQUEST_BYTES_MAX)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Content digest of the encoded request (for content-addressed storage).
    pub fn content_digest(&self) -> crate::Digest {
        hash_with_domain(b"tally/content/v1\0", &self.encode())
    }
}

impl Request {
    /// Signs with deterministic ed25519.
    pub fn sign(self, key: &ed25519_dalek::SigningKey) -> SignedRequest {
        use ed25519_dalek::Signer;
        let signature = Signature(key.sign(&self.signing_bytes()).to_bytes());
        SignedRequest { request: self, signature }
    }
}
