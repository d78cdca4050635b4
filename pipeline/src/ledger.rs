//! The core's [`Ledger`] on the production store: LevelDB and the segment files
//! ([`tally_store::state::Store`]), shared with the connection threads that read it.
//!
//! Snapshots: a large state is exported on its own thread ([`BackgroundExports`]), never on the
//! replica's. Until it is ready, [`Ledger::export`] says "not yet" and raft-rs asks again. The
//! data handed to raft-rs is a [`SnapshotEnvelope`] with the members' addresses and an empty
//! state: the peer transport streams the held export in its place, in chunks, so the state is
//! never copied on the replica thread. The follower's transport reassembles the whole envelope.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tally_codec::limits::SNAPSHOT_BYTES_MAX;
use tally_codec::{BatchEntry, DocKey, DocMeta, PublicKey, Receipt, RequestId, RequestLocation, Signature};
use tally_core::ledger::{Exported, LedgerError};
use tally_core::{Ledger, LedgerHead};
use tally_failover::snapshot::{BackgroundExports, ExportedState, SnapshotEnvelope, SnapshotSource};
use tally_failover::storage::MemberAddr;
use tally_store::state::{StateSnapshot, Store};

/// How long an unused export is kept for the next follower that needs one.
pub const EXPORT_KEEP: Duration = Duration::from_secs(60);

/// The members' addresses as the replica thread knows them, shared with the ledger (snapshots
/// carry them) and the API (status, leader address).
pub type Members = Arc<Mutex<std::collections::BTreeMap<u64, MemberAddr>>>;

/// The production ledger.
pub struct StoreLedger {
    store: Arc<Mutex<Store>>,
    exports: Arc<BackgroundExports>,
    members: Members,
    /// The members an installed snapshot carried, for the shell to persist with its marker.
    installed_members: Mutex<Option<Vec<MemberAddr>>>,
}

fn store_failed(what: &str, e: impl std::fmt::Display) -> ! {
    // A store that cannot be read cannot serve the state machine; the replica ends and a backup
    // takes over (DESIGN §8: a broken invariant ends the replica).
    panic!("store {what} failed: {e}")
}

impl StoreLedger {
    pub fn new(store: Arc<Mutex<Store>>, members: Members) -> Self {
        let source = store.clone();
        let exports = Arc::new(BackgroundExports::new(EXPORT_KEEP, move || export(&source)));
        StoreLedger { store, exports, members, installed_members: Mutex::new(None) }
    }

    /// What the peer transport streams in place of a snapshot's empty state.
    pub fn snapshot_source(&self) -> Arc<dyn SnapshotSource> {
        Arc::new(Source(self.exports.clone()))
    }

    /// The members the last installed snapshot carried (taken once).
    pub fn take_installed_members(&self) -> Option<Vec<MemberAddr>> {
        self.installed_members.lock().take()
    }
}

struct Source(Arc<BackgroundExports>);

impl SnapshotSource for Source {
    fn snapshot(&self, at_least: u64) -> Result<Arc<ExportedState>, String> {
        self.0.get(at_least)
    }
}

/// Exports the store (on the export thread; the store lock is held while it is read, the
/// encoding is done after).
fn export(store: &Mutex<Store>) -> Result<ExportedState, String> {
    let snap = store.lock().export_snapshot().map_err(|e| format!("snapshot export: {e}"))?;
    let state = tally_codec::encode(&snap);
    if state.len() > SNAPSHOT_BYTES_MAX {
        return Err(format!("the state ({} bytes) is over the snapshot limit of {SNAPSHOT_BYTES_MAX}", state.len()));
    }
    tracing::info!(index = snap.applied.index, height = snap.applied.height, bytes = state.len(), "state exported");
    Ok(ExportedState { index: snap.applied.index, term: snap.applied.term, state })
}

fn decode_envelope(data: &[u8]) -> Result<(SnapshotEnvelope, StateSnapshot), LedgerError> {
    let env: SnapshotEnvelope = tally_codec::decode(data, SNAPSHOT_BYTES_MAX)
        .map_err(|e| LedgerError::Snapshot(format!("snapshot does not decode: {e}")))?;
    if env.members.iter().any(|m| m.node_id == 0) {
        return Err(LedgerError::Snapshot("snapshot names node 0".into()));
    }
    let snap: StateSnapshot = tally_codec::decode(&env.state, SNAPSHOT_BYTES_MAX)
        .map_err(|e| LedgerError::Snapshot(format!("snapshot state does not decode: {e}")))?;
    Ok((env, snap))
}

