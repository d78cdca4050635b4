//! A member's key in the wrong hands, against a real 3-replica TLS cluster from `cluster init`:
//! forged Raft messages sent with node 3's certificate and key (the cluster directory holds
//! them), a second link claiming node 3 while the real one is connected, and the revocation of
//! node 3's certificate.

mod common;

use common::*;
use protobuf::Message as _;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use tally_cli::cluster::ClusterLayout;
use tally_failover::frame::{read_frame, write_frame};
use tally_failover::handshake::{Hello, Verdict, HANDSHAKE_BYTES_MAX, PEER_PROTOCOL_VERSION};
use tally_failover::snapshot_stream::KIND_MESSAGE;
use tally_net::Stream;

/// Node `claim`'s certificate and key as `cluster init` wrote them.
fn node_files(dir: &Path, claim: u64) -> tally_net::TlsFiles {
    tally_net::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("node-{claim}.pem")),
        key: dir.join(format!("node-{claim}.key")),
    }
}

/// A peer link into node `target` (index into the layout), authenticated with `files` and
/// claiming node `claim`: mutual TLS, then the hello (the cluster's settings fingerprint, which
/// any member knows: the timing of its config and the genesis file), then the resume frame.
struct ForgedLink {
    stream: Stream,
    claim: u64,
    target: u64,
}

impl ForgedLink {
    fn open(layout: &ClusterLayout, files: &tally_net::TlsFiles, claim: u64, target: usize) -> Result<Self, String> {
        let cfg = &layout.configs[target];
        let client = tally_net::tls::client_config(&files.ca, Some(files)).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(&cfg.peer_listen).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let name = tally_net::tls::node_server_name(cfg.node_id);
        let mut stream = Stream::connect(tcp, client, &name, deadline).map_err(|e| format!("TLS: {e}"))?;
        let genesis = std::fs::read(&layout.genesis_path).map_err(|e| e.to_string())?;
        let fingerprint = tally_failover::RaftConfig::fingerprint(
            PEER_PROTOCOL_VERSION,
            cfg.tick_ms,
            cfg.election_ticks,
            cfg.heartbeat_ticks,
            &genesis,
        );
        let ours = Hello::new(&cfg.cluster_id, claim, fingerprint);
        write_frame(&mut stream, &tally_codec::encode(&ours)).map_err(|e| e.to_string())?;
        stream.flush().map_err(|e| e.to_string())?;
        let theirs = read_frame(&mut stream, HANDSHAKE_BYTES_MAX).map_err(|e| format!("hello: {e}"))?;
        tally_codec::decode::<Hello>(&theirs, HANDSHAKE_BYTES_MAX).map_err(|e| e.to_string())?;
        write_frame(&mut stream, &tally_codec::encode(&Verdict::Accept)).map_err(|e| e.to_string())?;
        stream.flush().map_err(|e| e.to_string())?;
        let verdict = read_frame(&mut stream, HANDSHAKE_BYTES_MAX).map_err(|e| format!("verdict: {e}"))?;
        match tally_codec::decode::<Verdict>(&verdict, HANDSHAKE_BYTES_MAX) {
            Ok(Verdict::Accept) => {}
            other => return Err(format!("refused: {other:?}")),
        }
        read_frame(&mut stream, 256).map_err(|e| format!("resume frame: {e}"))?;
        Ok(ForgedLink { stream, claim, target: cfg.node_id })
    }

    fn send(&mut self, m: &raft::eraftpb::Message) -> std::io::Result<()> {
        let mut frame = vec![KIND_MESSAGE];
        m.write_to_vec(&mut frame).map_err(std::io::Error::other)?;
        write_frame(&mut self.stream, &frame)?;
        self.stream.flush()
    }

    /// A heartbeat "from" the claimed node at `term` with `commit`.
    fn heartbeat(&self, term: u64, commit: u64) -> raft::eraftpb::Message {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
        (m.from, m.to, m.term, m.commit) = (self.claim, self.target, term, commit);
        m
    }

