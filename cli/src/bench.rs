//! `tally bench`: the end-to-end load generator behind the README's throughput and latency figures.
//!
//! ```text
//!  signer thread × W ─▶ bounded queue per client (a few frames ahead of its schedule)
//!  client thread × C: Connection, ≤ inflight frames outstanding, N requests per frame
//!        reply ─▶ Recorder (hdrhistogram µs, per-second buckets)
//!  merge ─▶ BenchSummary ─▶ stdout, --json FILE, --plot FILE (PNG)
//! ```
//! Latency is per request, measured from the frame's send to its reply (the commit latency a
//! client sees, batching included); in the open loop from the frame's scheduled send time.
//!
//! Requests are signed while the run goes, each with the client library's 60 s expiry: a run may
//! last any time, and a frame waits between its signature and its send at most as long as its
//! client's queue takes to drain ([`SIGNED_AHEAD_MS`] of the schedule in the open loop, four
//! frames per in-flight slot in the closed loop, never more than [`SIGNED_AHEAD_FRAMES_MAX`]). A frame that would expire before it could commit is
//! dropped unsent and counted (`expired_unsent`); a client that finds no signed frame when it
//! could send counts a signing wait (`signing_fell_behind`).

use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Select, Sender, TryRecvError, TrySendError};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tally_client::client::REQUEST_TTL_MS;
use tally_client::connection::{Connection, PendingReply, CALL_TIMEOUT_MS, CONNECT_TIMEOUT_MS};
use tally_client::error::ClientError;
use tally_client::keyfile::{generate_key, public_of};
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{limits, ClusterId, DocKey, Operation, Outcome, PublicKey, Request, SignedRequest};
use tally_plot::{draw_panel, Axes};

/// Signed frames queued per client, at most: what the signers may be ahead of the sender.
pub const SIGNED_AHEAD_FRAMES_MAX: usize = 64;
/// In the open loop, a client's queue holds at most this much of its schedule.
pub const SIGNED_AHEAD_MS: u64 = 1_000;
/// A frame whose requests expire within this much of its send is dropped unsent: it could not
/// commit (a batch closes every 100 ms; this leaves room for a slow one).
pub const SEND_EXPIRY_MARGIN_MS: u64 = 5_000;
/// Longest a signer sleeps between looks at full queues.
const SIGNER_IDLE_MS_MAX: u64 = 8;
/// How long the run waits, before its clock starts, for the signers to fill every queue.
const PREFILL_WAIT_MS: u64 = 30_000;
/// Recipients of bench transfers: fresh keys, reused at random.
pub const RECIPIENTS: usize = 1024;
/// Highest latency the histograms track (µs); longer is clamped.
const LATENCY_US_MAX: u64 = 600_000_000;

/// What the requests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// Transfers of 1 from funded accounts to fresh keys.
    Transfer,
    /// SETs of random UUID4 keys with ~100-byte JSON values.
    Doc,
    /// Half and half.
    Mixed,
    /// Claims of fresh slots (each one granted).
    Claim,
    /// Keepalives of one lease per signing account (granted before the clock starts).
    Keepalive,
}

/// Everything a run needs; built by the CLI.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub addr: String,
    pub duration: Duration,
    pub clients: usize,
    pub mix: Mix,
    /// Requests per frame.
    pub batch: usize,
    /// Frames outstanding per client.
    pub inflight: usize,
    /// Sign (and send) at most this many requests per second of duration.
    pub rate_max: u64,
    /// Open loop: offer this many requests per second in all (frames sent on a fixed schedule,
    /// latency measured from each frame's scheduled time, so queueing is not hidden). `None`:
    /// closed loop, `inflight` frames outstanding per client.
    pub rate: Option<u64>,
    /// Signers of transfers (funded); documents are signed by these too, or by `doc_key`.
    pub accounts: Vec<SigningKey>,
    pub doc_key: SigningKey,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// Show progress bars (off in tests).
    pub progress: bool,
    /// TLS against the cluster CA, or plaintext.
    pub dial: tally_net::Dial,
}

/// One second of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub t_s: u64,
    pub committed: u64,
    pub errors: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    #[serde(default)]
    pub latency_ms_p999: f64,
}

/// The JSON summary that `--json FILE` writes; `scripts/perf_table.py` makes the README's tables
/// from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchSummary {
    pub committed: u64,
    /// Committed, but executed as a refusal (e.g. insufficient funds); counted in `committed`.
    pub rejected: u64,
    pub errors: u64,
    pub duration_s: f64,
    pub throughput_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    pub clients: usize,
    pub batch: usize,
    pub inflight: usize,
    pub mix: Mix,
    /// Requests signed for the run (signed while it ran; the name is the field's first meaning).
    pub presigned: u64,
    pub series: Vec<SeriesPoint>,
    /// Open loop: the offered rate (requests/s); `None` for a closed-loop run.
    #[serde(default)]
    pub offered_rate_per_s: Option<u64>,
    /// The machine the load generator ran on.
    #[serde(default)]
    pub machine: Machine,
    /// CPU time this load generator used during the run (user + system, all threads), and per
    /// committed request: the share of the machine the measurement itself took.
    #[serde(default)]
    pub loadgen_cpu_s: f64,
    #[serde(default)]
    pub loadgen_cpu_us_per_request: f64,
    /// Why requests were refused, rejected or unanswered, with how many.
    #[serde(default)]
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// CPU time the signer threads used (user + system), from the queues' first fill before the
    /// clock started to the end (`loadgen_cpu_s` counts only from the clock's start).
    #[serde(default)]
    pub signing_cpu_s: f64,
    #[serde(default)]
    pub signing_threads: usize,
    /// Times a client could send (an in-flight slot free, or its frame due) and no signed frame
    /// was ready, and the time it waited in all; `signing_fell_behind` when that ever happened.
    #[serde(default)]
    pub signing_waits: u64,
    #[serde(default)]
    pub signing_wait_s: f64,
    #[serde(default)]
    pub signing_fell_behind: bool,
    /// Requests dropped unsent because they would have expired (0 unless the queue stalled).
    #[serde(default)]
    pub expired_unsent: u64,
}

/// Where a benchmark ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
}

impl Machine {
    pub fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine { cores: std::thread::available_parallelism().map_or(0, std::num::NonZero::get), cpu_model }
    }
}

/// CPU seconds (user + system) this process has used: `/proc/self/stat` fields 14 and 15, in
/// Linux's fixed 100 Hz user ticks.
pub fn process_cpu_s() -> f64 {
    cpu_s_of("/proc/self/stat")
}

/// CPU seconds the calling thread has used (`/proc/thread-self/stat`, same fields).
pub fn thread_cpu_s() -> f64 {
    cpu_s_of("/proc/thread-self/stat")
}

