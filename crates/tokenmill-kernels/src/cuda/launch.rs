//! Typed launchers of the kernels: each checks its sizes, takes its launch
//! from [`crate::geometry`] and queues the kernel on candle's stream.
//!
//! Buffers are cudarc views, so callers can pass part of a larger buffer
//! (q, k and v are read in place from the fused qkv rows).

use super::Kernels;
use crate::element::Element;
use crate::geometry::{self, Launch};
use crate::paged::PagedMeta;
use crate::reference::attention::AttentionShape;
use crate::reference::rotary::RotaryStyle;
use crate::{KernelError, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

/// An element type the kernels are instantiated for, on the device.
pub trait DeviceElement: Element + DeviceRepr {}
impl<T: Element + DeviceRepr> DeviceElement for T {}

fn config(launch: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: launch.grid,
        block_dim: (launch.block, 1, 1),
        shared_mem_bytes: launch.shared_bytes,
    }
}

fn cuda<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e}"))
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(KernelError::Invalid(format!(
            "{what}: {have} elements where {want} are needed"
        )));
    }
    Ok(())
}

fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| KernelError::Unsupported(format!("{what} of {value}")))
}

/// `out = rms_norm(x) * weight` over rows of `weight.len()`.
pub fn rms_norm<T: DeviceElement>(
    kernels: &Kernels,
    x: &CudaView<T>,
    weight: &CudaView<T>,
    out: &mut CudaViewMut<T>,
    eps: f32,
) -> Result<()> {
    let width = weight.len();
    let rows = x.len() / width.max(1);
    need("rms_norm output", out.len(), rows * width)?;
    let func = kernels.function("norm", &format!("tm_rms_norm_{}", T::NAME))?;
    let launch = geometry::per_row(rows, width)?;
    let width = int(width, "width")?;
    let stream = kernels.stream();
    let mut args = stream.launch_builder(&func);
    args.arg(x).arg(weight).arg(out).arg(&width).arg(&eps);
    // SAFETY: the kernel reads `rows * width` elements of `x`, `width` of
    // `weight` and writes `rows * width` of `out`, all checked above; the
    // argument list matches tm_rms_norm's signature in kernels/norm.cu.
    unsafe { args.launch(config(launch)) }.map_err(cuda("tm_rms_norm"))?;
    Ok(())
}

/// `residual_out = residual + x; out = rms_norm(residual_out) * weight`.
pub fn fused_add_rms_norm<T: DeviceElement>(
    kernels: &Kernels,
    x: &CudaView<T>,
    residual: &CudaView<T>,
    weight: &CudaView<T>,
    residual_out: &mut CudaViewMut<T>,
    out: &mut CudaViewMut<T>,
    eps: f32,
) -> Result<()> {
    let width = weight.len();
    let rows = x.len() / width.max(1);
    need("fused_add_rms_norm residual", residual.len(), rows * width)?;
    need(
        "fused_add_rms_norm new residual",
        residual_out.len(),
        rows * width,
    )?;
    need("fused_add_rms_norm output", out.len(), rows * width)?;
    let func = kernels.function("norm", &format!("tm_fused_add_rms_norm_{}", T::NAME))?;
    let launch = geometry::per_row(rows, width)?;
    let width = int(width, "width")?;
    let stream = kernels.stream();
    let mut args = stream.launch_builder(&func);
    args.arg(x)
        .arg(residual)
        .arg(weight)
        .arg(residual_out)
        .arg(out)
        .arg(&width)
        .arg(&eps);
    // SAFETY: sizes checked above; arguments as in kernels/norm.cu.
    unsafe { args.launch(config(launch)) }.map_err(cuda("tm_fused_add_rms_norm"))?;
    Ok(())
}

