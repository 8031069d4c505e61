//! Hugging Face-layout models (config.json + bf16 safetensors) against
//! transformers: tiny Llama, Llama 3 (rotary rescaling), Qwen2 and Mistral
//! models with random weights, and the logits transformers computed for them
//! at every position (`models/reference/make_tiny_hf.py` wrote both).
//!
//! The CPU path upcasts the bf16 weights to f32 as the reference did, so the
//! two differ only by float32 rounding in a different order of operations.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tokenmill_models::hf::{self, SafetensorsWeights};
use tokenmill_models::random_weights::RandomWeights;
use tokenmill_models::{ForwardBatch, Llama, LogitRows};

#[derive(Deserialize)]
struct Reference {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

const ARCHS: &[&str] = &["llama", "llama3", "qwen2", "mistral"];
const BLOCK_SIZE: usize = 16;

fn model_dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("tiny-{arch}"))
}

fn load(arch: &str) -> (Llama, Reference) {
    let dir = model_dir(arch);
    let cfg = hf::read_config(&dir).unwrap();
    let mut weights = SafetensorsWeights::open(&hf::safetensors_files(&dir).unwrap()).unwrap();
    let model = Llama::from_dense(cfg, &mut weights, &Device::Cpu, |_, _| {}).unwrap();
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (model, serde_json::from_str(&text).unwrap())
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

/// Largest |ours - theirs| over a row, relative to the row's largest |theirs|.
fn max_relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

fn blocks(tokens: usize) -> Vec<u32> {
    (0..tokens.div_ceil(BLOCK_SIZE) as u32).collect()
}

#[test]
fn one_prefill_gives_transformers_logits_at_every_position() {
    for arch in ARCHS {
        let (model, reference) = load(arch);
        let n = reference.tokens.len();
        let cache = model.new_kv_cache(BLOCK_SIZE, 8).unwrap();
        let mut batch = ForwardBatch::default();
        batch.push(&reference.tokens, n, blocks(n), LogitRows::All);
        let logits = rows(&model.forward(&batch, &cache).unwrap());
        for (pos, (ours, theirs)) in logits.iter().zip(&reference.logits).enumerate() {
            let err = max_relative_error(ours, theirs);
            assert!(err < 1e-4, "{arch} position {pos}: relative error {err}");
        }
        // The logits are far from uniform, so the check has teeth: a wrong
        // rotary pairing or mask would move them by far more than 1e-4.
        let spread = reference.logits[n - 1]
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()));
        assert!(spread > 1.0, "{arch}: logits too flat ({spread})");
    }
}

#[test]
fn prefill_in_chunks_then_decode_gives_the_same_logits() {
    for arch in ARCHS {
        let (model, reference) = load(arch);
        let n = reference.tokens.len();
        let cache = model.new_kv_cache(BLOCK_SIZE, 8).unwrap();
        // Positions 0..23 in two chunks (the second crossing a block
        // boundary), then one token per step.
        let mut done = 0;
        for end in [7, 23] {
            let mut batch = ForwardBatch::default();
            batch.push(
                &reference.tokens[done..end],
                end,
                blocks(end),
                LogitRows::Last,
            );
            let last = rows(&model.forward(&batch, &cache).unwrap());
            let err = max_relative_error(&last[0], &reference.logits[end - 1]);
            assert!(err < 1e-4, "{arch} chunk ending at {end}: {err}");
            done = end;
        }
        for pos in done..n {
            let mut batch = ForwardBatch::default();
            batch.push(
                &reference.tokens[pos..pos + 1],
                pos + 1,
                blocks(pos + 1),
                LogitRows::Last,
            );
            let step = rows(&model.forward(&batch, &cache).unwrap());
            let err = max_relative_error(&step[0], &reference.logits[pos]);
            assert!(err < 1e-4, "{arch} decode at {pos}: {err}");
        }
    }
}

#[test]
fn random_weights_build_the_architecture_and_run() {
    let cfg = hf::read_config(&model_dir("qwen2")).unwrap();
    let run = |seed| {
        let mut weights = RandomWeights::new(&cfg, seed, DType::BF16);
        let model = Llama::from_dense(cfg.clone(), &mut weights, &Device::Cpu, |_, _| {}).unwrap();
        let cache = model.new_kv_cache(BLOCK_SIZE, 2).unwrap();
        let mut batch = ForwardBatch::default();
        batch.push(&[1, 2, 3, 4, 5], 5, vec![0], LogitRows::Last);
        rows(&model.forward(&batch, &cache).unwrap()).remove(0)
    };
    let a = run(11);
    assert_eq!(a.len(), cfg.vocab_size);
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(a, run(11), "same seed, same model");
    assert_ne!(a, run(12), "another seed, another model");
}

#[test]
fn a_checkpoint_that_does_not_match_its_config_is_refused_by_name() {
    let dir = model_dir("llama");
    let mut cfg = hf::read_config(&dir).unwrap();
    cfg.intermediate_size += 1;
    let mut weights = SafetensorsWeights::open(&hf::safetensors_files(&dir).unwrap()).unwrap();
    let err = Llama::from_dense(cfg, &mut weights, &Device::Cpu, |_, _| {})
        .err()
        .expect("a shape mismatch must fail")
        .to_string();
    assert!(err.contains("mlp.gate_proj.weight"), "{err}");
}
