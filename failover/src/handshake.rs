//! The peer-link handshake: the first frames each side sends on a new connection, before any
//! Raft message. It keeps replicas of another cluster, or with another configuration, from
//! joining. Authentication will be added here, as its own step, without touching the transport.
//!
//! ```text
//!  dialler A                                                        listener B
//!  A ──Hello{magic, version v, cluster_id, node_id, fingerprint}──▶ B
//!  A ◀─Hello{…, version v}──────────────────────────────────────── B   (B answers at A's version
//!  A ──Verdict{Accept | Refuse(reason)}──▶ B                            when it speaks it)
//!  A ◀─Verdict──────────────────────────── B                            (both judge the other)
//! ```
//! Both sides learn both verdicts, so a refusal is logged with its reason on both ends.
//!
//! **Versions.** A replica speaks every peer protocol version from [`PEER_PROTOCOL_OLDEST`] to
//! [`PEER_PROTOCOL_VERSION`]; a link runs at one of them. The dialler offers the newest first;
//! a listener of this release answers at the offered version. Release 0.3 (protocol 2) writes its
//! hello without reading the dialler's and refuses any other version, so a dialler that is
//! refused offers the next older version on a new connection ([`crate::transport`]). The
//! configuration fingerprint mixes in the version, so each version has its own
//! ([`LocalPeer`]). What a link's version changes is listed in `docs/formats.md`.

use crate::frame::{read_frame, write_frame};
use borsh::{BorshDeserialize, BorshSerialize};
use std::io::{Read, Write};

/// First bytes of every hello: "tally raft".
pub const PEER_MAGIC: [u8; 4] = *b"TLYR";
/// The newest peer protocol version, bumped on any change to the peer protocol. 3: snapshots
/// carry the revoked certificates, and a node's removal may carry a revocation in its context.
pub const PEER_PROTOCOL_VERSION: u16 = 3;
/// The oldest version this replica still speaks: 2, release 0.3's, so that a cluster can be
/// upgraded one replica at a time.
pub const PEER_PROTOCOL_OLDEST: u16 = 2;
/// Bound on a handshake frame.
pub const HANDSHAKE_BYTES_MAX: usize = 4096;
/// Bound on the cluster id's length.
pub const CLUSTER_ID_BYTES_MAX: usize = 256;

/// Who a replica claims to be.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u16,
    pub cluster_id: String,
    pub node_id: u64,
    /// Digest of the settings every replica must share (see [`crate::RaftConfig`]).
    pub config_fingerprint: [u8; 32],
}

impl Hello {
    /// A hello at the newest version (tests, and tools that speak only it).
    pub fn new(cluster_id: &str, node_id: u64, config_fingerprint: [u8; 32]) -> Self {
        Hello {
            magic: PEER_MAGIC,
            version: PEER_PROTOCOL_VERSION,
            cluster_id: cluster_id.to_string(),
            node_id,
            config_fingerprint,
        }
    }
}

/// Who this replica is, and its configuration fingerprint at each version it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer {
    pub cluster_id: String,
    pub node_id: u64,
    /// `fingerprints[i]` is the fingerprint at version `PEER_PROTOCOL_OLDEST + i`.
    fingerprints: Vec<[u8; 32]>,
}

impl LocalPeer {
    /// `fingerprint_at(v)`: the configuration fingerprint at version `v` (see
    /// [`crate::RaftConfig::timing_fingerprint`]).
    pub fn new(cluster_id: &str, node_id: u64, fingerprint_at: impl Fn(u16) -> [u8; 32]) -> Self {
        let fingerprints = (PEER_PROTOCOL_OLDEST..=PEER_PROTOCOL_VERSION).map(fingerprint_at).collect();
        LocalPeer { cluster_id: cluster_id.to_string(), node_id, fingerprints }
    }

    /// One fingerprint at every version (tests).
    pub fn fixed(cluster_id: &str, node_id: u64, fingerprint: [u8; 32]) -> Self {
        LocalPeer::new(cluster_id, node_id, |_| fingerprint)
    }

    /// Whether this replica speaks `version`.
    pub fn speaks(version: u16) -> bool {
        (PEER_PROTOCOL_OLDEST..=PEER_PROTOCOL_VERSION).contains(&version)
    }

