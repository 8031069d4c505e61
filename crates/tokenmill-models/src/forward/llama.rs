//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged
//! KV cache.
//!
//! Touvron et al., "LLaMA: Open and Efficient Foundation Language Models"
//! (2023): pre-norm decoder layers with RMSNorm, rotary position embeddings,
//! grouped-query attention and a SiLU-gated MLP.
//!
//! One forward takes a flat batch of tokens from many sequences (prefill
//! chunks and single decode tokens mixed): the projections and the MLP run
//! over all tokens at once; attention reads each sequence's keys and values
//! through its block table, in place. The layer code is written once
//! (`Llama::kernel_layers`) over the `StepKernels` seam; which kernels
//! run it is chosen when the model is built (`StepPath`): our CPU ops on
//! the CPU, our CUDA kernels on a GPU. How a weight is stored and multiplied
//! is a property of its `Linear`, not of the architecture.
//!
//! On the CPU every step of the forward computes a token's row from that
//! token's own inputs in a fixed order, so a sequence's logits are bit for
//! bit the same alone, batched with others, or prefilled in chunks.

use super::batch::{ForwardBatch, LogitRows};
use super::kv_cache::PagedKvCache;
use super::linear::{Linear, Norm};
use super::step_kernels::StepKernels;
use super::{ForwardOptions, ForwardPath};
use crate::cpu::kernels::CpuKernels;
use crate::error::{ModelError, Result};
use crate::load::config::LlamaConfig;
use candle_core::{DType, Device, Tensor, D};
use tokenmill_kernels::reference::attention::AttentionShape;
use tokenmill_kernels::reference::rotary::RotaryStyle;

pub(crate) struct Attention {
    /// q, k and v stacked.
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
}

pub(crate) struct Mlp {
    /// gate and up stacked.
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
}

pub(crate) struct DecoderLayer {
    pub(crate) attn_norm: Norm,
    pub(crate) attn: Attention,
    pub(crate) mlp_norm: Norm,
    pub(crate) mlp: Mlp,
}

/// Rotary embedding tables, one row per position: `[positions, head_dim /
/// 2]`, f32.
pub(crate) struct Rotary {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) style: RotaryStyle,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32);
                match &cfg.rope_scaling {
                    Some(scaling) => scaling.scale(f64::from(freq)) as f32,
                    None => freq,
                }
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Rotary {
            cos: angles.cos()?,
            sin: angles.sin()?,
            style: if cfg.rope_neox {
                RotaryStyle::Neox
            } else {
                RotaryStyle::Interleaved
            },
        })
    }
}

/// The kernels a model's forward runs on, chosen once when it is built
/// (from its device and [`ForwardOptions`]).
enum StepPath {
    /// Our CPU ops ([`CpuKernels`]).
    Cpu(CpuKernels),
    /// Our CUDA kernels, decode steps replayed as CUDA graphs when asked.
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaPath>),
    /// candle's ops ([`super::candle_ops`]): the second opinion.
    CandleOps,
}

/// Our CUDA kernels and the decode graphs that replay them.
#[cfg(feature = "cuda")]
struct CudaPath {
    kernels: crate::cuda::ops::GpuKernels,
    graphs: Option<crate::cuda::graphs::DecodeGraphs>,
}

impl StepPath {
    /// The kernels of `device` for `options`. A device we have no kernels
    /// for runs candle's ops.
    fn new(device: &Device, options: ForwardOptions) -> Result<Self> {
        if options.path == ForwardPath::CandleOps {
            return Ok(StepPath::CandleOps);
        }
        if device.is_cpu() {
            return Ok(StepPath::Cpu(CpuKernels));
        }
        #[cfg(feature = "cuda")]
        if let Some(kernels) = crate::cuda::ops::GpuKernels::new(device)? {
            return Ok(StepPath::Cuda(Box::new(CudaPath {
                kernels,
                graphs: options
                    .cuda_graphs
                    .then(crate::cuda::graphs::DecodeGraphs::new),
            })));
        }
        Ok(StepPath::CandleOps)
    }
}

/// A Llama-family model with its weights loaded.
pub struct Llama {
    pub(crate) cfg: LlamaConfig,
    pub(crate) embeddings: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) final_norm: Norm,
    pub(crate) lm_head: Linear,
    pub(crate) rotary: Rotary,
    device: Device,
    options: ForwardOptions,
    path: StepPath,
}

