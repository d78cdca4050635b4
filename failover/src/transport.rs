//! Peer transport: Raft messages between replicas.
//!
//! ```text
//!  raft thread ──send(msg)──▶ per-peer bounded queue ──▶ outbound thread ──TCP──▶ peer listener
//!                             (full: drop; Raft resends)  connect+handshake,      │ reader thread
//!                                                         reconnect w/ backoff    ▼ per connection
//!  raft thread ◀──────────────── inbox (bounded; full: drop) ◀── decode, check from/to
//! ```
//!
//! Each direction of a link is its own connection: a replica writes Raft traffic only on
//! connections it dialled and reads it only on ones it accepted (the one exception: right after
//! the handshake the listener writes one [`Resume`] frame, see [`crate::snapshot_stream`]).
//! Frames are `u32-le len ‖ kind ‖ body`, bounded by [`FRAME_BYTES_MAX`]: kind 0 is
//! `protobuf(Message)`; a snapshot goes as chunk frames (kind 1) and an end frame (kind 2), so
//! its size is bounded by [`tally_codec::limits::SNAPSHOT_BYTES_MAX`], not by the frame limit.
//! Bytes that do not decode close the connection; nothing a peer sends can panic this side.
//!
//! **Authentication.** With [`PeerSecurity::Tls`] (what `cluster init` configures) every link is
//! mutual TLS with certificates of the cluster CA: the dialler checks that the listener is
//! `node-<dialled id>.tally`, the listener checks that the dialler's certificate names the node
//! its hello claims. Nothing is sent before TLS is up, so a stranger learns no fingerprint and
//! gets no message to Raft. Handshakes must finish within [`HANDSHAKE_TIMEOUT_MS`]; when the
//! handshake pool is full the oldest one is cut, so dripping bytes cannot hold the port.
//!
//! **One link per node.** A node has at most one inbound link: a newly authenticated link
//! claiming node N closes the older one, with a log line (see `claim_node` for why the newest
//! wins). The replica thread cuts a node's links when the peer gate refused one of its messages
//! ([`Transport::cut_inbound`]).

use crate::frame::{read_frame, write_frame};
use crate::handshake::{handshake, HandshakeError, LocalPeer, Side, PEER_PROTOCOL_VERSION};
use crate::revocation::{cert_fingerprint, fingerprint_hex, RevokedCerts};
use crate::snapshot::{SnapshotEnvelope, SnapshotSource};
use crate::snapshot_stream::{self, Assemblies, Resume, StreamId, KIND_CHUNK, KIND_END, KIND_MESSAGE};
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;
use protobuf::Message as PbMessage;
use raft::eraftpb::{Message, MessageType};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;
use tally_codec::limits::{FRAME_BYTES_MAX, SNAPSHOT_BYTES_MAX};
use tally_net::{Admission, AdmissionLimits, Stream};

/// Messages queued per peer before new ones are dropped.
pub const OUTBOUND_MESSAGES_MAX: usize = 1024;
/// Threads of links to removed peers kept for joining (each ends within a connect, handshake or
/// write timeout on its own).
const RETIRED_LINKS_MAX: usize = 64;
/// Messages written before one flush.
const WRITE_BATCH_MAX: usize = 256;
/// Accepted connections held at once (authenticated replicas; handshakes have their own pool,
/// see [`AdmissionLimits::PEER_PORT`]).
pub const INBOUND_CONNECTIONS_MAX: usize = 64;
const RECONNECT_BACKOFF_MS_MIN: u64 = 50;
const RECONNECT_BACKOFF_MS_MAX: u64 = 2_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Whole handshake (TCP accept to accepted hello), however the peer paces its bytes.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 3_000;
const WRITE_TIMEOUT_MS: u64 = 5_000;
/// How often idle threads look at the stop flag.
const POLL_MS: u64 = 50;
/// How a closed inbound link is checked: up to this many connects to the peer's port, this far
/// apart (a dying process may still hold its listening socket for the first).
const DOWN_PROBES: u32 = 3;
const DOWN_PROBE_GAP_MS: u64 = 10;
const DOWN_PROBE_TIMEOUT_MS: u64 = 100;

/// How the raft loop reaches its peers. The simulator substitutes an in-memory network.
pub trait Transport: Send {
    /// Queues `msg` for `msg.to`. Returns false when it was dropped (no route or queue full);
    /// Raft retransmits.
    fn send(&mut self, msg: Message) -> bool;
    /// The peers' replication addresses (this node excluded). Links to others are closed.
    fn set_peers(&mut self, peers: &BTreeMap<u64, String>);
    /// Closes every link and joins the threads.
    fn stop(&mut self);
    /// Closes the links `peer` dialled to this replica (its messages were refused); the peer
    /// may dial again. Messages already received stay queued.
    fn cut_inbound(&mut self, peer: u64) {
        let _ = peer;
    }
    /// Closes the links (either way) whose peer presented a certificate revoked since they
    /// opened.
    fn cut_revoked(&mut self) {}
    /// Snapshots whose sending ended since the last call: `(peer, delivered)`. A transport that
    /// streams a snapshot reports it when the last byte is written (or the link broke), not when
    /// it was queued, so Raft does not probe the follower while the snapshot is still on its way.
    fn take_snapshot_reports(&mut self) -> Vec<(u64, bool)> {
        Vec::new()
    }
    /// The peer protocol version of each peer's outbound link that is up now.
    fn link_versions(&self) -> BTreeMap<u64, u16> {
        BTreeMap::new()
    }
}

/// Snapshot outcomes the link threads report to the raft thread.
type Reports = Arc<Mutex<Vec<(u64, bool)>>>;

/// How peer links are protected.
#[derive(Clone)]
pub enum PeerSecurity {
    /// Mutual TLS with certificates of the cluster CA (the default of `cluster init`), except
    /// those revoked (`revoked` is shared with the replica thread, which adds to it).
    Tls { server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>, revoked: RevokedCerts },
    /// No authentication at all: anyone who reaches the port is a peer. An explicit opt-in for
    /// local experiments and tests of the transport itself.
    InsecurePlaintext,
}

impl std::fmt::Debug for PeerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerSecurity::Tls { .. } => "PeerSecurity::Tls",
            PeerSecurity::InsecurePlaintext => "PeerSecurity::InsecurePlaintext",
        })
    }
}

impl PeerSecurity {
    /// Peer TLS from the node's files: its certificate serves both directions.
    ///
    /// # Errors
    /// Unreadable or mismatched files.
    pub fn from_files(files: &tally_net::TlsFiles) -> Result<PeerSecurity, tally_net::TlsError> {
        Ok(PeerSecurity::Tls {
            server: tally_net::tls::server_config(files, tally_net::ClientAuth::Required)?,
            client: tally_net::tls::client_config(&files.ca, Some(files))?,
            revoked: RevokedCerts::default(),
        })
    }

    /// The same, refusing the certificates `revoked` holds (now and as it grows).
    #[must_use]
    pub fn with_revoked(self, revoked: RevokedCerts) -> Self {
        match self {
            PeerSecurity::Tls { server, client, .. } => PeerSecurity::Tls { server, client, revoked },
            plain @ PeerSecurity::InsecurePlaintext => plain,
        }
    }

