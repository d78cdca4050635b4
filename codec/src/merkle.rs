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

/// Checks that `leaf` sits at `index` in a tree of `leaf_count` leaves with `root`.
pub fn verify_proof(root: &Digest, index: usize, leaf: [u8; 32], leaf_count: usize, proof: &[Digest]) -> bool {
    if index >= leaf_count || proof.len() > crate::limits::PROOF_HASHES_MAX {
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
