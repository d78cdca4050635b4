//! `tally cluster init`: everything a local cluster needs, written in one go.
//!
//! ```text
//! DIR/node-<i>.toml     NodeConfig: listen P+i, peer P+100+i, metrics P+200+i, data DIR/node-<i>
//! DIR/operator.key      hex ed25519 seed (0600), shared by all replicas
//! DIR/operator.pub      hex public key, for `tally verify --operator-key`
//! DIR/genesis.json      cluster id, operator key, K accounts × 1_000_000_000
//! DIR/accounts/<j>.key  key files of the funded accounts (keygen format)
//! DIR/ca.pem            the cluster CA: clients check servers against it (`--ca`)
//! DIR/ca.key            the CA's private key (0600): keep it with the admin; `cluster add`
//!                       issues a new node's certificate from it
//! DIR/node-<i>.pem/.key node i's certificate (node-<i>.tally, cluster.tally) and key (0600)
//! DIR/admin.key         the admin key (keygen format, 0600): signs membership changes and scans
//! DIR/admin.pub         its public key, listed in every node's `admin_keys`
//! ```
//! `tally --cluster-dir DIR` (or `TALLY_CLUSTER_DIR`) takes the addresses, the CA and the admin
//! key from here.
//!
//! With `--hosts tally-1,tally-2,tally-3` ([`ContainerHosts`]) the directory is for containers
//! instead (`deploy/compose.yaml` mounts it read-only at `/config`): each node listens on
//! `0.0.0.0` (client P+i, peer P+100+i, metrics P+200+i), names its peers `tally-<i>:PORT`, keeps
//! its data in `/data` (its own volume) and reads its files from `/config/...`; certificates also
//! name the host. `DIR/client.toml` tells a client outside the containers where the client ports
//! are published (`127.0.0.1:Q+i`) and which advertised address each of them stands for.

use std::path::{Path, PathBuf};
use tally_client::error::ClientError;
use tally_client::keyfile::{generate_key, public_of, save_key, write_private_file};
use tally_codec::config::{self, NodeConfig, PeerConfig};
use tally_codec::genesis::{Genesis, GenesisAccount};

/// Money each genesis account starts with.
pub const GENESIS_BALANCE: u64 = 1_000_000_000;
/// Defaults of `tally cluster init`.
pub const DEFAULT_NODES: usize = 3;
/// Number of funded accounts by default.
pub const DEFAULT_ACCOUNTS: usize = 4;
/// Client ports start right above this.
pub const DEFAULT_BASE_PORT: u16 = 7000;
/// Largest cluster `init` writes: a cluster has 1, 3 or 5 replicas (`docs/architecture.md` §1); we
/// allow up to 99 for tests.
pub const NODES_MAX: usize = 99;
/// Keeps `accounts/` listable and genesis small.
pub const ACCOUNTS_MAX: usize = 100_000;

/// What `cluster_init` wrote, so `tally up` and tests need not re-read the files.
#[derive(Debug, Clone)]
pub struct ClusterLayout {
    /// Absolute directory holding everything.
    pub dir: PathBuf,
    pub cluster_id: String,
    pub operator_public: String,
    /// node-<i>.toml paths, node 1 first.
    pub config_paths: Vec<PathBuf>,
    pub configs: Vec<NodeConfig>,
    /// accounts/<j>.key paths.
    pub account_keys: Vec<PathBuf>,
    pub operator_pub_path: PathBuf,
    pub genesis_path: PathBuf,
    /// `--hosts` layouts: where a client outside the containers dials each node (`client.toml`).
    pub published: Option<PublishedAddrs>,
}

impl ClusterLayout {
    /// TLS to this cluster's nodes, checked against its CA.
    ///
    /// # Errors
    /// An unreadable CA file.
    pub fn dial(&self) -> Result<tally_net::Dial, ClientError> {
        tally_net::Dial::cluster(&self.dir.join(CA_FILE)).map_err(|e| ClientError::Invalid(e.to_string()))
    }

    /// The admin key written by `cluster init`.
    ///
    /// # Errors
    /// An unreadable key file.
    pub fn admin_key(&self) -> Result<ed25519_dalek::SigningKey, ClientError> {
        tally_client::keyfile::load_key(&self.dir.join(ADMIN_KEY_FILE))
    }
}

impl ClusterLayout {
    /// Client addresses of all nodes, node 1 first.
    pub fn client_addrs(&self) -> Vec<String> {
        self.configs.iter().map(|c| c.listen.clone()).collect()
    }

    /// Where a client on this machine dials: the published addresses of a `--hosts` layout,
    /// else the nodes' own client addresses.
    pub fn dial_addrs(&self) -> Vec<String> {
        match &self.published {
            Some(p) => p.dial_addrs(),
            None => self.client_addrs(),
        }
    }

