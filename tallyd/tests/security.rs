//! Attacks on a 3-replica cluster, each against a real cluster from `cluster init`, each passing
//! because the attack now fails: a stranger on the peer port, floods of sockets on one replica,
//! large values beside small transfers, and the leader's disk filling up (`docs/security.md`).

mod common;

use common::*;
use protobuf::Message as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tally_codec::wire::{ClientMessage, ServerMessage, SubmitReply};
use tally_codec::{ErrorCode, Operation};

fn terms(addrs: &[String]) -> Vec<u64> {
    addrs.iter().filter_map(|a| status_of(a)).map(|s| s.term).collect()
}

/// A raft message as a peer frame (`u32-le len ‖ protobuf`).
fn raft_frame(msg: &raft::eraftpb::Message) -> Vec<u8> {
    let body = msg.write_to_bytes().expect("encode");
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A stranger on the peer port, echoing a hello that claims to be the leader and then sending a
/// heartbeat and an append at term+1000, moves nothing and learns nothing.
#[test]
fn a_stranger_on_the_peer_port_moves_nothing_and_learns_nothing() {
    let (_dir, layout) = init_cluster(3, 1);
    let nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, leader) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 4, 1);
    std::thread::sleep(Duration::from_millis(500));
    let term = leader.term;
    for (i, cfg) in layout.configs.iter().enumerate() {
        if i == li {
            continue;
        }
        for _ in 0..20 {
            let mut s = TcpStream::connect(&cfg.peer_listen).expect("connect peer port");
            s.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
            // The old protocol: a hello claiming the leader's id, then forged Raft messages.
            let hello = tally_failover::handshake::Hello::new(&layout.cluster_id, leader.node_id, [0; 32]);
            let hello = tally_codec::encode(&hello);
            let mut frame = (hello.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&hello);
            let _ = s.write_all(&frame);
            let mut hb = raft::eraftpb::Message::default();
            hb.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
            hb.from = leader.node_id;
            hb.to = cfg.node_id;
            hb.term = term + 1000;
            let mut app = hb.clone();
            app.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
            let junk = raft::eraftpb::Entry { data: vec![0xAB; 64].into(), ..Default::default() };
            app.set_entries(vec![junk].into());
            let _ = s.write_all(&raft_frame(&hb));
            let _ = s.write_all(&raft_frame(&app));
            // Whatever the replica sent back must not reveal the cluster's hello.
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let id = layout.cluster_id.as_bytes();
            assert!(!got.windows(id.len()).any(|w| w == id), "the replica sent its hello to a stranger");
        }
    }
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(5), || writer.acked_len() > n + 8), "the cluster stopped committing");
    let after = terms(&addrs);
    assert!(after.iter().all(|t| *t < term + 1000), "a forged term moved the cluster: {after:?}");
    let (_, now) = wait_leader(&nodes, Duration::from_secs(5));
    assert_eq!(now.term, term, "no election was forced");
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}

