//! One completion's sequence inside the engine: its tokens, its KV blocks,
//! its sampler and output text. The request it belongs to (sink, meter,
//! tally) is shared with the request's other completions.

use super::request::SharedRequest;
use super::StepRow;
use crate::engine::InFlight;
use crate::kv::SequenceBlocks;
use crate::output::OutputText;
use crate::sampler::{self, Sampler};
use std::rc::Rc;
use std::sync::Arc;
use tokenmill_models::{ModelTokenizer, SampledRow, SamplingParamsRow};
use tokenmill_protocol::{
    Caller, EventSink, FinishReason, GenerateRequest, GenerationEvent, MeterSink, RequestFailure,
    TokenLogprob, TopLogprob,
};

/// A sequence being generated: completion `index` of its request.
///
/// It reports its end exactly once: through [`Sequence::finish`] on the
/// normal paths, or from `Drop` (as an error) if the engine lets go of it any
/// other way.
pub struct Sequence {
    shared: Rc<SharedRequest>,
    index: usize,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub(crate) num_computed: usize,
    pub(crate) blocks: SequenceBlocks,
    sampler: Sampler,
    output: OutputText,
    /// The request's other completions, held back until this one has
    /// computed the prompt, so that they find its blocks in the prefix
    /// cache instead of computing the prompt again.
    forks: Vec<Sequence>,
    admitted_before: bool,
    ended: bool,
}

impl Sequence {
    /// The sequences of a new request: the first completion, holding the
    /// other `n - 1` as forks. `blocks` makes each completion's (empty) block
    /// table.
    pub fn for_request(
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
        meter: Arc<dyn MeterSink>,
        blocks: impl Fn() -> SequenceBlocks,
    ) -> Self {
        Self::for_request_holding(request, sink, meter, None, blocks)
    }

    pub(crate) fn for_request_holding(
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
        meter: Arc<dyn MeterSink>,
        in_flight: Option<InFlight>,
        blocks: impl Fn() -> SequenceBlocks,
    ) -> Self {
        let n = request.n.max(1);
        let shared = Rc::new(SharedRequest::new(request, sink, meter, in_flight));
        let mut first = Self::completion(&shared, 0, blocks());
        first.forks = (1..n)
            .map(|index| Self::completion(&shared, index, blocks()))
            .collect();
        first
    }

    fn completion(shared: &Rc<SharedRequest>, index: usize, blocks: SequenceBlocks) -> Self {
        let request = &shared.request;
        let mut sampling = request.sampling.clone();
        // Each completion draws its own random stream; a seeded request stays
        // reproducible as a whole.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
        Sequence {
            tokens: request.prompt_tokens.clone(),
            num_computed: 0,
            blocks,
            sampler: Sampler::new(sampling),
            output: OutputText::new(request.stop.stop_strings.clone()),
            forks: Vec::new(),
            admitted_before: false,
            ended: false,
            index,
            shared: shared.clone(),
        }
    }

    /// This sequence's row of the batched sampler, for the token it draws
    /// next (at position `tokens.len()`).
    pub fn batched_sampling_row(&self) -> SamplingParamsRow {
        self.sampler
            .batched_row(self.tokens.len(), self.shared.request.logprobs.unwrap_or(0))
    }

    /// Who pays for this sequence.
    pub fn caller(&self) -> &Caller {
        &self.shared.request.caller
    }

    /// When the request arrived.
    pub fn arrived_at(&self) -> std::time::SystemTime {
        self.shared.request.arrived_at
    }

    /// The request id, for logs.
    pub(crate) fn request_id(&self) -> &str {
        &self.shared.request.id.0
    }

    /// Prompt length.
    pub fn prompt_len(&self) -> usize {
        self.shared.request.prompt_tokens.len()
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
        self.shared.is_cancelled()
    }

    /// Takes the cached blocks holding a prefix of the tokens; always leaves
    /// at least one token to compute, whose logits give the next token.
    pub fn take_cached_prefix(&mut self) {
        let queried = self.tokens.len() - 1;
        self.num_computed = self.blocks.take_cached_prefix(&self.tokens, queried);
        crate::telemetry::prefix_lookup(queried, self.num_computed);
    }

    /// Records an admission. Only the request's first one counts toward
    /// billed cached tokens.
    pub fn mark_admitted(&mut self) {
        if !self.admitted_before {
            self.admitted_before = true;
            if self.index == 0 {
                let waited = self.shared.request.arrived_at.elapsed().unwrap_or_default();
                crate::telemetry::admitted(waited.as_secs_f64());
                self.shared
                    .note_admission(self.num_computed.min(self.prompt_len()));
            }
        }
    }

