//! The step loop: one thread owns the model, the KV cache and the scheduler,
//! takes requests over a channel, and runs schedule -> forward -> update until
//! every client hangs up.

use crate::capacity::CapacityMeter;
use crate::kv::BlockPool;
use crate::sched::{Scheduler, SchedulerConfig, SchedulerOutput, Sequence, StepRow};
use crate::telemetry;
use candle_core::Tensor;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokenmill_models::{ChatTemplate, ForwardBatch, LogitRows, PagedKvCache};
use tokenmill_models::{Llama, LoadedModel, ModelError, ModelTokenizer, TemplateMessage};
use tokenmill_protocol::{
    ChatMessage, EngineClient, EventSink, FinishReason, GenerateRequest, MeterSink, ModelInfo,
    RequestFailure, SubmitError, TokenizeError,
};

/// Sizes of the engine's KV cache and steps.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// Step limits.
    pub scheduler: SchedulerConfig,
    /// Most requests accepted and not yet finished (running or waiting);
    /// beyond it `submit` answers `Overloaded` instead of queueing without
    /// bound.
    pub max_in_flight: usize,
    /// Length of a capacity record's interval.
    pub capacity_interval: Duration,
    /// The device name in capacity records.
    pub device: String,
    /// Where tokens are drawn.
    pub sampler: SamplerPlace,
}

/// Where the engine draws tokens from a step's logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplerPlace {
    /// The model's batched sampler on a GPU, the host sampler on the CPU.
    #[default]
    Auto,
    /// Each sequence's sampler on the host, from its copied logit row.
    Host,
    /// The model's batched sampler ([`Llama::sample`]): the sampling
    /// kernel on a GPU, its CPU reference elsewhere.
    Batched,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_blocks: 1024,
            scheduler: SchedulerConfig::default(),
            max_in_flight: 1024,
            capacity_interval: Duration::from_secs(10),
            device: "cpu".to_owned(),
            sampler: SamplerPlace::Auto,
        }
    }
}

/// Counters the engine publishes after every step, for tests and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// KV blocks not owned by any sequence.
    pub free_blocks: AtomicUsize,
    /// Sequences waiting for admission.
    pub waiting: AtomicUsize,
    /// Sequences admitted (prefilling or decoding).
    pub running: AtomicUsize,
    /// Forward steps run.
    pub steps: AtomicU64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: AtomicU64,
    /// Requests accepted and not yet finished.
    pub in_flight: Arc<AtomicUsize>,
    /// Nanoseconds spent in the model's forward.
    pub forward_nanos: AtomicU64,
    /// Nanoseconds spent around it in steps: scheduling, building the batch,
    /// sampling, metering, sending events.
    pub overhead_nanos: AtomicU64,
}

enum Command {
    Submit(Box<GenerateRequest>, Box<dyn EventSink>, InFlight),
    /// End every sequence now, with this reason (a drain's deadline).
    AbortAll(FinishReason),
}

/// One request's place in the in-flight count; dropping it (with the request's
/// sequence, on whatever path that ends) gives the place back.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn claim(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(count.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The running engine: a handle that implements [`EngineClient`]. Dropping
/// the last handle stops the loop once in-flight requests are done.
pub struct Engine {
    info: ModelInfo,
    tokenizer: Arc<ModelTokenizer>,
    chat_template: Arc<ChatTemplate>,
    commands: Sender<Command>,
    max_in_flight: usize,
    stats: Arc<EngineStats>,
    meter: Arc<dyn MeterSink>,
    thread: Option<JoinHandle<()>>,
}

/// How long the idle loop waits for a command before checking again.
const IDLE_POLL: Duration = Duration::from_millis(50);

