//! Small file-system helpers for crash-safe writes.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{CollectorError, Result};

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a torn one:
/// temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| {
        CollectorError::Config(format!("{} has no parent directory", path.display()))
    })?;
    std::fs::create_dir_all(dir).map_err(|e| CollectorError::io(dir, e))?;
    let tmp = temp_path(path);
    {
        let mut file = File::create(&tmp).map_err(|e| CollectorError::io(&tmp, e))?;
        file.write_all(bytes)
            .map_err(|e| CollectorError::io(&tmp, e))?;
        file.sync_all().map_err(|e| CollectorError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| CollectorError::io(path, e))?;
    sync_dir(dir)
}

/// The temporary name used while a file is written: `<name>.tmp`. Start-up removes leftovers.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Makes a rename or a file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| CollectorError::io(dir, e))?;
        d.sync_all().map_err(|e| CollectorError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
