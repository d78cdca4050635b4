//! Stage 1: receive. Each client connection gets a reader thread (TLS, decode, then stage 2 on
//! the rayon pool) and a writer thread (encode replies in the order they complete). A bad frame
//! gets an error reply naming the problem; only a frame that breaks the framing itself
//! (oversized or truncated) closes that one connection. Other clients never notice.
//!
//! **Limits** (each named below, with its reason): connections per pool and per address
//! ([`tally_net::AdmissionLimits::CLIENT_PORT`]), the TLS handshake time, idle time, the minimum
//! rate at which a started frame must arrive, frames in flight per connection, the frame size.
//! A replica relaying to the leader authenticates with its node certificate and is served from
//! its own pool, so a flood of anonymous sockets on the leader cannot cut followers off.

use crate::node::{FrameReply, Shared, Submission, Waiter};
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::admin::{AdminOp, SignedAdmin};
use tally_codec::wire::{self, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, WireError};
use tally_codec::{encode, limits, ErrorCode};
use tally_failover::MembershipError;
use tally_net::Stream;

/// Replies queued for one connection's writer, at most.
pub const OUTGOING_FRAMES_MAX: usize = 4096;
/// Frames one connection may have unanswered at once; more are refused with `Overloaded`
/// (the client library keeps a few in flight; TigerBeetle's clients keep one).
pub const FRAMES_IN_FLIGHT_MAX: usize = 256;
/// A write that blocks this long means the client stopped reading: the connection is closed.
pub const WRITE_TIMEOUT_MS: u64 = 10_000;
/// How long a linearizable read waits for the store to catch up with the commit index.
pub const READ_WAIT: Duration = Duration::from_millis(tally_core::replica::READ_WAIT_MS);
/// TLS handshake, from accept to the first frame's possible start.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// A connection with nothing in flight that sends no frame for this long is closed (clients
/// heartbeat every second; a one-shot command reconnects).
pub const IDLE_TIMEOUT_MS: u64 = 60_000;
/// Once a frame's first byte arrived, the whole frame must arrive within this long plus its
/// length at [`FRAME_RATE_BYTES_PER_S_MIN`]: a slow drip can't pin a connection open.
pub const FRAME_GRACE_MS: u64 = 5_000;
/// The slowest pace a frame body may arrive at (after the grace).
pub const FRAME_RATE_BYTES_PER_S_MIN: u64 = 256 * 1024;
/// How often a blocked reader wakes to check its deadlines.
const READ_POLL_MS: u64 = 500;

pub fn listen(shared: Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        if shared.is_stopping() {
            return;
        }
        let Ok(stream) = stream else { continue };
        // The handshake pool cuts its oldest member when full; established connections are
        // judged once we know whether the peer is a replica of this cluster.
        let Ok(slot) = shared.admission.admit(&stream) else { continue };
        let s = shared.clone();
        // A thread that can't start drops its slot with the closure.
        let _ = std::thread::Builder::new().name("conn".into()).spawn(move || serve(&s, stream, &slot));
    }
}

