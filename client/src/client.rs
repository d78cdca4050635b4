//! A cluster-aware client: signs requests, follows the leader, and fails over by itself.
//!
//! ```text
//!   Client ──current──▶ Connection ──▶ node A        heartbeat thread (≈1 s):
//!     │  on I/O error / timeout:                       Status → current node (members, leader)
//!     │    close A, try leader hint, members, seeds    Status → every other member (reachability)
//!     └──▶ resend the SAME signed bytes to node B      events: Reconnected, minority WARNING
//! ```
//! Retrying the same signed bytes is safe because the server executes a request id at most once
//! and answers a retry with the original receipt (`docs/architecture.md` §7, exactly-once).

use crate::connection::{Connection, CALL_TIMEOUT_MS, CONNECT_TIMEOUT_MS};
use crate::error::ClientError;
use crate::keyfile::public_of;
use crossbeam::channel::{self, Receiver, Sender};
use ed25519_dalek::SigningKey;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tally_codec::admin::{AdminCommand, AdminOp, AuditTable, SignedAdmin};
use tally_codec::wire::{AuditInfo, ClientMessage, DocView, ServerMessage, StatusInfo, SubmitReply, WireError};
use tally_codec::{
    limits, ClusterId, DocKey, Operation, Outcome, PublicKey, Receipt, Request, RequestId, SignedRequest,
};

/// How long a request stays valid; longer than the whole retry budget so retries never expire.
pub const REQUEST_TTL_MS: u64 = 60_000;
/// A node counts as reachable if it answered a Status this recently.
pub const REACHABLE_WINDOW_MS: u64 = 3_000;
/// A node that answers but knows no leader is left for another only after saying so for this
/// long: a fresh cluster electing its first leader (about a second) is not a reason to hop, but
/// a replica cut off from the leader is.
pub const LEADERLESS_HOP_MS: u64 = 3_000;
/// Bound of the event channel; events beyond it are dropped rather than growing memory.
pub const EVENTS_MAX: usize = 64;

/// Timeouts and retry budget.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Wait for one reply at most this long before trying another node.
    pub call_timeout: Duration,
    /// Give up on an operation (and report "Failed to ...") after this long.
    pub retry_total: Duration,
    /// Heartbeat period; `None` for one-shot commands that need no background thread.
    pub heartbeat: Option<Duration>,
    /// Wait for a heartbeat/probe reply at most this long.
    pub heartbeat_timeout: Duration,
    /// TLS against the cluster CA, or plaintext (loopback quick start / explicit opt-in).
    pub dial: tally_net::Dial,
    /// Client addresses as the cluster advertises them (members in `Status`, leader hints) →
    /// where this client dials them. A cluster in containers advertises `tally-1:7001`; the
    /// host reaches that node at its published port, `127.0.0.1:7001` (`client.toml` of
    /// `tally cluster init --hosts`). Addresses not in the map are dialled as they are.
    pub addr_map: Arc<BTreeMap<String, String>>,
}

impl ClientOptions {
    /// Where to dial the node the cluster advertises at `addr`.
    pub fn dial_addr(&self, addr: &str) -> String {
        self.addr_map.get(addr).cloned().unwrap_or_else(|| addr.to_string())
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            call_timeout: Duration::from_millis(CALL_TIMEOUT_MS),
            retry_total: Duration::from_secs(15),
            heartbeat: None,
            heartbeat_timeout: Duration::from_millis(CONNECT_TIMEOUT_MS),
            dial: tally_net::Dial::Plain,
            addr_map: Arc::default(),
        }
    }
}

/// Which node the client talks to and what it knows of the cluster, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionReport {
    pub addr: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// Client addresses of the members that answered recently, in node-id order.
    pub known: Vec<String>,
}

/// Things the REPL shows as they happen in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The client moved to another node by itself.
    Reconnected(ConnectionReport),
    /// Fewer members than a majority answer: writes cannot commit.
    MinorityWarning { reachable: usize, configured: usize, needed: usize },
    /// A majority answers again after a warning.
    MajorityRestored { reachable: usize, configured: usize },
}

impl ConnectionReport {
    fn write(&self, f: &mut fmt::Formatter<'_>, verb: &str) -> fmt::Result {
        match self.leader_id {
            Some(n) => writeln!(f, "{verb} to tally cluster at {} (leader: node {n}, term {})", self.addr, self.term)?,
            None => writeln!(f, "{verb} to tally cluster at {} (leader: none)", self.addr)?,
        }
        write!(f, "Known nodes:")?;
        for a in &self.known {
            write!(f, "\n{a}")?;
        }
        Ok(())
    }
}

/// `Connected to tally cluster at ...` followed by `Known nodes:` lines (the `repl` banner).
impl fmt::Display for ConnectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, "Connected")
    }
}

impl fmt::Display for ClientEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientEvent::Reconnected(r) => r.write(f, "Reconnected"),
            ClientEvent::MinorityWarning { reachable, configured, needed } => write!(
                f,
                "WARNING: {reachable} of {configured} replicas reachable; writes need {needed}. \
                 Writes will wait or fail until a majority is back."
            ),
            ClientEvent::MajorityRestored { reachable, configured } => {
                write!(f, "Majority reachable again: {reachable} of {configured} replicas.")
            }
        }
    }
}

/// A committed write: its id, its receipt, and how many replicas held it durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub request_id: RequestId,
    pub receipt: Box<Receipt>,
    pub durable_replicas: u8,
}

/// What the client knows about the cluster, updated by every Status reply.
#[derive(Default)]
struct View {
    cluster_id: Option<ClusterId>,
    operator_key: Option<PublicKey>,
    status: Option<StatusInfo>,
    /// (node id, client address) of the voters, from the last Status of the current node.
    members: Vec<(u64, String)>,
    configured: usize,
    last_ok: HashMap<u64, Instant>,
    /// The reachable count last warned about, while below a majority.
    warned: Option<usize>,
    /// Since when the current node has answered without knowing a leader.
    no_leader_since: Option<Instant>,
    /// The client moved to another node: `Reconnected` is emitted after the next round of
    /// probes (with a heartbeat), so that it names live nodes and a leader that answers.
    report_due: bool,
}

