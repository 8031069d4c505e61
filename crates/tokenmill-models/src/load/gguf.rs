//! Weights from a GGUF file: quantized linear layers as stored, norms and
//! embeddings dequantized.

use crate::error::{ModelError, Result};
use crate::forward::linear::{Linear, Norm};
use crate::forward::llama::{Attention, DecoderLayer, Llama, Mlp};
use crate::load::config::LlamaConfig;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::io::{Read, Seek};

/// Reads a GGUF file's tensors by name.
struct GgufTensors<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
}

impl<R: Read + Seek> GgufTensors<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(ModelError::Metadata(format!("missing tensor {name}")));
        }
        Ok(self.content.tensor(self.reader, name, self.device)?)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(self.device)?)
    }

    fn optional_dense(&mut self, name: &str) -> Result<Option<Tensor>> {
        if self.content.tensor_infos.contains_key(name) {
            self.dense(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The linear layers `names`, stacked.
    fn linear(&mut self, names: &[String]) -> Result<Linear> {
        let mut weights = Vec::with_capacity(names.len());
        let mut biases = Vec::with_capacity(names.len());
        for name in names {
            weights.push(self.qtensor(&format!("{name}.weight"))?);
            biases.push(self.optional_dense(&format!("{name}.bias"))?);
        }
        Linear::new(weights, biases, self.device)
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.dense(name)?,
            eps: eps as f32,
        })
    }
}

impl Llama {
    /// Loads the weights of a GGUF file. `on_layer` is called after each
    /// decoder layer is loaded (for progress reporting).
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        mut on_layer: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(content)?;
        let mut t = GgufTensors {
            content,
            reader,
            device,
        };
        let embeddings_q = t.qtensor("token_embd.weight")?;
        let embeddings = embeddings_q.dequantize(device)?;
        let lm_head = if cfg.tied_embeddings {
            Linear::new(vec![embeddings_q], vec![None], device)?
        } else {
            t.linear(&["output".to_string()])?
        };
        let final_norm = t.norm("output_norm.weight", cfg.rms_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let name = |n: &str| format!("blk.{i}.{n}");
            layers.push(DecoderLayer {
                attn_norm: t.norm(&name("attn_norm.weight"), cfg.rms_norm_eps)?,
                attn: Attention {
                    qkv: t.linear(&[name("attn_q"), name("attn_k"), name("attn_v")])?,
                    o: t.linear(&[name("attn_output")])?,
                },
                mlp_norm: t.norm(&name("ffn_norm.weight"), cfg.rms_norm_eps)?,
                mlp: Mlp {
                    gate_up: t.linear(&[name("ffn_gate"), name("ffn_up")])?,
                    down: t.linear(&[name("ffn_down")])?,
                },
            });
            on_layer(i + 1, cfg.num_layers);
        }
        Self::assemble(cfg, embeddings, layers, final_norm, lm_head, device)
    }
}
