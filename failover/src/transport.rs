//! Peer transport: Raft messages between replicas.
//!
//! ```text
//!  raft thread ──send(msg)──▶ per-peer bounded queue ──▶ outbound thread ──TCP──▶ peer listener
//!                             (full: drop; Raft resends)  connect+handshake,      │ reader thread
//!                                                         reconnect w/ backoff    ▼ per connection
//!  raft thread ◀──────────────── inbox (bounded; full: drop) ◀── decode, check from/to
//! ```
//!
//! Each direction of a link is its own connection: a replica writes only on connections it
//! dialled and reads only on ones it accepted. Frames are `u32-le len ‖ protobuf(Message)`,
//! bounded by [`FRAME_BYTES_MAX`]. Bytes that do not decode close the connection; nothing a
//! peer sends can panic this side.

use crate::frame::{read_frame, write_frame};
use crate::handshake::{handshake, HandshakeError, Hello};
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;
use protobuf::Message as PbMessage;
use raft::eraftpb::Message;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tally_codec::limits::FRAME_BYTES_MAX;

/// Messages queued per peer before new ones are dropped.
pub const OUTBOUND_MESSAGES_MAX: usize = 1024;
/// Messages written before one flush.
const WRITE_BATCH_MAX: usize = 256;
/// Accepted connections held at once.
pub const INBOUND_CONNECTIONS_MAX: usize = 64;
const RECONNECT_BACKOFF_MS_MIN: u64 = 50;
const RECONNECT_BACKOFF_MS_MAX: u64 = 2_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
const HANDSHAKE_TIMEOUT_MS: u64 = 3_000;
const WRITE_TIMEOUT_MS: u64 = 5_000;
/// How often idle threads look at the stop flag.
const POLL_MS: u64 = 50;

/// How the raft loop reaches its peers. The simulator substitutes an in-memory network.
pub trait Transport: Send {
    /// Queues `msg` for `msg.to`. Returns false when it was dropped (no route or queue full);
    /// Raft retransmits.
    fn send(&mut self, msg: Message) -> bool;
    /// The peers' replication addresses (this node excluded). Links to others are closed.
    fn set_peers(&mut self, peers: &BTreeMap<u64, String>);
    /// Closes every link and joins the threads.
    fn stop(&mut self);
}

struct OutLink {
    addr: String,
    tx: Sender<Message>,
    thread: JoinHandle<()>,
}

type InboundConns = Arc<Mutex<HashMap<u64, (TcpStream, Option<JoinHandle<()>>)>>>;

/// TCP implementation of [`Transport`].
pub struct TcpTransport {
    local: Hello,
    stop: Arc<AtomicBool>,
    links: HashMap<u64, OutLink>,
    listener: Option<JoinHandle<()>>,
    inbound: InboundConns,
}

