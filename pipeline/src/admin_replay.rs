//! Replay protection for admin commands. A signed admin command is valid for up to 2 minutes
//! (`ADMIN_VALIDITY_MS_MAX`); within that time a captured copy would be accepted again. Each
//! replica remembers the id (blake3 of the signed bytes) of every admin command it took until
//! the command expires, and answers a second copy `Duplicate`.
//!
//! A command refused with a retryable code (not the leader, overloaded) did nothing: its id is
//! released so the same bytes can be sent again. Memory is bounded per admin key
//! ([`ADMIN_COMMANDS_PER_KEY_MAX`] unexpired commands); admin keys come from the configuration,
//! and a command is checked here only after its signature verified.

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use tally_codec::admin::SignedAdmin;
use tally_codec::PublicKey;

/// Unexpired admin commands remembered per admin key. An audit of a table is one command per
/// 10,000-key page, so this allows a scan of 40M keys in 2 minutes; past it a key's commands
/// are refused `Overloaded` until some expire (forgetting one instead would allow its replay).
pub const ADMIN_COMMANDS_PER_KEY_MAX: usize = 4096;

/// An admin command's identity: blake3 of its signed bytes.
pub type AdminId = [u8; 32];

/// Why a command was not claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayRefusal {
    #[error("duplicate admin command: this replica already took it (a command is accepted once; sign a new one)")]
    Duplicate,
    #[error(
        "too many admin commands from this key in the last 2 minutes (limit {ADMIN_COMMANDS_PER_KEY_MAX}); retry later"
    )]
    TooMany,
}

#[derive(Default)]
struct KeyCommands {
    ids: HashSet<AdminId>,
    /// `(expires_at_ms, id)`, to forget commands once they can no longer be replayed.
    by_expiry: BTreeSet<(u64, AdminId)>,
}

/// The ids of the admin commands this replica took, by signer.
#[derive(Default)]
pub struct SeenAdmin {
    keys: Mutex<HashMap<PublicKey, KeyCommands>>,
}

impl SeenAdmin {
    /// Records `cmd` as taken at `now_ms` (call only after its signature and expiry checked).
    ///
    /// # Errors
    /// [`ReplayRefusal::Duplicate`] when the same command was taken before and has not expired;
    /// [`ReplayRefusal::TooMany`] when its signer has [`ADMIN_COMMANDS_PER_KEY_MAX`] live ones.
    pub fn claim(&self, cmd: &SignedAdmin, now_ms: u64) -> Result<AdminId, ReplayRefusal> {
        let id = admin_id(cmd);
        let mut keys = self.keys.lock();
        let k = keys.entry(cmd.command.signer).or_default();
        while let Some(&(expires, old)) = k.by_expiry.first() {
            if expires >= now_ms {
                break;
            }
            k.by_expiry.pop_first();
            k.ids.remove(&old);
        }
        if k.ids.contains(&id) {
            return Err(ReplayRefusal::Duplicate);
        }
        if k.ids.len() >= ADMIN_COMMANDS_PER_KEY_MAX {
            return Err(ReplayRefusal::TooMany);
        }
        k.ids.insert(id);
        k.by_expiry.insert((cmd.command.expires_at_ms, id));
        assert_eq!(k.ids.len(), k.by_expiry.len());
        Ok(id)
    }

    /// Forgets a claimed command that did nothing (refused with a retryable code), so the same
    /// bytes may be sent again.
    pub fn release(&self, cmd: &SignedAdmin, id: &AdminId) {
        if let Some(k) = self.keys.lock().get_mut(&cmd.command.signer) {
            k.ids.remove(id);
            k.by_expiry.remove(&(cmd.command.expires_at_ms, *id));
        }
    }
}

/// blake3 of the command's signed bytes (the signature is not part of it: `verify_strict`
/// accepts one signature per command and key).
pub fn admin_id(cmd: &SignedAdmin) -> AdminId {
    *blake3::hash(&cmd.command.signing_bytes()).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_codec::admin::{AdminCommand, AdminOp};

    fn cmd(nonce: u64, expires_at_ms: u64) -> SignedAdmin {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        AdminCommand {
            cluster_id: tally_codec::ClusterId([7; 16]),
            signer: PublicKey(key.verifying_key().to_bytes()),
            nonce,
            expires_at_ms,
            op: AdminOp::ClusterRemove { node_id: 3 },
        }
        .sign(&key)
    }

    #[test]
    fn a_command_is_taken_once_until_it_expires() {
        let seen = SeenAdmin::default();
        let c = cmd(1, 1_000);
        assert!(seen.claim(&c, 500).is_ok());
        assert_eq!(seen.claim(&c, 600), Err(ReplayRefusal::Duplicate));
        assert!(seen.claim(&cmd(2, 1_000), 600).is_ok(), "another nonce is another command");
        // Once expired it is forgotten (authorisation refuses it as expired by then anyway).
        assert!(seen.claim(&c, 1_001).is_ok());
    }

    #[test]
    fn a_released_command_may_be_sent_again() {
        let seen = SeenAdmin::default();
        let c = cmd(1, 1_000);
        let id = seen.claim(&c, 500).expect("first");
        seen.release(&c, &id);
        assert!(seen.claim(&c, 501).is_ok());
    }

    #[test]
    fn each_key_holds_a_bounded_number_of_live_commands() {
        let seen = SeenAdmin::default();
        for n in 0..ADMIN_COMMANDS_PER_KEY_MAX as u64 {
            seen.claim(&cmd(n, 10_000), 0).expect("under the bound");
        }
        assert_eq!(seen.claim(&cmd(u64::MAX, 10_000), 0), Err(ReplayRefusal::TooMany));
        // Expired ones make room.
        assert!(seen.claim(&cmd(u64::MAX, 20_000), 10_001).is_ok());
        assert_eq!(seen.keys.lock().values().map(|k| k.ids.len()).sum::<usize>(), 1);
    }
}
