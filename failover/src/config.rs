//! Peer configuration shared by every replica, and the checks a replica applies to what its
//! peers send before anything of it reaches the log.

use crate::revocation::Revocation;
use crate::storage::MemberAddr;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType};
use tally_codec::limits::FRAME_BYTES_MAX;

/// Invalid peer configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid raft configuration: {0}")]
pub struct ConfigError(pub String);

/// Raft messages received and not yet stepped; more are dropped (Raft retransmits).
pub const INBOX_MESSAGES_MAX: usize = 4096;
/// Room left in a peer frame for the message around an entry.
const FRAME_OVERHEAD_BYTES: usize = 64 * 1024;
/// A proposal's data may not exceed this (it must fit one peer frame).
pub const PROPOSAL_BYTES_MAX: usize = FRAME_BYTES_MAX - FRAME_OVERHEAD_BYTES;
/// What a Raft replica needs to know. Times are in ticks of `tick_ms`; see `NodeConfig`.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: u64,
    /// The initial voters, this node included, with their addresses. A node not listed here
    /// starts empty and waits to be added by the leader (`cluster add`); it then needs at least
    /// the current members' addresses here to reach them.
    pub peers: Vec<crate::Member>,
    /// Replication address to listen on (HOST:PORT).
    pub peer_listen: String,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub cluster_id: String,
    /// Who this replica is to its peers, with the digest of the settings all replicas must
    /// share at each peer protocol version (a peer with another one is refused):
    /// [`RaftConfig::timing_fingerprint`] covers the Raft timing; the server mixes in more
    /// (the genesis hash).
    pub local: crate::handshake::LocalPeer,
    /// Mutual TLS between replicas, or an explicit opt-out.
    pub peer_security: crate::transport::PeerSecurity,
}

impl RaftConfig {
    /// A fingerprint of the Raft timing at peer protocol `version` (release 0.3 mixed its
    /// version, 2, in the same way).
    pub fn timing_fingerprint(version: u16, tick_ms: u64, election_ticks: usize, heartbeat_ticks: usize) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"tally-raft-config-v1");
        h.update(&version.to_le_bytes());
        h.update(&tick_ms.to_le_bytes());
        h.update(&(election_ticks as u64).to_le_bytes());
        h.update(&(heartbeat_ticks as u64).to_le_bytes());
        *h.finalize().as_bytes()
    }

    /// The configuration fingerprint at peer protocol `version` of replicas with this timing and
    /// this genesis file: what a hello carries and what a peer's hello must match.
    pub fn fingerprint(
        version: u16,
        tick_ms: u64,
        election_ticks: usize,
        heartbeat_ticks: usize,
        genesis_text: &[u8],
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&RaftConfig::timing_fingerprint(version, tick_ms, election_ticks, heartbeat_ticks));
        h.update(blake3::hash(genesis_text).as_bytes());
        *h.finalize().as_bytes()
    }

    /// # Errors
    /// Node id 0, a zero tick, election ticks not above heartbeat ticks, duplicate peers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: &str| Err(ConfigError(s.to_string()));
        if self.node_id == 0 {
            return bad("node_id must not be 0");
        }
        if self.tick_ms == 0 {
            return bad("tick_ms must be positive");
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return bad("need 0 < heartbeat_ticks < election_ticks");
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|m| m.node_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() || ids.contains(&0) {
            return bad("peer node ids must be unique and non-zero");
        }
        Ok(())
    }
}

/// Whether an entry from a peer can ever be applied: a batch `check_batch` accepts, a no-op, or
/// a conf change naming real nodes whose context fits it (an added node's address, a removed
/// node's revoked certificate). Judged before the entry is persisted, so a forged append never
/// wedges the replica when it commits.
///
/// # Errors
/// Why not.
pub fn check_entry(e: &Entry, check_batch: &dyn Fn(&[u8]) -> Result<(), String>) -> Result<(), String> {
    match e.get_entry_type() {
        EntryType::EntryNormal if e.data.is_empty() => Ok(()),
        EntryType::EntryNormal => check_batch(&e.data),
        EntryType::EntryConfChange => {
            let cc = ConfChange::parse_from_bytes(&e.data).map_err(|x| format!("conf change: {x}"))?;
            check_conf_context(cc.node_id, cc.get_change_type(), &e.context).map(|_| ())
        }
        EntryType::EntryConfChangeV2 => {
            let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|x| format!("conf change: {x}"))?;
            if cc.get_changes().iter().any(|c| c.node_id == 0) {
                return Err("conf change names node 0".into());
            }
            match cc.get_changes().first() {
                Some(c) if cc.get_changes().len() == 1 => {
                    check_conf_context(c.node_id, c.get_change_type(), &e.context).map(|_| ())
                }
                _ if e.context.is_empty() => Ok(()),
                _ => Err("a conf change with a context must change one node".into()),
            }
        }
    }
}

