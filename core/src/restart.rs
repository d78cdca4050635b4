//! Restart: raft-rs's log rebuilt from the durable ledger and the log the disk still holds.
//!
//! ```text
//!  ledger head (index i, term t, configuration)  ─▶ a marker at i: entries up to i are applied
//!  log records (snapshots, entries, hard states) ─▶ entries after i appended in order
//!                                                 ─▶ commit = max(hard state's, i), ≤ last index
//!  entries up to i still on disk, ending at (i, t) ─▶ kept, so a follower that lags a little
//!                                                     catches up from the log
//! ```
//!
//! A log that ends before the ledger's applied index (a fresh log, or one that lost its
//! unsynced tail) starts from the marker. A log with a gap the ledger does not cover, or a
//! snapshot record ahead of the ledger, is not a log this replica wrote: refused.

use crate::ledger::{Ledger, LedgerHead};
use crate::replica::{Persist, ReplicaConfig};
use crate::state::SeenIds;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, Storage};

/// The log a restarting replica finds on its disk, in the order it was written.
#[derive(Debug, Default)]
pub struct RestoredLog {
    pub records: Vec<Persist>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the log on disk is not a log this replica wrote: {0}")]
    Log(String),
}

/// raft-rs's log as of `ledger` (its durable state) and `log` (what the disk holds).
///
/// # Errors
/// A log this replica did not write, or one raft-rs refuses.
pub fn restore_log(ledger: &impl Ledger, log: RestoredLog) -> Result<MemStorage, StartError> {
    let applied = ledger.head();
    let storage = MemStorage::new_with_conf_state(ledger_conf(ledger)?);
    if applied.index > 0 {
        let conf = storage.initial_state()?.conf_state;
        marker(&storage, applied.index, applied.term.max(1), conf, "ledger marker")?;
    }
    let written = written_entries(&log.records);
    let mut hs = replay(&storage, log.records)?;
    hs.commit = hs.commit.max(applied.index).min(storage.last_index()?);
    let storage = keep_applied_tail(storage, written, &applied)?;
    storage.wl().set_hardstate(hs);
    let first = storage.first_index()?;
    assert!(first <= applied.index + 1, "the log restored goes on right after the durable state");
    Ok(storage)
}

/// raft-rs's settings for this replica, restarting with `applied` entries applied.
///
/// # Errors
/// Settings raft-rs refuses.
pub fn raft_config(cfg: &ReplicaConfig, applied: u64) -> Result<raft::Config, StartError> {
    let raft_cfg = raft::Config {
        id: cfg.node_id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: 4 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        ..Default::default()
    };
    raft_cfg.validate()?;
    Ok(raft_cfg)
}

/// The ids executed and not yet expired, as the ledger holds them. Ids are forgotten by the
/// chain's clock (header time, which never goes back), never by this replica's wall clock: with
/// a wall clock ahead of the chain, a restart would forget ids a later batch, built after the
/// clock stepped back, still takes as live (found by the simulator, seed 207739).
pub fn unexpired_seen(ledger: &impl Ledger) -> SeenIds {
    let mut seen = SeenIds::default();
    for (id, loc) in ledger.unexpired_ids(ledger.head().time_ms) {
        seen.insert(id, loc);
    }
    seen
}

/// The configuration as of the durable ledger; conf changes after it replay from the log.
fn ledger_conf(ledger: &impl Ledger) -> Result<ConfState, StartError> {
    match ledger.conf_state() {
        Some(bytes) => ConfState::parse_from_bytes(&bytes)
            .map_err(|e| StartError::Log(format!("the ledger's configuration does not decode: {e}"))),
        // A node waiting to be added (a new cluster's ledger holds its first configuration:
        // `ledger::bootstrap`).
        None => Ok(ConfState::default()),
    }
}

/// Makes `storage` start after entry `index` of `term`: the durable ledger stands in for the log
/// up to there (those entries are applied, and the disk may not hold them any more, or may have
/// lost its unsynced tail after the state was made durable).
fn marker(storage: &MemStorage, index: u64, term: u64, conf: ConfState, what: &str) -> Result<(), StartError> {
    let mut snap = Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(conf);
    storage.wl().apply_snapshot(snap).map_err(|e| StartError::Log(format!("{what}: {e}")))
}

/// The surviving log as written, below the applied index too: what each record left, a later
/// record replacing the suffix it overwrote, a snapshot or a gap starting afresh.
fn written_entries(records: &[Persist]) -> Vec<Entry> {
    let mut written: Vec<Entry> = Vec::new();
    for p in records {
        if p.snapshot.is_some() {
            written.clear();
        }
        if let Some(first) = p.entries.first() {
            written.retain(|e| e.index < first.index);
            if written.last().is_some_and(|e| e.index + 1 != first.index) {
                written.clear();
            }
            written.extend(p.entries.iter().cloned());
        }
    }
    written
}

/// Appends the records' entries the ledger does not cover, in order, and returns the last hard
/// state written.
fn replay(storage: &MemStorage, records: Vec<Persist>) -> Result<HardState, StartError> {
    let mut hs = HardState::default();
    for p in records {
        let covered = storage.first_index()? - 1;
        if let Some(s) = p.snapshot {
            if s.get_metadata().index > covered {
                return Err(StartError::Log(format!(
                    "a snapshot at {} is ahead of the durable state at {covered}",
                    s.get_metadata().index
                )));
            }
        }
        let entries: Vec<Entry> = p.entries.into_iter().filter(|e| e.index > covered).collect();
        if let Some(first) = entries.first() {
            let last = storage.last_index()?;
            if first.index > last + 1 {
                return Err(StartError::Log(format!(
                    "entries from {} follow the log's last index {last}",
                    first.index
                )));
            }
            storage.wl().append(&entries).map_err(|e| StartError::Log(format!("entries: {e}")))?;
        }
        if let Some(h) = p.hard_state {
            hs = h;
        }
    }
    Ok(hs)
}

/// Entries the ledger already applied stay in the log when the disk still holds them and they
/// end exactly at the applied entry: a follower that lags a little behind a restarted leader
/// then catches up from the log, not from a snapshot.
fn keep_applied_tail(storage: MemStorage, written: Vec<Entry>, applied: &LedgerHead) -> Result<MemStorage, StartError> {
    let tail: Vec<Entry> = written.into_iter().filter(|e| e.index <= applied.index).collect();
    let Some(last) = tail.last() else { return Ok(storage) };
    if tail.len() <= 1 || last.index != applied.index || last.term != applied.term {
        return Ok(storage);
    }
    let conf = storage.initial_state()?.conf_state;
    let last = storage.last_index()?;
    let above = if last > applied.index {
        storage.entries(applied.index + 1, last + 1, None, GetEntriesContext::empty(false))?
    } else {
        Vec::new()
    };
    let longer = MemStorage::new_with_conf_state(conf.clone());
    marker(&longer, tail[0].index, tail[0].term, conf, "log marker")?;
    longer.wl().append(&tail[1..]).map_err(|e| StartError::Log(format!("entries: {e}")))?;
    longer.wl().append(&above).map_err(|e| StartError::Log(format!("entries: {e}")))?;
    Ok(longer)
}
