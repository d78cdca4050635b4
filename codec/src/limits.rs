//! Every frame, value and collection that crosses a trust boundary has a bound.

/// Largest frame body accepted on any port (client or peer).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest JSON document value (DESIGN.md §3).
pub const VALUE_BYTES_MAX: usize = 64 * 1024;
/// Most independently signed requests in one client frame (TigerBeetle's 8,189).
pub const FRAME_REQUESTS_MAX: usize = 8189;
/// Largest encoded signed request: a maximal document plus fixed fields.
pub const REQUEST_BYTES_MAX: usize = VALUE_BYTES_MAX + 256;
/// Largest Raft entry / log record (one batch).
pub const ENTRY_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Longest Merkle proof we accept (2^64 leaves is far beyond any batch).
pub const PROOF_HASHES_MAX: usize = 64;
/// Largest state snapshot a replica sends or assembles (streamed in chunks, never one frame);
/// the envelope holds it as a borsh `Vec<u8>`, whose length is a `u32`.
pub const SNAPSHOT_BYTES_MAX: usize = u32::MAX as usize - 1024 * 1024;
/// Bytes of snapshot per peer frame: small enough that heartbeats between chunks stay timely.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
