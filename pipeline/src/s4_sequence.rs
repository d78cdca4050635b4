//! Stage 4: the sequential batch. One thread, the leader's only writer of state.
//!
//! Every `batch_interval_ms` after a batch opens (or at `batch_requests_max`), it runs stage 3
//! on what arrived, executes the survivors in order on the latest state (including batches not
//! yet committed), builds the Merkle tree over (id, outcome) leaves and the header chained to the
//! previous one, and hands the batch to stage 5. It never waits for a commit: batch N+1 executes
//! while N replicates.

use crate::node::{Shared, Submission};
use crate::s5_propose::{self, PendingBatch};
use crossbeam::channel::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::ErrorCode;
use tally_core::sequence::{
    batch_time, drop_expired, entry_bytes_estimate, execute_batch, BatchContext, Tip, BATCHES_IN_FLIGHT_MAX,
};
use tally_core::state::View;
use tally_failover::env::Env;
use tally_failover::ProposeError;

/// Leadership as the sequencer last saw it.
enum Mode {
    Following,
    /// Leading in `term` with the chain head at `tip`.
    Leading {
        term: u64,
        tip: Tip,
    },
}

/// Keeps what fits in one batch of `bytes_max` (estimated); the rest waits for the next batch.
/// A request that alone is over the bound is refused with `ProposalTooLarge`.
fn split_by_bytes(subs: Vec<Submission>, bytes_max: usize) -> (Vec<Submission>, Vec<Submission>) {
    tally_core::sequence::split_by_bytes(
        subs,
        bytes_max,
        |s| &s.req.request,
        |s| {
            crate::measure::refused("sequence", ErrorCode::ProposalTooLarge, 1);
            s.waiter.refuse(ErrorCode::ProposalTooLarge);
        },
    )
}

pub fn run(shared: Arc<Shared>, env: Box<dyn Env>) {
    let mut view = View::default();
    let mut mode = Mode::Following;
    let interval = Duration::from_millis(shared.opts.batch_interval_ms);
    // Requests that did not fit the previous batch's byte bound open the next one.
    let mut carry: Vec<Submission> = Vec::new();
    // When the previous batch of this term was built (for the interval between batches).
    let mut last_batch: Option<Instant> = None;
    while !shared.is_stopping() {
        mode = update_mode(&shared, &mut view, mode);
        // Frames relayed to a replica that no longer leads are answered (retryable) now.
        shared.forwarder.retain_leader(shared.leader_addr().as_deref());
        // Wait for the first submission of the next batch.
        let first = if carry.is_empty() {
            match shared.seq_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(s) => s,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            std::mem::take(&mut carry)
        };
        let Mode::Leading { term, tip } = &mut mode else {
            crate::measure::refused("sequence", ErrorCode::NotLeader, first.len() as u64);
            for sub in first {
                sub.waiter.refuse_not_leader(&shared);
            }
            continue;
        };
        let deadline = Instant::now() + interval;
        let bytes_max = shared.opts.batch_bytes_max;
        let mut queued: usize = first.len();
        let mut bytes: usize = first.iter().map(|s| entry_bytes_estimate(&s.req.request)).sum();
        let mut groups = vec![first];
        while queued < shared.opts.batch_requests_max && bytes < bytes_max {
            let left = deadline.saturating_duration_since(Instant::now());
            match shared.seq_rx.recv_timeout(left) {
                Ok(g) => {
                    queued += g.len();
                    bytes += g.iter().map(|s| entry_bytes_estimate(&s.req.request)).sum::<usize>();
                    groups.push(g);
                }
                Err(_) => break,
            }
        }
        let (subs, rest) = split_by_bytes(groups.into_iter().flatten().collect(), bytes_max);
        carry = rest;
        wait_for_room(&shared);
        crate::failpoint::hit("sequencer");
        view.on_applied(shared.applied_height());
        let started = Instant::now();
        let batch = build_batch(&shared, &mut view, *term, tip, subs, env.wall_ms());
        crate::measure::stage_time("sequence", started);
        if let Some(batch) = batch {
            let now = Instant::now();
            if let Some(prev) = last_batch.replace(now) {
                metrics::histogram!("tally_batch_interval_seconds").record((now - prev).as_secs_f64());
            }
            if let Err(e) = s5_propose::propose(&shared, *term, batch) {
                // Still the leader of this term, with earlier batches of the term proposed and
                // maybe not yet applied: sequencing again from the applied head would give a
                // new batch a height one of them holds, and once both committed every replica
                // would stop at that height for good. This replica ends instead (the panic hook
                // aborts it) and another takes over from the log as it is.
                if matches!(e, ProposeError::Busy | ProposeError::TooLarge { .. }) {
                    panic!("proposal refused in term {term} while leading ({e}); ending the replica");
                }
                tracing::warn!(error = %e, term, "proposal refused; leaving the leader role");
                s5_propose::fail_all_pending(&shared, "propose", s5_propose::refusal_code(&e));
                view.reset();
                mode = Mode::Following;
                last_batch = None;
            }
        }
    }
}

