//! Sampling: the CPU reference of `kernels/sampling.cu`, bit-exact with it.
//!
//! Per row of logits `l` (f32, `vocab` wide) and its [`SamplingParamsRow`]:
//!
//! 1. Greedy (`temperature <= 0`): the argmax of `l`, lowest index on ties.
//! 2. Otherwise `z_i = (l_i - max l) / temperature` (so `z <= 0`, and the
//!    largest is exactly `+0`).
//! 3. top-k (`0 < k < vocab`): keep `z_i >= τ_k`, the k-th largest z (ties at
//!    the threshold are all kept). τ_k is found without sorting, by
//!    bisection over [`order_key`]: the largest key that at least k keys
//!    reach.
//! 4. top-p (`top_p < 1`): with `S` the mass `Σ e^z` of the kept tokens,
//!    keep also `z_i >= τ_p`, the largest threshold whose kept mass at or
//!    above it is still `>= top_p * S` (again a bisection over keys).
//! 5. Gumbel-max: the token is the argmax over kept `i` of `z_i + g_i`, with
//!    `g_i = -ln(-ln u_i)` and `u_i` = [`uniform`]`(seed, step, i)`, a
//!    counter-based hash: a draw depends on nothing but the row's inputs, so
//!    a replay (or a preempted and recomputed sequence) draws the same token.
//! 6. Log-probabilities of the model's own distribution (log_softmax of `l`,
//!    no temperature): the chosen token's, and the top `num_logprobs`
//!    (descending, lowest index first on ties).
//!
//! Why bit-exact rather than close: a top-p boundary or a Gumbel near tie
//! that flipped between GPU and reference would make the GPU check flaky.
//! So both use the same exp and log ([`portable_exp`], [`portable_ln`]:
//! FreeBSD's expf and logf, under one ulp, each operation rounded on its
//! own), and this file replays the kernel's order of float additions
//! (`Block`). Max, argmax and counts do not depend on order.
//!
//! Inputs that would poison the arithmetic are defined, not refused: a NaN
//! logit is an impossible token (`-inf`), `+inf` is `f32::MAX`, a row with
//! no finite logit is uniform. Parameters that have no meaning (a NaN or
//! infinite temperature, a NaN top_p, more than 20 logprobs) are refused by
//! [`validate`].
//!
//! The randomness: 23 bits per token, so `u` and `1 - u` are exact and `g`
//! lies in [-2.80, 16.6]. A token more than 19.4 below the best (in `z`) can
//! therefore never be drawn; its true probability is under 4e-9 per token.

use crate::{KernelError, Result};

/// The width of the top-logprob outputs per row: rows ask for 0..=20
/// alternatives (the most the OpenAI API lets a client ask for).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The id in unused top-logprob slots of the kernel's outputs.
pub const NO_TOKEN: u32 = u32::MAX;
/// The kernel's largest block.
pub const MAX_THREADS: u32 = 1024;

const WARP: usize = 32;
/// The order key of `+0.0`, the largest a scaled logit can have.
const KEY_OF_ZERO: u32 = 0x8000_0000;
const STEP_SALT: u64 = 0x6a09_e667_f3bc_c909;
const INDEX_MUL: u64 = 0xd1b5_4a32_d192_ed03;

/// One row's sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParamsRow {
    /// `<= 0`: greedy. Must be finite.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 (or `>= vocab`): off.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens holding this share of the
    /// mass; `>= 1`: off. Must not be NaN.
    pub top_p: f32,
    /// The sequence's seed.
    pub seed: u64,
    /// The row's counter (the sequence's position): one draw per step.
    pub step: u64,
    /// How many top alternatives to report, 0..=20.
    pub num_logprobs: u32,
}

impl Default for SamplingParamsRow {
    /// Greedy, no logprobs.
    fn default() -> Self {
        SamplingParamsRow {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            step: 0,
            num_logprobs: 0,
        }
    }
}

