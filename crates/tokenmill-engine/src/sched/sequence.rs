//! One completion's sequence as the scheduler sees it: tokens, how many of
//! them are in the KV cache, the blocks that hold them, and the plain data
//! that decides when it ends. No text, no client: those are the output
//! processor's.

use crate::kv::SequenceBlocks;
use std::time::SystemTime;
use tokenmill_models::SamplingParamsRow;
use tokenmill_protocol::TenantId;

/// The engine's key of one request, unique for the engine's lifetime (a
/// client's request id need not be).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey(pub u64);

/// One completion of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId {
    /// The request.
    pub request: RequestKey,
    /// Which of its `n` completions (0..n).
    pub index: usize,
}

/// Who pays for a request's tokens, as fair admission needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The tenant, also the prefix cache's salt: one tenant's prompts never
    /// serve another's.
    pub tenant: TenantId,
    /// The tenant's fair-share weight (at least 1).
    pub weight: u32,
}

/// When a sequence ends on its own, given as plain data so the scheduler
/// decides it without a tokenizer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenLimits {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end generation (the model's end-of-generation ids; empty
    /// when the request ignores them).
    pub end_of_generation: Vec<u32>,
}

/// A request as the scheduler takes it.
#[derive(Clone, Debug)]
pub struct NewRequest {
    /// The engine's key of the request.
    pub key: RequestKey,
    /// Who pays, for fairness.
    pub share: Share,
    /// When it arrived: the older of two heads of line goes first.
    pub arrived_at: SystemTime,
    /// The prompt's tokens (never empty).
    pub prompt: Vec<u32>,
    /// When each completion ends.
    pub limits: TokenLimits,
    /// One sampler row per completion (so `n` is its length), `step` left to
    /// the scheduler, which sets it to the position of each draw.
    pub sampling: Vec<SamplingParamsRow>,
}

/// A sequence being generated.
pub struct Sequence {
    pub(crate) id: SequenceId,
    pub(crate) share: Share,
    pub(crate) arrived_at: SystemTime,
    pub(crate) prompt_len: usize,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub(crate) num_computed: usize,
    pub(crate) blocks: SequenceBlocks,
    pub(crate) limits: TokenLimits,
    sampling: SamplingParamsRow,
    /// The request's other completions, held back until this one has
    /// computed the prompt, so that they find its blocks in the prefix
    /// cache instead of computing the prompt again.
    forks: Vec<Sequence>,
    admitted_before: bool,
}

impl Sequence {
    /// The sequences of a new request: the first completion, holding the
    /// others as forks. `blocks` makes each completion's (empty) block table.
    pub(crate) fn for_request(
        request: NewRequest,
        blocks: impl Fn(&TenantId) -> SequenceBlocks,
    ) -> Self {
        let mut rows = request.sampling.into_iter().enumerate();
        // n >= 1: a request without rows still gets one (greedy) completion.
        let (_, first_row) = rows.next().unwrap_or_default();
        let completion = |index, sampling| Sequence {
            id: SequenceId {
                request: request.key,
                index,
            },
            share: request.share.clone(),
            arrived_at: request.arrived_at,
            prompt_len: request.prompt.len(),
            tokens: request.prompt.clone(),
            num_computed: 0,
            blocks: blocks(&request.share.tenant),
            limits: request.limits.clone(),
            sampling,
            forks: Vec::new(),
            admitted_before: false,
        };
        let forks = rows.map(|(i, row)| completion(i, row)).collect();
        Sequence {
            forks,
            ..completion(0, first_row)
        }
    }

    /// Which completion of which request.
    pub fn id(&self) -> SequenceId {
        self.id
    }

    /// Who pays for this sequence.
    pub fn share(&self) -> &Share {
        &self.share
    }

    /// When the request arrived.
    pub fn arrived_at(&self) -> SystemTime {
        self.arrived_at
    }

    /// Prompt then generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens not yet in the cache.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// The sampler's row for the token drawn next, at position
    /// `tokens.len()`: the position is the row's counter, so a seeded
    /// sequence draws the same tokens however it is batched or preempted.
    pub(crate) fn sampling_row(&self) -> SamplingParamsRow {
        SamplingParamsRow {
            step: self.tokens.len() as u64,
            ..self.sampling
        }
    }

    /// Takes the cached blocks holding a prefix of the tokens; always leaves
    /// at least one token to compute, whose logits give the next token.
    pub(crate) fn take_cached_prefix(&mut self) {
        let queried = self.tokens.len() - 1;
        self.num_computed = self.blocks.take_cached_prefix(&self.tokens, queried);
        crate::telemetry::prefix_lookup(queried, self.num_computed);
    }

    /// Records an admission; returns the prompt tokens served from the
    /// prefix cache when it is the request's first. Only that one counts
    /// toward billed cached tokens: later ones (a preempted sequence's
    /// recomputation, the prompt shared by the other completions) are the
    /// server's business, not the tenant's.
    pub(crate) fn mark_admitted(&mut self) -> Option<usize> {
        if std::mem::replace(&mut self.admitted_before, true) || self.id.index != 0 {
            return None;
        }
        let waited = self.arrived_at.elapsed().unwrap_or_default();
        crate::telemetry::admitted(waited.as_secs_f64());
        Some(self.num_computed.min(self.prompt_len))
    }

    /// Forgets the cached keys and values (preemption): the sequence will be
    /// recomputed from its tokens.
    pub(crate) fn reset_cache(&mut self) {
        self.blocks.release();
        self.num_computed = 0;
    }

    /// The request's other completions, once this one has computed the
    /// prompt (its full blocks are then in the prefix cache).
    pub(crate) fn take_ready_forks(&mut self) -> Vec<Sequence> {
        if self.num_computed >= self.prompt_len {
            std::mem::take(&mut self.forks)
        } else {
            Vec::new()
        }
    }

    /// The completions still held back with this one.
    pub(crate) fn take_forks(&mut self) -> Vec<Sequence> {
        std::mem::take(&mut self.forks)
    }

    /// Appends a drawn token; returns why the sequence ended, if it did.
    pub(crate) fn append(&mut self, token: u32, context_length: usize) -> Option<TokenFinish> {
        self.tokens.push(token);
        if self.limits.end_of_generation.contains(&token) {
            Some(TokenFinish::EndOfGeneration)
        } else if self.generated() >= self.limits.max_tokens {
            Some(TokenFinish::MaxTokens)
        } else if self.tokens.len() >= context_length {
            Some(TokenFinish::ContextLength)
        } else {
            None
        }
    }
}

/// Why a sequence ended on the token it just drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFinish {
    /// The token is one of the model's end-of-generation tokens: it ends the
    /// sequence and is not part of the output text.
    EndOfGeneration,
    /// The request's `max_tokens` were generated.
    MaxTokens,
    /// The sequence fills the model's context.
    ContextLength,
}

impl TokenFinish {
    /// The reason a client is told.
    pub fn reason(self) -> tokenmill_protocol::FinishReason {
        match self {
            TokenFinish::EndOfGeneration => tokenmill_protocol::FinishReason::Stop,
            TokenFinish::MaxTokens | TokenFinish::ContextLength => {
                tokenmill_protocol::FinishReason::Length
            }
        }
    }
}
