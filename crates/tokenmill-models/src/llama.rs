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
//! through its block table (on the CPU in place, for the whole batch in one
//! pass: [`cpu_attention`]; elsewhere gathered per sequence). How a weight is
//! stored and multiplied is a property of its `Linear` (our int8 kernel,
//! [`crate::cpu_gemm`], on the CPU; candle's [`QMatMul`] elsewhere), not of
//! the architecture.
//!
//! On the CPU every step of the forward computes a token's row from that
//! token's own inputs in a fixed order, so a sequence's logits are bit for
//! bit the same alone, batched with others, or prefilled in chunks.

use crate::batch::{ForwardBatch, LogitRows, SequenceChunk};
use crate::config::LlamaConfig;
use crate::cpu_attention::{self, AttentionShape};
use crate::cpu_gemm::Q8Matrix;
use crate::cpu_ops;
use crate::error::{ModelError, Result};
use crate::kv_cache::PagedKvCache;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::io::{Read, Seek};

/// The weight of a linear layer, or of several layers that read the same
/// input stacked along the output (q, k and v; gate and up).
enum Weight {
    /// Our int8 kernel, on the CPU: stacked layers run as one product, so
    /// their input is quantized once and the threads wake once.
    Cpu(Q8Matrix),
    /// candle's quantized matmul on any other device, one per layer.
    Quantized(Vec<QMatMul>),
    /// Unquantized weights (`[n, k]`, the stacked layers' rows one after
    /// another) in their storage type: f32 on the CPU; bf16 or f16 as loaded
    /// on a GPU, where the input is cast to that type for the product so that
    /// each step reads the weights at their own width.
    Dense(Tensor),
}

/// One linear layer, or several stacked ([`Weight`]), with optional biases
/// (Qwen2 has q/k/v biases).
struct Linear {
    weight: Weight,
    /// The output width of each stacked layer.
    widths: Vec<usize>,
    /// The stacked biases (zeros for a layer without one), if any layer has one.
    bias: Option<Tensor>,
}

