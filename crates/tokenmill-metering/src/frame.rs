//! The on-disk framing shared by segment files and the checkpoints file.
//!
//! A file starts with a 22-byte header (magic, file kind, version, first
//! sequence number, CRC-32 of those 18 bytes) and holds frames:
//! `u32 length | payload | u32 CRC-32(length bytes || payload)`. The CRC
//! tells a frame cut short by a crash, or damaged, from a whole one, without
//! decoding it; the record hash chain and the signed checkpoints are what
//! protect against deliberate changes.

use std::path::Path;

/// The first eight bytes of every ledger file.
pub const MAGIC: &[u8; 8] = b"TMLEDGER";
/// Version of the file framing (independent of the record format version).
pub const FILE_VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_BYTES: usize = 8 + 1 + 1 + 8 + 4;
/// Frame overhead: length and CRC.
pub const FRAME_OVERHEAD: usize = 8;
/// Largest payload a frame may declare; a larger length is damage, and
/// bounds what a reader trusts.
pub const MAX_PAYLOAD: usize = crate::record::MAX_RECORD_BYTES;

/// The file kind byte of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A segment of records.
    Segment = 1,
    /// The checkpoints file.
    Checkpoints = 2,
    /// The cosigned checkpoints file (witness cosignatures).
    Cosignatures = 3,
}

/// Extension of segment files: `<first seq, 20 digits>.seg`.
pub const SEGMENT_EXT: &str = "seg";
/// Name of the checkpoints file.
pub const CHECKPOINTS_FILE: &str = "checkpoints";
/// Name of the file of cosigned checkpoints.
pub const COSIGNATURES_FILE: &str = "cosignatures";

/// The file name of the segment whose first record is `first_seq`. Twenty
/// digits, so names sort like the numbers.
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.{SEGMENT_EXT}")
}

/// The first sequence number a segment file's name says, if it is one.
pub fn parse_segment_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The header of a file.
pub fn header(kind: FileKind, first_seq: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8] = kind as u8;
    h[9] = FILE_VERSION;
    h[10..18].copy_from_slice(&first_seq.to_be_bytes());
    let crc = crc32fast::hash(&h[..18]);
    h[18..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// What is wrong with a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    /// The file is shorter than a header, or the header was never written
    /// (all zero): a file created just before a crash.
    Torn,
    /// The header is there but wrong.
    Bad(String),
}

/// Reads a header of `kind` and returns the first sequence number it holds.
pub fn parse_header(data: &[u8], kind: FileKind) -> Result<u64, HeaderProblem> {
    let Some(h) = data.get(..HEADER_BYTES) else {
        return Err(HeaderProblem::Torn);
    };
    if h.iter().all(|&b| b == 0) {
        return Err(HeaderProblem::Torn);
    }
    if &h[..8] != MAGIC {
        return Err(HeaderProblem::Bad("not a ledger file (bad magic)".into()));
    }
    let crc = u32::from_be_bytes([h[18], h[19], h[20], h[21]]);
    if crc != crc32fast::hash(&h[..18]) {
        return Err(HeaderProblem::Bad("header checksum mismatch".into()));
    }
    if h[8] != kind as u8 {
        return Err(HeaderProblem::Bad(format!(
            "file kind {} where {} was expected",
            h[8], kind as u8
        )));
    }
    if h[9] != FILE_VERSION {
        return Err(HeaderProblem::Bad(format!(
            "unsupported file version {}",
            h[9]
        )));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[10..18]);
    Ok(u64::from_be_bytes(seq))
}

/// Appends one frame holding `payload` to `out`.
pub fn push_frame(payload: &[u8], out: &mut Vec<u8>) {
    // Payloads are bounded by MAX_PAYLOAD (checked when records are
    // encoded), so the length fits in a u32.
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// The outcome of reading one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// A whole frame: its payload, and where the next frame starts.
    Frame {
        /// The payload.
        payload: &'a [u8],
        /// Offset just past the frame.
        next: usize,
    },
    /// No bytes left.
    End,
    /// The file ends inside the frame.
    Short(String),
    /// The frame is whole but wrong (impossible length, CRC mismatch).
    Bad(FrameDamage),
}

