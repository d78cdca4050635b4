//! Rate-limited log lines for events an outsider can trigger (a refused command, a bad frame, a
//! failed handshake): one attacker script must not fill the disk with one line per attempt.
//!
//! Each call site names a *kind* (a `&'static str`). Per kind, at most
//! [`LINES_PER_WINDOW_MAX`] lines are written per [`WINDOW_MS`]; the rest are counted, in
//! `tally_log_suppressed_total{kind}` and in one summary line written before the kind's first
//! line of a later window. With [`LineCap`] on the log writer, a line is at most
//! [`LINE_BYTES_MAX`] bytes, so a kind writes at most [`KIND_BYTES_PER_MIN_MAX`] per minute and
//! all kinds together at most [`ATTACK_LOG_BYTES_PER_MIN_MAX`].
//!
//! ```text
//! warn_limited!("admin_refused", signer = %k, "admin command refused")
//!        │
//!        ▼  admit("admin_refused")      per kind: lines in this window, suppressed count
//!   Some(suppressed) ─▶ [summary line if suppressed > 0] + the line
//!   None            ─▶ tally_log_suppressed_total{kind="admin_refused"} += 1
//! ```
//!
//! Use [`warn_limited!`](crate::warn_limited) or [`error_limited!`](crate::error_limited) from any
//! crate that depends on `tally-net`; they need no `tracing` import of their own.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

pub use tracing;

/// Lines written per kind per window, at most.
pub const LINES_PER_WINDOW_MAX: u32 = 10;
/// The window over which [`LINES_PER_WINDOW_MAX`] holds.
pub const WINDOW_MS: u64 = 60_000;
/// Kinds tracked at once; call sites name kinds in code, so this is never reached in practice,
/// and past it every new kind shares the kind `"other"`.
pub const KINDS_MAX: usize = 64;
/// One log line, at most, once [`LineCap`] wraps the writer (longer lines are cut).
pub const LINE_BYTES_MAX: usize = 1024;
/// Log bytes one kind writes in any minute, at most: its lines and one summary line per window,
/// for every window a minute can touch (a minute straddles two of one minute each).
pub const KIND_BYTES_PER_MIN_MAX: usize =
    (LINES_PER_WINDOW_MAX as usize + 1) * LINE_BYTES_MAX * (60_000u64.div_ceil(WINDOW_MS) as usize + 1);
/// Log bytes all rate-limited kinds together write per minute, at most, whatever the attack.
pub const ATTACK_LOG_BYTES_PER_MIN_MAX: usize = KINDS_MAX * KIND_BYTES_PER_MIN_MAX;

/// One kind's current window.
#[derive(Debug)]
struct Window {
    started: Instant,
    written: u32,
    /// Suppressed in this window, not yet reported in a summary line.
    suppressed: u64,
}

/// Per-kind counters; one shared instance ([`admit`]) serves every crate.
#[derive(Debug)]
pub struct Limiter {
    lines_max: u32,
    window: Duration,
    kinds: Mutex<HashMap<&'static str, Window>>,
}

impl Limiter {
    pub fn new(lines_max: u32, window: Duration) -> Limiter {
        Limiter { lines_max, window, kinds: Mutex::new(HashMap::new()) }
    }

    /// Whether a line of `kind` may be written at `now`: `Some(n)` with the lines suppressed
    /// since the last one written (to report first), or `None` when this one is suppressed.
    pub fn admit(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock();
        let key = if kinds.len() >= KINDS_MAX && !kinds.contains_key(kind) { "other" } else { kind };
        let w = kinds.entry(key).or_insert(Window { started: now, written: 0, suppressed: 0 });
        if now.saturating_duration_since(w.started) >= self.window {
            w.started = now;
            w.written = 0;
        }
        if w.written >= self.lines_max {
            w.suppressed += 1;
            return None;
        }
        w.written += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

static SHARED: LazyLock<Limiter> =
    LazyLock::new(|| Limiter::new(LINES_PER_WINDOW_MAX, Duration::from_millis(WINDOW_MS)));

/// [`Limiter::admit`] on the process-wide limiter; a suppressed line is counted in
/// `tally_log_suppressed_total{kind}`.
pub fn admit(kind: &'static str) -> Option<u64> {
    let admitted = SHARED.admit(kind, Instant::now());
    if admitted.is_none() {
        metrics::counter!("tally_log_suppressed_total", "kind" => kind).increment(1);
    }
    admitted
}

/// A `tracing` event at `$level` (`WARN`, `ERROR`, `INFO`), rate-limited by `$kind`: the
/// fields and message are those of `tracing::event!`.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $kind:expr, $($rest:tt)+) => {
        if let ::core::option::Option::Some(suppressed) = $crate::log_limit::admit($kind) {
            if suppressed > 0 {
                $crate::log_limit::tracing::event!(
                    $crate::log_limit::tracing::Level::$level,
                    kind = $kind,
                    suppressed,
                    "lines of this kind were suppressed by the log rate limit"
                );
            }
            $crate::log_limit::tracing::event!($crate::log_limit::tracing::Level::$level, kind = $kind, $($rest)+);
        }
    };
}

/// `tracing::warn!`, rate-limited by kind (see [`log_limit`](crate::log_limit)).
#[macro_export]
macro_rules! warn_limited {
    ($kind:expr, $($rest:tt)+) => { $crate::log_limited!(WARN, $kind, $($rest)+) };
}

/// `tracing::error!`, rate-limited by kind (see [`log_limit`](crate::log_limit)).
#[macro_export]
macro_rules! error_limited {
    ($kind:expr, $($rest:tt)+) => { $crate::log_limited!(ERROR, $kind, $($rest)+) };
}

