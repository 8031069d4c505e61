//! Seeded random weights for any architecture [`crate::load::hf`] reads, so speed
//! work can run a real model's shapes (Llama-3-8B, say) where its weights are
//! not available: the time of a forward does not depend on the values.
//!
//! Every value is a pure function of (seed, tensor name, index): a
//! counter-based generator (SplitMix64 of the three) rather than a stream, so
//! tensors can be drawn in any order, in parallel, and the same seed gives
//! the same model on every machine. Values are uniform with a trained model's
//! typical spread (standard deviation 0.02; norms around 1), which keeps
//! activations finite through any depth.

use crate::error::{ModelError, Result};
use crate::load::config::LlamaConfig;
use crate::load::dense::DenseWeights;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// Standard deviation of the random weights.
const WEIGHT_STD: f32 = 0.02;

/// The weights of one architecture, drawn on demand.
pub struct RandomWeights {
    seed: u64,
    dtype: DType,
    /// Every tensor's shape by name, as in a Hugging Face checkpoint.
    shapes: BTreeMap<String, Vec<usize>>,
}

impl RandomWeights {
    /// The tensors a checkpoint of `cfg`'s architecture holds, to be drawn
    /// with `seed` and stored as `dtype`.
    pub fn new(cfg: &LlamaConfig, seed: u64, dtype: DType) -> Self {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_width, kv_width) = (cfg.num_heads * cfg.head_dim, cfg.kv_width());
        let mut shapes = BTreeMap::new();
        shapes.insert(
            "model.embed_tokens.weight".to_owned(),
            vec![cfg.vocab_size, hidden],
        );
        shapes.insert("model.norm.weight".to_owned(), vec![hidden]);
        if !cfg.tied_embeddings {
            shapes.insert("lm_head.weight".to_owned(), vec![cfg.vocab_size, hidden]);
        }
        for i in 0..cfg.num_layers {
            let mut add = |name: &str, shape: Vec<usize>| {
                shapes.insert(format!("model.layers.{i}.{name}"), shape);
            };
            add("input_layernorm.weight", vec![hidden]);
            add("post_attention_layernorm.weight", vec![hidden]);
            add("self_attn.q_proj.weight", vec![q_width, hidden]);
            add("self_attn.k_proj.weight", vec![kv_width, hidden]);
            add("self_attn.v_proj.weight", vec![kv_width, hidden]);
            add("self_attn.o_proj.weight", vec![hidden, q_width]);
            add("mlp.gate_proj.weight", vec![inter, hidden]);
            add("mlp.up_proj.weight", vec![inter, hidden]);
            add("mlp.down_proj.weight", vec![hidden, inter]);
            if cfg.architecture == "qwen2" {
                // Qwen2 has biases on q, k and v.
                add("self_attn.q_proj.bias", vec![q_width]);
                add("self_attn.k_proj.bias", vec![kv_width]);
                add("self_attn.v_proj.bias", vec![kv_width]);
            }
        }
        RandomWeights {
            seed,
            dtype,
            shapes,
        }
    }

    /// The names of all tensors, in name order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    /// The values of tensor `name`, as f32.
    fn values(&self, name: &str, len: usize) -> Vec<f32> {
        let stream = splitmix64(self.seed ^ fnv1a(name.as_bytes()));
        // Uniform on [-a, a] has standard deviation a / sqrt(3).
        let (center, half_width) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else {
            (0.0, WEIGHT_STD * 3f32.sqrt())
        };
        let mut out = vec![0f32; len];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = len.div_ceil(threads).max(1 << 16);
        std::thread::scope(|scope| {
            for (c, part) in out.chunks_mut(chunk).enumerate() {
                scope.spawn(move || {
                    let start = (c * chunk) as u64;
                    for (i, v) in part.iter_mut().enumerate() {
                        let bits = splitmix64(stream.wrapping_add(start + i as u64));
                        // The top 24 bits as a uniform in [0, 1), then [-1, 1).
                        let unit = (bits >> 40) as f32 / (1u64 << 24) as f32;
                        *v = center + half_width * (2.0 * unit - 1.0);
                    }
                });
            }
        });
        out
    }
}

impl DenseWeights for RandomWeights {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| ModelError::Metadata(format!("missing tensor {name}")))?;
        let values = self.values(name, shape.iter().product());
        Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_dtype(self.dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// SplitMix64's output function: a bijective mix of a 64-bit counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor's name: a stream per tensor.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        crate::load::hf::config_from_json(
            r#"{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "vocab_size": 100,
                "tie_word_embeddings": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let cfg = tiny();
        let name = "model.layers.1.mlp.up_proj.weight";
        let draw = |seed| -> Vec<f32> {
            RandomWeights::new(&cfg, seed, DType::F32)
                .tensor(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // Different tensors of one model are different streams.
        let mut w = RandomWeights::new(&cfg, 7, DType::F32);
        let gate = w.tensor("model.layers.1.mlp.gate_proj.weight").unwrap();
        assert_ne!(
            gate.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            draw(7)
        );
    }

    #[test]
    fn values_have_the_intended_spread() {
        let cfg = tiny();
        let w = RandomWeights::new(&cfg, 1, DType::F32);
        let v = w.values("model.embed_tokens.weight", 200_000);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((std - WEIGHT_STD).abs() < 1e-3, "std {std}");
        let norm = w.values("model.norm.weight", 1000);
        assert!(norm.iter().all(|x| (0.9..=1.1).contains(x)));
    }

    #[test]
    fn the_architecture_decides_the_tensors() {
        let cfg = tiny();
        let w = RandomWeights::new(&cfg, 1, DType::BF16);
        assert!(w.contains("model.layers.0.self_attn.q_proj.bias"));
        assert!(!w.contains("lm_head.weight"), "tied embeddings");
        // 1 embedding + 1 norm + 2 layers x (2 norms + 7 matrices + 3 biases).
        assert_eq!(w.names().count(), 2 + 2 * 12);
    }
}