impl TcpTransport {
    /// Starts accepting on `listener`; received messages go to `inbox`.
    ///
    /// # Errors
    /// When the listener cannot be configured or its thread cannot start.
    pub fn start(listener: TcpListener, local: Hello, inbox: Sender<Message>) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let inbound: InboundConns = Arc::new(Mutex::new(HashMap::new()));
        let (l_stop, l_inbound, l_local) = (stop.clone(), inbound.clone(), local.clone());
        let thread = std::thread::Builder::new()
            .name(format!("peer-listen-{}", local.node_id))
            .spawn(move || run_listener(listener, l_local, inbox, l_stop, l_inbound))?;
        Ok(TcpTransport { local, stop, links: HashMap::new(), listener: Some(thread), inbound })
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, msg: Message) -> bool {
        let Some(link) = self.links.get(&msg.to) else {
            tracing::debug!(to = msg.to, "no address for peer; message dropped");
            return false;
        };
        match link.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn set_peers(&mut self, peers: &BTreeMap<u64, String>) {
        let stale: Vec<u64> =
            self.links.iter().filter(|(id, l)| peers.get(id) != Some(&l.addr)).map(|(id, _)| *id).collect();
        for id in stale {
            if let Some(link) = self.links.remove(&id) {
                drop(link.tx); // the thread ends at its next poll
                let _ = link.thread.join();
            }
        }
        for (id, addr) in peers {
            if *id == self.local.node_id || self.links.contains_key(id) {
                continue;
            }
            let (tx, rx) = bounded(OUTBOUND_MESSAGES_MAX);
            let (peer, a, local, stop) = (*id, addr.clone(), self.local.clone(), self.stop.clone());
            match std::thread::Builder::new()
                .name(format!("peer-out-{}-{}", self.local.node_id, id))
                .spawn(move || run_outbound(peer, a, local, rx, stop))
            {
                Ok(thread) => {
                    self.links.insert(*id, OutLink { addr: addr.clone(), tx, thread });
                }
                Err(e) => tracing::error!(peer = id, error = %e, "cannot start peer link thread"),
            }
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, link) in self.links.drain() {
            drop(link.tx);
            let _ = link.thread.join();
        }
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        let conns: Vec<_> = self.inbound.lock().drain().collect();
        for (_, (stream, thread)) in conns {
            let _ = stream.shutdown(Shutdown::Both);
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sleep_unless_stopped(ms: u64, stop: &AtomicBool) {
    let mut left = ms;
    while left > 0 && !stop.load(Ordering::Relaxed) {
        let step = left.min(POLL_MS);
        std::thread::sleep(Duration::from_millis(step));
        left -= step;
    }
}

/// Why a link could not be set up.
enum LinkError {
    /// Network trouble: retried quietly.
    Down(String),
    /// The handshake refused the link (wrong cluster, configuration, node): logged as an error.
    Refused(String),
}

fn connect(addr: &str, local: &Hello, peer: u64) -> Result<TcpStream, LinkError> {
    let down = |e: String| LinkError::Down(e);
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| down(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| down(format!("{addr} resolves to no address")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_millis(CONNECT_TIMEOUT_MS))
        .map_err(|e| down(format!("connect to {addr}: {e}")))?;
    let _ = s.set_nodelay(true);
    let t = Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS));
    s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)).map_err(|e| down(e.to_string()))?;
    match handshake(&mut s, local, Some(peer)) {
        Ok(_) => {}
        Err(e @ (HandshakeError::RefusedByUs(_) | HandshakeError::RefusedByPeer(_))) => {
            return Err(LinkError::Refused(format!("handshake with node {peer} at {addr}: {e}")))
        }
        Err(e) => return Err(down(format!("handshake with {addr}: {e}"))),
    }
    s.set_read_timeout(None).map_err(|e| down(e.to_string()))?;
    s.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS))).map_err(|e| down(e.to_string()))?;
    Ok(s)
}

fn write_message<W: Write>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    let bytes = msg.write_to_bytes().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if bytes.len() > FRAME_BYTES_MAX {
        tracing::warn!(to = msg.to, bytes = bytes.len(), "raft message over the frame limit; dropped");
        return Ok(());
    }
    write_frame(w, &bytes)
}

fn run_outbound(peer: u64, addr: String, local: Hello, rx: Receiver<Message>, stop: Arc<AtomicBool>) {
    let mut conn: Option<BufWriter<TcpStream>> = None;
    let mut backoff_ms = RECONNECT_BACKOFF_MS_MIN;
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let first = match rx.recv_timeout(Duration::from_millis(POLL_MS)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if conn.is_none() {
            match connect(&addr, &local, peer) {
                Ok(s) => {
                    tracing::info!(peer, %addr, "peer link up");
                    conn = Some(BufWriter::new(s));
                    backoff_ms = RECONNECT_BACKOFF_MS_MIN;
                    last_error = None;
                }
                Err(e) => {
                    let (refused, text) = match e {
                        LinkError::Refused(t) => (true, t),
                        LinkError::Down(t) => (false, t),
                    };
                    // Logged once per distinct reason, not on every retry.
                    if last_error.as_deref() != Some(text.as_str()) {
                        if refused {
                            tracing::error!(peer, %addr, reason = %text, "peer link refused");
                        } else {
                            tracing::warn!(peer, %addr, reason = %text, "peer link down");
                        }
                        last_error = Some(text);
                    }
                    sleep_unless_stopped(backoff_ms, &stop);
                    backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
                    continue;
                }
            }
        }
        let Some(w) = conn.as_mut() else { continue };
        let mut r = write_message(w, &first);
        for _ in 0..WRITE_BATCH_MAX {
            if r.is_err() {
                break;
            }
            match rx.try_recv() {
                Ok(m) => r = write_message(w, &m),
                Err(_) => break,
            }
        }
        if let Err(e) = r.and_then(|()| w.flush()) {
            tracing::warn!(peer, %addr, error = %e, "peer link write failed; reconnecting");
            conn = None;
        }
    }
}

