//! What the client port asks of the replica thread besides submissions: membership changes
//! (carried out by the core's membership flow, [`tally_failover::membership`]) and the judgement
//! of a linearizable read (the core's lease and commit index). Each question goes down one
//! bounded channel with its own reply slot, and is answered within a named bound. Who leads and
//! who the members are is read from the [`StatusBoard`], never asked.

use crate::status::StatusBoard;
use crossbeam::channel::{bounded, Sender};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally_codec::wire::WireError;
use tally_codec::ErrorCode;
use tally_core::MemberChange;
use tally_failover::env::Env;
use tally_failover::handshake::LocalPeer;
use tally_failover::membership::CHANGE_ANSWER_MS_MAX;
use tally_failover::revocation::{Revocation, RevokedCerts, REVOKED_MAX};
use tally_failover::storage::MemberAddr;
use tally_failover::transport::PeerSecurity;
use tally_failover::{Member, MembershipError};

/// Membership changes and linearizable reads waiting for the replica thread, at most (a full
/// queue answers `Busy` or `Overloaded`).
pub const CONTROL_QUEUED_MAX: usize = 1024;
/// How long a read waits for the replica thread to judge it (its lease, its commit index).
pub const READ_JUDGED_MS: u64 = 1_000;

/// One question for the replica thread, with the slot its answer goes to.
pub enum Control {
    Change {
        change: MemberChange,
        reply: Sender<Result<(), MembershipError>>,
    },
    /// A linearizable read arrived at monotonic time `now_ms`.
    Read {
        now_ms: u64,
        reply: Sender<Result<u64, WireError>>,
    },
}

/// What a probe of a peer address presents: this node's hello, and how links are protected.
pub type PeerProbe = (LocalPeer, PeerSecurity);

/// The client port's handle on the replica thread.
pub struct ReplicaControl {
    status: Arc<StatusBoard>,
    env: Arc<Mutex<Box<dyn Env>>>,
    control_tx: Sender<Control>,
    stop: Arc<AtomicBool>,
    probe: Option<PeerProbe>,
    admin_lock: Mutex<()>,
    revoked: RevokedCerts,
}

impl ReplicaControl {
    pub(crate) fn new(
        status: Arc<StatusBoard>,
        env: Arc<Mutex<Box<dyn Env>>>,
        control_tx: Sender<Control>,
        stop: Arc<AtomicBool>,
        probe: Option<PeerProbe>,
        revoked: RevokedCerts,
    ) -> Self {
        ReplicaControl { status, env, control_tx, stop, probe, admin_lock: Mutex::new(()), revoked }
    }

    /// Stops the replica thread (tests; a process stops by exiting).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// A linearizable read, judged by the replica thread now: the log index this replica's
    /// state must have applied before it serves the read (a leader under its lease answers its
    /// commit index), or why it may not serve it.
    ///
    /// # Errors
    /// `NotLeader` (with no lease), or `Overloaded` when the replica cannot judge it in time.
    pub fn read_index(&self) -> Result<u64, WireError> {
        let (reply, rx) = bounded(1);
        let now_ms = self.env.lock().monotonic_ms();
        if self.control_tx.try_send(Control::Read { now_ms, reply }).is_err() {
            return Err(WireError::new(ErrorCode::Overloaded, "the replica thread has too many reads queued; retry"));
        }
        rx.recv_timeout(Duration::from_millis(READ_JUDGED_MS)).unwrap_or_else(|_| {
            Err(WireError::new(ErrorCode::Overloaded, "the replica thread did not judge the read in time; retry"))
        })
    }

    /// Adds `member` as a learner, waits until it caught up with the commit index, then
    /// promotes it through a joint configuration (left automatically). Returns once committed.
    ///
    /// # Errors
    /// Not the leader, a node that does not answer as `member` at its address, or a failed
    /// change.
    pub fn add_member(&self, member: Member) -> Result<(), MembershipError> {
        let _one_at_a_time = self.admin_lock.lock();
        let node = member.node_id;
        if node == 0 {
            return Err(MembershipError::ReservedId);
        }
        let (leading, voter, other_addr) = self.status.read(|s| {
            let known = s.members.iter().find(|m| m.node_id == node);
            let other_addr =
                known.is_some_and(|m| m.client_addr != member.client_addr || m.peer_addr != member.peer_addr);
            (s.is_leader, s.voters.contains(&node), other_addr)
        });
        if !leading {
            return Err(MembershipError::NotLeader);
        }
        if voter && other_addr {
            // The same add again (a retry whose first answer was lost) succeeds in the core; a
            // voter under other addresses is an error.
            return Err(MembershipError::AlreadyVoter(node));
        }
        // Before anything is proposed: the node must answer at that address as node `node` of
        // this cluster (its certificate, cluster id and configuration), or nothing is added.
        let Some((hello, security)) = &self.probe else {
            return Err(MembershipError::Refused("this replica has no peer port: a cluster of one".into()));
        };
        if !voter {
            tally_failover::transport::probe(&member.peer_addr, hello, security, node)
                .map_err(|reason| MembershipError::Unreachable { node, reason })?;
        }
        let addr = MemberAddr { node_id: node, client_addr: member.client_addr, peer_addr: member.peer_addr };
        self.change(MemberChange::Add { node, context: tally_codec::encode(&addr) })
    }

    /// Removes `node_id` through a joint configuration (left automatically). Returns once
    /// committed.
    ///
    /// # Errors
    /// Not the leader, or a failed change.
    pub fn remove_member(&self, node_id: u64) -> Result<(), MembershipError> {
        let _one_at_a_time = self.admin_lock.lock();
        self.change(MemberChange::Remove { node: node_id })
    }

    /// Removes `node_id` (when it is a member) and revokes its certificate with fingerprint
    /// `cert_fingerprint` on every replica. Returns once both are committed and applied here.
    ///
    /// # Errors
    /// Not the leader, a failed change, or too many certificates revoked already.
    pub fn revoke_member(&self, node_id: u64, cert_fingerprint: [u8; 32]) -> Result<(), MembershipError> {
        let _one_at_a_time = self.admin_lock.lock();
        let member = self.status.read(|s| s.members.iter().any(|m| m.node_id == node_id));
        if node_id != 0 && self.revoked.node_of(&cert_fingerprint).is_some() && !member {
            // A retried revocation (its first answer lost) succeeds.
            return Ok(());
        }
        if self.revoked.len() >= REVOKED_MAX {
            return Err(MembershipError::Refused(format!("{REVOKED_MAX} certificates are revoked already")));
        }
        let context = tally_codec::encode(&Revocation { node_id, cert_fingerprint });
        self.change(MemberChange::Revoke { node: node_id, context })
    }

    /// One membership change through the core: answered when it is done, failed or timed out
    /// there.
    fn change(&self, change: MemberChange) -> Result<(), MembershipError> {
        let (reply, rx) = bounded(1);
        self.control_tx.try_send(Control::Change { change, reply }).map_err(|_| MembershipError::Busy)?;
        // The core answers every change within its bounds; the margin covers a replica thread
        // that stopped (its process then exits).
        rx.recv_timeout(Duration::from_millis(CHANGE_ANSWER_MS_MAX + 10_000))
            .unwrap_or_else(|_| Err(MembershipError::Timeout("the replica thread's answer".into())))
    }
}

impl Drop for ReplicaControl {
    fn drop(&mut self) {
        self.stop();
    }
}
