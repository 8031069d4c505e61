//! Inclusion and consistency proofs as files, made from a ledger directory
//! and checked against a signed checkpoint and a public key alone.
//!
//! An inclusion proof carries the record itself, so whoever holds it and a
//! checkpoint can see that this exact record is among the signed ones. A
//! consistency proof shows an older checkpoint's records are the first
//! records of a newer one: nothing signed was later rewritten.
//!
//! ```text
//! tokenmill/inclusion-proof/v1      tokenmill/consistency-proof/v1
//! index <leaf index>                old <size>
//! size <tree size>                  new <size>
//! record <base64 record bytes>      <base64 hash>...
//! <base64 hash>...
//! ```

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::codec::DecodeError;
use crate::error::VerifyError;
use crate::hash::Hash;
use crate::keys::VerifierKey;
use crate::merkle::{self, ProofError};
use crate::reader::LedgerReader;
use crate::record::Record;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use std::path::Path;

const INCLUSION_HEADER: &str = "tokenmill/inclusion-proof/v1";
const CONSISTENCY_HEADER: &str = "tokenmill/consistency-proof/v1";

/// Why a proof could not be made from a directory.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] VerifyError),
    /// The sizes are out of range.
    #[error(transparent)]
    Proof(#[from] ProofError),
}

/// Why a proof does not check.
#[derive(Debug, thiserror::Error)]
pub enum ProofCheckError {
    /// The proof file is malformed.
    #[error("malformed proof: {0}")]
    Format(String),
    /// The checkpoint is malformed or not validly signed by a listed key.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The proof is for a tree of another size than the checkpoint's.
    #[error("proof is for tree size {proof}, checkpoint has size {checkpoint}")]
    SizeMismatch {
        /// The proof's size.
        proof: u64,
        /// The checkpoint's size.
        checkpoint: u64,
    },
    /// The checkpoints are of different ledgers.
    #[error("checkpoints have different origins")]
    OriginMismatch,
    /// The record in the proof is not a canonical record, or its sequence
    /// number is not the proof's index.
    #[error("record: {0}")]
    Record(String),
    /// The hashes do not lead to the signed root.
    #[error(transparent)]
    Proof(#[from] ProofError),
}

impl From<DecodeError> for ProofCheckError {
    fn from(e: DecodeError) -> Self {
        ProofCheckError::Record(e.to_string())
    }
}

/// Proof that one record is among the first `tree_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InclusionProof {
    /// The record's sequence number (its leaf index).
    pub index: u64,
    /// The tree size the proof is for.
    pub tree_size: u64,
    /// The record's canonical bytes.
    pub record: Vec<u8>,
    /// The audit path, leaf to root.
    pub hashes: Vec<Hash>,
}

/// Proof that the tree of `old_size` records is a prefix of the tree of
/// `new_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistencyProof {
    /// The older tree size.
    pub old_size: u64,
    /// The newer tree size.
    pub new_size: u64,
    /// The proof hashes.
    pub hashes: Vec<Hash>,
}

/// Reads the leaf hashes of the records of `dir`, and the bytes of record
/// `want` if given.
fn leaves(dir: &Path, want: Option<u64>) -> Result<(Vec<Hash>, Vec<u8>), VerifyError> {
    let mut reader = LedgerReader::open(dir, 0)?;
    let mut leaves = Vec::new();
    let mut wanted = Vec::new();
    while let Some(r) = reader.next_record()? {
        leaves.push(r.leaf_hash());
        if Some(r.seq) == want {
            wanted = r.bytes;
        }
    }
    Ok((leaves, wanted))
}

/// Makes the inclusion proof of record `seq` in the tree of `tree_size`
/// records of `dir` (usually the size of a published checkpoint).
pub fn prove_inclusion(dir: &Path, seq: u64, tree_size: u64) -> Result<InclusionProof, ProveError> {
    let (leaves, record) = leaves(dir, Some(seq))?;
    let hashes = merkle::inclusion_proof(&leaves, seq, tree_size)?;
    Ok(InclusionProof {
        index: seq,
        tree_size,
        record,
        hashes,
    })
}

/// Makes the consistency proof between two tree sizes of `dir`.
pub fn prove_consistency(
    dir: &Path,
    old_size: u64,
    new_size: u64,
) -> Result<ConsistencyProof, ProveError> {
    let (leaves, _) = leaves(dir, None)?;
    let hashes = merkle::consistency_proof(&leaves, old_size, new_size)?;
    Ok(ConsistencyProof {
        old_size,
        new_size,
        hashes,
    })
}

