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
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct SignedRequest {
    pub request: Request,
    pub signature: Signature,
}

impl SignedRequest {
    pub fn id(&self) -> RequestId {
        self.request.id()
    }

    /// Decodes one request with the request bound.
    ///
    /// # Errors
    /// See [`crate::decode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
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