    /// Advertised → dialled client addresses (empty unless `--hosts`), for
    /// [`tally_client::ClientOptions::addr_map`].
    pub fn addr_map(&self) -> std::collections::BTreeMap<String, String> {
        self.published.as_ref().map(PublishedAddrs::addr_map).unwrap_or_default()
    }
}

/// `cluster init --hosts`: a cluster whose nodes run in containers named `hosts[i]` on one
/// private network, with their client ports published on this machine's loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerHosts {
    /// One host name per node, node 1 first: peers name each other `HOST:PORT`.
    pub hosts: Vec<String>,
    /// Node i's client port is published on `127.0.0.1:published_base_port+i` (`client.toml`).
    pub published_base_port: u16,
}

/// Where the configuration directory is mounted in each container.
pub const CONTAINER_CONFIG_DIR: &str = "/config";
/// Each container's own data volume.
pub const CONTAINER_DATA_DIR: &str = "/data";
/// Written by `cluster init --hosts`: how a client outside the containers reaches the nodes.
pub const CLIENT_FILE: &str = "client.toml";

/// One node as seen from outside its container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedNode {
    pub node_id: u64,
    /// The client address the cluster advertises for it (status, leader hints): `tally-1:7001`.
    pub advertised: String,
    /// Where this machine reaches it: `127.0.0.1:7001`.
    pub dial: String,
}

/// `client.toml`: the published address of every node.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedAddrs {
    #[serde(default, rename = "node")]
    pub nodes: Vec<PublishedNode>,
}

impl PublishedAddrs {
    /// The dial addresses, node-id order.
    pub fn dial_addrs(&self) -> Vec<String> {
        let mut n = self.nodes.clone();
        n.sort_by_key(|p| p.node_id);
        n.into_iter().map(|p| p.dial).collect()
    }

    /// Advertised → dialled.
    pub fn addr_map(&self) -> std::collections::BTreeMap<String, String> {
        self.nodes.iter().map(|p| (p.advertised.clone(), p.dial.clone())).collect()
    }

    /// Reads `DIR/client.toml`; `None` when the directory has none (not a `--hosts` layout).
    ///
    /// # Errors
    /// An unreadable or malformed file.
    pub fn load(dir: &Path) -> Result<Option<PublishedAddrs>, ClientError> {
        let path = dir.join(CLIENT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).map(Some).map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::file(&path, e)),
        }
    }

    fn save(&self, dir: &Path) -> Result<(), ClientError> {
        let path = dir.join(CLIENT_FILE);
        let body = toml::to_string_pretty(self).map_err(|e| ClientError::Invalid(format!("client.toml: {e}")))?;
        let text = format!(
            "# Written by `tally cluster init --hosts`: where a client outside the containers reaches each\n\
             # node (`dial`, the published port) and the address the cluster advertises for it. Edit `dial`\n\
             # if you publish the client ports elsewhere.\n{body}"
        );
        std::fs::write(&path, text).map_err(|e| ClientError::file(&path, e))
    }
}

/// A host name usable in `HOST:PORT` and a certificate: letters, digits, `-` and `.`.
fn check_host(h: &str) -> Result<(), ClientError> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !h.starts_with(['-', '.'])
        && !h.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(ClientError::Invalid(format!("--hosts: {h:?} is not a host name (letters, digits, '-' and '.')")))
    }
}

/// The cluster CA's certificate in a cluster directory.
pub const CA_FILE: &str = "ca.pem";
/// The cluster CA's private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// The admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// Issues node `cfg.node_id`'s certificate into `dir` and points `cfg` at it.
fn with_node_cert(dir: &Path, cfg: NodeConfig, ca_key: &str) -> Result<NodeConfig, ClientError> {
    let hosts = [tally_net::tls::host_of(&cfg.listen), tally_net::tls::host_of(&cfg.peer_listen)];
    with_node_cert_as(dir, dir, &hosts, cfg, ca_key)
}

/// As [`with_node_cert`], naming `hosts` in the certificate and pointing `cfg` at the files as
/// the node sees `dir`: at `mount` (`/config` in a container).
fn with_node_cert_as(
    dir: &Path,
    mount: &Path,
    hosts: &[String],
    mut cfg: NodeConfig,
    ca_key: &str,
) -> Result<NodeConfig, ClientError> {
    let cert = tally_net::tls::issue_node_cert(ca_key, cfg.node_id, hosts)
        .map_err(|e| ClientError::Invalid(format!("node {} certificate: {e}", cfg.node_id)))?;
    let (cert_path, key_path) =
        (dir.join(format!("node-{}.pem", cfg.node_id)), dir.join(format!("node-{}.key", cfg.node_id)));
    std::fs::write(&cert_path, cert.cert).map_err(|e| ClientError::file(&cert_path, e))?;
    if key_path.exists() {
        std::fs::remove_file(&key_path).map_err(|e| ClientError::file(&key_path, e))?;
    }
    write_private_file(&key_path, cert.key.as_bytes())?;
    let seen = |name: String| mount.join(name).to_string_lossy().into_owned();
    cfg.tls_ca_file = Some(seen(CA_FILE.to_string()));
    cfg.tls_cert_file = Some(seen(format!("node-{}.pem", cfg.node_id)));
    cfg.tls_key_file = Some(seen(format!("node-{}.key", cfg.node_id)));
    Ok(cfg)
}

