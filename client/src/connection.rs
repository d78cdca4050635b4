//! One TCP connection to one node, with many frames in flight.
//!
//! ```text
//!  caller ─send(msg)─▶ [writer mutex] ─frame─▶ node
//!     ▲                                          │
//!     └─ PendingReply ◀─ pending[id] ◀─ reader thread ◀─frame (any order)
//! ```
//! Replies are routed by `Envelope.id`, so they may come back out of order. When the connection
//! fails, every waiting caller is woken with an error at once (the reader drops their senders).

use crate::error::ClientError;
use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tally_codec::limits;
use tally_codec::wire::{self, ClientMessage, Envelope, ServerMessage, WireError};
use tally_net::{Dial, Stream};

/// How long opening a connection may take before the node counts as unreachable.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Default time to wait for one reply; a batch commits in ~100 ms, so this is generous.
pub const CALL_TIMEOUT_MS: u64 = 10_000;
/// A write that blocks this long means the node stopped reading.
const WRITE_TIMEOUT_MS: u64 = 10_000;
/// After a failed write, how long to wait for the node's closing explanation to be read.
const CLOSE_EXPLANATION_WAIT_MS: u64 = 200;

type PendingMap = Mutex<HashMap<u64, Sender<ServerMessage>>>;

/// State shared by callers and the reader thread.
struct Shared {
    addr: String,
    pending: PendingMap,
    /// Set (under the `pending` lock) once the reader stopped; nothing new may register after.
    closed: AtomicBool,
    /// Why the reader stopped, for error messages.
    close_reason: Mutex<Option<String>>,
    /// The node's own explanation: an error frame not addressed to any request (id 0), which
    /// a node sends just before it closes a connection it will not serve.
    server_reason: Mutex<Option<WireError>>,
}

/// A framed connection to one node. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Connection {
    shared: Arc<Shared>,
    writer: Mutex<BufWriter<Stream>>,
    stream: Stream,
    next_id: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// A reply not yet received. Waiting is bounded; dropping it forgets the request.
pub struct PendingReply {
    id: u64,
    rx: Receiver<ServerMessage>,
    shared: Arc<Shared>,
}

impl PendingReply {
    /// The receiver, for callers that `select` over several frames (the bench).
    pub fn receiver(&self) -> &Receiver<ServerMessage> {
        &self.rx
    }

    /// Blocks until the reply arrives, the connection fails, or `timeout` passes.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or [`ClientError::Closed`]/[`ClientError::Io`] when the
    /// connection failed before the reply came.
    pub fn wait(self, timeout: Duration) -> Result<ServerMessage, ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(msg) => Ok(msg),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.pending.lock().remove(&self.id);
                Err(ClientError::Timeout { addr: self.shared.addr.clone(), timeout_ms: timeout.as_millis() as u64 })
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.shared.closed_error()),
        }
    }

    /// Turns a receive result from a `select` into the same errors as [`PendingReply::wait`].
    ///
    /// # Errors
    /// [`ClientError::Closed`] or [`ClientError::Io`] when the connection failed.
    pub fn finish(self, received: Result<ServerMessage, channel::RecvError>) -> Result<ServerMessage, ClientError> {
        received.map_err(|_| self.shared.closed_error())
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        // A reply that is no longer awaited must not keep a map slot forever.
        self.shared.pending.lock().remove(&self.id);
    }
}

impl Shared {
    fn closed_error(&self) -> ClientError {
        if let Some(reason) = self.server_reason.lock().clone() {
            return ClientError::ClosedBy { addr: self.addr.clone(), reason };
        }
        match self.close_reason.lock().clone() {
            Some(reason) => ClientError::Io { addr: self.addr.clone(), source: std::io::Error::other(reason) },
            None => ClientError::Closed { addr: self.addr.clone() },
        }
    }
}

impl Connection {
    /// Connects with the default connect timeout.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when no address of `addr` accepts within the timeout.
    pub fn connect(addr: &str) -> Result<Connection, ClientError> {
        Self::connect_timeout(addr, Duration::from_millis(CONNECT_TIMEOUT_MS))
    }

    /// Connects, trying each resolved address of `addr` in turn.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when no address accepts within `timeout`.
    pub fn connect_timeout(addr: &str, timeout: Duration) -> Result<Connection, ClientError> {
        Self::connect_with(addr, &Dial::Plain, timeout)
    }

