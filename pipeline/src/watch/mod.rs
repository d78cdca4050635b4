//! Watch serving: every `Watch` frame is answered by a small pool of threads of its own, never on
//! the connection's reader, the replica thread or the store thread, and it costs what it is given.
//!
//! ```text
//!  conn reader ──admit (per connection, per address, total)──▶ ready queue ──▶ watch-0, watch-1
//!      │ refused: Busy{limit, retry_after_ms}                   ▲   │ one batch per turn, round-robin
//!      │                                          watch-timer ──┘   ▼
//!      │            (waiting → ready when the batch is applied; past the answer time → page or Busy)
//!  conn writer ◀── page (its slot is freed when the writer takes it) ◀─┘
//! ```
//!
//! - **Bounded:** watches being served or whose page the writer has not taken yet are at most
//!   [`WATCHES_PER_CONNECTION_MAX`] per connection, [`WATCHES_PER_ADDRESS_MAX`] per client
//!   address and [`WATCHES_TOTAL_MAX`] in all; one more is refused at once with `Busy`.
//! - **Fair:** a worker takes one batch of one watch, then puts the watch back at the end of the
//!   queue, so 200 watchers catching up advance together.
//! - **Budgeted:** batch bodies decoded ([`WATCH_DECODE_BYTES_PER_S_MAX`]) and events put in pages
//!   ([`WATCH_PAGE_BYTES_PER_S_MAX`]) a second, with [`WATCH_THREADS`] threads, so watches cannot
//!   take most of the machine. A decoded batch is cached ([`WATCH_CACHE_BYTES_MAX`]): watchers at
//!   the same heights share one decode.
//! - **Answered in time:** each watch is answered within [`WATCH_ANSWER_MS`] of its arrival: with
//!   the batches it covered by then, an empty page when it waited for a batch that did not come,
//!   or `Busy` with a retry hint when it could not be given a turn.
//! - **Short store-lock holds:** see [`read`]: one record per hold, bodies decoded outside it.
//! - **Memory:** a page holds about [`WATCH_PAGE_BYTES_MAX`] of events (plus the batch that crosses
//!   it); all pages being built or waiting for their writer, about [`WATCH_HELD_BYTES_MAX`].

pub mod budget;
pub mod read;

use crate::status::StatusBoard;
use budget::Budget;
use crossbeam::channel::Sender;
use parking_lot::{Condvar, Mutex};
use read::{BatchChanges, ReadError};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::wire::{BusyInfo, Change, Envelope, ServerMessage, WatchEvent, WatchFilter, WatchPage, WireError};
use tally_codec::ErrorCode;
use tally_store::state::Store;

/// Watches one connection may have open at once (served, or their page not yet taken by the
/// writer). The client library keeps one; a few more leave room for several filters.
pub const WATCHES_PER_CONNECTION_MAX: usize = 8;
/// Watches open at once from one client address.
pub const WATCHES_PER_ADDRESS_MAX: usize = 200;
/// Watches open at once on this replica.
pub const WATCHES_TOTAL_MAX: usize = 512;
/// Threads serving watches (plus one timer thread that answers watches whose time is up).
pub const WATCH_THREADS: usize = 2;
/// Every watch is answered (a page, or `Busy`) within this long of its arrival.
pub const WATCH_ANSWER_MS: u64 = 500;
/// Longest a watch with nothing to read waits for the next batch.
pub const WATCH_WAIT_MAX_MS: u32 = 500;
/// Batches one page covers, at most.
pub const WATCH_BATCHES_MAX: u32 = 256;
/// Bytes of events one page carries, about (the batch that crosses it ends the page). A page this
/// full is sent after its turn, not at its answer time: pages go out spread over time rather
/// than all at once when the answer times of watchers that arrived together come.
pub const WATCH_PAGE_BYTES_MAX: usize = 256 * 1024;
/// Bytes of events in all pages being built or waiting for their connection's writer; past it
/// no watch takes another batch until some are written.
pub const WATCH_HELD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Batch-body bytes decoded for watches a second (a full-load batch stream is about 10 MB/s).
pub const WATCH_DECODE_BYTES_PER_S_MAX: u64 = 16 * 1024 * 1024;
/// Event bytes put in watch pages a second, for all watchers together.
pub const WATCH_PAGE_BYTES_PER_S_MAX: u64 = 8 * 1024 * 1024;
/// Decoded batches kept for watchers at the same heights.
pub const WATCH_CACHE_BYTES_MAX: usize = 32 * 1024 * 1024;
/// The shortest retry hint a `Busy` carries (a random share of it is added, so refused watchers
/// do not come back together).
pub const WATCH_RETRY_MS: u32 = 250;
/// How often the timer thread looks at waiting watches and answer times.
const TICK_MS: u64 = 10;