/// Writes `node-<id>.toml` and the node's certificate for a replica about to be added to the
/// cluster in `dir`: node 1's settings with its own addresses and data directory, the current
/// members (from the existing node files) as peers. Start it with `tallyd --config`, then run
/// `tally cluster add`.
///
/// # Errors
/// A directory without a cluster (no node-1.toml or CA key), an id already used, or I/O.
pub fn add_node_files(
    dir: &Path,
    node_id: u64,
    client: &str,
    peer: &str,
) -> Result<(PathBuf, NodeConfig), ClientError> {
    let path = dir.join(format!("node-{node_id}.toml"));
    if path.exists() {
        return Err(ClientError::Invalid(format!("{} exists: node {node_id} is already configured", path.display())));
    }
    let template = dir.join("node-1.toml");
    let text = std::fs::read_to_string(&template).map_err(|e| ClientError::file(&template, e))?;
    let mut cfg: NodeConfig = toml::from_str(&text)
        .map_err(|e| ClientError::Invalid(format!("{} is not a node config: {e}", template.display())))?;
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(|e| ClientError::file(&ca_key_path, e))?;
    // Every replica this directory knows of, not only the members at creation: a node added
    // later (or re-added after a disk replacement) must know where each member is, or it can
    // never answer a leader that joined after the cluster was created.
    for (id, other) in node_configs(dir)? {
        let known = cfg.peers.iter().any(|p| p.node_id == id);
        if !known && id != node_id {
            cfg.peers.push(PeerConfig { node_id: id, client: other.listen, peer: other.peer_listen });
        }
    }
    cfg.peers.sort_by_key(|p| p.node_id);
    cfg.node_id = node_id;
    cfg.listen = client.to_string();
    cfg.peer_listen = peer.to_string();
    cfg.metrics_listen = None;
    cfg.data_dir = dir.join(format!("node-{node_id}")).to_string_lossy().into_owned();
    // The new node is not a voter at creation: it starts empty and is added by the leader.
    cfg.peers.retain(|p| p.node_id != node_id);
    let cfg = with_node_cert(dir, cfg, &ca_key)?;
    let text = toml::to_string_pretty(&cfg).map_err(|e| ClientError::Invalid(format!("node config: {e}")))?;
    std::fs::write(&path, text).map_err(|e| ClientError::file(&path, e))?;
    Ok((path, cfg))
}

/// The files [`add_node_files`] writes for node `node_id`: its config, certificate and key.
pub fn node_files(dir: &Path, node_id: u64) -> [PathBuf; 3] {
    ["toml", "pem", "key"].map(|ext| dir.join(format!("node-{node_id}.{ext}")))
}

/// Removes the files of `node_files(dir, node_id)` that are not in `keep` (those that existed
/// before this run): a refused `cluster add` leaves the directory as it found it.
///
/// # Errors
/// The first file that could not be removed.
pub fn remove_node_files(dir: &Path, node_id: u64, keep: &[PathBuf]) -> Result<(), ClientError> {
    for f in node_files(dir, node_id) {
        if !keep.contains(&f) && f.exists() {
            std::fs::remove_file(&f).map_err(|e| ClientError::file(&f, e))?;
        }
    }
    Ok(())
}

/// The fingerprint of the (first) certificate in the PEM file `path`, as `cluster revoke-node`
/// names it: blake3 of its DER bytes.
///
/// # Errors
/// An unreadable file or one without a certificate.
pub fn cert_fingerprint_of(path: &Path) -> Result<[u8; 32], ClientError> {
    let certs = tally_net::tls::load_certs(path).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let first = certs.first().ok_or_else(|| ClientError::Invalid(format!("{}: no certificate", path.display())))?;
    Ok(tally_codec::admin::cert_fingerprint(first.as_ref()))
}

