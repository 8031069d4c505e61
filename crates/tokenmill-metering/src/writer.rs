//! The ledger writer: group commit on a thread of its own.
//!
//! The engine's step loop appends from its own thread and must never wait for
//! a disk. [`Ledger::append`] encodes the record on the caller's thread and
//! queues it; the writer thread takes everything queued, chains and frames it,
//! writes it with one `write` and one `fdatasync`, and only then calls each
//! record's callback, in order. Under load a batch holds every record that
//! arrived during the previous fsync, so the cost of a sync is shared.
//!
//! After any write or sync failure the ledger turns unhealthy and refuses
//! every later append (fail closed): the server answers 503 rather than serve
//! tokens it cannot bill.

use crate::checkpoint;
use crate::error::LedgerError;
use crate::hash::Hash;
use crate::keys::Signer;
use crate::record::{EncodedBody, RecordBody};
use crate::store::{OpenReport, Receipt, Store};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokenmill_protocol::{CapacityRecord, MeterSink, OnRecorded, RecordError, UsageEvent};

/// Called once per appended record, on the writer thread: `Ok` once the
/// record is durable, `Err` if it never will be. It should only hand the
/// result on (send a response, a channel message): the next batch waits
/// for it.
pub type DurableCallback = Box<dyn FnOnce(Result<Receipt, LedgerError>) + Send>;

/// Smallest segment size accepted: a header and a few records.
pub const MIN_SEGMENT_BYTES: u64 = 256;

/// Where and how a ledger is written.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// The ledger directory (created if missing).
    pub dir: PathBuf,
    /// The origin line of its checkpoints: a name for this ledger, the same
    /// for its whole life (e.g. `tokenmill.example.com/ledger/eu-1`).
    pub origin: String,
    /// A segment is closed and a new one started before it would exceed
    /// this many bytes (default 64 MiB).
    pub segment_max_bytes: u64,
    /// Sign a checkpoint after this many new records (0: not by count;
    /// default 10,000).
    pub checkpoint_every_records: u64,
    /// Sign a checkpoint when records have waited this long since the last
    /// one (zero: not by time; default 1 s).
    pub checkpoint_interval: Duration,
}

impl LedgerConfig {
    /// The defaults for a directory and origin.
    pub fn new(dir: impl Into<PathBuf>, origin: impl Into<String>) -> LedgerConfig {
        LedgerConfig {
            dir: dir.into(),
            origin: origin.into(),
            segment_max_bytes: 64 << 20,
            checkpoint_every_records: 10_000,
            checkpoint_interval: Duration::from_secs(1),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), LedgerError> {
        if !checkpoint::valid_origin(&self.origin) {
            return Err(LedgerError::Config(format!(
                "origin {:?} must be non-empty without control characters",
                self.origin
            )));
        }
        if self.segment_max_bytes < MIN_SEGMENT_BYTES {
            return Err(LedgerError::Config(format!(
                "segment_max_bytes must be at least {MIN_SEGMENT_BYTES}"
            )));
        }
        Ok(())
    }
}

/// What the ledger held when it was closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReport {
    /// Records in the ledger.
    pub records: u64,
    /// Their Merkle root.
    pub root: Hash,
    /// Size of the last checkpoint written (equal to `records` after a
    /// healthy close).
    pub last_checkpoint_size: Option<u64>,
}

struct Pending {
    body: EncodedBody,
    done: DurableCallback,
}

#[derive(Default)]
struct Queue {
    items: Vec<Pending>,
    closing: bool,
    /// The writer is waiting for work and must be woken.
    idle: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    healthy: AtomicBool,
    durable: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Callbacks run outside the lock, so a poisoned lock can only come
        // from a bug in this file; the queue itself stays consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cheap handle on a ledger's health, for request handlers that answer
/// 503 while the ledger cannot write.
#[derive(Clone)]
pub struct LedgerHealth(Arc<Shared>);

impl LedgerHealth {
    /// Whether appends are accepted.
    pub fn is_healthy(&self) -> bool {
        self.0.healthy.load(Ordering::Acquire)
    }

