//! A minority partition through the fault-injecting proxy (`tally_chaos::proxy::Link`): every
//! peer link i → j of a 3-node cluster goes through its own proxy. Cutting the leader off from
//! both followers leaves it unable to commit, while the majority elects a new leader and goes on.
//! After the heal everyone converges, the checker passes, and the writes the isolated leader took
//! never show up as committed.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tally_chaos::proxy::Link;
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{ClusterId, Operation, RequestId};

#[test]
fn isolated_leader_cannot_commit_and_majority_goes_on() {
    run(false);
}

/// The client library, seeded with every address, is connected to the leader when it gets
/// isolated. That node then answers `NotLeader` without a leader hint (it knows of none); the
/// client must move to another member instead of retrying the same node until its budget runs out.
#[test]
fn client_moves_off_an_isolated_node() {
    run(true);
}

fn run(client_must_move: bool) {
    let started = Instant::now();
    let (_dir, mut layout) = init_cluster(3, 2);
    // links[(i, j)]: node i's connections to node j's peer port.
    let mut links: HashMap<(usize, usize), Link> = HashMap::new();
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            let link = Link::start("127.0.0.1:0", &layout.configs[j].peer_listen).expect("proxy");
            links.insert((i, j), link);
        }
    }
    for i in 0..3 {
        let mut cfg = layout.configs[i].clone();
        for (j, p) in cfg.peers.iter_mut().enumerate() {
            if j != i {
                p.peer = links[&(i, j)].listen.clone();
            }
        }
        write_config(&layout.config_paths[i], &cfg);
        layout.configs[i] = cfg;
    }
    let nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, old) = wait_leader(&nodes, Duration::from_secs(10));
    // Seeded leader first, so the writer talks to the node that is about to be isolated.
    let mut seeds = vec![addrs[li].clone()];
    seeds.extend(addrs.iter().filter(|a| **a != addrs[li]).cloned());
    let writer = Writer::start(&seeds, account_key(&layout, 0), 8, 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(find_leader(&nodes).map(|(i, _)| i), Some(li), "leadership moved before the partition");
    assert!(writer.acked_len() > 0, "nothing acknowledged before the partition");
    let followers: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    for &f in &followers {
        links[&(li, f)].cut();
        links[&(f, li)].cut();
    }
    let cut_at = Instant::now();
    eprintln!(
        "partitioned leader node {} (term {}) from nodes {:?}",
        li + 1,
        old.term,
        followers.iter().map(|f| f + 1).collect::<Vec<_>>()
    );

    // Writes sent straight to the isolated old leader get no Committed reply.
    let cluster = ClusterId::from_hex(&layout.cluster_id).expect("cluster id");
    let key = account_key(&layout, 1);
    let mut isolated: Vec<RequestId> = Vec::new();
    let conn = tally_client::Connection::connect_with(&addrs[li], &dial_for(&addrs[li]), Duration::from_secs(2))
        .expect("connect to the old leader");
    for _ in 0..3 {
        let req = tally_client::client::sign_request(&key, cluster, Operation::Transfer { to: fresh_key(), amount: 1 });
        isolated.push(req.id());
        match conn.call_timeout(ClientMessage::Submit(vec![req]), Duration::from_secs(3)) {
            Ok(ServerMessage::Submitted(rs)) => {
                for r in &rs {
                    assert!(!matches!(r, SubmitReply::Committed { .. }), "the isolated old leader committed: {r:?}");
                }
                eprintln!("isolated leader answered: {rs:?}");
            }
            other => eprintln!("isolated leader answered: {other:?}"),
        }
    }

    let isolated_height = status_of(&addrs[li]).expect("old leader answers Status").committed_height;

    // A writer that only knows the majority's addresses.
    let majority: Vec<String> = followers.iter().map(|&f| addrs[f].clone()).collect();
    let majority_writer = Writer::start(&majority, account_key(&layout, 0), 8, 1);

    // The majority elects a leader of a higher term, and writes commit there.
    let mut new = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            new = followers
                .iter()
                .filter_map(|&f| status_of(&addrs[f]))
                .find(|s| s.leader_id == Some(s.node_id) && s.term > old.term);
            new.is_some()
        }),
        "the majority elected no leader"
    );
    let new = new.expect("set above");
    eprintln!("node {} leads term {} after {:?}", new.node_id, new.term, cut_at.elapsed());
    let in_new_term = |w: &Writer| w.acked.lock().values().filter(|r| r.header.term >= new.term).count();
    assert!(
        wait_until(Duration::from_secs(10), || in_new_term(&majority_writer) >= 16),
        "the majority committed no writes in the new term"
    );
    if client_must_move {
        assert!(
            wait_until(Duration::from_secs(10), || in_new_term(&writer) >= 16),
            "the client seeded with all addresses stayed on the isolated node"
        );
    }

    // The isolated node committed nothing during the whole partition.
    let s = status_of(&addrs[li]).expect("old leader answers Status");
    assert_eq!(s.committed_height, isolated_height, "the isolated node's commit advanced: {s:?}");
    let heal_at = Instant::now();
    for l in links.values() {
        l.heal();
    }
    let mut seen = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            seen = status_of(&addrs[li]);
            seen.as_ref().is_some_and(|s| s.term >= new.term && s.leader_id.is_some() && s.leader_id != Some(s.node_id))
        }),
        "the old leader did not rejoin after the heal: {seen:?}"
    );
    eprintln!("old leader rejoined {:?} after the heal: {seen:?}", heal_at.elapsed());
    std::thread::sleep(Duration::from_millis(1000));
    let mut acked = writer.finish();
    acked.extend(majority_writer.finish());
    assert_invariants(&addrs, &layout, &acked);

    // The isolated leader's attempts are nowhere in the committed history.
    for addr in &addrs {
        let c = tally_client::Connection::connect_with(addr, &dial_for(addr), Duration::from_secs(2)).expect("connect");
        for id in &isolated {
            match c.call(ClientMessage::Receipt { id: *id }) {
                Ok(ServerMessage::Receipt(None)) => {}
                other => panic!("{addr}: a write sent to the isolated leader is committed: {other:?}"),
            }
        }
    }
    eprintln!("{} acknowledged; took {:?}", acked.len(), started.elapsed());
}
