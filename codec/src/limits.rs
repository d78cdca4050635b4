//! Every frame, value and collection that crosses a trust boundary has a bound.

/// Largest frame body accepted on any port (client or peer).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest JSON document value (`docs/protocol.md`, `ValueTooLarge`; `docs/security.md`, "Limits").
pub const VALUE_BYTES_MAX: usize = 64 * 1024;
/// Most independently signed requests in one client frame (TigerBeetle's 8,189).
pub const FRAME_REQUESTS_MAX: usize = 8189;
/// Largest encoded signed request (69,632 bytes): a maximal document plus fixed fields, or a
/// transaction whose values together fit the same bound (plus its comparisons). Enforced as the
/// request is decoded, wherever it is embedded (a frame, a relayed frame, a batch, a receipt),
/// and again by stage 2 (`RequestTooLarge`).
pub const REQUEST_BYTES_MAX: usize = VALUE_BYTES_MAX + 4096;
/// Largest encoded signed request inside a committed batch (a Raft entry, a stored body): a
/// frame's size. New requests are refused past [`REQUEST_BYTES_MAX`] wherever they arrive, but
/// a store written before that bound was enforced may hold larger ones (a transaction of several
/// documents), and its history must still replay and serve receipts.
pub const COMMITTED_REQUEST_BYTES_MAX: usize = FRAME_BYTES_MAX;
/// Levels of transaction a value may nest: 1, since a transaction may not hold a transaction
/// (its `then` / `otherwise` operations, and a `TxnApplied`'s outcomes, are never transactions).
/// Decoding refuses a deeper value before reading any of its nested part, so no input can make a
/// decoder recurse.
pub const NESTING_DEPTH_MAX: usize = 1;
/// Most requests one batch may hold: a lease id is `height << 20 | position in the batch`.
pub const BATCH_REQUESTS_MAX: usize = 1 << 20;
/// Most comparisons, and most operations per branch, in one transaction.
pub const TXN_ITEMS_MAX: usize = 32;
/// Shortest and longest lease TTL: longer than a few batch intervals, at most a day.
pub const LEASE_TTL_MIN_MS: u64 = 500;
pub const LEASE_TTL_MAX_MS: u64 = 24 * 3600 * 1000;
/// Longest claim domain name (bytes of `[A-Za-z0-9._:/-]`).
pub const CLAIM_DOMAIN_BYTES_MAX: usize = 64;
/// Most documents and claims attached to one lease.
pub const LEASE_ATTACHED_MAX: usize = 1024;
/// Largest Raft entry / log record (one batch).
pub const ENTRY_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Longest Merkle proof we accept (2^64 leaves is far beyond any batch), refused on the count.
pub const PROOF_HASHES_MAX: usize = 64;
/// Largest encoded receipt (73,728 bytes): a request of [`REQUEST_BYTES_MAX`], the largest
/// outcome (a `TxnApplied` of [`TXN_ITEMS_MAX`] outcomes of at most 41 bytes: 1,318 bytes), a
/// proof of [`PROOF_HASHES_MAX`] hashes (2,052 bytes), the 172-byte header, the leaf index and
/// the operator's signature: 73,242 bytes at most.
pub const RECEIPT_BYTES_MAX: usize = REQUEST_BYTES_MAX + 4096;
/// Largest state snapshot a replica sends or assembles (streamed in chunks, never one frame);
/// the envelope holds it as a borsh `Vec<u8>`, whose length is a `u32`.
pub const SNAPSHOT_BYTES_MAX: usize = u32::MAX as usize - 1024 * 1024;
/// Bytes of snapshot per peer frame: small enough that heartbeats between chunks stay timely.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
