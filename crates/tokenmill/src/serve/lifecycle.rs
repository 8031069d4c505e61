//! The server's life after start: metrics installed, and at SIGTERM or
//! SIGINT a drain that lets requests finish, then cuts the rest (billed for
//! what they made).

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Duration;
use tokenmill_engine::Engine;
use tokenmill_protocol::FinishReason;
use tokenmill_server::Lifecycle;

/// Buckets of latency histograms, in seconds: 1 ms to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Buckets of per-step counts (sequences, tokens).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Installs the Prometheus recorder every metric goes to.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Prefix("tokenmill_step_".to_owned()), COUNT_BUCKETS)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    tokenmill_engine::telemetry::describe();
    tokenmill_server::telemetry::describe();
    crate::ledger_metrics::describe();
    Ok(handle)
}

/// Stops admitting (503 and failing readiness), lets requests in flight
/// finish until `timeout`, then cuts the rest (or at once on a second
/// signal), and waits until every request has ended.
pub async fn drain(engine: &Engine, lifecycle: &Lifecycle, timeout: Duration) {
    lifecycle.start_draining();
    tracing::info!(
        in_flight = engine.in_flight(),
        timeout_seconds = timeout.as_secs_f64(),
        "draining: new requests get 503"
    );
    let idle = async {
        while engine.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = idle => return,
        _ = tokio::time::sleep(timeout) => {
            tracing::warn!(in_flight = engine.in_flight(), "drain deadline passed: cutting the requests left");
        }
        _ = shutdown_signal() => {
            tracing::warn!(in_flight = engine.in_flight(), "second signal: cutting the requests left");
        }
    }
    engine.abort_all(FinishReason::Shutdown);
    while engine.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    interrupt.await.unwrap_or(());
}