impl Llama {
    /// The model from its loaded parts, whatever the weights' source, with
    /// the default [`ForwardOptions`].
    pub(crate) fn assemble(
        cfg: LlamaConfig,
        embeddings: Tensor,
        layers: Vec<DecoderLayer>,
        final_norm: Norm,
        lm_head: Linear,
        device: &Device,
    ) -> Result<Self> {
        let options = ForwardOptions::default();
        Ok(Llama {
            rotary: Rotary::new(&cfg, device)?,
            cfg,
            embeddings,
            layers,
            final_norm,
            lm_head,
            device: device.clone(),
            options,
            path: StepPath::new(device, options)?,
        })
    }

    /// Chooses how the forward runs (see [`ForwardOptions`]); call it before
    /// the first step. On a GPU, asking for our kernels loads them now.
    pub fn set_forward_options(&mut self, options: ForwardOptions) -> Result<()> {
        self.path = StepPath::new(&self.device, options)?;
        self.options = options;
        Ok(())
    }

    /// How the forward runs.
    pub fn forward_options(&self) -> ForwardOptions {
        self.options
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
        match &self.path {
            StepPath::Cpu(kernels) => self.forward_with(kernels, batch, cache),
            #[cfg(feature = "cuda")]
            StepPath::Cuda(cuda) => {
                self.forward_cuda(&cuda.kernels, cuda.graphs.as_ref(), batch, cache)
            }
            StepPath::CandleOps => super::candle_ops::forward(self, batch, cache),
        }
    }

    /// The forward of a validated `batch` through `kernels`.
    pub(crate) fn forward_with<K: StepKernels>(
        &self,
        kernels: &K,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let meta = kernels.step_meta(batch, cache, &self.attention_shape())?;
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let normed = self.kernel_layers(kernels, &tokens, &meta, cache)?;
        let rows = self.logit_rows(&normed, batch)?;
        self.lm_head.forward(&rows)
    }

    /// The forward on a CUDA device: decode steps replay CUDA graphs
    /// ([`crate::cuda::graphs`]) when they can; every other step runs
    /// eagerly through our kernels.
    #[cfg(feature = "cuda")]
    fn forward_cuda(
        &self,
        gpu: &crate::cuda::ops::GpuKernels,
        graphs: Option<&crate::cuda::graphs::DecodeGraphs>,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        // A decode step asks for every row: the graph's logits are those.
        let all_rows = batch.logit_rows() == batch.tokens.len();
        if let (Some(graphs), true) = (graphs, all_rows) {
            let meta = batch.paged_meta(cache.block_size(), cache.num_blocks())?;
            if meta.is_decode_only() {
                let step = crate::cuda::graphs::DecodeStep {
                    tokens: &batch.tokens,
                    meta: &meta,
                    shape: &self.attention_shape(),
                    context_length: self.cfg.context_length,
                };
                let body = |tokens: &Tensor, meta: &tokenmill_kernels::cuda::launch::DeviceMeta| {
                    self.decode_body(gpu, tokens, meta, cache)
                };
                if let Some(logits) = graphs.run(gpu, &step, &body)? {
                    return Ok(logits);
                }
            }
        }
        self.forward_with(gpu, batch, cache)
    }

    /// A decode step's logits for every token, everything on the stream
    /// (no host copies): what a decode graph captures.
    #[cfg(feature = "cuda")]
    fn decode_body(
        &self,
        gpu: &crate::cuda::ops::GpuKernels,
        tokens: &Tensor,
        meta: &tokenmill_kernels::cuda::launch::DeviceMeta,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let normed = self.kernel_layers(gpu, tokens, meta, cache)?;
        self.lm_head.forward(&normed)
    }

    /// Heads and widths for the attention kernels (q read from the fused
    /// qkv rows).
    pub(crate) fn attention_shape(&self) -> AttentionShape {
        let cfg = &self.cfg;
        AttentionShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            q_row_stride: (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
        }
    }