    /// Why the peer on `stream` may not be a peer: its certificate was revoked.
    fn refuses(&self, stream: &Stream) -> Option<String> {
        let PeerSecurity::Tls { revoked, .. } = self else { return None };
        let fp = cert_fingerprint(stream.peer_certificate()?.as_ref());
        revoked.node_of(&fp).map(|node| format!("node {node}'s certificate {} was revoked", fingerprint_hex(&fp)))
    }

    /// The fingerprint of the certificate the peer on `stream` presented (TLS only).
    fn fingerprint(stream: &Stream) -> Option<[u8; 32]> {
        stream.peer_certificate().map(|c| cert_fingerprint(c.as_ref()))
    }

    /// Whether a link whose peer presented `fp` must be closed now.
    fn revoked(&self, fp: Option<[u8; 32]>) -> bool {
        match (self, fp) {
            (PeerSecurity::Tls { revoked, .. }, Some(fp)) => revoked.node_of(&fp).is_some(),
            _ => false,
        }
    }
}

struct OutLink {
    addr: String,
    tx: Sender<Message>,
    /// The version the link runs at while it is up; 0 while it is down.
    version: Arc<AtomicU16>,
    /// Set when the peer leaves the configuration: the thread drops what is queued and ends.
    closed: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// One accepted connection: its socket (to shut it down from elsewhere), its reader thread, and
/// once authenticated the node it speaks for.
struct Inbound {
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
    peer: Option<u64>,
    /// The fingerprint of the certificate it authenticated with (TLS only).
    fingerprint: Option<[u8; 32]>,
    /// Closed by this side: its messages were refused, a newer link replaced it, or its
    /// certificate was revoked.
    cut: bool,
}

/// Accepted connections by connection id (not by node: during a handshake the node is not
/// known yet, and a replaced link is still draining).
type InboundConns = Arc<Mutex<HashMap<u64, Inbound>>>;
/// Each peer's address, for checking whether a peer whose link closed is down.
type PeerAddrs = Arc<Mutex<HashMap<u64, String>>>;

/// TCP implementation of [`Transport`].
pub struct TcpTransport {
    local: LocalPeer,
    security: PeerSecurity,
    stop: Arc<AtomicBool>,
    links: HashMap<u64, OutLink>,
    /// Threads of links to peers that left the configuration, still ending (one may sit in a
    /// connect, a handshake or a write to a dead peer for seconds): never joined on the caller's
    /// thread, which is the replica thread. Reaped once finished, joined at [`Transport::stop`].
    retired: Vec<JoinHandle<()>>,
    listener: Option<JoinHandle<()>>,
    inbound: InboundConns,
    addrs: PeerAddrs,
    reports: Reports,
    /// Where a leader's snapshot state is held while it streams.
    snapshots: Option<Arc<dyn SnapshotSource>>,
}

impl TcpTransport {
    /// Starts accepting on `listener`; received messages go to `inbox`.
    ///
    /// # Errors
    /// When the listener cannot be configured or its thread cannot start.
    pub fn start(
        listener: TcpListener,
        local: LocalPeer,
        security: PeerSecurity,
        inbox: Sender<Message>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let inbound: InboundConns = Arc::new(Mutex::new(HashMap::new()));
        let addrs: PeerAddrs = Arc::default();
        let (l_stop, l_inbound, l_local, l_sec) = (stop.clone(), inbound.clone(), local.clone(), security.clone());
        let l_addrs = addrs.clone();
        let thread = std::thread::Builder::new()
            .name(format!("peer-listen-{}", local.node_id))
            .spawn(move || run_listener(listener, l_local, l_sec, inbox, l_stop, l_inbound, l_addrs))?;
        Ok(TcpTransport {
            local,
            security,
            stop,
            links: HashMap::new(),
            retired: Vec::new(),
            listener: Some(thread),
            inbound,
            addrs,
            reports: Reports::default(),
            snapshots: None,
        })
    }

