//! Turning a configuration into a running replica.

use ed25519_dalek::SigningKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tally_codec::config::NodeConfig;
use tally_codec::genesis::Genesis;
use tally_codec::{ClusterId, PublicKey};
use tally_failover::config::RaftConfig;
use tally_failover::env::SystemEnv;
use tally_failover::storage::MemberAddr;
use tally_failover::transport::PeerSecurity;
use tally_failover::Member;
use tally_pipeline::{Node, NodeOptions};
use tally_store::state::Store;
use tally_store::wal::{Wal, WalOptions};
use tally_store::StoreError;

/// Largest node configuration file read (a few KB in practice).
pub const CONFIG_BYTES_MAX: usize = 1 << 20;
/// Largest operator key file read (64 hex digits and a newline).
pub const OPERATOR_KEY_FILE_BYTES_MAX: usize = 4096;

/// Reads at most `bytes_max` bytes of `path`, refusing a longer file before reading it whole.
///
/// # Errors
/// Names `what`, the file and the problem.
fn read_at_most(path: &Path, bytes_max: usize, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {what} {}: {e}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(bytes_max as u64 + 1).read_to_end(&mut bytes)).map_err(cannot)?;
    if bytes.len() > bytes_max {
        return Err(format!("{what} {} is over {bytes_max} bytes, the most a {what} may be", path.display()));
    }
    Ok(bytes)
}

/// [`read_at_most`] as UTF-8 text.
fn read_text_at_most(path: &Path, bytes_max: usize, what: &str) -> Result<String, String> {
    String::from_utf8(read_at_most(path, bytes_max, what)?)
        .map_err(|_| format!("{what} {} is not UTF-8 text", path.display()))
}

/// Reads a node TOML.
///
/// # Errors
/// One line naming the file, the key (`tick_ms`, `peers[0].node_id`) and the line where
/// possible, and what is wrong.
pub fn load_config(path: &Path) -> Result<NodeConfig, String> {
    let text = read_text_at_most(path, CONFIG_BYTES_MAX, "config file")?;
    parse_config(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

/// Parses a node TOML; the error names the key and the line.
fn parse_config(text: &str) -> Result<NodeConfig, String> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let mut message = inner.message().trim().replace('\n', " ");
        // "unknown field `x`, expected one of `node_id`, ... (every key)": the key is enough.
        if message.starts_with("unknown field") {
            if let Some(cut) = message.find(", expected") {
                message.truncate(cut);
                message.push_str(" (the keys are listed in docs/configuration.md)");
            }
        }
        let line = inner
            .span()
            .filter(|_| !message.starts_with("missing field"))
            .map(|s| text.get(..s.start).unwrap_or(text).matches('\n').count() + 1);
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        // The path is "." at the top level (a missing or unknown key, a syntax error).
        if key == "." || key.is_empty() {
            format!("{message}{at}")
        } else {
            format!("key `{key}`: {message}{at}")
        }
    })
}

