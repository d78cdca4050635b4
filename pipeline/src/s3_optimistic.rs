//! Stage 3: optimistic validation against recent state, before a request enters a batch.
//!
//! * A request whose id is already executed gets its original receipt (exactly-once).
//! * A request whose id sits in a batch still in flight waits for that batch's receipt.
//! * Every account and document the batch will touch is prefetched into the view in one pass.
//! * A transfer the pre-batch state can't fund is refused at once, without consuming its id.
//!
//! Requests that pass may still fail in stage 4 (an earlier request in the same batch spent the
//! money); those are executed as `Rejected` outcomes and their ids are consumed.

use crate::node::{Shared, Submission};
use tally_codec::{ErrorCode, Operation};
use tally_core::state::{BatchWrites, View};

/// Filters the submissions of one batch. Duplicates *within* the batch are left for stage 4,
/// which joins them to the first copy's leaf.
pub fn filter(shared: &Shared, view: &mut View, subs: Vec<Submission>) -> Vec<Submission> {
    let mut out = Vec::with_capacity(subs.len());
    {
        let mut pending = shared.pending.lock();
        let seen = shared.seen.lock();
        for Submission { req, waiter } in subs {
            let id = req.id;
            let Some(waiter) = pending.attach(&id, waiter) else { continue };
            if let Some((height, _)) = seen.get(&id) {
                crate::s7_apply::answer_with_stored_receipt(shared, id, height, waiter);
                continue;
            }
            out.push(Submission { req, waiter });
        }
    }
    // One pass over the store for every key the batch will touch. The store lock is taken only
    // on a cache miss, so a LevelDB stall in the store thread rarely reaches the sequencer.
    {
        let mut backing = crate::node::StoreBacking { shared, guard: None };
        view.prefetch(out.iter().map(|s| (&s.req.request.request.signer, &s.req.request.request.op)), &mut backing);
    }
    // Funds check against the state before this batch.
    let empty = BatchWrites::default();
    let mut funded = Vec::with_capacity(out.len());
    for sub in out {
        let r = &sub.req.request.request;
        if let Operation::Transfer { amount, .. } = r.op {
            if view.balance(&empty, &r.signer) < amount {
                crate::measure::refused("optimistic", ErrorCode::InsufficientFunds, 1);
                sub.waiter.refuse(ErrorCode::InsufficientFunds);
                continue;
            }
        }
        funded.push(sub);
    }
    funded
}
