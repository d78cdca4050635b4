//! What the in-memory log keeps: entries behind the applied index for followers that lag, within
//! an entry bound and a byte bound, the chain link of every batch above the applied index (what
//! an appended batch must follow), and the snapshot raft-rs asks for when a follower is too far
//! behind.
//!
//! ```text
//!   first index        keep_from            applied             last index
//!        │── dropped ──────│── kept for laggards ─│── batch links ────│
//!                          ≥ applied − log_retain_entries, and within log_retain_bytes
//! ```
//!
//! The shell's disk keeps entries until the ledger is durable past them; this is memory only.

use crate::ledger::Ledger;
use crate::replica::ReplicaConfig;
use raft::eraftpb::{Entry, EntryType, Snapshot};
use raft::{GetEntriesContext, RawNode, Storage};
use std::collections::BTreeMap;
use tally_codec::batch::ChainHead;
use tally_codec::BatchHeader;
use tally_failover::raft_log::CoreLog;

/// Sizes and chain links of the entries the in-memory log holds.
#[derive(Default)]
pub struct Retention {
    /// Data bytes of each entry in the in-memory log, and their sum (for `log_retain_bytes`).
    entry_bytes: BTreeMap<u64, u64>,
    entry_bytes_total: u64,
    /// The chain link (height, header hash, state digest) of every batch in the log above the
    /// applied index, by log index.
    batch_links: BTreeMap<u64, ChainHead>,
}

impl Retention {
    /// What a log restored at start holds.
    ///
    /// # Errors
    /// Entries the log cannot read.
    pub fn of_log(log: &CoreLog) -> Result<Self, raft::Error> {
        let mut retention = Retention::default();
        let (first, last) = (log.first_index()?, log.last_index()?);
        if last >= first {
            let entries = log.entries(first, last + 1, None, GetEntriesContext::empty(false))?;
            retention.note_appended(&entries);
        }
        Ok(retention)
    }

    /// Records the sizes and links of entries appended to the in-memory log (a conflicting
    /// suffix is replaced).
    pub fn note_appended(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let replaced = self.entry_bytes.split_off(&first.index);
        self.entry_bytes_total -= replaced.values().sum::<u64>();
        drop(self.batch_links.split_off(&first.index));
        for e in entries {
            let b = entry_size(e);
            self.entry_bytes.insert(e.index, b);
            self.entry_bytes_total += b;
            if let Some(link) = batch_link(e) {
                self.batch_links.insert(e.index, link);
            }
        }
    }

    /// A snapshot replaced the log.
    pub fn clear(&mut self) {
        *self = Retention::default();
    }

    /// The chain link of the last batch in this log at or below `index`: a batch above the
    /// applied index, or the applied head.
    pub fn link_at_or_below(&self, index: u64, applied_index: u64, applied: ChainHead) -> ChainHead {
        if index <= applied_index {
            return applied;
        }
        match self.batch_links.range(applied_index + 1..=index).next_back() {
            Some((_, link)) => *link,
            None => applied,
        }
    }

    /// Builds a snapshot raft-rs asked for, and forgets log entries far behind the applied
    /// index (the shell's disk keeps them until the ledger is durable past them).
    pub fn maintain(&mut self, cfg: &ReplicaConfig, raw: &mut RawNode<CoreLog>, ledger: &impl Ledger) {
        let head = ledger.head();
        self.batch_links = self.batch_links.split_off(&(head.index + 1));
        let wanted = raw.store().snapshot_wanted();
        if wanted > 0 && head.index > 0 {
            if let Some(exported) = ledger.export(wanted) {
                let mut snap = Snapshot::default();
                snap.data = exported.data.into();
                let meta = snap.mut_metadata();
                meta.index = exported.index;
                meta.term = exported.term;
                meta.set_conf_state(raw.raft.prs().conf().to_conf_state());
                raw.store().prepare_snapshot(snap);
            }
        }
        let first = raw.raft.raft_log.first_index();
        let limit = head.index.min(raw.raft.raft_log.applied);
        if let Some(keep_from) = self.keep_from(cfg, first, limit) {
            raw.mut_store().mem.wl().compact(keep_from).expect("compaction behind the applied index");
            let kept = self.entry_bytes.split_off(&keep_from);
            let dropped = std::mem::replace(&mut self.entry_bytes, kept);
            self.entry_bytes_total -= dropped.values().sum::<u64>();
        }
    }

    /// The first entry to keep, when entries from `first` on are due to go: a quarter of the
    /// entry bound past it, or anything over the byte bound. Never past `limit` (applied).
    fn keep_from(&self, cfg: &ReplicaConfig, first: u64, limit: u64) -> Option<u64> {
        let mut keep_from = limit.saturating_sub(cfg.log_retain_entries);
        let mut due = keep_from > first + cfg.log_retain_entries / 4;
        if self.entry_bytes_total > cfg.log_retain_bytes {
            // Over the byte bound: drop the oldest entries until under it, never past applied.
            let mut total = self.entry_bytes_total;
            for (i, b) in &self.entry_bytes {
                if total <= cfg.log_retain_bytes || *i >= limit {
                    break;
                }
                total -= b;
                keep_from = keep_from.max(i + 1);
            }
            due |= keep_from > first;
        }
        (due && keep_from > first).then_some(keep_from)
    }
}

/// The chain link of a batch entry, read from the header that leads its encoding (`None` for
/// anything else).
fn batch_link(e: &Entry) -> Option<ChainHead> {
    if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
        return None;
    }
    let header = <BatchHeader as borsh::BorshDeserialize>::deserialize(&mut &e.data[..]).ok()?;
    Some(ChainHead { height: header.height, hash: header.hash(), state_digest: header.state_digest })
}

fn entry_size(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64
}
