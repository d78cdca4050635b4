//! Property tests for the canonical encoding: every type that crosses a trust boundary round
//! trips, and its decoder refuses every strict prefix (truncation) and every single appended
//! byte (trailing data). The frame decoders never panic on arbitrary bytes. Merkle proofs verify
//! for the leaf and index they were made for, and for nothing else.
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use borsh::{BorshDeserialize, BorshSerialize};
use proptest::collection::vec;
use proptest::prelude::*;
use std::fmt::Debug;
use tally_codec::merkle::{leaf_hash, verify_proof, Tree};
use tally_codec::wire::{
    self, AuditInfo, BatchInfo, ClientMessage, DocView, Envelope, MemberInfo, ServerMessage, StatusInfo, SubmitReply,
    WireError,
};
use tally_codec::{
    limits, BatchEntry, BatchHeader, ClusterId, Digest, DocKey, ErrorCode, Operation, Outcome, PublicKey, Receipt,
    Request, RequestId, Signature, SignedRequest, WriteOp, WriteSet,
};

// ---------------------------------------------------------------------------------------------
// Strategies.

fn bytes_n<const N: usize>() -> impl Strategy<Value = [u8; N]> {
    vec(any::<u8>(), N).prop_map(|v| v.try_into().unwrap())
}

fn digest() -> impl Strategy<Value = Digest> {
    bytes_n::<32>().prop_map(Digest)
}

fn public_key() -> impl Strategy<Value = PublicKey> {
    bytes_n::<32>().prop_map(PublicKey)
}

fn signature() -> impl Strategy<Value = Signature> {
    bytes_n::<64>().prop_map(Signature)
}

fn cluster_id() -> impl Strategy<Value = ClusterId> {
    bytes_n::<16>().prop_map(ClusterId)
}

/// Any 16 bytes: the codec carries non-UUID4 keys faithfully (stage 2 refuses them).
fn doc_key() -> impl Strategy<Value = DocKey> {
    bytes_n::<16>().prop_map(DocKey)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    prop::sample::select(vec![
        Malformed,
        BadSignature,
        WeakKey,
        Expired,
        ExpiryTooFar,
        NotUuid4,
        InvalidJson,
        ValueTooLarge,
        InsufficientFunds,
        ZeroAmount,
        TransferToSelf,
        NotOwner,
        NotFound,
        WrongCluster,
        NotLeader,
        Overloaded,
        Retry,
        TooManyRequests,
        Internal,
        LeaseNotFound,
        NotLeaseHolder,
        TtlOutOfRange,
        BadClaimDomain,
        BadTxn,
        LeaseFull,
        Compacted,
    ])
}

fn simple_operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        (doc_key(), vec(any::<u8>(), 0..200)).prop_map(|(key, value)| Operation::Set { key, value }),
        doc_key().prop_map(|key| Operation::Delete { key }),
        (public_key(), any::<u64>()).prop_map(|(to, amount)| Operation::Transfer { to, amount }),
        (doc_key(), vec(any::<u8>(), 0..64), prop::option::of(any::<u64>()), prop::option::of(any::<u64>()))
            .prop_map(|(key, value, if_revision, lease)| Operation::SetIf { key, value, if_revision, lease }),
        (doc_key(), prop::option::of(any::<u64>()))
            .prop_map(|(key, if_revision)| Operation::DeleteIf { key, if_revision }),
        any::<u64>().prop_map(|ttl_ms| Operation::LeaseGrant { ttl_ms }),
        any::<u64>().prop_map(|lease| Operation::LeaseKeepAlive { lease }),
        any::<u64>().prop_map(|lease| Operation::LeaseRevoke { lease }),
        (text(), any::<u64>(), prop::option::of(any::<u64>())).prop_map(|(domain, slot, lease)| Operation::Claim {
            domain,
            slot,
            lease
        }),
    ]
}