    fn fingerprint(&self, version: u16) -> [u8; 32] {
        assert!(Self::speaks(version), "a fingerprint only for a version spoken");
        self.fingerprints[usize::from(version - PEER_PROTOCOL_OLDEST)]
    }

    /// This replica's hello at `version`.
    pub fn hello(&self, version: u16) -> Hello {
        Hello {
            magic: PEER_MAGIC,
            version,
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
            config_fingerprint: self.fingerprint(version),
        }
    }

    /// Why `peer` may not talk to this replica at `version`, if it may not. `expect_node` is
    /// the node id dialled.
    pub fn judge(&self, peer: &Hello, version: u16, expect_node: Option<u64>) -> Result<(), String> {
        if peer.magic != PEER_MAGIC {
            return Err("not a tally peer (bad magic)".into());
        }
        if peer.version != version {
            return Err(format!(
                "peer protocol version {} but this replica speaks {version} on this link (it speaks {PEER_PROTOCOL_OLDEST} to {PEER_PROTOCOL_VERSION})",
                peer.version
            ));
        }
        if peer.cluster_id != self.cluster_id {
            return Err(format!("cluster id {:?} does not match this cluster {:?}", peer.cluster_id, self.cluster_id));
        }
        let ours = self.fingerprint(version);
        if peer.config_fingerprint != ours {
            return Err(format!(
                "configuration fingerprint {} does not match this replica's {}",
                hex8(&peer.config_fingerprint),
                hex8(&ours)
            ));
        }
        if peer.node_id == self.node_id {
            return Err(format!("peer claims this replica's own node id {}", peer.node_id));
        }
        if let Some(n) = expect_node {
            if peer.node_id != n {
                return Err(format!("expected node {n} at this address, found node {}", peer.node_id));
            }
        }
        Ok(())
    }
}

fn hex8(b: &[u8; 32]) -> String {
    b[..8].iter().map(|x| format!("{x:02x}")).collect()
}

/// Each side's judgement of the other's hello.
#[derive(Debug, Clone, BorshSerialize, BorshDeserialize)]
pub enum Verdict {
    Accept,
    Refuse(String),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a malformed handshake: {0}")]
    Malformed(String),
    /// This replica refused the peer.
    #[error("refused peer: {0}")]
    RefusedByUs(String),
    /// The peer refused this replica.
    #[error("peer refused us: {0}")]
    RefusedByPeer(String),
    /// The dialled peer speaks only an older version this replica also speaks: dial again
    /// offering it.
    #[error("the peer speaks peer protocol {version}: {why}")]
    OlderPeer { version: u16, why: String },
}

/// Which side of a connection runs the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Dialled node `node`, offering `version`.
    Dialler { node: u64, version: u16 },
    /// Accepted the connection: answers at the version the dialler offers, when it speaks it.
    Listener,
}

/// A handshake both sides accepted: the peer's hello and the link's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub peer: Hello,
    pub version: u16,
}

/// Runs the handshake on a fresh connection and returns the peer's hello and the link's
/// version once both sides accepted. The caller sets socket timeouts.
///
/// # Errors
/// I/O failures, a malformed hello, or a refusal by either side (with the reason).
pub fn handshake<S: Read + Write>(stream: &mut S, local: &LocalPeer, side: Side) -> Result<Linked, HandshakeError> {
    let (peer, version, expect_node) = match side {
        Side::Dialler { node, version } => {
            write_frame(stream, &tally_codec::encode(&local.hello(version)))?;
            stream.flush()?;
            (read_hello(stream), version, Some(node))
        }
        Side::Listener => {
            let peer = read_hello(stream);
            let offered = peer.as_ref().ok().map(|p| p.version).filter(|v| LocalPeer::speaks(*v));
            let version = offered.unwrap_or(PEER_PROTOCOL_VERSION);
            write_frame(stream, &tally_codec::encode(&local.hello(version)))?;
            stream.flush()?;
            (peer, version, None)
        }
    };
    let ours = peer.as_ref().map_err(Clone::clone).and_then(|p| local.judge(p, version, expect_node));
    let verdict = match &ours {
        Ok(()) => Verdict::Accept,
        Err(r) => Verdict::Refuse(r.clone()),
    };
    write_frame(stream, &tally_codec::encode(&verdict))?;
    stream.flush()?;
    let theirs = read_frame(stream, HANDSHAKE_BYTES_MAX)
        .ok()
        .and_then(|b| tally_codec::decode::<Verdict>(&b, HANDSHAKE_BYTES_MAX).ok());
    if let Err(r) = ours {
        return match (&peer, side) {
            // Release 0.3 answers at its own version whatever it was offered.
            (Ok(p), Side::Dialler { version, .. }) if p.version < version && LocalPeer::speaks(p.version) => {
                Err(HandshakeError::OlderPeer { version: p.version, why: r })
            }
            _ => Err(HandshakeError::RefusedByUs(r)),
        };
    }
    match (theirs, peer) {
        (Some(Verdict::Accept), Ok(peer)) => Ok(Linked { peer, version }),
        (Some(Verdict::Accept), Err(_)) => Err(HandshakeError::Malformed("no hello".into())),
        (Some(Verdict::Refuse(r)), _) => Err(HandshakeError::RefusedByPeer(r)),
        (None, _) => Err(HandshakeError::Malformed("no verdict from peer".into())),
    }
}