/// Moves node `node_id`'s files in `dir` (`node-<id>.toml`, `.pem`, `.key`) aside once its
/// certificate is revoked, as `<name>.revoked-<first 8 bytes of the fingerprint, hex>`, so that
/// `cluster add --node-id <id>` writes a new configuration with a new certificate. Returns the
/// new paths (files that were not there are skipped).
///
/// # Errors
/// A rename that failed.
pub fn retire_node_files(dir: &Path, node_id: u64, fingerprint: &[u8; 32]) -> Result<Vec<PathBuf>, ClientError> {
    let tag: String = fingerprint[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut moved = Vec::new();
    for ext in ["toml", "pem", "key"] {
        let from = dir.join(format!("node-{node_id}.{ext}"));
        if !from.exists() {
            continue;
        }
        let to = dir.join(format!("node-{node_id}.{ext}.revoked-{tag}"));
        std::fs::rename(&from, &to).map_err(|e| ClientError::file(&from, e))?;
        moved.push(to);
    }
    Ok(moved)
}

/// The `node-<id>.toml` files in `dir`, by id.
fn node_configs(dir: &Path) -> Result<Vec<(u64, NodeConfig)>, ClientError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ClientError::file(dir, e))? {
        let path = entry.map_err(|e| ClientError::file(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some(id) = name.strip_prefix("node-").and_then(|n| n.strip_suffix(".toml")).and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ClientError::file(&path, e))?;
        let cfg: NodeConfig = toml::from_str(&text)
            .map_err(|e| ClientError::Invalid(format!("{} is not a node config: {e}", path.display())))?;
        out.push((id, cfg));
    }
    Ok(out)
}

/// Writes a fresh cluster's configuration into `dir` (created if missing).
///
/// # Errors
/// [`ClientError::Invalid`] for bad counts, ports out of range, or a directory that already holds
/// a cluster (overwriting operator keys would orphan the old one); [`ClientError::File`] on I/O.
pub fn cluster_init(nodes: usize, dir: &Path, accounts: usize, base_port: u16) -> Result<ClusterLayout, ClientError> {
    cluster_init_with(nodes, dir, accounts, base_port, None)
}

/// As [`cluster_init`]; with `containers`, a directory for nodes in containers (see the module
/// documentation and `docs/deploy.md`).
///
/// # Errors
/// As [`cluster_init`], and host names that are not names or do not match `nodes`.
pub fn cluster_init_with(
    nodes: usize,
    dir: &Path,
    accounts: usize,
    base_port: u16,
    containers: Option<&ContainerHosts>,
) -> Result<ClusterLayout, ClientError> {
    if let Some(c) = containers {
        check_container_hosts(c, nodes)?;
    }
    check_init_counts(nodes, accounts, base_port)?;
    let dir = empty_cluster_dir(dir)?;
    let (operator_public, operator_pub_path) = write_operator_key(&dir)?;
    let mut cluster_bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut cluster_bytes);
    let cluster_id = hex::encode(cluster_bytes);
    let (account_keys, genesis_path) = write_accounts_and_genesis(&dir, accounts, &cluster_id, &operator_public)?;
    let ca_key = write_ca(&dir)?;
    let admin_public = write_admin_key(&dir)?;

    let addrs = NodeAddrs { base_port, containers };
    // The directory as the nodes see it.
    let mount = match containers {
        None => dir.clone(),
        Some(_) => PathBuf::from(CONTAINER_CONFIG_DIR),
    };
    let peers: Vec<PeerConfig> = (1..=nodes)
        .map(|i| PeerConfig { node_id: i as u64, client: addrs.advertised(0, i), peer: addrs.advertised(100, i) })
        .collect();
    let shared = shared_node_config(&cluster_id, &mount, peers, &admin_public);
    let (configs, config_paths) = write_node_configs(&dir, &mount, &addrs, &shared, nodes, &ca_key)?;
    let published = containers.map(|c| PublishedAddrs {
        nodes: (1..=nodes)
            .map(|i| PublishedNode {
                node_id: i as u64,
                advertised: addrs.advertised(0, i),
                dial: format!("127.0.0.1:{}", c.published_base_port as usize + i),
            })
            .collect(),
    });
    if let Some(p) = &published {
        p.save(&dir)?;
    }
    Ok(ClusterLayout {
        dir,
        cluster_id,
        operator_public,
        config_paths,
        configs,
        account_keys,
        operator_pub_path,
        genesis_path,
        published,
    })
}

/// `--hosts`: one valid, distinct host name per node, and room for the published ports.
fn check_container_hosts(c: &ContainerHosts, nodes: usize) -> Result<(), ClientError> {
    if c.hosts.len() != nodes {
        return Err(ClientError::Invalid(format!(
            "--hosts names {} hosts for --nodes {nodes}: give one host name per node",
            c.hosts.len()
        )));
    }
    for (i, h) in c.hosts.iter().enumerate() {
        check_host(h)?;
        if c.hosts[..i].contains(h) {
            return Err(ClientError::Invalid(format!("--hosts names {h} twice")));
        }
    }
    if c.published_base_port as usize + nodes > u16::MAX as usize {
        return Err(ClientError::Invalid(format!(
            "--published-base-port {} leaves no room for {nodes} nodes",
            c.published_base_port
        )));
    }
    Ok(())
}