    /// Whether the replica closed this link within `timeout` (it sends nothing on a link it
    /// accepted, so any read ends only when it closes).
    fn closed_within(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.tcp().set_read_timeout(Some(timeout));
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut self.stream, &mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// `GET /metrics` of node `i`.
fn metrics_of(layout: &ClusterLayout, i: usize) -> String {
    let addr = layout.configs[i].metrics_listen.as_deref().expect("metrics port");
    http_get(addr, "/metrics").map(|(_, body)| body).unwrap_or_default()
}

fn refused_count(layout: &ClusterLayout, i: usize, peer: u64, reason: &str) -> f64 {
    let series = format!("tally_peer_messages_refused_total{{peer=\"{peer}\",reason=\"{reason}\"}}");
    metric_value(&metrics_of(layout, i), &series).unwrap_or(0.0)
}

/// Every node is still running 300 ms from now (an aborting process closes its sockets a
/// moment before it can be reaped).
fn assert_all_alive(nodes: &mut [Daemon]) {
    let deadline = Instant::now() + Duration::from_millis(300);
    loop {
        for (i, d) in nodes.iter_mut().enumerate() {
            if let Some(status) = d.exited() {
                let log = d.log_text();
                let why: Vec<&str> =
                    log.lines().filter(|l| l.contains("panicked") || l.contains("out of range")).collect();
                panic!("node {} ended ({status}): {}", i + 1, why.join(" | "));
            }
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The attack: with node 3's certificate and key, one heartbeat at term+1000 with commit 10^9
/// to the leader and to the other follower. Both aborted (`commit_to` out of range in
/// raft-rs). Now both refuse it, count it, cut the link, and the cluster keeps committing.
#[test]
fn a_forged_heartbeat_with_a_members_key_ends_no_replica() {
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (_, leader) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 4, 1);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 8), "the cluster commits before the attack");
    let files = node_files(&layout.dir, 3);
    let targets: Vec<usize> = (0..3).filter(|i| layout.configs[*i].node_id != 3).collect();
    // The real node 3 is connected too: its reconnection may replace a forged link before the
    // replica read the heartbeat (one link per node), so the attack is repeated until counted.
    for &t in &targets {
        let mut counted = false;
        for _ in 0..5 {
            let mut link = match ForgedLink::open(&layout, &files, 3, t) {
                Ok(link) => link,
                Err(e) => {
                    assert_all_alive(&mut nodes);
                    panic!("node 3's key opens no link into node {}: {e}", t + 1);
                }
            };
            link.send(&link.heartbeat(leader.term + 1000, 1_000_000_000)).expect("send");
            assert!(link.closed_within(Duration::from_secs(5)), "node {} did not cut the forged link", t + 1);
            assert_all_alive(&mut nodes);
            if wait_until(Duration::from_secs(1), || refused_count(&layout, t, 3, "commit") >= 1.0) {
                counted = true;
                break;
            }
        }
        assert!(counted, "node {} did not count the refusal", t + 1);
        assert!(nodes[t].log_text().contains("raft message from a peer refused"), "node {} did not log it", t + 1);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_all_alive(&mut nodes);
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 8), "the cluster stopped committing");
    let terms: Vec<u64> = addrs.iter().filter_map(|a| status_of(a)).map(|s| s.term).collect();
    assert!(terms.iter().all(|t| *t < leader.term + 1000), "the forged term was adopted: {terms:?}");
    assert_all_alive(&mut nodes);
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}

/// A second link claiming node 3 while the real node 3 is connected was
/// accepted beside it. Now the newest link of a node replaces the older one, with a log line;
/// the real node's next write finds its link closed, it dials again, and its new link replaces
/// the impostor's.
#[test]
fn a_second_link_claiming_a_connected_node_replaces_the_first() {
    let (_dir, layout) = init_cluster(3, 1);
    let mut nodes = start_all(&layout);
    let addrs = layout.client_addrs();
    let (li, leader) = wait_leader(&nodes, Duration::from_secs(10));
    let writer = Writer::start(&addrs, account_key(&layout, 0), 4, 1);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 8), "the cluster commits");
    // A replica node 3 writes to all the time: the leader, or a follower when node 3 leads.
    let target = if leader.node_id == 3 { (li + 1) % 3 } else { li };
    let mut fake = ForgedLink::open(&layout, &node_files(&layout.dir, 3), 3, target).expect("link");
    // The impostor's link took the real one's place; the real node dials again and takes it back.
    assert!(
        fake.closed_within(Duration::from_secs(10)),
        "node {} kept a second link claiming node 3 open beside the real one",
        target + 1
    );
    let log_line = "a second link claimed this node";
    assert!(
        wait_until(Duration::from_secs(5), || nodes[target].log_text().matches(log_line).count() >= 2),
        "node {} did not log both replacements (the impostor's link, then the real node's)",
        target + 1
    );
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 8), "the cluster stopped committing");
    let height = |i: usize| status_of(&layout.configs[i].listen).map_or(0, |s| s.applied_height);
    let three = (0..3).find(|i| layout.configs[*i].node_id == 3).expect("node 3");
    let top = height(target);
    assert!(wait_until(Duration::from_secs(10), || height(three) >= top), "node 3 fell behind");
    assert_all_alive(&mut nodes);
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}

