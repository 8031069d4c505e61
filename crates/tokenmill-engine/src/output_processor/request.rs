//! One request's output: its completions' text, the client's sink, the
//! meter, and the running tally of the request's usage.
//!
//! The usage record is emitted when the request's output is dropped:
//! whatever path the request leaves the engine by (finished, cancelled,
//! failed, shut down, the step loop gone), it is billed exactly once, and
//! the client hears of the end only once the meter has the record.

use super::InFlight;
use crate::output::{Detokenizer, OutputText};
use crate::sched::TokenFinish;
use std::sync::Arc;
use std::time::SystemTime;
use tokenmill_models::SampledRow;
use tokenmill_protocol::{
    EventSink, FinishReason, GenerateRequest, GenerationEvent, MeterSink, RequestFailure,
    TokenCounts, TokenLogprob, TopLogprob, UsageEvent,
};

/// One request inside the output processor.
pub(crate) struct RequestOutput {
    request: GenerateRequest,
    /// The client's sink; taken by the usage record's callback at the end.
    sink: Option<Box<dyn EventSink>>,
    meter: Arc<dyn MeterSink>,
    tally: Tally,
    completions: Vec<Completion>,
    /// The request's place in the engine's in-flight count, given back with
    /// the request.
    _in_flight: Option<InFlight>,
}

/// One of the request's `n` completions.
struct Completion {
    text: OutputText,
    ended: bool,
}

/// Usage counted so far.
#[derive(Default)]
struct Tally {
    /// Prompt tokens served from the prefix cache at the request's first
    /// admission; `None` until then.
    cached_prompt_tokens: Option<usize>,
    completion_tokens: u64,
    device_seconds: f64,
    reason: Option<FinishReason>,
    error: Option<RequestFailure>,
}

impl RequestOutput {
    pub(crate) fn new(
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
        meter: Arc<dyn MeterSink>,
        in_flight: Option<InFlight>,
    ) -> Self {
        let completions = (0..request.n.max(1))
            .map(|_| Completion {
                text: OutputText::new(request.stop.stop_strings.clone()),
                ended: false,
            })
            .collect();
        RequestOutput {
            request,
            sink: Some(sink),
            meter,
            tally: Tally::default(),
            completions,
            _in_flight: in_flight,
        }
    }

    /// Whether the request asked for logprobs.
    pub(crate) fn wants_logprobs(&self) -> bool {
        self.request.logprobs.is_some()
    }

