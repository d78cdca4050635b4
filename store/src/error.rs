//! The one error type of the store crate.

use std::path::PathBuf;
use tally_codec::CodecError;

/// Everything that can go wrong in the store. Callers branch on `Poisoned` (restart the process),
/// `Compacted`/`Unavailable` (Raft storage errors) and `SchemaMismatch` (refuse to start).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An operating-system I/O call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// rusty-leveldb reported an error.
    #[error("LevelDB error: {message}")]
    Level {
        /// The kind of the OS error behind it (rusty-leveldb keeps only its text, "... (os error
        /// N)": the code is read back from it once, in `From<Status>`), or `Other`.
        kind: std::io::ErrorKind,
        /// rusty-leveldb's message.
        message: String,
    },
    /// Bytes on disk fail their checksum or structure outside the repairable tail.
    #[error("corrupt data in {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// An earlier fsync or write failed; the on-disk state is unknown, so nothing more is written.
    #[error("the log is poisoned by an earlier failed write or fsync; restart to recover from disk")]
    Poisoned,
    /// The store was written under another schema; reading it could misinterpret data.
    #[error("store schema mismatch: found fingerprint {found}, expected {expected}; refusing to open")]
    SchemaMismatch {
        /// Hex fingerprint on disk (or "(missing)").
        found: String,
        /// Hex fingerprint of this build's tables.
        expected: String,
    },
    /// The data directory was written by a newer tally, in a format this binary cannot read.
    #[error(
        "the data directory is in format {found}, written by a newer tally; this binary reads formats 1 to {newest}: \
         run the newer binary (a downgrade works only until the newer format is written)"
    )]
    FormatTooNew {
        /// The format on disk.
        found: u32,
        /// The newest format this binary reads.
        newest: u32,
    },
    /// The data directory's format cannot be told, or no migration reads it.
    #[error("unknown data directory format: {0}")]
    FormatUnknown(String),
    /// A stored value does not decode.
    #[error("cannot decode stored {what}: {source}")]
    Decode {
        /// Which kind of value.
        what: &'static str,
        /// The codec's reason.
        #[source]
        source: CodecError,
    },
    /// Requested log entries were compacted away (Raft: `StorageError::Compacted`).
    #[error("log index {index} is compacted (first held index is {first})")]
    Compacted {
        /// The index asked for.
        index: u64,
        /// The first index still held.
        first: u64,
    },
    /// Requested log entries are beyond the end of the log (Raft: `StorageError::Unavailable`).
    #[error("log index {index} is not available (last index is {last})")]
    Unavailable {
        /// The index asked for.
        index: u64,
        /// The last index held.
        last: u64,
    },
    /// A caller broke an API precondition that is an expected, recoverable condition.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A value is over its size bound.
    #[error("{what} of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Which kind of value.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// `init_genesis` was called on a store that already has a genesis.
    #[error("genesis is already written to this store")]
    AlreadyInitialized,
    /// Two stored values that must agree do not (e.g. a document without its body).
    #[error("store is inconsistent: {0}")]
    Inconsistent(String),
    /// Injected by [`crate::FaultyKv`] in tests of failure handling.
    #[error("injected fault: {0}")]
    Injected(&'static str),
}

impl StoreError {
    /// Wraps an I/O error with the path it happened on, so messages say which file failed.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io { path: path.into(), source }
    }

    /// Wraps a codec error with the kind of value that failed to decode.
    pub(crate) fn decode(what: &'static str, source: CodecError) -> Self {
        StoreError::Decode { what, source }
    }
}

impl StoreError {
    /// The kind of the OS error behind this one (`ErrorKind::StorageFull` for ENOSPC), or
    /// `ErrorKind::Other` when there was none: what a caller branches on (a full disk is waited
    /// out, any other failure ends the replica).
    pub fn os_kind(&self) -> std::io::ErrorKind {
        match self {
            StoreError::Io { source, .. } => source.kind(),
            StoreError::Level { kind, .. } => *kind,
            _ => std::io::ErrorKind::Other,
        }
    }
}

/// The OS error code in an `io::Error`'s text ("... (os error 28)"), as rusty-leveldb keeps it.
fn os_code_in(text: &str) -> Option<i32> {
    let start = text.rfind("(os error ")? + "(os error ".len();
    let end = start + text[start..].find(')')?;
    text[start..end].parse().ok()
}

impl From<rusty_leveldb::Status> for StoreError {
    fn from(s: rusty_leveldb::Status) -> Self {
        let message = s.to_string();
        let kind = match s.code {
            rusty_leveldb::StatusCode::IOError => {
                os_code_in(&message).map_or(std::io::ErrorKind::Other, |c| std::io::Error::from_raw_os_error(c).kind())
            }
            _ => std::io::ErrorKind::Other,
        };
        StoreError::Level { kind, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_under_leveldb_is_known_by_its_os_error_code() {
        let enospc = std::io::Error::from_raw_os_error(28);
        let full = StoreError::from(rusty_leveldb::Status::from(enospc));
        assert_eq!(full.os_kind(), std::io::ErrorKind::StorageFull, "{full}");
        let eio = StoreError::from(rusty_leveldb::Status::from(std::io::Error::from_raw_os_error(5)));
        assert_ne!(eio.os_kind(), std::io::ErrorKind::StorageFull, "EIO is no full disk: {eio}");
        let worded = StoreError::from(rusty_leveldb::Status::new(
            rusty_leveldb::StatusCode::Corruption,
            "No space left on device",
        ));
        assert_eq!(worded.os_kind(), std::io::ErrorKind::Other, "text alone never makes a full disk");
        let io = StoreError::io("/x", std::io::Error::from_raw_os_error(28));
        assert_eq!(io.os_kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(os_code_in("write: No space left on device (os error 28)"), Some(28));
        assert_eq!(os_code_in("(os error x)"), None);
    }
}
