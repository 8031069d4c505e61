//! Small file-system helpers for durability.

use std::fs::File;
use std::io;
use std::path::Path;

/// Makes a directory's entries (a created, renamed or removed file) durable:
/// on Linux a new file's name survives a crash only once its directory has
/// been synced.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory that holds `path` ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
