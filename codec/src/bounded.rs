//! The bounds borsh's derived decoders do not know: nesting depth, element counts, and the
//! encoded size of one signed request wherever it is decoded.
//!
//! ```text
//!   Operation::Txn(Txn { then, otherwise })   ─ txn_branch ──┐ depth guard: a thread-local
//!   Outcome::TxnApplied { outcomes }          ─ txn_outcomes ┘ count, refused past NESTING_DEPTH_MAX
//!   Submit(Vec<SignedRequest>), …             ─ counted vectors: the count is checked before
//!                                               anything is allocated or decoded
//!   SignedRequest                             ─ decoded through a reader that refuses to give
//!                                               more than REQUEST_BYTES_MAX bytes
//! ```
//!
//! The derived decoders stay for everything else, so the encoding of every valid value is
//! unchanged (the fixture hashes pin it). Each function here has the shape borsh's
//! `#[borsh(deserialize_with = "...")]` calls; a refusal travels up through borsh as an
//! `io::Error` carrying the [`CodecError`], which [`crate::decode`] takes back out.

use crate::{limits, CodecError, Digest, Operation, Outcome, RequestId, SignedRequest};
use borsh::io::{Error, ErrorKind, Read, Result};
use borsh::BorshDeserialize;
use std::cell::Cell;

/// Wraps a bound's refusal for the trip up through borsh.
pub(crate) fn refuse(e: CodecError) -> Error {
    Error::new(ErrorKind::InvalidData, e)
}

/// The [`CodecError`] a bound put into `e`, or `Malformed` with borsh's own message.
pub(crate) fn codec_error(e: &Error) -> CodecError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<CodecError>()) {
        Some(bound) => bound.clone(),
        None => CodecError::Malformed(e.to_string()),
    }
}

thread_local! {
    /// How many recursive values enclose the one being decoded on this thread. Decoding never
    /// yields or moves threads midway, so a per-thread count is a per-decode count.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// One level of nesting, given back when dropped (also on an error or a panic), so a refused
/// decode leaves the count where it found it.
struct Level;

impl Level {
    /// Enters one more level, or refuses past [`limits::NESTING_DEPTH_MAX`] before anything of
    /// the nested value is read.
    fn enter(what: &'static str) -> Result<Level> {
        DEPTH.with(|d| {
            let depth = d.get() + 1;
            if depth > limits::NESTING_DEPTH_MAX {
                return Err(refuse(CodecError::TooDeep { what, max: limits::NESTING_DEPTH_MAX }));
            }
            d.set(depth);
            Ok(Level)
        })
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        DEPTH.with(|d| {
            let depth = d.get();
            assert!(depth > 0, "a nesting level was given back twice");
            d.set(depth - 1);
        });
    }
}

/// A vector whose element count is checked against `max` before any element is decoded or any
/// room is reserved for them.
fn counted<R: Read, T: BorshDeserialize>(reader: &mut R, max: usize, what: &'static str) -> Result<Vec<T>> {
    let count = u32::deserialize_reader(reader)? as usize;
    if count > max {
        return Err(refuse(CodecError::TooMany { count, max, what }));
    }
    // borsh's own cap on what a count may reserve before its elements arrive.
    let mut out = Vec::with_capacity(count.min(4096 / std::mem::size_of::<T>().max(1)));
    for _ in 0..count {
        out.push(T::deserialize_reader(reader)?);
    }
    Ok(out)
}

/// `Txn::then` and `Txn::otherwise`: one level deeper. The item bound (`TXN_ITEMS_MAX`) is
/// stage 2's to refuse with `BadTxn`; here the request's size bound caps the count.
pub(crate) fn txn_branch<R: Read>(reader: &mut R) -> Result<Vec<Operation>> {
    let _level = Level::enter("transaction")?;
    Vec::<Operation>::deserialize_reader(reader)
}

/// `Outcome::TxnApplied::outcomes`: one level deeper, one outcome per operation of a branch.
pub(crate) fn txn_outcomes<R: Read>(reader: &mut R) -> Result<Vec<Outcome>> {
    let _level = Level::enter("transaction outcome")?;
    counted(reader, limits::TXN_ITEMS_MAX, "outcomes in one transaction")
}

/// `ClientMessage::Submit` and `Relayed::Submit`.
pub(crate) fn requests_in_frame<R: Read>(reader: &mut R) -> Result<Vec<SignedRequest>> {
    counted(reader, limits::FRAME_REQUESTS_MAX, "requests in one frame")
}

/// `ServerMessage::Submitted`: one reply per submitted request.
pub(crate) fn replies_in_frame<R: Read>(reader: &mut R) -> Result<Vec<crate::wire::SubmitReply>> {
    counted(reader, limits::FRAME_REQUESTS_MAX, "replies in one frame")
}

/// The requests of one batch (entry, stored body), each within
/// [`limits::COMMITTED_REQUEST_BYTES_MAX`]: a batch is history, and history written before the
/// request bound was enforced holds requests up to a frame's size that must still replay.
pub(crate) fn requests_in_batch<R: Read>(reader: &mut R) -> Result<Vec<SignedRequest>> {
    let _committed = RequestBound::set(limits::COMMITTED_REQUEST_BYTES_MAX);
    counted(reader, limits::BATCH_REQUESTS_MAX, "requests in one batch")
}

/// The outcomes of one batch: one per request.
pub(crate) fn outcomes_in_batch<R: Read>(reader: &mut R) -> Result<Vec<Outcome>> {
    counted(reader, limits::BATCH_REQUESTS_MAX, "outcomes in one batch")
}

/// The request ids of one batch.
pub(crate) fn ids_in_batch<R: Read>(reader: &mut R) -> Result<Vec<RequestId>> {
    counted(reader, limits::BATCH_REQUESTS_MAX, "request ids in one batch")
}

/// The ids and expiries of one batch, as the store keeps them.
pub(crate) fn id_expiries_in_batch<R: Read>(reader: &mut R) -> Result<Vec<(RequestId, u64)>> {
    counted(reader, limits::BATCH_REQUESTS_MAX, "request ids in one batch")
}

/// `Receipt::proof`: no batch needs more hashes than this.
pub(crate) fn proof_hashes<R: Read>(reader: &mut R) -> Result<Vec<Digest>> {
    counted(reader, limits::PROOF_HASHES_MAX, "hashes in one Merkle proof")
}

/// A reader that gives at most `left` bytes, then refuses with `RequestTooLarge`: a signed
/// request is decoded through it wherever it appears, so no request over the bound is ever
/// built, however it arrives (alone, in a frame, in a batch or in a receipt).
struct RequestBudget<'a, R> {
    inner: &'a mut R,
    left: usize,
    max: usize,
}

