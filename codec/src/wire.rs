//! Client protocol: length-prefixed frames carrying borsh messages.
//!
//! ```text
//! frame := u32-le body_len ‖ body            (body_len ≤ FRAME_BYTES_MAX)
//! body  := borsh(Envelope<ClientMessage | ServerMessage>)
//! ```
//! A connection may have many frames in flight; replies carry the request frame's `id` and may
//! come back out of order.

use crate::{limits, CodecError, DocKey, ErrorCode, PublicKey, Receipt, RequestId, SignedRequest};
use borsh::{BorshDeserialize, BorshSerialize};
use std::io::{self, Read, Write};

/// Wraps a message with the id the reply will echo.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Envelope<M> {
    pub id: u64,
    pub msg: M,
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum ClientMessage {
    /// Client-side batching: many independently signed requests, one reply entry each (at most
    /// `FRAME_REQUESTS_MAX`, refused by their count before any is decoded).
    Submit(#[borsh(deserialize_with = "crate::bounded::requests_in_frame")] Vec<SignedRequest>),
    /// `stale` allows a follower to answer from its own state.
    Get {
        key: DocKey,
        stale: bool,
    },
    Balance {
        account: PublicKey,
        stale: bool,
    },
    /// Also the heartbeat.
    Status,
    Receipt {
        id: RequestId,
    },
    ClusterAdd {
        node_id: u64,
        client_addr: String,
        peer_addr: String,
    },
    ClusterRemove {
        node_id: u64,
    },
    /// One committed batch as this replica stores it (auditing, invariant checks).
    Batch {
        height: u64,
    },
    /// Totals over this replica's state (invariant I4).
    Audit,
    /// A frame a follower relays to the leader. Never relayed again: one hop at most, so two
    /// replicas with stale views of the leader cannot bounce a frame between them.
    Forwarded(Relayed),
    /// A cluster operation signed by an admin key. The unsigned `ClusterAdd`, `ClusterRemove`
    /// and `Audit` above are kept for the wire format's sake and always refused
    /// (`NotAuthorized`).
    Admin(crate::admin::SignedAdmin),
    /// The committed changes `filter` selects, from batch `from_height` on, in commit order: at
    /// most `max_batches` batches (and about 256 KiB). When the replica has nothing at
    /// `from_height` yet it waits up to `wait_ms` (at most 500) before answering an empty page.
    /// Any replica answers from what its store holds.
    Watch {
        filter: WatchFilter,
        from_height: u64,
        max_batches: u32,
        wait_ms: u32,
    },
    /// The receipt of request `id`, executed in the batch at `height`. `Receipt` finds an id by
    /// itself only until the request's expiry passes; with its height, any receipt is found
    /// however old (the height is in every receipt, confirmation and watch event).
    ReceiptAt {
        id: RequestId,
        height: u64,
    },
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum WatchFilter {
    Doc(DocKey),
    AllDocs,
    /// The claims of one domain.
    Domain(String),
    Leases,
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Change {
    DocSet {
        key: DocKey,
        owner: PublicKey,
        revision: u64,
        lease: Option<u64>,
        value: Vec<u8>,
    },
    DocDeleted {
        key: DocKey,
    },
    ClaimGranted {
        domain: String,
        slot: u64,
        holder: PublicKey,
        lease: Option<u64>,
    },
    /// The claim's lease ended.
    ClaimReleased {
        domain: String,
        slot: u64,
    },
    /// Granted or renewed.
    LeaseSet {
        lease: u64,
        owner: PublicKey,
        expires_at_ms: u64,
    },
    /// Revoked or expired.
    LeaseEnded {
        lease: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WatchEvent {
    pub height: u64,
    /// The batch's header time.
    pub time_ms: u64,
    pub change: Change,
}

/// A page of a watch: the events of batches `from_height .. next_height`, in order.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WatchPage {
    pub events: Vec<WatchEvent>,
    /// Where the next page starts (the first batch this page did not cover).
    pub next_height: u64,
}

/// What a follower may relay: the leader-only messages. Not a [`ClientMessage`], so a relayed
/// frame cannot nest another one (decoding stays shallow whatever the input).
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Relayed {
    Submit(#[borsh(deserialize_with = "crate::bounded::requests_in_frame")] Vec<SignedRequest>),
    Get {
        key: DocKey,
        stale: bool,
    },
    Balance {
        account: PublicKey,
        stale: bool,
    },
    ClusterAdd {
        node_id: u64,
        client_addr: String,
        peer_addr: String,
    },
    ClusterRemove {
        node_id: u64,
    },
    /// A receipt this replica does not hold (it installed a snapshot past that height).
    Receipt {
        id: RequestId,
    },
    Admin(crate::admin::SignedAdmin),
    ReceiptAt {
        id: RequestId,
        height: u64,
    },
}

impl Relayed {
    /// The relayable part of a client message, or the message back when it is not relayable.
    ///
    /// # Errors
    /// Returns the message unchanged when it is not one of the relayable kinds.
    #[allow(clippy::result_large_err)] // the message goes back to its caller by value, once per frame
    pub fn from_client(msg: ClientMessage) -> Result<Relayed, ClientMessage> {
        match msg {
            ClientMessage::Submit(r) => Ok(Relayed::Submit(r)),
            ClientMessage::Get { key, stale } => Ok(Relayed::Get { key, stale }),
            ClientMessage::Balance { account, stale } => Ok(Relayed::Balance { account, stale }),
            ClientMessage::ClusterAdd { node_id, client_addr, peer_addr } => {
                Ok(Relayed::ClusterAdd { node_id, client_addr, peer_addr })
            }
            ClientMessage::ClusterRemove { node_id } => Ok(Relayed::ClusterRemove { node_id }),
            ClientMessage::Receipt { id } => Ok(Relayed::Receipt { id }),
            ClientMessage::ReceiptAt { id, height } => Ok(Relayed::ReceiptAt { id, height }),
            ClientMessage::Admin(a) if !matches!(a.command.op, crate::admin::AdminOp::AuditPage { .. }) => {
                Ok(Relayed::Admin(a))
            }
            other => Err(other),
        }
    }

    pub fn into_client(self) -> ClientMessage {
        match self {
            Relayed::Submit(r) => ClientMessage::Submit(r),
            Relayed::Get { key, stale } => ClientMessage::Get { key, stale },
            Relayed::Balance { account, stale } => ClientMessage::Balance { account, stale },
            Relayed::ClusterAdd { node_id, client_addr, peer_addr } => {
                ClientMessage::ClusterAdd { node_id, client_addr, peer_addr }
            }
            Relayed::ClusterRemove { node_id } => ClientMessage::ClusterRemove { node_id },
            Relayed::Receipt { id } => ClientMessage::Receipt { id },
            Relayed::ReceiptAt { id, height } => ClientMessage::ReceiptAt { id, height },
            Relayed::Admin(a) => ClientMessage::Admin(a),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum ServerMessage {
    /// One entry per submitted request, in order.
    Submitted(#[borsh(deserialize_with = "crate::bounded::replies_in_frame")] Vec<SubmitReply>),
    Doc(Option<DocView>),
    Balance(Option<u64>),
    Status(StatusInfo),
    /// Boxed: a receipt is the largest reply by far.
    Receipt(Option<Box<Receipt>>),
    Batch(Option<BatchInfo>),
    Audit(AuditInfo),
    Done,
    Error(WireError),
    AuditPage(AuditPageInfo),
    Watched(WatchPage),
    /// Not served now: a named limit on shared work (watches, admin scans) is reached. Ask
    /// again after `retry_after_ms`; nothing was done. (Tag 11: a client that predates it
    /// cannot decode the frame and closes the connection.)
    Busy(BusyInfo),
}

/// Why a frame was not served now, and when to ask again.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BusyInfo {
    /// The limit that refused, by its name in docs/security.md (`WATCHES_PER_ADDRESS_MAX`).
    pub limit: String,
    /// Wait at least this long before asking again.
    pub retry_after_ms: u32,
    pub message: String,
}

/// One page of an admin scan: totals over the keys it covered, and where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct AuditPageInfo {
    pub applied_height: u64,
    pub state_digest: crate::Digest,
    pub keys: u64,
    /// Sum of balances (accounts table; 0 for documents).
    pub balance_total: u128,
    /// Last key of this page; `None` when the table is done.
    pub next_after: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum SubmitReply {
    /// Committed and signed. `durable_replicas` replicas had fsynced the batch when we answered.
    Committed {
        receipt: Box<Receipt>,
        durable_replicas: u8,
    },
    Refused(WireError),
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// Client address of the leader, when known (for NotLeader).
    pub leader_hint: Option<String>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), leader_hint: None }
    }
    pub fn from_code(code: ErrorCode) -> Self {
        WireError::new(code, code.message())
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Totals over one replica's applied state, read in one consistent pass.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct AuditInfo {
    pub applied_height: u64,
    pub state_digest: crate::Digest,
    pub accounts: u64,
    pub balance_total: u128,
    pub documents: u64,
}

/// A committed batch: signed header and, where this replica holds the body, its leaves.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct BatchInfo {
    pub header: crate::BatchHeader,
    pub signature: crate::Signature,
    /// False on a replica that installed a snapshot past this height (bodies stay behind).
    pub body_available: bool,
    #[borsh(deserialize_with = "crate::bounded::ids_in_batch")]
    pub request_ids: Vec<RequestId>,
    #[borsh(deserialize_with = "crate::bounded::outcomes_in_batch")]
    pub outcomes: Vec<crate::Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct DocView {
    pub owner: PublicKey,
    pub revision: u64,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct MemberInfo {
    pub node_id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    /// Highest log index this replica is known to hold durably (leader's view).
    pub matched_index: u64,
    pub is_voter: bool,
}

/// Heartbeat / status reply.
#[derive(Debug, Clone, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct StatusInfo {
    pub node_id: u64,
    pub cluster_id: crate::ClusterId,
    pub operator_key: PublicKey,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub committed_height: u64,
    pub applied_height: u64,
    pub replicas_configured: u32,
    pub members: Vec<MemberInfo>,
    pub warnings: Vec<String>,
    pub time_ms: u64,
}

/// Writes one frame.
///
/// # Errors
/// I/O errors, or `InvalidInput` when the body is over the frame limit.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    if body.len() > limits::FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes is over the limit of {}", body.len(), limits::FRAME_BYTES_MAX),
        ));
    }
    w.write_all(&(body.len() as u32).to_le_bytes())?;
    w.write_all(body)
}

/// Reads one frame body into `buf` (reused across calls).
///
/// Returns `Ok(false)` on a clean end of stream before a frame starts.
///
/// # Errors
/// `UnexpectedEof` for a truncated frame; `InvalidData` for a length over `frame_bytes_max`
/// (the connection can't be resynchronised after that, so callers reply and close).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>, frame_bytes_max: usize) -> io::Result<bool> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated frame length")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > frame_bytes_max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {frame_bytes_max} bytes"),
        ));
    }
    // Grow the buffer as bytes arrive: 4 bytes from a peer must not reserve 16 MiB up front.
    buf.clear();
    let got = r.take(len as u64).read_to_end(buf)?;
    if got < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated frame body"));
    }
    Ok(true)
}

/// Decodes a client frame body. Its bounds: [`limits::FRAME_BYTES_MAX`] bytes,
/// [`limits::FRAME_REQUESTS_MAX`] requests (checked on the count, before any request is decoded),
/// [`limits::REQUEST_BYTES_MAX`] bytes per request and [`limits::NESTING_DEPTH_MAX`] levels of
/// transaction, for a `Submit` and a relayed one alike.
///
/// # Errors
/// [`CodecError`] naming the problem: [`CodecError::TooMany`], [`CodecError::RequestTooLarge`],
/// [`CodecError::TooDeep`], [`CodecError::TooLarge`], or `Malformed` (trailing bytes, bad tag).
pub fn decode_client(body: &[u8]) -> Result<Envelope<ClientMessage>, CodecError> {
    crate::decode(body, limits::FRAME_BYTES_MAX)
}

/// Decodes a server frame body.
///
/// # Errors
/// See [`decode_client`].
pub fn decode_server(body: &[u8]) -> Result<Envelope<ServerMessage>, CodecError> {
    crate::decode(body, limits::FRAME_BYTES_MAX)
}
