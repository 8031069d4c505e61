//! Reading a ledger directory: records in order, with every check that needs
//! no key (framing, canonical decoding, sequence continuity, chain links), and
//! the signed notes of the checkpoints file.
//!
//! One reader serves recovery on open, offline verification, export and a
//! sink that tails a live ledger; they differ only in whether a damaged end
//! of the last segment is an error (verification) or the place where reading
//! stops for now (a crash's torn tail, or a write in progress).

use crate::error::{ProblemKind, VerifyError};
use crate::frame::{self, FileKind, FrameDamage, FrameRead, HeaderProblem};
use crate::hash::Hash;
use crate::merkle;
use crate::record::{self, Record};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One record as stored.
#[derive(Clone, Debug)]
pub struct StoredRecord {
    /// The segment file it is in.
    pub file: Arc<Path>,
    /// Byte offset of its frame in that file.
    pub offset: u64,
    /// Its sequence number.
    pub seq: u64,
    /// Its record hash (the chain hash; its id).
    pub hash: Hash,
    /// Its canonical bytes, as hashed and as shipped to other stores.
    pub bytes: Vec<u8>,
    /// The decoded record.
    pub record: Record,
}

impl StoredRecord {
    /// Its Merkle leaf hash.
    pub fn leaf_hash(&self) -> Hash {
        merkle::leaf_hash(&self.bytes)
    }
}

/// A damaged end of the last file: where it starts and why it is damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The file.
    pub file: PathBuf,
    /// Offset of the first byte that is not part of a whole frame.
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub len: u64,
    /// The file's header itself is incomplete: the whole file holds nothing.
    pub whole_file: bool,
    /// What was found there.
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TailPolicy {
    /// Any damage is an error.
    Strict,
    /// Damage at the end of the last file ends the reading and is reported.
    Tolerate,
}

/// The segment files of `dir`, by first sequence number.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, VerifyError> {
    let entries = fs::read_dir(dir).map_err(|e| unreadable(dir, &e))?;
    let mut segments = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| unreadable(dir, &e))?.path();
        if let Some(first) = frame::parse_segment_name(&path) {
            segments.push((first, path));
        }
    }
    segments.sort();
    Ok(segments)
}

fn unreadable(path: &Path, e: &std::io::Error) -> VerifyError {
    VerifyError {
        file: path.to_owned(),
        offset: 0,
        seq: None,
        kind: ProblemKind::Unreadable(e.to_string()),
    }
}

struct Loaded {
    file: Arc<Path>,
    data: Vec<u8>,
    pos: usize,
    is_last: bool,
}

/// Reads the records of a ledger directory in order, checking framing,
/// decoding, continuity and chain links as it goes.
pub struct LedgerReader {
    dir: PathBuf,
    segments: Vec<(u64, PathBuf)>,
    next_segment: usize,
    current: Option<Loaded>,
    next_seq: u64,
    prev: Option<Hash>,
    from_seq: u64,
    policy: TailPolicy,
    torn: Option<TornTail>,
    end: (PathBuf, u64),
}

impl LedgerReader {
    /// Reads the records from `from_seq` on (0 for all). A damaged end of
    /// the last segment ends the reading and is reported by
    /// [`LedgerReader::torn_tail`]: on a live ledger it is a write in
    /// progress. Chain links are checked from the first record read.
    pub fn open(dir: &Path, from_seq: u64) -> Result<LedgerReader, VerifyError> {
        LedgerReader::with_policy(dir, from_seq, TailPolicy::Tolerate)
    }

    pub(crate) fn with_policy(
        dir: &Path,
        from_seq: u64,
        policy: TailPolicy,
    ) -> Result<LedgerReader, VerifyError> {
        let segments = list_segments(dir)?;
        // Start in the last segment that begins at or before from_seq.
        let start = segments
            .iter()
            .rposition(|(first, _)| *first <= from_seq)
            .unwrap_or(0);
        let next_seq = if from_seq == 0 {
            0
        } else {
            segments
                .get(start)
                .map_or(from_seq, |(first, _)| (*first).min(from_seq))
        };
        Ok(LedgerReader {
            dir: dir.to_owned(),
            segments,
            next_segment: start,
            current: None,
            next_seq,
            prev: (from_seq == 0).then_some(Hash::ZERO),
            from_seq,
            policy,
            torn: None,
            end: (dir.to_owned(), 0),
        })
    }

