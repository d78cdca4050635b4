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

mod frames;
mod reply;

pub use frames::{DRAIN_BYTES_MAX, DRAIN_MS, FRAME_GRACE_MS, FRAME_RATE_BYTES_PER_S_MIN, IDLE_TIMEOUT_MS};
pub use reply::{FrameReply, Submission, Waiter};

use crate::control::ReplicaControl;
use crate::forward::Forwarder;
use crate::node::NodeOptions;
use crate::status::StatusBoard;
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use frames::{drain, PacedFrames, Pacing, ReadError};
use parking_lot::Mutex;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::admin::{AdminOp, SignedAdmin};
use tally_codec::wire::{self, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, WireError};
use tally_codec::{encode, limits, ErrorCode, PublicKey, Tables};
use tally_failover::MembershipError;
use tally_net::Stream;
use tally_store::state::Store;

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
/// How often a blocked reader wakes to check its deadlines.
const READ_POLL_MS: u64 = 500;

/// What the client port is given by the wiring.
pub struct PortParts {
    pub opts: NodeOptions,
    pub store: Arc<Mutex<Store>>,
    pub submit_tx: Sender<Vec<Submission>>,
    pub status: Arc<StatusBoard>,
    pub control: ReplicaControl,
    pub forwarder: Arc<Forwarder>,
    pub watch: Arc<crate::watch::WatchService>,
    pub stopping: Arc<AtomicBool>,
}

/// The client port: what its connection threads use, and nothing another thread reaches into.
pub struct ClientPort {
    pub opts: NodeOptions,
    pub tables: Tables,
    operator_pub: PublicKey,
    /// The applied state: read here (documents, balances, receipts, scans), written by the
    /// replica thread's ledger.
    pub store: Arc<Mutex<Store>>,
    /// Stage 2's output, to the replica thread.
    submit_tx: Sender<Vec<Submission>>,
    /// Who leads, the members, how far the store is (published by the replica thread).
    pub status: Arc<StatusBoard>,
    /// Membership changes and read judgements, asked of the replica thread.
    control: ReplicaControl,
    /// Who may hold a connection (see [`tally_net::admission`]).
    pub admission: Arc<tally_net::Admission>,
    /// A follower's link to the leader for relayed frames.
    forwarder: Arc<Forwarder>,
    /// Decompressed, checked public keys (stage 2).
    keys: crate::validate::KeyCache,
    /// Admin commands taken and not yet expired (replay protection).
    admin_seen: crate::admin_replay::SeenAdmin,
    /// Watch serving: its own threads, limits and budgets (see [`crate::watch`]).
    watch: Arc<crate::watch::WatchService>,
    /// The admin scans' budget (see [`crate::queries::audit_page`]).
    pub audit: crate::queries::AuditGate,
    stopping: Arc<AtomicBool>,
}

