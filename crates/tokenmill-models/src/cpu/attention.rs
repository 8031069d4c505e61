//! Causal attention on the CPU that reads keys and values where they lie in
//! the paged cache, block by block, for prefill chunks and decode tokens
//! alike: the CPU reference of the paged-attention kernels, and the CPU
//! forward's attention.
//!
//! Why one path for both: a query's output is computed from its own row, its
//! position and the sequence's cached rows only, by the same operations in
//! the same order whether it comes alone (decode), in a prompt chunk of any
//! size, or beside other sequences in a batch. So a sequence recomputed after
//! preemption, continued from cached prefix blocks, prefilled in chunks or
//! batched with others gets bit for bit the keys, values and tokens it would
//! have had alone. (Gathering the context into a contiguous tensor per
//! sequence and layer, the path this replaces, cost more than the matmuls
//! once those batched well.)
//!
//! Per query head: scores `q.k_p / sqrt(d)` for positions `p` in order, then
//! `exp(s_p - max)` and their sum in order, then `sum_p e_p v_p` accumulated
//! in order with one fused multiply-add per element, divided by the sum.
//! The AVX2 path performs exactly those operations (a dot product keeps 8
//! lanes and adds them in a fixed tree, which the scalar path mirrors), so
//! both give the same bits.

use crate::forward::batch::SequenceChunk;
use crate::forward::kv_cache::slot_of;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; each serves `num_heads / num_kv_heads` query heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
}

impl AttentionShape {
    fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Softmax attention of every query of a batch over its sequence's context.
///
/// `q` is `[tokens, num_heads * head_dim]`, the chunks' tokens one after
/// another; a chunk's token `i` sits at position `context_len - num_tokens +
/// i` and sees positions `0..=` its own. `keys` and `values` are the cache
/// rows `[slots, num_kv_heads * head_dim]`, which must already hold the
/// chunks' own keys and values; they are found through each chunk's block
/// table. Returns `[tokens, num_heads * head_dim]`.
///
/// # Panics
/// If the slices do not have the sizes above or a block table does not cover
/// its context (the forward validates batches before this).
pub fn paged_attention(
    shape: AttentionShape,
    chunks: &[SequenceChunk],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
) -> Vec<f32> {
    let width = shape.num_heads * shape.head_dim;
    paged_attention_strided(shape, chunks, q, width, keys, values)
}

/// [`paged_attention`] with each token's queries at the start of a row of
/// `q_row_stride` floats of `q` (the fused q|k|v rows of a projection).
///
/// # Panics
/// As [`paged_attention`], or if a row is narrower than the queries.
pub fn paged_attention_strided(
    shape: AttentionShape,
    chunks: &[SequenceChunk],
    q: &[f32],
    q_row_stride: usize,
    keys: &[f32],
    values: &[f32],
) -> Vec<f32> {
    let width = shape.num_heads * shape.head_dim;
    let tokens: usize = chunks.iter().map(|c| c.num_tokens).sum();
    assert!(shape.num_kv_heads > 0 && shape.num_heads.is_multiple_of(shape.num_kv_heads));
    assert!(
        q_row_stride >= width,
        "rows of {q_row_stride} for {width} queries"
    );
    assert_eq!(q.len(), tokens * q_row_stride, "queries of {tokens} tokens");
    assert_eq!(keys.len(), values.len());
    // One unit per (token, kv head): the group of query heads that reads the
    // same cached rows, whose outputs are adjacent in the token's row.
    let mut units = Vec::with_capacity(tokens * shape.num_kv_heads);
    let mut work = 0usize;
    let mut row = 0;
    for chunk in chunks {
        for i in 0..chunk.num_tokens {
            let context = chunk.start_position() + i + 1;
            for kv in 0..shape.num_kv_heads {
                units.push(Unit {
                    row,
                    kv,
                    context,
                    block_table: &chunk.block_table,
                });
            }
            work += 2 * context * width;
            row += 1;
        }
    }
    let kernel = Kernel::detect(shape.head_dim);
    let span = shape.group() * shape.head_dim;
    let mut out = vec![0f32; tokens * width];
    let dst = SharedOut(out.as_mut_ptr());
    let run = |u: usize| {
        let unit = &units[u];
        let mut head_out = vec![0f32; span];
        unit.attend(
            shape,
            kernel,
            &q[unit.row * q_row_stride..][..width],
            keys,
            values,
            &mut head_out,
        );
        let at = unit.row * width + unit.kv * span;
        // SAFETY: unit `u` alone writes row `row`, heads of kv head `kv`:
        // `span` floats at `at`, inside `out` (`tokens * width`), which is
        // not touched again until every unit has finished.
        unsafe { std::ptr::copy_nonoverlapping(head_out.as_ptr(), dst.at(at), span) };
    };
    if work < PARALLEL_MIN_MACS {
        (0..units.len()).for_each(run);
    } else {
        super::pool::run(units.len(), &run);
    }
    out
}

/// Rotary position embedding in place: rotates the first `num_heads` heads
/// of each row of `rows` (`[tokens, row_stride]`) by its token's position,
/// with the tables `cos`, `sin` (`[positions, head_dim / 2]`). NeoX style
/// pairs element `i` with `i + head_dim / 2`; the original Llama style pairs
/// `2i` with `2i + 1`. The arithmetic is candle's `rope`/`rope_i`, element by
/// element.
///
/// # Panics
/// If a position is outside the tables, `rows` is not one row of
/// `row_stride` per position, or the heads do not fit a row.
#[allow(clippy::too_many_arguments)]
pub fn rotate(
    rows: &mut [f32],
    row_stride: usize,
    num_heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    neox: bool,
) {
    let half = head_dim / 2;
    assert!(num_heads * head_dim <= row_stride && rows.len() == positions.len() * row_stride);
    for (row, position) in rows.chunks_exact_mut(row_stride).zip(positions) {
        let at = *position as usize * half;
        let (cos, sin) = (&cos[at..at + half], &sin[at..at + half]);
        for head in row[..num_heads * head_dim].chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x, y) = (head[a], head[b]);
                head[a] = x * cos[i] - y * sin[i];
                head[b] = x * sin[i] + y * cos[i];
            }
        }
    }
}