    /// The damaged end of the last segment, once reading reached it.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn.as_ref()
    }

    /// The sequence number the next record would have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash of the last record read (all zero before the first).
    pub fn last_hash(&self) -> Hash {
        self.prev.unwrap_or(Hash::ZERO)
    }

    /// The segment files, by first sequence number.
    pub fn segments(&self) -> impl Iterator<Item = &Path> {
        self.segments.iter().map(|(_, p)| p.as_path())
    }

    /// The file and offset just past the last whole frame read (the
    /// directory and 0 before any).
    pub fn end_position(&self) -> (&Path, u64) {
        (&self.end.0, self.end.1)
    }

    /// The next record, `None` at the end (or at a tolerated torn tail).
    pub fn next_record(&mut self) -> Result<Option<StoredRecord>, VerifyError> {
        loop {
            let Some(cur) = self.current.as_mut() else {
                if self.torn.is_some() || self.next_segment >= self.segments.len() {
                    return Ok(None);
                }
                self.load_next_segment()?;
                continue;
            };
            let pos = cur.pos;
            let (payload, next) = match frame::read_frame(&cur.data, pos) {
                FrameRead::End => {
                    self.current = None;
                    continue;
                }
                FrameRead::Short(m) => return self.damaged(pos, ProblemKind::TornFrame(m)),
                FrameRead::Bad(FrameDamage::BadLength(n)) => {
                    return self.damaged(pos, ProblemKind::BadLength(n))
                }
                FrameRead::Bad(FrameDamage::BadChecksum) => {
                    return self.damaged(pos, ProblemKind::BadChecksum)
                }
                FrameRead::Frame { payload, next } => (payload, next),
            };
            let file = Arc::clone(&cur.file);
            let record = match Record::decode(payload) {
                Ok(r) => r,
                Err(e) => return Err(self.problem(pos, ProblemKind::Undecodable(e))),
            };
            if record.seq != self.next_seq {
                let kind = self.classify(record.seq, next);
                return Err(self.problem(pos, kind));
            }
            let hash = record::record_hash(payload);
            if self.prev.is_some_and(|prev| prev != record.prev_hash) {
                return Err(self.problem(pos, ProblemKind::BadChainLink));
            }
            let bytes = payload.to_vec();
            cur.pos = next;
            self.end = (file.to_path_buf(), next as u64);
            self.prev = Some(hash);
            self.next_seq += 1;
            if record.seq < self.from_seq {
                continue;
            }
            return Ok(Some(StoredRecord {
                file,
                offset: pos as u64,
                seq: record.seq,
                hash,
                bytes,
                record,
            }));
        }
    }

    fn load_next_segment(&mut self) -> Result<(), VerifyError> {
        let (first, path) = self.segments[self.next_segment].clone();
        self.next_segment += 1;
        let is_last = self.next_segment == self.segments.len();
        let data = fs::read(&path).map_err(|e| unreadable(&path, &e))?;
        let file: Arc<Path> = Arc::from(path.as_path());
        self.current = Some(Loaded {
            file,
            data,
            pos: 0,
            is_last,
        });
        let Some(cur) = self.current.as_ref() else {
            return Ok(());
        };
        let header_first = match frame::parse_header(&cur.data, FileKind::Segment) {
            Ok(h) => h,
            Err(HeaderProblem::Torn) => {
                let kind = ProblemKind::TornFrame("file ends inside its header".into());
                return self.damaged(0, kind).map(|_| ());
            }
            Err(HeaderProblem::Bad(m)) => return Err(self.problem(0, ProblemKind::BadHeader(m))),
        };
        if header_first != first {
            return Err(self.problem(
                0,
                ProblemKind::BadHeader(format!(
                    "header says first record {header_first}, file name says {first}"
                )),
            ));
        }
        if first != self.next_seq {
            let kind = self.classify(first, frame::HEADER_BYTES);
            return Err(self.problem(0, kind));
        }
        if let Some(cur) = self.current.as_mut() {
            cur.pos = frame::HEADER_BYTES;
            self.end = (cur.file.to_path_buf(), frame::HEADER_BYTES as u64);
        }
        Ok(())
    }

    /// Damage at `pos` of the current file: the end of reading if it is the
    /// last file and tails are tolerated, an error otherwise.
    fn damaged(
        &mut self,
        pos: usize,
        kind: ProblemKind,
    ) -> Result<Option<StoredRecord>, VerifyError> {
        let tolerated =
            self.policy == TailPolicy::Tolerate && self.current.as_ref().is_some_and(|c| c.is_last);
        if !tolerated {
            return Err(self.problem(pos, kind));
        }
        if let Some(cur) = self.current.take() {
            self.torn = Some(TornTail {
                file: cur.file.to_path_buf(),
                offset: pos as u64,
                len: (cur.data.len() - pos) as u64,
                whole_file: pos == 0,
                reason: kind.to_string(),
            });
        }
        Ok(None)
    }

    fn problem(&self, pos: usize, kind: ProblemKind) -> VerifyError {
        VerifyError {
            file: self
                .current
                .as_ref()
                .map_or_else(|| self.dir.clone(), |c| c.file.to_path_buf()),
            offset: pos as u64,
            seq: Some(self.next_seq),
            kind,
        }
    }

    /// Names a sequence mismatch: a repeated or earlier record, or the
    /// expected record found further on, is a reorder; otherwise records
    /// are missing.
    fn classify(&self, found: u64, resume_at: usize) -> ProblemKind {
        let expected = self.next_seq;
        if found < expected || self.appears_later(expected, resume_at) {
            ProblemKind::Reorder { expected, found }
        } else {
            ProblemKind::Gap { expected, found }
        }
    }

    /// Whether a whole frame holding record `seq` follows `resume_at` in the
    /// current file or in a later segment. Only used to name an error.
    fn appears_later(&self, seq: u64, resume_at: usize) -> bool {
        let in_data = |data: &[u8], mut pos: usize| {
            while let FrameRead::Frame { payload, next } = frame::read_frame(data, pos) {
                if record::peek_seq(payload) == Some(seq) {
                    return true;
                }
                pos = next;
            }
            false
        };
        if let Some(cur) = &self.current {
            if in_data(&cur.data, resume_at) {
                return true;
            }
        }
        self.segments[self.next_segment..]
            .iter()
            .any(|(_, path)| fs::read(path).is_ok_and(|data| in_data(&data, frame::HEADER_BYTES)))
    }
}