/// A copy of node `id`'s certificate and key, as a thief holds them (they outlive the files
/// `revoke-node` moves aside).
fn steal(dir: &Path, id: u64) -> tally_net::TlsFiles {
    let stolen = tally_net::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("stolen-{id}.pem")),
        key: dir.join(format!("stolen-{id}.key")),
    };
    std::fs::copy(dir.join(format!("node-{id}.pem")), &stolen.cert).expect("copy the certificate");
    std::fs::copy(dir.join(format!("node-{id}.key")), &stolen.key).expect("copy the key");
    stolen
}

fn tally_in(dir: &Path, args: &[&str]) -> std::process::Output {
    tally_command().arg("--cluster-dir").arg(dir).args(args).output().expect("run tally")
}

fn ok_or_panic(what: &str, o: &std::process::Output) {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// An operator had no way to shut a leaked node key out short of rebuilding
/// the cluster. `cluster revoke-node 3` removes node 3 and revokes its certificate through the
/// log: every replica refuses it (a restarted one too, and a new node 3 that learned it from a
/// snapshot), and `cluster add` brings node 3 back with a new certificate.
#[test]
fn a_revoked_node_certificate_is_refused_everywhere_and_the_node_returns_with_a_new_one() {
    let (_dir, layout) = init_cluster(3, 1);
    let dir = layout.dir.clone();
    let mut nodes = start_all(&layout);
    let (_, _) = wait_leader(&nodes, Duration::from_secs(10));
    let stolen = steal(&dir, 3);
    let three = (0..3).find(|i| layout.configs[*i].node_id == 3).expect("node 3");
    let others: Vec<usize> = (0..3).filter(|i| *i != three).collect();
    let addrs: Vec<String> = others.iter().map(|i| layout.configs[*i].listen.clone()).collect();
    let writer = Writer::start(&addrs, account_key(&layout, 0), 4, 1);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 8), "the cluster commits");
    assert!(ForgedLink::open(&layout, &stolen, 3, others[0]).is_ok(), "before the revocation the key opens a link");

    let revoke = tally_in(&dir, &["-o", "json", "cluster", "revoke-node", "3"]);
    ok_or_panic("cluster revoke-node 3", &revoke);
    let answer: serde_json::Value = serde_json::from_slice(&revoke.stdout).expect("one JSON document");
    let der = tally_net::tls::load_certs(&stolen.cert).expect("certificate").remove(0);
    let fingerprint: String = blake3::hash(der.as_ref()).as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(answer["node_id"], 3, "{answer}");
    assert_eq!(answer["revoked_certificate"], fingerprint.as_str(), "blake3 of the certificate's DER: {answer}");
    assert_eq!(answer["moved"].as_array().map(Vec::len), Some(3), "node-3.toml, .pem and .key: {answer}");
    assert!(!dir.join("node-3.pem").exists(), "node 3's files were moved aside");
    for &i in &others {
        // Committed when the command answered; a follower applies it at the leader's next append
        // (when node 3 led and revoked itself, the last one it sends).
        let shut = || ForgedLink::open(&layout, &stolen, 3, i).is_err();
        assert!(wait_until(Duration::from_secs(5), shut), "node {} still accepts the revoked key", i + 1);
        let refused = || nodes[i].log_text().contains("its certificate was revoked");
        assert!(wait_until(Duration::from_secs(5), refused), "node {} did not log the refusal", i + 1);
    }
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 8), "the cluster stopped committing");
    // Durable: a replica restarted after the revocation still refuses the key.
    let restarted = others[1];
    nodes[restarted].kill9();
    let c = &layout.configs[restarted];
    nodes[restarted] = Daemon::spawn(&layout.config_paths[restarted], &c.listen, &dir.join("node-r.log"));
    nodes[restarted].wait_ready(Duration::from_secs(30));
    assert!(ForgedLink::open(&layout, &stolen, 3, restarted).is_err(), "the restarted replica forgot the revocation");

    // Node 3 comes back on a wiped disk with a new certificate.
    nodes[three].kill9();
    let old = &layout.configs[three];
    let (c3, p3) = (old.listen.clone(), old.peer_listen.clone());
    std::fs::remove_dir_all(&old.data_dir).expect("wipe node 3");
    let add = |extra: &[&str]| {
        let mut args = vec!["cluster", "add", "--node-id", "3", "--client", c3.as_str(), "--peer", p3.as_str()];
        args.extend_from_slice(extra);
        tally_in(&dir, &args)
    };
    ok_or_panic("cluster add --files-only", &add(&["--files-only"]));
    assert_ne!(
        std::fs::read(dir.join("node-3.pem")).expect("new cert"),
        std::fs::read(&stolen.cert).expect("old cert"),
        "a new certificate"
    );
    nodes[three] = Daemon::spawn(&dir.join("node-3.toml"), &c3, &dir.join("node-3-new.log"));
    assert!(wait_until(Duration::from_secs(20), || status_of(&c3).is_some()), "the new node 3 does not answer");
    ok_or_panic("cluster add", &add(&[]));
    let height = |a: &str| status_of(a).map_or(0, |s| s.applied_height);
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 8), "the cluster stopped committing");
    let top = height(&addrs[0]);
    assert!(wait_until(Duration::from_secs(20), || height(&c3) >= top), "node 3 did not catch up");
    // The new node 3 learned the revocation with its snapshot.
    assert!(ForgedLink::open(&layout, &stolen, 3, three).is_err(), "the new node 3 accepts the revoked key");
    assert!(nodes[three].log_text().contains("its certificate was revoked"), "the new node 3 did not log it");
    assert_all_alive(&mut nodes);
    let acked = writer.finish();
    assert_invariants(&layout.client_addrs(), &layout, &acked);
}

