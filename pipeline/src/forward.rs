//! Followers forward client frames to the leader (`docs/protocol.md`, "Forwarding by followers"):
//! writes and linearizable reads sent to any replica are served. The frame is relayed untouched
//! over one pooled connection; replies come back by id and go to the client's own connection. If
//! the link breaks, every frame in flight on it is answered with a retryable error (the client
//! resends the same bytes, so exactly-once holds).

use crossbeam::channel::Sender;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::wire::{self, ClientMessage, Envelope, Relayed, ServerMessage, WireError};
use tally_codec::{encode, limits, ErrorCode};
use tally_net::{Dial, Stream};

/// Frames forwarded and not yet answered, per link, at most.
pub const FORWARDED_IN_FLIGHT_MAX: usize = 4096;

/// How long the link outlives the leader becoming unknown before its frames are answered
/// retryable: the answers already on their way still arrive (a leader that revoked its own
/// certificate answers the command after the others dropped it from the members), and a leader
/// that vanished without a word is given up on long before the clients' own timeouts.
pub const LEADERLESS_GRACE: Duration = Duration::from_millis(500);

/// Where a forwarded frame's reply goes: the client's own id and reply channel.
type ReplyTo = (u64, Sender<Envelope<ServerMessage>>);

struct Link {
    addr: String,
    writer: Mutex<BufWriter<Stream>>,
    /// forwarded id → (client's id, client's reply channel)
    waiting: Mutex<HashMap<u64, ReplyTo>>,
    next_id: AtomicU64,
    dead: std::sync::atomic::AtomicBool,
}

/// The follower's connection to the current leader, opened on demand. With TLS it presents this
/// node's certificate, so the leader serves it from the replicas' pool (a flood of anonymous
/// connections on the leader can't shut followers out) and accepts its `Forwarded` frames.
pub struct Forwarder {
    link: Mutex<Option<Arc<Link>>>,
    dial: Dial,
    /// Since when no leader has been known ([`Forwarder::retain_leader`]).
    leaderless_since: Mutex<Option<Instant>>,
}

impl Forwarder {
    pub fn new(dial: Dial) -> Forwarder {
        Forwarder { link: Mutex::new(None), dial, leaderless_since: Mutex::new(None) }
    }