/// A plaintext error frame for a client that can't speak to this port, then close.
fn refuse_connection(mut s: TcpStream, code: ErrorCode, message: String) {
    metrics::counter!("tally_connections_refused_total", "reason" => format!("{code:?}")).increment(1);
    let e = Envelope { id: 0, msg: ServerMessage::Error(WireError::new(code, message)) };
    let _ = wire::write_frame(&mut s, &encode(&e));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// TLS (when configured), then admission to the client or replica pool.
fn open(shared: &Shared, tcp: TcpStream, slot: &tally_net::Admitted) -> Option<Stream> {
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let _ = tcp.set_nodelay(true);
    let stream = match &shared.opts.client_tls {
        Some(cfg) => {
            let _ = tcp.set_read_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)));
            let mut first = [0u8; 1];
            match tcp.peek(&mut first) {
                Ok(1) if first[0] != tally_net::tls::TLS_HANDSHAKE_RECORD => {
                    refuse_connection(
                        tcp,
                        ErrorCode::Malformed,
                        "this port requires TLS: give the client the cluster CA (--ca FILE or --cluster-dir DIR)"
                            .into(),
                    );
                    return None;
                }
                Ok(1) => {}
                _ => return None,
            }
            match Stream::accept(tcp, cfg.clone(), deadline) {
                Ok(s) => s,
                Err(e) => {
                    metrics::counter!("tally_connections_refused_total", "reason" => "tls").increment(1);
                    tracing::debug!(error = %e, "client TLS handshake failed");
                    return None;
                }
            }
        }
        None => Stream::plain(tcp),
    };
    if let Err(refusal) = slot.establish(stream.peer_is_cluster_node()) {
        let e =
            Envelope { id: 0, msg: ServerMessage::Error(WireError::new(ErrorCode::Overloaded, refusal.to_string())) };
        metrics::counter!("tally_connections_refused_total", "reason" => "limit").increment(1);
        let _ = wire::write_frame(&mut &stream, &encode(&e)).and_then(|()| (&stream).flush());
        stream.shutdown();
        return None;
    }
    Some(stream)
}

