//! The log's side: submit a ledger's checkpoints to its witnesses and keep
//! the cosignatures in the ledger.
//!
//! A [`Submitter`] runs beside the ledger writer and never in its way: it
//! reads the checkpoints the writer has made durable, and for each witness
//! that has not cosigned the latest one it sends `add-checkpoint` with a
//! consistency proof from the size that witness last cosigned (learned from
//! the ledger's own `cosignatures` file at start, or from the witness's 409
//! answer). A cosignature is checked against the witness's key before it is
//! kept. A witness that is down or refuses is retried later, with a growing
//! pause; records are written and served meanwhile, and the witness catches
//! up on the newest checkpoint when it is back (one proof covers the whole
//! gap).

use crate::request::AddCheckpoint;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::cosignature::{self, CosignerKey};
use tokenmill_metering::hash::Hash;
use tokenmill_metering::keys::VerifierKey;
use tokenmill_metering::note;
use tokenmill_metering::witnessed::{CheckpointFollower, CosignatureLog};
use tokenmill_metering::{merkle, LedgerError, LedgerReader};

/// A witness to submit to: its submission prefix and its key.
#[derive(Clone, Debug)]
pub struct WitnessEndpoint {
    /// The submission prefix (`add-checkpoint` is appended).
    pub url: String,
    /// The key its cosignatures must verify with.
    pub key: CosignerKey,
}

/// Why a submitter could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The ledger's cosignatures file could not be opened or read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// What one witness has cosigned, and when to try it again.
struct Follower {
    endpoint: WitnessEndpoint,
    /// The size it last cosigned for us; `None` until known.
    cosigned: Option<u64>,
    retry_at: Instant,
    failures: u32,
}

/// Longest pause between tries at a witness that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Submits one ledger's checkpoints to its witnesses.
pub struct Submitter {
    dir: PathBuf,
    ledger_keys: Vec<VerifierKey>,
    followers: Vec<Follower>,
    leaves: Vec<Hash>,
    /// Reads the checkpoints the writer appends, each byte once.
    checkpoints: CheckpointFollower,
    /// The newest checkpoint, checked against the ledger's keys, and its
    /// signed note.
    latest: Option<(Checkpoint, String)>,
    log: CosignatureLog,
    client: reqwest::Client,
}

/// What happened to one submission.
enum Outcome {
    Cosigned,
    /// The witness holds another size: retry from it at once.
    Resync,
    Failed,
}

