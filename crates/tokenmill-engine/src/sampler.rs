//! Draws the next token from a row of logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenmill_models::SamplingParamsRow;
use tokenmill_protocol::SamplingParams;

/// The most top logprobs the batched sampler returns per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The sampler of one sequence, with its own seeded random stream.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `params`; without a seed, one is drawn at random.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// This sampler's parameters as a row of the batched sampler (the
    /// sampling kernel on a GPU): the same temperature, top-p and seed, the
    /// position of the token drawn as the row's counter (so a seeded
    /// request draws the same tokens however it is batched), and how many
    /// top logprobs to return.
    pub fn batched_row(&self, position: usize, num_logprobs: usize) -> SamplingParamsRow {
        SamplingParamsRow {
            temperature: self.params.temperature,
            top_k: 0,
            top_p: self.params.top_p,
            seed: self.seed,
            step: position as u64,
            num_logprobs: num_logprobs.min(MAX_TOP_LOGPROBS) as u32,
        }
    }

    /// The next token given the logits of the vocabulary.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let mut candidates = softmax_candidates(logits, self.params.temperature);
        if self.params.top_p < 1.0 {
            truncate_to_top_p(&mut candidates, self.params.top_p);
        }
        let total: f32 = candidates.iter().map(|(_, p)| p).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (id, p) in &candidates {
            if draw < *p {
                return *id;
            }
            draw -= p;
        }
        // Rounding left a sliver at the end: the least likely candidate.
        candidates
            .last()
            .map_or_else(|| argmax(logits), |(id, _)| *id)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Natural log probabilities of the vocabulary, computed in f64 so that a
/// long tail of tiny probabilities does not lose the normaliser's precision.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|l| l - max - log_sum).collect()
}

/// The `k` tokens with the largest values, largest first (lower id first on
/// ties), without sorting the whole vocabulary.
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut items: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u32, *v))
        .collect();
    let k = k.min(items.len());
    if k == 0 {
        return Vec::new();
    }
    items.select_nth_unstable_by(k - 1, order);
    items.truncate(k);
    items.sort_by(order);
    items.into_iter().map(|(i, _)| i).collect()
}

/// `(token, probability)` at `temperature`, most likely first.
fn softmax_candidates(logits: &[f32], temperature: f32) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    let sum: f32 = out.iter().map(|(_, p)| p).sum();
    for (_, p) in &mut out {
        *p /= sum;
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// Keeps the most likely candidates until their mass reaches `top_p` (at
/// least one).
fn truncate_to_top_p(candidates: &mut Vec<(u32, f32)>, top_p: f32) {
    let mut mass = 0.0;
    let mut keep = candidates.len();
    for (i, (_, p)) in candidates.iter().enumerate() {
        mass += p;
        if mass >= top_p {
            keep = i + 1;
            break;
        }
    }
    candidates.truncate(keep.max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
        }
    }

    #[test]
    fn log_softmax_normalises_and_keeps_order() {
        let lp = log_softmax(&[1.0, 3.0, 2.0, -50.0]);
        let mass: f64 = lp.iter().map(|l| f64::from(*l).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
        assert_eq!(top_k(&lp, 3), vec![1, 2, 0]);
        // log(e^3 / (e^1 + e^3 + e^2 + e^-50))
        let expected = 3.0 - (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((f64::from(lp[1]) - expected).abs() < 1e-6);
    }

    #[test]
    fn top_k_handles_ties_zero_and_more_than_the_vocabulary() {
        assert_eq!(top_k(&[0.5, 0.5, 0.1], 2), vec![0, 1]);
        assert!(top_k(&[0.5], 0).is_empty());
        assert_eq!(top_k(&[0.1, 0.2], 5), vec![1, 0]);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draws = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, seed));
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn tiny_top_p_keeps_only_the_top_token() {
        let mut s = Sampler::new(params(1.0, 1e-6, 3));
        for _ in 0..20 {
            assert_eq!(s.sample(&[1.0, 5.0, 4.9, 0.0]), 1);
        }
    }

    #[test]
    fn top_p_never_draws_outside_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0.8, 11));
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.5 / 0.5 at temperature 1.
        let mut s = Sampler::new(params(1.0, 1.0, 5));
        let ones = (0..2000).filter(|_| s.sample(&[0.0, 0.0]) == 1).count();
        assert!((850..1150).contains(&ones), "{ones}");
    }
}