fn compare() -> impl Strategy<Value = tally_codec::Compare> {
    use tally_codec::Compare;
    prop_oneof![
        (doc_key(), any::<u64>()).prop_map(|(key, revision)| Compare::Revision { key, revision }),
        doc_key().prop_map(|key| Compare::Exists { key }),
        (public_key(), any::<u64>()).prop_map(|(account, amount)| Compare::BalanceAtLeast { account, amount }),
        any::<u64>().prop_map(|lease| Compare::LeaseAlive { lease }),
    ]
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        4 => simple_operation(),
        1 => (vec(compare(), 0..3), vec(simple_operation(), 0..3), vec(simple_operation(), 0..3)).prop_map(
            |(compares, then, otherwise)| Operation::Txn(tally_codec::Txn { compares, then, otherwise })
        ),
    ]
}

fn signed_request() -> impl Strategy<Value = SignedRequest> {
    (cluster_id(), public_key(), any::<u64>(), any::<u64>(), operation(), signature()).prop_map(
        |(cluster_id, signer, nonce, expires_at_ms, op, signature)| SignedRequest {
            request: Request { cluster_id, signer, nonce, expires_at_ms, op },
            signature,
        },
    )
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        any::<u64>().prop_map(|revision| Outcome::DocCreated { revision }),
        any::<u64>().prop_map(|revision| Outcome::DocUpdated { revision }),
        Just(Outcome::DocDeleted),
        any::<u64>().prop_map(|sender_balance| Outcome::Transferred { sender_balance }),
        error_code().prop_map(Outcome::Rejected),
        any::<u64>().prop_map(|current| Outcome::RevisionMismatch { current }),
        (any::<u64>(), any::<u64>()).prop_map(|(lease, expires_at_ms)| Outcome::LeaseGranted { lease, expires_at_ms }),
        any::<u64>().prop_map(|expires_at_ms| Outcome::LeaseRenewed { expires_at_ms }),
        Just(Outcome::LeaseRevoked),
        any::<u64>().prop_map(|height| Outcome::ClaimGranted { height }),
        (public_key(), any::<u64>()).prop_map(|(holder, height)| Outcome::ClaimDenied { holder, height }),
        (any::<bool>(), vec(any::<u64>().prop_map(|revision| Outcome::DocCreated { revision }), 0..3))
            .prop_map(|(then, outcomes)| Outcome::TxnApplied { then, outcomes }),
    ]
}

fn batch_header() -> impl Strategy<Value = BatchHeader> {
    (cluster_id(), any::<u64>(), digest(), digest(), any::<u32>(), digest(), digest(), any::<u64>(), any::<u64>())
        .prop_map(
            |(
                cluster_id,
                height,
                prev_hash,
                merkle_root,
                leaf_count,
                write_set_digest,
                state_digest,
                term,
                time_ms,
            )| {
                BatchHeader {
                    cluster_id,
                    height,
                    prev_hash,
                    merkle_root,
                    leaf_count,
                    write_set_digest,
                    state_digest,
                    term,
                    time_ms,
                }
            },
        )
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (signed_request(), outcome(), any::<u32>(), vec(digest(), 0..12), batch_header(), signature()).prop_map(
        |(request, outcome, leaf_index, proof, header, signature)| Receipt {
            request,
            outcome,
            leaf_index,
            proof,
            header,
            signature,
        },
    )
}

fn write_set() -> impl Strategy<Value = WriteSet> {
    vec(
        (vec(any::<u8>(), 0..48), prop::option::of(vec(any::<u8>(), 0..64)))
            .prop_map(|(key, value)| WriteOp { key, value }),
        0..8,
    )
    .prop_map(|ops| WriteSet { ops })
}

fn batch_entry() -> impl Strategy<Value = BatchEntry> {
    // Request and outcome counts are independent on purpose: the codec carries a mismatched
    // entry faithfully and `BatchEntry::check` is what refuses it.
    (batch_header(), vec(signed_request(), 0..4), vec(outcome(), 0..4), write_set())
        .prop_map(|(header, requests, outcomes, write_set)| BatchEntry { header, requests, outcomes, write_set })
}