impl SamplingParamsRow {
    /// Refuses parameters that have no meaning.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() {
            return Err(KernelError::Invalid(format!(
                "temperature {} is not finite",
                self.temperature
            )));
        }
        if self.top_p.is_nan() {
            return Err(KernelError::Invalid("top_p is NaN".into()));
        }
        if self.num_logprobs as usize > MAX_TOP_LOGPROBS {
            return Err(KernelError::Invalid(format!(
                "{} logprobs asked, at most {MAX_TOP_LOGPROBS}",
                self.num_logprobs
            )));
        }
        Ok(())
    }

    /// The kernel's `TmSamplingParams`: 8 little-endian u32 words
    /// (temperature, top_k, top_p, num_logprobs, seed lo/hi, step lo/hi).
    pub fn encode(&self) -> [u32; 8] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.num_logprobs,
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.step as u32,
            (self.step >> 32) as u32,
        ]
    }
}

/// One row's result.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledRow {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the model's distribution (no temperature).
    pub logprob: f32,
    /// The `min(num_logprobs, vocab)` most likely tokens and their
    /// log-probabilities, descending, lowest index first on ties.
    pub top: Vec<(u32, f32)>,
}

impl SampledRow {
    /// A row from the kernel's outputs: `top_ids` and `top_logprobs` are the
    /// row's 20 slots, of which the first `num_logprobs` that name a token
    /// are kept.
    pub fn from_outputs(
        token: u32,
        logprob: f32,
        top_ids: &[u32],
        top_logprobs: &[f32],
        num_logprobs: u32,
    ) -> Self {
        let top = top_ids
            .iter()
            .zip(top_logprobs)
            .take(num_logprobs as usize)
            .take_while(|(id, _)| **id != NO_TOKEN)
            .map(|(id, lp)| (*id, *lp))
            .collect();
        SampledRow {
            token,
            logprob,
            top,
        }
    }

    /// Whether two rows are the same to the bit (`==` on f32 would call -0
    /// and +0 equal and NaN unequal to itself).
    pub fn bit_eq(&self, other: &SampledRow) -> bool {
        let bits = |r: &SampledRow| {
            let top: Vec<_> = r.top.iter().map(|(id, lp)| (*id, lp.to_bits())).collect();
            (r.token, r.logprob.to_bits(), top)
        };
        bits(self) == bits(other)
    }
}

/// The sampling kernel's outputs, on the host: `tokens` and
/// `token_logprobs` are `[rows]`, `top_ids` and `top_logprobs` `[rows, 20]`
/// (slots past a row's `num_logprobs`, or past the vocabulary, hold
/// [`NO_TOKEN`] and `-inf`).
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutputs {
    /// The chosen token of each row: `[rows]`.
    pub tokens: Vec<u32>,
    /// The chosen token's log-probability under the model's distribution
    /// (log_softmax of the logits, no temperature): `[rows]`.
    pub token_logprobs: Vec<f32>,
    /// Each row's `num_logprobs` most likely tokens, descending, lowest
    /// index first on ties: `[rows, 20]`.
    pub top_ids: Vec<u32>,
    /// Their log-probabilities: `[rows, 20]`.
    pub top_logprobs: Vec<f32>,
}

impl SampleOutputs {
    /// The rows, each with the top alternatives its parameters asked for.
    pub fn rows(&self, params: &[SamplingParamsRow]) -> Vec<SampledRow> {
        params
            .iter()
            .enumerate()
            .map(|(r, p)| {
                let slots = r * MAX_TOP_LOGPROBS..(r + 1) * MAX_TOP_LOGPROBS;
                SampledRow::from_outputs(
                    self.tokens[r],
                    self.token_logprobs[r],
                    &self.top_ids[slots.clone()],
                    &self.top_logprobs[slots],
                    p.num_logprobs,
                )
            })
            .collect()
    }

    /// Whether two launches wrote the same bits.
    pub fn bit_eq(&self, other: &SampleOutputs) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.tokens == other.tokens
            && self.top_ids == other.top_ids
            && bits(&self.token_logprobs) == bits(&other.token_logprobs)
            && bits(&self.top_logprobs) == bits(&other.top_logprobs)
    }
}

