//! Each refused message is refused by the gate, and the same message stepped into an ungated
//! raft-rs `RawNode` panics (where the check prevents a panic) or moves the replica where no
//! honest peer could. Honest traffic between real `RawNode`s always passes.

use super::*;
use crate::lease::probe_context;
use raft::eraftpb::{HardState, Snapshot};
use raft::storage::MemStorage;
use raft::Config;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The gate with a full term budget.
fn gate(raw: &RawNode<MemStorage>, now_ms: u64, m: &Message) -> Result<(), Refusal> {
    check(raw, now_ms, &TermBudget::new(now_ms), m)
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Node `id` of voters 1..=3 at `term`, its log holding `(index, term)` entries after a
/// snapshot marker at (`first - 1`, 1), committed up to `committed`.
fn node(id: u64, first: u64, terms: &[u64], committed: u64, term: u64) -> RawNode<MemStorage> {
    let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = first - 1;
    snap.mut_metadata().term = 1;
    snap.mut_metadata().set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    storage.wl().apply_snapshot(snap).expect("marker");
    let entries: Vec<Entry> = terms
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut e = Entry::default();
            e.index = first + i as u64;
            e.term = *t;
            e
        })
        .collect();
    storage.wl().append(&entries).expect("entries");
    let mut hs = HardState::default();
    hs.term = term;
    hs.commit = committed;
    storage.wl().set_hardstate(hs);
    let cfg =
        Config { id, election_tick: 10, heartbeat_tick: 2, pre_vote: true, check_quorum: true, ..Config::default() };
    RawNode::new(&cfg, storage, &logger()).expect("raw node")
}

/// A follower of node 1 at term 5: log 1..=10 (entries 1..=7 of term 2, 8..=10 of term 5),
/// committed up to 6.
fn follower() -> RawNode<MemStorage> {
    let mut f = node(2, 2, &[2, 2, 2, 2, 2, 2, 5, 5, 5], 6, 5);
    f.raft.become_follower(5, 1);
    f
}

/// Node 1 leading term 6 over the same log (plus its no-op at 11).
fn leader() -> RawNode<MemStorage> {
    let mut l = node(1, 2, &[2, 2, 2, 2, 2, 2, 5, 5, 5], 6, 5);
    l.raft.become_candidate();
    l.raft.become_leader();
    let _ = l.ready(); // the no-op goes to the unstable log
    l
}

fn msg(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    (m.from, m.to, m.term) = (from, to, term);
    m
}

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    (e.index, e.term) = (index, term);
    e
}

fn append(term: u64, index: u64, log_term: u64, entries: Vec<Entry>, commit: u64) -> Message {
    let mut m = msg(MessageType::MsgAppend, 1, 2, term);
    (m.index, m.log_term, m.commit) = (index, log_term, commit);
    m.set_entries(entries.into());
    m
}

/// The gate refuses `m` for `reason`, and raft-rs without the gate panics on it.
fn refused_and_panics(mut raw: RawNode<MemStorage>, m: Message, reason: &str) {
    let got = gate(&raw, 1_000, &m);
    assert_eq!(got.as_ref().map_err(Refusal::reason), Err(reason), "{m:?}: {got:?}");
    let stepped = catch_unwind(AssertUnwindSafe(|| {
        let _ = raw.step(m.clone());
        // What raft-rs does with the step may panic only once the Ready is built.
        if raw.has_ready() {
            let rd = raw.ready();
            let _ = raw.advance(rd);
        }
    }));
    assert!(stepped.is_err(), "ungated raft-rs survived {m:?}");
}

/// A member's forged heartbeat at term+1000 with commit 10^9 (it aborted two replicas of three).
#[test]
fn a_heartbeat_committing_beyond_the_log_is_refused() {
    let mut m = msg(MessageType::MsgHeartbeat, 3, 2, 1_005);
    m.commit = 1_000_000_000;
    refused_and_panics(follower(), m.clone(), "commit");
    // To the leader as well (it steps down to follower, then commits).
    m.to = 1;
    refused_and_panics(leader(), m, "commit");
}

#[test]
fn a_heartbeat_of_the_known_leader_within_the_log_passes() {
    let f = follower();
    let mut m = msg(MessageType::MsgHeartbeat, 1, 2, 5);
    m.commit = 10;
    assert_eq!(gate(&f, 0, &m), Ok(()));
    // A stale heartbeat is answered without being read.
    let mut old = msg(MessageType::MsgHeartbeat, 3, 2, 4);
    old.commit = 1 << 40;
    assert_eq!(gate(&f, 0, &old), Ok(()));
}