    /// Streams the state of snapshots from `source` (links started after this call).
    #[must_use]
    pub fn with_snapshots(mut self, source: Arc<dyn SnapshotSource>) -> Self {
        self.snapshots = Some(source);
        self
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

    /// Never blocks: links to peers that left are told to end and left to finish on their own
    /// threads (the replica thread calls this when a configuration change applies).
    fn set_peers(&mut self, peers: &BTreeMap<u64, String>) {
        *self.addrs.lock() = peers.iter().map(|(id, a)| (*id, a.clone())).collect();
        let stale: Vec<u64> =
            self.links.iter().filter(|(id, l)| peers.get(id) != Some(&l.addr)).map(|(id, _)| *id).collect();
        for id in stale {
            if let Some(link) = self.links.remove(&id) {
                link.closed.store(true, Ordering::Release);
                drop(link.tx);
                self.retired.push(link.thread);
            }
        }
        self.reap_retired();
        for (id, addr) in peers {
            if *id == self.local.node_id || self.links.contains_key(id) {
                continue;
            }
            let (tx, rx) = bounded(OUTBOUND_MESSAGES_MAX);
            let closed = Arc::new(AtomicBool::new(false));
            let version = Arc::new(AtomicU16::new(0));
            let outbound = Outbound {
                version: version.clone(),
                snapshots: self.snapshots.clone(),
                peer: *id,
                addr: addr.clone(),
                local: self.local.clone(),
                security: self.security.clone(),
                rx,
                stop: self.stop.clone(),
                closed: closed.clone(),
                reports: self.reports.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("peer-out-{}-{}", self.local.node_id, id))
                .spawn(move || outbound.run())
            {
                Ok(thread) => {
                    self.links.insert(*id, OutLink { addr: addr.clone(), tx, version, closed, thread });
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
        for thread in self.retired.drain(..) {
            let _ = thread.join();
        }
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        let conns: Vec<_> = self.inbound.lock().drain().collect();
        for (_, c) in conns {
            let _ = c.stream.shutdown(Shutdown::Both);
            if let Some(t) = c.thread {
                let _ = t.join();
            }
        }
    }

    fn take_snapshot_reports(&mut self) -> Vec<(u64, bool)> {
        std::mem::take(&mut *self.reports.lock())
    }

    fn link_versions(&self) -> BTreeMap<u64, u16> {
        let versions = self.links.iter().map(|(id, l)| (*id, l.version.load(Ordering::Acquire)));
        versions.filter(|(_, v)| *v != 0).collect()
    }

    fn cut_inbound(&mut self, peer: u64) {
        if cut_links(&self.inbound, peer) > 0 {
            tracing::debug!(peer, "inbound peer link cut");
        }
    }

    fn cut_revoked(&mut self) {
        let n = cut_revoked_links(&self.inbound, &self.security);
        if n > 0 {
            tracing::warn!(links = n, "peer links with a revoked certificate cut");
        }
    }
}

impl TcpTransport {
    /// Joins the retired link threads that have ended (at most [`RETIRED_LINKS_MAX`] are kept;
    /// past it the oldest is detached: it ends by itself within a connect, handshake or write
    /// timeout).
    fn reap_retired(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = self.retired.drain(..).partition(JoinHandle::is_finished);
        self.retired = running;
        for thread in done {
            let _ = thread.join();
        }
        if self.retired.len() > RETIRED_LINKS_MAX {
            let excess = self.retired.len() - RETIRED_LINKS_MAX;
            self.retired.drain(..excess);
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sleep_unless_stopped(ms: u64, stop: &AtomicBool, closed: &AtomicBool) {
    let mut left = ms;
    while left > 0 && !stop.load(Ordering::Relaxed) && !closed.load(Ordering::Relaxed) {
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
    /// The peer speaks an older peer protocol version, which this replica speaks too.
    OlderPeer { version: u16, why: String },
}

/// Dials node `peer`, offering the newest peer protocol version first and each older one in
/// turn while the peer refuses (release 0.3 refuses any version but 2): the stream, the peer's
/// resume point and the link's version.
fn connect(
    addr: &str,
    local: &LocalPeer,
    security: &PeerSecurity,
    peer: u64,
) -> Result<(Stream, Resume, u16), LinkError> {
    let mut version = PEER_PROTOCOL_VERSION;
    loop {
        match connect_at(addr, local, security, peer, version) {
            Err(LinkError::OlderPeer { version: older, why }) if older < version => {
                tracing::debug!(peer, %addr, offered = version, older, reason = %why, "the peer speaks an older version; offering it");
                version = older;
            }
            r => return r.map(|(s, resume)| (s, resume, version)),
        }
    }
}

fn connect_at(
    addr: &str,
    local: &LocalPeer,
    security: &PeerSecurity,
    peer: u64,
    version: u16,
) -> Result<(Stream, Resume), LinkError> {
    let down = |e: String| LinkError::Down(e);
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| down(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| down(format!("{addr} resolves to no address")))?;
    let s = TcpStream::connect_timeout(&sock, Duration::from_millis(CONNECT_TIMEOUT_MS))
        .map_err(|e| down(format!("connect to {addr}: {e}")))?;
    let _ = s.set_nodelay(true);
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let t = Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS));
    s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)).map_err(|e| down(e.to_string()))?;
    let mut stream = match security {
        PeerSecurity::Tls { client, .. } => {
            // The listener must prove it is the node we dialled before we say anything.
            Stream::connect(s, client.clone(), &tally_net::tls::node_server_name(peer), deadline).map_err(|e| {
                LinkError::Refused(format!("TLS with node {peer} at {addr}: {e} (is it node {peer} of this cluster?)"))
            })?
        }
        PeerSecurity::InsecurePlaintext => Stream::plain(s),
    };
    if let Some(why) = security.refuses(&stream) {
        stream.shutdown();
        return Err(LinkError::Refused(format!("node {peer} at {addr}: {why}")));
    }
    match handshake(&mut stream, local, Side::Dialler { node: peer, version }) {
        Ok(_) => {}
        Err(HandshakeError::OlderPeer { version, why }) => return Err(LinkError::OlderPeer { version, why }),
        Err(e @ (HandshakeError::RefusedByUs(_) | HandshakeError::RefusedByPeer(_))) => {
            return Err(LinkError::Refused(format!("handshake with node {peer} at {addr}: {e}")))
        }
        Err(e) => return Err(down(format!("handshake with {addr}: {e}"))),
    }
    // The listener says which snapshot of ours it holds part of.
    let resume = read_frame(&mut stream, RESUME_BYTES_MAX)
        .map_err(|e| down(format!("resume point from {addr}: {e}")))
        .and_then(|b| {
            tally_codec::decode::<Resume>(&b, RESUME_BYTES_MAX)
                .map_err(|e| down(format!("resume point from {addr}: {e}")))
        })?;
    let tcp = stream.tcp();
    tcp.set_read_timeout(None).map_err(|e| down(e.to_string()))?;
    tcp.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS))).map_err(|e| down(e.to_string()))?;
    Ok((stream, resume))
}

/// Bound on the resume frame.
const RESUME_BYTES_MAX: usize = 256;

/// Checks that `addr` answers as node `node_id` of this cluster (TLS identity, cluster id,
/// configuration), without sending any Raft message.
///
/// # Errors
/// Why the node can't be reached or was refused.
pub fn probe(addr: &str, local: &LocalPeer, security: &PeerSecurity, node_id: u64) -> Result<(), String> {
    match connect(addr, local, security, node_id) {
        Ok((s, _, _)) => {
            s.shutdown();
            Ok(())
        }
        Err(LinkError::Down(e) | LinkError::Refused(e) | LinkError::OlderPeer { why: e, .. }) => Err(e),
    }
}

fn write_message<W: Write>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    let mut bytes = vec![KIND_MESSAGE];
    msg.write_to_vec(&mut bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if bytes.len() > FRAME_BYTES_MAX {
        tracing::warn!(to = msg.to, bytes = bytes.len(), "raft message over the frame limit; dropped");
        return Ok(());
    }
    write_frame(w, &bytes)
}

fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}

/// One outbound link: a connection it dials (again after a failure) and writes on.
struct Outbound {
    /// The link's version while it is up, 0 while down (read by [`Transport::link_versions`]).
    version: Arc<AtomicU16>,
    snapshots: Option<Arc<dyn SnapshotSource>>,
    peer: u64,
    addr: String,
    local: LocalPeer,
    security: PeerSecurity,
    rx: Receiver<Message>,
    stop: Arc<AtomicBool>,
    /// The peer left the configuration: what is queued for it is dropped.
    closed: Arc<AtomicBool>,
    reports: Reports,
}

type Conn = BufWriter<Stream>;

/// An outbound link's connection, and what it keeps between dials.
struct Link {
    conn: Option<(Conn, Resume)>,
    /// The certificate the listener presented on `conn`.
    fingerprint: Option<[u8; 32]>,
    backoff_ms: u64,
    /// The last dial's error, logged once per distinct reason.
    last_error: Option<String>,
}

impl Link {
    fn shutdown(&mut self) {
        if let Some((w, _)) = self.conn.take() {
            w.get_ref().shutdown();
        }
    }
}

impl Outbound {
    fn run(self) {
        let mut link = Link { conn: None, fingerprint: None, backoff_ms: RECONNECT_BACKOFF_MS_MIN, last_error: None };
        // A snapshot that arrived while another was streaming (only the newest is kept).
        let mut deferred: Option<Message> = None;
        while !self.halted() {
            let first = match deferred.take() {
                Some(m) => m,
                None => match self.rx.recv_timeout(Duration::from_millis(POLL_MS)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            if link.conn.is_some() && self.security.revoked(link.fingerprint) {
                tracing::warn!(peer = self.peer, addr = %self.addr, "the peer's certificate was revoked; link closed");
                self.close(&mut link);
            }
            if link.conn.is_none() && !self.dial(&mut link, &first) {
                continue;
            }
            let Some((w, resume)) = link.conn.as_mut() else { continue };
            let r = if is_snapshot(&first) {
                let version = self.version.load(Ordering::Acquire);
                let r = self.stream_snapshot(w, resume, version, first, &mut deferred);
                self.report(r.as_ref().is_ok_and(|delivered| *delivered));
                r.map(|_| ())
            } else {
                self.write_queued(w, first, &mut deferred)
            };
            if let Err(e) = r {
                tracing::warn!(peer = self.peer, addr = %self.addr, error = %e, "peer link write failed; reconnecting");
                self.close(&mut link);
            }
        }
    }

    /// Connects `link`. On failure (`false`): a snapshot waiting to go is reported undelivered,
    /// and the link waits out its backoff, which doubles up to a bound.
    fn dial(&self, link: &mut Link, first: &Message) -> bool {
        match connect(&self.addr, &self.local, &self.security, self.peer) {
            Ok((s, resume, version)) => {
                tracing::info!(peer = self.peer, addr = %self.addr, version, "peer link up");
                self.version.store(version, Ordering::Release);
                link.fingerprint = PeerSecurity::fingerprint(&s);
                link.conn = Some((BufWriter::new(s), resume));
                link.backoff_ms = RECONNECT_BACKOFF_MS_MIN;
                link.last_error = None;
                true
            }
            Err(e) => {
                if is_snapshot(first) {
                    self.report(false);
                }
                let (refused, text) = match e {
                    LinkError::Refused(t) | LinkError::OlderPeer { why: t, .. } => (true, t),
                    LinkError::Down(t) => (false, t),
                };
                // Logged once per distinct reason, not on every retry.
                if link.last_error.as_deref() != Some(text.as_str()) {
                    if refused {
                        tracing::error!(peer = self.peer, addr = %self.addr, reason = %text, "peer link refused");
                    } else {
                        tracing::warn!(peer = self.peer, addr = %self.addr, reason = %text, "peer link down");
                    }
                    link.last_error = Some(text);
                }
                sleep_unless_stopped(link.backoff_ms, &self.stop, &self.closed);
                link.backoff_ms = (link.backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
                false
            }
        }
    }

    /// Closes the link's connection; its version is unknown until the next dial.
    fn close(&self, link: &mut Link) {
        link.shutdown();
        self.version.store(0, Ordering::Release);
    }

    /// The transport stops, or the peer left the configuration.
    fn halted(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed)
    }

    fn report(&self, delivered: bool) {
        self.reports.lock().push((self.peer, delivered));
    }

    /// Sets a snapshot aside until the current write is done; one set aside earlier is
    /// superseded (reported undelivered, so Raft sends again if it still needs one).
    fn defer(&self, deferred: &mut Option<Message>, m: Message) {
        if deferred.replace(m).is_some() {
            self.report(false);
        }
    }

    /// Writes `first` and what else is queued (snapshots are set aside), then flushes.
    fn write_queued(&self, w: &mut Conn, first: Message, deferred: &mut Option<Message>) -> std::io::Result<()> {
        write_message(w, &first)?;
        for _ in 0..WRITE_BATCH_MAX {
            match self.rx.try_recv() {
                Ok(m) if is_snapshot(&m) => self.defer(deferred, m),
                Ok(m) => write_message(w, &m)?,
                Err(_) => break,
            }
        }
        w.flush()
    }

    /// Streams a snapshot in chunks from where the peer's resume point allows, with other
    /// queued messages written between chunks, then the message itself without its data.
    /// `Ok(false)` when its state is no longer held (nothing was sent).
    fn stream_snapshot(
        &self,
        w: &mut Conn,
        resume: &mut Resume,
        version: u16,
        mut msg: Message,
        deferred: &mut Option<Message>,
    ) -> std::io::Result<bool> {
        let data = std::mem::take(&mut msg.mut_snapshot().data);
        let meta = msg.get_snapshot().get_metadata();
        // A leader's snapshot carries the members only (see `WalStorage::snapshot`); the state
        // is the export held by the source, streamed from where it lies, never copied whole.
        let held = self
            .snapshots
            .as_ref()
            .and_then(|s| s.snapshot(meta.index).ok())
            .filter(|e| (e.index, e.term) == (meta.index, meta.term));
        let envelope = tally_codec::decode::<SnapshotEnvelope>(&data, SNAPSHOT_BYTES_MAX).ok();
        let (head, state): (Vec<u8>, &[u8]) = match (&envelope, &held) {
            (Some(env), Some(exported)) if env.state.is_empty() => {
                match SnapshotEnvelope::head_at(version, &env.members, &env.revoked, exported.state.len()) {
                    Ok(head) => (head, &exported.state),
                    Err(why) => return Ok(self.unsendable(&why)),
                }
            }
            (Some(env), None) if env.state.is_empty() => {
                tracing::warn!(peer = self.peer, index = meta.index, "snapshot state no longer held; Raft will retry");
                return Ok(false);
            }
            (Some(env), _) => match SnapshotEnvelope::head_at(version, &env.members, &env.revoked, env.state.len()) {
                Ok(head) => (head, &env.state),
                Err(why) => return Ok(self.unsendable(&why)),
            },
            (None, _) => (data.into(), &[]),
        };
        let parts: [&[u8]; 2] = [&head, state];
        let stream = StreamId::of_parts(meta.index, meta.term, &parts);
        let from = resume.offset_for(&stream);
        let started = Instant::now();
        tracing::info!(
            peer = self.peer,
            index = stream.index,
            bytes = stream.total,
            resume_at = from,
            "streaming snapshot"
        );
        self.write_chunks(w, resume, &stream, &parts, from, deferred)?;
        let mut end = vec![KIND_END];
        end.extend_from_slice(&stream.digest);
        msg.write_to_vec(&mut end).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        write_frame(w, &end)?;
        w.flush()?;
        *resume = Resume::default();
        tracing::info!(
            peer = self.peer,
            index = stream.index,
            bytes = stream.total - from,
            ms = started.elapsed().as_millis() as u64,
            "snapshot streamed"
        );
        Ok(true)
    }

    /// A snapshot this link's version cannot carry: logged, nothing sent (`false`).
    fn unsendable(&self, why: &str) -> bool {
        tally_net::error_limited!("snapshot_version", peer = self.peer, reason = %why, "snapshot not sent: upgrade the peer");
        false
    }

    /// Writes `stream`'s chunks from offset `from`, each followed by what else is queued for the
    /// peer, keeping `resume` at the end of the last chunk flushed.
    fn write_chunks(
        &self,
        w: &mut Conn,
        resume: &mut Resume,
        stream: &StreamId,
        parts: &[&[u8]],
        from: u64,
        deferred: &mut Option<Message>,
    ) -> std::io::Result<()> {
        for (offset, end) in snapshot_stream::chunks(stream.total, from) {
            if self.halted() {
                return Err(std::io::Error::other("transport stopping or peer removed"));
            }
            let pieces = snapshot_stream::range_of(parts, offset, end);
            write_frame(w, &snapshot_stream::chunk_frame_of(stream, offset, &pieces))?;
            // Heartbeats and appends to this peer do not wait for the whole snapshot.
            while let Ok(m) = self.rx.try_recv() {
                if is_snapshot(&m) {
                    self.defer(deferred, m);
                } else {
                    write_message(w, &m)?;
                }
            }
            w.flush()?;
            // If the link breaks now, a reconnection learns the real point from the peer.
            *resume = Resume { stream: Some(*stream), offset: end };
        }
        Ok(())
    }
}

fn run_listener(
    listener: TcpListener,
    local: LocalPeer,
    security: PeerSecurity,
    inbox: Sender<Message>,
    stop: Arc<AtomicBool>,
    conns: InboundConns,
    addrs: PeerAddrs,
) {
    let admission =
        Admission::new(AdmissionLimits { nodes_max: INBOUND_CONNECTIONS_MAX, ..AdmissionLimits::PEER_PORT });
    let assemblies = Assemblies::default();
    let next_id = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) {
        let (stream, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(POLL_MS / 5));
                continue;
            }
            Err(e) => {
                tally_net::warn_limited!("peer_accept", error = %e, "peer accept failed");
                std::thread::sleep(Duration::from_millis(POLL_MS));
                continue;
            }
        };
        // Cuts the oldest pending handshake when the pool is full.
        let Ok(slot) = admission.admit(&stream) else { continue };
        let Ok(clone) = stream.try_clone() else { continue };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let (l, ib, cs, sec) = (local.clone(), inbox.clone(), conns.clone(), security.clone());
        let asm = assemblies.clone();
        let (st, ad) = (stop.clone(), addrs.clone());
        // Register before the thread can deregister itself.
        let mut guard = conns.lock();
        guard.insert(id, Inbound { stream: clone, thread: None, peer: None, fingerprint: None, cut: false });
        match std::thread::Builder::new()
            .name(format!("peer-in-{}-{id}", local.node_id))
            .spawn(move || run_inbound(stream, from, l, sec, ib, cs, id, slot, asm, &st, &ad))
        {
            Ok(t) => {
                if let Some(e) = guard.get_mut(&id) {
                    e.thread = Some(t);
                }
            }
            Err(e) => {
                guard.remove(&id);
                tracing::error!(error = %e, "cannot start peer reader thread");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_inbound(
    s: TcpStream,
    from: SocketAddr,
    local: LocalPeer,
    security: PeerSecurity,
    inbox: Sender<Message>,
    conns: InboundConns,
    id: u64,
    slot: tally_net::Admitted,
    assemblies: Assemblies,
    stop: &AtomicBool,
    addrs: &PeerAddrs,
) {
    let mut closed_by_peer = None;
    if let Some((mut stream, peer_id, version)) = authenticate(s, from, &local, &security, &slot) {
        claim_node(&conns, id, peer_id, PeerSecurity::fingerprint(&stream), from);
        let resume = tally_codec::encode(&assemblies.resume_for(peer_id));
        if write_frame(&mut stream, &resume).and_then(|()| stream.flush()).is_ok()
            && read_messages(&stream, (peer_id, version), from, &local, &inbox, &assemblies) == Closed::ByPeer
        {
            closed_by_peer = Some(peer_id);
        }
        stream.shutdown();
    }
    drop(slot);
    let cut = conns.lock().remove(&id).is_some_and(|c| c.cut);
    // A link this side cut says nothing about whether the peer is down.
    let Some(peer) = closed_by_peer.filter(|_| !cut) else { return };
    let addr = addrs.lock().get(&peer).cloned();
    if let Some(addr) = addr {
        if !stop.load(Ordering::Relaxed) && peer_is_down(&addr) {
            tracing::warn!(peer, %addr, "peer link closed and its port refuses connections: peer down");
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgUnreachable);
            (m.from, m.to) = (peer, local.node_id);
            let _ = inbox.try_send(m);
        }
    }
}

/// Makes connection `id` the one link of node `peer`: an older link claiming the same node is
/// closed. The newest wins rather than the first, because the first may be stale (a peer that
/// restarted after a power loss or a partition leaves a half-open connection this side only
/// notices much later), or held by an impostor that dialled first with a leaked key: refusing
/// the newcomer would lock the real node out for as long as the impostor keeps its connection.
fn claim_node(conns: &InboundConns, id: u64, peer: u64, fingerprint: Option<[u8; 32]>, from: SocketAddr) {
    let mut conns = conns.lock();
    let mut replaced = Vec::new();
    for (other, c) in conns.iter_mut() {
        if *other != id && c.peer == Some(peer) && !c.cut {
            c.cut = true;
            let _ = c.stream.shutdown(Shutdown::Both);
            replaced.push(c.stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string()));
        }
    }
    if let Some(c) = conns.get_mut(&id) {
        c.peer = Some(peer);
        c.fingerprint = fingerprint;
    }
    drop(conns);
    for old in replaced {
        tracing::warn!(node = peer, %from, replaced = %old, "a second link claimed this node: the older one was closed");
    }
}

/// Closes every inbound link of node `peer`; returns how many were open.
fn cut_links(conns: &InboundConns, peer: u64) -> usize {
    let mut n = 0;
    for c in conns.lock().values_mut().filter(|c| c.peer == Some(peer) && !c.cut) {
        c.cut = true;
        let _ = c.stream.shutdown(Shutdown::Both);
        n += 1;
    }
    n
}

/// Closes every inbound link whose peer presented a revoked certificate; returns how many.
fn cut_revoked_links(conns: &InboundConns, security: &PeerSecurity) -> usize {
    let mut n = 0;
    for c in conns.lock().values_mut().filter(|c| !c.cut && security.revoked(c.fingerprint)) {
        c.cut = true;
        let _ = c.stream.shutdown(Shutdown::Both);
        n += 1;
    }
    n
}

/// Whether no process listens on `addr`: a connect is refused (the kernel answers a SYN to a
/// closed port with a reset). A live peer, a partition (no answer) or a name that does not
/// resolve is not "down".
pub fn peer_is_down(addr: &str) -> bool {
    let Some(a) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else { return false };
    for probe in 0..DOWN_PROBES {
        if probe > 0 {
            std::thread::sleep(Duration::from_millis(DOWN_PROBE_GAP_MS));
        }
        match TcpStream::connect_timeout(&a, Duration::from_millis(DOWN_PROBE_TIMEOUT_MS)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            Err(_) => return false,
            Ok(s) => drop(s), // still listening: perhaps a process that is exiting; look again
        }
    }
    false
}

/// How an inbound link ended.
#[derive(Debug, PartialEq, Eq)]
enum Closed {
    /// The peer closed or reset the connection.
    ByPeer,
    /// This side closed it: bad input, a stop, a full inbox that went away.
    ByUs,
}

/// TLS (when configured), then the hello; returns the stream once the peer proved it is the node
/// its hello names.
fn authenticate(
    s: TcpStream,
    from: SocketAddr,
    local: &LocalPeer,
    security: &PeerSecurity,
    slot: &tally_net::Admitted,
) -> Option<(Stream, u64, u16)> {
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let t = Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS));
    if s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)).is_err() {
        return None;
    }
    let mut stream = match security {
        PeerSecurity::Tls { server, .. } => match Stream::accept(s, server.clone(), deadline) {
            Ok(st) => st,
            Err(e) => {
                tally_net::warn_limited!("peer_tls", %from, error = %e, "peer TLS handshake failed (no certificate of this cluster?)");
                return None;
            }
        },
        PeerSecurity::InsecurePlaintext => Stream::plain(s),
    };
    if let Some(why) = security.refuses(&stream) {
        tracing::error!(%from, reason = %why, "refused peer connection: its certificate was revoked");
        stream.shutdown();
        return None;
    }
    // What is left of the deadline bounds the hello too.
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let _ = stream.tcp().set_read_timeout(Some(left));
    let (peer, version) = match handshake(&mut stream, local, Side::Listener) {
        Ok(linked) => (linked.peer, linked.version),
        Err(HandshakeError::RefusedByUs(r)) => {
            tally_net::error_limited!("peer_refused", %from, reason = %r, "refused peer connection");
            return None;
        }
        Err(e) => {
            tally_net::warn_limited!("peer_handshake", %from, error = %e, "peer handshake failed");
            return None;
        }
    };
    if matches!(security, PeerSecurity::Tls { .. }) && !stream.peer_is_node(peer.node_id) {
        tally_net::error_limited!("peer_identity", %from, claimed = peer.node_id, "refused peer: its certificate is not node {}'s", peer.node_id);
        return None;
    }
    if let Err(e) = slot.establish(true) {
        tally_net::warn_limited!("peer_admission", %from, node = peer.node_id, error = %e, "peer connection refused");
        return None;
    }
    if stream.tcp().set_read_timeout(None).is_err() {
        return None;
    }
    tracing::debug!(%from, node = peer.node_id, version, "peer connected");
    Some((stream, peer.node_id, version))
}