impl Iterator for LedgerReader {
    type Item = Result<StoredRecord, VerifyError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// One signed note of the checkpoints file, not yet verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNote {
    /// Byte offset of its frame in the checkpoints file.
    pub offset: u64,
    /// The signed note text.
    pub note: String,
}

/// The notes of `dir`'s checkpoints file (none if it does not exist), and a
/// torn tail if the policy tolerates one.
pub(crate) fn read_notes(
    dir: &Path,
    policy: TailPolicy,
) -> Result<(Vec<StoredNote>, Option<TornTail>), VerifyError> {
    read_note_file(dir, frame::CHECKPOINTS_FILE, FileKind::Checkpoints, policy)
}

/// Reads a file of framed notes (`checkpoints` or `cosignatures`).
pub(crate) fn read_note_file(
    dir: &Path,
    name: &str,
    file_kind: FileKind,
    policy: TailPolicy,
) -> Result<(Vec<StoredNote>, Option<TornTail>), VerifyError> {
    let path = dir.join(name);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(unreadable(&path, &e)),
    };
    let fail = |offset: usize, kind: ProblemKind| VerifyError {
        file: path.clone(),
        offset: offset as u64,
        seq: None,
        kind,
    };
    let torn = |offset: usize, reason: String| TornTail {
        file: path.clone(),
        offset: offset as u64,
        len: (data.len() - offset) as u64,
        whole_file: offset == 0,
        reason,
    };
    match frame::parse_header(&data, file_kind) {
        Ok(_) => {}
        Err(HeaderProblem::Torn) if policy == TailPolicy::Tolerate => {
            return Ok((
                Vec::new(),
                Some(torn(0, "file ends inside its header".into())),
            ))
        }
        Err(HeaderProblem::Torn) => {
            return Err(fail(
                0,
                ProblemKind::TornFrame("file ends inside its header".into()),
            ))
        }
        Err(HeaderProblem::Bad(m)) => return Err(fail(0, ProblemKind::BadHeader(m))),
    }
    let mut notes = Vec::new();
    let mut pos = frame::HEADER_BYTES;
    loop {
        let kind = match frame::read_frame(&data, pos) {
            FrameRead::End => return Ok((notes, None)),
            FrameRead::Frame { payload, next } => {
                let note = std::str::from_utf8(payload).map_err(|_| {
                    fail(pos, ProblemKind::BadCheckpoint("note is not UTF-8".into()))
                })?;
                notes.push(StoredNote {
                    offset: pos as u64,
                    note: note.to_owned(),
                });
                pos = next;
                continue;
            }
            FrameRead::Short(m) => ProblemKind::TornFrame(m),
            FrameRead::Bad(FrameDamage::BadLength(n)) => ProblemKind::BadLength(n),
            FrameRead::Bad(FrameDamage::BadChecksum) => ProblemKind::BadChecksum,
        };
        if policy == TailPolicy::Tolerate {
            return Ok((notes, Some(torn(pos, kind.to_string()))));
        }
        return Err(fail(pos, kind));
    }
}
