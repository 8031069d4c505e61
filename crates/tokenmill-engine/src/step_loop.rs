//! The step loop: one thread owns the model, the KV cache, the scheduler and
//! the output processor, takes requests over a channel, and runs steps until
//! every handle is gone and every request has ended.
//!
//! One step: take commands -> end the requests whose client left ->
//! `schedule()` -> forward -> sample -> `update_from_output()` -> the output
//! processor sends text and ends what stop strings end -> the scheduler drops
//! those. The scheduler sees tokens and blocks only; the processor sees
//! requests and text only; this loop is the one place both meet.

use crate::capacity::CapacityMeter;
use crate::engine::{EngineConfig, EngineStats};
use crate::kv::BlockPool;
use crate::output_processor::{InFlight, OutputProcessor};
use crate::sampling::sampling_rows;
use crate::sched::{NewRequest, RequestKey, Scheduler, SchedulerOutput, Share, TokenLimits};
use crate::telemetry;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenmill_models::{Llama, ModelError, ModelTokenizer, PagedKvCache, SampledRow};
use tokenmill_protocol::{EventSink, FinishReason, GenerateRequest, MeterSink, RequestFailure};

/// What the engine's handles ask of the loop.
pub(crate) enum Command {
    /// A new request, with its client's sink and its in-flight place.
    Submit(Box<GenerateRequest>, Box<dyn EventSink>, InFlight),
    /// End every request now, with this reason (a drain's deadline).
    AbortAll(FinishReason),
}

/// How long the idle loop waits for a command before checking again.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// State owned by the engine thread.
pub(crate) struct StepLoop {
    scheduler: Scheduler,
    outputs: OutputProcessor,
    model: Llama,
    cache: PagedKvCache,
    commands: Receiver<Command>,
    stats: Arc<EngineStats>,
    capacity: CapacityMeter,
    meter: Arc<dyn MeterSink>,
    /// The model's end-of-generation tokens, as the scheduler takes them.
    end_of_generation: Vec<u32>,
    next_key: u64,
}

impl StepLoop {
    pub(crate) fn new(
        model: Llama,
        cache: PagedKvCache,
        tokenizer: Arc<ModelTokenizer>,
        config: &EngineConfig,
        commands: Receiver<Command>,
        stats: Arc<EngineStats>,
        meter: Arc<dyn MeterSink>,
    ) -> Self {
        let context_length = model.config().context_length;
        let vocab = tokenizer.vocab_size().max(model.config().vocab_size);
        let end_of_generation = (0..vocab as u32)
            .filter(|id| tokenizer.is_end_of_generation(*id))
            .collect();
        let pool = BlockPool::new(config.num_blocks, config.block_size);
        StepLoop {
            scheduler: Scheduler::new(config.scheduler.clone(), pool, context_length),
            outputs: OutputProcessor::new(tokenizer, meter.clone()),
            model,
            cache,
            commands,
            stats,
            capacity: CapacityMeter::new(&config.device, config.capacity_interval),
            meter,
            end_of_generation,
            next_key: 0,
        }
    }

    pub(crate) fn run(mut self) {
        let mut open = true;
        while open || !self.scheduler.is_idle() {
            open = self.take_commands();
            if let Some(record) = self.capacity.roll_if_due() {
                self.meter.record_capacity(&record);
            }
            let step_started = Instant::now();
            self.drop_cancelled();
            let plan = self.scheduler.schedule();
            if plan.is_empty() {
                self.publish_stats();
                continue;
            }
            let forward_started = Instant::now();
            let drawn = self.forward_and_sample(&plan);
            let forward_time = forward_started.elapsed();
            match drawn {
                Ok(rows) => {
                    let seconds = forward_time.as_secs_f64();
                    let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
                    let updates = self.scheduler.update_from_output(&plan, &tokens);
                    // Stop strings (and clients gone mid-send) end
                    // sequences the scheduler still runs.
                    let ended = self.outputs.process(&updates, &rows, seconds);
                    if !ended.is_empty() {
                        self.scheduler
                            .abort(|id| ended.iter().any(|(e, _)| e == id));
                    }
                    self.capacity.record_step(seconds, &plan.tenant_tokens);
                }
                Err(e) => {
                    tracing::error!(error = %e, "forward failed; aborting the batch");
                    self.outputs.note_admissions(&plan);
                    let all = self.scheduler.abort(|_| true);
                    let failure = RequestFailure::Model(e.to_string());
                    self.outputs
                        .finish(&all, FinishReason::Error, Some(failure));
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

    /// The model's forward over the plan's batch, then one draw per
    /// sampling chunk, where the logits lie (the sampling kernel on a GPU,
    /// its CPU reference here).
    fn forward_and_sample(&self, plan: &SchedulerOutput) -> Result<Vec<SampledRow>, ModelError> {
        let logits = self.model.forward(&plan.batch, &self.cache)?;
        let rows = if self.outputs.wants_logprobs() {
            self.model.sample(&logits, &plan.sampling)?
        } else {
            // The same tokens; no logprob is read for any of them.
            self.model
                .sample_tokens(&logits, &plan.sampling)?
                .into_iter()
                .map(|token| SampledRow {
                    token,
                    logprob: f32::NAN,
                    top: Vec::new(),
                })
                .collect()
        };
        if rows.len() != plan.sampling.len() {
            return Err(ModelError::InvalidBatch(format!(
                "the sampler drew {} tokens for {} rows",
                rows.len(),
                plan.sampling.len()
            )));
        }
        Ok(rows)
    }

    /// Ends the requests whose client is gone; their blocks return to the
    /// pool now.
    fn drop_cancelled(&mut self) {
        let cancelled = self.outputs.cancelled();
        if cancelled.is_empty() {
            return;
        }
        let ended = self.scheduler.abort(|id| cancelled.contains(&id.request));
        self.outputs.finish(&ended, FinishReason::Cancelled, None);
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
                let key = RequestKey(self.next_key);
                self.next_key += 1;
                let new = self.scheduler_request(key, &request);
                self.scheduler.add(new);
                self.outputs.add(key, *request, sink, Some(slot));
            }
            Command::AbortAll(reason) => {
                let all = self.scheduler.abort(|_| true);
                self.outputs.finish(&all, reason, None);
            }
        }
    }

    /// What the scheduler needs of a request: plain data.
    fn scheduler_request(&self, key: RequestKey, request: &GenerateRequest) -> NewRequest {
        let end_of_generation = if request.stop.ignore_eos {
            Vec::new()
        } else {
            self.end_of_generation.clone()
        };
        NewRequest {
            key,
            share: Share {
                tenant: request.caller.tenant.clone(),
                weight: request.caller.weight,
            },
            arrived_at: request.arrived_at,
            prompt: request.prompt_tokens.clone(),
            limits: TokenLimits {
                max_tokens: request.stop.max_tokens,
                end_of_generation,
            },
            sampling: sampling_rows(&request.sampling, request.n, request.logprobs),
        }
    }
}