/// The limits of one replica's watch serving (tests use smaller ones).
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    pub per_connection_max: usize,
    pub per_address_max: usize,
    pub total_max: usize,
    pub threads: usize,
    pub answer_ms: u64,
    pub page_bytes_max: usize,
    pub held_bytes_max: usize,
    pub decode_bytes_per_s_max: u64,
    pub page_bytes_per_s_max: u64,
    pub cache_bytes_max: usize,
}

impl WatchLimits {
    pub const DEFAULT: WatchLimits = WatchLimits {
        per_connection_max: WATCHES_PER_CONNECTION_MAX,
        per_address_max: WATCHES_PER_ADDRESS_MAX,
        total_max: WATCHES_TOTAL_MAX,
        threads: WATCH_THREADS,
        answer_ms: WATCH_ANSWER_MS,
        page_bytes_max: WATCH_PAGE_BYTES_MAX,
        held_bytes_max: WATCH_HELD_BYTES_MAX,
        decode_bytes_per_s_max: WATCH_DECODE_BYTES_PER_S_MAX,
        page_bytes_per_s_max: WATCH_PAGE_BYTES_PER_S_MAX,
        cache_bytes_max: WATCH_CACHE_BYTES_MAX,
    };
}

/// What a `Watch` frame asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRequest {
    pub filter: WatchFilter,
    pub from_height: u64,
    pub max_batches: u32,
    pub wait_ms: u32,
}

/// The watch serving of one replica.
pub struct WatchService {
    limits: WatchLimits,
    state: Mutex<State>,
    work: Condvar,
    cache: Mutex<read::Cache>,
}

struct State {
    ready: VecDeque<Task>,
    /// Watches with nothing to read yet, until their batch is applied or their wait is over.
    waiting: Vec<Task>,
    per_address: HashMap<IpAddr, usize>,
    total: usize,
    held_bytes: usize,
    decode: Budget,
    pages: Budget,
}

/// One connection's share of the watch limits; its writer frees a page's slot as it takes it.
pub struct WatchConn {
    service: Arc<WatchService>,
    ip: IpAddr,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Watches of this connection being served or whose page waits for the writer.
    slots: usize,
    unwritten: usize,
    unwritten_bytes: usize,
    closed: bool,
}

/// One `Watch` frame being served.
struct Task {
    frame: u64,
    out: Sender<Envelope<ServerMessage>>,
    conn: Arc<WatchConn>,
    filter: WatchFilter,
    from: u64,
    /// The next batch to read.
    next: u64,
    /// The last batch this page may cover.
    last: u64,
    wait_until: Instant,
    deadline: Instant,
    events: Vec<WatchEvent>,
    /// [`read::change_bytes`] of `events`, summed.
    bytes: usize,
}

impl Task {
    /// Adds the events `filter` selects from one batch; returns their bytes.
    fn add(&mut self, b: &BatchChanges) -> usize {
        let before = self.bytes;
        for c in b.changes.iter().filter(|c| selects(&self.filter, c)) {
            self.bytes += read::change_bytes(c);
            self.events.push(WatchEvent { height: b.height, time_ms: b.time_ms, change: c.clone() });
        }
        self.next = b.height + 1;
        self.bytes - before
    }
}