/// Drops speculative state when leadership is lost; takes up the chain once a new term's
/// predecessors are all applied.
fn update_mode(shared: &Shared, view: &mut View, mode: Mode) -> Mode {
    let role = shared.replicator().role();
    match mode {
        Mode::Leading { term, tip } if role.is_leader && role.term == term => Mode::Leading { term, tip },
        Mode::Leading { term, .. } => {
            tracing::info!(old_term = term, new_term = role.term, "lost leadership; discarding uncommitted batches");
            s5_propose::fail_all_pending(shared, "sequence", ErrorCode::Retry);
            view.reset();
            Mode::Following
        }
        Mode::Following if role.is_leader && shared.applied_index() >= role.term_start_index => {
            // Everything committed before this term is applied: the store is the chain head.
            s5_propose::fail_all_pending(shared, "sequence", ErrorCode::Retry);
            view.reset();
            let a = shared.store.lock().applied();
            let time_ms = shared.store_time_ms();
            tracing::info!(term = role.term, height = a.height, "leading: sequencing from the applied head");
            Mode::Leading {
                term: role.term,
                tip: Tip { height: a.height, hash: a.header_hash, state_digest: a.state_digest, time_ms },
            }
        }
        Mode::Following => Mode::Following,
    }
}

fn wait_for_room(shared: &Shared) {
    let mut waited = 0;
    while shared.pending.lock().batches.len() >= BATCHES_IN_FLIGHT_MAX && waited < 5000 {
        std::thread::sleep(Duration::from_millis(1));
        waited += 1;
    }
}

/// Stages 3 and 4 for one batch. Returns `None` when nothing survived stage 3.
fn build_batch(
    shared: &Shared,
    view: &mut View,
    term: u64,
    tip: &mut Tip,
    subs: Vec<Submission>,
    wall_ms: u64,
) -> Option<PendingBatch> {
    let mut refusals = crate::measure::Refusals::new("sequence");
    let subs = drop_expired(
        subs,
        batch_time(wall_ms, tip),
        |s| &s.req.request,
        |s| {
            refusals.add(ErrorCode::Expired);
            s.waiter.refuse(ErrorCode::Expired);
        },
    );
    let subs = crate::s3_optimistic::filter(shared, view, subs);
    let ctx = BatchContext { cluster_id: shared.opts.cluster_id, tables: &shared.tables, term, wall_ms };
    let subs = subs.into_iter().map(|s| (s.req, s.waiter)).collect();
    let batch = execute_batch(&ctx, view, tip, subs, |w, code| {
        refusals.add(code);
        w.refuse(code);
    })?;
    metrics::histogram!("tally_batch_requests").record(batch.entry.requests.len() as f64);
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{FrameReply, Waiter};
    use tally_codec::wire::{ServerMessage, SubmitReply};
    use tally_codec::{ClusterId, DocKey, Operation, PublicKey, Request};

    fn set(value_bytes: usize, nonce: u64) -> tally_codec::SignedRequest {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        Request {
            cluster_id: ClusterId([1; 16]),
            signer: PublicKey(key.verifying_key().to_bytes()),
            nonce,
            expires_at_ms: u64::MAX,
            op: Operation::Set {
                key: DocKey::parse("0d5d3807-5fbf-4228-a657-5a091c4e497f").expect("uuid"),
                value: vec![b'1'; value_bytes],
            },
        }
        .sign(&key)
    }

    /// Issue 6, attack 5: a batch is closed by bytes; what does not fit waits for the next one,
    /// and only a request that alone is over the bound is refused, with its real cause.
    #[test]
    fn batches_are_bounded_in_bytes_and_only_an_oversized_request_is_refused() {
        let (tx, rx) = crossbeam::channel::bounded(4);
        let reqs = [set(1_000, 1), set(1_000, 2), set(10_000, 3), set(1_000, 4)];
        let frame = FrameReply::new(9, reqs.len(), tx);
        let subs: Vec<Submission> = reqs
            .iter()
            .enumerate()
            .map(|(slot, r)| Submission {
                req: crate::s2_validate::Validated { request: r.clone(), id: r.id() },
                waiter: Waiter { frame: frame.clone(), slot },
            })
            .collect();
        let one = entry_bytes_estimate(&reqs[0]);
        assert!(one > 2_000 && one < 2_600, "a 1 KB SET counts its body twice (request and write set): {one}");
        let (now, later) = split_by_bytes(subs, 2 * one + 10);
        assert_eq!(now.len(), 2, "two fit");
        assert_eq!(later.len(), 1, "the last waits for the next batch");
        assert_eq!(later[0].waiter.slot, 3);
        // The 10 KB one was refused alone; the others are still waiting for their batch.
        assert!(rx.try_recv().is_err(), "the frame is answered once every request is");
        for s in now.into_iter().chain(later) {
            s.waiter.refuse(ErrorCode::Retry);
        }
        let Ok(env) = rx.try_recv() else { panic!("no reply") };
        let ServerMessage::Submitted(replies) = env.msg else { panic!("unexpected {:?}", env.msg) };
        assert!(matches!(&replies[2], SubmitReply::Refused(e) if e.code == ErrorCode::ProposalTooLarge));
    }
}
