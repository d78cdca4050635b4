//! Peer messages built by shape: a Raft message of any type and numbers, whose entries are
//! generated batches (`tally_fuzz::batch::BatchGen`, maybe with a nested request or outcome),
//! conf changes with no context, an address or a revoked certificate (on either change type), empty entries or raw bytes, and whose snapshot
//! carries a generated state (`tally_fuzz::snapshot::SnapGen`); encoded with protobuf 2, then
//! maybe mutated. Then what a replica does with a peer frame: `Message::parse_from_bytes`
//! (protobuf's own recursion bound, 100), the judge of every appended entry
//! (`failover::config::check_entry` with `core::confirm::check_batch_entry`), the log record
//! round trip, the probe context, and the snapshot's layers.
//!
//! Properties: the message parses back to itself; each entry is judged exactly as its shape
//! says (a batch passes only when decodable, consistent and of this cluster above height 0; a
//! conf change only when it names no node 0 and its context is of its kind, for that node); a log record reads back as
//! its entry; after a mutation, no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::{Message as _, ProtobufEnum};
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
};
use tally_codec::limits::SNAPSHOT_BYTES_MAX;
use tally_codec::{encode, BatchBody};
use tally_core::confirm::check_batch_entry;
use tally_failover::lease::parse_probe_context;
use tally_failover::snapshot::SnapshotEnvelope;
use tally_failover::storage::{decode_entry, encode_entry};
use tally_failover::revocation::Revocation;
use tally_failover::MemberAddr;
use tally_fuzz::batch::BatchGen;
use tally_fuzz::snapshot::SnapGen;
use tally_fuzz::{Budget, Mutation, CLUSTER};
use tally_store::state::StateSnapshot;
use tally_store::LogEntry;

/// A conf change's context: none, an added node's address, or a removed node's revoked
/// certificate; any of them on any change type.
#[derive(arbitrary::Arbitrary, Debug)]
enum Ctx {
    None,
    Member(u64, String, String),
    Revocation(u64, [u8; 32]),
}

impl Ctx {
    /// The context's bytes and the node it names.
    fn build(&self) -> (Vec<u8>, Option<u64>) {
        match self {
            Ctx::None => (Vec::new(), None),
            Ctx::Member(node_id, c, p) => {
                let a = MemberAddr { node_id: *node_id, client_addr: c.clone(), peer_addr: p.clone() };
                (encode(&a), Some(*node_id))
            }
            Ctx::Revocation(node_id, fp) => {
                (encode(&Revocation { node_id: *node_id, cert_fingerprint: *fp }), Some(*node_id))
            }
        }
    }

    /// Whether a change of `node_id` (an add when `add`) with this context must pass the judge;
    /// `None` when a context of the other kind happens to decode as this change's kind.
    fn verdict(&self, add: bool, node_id: u64, bytes: &[u8]) -> Option<bool> {
        if node_id == 0 {
            return Some(false);
        }
        match (self, add) {
            (Ctx::None, _) => Some(true),
            (Ctx::Member(n, ..), true) | (Ctx::Revocation(n, _), false) => Some(*n == node_id),
            (Ctx::Member(..), false) => tally_codec::decode::<Revocation>(bytes, 1024).is_err().then_some(false),
            (Ctx::Revocation(..), true) => tally_codec::decode::<MemberAddr>(bytes, 64 * 1024).is_err().then_some(false),
        }
    }
}

#[derive(arbitrary::Arbitrary, Debug)]
enum EntryGen {
    Empty,
    Batch(BatchGen),
    ConfChange { add: bool, node_id: u64, ctx: Ctx },
    ConfChangeV2 { changes: Vec<(bool, u64)>, ctx: Ctx },
    Raw { entry_type: u8, data: Vec<u8>, context: Vec<u8> },
}

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    msg_type: u8,
    numbers: [u64; 9],
    reject: bool,
    context: Vec<u8>,
    entries: Vec<(u64, EntryGen)>,
    snapshot: Option<(u64, u64, SnapGen)>,
    mutation: Mutation,
}

fuzz_target!(|input: Input| {
    let mut budget = Budget::default();
    let (msg, verdicts) = build(&input, &mut budget);
    let mut bytes = msg.write_to_bytes().expect("a built message encodes");
    let mutated = input.mutation.apply(&mut bytes);
    let Ok(parsed) = Message::parse_from_bytes(&bytes) else {
        assert!(mutated, "a built message does not parse");
        return;
    };
    if !mutated {
        assert!(parsed == msg, "a built message parses to another");
    }
    let _ = parse_probe_context(&parsed.context);
    let judge = |d: &[u8]| check_batch_entry(d, &CLUSTER).map_err(|e| e.to_string());
    for (i, e) in parsed.entries.iter().enumerate() {
        log_round_trip(e);
        let judged = tally_failover::config::check_entry(e, &judge);
        if !mutated {
            if let Some(ok) = verdicts[i] {
                assert_eq!(judged.is_ok(), ok, "entry {i}: {judged:?}");
            }
        }
    }
    if parsed.has_snapshot() {
        snapshot_layers(&parsed.get_snapshot().data, !mutated && input.snapshot.is_some());
    }
});

