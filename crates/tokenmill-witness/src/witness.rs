//! The witness's one operation: check a checkpoint against what it cosigned
//! before, remember it, cosign it.

use crate::request::{AddCheckpoint, RequestError};
use crate::store::{Latest, Store, StoreError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::cosignature::{Cosigner, CosignerKey};
use tokenmill_metering::keys::VerifierKey;
use tokenmill_metering::merkle::{self, ProofError};
use tokenmill_metering::note::{self, NoteError};

/// Why the witness did not cosign; each maps to the HTTP status the
/// tlog-witness protocol gives it ([`AddError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The body is not an `add-checkpoint` request.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The note or the checkpoint inside it is malformed.
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
    /// No log with this origin is configured.
    #[error("unknown log {0:?}")]
    UnknownOrigin(String),
    /// No signature on the checkpoint verifies with the log's keys.
    #[error("the checkpoint is not signed by a key of {origin:?}: {reason}")]
    Untrusted {
        /// The log.
        origin: String,
        /// What the note check said.
        reason: NoteError,
    },
    /// The old size is beyond the checkpoint's size.
    #[error("old size {old} is larger than the checkpoint's size {size}")]
    OldAfterNew {
        /// The request's old size.
        old: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// The old size is not the size the witness last cosigned.
    #[error("the witness last cosigned size {latest} of this log, not {old}")]
    SizeConflict {
        /// The size the witness holds.
        latest: u64,
        /// The request's old size.
        old: u64,
    },
    /// Same size as the latest cosigned checkpoint, different root: two
    /// histories.
    #[error("size {size} was cosigned with another root: the log has forked")]
    Fork {
        /// The size both checkpoints claim.
        size: u64,
    },
    /// The consistency proof does not show the checkpoint extends the
    /// latest cosigned one.
    #[error("the consistency proof from {old} to {size} does not verify: {reason}")]
    Inconsistent {
        /// The latest cosigned size.
        old: u64,
        /// The checkpoint's size.
        size: u64,
        /// What the proof check said.
        reason: ProofError,
    },
    /// The new state could not be made durable, so nothing was cosigned.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AddError {
    /// The protocol's HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            AddError::Request(_) | AddError::Checkpoint(_) | AddError::OldAfterNew { .. } => 400,
            AddError::Untrusted { .. } => 403,
            AddError::UnknownOrigin(_) => 404,
            AddError::SizeConflict { .. } | AddError::Fork { .. } => 409,
            AddError::Inconsistent { .. } => 422,
            AddError::Store(_) => 500,
        }
    }
}

/// A witness: its key, the logs it follows with their keys, and its state.
pub struct Witness {
    cosigner: Cosigner,
    logs: HashMap<String, Vec<VerifierKey>>,
    /// Held from the size check until the new state is durable, so two
    /// requests can never both pass the check against the same old state
    /// (the rollback race the protocol warns of).
    store: Mutex<Store>,
}

impl Witness {
    /// A witness cosigning with `cosigner` the checkpoints of the logs in
    /// `logs` (origin and the keys trusted to sign it), keeping its state in
    /// `store`.
    pub fn new(cosigner: Cosigner, logs: HashMap<String, Vec<VerifierKey>>, store: Store) -> Self {
        Witness {
            cosigner,
            logs,
            store: Mutex::new(store),
        }
    }

    /// The public key that checks this witness's cosignatures.
    pub fn public_key(&self) -> CosignerKey {
        self.cosigner.public()
    }

    /// The size of the latest checkpoint cosigned for `origin` (0 if none).
    pub fn latest_size(&self, origin: &str) -> u64 {
        self.lock().latest(origin).map_or(0, |l| l.size)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half
        // updated (the file is replaced whole), so a poisoned lock is safe
        // to take over.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Handles an `add-checkpoint` request body; returns the cosignature
    /// line(s) to answer with.
    pub fn add_checkpoint(&self, body: &str) -> Result<String, AddError> {
        let request = AddCheckpoint::parse(body)?;
        let parsed = note::parse(&request.note).map_err(|e| AddError::Checkpoint(e.to_string()))?;
        let checkpoint =
            Checkpoint::parse(&parsed.text).map_err(|e| AddError::Checkpoint(e.to_string()))?;
        let origin = &checkpoint.origin;
        let keys = self
            .logs
            .get(origin)
            .ok_or_else(|| AddError::UnknownOrigin(origin.clone()))?;
        parsed.verify(keys).map_err(|reason| AddError::Untrusted {
            origin: origin.clone(),
            reason,
        })?;
        if request.old_size > checkpoint.size {
            return Err(AddError::OldAfterNew {
                old: request.old_size,
                size: checkpoint.size,
            });
        }
        let mut store = self.lock();
        let latest = store.latest(origin).cloned().unwrap_or(Latest {
            size: 0,
            root: merkle::empty_root(),
        });
        if request.old_size != latest.size {
            return Err(AddError::SizeConflict {
                latest: latest.size,
                old: request.old_size,
            });
        }
        if checkpoint.size == latest.size && checkpoint.root != latest.root {
            return Err(AddError::Fork {
                size: checkpoint.size,
            });
        }
        merkle::verify_consistency(
            latest.size,
            checkpoint.size,
            &latest.root,
            &checkpoint.root,
            &request.proof,
        )
        .map_err(|reason| AddError::Inconsistent {
            old: latest.size,
            size: checkpoint.size,
            reason,
        })?;
        store.set(
            origin,
            Latest {
                size: checkpoint.size,
                root: checkpoint.root,
            },
        )?;
        drop(store);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        tracing::info!(origin = %origin, size = checkpoint.size, "cosigned");
        Ok(self.cosigner.cosign(&parsed.text, now))
    }
}