/// Checks what a configuration points to before anything starts: every file it names can be
/// read, the data directory can be created, the cluster id, genesis and operator key agree, and
/// the TLS and admin settings are well-formed.
///
/// # Errors
/// One line naming the config file, the key and the path or value, and the cause.
pub fn check_config(cfg: &NodeConfig, path: &Path) -> Result<(), String> {
    let at = |key: &str, what: String| format!("config {}: key `{key}`: {what}", path.display());
    if cfg.node_id == 0 {
        return Err(at("node_id", "0 is reserved; node ids start at 1".into()));
    }
    let mut files =
        vec![("operator_key_file", cfg.operator_key_file.as_str()), ("genesis_file", cfg.genesis_file.as_str())];
    for (key, value) in
        [("tls_ca_file", &cfg.tls_ca_file), ("tls_cert_file", &cfg.tls_cert_file), ("tls_key_file", &cfg.tls_key_file)]
    {
        if let Some(v) = value {
            files.push((key, v.as_str()));
        }
    }
    for (key, file) in files {
        std::fs::read(file).map_err(|e| at(key, format!("cannot read {file}: {e}")))?;
    }
    let data_dir = Path::new(&cfg.data_dir);
    std::fs::create_dir_all(data_dir)
        .map_err(|e| at("data_dir", format!("cannot create {}: {e}", data_dir.display())))?;
    let cluster_id =
        ClusterId::from_hex(&cfg.cluster_id).map_err(|e| at("cluster_id", format!("{:?}: {e}", cfg.cluster_id)))?;
    let genesis = read_genesis(Path::new(&cfg.genesis_file)).map_err(|e| at("genesis_file", e))?;
    let genesis_cluster = genesis.cluster().map_err(|e| at("genesis_file", format!("{}: {e}", cfg.genesis_file)))?;
    if genesis_cluster != cluster_id {
        return Err(at(
            "cluster_id",
            format!("{cluster_id} but genesis_file {} is for cluster {genesis_cluster}", cfg.genesis_file),
        ));
    }
    let operator = read_operator_key(Path::new(&cfg.operator_key_file)).map_err(|e| at("operator_key_file", e))?;
    let operator_pub = PublicKey(operator.verifying_key().to_bytes());
    if genesis.operator().map_err(|e| at("genesis_file", e.to_string()))? != operator_pub {
        return Err(at(
            "operator_key_file",
            format!(
                "{} holds operator key {operator_pub}, but genesis_file {} names {}",
                cfg.operator_key_file, cfg.genesis_file, genesis.operator_key
            ),
        ));
    }
    let entry_max = tally_failover::config::PROPOSAL_BYTES_MAX;
    if cfg.batch_bytes_max == 0 || cfg.batch_bytes_max > entry_max {
        return Err(at(
            "batch_bytes_max",
            format!(
                "{} must be between 1 and {entry_max} (a batch entry must fit one peer frame)",
                cfg.batch_bytes_max
            ),
        ));
    }
    let requests_max = tally_codec::limits::BATCH_REQUESTS_MAX;
    if cfg.batch_requests_max == 0 || cfg.batch_requests_max > requests_max {
        return Err(at(
            "batch_requests_max",
            format!(
                "{} must be between 1 and {requests_max} (a lease id holds a request's position in its batch)",
                cfg.batch_requests_max
            ),
        ));
    }
    tls_files(cfg).map_err(|e| format!("config {}: {e}", path.display()))?;
    admin_keys(cfg).map_err(|e| at("admin_keys", e))?;
    Ok(())
}

/// The configuration of a single-replica cluster kept in `dir`. On first start it creates the
/// operator key and a genesis (empty, or with the accounts of `genesis_from`).
///
/// # Errors
/// When files can't be read or written.
pub fn single_replica_config(
    dir: &Path,
    listen: &str,
    genesis_from: Option<&Path>,
    metrics_listen: Option<String>,
    batch_interval_ms: u64,
) -> Result<NodeConfig, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    let key_file = dir.join("operator.key");
    if !key_file.exists() {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        write_secret(&key_file, &hex::encode(key.to_bytes()))?;
        std::fs::write(dir.join("operator.pub"), format!("{}\n", hex::encode(key.verifying_key().to_bytes())))
            .map_err(|e| format!("cannot write operator.pub: {e}"))?;
    }
    let operator = read_operator_key(&key_file)?;
    let genesis_file = dir.join("genesis.json");
    if !genesis_file.exists() {
        let accounts = match genesis_from {
            Some(p) => read_genesis(p)?.accounts,
            None => Vec::new(),
        };
        let mut cluster = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut cluster);
        let g = Genesis {
            cluster_id: hex::encode(cluster),
            operator_key: hex::encode(operator.verifying_key().to_bytes()),
            accounts,
        };
        let json = serde_json::to_string_pretty(&g).map_err(|e| e.to_string())?;
        std::fs::write(&genesis_file, json).map_err(|e| format!("cannot write {}: {e}", genesis_file.display()))?;
    }
    let genesis = read_genesis(&genesis_file)?;
    Ok(NodeConfig {
        node_id: 1,
        cluster_id: genesis.cluster_id.clone(),
        data_dir: dir.display().to_string(),
        listen: listen.to_string(),
        peer_listen: "127.0.0.1:0".into(),
        operator_key_file: key_file.display().to_string(),
        genesis_file: genesis_file.display().to_string(),
        peers: Vec::new(),
        batch_interval_ms,
        batch_requests_max: tally_codec::config::default_batch_requests_max(),
        metrics_listen,
        tick_ms: tally_codec::config::default_tick_ms(),
        election_ticks: tally_codec::config::default_election_ticks(),
        heartbeat_ticks: tally_codec::config::default_heartbeat_ticks(),
        campaign_on_leader_down: true,
        fsync: true,
        store_sync_interval_ms: tally_codec::config::default_store_sync_interval_ms(),
        log_retain_entries: tally_codec::config::default_log_retain_entries(),
        batch_bytes_max: tally_codec::config::default_batch_bytes_max(),
        tls_ca_file: None,
        tls_cert_file: None,
        tls_key_file: None,
        // The one-command quick start: a cluster of one, plaintext, on loopback only (checked
        // when the listener is bound, and said in the log).
        insecure_plaintext: true,
        admin_keys: Vec::new(),
        log_format: tally_codec::config::LogFormat::default(),
        ready_max_lag_batches: tally_codec::config::default_ready_max_lag_batches(),
    })
}