fn cpu_s_of(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else { return 0.0 };
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are plain.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ")": field 3 is index 0, so utime (14) is index 11 and stime (15) index 12.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Per-second bucket.
#[derive(Clone)]
struct Second {
    committed: u64,
    errors: u64,
    hist: Histogram<u64>,
}

/// Latencies and counts of one client (merged at the end).
#[derive(Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
    seconds: Vec<Second>,
    committed: u64,
    rejected: u64,
    errors: u64,
    /// Why requests were refused or rejected: error code name (or "no reply") → requests.
    reasons: std::collections::BTreeMap<String, u64>,
    /// Times this client was ready to send and no signed frame was, and how long it waited.
    signing_waits: u64,
    signing_wait: Duration,
    /// Requests dropped unsent: they would have expired.
    expired_unsent: u64,
}

fn new_hist(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, sigfig).expect("static histogram bounds are valid")
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            hist: new_hist(3),
            seconds: Vec::new(),
            committed: 0,
            rejected: 0,
            errors: 0,
            reasons: std::collections::BTreeMap::new(),
            signing_waits: 0,
            signing_wait: Duration::ZERO,
            expired_unsent: 0,
        }
    }
}

impl Recorder {
    fn second(&mut self, t_s: usize) -> &mut Second {
        while self.seconds.len() <= t_s {
            self.seconds.push(Second { committed: 0, errors: 0, hist: new_hist(2) });
        }
        &mut self.seconds[t_s]
    }

