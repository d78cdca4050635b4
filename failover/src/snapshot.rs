//! State transfer between the pipeline and Raft snapshots.
//!
//! A follower that needs entries the leader already compacted receives a Raft snapshot. Its data
//! is a [`SnapshotEnvelope`]: the members' addresses (a joining node learns the cluster from it),
//! the revoked node certificates (one that missed a revocation's entry learns it here) and the
//! state machine's own bytes, which only the pipeline understands.

use crate::revocation::Revocation;
use crate::storage::MemberAddr;
use borsh::{BorshDeserialize, BorshSerialize};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The state machine's bytes after entry `index` of `term`.
#[derive(Debug)]
pub struct ExportedState {
    pub index: u64,
    pub term: u64,
    pub state: Vec<u8>,
}

/// Produces the state machine's snapshot on the leader.
pub trait SnapshotSource: Send + Sync {
    /// The applied state, if one at index `at_least` or later is at hand. Called on the raft
    /// thread, so it must not do the export itself: see [`BackgroundExports`].
    ///
    /// # Errors
    /// When none is ready now (Raft asks again later).
    fn snapshot(&self, at_least: u64) -> Result<Arc<ExportedState>, String>;
}

/// What a Raft snapshot's data holds (peer protocol 3; protocol 2 had no `revoked`).
#[derive(Debug, Clone, BorshSerialize, BorshDeserialize)]
pub struct SnapshotEnvelope {
    pub members: Vec<MemberAddr>,
    pub revoked: Vec<Revocation>,
    pub state: Vec<u8>,
}

/// A snapshot's data at peer protocol 2 (release 0.3): no revoked certificates.
#[derive(Debug, Clone, BorshSerialize, BorshDeserialize)]
struct SnapshotEnvelopeV2 {
    members: Vec<MemberAddr>,
    state: Vec<u8>,
}

impl SnapshotEnvelope {
    /// The bytes of the envelope before its state, for a link at peer protocol `version`,
    /// ending with the state's length (`state_len`): the state follows as it is.
    ///
    /// # Errors
    /// A version that cannot carry what the envelope holds: protocol 2 has no revoked
    /// certificates.
    pub fn head_at(
        version: u16,
        members: &[MemberAddr],
        revoked: &[Revocation],
        state_len: usize,
    ) -> Result<Vec<u8>, String> {
        let mut head = if version >= 3 {
            SnapshotEnvelope::encode_parts(members, revoked, &[])
        } else if revoked.is_empty() {
            tally_codec::encode(&SnapshotEnvelopeV2 { members: members.to_vec(), state: Vec::new() })
        } else {
            return Err(format!(
                "the snapshot holds {} revoked certificate(s), which peer protocol {version} (release 0.3) cannot carry",
                revoked.len()
            ));
        };
        head.truncate(head.len() - 4);
        head.extend_from_slice(&(state_len as u32).to_le_bytes());
        Ok(head)
    }

    /// A snapshot's data received on a link at peer protocol `version`, as this release reads
    /// it (protocol 3's layout).
    ///
    /// # Errors
    /// Data that is not an envelope of that version.
    pub fn from_version(version: u16, data: Vec<u8>) -> Result<Vec<u8>, String> {
        if version >= 3 {
            return Ok(data);
        }
        let v2: SnapshotEnvelopeV2 = tally_codec::decode(&data, tally_codec::limits::SNAPSHOT_BYTES_MAX)
            .map_err(|e| format!("snapshot of peer protocol {version} does not decode: {e}"))?;
        Ok(SnapshotEnvelope::encode_parts(&v2.members, &[], &v2.state))
    }

    /// The encoding of `SnapshotEnvelope { members, revoked, state }` without copying `state`
    /// twice.
    pub fn encode_parts(members: &[MemberAddr], revoked: &[Revocation], state: &[u8]) -> Vec<u8> {
        let members = tally_codec::encode(&members.to_vec());
        let revoked = tally_codec::encode(&revoked.to_vec());
        let mut out = Vec::with_capacity(members.len() + revoked.len() + 4 + state.len());
        out.extend_from_slice(&members);
        out.extend_from_slice(&revoked);
        out.extend_from_slice(&(state.len() as u32).to_le_bytes());
        out.extend_from_slice(state);
        out
    }
}