    /// Relays `msg` to the leader at `leader_addr`; the reply goes to `out` under `client_id`.
    pub fn forward(&self, leader_addr: &str, client_id: u64, msg: Relayed, out: &Sender<Envelope<ServerMessage>>) {
        let link = match self.link_to(leader_addr) {
            Ok(l) => l,
            Err(e) => return refuse(out, client_id, &format!("cannot reach the leader at {leader_addr}: {e}")),
        };
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = link.waiting.lock();
            if w.len() >= FORWARDED_IN_FLIGHT_MAX {
                drop(w);
                return refuse_code(out, client_id, ErrorCode::Overloaded, "too many frames forwarded to the leader");
            }
            w.insert(id, (client_id, out.clone()));
        }
        let body = encode(&Envelope { id, msg: ClientMessage::Forwarded(msg) });
        let sent = {
            let mut w = link.writer.lock();
            wire::write_frame(&mut *w, &body).and_then(|()| w.flush())
        };
        if sent.is_err() {
            self.drop_link(&link);
        }
    }

    fn link_to(&self, addr: &str) -> std::io::Result<Arc<Link>> {
        if let Some(l) = self.link.lock().as_ref() {
            if l.addr == addr && !l.dead.load(Ordering::Acquire) {
                return Ok(l.clone());
            }
        }
        // Dialled without holding the slot: a vanished leader's address can take seconds to
        // fail (no RST, a name that no longer resolves), and the sequencer looks at the slot on
        // every pass (`retain_leader`); holding it here stalled a new leader's first batch by
        // the connect timeout (found in Docker).
        let tcp = connect(addr)?;
        tcp.set_nodelay(true)?;
        let stream = self.dial.open(tcp, std::time::Instant::now() + Duration::from_secs(2))?;
        let reader = stream.clone();
        let link = Arc::new(Link {
            addr: addr.to_string(),
            writer: Mutex::new(BufWriter::new(stream)),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: std::sync::atomic::AtomicBool::new(false),
        });
        let l = link.clone();
        std::thread::Builder::new().name("forward".into()).spawn(move || read_replies(&l, reader))?;
        let mut slot = self.link.lock();
        if let Some(l) = slot.as_ref() {
            if l.addr == addr && !l.dead.load(Ordering::Acquire) {
                // Another connection thread dialled the same leader meanwhile: use its link.
                link.writer.lock().get_ref().shutdown();
                return Ok(l.clone());
            }
        }
        if let Some(old) = slot.replace(link.clone()) {
            fail_all(&old);
        }
        Ok(link)
    }

    /// Drops the link when it goes to another node than `leader` (the current leader's client
    /// address; this node's own when it leads), or when no leader has been known for
    /// [`LEADERLESS_GRACE`], answering every frame still waiting on it with a retryable error:
    /// the clients resend the same bytes, so exactly-once holds. A leader that vanished without
    /// closing its connections (a host or container gone: no RST) answers nothing, and without
    /// this the frames relayed to it waited out their clients' timeouts. Called by the sequencer
    /// every pass (≤ 100 ms).
    pub fn retain_leader(&self, leader: Option<&str>) {
        let given_up = {
            let mut since = self.leaderless_since.lock();
            match leader {
                Some(_) => {
                    *since = None;
                    false
                }
                None => since.get_or_insert_with(Instant::now).elapsed() >= LEADERLESS_GRACE,
            }
        };
        let old = {
            // Never waits: the sequencer calls this every pass, and tries again on the next.
            let Some(mut slot) = self.link.try_lock() else { return };
            match (slot.as_ref(), leader) {
                (Some(l), Some(leader)) if l.addr != leader => slot.take(),
                (Some(_), None) if given_up => slot.take(),
                _ => None,
            }
        };
        if let Some(l) = old {
            fail_all(&l);
        }
    }

    fn drop_link(&self, link: &Arc<Link>) {
        fail_all(link);
        let mut slot = self.link.lock();
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }
}

/// Connects to the leader's client address: an IP literal or a host name (`tally-1:7001` in
/// containers), every address it resolves to in turn.
fn connect(addr: &str) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} resolves to no address"));
    for sock in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sock, Duration::from_secs(2)) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn read_replies(link: &Arc<Link>, stream: Stream) {
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    while let Ok(true) = wire::read_frame(&mut r, &mut buf, limits::FRAME_BYTES_MAX) {
        let Ok(env) = wire::decode_server(&buf) else { break };
        if let Some((client_id, out)) = link.waiting.lock().remove(&env.id) {
            let _ = out.try_send(Envelope { id: client_id, msg: env.msg });
        }
    }
    fail_all(link);
}

fn fail_all(link: &Link) {
    link.dead.store(true, Ordering::Release);
    let waiting: Vec<_> = link.waiting.lock().drain().collect();
    for (_, (client_id, out)) in waiting {
        refuse(&out, client_id, "the link to the leader broke; retry");
    }
}

fn refuse(out: &Sender<Envelope<ServerMessage>>, id: u64, message: &str) {
    refuse_code(out, id, ErrorCode::Retry, message);
}

