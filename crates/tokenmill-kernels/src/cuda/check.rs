//! The GPU as a backend of the kernel check suite ([`crate::check`]): each
//! call uploads its inputs, runs the typed launcher of [`super::launch`]
//! on candle's stream and downloads the result. `tokenmill gpu kernels`
//! runs the suite on it; scripts/gpu-check.sh runs that on a GPU machine.

use super::launch::{self, DeviceElement, DeviceMeta};
use super::sampling;
use super::Kernels;
use crate::check::{self as suite, Backend, CheckReport, KernelBackend, RotaryArgs};
use crate::paged::PagedMeta;
use crate::reference::attention::AttentionShape;
use crate::reference::sampling::{SampleOutputs, SamplingParamsRow};
use crate::testing::AttentionCase;
use crate::{KernelError, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};

/// The kernels of one GPU, as a check backend.
pub struct Gpu<'a>(pub &'a Kernels);

impl Gpu<'_> {
    fn up<T: DeviceRepr + Default + Clone>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        // A zero-length allocation is refused by the driver.
        let one = [T::default()];
        let host = if host.is_empty() { &one[..] } else { host };
        self.0
            .stream()
            .clone_htod(host)
            .map_err(|e| KernelError::Cuda(format!("upload: {e}")))
    }

    /// The first `len` elements of `device`.
    fn down<T: DeviceRepr + Default + Clone>(
        &self,
        device: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut host = self
            .0
            .stream()
            .clone_dtoh(device)
            .map_err(|e| KernelError::Cuda(format!("download: {e}")))?;
        host.truncate(len);
        Ok(host)
    }

    fn zeros<T: DeviceElement + Default>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.up(&vec![T::from_f32(0.0); n])
    }
}

impl<T: DeviceElement + Default> KernelBackend<T> for Gpu<'_> {
    fn rms_norm(&self, x: &[T], weight: &[T], eps: f32) -> Result<Vec<T>> {
        let (dx, dw) = (self.up(x)?, self.up(weight)?);
        let mut out = self.zeros::<T>(x.len())?;
        launch::rms_norm(
            self.0,
            &dx.slice(..x.len()),
            &dw.slice(..weight.len()),
            &mut out.slice_mut(..),
            eps,
        )?;
        self.down(&out, x.len())
    }

    fn fused_add_rms_norm(
        &self,
        x: &[T],
        residual: &[T],
        weight: &[T],
        eps: f32,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let (dx, dr, dw) = (self.up(x)?, self.up(residual)?, self.up(weight)?);
        let mut new_residual = self.zeros::<T>(x.len())?;
        let mut out = self.zeros::<T>(x.len())?;
        launch::fused_add_rms_norm(
            self.0,
            &dx.slice(..x.len()),
            &dr.slice(..residual.len()),
            &dw.slice(..weight.len()),
            &mut new_residual.slice_mut(..),
            &mut out.slice_mut(..),
            eps,
        )?;
        Ok((
            self.down(&new_residual, x.len())?,
            self.down(&out, x.len())?,
        ))
    }

    fn silu_and_mul(&self, gate_up: &[T], width: usize) -> Result<Vec<T>> {
        let dg = self.up(gate_up)?;
        let len = gate_up.len() / 2;
        let mut out = self.zeros::<T>(len)?;
        launch::silu_and_mul(
            self.0,
            &dg.slice(..gate_up.len()),
            &mut out.slice_mut(..),
            width,
        )?;
        self.down(&out, len)
    }

    fn rotary(&self, rows: &[T], args: &RotaryArgs<'_>) -> Result<Vec<T>> {
        let mut drows = self.up(rows)?;
        let (dpos, dcos, dsin) = (
            self.up(args.positions)?,
            self.up(args.cos)?,
            self.up(args.sin)?,
        );
        launch::rotary(
            self.0,
            &mut drows.slice_mut(..rows.len()),
            args.row_stride,
            args.num_heads,
            args.head_dim,
            &dpos.slice(..args.positions.len()),
            &dcos.slice(..args.cos.len()),
            &dsin.slice(..args.sin.len()),
            args.style,
        )?;
        self.down(&drows, rows.len())
    }

    fn write_cache(
        &self,
        meta: &PagedMeta,
        shape: &AttentionShape,
        src: &[T],
        src_stride: usize,
        cache: &[T],
    ) -> Result<Vec<T>> {
        let device_meta = DeviceMeta::upload(self.0, meta.clone(), shape)?;
        let dsrc = self.up(src)?;
        let mut dcache = self.up(cache)?;
        launch::write_cache(
            self.0,
            &device_meta,
            &dsrc.slice(..src.len()),
            src_stride,
            &mut dcache.slice_mut(..cache.len()),
            shape.kv_width(),
        )?;
        self.down(&dcache, cache.len())
    }

    fn paged_attention(
        &self,
        case: &AttentionCase<T>,
        multiprocessors: usize,
        context_capacity: Option<usize>,
    ) -> Result<Vec<T>> {
        let mut meta = DeviceMeta::upload(self.0, case.meta.clone(), &case.shape)?;
        if let Some(capacity) = context_capacity {
            meta = meta.with_context_capacity(capacity);
        }
        let (dq, dk, dv) = (
            self.up(&case.q)?,
            self.up(&case.k_cache)?,
            self.up(&case.v_cache)?,
        );
        let len = case.meta.num_tokens() * case.shape.num_heads * case.shape.head_dim;
        let mut out = self.zeros::<T>(len)?;
        launch::paged_attention(
            self.0,
            &meta,
            &case.shape,
            &dq.slice(..case.q.len()),
            &dk.slice(..case.k_cache.len()),
            &dv.slice(..case.v_cache.len()),
            &mut out.slice_mut(..),
            multiprocessors,
        )?;
        self.down(&out, len)
    }

    fn copy_blocks(&self, cache: &[T], pairs: &[(u32, u32)], block_elems: usize) -> Result<Vec<T>> {
        let mut dcache = self.up(cache)?;
        launch::copy_blocks(
            self.0,
            &mut dcache.slice_mut(..cache.len()),
            pairs,
            block_elems,
        )?;
        self.down(&dcache, cache.len())
    }
}

impl Backend for Gpu<'_> {
    fn multiprocessors(&self) -> Result<usize> {
        launch::multiprocessors(self.0)
    }

    fn sample(
        &self,
        logits: &[f32],
        vocab: usize,
        params: &[SamplingParamsRow],
    ) -> Result<SampleOutputs> {
        let on_device = self.up(logits)?;
        let samples =
            sampling::sample_on_device(self.0, &on_device.slice(..logits.len()), vocab, params)?;
        sampling::download(self.0, &samples)
    }
}

/// Runs the whole suite on the GPU with inputs drawn from `seed`.
pub fn check_all(kernels: &Kernels, seed: u64) -> Result<Vec<CheckReport>> {
    suite::check_all(&Gpu(kernels), seed)
}