/// The node's TLS files, all three or none.
///
/// # Errors
/// Names the missing key when only some are set, or when none are set and the configuration
/// does not opt into plaintext.
pub fn tls_files(cfg: &NodeConfig) -> Result<Option<tally_net::TlsFiles>, String> {
    match (&cfg.tls_ca_file, &cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(ca), Some(cert), Some(key)) => {
            Ok(Some(tally_net::TlsFiles { ca: ca.into(), cert: cert.into(), key: key.into() }))
        }
        (None, None, None) if cfg.insecure_plaintext => Ok(None),
        (None, None, None) => {
            Err("no TLS: set tls_ca_file, tls_cert_file and tls_key_file (tally cluster init writes them), \
             or opt into insecure_plaintext = true for a local experiment"
                .into())
        }
        _ => Err("tls_ca_file, tls_cert_file and tls_key_file must be set together".into()),
    }
}

fn admin_keys(cfg: &NodeConfig) -> Result<Vec<PublicKey>, String> {
    cfg.admin_keys
        .iter()
        .map(|k| PublicKey::from_hex(k.trim()).map_err(|e| format!("entry {k:?} is not a public key: {e}")))
        .collect()
}

/// Raft settings from the node config. Peers must agree on the timing and the genesis, so both
/// go into the fingerprint the handshake compares.
fn raft_config(cfg: &NodeConfig, genesis_text: &[u8], peer_security: PeerSecurity) -> RaftConfig {
    let fingerprint_at = |version: u16| {
        RaftConfig::fingerprint(version, cfg.tick_ms, cfg.election_ticks, cfg.heartbeat_ticks, genesis_text)
    };
    RaftConfig {
        node_id: cfg.node_id,
        peers: cfg
            .peers
            .iter()
            .map(|p| Member {
                node_id: p.node_id,
                client_addr: p.client.clone(),
                peer_addr: p.peer.clone(),
                is_voter: true,
                matched_index: 0,
            })
            .collect(),
        peer_listen: cfg.peer_listen.clone(),
        tick_ms: cfg.tick_ms,
        election_ticks: cfg.election_ticks,
        heartbeat_ticks: cfg.heartbeat_ticks,
        cluster_id: cfg.cluster_id.clone(),
        local: tally_failover::handshake::LocalPeer::new(&cfg.cluster_id, cfg.node_id, fingerprint_at),
        peer_security,
    }
}

