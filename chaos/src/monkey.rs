//! `tally chaos`: a chaos monkey over real `tallyd` processes.
//!
//! ```text
//!  seed ─▶ fault loop ──kill -9 / restart · SIGSTOP / SIGCONT · proxy cuts (partitions, drops)──▶ tallyd × N
//!  clients × C ──signed requests (same bytes on retry) · linearizable reads──▶ any replica
//!       └─▶ history (invoke, then ack / refusal / nothing)
//!  sampler ──status every 250 ms──▶ timeline (committed height, leader)
//!  end: heal · wait for convergence · read every replica's batches and totals
//!       └─▶ tally_check (I1–I6, per-key linearizability, receipts verified offline) ─▶ report · JSON · PNG
//! ```
//! Peer links go through [`crate::proxy::Link`]s (one per direction and pair), so partitions
//! need neither root nor network namespaces.

use crate::proxy::Link;
use crate::readback::{self, Access};
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_check::check::{check_all, check_receipts_offline, Verdicts, Violation};
use tally_check::history::{DocRead, History, Op, OpKind, OpResult, RunRecord, SeenHeader};
use tally_cli::cluster::{cluster_init, ClusterLayout};
use tally_client::Connection;
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{ClusterId, DocKey, ErrorCode, Operation, PublicKey};

/// Fault kinds the monkey can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Faults {
    pub kill: bool,
    pub pause: bool,
    pub partition: bool,
    pub leader: bool,
    /// Added latency on random peer links.
    pub delay: bool,
    /// A replica's data directory runs out of space, then gets it back. Each replica's data then
    /// lives on its own small tmpfs (needs root for `mount`).
    pub disk: bool,
}

impl std::str::FromStr for Faults {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for k in s.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            match k {
                "kill" => f.kill = true,
                "pause" => f.pause = true,
                "partition" => f.partition = true,
                "leader" => f.leader = true,
                "delay" => f.delay = true,
                "disk" => f.disk = true,
                "all" => {
                    f = Faults { kill: true, pause: true, partition: true, leader: true, delay: true, disk: f.disk };
                }
                other => {
                    return Err(format!(
                        "unknown fault {other:?}: kill, pause, partition, leader, delay, disk, all (all but disk)"
                    ))
                }
            }
        }
        Ok(f)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct MonkeyConfig {
    pub nodes: usize,
    pub duration: Duration,
    pub seed: u64,
    pub faults: Faults,
    pub clients: usize,
    /// Cluster directory, logs, report, JSON and PNG go here.
    pub out: PathBuf,
    pub tallyd: PathBuf,
    pub base_port: u16,
    /// A failpoint armed on every replica (debug builds of `tallyd` only), e.g.
    /// `ack-before-commit`: the run must then report a violation.
    pub plant: Option<String>,
    pub progress: bool,
}

/// One injected fault, for the report and the timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultEvent {
    pub at_ms: u64,
    pub kind: String,
    pub nodes: Vec<usize>,
}

/// A status sample.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub committed_height: u64,
    pub leader: Option<u64>,
}

/// What a run found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MonkeyReport {
    pub seed: u64,
    pub nodes: usize,
    pub duration_s: f64,
    pub faults: BTreeMap<String, u64>,
    pub fault_events: Vec<FaultEvent>,
    pub failovers: u64,
    pub longest_without_commit_ms: u64,
    pub ops: u64,
    pub acknowledged: u64,
    pub heights: u64,
    pub verdicts: Verdicts,
    pub converged: bool,
    /// When the faults stopped and everything was healed, and when the first batch committed
    /// after that (ms since the start).
    pub healed_at_ms: u64,
    pub first_commit_after_heal_ms: Option<u64>,
    pub timeline: Vec<Sample>,
}

impl MonkeyReport {
    pub fn ok(&self) -> bool {
        self.verdicts.ok() && self.converged
    }
}

/// How long after healing the cluster must commit again (I5).
pub const LIVENESS_BOUND_MS: u64 = 10_000;
const REQUEST_TTL_MS: u64 = 20_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

struct Node {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

struct Cluster {
    nodes: Vec<Node>,
    /// Per-replica tmpfs mounts holding the data directories (the disk fault).
    disks: Vec<PathBuf>,
    links: BTreeMap<(usize, usize), Link>,
    tallyd: PathBuf,
    failpoint_dir: Option<PathBuf>,
}

impl Cluster {
    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let mut cmd = Command::new(&self.tallyd);
        cmd.arg("--config").arg(&n.config).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        if let Some(d) = &self.failpoint_dir {
            cmd.env("TALLY_FAILPOINT_DIR", d);
        }
        n.child = Some(cmd.spawn()?);
        n.paused = false;
        Ok(())
    }