/// Whether a watch with `filter` follows `c`.
pub fn selects(filter: &WatchFilter, c: &Change) -> bool {
    match (filter, c) {
        (WatchFilter::AllDocs, Change::DocSet { .. } | Change::DocDeleted { .. }) => true,
        (WatchFilter::Doc(k), Change::DocSet { key, .. } | Change::DocDeleted { key }) => k == key,
        (WatchFilter::Domain(d), Change::ClaimGranted { domain, .. } | Change::ClaimReleased { domain, .. }) => {
            d == domain
        }
        (WatchFilter::Leases, Change::LeaseSet { .. } | Change::LeaseEnded { .. }) => true,
        _ => false,
    }
}

/// What a page holds for the limits: its events' [`read::change_bytes`].
fn page_bytes(p: &WatchPage) -> usize {
    p.events.iter().map(|e| read::change_bytes(&e.change)).sum()
}

/// A `Busy` answer naming `limit`, asking to come back after `retry_after_ms` (and a random
/// share of [`WATCH_RETRY_MS`] more).
pub fn busy(limit: &str, retry_after_ms: u64, message: String) -> ServerMessage {
    ServerMessage::Busy(busy_info(limit, retry_after_ms, message))
}

/// The body of a [`busy`] answer (counted in `tally_busy_total{limit}`).
pub fn busy_info(limit: &str, retry_after_ms: u64, message: String) -> BusyInfo {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) % u64::from(WATCH_RETRY_MS));
    metrics::counter!("tally_busy_total", "limit" => limit.to_string()).increment(1);
    let retry = retry_after_ms.max(u64::from(WATCH_RETRY_MS)) + jitter;
    BusyInfo { limit: limit.to_string(), retry_after_ms: u32::try_from(retry).unwrap_or(u32::MAX), message }
}

impl WatchService {
    pub fn new(limits: WatchLimits) -> Arc<WatchService> {
        assert!(limits.threads > 0 && limits.answer_ms > 0, "watch serving needs threads and time");
        let burst = |rate: u64| (rate / 4).max(1);
        Arc::new(WatchService {
            limits,
            state: Mutex::new(State {
                ready: VecDeque::new(),
                waiting: Vec::new(),
                per_address: HashMap::new(),
                total: 0,
                held_bytes: 0,
                decode: Budget::new(limits.decode_bytes_per_s_max, burst(limits.decode_bytes_per_s_max)),
                pages: Budget::new(limits.page_bytes_per_s_max, burst(limits.page_bytes_per_s_max)),
            }),
            work: Condvar::new(),
            cache: Mutex::new(read::Cache::new(limits.cache_bytes_max)),
        })
    }

    /// Starts the serving threads and the timer; they run for the life of the process.
    ///
    /// # Errors
    /// When a thread cannot be started.
    pub fn start(
        self: &Arc<Self>,
        store: &Arc<Mutex<Store>>,
        status: &Arc<StatusBoard>,
        stopping: &Arc<AtomicBool>,
    ) -> Result<(), String> {
        let tables = *store.lock().tables();
        let src = Arc::new(Source { store: store.clone(), tables, status: status.clone(), stopping: stopping.clone() });
        for i in 0..self.limits.threads {
            let (svc, src) = (self.clone(), src.clone());
            crate::node::spawn(&format!("watch-{i}"), move || {
                while !src.stopping() {
                    if let Some(t) = svc.next_ready(&src) {
                        svc.slice(&src, t);
                    }
                }
            })?;
        }
        let svc = self.clone();
        crate::node::spawn("watch-timer", move || {
            while !src.stopping() {
                std::thread::sleep(Duration::from_millis(TICK_MS));
                svc.tick(src.applied_height(), Instant::now());
            }
        })
    }

    /// Watches open now (being served, or a page waiting for its writer).
    pub fn open(&self) -> usize {
        self.state.lock().total
    }

