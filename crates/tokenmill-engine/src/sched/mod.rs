//! Continuous batching: which sequences run in the next step, and how many of
//! their tokens.
//!
//! The contract is narrow: [`Scheduler::schedule`] decides a step and returns
//! a [`SchedulerOutput`]; the engine runs the model on it and hands the
//! sampled logits back to [`Scheduler::update_from_output`]. Decodes and
//! unfinished prefills of running sequences go first, then new sequences are
//! admitted under the step's token budget, fairly across tenants (see
//! [`fair`]); long prompts are prefilled in chunks. When the KV cache runs
//! out of blocks the newest running sequence is preempted and later
//! recomputed from its tokens. A sequence being admitted first takes the
//! cached blocks that already hold a prefix of its tokens (same tenant only)
//! and computes only the rest; the other completions of an `n > 1` request
//! wait until the first has computed the prompt, then share its blocks.

pub mod fair;
mod request;
mod sequence;

pub use fair::FairQueue;
pub use sequence::Sequence;

use crate::kv::BlockPool;
use tokenmill_models::{ForwardBatch, LogitRows, ModelTokenizer, SampledRow, SamplingParamsRow};
use tokenmill_protocol::{FinishReason, RequestFailure, TenantId};

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

/// What a step gives each sampling chunk: its logit row, for the engine's
/// host sampler; or the token the batched sampler (the model's, on its
/// device) already drew, with its logprobs.
#[derive(Clone, Debug)]
pub enum StepRow {
    /// The vocabulary's logits.
    Logits(Vec<f32>),
    /// A drawn token.
    Sampled(SampledRow),
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

    /// The fair queue's counter of `tenant`.
    pub fn served(&self, tenant: &TenantId) -> f64 {
        self.waiting.served(tenant)
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
        for seq in self.waiting.extract(Sequence::is_cancelled) {
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
                let caller = seq.caller();
                self.waiting.charge(&caller.tenant, caller.weight, want);
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
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            let caller = seq.caller().clone();
            self.running.push(seq);
            chunks.push(ScheduledChunk {
                running_index: self.running.len() - 1,
                num_tokens: want,
                samples,
            });
            // Charged now, not after the step, so that the next admission
            // in this same step already sees it.
            self.waiting.charge(&caller.tenant, caller.weight, want);
            budget -= want;
        }
        let tenant_tokens = self.tenant_tokens(&chunks);
        SchedulerOutput {
            chunks,
            tenant_tokens,
        }
    }

    /// Tokens per tenant in `chunks`.
    fn tenant_tokens(&self, chunks: &[ScheduledChunk]) -> Vec<(TenantId, usize)> {
        let mut out: Vec<(TenantId, usize)> = Vec::new();
        for chunk in chunks {
            let tenant = &self.running[chunk.running_index].caller().tenant;
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
                request_id = victim.request_id(),
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

    /// The batched sampler's rows of the plan's sampling chunks, in order.
    pub fn sampling_rows(&self, output: &SchedulerOutput) -> Vec<SamplingParamsRow> {
        output
            .chunks
            .iter()
            .filter(|c| c.samples)
            .map(|c| self.running[c.running_index].batched_sampling_row())
            .collect()
    }

    /// Applies a finished step: marks the chunks computed, charges each
    /// sequence its share of `step_seconds` by tokens, appends the tokens
    /// sampled from `rows` (one per sampling chunk, in order) and ends
    /// the sequences that are done.
    pub fn update_from_output(
        &mut self,
        output: &SchedulerOutput,
        rows: &[StepRow],
        step_seconds: f64,
        tokenizer: &ModelTokenizer,
    ) {
        let total = output.num_tokens().max(1) as f64;
        let mut rows = rows.iter();
        let mut finished = Vec::new();
        let mut forks = Vec::new();
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
            let ended = seq.append_sampled(row, tokenizer, self.context_length);
            forks.extend(seq.take_ready_forks());
            if let Some(reason) = ended {
                finished.push((chunk.running_index, reason));
            }
        }
        // Completions of n > 1 requests whose prompt is now cached: next in
        // line for their tenant.
        for fork in forks.into_iter().rev() {
            self.waiting.push_front(fork);
        }
        // Remove from the back so earlier indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (index, reason) in finished {
            let seq = self.running.remove(index);
            seq.finish(reason, tokenizer, None);
        }
    }