    /// Records one frame's replies that arrived `t_s` seconds into the run.
    pub fn record(&mut self, t_s: usize, latency: Duration, committed: u64, rejected: u64, errors: u64) {
        let us = (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        self.committed += committed;
        self.rejected += rejected;
        self.errors += errors;
        if committed > 0 {
            self.hist.saturating_record_n(us, committed);
        }
        let s = self.second(t_s);
        s.committed += committed;
        s.errors += errors;
        if committed > 0 {
            s.hist.saturating_record_n(us, committed);
        }
    }

    /// Adds another client's recording.
    pub fn merge(&mut self, other: &Recorder) {
        for (k, v) in &other.reasons {
            *self.reasons.entry(k.clone()).or_default() += v;
        }
        self.signing_waits += other.signing_waits;
        self.signing_wait += other.signing_wait;
        self.expired_unsent += other.expired_unsent;
        self.committed += other.committed;
        self.rejected += other.rejected;
        self.errors += other.errors;
        self.hist.add(&other.hist).ok();
        for (t, s) in other.seconds.iter().enumerate() {
            let mine = self.second(t);
            mine.committed += s.committed;
            mine.errors += s.errors;
            mine.hist.add(&s.hist).ok();
        }
    }
}

fn ms_at(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Turns a recording into the summary; `elapsed` is the wall time of the run.
pub fn summarize(rec: &Recorder, elapsed: Duration, cfg: &BenchConfig, presigned: u64) -> BenchSummary {
    let duration_s = elapsed.as_secs_f64().max(1e-9);
    BenchSummary {
        committed: rec.committed,
        rejected: rec.rejected,
        errors: rec.errors,
        duration_s,
        throughput_per_s: rec.committed as f64 / duration_s,
        latency_ms_p50: ms_at(&rec.hist, 0.5),
        latency_ms_p99: ms_at(&rec.hist, 0.99),
        latency_ms_p999: ms_at(&rec.hist, 0.999),
        latency_ms_max: if rec.hist.is_empty() { 0.0 } else { rec.hist.max() as f64 / 1000.0 },
        clients: cfg.clients,
        batch: cfg.batch,
        inflight: cfg.inflight,
        mix: cfg.mix,
        presigned,
        offered_rate_per_s: cfg.rate,
        machine: Machine::this(),
        loadgen_cpu_s: 0.0,
        loadgen_cpu_us_per_request: 0.0,
        refusals: rec.reasons.clone(),
        signing_cpu_s: 0.0,
        signing_threads: 0,
        signing_waits: rec.signing_waits,
        signing_wait_s: rec.signing_wait.as_secs_f64(),
        signing_fell_behind: rec.signing_waits > 0,
        expired_unsent: rec.expired_unsent,
        series: rec
            .seconds
            .iter()
            .enumerate()
            .map(|(t, s)| SeriesPoint {
                t_s: t as u64,
                committed: s.committed,
                errors: s.errors,
                latency_ms_p50: ms_at(&s.hist, 0.5),
                latency_ms_p99: ms_at(&s.hist, 0.99),
                latency_ms_p999: ms_at(&s.hist, 0.999),
            })
            .collect(),
    }
}

/// The human summary printed at the end.
pub fn summary_text(s: &BenchSummary) -> String {
    let mut out = summary_numbers(s);
    if s.committed == s.rejected && !s.refusals.is_empty() {
        let (why, n) = s.refusals.iter().max_by_key(|(_, n)| **n).expect("not empty");
        out.push_str(&format!("\nNo request succeeded: {n} were refused with {why}"));
    } else if !s.refusals.is_empty() {
        let list: Vec<String> = s.refusals.iter().map(|(why, n)| format!("{n} × {why}")).collect();
        out.push_str(&format!("\nrefused: {}", list.join("; ")));
    }
    out
}

fn summary_numbers(s: &BenchSummary) -> String {
    format!(
        "committed {} ({} rejected), errors {}, {:.1} s\nthroughput {:.0} requests/s\nlatency ms: p50 {:.1}, p99 {:.1}, p999 {:.1}, max {:.1}",
        s.committed,
        s.rejected,
        s.errors,
        s.duration_s,
        s.throughput_per_s,
        s.latency_ms_p50,
        s.latency_ms_p99,
        s.latency_ms_p999,
        s.latency_ms_max
    )
}

/// Writes the JSON summary.
///
/// # Errors
/// [`ClientError::File`] when the file can't be written.
pub fn write_json(s: &BenchSummary, path: &Path) -> Result<(), ClientError> {
    let json = serde_json::to_string_pretty(s).map_err(|e| ClientError::Invalid(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|e| ClientError::file(path, e))
}

/// Draws throughput (top) and p50/p99 latency (bottom) per second into a PNG.
///
/// # Errors
/// [`ClientError::Invalid`] naming the drawing failure.
pub fn write_plot(s: &BenchSummary, path: &Path, with_text: bool) -> Result<(), ClientError> {
    use plotters::prelude::*;
    let err = |e: String| ClientError::Invalid(format!("cannot draw {}: {e}", path.display()));
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(350);
    let n = s.series.len().max(1) as f64;
    let tput_max = s.series.iter().map(|p| p.committed).max().unwrap_or(0).max(1) as f64 * 1.1;
    let lat_max = s.series.iter().map(|p| p.latency_ms_p99).fold(0.0, f64::max).max(1.0) * 1.1;
    let load = match s.offered_rate_per_s {
        Some(r) => format!("open loop at {r}/s"),
        None => format!("{} in flight per client", s.inflight),
    };
    let top_title = format!(
        "committed requests/s: {:.0}/s over {:.1} s ({} clients, batch {}, {load}, {:?})",
        s.throughput_per_s, s.duration_s, s.clients, s.batch, s.mix
    );
    let bottom_title = format!(
        "latency (ms): p50 {:.1}, p99 {:.1}, p999 {:.1}, max {:.1}; {} errors",
        s.latency_ms_p50, s.latency_ms_p99, s.latency_ms_p999, s.latency_ms_max, s.errors
    );
    let lat_max = s.series.iter().map(|p| p.latency_ms_p999).fold(lat_max, f64::max);
    // Only whole seconds: the last, partial one (the drain) would look like a drop.
    let whole = |p: &&SeriesPoint| ((p.t_s + 1) as f64) <= s.duration_s;
    let committed: Vec<(f64, f64)> =
        s.series.iter().filter(whole).map(|p| (p.t_s as f64, p.committed as f64)).collect();
    let top_axes = Axes { title: &top_title, x_desc: "seconds", y_desc: "requests/s", x_max: n, y_max: tput_max };
    draw_panel(&top, &top_axes, vec![(committed, BLUE, "committed/s")], false, false, with_text).map_err(err)?;
    // Seconds without commits have no latency; leave them out rather than draw zeros.
    let lat = |f: fn(&SeriesPoint) -> f64| -> Vec<(f64, f64)> {
        s.series.iter().filter(whole).filter(|p| p.committed > 0).map(|p| (p.t_s as f64, f(p))).collect()
    };
    let lines = vec![
        (lat(|p| p.latency_ms_p50), BLUE, "p50"),
        (lat(|p| p.latency_ms_p99), RED, "p99"),
        (lat(|p| p.latency_ms_p999), MAGENTA, "p999"),
    ];
    let bottom_axes = Axes { title: &bottom_title, x_desc: "seconds", y_desc: "ms", x_max: n, y_max: lat_max };
    draw_panel(&bottom, &bottom_axes, lines, false, true, with_text).map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Small fast RNG for choosing recipients and keys; not for secrets.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Deterministic pseudo-random choice of request `i`'s content (so signing parallelises).
fn mixed(i: u64, seed: u64) -> u64 {
    let mut r = XorShift::new(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next();
    r.next()
}

/// One frame of a client, signed while the run goes.
pub struct SignedFrame {
    pub requests: Vec<SignedRequest>,
    /// The earliest expiry of its requests (unix ms).
    pub expires_at_ms: u64,
    pub signed_at: Instant,
}

/// Frame `k` of the run, signed now (its requests are numbered `k × batch …`).
pub type MakeFrame = dyn Fn(u64) -> Vec<SignedRequest> + Send + Sync;

/// Signer threads feeding one bounded queue per client, each frame to a client whose queue has
/// room. Signers wait while every queue is full, so the signers are never more than a queue ahead of the
/// senders, and a frame is never older than its queue takes to drain.
pub struct SigningPipeline {
    queues: Vec<Receiver<SignedFrame>>,
    stop: Arc<AtomicBool>,
    cpu_us: Arc<AtomicU64>,
    signed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SigningPipeline {
    /// Starts `workers` threads that sign `frames_total` frames with `make` for `clients`
    /// queues of `ahead` frames each.
    ///
    /// # Errors
    /// When a thread can't start.
    pub fn start(
        clients: usize,
        ahead: usize,
        frames_total: u64,
        workers: usize,
        make: Arc<MakeFrame>,
    ) -> Result<SigningPipeline, ClientError> {
        assert!(clients > 0 && (1..=SIGNED_AHEAD_FRAMES_MAX).contains(&ahead));
        let (senders, queues): (Vec<_>, Vec<_>) = (0..clients).map(|_| bounded(ahead)).unzip();
        let senders = Arc::new(senders);
        let (stop, cpu_us, signed) = (Arc::default(), Arc::default(), Arc::default());
        let next = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::with_capacity(workers);
        for w in 0..workers.max(1) {
            let (senders, make, next) = (senders.clone(), make.clone(), next.clone());
            let (stop, cpu_us, signed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                (Arc::clone(&stop), Arc::clone(&cpu_us), Arc::clone(&signed));
            let t = std::thread::Builder::new().name(format!("bench-signer-{w}")).spawn(move || {
                let cpu_before = thread_cpu_s();
                sign_loop(&next, frames_total, &senders, &*make, &stop, &signed);
                cpu_us.fetch_add(((thread_cpu_s() - cpu_before) * 1e6) as u64, Ordering::Relaxed);
            });
            threads.push(t.map_err(|e| ClientError::Invalid(format!("cannot start a signer thread: {e}")))?);
        }
        Ok(SigningPipeline { queues, stop, cpu_us, signed, threads })
    }

    /// Waits until every queue is full (or the signers are done), at most `timeout`.
    pub fn wait_filled(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        while Instant::now() < until && !self.queues.iter().all(Receiver::is_full) {
            if self.threads.iter().all(std::thread::JoinHandle::is_finished) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The client queues, to hand to the client threads.
    pub fn take_queues(&mut self) -> Vec<Receiver<SignedFrame>> {
        std::mem::take(&mut self.queues)
    }

    /// Stops the signers: (CPU seconds they used, requests they queued).
    pub fn finish(self) -> (f64, u64) {
        self.stop.store(true, Ordering::Release);
        drop(self.queues);
        for t in self.threads {
            let _ = t.join();
        }
        (self.cpu_us.load(Ordering::Relaxed) as f64 / 1e6, self.signed.load(Ordering::Relaxed))
    }
}

/// One signer: signs the next frame for a client whose queue has room and hands it to that
/// client (or any other with room). A stuck client's full queue never holds up the others.
fn sign_loop(
    next: &AtomicU64,
    frames_total: u64,
    senders: &[Sender<SignedFrame>],
    make: &MakeFrame,
    stop: &AtomicBool,
    signed: &AtomicU64,
) {
    let n = senders.len();
    let mut c = 0;
    // Every queue full: the senders are ahead of us no more; poll at a growing interval (a
    // queue holds at least several frames, so a few ms late is not behind).
    let mut idle_ms = 1;
    while !stop.load(Ordering::Acquire) {
        let Some(ready) = (0..n).map(|d| (c + d) % n).find(|&i| !senders[i].is_full()) else {
            std::thread::sleep(Duration::from_millis(idle_ms));
            idle_ms = (idle_ms * 2).min(SIGNER_IDLE_MS_MAX);
            continue;
        };
        idle_ms = 1;
        c = ready + 1;
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= frames_total {
            return;
        }
        let requests = make(k);
        let expires_at_ms = requests.iter().map(|r| r.request.expires_at_ms).min().unwrap_or(0);
        let count = requests.len() as u64;
        let mut frame = SignedFrame { requests, expires_at_ms, signed_at: Instant::now() };
        'deliver: loop {
            for i in (0..n).map(|d| (ready + d) % n) {
                match senders[i].try_send(frame) {
                    Ok(()) => break 'deliver,
                    Err(TrySendError::Full(f) | TrySendError::Disconnected(f)) => frame = f,
                }
            }
            if stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        signed.fetch_add(count, Ordering::Relaxed);
    }
}

/// Builds frame `k` of `cfg`'s mix: `batch` requests signed now, each valid for the client
/// library's 60 s.
fn frame_maker(cfg: &BenchConfig, cluster_id: ClusterId, leases: &[u64]) -> Arc<MakeFrame> {
    let recipients: Vec<PublicKey> = (0..RECIPIENTS).into_par_iter().map(|_| public_of(&generate_key())).collect();
    let signers: Vec<SigningKey> =
        if cfg.accounts.is_empty() { vec![cfg.doc_key.clone()] } else { cfg.accounts.clone() };
    let publics: Vec<PublicKey> = signers.iter().map(public_of).collect();
    let seed = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
    let (mix, batch, leases) = (cfg.mix, cfg.batch as u64, leases.to_vec());
    Arc::new(move |k: u64| {
        let expires_at_ms = now_ms() + REQUEST_TTL_MS;
        (k * batch..(k + 1) * batch)
            .map(|i| {
                let r = mixed(i, seed);
                let s = (i % signers.len() as u64) as usize;
                let transfer =
                    || Operation::Transfer { to: recipients[(r >> 8) as usize % recipients.len()], amount: 1 };
                let op = match mix {
                    Mix::Transfer => transfer(),
                    Mix::Doc => doc_op(r, i),
                    Mix::Mixed if r & 1 == 1 => doc_op(r, i),
                    Mix::Mixed => transfer(),
                    Mix::Claim => Operation::Claim { domain: "bench".into(), slot: seed.wrapping_add(i), lease: None },
                    Mix::Keepalive => Operation::LeaseKeepAlive { lease: leases[s % leases.len().max(1)] },
                };
                Request { cluster_id, signer: publics[s], nonce: seed.wrapping_add(i), expires_at_ms, op }
                    .sign(&signers[s])
            })
            .collect()
    })
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A client's end of its queue: takes the next frame that can still commit, counting the
/// times it had to wait for the signers.
struct FrameSource {
    rx: Receiver<SignedFrame>,
    /// The signers are done and the queue is empty.
    done: bool,
}

impl FrameSource {
    /// The next frame, waiting for the signers until `until`; `None` when they are done or
    /// `until` passed.
    fn next(&mut self, rec: &mut Recorder, until: Instant) -> Option<Vec<SignedRequest>> {
        loop {
            let frame = match self.rx.try_recv() {
                Ok(f) => f,
                Err(TryRecvError::Disconnected) => {
                    self.done = true;
                    return None;
                }
                Err(TryRecvError::Empty) => {
                    let waited = Instant::now();
                    rec.signing_waits += 1;
                    let got = self.rx.recv_deadline(until);
                    rec.signing_wait += waited.elapsed();
                    match got {
                        Ok(f) => f,
                        Err(RecvTimeoutError::Disconnected) => {
                            self.done = true;
                            return None;
                        }
                        Err(RecvTimeoutError::Timeout) => return None,
                    }
                }
            };
            if frame.expires_at_ms < now_ms() + SEND_EXPIRY_MARGIN_MS {
                rec.expired_unsent += frame.requests.len() as u64;
                continue;
            }
            return Some(frame.requests);
        }
    }
}

/// A SET of a fresh UUID4 with a ~100-byte JSON value.
fn doc_op(r: u64, i: u64) -> Operation {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&r.to_le_bytes());
    bytes[8..].copy_from_slice(&i.to_le_bytes());
    let key = DocKey::from_random(bytes);
    let value =
        format!(r#"{{"bench": {i}, "note": "tally load generator document", "rnd": "{r:016x}", "pad": "xxxxxxxx"}}"#);
    Operation::Set { key, value: value.into_bytes() }
}

fn progress_bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

/// Open loop: when client `client` of `clients` sends its first frame, after the run starts. The
/// clients' schedules interleave evenly (one frame every `interval / clients` in all), so the
/// offered load is spread over time: in lockstep, every client's frame would arrive at once, at
/// the start of the same batch, and each request would wait a whole batch interval.
fn schedule_phase(interval: Duration, client: usize, clients: usize) -> Duration {
    interval.mul_f64(client as f64 / clients.max(1) as f64)
}

/// Live counters the progress bar reads.
#[derive(Default)]
struct Live {
    committed: AtomicU64,
    errors: AtomicU64,
}

/// One client: keeps `inflight` frames outstanding until the clock or the frames run out.
#[allow(clippy::too_many_arguments)]
fn client_loop(
    addr: &str,
    dial: &tally_net::Dial,
    frames: Receiver<SignedFrame>,
    inflight_max: usize,
    interval: Option<Duration>,
    start: Instant,
    end: Instant,
    live: &Live,
) -> Recorder {
    let mut run = ClientRun {
        addr,
        dial,
        frames: FrameSource { rx: frames, done: false },
        conn: Connection::connect_with(addr, dial, Duration::from_millis(CONNECT_TIMEOUT_MS)).ok(),
        inflight: VecDeque::new(),
        inflight_max,
        interval,
        next_due: start,
        start,
        end,
        timeout: Duration::from_millis(CALL_TIMEOUT_MS),
        live,
        rec: Recorder::default(),
    };
    loop {
        run.send_frames();
        if run.inflight.is_empty() {
            match run.when_idle() {
                ControlFlow::Continue(()) => continue,
                ControlFlow::Break(()) => break,
            }
        }
        match run.next_reply() {
            Some((i, received)) => run.on_reply(i, received),
            None => run.on_no_reply(),
        }
    }
    run.rec
}

/// A frame sent and not yet answered: (latency origin, actual send time, reply, requests). In an
/// open loop the origin is the frame's scheduled time, so a late send counts its wait (no
/// coordinated omission).
type InFlight = (Instant, Instant, PendingReply, u64);

/// One client's state while it runs ([`client_loop`]).
struct ClientRun<'a> {
    addr: &'a str,
    dial: &'a tally_net::Dial,
    frames: FrameSource,
    /// None after a failed connect or a timeout, until the next reconnect.
    conn: Option<Connection>,
    inflight: VecDeque<InFlight>,
    inflight_max: usize,
    /// Open loop: one frame every `interval`, the next one due at `next_due`.
    interval: Option<Duration>,
    next_due: Instant,
    start: Instant,
    end: Instant,
    /// How long a frame may wait for its reply.
    timeout: Duration,
    live: &'a Live,
    rec: Recorder,
}

impl ClientRun<'_> {
    /// Sends frames while fewer than `inflight_max` are outstanding, the clock runs, the frame is
    /// due (open loop) and the connection and the signers have one.
    fn send_frames(&mut self) {
        while self.inflight.len() < self.inflight_max && Instant::now() < self.end {
            if self.interval.is_some() && Instant::now() < self.next_due {
                break;
            }
            let Some(c) = self.conn.as_ref().filter(|c| !c.is_closed()) else { break };
            // With replies outstanding, wait for the signers only briefly: replies are timed.
            let until = if self.inflight.is_empty() {
                self.end
            } else {
                self.end.min(Instant::now() + Duration::from_millis(20))
            };
            let Some(frame) = self.frames.next(&mut self.rec, until) else { break };
            let n = frame.len() as u64;
            let now = Instant::now();
            let sent_at = match self.interval {
                Some(iv) => {
                    let due = self.next_due;
                    self.next_due += iv;
                    due
                }
                None => now,
            };
            match c.send(ClientMessage::Submit(frame)) {
                Ok(p) => self.inflight.push_back((sent_at, now, p, n)),
                Err(_) => {
                    self.rec.record(self.start.elapsed().as_secs() as usize, Duration::ZERO, 0, 0, n);
                    self.live.errors.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// Nothing outstanding: wait for the next frame's time, or for the signers, or reconnect;
    /// `Break` when the frames or the clock ran out.
    fn when_idle(&mut self) -> ControlFlow<()> {
        let broken = self.conn.as_ref().is_none_or(|c| c.is_closed());
        let more = !self.frames.done && Instant::now() < self.end;
        if !broken && self.interval.is_some() && more && Instant::now() < self.next_due {
            // Open loop, nothing outstanding: wait for the next frame's time.
            std::thread::sleep(self.next_due.saturating_duration_since(Instant::now()).min(self.end - Instant::now()));
            return ControlFlow::Continue(());
        }
        if !broken && more {
            return ControlFlow::Continue(()); // the send loop waits for the signers
        }
        if broken && more {
            // Reconnect once per pass; a dead node leaves us here until the clock ends.
            std::thread::sleep(Duration::from_millis(100));
            self.conn = Connection::connect_with(self.addr, self.dial, Duration::from_millis(CONNECT_TIMEOUT_MS)).ok();
            return ControlFlow::Continue(());
        }
        ControlFlow::Break(())
    }

    /// The first reply to arrive: its frame's index and what was received; `None` when none came
    /// in time. Wakes for the next scheduled frame too (open loop), else only for replies.
    fn next_reply(&self) -> Option<(usize, Result<ServerMessage, crossbeam::channel::RecvError>)> {
        let wait = match self.interval {
            Some(_) if self.inflight.len() < self.inflight_max => self
                .next_due
                .saturating_duration_since(Instant::now())
                .min(self.timeout)
                .max(Duration::from_micros(100)),
            _ => self.timeout,
        };
        let mut sel = Select::new();
        for (_, _, p, _) in &self.inflight {
            sel.recv(p.receiver());
        }
        match sel.select_timeout(wait) {
            Ok(op) => {
                let i = op.index();
                let r = op.recv(self.inflight[i].2.receiver());
                Some((i, r))
            }
            Err(_) => None,
        }
    }

    /// No reply: either it is time for the next frame, or nothing answered within the call
    /// timeout, and every outstanding frame counts as errors on a connection given up.
    fn on_no_reply(&mut self) {
        if self.inflight.front().is_some_and(|(_, sent, _, _)| sent.elapsed() < self.timeout) {
            return; // woke for the schedule, not a timeout
        }
        for (_, _, _, n) in self.inflight.drain(..) {
            self.rec.record(self.start.elapsed().as_secs() as usize, self.timeout, 0, 0, n);
            self.live.errors.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(c) = self.conn.take() {
            c.close();
        }
    }

    /// Records frame `i`'s replies: its latency and how many committed, were refused or failed.
    fn on_reply(&mut self, i: usize, received: Result<ServerMessage, crossbeam::channel::RecvError>) {
        let Some((sent_at, _, pending, n)) = self.inflight.remove(i) else { return };
        let latency = sent_at.elapsed();
        let t_s = self.start.elapsed().as_secs() as usize;
        let rec = &mut self.rec;
        let (committed, rejected, errors) = match pending.finish(received) {
            Ok(ServerMessage::Submitted(replies)) => count_replies(&replies, n, &mut rec.reasons),
            Ok(ServerMessage::Error(e)) => {
                *rec.reasons.entry(format!("{:?}: {}", e.code, e.message)).or_default() += n;
                (0, 0, n)
            }
            _ => {
                *rec.reasons.entry("no reply (connection lost or timed out)".into()).or_default() += n;
                (0, 0, n)
            }
        };
        rec.record(t_s, latency, committed, rejected, errors);
        self.live.committed.fetch_add(committed, Ordering::Relaxed);
        self.live.errors.fetch_add(errors, Ordering::Relaxed);
    }
}

/// (committed, rejected-but-committed, errors) of one frame's replies.
fn count_replies(
    replies: &[SubmitReply],
    sent: u64,
    reasons: &mut std::collections::BTreeMap<String, u64>,
) -> (u64, u64, u64) {
    let mut committed = 0;
    let mut rejected = 0;
    for r in replies {
        match r {
            SubmitReply::Committed { receipt, .. } => {
                committed += 1;
                if let Outcome::Rejected(code) = receipt.outcome {
                    rejected += 1;
                    *reasons.entry(format!("{code:?} (executed, refused): {code}")).or_default() += 1;
                }
            }
            SubmitReply::Refused(e) => *reasons.entry(format!("{:?}: {}", e.code, e.message)).or_default() += 1,
        }
    }
    (committed, rejected, sent.saturating_sub(committed))
}

/// One step of a sweep: the offered rate and what the cluster did with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub offered_per_s: u64,
    pub throughput_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub errors: u64,
    pub loadgen_cpu_us_per_request: f64,
}

/// `tally bench --sweep`: open-loop steps of rising rate until p99 passes the limit (or the
/// cluster falls 10% behind the offered rate, or the steps run out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    pub p99_limit_ms: f64,
    /// The highest offered rate whose p99 stayed within the limit and was kept up with.
    pub max_rate_within_limit_per_s: Option<u64>,
    pub step_duration_s: u64,
    pub clients: usize,
    pub batch: usize,
    pub mix: Mix,
    pub machine: Machine,
    pub points: Vec<SweepPoint>,
}

/// The sweep's knobs.
#[derive(Debug, Clone, Copy)]
pub struct Sweep {
    pub start_per_s: u64,
    pub step_per_s: u64,
    pub steps_max: usize,
    pub p99_limit_ms: f64,
}

/// Runs a sweep (see [`SweepSummary`]); each step is a whole open-loop run of `cfg.duration`.
///
/// # Errors
/// As [`run_bench`].
pub fn run_sweep(cfg: &BenchConfig, sweep: Sweep) -> Result<SweepSummary, ClientError> {
    let mut points = Vec::new();
    let mut best = None;
    let mut rate = sweep.start_per_s.max(1);
    for _ in 0..sweep.steps_max.max(1) {
        let step = BenchConfig { rate: Some(rate), json: None, plot: None, ..cfg.clone() };
        let s = run_bench(&step)?;
        if cfg.progress {
            eprintln!("offered {rate}/s: {:.0}/s, p99 {:.1} ms", s.throughput_per_s, s.latency_ms_p99);
        }
        // Kept up: it committed 90% of what the schedule offered (a count, so the first batch
        // interval and the drain after the last send do not count against a short step).
        let kept_up = s.committed as f64 >= 0.9 * rate as f64 * cfg.duration.as_secs_f64();
        let within = s.latency_ms_p99 <= sweep.p99_limit_ms;
        points.push(SweepPoint {
            offered_per_s: rate,
            throughput_per_s: s.throughput_per_s,
            latency_ms_p50: s.latency_ms_p50,
            latency_ms_p99: s.latency_ms_p99,
            latency_ms_p999: s.latency_ms_p999,
            errors: s.errors,
            loadgen_cpu_us_per_request: s.loadgen_cpu_us_per_request,
        });
        if !(kept_up && within) {
            break;
        }
        best = Some(rate);
        rate += sweep.step_per_s.max(1);
    }
    let summary = SweepSummary {
        p99_limit_ms: sweep.p99_limit_ms,
        max_rate_within_limit_per_s: best,
        step_duration_s: cfg.duration.as_secs(),
        clients: cfg.clients,
        batch: cfg.batch,
        mix: cfg.mix,
        machine: Machine::this(),
        points,
    };
    if let Some(p) = &cfg.json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| ClientError::Invalid(e.to_string()))?;
        std::fs::write(p, json).map_err(|e| ClientError::File { path: p.display().to_string(), source: e })?;
    }
    if let Some(p) = &cfg.plot {
        write_sweep_plot(&summary, p, tally_plot::register_font())?;
    }
    Ok(summary)
}

/// Throughput and p50/p99 against the offered rate, with the p99 limit.
///
/// # Errors
/// [`ClientError::Invalid`] when the file can't be drawn.
pub fn write_sweep_plot(s: &SweepSummary, path: &Path, with_text: bool) -> Result<(), ClientError> {
    use plotters::prelude::*;
    let err = |e: String| ClientError::Invalid(format!("cannot draw {}: {e}", path.display()));
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(350);
    let x_max = s.points.iter().map(|p| p.offered_per_s).max().unwrap_or(1).max(1) as f64 * 1.05;
    let y_top = s.points.iter().map(|p| p.throughput_per_s).fold(x_max, f64::max) * 1.05;
    let y_bottom = s.points.iter().map(|p| p.latency_ms_p999).fold(s.p99_limit_ms, f64::max) * 1.1;
    let xs = |f: fn(&SweepPoint) -> f64| s.points.iter().map(|p| (p.offered_per_s as f64, f(p))).collect::<Vec<_>>();
    let top_title = format!("throughput against offered load ({} clients, batch {}, {:?})", s.clients, s.batch, s.mix);
    let top_axes = Axes { title: &top_title, x_desc: "offered requests/s", y_desc: "committed/s", x_max, y_max: y_top };
    let top_lines =
        vec![(xs(|p| p.throughput_per_s), BLUE, "committed/s"), (xs(|p| p.offered_per_s as f64), BLACK, "offered/s")];
    draw_panel(&top, &top_axes, top_lines, true, true, with_text).map_err(err)?;
    let bottom_title = format!("latency against offered load (p99 limit {} ms)", s.p99_limit_ms);
    let bottom_axes = Axes { title: &bottom_title, x_desc: "offered requests/s", y_desc: "ms", x_max, y_max: y_bottom };
    let bottom_lines = vec![
        (xs(|p| p.latency_ms_p50), GREEN, "p50"),
        (xs(|p| p.latency_ms_p99), RED, "p99"),
        (xs(|p| p.latency_ms_p999), MAGENTA, "p999"),
        (s.points.iter().map(|p| (p.offered_per_s as f64, s.p99_limit_ms)).collect(), BLACK, "p99 limit"),
    ];
    draw_panel(&bottom, &bottom_axes, bottom_lines, true, true, with_text).map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Runs the whole benchmark and writes its outputs.
///
/// # Errors
/// [`ClientError`] when the node can't be reached before the run or the outputs can't be written.
pub fn run_bench(cfg: &BenchConfig) -> Result<BenchSummary, ClientError> {
    if cfg.clients == 0 || cfg.inflight == 0 || cfg.batch == 0 || cfg.batch > limits::FRAME_REQUESTS_MAX {
        return Err(ClientError::Invalid(format!(
            "--clients and --inflight must be at least 1 and --batch between 1 and {}",
            limits::FRAME_REQUESTS_MAX
        )));
    }
    let (cluster_id, target, leases) = prepare(cfg)?;
    // Open loop: each client sends one frame every `clients × batch / rate` seconds, and only
    // as many requests are signed as the schedule offers.
    let interval = cfg.rate.map(|r| Duration::from_secs_f64((cfg.clients * cfg.batch) as f64 / r.max(1) as f64));
    let mut rate_max = cfg.rate_max;
    if let Some(r) = cfg.rate {
        rate_max = rate_max.min(r + r / 10 + cfg.batch as u64);
    }
    let total = rate_max.saturating_mul(cfg.duration.as_secs().max(1)).max(1);
    let frames_per_client = total.div_ceil(cfg.clients as u64).div_ceil(cfg.batch as u64);
    let ahead = match interval {
        Some(iv) => (Duration::from_millis(SIGNED_AHEAD_MS).as_secs_f64() / iv.as_secs_f64()).ceil() as usize,
        None => 4 * cfg.inflight,
    }
    .clamp(1, SIGNED_AHEAD_FRAMES_MAX);
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let make = frame_maker(cfg, cluster_id, &leases);
    let mut pipeline =
        SigningPipeline::start(cfg.clients, ahead, frames_per_client * cfg.clients as u64, workers, make)?;
    pipeline.wait_filled(Duration::from_millis(PREFILL_WAIT_MS));
    if cfg.progress {
        eprintln!(
            "signing as it sends ({workers} signer threads, {ahead} frames ahead per client); running {} s with {} clients",
            cfg.duration.as_secs(),
            cfg.clients
        );
    }
    let cpu_before = process_cpu_s();
    let (all, elapsed) = run_clients(cfg, &target, pipeline.take_queues(), interval);
    let (signing_cpu_s, signed) = pipeline.finish();
    let mut summary = summarize(&all, elapsed, cfg, signed);
    summary.loadgen_cpu_s = process_cpu_s() - cpu_before;
    summary.loadgen_cpu_us_per_request = summary.loadgen_cpu_s * 1e6 / summary.committed.max(1) as f64;
    summary.signing_cpu_s = signing_cpu_s;
    summary.signing_threads = workers;
    if let Some(path) = &cfg.json {
        write_json(&summary, path)?;
    }
    if let Some(path) = &cfg.plot {
        write_plot(&summary, path, tally_plot::register_font())?;
    }
    Ok(summary)
}

/// Asks the first address for the cluster id and the leader, and grants the keepalive mix its
/// leases: (cluster id, the address the clients load, leases).
fn prepare(cfg: &BenchConfig) -> Result<(ClusterId, String, Vec<u64>), ClientError> {
    let conn = Connection::connect_with(&cfg.addr, &cfg.dial, Duration::from_millis(CONNECT_TIMEOUT_MS))?;
    let (cluster_id, leader_addr) = match conn.call(ClientMessage::Status)? {
        ServerMessage::Status(s) => (s.cluster_id, s.leader_addr.filter(|a| !a.is_empty())),
        other => {
            return Err(ClientError::Protocol { addr: cfg.addr.clone(), detail: format!("bad Status reply {other:?}") })
        }
    };
    // Keepalives need a lease per signer, granted now (an hour: longer than any run).
    let mut leases = Vec::new();
    if cfg.mix == Mix::Keepalive {
        let signers: Vec<&SigningKey> =
            if cfg.accounts.is_empty() { vec![&cfg.doc_key] } else { cfg.accounts.iter().collect() };
        for key in signers {
            let req = tally_client::client::sign_request(key, cluster_id, Operation::LeaseGrant { ttl_ms: 3_600_000 });
            match conn.call(ClientMessage::Submit(vec![req]))? {
                ServerMessage::Submitted(mut r) => match r.pop() {
                    Some(tally_codec::wire::SubmitReply::Committed { receipt, .. }) => match receipt.outcome {
                        Outcome::LeaseGranted { lease, .. } => leases.push(lease),
                        o => return Err(ClientError::Invalid(format!("lease grant for the keepalive mix: {o:?}"))),
                    },
                    other => return Err(ClientError::Invalid(format!("lease grant for the keepalive mix: {other:?}"))),
                },
                other => return Err(ClientError::Invalid(format!("lease grant for the keepalive mix: {other:?}"))),
            }
        }
    }
    drop(conn);
    // The clients load the leader, as the client library does: a follower would relay every
    // frame (an extra hop and ~2.4 µs of a follower's CPU per request, measured), and whether
    // the first address leads would decide the figure.
    let target = leader_addr.unwrap_or_else(|| cfg.addr.clone());
    if cfg.progress && target != cfg.addr {
        eprintln!("{} is a follower: the clients connect to the leader, {target}", cfg.addr);
    }
    Ok((cluster_id, target, leases))
}

/// The client threads, each fed by its queue, until the clock ends: their merged recording and
/// the run's wall time.
fn run_clients(
    cfg: &BenchConfig,
    target: &str,
    queues: Vec<Receiver<SignedFrame>>,
    interval: Option<Duration>,
) -> (Recorder, Duration) {
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let end = start + cfg.duration;
    let bar = progress_bar(cfg.progress, cfg.duration.as_secs().max(1), "running");
    let recs: Vec<Recorder> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(c, q)| {
                let live = live.clone();
                let first = start + interval.map_or(Duration::ZERO, |iv| schedule_phase(iv, c, cfg.clients));
                s.spawn(move || client_loop(target, &cfg.dial, q, cfg.inflight, interval, first, end, &live))
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            let secs = start.elapsed().as_secs_f64().max(0.001);
            let c = live.committed.load(Ordering::Relaxed);
            bar.set_position(start.elapsed().as_secs().min(cfg.duration.as_secs()));
            bar.set_message(format!(
                "{c} committed, {:.0}/s, {} errors",
                c as f64 / secs,
                live.errors.load(Ordering::Relaxed)
            ));
        }
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut all = Recorder::default();
    for r in &recs {
        all.merge(r);
    }
    (all, elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BenchConfig {
        BenchConfig {
            dial: tally_net::Dial::Plain,
            addr: "127.0.0.1:1".into(),
            duration: Duration::from_secs(3),
            clients: 2,
            mix: Mix::Mixed,
            batch: 10,
            inflight: 2,
            rate_max: 20,
            rate: None,
            accounts: vec![SigningKey::from_bytes(&[4; 32])],
            doc_key: SigningKey::from_bytes(&[5; 32]),
            json: None,
            plot: None,
            progress: false,
        }
    }

    /// A run longer than pre-signed requests stay valid is refused before anything is signed
    /// (a 600 s run used to sign 20 M requests that had all expired when sent).
    /// Four clients at one frame per 200 ms each: together one frame every 50 ms, not four at
    /// once every 200 ms.
    #[test]
    fn open_loop_clients_interleave_evenly() {
        let iv = Duration::from_millis(200);
        let mut sends: Vec<Duration> =
            (0..4).flat_map(|c| (0..3u32).map(move |k| schedule_phase(iv, c, 4) + iv * k)).collect();
        sends.sort();
        let gaps: Vec<Duration> = sends.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g == Duration::from_millis(50)), "{gaps:?}");
        assert_eq!(schedule_phase(iv, 0, 1), Duration::ZERO);
    }

    /// A signer slower than the sender (a loaded machine): the client waits for frames and
    /// counts it, every frame it gets was signed moments ago (never more than its queue ahead),
    /// and the signers stop with the run.
    #[test]
    fn a_slow_signer_falls_behind_but_hands_out_only_fresh_frames() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let make: Arc<MakeFrame> = Arc::new(move |k: u64| {
            std::thread::sleep(Duration::from_millis(20));
            let op = Operation::Transfer { to: PublicKey([9; 32]), amount: 1 };
            vec![Request {
                cluster_id: ClusterId([7; 16]),
                signer: public_of(&key),
                nonce: k,
                expires_at_ms: now_ms() + REQUEST_TTL_MS,
                op,
            }
            .sign(&key)]
        });
        let mut pipeline = SigningPipeline::start(2, 4, u64::MAX, 2, make).expect("start");
        pipeline.wait_filled(Duration::from_secs(5));
        let mut queues = pipeline.take_queues();
        let mut source = FrameSource { rx: queues.remove(0), done: false };
        let mut rec = Recorder::default();
        let until = Instant::now() + Duration::from_secs(1);
        let mut got = 0;
        let mut oldest = Duration::ZERO;
        while Instant::now() < until {
            let Ok(frame) = source.rx.recv_timeout(Duration::from_millis(1)) else {
                // Nothing ready: the FrameSource path counts the wait.
                if source.next(&mut rec, until).is_some() {
                    got += 1;
                }
                continue;
            };
            oldest = oldest.max(frame.signed_at.elapsed());
            assert!(frame.expires_at_ms > now_ms() + SEND_EXPIRY_MARGIN_MS);
            got += 1;
        }
        assert!(got >= 10, "{got} frames in a second from two 50 frames/s signers");
        assert!(rec.signing_waits > 0, "the slow signer never made the client wait");
        assert!(oldest < Duration::from_millis(500), "a frame {oldest:?} old: more than its queue ahead");
        drop(source);
        drop(queues);
        let started = Instant::now();
        let (cpu_s, signed) = pipeline.finish();
        assert!(started.elapsed() < Duration::from_secs(2), "the signers stop with the run");
        assert!(signed >= got, "{signed} signed, {got} received");
        assert!(cpu_s >= 0.0);
    }

    /// A frame that would expire before it could commit is dropped unsent and counted.
    #[test]
    fn a_frame_about_to_expire_is_never_sent() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let (tx, rx) = bounded(4);
        let req = |expires_at_ms| {
            let op = Operation::Transfer { to: PublicKey([9; 32]), amount: 1 };
            Request { cluster_id: ClusterId([7; 16]), signer: public_of(&key), nonce: 1, expires_at_ms, op }.sign(&key)
        };
        let stale = now_ms() + 1_000;
        tx.send(SignedFrame { requests: vec![req(stale)], expires_at_ms: stale, signed_at: Instant::now() })
            .expect("send");
        let fresh = now_ms() + REQUEST_TTL_MS;
        tx.send(SignedFrame { requests: vec![req(fresh)], expires_at_ms: fresh, signed_at: Instant::now() })
            .expect("send");
        drop(tx);
        let mut source = FrameSource { rx, done: false };
        let mut rec = Recorder::default();
        let until = Instant::now() + Duration::from_secs(1);
        let sent = source.next(&mut rec, until).expect("the fresh frame");
        assert_eq!(sent[0].request.expires_at_ms, fresh);
        assert_eq!(rec.expired_unsent, 1);
        assert!(source.next(&mut rec, until).is_none() && source.done);
    }

    /// The JSON's machine and CPU-time fields measure something real.
    #[test]
    fn machine_and_cpu_time_are_measured() {
        let m = Machine::this();
        assert!(m.cores >= 1 && !m.cpu_model.is_empty(), "{m:?}");
        let before = process_cpu_s();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = process_cpu_s() - before;
        assert!(used >= 0.1, "300 ms of spinning used {used} s of CPU");
    }

    fn sample_summary() -> BenchSummary {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for t in 0..3 {
            a.record(t, Duration::from_millis(100), 900, 0, 0);
            a.record(t, Duration::from_millis(200), 90, 1, 0);
            b.record(t, Duration::from_millis(1000), 10, 0, 5);
        }
        a.merge(&b);
        summarize(&a, Duration::from_secs(3), &cfg(), 3000)
    }

    #[test]
    fn histogram_becomes_the_json_fields() {
        let s = sample_summary();
        assert_eq!(s.committed, 3000);
        assert_eq!(s.rejected, 3);
        assert_eq!(s.errors, 15);
        assert!((s.throughput_per_s - 1000.0).abs() < 1e-6);
        assert!((s.latency_ms_p50 - 100.0).abs() < 1.0, "{}", s.latency_ms_p50);
        assert!((s.latency_ms_p99 - 200.0).abs() < 1.0, "{}", s.latency_ms_p99);
        assert!((s.latency_ms_p999 - 1000.0).abs() < 2.0, "{}", s.latency_ms_p999);
        assert_eq!(s.series.len(), 3);
        assert_eq!(s.series[1].committed, 1000);
        let json: serde_json::Value = serde_json::to_value(&s).expect("json");
        for field in [
            "committed",
            "errors",
            "duration_s",
            "throughput_per_s",
            "latency_ms_p50",
            "latency_ms_p99",
            "latency_ms_p999",
        ] {
            assert!(json.get(field).is_some_and(|v| v.is_number()), "{field}");
        }
        assert!(json["series"].is_array());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.json");
        write_json(&s, &path).expect("write");
        let back: BenchSummary = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("parse");
        assert_eq!(back, s);
    }

    #[test]
    fn plot_writes_a_png_with_and_without_text() {
        let s = sample_summary();
        let dir = tempfile::tempdir().expect("tempdir");
        let with_font = tally_plot::register_font();
        for (name, text) in [("a.png", with_font), ("b.png", false)] {
            let path = dir.path().join(name);
            write_plot(&s, &path, text).expect("plot");
            let bytes = std::fs::read(&path).expect("read");
            assert!(bytes.len() > 1000, "{name} is {} bytes", bytes.len());
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
        // An empty run still plots.
        let empty = summarize(&Recorder::default(), Duration::from_secs(1), &cfg(), 0);
        write_plot(&empty, &dir.path().join("c.png"), false).expect("empty plot");
    }

    #[test]
    fn the_signers_make_whole_frames_of_valid_distinct_requests() {
        let c = cfg();
        let make = frame_maker(&c, ClusterId([7; 16]), &[]);
        let mut pipeline = SigningPipeline::start(2, 3, 6, 2, make).expect("start");
        let queues = pipeline.take_queues();
        // Every frame, from whichever queue it went to (a signer hands a frame to any client
        // with room, so one queue may get four and another two); the queues close when the
        // signers are done.
        let frames: Vec<SignedFrame> = queues.iter().flat_map(|q| q.iter()).collect();
        drop(queues);
        let (_, signed) = pipeline.finish();
        assert_eq!(signed, 60);
        let all: Vec<&SignedRequest> = frames.iter().flat_map(|f| &f.requests).collect();
        assert_eq!(all.len(), 60);
        assert!(frames.iter().all(|f| f.requests.len() == 10));
        assert!(all.iter().all(|r| r.request.expires_at_ms > now_ms() + REQUEST_TTL_MS - 10_000));
        let ids: std::collections::HashSet<_> = all.iter().map(|r| r.id()).collect();
        assert_eq!(ids.len(), all.len());
        let docs = all.iter().filter(|r| matches!(r.request.op, Operation::Set { .. })).count();
        assert!(docs > 0 && docs < all.len(), "mixed mix has both kinds ({docs})");
        for r in all {
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&r.request.signer.0).expect("key");
            let sig = ed25519_dalek::Signature::from_bytes(&r.signature.0);
            vk.verify_strict(&r.request.signing_bytes(), &sig).expect("signature");
            if let Operation::Set { key, value } = &r.request.op {
                assert!(key.is_uuid4());
                assert!(serde_json::from_slice::<serde_json::Value>(value).is_ok());
                assert!((80..140).contains(&value.len()), "{}", value.len());
            }
        }
    }
}
