//! Admin commands: operations on the cluster itself rather than on the application state
//! (membership, state scans). Each is signed by a key named in the nodes' `admin_keys`; anyone
//! else gets `NotAuthorized`. They do not enter the replicated log as requests do, so a command
//! carries its own expiry (and a nonce) to bound replays.

use crate::{ClusterId, PublicKey, Signature};
use borsh::{BorshDeserialize, BorshSerialize};

/// Domain tag of an admin command's signed bytes (never valid as a request's).
pub const ADMIN_DOMAIN: &[u8] = b"tally/admin/v1\0";
/// An admin command is void this long after it was signed, at most.
pub const ADMIN_VALIDITY_MS_MAX: u64 = 120_000;
/// Keys scanned per audit page, at most (about 1-5 ms under the store lock).
pub const AUDIT_PAGE_MAX: u32 = 10_000;

/// Which table an audit page scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum AuditTable {
    Accounts,
    Documents,
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum AdminOp {
    ClusterAdd {
        node_id: u64,
        client_addr: String,
        peer_addr: String,
    },
    ClusterRemove {
        node_id: u64,
    },
    /// One page of a scan over a table: keys after `after` (exclusive), at most `limit`
    /// (capped at [`AUDIT_PAGE_MAX`]).
    AuditPage {
        table: AuditTable,
        after: Option<Vec<u8>>,
        limit: u32,
    },
    /// Removes node `node_id` (if it is a member) and revokes its certificate, whose
    /// fingerprint (blake3 of its DER bytes) is `cert_fingerprint`: every replica refuses it on
    /// peer links from then on. The node can be added again with a new certificate.
    RevokeNode {
        node_id: u64,
        cert_fingerprint: [u8; 32],
    },
}

/// The fingerprint [`AdminOp::RevokeNode`] names a certificate by: blake3 of its DER bytes.
pub fn cert_fingerprint(der: &[u8]) -> [u8; 32] {
    *blake3::hash(der).as_bytes()
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct AdminCommand {
    pub cluster_id: ClusterId,
    pub signer: PublicKey,
    pub nonce: u64,
    /// Unix ms after which the command is void.
    pub expires_at_ms: u64,
    pub op: AdminOp,
}

impl AdminCommand {
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = ADMIN_DOMAIN.to_vec();
        borsh::to_writer(&mut out, self).expect("writing borsh into a Vec cannot fail");
        out
    }

    pub fn sign(self, key: &ed25519_dalek::SigningKey) -> SignedAdmin {
        use ed25519_dalek::Signer;
        let signature = Signature(key.sign(&self.signing_bytes()).to_bytes());
        SignedAdmin { command: self, signature }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct SignedAdmin {
    pub command: AdminCommand,
    pub signature: Signature,
}

/// Why an admin command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminRefusal {
    #[error("not authorized: key {0} is not an admin key of this cluster")]
    NotAdmin(PublicKey),
    #[error("not authorized: the admin signature does not verify")]
    BadSignature,
    #[error("admin command is for another cluster")]
    WrongCluster,
    #[error("admin command expired")]
    Expired,
    #[error("admin command expiry is more than {ADMIN_VALIDITY_MS_MAX} ms ahead")]
    ExpiryTooFar,
}

impl SignedAdmin {
    /// Checks the command against this cluster's admin keys at `now_ms`.
    ///
    /// # Errors
    /// [`AdminRefusal`] naming the first check that failed.
    pub fn authorize(&self, cluster: &ClusterId, admins: &[PublicKey], now_ms: u64) -> Result<(), AdminRefusal> {
        let c = &self.command;
        if !admins.contains(&c.signer) {
            return Err(AdminRefusal::NotAdmin(c.signer));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&c.signer.0).map_err(|_| AdminRefusal::BadSignature)?;
        if key.is_weak() {
            return Err(AdminRefusal::BadSignature);
        }
        key.verify_strict(&c.signing_bytes(), &ed25519_dalek::Signature::from_bytes(&self.signature.0))
            .map_err(|_| AdminRefusal::BadSignature)?;
        if c.cluster_id != *cluster {
            return Err(AdminRefusal::WrongCluster);
        }
        if c.expires_at_ms < now_ms {
            return Err(AdminRefusal::Expired);
        }
        if c.expires_at_ms > now_ms + ADMIN_VALIDITY_MS_MAX {
            return Err(AdminRefusal::ExpiryTooFar);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[b; 32])
    }

    fn cmd(signer: &ed25519_dalek::SigningKey, cluster: ClusterId, expires_at_ms: u64) -> SignedAdmin {
        AdminCommand {
            cluster_id: cluster,
            signer: PublicKey(signer.verifying_key().to_bytes()),
            nonce: 1,
            expires_at_ms,
            op: AdminOp::ClusterRemove { node_id: 3 },
        }
        .sign(signer)
    }

    /// Variants are appended: the encodings of the older commands do not change.
    #[test]
    fn older_commands_keep_their_encoding() {
        assert_eq!(crate::encode(&AdminOp::ClusterRemove { node_id: 3 })[0], 1);
        let revoke = AdminOp::RevokeNode { node_id: 3, cert_fingerprint: [7; 32] };
        let bytes = crate::encode(&revoke);
        assert_eq!(bytes[0], 3);
        assert_eq!(crate::decode::<AdminOp>(&bytes, 1024).expect("decode"), revoke);
    }

    #[test]
    fn only_a_listed_admin_with_a_valid_signature_passes() {
        let (admin, stranger) = (key(1), key(2));
        let cluster = ClusterId([7; 16]);
        let admins = [PublicKey(admin.verifying_key().to_bytes())];
        assert_eq!(cmd(&admin, cluster, 1_000).authorize(&cluster, &admins, 500), Ok(()));
        assert!(matches!(
            cmd(&stranger, cluster, 1_000).authorize(&cluster, &admins, 500),
            Err(AdminRefusal::NotAdmin(_))
        ));
        let mut forged = cmd(&stranger, cluster, 1_000);
        forged.command.signer = admins[0];
        assert_eq!(forged.authorize(&cluster, &admins, 500), Err(AdminRefusal::BadSignature));
        let mut edited = cmd(&admin, cluster, 1_000);
        edited.command.op = AdminOp::ClusterRemove { node_id: 1 };
        assert_eq!(edited.authorize(&cluster, &admins, 500), Err(AdminRefusal::BadSignature));
        assert_eq!(
            cmd(&admin, ClusterId([8; 16]), 1_000).authorize(&cluster, &admins, 500),
            Err(AdminRefusal::WrongCluster)
        );
        assert_eq!(cmd(&admin, cluster, 1_000).authorize(&cluster, &admins, 2_000), Err(AdminRefusal::Expired));
        assert_eq!(
            cmd(&admin, cluster, 500 + ADMIN_VALIDITY_MS_MAX + 1).authorize(&cluster, &admins, 500),
            Err(AdminRefusal::ExpiryTooFar)
        );
        assert!(matches!(cmd(&admin, cluster, 1_000).authorize(&cluster, &[], 500), Err(AdminRefusal::NotAdmin(_))));
    }
}