fn serve(shared: &Arc<Shared>, tcp: TcpStream, slot: &tally_net::Admitted) {
    let Some(stream) = open(shared, tcp, slot) else { return };
    let peer = if stream.peer_is_cluster_node() { Peer::Replica } else { Peer::Client };
    if stream.tcp().set_read_timeout(Some(Duration::from_millis(READ_POLL_MS))).is_err() {
        return;
    }
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (out_tx, out_rx) = bounded::<Envelope<ServerMessage>>(OUTGOING_FRAMES_MAX);
    let peer_ip = stream.tcp().peer_addr().map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
    let watches = crate::watch::WatchConn::new(&shared.watch, peer_ip);
    let (w_stream, w_in_flight, w_watches) = (stream.clone(), in_flight.clone(), watches.clone());
    let writer = std::thread::Builder::new()
        .name("conn-writer".into())
        .spawn(move || write_loop(w_stream, out_rx, &w_in_flight, &w_watches));
    let Ok(writer) = writer else { return };
    let mut reader = BufReader::with_capacity(1 << 16, stream.clone());
    let mut frames = PacedFrames::new(limits::FRAME_BYTES_MAX, Pacing::DEFAULT);
    loop {
        match frames.next(&mut reader, in_flight.load(Ordering::Acquire) > 0) {
            Ok(Some(body)) => {
                slot.touch();
                if in_flight.fetch_add(1, Ordering::AcqRel) >= FRAMES_IN_FLIGHT_MAX {
                    let msg = format!("too many frames in flight on this connection (limit {FRAMES_IN_FLIGHT_MAX})");
                    let _ = out_tx.try_send(error_reply(0, ErrorCode::Overloaded, msg));
                    continue;
                }
                match wire::decode_client(&body) {
                    Ok(env) => handle(shared, env, &out_tx, peer, &watches),
                    Err(e) => {
                        metrics::counter!("tally_bad_frames_total").increment(1);
                        tally_net::warn_limited!("bad_frame", error = %e, "a client frame did not decode");
                        let _ = out_tx.try_send(error_reply(0, ErrorCode::Malformed, format!("bad frame: {e}")));
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                // The framing is lost or the peer too slow: say why, then close this one only.
                metrics::counter!("tally_connections_closed_total", "reason" => e.metric()).increment(1);
                if !matches!(e, ReadError::Idle { .. }) {
                    tally_net::warn_limited!("client_framing", error = %e, "a client connection was closed");
                }
                in_flight.fetch_add(1, Ordering::AcqRel);
                let _ = out_tx.try_send(error_reply(0, e.code(), e.to_string()));
                if let ReadError::TooLarge { len, .. } = e {
                    drain(&mut reader, len);
                }
                break;
            }
        }
    }
    drop(out_tx);
    let _ = writer.join();
    stream.shutdown();
}

/// After an oversized frame is refused, its body is read and dropped for at most this long,
/// so the error frame reaches the client: closing with unread bytes resets the connection, and
/// a reset discards what the client had not read yet.
pub const DRAIN_MS: u64 = 5_000;
/// ... and at most this many bytes (a length prefix may claim 4 GiB).
pub const DRAIN_BYTES_MAX: usize = 2 * limits::FRAME_BYTES_MAX;

/// Reads and drops up to `len` bytes (see [`DRAIN_MS`]).
fn drain(r: &mut impl Read, len: usize) {
    let deadline = Instant::now() + Duration::from_millis(DRAIN_MS);
    let mut left = len.min(DRAIN_BYTES_MAX);
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 && Instant::now() < deadline {
        match r.read(&mut buf[..left.min(64 * 1024)]) {
            Ok(0) => return,
            Ok(n) => left -= n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Why a connection's reader gave up.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("bad frame: {0}")]
    Framing(std::io::Error),
    #[error("bad frame: frame of {len} bytes is over the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("frame of {len} bytes did not arrive within {limit_ms} ms (the minimum rate is {FRAME_RATE_BYTES_PER_S_MIN} B/s)")]
    TooSlow { len: usize, limit_ms: u64 },
    #[error("connection idle for {idle_ms} ms; closed")]
    Idle { idle_ms: u64 },
}

impl ReadError {
    fn code(&self) -> ErrorCode {
        match self {
            ReadError::Framing(_) | ReadError::TooLarge { .. } => ErrorCode::Malformed,
            ReadError::TooSlow { .. } | ReadError::Idle { .. } => ErrorCode::Timeout,
        }
    }
    fn metric(&self) -> &'static str {
        match self {
            ReadError::Framing(_) | ReadError::TooLarge { .. } => "framing",
            ReadError::TooSlow { .. } => "slow_frame",
            ReadError::Idle { .. } => "idle",
        }
    }
}

/// The pace a connection must keep.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    grace_ms: u64,
    rate_bytes_per_s_min: u64,
    idle_ms: u64,
}

impl Pacing {
    const DEFAULT: Pacing =
        Pacing { grace_ms: FRAME_GRACE_MS, rate_bytes_per_s_min: FRAME_RATE_BYTES_PER_S_MIN, idle_ms: IDLE_TIMEOUT_MS };
}

/// Reads frames while enforcing the idle timeout and the minimum frame rate: a frame's deadline
/// starts at its first byte. Partial progress survives the reader's periodic wake-ups.
struct PacedFrames {
    pacing: Pacing,
    bytes_max: usize,
    header: [u8; 4],
    header_got: usize,
    body: Vec<u8>,
    body_len: usize,
    frame_started: Option<Instant>,
    last_frame: Instant,
}

impl PacedFrames {
    fn new(bytes_max: usize, pacing: Pacing) -> Self {
        PacedFrames {
            pacing,
            bytes_max,
            header: [0; 4],
            header_got: 0,
            body: Vec::new(),
            body_len: 0,
            frame_started: None,
            last_frame: Instant::now(),
        }
    }

    fn deadline_ms(&self, len: usize) -> u64 {
        self.pacing.grace_ms + (len as u64).saturating_mul(1000) / self.pacing.rate_bytes_per_s_min.max(1)
    }

    /// The next whole frame; `None` at a clean end of stream. `waiting` means replies are
    /// pending, so silence is not idleness.
    fn next(&mut self, r: &mut impl Read, waiting: bool) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            let step = if self.header_got < 4 {
                r.read(&mut self.header[self.header_got..])
            } else {
                // Grow as bytes arrive (at most 64 KiB a step): a 4-byte header must not reserve
                // 16 MiB up front.
                let have = self.body.len();
                let want = (self.body_len - have).min(64 * 1024);
                self.body.resize(have + want, 0);
                let read = r.read(&mut self.body[have..]);
                self.body.truncate(have + *read.as_ref().unwrap_or(&0));
                read
            };
            match step {
                Ok(0) if self.header_got == 0 => return Ok(None),
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated frame");
                    return Err(ReadError::Framing(e));
                }
                Ok(n) => {
                    if self.frame_started.is_none() {
                        self.frame_started = Some(Instant::now());
                    }
                    if self.header_got < 4 {
                        self.header_got += n;
                        if self.header_got == 4 {
                            self.body_len = u32::from_le_bytes(self.header) as usize;
                            if self.body_len > self.bytes_max {
                                return Err(ReadError::TooLarge { len: self.body_len, limit: self.bytes_max });
                            }
                            self.body.clear();
                        }
                    }
                    if self.header_got == 4 && self.body.len() == self.body_len {
                        self.header_got = 0;
                        self.frame_started = None;
                        self.last_frame = Instant::now();
                        return Ok(Some(std::mem::take(&mut self.body)));
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    self.check_deadlines(waiting)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Framing(e)),
            }
            if self.frame_started.is_some() {
                self.check_deadlines(waiting)?;
            }
        }
    }

    fn check_deadlines(&self, waiting: bool) -> Result<(), ReadError> {
        match self.frame_started {
            Some(started) => {
                let len = if self.header_got == 4 { self.body_len } else { 0 };
                let limit_ms = self.deadline_ms(len);
                if started.elapsed() > Duration::from_millis(limit_ms) {
                    return Err(ReadError::TooSlow { len, limit_ms });
                }
            }
            None if !waiting && self.last_frame.elapsed() > Duration::from_millis(self.pacing.idle_ms) => {
                return Err(ReadError::Idle { idle_ms: self.pacing.idle_ms })
            }
            None => {}
        }
        Ok(())
    }
}

