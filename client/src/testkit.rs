//! An in-process fake node speaking the frame protocol, for client, failover and REPL tests.
//! It commits everything at once with a real (1-leaf) signed receipt; it can be told to hang on
//! submits, to answer NotLeader, or to die (close its listener and every connection).

use ed25519_dalek::SigningKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::wire::{
    self, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, SubmitReply, WireError,
};
use tally_codec::{
    limits, BatchHeader, ClusterId, Digest, DocKey, ErrorCode, Operation, Outcome, PublicKey, Receipt, Request,
    RequestId, SignedRequest,
};

pub const CLUSTER: ClusterId = ClusterId([3; 16]);

pub fn operator() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

#[derive(Default)]
pub struct FakeState {
    pub members: Mutex<Vec<MemberInfo>>,
    pub leader: Mutex<(Option<u64>, Option<String>)>,
    pub seen: Mutex<Vec<RequestId>>,
    pub docs: Mutex<HashMap<DocKey, (u64, Vec<u8>)>>,
    /// Record submits but never answer them (a hung node).
    pub swallow: AtomicBool,
    /// Refuse submits with NotLeader pointing here.
    pub not_leader_hint: Mutex<Option<String>>,
    /// Answer this many watches `Busy` (retry after `busy_retry_ms`), then serve pages of one
    /// `DocDeleted` event per height; each watch's arrival time is recorded.
    pub watch_busy: std::sync::atomic::AtomicU32,
    pub busy_retry_ms: std::sync::atomic::AtomicU32,
    pub watches_at: Mutex<Vec<std::time::Instant>>,
    conns: Mutex<Vec<TcpStream>>,
    height: Mutex<u64>,
}

pub struct FakeNode {
    pub addr: String,
    pub node_id: u64,
    pub state: Arc<FakeState>,
    dead: Arc<AtomicBool>,
}

