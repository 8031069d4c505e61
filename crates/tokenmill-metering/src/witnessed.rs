//! Cosigned checkpoints, kept in the ledger directory beside the
//! checkpoints they cosign.
//!
//! The file `cosignatures` has the layout of `checkpoints` (a header of kind
//! 3, then framed notes). Each frame is one of the ledger's own signed
//! checkpoint notes with the cosignature line(s) a witness returned for it
//! appended: a note any signed-note verifier can read, carrying the log's
//! signature and the witness's. Frames are appended and synced as
//! cosignatures arrive, after the checkpoint they cosign; a torn tail left by
//! a crash is set aside on open, as the ledger's own files are.
//!
//! [`witnessed_checkpoints`] reads them back for verifiers: each frame's
//! checkpoint must be one the ledger signed (same size and root as a
//! verified checkpoint), each known witness's line must verify, and the
//! result lists, per checkpoint size, which witnesses cosigned it.

use crate::checkpoint::Checkpoint;
use crate::cosignature::{self, Cosigned, CosignerKey};
use crate::error::{LedgerError, ProblemKind, VerifyError};
use crate::frame::{self, FileKind};
use crate::fsutil;
use crate::keys::VerifierKey;
use crate::note;
use crate::reader::{self, TailPolicy};
use crate::verify::verified_checkpoints;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// The `cosignatures` file of a ledger, open for appending.
#[derive(Debug)]
pub struct CosignatureLog {
    dir: PathBuf,
    file: Option<File>,
}

fn io_err(path: &Path, e: std::io::Error) -> LedgerError {
    LedgerError::Io {
        path: path.to_owned(),
        source: e,
    }
}

impl CosignatureLog {
    /// Opens the file of `dir` (created on the first append); a torn tail
    /// is set aside into a `.torn` file first.
    pub fn open(dir: &Path) -> Result<CosignatureLog, LedgerError> {
        let path = dir.join(frame::COSIGNATURES_FILE);
        let (_, torn) = reader::read_note_file(
            dir,
            frame::COSIGNATURES_FILE,
            FileKind::Cosignatures,
            TailPolicy::Tolerate,
        )
        .map_err(LedgerError::Corrupt)?;
        if let Some(torn) = torn {
            tracing::warn!(file = %torn.file.display(), offset = torn.offset, "cosignatures: setting aside a torn tail");
            crate::store::set_aside_tail(&torn).map_err(|e| io_err(&torn.file, e))?;
            fsutil::sync_dir(dir).map_err(|e| io_err(dir, e))?;
        }
        let file = if path.exists() {
            Some(
                OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?,
            )
        } else {
            None
        };
        Ok(CosignatureLog {
            dir: dir.to_owned(),
            file,
        })
    }

    /// The cosigned notes already in the file, oldest first.
    pub fn notes(&self) -> Result<Vec<String>, LedgerError> {
        let (notes, _) = reader::read_note_file(
            &self.dir,
            frame::COSIGNATURES_FILE,
            FileKind::Cosignatures,
            TailPolicy::Tolerate,
        )
        .map_err(LedgerError::Corrupt)?;
        Ok(notes.into_iter().map(|n| n.note).collect())
    }

    /// Appends one cosigned checkpoint note and syncs it.
    pub fn append(&mut self, cosigned_note: &str) -> Result<(), LedgerError> {
        crate::store::append_note_frame(
            &self.dir,
            frame::COSIGNATURES_FILE,
            FileKind::Cosignatures,
            &mut self.file,
            cosigned_note,
        )
    }
}

/// One of the ledger's checkpoints and the witnesses that cosigned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The known witnesses whose valid cosignatures it carries (one entry
    /// per witness, the earliest).
    pub cosigned_by: Vec<Cosigned>,
}

