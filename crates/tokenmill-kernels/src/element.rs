//! The element types the kernels read and write, as the CPU references see
//! them: values are widened to f32 for arithmetic and rounded back on store,
//! exactly as the kernels do (they accumulate in f32 whatever they store).

use half::{bf16, f16};

/// A storage type of activations and of the KV cache.
pub trait Element: Copy + Default + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// The suffix of the kernels for this type (`tm_rms_norm_bf16`).
    const NAME: &'static str;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type (to nearest, ties to even).
    fn from_f32(value: f32) -> Self;
    /// The relative error a kernel's output may show against the reference:
    /// the type's rounding plus reordered f32 sums.
    const TOLERANCE: f32;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(value: f32) -> Self {
        value
    }
    const TOLERANCE: f32 = 1e-5;
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
    const TOLERANCE: f32 = 1e-2;
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
    const TOLERANCE: f32 = 2e-3;
}

/// Widens a slice.
pub fn to_f32_vec<T: Element>(values: &[T]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// Rounds a slice.
pub fn from_f32_vec<T: Element>(values: &[f32]) -> Vec<T> {
    values.iter().map(|v| T::from_f32(*v)).collect()
}

/// The largest error of `actual` against `expected`, relative to
/// `max(|expected|, floor)`: near zero an absolute error of `floor`-scale is
/// what rounding of the inputs leaves. `None` if a value is NaN or the
/// lengths differ.
pub fn max_relative_error(actual: &[f32], expected: &[f32], floor: f32) -> Option<f32> {
    if actual.len() != expected.len() {
        return None;
    }
    let mut worst = 0f32;
    for (a, e) in actual.iter().zip(expected) {
        if a.is_nan() || e.is_nan() {
            return None;
        }
        worst = worst.max((a - e).abs() / e.abs().max(floor));
    }
    Some(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(
            bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(),
            1.0 + 4.0 / 256.0
        );
    }

    #[test]
    fn relative_error_uses_the_floor_near_zero_and_rejects_nan() {
        assert_eq!(max_relative_error(&[1.1], &[1.0], 1e-3), Some(0.100000024));
        assert!(max_relative_error(&[1e-6], &[0.0], 1e-3).unwrap() < 1.1e-3);
        assert_eq!(max_relative_error(&[f32::NAN], &[0.0], 1e-3), None);
        assert_eq!(max_relative_error(&[1.0], &[], 1e-3), None);
    }
}