/// Writes the replies of one connection in the order they complete. A watch page's slot is
/// freed as the page is taken off the queue; when the writer stops, the pages it did not take.
fn write_loop(
    stream: Stream,
    rx: Receiver<Envelope<ServerMessage>>,
    in_flight: &AtomicUsize,
    watches: &crate::watch::WatchConn,
) {
    let _ = stream.tcp().set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    let mut w = BufWriter::with_capacity(1 << 16, stream.clone());
    let write = |w: &mut BufWriter<Stream>, env: &Envelope<ServerMessage>| {
        in_flight.fetch_sub(1, Ordering::AcqRel);
        if let ServerMessage::Watched(page) = &env.msg {
            watches.written(page);
        }
        wire::write_frame(w, &encode(env))
    };
    while let Ok(env) = rx.recv() {
        if write(&mut w, &env).is_err() {
            break;
        }
        // Coalesce whatever else is ready into one flush.
        let mut ok = true;
        while let Ok(env) = rx.try_recv() {
            if write(&mut w, &env).is_err() {
                ok = false;
                break;
            }
        }
        if !ok || w.flush().is_err() {
            break;
        }
    }
    let _ = w.flush();
    watches.close();
    stream.shutdown();
}

/// Who is on the other end of a client-port connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Client,
    /// A replica of this cluster (mutual TLS): it may relay frames.
    Replica,
}

fn error_reply(id: u64, code: ErrorCode, message: String) -> Envelope<ServerMessage> {
    Envelope { id, msg: ServerMessage::Error(WireError::new(code, message)) }
}

/// Whether this frame is served by the leader only (writes, linearizable reads).
fn leader_only(msg: &ClientMessage) -> bool {
    match msg {
        ClientMessage::Submit(_) => true,
        ClientMessage::Admin(a) => !matches!(a.command.op, AdminOp::AuditPage { .. }),
        ClientMessage::Get { stale, .. } | ClientMessage::Balance { stale, .. } => !stale,
        _ => false,
    }
}

