//! The emulator as a backend of the kernel check suite
//! ([`tokenmill_kernels::check`]): each call launches the kernel on the
//! launch geometry and argument list that `tokenmill_kernels::cuda::launch`
//! gives it on a GPU, through [`crate::launch`].

use crate::{launch, Buffer, EmuError};
use tokenmill_kernels::check::{Backend, KernelBackend, RotaryArgs};
use tokenmill_kernels::geometry::{self, Launch};
use tokenmill_kernels::paged::PagedMeta;
use tokenmill_kernels::reference::attention::AttentionShape;
use tokenmill_kernels::reference::rotary::RotaryStyle;
use tokenmill_kernels::reference::sampling::{
    self, SampleOutputs, SamplingParamsRow, MAX_TOP_LOGPROBS,
};
use tokenmill_kernels::testing::AttentionCase;
use tokenmill_kernels::{Element, KernelError, Result};

/// The emulator, planning its decode splits for a GPU of `multiprocessors`
/// SMs (132 on an H100 SXM).
pub struct Emulator {
    /// The SM count the decode kernels' flash-decoding split is planned
    /// for (what [`Backend::multiprocessors`] reports): the emulator has no
    /// SMs of its own, so this picks which split of the GPU's it runs.
    pub multiprocessors: usize,
}

impl Default for Emulator {
    fn default() -> Self {
        Emulator {
            multiprocessors: 132,
        }
    }
}

fn run(kernel: &str, at: Launch, args: &[&dyn crate::KernelArg]) -> Result<()> {
    launch(kernel, at, args).map_err(|e: EmuError| KernelError::Backend {
        backend: "kernel emulator",
        source: Box::new(e),
    })
}

fn int(value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| KernelError::Unsupported(format!("{value} as a kernel int")))
}

fn zeros<T: Element>(n: usize) -> Buffer<T> {
    Buffer::from_slice(&vec![T::from_f32(0.0); n])
}

impl<T: Element> KernelBackend<T> for Emulator {
    fn rms_norm(&self, x: &[T], weight: &[T], eps: f32) -> Result<Vec<T>> {
        let width = weight.len();
        let (bx, bw, out) = (
            Buffer::from_slice(x),
            Buffer::from_slice(weight),
            zeros::<T>(x.len()),
        );
        let at = geometry::per_row(x.len() / width, width)?;
        let kernel = format!("tm_rms_norm_{}", T::NAME);
        run(
            &kernel,
            at,
            &[&bx.ptr(), &bw.ptr(), &out.ptr(), &int(width)?, &eps],
        )?;
        Ok(out.read())
    }

    fn fused_add_rms_norm(
        &self,
        x: &[T],
        residual: &[T],
        weight: &[T],
        eps: f32,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let width = weight.len();
        let (bx, br, bw) = (
            Buffer::from_slice(x),
            Buffer::from_slice(residual),
            Buffer::from_slice(weight),
        );
        let (new_residual, out) = (zeros::<T>(x.len()), zeros::<T>(x.len()));
        let at = geometry::per_row(x.len() / width, width)?;
        let kernel = format!("tm_fused_add_rms_norm_{}", T::NAME);
        run(
            &kernel,
            at,
            &[
                &bx.ptr(),
                &br.ptr(),
                &bw.ptr(),
                &new_residual.ptr(),
                &out.ptr(),
                &int(width)?,
                &eps,
            ],
        )?;
        Ok((new_residual.read(), out.read()))
    }

    fn silu_and_mul(&self, gate_up: &[T], width: usize) -> Result<Vec<T>> {
        let elements = gate_up.len() / 2;
        let (input, out) = (Buffer::from_slice(gate_up), zeros::<T>(elements));
        let at = geometry::elementwise(elements)?;
        let kernel = format!("tm_silu_and_mul_{}", T::NAME);
        run(
            &kernel,
            at,
            &[&input.ptr(), &out.ptr(), &int(width)?, &(elements as i64)],
        )?;
        Ok(out.read())
    }

