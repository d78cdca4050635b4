//! What only the simulator can check, on top of the shared checks (`tally_check`,
//! `docs/testing.md`): the shared model allows what a real replica does and a simulated one
//! must not.

use tally_check::check::{check_all, Verdicts, Violation};
use tally_check::history::RunRecord;

/// Every shared check ([`check_all`]), then [`check_full_ledgers`].
pub fn check_run(run: &RunRecord, liveness_bound_ms: u64) -> Verdicts {
    let mut verdicts = check_all(run, liveness_bound_ms);
    verdicts.violations.extend(check_full_ledgers(run));
    verdicts
}

/// I2 in simulation: every replica holds its ledger from height 1. A simulated replica's ledger
/// (`MemLedger`) keeps every batch and its snapshots carry them all, so one that starts later
/// lost batches. (A real replica restored from a snapshot holds only the later ones, which the
/// shared checks allow.)
pub fn check_full_ledgers(run: &RunRecord) -> Vec<Violation> {
    run.replicas
        .iter()
        .filter_map(|r| {
            let first = r.batches.first()?.header.height;
            (first != 1).then(|| {
                Violation::new("I2", format!("node {}: its ledger starts at height {first}, not at 1", r.node_id))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_check::history::{History, ReplicaFinal, StoredBatch};
    use tally_codec::{BatchHeader, ClusterId, Digest, PublicKey, Signature};

    fn replica(node_id: u64, heights: std::ops::RangeInclusive<u64>) -> ReplicaFinal {
        let batch = |height| StoredBatch {
            header: BatchHeader {
                cluster_id: ClusterId([1; 16]),
                height,
                prev_hash: Digest::ZERO,
                merkle_root: Digest::ZERO,
                leaf_count: 0,
                write_set_digest: Digest::ZERO,
                state_digest: Digest::ZERO,
                term: 1,
                time_ms: height,
            },
            signature: Signature([0; 64]),
            request_ids: Vec::new(),
            outcomes: Vec::new(),
        };
        ReplicaFinal {
            node_id,
            applied_height: *heights.end(),
            batches: heights.map(batch).collect(),
            state_digest: Digest::ZERO,
            balances: Vec::new(),
        }
    }

    #[test]
    fn a_simulated_replica_missing_its_first_batches_is_an_i2_violation() {
        let run = |replicas| RunRecord {
            operator: PublicKey([0; 32]),
            genesis_total: 0,
            history: History::default(),
            replicas,
            headers: Vec::new(),
            healed_at_ms: 0,
            height_at_heal: 0,
            height_at_end: None,
            first_commit_after_heal_ms: None,
        };
        assert_eq!(check_full_ledgers(&run(vec![replica(1, 1..=3), replica(2, 1..=2)])), vec![]);
        let v = check_full_ledgers(&run(vec![replica(1, 1..=3), replica(2, 2..=3)]));
        assert_eq!(v, vec![Violation::new("I2", "node 2: its ledger starts at height 2, not at 1")]);
    }
}
