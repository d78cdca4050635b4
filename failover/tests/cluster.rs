//! Scenario tests: real RaftReplicators on 127.0.0.1 in one process, each with its own Wal in a
//! temp dir and a toy state machine (a list of applied batches) fed by the committed channel.

use crossbeam::channel::{bounded, Receiver};
use parking_lot::Mutex;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_failover::env::SystemEnv;
use tally_failover::snapshot::ExportedState;
use tally_failover::{
    Committed, EntryKind, Member, ProposeError, RaftConfig, RaftReplicator, Replicator, SnapshotSink, SnapshotSource,
};
use tally_store::wal::{Wal, WalOptions};

const TICK_MS: u64 = 20;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
const WAIT: Duration = Duration::from_secs(15);

/// The toy state machine: what was applied, in order.
#[derive(Default)]
struct App {
    applied_index: u64,
    applied_term: u64,
    batches: Vec<(u64, Vec<u8>)>,
    /// Every entry delivered in this process run (index, kind), to check exactly-once delivery.
    delivered: Vec<u64>,
}

struct AppHandle(Arc<Mutex<App>>);

impl SnapshotSource for AppHandle {
    fn snapshot(&self, _at_least: u64) -> Result<Arc<ExportedState>, String> {
        let a = self.0.lock();
        Ok(Arc::new(ExportedState {
            index: a.applied_index,
            term: a.applied_term,
            state: tally_codec::encode(&a.batches),
        }))
    }
}

impl SnapshotSink for AppHandle {
    fn install(&self, index: u64, term: u64, data: &[u8]) -> Result<(), String> {
        let batches: Vec<(u64, Vec<u8>)> = tally_codec::decode(data, 1 << 24).map_err(|e| e.to_string())?;
        let mut a = self.0.lock();
        a.batches = batches;
        a.applied_index = index;
        a.applied_term = term;
        Ok(())
    }
}

fn apply_loop(rx: Receiver<Committed>, app: Arc<Mutex<App>>) {
    while let Ok(c) = rx.recv() {
        let mut a = app.lock();
        a.delivered.push(c.index);
        if c.index <= a.applied_index {
            continue; // covered by an installed snapshot
        }
        assert_eq!(c.index, a.applied_index + 1, "entries arrive in order without gaps");
        a.applied_index = c.index;
        a.applied_term = c.term;
        if c.kind == EntryKind::Batch {
            a.batches.push((c.index, c.data));
        }
    }
}

struct TestNode {
    id: u64,
    dir: tempfile::TempDir,
    cfg: RaftConfig,
    app: Arc<Mutex<App>>,
    rep: Option<RaftReplicator>,
    applier: Option<std::thread::JoinHandle<()>>,
    /// Bound before the first start, so no other socket can take the port meanwhile.
    listener: Option<TcpListener>,
}

impl TestNode {
    fn start(&mut self) {
        let wal = Wal::open(&self.dir.path().join("wal"), WalOptions::default()).expect("wal");
        let applied = self.app.lock().applied_index;
        self.app.lock().delivered.clear();
        let (tx, rx) = bounded(1024);
        let app = self.app.clone();
        self.applier = Some(std::thread::spawn(move || apply_loop(rx, app)));
        let env = Box::new(SystemEnv::new(Some(self.id * 7919)));
        let snaps = Arc::new(AppHandle(self.app.clone()));
        let listener = match self.listener.take() {
            Some(l) => l,
            None => rebind(&self.cfg.peer_listen),
        };
        let rep = RaftReplicator::start_on(self.cfg.clone(), listener, wal, applied, env, tx, snaps).expect("start");
        self.rep = Some(rep);
    }

    fn stop(&mut self) {
        if let Some(r) = self.rep.take() {
            r.stop();
        }
        if let Some(t) = self.applier.take() {
            t.join().expect("applier");
        }
    }

    fn rep(&self) -> &RaftReplicator {
        self.rep.as_ref().expect("running")
    }

    fn running(&self) -> bool {
        self.rep.is_some()
    }

    fn batches(&self) -> Vec<(u64, Vec<u8>)> {
        self.app.lock().batches.clone()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop();
    }
}

fn listen() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

