//! Runs one load level: the warm-up, then the measured requests under the
//! level's load, with a progress bar, and returns every record.

use crate::client::HttpTarget;
use crate::engine_target::EngineTarget;
use crate::load::{Load, PoissonArrivals};
use crate::metrics::{Recorder, RequestRecord};
use crate::summary::{Slo, Summary};
use crate::workload::{BenchRequest, Stream, Workload};
use crate::{BenchError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where requests go.
pub enum Target {
    /// A server over HTTP.
    Http(HttpTarget),
    /// The engine in this process.
    Engine(EngineTarget),
}

impl Target {
    /// Sends one request and measures it.
    pub async fn send(&self, request: &BenchRequest, level_start: Instant) -> RequestRecord {
        match self {
            Target::Http(t) => t.send(request, level_start).await,
            Target::Engine(t) => t.send(request, level_start).await,
        }
    }
}

/// When a level stops sending.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// After this many measured requests.
    Requests(u64),
    /// After this many seconds (requests in flight then are waited for).
    Seconds(f64),
}

/// One level's settings.
#[derive(Clone, Debug)]
pub struct LevelSpec {
    /// The load.
    pub load: Load,
    /// When to stop.
    pub stop: Stop,
    /// Unmeasured requests first, sent at the level's concurrency.
    pub warmup: u64,
    /// Goodput objectives.
    pub slo: Option<Slo>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// One level's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelResult {
    /// The load.
    pub load: Load,
    /// Warm-up requests sent before measuring.
    pub warmup_requests: u64,
    /// Warm-up requests that failed.
    pub warmup_failed: u64,
    /// The figures.
    pub summary: Summary,
    /// Every measured request, by index.
    pub requests: Vec<RequestRecord>,
}

