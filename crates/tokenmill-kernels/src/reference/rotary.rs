//! Rotary position embedding applied in place to the query and key heads of
//! the fused qkv rows (they lie side by side at the start of each row).

use crate::element::Element;

/// Which elements of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotaryStyle {
    /// GPT-NeoX and Hugging Face Llama: element `i` with `i + head_dim / 2`.
    Neox,
    /// GGUF Llama (GPT-J): element `2i` with `2i + 1`.
    Interleaved,
}

/// `tm_rotary`: rotates the first `num_heads` heads of each row of `rows`
/// (rows `row_stride` apart) by the row's position, using the tables `cos`
/// and `sin` (`[positions, head_dim / 2]`, f32).
#[allow(clippy::too_many_arguments)]
pub fn rotate<T: Element>(
    rows: &mut [T],
    row_stride: usize,
    num_heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    style: RotaryStyle,
) {
    let half = head_dim / 2;
    for (token, position) in positions.iter().enumerate() {
        let table = *position as usize * half;
        for head in 0..num_heads {
            let at = token * row_stride + head * head_dim;
            let x = &mut rows[at..at + head_dim];
            for i in 0..half {
                let (a, b) = match style {
                    RotaryStyle::Neox => (i, i + half),
                    RotaryStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (c, s) = (cos[table + i], sin[table + i]);
                let (u, v) = (x[a].to_f32(), x[b].to_f32());
                x[a] = T::from_f32(u * c - v * s);
                x[b] = T::from_f32(u * s + v * c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    /// The rotation as multiplication by e^(i theta) of complex pairs, in f64.
    fn check<T: Element>(seed: u64, style: RotaryStyle) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (tokens, heads, head_dim, extra) in [(1, 1, 2, 0), (3, 5, 64, 7), (4, 40, 128, 1024)] {
            let half = head_dim / 2;
            let max_pos = 300;
            let theta: Vec<f64> = (0..max_pos * half)
                .map(|i| {
                    (i / half) as f64 * 10000f64.powf(-2.0 * (i % half) as f64 / head_dim as f64)
                })
                .collect();
            let cos: Vec<f32> = theta.iter().map(|t| t.cos() as f32).collect();
            let sin: Vec<f32> = theta.iter().map(|t| t.sin() as f32).collect();
            let stride = heads * head_dim + extra;
            let original: Vec<T> = (0..tokens * stride)
                .map(|_| T::from_f32(rng.random_range(-4.0..4.0)))
                .collect();
            let positions: Vec<u32> = (0..tokens)
                .map(|_| rng.random_range(0..max_pos as u32))
                .collect();
            let mut rows = original.clone();
            rotate(
                &mut rows, stride, heads, head_dim, &positions, &cos, &sin, style,
            );
            for (t, p) in positions.iter().enumerate() {
                // Elements past the heads are untouched.
                let tail = t * stride + heads * head_dim..(t + 1) * stride;
                assert_eq!(rows[tail.clone()], original[tail]);
                for h in 0..heads {
                    for i in 0..half {
                        let (a, b) = match style {
                            RotaryStyle::Neox => (i, i + half),
                            RotaryStyle::Interleaved => (2 * i, 2 * i + 1),
                        };
                        let at = t * stride + h * head_dim;
                        let (u, v) = (
                            original[at + a].to_f32() as f64,
                            original[at + b].to_f32() as f64,
                        );
                        let th = theta[*p as usize * half + i];
                        let want = [u * th.cos() - v * th.sin(), u * th.sin() + v * th.cos()];
                        for (got, want) in [rows[at + a], rows[at + b]].iter().zip(want) {
                            let err = (got.to_f32() as f64 - want).abs() / want.abs().max(0.05);
                            assert!(
                                err < T::TOLERANCE as f64 * 4.0,
                                "{style:?} token {t} head {h} pair {i}: {err}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rotation_matches_complex_multiplication() {
        for style in [RotaryStyle::Neox, RotaryStyle::Interleaved] {
            check::<f32>(rand::random(), style);
            check::<bf16>(rand::random(), style);
        }
    }
}
