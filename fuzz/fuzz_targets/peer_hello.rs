//! The peer handshake: the first bytes any TCP client of the peer port can send, before any
//! authentication. The input is the byte stream the remote side sends (`len ‖ Hello`, then
//! `len ‖ Verdict`, as `failover::frame` frames); it is replayed through the public
//! `handshake()` over an in-memory stream, so the private `Verdict` decode is reached as in
//! production. The input is also decoded directly as one `Hello` body (canonical check).
//!
//! Properties: no panic; a handshake that succeeds returns a hello this replica accepts; a
//! decoded `Hello` re-encodes to its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{self, Cursor, Read, Write};
use tally_failover::handshake::{handshake, Hello, LocalPeer, Side, CLUSTER_ID_BYTES_MAX, HANDSHAKE_BYTES_MAX, PEER_PROTOCOL_VERSION};

/// Reads the remote side's bytes from the fuzz input; whatever this replica writes is dropped.
struct Peer<'a> {
    input: Cursor<&'a [u8]>,
    written: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = tally_codec::decode::<Hello>(data, HANDSHAKE_BYTES_MAX) {
        assert_eq!(tally_codec::encode(&h), data, "Hello decode accepted a non-canonical encoding");
    }

    let local = LocalPeer::fixed("fuzz-cluster", 1, [7; 32]);
    // Accepting side (expects anyone) and dialling side (expects node 2).
    for side in [Side::Listener, Side::Dialler { node: 2, version: PEER_PROTOCOL_VERSION }] {
        let expect = match side {
            Side::Listener => None,
            Side::Dialler { node, .. } => Some(node),
        };
        let mut peer = Peer { input: Cursor::new(data), written: 0 };
        if let Ok(linked) = handshake(&mut peer, &local, side) {
            let remote = &linked.peer;
            assert!(remote.cluster_id.len() <= CLUSTER_ID_BYTES_MAX, "accepted an over-long cluster id");
            assert!(local.judge(remote, linked.version, expect).is_ok(), "handshake accepted a hello its own judge refuses");
        }
        assert!(peer.written > 4, "this replica's hello was not sent");
    }
});
