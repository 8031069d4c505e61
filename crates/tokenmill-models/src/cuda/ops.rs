//! The model's steps on a CUDA device through tokenmill's own kernels
//! (`tokenmill-kernels`), on candle tensors: each function reads its inputs
//! where candle keeps them, launches on candle's stream and hands back
//! candle tensors, so the kernels and candle's matmuls interleave freely.
//!
//! Out-of-place kernels allocate their outputs; the two in-place ones (the
//! rotary embedding on the fused qkv rows, and writing keys and values into
//! the cache) go through candle's in-place op hook, which holds the tensor's
//! storage exclusively while the kernel is queued.

use crate::error::{ModelError, Result};
use crate::forward::batch::ForwardBatch;
use crate::forward::kv_cache::PagedKvCache;
use crate::forward::step_kernels::StepKernels;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor,
};
use tokenmill_kernels::cuda::launch::{self, DeviceElement, DeviceMeta};
use tokenmill_kernels::cuda::Kernels;
use tokenmill_kernels::paged::PagedMeta;
use tokenmill_kernels::reference::attention::AttentionShape;
use tokenmill_kernels::reference::rotary::RotaryStyle;

/// Runs `body` with `T` bound to the Rust type of an f32, bf16 or f16 dtype.
macro_rules! dispatch {
    ($dtype:expr, $t:ident => $body:block) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => Err(ModelError::Unsupported(format!(
                "kernels on {other:?} tensors"
            ))),
        }
    };
}

fn kernel_error(e: tokenmill_kernels::KernelError) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(e.to_string()))
}

fn candle_error(e: tokenmill_kernels::KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Our kernels on one CUDA device.
pub struct GpuKernels {
    kernels: Kernels,
    device: CudaDevice,
    multiprocessors: usize,
}

impl GpuKernels {
    /// The kernels of `device`, loaded now (so that the first request does
    /// not pay for it); `None` on any other device.
    pub fn new(device: &Device) -> Result<Option<Self>> {
        let Device::Cuda(cuda) = device else {
            return Ok(None);
        };
        let kernels = Kernels::new(cuda);
        kernels.preload().map_err(kernel_error)?;
        let multiprocessors = launch::multiprocessors(&kernels).map_err(kernel_error)?;
        Ok(Some(GpuKernels {
            kernels,
            device: cuda.clone(),
            multiprocessors,
        }))
    }

    /// The device.
    pub(crate) fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The loaded kernels.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// The step's block tables, positions and slots on the device.
    pub fn upload_meta(&self, meta: PagedMeta, shape: &AttentionShape) -> Result<DeviceMeta> {
        DeviceMeta::upload(&self.kernels, meta, shape).map_err(kernel_error)
    }

    /// Overwrites a u32 tensor on the device with `values` (a decode
    /// graph's token buffer), in place.
    pub fn upload_u32(&self, tensor: &Tensor, values: &[u32]) -> Result<()> {
        tensor.inplace_op1(&UploadOp { values })?;
        Ok(())
    }

    fn alloc<T: DeviceElement>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every kernel that receives a fresh output writes all of it
        // before anything reads it.
        unsafe { self.device.alloc::<T>(len.max(1)) }.map_err(ModelError::from)
    }

    fn tensor<T: CudaDType>(
        &self,
        slice: CudaSlice<T>,
        shape: impl Into<candle_core::Shape>,
    ) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(slice, self.device.clone());
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }
}

impl StepKernels for GpuKernels {
    type Meta = DeviceMeta;

    fn step_meta(
        &self,
        batch: &ForwardBatch,
        cache: &PagedKvCache,
        shape: &AttentionShape,
    ) -> Result<DeviceMeta> {
        let meta = batch.paged_meta(cache.block_size(), cache.num_blocks())?;
        self.upload_meta(meta, shape)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let weight = weight.to_dtype(x.dtype())?;
        let shape = x.shape().clone();
        dispatch!(x.dtype(), T => {
            let out = self.alloc::<T>(x.elem_count())?;
            let mut out = out;
            with_view::<T, _>(x, |x| {
                with_view::<T, _>(&weight, |w| {
                    launch::rms_norm(&self.kernels, &x, &w, &mut out.slice_mut(..), eps)
                        .map_err(kernel_error)
                })
            })?;
            Ok(self.tensor(out, shape))
        })
    }

