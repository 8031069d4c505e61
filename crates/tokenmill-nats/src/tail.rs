//! Following a live ledger directory: the records of its segments and the
//! notes of its checkpoints file, as they are appended.
//!
//! Why not reopen a `tokenmill_metering::LedgerReader` on every poll: it
//! reads the whole segment that holds the starting record and decodes and
//! hashes every record before it, so following a ledger through a 64 MiB
//! segment would re-read and re-hash up to 64 MiB (hundreds of thousands of
//! records) ten times a second. This tail keeps its place (file and byte
//! offset after the last whole frame) and reads only what was appended
//! since, per the framing of docs/ledger-format.md section 3. Each record it
//! returns is still checked as the reader would: frame CRC, canonical
//! decoding, the next sequence number, and the chain link to the record
//! before.
//!
//! An incomplete frame at the end of the last file is a write in progress
//! (or a crash's torn tail, which the ledger sets aside when it next opens):
//! the tail stops before it and tries again on the next poll. It never
//! moves past bytes that are not a whole, valid frame.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use tokenmill_metering::checkpoint::Checkpoint;
use tokenmill_metering::record::{self, Record};
use tokenmill_metering::{
    note, segment_name, Hash, CHECKPOINTS_FILE, COSIGNATURES_FILE, MAX_RECORD_BYTES,
};

const MAGIC: &[u8; 8] = b"TMLEDGER";
const HEADER_BYTES: usize = 22;
const FRAME_OVERHEAD: usize = 8;
const FILE_VERSION: u8 = 1;
const KIND_SEGMENT: u8 = 1;
const KIND_CHECKPOINTS: u8 = 2;
const KIND_COSIGNATURES: u8 = 3;
/// Bytes read at a time: more than the largest frame, so every read that
/// is cut short still holds at least one whole frame.
const CHUNK: u64 = 8 << 20;

/// Why the ledger cannot be followed further.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The ledger holds something that no writer produces: a bad header, an
    /// undecodable record, a broken chain, a shrunken segment, or fewer
    /// records than the cursor says were sent.
    #[error("{} at byte {offset}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

/// A record read from the ledger.
#[derive(Clone, Debug)]
pub(crate) struct TailRecord {
    pub seq: u64,
    pub hash: Hash,
    pub bytes: Vec<u8>,
}

/// A signed checkpoint note read from the checkpoints file.
#[derive(Clone, Debug)]
pub(crate) struct TailNote {
    /// Its position among the notes of the file, from 0.
    pub index: u64,
    /// The tree size it commits to.
    pub size: u64,
    pub text: String,
}

enum Frame<'a> {
    /// Nothing left.
    End,
    /// A whole frame: its payload and its length with overhead.
    Whole(&'a [u8], usize),
    /// The frame is not all there (yet).
    Incomplete,
    /// The bytes are not a valid frame.
    Damaged(String),
}

fn frame_at(data: &[u8]) -> Frame<'_> {
    if data.is_empty() {
        return Frame::End;
    }
    let Some(len_bytes) = data.get(..4) else {
        return Frame::Incomplete;
    };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let n = len as usize;
    if n == 0 || n > MAX_RECORD_BYTES {
        return Frame::Damaged(format!("frame length {len}"));
    }
    let Some(frame) = data.get(..n + FRAME_OVERHEAD) else {
        return Frame::Incomplete;
    };
    let payload = &frame[4..4 + n];
    let stored = u32::from_be_bytes([frame[4 + n], frame[5 + n], frame[6 + n], frame[7 + n]]);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[..4]);
    crc.update(payload);
    if crc.finalize() != stored {
        return Frame::Damaged("frame checksum mismatch".into());
    }
    Frame::Whole(payload, n + FRAME_OVERHEAD)
}

/// Checks a file header of `kind`: `Ok(None)` if it is not (all) written
/// yet, `Ok(Some(first_seq))` if valid.
fn header(data: &[u8], kind: u8) -> Result<Option<u64>, String> {
    let Some(h) = data.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &h[..8] != MAGIC {
        return Err("not a ledger file (bad magic)".into());
    }
    let crc = u32::from_be_bytes([h[18], h[19], h[20], h[21]]);
    if crc != crc32fast::hash(&h[..18]) {
        return Err("header checksum mismatch".into());
    }
    if h[8] != kind || h[9] != FILE_VERSION {
        return Err(format!("file kind {} version {}", h[8], h[9]));
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[10..18]);
    Ok(Some(u64::from_be_bytes(first)))
}