fn refuse_code(out: &Sender<Envelope<ServerMessage>>, id: u64, code: ErrorCode, message: &str) {
    let _ = out.try_send(Envelope { id, msg: ServerMessage::Error(WireError::new(code, message)) });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in Docker: the leader's address is `tally-1:7001` there, and parsing it as a socket
    /// address refused every forwarded frame.
    #[test]
    fn the_leader_is_dialled_by_host_name() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(connect(&format!("localhost:{port}")).is_ok());
        assert!(connect(&format!("127.0.0.1:{port}")).is_ok());
        let f = Forwarder::new(Dial::Plain);
        let link = f.link_to(&format!("localhost:{port}")).expect("link by host name");
        assert_eq!(link.addr, format!("localhost:{port}"));
    }

    /// Found in Docker: while a connection thread dialled a vanished leader (seconds until the
    /// connect timed out), the new leader's sequencer waited on the forwarder to check its link,
    /// and its first batch came 2-5 s after the election. The dial no longer holds the link, and
    /// the check never waits. A listener whose accept queue is full makes the dial hang here.
    #[test]
    fn checking_the_link_never_waits_for_a_dial() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let mut held = Vec::new();
        for _ in 0..2000 {
            match TcpStream::connect_timeout(&l.local_addr().expect("addr"), Duration::from_millis(50)) {
                Ok(s) => held.push(s),
                Err(_) => break, // the queue is full: the next dial hangs
            }
        }
        let f = std::sync::Arc::new(Forwarder::new(Dial::Plain));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f2, d2, a2) = (f.clone(), done.clone(), addr.clone());
        let dialer = std::thread::spawn(move || {
            let (tx, _rx) = crossbeam::channel::unbounded();
            f2.forward(&a2, 1, Relayed::Receipt { id: tally_codec::RequestId([1; 32]) }, &tx);
            d2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!done.load(Ordering::SeqCst), "precondition: the dial hangs (accept queue full)");
        f.retain_leader(Some("10.0.0.9:7001"));
        // The dial lasts its 2 s connect timeout; returning long before it ends is the point.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!done.load(Ordering::SeqCst), "retain_leader waited for the dial to end");
        dialer.join().expect("dialer");
        drop(held);
    }

    /// Found in Docker: a leader killed with its container closes nothing; frames relayed to it
    /// waited for their clients' timeouts after this node had become leader itself.
    #[test]
    fn a_leader_change_answers_the_frames_waiting_on_the_old_link() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let f = Forwarder::new(Dial::Plain);
        let (tx, rx) = crossbeam::channel::unbounded();
        // The "leader" accepts and never answers.
        f.forward(&addr, 7, Relayed::Receipt { id: tally_codec::RequestId([1; 32]) }, &tx);
        let _silent = l.accept().expect("accept");
        // Still the leader: the link stays and the frame waits.
        f.retain_leader(Some(&addr));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "answered while the leader is unchanged");
        assert!(f.link.lock().is_some());
        // Another leader (or this node, or none known): the frame is answered, retryable.
        f.retain_leader(Some("10.0.0.9:7001"));
        let env = rx.recv_timeout(Duration::from_secs(1)).expect("answered when the leader changed");
        assert_eq!(env.id, 7);
        assert!(matches!(env.msg, ServerMessage::Error(ref e) if e.code == ErrorCode::Retry), "{:?}", env.msg);
        assert!(f.link.lock().is_none());
        f.retain_leader(None); // nothing left: a no-op
    }

    /// Found revoking the leader's own certificate: the followers dropped the leader from the
    /// members (no leader known) a moment before its answer came back, answered the relayed
    /// command retryable, and the client asked again elsewhere. No leader known keeps the link
    /// for `LEADERLESS_GRACE`, then gives the frames up.
    #[test]
    fn no_leader_known_keeps_the_link_for_a_grace_time_then_answers_the_frames() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let f = Forwarder::new(Dial::Plain);
        let (tx, rx) = crossbeam::channel::unbounded();
        f.forward(&addr, 9, Relayed::Receipt { id: tally_codec::RequestId([1; 32]) }, &tx);
        let _silent = l.accept().expect("accept");
        f.retain_leader(None);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "given up at once when no leader is known");
        assert!(f.link.lock().is_some(), "the link was dropped within the grace time");
        std::thread::sleep(LEADERLESS_GRACE);
        f.retain_leader(None);
        let env = rx.recv_timeout(Duration::from_secs(1)).expect("answered after the grace time");
        assert_eq!(env.id, 9);
        assert!(matches!(env.msg, ServerMessage::Error(ref e) if e.code == ErrorCode::Retry), "{:?}", env.msg);
        assert!(f.link.lock().is_none());
    }
}
