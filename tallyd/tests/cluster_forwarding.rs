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
    // certificate is refused (`docs/protocol.md`, "Forwarding by followers").
    let again = conn
        .call(ClientMessage::Forwarded(tally_codec::wire::Relayed::Balance { account: bob, stale: false }))
        .expect("reply");
    match again {
        ServerMessage::Error(e) => assert_eq!(e.code, tally_codec::ErrorCode::NotAuthorized, "{}", e.message),
        other => panic!("expected NotAuthorized, got {other:?}"),
    }
}

/// `tally bench` pointed at a follower loads the leader, as the client library does: a follower
/// would relay every frame (an extra hop and a follower's CPU), and whether the first address
/// happened to lead would decide the figure.
#[test]
fn the_bench_pointed_at_a_follower_loads_the_leader() {
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let fi = (li + 1) % 3;
    let follower_metrics = layout.configs[fi].metrics_listen.clone().expect("cluster init sets a metrics address");
    let forwarded = || {
        let (_, body) = http_get(&follower_metrics, "/metrics").expect("follower metrics");
        metric_value(&body, "tally_forwarded_frames_total").unwrap_or(0.0)
    };
    let before = forwarded();
    let json = layout.dir.join("bench.json");
    let o = tally_command()
        .args(["--addr", &nodes[fi].addr, "--ca", layout.dir.join("ca.pem").to_str().expect("p")])
        .args(["bench", "--duration", "2", "--clients", "2", "--batch", "64", "--rate-max", "2000"])
        .args(["--accounts-dir", layout.dir.to_str().expect("p"), "--json", json.to_str().expect("p")])
        .output()
        .expect("tally bench");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    assert!(b["committed"].as_u64().expect("n") > 0, "the bench committed nothing: {b}");
    assert_eq!(forwarded(), before, "the follower relayed none of the bench's frames");
}
