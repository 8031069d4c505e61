//! An int8 matrix product for the linear layers on the CPU: `y = x W^T` with
//! `W` held as 8-bit quants in blocks of 32 along `k` with `f32` block
//! scales, and each activation row quantized per call by ggml's Q8_0 rule
//! (`d = max|x| / 127`, `q = round(x / d)`).
//!
//! Why not candle's `QMatMul`: its Q8_0 kernel computes one dot product at a
//! time, converts both f16 block scales per block and reads each weight row
//! again for every activation row, so a batch of 16 rows costs 16 rows' time
//! and continuous batching gains nothing on the CPU. Here the weights sit in
//! a layout where one 256-bit register holds 4 consecutive `k` values of 8
//! output columns, so a product lands column-per-lane: no horizontal sums,
//! the block scales of 8 columns are one load, and the weights of a column
//! tile stay in L1 while every activation row passes over them.
//!
//! Two weight formats. Symmetric: signed quants in `[-127, 127]`, value `d *
//! q`, for any weight (requantized from its `f32` values; lossless for Q8_0).
//! Offset: unsigned 4-bit quants in `[0, 15]` with a block minimum, value
//! `d * q + m`, which holds Q4_1 weights exactly, as llama.cpp multiplies
//! them; the minimum's share of a block, `m * d_x * sum q_x`, costs one more
//! fused multiply-add per block, while unsigned small quants save the sign
//! trick and let a block's products gather in 16-bit lanes.
//!
//! Batch invariance, bitwise: an output element is computed by the same
//! operations in the same order whatever the number of rows, whichever other
//! rows share the call, and whichever thread or tile computes it. Per block
//! the integer dot product is exact (no order to speak of); the `f32`
//! accumulation is one fused multiply-add per block (two with a minimum),
//! blocks in order. The scalar fallback performs exactly those operations
//! too, so both paths give the same bits (tested below).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape};

/// Values per quantization block along `k`.
pub const BLOCK: usize = 32;
/// Output columns per lane group: one 256-bit register of `i32`/`f32`.
const LANES: usize = 8;
/// `k` values per lane in one register of weights (4 bytes per lane).
const QUAD: usize = 4;
/// Lane groups per column tile, the unit of work of one thread: 32 columns
/// of 576..1536 `k` values are 18..48 KiB of weights, about one L1.
const TILE_GROUPS: usize = 4;
/// Activation rows per unit of work: bounds the activations a tile re-reads.
const TILE_ROWS: usize = 64;
/// Below this many multiply-adds a call runs on the calling thread: waking
/// the pool costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// A weight matrix `[n, k]` quantized to 8 bits, laid out for [`Q8Matrix::matmul`].
///
/// Columns (rows of `W`) are padded to a multiple of 8 and `k` to a multiple
/// of 32 with zeros, which add nothing to any product.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    blocks: usize,
    /// `[n / 8][blocks][32 / 4][8 columns][4]`: per group and block, 8
    /// registers of 32 bytes, register `q` holding `k` values `4q..4q + 4` of
    /// the block for each of the group's 8 columns.
    quants: Vec<i8>,
    /// `[n / 8][blocks][8 columns]`, already `f32`: no conversion at run time.
    scales: Vec<f32>,
    /// Block minimums laid out like `scales`, for the offset format.
    mins: Option<Vec<f32>>,
}

/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 32 packed nibbles.
const Q4_1_BYTES: usize = 20;

impl Q8Matrix {
    /// Quantizes a row-major `[n, k]` weight to the symmetric format.
    pub fn quantize(weight: &[f32], n: usize, k: usize) -> Result<Self> {
        if n == 0 || k == 0 || Some(weight.len()) != n.checked_mul(k) {
            bail!("{} values cannot be a [{n}, {k}] weight", weight.len());
        }
        Ok(Self::build(n, k, false, |col, b, q| {
            let row = &weight[col * k..(col + 1) * k];
            let values = &row[b * BLOCK..row.len().min((b + 1) * BLOCK)];
            (quantize_block(values, q), 0.0)
        }))
    }

    /// Takes a `[n, k]` weight in GGML's Q4_1 encoding (the raw blocks, row
    /// after row) exactly, in the offset format.
    pub fn from_q4_1(data: &[u8], n: usize, k: usize) -> Result<Self> {
        if n == 0
            || k == 0
            || !k.is_multiple_of(BLOCK)
            || Some(data.len()) != n.checked_mul(k / BLOCK * Q4_1_BYTES)
        {
            bail!("{} bytes cannot be a [{n}, {k}] Q4_1 weight", data.len());
        }
        let blocks = k / BLOCK;
        Ok(Self::build(n, k, true, |col, b, q| {
            let at = (col * blocks + b) * Q4_1_BYTES;
            let block = &data[at..at + Q4_1_BYTES];
            let half = |i: usize| f16_to_f32(u16::from_le_bytes([block[i], block[i + 1]]));
            for (j, byte) in block[4..].iter().enumerate() {
                q[j] = (byte & 0x0f) as i8;
                q[j + BLOCK / 2] = (byte >> 4) as i8;
            }
            (half(0), half(2))
        }))
    }