/// A new term's leader matched nothing of this log yet: its heartbeat claims no commit. Without
/// the gate the follower commits its unreplicated tail (8..=10) on a liar's word.
#[test]
fn a_new_leaders_heartbeat_claiming_a_commit_is_refused() {
    let mut f = follower();
    let mut m = msg(MessageType::MsgHeartbeat, 3, 2, 9);
    m.commit = 10;
    assert_eq!(gate(&f, 0, &m).map_err(|e| e.reason()), Err("commit"));
    f.step(m).expect("step");
    assert_eq!(f.raft.raft_log.committed, 10, "ungated, the liar's commit holds");
    let mut honest = msg(MessageType::MsgHeartbeat, 3, 2, 9);
    honest.commit = 0;
    assert_eq!(gate(&follower(), 0, &honest), Ok(()));
}

/// Without the check, a liar's heartbeat at the known leader's term commits this follower's
/// unreplicated tail (8..=10).
#[test]
fn a_second_leaders_heartbeat_is_refused_and_its_appends_followed() {
    let mut f = follower();
    let mut m = msg(MessageType::MsgHeartbeat, 3, 2, 5);
    m.commit = 10;
    assert_eq!(gate(&f, 0, &m), Err(Refusal::SecondLeader { term: 5, leader: 1 }));
    assert!(!Refusal::SecondLeader { term: 5, leader: 1 }.cuts_link(), "it may be the honest leader");
    f.step(m).expect("step");
    assert_eq!(f.raft.raft_log.committed, 10, "ungated, the second leader's commit holds");
    // An append of a second leader passes: raft-rs follows it (an honest leader whose term a
    // liar claimed first is followed again).
    let mut a = append(5, 10, 5, vec![], 10);
    a.from = 3;
    assert_eq!(gate(&follower(), 0, &a), Ok(()));
    // The leader itself hears of another leader of its term.
    let mut m = msg(MessageType::MsgHeartbeat, 2, 1, 6);
    m.commit = 0;
    assert_eq!(gate(&leader(), 0, &m).map_err(|e| e.reason()), Err("second_leader"));
}

#[test]
fn local_and_unused_kinds_are_refused() {
    for t in [
        MessageType::MsgHup,
        MessageType::MsgBeat,
        MessageType::MsgUnreachable,
        MessageType::MsgSnapStatus,
        MessageType::MsgCheckQuorum,
        MessageType::MsgPropose,
        MessageType::MsgReadIndex,
        MessageType::MsgReadIndexResp,
        MessageType::MsgTransferLeader,
        MessageType::MsgTimeoutNow,
    ] {
        assert_eq!(gate(&follower(), 0, &msg(t, 1, 2, 5)), Err(Refusal::Kind(t)));
    }
    // With a term, a forwarded kind is sent on by a follower: `fatal!` in `send`.
    refused_and_panics(follower(), msg(MessageType::MsgTransferLeader, 1, 2, 5), "kind");
    refused_and_panics(follower(), msg(MessageType::MsgReadIndex, 1, 2, 5), "kind");
    // An empty proposal to the leader: `fatal!("stepped empty MsgProp")`.
    refused_and_panics(leader(), msg(MessageType::MsgPropose, 2, 1, 6), "kind");
    // A read-index response with a term-0 commit beyond the log: `commit_to`.
    let mut r = msg(MessageType::MsgReadIndexResp, 1, 2, 0);
    r.index = 1 << 40;
    r.set_entries(vec![Entry::default()].into());
    refused_and_panics(follower(), r, "kind");
}

#[test]
fn misaddressed_messages_and_bad_terms_are_refused() {
    let f = follower();
    let mut m = msg(MessageType::MsgHeartbeat, 1, 3, 5);
    assert_eq!(gate(&f, 0, &m).map_err(|e| e.reason()), Err("address"));
    (m.from, m.to) = (2, 2);
    assert_eq!(gate(&f, 0, &m).map_err(|e| e.reason()), Err("address"));
    (m.from, m.to) = (0, 2);
    assert_eq!(gate(&f, 0, &m).map_err(|e| e.reason()), Err("address"));
    // Term 0 skips raft-rs's term checks: a granted vote is answered with term 0 (`fatal!`).
    let mut v = msg(MessageType::MsgRequestVote, 3, 2, 0);
    (v.index, v.log_term) = (100, 5);
    let mut lonely = node(2, 2, &[2], 1, 2);
    lonely.raft.become_follower(2, INVALID_ID);
    refused_and_panics(lonely, v, "term");
    // A term near u64::MAX: the next campaign's `term + 1` overflows.
    let mut hb = msg(MessageType::MsgHeartbeat, 1, 2, u64::MAX);
    hb.commit = 0;
    assert_eq!(gate(&f, 0, &hb), Err(Refusal::Term(u64::MAX)));
    let mut adopted = follower();
    adopted.step(hb).expect("ungated, the term is adopted");
    let campaign = catch_unwind(AssertUnwindSafe(|| adopted.campaign()));
    assert!(campaign.is_err(), "the next election overflows the term");
    hb = msg(MessageType::MsgHeartbeat, 1, 2, TERM_MAX + 1);
    assert_eq!(gate(&f, 0, &hb), Err(Refusal::Term(TERM_MAX + 1)));
}