fn write_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a hex ed25519 seed.
///
/// # Errors
/// Names the file and the problem.
pub fn read_operator_key(path: &Path) -> Result<SigningKey, String> {
    let text = read_text_at_most(path, OPERATOR_KEY_FILE_BYTES_MAX, "operator key")?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|e| format!("operator key {} must be 64 hex digits: {e}", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn read_genesis(path: &Path) -> Result<Genesis, String> {
    let text = read_text_at_most(path, tally_codec::genesis::GENESIS_BYTES_MAX, "genesis")?;
    Genesis::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Opens the store and log, starts the pipeline and the replicator, then serves until killed.
///
/// # Errors
/// Any setup failure, with the reason.
pub fn run(cfg: NodeConfig) -> Result<(), String> {
    let (operator, genesis, cluster_id) = read_trust_anchors(&cfg)?;
    let operator_pub = PublicKey(operator.verifying_key().to_bytes());
    let data_dir = PathBuf::from(&cfg.data_dir);
    let (store, wal) = open_store_and_log(&cfg, &data_dir, &genesis)?;
    let health = Arc::new(crate::metrics_http::Health::default());
    let metrics_handle = match &cfg.metrics_listen {
        Some(addr) => {
            let handle = crate::metrics_http::install()?;
            crate::metrics_http::serve(addr, handle.clone(), health.clone())?;
            Some(handle)
        }
        None => None,
    };
    let (opts, peer_security) = node_options(&cfg, cluster_id, operator)?;
    let genesis_text = read_at_most(Path::new(&cfg.genesis_file), tally_codec::genesis::GENESIS_BYTES_MAX, "genesis")?;
    let raft_cfg = raft_config(&cfg, &genesis_text, peer_security);
    let shell = shell_config(&cfg, &raft_cfg)?;
    let node = Node::start(opts, store, shell, wal, Box::new(SystemEnv::new(None)))?;
    install_ready_check(&health, &node, cfg.ready_max_lag_batches);
    tracing::info!(node = cfg.node_id, addr = %node.local_addr, operator = %operator_pub, "tallyd serving");
    if cfg.log_format == tally_codec::config::LogFormat::Text {
        // The JSON log holds the line above; stderr then carries nothing but JSON objects.
        eprintln!("tallyd node {} listening on {} (operator key {})", cfg.node_id, node.local_addr, operator_pub);
    }
    serve_until_stopped(&node, &data_dir, metrics_handle.as_ref())
}

/// The operator key, the genesis and the cluster id, once they are found to agree.
fn read_trust_anchors(cfg: &NodeConfig) -> Result<(SigningKey, Genesis, ClusterId), String> {
    let operator = read_operator_key(Path::new(&cfg.operator_key_file))?;
    let genesis = read_genesis(Path::new(&cfg.genesis_file))?;
    let cluster_id = ClusterId::from_hex(&cfg.cluster_id).map_err(|e| format!("config cluster_id: {e}"))?;
    let genesis_cluster = genesis.cluster().map_err(|e| e.to_string())?;
    if genesis_cluster != cluster_id {
        return Err(format!("genesis is for cluster {genesis_cluster}, config says {cluster_id}"));
    }
    let operator_pub = PublicKey(operator.verifying_key().to_bytes());
    if genesis.operator().map_err(|e| e.to_string())? != operator_pub {
        return Err(format!(
            "operator key {} does not match the genesis operator key {}",
            operator_pub, genesis.operator_key
        ));
    }
    Ok((operator, genesis, cluster_id))
}

/// Opens the store (writing the genesis into a new one) and the log in `data_dir`, creating it;
/// on a full disk, waits for space.
fn open_store_and_log(cfg: &NodeConfig, data_dir: &Path, genesis: &Genesis) -> Result<(Store, Wal), String> {
    std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    prepare_data_dir(data_dir)?;
    let mut store = wait_for_space(data_dir, || Store::open(data_dir))
        .map_err(|e| format!("cannot open store in {}: {e}", data_dir.display()))?;
    if !store.is_initialized() {
        store.init_genesis(&genesis.balances().map_err(|e| e.to_string())?).map_err(|e| format!("genesis: {e}"))?;
        store.sync_all().map_err(|e| format!("genesis sync: {e}"))?;
    }
    let wal = wait_for_space(data_dir, || {
        Wal::open(&data_dir.join("log"), WalOptions { fsync: cfg.fsync, ..WalOptions::default() })
    })
    .map_err(|e| format!("cannot open log in {}: {e}", data_dir.display()))?;
    Ok((store, wal))
}

/// Brings the data directory to this binary's format before anything opens it: a new directory
/// is marked, an older one migrated in place (with a progress line), a newer one refused.
fn prepare_data_dir(data_dir: &Path) -> Result<(), String> {
    use tally_store::format::{prepare, Progress, DATA_FORMAT};
    let mut report = |p: Progress| {
        tracing::info!(to = p.to, done = p.done, total = p.total, "migrating the data directory to format {}", p.to);
    };
    let prepared = wait_for_space(data_dir, || prepare(data_dir, &mut report))
        .map_err(|e| format!("cannot open the data directory {}: {e}", data_dir.display()))?;
    if let Some(from) = prepared.found.filter(|f| *f < DATA_FORMAT) {
        tracing::info!(from, to = DATA_FORMAT, dir = %data_dir.display(), "data directory migrated");
    }
    Ok(())
}

/// The pipeline's options and how peer links are protected. The client port's TLS, how
/// relayed requests dial the leader and the peer links' protection all come from the TLS files,
/// or are plaintext everywhere (with a warning).
fn node_options(
    cfg: &NodeConfig,
    cluster_id: ClusterId,
    operator: SigningKey,
) -> Result<(NodeOptions, PeerSecurity), String> {
    let tls = tls_files(cfg)?;
    let (client_tls, relay_dial, peer_security) = match &tls {
        Some(files) => (
            Some(
                tally_net::tls::server_config(files, tally_net::ClientAuth::Optional)
                    .map_err(|e| format!("client TLS: {e}"))?,
            ),
            tally_net::Dial::as_node(files).map_err(|e| format!("relay TLS: {e}"))?,
            PeerSecurity::from_files(files).map_err(|e| format!("peer TLS: {e}"))?,
        ),
        None => {
            let solo = cfg.peers.iter().all(|p| p.node_id == cfg.node_id);
            if solo && tally_net::tls::is_loopback(&cfg.listen) {
                tracing::warn!(listen = %cfg.listen, "plaintext client port (quick-start mode: one replica on loopback)");
            } else {
                tracing::warn!(listen = %cfg.listen, peer_listen = %cfg.peer_listen, "INSECURE: plaintext on every port (insecure_plaintext = true): anyone who reaches the peer port is a replica");
            }
            (None, tally_net::Dial::Plain, PeerSecurity::InsecurePlaintext)
        }
    };
    let opts = NodeOptions {
        node_id: cfg.node_id,
        cluster_id,
        operator_key: operator,
        batch_interval_ms: cfg.batch_interval_ms,
        batch_requests_max: cfg.batch_requests_max,
        listen: cfg.listen.clone(),
        store_sync_interval_ms: cfg.store_sync_interval_ms,
        batch_bytes_max: cfg.batch_bytes_max,
        client_tls,
        relay_dial,
        admin_keys: admin_keys(cfg).map_err(|e| format!("admin_keys: {e}"))?,
    };
    Ok((opts, peer_security))
}

/// What the replica thread starts with: the peer port (bound here), the initial voters and the
/// member addresses known from the configuration.
fn shell_config(
    cfg: &NodeConfig,
    raft_cfg: &RaftConfig,
) -> Result<tally_pipeline::replica_thread::ShellConfig, String> {
    // A cluster of one (no peers, or only this node) opens no peer port; anything else,
    // including a node joining a cluster it is not yet a member of, replicates.
    let solo = cfg.peers.iter().all(|p| p.node_id == cfg.node_id);
    let peers = if solo {
        None
    } else {
        let listener = std::net::TcpListener::bind(&raft_cfg.peer_listen)
            .map_err(|e| format!("replication: cannot listen on {}: {e}", raft_cfg.peer_listen))?;
        Some(tally_pipeline::replica_thread::PeerPort {
            listener,
            hello: raft_cfg.local.clone(),
            security: raft_cfg.peer_security.clone(),
        })
    };
    let is_initial_voter = solo || raft_cfg.peers.iter().any(|m| m.node_id == cfg.node_id);
    let initial_voters = match (is_initial_voter, solo) {
        (false, _) => Vec::new(),
        (true, true) => vec![cfg.node_id],
        (true, false) => raft_cfg.peers.iter().map(|m| m.node_id).collect(),
    };
    Ok(tally_pipeline::replica_thread::ShellConfig {
        node_id: cfg.node_id,
        initial_voters,
        known_members: known_members(cfg, raft_cfg, solo),
        tick_ms: cfg.tick_ms,
        election_ticks: cfg.election_ticks,
        heartbeat_ticks: cfg.heartbeat_ticks,
        campaign_on_leader_down: cfg.campaign_on_leader_down,
        log_retain_entries: cfg.log_retain_entries,
        store_sync_interval_ms: cfg.store_sync_interval_ms,
        peers,
        plant: if tally_pipeline::failpoint::enabled("ack-before-commit") {
            tally_core::Plant::AckBeforeCommit
        } else {
            tally_core::Plant::None
        },
    })
}

/// The member addresses the configuration names; a cluster of one that names none knows itself.
fn known_members(cfg: &NodeConfig, raft_cfg: &RaftConfig, solo: bool) -> Vec<MemberAddr> {
    let mut known_members: Vec<MemberAddr> = raft_cfg
        .peers
        .iter()
        .map(|m| MemberAddr { node_id: m.node_id, client_addr: m.client_addr.clone(), peer_addr: m.peer_addr.clone() })
        .collect();
    if solo && known_members.is_empty() {
        known_members.push(MemberAddr {
            node_id: cfg.node_id,
            client_addr: cfg.listen.clone(),
            peer_addr: String::new(),
        });
    }
    known_members
}

/// `GET /health/ready` answers from the node's status board.
fn install_ready_check(health: &crate::metrics_http::Health, node: &Node, max_lag: u64) {
    let status = node.status.clone();
    health.set_ready_check(Box::new(move || {
        let s = status.snapshot();
        let leader_commit = s.leader_commit.max(s.committed.index);
        crate::metrics_http::readiness(s.leader_id, s.stopped.as_ref(), s.applied.index, leader_commit, max_lag)
    }));
}

/// Serves until Ctrl-C or SIGTERM (then syncs the store), publishing gauges every second; a
/// replica whose log stopped ends (a supervisor restarts it), unless the disk is full: then it
/// restarts in place once space is back.
fn serve_until_stopped(
    node: &Node,
    data_dir: &Path,
    metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<(), String> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::Release))
            .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    }
    let mut ticks = 0u64;
    let mut reported_failure = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            // Graceful stop: the store is made durable so the next start replays nothing.
            node.sync_store()?;
            tracing::info!(applied_height = node.status.applied().height, "stopped; store synced");
            return Ok(());
        }
        ticks += 1;
        if ticks % 10 != 1 {
            continue;
        }
        if ticks % 50 == 1 {
            publish_disk_gauges(data_dir, metrics_handle);
        }
        publish_gauges(node);
        let failure = node.status.stopped();
        if let Some(why) = failure {
            if !reported_failure {
                // The replicator stepped down and went silent; status and /metrics say why.
                tracing::error!(reason = %why, "this replica stopped writing; it serves status and stale reads only");
                reported_failure = true;
            }
            if !why.disk_full() {
                // Not a full disk (an I/O error, a broken store): end the replica; a supervisor
                // restarts it and a backup leads meanwhile.
                return Err(format!("replica stopped: {why}"));
            }
            if space_is_back(data_dir) {
                tracing::warn!("disk space is back: restarting this replica in place to recover from its log");
                return restart_in_place();
            }
        }
    }
}