/// `out = silu(gate) * up` for rows `[gate | up]` of `2 * width`.
pub fn silu_and_mul<T: DeviceElement>(
    kernels: &Kernels,
    gate_up: &CudaView<T>,
    out: &mut CudaViewMut<T>,
    width: usize,
) -> Result<()> {
    let rows = gate_up.len() / (2 * width).max(1);
    let elements = rows * width;
    need("silu_and_mul output", out.len(), elements)?;
    let func = kernels.function("activation", &format!("tm_silu_and_mul_{}", T::NAME))?;
    let launch = geometry::elementwise(elements)?;
    let (width, elements) = (int(width, "width")?, elements as i64);
    let stream = kernels.stream();
    let mut args = stream.launch_builder(&func);
    args.arg(gate_up).arg(out).arg(&width).arg(&elements);
    // SAFETY: sizes checked above; arguments as in kernels/activation.cu.
    unsafe { args.launch(config(launch)) }.map_err(cuda("tm_silu_and_mul"))?;
    Ok(())
}

/// Rotates the first `num_heads` heads of each of `positions.len()` rows
/// (`row_stride` apart) in place; `cos`/`sin` are `[positions, head_dim/2]`.
#[allow(clippy::too_many_arguments)]
pub fn rotary<T: DeviceElement>(
    kernels: &Kernels,
    rows: &mut CudaViewMut<T>,
    row_stride: usize,
    num_heads: usize,
    head_dim: usize,
    positions: &CudaView<u32>,
    cos: &CudaView<f32>,
    sin: &CudaView<f32>,
    style: RotaryStyle,
) -> Result<()> {
    let tokens = positions.len();
    if tokens == 0 {
        return Ok(());
    }
    need(
        "rotary rows",
        rows.len(),
        (tokens - 1) * row_stride + num_heads * head_dim,
    )?;
    need("rotary sin", sin.len(), cos.len())?;
    let func = kernels.function("rotary", &format!("tm_rotary_{}", T::NAME))?;
    let launch = geometry::elementwise(tokens * num_heads * head_dim / 2)?;
    let neox = i32::from(style == RotaryStyle::Neox);
    let (stride, heads, dim, tokens) = (
        int(row_stride, "row stride")?,
        int(num_heads, "heads")?,
        int(head_dim, "head width")?,
        int(tokens, "tokens")?,
    );
    let stream = kernels.stream();
    let mut args = stream.launch_builder(&func);
    args.arg(rows)
        .arg(&stride)
        .arg(&heads)
        .arg(&dim)
        .arg(positions)
        .arg(cos)
        .arg(sin)
        .arg(&tokens)
        .arg(&neox);
    // SAFETY: the rows are checked above; positions index the tables, whose
    // length the caller sizes to the model's context (positions are checked
    // against it when the batch is validated). Arguments as in rotary.cu.
    unsafe { args.launch(config(launch)) }.map_err(cuda("tm_rotary"))?;
    Ok(())
}

/// A step's [`PagedMeta`] on the device, with the prefill tiles when the
/// step is not decode-only.
pub struct DeviceMeta {
    /// The step's metadata on the host: the launchers read its counts and
    /// shapes (tokens, sequences, block size, longest context) from here,
    /// and the device buffers below hold copies of its vectors.
    pub meta: PagedMeta,
    block_tables: CudaSlice<u32>,
    token_seq: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slot_mapping: CudaSlice<u32>,
    prefill: Option<DevicePrefill>,
    /// Plan the decode split for contexts up to this long rather than for
    /// this step's longest (a CUDA graph keeps its launches across steps).
    context_capacity: Option<usize>,
}

struct DevicePrefill {
    plan: geometry::PrefillPlan,
    tile_seq: CudaSlice<u32>,
    tile_first: CudaSlice<u32>,
    tile_len: CudaSlice<u32>,
}

