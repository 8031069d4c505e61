//! SiLU-and-multiply: the gate of a Llama MLP applied to its up projection,
//! reading the fused gate|up rows in place.

use crate::element::Element;

/// `tm_silu_and_mul`: for each row `[gate | up]` of `gate_up`
/// (`[rows, 2 * width]`), `silu(gate) * up` (`[rows, width]`).
pub fn silu_and_mul<T: Element>(gate_up: &[T], width: usize) -> Vec<T> {
    gate_up
        .chunks_exact(2 * width)
        .flat_map(|row| {
            let (gate, up) = row.split_at(width);
            gate.iter().zip(up).map(|(g, u)| {
                let g = g.to_f32();
                T::from_f32(g / (1.0 + (-g).exp()) * u.to_f32())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{max_relative_error, to_f32_vec};
    use half::bf16;
    use rand::{Rng, SeedableRng};

    fn check<T: Element>(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (rows, width) in [(1, 1), (3, 5), (2, 1536), (1, 14336)] {
            let gate_up: Vec<T> = (0..rows * 2 * width)
                .map(|_| T::from_f32(rng.random_range(-30.0..30.0)))
                .collect();
            let want: Vec<f32> = gate_up
                .chunks(2 * width)
                .flat_map(|row| {
                    (0..width).map(move |i| {
                        let (g, u) = (row[i].to_f32() as f64, row[width + i].to_f32() as f64);
                        (g * u / (1.0 + (-g).exp())) as f32
                    })
                })
                .collect();
            let got = to_f32_vec(&silu_and_mul(&gate_up, width));
            let err = max_relative_error(&got, &want, 1e-2).unwrap();
            assert!(err < T::TOLERANCE, "{rows}x{width}: {err}");
        }
    }

    #[test]
    fn silu_and_mul_matches_f64_even_for_saturated_gates() {
        check::<f32>(rand::random());
        check::<bf16>(rand::random());
    }
}