/// Off the hot path: a directory walk every 5 s, and the exporter's upkeep (it drains histogram
/// samples even when nobody scrapes).
fn publish_disk_gauges(data_dir: &Path, metrics_handle: Option<&metrics_exporter_prometheus::PrometheusHandle>) {
    metrics::gauge!("tally_log_bytes").set(crate::metrics_http::dir_bytes(&data_dir.join("log")) as f64);
    for part in ["state", "segments"] {
        metrics::gauge!("tally_store_bytes", "part" => part)
            .set(crate::metrics_http::dir_bytes(&data_dir.join(part)) as f64);
    }
    if let Some(h) = metrics_handle {
        h.run_upkeep();
    }
}

/// Role, progress, log health and connections, every second.
fn publish_gauges(node: &Node) {
    let s = node.status.snapshot();
    metrics::gauge!("tally_term").set(s.term as f64);
    metrics::gauge!("tally_leader_id").set(s.leader_id.unwrap_or(0) as f64);
    metrics::gauge!("tally_is_leader").set(if s.is_leader { 1.0 } else { 0.0 });
    metrics::gauge!("tally_commit_index").set(s.committed.index as f64);
    metrics::gauge!("tally_applied_height").set(s.applied.height as f64);
    metrics::gauge!("tally_log_stopped").set(if s.stopped.is_some() { 1.0 } else { 0.0 });
    let (handshaking, clients, replicas) = node.port.admission.counts();
    metrics::gauge!("tally_connections", "pool" => "handshake").set(handshaking as f64);
    metrics::gauge!("tally_connections", "pool" => "client").set(clients as f64);
    metrics::gauge!("tally_connections", "pool" => "replica").set(replicas as f64);
    let leader_commit = s.leader_commit.max(s.committed.index);
    metrics::gauge!("tally_apply_lag_entries").set(leader_commit.saturating_sub(s.applied.index) as f64);
}

