//! `tally up`: init + start a local cluster of `tallyd` processes + a short demo load.
//!
//! The children are owned by a guard that kills (by PID, through their `Child` handles) and
//! reaps exactly the processes it started, on Ctrl-C, on `--no-wait`, and on any error.

use crate::cluster::{cluster_init, ClusterLayout};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tally_client::client::{sign_request, Client, ClientOptions};
use tally_client::connection::Connection;
use tally_client::error::ClientError;
use tally_client::keyfile::{generate_key, load_key, public_of};
use tally_client::receipt_file::{save_receipt, verify_receipt_file};
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{DocKey, Operation, Outcome};

/// How long the cluster may take to elect a leader before `up` gives up.
pub const LEADER_WAIT_MS: u64 = 30_000;
/// Demo load: transfers and documents.
pub const DEMO_TRANSFERS: usize = 300;
/// Documents written by the demo.
pub const DEMO_DOCS: usize = 20;

/// Options of `tally up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: usize,
    pub dir: Option<PathBuf>,
    pub accounts: usize,
    pub base_port: u16,
    /// Stop right after the demo (for tests and scripts).
    pub no_wait: bool,
}

/// The started `tallyd` processes; dropping it kills and reaps them.
pub struct Children {
    procs: Vec<(u64, Child)>,
}

impl Children {
    /// Kills and waits for every child this guard started.
    pub fn stop(&mut self) {
        for (node, child) in &mut self.procs {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
            tracing::debug!(node, pid = child.id(), "stopped");
        }
        self.procs.clear();
    }