    /// Adds device time attributed to this sequence.
    pub fn charge(&mut self, seconds: f64) {
        self.shared.charge(seconds);
    }

    /// Forgets the cached keys and values (preemption): the sequence will be
    /// recomputed from its tokens.
    pub fn reset_cache(&mut self) {
        self.blocks.release();
        self.num_computed = 0;
    }

    /// The request's other completions, once this one has computed the
    /// prompt (its full blocks are then in the prefix cache).
    pub fn take_ready_forks(&mut self) -> Vec<Sequence> {
        if self.num_computed >= self.prompt_len() {
            std::mem::take(&mut self.forks)
        } else {
            Vec::new()
        }
    }

    /// Samples the next token from its logits, appends it and sends the text
    /// it completes. Returns why the sequence ended, if it did.
    pub fn append_sampled(
        &mut self,
        row: &StepRow,
        tokenizer: &ModelTokenizer,
        context_length: usize,
    ) -> Option<FinishReason> {
        let token = match row {
            StepRow::Logits(logits) => self.sampler.sample(logits),
            StepRow::Sampled(sampled) => sampled.token,
        };
        self.tokens.push(token);
        self.shared.add_completion_token();
        if tokenizer.is_end_of_generation(token) && !self.shared.request.stop.ignore_eos {
            self.send_text(String::new(), token, Vec::new());
            return Some(FinishReason::Stop);
        }
        let logprobs = match (self.shared.request.logprobs, row) {
            (Some(top), StepRow::Logits(logits)) => {
                vec![token_logprob(logits, token, top, tokenizer)]
            }
            (Some(top), StepRow::Sampled(sampled)) => {
                vec![sampled_logprob(sampled, top, tokenizer)]
            }
            (None, _) => Vec::new(),
        };
        let delta = self.output.push(tokenizer, token);
        let stopped = delta.stopped;
        if !self.send_text(delta.text, token, logprobs) {
            return Some(FinishReason::Cancelled);
        }
        if stopped {
            Some(FinishReason::Stop)
        } else if self.generated() >= self.shared.request.stop.max_tokens
            || self.tokens.len() >= context_length
        {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    fn send_text(&self, text: String, token: u32, logprobs: Vec<TokenLogprob>) -> bool {
        self.shared.send(GenerationEvent::Text {
            index: self.index,
            text,
            token_ids: vec![token],
            logprobs,
        })
    }

    /// Ends the sequence (and any completions still held back with it):
    /// flushes held-back text unless a stop string or a cancellation ended
    /// it, and reports the end to the request.
    pub fn finish(
        mut self,
        reason: FinishReason,
        tokenizer: &ModelTokenizer,
        error: Option<RequestFailure>,
    ) {
        for fork in std::mem::take(&mut self.forks) {
            fork.finish(reason, tokenizer, error.clone());
        }
        if matches!(reason, FinishReason::Length | FinishReason::Stop) {
            let rest = self.output.finish(tokenizer);
            if !rest.text.is_empty() {
                self.shared.send(GenerationEvent::Text {
                    index: self.index,
                    text: rest.text,
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                });
            }
        }
        self.end(reason, error);
    }

    fn end(&mut self, reason: FinishReason, error: Option<RequestFailure>) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.shared.note_end(reason, error);
        self.shared.send(GenerationEvent::ChoiceEnd {
            index: self.index,
            reason,
        });
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        self.end(FinishReason::Error, Some(RequestFailure::EngineStopped));
    }
}

/// The logprobs the batched sampler returned, in the same form.
fn sampled_logprob(sampled: &SampledRow, top: usize, tokenizer: &ModelTokenizer) -> TokenLogprob {
    let entry = |token: u32, logprob: f32| TopLogprob {
        token,
        bytes: tokenizer.token_bytes(token),
        logprob,
    };
    TokenLogprob {
        chosen: entry(sampled.token, sampled.logprob),
        top: sampled
            .top
            .iter()
            .take(top)
            .map(|(token, logprob)| entry(*token, *logprob))
            .collect(),
    }
}

/// The log probability of `chosen` and of the `top` most likely tokens,
/// under the model's own distribution (before temperature and top-p).
fn token_logprob(
    logits: &[f32],
    chosen: u32,
    top: usize,
    tokenizer: &ModelTokenizer,
) -> TokenLogprob {
    let log_probs = sampler::log_softmax(logits);
    let entry = |token: u32| TopLogprob {
        token,
        bytes: tokenizer.token_bytes(token),
        logprob: log_probs
            .get(token as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY),
    };
    TokenLogprob {
        chosen: entry(chosen),
        top: sampler::top_k(&log_probs, top)
            .into_iter()
            .map(entry)
            .collect(),
    }
}
