//! The forward's kernels on the CPU: [`StepKernels`] over this module's
//! fast ops ([`super::ops`] for the element-wise glue, [`super::attention`]
//! for the rotary embedding and paged attention, one in-place copy per
//! cache write), each on the calling thread or on [`super::pool`], reading
//! tensors where candle keeps them.

use super::attention::{self, AttentionShape as CpuShape};
use super::ops;
use crate::error::{ModelError, Result};
use crate::forward::batch::{ForwardBatch, SequenceChunk};
use crate::forward::kv_cache::{slot_of, PagedKvCache};
use crate::forward::step_kernels::StepKernels;
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Storage, Tensor};
use tokenmill_kernels::reference::attention::AttentionShape;
use tokenmill_kernels::reference::rotary::RotaryStyle;

/// Our CPU ops as the forward's kernels, on f32 CPU tensors.
pub(crate) struct CpuKernels;

/// A step's metadata on the CPU: each sequence's chunk (its block table
/// and context), and each token's position and cache slot.
pub(crate) struct CpuMeta {
    chunks: Vec<SequenceChunk>,
    positions: Vec<u32>,
    slots: Vec<usize>,
    block_size: usize,
}

impl StepKernels for CpuKernels {
    type Meta = CpuMeta;

    fn step_meta(
        &self,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
        _: &AttentionShape,
    ) -> Result<CpuMeta> {
        let block_size = cache.block_size();
        let slots = batch
            .chunks
            .iter()
            .flat_map(|c| {
                (c.start_position()..c.context_len).map(|p| slot_of(&c.block_table, block_size, p))
            })
            .collect();
        Ok(CpuMeta {
            chunks: batch.chunks.clone(),
            positions: batch.positions(),
            slots,
            block_size,
        })
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(x.contiguous()?
            .apply_op2_no_bwd(weight, &ops::RmsNorm { eps })?)
    }

    fn fused_add_rms_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let sum = residual
            .contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &ops::Add)?;
        let normed = sum.apply_op2_no_bwd(weight, &ops::RmsNorm { eps })?;
        Ok((sum, normed))
    }

    fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        Ok(gate_up.contiguous()?.apply_op1_no_bwd(&ops::SiluMul)?)
    }

    fn rotary_in_place(
        &self,
        qkv: &Tensor,
        num_heads: usize,
        head_dim: usize,
        meta: &CpuMeta,
        (cos, sin): (&Tensor, &Tensor),
        style: RotaryStyle,
    ) -> Result<()> {
        let row_stride = qkv.dim(1)?;
        with_cpu_f32(cos, |cos| {
            with_cpu_f32(sin, |sin| {
                qkv.inplace_op1(&InPlace(|rows: &mut [f32]| {
                    attention::rotate(
                        rows,
                        row_stride,
                        num_heads,
                        head_dim,
                        &meta.positions,
                        cos,
                        sin,
                        style == RotaryStyle::Neox,
                    );
                    Ok(())
                }))
            })
        })???;
        Ok(())
    }

    fn write_cache(
        &self,
        cache: &Tensor,
        src: &Tensor,
        offset: usize,
        width: usize,
        meta: &CpuMeta,
    ) -> Result<()> {
        let stride = src.dim(1)?;
        let slots = &meta.slots;
        with_cpu_f32(src, |src| {
            cache.inplace_op1(&InPlace(|cache: &mut [f32]| {
                write_rows(cache, width, slots, src, stride, offset)
            }))
        })??;
        Ok(())
    }

    fn paged_attention(
        &self,
        meta: &CpuMeta,
        shape: &AttentionShape,
        qkv: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor> {
        let cpu_shape = CpuShape {
            num_heads: shape.num_heads,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            block_size: meta.block_size,
        };
        let out = with_cpu_f32(qkv, |q| {
            with_cpu_f32(k_cache, |keys| {
                with_cpu_f32(v_cache, |values| {
                    attention::paged_attention_strided(
                        cpu_shape,
                        &meta.chunks,
                        q,
                        shape.q_row_stride,
                        keys,
                        values,
                    )
                })
            })
        })???;
        let tokens = meta.positions.len();
        Ok(Tensor::from_vec(
            out,
            (tokens, shape.num_heads * shape.head_dim),
            &Device::Cpu,
        )?)
    }
}

/// Copies columns `offset..offset + width` of each row of `src` (rows of
/// `stride`) to row `slots[i]` of `cache` (rows of `width`).
fn write_rows(
    cache: &mut [f32],
    width: usize,
    slots: &[usize],
    src: &[f32],
    stride: usize,
    offset: usize,
) -> Result<()> {
    if width == 0 || offset + width > stride || src.len() != slots.len() * stride {
        return Err(ModelError::InvalidBatch(format!(
            "columns {offset}+{width} of {} values in rows of {stride} for {} slots",
            src.len(),
            slots.len()
        )));
    }
    for (row, slot) in src.chunks_exact(stride).zip(slots) {
        match cache.get_mut(slot * width..(slot + 1) * width) {
            Some(dst) => dst.copy_from_slice(&row[offset..offset + width]),
            None => {
                return Err(ModelError::InvalidBatch(format!(
                    "slot {slot} outside the KV cache"
                )))
            }
        }
    }
    Ok(())
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor, in place (the
/// kernels' references in tests use it too).
pub(crate) struct InPlace<F: Fn(&mut [f32]) -> Result<()>>(pub(crate) F);

impl<F: Fn(&mut [f32]) -> Result<()>> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "cpu-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("in-place CPU ops run on f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("a strided tensor");
        };
        (self.0)(&mut data[start..end]).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Calls `f` with the elements of a contiguous `f32` tensor in CPU memory.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => Err(ModelError::Unsupported(
            "a CPU kernel given a tensor outside CPU memory, or strided".into(),
        )),
    }
}