/// The ledger's cosigned checkpoints, by size, each with the known
/// witnesses that cosigned it. `ledger_keys` check the log's signature
/// (every frame must carry it, over a checkpoint the ledger's own file
/// holds); `witness_keys` pick the cosignatures that count. A frame that
/// fails either check is an error at its offset, not skipped.
pub fn witnessed_checkpoints(
    dir: &Path,
    ledger_keys: &[VerifierKey],
    witness_keys: &[CosignerKey],
) -> Result<Vec<WitnessedCheckpoint>, VerifyError> {
    let signed = verified_checkpoints(dir, ledger_keys)?;
    let path = dir.join(frame::COSIGNATURES_FILE);
    let (notes, _) = reader::read_note_file(
        dir,
        frame::COSIGNATURES_FILE,
        FileKind::Cosignatures,
        TailPolicy::Strict,
    )?;
    let mut out: Vec<WitnessedCheckpoint> = Vec::new();
    for stored in notes {
        let fail = |m: String| VerifyError {
            file: path.clone(),
            offset: stored.offset,
            seq: None,
            kind: ProblemKind::BadCosignature(m),
        };
        let parsed = note::parse(&stored.note).map_err(|e| fail(e.to_string()))?;
        parsed
            .verify(ledger_keys)
            .map_err(|e| fail(e.to_string()))?;
        let checkpoint = Checkpoint::parse(&parsed.text).map_err(|e| fail(e.to_string()))?;
        let ours = signed.iter().any(|(_, v)| {
            v.checkpoint.size == checkpoint.size && v.checkpoint.root == checkpoint.root
        });
        if !ours {
            return Err(fail(format!(
                "checkpoint of size {} is not one of the ledger's own",
                checkpoint.size
            )));
        }
        let found = cosignature::cosignatures(&parsed.text, &parsed.signatures, witness_keys)
            .map_err(|e| fail(e.to_string()))?;
        match out.iter_mut().find(|w| w.checkpoint == checkpoint) {
            Some(entry) => {
                for c in found {
                    if !entry.cosigned_by.iter().any(|e| e.witness == c.witness) {
                        entry.cosigned_by.push(c);
                    }
                }
            }
            None => out.push(WitnessedCheckpoint {
                checkpoint,
                cosigned_by: found,
            }),
        }
    }
    out.sort_by_key(|w| w.checkpoint.size);
    Ok(out)
}

/// The largest checkpoint that at least `min_cosigners` distinct known
/// witnesses cosigned, if any.
pub fn latest_with_quorum(
    witnessed: &[WitnessedCheckpoint],
    min_cosigners: usize,
) -> Option<&WitnessedCheckpoint> {
    witnessed
        .iter()
        .rev()
        .find(|w| w.cosigned_by.len() >= min_cosigners)
}

/// Follows a ledger's `checkpoints` file as the writer appends to it,
/// reading only the bytes added since the last call (a submitter that polls
/// every second must not reread, nor re-verify, a day of checkpoints each
/// time). A frame not yet whole is left for the next call.
#[derive(Debug)]
pub struct CheckpointFollower {
    path: PathBuf,
    /// Where the next frame starts (0: the header is still to be read).
    offset: u64,
}

impl CheckpointFollower {
    /// Follows the checkpoints file of `dir` from its start.
    pub fn new(dir: &Path) -> CheckpointFollower {
        CheckpointFollower {
            path: dir.join(frame::CHECKPOINTS_FILE),
            offset: 0,
        }
    }

    /// The signed notes appended since the last call, oldest first.
    pub fn poll(&mut self) -> Result<Vec<String>, LedgerError> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.path, e)),
        };
        let mut data = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut data))
            .map_err(|e| io_err(&self.path, e))?;
        let mut pos = 0usize;
        if self.offset == 0 {
            match frame::parse_header(&data, FileKind::Checkpoints) {
                Ok(_) => pos = frame::HEADER_BYTES,
                Err(frame::HeaderProblem::Torn) => return Ok(Vec::new()),
                Err(frame::HeaderProblem::Bad(m)) => {
                    return Err(LedgerError::Config(format!("{}: {m}", self.path.display())))
                }
            }
        }
        let mut notes = Vec::new();
        while let frame::FrameRead::Frame { payload, next } = frame::read_frame(&data, pos) {
            notes.push(String::from_utf8_lossy(payload).into_owned());
            pos = next;
        }
        self.offset += pos as u64;
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::append_note_frame;

    #[test]
    fn the_follower_returns_each_note_once_and_waits_for_a_whole_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut follower = CheckpointFollower::new(dir.path());
        assert!(follower.poll().unwrap().is_empty(), "no file yet");
        let mut file = None;
        let append = |file: &mut Option<File>, note: &str| {
            append_note_frame(
                dir.path(),
                frame::CHECKPOINTS_FILE,
                FileKind::Checkpoints,
                file,
                note,
            )
            .unwrap()
        };
        append(&mut file, "one\n");
        append(&mut file, "two\n");
        assert_eq!(follower.poll().unwrap(), ["one\n", "two\n"]);
        assert!(follower.poll().unwrap().is_empty());
        // Half of a frame: nothing until the rest is written.
        let mut frame_bytes = Vec::new();
        frame::push_frame(b"three\n", &mut frame_bytes);
        let path = dir.path().join(frame::CHECKPOINTS_FILE);
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut raw, &frame_bytes[..5]).unwrap();
        assert!(follower.poll().unwrap().is_empty());
        std::io::Write::write_all(&mut raw, &frame_bytes[5..]).unwrap();
        assert_eq!(follower.poll().unwrap(), ["three\n"]);
    }
}