/// A restarted node listens on its old port again; an outgoing connection may hold it briefly.
fn rebind(addr: &str) -> TcpListener {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) => assert!(Instant::now() < deadline, "cannot rebind {addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn member(id: u64, port: u16) -> Member {
    Member {
        node_id: id,
        client_addr: format!("127.0.0.1:{}", 9000 + id),
        peer_addr: format!("127.0.0.1:{port}"),
        is_voter: true,
        matched_index: 0,
    }
}

fn config(id: u64, peers: Vec<Member>, port: u16, retain: u64) -> RaftConfig {
    RaftConfig {
        node_id: id,
        peers,
        peer_listen: format!("127.0.0.1:{port}"),
        tick_ms: TICK_MS,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: HEARTBEAT_TICKS,
        cluster_id: "test-cluster".into(),
        config_fingerprint: RaftConfig::timing_fingerprint(TICK_MS, ELECTION_TICKS, HEARTBEAT_TICKS),
        log_retain_entries: retain,
        peer_security: tally_failover::transport::PeerSecurity::InsecurePlaintext,
    }
}

fn cluster(n: u64, retain: u64) -> Vec<TestNode> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut listeners: Vec<(TcpListener, u16)> = (0..n).map(|_| listen()).collect();
    let peers: Vec<Member> = (1..=n).map(|id| member(id, listeners[(id - 1) as usize].1)).collect();
    let mut nodes: Vec<TestNode> = (1..=n)
        .rev()
        .map(|id| {
            let (l, port) = listeners.pop().expect("listener");
            TestNode {
                id,
                dir: tempfile::tempdir().expect("dir"),
                cfg: config(id, peers.clone(), port, retain),
                app: Arc::new(Mutex::new(App::default())),
                rep: None,
                applier: None,
                listener: Some(l),
            }
        })
        .collect();
    nodes.reverse();
    for n in &mut nodes {
        n.start();
    }
    nodes
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for one leader that every running node follows, with its term applied (its no-op);
/// returns its position.
fn wait_leader(nodes: &[TestNode], min_term: u64) -> usize {
    let mut leader = 0;
    wait_until("a leader", || {
        let running: Vec<&TestNode> = nodes.iter().filter(|n| n.running()).collect();
        let leaders: Vec<usize> =
            (0..nodes.len()).filter(|i| nodes[*i].running() && nodes[*i].rep().role().is_leader).collect();
        if leaders.len() != 1 {
            return false;
        }
        let l = &nodes[leaders[0]];
        let role = l.rep().role();
        let agreed = running.iter().all(|n| n.rep().role().leader_id == Some(l.id));
        leader = leaders[0];
        agreed && role.term >= min_term && l.app.lock().applied_index >= role.term_start_index && l.rep().lease_valid()
    });
    leader
}

fn propose_all(node: &TestNode, tag: &str, count: usize) {
    let term = node.rep().role().term;
    for i in 0..count {
        let data = format!("{tag}-{i}").into_bytes();
        loop {
            match node.rep().propose(term, data.clone()) {
                Ok(()) => break,
                Err(ProposeError::Busy) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("proposal {tag}-{i} refused: {e}"),
            }
        }
    }
}

fn wait_batches(nodes: &[TestNode], count: usize) {
    wait_until("batches on every running node", || {
        nodes.iter().filter(|n| n.running()).all(|n| n.app.lock().batches.len() >= count)
    });
}

fn assert_same_history(nodes: &[TestNode]) {
    let running: Vec<&TestNode> = nodes.iter().filter(|n| n.running()).collect();
    let first = running[0].batches();
    for n in &running[1..] {
        assert_eq!(n.batches(), first, "node {} diverges from node {}", n.id, running[0].id);
    }
}

