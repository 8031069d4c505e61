//! The exporter's cursor: how far the stream has acknowledged the ledger.
//!
//! It lives in the ledger directory, next to what it counts, as
//! `nats-<stream>.cursor` (one per stream, so one ledger can feed several).
//! It is replaced atomically (write a temporary file, fsync, rename, fsync
//! the directory), so after a crash it holds either the old or the new
//! position, never a torn one. It may lag the stream (the exporter saves it
//! after the acknowledgements, not with them); what is resent because of
//! that is dropped by the stream's duplicate window.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Where an export to one stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportCursor {
    /// The next record to publish: records `0..records` are acknowledged.
    pub records: u64,
    /// Checkpoint notes acknowledged, counted in the order of the ledger's
    /// checkpoints file.
    pub checkpoints: u64,
    /// Cosigned checkpoint notes acknowledged, counted in the order of the
    /// ledger's cosignatures file (a cursor written before cosignatures
    /// existed reads as 0).
    pub cosignatures: u64,
}

const MAGIC_LINE: &str = "tokenmill-nats cursor v1";

/// The cursor file of the export of `dir` to `stream`.
pub(crate) fn cursor_path(dir: &Path, stream: &str) -> PathBuf {
    dir.join(format!("nats-{stream}.cursor"))
}

/// Reads the cursor of the export of the ledger in `dir` to `stream`:
/// `None` if that export never acknowledged anything.
pub fn read_cursor(dir: &Path, stream: &str) -> io::Result<Option<ExportCursor>> {
    let path = cursor_path(dir, stream);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    parse(&text).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a cursor file", path.display()),
        )
    })
}

fn parse(text: &str) -> Option<ExportCursor> {
    let mut lines = text.lines();
    if lines.next()? != MAGIC_LINE {
        return None;
    }
    let mut field = |name: &str| -> Option<u64> {
        let line = lines.next()?;
        line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()
    };
    let records = field("records")?;
    let checkpoints = field("checkpoints")?;
    let cosignatures = match lines.next() {
        None => 0,
        Some(line) => line.strip_prefix("cosignatures ")?.parse().ok()?,
    };
    if lines.next().is_some() {
        return None;
    }
    Some(ExportCursor {
        records,
        checkpoints,
        cosignatures,
    })
}

/// Replaces the cursor file atomically and durably.
pub(crate) fn write_cursor(dir: &Path, stream: &str, cursor: ExportCursor) -> io::Result<()> {
    let path = cursor_path(dir, stream);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = format!(
        "{MAGIC_LINE}\nrecords {}\ncheckpoints {}\ncosignatures {}\n",
        cursor.records, cursor.checkpoints, cursor.cosignatures
    );
    {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    // The rename survives a crash only once the directory is synced.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_cursor(dir.path(), "s").expect("reads"), None);
        let c = ExportCursor {
            records: 12,
            checkpoints: 3,
            cosignatures: 1,
        };
        write_cursor(dir.path(), "s", c).expect("writes");
        assert_eq!(read_cursor(dir.path(), "s").expect("reads"), Some(c));
        let d = ExportCursor {
            records: 13,
            checkpoints: 3,
            cosignatures: 2,
        };
        write_cursor(dir.path(), "s", d).expect("writes");
        assert_eq!(read_cursor(dir.path(), "s").expect("reads"), Some(d));
        assert_eq!(read_cursor(dir.path(), "other").expect("reads"), None);
        assert!(!dir.path().join("nats-s.cursor.tmp").exists());
    }

    #[test]
    fn garbage_is_an_error_not_a_position() {
        for text in [
            "",
            "records 1\ncheckpoints 2\n",
            "tokenmill-nats cursor v1\nrecords x\ncheckpoints 2\n",
            "tokenmill-nats cursor v1\nrecords 1\n",
            "tokenmill-nats cursor v1\nrecords 1\ncheckpoints 2\nmore\n",
            "tokenmill-nats cursor v1\nrecords 1\ncheckpoints 2\ncosignatures 1\nmore\n",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }
}