    /// The last `lines` lines of every replica's log and whether its process still runs, for an
    /// error that has to explain itself from a CI transcript.
    fn log_tails(&mut self, lines: usize) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let state = match n.child.as_mut().map(Child::try_wait) {
                None => "not started".to_string(),
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(status))) => format!("exited: {status}"),
                Some(Err(e)) => format!("unknown: {e}"),
            };
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n    ");
            out.push_str(&format!("  node {} ({state}), {}:\n    {tail}\n", i + 1, n.log.display()));
        }
        out
    }

    fn signal(&mut self, i: usize, sig: i32) {
        if let Some(c) = &self.nodes[i].child {
            // A child we started, by PID (this crate has no unsafe code for libc::kill).
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    fn pause(&mut self, i: usize) {
        self.signal(i, 19); // SIGSTOP
        self.nodes[i].paused = true;
    }

    fn resume(&mut self, i: usize) {
        if self.nodes[i].paused {
            self.signal(i, 18); // SIGCONT
            self.nodes[i].paused = false;
        }
    }

    fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some() && !self.nodes[i].paused
    }

    fn cut(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                if let Some(l) = self.links.get(&(x, y)) {
                    l.cut();
                }
                if let Some(l) = self.links.get(&(y, x)) {
                    l.cut();
                }
            }
        }
    }

    fn heal_links(&self) {
        for l in self.links.values() {
            l.heal();
        }
    }

    fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.resume(i);
            self.kill9(i);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        for m in &self.disks {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn filler(disk: &Path) -> PathBuf {
    disk.join("filler")
}

/// Fills a replica's disk until writes fail with ENOSPC.
fn fill_disk(disk: &Path) {
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=256"])
        .arg(format!("of={}", filler(disk).display()))
        .stderr(Stdio::null())
        .status();
}

struct Shared {
    started: Instant,
    history: Mutex<History>,
    headers: Mutex<Vec<SeenHeader>>,
    stop_clients: AtomicBool,
    acked: AtomicU64,
    addrs: Vec<String>,
    access: Access,
    cluster_id: ClusterId,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Sets up the cluster in `cfg.out/cluster`, runs the workload and the faults, heals, checks.
///
/// # Errors
/// When the cluster can't be set up or started.
pub fn run(cfg: &MonkeyConfig) -> Result<MonkeyReport, String> {
    let (mut cluster, layout) = start_cluster(cfg)?;
    let access = Access {
        dial: layout.dial().map_err(|e| e.to_string())?,
        admin: layout.admin_key().map_err(|e| e.to_string())?,
    };
    let cluster_id = ClusterId::from_hex(&layout.cluster_id).map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared {
        started: Instant::now(),
        history: Mutex::new(History::default()),
        headers: Mutex::new(Vec::new()),
        stop_clients: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        addrs: layout.client_addrs(),
        access,
        cluster_id,
    });
    if wait_for_leader(&shared, Duration::from_secs(30)).is_none() {
        return Err(format!("no leader within 30 s of starting the cluster\n{}", cluster.log_tails(20)));
    }
    let keys: Vec<ed25519_dalek::SigningKey> = layout
        .account_keys
        .iter()
        .map(|p| tally_client::keyfile::load_key(p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let genesis_total = u128::from(1_000_000_000u64) * keys.len() as u128;
    let workload = Workload::start(cfg, &shared, keys);
    let events = inject_faults(cfg, &mut cluster, &shared, &workload.samples);
    let healed = heal(&mut cluster, &shared, &workload.samples);
    let (converged, timeline) = workload.finish(&shared);
    let operator = PublicKey::from_hex(&layout.operator_public).map_err(|e| e.to_string())?;
    let height_at_end = timeline.iter().map(|s| s.committed_height).max();
    let (record, verdicts) = check_run(&shared, &mut cluster, operator, genesis_total, &healed, height_at_end);
    cluster.stop_all();
    let mut faults = BTreeMap::new();
    for e in &events {
        *faults.entry(e.kind.clone()).or_insert(0) += 1;
    }
    Ok(MonkeyReport {
        seed: cfg.seed,
        nodes: cfg.nodes,
        duration_s: shared.started.elapsed().as_secs_f64(),
        faults,
        fault_events: events,
        failovers: count_failovers(&timeline),
        longest_without_commit_ms: longest_gap(&timeline),
        ops: record.history.ops.len() as u64,
        acknowledged: record.history.ops.iter().filter(|o| matches!(o.result, OpResult::Committed(_))).count() as u64,
        heights: record.replicas.iter().filter_map(|r| r.batches.last()).map(|b| b.header.height).max().unwrap_or(0),
        verdicts,
        converged,
        healed_at_ms: healed.at_ms,
        first_commit_after_heal_ms: healed.first_commit_ms,
        timeline,
    })
}

/// Creates the cluster's files in `cfg.out/cluster` (peers reached through the monkey's proxy
/// links, a tmpfs per replica for the disk fault, the planted failpoint) and starts one `tallyd`
/// per replica.
fn start_cluster(cfg: &MonkeyConfig) -> Result<(Cluster, ClusterLayout), String> {
    let dir = cfg.out.join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let accounts = 8;
    let mut layout =
        cluster_init(cfg.nodes, &dir, accounts, cfg.base_port).map_err(|e| format!("cluster init: {e}"))?;
    let mut links = BTreeMap::new();
    for i in 0..cfg.nodes {
        for j in (0..cfg.nodes).filter(|&j| j != i) {
            let link = Link::start("127.0.0.1:0", &layout.configs[j].peer_listen).map_err(|e| format!("proxy: {e}"))?;
            links.insert((i, j), link);
        }
    }
    let disks = if cfg.faults.disk { mount_disks(&dir, &mut layout)? } else { Vec::new() };
    route_peers_through(&links, &mut layout)?;
    let failpoint_dir = arm_failpoint(cfg)?;
    let nodes = (0..cfg.nodes)
        .map(|i| Node {
            config: layout.config_paths[i].clone(),
            log: dir.join(format!("node-{}.log", i + 1)),
            child: None,
            paused: false,
        })
        .collect();
    let mut cluster = Cluster { nodes, disks, links, tallyd: cfg.tallyd.clone(), failpoint_dir };
    for i in 0..cfg.nodes {
        cluster.spawn(i).map_err(|e| format!("start {}: {e}", cfg.tallyd.display()))?;
    }
    Ok((cluster, layout))
}

/// Mounts a small tmpfs per replica under `dir` and moves its data directory there.
fn mount_disks(dir: &Path, layout: &mut ClusterLayout) -> Result<Vec<PathBuf>, String> {
    let mut disks: Vec<PathBuf> = Vec::new();
    for (i, config) in layout.configs.iter_mut().enumerate() {
        let m = dir.join(format!("disk-{}", i + 1));
        std::fs::create_dir_all(&m).map_err(|e| e.to_string())?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            for d in &disks {
                let _ = Command::new("umount").arg("-l").arg(d).status();
            }
            return Err("the disk fault needs `mount -t tmpfs` (root)".into());
        }
        config.data_dir = m.join("data").display().to_string();
        disks.push(m);
    }
    Ok(disks)
}

/// Points every replica's peers at the proxy links and writes its config file.
fn route_peers_through(links: &BTreeMap<(usize, usize), Link>, layout: &mut ClusterLayout) -> Result<(), String> {
    for i in 0..layout.configs.len() {
        let mut c = layout.configs[i].clone();
        for (j, p) in c.peers.iter_mut().enumerate() {
            if j != i {
                p.peer = links[&(i, j)].listen.clone();
            }
        }
        let text = toml::to_string_pretty(&c).map_err(|e| e.to_string())?;
        std::fs::write(&layout.config_paths[i], text).map_err(|e| e.to_string())?;
        layout.configs[i] = c;
    }
    Ok(())
}

/// The failpoint directory holding `cfg.plant`, armed, if one is planted.
fn arm_failpoint(cfg: &MonkeyConfig) -> Result<Option<PathBuf>, String> {
    let Some(p) = &cfg.plant else { return Ok(None) };
    let d = cfg.out.join("failpoints");
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    std::fs::write(d.join(p), b"armed by tally chaos --plant\n").map_err(|e| e.to_string())?;
    Ok(Some(d))
}

/// The clients and the status sampler, running.
struct Workload {
    samples: Arc<Mutex<Vec<Sample>>>,
    sampling: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Workload {
    fn start(cfg: &MonkeyConfig, shared: &Arc<Shared>, keys: Vec<ed25519_dalek::SigningKey>) -> Workload {
        let keys = Arc::new(keys);
        let hot: Vec<DocKey> = (0..3).map(|i| doc_key(cfg.seed, i)).collect();
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (shared, samples, sampling) = (shared.clone(), samples.clone(), sampling.clone());
            std::thread::spawn(move || sample_loop(&shared, &samples, &sampling))
        };
        let clients = (0..cfg.clients)
            .map(|c| {
                let (shared, keys, hot) = (shared.clone(), keys.clone(), hot.clone());
                let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(c as u64);
                std::thread::spawn(move || client_loop(c, seed, &shared, &keys, &hot))
            })
            .collect();
        Workload { samples, sampling, sampler, clients }
    }

    /// Lets the clients run 2 s more, stops them, waits for every replica to converge, then stops
    /// the sampler: whether they converged, and the samples.
    fn finish(self, shared: &Shared) -> (bool, Vec<Sample>) {
        std::thread::sleep(Duration::from_secs(2));
        shared.stop_clients.store(true, Ordering::Release);
        for c in self.clients {
            let _ = c.join();
        }
        let acked_height = shared
            .history
            .lock()
            .ops
            .iter()
            .filter_map(|o| match &o.result {
                OpResult::Committed(r) => Some(r.header.height),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let converged = readback::wait_converged(&shared.access, &shared.addrs, acked_height, Duration::from_secs(60));
        self.sampling.store(false, Ordering::Release);
        let _ = self.sampler.join();
        let timeline = std::mem::take(&mut *self.samples.lock());
        (converged, timeline)
    }
}

/// The fault loop's state: the seeded choices and what it scheduled to undo, and when.
struct Faulting {
    rng: ChaCha20Rng,
    events: Vec<FaultEvent>,
    restarts: Vec<(Instant, usize)>,
    resumes: Vec<(Instant, usize)>,
    refills: Vec<(Instant, usize)>,
    heal_at: Option<Instant>,
}

/// Injects faults drawn from `cfg.seed`, one every 1 to 4 s, for `cfg.duration`, undoing each
/// when its time comes; the faults injected.
fn inject_faults(
    cfg: &MonkeyConfig,
    cluster: &mut Cluster,
    shared: &Shared,
    samples: &Mutex<Vec<Sample>>,
) -> Vec<FaultEvent> {
    let bar = progress_bar(cfg);
    let mut f = Faulting {
        rng: ChaCha20Rng::seed_from_u64(cfg.seed),
        events: Vec::new(),
        restarts: Vec::new(),
        resumes: Vec::new(),
        refills: Vec::new(),
        heal_at: None,
    };
    let mut next_fault = Instant::now() + Duration::from_millis(f.rng.gen_range(1_000..3_000));
    let fault_until = Instant::now() + cfg.duration;
    while Instant::now() < fault_until {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        f.undo_due(cluster, now);
        bar.set_position(shared.started.elapsed().as_secs().min(cfg.duration.as_secs()));
        let failovers = count_failovers(&samples.lock());
        bar.set_message(format!(
            "{} faults, {failovers} failovers, {} acked",
            f.events.len(),
            shared.acked.load(Ordering::Relaxed)
        ));
        if now < next_fault {
            continue;
        }
        next_fault = now + Duration::from_millis(f.rng.gen_range(1_000..4_000));
        let Some(kind) = f.choose_kind(&cfg.faults, cluster) else { continue };
        let at_ms = shared.now_ms();
        // The sampler's latest view (at most 250 ms old): the fault loop never dials a replica
        // itself, so a stopped one cannot hold it up.
        let leader = samples.lock().last().and_then(|s| s.leader).map(|id| id as usize - 1);
        let hit = f.inject(kind, cluster, leader, now);
        if hit.is_empty() {
            continue; // no target at this moment (no leader known to isolate or kill): no fault
        }
        bar.suspend(|| {
            if !cfg.progress {
                return;
            }
            eprintln!("{:>7} ms  {kind} {:?}", at_ms, hit.iter().map(|i| i + 1).collect::<Vec<_>>());
        });
        f.events.push(FaultEvent { at_ms, kind: kind.into(), nodes: hit.iter().map(|i| i + 1).collect() });
    }
    bar.finish_and_clear();
    f.events
}

fn progress_bar(cfg: &MonkeyConfig) -> indicatif::ProgressBar {
    if !cfg.progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(cfg.duration.as_secs());
    b.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

impl Faulting {
    /// Restarts, resumes, frees disks and heals links whose time has come.
    fn undo_due(&mut self, cluster: &mut Cluster, now: Instant) {
        for (_, i) in self.restarts.iter().filter(|(t, _)| *t <= now) {
            let _ = cluster.spawn(*i);
        }
        self.restarts.retain(|(t, _)| *t > now);
        for (_, i) in self.resumes.iter().filter(|(t, _)| *t <= now) {
            cluster.resume(*i);
        }
        self.resumes.retain(|(t, _)| *t > now);
        for (_, i) in self.refills.iter().filter(|(t, _)| *t <= now) {
            let _ = std::fs::remove_file(filler(&cluster.disks[*i]));
        }
        self.refills.retain(|(t, _)| *t > now);
        if self.heal_at.is_some_and(|t| t <= now) {
            cluster.heal_links();
            self.heal_at = None;
        }
    }

    /// A fault kind among those enabled that the cluster has room for now.
    fn choose_kind(&mut self, faults: &Faults, cluster: &Cluster) -> Option<&'static str> {
        let n = cluster.nodes.len();
        // At most a minority is down or stopped at once, so the run keeps committing.
        let down = (0..n).filter(|&i| !cluster.is_up(i)).count();
        let room = down < (n - 1) / 2;
        let mut kinds = Vec::new();
        if faults.kill && room {
            kinds.push("kill");
        }
        if faults.leader && room {
            kinds.push("kill-leader");
        }
        if faults.pause && room {
            kinds.push("pause");
        }
        if faults.partition && self.heal_at.is_none() {
            kinds.extend(["partition-minority", "partition-isolate-leader", "partition-bridge", "drop-connections"]);
        }
        if faults.delay && self.heal_at.is_none() {
            kinds.push("delay");
        }
        if faults.disk && room && self.refills.is_empty() {
            kinds.push("disk-full");
        }
        kinds.choose(&mut self.rng).copied()
    }

    /// Injects one fault of `kind` and schedules its undoing: the replicas it hit.
    fn inject(&mut self, kind: &str, cluster: &mut Cluster, leader: Option<usize>, now: Instant) -> Vec<usize> {
        match kind {
            "kill" | "kill-leader" | "pause" | "disk-full" => self.hit_replica(kind, cluster, leader, now),
            _ => self.hit_links(kind, cluster, leader, now),
        }
    }

    /// Kills (any replica, or the leader), pauses or fills the disk of one replica that is up.
    fn hit_replica(&mut self, kind: &str, cluster: &mut Cluster, leader: Option<usize>, now: Instant) -> Vec<usize> {
        let up: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| cluster.is_up(i)).collect();
        let target = match kind {
            "kill-leader" => leader.filter(|l| up.contains(l)),
            _ => up.choose(&mut self.rng).copied(),
        };
        let Some(i) = target else { return Vec::new() };
        match kind {
            "kill" | "kill-leader" => {
                cluster.kill9(i);
                self.restarts.push((now + Duration::from_millis(self.rng.gen_range(500..5_000)), i));
            }
            "pause" => {
                // Shorter and longer than the election timeout (500 ms by default).
                let ms =
                    if self.rng.gen_bool(0.5) { self.rng.gen_range(100..450) } else { self.rng.gen_range(700..4_000) };
                cluster.pause(i);
                self.resumes.push((now + Duration::from_millis(ms), i));
            }
            _ => {
                fill_disk(&cluster.disks[i]);
                self.refills.push((now + Duration::from_millis(self.rng.gen_range(2_000..6_000)), i));
            }
        }
        vec![i]
    }

    /// Cuts or slows peer links (partitions, delays, every connection dropped), healed later.
    fn hit_links(&mut self, kind: &str, cluster: &mut Cluster, leader: Option<usize>, now: Instant) -> Vec<usize> {
        let n = cluster.nodes.len();
        let mut hit = Vec::new();
        match kind {
            "partition-minority" => {
                let mut ids: Vec<usize> = (0..n).collect();
                ids.shuffle(&mut self.rng);
                let k = self.rng.gen_range(1..=(n - 1) / 2);
                cluster.cut(&ids[..k], &ids[k..]);
                hit.extend_from_slice(&ids[..k]);
            }
            "partition-isolate-leader" => {
                let Some(l) = leader else { return hit };
                let rest: Vec<usize> = (0..n).filter(|&i| i != l).collect();
                cluster.cut(&[l], &rest);
                hit.push(l);
            }
            "partition-bridge" => {
                let mut ids: Vec<usize> = (0..n).collect();
                ids.shuffle(&mut self.rng);
                let rest = &ids[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cluster.cut(a, b);
                hit.push(ids[0]);
            }
            "delay" => hit = self.delay_links(cluster),
            _ => {
                // Dropped connections: every link cut and restored at once; every replica hit.
                let all: Vec<usize> = (0..n).collect();
                cluster.cut(&all, &all);
                self.heal_at = Some(now + Duration::from_millis(50));
                return all;
            }
        }
        self.heal_at = Some(now + Duration::from_millis(self.rng.gen_range(1_000..5_000)));
        hit
    }

    /// Adds 20 to 300 ms to a random set of links: the replicas whose outgoing links are slowed.
    fn delay_links(&mut self, cluster: &Cluster) -> Vec<usize> {
        let mut links: Vec<(usize, usize)> = cluster.links.keys().copied().collect();
        links.shuffle(&mut self.rng);
        let k = self.rng.gen_range(1..=links.len());
        let ms = self.rng.gen_range(20..300);
        let mut hit = Vec::new();
        for l in &links[..k] {
            cluster.links[l].set_delay(ms);
            hit.push(l.0);
        }
        hit.sort_unstable();
        hit.dedup();
        hit
    }
}

/// What healing found.
struct Healed {
    /// When every fault was undone (ms since the start).
    at_ms: u64,
    /// Replicas that exited on their own during the faults, with their logs.
    exited: Option<Violation>,
    height_at_heal: u64,
    first_commit_ms: Option<u64>,
}

/// Heals every link and disk and resumes every replica; the clients go on, so progress after
/// healing is measured under load. A replica the monkey did not kill must still run: a full
/// disk, a cut link or a pause is never a reason to exit. One that exited is reported (I5), then
/// started again for the checks.
fn heal(cluster: &mut Cluster, shared: &Shared, samples: &Mutex<Vec<Sample>>) -> Healed {
    let at_ms = shared.now_ms();
    cluster.heal_links();
    for d in &cluster.disks {
        let _ = std::fs::remove_file(filler(d));
    }
    let mut exited = Vec::new();
    for i in 0..cluster.nodes.len() {
        cluster.resume(i);
        if let Some(Ok(Some(status))) = cluster.nodes[i].child.as_mut().map(Child::try_wait) {
            exited.push(format!("replica {} exited on its own ({status})", i + 1));
            cluster.nodes[i].child = None;
        }
        if cluster.nodes[i].child.is_none() {
            let _ = cluster.spawn(i);
        }
    }
    let exited =
        (!exited.is_empty()).then(|| Violation::new("I5", format!("{}\n{}", exited.join("; "), cluster.log_tails(30))));
    let height_at_heal = samples.lock().last().map_or(0, |s| s.committed_height);
    let heal_deadline = Instant::now() + Duration::from_millis(LIVENESS_BOUND_MS * 2);
    let mut first_commit_ms = None;
    while Instant::now() < heal_deadline {
        std::thread::sleep(Duration::from_millis(100));
        let s = samples.lock();
        if let Some(x) = s.iter().find(|x| x.at_ms >= at_ms && x.committed_height > height_at_heal) {
            first_commit_ms = Some(x.at_ms);
            break;
        }
    }
    Healed { at_ms, exited, height_at_heal, first_commit_ms }
}

/// Reads every replica back into the run's record and runs the shared checks over it
/// (`tally_check`: every invariant, and each receipt verified offline), with the replicas that
/// could not be read (I3) and those that exited on their own (I5).
fn check_run(
    shared: &Shared,
    cluster: &mut Cluster,
    operator: PublicKey,
    genesis_total: u128,
    healed: &Healed,
    height_at_end: Option<u64>,
) -> (RunRecord, Verdicts) {
    let back = readback::read_cluster(&shared.access, &shared.addrs);
    let mut headers = std::mem::take(&mut *shared.headers.lock());
    headers.extend(back.headers.iter().cloned());
    let record = RunRecord {
        operator,
        genesis_total,
        history: std::mem::take(&mut *shared.history.lock()),
        replicas: back.replicas.clone(),
        headers,
        healed_at_ms: healed.at_ms,
        height_at_heal: healed.height_at_heal,
        height_at_end,
        first_commit_after_heal_ms: healed.first_commit_ms,
    };
    let mut verdicts = check_all(&record, LIVENESS_BOUND_MS);
    verdicts.violations.extend(check_receipts_offline(&record));
    if let Some(mut v) = back.unread_violation() {
        v.what = format!("{}\n{}", v.what, cluster.log_tails(30));
        verdicts.violations.push(v);
    }
    verdicts.violations.extend(healed.exited.clone());
    (record, verdicts)
}

fn doc_key(seed: u64, i: u64) -> DocKey {
    let h = blake3::hash(&[seed.to_le_bytes(), i.to_le_bytes()].concat());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    DocKey(b)
}

fn connect(shared: &Shared, i: usize) -> Option<Connection> {
    Connection::connect_with(&shared.addrs[i], &shared.access.dial, Duration::from_millis(500)).ok()
}

fn current_leader(shared: &Shared) -> Option<usize> {
    (0..shared.addrs.len())
        .find(|&i| readback::status(&shared.access, &shared.addrs[i]).is_some_and(|s| s.leader_id == Some(s.node_id)))
}

fn wait_for_leader(shared: &Shared, timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(l) = current_leader(shared) {
            return Some(l);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn sample_loop(shared: &Shared, samples: &Mutex<Vec<Sample>>, running: &AtomicBool) {
    let mut conns: Vec<Option<Connection>> = (0..shared.addrs.len()).map(|_| None).collect();
    while running.load(Ordering::Acquire) {
        let mut top = 0;
        let mut leader = None;
        for (i, slot) in conns.iter_mut().enumerate() {
            if slot.as_ref().is_none_or(Connection::is_closed) {
                *slot = connect(shared, i);
            }
            let Some(c) = slot.as_ref() else { continue };
            match c.call_timeout(ClientMessage::Status, Duration::from_millis(300)) {
                Ok(ServerMessage::Status(s)) => {
                    top = top.max(s.committed_height);
                    if s.leader_id == Some(s.node_id) {
                        leader = Some(s.node_id);
                    }
                }
                _ => *slot = None,
            }
        }
        samples.lock().push(Sample { at_ms: shared.now_ms(), committed_height: top, leader });
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn count_failovers(samples: &[Sample]) -> u64 {
    let mut last = None;
    let mut n = 0;
    for s in samples {
        if let Some(l) = s.leader {
            if last.is_some() && last != Some(l) {
                n += 1;
            }
            last = Some(l);
        }
    }
    n
}

fn longest_gap(samples: &[Sample]) -> u64 {
    let mut longest = 0;
    let mut since: Option<(u64, u64)> = None; // (height, since ms)
    for s in samples {
        match since {
            Some((h, t)) if s.committed_height <= h => longest = longest.max(s.at_ms - t),
            _ => since = Some((s.committed_height, s.at_ms)),
        }
    }
    longest
}

/// One client: operations one at a time, each retried with the same signed bytes on another
/// replica until it is answered or expires.
fn client_loop(c: usize, seed: u64, shared: &Shared, keys: &[ed25519_dalek::SigningKey], hot: &[DocKey]) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n = shared.addrs.len();
    let mut caller = Caller { client: c, conns: (0..n).map(|_| None).collect(), target: c % n };
    while !shared.stop_clients.load(Ordering::Acquire) {
        let (kind, msg) = if rng.gen_bool(0.6) {
            transfer_op(&mut rng, shared, keys)
        } else {
            doc_op(c, &mut rng, shared, keys, hot)
        };
        let hist = {
            let mut h = shared.history.lock();
            h.ops.push(Op {
                client: c as u64,
                invoke_ms: shared.now_ms(),
                complete_ms: None,
                kind: kind.clone(),
                result: OpResult::Unknown,
            });
            h.ops.len() - 1
        };
        if let Some(r) = caller.call_until_answered(shared, &kind, &msg) {
            let mut h = shared.history.lock();
            h.ops[hist].complete_ms = Some(shared.now_ms());
            h.ops[hist].result = r;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..20)));
    }
}

/// A transfer between two of the paying accounts (every account but the last).
fn transfer_op(rng: &mut ChaCha20Rng, shared: &Shared, keys: &[ed25519_dalek::SigningKey]) -> (OpKind, ClientMessage) {
    let payers = keys.len() - 1;
    let from = rng.gen_range(0..payers);
    let mut to = rng.gen_range(0..payers - 1);
    if to >= from {
        to += 1;
    }
    let to_pub = PublicKey(keys[to].verifying_key().to_bytes());
    let amount = rng.gen_range(1..=1_000);
    let req =
        tally_client::client::sign_request(&keys[from], shared.cluster_id, Operation::Transfer { to: to_pub, amount });
    let from_pub = PublicKey(keys[from].verifying_key().to_bytes());
    (OpKind::Transfer { id: req.id(), from: from_pub, to: to_pub, amount }, ClientMessage::Submit(vec![req]))
}

/// A Set, Delete or linearizable Get of one of the hot documents, which the last account owns.
fn doc_op(
    c: usize,
    rng: &mut ChaCha20Rng,
    shared: &Shared,
    keys: &[ed25519_dalek::SigningKey],
    hot: &[DocKey],
) -> (OpKind, ClientMessage) {
    let doc_owner = &keys[keys.len() - 1];
    let key = *hot.choose(rng).expect("hot keys");
    match rng.gen_range(0..20) {
        0..=8 => {
            let body = format!("{{\"c\":{c},\"r\":{}}}", rng.gen::<u32>()).into_bytes();
            let req = tally_client::client::sign_request(
                doc_owner,
                shared.cluster_id,
                Operation::Set { key, value: body.clone() },
            );
            (OpKind::Set { id: req.id(), key, body }, ClientMessage::Submit(vec![req]))
        }
        9..=11 => {
            let req = tally_client::client::sign_request(doc_owner, shared.cluster_id, Operation::Delete { key });
            (OpKind::Delete { id: req.id(), key }, ClientMessage::Submit(vec![req]))
        }
        _ => (OpKind::Get { key }, ClientMessage::Get { key, stale: false }),
    }
}

/// One client's connections, and the replica it sends to next.
struct Caller {
    client: usize,
    conns: Vec<Option<Connection>>,
    target: usize,
}

/// What to do after a reply.
enum Next {
    Answered(OpResult),
    /// The request expired: it can never be executed now, and its outcome stays unknown.
    GiveUp,
    Retry,
}

impl Caller {
    /// Sends `msg` until it is answered, it expires, or the clients stop: the answer, if any.
    fn call_until_answered(&mut self, shared: &Shared, kind: &OpKind, msg: &ClientMessage) -> Option<OpResult> {
        let n = shared.addrs.len();
        let give_up = Instant::now() + Duration::from_millis(REQUEST_TTL_MS.saturating_sub(2_000));
        while Instant::now() < give_up {
            if shared.stop_clients.load(Ordering::Acquire) {
                return None;
            }
            if self.conns[self.target].as_ref().is_none_or(Connection::is_closed) {
                self.conns[self.target] = connect(shared, self.target);
            }
            let Some(conn) = self.conns[self.target].as_ref() else {
                self.target = (self.target + 1) % n;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let reply = conn.call_timeout(msg.clone(), CALL_TIMEOUT);
            match self.on_reply(shared, kind, reply) {
                Next::Answered(r) => return Some(r),
                Next::GiveUp => return None,
                Next::Retry => {}
            }
        }
        None
    }

    /// Takes a committed receipt, a final refusal or a read's answer; on anything else, moves
    /// to the replica a refusal names, or to the next one.
    fn on_reply(
        &mut self,
        shared: &Shared,
        kind: &OpKind,
        reply: Result<ServerMessage, tally_client::ClientError>,
    ) -> Next {
        let n = shared.addrs.len();
        let next = (self.target + 1) % n;
        // The replica a refusal points at, when it names one we know.
        let hinted = |e: &tally_codec::wire::WireError| {
            e.leader_hint.as_deref().and_then(|h| shared.addrs.iter().position(|a| a == h))
        };
        match reply {
            Ok(ServerMessage::Submitted(replies)) => match replies.into_iter().next() {
                Some(SubmitReply::Committed { receipt, .. }) if Some(receipt.request.id()) == kind.id() => {
                    shared.headers.lock().push(SeenHeader {
                        header: receipt.header.clone(),
                        signature: receipt.signature,
                        source: format!("receipt to client {}", self.client),
                    });
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    return Next::Answered(OpResult::Committed(receipt));
                }
                Some(SubmitReply::Refused(e)) => match e.code {
                    ErrorCode::InsufficientFunds | ErrorCode::BadSignature | ErrorCode::Malformed => {
                        return Next::Answered(OpResult::Refused(e.code));
                    }
                    ErrorCode::Expired => return Next::GiveUp,
                    _ => {
                        self.target = hinted(&e).unwrap_or(next);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                },
                _ => self.target = next,
            },
            Ok(ServerMessage::Doc(d)) => {
                return Next::Answered(OpResult::Read(d.map(|v| DocRead { revision: v.revision, body: v.value })));
            }
            Ok(ServerMessage::Error(e)) => {
                self.target = hinted(&e).unwrap_or(next);
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                self.conns[self.target] = None;
                self.target = next;
            }
        }
        Next::Retry
    }
}

/// Prints the report, writes `report.json` and `timeline.png` into `dir`.
///
/// # Errors
/// When the files can't be written.
pub fn write_report(r: &MonkeyReport, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(r)?)?;
    draw_timeline(r, &dir.join("timeline.png"))?;
    Ok(())
}

/// The report as text.
pub fn summary(r: &MonkeyReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "tally chaos: seed {}, {} replicas, {:.0} s: {}\n",
        r.seed,
        r.nodes,
        r.duration_s,
        if r.ok() { "no violation" } else { "VIOLATIONS" }
    ));
    let faults: Vec<String> = r.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
    s.push_str(&format!("  faults: {}\n", if faults.is_empty() { "none".into() } else { faults.join(", ") }));
    s.push_str(&format!(
        "  failovers {}, longest without a commit {} ms, first commit {} ms after healing\n",
        r.failovers,
        r.longest_without_commit_ms,
        r.first_commit_after_heal_ms.map_or("never".into(), |t| t.saturating_sub(r.healed_at_ms).to_string())
    ));
    s.push_str(&format!(
        "  {} client ops, {} acknowledged and checked, {} batches, converged: {}\n",
        r.ops, r.verdicts.acked_checked, r.heights, r.converged
    ));
    for inv in ["I1", "I2", "I3", "I4", "I5"] {
        let n = r.verdicts.violations.iter().filter(|v| v.invariant == inv).count();
        s.push_str(&format!("  {inv}: {}\n", if n == 0 { "ok".to_string() } else { format!("{n} violations") }));
    }
    for v in r.verdicts.violations.iter().take(10) {
        s.push_str(&format!("    {}: {}\n", v.invariant, v.what.chars().take(400).collect::<String>()));
    }
    s
}

fn draw_timeline(r: &MonkeyReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    // Committed batches per second from the height samples.
    let mut points: Vec<(f64, f64)> = Vec::new();
    for w in r.timeline.windows(2) {
        let dt = (w[1].at_ms - w[0].at_ms) as f64 / 1e3;
        if dt > 0.0 {
            let rate = w[1].committed_height.saturating_sub(w[0].committed_height) as f64 / dt;
            points.push((w[1].at_ms as f64 / 1e3, rate));
        }
    }
    let x_max = r.timeline.last().map_or(1.0, |s| s.at_ms as f64 / 1e3).max(1.0);
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let font = tally_plot::register_font();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(10);
    if font {
        builder
            .caption(
                format!("tally chaos seed {}: committed batches/s; faults (red), leader changes (blue)", r.seed),
                ("sans-serif", 18),
            )
            .x_label_area_size(35)
            .y_label_area_size(50);
    }
    let mut chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    if font {
        chart.configure_mesh().x_desc("seconds").y_desc("batches/s").draw()?;
    }
    chart.draw_series(LineSeries::new(points, &BLACK))?;
    for (k, e) in r.fault_events.iter().enumerate() {
        let x = e.at_ms as f64 / 1e3;
        chart.draw_series(LineSeries::new([(x, 0.0), (x, y_max * 0.9)], RED.mix(0.6)))?;
        if font {
            // Each fault named with the replicas it hit, on one of four rows so neighbours
            // do not print over each other.
            let nodes: Vec<String> = e.nodes.iter().map(usize::to_string).collect();
            let y = y_max * (0.86 - 0.05 * (k % 4) as f64);
            let style = ("sans-serif", 11).into_font().color(&RED);
            chart.draw_series(std::iter::once(Text::new(format!("{} {}", e.kind, nodes.join(",")), (x, y), style)))?;
        }
    }
    let mut last = None;
    for s in &r.timeline {
        if let Some(l) = s.leader {
            if last.is_some() && last != Some(l) {
                let x = s.at_ms as f64 / 1e3;
                chart.draw_series(LineSeries::new([(x, y_max * 0.9), (x, y_max)], BLUE.stroke_width(3)))?;
                if font {
                    let style = ("sans-serif", 11).into_font().color(&BLUE);
                    chart.draw_series(std::iter::once(Text::new(format!("leader {l}"), (x, y_max * 0.97), style)))?;
                }
            }
            last = Some(l);
        }
    }
    root.present()?;
    Ok(())
}
