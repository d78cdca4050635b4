//! Stage 5's bookkeeping: batches proposed to the log and not yet committed, with whoever waits
//! for their receipts. Batches commit in order; if leadership is lost every pending batch is
//! discarded and its waiters are told to retry (the same bytes, so the retry is exactly-once).
//!
//! Generic over the waiter: the production shell waits with a connection's reply slot, the
//! simulator with a client tag.

use std::collections::{BTreeMap, HashMap};
use tally_codec::merkle::Tree;
use tally_codec::{BatchEntry, Digest, Receipt, RequestId, Signature};

/// A batch proposed but not yet committed.
pub struct PendingBatch<W> {
    pub entry: BatchEntry,
    pub header_hash: Digest,
    pub tree: Tree,
    pub ids: Vec<RequestId>,
    /// Waiters per leaf (a duplicate submission waits on the first copy's leaf).
    pub waiters: Vec<Vec<W>>,
}

impl<W> PendingBatch<W> {
    /// The receipt of leaf `leaf`, with the header's signature.
    pub fn receipt(&self, leaf: usize, signature: &Signature) -> Receipt {
        Receipt {
            request: self.entry.requests[leaf].clone(),
            outcome: self.entry.outcomes[leaf].clone(),
            leaf_index: leaf as u32,
            proof: self.tree.proof(leaf),
            header: self.entry.header.clone(),
            signature: *signature,
        }
    }
}

/// Batches in flight, by height, and an index of their request ids.
pub struct Pending<W> {
    pub batches: BTreeMap<u64, PendingBatch<W>>,
    ids: HashMap<RequestId, (u64, usize)>,
}

impl<W> Default for Pending<W> {
    fn default() -> Self {
        Pending { batches: BTreeMap::new(), ids: HashMap::new() }
    }
}

impl<W> Pending<W> {
    /// Adds a waiter to an in-flight request with this id; gives the waiter back when there is
    /// none.
    pub fn attach(&mut self, id: &RequestId, waiter: W) -> Option<W> {
        let Some(&(height, leaf)) = self.ids.get(id) else { return Some(waiter) };
        let batch = self.batches.get_mut(&height).expect("id index points at a pending batch");
        batch.waiters[leaf].push(waiter);
        None
    }

    /// Registers a batch about to be proposed. Heights are consecutive.
    pub fn insert(&mut self, batch: PendingBatch<W>) {
        let height = batch.entry.header.height;
        if let Some((&last, _)) = self.batches.last_key_value() {
            assert_eq!(last + 1, height, "pending batches are consecutive");
        }
        for (leaf, id) in batch.ids.iter().enumerate() {
            self.ids.insert(*id, (height, leaf));
        }
        self.batches.insert(height, batch);
    }

    /// Removes and returns the batch at `height`, if pending.
    pub fn take(&mut self, height: u64) -> Option<PendingBatch<W>> {
        let b = self.batches.remove(&height)?;
        for id in &b.ids {
            self.ids.remove(id);
        }
        Some(b)
    }

    /// Removes every pending batch.
    pub fn drain(&mut self) -> Vec<PendingBatch<W>> {
        self.ids.clear();
        std::mem::take(&mut self.batches).into_values().collect()
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}
