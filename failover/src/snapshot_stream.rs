//! Snapshots on the peer link, streamed in chunks.
//!
//! A state snapshot can be far larger than a frame ([`FRAME_BYTES_MAX`]); sending it as one
//! message dropped it and, with an export on every retry, set off an election storm. The link
//! therefore carries a `MsgSnapshot` as:
//!
//! ```text
//!  Chunk{index, term, total, digest, offset, bytes} × ⌈total / SNAPSHOT_CHUNK_BYTES⌉
//!  End{digest} ‖ the message with its snapshot data left out
//! ```
//!
//! Other messages to the same peer (heartbeats) go out between chunks. The receiver assembles
//! the data per peer, checks its length and blake3 digest, puts it back into the message and
//! hands that to Raft. **Resuming**: a partial assembly outlives its connection. When a peer
//! dials this replica again, the first frame this side writes after the handshake is a
//! [`Resume`] naming the snapshot it holds part of and how much; a sender streaming that same
//! snapshot (same index, term and digest) starts from there.

use borsh::{BorshDeserialize, BorshSerialize};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tally_codec::limits::{SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES};

#[cfg(doc)]
use tally_codec::limits::FRAME_BYTES_MAX;

/// Frame kinds after the handshake: the first byte of every frame body.
pub const KIND_MESSAGE: u8 = 0;
pub const KIND_CHUNK: u8 = 1;
pub const KIND_END: u8 = 2;

/// Which snapshot a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct StreamId {
    pub index: u64,
    pub term: u64,
    pub total: u64,
    pub digest: [u8; 32],
}

impl StreamId {
    /// The stream of `data`, the snapshot at (`index`, `term`).
    pub fn of(index: u64, term: u64, data: &[u8]) -> Self {
        Self::of_parts(index, term, &[data])
    }

    /// The stream of the concatenation of `parts`.
    pub fn of_parts(index: u64, term: u64, parts: &[&[u8]]) -> Self {
        let mut h = blake3::Hasher::new();
        for p in parts {
            h.update(p);
        }
        let total = parts.iter().map(|p| p.len() as u64).sum();
        StreamId { index, term, total, digest: *h.finalize().as_bytes() }
    }
}

/// Bytes `start..end` of the concatenation of `parts`, as borrowed pieces.
pub fn range_of<'a>(parts: &[&'a [u8]], start: u64, end: u64) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut base = 0u64;
    for p in parts {
        let (lo, hi) = (base, base + p.len() as u64);
        if hi > start && lo < end {
            out.push(&p[(start.max(lo) - lo) as usize..(end.min(hi) - lo) as usize]);
        }
        base = hi;
    }
    out
}

/// What the receiving side already holds, sent to a peer that dials it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Resume {
    pub stream: Option<StreamId>,
    pub offset: u64,
}

impl Resume {
    /// Where to start sending `stream`.
    pub fn offset_for(&self, stream: &StreamId) -> u64 {
        match self.stream {
            Some(s) if s == *stream => self.offset.min(stream.total),
            _ => 0,
        }
    }
}

/// One chunk's header; its bytes follow in the same frame.
#[derive(Debug, Clone, Copy, BorshSerialize, BorshDeserialize)]
pub struct ChunkHeader {
    pub stream: StreamId,
    pub offset: u64,
}

/// Encodes a chunk frame body: kind, header, bytes.
pub fn chunk_frame(stream: &StreamId, offset: u64, bytes: &[u8]) -> Vec<u8> {
    chunk_frame_of(stream, offset, &[bytes])
}

/// [`chunk_frame`] of bytes given in pieces.
pub fn chunk_frame_of(stream: &StreamId, offset: u64, pieces: &[&[u8]]) -> Vec<u8> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(1 + 96 + len);
    out.push(KIND_CHUNK);
    out.extend_from_slice(&tally_codec::encode(&ChunkHeader { stream: *stream, offset }));
    for p in pieces {
        out.extend_from_slice(p);
    }
    out
}