impl Engine {
    /// Starts the step loop on its own thread.
    /// Usage and capacity records go to `meter`.
    pub fn start(
        model: LoadedModel,
        served_name: &str,
        config: EngineConfig,
        meter: Arc<dyn MeterSink>,
    ) -> Result<Self, ModelError> {
        let LoadedModel {
            model,
            tokenizer,
            chat_template,
        } = model;
        let context_length = model.config().context_length;
        let vocab_size = model.config().vocab_size;
        let cache = model.new_kv_cache(config.block_size, config.num_blocks)?;
        warm_up(&model, &cache)?;
        let tokenizer = Arc::new(tokenizer);
        let (commands, receiver) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        stats
            .free_blocks
            .store(config.num_blocks, Ordering::Relaxed);
        let worker_stats = stats.clone();
        let worker_tokenizer = tokenizer.clone();
        let worker_config = config.clone();
        let worker_meter = meter.clone();
        let thread = std::thread::Builder::new()
            .name("tokenmill-engine".to_owned())
            .spawn(move || {
                // The block pool is single-threaded by design: it is built here,
                // on the thread that owns it.
                let pool = BlockPool::new(worker_config.num_blocks, worker_config.block_size);
                let batched_sampling = match worker_config.sampler {
                    SamplerPlace::Auto => !model.device().is_cpu(),
                    SamplerPlace::Host => false,
                    SamplerPlace::Batched => true,
                };
                StepLoop {
                    scheduler: Scheduler::new(worker_config.scheduler, pool, context_length),
                    batched_sampling,
                    model,
                    cache,
                    tokenizer: worker_tokenizer,
                    commands: receiver,
                    stats: worker_stats,
                    capacity: CapacityMeter::new(
                        &worker_config.device,
                        worker_config.capacity_interval,
                    ),
                    meter: worker_meter,
                }
                .run()
            })
            .map_err(|e| ModelError::Unsupported(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            info: ModelInfo {
                name: served_name.to_owned(),
                context_length,
                vocab_size,
                kv_capacity_tokens: config.block_size * config.num_blocks,
            },
            tokenizer,
            chat_template: Arc::new(chat_template),
            commands,
            max_in_flight: config.max_in_flight,
            stats,
            meter,
            thread: Some(thread),
        })
    }
}

impl Engine {
    /// The engine's live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::SeqCst)
    }

    /// Ends every running and waiting request at the next step with
    /// `reason`; each is billed for the work done.
    pub fn abort_all(&self, reason: FinishReason) {
        // A closed channel means the loop is gone and nothing is left to end.
        let _ = self.commands.send(Command::AbortAll(reason));
    }
}

