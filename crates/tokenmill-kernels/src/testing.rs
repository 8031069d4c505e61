//! Random inputs for comparing kernels with their references: the unit
//! tests here and the kernel check suite ([`crate::check`], run on a GPU
//! by scripts/gpu-check.sh and on the kernels' CPU emulator in CI) draw
//! from the same generators, so a shape the CPU tests cover is a shape the
//! GPU check covers.

use crate::element::Element;
use crate::paged::{ChunkSpec, PagedMeta};
use crate::reference::attention::AttentionShape;

/// A small counter-based generator (SplitMix64): seeded, fast, and enough
/// for test inputs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.range(0, i + 1));
        }
    }

    /// `n` values uniform in `[lo, hi)`, rounded to `T`.
    pub fn values<T: Element>(&mut self, n: usize, lo: f32, hi: f32) -> Vec<T> {
        (0..n).map(|_| T::from_f32(self.uniform(lo, hi))).collect()
    }
}

/// A batch over a paged cache: block tables drawn from shuffled blocks,
/// random queries (in rows of `shape.q_row_stride`) and cache contents in
/// `[-2, 2)`.
#[derive(Clone, Debug)]
pub struct AttentionCase<T> {
    /// The step: one chunk of new tokens per sequence, each sequence's
    /// block table a run of the shuffled block ids.
    pub meta: PagedMeta,
    /// The head layout the queries and the cache are laid out for.
    pub shape: AttentionShape,
    /// Blocks in each cache: those the tables use plus three that no table
    /// points at (so reading outside a table reads someone else's data).
    pub num_blocks: usize,
    /// The queries: `[tokens, shape.q_row_stride]`, only the first
    /// `num_heads * head_dim` of each row read.
    pub q: Vec<T>,
    /// The key cache: `[num_blocks * block_size slots, shape.kv_width()]`.
    pub k_cache: Vec<T>,
    /// The value cache, laid out as `k_cache`.
    pub v_cache: Vec<T>,
}

/// Draws a case: one sequence per `(context_len, new_tokens)`.
pub fn attention_case<T: Element>(
    rng: &mut Rng,
    shape: AttentionShape,
    block_size: usize,
    sequences: &[(usize, usize)],
) -> AttentionCase<T> {
    let needed: usize = sequences.iter().map(|(c, _)| c.div_ceil(block_size)).sum();
    let num_blocks = needed + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let mut tables = Vec::new();
    let mut next = 0;
    for (context, _) in sequences {
        let n = context.div_ceil(block_size);
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    let meta = PagedMeta::new(
        block_size,
        num_blocks,
        sequences
            .iter()
            .zip(&tables)
            .map(|((context, new), table)| ChunkSpec {
                num_tokens: *new,
                context_len: *context,
                block_table: table,
            }),
    )
    .expect("the drawn tables cover their contexts");
    let slots = num_blocks * block_size;
    AttentionCase {
        q: rng.values(meta.num_tokens() * shape.q_row_stride, -2.0, 2.0),
        k_cache: rng.values(slots * shape.kv_width(), -2.0, 2.0),
        v_cache: rng.values(slots * shape.kv_width(), -2.0, 2.0),
        meta,
        shape,
        num_blocks,
    }
}

/// Head layouts the attention checks cover: SmolLM2's (9 heads over 3 kv
/// heads of 64, q read from fused qkv rows), plain multi-head with an odd
/// width, and 4 queries per kv head of the widest heads.
pub fn attention_shapes() -> Vec<AttentionShape> {
    vec![
        AttentionShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            q_row_stride: 9 * 64 + 2 * 3 * 64,
        },
        AttentionShape {
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 6,
            q_row_stride: 12,
        },
        AttentionShape {
            num_heads: 4,
            num_kv_heads: 1,
            head_dim: 256,
            q_row_stride: 4 * 256,
        },
    ]
}

/// Decode batches: three sequences of one new token each.
pub fn decode_sequences(rng: &mut Rng) -> Vec<(usize, usize)> {
    (0..3).map(|_| (rng.range(1, 1300), 1)).collect()
}

/// Mixed batches: a fresh prompt, a chunk after cached blocks, a decode token.
pub fn prefill_sequences(rng: &mut Rng) -> Vec<(usize, usize)> {
    let prompt = rng.range(1, 70);
    vec![
        (prompt, prompt),
        (rng.range(40, 200), rng.range(1, 40)),
        (rng.range(1, 90), 1),
    ]
}

/// Softmax attention in f64 over each token's gathered context: the plain
/// formulation the references are tested against. `[tokens, heads * head_dim]`.
pub fn dense_attention<T: Element>(c: &AttentionCase<T>) -> Vec<f32> {
    let s = &c.shape;
    let mut out = Vec::new();
    for token in 0..c.meta.num_tokens() {
        let seq = c.meta.token_seq[token] as usize;
        let context = c.meta.positions[token] as usize + 1;
        for head in 0..s.num_heads {
            let kv = head / (s.num_heads / s.num_kv_heads);
            let q: Vec<f64> = (0..s.head_dim)
                .map(|d| c.q[token * s.q_row_stride + head * s.head_dim + d].to_f32() as f64)
                .collect();
            let row = |cache: &[T], p: usize| -> Vec<f64> {
                let at = c.meta.slot(seq, p) * s.kv_width() + kv * s.head_dim;
                cache[at..at + s.head_dim]
                    .iter()
                    .map(|v| v.to_f32() as f64)
                    .collect()
            };
            let scores: Vec<f64> = (0..context)
                .map(|p| {
                    row(&c.k_cache, p)
                        .iter()
                        .zip(&q)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                        / (s.head_dim as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut o = vec![0f64; s.head_dim];
            for (p, w) in weights.iter().enumerate() {
                for (o, v) in o.iter_mut().zip(row(&c.v_cache, p)) {
                    *o += w * v / total;
                }
            }
            out.extend(o.iter().map(|x| *x as f32));
        }
    }
    out
}

/// Attention outputs are convex combinations of values in `[-2, 2)`: their
/// errors are measured relative to at least this, not to outputs that
/// happen to cancel to near zero.
pub const ATTENTION_OUTPUT_SCALE: f32 = 0.25;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_seeded_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<f32> = (0..1000).map(|_| a.uniform(-2.0, 2.0)).collect();
        let ys: Vec<f32> = (0..1000).map(|_| b.uniform(-2.0, 2.0)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (-2.0..2.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.2, "mean {mean}");
        let mut items: Vec<u32> = (0..50).collect();
        a.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(items, sorted);
    }
}