/// How `tm_sample_f32` is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingGeometry {
    /// Blocks: one per row.
    pub grid: u32,
    /// Threads per block: a whole number of warps, no more than the row
    /// needs, at most 1024.
    pub threads: u32,
    /// Dynamic shared memory: none (the reduction scratch is static).
    pub shared_bytes: u32,
}

/// The launch of `rows` rows of `vocab` logits. The block size also fixes
/// the order of the kernel's float sums, which the reference replays.
pub fn sampling_geometry(rows: usize, vocab: usize) -> Result<SamplingGeometry> {
    if vocab == 0 {
        return Err(KernelError::Invalid("empty vocabulary".into()));
    }
    // Token ids are u32 with u32::MAX reserved; grid.x is at most 2^31 - 1.
    if vocab > i32::MAX as usize {
        return Err(KernelError::Unsupported(format!("vocabulary of {vocab}")));
    }
    let grid = u32::try_from(rows)
        .ok()
        .filter(|r| *r <= i32::MAX as u32)
        .ok_or_else(|| KernelError::Unsupported(format!("{rows} rows in one launch")))?;
    let threads = (vocab.div_ceil(WARP) * WARP).min(MAX_THREADS as usize) as u32;
    Ok(SamplingGeometry {
        grid,
        threads,
        shared_bytes: 0,
    })
}

/// Checks a call before it is computed or launched: the shapes, the
/// vocabulary's limits and every row's parameters.
pub fn validate(logits_len: usize, vocab: usize, params: &[SamplingParamsRow]) -> Result<()> {
    sampling_geometry(params.len(), vocab)?;
    if params.len().checked_mul(vocab) != Some(logits_len) {
        return Err(KernelError::Invalid(format!(
            "{logits_len} logits for {} rows of {vocab}",
            params.len()
        )));
    }
    params.iter().try_for_each(SamplingParamsRow::validate)
}

/// Samples every row of `logits` (`[params.len(), vocab]`, row-major), as
/// the kernel does, to the bit.
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParamsRow],
) -> Result<Vec<SampledRow>> {
    let block = Block::checked(logits.len(), vocab, params)?;
    Ok(logits
        .chunks_exact(vocab)
        .zip(params)
        .map(|(row, p)| sample_row(row, p, &block))
        .collect())
}

/// The token each row of `logits` draws, as [`sample_rows`] draws it (the
/// same token to the bit), without the log-softmax normaliser and the
/// alternatives that only logprobs need: for a batch where no request asked
/// for logprobs, the normaliser's pass of exponentials over the vocabulary
/// is most of the sampler's time on a CPU.
pub fn sample_tokens(
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParamsRow],
) -> Result<Vec<u32>> {
    let block = Block::checked(logits.len(), vocab, params)?;
    Ok(logits
        .chunks_exact(vocab)
        .zip(params)
        .map(|(row, p)| {
            if p.temperature <= 0.0 {
                greedy_token(row)
            } else {
                choose(&Prepared::new(row), p, &block).map_or(NO_TOKEN, |(_, i)| i)
            }
        })
        .collect())
}

