//! The core owns its request bound (`QUEUED_BATCHES_MAX`): a leader whose batches cannot close
//! says it has no room once it holds two full batches, and answers `Overloaded` past two
//! batches and a frame, whatever its shell hands it. Three cores wired by hand; the leader is
//! cut off from its followers, so its 8 batches in flight never commit.

mod common;

use common::{Net, WALL_MS};
use ed25519_dalek::SigningKey;
use tally_codec::wire::SubmitReply;
use tally_codec::{limits, ClusterId, ErrorCode, Operation, PublicKey, Request};
use tally_core::{Effect, Event, Validated, QUEUED_BATCHES_MAX};

const BATCH: usize = 3;

fn transfer(alice: &SigningKey, nonce: u64) -> Validated {
    let request = Request {
        cluster_id: ClusterId([5; 16]),
        signer: PublicKey(alice.verifying_key().to_bytes()),
        nonce,
        expires_at_ms: WALL_MS + 3_600_000,
        op: Operation::Transfer { to: PublicKey([7; 32]), amount: 1 },
    }
    .sign(alice);
    Validated { id: request.id(), request }
}

fn overloaded(effects: &[Effect]) -> usize {
    effects
        .iter()
        .filter(
            |e| matches!(e, Effect::Reply { reply: SubmitReply::Refused(r), .. } if r.code == ErrorCode::Overloaded),
        )
        .count()
}

#[test]
fn a_leader_whose_batches_cannot_close_has_no_room_then_answers_overloaded() {
    let alice = SigningKey::from_bytes(&[1; 32]);
    let funded = [(PublicKey(alice.verifying_key().to_bytes()), 1_000_000)];
    let config = |id| {
        let mut c = common::cfg(id, true);
        c.batch_requests_max = BATCH;
        c
    };
    let (mut n, leader) = Net::settle(Net::with_config(config, &funded));
    n.cut = true;
    let mut nonce = 0;
    let mut submit = |n: &mut Net| {
        nonce += 1;
        n.handle(leader, Event::Submit { client: nonce, req: transfer(&alice, nonce) })
    };
    // Eight batches in flight (none commits), then the queue grows.
    let mut proposed = 0;
    while proposed < 8 {
        proposed += submit(&mut n).iter().filter(|e| matches!(e, Effect::Proposed { .. })).count();
    }
    let room = |n: &Net| n.nodes[leader].as_ref().expect("alive").submission_room();
    assert_eq!(room(&n), QUEUED_BATCHES_MAX * BATCH, "nothing queued behind the batches in flight");
    for _ in 0..QUEUED_BATCHES_MAX * BATCH {
        assert_eq!(overloaded(&submit(&mut n)), 0);
    }
    assert_eq!(room(&n), 0, "two full batches queued: no room for a new frame");
    // A shell hands a frame over whole: one frame more is taken, then nothing.
    for _ in 0..limits::FRAME_REQUESTS_MAX {
        assert_eq!(overloaded(&submit(&mut n)), 0, "the frame that started within the room is taken");
    }
    for _ in 0..5 {
        assert_eq!(overloaded(&submit(&mut n)), 1, "past two batches and a frame: Overloaded");
    }
    // Once the leader hears its followers again, its batches commit and room comes back.
    n.cut = false;
    for _ in 0..2_000 {
        n.step();
    }
    assert!(room(&n) > 0, "room again once batches commit");
    assert_eq!(overloaded(&submit(&mut n)), 0);
}