    fn fused_add_rms_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let weight = weight.to_dtype(x.dtype())?;
        let residual = residual.to_dtype(x.dtype())?;
        let shape = x.shape().clone();
        dispatch!(x.dtype(), T => {
            let mut new_residual = self.alloc::<T>(x.elem_count())?;
            let mut out = self.alloc::<T>(x.elem_count())?;
            with_view::<T, _>(x, |x| {
                with_view::<T, _>(&residual, |r| {
                    with_view::<T, _>(&weight, |w| {
                        launch::fused_add_rms_norm(
                            &self.kernels,
                            &x,
                            &r,
                            &w,
                            &mut new_residual.slice_mut(..),
                            &mut out.slice_mut(..),
                            eps,
                        )
                        .map_err(kernel_error)
                    })
                })
            })?;
            Ok((self.tensor(new_residual, shape.clone()), self.tensor(out, shape)))
        })
    }

    fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (rows, double) = gate_up.dims2()?;
        let width = double / 2;
        dispatch!(gate_up.dtype(), T => {
            let mut out = self.alloc::<T>(rows * width)?;
            with_view::<T, _>(gate_up, |g| {
                launch::silu_and_mul(&self.kernels, &g, &mut out.slice_mut(..), width)
                    .map_err(kernel_error)
            })?;
            Ok(self.tensor(out, (rows, width)))
        })
    }

    fn rotary_in_place(
        &self,
        qkv: &Tensor,
        num_heads: usize,
        head_dim: usize,
        meta: &Self::Meta,
        (cos, sin): (&Tensor, &Tensor),
        style: RotaryStyle,
    ) -> Result<()> {
        let row_stride = qkv.dim(1)?;
        qkv.inplace_op1(&RotaryOp {
            kernels: &self.kernels,
            row_stride,
            num_heads,
            head_dim,
            meta,
            cos,
            sin,
            style,
        })?;
        Ok(())
    }

    fn write_cache(
        &self,
        cache: &Tensor,
        src: &Tensor,
        offset: usize,
        width: usize,
        meta: &Self::Meta,
    ) -> Result<()> {
        cache.inplace_op1(&WriteCacheOp {
            kernels: &self.kernels,
            src,
            offset,
            width,
            meta,
        })?;
        Ok(())
    }

    fn paged_attention(
        &self,
        meta: &Self::Meta,
        shape: &AttentionShape,
        qkv: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor> {
        let tokens = meta.meta.num_tokens();
        let width = shape.num_heads * shape.head_dim;
        dispatch!(qkv.dtype(), T => {
            let mut out = self.alloc::<T>(tokens * width)?;
            with_view::<T, _>(qkv, |q| {
                with_view::<T, _>(k_cache, |k| {
                    with_view::<T, _>(v_cache, |v| {
                        launch::paged_attention(
                            &self.kernels,
                            meta,
                            shape,
                            &q,
                            &k,
                            &v,
                            &mut out.slice_mut(..),
                            self.multiprocessors,
                        )
                        .map_err(kernel_error)
                    })
                })
            })?;
            Ok(self.tensor(out, (tokens, width)))
        })
    }
}

/// Calls `f` with the elements of a contiguous CUDA tensor of type `T`.
fn with_view<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(ModelError::Unsupported(
            "a CUDA kernel given a tensor on another device".into(),
        ));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(ModelError::Unsupported(
            "a CUDA kernel given a strided tensor".into(),
        ));
    };
    f(cuda.as_cuda_slice::<T>()?.slice(start..end))
}

/// The rotary embedding in place on a qkv tensor.
struct RotaryOp<'a> {
    kernels: &'a Kernels,
    row_stride: usize,
    num_heads: usize,
    head_dim: usize,
    meta: &'a DeviceMeta,
    cos: &'a Tensor,
    sin: &'a Tensor,
    style: RotaryStyle,
}

