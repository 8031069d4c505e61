//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged
//! KV cache.
//!
//! Touvron et al., "LLaMA: Open and Efficient Foundation Language Models"
//! (2023): pre-norm decoder layers with RMSNorm, rotary position embeddings,
//! grouped-query attention and a SiLU-gated MLP.
//!
//! One forward takes a flat batch of tokens from many sequences (prefill
//! chunks and single decode tokens mixed): the projections and the MLP run
//! over all tokens at once; attention runs per sequence over the keys and
//! values gathered from its blocks. Whether a weight is quantized is a
//! property of its [`QMatMul`], not of the architecture.

use crate::batch::{ForwardBatch, LogitRows, SequenceChunk};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::io::{Read, Seek};

/// A linear layer with an optional bias (Qwen2 has q/k/v biases).
struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (candle_nn::ops::silu(&self.gate.forward(x)?)? * self.up.forward(x)?)?;
        self.down.forward(&gated)
    }
}

struct DecoderLayer {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// Rotary embedding tables, one row per position.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    neox: bool,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Rotary {
            cos: angles.cos()?,
            sin: angles.sin()?,
            neox: cfg.rope_neox,
        })
    }

    /// The tables of the batch's positions, gathered once per forward.
    fn at(&self, positions: &Tensor) -> Result<RotaryAt> {
        Ok(RotaryAt {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
            neox: self.neox,
        })
    }
}

/// Rotary tables for the tokens of one batch, in batch order.
struct RotaryAt {
    cos: Tensor,
    sin: Tensor,
    neox: bool,
}

impl RotaryAt {
    /// Rotates `x` (`[1, heads, tokens, head_dim]`) by each token's position.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(if self.neox {
            candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?
        } else {
            candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?
        })
    }
}

