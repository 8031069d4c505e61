//! The Merkle tree of RFC 6962 / RFC 9162 over the ledger's records.
//!
//! Leaves are the canonical record bytes, hashed with prefix 0x00; interior
//! nodes hash their children with prefix 0x01, so no leaf can pass for a node.
//! A checkpoint signs the root of the first `size` records; an inclusion proof
//! shows one record is among them, a consistency proof that an older
//! checkpoint's tree is a prefix of a newer one. Verification follows the
//! iterative algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2; proofs are
//! generated with the recursive definitions of RFC 6962 section 2.1, so the
//! two sides are written independently and test each other.

use crate::hash::Hash;

/// Why a proof could not be made or does not check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index or tree sizes are out of range.
    #[error("{0}")]
    OutOfRange(String),
    /// The proof has the wrong number of hashes for its sizes.
    #[error("proof has the wrong length")]
    WrongLength,
    /// The proof's hashes do not lead to the expected root.
    #[error("proof does not match the root hash")]
    RootMismatch,
}

/// Hash of a leaf: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    Hash::of_parts(&[&[0x00], data])
}

/// Hash of an interior node: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Hash::of_parts(&[&[0x01], &left.0, &right.0])
}

/// The root of the empty tree: SHA-256 of no bytes.
pub fn empty_root() -> Hash {
    Hash::of_parts(&[])
}

