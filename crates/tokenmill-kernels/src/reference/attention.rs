//! Paged attention: the decode kernel (one block per query, head and
//! partition of the context, merged flash-decoding style) and the prefill
//! kernel (tiles of queries of one sequence, keys and values staged a tile
//! at a time with an online softmax), as the kernels compute them.

use crate::element::Element;
use crate::geometry::{DecodePlan, PrefillPlan};
use crate::paged::PagedMeta;

/// Heads and widths of an attention call, and where q lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Elements between one token's queries and the next's (q is read from
    /// the fused qkv rows in place).
    pub q_row_stride: usize,
}

impl AttentionShape {
    /// Width of a cache row: all kv heads of one position.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    fn kv_head(&self, head: usize) -> usize {
        head / (self.num_heads / self.num_kv_heads)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// The scaled query of `head` of token `token`, widened to f32 (the
    /// kernels stage it so in shared memory).
    fn query<T: Element>(&self, q: &[T], token: usize, head: usize) -> Vec<f32> {
        let at = token * self.q_row_stride + head * self.head_dim;
        q[at..at + self.head_dim]
            .iter()
            .map(|v| v.to_f32() * self.scale())
            .collect()
    }
}

/// One cache row of one kv head, widened.
fn cache_row<'a, T: Element>(
    cache: &'a [T],
    shape: &AttentionShape,
    slot: usize,
    kv: usize,
) -> &'a [T] {
    let at = slot * shape.kv_width() + kv * shape.head_dim;
    &cache[at..at + shape.head_dim]
}

fn dot<T: Element>(q: &[f32], k: &[T]) -> f32 {
    q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
}

/// The decode kernel's partial result for one (token, head, partition):
/// the largest score, the sum of exponentials and the normalised output.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// The largest scaled score `q·k` over the partition (`-inf` for an
    /// empty partition, past the end of a short context).
    pub max: f32,
    /// The sum of `exp(score - max)` over the partition (0 when empty);
    /// the merge weighs the partition by `sum * exp(max - overall max)`.
    pub sum: f32,
    /// The partition's attention output, `head_dim` values, already
    /// divided by `sum` (zeros when empty).
    pub out: Vec<f32>,
}

/// `tm_paged_decode`: one partition of one query's context.
fn decode_partition<T: Element>(
    meta: &PagedMeta,
    shape: &AttentionShape,
    q: &[f32],
    token: usize,
    kv: usize,
    range: std::ops::Range<usize>,
    (k_cache, v_cache): (&[T], &[T]),
) -> Partial {
    let seq = meta.token_seq[token] as usize;
    if range.is_empty() {
        return Partial {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            out: vec![0.0; shape.head_dim],
        };
    }
    let scores: Vec<f32> = range
        .clone()
        .map(|p| dot(q, cache_row(k_cache, shape, meta.slot(seq, p), kv)))
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = weights.iter().sum();
    let mut out = vec![0f32; shape.head_dim];
    for (p, w) in range.zip(&weights) {
        for (o, v) in out
            .iter_mut()
            .zip(cache_row(v_cache, shape, meta.slot(seq, p), kv))
        {
            *o += w * v.to_f32();
        }
    }
    for o in &mut out {
        *o /= sum;
    }
    Partial { max, sum, out }
}

