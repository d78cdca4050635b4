//! Store keys. Content-addressed keys name a value by its digest; intent-addressed keys name it by
//! what it is for. Both begin with a [`TableId`] derived from the table's name and schema version,
//! so data written under another schema can never be misread as ours.

use crate::{Digest, DocKey, PublicKey};

/// Four bytes of blake3("tally/table/" ‖ name ‖ "/v" ‖ version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId(pub [u8; 4]);

impl TableId {
    pub fn derive(name: &str, version: u32) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"tally/table/");
        h.update(name.as_bytes());
        h.update(b"/v");
        h.update(version.to_string().as_bytes());
        let d = h.finalize();
        let mut id = [0u8; 4];
        id.copy_from_slice(&d.as_bytes()[..4]);
        TableId(id)
    }
}

/// The tables of one store schema. Built once; cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    /// intent: doc key → [`crate::DocMeta`].
    pub docs: TableId,
    /// content: digest → document body (identical bodies stored once).
    pub doc_bodies: TableId,
    /// intent: account public key → balance (borsh u64).
    pub accounts: TableId,
    /// intent: height (big-endian) → [`crate::BatchRecord`].
    pub batches: TableId,
    /// intent: height (big-endian) → where that batch's [`crate::BatchIds`] are in the store's
    /// segment files (v3; v2 held the ids themselves, v1 one key per request).
    pub requests: TableId,
    /// intent: name → store metadata (applied index, schema).
    pub meta: TableId,
    /// intent: lease id (big-endian) → [`crate::LeaseMeta`].
    pub leases: TableId,
    /// intent: domain length ‖ domain ‖ slot (big-endian) → [`crate::ClaimMeta`].
    pub claims: TableId,
}

/// Bump when any table's value layout changes (or a table's own version, as for `docs`).
pub const SCHEMA_VERSION: u32 = 1;
/// The documents table's version: 2 since `DocMeta` records its lease.
pub const DOCS_VERSION: u32 = 2;
/// The batches table's version: 2 since a batch body holds its write set.
pub const BATCHES_VERSION: u32 = 2;
/// The requests table's version: 2 since it holds one record of ids per batch, 3 since that
/// record points into the segment files.
pub const REQUESTS_VERSION: u32 = 3;

impl Tables {
    pub fn v1() -> Self {
        Tables {
            // v2: `DocMeta` gained the lease a document was written under.
            docs: TableId::derive("docs", DOCS_VERSION),
            doc_bodies: TableId::derive("doc_bodies", SCHEMA_VERSION),
            accounts: TableId::derive("accounts", SCHEMA_VERSION),
            // v2: a batch's body holds its write set.
            batches: TableId::derive("batches", BATCHES_VERSION),
            // v2: one record of ids per batch height, not one key per request id.
            requests: TableId::derive("requests", REQUESTS_VERSION),
            meta: TableId::derive("meta", SCHEMA_VERSION),
            leases: TableId::derive("leases", SCHEMA_VERSION),
            claims: TableId::derive("claims", SCHEMA_VERSION),
        }
    }

    /// A fingerprint of every table id, stored in the meta table and checked on open.
    pub fn fingerprint(&self) -> Vec<u8> {
        [self.docs, self.doc_bodies, self.accounts, self.batches, self.requests, self.meta, self.leases, self.claims]
            .iter()
            .flat_map(|t| t.0)
            .collect()
    }

    pub fn doc(&self, key: &DocKey) -> IntentKey {
        IntentKey::new(self.docs, &key.0)
    }
    pub fn doc_body(&self, digest: &Digest) -> ContentKey {
        ContentKey { table: self.doc_bodies, digest: *digest }
    }
    pub fn account(&self, key: &PublicKey) -> IntentKey {
        IntentKey::new(self.accounts, &key.0)
    }
    pub fn batch(&self, height: u64) -> IntentKey {
        IntentKey::new(self.batches, &height.to_be_bytes())
    }
    /// The ids of the batch at `height`.
    pub fn batch_ids(&self, height: u64) -> IntentKey {
        IntentKey::new(self.requests, &height.to_be_bytes())
    }
    pub fn meta(&self, name: &str) -> IntentKey {
        IntentKey::new(self.meta, name.as_bytes())
    }
    pub fn lease(&self, id: u64) -> IntentKey {
        IntentKey::new(self.leases, &id.to_be_bytes())
    }
    /// The lease id of a key of the lease table.
    pub fn lease_id_of(&self, key: &[u8]) -> Option<u64> {
        let natural = key.strip_prefix(&self.leases.0)?;
        Some(u64::from_be_bytes(natural.try_into().ok()?))
    }
    /// The `(domain, slot)` of a key of the claims table.
    pub fn claim_of(&self, key: &[u8]) -> Option<(String, u64)> {
        let natural = key.strip_prefix(&self.claims.0)?;
        let (&len, rest) = natural.split_first()?;
        let len = usize::from(len);
        if rest.len() != len + 8 {
            return None;
        }
        let domain = String::from_utf8(rest[..len].to_vec()).ok()?;
        Some((domain, u64::from_be_bytes(rest[len..].try_into().ok()?)))
    }
    /// The document key of a key of the documents table.
    pub fn doc_of(&self, key: &[u8]) -> Option<crate::DocKey> {
        Some(crate::DocKey(key.strip_prefix(&self.docs.0)?.try_into().ok()?))
    }
    /// Length-prefixed, so no domain's keys are a prefix of another's.
    pub fn claim(&self, domain: &str, slot: u64) -> IntentKey {
        let mut natural = Vec::with_capacity(1 + domain.len() + 8);
        natural.push(u8::try_from(domain.len()).expect("claim domains are at most 64 bytes"));
        natural.extend_from_slice(domain.as_bytes());
        natural.extend_from_slice(&slot.to_be_bytes());
        IntentKey::new(self.claims, &natural)
    }
}

/// table id ‖ blake3 digest of the canonical value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentKey {
    pub table: TableId,
    pub digest: Digest,
}

impl ContentKey {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(36);
        out.extend_from_slice(&self.table.0);
        out.extend_from_slice(&self.digest.0);
        out
    }
}

/// table id ‖ natural key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntentKey(Vec<u8>);

impl IntentKey {
    pub fn new(table: TableId, natural: &[u8]) -> Self {
        let mut out = Vec::with_capacity(4 + natural.len());
        out.extend_from_slice(&table.0);
        out.extend_from_slice(natural);
        IntentKey(out)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_are_distinct_and_versioned() {
        let t = Tables::v1();
        let fp = t.fingerprint();
        let mut ids: Vec<&[u8]> = fp.chunks(4).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 8, "table ids collide");
        assert_ne!(TableId::derive("docs", 1), TableId::derive("docs", 2));
    }

    /// Pins the derivation: a change here changes the on-disk format.
    #[test]
    fn table_id_fixture() {
        assert_eq!(
            hex::encode(TableId::derive("docs", 1).0),
            hex::encode(&blake3::hash(b"tally/table/docs/v1").as_bytes()[..4])
        );
    }
}