/// A Llama-family model with its weights loaded.
pub struct Llama {
    cfg: LlamaConfig,
    embeddings: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: RmsNorm,
    lm_head: QMatMul,
    rotary: Rotary,
    device: Device,
}

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

    /// A weight for [`QMatMul`], re-quantized when candle's CPU backend has
    /// no vectorised kernel for its type.
    fn matmul_weight(&mut self, name: &str) -> Result<QMatMul> {
        let weight = self.qtensor(name)?;
        let weight = match cpu_matmul_dtype(weight.dtype(), self.device) {
            Some(dtype) => QTensor::quantize(&weight.dequantize(self.device)?, dtype)?,
            None => weight,
        };
        Ok(QMatMul::from_qtensor(weight)?)
    }

    fn linear(&mut self, prefix: &str) -> Result<Linear> {
        Ok(Linear {
            weight: self.matmul_weight(&format!("{prefix}.weight"))?,
            bias: self.optional_dense(&format!("{prefix}.bias"))?,
        })
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
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
            match cpu_matmul_dtype(embeddings_q.dtype(), device) {
                Some(dtype) => QMatMul::from_qtensor(QTensor::quantize(&embeddings, dtype)?)?,
                None => QMatMul::from_qtensor(embeddings_q)?,
            }
        } else {
            t.matmul_weight("output.weight")?
        };
        let final_norm = t.norm("output_norm.weight", cfg.rms_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            layers.push(DecoderLayer {
                attn_norm: t.norm(&format!("{p}.attn_norm.weight"), cfg.rms_norm_eps)?,
                attn: Attention {
                    q: t.linear(&format!("{p}.attn_q"))?,
                    k: t.linear(&format!("{p}.attn_k"))?,
                    v: t.linear(&format!("{p}.attn_v"))?,
                    o: t.linear(&format!("{p}.attn_output"))?,
                },
                mlp_norm: t.norm(&format!("{p}.ffn_norm.weight"), cfg.rms_norm_eps)?,
                mlp: Mlp {
                    gate: t.linear(&format!("{p}.ffn_gate"))?,
                    up: t.linear(&format!("{p}.ffn_up"))?,
                    down: t.linear(&format!("{p}.ffn_down"))?,
                },
            });
            on_layer(i + 1, cfg.num_layers);
        }
        Ok(Llama {
            rotary: Rotary::new(&cfg, device)?,
            cfg,
            embeddings,
            layers,
            final_norm,
            lm_head,
            device: device.clone(),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Allocates a KV cache shaped for this model.
    pub fn new_kv_cache(&self, block_size: usize, num_blocks: usize) -> Result<PagedKvCache> {
        PagedKvCache::new(
            self.cfg.num_layers,
            self.cfg.kv_width(),
            block_size,
            num_blocks,
            &self.device,
        )
    }

    /// Runs one step over a flat batch: writes the new tokens' keys and values
    /// into `cache` and returns the logit rows the chunks asked for,
    /// `[rows, vocab]`, in chunk order.
    pub fn forward(&self, batch: &ForwardBatch, cache: &PagedKvCache) -> Result<Tensor> {
        batch.validate(
            cache.block_size(),
            cache.num_blocks(),
            self.cfg.context_length,
        )?;
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let positions = Tensor::new(batch.positions().as_slice(), &self.device)?;
        let rotary = self.rotary.at(&positions)?;
        let mut hidden = self.embeddings.index_select(&tokens, 0)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = layer.attn_norm.forward(&hidden)?;
            let attn = self.attention(index, &layer.attn, &normed, &rotary, batch, cache)?;
            hidden = (hidden + attn)?;
            let normed = layer.mlp_norm.forward(&hidden)?;
            hidden = (&hidden + layer.mlp.forward(&normed)?)?;
        }
        let rows = self.logit_rows(&hidden, batch)?;
        let normed = self.final_norm.forward(&rows)?;
        Ok(self.lm_head.forward(&normed)?)
    }

    /// The hidden states whose logits were asked for.
    fn logit_rows(&self, hidden: &Tensor, batch: &ForwardBatch) -> Result<Tensor> {
        let mut rows: Vec<u32> = Vec::with_capacity(batch.logit_rows());
        let mut offset = 0usize;
        for chunk in &batch.chunks {
            match chunk.logits {
                LogitRows::None => {}
                LogitRows::Last => rows.push((offset + chunk.num_tokens - 1) as u32),
                LogitRows::All => {
                    rows.extend((offset..offset + chunk.num_tokens).map(|r| r as u32))
                }
            }
            offset += chunk.num_tokens;
        }
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        Ok(hidden.index_select(&rows, 0)?)
    }

    /// Self-attention of one layer over the whole batch: `x` is
    /// `[tokens, hidden]`; the result has the same shape.
    fn attention(
        &self,
        layer: usize,
        attn: &Attention,
        x: &Tensor,
        rotary: &RotaryAt,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = x.dim(0)?;
        let q = attn.q.forward(x)?;
        let k = attn.k.forward(x)?;
        let v = attn.v.forward(x)?;
        // Rotary embeddings on all tokens at once: [1, heads, tokens, head_dim].
        let to_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((n, heads, cfg.head_dim))?
                .transpose(0, 1)?
                .unsqueeze(0)?)
        };
        let q = rotary.apply(&to_heads(q, cfg.num_heads)?)?;
        let k = rotary.apply(&to_heads(k, cfg.num_kv_heads)?)?;
        // Back to token-major rows for the cache: [tokens, kv_width].
        let k = k
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((n, cfg.kv_width()))?;
        let q = q.squeeze(0)?; // [heads, tokens, head_dim]

        let mut outputs = Vec::with_capacity(batch.chunks.len());
        let mut offset = 0usize;
        for chunk in &batch.chunks {
            let len = chunk.num_tokens;
            cache.write(
                layer,
                chunk,
                &k.narrow(0, offset, len)?,
                &v.narrow(0, offset, len)?,
            )?;
            let q_chunk = q.narrow(1, offset, len)?;
            outputs.push(self.sequence_attention(layer, chunk, &q_chunk, cache)?);
            offset += len;
        }
        let out = Tensor::cat(&outputs, 0)?;
        attn.o.forward(&out)
    }

    /// Causal attention of one sequence's new queries. Decode tokens and
    /// prefill chunks take this same path on purpose: a sequence recomputed
    /// after preemption, or continued from cached blocks, then gets bit-for-bit
    /// the keys, values and tokens it would have had (an in-place decode
    /// kernel, `cpu_attention`, sums in another order and can flip a close
    /// greedy choice). (`[heads, len,
    /// head_dim]`) over its whole context; returns `[len, heads * head_dim]`.
    fn sequence_attention(
        &self,
        layer: usize,
        chunk: &SequenceChunk,
        q: &Tensor,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let len = chunk.num_tokens;
        let ctx = chunk.context_len;
        let group = cfg.group_size();
        let (keys, values) = cache.gather(layer, chunk, &self.device)?;
        // [kv_heads, ctx, head_dim]
        let keys = keys
            .reshape((ctx, cfg.num_kv_heads, cfg.head_dim))?
            .transpose(0, 1)?;
        let values = values
            .reshape((ctx, cfg.num_kv_heads, cfg.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        // Query heads h*group..(h+1)*group share kv head h: fold the group into
        // the query rows so one batched matmul per kv head does it all.
        let q = q
            .contiguous()?
            .reshape((cfg.num_kv_heads, group * len, cfg.head_dim))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let scores = (q.matmul(&keys.t()?.contiguous()?)? * scale)?;
        let scores = if len > 1 {
            let mask = causal_mask(len, ctx, &self.device)?;
            scores
                .reshape((cfg.num_kv_heads, group, len, ctx))?
                .broadcast_add(&mask)?
                .reshape((cfg.num_kv_heads, group * len, ctx))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values)?; // [kv_heads, group*len, head_dim]
        Ok(out
            .reshape((cfg.num_heads, len, cfg.head_dim))?
            .transpose(0, 1)?
            .reshape((len, cfg.num_heads * cfg.head_dim))?)
    }
}

/// The type to re-quantize a weight of type `dtype` to before a CPU matmul.
///
/// candle's CPU backend computes Q4_1, Q5_0 and Q5_1 dot products with scalar
/// code only (about 10x slower than its AVX2 Q8_0 kernel on x86). Q8_0 holds
/// every value of those 4/5-bit grids to within 1/254 of the block's largest
/// magnitude, so the products barely move while the speed is that of Q8_0.
fn cpu_matmul_dtype(dtype: GgmlDType, device: &Device) -> Option<GgmlDType> {
    match (device, dtype) {
        (Device::Cpu, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1) => Some(GgmlDType::Q8_0),
        _ => None,
    }
}

/// `[len, ctx]` additive mask: query `i` (at position `ctx - len + i`) sees
/// keys `0..=ctx - len + i`.
fn causal_mask(len: usize, ctx: usize, device: &Device) -> Result<Tensor> {
    let start = ctx - len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (len, ctx), device)?)
}

/// Index of the largest value of a logit row.
pub fn argmax(row: &Tensor) -> Result<u32> {
    Ok(row.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