    /// The next watch to give a turn, or `None` after waiting a while for one. While decoding is
    /// over its budget, only a watch whose next batch needs no decode gets a turn.
    fn next_ready(&self, src: &Source) -> Option<Task> {
        let mut s = self.state.lock();
        let now = Instant::now();
        let pages_ok = s.pages.available(now) && s.held_bytes < self.limits.held_bytes_max;
        let decode_ok = s.decode.available(now);
        if pages_ok && decode_ok {
            if let Some(t) = s.ready.pop_front() {
                return Some(t);
            }
        } else if pages_ok {
            let applied = src.applied_height();
            let cache = self.cache.lock();
            if let Some(i) = s.ready.iter().position(|t| t.next > applied || cache.contains(t.next)) {
                return s.ready.remove(i);
            }
        }
        let pause = if !pages_ok {
            s.pages.ready_in(now).max(Duration::from_millis(TICK_MS))
        } else if !decode_ok && !s.ready.is_empty() {
            s.decode.ready_in(now)
        } else {
            Duration::from_millis(100)
        };
        self.work.wait_for(&mut s, pause.clamp(Duration::from_millis(1), Duration::from_millis(100)));
        None
    }

    /// One turn of one watch: at most one batch read, then the watch goes back in the queue or
    /// is answered.
    fn slice(&self, src: &Source, mut t: Task) {
        let applied = src.applied_height();
        if t.next > applied {
            if t.next > t.from || Instant::now() >= t.wait_until {
                return self.send_page(t);
            }
            self.state.lock().waiting.push(t);
            return;
        }
        let batch = match self.batch_at(src, t.next, t.deadline) {
            Ok(b) => b,
            Err(ReadError::Compacted { .. }) if t.next > t.from => return self.send_page(t),
            Err(ReadError::StoreBusy) => return self.store_busy(t),
            Err(e) => {
                let code =
                    if matches!(e, ReadError::Compacted { .. }) { ErrorCode::Compacted } else { ErrorCode::Internal };
                return self.send_small(t, ServerMessage::Error(WireError::new(code, e.to_string())));
            }
        };
        let added = t.add(&batch);
        {
            let mut s = self.state.lock();
            s.pages.charge(added as u64, Instant::now());
            s.held_bytes += added;
        }
        metrics::counter!("tally_watch_page_bytes_total").increment(added as u64);
        if t.next > t.last || t.bytes >= self.limits.page_bytes_max || t.next > applied {
            return self.send_page(t);
        }
        self.state.lock().ready.push_back(t);
    }

    /// The changes of batch `height`: from the cache, or read (short lock holds), charged to the
    /// decode budget, decoded and cached.
    fn batch_at(&self, src: &Source, height: u64, deadline: Instant) -> Result<Arc<BatchChanges>, ReadError> {
        if let Some(b) = self.cache.lock().get(height) {
            metrics::counter!("tally_watch_batches_total", "source" => "cache").increment(1);
            return Ok(b);
        }
        let at = read::locate(&src.store, height, deadline)?;
        let len = at.body.len() as u64;
        self.state.lock().decode.charge(len, Instant::now());
        let b = Arc::new(read::changes(&src.store, &src.tables, &at, deadline)?);
        self.cache.lock().insert(b.clone());
        metrics::counter!("tally_watch_batches_total", "source" => "store").increment(1);
        metrics::counter!("tally_watch_decoded_bytes_total").increment(len);
        Ok(b)
    }

    /// The timer's round: waiting watches whose batch arrived go back to the queue, and every
    /// watch whose time is up is answered.
    fn tick(&self, applied: u64, now: Instant) {
        let (due, woke) = {
            let mut s = self.state.lock();
            let mut due = Vec::new();
            let mut woke = false;
            for t in std::mem::take(&mut s.waiting) {
                if t.next <= applied {
                    s.ready.push_back(t);
                    woke = true;
                } else if now >= t.wait_until.min(t.deadline) {
                    due.push(t);
                } else {
                    s.waiting.push(t);
                }
            }
            if s.ready.iter().any(|t| now >= t.deadline) {
                let (late, keep): (VecDeque<Task>, VecDeque<Task>) =
                    std::mem::take(&mut s.ready).into_iter().partition(|t| now >= t.deadline);
                s.ready = keep;
                due.extend(late);
            }
            (due, woke)
        };
        if woke {
            self.work.notify_all();
        }
        for t in due {
            self.expire(t, applied, now);
        }
    }

