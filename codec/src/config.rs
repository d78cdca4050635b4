//! Node configuration (TOML), written by `tally cluster init` and read by `tallyd --config`.
//! Only the data type lives here so both binaries agree on it; reading files is theirs.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    pub node_id: u64,
    /// Client address (HOST:PORT).
    pub client: String,
    /// Peer (replication) address (HOST:PORT).
    pub peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    /// Hex cluster id; must match the genesis file and every peer.
    pub cluster_id: String,
    pub data_dir: String,
    /// Client address to listen on.
    pub listen: String,
    /// Peer address to listen on.
    pub peer_listen: String,
    /// Secret operator key file (hex of the 32-byte ed25519 seed). Shared by all replicas:
    /// deterministic ed25519 makes their signatures over one header identical.
    pub operator_key_file: String,
    pub genesis_file: String,
    /// All voters at cluster creation, this node included.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default = "default_batch_interval_ms")]
    pub batch_interval_ms: u64,
    #[serde(default = "default_batch_requests_max")]
    pub batch_requests_max: usize,
    /// Prometheus /metrics address; none disables it.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Raft tick length.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Election timeout in ticks (randomised in [n, 2n)).
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    #[serde(default = "default_heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// A follower whose connection from the leader closes, and whose reconnect to the leader's
    /// peer port is refused (no process listens there: a crash or kill -9), campaigns within a
    /// heartbeat interval instead of waiting out the election timeout. Turn it off on networks
    /// that forge TCP resets for a live host (a firewall rejecting with `tcp-reset`): there a
    /// refused connection does not prove the leader is gone, and its lease reads could go stale.
    #[serde(default = "default_true")]
    pub campaign_on_leader_down: bool,
    /// Turning fsync off voids every durability claim; for experiments only.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// How often the state store is made durable (every file fsynced) so the log can be
    /// compacted behind it. Each sync competes with the log's fsyncs for the disk.
    #[serde(default = "default_store_sync_interval_ms")]
    pub store_sync_interval_ms: u64,
    /// Log entries (batches) kept behind the durable store, so a lagging follower catches up from
    /// the log rather than a snapshot. One entry holds up to `batch_requests_max` requests, so
    /// this is also a disk budget: 2,000 batches at ~45k requests/s is ~200 s and ~1.5 GB.
    #[serde(default = "default_log_retain_entries")]
    pub log_retain_entries: u64,
    /// A batch is closed before its Raft entry would pass this many bytes (an estimate from the
    /// requests' sizes, kept well below the proposal limit of one peer frame). A single request
    /// larger than this is refused alone with `ProposalTooLarge`.
    #[serde(default = "default_batch_bytes_max")]
    pub batch_bytes_max: usize,
    /// The cluster CA (PEM). With `tls_cert_file` and `tls_key_file`: TLS on the client port and
    /// mutual TLS between replicas. `cluster init` writes all three.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// This node's certificate (PEM), issued by the cluster CA for `node-<id>.tally`.
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    /// This node's private key (PEM).
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// Serve both ports without TLS: anyone who reaches the peer port is a replica. Only for
    /// local experiments; without TLS files a node refuses to start unless this is set.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Hex ed25519 public keys that may change the cluster (membership, state scans). Nobody
    /// else can; with none listed, nobody can.
    #[serde(default)]
    pub admin_keys: Vec<String>,
    /// `GET /health/ready` on the metrics port answers 200 only while this replica knows a
    /// leader and its applied index is at most this many log entries (batches) behind the
    /// leader's commit index as this replica last heard it.
    #[serde(default = "default_ready_max_lag_batches")]
    pub ready_max_lag_batches: u64,
    /// How `tallyd` writes its log on stderr: `text` (human-readable lines) or `json` (one JSON
    /// object per line, for log shippers). `tallyd --log-format` overrides it.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// The format of `tallyd`'s log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's fields.
    Json,
}

pub fn default_ready_max_lag_batches() -> u64 {
    10
}

pub fn default_batch_bytes_max() -> usize {
    8 * 1024 * 1024
}

pub fn default_store_sync_interval_ms() -> u64 {
    30_000
}
pub fn default_log_retain_entries() -> u64 {
    2_000
}

pub fn default_batch_interval_ms() -> u64 {
    100
}
pub fn default_batch_requests_max() -> usize {
    16_384
}
pub fn default_tick_ms() -> u64 {
    50
}
/// 20 ticks of 50 ms: a follower waits 1–2 s without word from its leader before it campaigns.
/// Ten (0.5–1 s) let a full-load run on two cores elect twice in ten minutes with every replica
/// alive; a leader that is killed is replaced within a heartbeat interval anyway
/// (`campaign_on_leader_down`), so the longer timeout only slows failover when the leader's host
/// goes silent without closing its connections.
pub fn default_election_ticks() -> usize {
    20
}
pub fn default_heartbeat_ticks() -> usize {
    2
}
fn default_true() -> bool {
    true
}