/// Up to [`CHUNK`] bytes of `path` from `offset`, and the file's length;
/// `None` if the file does not exist.
fn read_from(path: &Path, offset: u64) -> Result<Option<(Vec<u8>, u64)>, TailError> {
    let io_err = |source| TailError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len < offset {
        return Err(TailError::Corrupt {
            path: path.to_owned(),
            offset: len,
            what: format!("file shrank below byte {offset}, already read as whole frames"),
        });
    }
    let want = (len - offset).min(CHUNK);
    let mut data = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
    file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
    file.take(want).read_to_end(&mut data).map_err(io_err)?;
    Ok(Some((data, len)))
}

struct Segment {
    path: PathBuf,
    first: u64,
    /// Offset after the last whole frame read; 0 while the header is unread.
    offset: u64,
}

/// Follows the records of a ledger directory.
pub(crate) struct RecordTail {
    dir: PathBuf,
    next_seq: u64,
    /// Hash of record `next_seq - 1`, once known.
    prev: Option<Hash>,
    seg: Option<Segment>,
    stall: Option<String>,
}

impl RecordTail {
    /// Follows the ledger in `dir` from record `from_seq` on. Records before
    /// it are skipped by their framing alone (their sequence numbers are
    /// checked, the hash of the one just before is kept for the chain).
    pub(crate) fn open(dir: &Path, from_seq: u64) -> Result<RecordTail, TailError> {
        let mut tail = RecordTail {
            dir: dir.to_owned(),
            next_seq: 0,
            prev: Some(Hash::ZERO),
            seg: None,
            stall: None,
        };
        if from_seq == 0 {
            return Ok(tail);
        }
        let start = list_segments(dir)?
            .into_iter()
            .rev()
            .find(|(first, _)| *first <= from_seq);
        let Some((first, path)) = start else {
            return Err(tail.ahead(from_seq));
        };
        tail.next_seq = first;
        tail.prev = None;
        tail.seg = Some(Segment {
            path,
            first,
            offset: 0,
        });
        let mut none = Vec::new();
        while tail.next_seq < from_seq {
            if !tail.step(from_seq, usize::MAX, from_seq, &mut none)? {
                return Err(tail.ahead(from_seq));
            }
        }
        Ok(tail)
    }

    fn ahead(&self, from_seq: u64) -> TailError {
        TailError::Corrupt {
            path: self.dir.clone(),
            offset: 0,
            what: format!(
                "the cursor says records 0..{from_seq} were sent, but the ledger holds only {}",
                self.next_seq
            ),
        }
    }

    /// The sequence number of the next record to be read.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Where and why reading is held up by bytes that are not a whole
    /// frame, if it is (a torn tail not yet set aside, or damage).
    pub(crate) fn stall(&self) -> Option<&str> {
        self.stall.as_deref()
    }

    /// The next records, at most `max`, none at or past `limit`.
    pub(crate) fn poll(&mut self, limit: u64, max: usize) -> Result<Vec<TailRecord>, TailError> {
        let mut out = Vec::new();
        while out.len() < max && self.next_seq < limit {
            if !self.step(limit, max, 0, &mut out)? {
                break;
            }
        }
        Ok(out)
    }

