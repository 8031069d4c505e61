//! The exporter: follows a ledger directory and publishes every record and
//! checkpoint note to a JetStream stream, exactly once, in order.
//!
//! It runs on a thread of its own with a small single-threaded tokio
//! runtime. Why not a task on the server's runtime: it reads files with
//! blocking calls, it must outlive the server's runtime so that it can send
//! the final checkpoint that the ledger signs at close (which happens after
//! that runtime has stopped), and a thread makes it equally usable from the
//! CLI and tests, which have no runtime.
//!
//! The loop: read what was appended to the ledger (records, and notes once
//! the records they cover are queued), publish a window of messages, await
//! their acks in order, move the cursor over the acknowledged prefix, save
//! the cursor (atomically, at most every few hundred milliseconds and on
//! exit). Any failure (NATS down, a timeout, a refused publish) keeps the
//! unacknowledged messages queued, logs, and retries with exponential
//! backoff; nothing is dropped and nothing panics. Whatever is re-sent
//! carries the same message id, so the stream stores it once.

use crate::cursor::{self, ExportCursor};
use crate::layout::{InvalidStreamName, StreamLayout, HEADER_SEQ, HEADER_SIZE};
use crate::tail::{NoteTail, RecordTail, TailError, TailNote, TailRecord};
use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::{ConnectOptions, Event};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokenmill_metering::LedgerHealth;
use tokio::sync::{watch, Notify};

/// What to export where, and how patiently.
#[derive(Clone)]
pub struct ExportConfig {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// The JetStream stream (created if missing; see [`StreamLayout`]).
    pub stream: String,
    /// The ledger directory. The cursor file is kept there too.
    pub dir: PathBuf,
    /// The open ledger's health, when the exporter runs in the process that
    /// writes it: then only records already made durable (fsynced) are
    /// published, so a record the stream holds can never vanish from the
    /// ledger in a power loss; and the exporter touches the disk only when
    /// there is something new. Without it, every whole record on disk is
    /// published.
    pub durable: Option<LedgerHealth>,
    /// How often to look for new records when idle (default 50 ms).
    pub poll_interval: Duration,
    /// The duplicate window a new stream is created with (default 24 h): how
    /// long after a publish a re-sent copy is still recognised. Longer than
    /// any crash-restart cycle of the exporter.
    pub duplicate_window: Duration,
    /// Messages published before awaiting their acks (default 256): one
    /// round trip per window instead of per record.
    pub max_in_flight: usize,
    /// Timeout of a publish ack and of other requests to NATS (default 5 s).
    pub request_timeout: Duration,
    /// The longest wait between retries (default 5 s; they start at 100 ms
    /// and double).
    pub max_backoff: Duration,
}

