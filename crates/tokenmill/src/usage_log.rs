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
use std::sync::Mutex;
use tokenmill_protocol::{CapacityRecord, MeterSink, OnRecorded, UsageEvent};

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
        then(self.append(Line::Usage(usage)).map_err(|e| e.to_string()));
    }

    fn record_capacity(&self, capacity: &CapacityRecord) {
        // A lost capacity record is logged; it bills no client.
        let _ = self.append(Line::Capacity(capacity));
    }
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
