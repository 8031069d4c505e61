//! Continuous batching: which sequences run in the next step, and how many of
//! their tokens.
//!
//! The contract is narrow: [`Scheduler::schedule`] decides a step and returns
//! a [`SchedulerOutput`]; the engine runs the model on it and hands the
//! sampled logits back to [`Scheduler::update_from_output`]. Decodes of
//! running sequences go first, then prefills (new or partial, in arrival
//! order) under the step's token budget; long prompts are prefilled in chunks.
//! When the KV cache runs out of blocks the newest running sequence is
//! preempted and later recomputed from its tokens. A sequence being admitted
//! first takes the cached blocks that already hold a prefix of its tokens
//! (same tenant only) and computes only the rest.

mod sequence;

pub use sequence::Sequence;

use crate::kv::BlockPool;
use std::collections::VecDeque;
use tokenmill_models::{ForwardBatch, LogitRows, ModelTokenizer};
use tokenmill_protocol::FinishReason;

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
    /// Index into the running list at the time of scheduling.
    pub running_index: usize,
    /// Tokens of the sequence computed in this step.
    pub num_tokens: usize,
    /// Whether the chunk reaches the end of the sequence's tokens, so a new
    /// token is sampled from its last row.
    pub samples: bool,
}

/// The plan of one step.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// Chunks in batch order.
    pub chunks: Vec<ScheduledChunk>,
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

