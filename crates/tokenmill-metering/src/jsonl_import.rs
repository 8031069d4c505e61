//! Rebuilding a ledger from its JSON lines export (with checkpoints, as
//! written by [`crate::export_jsonl_with_checkpoints`]).
//!
//! The export carries every field of every record, its sequence number, its
//! previous hash and its own hash, and the checkpoints' signed notes
//! verbatim. Each record is rebuilt from its fields, encoded canonically,
//! and must hash to the `hash` the line states: a line whose fields were
//! edited is refused, not imported with a new hash. The [`Importer`] then
//! checks the chain and, at the end, verifies the rebuilt directory with the
//! original's public keys, so a ledger that comes back from JSON is
//! byte-for-byte the ledger that went out.

use crate::export::parse_rfc3339;
use crate::hash::Hash;
use crate::import::{ImportError, Importer, LineProblem};
use crate::keys::VerifierKey;
use crate::record::{record_hash, Record, RecordBody};
use crate::verify::VerifyReport;
use crate::witnessed::{witnessed_checkpoints, CosignatureLog};
use crate::writer::LedgerConfig;
use serde::Deserialize;
use std::io::BufRead;
use tokenmill_protocol::{
    CapacityRecord, FinishReason, KeyId, RequestId, TenantCapacity, TenantId, TokenCounts,
    UsageEvent,
};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Usage {
        seq: u64,
        hash: String,
        prev: String,
        request_id: String,
        tenant: String,
        key_id: String,
        model: String,
        prompt_tokens: u64,
        cached_prompt_tokens: u64,
        completion_tokens: u64,
        finish_reason: String,
        device_seconds: f64,
        arrived_at: String,
        finished_at: String,
    },
    Capacity {
        seq: u64,
        hash: String,
        prev: String,
        device: String,
        start: String,
        end: String,
        wall_seconds: f64,
        busy_seconds: f64,
        tokens: u64,
        tenants: Vec<TenantLine>,
    },
    Checkpoint {
        size: u64,
        note: String,
    },
    CosignedCheckpoint {
        size: u64,
        note: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantLine {
    tenant: String,
    busy_seconds: f64,
    tokens: u64,
}

fn finish_reason(s: &str) -> Result<FinishReason, LineProblem> {
    Ok(match s {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "cancelled" => FinishReason::Cancelled,
        "error" => FinishReason::Error,
        "shutdown" => FinishReason::Shutdown,
        other => return Err(LineProblem::UnknownFinishReason(other.to_owned())),
    })
}

fn time(field: &'static str, s: &str) -> Result<std::time::SystemTime, LineProblem> {
    parse_rfc3339(s).ok_or_else(|| LineProblem::BadTime {
        field,
        text: s.to_owned(),
    })
}

/// The record a usage or capacity line describes, its stated hash, or the
/// checkpoint note a checkpoint line carries.
enum Parsed {
    Record(Record, String),
    Checkpoint(u64, String),
    /// A checkpoint note with witness cosignatures, for the `cosignatures`
    /// file.
    Cosigned(u64, String),
}

fn parse_line(text: &str) -> Result<Parsed, LineProblem> {
    let line: Line = serde_json::from_str(text)?;
    let prev_of =
        |prev: &str| Hash::from_hex(prev).ok_or_else(|| LineProblem::BadPrev(prev.to_owned()));
    Ok(match line {
        Line::Usage {
            seq,
            hash,
            prev,
            request_id,
            tenant,
            key_id,
            model,
            prompt_tokens,
            cached_prompt_tokens,
            completion_tokens,
            finish_reason: reason,
            device_seconds,
            arrived_at,
            finished_at,
        } => Parsed::Record(
            Record {
                seq,
                prev_hash: prev_of(&prev)?,
                body: RecordBody::Usage(UsageEvent {
                    request_id: RequestId(request_id),
                    tenant: TenantId(tenant),
                    key_id: KeyId(key_id),
                    model,
                    tokens: TokenCounts {
                        prompt_tokens,
                        cached_prompt_tokens,
                        completion_tokens,
                    },
                    finish_reason: finish_reason(&reason)?,
                    device_seconds,
                    arrived_at: time("arrived_at", &arrived_at)?,
                    finished_at: time("finished_at", &finished_at)?,
                }),
            },
            hash,
        ),
        Line::Capacity {
            seq,
            hash,
            prev,
            device,
            start,
            end,
            wall_seconds,
            busy_seconds,
            tokens,
            tenants,
        } => Parsed::Record(
            Record {
                seq,
                prev_hash: prev_of(&prev)?,
                body: RecordBody::Capacity(CapacityRecord {
                    device,
                    start: time("start", &start)?,
                    end: time("end", &end)?,
                    wall_seconds,
                    busy_seconds,
                    tokens,
                    tenants: tenants
                        .into_iter()
                        .map(|t| TenantCapacity {
                            tenant: TenantId(t.tenant),
                            busy_seconds: t.busy_seconds,
                            tokens: t.tokens,
                        })
                        .collect(),
                }),
            },
            hash,
        ),
        Line::Checkpoint { size, note } => Parsed::Checkpoint(size, note),
        Line::CosignedCheckpoint { size, note } => Parsed::Cosigned(size, note),
    })
}

/// Rebuilds a ledger in `config.dir` (missing or empty) from a JSON lines
/// export with checkpoints, and verifies it with `keys`.
pub fn import_jsonl(
    input: &mut dyn BufRead,
    config: LedgerConfig,
    keys: &[VerifierKey],
) -> Result<VerifyReport, ImportError> {
    let dir = config.dir.clone();
    let mut importer = Importer::create(config, None)?;
    let mut cosigned = Vec::new();
    let mut text = String::new();
    let mut line = 0u64;
    loop {
        text.clear();
        line += 1;
        let bad = |problem: LineProblem| ImportError::BadLine { line, problem };
        let n = input
            .read_line(&mut text)
            .map_err(|source| ImportError::ReadLine { line, source })?;
        if n == 0 {
            break;
        }
        let body = text.trim_end_matches(['\n', '\r']);
        if body.is_empty() {
            continue;
        }
        match parse_line(body).map_err(bad)? {
            Parsed::Record(record, stated) => {
                let bytes = record.encode().map_err(|e| bad(e.into()))?;
                let hash = record_hash(&bytes).to_hex();
                if hash != stated {
                    return Err(bad(LineProblem::HashMismatch {
                        seq: record.seq,
                        computed: hash,
                        stated,
                    }));
                }
                importer.push_record(&bytes)?;
            }
            Parsed::Checkpoint(size, note) => {
                if size > importer.records() {
                    return Err(bad(LineProblem::CheckpointAhead {
                        size,
                        records: importer.records(),
                    }));
                }
                importer.push_checkpoint(&note)?;
            }
            Parsed::Cosigned(size, note) => {
                if size > importer.records() {
                    return Err(bad(LineProblem::CheckpointAhead {
                        size,
                        records: importer.records(),
                    }));
                }
                cosigned.push(note);
            }
        }
    }
    let report = importer.finish(keys)?;
    if !cosigned.is_empty() {
        // Kept as exported; each must carry the ledger's signature over one
        // of its own checkpoints (which cosignatures count is the
        // verifier's choice of witness keys).
        let mut log = CosignatureLog::open(&dir)?;
        for note in &cosigned {
            log.append(note)?;
        }
        witnessed_checkpoints(&dir, keys, &[])?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(input: &[u8]) -> ImportError {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LedgerConfig::new(dir.path().join("ledger"), "test");
        import_jsonl(&mut &input[..], config, &[]).expect_err("refused")
    }

    #[test]
    fn unreadable_input_is_a_read_failure_not_a_bad_line() {
        let err = import(b"\n\xff\xfe\n");
        assert!(
            matches!(err, ImportError::ReadLine { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_lines_say_what_is_wrong_with_them() {
        let err = import(b"{\"type\": \"usage\"}\n");
        assert!(
            matches!(
                err,
                ImportError::BadLine {
                    line: 1,
                    problem: LineProblem::Syntax(_)
                }
            ),
            "{err}"
        );
        let err = import(b"{\"type\": \"checkpoint\", \"size\": 3, \"note\": \"n\"}\n");
        assert!(
            matches!(
                err,
                ImportError::BadLine {
                    line: 1,
                    problem: LineProblem::CheckpointAhead {
                        size: 3,
                        records: 0
                    }
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "line 1: checkpoint of size 3 before its records (0 so far)"
        );
    }
}