impl Linear {
    /// Stacks `weights` (`[n_i, k]` each) and their biases along the output.
    ///
    /// On the CPU they become one [`Q8Matrix`]: Q4_1 weights exactly (as
    /// llama.cpp multiplies them), any other type dequantized and requantized
    /// to 8 bits per block of 32 (exact for Q8_0; within 1/254 of a block's
    /// largest magnitude for the 4/5-bit grids).
    fn new(weights: Vec<QTensor>, biases: Vec<Option<Tensor>>, device: &Device) -> Result<Self> {
        let dims = weights
            .iter()
            .map(|w| w.shape().dims2())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (k, widths) = stacked_widths(&dims)?;
        let bias = stacked_bias(biases, &widths, device)?;
        let weight = if device.is_cpu() {
            let n = widths.iter().sum();
            if weights.iter().all(|w| w.dtype() == GgmlDType::Q4_1) {
                // Rows of stacked matrices follow one another: so do their blocks.
                let mut data = Vec::new();
                for w in &weights {
                    data.extend_from_slice(&w.data()?);
                }
                Weight::Cpu(Q8Matrix::from_q4_1(&data, n, k)?)
            } else {
                let dense = weights
                    .iter()
                    .map(|w| w.dequantize(device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let dense = Tensor::cat(&dense, 0)?.flatten_all()?.to_vec1::<f32>()?;
                Weight::Cpu(Q8Matrix::quantize(&dense, n, k)?)
            }
        } else {
            Weight::Quantized(
                weights
                    .into_iter()
                    .map(QMatMul::from_qtensor)
                    .collect::<candle_core::Result<_>>()?,
            )
        };
        Ok(Linear {
            weight,
            widths,
            bias,
        })
    }

    /// Stacks dense `weights` (`[n_i, k]` each, any float type) and their
    /// biases along the output. On the CPU the weights become f32 (the
    /// reference path: exact products of the stored values); elsewhere they
    /// keep their type.
    fn dense(weights: Vec<Tensor>, biases: Vec<Option<Tensor>>, device: &Device) -> Result<Self> {
        let dims = weights
            .iter()
            .map(|w| w.dims2())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (_, widths) = stacked_widths(&dims)?;
        let bias = stacked_bias(biases, &widths, device)?;
        let mut weight = Tensor::cat(&weights, 0)?;
        if device.is_cpu() {
            weight = weight.to_dtype(DType::F32)?;
        }
        Ok(Linear {
            weight: Weight::Dense(weight.to_device(device)?.contiguous()?),
            widths,
            bias,
        })
    }

    /// The outputs of the stacked layers side by side: `[.., sum of widths]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Cpu(w) => x.contiguous()?.apply_op1_no_bwd(w)?,
            Weight::Dense(w) => x
                .to_dtype(w.dtype())?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?,
            Weight::Quantized(ws) => {
                let parts = ws
                    .iter()
                    .map(|w| w.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, D::Minus1)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The output of each stacked layer, in order.
    fn forward_parts(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let y = self.forward(x)?;
        let mut offset = 0;
        let mut parts = Vec::with_capacity(self.widths.len());
        for width in &self.widths {
            parts.push(y.narrow(D::Minus1, offset, *width)?);
            offset += width;
        }
        Ok(parts)
    }
}

/// The common input width of stacked layers (`[n_i, k]` each) and their
/// output widths; layers of different input widths cannot be stacked.
fn stacked_widths(dims: &[(usize, usize)]) -> Result<(usize, Vec<usize>)> {
    let k = dims.first().map_or(0, |d| d.1);
    if dims.iter().any(|d| d.1 != k) {
        return Err(ModelError::Metadata(format!(
            "stacked layers of different input widths: {dims:?}"
        )));
    }
    Ok((k, dims.iter().map(|d| d.0).collect()))
}

/// The biases of stacked layers, side by side, as f32 (zeros for a layer
/// without one); `None` when no layer has one.
fn stacked_bias(
    biases: Vec<Option<Tensor>>,
    widths: &[usize],
    device: &Device,
) -> Result<Option<Tensor>> {
    if biases.iter().all(Option::is_none) {
        return Ok(None);
    }
    let parts = biases
        .into_iter()
        .zip(widths)
        .map(|(b, width)| match b {
            Some(b) => b.to_dtype(DType::F32)?.to_device(device),
            None => Tensor::zeros(*width, DType::F32, device),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(Tensor::cat(&parts, 0)?))
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if x.device().is_cpu() {
            let op = cpu_ops::RmsNorm { eps: self.eps };
            x.contiguous()?.apply_op2_no_bwd(&self.weight, &op)?
        } else {
            candle_nn::ops::rms_norm(x, &self.weight, self.eps)?
        })
    }
}

/// `a + b`, on the CPU without candle's thread pools (see [`cpu_ops`]).
fn residual(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(if a.device().is_cpu() {
        a.contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &cpu_ops::Add)?
    } else {
        (a + b)?
    })
}

struct Attention {
    /// q, k and v stacked.
    qkv: Linear,
    o: Linear,
}

struct Mlp {
    /// gate and up stacked.
    gate_up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = if x.device().is_cpu() {
            self.gate_up
                .forward(x)?
                .apply_op1_no_bwd(&cpu_ops::SiluMul)?
        } else {
            let [gate, up]: [Tensor; 2] = self
                .gate_up
                .forward_parts(x)?
                .try_into()
                .map_err(|_| ModelError::Unsupported("MLP without gate and up".into()))?;
            (candle_nn::ops::silu(&gate)? * up)?
        };
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
    lm_head: Linear,
    rotary: Rotary,
    device: Device,
    /// Our kernels, on a CUDA device (unless `TOKENMILL_GPU_KERNELS=0`
    /// asks for candle's ops instead, to compare the two).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda_ops::GpuKernels>,
    /// Decode steps as CUDA graphs (with our kernels, unless
    /// `TOKENMILL_CUDA_GRAPHS=0`).
    #[cfg(feature = "cuda")]
    graphs: Option<crate::cuda_graphs::DecodeGraphs>,
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

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.dense(name)?,
            eps: eps as f32,
        })
    }
}

