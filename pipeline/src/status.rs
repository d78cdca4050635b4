//! One replica's status, published in one place: the replica thread writes who leads, the
//! members, the commit point and why the replica stopped (after every pass); the store thread
//! writes what it applied (after every write). The client port, the watch threads and `tallyd`
//! (health, gauges) only read it. Nobody asks the replica thread a question to learn its role.
//!
//! ```text
//!  replica thread ──publish / publish_commit / stop──▶ ┌────────────┐ ◀── read: client port (route, status,
//!  store thread ───────────publish_applied───────────▶ │ StatusBoard│       read barrier), watch threads,
//!                                                      └────────────┘       tallyd (health, gauges)
//! ```

use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tally_core::LogFailure;
use tally_failover::Member;

/// Log index and batch height together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub height: u64,
}

/// What everyone but the replica thread knows of the replica.
#[derive(Debug, Clone, Default)]
pub struct ReplicaStatus {
    pub node_id: u64,
    pub term: u64,
    /// `None` when no leader is known, and always once this replica stopped (its Raft state
    /// froze when its log failed).
    pub leader_id: Option<u64>,
    /// Never true once this replica stopped.
    pub is_leader: bool,
    /// The leader's client address, when it is known.
    pub leader_addr: Option<String>,
    /// Every member of the configuration (voters and learners), with the addresses the log
    /// recorded and, on a leader, how far each has matched.
    pub members: Vec<Member>,
    /// The voters of the current configuration (its incoming half during a joint change).
    pub voters: Vec<u64>,
    /// The commit point this replica knows (published before any answer of a pass leaves), and
    /// the height the store applied up to it.
    pub committed: Applied,
    /// What the store holds.
    pub applied: Applied,
    /// The highest commit index a leader's append carried (this replica's own when it leads):
    /// readiness compares the applied index with it.
    pub leader_commit: u64,
    /// Why this replica stopped replicating (a failed log or store write, a full disk); a
    /// stopped replica sends nothing, so its followers elect another leader.
    pub stopped: Option<LogFailure>,
    /// Peers this replica's links reach at an older peer protocol than its newest, with that
    /// version: replicas of an older release, in the middle of a rolling upgrade.
    pub older_peers: Vec<(u64, u16)>,
}

/// The replica thread's part of the status, published after every pass.
pub struct Published {
    pub term: u64,
    pub leader_id: Option<u64>,
    pub is_leader: bool,
    pub leader_addr: Option<String>,
    pub members: Vec<Member>,
    pub voters: Vec<u64>,
    pub leader_commit: u64,
    pub older_peers: Vec<(u64, u16)>,
}

/// The status and a condition readers wait on (the applied point moving, a stop).
pub struct StatusBoard {
    status: Mutex<ReplicaStatus>,
    changed: Condvar,
}

impl StatusBoard {
    pub fn new(node_id: u64, applied: Applied) -> Self {
        let status = ReplicaStatus { node_id, committed: applied, applied, ..ReplicaStatus::default() };
        StatusBoard { status: Mutex::new(status), changed: Condvar::new() }
    }

    /// Reads the status under its lock (keep `f` short: the replica thread publishes through
    /// the same lock).
    pub fn read<T>(&self, f: impl FnOnce(&ReplicaStatus) -> T) -> T {
        f(&self.status.lock())
    }

    /// A copy of the whole status.
    pub fn snapshot(&self) -> ReplicaStatus {
        self.status.lock().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.read(|s| s.is_leader)
    }

    pub fn leader_addr(&self) -> Option<String> {
        self.read(|s| s.leader_addr.clone())
    }

    /// The leader's client address when another replica leads (where a follower relays).
    pub fn leader_elsewhere(&self) -> Option<String> {
        self.read(|s| if s.is_leader { None } else { s.leader_addr.clone() })
    }

    pub fn applied(&self) -> Applied {
        self.read(|s| s.applied)
    }

    pub fn stopped(&self) -> Option<LogFailure> {
        self.read(|s| s.stopped.clone())
    }

    /// The replica thread, after every pass. A stopped replica knows no leader.
    pub fn publish(&self, p: Published) {
        let mut s = self.status.lock();
        assert!(p.term >= s.term, "the term never goes back: {} after {}", p.term, s.term);
        let stopped = s.stopped.is_some();
        s.term = p.term;
        s.leader_id = if stopped { None } else { p.leader_id };
        s.is_leader = p.is_leader && !stopped;
        s.leader_addr = if stopped { None } else { p.leader_addr };
        s.members = p.members;
        s.voters = p.voters;
        s.leader_commit = p.leader_commit;
        s.older_peers = p.older_peers;
    }