    /// A watch whose time is up: the batches it covered, an empty page if there was nothing to
    /// read, or `Busy` when it could not be given a turn in time.
    fn expire(&self, t: Task, applied: u64, now: Instant) {
        if t.next > t.from || t.next > applied {
            return self.send_page(t);
        }
        let wait = {
            let mut s = self.state.lock();
            s.decode.ready_in(now).max(s.pages.ready_in(now))
        };
        let retry = u64::from(WATCH_RETRY_MS) + wait.as_millis() as u64;
        let message = format!(
            "no turn for this watch within {} ms (watch serving is at its budget or busy with other watchers); retry after the hint",
            self.limits.answer_ms
        );
        self.send_small(t, busy("WATCH_ANSWER_MS", retry, message));
    }

    /// The store lock stayed taken (by a long store write) until the watch's answer time: the
    /// batches covered so far, or `Busy` naming the store.
    fn store_busy(&self, t: Task) {
        if t.next > t.from {
            return self.send_page(t);
        }
        let message = format!(
            "the store was busy with a write for the whole {} ms this watch may take; retry after the hint",
            self.limits.answer_ms
        );
        self.send_small(t, busy("STORE_BUSY", u64::from(WATCH_RETRY_MS), message));
    }

    /// Sends a finished page; its slot stays taken until the connection's writer takes the page.
    fn send_page(&self, t: Task) {
        metrics::counter!("tally_watch_pages_total").increment(1);
        let bytes = t.bytes;
        let env =
            Envelope { id: t.frame, msg: ServerMessage::Watched(WatchPage { events: t.events, next_height: t.next }) };
        let mut c = t.conn.state.lock();
        if !c.closed {
            c.unwritten += 1;
            c.unwritten_bytes += bytes;
            if t.out.try_send(env).is_ok() {
                return;
            }
            c.unwritten -= 1;
            c.unwritten_bytes -= bytes;
        }
        self.release(&mut c, t.conn.ip, 1, bytes);
    }

    /// Sends a small answer (`Busy`, an error) and frees the watch's slot first, so a client
    /// that asks again at once finds it free.
    fn send_small(&self, t: Task, msg: ServerMessage) {
        self.release(&mut t.conn.state.lock(), t.conn.ip, 1, t.bytes);
        let _ = t.out.try_send(Envelope { id: t.frame, msg });
    }

    /// Frees `n` slots of one connection and `bytes` of held events (the connection's lock held).
    fn release(&self, c: &mut ConnState, ip: IpAddr, n: usize, bytes: usize) {
        assert!(c.slots >= n, "a watch slot is freed once");
        c.slots -= n;
        let mut s = self.state.lock();
        assert!(s.total >= n && s.held_bytes >= bytes, "watch slots and bytes are freed once");
        s.total -= n;
        s.held_bytes -= bytes;
        if let Some(k) = s.per_address.get_mut(&ip) {
            *k -= n;
            if *k == 0 {
                s.per_address.remove(&ip);
            }
        }
        metrics::gauge!("tally_watches_active").set(s.total as f64);
    }
}

impl WatchConn {
    pub fn new(service: &Arc<WatchService>, ip: IpAddr) -> Arc<WatchConn> {
        Arc::new(WatchConn { service: service.clone(), ip, state: Mutex::new(ConnState::default()) })
    }

