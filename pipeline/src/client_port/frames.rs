//! Frames off one client connection, at a pace: a frame's deadline starts at its first byte, an
//! idle connection is closed, an oversized length is refused before any body arrives (then
//! drained for a bounded time so the error reaches the client).

use std::io::Read;
use std::time::{Duration, Instant};
use tally_codec::{limits, ErrorCode};

/// A connection with nothing in flight that sends no frame for this long is closed (clients
/// heartbeat every second; a one-shot command reconnects).
pub const IDLE_TIMEOUT_MS: u64 = 60_000;
/// Once a frame's first byte arrived, the whole frame must arrive within this long plus its
/// length at [`FRAME_RATE_BYTES_PER_S_MIN`]: a slow drip can't pin a connection open.
pub const FRAME_GRACE_MS: u64 = 5_000;
/// The slowest pace a frame body may arrive at (after the grace).
pub const FRAME_RATE_BYTES_PER_S_MIN: u64 = 256 * 1024;

/// After an oversized frame is refused, its body is read and dropped for at most this long,
/// so the error frame reaches the client: closing with unread bytes resets the connection, and
/// a reset discards what the client had not read yet.
pub const DRAIN_MS: u64 = 5_000;
/// ... and at most this many bytes (a length prefix may claim 4 GiB).
pub const DRAIN_BYTES_MAX: usize = 2 * limits::FRAME_BYTES_MAX;

/// Reads and drops up to `len` bytes (see [`DRAIN_MS`]).
pub(super) fn drain(r: &mut impl Read, len: usize) {
    let deadline = Instant::now() + Duration::from_millis(DRAIN_MS);
    let mut left = len.min(DRAIN_BYTES_MAX);
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 && Instant::now() < deadline {
        match r.read(&mut buf[..left.min(64 * 1024)]) {
            Ok(0) => return,
            Ok(n) => left -= n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Why a connection's reader gave up.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("bad frame: {0}")]
    Framing(std::io::Error),
    #[error("bad frame: frame of {len} bytes is over the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("frame of {len} bytes did not arrive within {limit_ms} ms (the minimum rate is {FRAME_RATE_BYTES_PER_S_MIN} B/s)")]
    TooSlow { len: usize, limit_ms: u64 },
    #[error("connection idle for {idle_ms} ms; closed")]
    Idle { idle_ms: u64 },
}

impl ReadError {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            ReadError::Framing(_) | ReadError::TooLarge { .. } => ErrorCode::Malformed,
            ReadError::TooSlow { .. } | ReadError::Idle { .. } => ErrorCode::Timeout,
        }
    }
    pub(super) fn metric(&self) -> &'static str {
        match self {
            ReadError::Framing(_) | ReadError::TooLarge { .. } => "framing",
            ReadError::TooSlow { .. } => "slow_frame",
            ReadError::Idle { .. } => "idle",
        }
    }
}

/// The pace a connection must keep.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pacing {
    grace_ms: u64,
    rate_bytes_per_s_min: u64,
    idle_ms: u64,
}

impl Pacing {
    pub(super) const DEFAULT: Pacing =
        Pacing { grace_ms: FRAME_GRACE_MS, rate_bytes_per_s_min: FRAME_RATE_BYTES_PER_S_MIN, idle_ms: IDLE_TIMEOUT_MS };
}

/// Reads frames while enforcing the idle timeout and the minimum frame rate: a frame's deadline
/// starts at its first byte. Partial progress survives the reader's periodic wake-ups.
pub(super) struct PacedFrames {
    pacing: Pacing,
    bytes_max: usize,
    header: [u8; 4],
    header_got: usize,
    body: Vec<u8>,
    body_len: usize,
    frame_started: Option<Instant>,
    last_frame: Instant,
}

impl PacedFrames {
    pub(super) fn new(bytes_max: usize, pacing: Pacing) -> Self {
        PacedFrames {
            pacing,
            bytes_max,
            header: [0; 4],
            header_got: 0,
            body: Vec::new(),
            body_len: 0,
            frame_started: None,
            last_frame: Instant::now(),
        }
    }

    fn deadline_ms(&self, len: usize) -> u64 {
        self.pacing.grace_ms + (len as u64).saturating_mul(1000) / self.pacing.rate_bytes_per_s_min.max(1)
    }

