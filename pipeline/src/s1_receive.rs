//! Stage 1: receive. Each client connection gets a reader thread (decode, then stage 2 on the
//! rayon pool) and a writer thread (encode replies in the order they complete). A bad frame gets
//! an error reply naming the problem; only a frame that breaks the framing itself (oversized or
//! truncated) closes that one connection. Other clients never notice.

use crate::node::{FrameReply, Shared, Submission, Waiter};
use crossbeam::channel::{bounded, Receiver, Sender, TrySendError};
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tally_codec::wire::{self, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, WireError};
use tally_codec::{encode, limits, ErrorCode};

/// Concurrent client connections, at most.
pub const CONNECTIONS_MAX: usize = 1024;
/// Replies queued for one connection's writer, at most.
pub const OUTGOING_FRAMES_MAX: usize = 4096;
/// How long a linearizable read waits for the store to catch up with the commit index.
pub const READ_WAIT: Duration = Duration::from_secs(5);

pub fn listen(shared: Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        if shared.is_stopping() {
            return;
        }
        let Ok(stream) = stream else { continue };
        if shared.connections.load(Ordering::Acquire) >= CONNECTIONS_MAX {
            let mut s = stream;
            let e = Envelope {
                id: 0,
                msg: ServerMessage::Error(WireError::new(ErrorCode::Overloaded, "too many connections")),
            };
            let _ = wire::write_frame(&mut s, &encode(&e));
            continue;
        }
        shared.connections.fetch_add(1, Ordering::AcqRel);
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name("conn".into()).spawn(move || {
            serve(&s, stream);
            s.connections.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn serve(shared: &Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else { return };
    let (out_tx, out_rx) = bounded::<Envelope<ServerMessage>>(OUTGOING_FRAMES_MAX);
    let writer = std::thread::Builder::new().name("conn-writer".into()).spawn(move || write_loop(write_half, out_rx));
    let Ok(writer) = writer else { return };
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let mut buf = Vec::new();
    loop {
        match wire::read_frame(&mut reader, &mut buf, limits::FRAME_BYTES_MAX) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                // The framing is lost: say why, then close this connection only.
                let _ = out_tx.send(error_reply(0, ErrorCode::Malformed, format!("bad frame: {e}")));
                break;
            }
        }
        match wire::decode_client(&buf) {
            Ok(env) => handle(shared, env, &out_tx),
            Err(e) => {
                metrics::counter!("tally_bad_frames_total").increment(1);
                let _ = out_tx.send(error_reply(0, ErrorCode::Malformed, format!("bad frame: {e}")));
            }
        }
    }
    drop(out_tx);
    let _ = writer.join();
}

fn write_loop(stream: TcpStream, rx: Receiver<Envelope<ServerMessage>>) {
    let mut w = BufWriter::with_capacity(1 << 16, stream);
    while let Ok(env) = rx.recv() {
        if wire::write_frame(&mut w, &encode(&env)).is_err() {
            return;
        }
        // Coalesce whatever else is ready into one flush.
        while let Ok(env) = rx.try_recv() {
            if wire::write_frame(&mut w, &encode(&env)).is_err() {
                return;
            }
        }
        if w.flush().is_err() {
            return;
        }
    }
    let _ = w.flush();
    if let Ok(s) = w.into_inner() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

fn error_reply(id: u64, code: ErrorCode, message: String) -> Envelope<ServerMessage> {
    Envelope { id, msg: ServerMessage::Error(WireError::new(code, message)) }
}

/// Whether this frame is served by the leader only (writes, linearizable reads).
fn leader_only(msg: &ClientMessage) -> bool {
    match msg {
        ClientMessage::Submit(_) | ClientMessage::ClusterAdd { .. } | ClientMessage::ClusterRemove { .. } => true,
        ClientMessage::Get { stale, .. } | ClientMessage::Balance { stale, .. } => !stale,
        _ => false,
    }
}

fn handle(shared: &Arc<Shared>, env: Envelope<ClientMessage>, out: &Sender<Envelope<ServerMessage>>) {
    let id = env.id;
    let msg = match env.msg {
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
        ClientMessage::Audit => match crate::s7_signatures::audit(shared) {
            Ok(a) => ServerMessage::Audit(a),
            Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, e)),
        },
        ClientMessage::Batch { height } => ServerMessage::Batch(crate::s7_signatures::batch_info(shared, height)),
        ClientMessage::Receipt { id: rid } => match crate::s7_signatures::stored_receipt(shared, &rid) {
            Some(r) => ServerMessage::Receipt(Some(r)),
            // A replica that installed a snapshot lacks older receipts: ask the leader, once.
            None => match shared.leader_addr().filter(|l| hop == Hop::Direct && *l != shared.opts.listen) {
                Some(leader) if !shared.replicator().role().is_leader => {
                    shared.forwarder.forward(&leader, id, tally_codec::wire::Relayed::Receipt { id: rid }, out);
                    return;
                }
                _ => ServerMessage::Receipt(None),
            },
        },
        ClientMessage::ClusterAdd { node_id, client_addr, peer_addr } => {
            let m = tally_failover::Member { node_id, client_addr, peer_addr, is_voter: true, matched_index: 0 };
            membership_reply(shared, shared.replicator().add_member(m))
        }
        ClientMessage::ClusterRemove { node_id } => {
            membership_reply(shared, shared.replicator().remove_member(node_id))
        }
    };
    let _ = out.try_send(Envelope { id, msg: reply });
}

/// A refused membership change on a replica that is not (or no longer) the leader is retryable
/// at the leader; anything else names the failure.
fn membership_reply(shared: &Shared, result: Result<(), String>) -> ServerMessage {
    match result {
        Ok(()) => ServerMessage::Done,
        Err(e) if !shared.replicator().role().is_leader => {
            let mut err = WireError::new(ErrorCode::NotLeader, format!("membership changes go to the leader: {e}"));
            err.leader_hint = shared.leader_addr();
            ServerMessage::Error(err)
        }
        Err(e) => ServerMessage::Error(WireError::new(ErrorCode::Internal, e)),
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
    let results = crate::s2_validate::validate_all_with(requests, &shared.opts.cluster_id, now_ms, &shared.keys);
    metrics::histogram!("tally_stage2_validate_ms").record(started.elapsed().as_secs_f64() * 1e3);
    let leading = shared.replicator().role().is_leader;
    let mut subs = Vec::with_capacity(n);
    for (slot, r) in results.into_iter().enumerate() {
        let waiter = Waiter { frame: frame.clone(), slot };
        match r {
            Err(code) => {
                metrics::counter!("tally_refused_total", "stage" => "validate").increment(1);
                waiter.refuse(code);
            }
            Ok(_) if !leading => waiter.refuse_not_leader(shared),
            Ok(req) => subs.push(Submission { req, waiter }),
        }
    }
    if subs.is_empty() {
        return;
    }
    if let Err(e) = shared.seq_tx.try_send(subs) {
        let (TrySendError::Full(subs) | TrySendError::Disconnected(subs)) = e;
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
    let r = shared.replicator();
    let role = r.role();
    if !role.is_leader || !r.lease_valid() {
        let mut e = WireError::new(
            ErrorCode::NotLeader,
            "not the leader (or lease expired); read from the leader or use --stale",
        );
        e.leader_hint = shared.leader_addr();
        return Err(e);
    }
    let read_index = role.commit_index.max(shared.committed().index);
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
        replicas_configured: shared.opts.replicas_configured,
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