#[test]
fn three_replicas_elect_replicate_fail_over_and_catch_up() {
    let mut nodes = cluster(3, 1024);
    let l = wait_leader(&nodes, 1);
    let old_term = nodes[l].rep().role().term;
    assert_eq!(nodes[l].rep().voters(), 3);
    assert_eq!(nodes[l].rep().members().len(), 3);

    propose_all(&nodes[l], "a", 20);
    wait_batches(&nodes, 20);
    assert_same_history(&nodes);
    let last = nodes[l].batches()[19].0;
    wait_until("durable on all three", || nodes[l].rep().durable_replicas(last) == 3);
    let follower = (l + 1) % 3;
    assert!(nodes[follower].rep().propose(old_term, b"x".to_vec()).is_err(), "a follower refuses proposals");
    assert!(!nodes[follower].rep().lease_valid());

    // Kill the leader: the others elect a new one in a higher term, within a few seconds.
    let t0 = Instant::now();
    nodes[l].stop();
    let l2 = wait_leader(&nodes, old_term + 1);
    let failover = t0.elapsed();
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");
    let new_term = nodes[l2].rep().role().term;
    assert!(new_term > old_term);
    // The deposed term is fenced.
    assert!(matches!(nodes[l2].rep().propose(old_term, b"stale".to_vec()), Err(ProposeError::NotLeader { .. })));

    propose_all(&nodes[l2], "b", 10);
    wait_batches(&nodes, 30);
    assert_same_history(&nodes);

    // The old leader restarts from its Wal and state: it catches up without redelivery, and its
    // old term cannot propose.
    let applied_before = nodes[l].app.lock().applied_index;
    nodes[l].start();
    assert!(nodes[l].rep().propose(old_term, b"stale".to_vec()).is_err());
    wait_batches(&nodes, 30);
    assert_same_history(&nodes);
    let delivered = nodes[l].app.lock().delivered.clone();
    assert!(delivered.iter().all(|i| *i > applied_before), "entries up to {applied_before} are not redelivered");
    let mut sorted = delivered.clone();
    sorted.dedup();
    assert_eq!(sorted, delivered, "each entry is delivered once");

    let l3 = wait_leader(&nodes, new_term);
    propose_all(&nodes[l3], "c", 5);
    wait_batches(&nodes, 35);
    assert_same_history(&nodes);
}

#[test]
fn lagging_follower_catches_up_from_a_snapshot() {
    let mut nodes = cluster(3, 0);
    let l = wait_leader(&nodes, 1);
    propose_all(&nodes[l], "a", 5);
    wait_batches(&nodes, 5);

    let lagger = (l + 1) % 3;
    nodes[lagger].stop();
    propose_all(&nodes[l], "b", 20);
    wait_until("batches on the two running nodes", || {
        nodes.iter().filter(|n| n.running()).all(|n| n.batches().len() >= 25)
    });
    // The stores are "durable": compact the logs of the running nodes past what the lagger has.
    for n in nodes.iter().filter(|n| n.running()) {
        let applied = n.app.lock().applied_index;
        n.rep().compact_hint(applied);
    }
    std::thread::sleep(Duration::from_millis(200));

    nodes[lagger].start();
    wait_batches(&nodes, 25);
    assert_same_history(&nodes);
    let l2 = wait_leader(&nodes, 1);
    propose_all(&nodes[l2], "c", 3);
    wait_batches(&nodes, 28);
    assert_same_history(&nodes);
}

#[test]
fn a_member_is_added_as_learner_promoted_and_removed() {
    let mut nodes = cluster(3, 1024);
    let l = wait_leader(&nodes, 1);
    propose_all(&nodes[l], "a", 5);
    wait_batches(&nodes, 5);

    // Node 4 knows the existing members' addresses but is not an initial voter.
    let (l4, port) = listen();
    let existing: Vec<Member> = nodes.iter().map(|n| n.cfg.peers[(n.id - 1) as usize].clone()).collect();
    let mut n4 = TestNode {
        id: 4,
        dir: tempfile::tempdir().expect("dir"),
        cfg: config(4, existing, port, 1024),
        app: Arc::new(Mutex::new(App::default())),
        rep: None,
        applier: None,
        listener: Some(l4),
    };
    n4.start();
    nodes[l].rep().add_member(member(4, port)).expect("add member");
    assert_eq!(nodes[l].rep().voters(), 4);
    assert!(nodes[l]
        .rep()
        .members()
        .iter()
        .any(|m| m.node_id == 4 && m.is_voter && m.peer_addr.ends_with(&port.to_string())));
    nodes.push(n4);
    let l = wait_leader(&nodes, 1);
    propose_all(&nodes[l], "b", 5);
    wait_batches(&nodes, 10);
    assert_same_history(&nodes);

    let l = wait_leader(&nodes, 1);
    nodes[l].rep().remove_member(4).expect("remove member");
    assert_eq!(nodes[l].rep().voters(), 3);
    nodes[3].stop();
    propose_all(&nodes[l], "c", 2);
    wait_batches(&nodes, 12);
    assert_same_history(&nodes);
}
