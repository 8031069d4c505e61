//! The element-wise glue of a decoder layer on the CPU, as candle ops: RMS
//! normalization, the SiLU-gated product and the residual add.
//!
//! Why not candle's own: for large tensors (a batch of 64 decode tokens, a
//! prompt) they hand the work to rayon or candle's barrier pool, whose
//! threads then spin beside [`crate::cpu::pool`]'s between calls; on two
//! cores three busy threads made a step several times slower. These passes
//! are memory-bound and take microseconds, so they run on the calling
//! thread. Each output row is computed from its own input row only, in a
//! fixed order, so batching does not change a bit.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape};

/// The elements of a contiguous `f32` CPU tensor.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op} takes f32, not {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op} takes contiguous tensors"),
    }
}

/// The width of the last dimension, which must be positive.
fn row_width(layout: &Layout, op: &str) -> Result<usize> {
    match layout.dims().last() {
        Some(&width) if width > 0 => Ok(width),
        _ => bail!("{op} takes rows, not {:?}", layout.shape()),
    }
}

/// RMS normalization over the last dimension, scaled by `alpha`: candle's
/// `rms_norm` arithmetic (an `f32` sum of squares in order, `x / sqrt(mean
/// + eps) * alpha`) on any number of rows.
pub struct RmsNorm {
    /// Added to the mean square.
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "cpu-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, alpha) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let width = row_width(l1, self.name())?;
        if alpha.len() != width {
            bail!("rms-norm of rows of {width} with {} weights", alpha.len());
        }
        let mut out = vec![0f32; x.len()];
        for (src, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let sum2: f32 = src.iter().map(|v| v * v).sum();
            let m = (sum2 / width as f32 + self.eps).sqrt();
            for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
                *d = *s / m * *a;
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) * up` for rows `[gate | up]`, the stacked output of the gate
/// and up projections: `[.., 2 * width]` to `[.., width]`.
pub struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "cpu-silu-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let stacked = row_width(layout, self.name())?;
        if stacked % 2 != 0 {
            bail!("silu-mul of rows of odd width {stacked}");
        }
        let width = stacked / 2;
        let mut out = Vec::with_capacity(x.len() / 2);
        for row in x.chunks_exact(stacked) {
            let (gate, up) = row.split_at(width);
            out.extend(gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
        }
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = width;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `a + b` for tensors of one shape.
pub struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "cpu-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("add of {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (a, b) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let out = a.iter().zip(b).map(|(x, y)| x + y).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn tensor(values: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_candle_on_many_rows() {
        // 40 rows: past the 32 where candle's rms_norm goes parallel.
        let (rows, width) = (40, 24);
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let x = tensor(&x, (rows, width));
        let alpha = Tensor::arange(0f32, width as f32, &Device::Cpu).unwrap();
        let ours = x.apply_op2_no_bwd(&alpha, &RmsNorm { eps: 1e-5 }).unwrap();
        let theirs = candle_nn::ops::rms_norm(&x, &alpha, 1e-5).unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            theirs.to_vec2::<f32>().unwrap()
        );

        let stacked = x.apply_op1_no_bwd(&SiluMul).unwrap();
        let (gate, up) = (
            x.narrow(1, 0, width / 2).unwrap(),
            x.narrow(1, width / 2, width / 2).unwrap(),
        );
        let theirs = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        let (ours, theirs) = (
            stacked.to_vec2::<f32>().unwrap(),
            theirs.to_vec2::<f32>().unwrap(),
        );
        for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }

        let sum = x.apply_op2_no_bwd(&x, &Add).unwrap();
        assert_eq!(
            sum.to_vec2::<f32>().unwrap(),
            (&x + &x).unwrap().to_vec2::<f32>().unwrap()
        );
        assert!(x.apply_op2_no_bwd(&alpha, &Add).is_err());
    }
}
