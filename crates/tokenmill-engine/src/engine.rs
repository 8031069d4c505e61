//! The engine's handle: starts the step loop on its own thread and
//! implements the protocol's `EngineClient` in front of it.

use crate::error::EngineError;
use crate::output_processor::InFlight;
use crate::sched::SchedulerConfig;
use crate::step_loop::{Command, StepLoop};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokenmill_models::{ChatTemplate, ForwardBatch, LogitRows, PagedKvCache};
use tokenmill_models::{Llama, LoadedModel, ModelError, ModelTokenizer, TemplateMessage};
use tokenmill_protocol::{
    ChatMessage, EngineClient, EventSink, FinishReason, GenerateRequest, MeterSink, ModelInfo,
    SubmitError, TokenizeError,
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

impl Engine {
    /// Takes a loaded model, allocates its KV cache, runs a warm-up forward
    /// and starts the step loop on its own thread. Usage and capacity
    /// records go to `meter`.
    pub fn start(
        model: LoadedModel,
        served_name: &str,
        config: EngineConfig,
        meter: Arc<dyn MeterSink>,
    ) -> Result<Self, EngineError> {
        if config.block_size == 0 {
            return Err(EngineError::Config("the block size must be positive"));
        }
        let LoadedModel {
            model,
            tokenizer,
            chat_template,
        } = model;
        let context_length = model.config().context_length;
        let vocab_size = model.config().vocab_size;
        let cache = model
            .new_kv_cache(config.block_size, config.num_blocks)
            .map_err(|source| EngineError::KvCache {
                block_size: config.block_size,
                num_blocks: config.num_blocks,
                source,
            })?;
        warm_up(&model, &cache).map_err(EngineError::WarmUp)?;
        let tokenizer = Arc::new(tokenizer);
        let (commands, receiver) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        stats
            .free_blocks
            .store(config.num_blocks, Ordering::Relaxed);
        let (worker_tokenizer, worker_config) = (tokenizer.clone(), config.clone());
        let (worker_stats, worker_meter) = (stats.clone(), meter.clone());
        let thread = std::thread::Builder::new()
            .name("tokenmill-engine".to_owned())
            .spawn(move || {
                // The block pool is single-threaded by design: the loop that
                // owns it is built here, on its thread.
                StepLoop::new(
                    model,
                    cache,
                    worker_tokenizer,
                    &worker_config,
                    receiver,
                    worker_stats,
                    worker_meter,
                )
                .run()
            })
            .map_err(EngineError::Thread)?;
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
