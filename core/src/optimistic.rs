//! Stage 3: optimistic, and the sequencer's intake before it. On the leader only: requests wait
//! in a queue until their batch closes, then each is judged against what is already known,
//! before stage 4 executes what is left.
//!
//! ```text
//!  submit ─▶ queue (opens the batch) ─▶ closes at batch_interval_ms or batch_requests_max
//!        ─▶ split at batch_bytes_max (the rest opens the next batch; alone too large: refused)
//!        ─▶ expired by the batch clock: refused (sequence.rs)
//!        ─▶ stage 3: in flight → waits on its batch · executed → its receipt
//!                    prefetch · a transfer the pre-batch state can't fund → refused
//!        ─▶ stage 4 (sequence.rs)
//! ```

use crate::ledger::Ledger;
use crate::pending::Pending;
use crate::replica::ClientTag;
use crate::sequence::{batch_time, drop_expired, split_by_bytes, Tip};
use crate::state::{Backing, BatchWrites, SeenIds, View};
use crate::Validated;
use tally_codec::{DocKey, DocMeta, ErrorCode, Operation, PublicKey, Receipt};

/// A request and who waits for its answer.
pub type Submission = (Validated, ClientTag);

/// Leadership as the sequencer last saw it.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Following,
    Leading { term: u64, tip: Tip },
}

/// Stages 3 and 4: what the leader has accepted and not yet committed.
pub struct Sequencer {
    pub mode: Mode,
    pub view: View,
    /// Requests waiting for the next batch, and when the first of them arrived.
    queue: Vec<Submission>,
    opened_ms: Option<u64>,
    pub pending: Pending<ClientTag>,
    /// Ids executed and committed, until their expiry.
    pub seen: SeenIds,
}

/// What stage 3 answers instead of executing a request.
pub enum Verdict {
    /// Executed before: its receipt, rebuilt from the ledger.
    Receipt(Box<Receipt>),
    Refused(ErrorCode),
}

/// Requests taken off the queue for the batch that closes, and the ones refused on the way.
pub struct Intake {
    pub subs: Vec<Submission>,
    /// Alone over `batch_bytes_max`.
    pub too_large: Vec<ClientTag>,
    /// Expired by the batch clock.
    pub expired: Vec<ClientTag>,
}

impl Sequencer {
    pub fn new(seen: SeenIds) -> Self {
        Sequencer {
            mode: Mode::Following,
            view: View::default(),
            queue: Vec::new(),
            opened_ms: None,
            pending: Pending::default(),
            seen,
        }
    }

    pub fn is_leading(&self) -> bool {
        matches!(self.mode, Mode::Leading { .. })
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a request for the next batch; the first one opens it.
    pub fn enqueue(&mut self, sub: Submission, now_ms: u64) {
        assert!(self.is_leading(), "only a leading sequencer takes requests");
        if self.queue.is_empty() {
            self.opened_ms = Some(now_ms);
        }
        self.queue.push(sub);
    }

    /// Empties the queue (leadership lost, or the replica stopped): who waited, in order.
    pub fn take_queued(&mut self) -> Vec<ClientTag> {
        self.opened_ms = None;
        std::mem::take(&mut self.queue).into_iter().map(|(_, client)| client).collect()
    }

    /// When the open batch closes by its interval, while leading.
    pub fn close_ms(&self, batch_interval_ms: u64) -> Option<u64> {
        self.opened_ms.filter(|_| self.is_leading()).map(|opened| opened + batch_interval_ms)
    }

    /// Whether a batch closes now: its interval passed or it holds `batch_requests_max`
    /// requests; with none queued, when a lease is due by the batch clock (it ends in a batch
    /// of its own).
    pub fn batch_due(&self, now_ms: u64, wall_ms: u64, batch_interval_ms: u64, batch_requests_max: usize) -> bool {
        let Mode::Leading { tip, .. } = self.mode else { return false };
        match self.opened_ms {
            Some(opened) => now_ms >= opened + batch_interval_ms || self.queue.len() >= batch_requests_max,
            None => self.view.next_lease_due().is_some_and(|at| at <= batch_time(wall_ms, &tip)),
        }
    }

    /// Takes what fits in `batch_bytes_max` off the queue (the rest opens the next batch at
    /// `now_ms`), and drops what the batch clock `time_ms` finds expired.
    pub fn take_batch(&mut self, batch_bytes_max: usize, now_ms: u64, time_ms: u64) -> Intake {
        let queue = std::mem::take(&mut self.queue);
        let mut too_large = Vec::new();
        let (subs, rest) = split_by_bytes(queue, batch_bytes_max, |(v, _)| &v.request, |(_, c)| too_large.push(c));
        self.opened_ms = if rest.is_empty() { None } else { Some(now_ms) };
        self.queue = rest;
        let mut expired = Vec::new();
        let subs = drop_expired(subs, time_ms, |(v, _)| &v.request, |(_, c)| expired.push(c));
        Intake { subs, too_large, expired }
    }

    /// Stage 3: a request in flight waits for its batch, one already executed gets its receipt,
    /// and a transfer the pre-batch state can't fund is refused without consuming its id.
    /// Returns what goes on to stage 4, and the answers to the rest, in order.
    pub fn optimistic(
        &mut self,
        subs: Vec<Submission>,
        ledger: &impl Ledger,
    ) -> (Vec<Submission>, Vec<(ClientTag, Verdict)>) {
        let mut answers = Vec::new();
        let mut fresh = Vec::with_capacity(subs.len());
        for (req, client) in subs {
            let Some(client) = self.pending.attach(&req.id, client) else { continue };
            match self.seen.get(&req.id) {
                Some((height, _)) => {
                    let verdict = match ledger.receipt_at(&req.id, height) {
                        Some(receipt) => Verdict::Receipt(Box::new(receipt)),
                        None => Verdict::Refused(ErrorCode::Internal),
                    };
                    answers.push((client, verdict));
                }
                None => fresh.push((req, client)),
            }
        }
        self.view.prefetch(
            fresh.iter().map(|(v, _)| (&v.request.request.signer, &v.request.request.op)),
            &mut LedgerBacking(ledger),
        );
        let empty = BatchWrites::default();
        let mut funded = Vec::with_capacity(fresh.len());
        for (req, client) in fresh {
            let r = &req.request.request;
            if let Operation::Transfer { amount, .. } = r.op {
                if self.view.balance(&empty, &r.signer) < amount {
                    answers.push((client, Verdict::Refused(ErrorCode::InsufficientFunds)));
                    continue;
                }
            }
            funded.push((req, client));
        }
        (funded, answers)
    }
}

/// Reads the sequencer's cache misses from the ledger.
pub struct LedgerBacking<'a, L>(pub &'a L);

impl<L: Ledger> Backing for LedgerBacking<'_, L> {
    fn balance(&mut self, account: &PublicKey) -> Option<u64> {
        self.0.balance(account)
    }
    fn doc_meta(&mut self, key: &DocKey) -> Option<DocMeta> {
        self.0.doc_meta(key)
    }
    fn lease(&mut self, id: u64) -> Option<tally_codec::LeaseMeta> {
        self.0.lease(id)
    }
    fn claim(&mut self, domain: &str, slot: u64) -> Option<tally_codec::ClaimMeta> {
        self.0.claim(domain, slot)
    }
    fn claims(&mut self, keys: &[(String, u64)]) -> Vec<Option<tally_codec::ClaimMeta>> {
        self.0.claims(keys)
    }
}
