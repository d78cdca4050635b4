//! Stage 4: the sequential batch. One thread, the leader's only writer of state.
//!
//! Every `batch_interval_ms` after a batch opens (or at `batch_requests_max`), it runs stage 3
//! on what arrived, executes the survivors in order on the latest state (including batches not
//! yet committed), builds the Merkle tree over (id, outcome) leaves and the header chained to the
//! previous one, and hands the batch to stage 5. It never waits for a commit: batch N+1 executes
//! while N replicates.

use crate::node::{Shared, Submission, Waiter};
use crate::s5_commit::{self, PendingBatch};
use tally_core::state::{execute, BatchWrites, View};
use crossbeam::channel::RecvTimeoutError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_codec::batch::next_state_digest;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{BatchEntry, BatchHeader, Digest, ErrorCode, RequestId};
use tally_failover::env::Env;

/// Batches executed but not yet committed, at most. Past this the sequencer waits.
pub const BATCHES_IN_FLIGHT_MAX: usize = 8;

/// The head of the speculative chain.
#[derive(Debug, Clone, Copy)]
pub struct Tip {
    pub height: u64,
    pub hash: Digest,
    pub state_digest: Digest,
    pub time_ms: u64,
}

/// Leadership as the sequencer last saw it.
enum Mode {
    Following,
    /// Leading in `term` with the chain head at `tip`.
    Leading {
        term: u64,
        tip: Tip,
    },
}

/// Bytes a request adds to a batch entry, at most: the request itself, its copy in the write
/// set (a document body), and room for its outcome and write-set key.
pub fn entry_bytes_estimate(req: &tally_codec::SignedRequest) -> usize {
    let value = match &req.request.op {
        tally_codec::Operation::Set { value, .. } => value.len(),
        _ => 0,
    };
    borsh_len(req) + value + 192
}

fn borsh_len(req: &tally_codec::SignedRequest) -> usize {
    // signer, signature, cluster, nonce, expiry, op tag: fixed; the value dominates.
    let op = match &req.request.op {
        tally_codec::Operation::Set { value, .. } => 16 + 4 + value.len(),
        tally_codec::Operation::Delete { .. } => 16,
        tally_codec::Operation::Transfer { .. } => 40,
    };
    16 + 32 + 8 + 8 + 1 + op + 64
}

/// Keeps what fits in one batch of `bytes_max` (estimated); the rest waits for the next batch.
/// A request that alone is over the bound is refused with `ProposalTooLarge`.
fn split_by_bytes(subs: Vec<Submission>, bytes_max: usize) -> (Vec<Submission>, Vec<Submission>) {
    let mut used = 0usize;
    let mut now = Vec::with_capacity(subs.len());
    let mut later = Vec::new();
    for sub in subs {
        let b = entry_bytes_estimate(&sub.req.request);
        if b > bytes_max {
            metrics::counter!("tally_refused_total", "stage" => "sequence").increment(1);
            sub.waiter.refuse(ErrorCode::ProposalTooLarge);
            continue;
        }
        if !later.is_empty() || used + b > bytes_max {
            later.push(sub);
            continue;
        }
        used += b;
        now.push(sub);
    }
    (now, later)
}

pub fn run(shared: Arc<Shared>, env: Box<dyn Env>) {
    let mut view = View::default();
    let mut mode = Mode::Following;
    let interval = Duration::from_millis(shared.opts.batch_interval_ms);
    // Requests that did not fit the previous batch's byte bound open the next one.
    let mut carry: Vec<Submission> = Vec::new();
    while !shared.is_stopping() {
        mode = update_mode(&shared, &mut view, mode);
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
        metrics::histogram!("tally_stage4_sequence_ms").record(started.elapsed().as_secs_f64() * 1e3);
        if let Some(batch) = batch {
            if let Err(e) = s5_commit::propose(&shared, *term, batch) {
                tracing::warn!(error = %e, term, "proposal refused; leaving the leader role");
                s5_commit::fail_all_pending(&shared, s5_commit::refusal_code(&e));
                view.reset();
                mode = Mode::Following;
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
            s5_commit::fail_all_pending(shared, ErrorCode::Retry);
            view.reset();
            Mode::Following
        }
        Mode::Following if role.is_leader && shared.applied_index() >= role.term_start_index => {
            // Everything committed before this term is applied: the store is the chain head.
            s5_commit::fail_all_pending(shared, ErrorCode::Retry);
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
    let subs = crate::s3_optimistic::filter(shared, view, subs);
    // A duplicate inside the batch waits on the first copy's leaf.
    let mut in_batch: HashMap<RequestId, usize> = HashMap::new();

    // Header time never goes backwards, whatever the wall clock does.
    let time_ms = wall_ms.max(tip.time_ms);
    let mut cur = BatchWrites::default();
    let mut requests = Vec::with_capacity(subs.len());
    let mut outcomes = Vec::with_capacity(subs.len());
    let mut ids = Vec::with_capacity(subs.len());
    let mut waiters: Vec<Vec<Waiter>> = Vec::with_capacity(subs.len());
    for sub in subs {
        if let Some(&pos) = in_batch.get(&sub.req.id) {
            waiters[pos].push(sub.waiter);
            continue;
        }
        // Expired by the batch clock: refused without executing, so an id forgotten after its
        // expiry can never be executed a second time (stage 2's wall clock may lag the header).
        if sub.req.request.request.expires_at_ms < time_ms {
            sub.waiter.refuse(ErrorCode::Expired);
            continue;
        }
        let outcome = execute(view, &mut cur, &sub.req.request.request, time_ms);
        in_batch.insert(sub.req.id, requests.len());
        ids.push(sub.req.id);
        requests.push(sub.req.request);
        outcomes.push(outcome);
        waiters.push(vec![sub.waiter]);
    }
    if requests.is_empty() {
        return None;
    }
    let leaves: Vec<[u8; 32]> = ids.iter().zip(&outcomes).map(|(id, o)| leaf_hash(id, o)).collect();
    let tree = Tree::from_leaves(&leaves);
    let write_set = cur.to_write_set(&shared.tables);
    let write_set_digest = write_set.digest();
    let header = BatchHeader {
        cluster_id: shared.opts.cluster_id,
        height: tip.height + 1,
        prev_hash: tip.hash,
        merkle_root: tree.root(),
        leaf_count: u32::try_from(requests.len()).expect("batch_requests_max fits in u32"),
        write_set_digest,
        state_digest: next_state_digest(&tip.state_digest, &write_set_digest),
        term,
        time_ms,
    };
    let header_hash = header.hash();
    *tip = Tip { height: header.height, hash: header_hash, state_digest: header.state_digest, time_ms };
    view.push_layer(header.height, Arc::new(cur));
    metrics::histogram!("tally_batch_requests").record(requests.len() as f64);
    Some(PendingBatch { entry: BatchEntry { header, requests, outcomes, write_set }, header_hash, tree, ids, waiters })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::FrameReply;
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
