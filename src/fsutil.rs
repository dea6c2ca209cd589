//! Crash-safe file writes: a file is written next to its destination, fsynced, and renamed over
//! it, so readers see the old content or the new one, never a half-written file.

use std::fs::{self, File, OpenOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh hidden name beside `path`, unique within and across processes.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Calls `write` on a temporary file beside `path`, then fsyncs and renames it over `path`.
/// On any error the temporary file is removed and `path` is untouched.
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        // create_new: never follow or clobber an existing file.
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write(&mut f).with_context(|| format!("{}: write failed", tmp.display()))?;
        f.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every filesystem allows syncing a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens `path` for appending, creating it if missing, but never through a symbolic link: a
/// run's logs must not land in a file elsewhere that a link points to.
pub fn open_append_no_follow(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        anyhow::bail!("{}: is a symbolic link; a run writes its own files, not through links", path.display());
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("{}: cannot open", path.display()))
}