    fn rotary(&self, rows: &[T], a: &RotaryArgs<'_>) -> Result<Vec<T>> {
        let tokens = a.positions.len();
        let (brows, positions, cos, sin) = (
            Buffer::from_slice(rows),
            Buffer::from_slice(a.positions),
            Buffer::from_slice(a.cos),
            Buffer::from_slice(a.sin),
        );
        let at = geometry::elementwise(tokens * a.num_heads * a.head_dim / 2)?;
        let neox = i32::from(a.style == RotaryStyle::Neox);
        let kernel = format!("tm_rotary_{}", T::NAME);
        run(
            &kernel,
            at,
            &[
                &brows.ptr(),
                &int(a.row_stride)?,
                &int(a.num_heads)?,
                &int(a.head_dim)?,
                &positions.ptr(),
                &cos.ptr(),
                &sin.ptr(),
                &int(tokens)?,
                &neox,
            ],
        )?;
        Ok(brows.read())
    }

    fn write_cache(
        &self,
        meta: &PagedMeta,
        shape: &AttentionShape,
        src: &[T],
        src_stride: usize,
        cache: &[T],
    ) -> Result<Vec<T>> {
        let width = shape.kv_width();
        let (bsrc, bcache, slots) = (
            Buffer::from_slice(src),
            Buffer::from_slice(cache),
            Buffer::from_slice(&meta.slot_mapping),
        );
        let at = geometry::per_row(meta.num_tokens(), width)?;
        let kernel = format!("tm_write_cache_{}", T::NAME);
        run(
            &kernel,
            at,
            &[
                &bsrc.ptr(),
                &int(src_stride)?,
                &bcache.ptr(),
                &slots.ptr(),
                &int(width)?,
            ],
        )?;
        Ok(bcache.read())
    }

    fn paged_attention(
        &self,
        case: &AttentionCase<T>,
        multiprocessors: usize,
        context_capacity: Option<usize>,
    ) -> Result<Vec<T>> {
        let (m, shape) = (&case.meta, &case.shape);
        let tokens = m.num_tokens();
        let width = shape.num_heads * shape.head_dim;
        let (q, k, v, tables, positions) = (
            Buffer::from_slice(&case.q),
            Buffer::from_slice(&case.k_cache),
            Buffer::from_slice(&case.v_cache),
            Buffer::from_slice(&m.block_tables),
            Buffer::from_slice(&m.positions),
        );
        let out = zeros::<T>(tokens * width);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let (q_stride, max_blocks, block_size) = (
            int(shape.q_row_stride)?,
            int(m.max_blocks)?,
            int(m.block_size)?,
        );
        let (heads, kv_heads, head_dim) = (
            int(shape.num_heads)?,
            int(shape.num_kv_heads)?,
            int(shape.head_dim)?,
        );
        if !m.is_decode_only() {
            let plan = geometry::prefill_plan(m, shape.num_heads, shape.head_dim)?;
            let (tile_seq, tile_first, tile_len) = (
                Buffer::from_slice(&plan.tile_seq),
                Buffer::from_slice(&plan.tile_first),
                Buffer::from_slice(&plan.tile_len),
            );
            let kv_tile = int(plan.kv_tile)?;
            run(
                &format!("tm_paged_prefill_{}", T::NAME),
                plan.launch,
                &[
                    &q.ptr(),
                    &q_stride,
                    &k.ptr(),
                    &v.ptr(),
                    &tables.ptr(),
                    &max_blocks,
                    &block_size,
                    &positions.ptr(),
                    &tile_seq.ptr(),
                    &tile_first.ptr(),
                    &tile_len.ptr(),
                    &heads,
                    &kv_heads,
                    &head_dim,
                    &kv_tile,
                    &scale,
                    &out.ptr(),
                ],
            )?;
            return Ok(out.read());
        }
        let plan = geometry::decode_plan(
            shape.num_heads,
            tokens,
            context_capacity.unwrap_or(m.max_context).max(m.max_context),
            shape.head_dim,
            multiprocessors,
        )?;
        let partials = tokens * shape.num_heads * plan.num_partitions;
        let token_seq = Buffer::from_slice(&m.token_seq);
        let partial_out = zeros::<f32>(partials * shape.head_dim);
        let (partial_max, partial_sum) = (zeros::<f32>(partials), zeros::<f32>(partials));
        let (partition_size, num_partitions) =
            (int(plan.partition_size)?, int(plan.num_partitions)?);
        run(
            &format!("tm_paged_decode_{}", T::NAME),
            plan.attention,
            &[
                &q.ptr(),
                &q_stride,
                &k.ptr(),
                &v.ptr(),
                &tables.ptr(),
                &max_blocks,
                &block_size,
                &token_seq.ptr(),
                &positions.ptr(),
                &heads,
                &kv_heads,
                &head_dim,
                &partition_size,
                &num_partitions,
                &scale,
                &out.ptr(),
                &partial_out.ptr(),
                &partial_max.ptr(),
                &partial_sum.ptr(),
            ],
        )?;
        if plan.num_partitions > 1 {
            run(
                &format!("tm_paged_decode_merge_{}", T::NAME),
                plan.merge,
                &[
                    &partial_out.ptr(),
                    &partial_max.ptr(),
                    &partial_sum.ptr(),
                    &out.ptr(),
                    &heads,
                    &head_dim,
                    &num_partitions,
                ],
            )?;
        }
        Ok(out.read())
    }

