//! Continuous batching: which sequences run in the next step, and how many of
//! their tokens. Tokens and blocks only: no text, no client, no tokenizer.
//!
//! The contract is narrow: [`Scheduler::schedule`] decides a step and returns
//! a [`SchedulerOutput`] (the model's batch and the sampler's rows with it);
//! the engine runs the model on it and hands the drawn tokens back to
//! [`Scheduler::update_from_output`], which says per sequence what happened.
//! Decodes and unfinished prefills of running sequences go first, then new
//! sequences are admitted under the step's token budget, fairly across
//! tenants (see [`fair`]); long prompts are prefilled in chunks. When the KV
//! cache runs out of blocks the newest running sequence is preempted and
//! later recomputed from its tokens. A sequence being admitted first takes
//! the cached blocks that already hold a prefix of its tokens (same tenant
//! only) and computes only the rest; the other completions of an `n > 1`
//! request wait until the first has computed the prompt, then share its
//! blocks. A sequence ends here on an end-of-generation token or its length
//! limit; anything else that ends one (a stop string, a client gone) is
//! decided outside and comes back through [`Scheduler::abort`].

pub mod fair;
mod sequence;

pub use fair::FairQueue;
pub use sequence::{NewRequest, RequestKey, Sequence, SequenceId, Share, TokenFinish, TokenLimits};

use crate::kv::BlockPool;
use tokenmill_models::{ForwardBatch, LogitRows, SamplingParamsRow};
use tokenmill_protocol::TenantId;

/// Limits of one step.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most tokens (prefill plus decode) in one forward.
    pub max_batched_tokens: usize,
    /// Most sequences in one forward.
    pub max_num_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batched_tokens: 2048,
            max_num_seqs: 64,
        }
    }
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledChunk {
    /// The sequence.
    pub id: SequenceId,
    /// Index into the running list at the time of scheduling.
    pub running_index: usize,
    /// Tokens of the sequence computed in this step.
    pub num_tokens: usize,
    /// Whether the chunk reaches the end of the sequence's tokens, so a new
    /// token is sampled from its last row.
    pub samples: bool,
    /// Prompt tokens served from the prefix cache, set in the step of the
    /// request's first admission only.
    pub cached_prompt_tokens: Option<usize>,
}

/// The plan of one step.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// Chunks in batch order.
    pub chunks: Vec<ScheduledChunk>,
    /// The model's input for the chunks.
    pub batch: ForwardBatch,
    /// The sampler's rows, one per sampling chunk, in batch order (the
    /// order of the logit rows the forward returns).
    pub sampling: Vec<SamplingParamsRow>,
    /// Tokens the step computes for each tenant, for capacity records.
    pub tenant_tokens: Vec<(TenantId, usize)>,
}

impl SchedulerOutput {
    /// Whether nothing was scheduled.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.num_tokens).sum()
    }
}

/// What one step did to one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceUpdate {
    /// The sequence.
    pub id: SequenceId,
    /// Tokens of it the step computed: its share of the step's device time.
    pub computed_tokens: usize,
    /// Prompt tokens served from the prefix cache, reported once, in the
    /// step of the request's first admission.
    pub cached_prompt_tokens: Option<usize>,
    /// The token drawn for it, when the chunk sampled.
    pub token: Option<u32>,
    /// Why it ended with that token, if it did; it is then out of the
    /// scheduler and its blocks are back in the pool.
    pub finished: Option<TokenFinish>,
}

/// Waiting and running sequences, and the block pool they draw from.
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    waiting: FairQueue,
    running: Vec<Sequence>,
    /// Most tokens one sequence may hold.
    context_length: usize,
    preemptions: u64,
}

impl Scheduler {
    /// An idle scheduler over `pool`.
    pub fn new(config: SchedulerConfig, pool: BlockPool, context_length: usize) -> Self {
        Scheduler {
            config,
            pool,
            waiting: FairQueue::default(),
            running: Vec::new(),
            context_length,
            preemptions: 0,
        }
    }