fn handle(
    shared: &Arc<Shared>,
    env: Envelope<ClientMessage>,
    out: &Sender<Envelope<ServerMessage>>,
    peer: Peer,
    watches: &Arc<crate::watch::WatchConn>,
) {
    let id = env.id;
    let msg = match env.msg {
        // Served by the watch threads within this connection's limits (never relayed).
        ClientMessage::Watch { filter, from_height, max_batches, wait_ms } => {
            let req = crate::watch::WatchRequest { filter, from_height, max_batches, wait_ms };
            return watches.submit(id, out, req);
        }
        // With TLS only an authenticated replica may relay; anyone else is refused.
        ClientMessage::Forwarded(_) if peer != Peer::Replica && shared.opts.client_tls.is_some() => {
            let e = WireError::new(ErrorCode::NotAuthorized, "only a replica of this cluster may relay frames");
            let _ = out.try_send(Envelope { id, msg: ServerMessage::Error(e) });
            return;
        }
        // Served here or refused here: never relayed twice.
        ClientMessage::Forwarded(inner) => return answer(shared, id, inner.into_client(), out, Hop::Relayed),
        msg => msg,
    };
    // A follower relays leader-only frames to the leader as they came; with no leader known,
    // the stages below answer NotLeader and the client retries.
    let leader = if leader_only(&msg) && !shared.replicator().role().is_leader { shared.leader_addr() } else { None };
    match leader {
        Some(leader) if leader != shared.opts.listen => match tally_codec::wire::Relayed::from_client(msg) {
            Ok(relayed) => {
                metrics::counter!("tally_forwarded_frames_total").increment(1);
                shared.forwarder.forward(&leader, id, relayed, out);
            }
            Err(msg) => answer(shared, id, msg, out, Hop::Direct),
        },
        _ => answer(shared, id, msg, out, Hop::Direct),
    }
}

/// Whether a frame came from a client or was relayed by a follower (then it is never relayed
/// again).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    Direct,
    Relayed,
}

fn answer(shared: &Arc<Shared>, id: u64, msg: ClientMessage, out: &Sender<Envelope<ServerMessage>>, hop: Hop) {
    let reply = match msg {
        ClientMessage::Forwarded(inner) => return answer(shared, id, inner.into_client(), out, Hop::Relayed),
        ClientMessage::Submit(requests) => return submit(shared, id, requests, out),
        ClientMessage::Status => ServerMessage::Status(status(shared)),
        ClientMessage::Get { key, stale } => match read_barrier(shared, stale) {
            Err(e) => ServerMessage::Error(e),
            Ok(()) => match shared.store.lock().doc(&key) {
                Ok(d) => {
                    ServerMessage::Doc(d.map(|(m, value)| DocView { owner: m.owner, revision: m.revision, value }))
                }
                Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, format!("store read failed: {e}"))),
            },
        },
        ClientMessage::Balance { account, stale } => match read_barrier(shared, stale) {
            Err(e) => ServerMessage::Error(e),
            Ok(()) => match shared.store.lock().balance(&account) {
                Ok(b) => ServerMessage::Balance(b),
                Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, format!("store read failed: {e}"))),
            },
        },
        ClientMessage::Audit | ClientMessage::ClusterAdd { .. } | ClientMessage::ClusterRemove { .. } => {
            crate::measure::refused("admin", ErrorCode::NotAuthorized, 1);
            ServerMessage::Error(WireError::new(
                ErrorCode::NotAuthorized,
                "not authorized: cluster operations and scans must be signed by an admin key (tally --cluster-dir DIR, or --admin-key FILE)",
            ))
        }
        ClientMessage::Admin(cmd) => admin(shared, &cmd),
        ClientMessage::Batch { height } => ServerMessage::Batch(crate::queries::batch_info(shared, height)),
        // `handle` gives watches to the watch threads; a relayed frame never holds one.
        ClientMessage::Watch { .. } => {
            ServerMessage::Error(WireError::new(ErrorCode::Malformed, "a watch is not relayed; ask any replica"))
        }
        ClientMessage::Receipt { id: rid } => match crate::queries::stored_receipt(shared, &rid, None) {
            Some(r) => ServerMessage::Receipt(Some(Box::new(r))),
            // A replica that installed a snapshot lacks older receipts: ask the leader, once.
            None => match shared.leader_addr().filter(|l| hop == Hop::Direct && *l != shared.opts.listen) {
                Some(leader) if !shared.replicator().role().is_leader => {
                    shared.forwarder.forward(&leader, id, tally_codec::wire::Relayed::Receipt { id: rid }, out);
                    return;
                }
                _ => ServerMessage::Receipt(None),
            },
        },
        ClientMessage::ReceiptAt { id: rid, height } => {
            match crate::queries::stored_receipt(shared, &rid, Some(height)) {
                Some(r) => ServerMessage::Receipt(Some(Box::new(r))),
                None => match shared.leader_addr().filter(|l| hop == Hop::Direct && *l != shared.opts.listen) {
                    Some(leader) if !shared.replicator().role().is_leader => {
                        let relayed = tally_codec::wire::Relayed::ReceiptAt { id: rid, height };
                        shared.forwarder.forward(&leader, id, relayed, out);
                        return;
                    }
                    _ => ServerMessage::Receipt(None),
                },
            }
        }
    };
    let _ = out.try_send(Envelope { id, msg: reply });
}

