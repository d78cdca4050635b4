//! The peer-link handshake: the first frames each side sends on a new connection, before any
//! Raft message. It keeps replicas of another cluster, or with another configuration, from
//! joining. Authentication will be added here, as its own step, without touching the transport.
//!
//! ```text
//!  A ──Hello{magic, version, cluster_id, node_id, fingerprint}──▶ B     (both send at once)
//!  A ◀─Hello───────────────────────────────────────────────────── B
//!  A ──Verdict{Accept | Refuse(reason)}──▶ B                            (both judge the other)
//!  A ◀─Verdict──────────────────────────── B
//! ```
//! Both sides learn both verdicts, so a refusal is logged with its reason on both ends.

use crate::frame::{read_frame, write_frame};
use borsh::{BorshDeserialize, BorshSerialize};
use std::io::{Read, Write};

/// First bytes of every hello: "tally raft".
pub const PEER_MAGIC: [u8; 4] = *b"TLYR";
/// Bumped on any change to the peer protocol. 3: snapshots carry the revoked certificates, and
/// a node's removal may carry a revocation in its context.
pub const PEER_PROTOCOL_VERSION: u16 = 3;
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
    pub fn new(cluster_id: &str, node_id: u64, config_fingerprint: [u8; 32]) -> Self {
        Hello {
            magic: PEER_MAGIC,
            version: PEER_PROTOCOL_VERSION,
            cluster_id: cluster_id.to_string(),
            node_id,
            config_fingerprint,
        }
    }

    /// Why `peer` may not talk to `self`, if it may not. `expect_node` is the node id dialled.
    pub fn judge(&self, peer: &Hello, expect_node: Option<u64>) -> Result<(), String> {
        if peer.magic != PEER_MAGIC {
            return Err("not a tally peer (bad magic)".into());
        }
        if peer.version != self.version {
            return Err(format!("peer protocol version {} but this replica speaks {}", peer.version, self.version));
        }
        if peer.cluster_id != self.cluster_id {
            return Err(format!("cluster id {:?} does not match this cluster {:?}", peer.cluster_id, self.cluster_id));
        }
        if peer.config_fingerprint != self.config_fingerprint {
            return Err(format!(
                "configuration fingerprint {} does not match this replica's {}",
                hex8(&peer.config_fingerprint),
                hex8(&self.config_fingerprint)
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
}

/// Runs the handshake on a fresh connection and returns the peer's hello once both sides
/// accepted. The caller sets socket timeouts.
///
/// # Errors
/// I/O failures, a malformed hello, or a refusal by either side (with the reason).
pub fn handshake<S: Read + Write>(
    stream: &mut S,
    local: &Hello,
    expect_node: Option<u64>,
) -> Result<Hello, HandshakeError> {
    write_frame(stream, &tally_codec::encode(local))?;
    stream.flush()?;
    let bytes = read_frame(stream, HANDSHAKE_BYTES_MAX)?;
    let (peer, ours) = match tally_codec::decode::<Hello>(&bytes, HANDSHAKE_BYTES_MAX) {
        Ok(p) if p.cluster_id.len() > CLUSTER_ID_BYTES_MAX => (None, Err("cluster id too long".to_string())),
        Ok(p) => {
            let v = local.judge(&p, expect_node);
            (Some(p), v)
        }
        Err(e) => (None, Err(format!("malformed hello: {e}"))),
    };
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
        return Err(HandshakeError::RefusedByUs(r));
    }
    match theirs {
        Some(Verdict::Accept) => peer.ok_or_else(|| HandshakeError::Malformed("no hello".into())),
        Some(Verdict::Refuse(r)) => Err(HandshakeError::RefusedByPeer(r)),
        None => Err(HandshakeError::Malformed("no verdict from peer".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn run_pair(a: Hello, b: Hello) -> (Result<Hello, HandshakeError>, Result<Hello, HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            handshake(&mut s, &b, None)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let ra = handshake(&mut c, &a, None);
        (ra, t.join().expect("join"))
    }

    #[test]
    fn matching_peers_accept() {
        let (a, b) = run_pair(Hello::new("c1", 1, [7; 32]), Hello::new("c1", 2, [7; 32]));
        assert_eq!(a.expect("a").node_id, 2);
        assert_eq!(b.expect("b").node_id, 1);
    }

    #[test]
    fn wrong_cluster_is_refused_on_both_ends() {
        let (a, b) = run_pair(Hello::new("c1", 1, [7; 32]), Hello::new("other", 2, [7; 32]));
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
        let (a, _) = run_pair(Hello::new("c1", 1, [7; 32]), Hello::new("c1", 2, [8; 32]));
        assert!(matches!(a, Err(HandshakeError::RefusedByUs(r)) if r.contains("fingerprint")));
    }

    #[test]
    fn one_sided_refusal_is_reported_as_the_peers() {
        let local = Hello::new("c1", 1, [7; 32]);
        // The peer dials node 3 but reaches node 2: only the dialler refuses.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            handshake(&mut s, &Hello::new("c1", 2, [7; 32]), None)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let ra = handshake(&mut c, &local, Some(3));
        assert!(matches!(ra, Err(HandshakeError::RefusedByUs(r)) if r.contains("expected node 3")));
        let rb = t.join().expect("join");
        assert!(matches!(rb, Err(HandshakeError::RefusedByPeer(r)) if r.contains("expected node 3")));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            handshake(&mut s, &Hello::new("c1", 2, [7; 32]), None)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        write_frame(&mut c, b"\x01\x02garbage").expect("write");
        drop(c);
        assert!(t.join().expect("join").is_err());
    }
}
