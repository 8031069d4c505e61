//! Decode attention that reads keys and values where they lie in the paged
//! cache, block by block, instead of gathering them into a contiguous copy:
//! the CPU reference of the paged-attention decode kernel.
//!
//! The forward does not use it yet: its summation order differs from the
//! prefill path's matmuls, so a sequence recomputed after preemption could
//! part ways with its first run at a close greedy choice. It becomes the hot
//! path once prefill attention runs over blocks in the same order.

/// Shapes of one decode-attention call.
#[derive(Clone, Copy, Debug)]
pub struct DecodeShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; each serves `num_heads / num_kv_heads` query heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
}

impl DecodeShape {
    fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Softmax attention of one query token (`q`: `[num_heads * head_dim]`) over
/// the first `context_len` positions of a sequence whose cache rows
/// (`keys`, `values`: `[slots, num_kv_heads * head_dim]`) are found through
/// `block_table`. Returns `[num_heads * head_dim]`.
pub fn paged_decode_attention(
    shape: DecodeShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    block_table: &[u32],
    context_len: usize,
) -> Vec<f32> {
    let DecodeShape {
        num_heads,
        head_dim,
        block_size,
        ..
    } = shape;
    let kv_width = shape.kv_width();
    let group = num_heads / shape.num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row = |p: usize| {
        let slot = block_table[p / block_size] as usize * block_size + p % block_size;
        slot * kv_width..(slot + 1) * kv_width
    };

    // Scores, head-major: each cached key row is read once for all heads.
    let mut scores = vec![0f32; num_heads * context_len];
    for p in 0..context_len {
        let k = &keys[row(p)];
        for h in 0..num_heads {
            let kv = h / group;
            let qh = &q[h * head_dim..(h + 1) * head_dim];
            let kh = &k[kv * head_dim..(kv + 1) * head_dim];
            scores[h * context_len + p] = dot(qh, kh) * scale;
        }
    }
    for h in 0..num_heads {
        softmax_in_place(&mut scores[h * context_len..(h + 1) * context_len]);
    }

    // Weighted sum of values, again one pass over the cached rows.
    let mut out = vec![0f32; num_heads * head_dim];
    for p in 0..context_len {
        let v = &values[row(p)];
        for h in 0..num_heads {
            let kv = h / group;
            let w = scores[h * context_len + p];
            let vh = &v[kv * head_dim..(kv + 1) * head_dim];
            for (o, x) in out[h * head_dim..(h + 1) * head_dim].iter_mut().zip(vh) {
                *o += w * x;
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four independent accumulators let the compiler vectorise the loop.
    let mut acc = [0f32; 4];
    let chunks = a.len() / 4;
    for i in 0..chunks {
        for j in 0..4 {
            acc[j] += a[4 * i + j] * b[4 * i + j];
        }
    }
    let tail: f32 = a[4 * chunks..]
        .iter()
        .zip(&b[4 * chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

fn softmax_in_place(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, over a gathered contiguous context.
    fn reference(shape: DecodeShape, q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<f32> {
        let group = shape.num_heads / shape.num_kv_heads;
        let d = shape.head_dim;
        let mut out = vec![0f32; shape.num_heads * d];
        for h in 0..shape.num_heads {
            let kv = h / group;
            let s: Vec<f32> = k
                .iter()
                .map(|row| {
                    (0..d).map(|i| q[h * d + i] * row[kv * d + i]).sum::<f32>() / (d as f32).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for (p, row) in v.iter().enumerate() {
                for i in 0..d {
                    out[h * d + i] += e[p] / z * row[kv * d + i];
                }
            }
        }
        out
    }

    /// A small deterministic generator so the test needs no extra crate.
    fn noise(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn matches_the_definition_over_scattered_blocks() {
        let mut seed = 42;
        for (heads, kv_heads, dim, block, ctx) in [
            (9usize, 3usize, 64usize, 16usize, 37usize),
            (4, 4, 8, 4, 1),
            (8, 2, 12, 3, 50),
            (6, 1, 5, 7, 7),
        ] {
            let shape = DecodeShape {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: dim,
                block_size: block,
            };
            let blocks = ctx.div_ceil(block);
            let num_blocks = blocks + 3;
            // Scattered table: every other block, from the end.
            let table: Vec<u32> = (0..blocks as u32)
                .map(|b| (num_blocks as u32 - 1) - b)
                .collect();
            let width = kv_heads * dim;
            let cache = |seed: &mut u64| {
                (0..num_blocks * block * width)
                    .map(|_| noise(seed))
                    .collect::<Vec<f32>>()
            };
            let (keys, values) = (cache(&mut seed), cache(&mut seed));
            let q: Vec<f32> = (0..heads * dim).map(|_| noise(&mut seed)).collect();
            let gather = |c: &[f32]| -> Vec<Vec<f32>> {
                (0..ctx)
                    .map(|p| {
                        let slot = table[p / block] as usize * block + p % block;
                        c[slot * width..(slot + 1) * width].to_vec()
                    })
                    .collect()
            };
            let expected = reference(shape, &q, &gather(&keys), &gather(&values));
            let got = paged_decode_attention(shape, &q, &keys, &values, &table, ctx);
            for (a, b) in expected.iter().zip(&got) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b} for {shape:?}");
            }
        }
    }
}