/// Runs `open` until it succeeds or fails for another reason than a full disk: a replica
/// restarted on a full disk waits for space (saying why) instead of exiting.
fn wait_for_space<T>(dir: &Path, mut open: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut said = false;
    loop {
        match open() {
            Err(e) if e.os_kind() == std::io::ErrorKind::StorageFull => {
                if !said {
                    tracing::error!(error = %e, "StorageFull: the disk is full; waiting for space before starting");
                    said = true;
                }
                while !space_is_back(dir) {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            r => return r,
        }
    }
}

/// Bytes a probe writes and fsyncs to decide the disk has room again.
const SPACE_PROBE_BYTES: usize = 4 * 1024 * 1024;

/// Whether `dir` takes a fsynced 4 MiB write again.
fn space_is_back(dir: &Path) -> bool {
    use std::io::Write;
    let probe = dir.join(".space-probe");
    let ok = std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(&vec![0u8; SPACE_PROBE_BYTES]).and_then(|()| f.sync_all()))
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Replaces this process with a fresh start of the same command: the same path a crash takes,
/// and the tested one (the log is the source of truth; a torn tail is cut; the store replays).
/// A failed fsync is never retried in place: the kernel may have dropped the dirty pages.
fn restart_in_place() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable to restart: {e}"))?;
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
    Err(format!("restart in place failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::parse_config;

    /// A configuration file over its bound is refused by its size before it is read whole.
    #[test]
    fn an_oversize_config_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, vec![b'#'; super::CONFIG_BYTES_MAX + 1]).expect("write");
        let err = super::load_config(&path).expect_err("over the bound");
        assert!(err.contains(&format!("is over {} bytes", super::CONFIG_BYTES_MAX)), "{err}");
    }

    #[test]
    fn config_errors_name_the_key_and_line_even_in_non_ascii_input() {
        let e = parse_config("# données\nnode_id = \"ünïcode\"\n").expect_err("a string node_id");
        assert!(e.starts_with("key `node_id`: invalid type: string \"ünïcode\""), "{e}");
        assert!(e.ends_with("(line 2)"), "{e}");
        let e = parse_config("node_id = 1\n\u{feff}é = [\n").expect_err("garbage");
        assert!(e.contains("(line 2)"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