/// An admin command: authorised against the configured admin keys, then carried out.
fn admin(shared: &Shared, cmd: &SignedAdmin) -> ServerMessage {
    if let Err(refusal) = cmd.authorize(&shared.opts.cluster_id, &shared.opts.admin_keys, wall_ms()) {
        crate::measure::refused("admin", ErrorCode::NotAuthorized, 1);
        tally_net::warn_limited!("admin_refused", signer = %cmd.command.signer, %refusal, "admin command refused");
        return ServerMessage::Error(WireError::new(ErrorCode::NotAuthorized, refusal.to_string()));
    }
    let id = match shared.admin_seen.claim(cmd, wall_ms()) {
        Ok(id) => id,
        Err(replay) => {
            let code = match replay {
                crate::admin_replay::ReplayRefusal::Duplicate => ErrorCode::Duplicate,
                crate::admin_replay::ReplayRefusal::TooMany => ErrorCode::Overloaded,
            };
            crate::measure::refused("admin", code, 1);
            tally_net::warn_limited!("admin_duplicate", signer = %cmd.command.signer, %replay, "admin command refused");
            return ServerMessage::Error(WireError::new(code, replay.to_string()));
        }
    };
    tracing::info!(signer = %cmd.command.signer, op = ?cmd.command.op, "admin command");
    let reply = run_admin(shared, cmd);
    // Refused for a reason that did nothing (not the leader, busy): the same bytes may come again.
    if matches!(&reply, ServerMessage::Error(e) if e.code.is_retryable()) {
        shared.admin_seen.release(cmd, &id);
    }
    reply
}

/// Carries out an authorised admin command taken once.
fn run_admin(shared: &Shared, cmd: &SignedAdmin) -> ServerMessage {
    match &cmd.command.op {
        AdminOp::ClusterAdd { node_id, client_addr, peer_addr } => {
            let m = tally_failover::Member {
                node_id: *node_id,
                client_addr: client_addr.clone(),
                peer_addr: peer_addr.clone(),
                is_voter: true,
                matched_index: 0,
            };
            membership_reply(shared, shared.replicator().add_member(m))
        }
        AdminOp::ClusterRemove { node_id } => membership_reply(shared, shared.replicator().remove_member(*node_id)),
        AdminOp::RevokeNode { node_id, cert_fingerprint } => {
            membership_reply(shared, shared.replicator().revoke_member(*node_id, *cert_fingerprint))
        }
        AdminOp::AuditPage { table, after, limit } => {
            match crate::queries::audit_page(shared, *table, after.as_deref(), *limit) {
                Ok(p) => ServerMessage::AuditPage(p),
                Err(crate::queries::AuditError::Busy(b)) => ServerMessage::Busy(b),
                Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, e.to_string())),
            }
        }
    }
}