impl ExportConfig {
    /// The defaults for a server, stream and ledger directory.
    pub fn new(url: impl Into<String>, stream: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        ExportConfig {
            url: url.into(),
            stream: stream.into(),
            dir: dir.into(),
            durable: None,
            poll_interval: Duration::from_millis(50),
            duplicate_window: Duration::from_secs(24 * 3600),
            max_in_flight: 256,
            request_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// With the open ledger's health (see [`ExportConfig::durable`]).
    pub fn with_ledger(mut self, health: LedgerHealth) -> Self {
        self.durable = Some(health);
        self
    }
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("dir", &self.dir)
            .field("durable", &self.durable.is_some())
            .field("poll_interval", &self.poll_interval)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_in_flight", &self.max_in_flight)
            .field("request_timeout", &self.request_timeout)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// Why an exporter could not be started. Once started it never fails: it
/// logs and retries.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The stream name cannot be a subject token.
    #[error("NATS export: {0}")]
    StreamName(#[from] InvalidStreamName),
    /// `max_in_flight` is 0: no message could ever be published.
    #[error("NATS export: max_in_flight must be at least 1")]
    NoInFlight,
    /// `poll_interval` or `request_timeout` is zero: the exporter would spin
    /// on the ledger, or give up on every request at once.
    #[error("NATS export: poll_interval and request_timeout must be positive")]
    ZeroInterval,
    /// The exporter's thread or runtime could not be made.
    #[error("NATS export: cannot start: {0}")]
    Start(#[from] std::io::Error),
}

/// Counters for metrics and health checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Records the stream acknowledged since the exporter started.
    pub published_records: u64,
    /// Checkpoint notes the stream acknowledged since the exporter started.
    pub published_checkpoints: u64,
    /// Cosigned checkpoint notes (witness cosignatures) the stream
    /// acknowledged since the exporter started.
    pub published_cosignatures: u64,
    /// Of those, acknowledgements that said the stream already had the
    /// message (re-sent around a crash or an outage).
    pub duplicates: u64,
    /// The cursor: records `0..next_seq` are in the stream.
    pub next_seq: u64,
    /// The cursor: this many checkpoint notes are in the stream.
    pub next_checkpoint: u64,
    /// Records in the ledger (as last seen) not yet acknowledged.
    pub backlog: u64,
    /// Whether the NATS connection is up.
    pub connected: bool,
    /// Failed attempts (connect, publish, read) since the start.
    pub failures: u64,
    /// The last failure, until the next success.
    pub last_error: Option<String>,
}

/// What a stopped exporter reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    /// The counters at the end.
    pub stats: ExportStats,
    /// Whether every record and note it could see was acknowledged before
    /// it stopped (false if the deadline came first, e.g. NATS was down).
    pub caught_up: bool,
}

#[derive(Default)]
struct Counters {
    published_records: AtomicU64,
    published_checkpoints: AtomicU64,
    published_cosignatures: AtomicU64,
    duplicates: AtomicU64,
    next_seq: AtomicU64,
    next_checkpoint: AtomicU64,
    seen_seq: AtomicU64,
    connected: AtomicBool,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

struct Shared {
    counters: Counters,
    wake: Notify,
    durable: Option<LedgerHealth>,
}

impl Shared {
    fn stats(&self) -> ExportStats {
        let c = &self.counters;
        let next_seq = c.next_seq.load(Ordering::Acquire);
        let seen = c.seen_seq.load(Ordering::Acquire);
        let known = self
            .durable
            .as_ref()
            .map_or(seen, |h| h.durable_records().max(seen));
        ExportStats {
            published_records: c.published_records.load(Ordering::Relaxed),
            published_checkpoints: c.published_checkpoints.load(Ordering::Relaxed),
            published_cosignatures: c.published_cosignatures.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            next_seq,
            next_checkpoint: c.next_checkpoint.load(Ordering::Acquire),
            backlog: known.saturating_sub(next_seq),
            connected: c.connected.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            last_error: c
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .counters
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Run,
    /// Publish what there is, then stop; give up at the deadline.
    Stop(Instant),
}

/// A running exporter. Dropping it stops the exporter without waiting for
/// it to catch up (it still saves its cursor); [`ExporterHandle::shutdown`]
/// lets it catch up first.
pub struct ExporterHandle {
    shared: Arc<Shared>,
    mode: watch::Sender<Mode>,
    /// In a mutex only so that the handle is `Sync` (shared with the
    /// metrics task); it is read once, at shutdown.
    done: std::sync::Mutex<mpsc::Receiver<ExportSummary>>,
    thread: Option<JoinHandle<()>>,
}

/// Time allowed after the deadline for the exporter to save its cursor.
const SAVE_GRACE: Duration = Duration::from_secs(2);

impl ExporterHandle {
    /// The counters now.
    pub fn stats(&self) -> ExportStats {
        self.shared.stats()
    }

    /// Tells the exporter to look for new records now rather than at its
    /// next poll (e.g. after an append; optional).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Publishes everything in the ledger (durable, with
    /// [`ExportConfig::durable`]) that is not yet in the stream, waiting at
    /// most `timeout`, saves the cursor and stops. Records it could not send
    /// in time stay in the ledger for the next start. Blocks the calling
    /// thread (from async code, call it in `spawn_blocking`). Stop the
    /// ledger first, so that its final checkpoint is exported too.
    pub fn shutdown(mut self, timeout: Duration) -> ExportSummary {
        let deadline = Instant::now() + timeout;
        self.mode.send_replace(Mode::Stop(deadline));
        self.shared.wake.notify_one();
        let thread = self.thread.take();
        let done = match self.done.lock() {
            Ok(done) => done,
            Err(poisoned) => poisoned.into_inner(),
        };
        match done.recv_timeout(timeout + SAVE_GRACE) {
            Ok(summary) => {
                if let Some(t) = thread {
                    if t.join().is_err() {
                        tracing::error!("ledger export: the exporter thread panicked");
                    }
                }
                summary
            }
            Err(_) => {
                tracing::error!("ledger export: the exporter did not stop in time; leaving it");
                ExportSummary {
                    stats: self.shared.stats(),
                    caught_up: false,
                }
            }
        }
    }
}

impl Drop for ExporterHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.mode.send_replace(Mode::Stop(Instant::now()));
            self.shared.wake.notify_one();
        }
    }
}

/// Starts exporting `config.dir` to `config.stream`, resuming at the cursor
/// saved in the ledger directory. Fails only on a bad configuration or if
/// no thread can be started; NATS need not be reachable.
pub fn spawn(config: ExportConfig) -> Result<ExporterHandle, ExportError> {
    let layout = StreamLayout::new(&config.stream)?;
    if config.max_in_flight == 0 {
        return Err(ExportError::NoInFlight);
    }
    if config.poll_interval.is_zero() || config.request_timeout.is_zero() {
        return Err(ExportError::ZeroInterval);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        wake: Notify::new(),
        durable: config.durable.clone(),
    });
    let cursor = load_cursor(&config);
    shared
        .counters
        .next_seq
        .store(cursor.records, Ordering::Release);
    shared
        .counters
        .seen_seq
        .store(cursor.records, Ordering::Release);
    shared
        .counters
        .next_checkpoint
        .store(cursor.checkpoints, Ordering::Release);
    let (mode_tx, mode_rx) = watch::channel(Mode::Run);
    let (done_tx, done_rx) = mpsc::channel();
    let exporter = Exporter::new(config, layout, Arc::clone(&shared), mode_rx, cursor);
    let thread = std::thread::Builder::new()
        .name("ledger-nats-export".into())
        .spawn(move || {
            let summary = runtime.block_on(exporter.run());
            let _ = done_tx.send(summary);
        })?;
    Ok(ExporterHandle {
        shared,
        mode: mode_tx,
        done: std::sync::Mutex::new(done_rx),
        thread: Some(thread),
    })
}

/// The saved cursor; from the start if there is none or it is unreadable
/// (what the stream already has is then deduplicated).
fn load_cursor(config: &ExportConfig) -> ExportCursor {
    match cursor::read_cursor(&config.dir, &config.stream) {
        Ok(Some(c)) => {
            tracing::info!(
                stream = %config.stream,
                next_seq = c.records,
                checkpoints = c.checkpoints,
                "ledger export: resuming at the saved cursor"
            );
            c
        }
        Ok(None) => ExportCursor::default(),
        Err(e) => {
            tracing::warn!(
                stream = %config.stream,
                "ledger export: cannot read the cursor ({e}); starting from the first record, \
                 the stream drops what it already has"
            );
            ExportCursor::default()
        }
    }
}

/// A message waiting for its ack.
enum Outgoing {
    Record(TailRecord),
    Note(TailNote),
    /// A cosigned checkpoint note, from the cosignatures file.
    Cosigned(TailNote),
}

struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    stream_checked: bool,
}

