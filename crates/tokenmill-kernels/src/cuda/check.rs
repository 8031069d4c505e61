//! The GPU check: every kernel run on fresh random inputs of several shapes
//! (odd sizes included) and compared with its CPU reference, in f32, bf16
//! and f16. `tokenmill gpu kernels` prints these reports; scripts/gpu-check.sh
//! runs it on a GPU machine.

use super::launch::{self, DeviceElement, DeviceMeta};
use super::Kernels;
use crate::element::{max_relative_error, to_f32_vec};
use crate::geometry;
use crate::reference;
use crate::reference::rotary::RotaryStyle;
use crate::testing::{self, Rng};
use crate::{KernelError, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use half::{bf16, f16};

/// One kernel on one shape and type.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The kernel (`rms_norm`, `paged_decode`, ...).
    pub kernel: String,
    /// Element type.
    pub dtype: &'static str,
    /// The shape checked, in words.
    pub shape: String,
    /// Largest relative error against the reference (0 for exact kernels);
    /// `None` if the output held a NaN.
    pub max_error: Option<f32>,
    /// The bound it must stay under.
    pub tolerance: f32,
    /// Whether it did.
    pub passed: bool,
}

impl CheckReport {
    /// A report; it passes when `error` is a number within `tolerance`.
    pub fn new(
        kernel: &str,
        dtype: &'static str,
        shape: String,
        error: Option<f32>,
        tolerance: f32,
    ) -> Self {
        CheckReport {
            kernel: kernel.into(),
            dtype,
            shape,
            passed: error.is_some_and(|e| e <= tolerance),
            max_error: error,
            tolerance,
        }
    }

    /// The report as one JSON object (written by hand: this crate has no
    /// serde, and every field is a number, a bool or a plain string).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"kernel\":\"{}\",\"dtype\":\"{}\",\"shape\":\"{}\",\"max_error\":{},\"tolerance\":{},\"passed\":{}}}",
            self.kernel,
            self.dtype,
            self.shape.replace('"', "'"),
            self.max_error.map_or("null".to_string(), |e| format!("{e:e}")),
            self.tolerance,
            self.passed
        )
    }
}

fn up<T: DeviceRepr + Default + Clone>(kernels: &Kernels, host: &[T]) -> Result<CudaSlice<T>> {
    let one = [T::default()];
    let host = if host.is_empty() { &one[..] } else { host };
    kernels
        .stream()
        .clone_htod(host)
        .map_err(|e| KernelError::Cuda(format!("upload: {e}")))
}

fn down<T: DeviceElement>(kernels: &Kernels, device: &CudaSlice<T>) -> Result<Vec<T>> {
    kernels
        .stream()
        .clone_dtoh(device)
        .map_err(|e| KernelError::Cuda(format!("download: {e}")))
}

fn zeros<T: DeviceElement>(kernels: &Kernels, n: usize) -> Result<CudaSlice<T>> {
    up(kernels, &vec![T::from_f32(0.0); n.max(1)])
}

