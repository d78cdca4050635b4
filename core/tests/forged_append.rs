//! A lying member appends an entry of its own at the current term, then the honest leader's
//! append carries that index again and the next batch. raft-rs keeps the entry it already holds
//! at that index and term (it compares terms only) and appends the rest, so the chain a batch
//! must follow is this log's, not the message's. Judged against the message's own entries, the
//! next batch passed, committed after the liar's no-op and stopped the replica
//! (`committed batch height 3 does not follow 1`; found by the simulator's forging peer, seed
//! 709233). Three cores wired by hand, messages delivered 1 ms after they are sent.

mod common;

use std::collections::{BTreeMap, VecDeque};

use raft::eraftpb::{Entry, Message, MessageType};
use tally_codec::{ClusterId, DocKey, Operation, PublicKey, Request, Signature, SignedRequest};
use tally_core::{Effect, Event, MemLedger, Refusal, Replica, RestoredLog, Validated};

const WALL_MS: u64 = 1_700_000_000_000;

struct Net {
    nodes: Vec<Replica<MemLedger>>,
    now: u64,
    /// (deliver at, message)
    wire: VecDeque<(u64, Message)>,
    /// A follower cut off the network: what is sent to it is kept here, not delivered.
    cut: Option<usize>,
    held: Vec<Message>,
    refused: Vec<(usize, Refusal)>,
    nonce: u64,
}

impl Net {
    fn new() -> Net {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let nodes = (1..=3)
            .map(|id| {
                let cfg = common::replica_config(id, id * 7919);
                Replica::start(
                    cfg,
                    MemLedger::new_cluster(&[], &[1, 2, 3]),
                    RestoredLog::default(),
                    0,
                    WALL_MS,
                    &logger,
                )
                .expect("starts")
            })
            .collect();
        Net { nodes, now: 0, wire: VecDeque::new(), cut: None, held: Vec::new(), refused: Vec::new(), nonce: 0 }
    }

    fn handle(&mut self, i: usize, ev: Event) {
        for e in self.nodes[i].handle(ev) {
            match e {
                Effect::Send(m) if self.cut == Some((m.to - 1) as usize) => self.held.push(m),
                Effect::Send(_) if self.cut == Some(i) => {}
                Effect::Send(m) => self.wire.push_back((self.now + 1, m)),
                Effect::PeerRefused { refusal, .. } => self.refused.push((i, refusal)),
                _ => {}
            }
        }
    }

    fn step(&mut self) {
        self.now += 1;
        while self.wire.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, m) = self.wire.pop_front().expect("front");
            self.handle((m.to - 1) as usize, Event::Peer(m));
        }
        for i in 0..3 {
            self.handle(i, Event::Tick { now_ms: self.now, wall_ms: WALL_MS + self.now });
        }
    }

    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| self.nodes[i].is_leader())
    }

    /// Submits a document write to the leader and runs until its batch closed and committed.
    fn write(&mut self, leader: usize) {
        self.nonce += 1;
        let request = Request {
            cluster_id: ClusterId([5; 16]),
            signer: PublicKey([7; 32]),
            nonce: self.nonce,
            expires_at_ms: WALL_MS + 600_000,
            op: Operation::Set { key: DocKey([self.nonce as u8; 16]), value: br#"{"n": 1}"#.to_vec() },
        };
        // The core does not check signatures (stage 2 does, before it).
        let req = SignedRequest { request, signature: Signature([0; 64]) };
        let id = req.id();
        self.handle(leader, Event::Submit { client: self.nonce, req: Validated { request: req, id } });
        self.run(300);
    }

    fn height(&self, i: usize) -> u64 {
        self.nodes[i].status().applied.height
    }
}

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    (e.index, e.term) = (index, term);
    e
}

#[test]
fn a_batch_must_follow_the_entry_this_log_keeps_not_the_one_the_message_carries() {
    let mut n = Net::new();
    while n.leader().is_none() {
        n.step();
    }
    n.run(300);
    let leader = n.leader().expect("a leader");
    let (f, liar) = {
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        (others[0], others[1])
    };
    n.write(leader);
    assert!((0..3).all(|i| n.height(i) == 1), "height 1 everywhere");
    let term = n.nodes[leader].term();
    let last = n.nodes[f].status().last_index;

    // Follower f is cut off while two more batches commit on the leader and the liar's node.
    n.cut = Some(f);
    n.write(leader);
    n.write(leader);
    assert_eq!(n.height(leader), 3);
    let mut sent: BTreeMap<u64, Entry> = BTreeMap::new();
    for m in n.held.iter().filter(|m| m.get_msg_type() == MessageType::MsgAppend) {
        for e in m.get_entries() {
            sent.insert(e.index, e.clone());
        }
    }
    let next: Vec<Entry> = sent.range(last + 1..).map(|(_, e)| e.clone()).take(2).collect();
    assert_eq!(next.len(), 2, "the leader sent two batches to the cut follower: {:?}", sent.keys());
    assert!(next.iter().all(|e| !e.data.is_empty() && e.term == term), "two batches of this term");

    // The liar (the other follower's key) appends a no-op at the next index, at this term.
    let mut lie = Message::default();
    lie.set_msg_type(MessageType::MsgAppend);
    (lie.from, lie.to, lie.term, lie.index, lie.log_term) = (liar as u64 + 1, f as u64 + 1, term, last, term);
    lie.set_entries(vec![entry(last + 1, term)].into());
    n.handle(f, Event::Peer(lie));
    assert!(n.refused.is_empty(), "a lie Raft cannot tell from the truth: {:?}", n.refused);
    assert_eq!(n.nodes[f].status().last_index, last + 1);

    // The leader's append as it sends it to a follower it probes: both batches after `last`.
    let mut honest = Message::default();
    honest.set_msg_type(MessageType::MsgAppend);
    (honest.from, honest.to, honest.term, honest.index, honest.log_term) =
        (leader as u64 + 1, f as u64 + 1, term, last, term);
    honest.commit = n.nodes[leader].commit_index();
    honest.set_entries(next.into());
    n.handle(f, Event::Peer(honest));
    assert!(
        n.refused.iter().any(|(i, r)| *i == f && r.reason() == "entry"),
        "the batch after the kept no-op does not follow the chain: {:?}",
        n.refused
    );
    assert_eq!(n.height(f), 1, "nothing that does not chain was applied");

    // The cluster goes on without f, and f stops on nothing.
    n.cut = None;
    n.write(leader);
    n.run(2_000);
    assert_eq!(n.height(leader), 4);
    assert_eq!(n.height(liar), 4);
    assert!(n.nodes[f].poisoned().is_none());
}
