//! Stage 6: confirm. On every replica, for every committed batch, in log order: the chain and
//! the state digest are checked (I2, I3) before the header is signed. A broken check is a broken
//! invariant: the replica stops (panics; the shell turns that into the end of the process).

use tally_codec::batch::{next_state_digest, ChainHead};
use tally_codec::{decode, limits, BatchEntry, ClusterId, Committed, Digest};

/// Why a log entry can never be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("not a batch entry: {0}")]
    NotABatch(tally_codec::CodecError),
    #[error("a batch of cluster {0}, not this one")]
    OtherCluster(String),
    #[error("a batch at height 0")]
    HeightZero,
    #[error("inconsistent batch at height {height}: {why}")]
    Inconsistent { height: u64, why: tally_codec::CodecError },
}

/// Whether `data` could be applied when it commits: a consistent batch of this cluster. Judged
/// before a follower appends an entry, so nothing that can never apply reaches its log.
///
/// # Errors
/// What is wrong with the entry.
pub fn check_batch_entry(data: &[u8], cluster_id: &ClusterId) -> Result<(), EntryError> {
    decode_checked(data, cluster_id).map(|_| ())
}

/// [`check_batch_entry`], keeping what it decoded and the ids it computed: the entry is not
/// decoded and checked a second time when it commits.
///
/// # Errors
/// What is wrong with the entry.
pub fn decode_checked(data: &[u8], cluster_id: &ClusterId) -> Result<Committed, EntryError> {
    let entry: BatchEntry = decode(data, limits::ENTRY_BYTES_MAX).map_err(EntryError::NotABatch)?;
    if entry.header.cluster_id != *cluster_id {
        return Err(EntryError::OtherCluster(entry.header.cluster_id.to_hex()));
    }
    if entry.header.height == 0 {
        return Err(EntryError::HeightZero);
    }
    let batch = Committed::new(entry);
    batch
        .entry
        .check_with(&batch.ids)
        .map_err(|why| EntryError::Inconsistent { height: batch.entry.header.height, why })?;
    Ok(batch)
}

/// Checks that committed `batch` follows `head` and moves the head to it. `checked`: this
/// replica built the batch, or checked these very bytes when they were appended; otherwise the
/// Merkle root and write-set digest are re-derived from the entry before the header is trusted.
///
/// # Panics
/// When the batch does not follow the chain, belongs to another cluster, or is inconsistent with
/// its header: invariants I2 and I3 are broken and the replica must stop.
pub fn confirm(
    head: &mut ChainHead,
    entry: &BatchEntry,
    ids: &[tally_codec::RequestId],
    cluster_id: &ClusterId,
    checked: bool,
) -> Digest {
    let h = &entry.header;
    assert_eq!(h.height, head.height + 1, "committed batch height {} does not follow {}", h.height, head.height);
    assert_eq!(h.prev_hash, head.hash, "committed batch {} does not chain to the previous header", h.height);
    assert_eq!(h.cluster_id, *cluster_id, "committed batch from another cluster");
    assert_eq!(
        h.state_digest,
        next_state_digest(&head.state_digest, &h.write_set_digest),
        "state digest diverged at height {}",
        h.height
    );
    if !checked {
        if let Err(e) = entry.check_with(ids) {
            panic!("committed batch {} is inconsistent with its header: {e}", h.height);
        }
    }
    let hash = h.hash();
    *head = ChainHead { height: h.height, hash, state_digest: h.state_digest };
    hash
}

#[cfg(test)]
mod tests {
    use super::check_batch_entry;
    use tally_codec::merkle::{leaf_hash, Tree};
    use tally_codec::{
        encode, BatchEntry, BatchHeader, ClusterId, Digest, Operation, Outcome, PublicKey, Request, WriteSet,
    };

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

    /// A forged append's junk never reaches the log; only a consistent batch of this cluster is
    /// accepted.
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
