//! `tally chaos`: a chaos monkey over real `tallyd` processes.
//!
//! ```text
//!  seed ─▶ fault loop ──kill -9 / restart · SIGSTOP / SIGCONT · proxy cuts (partitions, drops)──▶ tallyd × N
//!  clients × C ──signed requests (same bytes on retry) · linearizable reads──▶ any replica
//!       └─▶ history (invoke, then ack / refusal / nothing)
//!  sampler ──status every 250 ms──▶ timeline (committed height, leader)
//!  end: heal · wait for convergence · read every replica's batches and totals
//!       └─▶ tally_sim::check (I1–I5, per-key linearizability) ─▶ report · JSON · PNG
//! ```
//! Peer links go through [`crate::proxy::Link`]s (one per direction and pair), so partitions
//! need neither root nor network namespaces.

use crate::checker::{self, Access};
use crate::proxy::Link;
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
use tally_cli::cluster::cluster_init;
use tally_client::Connection;
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{ClusterId, DocKey, ErrorCode, Operation, PublicKey};
use tally_sim::check::{check_all, Verdicts};
use tally_sim::history::{DocRead, History, Op, OpKind, OpResult, ReplicaFinal, RunRecord, SeenHeader, StoredBatch};

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
    let mut disks = Vec::new();
    if cfg.faults.disk {
        for i in 0..cfg.nodes {
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
            layout.configs[i].data_dir = m.join("data").display().to_string();
            disks.push(m);
        }
    }
    for i in 0..cfg.nodes {
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
    let failpoint_dir = match &cfg.plant {
        Some(p) => {
            let d = cfg.out.join("failpoints");
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            std::fs::write(d.join(p), b"armed by tally chaos --plant\n").map_err(|e| e.to_string())?;
            Some(d)
        }
        None => None,
    };
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
    let access = Access {
        dial: layout.dial().map_err(|e| e.to_string())?,
        admin: layout.admin_key().map_err(|e| e.to_string())?,
    };
    let addrs = layout.client_addrs();
    let cluster_id = ClusterId::from_hex(&layout.cluster_id).map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared {
        started: Instant::now(),
        history: Mutex::new(History::default()),
        headers: Mutex::new(Vec::new()),
        stop_clients: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        addrs: addrs.clone(),
        access: access.clone(),
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
    let keys = Arc::new(keys);
    let hot: Vec<DocKey> = (0..3).map(|i| doc_key(cfg.seed, i)).collect();

    // Sampler.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (shared, samples, sampling) = (shared.clone(), samples.clone(), sampling.clone());
        std::thread::spawn(move || sample_loop(&shared, &samples, &sampling))
    };
    // Clients.
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| {
            let (shared, keys, hot) = (shared.clone(), keys.clone(), hot.clone());
            let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(c as u64);
            std::thread::spawn(move || client_loop(c, seed, &shared, &keys, &hot))
        })
        .collect();

    // Faults.
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(cfg.duration.as_secs());
        b.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let mut events: Vec<FaultEvent> = Vec::new();
    let mut restarts: Vec<(Instant, usize)> = Vec::new();
    let mut resumes: Vec<(Instant, usize)> = Vec::new();
    let mut refills: Vec<(Instant, usize)> = Vec::new();
    let mut heal_at: Option<Instant> = None;
    let mut next_fault = Instant::now() + Duration::from_millis(rng.gen_range(1_000..3_000));
    let fault_until = Instant::now() + cfg.duration;
    let n = cfg.nodes;
    while Instant::now() < fault_until {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        for (_, i) in restarts.iter().filter(|(t, _)| *t <= now) {
            let _ = cluster.spawn(*i);
        }
        restarts.retain(|(t, _)| *t > now);
        for (_, i) in resumes.iter().filter(|(t, _)| *t <= now) {
            cluster.resume(*i);
        }
        resumes.retain(|(t, _)| *t > now);
        for (_, i) in refills.iter().filter(|(t, _)| *t <= now) {
            let _ = std::fs::remove_file(filler(&cluster.disks[*i]));
        }
        refills.retain(|(t, _)| *t > now);
        if heal_at.is_some_and(|t| t <= now) {
            cluster.heal_links();
            heal_at = None;
        }
        bar.set_position(shared.started.elapsed().as_secs().min(cfg.duration.as_secs()));
        let failovers = count_failovers(&samples.lock());
        bar.set_message(format!(
            "{} faults, {failovers} failovers, {} acked",
            events.len(),
            shared.acked.load(Ordering::Relaxed)
        ));
        if now < next_fault {
            continue;
        }
        next_fault = now + Duration::from_millis(rng.gen_range(1_000..4_000));
        // At most a minority is down or stopped at once, so the run keeps committing.
        let down = (0..n).filter(|&i| !cluster.is_up(i)).count();
        let room = down < (n - 1) / 2;
        let mut kinds = Vec::new();
        if cfg.faults.kill && room {
            kinds.push("kill");
        }
        if cfg.faults.leader && room {
            kinds.push("kill-leader");
        }
        if cfg.faults.pause && room {
            kinds.push("pause");
        }
        if cfg.faults.partition && heal_at.is_none() {
            kinds.extend(["partition-minority", "partition-isolate-leader", "partition-bridge", "drop-connections"]);
        }
        if cfg.faults.delay && heal_at.is_none() {
            kinds.push("delay");
        }
        if cfg.faults.disk && room && refills.is_empty() {
            kinds.push("disk-full");
        }
        let Some(&kind) = kinds.choose(&mut rng) else { continue };
        let at_ms = shared.now_ms();
        let up: Vec<usize> = (0..n).filter(|&i| cluster.is_up(i)).collect();
        // The sampler's latest view (at most 250 ms old): the fault loop never dials a replica
        // itself, so a stopped one cannot hold it up.
        let leader = samples.lock().last().and_then(|s| s.leader).map(|id| id as usize - 1);
        let mut hit = Vec::new();
        match kind {
            "kill" | "kill-leader" => {
                let target = if kind == "kill-leader" {
                    leader.filter(|l| up.contains(l))
                } else {
                    up.choose(&mut rng).copied()
                };
                if let Some(i) = target {
                    cluster.kill9(i);
                    restarts.push((now + Duration::from_millis(rng.gen_range(500..5_000)), i));
                    hit.push(i);
                }
            }
            "pause" => {
                if let Some(&i) = up.choose(&mut rng) {
                    // Shorter and longer than the election timeout (500 ms by default).
                    let ms = if rng.gen_bool(0.5) { rng.gen_range(100..450) } else { rng.gen_range(700..4_000) };
                    cluster.pause(i);
                    resumes.push((now + Duration::from_millis(ms), i));
                    hit.push(i);
                }
            }
            "partition-minority" => {
                let mut ids: Vec<usize> = (0..n).collect();
                ids.shuffle(&mut rng);
                let k = rng.gen_range(1..=(n - 1) / 2);
                cluster.cut(&ids[..k], &ids[k..]);
                hit.extend_from_slice(&ids[..k]);
                heal_at = Some(now + Duration::from_millis(rng.gen_range(1_000..5_000)));
            }
            "partition-isolate-leader" => {
                if let Some(l) = leader {
                    let rest: Vec<usize> = (0..n).filter(|&i| i != l).collect();
                    cluster.cut(&[l], &rest);
                    hit.push(l);
                    heal_at = Some(now + Duration::from_millis(rng.gen_range(1_000..5_000)));
                }
            }
            "partition-bridge" => {
                let mut ids: Vec<usize> = (0..n).collect();
                ids.shuffle(&mut rng);
                let rest = &ids[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cluster.cut(a, b);
                hit.push(ids[0]);
                heal_at = Some(now + Duration::from_millis(rng.gen_range(1_000..5_000)));
            }
            "delay" => {
                let mut links: Vec<(usize, usize)> = cluster.links.keys().copied().collect();
                links.shuffle(&mut rng);
                let k = rng.gen_range(1..=links.len());
                let ms = rng.gen_range(20..300);
                for l in &links[..k] {
                    cluster.links[l].set_delay(ms);
                    hit.push(l.0);
                }
                hit.sort_unstable();
                hit.dedup();
                heal_at = Some(now + Duration::from_millis(rng.gen_range(1_000..5_000)));
            }
            "disk-full" => {
                if let Some(&i) = up.choose(&mut rng) {
                    fill_disk(&cluster.disks[i]);
                    refills.push((now + Duration::from_millis(rng.gen_range(2_000..6_000)), i));
                    hit.push(i);
                }
            }
            _ => {
                // Dropped connections: every link cut and restored at once.
                let all: Vec<usize> = (0..n).collect();
                cluster.cut(&all, &all);
                heal_at = Some(now + Duration::from_millis(50));
            }
        }
        bar.suspend(|| {
            if !cfg.progress {
                return;
            }
            eprintln!("{:>7} ms  {kind} {:?}", at_ms, hit.iter().map(|i| i + 1).collect::<Vec<_>>());
        });
        events.push(FaultEvent { at_ms, kind: kind.into(), nodes: hit.iter().map(|i| i + 1).collect() });
    }
    bar.finish_and_clear();

    // Heal everything; the clients go on, so progress after healing is measured under load.
    let healed_at_ms = shared.now_ms();
    cluster.heal_links();
    for d in &cluster.disks {
        let _ = std::fs::remove_file(filler(d));
    }
    // A replica the monkey did not kill must still run: a full disk, a cut link or a pause is
    // never a reason to exit. One that exited is reported, then started again for the checks.
    let mut exited = Vec::new();
    for i in 0..n {
        cluster.resume(i);
        if let Some(Ok(Some(status))) = cluster.nodes[i].child.as_mut().map(Child::try_wait) {
            exited.push(format!("replica {} exited on its own ({status})", i + 1));
            cluster.nodes[i].child = None;
        }
        if cluster.nodes[i].child.is_none() {
            let _ = cluster.spawn(i);
        }
    }
    let exited_logs = if exited.is_empty() { String::new() } else { cluster.log_tails(30) };
    let height_at_heal = samples.lock().last().map_or(0, |s| s.committed_height);
    let heal_deadline = Instant::now() + Duration::from_millis(LIVENESS_BOUND_MS * 2);
    let mut first_commit_after_heal_ms = None;
    while Instant::now() < heal_deadline {
        std::thread::sleep(Duration::from_millis(100));
        let s = samples.lock();
        if let Some(x) = s.iter().find(|x| x.at_ms >= healed_at_ms && x.committed_height > height_at_heal) {
            first_commit_after_heal_ms = Some(x.at_ms);
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    shared.stop_clients.store(true, Ordering::Release);
    for c in clients {
        let _ = c.join();
    }
    let converged = checker::wait_converged(&access, &addrs, Duration::from_secs(60));
    sampling.store(false, Ordering::Release);
    let _ = sampler.join();
    let height_at_end = samples.lock().iter().map(|s| s.committed_height).max();

    let mut replicas = Vec::new();
    let mut unread = Vec::new();
    for i in 0..n {
        match read_replica(&shared, i) {
            Ok(r) => replicas.push(r),
            Err(e) => unread.push(format!("replica {}: {e}", i + 1)),
        }
    }
    let unread_logs = if unread.is_empty() { String::new() } else { cluster.log_tails(30) };
    let history = std::mem::take(&mut *shared.history.lock());
    let headers = std::mem::take(&mut *shared.headers.lock());
    let record = RunRecord {
        operator: PublicKey::from_hex(&layout.operator_public).map_err(|e| e.to_string())?,
        genesis_total,
        history,
        replicas,
        headers,
        healed_at_ms,
        height_at_heal,
        height_at_end,
        first_commit_after_heal_ms,
    };
    let mut verdicts = check_all(&record, LIVENESS_BOUND_MS);
    if record.replicas.len() < n {
        verdicts.violations.push(tally_sim::check::Violation {
            invariant: "I3",
            what: format!(
                "only {} of {n} replicas could be read back after healing ({})\n{unread_logs}",
                record.replicas.len(),
                unread.join("; ")
            ),
        });
    }
    if !exited.is_empty() {
        verdicts.violations.push(tally_sim::check::Violation {
            invariant: "I5",
            what: format!("{}\n{exited_logs}", exited.join("; ")),
        });
    }
    cluster.stop_all();
    let timeline = std::mem::take(&mut *samples.lock());
    let mut faults = BTreeMap::new();
    for e in &events {
        *faults.entry(e.kind.clone()).or_insert(0) += 1;
    }
    Ok(MonkeyReport {
        seed: cfg.seed,
        nodes: n,
        duration_s: shared.started.elapsed().as_secs_f64(),
        faults,
        fault_events: events,
        failovers: count_failovers(&timeline),
        longest_without_commit_ms: longest_gap(&timeline),
        ops: record.history.ops.len() as u64,
        acknowledged: record.history.ops.iter().filter(|o| matches!(o.result, OpResult::Committed(_))).count() as u64,
        heights: record.replicas.iter().map(|r| r.batches.len() as u64).max().unwrap_or(0),
        verdicts,
        converged,
        healed_at_ms,
        first_commit_after_heal_ms,
        timeline,
    })
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
        .find(|&i| checker::status(&shared.access, &shared.addrs[i]).is_some_and(|s| s.leader_id == Some(s.node_id)))
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
    let mut conns: Vec<Option<Connection>> = (0..n).map(|_| None).collect();
    let mut target = c % n;
    // The last account owns the documents; the others move money.
    let doc_owner = &keys[keys.len() - 1];
    let payers = keys.len() - 1;
    while !shared.stop_clients.load(Ordering::Acquire) {
        let (kind, msg) = if rng.gen_bool(0.6) {
            let from = rng.gen_range(0..payers);
            let mut to = rng.gen_range(0..payers - 1);
            if to >= from {
                to += 1;
            }
            let to_pub = PublicKey(keys[to].verifying_key().to_bytes());
            let amount = rng.gen_range(1..=1_000);
            let req = tally_client::client::sign_request(
                &keys[from],
                shared.cluster_id,
                Operation::Transfer { to: to_pub, amount },
            );
            let from_pub = PublicKey(keys[from].verifying_key().to_bytes());
            (OpKind::Transfer { id: req.id(), from: from_pub, to: to_pub, amount }, ClientMessage::Submit(vec![req]))
        } else {
            let key = *hot.choose(&mut rng).expect("hot keys");
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
                    let req =
                        tally_client::client::sign_request(doc_owner, shared.cluster_id, Operation::Delete { key });
                    (OpKind::Delete { id: req.id(), key }, ClientMessage::Submit(vec![req]))
                }
                _ => (OpKind::Get { key }, ClientMessage::Get { key, stale: false }),
            }
        };
        let invoke_ms = shared.now_ms();
        let hist = {
            let mut h = shared.history.lock();
            h.ops.push(Op {
                client: c as u64,
                invoke_ms,
                complete_ms: None,
                kind: kind.clone(),
                result: OpResult::Unknown,
            });
            h.ops.len() - 1
        };
        let give_up = Instant::now() + Duration::from_millis(REQUEST_TTL_MS.saturating_sub(2_000));
        let mut result: Option<OpResult> = None;
        while result.is_none() && Instant::now() < give_up {
            if shared.stop_clients.load(Ordering::Acquire) {
                break;
            }
            if conns[target].as_ref().is_none_or(Connection::is_closed) {
                conns[target] = connect(shared, target);
            }
            let Some(conn) = conns[target].as_ref() else {
                target = (target + 1) % n;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let reply = conn.call_timeout(msg.clone(), CALL_TIMEOUT);
            let next = |t: usize| (t + 1) % n;
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
                            source: format!("receipt to client {c}"),
                        });
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                        result = Some(OpResult::Committed(receipt));
                    }
                    Some(SubmitReply::Refused(e)) => match e.code {
                        ErrorCode::InsufficientFunds | ErrorCode::BadSignature | ErrorCode::Malformed => {
                            result = Some(OpResult::Refused(e.code));
                        }
                        ErrorCode::Expired => break,
                        _ => {
                            target = hinted(&e).unwrap_or_else(|| next(target));
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    },
                    _ => target = next(target),
                },
                Ok(ServerMessage::Doc(d)) => {
                    result = Some(OpResult::Read(d.map(|v| DocRead { revision: v.revision, body: v.value })));
                }
                Ok(ServerMessage::Error(e)) => {
                    target = hinted(&e).unwrap_or_else(|| next(target));
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    conns[target] = None;
                    target = next(target);
                }
            }
        }
        if let Some(r) = result {
            let mut h = shared.history.lock();
            h.ops[hist].complete_ms = Some(shared.now_ms());
            h.ops[hist].result = r;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..20)));
    }
}

