//! The reply slots of one client frame: the client port makes them, the replica thread (or the
//! client port itself, for what it refuses) fills each once, and the frame's answer leaves when
//! the last one is filled.

use crossbeam::channel::Sender;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tally_codec::wire::{Envelope, ServerMessage, SubmitReply, WireError};
use tally_codec::ErrorCode;

/// A request that passed stage 2 and the slot its answer goes to.
pub struct Submission {
    pub req: crate::validate::Validated,
    pub waiter: Waiter,
}

/// The reply of one client frame, sent once every request in it is answered.
pub struct FrameReply {
    id: u64,
    slots: Mutex<Vec<Option<SubmitReply>>>,
    remaining: AtomicUsize,
    out: Sender<Envelope<ServerMessage>>,
}

impl FrameReply {
    pub fn new(id: u64, n: usize, out: Sender<Envelope<ServerMessage>>) -> Arc<Self> {
        Arc::new(FrameReply { id, slots: Mutex::new(vec![None; n]), remaining: AtomicUsize::new(n), out })
    }

    fn fill(&self, slot: usize, reply: SubmitReply) {
        {
            let mut slots = self.slots.lock();
            assert!(slots[slot].is_none(), "a request is answered once");
            slots[slot] = Some(reply);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let replies: Vec<SubmitReply> =
                std::mem::take(&mut *self.slots.lock()).into_iter().map(|r| r.expect("every slot filled")).collect();
            // A client that doesn't read its replies is dropped rather than buffered without bound.
            if self.out.try_send(Envelope { id: self.id, msg: ServerMessage::Submitted(replies) }).is_err() {
                tracing::debug!(frame = self.id, "client gone or not reading; reply dropped");
            }
        }
    }
}

/// Where one request's answer goes.
pub struct Waiter {
    pub frame: Arc<FrameReply>,
    pub slot: usize,
}

impl Waiter {
    pub fn fill(self, reply: SubmitReply) {
        self.frame.fill(self.slot, reply);
    }
    pub fn refuse(self, code: ErrorCode) {
        self.fill(SubmitReply::Refused(WireError::from_code(code)));
    }
    /// Refused with `NotLeader`, naming the leader when it is known.
    pub fn refuse_not_leader(self, leader_hint: Option<String>) {
        let mut e = WireError::from_code(ErrorCode::NotLeader);
        e.leader_hint = leader_hint;
        self.fill(SubmitReply::Refused(e));
    }
}
