//! Membership at runtime (DESIGN §6): under a light write load, a fourth node is added with
//! `cluster add` and becomes a voter; then node 1 is removed with `cluster remove`. Writes keep
//! committing throughout, and the remaining members hold every acknowledged request.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tally_codec::config::PeerConfig;
use tally_codec::wire::StatusInfo;

fn voters(s: &StatusInfo) -> Vec<u64> {
    let mut v: Vec<u64> = s.members.iter().filter(|m| m.is_voter).map(|m| m.node_id).collect();
    v.sort_unstable();
    v
}

/// The current leader's Status, among `addrs`.
fn leader_status(addrs: &[String]) -> Option<StatusInfo> {
    addrs.iter().filter_map(|a| status_of(a)).filter(|s| s.leader_id == Some(s.node_id)).max_by_key(|s| s.term)
}

/// A client connected to the current leader first.
fn admin_client(layout: &tally_client::ClusterLayout, addrs: &[String]) -> tally_client::Client {
    let leader = leader_status(addrs).and_then(|s| s.leader_addr).expect("a leader");
    let mut seeds = vec![leader];
    seeds.extend(addrs.iter().cloned());
    tally_client::Client::connect(&seeds, account_key(layout, 0), tally_client::ClientOptions::default())
        .expect("connect")
}

/// `tally --addr <follower> cluster add ...` must work like any other command: the follower
/// points the client at the leader (or forwards), and the client follows.
#[test]
fn cluster_add_through_a_follower() {
    let (_dir, layout) = init_cluster(3, 1);
    let nodes = start_all(&layout);
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let fi = (li + 1) % 3;
    let mut cfg = layout.configs[0].clone();
    cfg.node_id = 4;
    cfg.data_dir = layout.dir.join("node-4").display().to_string();
    cfg.listen = format!("127.0.0.1:{}", free_port());
    cfg.peer_listen = format!("127.0.0.1:{}", free_port());
    cfg.metrics_listen = None;
    let path4 = layout.dir.join("node-4.toml");
    write_config(&path4, &cfg);
    let _n4 = Daemon::spawn(&path4, &cfg.listen, &layout.dir.join("node-4.log"));
    let via_follower = tally_client::Client::connect(
        &[layout.configs[fi].listen.clone()],
        account_key(&layout, 0),
        tally_client::ClientOptions::default(),
    )
    .expect("connect");
    via_follower.cluster_add(4, &cfg.listen, &cfg.peer_listen).expect("cluster add through a follower");
    assert!(
        wait_until(Duration::from_secs(10), || leader_status(&layout.client_addrs())
            .is_some_and(|s| voters(&s) == [1, 2, 3, 4])),
        "node 4 did not become a voter"
    );
}

#[test]
fn add_a_fourth_node_then_remove_node_1() {
    let started = Instant::now();
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let writer = Writer::start(&addrs, account_key(&layout, 0), 8, 1);
    std::thread::sleep(Duration::from_millis(1000));

    // node-4.toml: node 1's settings, its own ports and data dir, the three members as peers.
    let mut cfg = layout.configs[0].clone();
    cfg.node_id = 4;
    cfg.data_dir = layout.dir.join("node-4").display().to_string();
    cfg.listen = format!("127.0.0.1:{}", free_port());
    cfg.peer_listen = format!("127.0.0.1:{}", free_port());
    cfg.metrics_listen = Some(format!("127.0.0.1:{}", free_port()));
    cfg.peers = layout
        .configs
        .iter()
        .map(|c| PeerConfig { node_id: c.node_id, client: c.listen.clone(), peer: c.peer_listen.clone() })
        .collect();
    let path4 = layout.dir.join("node-4.toml");
    write_config(&path4, &cfg);
    nodes.push(Daemon::spawn(&path4, &cfg.listen, &layout.dir.join("node-4.log")));
    assert!(
        wait_until(Duration::from_secs(10), || status_of(&cfg.listen).is_some()),
        "node 4 does not answer:\n{}",
        nodes[3].log_text()
    );

    // Membership changes go to the leader (see `cluster_add_through_a_follower` for why).
    let t = Instant::now();
    let admin = admin_client(&layout, &addrs);
    admin.cluster_add(4, &cfg.listen, &cfg.peer_listen).unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("cluster add 4: {e}")
    });
    eprintln!("cluster add took {:?}", t.elapsed());
    let mut all = addrs.clone();
    all.push(cfg.listen.clone());
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = leader_status(&all);
            last.as_ref().is_some_and(|s| voters(s) == [1, 2, 3, 4])
        }),
        "the leader never showed 4 voters: {:?}",
        last.map(|s| s.members)
    );
    nodes[3].wait_ready(Duration::from_secs(10));
    let s4 = status_of(&cfg.listen).expect("node 4 status");
    assert_eq!(voters(&s4), [1, 2, 3, 4], "node 4 knows itself a voter");
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(5), || writer.acked_len() > n), "no writes committed with 4 voters");

    // Remove node 1 (the leader or a follower, whichever it is now).
    let was_leader = leader_status(&all).is_some_and(|s| s.node_id == 1);
    let t = Instant::now();
    let admin = admin_client(&layout, &all);
    admin.cluster_remove(1).unwrap_or_else(|e| {
        dump_logs(&nodes);
        panic!("cluster remove 1: {e}")
    });
    eprintln!("cluster remove 1 (was leader: {was_leader}) took {:?}", t.elapsed());
    let rest: Vec<String> = all[1..].to_vec();
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = leader_status(&rest);
            last.as_ref().is_some_and(|s| voters(s) == [2, 3, 4])
        }),
        "the leader never showed voters [2, 3, 4]: {:?}",
        last.map(|s| s.members)
    );
    // The operator stops the removed node; writes go on among 2, 3, 4.
    nodes[0].kill9();
    let n = writer.acked_len();
    assert!(
        wait_until(Duration::from_secs(10), || writer.acked_len() > n + 16),
        "no writes committed after node 1 left"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let acked = writer.finish();
    assert_invariants(&rest, &layout, &acked);
    eprintln!("{} acknowledged; took {:?}", acked.len(), started.elapsed());
}