    /// Admits a `Watch` frame within the limits and queues it, or answers `Busy` at once.
    pub fn submit(self: &Arc<Self>, frame: u64, out: &Sender<Envelope<ServerMessage>>, req: WatchRequest) {
        let svc = &self.service;
        let l = svc.limits;
        let now = Instant::now();
        let mut c = self.state.lock();
        if c.closed {
            return;
        }
        let refused = {
            let mut s = svc.state.lock();
            let from_address = s.per_address.get(&self.ip).copied().unwrap_or(0);
            if c.slots >= l.per_connection_max {
                Some(("WATCHES_PER_CONNECTION_MAX", l.per_connection_max, "on this connection"))
            } else if from_address >= l.per_address_max {
                Some(("WATCHES_PER_ADDRESS_MAX", l.per_address_max, "from this address"))
            } else if s.total >= l.total_max {
                Some(("WATCHES_TOTAL_MAX", l.total_max, "on this replica"))
            } else {
                c.slots += 1;
                s.total += 1;
                *s.per_address.entry(self.ip).or_default() += 1;
                metrics::gauge!("tally_watches_active").set(s.total as f64);
                let from = req.from_height.max(1);
                let wait = Duration::from_millis(u64::from(req.wait_ms.min(WATCH_WAIT_MAX_MS)));
                s.ready.push_back(Task {
                    frame,
                    out: out.clone(),
                    conn: self.clone(),
                    filter: req.filter,
                    from,
                    next: from,
                    last: from + u64::from(req.max_batches.clamp(1, WATCH_BATCHES_MAX)) - 1,
                    wait_until: now + wait,
                    deadline: now + Duration::from_millis(l.answer_ms),
                    events: Vec::new(),
                    bytes: 0,
                });
                None
            }
        };
        drop(c);
        match refused {
            None => {
                svc.work.notify_one();
            }
            Some((name, limit, scope)) => {
                let message = format!("too many watches open {scope} (limit {limit}, {name}); retry after the hint");
                let _ = out.try_send(Envelope { id: frame, msg: busy(name, 1_000, message) });
            }
        }
    }

    /// The connection's writer took a page off its queue: its slot and bytes are free.
    pub fn written(&self, page: &WatchPage) {
        let bytes = page_bytes(page);
        let mut c = self.state.lock();
        if c.unwritten == 0 {
            return;
        }
        c.unwritten -= 1;
        c.unwritten_bytes -= bytes.min(c.unwritten_bytes);
        self.service.release(&mut c, self.ip, 1, bytes);
    }

    /// The connection's writer stopped: pages it did not take are dropped, their slots freed;
    /// watches still being served are dropped when they finish.
    pub fn close(&self) {
        let mut c = self.state.lock();
        c.closed = true;
        let (n, bytes) = (c.unwritten, c.unwritten_bytes);
        c.unwritten = 0;
        c.unwritten_bytes = 0;
        if n > 0 {
            self.service.release(&mut c, self.ip, n, bytes);
        }
    }
}

/// What the watch threads read: the store, its tables, the applied height, and whether the
/// process is stopping.
struct Source {
    store: Arc<Mutex<Store>>,
    tables: tally_codec::Tables,
    status: Arc<StatusBoard>,
    stopping: Arc<AtomicBool>,
}

impl Source {
    fn applied_height(&self) -> u64 {
        self.status.applied().height
    }
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam::channel::{bounded, Receiver};

    const SMALL: WatchLimits = WatchLimits {
        per_connection_max: 2,
        per_address_max: 3,
        total_max: 4,
        threads: 1,
        answer_ms: 50,
        ..WatchLimits::DEFAULT
    };

