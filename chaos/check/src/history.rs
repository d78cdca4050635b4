//! What a run leaves behind for the checkers, whoever drove it (the simulator, the monkey, a
//! cluster test): the clients' history (invoke, then response, refusal or nothing) and each
//! replica's committed history and state.

use tally_codec::{
    BatchHeader, DocKey, ErrorCode, Operation, Outcome, PublicKey, Receipt, RequestId, Signature, SignedRequest,
};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Transfer {
        id: RequestId,
        from: PublicKey,
        to: PublicKey,
        amount: u64,
    },
    /// `body` is a short value; the document's body digest is derived from it.
    Set {
        id: RequestId,
        key: DocKey,
        body: Vec<u8>,
    },
    Delete {
        id: RequestId,
        key: DocKey,
    },
    /// A linearizable read from the leader.
    Get {
        key: DocKey,
    },
    /// A coordination request (claim, create-only set, lease), checked by I6 against the
    /// committed outcomes.
    Coord {
        id: RequestId,
        signer: PublicKey,
        op: Operation,
    },
}

impl OpKind {
    /// The operation a signed request asks for: transfers and document writes as themselves
    /// (I4 reads them), anything else as a coordination request.
    pub fn of_request(request: &SignedRequest) -> OpKind {
        let id = request.id();
        match &request.request.op {
            Operation::Transfer { to, amount } => {
                OpKind::Transfer { id, from: request.request.signer, to: *to, amount: *amount }
            }
            Operation::Set { key, value } => OpKind::Set { id, key: *key, body: value.clone() },
            Operation::Delete { key } => OpKind::Delete { id, key: *key },
            op => OpKind::Coord { id, signer: request.request.signer, op: op.clone() },
        }
    }

    pub fn id(&self) -> Option<RequestId> {
        match self {
            OpKind::Transfer { id, .. }
            | OpKind::Set { id, .. }
            | OpKind::Delete { id, .. }
            | OpKind::Coord { id, .. } => Some(*id),
            OpKind::Get { .. } => None,
        }
    }
    pub fn doc_key(&self) -> Option<DocKey> {
        match self {
            OpKind::Set { key, .. } | OpKind::Delete { key, .. } | OpKind::Get { key } => Some(*key),
            OpKind::Transfer { .. } | OpKind::Coord { .. } => None,
        }
    }
}

/// A document as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRead {
    pub revision: u64,
    pub body: Vec<u8>,
}

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// No answer before the client gave up (or the run ended): it may or may not have happened.
    Unknown,
    /// Executed and committed: the signed receipt the client was given.
    Committed(Box<Receipt>),
    /// Refused without executing (not leader, expired, overloaded, …): it did not happen and
    /// never will, because the client stops retrying those bytes only once they expired.
    Refused(ErrorCode),
    /// A read's answer: `None` when the document does not exist.
    Read(Option<DocRead>),
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub client: u64,
    pub invoke_ms: u64,
    /// When the response arrived; `None` with [`OpResult::Unknown`].
    pub complete_ms: Option<u64>,
    pub kind: OpKind,
    pub result: OpResult,
}

/// Every operation of every client, in invoke order.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
}

/// A committed batch as a replica stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub header: BatchHeader,
    pub signature: Signature,
    pub request_ids: Vec<RequestId>,
    pub outcomes: Vec<Outcome>,
}

/// A replica's view at the end of the run.
#[derive(Debug, Clone)]
pub struct ReplicaFinal {
    pub node_id: u64,
    /// Every batch it holds with its body, by height, without gaps. A simulated replica holds
    /// them from height 1; a real one restored from a snapshot holds them from a later height
    /// (a snapshot carries only the last batches: `docs/architecture.md`), and the headers it
    /// holds without a body go in [`RunRecord::headers`].
    pub batches: Vec<StoredBatch>,
    /// Height of its applied state and a digest of that state (every key and value).
    pub applied_height: u64,
    pub state_digest: tally_codec::Digest,
    /// Every account balance in its state (a driver that only knows the total gives one entry
    /// holding it).
    pub balances: Vec<(PublicKey, u64)>,
}

/// A signed header seen anywhere during the run (receipts, announcements, stored batches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenHeader {
    pub header: BatchHeader,
    pub signature: Signature,
    /// Where it was seen, for the report.
    pub source: String,
}

/// Everything the checkers need from one run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub operator: PublicKey,
    pub genesis_total: u128,
    pub history: History,
    pub replicas: Vec<ReplicaFinal>,
    pub headers: Vec<SeenHeader>,
    /// Time (ms since the run started) when the faults were healed, the highest committed height then, and the
    /// highest committed height at the end of the liveness phase (`None`: no leader at the end).
    pub healed_at_ms: u64,
    pub height_at_heal: u64,
    pub height_at_end: Option<u64>,
    pub first_commit_after_heal_ms: Option<u64>,
}
