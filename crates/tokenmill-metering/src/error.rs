//! Errors of the ledger: what the writer reports to its callers, and what
//! verification found wrong, with enough place information (file, byte
//! offset, sequence number) that an operator can look at the bytes.

use crate::codec::{DecodeError, EncodeError};
use std::fmt;
use std::path::PathBuf;

/// The kind of damage or tampering found in a ledger directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// A file or directory could not be read.
    Unreadable(String),
    /// A file header is wrong (magic, kind, version, checksum, or a first
    /// sequence number that disagrees with the file name).
    BadHeader(String),
    /// A file ends inside a frame or header: a torn write, or a truncation
    /// that did not fall on a frame boundary.
    TornFrame(String),
    /// A frame declares an impossible length.
    BadLength(u32),
    /// A frame's checksum does not match its bytes: the bytes were changed.
    BadChecksum,
    /// A frame is intact but its payload is not a canonical record (or note).
    Undecodable(DecodeError),
    /// Records are missing: `found` came where `expected` belonged.
    Gap {
        /// The sequence number that should be here.
        expected: u64,
        /// The sequence number that is.
        found: u64,
    },
    /// Records are out of order or repeated.
    Reorder {
        /// The sequence number that should be here.
        expected: u64,
        /// The sequence number that is.
        found: u64,
    },
    /// The record's `prev_hash` is not the hash of the record before it:
    /// one of the two was altered (their checksums were recomputed).
    BadChainLink,
    /// A signed checkpoint covers more records than the ledger holds.
    Truncation {
        /// Records the checkpoint covers.
        checkpoint_size: u64,
        /// Records present.
        records: u64,
    },
    /// A checkpoint note is malformed, names another origin, or goes back in
    /// size.
    BadCheckpoint(String),
    /// A checkpoint's signature is invalid, or it has none by a known key.
    BadSignature(String),
    /// A checkpoint's root is not the Merkle root of the records it covers.
    BadRoot {
        /// The checkpoint's tree size.
        size: u64,
    },
    /// The ledger holds records but no signed checkpoint at all.
    NoCheckpoint,
    /// A cosigned checkpoint is not one of the ledger's own checkpoints, or
    /// a known witness's cosignature on it does not verify.
    BadCosignature(String),
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::Unreadable(m) => write!(f, "unreadable: {m}"),
            ProblemKind::BadHeader(m) => write!(f, "bad file header: {m}"),
            ProblemKind::TornFrame(m) => write!(f, "torn frame (truncated): {m}"),
            ProblemKind::BadLength(n) => write!(f, "bad frame length {n}"),
            ProblemKind::BadChecksum => f.write_str("bad checksum: the record's bytes were changed"),
            ProblemKind::Undecodable(e) => write!(f, "undecodable record: {e}"),
            ProblemKind::Gap { expected, found } => {
                write!(f, "gap: record {found} where {expected} was expected")
            }
            ProblemKind::Reorder { expected, found } => {
                write!(f, "reorder: record {found} where {expected} was expected")
            }
            ProblemKind::BadChainLink => f.write_str(
                "bad hash chain link: prev_hash is not the hash of the previous record",
            ),
            ProblemKind::Truncation {
                checkpoint_size,
                records,
            } => write!(
                f,
                "truncation: a signed checkpoint covers {checkpoint_size} records, only {records} present"
            ),
            ProblemKind::BadCheckpoint(m) => write!(f, "bad checkpoint: {m}"),
            ProblemKind::BadSignature(m) => write!(f, "bad signature: {m}"),
            ProblemKind::BadRoot { size } => write!(
                f,
                "bad root hash: checkpoint of size {size} does not match the records"
            ),
            ProblemKind::NoCheckpoint => f.write_str("records but no signed checkpoint"),
            ProblemKind::BadCosignature(m) => write!(f, "bad cosignature: {m}"),
        }
    }
}

/// The first problem found in a ledger directory, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: byte {offset}: {}{kind}", file.display(), seq.map(|s| format!("record {s}: ")).unwrap_or_default())]
pub struct VerifyError {
    /// The segment or checkpoints file.
    pub file: PathBuf,
    /// Byte offset in that file of the frame (or header) at fault.
    pub offset: u64,
    /// The sequence number of the record at fault: for a damaged frame, the
    /// one that belongs at that place.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: ProblemKind,
}

/// Errors of opening, writing and closing a ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A file operation failed while opening or closing.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory holds damage that recovery does not repair (anything
    /// but a torn tail); the ledger will not append to it.
    #[error("ledger is damaged: {0}")]
    Corrupt(VerifyError),
    /// The configuration is invalid or disagrees with the directory.
    #[error("ledger configuration: {0}")]
    Config(String),
    /// The record cannot be encoded; the ledger stays healthy.
    #[error("record refused: {0}")]
    Invalid(#[from] EncodeError),
    /// The batch holding this record could not be made durable; the writer
    /// now refuses appends.
    #[error("ledger write failed: {0}")]
    WriteFailed(String),
    /// An earlier write failed, so the writer refuses appends (fail closed).
    #[error("ledger is unhealthy after a write failure; appends are refused")]
    Unhealthy,
    /// The writer was closed.
    #[error("ledger is closed")]
    Closed,
}