    /// Embeddings through the final norm for the step's `tokens` (a u32
    /// tensor on the device): `[tokens, hidden]`. The one layer code of
    /// every device: RMSNorm fused with each residual add, the rotary
    /// embedding in place on the fused qkv rows, keys and values written
    /// straight into their cache slots, paged attention reading the cache
    /// through the block tables, and SiLU-and-multiply on the fused
    /// gate|up rows; the products are the [`Linear`] layers'.
    pub(crate) fn kernel_layers<K: StepKernels>(
        &self,
        kernels: &K,
        tokens: &Tensor,
        meta: &K::Meta,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let shape = self.attention_shape();
        let (q_width, kv_width) = (cfg.num_heads * cfg.head_dim, cfg.kv_width());
        let mut residual = self.embeddings.index_select(tokens, 0)?;
        // The last sublayer's output, added to the residual by the next norm.
        let mut pending: Option<Tensor> = None;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = match pending.take() {
                None => {
                    kernels.rms_norm(&residual, &layer.attn_norm.weight, layer.attn_norm.eps)?
                }
                Some(x) => {
                    let (sum, normed) = kernels.fused_add_rms_norm(
                        &x,
                        &residual,
                        &layer.attn_norm.weight,
                        layer.attn_norm.eps,
                    )?;
                    residual = sum;
                    normed
                }
            };
            let qkv = layer.attn.qkv.forward(&normed)?.contiguous()?;
            kernels.rotary_in_place(
                &qkv,
                cfg.num_heads + cfg.num_kv_heads,
                cfg.head_dim,
                meta,
                (&self.rotary.cos, &self.rotary.sin),
                self.rotary.style,
            )?;
            let (k_cache, v_cache) = cache.layer(index);
            kernels.write_cache(k_cache, &qkv, q_width, kv_width, meta)?;
            kernels.write_cache(v_cache, &qkv, q_width + kv_width, kv_width, meta)?;
            let attn = kernels.paged_attention(meta, &shape, &qkv, k_cache, v_cache)?;
            let attn = layer.attn.o.forward(&attn)?;
            let (sum, normed) = kernels.fused_add_rms_norm(
                &attn,
                &residual,
                &layer.mlp_norm.weight,
                layer.mlp_norm.eps,
            )?;
            residual = sum;
            let gate_up = layer.mlp.gate_up.forward(&normed)?.contiguous()?;
            pending = Some(layer.mlp.down.forward(&kernels.silu_and_mul(&gate_up)?)?);
        }
        let norm = &self.final_norm;
        Ok(match pending {
            Some(x) => {
                kernels
                    .fused_add_rms_norm(&x, &residual, &norm.weight, norm.eps)?
                    .1
            }
            None => kernels.rms_norm(&residual, &norm.weight, norm.eps)?,
        })
    }

    /// Samples a token from each row of `logits` (`[rows, vocab]`, as
    /// [`Llama::forward`] returns them) with its row of `params`, where the
    /// logits lie: with our CUDA kernels through the sampling kernel, so
    /// only the tokens and their logprobs cross to the host; elsewhere
    /// through the kernel's CPU reference, which draws the same tokens.
    pub fn sample(
        &self,
        logits: &Tensor,
        params: &[crate::SamplingParamsRow],
    ) -> Result<Vec<crate::SampledRow>> {
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        #[cfg(feature = "cuda")]
        if let StepPath::Cuda(cuda) = &self.path {
            return tokenmill_kernels::cuda::sampling::sample_tensor(
                cuda.kernels.kernels(),
                &logits,
                params,
            )
            .map_err(|e| ModelError::Unsupported(format!("sampling on the GPU: {e}")));
        }
        let vocab = logits.dim(D::Minus1)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        tokenmill_kernels::reference::sampling::sample_rows(&flat, vocab, params)
            .map_err(|e| ModelError::InvalidBatch(format!("sampling: {e}")))
    }

    /// The tokens [`Llama::sample`] would draw, without their logprobs (for
    /// a batch where nobody asked for them): on the CPU this skips the
    /// normaliser's pass over the vocabulary; on a GPU the kernel runs
    /// whole and only the tokens are read.
    pub fn sample_tokens(
        &self,
        logits: &Tensor,
        params: &[crate::SamplingParamsRow],
    ) -> Result<Vec<u32>> {
        #[cfg(feature = "cuda")]
        if let StepPath::Cuda(_) = &self.path {
            return Ok(self
                .sample(logits, params)?
                .into_iter()
                .map(|row| row.token)
                .collect());
        }
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let vocab = logits.dim(D::Minus1)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        tokenmill_kernels::reference::sampling::sample_tokens(&flat, vocab, params)
            .map_err(|e| ModelError::InvalidBatch(format!("sampling: {e}")))
    }

    /// The hidden states whose logits were asked for.
    pub(crate) fn logit_rows(&self, hidden: &Tensor, batch: &ForwardBatch) -> Result<Tensor> {
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
}

/// Index of the largest value of a logit row.
pub fn argmax(row: &Tensor) -> Result<u32> {
    Ok(row.argmax(D::Minus1)?.to_scalar::<u32>()?)
}