    /// Ends every sequence with `reason` (a failed step, or shutdown).
    pub fn abort_all(
        &mut self,
        reason: FinishReason,
        failure: Option<RequestFailure>,
        tokenizer: &ModelTokenizer,
    ) {
        let waiting = self.waiting.extract(|_| true);
        for seq in self.running.drain(..).chain(waiting) {
            seq.finish(reason, tokenizer, failure.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::SystemTime;
    use tokenmill_protocol::{
        Caller, DiscardMeter, EventSink, GenerateRequest, GenerationEvent, RequestId,
        SamplingParams, StopConditions,
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
        tenant_sequence(pool, Caller::anonymous(), prompt_len, max_tokens, 1)
    }

    fn tenant_sequence(
        pool: &BlockPool,
        caller: Caller,
        prompt_len: usize,
        max_tokens: usize,
        n: usize,
    ) -> Sequence {
        let request = GenerateRequest {
            id: RequestId(format!("r{prompt_len}")),
            caller,
            model: "m".into(),
            prompt_tokens: (100..100 + prompt_len as u32).collect(),
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                max_tokens,
                stop_strings: vec![],
                ignore_eos: false,
            },
            n,
            logprobs: None,
            arrived_at: SystemTime::now(),
        };
        Sequence::for_request(request, Box::new(Discard), Arc::new(DiscardMeter), || {
            pool.empty_sequence("t")
        })
    }

    /// Runs steps with logits that always pick token 300 until all finish;
    /// returns the number of steps.
    fn drive(s: &mut Scheduler, t: &ModelTokenizer) -> usize {
        drive_until(s, t, |_, _| false).len()
    }

    /// Runs steps as [`drive`] does until all finish or `stop` holds for a
    /// step's plan; returns the tokens computed per tenant, step by step.
    fn drive_until(
        s: &mut Scheduler,
        t: &ModelTokenizer,
        stop: impl Fn(&Scheduler, &SchedulerOutput) -> bool,
    ) -> Vec<Vec<(TenantId, usize)>> {
        let mut row = vec![0f32; 49152];
        row[300] = 1.0;
        let mut steps = Vec::new();
        while !s.is_idle() {
            let out = s.schedule();
            assert!(
                !out.is_empty(),
                "stalled with {:?} waiting/running",
                s.len()
            );
            assert!(out.num_tokens() <= s.config.max_batched_tokens);
            let rows =
                vec![StepRow::Logits(row.clone()); out.chunks.iter().filter(|c| c.samples).count()];
            s.update_from_output(&out, &rows, 0.01, t);
            steps.push(out.tenant_tokens.clone());
            assert!(steps.len() < 10_000);
            if stop(s, &out) {
                break;
            }
        }
        steps
    }

    fn caller(name: &str, weight: u32) -> Caller {
        Caller {
            tenant: TenantId(name.to_owned()),
            key_id: tokenmill_protocol::KeyId::none(),
            weight,
        }
    }

    /// Tenant "flood" sends 40 requests, then "trickle" 4 (10:1), into an
    /// engine that runs 4 at a time; returns the tokens computed for each
    /// while both had requests waiting.
    fn run_flood(weights: (u32, u32)) -> (usize, usize) {
        let t = tokenizer();
        let pool = BlockPool::new(256, 16);
        let config = SchedulerConfig {
            max_batched_tokens: 256,
            max_num_seqs: 4,
        };
        let mut s = Scheduler::new(config, pool.clone(), 8192);
        let (flood, trickle) = (caller("flood", weights.0), caller("trickle", weights.1));
        for _ in 0..40 {
            s.add(tenant_sequence(&pool, flood.clone(), 8, 16, 1));
        }
        for _ in 0..4 {
            s.add(tenant_sequence(&pool, trickle.clone(), 8, 16, 1));
        }
        let count = |steps: &[Vec<(TenantId, usize)>], who: &Caller| -> usize {
            steps
                .iter()
                .flatten()
                .filter(|(t, _)| *t == who.tenant)
                .map(|(_, n)| n)
                .sum()
        };
        let steps = drive_until(&mut s, &t, |s, _| {
            s.waiting.waiting_for(&trickle.tenant) == 0
        });
        // Up to the step that admitted the trickle's last request: from then
        // on the trickle has nothing waiting and its spare share goes to the
        // flood, as it should.
        let both_waiting = &steps[..steps.len() - 1];
        (count(both_waiting, &flood), count(both_waiting, &trickle))
    }

    #[test]
    fn a_flooding_tenant_does_not_starve_another_and_weights_set_the_shares() {
        // Equal weights: equal tokens while both have work waiting. Without
        // fair admission the trickle would wait behind 36 of the flood's
        // requests (a ratio near 10).
        let (flood, trickle) = run_flood((1, 1));
        let ratio = flood as f64 / trickle as f64;
        assert!((0.8..=1.25).contains(&ratio), "{flood} : {trickle}");
        // Weight 3 against weight 1: three tokens for one.
        let (flood, trickle) = run_flood((3, 1));
        let ratio = flood as f64 / trickle as f64;
        assert!((2.5..=3.5).contains(&ratio), "{flood} : {trickle}");
        // Weights the other way round: the flood gets a third.
        let (flood, trickle) = run_flood((1, 3));
        let ratio = flood as f64 / trickle as f64;
        assert!((0.2..=0.45).contains(&ratio), "{flood} : {trickle}");
    }

    #[test]
    fn the_completions_of_an_n_request_compute_the_prompt_once() {
        let t = tokenizer();
        let pool = BlockPool::new(64, 16);
        let mut s = Scheduler::new(SchedulerConfig::default(), pool.clone(), 8192);
        s.add(tenant_sequence(&pool, Caller::anonymous(), 100, 3, 4));
        let steps = drive_until(&mut s, &t, |_, _| false);
        let computed: usize = steps.iter().flatten().map(|(_, n)| n).sum();
        // 100 prompt tokens once; each of the 3 other completions takes the
        // 6 full blocks (96 tokens) from the cache and computes the last 4;
        // then 2 decodes each (the third token is sampled, never fed back).
        assert_eq!(computed, 100 + 3 * 4 + 4 * 2);
        assert_eq!(pool.num_free(), 64);
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