/// What a configuration change's context carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfContext {
    None,
    /// An added node's addresses.
    Member(MemberAddr),
    /// A removed node's certificate, refused from now on.
    Revocation(Revocation),
}

/// Decodes the context of a change of `node_id` of type `ty`: an added node's address, or a
/// removed node's revoked certificate, for that very node.
///
/// # Errors
/// A context that does not decode, or names another node.
pub fn check_conf_context(node_id: u64, ty: ConfChangeType, context: &[u8]) -> Result<ConfContext, String> {
    if node_id == 0 {
        return Err("conf change names node 0".into());
    }
    if context.is_empty() {
        return Ok(ConfContext::None);
    }
    let named = match ty {
        ConfChangeType::RemoveNode => {
            let r: Revocation = tally_codec::decode(context, 1024)
                .map_err(|e| format!("conf change revocation does not decode: {e}"))?;
            (r.node_id, ConfContext::Revocation(r))
        }
        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
            let addr: MemberAddr = tally_codec::decode(context, 64 * 1024)
                .map_err(|e| format!("conf change address does not decode: {e}"))?;
            (addr.node_id, ConfContext::Member(addr))
        }
    };
    if named.0 != node_id {
        return Err(format!("conf change for node {node_id} carries node {}'s context", named.0));
    }
    Ok(named.1)
}

/// Makes the stored commit index cover what the state store already applied, and returns the
/// applied index raft starts from, and whether the bootstrap entry (index 1, a no-op that exists
/// only as the log's initial snapshot marker) must be delivered first.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::conf_change;
    use raft::eraftpb::{ConfChangeTransition, ConfChangeType};

    /// A state machine that accepts batches starting with 0xBA only.
    fn judge(data: &[u8]) -> Result<(), String> {
        if data.first() == Some(&0xBA) {
            Ok(())
        } else {
            Err("not a batch".into())
        }
    }

    fn entry(ty: EntryType, data: Vec<u8>, context: Vec<u8>) -> Entry {
        let mut e = Entry::default();
        e.set_entry_type(ty);
        e.data = data.into();
        e.context = context.into();
        e
    }

    /// A forged append from a peer: what it could carry is judged before it is persisted.
    #[test]
    fn entries_that_could_never_apply_are_refused() {
        assert!(check_entry(&entry(EntryType::EntryNormal, vec![], vec![]), &judge).is_ok(), "no-op");
        assert!(check_entry(&entry(EntryType::EntryNormal, vec![0xBA, 1], vec![]), &judge).is_ok());
        assert!(check_entry(&entry(EntryType::EntryNormal, vec![0xAB; 64], vec![]), &judge).is_err());
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, vec![0xFF; 9], vec![]), &judge).is_err());
        let add = conf_change(4, ConfChangeType::AddLearnerNode, ConfChangeTransition::Auto);
        let bytes = add.write_to_bytes().expect("encode");
        let addr =
            |id| tally_codec::encode(&MemberAddr { node_id: id, client_addr: "a:1".into(), peer_addr: "a:2".into() });
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, bytes.clone(), addr(4)), &judge).is_ok());
        assert!(
            check_entry(&entry(EntryType::EntryConfChangeV2, bytes.clone(), addr(5)), &judge).is_err(),
            "an address for another node"
        );
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, bytes, vec![1, 2, 3]), &judge).is_err());
        // A removal carries a revocation of that node's certificate, or nothing.
        let remove = conf_change(3, ConfChangeType::RemoveNode, ConfChangeTransition::Implicit);
        let remove = remove.write_to_bytes().expect("encode");
        let revoke = |id| tally_codec::encode(&Revocation { node_id: id, cert_fingerprint: [7; 32] });
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, remove.clone(), vec![]), &judge).is_ok());
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, remove.clone(), revoke(3)), &judge).is_ok());
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, remove.clone(), revoke(2)), &judge).is_err());
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, remove, addr(3)), &judge).is_err());
        let zero = conf_change(0, ConfChangeType::AddNode, ConfChangeTransition::Auto);
        let zero = zero.write_to_bytes().expect("encode");
        assert!(check_entry(&entry(EntryType::EntryConfChangeV2, zero, vec![]), &judge).is_err(), "node 0");
    }
}