/// Peers move a replica's term at a bounded rate: a jump past the budget is refused (without
/// cutting the link: a liar may have spent it), and the budget refills with time.
#[test]
fn terms_move_within_the_budget() {
    let f = follower();
    let hb = |term| msg(MessageType::MsgHeartbeat, 1, 2, term);
    let mut budget = TermBudget::new(0);
    assert_eq!(check(&f, 0, &budget, &hb(5 + TERM_JUMP_BURST)), Ok(()));
    let over = check(&f, 0, &budget, &hb(6 + TERM_JUMP_BURST));
    assert!(matches!(over, Err(Refusal::TermJump { .. })), "{over:?}");
    assert!(!over.expect_err("refused").cuts_link());
    budget.spend(TERM_JUMP_BURST, 0);
    assert!(matches!(check(&f, 0, &budget, &hb(6)), Err(Refusal::TermJump { .. })), "spent");
    assert_eq!(check(&f, 0, &budget, &hb(5)), Ok(()), "the same term moves nothing");
    assert_eq!(check(&f, 1, &budget, &hb(5 + TERM_JUMP_PER_MS)), Ok(()), "refilled a millisecond later");
    assert_eq!(budget.available(1 << 30), TERM_JUMP_BURST, "up to the burst");
}

#[test]
fn appends_with_impossible_previous_entries_are_refused() {
    // Index beyond the log with term 0 "matches" (`term()` is 0 beyond the log): an append there
    // is out of the unstable log's bounds.
    let m = append(5, 100, 0, vec![entry(101, 5)], 0);
    refused_and_panics(follower(), m, "index");
    // Without entries it commits there.
    let m = append(5, 100, 0, vec![], 100);
    refused_and_panics(follower(), m, "index");
    let m = append(5, 10, 6, vec![], 10);
    assert_eq!(gate(&follower(), 0, &m).map_err(|e| e.reason()), Err("index"), "previous term above the message's");
}

#[test]
fn entries_that_do_not_follow_are_refused() {
    // A gap: `conflict - (index + 1)` slices past the entries.
    let m = append(5, 10, 5, vec![entry(12, 5)], 0);
    assert_eq!(gate(&follower(), 0, &m), Err(Refusal::NotContiguous { after: 10, found: 12 }));
    // Going back: `conflict - (index + 1)` underflows.
    let m = append(7, 10, 5, vec![entry(8, 6)], 0);
    refused_and_panics(follower(), m, "entries");
    let m = append(5, 10, 5, vec![entry(11, 5), entry(9, 5)], 0);
    assert_eq!(gate(&follower(), 0, &m), Err(Refusal::NotContiguous { after: 10, found: 9 }));
    // Terms above the message's, or going down.
    let m = append(5, 10, 5, vec![entry(11, 7)], 0);
    assert_eq!(gate(&follower(), 0, &m).map_err(|e| e.reason()), Err("entries"));
    let m = append(5, 10, 5, vec![entry(11, 5), entry(12, 4)], 0);
    assert_eq!(gate(&follower(), 0, &m).map_err(|e| e.reason()), Err("entries"));
    // An index at the end of the range.
    let m = append(5, u64::MAX, 5, vec![entry(0, 5)], 0);
    assert_eq!(gate(&follower(), 0, &m).map_err(|e| e.reason()), Err("index"));
}

/// Entries that reach back below the previous entry can rewrite committed ones:
/// `fatal!("entry … conflict with committed entry")` in `maybe_append`.
#[test]
fn an_append_rewriting_committed_entries_is_refused() {
    let m = append(5, 6, 2, vec![entry(5, 5)], 0);
    refused_and_panics(follower(), m, "entries");
    // Rewriting the uncommitted tail is what a new leader does.
    let mut m = append(9, 7, 2, vec![entry(8, 9)], 8);
    m.from = 3;
    assert_eq!(gate(&follower(), 0, &m), Ok(()));
}

