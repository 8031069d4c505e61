//! Rebuilding a ledger directory from a JetStream stream.
//!
//! The stream is read from its first message to the last one it held when
//! the pull began, with an ordered consumer (the client re-creates it if a
//! message goes missing in transit, so nothing is skipped and nothing
//! needs acking). Records go to a `tokenmill_metering::Importer` in
//! sequence order, the signed checkpoint notes are copied verbatim, and the
//! rebuilt directory is verified with the given public keys: the same bytes
//! and signatures as the original, hence the same hashes and roots.
//!
//! A stream may hold a record twice (re-sent after longer than the
//! duplicate window) or a few records out of order (a window in flight
//! when a connection broke): an exact copy of a record already imported is
//! skipped, a record ahead of the next one waits in memory for the ones
//! before it. Two different records with one sequence number, or a record
//! that never comes, stop the pull with an error.

use crate::layout::{InvalidStreamName, StreamLayout};
use async_nats::jetstream::{self, consumer, stream::LastRawMessageErrorKind};
use async_nats::ConnectOptions;
use futures::StreamExt as _;
use std::collections::{btree_map::Entry, BTreeMap, VecDeque};
use std::path::Path;
use std::time::Duration;
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::record::{self, record_hash};
use tokenmill_metering::witnessed::{witnessed_checkpoints, CosignatureLog};
use tokenmill_metering::{
    note, Hash, ImportError, Importer, LedgerConfig, VerifierKey, VerifyReport,
};