impl DeviceMeta {
    /// Uploads `meta` (and plans the prefill tiles for `shape` if needed).
    pub fn upload(kernels: &Kernels, meta: PagedMeta, shape: &AttentionShape) -> Result<Self> {
        let stream = kernels.stream();
        let up = |v: &[u32]| -> Result<CudaSlice<u32>> {
            // A zero-length allocation is refused by the driver.
            let v = if v.is_empty() { &[0u32][..] } else { v };
            stream
                .clone_htod(v)
                .map_err(cuda("uploading step metadata"))
        };
        let prefill = if meta.is_decode_only() {
            None
        } else {
            let plan = geometry::prefill_plan(&meta, shape.num_heads, shape.head_dim)?;
            Some(DevicePrefill {
                tile_seq: up(&plan.tile_seq)?,
                tile_first: up(&plan.tile_first)?,
                tile_len: up(&plan.tile_len)?,
                plan,
            })
        };
        Ok(DeviceMeta {
            block_tables: up(&meta.block_tables)?,
            token_seq: up(&meta.token_seq)?,
            positions: up(&meta.positions)?,
            slot_mapping: up(&meta.slot_mapping)?,
            prefill,
            meta,
            context_capacity: None,
        })
    }

    /// Plans the decode kernels for contexts up to `capacity` tokens
    /// (partitions past a context return at once).
    pub fn with_context_capacity(mut self, capacity: usize) -> Self {
        self.context_capacity = Some(capacity);
        self
    }

    /// Replaces the metadata of a decode step in place, in the same device
    /// buffers (which a captured CUDA graph reads): the new step must have
    /// as many tokens, sequences and table columns, and fit the context
    /// capacity.
    pub fn update(&mut self, kernels: &Kernels, meta: PagedMeta) -> Result<()> {
        let same = meta.is_decode_only()
            && self.prefill.is_none()
            && meta.num_tokens() == self.meta.num_tokens()
            && meta.num_seqs() == self.meta.num_seqs()
            && meta.max_blocks == self.meta.max_blocks
            && meta.block_size == self.meta.block_size
            && self.context_capacity.is_none_or(|c| meta.max_context <= c);
        if !same {
            return Err(KernelError::Invalid(
                "a step of another shape than the buffers it would replace".into(),
            ));
        }
        let stream = kernels.stream();
        let copy = cuda("updating step metadata");
        stream
            .memcpy_htod(&meta.block_tables, &mut self.block_tables)
            .map_err(&copy)?;
        stream
            .memcpy_htod(&meta.token_seq, &mut self.token_seq)
            .map_err(&copy)?;
        stream
            .memcpy_htod(&meta.positions, &mut self.positions)
            .map_err(&copy)?;
        stream
            .memcpy_htod(&meta.slot_mapping, &mut self.slot_mapping)
            .map_err(&copy)?;
        self.meta = meta;
        Ok(())
    }

    /// The tokens' positions on the device (for the rotary kernel).
    pub fn positions(&self) -> CudaView<'_, u32> {
        self.positions.slice(..)
    }
}

/// Writes each token's row of `src` (rows `src_stride` apart, `width`
/// wide) into its slot of `cache` (`[slots, width]`): keys and values take
/// one call each.
pub fn write_cache<T: DeviceElement>(
    kernels: &Kernels,
    meta: &DeviceMeta,
    src: &CudaView<T>,
    src_stride: usize,
    cache: &mut CudaViewMut<T>,
    width: usize,
) -> Result<()> {
    let tokens = meta.meta.num_tokens();
    if tokens == 0 {
        return Ok(());
    }
    need(
        "write_cache source",
        src.len(),
        (tokens - 1) * src_stride + width,
    )?;
    let slots = cache.len() / width.max(1);
    if let Some(bad) = meta
        .meta
        .slot_mapping
        .iter()
        .find(|s| **s as usize >= slots)
    {
        return Err(KernelError::Invalid(format!(
            "slot {bad} outside a cache of {slots}"
        )));
    }
    let func = kernels.function("cache", &format!("tm_write_cache_{}", T::NAME))?;
    let launch = geometry::per_row(tokens, width)?;
    let (stride, width) = (int(src_stride, "row stride")?, int(width, "cache width")?);
    let stream = kernels.stream();
    let mut args = stream.launch_builder(&func);
    args.arg(src)
        .arg(&stride)
        .arg(cache)
        .arg(&meta.slot_mapping)
        .arg(&width);
    // SAFETY: every slot is inside the cache and every source row inside
    // `src` (checked above). Arguments as in kernels/cache.cu.
    unsafe { args.launch(config(launch)) }.map_err(cuda("tm_write_cache"))?;
    Ok(())
}