/// The output pointer shared by the units of one call.
struct SharedOut(*mut f32);
// SAFETY: units write disjoint regions through it (see `paged_attention`),
// and `pool::run` returns only after every unit has finished.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `offset` places in (a method, so closures capture the
    /// `Sync` wrapper rather than its raw pointer field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The query heads of one kv head for one token.
struct Unit<'a> {
    row: usize,
    kv: usize,
    /// Positions the token sees: `0..context`.
    context: usize,
    block_table: &'a [u32],
}

impl Unit<'_> {
    /// Writes the group's `group * head_dim` outputs into `out`, reading the
    /// queries from `q`, the token's row.
    fn attend(
        &self,
        shape: AttentionShape,
        kernel: Kernel,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        out: &mut [f32],
    ) {
        let (d, group, ctx) = (shape.head_dim, shape.group(), self.context);
        let queries = &q[self.kv * group * d..][..group * d];
        // Where this kv head's row of each position starts, in both caches.
        let rows: Vec<usize> = (0..ctx)
            .map(|p| {
                let slot = slot_of(self.block_table, shape.block_size, p);
                slot * shape.kv_width() + self.kv * d
            })
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        // Head-major scores: each cached key row is read once for the group.
        let mut scores = vec![0f32; group * ctx];
        kernel.scores(queries, keys, &rows, scale, &mut scores);
        for (g, out) in out.chunks_exact_mut(d).enumerate() {
            let scores = &mut scores[g * ctx..(g + 1) * ctx];
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            kernel.weighted_sum(scores, values, &rows, out);
            for o in out.iter_mut() {
                *o /= sum;
            }
        }
    }
}

/// The code path for this CPU and head width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

const LANES: usize = 8;