/// Arbitrary strings, including multi-byte UTF-8.
fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        vec(signed_request(), 0..4).prop_map(ClientMessage::Submit),
        (doc_key(), any::<bool>()).prop_map(|(key, stale)| ClientMessage::Get { key, stale }),
        (public_key(), any::<bool>()).prop_map(|(account, stale)| ClientMessage::Balance { account, stale }),
        Just(ClientMessage::Status),
        bytes_n::<32>().prop_map(|id| ClientMessage::Receipt { id: RequestId(id) }),
        (any::<u64>(), text(), text()).prop_map(|(node_id, client_addr, peer_addr)| ClientMessage::ClusterAdd {
            node_id,
            client_addr,
            peer_addr
        }),
        any::<u64>().prop_map(|node_id| ClientMessage::ClusterRemove { node_id }),
        any::<u64>().prop_map(|height| ClientMessage::Batch { height }),
        Just(ClientMessage::Audit),
        (watch_filter(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(filter, from_height, max_batches, wait_ms)| ClientMessage::Watch {
                filter,
                from_height,
                max_batches,
                wait_ms
            }
        ),
    ]
}

fn watch_filter() -> impl Strategy<Value = tally_codec::wire::WatchFilter> {
    use tally_codec::wire::WatchFilter;
    prop_oneof![
        doc_key().prop_map(WatchFilter::Doc),
        Just(WatchFilter::AllDocs),
        text().prop_map(WatchFilter::Domain),
        Just(WatchFilter::Leases),
    ]
}

fn watch_page() -> impl Strategy<Value = tally_codec::wire::WatchPage> {
    use tally_codec::wire::{Change, WatchEvent, WatchPage};
    let change = prop_oneof![
        (doc_key(), public_key(), any::<u64>(), prop::option::of(any::<u64>()), vec(any::<u8>(), 0..32))
            .prop_map(|(key, owner, revision, lease, value)| Change::DocSet { key, owner, revision, lease, value }),
        doc_key().prop_map(|key| Change::DocDeleted { key }),
        (text(), any::<u64>(), public_key(), prop::option::of(any::<u64>()))
            .prop_map(|(domain, slot, holder, lease)| Change::ClaimGranted { domain, slot, holder, lease }),
        (text(), any::<u64>()).prop_map(|(domain, slot)| Change::ClaimReleased { domain, slot }),
        (any::<u64>(), public_key(), any::<u64>()).prop_map(|(lease, owner, expires_at_ms)| Change::LeaseSet {
            lease,
            owner,
            expires_at_ms
        }),
        any::<u64>().prop_map(|lease| Change::LeaseEnded { lease }),
    ];
    (vec((any::<u64>(), any::<u64>(), change), 0..4), any::<u64>()).prop_map(|(events, next_height)| WatchPage {
        events: events.into_iter().map(|(height, time_ms, change)| WatchEvent { height, time_ms, change }).collect(),
        next_height,
    })
}

/// Everything a client sends, plus one hop of forwarding (what a follower relays).
fn client_message_or_forwarded() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        3 => client_message(),
        1 => client_message().prop_map(|m| tally_codec::wire::Relayed::from_client(m).map_or_else(|m| m, ClientMessage::Forwarded)),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    (error_code(), text(), prop::option::of(text())).prop_map(|(code, message, leader_hint)| WireError {
        code,
        message,
        leader_hint,
    })
}

fn submit_reply() -> impl Strategy<Value = SubmitReply> {
    prop_oneof![
        (receipt(), any::<u8>()).prop_map(|(receipt, durable_replicas)| SubmitReply::Committed {
            receipt: Box::new(receipt),
            durable_replicas
        }),
        wire_error().prop_map(SubmitReply::Refused),
    ]
}

fn member_info() -> impl Strategy<Value = MemberInfo> {
    (any::<u64>(), text(), text(), any::<u64>(), any::<bool>()).prop_map(
        |(node_id, client_addr, peer_addr, matched_index, is_voter)| MemberInfo {
            node_id,
            client_addr,
            peer_addr,
            matched_index,
            is_voter,
        },
    )
}