/// The message, and per entry whether its judge must pass (`None`: not known in advance).
fn build(input: &Input, budget: &mut Budget) -> (Message, Vec<Option<bool>>) {
    let n = &input.numbers;
    let mut msg = Message::default();
    let types = MessageType::values();
    msg.set_msg_type(types[usize::from(input.msg_type) % types.len()]);
    (msg.to, msg.from, msg.term, msg.log_term, msg.index) = (n[0], n[1], n[2], n[3], n[4]);
    (msg.commit, msg.commit_term, msg.reject_hint, msg.request_snapshot) = (n[5], n[6], n[7], n[8]);
    msg.reject = input.reject;
    msg.context = input.context.clone().into();
    let mut verdicts = Vec::new();
    for (k, (term, gen)) in input.entries.iter().take(8).enumerate() {
        let (mut e, verdict) = entry(gen, budget);
        (e.index, e.term) = (n[4].wrapping_add(k as u64 + 1), *term);
        msg.mut_entries().push(e);
        verdicts.push(verdict);
    }
    if let Some((index, term, snap)) = &input.snapshot {
        let s = msg.mut_snapshot();
        (s.mut_metadata().index, s.mut_metadata().term) = (*index, *term);
        s.data = snap.build(budget).envelope.into();
    }
    (msg, verdicts)
}

fn entry(gen: &EntryGen, budget: &mut Budget) -> (Entry, Option<bool>) {
    let mut e = Entry::default();
    let verdict = match gen {
        EntryGen::Empty => Some(true),
        EntryGen::Batch(b) => {
            let built = b.build(budget);
            e.data = built.bytes.into();
            Some(built.refusal.is_none() && built.consistent && built.entry.header.height != 0)
        }
        EntryGen::ConfChange { add, node_id, ctx } => {
            let mut cc = ConfChange::default();
            cc.set_change_type(if *add { ConfChangeType::AddNode } else { ConfChangeType::RemoveNode });
            cc.node_id = *node_id;
            e.set_entry_type(EntryType::EntryConfChange);
            e.data = cc.write_to_bytes().expect("encode").into();
            let (bytes, _) = ctx.build();
            let verdict = ctx.verdict(*add, *node_id, &bytes);
            e.context = bytes.into();
            verdict
        }
        EntryGen::ConfChangeV2 { changes, ctx } => {
            let mut cc = ConfChangeV2::default();
            for (add, node_id) in changes.iter().take(4) {
                let mut c = ConfChangeSingle::default();
                c.set_change_type(if *add { ConfChangeType::AddNode } else { ConfChangeType::RemoveNode });
                c.node_id = *node_id;
                cc.mut_changes().push(c);
            }
            e.set_entry_type(EntryType::EntryConfChangeV2);
            e.data = cc.write_to_bytes().expect("encode").into();
            let (bytes, named) = ctx.build();
            let changes: Vec<(bool, u64)> = changes.iter().take(4).copied().collect();
            let verdict = match (changes.as_slice(), named) {
                (all, _) if all.iter().any(|&(_, id)| id == 0) => Some(false),
                (&[(add, one)], _) => ctx.verdict(add, one, &bytes),
                (_, None) => Some(true),
                (_, Some(_)) => Some(false),
            };
            e.context = bytes.into();
            verdict
        }
        EntryGen::Raw { entry_type, data, context } => {
            let types = EntryType::values();
            e.set_entry_type(types[usize::from(*entry_type) % types.len()]);
            (e.data, e.context) = (data.clone().into(), context.clone().into());
            None
        }
    };
    (e, verdict)
}

/// The follower appends the entry to its log and reads it back on restart or for peers.
fn log_round_trip(e: &Entry) {
    let Ok(bytes) = encode_entry(e) else { return };
    let le = LogEntry { index: e.index, term: e.term, data: bytes };
    let back = decode_entry(&le).expect("a log record written for an entry decodes");
    assert_eq!(back.get_entry_type(), e.get_entry_type(), "log record changed the entry type");
    assert_eq!((&back.data, &back.context), (&e.data, &e.context), "log record changed the entry");
}

/// The snapshot's layers, as `pipeline/src/store_ledger.rs` `decode_envelope` reads them.
fn snapshot_layers(data: &[u8], built: bool) {
    let env = tally_codec::decode::<SnapshotEnvelope>(data, SNAPSHOT_BYTES_MAX);
    assert!(!built || env.is_ok(), "a built snapshot envelope does not decode");
    let Ok(env) = env else { return };
    let state = tally_codec::decode::<StateSnapshot>(&env.state, SNAPSHOT_BYTES_MAX);
    assert!(!built || state.is_ok(), "a built snapshot state does not decode");
    let Ok(state) = state else { return };
    for (_, body) in &state.bodies {
        let _ = tally_codec::decode::<BatchBody>(body, tally_codec::limits::ENTRY_BYTES_MAX);
    }
}