impl Submitter {
    /// A submitter for the ledger in `dir` (signed by `ledger_keys`) and
    /// `witnesses`.
    pub fn new(
        dir: &Path,
        ledger_keys: Vec<VerifierKey>,
        witnesses: Vec<WitnessEndpoint>,
    ) -> Result<Submitter, SubmitError> {
        let log = CosignatureLog::open(dir)?;
        let kept = log.notes()?;
        let now = Instant::now();
        let followers = witnesses
            .into_iter()
            .map(|endpoint| Follower {
                cosigned: last_cosigned(&kept, &endpoint.key),
                endpoint,
                retry_at: now,
                failures: 0,
            })
            .collect();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SubmitError::Client(e.to_string()))?;
        Ok(Submitter {
            dir: dir.to_owned(),
            ledger_keys,
            followers,
            leaves: Vec::new(),
            checkpoints: CheckpointFollower::new(dir),
            latest: None,
            log,
            client,
        })
    }

    /// Sizes each witness has cosigned, as far as this submitter knows.
    pub fn cosigned_sizes(&self) -> Vec<(String, Option<u64>)> {
        self.followers
            .iter()
            .map(|f| (f.endpoint.key.name().to_owned(), f.cosigned))
            .collect()
    }

    /// Makes every witness due now, whatever its pause (before the last
    /// round at shutdown).
    pub fn retry_now(&mut self) {
        for follower in &mut self.followers {
            follower.retry_at = Instant::now();
        }
    }

    /// Brings every witness that is due up to the latest checkpoint.
    pub async fn round(&mut self) {
        let newest = match self.checkpoints.poll() {
            // Only the newest matters: one proof covers every size before it.
            Ok(notes) => notes.into_iter().last(),
            Err(e) => {
                tracing::error!(error = %e, "witness submission: cannot read the checkpoints");
                return;
            }
        };
        if let Some(note) = newest {
            match Checkpoint::open(&note, &self.ledger_keys) {
                Ok((checkpoint, _)) => self.latest = Some((checkpoint, note)),
                Err(e) => {
                    tracing::error!(error = %e, "witness submission: the newest checkpoint does not verify");
                    return;
                }
            }
        }
        let Some((checkpoint, note)) = self.latest.clone() else {
            return;
        };
        if let Err(e) = self.read_leaves(checkpoint.size) {
            tracing::error!(error = %e, "witness submission: cannot read the records");
            return;
        }
        for i in 0..self.followers.len() {
            // A resync is answered at once, at most twice in a row.
            for _ in 0..3 {
                let follower = &self.followers[i];
                if follower.cosigned == Some(checkpoint.size) || Instant::now() < follower.retry_at
                {
                    break;
                }
                match self.submit(i, &checkpoint, &note).await {
                    Outcome::Cosigned => {
                        let f = &mut self.followers[i];
                        f.cosigned = Some(checkpoint.size);
                        f.failures = 0;
                        break;
                    }
                    Outcome::Resync => continue,
                    Outcome::Failed => {
                        let f = &mut self.followers[i];
                        f.failures += 1;
                        let pause = Duration::from_millis(500)
                            .saturating_mul(1 << f.failures.min(7))
                            .min(MAX_BACKOFF);
                        f.retry_at = Instant::now() + pause;
                        break;
                    }
                }
            }
        }
    }

    /// Reads leaf hashes of the records up to `size`.
    fn read_leaves(&mut self, size: u64) -> Result<(), tokenmill_metering::VerifyError> {
        if self.leaves.len() as u64 >= size {
            return Ok(());
        }
        let mut reader = LedgerReader::open(&self.dir, self.leaves.len() as u64)?;
        while (self.leaves.len() as u64) < size {
            match reader.next_record()? {
                Some(record) => self.leaves.push(record.leaf_hash()),
                None => break,
            }
        }
        Ok(())
    }

    async fn submit(&mut self, i: usize, checkpoint: &Checkpoint, signed_note: &str) -> Outcome {
        let follower = &self.followers[i];
        let name = follower.endpoint.key.name().to_owned();
        let old = follower.cosigned.unwrap_or(0).min(checkpoint.size);
        let proof = match merkle::consistency_proof(&self.leaves, old, checkpoint.size) {
            Ok(proof) => proof,
            Err(e) => {
                tracing::error!(witness = %name, error = %e, "cannot prove consistency");
                return Outcome::Failed;
            }
        };
        let body = AddCheckpoint {
            old_size: old,
            proof,
            note: signed_note.to_owned(),
        }
        .to_body();
        let url = format!(
            "{}/add-checkpoint",
            follower.endpoint.url.trim_end_matches('/')
        );
        let response = match self.client.post(&url).body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(witness = %name, error = %e, "witness unreachable; will retry");
                return Outcome::Failed;
            }
        };
        let status = response.status().as_u16();
        let is_size = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"text/x.tlog.size");
        let text = response.text().await.unwrap_or_default();
        match status {
            200 => self.keep(i, signed_note, &text),
            409 if is_size => match text.trim_end_matches('\n').parse::<u64>() {
                Ok(size) if size <= checkpoint.size => {
                    tracing::info!(witness = %name, size, "witness holds another size; resubmitting from it");
                    self.followers[i].cosigned = Some(size);
                    Outcome::Resync
                }
                _ => {
                    tracing::error!(witness = %name, answer = %text, "witness holds a size beyond this ledger");
                    Outcome::Failed
                }
            },
            _ => {
                tracing::error!(witness = %name, status, answer = %text.trim_end(), "witness refused the checkpoint");
                Outcome::Failed
            }
        }
    }

    /// Checks the witness's answer and keeps the cosigned note.
    fn keep(&mut self, i: usize, signed_note: &str, answer: &str) -> Outcome {
        let key = &self.followers[i].endpoint.key;
        let cosigned_note = format!("{signed_note}{answer}");
        let valid = note::parse(&cosigned_note).ok().and_then(|parsed| {
            cosignature::cosignatures(&parsed.text, &parsed.signatures, std::slice::from_ref(key))
                .ok()
                .filter(|found| !found.is_empty())
        });
        if valid.is_none() {
            tracing::error!(witness = %key.name(), "the witness's answer holds no valid cosignature by its key");
            return Outcome::Failed;
        }
        match self.log.append(&cosigned_note) {
            Ok(()) => Outcome::Cosigned,
            Err(e) => {
                tracing::error!(error = %e, "cannot keep a cosignature");
                Outcome::Failed
            }
        }
    }
}

/// The largest checkpoint size among `notes` that `key` validly cosigned.
fn last_cosigned(notes: &[String], key: &CosignerKey) -> Option<u64> {
    notes
        .iter()
        .filter_map(|n| {
            let parsed = note::parse(n).ok()?;
            let found = cosignature::cosignatures(
                &parsed.text,
                &parsed.signatures,
                std::slice::from_ref(key),
            )
            .ok()?;
            if found.is_empty() {
                return None;
            }
            Checkpoint::parse(&parsed.text).ok().map(|c| c.size)
        })
        .max()
}
