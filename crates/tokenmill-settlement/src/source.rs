//! What settlement reads from a ledger: its signed checkpoints and the facts
//! of the records they cover, from a ledger that verified first.
//!
//! Settlement never reads an unverified ledger: [`load`] runs the full
//! offline verification of tokenmill-metering, then reads the records again
//! and recomputes the Merkle root at every checkpoint it will rely on, so
//! the figures are bound to the signed roots even if the directory changed
//! between the two passes. Records after the last checkpoint are not signed
//! yet and are not read.

use crate::error::SettleError;
use crate::money;
use crate::period::{instant_of, Instant};
use std::path::Path;
use tokenmill_metering::cosignature::CosignerKey;
use tokenmill_metering::merkle::{self, CompactTree};
use tokenmill_metering::witnessed::witnessed_checkpoints;
use tokenmill_metering::{Hash, LedgerReader, RecordBody, VerifierKey};

/// A signed checkpoint, as a statement names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The ledger's origin line.
    pub origin: String,
    /// Records it covers.
    pub size: u64,
    /// Merkle root of those records.
    pub root: Hash,
    /// When the writer signed it (milliseconds since the Unix epoch), if the
    /// note says.
    pub time_ms: Option<u64>,
    /// The witnesses that cosigned it, when settling on witnessed
    /// checkpoints only ([`load_witnessed`]).
    pub cosigned_by: Vec<String>,
}

/// What one usage record bills.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageFact {
    /// The tenant billed.
    pub tenant: String,
    /// The model served.
    pub model: String,
    /// Prompt tokens computed (prompt minus cached).
    pub input: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_input: u64,
    /// Completion tokens.
    pub output: u64,
}

/// What one capacity record measures, in whole micro-seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityFact {
    /// Wall time of the interval.
    pub wall_us: i64,
    /// Time the device was busy serving.
    pub busy_us: i64,
}

/// The part of a record settlement uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FactBody {
    /// A usage record.
    Usage(UsageFact),
    /// A capacity record.
    Capacity(CapacityFact),
}

/// One record's facts and its place and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// Its sequence number.
    pub seq: u64,
    /// The time that places it in a month and a contract period: a usage
    /// record's `finished_at`, a capacity record's `start` (whole seconds).
    pub time: Instant,
    /// What it says.
    pub body: FactBody,
}

/// A verified ledger, reduced to what settlement needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedLedger {
    /// Every checkpoint, in file order.
    pub checkpoints: Vec<SignedCheckpoint>,
    /// The facts of the records covered by the largest checkpoint, by
    /// sequence number.
    pub facts: Vec<Fact>,
}

/// Verifies the ledger in `dir` with `keys` and reads its signed records.
pub fn load(dir: &Path, keys: &[VerifierKey]) -> Result<VerifiedLedger, SettleError> {
    tokenmill_metering::verify(dir, keys)?;
    let checkpoints: Vec<SignedCheckpoint> = tokenmill_metering::verified_checkpoints(dir, keys)?
        .into_iter()
        .map(|(_, v)| SignedCheckpoint {
            origin: v.checkpoint.origin,
            size: v.checkpoint.size,
            root: v.checkpoint.root,
            time_ms: v.checkpoint.time_ms,
            cosigned_by: Vec::new(),
        })
        .collect();
    let signed = checkpoints.iter().map(|c| c.size).max().unwrap_or(0);
    let mut reader = LedgerReader::open(dir, 0)?;
    let mut tree = CompactTree::new();
    let mut facts = Vec::new();
    check_roots(&checkpoints, &tree)?;
    while tree.size() < signed {
        let Some(stored) = reader.next_record()? else {
            return Err(SettleError::Inconsistent(format!(
                "{} records read, checkpoints cover {signed}",
                tree.size()
            )));
        };
        tree.push(merkle::leaf_hash(&stored.bytes));
        check_roots(&checkpoints, &tree)?;
        facts.push(fact(stored.seq, &stored.record.body)?);
    }
    Ok(VerifiedLedger { checkpoints, facts })
}

/// [`load`], then keeps only the checkpoints that at least `min_cosigners`
/// of the witnesses in `witness_keys` cosigned (each naming them), and the
/// records those cover: a statement is then computed from a history the
/// witnesses saw, and a ledger rewritten after the fact cannot be settled
/// on (its checkpoints carry no valid cosignature).
pub fn load_witnessed(
    dir: &Path,
    keys: &[VerifierKey],
    witness_keys: &[CosignerKey],
    min_cosigners: usize,
) -> Result<VerifiedLedger, SettleError> {
    let mut ledger = load(dir, keys)?;
    let witnessed = witnessed_checkpoints(dir, keys, witness_keys)?;
    ledger.checkpoints.retain_mut(|c| {
        let cosigners = witnessed
            .iter()
            .find(|w| w.checkpoint.size == c.size && w.checkpoint.root == c.root)
            .map(|w| w.cosigned_by.iter().map(|x| x.witness.clone()).collect())
            .unwrap_or_default();
        c.cosigned_by = cosigners;
        c.cosigned_by.len() >= min_cosigners.max(1)
    });
    let Some(covered) = ledger.checkpoints.iter().map(|c| c.size).max() else {
        return Err(SettleError::NotWitnessed { min_cosigners });
    };
    ledger.facts.retain(|f| f.seq < covered);
    Ok(ledger)
}

fn check_roots(checkpoints: &[SignedCheckpoint], tree: &CompactTree) -> Result<(), SettleError> {
    let size = tree.size();
    let mut root = None;
    for c in checkpoints.iter().filter(|c| c.size == size) {
        let r = *root.get_or_insert_with(|| tree.root());
        if c.root != r {
            return Err(SettleError::Inconsistent(format!(
                "the checkpoint of {size} records signs root {}, the records give {r}",
                c.root
            )));
        }
    }
    Ok(())
}

/// The facts of one record.
pub fn fact(seq: u64, body: &RecordBody) -> Result<Fact, SettleError> {
    Ok(match body {
        RecordBody::Usage(u) => {
            let t = &u.tokens;
            let input = t
                .prompt_tokens
                .checked_sub(t.cached_prompt_tokens)
                .ok_or_else(|| SettleError::BadRecord {
                    seq,
                    message: format!(
                        "{} cached prompt tokens exceed its {} prompt tokens",
                        t.cached_prompt_tokens, t.prompt_tokens
                    ),
                })?;
            Fact {
                seq,
                time: instant_of(u.finished_at),
                body: FactBody::Usage(UsageFact {
                    tenant: u.tenant.0.clone(),
                    model: u.model.clone(),
                    input,
                    cached_input: t.cached_prompt_tokens,
                    output: t.completion_tokens,
                }),
            }
        }
        RecordBody::Capacity(c) => {
            let bad = |e: SettleError| SettleError::BadRecord {
                seq,
                message: e.to_string(),
            };
            Fact {
                seq,
                time: instant_of(c.start),
                body: FactBody::Capacity(CapacityFact {
                    wall_us: money::seconds_to_micros(c.wall_seconds, "wall_seconds")
                        .map_err(bad)?,
                    busy_us: money::seconds_to_micros(c.busy_seconds, "busy_seconds")
                        .map_err(bad)?,
                }),
            }
        }
    })
}
