//! Coordination primitives from the client's side (`docs/coordination.md`): leases,
//! compare-and-set, claims and transactions, each a signed request with a receipt, and a
//! [`LeaseKeeper`] that renews a lease by itself and says until when its holder may still act.
//!
//! ```text
//!  grant ──▶ LeaseGranted{id, expires_at}      keeper thread: every ttl/3 ──▶ LeaseKeepAlive
//!                 │                                   │ renewed: valid_until = sent + ttl − drift
//!                 └─ holder acts only while now < valid_until (never on the server's clock)
//! ```

use crate::client::{Client, Committed};
use crate::error::ClientError;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::wire::{ClientMessage, ServerMessage, WatchEvent, WatchFilter, WatchPage};
use tally_codec::{DocKey, Operation, Outcome, PublicKey, Txn};

/// What a claim got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// The slot is the signer's, recorded at `height`.
    Granted { height: u64 },
    /// `holder` claimed it first, at `height`.
    Denied { holder: PublicKey, height: u64 },
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: u64,
    pub ttl_ms: u64,
    /// In batch time (the header clock), as the receipt says.
    pub expires_at_ms: u64,
}

impl Client {
    /// Grants a lease of `ttl_ms`.
    ///
    /// # Errors
    /// As [`Client::submit_one`]; `TtlOutOfRange` for a TTL outside 500 ms to 24 h.
    pub fn lease_grant(&self, ttl_ms: u64) -> Result<(Lease, Committed), ClientError> {
        let c = self.submit_one(self.sign(Operation::LeaseGrant { ttl_ms })?)?;
        match c.receipt.outcome {
            Outcome::LeaseGranted { lease, expires_at_ms } => Ok((Lease { id: lease, ttl_ms, expires_at_ms }, c)),
            ref o => Err(unexpected(o)),
        }
    }

    /// Restarts the lease's TTL; returns its new expiry in batch time.
    ///
    /// # Errors
    /// `LeaseNotFound` once it has ended, `NotLeaseHolder` for another key's lease.
    pub fn lease_keepalive(&self, lease: u64) -> Result<(u64, Committed), ClientError> {
        let c = self.submit_one(self.sign(Operation::LeaseKeepAlive { lease })?)?;
        match c.receipt.outcome {
            Outcome::LeaseRenewed { expires_at_ms } => Ok((expires_at_ms, c)),
            ref o => Err(unexpected(o)),
        }
    }

    /// Ends the lease now, with what is attached to it.
    ///
    /// # Errors
    /// As [`Client::lease_keepalive`].
    pub fn lease_revoke(&self, lease: u64) -> Result<Committed, ClientError> {
        self.submit_one(self.sign(Operation::LeaseRevoke { lease })?)
    }

    /// Sets a document if it has revision `if_revision` (0: only if it does not exist), under
    /// `lease` if given. A mismatch is `Ok` with [`Outcome::RevisionMismatch`] in the receipt.
    ///
    /// # Errors
    /// As [`Client::submit_one`].
    pub fn set_if(
        &self,
        key: DocKey,
        json: &str,
        if_revision: Option<u64>,
        lease: Option<u64>,
    ) -> Result<Committed, ClientError> {
        crate::client::check_json(json)?;
        self.submit_one(self.sign(Operation::SetIf { key, value: json.as_bytes().to_vec(), if_revision, lease })?)
    }

    /// Claims `(domain, slot)`: granted to the first claimant only.
    ///
    /// # Errors
    /// As [`Client::submit_one`]; `BadClaimDomain`, `LeaseNotFound`.
    pub fn claim(&self, domain: &str, slot: u64, lease: Option<u64>) -> Result<(ClaimResult, Committed), ClientError> {
        let c = self.submit_one(self.sign(Operation::Claim { domain: domain.to_string(), slot, lease })?)?;
        match c.receipt.outcome {
            Outcome::ClaimGranted { height } => Ok((ClaimResult::Granted { height }, c)),
            Outcome::ClaimDenied { holder, height } => Ok((ClaimResult::Denied { holder, height }, c)),
            ref o => Err(unexpected(o)),
        }
    }