#[test]
fn honest_appends_pass() {
    let f = follower();
    for m in [
        append(5, 10, 5, vec![entry(11, 5), entry(12, 5)], 12),
        append(5, 10, 5, vec![], 10),
        append(5, 3, 2, vec![], 6),                    // below the commit: answered at once
        append(5, 40, 5, vec![entry(41, 5)], 41),      // beyond the log: rejected by raft-rs
        append(5, 9, 4, vec![entry(10, 5)], 10),       // a term mismatch: rejected by raft-rs
        append(4, 10, 9, vec![entry(11, 9)], 1 << 40), // stale: answered without reading
    ] {
        if m.term >= m.log_term {
            assert_eq!(gate(&f, 0, &m), Ok(()), "{m:?}");
        }
    }
}

fn conf_entry(index: u64, term: u64, data: Vec<u8>) -> Entry {
    let mut e = entry(index, term);
    e.set_entry_type(EntryType::EntryConfChangeV2);
    e.data = data.into();
    e
}

#[test]
fn conf_change_entries_must_parse_and_name_real_nodes() {
    let m = append(5, 10, 5, vec![conf_entry(11, 5, vec![0xff; 7])], 0);
    assert_eq!(gate(&follower(), 0, &m).map_err(|e| e.reason()), Err("entry"));
    let mut cc = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.node_id = 0;
    cc.set_changes(vec![single.clone()].into());
    let zero = protobuf::Message::write_to_bytes(&cc).expect("encode");
    let m = append(5, 10, 5, vec![conf_entry(11, 5, zero)], 0);
    assert_eq!(gate(&follower(), 0, &m).map_err(|e| e.reason()), Err("entry"));
    single.node_id = 4;
    cc.set_changes(vec![single].into());
    let four = protobuf::Message::write_to_bytes(&cc).expect("encode");
    assert_eq!(gate(&follower(), 0, &append(5, 10, 5, vec![conf_entry(11, 5, four)], 0)), Ok(()));
}

fn snapshot(term: u64, index: u64, sterm: u64, cs: ConfState) -> Message {
    let mut m = msg(MessageType::MsgSnapshot, 1, 2, term);
    let meta = m.mut_snapshot().mut_metadata();
    (meta.index, meta.term) = (index, sterm);
    meta.set_conf_state(cs);
    m.mut_snapshot().data = vec![1].into();
    m
}

#[test]
fn snapshots_that_do_not_fit_are_refused() {
    let voters = || ConfState::from((vec![1, 2, 3], vec![]));
    // Term 0 at an index beyond the log "matches" and commits there.
    refused_and_panics(follower(), snapshot(5, 1 << 40, 0, voters()), "snapshot");
    assert_eq!(gate(&follower(), 0, &snapshot(5, 0, 1, voters())).map_err(|e| e.reason()), Err("snapshot"));
    assert_eq!(gate(&follower(), 0, &snapshot(5, 20, 6, voters())).map_err(|e| e.reason()), Err("snapshot"));
    // Repeated nodes: raft-rs compares configurations as sets, but no leader sends one.
    let twice = ConfState::from((vec![1, 2, 2], vec![]));
    assert_eq!(gate(&follower(), 0, &snapshot(5, 20, 5, twice)).map_err(|e| e.reason()), Err("snapshot"));
    // One that does not restore at all: a voter also a learner.
    let both = ConfState::from((vec![1, 2], vec![2]));
    refused_and_panics(follower(), snapshot(5, 20, 5, both), "snapshot");
    // Next learners that are not outgoing voters restore as learners: `fatal!("invalid restore")`.
    let mut cs = voters();
    cs.set_learners_next(vec![4]);
    refused_and_panics(follower(), snapshot(5, 20, 5, cs), "snapshot");
    assert_eq!(
        gate(&follower(), 0, &snapshot(5, 20, 5, ConfState::default())).map_err(|e| e.reason()),
        Err("snapshot")
    );
    // What a leader sends passes, joint configurations too.
    assert_eq!(gate(&follower(), 0, &snapshot(5, 20, 5, voters())), Ok(()));
    let mut joint = ConfState::from((vec![1, 2, 4], vec![]));
    joint.set_voters_outgoing(vec![1, 2, 3]);
    joint.set_learners_next(vec![3]);
    joint.auto_leave = true;
    assert_eq!(gate(&follower(), 0, &snapshot(5, 20, 5, joint)), Ok(()));
}

