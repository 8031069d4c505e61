//! The signed, hash-chained usage ledger of tokenmill.
//!
//! A revenue-share deal moves money on token counts that one party produces;
//! the other party must be able to check them without trusting it. So every
//! usage and capacity record is written where the tokens are made, in a
//! canonical encoding ([`record`]), chained to the record before it by hash,
//! collected in an RFC 6962 Merkle tree ([`merkle`]), and committed to by
//! checkpoints signed with Ed25519 as C2SP signed notes ([`checkpoint`],
//! [`note`], [`keys`]). Anyone with the public key can then verify a copy of
//! the ledger offline ([`verify()`]), check that one record is in a signed
//! checkpoint, or that an old checkpoint is a prefix of a new one
//! ([`proof`]). docs/ledger-format.md specifies the bytes, with test vectors.
//!
//! Writing ([`Ledger`]) is group-committed on a thread of its own, so the
//! engine never waits for a disk, and a record is durable before the
//! response that bills it is sent: the server sends that response from the
//! record's callback. If the disk fails the ledger turns unhealthy and
//! refuses appends, and the server refuses requests (fail closed). A crash
//! mid-write leaves at most a torn tail, which the next open reports and
//! sets aside; records once whole are never rewritten.
//!
//! ```no_run
//! use tokenmill_metering::{keys, Ledger, LedgerConfig, RecordBody};
//! use tokenmill_protocol::UsageEvent;
//!
//! /// Opens the ledger and bills one request's usage.
//! fn bill(usage: UsageEvent) -> Result<(), Box<dyn std::error::Error>> {
//!     let signer = keys::load_signer("/var/lib/tokenmill/ledger.key".as_ref())?;
//!     let config = LedgerConfig::new("/var/lib/tokenmill/ledger", "tokenmill.example/ledger");
//!     let (ledger, report) = Ledger::open(config, signer)?;
//!     for torn in &report.set_aside {
//!         eprintln!("torn tail of {} set aside in {}", torn.file.display(), torn.moved_to.display());
//!     }
//!     ledger.append(&RecordBody::Usage(usage), Box::new(|result| match result {
//!         Ok(receipt) => { /* send the final response; receipt.seq, receipt.hash */ }
//!         Err(_) => { /* answer 503 */ }
//!     }));
//!     ledger.close()?;
//!     Ok(())
//! }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod checkpoint;
mod codec;
pub mod cosignature;
mod error;
pub mod export;
mod frame;
mod fsutil;
pub mod hash;
pub mod import;
mod jsonl_import;
pub mod keys;
pub mod merkle;
pub mod note;
pub mod proof;
mod reader;
pub mod record;
mod store;
mod verify;
pub mod witnessed;
mod writer;

#[cfg(test)]
mod testing;

pub use checkpoint::Checkpoint;
pub use codec::{DecodeError, EncodeError};
pub use error::{LedgerError, ProblemKind, VerifyError};
pub use export::{
    export_jsonl, export_jsonl_with_checkpoints, parse_rfc3339, ExportError, ExportReport,
};
pub use frame::{segment_name, CHECKPOINTS_FILE, COSIGNATURES_FILE, SEGMENT_EXT};
pub use hash::Hash;
pub use import::{ImportError, Importer, LineProblem};
pub use jsonl_import::import_jsonl;
pub use keys::{Signer, VerifierKey};
pub use reader::{LedgerReader, StoredNote, StoredRecord, TornTail};
pub use record::{EncodedBody, Record, RecordBody, MAX_RECORD_BYTES};
pub use store::{OpenReport, Receipt, SetAside};
pub use verify::{verified_checkpoints, verify, VerifiedCheckpoint, VerifyReport};
pub use writer::{CloseReport, DurableCallback, Ledger, LedgerConfig, LedgerHealth};
