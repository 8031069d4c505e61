//! Export of records as JSON lines, for tools that do not read the binary
//! format (jq, spreadsheets, a data warehouse).
//!
//! One object per record, fields in a fixed order: `seq`, `hash` and `prev`
//! (hex), `type` ("usage" or "capacity"), then the body's fields. Times are
//! RFC 3339 in UTC with nanoseconds, the form every JSON tool parses. The
//! export is a view, not a proof: what is signed is the binary record.

use crate::checkpoint::Checkpoint;
use crate::codec;
use crate::error::VerifyError;
use crate::note;
use crate::reader::{self, LedgerReader, StoredRecord, TailPolicy, TornTail};
use crate::record::RecordBody;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The ledger is damaged.
    #[error(transparent)]
    Ledger(#[from] VerifyError),
    /// Writing the output failed.
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
    /// A checkpoint note does not parse.
    #[error("checkpoint note at byte {offset} of the checkpoints file: {message}")]
    Checkpoint {
        /// Offset of its frame.
        offset: u64,
        /// What is wrong.
        message: String,
    },
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    /// Lines written.
    pub records: u64,
    /// A damaged end of the last segment where the export stopped (a crash's
    /// torn tail, or a record being written right now).
    pub torn: Option<TornTail>,
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    hash: String,
    prev: String,
    #[serde(flatten)]
    body: Body<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Body<'a> {
    Usage {
        request_id: &'a str,
        tenant: &'a str,
        key_id: &'a str,
        model: &'a str,
        prompt_tokens: u64,
        cached_prompt_tokens: u64,
        completion_tokens: u64,
        finish_reason: &'static str,
        device_seconds: f64,
        arrived_at: String,
        finished_at: String,
    },
    Capacity {
        device: &'a str,
        start: String,
        end: String,
        wall_seconds: f64,
        busy_seconds: f64,
        tokens: u64,
        tenants: Vec<Tenant<'a>>,
    },
}

#[derive(Serialize)]
struct Tenant<'a> {
    tenant: &'a str,
    busy_seconds: f64,
    tokens: u64,
}

/// The JSON object of one record, without a trailing newline.
pub fn record_json(record: &StoredRecord) -> String {
    let body = match &record.record.body {
        RecordBody::Usage(u) => Body::Usage {
            request_id: &u.request_id.0,
            tenant: &u.tenant.0,
            key_id: &u.key_id.0,
            model: &u.model,
            prompt_tokens: u.tokens.prompt_tokens,
            cached_prompt_tokens: u.tokens.cached_prompt_tokens,
            completion_tokens: u.tokens.completion_tokens,
            finish_reason: u.finish_reason.as_str(),
            device_seconds: u.device_seconds,
            arrived_at: rfc3339(u.arrived_at),
            finished_at: rfc3339(u.finished_at),
        },
        RecordBody::Capacity(c) => Body::Capacity {
            device: &c.device,
            start: rfc3339(c.start),
            end: rfc3339(c.end),
            wall_seconds: c.wall_seconds,
            busy_seconds: c.busy_seconds,
            tokens: c.tokens,
            tenants: c
                .tenants
                .iter()
                .map(|t| Tenant {
                    tenant: &t.tenant.0,
                    busy_seconds: t.busy_seconds,
                    tokens: t.tokens,
                })
                .collect(),
        },
    };
    let line = Line {
        seq: record.seq,
        hash: record.hash.to_hex(),
        prev: record.record.prev_hash.to_hex(),
        body,
    };
    // Serializing plain strings and finite numbers cannot fail; keep a
    // visible marker rather than panic if it ever does.
    serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Writes every record of `dir` to `out` as JSON lines.
pub fn export_jsonl(dir: &Path, out: &mut dyn Write) -> Result<ExportReport, ExportError> {
    export(dir, out, false)
}

/// Writes every record of `dir` to `out` as JSON lines, and after the
/// record that completes each signed checkpoint's tree, that checkpoint
/// (`{"type":"checkpoint","size":N,"note":"..."}`, the signed note
/// verbatim), so that [`crate::import_jsonl`] can rebuild a ledger that
/// verifies with the original's keys. Notes are copied unchecked (an
/// export needs no key); a note that does not parse is an error.
pub fn export_jsonl_with_checkpoints(
    dir: &Path,
    out: &mut dyn Write,
) -> Result<ExportReport, ExportError> {
    export(dir, out, true)
}

#[derive(Serialize)]
struct CheckpointLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    note: &'a str,
}

