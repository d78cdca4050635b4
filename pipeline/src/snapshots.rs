//! State transfer for Raft snapshots: the leader exports its store; a follower that fell behind
//! the compacted log installs it, ordered after every committed entry it already received.

use crate::node::Shared;
use crate::s6_confirm::{ChainHead, ToStore};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant};
use tally_codec::limits::SNAPSHOT_BYTES_MAX;
use tally_core::confirm::check_batch_entry;
use tally_failover::snapshot::{BackgroundExports, ExportedState, SnapshotSink, SnapshotSource};
use tally_store::state::StateSnapshot;

/// How long an install waits for the pipeline to drain and apply.
pub const INSTALL_WAIT: Duration = Duration::from_secs(60);

/// How long an unused export is kept for the next follower that needs one.
pub const EXPORT_KEEP: Duration = Duration::from_secs(60);

pub struct PipelineSnapshots {
    pub shared: Weak<Shared>,
    exports: BackgroundExports,
}

impl PipelineSnapshots {
    pub fn new(shared: Weak<Shared>) -> Self {
        let source = shared.clone();
        PipelineSnapshots { shared, exports: BackgroundExports::new(EXPORT_KEEP, move || export(&source)) }
    }
}

/// Exports the store (on the export thread; the store lock is held while it is read, the
/// encoding is done after).
fn export(shared: &Weak<Shared>) -> Result<ExportedState, String> {
    let shared = shared.upgrade().ok_or("node stopped")?;
    let (snap, term) = {
        let store = shared.store.lock();
        let snap = store.export_snapshot().map_err(|e| format!("snapshot export: {e}"))?;
        (snap, shared.applied_term.load(Ordering::Acquire))
    };
    let state = tally_codec::encode(&snap);
    if state.len() > SNAPSHOT_BYTES_MAX {
        return Err(format!("the state ({} bytes) is over the snapshot limit of {SNAPSHOT_BYTES_MAX}", state.len()));
    }
    tracing::info!(index = snap.applied.index, height = snap.applied.height, bytes = state.len(), "state exported");
    Ok(ExportedState { index: snap.applied.index, term, state })
}

impl SnapshotSource for PipelineSnapshots {
    fn snapshot(&self, at_least: u64) -> Result<Arc<ExportedState>, String> {
        self.exports.get(at_least)
    }
}

impl SnapshotSink for PipelineSnapshots {
    fn check_entry(&self, data: &[u8]) -> Result<(), String> {
        let shared = self.shared.upgrade().ok_or("node stopped")?;
        check_batch_entry(data, &shared.opts.cluster_id).map_err(|e| e.to_string())
    }

    fn check_snapshot(&self, state: &[u8]) -> Result<(), String> {
        let shared = self.shared.upgrade().ok_or("node stopped")?;
        let snap: StateSnapshot = tally_codec::decode(state, SNAPSHOT_BYTES_MAX)
            .map_err(|e| format!("snapshot state does not decode: {e}"))?;
        if snap.applied.index == 0 {
            return Err("snapshot at index 0".into());
        }
        if snap.pairs.iter().any(|(k, _)| k.starts_with(&shared.tables.meta.0)) {
            return Err("snapshot carries the store's own metadata".into());
        }
        Ok(())
    }

    fn install(&self, index: u64, term: u64, data: &[u8]) -> Result<(), String> {
        let shared = self.shared.upgrade().ok_or("node stopped")?;
        let snap: StateSnapshot =
            tally_codec::decode(data, usize::MAX).map_err(|e| format!("snapshot does not decode: {e}"))?;
        if snap.applied.index != index {
            return Err(format!("snapshot data is at index {}, Raft says {index}", snap.applied.index));
        }
        // Every earlier committed entry was sent before this call: wait until the confirm thread
        // has passed all of them to the store thread, whose queue then orders the install.
        let deadline = Instant::now() + INSTALL_WAIT;
        while !shared.committed_rx.is_empty() || shared.confirm_busy.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return Err("pipeline did not drain before the snapshot install".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        crate::s5_propose::fail_all_pending(&shared, "apply", tally_codec::ErrorCode::Retry);
        *shared.head_reset.lock() = Some(ChainHead {
            height: snap.applied.height,
            hash: snap.applied.header_hash,
            state_digest: snap.applied.state_digest,
        });
        tracing::info!(index, height = snap.applied.height, "installing state snapshot");
        shared
            .store_tx
            .send(ToStore::Install { snapshot: Box::new(snap), term })
            .map_err(|_| "store thread stopped")?;
        if shared.wait_applied_index(index, INSTALL_WAIT) {
            Ok(())
        } else {
            Err(format!("snapshot at {index} was not applied in time"))
        }
    }
}

#[cfg(test)]
mod tests {
    use tally_codec::merkle::{leaf_hash, Tree};
    use tally_codec::{
        encode, BatchEntry, BatchHeader, ClusterId, Digest, Operation, Outcome, PublicKey, Request, WriteSet,
    };
    use tally_core::confirm::check_batch_entry;

    fn entry(cluster: ClusterId) -> BatchEntry {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let req = Request {
            cluster_id: cluster,
            signer: PublicKey(key.verifying_key().to_bytes()),
            nonce: 1,
            expires_at_ms: 10,
            op: Operation::Transfer { to: PublicKey([9; 32]), amount: 1 },
        }
        .sign(&key);
        let outcome = Outcome::Transferred { sender_balance: 5 };
        let root = Tree::from_leaves(&[leaf_hash(&req.id(), &outcome)]).root();
        let write_set = WriteSet { ops: Vec::new() };
        let header = BatchHeader {
            cluster_id: cluster,
            height: 1,
            prev_hash: Digest([0; 32]),
            merkle_root: root,
            leaf_count: 1,
            write_set_digest: write_set.digest(),
            state_digest: Digest([0; 32]),
            term: 1,
            time_ms: 1,
        };
        BatchEntry { header, requests: vec![req], outcomes: vec![outcome], write_set }
    }

    /// Issue 6, attack 2: a forged append's junk never reaches the log; only a consistent batch of
    /// this cluster is accepted.
    #[test]
    fn only_a_consistent_batch_of_this_cluster_passes() {
        let ours = ClusterId([7; 16]);
        assert_eq!(check_batch_entry(&encode(&entry(ours)), &ours), Ok(()));
        assert!(check_batch_entry(&[0xAB; 64], &ours).is_err_and(|e| e.to_string().contains("not a batch entry")));
        assert!(check_batch_entry(&encode(&entry(ClusterId([8; 16]))), &ours)
            .is_err_and(|e| e.to_string().contains("cluster")));
        let mut bad_root = entry(ours);
        bad_root.header.merkle_root = Digest([1; 32]);
        assert!(check_batch_entry(&encode(&bad_root), &ours).is_err_and(|e| e.to_string().contains("inconsistent")));
        let mut bad_count = entry(ours);
        bad_count.header.leaf_count = 2;
        assert!(check_batch_entry(&encode(&bad_count), &ours).is_err());
        let mut trailing = encode(&entry(ours));
        trailing.push(0);
        assert!(check_batch_entry(&trailing, &ours).is_err(), "trailing bytes are refused");
    }
}