    /// Lays out a matrix whose block `b` of column `col` is given by `block`,
    /// which fills the quants and returns the scale and minimum.
    fn build(
        n: usize,
        k: usize,
        offset: bool,
        mut block: impl FnMut(usize, usize, &mut [i8; BLOCK]) -> (f32, f32),
    ) -> Self {
        let blocks = k.div_ceil(BLOCK);
        let groups = n.div_ceil(LANES);
        let mut quants = vec![0i8; groups * blocks * LANES * BLOCK];
        let mut scales = vec![0f32; groups * blocks * LANES];
        let mut mins = vec![0f32; if offset { scales.len() } else { 0 }];
        let mut q = [0i8; BLOCK];
        for col in 0..n {
            let (group, lane) = (col / LANES, col % LANES);
            for b in 0..blocks {
                let at = group * blocks + b;
                let (d, m) = block(col, b, &mut q);
                scales[at * LANES + lane] = d;
                if offset {
                    mins[at * LANES + lane] = m;
                }
                let tile = &mut quants[at * LANES * BLOCK..(at + 1) * LANES * BLOCK];
                for (i, v) in q.iter().enumerate() {
                    tile[(i / QUAD) * LANES * QUAD + lane * QUAD + i % QUAD] = *v;
                }
            }
        }
        Q8Matrix {
            n,
            k,
            blocks,
            quants,
            scales,
            mins: offset.then_some(mins),
        }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `x W^T` for `x` row-major `[m, k]`; returns `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if Some(x.len()) != m.checked_mul(self.k) {
            bail!("{} values cannot be [{m}, {}] activations", x.len(), self.k);
        }
        let Some(len) = m.checked_mul(self.n) else {
            bail!("[{m}, {}] outputs do not fit in memory", self.n);
        };
        let kernel = Kernel::detect();
        let rows = Q8Rows::quantize(x, m, self.k, self.blocks, kernel);
        let mut out = vec![0f32; len];
        let tiles = self.n.div_ceil(LANES * TILE_GROUPS);
        let row_chunks = m.div_ceil(TILE_ROWS);
        let units = tiles * row_chunks;
        let dst = SharedOut(out.as_mut_ptr());
        let run = |unit: usize| {
            let (tile, chunk) = (unit / row_chunks, unit % row_chunks);
            let first = chunk * TILE_ROWS;
            let rows_range = first..m.min(first + TILE_ROWS);
            // SAFETY: unit `(tile, chunk)` writes only rows `rows_range` x
            // columns of `tile`, which no other unit writes; `out` has `m * n`
            // elements and is not touched again until every unit has
            // finished.
            unsafe { self.tile(kernel, &rows, tile, rows_range, &dst) }
        };
        if x.len().saturating_mul(self.n) < PARALLEL_MIN_MACS {
            (0..units).for_each(run);
        } else {
            crate::cpu::pool::run(units, &run);
        }
        Ok(out)
    }

    /// Computes the columns of column tile `tile` for activation rows `rows`.
    ///
    /// # Safety
    /// `dst` must point to `[m, n]` writable `f32`s that nothing else reads
    /// or writes in those rows and columns during the call.
    unsafe fn tile(
        &self,
        kernel: Kernel,
        x: &Q8Rows,
        tile: usize,
        rows: std::ops::Range<usize>,
        dst: &SharedOut,
    ) {
        let first_group = tile * TILE_GROUPS;
        let groups = TILE_GROUPS.min(self.n.div_ceil(LANES) - first_group);
        let first_col = first_group * LANES;
        let cols = (groups * LANES).min(self.n - first_col);
        let mut acc = [0f32; LANES * TILE_GROUPS];
        for r in rows {
            let row = x.row(r);
            let acc = &mut acc[..groups * LANES];
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::Avx2` is only chosen when the CPU has AVX2
                // and FMA.
                Kernel::Avx2 => unsafe { avx2::dot_groups(self, first_group, row, acc) },
                Kernel::Scalar => scalar_dot_groups(self, first_group, row, acc),
            }
            // SAFETY: row `r` < m, columns `first_col..first_col + cols` <= n,
            // and the caller guarantees this region is ours alone.
            let out =
                unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * self.n + first_col), cols) };
            out.copy_from_slice(&acc[..cols]);
        }
    }

    /// The quants of lane group `group`, block `b`: 8 registers of 32 bytes.
    fn group_block(&self, group: usize, b: usize) -> &[i8] {
        let at = (group * self.blocks + b) * LANES * BLOCK;
        &self.quants[at..at + LANES * BLOCK]
    }

    /// The 8 scales of lane group `group`, block `b`.
    fn group_scales(&self, group: usize, b: usize) -> &[f32] {
        let at = (group * self.blocks + b) * LANES;
        &self.scales[at..at + LANES]
    }

    /// The 8 minimums of lane group `group`, block `b`, in the offset format.
    fn group_mins(&self, group: usize, b: usize) -> Option<&[f32]> {
        let at = (group * self.blocks + b) * LANES;
        self.mins.as_ref().map(|m| &m[at..at + LANES])
    }
}