impl FakeNode {
    pub fn start(node_id: u64) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let state = Arc::new(FakeState::default());
        let dead = Arc::new(AtomicBool::new(false));
        let (st, d) = (state.clone(), dead.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).expect("blocking");
                        st.conns.lock().push(s.try_clone().expect("clone"));
                        let st = st.clone();
                        std::thread::spawn(move || serve(s, node_id, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // Dropping the listener makes the port refuse connections.
        });
        FakeNode { addr, node_id, state, dead }
    }

    /// Stops accepting and closes every connection, like kill -9.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        for c in self.state.conns.lock().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        std::thread::sleep(Duration::from_millis(30));
    }

    pub fn member(&self) -> MemberInfo {
        MemberInfo {
            node_id: self.node_id,
            client_addr: self.addr.clone(),
            peer_addr: String::new(),
            matched_index: 0,
            is_voter: true,
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Gives every node the same member list and leader.
pub fn cluster(nodes: &[&FakeNode], extra: &[MemberInfo], leader: Option<&FakeNode>) {
    let mut members: Vec<MemberInfo> = nodes.iter().map(|n| n.member()).collect();
    members.extend_from_slice(extra);
    for n in nodes {
        *n.state.members.lock() = members.clone();
        *n.state.leader.lock() = (leader.map(|l| l.node_id), leader.map(|l| l.addr.clone()));
    }
}

fn receipt(state: &FakeState, req: SignedRequest, outcome: Outcome) -> Receipt {
    let mut height = state.height.lock();
    *height += 1;
    let leaf = leaf_hash(&req.id(), &outcome);
    let tree = Tree::from_leaves(&[leaf]);
    let header = BatchHeader {
        cluster_id: CLUSTER,
        height: *height,
        prev_hash: Digest::ZERO,
        merkle_root: tree.root(),
        leaf_count: 1,
        write_set_digest: Digest::ZERO,
        state_digest: Digest::ZERO,
        term: 1,
        time_ms: 0,
    };
    let signature = header.sign(&operator());
    Receipt { request: req, outcome, leaf_index: 0, proof: tree.proof(0), header, signature }
}

fn execute(state: &FakeState, req: SignedRequest) -> SubmitReply {
    state.seen.lock().push(req.id());
    let outcome = match &req.request.op {
        Operation::Set { key, value } => {
            let mut docs = state.docs.lock();
            let rev = docs.get(key).map_or(1, |(r, _)| r + 1);
            docs.insert(*key, (rev, value.clone()));
            if rev == 1 {
                Outcome::DocCreated { revision: rev }
            } else {
                Outcome::DocUpdated { revision: rev }
            }
        }
        Operation::Delete { key } => match state.docs.lock().remove(key) {
            Some(_) => Outcome::DocDeleted,
            None => Outcome::Rejected(ErrorCode::NotFound),
        },
        Operation::Transfer { .. } => Outcome::Rejected(ErrorCode::InsufficientFunds),
        // The fake node serves the client's failover tests; coordination runs on real replicas.
        _ => Outcome::Rejected(ErrorCode::Internal),
    };
    SubmitReply::Committed { receipt: Box::new(receipt(state, req, outcome)), durable_replicas: 3 }
}

fn watch_reply(state: &FakeState, from_height: u64) -> ServerMessage {
    state.watches_at.lock().push(std::time::Instant::now());
    let busy = state.watch_busy.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
    if busy {
        return ServerMessage::Busy(wire::BusyInfo {
            limit: "WATCHES_PER_ADDRESS_MAX".into(),
            retry_after_ms: state.busy_retry_ms.load(Ordering::Acquire),
            message: "the fake node is busy".into(),
        });
    }
    let change = wire::Change::DocDeleted { key: DocKey([from_height as u8; 16]) };
    let events = vec![wire::WatchEvent { height: from_height, time_ms: 0, change }];
    ServerMessage::Watched(wire::WatchPage { events, next_height: from_height + 1 })
}

fn serve(mut s: TcpStream, node_id: u64, state: &FakeState) {
    let mut buf = Vec::new();
    while let Ok(true) = wire::read_frame(&mut s, &mut buf, limits::FRAME_BYTES_MAX) {
        let Ok(env) = wire::decode_client(&buf) else { return };
        let reply = match env.msg {
            ClientMessage::Status => {
                let (leader_id, leader_addr) = state.leader.lock().clone();
                let members = state.members.lock().clone();
                ServerMessage::Status(StatusInfo {
                    node_id,
                    cluster_id: CLUSTER,
                    operator_key: PublicKey(operator().verifying_key().to_bytes()),
                    leader_id,
                    leader_addr,
                    term: 7,
                    committed_height: 0,
                    applied_height: 0,
                    replicas_configured: members.len().max(1) as u32,
                    members,
                    warnings: vec![],
                    time_ms: 0,
                })
            }
            ClientMessage::Submit(reqs) => {
                if state.swallow.load(Ordering::Acquire) {
                    state.seen.lock().extend(reqs.iter().map(|r| r.id()));
                    continue;
                }
                if let Some(hint) = state.not_leader_hint.lock().clone() {
                    let e = WireError { leader_hint: Some(hint), ..WireError::from_code(ErrorCode::NotLeader) };
                    ServerMessage::Submitted(reqs.iter().map(|_| SubmitReply::Refused(e.clone())).collect())
                } else {
                    ServerMessage::Submitted(reqs.into_iter().map(|r| execute(state, r)).collect())
                }
            }
            ClientMessage::Get { key, .. } => ServerMessage::Doc(state.docs.lock().get(&key).map(|(rev, v)| DocView {
                owner: PublicKey([0; 32]),
                revision: *rev,
                value: v.clone(),
            })),
            ClientMessage::Balance { .. } => ServerMessage::Balance(Some(5)),
            ClientMessage::Receipt { .. } | ClientMessage::ReceiptAt { .. } => ServerMessage::Receipt(None),
            ClientMessage::ClusterAdd { .. } | ClientMessage::ClusterRemove { .. } | ClientMessage::Admin(_) => {
                ServerMessage::Done
            }
            ClientMessage::Batch { .. } => ServerMessage::Batch(None),
            ClientMessage::Watch { from_height, .. } => watch_reply(state, from_height),
            ClientMessage::Audit | ClientMessage::Forwarded(_) => {
                ServerMessage::Error(WireError::new(ErrorCode::Malformed, "the fake node does not serve this"))
            }
        };
        let body = tally_codec::encode(&Envelope { id: env.id, msg: reply });
        if wire::write_frame(&mut s, &body).and_then(|()| s.flush()).is_err() {
            return;
        }
    }
}

/// A receipt for a 1-leaf batch, signed by `operator`.
pub fn sample_receipt(operator: &SigningKey) -> Receipt {
    let user = SigningKey::from_bytes(&[9; 32]);
    let cluster_id = ClusterId([3; 16]);
    let request = Request {
        cluster_id,
        signer: PublicKey(user.verifying_key().to_bytes()),
        nonce: 42,
        expires_at_ms: 1_000_000,
        op: Operation::Set {
            key: DocKey::from_random([5; 16]),
            value: br#"{"name": "Chapayev's Mustache comb"}"#.to_vec(),
        },
    }
    .sign(&user);
    let outcome = Outcome::DocCreated { revision: 1 };
    let leaf = leaf_hash(&request.id(), &outcome);
    let tree = Tree::from_leaves(&[leaf]);
    let header = BatchHeader {
        cluster_id,
        height: 7,
        prev_hash: Digest::ZERO,
        merkle_root: tree.root(),
        leaf_count: 1,
        write_set_digest: Digest([1; 32]),
        state_digest: Digest([2; 32]),
        term: 3,
        time_ms: 999,
    };
    let signature = header.sign(operator);
    Receipt { request, outcome, leaf_index: 0, proof: tree.proof(0), header, signature }
}
