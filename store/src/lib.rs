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
//! compacted past an index, call [`state::Store::sync_all`].
//!
//! Threading: [`rusty_leveldb::DB`] is `Send` (an `unsafe impl` upstream; its `Rc`s are internal)
//! but not `Sync`, and takes `&mut self` even to read. [`kv::LevelKv`] wraps it in a `RefCell` and
//! never lets a snapshot or iterator escape a call, so `LevelKv` and `Store<LevelKv>` are `Send`
//! but not `Sync`: one thread owns the store at a time (move it into a store thread, or share it
//! behind a `Mutex`).
//!
//! ```compile_fail
//! fn assert_sync<T: Sync>() {}
//! assert_sync::<tally_store::LevelKv>(); // not Sync: reads need `&mut DB` through a RefCell
//! ```

pub mod disk;
pub mod error;
pub mod format;
pub mod kv;
pub mod record;
pub mod segments;
pub mod state;
pub mod wal;

pub use error::StoreError;
pub use kv::{FaultyKv, Kv, KvPairs, LevelKv, MemKv};
pub use segments::{SegmentRef, Segments};
pub use state::{Applied, Store};
pub use wal::{HardStateRecord, LogEntry, Wal, WalOptions};

pub(crate) mod fsutil;
