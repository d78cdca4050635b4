//! One error enum for the client library: every variant's message says what was wrong, because
//! the `tally` binary prints them to users as `Error: <message>`.

use crate::client::Committed;
use tally_codec::wire::WireError;
use tally_codec::{CodecError, ErrorCode};

/// Everything a client operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// Sending or receiving on an open connection failed.
    #[error("I/O error talking to {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    /// The node did not answer in time (it may be paused or overloaded).
    #[error("no reply from {addr} within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u64 },
    /// The connection was closed (by the node, or because the client switched nodes).
    #[error("connection to {addr} closed")]
    Closed { addr: String },
    /// The node closed the connection and said why in a last frame (a plaintext client on a
    /// TLS port, an oversized frame, a full connection pool).
    #[error("{addr} closed the connection: {reason}")]
    ClosedBy { addr: String, reason: WireError },
    /// The node sent something that is not the expected reply.
    #[error("protocol error from {addr}: {detail}")]
    Protocol { addr: String, detail: String },
    /// The node answered with an error that retrying will not fix.
    #[error("{0}")]
    Server(WireError),
    /// The request was refused before execution (its id was not consumed).
    #[error("{0}")]
    Refused(WireError),
    /// The request was executed and committed, but its outcome is a refusal (e.g. insufficient
    /// funds). The receipt is still valid proof of that outcome.
    #[error("{code}")]
    Rejected { code: ErrorCode, committed: Box<Committed> },
    /// The node is at a named limit on shared work (watches, admin scans) and did nothing; ask
    /// again after the hint (`retry_after_ms`).
    #[error("{} ({}); retry in {} ms", .0.message, .0.limit, .0.retry_after_ms)]
    Busy(tally_codec::wire::BusyInfo),
    /// No known node could serve the operation within the retry budget.
    #[error("Failed to {what}: no tally node could serve the request ({detail})")]
    Unavailable { what: &'static str, detail: String },
    /// No node address was given.
    #[error("no node address given (use --addr HOST:PORT or TALLY_ADDR)")]
    NoAddress,
    /// A value did not decode or parse (bad hex, not a UUID4, ...).
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// A document value that is not JSON; checked before anything is sent.
    #[error("value is not valid JSON")]
    InvalidJson,
    /// A key file is missing, unreadable or inconsistent.
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    /// Bad input that is none of the above (a receipt file with wrong fields, a bad flag value).
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// Whether the failure is about the connection rather than the request, so the same bytes may
    /// be resent to another node.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Io { .. }
                | ClientError::Timeout { .. }
                | ClientError::Closed { .. }
                | ClientError::ClosedBy { .. }
                | ClientError::Protocol { .. }
        )
    }

    /// Helper for file errors, so call sites stay one line.
    pub fn file(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        ClientError::File { path: path.as_ref().display().to_string(), source }
    }
}