    /// Whether the client is gone.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.sink.as_ref().is_none_or(|s| s.is_closed())
    }

    /// Whether every completion has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.completions.iter().all(|c| c.ended)
    }

    /// Records the prefix-cache hit of the request's first admission.
    pub(crate) fn note_admission(&mut self, cached_prompt_tokens: usize) {
        self.tally
            .cached_prompt_tokens
            .get_or_insert(cached_prompt_tokens);
    }

    /// Adds device time attributed to the request.
    pub(crate) fn charge(&mut self, seconds: f64) {
        self.tally.device_seconds += seconds;
    }

    /// Takes completion `index`'s new token: sends the text it completes
    /// (and its logprobs, from the sampler's `row`). Returns why the
    /// completion ended, if it did: `finish`, the scheduler's reason, or one
    /// found here (a stop string, the client gone).
    pub(crate) fn on_token(
        &mut self,
        index: usize,
        token: u32,
        row: Option<&SampledRow>,
        finish: Option<TokenFinish>,
        detokenizer: &dyn Detokenizer,
    ) -> Option<FinishReason> {
        if self.completions.get(index).is_none_or(|c| c.ended) {
            return None;
        }
        self.tally.completion_tokens += 1;
        if finish == Some(TokenFinish::EndOfGeneration) {
            // Not part of the output: its id only, no text, no logprobs.
            self.send_text(index, String::new(), vec![token], Vec::new());
            self.finish(index, FinishReason::Stop, None, detokenizer);
            return Some(FinishReason::Stop);
        }
        let logprobs = match (self.request.logprobs, row) {
            (Some(top), Some(row)) => vec![token_logprob(row, top, detokenizer)],
            _ => Vec::new(),
        };
        let delta = self.completions[index].text.push(detokenizer, token);
        if !self.send_text(index, delta.text, vec![token], logprobs) {
            self.end(index, FinishReason::Cancelled, None);
            return Some(FinishReason::Cancelled);
        }
        let reason = if delta.stopped {
            FinishReason::Stop
        } else {
            finish?.reason()
        };
        self.finish(index, reason, None, detokenizer);
        Some(reason)
    }

    fn send_text(
        &self,
        index: usize,
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    ) -> bool {
        self.send(GenerationEvent::Text {
            index,
            text,
            token_ids,
            logprobs,
        })
    }

    /// Sends an event to the client; `false` when it is gone.
    fn send(&self, event: GenerationEvent) -> bool {
        self.sink.as_ref().is_some_and(|s| s.send(event))
    }

    /// Ends completion `index`: flushes held-back text when it ended on its
    /// own (stop, length), and reports the end.
    pub(crate) fn finish(
        &mut self,
        index: usize,
        reason: FinishReason,
        error: Option<RequestFailure>,
        detokenizer: &dyn Detokenizer,
    ) {
        let Some(completion) = self.completions.get_mut(index) else {
            return;
        };
        if completion.ended {
            return;
        }
        // An answer that ends normally, or is cut at shutdown, gets the
        // text held back for a possible stop string: its tokens are billed.
        if matches!(
            reason,
            FinishReason::Length | FinishReason::Stop | FinishReason::Shutdown
        ) {
            let rest = completion.text.finish(detokenizer);
            if !rest.text.is_empty() {
                self.send_text(index, rest.text, Vec::new(), Vec::new());
            }
        }
        self.end(index, reason, error);
    }

    fn end(&mut self, index: usize, reason: FinishReason, error: Option<RequestFailure>) {
        let Some(completion) = self.completions.get_mut(index) else {
            return;
        };
        if std::mem::replace(&mut completion.ended, true) {
            return;
        }
        if self
            .tally
            .reason
            .is_none_or(|r| severity(reason) > severity(r))
        {
            self.tally.reason = Some(reason);
        }
        if self.tally.error.is_none() {
            self.tally.error = error;
        }
        self.send(GenerationEvent::ChoiceEnd { index, reason });
    }

    fn usage(&self) -> UsageEvent {
        let request = &self.request;
        let tally = &self.tally;
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

/// Error over shutdown over cancelled over length over stop: a request with
/// one failed completion failed.
fn severity(reason: FinishReason) -> u8 {
    match reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Cancelled => 2,
        FinishReason::Shutdown => 3,
        FinishReason::Error => 4,
    }
}

/// The sampler's logprobs (the model's own distribution, before temperature
/// and top-p) in the protocol's form, with the tokens' bytes.
fn token_logprob(row: &SampledRow, top: usize, detokenizer: &dyn Detokenizer) -> TokenLogprob {
    let entry = |token: u32, logprob: f32| TopLogprob {
        token,
        bytes: detokenizer.token_bytes(token),
        logprob,
    };
    TokenLogprob {
        chosen: entry(row.token, row.logprob),
        top: row
            .top
            .iter()
            .take(top)
            .map(|(token, logprob)| entry(*token, *logprob))
            .collect(),
    }
}

impl Drop for RequestOutput {
    fn drop(&mut self) {
        // Completions the engine let go of without ending them (its loop
        // stopped): an error, told to the client like any other end.
        for index in 0..self.completions.len() {
            self.end(
                index,
                FinishReason::Error,
                Some(RequestFailure::EngineStopped),
            );
        }
        let usage = self.usage();
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
            FinishReason::Error => Some(
                self.tally
                    .error
                    .take()
                    .unwrap_or(RequestFailure::EngineStopped),
            ),
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