/// Dense weights by their Hugging Face names (`model.layers.0.mlp.up_proj.weight`),
/// from safetensors files ([`crate::hf`]) or drawn at random
/// ([`crate::random_weights`]).
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

    fn norm(&mut self, name: &str, width: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
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
    /// [`Weight::Dense`] for the products. `on_layer` is called after each
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

    /// The model from its loaded parts, whatever the weights' source.
    fn assemble(
        cfg: LlamaConfig,
        embeddings: Tensor,
        layers: Vec<DecoderLayer>,
        final_norm: RmsNorm,
        lm_head: Linear,
        device: &Device,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let gpu = if std::env::var("TOKENMILL_GPU_KERNELS").is_ok_and(|v| v == "0") {
            None
        } else {
            crate::cuda_ops::GpuKernels::new(device)?
        };
        #[cfg(feature = "cuda")]
        let graphs = (gpu.is_some()
            && !std::env::var("TOKENMILL_CUDA_GRAPHS").is_ok_and(|v| v == "0"))
        .then(crate::cuda_graphs::DecodeGraphs::new);
        Ok(Llama {
            rotary: Rotary::new(&cfg, device)?,
            cfg,
            embeddings,
            layers,
            final_norm,
            lm_head,
            device: device.clone(),
            #[cfg(feature = "cuda")]
            gpu,
            #[cfg(feature = "cuda")]
            graphs,
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
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return self.forward_kernels(gpu, batch, cache);
        }
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let positions = batch.positions();
        // The CPU rotates in place by position; other devices gather tables.
        let rotary = if self.device.is_cpu() {
            None
        } else {
            Some(
                self.rotary
                    .at(&Tensor::new(positions.as_slice(), &self.device)?)?,
            )
        };
        let mut hidden = self.embeddings.index_select(&tokens, 0)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = layer.attn_norm.forward(&hidden)?;
            let attn = match &rotary {
                Some(rotary) => {
                    self.attention(index, &layer.attn, &normed, rotary, batch, cache)?
                }
                None => {
                    self.cpu_attention(index, &layer.attn, &normed, &positions, batch, cache)?
                }
            };
            hidden = residual(&hidden, &attn)?;
            let normed = layer.mlp_norm.forward(&hidden)?;
            hidden = residual(&hidden, &layer.mlp.forward(&normed)?)?;
        }
        let rows = self.logit_rows(&hidden, batch)?;
        let normed = self.final_norm.forward(&rows)?;
        self.lm_head.forward(&normed)
    }

    /// The forward on a CUDA device through our kernels: RMSNorm fused with
    /// each residual add, the rotary embedding in place on the fused qkv
    /// rows, keys and values written straight into their cache slots, paged
    /// attention reading the cache through the block tables, and
    /// SiLU-and-multiply on the fused gate|up rows; the matmuls are
    /// candle's (cuBLAS, or its quantized kernels for GGUF weights). Decode
    /// steps replay CUDA graphs ([`crate::cuda_graphs`]) when they can.
    #[cfg(feature = "cuda")]
    fn forward_kernels(
        &self,
        gpu: &crate::cuda_ops::GpuKernels,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let shape = self.attention_shape();
        let meta = batch.paged_meta(cache.block_size(), cache.num_blocks())?;
        // A decode step asks for every row: the graph's logits are those.
        let all_rows = batch.logit_rows() == batch.tokens.len();
        if let (Some(graphs), true, true) = (&self.graphs, meta.is_decode_only(), all_rows) {
            if let Some(logits) = graphs.run(self, gpu, &batch.tokens, &meta, &shape, cache)? {
                return Ok(logits);
            }
        }
        let meta = gpu.upload_meta(meta, &shape)?;
        let tokens = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let normed = self.kernel_layers(gpu, &tokens, &meta, cache)?;
        let rows = self.logit_rows(&normed, batch)?;
        self.lm_head.forward(&rows)
    }

    /// Heads and widths for the attention kernels (q read from the fused
    /// qkv rows).
    #[cfg(any(test, feature = "cuda"))]
    fn attention_shape(&self) -> tokenmill_kernels::reference::attention::AttentionShape {
        let cfg = &self.cfg;
        tokenmill_kernels::reference::attention::AttentionShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            q_row_stride: (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
        }
    }

    /// A decode step's logits for every token, everything on the stream
    /// (no host copies): what a decode graph captures.
    #[cfg(feature = "cuda")]
    pub(crate) fn decode_body(
        &self,
        gpu: &crate::cuda_ops::GpuKernels,
        tokens: &Tensor,
        meta: &tokenmill_kernels::cuda::launch::DeviceMeta,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let normed = self.kernel_layers(gpu, tokens, meta, cache)?;
        self.lm_head.forward(&normed)
    }

    /// Embeddings through the final norm for the step's `tokens` (a u32
    /// tensor on the device): `[tokens, hidden]`. The GPU runs it with our
    /// CUDA kernels; the tests with their CPU references
    /// ([`crate::step_kernels`]).
    #[cfg(any(test, feature = "cuda"))]
    fn kernel_layers<K: crate::step_kernels::StepKernels>(
        &self,
        gpu: &K,
        tokens: &Tensor,
        meta: &K::Meta,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        use tokenmill_kernels::reference::rotary::RotaryStyle;

        let cfg = &self.cfg;
        let shape = self.attention_shape();
        let (q_width, kv_width) = (cfg.num_heads * cfg.head_dim, cfg.kv_width());
        let style = if self.rotary.neox {
            RotaryStyle::Neox
        } else {
            RotaryStyle::Interleaved
        };
        let mut residual = self.embeddings.index_select(tokens, 0)?;
        // The last sublayer's output, added to the residual by the next norm.
        let mut pending: Option<Tensor> = None;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = match pending.take() {
                None => gpu.rms_norm(&residual, &layer.attn_norm.weight, layer.attn_norm.eps)?,
                Some(x) => {
                    let (sum, normed) = gpu.fused_add_rms_norm(
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
            gpu.rotary_in_place(
                &qkv,
                cfg.num_heads + cfg.num_kv_heads,
                cfg.head_dim,
                meta,
                (&self.rotary.cos, &self.rotary.sin),
                style,
            )?;
            let (k_cache, v_cache) = cache.layer(index);
            gpu.write_cache(k_cache, &qkv, q_width, kv_width, meta)?;
            gpu.write_cache(v_cache, &qkv, q_width + kv_width, kv_width, meta)?;
            let attn = gpu.paged_attention(meta, &shape, &qkv, k_cache, v_cache)?;
            let attn = layer.attn.o.forward(&attn)?;
            let (sum, normed) = gpu.fused_add_rms_norm(
                &attn,
                &residual,
                &layer.mlp_norm.weight,
                layer.mlp_norm.eps,
            )?;
            residual = sum;
            let gate_up = layer.mlp.gate_up.forward(&normed)?.contiguous()?;
            pending = Some(layer.mlp.down.forward(&gpu.silu_and_mul(&gate_up)?)?);
        }
        Ok(match pending {
            Some(x) => {
                gpu.fused_add_rms_norm(&x, &residual, &self.final_norm.weight, self.final_norm.eps)?
                    .1
            }
            None => gpu.rms_norm(&residual, &self.final_norm.weight, self.final_norm.eps)?,
        })
    }

    /// Samples a token from each row of `logits` (`[rows, vocab]`, as
    /// [`Llama::forward`] returns them) with its row of `params`, where the
    /// logits lie: on a CUDA device through the sampling kernel, so only
    /// the tokens and their logprobs cross to the host; elsewhere through
    /// the kernel's CPU reference, which draws the same tokens.
    pub fn sample(
        &self,
        logits: &Tensor,
        params: &[crate::SamplingParamsRow],
    ) -> Result<Vec<crate::SampledRow>> {
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return tokenmill_kernels::cuda::sampling::sample_tensor(
                gpu.kernels(),
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

    /// Self-attention of one layer over the whole batch on the CPU: `x` is
    /// `[tokens, hidden]`; the result has the same shape. One pass for all
    /// sequences: q, k and v in one product, rotated in place, the batch's
    /// keys and values written with one copy per layer, and
    /// [`cpu_attention::paged_attention`] reading the cache where it lies.
    fn cpu_attention(
        &self,
        layer: usize,
        attn: &Attention,
        x: &Tensor,
        positions: &[u32],
        batch: &ForwardBatch,
        cache: &PagedKvCache,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = x.dim(0)?;
        let (q_width, kv_width) = (cfg.num_heads * cfg.head_dim, cfg.kv_width());
        let qkv = attn.qkv.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(n * q_width),
            Vec::with_capacity(n * kv_width),
            Vec::with_capacity(n * kv_width),
        );
        for row in qkv.chunks_exact(q_width + 2 * kv_width) {
            q.extend_from_slice(&row[..q_width]);
            k.extend_from_slice(&row[q_width..q_width + kv_width]);
            v.extend_from_slice(&row[q_width + kv_width..]);
        }
        let neox = self.rotary.neox;
        with_cpu_f32(&self.rotary.cos, |cos| {
            with_cpu_f32(&self.rotary.sin, |sin| {
                for rows in [&mut q, &mut k] {
                    cpu_attention::rotate(rows, cfg.head_dim, positions, cos, sin, neox);
                }
            })
        })??;
        cache.write_batch_cpu(layer, &batch.chunks, &k, &v)?;
        let shape = AttentionShape {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_size: cache.block_size(),
        };
        let out = cache.read_cpu(layer, |keys, values| {
            cpu_attention::paged_attention(shape, &batch.chunks, &q, keys, values)
        })?;
        attn.o
            .forward(&Tensor::from_vec(out, (n, q_width), &self.device)?)
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
            outputs.push(self.sequence_attention(layer, chunk, &q_chunk, cache)?);
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

/// Calls `f` with the elements of a contiguous `f32` tensor in CPU memory.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            Ok(f(&cpu.as_slice::<f32>()?[start..end]))
        }
        _ => Err(ModelError::Unsupported(
            "a CPU kernel given a tensor outside CPU memory".into(),
        )),
    }
}

/// Index of the largest value of a logit row.
pub fn argmax(row: &Tensor) -> Result<u32> {
    Ok(row.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod kernel_forward_tests;
