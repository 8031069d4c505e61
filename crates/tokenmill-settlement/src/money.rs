//! Money and quantities as integers, and the one rounding rule.
//!
//! Every amount is an `i64` count of micro-units of the contract's currency
//! (1 USD = 1,000,000), so two parties adding the same lines get the same
//! total to the last micro-unit on any machine; floats would not. Products
//! (tokens x price, hours x price, amount x basis points) are formed in
//! `i128` and divided once with [`div_round`], which rounds half to even
//! (banker's rounding: it has no bias up or down over many lines). Any
//! result that does not fit an `i64` is an error, never a wrap.

use crate::error::SettleError;

/// Micro-units in one unit of currency (and micro-GPU-hours in one
/// GPU-hour, micro-seconds in one second).
pub const MICRO: i128 = 1_000_000;

/// Basis points in a whole (10,000 bps = 100%).
pub const BPS: i128 = 10_000;

/// `numerator / denominator`, rounded half to even. The denominator must be
/// positive (the callers pass constants and validated prices).
pub fn div_round(numerator: i128, denominator: i128) -> Result<i128, SettleError> {
    if denominator <= 0 {
        return Err(SettleError::Overflow("division by a non-positive number"));
    }
    let q = numerator.div_euclid(denominator);
    let r = numerator.rem_euclid(denominator);
    // 0 <= r < denominator; compare 2r with the denominator without
    // overflowing: r > denominator - r.
    let up = match r.cmp(&(denominator - r)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => q % 2 != 0,
    };
    Ok(if up { q + 1 } else { q })
}

/// `a * b / denominator`, rounded half to even, as an `i64`; `what` names
/// the figure in the overflow error.
pub fn mul_div(
    a: i128,
    b: i128,
    denominator: i128,
    what: &'static str,
) -> Result<i64, SettleError> {
    let product = a.checked_mul(b).ok_or(SettleError::Overflow(what))?;
    to_i64(div_round(product, denominator)?, what)
}

/// Narrows to `i64` or reports an overflow of `what`.
pub fn to_i64(value: i128, what: &'static str) -> Result<i64, SettleError> {
    i64::try_from(value).map_err(|_| SettleError::Overflow(what))
}

/// Adds with overflow as an error.
pub fn add(a: i64, b: i64, what: &'static str) -> Result<i64, SettleError> {
    a.checked_add(b).ok_or(SettleError::Overflow(what))
}

/// Subtracts with overflow as an error.
pub fn sub(a: i64, b: i64, what: &'static str) -> Result<i64, SettleError> {
    a.checked_sub(b).ok_or(SettleError::Overflow(what))
}

/// Sums with overflow as an error.
pub fn sum<I: IntoIterator<Item = i64>>(items: I, what: &'static str) -> Result<i64, SettleError> {
    items.into_iter().try_fold(0i64, |acc, x| add(acc, x, what))
}

/// An amount of micro-units as a decimal with six places, e.g.
/// `-1.500000`: for tables only (JSON and CSV carry the integer).
pub fn format_micro(amount: i64) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// Converts a finite, non-negative `f64` count of seconds to whole
/// micro-seconds, exactly: the float's binary value times 10^6, rounded half
/// to even. Done with integers from the float's bits, so the result does not
/// depend on how a platform multiplies floats.
pub fn seconds_to_micros(seconds: f64, what: &'static str) -> Result<i64, SettleError> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(SettleError::BadQuantity {
            what,
            value: seconds,
        });
    }
    let bits = seconds.to_bits();
    let exponent_bits = ((bits >> 52) & 0x7ff) as i32;
    let fraction = (bits & ((1u64 << 52) - 1)) as i128;
    // value = mantissa * 2^exponent, exactly.
    let (mantissa, exponent) = if exponent_bits == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1i128 << 52), exponent_bits - 1075)
    };
    let scaled = mantissa * MICRO; // < 2^73: no overflow
    let micros = if exponent >= 0 {
        if exponent > 40 {
            return Err(SettleError::Overflow(what));
        }
        scaled
            .checked_mul(1i128 << exponent)
            .ok_or(SettleError::Overflow(what))?
    } else if exponent < -100 {
        // scaled < 2^73 <= 2^(-exponent - 1): below half a micro-second.
        0
    } else {
        div_round(scaled, 1i128 << (-exponent))?
    };
    to_i64(micros, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even() {
        let cases = [
            (5, 10, 0),
            (15, 10, 2),
            (25, 10, 2),
            (26, 10, 3),
            (24, 10, 2),
            (-5, 10, 0),
            (-15, 10, -2),
            (-25, 10, -2),
            (-26, 10, -3),
            (7, 1, 7),
            (1, 3, 0),
            (2, 3, 1),
        ];
        for (n, d, want) in cases {
            assert_eq!(div_round(n, d).expect("positive"), want, "{n}/{d}");
        }
        assert!(div_round(1, 0).is_err());
    }

    #[test]
    fn overflow_is_an_error() {
        assert!(mul_div(i64::MAX as i128, 2, 1, "x").is_err());
        assert!(mul_div(i128::MAX, 2, 1, "x").is_err());
        assert_eq!(
            mul_div(i64::MAX as i128, 2, 2, "x").expect("fits"),
            i64::MAX
        );
        assert!(add(i64::MAX, 1, "x").is_err());
        assert!(sub(i64::MIN, 1, "x").is_err());
        assert!(sum([i64::MAX, 1], "x").is_err());
    }

    #[test]
    fn seconds_convert_exactly() {
        assert_eq!(seconds_to_micros(0.0, "s").expect("ok"), 0);
        assert_eq!(seconds_to_micros(10.0, "s").expect("ok"), 10_000_000);
        assert_eq!(seconds_to_micros(7.5, "s").expect("ok"), 7_500_000);
        assert_eq!(seconds_to_micros(0.25, "s").expect("ok"), 250_000);
        // 0.1 is 0.1000000000000000055511151231257827... in binary.
        assert_eq!(seconds_to_micros(0.1, "s").expect("ok"), 100_000);
        // 2.5e-6 in binary is a hair above 2.5e-6 (2.50000000000000010...e-6),
        // so it rounds up; 0.5e-6 is below and rounds to 0.
        assert_eq!(seconds_to_micros(2.5e-6, "s").expect("ok"), 3);
        assert_eq!(seconds_to_micros(0.5e-6, "s").expect("ok"), 0);
        // Exactly representable halves round to even.
        // 2^-7 s = 7812.5 us and 3 * 2^-7 s = 23437.5 us: exact halves.
        assert_eq!(seconds_to_micros(0.0078125, "s").expect("ok"), 7812);
        assert_eq!(seconds_to_micros(0.0234375, "s").expect("ok"), 23438);
        assert_eq!(seconds_to_micros(f64::MIN_POSITIVE, "s").expect("ok"), 0);
        assert_eq!(
            seconds_to_micros(3600.0 * 24.0 * 366.0, "s").expect("ok"),
            31_622_400_000_000
        );
        assert!(seconds_to_micros(-1.0, "s").is_err());
        assert!(seconds_to_micros(f64::NAN, "s").is_err());
        assert!(seconds_to_micros(1e300, "s").is_err());
    }

    #[test]
    fn formats_micro_units() {
        assert_eq!(format_micro(0), "0.000000");
        assert_eq!(format_micro(1_500_000), "1.500000");
        assert_eq!(format_micro(-1), "-0.000001");
        assert_eq!(format_micro(i64::MIN), "-9223372036854.775808");
    }
}
