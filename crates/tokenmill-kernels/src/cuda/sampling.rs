//! Sampling on the device: launches `tm_sample_f32` (kernels/sampling.cu),
//! which must match [`crate::reference::sampling`] to the bit (the reference
//! explains why it can; [`crate::check`] checks it).
//!
//! Only the chosen tokens and their logprobs cross back to the host (a few
//! bytes a row), not the `[rows, vocab]` logits: that copy and a host-side
//! softmax over 128k floats per row are what device sampling saves.

use super::Kernels;
use crate::reference::sampling::{
    self as reference, SampleOutputs, SampledRow, SamplingParamsRow, MAX_TOP_LOGPROBS,
};
use crate::{KernelError, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Storage, Tensor};

const MODULE: &str = "sampling";
const FUNCTION: &str = "tm_sample_f32";

fn cuda<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e}"))
}

/// One launch's outputs, still on the device.
pub struct DeviceSamples {
    /// The chosen token of each row: `[rows]`.
    pub tokens: CudaSlice<u32>,
    /// Its log-probability: `[rows]`.
    pub logprobs: CudaSlice<f32>,
    /// The top alternatives: `[rows, 20]`; slots past a row's `num_logprobs`
    /// (or past the vocabulary) hold [`reference::NO_TOKEN`].
    pub top_ids: CudaSlice<u32>,
    /// Their log-probabilities: `[rows, 20]` (`-inf` in unused slots).
    pub top_logprobs: CudaSlice<f32>,
}

/// Queues the sampling of every row of `logits` (`[params.len(), vocab]`,
/// row-major, f32) on candle's stream. Refuses an empty batch (there is
/// nothing to allocate the outputs for); [`sample`] accepts one.
pub fn sample_on_device(
    kernels: &Kernels,
    logits: &CudaView<'_, f32>,
    vocab: usize,
    params: &[SamplingParamsRow],
) -> Result<DeviceSamples> {
    reference::validate(logits.len(), vocab, params)?;
    if params.is_empty() {
        return Err(KernelError::Invalid("no rows to sample".into()));
    }
    let geometry = reference::sampling_geometry(params.len(), vocab)?;
    let rows = params.len();
    let stream = kernels.stream();
    let words: Vec<u32> = params.iter().flat_map(SamplingParamsRow::encode).collect();
    let words = stream
        .clone_htod(words.as_slice())
        .map_err(cuda("uploading the sampling parameters"))?;
    let alloc = cuda("allocating the sampling outputs");
    let mut tokens = stream.alloc_zeros::<u32>(rows).map_err(&alloc)?;
    let mut logprobs = stream.alloc_zeros::<f32>(rows).map_err(&alloc)?;
    let mut top_ids = stream
        .alloc_zeros::<u32>(rows * MAX_TOP_LOGPROBS)
        .map_err(&alloc)?;
    let mut top_logprobs = stream
        .alloc_zeros::<f32>(rows * MAX_TOP_LOGPROBS)
        .map_err(&alloc)?;
    let func = kernels.function(MODULE, FUNCTION)?;
    // sampling_geometry bounds both by i32::MAX, so both fit the kernel's u32.
    let (rows_arg, vocab_arg) = (geometry.grid, vocab as u32);
    let mut args = stream.launch_builder(&func);
    args.arg(logits)
        .arg(&rows_arg)
        .arg(&vocab_arg)
        .arg(&words)
        .arg(&mut tokens)
        .arg(&mut logprobs)
        .arg(&mut top_ids)
        .arg(&mut top_logprobs);
    let config = LaunchConfig {
        grid_dim: (geometry.grid, 1, 1),
        block_dim: (geometry.threads, 1, 1),
        shared_mem_bytes: geometry.shared_bytes,
    };
    // SAFETY: block r reads row r of `logits` (validate() checked
    // logits.len() == rows * vocab) and words 8r..8r+8 of `words` (8 a row),
    // and writes element r of `tokens`/`logprobs` and 20r..20r+20 of the top
    // outputs, all allocated above for `rows` rows; the grid has `rows`
    // blocks; the argument list matches tm_sample_f32 in kernels/sampling.cu;
    // the block is a whole number of warps, at most 1024 (sampling_geometry).
    unsafe { args.launch(config) }.map_err(cuda(FUNCTION))?;
    Ok(DeviceSamples {
        tokens,
        logprobs,
        top_ids,
        top_logprobs,
    })
}

/// Copies a launch's outputs back to the host (waiting for the stream).
pub fn download(kernels: &Kernels, samples: &DeviceSamples) -> Result<SampleOutputs> {
    let stream = kernels.stream();
    let copy = cuda("copying the samples back");
    Ok(SampleOutputs {
        tokens: stream.clone_dtoh(&samples.tokens).map_err(&copy)?,
        token_logprobs: stream.clone_dtoh(&samples.logprobs).map_err(&copy)?,
        top_ids: stream.clone_dtoh(&samples.top_ids).map_err(&copy)?,
        top_logprobs: stream.clone_dtoh(&samples.top_logprobs).map_err(&copy)?,
    })
}

/// Samples every row of `logits` and returns the rows to the host (waiting
/// for the stream).
pub fn sample(
    kernels: &Kernels,
    logits: &CudaView<'_, f32>,
    vocab: usize,
    params: &[SamplingParamsRow],
) -> Result<Vec<SampledRow>> {
    if params.is_empty() {
        reference::validate(logits.len(), vocab, params)?;
        return Ok(Vec::new());
    }
    let samples = sample_on_device(kernels, logits, vocab, params)?;
    Ok(download(kernels, &samples)?.rows(params))
}

/// [`sample`] for a candle tensor: `[rows, vocab]`, f32, contiguous, on
/// this device (the model's logits as they come out of the lm head).
pub fn sample_tensor(
    kernels: &Kernels,
    logits: &Tensor,
    params: &[SamplingParamsRow],
) -> Result<Vec<SampledRow>> {
    let (rows, vocab) = logits
        .dims2()
        .map_err(|e| KernelError::Invalid(format!("logits: {e}")))?;
    if rows != params.len() {
        return Err(KernelError::Invalid(format!(
            "{rows} rows of logits for {} rows of parameters",
            params.len()
        )));
    }
    if logits.dtype() != DType::F32 {
        return Err(KernelError::Unsupported(format!(
            "{:?} logits (the sampler reads f32)",
            logits.dtype()
        )));
    }
    if !logits
        .device()
        .same_device(&Device::Cuda(kernels.device().clone()))
    {
        return Err(KernelError::Invalid("logits on another device".into()));
    }
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        return Err(KernelError::Invalid("logits not on a CUDA device".into()));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(KernelError::Invalid("logits not contiguous".into()));
    };
    let slice = storage
        .as_cuda_slice::<f32>()
        .map_err(|e| KernelError::Invalid(format!("logits: {e}")))?;
    sample(kernels, &slice.slice(start..end), vocab, params)
}