    /// Connects through `dial` (TLS checked against the cluster CA, or plaintext).
    ///
    /// # Errors
    /// [`ClientError::Connect`] when no address accepts, or the TLS handshake fails (a server
    /// that is not of this cluster, or that does not speak TLS).
    pub fn connect_with(addr: &str, dial: &Dial, timeout: Duration) -> Result<Connection, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_string(), source };
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing");
        for sa in addrs {
            match TcpStream::connect_timeout(&sa, timeout) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let stream = dial.open(tcp, std::time::Instant::now() + timeout).map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("TLS handshake failed: {e} (is this a node of the cluster whose CA you gave?)"),
                        )
                    });
                    return stream.and_then(|s| Self::from_stream(addr, s)).map_err(connect_err);
                }
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }

    fn from_stream(addr: &str, stream: Stream) -> std::io::Result<Connection> {
        stream.tcp().set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)))?;
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            server_reason: Mutex::new(None),
        });
        let read_half = stream.clone();
        let writer = BufWriter::with_capacity(256 * 1024, stream.clone());
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name(format!("tally-conn-{addr}"))
            .spawn(move || reader_loop(read_half, &reader_shared))?;
        Ok(Connection {
            shared,
            writer: Mutex::new(writer),
            stream,
            next_id: AtomicU64::new(1),
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The address this connection was opened to (as given, not resolved).
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// Whether the reader has stopped; a closed connection never recovers.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Sends one frame and returns at once, so callers can keep many frames in flight.
    ///
    /// # Errors
    /// [`ClientError::Closed`] or [`ClientError::Io`] when the frame could not be written.
    pub fn send(&self, msg: ClientMessage) -> Result<PendingReply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel::bounded(1);
        {
            let mut pending = self.shared.pending.lock();
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.shared.closed_error());
            }
            pending.insert(id, tx);
        }
        // Registered first, so the reply can't race past us; the guard unregisters on failure.
        let reply = PendingReply { id, rx, shared: self.shared.clone() };
        let body = tally_codec::encode(&Envelope { id, msg });
        let mut w = self.writer.lock();
        let written = wire::write_frame(&mut *w, &body).and_then(|()| w.flush());
        drop(w);
        if let Err(source) = written {
            // The node may have said why it is closing: give its reader a moment to read that.
            let until = std::time::Instant::now() + Duration::from_millis(CLOSE_EXPLANATION_WAIT_MS);
            while !self.is_closed() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.close();
            if self.shared.server_reason.lock().is_some() {
                return Err(self.shared.closed_error());
            }
            return Err(ClientError::Io { addr: self.shared.addr.clone(), source });
        }
        Ok(reply)
    }

    /// Sends one message and waits for its reply.
    ///
    /// # Errors
    /// See [`Connection::send`] and [`PendingReply::wait`].
    pub fn call_timeout(&self, msg: ClientMessage, timeout: Duration) -> Result<ServerMessage, ClientError> {
        self.send(msg)?.wait(timeout)
    }

    /// [`Connection::call_timeout`] with the default timeout.
    ///
    /// # Errors
    /// See [`Connection::call_timeout`].
    pub fn call(&self, msg: ClientMessage) -> Result<ServerMessage, ClientError> {
        self.call_timeout(msg, Duration::from_millis(CALL_TIMEOUT_MS))
    }

    /// Closes the socket; every waiting caller gets an error at once. Used when the client moves
    /// to another node, so in-flight operations are retried there instead of waiting out a timeout.
    pub fn close(&self) {
        let _ = self.stream.tcp().shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
        if let Some(handle) = self.reader.lock().take() {
            let _ = handle.join();
        }
    }
}