/// An IEEE half-precision value, widened exactly.
fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from(bits >> 10) & 0x1f;
    let mantissa = u32::from(bits) & 0x3ff;
    match exponent {
        // Zero and subnormals: mantissa * 2^-24, exact in f32.
        0 => {
            let magnitude = mantissa as f32 * f32::from_bits(0x3380_0000);
            f32::from_bits(sign | magnitude.to_bits())
        }
        // Infinities and NaNs.
        0x1f => f32::from_bits(sign | 0x7f80_0000 | mantissa << 13),
        _ => f32::from_bits(sign | (exponent + 127 - 15) << 23 | mantissa << 13),
    }
}

/// The output pointer shared by the units of one call.
struct SharedOut(*mut f32);
// SAFETY: units write disjoint regions through it (see `Q8Matrix::tile`), and
// `pool::run` returns only after every unit has finished.
unsafe impl Sync for SharedOut {}

/// Quantizes one block (up to 32 values; the rest are taken as zeros) into
/// `q` and returns its scale.
fn quantize_block(values: &[f32], q: &mut [i8; BLOCK]) -> f32 {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    q.fill(0);
    for (q, v) in q.iter_mut().zip(values) {
        *q = quantize_value(v * id);
    }
    d
}

/// Rounds to nearest, ties to even, and clamps to `[-127, 127]`: what
/// `_mm256_round_ps` with `_mm256_min_ps`/`_mm256_max_ps` do, NaN included
/// (the minimum of NaN and 127 is 127 in both, where `clamp` would keep the
/// NaN), so both paths agree.
#[allow(clippy::manual_clamp)]
fn quantize_value(v: f32) -> i8 {
    v.min(127.0).max(-127.0).round_ties_even() as i8
}

/// Activation rows quantized for one call: `[m][blocks][32]` quants, their
/// magnitudes (the unsigned operand of `maddubs` against signed weights),
/// and per block `[m][blocks]` the scale and `d * sum q` (what a block
/// minimum multiplies).
struct Q8Rows {
    blocks: usize,
    quants: Vec<i8>,
    magnitudes: Vec<u8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

/// One quantized activation row.
#[derive(Clone, Copy)]
struct Q8Row<'a> {
    quants: &'a [i8],
    magnitudes: &'a [u8],
    scales: &'a [f32],
    sums: &'a [f32],
}

impl Q8Rows {
    fn quantize(x: &[f32], m: usize, k: usize, blocks: usize, kernel: Kernel) -> Self {
        let mut rows = Q8Rows {
            blocks,
            quants: vec![0; m * blocks * BLOCK],
            magnitudes: vec![0; m * blocks * BLOCK],
            scales: vec![0.0; m * blocks],
            sums: vec![0.0; m * blocks],
        };
        let mut q = [0i8; BLOCK];
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (b, values) in row.chunks(BLOCK).enumerate() {
                let at = r * blocks + b;
                rows.scales[at] = match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: chosen only when the CPU has AVX2 and FMA.
                    Kernel::Avx2 if values.len() == BLOCK => unsafe {
                        avx2::quantize_block(values, &mut q)
                    },
                    _ => quantize_block(values, &mut q),
                };
                rows.quants[at * BLOCK..(at + 1) * BLOCK].copy_from_slice(&q);
                let sum: i32 = q.iter().map(|v| i32::from(*v)).sum();
                rows.sums[at] = sum as f32 * rows.scales[at];
                for (u, v) in rows.magnitudes[at * BLOCK..(at + 1) * BLOCK]
                    .iter_mut()
                    .zip(&q)
                {
                    *u = v.unsigned_abs();
                }
            }
        }
        rows
    }

    fn row(&self, r: usize) -> Q8Row<'_> {
        let span = self.blocks * BLOCK;
        Q8Row {
            quants: &self.quants[r * span..(r + 1) * span],
            magnitudes: &self.magnitudes[r * span..(r + 1) * span],
            scales: &self.scales[r * self.blocks..(r + 1) * self.blocks],
            sums: &self.sums[r * self.blocks..(r + 1) * self.blocks],
        }
    }
}