fn status_info() -> impl Strategy<Value = StatusInfo> {
    (
        (any::<u64>(), cluster_id(), public_key(), prop::option::of(any::<u64>()), prop::option::of(text())),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()),
        (vec(member_info(), 0..4), vec(text(), 0..3), any::<u64>()),
    )
        .prop_map(
            |(
                (node_id, cluster_id, operator_key, leader_id, leader_addr),
                (term, committed_height, applied_height, replicas_configured),
                (members, warnings, time_ms),
            )| StatusInfo {
                node_id,
                cluster_id,
                operator_key,
                leader_id,
                leader_addr,
                term,
                committed_height,
                applied_height,
                replicas_configured,
                members,
                warnings,
                time_ms,
            },
        )
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        vec(submit_reply(), 0..3).prop_map(ServerMessage::Submitted),
        prop::option::of(
            (public_key(), any::<u64>(), vec(any::<u8>(), 0..64)).prop_map(|(owner, revision, value)| DocView {
                owner,
                revision,
                value
            })
        )
        .prop_map(ServerMessage::Doc),
        prop::option::of(any::<u64>()).prop_map(ServerMessage::Balance),
        status_info().prop_map(ServerMessage::Status),
        prop::option::of(receipt().prop_map(Box::new)).prop_map(ServerMessage::Receipt),
        prop::option::of(
            (batch_header(), signature(), any::<bool>(), vec(bytes_n::<32>(), 0..4), vec(outcome(), 0..4)).prop_map(
                |(header, signature, body_available, ids, outcomes)| BatchInfo {
                    header,
                    signature,
                    body_available,
                    request_ids: ids.into_iter().map(RequestId).collect(),
                    outcomes,
                }
            )
        )
        .prop_map(ServerMessage::Batch),
        (any::<u64>(), digest(), any::<u64>(), any::<u128>(), any::<u64>()).prop_map(
            |(applied_height, state_digest, accounts, balance_total, documents)| ServerMessage::Audit(AuditInfo {
                applied_height,
                state_digest,
                accounts,
                balance_total,
                documents
            })
        ),
        Just(ServerMessage::Done),
        wire_error().prop_map(ServerMessage::Error),
        watch_page().prop_map(ServerMessage::Watched),
    ]
}

// ---------------------------------------------------------------------------------------------
// The round-trip property.

/// encode → decode is the identity; every strict prefix and every one-byte extension is refused.
fn check_round_trip<T, E>(value: &T, decode: impl Fn(&[u8]) -> Result<T, E>) -> Result<(), TestCaseError>
where
    T: BorshSerialize + PartialEq + Debug,
    E: Debug,
{
    let bytes = tally_codec::encode(value);
    let back = decode(&bytes);
    prop_assert!(back.is_ok(), "decode of a fresh encoding failed: {:?}", back.err());
    prop_assert_eq!(&back.unwrap(), value);
    for cut in 0..bytes.len() {
        prop_assert!(decode(&bytes[..cut]).is_err(), "prefix of {} of {} bytes decoded", cut, bytes.len());
    }
    for extra in [0x00u8, 0x01, 0x7f, 0xff] {
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert!(decode(&longer).is_err(), "trailing byte {:#04x} accepted", extra);
    }
    Ok(())
}

