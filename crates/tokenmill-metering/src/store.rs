//! The appending side of a ledger directory, as a plain struct: recovery of
//! the chain state on open, setting a torn tail aside, framing records into
//! size-rolled segments, durable commits, and checkpoint notes.
//!
//! It does no threading; the writer thread ([`crate::Ledger`]) and the
//! importer drive it. Its rule: bytes that were once a whole record are never
//! rewritten; a tail that is not whole is copied to a `.torn` file before the
//! segment is cut back to its last whole frame.

use crate::checkpoint::Checkpoint;
use crate::error::{LedgerError, ProblemKind, VerifyError};
use crate::frame::{self, FileKind};
use crate::fsutil;
use crate::hash::Hash;
use crate::keys::Signer;
use crate::merkle::{self, CompactTree};
use crate::reader::{self, LedgerReader, TailPolicy, TornTail};
use crate::record::{self, EncodedBody};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// What the ledger gives back for a durable record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The record's sequence number.
    pub seq: u64,
    /// The record's hash (its id, and the next record's `prev_hash`).
    pub hash: Hash,
}

/// A damaged tail found on open and moved out of the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAside {
    /// The segment or checkpoints file it was cut from.
    pub file: PathBuf,
    /// Offset where the damage began (the file now ends there).
    pub offset: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Where they are now.
    pub moved_to: PathBuf,
    /// What was wrong.
    pub reason: String,
}

/// What opening a ledger directory found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// Whole records present; the next record gets this sequence number.
    pub records: u64,
    /// Segment files.
    pub segments: usize,
    /// Checkpoint notes.
    pub checkpoints: usize,
    /// Size of the last checkpoint, if any.
    pub last_checkpoint_size: Option<u64>,
    /// Merkle root of the records present.
    pub root: Hash,
    /// Hash of the last record present (all zero when there is none): the
    /// next record's `prev_hash`.
    pub last_hash: Hash,
    /// Torn tails set aside (a crash during a write leaves at most one per
    /// file). Empty after a clean shutdown.
    pub set_aside: Vec<SetAside>,
}

struct OpenSegment {
    file: File,
    len: u64,
}

/// The append state of one ledger directory.
pub(crate) struct Store {
    dir: PathBuf,
    segment_max_bytes: u64,
    segment: Option<OpenSegment>,
    /// Framed bytes not yet written to the current segment.
    pending: Vec<u8>,
    /// A file was created since the directory was last synced.
    dir_dirty: bool,
    next_seq: u64,
    last_hash: Hash,
    tree: CompactTree,
    record_buf: Vec<u8>,
    notes: Option<File>,
    last_checkpoint_size: Option<u64>,
}

impl Store {
    /// Opens (creating if need be) `dir`, recovers the chain and Merkle
    /// state, checks the stored checkpoints against the records (roots, and
    /// that none covers more records than are present: acknowledged records
    /// are never silently dropped), and sets aside torn tails.
    pub(crate) fn open(
        dir: &Path,
        origin: &str,
        segment_max_bytes: u64,
    ) -> Result<(Store, OpenReport), LedgerError> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let (notes, notes_torn) =
            reader::read_notes(dir, TailPolicy::Tolerate).map_err(LedgerError::Corrupt)?;
        let notes_path = dir.join(frame::CHECKPOINTS_FILE);
        let mut sizes = Vec::with_capacity(notes.len());
        for n in &notes {
            let corrupt = |kind| {
                LedgerError::Corrupt(VerifyError {
                    file: notes_path.clone(),
                    offset: n.offset,
                    seq: None,
                    kind,
                })
            };
            let parsed = crate::note::parse(&n.note)
                .map_err(|e| e.to_string())
                .and_then(|note| Checkpoint::parse(&note.text).map_err(|e| e.to_string()))
                .map_err(|m| corrupt(ProblemKind::BadCheckpoint(m)))?;
            if parsed.origin != origin {
                return Err(LedgerError::Config(format!(
                    "the ledger in {} has origin {:?}, not {origin:?}",
                    dir.display(),
                    parsed.origin
                )));
            }
            if sizes.last().is_some_and(|&(last, _, _)| last > parsed.size) {
                return Err(corrupt(ProblemKind::BadCheckpoint(
                    "checkpoint sizes go back".into(),
                )));
            }
            sizes.push((parsed.size, parsed.root, n.offset));
        }