type Export = dyn Fn() -> Result<ExportedState, String> + Send + Sync;

/// Snapshot exports made on their own thread, one at a time, so the raft thread never waits
/// for one: the first request starts an export and is told "not yet"; Raft asks again and gets
/// it once ready. The latest export is reused by every follower that needs one (a retry after
/// a broken link resends the same bytes, which lets the stream resume) and dropped after
/// `keep` without use, or when a newer one is needed.
pub struct BackgroundExports {
    slot: Arc<Mutex<Slot>>,
    export: Arc<Export>,
    keep: Duration,
}

#[derive(Default)]
struct Slot {
    ready: Option<(Arc<ExportedState>, Instant)>,
    building: bool,
    /// Bumped by every export, so a reaper of an older one leaves a newer one alone.
    generation: u64,
}

impl BackgroundExports {
    pub fn new(keep: Duration, export: impl Fn() -> Result<ExportedState, String> + Send + Sync + 'static) -> Self {
        BackgroundExports { slot: Arc::default(), export: Arc::new(export), keep }
    }

    /// The latest export if it is at `at_least` or later; otherwise starts one.
    ///
    /// # Errors
    /// "being prepared" until an export at `at_least` or later is ready.
    pub fn get(&self, at_least: u64) -> Result<Arc<ExportedState>, String> {
        let mut slot = self.slot.lock();
        if let Some((s, used)) = &mut slot.ready {
            if s.index >= at_least {
                *used = Instant::now();
                return Ok(s.clone());
            }
        }
        if !slot.building {
            slot.building = true;
            slot.generation += 1;
            let (cell, export, keep, generation) = (self.slot.clone(), self.export.clone(), self.keep, slot.generation);
            let spawned = std::thread::Builder::new()
                .name("snapshot-export".into())
                .spawn(move || export_then_keep(&cell, export.as_ref(), keep, generation));
            if let Err(e) = spawned {
                slot.building = false;
                return Err(format!("cannot start the snapshot export: {e}"));
            }
        }
        Err(format!("a snapshot at index {at_least} or later is being prepared"))
    }

    /// Whether an export is held now (for tests and metrics).
    pub fn held(&self) -> Option<u64> {
        self.slot.lock().ready.as_ref().map(|(s, _)| s.index)
    }
}