/// The raft-rs message a frame from `peer_id` completes, with a snapshot's data as this side
/// reads it whatever the link's `version`; `None` for a snapshot chunk, held until its end.
fn decode_frame(bytes: &[u8], (peer_id, version): (u64, u16), assemblies: &Assemblies) -> Option<Result<Message, String>> {
    let decoded = match bytes.split_first() {
        Some((&KIND_MESSAGE, body)) => Message::parse_from_bytes(body).map_err(|e| e.to_string()),
        Some((&KIND_CHUNK, body)) => match assemblies.chunk(peer_id, body) {
            Ok(()) => return None,
            Err(e) => Err(e.to_string()),
        },
        Some((&KIND_END, body)) if body.len() >= 32 => {
            let (digest, body) = body.split_at(32);
            let digest: [u8; 32] = digest.try_into().unwrap_or([0; 32]);
            Message::parse_from_bytes(body).map_err(|e| e.to_string()).and_then(|mut m| {
                let (stream, data) = assemblies.end(peer_id, &digest).map_err(|e| e.to_string())?;
                let meta = m.get_snapshot().get_metadata();
                if !is_snapshot(&m) || (meta.index, meta.term) != (stream.index, stream.term) {
                    return Err("snapshot end does not match its stream".to_string());
                }
                m.mut_snapshot().data = data.into();
                Ok(m)
            })
        }
        _ => Err("unknown frame kind".to_string()),
    };
    Some(decoded.and_then(|mut m| {
        if is_snapshot(&m) && !m.get_snapshot().data.is_empty() {
            let data = std::mem::take(&mut m.mut_snapshot().data);
            m.mut_snapshot().data = SnapshotEnvelope::from_version(version, data.into())?.into();
        }
        Ok(m)
    }))
}

