//! What the core's integration tests share.

use tally_codec::ClusterId;
use tally_core::{Plant, ReplicaConfig};

/// A replica of the voters 1, 2 and 3 with 50 ms ticks, elections after 10–20 ticks and
/// heartbeats every 2.
pub fn replica_config(node_id: u64, election_seed: u64) -> ReplicaConfig {
    ReplicaConfig {
        node_id,
        cluster_id: ClusterId([5; 16]),
        tick_ms: 50,
        election_ticks: 10,
        heartbeat_ticks: 2,
        batch_interval_ms: 100,
        batch_requests_max: 100,
        batch_bytes_max: 1 << 20,
        log_retain_entries: 16,
        log_retain_bytes: 64 << 20,
        operator_key: ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        election_seed,
        plant: Plant::None,
        snapshot_reports_by_shell: false,
        campaign_on_leader_down: true,
    }
}
