//! The rules of stages 3 to 5 (`docs/architecture.md` §4), each proved on a replica of one voter
//! over a `MemLedger`: it leads alone, so a batch it proposes commits in the same pass.

mod common;

use ed25519_dalek::SigningKey;
use tally_codec::wire::SubmitReply;
use tally_codec::{ClusterId, ErrorCode, Operation, PublicKey, Request};
use tally_core::{Effect, Event, MemLedger, Replica, RestoredLog, Validated};

const WALL_MS: u64 = 1_700_000_000_000;

struct One {
    replica: Replica<MemLedger>,
    now_ms: u64,
    alice: SigningKey,
    bob: PublicKey,
    nonce: u64,
}

impl One {
    /// A leader of one voter, sequencing, with `alice` holding 100.
    fn leading(batch_requests_max: usize, batch_bytes_max: usize) -> One {
        let mut cfg = common::replica_config(1, 1);
        cfg.batch_requests_max = batch_requests_max;
        cfg.batch_bytes_max = batch_bytes_max;
        let alice = SigningKey::from_bytes(&[1; 32]);
        let ledger = MemLedger::new_cluster(&[(public(&alice), 100)], &[1]);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let replica = Replica::start(cfg, ledger, RestoredLog::default(), 0, WALL_MS, &logger).expect("starts");
        let bob = public(&SigningKey::from_bytes(&[2; 32]));
        let mut one = One { replica, now_ms: 0, alice, bob, nonce: 0 };
        while !one.replica.status().sequencing {
            assert!(one.now_ms < 10_000, "a replica of one voter leads within its election timeout");
            one.tick(50);
        }
        one
    }

    fn tick(&mut self, ms: u64) -> Vec<Effect> {
        self.now_ms += ms;
        self.replica.handle(Event::Tick { now_ms: self.now_ms, wall_ms: WALL_MS + self.now_ms })
    }

    fn transfer(&mut self, amount: u64) -> Validated {
        self.nonce += 1;
        let request = Request {
            cluster_id: ClusterId([5; 16]),
            signer: public(&self.alice),
            nonce: self.nonce,
            expires_at_ms: WALL_MS + 60_000,
            op: Operation::Transfer { to: self.bob, amount },
        }
        .sign(&self.alice);
        Validated { id: request.id(), request }
    }

    fn submit(&mut self, client: u64, req: Validated) -> Vec<Effect> {
        self.replica.handle(Event::Submit { client, req })
    }
}

fn public(key: &SigningKey) -> PublicKey {
    PublicKey(key.verifying_key().to_bytes())
}

/// The requests of each batch proposed, in order.
fn proposed(effects: &[Effect]) -> Vec<usize> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Proposed { requests, .. } = e { Some(*requests) } else { None })
        .collect()
}

fn replies(effects: &[Effect]) -> Vec<(u64, &SubmitReply)> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Reply { client, reply } = e { Some((*client, reply)) } else { None })
        .collect()
}

fn refusal(reply: &SubmitReply) -> Option<ErrorCode> {
    if let SubmitReply::Refused(e) = reply {
        Some(e.code)
    } else {
        None
    }
}

#[test]
fn stage_3_refuses_a_transfer_over_the_balance_without_consuming_its_id() {
    let mut one = One::leading(100, 1 << 20);
    let over = one.transfer(101);
    let id = over.id;
    let mut effects = one.submit(7, over);
    effects.extend(one.tick(100));
    let answered = replies(&effects);
    assert_eq!(answered.len(), 1, "one answer: {answered:?}");
    assert_eq!(refusal(answered[0].1), Some(ErrorCode::InsufficientFunds), "refused, not executed as rejected");
    assert!(proposed(&effects).is_empty(), "no batch for a refused request");
    assert_eq!(one.replica.executed_at(&id), None, "its id is not consumed");
}