    fn req(from_height: u64, wait_ms: u32) -> WatchRequest {
        WatchRequest { filter: WatchFilter::AllDocs, from_height, max_batches: 16, wait_ms }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn busy_limit(rx: &Receiver<Envelope<ServerMessage>>) -> Option<String> {
        match rx.try_recv().ok()?.msg {
            ServerMessage::Busy(b) => {
                assert!(b.retry_after_ms >= WATCH_RETRY_MS, "{b:?}");
                Some(b.limit)
            }
            other => panic!("expected Busy, got {other:?}"),
        }
    }

    #[test]
    fn each_limit_refuses_the_watch_beyond_it_by_name() {
        let svc = WatchService::new(SMALL);
        let (tx, rx) = bounded(64);
        let a1 = WatchConn::new(&svc, ip(1));
        a1.submit(1, &tx, req(1, 0));
        a1.submit(2, &tx, req(1, 0));
        assert!(rx.is_empty(), "two fit on one connection");
        a1.submit(3, &tx, req(1, 0));
        assert_eq!(busy_limit(&rx).as_deref(), Some("WATCHES_PER_CONNECTION_MAX"));
        let a2 = WatchConn::new(&svc, ip(1));
        a2.submit(4, &tx, req(1, 0));
        a2.submit(5, &tx, req(1, 0));
        assert_eq!(busy_limit(&rx).as_deref(), Some("WATCHES_PER_ADDRESS_MAX"), "three from one address");
        let b = WatchConn::new(&svc, ip(2));
        b.submit(6, &tx, req(1, 0));
        b.submit(7, &tx, req(1, 0));
        assert_eq!(busy_limit(&rx).as_deref(), Some("WATCHES_TOTAL_MAX"), "four in all");
        assert_eq!(svc.open(), 4);
    }

    #[test]
    fn a_page_holds_its_slot_until_the_writer_takes_it_and_a_closed_connection_frees_all() {
        let svc = WatchService::new(SMALL);
        let (tx, rx) = bounded(64);
        let c = WatchConn::new(&svc, ip(1));
        c.submit(1, &tx, req(10, 0));
        c.submit(2, &tx, req(10, 0));
        // Nothing applied: the timer answers both with an empty page at their answer time.
        let later = Instant::now() + Duration::from_millis(SMALL.answer_ms);
        svc.tick(0, later);
        let pages: Vec<WatchPage> = rx
            .try_iter()
            .map(|e| match e.msg {
                ServerMessage::Watched(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pages.len(), 2);
        assert!(pages.iter().all(|p| p.events.is_empty() && p.next_height == 10));
        assert_eq!(svc.open(), 2, "pages not yet taken by the writer keep their slots");
        c.submit(3, &tx, req(10, 0));
        assert_eq!(busy_limit(&rx).as_deref(), Some("WATCHES_PER_CONNECTION_MAX"));
        c.written(&pages[0]);
        assert_eq!(svc.open(), 1);
        c.submit(4, &tx, req(10, 0));
        assert!(rx.is_empty(), "a slot came free");
        c.close();
        assert_eq!(svc.open(), 1, "the watch still being served keeps its slot until it ends");
        svc.tick(0, Instant::now() + Duration::from_millis(SMALL.answer_ms));
        assert!(rx.is_empty(), "nothing is sent on a closed connection");
        assert_eq!(svc.open(), 0);
    }

    #[test]
    fn a_watch_given_no_turn_in_time_is_answered_busy_with_a_hint() {
        let svc = WatchService::new(SMALL);
        let (tx, rx) = bounded(64);
        let c = WatchConn::new(&svc, ip(1));
        // Batch 5 is applied, but no worker runs here: nobody gives the watch a turn.
        c.submit(1, &tx, req(5, 500));
        svc.tick(5, Instant::now());
        assert!(rx.is_empty(), "not before its answer time");
        svc.tick(5, Instant::now() + Duration::from_millis(SMALL.answer_ms));
        assert_eq!(busy_limit(&rx).as_deref(), Some("WATCH_ANSWER_MS"));
        assert_eq!(svc.open(), 0, "a Busy frees the slot at once");
    }

    #[test]
    fn filters_pick_their_changes() {
        let doc = tally_codec::DocKey([7; 16]);
        let set = Change::DocSet {
            key: doc,
            owner: tally_codec::PublicKey([0; 32]),
            revision: 1,
            lease: None,
            value: vec![],
        };
        let claim = Change::ClaimReleased { domain: "v".into(), slot: 1 };
        assert!(selects(&WatchFilter::AllDocs, &set) && selects(&WatchFilter::Doc(doc), &set));
        assert!(!selects(&WatchFilter::Doc(tally_codec::DocKey([8; 16])), &set));
        assert!(
            selects(&WatchFilter::Domain("v".into()), &claim) && !selects(&WatchFilter::Domain("w".into()), &claim)
        );
        assert!(
            !selects(&WatchFilter::Leases, &set) && selects(&WatchFilter::Leases, &Change::LeaseEnded { lease: 1 })
        );
    }
}