    /// The block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Queues a new request: its first completion, holding the others.
    pub fn add(&mut self, request: NewRequest) {
        let pool = &self.pool;
        let sequence = Sequence::for_request(request, |tenant| pool.empty_sequence(&tenant.0));
        self.waiting.push_back(sequence);
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Sequences waiting and running.
    pub fn len(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// The fair queue's counter of `tenant`.
    pub fn served(&self, tenant: &TenantId) -> f64 {
        self.waiting.served(tenant)
    }

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Removes every sequence for which `which` holds, with the completions
    /// it still holds back (they end with it); their blocks return to the
    /// pool now. Returns the ids removed.
    pub fn abort(&mut self, mut which: impl FnMut(&SequenceId) -> bool) -> Vec<SequenceId> {
        let mut removed = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if which(&self.running[i].id) {
                removed.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        removed.extend(self.waiting.extract(|s| which(&s.id)));
        let mut ids = Vec::new();
        while let Some(mut seq) = removed.pop() {
            ids.push(seq.id);
            removed.extend(seq.take_forks());
        }
        ids.sort_unstable();
        ids
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut budget = self.config.max_batched_tokens;
        let mut chunks = Vec::new();

        // Running sequences first, oldest first: decodes and unfinished
        // prefills. A sequence that cannot get a block preempts the newest
        // (never one planned already: those are older).
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let want = self.running[i].uncomputed().min(budget);
            let target = self.running[i].num_computed + want;
            if self.reserve_or_preempt(i, target) {
                let seq = &self.running[i];
                self.waiting
                    .charge(&seq.share.tenant, seq.share.weight, want);
                chunks.push(ScheduledChunk {
                    id: seq.id,
                    running_index: i,
                    num_tokens: want,
                    samples: target == seq.tokens.len(),
                    cached_prompt_tokens: None,
                });
                budget -= want;
                i += 1;
            }
            // Otherwise sequence i was preempted itself; the list shrank.
        }

        // Then admit waiting sequences while budget, slots and blocks allow.
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if seq.num_computed == 0 {
                seq.take_cached_prefix();
            }
            let want = seq.uncomputed().min(budget);
            if !seq.blocks.reserve(seq.num_computed + want) {
                // Not now: let go of any cached blocks it took meanwhile.
                seq.reset_cache();
                break;
            }
            let cached_prompt_tokens = seq.mark_admitted();
            let samples = seq.num_computed + want == seq.tokens.len();
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            // Charged now, not after the step, so that the next admission
            // in this same step already sees it.
            self.waiting
                .charge(&seq.share.tenant, seq.share.weight, want);
            chunks.push(ScheduledChunk {
                id: seq.id,
                running_index: self.running.len(),
                num_tokens: want,
                samples,
                cached_prompt_tokens,
            });
            self.running.push(seq);
            budget -= want;
        }
        SchedulerOutput {
            batch: self.forward_batch(&chunks),
            sampling: self.sampling_rows(&chunks),
            tenant_tokens: self.tenant_tokens(&chunks),
            chunks,
        }
    }

    /// Tokens per tenant in `chunks`.
    fn tenant_tokens(&self, chunks: &[ScheduledChunk]) -> Vec<(TenantId, usize)> {
        let mut out: Vec<(TenantId, usize)> = Vec::new();
        for chunk in chunks {
            let tenant = &self.running[chunk.running_index].share.tenant;
            match out.iter_mut().find(|(t, _)| t == tenant) {
                Some((_, n)) => *n += chunk.num_tokens,
                None => out.push((tenant.clone(), chunk.num_tokens)),
            }
        }
        out
    }

    /// Makes sure running sequence `i` has blocks for `tokens` tokens,
    /// preempting the newest running sequences to free some. Returns `false`
    /// when `i` itself had to be preempted.
    fn reserve_or_preempt(&mut self, i: usize, tokens: usize) -> bool {
        loop {
            if self.running[i].blocks.reserve(tokens) {
                return true;
            }
            let Some(mut victim) = self.running.pop() else {
                return false;
            };
            let victim_index = self.running.len();
            tracing::debug!(
                request = victim.id.request.0,
                index = victim.id.index,
                "preempted: out of KV blocks"
            );
            victim.reset_cache();
            self.preemptions += 1;
            self.waiting.push_front(victim);
            if victim_index == i {
                return false;
            }
        }
    }

    /// The model input for `chunks`.
    fn forward_batch(&self, chunks: &[ScheduledChunk]) -> ForwardBatch {
        let mut batch = ForwardBatch::default();
        for chunk in chunks {
            let seq = &self.running[chunk.running_index];
            let start = seq.num_computed;
            let end = start + chunk.num_tokens;
            let logits = if chunk.samples {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            batch.push(
                &seq.tokens[start..end],
                end,
                seq.blocks.ids().to_vec(),
                logits,
            );
        }
        batch
    }

    /// The sampler's rows of the sampling chunks, in order.
    fn sampling_rows(&self, chunks: &[ScheduledChunk]) -> Vec<SamplingParamsRow> {
        chunks
            .iter()
            .filter(|c| c.samples)
            .map(|c| self.running[c.running_index].sampling_row())
            .collect()
    }

    /// Applies a finished step: marks the chunks computed, appends the
    /// `tokens` drawn (one per sampling chunk, in order) and removes the
    /// sequences that ended. Returns, per chunk in batch order, what
    /// happened.
    pub fn update_from_output(
        &mut self,
        output: &SchedulerOutput,
        tokens: &[u32],
    ) -> Vec<SequenceUpdate> {
        let mut tokens = tokens.iter().copied();
        let mut updates = Vec::with_capacity(output.chunks.len());
        let mut finished = Vec::new();
        let mut forks = Vec::new();
        for chunk in &output.chunks {
            let seq = &mut self.running[chunk.running_index];
            debug_assert_eq!(seq.id, chunk.id, "the running list changed since schedule");
            seq.num_computed += chunk.num_tokens;
            seq.blocks
                .register_full_blocks(&seq.tokens, seq.num_computed);
            let mut update = SequenceUpdate {
                id: seq.id,
                computed_tokens: chunk.num_tokens,
                cached_prompt_tokens: chunk.cached_prompt_tokens,
                token: None,
                finished: None,
            };
            // The caller gives a token per sampling chunk (the engine checks
            // the sampler's output before calling).
            if let Some(token) = chunk.samples.then(|| tokens.next()).flatten() {
                update.token = Some(token);
                update.finished = seq.append(token, self.context_length);
                forks.extend(seq.take_ready_forks());
                if update.finished.is_some() {
                    finished.push(chunk.running_index);
                }
            }
            updates.push(update);
        }
        // Completions of n > 1 requests whose prompt is now cached: next in
        // line for their tenant.
        for fork in forks.into_iter().rev() {
            self.waiting.push_front(fork);
        }
        // Remove from the back so earlier indices stay valid; dropping a
        // sequence gives its blocks back.
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for index in finished {
            self.running.remove(index);
        }
        updates
    }
}

#[cfg(test)]
mod tests;
