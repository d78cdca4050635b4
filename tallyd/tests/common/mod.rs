//! Test support: real `tallyd` processes on loopback ports, killed by PID when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tally_cli::cluster::{cluster_init, ClusterLayout};
use tally_client::{Client, ClientOptions};

/// A `tallyd` child process. Dropping it sends SIGKILL to its PID and reaps it.
pub struct Daemon {
    child: Option<Child>,
    pub config: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, addr: &str, log: &Path) -> Daemon {
        let d = Daemon::spawn(config, addr, log);
        d.wait_ready(Duration::from_secs(20));
        d
    }

    /// Starts the process without waiting for it to know a leader (a cluster's first node
    /// cannot elect one alone).
    pub fn spawn(config: &Path, addr: &str, log: &Path) -> Daemon {
        Daemon::spawn_env(config, addr, log, &[])
    }

    /// As [`Daemon::spawn`], with extra environment variables (failpoints).
    pub fn spawn_env(config: &Path, addr: &str, log: &Path, env: &[(&str, &Path)]) -> Daemon {
        Daemon::spawn_with(config, addr, log, env, &[])
    }

    /// As [`Daemon::spawn`], with extra environment variables and command-line arguments.
    pub fn spawn_with(config: &Path, addr: &str, log: &Path, env: &[(&str, &Path)], args: &[&str]) -> Daemon {
        Daemon::spawn_program(Path::new(env!("CARGO_BIN_EXE_tallyd")), config, addr, log, env, args)
    }

    /// As [`Daemon::spawn_with`], running `program` (another release's `tallyd`, say).
    pub fn spawn_program(
        program: &Path,
        config: &Path,
        addr: &str,
        log: &Path,
        env: &[(&str, &Path)],
        args: &[&str],
    ) -> Daemon {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
        let child = Command::new(program)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .arg("--config")
            .arg(config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn tallyd");
        Daemon { child: Some(child), config: config.to_path_buf(), addr: addr.to_string(), log: log.to_path_buf() }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status, if the process has ended (it is reaped then).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `Status` until the node answers and knows a leader.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(conn) =
                tally_client::Connection::connect_with(&self.addr, &dial_for(&self.addr), Duration::from_millis(500))
            {
                if let Ok(tally_codec::wire::ServerMessage::Status(s)) =
                    conn.call_timeout(tally_codec::wire::ClientMessage::Status, Duration::from_secs(2))
                {
                    if s.leader_id.is_some() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "tallyd at {} not ready; log:\n{}", self.addr, self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY-free: kill(2) by PID through the std API sends SIGKILL on Unix.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "tallyd exited with {status} on SIGTERM");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("tallyd did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A test that cannot run on this machine says why and returns; where `CI` is set (non-empty)
/// it fails instead, since a test skipped in CI would pass without testing anything.
pub fn cannot_run(test: &str, why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
    assert!(!ci, "{test} cannot run: {why}; CI is set, where a skipped test must fail");
    eprintln!("SKIPPED {test}: {why}");
}

/// The `tally` binary next to `tallyd` (`cargo test --workspace` builds it for
/// `cli/tests/help.rs`; `cargo build -p tally-cli` does too).
pub fn tally_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_tallyd")).with_file_name("tally");
    assert!(
        p.exists(),
        "{} is missing: run the suite with `cargo test --workspace` (or `cargo build -p tally-cli` first)",
        p.display()
    );
    p
}

/// `tally` with none of the caller's `TALLY_*` settings.
pub fn tally_command() -> Command {
    let mut c = Command::new(tally_bin());
    for var in ["TALLY_ADDR", "TALLY_KEY", "TALLY_CA", "TALLY_CLUSTER_DIR"] {
        c.env_remove(var);
    }
    c
}

/// Base ports are 300 apart, so the three ranges of one (P+1..=P+n, P+101.., P+201..) never meet
/// another base's: two bases 100 or 200 apart shared ports (a client port of one cluster was the
/// metrics port of another, and a replica could not start).
const PORT_SLOT: u16 = 300;
/// Slots between 20,000 and 32,000: below the ephemeral range (32768+), so outgoing connections
/// never take our ports.
const PORT_SLOTS: u64 = 40;

/// A base port P such that P+1..=P+n, P+101.., P+201.. are all free right now (n ≤ 99).
pub fn free_base_port(n: usize) -> u16 {
    assert!(n < 100, "{n} ports: a range holds 99");
    // Tests of one binary run in parallel threads of one process: each call takes the next slot
    // from a start drawn once per process, so no two of them draw the same slot; another process
    // may hold one, which the bind check finds.
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        (std::process::id() as u64).wrapping_mul(2654435761) ^ nanos
    });
    for _ in 0..PORT_SLOTS {
        let nth = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = 20_000 + ((start.wrapping_add(nth)) % PORT_SLOTS) as u16 * PORT_SLOT;
        let ok = (1..=n as u16).all(|i| {
            [base + i, base + 100 + i, base + 200 + i].iter().all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        });
        if ok {
            return base;
        }
    }
    panic!("no free port range found");
}

/// How tests reach each client address: the TLS of the cluster it belongs to (tests of one
/// binary run clusters with different CAs in parallel; their ports never overlap).
static DIALS: std::sync::OnceLock<Mutex<HashMap<String, tally_net::Dial>>> = std::sync::OnceLock::new();

pub fn register_dial(addr: &str, dial: tally_net::Dial) {
    DIALS.get_or_init(Mutex::default).lock().insert(addr.to_string(), dial);
}

/// The TLS of the cluster `addr` belongs to (plaintext for an unknown address).
pub fn dial_for(addr: &str) -> tally_net::Dial {
    DIALS.get_or_init(Mutex::default).lock().get(addr).cloned().unwrap_or(tally_net::Dial::Plain)
}

/// Client options reaching `addrs` with their cluster's TLS.
pub fn opts_for(addrs: &[String], opts: ClientOptions) -> ClientOptions {
    ClientOptions { dial: addrs.first().map_or(tally_net::Dial::Plain, |a| dial_for(a)), ..opts }
}

/// A fresh cluster layout in a temp dir.
pub fn init_cluster(nodes: usize, accounts: usize) -> (tempfile::TempDir, ClusterLayout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port(nodes);
    let layout = cluster_init(nodes, dir.path(), accounts, base).expect("cluster init");
    let dial = layout.dial().expect("cluster CA");
    for a in layout.client_addrs() {
        register_dial(&a, dial.clone());
    }
    (dir, layout)
}

/// Read-back access to the cluster of `layout` (TLS and the admin key).
pub fn access(layout: &ClusterLayout) -> tally_chaos::readback::Access {
    tally_chaos::readback::Access { dial: layout.dial().expect("CA"), admin: layout.admin_key().expect("admin key") }
}

/// Starts every node of `layout`, then waits until each knows a leader.
pub fn start_all(layout: &ClusterLayout) -> Vec<Daemon> {
    start_all_env(layout, |_| Vec::new())
}

/// [`start_all`], node `i` with the environment `env(i)` (a failpoint directory, say).
pub fn start_all_env(layout: &ClusterLayout, env: impl Fn(usize) -> Vec<(&'static str, PathBuf)>) -> Vec<Daemon> {
    let nodes: Vec<Daemon> = layout
        .config_paths
        .iter()
        .zip(&layout.configs)
        .enumerate()
        .map(|(i, (p, c))| {
            let vars = env(i);
            let vars: Vec<(&str, &Path)> = vars.iter().map(|(k, v)| (*k, v.as_path())).collect();
            Daemon::spawn_env(p, &c.listen, &layout.dir.join(format!("node-{}.log", i + 1)), &vars)
        })
        .collect();
    for d in &nodes {
        d.wait_ready(Duration::from_secs(30));
    }
    nodes
}

pub fn account_key(layout: &ClusterLayout, j: usize) -> ed25519_dalek::SigningKey {
    tally_client::keyfile::load_key(&layout.account_keys[j]).expect("account key")
}

pub fn client(layout: &ClusterLayout, j: usize) -> Client {
    let addrs = layout.client_addrs();
    Client::connect(&addrs, account_key(layout, j), opts_for(&addrs, ClientOptions::default())).expect("connect")
}

pub fn operator(layout: &ClusterLayout) -> tally_codec::PublicKey {
    tally_codec::PublicKey::from_hex(&layout.operator_public).expect("operator key")
}

// ---------------------------------------------------------------------------------------------
// Cluster helpers (multi-process tests).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tally_codec::wire::{ClientMessage, ServerMessage, StatusInfo, SubmitReply};
use tally_codec::{BatchHeader, Operation, PublicKey, Receipt, RequestId};

/// Money in genesis: every account starts with this much.
pub const GENESIS_BALANCE: u128 = tally_cli::cluster::GENESIS_BALANCE as u128;

/// Status of one replica, or `None` if it does not answer within ~1 s.
pub fn status_of(addr: &str) -> Option<StatusInfo> {
    let conn = tally_client::Connection::connect_with(addr, &dial_for(addr), Duration::from_millis(500)).ok()?;
    match conn.call_timeout(ClientMessage::Status, Duration::from_millis(1000)).ok()? {
        ServerMessage::Status(s) => Some(s),
        _ => None,
    }
}

/// The replica among `nodes` (by index) that says it leads, in the highest term seen.
pub fn find_leader(nodes: &[Daemon]) -> Option<(usize, StatusInfo)> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_running())
        .filter_map(|(i, d)| status_of(&d.addr).map(|s| (i, s)))
        .filter(|(_, s)| s.leader_id == Some(s.node_id))
        .max_by_key(|(_, s)| s.term)
}