fn export(dir: &Path, out: &mut dyn Write, checkpoints: bool) -> Result<ExportReport, ExportError> {
    let mut notes: Vec<(u64, &'static str, String)> = Vec::new();
    if checkpoints {
        let (stored, _) = reader::read_notes(dir, TailPolicy::Tolerate)?;
        let (cosigned, _) = reader::read_note_file(
            dir,
            crate::frame::COSIGNATURES_FILE,
            crate::frame::FileKind::Cosignatures,
            TailPolicy::Tolerate,
        )?;
        let kinds = stored
            .into_iter()
            .map(|n| ("checkpoint", n))
            .chain(cosigned.into_iter().map(|n| ("cosigned_checkpoint", n)));
        for (kind, n) in kinds {
            let size = note::parse(&n.note)
                .map_err(|e| e.to_string())
                .and_then(|p| Checkpoint::parse(&p.text).map_err(|e| e.to_string()))
                .map_err(|e| ExportError::Checkpoint {
                    offset: n.offset,
                    message: e,
                })?
                .size;
            notes.push((size, kind, n.note));
        }
        // By size, each checkpoint before its cosigned copies (stable).
        notes.sort_by_key(|(size, kind, _)| (*size, *kind == "cosigned_checkpoint"));
    }
    let mut pending = notes.iter().peekable();
    let mut emit_due = |out: &mut dyn Write, size: u64| -> std::io::Result<()> {
        while let Some((s, kind, note)) = pending.next_if(|(s, _, _)| *s <= size) {
            let line = CheckpointLine {
                kind,
                size: *s,
                note,
            };
            // A string and an integer always serialize.
            let text = serde_json::to_string(&line).unwrap_or_default();
            out.write_all(text.as_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(())
    };
    emit_due(out, 0)?;
    let mut reader = LedgerReader::open(dir, 0)?;
    let mut records = 0;
    while let Some(r) = reader.next_record()? {
        out.write_all(record_json(&r).as_bytes())?;
        out.write_all(b"\n")?;
        records += 1;
        emit_due(out, records)?;
    }
    out.flush()?;
    Ok(ExportReport {
        records,
        torn: reader.torn_tail().cloned(),
    })
}

/// An instant as RFC 3339 UTC with nine fractional digits, e.g.
/// `2024-05-01T12:00:00.000000000Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let Some((secs, nanos)) = codec::split_time(t) else {
        return String::from("out-of-range");
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses what [`rfc3339`] writes (`YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, nine
/// fractional digits), and nothing else, so that an instant read back is the
/// instant written.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 30 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'.' || b[29] != b'Z' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let s = text.get(from..to)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, s) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let nanos = u32::try_from(num(20, 29)?).ok()?;
    if !(1..=12).contains(&m) || d < 1 || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = days_from_civil(y, m as u32, d as u32);
    // A day past the month's end (31 April) would not print back the same.
    if civil_from_days(days) != (y, m as u32, d as u32) {
        return None;
    }
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    codec::join_time(secs, nanos)
}

/// Days since 1970-01-01 of a date of the proleptic Gregorian calendar
/// (the inverse of [`civil_from_days`], counting years from March so the
/// leap day ends the year).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (y, m) = if month <= 2 {
        (year - 1, i64::from(month) + 9)
    } else {
        (year, i64::from(month) - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * m + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Year, month, day of the proleptic Gregorian calendar for a count of days
/// since 1970-01-01 (the era-based method: 400-year cycles of 146,097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64, n: u32| UNIX_EPOCH + Duration::new(s, n);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(at(951_782_400, 5)),
            "2000-02-29T00:00:00.000000005Z"
        );
        assert_eq!(
            rfc3339(at(1_700_000_000, 123_456_789)),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            rfc3339(at(4_102_444_799, 0)),
            "2099-12-31T23:59:59.000000000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::new(1, 0)),
            "1969-12-31T23:59:59.000000000Z"
        );
        // Every day for 1,000 years round-trips through a day counter.
        let mut prev = civil_from_days(-1);
        for day in 0..365_250 {
            let cur = civil_from_days(day);
            assert!(cur > prev, "day {day}: {cur:?} after {prev:?}");
            assert_eq!(days_from_civil(cur.0, cur.1, cur.2), day);
            prev = cur;
        }
    }

    #[test]
    fn rfc3339_parses_what_it_prints() {
        for (s, n) in [
            (0, 0),
            (951_782_400, 5),
            (1_700_000_000, 123_456_789),
            (4_102_444_799, 999_999_999),
        ] {
            let t = UNIX_EPOCH + Duration::new(s, n);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        let before = UNIX_EPOCH - Duration::new(1, 1);
        assert_eq!(parse_rfc3339(&rfc3339(before)), Some(before));
        for bad in [
            "2023-11-14T22:13:20.12345678Z",
            "2023-11-14T22:13:20.123456789",
            "2023-04-31T00:00:00.000000000Z",
            "2023-13-01T00:00:00.000000000Z",
            "2023-11-14T24:00:00.000000000Z",
            "2023-11-14 22:13:20.123456789Z",
            "+023-11-14T22:13:20.123456789Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