    /// The next whole frame; `None` at a clean end of stream. `waiting` means replies are
    /// pending, so silence is not idleness.
    pub(super) fn next(&mut self, r: &mut impl Read, waiting: bool) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            let step = if self.header_got < 4 {
                r.read(&mut self.header[self.header_got..])
            } else {
                // Grow as bytes arrive (at most 64 KiB a step): a 4-byte header must not reserve
                // 16 MiB up front.
                let have = self.body.len();
                let want = (self.body_len - have).min(64 * 1024);
                self.body.resize(have + want, 0);
                let read = r.read(&mut self.body[have..]);
                self.body.truncate(have + *read.as_ref().unwrap_or(&0));
                read
            };
            match step {
                Ok(0) if self.header_got == 0 => return Ok(None),
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated frame");
                    return Err(ReadError::Framing(e));
                }
                Ok(n) => {
                    if self.frame_started.is_none() {
                        self.frame_started = Some(Instant::now());
                    }
                    if self.header_got < 4 {
                        self.header_got += n;
                        if self.header_got == 4 {
                            self.body_len = u32::from_le_bytes(self.header) as usize;
                            if self.body_len > self.bytes_max {
                                return Err(ReadError::TooLarge { len: self.body_len, limit: self.bytes_max });
                            }
                            self.body.clear();
                        }
                    }
                    if self.header_got == 4 && self.body.len() == self.body_len {
                        self.header_got = 0;
                        self.frame_started = None;
                        self.last_frame = Instant::now();
                        return Ok(Some(std::mem::take(&mut self.body)));
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    self.check_deadlines(waiting)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Framing(e)),
            }
            if self.frame_started.is_some() {
                self.check_deadlines(waiting)?;
            }
        }
    }

    fn check_deadlines(&self, waiting: bool) -> Result<(), ReadError> {
        match self.frame_started {
            Some(started) => {
                let len = if self.header_got == 4 { self.body_len } else { 0 };
                let limit_ms = self.deadline_ms(len);
                if started.elapsed() > Duration::from_millis(limit_ms) {
                    return Err(ReadError::TooSlow { len, limit_ms });
                }
            }
            None if !waiting && self.last_frame.elapsed() > Duration::from_millis(self.pacing.idle_ms) => {
                return Err(ReadError::Idle { idle_ms: self.pacing.idle_ms })
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::Ordering;

    const FAST: Pacing = Pacing { grace_ms: 300, rate_bytes_per_s_min: 1_000_000, idle_ms: 300 };

    /// A server-side socket with a short read timeout, and the client's end.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        (s, c)
    }

    #[test]
    fn whole_frames_come_through_in_pieces() {
        let (mut s, mut c) = pair();
        let mut frames = PacedFrames::new(1 << 20, FAST);
        let t = std::thread::spawn(move || {
            let mut f = 5u32.to_le_bytes().to_vec();
            f.extend_from_slice(b"hello");
            for b in f {
                c.write_all(&[b]).expect("write");
                std::thread::sleep(Duration::from_millis(5));
            }
            c
        });
        assert_eq!(frames.next(&mut s, false).expect("frame"), Some(b"hello".to_vec()));
        drop(t.join());
    }

    /// A slowloris (a 100,000-byte length prefix, then a byte at a time) is cut once the frame's
    /// deadline passes, however steadily it drips.
    #[test]
    fn a_dripping_frame_is_cut_at_its_deadline() {
        let (mut s, mut c) = pair();
        let mut frames = PacedFrames::new(1 << 20, FAST);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let t = std::thread::spawn(move || {
            let _ = c.write_all(&100_000u32.to_le_bytes());
            while !st.load(Ordering::Acquire) {
                if c.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let r = frames.next(&mut s, true);
        stop.store(true, Ordering::Release);
        let _ = t.join();
        assert!(matches!(r, Err(ReadError::TooSlow { len: 100_000, limit_ms: 400 })), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(1_500), "cut at the deadline");
    }

    #[test]
    fn an_idle_connection_is_closed_unless_replies_are_pending() {
        let (mut s, _c) = pair();
        let mut frames = PacedFrames::new(1 << 20, FAST);
        let started = Instant::now();
        // Replies pending: silence is the client waiting, not idleness.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let mut probe = PacedFrames::new(1 << 20, FAST);
            probe.last_frame = started;
            assert!(probe.check_deadlines(true).is_ok());
        }
        assert!(matches!(frames.next(&mut s, false), Err(ReadError::Idle { idle_ms: 300 })));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn an_oversized_length_is_refused_before_any_body_arrives() {
        let (mut s, mut c) = pair();
        let mut frames = PacedFrames::new(1024, FAST);
        c.write_all(&2048u32.to_le_bytes()).expect("write");
        assert!(matches!(frames.next(&mut s, false), Err(ReadError::TooLarge { len: 2048, limit: 1024 })));
    }
}
