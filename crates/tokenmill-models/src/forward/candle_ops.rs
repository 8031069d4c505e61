//! The forward through candle's ops alone: the second opinion on our
//! kernels. It shares only the weights and their [`Linear`] products with
//! [`Llama::kernel_layers`]; norms, the rotary embedding, cache writes and
//! attention (each sequence's context gathered, masked, softmaxed) are
//! candle's, so a bug in our kernels shows as a gap between the two (the
//! tests here; `scripts/gpu_check.py` on a GPU). It runs when a model is
//! built with [`ForwardPath::CandleOps`](super::ForwardPath::CandleOps), on
//! any device candle supports.

use super::batch::{ForwardBatch, SequenceChunk};
use super::kv_cache::PagedKvCache;
use super::linear::{Linear, Norm};
use super::llama::{Attention, Llama, Mlp, Rotary};
use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use tokenmill_kernels::reference::rotary::RotaryStyle;

/// [`Llama::forward`] through candle's ops, on a validated batch.
pub(crate) fn forward(model: &Llama, batch: &ForwardBatch, cache: &PagedKvCache) -> Result<Tensor> {
    let device = model.device();
    let tokens = Tensor::new(batch.tokens.as_slice(), device)?;
    let positions = Tensor::new(batch.positions().as_slice(), device)?;
    let rotary = RotaryAt::new(&model.rotary, &positions)?;
    let mut hidden = model.embeddings.index_select(&tokens, 0)?;
    for (index, layer) in model.layers.iter().enumerate() {
        let normed = norm(&layer.attn_norm, &hidden)?;
        let attn = attention(model, index, &layer.attn, &normed, &rotary, batch, cache)?;
        hidden = (hidden + attn)?;
        let normed = norm(&layer.mlp_norm, &hidden)?;
        hidden = (&hidden + mlp(&layer.mlp, &normed)?)?;
    }
    let rows = model.logit_rows(&hidden, batch)?;
    let normed = norm(&model.final_norm, &rows)?;
    model.lm_head.forward(&normed)
}

fn norm(norm: &Norm, x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, &norm.weight, norm.eps)?)
}

fn mlp(mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
    let [gate, up] = parts::<2>(&mlp.gate_up, x, "MLP without gate and up")?;
    mlp.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
}

/// The outputs of `N` stacked layers.
fn parts<const N: usize>(linear: &Linear, x: &Tensor, what: &str) -> Result<[Tensor; N]> {
    linear
        .forward_parts(x)?
        .try_into()
        .map_err(|_| ModelError::Unsupported(what.into()))
}

/// Rotary tables for the tokens of one batch, in batch order.
struct RotaryAt {
    cos: Tensor,
    sin: Tensor,
    neox: bool,
}

impl RotaryAt {
    /// The tables of the batch's `positions`, gathered once per forward.
    fn new(rotary: &Rotary, positions: &Tensor) -> Result<Self> {
        Ok(RotaryAt {
            cos: rotary.cos.index_select(positions, 0)?,
            sin: rotary.sin.index_select(positions, 0)?,
            neox: rotary.style == RotaryStyle::Neox,
        })
    }

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

/// Self-attention of one layer over the whole batch: `x` is
/// `[tokens, hidden]`; the result has the same shape.
fn attention(
    model: &Llama,
    layer: usize,
    attn: &Attention,
    x: &Tensor,
    rotary: &RotaryAt,
    batch: &ForwardBatch,
    cache: &PagedKvCache,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let n = x.dim(0)?;
    let [q, k, v]: [Tensor; 3] = attn
        .qkv
        .forward_parts(x)?
        .try_into()
        .map_err(|_| ModelError::Unsupported("attention without q, k and v".into()))?;
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
        outputs.push(sequence_attention(model, layer, chunk, &q_chunk, cache)?);
        offset += len;
    }
    let out = Tensor::cat(&outputs, 0)?;
    attn.o.forward(&out)
}

/// Causal attention of one sequence's new queries (`[heads, len,
/// head_dim]`) over its whole context; returns `[len, heads * head_dim]`.
/// Decode tokens and prefill chunks take this same path on purpose: a
/// sequence recomputed after preemption, or continued from cached blocks,
/// then gets the keys, values and tokens it would have had.
fn sequence_attention(
    model: &Llama,
    layer: usize,
    chunk: &SequenceChunk,
    q: &Tensor,
    cache: &PagedKvCache,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let len = chunk.num_tokens;
    let ctx = chunk.context_len;
    let group = cfg.group_size();
    let (keys, values) = cache.gather(layer, chunk, model.device())?;
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
        let mask = causal_mask(len, ctx, model.device())?;
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
