//! A usage log: every usage and capacity record as one JSON line, appended
//! and flushed as it is made.
//!
//! This is the plain record the engine's meter produces, for operators and
//! tests to read; the signed, hash-chained ledger builds on the same
//! records.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokenmill_protocol::{CapacityRecord, MeterSink, OnRecorded, RecordError, UsageEvent};

/// Appends records to a JSON-lines file.
pub struct UsageLog {
    file: Mutex<BufWriter<File>>,
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line<'a> {
    Usage(&'a UsageEvent),
    Capacity(&'a CapacityRecord),
}

impl UsageLog {
    /// Opens (or creates) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(UsageLog {
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    fn append(&self, line: Line<'_>) -> std::io::Result<()> {
        let result = (|| -> std::io::Result<()> {
            let mut file = self
                .file
                .lock()
                .map_err(|_| std::io::Error::other("usage log lock poisoned"))?;
            serde_json::to_writer(&mut *file, &line)?;
            file.write_all(b"\n")?;
            file.flush()
        })();
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot write the usage log");
        }
        result
    }
}

impl MeterSink for UsageLog {
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded) {
        then(
            self.append(Line::Usage(usage))
                .map_err(|e| RecordError::Write(e.to_string())),
        );
    }

    fn record_capacity(&self, capacity: &CapacityRecord) {
        // A lost capacity record is logged; it bills no client.
        let _ = self.append(Line::Capacity(capacity));
    }
}

/// Hands every record to each sink in turn; a usage record's callback runs
/// once every sink has recorded it, with the first failure if any.
pub struct Tee(pub Vec<Arc<dyn MeterSink>>);

impl MeterSink for Tee {
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded) {
        chain(self.0.clone(), usage.clone(), then);
    }

    fn record_capacity(&self, capacity: &CapacityRecord) {
        for sink in &self.0 {
            sink.record_capacity(capacity);
        }
    }

    fn is_healthy(&self) -> bool {
        self.0.iter().all(|s| s.is_healthy())
    }
}

/// Records `usage` in the first sink, and the rest from its callback, so
/// each sink has it durable before the next is asked (and the client last).
fn chain(mut sinks: Vec<Arc<dyn MeterSink>>, usage: UsageEvent, then: OnRecorded) {
    if sinks.is_empty() {
        return then(Ok(()));
    }
    let first = sinks.remove(0);
    let record = usage.clone();
    first.record_usage(
        &record,
        Box::new(move |result| match result {
            Ok(()) => chain(sinks, usage, then),
            Err(e) => then(Err(e)),
        }),
    );
}

/// Writes capacity records to the log output only, when no usage log is
/// kept.
pub struct TracingMeter;

impl MeterSink for TracingMeter {
    fn record_usage(&self, _: &UsageEvent, then: OnRecorded) {
        // The engine already logs every finished request.
        then(Ok(()));
    }

    fn record_capacity(&self, c: &CapacityRecord) {
        tracing::info!(
            device = %c.device,
            wall_seconds = c.wall_seconds,
            busy_seconds = c.busy_seconds,
            tokens = c.tokens,
            "capacity"
        );
    }
}