        let mut reader = LedgerReader::with_policy(dir, 0, TailPolicy::Tolerate)
            .map_err(LedgerError::Corrupt)?;
        let mut tree = CompactTree::new();
        let mut check = 0;
        loop {
            while let Some(&(size, root, offset)) = sizes.get(check) {
                if size != tree.size() {
                    break;
                }
                if root != tree.root() {
                    return Err(LedgerError::Corrupt(VerifyError {
                        file: notes_path.clone(),
                        offset,
                        seq: size.checked_sub(1),
                        kind: ProblemKind::BadRoot { size },
                    }));
                }
                check += 1;
            }
            match reader.next_record().map_err(LedgerError::Corrupt)? {
                Some(r) => tree.push(merkle::leaf_hash(&r.bytes)),
                None => break,
            }
        }
        if let Some(&(size, _, _)) = sizes.get(check) {
            let (file, offset) = reader.end_position();
            return Err(LedgerError::Corrupt(VerifyError {
                file: file.to_owned(),
                offset,
                seq: Some(tree.size()),
                kind: ProblemKind::Truncation {
                    checkpoint_size: size,
                    records: tree.size(),
                },
            }));
        }

        let mut set_aside = Vec::new();
        for torn in [reader.torn_tail().cloned(), notes_torn]
            .into_iter()
            .flatten()
        {
            tracing::warn!(
                file = %torn.file.display(),
                offset = torn.offset,
                bytes = torn.len,
                reason = %torn.reason,
                "ledger: setting aside a torn tail"
            );
            set_aside.push(set_aside_tail(&torn).map_err(|e| io_err(&torn.file, e))?);
        }
        if !set_aside.is_empty() {
            fsutil::sync_dir(dir).map_err(|e| io_err(dir, e))?;
        }