/// Why a pull failed. The output directory then holds a partial import:
/// delete it before trying again.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The stream name cannot be a subject token.
    #[error(transparent)]
    StreamName(#[from] InvalidStreamName),
    /// NATS could not be reached, or refused or failed a request.
    #[error("NATS: {doing}: {source}")]
    Nats {
        /// What the pull was doing (`connecting to URL`, `reading STREAM`).
        doing: String,
        /// The client's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stream's consumer ended before the stream's last message was
    /// delivered.
    #[error("NATS: {0}: the consumer ended")]
    ConsumerEnded(String),
    /// No checkpoint in the stream, so no origin to rebuild under and
    /// nothing to verify against.
    #[error("stream {0} holds no checkpoint note")]
    NoCheckpoint(String),
    /// A message that is not a record or note of this layout.
    #[error("stream message {stream_seq}: {what}")]
    BadMessage {
        /// Its stream sequence number.
        stream_seq: u64,
        /// What is wrong.
        what: String,
    },
    /// Two different records with one sequence number.
    #[error("the stream holds two different records with sequence number {seq}")]
    Conflict {
        /// The sequence number.
        seq: u64,
    },
    /// A record is missing.
    #[error("record {seq} is not in the stream (records up to {highest} are)")]
    Missing {
        /// The first missing record.
        seq: u64,
        /// The highest record seen.
        highest: u64,
    },
    /// The stream stopped delivering before its last message.
    #[error("no message from the stream for {0:?}")]
    Stalled(Duration),
    /// The import refused a record or note, or the result does not verify.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// No runtime could be started (for [`pull_blocking`]).
    #[error("cannot start a runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// What a successful pull did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullReport {
    /// The verification of the rebuilt directory.
    pub verify: VerifyReport,
    /// The ledger's origin, from its checkpoints.
    pub origin: String,
    /// Stream messages read.
    pub messages: u64,
    /// Records imported.
    pub records: u64,
    /// Checkpoint messages read.
    pub checkpoints: u64,
    /// Cosigned checkpoint notes kept (the ledger's cosignatures file).
    pub cosigned: u64,
    /// Record copies skipped (the same record again).
    pub duplicates: u64,
    /// Records that arrived before one they follow.
    pub out_of_order: u64,
}

/// Waiting longer than this for the next message is an error.
const IDLE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Records held while waiting for an earlier one: far more than any window
/// in flight, far less than memory.
const MAX_AHEAD: usize = 100_000;
/// Hashes of the last records imported, to tell a copy from a conflict.
const RECENT: usize = 100_000;

/// Rebuilds the ledger published to `stream` on the NATS server at `url`
/// in `out_dir` (missing or empty), copying its signed checkpoints, and
/// verifies it against `keys` (the original's public keys).
pub async fn pull(
    url: &str,
    stream: &str,
    out_dir: &Path,
    keys: &[VerifierKey],
) -> Result<PullReport, PullError> {
    let layout = StreamLayout::new(stream)?;
    let client = ConnectOptions::new()
        .name("tokenmill-ledger-pull")
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(nats(format!("connecting to {url}")))?;
    let js = jetstream::new(client);
    let source = js
        .get_stream(stream)
        .await
        .map_err(nats(format!("stream {stream}")))?;
    let last = source.cached_info().state.last_sequence;

    // The origin (the importer needs it first) from the newest note.
    let newest = match source
        .get_last_raw_message_by_subject(&layout.checkpoint_subject())
        .await
    {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
            return Err(PullError::NoCheckpoint(stream.to_owned()))
        }
        Err(e) => return Err(nats(format!("stream {stream}"))(e)),
    };
    let origin = note_checkpoint(&newest.payload)
        .map_err(|what| PullError::BadMessage {
            stream_seq: newest.sequence,
            what,
        })?
        .origin;

    let importer = Importer::create(LedgerConfig::new(out_dir, origin.clone()), None)?;
    let mut rebuild = Rebuild {
        importer,
        ahead: BTreeMap::new(),
        recent: VecDeque::new(),
        highest: 0,
        messages: 0,
        checkpoints: 0,
        cosigned: Vec::new(),
        duplicates: 0,
        out_of_order: 0,
    };
    let consumer = source
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: layout.stream_subjects(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(nats(format!("creating a consumer on {stream}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(nats(format!("reading {stream}")))?;
    let record_subject = layout.record_subject();
    let checkpoint_subject = layout.checkpoint_subject();
    let cosigned_subject = layout.cosigned_subject();
    // (A stream whose last sequence is 0 holds nothing to read.)
    let mut done = last == 0;
    while !done {
        let next = tokio::time::timeout(IDLE, messages.next())
            .await
            .map_err(|_| PullError::Stalled(IDLE))?;
        let Some(message) = next else {
            return Err(PullError::ConsumerEnded(stream.to_owned()));
        };
        let message = message.map_err(nats(format!("reading {stream}")))?;
        let (stream_seq, pending) = message
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .map_err(nats(format!("reading {stream}")))?;
        rebuild.messages += 1;
        let subject = message.subject.as_str();
        if subject == record_subject {
            rebuild.record(&message.payload, stream_seq)?;
        } else if subject == checkpoint_subject {
            rebuild.checkpoint(&message.payload, stream_seq)?;
        } else if subject == cosigned_subject {
            rebuild.cosigned(&message.payload, stream_seq)?;
        } else {
            return Err(PullError::BadMessage {
                stream_seq,
                what: format!("unexpected subject {subject}"),
            });
        }
        done = stream_seq >= last || pending == 0;
    }
    if let Some((&first_ahead, _)) = rebuild.ahead.first_key_value() {
        let seq = rebuild.importer.records();
        tracing::error!(seq, first_ahead, "ledger pull: records missing");
        return Err(PullError::Missing {
            seq,
            highest: rebuild.highest,
        });
    }
    let records = rebuild.importer.records();
    let verify = rebuild.importer.finish(keys)?;
    if !rebuild.cosigned.is_empty() {
        // As kept by the original: each must carry the ledger's signature
        // over one of its checkpoints (which witnesses count is the
        // verifier's choice).
        let mut log = CosignatureLog::open(out_dir).map_err(ImportError::from)?;
        for note in &rebuild.cosigned {
            log.append(note).map_err(ImportError::from)?;
        }
        witnessed_checkpoints(out_dir, keys, &[]).map_err(ImportError::from)?;
    }
    Ok(PullReport {
        verify,
        origin,
        messages: rebuild.messages,
        records,
        checkpoints: rebuild.checkpoints,
        cosigned: rebuild.cosigned.len() as u64,
        duplicates: rebuild.duplicates,
        out_of_order: rebuild.out_of_order,
    })
}

/// [`pull`] on a runtime of its own, for callers without one (the CLI).
pub fn pull_blocking(
    url: &str,
    stream: &str,
    out_dir: &Path,
    keys: &[VerifierKey],
) -> Result<PullReport, PullError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(pull(url, stream, out_dir, keys))
}

/// Wraps a NATS client error with what the pull was doing.
fn nats<E>(doing: String) -> impl FnOnce(E) -> PullError
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    move |e| PullError::Nats {
        doing,
        source: e.into(),
    }
}

/// The checkpoint in a note's bytes (signatures are checked by the final
/// verification, against the caller's keys).
fn note_checkpoint(payload: &[u8]) -> Result<Checkpoint, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "note is not UTF-8".to_owned())?;
    let parsed = note::parse(text).map_err(|e| e.to_string())?;
    Checkpoint::parse(&parsed.text).map_err(|e| e.to_string())
}

