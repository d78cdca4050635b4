//! One tally replica's decisions as an I/O-free state machine (`docs/architecture.md` §10).
//!
//! ```text
//!  shell (threads, TCP, WAL, LevelDB, clock)      or      simulator (in-memory net, disk, clock)
//!        │ events: tick(now) · submit · read · peer message · membership change · log failed
//!        ▼
//!  Replica ── stage 3 optimistic (optimistic.rs) ─▶ stage 4 sequence (sequence.rs) ─▶ stage 5 propose
//!        │    (pending.rs: batches in flight)      raft-rs RawNode (log in memory)
//!        │◀── committed ── stage 6 confirm (confirm.rs) ─▶ stage 7 apply (Ledger, ledger.rs)
//!        ▼
//!  effects: send · persist (fsync) · reply · signed header
//! ```
//! Around raft-rs: restart from the durable ledger and the surviving log (restart.rs) and what
//! the in-memory log keeps (retention.rs); elections, the lease, membership and the peer gate
//! are `tally_failover`'s I/O-free decisions, which the replica drives. `replica.rs` runs the
//! event loop.
//! Stage 2 (decoding, signature checks) stays in the shell: a [`Validated`] request is what
//! enters the core. Time, randomness, the network and the disk come from outside, so a seed and
//! a sequence of events replay a run exactly.
#![forbid(unsafe_code)]
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod confirm;
pub mod ledger;
pub mod optimistic;
pub mod pending;
pub mod replica;
pub mod restart;
pub mod retention;
pub mod sequence;
pub mod state;

pub use ledger::{Exported, Ledger, LedgerHead, MemLedger};
pub use replica::{ClientTag, Effect, Event, Persist, Replica, ReplicaConfig, RestoredLog, Status, QUEUED_BATCHES_MAX};
pub use tally_failover::{LogFailure, MemberChange, MembershipError, Refusal};

/// A request that passed stage 2: decoded, its signature checked, its id computed once.
#[derive(Debug, Clone)]
pub struct Validated {
    pub request: tally_codec::SignedRequest,
    pub id: tally_codec::RequestId,
}

/// A bug planted on purpose so the simulator can prove it catches it. Only the simulator sets
/// anything but `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Plant {
    #[default]
    None,
    /// Clients get their receipts when the batch is proposed, before it commits.
    AckBeforeCommit,
    /// Headers are signed and published when proposed, before they commit.
    SignBeforeCommit,
    /// The log is written but never fsynced.
    SkipFsync,
    /// A replica that believes it leads serves reads without a lease.
    StaleLeaseRead,
    /// Peer messages reach raft-rs unjudged (no peer gate, no chain check before appending):
    /// the simulator's forging peer must then end a replica.
    NoPeerGate,
}

impl std::str::FromStr for Plant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Plant::None,
            "ack-before-commit" => Plant::AckBeforeCommit,
            "sign-before-commit" => Plant::SignBeforeCommit,
            "skip-fsync" => Plant::SkipFsync,
            "stale-lease-read" => Plant::StaleLeaseRead,
            "no-peer-gate" => Plant::NoPeerGate,
            other => {
                return Err(format!(
                    "unknown plant {other:?}: none, ack-before-commit, sign-before-commit, skip-fsync, stale-lease-read, no-peer-gate"
                ))
            }
        })
    }
}
