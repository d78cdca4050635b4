//! Durable storage for one tally replica: the fsynced log that is the source of truth, and the
//! application state rebuilt from it.
//!
//! ```text
//!   Raft ready() ──append/sync──▶ wal::Wal  (segmented, crc-checked, fsynced: source of truth)
//!                                    │ committed entries, replayed from Applied.index on restart
//!                                    ▼
//!                              state::Store ──apply_batch: ONE atomic Kv::write──▶ kv::Kv
//!                                    │                                   (rusty-leveldb / MemKv)
//!                                    └─ batch bodies ─▶ segments::Segments (append-only, mmap reads)
//!                                                           SegmentRef stored in BatchRecord
//! ```
//!
//! rusty-leveldb never fsyncs, so the state store is a cache of the log: before the log is
//! compacted past an index, call [`state::Store::sync_all`]. [`rusty_leveldb::DB`] holds `Rc`s,
//! so [`kv::LevelKv`] and `Store<LevelKv>` are neither `Send` nor `Sync`: own the store on one
//! thread.

pub mod error;
pub mod kv;
pub mod segments;
pub mod state;
pub mod wal;

pub use error::StoreError;
pub use kv::{FaultyKv, Kv, LevelKv, MemKv};
pub use segments::{SegmentRef, Segments};
pub use state::{Applied, Store};
pub use wal::{HardStateRecord, LogEntry, Wal, WalOptions};

pub(crate) mod fsutil;