struct Rebuild {
    importer: Importer,
    /// Records that came before one they follow, by sequence number.
    ahead: BTreeMap<u64, Vec<u8>>,
    /// Hashes of the last records imported, oldest first.
    recent: VecDeque<Hash>,
    highest: u64,
    messages: u64,
    checkpoints: u64,
    /// Cosigned checkpoint notes, each once, for the cosignatures file.
    cosigned: Vec<String>,
    duplicates: u64,
    out_of_order: u64,
}

impl Rebuild {
    fn record(&mut self, bytes: &[u8], stream_seq: u64) -> Result<(), PullError> {
        let Some(seq) = record::peek_seq(bytes) else {
            return Err(PullError::BadMessage {
                stream_seq,
                what: "too short for a record".into(),
            });
        };
        self.highest = self.highest.max(seq);
        let next = self.importer.records();
        if seq < next {
            // Already imported: a copy is fine, anything else is not.
            let back = next - seq;
            let known = usize::try_from(back)
                .ok()
                .and_then(|b| self.recent.len().checked_sub(b))
                .and_then(|i| self.recent.get(i));
            if known.is_some_and(|h| *h != record_hash(bytes)) {
                return Err(PullError::Conflict { seq });
            }
            self.duplicates += 1;
            return Ok(());
        }
        if seq > next {
            self.out_of_order += 1;
            match self.ahead.entry(seq) {
                Entry::Vacant(v) => {
                    v.insert(bytes.to_vec());
                }
                Entry::Occupied(o) if o.get().as_slice() == bytes => self.duplicates += 1,
                Entry::Occupied(_) => return Err(PullError::Conflict { seq }),
            }
            if self.ahead.len() > MAX_AHEAD {
                return Err(PullError::Missing {
                    seq: next,
                    highest: self.highest,
                });
            }
            return Ok(());
        }
        self.import(bytes)?;
        while let Some(bytes) = self.ahead.remove(&self.importer.records()) {
            self.import(&bytes)?;
        }
        Ok(())
    }

    fn import(&mut self, bytes: &[u8]) -> Result<(), PullError> {
        let receipt = self.importer.push_record(bytes)?;
        self.recent.push_back(receipt.hash);
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        Ok(())
    }

    fn checkpoint(&mut self, bytes: &[u8], stream_seq: u64) -> Result<(), PullError> {
        let text = std::str::from_utf8(bytes).map_err(|_| PullError::BadMessage {
            stream_seq,
            what: "checkpoint note is not UTF-8".into(),
        })?;
        self.importer.push_checkpoint(text)?;
        self.checkpoints += 1;
        Ok(())
    }