fn export_then_keep(cell: &Mutex<Slot>, export: &Export, keep: Duration, generation: u64) {
    let started = Instant::now();
    let result = export();
    {
        let mut slot = cell.lock();
        slot.building = false;
        match result {
            Ok(s) => {
                tracing::info!(
                    index = s.index,
                    bytes = s.state.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "state snapshot exported"
                );
                slot.ready = Some((Arc::new(s), Instant::now()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "state snapshot export failed");
                return;
            }
        }
    }
    // Hold it while it is used; let it go after `keep` idle (it may be gigabytes).
    loop {
        std::thread::sleep(keep.min(Duration::from_secs(1)).max(Duration::from_millis(10)));
        let mut slot = cell.lock();
        if slot.generation != generation {
            return;
        }
        match &slot.ready {
            Some((s, used)) if used.elapsed() >= keep && Arc::strong_count(s) == 1 => {
                tracing::info!(index = s.index, "state snapshot released after {} s unused", keep.as_secs());
                slot.ready = None;
                return;
            }
            Some(_) => {}
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {

    fn members() -> Vec<MemberAddr> {
        vec![MemberAddr { node_id: 1, client_addr: "127.0.0.1:7001".into(), peer_addr: "127.0.0.1:7101".into() }]
    }

    /// Release 0.3's envelope, as it encoded it (`{members, state}`).
    #[derive(BorshSerialize)]
    struct Release03Envelope {
        members: Vec<MemberAddr>,
        state: Vec<u8>,
    }

    #[test]
    fn a_protocol_2_link_carries_release_0_3_bytes_both_ways() {
        let state = b"the state".to_vec();
        let mut sent = SnapshotEnvelope::head_at(2, &members(), &[], state.len()).expect("no revocations");
        sent.extend_from_slice(&state);
        let release_0_3 = tally_codec::encode(&Release03Envelope { members: members(), state: state.clone() });
        assert_eq!(sent, release_0_3, "what a 0.3 replica reads");
        let read = SnapshotEnvelope::from_version(2, release_0_3).expect("decodes");
        assert_eq!(read, SnapshotEnvelope::encode_parts(&members(), &[], &state), "what this release reads");
        let mut v3 = SnapshotEnvelope::head_at(3, &members(), &[], state.len()).expect("v3");
        v3.extend_from_slice(&state);
        assert_eq!(SnapshotEnvelope::from_version(3, v3.clone()).expect("v3"), v3, "protocol 3 passes as it is");
    }

    #[test]
    fn revoked_certificates_do_not_go_over_a_protocol_2_link() {
        let revoked = [Revocation { node_id: 2, cert_fingerprint: [9; 32] }];
        let e = SnapshotEnvelope::head_at(2, &members(), &revoked, 10).expect_err("cannot carry them");
        assert!(e.contains("revoked") && e.contains("release 0.3"), "{e}");
        assert!(SnapshotEnvelope::head_at(3, &members(), &revoked, 10).is_ok());
        assert!(SnapshotEnvelope::from_version(2, vec![1, 2, 3]).is_err(), "garbage is refused, not misread");
    }
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn the_envelope_is_encoded_in_place() {
        let members = vec![MemberAddr { node_id: 2, client_addr: "c".into(), peer_addr: "p".into() }];
        let state = vec![7u8; 1000];
        let revoked = vec![Revocation { node_id: 3, cert_fingerprint: [9; 32] }];
        let whole = tally_codec::encode(&SnapshotEnvelope {
            members: members.clone(),
            revoked: revoked.clone(),
            state: state.clone(),
        });
        assert_eq!(SnapshotEnvelope::encode_parts(&members, &revoked, &state), whole);
    }

    fn wait_for(exports: &BackgroundExports, at_least: u64) -> Arc<ExportedState> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = exports.get(at_least) {
                return s;
            }
            assert!(Instant::now() < deadline, "no export in time");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The caller never waits for an export; one export serves many requests; a request for a
    /// later index starts a new one; an unused export is let go.
    #[test]
    fn exports_run_off_the_callers_thread_are_reused_and_released() {
        let applied = Arc::new(AtomicU64::new(5));
        let exports_done = Arc::new(AtomicU64::new(0));
        let (a, d) = (applied.clone(), exports_done.clone());
        let exports = BackgroundExports::new(Duration::from_millis(200), move || {
            std::thread::sleep(Duration::from_millis(100)); // a slow export
            d.fetch_add(1, Ordering::SeqCst);
            Ok(ExportedState { index: a.load(Ordering::SeqCst), term: 1, state: vec![1; 10] })
        });
        let asked = Instant::now();
        assert!(exports.get(5).is_err(), "the first request only starts the export");
        assert!(exports.get(5).is_err(), "a second request while it runs starts nothing new");
        assert!(asked.elapsed() < Duration::from_millis(100), "the caller did not wait for the export");
        assert_eq!(wait_for(&exports, 5).index, 5);
        assert_eq!(wait_for(&exports, 3).index, 5, "an export at a later index serves an older request");
        assert_eq!(exports_done.load(Ordering::SeqCst), 1);
        applied.store(9, Ordering::SeqCst);
        assert_eq!(wait_for(&exports, 7).index, 9);
        assert_eq!(exports_done.load(Ordering::SeqCst), 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while exports.held().is_some() {
            assert!(Instant::now() < deadline, "the unused export is released");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
