//! Client frames built by shape: `Submit` and relayed `Submit` of up to 16 generated requests,
//! plus small copies (up to 63, or 8,180 to 8,199 so the request count bound is met and passed:
//! counts in between cost time and test nothing the two ends do not), with maybe a
//! nested request spliced in; every other client message with generated fields. Then maybe
//! mutated. Decoded by `wire::decode_client`, as stage 1 does for every frame.
//!
//! Properties: a frame decodes to its value, or is refused for exactly the first bound it
//! breaks in decoding order (frame bytes, request count, a request's size or nesting); after a
//! mutation, no panic and canonical if accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::admin::{AdminCommand, AdminOp, AuditTable};
use tally_codec::wire::{self, ClientMessage, Envelope, Relayed, WatchFilter};
use tally_codec::{encode, limits, CodecError, DocKey, PublicKey, RequestId};
use tally_fuzz::batch::list;
use tally_fuzz::{check_any, check_decode, request_refusal, small_request, Budget, Deep, Mutation, Req, CLUSTER};

#[derive(arbitrary::Arbitrary, Debug)]
enum Msg {
    Submit { reqs: Vec<Req>, copies: u16, deep: Option<(Deep, u8)> },
    Forwarded { reqs: Vec<Req>, copies: u16, deep: Option<(Deep, u8)> },
    Get { key: [u8; 16], stale: bool },
    Balance { account: [u8; 32], stale: bool },
    Status,
    Receipt { id: [u8; 32] },
    ReceiptAt { id: [u8; 32], height: u64 },
    Batch { height: u64 },
    Watch { filter: u8, domain: String, from_height: u64, max_batches: u32, wait_ms: u32 },
    AuditPage { after: Option<Vec<u8>>, limit: u32, nonce: u64, documents: bool },
}

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    id: u64,
    msg: Msg,
    mutation: Mutation,
}

fuzz_target!(|input: Input| {
    let (value, mut bytes, refusal) = match &input.msg {
        Msg::Submit { reqs, copies, deep } => submit(input.id, reqs, *copies, deep, false),
        Msg::Forwarded { reqs, copies, deep } => submit(input.id, reqs, *copies, deep, true),
        other => {
            let env = Envelope { id: input.id, msg: simple(other) };
            let bytes = encode(&env);
            (Some(env), bytes, None)
        }
    };
    if input.mutation.apply(&mut bytes) {
        check_any(&bytes, wire::decode_client(&bytes));
        return;
    }
    let decoded = wire::decode_client(&bytes);
    match value {
        Some(env) => check_decode(&bytes, decoded, &env, refusal),
        None => assert_eq!(decoded.err(), refusal, "a spliced frame"),
    }
});

type Built = (Option<Envelope<ClientMessage>>, Vec<u8>, Option<CodecError>);

/// A (relayed) `Submit`, assembled item by item so a nested request can be spliced in.
fn submit(id: u64, reqs: &[Req], copies: u16, deep: &Option<(Deep, u8)>, relayed: bool) -> Built {
    let mut budget = Budget::default();
    let mut requests: Vec<_> = reqs.iter().take(16).map(|r| r.build(&mut budget)).collect();
    requests.extend((0..copies_count(copies)).map(small_request));
    let count = requests.len() + usize::from(deep.is_some());
    let items = requests.iter().map(|r| (encode(r), request_refusal(r))).collect();
    let value =
        if relayed { ClientMessage::Forwarded(Relayed::Submit(requests)) } else { ClientMessage::Submit(requests) };
    let env = Envelope { id, msg: value };
    let mut bytes = id.to_le_bytes().to_vec();
    let tags = encode(&if relayed {
        ClientMessage::Forwarded(Relayed::Submit(vec![]))
    } else {
        ClientMessage::Submit(vec![])
    });
    bytes.extend_from_slice(&tags[..tags.len() - 4]);
    let mut first = None;
    let spliced = deep.as_ref().map(|(d, at)| (d.request_bytes(), d.request_refusal(), *at));
    list(&mut bytes, items, spliced, &mut first);
    let refusal = if bytes.len() > limits::FRAME_BYTES_MAX {
        Some(CodecError::TooLarge { size: bytes.len(), max: limits::FRAME_BYTES_MAX })
    } else if count > limits::FRAME_REQUESTS_MAX {
        Some(CodecError::TooMany { count, max: limits::FRAME_REQUESTS_MAX, what: "requests in one frame" })
    } else {
        first
    };
    if deep.is_none() {
        assert_eq!(bytes, encode(&env), "the frame assembled item by item is the frame");
        return (Some(env), bytes, refusal);
    }
    (None, bytes, refusal)
}

/// How many small copies a frame carries: few, or (one input in sixteen) around
/// `FRAME_REQUESTS_MAX` (8,189).
fn copies_count(copies: u16) -> u64 {
    if copies >> 12 == 0xf {
        8180 + u64::from(copies % 20)
    } else {
        u64::from(copies % 64)
    }
}

fn simple(msg: &Msg) -> ClientMessage {
    match msg {
        Msg::Get { key, stale } => ClientMessage::Get { key: DocKey(*key), stale: *stale },
        Msg::Balance { account, stale } => ClientMessage::Balance { account: PublicKey(*account), stale: *stale },
        Msg::Status => ClientMessage::Status,
        Msg::Receipt { id } => ClientMessage::Receipt { id: RequestId(*id) },
        Msg::ReceiptAt { id, height } => ClientMessage::ReceiptAt { id: RequestId(*id), height: *height },
        Msg::Batch { height } => ClientMessage::Batch { height: *height },
        Msg::Watch { filter, domain, from_height, max_batches, wait_ms } => {
            let filter = match filter % 4 {
                0 => WatchFilter::Doc(DocKey([*filter; 16])),
                1 => WatchFilter::AllDocs,
                2 => WatchFilter::Domain(domain.clone()),
                _ => WatchFilter::Leases,
            };
            ClientMessage::Watch { filter, from_height: *from_height, max_batches: *max_batches, wait_ms: *wait_ms }
        }
        Msg::AuditPage { after, limit, nonce, documents } => {
            let admin = tally_fuzz::key(2);
            let table = if *documents { AuditTable::Documents } else { AuditTable::Accounts };
            let command = AdminCommand {
                cluster_id: CLUSTER,
                signer: PublicKey(admin.verifying_key().to_bytes()),
                nonce: *nonce,
                expires_at_ms: u64::MAX,
                op: AdminOp::AuditPage { table, after: after.clone(), limit: *limit },
            };
            ClientMessage::Admin(command.sign(admin))
        }
        Msg::Submit { .. } | Msg::Forwarded { .. } => unreachable!("built by submit()"),
    }
}
