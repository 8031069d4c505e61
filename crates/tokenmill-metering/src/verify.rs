//! Offline verification of a ledger directory with public keys alone.
//!
//! Checks, in this order, stopping at the first problem: every checkpoint
//! note (framing, format, one origin, sizes never going back, a valid
//! signature by a listed key and none invalid); then every record (framing,
//! canonical decoding, sequence continuity, chain link), and at each
//! checkpoint's size that the Merkle root of the records so far equals the
//! signed root; finally that no checkpoint covers records that are missing.

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::error::{ProblemKind, VerifyError};
use crate::frame;
use crate::hash::Hash;
use crate::keys::VerifierKey;
use crate::merkle::{self, CompactTree};
use crate::note::NoteError;
use crate::reader::{self, LedgerReader, TailPolicy};
use std::fs;
use std::path::{Path, PathBuf};

/// A checkpoint found valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The signed note as stored.
    pub note: String,
    /// Names of the listed keys that signed it.
    pub signed_by: Vec<String>,
}

/// What a successful verification saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Segment files.
    pub segments: usize,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The last checkpoint, if any.
    pub last_checkpoint: Option<VerifiedCheckpoint>,
    /// Merkle root of all records.
    pub root: Hash,
    /// Records after the last checkpoint: written, chained, but not yet
    /// signed (a crash before the next checkpoint leaves some).
    pub unsigned_records: u64,
    /// `.torn` files in the directory: tails set aside by recovery. They are
    /// not part of the ledger; they are listed so nobody overlooks them.
    pub set_aside_files: Vec<PathBuf>,
}

/// Verifies the ledger in `dir` against the public keys `keys` (any of which
/// may have signed a checkpoint).
pub fn verify(dir: &Path, keys: &[VerifierKey]) -> Result<VerifyReport, VerifyError> {
    let checkpoints = verified_checkpoints(dir, keys)?;
    let notes_path = dir.join(frame::CHECKPOINTS_FILE);

    let mut reader = LedgerReader::with_policy(dir, 0, TailPolicy::Strict)?;
    let mut tree = CompactTree::new();
    let mut next = 0;
    loop {
        while let Some((offset, v)) = checkpoints.get(next) {
            if v.checkpoint.size != tree.size() {
                break;
            }
            if v.checkpoint.root != tree.root() {
                return Err(VerifyError {
                    file: notes_path,
                    offset: *offset,
                    seq: v.checkpoint.size.checked_sub(1),
                    kind: ProblemKind::BadRoot {
                        size: v.checkpoint.size,
                    },
                });
            }
            next += 1;
        }
        match reader.next_record()? {
            Some(r) => tree.push(merkle::leaf_hash(&r.bytes)),
            None => break,
        }
    }
    if let Some((_, v)) = checkpoints.get(next) {
        let (file, offset) = reader.end_position();
        return Err(VerifyError {
            file: file.to_owned(),
            offset,
            seq: Some(tree.size()),
            kind: ProblemKind::Truncation {
                checkpoint_size: v.checkpoint.size,
                records: tree.size(),
            },
        });
    }
    if tree.size() > 0 && checkpoints.is_empty() {
        return Err(VerifyError {
            file: notes_path,
            offset: 0,
            seq: None,
            kind: ProblemKind::NoCheckpoint,
        });
    }
    let last_checkpoint = checkpoints.last().map(|(_, v)| v.clone());
    let signed = last_checkpoint.as_ref().map_or(0, |v| v.checkpoint.size);
    Ok(VerifyReport {
        records: tree.size(),
        segments: reader.segments().count(),
        checkpoints: checkpoints.len(),
        last_checkpoint,
        root: tree.root(),
        unsigned_records: tree.size() - signed,
        set_aside_files: torn_files(dir),
    })
}

/// The checkpoints of `dir`, each checked against `keys`, with the offset of
/// its frame; they must share one origin and never go back in size.
pub fn verified_checkpoints(
    dir: &Path,
    keys: &[VerifierKey],
) -> Result<Vec<(u64, VerifiedCheckpoint)>, VerifyError> {
    let notes_path = dir.join(frame::CHECKPOINTS_FILE);
    let (notes, _) = reader::read_notes(dir, TailPolicy::Strict)?;
    let mut out: Vec<(u64, VerifiedCheckpoint)> = Vec::with_capacity(notes.len());
    for n in notes {
        let fail = |kind| VerifyError {
            file: notes_path.clone(),
            offset: n.offset,
            seq: None,
            kind,
        };
        let (checkpoint, signed_by) = Checkpoint::open(&n.note, keys).map_err(|e| {
            fail(match e {
                CheckpointError::Note(
                    NoteError::BadSignature(_) | NoteError::UnknownSigners(_),
                ) => ProblemKind::BadSignature(e.to_string()),
                other => ProblemKind::BadCheckpoint(other.to_string()),
            })
        })?;
        if let Some((_, prev)) = out.last() {
            if prev.checkpoint.origin != checkpoint.origin {
                return Err(fail(ProblemKind::BadCheckpoint(format!(
                    "origin {:?} differs from {:?}",
                    checkpoint.origin, prev.checkpoint.origin
                ))));
            }
            if prev.checkpoint.size > checkpoint.size {
                return Err(fail(ProblemKind::BadCheckpoint(format!(
                    "size {} after size {}",
                    checkpoint.size, prev.checkpoint.size
                ))));
            }
        }
        out.push((
            n.offset,
            VerifiedCheckpoint {
                checkpoint,
                note: n.note,
                signed_by,
            },
        ));
    }
    Ok(out)
}

fn torn_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".torn"))
        .collect();
    files.sort();
    files
}