fn progress_bar(len: Option<u64>, message: String, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} requests, {elapsed} elapsed, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} requests, {elapsed} elapsed")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Sends `n` unmeasured requests of the warm-up stream, `width` at a time;
/// returns how many failed.
async fn warm_up(target: &Arc<Target>, workload: &Workload, n: u64, width: usize) -> Result<u64> {
    let requests: Vec<BenchRequest> = (0..n)
        .map(|i| workload.request(Stream::Warmup, i))
        .collect::<Result<_>>()?;
    let failed = Arc::new(AtomicU64::new(0));
    for batch in requests.chunks(width.max(1)) {
        let mut tasks = Vec::new();
        for r in batch {
            let (target, r, failed) = (target.clone(), r.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                if !target.send(&r, Instant::now()).await.ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
    Ok(failed.load(Ordering::Relaxed))
}

/// The measured requests, made in advance when their number is known (so
/// that making prompts costs nothing during the measurement and a workload
/// error stops the run before anything is sent), else on demand.
struct Requests {
    workload: Arc<Workload>,
    made: Option<Arc<Vec<BenchRequest>>>,
}

impl Requests {
    fn new(workload: Arc<Workload>, stop: Stop) -> Result<Self> {
        let made = match stop {
            Stop::Requests(n) => Some(Arc::new(
                (0..n)
                    .map(|i| workload.request(Stream::Measured, i))
                    .collect::<Result<Vec<_>>>()?,
            )),
            Stop::Seconds(_) => None,
        };
        Ok(Requests { workload, made })
    }

    fn get(&self, i: u64) -> Result<BenchRequest> {
        match &self.made {
            Some(all) => all
                .get(i as usize)
                .cloned()
                .ok_or_else(|| BenchError::Workload(format!("no request {i}"))),
            None => self.workload.request(Stream::Measured, i),
        }
    }
}

/// Whether request `i`, due `at` after the start, is still part of the level.
fn within(stop: Stop, i: u64, at: Duration) -> bool {
    match stop {
        Stop::Requests(n) => i < n,
        Stop::Seconds(s) => at.as_secs_f64() < s,
    }
}

/// Sends one measured request and records it; a workload failure becomes a
/// failed record rather than an abort.
async fn one(
    target: &Target,
    requests: &Requests,
    i: u64,
    level_start: Instant,
    out: &Mutex<Vec<RequestRecord>>,
    bar: &ProgressBar,
) {
    let record = match requests.get(i) {
        Ok(r) => target.send(&r, level_start).await,
        Err(e) => {
            let mut rec = Recorder::start(i, level_start, None, 0);
            rec.fail("workload", e.to_string());
            rec.finish()
        }
    };
    if let Ok(mut all) = out.lock() {
        all.push(record);
    }
    bar.inc(1);
}

/// Runs one level against `target`.
pub async fn run_level(
    target: Arc<Target>,
    workload: Arc<Workload>,
    spec: &LevelSpec,
) -> Result<LevelResult> {
    let requests = Arc::new(Requests::new(workload.clone(), spec.stop)?);
    let width = match spec.load {
        Load::Concurrency { concurrency } => concurrency,
        Load::RequestRate {
            max_concurrency, ..
        } => max_concurrency.unwrap_or(4),
    };
    let warmup_failed = if spec.warmup > 0 {
        let bar = progress_bar(None, format!("warm-up ({})", spec.load), spec.progress);
        let failed = warm_up(&target, &workload, spec.warmup, width).await?;
        bar.finish_and_clear();
        failed
    } else {
        0
    };
    let len = match spec.stop {
        Stop::Requests(n) => Some(n),
        Stop::Seconds(_) => None,
    };
    let bar = Arc::new(progress_bar(len, spec.load.to_string(), spec.progress));
    let out = Arc::new(Mutex::new(Vec::new()));
    let level_start = Instant::now();
    let stop = spec.stop;
    match spec.load {
        Load::Concurrency { concurrency } => {
            if concurrency == 0 {
                return Err(BenchError::Config(
                    "concurrency must be at least 1".to_owned(),
                ));
            }
            let next = Arc::new(AtomicU64::new(0));
            let mut clients = Vec::new();
            for _ in 0..concurrency {
                let (target, requests, out, bar, next) = (
                    target.clone(),
                    requests.clone(),
                    out.clone(),
                    bar.clone(),
                    next.clone(),
                );
                clients.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if !within(stop, i, level_start.elapsed()) {
                            break;
                        }
                        one(&target, &requests, i, level_start, &out, &bar).await;
                    }
                }));
            }
            for c in clients {
                let _ = c.await;
            }
        }
        Load::RequestRate {
            rate,
            max_concurrency,
        } => {
            if rate.is_nan() || rate <= 0.0 {
                return Err(BenchError::Config(
                    "the request rate must be positive".to_owned(),
                ));
            }
            let slots = max_concurrency.map(|m| Arc::new(tokio::sync::Semaphore::new(m.max(1))));
            let mut tasks = Vec::new();
            for (i, at) in (0u64..).zip(PoissonArrivals::new(rate, workload.seed())) {
                let at = Duration::from_secs_f64(at);
                if !within(stop, i, at) {
                    break;
                }
                tokio::time::sleep_until((level_start + at).into()).await;
                let permit = match &slots {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                };
                let (target, requests, out, bar) =
                    (target.clone(), requests.clone(), out.clone(), bar.clone());
                tasks.push(tokio::spawn(async move {
                    one(&target, &requests, i, level_start, &out, &bar).await;
                    drop(permit);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    bar.finish_and_clear();
    let mut records = match Arc::try_unwrap(out) {
        Ok(m) => m.into_inner().unwrap_or_default(),
        Err(shared) => shared.lock().map(|v| v.clone()).unwrap_or_default(),
    };
    records.sort_by_key(|r| r.index);
    // From the first send to the last end.
    let first = records
        .iter()
        .map(|r| r.start_s)
        .fold(f64::INFINITY, f64::min);
    let last = records
        .iter()
        .map(|r| r.start_s + r.e2e_ms / 1000.0)
        .fold(0.0, f64::max);
    let duration_s = if records.is_empty() {
        0.0
    } else {
        last - first
    };
    Ok(LevelResult {
        load: spec.load,
        warmup_requests: spec.warmup,
        warmup_failed,
        summary: Summary::of(&records, duration_s, spec.slo.as_ref()),
        requests: records,
    })
}