/// Floods: 3,000 idle sockets and a slowloris (a 100,000-byte length prefix, then one byte a
/// second) on the leader's client port, and a drip on its peer port: writes through the followers
/// keep committing, the leader's threads stay bounded, a restarted follower rejoins.
#[test]
fn floods_on_one_replica_do_not_stop_the_cluster() {
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let followers: Vec<String> = addrs.iter().enumerate().filter(|(i, _)| *i != li).map(|(_, a)| a.clone()).collect();
    let target = addrs[li].clone();
    let peer_target = layout.configs[li].peer_listen.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Idle sockets.
    let mut idle = Vec::new();
    for _ in 0..3000 {
        if let Ok(s) = TcpStream::connect(&target) {
            idle.push(s);
        }
    }
    // Slowloris on both ports, one byte a second.
    let drip = |addr: String, prefix: Vec<u8>, n: usize, stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        std::thread::spawn(move || {
            let mut socks: Vec<TcpStream> = (0..n).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
            for s in &mut socks {
                let _ = s.write_all(&prefix);
            }
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                for s in &mut socks {
                    let _ = s.write_all(&[0x16]);
                }
                std::thread::sleep(Duration::from_secs(1));
                // Reconnect what was cut, as an attacker would.
                socks.retain_mut(|s| s.write_all(&[0x16]).is_ok());
                while socks.len() < n {
                    match TcpStream::connect(&addr) {
                        Ok(mut s) => {
                            let _ = s.write_all(&prefix);
                            socks.push(s);
                        }
                        Err(_) => break,
                    }
                }
            }
        })
    };
    let t1 = drip(target.clone(), 100_000u32.to_le_bytes().to_vec(), 1030, stop.clone());
    let t2 = drip(peer_target, vec![0x16], 100, stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    let writer = Writer::start(&followers, account_key(&layout, 0), 16, 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    assert!(
        wait_until(Duration::from_secs(15), || writer.acked_len() >= 200),
        "writes through the followers stalled under the flood: {} acknowledged",
        writer.acked_len()
    );
    let threads = std::fs::read_to_string(format!("/proc/{}/status", nodes[li].pid()))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Threads:")).map(|l| l[8..].trim().parse::<u64>().unwrap_or(0)))
        .unwrap_or(0);
    eprintln!("leader threads under the flood: {threads}");
    // The flooded replica itself still answers a client (its handshake finishes in
    // milliseconds, so it wins the slot a dripping socket held).
    assert!(
        wait_until(Duration::from_secs(5), || status_of(&target).is_some()),
        "the flooded replica does not answer status"
    );
    assert!(threads < 1500, "the leader's threads grew with the flood: {threads}");
    // A follower restarted during the flood gets back in through the leader's peer port.
    let fi = (li + 1) % 3;
    nodes[fi].kill9();
    std::thread::sleep(Duration::from_millis(500));
    nodes[fi] = Daemon::spawn(&layout.config_paths[fi], &addrs[fi], &layout.dir.join(format!("node-{}.b.log", fi + 1)));
    nodes[fi].wait_ready(Duration::from_secs(20));
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 32), "no commits after the restart");
    assert!(Instant::now() < deadline + Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Release);
    drop(idle);
    let _ = t1.join();
    let _ = t2.join();
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}