impl InclusionProof {
    /// The proof file text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{INCLUSION_HEADER}\nindex {}\nsize {}\nrecord {}\n",
            self.index,
            self.tree_size,
            BASE64.encode(&self.record)
        );
        push_hashes(&mut s, &self.hashes);
        s
    }

    /// Parses a proof file.
    pub fn parse(text: &str) -> Result<InclusionProof, ProofCheckError> {
        let mut lines = proof_lines(text, INCLUSION_HEADER)?;
        let index = number(lines.next(), "index")?;
        let tree_size = number(lines.next(), "size")?;
        let record = lines
            .next()
            .and_then(|l| l.strip_prefix("record "))
            .and_then(|b| BASE64.decode(b).ok())
            .ok_or_else(|| ProofCheckError::Format("expected a record line".into()))?;
        let hashes = hashes(lines)?;
        Ok(InclusionProof {
            index,
            tree_size,
            record,
            hashes,
        })
    }

    /// Checks the proof against a signed checkpoint of the same size, with
    /// public keys alone; returns the proven record and the checkpoint.
    pub fn check(
        &self,
        checkpoint_note: &str,
        keys: &[VerifierKey],
    ) -> Result<(Record, Checkpoint), ProofCheckError> {
        let (cp, _) = Checkpoint::open(checkpoint_note, keys)?;
        if cp.size != self.tree_size {
            return Err(ProofCheckError::SizeMismatch {
                proof: self.tree_size,
                checkpoint: cp.size,
            });
        }
        let record = Record::decode(&self.record)?;
        if record.seq != self.index {
            return Err(ProofCheckError::Record(format!(
                "record has sequence number {}, proof is for leaf {}",
                record.seq, self.index
            )));
        }
        let leaf = merkle::leaf_hash(&self.record);
        merkle::verify_inclusion(&leaf, self.index, self.tree_size, &self.hashes, &cp.root)?;
        Ok((record, cp))
    }
}

impl ConsistencyProof {
    /// The proof file text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{CONSISTENCY_HEADER}\nold {}\nnew {}\n",
            self.old_size, self.new_size
        );
        push_hashes(&mut s, &self.hashes);
        s
    }

    /// Parses a proof file.
    pub fn parse(text: &str) -> Result<ConsistencyProof, ProofCheckError> {
        let mut lines = proof_lines(text, CONSISTENCY_HEADER)?;
        let old_size = number(lines.next(), "old")?;
        let new_size = number(lines.next(), "new")?;
        Ok(ConsistencyProof {
            old_size,
            new_size,
            hashes: hashes(lines)?,
        })
    }

    /// Checks that the older signed checkpoint is a prefix of the newer one,
    /// with public keys alone; returns both checkpoints.
    pub fn check(
        &self,
        old_note: &str,
        new_note: &str,
        keys: &[VerifierKey],
    ) -> Result<(Checkpoint, Checkpoint), ProofCheckError> {
        let (old, _) = Checkpoint::open(old_note, keys)?;
        let (new, _) = Checkpoint::open(new_note, keys)?;
        if old.origin != new.origin {
            return Err(ProofCheckError::OriginMismatch);
        }
        for (proof, cp) in [(self.old_size, &old), (self.new_size, &new)] {
            if proof != cp.size {
                return Err(ProofCheckError::SizeMismatch {
                    proof,
                    checkpoint: cp.size,
                });
            }
        }
        merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &self.hashes)?;
        Ok((old, new))
    }
}

fn push_hashes(s: &mut String, hashes: &[Hash]) {
    for h in hashes {
        s.push_str(&h.to_base64());
        s.push('\n');
    }
}

fn proof_lines<'a>(
    text: &'a str,
    header: &str,
) -> Result<impl Iterator<Item = &'a str>, ProofCheckError> {
    let body = text
        .strip_suffix('\n')
        .ok_or_else(|| ProofCheckError::Format("proof must end in a newline".into()))?;
    let mut lines = body.split('\n');
    if lines.next() != Some(header) {
        return Err(ProofCheckError::Format(format!(
            "expected first line {header}"
        )));
    }
    Ok(lines)
}

fn number(line: Option<&str>, key: &str) -> Result<u64, ProofCheckError> {
    line.and_then(|l| l.strip_prefix(key))
        .and_then(|l| l.strip_prefix(' '))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ProofCheckError::Format(format!("expected a line \"{key} <number>\"")))
}

fn hashes<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<Hash>, ProofCheckError> {
    lines
        .map(|l| {
            Hash::from_base64(l)
                .ok_or_else(|| ProofCheckError::Format(format!("not a base64 hash: {l:?}")))
        })
        .collect()
}