    /// Records durable so far (the next record's sequence number).
    pub fn durable_records(&self) -> u64 {
        self.0.durable.load(Ordering::Acquire)
    }
}

/// An open ledger with its writer thread.
pub struct Ledger {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Result<CloseReport, LedgerError>>>>,
}

impl Ledger {
    /// Opens (or creates) the ledger in `config.dir`, recovering its state
    /// and setting aside a torn tail, and starts the writer thread.
    /// Checkpoints are signed with `signer` from here on (a new key here is
    /// how keys rotate).
    pub fn open(config: LedgerConfig, signer: Signer) -> Result<(Ledger, OpenReport), LedgerError> {
        config.validate()?;
        let (store, report) = Store::open(&config.dir, &config.origin, config.segment_max_bytes)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            healthy: AtomicBool::new(true),
            durable: AtomicU64::new(store.next_seq()),
        });
        let thread_shared = Arc::clone(&shared);
        let worker = Worker {
            shared: thread_shared,
            store,
            signer,
            last_checkpoint_at: Instant::now(),
            config,
        };
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || worker.run())
            .map_err(|e| LedgerError::Io {
                path: PathBuf::from("<ledger-writer thread>"),
                source: e,
            })?;
        Ok((
            Ledger {
                shared,
                thread: Mutex::new(Some(handle)),
            },
            report,
        ))
    }

    /// Queues `body` and returns at once. `on_durable` is called exactly
    /// once: with the receipt after the record's fsync, or with an error if
    /// the record is invalid (at once, on this thread), the ledger is
    /// unhealthy or closed (at once, on this thread), or its batch fails.
    pub fn append(&self, body: &RecordBody, on_durable: DurableCallback) {
        match body.encode() {
            Ok(encoded) => self.append_encoded(encoded, on_durable),
            Err(e) => on_durable(Err(LedgerError::Invalid(e))),
        }
    }

    /// [`Ledger::append`] for a body already encoded.
    pub fn append_encoded(&self, body: EncodedBody, on_durable: DurableCallback) {
        if !self.is_healthy() {
            on_durable(Err(LedgerError::Unhealthy));
            return;
        }
        let mut q = self.shared.lock();
        if q.closing {
            drop(q);
            on_durable(Err(LedgerError::Closed));
            return;
        }
        q.items.push(Pending {
            body,
            done: on_durable,
        });
        if q.idle {
            q.idle = false;
            self.shared.wake.notify_one();
        }
    }

    /// Whether appends are accepted: false after a write failure.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// A handle for reading health from other threads.
    pub fn health(&self) -> LedgerHealth {
        LedgerHealth(Arc::clone(&self.shared))
    }

    /// Records durable so far.
    pub fn durable_records(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Writes everything queued, signs a final checkpoint, and stops the
    /// writer thread. Appends after this get [`LedgerError::Closed`]. A
    /// second call returns [`LedgerError::Closed`].
    pub fn close(&self) -> Result<CloseReport, LedgerError> {
        {
            let mut q = self.shared.lock();
            q.closing = true;
            self.shared.wake.notify_one();
        }
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match handle {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(LedgerError::WriteFailed("writer thread panicked".into()))),
            None => Err(LedgerError::Closed),
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let running = self.thread.lock().map(|t| t.is_some()).unwrap_or(false);
        if running {
            if let Err(e) = self.close() {
                tracing::error!("ledger: close on drop failed: {e}");
            }
        }
    }
}

/// The engine's view of the ledger: usage records report durability through
/// the protocol's callback (the engine finishes the request from it), capacity
/// records are fire-and-forget (failures are logged and turn the ledger
/// unhealthy), and health is the writer's.
impl MeterSink for Ledger {
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded) {
        self.append(
            &RecordBody::Usage(usage.clone()),
            Box::new(move |result| {
                then(
                    result
                        .map(|_| ())
                        .map_err(|e| RecordError::Write(e.to_string())),
                )
            }),
        );
    }

    fn record_capacity(&self, capacity: &CapacityRecord) {
        self.append(
            &RecordBody::Capacity(capacity.clone()),
            Box::new(log_failure),
        );
    }

    fn is_healthy(&self) -> bool {
        Ledger::is_healthy(self)
    }
}

fn log_failure(result: Result<Receipt, LedgerError>) {
    if let Err(e) = result {
        tracing::error!("ledger: record not written: {e}");
    }
}

/// The state the writer thread owns.
struct Worker {
    shared: Arc<Shared>,
    store: Store,
    signer: Signer,
    last_checkpoint_at: Instant,
    config: LedgerConfig,
}

/// Fails the ledger closed if the writer thread dies of a panic (a bug), so
/// that no caller waits forever for a callback.
struct PanicGuard(Arc<Shared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.0.healthy.store(false, Ordering::Release);
        let items = {
            let mut q = self.0.lock();
            q.closing = true;
            std::mem::take(&mut q.items)
        };
        for p in items {
            call(
                p.done,
                Err(LedgerError::WriteFailed(
                    "ledger writer thread panicked".into(),
                )),
            );
        }
    }
}

