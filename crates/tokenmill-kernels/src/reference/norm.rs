//! RMSNorm, alone (a layer's first norm) and fused with the residual add
//! that precedes every other norm in a Llama layer, so the hidden state is
//! read once and written once per norm.

use crate::element::Element;

/// `tm_rms_norm`: each row of `x` (`[rows, width]`) times `weight` over its
/// root mean square.
pub fn rms_norm<T: Element>(x: &[T], weight: &[T], eps: f32) -> Vec<T> {
    let width = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let row: Vec<f32> = row.iter().map(|v| v.to_f32()).collect();
        normalise_into(&row, weight, eps, &mut out);
    }
    out
}

/// `tm_fused_add_rms_norm`: the new residual `residual + x` (stored in `T`,
/// as the next layer reads it) and its RMSNorm, in that order.
pub fn fused_add_rms_norm<T: Element>(
    x: &[T],
    residual: &[T],
    weight: &[T],
    eps: f32,
) -> (Vec<T>, Vec<T>) {
    let width = weight.len();
    let mut new_residual = Vec::with_capacity(x.len());
    let mut out = Vec::with_capacity(x.len());
    for (x, r) in x.chunks_exact(width).zip(residual.chunks_exact(width)) {
        let sum: Vec<f32> = x
            .iter()
            .zip(r)
            .map(|(x, r)| {
                let sum = T::from_f32(r.to_f32() + x.to_f32());
                new_residual.push(sum);
                sum.to_f32()
            })
            .collect();
        normalise_into(&sum, weight, eps, &mut out);
    }
    (new_residual, out)
}

fn normalise_into<T: Element>(row: &[f32], weight: &[T], eps: f32, out: &mut Vec<T>) {
    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    out.extend(
        row.iter()
            .zip(weight)
            .map(|(v, w)| T::from_f32(v * scale * w.to_f32())),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{max_relative_error, to_f32_vec};
    use half::bf16;
    use rand::{Rng, SeedableRng};

    /// RMSNorm in f64.
    fn plain(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        x.chunks(w.len())
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
                row.iter()
                    .zip(w)
                    .map(move |(v, w)| v / (ms + eps).sqrt() * w)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn check<T: Element>(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (rows, width) in [(1, 1), (3, 7), (5, 576), (2, 4096), (1, 4097)] {
            let mut random = |n: usize, scale: f32| -> Vec<T> {
                (0..n)
                    .map(|_| T::from_f32(rng.random_range(-scale..scale)))
                    .collect()
            };
            let x = random(rows * width, 3.0);
            let residual = random(rows * width, 3.0);
            let weight = random(width, 1.5);
            let w64: Vec<f64> = weight.iter().map(|w| w.to_f32() as f64).collect();

            let got = to_f32_vec(&rms_norm(&x, &weight, 1e-5));
            let x64: Vec<f64> = x.iter().map(|v| v.to_f32() as f64).collect();
            let want: Vec<f32> = plain(&x64, &w64, 1e-5).iter().map(|v| *v as f32).collect();
            let err = max_relative_error(&got, &want, 0.05).unwrap();
            assert!(err < T::TOLERANCE, "rms_norm {rows}x{width}: {err}");

            let (new_residual, got) = fused_add_rms_norm(&x, &residual, &weight, 1e-5);
            let got = to_f32_vec(&got);
            let sum: Vec<f64> = x
                .iter()
                .zip(&residual)
                .map(|(a, b)| T::from_f32(a.to_f32() + b.to_f32()).to_f32() as f64)
                .collect();
            assert_eq!(
                to_f32_vec(&new_residual),
                sum.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                "the residual holds x + residual"
            );
            let want: Vec<f32> = plain(&sum, &w64, 1e-5).iter().map(|v| *v as f32).collect();
            let err = max_relative_error(&got, &want, 0.05).unwrap();
            assert!(err < T::TOLERANCE, "fused {rows}x{width}: {err}");
        }
    }

    #[test]
    fn rms_norms_match_f64_in_f32_and_bf16() {
        check::<f32>(rand::random());
        check::<bf16>(rand::random());
    }
}