impl RotaryOp<'_> {
    fn run<T: DeviceElement + CudaDType>(
        &self,
        rows: &mut CudaSlice<T>,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        let (start, end) = contiguous(layout)?;
        let rows = &mut rows.slice_mut(start..end);
        let cos = self.cos.storage_and_layout();
        let sin = self.sin.storage_and_layout();
        let (Storage::Cuda(cos_s), Storage::Cuda(sin_s)) = (&*cos.0, &*sin.0) else {
            candle_core::bail!("rotary tables off the GPU");
        };
        let (c0, c1) = contiguous(cos.1)?;
        let (s0, s1) = contiguous(sin.1)?;
        launch::rotary(
            self.kernels,
            rows,
            self.row_stride,
            self.num_heads,
            self.head_dim,
            &self.meta.positions(),
            &cos_s.as_cuda_slice::<f32>()?.slice(c0..c1),
            &sin_s.as_cuda_slice::<f32>()?.slice(s0..s1),
            self.style,
        )
        .map_err(candle_error)
    }
}

impl InplaceOp1 for RotaryOp<'_> {
    fn name(&self) -> &'static str {
        "tm-rotary"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("tm-rotary runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        match &mut storage.slice {
            CudaStorageSlice::F32(s) => self.run(s, layout),
            CudaStorageSlice::BF16(s) => self.run(s, layout),
            CudaStorageSlice::F16(s) => self.run(s, layout),
            _ => candle_core::bail!("tm-rotary on {:?}", storage.dtype()),
        }
    }
}

/// Writing part of each row of a source tensor into cache slots.
struct WriteCacheOp<'a> {
    kernels: &'a Kernels,
    src: &'a Tensor,
    offset: usize,
    width: usize,
    meta: &'a DeviceMeta,
}

impl WriteCacheOp<'_> {
    fn run<T: DeviceElement + CudaDType>(
        &self,
        cache: &mut CudaSlice<T>,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        let (start, end) = contiguous(layout)?;
        let cache = &mut cache.slice_mut(start..end);
        let (src, src_layout) = self.src.storage_and_layout();
        let Storage::Cuda(src) = &*src else {
            candle_core::bail!("cache writes from a tensor off the GPU");
        };
        let (s0, s1) = contiguous(src_layout)?;
        let stride = src_layout.dims().last().copied().unwrap_or(0);
        if self.offset + self.width > stride {
            candle_core::bail!("columns {}+{} of rows of {stride}", self.offset, self.width);
        }
        let src = src.as_cuda_slice::<T>()?.slice(s0 + self.offset..s1);
        launch::write_cache(self.kernels, self.meta, &src, stride, cache, self.width)
            .map_err(candle_error)
    }
}

impl InplaceOp1 for WriteCacheOp<'_> {
    fn name(&self) -> &'static str {
        "tm-write-cache"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("tm-write-cache runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        match &mut storage.slice {
            CudaStorageSlice::F32(s) => self.run(s, layout),
            CudaStorageSlice::BF16(s) => self.run(s, layout),
            CudaStorageSlice::F16(s) => self.run(s, layout),
            _ => candle_core::bail!("tm-write-cache on {:?}", storage.dtype()),
        }
    }
}

/// Copies host values over a tensor's elements.
struct UploadOp<'a> {
    values: &'a [u32],
}

impl InplaceOp1 for UploadOp<'_> {
    fn name(&self) -> &'static str {
        "tm-upload"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("tm-upload runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = contiguous(layout)?;
        if end - start != self.values.len() {
            candle_core::bail!("{} values for {} elements", self.values.len(), end - start);
        }
        let stream = storage.device.cuda_stream();
        let slice = storage.as_cuda_slice_mut::<u32>()?;
        stream
            .memcpy_htod(self.values, &mut slice.slice_mut(start..end))
            .map_err(|e| candle_core::Error::Msg(format!("uploading tokens: {e}")))
    }
}

fn contiguous(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a CUDA kernel given a strided tensor".into()))
}