    /// Runs a transaction; the receipt's [`Outcome::TxnApplied`] says which branch ran.
    ///
    /// # Errors
    /// As [`Client::submit_one`].
    pub fn txn(&self, txn: Txn) -> Result<Committed, ClientError> {
        self.submit_one(self.sign(Operation::Txn(txn))?)
    }
}

impl Client {
    /// One page of committed changes from `from_height` (any replica answers; the client fails
    /// over like a read).
    ///
    /// # Errors
    /// `Compacted` (from a replica that installed a snapshot) naming the oldest height it has;
    /// [`ClientError::Busy`] when the replica is at a watch limit (the [`Watcher`] waits for
    /// its hint and asks again); [`ClientError::Unavailable`].
    pub fn watch_page(&self, filter: &WatchFilter, from_height: u64) -> Result<WatchPage, ClientError> {
        let msg = ClientMessage::Watch { filter: filter.clone(), from_height, max_batches: 256, wait_ms: 500 };
        match self.read(&msg)? {
            ServerMessage::Watched(p) => Ok(p),
            ServerMessage::Busy(b) => Err(ClientError::Busy(b)),
            other => Err(ClientError::Invalid(format!("expected a watch page, got {other:?}"))),
        }
    }

    /// The committed changes `filter` selects from `from_height` on (`None`: from the next
    /// batch), in commit order with no gaps, resuming on another replica after a failover.
    ///
    /// # Errors
    /// The status call that finds the next height.
    pub fn watch(&self, filter: WatchFilter, from_height: Option<u64>) -> Result<Watcher<'_>, ClientError> {
        let next = match from_height {
            Some(h) => h.max(1),
            None => self.status()?.committed_height + 1,
        };
        Ok(Watcher { client: self, filter, next, buffered: std::collections::VecDeque::new() })
    }
}

/// An endless iterator over watch events (see [`Client::watch`]). It pulls pages, so a slow
/// reader never makes a replica buffer anything: it only falls behind, and resumes from its
/// height. A `Busy` answer is waited out for its retry hint, then the page is asked again.
pub struct Watcher<'a> {
    client: &'a Client,
    filter: WatchFilter,
    next: u64,
    buffered: std::collections::VecDeque<WatchEvent>,
}

impl Watcher<'_> {
    /// The first batch height not yet delivered (where a new watch would resume).
    pub fn next_height(&self) -> u64 {
        self.buffered.front().map_or(self.next, |e| e.height)
    }
}