/// `tm_paged_decode_merge`: the partitions of one query and head combined,
/// each weighted by its sum rescaled to the overall maximum.
pub fn merge_partials(partials: &[Partial], head_dim: usize) -> Vec<f32> {
    let max = partials
        .iter()
        .map(|p| p.max)
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = partials
        .iter()
        .map(|p| {
            if p.sum > 0.0 {
                p.sum * (p.max - max).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f32 = weights.iter().sum();
    let mut out = vec![0f32; head_dim];
    for (p, w) in partials.iter().zip(&weights) {
        for (o, v) in out.iter_mut().zip(&p.out) {
            *o += w * v;
        }
    }
    for o in &mut out {
        *o /= total;
    }
    out
}

/// The decode kernels over every token of `meta` (each attends to positions
/// `0..=position`): returns `[tokens, num_heads * head_dim]`.
pub fn paged_decode<T: Element>(
    meta: &PagedMeta,
    shape: &AttentionShape,
    plan: &DecodePlan,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
) -> Vec<T> {
    let width = shape.num_heads * shape.head_dim;
    let mut out = vec![T::from_f32(0.0); meta.num_tokens() * width];
    for token in 0..meta.num_tokens() {
        let context = meta.positions[token] as usize + 1;
        for head in 0..shape.num_heads {
            let query = shape.query(q, token, head);
            let kv = shape.kv_head(head);
            let partials: Vec<Partial> = (0..plan.num_partitions)
                .map(|p| {
                    let start = (p * plan.partition_size).min(context);
                    let end = ((p + 1) * plan.partition_size).min(context);
                    decode_partition(
                        meta,
                        shape,
                        &query,
                        token,
                        kv,
                        start..end,
                        (k_cache, v_cache),
                    )
                })
                .collect();
            let result = if plan.num_partitions == 1 {
                partials[0].out.clone()
            } else {
                merge_partials(&partials, shape.head_dim)
            };
            let at = token * width + head * shape.head_dim;
            for (o, r) in out[at..at + shape.head_dim].iter_mut().zip(result) {
                *o = T::from_f32(r);
            }
        }
    }
    out
}

/// The prefill kernel over the tiles of `plan`: each query of a tile keeps a
/// running maximum, sum and output while the tile's context is staged
/// `plan.kv_tile` positions at a time; positions after a query's own are
/// masked. Returns `[tokens, num_heads * head_dim]`.
pub fn paged_prefill<T: Element>(
    meta: &PagedMeta,
    shape: &AttentionShape,
    plan: &PrefillPlan,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
) -> Vec<T> {
    let width = shape.num_heads * shape.head_dim;
    let mut out = vec![T::from_f32(0.0); meta.num_tokens() * width];
    for tile in 0..plan.tile_seq.len() {
        let seq = plan.tile_seq[tile] as usize;
        let first = plan.tile_first[tile] as usize;
        let len = plan.tile_len[tile] as usize;
        let tile_context = meta.positions[first + len - 1] as usize + 1;
        for head in 0..shape.num_heads {
            let kv = shape.kv_head(head);
            let queries: Vec<Vec<f32>> = (first..first + len)
                .map(|t| shape.query(q, t, head))
                .collect();
            let mut max = vec![f32::NEG_INFINITY; len];
            let mut sum = vec![0f32; len];
            let mut acc = vec![vec![0f32; shape.head_dim]; len];
            let mut start = 0;
            while start < tile_context {
                let end = (start + plan.kv_tile).min(tile_context);
                for i in 0..len {
                    let position = meta.positions[first + i] as usize;
                    let scores: Vec<f32> = (start..end)
                        .map(|p| {
                            if p <= position {
                                dot(
                                    &queries[i],
                                    cache_row(k_cache, shape, meta.slot(seq, p), kv),
                                )
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_max = max[i].max(tile_max);
                    if new_max == f32::NEG_INFINITY {
                        continue;
                    }
                    let correction = (max[i] - new_max).exp();
                    sum[i] *= correction;
                    for a in &mut acc[i] {
                        *a *= correction;
                    }
                    for (p, s) in (start..end).zip(&scores) {
                        let w = (s - new_max).exp();
                        if w == 0.0 {
                            continue;
                        }
                        sum[i] += w;
                        let v = cache_row(v_cache, shape, meta.slot(seq, p), kv);
                        for (a, v) in acc[i].iter_mut().zip(v) {
                            *a += w * v.to_f32();
                        }
                    }
                    max[i] = new_max;
                }
                start = end;
            }
            for i in 0..len {
                let at = (first + i) * width + head * shape.head_dim;
                for (o, a) in out[at..at + shape.head_dim].iter_mut().zip(&acc[i]) {
                    *o = T::from_f32(a / sum[i]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{max_relative_error, to_f32_vec};
    use crate::geometry::{decode_plan, prefill_plan};
    use crate::testing::{
        attention_case, attention_shapes, decode_sequences, dense_attention, prefill_sequences,
        Rng, ATTENTION_OUTPUT_SCALE,
    };
    use half::bf16;

    fn check_decode<T: Element>(seed: u64, sms: usize) {
        let mut rng = Rng::new(seed);
        for shape in attention_shapes() {
            let sequences = decode_sequences(&mut rng);
            for block_size in [1, 7, 16] {
                let c = attention_case::<T>(&mut rng, shape, block_size, &sequences);
                let plan = decode_plan(
                    shape.num_heads,
                    c.meta.num_tokens(),
                    c.meta.max_context,
                    shape.head_dim,
                    sms,
                )
                .unwrap();
                let got = paged_decode(&c.meta, &shape, &plan, &c.q, &c.k_cache, &c.v_cache);
                let err = max_relative_error(
                    &to_f32_vec(&got),
                    &dense_attention(&c),
                    ATTENTION_OUTPUT_SCALE,
                )
                .unwrap();
                assert!(
                    err < T::TOLERANCE * 2.0,
                    "seed {seed}: {shape:?} blocks of {block_size}, {plan:?}: error {err}"
                );
            }
        }
    }

    #[test]
    fn decode_matches_dense_attention_in_f32_split_or_not() {
        let seed = rand::random();
        // 1 SM: whole partitions; 1000 SMs: split down to the minimum.
        check_decode::<f32>(seed, 1);
        check_decode::<f32>(seed, 1000);
    }

    #[test]
    fn decode_matches_dense_attention_in_bf16() {
        check_decode::<bf16>(rand::random(), 132);
    }

    fn check_prefill<T: Element>(seed: u64) {
        let mut rng = Rng::new(seed);
        for shape in attention_shapes() {
            let sequences = prefill_sequences(&mut rng);
            for block_size in [1, 5, 16] {
                let c = attention_case::<T>(&mut rng, shape, block_size, &sequences);
                let plan = prefill_plan(&c.meta, shape.num_heads, shape.head_dim).unwrap();
                let got = paged_prefill(&c.meta, &shape, &plan, &c.q, &c.k_cache, &c.v_cache);
                let err = max_relative_error(
                    &to_f32_vec(&got),
                    &dense_attention(&c),
                    ATTENTION_OUTPUT_SCALE,
                )
                .unwrap();
                assert!(
                    err < T::TOLERANCE * 2.0,
                    "seed {seed}: {shape:?} blocks of {block_size}: error {err}"
                );
            }
        }
    }

    #[test]
    fn prefill_matches_dense_attention_in_f32() {
        check_prefill::<f32>(rand::random());
    }

    #[test]
    fn prefill_matches_dense_attention_in_bf16() {
        check_prefill::<bf16>(rand::random());
    }

    #[test]
    fn merging_skips_empty_partitions() {
        let partials = [
            Partial {
                max: 1.0,
                sum: 2.0,
                out: vec![1.0, 3.0],
            },
            Partial {
                max: f32::NEG_INFINITY,
                sum: 0.0,
                out: vec![0.0, 0.0],
            },
            Partial {
                max: 1.0 + 2f32.ln(),
                sum: 1.0,
                out: vec![4.0, 0.0],
            },
        ];
        // Weights 2 and 1 * e^(ln 2) = 2: the mean of the two outputs.
        let merged = merge_partials(&partials, 2);
        assert!(
            (merged[0] - 2.5).abs() < 1e-6 && (merged[1] - 1.5).abs() < 1e-6,
            "{merged:?}"
        );
    }
}