/// The peer's hello, or why it is not one.
fn read_hello<S: Read>(stream: &mut S) -> Result<Hello, String> {
    let bytes = read_frame(stream, HANDSHAKE_BYTES_MAX).map_err(|e| format!("no hello: {e}"))?;
    match tally_codec::decode::<Hello>(&bytes, HANDSHAKE_BYTES_MAX) {
        Ok(p) if p.cluster_id.len() > CLUSTER_ID_BYTES_MAX => Err("cluster id too long".to_string()),
        Ok(p) => Ok(p),
        Err(e) => Err(format!("malformed hello: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    type Outcome = Result<Linked, HandshakeError>;

    /// A connection to a listener that runs `serve` on the one connection it accepts.
    fn listen_once<T: Send + 'static>(
        serve: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (TcpStream, std::thread::JoinHandle<T>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || serve(l.accept().expect("accept").0));
        (TcpStream::connect(addr).expect("connect"), t)
    }

    /// `a` dials `b` (node 2 unless `expect` says otherwise), offering `version`.
    fn run_pair(a: LocalPeer, b: LocalPeer, expect: u64, version: u16) -> (Outcome, Outcome) {
        let (mut c, t) = listen_once(move |mut s| handshake(&mut s, &b, Side::Listener));
        let ra = handshake(&mut c, &a, Side::Dialler { node: expect, version });
        (ra, t.join().expect("join"))
    }

    fn peer(cluster: &str, node: u64, fp: u8) -> LocalPeer {
        LocalPeer::new(cluster, node, |v| [fp.wrapping_add(v as u8); 32])
    }

    #[test]
    fn matching_peers_accept_at_the_offered_version() {
        for version in PEER_PROTOCOL_OLDEST..=PEER_PROTOCOL_VERSION {
            let (a, b) = run_pair(peer("c1", 1, 7), peer("c1", 2, 7), 2, version);
            let (a, b) = (a.expect("a"), b.expect("b"));
            assert_eq!((a.peer.node_id, a.version), (2, version));
            assert_eq!((b.peer.node_id, b.version), (1, version));
            assert_eq!(a.peer.config_fingerprint, [7 + version as u8; 32], "the fingerprint of that version");
        }
    }

    #[test]
    fn a_version_nobody_speaks_is_refused() {
        let (mut c, t) = listen_once(move |mut s| handshake(&mut s, &peer("c1", 2, 7), Side::Listener));
        let mut future = peer("c1", 1, 7).hello(PEER_PROTOCOL_VERSION);
        future.version = PEER_PROTOCOL_VERSION + 1;
        write_frame(&mut c, &tally_codec::encode(&future)).expect("hello");
        let answer: Hello =
            tally_codec::decode(&read_frame(&mut c, HANDSHAKE_BYTES_MAX).expect("hello"), 4096).expect("hello");
        assert_eq!(answer.version, PEER_PROTOCOL_VERSION, "the listener answers at its newest");
        write_frame(&mut c, &tally_codec::encode(&Verdict::Refuse("version".into()))).expect("verdict");
        let r = t.join().expect("join");
        assert!(
            matches!(r, Err(HandshakeError::RefusedByUs(ref why)) if why.contains("peer protocol version 4")),
            "{r:?}"
        );
    }

    /// Release 0.3's side of the handshake, as it ran: its hello first (version 2), then the
    /// peer's, judged with `peer.version != 2` a refusal.
    fn release_0_3(s: &mut TcpStream, me: &LocalPeer) -> Result<Hello, String> {
        write_frame(s, &tally_codec::encode(&me.hello(2))).map_err(|e| e.to_string())?;
        let peer: Hello = tally_codec::decode(&read_frame(s, HANDSHAKE_BYTES_MAX).map_err(|e| e.to_string())?, 4096)
            .map_err(|e| e.to_string())?;
        let ours = if peer.version != 2 {
            Err(format!("peer protocol version {} but this replica speaks 2", peer.version))
        } else {
            me.judge(&peer, 2, None)
        };
        let verdict = match &ours {
            Ok(()) => Verdict::Accept,
            Err(r) => Verdict::Refuse(r.clone()),
        };
        write_frame(s, &tally_codec::encode(&verdict)).map_err(|e| e.to_string())?;
        let _ = read_frame(s, HANDSHAKE_BYTES_MAX);
        ours.map(|()| peer)
    }

    #[test]
    fn a_release_0_3_listener_refuses_the_newest_and_accepts_version_2() {
        for (offer, linked) in [(PEER_PROTOCOL_VERSION, false), (2, true)] {
            let (mut c, t) = listen_once(move |mut s| release_0_3(&mut s, &peer("c1", 2, 7)));
            let ours = handshake(&mut c, &peer("c1", 1, 7), Side::Dialler { node: 2, version: offer });
            let theirs = t.join().expect("join");
            assert_eq!(ours.is_ok(), linked, "offer {offer}: {ours:?}");
            assert_eq!(theirs.is_ok(), linked, "offer {offer}: {theirs:?}");
            if !linked {
                assert!(matches!(ours, Err(HandshakeError::OlderPeer { version: 2, .. })), "{ours:?}");
            }
        }
    }

    #[test]
    fn a_release_0_3_dialler_links_at_version_2() {
        let (mut c, t) = listen_once(move |mut s| handshake(&mut s, &peer("c1", 2, 7), Side::Listener));
        let old = release_0_3(&mut c, &peer("c1", 1, 7)).expect("0.3 accepts");
        assert_eq!(old.version, 2);
        let new = t.join().expect("join").expect("the listener accepts");
        assert_eq!(new.version, 2);
    }

    #[test]
    fn wrong_cluster_is_refused_on_both_ends() {
        let (a, b) = run_pair(peer("c1", 1, 7), peer("other", 2, 7), 2, PEER_PROTOCOL_VERSION);
        match (a, b) {
            (Err(HandshakeError::RefusedByUs(ra)), Err(HandshakeError::RefusedByUs(rb))) => {
                assert!(ra.contains("cluster id"), "{ra}");
                assert!(rb.contains("cluster id"), "{rb}");
            }
            other => panic!("expected refusals, got {other:?}"),
        }
    }

    #[test]
    fn wrong_fingerprint_is_refused() {
        let (a, _) = run_pair(peer("c1", 1, 7), peer("c1", 2, 8), 2, PEER_PROTOCOL_VERSION);
        assert!(matches!(a, Err(HandshakeError::RefusedByUs(r)) if r.contains("fingerprint")));
    }

    #[test]
    fn one_sided_refusal_is_reported_as_the_peers() {
        // The peer dials node 3 but reaches node 2: only the dialler refuses.
        let (ra, rb) = run_pair(peer("c1", 1, 7), peer("c1", 2, 7), 3, PEER_PROTOCOL_VERSION);
        assert!(matches!(ra, Err(HandshakeError::RefusedByUs(r)) if r.contains("expected node 3")));
        assert!(matches!(rb, Err(HandshakeError::RefusedByPeer(r)) if r.contains("expected node 3")));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let (mut c, t) = listen_once(move |mut s| handshake(&mut s, &peer("c1", 2, 7), Side::Listener));
        write_frame(&mut c, b"\x01\x02garbage").expect("write");
        drop(c);
        assert!(t.join().expect("join").is_err());
    }
}