/// A refused membership change on a replica that is not (or no longer) the leader is retryable
/// at the leader; anything else names the failure.
fn membership_reply(shared: &Shared, result: Result<(), MembershipError>) -> ServerMessage {
    match result {
        Ok(()) => ServerMessage::Done,
        Err(e) if e == MembershipError::NotLeader || !shared.replicator().role().is_leader => {
            let mut err = WireError::new(ErrorCode::NotLeader, format!("membership changes go to the leader: {e}"));
            err.leader_hint = shared.leader_addr();
            ServerMessage::Error(err)
        }
        Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, e.to_string())),
    }
}

/// Stage 1 hands a frame's requests to stage 2, answers refusals at once, and queues the rest
/// for the sequencer. A full queue pushes back with `Overloaded` rather than growing memory.
fn submit(
    shared: &Arc<Shared>,
    id: u64,
    requests: Vec<tally_codec::SignedRequest>,
    out: &Sender<Envelope<ServerMessage>>,
) {
    let n = requests.len();
    if n == 0 {
        let _ = out.try_send(Envelope { id, msg: ServerMessage::Submitted(Vec::new()) });
        return;
    }
    let frame = FrameReply::new(id, n, out.clone());
    let started = std::time::Instant::now();
    let now_ms = wall_ms();
    let results = crate::validate::validate_all_with(requests, &shared.opts.cluster_id, now_ms, &shared.keys);
    crate::measure::stage_time("validate", started);
    let leading = shared.replicator().role().is_leader;
    let mut subs = Vec::with_capacity(n);
    let mut invalid = crate::measure::Refusals::new("validate");
    let mut not_leader = 0;
    for (slot, r) in results.into_iter().enumerate() {
        let waiter = Waiter { frame: frame.clone(), slot };
        match r {
            Err(code) => {
                invalid.add(code);
                waiter.refuse(code);
            }
            Ok(_) if !leading => {
                not_leader += 1;
                waiter.refuse_not_leader(shared);
            }
            Ok(req) => subs.push(Submission { req, waiter }),
        }
    }
    crate::measure::refused("receive", ErrorCode::NotLeader, not_leader);
    if subs.is_empty() {
        return;
    }
    if let Err(e) = shared.submit_tx.try_send(subs) {
        let (TrySendError::Full(subs) | TrySendError::Disconnected(subs)) = e;
        crate::measure::refused("receive", ErrorCode::Overloaded, subs.len() as u64);
        for s in subs {
            s.waiter.refuse(ErrorCode::Overloaded);
        }
    }
}

/// A linearizable read: only the leader, under its lease, once the store has applied
/// everything committed when the read arrived. `stale` reads skip all of that.
fn read_barrier(shared: &Shared, stale: bool) -> Result<(), WireError> {
    if stale {
        return Ok(());
    }
    let read_index = match shared.replicator().read_index() {
        Ok(index) => index,
        Err(mut e) => {
            if e.code == ErrorCode::NotLeader {
                e.leader_hint = shared.leader_addr();
            }
            return Err(e);
        }
    };
    if !shared.wait_applied_index(read_index, READ_WAIT) {
        return Err(WireError::new(ErrorCode::Overloaded, "store is behind the commit index; retry"));
    }
    Ok(())
}