/// Save the cursor at most this often while busy (always when idle and on
/// exit): a lagging cursor only means re-sends that the stream drops.
const SAVE_EVERY: Duration = Duration::from_millis(250);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// While failing, log again after this long.
const LOG_AGAIN: Duration = Duration::from_secs(30);

struct Exporter {
    config: ExportConfig,
    layout: StreamLayout,
    shared: Arc<Shared>,
    mode: watch::Receiver<Mode>,
    /// Set when the handle is gone without a word: stop at once.
    orphaned: bool,
    cursor: ExportCursor,
    saved: ExportCursor,
    last_save: Instant,
    /// Saving the cursor failed last time (logged once per streak).
    cursor_failing: bool,
    records: Option<RecordTail>,
    notes: Option<NoteTail>,
    cosigned: Option<NoteTail>,
    /// Read, not yet acknowledged, in publishing order.
    queue: VecDeque<Outgoing>,
    /// Notes read whose records are not all queued yet.
    waiting_notes: VecDeque<TailNote>,
    /// Cosigned notes read whose records are not all queued yet.
    waiting_cosigned: VecDeque<TailNote>,
    /// The next record to queue.
    queued_seq: u64,
    nats: Option<Nats>,
    failing_since: Option<Instant>,
    last_failure_log: Option<Instant>,
    last_stall: Option<String>,
}

