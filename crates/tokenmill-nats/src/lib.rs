//! Publishing tokenmill's usage ledger to NATS JetStream, and rebuilding a
//! ledger from such a stream.
//!
//! The party that checks the bill (the hardware backer of a revenue-share
//! deal) wants the records as they are made, not a file handed over later.
//! A JetStream stream gives them that: [`spawn`] starts an exporter that
//! follows a live ledger directory and publishes every record (its canonical
//! bytes) and every signed checkpoint note; [`pull`] reads a stream back and
//! rebuilds a ledger directory that verifies with the original's public keys
//! alone, because it holds the very same bytes and signatures.
//!
//! What the exporter promises, and why it can:
//! - **None lost.** The ledger directory is the buffer: the exporter only
//!   reads it, so while NATS is down records simply wait on disk, however
//!   many, and the exporter retries with backoff. Its cursor (the next
//!   record and checkpoint the stream has acknowledged) is a small file in
//!   the ledger directory, replaced atomically, so a crash or a restart
//!   resumes where the stream's acknowledgements stopped.
//! - **None twice.** Everything sent again around a crash or an outage
//!   carries the same `Nats-Msg-Id` (a record's id is its record hash, as
//!   docs/ledger-format.md says), and the stream is created with a long
//!   duplicate window (24 h by default), so JetStream stores each message
//!   once. [`pull`] also skips an exact duplicate that arrives later than
//!   that window.
//! - **In order, nearly.** Records are published in sequence order, each
//!   checkpoint right after the last record it covers. Publishes are
//!   pipelined for throughput, so after a connection loss a few messages of
//!   the window that was in flight can land out of order; every message
//!   carries its sequence number (header `Tokenmill-Seq`), and [`pull`]
//!   puts them back in order.
//!
//! The stream layout (see [`StreamLayout`]): stream `NAME` holds subjects
//! `tokenmill.ledger.NAME.record` (payload: the canonical record bytes),
//! `tokenmill.ledger.NAME.checkpoint` (payload: the signed note, UTF-8) and
//! `tokenmill.ledger.NAME.cosigned` (payload: a checkpoint note with a
//! witness's cosignature lines, from the ledger's `cosignatures` file; a
//! pull keeps them in the rebuilt ledger's own).
//!
//! ```no_run
//! use std::time::Duration;
//! use tokenmill_nats::{spawn, ExportConfig};
//! let config = ExportConfig::new("nats://127.0.0.1:4222", "usage", "/var/lib/tokenmill/ledger");
//! let exporter = spawn(config)?;
//! // ... serve; exporter.stats() feeds the metrics ...
//! let summary = exporter.shutdown(Duration::from_secs(10));
//! println!("{} records still to send", summary.stats.backlog);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cursor;
mod export;
mod layout;
mod pull;
mod tail;

pub use cursor::{read_cursor, ExportCursor};
pub use export::{spawn, ExportConfig, ExportError, ExportStats, ExportSummary, ExporterHandle};
pub use layout::{InvalidStreamName, StreamLayout, HEADER_SEQ, HEADER_SIZE};
pub use pull::{pull, pull_blocking, PullError, PullReport};
pub use tail::TailError;