/// The code path for this CPU, chosen per call (detection is a cached load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }
}

/// The portable path: per column, per block an exact integer dot product,
/// then `acc = isum * (d_w * d_x) + acc` fused, and with a minimum `acc =
/// m_w * s_x + acc` fused, as the AVX2 lanes do.
fn scalar_dot_groups(w: &Q8Matrix, first_group: usize, x: Q8Row<'_>, acc: &mut [f32]) {
    for (g, acc) in acc.chunks_exact_mut(LANES).enumerate() {
        acc.fill(0.0);
        for b in 0..w.blocks {
            let quants = w.group_block(first_group + g, b);
            let scales = w.group_scales(first_group + g, b);
            let mins = w.group_mins(first_group + g, b);
            let xq = &x.quants[b * BLOCK..(b + 1) * BLOCK];
            for (lane, acc) in acc.iter_mut().enumerate() {
                let isum: i32 = (0..BLOCK)
                    .map(|i| {
                        let wq = quants[(i / QUAD) * LANES * QUAD + lane * QUAD + i % QUAD];
                        i32::from(wq) * i32::from(xq[i])
                    })
                    .sum();
                *acc = (isum as f32).mul_add(scales[lane] * x.scales[b], *acc);
                if let Some(mins) = mins {
                    *acc = mins[lane].mul_add(x.sums[b], *acc);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Matrix, Q8Row, BLOCK, LANES, QUAD, TILE_GROUPS};
    use std::arch::x86_64::*;

    /// Computes lane groups `first_group..first_group + acc.len() / 8` of
    /// one activation row into `acc`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_groups(
        w: &Q8Matrix,
        first_group: usize,
        x: Q8Row<'_>,
        acc: &mut [f32],
    ) {
        let groups = acc.len() / LANES;
        assert!((1..=TILE_GROUPS).contains(&groups) && acc.len() == groups * LANES);
        assert!(x.quants.len() == w.blocks * BLOCK && x.magnitudes.len() == x.quants.len());
        assert!(x.scales.len() == w.blocks && x.sums.len() == w.blocks);
        let span = w.blocks * LANES * BLOCK;
        let scale_span = w.blocks * LANES;
        let (first, last) = (first_group, first_group + groups);
        let operands = Operands {
            quants: w.quants[first * span..last * span].as_ptr(),
            scales: w.scales[first * scale_span..last * scale_span].as_ptr(),
            mins: w.mins.as_ref().map_or(std::ptr::null(), |m| {
                m[first * scale_span..last * scale_span].as_ptr()
            }),
            span,
            scale_span,
            blocks: w.blocks,
            quads: std::hint::black_box(BLOCK / QUAD),
            x_quants: x.quants.as_ptr(),
            x_magnitudes: x.magnitudes.as_ptr(),
            x_scales: x.scales.as_ptr(),
            x_sums: x.sums.as_ptr(),
            out: acc.as_mut_ptr(),
        };
        // SAFETY: the slicing and asserts above make `operands` describe
        // `groups` lane groups of weights (with minimums exactly when the
        // offset kernel runs) and one row of `blocks` blocks, as the kernels
        // require; the caller guarantees AVX2 and FMA.
        unsafe {
            match (groups, w.mins.is_some()) {
                (4, false) => dot4::<false>(&operands),
                (3, false) => dot3::<false>(&operands),
                (2, false) => dot2::<false>(&operands),
                (_, false) => dot1::<false>(&operands),
                (4, true) => dot4::<true>(&operands),
                (3, true) => dot3::<true>(&operands),
                (2, true) => dot2::<true>(&operands),
                (_, true) => dot1::<true>(&operands),
            }
        }
    }

    /// Where the kernels read and write. Raw pointers stepped in place, and
    /// loads through `lddqu` rather than `loadu` (which goes through
    /// `copy_nonoverlapping`): the crate's dev profile (opt-level 1, debug
    /// assertions) would otherwise keep bounds, overflow and precondition
    /// checks in every step of the inner loop.
    struct Operands {
        /// `G` lane groups of weight quants, `span` bytes apart.
        quants: *const i8,
        /// Their scales, `scale_span` floats apart.
        scales: *const f32,
        /// Their minimums, laid out like the scales (offset format only).
        mins: *const f32,
        span: usize,
        scale_span: usize,
        blocks: usize,
        /// `32 / 4`, read at run time: with a constant trip count LLVM
        /// unrolls the loop over a block's registers completely, hoists all
        /// of its loads and spills the accumulators.
        quads: usize,
        /// One activation row: `blocks * 32` quants and magnitudes, `blocks`
        /// scales and sums.
        x_quants: *const i8,
        x_magnitudes: *const u8,
        x_scales: *const f32,
        x_sums: *const f32,
        /// `G * 8` floats.
        out: *mut f32,
    }

    /// Reads 4 bytes at `p` into every lane.
    ///
    /// # Safety
    /// `p..p + 4` must be readable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn broadcast4<T>(p: *const T) -> __m256i {
        // SAFETY: the caller guarantees 4 readable bytes; `[u8; 4]` has no
        // alignment requirement.
        _mm256_set1_epi32(i32::from_ne_bytes(unsafe { *p.cast::<[u8; 4]>() }))
    }

    /// Reads the 8 floats at `p`.
    ///
    /// # Safety
    /// `p..p + 8` must be readable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 32 readable bytes; `lddqu` loads
        // unaligned.
        _mm256_castsi256_ps(unsafe { _mm256_lddqu_si256(p.cast()) })
    }

    /// A kernel over `G` lane groups, one named register per group: the
    /// crate's opt-level 1 does not unroll loops over register arrays, so
    /// the unrolling is written out. Every lane does the same operations in
    /// every instance, so the tile width never changes a result. `OFFSET`
    /// selects the offset format: unsigned weight quants multiply the signed
    /// activations directly, and each block adds `m_w * s_x`. The integer
    /// sums are exact either way, so the format of the sums in between
    /// changes no bit of a result.
    macro_rules! dot_kernel {
        ($name:ident: $(($g:literal, $w:ident, $s:ident, $acc:ident, $isum:ident)),+) => {
            /// # Safety
            /// The CPU must support AVX2 and FMA; `o` must describe as many
            /// lane groups as this kernel computes (see [`Operands`]), with
            /// minimums if `OFFSET`.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name<const OFFSET: bool>(o: &Operands) {
                let ones = _mm256_set1_epi16(1);
                $(
                    let mut $w = o.quants.wrapping_add($g * o.span);
                    let mut $s = $g * o.scale_span;
                    let mut $acc = _mm256_setzero_ps();
                )+
                let (mut xq, mut xm) = (o.x_quants, o.x_magnitudes);
                for b in 0..o.blocks {
                    $(let mut $isum = _mm256_setzero_si256();)+
                    for _ in 0..o.quads {
                        // SAFETY: `xq` and `xm` step through the row's
                        // `blocks * 32` bytes, 4 at a time.
                        let (xs, xa) = unsafe { (broadcast4(xq), broadcast4(xm)) };
                        $(
                            // SAFETY: `$w` steps through its group's
                            // `blocks * 256` bytes, 32 at a time; `lddqu`
                            // loads unaligned.
                            let wv = unsafe { _mm256_lddqu_si256($w.cast()) };
                            if OFFSET {
                                // Unsigned quants are <= 15: a pair of
                                // products is <= 3810 and a whole block's
                                // pairs add up to <= 30480, so they gather
                                // in 16-bit lanes, widened once per block.
                                let pairs = _mm256_maddubs_epi16(wv, xs);
                                $isum = _mm256_add_epi16($isum, pairs);
                            } else {
                                // Signed quants go as |x| * (w * sign x);
                                // |x|, |w| <= 127, so a pair is <= 32258 and
                                // is widened at once.
                                let pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xs));
                                $isum = _mm256_add_epi32($isum, _mm256_madd_epi16(pairs, ones));
                            }
                            $w = $w.wrapping_add(LANES * QUAD);
                        )+
                        xq = xq.wrapping_add(QUAD);
                        xm = xm.wrapping_add(QUAD);
                    }
                    if OFFSET {
                        $($isum = _mm256_madd_epi16($isum, ones);)+
                    }
                    // SAFETY: `b < blocks`, the row's number of scales and sums.
                    let (dx, sx) = unsafe {
                        (
                            _mm256_set1_ps(*o.x_scales.wrapping_add(b)),
                            _mm256_set1_ps(*o.x_sums.wrapping_add(b)),
                        )
                    };
                    $(
                        // SAFETY: `$s` steps through its group's `blocks * 8`
                        // scales (and minimums), 8 at a time.
                        let dw = unsafe { load8(o.scales.wrapping_add($s)) };
                        $acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps($isum), _mm256_mul_ps(dw, dx), $acc);
                        if OFFSET {
                            // SAFETY: as above, minimums exist if `OFFSET`.
                            let mw = unsafe { load8(o.mins.wrapping_add($s)) };
                            $acc = _mm256_fmadd_ps(mw, sx, $acc);
                        }
                        $s += LANES;
                    )+
                }
                $(
                    // SAFETY: `out` holds 8 floats per lane group.
                    unsafe { _mm256_storeu_ps(o.out.wrapping_add($g * LANES), $acc) };
                )+
            }
        };
    }

    dot_kernel!(dot1: (0, w0, s0, acc0, isum0));
    dot_kernel!(dot2: (0, w0, s0, acc0, isum0), (1, w1, s1, acc1, isum1));
    dot_kernel!(dot3: (0, w0, s0, acc0, isum0), (1, w1, s1, acc1, isum1), (2, w2, s2, acc2, isum2));
    dot_kernel!(
        dot4: (0, w0, s0, acc0, isum0),
        (1, w1, s1, acc1, isum1),
        (2, w2, s2, acc2, isum2),
        (3, w3, s3, acc3, isum3)
    );

    /// [`super::quantize_block`] for a full block, with the same rounding
    /// and clamping, so both give the same quants and scale for finite input.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(values: &[f32], q: &mut [i8; BLOCK]) -> f32 {
        assert_eq!(values.len(), BLOCK);
        let mut v = [_mm256_setzero_ps(); 4];
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: `values` holds 32 floats; unaligned loads are allowed.
            *v = unsafe { _mm256_loadu_ps(values.as_ptr().add(i * 8)) };
        }
        let sign = _mm256_set1_ps(-0.0);
        let mut amax = _mm256_setzero_ps();
        for v in v {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        }
        let halves = _mm_max_ps(
            _mm256_castps256_ps128(amax),
            _mm256_extractf128_ps::<1>(amax),
        );
        let pairs = _mm_max_ps(halves, _mm_movehl_ps(halves, halves));
        let amax = _mm_cvtss_f32(_mm_max_ss(pairs, _mm_movehdup_ps(pairs)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
        let (hi, lo) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
        let mut ints = [_mm256_setzero_si256(); 4];
        for (int, v) in ints.iter_mut().zip(v) {
            let v = _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v, id), hi), lo);
            let v = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            *int = _mm256_cvtps_epi32(v);
        }
        // Packing interleaves the 128-bit halves; the permute restores order.
        let low = _mm256_packs_epi32(ints[0], ints[1]);
        let high = _mm256_packs_epi32(ints[2], ints[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(low, high),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        // SAFETY: `q` is 32 bytes; unaligned stores are allowed.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes) };
        d
    }
}

