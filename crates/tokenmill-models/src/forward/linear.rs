//! Linear layers: how a weight is stored and multiplied is a property of the
//! layer, chosen at load for the device it lives on (our int8 kernel,
//! [`crate::cpu::gemm`], on the CPU; candle's [`QMatMul`] or a dense
//! product elsewhere), not of the architecture or the forward.

use crate::cpu::gemm::Q8Matrix;
use crate::error::{ModelError, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

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
pub(crate) struct Linear {
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
    pub(crate) fn new(
        weights: Vec<QTensor>,
        biases: Vec<Option<Tensor>>,
        device: &Device,
    ) -> Result<Self> {
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
    pub(crate) fn dense(
        weights: Vec<Tensor>,
        biases: Vec<Option<Tensor>>,
        device: &Device,
    ) -> Result<Self> {
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
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
    pub(crate) fn forward_parts(&self, x: &Tensor) -> Result<Vec<Tensor>> {
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

/// The weight and epsilon of an RMSNorm; the forward's kernels apply it.
pub(crate) struct Norm {
    /// `[hidden]`, f32.
    pub(crate) weight: Tensor,
    pub(crate) eps: f32,
}