    fn cosigned(&mut self, bytes: &[u8], stream_seq: u64) -> Result<(), PullError> {
        let text = std::str::from_utf8(bytes).map_err(|_| PullError::BadMessage {
            stream_seq,
            what: "cosigned note is not UTF-8".into(),
        })?;
        if !self.cosigned.iter().any(|n| n == text) {
            self.cosigned.push(text.to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::UNIX_EPOCH;
    use tokenmill_metering::{verified_checkpoints, Ledger, LedgerReader, RecordBody, Signer};
    use tokenmill_protocol::{FinishReason, KeyId, RequestId, TenantId, TokenCounts, UsageEvent};

    const ORIGIN: &str = "tokenmill.test/pull";

    fn signer() -> Signer {
        Signer::from_seed("pull-test", [5; 32]).expect("key")
    }

    /// The record bytes and notes of a closed ledger of `n` records.
    fn ledger(n: u64) -> (Vec<Vec<u8>>, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LedgerConfig {
            checkpoint_every_records: 0,
            checkpoint_interval: Duration::ZERO,
            ..LedgerConfig::new(dir.path(), ORIGIN)
        };
        let ledger = Ledger::open(config, signer()).expect("opens").0;
        let (tx, rx) = mpsc::channel();
        for i in 0..n {
            let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i);
            let body = RecordBody::Usage(UsageEvent {
                request_id: RequestId(format!("chatcmpl-pull-{i}")),
                tenant: TenantId("t".into()),
                key_id: KeyId("k".into()),
                model: "m".into(),
                tokens: TokenCounts {
                    prompt_tokens: i,
                    cached_prompt_tokens: 0,
                    completion_tokens: 7,
                },
                finish_reason: FinishReason::Stop,
                device_seconds: 0.25,
                arrived_at: at,
                finished_at: at,
            });
            let tx = tx.clone();
            ledger.append(
                &body,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
        }
        drop(tx);
        assert_eq!(rx.iter().filter(|r| r.is_ok()).count() as u64, n);
        ledger.close().expect("closes");
        let records = LedgerReader::open(dir.path(), 0)
            .expect("reader")
            .map(|r| r.expect("record").bytes)
            .collect();
        let notes = verified_checkpoints(dir.path(), &[signer().verifier()])
            .expect("notes")
            .into_iter()
            .map(|(_, c)| c.note)
            .collect();
        (records, notes)
    }

    fn rebuild(out: &Path) -> Rebuild {
        Rebuild {
            importer: Importer::create(LedgerConfig::new(out, ORIGIN), None).expect("importer"),
            ahead: BTreeMap::new(),
            recent: VecDeque::new(),
            highest: 0,
            messages: 0,
            checkpoints: 0,
            cosigned: Vec::new(),
            duplicates: 0,
            out_of_order: 0,
        }
    }

    #[test]
    fn records_out_of_order_and_copies_rebuild_the_ledger() {
        let (records, notes) = ledger(40);
        let out = tempfile::tempdir().expect("tempdir");
        let mut r = rebuild(&out.path().join("l"));
        // 0..10 in order, then 15..20 before 10..15 (a window that landed
        // late), then copies of 3 and 17, then the rest.
        let order: Vec<usize> = (0..10)
            .chain(15..20)
            .chain(10..15)
            .chain([3, 17])
            .chain(20..40)
            .collect();
        for i in order {
            r.record(&records[i], i as u64).expect("accepted");
        }
        for n in &notes {
            r.checkpoint(n.as_bytes(), 0).expect("note");
        }
        assert_eq!(r.importer.records(), 40);
        assert!(r.ahead.is_empty());
        assert_eq!(r.duplicates, 2);
        assert_eq!(r.out_of_order, 5);
        let report = r.importer.finish(&[signer().verifier()]).expect("verifies");
        assert_eq!(report.records, 40);
    }

    #[test]
    fn two_different_records_with_one_number_are_refused() {
        let (records, _) = ledger(10);
        let out = tempfile::tempdir().expect("tempdir");
        let mut r = rebuild(&out.path().join("l"));
        for (i, rec) in records.iter().enumerate().take(5) {
            r.record(rec, i as u64).expect("accepted");
        }
        let mut forged = records[2].clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(matches!(
            r.record(&forged, 99),
            Err(PullError::Conflict { seq: 2 })
        ));
        r.record(&records[7], 7).expect("held for later");
        let mut forged = records[7].clone();
        forged[last] ^= 1;
        assert!(matches!(
            r.record(&forged, 99),
            Err(PullError::Conflict { seq: 7 })
        ));
        assert!(matches!(
            r.record(&[1, 2], 99),
            Err(PullError::BadMessage { .. })
        ));
    }
}