/// Copies whole blocks (`(src, dst)` pairs, uploaded as `[2 * pairs]`) in a
/// cache of blocks of `block_elems` elements.
pub fn copy_blocks<T: DeviceElement>(
    kernels: &Kernels,
    cache: &mut CudaViewMut<T>,
    pairs: &[(u32, u32)],
    block_elems: usize,
) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let blocks = cache.len() / block_elems.max(1);
    if let Some(bad) = pairs
        .iter()
        .find(|(s, d)| *s as usize >= blocks || *d as usize >= blocks || s == d)
    {
        return Err(KernelError::Invalid(format!(
            "block copy {bad:?} in a cache of {blocks}"
        )));
    }
    let flat: Vec<u32> = pairs.iter().flat_map(|(s, d)| [*s, *d]).collect();
    let stream = kernels.stream();
    let flat = stream
        .clone_htod(&flat)
        .map_err(cuda("uploading block pairs"))?;
    let func = kernels.function("cache", &format!("tm_copy_blocks_{}", T::NAME))?;
    let launch = Launch {
        grid: (pairs.len() as u32, 1, 1),
        block: geometry::ELEMENTWISE_THREADS,
        shared_bytes: 0,
    };
    let elems = block_elems as i64;
    let mut args = stream.launch_builder(&func);
    args.arg(cache).arg(&flat).arg(&elems);
    // SAFETY: every block is inside the cache (checked above). Arguments as
    // in kernels/cache.cu.
    unsafe { args.launch(config(launch)) }.map_err(cuda("tm_copy_blocks"))?;
    Ok(())
}