impl ClientPort {
    pub fn new(parts: PortParts) -> ClientPort {
        let tables = *parts.store.lock().tables();
        ClientPort {
            operator_pub: PublicKey(parts.opts.operator_key.verifying_key().to_bytes()),
            opts: parts.opts,
            tables,
            store: parts.store,
            submit_tx: parts.submit_tx,
            status: parts.status,
            control: parts.control,
            admission: tally_net::Admission::new(tally_net::AdmissionLimits::CLIENT_PORT),
            forwarder: parts.forwarder,
            keys: crate::validate::KeyCache::default(),
            admin_seen: crate::admin_replay::SeenAdmin::default(),
            watch: parts.watch,
            audit: crate::queries::AuditGate::default(),
            stopping: parts.stopping,
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Starts the listener thread.
///
/// # Errors
/// When the thread cannot start.
pub fn start(port: &Arc<ClientPort>, listener: TcpListener) -> Result<(), String> {
    let port = port.clone();
    crate::node::spawn("listener", move || listen(&port, listener))
}

fn listen(port: &Arc<ClientPort>, listener: TcpListener) {
    for stream in listener.incoming() {
        if port.is_stopping() {
            return;
        }
        let Ok(stream) = stream else { continue };
        // The handshake pool cuts its oldest member when full; established connections are
        // judged once we know whether the peer is a replica of this cluster.
        let Ok(slot) = port.admission.admit(&stream) else { continue };
        let s = port.clone();
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
fn open(port: &ClientPort, tcp: TcpStream, slot: &tally_net::Admitted) -> Option<Stream> {
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let _ = tcp.set_nodelay(true);
    let stream = match &port.opts.client_tls {
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

fn serve(port: &Arc<ClientPort>, tcp: TcpStream, slot: &tally_net::Admitted) {
    let Some(stream) = open(port, tcp, slot) else { return };
    let peer = if stream.peer_is_cluster_node() { Peer::Replica } else { Peer::Client };
    if stream.tcp().set_read_timeout(Some(Duration::from_millis(READ_POLL_MS))).is_err() {
        return;
    }
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (out_tx, out_rx) = bounded::<Envelope<ServerMessage>>(OUTGOING_FRAMES_MAX);
    let peer_ip = stream.tcp().peer_addr().map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
    let watches = crate::watch::WatchConn::new(&port.watch, peer_ip);
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
                    Ok(env) => handle(port, env, &out_tx, peer, &watches),
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
    port: &Arc<ClientPort>,
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
        ClientMessage::Forwarded(_) if peer != Peer::Replica && port.opts.client_tls.is_some() => {
            let e = WireError::new(ErrorCode::NotAuthorized, "only a replica of this cluster may relay frames");
            let _ = out.try_send(Envelope { id, msg: ServerMessage::Error(e) });
            return;
        }
        // Served here or refused here: never relayed twice.
        ClientMessage::Forwarded(inner) => return answer(port, id, inner.into_client(), out, Hop::Relayed),
        msg => msg,
    };
    // A follower relays leader-only frames to the leader as they came; with no leader known,
    // the stages below answer NotLeader and the client retries.
    let leader = if leader_only(&msg) { port.status.leader_elsewhere() } else { None };
    match leader {
        Some(leader) if leader != port.opts.listen => match tally_codec::wire::Relayed::from_client(msg) {
            Ok(relayed) => {
                metrics::counter!("tally_forwarded_frames_total").increment(1);
                port.forwarder.forward(&leader, id, relayed, out);
            }
            Err(msg) => answer(port, id, msg, out, Hop::Direct),
        },
        _ => answer(port, id, msg, out, Hop::Direct),
    }
}

/// Whether a frame came from a client or was relayed by a follower (then it is never relayed
/// again).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    Direct,
    Relayed,
}

fn answer(port: &Arc<ClientPort>, id: u64, msg: ClientMessage, out: &Sender<Envelope<ServerMessage>>, hop: Hop) {
    let reply = match msg {
        ClientMessage::Forwarded(inner) => return answer(port, id, inner.into_client(), out, Hop::Relayed),
        ClientMessage::Submit(requests) => return submit(port, id, requests, out),
        ClientMessage::Status => ServerMessage::Status(status(port)),
        ClientMessage::Get { key, stale } => match read_barrier(port, stale) {
            Err(e) => ServerMessage::Error(e),
            Ok(()) => match port.store.lock().doc(&key) {
                Ok(d) => {
                    ServerMessage::Doc(d.map(|(m, value)| DocView { owner: m.owner, revision: m.revision, value }))
                }
                Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, format!("store read failed: {e}"))),
            },
        },
        ClientMessage::Balance { account, stale } => match read_barrier(port, stale) {
            Err(e) => ServerMessage::Error(e),
            Ok(()) => match port.store.lock().balance(&account) {
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
        ClientMessage::Admin(cmd) => admin(port, &cmd),
        ClientMessage::Batch { height } => ServerMessage::Batch(crate::queries::batch_info(port, height)),
        // `handle` gives watches to the watch threads; a relayed frame never holds one.
        ClientMessage::Watch { .. } => {
            ServerMessage::Error(WireError::new(ErrorCode::Malformed, "a watch is not relayed; ask any replica"))
        }
        ClientMessage::Receipt { id: rid } => match crate::queries::stored_receipt(port, &rid, None) {
            Some(r) => ServerMessage::Receipt(Some(Box::new(r))),
            // A replica that installed a snapshot lacks older receipts: ask the leader, once.
            None => match port.status.leader_elsewhere().filter(|l| hop == Hop::Direct && *l != port.opts.listen) {
                Some(leader) => {
                    port.forwarder.forward(&leader, id, tally_codec::wire::Relayed::Receipt { id: rid }, out);
                    return;
                }
                _ => ServerMessage::Receipt(None),
            },
        },
        ClientMessage::ReceiptAt { id: rid, height } => {
            match crate::queries::stored_receipt(port, &rid, Some(height)) {
                Some(r) => ServerMessage::Receipt(Some(Box::new(r))),
                None => match port.status.leader_elsewhere().filter(|l| hop == Hop::Direct && *l != port.opts.listen) {
                    Some(leader) => {
                        let relayed = tally_codec::wire::Relayed::ReceiptAt { id: rid, height };
                        port.forwarder.forward(&leader, id, relayed, out);
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
fn admin(port: &ClientPort, cmd: &SignedAdmin) -> ServerMessage {
    if let Err(refusal) = cmd.authorize(&port.opts.cluster_id, &port.opts.admin_keys, wall_ms()) {
        crate::measure::refused("admin", ErrorCode::NotAuthorized, 1);
        tally_net::warn_limited!("admin_refused", signer = %cmd.command.signer, %refusal, "admin command refused");
        return ServerMessage::Error(WireError::new(ErrorCode::NotAuthorized, refusal.to_string()));
    }
    let id = match port.admin_seen.claim(cmd, wall_ms()) {
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
    let reply = run_admin(port, cmd);
    // Refused for a reason that did nothing (not the leader, busy): the same bytes may come again.
    if matches!(&reply, ServerMessage::Error(e) if e.code.is_retryable()) {
        port.admin_seen.release(cmd, &id);
    }
    reply
}

/// Carries out an authorised admin command taken once.
fn run_admin(port: &ClientPort, cmd: &SignedAdmin) -> ServerMessage {
    match &cmd.command.op {
        AdminOp::ClusterAdd { node_id, client_addr, peer_addr } => {
            let m = tally_failover::Member {
                node_id: *node_id,
                client_addr: client_addr.clone(),
                peer_addr: peer_addr.clone(),
                is_voter: true,
                matched_index: 0,
            };
            membership_reply(port, port.control.add_member(m))
        }
        AdminOp::ClusterRemove { node_id } => membership_reply(port, port.control.remove_member(*node_id)),
        AdminOp::RevokeNode { node_id, cert_fingerprint } => {
            membership_reply(port, port.control.revoke_member(*node_id, *cert_fingerprint))
        }
        AdminOp::AuditPage { table, after, limit } => {
            match crate::queries::audit_page(port, *table, after.as_deref(), *limit) {
                Ok(p) => ServerMessage::AuditPage(p),
                Err(crate::queries::AuditError::Busy(b)) => ServerMessage::Busy(b),
                Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, e.to_string())),
            }
        }
    }
}

/// A refused membership change on a replica that is not (or no longer) the leader is retryable
/// at the leader; anything else names the failure.
fn membership_reply(port: &ClientPort, result: Result<(), MembershipError>) -> ServerMessage {
    match result {
        Ok(()) => ServerMessage::Done,
        Err(e) if e == MembershipError::NotLeader || !port.status.is_leader() => {
            let mut err = WireError::new(ErrorCode::NotLeader, format!("membership changes go to the leader: {e}"));
            err.leader_hint = port.status.leader_addr();
            ServerMessage::Error(err)
        }
        Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, e.to_string())),
    }
}

/// Stage 1 hands a frame's requests to stage 2, answers refusals at once, and queues the rest
/// for the sequencer. A full queue pushes back with `Overloaded` rather than growing memory.
fn submit(
    port: &Arc<ClientPort>,
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
    let results = crate::validate::validate_all_with(requests, &port.opts.cluster_id, now_ms, &port.keys);
    crate::measure::stage_time("validate", started);
    let (leading, leader_hint) = port.status.read(|s| (s.is_leader, s.leader_addr.clone()));
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
                waiter.refuse_not_leader(leader_hint.clone());
            }
            Ok(req) => subs.push(Submission { req, waiter }),
        }
    }
    crate::measure::refused("receive", ErrorCode::NotLeader, not_leader);
    if subs.is_empty() {
        return;
    }
    if let Err(e) = port.submit_tx.try_send(subs) {
        let (TrySendError::Full(subs) | TrySendError::Disconnected(subs)) = e;
        crate::measure::refused("receive", ErrorCode::Overloaded, subs.len() as u64);
        for s in subs {
            s.waiter.refuse(ErrorCode::Overloaded);
        }
    }
}

/// A linearizable read: only the leader, under its lease, once the store has applied
/// everything committed when the read arrived. `stale` reads skip all of that.
fn read_barrier(port: &ClientPort, stale: bool) -> Result<(), WireError> {
    if stale {
        return Ok(());
    }
    let read_index = match port.control.read_index() {
        Ok(index) => index,
        Err(mut e) => {
            if e.code == ErrorCode::NotLeader {
                e.leader_hint = port.status.leader_addr();
            }
            return Err(e);
        }
    };
    if !port.status.wait_applied_index(read_index, READ_WAIT) {
        return Err(WireError::new(ErrorCode::Overloaded, "store is behind the commit index; retry"));
    }
    Ok(())
}

/// The answer to `Status`: this replica's status board, as the wire carries it.
pub fn status(port: &ClientPort) -> StatusInfo {
    let s = port.status.snapshot();
    let mut warnings = Vec::new();
    if let Some(why) = &s.stopped {
        let what = why.code().name();
        warnings.push(format!(
            "{what}: this replica stopped writing ({why}); it stepped down and serves no writes until it is restarted"
        ));
    }
    if s.leader_id.is_none() {
        warnings.push("no leader known; writes wait until one is elected".into());
    }
    for (node, version) in &s.older_peers {
        warnings.push(format!(
            "node {node} speaks peer protocol {version} (an older release): the cluster runs mixed releases \
             until it is upgraded; `tally cluster revoke-node` waits until then"
        ));
    }
    StatusInfo {
        node_id: s.node_id,
        cluster_id: port.opts.cluster_id,
        operator_key: port.operator_pub,
        leader_id: s.leader_id,
        leader_addr: s.leader_addr,
        term: s.term,
        committed_height: s.committed.height,
        applied_height: s.applied.height,
        // The voters now (membership changes), never fewer than the replicas configured at
        // creation while this replica doesn't know the configuration yet.
        replicas_configured: u32::try_from(s.voters.len()).unwrap_or(u32::MAX).max(1),
        members: s
            .members
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