/// The greedy token of a row in one pass: the largest sanitized logit,
/// lowest index on ties. The same token as [`choose`]'s greedy branch (a
/// row with no logit above -inf reads as uniform there and here gives the
/// first index either way), without its per-index indirection.
fn greedy_token(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in row.iter().enumerate() {
        let v = sanitize(l);
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Step 3 of a row: the token, greedy or drawn, with its key.
fn choose(prepared: &Prepared<'_>, p: &SamplingParamsRow, block: &Block) -> Option<(f32, u32)> {
    let vocab = prepared.row.len();
    // (validate refused a NaN temperature)
    if p.temperature <= 0.0 {
        argmax(vocab, |i| Some(prepared.logit(i)))
    } else {
        let cut = prepared.cut(p, block);
        let key = row_key(p.seed, p.step);
        argmax(vocab, |i| {
            let z = prepared.scaled(i, p.temperature);
            (order_key(z) >= cut).then(|| z + gumbel_at(key, i as u32))
        })
    }
}

fn sample_row(row: &[f32], p: &SamplingParamsRow, block: &Block) -> SampledRow {
    let vocab = row.len();
    // 1. The largest logit (and the uniform case).
    let prepared = Prepared::new(row);
    let (m, logit) = (prepared.max, |i: usize| prepared.logit(i));

    // 2. The log-softmax normaliser.
    let log_norm = portable_ln(block.sum(vocab, |i| portable_exp(logit(i) - m)));

    // 3. The token.
    let chosen = choose(&prepared, p, block);
    // Never None (the row's max is always kept); the kernel writes the same.
    let (token, logprob) = match chosen {
        Some((_, i)) => (i, (logit(i as usize) - m) - log_norm),
        None => (NO_TOKEN, f32::NEG_INFINITY),
    };

    // 4. The top alternatives, by rounds of "the best below the last taken".
    let mut top = Vec::new();
    let mut previous: Option<(f32, u32)> = None;
    for _ in 0..(p.num_logprobs as usize).min(MAX_TOP_LOGPROBS) {
        let found = argmax(vocab, |i| {
            let v = logit(i);
            let below = match previous {
                None => true,
                Some((pv, pi)) => v < pv || (v == pv && i as u32 > pi),
            };
            below.then_some(v)
        });
        let Some((v, i)) = found else { break };
        top.push((i, (v - m) - log_norm));
        previous = found;
    }
    SampledRow {
        token,
        logprob,
        top,
    }
}

/// A row with its max found: the logits the later passes read.
struct Prepared<'a> {
    row: &'a [f32],
    /// No logit above -inf: every logit reads as 0.
    uniform: bool,
    /// The largest sanitized logit (0 if uniform).
    max: f32,
}

impl<'a> Prepared<'a> {
    fn new(row: &'a [f32]) -> Self {
        let max = row
            .iter()
            .fold(f32::NEG_INFINITY, |m, &l| m.max(sanitize(l)));
        let uniform = max == f32::NEG_INFINITY;
        Prepared {
            row,
            uniform,
            max: if uniform { 0.0 } else { max },
        }
    }

    fn logit(&self, i: usize) -> f32 {
        if self.uniform {
            0.0
        } else {
            sanitize(self.row[i])
        }
    }

    /// `z_i = (l_i - max) / temperature`, at most `+0`.
    fn scaled(&self, i: usize, temperature: f32) -> f32 {
        (self.logit(i) - self.max) / temperature
    }

    /// The order key below which top-k and top-p drop a token (0: none
    /// dropped), for a row that samples (`temperature > 0`).
    fn cut(&self, p: &SamplingParamsRow, block: &Block) -> u32 {
        let vocab = self.row.len();
        if !(p.top_k > 0 && (p.top_k as usize) < vocab) && p.top_p >= 1.0 {
            return 0;
        }
        // Every bisection step reads each token's key (and for top-p its
        // exp) again: computed once here, the same values the kernel
        // computes at each step, so the sums keep their bits.
        let keys: Vec<u32> = (0..vocab)
            .map(|i| order_key(self.scaled(i, p.temperature)))
            .collect();
        let mut cut = 0u32;
        if p.top_k > 0 && (p.top_k as usize) < vocab {
            // The k-th largest z: the largest key that at least k keys reach.
            cut = bisect(0, KEY_OF_ZERO, |key| {
                keys.iter().filter(|&&k| k >= key).count() >= p.top_k as usize
            });
        }
        if p.top_p < 1.0 {
            let exps: Vec<f32> = (0..vocab)
                .map(|i| portable_exp(self.scaled(i, p.temperature)))
                .collect();
            // The mass of the kept tokens at or above `key`.
            let mass = |key: u32| block.sum(vocab, |i| if keys[i] >= key { exps[i] } else { 0.0 });
            let target = p.top_p * mass(cut);
            // The highest threshold whose nucleus still holds top_p of it.
            cut = bisect(cut, KEY_OF_ZERO, |key| mass(key) >= target);
        }
        cut
    }
}

/// The kernel's block, for replaying its float sums.
struct Block {
    threads: usize,
}

impl Block {
    /// The kernel's block for `params.len()` rows of `vocab`, once the call
    /// is checked.
    fn checked(logits_len: usize, vocab: usize, params: &[SamplingParamsRow]) -> Result<Block> {
        validate(logits_len, vocab, params)?;
        let geometry = sampling_geometry(params.len(), vocab)?;
        Ok(Block {
            threads: geometry.threads as usize,
        })
    }

    /// `Σ term(i)` for `i < n` in the kernel's order: thread t adds
    /// `t, t + threads, ...` in turn; each warp combines its lanes by an xor
    /// butterfly (lane l adds lane `l ^ off` for off = 16, 8, 4, 2, 1); the
    /// warps' sums are added in warp order.
    fn sum(&self, n: usize, term: impl Fn(usize) -> f32) -> f32 {
        // Round by round over contiguous chunks: thread t's partial still
        // adds t, t + threads, ... in that order, so the bits are the
        // kernel's, and the loop reads memory in order.
        let mut partial = vec![0f32; self.threads];
        for start in (0..n).step_by(self.threads) {
            for (t, acc) in partial.iter_mut().enumerate().take(n - start) {
                *acc += term(start + t);
            }
        }
        partial
            .chunks_exact(WARP)
            .map(butterfly)
            .reduce(|total, warp| total + warp)
            .unwrap_or(0.0)
    }
}

fn butterfly(lanes: &[f32]) -> f32 {
    let mut v = [0f32; WARP];
    v.copy_from_slice(lanes);
    let mut off = WARP / 2;
    while off > 0 {
        let before = v;
        for (lane, value) in v.iter_mut().enumerate() {
            *value = before[lane] + before[lane ^ off];
        }
        off /= 2;
    }
    v[0]
}

/// The kernel's argmax: the largest value among the `Some`s, lowest index
/// on ties (order-independent, so a plain scan gives the kernel's answer).
fn argmax(n: usize, value: impl Fn(usize) -> Option<f32>) -> Option<(f32, u32)> {
    let mut best: Option<(f32, u32)> = None;
    for i in 0..n {
        if let Some(v) = value(i) {
            if best.is_none_or(|(bv, _)| v > bv) {
                best = Some((v, i as u32));
            }
        }
    }
    best
}

/// The largest `k` in `[lo, hi]` with `pred(k)`, given `pred(lo)` and `pred`
/// true up to some point and false above it (`hi <= 2^31`).
fn bisect(mut lo: u32, mut hi: u32, mut pred: impl FnMut(u32) -> bool) -> u32 {
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if pred(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Logits as the sampler sees them: NaN is `-inf` (never drawn), `+inf` is
/// `f32::MAX`, `-0.0` is `+0.0` (so the max does not depend on order).
pub fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else if l == f32::INFINITY {
        f32::MAX
    } else if l == 0.0 {
        0.0
    } else {
        l
    }
}

/// A u32 whose unsigned order is the order of the floats (`-0.0` and `+0.0`
/// equal): flip the sign bit of positives, every bit of negatives. Not for
/// NaN.
pub fn order_key(x: f32) -> u32 {
    let bits = match x.to_bits() {
        0x8000_0000 => 0,
        bits => bits,
    };
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// SplitMix64's finaliser (Steele, Lea and Flood 2014): a bijection of u64
/// that mixes every input bit into every output bit.
pub fn splitmix64(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The per-row half of the hash, which the kernel computes once per row.
fn row_key(seed: u64, step: u64) -> u64 {
    seed ^ splitmix64(step ^ STEP_SALT)
}

fn uniform_at(row_key: u64, index: u32) -> f32 {
    let x = splitmix64(row_key ^ u64::from(index).wrapping_mul(INDEX_MUL));
    // 23 bits, centred: (k + 0.5) / 2^23 and its complement are exact.
    ((x >> 41) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

fn gumbel_at(row_key: u64, index: u32) -> f32 {
    -portable_ln(-portable_ln(uniform_at(row_key, index)))
}

/// The uniform number in (0, 1) that token `index` of a row with `seed` and
/// `step` draws: `(k + 0.5) / 2^23` for 23 hashed bits `k`.
pub fn uniform(seed: u64, step: u64, index: u32) -> f32 {
    uniform_at(row_key(seed, step), index)
}

/// The Gumbel noise `-ln(-ln u)` added to token `index`'s scaled logit.
pub fn gumbel(seed: u64, step: u64, index: u32) -> f32 {
    gumbel_at(row_key(seed, step), index)
}

/// `e^x` as the kernel computes it (`tm_exp`): FreeBSD's expf, under one ulp,
/// every operation rounded on its own. Subnormal results are kept.
pub fn portable_exp(x: f32) -> f32 {
    const LN2_HI: u32 = 0x3f31_7200;
    const LN2_LO: u32 = 0x35bf_be8e;
    const INV_LN2: u32 = 0x3fb8_aa3b;
    const P1: u32 = 0x3e2a_aaa8;
    const P2: u32 = 0xbb35_5215;
    if x.is_nan() {
        return x;
    }
    if x > f32::from_bits(0x42b1_7180) {
        return f32::INFINITY;
    }
    if x < f32::from_bits(0xc2cf_f1b5) {
        return 0.0;
    }
    let nearest = if x < 0.0 { -0.5 } else { 0.5 };
    // Truncation toward zero, as __float2int_rz; |k| <= 150.
    let k = (f32::from_bits(INV_LN2) * x + nearest) as i32;
    let t = k as f32;
    let hi = x - t * f32::from_bits(LN2_HI);
    let lo = t * f32::from_bits(LN2_LO);
    let r = hi - lo;
    let rr = r * r;
    let c = r - rr * (f32::from_bits(P1) + rr * f32::from_bits(P2));
    let q = (r * c) / (2.0 - c);
    let y = 1.0 - ((lo - q) - hi);
    if k >= -125 {
        if k == 128 {
            return y * 2.0 * f32::from_bits(0x7f00_0000);
        }
        return y * f32::from_bits(((0x7f + k) as u32) << 23);
    }
    // A subnormal result: scale in two steps so that only the last rounds.
    y * f32::from_bits(((0x7f + k + 100) as u32) << 23) * f32::from_bits(0x0d80_0000)
}

/// `ln x` as the kernel computes it (`tm_log`): FreeBSD's logf, under one
/// ulp, every operation rounded on its own.
pub fn portable_ln(x: f32) -> f32 {
    const LG1: u32 = 0x3f2a_aaaa;
    const LG2: u32 = 0x3ecc_ce13;
    const LG3: u32 = 0x3e91_e9ee;
    const LG4: u32 = 0x3e78_9e26;
    const LN2_HI: u32 = 0x3f31_7180;
    const LN2_LO: u32 = 0x3717_f7d1;
    let mut ix = x.to_bits();
    let mut k = 0i32;
    if ix == 0 || ix == 0x8000_0000 {
        return f32::NEG_INFINITY;
    }
    if ix >> 31 != 0 {
        return f32::from_bits(0x7fc0_0000);
    }
    if ix >= 0x7f80_0000 {
        return x;
    }
    if ix < 0x0080_0000 {
        k = -25;
        ix = (x * 33_554_432.0).to_bits();
    }
    // x = m * 2^k with m in [sqrt(2)/2, sqrt(2)).
    ix += 0x3f80_0000 - 0x3f35_04f3;
    k += (ix >> 23) as i32 - 0x7f;
    ix = (ix & 0x007f_ffff) + 0x3f35_04f3;
    let f = f32::from_bits(ix) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (f32::from_bits(LG2) + w * f32::from_bits(LG4));
    let t2 = z * (f32::from_bits(LG1) + w * f32::from_bits(LG3));
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    let dk = k as f32;
    let mut acc = s * (hfsq + r);
    acc += dk * f32::from_bits(LN2_LO);
    acc -= hfsq;
    acc += f;
    acc + dk * f32::from_bits(LN2_HI)
}

#[cfg(test)]
mod tests;
