//! The steps of the forward's layer code ([`crate::Llama`]'s
//! `kernel_layers`) behind one trait, whose implementation is chosen once
//! per model, by its device: our CPU ops on the CPU
//! ([`crate::cpu::kernels::CpuKernels`]), our CUDA kernels on a GPU
//! (`crate::cuda::ops::GpuKernels`). In the tests the kernels' CPU
//! references ([`reference::ReferenceKernels`]) stand in for the CUDA
//! kernels, so CI runs the GPU's layer code as the GPU runs it (the fused
//! qkv offsets, rotary in place, cache writes through the slot mapping,
//! paged attention with the GPU's decode split, the residual carried into
//! the next norm, a CUDA graph's padded decode step) on the CPU.

use crate::error::Result;
use crate::forward::batch::ForwardBatch;
use crate::forward::kv_cache::PagedKvCache;
use candle_core::Tensor;
use tokenmill_kernels::reference::attention::AttentionShape;
use tokenmill_kernels::reference::rotary::RotaryStyle;

/// What one layer of the kernel forward asks of its kernels.
pub(crate) trait StepKernels {
    /// The step's metadata (block tables, positions, slots) where the
    /// kernels read it.
    type Meta;

    /// The metadata of a validated `batch` over `cache`, where the kernels
    /// read it.
    fn step_meta(
        &self,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
        shape: &AttentionShape,
    ) -> Result<Self::Meta>;

    /// `rms_norm(x) * weight` over the last dimension.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor>;

    /// The new residual `residual + x` and its RMSNorm.
    fn fused_add_rms_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)>;

    /// `silu(gate) * up` for rows `[gate | up]`: `[rows, width]`.
    fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor>;

    /// Rotates the first `num_heads` heads of each row of `qkv` in place by
    /// the tables `(cos, sin)` (`[positions, head_dim / 2]`, f32).
    fn rotary_in_place(
        &self,
        qkv: &Tensor,
        num_heads: usize,
        head_dim: usize,
        meta: &Self::Meta,
        tables: (&Tensor, &Tensor),
        style: RotaryStyle,
    ) -> Result<()>;

    /// Writes columns `offset..offset + width` of each row of `src` into the
    /// token's slot of `cache` (`[slots, width]`).
    fn write_cache(
        &self,
        cache: &Tensor,
        src: &Tensor,
        offset: usize,
        width: usize,
        meta: &Self::Meta,
    ) -> Result<()>;

    /// Attention of every token of the step over its cached context, the
    /// queries read from the start of each `qkv` row: `[tokens, heads * head_dim]`.
    fn paged_attention(
        &self,
        meta: &Self::Meta,
        shape: &AttentionShape,
        qkv: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor>;
}

#[cfg(test)]
pub(crate) mod reference {
    //! The kernels' CPU references as [`StepKernels`], on f32 CPU tensors.

    use super::StepKernels;
    use crate::cpu::kernels::InPlace;
    use crate::error::{ModelError, Result};
    use crate::forward::batch::ForwardBatch;
    use crate::forward::kv_cache::PagedKvCache;
    use candle_core::{Device, Tensor};
    use tokenmill_kernels::geometry;
    use tokenmill_kernels::paged::PagedMeta;
    use tokenmill_kernels::reference::attention::{self, AttentionShape};
    use tokenmill_kernels::reference::{activation, cache, norm, rotary::RotaryStyle};

    /// The references, planning decode splits for a GPU of 132 SMs.
    pub(crate) struct ReferenceKernels;

    /// A step's metadata, and the context its decode split is planned for
    /// (as a CUDA graph plans it for its context class).
    pub(crate) struct ReferenceMeta {
        pub meta: PagedMeta,
        pub context_capacity: Option<usize>,
    }

    const MULTIPROCESSORS: usize = 132;

    fn floats(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    fn rows(data: Vec<f32>, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(data, like.shape(), &Device::Cpu)?)
    }

    impl StepKernels for ReferenceKernels {
        type Meta = ReferenceMeta;

        fn step_meta(
            &self,
            batch: &ForwardBatch,
            cache: &PagedKvCache,
            _: &AttentionShape,
        ) -> Result<ReferenceMeta> {
            Ok(ReferenceMeta {
                meta: batch.paged_meta(cache.block_size(), cache.num_blocks())?,
                context_capacity: None,
            })
        }

        fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
            rows(norm::rms_norm(&floats(x)?, &floats(weight)?, eps), x)
        }

        fn fused_add_rms_norm(
            &self,
            x: &Tensor,
            residual: &Tensor,
            weight: &Tensor,
            eps: f32,
        ) -> Result<(Tensor, Tensor)> {
            let (sum, out) =
                norm::fused_add_rms_norm(&floats(x)?, &floats(residual)?, &floats(weight)?, eps);
            Ok((rows(sum, x)?, rows(out, x)?))
        }

        fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
            let (n, double) = gate_up.dims2()?;
            let out = activation::silu_and_mul(&floats(gate_up)?, double / 2);
            Ok(Tensor::from_vec(out, (n, double / 2), &Device::Cpu)?)
        }

        fn rotary_in_place(
            &self,
            qkv: &Tensor,
            num_heads: usize,
            head_dim: usize,
            meta: &ReferenceMeta,
            (cos, sin): (&Tensor, &Tensor),
            style: RotaryStyle,
        ) -> Result<()> {
            let (cos, sin) = (floats(cos)?, floats(sin)?);
            let stride = qkv.dim(1)?;
            let positions = &meta.meta.positions;
            qkv.inplace_op1(&InPlace(|data: &mut [f32]| {
                tokenmill_kernels::reference::rotary::rotate(
                    data, stride, num_heads, head_dim, positions, &cos, &sin, style,
                );
                Ok(())
            }))?;
            Ok(())
        }

        fn write_cache(
            &self,
            cache_rows: &Tensor,
            src: &Tensor,
            offset: usize,
            width: usize,
            meta: &ReferenceMeta,
        ) -> Result<()> {
            let stride = src.dim(1)?;
            let src = floats(src)?;
            let slots = &meta.meta.slot_mapping;
            cache_rows.inplace_op1(&InPlace(|data: &mut [f32]| {
                cache::write_cache(slots, width, &src[offset..], stride, data);
                Ok(())
            }))?;
            Ok(())
        }

        fn paged_attention(
            &self,
            meta: &ReferenceMeta,
            shape: &AttentionShape,
            qkv: &Tensor,
            k_cache: &Tensor,
            v_cache: &Tensor,
        ) -> Result<Tensor> {
            let m = &meta.meta;
            let (q, k, v) = (floats(qkv)?, floats(k_cache)?, floats(v_cache)?);
            let invalid =
                |e: tokenmill_kernels::KernelError| ModelError::InvalidBatch(e.to_string());
            let out = if m.is_decode_only() {
                let context = meta
                    .context_capacity
                    .unwrap_or(m.max_context)
                    .max(m.max_context);
                let plan = geometry::decode_plan(
                    shape.num_heads,
                    m.num_tokens(),
                    context,
                    shape.head_dim,
                    MULTIPROCESSORS,
                )
                .map_err(invalid)?;
                attention::paged_decode(m, shape, &plan, &q, &k, &v)
            } else {
                let plan =
                    geometry::prefill_plan(m, shape.num_heads, shape.head_dim).map_err(invalid)?;
                attention::paged_prefill(m, shape, &plan, &q, &k, &v)
            };
            let width = shape.num_heads * shape.head_dim;
            Ok(Tensor::from_vec(
                out,
                (m.num_tokens(), width),
                &Device::Cpu,
            )?)
        }
    }
}