/// Runs every check of one element type.
fn check_type<T: DeviceElement>(
    kernels: &Kernels,
    rng: &mut Rng,
    sms: usize,
) -> Result<Vec<CheckReport>> {
    let mut reports = Vec::new();
    let tol = T::TOLERANCE;

    for (rows, width) in [(1, 1), (3, 7), (5, 576), (2, 4096), (1, 4097)] {
        let x: Vec<T> = rng.values(rows * width, -3.0, 3.0);
        let residual: Vec<T> = rng.values(rows * width, -3.0, 3.0);
        let weight: Vec<T> = rng.values(width, -1.5, 1.5);
        let (dx, dr, dw) = (
            up(kernels, &x)?,
            up(kernels, &residual)?,
            up(kernels, &weight)?,
        );
        let mut out = zeros::<T>(kernels, rows * width)?;
        launch::rms_norm(
            kernels,
            &dx.slice(..),
            &dw.slice(..),
            &mut out.slice_mut(..),
            1e-5,
        )?;
        let want = to_f32_vec(&reference::norm::rms_norm(&x, &weight, 1e-5));
        let got = to_f32_vec(&down(kernels, &out)?);
        reports.push(CheckReport::new(
            "rms_norm",
            T::NAME,
            format!("{rows}x{width}"),
            max_relative_error(&got[..want.len()], &want, 0.05),
            tol,
        ));

        let mut new_residual = zeros::<T>(kernels, rows * width)?;
        launch::fused_add_rms_norm(
            kernels,
            &dx.slice(..),
            &dr.slice(..),
            &dw.slice(..),
            &mut new_residual.slice_mut(..),
            &mut out.slice_mut(..),
            1e-5,
        )?;
        let (want_residual, want) =
            reference::norm::fused_add_rms_norm(&x, &residual, &weight, 1e-5);
        let got_residual = down(kernels, &new_residual)?;
        let residual_exact = got_residual[..want_residual.len()] == want_residual[..];
        let got = to_f32_vec(&down(kernels, &out)?);
        let err = max_relative_error(&got[..want.len()], &to_f32_vec(&want), 0.05)
            .filter(|_| residual_exact);
        reports.push(CheckReport::new(
            "fused_add_rms_norm",
            T::NAME,
            format!("{rows}x{width}"),
            err,
            tol,
        ));
    }

    for (rows, width) in [(1, 1), (3, 5), (2, 1536), (1, 14336)] {
        let gate_up: Vec<T> = rng.values(rows * 2 * width, -30.0, 30.0);
        let dg = up(kernels, &gate_up)?;
        let mut out = zeros::<T>(kernels, rows * width)?;
        launch::silu_and_mul(kernels, &dg.slice(..), &mut out.slice_mut(..), width)?;
        let want = to_f32_vec(&reference::activation::silu_and_mul(&gate_up, width));
        let got = to_f32_vec(&down(kernels, &out)?);
        reports.push(CheckReport::new(
            "silu_and_mul",
            T::NAME,
            format!("{rows}x{width}"),
            max_relative_error(&got[..want.len()], &want, 1e-2),
            tol,
        ));
    }

    for style in [RotaryStyle::Neox, RotaryStyle::Interleaved] {
        for (tokens, heads, head_dim, extra) in [(1, 1, 2, 0), (3, 5, 64, 7), (4, 40, 128, 1024)] {
            let half = head_dim / 2;
            let max_pos = 300;
            let angles: Vec<f32> = (0..max_pos * half)
                .map(|i| {
                    (i / half) as f32 * 10000f32.powf(-2.0 * (i % half) as f32 / head_dim as f32)
                })
                .collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let stride = heads * head_dim + extra;
            let rows: Vec<T> = rng.values(tokens * stride, -4.0, 4.0);
            let positions: Vec<u32> = (0..tokens).map(|_| rng.range(0, max_pos) as u32).collect();
            let mut drows = up(kernels, &rows)?;
            let (dpos, dcos, dsin) = (
                up(kernels, &positions)?,
                up(kernels, &cos)?,
                up(kernels, &sin)?,
            );
            launch::rotary(
                kernels,
                &mut drows.slice_mut(..),
                stride,
                heads,
                head_dim,
                &dpos.slice(..),
                &dcos.slice(..),
                &dsin.slice(..),
                style,
            )?;
            let mut want = rows.clone();
            reference::rotary::rotate(
                &mut want, stride, heads, head_dim, &positions, &cos, &sin, style,
            );
            let got = to_f32_vec(&down(kernels, &drows)?);
            reports.push(CheckReport::new(
                "rotary",
                T::NAME,
                format!("{style:?} {tokens} tokens x {heads} heads of {head_dim} (+{extra})"),
                max_relative_error(&got, &to_f32_vec(&want), 0.05),
                tol * 4.0,
            ));
        }
    }

    for shape in testing::attention_shapes() {
        for (kind, sequences) in [
            ("decode", testing::decode_sequences(rng)),
            ("prefill", testing::prefill_sequences(rng)),
        ] {
            for block_size in [1, 7, 16] {
                let c = testing::attention_case::<T>(rng, shape, block_size, &sequences);
                let words = format!(
                    "{} heads/{} kv of {}, blocks of {block_size}, contexts {:?}",
                    shape.num_heads, shape.num_kv_heads, shape.head_dim, c.meta.context_lens
                );
                let meta = DeviceMeta::upload(kernels, c.meta.clone(), &shape)?;
                // The cache write: the step's keys into a zeroed cache.
                let kv_width = shape.kv_width();
                let src: Vec<T> = rng.values(c.meta.num_tokens() * (kv_width + 3), -2.0, 2.0);
                let dsrc = up(kernels, &src)?;
                let mut dcache = up(kernels, &c.k_cache)?;
                launch::write_cache(
                    kernels,
                    &meta,
                    &dsrc.slice(..),
                    kv_width + 3,
                    &mut dcache.slice_mut(..),
                    kv_width,
                )?;
                let mut want = c.k_cache.clone();
                reference::cache::write_cache(
                    &c.meta.slot_mapping,
                    kv_width,
                    &src,
                    kv_width + 3,
                    &mut want,
                );
                let exact = down(kernels, &dcache)? == want;
                reports.push(CheckReport::new(
                    "write_cache",
                    T::NAME,
                    words.clone(),
                    exact.then_some(0.0),
                    0.0,
                ));

                let (dq, dk, dv) = (
                    up(kernels, &c.q)?,
                    up(kernels, &c.k_cache)?,
                    up(kernels, &c.v_cache)?,
                );
                let width = shape.num_heads * shape.head_dim;
                let mut out = zeros::<T>(kernels, c.meta.num_tokens() * width)?;
                // Decode batches go through the decode kernels twice: split
                // for this GPU and split as finely as the plan allows.
                let splits: &[usize] = if kind == "decode" {
                    &[sms, 100_000]
                } else {
                    &[sms]
                };
                for &split_sms in splits {
                    launch::paged_attention(
                        kernels,
                        &meta,
                        &shape,
                        &dq.slice(..),
                        &dk.slice(..),
                        &dv.slice(..),
                        &mut out.slice_mut(..),
                        split_sms,
                    )?;
                    let want = if kind == "decode" {
                        let plan = geometry::decode_plan(
                            shape.num_heads,
                            c.meta.num_tokens(),
                            c.meta.max_context,
                            shape.head_dim,
                            split_sms,
                        )?;
                        reference::attention::paged_decode(
                            &c.meta, &shape, &plan, &c.q, &c.k_cache, &c.v_cache,
                        )
                    } else {
                        let plan =
                            geometry::prefill_plan(&c.meta, shape.num_heads, shape.head_dim)?;
                        reference::attention::paged_prefill(
                            &c.meta, &shape, &plan, &c.q, &c.k_cache, &c.v_cache,
                        )
                    };
                    let got = to_f32_vec(&down(kernels, &out)?);
                    let err = max_relative_error(
                        &got[..want.len()],
                        &to_f32_vec(&want),
                        testing::ATTENTION_OUTPUT_SCALE,
                    );
                    reports.push(CheckReport::new(
                        &format!("paged_{kind}"),
                        T::NAME,
                        format!("{words}, {split_sms} SMs"),
                        err,
                        tol * 2.0,
                    ));
                }
            }
        }
    }

    let block_elems = 16 * 3 * 64;
    let cache: Vec<T> = rng.values(10 * block_elems, -2.0, 2.0);
    let pairs = [(0u32, 7u32), (3, 1), (9, 4)];
    let mut dcache = up(kernels, &cache)?;
    launch::copy_blocks(kernels, &mut dcache.slice_mut(..), &pairs, block_elems)?;
    let mut want = cache.clone();
    reference::cache::copy_blocks(&pairs, block_elems, &mut want);
    let exact = down(kernels, &dcache)? == want;
    reports.push(CheckReport::new(
        "copy_blocks",
        T::NAME,
        "3 pairs of 10 blocks".into(),
        exact.then_some(0.0),
        0.0,
    ));
    Ok(reports)
}

/// Runs every kernel check with inputs drawn from `seed`.
pub fn check_all(kernels: &Kernels, seed: u64) -> Result<Vec<CheckReport>> {
    let sms = launch::multiprocessors(kernels)?;
    let mut rng = Rng::new(seed);
    let mut reports = check_type::<f32>(kernels, &mut rng, sms)?;
    reports.extend(check_type::<bf16>(kernels, &mut rng, sms)?);
    reports.extend(check_type::<f16>(kernels, &mut rng, sms)?);
    Ok(reports)
}
