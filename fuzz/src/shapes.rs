//! Byte shapes no value can be, and the mutations that turn a valid encoding into a near-valid
//! one.

use arbitrary::Arbitrary;
use tally_codec::{encode, limits, CodecError, Compare, DocKey, Operation, Outcome, Txn};

/// Deepest nesting a shape is built with (the attack used 5,000; 100,000 fits in one frame).
pub const DEEP_LEVELS_MAX: usize = 200_000;
/// Largest shape in bytes: it must fit a frame, and build in a few milliseconds.
pub const DEEP_BYTES_MAX: usize = 4 << 20;

/// Which recursive field the shape nests through.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepKind {
    /// `Operation::Txn` in a `Txn`'s `then`.
    Then,
    /// `Operation::Txn` in a `Txn`'s `otherwise`.
    Otherwise,
    /// `Outcome::TxnApplied` in a `TxnApplied`'s `outcomes`.
    Outcome,
}

/// A value nested `levels()` deep (2 to 200,000: always over `NESTING_DEPTH_MAX`), each level
/// with a few comparisons and sibling items beside the nested one, as bytes.
#[derive(Arbitrary, Debug, Clone)]
pub struct Deep {
    pub kind: DeepKind,
    depth: u32,
    compares: u8,
    siblings: u8,
}

impl Deep {
    fn compares(&self) -> usize {
        usize::from(self.compares % 8)
    }

    /// Below `TXN_ITEMS_MAX`, so an outcome level's count stays within its bound and the depth
    /// is what breaks.
    fn siblings(&self) -> usize {
        usize::from(self.siblings) % limits::TXN_ITEMS_MAX
    }

    fn level_bytes(&self) -> usize {
        13 + 17 * (self.compares() + self.siblings())
    }

    /// How many levels the shape has: the top five bits of `depth` pick a scale, so shallow
    /// shapes (2, 3, 100 levels) are as likely as those of the attack (thousands) and beyond.
    pub fn levels(&self) -> usize {
        let scaled = (self.depth & 0x07ff_ffff) >> (self.depth >> 27);
        let levels = 2 + scaled as usize % (DEEP_LEVELS_MAX - 1);
        levels.min(DEEP_BYTES_MAX / self.level_bytes()).max(2)
    }

    /// The refusal its decoding must end in where its kind puts it: an outcome for
    /// `DeepKind::Outcome`, a request otherwise.
    pub fn refusal(&self) -> CodecError {
        if self.kind == DeepKind::Outcome {
            CodecError::TooDeep { what: "transaction outcome", max: limits::NESTING_DEPTH_MAX }
        } else {
            self.request_refusal()
        }
    }

    /// The refusal of [`Deep::request_bytes`], whatever the kind.
    pub fn request_refusal(&self) -> CodecError {
        CodecError::TooDeep { what: "transaction", max: limits::NESTING_DEPTH_MAX }
    }

    /// An `Operation` nested through `then` or `otherwise` (for `DeepKind::Outcome`, through
    /// `then`).
    pub fn operation_bytes(&self) -> Vec<u8> {
        let txn_tag = encode(&Operation::Txn(Txn { compares: vec![], then: vec![], otherwise: vec![] }))[0];
        let compare = encode(&Compare::Exists { key: DocKey([0x44; 16]) });
        let sibling = encode(&Operation::Delete { key: DocKey([0x55; 16]) });
        let (n, c, s) = (self.levels(), self.compares(), self.siblings());
        // One level's bytes, repeated by `slice::repeat` (in std, so not instrumented): a loop
        // here, traced compare by compare, took most of each execution.
        let mut level = Vec::with_capacity(self.level_bytes());
        level.push(txn_tag);
        level.extend_from_slice(&(c as u32).to_le_bytes());
        level.extend_from_slice(&compare.repeat(c));
        if self.kind == DeepKind::Otherwise {
            level.extend_from_slice(&(s as u32).to_le_bytes());
            level.extend_from_slice(&sibling.repeat(s));
            level.extend_from_slice(&1u32.to_le_bytes());
        } else {
            level.extend_from_slice(&(s as u32 + 1).to_le_bytes());
            level.extend_from_slice(&sibling.repeat(s));
        }
        let mut out = level.repeat(n - 1);
        out.push(txn_tag);
        out.extend_from_slice(&[0; 12]);
        if self.kind != DeepKind::Otherwise {
            out.extend_from_slice(&0u32.to_le_bytes().repeat(n - 1));
        }
        out
    }

    /// A whole signed request whose operation is [`Deep::operation_bytes`].
    pub fn request_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&crate::CLUSTER.0);
        out.extend_from_slice(&[0x22; 32]);
        out.extend_from_slice(&7u64.to_le_bytes());
        out.extend_from_slice(&u64::MAX.to_le_bytes());
        out.extend_from_slice(&self.operation_bytes());
        out.extend_from_slice(&[0x33; 64]);
        out
    }

    /// An `Outcome::TxnApplied` nested through `outcomes`.
    pub fn outcome_bytes(&self) -> Vec<u8> {
        let tag = encode(&Outcome::TxnApplied { then: true, outcomes: vec![] })[0];
        let sibling = encode(&Outcome::DocDeleted);
        let (n, s) = (self.levels(), self.siblings());
        let mut level = vec![tag, 1];
        level.extend_from_slice(&(s as u32 + 1).to_le_bytes());
        level.extend_from_slice(&sibling.repeat(s));
        let mut out = level.repeat(n - 1);
        out.extend_from_slice(&[tag, 1, 0, 0, 0, 0]);
        out
    }
}

/// A last change to the encoded bytes.
#[derive(Arbitrary, Debug, Clone)]
pub enum Mutation {
    None,
    Flip {
        at: u32,
        xor: u8,
    },
    Cut {
        at: u32,
    },
    Insert {
        at: u32,
        bytes: Vec<u8>,
    },
    Append(Vec<u8>),
    /// Overwrites four bytes: a length or count made to lie.
    SetU32 {
        at: u32,
        value: u32,
    },
}

impl Mutation {
    /// Applies the mutation; whether the bytes changed.
    pub fn apply(&self, bytes: &mut Vec<u8>) -> bool {
        let before = bytes.len();
        let pos = |at: u32, len: usize| if len == 0 { 0 } else { at as usize % len };
        match self {
            Mutation::None => false,
            Mutation::Flip { at, xor } => {
                if bytes.is_empty() || *xor == 0 {
                    return false;
                }
                let i = pos(*at, before);
                bytes[i] ^= xor;
                true
            }
            Mutation::Cut { at } => {
                bytes.truncate(pos(*at, before));
                bytes.len() != before
            }
            Mutation::Insert { at, bytes: ins } => {
                let i = pos(*at, before + 1);
                bytes.splice(i..i, ins.iter().copied());
                !ins.is_empty()
            }
            Mutation::Append(extra) => {
                bytes.extend_from_slice(extra);
                !extra.is_empty()
            }
            Mutation::SetU32 { at, value } => {
                if before < 4 {
                    return false;
                }
                let i = pos(*at, before - 3);
                let old: [u8; 4] = bytes[i..i + 4].try_into().expect("four bytes");
                bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
                old != value.to_le_bytes()
            }
        }
    }
}
