//! Seeded random inputs and mutations shared by the stable smoke fuzzers (`cargo test`):
//! `codec/tests/fuzz_smoke.rs`, and through `#[path]` the smoke fuzzers of the crates that own
//! the other socket-facing decoders (`failover/tests/fuzz_smoke.rs`, `client/tests/fuzz_smoke.rs`).
//! Each test uses only some of it.
#![allow(dead_code)]

use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{
    limits, BatchEntry, BatchHeader, ClusterId, Digest, DocKey, ErrorCode, Operation, Outcome, PublicKey, Receipt,
    Request, Signature, SignedRequest, WriteOp, WriteSet,
};

/// SplitMix64: tiny, seedable, good enough to drive mutations. One seed replays one run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.next_u64() as u8;
        }
        out
    }
    pub fn vec(&mut self, len_max: usize) -> Vec<u8> {
        let len = self.below(len_max + 1);
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
    /// Mostly small numbers, sometimes extremes: the values decoders branch on.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(4) as u64,
            1 => u64::MAX - self.below(2) as u64,
            _ => self.next_u64(),
        }
    }
    pub fn text(&mut self) -> String {
        const PIECES: &[&str] = &["127.0.0.1:7000", "a", "", "é", "日本", "🦀", "\u{0}", "leader"];
        (0..self.below(4)).map(|_| PIECES[self.below(PIECES.len())]).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Valid values.

pub fn error_code(rng: &mut Rng) -> ErrorCode {
    const CODES: &[ErrorCode] = &[
        ErrorCode::Malformed,
        ErrorCode::BadSignature,
        ErrorCode::InsufficientFunds,
        ErrorCode::NotLeader,
        ErrorCode::Retry,
        ErrorCode::Internal,
    ];
    CODES[rng.below(CODES.len())]
}

pub fn request(rng: &mut Rng) -> SignedRequest {
    let op = match rng.below(3) {
        0 => Operation::Set { key: DocKey::from_random(rng.bytes()), value: rng.vec(96) },
        1 => Operation::Delete { key: DocKey(rng.bytes()) },
        _ => Operation::Transfer { to: PublicKey(rng.bytes()), amount: rng.interesting_u64() },
    };
    SignedRequest {
        request: Request {
            cluster_id: ClusterId(rng.bytes()),
            signer: PublicKey(rng.bytes()),
            nonce: rng.interesting_u64(),
            expires_at_ms: rng.interesting_u64(),
            op,
        },
        signature: Signature(rng.bytes()),
    }
}

pub fn outcome(rng: &mut Rng) -> Outcome {
    match rng.below(5) {
        0 => Outcome::DocCreated { revision: rng.interesting_u64() },
        1 => Outcome::DocUpdated { revision: rng.interesting_u64() },
        2 => Outcome::DocDeleted,
        3 => Outcome::Transferred { sender_balance: rng.interesting_u64() },
        _ => Outcome::Rejected(error_code(rng)),
    }
}

pub fn header(rng: &mut Rng) -> BatchHeader {
    BatchHeader {
        cluster_id: ClusterId(rng.bytes()),
        height: rng.interesting_u64(),
        prev_hash: Digest(rng.bytes()),
        merkle_root: Digest(rng.bytes()),
        leaf_count: rng.interesting_u64() as u32,
        write_set_digest: Digest(rng.bytes()),
        state_digest: Digest(rng.bytes()),
        term: rng.interesting_u64(),
        time_ms: rng.interesting_u64(),
    }
}

pub fn receipt(rng: &mut Rng) -> Receipt {
    Receipt {
        request: request(rng),
        outcome: outcome(rng),
        leaf_index: rng.interesting_u64() as u32,
        proof: (0..rng.below(6)).map(|_| Digest(rng.bytes())).collect(),
        header: header(rng),
        signature: Signature(rng.bytes()),
    }
}

/// A batch entry; consistent with its header (leaf count, Merkle root, write-set digest) unless
/// `consistent` is false, when the header is random.
pub fn batch_entry(rng: &mut Rng, consistent: bool) -> BatchEntry {
    let n = rng.below(4);
    let requests: Vec<SignedRequest> = (0..n).map(|_| request(rng)).collect();
    let outcomes: Vec<Outcome> = (0..n).map(|_| outcome(rng)).collect();
    let write_set = WriteSet {
        ops: (0..rng.below(3))
            .map(|_| WriteOp { key: rng.vec(40), value: rng.chance(3).then(|| rng.vec(40)).or(Some(Vec::new())) })
            .collect(),
    };
    let mut header = header(rng);
    if consistent {
        let leaves: Vec<[u8; 32]> = requests.iter().zip(&outcomes).map(|(r, o)| leaf_hash(&r.id(), o)).collect();
        header.leaf_count = n as u32;
        header.merkle_root = Tree::from_leaves(&leaves).root();
        header.write_set_digest = write_set.digest();
    }
    BatchEntry { header, requests, outcomes, write_set }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Offsets of 4-byte windows that could be borsh length prefixes: their little-endian value fits
/// in the bytes after them. Real length fields are always among them.
pub fn length_candidates(bytes: &[u8]) -> Vec<usize> {
    (0..bytes.len().saturating_sub(3))
        .filter(|&i| {
            let v = u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
            v <= bytes.len() - i - 4
        })
        .collect()
}

pub fn tamper_length(rng: &mut Rng, bytes: &mut [u8]) {
    let candidates = length_candidates(bytes);
    if candidates.is_empty() {
        return;
    }
    let at = candidates[rng.below(candidates.len())];
    let old = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let new = match rng.below(9) {
        0 => old.wrapping_add(1),
        1 => old.wrapping_sub(1),
        2 => 0,
        3 => old.wrapping_mul(2),
        4 => u32::MAX,
        5 => 0x8000_0000,
        6 => (limits::FRAME_REQUESTS_MAX + 1) as u32,
        7 => limits::FRAME_BYTES_MAX as u32 + 1,
        _ => rng.next_u64() as u32,
    };
    bytes[at..at + 4].copy_from_slice(&new.to_le_bytes());
}

/// One input: random bytes, or a valid encoding (from `valid`) mutated zero or more times.
/// Returns the bytes and whether they are exactly a valid encoding.
pub fn input(rng: &mut Rng, valid: &mut dyn FnMut(&mut Rng) -> Vec<u8>) -> (Vec<u8>, bool) {
    if rng.chance(8) {
        return (rng.vec(1024), false);
    }
    let mut bytes = valid(rng);
    if rng.chance(8) {
        return (bytes, true);
    }
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    if !bytes.is_empty() {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= 1 << rng.below(8);
                    }
                }
            }
            1 => {
                let cut = rng.below(bytes.len() + 1);
                bytes.truncate(cut);
            }
            2 => tamper_length(rng, &mut bytes),
            3 => {
                let at = rng.below(bytes.len() + 1);
                let extra = rng.vec(8);
                bytes.splice(at..at, extra);
            }
            4 => {
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    let n = 1 + rng.below((bytes.len() - at).min(16));
                    bytes.drain(at..at + n);
                }
            }
            5 => {
                // Splice: head of this one, tail of another valid encoding.
                let other = valid(rng);
                let cut = rng.below(bytes.len() + 1);
                let from = rng.below(other.len() + 1);
                bytes.truncate(cut);
                bytes.extend_from_slice(&other[from..]);
            }
            _ => bytes.push(rng.next_u64() as u8),
        }
    }
    (bytes, false)
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// With `TALLY_FUZZ_WRITE_SEEDS=<dir>` set, writes `n` valid inputs from `valid` to
/// `<dir>/<target>/seed-<i>` (starting corpora for the cargo-fuzz target of that name) and
/// returns true.
pub fn write_seeds(target: &str, n: usize, rng: &mut Rng, valid: &mut dyn FnMut(&mut Rng) -> Vec<u8>) -> bool {
    let Ok(dir) = std::env::var("TALLY_FUZZ_WRITE_SEEDS") else { return false };
    let dir = std::path::Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).expect("create the seed directory");
    for i in 0..n {
        std::fs::write(dir.join(format!("seed-{i:03}")), valid(rng)).expect("write a seed");
    }
    println!("wrote {n} seeds to {}", dir.display());
    true
}