impl Worker {
    fn run(mut self) -> Result<CloseReport, LedgerError> {
        let _guard = PanicGuard(Arc::clone(&self.shared));
        let mut batch = Vec::new();
        loop {
            let closing = self.wait_for_work(&mut batch);
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            if closing {
                break;
            }
            if self.checkpoint_due() {
                self.checkpoint();
            }
        }
        if self.is_healthy() {
            self.checkpoint();
        }
        let report = CloseReport {
            records: self.store.next_seq(),
            root: self.store.root(),
            last_checkpoint_size: self.store.last_checkpoint_size(),
        };
        if self.is_healthy() {
            Ok(report)
        } else {
            Err(LedgerError::Unhealthy)
        }
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// Waits until records are queued, the ledger is closing, or a
    /// checkpoint falls due; moves the queued records into `batch` and
    /// says whether the ledger is closing.
    fn wait_for_work(&self, batch: &mut Vec<Pending>) -> bool {
        let mut q = self.shared.lock();
        while q.items.is_empty() && !q.closing {
            let deadline = self.checkpoint_deadline();
            q.idle = true;
            match deadline {
                None => {
                    q = self
                        .shared
                        .wake
                        .wait(q)
                        .unwrap_or_else(PoisonError::into_inner)
                }
                Some(at) => {
                    let now = Instant::now();
                    if at <= now {
                        break;
                    }
                    q = self
                        .shared
                        .wake
                        .wait_timeout(q, at - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        q.idle = false;
        std::mem::swap(batch, &mut q.items);
        q.closing
    }

    /// When the time rule next calls for a checkpoint, if records wait for
    /// one.
    fn checkpoint_deadline(&self) -> Option<Instant> {
        let interval = self.config.checkpoint_interval;
        if interval.is_zero() || self.store.unsigned_records() == 0 || !self.is_healthy() {
            return None;
        }
        Some(self.last_checkpoint_at + interval)
    }

    fn checkpoint_due(&self) -> bool {
        let every = self.config.checkpoint_every_records;
        (every > 0 && self.store.unsigned_records() >= every)
            || self
                .checkpoint_deadline()
                .is_some_and(|at| at <= Instant::now())
    }

    fn checkpoint(&mut self) {
        match self.store.checkpoint(&self.config.origin, &self.signer) {
            Ok(_) => self.last_checkpoint_at = Instant::now(),
            Err(e) => self.fail(&format!("checkpoint failed: {e}")),
        }
    }

    fn fail(&self, what: &str) {
        tracing::error!("ledger: {what}; refusing further appends");
        self.shared.healthy.store(false, Ordering::Release);
    }

    /// Chains, writes and syncs `batch`, then calls its callbacks in order.
    fn commit_batch(&mut self, batch: &mut Vec<Pending>) {
        if !self.is_healthy() {
            for p in batch.drain(..) {
                call(p.done, Err(LedgerError::Unhealthy));
            }
            return;
        }
        let mut receipts = Vec::with_capacity(batch.len());
        let mut result = Ok(());
        for p in batch.iter() {
            match self.store.append_body(&p.body) {
                Ok(r) => receipts.push(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = result.and_then(|()| self.store.commit());
        match result {
            Ok(()) => {
                self.shared
                    .durable
                    .store(self.store.next_seq(), Ordering::Release);
                for (p, r) in batch.drain(..).zip(receipts) {
                    call(p.done, Ok(r));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                self.fail(&format!("write failed: {msg}"));
                for p in batch.drain(..) {
                    call(p.done, Err(LedgerError::WriteFailed(msg.clone())));
                }
            }
        }
    }
}

/// Runs a callback, keeping the writer alive if it panics.
fn call(done: DurableCallback, result: Result<Receipt, LedgerError>) {
    if catch_unwind(AssertUnwindSafe(move || done(result))).is_err() {
        tracing::error!("ledger: a durability callback panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sample_usage;
    use rand::SeedableRng;
    use std::sync::mpsc;

    fn append_wait(ledger: &Ledger, body: &RecordBody) -> Result<Receipt, LedgerError> {
        let (tx, rx) = mpsc::channel();
        ledger.append(
            body,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().expect("callback is always called")
    }

    #[test]
    fn a_write_failure_fails_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::from_seed("k", [1; 32]).expect("valid");
        let (ledger, _) =
            Ledger::open(LedgerConfig::new(dir.path(), "test/origin"), signer).expect("opens");
        let health = ledger.health();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let body = RecordBody::Usage(sample_usage(&mut rng));
        assert_eq!(append_wait(&ledger, &body).expect("durable").seq, 0);
        assert!(health.is_healthy());

        crate::store::fault::fail_commits_in(dir.path());
        assert!(matches!(
            append_wait(&ledger, &body),
            Err(LedgerError::WriteFailed(_))
        ));
        assert!(!ledger.is_healthy());
        assert!(!health.is_healthy());
        assert!(!MeterSink::is_healthy(&ledger));
        assert!(matches!(
            append_wait(&ledger, &body),
            Err(LedgerError::Unhealthy)
        ));
        assert_eq!(health.durable_records(), 1);
        assert!(matches!(ledger.close(), Err(LedgerError::Unhealthy)));
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::from_seed("k", [1; 32]).expect("valid");
        let (ledger, _) =
            Ledger::open(LedgerConfig::new(dir.path(), "test/origin"), signer).expect("opens");
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let body = RecordBody::Usage(sample_usage(&mut rng));
        ledger.append(&body, Box::new(|_| panic!("callback bug")));
        assert_eq!(append_wait(&ledger, &body).expect("durable").seq, 1);
        assert!(ledger.is_healthy());
        ledger.close().expect("closes");
    }
}