fn generic<T: BorshDeserialize>(bytes: &[u8]) -> Result<T, tally_codec::CodecError> {
    tally_codec::decode(bytes, limits::ENTRY_BYTES_MAX)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn signed_request_round_trips(r in signed_request()) {
        check_round_trip(&r, SignedRequest::decode)?;
        // `SignedRequest::encode` is the same bytes as the generic encoder.
        prop_assert_eq!(r.encode(), tally_codec::encode(&r));
    }

    #[test]
    fn batch_header_round_trips(h in batch_header()) {
        check_round_trip(&h, generic::<BatchHeader>)?;
    }

    #[test]
    fn receipt_round_trips(r in receipt()) {
        check_round_trip(&r, generic::<Receipt>)?;
    }

    #[test]
    fn batch_entry_round_trips(e in batch_entry()) {
        check_round_trip(&e, generic::<BatchEntry>)?;
    }

    #[test]
    fn write_set_round_trips(w in write_set()) {
        check_round_trip(&w, generic::<WriteSet>)?;
    }

    #[test]
    fn client_envelope_round_trips(id in any::<u64>(), msg in client_message_or_forwarded()) {
        check_round_trip(&Envelope { id, msg }, wire::decode_client)?;
    }

    #[test]
    fn server_envelope_round_trips(id in any::<u64>(), msg in server_message()) {
        check_round_trip(&Envelope { id, msg }, wire::decode_server)?;
    }

    /// Framing round trips too: write_frame then read_frame gives back the body, and a
    /// truncated stream is an error, never a short body.
    #[test]
    fn frames_round_trip(id in any::<u64>(), msg in client_message()) {
        let body = tally_codec::encode(&Envelope { id, msg });
        let mut stream = Vec::new();
        wire::write_frame(&mut stream, &body).unwrap();
        let mut buf = Vec::new();
        let mut cursor = std::io::Cursor::new(&stream);
        prop_assert!(wire::read_frame(&mut cursor, &mut buf, limits::FRAME_BYTES_MAX).unwrap());
        prop_assert_eq!(&buf, &body);
        prop_assert!(!wire::read_frame(&mut cursor, &mut buf, limits::FRAME_BYTES_MAX).unwrap());
        for cut in 1..stream.len() {
            let mut cursor = std::io::Cursor::new(&stream[..cut]);
            prop_assert!(wire::read_frame(&mut cursor, &mut buf, limits::FRAME_BYTES_MAX).is_err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary bytes.

/// Successful decodes of arbitrary bytes must be canonical: re-encoding gives the input back.
fn assert_canonical<T: BorshSerialize>(input: &[u8], decoded: &T) -> Result<(), TestCaseError> {
    prop_assert_eq!(tally_codec::encode(decoded), input, "non-canonical decode accepted");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn decode_client_never_panics(bytes in vec(any::<u8>(), 0..2048)) {
        if let Ok(env) = wire::decode_client(&bytes) {
            assert_canonical(&bytes, &env)?;
        }
    }

    /// Random bytes rarely get past the first tag; seeding with a valid prefix reaches deeper.
    #[test]
    fn decode_client_never_panics_after_valid_prefix(
        id in any::<u64>(),
        tag in 0u8..10,
        tail in vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = id.to_le_bytes().to_vec();
        bytes.push(tag);
        bytes.extend_from_slice(&tail);
        if let Ok(env) = wire::decode_client(&bytes) {
            assert_canonical(&bytes, &env)?;
        }
    }

    #[test]
    fn decode_server_never_panics(bytes in vec(any::<u8>(), 0..2048)) {
        if let Ok(env) = wire::decode_server(&bytes) {
            assert_canonical(&bytes, &env)?;
        }
    }

    #[test]
    fn decode_request_never_panics(bytes in vec(any::<u8>(), 0..512)) {
        if let Ok(r) = SignedRequest::decode(&bytes) {
            assert_canonical(&bytes, &r)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Merkle.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn merkle_proofs_verify_only_their_leaf(n in 1usize..300, seed in any::<u64>()) {
        let leaves: Vec<[u8; 32]> = (0..n as u64)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&seed.to_le_bytes());
                id[8..16].copy_from_slice(&i.to_le_bytes());
                let outcome = if i % 3 == 0 {
                    Outcome::Rejected(ErrorCode::InsufficientFunds)
                } else {
                    Outcome::Transferred { sender_balance: i }
                };
                leaf_hash(&RequestId(id), &outcome)
            })
            .collect();
        let tree = Tree::from_leaves(&leaves);
        let root = tree.root();
        for i in 0..n {
            let proof = tree.proof(i);
            prop_assert!(verify_proof(&root, i, leaves[i], n, &proof), "n={} i={}", n, i);
            // Wrong index, same leaf and proof.
            let j = (i + 1 + (seed as usize % n.max(2))) % n;
            if j != i {
                prop_assert!(!verify_proof(&root, j, leaves[i], n, &proof), "n={} proof {} verified at {}", n, i, j);
                // Another leaf at this index with this proof.
                prop_assert!(!verify_proof(&root, i, leaves[j], n, &proof), "n={} leaf {} verified at {}", n, j, i);
            }
            // (A wrong leaf count is not checked: a proof for n leaves can also fit a tree of n + 1
            // whose extra leaf is promoted. The count is bound by the signed header instead.)
            // A single flipped bit anywhere in the proof.
            if let Some(first) = proof.first() {
                let mut bad = proof.clone();
                bad[0] = Digest({ let mut b = first.0; b[31] ^= 0x80; b });
                prop_assert!(!verify_proof(&root, i, leaves[i], n, &bad));
            }
        }
    }
}
