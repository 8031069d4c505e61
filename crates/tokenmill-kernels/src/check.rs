//! The kernel check suite: every kernel run on fresh random inputs of
//! several shapes (odd sizes included), in f32, bf16 and f16, and compared
//! with its CPU reference; the sampler compared to the bit.
//!
//! The suite runs against a backend that executes the kernels' own code:
//! the GPU (`cuda::check::Gpu`, behind `tokenmill gpu kernels`) or the CPU
//! emulator of `kernels/*.cu` (the tokenmill-kernels-emu crate, in CI). A
//! backend takes host data in and gives host data back; how it gets the
//! data to its kernels is its own business.

use crate::element::{max_relative_error, to_f32_vec, Element};
use crate::geometry;
use crate::paged::PagedMeta;
use crate::reference;
use crate::reference::attention::AttentionShape;
use crate::reference::rotary::RotaryStyle;
use crate::reference::sampling::{
    splitmix64, SampleOutputs, SampledRow, SamplingParamsRow, MAX_TOP_LOGPROBS, NO_TOKEN,
};
use crate::testing::{self, AttentionCase, Rng};
use crate::{KernelError, Result};
use half::{bf16, f16};

/// The rotary kernel's inputs besides the rows.
#[derive(Clone, Copy, Debug)]
pub struct RotaryArgs<'a> {
    /// Elements from one token's row to the next's (the rotated heads are
    /// read in place from wider rows, such as fused qkv).
    pub row_stride: usize,
    /// Heads rotated at the start of each row.
    pub num_heads: usize,
    /// Width of a head, even: pairs of elements are rotated.
    pub head_dim: usize,
    /// Each token's position, the row of `cos` and `sin` it reads.
    pub positions: &'a [u32],
    /// Cosines of the rotation angles: `[positions, head_dim / 2]`, f32.
    pub cos: &'a [f32],
    /// Sines of the same angles, laid out as `cos`.
    pub sin: &'a [f32],
    /// Which elements form a pair.
    pub style: RotaryStyle,
}

/// The kernels of one element type, host data in and out.
pub trait KernelBackend<T: Element> {
    /// `tm_rms_norm` over rows of `weight.len()`.
    fn rms_norm(&self, x: &[T], weight: &[T], eps: f32) -> Result<Vec<T>>;
    /// `tm_fused_add_rms_norm`: (the new residual, the normalised rows).
    fn fused_add_rms_norm(
        &self,
        x: &[T],
        residual: &[T],
        weight: &[T],
        eps: f32,
    ) -> Result<(Vec<T>, Vec<T>)>;
    /// `tm_silu_and_mul` over rows `[gate | up]` of `2 * width`.
    fn silu_and_mul(&self, gate_up: &[T], width: usize) -> Result<Vec<T>>;
    /// `tm_rotary` applied to `rows`; returns the rotated rows.
    fn rotary(&self, rows: &[T], args: &RotaryArgs<'_>) -> Result<Vec<T>>;
    /// `tm_write_cache`: the step's rows of `src` (`src_stride` apart) into
    /// their slots of `cache` (`[slots, shape.kv_width()]`); returns the cache.
    fn write_cache(
        &self,
        meta: &PagedMeta,
        shape: &AttentionShape,
        src: &[T],
        src_stride: usize,
        cache: &[T],
    ) -> Result<Vec<T>>;
    /// Paged attention of the case's step: the decode kernels for a
    /// decode-only step, split as for a GPU of `multiprocessors` SMs and
    /// planned for contexts up to `context_capacity` (as a CUDA graph is);
    /// the prefill kernel otherwise.
    fn paged_attention(
        &self,
        case: &AttentionCase<T>,
        multiprocessors: usize,
        context_capacity: Option<usize>,
    ) -> Result<Vec<T>>;
    /// `tm_copy_blocks`; returns the cache.
    fn copy_blocks(&self, cache: &[T], pairs: &[(u32, u32)], block_elems: usize) -> Result<Vec<T>>;
}

/// What a backend has besides the typed kernels.
pub trait Backend: KernelBackend<f32> + KernelBackend<bf16> + KernelBackend<f16> {
    /// Streaming multiprocessors the decode split plans for.
    fn multiprocessors(&self) -> Result<usize>;
    /// `tm_sample_f32` over `[params.len(), vocab]` logits.
    fn sample(
        &self,
        logits: &[f32],
        vocab: usize,
        params: &[SamplingParamsRow],
    ) -> Result<SampleOutputs>;
}

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
    /// `None` if the output held a NaN or differed where it must not.
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

/// One line: verdict, kernel, type, error, bound and shape.
impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:<20} {:<5} {:<10} tol {:<8} {}",
            if self.passed { "ok  " } else { "FAIL" },
            self.kernel,
            self.dtype,
            self.max_error
                .map_or("NaN".to_string(), |e| format!("{e:.2e}")),
            self.tolerance,
            self.shape
        )
    }
}