    /// Reads one chunk of the current segment (moving to the next segment
    /// at the end of a finished one): records below `skip_below` are only
    /// counted, the others decoded, checked and pushed to `out`. Says
    /// whether it got anywhere (read bytes or moved to the next segment).
    fn step(
        &mut self,
        limit: u64,
        max: usize,
        skip_below: u64,
        out: &mut Vec<TailRecord>,
    ) -> Result<bool, TailError> {
        let seg = match self.seg.as_mut() {
            Some(s) => s,
            None => {
                let path = self.dir.join(segment_name(self.next_seq));
                if !path.exists() {
                    return Ok(false);
                }
                self.seg.insert(Segment {
                    path,
                    first: self.next_seq,
                    offset: 0,
                })
            }
        };
        let Some((data, file_len)) = read_from(&seg.path, seg.offset)? else {
            if seg.offset == 0 {
                // A segment whose header never reached the disk is set
                // aside whole by recovery; it will be made again.
                self.seg = None;
                return Ok(false);
            }
            return Err(TailError::Corrupt {
                path: seg.path.clone(),
                offset: seg.offset,
                what: "segment disappeared".into(),
            });
        };
        let mut pos = 0usize;
        if seg.offset == 0 {
            match header(&data, KIND_SEGMENT) {
                Ok(None) => return Ok(false),
                Ok(Some(first)) if first == seg.first => pos = HEADER_BYTES,
                Ok(Some(first)) => {
                    return Err(TailError::Corrupt {
                        path: seg.path.clone(),
                        offset: 0,
                        what: format!("header says first record {first}"),
                    })
                }
                Err(what) => {
                    return Err(TailError::Corrupt {
                        path: seg.path.clone(),
                        offset: 0,
                        what,
                    })
                }
            }
        }
        let mut at_end = false;
        self.stall = None;
        while out.len() < max && self.next_seq < limit {
            let frame_offset = seg.offset + pos as u64;
            let corrupt = |what: String| TailError::Corrupt {
                path: seg.path.clone(),
                offset: frame_offset,
                what,
            };
            let (payload, len) = match frame_at(data.get(pos..).unwrap_or_default()) {
                Frame::Whole(payload, len) => (payload, len),
                Frame::End => {
                    at_end = frame_offset == file_len;
                    break;
                }
                Frame::Incomplete => break,
                Frame::Damaged(what) => {
                    self.stall = Some(format!(
                        "{} at byte {frame_offset}: {what}",
                        seg.path.display()
                    ));
                    break;
                }
            };
            let seq = record::peek_seq(payload);
            if seq != Some(self.next_seq) {
                return Err(corrupt(format!(
                    "record {seq:?} where record {} belongs",
                    self.next_seq
                )));
            }
            let hash = record::record_hash(payload);
            if self.next_seq >= skip_below {
                let rec = Record::decode(payload)
                    .map_err(|e| corrupt(format!("record {}: {e}", self.next_seq)))?;
                if self.prev.is_some_and(|prev| prev != rec.prev_hash) {
                    return Err(corrupt(format!(
                        "record {}: its previous hash is not the hash of record {}",
                        self.next_seq,
                        self.next_seq.wrapping_sub(1)
                    )));
                }
                out.push(TailRecord {
                    seq: self.next_seq,
                    hash,
                    bytes: payload.to_vec(),
                });
            }
            self.prev = Some(hash);
            self.next_seq += 1;
            pos += len;
        }
        seg.offset += pos as u64;
        let mut moved = pos > 0;
        if at_end && self.next_seq > seg.first {
            // A finished segment is synced before the next one is made, so
            // once the next exists this one has no more records.
            let next = self.dir.join(segment_name(self.next_seq));
            if next.exists() {
                self.seg = Some(Segment {
                    path: next,
                    first: self.next_seq,
                    offset: 0,
                });
                moved = true;
            }
        }
        Ok(moved)
    }
}

