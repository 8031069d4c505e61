//! Weights from dense tensors named as in Hugging Face checkpoints:
//! safetensors files ([`crate::load::hf`]) or seeded random ones
//! ([`crate::load::random_weights`]).

use crate::error::{ModelError, Result};
use crate::forward::linear::{Linear, Norm};
use crate::forward::llama::{Attention, DecoderLayer, Llama, Mlp};
use crate::load::config::LlamaConfig;
use candle_core::{DType, Device, Tensor};

/// Dense weights by their Hugging Face names (`model.layers.0.mlp.up_proj.weight`),
/// from safetensors files ([`crate::load::hf`]) or drawn at random
/// ([`crate::load::random_weights`]).
pub trait DenseWeights {
    /// The tensor `name` in its stored type, on any device.
    fn tensor(&mut self, name: &str) -> Result<Tensor>;
    /// Whether there is a tensor `name` (for optional biases).
    fn contains(&self, name: &str) -> bool;
}

/// Reads the tensors of one model from [`DenseWeights`], checking shapes
/// against the configuration so a mismatched file fails at load, by name.
struct DenseLoader<'a> {
    weights: &'a mut dyn DenseWeights,
    device: &'a Device,
}

impl DenseLoader<'_> {
    fn tensor(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = self.weights.tensor(name)?;
        if t.dims() != dims {
            return Err(ModelError::Metadata(format!(
                "{name}: shape {:?}, expected {dims:?}",
                t.dims()
            )));
        }
        Ok(t)
    }

    /// The layers `names` (each `[rows, k]`), stacked, with their biases.
    fn linear(&mut self, names: &[(&str, usize)], k: usize) -> Result<Linear> {
        let mut weights = Vec::with_capacity(names.len());
        let mut biases = Vec::with_capacity(names.len());
        for (name, rows) in names {
            weights.push(self.tensor(&format!("{name}.weight"), &[*rows, k])?);
            let bias = format!("{name}.bias");
            biases.push(if self.weights.contains(&bias) {
                Some(self.tensor(&bias, &[*rows])?)
            } else {
                None
            });
        }
        Linear::dense(weights, biases, self.device)
    }

    fn norm(&mut self, name: &str, width: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self
                .tensor(name, &[width])?
                .to_dtype(DType::F32)?
                .to_device(self.device)?,
            eps: eps as f32,
        })
    }
}

impl Llama {
    /// Builds the model from dense weights named as in Hugging Face's Llama,
    /// Qwen2 and Mistral checkpoints. Activations stay f32; see
    /// `Linear::dense` for the products. `on_layer` is called after each
    /// decoder layer is loaded.
    pub fn from_dense(
        cfg: LlamaConfig,
        weights: &mut dyn DenseWeights,
        device: &Device,
        mut on_layer: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let mut t = DenseLoader { weights, device };
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_width, kv_width) = (cfg.num_heads * cfg.head_dim, cfg.kv_width());
        let embed = t.tensor("model.embed_tokens.weight", &[cfg.vocab_size, hidden])?;
        let embeddings = embed.to_dtype(DType::F32)?.to_device(device)?;
        let lm_head = if cfg.tied_embeddings {
            Linear::dense(vec![embed], vec![None], device)?
        } else {
            t.linear(&[("lm_head", cfg.vocab_size)], hidden)?
        };
        let final_norm = t.norm("model.norm.weight", hidden, cfg.rms_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let name = |n: &str| format!("model.layers.{i}.{n}");
            let (q, k, v) = (
                name("self_attn.q_proj"),
                name("self_attn.k_proj"),
                name("self_attn.v_proj"),
            );
            let (gate, up) = (name("mlp.gate_proj"), name("mlp.up_proj"));
            layers.push(DecoderLayer {
                attn_norm: t.norm(&name("input_layernorm.weight"), hidden, cfg.rms_norm_eps)?,
                attn: Attention {
                    qkv: t.linear(&[(&q, q_width), (&k, kv_width), (&v, kv_width)], hidden)?,
                    o: t.linear(&[(&name("self_attn.o_proj"), hidden)], q_width)?,
                },
                mlp_norm: t.norm(
                    &name("post_attention_layernorm.weight"),
                    hidden,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_up: t.linear(&[(&gate, inter), (&up, inter)], hidden)?,
                    down: t.linear(&[(&name("mlp.down_proj"), hidden)], inter)?,
                },
            });
            on_layer(i + 1, cfg.num_layers);
        }
        Self::assemble(cfg, embeddings, layers, final_norm, lm_head, device)
    }
}
