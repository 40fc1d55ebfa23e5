//! Small helpers for reading `/proc` and `/sys` (Linux only) with few system calls and no allocation per read.
//!
//! `File::read_to_string` asks for the file's size first (statx + lseek), which procfs files do not have: two
//! wasted system calls per file, hundreds per round for the process table. These helpers just read.

use std::io::Read;
use std::path::Path;

/// Reads the whole file into `buf` (cleared first), without the size query.
fn read_all(path: &Path, buf: &mut String) -> std::io::Result<()> {
    buf.clear();
    let file = std::fs::File::open(path)?;
    // `Take` reads until EOF without asking for the size; the buffer's spare capacity is filled directly.
    file.take(u64::MAX).read_to_string(buf).map(|_| ())
}

/// Replaces `buf`'s contents with the file at `path`; `false` (and a debug log) if it cannot be read or is not
/// UTF-8. The buffer keeps its capacity, so a round re-reads the same files without allocating.
pub(super) fn read_into(path: impl AsRef<Path>, buf: &mut String) -> bool {
    let path = path.as_ref();
    match read_all(path, buf) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot read");
            buf.clear();
            false
        }
    }
}

/// Like [`read_into`] but silent: for files that may legitimately vanish between listing and reading (a process
/// that exited).
pub(super) fn read_quiet(path: impl AsRef<Path>, buf: &mut String) -> bool {
    if read_all(path.as_ref(), buf).is_ok() {
        true
    } else {
        buf.clear();
        false
    }
}

/// Reads a small file generated in one go (`/proc/[pid]/stat`, a sysfs attribute) with a single `read` into
/// `out`: the text read, or `None` if the file cannot be read, is not UTF-8, or may not have fit (filled `out`).
pub(super) fn read_small(path: impl AsRef<Path>, out: &mut [u8]) -> Option<&str> {
    let mut file = std::fs::File::open(path).ok()?;
    let n = file.read(out).ok()?;
    if n >= out.len() {
        return None;
    }
    std::str::from_utf8(out.get(..n)?).ok()
}

/// A file holding one unsigned number (sysfs attributes such as `scaling_cur_freq`).
pub(super) fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    let mut out = [0u8; 64];
    read_small(path, &mut out)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_files() {
        let mut buf = String::with_capacity(8);
        assert!(read_into("/proc/self/status", &mut buf));
        assert!(buf.contains("Name:"), "{buf}");
        assert!(!read_quiet("/proc/self/no-such-file", &mut buf));
        assert!(buf.is_empty());
        let mut out = [0u8; 4096];
        let stat = read_small("/proc/self/stat", &mut out).expect("stat");
        assert!(stat.starts_with(&std::process::id().to_string()));
        let mut tiny = [0u8; 4];
        assert_eq!(
            read_small("/proc/self/stat", &mut tiny),
            None,
            "did not fit"
        );
        assert_eq!(
            read_u64("/proc/sys/kernel/pid_max").map(|v| v > 0),
            Some(true)
        );
        assert_eq!(read_u64("/proc/self/status"), None);
    }
}