/// The Merkle tree hash of a list of leaf hashes, by the recursive definition
/// (MTH of RFC 6962 2.1). Linear in the number of leaves.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n);
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// The largest power of two smaller than `n` (n >= 2).
fn split_point(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The tree grown one leaf at a time, keeping only the roots of its perfect
/// subtrees (at most 64): what the writer needs to sign a checkpoint at any
/// size without holding every leaf.
#[derive(Clone, Debug, Default)]
pub struct CompactTree {
    size: u64,
    /// Roots of perfect subtrees, largest (leftmost) first, with their height.
    peaks: Vec<(Hash, u32)>,
}

impl CompactTree {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (leaf, 0u32);
        while let Some(&(left, height)) = self.peaks.last() {
            if height != node.1 {
                break;
            }
            self.peaks.pop();
            node = (node_hash(&left, &node.0), height + 1);
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The root hash of the tree as it stands.
    pub fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        let Some(&(mut acc, _)) = iter.next() else {
            return empty_root();
        };
        for (left, _) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// Proof that leaf `index` is in the tree of the first `size` of `leaves`
/// (PATH of RFC 6962 2.1.1).
pub fn inclusion_proof(leaves: &[Hash], index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
    let n = usize::try_from(size).ok().filter(|&n| n <= leaves.len());
    let (Some(n), Ok(m)) = (n, usize::try_from(index)) else {
        return Err(ProofError::OutOfRange(format!(
            "tree size {size} is beyond the {} leaves held",
            leaves.len()
        )));
    };
    if m >= n {
        return Err(ProofError::OutOfRange(format!(
            "leaf {index} is not in a tree of size {size}"
        )));
    }
    let mut proof = Vec::new();
    path(m, &leaves[..n], &mut proof);
    Ok(proof)
}

fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n);
    if m < k {
        path(m, &leaves[..k], out);
        out.push(root_of(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], out);
        out.push(root_of(&leaves[..k]));
    }
}

/// Proof that the tree of the first `old_size` leaves is a prefix of the tree
/// of the first `new_size` (PROOF of RFC 6962 2.1.2). Empty when the sizes
/// are equal or `old_size` is 0.
pub fn consistency_proof(
    leaves: &[Hash],
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProofError> {
    let n = usize::try_from(new_size)
        .ok()
        .filter(|&n| n <= leaves.len());
    let (Some(n), Ok(m)) = (n, usize::try_from(old_size)) else {
        return Err(ProofError::OutOfRange(format!(
            "tree size {new_size} is beyond the {} leaves held",
            leaves.len()
        )));
    };
    if m > n {
        return Err(ProofError::OutOfRange(format!(
            "old size {old_size} is larger than new size {new_size}"
        )));
    }
    let mut proof = Vec::new();
    if m > 0 && m < n {
        subproof(m, &leaves[..n], true, &mut proof);
    }
    Ok(proof)
}

fn subproof(m: usize, leaves: &[Hash], whole: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !whole {
            out.push(root_of(leaves));
        }
        return;
    }
    let k = split_point(n);
    if m <= k {
        subproof(m, &leaves[..k], whole, out);
        out.push(root_of(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root_of(&leaves[..k]));
    }
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose
/// root is `root` (RFC 9162 2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange(format!(
            "leaf {index} is not in a tree of size {size}"
        )));
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return Err(ProofError::WrongLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a
/// prefix of the tree of `new_size` leaves with root `new_root`
/// (RFC 9162 2.1.4.2; equal sizes need equal roots and an empty proof, and
/// every tree extends the empty one).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OutOfRange(format!(
            "old size {old_size} is larger than new size {new_size}"
        )));
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch);
        }
        return Ok(());
    }
    let Some((&first, rest)) = proof.split_first() else {
        return Err(ProofError::WrongLength);
    };
    // When the old tree is a perfect subtree, its root is the proof's
    // implicit first element.
    let (start, rest) = if old_size.is_power_of_two() {
        (*old_root, proof)
    } else {
        (first, rest)
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (start, start);
    for c in rest {
        if snode == 0 {
            return Err(ProofError::WrongLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
            .collect()
    }

    /// The tree hash by brute force: hash levels pairwise, carrying an odd
    /// last node up unchanged. For RFC 6962 trees this equals MTH; it is
    /// written differently from `root_of` on purpose.
    fn brute_root(leaves: &[Hash]) -> Hash {
        if leaves.is_empty() {
            return empty_root();
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    [single] => *single,
                    _ => unreachable!("chunks(2) yields one or two"),
                })
                .collect();
        }
        level[0]
    }

    /// RFC 6962 test inputs as used by Certificate Transparency
    /// implementations; the roots below were recalled, and this test is what
    /// confirms them (a misremembered SHA-256 could not match by chance).
    const RFC6962_LEAVES: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    const RFC6962_ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn rfc6962_roots() {
        let hashes: Vec<Hash> = RFC6962_LEAVES.iter().map(|d| leaf_hash(d)).collect();
        assert_eq!(
            empty_root().to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut tree = CompactTree::new();
        for (i, h) in hashes.iter().enumerate() {
            tree.push(*h);
            assert_eq!(
                root_of(&hashes[..=i]).to_hex(),
                RFC6962_ROOTS[i],
                "size {}",
                i + 1
            );
            assert_eq!(tree.root().to_hex(), RFC6962_ROOTS[i]);
        }
    }

    #[test]
    fn roots_agree_with_brute_force() {
        let all = leaves(64);
        let mut tree = CompactTree::new();
        assert_eq!(tree.root(), empty_root());
        for n in 1..=64 {
            tree.push(all[n - 1]);
            assert_eq!(tree.size(), n as u64);
            assert_eq!(root_of(&all[..n]), brute_root(&all[..n]), "size {n}");
            assert_eq!(tree.root(), brute_root(&all[..n]), "size {n}");
        }
    }

    #[test]
    fn every_inclusion_proof_up_to_64_checks() {
        let all = leaves(64);
        for n in 1..=64u64 {
            let root = brute_root(&all[..n as usize]);
            for i in 0..n {
                let proof = inclusion_proof(&all, i, n).expect("in range");
                let leaf = all[i as usize];
                assert_eq!(
                    verify_inclusion(&leaf, i, n, &proof, &root),
                    Ok(()),
                    "{i} in {n}"
                );
                // Wrong leaf, wrong index, a damaged or a shortened or
                // lengthened proof: all refused. (The size is bound by the
                // signed checkpoint, not by the path: a path can fit two
                // sizes.)
                let other = all[((i + 1) % n) as usize];
                if n > 1 {
                    assert!(verify_inclusion(&other, i, n, &proof, &root).is_err());
                    assert!(verify_inclusion(&leaf, (i + 1) % n, n, &proof, &root).is_err());
                }
                for j in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[j].0[0] ^= 1;
                    assert!(verify_inclusion(&leaf, i, n, &bad, &root).is_err());
                }
                if !proof.is_empty() {
                    let short = &proof[..proof.len() - 1];
                    assert!(verify_inclusion(&leaf, i, n, short, &root).is_err());
                }
                let mut long = proof.clone();
                long.push(root);
                assert!(verify_inclusion(&leaf, i, n, &long, &root).is_err());
            }
            assert!(inclusion_proof(&all, n, n).is_err());
        }
    }

    #[test]
    fn every_consistency_proof_up_to_64_checks() {
        let all = leaves(64);
        for n in 1..=64u64 {
            let new_root = brute_root(&all[..n as usize]);
            for m in 0..=n {
                let old_root = brute_root(&all[..m as usize]);
                let proof = consistency_proof(&all, m, n).expect("in range");
                assert_eq!(
                    verify_consistency(m, n, &old_root, &new_root, &proof),
                    Ok(()),
                    "{m} -> {n}"
                );
                if m == 0 {
                    continue;
                }
                for j in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[j].0[31] ^= 0x80;
                    assert!(
                        verify_consistency(m, n, &old_root, &new_root, &bad).is_err(),
                        "{m} -> {n}, hash {j} damaged"
                    );
                }
                if !proof.is_empty() {
                    let short = &proof[..proof.len() - 1];
                    assert!(verify_consistency(m, n, &old_root, &new_root, short).is_err());
                }
                let mut wrong_old = old_root;
                wrong_old.0[0] ^= 1;
                assert!(verify_consistency(m, n, &wrong_old, &new_root, &proof).is_err());
                let mut wrong_new = new_root;
                wrong_new.0[0] ^= 1;
                assert!(verify_consistency(m, n, &old_root, &wrong_new, &proof).is_err());
                if m < n {
                    // A tree that differs in one old leaf is not an extension.
                    let mut forked = all[..n as usize].to_vec();
                    forked[0].0[0] ^= 1;
                    let forked_root = brute_root(&forked);
                    assert!(verify_consistency(m, n, &old_root, &forked_root, &proof).is_err());
                }
            }
            assert!(consistency_proof(&all, n + 1, n).is_err());
        }
    }
}