#[test]
fn responses_beyond_the_leaders_log_are_refused() {
    let last = leader().raft.raft_log.last_index();
    let mut ack = msg(MessageType::MsgAppendResponse, 2, 1, 6);
    ack.index = u64::MAX;
    refused_and_panics(leader(), ack.clone(), "index");
    ack.index = last + 5;
    assert_eq!(gate(&leader(), 0, &ack).map_err(|e| e.reason()), Err("index"));
    // `match_hint + 1` overflows.
    let mut reject = msg(MessageType::MsgAppendResponse, 2, 1, 6);
    (reject.reject, reject.index, reject.reject_hint) = (true, last, u64::MAX);
    refused_and_panics(leader(), reject.clone(), "index");
    let mut wants = msg(MessageType::MsgAppendResponse, 2, 1, 6);
    (wants.reject, wants.index, wants.request_snapshot) = (true, last, 3);
    assert_eq!(gate(&leader(), 0, &wants).map_err(|e| e.reason()), Err("index"));
    ack.index = last;
    assert_eq!(gate(&leader(), 0, &ack), Ok(()));
    (reject.reject_hint, reject.log_term) = (4, 2);
    assert_eq!(gate(&leader(), 0, &reject), Ok(()));
    // A follower ignores responses: only their term counts.
    let mut late = msg(MessageType::MsgAppendResponse, 3, 2, 5);
    late.index = 1 << 40;
    assert_eq!(gate(&follower(), 0, &late), Ok(()));
    // Responses from strangers are ignored by raft-rs, and counted here.
    let stranger = msg(MessageType::MsgAppendResponse, 9, 1, 6);
    assert_eq!(gate(&leader(), 0, &stranger), Err(Refusal::NotMember(9)));
    assert!(!Refusal::NotMember(9).cuts_link());
}

#[test]
fn a_probe_ack_the_leader_never_sent_is_refused() {
    let l = leader();
    let mut m = msg(MessageType::MsgHeartbeatResponse, 2, 1, 6);
    m.context = probe_context(6, 900).into();
    assert_eq!(gate(&l, 1_000, &m), Ok(()));
    m.context = probe_context(6, u64::MAX).into();
    assert_eq!(gate(&l, 1_000, &m).map_err(|e| e.reason()), Err("probe"));
    m.context = probe_context(5, 900).into();
    assert_eq!(gate(&l, 1_000, &m).map_err(|e| e.reason()), Err("probe"));
}

#[test]
fn impossible_votes_are_refused() {
    let f = follower();
    let mut v = msg(MessageType::MsgRequestPreVote, 3, 2, 6);
    (v.index, v.log_term, v.commit, v.commit_term) = (12, 5, 10, 5);
    assert_eq!(gate(&f, 0, &v), Ok(()));
    v.log_term = 7;
    assert_eq!(gate(&f, 0, &v).map_err(|e| e.reason()), Err("index"));
    (v.log_term, v.commit) = (5, 13);
    assert_eq!(gate(&f, 0, &v).map_err(|e| e.reason()), Err("index"));
    let mut r = msg(MessageType::MsgRequestVoteResponse, 3, 2, 6);
    r.commit_term = 7;
    assert_eq!(gate(&f, 0, &r).map_err(|e| e.reason()), Err("index"));
}

/// Three real `RawNode`s elect a leader and replicate; every message between them passes.
#[test]
fn honest_traffic_passes() {
    let mut nodes: Vec<RawNode<MemStorage>> = (1..=3).map(|id| node(id, 2, &[], 1, 1)).collect();
    nodes[0].campaign().expect("campaign");
    let mut passed = 0;
    for round in 0..200 {
        if round % 7 == 0 && nodes[0].raft.state == StateRole::Leader {
            let _ = nodes[0].propose(vec![], vec![round as u8; 8]);
        }
        for n in nodes.iter_mut() {
            n.tick();
        }
        let mut out = Vec::new();
        for n in nodes.iter_mut() {
            while n.has_ready() {
                let mut rd = n.ready();
                out.extend(rd.take_messages());
                if !rd.entries().is_empty() {
                    n.mut_store().wl().append(rd.entries()).expect("append");
                }
                if let Some(hs) = rd.hs() {
                    n.mut_store().wl().set_hardstate(hs.clone());
                }
                out.extend(rd.take_persisted_messages());
                let mut light = n.advance(rd);
                out.extend(light.take_messages());
                n.advance_apply();
            }
        }
        for m in out {
            let to = &mut nodes[(m.to - 1) as usize];
            assert_eq!(gate(to, round, &m), Ok(()), "an honest {:?} refused", m.get_msg_type());
            to.step(m).expect("step");
            passed += 1;
        }
    }
    assert!(passed > 100, "only {passed} messages");
    assert!(nodes.iter().all(|n| n.raft.raft_log.committed > 20), "the cluster committed");
}