/// How a whole frame is damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameDamage {
    /// The length field is 0 or above [`MAX_PAYLOAD`].
    BadLength(u32),
    /// The CRC does not match.
    BadChecksum,
}

/// Reads the frame at `pos` of `data`.
pub fn read_frame(data: &[u8], pos: usize) -> FrameRead<'_> {
    let rest = data.get(pos..).unwrap_or_default();
    if rest.is_empty() {
        return FrameRead::End;
    }
    let Some(len_bytes) = rest.get(..4) else {
        return FrameRead::Short(format!(
            "{} bytes where a frame length was expected",
            rest.len()
        ));
    };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let n = len as usize;
    if n == 0 || n > MAX_PAYLOAD {
        return FrameRead::Bad(FrameDamage::BadLength(len));
    }
    let Some(frame) = rest.get(..n + FRAME_OVERHEAD) else {
        return FrameRead::Short(format!(
            "frame of {} bytes, only {} present",
            n + FRAME_OVERHEAD,
            rest.len()
        ));
    };
    let payload = &frame[4..4 + n];
    let stored = u32::from_be_bytes([frame[4 + n], frame[5 + n], frame[6 + n], frame[7 + n]]);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[..4]);
    crc.update(payload);
    if crc.finalize() != stored {
        return FrameRead::Bad(FrameDamage::BadChecksum);
    }
    FrameRead::Frame {
        payload,
        next: pos + n + FRAME_OVERHEAD,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut data = header(FileKind::Segment, 5).to_vec();
        assert_eq!(parse_header(&data, FileKind::Segment), Ok(5));
        assert!(matches!(
            parse_header(&data, FileKind::Checkpoints),
            Err(HeaderProblem::Bad(_))
        ));
        push_frame(b"hello", &mut data);
        push_frame(b"world!", &mut data);
        let FrameRead::Frame { payload, next } = read_frame(&data, HEADER_BYTES) else {
            panic!("first frame");
        };
        assert_eq!(payload, b"hello");
        let FrameRead::Frame { payload, next } = read_frame(&data, next) else {
            panic!("second frame");
        };
        assert_eq!(payload, b"world!");
        assert_eq!(read_frame(&data, next), FrameRead::End);
        for cut in HEADER_BYTES + 1..data.len() {
            if cut == HEADER_BYTES + 13 {
                continue; // a frame boundary
            }
            let r = read_frame(
                &data[..cut],
                if cut < HEADER_BYTES + 13 {
                    HEADER_BYTES
                } else {
                    HEADER_BYTES + 13
                },
            );
            assert!(matches!(r, FrameRead::Short(_)), "cut at {cut}: {r:?}");
        }
        let mut bad = data.clone();
        bad[HEADER_BYTES + 5] ^= 1;
        assert_eq!(
            read_frame(&bad, HEADER_BYTES),
            FrameRead::Bad(FrameDamage::BadChecksum)
        );
        assert_eq!(
            parse_header(&[0; HEADER_BYTES], FileKind::Segment),
            Err(HeaderProblem::Torn)
        );
        assert_eq!(
            parse_header(&data[..10], FileKind::Segment),
            Err(HeaderProblem::Torn)
        );
    }

    #[test]
    fn segment_names() {
        let name = segment_name(42);
        assert_eq!(name, "00000000000000000042.seg");
        assert_eq!(parse_segment_name(Path::new(&name)), Some(42));
        assert_eq!(parse_segment_name(Path::new("42.seg")), None);
        assert_eq!(
            parse_segment_name(Path::new("00000000000000000042.seg.torn")),
            None
        );
    }
}