#[test]
fn stage_3_answers_a_request_id_seen_before_with_its_first_receipt() {
    let mut one = One::leading(100, 1 << 20);
    let first = one.transfer(10);
    let mut effects = one.submit(1, first.clone());
    effects.extend(one.tick(100));
    let receipt = match replies(&effects)[..] {
        [(1, SubmitReply::Committed { receipt, .. })] => receipt.clone(),
        ref other => panic!("the first copy commits: {other:?}"),
    };
    let mut effects = one.submit(2, first);
    effects.extend(one.tick(100));
    match replies(&effects)[..] {
        [(2, SubmitReply::Committed { receipt: again, .. })] => assert_eq!(again, &receipt, "the same receipt"),
        ref other => panic!("the retry is answered with the first receipt: {other:?}"),
    }
    assert!(proposed(&effects).is_empty(), "the retry is not executed again");
    assert_eq!(one.replica.ledger().balances().iter().find(|(k, _)| *k == one.bob).map(|(_, b)| *b), Some(10));
}

#[test]
fn a_batch_closes_at_its_interval() {
    let mut one = One::leading(100, 1 << 20);
    let req = one.transfer(1);
    let mut effects = one.submit(1, req);
    effects.extend(one.tick(99));
    assert!(proposed(&effects).is_empty(), "open before its interval has passed");
    assert_eq!(proposed(&one.tick(1)), vec![1], "closed once it has");
}

#[test]
fn a_batch_closes_at_its_request_bound() {
    let mut one = One::leading(3, 1 << 20);
    let mut effects = Vec::new();
    for client in 0..3 {
        let req = one.transfer(1);
        effects.extend(one.submit(client, req));
    }
    assert_eq!(proposed(&effects), vec![3], "closed by the third request, before its interval");
}

#[test]
fn a_batch_closes_at_its_byte_bound_and_the_rest_opens_the_next() {
    // A transfer is estimated at 361 bytes: two fit in 800, the third opens the next batch.
    let mut one = One::leading(3, 800);
    let mut effects = Vec::new();
    for client in 0..3 {
        let req = one.transfer(1);
        effects.extend(one.submit(client, req));
    }
    assert_eq!(proposed(&effects), vec![2], "two requests fit the byte bound");
    assert_eq!(proposed(&one.tick(100)), vec![1], "the third goes in the next batch, at its interval");
}

#[test]
fn a_request_over_the_byte_bound_alone_is_refused_as_too_large() {
    let mut one = One::leading(100, 300);
    let req = one.transfer(1);
    let mut effects = one.submit(1, req);
    effects.extend(one.tick(100));
    assert_eq!(replies(&effects).first().and_then(|(_, r)| refusal(r)), Some(ErrorCode::ProposalTooLarge));
    assert!(proposed(&effects).is_empty());
}

#[test]
fn a_batch_proposed_is_proposed_once_and_persisted_once() {
    let mut one = One::leading(100, 1 << 20);
    let mut effects = Vec::new();
    for client in 0..4 {
        let req = one.transfer(1);
        effects.extend(one.submit(client, req));
        effects.extend(one.tick(100));
    }
    for _ in 0..10 {
        effects.extend(one.tick(100));
    }
    assert_eq!(proposed(&effects), vec![1; 4], "one batch per closed interval");
    let mut heights: Vec<u64> = effects
        .iter()
        .filter_map(|e| if let Effect::Proposed { height, .. } = e { Some(*height) } else { None })
        .collect();
    heights.dedup();
    assert_eq!(heights, vec![1, 2, 3, 4], "each height proposed once, in order");
    let batch_entries = effects
        .iter()
        .filter_map(|e| if let Effect::Persist(p) = e { Some(p) } else { None })
        .flat_map(|p| &p.entries)
        .filter(|e| !e.data.is_empty())
        .count();
    assert_eq!(batch_entries, 4, "each batch reaches the log once");
    assert_eq!(one.replica.ledger().batches().len(), 4, "and commits once");
}

#[test]
fn every_waiter_is_answered_once_after_commit() {
    let mut one = One::leading(100, 1 << 20);
    let req = one.transfer(5);
    let mut effects = one.submit(1, req.clone());
    effects.extend(one.submit(2, req));
    effects.extend(one.tick(100));
    let answered = replies(&effects);
    assert_eq!(answered.len(), 2, "both copies answered: {answered:?}");
    for (_, reply) in answered {
        assert!(matches!(reply, SubmitReply::Committed { .. }), "a duplicate in the batch joins the first copy's leaf");
    }
    assert_eq!(proposed(&effects), vec![1], "executed once");
}
