//! A replica restarting from what its disk and its durable ledger hold.
// raft-rs's protobuf messages are built field by field after `default()`, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

mod common;

use raft::eraftpb::{Entry, HardState, Snapshot};
use tally_core::replica::StartError;
use tally_core::{Ledger, MemLedger, Persist, Replica, ReplicaConfig, RestoredLog};

fn cfg() -> ReplicaConfig {
    common::replica_config(1, 1)
}

fn noops(from: u64, to: u64, term: u64) -> Persist {
    let entries = (from..=to)
        .map(|index| {
            let mut e = Entry::default();
            e.index = index;
            e.term = term;
            e
        })
        .collect();
    Persist { entries, sync: true, ..Persist::default() }
}

/// A ledger of the voters 1, 2 and 3 at `index` (its configuration at 1, no-ops after).
fn ledger_at(index: u64, term: u64) -> MemLedger {
    ledger_of(&[1, 2, 3], index, term)
}

fn ledger_of(voters: &[u64], index: u64, term: u64) -> MemLedger {
    let mut l = MemLedger::new_cluster(&[], voters);
    for i in 2..=index {
        l.apply_noop(i, term).expect("noop");
    }
    l
}

fn start(ledger: MemLedger, records: Vec<Persist>) -> Result<Replica<MemLedger>, StartError> {
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    Replica::start(cfg(), ledger, RestoredLog { records }, 0, 1_700_000_000_000, &logger)
}

/// The ledger got ahead of a log that lost its unsynced tail (entries 6–8 gone), and the replica
/// then appended 9 and 10 after it. The next restart must start, not find a gap (the simulator
/// found this: seeds 417, 505 and 685 panicked inside raft-rs).
#[test]
fn a_log_with_a_gap_the_ledger_covers_restarts() {
    let mut hs = noops(9, 10, 2);
    hs.hard_state = Some({
        let mut h = HardState::default();
        h.term = 2;
        h.vote = 1;
        h.commit = 10;
        h
    });
    let r = start(ledger_at(8, 1), vec![noops(1, 5, 1), hs]).expect("starts");
    assert_eq!(r.commit_index(), 10);
    assert_eq!(r.applied().index, 8, "applied stays where the ledger is; 9 and 10 apply on the first ready");
    assert_eq!(r.term(), 2);
}

/// A log whose entries do not follow each other, and are not covered by the ledger, is not a log
/// this replica wrote: it refuses to start instead of guessing.
#[test]
fn an_uncovered_gap_is_refused() {
    let e = start(ledger_at(3, 1), vec![noops(1, 5, 1), noops(9, 10, 2)]).err().expect("refused");
    assert!(matches!(e, StartError::Log(ref why) if why.contains("follow")), "{e}");
}

/// A snapshot record ahead of the durable state means the state it stands for was lost: refused
/// (the shell writes the installed state before the log records the snapshot).
#[test]
fn a_snapshot_ahead_of_the_durable_state_is_refused() {
    let mut s = Snapshot::default();
    s.mut_metadata().index = 20;
    s.mut_metadata().term = 3;
    let p = Persist { snapshot: Some(s), sync: true, ..Persist::default() };
    let e = start(ledger_at(8, 1), vec![noops(1, 8, 1), p]).err().expect("refused");
    assert!(matches!(e, StartError::Log(ref why) if why.contains("ahead")), "{e}");
}

/// Membership survives a restart: the voters come from the durable ledger (the conf change entry
/// itself may be behind its index), not from the initial configuration.
#[test]
fn the_voters_come_from_the_durable_ledger() {
    let mut l = ledger_at(4, 1);
    let cs = raft::eraftpb::ConfState::from((vec![1, 3], vec![]));
    l.apply_conf(5, 1, protobuf::Message::write_to_bytes(&cs).expect("encodes")).expect("conf");
    let r = start(l, vec![noops(1, 5, 1)]).expect("starts");
    assert_eq!(r.voters(), vec![1, 3]);
    let r = start(ledger_at(4, 1), vec![noops(1, 4, 1)]).expect("starts");
    assert_eq!(r.voters(), vec![1, 2, 3], "initial configuration");
}

/// Entries the ledger already applied stay in the in-memory log when the disk still holds them,
/// so a follower a little behind a restarted leader is served from the log, not a snapshot
/// (the chaos monkey found followers needlessly resynced by snapshot after a leader restart).
/// Entries that do not end exactly at the applied entry (another term) are not trusted.
#[test]
fn the_surviving_log_below_the_applied_index_is_kept() {
    let r = start(ledger_at(8, 1), vec![noops(1, 10, 1)]).expect("starts");
    assert_eq!(r.status().first_index, 2, "the log from entry 2 on (entry 1 is the marker)");
    assert_eq!(r.applied().index, 8);
    let r = start(ledger_at(8, 2), vec![noops(1, 10, 1)]).expect("starts");
    assert_eq!(r.status().first_index, 9, "entries of another term than the ledger's: only after the ledger");
    let r = start(ledger_at(8, 1), vec![noops(4, 10, 1)]).expect("starts");
    assert_eq!(r.status().first_index, 5, "from the oldest entry the disk holds");
}

/// The in-memory log is bounded in bytes as well as entries: full batches are megabytes each, so
/// 2,000 retained entries would be gigabytes. The oldest entries behind the applied index go
/// first; a follower that needs them gets a snapshot.
#[test]
fn the_log_kept_in_memory_is_bounded_in_bytes() {
    let mut records = noops(1, 10, 1);
    for e in &mut records.entries {
        e.data = vec![7u8; 300].into();
    }
    let mut c = cfg();
    c.log_retain_bytes = 1_000;
    c.log_retain_entries = 1_000;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut r =
        Replica::start(c, ledger_at(10, 1), RestoredLog { records: vec![records] }, 0, 1_700_000_000_000, &logger)
            .expect("starts");
    assert_eq!(r.status().first_index, 2, "everything the disk held, before any event");
    r.handle(tally_core::Event::Tick { now_ms: 1, wall_ms: 1_700_000_000_001 });
    assert_eq!(r.status().first_index, 8, "three entries of 300 bytes fit 1,000 bytes");
}

/// Campaigns are counted for the shell's `tally_elections_total`: a replica whose peers never
/// answer keeps starting pre-vote campaigns and never a vote campaign; a replica alone wins its
/// first vote campaign at once.
#[test]
fn campaigns_are_counted_by_kind() {
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut r =
        Replica::start(cfg(), ledger_at(1, 1), RestoredLog::default(), 0, 1_700_000_000_000, &logger).expect("starts");
    for t in 1..=60 {
        r.handle(tally_core::Event::Tick { now_ms: t * 50, wall_ms: 1_700_000_000_000 + t * 50 });
    }
    let s = r.status();
    assert!(s.pre_vote_campaigns >= 2, "pre-vote campaigns: {}", s.pre_vote_campaigns);
    assert_eq!(s.vote_campaigns, 0, "no pre-vote majority, so no new term");
    let mut r = Replica::start(cfg(), ledger_of(&[1], 1, 1), RestoredLog::default(), 0, 1_700_000_000_000, &logger)
        .expect("starts");
    for t in 1..=60 {
        r.handle(tally_core::Event::Tick { now_ms: t * 50, wall_ms: 1_700_000_000_000 + t * 50 });
    }
    let s = r.status();
    assert!(s.is_leader);
    assert_eq!(s.vote_campaigns, 1);
}