/// A log writer for one event that writes at most [`LINE_BYTES_MAX`] bytes of it: no logged
/// field, however long, makes a line longer. A text line is cut and ends in `...[cut]`; a JSON
/// line (`--log-format json`) stays one valid JSON object: a cut one is written as
/// `{"log_line_cut":true,"line":"<the line's start, as a JSON string>"}`. Give
/// `tracing_subscriber` a fresh one per event (`|| LineCap::text(std::io::stderr().lock())`): the
/// event's bytes are held (at most the bound) and written when it is dropped, under the lock.
pub struct LineCap<W: Write> {
    inner: W,
    held: Vec<u8>,
    cut: bool,
    json: bool,
}

impl<W: Write> LineCap<W> {
    /// For plain-text log lines.
    pub fn text(inner: W) -> LineCap<W> {
        LineCap { inner, held: Vec::new(), cut: false, json: false }
    }

    /// For JSON log lines (one object per line).
    pub fn json(inner: W) -> LineCap<W> {
        LineCap { inner, held: Vec::new(), cut: false, json: true }
    }

    /// The line as it goes out: whole, or cut within the bound.
    fn line(&self) -> Vec<u8> {
        if !self.cut {
            return self.held.clone();
        }
        if !self.json {
            let mut out = self.held[..self.held.len().min(LINE_BYTES_MAX - CUT_MARK.len())].to_vec();
            out.extend_from_slice(CUT_MARK);
            return out;
        }
        let mut out = JSON_CUT_HEAD.to_vec();
        for c in String::from_utf8_lossy(&self.held).chars() {
            let escaped = json_escaped(c);
            if out.len() + escaped.len() + JSON_CUT_TAIL.len() > LINE_BYTES_MAX {
                break;
            }
            out.extend_from_slice(escaped.as_bytes());
        }
        out.extend_from_slice(JSON_CUT_TAIL);
        out
    }
}

/// Written in place of what a cut text line lost.
const CUT_MARK: &[u8] = b"...[cut]\n";
const JSON_CUT_HEAD: &[u8] = br#"{"log_line_cut":true,"line":""#;
const JSON_CUT_TAIL: &[u8] = b"\"}\n";

/// One character as it stands inside a JSON string.
fn json_escaped(c: char) -> String {
    match c {
        '"' => "\\\"".into(),
        '\\' => "\\\\".into(),
        '\n' => "\\n".into(),
        c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32),
        c => c.to_string(),
    }
}

impl<W: Write> Write for LineCap<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = LINE_BYTES_MAX.saturating_sub(self.held.len());
        let take = buf.len().min(room);
        self.held.extend_from_slice(&buf[..take]);
        if take < buf.len() {
            self.cut = true;
        }
        // What is past the cap is dropped on purpose: report it as written.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(()) // the line goes out whole when the event's writer is dropped
    }
}

impl<W: Write> Drop for LineCap<W> {
    fn drop(&mut self) {
        let line = self.line();
        let _ = self.inner.write_all(&line);
        let _ = self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_writes_its_quota_per_window_then_reports_what_it_suppressed() {
        let l = Limiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..100).map(|_| l.admit("a", t0)).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // Another kind has its own quota.
        assert_eq!(l.admit("b", t0), Some(0));
        // Still in the window: suppressed.
        assert_eq!(l.admit("a", t0 + Duration::from_secs(9)), None);
        // The next window's first line carries the count.
        assert_eq!(l.admit("a", t0 + Duration::from_secs(10)), Some(98));
        assert_eq!(l.admit("a", t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn kinds_past_the_bound_share_one_quota() {
        let l = Limiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        let names: Vec<&'static str> =
            (0..KINDS_MAX + 5).map(|i| &*Box::leak(format!("k{i}").into_boxed_str())).collect();
        let written = names.iter().filter(|n| l.admit(n, t0).is_some()).count();
        assert_eq!(written, KINDS_MAX + 1, "64 kinds and the shared 'other'");
        assert_eq!(l.kinds.lock().len(), KINDS_MAX + 1);
    }

    #[test]
    fn a_long_line_is_cut_at_the_bound_and_keeps_its_newline() {
        let mut out = Vec::new();
        {
            let mut w = LineCap::text(&mut out);
            w.write_all(&[b'x'; 700]).expect("write");
            w.write_all(&[b'y'; 700]).expect("write");
            w.write_all(b"\n").expect("write");
        }
        assert_eq!(out.len(), LINE_BYTES_MAX);
        assert!(out.ends_with(CUT_MARK), "{}", String::from_utf8_lossy(&out[out.len() - 20..]));
        let mut short = Vec::new();
        LineCap::text(&mut short).write_all(b"short line\n").expect("write");
        assert_eq!(short, b"short line\n");
    }

    /// `--log-format json` promises one JSON object per line: a cut line is still one.
    #[test]
    fn a_long_json_line_is_cut_into_a_valid_json_object() {
        let mut out = Vec::new();
        {
            let mut w = LineCap::json(&mut out);
            w.write_all(br#"{"level":"WARN","fields":{"message":""#).expect("write");
            w.write_all("\"\\\u{1}é".repeat(400).as_bytes()).expect("write");
            w.write_all(b"\"}}\n").expect("write");
        }
        assert!(out.len() <= LINE_BYTES_MAX, "{} bytes", out.len());
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let text = String::from_utf8(out).expect("utf-8");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("valid JSON");
        assert_eq!(v["log_line_cut"], true);
        assert!(v["line"].as_str().expect("line").starts_with(r#"{"level":"WARN""#));
        let mut short = Vec::new();
        LineCap::json(&mut short).write_all(b"{\"a\":1}\n").expect("write");
        assert_eq!(short, b"{\"a\":1}\n");
    }
}
