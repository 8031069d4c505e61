//! Sampling on the device: launches `tm_sample_f32` (kernels/sampling.cu),
//! and checks it against [`crate::reference::sampling`], which it must match
//! to the bit (the reference explains why it can).
//!
//! Only the chosen tokens and their logprobs cross back to the host (a few
//! bytes a row), not the `[rows, vocab]` logits: that copy and a host-side
//! softmax over 128k floats per row are what device sampling saves.

use super::Kernels;
use crate::reference::sampling::{
    self as reference, splitmix64, SampledRow, SamplingParamsRow, MAX_TOP_LOGPROBS, NO_TOKEN,
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
    /// (or past the vocabulary) hold [`NO_TOKEN`].
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

/// The outputs, copied back as they are (20 slots a row).
struct HostSamples {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f32>,
}

fn download(kernels: &Kernels, samples: &DeviceSamples) -> Result<HostSamples> {
    let stream = kernels.stream();
    let copy = cuda("copying the samples back");
    Ok(HostSamples {
        tokens: stream.clone_dtoh(&samples.tokens).map_err(&copy)?,
        logprobs: stream.clone_dtoh(&samples.logprobs).map_err(&copy)?,
        top_ids: stream.clone_dtoh(&samples.top_ids).map_err(&copy)?,
        top_logprobs: stream.clone_dtoh(&samples.top_logprobs).map_err(&copy)?,
    })
}

fn decode(host: &HostSamples, params: &[SamplingParamsRow]) -> Vec<SampledRow> {
    params
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let slots = r * MAX_TOP_LOGPROBS..(r + 1) * MAX_TOP_LOGPROBS;
            SampledRow::from_outputs(
                host.tokens[r],
                host.logprobs[r],
                &host.top_ids[slots.clone()],
                &host.top_logprobs[slots],
                p.num_logprobs,
            )
        })
        .collect()
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
    Ok(decode(&download(kernels, &samples)?, params))
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

/// The outcome of one case of [`check`].
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingCheck {
    /// What was run (`tm_sample_f32 8x128256`).
    pub name: String,
    /// Whether the kernel matched the reference to the bit.
    pub passed: bool,
    /// What was compared, or the first difference.
    pub detail: String,
}

/// The vocabularies [`check`] samples from: one token, sizes that are not a
/// whole number of warps or blocks, and real models' (SmolLM 49152,
/// Llama 3 128256).
pub const CHECK_VOCABS: [usize; 6] = [1, 7, 1000, 4099, 49_152, 128_256];
/// The batch sizes [`check`] uses with each vocabulary.
pub const CHECK_BATCHES: [usize; 3] = [1, 3, 8];

/// Runs the kernel on fresh random logits (drawn from `seed`) and random
/// parameters of every kind, for each of [`CHECK_VOCABS`] and
/// [`CHECK_BATCHES`], and compares every output with the reference to the
/// bit; also checks that unused top slots hold [`NO_TOKEN`] and `-inf`, and
/// that a second launch gives the same bits.
pub fn check(kernels: &Kernels, seed: u64) -> Vec<SamplingCheck> {
    let mut draws = Draws(seed);
    let mut reports = Vec::new();
    for vocab in CHECK_VOCABS {
        for rows in CHECK_BATCHES {
            let logits = random_logits(&mut draws, rows, vocab);
            let params: Vec<SamplingParamsRow> = (0..rows)
                .map(|r| random_params(&mut draws, r, vocab))
                .collect();
            let name = format!("{FUNCTION} {rows}x{vocab}");
            let (passed, detail) = match check_case(kernels, &logits, vocab, &params) {
                Ok(()) => (true, format!("{rows} rows bit-exact, twice")),
                Err(detail) => (false, detail),
            };
            reports.push(SamplingCheck {
                name,
                passed,
                detail,
            });
        }
    }
    reports
}