pub fn status(shared: &Shared) -> StatusInfo {
    let r = shared.replicator();
    let role = r.role();
    let members = r.members();
    let committed = shared.committed();
    let mut warnings = Vec::new();
    if let Some(why) = r.stopped() {
        let what = why.code().name();
        warnings.push(format!(
            "{what}: this replica's log stopped ({why}); it stepped down and serves no writes until it is restarted"
        ));
    }
    if let Some(p) = shared.poisoned() {
        warnings.push(format!("replica stopped applying: {p}"));
    }
    if role.leader_id.is_none() {
        warnings.push("no leader known; writes wait until one is elected".into());
    }
    StatusInfo {
        node_id: shared.opts.node_id,
        cluster_id: shared.opts.cluster_id,
        operator_key: shared.operator_pub,
        leader_id: role.leader_id,
        leader_addr: shared.leader_addr(),
        term: role.term,
        committed_height: committed.height,
        applied_height: shared.applied_height(),
        // The voters now (membership changes), never fewer than the replicas configured at
        // creation while this replica doesn't know the configuration yet.
        replicas_configured: u32::try_from(r.voters()).unwrap_or(u32::MAX).max(1),
        members: members
            .into_iter()
            .map(|m| MemberInfo {
                node_id: m.node_id,
                client_addr: m.client_addr,
                peer_addr: m.peer_addr,
                matched_index: m.matched_index,
                is_voter: m.is_voter,
            })
            .collect(),
        warnings,
        time_ms: wall_ms(),
    }
}

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const FAST: Pacing = Pacing { grace_ms: 300, rate_bytes_per_s_min: 1_000_000, idle_ms: 300 };

    /// A server-side socket with a short read timeout, and the client's end.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        (s, c)
    }

    #[test]
    fn whole_frames_come_through_in_pieces() {
        let (mut s, mut c) = pair();
        let mut frames = PacedFrames::new(1 << 20, FAST);
        let t = std::thread::spawn(move || {
            let mut f = 5u32.to_le_bytes().to_vec();
            f.extend_from_slice(b"hello");
            for b in f {
                c.write_all(&[b]).expect("write");
                std::thread::sleep(Duration::from_millis(5));
            }
            c
        });
        assert_eq!(frames.next(&mut s, false).expect("frame"), Some(b"hello".to_vec()));
        drop(t.join());
    }

    /// A slowloris (a 100,000-byte length prefix, then a byte at a time) is cut once the frame's
    /// deadline passes, however steadily it drips.
    #[test]
    fn a_dripping_frame_is_cut_at_its_deadline() {
        let (mut s, mut c) = pair();
        let mut frames = PacedFrames::new(1 << 20, FAST);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let t = std::thread::spawn(move || {
            let _ = c.write_all(&100_000u32.to_le_bytes());
            while !st.load(Ordering::Acquire) {
                if c.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let r = frames.next(&mut s, true);
        stop.store(true, Ordering::Release);
        let _ = t.join();
        assert!(matches!(r, Err(ReadError::TooSlow { len: 100_000, limit_ms: 400 })), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(1_500), "cut at the deadline");
    }

    #[test]
    fn an_idle_connection_is_closed_unless_replies_are_pending() {
        let (mut s, _c) = pair();
        let mut frames = PacedFrames::new(1 << 20, FAST);
        let started = Instant::now();
        // Replies pending: silence is the client waiting, not idleness.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let mut probe = PacedFrames::new(1 << 20, FAST);
            probe.last_frame = started;
            assert!(probe.check_deadlines(true).is_ok());
        }
        assert!(matches!(frames.next(&mut s, false), Err(ReadError::Idle { idle_ms: 300 })));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn an_oversized_length_is_refused_before_any_body_arrives() {
        let (mut s, mut c) = pair();
        let mut frames = PacedFrames::new(1024, FAST);
        c.write_all(&2048u32.to_le_bytes()).expect("write");
        assert!(matches!(frames.next(&mut s, false), Err(ReadError::TooLarge { len: 2048, limit: 1024 })));
    }
}