/// Routes replies to waiting callers until the stream ends, then fails everyone still waiting.
fn reader_loop(stream: Stream, shared: &Shared) {
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut buf = Vec::new();
    let reason = loop {
        match wire::read_frame(&mut reader, &mut buf, limits::FRAME_BYTES_MAX) {
            Ok(false) => break None,
            Ok(true) => {}
            Err(e) => break Some(e.to_string()),
        }
        let env = match wire::decode_server(&buf) {
            Ok(env) => env,
            Err(e) => break Some(format!("undecodable reply: {e}")),
        };
        if let (0, ServerMessage::Error(e)) = (env.id, &env.msg) {
            // Request ids start at 1: this is about the connection itself.
            *shared.server_reason.lock() = Some(e.clone());
            continue;
        }
        let tx = shared.pending.lock().remove(&env.id);
        match tx {
            // The caller may have given up (timeout); a failed send is fine.
            Some(tx) => {
                let _ = tx.try_send(env.msg);
            }
            None => tracing::debug!(addr = %shared.addr, id = env.id, "reply for no waiting request"),
        }
    };
    *shared.close_reason.lock() = reason;
    let mut pending = shared.pending.lock();
    shared.closed.store(true, Ordering::Release);
    // Dropping the senders wakes every waiter with `Disconnected`.
    pending.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use tally_codec::wire::{ServerMessage, StatusInfo};
    use tally_codec::{ClusterId, PublicKey};

    /// A fake node: reads `n` frames, then answers them in reverse order (Balance(id)).
    fn reversing_server(n: usize) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for _ in 0..n {
                assert!(wire::read_frame(&mut s, &mut buf, limits::FRAME_BYTES_MAX).expect("read"));
                let env = wire::decode_client(&buf).expect("decode");
                got.push(env.id);
            }
            for id in got.into_iter().rev() {
                let body = tally_codec::encode(&Envelope { id, msg: ServerMessage::Balance(Some(id)) });
                wire::write_frame(&mut s, &body).expect("write");
            }
            // Keep the socket open until the client hangs up.
            let _ = wire::read_frame(&mut s, &mut buf, limits::FRAME_BYTES_MAX);
        });
        (addr, h)
    }

    /// A node that refuses the connection with an explanation (id 0) and closes: the waiting
    /// caller gets that explanation, not a bare "closed".
    #[test]
    fn a_closing_nodes_explanation_reaches_the_caller() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let why = tally_codec::wire::WireError::new(tally_codec::ErrorCode::Malformed, "this port requires TLS");
            let body = tally_codec::encode(&Envelope { id: 0, msg: ServerMessage::Error(why) });
            wire::write_frame(&mut s, &body).expect("write");
            let mut buf = Vec::new();
            let _ = wire::read_frame(&mut s, &mut buf, limits::FRAME_BYTES_MAX);
        });
        let conn = Connection::connect(&addr).expect("connect");
        let err = conn.call_timeout(ClientMessage::Status, Duration::from_secs(5)).expect_err("refused");
        assert!(
            matches!(&err, ClientError::ClosedBy { reason, .. } if reason.message == "this port requires TLS"),
            "{err}"
        );
        assert!(err.is_transport());
        h.join().expect("server");
    }

    #[test]
    fn pipelined_frames_get_their_own_out_of_order_replies() {
        let (addr, h) = reversing_server(8);
        let conn = Connection::connect(&addr).expect("connect");
        let pending: Vec<PendingReply> = (0..8).map(|_| conn.send(ClientMessage::Status).expect("send")).collect();
        for p in pending {
            let id = p.id;
            let reply = p.wait(Duration::from_secs(5)).expect("reply");
            assert_eq!(reply, ServerMessage::Balance(Some(id)));
        }
        drop(conn);
        h.join().expect("server");
    }

    #[test]
    fn silent_server_times_out_and_closed_server_fails_waiters() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (hang_tx, hang_rx) = channel::bounded::<()>(1);
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let _ = hang_rx.recv_timeout(Duration::from_secs(10));
            drop(s);
        });
        let conn = Connection::connect(&addr).expect("connect");
        let err = conn.call_timeout(ClientMessage::Status, Duration::from_millis(100)).expect_err("timeout");
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        let waiting = conn.send(ClientMessage::Status).expect("send");
        hang_tx.send(()).expect("signal");
        let started = std::time::Instant::now();
        let err = waiting.wait(Duration::from_secs(5)).expect_err("closed");
        assert!(err.is_transport(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4), "waiter was not woken by the close");
        h.join().expect("server");
        // A dead connection refuses new work instead of hanging.
        std::thread::sleep(Duration::from_millis(50));
        assert!(conn.is_closed());
        assert!(conn.send(ClientMessage::Status).is_err());
    }

    #[test]
    fn connect_to_closed_port_fails_quickly() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let err = Connection::connect(&addr).err().expect("refused");
        assert!(matches!(err, ClientError::Connect { .. }));
        assert!(err.to_string().contains(&addr));
    }

    #[test]
    fn status_round_trip_through_fake_server() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = Vec::new();
            while let Ok(true) = wire::read_frame(&mut s, &mut buf, limits::FRAME_BYTES_MAX) {
                let env = wire::decode_client(&buf).expect("decode");
                let info = StatusInfo {
                    node_id: 1,
                    cluster_id: ClusterId([1; 16]),
                    operator_key: PublicKey([2; 32]),
                    leader_id: Some(1),
                    leader_addr: None,
                    term: 3,
                    committed_height: 0,
                    applied_height: 0,
                    replicas_configured: 1,
                    members: vec![],
                    warnings: vec![],
                    time_ms: 0,
                };
                let body = tally_codec::encode(&Envelope { id: env.id, msg: ServerMessage::Status(info) });
                wire::write_frame(&mut s, &body).expect("write");
            }
        });
        let conn = Connection::connect(&addr).expect("connect");
        for _ in 0..3 {
            match conn.call(ClientMessage::Status).expect("call") {
                ServerMessage::Status(s) => assert_eq!(s.term, 3),
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(conn);
        h.join().expect("server");
    }
}