/// The chunk boundaries of a stream from `offset`.
pub fn chunks(total: u64, offset: u64) -> impl Iterator<Item = (u64, u64)> {
    let step = SNAPSHOT_CHUNK_BYTES as u64;
    (offset..total).step_by(SNAPSHOT_CHUNK_BYTES).map(move |o| (o, (o + step).min(total)))
}

/// Why a stream was refused (the connection is then closed).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("snapshot of {0} bytes is over the limit of {SNAPSHOT_BYTES_MAX}")]
    TooLarge(u64),
    #[error("snapshot chunk at offset {offset} leaves a gap after {held} bytes")]
    Gap { offset: u64, held: u64 },
    #[error("snapshot chunk runs past the declared {total} bytes")]
    Overrun { total: u64 },
    #[error("malformed snapshot frame: {0}")]
    Malformed(String),
    #[error("snapshot ended after {held} of {total} bytes")]
    Incomplete { held: u64, total: u64 },
    #[error("snapshot data does not match its digest")]
    Digest,
}

struct Partial {
    stream: StreamId,
    data: Vec<u8>,
}

/// Partial snapshots per sending peer, shared by every connection from that peer.
#[derive(Clone, Default)]
pub struct Assemblies {
    by_peer: Arc<Mutex<HashMap<u64, Partial>>>,
}

impl Assemblies {
    /// What to tell `peer` when it dials in.
    pub fn resume_for(&self, peer: u64) -> Resume {
        match self.by_peer.lock().get(&peer) {
            Some(p) => Resume { stream: Some(p.stream), offset: p.data.len() as u64 },
            None => Resume::default(),
        }
    }

    /// Adds one chunk frame (its body after the kind byte) from `peer`.
    ///
    /// # Errors
    /// A malformed, oversized or discontinuous chunk; the partial snapshot is dropped.
    pub fn chunk(&self, peer: u64, body: &[u8]) -> Result<(), StreamError> {
        let mut r = body;
        let h = ChunkHeader::deserialize(&mut r).map_err(|e| StreamError::Malformed(e.to_string()))?;
        let bytes = r;
        let s = h.stream;
        if s.total > SNAPSHOT_BYTES_MAX as u64 {
            return Err(StreamError::TooLarge(s.total));
        }
        let end = h.offset.checked_add(bytes.len() as u64).ok_or(StreamError::Overrun { total: s.total })?;
        if end > s.total {
            self.by_peer.lock().remove(&peer);
            return Err(StreamError::Overrun { total: s.total });
        }
        let mut map = self.by_peer.lock();
        let held = match map.get(&peer) {
            Some(p) if p.stream == s => p.data.len() as u64,
            _ => 0,
        };
        if h.offset > held {
            map.remove(&peer);
            return Err(StreamError::Gap { offset: h.offset, held });
        }
        let p = map.entry(peer).or_insert_with(|| Partial { stream: s, data: Vec::new() });
        if p.stream != s {
            // A new snapshot from this peer replaces the one it gave up on.
            *p = Partial { stream: s, data: Vec::new() };
        }
        // Overlap with what is held (a sender resuming from an older point) is skipped.
        let skip = (held - h.offset) as usize;
        if skip < bytes.len() {
            p.data.extend_from_slice(&bytes[skip..]);
        }
        Ok(())
    }

