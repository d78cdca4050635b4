//! Snapshots as a follower installs them: a Raft snapshot's data is a `SnapshotEnvelope` whose
//! `state` is the store's `StateSnapshot`, whose batch-table values are `BatchRecord`s and whose
//! bodies are `BatchBody`s read back later.

use crate::batch::list;
use crate::{committed_request_refusal, outcome_refusal, Budget, Deep, DeepKind, Header, Out, Req};
use arbitrary::Arbitrary;
use tally_codec::{encode, BatchRecord, CodecError, Digest, Signature, Tables, WriteSet};
use tally_failover::snapshot::SnapshotEnvelope;
use tally_failover::revocation::Revocation;
use tally_failover::MemberAddr;
use tally_store::state::{Applied, StateSnapshot};

/// Most pairs, records and bodies a generated snapshot holds.
pub const GENERATED_ITEMS_MAX: usize = 32;

/// A body kept in a snapshot: requests and outcomes, maybe with a nested shape spliced in.
#[derive(Arbitrary, Debug, Clone)]
pub struct BodyGen {
    pub reqs: Vec<Req>,
    pub outs: Vec<Out>,
    pub deep: Option<(Deep, u8)>,
}

impl BodyGen {
    /// The body's bytes (a `BatchBody`) and how decoding them must end.
    pub fn build(&self, budget: &mut Budget) -> (Vec<u8>, Option<CodecError>) {
        let mut out = Vec::new();
        let mut refusal = None;
        let splice = |outcome: bool| match &self.deep {
            Some((d, at)) if (d.kind == DeepKind::Outcome) == outcome => Some((d, *at)),
            _ => None,
        };
        let reqs = self.reqs.iter().take(8).map(|r| {
            let r = r.build(budget);
            (encode(&r), committed_request_refusal(&r))
        });
        let reqs = reqs.collect();
        list(&mut out, reqs, splice(false).map(|(d, at)| (d.request_bytes(), d.refusal(), at)), &mut refusal);
        let outs = self.outs.iter().take(8).map(|o| {
            let o = o.build();
            (encode(&o), outcome_refusal(&o))
        });
        list(&mut out, outs.collect(), splice(true).map(|(d, at)| (d.outcome_bytes(), d.refusal(), at)), &mut refusal);
        out.extend_from_slice(&encode(&WriteSet::default()));
        (out, refusal)
    }
}

/// A state snapshot and its envelope.
#[derive(Arbitrary, Debug, Clone)]
pub struct SnapGen {
    pub index: u64,
    pub height: u64,
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    pub records: Vec<(Header, Vec<u8>)>,
    pub bodies: Vec<(u64, BodyGen)>,
    pub members: Vec<(u64, String, String)>,
    /// Revoked certificates the envelope carries: (node id, fingerprint).
    pub revoked: Vec<(u64, [u8; 32])>,
}

/// A generated snapshot: the envelope's bytes, and what each layer must decode to.
pub struct BuiltSnapshot {
    pub envelope: Vec<u8>,
    pub state: StateSnapshot,
    pub members: Vec<MemberAddr>,
    pub revoked: Vec<Revocation>,
    pub records: Vec<BatchRecord>,
    /// Per body, its refusal (if any).
    pub bodies: Vec<Option<CodecError>>,
}

impl SnapGen {
    pub fn build(&self, budget: &mut Budget) -> BuiltSnapshot {
        let tables = Tables::v1();
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = self.pairs.iter().take(GENERATED_ITEMS_MAX).cloned().collect();
        let mut records = Vec::new();
        for (h, body_ref) in self.records.iter().take(GENERATED_ITEMS_MAX) {
            let header = h.build(Digest([7; 32]), 1, Digest([8; 32]));
            let record = BatchRecord { header, signature: Signature([9; 64]), body_ref: body_ref.clone() };
            pairs.push((tables.batch(record.header.height).into_bytes(), encode(&record)));
            records.push(record);
        }
        let (mut bodies, mut refusals) = (Vec::new(), Vec::new());
        for (height, body) in self.bodies.iter().take(8) {
            let (bytes, refusal) = body.build(budget);
            bodies.push((*height, bytes));
            refusals.push(refusal);
        }
        let applied = Applied { index: self.index, height: self.height, ..Applied::default() };
        let state = StateSnapshot { applied, pairs, bodies };
        let members: Vec<MemberAddr> = self
            .members
            .iter()
            .take(8)
            .map(|(node_id, client_addr, peer_addr)| MemberAddr {
                node_id: *node_id,
                client_addr: client_addr.clone(),
                peer_addr: peer_addr.clone(),
            })
            .collect();
        let revoked: Vec<Revocation> = self
            .revoked
            .iter()
            .take(8)
            .map(|&(node_id, cert_fingerprint)| Revocation { node_id, cert_fingerprint })
            .collect();
        let envelope = SnapshotEnvelope::encode_parts(&members, &revoked, &encode(&state));
        BuiltSnapshot { envelope, state, members, revoked, records, bodies: refusals }
    }
}
