//! A request's sampling parameters as rows of the one sampler,
//! [`tokenmill_models::Llama::sample`]: the sampling kernel on a GPU, its
//! bit-exact CPU reference elsewhere, so a seed gives the same text on both.

use tokenmill_models::SamplingParamsRow;
use tokenmill_protocol::SamplingParams;

/// The most top logprobs the sampler returns per token (the most the OpenAI
/// API lets a client ask for).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One row per completion of a request (`n` of them, at least one), `step`
/// left at 0 for the scheduler to set to each draw's position.
///
/// A request without a seed draws one at random, once: its completions then
/// differ from each other as a seeded request's do. Completion `i` draws
/// with `seed + i`, its own stream, so a seeded request is reproducible as a
/// whole. Parameters the sampler would refuse (a non-finite temperature, a
/// NaN top-p; the server never sends them) fall back to greedy and to no
/// nucleus, so one request cannot fail the batch it is in.
pub fn sampling_rows(
    params: &SamplingParams,
    n: usize,
    logprobs: Option<usize>,
) -> Vec<SamplingParamsRow> {
    let seed = params.seed.unwrap_or_else(rand::random);
    let temperature = if params.temperature.is_finite() {
        params.temperature.max(0.0)
    } else {
        0.0
    };
    let top_p = if params.top_p.is_nan() {
        1.0
    } else {
        params.top_p
    };
    let num_logprobs = logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS) as u32;
    (0..n.max(1))
        .map(|index| SamplingParamsRow {
            temperature,
            top_k: 0,
            top_p,
            seed: seed.wrapping_add(index as u64),
            step: 0,
            num_logprobs,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_completion_has_its_own_stream_of_the_request_seed() {
        let params = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: Some(u64::MAX),
        };
        let rows = sampling_rows(&params, 3, Some(50));
        let seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, [u64::MAX, 0, 1]);
        assert!(rows.iter().all(|r| r.num_logprobs == 20 && r.top_k == 0));
        assert!(rows.iter().all(|r| r.validate().is_ok()));
    }

    #[test]
    fn an_unseeded_request_draws_one_seed_for_all_its_completions() {
        let params = SamplingParams {
            seed: None,
            ..SamplingParams::greedy()
        };
        let rows = sampling_rows(&params, 2, None);
        assert_eq!(rows[1].seed, rows[0].seed.wrapping_add(1));
        assert_eq!(sampling_rows(&params, 0, None).len(), 1, "n is at least 1");
    }

    #[test]
    fn parameters_the_sampler_refuses_fall_back_instead_of_failing_the_batch() {
        let params = SamplingParams {
            temperature: f32::NAN,
            top_p: f32::NAN,
            seed: Some(1),
        };
        let row = sampling_rows(&params, 1, None)[0];
        assert_eq!((row.temperature, row.top_p), (0.0, 1.0));
        assert!(row.validate().is_ok());
    }
}