/// `x W^T` as a candle op on CPU tensors: `x` is `[.., k]` `f32`,
/// contiguous; the result is `[.., n]`.
impl CustomOp1 for Q8Matrix {
    fn name(&self) -> &'static str {
        "q8-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("q8-matmul takes f32 activations, not {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("q8-matmul takes contiguous activations");
        };
        let mut dims = layout.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == self.k => *last = self.n,
            _ => bail!(
                "q8-matmul: activations {:?} for a weight of k = {}",
                layout.shape(),
                self.k
            ),
        }
        let x = &data[start..end];
        let out = self.matmul(x, x.len() / self.k)?;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};

    /// A small deterministic generator so the tests need no extra crate.
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

    /// candle's Q4_1 encoding of a `[n, k]` weight.
    fn q4_1(weight: &[f32], n: usize, k: usize) -> QTensor {
        let t = Tensor::from_slice(weight, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()
    }

    /// Both formats of the same random weight (Q4_1 needs whole blocks).
    fn weights(seed: &mut u64, n: usize, k: usize) -> Vec<Q8Matrix> {
        let w = noise(seed, n * k);
        let mut all = vec![Q8Matrix::quantize(&w, n, k).unwrap()];
        if k.is_multiple_of(BLOCK) {
            let data = q4_1(&w, n, k).data().unwrap().into_owned();
            all.push(Q8Matrix::from_q4_1(&data, n, k).unwrap());
        }
        all
    }

    impl Q8Matrix {
        /// Quant, scale and minimum of element `i` of column `col`.
        fn element(&self, col: usize, i: usize) -> (i8, f32, f32) {
            let (group, lane) = (col / LANES, col % LANES);
            let (b, j) = (i / BLOCK, i % BLOCK);
            let q = self.group_block(group, b)[(j / QUAD) * LANES * QUAD + lane * QUAD + j % QUAD];
            let m = self.group_mins(group, b).map_or(0.0, |m| m[lane]);
            (q, self.group_scales(group, b)[lane], m)
        }

        /// The `[n, k]` weight the quants, scales and minimums stand for.
        fn dequantize(&self) -> Vec<f64> {
            let mut w = vec![0f64; self.n * self.k];
            for col in 0..self.n {
                for i in 0..self.k {
                    let (q, d, m) = self.element(col, i);
                    w[col * self.k + i] = f64::from(q) * f64::from(d) + f64::from(m);
                }
            }
            w
        }

        /// `matmul` on one thread with a given kernel.
        fn matmul_serial(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
            let rows = Q8Rows::quantize(x, m, self.k, self.blocks, kernel);
            let mut out = vec![0f32; m * self.n];
            let dst = SharedOut(out.as_mut_ptr());
            for tile in 0..self.n.div_ceil(LANES * TILE_GROUPS) {
                // SAFETY: one thread, `out` is `[m, n]`.
                unsafe { self.tile(kernel, &rows, tile, 0..m, &dst) };
            }
            out
        }
    }

    /// The `[m, k]` activations the quantized rows stand for.
    fn dequantize_rows(x: &[f32], m: usize, k: usize) -> Vec<f64> {
        let blocks = k.div_ceil(BLOCK);
        let rows = Q8Rows::quantize(x, m, k, blocks, Kernel::Scalar);
        let mut out = vec![0f64; m * k];
        for r in 0..m {
            let row = rows.row(r);
            for i in 0..k {
                out[r * k + i] = f64::from(row.quants[i]) * f64::from(row.scales[i / BLOCK]);
            }
        }
        out
    }

    /// Awkward shapes: `n` not a multiple of the 8-column group or the
    /// 32-column tile, `k` not a multiple of the block, `m` past a row chunk.
    const SHAPES: [(usize, usize, usize); 7] = [
        (37, 576, 1536),
        (37, 576, 1000),
        (5, 576, 13),
        (70, 100, 45),
        (1, 33, 7),
        (3, 1536, 200),
        (66, 64, 40),
    ];

    #[test]
    fn a_row_gets_the_same_bits_whatever_the_batch() {
        let mut seed = 7;
        for (m, k, n) in SHAPES {
            for w in weights(&mut seed, n, k) {
                let x = noise(&mut seed, m * k);
                let batched = w.matmul(&x, m).unwrap();
                // Each row alone, and the rows in reverse order (other
                // neighbours, other tiles and threads).
                let reversed: Vec<f32> = x.chunks_exact(k).rev().flatten().copied().collect();
                let reversed = w.matmul(&reversed, m).unwrap();
                for r in 0..m {
                    let alone = w.matmul(&x[r * k..(r + 1) * k], 1).unwrap();
                    let row = &batched[r * n..(r + 1) * n];
                    let rev = &reversed[(m - 1 - r) * n..(m - r) * n];
                    assert!(
                        row.iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "row {r} of m={m}, k={k}, n={n} differs from the row alone"
                    );
                    assert!(
                        row.iter().zip(rev).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "row {r} of m={m}, k={k}, n={n} differs when the rows are reversed"
                    );
                }
            }
        }
    }

    #[test]
    fn threads_and_kernels_do_not_change_a_bit() {
        let mut seed = 11;
        for (m, k, n) in SHAPES {
            for w in weights(&mut seed, n, k) {
                let x = noise(&mut seed, m * k);
                let pooled = w.matmul(&x, m).unwrap();
                let detected = w.matmul_serial(&x, m, Kernel::detect());
                let scalar = w.matmul_serial(&x, m, Kernel::Scalar);
                for ((a, b), c) in pooled.iter().zip(&detected).zip(&scalar) {
                    assert_eq!(a.to_bits(), b.to_bits(), "pool vs one thread, {m}x{k}x{n}");
                    assert_eq!(a.to_bits(), c.to_bits(), "SIMD vs scalar, {m}x{k}x{n}");
                }
            }
        }
    }

    #[test]
    fn matches_the_dequantized_product_in_f64() {
        let mut seed = 3;
        for (m, k, n) in SHAPES {
            for w in weights(&mut seed, n, k) {
                let x: Vec<f32> = noise(&mut seed, m * k).iter().map(|v| v * 10.0).collect();
                let got = w.matmul(&x, m).unwrap();
                let xd = dequantize_rows(&x, m, k);
                let wd = w.dequantize();
                for r in 0..m {
                    for c in 0..n {
                        let exact: f64 = (0..k).map(|i| xd[r * k + i] * wd[c * k + i]).sum();
                        // Integer block sums are exact; per block the f32
                        // path rounds at most four times (the scale product,
                        // a fused multiply-add, and with a minimum the
                        // activation block sum and a second fused add), so by
                        // the usual bound for recursive summation the error is
                        // at most (2 * blocks + 2) * 2^-24 times the sum of
                        // the magnitudes of the scale and minimum terms.
                        let magnitude: f64 = (0..k)
                            .map(|i| {
                                let (q, d, mw) = w.element(c, i);
                                let scaled =
                                    (f64::from(q) * f64::from(d)).abs() + f64::from(mw).abs();
                                scaled * xd[r * k + i].abs()
                            })
                            .sum();
                        let blocks = k.div_ceil(BLOCK) as f64;
                        let tolerance = (2.0 * blocks + 2.0) * 2f64.powi(-24) * magnitude;
                        let err = (f64::from(got[r * n + c]) - exact).abs();
                        assert!(
                            err <= tolerance,
                            "[{r}, {c}] of {m}x{k}x{n}: {} vs {exact} (tolerance {tolerance})",
                            got[r * n + c]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q4_1_weights_are_kept_exactly() {
        let (n, k) = (11, 96);
        let mut seed = 17;
        let qt = q4_1(&noise(&mut seed, n * k), n, k);
        let ours = Q8Matrix::from_q4_1(&qt.data().unwrap(), n, k).unwrap();
        let theirs = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        for (i, v) in theirs.to_vec1::<f32>().unwrap().iter().enumerate() {
            // candle dequantizes as `q * d + m` in f32.
            let (q, d, m) = ours.element(i / k, i % k);
            assert_eq!((f32::from(q) * d + m).to_bits(), v.to_bits(), "element {i}");
            assert!((0..=15).contains(&q));
        }
        assert!(Q8Matrix::from_q4_1(&qt.data().unwrap(), n, k + 32).is_err());
    }

    #[test]
    fn extreme_quants_do_not_saturate() {
        // Every weight quant at its largest, every activation at +-127: the
        // largest integer sums either format can meet.
        let (n, k) = (8, 64);
        let one = 0x3c00u16.to_le_bytes(); // 1.0 in f16
        let block: Vec<u8> = [one, [0, 0]]
            .concat()
            .into_iter()
            .chain([0xff; 16])
            .collect();
        let offset = Q8Matrix::from_q4_1(&block.repeat(n * k / BLOCK), n, k).unwrap();
        let symmetric = Q8Matrix::quantize(&vec![-1.0; n * k], n, k).unwrap();
        for sign in [1.0f32, -1.0] {
            let x = vec![sign; k];
            for (w, per_element) in [(&offset, 15.0), (&symmetric, -1.0)] {
                let expected = sign * per_element * k as f32;
                for (kernel, got) in [
                    (Kernel::detect(), w.matmul_serial(&x, 1, Kernel::detect())),
                    (Kernel::Scalar, w.matmul_serial(&x, 1, Kernel::Scalar)),
                ] {
                    for v in got {
                        assert!((v - expected).abs() < 1e-3, "{kernel:?}: {v} vs {expected}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_weights_survive_requantization() {
        // Blocks on a Q8_0 grid (f16 scales) that reach 127 steps, as Q8_0
        // blocks do, come back exactly.
        let (n, k) = (3, 64);
        let scales = [0.25f32, 1.0 / 512.0, 25.0 / 2048.0, 3.0, 1.0 / 32768.0, 0.5];
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                let step = if i % BLOCK == 5 {
                    -127
                } else {
                    (i * 37 % 255) as i32 - 127
                };
                step as f32 * scales[i / BLOCK]
            })
            .collect();
        let q = Q8Matrix::quantize(&w, n, k).unwrap();
        for (a, b) in q.dequantize().iter().zip(&w) {
            assert_eq!(*a, f64::from(*b));
        }
    }

    #[test]
    fn half_floats_widen_like_candle() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let theirs = Tensor::from_raw_buffer(&bytes, DType::F16, &[bits.len()], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (b, v) in bits.iter().zip(&theirs) {
            let ours = f16_to_f32(*b);
            assert!(
                ours.to_bits() == v.to_bits() || (ours.is_nan() && v.is_nan()),
                "{b:#06x}"
            );
        }
    }

    #[test]
    fn runs_as_a_candle_op_on_any_leading_shape() {
        let mut seed = 5;
        let (k, n) = (64, 24);
        let w = Q8Matrix::quantize(&noise(&mut seed, n * k), n, k).unwrap();
        let x = Tensor::from_vec(noise(&mut seed, 6 * k), (2, 3, k), &Device::Cpu).unwrap();
        let y = x.apply_op1_no_bwd(&w).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        let flat = w
            .matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), 6)
            .unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat);
        // A transposed view is refused, not misread.
        let t = Tensor::zeros((k, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(t.t().unwrap().apply_op1_no_bwd(&w).is_err());
        assert!(Q8Matrix::quantize(&[0.0; 10], 3, 4).is_err());
    }
}