impl Ledger for StoreLedger {
    fn head(&self) -> LedgerHead {
        let a = self.store.lock().applied();
        LedgerHead {
            index: a.index,
            term: a.term,
            height: a.height,
            header_hash: a.header_hash,
            state_digest: a.state_digest,
            time_ms: a.time_ms,
        }
    }
    fn balance(&self, account: &PublicKey) -> Option<u64> {
        self.store.lock().balance(account).unwrap_or_else(|e| store_failed("read", e))
    }
    fn doc_meta(&self, key: &DocKey) -> Option<DocMeta> {
        self.store.lock().doc_meta(key).unwrap_or_else(|e| store_failed("read", e))
    }
    fn doc(&self, key: &DocKey) -> Option<(DocMeta, Vec<u8>)> {
        self.store.lock().doc(key).unwrap_or_else(|e| store_failed("read", e))
    }
    fn receipt(&self, id: &RequestId) -> Option<Receipt> {
        self.store.lock().receipt(id).unwrap_or_else(|e| store_failed("read", e))
    }
    fn unexpired_ids(&self, now_ms: u64) -> Vec<(RequestId, RequestLocation)> {
        let store = self.store.lock();
        let prefix = store.tables().requests.0;
        let pairs = store.kv_scan(&prefix).unwrap_or_else(|e| store_failed("scan", e));
        pairs
            .into_iter()
            .filter_map(|(k, v)| {
                let id = RequestId(<[u8; 32]>::try_from(k.get(4..)?).ok()?);
                let loc = tally_codec::decode::<RequestLocation>(&v, 64).ok()?;
                (loc.expires_at_ms >= now_ms).then_some((id, loc))
            })
            .collect()
    }
    fn apply_batch(
        &mut self,
        index: u64,
        term: u64,
        entry: &BatchEntry,
        signature: &Signature,
    ) -> Result<(), LedgerError> {
        assert_eq!(entry.header.term, term, "a batch commits in the term it was built in");
        self.store.lock().apply_batch(index, entry, signature).map_err(|e| LedgerError::Write(e.to_string()))
    }
    fn apply_noop(&mut self, index: u64, term: u64) -> Result<(), LedgerError> {
        self.store.lock().apply_noop_at(index, term).map_err(|e| LedgerError::Write(e.to_string()))
    }
    fn apply_conf(&mut self, index: u64, term: u64, conf_state: Vec<u8>) -> Result<(), LedgerError> {
        self.store.lock().apply_conf(index, term, &conf_state).map_err(|e| LedgerError::Write(e.to_string()))
    }
    fn conf_state(&self) -> Option<Vec<u8>> {
        self.store.lock().conf().unwrap_or_else(|e| store_failed("read", e))
    }
    fn export(&self, at_least: u64) -> Option<Exported> {
        match self.exports.get(at_least) {
            Ok(held) => {
                let members: Vec<MemberAddr> = self.members.lock().values().cloned().collect();
                Some(Exported {
                    index: held.index,
                    term: held.term,
                    data: SnapshotEnvelope::encode_parts(&members, &[]),
                })
            }
            Err(why) => {
                tracing::debug!(at_least, %why, "snapshot not ready");
                None
            }
        }
    }
    fn check_snapshot(&self, data: &[u8]) -> Result<(), LedgerError> {
        let (_, snap) = decode_envelope(data)?;
        if snap.applied.index == 0 {
            return Err(LedgerError::Snapshot("snapshot at index 0".into()));
        }
        let meta = self.store.lock().tables().meta.0;
        if snap.pairs.iter().any(|(k, _)| k.starts_with(&meta)) {
            return Err(LedgerError::Snapshot("snapshot carries the store's own metadata".into()));
        }
        Ok(())
    }
    fn install(&mut self, index: u64, term: u64, conf_state: Vec<u8>, data: &[u8]) -> Result<(), LedgerError> {
        let (env, mut snap) = decode_envelope(data)?;
        if snap.applied.index != index {
            return Err(LedgerError::Snapshot(format!(
                "snapshot data is at index {}, Raft says {index}",
                snap.applied.index
            )));
        }
        snap.applied.term = term;
        tracing::info!(index, height = snap.applied.height, bytes = data.len(), "installing snapshot");
        self.store
            .lock()
            .install_snapshot_with_conf(&snap, Some(&conf_state))
            .map_err(|e| LedgerError::Snapshot(e.to_string()))?;
        metrics::counter!("tally_snapshot_installs_total").increment(1);
        *self.installed_members.lock() = Some(env.members);
        Ok(())
    }
}