        let segment_count = reader.segments().count();
        let last_segment = reader.segments().last().map(Path::to_owned);
        let segment = match last_segment.filter(|p| p.exists()) {
            Some(path) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
                Some(OpenSegment { file, len })
            }
            None => None,
        };
        let notes_file = if notes_path.exists() {
            Some(
                OpenOptions::new()
                    .append(true)
                    .open(&notes_path)
                    .map_err(|e| io_err(&notes_path, e))?,
            )
        } else {
            None
        };
        let report = OpenReport {
            records: tree.size(),
            segments: segment_count,
            checkpoints: sizes.len(),
            last_checkpoint_size: sizes.last().map(|s| s.0),
            root: tree.root(),
            last_hash: reader.last_hash(),
            set_aside,
        };
        let store = Store {
            dir: dir.to_owned(),
            segment_max_bytes,
            segment,
            pending: Vec::with_capacity(1 << 20),
            dir_dirty: false,
            next_seq: reader.next_seq(),
            last_hash: reader.last_hash(),
            tree,
            record_buf: Vec::with_capacity(512),
            notes: notes_file,
            last_checkpoint_size: report.last_checkpoint_size,
        };
        Ok((store, report))
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn last_hash(&self) -> Hash {
        self.last_hash
    }

    pub(crate) fn root(&self) -> Hash {
        self.tree.root()
    }

    pub(crate) fn last_checkpoint_size(&self) -> Option<u64> {
        self.last_checkpoint_size
    }

    /// Records since the last checkpoint.
    pub(crate) fn unsigned_records(&self) -> u64 {
        self.next_seq
            .saturating_sub(self.last_checkpoint_size.unwrap_or(0))
    }

    /// Chains `body` as the next record and buffers its frame.
    pub(crate) fn append_body(&mut self, body: &EncodedBody) -> io::Result<Receipt> {
        let mut bytes = std::mem::take(&mut self.record_buf);
        bytes.clear();
        record::encode_record(self.next_seq, &self.last_hash, body, &mut bytes);
        let receipt = self.append_encoded(&bytes);
        self.record_buf = bytes;
        receipt
    }

    /// Buffers the frame of `bytes`, which must be the canonical record with
    /// sequence number `next_seq` and previous hash `last_hash`.
    pub(crate) fn append_encoded(&mut self, bytes: &[u8]) -> io::Result<Receipt> {
        let frame_len = (bytes.len() + frame::FRAME_OVERHEAD) as u64;
        self.ensure_room(frame_len)?;
        frame::push_frame(bytes, &mut self.pending);
        if let Some(seg) = self.segment.as_mut() {
            seg.len += frame_len;
        }
        let hash = record::record_hash(bytes);
        self.tree.push(merkle::leaf_hash(bytes));
        let receipt = Receipt {
            seq: self.next_seq,
            hash,
        };
        self.next_seq += 1;
        self.last_hash = hash;
        Ok(receipt)
    }

    /// Rolls to a new segment when the frame would take the current one past
    /// its size limit (a segment always takes at least one record).
    fn ensure_room(&mut self, frame_len: u64) -> io::Result<()> {
        if let Some(seg) = &self.segment {
            let empty = seg.len <= frame::HEADER_BYTES as u64;
            if empty || seg.len + frame_len <= self.segment_max_bytes {
                return Ok(());
            }
            // The old segment is durable before the new one gets records,
            // so a crash can tear only the last segment.
            self.commit()?;
            self.segment = None;
        }
        let path = self.dir.join(frame::segment_name(self.next_seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)?;
        self.pending
            .extend_from_slice(&frame::header(FileKind::Segment, self.next_seq));
        self.segment = Some(OpenSegment {
            file,
            len: frame::HEADER_BYTES as u64,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes the buffered frames and makes them durable: one write, one
    /// fdatasync, and a directory sync if a segment was created.
    pub(crate) fn commit(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if fault::failing(&self.dir) {
            return Err(io::Error::other("injected write failure"));
        }
        if !self.pending.is_empty() {
            let Some(seg) = self.segment.as_mut() else {
                return Err(io::Error::other("frames buffered without a segment"));
            };
            seg.file.write_all(&self.pending)?;
            self.pending.clear();
            seg.file.sync_data()?;
        }
        if self.dir_dirty {
            fsutil::sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Signs and durably appends a checkpoint of every committed record,
    /// unless the last checkpoint already has this size. Call after
    /// [`Store::commit`]: a checkpoint must never get ahead of the records.
    pub(crate) fn checkpoint(
        &mut self,
        origin: &str,
        signer: &Signer,
    ) -> Result<Option<Checkpoint>, LedgerError> {
        if self.last_checkpoint_size == Some(self.next_seq) || !self.pending.is_empty() {
            return Ok(None);
        }
        let cp = Checkpoint::new(origin, self.next_seq, self.tree.root());
        let note = cp
            .sign(signer)
            .map_err(|e| LedgerError::Config(format!("cannot sign checkpoint: {e}")))?;
        self.append_note(&note)?;
        self.last_checkpoint_size = Some(cp.size);
        Ok(Some(cp))
    }

    /// Durably appends a signed note to the checkpoints file.
    pub(crate) fn append_note(&mut self, note: &str) -> Result<(), LedgerError> {
        append_note_frame(
            &self.dir,
            frame::CHECKPOINTS_FILE,
            FileKind::Checkpoints,
            &mut self.notes,
            note,
        )
    }
}

/// Durably appends `note` as one frame to the note file `name` of `dir`
/// (`checkpoints` or `cosignatures`): `file` is the file open for
/// appending, `None` until its first note, when the file is created with
/// its header and the directory synced.
pub(crate) fn append_note_frame(
    dir: &Path,
    name: &str,
    kind: FileKind,
    file: &mut Option<File>,
    note: &str,
) -> Result<(), LedgerError> {
    let path = dir.join(name);
    let mut buf = Vec::with_capacity(note.len() + frame::HEADER_BYTES + 8);
    let created = file.is_none();
    let open = match file {
        Some(open) => open,
        None => {
            buf.extend_from_slice(&frame::header(kind, 0));
            file.insert(
                OpenOptions::new()
                    .append(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?,
            )
        }
    };
    frame::push_frame(note.as_bytes(), &mut buf);
    open.write_all(&buf)
        .and_then(|()| open.sync_data())
        .map_err(|e| io_err(&path, e))?;
    if created {
        fsutil::sync_dir(dir).map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

/// Moves a torn tail out of the way: the bytes go to a new `.torn` file
/// (synced), then the file is cut back to its last whole frame; a file whose
/// header is torn is renamed whole.
pub(crate) fn set_aside_tail(torn: &TornTail) -> io::Result<SetAside> {
    let moved_to = unused_torn_name(&torn.file);
    if torn.whole_file {
        fs::rename(&torn.file, &moved_to)?;
    } else {
        let data = fs::read(&torn.file)?;
        let start = usize::try_from(torn.offset).map_err(io::Error::other)?;
        let tail = data.get(start..).unwrap_or_default();
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&moved_to)?;
        out.write_all(tail)?;
        out.sync_all()?;
        let file = OpenOptions::new().write(true).open(&torn.file)?;
        file.set_len(torn.offset)?;
        file.sync_all()?;
    }
    Ok(SetAside {
        file: torn.file.clone(),
        offset: torn.offset,
        bytes: torn.len,
        moved_to,
        reason: torn.reason.clone(),
    })
}

/// `<file>.torn`, or `<file>.torn.N` for the first N not taken.
fn unused_torn_name(file: &Path) -> PathBuf {
    let base = file.as_os_str().to_owned();
    let mut candidate = base.clone();
    candidate.push(".torn");
    let mut n = 1u32;
    while Path::new(&candidate).exists() {
        candidate = base.clone();
        candidate.push(format!(".torn.{n}"));
        n += 1;
    }
    PathBuf::from(candidate)
}

fn io_err(path: &Path, source: io::Error) -> LedgerError {
    LedgerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Failure injection for unit tests: commits in a listed directory fail, as
/// on a full or failing disk (which tests cannot otherwise provoke as root).
#[cfg(test)]
pub(crate) mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAILING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(crate) fn fail_commits_in(dir: &Path) {
        FAILING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(dir.to_owned());
    }

    pub(crate) fn failing(dir: &Path) -> bool {
        FAILING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|d| d == dir)
    }
}
