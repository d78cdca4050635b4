//! Batches as a follower receives them (Raft entry payloads) and as the store keeps their bodies.

use crate::{committed_request_refusal, outcome_refusal, Budget, Deep, DeepKind, Header, Out, Req};
use arbitrary::Arbitrary;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{encode, BatchEntry, CodecError, Outcome, SignedRequest, WriteOp, WriteSet};

/// Most requests (and outcomes) a generated batch holds: wide enough for many Merkle shapes,
/// small enough for thousands of executions a second.
pub const GENERATED_LEAVES_MAX: usize = 64;

/// A batch entry: its requests, outcomes and writes; `consistent` makes the header agree with
/// them (leaf count, Merkle root, write-set digest) and pairs each request with one outcome, so
/// the follower's check must pass; `deep` splices a nested request or outcome in.
#[derive(Arbitrary, Debug, Clone)]
pub struct BatchGen {
    pub header: Header,
    pub reqs: Vec<Req>,
    pub outs: Vec<Out>,
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub consistent: bool,
    pub deep: Option<(Deep, u8)>,
}

/// A generated batch: the value (without the spliced shape), its bytes (with it), and how
/// decoding them must end.
pub struct BuiltBatch {
    pub entry: BatchEntry,
    pub bytes: Vec<u8>,
    /// The first bound the bytes break, in decoding order.
    pub refusal: Option<CodecError>,
    /// Whether the entry is consistent with its header (`BatchEntry::check` passes).
    pub consistent: bool,
}

impl BatchGen {
    pub fn build(&self, budget: &mut Budget) -> BuiltBatch {
        let requests: Vec<SignedRequest> =
            self.reqs.iter().take(GENERATED_LEAVES_MAX).map(|r| r.build(budget)).collect();
        let mut outcomes: Vec<Outcome> = self.outs.iter().take(GENERATED_LEAVES_MAX).map(Out::build).collect();
        if self.consistent {
            outcomes.resize(requests.len(), Outcome::DocDeleted);
        }
        let mut ops: Vec<WriteOp> = self
            .writes
            .iter()
            .take(64)
            .map(|(key, value)| WriteOp { key: key.clone(), value: value.clone() })
            .collect();
        ops.sort_by(|a, b| a.key.cmp(&b.key));
        ops.dedup_by(|a, b| a.key == b.key);
        let write_set = WriteSet { ops };
        let leaves: Vec<[u8; 32]> = requests.iter().zip(&outcomes).map(|(r, o)| leaf_hash(&r.id(), o)).collect();
        let mut header =
            self.header.build(Tree::from_leaves(&leaves).root(), requests.len() as u32, write_set.digest());
        if !self.consistent {
            header.merkle_root.0[0] ^= 1;
        }
        let entry = BatchEntry { header, requests, outcomes, write_set };
        let consistent = self.consistent && self.deep.is_none();
        assert!(!consistent || entry.check().is_ok(), "the generator built an inconsistent batch: {:?}", entry.check());
        let (bytes, refusal) = self.bytes(&entry);
        BuiltBatch { entry, bytes, refusal, consistent }
    }

    /// The entry's bytes, assembled field by field so a shape can be spliced into a list.
    fn bytes(&self, entry: &BatchEntry) -> (Vec<u8>, Option<CodecError>) {
        let mut out = encode(&entry.header);
        let splice = |kind_is_outcome: bool| match &self.deep {
            Some((d, at)) if (d.kind == DeepKind::Outcome) == kind_is_outcome => Some((d, *at)),
            _ => None,
        };
        let mut refusal = None;
        let reqs: Vec<(Vec<u8>, Option<CodecError>)> =
            entry.requests.iter().map(|r| (encode(r), committed_request_refusal(r))).collect();
        list(&mut out, reqs, splice(false).map(|(d, at)| (d.request_bytes(), d.refusal(), at)), &mut refusal);
        let outs: Vec<(Vec<u8>, Option<CodecError>)> =
            entry.outcomes.iter().map(|o| (encode(o), outcome_refusal(o))).collect();
        list(&mut out, outs, splice(true).map(|(d, at)| (d.outcome_bytes(), d.refusal(), at)), &mut refusal);
        out.extend_from_slice(&encode(&entry.write_set));
        (out, refusal)
    }
}

/// Appends a borsh list of already-encoded items, with `spliced` inserted at its position, and
/// records the first item's refusal (in decoding order) unless one was recorded before.
pub fn list(
    out: &mut Vec<u8>,
    mut items: Vec<(Vec<u8>, Option<CodecError>)>,
    spliced: Option<(Vec<u8>, CodecError, u8)>,
    refusal: &mut Option<CodecError>,
) {
    if let Some((bytes, why, at)) = spliced {
        let at = usize::from(at) % (items.len() + 1);
        items.insert(at, (bytes, Some(why)));
    }
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for (bytes, why) in items {
        if refusal.is_none() {
            *refusal = why;
        }
        out.extend_from_slice(&bytes);
    }
}