/// Waiting and running sequences, and the block pool they draw from.
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<Sequence>,
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
            waiting: VecDeque::new(),
            running: Vec::new(),
            context_length,
            preemptions: 0,
        }
    }

    /// The block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Queues a new sequence.
    pub fn add(&mut self, sequence: Sequence) {
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

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Ends every sequence whose client is gone; their blocks return to the
    /// pool now.
    pub fn drop_cancelled(&mut self, tokenizer: &ModelTokenizer) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_cancelled() {
                let seq = self.running.remove(i);
                seq.finish(FinishReason::Cancelled, tokenizer, None);
            } else {
                i += 1;
            }
        }
        let (cancelled, kept): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(Sequence::is_cancelled);
        self.waiting = kept.into();
        for seq in cancelled {
            seq.finish(FinishReason::Cancelled, tokenizer, None);
        }
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut budget = self.config.max_batched_tokens;
        let mut chunks = Vec::new();

        // Running sequences first, oldest first: decodes and unfinished
        // prefills. A sequence that cannot get a block preempts the newest.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let want = self.running[i].uncomputed().min(budget);
            let target = self.running[i].num_computed + want;
            if self.reserve_or_preempt(i, target) {
                let seq = &self.running[i];
                chunks.push(ScheduledChunk {
                    running_index: i,
                    num_tokens: want,
                    samples: target == seq.tokens.len(),
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
            seq.mark_admitted();
            let samples = seq.num_computed + want == seq.tokens.len();
            if let Some(seq) = self.waiting.pop_front() {
                self.running.push(seq);
            }
            chunks.push(ScheduledChunk {
                running_index: self.running.len() - 1,
                num_tokens: want,
                samples,
            });
            budget -= want;
        }
        SchedulerOutput { chunks }
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
            tracing::debug!(request_id = %victim.request.id, "preempted: out of KV blocks");
            victim.reset_cache();
            self.preemptions += 1;
            self.waiting.push_front(victim);
            if victim_index == i {
                return false;
            }
        }
    }

    /// The model input for `output`.
    pub fn forward_batch(&self, output: &SchedulerOutput) -> ForwardBatch {
        let mut batch = ForwardBatch::default();
        for chunk in &output.chunks {
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

    /// Applies a finished step: marks the chunks computed, charges each
    /// sequence its share of `step_seconds` by tokens, appends the tokens
    /// sampled from `logits` (one row per sampling chunk, in order) and ends
    /// the sequences that are done.
    pub fn update_from_output(
        &mut self,
        output: &SchedulerOutput,
        logits: &[Vec<f32>],
        step_seconds: f64,
        tokenizer: &ModelTokenizer,
    ) {
        let total = output.num_tokens().max(1) as f64;
        let mut rows = logits.iter();
        let mut finished = Vec::new();
        for chunk in &output.chunks {
            let seq = &mut self.running[chunk.running_index];
            seq.num_computed += chunk.num_tokens;
            seq.blocks
                .register_full_blocks(&seq.tokens, seq.num_computed);
            seq.charge(step_seconds * chunk.num_tokens as f64 / total);
            if !chunk.samples {
                continue;
            }
            let Some(row) = rows.next() else { break };
            if let Some(reason) = seq.append_sampled(row, tokenizer, self.context_length) {
                finished.push((chunk.running_index, reason));
            }
        }
        // Remove from the back so earlier indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (index, reason) in finished {
            let seq = self.running.remove(index);
            seq.finish(reason, tokenizer, None);
        }
    }

    /// Ends every sequence with `reason` (a failed step, or shutdown).
    pub fn abort_all(&mut self, reason: FinishReason, message: &str, tokenizer: &ModelTokenizer) {
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            seq.finish(reason, tokenizer, Some(message.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use tokenmill_protocol::{
        EventSink, GenerateRequest, GenerationEvent, RequestId, SamplingParams, StopConditions,
        TenantId,
    };

    struct Discard;
    impl EventSink for Discard {
        fn send(&self, _: GenerationEvent) -> bool {
            true
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    fn tokenizer() -> ModelTokenizer {
        let path = tokenmill_models::catalog::find("smollm2").unwrap().path();
        ModelTokenizer::from_gguf_file(&path).expect("run models/fetch-smollm2.sh")
    }

    fn sequence(pool: &BlockPool, prompt_len: usize, max_tokens: usize) -> Sequence {
        let request = GenerateRequest {
            id: RequestId(format!("r{prompt_len}")),
            tenant: TenantId::anonymous(),
            model: "m".into(),
            prompt_tokens: (100..100 + prompt_len as u32).collect(),
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_tokens,
                stop_strings: vec![],
            },
            arrived_at: SystemTime::now(),
        };
        Sequence::new(request, Box::new(Discard), pool.empty_sequence("t"))
    }

    /// Runs steps with logits that always pick token 300 until all finish;
    /// returns the number of steps.
    fn drive(s: &mut Scheduler, t: &ModelTokenizer) -> usize {
        let mut row = vec![0f32; 49152];
        row[300] = 1.0;
        let mut steps = 0;
        while !s.is_idle() {
            let out = s.schedule();
            assert!(
                !out.is_empty(),
                "stalled with {:?} waiting/running",
                s.len()
            );
            assert!(out.num_tokens() <= s.config.max_batched_tokens);
            let rows = vec![row.clone(); out.chunks.iter().filter(|c| c.samples).count()];
            s.update_from_output(&out, &rows, 0.01, t);
            steps += 1;
            assert!(steps < 10_000);
        }
        steps
    }

    #[test]
    fn a_small_cache_preempts_and_still_finishes_everything() {
        let t = tokenizer();
        let pool = BlockPool::new(6, 8);
        let config = SchedulerConfig {
            max_batched_tokens: 16,
            max_num_seqs: 8,
        };
        let mut s = Scheduler::new(config, pool.clone(), 8192);
        for len in [9, 6, 7, 8, 10, 5] {
            s.add(sequence(&pool, len, 24));
        }
        drive(&mut s, &t);
        assert!(s.preemptions() > 0);
        assert_eq!(pool.num_free(), 6);
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_under_the_budget() {
        let t = tokenizer();
        let pool = BlockPool::new(64, 16);
        let config = SchedulerConfig {
            max_batched_tokens: 32,
            max_num_seqs: 4,
        };
        let mut s = Scheduler::new(config, pool.clone(), 8192);
        s.add(sequence(&pool, 100, 2));
        let first = s.schedule();
        assert_eq!(first.num_tokens(), 32);
        assert!(
            !first.chunks[0].samples,
            "a partial prefill samples nothing"
        );
        s.update_from_output(&first, &[], 0.0, &t);
        // 100 prompt tokens in 4 steps of at most 32, then one decode step.
        assert_eq!(drive(&mut s, &t), 4);
        assert_eq!(pool.num_free(), 64);
    }
}