/// Waits up to `timeout` for a leader among the running `nodes`.
pub fn wait_leader(nodes: &[Daemon], timeout: Duration) -> (usize, StatusInfo) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = find_leader(nodes) {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Client addresses of the running nodes.
pub fn running_addrs(nodes: &[Daemon]) -> Vec<String> {
    nodes.iter().filter(|d| d.is_running()).map(|d| d.addr.clone()).collect()
}

/// Client options for writers: fail fast, so a writer thread notices stops promptly.
pub fn short_opts() -> ClientOptions {
    ClientOptions {
        retry_total: Duration::from_secs(2),
        call_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

pub fn fresh_key() -> PublicKey {
    PublicKey(tally_client::keyfile::generate_key().verifying_key().to_bytes())
}

/// A background writer: frames of `frame` transfers of 1 from one funded account to fresh
/// keys; every `Committed` receipt is recorded.
pub struct Writer {
    pub acked: Arc<Mutex<HashMap<RequestId, Receipt>>>,
    pub frames_failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// `threads` writer threads share one client of `key`.
    pub fn start(addrs: &[String], key: ed25519_dalek::SigningKey, frame: usize, threads: usize) -> Writer {
        Writer::start_with(addrs, key, frame, threads, short_opts())
    }

    pub fn start_with(
        addrs: &[String],
        key: ed25519_dalek::SigningKey,
        frame: usize,
        threads: usize,
        opts: ClientOptions,
    ) -> Writer {
        let client = Arc::new(Client::connect(addrs, key, opts_for(addrs, opts)).expect("writer connects"));
        let acked: Arc<Mutex<HashMap<RequestId, Receipt>>> = Arc::default();
        let frames_failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (client, acked, failed, stop) =
                    (client.clone(), acked.clone(), frames_failed.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let reqs: Vec<_> = (0..frame)
                            .map(|_| client.sign(Operation::Transfer { to: fresh_key(), amount: 1 }).expect("sign"))
                            .collect();
                        match client.submit(reqs) {
                            Ok(replies) => {
                                let mut a = acked.lock();
                                for r in replies {
                                    if let SubmitReply::Committed { receipt, .. } = r {
                                        a.insert(receipt.request_id(), *receipt);
                                    }
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
            })
            .collect();
        Writer { acked, frames_failed, stop, threads }
    }

    pub fn acked_len(&self) -> usize {
        self.acked.lock().len()
    }

    /// Stops the threads (each finishes its frame) and returns every acknowledged receipt.
    pub fn finish(mut self) -> HashMap<RequestId, Receipt> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().expect("writer thread");
        }
        self.acked.lock().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Waits until `cond` holds, polling every 50 ms; false after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads every replica of `addrs` back, runs the shared checks of committed history over it and
/// the receipts in `acked` (`tally_chaos::readback::check_cluster`), and panics with every
/// violation.
pub fn assert_invariants(addrs: &[String], layout: &ClusterLayout, acked: &HashMap<RequestId, Receipt>) {
    let acked_height = acked.values().map(|r| r.header.height).max().unwrap_or(0);
    assert!(
        tally_chaos::readback::wait_converged(&access(layout), addrs, acked_height, Duration::from_secs(30)),
        "replicas {addrs:?} did not converge: {:?}",
        addrs
            .iter()
            .map(|a| status_of(a).map(|s| (s.node_id, s.committed_height, s.applied_height)))
            .collect::<Vec<_>>()
    );
    let supply = GENESIS_BALANCE * layout.account_keys.len() as u128;
    let v = tally_chaos::readback::check_cluster(&access(layout), addrs, &operator(layout), acked, supply);
    let violations = &v.verdicts.violations;
    eprintln!(
        "check: {} heights, {} replicas, {} requests in history, {} acknowledged, {} violations",
        v.heights,
        v.replicas,
        v.requests_in_history,
        v.acknowledged,
        violations.len()
    );
    for x in violations.iter().take(50) {
        eprintln!("  violation: {}: {}", x.invariant, x.what);
    }
    assert!(v.ok(), "{} invariant violations (first: {:?})", violations.len(), violations.first());
    assert!(v.acknowledged == 0 || v.requests_in_history >= v.acknowledged);
}

/// The header at `height` as `addr` stores it.
pub fn header_at(addr: &str, height: u64) -> Option<BatchHeader> {
    let conn = tally_client::Connection::connect_with(addr, &dial_for(addr), Duration::from_secs(1)).ok()?;
    match conn.call_timeout(ClientMessage::Batch { height }, Duration::from_secs(5)).ok()? {
        ServerMessage::Batch(Some(b)) => Some(b.header),
        _ => None,
    }
}

/// Writes a node config where `tallyd --config` reads it.
pub fn write_config(path: &Path, cfg: &tally_codec::config::NodeConfig) {
    std::fs::write(path, toml::to_string_pretty(cfg).expect("toml")).expect("write config");
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Prints the tail of every node log (for failures).
pub fn dump_logs(nodes: &[Daemon]) {
    for d in nodes {
        let t = d.log_text();
        let tail: Vec<&str> = t.lines().rev().take(30).collect();
        eprintln!("---- {} ({}) ----", d.log.display(), d.addr);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

/// Submits one transfer at a time to each of `addrs` directly (no client-library retry or
/// backoff), so a new leader gets work the moment it can take it. Committed receipts go to
/// `acked`. One thread per address.
pub struct Prober {
    pub acked: Arc<Mutex<HashMap<RequestId, Receipt>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    pub fn start(addrs: &[String], layout: &ClusterLayout, account: usize) -> Prober {
        let cluster = tally_codec::ClusterId::from_hex(&layout.cluster_id).expect("cluster id");
        let acked: Arc<Mutex<HashMap<RequestId, Receipt>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = addrs
            .iter()
            .map(|addr| {
                let (addr, key, acked, stop) =
                    (addr.clone(), account_key(layout, account), acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<tally_client::Connection> = None;
                    while !stop.load(Ordering::Acquire) {
                        if conn.as_ref().is_none_or(|c| c.is_closed()) {
                            conn = tally_client::Connection::connect_with(
                                &addr,
                                &dial_for(&addr),
                                Duration::from_millis(200),
                            )
                            .ok();
                        }
                        if let Some(c) = &conn {
                            let req = tally_client::client::sign_request(
                                &key,
                                cluster,
                                Operation::Transfer { to: fresh_key(), amount: 1 },
                            );
                            if let Ok(ServerMessage::Submitted(rs)) =
                                c.call_timeout(ClientMessage::Submit(vec![req]), Duration::from_millis(1500))
                            {
                                for r in rs {
                                    if let SubmitReply::Committed { receipt, .. } = r {
                                        acked.lock().insert(receipt.request_id(), *receipt);
                                    }
                                }
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Prober { acked, stop, threads }
    }

    pub fn finish(mut self) -> HashMap<RequestId, Receipt> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().expect("prober thread");
        }
        self.acked.lock().clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// `(status, body)` of an HTTP/1.0 `GET path` on `addr` (no chunked answers), or `None` when
/// nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string()))
}

/// The value of one series in a Prometheus exposition, named as it is printed:
/// `tally_term` or `tally_refused_total{stage="validate",reason="Expired"}`.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