/// Reads a link's frames into `inbox` until it closes. `(peer_id, version)`: who the link is
/// from and the protocol version it runs at.
fn read_messages(
    s: &Stream,
    (peer_id, version): (u64, u16),
    from: SocketAddr,
    local: &LocalPeer,
    inbox: &Sender<Message>,
    assemblies: &Assemblies,
) -> Closed {
    let mut r = std::io::BufReader::new(s.clone());
    loop {
        let bytes = match read_frame(&mut r, FRAME_BYTES_MAX) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Closed::ByPeer,
            Err(e) => {
                tracing::warn!(%from, node = peer_id, error = %e, "peer read failed; closing");
                return if e.kind() == std::io::ErrorKind::ConnectionReset { Closed::ByPeer } else { Closed::ByUs };
            }
        };
        let Some(decoded) = decode_frame(&bytes, (peer_id, version), assemblies) else { continue };
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%from, node = peer_id, error = %e, "undecodable peer frame; closing");
                return Closed::ByUs;
            }
        };
        if msg.from != peer_id || msg.to != local.node_id {
            tracing::warn!(%from, node = peer_id, msg_from = msg.from, msg_to = msg.to, "misaddressed raft message; closing");
            return Closed::ByUs;
        }
        if raft::raw_node::is_local_msg(msg.get_msg_type()) {
            // Local to a replica (MsgHup, MsgUnreachable, ...): a peer never sends one.
            tracing::warn!(%from, node = peer_id, kind = ?msg.get_msg_type(), "local-only raft message from a peer; closing");
            return Closed::ByUs;
        }
        let delivered = if is_snapshot(&msg) {
            // Seconds of streaming are not dropped for a momentarily full inbox.
            inbox.send_timeout(msg, Duration::from_secs(5)).map_err(|e| matches!(e, SendTimeoutError::Disconnected(_)))
        } else {
            inbox.try_send(msg).map_err(|e| matches!(e, TrySendError::Disconnected(_)))
        };
        if delivered == Err(true) {
            return Closed::ByUs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::Hello;
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
        let t = TcpTransport::start(l, LocalPeer::fixed(cluster, node, [1; 32]), PeerSecurity::InsecurePlaintext, tx)
            .expect("start");
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

    /// Removing a dead peer returns at once, however much is queued for it: its link thread
    /// (failing to connect, backing off) is closed, not joined on the caller's thread.
    #[test]
    fn removing_a_dead_peer_does_not_wait_for_its_link() {
        let (mut a, _a_addr, _a_rx) = start(1, "c");
        let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_addr = dead.local_addr().expect("addr").to_string();
        drop(dead); // connects to it are refused
        a.set_peers(&[(2, dead_addr)].into_iter().collect());
        for term in 0..OUTBOUND_MESSAGES_MAX as u64 {
            a.send(msg(1, 2, term));
        }
        std::thread::sleep(Duration::from_millis(200)); // into its first back-off
        let t = Instant::now();
        a.set_peers(&BTreeMap::new());
        assert!(t.elapsed() < Duration::from_millis(500), "set_peers blocked for {:?}", t.elapsed());
        let t = Instant::now();
        a.stop();
        assert!(t.elapsed() < Duration::from_secs(3), "the closed link did not end: {:?}", t.elapsed());
    }

    /// A peer whose process is gone (its links closed, its port refusing) is reported once as
    /// `MsgUnreachable` from it; a peer that is only slow or still listening is not.
    #[test]
    fn a_peer_whose_link_closed_and_port_refuses_is_reported_down() {
        let (mut a, a_addr, _a_rx) = start(1, "c");
        let (mut b, b_addr, b_rx) = start(2, "c");
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        b.set_peers(&[(1, a_addr.clone())].into_iter().collect());
        assert!(a.send(msg(1, 2, 5)));
        assert_eq!(b_rx.recv_timeout(Duration::from_secs(5)).expect("b got").term, 5);
        assert!(!peer_is_down(&a_addr), "a listens");
        a.stop(); // its listener and links close, as a kill -9 closes them
        let m = b_rx.recv_timeout(Duration::from_secs(5)).expect("a reported down");
        assert_eq!((m.get_msg_type(), m.from, m.to), (MessageType::MsgUnreachable, 1, 2));
        assert!(peer_is_down(&a_addr));
        assert!(!peer_is_down("no-such-host.invalid:1"), "a name that does not resolve proves nothing");
        b.stop();
    }

    /// Local-only raft messages (an election trigger, a down report) never come off the wire.
    #[test]
    fn a_peer_cannot_send_a_local_message() {
        let (mut a, _a_addr, _a_rx) = start(1, "c");
        let (mut b, b_addr, b_rx) = start(2, "c");
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        for t in [MessageType::MsgHup, MessageType::MsgUnreachable] {
            let mut m = msg(1, 2, 5);
            m.set_msg_type(t);
            assert!(a.send(m));
        }
        assert!(b_rx.recv_timeout(Duration::from_millis(500)).is_err(), "nothing local got through");
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

    /// A CA and certificates for nodes 1..=n in a temp dir.
    fn pki(n: u64) -> (tempfile::TempDir, Vec<tally_net::TlsFiles>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = tally_net::tls::generate_ca().expect("ca");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.cert).expect("write");
        let files = (1..=n)
            .map(|id| {
                let c = tally_net::tls::issue_node_cert(&ca.key, id, &[]).expect("issue");
                let (cert, key) = (dir.path().join(format!("{id}.pem")), dir.path().join(format!("{id}.key")));
                std::fs::write(&cert, c.cert).expect("write");
                std::fs::write(&key, c.key).expect("write");
                tally_net::TlsFiles { ca: ca_path.clone(), cert, key }
            })
            .collect();
        (dir, files)
    }

    fn start_tls(node: u64, files: &tally_net::TlsFiles) -> (TcpTransport, String, Receiver<Message>) {
        start_tls_revoking(node, files, RevokedCerts::default())
    }

    fn start_tls_revoking(
        node: u64,
        files: &tally_net::TlsFiles,
        revoked: RevokedCerts,
    ) -> (TcpTransport, String, Receiver<Message>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let (tx, rx) = bounded(64);
        let sec = PeerSecurity::from_files(files).expect("tls").with_revoked(revoked);
        (TcpTransport::start(l, LocalPeer::fixed("c", node, [1; 32]), sec, tx).expect("start"), addr, rx)
    }

    fn revocation_of(node: u64, files: &tally_net::TlsFiles) -> crate::revocation::Revocation {
        let der = tally_net::tls::load_certs(&files.cert).expect("cert").remove(0);
        crate::revocation::Revocation { node_id: node, cert_fingerprint: cert_fingerprint(der.as_ref()) }
    }

    /// A certificate revoked on a replica is refused there whichever side dials, and a link
    /// already open with it is cut when the revocation arrives; other nodes' links stay.
    #[test]
    fn a_revoked_certificate_is_refused_both_ways_and_cut() {
        let (_d, f) = pki(3);
        let revoked = RevokedCerts::default();
        let (mut a, a_addr, _a_rx) = start_tls(1, &f[0]);
        let (mut b, b_addr, b_rx) = start_tls_revoking(2, &f[1], revoked.clone());
        let (mut c, _c_addr, _c_rx) = start_tls(3, &f[2]);
        a.set_peers(&[(2, b_addr.clone())].into_iter().collect());
        c.set_peers(&[(2, b_addr.clone())].into_iter().collect());
        assert!(a.send(msg(1, 2, 5)));
        assert!(c.send(msg(3, 2, 6)));
        let mut got: Vec<u64> =
            (0..2).map(|_| b_rx.recv_timeout(Duration::from_secs(5)).expect("b got").term).collect();
        got.sort_unstable();
        assert_eq!(got, [5, 6]);
        // Node 1's certificate is revoked on b: its open link is cut, and it can't dial again.
        revoked.extend(&[revocation_of(1, &f[0])]);
        b.cut_revoked();
        for term in 10..30 {
            a.send(msg(1, 2, term));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(c.send(msg(3, 2, 99)));
        let later: Vec<u64> =
            std::iter::from_fn(|| b_rx.recv_timeout(Duration::from_millis(500)).ok()).map(|m| m.term).collect();
        assert!(later.contains(&99), "node 3 still gets through: {later:?}");
        assert!(later.iter().all(|t| *t == 99 || *t < 12), "node 1 got through after the revocation: {later:?}");
        // Dialling out: b refuses to talk to a listener presenting the revoked certificate.
        let local = LocalPeer::fixed("c", 2, [1; 32]);
        let b_sec = PeerSecurity::from_files(&f[1]).expect("tls").with_revoked(revoked);
        let err = probe(&a_addr, &local, &b_sec, 1).expect_err("a revoked listener");
        assert!(err.contains("revoked"), "{err}");
        a.stop();
        b.stop();
        c.stop();
    }

    #[test]
    fn mutual_tls_links_carry_messages() {
        let (_d, f) = pki(2);
        let (mut a, a_addr, a_rx) = start_tls(1, &f[0]);
        let (mut b, b_addr, b_rx) = start_tls(2, &f[1]);
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        b.set_peers(&[(1, a_addr)].into_iter().collect());
        assert!(a.send(msg(1, 2, 5)));
        assert!(b.send(msg(2, 1, 6)));
        assert_eq!(b_rx.recv_timeout(Duration::from_secs(5)).expect("b got").term, 5);
        assert_eq!(a_rx.recv_timeout(Duration::from_secs(5)).expect("a got").term, 6);
        a.stop();
        b.stop();
    }

    /// A replica's certificate can't be used to pose as another node, and a plaintext stranger (the
    /// old echoed-hello attack) gets nothing to Raft.
    #[test]
    fn posing_as_another_node_or_skipping_tls_gets_nothing_through() {
        let (_d, f) = pki(3);
        let (mut b, b_addr, b_rx) = start_tls(2, &f[1]);
        // Node 1's certificate, claiming to be node 3 (the leader, say).
        let client = tally_net::tls::client_config(&f[0].ca, Some(&f[0])).expect("client");
        let tcp = TcpStream::connect(&b_addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut s = Stream::connect(tcp, client, &tally_net::tls::node_server_name(2), deadline).expect("tls");
        let r = handshake(
            &mut s,
            &LocalPeer::fixed("c", 3, [1; 32]),
            Side::Dialler { node: 2, version: PEER_PROTOCOL_VERSION },
        );
        let _ = write_frame(&mut s, &msg(3, 2, 1000).write_to_bytes().expect("encode"));
        let _ = s.flush();
        assert!(r.is_err() || b_rx.recv_timeout(Duration::from_millis(500)).is_err());
        assert!(b_rx.try_recv().is_err(), "nothing reached Raft");
        // Plaintext: a hello, then a heartbeat at a high term.
        let mut p = TcpStream::connect(&b_addr).expect("connect");
        p.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        let _ = write_frame(&mut p, &tally_codec::encode(&Hello::new("c", 3, [1; 32])));
        let _ = write_frame(&mut p, &msg(3, 2, 1000).write_to_bytes().expect("encode"));
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut p, &mut got);
        assert!(!got.windows(4).any(|w| w == crate::handshake::PEER_MAGIC), "the replica sent its hello to a stranger");
        assert!(b_rx.recv_timeout(Duration::from_millis(500)).is_err(), "nothing reached Raft");
        b.stop();
    }

    fn snapshot_msg(from: u64, to: u64, index: u64, data: Vec<u8>) -> Message {
        let mut m = msg(from, to, 3);
        m.set_msg_type(MessageType::MsgSnapshot);
        let snap = m.mut_snapshot();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = 3;
        snap.data = data.into();
        m
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Before: a snapshot over the frame limit was dropped by the link, and Raft retried it
    /// forever. It now streams in chunks, heartbeats queued behind it are not held back until
    /// it ends, and the sender reports it delivered.
    #[test]
    fn a_snapshot_larger_than_a_frame_streams_in_chunks() {
        let (mut a, a_addr, _a_rx) = start(1, "c");
        let (mut b, b_addr, b_rx) = start(2, "c");
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        b.set_peers(&[(1, a_addr)].into_iter().collect());
        let data = pattern(FRAME_BYTES_MAX * 2 + 12_345, 7);
        assert!(a.send(snapshot_msg(1, 2, 40, data.clone())));
        for term in 10..20 {
            assert!(a.send(msg(1, 2, term)));
        }
        let mut heartbeats_before_snapshot = 0;
        let got = loop {
            let m = b_rx.recv_timeout(Duration::from_secs(60)).expect("b got the snapshot");
            if m.get_msg_type() == MessageType::MsgSnapshot {
                break m;
            }
            heartbeats_before_snapshot += 1;
        };
        assert_eq!(got.get_snapshot().get_metadata().index, 40);
        assert!(got.get_snapshot().data == data, "the data arrives whole and unaltered");
        assert!(heartbeats_before_snapshot > 0, "messages queued behind the snapshot went out between its chunks");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let reports = a.take_snapshot_reports();
            if !reports.is_empty() {
                assert_eq!(reports, vec![(2, true)]);
                break;
            }
            assert!(Instant::now() < deadline, "the snapshot was reported");
            std::thread::sleep(Duration::from_millis(10));
        }
        a.stop();
        b.stop();
    }

    /// A snapshot stream cut halfway resumes; the receiver tells the next connection from the
    /// same peer how much it holds, and the rest completes the snapshot.
    #[test]
    fn a_cut_snapshot_stream_resumes_where_it_stopped() {
        let (mut b, b_addr, b_rx) = start(2, "c");
        let data = pattern(5 * tally_codec::limits::SNAPSHOT_CHUNK_BYTES + 99, 3);
        let stream = StreamId::of(40, 3, &data);
        let half = 2 * tally_codec::limits::SNAPSHOT_CHUNK_BYTES as u64;
        let dial = || {
            let mut s = TcpStream::connect(&b_addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            handshake(
                &mut s,
                &LocalPeer::fixed("c", 1, [1; 32]),
                Side::Dialler { node: 2, version: PEER_PROTOCOL_VERSION },
            )
            .expect("handshake");
            let r = read_frame(&mut s, RESUME_BYTES_MAX).expect("resume point");
            (s, tally_codec::decode::<Resume>(&r, RESUME_BYTES_MAX).expect("decode"))
        };
        let (mut s, resume) = dial();
        assert_eq!(resume.offset_for(&stream), 0);
        for (o, e) in snapshot_stream::chunks(stream.total, 0).take_while(|(o, _)| *o < half) {
            write_frame(&mut s, &snapshot_stream::chunk_frame(&stream, o, &data[o as usize..e as usize])).expect("w");
        }
        s.flush().expect("flush");
        drop(s); // the link breaks
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut s, resume) = loop {
            let (s, r) = dial();
            if r.offset_for(&stream) == half || Instant::now() > deadline {
                break (s, r);
            }
        };
        assert_eq!(resume.offset_for(&stream), half, "the receiver kept what it had");
        for (o, e) in snapshot_stream::chunks(stream.total, resume.offset_for(&stream)) {
            write_frame(&mut s, &snapshot_stream::chunk_frame(&stream, o, &data[o as usize..e as usize])).expect("w");
        }
        let mut end = vec![KIND_END];
        end.extend_from_slice(&stream.digest);
        snapshot_msg(1, 2, 40, Vec::new()).write_to_vec(&mut end).expect("encode");
        write_frame(&mut s, &end).expect("end");
        s.flush().expect("flush");
        let got = b_rx.recv_timeout(Duration::from_secs(10)).expect("b got the snapshot");
        assert!(got.get_snapshot().data == data);
        b.stop();
    }

    /// Snapshots queued behind a streaming one are not held without bound: only the newest
    /// waits, and a superseded one is reported undelivered.
    #[test]
    fn only_the_newest_snapshot_waits_behind_a_stream() {
        let (mut a, a_addr, _a_rx) = start(1, "c");
        let (mut b, b_addr, b_rx) = start(2, "c");
        a.set_peers(&[(2, b_addr)].into_iter().collect());
        b.set_peers(&[(1, a_addr)].into_iter().collect());
        assert!(a.send(snapshot_msg(1, 2, 40, pattern(FRAME_BYTES_MAX * 2, 1))));
        assert!(a.send(snapshot_msg(1, 2, 41, pattern(10, 2))));
        assert!(a.send(snapshot_msg(1, 2, 42, pattern(10, 3))));
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = b_rx.recv_timeout(Duration::from_secs(60)).expect("b got a snapshot");
            got.push(m.get_snapshot().get_metadata().index);
        }
        assert_eq!(got, [40, 42], "41 was superseded by 42");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut reports = Vec::new();
        while reports.len() < 3 && Instant::now() < deadline {
            reports.extend(a.take_snapshot_reports());
            std::thread::sleep(Duration::from_millis(10));
        }
        reports.sort_unstable();
        assert_eq!(reports, [(2, false), (2, true), (2, true)]);
        a.stop();
        b.stop();
    }

    /// Dials `addr` as node `claim` (plaintext) and reads the resume frame.
    fn dial_as(addr: &str, claim: u64) -> TcpStream {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        handshake(
            &mut s,
            &LocalPeer::fixed("c", claim, [1; 32]),
            Side::Dialler { node: 2, version: PEER_PROTOCOL_VERSION },
        )
        .expect("handshake");
        read_frame(&mut s, RESUME_BYTES_MAX).expect("resume point");
        s
    }

    fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(std::io::Read::read(s, &mut buf), Ok(0) | Err(_))
    }

    /// One link per node id: a second link claiming node 1 replaces the first, which is closed;
    /// messages flow on the newest.
    #[test]
    fn a_second_link_for_a_node_replaces_the_first() {
        let (mut b, b_addr, b_rx) = start(2, "c");
        let mut first = dial_as(&b_addr, 1);
        let mut second = dial_as(&b_addr, 1);
        assert!(closed(&mut first), "the older link is closed");
        write_frame(&mut second, &[&[KIND_MESSAGE][..], &msg(1, 2, 7).write_to_bytes().expect("encode")].concat())
            .expect("write");
        second.flush().expect("flush");
        assert_eq!(b_rx.recv_timeout(Duration::from_secs(5)).expect("b got").term, 7);
        // Another node's link is left alone; cutting node 1 closes only its own.
        let mut other = dial_as(&b_addr, 3);
        b.cut_inbound(1);
        assert!(closed(&mut second), "node 1's link is cut");
        other.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        let mut buf = [0u8; 1];
        let still_open = matches!(std::io::Read::read(&mut other, &mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
        assert!(still_open, "node 3's link stays");
        b.stop();
    }

    #[test]
    fn garbage_closes_the_connection_without_panic() {
        let (mut b, b_addr, b_rx) = start(2, "c");
        let mut s = TcpStream::connect(&b_addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        handshake(
            &mut s,
            &LocalPeer::fixed("c", 1, [1; 32]),
            Side::Dialler { node: 2, version: PEER_PROTOCOL_VERSION },
        )
        .expect("handshake");
        let resume = read_frame(&mut s, RESUME_BYTES_MAX).expect("resume point");
        assert_eq!(tally_codec::decode::<Resume>(&resume, RESUME_BYTES_MAX).expect("decode"), Resume::default());
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