    fn copy_blocks(&self, cache: &[T], pairs: &[(u32, u32)], block_elems: usize) -> Result<Vec<T>> {
        let flat: Vec<u32> = pairs.iter().flat_map(|(s, d)| [*s, *d]).collect();
        let (bcache, bpairs) = (Buffer::from_slice(cache), Buffer::from_slice(&flat));
        let at = Launch {
            grid: (pairs.len() as u32, 1, 1),
            block: geometry::ELEMENTWISE_THREADS,
            shared_bytes: 0,
        };
        run(
            &format!("tm_copy_blocks_{}", T::NAME),
            at,
            &[&bcache.ptr(), &bpairs.ptr(), &(block_elems as i64)],
        )?;
        Ok(bcache.read())
    }
}

impl Backend for Emulator {
    fn multiprocessors(&self) -> Result<usize> {
        Ok(self.multiprocessors)
    }

    fn sample(
        &self,
        logits: &[f32],
        vocab: usize,
        params: &[SamplingParamsRow],
    ) -> Result<SampleOutputs> {
        sampling::validate(logits.len(), vocab, params)?;
        let g = sampling::sampling_geometry(params.len(), vocab)?;
        let rows = params.len();
        let words: Vec<u32> = params.iter().flat_map(SamplingParamsRow::encode).collect();
        let (blogits, bparams) = (Buffer::from_slice(logits), Buffer::from_slice(&words));
        let (tokens, token_logprobs) = (Buffer::from_slice(&vec![0u32; rows]), zeros::<f32>(rows));
        let top_ids = Buffer::from_slice(&vec![0u32; rows * MAX_TOP_LOGPROBS]);
        let top_logprobs = zeros::<f32>(rows * MAX_TOP_LOGPROBS);
        let at = Launch {
            grid: (g.grid, 1, 1),
            block: g.threads,
            shared_bytes: g.shared_bytes,
        };
        run(
            "tm_sample_f32",
            at,
            &[
                &blogits.ptr(),
                &g.grid,
                &(vocab as u32),
                &bparams.ptr(),
                &tokens.ptr(),
                &token_logprobs.ptr(),
                &top_ids.ptr(),
                &top_logprobs.ptr(),
            ],
        )?;
        Ok(SampleOutputs {
            tokens: tokens.read(),
            token_logprobs: token_logprobs.read(),
            top_ids: top_ids.read(),
            top_logprobs: top_logprobs.read(),
        })
    }
}