/// Runs every check with inputs drawn from `seed`.
pub fn check_all<B: Backend>(backend: &B, seed: u64) -> Result<Vec<CheckReport>> {
    let sms = backend.multiprocessors()?;
    let mut rng = Rng::new(seed);
    let mut reports = check_type::<f32, B>(backend, &mut rng, sms)?;
    reports.extend(check_type::<bf16, B>(backend, &mut rng, sms)?);
    reports.extend(check_type::<f16, B>(backend, &mut rng, sms)?);
    reports.extend(check_sampling(backend, seed));
    Ok(reports)
}

/// Runs the checks of one element type.
pub fn check_type<T: Element, B: KernelBackend<T>>(
    backend: &B,
    rng: &mut Rng,
    sms: usize,
) -> Result<Vec<CheckReport>> {
    let mut reports = Vec::new();
    let tol = T::TOLERANCE;

    for (rows, width) in [(1, 1), (3, 7), (5, 576), (2, 4096), (1, 4097)] {
        let x: Vec<T> = rng.values(rows * width, -3.0, 3.0);
        let residual: Vec<T> = rng.values(rows * width, -3.0, 3.0);
        let weight: Vec<T> = rng.values(width, -1.5, 1.5);
        let got = to_f32_vec(&backend.rms_norm(&x, &weight, 1e-5)?);
        let want = to_f32_vec(&reference::norm::rms_norm(&x, &weight, 1e-5));
        reports.push(CheckReport::new(
            "rms_norm",
            T::NAME,
            format!("{rows}x{width}"),
            compare(&got, &want, 0.05),
            tol,
        ));

        let (got_residual, got) = backend.fused_add_rms_norm(&x, &residual, &weight, 1e-5)?;
        let (want_residual, want) =
            reference::norm::fused_add_rms_norm(&x, &residual, &weight, 1e-5);
        let err = compare(&to_f32_vec(&got), &to_f32_vec(&want), 0.05)
            .filter(|_| got_residual == want_residual);
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
        let got = to_f32_vec(&backend.silu_and_mul(&gate_up, width)?);
        let want = to_f32_vec(&reference::activation::silu_and_mul(&gate_up, width));
        reports.push(CheckReport::new(
            "silu_and_mul",
            T::NAME,
            format!("{rows}x{width}"),
            compare(&got, &want, 1e-2),
            tol,
        ));
    }

    for style in [RotaryStyle::Neox, RotaryStyle::Interleaved] {
        for (tokens, heads, head_dim, extra) in [(1, 1, 2, 0), (3, 5, 64, 7), (4, 40, 128, 1024)] {
            let (cos, sin) = rotary_tables(300, head_dim);
            let stride = heads * head_dim + extra;
            let rows: Vec<T> = rng.values(tokens * stride, -4.0, 4.0);
            let positions: Vec<u32> = (0..tokens).map(|_| rng.range(0, 300) as u32).collect();
            let args = RotaryArgs {
                row_stride: stride,
                num_heads: heads,
                head_dim,
                positions: &positions,
                cos: &cos,
                sin: &sin,
                style,
            };
            let got = to_f32_vec(&backend.rotary(&rows, &args)?);
            let mut want = rows.clone();
            reference::rotary::rotate(
                &mut want, stride, heads, head_dim, &positions, &cos, &sin, style,
            );
            reports.push(CheckReport::new(
                "rotary",
                T::NAME,
                format!("{style:?} {tokens} tokens x {heads} heads of {head_dim} (+{extra})"),
                compare(&got, &to_f32_vec(&want), 0.05),
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
                // The cache write: the step's rows (3 elements apart) into
                // the cache as drawn.
                let kv_width = shape.kv_width();
                let src: Vec<T> = rng.values(c.meta.num_tokens() * (kv_width + 3), -2.0, 2.0);
                let got = backend.write_cache(&c.meta, &shape, &src, kv_width + 3, &c.k_cache)?;
                let mut want = c.k_cache.clone();
                reference::cache::write_cache(
                    &c.meta.slot_mapping,
                    kv_width,
                    &src,
                    kv_width + 3,
                    &mut want,
                );
                reports.push(CheckReport::new(
                    "write_cache",
                    T::NAME,
                    words.clone(),
                    (got == want).then_some(0.0),
                    0.0,
                ));

                // Decode batches go through the decode kernels split for
                // this GPU and split as finely as the plan allows.
                let splits: &[usize] = if kind == "decode" {
                    &[sms, 100_000]
                } else {
                    &[sms]
                };
                for &split_sms in splits {
                    let got = to_f32_vec(&backend.paged_attention(&c, split_sms, None)?);
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
                    reports.push(CheckReport::new(
                        &format!("paged_{kind}"),
                        T::NAME,
                        format!("{words}, {split_sms} SMs"),
                        compare(&got, &to_f32_vec(&want), testing::ATTENTION_OUTPUT_SCALE),
                        tol * 2.0,
                    ));
                }
                if kind == "decode" {
                    reports.extend(check_graph_step(backend, rng, &c, sms, &words)?);
                }
            }
        }
    }

    let block_elems = 16 * 3 * 64;
    let cache: Vec<T> = rng.values(10 * block_elems, -2.0, 2.0);
    let pairs = [(0u32, 7u32), (3, 1), (9, 4)];
    let got = backend.copy_blocks(&cache, &pairs, block_elems)?;
    let mut want = cache.clone();
    reference::cache::copy_blocks(&pairs, block_elems, &mut want);
    reports.push(CheckReport::new(
        "copy_blocks",
        T::NAME,
        "3 pairs of 10 blocks".into(),
        (got == want).then_some(0.0),
        0.0,
    ));
    Ok(reports)
}

/// A decode step as a CUDA graph replays it: padded to a captured batch
/// of 8 sequences (padding rows write no cache slot and read block 0),
/// block tables wider than needed, and the flash-decoding split planned for
/// the step's context class rather than its longest context.
fn check_graph_step<T: Element, B: KernelBackend<T>>(
    backend: &B,
    rng: &mut Rng,
    case: &AttentionCase<T>,
    sms: usize,
    words: &str,
) -> Result<Vec<CheckReport>> {
    const BATCH: usize = 8;
    let shape = case.shape;
    let meta = case.meta.padded_decode(BATCH, case.meta.max_blocks + 3)?;
    let mut q = case.q.clone();
    q.extend(rng.values::<T>(
        (BATCH - case.meta.num_tokens()) * shape.q_row_stride,
        -2.0,
        2.0,
    ));
    let padded = AttentionCase {
        meta,
        q,
        ..case.clone()
    };
    let words = format!("{words}, padded to {BATCH}");

    let kv_width = shape.kv_width();
    let src: Vec<T> = rng.values(BATCH * kv_width, -2.0, 2.0);
    let got = backend.write_cache(&padded.meta, &shape, &src, kv_width, &case.k_cache)?;
    let mut want = case.k_cache.clone();
    reference::cache::write_cache(
        &padded.meta.slot_mapping,
        kv_width,
        &src,
        kv_width,
        &mut want,
    );
    let mut reports = vec![CheckReport::new(
        "write_cache",
        T::NAME,
        words.clone(),
        (got == want).then_some(0.0),
        0.0,
    )];

    let capacity = geometry::graph_context_class(case.meta.max_context, 8192);
    let got = to_f32_vec(&backend.paged_attention(&padded, sms, Some(capacity))?);
    let plan = geometry::decode_plan(shape.num_heads, BATCH, capacity, shape.head_dim, sms)?;
    let want = reference::attention::paged_decode(
        &padded.meta,
        &shape,
        &plan,
        &padded.q,
        &padded.k_cache,
        &padded.v_cache,
    );
    reports.push(CheckReport::new(
        "paged_decode",
        T::NAME,
        format!("{words}, planned for {capacity}, {sms} SMs"),
        compare(&got, &to_f32_vec(&want), testing::ATTENTION_OUTPUT_SCALE),
        T::TOLERANCE * 2.0,
    ));
    Ok(reports)
}

/// The largest relative error of `got` against `want` (`None` on a NaN or
/// a length mismatch).
fn compare(got: &[f32], want: &[f32], floor: f32) -> Option<f32> {
    if got.len() != want.len() {
        return None;
    }
    max_relative_error(got, want, floor)
}

/// Llama's rotary tables (base 10000) for positions `0..positions`.
fn rotary_tables(positions: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let angles: Vec<f32> = (0..positions * half)
        .map(|i| (i / half) as f32 * 10000f32.powf(-2.0 * (i % half) as f32 / head_dim as f32))
        .collect();
    (
        angles.iter().map(|a| a.cos()).collect(),
        angles.iter().map(|a| a.sin()).collect(),
    )
}

/// The vocabularies the sampler is checked on: one token, sizes that are
/// not a whole number of warps or blocks, and real models' (SmolLM 49152,
/// Llama 3 128256).
pub const SAMPLING_VOCABS: [usize; 6] = [1, 7, 1000, 4099, 49_152, 128_256];
/// The batch sizes the sampler is checked with for each vocabulary.
pub const SAMPLING_BATCHES: [usize; 3] = [1, 3, 8];

/// Runs the sampler on fresh random logits (drawn from `seed`) and random
/// parameters of every kind, for each vocabulary and batch size, and
/// compares every output with the reference to the bit; also checks that
/// unused top slots hold [`NO_TOKEN`] and `-inf`, and that a second launch
/// gives the same bits.
pub fn check_sampling<B: Backend>(backend: &B, seed: u64) -> Vec<CheckReport> {
    let mut draws = Draws(seed);
    let mut reports = Vec::new();
    for vocab in SAMPLING_VOCABS {
        for rows in SAMPLING_BATCHES {
            let logits = random_logits(&mut draws, rows, vocab);
            let params: Vec<SamplingParamsRow> = (0..rows)
                .map(|r| random_params(&mut draws, r, vocab))
                .collect();
            let outcome = check_sampling_case(backend, &logits, vocab, &params);
            let detail = match &outcome {
                Ok(()) => format!("{rows} rows bit-exact, twice"),
                Err(mismatch) => mismatch.to_string(),
            };
            reports.push(CheckReport::new(
                "sample",
                "f32",
                format!("{rows}x{vocab}: {detail}"),
                outcome.is_ok().then_some(0.0),
                0.0,
            ));
        }
    }
    reports
}

/// Why a sampler case failed; its text goes into the case's report.
#[derive(Debug, thiserror::Error)]
enum SamplingMismatch {
    /// The reference refused the case (the case generator's bug).
    #[error("{0}")]
    Reference(KernelError),
    /// The backend refused or failed the launch.
    #[error("{0}")]
    Backend(KernelError),
    /// A row's token, logprob or top alternatives differ from the
    /// reference's bits.
    #[error("launch {launch} row {row} ({params:?}): kernel {kernel:?}, reference {reference:?}")]
    Row {
        /// 0 for the first launch, 1 for the repeat.
        launch: usize,
        /// The row.
        row: usize,
        /// Its parameters.
        params: SamplingParamsRow,
        /// What the kernel gave.
        kernel: SampledRow,
        /// What the reference gives.
        reference: SampledRow,
    },
    /// Top slots past a row's `num_logprobs` hold something other than
    /// [`NO_TOKEN`] and `-inf`.
    #[error("launch {launch} row {row}: unused top slots written")]
    UnusedSlots {
        /// 0 for the first launch, 1 for the repeat.
        launch: usize,
        /// The row.
        row: usize,
    },
    /// The second launch on the same inputs gave other bits than the first.
    #[error("a second launch gave other bits")]
    NotRepeatable,
}

fn check_sampling_case<B: Backend>(
    backend: &B,
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParamsRow],
) -> std::result::Result<(), SamplingMismatch> {
    let want = reference::sampling::sample_rows(logits, vocab, params)
        .map_err(SamplingMismatch::Reference)?;
    let mut first: Option<SampleOutputs> = None;
    for launch in 0..2 {
        let outputs = backend
            .sample(logits, vocab, params)
            .map_err(SamplingMismatch::Backend)?;
        for (r, (g, w)) in outputs.rows(params).iter().zip(&want).enumerate() {
            if !g.bit_eq(w) {
                return Err(SamplingMismatch::Row {
                    launch,
                    row: r,
                    params: params[r],
                    kernel: g.clone(),
                    reference: w.clone(),
                });
            }
        }
        for (r, w) in want.iter().enumerate() {
            let slots = r * MAX_TOP_LOGPROBS + w.top.len()..(r + 1) * MAX_TOP_LOGPROBS;
            let unused_ok = outputs.top_ids[slots.clone()]
                .iter()
                .all(|&id| id == NO_TOKEN)
                && outputs.top_logprobs[slots]
                    .iter()
                    .all(|&lp| lp == f32::NEG_INFINITY);
            if !unused_ok {
                return Err(SamplingMismatch::UnusedSlots { launch, row: r });
            }
        }
        if let Some(first) = &first {
            if !first.bit_eq(&outputs) {
                return Err(SamplingMismatch::NotRepeatable);
            }
        }
        first = Some(outputs);
    }
    Ok(())
}

/// A counter-based generator for the sampler's inputs.
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