impl Kernel {
    fn detect(head_dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if head_dim.is_multiple_of(LANES)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// `out[g * ctx + p] = (q_g . keys[rows[p]..][..d]) * scale` for the
    /// `queries` `q_g` of width `d = queries.len() / heads` and the `ctx =
    /// rows.len()` positions. A dot product keeps 8 lanes, lane `l`
    /// accumulating elements `l, l + 8, ...` with fused multiply-adds, and
    /// adds them in the tree of [`reduce_lanes`]; a tail past whole lanes
    /// (scalar path only) is added after.
    fn scores(self, queries: &[f32], keys: &[f32], rows: &[usize], scale: f32, out: &mut [f32]) {
        let ctx = rows.len();
        let heads = out.len() / ctx.max(1);
        assert!(ctx > 0 && out.len() == heads * ctx && queries.len().is_multiple_of(heads));
        let d = queries.len() / heads;
        assert!(rows.iter().all(|r| r + d <= keys.len()));
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only when the CPU has AVX2 and FMA and `d` is a
            // multiple of 8; every row is in bounds (asserted above).
            Kernel::Avx2 => unsafe { avx2::scores(queries, d, keys, rows, scale, out) },
            Kernel::Scalar => {
                let whole = d / LANES * LANES;
                for (p, row) in rows.iter().enumerate() {
                    let k = &keys[*row..row + d];
                    for (g, q) in queries.chunks_exact(d).enumerate() {
                        let mut lanes = [0f32; LANES];
                        for (x, y) in q[..whole].chunks_exact(LANES).zip(k.chunks_exact(LANES)) {
                            for l in 0..LANES {
                                lanes[l] = x[l].mul_add(y[l], lanes[l]);
                            }
                        }
                        let dot = q[whole..]
                            .iter()
                            .zip(&k[whole..])
                            .fold(reduce_lanes(lanes), |acc, (x, y)| x.mul_add(*y, acc));
                        out[g * ctx + p] = dot * scale;
                    }
                }
            }
        }
    }

    /// `out = sum_p w[p] * values[rows[p]..][..out.len()]`, positions in
    /// order, one fused multiply-add per element and position.
    fn weighted_sum(self, w: &[f32], values: &[f32], rows: &[usize], out: &mut [f32]) {
        let d = out.len();
        assert!(w.len() == rows.len() && rows.iter().all(|r| r + d <= values.len()));
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only when the CPU has AVX2 and FMA and the head
            // width is a multiple of 8; every row is in bounds (asserted above).
            Kernel::Avx2 => unsafe { avx2::weighted_sum(w, values, rows, out) },
            Kernel::Scalar => {
                out.fill(0.0);
                for (w, row) in w.iter().zip(rows) {
                    for (o, v) in out.iter_mut().zip(&values[*row..row + d]) {
                        *o = w.mul_add(*v, *o);
                    }
                }
            }
        }
    }
}