/// The leaked key may be the leader's. `cluster revoke-node` of the leader removes it (it steps
/// down once the change commits), the other two elect a leader among themselves and go on
/// committing, and both refuse the old leader's certificate; no acknowledged write is lost.
#[test]
fn revoking_the_leaders_certificate_moves_the_lead_and_shuts_its_key_out() {
    let (_dir, layout) = init_cluster(3, 1);
    let dir = layout.dir.clone();
    let mut nodes = start_all(&layout);
    let (l, _) = wait_leader(&nodes, Duration::from_secs(10));
    let leader_id = layout.configs[l].node_id;
    let stolen = steal(&dir, leader_id);
    let others: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let addrs: Vec<String> = others.iter().map(|i| layout.configs[*i].listen.clone()).collect();
    let writer = Writer::start(&layout.client_addrs(), account_key(&layout, 0), 4, 1);
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > 8), "the cluster commits");

    let started = Instant::now();
    let id = leader_id.to_string();
    let revoke = tally_in(&dir, &["-o", "json", "cluster", "revoke-node", id.as_str()]);
    ok_or_panic(&format!("cluster revoke-node {leader_id} (the leader)"), &revoke);
    eprintln!("revoke-node of the leader answered in {:?}", started.elapsed());
    // The leader carried it out and its answer came back: no replica was asked again (a retry
    // after the answer was lost, or after a timeout when the others cut the leader off in the
    // middle of a joint configuration).
    for &i in &others {
        let asked = nodes[i].log_text().matches("op=RevokeNode").count();
        assert_eq!(asked, 0, "node {} was asked again: the leader's answer did not come back", i + 1);
    }
    let answer: serde_json::Value = serde_json::from_slice(&revoke.stdout).expect("one JSON document");
    assert_eq!(answer["node_id"], leader_id, "{answer}");
    let leads = |i: usize| status_of(&layout.configs[i].listen).is_some_and(|s| s.leader_id == Some(s.node_id));
    assert!(
        wait_until(Duration::from_secs(10), || others.iter().any(|&i| leads(i))),
        "neither remaining replica took the lead"
    );
    for &i in &others {
        let shut = || ForgedLink::open(&layout, &stolen, leader_id, i).is_err();
        assert!(wait_until(Duration::from_secs(5), shut), "node {} accepts the revoked key", i + 1);
        let members = status_of(&layout.configs[i].listen).map(|s| s.members.len());
        assert_eq!(members, Some(2), "node {} still counts the revoked leader as a member", i + 1);
    }
    let n = writer.acked_len();
    assert!(wait_until(Duration::from_secs(10), || writer.acked_len() > n + 8), "the cluster stopped committing");
    // The removed leader's process goes on running (no replica may end on the change, the
    // removed one included); it leads nothing.
    assert!(!leads(l), "the revoked node still claims the lead");
    assert_all_alive(&mut nodes);
    nodes[l].kill9();
    let mut rest: Vec<Daemon> = nodes.drain(..).enumerate().filter(|(i, _)| *i != l).map(|(_, d)| d).collect();
    assert_all_alive(&mut rest);
    let acked = writer.finish();
    assert_invariants(&addrs, &layout, &acked);
}
