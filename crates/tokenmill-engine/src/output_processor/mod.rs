//! The output processor: everything a request needs beyond tokens and
//! blocks. Per request it owns the client's sink, the output text of each
//! completion (detokenized, cut at stop strings), the logprobs sent with each
//! token, the usage tally and the request's place in the in-flight count.
//!
//! The scheduler says what each step did to each sequence
//! ([`SequenceUpdate`]); the processor turns that into events, and says back
//! which sequences it ended itself (a stop string, a client gone), so the
//! scheduler drops them and frees their blocks. A request is billed once,
//! when its last completion ends, or when the processor is dropped with it
//! still open (see the `request` module).

mod in_flight;
mod request;

pub use in_flight::InFlight;

use crate::output::Detokenizer;
use crate::sched::{RequestKey, SchedulerOutput, SequenceId, SequenceUpdate};
use request::RequestOutput;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokenmill_models::SampledRow;
use tokenmill_protocol::{EventSink, FinishReason, GenerateRequest, MeterSink, RequestFailure};

/// The open requests' outputs.
pub struct OutputProcessor {
    detokenizer: Arc<dyn Detokenizer + Send + Sync>,
    meter: Arc<dyn MeterSink>,
    requests: BTreeMap<RequestKey, RequestOutput>,
}

impl OutputProcessor {
    /// A processor decoding with `detokenizer` and billing to `meter`.
    pub fn new(detokenizer: Arc<dyn Detokenizer + Send + Sync>, meter: Arc<dyn MeterSink>) -> Self {
        OutputProcessor {
            detokenizer,
            meter,
            requests: BTreeMap::new(),
        }
    }

    /// Opens the output of a request the scheduler takes under `key`.
    pub fn add(
        &mut self,
        key: RequestKey,
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
        in_flight: Option<InFlight>,
    ) {
        let output = RequestOutput::new(request, sink, self.meter.clone(), in_flight);
        // A key is never reused; were it, the old request is billed now.
        self.requests.insert(key, output);
    }

    /// Whether any open request asked for logprobs (if none did, the step
    /// draws tokens only).
    pub fn wants_logprobs(&self) -> bool {
        self.requests.values().any(RequestOutput::wants_logprobs)
    }

    /// Requests still open.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether no request is open.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The requests whose client is gone: the scheduler should abort them.
    pub fn cancelled(&self) -> Vec<RequestKey> {
        self.requests
            .iter()
            .filter(|(_, r)| r.is_cancelled())
            .map(|(key, _)| *key)
            .collect()
    }

    /// Takes a step's updates (in batch order) and the sampler's `rows`
    /// (one per update with a token, in the same order): charges each
    /// request its share of `step_seconds` by the tokens it computed, sends
    /// the new text and ends the completions the scheduler ended. Returns
    /// the sequences ended here that the scheduler still runs, with why.
    pub fn process(
        &mut self,
        updates: &[SequenceUpdate],
        rows: &[SampledRow],
        step_seconds: f64,
    ) -> Vec<(SequenceId, FinishReason)> {
        let total = updates
            .iter()
            .map(|u| u.computed_tokens)
            .sum::<usize>()
            .max(1) as f64;
        let mut rows = rows.iter();
        let mut ended_here = Vec::new();
        for update in updates {
            let row = update.token.and_then(|_| rows.next());
            let Some(output) = self.requests.get_mut(&update.id.request) else {
                continue;
            };
            output.charge(step_seconds * update.computed_tokens as f64 / total);
            if let Some(cached) = update.cached_prompt_tokens {
                output.note_admission(cached);
            }
            let Some(token) = update.token else {
                continue;
            };
            debug_assert!(row.is_none_or(|r| r.token == token));
            let ended = output.on_token(
                update.id.index,
                token,
                row,
                update.finished,
                self.detokenizer.as_ref(),
            );
            if let (Some(reason), None) = (ended, update.finished) {
                ended_here.push((update.id, reason));
            }
        }
        self.close_done();
        ended_here
    }

    /// Ends sequences the scheduler removed (aborted) with `reason`.
    pub fn finish(
        &mut self,
        ids: &[SequenceId],
        reason: FinishReason,
        error: Option<RequestFailure>,
    ) {
        for id in ids {
            if let Some(output) = self.requests.get_mut(&id.request) {
                output.finish(id.index, reason, error.clone(), self.detokenizer.as_ref());
            }
        }
        self.close_done();
    }

    /// Records the prefix-cache hits of first admissions in a step whose
    /// updates never came (its forward failed): they are billed all the
    /// same.
    pub fn note_admissions(&mut self, plan: &SchedulerOutput) {
        for chunk in &plan.chunks {
            let output = self.requests.get_mut(&chunk.id.request);
            if let (Some(output), Some(cached)) = (output, chunk.cached_prompt_tokens) {
                output.note_admission(cached);
            }
        }
    }

    /// Bills and drops the requests whose completions have all ended.
    fn close_done(&mut self) {
        self.requests.retain(|_, output| !output.is_done());
    }
}

#[cfg(test)]
mod tests;
