//! Domain-separated Merkle trees over (request id, outcome) leaves, built with rs_merkle.
//! Leaves are blake3(0x00 ‖ id ‖ borsh(outcome)); inner nodes blake3(0x01 ‖ left ‖ right); an odd
//! node at the end of a level is promoted unchanged (rs_merkle's rule). The leaf count is in the
//! header, so trees of different sizes can't be confused.

use crate::{encode, Digest, Outcome, RequestId};
use rs_merkle::{Hasher, MerkleProof, MerkleTree};

/// rs_merkle hasher with our node domain byte.
#[derive(Clone, Copy, Debug)]
pub struct NodeHasher;

impl Hasher for NodeHasher {
    type Hash = [u8; 32];

    fn hash(data: &[u8]) -> [u8; 32] {
        *blake3::hash(data).as_bytes()
    }

    fn concat_and_hash(left: &[u8; 32], right: Option<&[u8; 32]>) -> [u8; 32] {
        match right {
            Some(r) => {
                let mut h = blake3::Hasher::new();
                h.update(&[0x01]);
                h.update(left);
                h.update(r);
                *h.finalize().as_bytes()
            }
            None => *left,
        }
    }
}

pub fn leaf_hash(id: &RequestId, outcome: &Outcome) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[0x00]);
    h.update(&id.0);
    h.update(&encode(outcome));
    *h.finalize().as_bytes()
}

/// A built tree; keeps the levels so proofs are cheap.
pub struct Tree {
    inner: MerkleTree<NodeHasher>,
    leaf_count: usize,
}

impl Tree {
    pub fn from_leaves(leaves: &[[u8; 32]]) -> Self {
        Tree { inner: MerkleTree::<NodeHasher>::from_leaves(leaves), leaf_count: leaves.len() }
    }

    /// The root; all zeros for an empty tree.
    pub fn root(&self) -> Digest {
        Digest(self.inner.root().unwrap_or([0; 32]))
    }

    /// Sibling hashes from leaf `index` up to the root.
    ///
    /// # Panics
    /// If `index` is out of range (an invariant of the caller).
    pub fn proof(&self, index: usize) -> Vec<Digest> {
        assert!(index < self.leaf_count, "proof index {index} out of {} leaves", self.leaf_count);
        self.inner.proof(&[index]).proof_hashes().iter().map(|h| Digest(*h)).collect()
    }
}

/// The exact number of sibling hashes in the proof of leaf `index` in a tree of `leaf_count`
/// leaves, or `None` when `index` is out of range.
///
/// Walking up from the leaf, each level contributes one hash if the node there has a sibling;
/// the last node of a level with an odd count has none (it is promoted unchanged), so it
/// contributes nothing. This is the length [`Tree::proof`] produces, and the only length
/// [`verify_proof`] accepts: rs_merkle itself ignores hashes beyond the ones it needs, which
/// would give one receipt many byte forms.
pub fn proof_len(index: usize, leaf_count: usize) -> Option<usize> {
    if index >= leaf_count {
        return None;
    }
    let (mut index, mut count, mut len) = (index, leaf_count, 0);
    while count > 1 {
        if index ^ 1 < count {
            len += 1;
        }
        index /= 2;
        count = count.div_ceil(2);
    }
    Some(len)
}

/// Checks that `leaf` sits at `index` in a tree of `leaf_count` leaves with `root`, with a proof
/// of exactly [`proof_len`] hashes.
pub fn verify_proof(root: &Digest, index: usize, leaf: [u8; 32], leaf_count: usize, proof: &[Digest]) -> bool {
    if proof_len(index, leaf_count) != Some(proof.len()) || proof.len() > crate::limits::PROOF_HASHES_MAX {
        return false;
    }
    let hashes: Vec<[u8; 32]> = proof.iter().map(|d| d.0).collect();
    MerkleProof::<NodeHasher>::new(hashes).verify(root.0, &[index], &[leaf], leaf_count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| {
                let outcome = if i % 3 == 0 {
                    Outcome::Rejected(ErrorCode::InsufficientFunds)
                } else {
                    Outcome::Transferred { sender_balance: i as u64 }
                };
                leaf_hash(&RequestId([i as u8; 32]), &outcome)
            })
            .collect()
    }

    #[test]
    fn every_leaf_proves_and_tampering_fails() {
        for n in [1usize, 2, 3, 5, 8, 13, 100] {
            let l = leaves(n);
            let t = Tree::from_leaves(&l);
            for i in 0..n {
                let p = t.proof(i);
                assert!(verify_proof(&t.root(), i, l[i], n, &p), "n={n} i={i}");
                let mut bad = l[i];
                bad[0] ^= 1;
                assert!(!verify_proof(&t.root(), i, bad, n, &p));
                if n > 1 {
                    assert!(!verify_proof(&t.root(), (i + 1) % n, l[i], n, &p) || l[i] == l[(i + 1) % n]);
                }
            }
        }
    }

    /// The proof fold as docs/receipt-format.md describes it, written without rs_merkle.
    fn fold(leaf: [u8; 32], index: usize, leaf_count: usize, proof: &[Digest]) -> Option<[u8; 32]> {
        let (mut node, mut index, mut count) = (leaf, index, leaf_count);
        let mut hashes = proof.iter();
        while count > 1 {
            let sibling = index ^ 1;
            if sibling < count {
                let s = hashes.next()?.0;
                node = if index % 2 == 0 {
                    NodeHasher::concat_and_hash(&node, Some(&s))
                } else {
                    NodeHasher::concat_and_hash(&s, Some(&node))
                };
            }
            index /= 2;
            count = count.div_ceil(2);
        }
        hashes.next().is_none().then_some(node)
    }

    /// Exhaustive over 1..=300 leaves and every index: `proof_len` is the length `Tree::proof`
    /// produces, the documented fold reaches the root, and one hash more or less is refused.
    #[test]
    fn proof_len_is_exact_for_every_leaf_of_every_tree_up_to_300() {
        for n in 1..=300usize {
            let l = leaves(n);
            let t = Tree::from_leaves(&l);
            let root = t.root();
            for (i, &leaf) in l.iter().enumerate() {
                let p = t.proof(i);
                assert_eq!(proof_len(i, n), Some(p.len()), "n={n} i={i}");
                assert_eq!(fold(leaf, i, n, &p), Some(root.0), "n={n} i={i}: documented fold");
                assert!(verify_proof(&root, i, leaf, n, &p), "n={n} i={i}");
                let mut longer = p.clone();
                longer.push(p.first().copied().unwrap_or(Digest::ZERO));
                assert!(!verify_proof(&root, i, leaf, n, &longer), "n={n} i={i}: one hash appended");
                if let Some((_, shorter)) = p.split_last() {
                    assert!(!verify_proof(&root, i, leaf, n, shorter), "n={n} i={i}: one hash removed");
                }
            }
            assert_eq!(proof_len(n, n), None);
        }
        assert_eq!(proof_len(0, 0), None);
    }

    #[test]
    fn domain_separation_leaf_is_not_a_node() {
        let l = leaves(2);
        let root = Tree::from_leaves(&l).root();
        // A forged "leaf" equal to the concatenation of two leaves must not hash to the root.
        let mut joined = Vec::new();
        joined.extend_from_slice(&l[0]);
        joined.extend_from_slice(&l[1]);
        assert_ne!(*blake3::hash(&joined).as_bytes(), root.0);
    }
}