impl EngineClient for Engine {
    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))
    }

    fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizeError> {
        let messages: Vec<TemplateMessage<'_>> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: &m.role,
                content: &m.content,
            })
            .collect();
        let text = self
            .chat_template
            .render(&messages)
            .map_err(|e| TokenizeError::ChatTemplate(e.to_string()))?;
        // The template writes its own special tokens (BOS included, if any).
        self.tokenizer
            .encode_raw(&text)
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))
    }

    fn submit(
        &self,
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
    ) -> Result<(), SubmitError> {
        let longest =
            (request.prompt_tokens.len() + request.stop.max_tokens).min(self.info.context_length);
        if request.prompt_tokens.is_empty() || longest > self.info.kv_capacity_tokens {
            return Err(SubmitError::Unschedulable {
                tokens: longest,
                limit: self.info.max_sequence_tokens(),
            });
        }
        if !self.meter.is_healthy() {
            return Err(SubmitError::MeterUnavailable);
        }
        let Some(slot) = InFlight::claim(&self.stats.in_flight, self.max_in_flight) else {
            return Err(SubmitError::Overloaded {
                retry_after_seconds: 1,
            });
        };
        self.commands
            .send(Command::Submit(Box::new(request), sink, slot))
            .map_err(|_| SubmitError::Stopped)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel lets the loop drain and exit.
        let (closed, _) = mpsc::channel();
        self.commands = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// State owned by the engine thread.
struct StepLoop {
    scheduler: Scheduler,
    model: Llama,
    cache: PagedKvCache,
    tokenizer: Arc<ModelTokenizer>,
    commands: Receiver<Command>,
    stats: Arc<EngineStats>,
    capacity: CapacityMeter,
    meter: Arc<dyn MeterSink>,
    /// Whether tokens are drawn by the model's batched sampler.
    batched_sampling: bool,
}

impl StepLoop {
    /// The sampling chunks' rows: tokens drawn by the batched sampler, or
    /// logit rows for the host's.
    fn step_rows(
        &self,
        plan: &SchedulerOutput,
        logits: &Tensor,
    ) -> Result<Vec<StepRow>, ModelError> {
        if self.batched_sampling {
            let params = self.scheduler.sampling_rows(plan);
            Ok(self
                .model
                .sample(logits, &params)?
                .into_iter()
                .map(StepRow::Sampled)
                .collect())
        } else {
            Ok(logit_rows(logits)?
                .into_iter()
                .map(StepRow::Logits)
                .collect())
        }
    }

    fn run(mut self) {
        let mut open = true;
        while open || !self.scheduler.is_idle() {
            open = self.take_commands();
            if let Some(record) = self.capacity.roll_if_due() {
                self.meter.record_capacity(&record);
            }
            let step_started = Instant::now();
            self.scheduler.drop_cancelled(&self.tokenizer);
            let plan = self.scheduler.schedule();
            if plan.is_empty() {
                self.publish_stats();
                continue;
            }
            let batch = self.scheduler.forward_batch(&plan);
            let forward_started = Instant::now();
            let forward = self
                .model
                .forward(&batch, &self.cache)
                .and_then(|logits| self.step_rows(&plan, &logits));
            let forward_time = forward_started.elapsed();
            match forward {
                Ok(rows) => {
                    let seconds = forward_time.as_secs_f64();
                    self.scheduler
                        .update_from_output(&plan, &rows, seconds, &self.tokenizer);
                    self.capacity.record_step(seconds, &plan.tenant_tokens);
                }
                Err(e) => {
                    tracing::error!(error = %e, "forward failed; aborting the batch");
                    self.scheduler.abort_all(
                        FinishReason::Error,
                        Some(RequestFailure::Model(e.to_string())),
                        &self.tokenizer,
                    );
                }
            }
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
            self.stats
                .forward_nanos
                .fetch_add(forward_time.as_nanos() as u64, Ordering::Relaxed);
            let overhead = step_started.elapsed().saturating_sub(forward_time);
            self.stats
                .overhead_nanos
                .fetch_add(overhead.as_nanos() as u64, Ordering::Relaxed);
            telemetry::step(
                plan.chunks.len(),
                plan.num_tokens(),
                forward_time.as_secs_f64(),
                overhead.as_secs_f64(),
            );
            self.publish_stats();
        }
        self.meter.record_capacity(&self.capacity.roll());
        let steps = self.stats.steps.load(Ordering::Relaxed).max(1);
        tracing::info!(
            steps,
            forward_ms_per_step =
                self.stats.forward_nanos.load(Ordering::Relaxed) as f64 / steps as f64 / 1e6,
            overhead_ms_per_step =
                self.stats.overhead_nanos.load(Ordering::Relaxed) as f64 / steps as f64 / 1e6,
            "engine stopped"
        );
    }

    /// Adds queued requests; waits for one when there is nothing to do.
    /// Returns `false` once every handle is gone.
    fn take_commands(&mut self) -> bool {
        if self.scheduler.is_idle() {
            match self.commands.recv_timeout(IDLE_POLL) {
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.handle(command),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn publish_stats(&self) {
        let (waiting, running) = self.scheduler.len();
        let free = self.scheduler.pool().num_free();
        self.stats.waiting.store(waiting, Ordering::Relaxed);
        self.stats.running.store(running, Ordering::Relaxed);
        self.stats.free_blocks.store(free, Ordering::Relaxed);
        let preemptions = self.scheduler.preemptions();
        let before = self.stats.preemptions.swap(preemptions, Ordering::Relaxed);
        telemetry::preempted(preemptions.saturating_sub(before));
        telemetry::state(waiting, running, free, self.scheduler.pool().num_blocks());
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(request, sink, slot) => {
                // The tenant is the prefix cache's salt: one tenant's
                // prompts never serve another's.
                let pool = self.scheduler.pool().clone();
                let salt = request.caller.tenant.0.clone();
                let sequence = Sequence::for_request_holding(
                    *request,
                    sink,
                    self.meter.clone(),
                    Some(slot),
                    || pool.empty_sequence(&salt),
                );
                self.scheduler.add(sequence);
            }
            Command::AbortAll(reason) => {
                self.scheduler.abort_all(reason, None, &self.tokenizer);
            }
        }
    }
}

/// Runs a 2-token prefill and a decode step through the model before the
/// engine takes requests, over the first cache blocks (free at start: a
/// sequence that gets them later overwrites every slot before reading it).
/// On a GPU this loads every kernel a request needs (candle's PTX is
/// compiled by the driver on first use, seconds on a fresh machine), so the
/// first request does not pay for it.
fn warm_up(model: &Llama, cache: &PagedKvCache) -> Result<(), ModelError> {
    let blocks = 3usize.div_ceil(cache.block_size());
    if blocks > cache.num_blocks() || model.config().context_length < 3 {
        return Ok(());
    }
    let started = Instant::now();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut prefill = ForwardBatch::default();
    prefill.push(&[0, 0], 2, table.clone(), LogitRows::Last);
    model.forward(&prefill, cache)?;
    let mut decode = ForwardBatch::default();
    decode.push(&[0], 3, table, LogitRows::Last);
    model.forward(&decode, cache)?.to_vec2::<f32>()?;
    tracing::info!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        "warm-up forward done"
    );
    Ok(())
}

fn logit_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    Ok(logits.to_vec2::<f32>()?)
}