impl Iterator for Watcher<'_> {
    type Item = Result<WatchEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Some(Ok(e));
            }
            match self.client.watch_page(&self.filter, self.next) {
                Ok(page) => {
                    debug_assert!(page.next_height >= self.next, "a watch page never goes back");
                    self.next = page.next_height.max(self.next);
                    self.buffered.extend(page.events);
                }
                // The replica is at a watch limit: ask again after its hint.
                Err(ClientError::Busy(b)) => std::thread::sleep(busy_wait(&b)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The longest a client waits on a `Busy` hint before asking again, whatever the hint says.
pub const BUSY_WAIT_MAX_MS: u64 = 10_000;

/// How long to wait before asking again after `Busy` (its hint, within [`BUSY_WAIT_MAX_MS`]).
pub fn busy_wait(b: &tally_codec::wire::BusyInfo) -> Duration {
    Duration::from_millis(u64::from(b.retry_after_ms).clamp(1, BUSY_WAIT_MAX_MS))
}

fn unexpected(o: &Outcome) -> ClientError {
    ClientError::Invalid(format!("unexpected outcome {o:?}"))
}

/// Keeps a lease alive from a thread of its own: renews every `ttl / 3`, and tells the holder
/// until when it may act: the local time a renewal was *sent*, plus the TTL, minus `drift`
/// (the bound on how far this clock and the leader's may disagree). The server's expiry runs
/// from the batch time, which is never before the send, so the local bound is the earlier one.
///
/// Dropping it stops the renewals; it waits for a renewal in flight, which the client's retry
/// budget (`ClientOptions::retry_total`, 15 s by default) bounds.
pub struct LeaseKeeper {
    lease: Lease,
    valid_until: Arc<Mutex<Instant>>,
    lost: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Grants a lease and starts renewing it.
    ///
    /// # Errors
    /// The grant's.
    pub fn grant(client: Arc<Client>, ttl_ms: u64, drift: Duration) -> Result<LeaseKeeper, ClientError> {
        let sent = Instant::now();
        let (lease, _) = client.lease_grant(ttl_ms)?;
        let ttl = Duration::from_millis(ttl_ms);
        let valid_until = Arc::new(Mutex::new(sent + ttl.saturating_sub(drift)));
        let lost = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (valid_until, lost, stop) = (valid_until.clone(), lost.clone(), stop.clone());
            std::thread::spawn(move || {
                let period = ttl / 3;
                let mut next = sent + period;
                while !stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(50)));
                        continue;
                    }
                    let sent = Instant::now();
                    match client.lease_keepalive(lease.id) {
                        Ok(_) => {
                            *valid_until.lock() = sent + ttl.saturating_sub(drift);
                            next = sent + period;
                        }
                        Err(ClientError::Rejected { code, .. }) => {
                            // Ended (expired or revoked): nothing more to renew.
                            *lost.lock() = Some(code.to_string());
                            return;
                        }
                        // Unavailable for now: try again soon; validity runs out by itself.
                        Err(_) => next = Instant::now() + Duration::from_millis(100),
                    }
                }
            })
        };
        Ok(LeaseKeeper { lease, valid_until, lost, stop, thread: Some(thread) })
    }

    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Until when the holder may still act on this lease.
    pub fn valid_until(&self) -> Instant {
        *self.valid_until.lock()
    }

    /// Whether the holder may act now.
    pub fn is_valid(&self) -> bool {
        self.lost.lock().is_none() && Instant::now() < self.valid_until()
    }

    /// Why renewal stopped, once the lease is known to have ended.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{cluster, FakeNode};
    use tally_codec::wire::Change;

    /// A replica at a watch limit answers `Busy`: the watcher waits for the hint, asks again,
    /// and delivers every event once; `watch_page` hands the hint to its caller.
    #[test]
    fn the_watcher_waits_out_busy_for_its_hint_then_goes_on() {
        let node = FakeNode::start(1);
        cluster(&[&node], &[], Some(&node));
        node.state.watch_busy.store(2, Ordering::Release);
        node.state.busy_retry_ms.store(150, Ordering::Release);
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let client =
            Client::connect(std::slice::from_ref(&node.addr), key, crate::ClientOptions::default()).expect("connect");
        let heights: Vec<u64> = client
            .watch(WatchFilter::AllDocs, Some(5))
            .expect("watch")
            .take(3)
            .map(|e| e.expect("event").height)
            .collect();
        assert_eq!(heights, vec![5, 6, 7], "every height once, in order");
        let at = node.state.watches_at.lock().clone();
        assert_eq!(at.len(), 5, "two Busy answers, then three pages");
        for w in at.windows(2).take(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(150), "asked again before the hint: {:?}", w[1] - w[0]);
        }
        node.state.watch_busy.store(1, Ordering::Release);
        match client.watch_page(&WatchFilter::AllDocs, 9) {
            Err(ClientError::Busy(b)) => {
                assert_eq!((b.limit.as_str(), b.retry_after_ms), ("WATCHES_PER_ADDRESS_MAX", 150))
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        let page = client.watch_page(&WatchFilter::AllDocs, 9).expect("a page");
        assert!(matches!(page.events.as_slice(), [e] if matches!(e.change, Change::DocDeleted { .. })));
    }
}