struct Inner {
    key: SigningKey,
    opts: ClientOptions,
    seeds: Vec<String>,
    conn: Mutex<Option<Arc<Connection>>>,
    /// Serialises node switches so concurrent failures move the client once.
    switch_lock: Mutex<()>,
    view: Mutex<View>,
    events_tx: Sender<ClientEvent>,
    events_rx: Receiver<ClientEvent>,
    stop: AtomicBool,
}

/// The Rust client library's entry point. Cheap to share: all methods take `&self`.
pub struct Client {
    inner: Arc<Inner>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // The heartbeat thread notices within one period and exits; no need to wait for it.
        self.inner.stop.store(true, Ordering::Release);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Splits `--addr` values that may be repeated or comma-separated, dropping empties.
pub fn split_addrs<S: AsRef<str>>(values: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        for a in v.as_ref().split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if !out.iter().any(|x| x == a) {
                out.push(a.to_string());
            }
        }
    }
    out
}

impl Client {
    /// Connects to the first of `addrs` that answers a Status, learning the cluster id.
    ///
    /// # Errors
    /// [`ClientError::NoAddress`] for an empty list, [`ClientError::Unavailable`] when no
    /// address answers.
    pub fn connect(addrs: &[String], key: SigningKey, opts: ClientOptions) -> Result<Client, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddress);
        }
        let (events_tx, events_rx) = channel::bounded(EVENTS_MAX);
        let inner = Arc::new(Inner {
            key,
            opts,
            seeds: addrs.to_vec(),
            conn: Mutex::new(None),
            switch_lock: Mutex::new(()),
            view: Mutex::new(View::default()),
            events_tx,
            events_rx,
            stop: AtomicBool::new(false),
        });
        let mut last = String::from("no address tried");
        for addr in addrs {
            match inner.open(addr) {
                Ok((conn, info)) => {
                    inner.install(conn, info);
                    last.clear();
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        if !last.is_empty() {
            return Err(ClientError::Unavailable { what: "connect", detail: last });
        }
        if let Some(period) = inner.opts.heartbeat {
            inner.probe_members();
            let hb = inner.clone();
            std::thread::Builder::new()
                .name("tally-heartbeat".into())
                .spawn(move || hb.heartbeat_loop(period))
                .map_err(|e| ClientError::Invalid(format!("cannot start the heartbeat thread: {e}")))?;
        }
        Ok(Client { inner })
    }

    /// Background events (reconnects, warnings); only the first receiver to take one sees it.
    pub fn events(&self) -> Receiver<ClientEvent> {
        self.inner.events_rx.clone()
    }

    /// Where the client is connected now, for the `Connected to ...` banner.
    pub fn report(&self) -> ConnectionReport {
        self.inner.report()
    }

    /// The minority warning if fewer than a majority answer now (shown after the banner).
    pub fn majority_warning(&self) -> Option<ClientEvent> {
        let (reachable, configured) = self.inner.reachable();
        let needed = configured / 2 + 1;
        (reachable < needed).then_some(ClientEvent::MinorityWarning { reachable, configured, needed })
    }

    /// (members that answered recently, replicas configured).
    pub fn reachable(&self) -> (usize, usize) {
        self.inner.reachable()
    }

    /// Sends one Status to every member now, so `reachable` is fresh (used by `tally status`).
    pub fn probe_members(&self) {
        self.inner.probe_members();
    }

    /// The signer's public key (the account and document owner this client acts as).
    pub fn public_key(&self) -> PublicKey {
        public_of(&self.inner.key)
    }

    /// The cluster id learned from Status; every request is bound to it.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.inner.view.lock().cluster_id
    }

    /// The operator key the nodes report, saved as a hint in receipt files.
    pub fn operator_key(&self) -> Option<PublicKey> {
        self.inner.view.lock().operator_key
    }

    /// Signs `op` for this cluster with a random nonce and a 60 s expiry.
    ///
    /// # Errors
    /// [`ClientError::Invalid`] when the cluster id is not known yet, or the signed request is over
    /// `REQUEST_BYTES_MAX` (69,632 bytes encoded).
    pub fn sign(&self, op: Operation) -> Result<SignedRequest, ClientError> {
        let cluster_id = self.cluster_id().ok_or_else(|| ClientError::Invalid("cluster id not known yet".into()))?;
        let request = sign_request(&self.inner.key, cluster_id, op);
        // The node refuses a bigger one with its whole frame: say so before anything is sent.
        let bytes = tally_codec::encode(&request).len();
        if bytes > limits::REQUEST_BYTES_MAX {
            return Err(ClientError::Invalid(format!(
                "the signed request is {bytes} bytes encoded; at most {} (a transaction's values together must fit)",
                limits::REQUEST_BYTES_MAX
            )));
        }
        Ok(request)
    }

    /// The Status of the node the client talks to (the heartbeat message).
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no node answers.
    pub fn status(&self) -> Result<StatusInfo, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        match self.inner.request(deadline, "read", &ClientMessage::Status)? {
            ServerMessage::Status(info) => Ok(info),
            other => Err(self.inner.unexpected("Status", &other)),
        }
    }

    /// Submits many signed requests (client-side batching), one reply per request, in order.
    /// Retryable refusals are resent (same bytes) until the retry budget runs out.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no node can take the frame.
    pub fn submit(&self, reqs: Vec<SignedRequest>) -> Result<Vec<SubmitReply>, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(limits::FRAME_REQUESTS_MAX) {
            out.extend(self.inner.submit_chunk(deadline, chunk)?);
        }
        Ok(out)
    }

    /// Submits one request and turns its reply into a result.
    ///
    /// # Errors
    /// [`ClientError::Refused`] (not executed), [`ClientError::Rejected`] (executed, refused;
    /// carries the receipt), [`ClientError::Unavailable`].
    pub fn submit_one(&self, req: SignedRequest) -> Result<Committed, ClientError> {
        let request_id = req.id();
        let reply = self.submit(vec![req])?.pop();
        match reply {
            Some(SubmitReply::Committed { receipt, durable_replicas }) => {
                let committed = Committed { request_id, receipt, durable_replicas };
                match committed.receipt.outcome {
                    Outcome::Rejected(code) => Err(ClientError::Rejected { code, committed: Box::new(committed) }),
                    _ => Ok(committed),
                }
            }
            Some(SubmitReply::Refused(e)) if e.code.is_retryable() => {
                Err(ClientError::Unavailable { what: "write", detail: e.message })
            }
            Some(SubmitReply::Refused(e)) => Err(ClientError::Refused(e)),
            None => Err(ClientError::Protocol { addr: self.inner.addr(), detail: "empty Submitted reply".into() }),
        }
    }

    /// Sets a JSON document; the text is stored exactly as given.
    ///
    /// # Errors
    /// [`ClientError::InvalidJson`] before sending; then as [`Client::submit_one`].
    pub fn set(&self, key: DocKey, json: &str) -> Result<Committed, ClientError> {
        check_json(json)?;
        self.submit_one(self.sign(Operation::Set { key, value: json.as_bytes().to_vec() })?)
    }

    /// Deletes a document this key owns.
    ///
    /// # Errors
    /// As [`Client::submit_one`].
    pub fn delete(&self, key: DocKey) -> Result<Committed, ClientError> {
        self.submit_one(self.sign(Operation::Delete { key })?)
    }

    /// Moves `amount` from this key's account to `to`.
    ///
    /// # Errors
    /// As [`Client::submit_one`].
    pub fn transfer(&self, to: PublicKey, amount: u64) -> Result<Committed, ClientError> {
        self.submit_one(self.sign(Operation::Transfer { to, amount })?)
    }

    /// Reads a document; `stale` allows a follower to answer from its own state.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no node can serve the read.
    pub fn get(&self, key: DocKey, stale: bool) -> Result<Option<DocView>, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        match self.inner.request(deadline, "read", &ClientMessage::Get { key, stale })? {
            ServerMessage::Doc(d) => Ok(d),
            other => Err(self.inner.unexpected("Doc", &other)),
        }
    }

    /// Reads a balance; `None` means the account never held money.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no node can serve the read.
    pub fn balance(&self, account: PublicKey, stale: bool) -> Result<Option<u64>, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        match self.inner.request(deadline, "read", &ClientMessage::Balance { account, stale })? {
            ServerMessage::Balance(b) => Ok(b),
            other => Err(self.inner.unexpected("Balance", &other)),
        }
    }

    /// A read any replica may answer, with the client's failover.
    pub(crate) fn read(&self, msg: &ClientMessage) -> Result<ServerMessage, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        self.inner.request(deadline, "read", msg)
    }

    /// Fetches the receipt of an executed request from any replica.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no node can serve the read.
    pub fn receipt(&self, id: RequestId) -> Result<Option<Receipt>, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        match self.inner.request(deadline, "read", &ClientMessage::Receipt { id })? {
            ServerMessage::Receipt(r) => Ok(r.map(|b| *b)),
            other => Err(self.inner.unexpected("Receipt", &other)),
        }
    }

    /// Fetches the receipt of request `id`, executed at `height`, from any replica that holds
    /// that batch: any receipt however old ([`Client::receipt`] finds ids by themselves only
    /// until they expire).
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] when no node can serve the read.
    pub fn receipt_at(&self, id: RequestId, height: u64) -> Result<Option<Receipt>, ClientError> {
        let deadline = Instant::now() + self.inner.opts.retry_total;
        match self.inner.request(deadline, "read", &ClientMessage::ReceiptAt { id, height })? {
            ServerMessage::Receipt(r) => Ok(r.map(|b| *b)),
            other => Err(self.inner.unexpected("Receipt", &other)),
        }
    }

    /// Adds a replica at runtime (joint consensus on the server side).
    ///
    /// # Errors
    /// [`ClientError::Server`] with the server's reason, or [`ClientError::Unavailable`].
    pub fn cluster_add(
        &self,
        admin: &SigningKey,
        node_id: u64,
        client_addr: &str,
        peer_addr: &str,
    ) -> Result<(), ClientError> {
        let op =
            AdminOp::ClusterAdd { node_id, client_addr: client_addr.to_string(), peer_addr: peer_addr.to_string() };
        // The leader answers once the new replica caught up, which takes as long as its state
        // takes to stream and install: one call waits for it rather than timing out and retrying.
        let cluster_id = self.cluster_id().ok_or(ClientError::NoAddress)?;
        let wait = self.inner.opts.retry_total.max(CLUSTER_ADD_WAIT);
        let fresh = || ClientMessage::Admin(sign_admin(admin, cluster_id, op.clone()));
        match self.inner.request_with(Instant::now() + wait, wait, "write", &fresh)? {
            ServerMessage::Done => Ok(()),
            other => Err(self.inner.unexpected("Done", &other)),
        }
    }

    /// Removes a replica at runtime.
    ///
    /// # Errors
    /// As [`Client::cluster_add`].
    pub fn cluster_remove(&self, admin: &SigningKey, node_id: u64) -> Result<(), ClientError> {
        let cluster_id = self.cluster_id().ok_or(ClientError::NoAddress)?;
        let deadline = Instant::now() + self.inner.opts.retry_total;
        let fresh = || ClientMessage::Admin(sign_admin(admin, cluster_id, AdminOp::ClusterRemove { node_id }));
        match self.inner.request_with(deadline, self.inner.opts.call_timeout, "write", &fresh)? {
            ServerMessage::Done => Ok(()),
            other => Err(self.inner.unexpected("Done", &other)),
        }
    }

    /// Removes node `node_id` (if it is a member) and revokes its certificate on every
    /// replica.
    ///
    /// # Errors
    /// As [`Client::cluster_add`].
    pub fn cluster_revoke(
        &self,
        admin: &SigningKey,
        node_id: u64,
        cert_fingerprint: [u8; 32],
    ) -> Result<(), ClientError> {
        let cluster_id = self.cluster_id().ok_or(ClientError::NoAddress)?;
        let deadline = Instant::now() + self.inner.opts.retry_total;
        // Each attempt is signed afresh: a replica remembers the commands it took (replay
        // protection), so a retry of the same bytes would be answered `Duplicate`.
        let op = AdminOp::RevokeNode { node_id, cert_fingerprint };
        let fresh = || ClientMessage::Admin(sign_admin(admin, cluster_id, op.clone()));
        match self.inner.request_with(deadline, self.inner.opts.call_timeout, "write", &fresh)? {
            ServerMessage::Done => Ok(()),
            other => Err(self.inner.unexpected("Done", &other)),
        }
    }

    /// An admin command for this cluster, valid for a minute.
    ///
    /// # Errors
    /// When the cluster id is not known yet.
    pub fn sign_admin(&self, admin: &SigningKey, op: AdminOp) -> Result<SignedAdmin, ClientError> {
        let cluster_id = self.cluster_id().ok_or(ClientError::NoAddress)?;
        Ok(sign_admin(admin, cluster_id, op))
    }
}