/// The segment files of `dir` by first sequence number.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, TailError> {
    let io_err = |source| TailError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        let Some(first) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            continue;
        };
        if path.file_name().and_then(|n| n.to_str()) == Some(segment_name(first).as_str()) {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Follows the checkpoints file of a ledger directory.
pub(crate) struct NoteTail {
    path: PathBuf,
    /// The file kind its header must carry.
    kind: u8,
    offset: u64,
    /// Notes passed so far (skipped or returned).
    index: u64,
    /// Notes to pass over without returning them.
    skip: u64,
    stall: Option<String>,
}

impl NoteTail {
    /// Follows the checkpoints file in `dir`, returning the notes from the
    /// `skip`-th on.
    pub(crate) fn open(dir: &Path, skip: u64) -> NoteTail {
        NoteTail {
            path: dir.join(CHECKPOINTS_FILE),
            kind: KIND_CHECKPOINTS,
            offset: 0,
            index: 0,
            skip,
            stall: None,
        }
    }

    /// Follows the cosignatures file in `dir` (cosigned checkpoint notes),
    /// returning the notes from the `skip`-th on.
    pub(crate) fn open_cosignatures(dir: &Path, skip: u64) -> NoteTail {
        NoteTail {
            path: dir.join(COSIGNATURES_FILE),
            kind: KIND_COSIGNATURES,
            ..NoteTail::open(dir, skip)
        }
    }

    /// Like [`RecordTail::stall`].
    pub(crate) fn stall(&self) -> Option<&str> {
        self.stall.as_deref()
    }

    /// The notes appended since the last poll.
    pub(crate) fn poll(&mut self) -> Result<Vec<TailNote>, TailError> {
        let mut out = Vec::new();
        loop {
            let Some((data, file_len)) = read_from(&self.path, self.offset)? else {
                return Ok(out);
            };
            let corrupt = |offset: u64, what: String| TailError::Corrupt {
                path: self.path.clone(),
                offset,
                what,
            };
            let mut pos = 0usize;
            if self.offset == 0 {
                match header(&data, self.kind) {
                    Ok(None) => return Ok(out),
                    Ok(Some(_)) => pos = HEADER_BYTES,
                    Err(what) => return Err(corrupt(0, what)),
                }
            }
            self.stall = None;
            loop {
                let frame_offset = self.offset + pos as u64;
                let (payload, len) = match frame_at(data.get(pos..).unwrap_or_default()) {
                    Frame::Whole(payload, len) => (payload, len),
                    Frame::End | Frame::Incomplete => break,
                    Frame::Damaged(what) => {
                        self.stall = Some(format!(
                            "{} at byte {frame_offset}: {what}",
                            self.path.display()
                        ));
                        break;
                    }
                };
                if self.index >= self.skip {
                    let text = std::str::from_utf8(payload)
                        .map_err(|_| corrupt(frame_offset, "note is not UTF-8".into()))?;
                    let size = note::parse(text)
                        .map_err(|e| e.to_string())
                        .and_then(|n| Checkpoint::parse(&n.text).map_err(|e| e.to_string()))
                        .map_err(|what| corrupt(frame_offset, what))?
                        .size;
                    out.push(TailNote {
                        index: self.index,
                        size,
                        text: text.to_owned(),
                    });
                }
                self.index += 1;
                pos += len;
            }
            self.offset += pos as u64;
            // Stop unless the read was cut short by the chunk size.
            if pos == 0 || self.offset >= file_len || self.stall.is_some() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_whole_incomplete_or_damaged() {
        let payload = b"hello";
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame);
        frame.extend_from_slice(&crc.finalize().to_be_bytes());
        assert!(matches!(frame_at(&frame), Frame::Whole(p, 13) if p == payload));
        assert!(matches!(frame_at(&[]), Frame::End));
        for cut in 1..frame.len() {
            assert!(matches!(frame_at(&frame[..cut]), Frame::Incomplete));
        }
        let mut bad = frame.clone();
        bad[6] ^= 1;
        assert!(matches!(frame_at(&bad), Frame::Damaged(_)));
        assert!(matches!(frame_at(&[0, 0, 0, 0, 1]), Frame::Damaged(_)));
    }

    #[test]
    fn headers_are_checked() {
        assert_eq!(header(&[0; 10], KIND_SEGMENT), Ok(None));
        assert_eq!(header(&[0; HEADER_BYTES], KIND_SEGMENT), Ok(None));
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&[KIND_SEGMENT, FILE_VERSION]);
        h.extend_from_slice(&7u64.to_be_bytes());
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(header(&h, KIND_SEGMENT), Ok(Some(7)));
        assert!(header(&h, KIND_CHECKPOINTS).is_err());
        h[3] ^= 1;
        assert!(header(&h, KIND_SEGMENT).is_err());
    }

    use std::io::Write as _;
    use std::sync::mpsc;
    use std::time::{Duration, UNIX_EPOCH};
    use tokenmill_metering::{Ledger, LedgerConfig, LedgerReader, RecordBody, Signer};
    use tokenmill_protocol::{FinishReason, KeyId, RequestId, TenantId, TokenCounts, UsageEvent};

    fn body(i: u64) -> RecordBody {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i);
        RecordBody::Usage(UsageEvent {
            request_id: RequestId(format!("chatcmpl-tail-{i}")),
            tenant: TenantId(format!("t{}", i % 3)),
            key_id: KeyId("k".into()),
            model: "m".into(),
            tokens: TokenCounts {
                prompt_tokens: i,
                cached_prompt_tokens: 0,
                completion_tokens: 1,
            },
            finish_reason: FinishReason::Stop,
            device_seconds: 0.5,
            arrived_at: at,
            finished_at: at + Duration::from_millis(5),
        })
    }

    /// A live ledger with small segments and a checkpoint every 10 records.
    fn open(dir: &Path) -> Ledger {
        let config = LedgerConfig {
            segment_max_bytes: 2048,
            checkpoint_every_records: 10,
            checkpoint_interval: Duration::ZERO,
            ..LedgerConfig::new(dir, "tokenmill.test/tail")
        };
        let signer = Signer::from_seed("tail-test", [3; 32]).expect("key");
        Ledger::open(config, signer).expect("opens").0
    }

    fn append(ledger: &Ledger, from: u64, to: u64) {
        let (tx, rx) = mpsc::channel();
        for i in from..to {
            let tx = tx.clone();
            ledger.append(
                &body(i),
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
        }
        drop(tx);
        for r in rx {
            r.expect("durable");
        }
    }

    fn reader_records(dir: &Path) -> Vec<(u64, Hash, Vec<u8>)> {
        LedgerReader::open(dir, 0)
            .expect("reader")
            .map(|r| {
                let r = r.expect("record");
                (r.seq, r.hash, r.bytes)
            })
            .collect()
    }

    fn drain(tail: &mut RecordTail) -> Vec<(u64, Hash, Vec<u8>)> {
        tail.poll(u64::MAX, usize::MAX)
            .expect("polls")
            .into_iter()
            .map(|r| (r.seq, r.hash, r.bytes))
            .collect()
    }

    #[test]
    fn starts_anywhere_and_reads_what_the_reader_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(dir.path());
        append(&ledger, 0, 200);
        ledger.close().expect("closes");
        let all = reader_records(dir.path());
        assert_eq!(all.len(), 200);
        assert!(list_segments(dir.path()).expect("lists").len() > 5);
        for from in [0, 1, 9, 10, 11, 57, 150, 199, 200] {
            let mut tail = RecordTail::open(dir.path(), from).expect("opens");
            let got = drain(&mut tail);
            assert_eq!(got, all[from as usize..], "from {from}");
            assert_eq!(tail.next_seq(), 200);
        }
        let err = RecordTail::open(dir.path(), 201)
            .err()
            .expect("cursor ahead");
        assert!(err.to_string().contains("holds only 200"), "{err}");
    }

    #[test]
    fn follows_a_live_ledger_across_segments_and_respects_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tail = RecordTail::open(dir.path(), 0).expect("opens an empty dir");
        assert!(drain(&mut tail).is_empty());
        let ledger = open(dir.path());
        let mut got = Vec::new();
        for chunk in 0..20 {
            append(&ledger, chunk * 7, chunk * 7 + 7);
            let limited = tail.poll(chunk * 7 + 3, usize::MAX).expect("polls");
            assert_eq!(tail.next_seq(), chunk * 7 + 3);
            got.extend(limited.into_iter().map(|r| (r.seq, r.hash, r.bytes)));
            let few = tail.poll(u64::MAX, 2).expect("polls");
            assert_eq!(few.len(), 2);
            got.extend(few.into_iter().map(|r| (r.seq, r.hash, r.bytes)));
            got.extend(drain(&mut tail));
        }
        ledger.close().expect("closes");
        assert_eq!(got, reader_records(dir.path()));
    }

    #[test]
    fn waits_at_a_partial_frame_and_reports_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = open(dir.path());
        append(&ledger, 0, 5);
        ledger.close().expect("closes");
        let last = list_segments(dir.path())
            .expect("lists")
            .pop()
            .expect("a segment")
            .1;
        let mut tail = RecordTail::open(dir.path(), 0).expect("opens");
        assert_eq!(drain(&mut tail).len(), 5);
        // Half a frame: a write in progress.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .expect("opens");
        f.write_all(&[0, 0, 0, 40, 1, 2, 3]).expect("writes");
        assert!(drain(&mut tail).is_empty());
        assert_eq!(tail.stall(), None);
        // A whole frame with a bad checksum: damage, reported, not passed.
        f.write_all(&[0; 41]).expect("writes");
        assert!(drain(&mut tail).is_empty());
        assert!(tail.stall().is_some_and(|s| s.contains("checksum")));
        assert_eq!(tail.next_seq(), 5);
    }

    #[test]
    fn notes_follow_the_checkpoints_file_from_any_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut notes = NoteTail::open(dir.path(), 0);
        assert!(notes.poll().expect("polls").is_empty());
        let ledger = open(dir.path());
        let mut seen = Vec::new();
        for chunk in 0..3 {
            append(&ledger, chunk * 10, chunk * 10 + 10);
            // The writer signs a checkpoint just after the batch's callbacks.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while seen.len() <= chunk as usize {
                seen.extend(notes.poll().expect("polls"));
                assert!(std::time::Instant::now() < deadline, "no checkpoint");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        ledger.close().expect("closes");
        seen.extend(notes.poll().expect("polls"));
        assert_eq!(
            seen.iter().map(|n| (n.index, n.size)).collect::<Vec<_>>(),
            vec![(0, 10), (1, 20), (2, 30)]
        );
        let mut skipping = NoteTail::open(dir.path(), 2);
        let rest = skipping.poll().expect("polls");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].text, seen[2].text);
    }
}