    /// The commit index the replica thread knows, before it answers anyone.
    pub fn publish_commit(&self, commit_index: u64) {
        let mut s = self.status.lock();
        s.committed.index = s.committed.index.max(commit_index);
    }

    /// What the store holds (the store thread, after each write): reads wait for it.
    pub fn publish_applied(&self, index: u64, height: u64) {
        let mut s = self.status.lock();
        if index <= s.applied.index && height <= s.applied.height {
            return;
        }
        s.applied = Applied { index: index.max(s.applied.index), height: height.max(s.applied.height) };
        s.committed.index = s.committed.index.max(s.applied.index);
        s.committed.height = s.committed.height.max(s.applied.height);
        drop(s);
        self.changed.notify_all();
    }

    /// The replica stopped: from now on it knows no leader and leads nothing, and waiting
    /// readers wake up.
    pub fn stop(&self, failure: LogFailure) {
        let mut s = self.status.lock();
        if s.stopped.is_none() {
            s.stopped = Some(failure);
        }
        s.leader_id = None;
        s.is_leader = false;
        s.leader_addr = None;
        drop(s);
        self.changed.notify_all();
    }

    /// Waits until the store has applied log index `index` (false on a timeout or a stop).
    pub fn wait_applied_index(&self, index: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.applied.index >= index)
    }

    /// Waits until the store has applied batch `height` (false on a timeout or a stop).
    pub fn wait_applied_height(&self, height: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.applied.height >= height)
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(&ReplicaStatus) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.status.lock();
        while !done(&s) {
            if s.stopped.is_some() || self.changed.wait_until(&mut s, deadline).timed_out() {
                return done(&s);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn leading(term: u64) -> Published {
        Published {
            term,
            leader_id: Some(1),
            is_leader: true,
            leader_addr: Some("127.0.0.1:7001".into()),
            members: Vec::new(),
            voters: vec![1, 2, 3],
            leader_commit: 9,
            older_peers: Vec::new(),
        }
    }

    #[test]
    fn a_stopped_replica_knows_no_leader_whatever_the_replica_thread_publishes_after() {
        let board = StatusBoard::new(1, Applied::default());
        board.publish(leading(2));
        assert!(board.is_leader());
        board.stop(LogFailure::new(std::io::ErrorKind::StorageFull, "fsync: no space"));
        board.publish(leading(2));
        let s = board.snapshot();
        assert!(!s.is_leader && s.leader_id.is_none() && s.leader_addr.is_none(), "{s:?}");
        assert!(s.stopped.as_ref().is_some_and(LogFailure::disk_full));
    }

    #[test]
    fn applied_moves_forward_only_and_carries_the_commit_point() {
        let board = StatusBoard::new(1, Applied { index: 5, height: 2 });
        board.publish_applied(4, 1);
        assert_eq!(board.applied(), Applied { index: 5, height: 2 });
        board.publish_applied(8, 3);
        let s = board.snapshot();
        assert_eq!(s.applied, Applied { index: 8, height: 3 });
        assert_eq!(s.committed, Applied { index: 8, height: 3 }, "the commit point is never behind the store");
        board.publish_commit(12);
        board.publish_commit(10);
        assert_eq!(board.read(|s| s.committed.index), 12);
    }

    #[test]
    fn a_reader_waits_for_the_store_and_wakes_on_a_stop() {
        let board = Arc::new(StatusBoard::new(1, Applied::default()));
        let b = board.clone();
        let store = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.publish_applied(3, 1);
        });
        assert!(board.wait_applied_index(3, Duration::from_secs(10)));
        store.join().expect("store thread");
        assert!(!board.wait_applied_height(2, Duration::from_millis(10)), "a timeout says so");
        let b = board.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.stop(LogFailure::other("store inconsistent"));
        });
        let started = Instant::now();
        assert!(!board.wait_applied_index(100, Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(10), "a stop wakes the reader");
        stopper.join().expect("stopper");
    }

    #[test]
    #[should_panic(expected = "the term never goes back")]
    fn the_term_never_goes_back() {
        let board = StatusBoard::new(1, Applied::default());
        board.publish(leading(3));
        board.publish(leading(2));
    }
}
