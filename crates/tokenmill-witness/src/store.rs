//! The witness's memory: per ledger (by origin), the size and root of the
//! latest checkpoint it cosigned.
//!
//! This is the state that makes a witness worth anything: lose it and the
//! witness would cosign a rewritten history as readily as the true one. So
//! each update is written to a new file, synced, renamed over the old one and
//! the directory synced, before the witness answers; a crash leaves either
//! the old state or the new one, never neither. One file per ledger:
//! `<hex SHA-256 of the origin>.state`, holding three lines (origin, size,
//! base64 root).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use tokenmill_metering::hash::Hash;

/// What the witness last cosigned for one ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latest {
    /// The tree size.
    pub size: u64,
    /// Its root hash.
    pub root: Hash,
}

/// Why the state could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read, written or synced.
    #[error("witness state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A state file does not hold origin, size and root.
    #[error("witness state {0} is corrupt")]
    Corrupt(PathBuf),
}

/// The latest cosigned checkpoint of every ledger, on disk and in memory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    latest: HashMap<String, Latest>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// Opens (or creates) the state directory and reads every ledger's
    /// latest checkpoint.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut latest = HashMap::new();
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            if path.extension().is_none_or(|e| e != "state") {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(io_error(&path))?;
            let (origin, state) = parse(&text).ok_or_else(|| StoreError::Corrupt(path.clone()))?;
            if path != state_path(dir, &origin) {
                return Err(StoreError::Corrupt(path));
            }
            latest.insert(origin, state);
        }
        Ok(Store {
            dir: dir.to_owned(),
            latest,
        })
    }

    /// The latest cosigned checkpoint of `origin`, if any.
    pub fn latest(&self, origin: &str) -> Option<&Latest> {
        self.latest.get(origin)
    }

    /// Makes `state` the latest of `origin`, durably, before returning.
    pub fn set(&mut self, origin: &str, state: Latest) -> Result<(), StoreError> {
        let path = state_path(&self.dir, origin);
        let tmp = path.with_extension("tmp");
        let text = format!("{origin}\n{}\n{}\n", state.size, state.root.to_base64());
        let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(text.as_bytes()).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_error(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))?;
        self.latest.insert(origin.to_owned(), state);
        Ok(())
    }
}

fn state_path(dir: &Path, origin: &str) -> PathBuf {
    dir.join(format!(
        "{}.state",
        Hash::of_parts(&[origin.as_bytes()]).to_hex()
    ))
}

fn parse(text: &str) -> Option<(String, Latest)> {
    let mut lines = text.strip_suffix('\n')?.split('\n');
    let origin = lines.next()?.to_owned();
    let size = lines.next()?.parse().ok()?;
    let root = Hash::from_base64(lines.next()?)?;
    lines
        .next()
        .is_none()
        .then_some((origin, Latest { size, root }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.latest("a/log"), None);
        let state = Latest {
            size: 7,
            root: Hash::of_parts(&[b"r"]),
        };
        store.set("a/log", state.clone()).unwrap();
        store
            .set(
                "b/log",
                Latest {
                    size: 1,
                    root: Hash::of_parts(&[b"s"]),
                },
            )
            .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.latest("a/log"), Some(&state));
        assert_eq!(reopened.latest("b/log").map(|l| l.size), Some(1));
    }

    #[test]
    fn a_corrupt_state_file_stops_the_witness() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path())
            .unwrap()
            .set(
                "a/log",
                Latest {
                    size: 7,
                    root: Hash::of_parts(&[b"r"]),
                },
            )
            .unwrap();
        let file = state_path(dir.path(), "a/log");
        fs::write(&file, "a/log\nseven\n").unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
    }
}