/// How long `cluster add` waits for the leader's answer (the new replica catching up).
pub const CLUSTER_ADD_WAIT: Duration = Duration::from_secs(30 * 60);

/// Signs an admin command for `cluster_id`, valid for a minute.
pub fn sign_admin(admin: &SigningKey, cluster_id: ClusterId, op: AdminOp) -> SignedAdmin {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    AdminCommand {
        cluster_id,
        signer: PublicKey(admin.verifying_key().to_bytes()),
        nonce: rand_core::RngCore::next_u64(&mut rand_core::OsRng),
        expires_at_ms: now_ms + 60_000,
        op,
    }
    .sign(admin)
}

/// Totals over one replica's state, read page by page with an admin key (consistent: every page
/// saw the same applied height, or the scan starts over).
///
/// # Errors
/// The server's refusal (e.g. `NotAuthorized`), or a state that kept moving.
pub fn audit(conn: &Connection, admin: &SigningKey, cluster_id: ClusterId) -> Result<AuditInfo, ClientError> {
    'attempt: for _ in 0..20 {
        let mut height = None;
        let mut digest = tally_codec::Digest([0; 32]);
        let mut totals = [(0u64, 0u128); 2];
        for (t, table) in [AuditTable::Accounts, AuditTable::Documents].into_iter().enumerate() {
            let mut after = None;
            loop {
                let op = AdminOp::AuditPage { table, after: after.clone(), limit: tally_codec::admin::AUDIT_PAGE_MAX };
                let page = match conn.call(ClientMessage::Admin(sign_admin(admin, cluster_id, op)))? {
                    ServerMessage::AuditPage(p) => p,
                    // Scans are at their budget on that replica: the same page after the hint.
                    ServerMessage::Busy(b) => {
                        std::thread::sleep(crate::coord::busy_wait(&b));
                        continue;
                    }
                    ServerMessage::Error(e) => return Err(ClientError::Server(e)),
                    other => {
                        return Err(ClientError::Protocol {
                            addr: conn.addr().to_string(),
                            detail: format!("expected an audit page, got {other:?}"),
                        })
                    }
                };
                if height.is_some_and(|h| h != page.applied_height) {
                    std::thread::sleep(Duration::from_millis(50));
                    continue 'attempt;
                }
                height = Some(page.applied_height);
                digest = page.state_digest;
                totals[t].0 += page.keys;
                totals[t].1 += page.balance_total;
                match page.next_after {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
        }
        return Ok(AuditInfo {
            applied_height: height.unwrap_or(0),
            state_digest: digest,
            accounts: totals[0].0,
            balance_total: totals[0].1,
            documents: totals[1].0,
        });
    }
    Err(ClientError::Unavailable { what: "audit", detail: "the state kept changing during the scan".into() })
}

/// Builds and signs a request; shared with the bench, which signs ahead of time.
pub fn sign_request(key: &SigningKey, cluster_id: ClusterId, op: Operation) -> SignedRequest {
    use rand_core::RngCore;
    Request {
        cluster_id,
        signer: public_of(key),
        nonce: rand_core::OsRng.next_u64(),
        expires_at_ms: now_ms() + REQUEST_TTL_MS,
        op,
    }
    .sign(key)
}

/// Client-side value checks, so a bad value is reported before anything is sent.
///
/// # Errors
/// [`ClientError::InvalidJson`] or [`ClientError::Invalid`] for an oversized value.
pub fn check_json(json: &str) -> Result<(), ClientError> {
    if json.len() > limits::VALUE_BYTES_MAX {
        return Err(ClientError::Invalid(format!(
            "value is over the size limit ({} bytes; at most {})",
            json.len(),
            limits::VALUE_BYTES_MAX
        )));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(json).map(|_| ()).map_err(|_| ClientError::InvalidJson)
}

impl Inner {
    fn addr(&self) -> String {
        self.conn.lock().as_ref().map(|c| c.addr().to_string()).unwrap_or_default()
    }

    fn unexpected(&self, wanted: &str, got: &ServerMessage) -> ClientError {
        ClientError::Protocol { addr: self.addr(), detail: format!("expected a {wanted} reply, got {got:?}") }
    }

    /// Connects to `addr` and asks its Status; refuses a node of another cluster.
    fn open(&self, addr: &str) -> Result<(Arc<Connection>, StatusInfo), ClientError> {
        let conn =
            Arc::new(Connection::connect_with(addr, &self.opts.dial, Duration::from_millis(CONNECT_TIMEOUT_MS))?);
        match conn.call_timeout(ClientMessage::Status, self.opts.heartbeat_timeout)? {
            ServerMessage::Status(info) => {
                let known = self.view.lock().cluster_id;
                if let Some(cid) = known {
                    if cid != info.cluster_id {
                        return Err(ClientError::Protocol {
                            addr: addr.to_string(),
                            detail: format!("node belongs to cluster {}, not {cid}", info.cluster_id),
                        });
                    }
                }
                Ok((conn, info))
            }
            ServerMessage::Error(e) => Err(ClientError::Server(e)),
            other => {
                Err(ClientError::Protocol { addr: addr.to_string(), detail: format!("bad Status reply {other:?}") })
            }
        }
    }

    /// Makes `conn` current and records its Status.
    fn install(&self, conn: Arc<Connection>, info: StatusInfo) {
        let addr = conn.addr().to_string();
        let old = self.conn.lock().replace(conn);
        if let Some(old) = old {
            old.close();
        }
        self.view.lock().no_leader_since = None;
        self.apply_status(&addr, info);
    }

    fn apply_status(&self, addr: &str, mut info: StatusInfo) {
        // Everything below dials what it keeps: keep the addresses this client reaches.
        info.leader_addr = info.leader_addr.map(|l| self.opts.dial_addr(&l));
        let mut v = self.view.lock();
        v.cluster_id.get_or_insert(info.cluster_id);
        v.operator_key = Some(info.operator_key);
        let mut members: Vec<(u64, String)> = info
            .members
            .iter()
            .filter(|m| m.is_voter)
            .map(|m| (m.node_id, self.opts.dial_addr(&m.client_addr)))
            .collect();
        if members.is_empty() {
            // A node that does not know the configuration yet (a fresh cluster before its first
            // leader): keep what another node said, else this node alone.
            members = v.members.clone();
        }
        if members.is_empty() {
            members.push((info.node_id, addr.to_string()));
        }
        members.sort();
        if info.leader_id.is_some() {
            v.no_leader_since = None;
        } else {
            v.no_leader_since.get_or_insert_with(Instant::now);
        }
        v.configured = (info.replicas_configured as usize).max(members.len()).max(1);
        v.members = members;
        v.last_ok.insert(info.node_id, Instant::now());
        v.status = Some(info);
    }

    fn mark_ok(&self, conn: &Connection) {
        // Lock order: never hold `view` while taking `conn`.
        let is_current = self.conn.lock().as_ref().is_some_and(|c| std::ptr::eq(c.as_ref(), conn));
        if !is_current {
            return;
        }
        let mut v = self.view.lock();
        if let Some(id) = v.status.as_ref().map(|s| s.node_id) {
            v.last_ok.insert(id, Instant::now());
        }
    }

    fn reachable(&self) -> (usize, usize) {
        let v = self.view.lock();
        let window = Duration::from_millis(REACHABLE_WINDOW_MS);
        let configured = v.configured.max(1);
        let n = if v.members.len() >= configured {
            v.members.iter().filter(|(id, _)| v.last_ok.get(id).is_some_and(|t| t.elapsed() < window)).count()
        } else {
            // The configuration is not known yet: every node of this cluster that answered.
            v.last_ok.values().filter(|t| t.elapsed() < window).count().min(configured)
        };
        (n, configured)
    }

    fn report(&self) -> ConnectionReport {
        let addr = self.addr();
        let v = self.view.lock();
        let window = Duration::from_millis(REACHABLE_WINDOW_MS);
        let known = v
            .members
            .iter()
            .filter(|(id, _)| v.last_ok.get(id).is_some_and(|t| t.elapsed() < window))
            .map(|(_, a)| a.clone())
            .collect();
        let (leader_id, term) = v.status.as_ref().map(|s| (s.leader_id, s.term)).unwrap_or((None, 0));
        // A leader the current node still names but that answers nothing (it just died, the
        // election is under way) is not reported as the leader.
        let current = v.status.as_ref().map(|s| s.node_id);
        let answers = |id: u64| Some(id) == current || v.last_ok.get(&id).is_some_and(|t| t.elapsed() < window);
        let leader_id = leader_id.filter(|l| answers(*l));
        ConnectionReport { addr, leader_id, term, known }
    }

    fn emit(&self, ev: ClientEvent) {
        // A full channel means nobody is listening closely; dropping is better than blocking.
        let _ = self.events_tx.try_send(ev);
    }

    /// The client moved to another node. With a heartbeat, `Reconnected` (and the majority
    /// check) wait for its next round of probes, so the report names the members that answer
    /// now, not those that answered in the last seconds (the node that just died among them);
    /// without one, they are emitted now.
    fn moved(&self) {
        if self.opts.heartbeat.is_some() {
            self.view.lock().report_due = true;
        } else {
            self.emit(ClientEvent::Reconnected(self.report()));
            self.check_majority();
        }
    }

    /// Emits a warning when the reachable count drops below a majority (once per count), and a
    /// recovery note when it comes back.
    fn check_majority(&self) {
        let (reachable, configured) = self.reachable();
        let needed = configured / 2 + 1;
        let ev = {
            let mut v = self.view.lock();
            if reachable < needed {
                (v.warned != Some(reachable)).then(|| {
                    v.warned = Some(reachable);
                    ClientEvent::MinorityWarning { reachable, configured, needed }
                })
            } else {
                v.warned.take().map(|_| ClientEvent::MajorityRestored { reachable, configured })
            }
        };
        if let Some(ev) = ev {
            self.emit(ev);
        }
    }

    /// Candidate nodes after `failed`: the leader, the other members from the next one on, the
    /// user's addresses, and the failed node last (it may come back).
    fn candidates(&self, failed: Option<&str>) -> Vec<String> {
        let v = self.view.lock();
        let mut out: Vec<String> = Vec::new();
        let mut push = |a: &str| {
            if Some(a) != failed && !out.iter().any(|x| x == a) {
                out.push(a.to_string());
            }
        };
        if let Some(l) = v.status.as_ref().and_then(|s| s.leader_addr.as_deref()) {
            push(l);
        }
        let start = v.members.iter().position(|(_, a)| Some(a.as_str()) == failed).map_or(0, |i| i + 1);
        for i in 0..v.members.len() {
            push(&v.members[(start + i) % v.members.len()].1);
        }
        for s in &self.seeds {
            push(s);
        }
        drop(v);
        if let Some(f) = failed {
            out.push(f.to_string());
        }
        out
    }

    /// The current connection, or a new one if `failed` is still current (or there is none).
    /// Emits `Reconnected` when it moves.
    fn switch_from(&self, failed: Option<&Arc<Connection>>) -> Result<Arc<Connection>, ClientError> {
        self.switch(failed, true)
    }

    /// [`Inner::switch_from`]; `unreachable` is false when the node left answered (it knows no
    /// leader), so it still counts as reachable.
    fn switch(&self, failed: Option<&Arc<Connection>>, unreachable: bool) -> Result<Arc<Connection>, ClientError> {
        let _switching = self.switch_lock.lock();
        let current = self.conn.lock().clone();
        if let Some(c) = &current {
            let is_failed = failed.is_some_and(|f| Arc::ptr_eq(f, c));
            if !is_failed && !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let failed_addr = current.as_ref().map(|c| c.addr().to_string());
        if let Some(c) = &current {
            c.close();
            let mut v = self.view.lock();
            if let Some(id) = v.status.as_ref().map(|s| s.node_id).filter(|_| unreachable) {
                v.last_ok.remove(&id);
            }
        }
        let mut last = String::from("no known node");
        for addr in self.candidates(failed_addr.as_deref()) {
            match self.open(&addr) {
                Ok((conn, info)) => {
                    self.install(conn.clone(), info);
                    tracing::info!(%addr, "switched node");
                    self.moved();
                    return Ok(conn);
                }
                Err(e) => last = e.to_string(),
            }
        }
        *self.conn.lock() = None;
        Err(ClientError::Unavailable { what: "connect", detail: last })
    }

    /// Moves to the node a NotLeader reply points at, if it answers.
    fn follow_hint(&self, from: &Arc<Connection>, hint: Option<&str>) {
        let hint = hint.map(|h| self.opts.dial_addr(h));
        let hint = hint.as_deref();
        let Some(hint) = hint.filter(|h| *h != from.addr()) else {
            // No leader known there. An electing cluster has one within about a second: stay.
            // A node that still knows none after LEADERLESS_HOP_MS may be cut off from the
            // leader: try another member (it answered, so it still counts as reachable).
            if hint.is_none() {
                let since = *self.view.lock().no_leader_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(LEADERLESS_HOP_MS) {
                    let _ = self.switch(Some(from), false);
                }
            }
            return;
        };
        let _switching = self.switch_lock.lock();
        if !self.conn.lock().as_ref().is_some_and(|c| Arc::ptr_eq(c, from)) {
            return;
        }
        if let Ok((conn, info)) = self.open(hint) {
            self.install(conn, info);
            self.moved();
        }
    }

    /// Sends `msg` until a node answers with something other than a retryable error, moving
    /// between nodes on transport failures, until `deadline`.
    fn request(
        &self,
        deadline: Instant,
        what: &'static str,
        msg: &ClientMessage,
    ) -> Result<ServerMessage, ClientError> {
        self.request_with(deadline, self.opts.call_timeout, what, &|| msg.clone())
    }

    /// [`Inner::request`], each call waiting up to `call_timeout` for its answer. Each attempt
    /// sends `msg()`: an admin command is signed afresh for every attempt, since a replica takes
    /// a signed admin command once (a resend of the same bytes is a `Duplicate`).
    fn request_with(
        &self,
        deadline: Instant,
        call_timeout: Duration,
        what: &'static str,
        msg: &dyn Fn() -> ClientMessage,
    ) -> Result<ServerMessage, ClientError> {
        let mut backoff = Duration::from_millis(50);
        let mut last = String::from("no node answered");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable { what, detail: last });
            }
            let remaining = deadline - now;
            let current = self.conn.lock().clone();
            let conn = match current.filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match self.switch_from(None) {
                    Ok(c) => c,
                    Err(e) => {
                        last = e.to_string();
                        std::thread::sleep(backoff.min(remaining));
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let timeout = call_timeout.min(remaining).max(Duration::from_millis(100));
            match conn.call_timeout(msg(), timeout) {
                Ok(ServerMessage::Error(e)) if e.code.is_retryable() => {
                    last = e.message.clone();
                    self.follow_hint(&conn, e.leader_hint.as_deref());
                    std::thread::sleep(backoff.min(remaining));
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(ServerMessage::Error(e)) => return Err(ClientError::Server(e)),
                Ok(reply) => {
                    self.mark_ok(&conn);
                    return Ok(reply);
                }
                Err(e) if e.is_transport() => {
                    last = e.to_string();
                    if let Err(e) = self.switch_from(Some(&conn)) {
                        last = e.to_string();
                        std::thread::sleep(backoff.min(remaining));
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One frame's worth of requests; resends the retryable refusals with the same bytes.
    fn submit_chunk(&self, deadline: Instant, reqs: &[SignedRequest]) -> Result<Vec<SubmitReply>, ClientError> {
        let mut replies: Vec<Option<SubmitReply>> = vec![None; reqs.len()];
        let mut todo: Vec<usize> = (0..reqs.len()).collect();
        let mut backoff = Duration::from_millis(50);
        while !todo.is_empty() {
            let frame: Vec<SignedRequest> = todo.iter().map(|&i| reqs[i].clone()).collect();
            let got = match self.request(deadline, "write", &ClientMessage::Submit(frame))? {
                ServerMessage::Submitted(rs) if rs.len() == todo.len() => rs,
                other => return Err(self.unexpected(&format!("Submitted of {}", todo.len()), &other)),
            };
            let mut again = Vec::new();
            let mut hint: Option<WireError> = None;
            for (i, r) in todo.iter().copied().zip(got) {
                if let SubmitReply::Refused(e) = &r {
                    if e.code.is_retryable() {
                        again.push(i);
                        hint = Some(e.clone());
                    }
                }
                replies[i] = Some(r);
            }
            if again.is_empty() || Instant::now() + backoff >= deadline {
                break;
            }
            // Bind first: an `if let` scrutinee would hold the lock through the body.
            let current = self.conn.lock().clone();
            if let (Some(e), Some(conn)) = (hint, current) {
                self.follow_hint(&conn, e.leader_hint.as_deref());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
            todo = again;
        }
        replies
            .into_iter()
            .map(|r| r.ok_or_else(|| ClientError::Protocol { addr: self.addr(), detail: "missing reply".into() }))
            .collect()
    }

    /// Asks every member other than the current node for its Status, in parallel.
    fn probe_members(&self) {
        let (members, current, configured, cluster) = {
            let v = self.view.lock();
            (v.members.clone(), v.status.as_ref().map(|s| s.node_id), v.configured, v.cluster_id)
        };
        let mut addrs: Vec<String> =
            members.iter().filter(|(id, _)| Some(*id) != current).map(|(_, a)| a.clone()).collect();
        if members.len() < configured {
            // The configuration is not known yet: the user's addresses stand for the members.
            let current_addr = self.addr();
            for a in self.seeds.iter().map(|a| self.opts.dial_addr(a)) {
                if a != current_addr && !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        let timeout = self.opts.heartbeat_timeout;
        let answered: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = addrs
                .iter()
                .map(|addr| {
                    let dial = &self.opts.dial;
                    s.spawn(move || probe(addr, dial, timeout, cluster))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
        });
        let mut v = self.view.lock();
        // A member probed that did not answer is unreachable now, whenever it last answered.
        for (id, _) in members.iter().filter(|(id, a)| Some(*id) != current && addrs.contains(a)) {
            if !answered.contains(id) {
                v.last_ok.remove(id);
            }
        }
        for id in answered {
            v.last_ok.insert(id, Instant::now());
        }
    }

    fn heartbeat_loop(self: Arc<Self>, period: Duration) {
        while !self.stop.load(Ordering::Acquire) {
            let started = Instant::now();
            let current = self.conn.lock().clone();
            match current {
                Some(c) if !c.is_closed() => match c.call_timeout(ClientMessage::Status, self.opts.heartbeat_timeout) {
                    Ok(ServerMessage::Status(info)) => {
                        if self.conn.lock().as_ref().is_some_and(|x| Arc::ptr_eq(x, &c)) {
                            self.apply_status(c.addr(), info);
                        }
                    }
                    Ok(_) => self.mark_ok(&c),
                    Err(_) => {
                        let _ = self.switch_from(Some(&c));
                    }
                },
                Some(c) => {
                    let _ = self.switch_from(Some(&c));
                }
                None => {
                    let _ = self.switch_from(None);
                }
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            self.probe_members();
            if std::mem::take(&mut self.view.lock().report_due) {
                self.emit(ClientEvent::Reconnected(self.report()));
            }
            self.check_majority();
            if let Some(rest) = period.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
}

/// One Status round trip on a fresh connection; the node id if a node of `cluster` answered.
fn probe(addr: &str, dial: &tally_net::Dial, timeout: Duration, cluster: Option<ClusterId>) -> Option<u64> {
    let conn = Connection::connect_with(addr, dial, timeout).ok()?;
    match conn.call_timeout(ClientMessage::Status, timeout).ok()? {
        ServerMessage::Status(info) if cluster.is_none_or(|c| c == info.cluster_id) => Some(info.node_id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_and_warning_text_match_the_design_session() {
        let r = ConnectionReport {
            addr: "127.0.0.1:7001".into(),
            leader_id: Some(2),
            term: 7,
            known: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()],
        };
        assert_eq!(
            r.to_string(),
            "Connected to tally cluster at 127.0.0.1:7001 (leader: node 2, term 7)\nKnown nodes:\n127.0.0.1:7001\n127.0.0.1:7002"
        );
        let r = ConnectionReport { addr: "127.0.0.1:7002".into(), leader_id: None, term: 8, known: vec![] };
        assert_eq!(
            ClientEvent::Reconnected(r).to_string(),
            "Reconnected to tally cluster at 127.0.0.1:7002 (leader: none)\nKnown nodes:"
        );
        let w = ClientEvent::MinorityWarning { reachable: 1, configured: 3, needed: 2 };
        assert_eq!(
            w.to_string(),
            "WARNING: 1 of 3 replicas reachable; writes need 2. Writes will wait or fail until a majority is back."
        );
    }

    #[test]
    fn addrs_split_on_commas_and_dedup() {
        let v = split_addrs(&["a:1,b:2", " c:3 ", "a:1", ""]);
        assert_eq!(v, vec!["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn json_is_checked_before_sending() {
        assert!(check_json(r#"{"name": "Chapayev's Mustache comb"}"#).is_ok());
        assert_eq!(check_json("{nope").expect_err("bad").to_string(), "value is not valid JSON");
    }
}

#[cfg(test)]
mod failover_tests {
    use super::*;
    use crate::testkit::{cluster, FakeNode};
    use tally_codec::wire::MemberInfo;

    fn opts(heartbeat: bool) -> ClientOptions {
        ClientOptions {
            call_timeout: Duration::from_millis(700),
            retry_total: Duration::from_secs(8),
            heartbeat: heartbeat.then_some(Duration::from_millis(200)),
            heartbeat_timeout: Duration::from_millis(500),
            dial: tally_net::Dial::Plain,
            addr_map: Arc::default(),
        }
    }

    fn dead_member(node_id: u64) -> MemberInfo {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        MemberInfo { node_id, client_addr: addr, peer_addr: String::new(), matched_index: 0, is_voter: true }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[8; 32])
    }

    fn next_event(rx: &Receiver<ClientEvent>, pred: impl Fn(&ClientEvent) -> bool) -> Option<ClientEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return Some(ev),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    #[test]
    fn heartbeat_moves_to_a_live_node_and_warns_about_a_minority() {
        let a = FakeNode::start(1);
        let b = FakeNode::start(2);
        let dead = dead_member(3);
        cluster(&[&a, &b], std::slice::from_ref(&dead), Some(&a));
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), opts(true)).expect("connect");
        let r = client.report();
        assert_eq!(r.addr, a.addr);
        assert_eq!((r.leader_id, r.term), (Some(1), 7));
        assert_eq!(r.known, vec![a.addr.clone(), b.addr.clone()]);
        assert!(client.majority_warning().is_none(), "2 of 3 is a majority");
        let doc = DocKey::from_random([1; 16]);
        let c = client.set(doc, r#"{"x": 1}"#).expect("set");
        assert_eq!(c.receipt.outcome, Outcome::DocCreated { revision: 1 });
        c.receipt.verify(&PublicKey(crate::testkit::operator().verifying_key().to_bytes())).expect("receipt");

        let events = client.events();
        cluster(&[&b], &[a.member(), dead], Some(&b));
        a.kill();
        let ev = next_event(&events, |e| matches!(e, ClientEvent::Reconnected(_))).expect("reconnected");
        assert_eq!(
            ev.to_string(),
            format!("Reconnected to tally cluster at {} (leader: node 2, term 7)\nKnown nodes:\n{}", b.addr, b.addr)
        );
        let ev = next_event(&events, |e| matches!(e, ClientEvent::MinorityWarning { .. })).expect("warning");
        assert_eq!(ev, ClientEvent::MinorityWarning { reachable: 1, configured: 3, needed: 2 });
        // And the client keeps working on the new node.
        assert!(client.set(doc, r#"{"x": 2}"#).is_ok());
        assert_eq!(b.state.seen.lock().len(), 1);
    }

    /// The leader dies while the client is on it; the survivors still name it for a moment.
    /// `Reconnected` names no leader that answers nothing and lists the live nodes only, and 2
    /// of 3 is no minority (the REPL said "leader: node 1", kept the dead node among the known
    /// ones, dropped a live one and warned "1 of 3 reachable").
    #[test]
    fn after_the_leader_dies_the_report_names_live_nodes_and_no_dead_leader() {
        let (a, b, c) = (FakeNode::start(1), FakeNode::start(2), FakeNode::start(3));
        cluster(&[&a, &b, &c], &[], Some(&a));
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), opts(true)).expect("connect");
        std::thread::sleep(Duration::from_millis(500)); // a few heartbeats: every member answered
        let events = client.events();
        a.kill(); // b and c still say node 1 leads
        let ev = next_event(&events, |e| matches!(e, ClientEvent::Reconnected(_))).expect("reconnected");
        let ClientEvent::Reconnected(r) = &ev else { unreachable!() };
        assert_eq!(r.leader_id, None, "node 1 answers nothing: {ev}");
        assert_eq!(r.known, vec![b.addr.clone(), c.addr.clone()], "the live nodes, not the dead one: {ev}");
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(client.reachable(), (2, 3), "two of three answer");
        assert!(client.majority_warning().is_none());
        while let Ok(ev) = events.try_recv() {
            assert!(!matches!(ev, ClientEvent::MinorityWarning { .. }), "warned with 2 of 3 answering: {ev}");
        }
    }

    #[test]
    fn in_flight_write_is_resent_with_the_same_bytes_after_the_node_dies() {
        let a = FakeNode::start(1);
        let b = FakeNode::start(2);
        cluster(&[&a, &b], &[], Some(&a));
        let mut o = opts(false);
        o.call_timeout = Duration::from_secs(5);
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), o).expect("connect");
        a.state.swallow.store(true, Ordering::Release);
        let doc = DocKey::from_random([2; 16]);
        let started = Instant::now();
        let result = std::thread::scope(|s| {
            let h = s.spawn(|| client.set(doc, "[1, 2]"));
            std::thread::sleep(Duration::from_millis(300));
            a.kill();
            h.join().expect("join")
        });
        let c = result.expect("retried on b");
        assert!(started.elapsed() < Duration::from_secs(4), "retry waited for the call timeout");
        assert_eq!(*a.state.seen.lock(), vec![c.request_id]);
        assert_eq!(*b.state.seen.lock(), vec![c.request_id]);
        assert_eq!(client.report().addr, b.addr);
    }

    #[test]
    fn hung_node_times_out_and_not_leader_is_followed() {
        let a = FakeNode::start(1);
        let b = FakeNode::start(2);
        cluster(&[&a, &b], &[], Some(&a));
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), opts(false)).expect("connect");
        a.state.swallow.store(true, Ordering::Release);
        let c = client.set(DocKey::from_random([3; 16]), "{}").expect("timed out on a, committed on b");
        assert_eq!(*b.state.seen.lock(), vec![c.request_id]);

        // b now says a is the leader; a answers again.
        a.state.swallow.store(false, Ordering::Release);
        *b.state.not_leader_hint.lock() = Some(a.addr.clone());
        let c = client.set(DocKey::from_random([4; 16]), "{}").expect("followed the hint");
        assert!(a.state.seen.lock().contains(&c.request_id));
        assert_eq!(client.report().addr, a.addr);
    }

    #[test]
    fn advertised_addresses_are_dialled_through_the_addr_map() {
        let a = FakeNode::start(1);
        let b = FakeNode::start(2);
        // The nodes advertise addresses this client cannot dial (as nodes in containers do:
        // `tally-1:7001`); the map says where they are published.
        let (adv_a, adv_b) = (dead_member(1), dead_member(2));
        for n in [&a, &b] {
            *n.state.members.lock() = vec![adv_a.clone(), adv_b.clone()];
            *n.state.leader.lock() = (Some(1), Some(adv_a.client_addr.clone()));
        }
        let mut o = opts(false);
        o.addr_map = Arc::new(BTreeMap::from([
            (adv_a.client_addr.clone(), a.addr.clone()),
            (adv_b.client_addr.clone(), b.addr.clone()),
        ]));
        assert_eq!(o.dial_addr(&adv_b.client_addr), b.addr);
        assert_eq!(o.dial_addr("elsewhere:1"), "elsewhere:1");
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), o).expect("connect");
        // a hangs: the client finds b only through the map (b is no seed).
        a.state.swallow.store(true, Ordering::Release);
        let c = client.set(DocKey::from_random([7; 16]), "{}").expect("moved to b through the map");
        assert_eq!(*b.state.seen.lock(), vec![c.request_id]);
        assert_eq!(client.report().addr, b.addr);
        // b points at the leader by its advertised address: followed through the map.
        a.state.swallow.store(false, Ordering::Release);
        *b.state.not_leader_hint.lock() = Some(adv_a.client_addr.clone());
        let c = client.set(DocKey::from_random([8; 16]), "{}").expect("followed the mapped hint");
        assert!(a.state.seen.lock().contains(&c.request_id));
        assert_eq!(client.report().addr, a.addr);
    }

    #[test]
    fn no_node_gives_failed_to_write() {
        let a = FakeNode::start(1);
        cluster(&[&a], &[], Some(&a));
        let mut o = opts(false);
        o.retry_total = Duration::from_secs(1);
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), o).expect("connect");
        a.kill();
        let err = client.set(DocKey::from_random([5; 16]), "{}").expect_err("nobody serves");
        assert!(err.to_string().starts_with("Failed to write"), "{err}");
        let err = client.get(DocKey::from_random([5; 16]), false).expect_err("nobody serves");
        assert!(err.to_string().starts_with("Failed to read"), "{err}");
    }

    #[test]
    fn rejected_and_refused_writes_are_errors_with_the_code_message() {
        let a = FakeNode::start(1);
        cluster(&[&a], &[], Some(&a));
        let client = Client::connect(std::slice::from_ref(&a.addr), key(), opts(false)).expect("connect");
        let err = client.transfer(PublicKey([9; 32]), 5).expect_err("fake node rejects transfers");
        assert_eq!(err.to_string(), "insufficient funds");
        assert!(matches!(err, ClientError::Rejected { .. }));
        assert!(matches!(client.set(DocKey::from_random([6; 16]), "nope"), Err(ClientError::InvalidJson)));
    }
}
