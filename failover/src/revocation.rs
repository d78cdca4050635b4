//! Revoked node certificates: a leaked node key is shut out without rebuilding the cluster.
//!
//! ```text
//!  tally cluster revoke-node N ──admin──▶ leader: RemoveNode(N), context = Revocation{N, fp}
//!        (fp = blake3 of node N's certificate, DER)      │ committed through the Raft log
//!                                                        ▼
//!  every replica applying it: WAL meta blob `raft-revoked` (durable) ─▶ RevokedCerts (shared)
//!  a snapshot carries the list (a replica catching up from one learns it too)
//!                                                        ▼
//!  transport: a TLS peer presenting a revoked certificate is refused, dialling or dialled,
//!  and links already open with one are cut
//! ```
//! Revocations are never withdrawn: `cluster add` brings node N back with a new certificate
//! (a new key, so a new fingerprint) issued from the cluster CA.

use borsh::{BorshDeserialize, BorshSerialize};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Revoked certificates a cluster keeps, at most. `revoke-node` is refused past it (one per
/// leaked key: a cluster that lost a thousand keys needs a new CA).
pub const REVOKED_MAX: usize = 1024;

/// Node `node_id`'s certificate with fingerprint `cert_fingerprint` is refused on every peer
/// link. Carried in the context of the configuration change that removes the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, BorshSerialize, BorshDeserialize)]
pub struct Revocation {
    pub node_id: u64,
    pub cert_fingerprint: [u8; 32],
}

/// The fingerprint tally gives a certificate: blake3 of its DER bytes.
pub use tally_codec::admin::cert_fingerprint;

/// A fingerprint as it is printed and logged.
pub fn fingerprint_hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// The revoked fingerprints, shared by the replica thread (which adds them as they apply) and
/// the transport (which reads them at every handshake).
#[derive(Debug, Clone, Default)]
pub struct RevokedCerts(Arc<RwLock<BTreeMap<[u8; 32], u64>>>);

impl RevokedCerts {
    pub fn new(list: &[Revocation]) -> Self {
        let set = RevokedCerts::default();
        set.extend(list);
        set
    }

    /// The node whose certificate `fp` was, if it is revoked.
    pub fn node_of(&self, fp: &[u8; 32]) -> Option<u64> {
        self.0.read().get(fp).copied()
    }

    /// Adds `list`; returns whether any was new.
    pub fn extend(&self, list: &[Revocation]) -> bool {
        let mut set = self.0.write();
        let before = set.len();
        for r in list {
            set.insert(r.cert_fingerprint, r.node_id);
        }
        set.len() != before
    }

    pub fn list(&self) -> Vec<Revocation> {
        self.0.read().iter().map(|(fp, node)| Revocation { node_id: *node, cert_fingerprint: *fp }).collect()
    }

    pub fn len(&self) -> usize {
        self.0.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_is_shared_and_keyed_by_fingerprint() {
        let a = RevokedCerts::new(&[Revocation { node_id: 3, cert_fingerprint: [1; 32] }]);
        let b = a.clone();
        assert!(b.extend(&[Revocation { node_id: 3, cert_fingerprint: [2; 32] }]));
        assert!(!b.extend(&[Revocation { node_id: 3, cert_fingerprint: [2; 32] }]), "nothing new");
        assert_eq!(a.node_of(&[2; 32]), Some(3));
        assert_eq!(a.node_of(&[9; 32]), None);
        assert_eq!(a.list().len(), 2);
        assert_eq!(cert_fingerprint(b"der"), *blake3::hash(b"der").as_bytes());
        assert_eq!(fingerprint_hex(&[0xab; 32]).len(), 64);
    }
}
