//! Primitive fields of the canonical encoding: big-endian fixed-width
//! integers, length-prefixed UTF-8, finite f64 as IEEE-754 bits, and
//! timestamps as signed seconds plus nanoseconds.
//!
//! The writer refuses values that would have two encodings or none (NaN,
//! infinities, over-long strings) and the reader refuses every byte string
//! the writer could not have produced, so that decoding and re-encoding a
//! record gives back the same bytes, and hence the same hash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a value cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A float field is NaN or infinite: such a value has no meaning in a
    /// bill and would compare unequal to itself.
    #[error("field {0} is not a finite number")]
    NonFinite(&'static str),
    /// A string or list is longer than a u32 length prefix can say, or the
    /// record is over [`crate::MAX_RECORD_BYTES`].
    #[error("field {0} is too long")]
    TooLong(&'static str),
    /// A timestamp lies outside the range of i64 seconds.
    #[error("field {0} is out of the representable time range")]
    TimeOutOfRange(&'static str),
}

/// Why bytes are not a canonical record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a field.
    #[error("record ends inside a field at byte {0}")]
    Truncated(usize),
    /// Bytes remain after the last field.
    #[error("{0} bytes after the end of the record")]
    TrailingBytes(usize),
    /// The record's format version is not one this build reads.
    #[error("unsupported record version {0}")]
    UnknownVersion(u8),
    /// An enum tag has no meaning.
    #[error("unknown {what} tag {tag} at byte {offset}")]
    UnknownTag {
        /// Which enum.
        what: &'static str,
        /// The tag found.
        tag: u8,
        /// Byte offset of the tag in the record.
        offset: usize,
    },
    /// A string is not valid UTF-8.
    #[error("invalid UTF-8 in the string at byte {0}")]
    BadUtf8(usize),
    /// A value the encoder never writes (NaN, -0.0, nanoseconds of a
    /// second or more, a time outside the platform's range).
    #[error("non-canonical {what} at byte {offset}")]
    NonCanonical {
        /// What was wrong.
        what: &'static str,
        /// Byte offset of the field in the record.
        offset: usize,
    },
}

/// Appends canonical fields to a byte buffer.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }

    /// A u32 length prefix, then the UTF-8 bytes.
    pub(crate) fn str(&mut self, field: &'static str, v: &str) -> Result<(), EncodeError> {
        self.len(field, v.len())?;
        self.out.extend_from_slice(v.as_bytes());
        Ok(())
    }

    /// A u32 count of list items or string bytes.
    pub(crate) fn len(&mut self, field: &'static str, n: usize) -> Result<(), EncodeError> {
        let n = u32::try_from(n).map_err(|_| EncodeError::TooLong(field))?;
        self.u32(n);
        Ok(())
    }

    /// The IEEE-754 bits of a finite f64; -0.0 is written as +0.0 so that
    /// two values that compare equal have the same bytes.
    pub(crate) fn f64(&mut self, field: &'static str, v: f64) -> Result<(), EncodeError> {
        if !v.is_finite() {
            return Err(EncodeError::NonFinite(field));
        }
        let v = if v == 0.0 { 0.0 } else { v };
        self.u64(v.to_bits());
        Ok(())
    }

    /// Seconds since the Unix epoch as i64 (floor), then nanoseconds in
    /// `0..1_000_000_000` as u32: one form for every instant, also before 1970.
    pub(crate) fn time(&mut self, field: &'static str, t: SystemTime) -> Result<(), EncodeError> {
        let (secs, nanos) = split_time(t).ok_or(EncodeError::TimeOutOfRange(field))?;
        self.i64(secs);
        self.u32(nanos);
        Ok(())
    }
}

/// Splits an instant into floor seconds since the epoch and nanoseconds.
pub(crate) fn split_time(t: SystemTime) -> Option<(i64, u32)> {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Some((i64::try_from(d.as_secs()).ok()?, d.subsec_nanos())),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).ok()?.checked_neg()?;
            if d.subsec_nanos() == 0 {
                Some((secs, 0))
            } else {
                Some((secs.checked_sub(1)?, 1_000_000_000 - d.subsec_nanos()))
            }
        }
    }
}

/// The instant `secs` seconds plus `nanos` after the epoch, if the platform
/// can represent it.
pub(crate) fn join_time(secs: i64, nanos: u32) -> Option<SystemTime> {
    if nanos >= 1_000_000_000 {
        return None;
    }
    let whole = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))?
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
    };
    whole.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// Reads canonical fields from a byte slice, remembering the offset for
/// error messages.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.data.len() - self.pos {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or(DecodeError::Truncated(self.pos))?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let at = self.pos;
        self.take(N)?
            .try_into()
            .map_err(|_| DecodeError::Truncated(at))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    pub(crate) fn hash(&mut self) -> Result<[u8; 32], DecodeError> {
        self.array()
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let at = self.pos;
        let n = self.len()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadUtf8(at))
    }

    /// A u32 count; a count larger than the bytes left is caught by the
    /// reads that follow, never by allocating for it.
    pub(crate) fn len(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        usize::try_from(self.u32()?).map_err(|_| DecodeError::Truncated(at))
    }

    pub(crate) fn f64(&mut self) -> Result<f64, DecodeError> {
        let at = self.pos;
        let bits = self.u64()?;
        let v = f64::from_bits(bits);
        if !v.is_finite() {
            return Err(DecodeError::NonCanonical {
                what: "non-finite float",
                offset: at,
            });
        }
        if bits == (-0.0f64).to_bits() {
            return Err(DecodeError::NonCanonical {
                what: "negative zero",
                offset: at,
            });
        }
        Ok(v)
    }

    pub(crate) fn time(&mut self) -> Result<SystemTime, DecodeError> {
        let at = self.pos;
        let secs = self.i64()?;
        let nanos = self.u32()?;
        join_time(secs, nanos).ok_or(DecodeError::NonCanonical {
            what: "timestamp",
            offset: at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_around_the_epoch() {
        for (secs, nanos) in [
            (0i64, 0u32),
            (0, 1),
            (-1, 0),
            (-1, 999_999_999),
            (1_700_000_000, 123_456_789),
            (-86_400 * 365, 5),
        ] {
            let t = join_time(secs, nanos).expect("representable");
            assert_eq!(split_time(t), Some((secs, nanos)));
        }
        assert_eq!(join_time(0, 1_000_000_000), None);
    }

    #[test]
    fn floats_are_canonical() {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.f64("x", -0.0).expect("finite");
        assert_eq!(out, 0u64.to_be_bytes());
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        assert_eq!(w.f64("x", f64::NAN), Err(EncodeError::NonFinite("x")));
        assert!(Reader::new(&(-0.0f64).to_bits().to_be_bytes())
            .f64()
            .is_err());
        assert!(Reader::new(&f64::INFINITY.to_bits().to_be_bytes())
            .f64()
            .is_err());
    }
}
