//! One request's sequence inside the engine: its tokens, its KV blocks, its
//! sampler and output, and the sink its events go to.

use crate::engine::InFlight;
use crate::kv::SequenceBlocks;
use crate::output::OutputText;
use crate::sampler::Sampler;
use std::time::SystemTime;
use tokenmill_models::ModelTokenizer;
use tokenmill_protocol::{
    EventSink, FinishReason, GenerateRequest, GenerationEvent, TokenCounts, UsageEvent,
};

/// A sequence being generated.
///
/// It emits exactly one `Finished` event: through [`Sequence::finish`] on the
/// normal paths, or from `Drop` (as an error) if the engine lets go of it any
/// other way.
pub struct Sequence {
    pub(crate) request: GenerateRequest,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub(crate) num_computed: usize,
    pub(crate) blocks: SequenceBlocks,
    sampler: Sampler,
    output: OutputText,
    sink: Box<dyn EventSink>,
    device_seconds: f64,
    /// Prompt tokens served from the prefix cache at first admission.
    cached_prompt_tokens: usize,
    /// Whether the sequence was ever admitted (a preempted one was).
    admitted_before: bool,
    finished: bool,
    /// The request's place in the engine's in-flight count, given back when
    /// the sequence is dropped.
    _in_flight: Option<InFlight>,
}

impl Sequence {
    /// A new sequence for `request` that owns `blocks` (usually empty).
    pub fn new(request: GenerateRequest, sink: Box<dyn EventSink>, blocks: SequenceBlocks) -> Self {
        Sequence {
            tokens: request.prompt_tokens.clone(),
            num_computed: 0,
            blocks,
            sampler: Sampler::new(request.sampling.clone()),
            output: OutputText::new(request.stop.stop_strings.clone()),
            sink,
            device_seconds: 0.0,
            cached_prompt_tokens: 0,
            admitted_before: false,
            finished: false,
            _in_flight: None,
            request,
        }
    }

    /// Ties the request's in-flight place to this sequence's life.
    pub(crate) fn holding(mut self, slot: InFlight) -> Self {
        self._in_flight = Some(slot);
        self
    }

    /// Prompt length.
    pub fn prompt_len(&self) -> usize {
        self.request.prompt_tokens.len()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len()
    }

    /// Tokens not yet in the cache.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Whether the client is gone.
    pub fn is_cancelled(&self) -> bool {
        self.sink.is_closed()
    }

    /// Takes the cached blocks holding a prefix of the tokens; always leaves
    /// at least one token to compute, whose logits give the next token.
    pub fn take_cached_prefix(&mut self) {
        self.num_computed = self
            .blocks
            .take_cached_prefix(&self.tokens, self.tokens.len() - 1);
    }

    /// Records the first admission. Only its cache hit counts toward billed
    /// cached tokens: a preempted sequence's recomputation is the server's
    /// cost either way.
    pub fn mark_admitted(&mut self) {
        if !self.admitted_before {
            self.cached_prompt_tokens = self.num_computed.min(self.prompt_len());
            self.admitted_before = true;
        }
    }

    /// Adds device time attributed to this sequence.
    pub fn charge(&mut self, seconds: f64) {
        self.device_seconds += seconds;
    }

    /// Forgets the cached keys and values (preemption): the sequence will be
    /// recomputed from its tokens.
    pub fn reset_cache(&mut self) {
        self.blocks.release();
        self.num_computed = 0;
    }

    /// Samples the next token from its logits, appends it and sends the text
    /// it completes. Returns why the sequence ended, if it did.
    pub fn append_sampled(
        &mut self,
        logits: &[f32],
        tokenizer: &ModelTokenizer,
        context_length: usize,
    ) -> Option<FinishReason> {
        let token = self.sampler.sample(logits);
        self.tokens.push(token);
        if tokenizer.is_end_of_generation(token) {
            self.send_text(String::new(), vec![token]);
            return Some(FinishReason::Stop);
        }
        let delta = self.output.push(tokenizer, token);
        let stopped = delta.stopped;
        if !self.send_text(delta.text, vec![token]) {
            return Some(FinishReason::Cancelled);
        }
        if stopped {
            Some(FinishReason::Stop)
        } else if self.generated() >= self.request.stop.max_tokens
            || self.tokens.len() >= context_length
        {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    fn send_text(&self, text: String, token_ids: Vec<u32>) -> bool {
        self.sink.send(GenerationEvent::Text { text, token_ids })
    }

    /// Token counts as billed: the prompt once (recomputation after
    /// preemption is the server's cost, not the tenant's) and every generated
    /// token.
    pub fn token_counts(&self) -> TokenCounts {
        TokenCounts {
            prompt_tokens: self.prompt_len() as u64,
            cached_prompt_tokens: self.cached_prompt_tokens as u64,
            completion_tokens: self.generated() as u64,
        }
    }

    /// Ends the sequence: flushes held-back text (unless a stop string or a
    /// cancellation ended it) and emits its one usage record.
    pub fn finish(
        mut self,
        reason: FinishReason,
        tokenizer: &ModelTokenizer,
        error: Option<String>,
    ) {
        if matches!(reason, FinishReason::Length | FinishReason::Stop) {
            let rest = self.output.finish(tokenizer);
            if !rest.text.is_empty() {
                self.send_text(rest.text, Vec::new());
            }
        }
        self.emit_finished(reason, error);
    }

    fn emit_finished(&mut self, reason: FinishReason, error: Option<String>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let usage = UsageEvent {
            request_id: self.request.id.clone(),
            tenant: self.request.tenant.clone(),
            model: self.request.model.clone(),
            tokens: self.token_counts(),
            finish_reason: reason,
            device_seconds: self.device_seconds,
            arrived_at: self.request.arrived_at,
            finished_at: SystemTime::now(),
        };
        tracing::info!(
            request_id = %usage.request_id,
            tenant = %usage.tenant,
            prompt_tokens = usage.tokens.prompt_tokens,
            completion_tokens = usage.tokens.completion_tokens,
            finish_reason = reason.as_str(),
            device_seconds = usage.device_seconds,
            "request finished"
        );
        self.sink.send(GenerationEvent::Finished { usage, error });
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        self.emit_finished(
            FinishReason::Error,
            Some("the engine stopped before the request finished".to_owned()),
        );
    }
}