/// The tree the AVX2 reduction adds lanes in: 128-bit halves, then pairs.
fn reduce_lanes(l: [f32; LANES]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// Reads the 8 floats at `p`.
    ///
    /// # Safety
    /// `p..p + 8` must be readable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 32 readable bytes; `lddqu` loads
        // unaligned (and, unlike `loadu`, carries no debug-build checks).
        _mm256_castsi256_ps(unsafe { _mm256_lddqu_si256(p.cast()) })
    }

    /// See `Kernel::scores`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `d` must be a multiple of 8,
    /// `queries.len()` a multiple of `d`, `out.len()` the number of heads
    /// times `rows.len()`, and `rows[p] + d <= keys.len()` for every `p`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(
        queries: &[f32],
        d: usize,
        keys: &[f32],
        rows: &[usize],
        scale: f32,
        out: &mut [f32],
    ) {
        let ctx = rows.len();
        for (p, row) in rows.iter().enumerate() {
            let k = keys.as_ptr().wrapping_add(*row);
            for (g, q) in queries.chunks_exact(d).enumerate() {
                let mut acc = _mm256_setzero_ps();
                let mut i = 0;
                while i < d {
                    // SAFETY: `i + 8 <= d`, within `q` and, by the caller's
                    // guarantee, within the key row.
                    let (x, y) = unsafe { (load8(q.as_ptr().add(i)), load8(k.add(i))) };
                    acc = _mm256_fmadd_ps(x, y, acc);
                    i += LANES;
                }
                // The tree of `super::reduce_lanes`.
                let halves =
                    _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
                let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
                let dot = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
                out[g * ctx + p] = dot * scale;
            }
        }
    }

    /// See `Kernel::weighted_sum`: 32 columns at a time in four registers,
    /// then 8 at a time; each element gets the same fused multiply-adds in
    /// the same order either way.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `out.len()` must be a multiple of
    /// 8, `w.len() == rows.len()`, and `rows[p] + out.len() <= values.len()`
    /// for every `p`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(w: &[f32], values: &[f32], rows: &[usize], out: &mut [f32]) {
        let d = out.len();
        let base = values.as_ptr();
        let mut c = 0;
        while c + 4 * LANES <= d {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (w, row) in w.iter().zip(rows) {
                let w = _mm256_set1_ps(*w);
                let v = base.wrapping_add(row + c);
                // SAFETY: columns `c..c + 32` of the row are within `values`
                // by the caller's guarantee.
                let x = unsafe {
                    [
                        load8(v),
                        load8(v.add(8)),
                        load8(v.add(16)),
                        load8(v.add(24)),
                    ]
                };
                acc[0] = _mm256_fmadd_ps(w, x[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(w, x[1], acc[1]);
                acc[2] = _mm256_fmadd_ps(w, x[2], acc[2]);
                acc[3] = _mm256_fmadd_ps(w, x[3], acc[3]);
            }
            for (j, acc) in acc.iter().enumerate() {
                // SAFETY: `c + 8 * j + 8 <= d`, within `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + j * LANES), *acc) };
            }
            c += 4 * LANES;
        }
        while c < d {
            let mut acc = _mm256_setzero_ps();
            for (w, row) in w.iter().zip(rows) {
                // SAFETY: as above, for columns `c..c + 8`.
                let x = unsafe { load8(base.wrapping_add(row + c)) };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(*w), x, acc);
            }
            // SAFETY: `c + 8 <= d`, within `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c), acc) };
            c += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::batch::LogitRows;

    /// The textbook definition in f64, over a gathered contiguous context.
    fn reference(shape: AttentionShape, q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<f64> {
        let group = shape.group();
        let d = shape.head_dim;
        let mut out = vec![0f64; shape.num_heads * d];
        for h in 0..shape.num_heads {
            let kv = h / group;
            let s: Vec<f64> = k
                .iter()
                .map(|row| {
                    (0..d)
                        .map(|i| f64::from(q[h * d + i]) * f64::from(row[kv * d + i]))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (p, row) in v.iter().enumerate() {
                for i in 0..d {
                    out[h * d + i] += e[p] / z * f64::from(row[kv * d + i]);
                }
            }
        }
        out
    }

    /// A small deterministic generator so the test needs no extra crate.
    fn noise(seed: &mut u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        shape: AttentionShape,
        keys: Vec<f32>,
        values: Vec<f32>,
        table: Vec<u32>,
        q: Vec<f32>,
    }

    /// A sequence of `ctx` cached tokens in scattered blocks (from the end of
    /// the cache backwards), with a query row per position.
    fn case(
        seed: &mut u64,
        heads: usize,
        kv_heads: usize,
        dim: usize,
        block: usize,
        ctx: usize,
    ) -> Case {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: dim,
            block_size: block,
        };
        let blocks = ctx.div_ceil(block);
        let num_blocks = blocks + 3;
        let table = (0..blocks as u32)
            .map(|b| num_blocks as u32 - 1 - b)
            .collect();
        let len = num_blocks * block * shape.kv_width();
        Case {
            shape,
            keys: noise(seed, len),
            values: noise(seed, len),
            table,
            q: noise(seed, ctx * heads * dim),
        }
    }

    impl Case {
        fn chunk(&self, num_tokens: usize, context_len: usize) -> SequenceChunk {
            SequenceChunk {
                num_tokens,
                context_len,
                block_table: self.table.clone(),
                logits: LogitRows::Last,
            }
        }

        fn query(&self, position: usize) -> &[f32] {
            let width = self.shape.num_heads * self.shape.head_dim;
            &self.q[position * width..(position + 1) * width]
        }

        /// Cache rows of positions `0..=position`.
        fn gather(&self, cache: &[f32], position: usize) -> Vec<Vec<f32>> {
            let width = self.shape.kv_width();
            (0..=position)
                .map(|p| {
                    let slot = slot_of(&self.table, self.shape.block_size, p);
                    cache[slot * width..(slot + 1) * width].to_vec()
                })
                .collect()
        }
    }

    const SHAPES: [(usize, usize, usize, usize, usize); 5] = [
        (9, 3, 64, 16, 37),
        (4, 4, 8, 4, 1),
        (8, 2, 12, 3, 50),
        (6, 1, 5, 7, 7),
        (2, 1, 16, 16, 33),
    ];

    #[test]
    fn matches_the_definition_over_scattered_blocks() {
        let mut seed = 42;
        for (heads, kv_heads, dim, block, ctx) in SHAPES {
            let c = case(&mut seed, heads, kv_heads, dim, block, ctx);
            // The whole context as one prefill chunk: every position's row.
            let got = paged_attention(c.shape, &[c.chunk(ctx, ctx)], &c.q, &c.keys, &c.values);
            let width = heads * dim;
            for p in 0..ctx {
                let expected = reference(
                    c.shape,
                    c.query(p),
                    &c.gather(&c.keys, p),
                    &c.gather(&c.values, p),
                );
                for (a, b) in expected.iter().zip(&got[p * width..(p + 1) * width]) {
                    // f32 sums of at most ~100 terms of magnitude <= 1.
                    assert!(
                        (a - f64::from(*b)).abs() < 1e-5,
                        "{a} vs {b} for {:?}",
                        c.shape
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_decode_and_batches_give_the_same_bits() {
        let mut seed = 9;
        for (heads, kv_heads, dim, block, ctx) in SHAPES {
            let c = case(&mut seed, heads, kv_heads, dim, block, ctx);
            let width = heads * dim;
            let whole = paged_attention(c.shape, &[c.chunk(ctx, ctx)], &c.q, &c.keys, &c.values);
            // Chunks of 5 tokens, and each token as a decode step.
            for step in [5, 1] {
                for start in (0..ctx).step_by(step) {
                    let n = step.min(ctx - start);
                    let q = &c.q[start * width..(start + n) * width];
                    let got =
                        paged_attention(c.shape, &[c.chunk(n, start + n)], q, &c.keys, &c.values);
                    assert_eq!(got, whole[start * width..(start + n) * width]);
                }
            }
            // The last token beside another sequence's chunk (the same cache
            // through a shorter context), each in both orders.
            let other = ctx.min(2);
            let q_other = &c.q[..other * width];
            let last = &whole[(ctx - 1) * width..];
            let mut q = q_other.to_vec();
            q.extend_from_slice(c.query(ctx - 1));
            let got = paged_attention(
                c.shape,
                &[c.chunk(other, other), c.chunk(1, ctx)],
                &q,
                &c.keys,
                &c.values,
            );
            assert_eq!(&got[other * width..], last);
            let mut q = c.query(ctx - 1).to_vec();
            q.extend_from_slice(q_other);
            let got = paged_attention(
                c.shape,
                &[c.chunk(1, ctx), c.chunk(other, other)],
                &q,
                &c.keys,
                &c.values,
            );
            assert_eq!(&got[..width], last);
        }
    }

    #[test]
    fn simd_and_scalar_agree_bitwise() {
        let mut seed = 1;
        for d in [8usize, 64, 128, 40, 5, 13] {
            let (heads, ctx) = (3, 7);
            let queries = noise(&mut seed, heads * d);
            let cache = noise(&mut seed, 10 * d);
            let rows: Vec<usize> = [9, 2, 5, 0, 7, 1, 3].iter().map(|r| r * d).collect();
            let detected = Kernel::detect(d);
            let (mut x, mut y) = (vec![0f32; heads * ctx], vec![0f32; heads * ctx]);
            detected.scores(&queries, &cache, &rows, 0.125, &mut x);
            Kernel::Scalar.scores(&queries, &cache, &rows, 0.125, &mut y);
            assert_eq!(x, y, "scores, d = {d}");
            let w = noise(&mut seed, ctx);
            let (mut x, mut y) = (vec![0f32; d], vec![0f32; d]);
            detected.weighted_sum(&w, &cache, &rows, &mut x);
            Kernel::Scalar.weighted_sum(&w, &cache, &rows, &mut y);
            assert_eq!(x, y, "weighted sum, d = {d}");
        }
    }
}