/// Causal attention of every token of the step over its sequence's cached
/// context (which must already hold the step's own keys and values):
/// the decode kernels for a decode-only step, the prefill kernel otherwise.
/// `out` is `[tokens, num_heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: DeviceElement>(
    kernels: &Kernels,
    meta: &DeviceMeta,
    shape: &AttentionShape,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
    out: &mut CudaViewMut<T>,
    multiprocessors: usize,
) -> Result<()> {
    let m = &meta.meta;
    let tokens = m.num_tokens();
    let width = shape.num_heads * shape.head_dim;
    geometry::check_head_dim(shape.head_dim)?;
    if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
        return Err(KernelError::Invalid(format!(
            "{} query heads over {} kv heads",
            shape.num_heads, shape.num_kv_heads
        )));
    }
    need(
        "attention queries",
        q.len(),
        (tokens - 1) * shape.q_row_stride + width,
    )?;
    need("attention output", out.len(), tokens * width)?;
    let slots = k_cache.len().min(v_cache.len()) / shape.kv_width();
    if m.max_blocks * m.block_size > 0
        && m.block_tables
            .iter()
            .any(|b| (*b as usize + 1) * m.block_size > slots)
    {
        return Err(KernelError::Invalid(
            "a block table points outside the cache".into(),
        ));
    }
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let ints = [
        int(shape.q_row_stride, "q row stride")?,
        int(m.max_blocks, "blocks per sequence")?,
        int(m.block_size, "block size")?,
        int(shape.num_heads, "heads")?,
        int(shape.num_kv_heads, "kv heads")?,
        int(shape.head_dim, "head width")?,
    ];
    let [q_stride, max_blocks, block_size, heads, kv_heads, head_dim] = ints;
    let stream = kernels.stream();
    match &meta.prefill {
        Some(prefill) => {
            let func = kernels.function("attention", &format!("tm_paged_prefill_{}", T::NAME))?;
            let launch = prefill.plan.launch;
            if launch.shared_bytes > geometry::DEFAULT_SHARED_BYTES {
                func.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    launch.shared_bytes as i32,
                )
                .map_err(cuda("opting in to shared memory"))?;
            }
            let kv_tile = prefill.plan.kv_tile as i32;
            let mut args = stream.launch_builder(&func);
            args.arg(q)
                .arg(&q_stride)
                .arg(k_cache)
                .arg(v_cache)
                .arg(&meta.block_tables)
                .arg(&max_blocks)
                .arg(&block_size)
                .arg(&meta.positions)
                .arg(&prefill.tile_seq)
                .arg(&prefill.tile_first)
                .arg(&prefill.tile_len)
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&head_dim)
                .arg(&kv_tile)
                .arg(&scale)
                .arg(out);
            // SAFETY: queries and output sized above; every block id of
            // every table is inside the cache, and positions are bounded by
            // the tables (PagedMeta::new). Arguments as in attention.cu.
            unsafe { args.launch(config(launch)) }.map_err(cuda("tm_paged_prefill"))?;
        }
        None => {
            let plan = geometry::decode_plan(
                shape.num_heads,
                tokens,
                meta.context_capacity
                    .unwrap_or(m.max_context)
                    .max(m.max_context),
                shape.head_dim,
                multiprocessors,
            )?;
            let partials = if plan.num_partitions > 1 {
                tokens * shape.num_heads * plan.num_partitions
            } else {
                1
            };
            // SAFETY (of the uninitialised allocations): every element the
            // merge reads is written by the decode kernel first.
            let mut partial_out = unsafe { stream.alloc::<f32>(partials * shape.head_dim) }
                .map_err(cuda("allocating partitions"))?;
            let mut partial_max =
                unsafe { stream.alloc::<f32>(partials) }.map_err(cuda("allocating partitions"))?;
            let mut partial_sum =
                unsafe { stream.alloc::<f32>(partials) }.map_err(cuda("allocating partitions"))?;
            let func = kernels.function("attention", &format!("tm_paged_decode_{}", T::NAME))?;
            let (partition_size, num_partitions) = (
                int(plan.partition_size, "partition")?,
                int(plan.num_partitions, "partitions")?,
            );
            let mut args = stream.launch_builder(&func);
            args.arg(q)
                .arg(&q_stride)
                .arg(k_cache)
                .arg(v_cache)
                .arg(&meta.block_tables)
                .arg(&max_blocks)
                .arg(&block_size)
                .arg(&meta.token_seq)
                .arg(&meta.positions)
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&head_dim)
                .arg(&partition_size)
                .arg(&num_partitions)
                .arg(&scale)
                .arg(&mut *out)
                .arg(&mut partial_out)
                .arg(&mut partial_max)
                .arg(&mut partial_sum);
            // SAFETY: as for the prefill kernel; the partial buffers hold
            // tokens x heads x partitions entries when there are several.
            unsafe { args.launch(config(plan.attention)) }.map_err(cuda("tm_paged_decode"))?;
            if plan.num_partitions > 1 {
                let func =
                    kernels.function("attention", &format!("tm_paged_decode_merge_{}", T::NAME))?;
                let mut args = stream.launch_builder(&func);
                args.arg(&partial_out)
                    .arg(&partial_max)
                    .arg(&partial_sum)
                    .arg(out)
                    .arg(&heads)
                    .arg(&head_dim)
                    .arg(&num_partitions);
                // SAFETY: reads the partials written just before on the
                // same stream. Arguments as in attention.cu.
                unsafe { args.launch(config(plan.merge)) }
                    .map_err(cuda("tm_paged_decode_merge"))?;
            }
        }
    }
    Ok(())
}

/// Streaming multiprocessors of the kernels' device (for the decode split).
pub fn multiprocessors(kernels: &Kernels) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let stream = kernels.stream();
    stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map(|n| n.max(1) as usize)
        .map_err(cuda("reading the multiprocessor count"))
}
