//! Rebuilding a ledger directory from encoded records, e.g. pulled from a
//! message stream that carried them.
//!
//! Records must arrive in order; each is checked (canonical decoding, next
//! sequence number, chain link) before it is written, so the rebuilt
//! directory holds byte-identical records and hence the same hashes and
//! Merkle roots as the original. Checkpoints come from two places, both
//! optional: the original's signed notes, copied verbatim (they then verify
//! with the original's public keys), and checkpoints the importer signs with
//! its own key every N records and at the end. Notes are written at
//! [`Importer::finish`], in size order, after which the directory is
//! verified.

use crate::checkpoint::Checkpoint;
use crate::error::{LedgerError, ProblemKind, VerifyError};
use crate::hash::Hash;
use crate::keys::{Signer, VerifierKey};
use crate::record::Record;
use crate::store::{Receipt, Store};
use crate::verify::{self, VerifyReport};
use crate::writer::LedgerConfig;
use std::fs;

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The target directory exists and is not empty.
    #[error("{0}: import target must be empty")]
    NotEmpty(std::path::PathBuf),
    /// A record is not the next one of the chain (or not a record).
    #[error("record {seq:?}: {kind}")]
    BadRecord {
        /// Its sequence number, if it has one.
        seq: Option<u64>,
        /// What is wrong.
        kind: ProblemKind,
    },
    /// A checkpoint note is malformed or of another origin.
    #[error("checkpoint: {0}")]
    BadCheckpoint(String),
    /// A line of a JSON lines export is not a record or checkpoint that
    /// the export could have written.
    #[error("line {line}: {problem}")]
    BadLine {
        /// Its line number, from 1.
        line: u64,
        /// What is wrong with it.
        problem: LineProblem,
    },
    /// The JSON lines input could not be read (an I/O error, or bytes that
    /// are not UTF-8), so nothing is known about the line.
    #[error("line {line}: reading: {source}")]
    ReadLine {
        /// The line being read, from 1.
        line: u64,
        /// What the reader reported.
        source: std::io::Error,
    },
    /// Writing failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The rebuilt directory does not verify.
    #[error("rebuilt ledger does not verify: {0}")]
    Verify(#[from] VerifyError),
}

