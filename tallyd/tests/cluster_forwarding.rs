//! Any replica serves writes and linearizable reads: a follower relays them to the leader.

mod common;

use common::*;
use std::time::Duration;
use tally_client::Connection;
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{Operation, PublicKey};

#[test]
fn follower_forwards_writes_and_reads_to_the_leader() {
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let alice = client(&layout, 0);
    let status = alice.status().expect("status");
    let leader = status.leader_id.expect("leader");
    let follower =
        nodes.iter().zip(&layout.configs).find(|(_, c)| c.node_id != leader).map(|(d, _)| d).expect("follower");

    // Talk to the follower only, with a raw connection (no client-side leader following).
    let conn = Connection::connect_with(&follower.addr, &dial_for(&follower.addr), Duration::from_secs(2))
        .expect("connect follower");
    let bob = PublicKey(account_key(&layout, 1).verifying_key().to_bytes());
    let reqs: Vec<_> = (0..50).map(|_| alice.sign(Operation::Transfer { to: bob, amount: 2 }).expect("sign")).collect();
    let reply = conn.call_timeout(ClientMessage::Submit(reqs), Duration::from_secs(15)).expect("submit via follower");
    let ServerMessage::Submitted(replies) = reply else { panic!("unexpected {reply:?}") };
    assert_eq!(replies.len(), 50);
    for r in &replies {
        match r {
            SubmitReply::Committed { receipt, durable_replicas } => {
                receipt.verify(&operator(&layout)).expect("verifies");
                assert!(*durable_replicas >= 2, "a majority holds it");
            }
            other => panic!("not committed through the follower: {other:?}"),
        }
    }
    // A linearizable read through the follower sees the writes at once.
    let reply = conn.call(ClientMessage::Balance { account: bob, stale: false }).expect("balance via follower");
    assert_eq!(reply, ServerMessage::Balance(Some(1_000_000_000 + 100)));

    // A client can't pose as a relaying replica: `Forwarded` from a connection without a node
    // certificate is refused (issue 6).
    let again = conn
        .call(ClientMessage::Forwarded(tally_codec::wire::Relayed::Balance { account: bob, stale: false }))
        .expect("reply");
    match again {
        ServerMessage::Error(e) => assert_eq!(e.code, tally_codec::ErrorCode::NotAuthorized, "{}", e.message),
        other => panic!("expected NotAuthorized, got {other:?}"),
    }
}
