//! Metrics of the ledger and its NATS export: how long a usage record takes
//! to become durable (the client waits for it), how many are waiting, and
//! how far the export lags.

use metrics::{describe_gauge, describe_histogram, gauge, histogram, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenmill_metering::Ledger;
use tokenmill_nats::ExporterHandle;
use tokenmill_protocol::{CapacityRecord, MeterSink, OnRecorded, UsageEvent};

/// Registers descriptions and units.
pub fn describe() {
    describe_histogram!(
        "tokenmill_ledger_append_seconds",
        Unit::Seconds,
        "Time from handing a usage record to the ledger to its fsync."
    );
    describe_gauge!(
        "tokenmill_ledger_backlog_records",
        "Usage records handed to the ledger and not yet durable."
    );
    describe_gauge!(
        "tokenmill_ledger_durable_records",
        "Records durable in the ledger since the server started."
    );
    describe_gauge!(
        "tokenmill_ledger_export_backlog_records",
        "Ledger records not yet acknowledged by NATS JetStream."
    );
    describe_gauge!(
        "tokenmill_ledger_export_connected",
        "1 while the NATS connection is up."
    );
}

/// The ledger, timed: every usage record's append latency and the records
/// in flight.
pub struct TimedLedger {
    ledger: Arc<Ledger>,
    pending: Arc<AtomicU64>,
}

impl TimedLedger {
    /// Times appends to `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        TimedLedger {
            ledger,
            pending: Arc::default(),
        }
    }
}

impl MeterSink for TimedLedger {
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded) {
        let started = Instant::now();
        let pending = self.pending.clone();
        gauge!("tokenmill_ledger_backlog_records")
            .set((pending.fetch_add(1, Ordering::SeqCst) + 1) as f64);
        self.ledger.record_usage(
            usage,
            Box::new(move |result| {
                histogram!("tokenmill_ledger_append_seconds")
                    .record(started.elapsed().as_secs_f64());
                gauge!("tokenmill_ledger_backlog_records")
                    .set(pending.fetch_sub(1, Ordering::SeqCst).saturating_sub(1) as f64);
                then(result);
            }),
        );
    }

    fn record_capacity(&self, capacity: &CapacityRecord) {
        self.ledger.record_capacity(capacity);
    }

    fn is_healthy(&self) -> bool {
        self.ledger.is_healthy()
    }
}

/// Publishes the ledger's and the exporter's counters every `every` until
/// the runtime stops.
pub async fn publish(
    ledger: Option<Arc<Ledger>>,
    exporter: Option<Arc<ExporterHandle>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Some(ledger) = &ledger {
            gauge!("tokenmill_ledger_durable_records").set(ledger.durable_records() as f64);
        }
        if let Some(exporter) = &exporter {
            let stats = exporter.stats();
            gauge!("tokenmill_ledger_export_backlog_records").set(stats.backlog as f64);
            gauge!("tokenmill_ledger_export_connected").set(if stats.connected {
                1.0
            } else {
                0.0
            });
        }
    }
}