/// Large values: 320 SETs of 64 KB at once (a 41.7 MB batch before) while another client transfers:
/// batches are closed by bytes, so every transfer commits, and nothing is refused with a made-up
/// "leadership changed".
#[test]
fn large_values_do_not_get_other_clients_refused() {
    let (_dir, layout) = init_cluster(3, 2);
    let nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, _) = wait_leader(&nodes, Duration::from_secs(10));
    let big = client(&layout, 0);
    let value = format!("\"{}\"", "x".repeat(64 * 1024 - 16));
    let reqs: Vec<_> = (0..320)
        .map(|_| {
            let key = tally_codec::DocKey::parse(&uuid_v4()).expect("uuid");
            big.sign(Operation::Set { key, value: value.clone().into_bytes() }).expect("sign")
        })
        .collect();
    let conn = tally_client::Connection::connect_with(&addrs[li], &dial_for(&addrs[li]), Duration::from_secs(2))
        .expect("connect");
    let pending: Vec<_> =
        reqs.chunks(64).map(|c| conn.send(ClientMessage::Submit(c.to_vec())).expect("send")).collect();
    let other = client(&layout, 1);
    let to = fresh_key();
    let mut transfers_ok = 0;
    for _ in 0..20 {
        if other.transfer(to, 1).is_ok() {
            transfers_ok += 1;
        }
    }
    let mut committed = 0;
    for p in pending {
        match p.wait(Duration::from_secs(60)).expect("reply") {
            ServerMessage::Submitted(rs) => {
                for r in rs {
                    match r {
                        SubmitReply::Committed { .. } => committed += 1,
                        SubmitReply::Refused(e) => {
                            assert_ne!(e.code, ErrorCode::Retry, "refused with a wrong reason: {e}");
                        }
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(transfers_ok, 20, "every unrelated transfer commits");
    assert_eq!(committed, 320, "every large SET commits, in byte-bounded batches");
}

fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A full disk: the leader's data disk fills up. It stops replicating (so the others elect a new
/// leader), its status says `StorageFull`, clients are never told "leadership changed", and nothing
/// acknowledged is lost. Needs a tmpfs mount (root): skipped with a message if not, failed where
/// `CI` is set.
#[test]
fn a_full_disk_is_reported_and_the_leader_steps_down() {
    let (dir, mut layout) = init_cluster(3, 1);
    let layout_dir = dir.path().to_path_buf();
    // Each node's data on its own small tmpfs, so one can be filled.
    let mut mounts = Vec::new();
    for (i, cfg) in layout.configs.iter_mut().enumerate() {
        let m = layout_dir.join(format!("disk-{}", i + 1));
        std::fs::create_dir_all(&m).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            cannot_run("a_full_disk_is_reported_and_the_leader_steps_down", "`mount -t tmpfs` failed (it needs root)");
            for m in &mounts {
                let _ = std::process::Command::new("umount").arg(m).status();
            }
            return;
        }
        cfg.data_dir = m.join("data").display().to_string();
        write_config(&layout.config_paths[i], cfg);
        mounts.push(m);
    }
    struct Unmount(Vec<std::path::PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for m in &self.0 {
                let _ = std::process::Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
    let mut nodes = start_all(&layout);
    let _unmount = Unmount(mounts.clone());
    let addrs = layout.client_addrs();
    let (li, before) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 8, 1);
    std::thread::sleep(Duration::from_millis(800));
    // Fill the leader's disk.
    let filler = mounts[li].join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let mut new_leader = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            new_leader = others
                .iter()
                .filter_map(|i| status_of(&addrs[*i]))
                .find(|s| s.leader_id.is_some_and(|l| l != before.node_id));
            new_leader.is_some()
        }),
        "the full leader did not step down"
    );
    let n = writer.acked_len();
    let committed = wait_until(Duration::from_secs(10), || writer.acked_len() > n + 16);
    if !committed {
        dump_logs(&nodes);
    }
    assert!(committed, "no commits after the step-down");
    // The full replica is still up, says why it stopped, and leads nothing.
    let s = status_of(&addrs[li])
        .unwrap_or_else(|| panic!("the full replica does not answer status:\n{}", nodes[li].log_text()));
    assert!(
        s.warnings.iter().any(|w| w.contains("StorageFull")),
        "status of the full replica says why: {:?}",
        s.warnings
    );
    assert_ne!(s.leader_id, Some(s.node_id), "a full replica does not lead");
    // Space comes back: the replica restarts in place (same process id) and catches up.
    let pid = nodes[li].pid();
    let _ = std::fs::remove_file(&filler);
    let top = || others.iter().filter_map(|i| status_of(&addrs[*i])).map(|s| s.committed_height).max().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(30), || status_of(&addrs[li])
            .is_some_and(|s| s.warnings.is_empty() && s.applied_height >= top())),
        "the replica did not recover once space was back:\n{}",
        nodes[li].log_text()
    );
    assert_eq!(nodes[li].pid(), pid, "recovered without a restart by hand");
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);

    // Killed while its disk is full and started again: it waits for space instead of exiting
    // (the chaos monkey found a replica that never came back after such a restart).
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    nodes[li].kill9();
    let log = layout_dir.join(format!("node-{}-refull.log", li + 1));
    let mut again = Daemon::spawn(&layout.config_paths[li], &addrs[li], &log);
    std::thread::sleep(Duration::from_secs(3));
    assert!(again.exited().is_none(), "a replica started on a full disk exited:\n{}", again.log_text());
    assert!(again.log_text().contains("waiting for space"), "it says why it waits:\n{}", again.log_text());
    let _ = std::fs::remove_file(&filler);
    assert!(
        wait_until(Duration::from_secs(30), || status_of(&addrs[li]).is_some_and(|s| s.applied_height >= top())),
        "the replica did not start once space was back:\n{}",
        again.log_text()
    );
    drop(again);
    drop(nodes);
}