impl<R: Read> Read for RequestBudget<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            return Err(refuse(CodecError::RequestTooLarge { max: self.max }));
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n;
        Ok(n)
    }
}

thread_local! {
    /// The bound a [`SignedRequest`] is decoded within on this thread: [`limits::REQUEST_BYTES_MAX`]
    /// unless a batch's decoder set the committed-history bound for its requests.
    static REQUEST_BOUND: Cell<usize> = const { Cell::new(limits::REQUEST_BYTES_MAX) };
}

/// Sets the request bound for the requests decoded while it lives, and puts the previous one
/// back when dropped (also on an error).
struct RequestBound(usize);

impl RequestBound {
    fn set(bytes_max: usize) -> RequestBound {
        RequestBound(REQUEST_BOUND.with(|b| b.replace(bytes_max)))
    }
}

impl Drop for RequestBound {
    fn drop(&mut self) {
        REQUEST_BOUND.with(|b| b.set(self.0));
    }
}

/// The decoder of [`SignedRequest`]: its fields in order, as the derived one, within the budget.
pub(crate) fn signed_request<R: Read>(reader: &mut R) -> Result<SignedRequest> {
    let max = REQUEST_BOUND.with(Cell::get);
    let mut budget = RequestBudget { inner: reader, left: max, max };
    let request = crate::Request::deserialize_reader(&mut budget)?;
    let signature = crate::Signature::deserialize_reader(&mut budget)?;
    Ok(SignedRequest { request, signature })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth() -> usize {
        DEPTH.with(Cell::get)
    }

    #[test]
    fn levels_are_given_back_on_success_and_on_refusal() {
        assert_eq!(depth(), 0);
        {
            let _a = Level::enter("x").expect("first level");
            assert_eq!(depth(), 1);
            let refused = Level::enter("x").err().expect("second level is over the bound");
            assert_eq!(codec_error(&refused), CodecError::TooDeep { what: "x", max: limits::NESTING_DEPTH_MAX });
            assert_eq!(depth(), 1);
        }
        assert_eq!(depth(), 0);
    }

    #[test]
    fn a_failed_decode_leaves_the_depth_at_zero() {
        // A txn whose branch is cut short: the error unwinds through the guard.
        let bytes = [9u8, 0, 0, 0, 0, 5, 0, 0, 0, 1];
        assert!(crate::decode::<Operation>(&bytes, 64).is_err());
        assert_eq!(depth(), 0);
    }

    #[test]
    fn counts_are_checked_before_elements() {
        let mut bytes: &[u8] = &[65, 0, 0, 0];
        let err = proof_hashes(&mut bytes).expect_err("65 hashes");
        assert_eq!(
            codec_error(&err),
            CodecError::TooMany { count: 65, max: limits::PROOF_HASHES_MAX, what: "hashes in one Merkle proof" }
        );
        let mut empty: &[u8] = &[0, 0, 0, 0];
        assert_eq!(proof_hashes(&mut empty).expect("no hashes"), vec![]);
    }
}
