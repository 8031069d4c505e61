//! Times the sampler's CPU reference on one row of SmolLM2's vocabulary:
//! `cargo run --release -p tokenmill-kernels --example sample_time`.
use std::time::Instant;
use tokenmill_kernels::reference::sampling::{sample_rows, sample_tokens, SamplingParamsRow};

fn main() {
    let vocab = 49152;
    let mut x = 0x2545f4914f6cdd1du64;
    let logits: Vec<f32> = (0..vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
        })
        .collect();
    for (name, row) in [
        ("greedy", SamplingParamsRow::default()),
        (
            "temperature 0.8, top_p 0.9",
            SamplingParamsRow {
                temperature: 0.8,
                top_p: 0.9,
                seed: 1,
                ..SamplingParamsRow::default()
            },
        ),
        (
            "greedy, 5 logprobs",
            SamplingParamsRow {
                num_logprobs: 5,
                ..SamplingParamsRow::default()
            },
        ),
    ] {
        let runs = 50;
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(sample_rows(&logits, vocab, &[row]).unwrap());
        }
        println!(
            "{name}: {:.3} ms/row",
            t.elapsed().as_secs_f64() * 1e3 / runs as f64
        );
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(sample_tokens(&logits, vocab, &[row]).unwrap());
        }
        println!(
            "{name}, tokens only: {:.3} ms/row",
            t.elapsed().as_secs_f64() * 1e3 / runs as f64
        );
    }
}
