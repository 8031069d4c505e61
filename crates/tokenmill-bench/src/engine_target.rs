//! The in-process target: the same requests handed straight to the engine.
//!
//! The prompt is tokenized the way the server does it (a completion prompt
//! with the tokenizer's own BOS rule, a chat message through the model's
//! template), submitted as a `GenerateRequest`, and timed from the engine's
//! events: each one is stamped in the engine thread as it is handed over, so
//! what is measured is the engine alone, with no HTTP, JSON or SSE. Run the
//! same workload through `bench serve` and the difference is what the server
//! adds.

use crate::client::{Endpoint, RequestOptions};
use crate::metrics::{Recorder, RequestRecord};
use crate::workload::BenchRequest;
use crate::{BenchError, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokenmill_engine::{Engine, EngineConfig};
use tokenmill_models::LoadedModel;
use tokenmill_protocol::{
    Caller, ChatMessage, DiscardMeter, EngineClient, EventSink, GenerateRequest, GenerationEvent,
    RequestId, SamplingParams, StopConditions, SubmitError,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// The engine, started in this process.
pub struct EngineTarget {
    engine: Arc<Engine>,
    options: RequestOptions,
    next_id: AtomicU64,
}

/// Hands the engine's events to the waiting request, stamped with the time
/// the engine produced them.
struct StampedSink(UnboundedSender<(Instant, GenerationEvent)>);

impl EventSink for StampedSink {
    fn send(&self, event: GenerationEvent) -> bool {
        self.0.send((Instant::now(), event)).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl EngineTarget {
    /// Starts the engine on `model` with `config`; usage records are
    /// discarded (nothing is billed).
    pub fn start(
        model: LoadedModel,
        config: EngineConfig,
        options: RequestOptions,
    ) -> Result<Self> {
        let engine = Engine::start(model, &options.model, config, Arc::new(DiscardMeter))
            .map_err(|e| BenchError::Engine(e.to_string()))?;
        Ok(EngineTarget {
            engine: Arc::new(engine),
            options,
            next_id: AtomicU64::new(0),
        })
    }

    /// Runs `request` through the engine and measures it; failures are in
    /// the record.
    pub async fn send(&self, request: &BenchRequest, level_start: Instant) -> RequestRecord {
        let mut rec = Recorder::start(
            request.index,
            level_start,
            request.expected_prompt_tokens,
            request.max_tokens,
        );
        let limit = Duration::from_secs_f64(self.options.timeout_s);
        match tokio::time::timeout(limit, self.exchange(request, &mut rec)).await {
            Ok(Some(end)) => rec.finish_at(end),
            Ok(None) => rec.finish(),
            Err(_) => {
                rec.fail(
                    "timeout",
                    format!("not finished within {} s", self.options.timeout_s),
                );
                rec.finish()
            }
        }
    }

    /// Submits and follows one request; returns when the engine finished it.
    async fn exchange(&self, request: &BenchRequest, rec: &mut Recorder) -> Option<Instant> {
        let tokens = match self.options.endpoint {
            Endpoint::Completions => self.engine.tokenize(&request.prompt),
            Endpoint::Chat => self.engine.tokenize_chat(&[ChatMessage {
                role: "user".to_owned(),
                content: request.prompt.clone(),
            }]),
        };
        let tokens = match tokens {
            Ok(t) => t,
            Err(e) => {
                rec.fail("engine_rejected", format!("tokenizing: {e}"));
                return None;
            }
        };
        let id = format!("bench-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        rec.response_id(&id);
        let Ok(max_tokens) = usize::try_from(request.max_tokens) else {
            rec.fail("engine_rejected", "max_tokens does not fit this machine");
            return None;
        };
        let generate = GenerateRequest {
            id: RequestId(id),
            caller: Caller::anonymous(),
            model: self.options.model.clone(),
            prompt_tokens: tokens,
            sampling: SamplingParams {
                temperature: self.options.temperature as f32,
                ..SamplingParams::greedy()
            },
            stop: StopConditions {
                max_tokens,
                stop_strings: Vec::new(),
                ignore_eos: self.options.ignore_eos,
            },
            n: 1,
            logprobs: None,
            arrived_at: SystemTime::now(),
        };
        let (tx, rx) = unbounded_channel();
        if let Err(e) = self.engine.submit(generate, Box::new(StampedSink(tx))) {
            let detail = match &e {
                SubmitError::Overloaded { .. } => "overloaded",
                SubmitError::Unschedulable { .. } => "too_long",
                SubmitError::Stopped | SubmitError::MeterUnavailable => "unavailable",
            };
            rec.fail("engine_rejected", format!("{detail}: {e}"));
            return None;
        }
        follow(rx, rec).await
    }
}

/// Reads a request's events until `Finished`; returns its time.
async fn follow(
    mut rx: UnboundedReceiver<(Instant, GenerationEvent)>,
    rec: &mut Recorder,
) -> Option<Instant> {
    while let Some((at, event)) = rx.recv().await {
        match event {
            GenerationEvent::Text { text, .. } => {
                if !text.is_empty() {
                    rec.content(at);
                }
            }
            GenerationEvent::ChoiceEnd { reason, .. } => rec.finish_reason(reason.as_str()),
            GenerationEvent::Finished { usage, error } => {
                rec.usage(
                    Some(usage.tokens.prompt_tokens),
                    Some(usage.tokens.completion_tokens),
                );
                if let Some(e) = error {
                    rec.fail("engine_error", e.to_string());
                }
                return Some(at);
            }
        }
    }
    rec.fail(
        "engine_error",
        "the engine dropped the request without finishing it",
    );
    None
}