/// What is wrong with a line of a JSON lines export
/// ([`ImportError::BadLine`]), found before anything of it is written.
#[derive(Debug, thiserror::Error)]
pub enum LineProblem {
    /// Not JSON of the shape of a usage, capacity or checkpoint line
    /// (unknown fields included).
    #[error("{0}")]
    Syntax(#[from] serde_json::Error),
    /// `prev` is not 64 hex digits.
    #[error("prev {0:?} is not a hash")]
    BadPrev(String),
    /// `finish_reason` is none of the protocol's reasons.
    #[error("unknown finish_reason {0:?}")]
    UnknownFinishReason(String),
    /// A time field is not an RFC 3339 UTC timestamp as the export writes.
    #[error("{field} {text:?} is not an export timestamp")]
    BadTime {
        /// The field (`arrived_at`, `finished_at`, `start`, `end`).
        field: &'static str,
        /// Its value.
        text: String,
    },
    /// The record the line describes cannot be encoded canonically.
    #[error("{0}")]
    Encode(#[from] crate::codec::EncodeError),
    /// The line's fields encode to a record whose hash is not the one the
    /// line states: a field was edited after export.
    #[error("record {seq}: its fields hash to {computed}, the line says {stated}")]
    HashMismatch {
        /// The record's sequence number.
        seq: u64,
        /// The hash of the record rebuilt from the fields, hex.
        computed: String,
        /// The `hash` field, as written.
        stated: String,
    },
    /// A checkpoint line covers more records than the lines before it held.
    #[error("checkpoint of size {size} before its records ({records} so far)")]
    CheckpointAhead {
        /// The checkpoint's tree size.
        size: u64,
        /// Records imported before it.
        records: u64,
    },
}

/// Builds a ledger directory from records given in order.
pub struct Importer {
    store: Store,
    config: LedgerConfig,
    signer: Option<Signer>,
    /// Notes to write at the end: (size, note).
    notes: Vec<(u64, String)>,
    /// Bytes framed since the last commit.
    uncommitted: usize,
    /// Size of the importer's own last checkpoint.
    own_last: Option<u64>,
}

/// Commit after this many bytes, so memory stays bounded on long imports.
const COMMIT_BYTES: usize = 8 << 20;

impl Importer {
    /// Starts an import into `config.dir`, which must be missing or empty.
    /// With `signer`, the importer signs its own checkpoints (origin
    /// `config.origin`) every `config.checkpoint_every_records` records and
    /// at the end.
    pub fn create(config: LedgerConfig, signer: Option<Signer>) -> Result<Importer, ImportError> {
        config.validate()?;
        if let Ok(mut entries) = fs::read_dir(&config.dir) {
            if entries.next().is_some() {
                return Err(ImportError::NotEmpty(config.dir.clone()));
            }
        }
        let (store, _) = Store::open(&config.dir, &config.origin, config.segment_max_bytes)?;
        Ok(Importer {
            store,
            config,
            signer,
            notes: Vec::new(),
            uncommitted: 0,
            own_last: None,
        })
    }

    /// Records imported so far.
    pub fn records(&self) -> u64 {
        self.store.next_seq()
    }

    /// The hash of the last record imported.
    pub fn last_hash(&self) -> Hash {
        self.store.last_hash()
    }

    /// Adds the next record, given as its canonical bytes.
    pub fn push_record(&mut self, bytes: &[u8]) -> Result<Receipt, ImportError> {
        let expected = self.store.next_seq();
        let bad = |kind| ImportError::BadRecord {
            seq: Some(expected),
            kind,
        };
        let record = Record::decode(bytes).map_err(|e| bad(ProblemKind::Undecodable(e)))?;
        if record.seq != expected {
            return Err(bad(if record.seq < expected {
                ProblemKind::Reorder {
                    expected,
                    found: record.seq,
                }
            } else {
                ProblemKind::Gap {
                    expected,
                    found: record.seq,
                }
            }));
        }
        if record.prev_hash != self.store.last_hash() {
            return Err(bad(ProblemKind::BadChainLink));
        }
        let receipt = self.store.append_encoded(bytes).map_err(|e| self.io(e))?;
        self.uncommitted += bytes.len();
        let every = self.config.checkpoint_every_records;
        let checkpoint_now =
            self.signer.is_some() && self.store.next_seq().checked_rem(every) == Some(0);
        if self.uncommitted >= COMMIT_BYTES || checkpoint_now {
            self.store.commit().map_err(|e| self.io(e))?;
            self.uncommitted = 0;
        }
        if checkpoint_now {
            self.sign_own()?;
        }
        Ok(receipt)
    }

    /// Adds a signed checkpoint note of the original ledger, to be copied
    /// verbatim. Its origin must be `config.origin`; its signature and root
    /// are checked by the verification at [`Importer::finish`].
    pub fn push_checkpoint(&mut self, note: &str) -> Result<(), ImportError> {
        let parsed =
            crate::note::parse(note).map_err(|e| ImportError::BadCheckpoint(e.to_string()))?;
        let cp = Checkpoint::parse(&parsed.text)
            .map_err(|e| ImportError::BadCheckpoint(e.to_string()))?;
        if cp.origin != self.config.origin {
            return Err(ImportError::BadCheckpoint(format!(
                "origin {:?}, expected {:?}",
                cp.origin, self.config.origin
            )));
        }
        if !self.notes.iter().any(|(_, n)| n == note) {
            self.notes.push((cp.size, note.to_owned()));
        }
        Ok(())
    }

    /// Writes the remaining records and all checkpoint notes (in size order;
    /// the importer's own last, at the final size, when it has a key), then
    /// verifies the directory with `keys` plus the importer's own key.
    pub fn finish(mut self, keys: &[VerifierKey]) -> Result<VerifyReport, ImportError> {
        self.store.commit().map_err(|e| self.io(e))?;
        let size = self.store.next_seq();
        if self.signer.is_some() && self.own_last != Some(size) {
            self.sign_own()?;
        }
        // Stable: notes of equal size keep the order they came in.
        self.notes.sort_by_key(|(s, _)| *s);
        for (_, note) in &self.notes {
            self.store.append_note(note)?;
        }
        let mut all_keys = keys.to_vec();
        if let Some(s) = &self.signer {
            all_keys.push(s.verifier());
        }
        Ok(verify::verify(&self.config.dir, &all_keys)?)
    }

    fn sign_own(&mut self) -> Result<(), ImportError> {
        let Some(signer) = &self.signer else {
            return Ok(());
        };
        let cp = Checkpoint::new(
            &self.config.origin,
            self.store.next_seq(),
            self.store.root(),
        );
        let note = cp
            .sign(signer)
            .map_err(|e| ImportError::BadCheckpoint(e.to_string()))?;
        self.notes.push((cp.size, note));
        self.own_last = Some(cp.size);
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> ImportError {
        ImportError::Ledger(LedgerError::Io {
            path: self.config.dir.clone(),
            source,
        })
    }
}