    /// Nodes whose process already exited, with the status.
    fn exited(&mut self) -> Vec<(u64, String)> {
        self.procs.iter_mut().filter_map(|(n, c)| c.try_wait().ok().flatten().map(|s| (*n, s.to_string()))).collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `tallyd` next to this executable (cargo puts both in target/<profile>/), else on PATH.
pub fn find_tallyd() -> PathBuf {
    find_sibling("tallyd")
}

/// A program shipped with `tally` (`tallyd`, `tally-sim`): next to this executable, else on PATH.
pub fn find_sibling(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let candidate = exe.with_file_name(name);
        if candidate.is_file() {
            return candidate;
        }
        // Test binaries live one level down, in target/<profile>/deps/.
        if let Some(parent) = exe.parent().and_then(Path::parent) {
            let candidate = parent.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// Starts one `tallyd --config` per node, logging to DIR/node-<i>.log.
///
/// # Errors
/// [`ClientError::Invalid`] when `tallyd` can't be started.
pub fn start_nodes(layout: &ClusterLayout, tallyd: &Path) -> Result<Children, ClientError> {
    let mut children = Children { procs: Vec::new() };
    for (cfg, path) in layout.configs.iter().zip(&layout.config_paths) {
        let log_path = layout.dir.join(format!("node-{}.log", cfg.node_id));
        let log = std::fs::File::create(&log_path).map_err(|e| ClientError::file(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| ClientError::file(&log_path, e))?;
        let child = Command::new(tallyd)
            .arg("--config")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                ClientError::Invalid(format!(
                    "cannot start {}: {e} (build the server first: `cargo build --release -p tallyd`)",
                    tallyd.display()
                ))
            })?;
        children.procs.push((cfg.node_id, child));
    }
    Ok(children)
}

fn log_tail(dir: &Path, node: u64) -> String {
    let text = std::fs::read_to_string(dir.join(format!("node-{node}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Polls every node's Status until one reports a leader.
///
/// # Errors
/// [`ClientError::Unavailable`] when no leader appears in time or a node exits.
pub fn wait_for_leader(
    layout: &ClusterLayout,
    children: &mut Children,
    wait: Duration,
) -> Result<(u64, u64), ClientError> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Some((node, status)) = children.exited().into_iter().next() {
            return Err(ClientError::Unavailable {
                what: "start",
                detail: format!("node {node} exited ({status}); its log ends with:\n{}", log_tail(&layout.dir, node)),
            });
        }
        for addr in layout.client_addrs() {
            let Ok(conn) = Connection::connect_with(&addr, &layout.dial()?, Duration::from_millis(500)) else {
                continue;
            };
            if let Ok(ServerMessage::Status(s)) = conn.call_timeout(ClientMessage::Status, Duration::from_secs(1)) {
                if let Some(leader) = s.leader_id {
                    return Ok((leader, s.term));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(ClientError::Unavailable { what: "start", detail: format!("no leader elected within {} s", wait.as_secs()) })
}

/// A few hundred transfers and some documents, a summary, and one verified receipt.
///
/// # Errors
/// [`ClientError`] when the cluster does not serve the demo.
pub fn demo(layout: &ClusterLayout) -> Result<(), ClientError> {
    let key_path = layout
        .account_keys
        .first()
        .ok_or_else(|| ClientError::Invalid("the demo needs at least one funded account".into()))?;
    let key = load_key(key_path)?;
    let opts = ClientOptions { dial: layout.dial()?, ..ClientOptions::default() };
    let client = Client::connect(&layout.client_addrs(), key.clone(), opts)?;
    let cluster_id = client.cluster_id().ok_or_else(|| ClientError::Invalid("cluster id unknown".into()))?;
    let started = Instant::now();
    let mut reqs: Vec<_> = (0..DEMO_TRANSFERS)
        .map(|_| sign_request(&key, cluster_id, Operation::Transfer { to: public_of(&generate_key()), amount: 1 }))
        .collect();
    reqs.extend((0..DEMO_DOCS).map(|i| {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        let value = format!(r#"{{"demo": {i}, "name": "Chapayev's Mustache comb"}}"#).into_bytes();
        sign_request(&key, cluster_id, Operation::Set { key: DocKey::from_random(bytes), value })
    }));
    let replies = client.submit(reqs)?;
    let elapsed = started.elapsed();
    let mut ok = 0usize;
    let mut failed = 0usize;
    let mut sample = None;
    for r in &replies {
        match r {
            SubmitReply::Committed { receipt, .. } if receipt.outcome.is_success() => {
                ok += 1;
                if sample.is_none() {
                    sample = Some(receipt.clone());
                }
            }
            _ => failed += 1,
        }
    }
    println!(
        "Demo: {ok} of {} requests committed ({DEMO_TRANSFERS} transfers, {DEMO_DOCS} documents), {failed} failed, in {:.2} s",
        replies.len(),
        elapsed.as_secs_f64()
    );
    let balance = client.balance(public_of(&key), false)?.unwrap_or(0);
    println!("Funded account {} now holds {balance}", public_of(&key));
    if let Some(receipt) = sample {
        let path = layout.dir.join("demo-receipt.json");
        save_receipt(&path, &receipt, client.operator_key())?;
        let operator = tally_codec::PublicKey::from_hex(&layout.operator_public)?;
        verify_receipt_file(&path, &operator)?;
        let outcome = match receipt.outcome {
            Outcome::Transferred { sender_balance } => format!("transfer, sender balance {sender_balance}"),
            ref o => format!("{o:?}"),
        };
        println!(
            "Receipt for request {} (height {}, {outcome}) verified against operator key {}; saved to {}",
            receipt.request_id(),
            receipt.header.height,
            layout.operator_public,
            path.display()
        );
        println!(
            "  check it yourself: tally verify {} --operator-key {} --cluster-id {}",
            path.display(),
            layout.operator_pub_path.display(),
            layout.cluster_id
        );
    }
    if failed > 0 {
        return Err(ClientError::Invalid(format!("{failed} demo requests did not commit")));
    }
    Ok(())
}

/// How to run this very `tally` again (it may not be on PATH).
fn this_exe() -> String {
    std::env::current_exe().map_or_else(|_| "tally".to_string(), |p| p.display().to_string())
}

/// Waits until every node answers a Status; names the first that exited or never answered.
fn wait_all_answer(layout: &ClusterLayout, children: &mut Children, wait: Duration) -> Result<(), ClientError> {
    let deadline = Instant::now() + wait;
    let dial = layout.dial()?;
    loop {
        if let Some((node, status)) = children.exited().into_iter().next() {
            return Err(ClientError::Unavailable {
                what: "start",
                detail: format!("node {node} exited ({status}); its log ends with:\n{}", log_tail(&layout.dir, node)),
            });
        }
        let silent: Vec<u64> = layout
            .configs
            .iter()
            .filter(|c| {
                Connection::connect_with(&c.listen, &dial, Duration::from_millis(500))
                    .and_then(|conn| conn.call_timeout(ClientMessage::Status, Duration::from_secs(1)))
                    .is_err()
            })
            .map(|c| c.node_id)
            .collect();
        let Some(&node) = silent.first() else { return Ok(()) };
        if Instant::now() > deadline {
            return Err(ClientError::Unavailable {
                what: "start",
                detail: format!("node {node} does not answer; its log ends with:\n{}", log_tail(&layout.dir, node)),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster directory `tally up` made for itself (no `--dir`): removed when it ends, the nodes
/// stopped first (declared before them, so dropped after).
struct TemporaryDir(PathBuf);

impl Drop for TemporaryDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => println!("Removed {} (give --dir to keep a cluster's files).", self.0.display()),
            Err(e) => eprintln!("could not remove {}: {e}", self.0.display()),
        }
    }
}

/// Runs `tally up`.
///
/// # Errors
/// [`ClientError`] from init, start, the leader wait or the demo; the children are stopped first.
pub fn run_up(opts: &UpOptions) -> Result<(), ClientError> {
    let (dir, _temporary) = match &opts.dir {
        Some(d) => (d.clone(), None),
        None => {
            let mut suffix = [0u8; 4];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut suffix);
            let d = std::env::temp_dir().join(format!("tally-up-{}", hex::encode(suffix)));
            (d.clone(), Some(TemporaryDir(d)))
        }
    };
    let layout = cluster_init(opts.nodes, &dir, opts.accounts, opts.base_port)?;
    println!("Cluster directory: {}", layout.dir.display());
    let tallyd = find_tallyd();
    let mut children = start_nodes(&layout, &tallyd)?;
    let (leader, term) = wait_for_leader(&layout, &mut children, Duration::from_millis(LEADER_WAIT_MS))?;
    // Every replica must be up, not just a majority: a node that failed to start (a port in
    // use) is reported, and the cluster is stopped.
    if let Err(e) = wait_all_answer(&layout, &mut children, Duration::from_millis(LEADER_WAIT_MS)) {
        children.stop();
        return Err(e);
    }
    println!("tally cluster is up (leader: node {leader}, term {term})");
    println!("Endpoints:");
    for cfg in &layout.configs {
        println!(
            "  node {}: client {}  peer {}  log {}/node-{}.log",
            cfg.node_id,
            cfg.listen,
            cfg.peer_listen,
            layout.dir.display(),
            cfg.node_id
        );
    }
    println!("Operator key: {} ({})", layout.operator_public, layout.operator_pub_path.display());
    if let Some(k) = layout.account_keys.first() {
        println!("Funded key: {}", k.display());
        println!("  try: {} --cluster-dir {} --key {} repl", this_exe(), layout.dir.display(), k.display());
    }
    demo(&layout)?;
    if opts.no_wait {
        children.stop();
        println!("Stopped the cluster (--no-wait).");
        return Ok(());
    }
    let (tx, rx) = crossbeam::channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    })
    .map_err(|e| ClientError::Invalid(format!("cannot install the Ctrl-C handler: {e}")))?;
    println!("Cluster running; press Ctrl-C to stop it.");
    let mut reported = std::collections::HashSet::new();
    while rx.recv_timeout(Duration::from_secs(1)).is_err() {
        for (node, status) in children.exited() {
            if reported.insert(node) {
                println!("node {node} exited ({status}); see {}/node-{node}.log", layout.dir.display());
            }
        }
    }
    children.stop();
    println!("Stopped the cluster.");
    Ok(())
}