impl Exporter {
    fn new(
        config: ExportConfig,
        layout: StreamLayout,
        shared: Arc<Shared>,
        mode: watch::Receiver<Mode>,
        cursor: ExportCursor,
    ) -> Exporter {
        Exporter {
            config,
            layout,
            shared,
            mode,
            orphaned: false,
            cursor,
            saved: cursor,
            last_save: Instant::now(),
            cursor_failing: false,
            records: None,
            notes: None,
            cosigned: None,
            queue: VecDeque::new(),
            waiting_notes: VecDeque::new(),
            waiting_cosigned: VecDeque::new(),
            queued_seq: cursor.records,
            nats: None,
            failing_since: None,
            last_failure_log: None,
            last_stall: None,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if self.orphaned {
            return Some(Instant::now());
        }
        match *self.mode.borrow() {
            Mode::Run => None,
            Mode::Stop(at) => Some(at),
        }
    }

    async fn run(mut self) -> ExportSummary {
        tracing::info!(
            url = %self.config.url,
            stream = %self.layout.stream(),
            dir = %self.config.dir.display(),
            "ledger export to NATS started"
        );
        let mut backoff = MIN_BACKOFF;
        let mut caught_up = false;
        loop {
            let deadline = self.deadline();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if let Err(e) = self.fill() {
                self.failed(&format!("reading the ledger: {e}"));
                self.reset();
                self.pause(backoff, false).await;
                backoff = (backoff * 2).min(self.config.max_backoff);
                continue;
            }
            if self.queue.is_empty() {
                self.save_cursor(true);
                if deadline.is_some() {
                    caught_up = true;
                    break;
                }
                self.pause(self.config.poll_interval, true).await;
                continue;
            }
            let mut mode = self.mode.clone();
            let published = tokio::select! {
                r = self.publish_window() => r,
                () = stop_reached(&mut mode) => Err("stopped before the acks came".into()),
            };
            match published {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    self.recovered();
                    self.save_cursor(false);
                }
                Err(e) => {
                    self.failed(&e);
                    self.save_cursor(true);
                    self.pause(backoff, false).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
        self.save_cursor(true);
        if let Some(nats) = self.nats.take() {
            // Sends nothing new; only lets the socket close cleanly.
            let _ = tokio::time::timeout(Duration::from_millis(200), nats.client.flush()).await;
        }
        let stats = self.shared.stats();
        tracing::info!(
            next_seq = stats.next_seq,
            checkpoints = stats.next_checkpoint,
            backlog = stats.backlog,
            caught_up,
            "ledger export to NATS stopped"
        );
        ExportSummary { stats, caught_up }
    }

    /// Waits `how_long` (cut short by the stop deadline, a change of mode,
    /// and, if `wakeable`, a wake-up).
    async fn pause(&mut self, how_long: Duration, wakeable: bool) {
        let how_long = match self.deadline() {
            Some(d) => how_long.min(d.saturating_duration_since(Instant::now())),
            None => how_long,
        };
        let shared = Arc::clone(&self.shared);
        let woken = async {
            if wakeable {
                shared.wake.notified().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(how_long) => {}
            () = woken => {}
            changed = self.mode.changed() => {
                if changed.is_err() {
                    self.orphaned = true;
                }
            }
        }
    }

    /// Reads what was appended to the ledger into the queue.
    fn fill(&mut self) -> Result<(), TailError> {
        let dir = &self.config.dir;
        let records = match self.records.as_mut() {
            Some(r) => r,
            None => self.records.insert(RecordTail::open(dir, self.queued_seq)?),
        };
        let notes = self
            .notes
            .get_or_insert_with(|| NoteTail::open(dir, self.cursor.checkpoints));
        self.waiting_notes.extend(notes.poll()?);
        let cosigned = self
            .cosigned
            .get_or_insert_with(|| NoteTail::open_cosignatures(dir, self.cursor.cosignatures));
        self.waiting_cosigned.extend(cosigned.poll()?);
        let room = (2 * self.config.max_in_flight).saturating_sub(self.queue.len());
        let limit = self
            .shared
            .durable
            .as_ref()
            .map_or(u64::MAX, LedgerHealth::durable_records);
        let new = records.poll(limit, room)?;
        self.shared
            .counters
            .seen_seq
            .fetch_max(records.next_seq(), Ordering::AcqRel);
        let stall = records
            .stall()
            .or_else(|| notes.stall())
            .or_else(|| cosigned.stall())
            .map(str::to_owned);
        if stall != self.last_stall {
            if let Some(s) = &stall {
                tracing::warn!(
                    "ledger export: waiting at bytes that are not a whole frame \
                     (a write in progress, or a torn tail the ledger sets aside when it next opens): {s}"
                );
            }
            self.last_stall = stall;
        }
        for record in new {
            self.queue_notes_up_to(record.seq);
            self.queued_seq = record.seq + 1;
            self.queue.push_back(Outgoing::Record(record));
        }
        self.queue_notes_up_to(self.queued_seq);
        Ok(())
    }

    /// Queues the waiting notes that cover no record beyond `size`: a
    /// checkpoint goes out right after the last record it covers.
    fn queue_notes_up_to(&mut self, size: u64) {
        while self.waiting_notes.front().is_some_and(|n| n.size <= size) {
            if let Some(note) = self.waiting_notes.pop_front() {
                self.queue.push_back(Outgoing::Note(note));
            }
        }
        while self
            .waiting_cosigned
            .front()
            .is_some_and(|n| n.size <= size)
        {
            if let Some(note) = self.waiting_cosigned.pop_front() {
                self.queue.push_back(Outgoing::Cosigned(note));
            }
        }
    }

    /// Forgets everything not acknowledged and reads again from the cursor.
    fn reset(&mut self) {
        self.records = None;
        self.notes = None;
        self.cosigned = None;
        self.queue.clear();
        self.waiting_notes.clear();
        self.waiting_cosigned.clear();
        self.queued_seq = self.cursor.records;
    }

    /// Connects if need be, makes sure the stream exists, publishes up to
    /// `max_in_flight` queued messages and awaits their acks in order,
    /// dropping each acknowledged one from the queue.
    async fn publish_window(&mut self) -> Result<(), String> {
        let js = self.connect().await?;
        let n = self.queue.len().min(self.config.max_in_flight);
        let mut acks = Vec::with_capacity(n);
        let mut send_error = None;
        for msg in self.queue.iter().take(n) {
            let (subject, publish) = self.message(msg);
            match js.send_publish(subject, publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    send_error = Some(format!("publishing: {e}"));
                    break;
                }
            }
        }
        for ack in acks {
            let ack = match ack.await {
                Ok(ack) => ack,
                Err(e) => {
                    // Perhaps the stream is gone (a new, empty server):
                    // check it again before the next try.
                    if let Some(nats) = self.nats.as_mut() {
                        nats.stream_checked = false;
                    }
                    return Err(format!("waiting for a publish ack: {e}"));
                }
            };
            if ack.stream != self.layout.stream() {
                return Err(format!(
                    "the subjects of stream {} are stored by stream {}",
                    self.layout.stream(),
                    ack.stream
                ));
            }
            self.acknowledged(ack.duplicate);
        }
        match send_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn message(&self, msg: &Outgoing) -> (String, PublishMessage) {
        match msg {
            Outgoing::Record(r) => (
                self.layout.record_subject(),
                PublishMessage::build()
                    .payload(r.bytes.clone().into())
                    .message_id(StreamLayout::record_msg_id(&r.hash))
                    .header(HEADER_SEQ, r.seq.to_string()),
            ),
            Outgoing::Note(n) => (
                self.layout.checkpoint_subject(),
                PublishMessage::build()
                    .payload(n.text.clone().into_bytes().into())
                    .message_id(StreamLayout::checkpoint_msg_id(n.size, &n.text))
                    .header(HEADER_SIZE, n.size.to_string()),
            ),
            Outgoing::Cosigned(n) => (
                self.layout.cosigned_subject(),
                PublishMessage::build()
                    .payload(n.text.clone().into_bytes().into())
                    .message_id(StreamLayout::cosigned_msg_id(n.size, &n.text))
                    .header(HEADER_SIZE, n.size.to_string()),
            ),
        }
    }

    /// The queue's first message is in the stream: move the cursor past it.
    fn acknowledged(&mut self, duplicate: bool) {
        let c = &self.shared.counters;
        if duplicate {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        match self.queue.pop_front() {
            Some(Outgoing::Record(r)) => {
                self.cursor.records = r.seq + 1;
                c.next_seq.store(self.cursor.records, Ordering::Release);
                c.published_records.fetch_add(1, Ordering::Relaxed);
            }
            Some(Outgoing::Note(n)) => {
                self.cursor.checkpoints = n.index + 1;
                c.next_checkpoint
                    .store(self.cursor.checkpoints, Ordering::Release);
                c.published_checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            Some(Outgoing::Cosigned(n)) => {
                self.cursor.cosignatures = n.index + 1;
                c.published_cosignatures.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
    }

    /// A JetStream context on a live connection to a server that has the
    /// stream.
    async fn connect(&mut self) -> Result<jetstream::Context, String> {
        if self.nats.is_none() {
            let shared = Arc::clone(&self.shared);
            let client = ConnectOptions::new()
                .name("tokenmill-ledger-export")
                .connection_timeout(self.config.request_timeout)
                .event_callback(move |event| {
                    let shared = Arc::clone(&shared);
                    async move { on_event(&shared, event) }
                })
                .connect(self.config.url.as_str())
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.config.url))?;
            self.shared
                .counters
                .connected
                .store(true, Ordering::Relaxed);
            let js = jetstream::ContextBuilder::new()
                .timeout(self.config.request_timeout)
                .build(client.clone());
            self.nats = Some(Nats {
                client,
                js,
                stream_checked: false,
            });
        }
        let Some(nats) = self.nats.as_mut() else {
            return Err("no connection".into());
        };
        if nats.client.connection_state() != State::Connected {
            // Publishing now would only pile copies into the client's
            // buffer; the client reconnects by itself.
            return Err(format!(
                "not connected to {} (reconnecting)",
                self.config.url
            ));
        }
        if !nats.stream_checked {
            ensure_stream(&nats.js, &self.layout, self.config.duplicate_window).await?;
            nats.stream_checked = true;
        }
        Ok(nats.js.clone())
    }

    fn save_cursor(&mut self, force: bool) {
        if self.saved == self.cursor || (!force && self.last_save.elapsed() < SAVE_EVERY) {
            return;
        }
        match cursor::write_cursor(&self.config.dir, self.layout.stream(), self.cursor) {
            Ok(()) => {
                self.saved = self.cursor;
                self.last_save = Instant::now();
                if std::mem::take(&mut self.cursor_failing) {
                    tracing::info!("ledger export: the cursor is saved again");
                }
            }
            Err(e) => {
                self.last_save = Instant::now();
                if !std::mem::replace(&mut self.cursor_failing, true) {
                    tracing::error!(
                        "ledger export: cannot save the cursor ({e}); exporting goes on, and \
                         after a restart the stream drops what is sent again"
                    );
                }
            }
        }
    }

    fn failed(&mut self, what: &str) {
        self.shared
            .counters
            .failures
            .fetch_add(1, Ordering::Relaxed);
        self.shared.set_error(Some(what.to_owned()));
        let now = Instant::now();
        let backlog = self.shared.stats().backlog;
        match self.failing_since {
            None => {
                self.failing_since = Some(now);
                self.last_failure_log = Some(now);
                tracing::warn!(
                    backlog,
                    "ledger export to NATS failing, records wait in the ledger, retrying: {what}"
                );
            }
            Some(since) => {
                if self
                    .last_failure_log
                    .is_none_or(|at| now.duration_since(at) >= LOG_AGAIN)
                {
                    self.last_failure_log = Some(now);
                    tracing::warn!(
                        backlog,
                        failing_for_s = now.duration_since(since).as_secs(),
                        "ledger export to NATS still failing, retrying: {what}"
                    );
                }
            }
        }
    }

    fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            self.shared.set_error(None);
            tracing::info!(
                after_s = since.elapsed().as_secs_f64(),
                backlog = self.shared.stats().backlog,
                "ledger export to NATS resumed"
            );
        }
    }
}

/// Resolves once the mode is Stop and its deadline has passed.
async fn stop_reached(mode: &mut watch::Receiver<Mode>) {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Stop(at) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                return;
            }
            Mode::Run => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

fn on_event(shared: &Shared, event: Event) {
    match event {
        Event::Connected => {
            shared.counters.connected.store(true, Ordering::Relaxed);
            tracing::info!("ledger export: connected to NATS");
        }
        Event::Disconnected => {
            shared.counters.connected.store(false, Ordering::Relaxed);
            tracing::warn!("ledger export: disconnected from NATS; records wait in the ledger");
        }
        other => tracing::warn!("ledger export: NATS: {other}"),
    }
}

/// Creates the stream if it is missing: file storage (the stream is a copy
/// of a bill; it must survive a NATS restart), no limits, and a long
/// duplicate window. An existing stream is used as it is, with a warning
/// if it would not deduplicate or hold our subjects.
async fn ensure_stream(
    js: &jetstream::Context,
    layout: &StreamLayout,
    duplicate_window: Duration,
) -> Result<(), String> {
    let config = stream::Config {
        name: layout.stream().to_owned(),
        description: Some("tokenmill usage ledger: records and signed checkpoints".into()),
        subjects: vec![layout.stream_subjects()],
        storage: stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    };
    let stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| format!("creating or finding stream {}: {e}", layout.stream()))?;
    let info = stream.cached_info();
    if info.config.duplicate_window < duplicate_window {
        tracing::warn!(
            stream = layout.stream(),
            window_s = info.config.duplicate_window.as_secs_f64(),
            "ledger export: the stream's duplicate window is short; a re-send after a longer \
             outage than that is stored twice (pull skips such copies)"
        );
    }
    if !info.config.subjects.contains(&layout.stream_subjects()) {
        tracing::warn!(
            stream = layout.stream(),
            subjects = ?info.config.subjects,
            "ledger export: the stream was made with other subjects than {}",
            layout.stream_subjects()
        );
    }
    Ok(())
}
