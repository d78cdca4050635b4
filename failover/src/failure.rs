//! Why a replica stopped writing, typed, so that a caller branches on a kind and never on text:
//! `tallyd` waits for space on a full disk and exits on any other failure, and the core answers
//! `StorageFull` or `LogFailed` accordingly.

use std::fmt;
use std::io::ErrorKind;

/// A write that could not be made durable (the Raft log, the state store, a snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFailure {
    /// The kind of the OS error behind it (`ErrorKind::StorageFull` for ENOSPC), or
    /// `ErrorKind::Other` when none was (a refused snapshot, a store that is inconsistent).
    pub kind: ErrorKind,
    /// What failed, for people: the operation and the error's text.
    pub why: String,
}

impl LogFailure {
    pub fn new(kind: ErrorKind, why: impl Into<String>) -> Self {
        LogFailure { kind, why: why.into() }
    }

    /// A failure with no OS error behind it.
    pub fn other(why: impl Into<String>) -> Self {
        LogFailure::new(ErrorKind::Other, why)
    }

    /// Whether the disk is full: the one test every caller uses.
    pub fn disk_full(&self) -> bool {
        self.kind == ErrorKind::StorageFull
    }

    /// The same failure, its text prefixed with what was being done.
    #[must_use]
    pub fn during(self, what: &str) -> Self {
        LogFailure { kind: self.kind, why: format!("{what}: {}", self.why) }
    }

    /// The code a client is refused with while this failure stands.
    pub fn code(&self) -> tally_codec::ErrorCode {
        if self.disk_full() {
            tally_codec::ErrorCode::StorageFull
        } else {
            tally_codec::ErrorCode::LogFailed
        }
    }
}

impl fmt::Display for LogFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for LogFailure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_known_by_its_kind_not_its_text() {
        let full = LogFailure::new(ErrorKind::StorageFull, "log append: quota reached").during("persist");
        assert!(full.disk_full());
        assert_eq!(full.code(), tally_codec::ErrorCode::StorageFull);
        assert_eq!(full.to_string(), "persist: log append: quota reached");
        let worded = LogFailure::other("No space left on device (os error 28)");
        assert!(!worded.disk_full(), "text alone never makes a full disk");
        assert_eq!(worded.code(), tally_codec::ErrorCode::LogFailed);
    }
}
