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
    #[error("LevelDB error: {0}")]
    Level(String),
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

impl From<rusty_leveldb::Status> for StoreError {
    fn from(s: rusty_leveldb::Status) -> Self {
        StoreError::Level(s.to_string())
    }
}
