//! What the `n` completions of one request share: the client's sink, the
//! meter, and the running tally of the request's usage.
//!
//! The usage record is emitted when the last completion lets go of the
//! request, from `Drop`: whatever path the sequences leave the engine by
//! (finished, cancelled, failed, shut down), the request is billed exactly
//! once, and the meter has the record before the client is told.

use crate::engine::InFlight;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::SystemTime;
use tokenmill_protocol::{
    EventSink, FinishReason, GenerateRequest, GenerationEvent, MeterSink, RequestFailure,
    TokenCounts, UsageEvent,
};

/// One request inside the engine, shared by its sequences.
pub(crate) struct SharedRequest {
    pub(crate) request: GenerateRequest,
    /// The client's sink; taken by the usage record's callback at the end.
    sink: Option<Box<dyn EventSink>>,
    meter: Arc<dyn MeterSink>,
    tally: RefCell<Tally>,
    /// The request's place in the engine's in-flight count, given back with
    /// the request.
    _in_flight: Option<InFlight>,
}

/// Usage counted so far.
#[derive(Default)]
struct Tally {
    /// Prompt tokens served from the prefix cache at the first admission of
    /// the first completion; `None` until then.
    cached_prompt_tokens: Option<usize>,
    completion_tokens: u64,
    device_seconds: f64,
    reason: Option<FinishReason>,
    error: Option<RequestFailure>,
}

impl SharedRequest {
    pub(crate) fn new(
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
        meter: Arc<dyn MeterSink>,
        in_flight: Option<InFlight>,
    ) -> Self {
        SharedRequest {
            request,
            sink: Some(sink),
            meter,
            tally: RefCell::new(Tally::default()),
            _in_flight: in_flight,
        }
    }

    /// Sends an event to the client; `false` when it is gone.
    pub(crate) fn send(&self, event: GenerationEvent) -> bool {
        self.sink.as_ref().is_some_and(|s| s.send(event))
    }

    /// Whether the client is gone.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.sink.as_ref().is_none_or(|s| s.is_closed())
    }

    /// Records the prefix-cache hit of the request's first admission; later
    /// admissions (a preempted sequence's recomputation, the prompt shared by
    /// the other completions) are the server's business, not the tenant's.
    pub(crate) fn note_admission(&self, cached_prompt_tokens: usize) {
        let mut tally = self.tally.borrow_mut();
        tally
            .cached_prompt_tokens
            .get_or_insert(cached_prompt_tokens);
    }

    pub(crate) fn add_completion_token(&self) {
        self.tally.borrow_mut().completion_tokens += 1;
    }

    pub(crate) fn charge(&self, seconds: f64) {
        self.tally.borrow_mut().device_seconds += seconds;
    }

    /// Notes how one completion ended; the request's reason is the most
    /// severe of them.
    pub(crate) fn note_end(&self, reason: FinishReason, error: Option<RequestFailure>) {
        let mut tally = self.tally.borrow_mut();
        if tally.reason.is_none_or(|r| severity(reason) > severity(r)) {
            tally.reason = Some(reason);
        }
        if tally.error.is_none() {
            tally.error = error;
        }
    }

    fn usage(&self, tally: &Tally) -> UsageEvent {
        let request = &self.request;
        UsageEvent {
            request_id: request.id.clone(),
            tenant: request.caller.tenant.clone(),
            key_id: request.caller.key_id.clone(),
            model: request.model.clone(),
            tokens: TokenCounts {
                prompt_tokens: request.prompt_tokens.len() as u64,
                cached_prompt_tokens: tally.cached_prompt_tokens.unwrap_or(0) as u64,
                completion_tokens: tally.completion_tokens,
            },
            finish_reason: tally.reason.unwrap_or(FinishReason::Error),
            device_seconds: tally.device_seconds,
            arrived_at: request.arrived_at,
            finished_at: SystemTime::now(),
        }
    }
}

/// Error over cancelled over length over stop: a request with one failed
/// completion failed.
fn severity(reason: FinishReason) -> u8 {
    match reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Cancelled => 2,
        FinishReason::Shutdown => 3,
        FinishReason::Error => 4,
    }
}

impl Drop for SharedRequest {
    fn drop(&mut self) {
        let tally = std::mem::take(self.tally.get_mut());
        let usage = self.usage(&tally);
        let latency = usage
            .finished_at
            .duration_since(usage.arrived_at)
            .unwrap_or_default();
        tracing::info!(
            request_id = %usage.request_id,
            model = %usage.model,
            latency_ms = latency.as_secs_f64() * 1e3,
            tenant = %usage.tenant,
            key_id = %usage.key_id,
            prompt_tokens = usage.tokens.prompt_tokens,
            cached_prompt_tokens = usage.tokens.cached_prompt_tokens,
            completion_tokens = usage.tokens.completion_tokens,
            finish_reason = usage.finish_reason.as_str(),
            device_seconds = usage.device_seconds,
            "request finished"
        );
        let error = match usage.finish_reason {
            FinishReason::Error => Some(tally.error.unwrap_or(RequestFailure::EngineStopped)),
            _ => None,
        };
        let Some(sink) = self.sink.take() else {
            return;
        };
        let record = usage.clone();
        // The client hears of the end only once the record is kept; if it
        // cannot be, the client gets an error rather than unbilled tokens.
        self.meter.record_usage(
            &record,
            Box::new(move |recorded| {
                let event = match recorded {
                    Ok(()) => GenerationEvent::Finished { usage, error },
                    Err(reason) => {
                        tracing::error!(request_id = %usage.request_id, %reason, "usage not recorded");
                        GenerationEvent::Finished {
                            usage: UsageEvent {
                                finish_reason: FinishReason::Error,
                                ..usage
                            },
                            error: Some(RequestFailure::NotRecorded(reason)),
                        }
                    }
                };
                sink.send(event);
            }),
        );
    }
}