fn check_case(
    kernels: &Kernels,
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParamsRow],
) -> std::result::Result<(), String> {
    let want = reference::sample_rows(logits, vocab, params).map_err(|e| e.to_string())?;
    let stream = kernels.stream();
    let on_device = stream
        .clone_htod(logits)
        .map_err(|e| format!("uploading logits: {e}"))?;
    let mut first: Option<HostSamples> = None;
    for launch in 0..2 {
        let samples = sample_on_device(kernels, &on_device.as_view(), vocab, params)
            .map_err(|e| e.to_string())?;
        let host = download(kernels, &samples).map_err(|e| e.to_string())?;
        let got = decode(&host, params);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            if !g.bit_eq(w) {
                return Err(format!(
                    "launch {launch} row {r} ({:?}): kernel {g:?}, reference {w:?}",
                    params[r]
                ));
            }
        }
        for (r, w) in want.iter().enumerate() {
            let slots = r * MAX_TOP_LOGPROBS + w.top.len()..(r + 1) * MAX_TOP_LOGPROBS;
            let unused_ok = host.top_ids[slots.clone()].iter().all(|&id| id == NO_TOKEN)
                && host.top_logprobs[slots]
                    .iter()
                    .all(|&lp| lp == f32::NEG_INFINITY);
            if !unused_ok {
                return Err(format!("launch {launch} row {r}: unused top slots written"));
            }
        }
        if let Some(first) = &first {
            let same = first.tokens == host.tokens
                && first.top_ids == host.top_ids
                && bits(&first.logprobs) == bits(&host.logprobs)
                && bits(&first.top_logprobs) == bits(&host.top_logprobs);
            if !same {
                return Err("a second launch gave other bits".into());
            }
        }
        first = Some(host);
    }
    Ok(())
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// A counter-based generator for the check's inputs (the crate has no
/// random-number dependency outside its tests).
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / 16_777_216.0
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Logits of several scales, with the hazards the kernel must survive: a
/// sprinkling of `-inf` (masked tokens), ties with the max, and one row in
/// eight that is degenerate (all equal, all `-inf`, or NaN and `+inf`).
fn random_logits(draws: &mut Draws, rows: usize, vocab: usize) -> Vec<f32> {
    let mut logits = Vec::with_capacity(rows * vocab);
    for _ in 0..rows {
        let scale = [1.0, 4.0, 12.0, 40.0][draws.below(4) as usize];
        let mut row: Vec<f32> = (0..vocab)
            .map(|_| (draws.unit() * 2.0 - 1.0) * scale)
            .collect();
        for _ in 0..vocab / 100 {
            let i = draws.below(vocab as u64) as usize;
            row[i] = f32::NEG_INFINITY;
        }
        if vocab > 1 && draws.below(3) == 0 {
            let best = (0..vocab).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            let twin = draws.below(vocab as u64) as usize;
            row[twin] = row[best];
        }
        match draws.below(24) {
            0 => row.fill(0.5),
            1 => row.fill(f32::NEG_INFINITY),
            2 => {
                let i = draws.below(vocab as u64) as usize;
                row[i] = f32::NAN;
                let j = draws.below(vocab as u64) as usize;
                row[j] = f32::INFINITY;
            }
            _ => {}
        }
        logits.extend(row);
    }
    logits
}

/// Row `r`'s parameters: the rows of a batch cycle through greedy,
/// temperature alone, top-k, top-p, both, and top-k 1, with random values.
fn random_params(draws: &mut Draws, r: usize, vocab: usize) -> SamplingParamsRow {
    let temperature: f32 = [0.0, 0.3, 0.7, 1.0, 1.5][draws.below(5) as usize];
    let top_k = 1 + draws.below(vocab.min(200) as u64) as u32;
    let top_p = 0.05 + 0.9 * draws.unit();
    let (top_k, top_p, temperature) = match r % 6 {
        0 => (0, 1.0, 0.0),
        1 => (0, 1.0, temperature.max(0.3)),
        2 => (top_k, 1.0, temperature),
        3 => (0, top_p, temperature.max(0.3)),
        4 => (top_k, top_p, temperature.max(0.3)),
        _ => (1, 1.0, 1.0),
    };
    SamplingParamsRow {
        temperature,
        top_k,
        top_p,
        seed: draws.next(),
        step: draws.below(1 << 20),
        num_logprobs: draws.below(MAX_TOP_LOGPROBS as u64 + 1) as u32,
    }
}