/// Every batch a replica holds, and its totals.
/// Every batch replica `i` has applied, and its audit; or why they could not be read.
fn read_replica(shared: &Shared, i: usize) -> Result<ReplicaFinal, String> {
    let conn = connect(shared, i).ok_or("no connection")?;
    let status = match conn.call_timeout(ClientMessage::Status, Duration::from_secs(5)) {
        Ok(ServerMessage::Status(s)) => s,
        other => return Err(format!("status: {other:?}")),
    };
    let mut batches = Vec::new();
    for height in 1..=status.applied_height {
        match conn.call_timeout(ClientMessage::Batch { height }, Duration::from_secs(5)) {
            Ok(ServerMessage::Batch(Some(b))) => batches.push(StoredBatch {
                header: b.header,
                signature: b.signature,
                request_ids: b.request_ids,
                outcomes: b.outcomes,
            }),
            other => return Err(format!("batch {height} of applied height {}: {other:?}", status.applied_height)),
        }
    }
    let audit = checker::audit(&shared.access, &shared.addrs[i]).ok_or("no audit")?;
    Ok(ReplicaFinal {
        node_id: status.node_id,
        batches,
        applied_height: audit.applied_height,
        state_digest: audit.state_digest,
        // The audit gives the total, which is what conservation needs.
        balances: vec![(PublicKey([0; 32]), u64::try_from(audit.balance_total).unwrap_or(u64::MAX))],
    })
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
    for e in &r.fault_events {
        let x = e.at_ms as f64 / 1e3;
        chart.draw_series(LineSeries::new([(x, 0.0), (x, y_max * 0.9)], RED.mix(0.6)))?;
    }
    let mut last = None;
    for s in &r.timeline {
        if let Some(l) = s.leader {
            if last.is_some() && last != Some(l) {
                let x = s.at_ms as f64 / 1e3;
                chart.draw_series(LineSeries::new([(x, y_max * 0.9), (x, y_max)], BLUE.stroke_width(3)))?;
            }
            last = Some(l);
        }
    }
    root.present()?;
    Ok(())
}