fn run_listener(
    listener: TcpListener,
    local: Hello,
    inbox: Sender<Message>,
    stop: Arc<AtomicBool>,
    conns: InboundConns,
) {
    let next_id = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) {
        let (stream, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(POLL_MS / 5));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                std::thread::sleep(Duration::from_millis(POLL_MS));
                continue;
            }
        };
        if conns.lock().len() >= INBOUND_CONNECTIONS_MAX {
            tracing::warn!(%from, "too many peer connections; closing the new one");
            continue;
        }
        let Ok(clone) = stream.try_clone() else { continue };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let (l, ib, cs) = (local.clone(), inbox.clone(), conns.clone());
        // Register before the thread can deregister itself.
        let mut guard = conns.lock();
        guard.insert(id, (clone, None));
        match std::thread::Builder::new()
            .name(format!("peer-in-{}-{id}", local.node_id))
            .spawn(move || run_inbound(stream, from, l, ib, cs, id))
        {
            Ok(t) => {
                if let Some(e) = guard.get_mut(&id) {
                    e.1 = Some(t);
                }
            }
            Err(e) => {
                guard.remove(&id);
                tracing::error!(error = %e, "cannot start peer reader thread");
            }
        }
    }
}

fn run_inbound(mut s: TcpStream, from: SocketAddr, local: Hello, inbox: Sender<Message>, conns: InboundConns, id: u64) {
    read_messages(&mut s, from, &local, &inbox);
    let _ = s.shutdown(Shutdown::Both);
    conns.lock().remove(&id);
}

fn read_messages(s: &mut TcpStream, from: SocketAddr, local: &Hello, inbox: &Sender<Message>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let t = Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS));
    if s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)).is_err() {
        return;
    }
    let peer = match handshake(s, local, None) {
        Ok(h) => h,
        Err(HandshakeError::RefusedByUs(r)) => {
            tracing::error!(%from, reason = %r, "refused peer connection");
            return;
        }
        Err(e) => {
            tracing::warn!(%from, error = %e, "peer handshake failed");
            return;
        }
    };
    if s.set_read_timeout(None).is_err() {
        return;
    }
    tracing::debug!(%from, node = peer.node_id, "peer connected");
    let mut r = std::io::BufReader::new(s);
    loop {
        let bytes = match read_frame(&mut r, FRAME_BYTES_MAX) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Err(e) => {
                tracing::warn!(%from, node = peer.node_id, error = %e, "peer read failed; closing");
                return;
            }
        };
        let msg = match Message::parse_from_bytes(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%from, node = peer.node_id, error = %e, "undecodable raft message; closing");
                return;
            }
        };
        if msg.from != peer.node_id || msg.to != local.node_id {
            tracing::warn!(%from, node = peer.node_id, msg_from = msg.from, msg_to = msg.to, "misaddressed raft message; closing");
            return;
        }
        match inbox.try_send(msg) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::MessageType;

    fn msg(from: u64, to: u64, term: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = from;
        m.to = to;
        m.term = term;
        m
    }

    fn start(node: u64, cluster: &str) -> (TcpTransport, String, Receiver<Message>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let (tx, rx) = bounded(64);
        let t = TcpTransport::start(l, Hello::new(cluster, node, [1; 32]), tx).expect("start");
        (t, addr, rx)
    }

    #[test]
    fn messages_flow_both_ways() {
        let (mut a, a_addr, a_rx) = start(1, "c");
        let (mut b, b_addr, b_rx) = start(2, "c");
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        b.set_peers(&[(1, a_addr)].into_iter().collect());
        assert!(a.send(msg(1, 2, 5)));
        assert!(b.send(msg(2, 1, 6)));
        assert_eq!(b_rx.recv_timeout(Duration::from_secs(5)).expect("b got").term, 5);
        assert_eq!(a_rx.recv_timeout(Duration::from_secs(5)).expect("a got").term, 6);
        a.stop();
        b.stop();
    }

    #[test]
    fn wrong_cluster_gets_nothing_through() {
        let (mut a, _a_addr, _a_rx) = start(1, "c");
        let (mut b, b_addr, b_rx) = start(2, "other");
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        for _ in 0..5 {
            a.send(msg(1, 2, 5));
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(b_rx.recv_timeout(Duration::from_millis(300)).is_err());
        a.stop();
        b.stop();
    }

    #[test]
    fn garbage_closes_the_connection_without_panic() {
        let (mut b, b_addr, b_rx) = start(2, "c");
        let mut s = TcpStream::connect(&b_addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        handshake(&mut s, &Hello::new("c", 1, [1; 32]), Some(2)).expect("handshake");
        write_frame(&mut s, &[0xff; 64]).expect("write");
        // Also a frame over the bound: the reader closes before allocating it.
        let _ = s.write_all(&u32::MAX.to_le_bytes());
        let mut buf = [0u8; 1];
        let closed = matches!(std::io::Read::read(&mut s, &mut buf), Ok(0) | Err(_));
        assert!(closed, "the peer closes a connection that sent garbage");
        assert!(b_rx.try_recv().is_err());
        b.stop();
    }
}