    /// Ends `peer`'s stream: the whole data, checked against its digest.
    ///
    /// # Errors
    /// Data missing or not matching the digest; the partial snapshot is dropped.
    pub fn end(&self, peer: u64, digest: &[u8; 32]) -> Result<(StreamId, Vec<u8>), StreamError> {
        let p = self.by_peer.lock().remove(&peer).ok_or(StreamError::Incomplete { held: 0, total: 0 })?;
        if p.stream.digest != *digest {
            return Err(StreamError::Malformed("end of a stream that was not started".into()));
        }
        if p.data.len() as u64 != p.stream.total {
            return Err(StreamError::Incomplete { held: p.data.len() as u64, total: p.stream.total });
        }
        if blake3::hash(&p.data).as_bytes() != digest {
            return Err(StreamError::Digest);
        }
        Ok((p.stream, p.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(a: &Assemblies, peer: u64, s: &StreamId, data: &[u8], from: u64, to: u64) -> Result<(), StreamError> {
        for (o, e) in chunks(s.total, from).take_while(|(o, _)| *o < to) {
            let frame = chunk_frame(s, o, &data[o as usize..e as usize]);
            a.chunk(peer, &frame[1..])?;
        }
        Ok(())
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn pieces_are_cut_like_the_whole() {
        let (a, b) = (data(10), data(25));
        let whole: Vec<u8> = [a.clone(), b.clone()].concat();
        assert_eq!(StreamId::of_parts(1, 1, &[&a, &b]), StreamId::of(1, 1, &whole));
        for (lo, hi) in [(0, 35), (3, 9), (8, 12), (10, 10), (10, 35), (30, 35)] {
            assert_eq!(range_of(&[&a, &b], lo, hi).concat(), whole[lo as usize..hi as usize], "{lo}..{hi}");
        }
    }

    #[test]
    fn a_stream_assembles_and_checks_its_digest() {
        let d = data(3 * SNAPSHOT_CHUNK_BYTES + 17);
        let s = StreamId::of(9, 2, &d);
        let a = Assemblies::default();
        feed(&a, 1, &s, &d, 0, s.total).expect("chunks");
        let (got_s, got) = a.end(1, &s.digest).expect("end");
        assert_eq!((got_s, got), (s, d));
        assert_eq!(a.resume_for(1), Resume::default(), "nothing held after the end");
    }

    #[test]
    fn a_broken_stream_resumes_where_the_receiver_stopped() {
        let d = data(4 * SNAPSHOT_CHUNK_BYTES);
        let s = StreamId::of(9, 2, &d);
        let a = Assemblies::default();
        feed(&a, 1, &s, &d, 0, 2 * SNAPSHOT_CHUNK_BYTES as u64).expect("first half");
        let resume = a.resume_for(1);
        assert_eq!(resume.offset_for(&s), 2 * SNAPSHOT_CHUNK_BYTES as u64);
        // Another snapshot starts from 0; an older resume point (overlap) is fine too.
        let other = StreamId::of(10, 2, &d[1..]);
        assert_eq!(resume.offset_for(&other), 0);
        feed(&a, 1, &s, &d, SNAPSHOT_CHUNK_BYTES as u64, s.total).expect("overlapping resume");
        assert_eq!(a.end(1, &s.digest).expect("end").1, d);
    }

    #[test]
    fn gaps_overruns_corruption_and_oversize_are_refused() {
        let d = data(2 * SNAPSHOT_CHUNK_BYTES);
        let s = StreamId::of(9, 2, &d);
        let a = Assemblies::default();
        let frame = chunk_frame(&s, SNAPSHOT_CHUNK_BYTES as u64, &d[..10]);
        assert!(matches!(a.chunk(1, &frame[1..]), Err(StreamError::Gap { .. })));
        let frame = chunk_frame(&s, s.total - 5, &d[..10]);
        assert!(matches!(a.chunk(1, &frame[1..]), Err(StreamError::Overrun { .. })));
        let huge = StreamId { total: SNAPSHOT_BYTES_MAX as u64 + 1, ..s };
        let frame = chunk_frame(&huge, 0, &d[..10]);
        assert!(matches!(a.chunk(1, &frame[1..]), Err(StreamError::TooLarge(_))));
        assert!(matches!(a.chunk(1, &[1, 2, 3]), Err(StreamError::Malformed(_))));
        // Half a stream, then its end: incomplete.
        feed(&a, 1, &s, &d, 0, SNAPSHOT_CHUNK_BYTES as u64).expect("half");
        assert!(matches!(a.end(1, &s.digest), Err(StreamError::Incomplete { .. })));
        // A whole stream whose bytes were altered: the digest catches it.
        let mut bad = d.clone();
        bad[5] ^= 1;
        feed(&a, 1, &s, &bad, 0, s.total).expect("chunks");
        assert_eq!(a.end(1, &s.digest), Err(StreamError::Digest));
    }
}