/// Node and account counts within their bounds, and every node's three ports below 65536.
fn check_init_counts(nodes: usize, accounts: usize, base_port: u16) -> Result<(), ClientError> {
    if nodes == 0 || nodes > NODES_MAX {
        return Err(ClientError::Invalid(format!("--nodes must be between 1 and {NODES_MAX}, not {nodes}")));
    }
    if accounts > ACCOUNTS_MAX {
        return Err(ClientError::Invalid(format!("--accounts must be at most {ACCOUNTS_MAX}, not {accounts}")));
    }
    if base_port as usize + 200 + nodes > u16::MAX as usize {
        return Err(ClientError::Invalid(format!(
            "--base-port {base_port} leaves no room for {nodes} nodes (ports up to base+200+nodes must be below 65536)"
        )));
    }
    Ok(())
}

/// `dir`, created if missing and made absolute, refused if it already holds a cluster
/// (overwriting its operator key would orphan it).
fn empty_cluster_dir(dir: &Path) -> Result<PathBuf, ClientError> {
    std::fs::create_dir_all(dir).map_err(|e| ClientError::file(dir, e))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| ClientError::file(dir, e))?;
    for existing in ["genesis.json", "operator.key"] {
        if dir.join(existing).exists() {
            return Err(ClientError::Invalid(format!(
                "{} already holds a cluster ({existing} exists); choose an empty directory",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// A new operator key: `operator.key` (hex seed, 0600) and `operator.pub`. Returns the public
/// key's hex and the `.pub` path.
fn write_operator_key(dir: &Path) -> Result<(String, PathBuf), ClientError> {
    let operator = generate_key();
    let operator_key_path = dir.join("operator.key");
    write_private_file(&operator_key_path, format!("{}\n", hex::encode(operator.to_bytes())).as_bytes())?;
    let operator_public = public_of(&operator).to_hex();
    let operator_pub_path = dir.join("operator.pub");
    std::fs::write(&operator_pub_path, format!("{operator_public}\n"))
        .map_err(|e| ClientError::file(&operator_pub_path, e))?;
    Ok((operator_public, operator_pub_path))
}

/// `accounts/<j>.key` for each funded account, then `genesis.json` giving each of them
/// [`GENESIS_BALANCE`]. Returns the key paths and the genesis path.
fn write_accounts_and_genesis(
    dir: &Path,
    accounts: usize,
    cluster_id: &str,
    operator_public: &str,
) -> Result<(Vec<PathBuf>, PathBuf), ClientError> {
    let accounts_dir = dir.join("accounts");
    let mut account_keys = Vec::with_capacity(accounts);
    let mut genesis_accounts = Vec::with_capacity(accounts);
    for j in 0..accounts {
        let key = generate_key();
        let path = accounts_dir.join(format!("{j}.key"));
        save_key(&path, &key)?;
        genesis_accounts.push(GenesisAccount { key: public_of(&key).to_hex(), balance: GENESIS_BALANCE });
        account_keys.push(path);
    }
    let genesis = Genesis {
        cluster_id: cluster_id.to_string(),
        operator_key: operator_public.to_string(),
        accounts: genesis_accounts,
    };
    let genesis_path = dir.join("genesis.json");
    let genesis_json = serde_json::to_string_pretty(&genesis).map_err(|e| ClientError::Invalid(e.to_string()))?;
    std::fs::write(&genesis_path, genesis_json + "\n").map_err(|e| ClientError::file(&genesis_path, e))?;
    Ok((account_keys, genesis_path))
}

/// The cluster CA: `ca.pem` and its key `ca.key` (0600). Returns the key, to issue node
/// certificates with.
fn write_ca(dir: &Path) -> Result<String, ClientError> {
    let ca = tally_net::tls::generate_ca().map_err(|e| ClientError::Invalid(e.to_string()))?;
    let ca_path = dir.join(CA_FILE);
    std::fs::write(&ca_path, &ca.cert).map_err(|e| ClientError::file(&ca_path, e))?;
    write_private_file(&dir.join(CA_KEY_FILE), ca.key.as_bytes())?;
    Ok(ca.key)
}

/// A new admin key: `admin.key` (key file, 0600) and `admin.pub`. Returns the public key's hex.
fn write_admin_key(dir: &Path) -> Result<String, ClientError> {
    let admin = generate_key();
    save_key(&dir.join(ADMIN_KEY_FILE), &admin)?;
    let admin_public = public_of(&admin).to_hex();
    let admin_pub_path = dir.join("admin.pub");
    std::fs::write(&admin_pub_path, format!("{admin_public}\n")).map_err(|e| ClientError::file(&admin_pub_path, e))?;
    Ok(admin_public)
}

/// Where `cluster init`'s node i listens and is found: client port P+i, peer P+100+i, metrics
/// P+200+i (the `offset`), on loopback or, for containers, under its host name.
struct NodeAddrs<'a> {
    base_port: u16,
    containers: Option<&'a ContainerHosts>,
}

impl NodeAddrs<'_> {
    fn port(&self, offset: usize, i: usize) -> usize {
        self.base_port as usize + offset + i
    }

    /// Where node i is found by its peers.
    fn advertised(&self, offset: usize, i: usize) -> String {
        match self.containers {
            None => format!("127.0.0.1:{}", self.port(offset, i)),
            Some(c) => format!("{}:{}", c.hosts[i - 1], self.port(offset, i)),
        }
    }

    /// Where node i listens.
    fn listen(&self, offset: usize, i: usize) -> String {
        match self.containers {
            None => format!("127.0.0.1:{}", self.port(offset, i)),
            Some(_) => format!("0.0.0.0:{}", self.port(offset, i)),
        }
    }
}

/// What every node's config of a new cluster shares; [`write_node_configs`] fills in each node's
/// id, addresses, data directory and certificate.
fn shared_node_config(cluster_id: &str, mount: &Path, peers: Vec<PeerConfig>, admin_public: &str) -> NodeConfig {
    let path_str = |p: &Path| p.to_string_lossy().into_owned();
    NodeConfig {
        node_id: 0,
        cluster_id: cluster_id.to_string(),
        data_dir: String::new(),
        listen: String::new(),
        peer_listen: String::new(),
        operator_key_file: path_str(&mount.join("operator.key")),
        genesis_file: path_str(&mount.join("genesis.json")),
        peers,
        batch_interval_ms: config::default_batch_interval_ms(),
        batch_requests_max: config::default_batch_requests_max(),
        metrics_listen: None,
        tick_ms: config::default_tick_ms(),
        election_ticks: config::default_election_ticks(),
        heartbeat_ticks: config::default_heartbeat_ticks(),
        campaign_on_leader_down: true,
        fsync: true,
        store_sync_interval_ms: config::default_store_sync_interval_ms(),
        log_retain_entries: config::default_log_retain_entries(),
        batch_bytes_max: config::default_batch_bytes_max(),
        tls_ca_file: None,
        tls_cert_file: None,
        tls_key_file: None,
        insecure_plaintext: false,
        admin_keys: vec![admin_public.to_string()],
        log_format: config::LogFormat::default(),
        ready_max_lag_batches: tally_codec::config::default_ready_max_lag_batches(),
    }
}

/// `node-<i>.toml` and node i's certificate for nodes 1..=`nodes`. Returns the configs and
/// their paths, node 1 first.
fn write_node_configs(
    dir: &Path,
    mount: &Path,
    addrs: &NodeAddrs<'_>,
    shared: &NodeConfig,
    nodes: usize,
    ca_key: &str,
) -> Result<(Vec<NodeConfig>, Vec<PathBuf>), ClientError> {
    let mut configs = Vec::with_capacity(nodes);
    let mut config_paths = Vec::with_capacity(nodes);
    for i in 1..=nodes {
        let data_dir = match addrs.containers {
            None => dir.join(format!("node-{i}")).to_string_lossy().into_owned(),
            Some(_) => CONTAINER_DATA_DIR.to_string(),
        };
        let cfg = NodeConfig {
            node_id: i as u64,
            data_dir,
            listen: addrs.listen(0, i),
            peer_listen: addrs.listen(100, i),
            metrics_listen: Some(addrs.listen(200, i)),
            ..shared.clone()
        };
        let cfg = match addrs.containers {
            None => with_node_cert(dir, cfg, ca_key)?,
            Some(c) => with_node_cert_as(dir, mount, &[c.hosts[i - 1].clone()], cfg, ca_key)?,
        };
        let text = toml::to_string_pretty(&cfg).map_err(|e| ClientError::Invalid(format!("node config: {e}")))?;
        let path = dir.join(format!("node-{i}.toml"));
        std::fs::write(&path, text).map_err(|e| ClientError::file(&path, e))?;
        configs.push(cfg);
        config_paths.push(path);
    }
    Ok((configs, config_paths))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Found in the runbook test: a node re-added after a disk replacement from a config that
    /// named only the members at creation could never answer a leader added later.
    #[test]
    fn added_nodes_know_every_replica_of_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        cluster_init(3, &dir, 1, 7000).expect("init");
        add_node_files(&dir, 4, "127.0.0.1:7004", "127.0.0.1:7104").expect("node 4");
        std::fs::rename(dir.join("node-3.toml"), dir.join("node-3.toml.old")).expect("mv");
        let (_, cfg) = add_node_files(&dir, 3, "127.0.0.1:7003", "127.0.0.1:7103").expect("node 3 again");
        let peers: Vec<(u64, &str)> = cfg.peers.iter().map(|p| (p.node_id, p.peer.as_str())).collect();
        assert_eq!(peers, [(1, "127.0.0.1:7101"), (2, "127.0.0.1:7102"), (4, "127.0.0.1:7104")]);
        assert!(add_node_files(&dir, 4, "127.0.0.1:7004", "127.0.0.1:7104").is_err(), "node 4 exists");
    }

    /// A revoked node's files move aside, and `cluster add` can then issue it a new
    /// certificate (another fingerprint).
    #[test]
    fn a_revoked_nodes_files_move_aside_and_a_new_certificate_follows() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        cluster_init(3, &dir, 1, 7000).expect("init");
        let old = cert_fingerprint_of(&dir.join("node-3.pem")).expect("fingerprint");
        assert_ne!(old, cert_fingerprint_of(&dir.join("node-2.pem")).expect("fingerprint"));
        let moved = retire_node_files(&dir, 3, &old).expect("retire");
        assert_eq!(moved.len(), 3);
        assert!(!dir.join("node-3.pem").exists() && !dir.join("node-3.toml").exists());
        add_node_files(&dir, 3, "127.0.0.1:7003", "127.0.0.1:7103").expect("node 3 again");
        let new = cert_fingerprint_of(&dir.join("node-3.pem")).expect("fingerprint");
        assert_ne!(old, new, "a new key, a new fingerprint");
        assert!(cert_fingerprint_of(&dir.join("node-9.pem")).is_err());
    }

    #[test]
    fn init_writes_parseable_configs_with_the_port_formula() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        let layout = cluster_init(3, &dir, 4, 7000).expect("init");
        assert!(layout.dir.is_absolute());
        for i in 1..=3u64 {
            let path = dir.join(format!("node-{i}.toml"));
            let cfg: NodeConfig = toml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("parse");
            assert_eq!(cfg.node_id, i);
            assert_eq!(cfg.listen, format!("127.0.0.1:{}", 7000 + i));
            assert_eq!(cfg.peer_listen, format!("127.0.0.1:{}", 7100 + i));
            assert_eq!(cfg.metrics_listen, Some(format!("127.0.0.1:{}", 7200 + i)));
            assert_eq!(cfg.peers.len(), 3);
            assert_eq!(cfg.cluster_id, layout.cluster_id);
            assert!(Path::new(&cfg.data_dir).is_absolute());
            assert!(cfg.data_dir.ends_with(&format!("node-{i}")));
            assert!(Path::new(&cfg.operator_key_file).is_absolute());
            assert!(Path::new(&cfg.genesis_file).is_absolute());
        }
        let genesis = Genesis::parse(&std::fs::read_to_string(dir.join("genesis.json")).expect("read")).expect("parse");
        assert_eq!(genesis.accounts.len(), 4);
        assert_eq!(genesis.total(), 4 * GENESIS_BALANCE);
        assert_eq!(genesis.cluster_id, layout.cluster_id);
        let op_pub = std::fs::read_to_string(dir.join("operator.pub")).expect("pub");
        assert_eq!(op_pub.trim(), genesis.operator_key);
        let op_key = dir.join("operator.key");
        assert_eq!(std::fs::metadata(&op_key).expect("meta").permissions().mode() & 0o777, 0o600);
        let seed = std::fs::read_to_string(&op_key).expect("key");
        let seed: [u8; 32] = hex::decode(seed.trim()).expect("hex").try_into().expect("32 bytes");
        assert_eq!(public_of(&ed25519_dalek::SigningKey::from_bytes(&seed)).to_hex(), genesis.operator_key);
        for j in 0..4 {
            let key = tally_client::keyfile::load_key(&dir.join(format!("accounts/{j}.key"))).expect("account key");
            assert_eq!(public_of(&key).to_hex(), genesis.accounts[j].key);
        }
        // A second init into the same directory is refused.
        assert!(cluster_init(3, &dir, 4, 7000).is_err());
    }

    fn containers(hosts: &[&str], published_base_port: u16) -> ContainerHosts {
        ContainerHosts { hosts: hosts.iter().map(|h| h.to_string()).collect(), published_base_port }
    }

    #[test]
    fn hosts_layout_names_peers_by_host_and_uses_container_paths() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("c");
        let c = containers(&["tally-1", "tally-2", "tally-3"], 27000);
        let layout = cluster_init_with(3, &dir, 2, 7000, Some(&c)).expect("init");
        for i in 1..=3u64 {
            let path = dir.join(format!("node-{i}.toml"));
            let cfg: NodeConfig = toml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("parse");
            assert_eq!(cfg, layout.configs[i as usize - 1]);
            assert_eq!(cfg.listen, format!("0.0.0.0:{}", 7000 + i));
            assert_eq!(cfg.peer_listen, format!("0.0.0.0:{}", 7100 + i));
            assert_eq!(cfg.metrics_listen, Some(format!("0.0.0.0:{}", 7200 + i)));
            assert_eq!(cfg.data_dir, "/data");
            assert_eq!(cfg.operator_key_file, "/config/operator.key");
            assert_eq!(cfg.genesis_file, "/config/genesis.json");
            assert_eq!(cfg.tls_ca_file.as_deref(), Some("/config/ca.pem"));
            assert_eq!(cfg.tls_cert_file, Some(format!("/config/node-{i}.pem")));
            assert_eq!(cfg.tls_key_file, Some(format!("/config/node-{i}.key")));
            let peers: Vec<(u64, &str, &str)> =
                cfg.peers.iter().map(|p| (p.node_id, p.client.as_str(), p.peer.as_str())).collect();
            assert_eq!(
                peers,
                vec![
                    (1, "tally-1:7001", "tally-1:7101"),
                    (2, "tally-2:7002", "tally-2:7102"),
                    (3, "tally-3:7003", "tally-3:7103")
                ]
            );
            // The files the config names are in the directory compose mounts at /config.
            for f in [&cfg.operator_key_file, &cfg.genesis_file, cfg.tls_cert_file.as_ref().expect("cert")] {
                assert!(dir.join(f.trim_start_matches("/config/")).is_file(), "{f} missing");
            }
        }
        // client.toml: published loopback ports, and which advertised address each stands for.
        let published = PublishedAddrs::load(&dir).expect("load").expect("client.toml");
        assert_eq!(Some(&published), layout.published.as_ref());
        assert_eq!(published.dial_addrs(), vec!["127.0.0.1:27001", "127.0.0.1:27002", "127.0.0.1:27003"]);
        assert_eq!(layout.dial_addrs(), published.dial_addrs());
        assert_eq!(layout.addr_map().get("tally-2:7002").map(String::as_str), Some("127.0.0.1:27002"));
        assert_eq!(layout.addr_map().len(), 3);
    }

    #[test]
    fn hosts_layout_certificates_name_the_node_the_cluster_and_the_host() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = containers(&["a.example", "b", "c"], 7000);
        cluster_init_with(3, tmp.path(), 1, 7000, Some(&c)).expect("init");
        let pem = std::fs::read(tmp.path().join("node-2.pem")).expect("cert");
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
        let parsed = rustls::server::ParsedCertificate::try_from(&der).expect("parse");
        let names = |n: &str| {
            let name = rustls_pki_types::ServerName::try_from(n.to_string()).expect("name");
            rustls::client::verify_server_name(&parsed, &name).is_ok()
        };
        assert!(names("node-2.tally") && names("cluster.tally") && names("b"));
        assert!(!names("node-1.tally") && !names("a.example") && !names("0.0.0.0"));
    }

    #[test]
    fn without_hosts_there_is_no_client_file_and_dial_addrs_are_the_listen_addresses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = cluster_init(3, tmp.path(), 1, 7000).expect("init");
        assert!(layout.published.is_none());
        assert!(!tmp.path().join(CLIENT_FILE).exists());
        assert_eq!(PublishedAddrs::load(tmp.path()).expect("load"), None);
        assert_eq!(layout.dial_addrs(), layout.client_addrs());
        assert!(layout.addr_map().is_empty());
        assert_eq!(layout.configs[0].tls_ca_file, Some(layout.dir.join(CA_FILE).to_string_lossy().into_owned()));
    }

    #[test]
    fn bad_hosts_are_refused() {
        for (hosts, n) in [
            (&["a", "b"][..], 3),
            (&["a", "b", "a"][..], 3),
            (&["a", "b c", "d"][..], 3),
            (&["a", "", "d"][..], 3),
            (&["a:1", "b", "d"][..], 3),
        ] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let r = cluster_init_with(n, tmp.path(), 1, 7000, Some(&containers(hosts, 7000)));
            assert!(r.is_err(), "{hosts:?} accepted");
            assert!(!tmp.path().join("genesis.json").exists(), "{hosts:?}: files written before refusing");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(cluster_init(0, tmp.path(), 1, 7000).is_err());
        assert!(cluster_init(3, tmp.path(), 1, 65_400).is_err());
    }
}
