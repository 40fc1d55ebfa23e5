//! `fioW` and `fioR`: sequential file write and read throughput in MB/s (10⁶ bytes per second) on a temporary file
//! of [`super::BenchRequest::fio_file_bytes`] in a fresh directory under the work directory.
//!
//! Writes: 1 MiB blocks of incompressible data (so compressing file systems do not flatter the disk), an
//! `fdatasync` every 32 MiB (which also bounds what is left to flush when the deadline comes) and an `fsync` at the
//! end, all inside the measured time.
//!
//! Reads: the file is written and synced first, within half the time limit (a shorter file if that runs out),
//! then its pages are dropped from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` on Linux — clean pages
//! are released, so the reads go to the device. No `O_DIRECT`: it needs buffers and offsets aligned to the
//! device's block size, which differs per file system, and tmpfs refuses it outright. Where the advice is not
//! available (not Linux) or ignored (some overlay and network file systems), reads may be served from memory;
//! `detail.cache_dropped` is 1 when the advice was accepted, 0 otherwise.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use super::{Outcome, scratch_dir};

/// Size of one write or read.
pub(crate) const BLOCK_BYTES: usize = 1 << 20;
/// Bytes written between two `fdatasync`s.
const SYNC_EVERY: u64 = 32 << 20;
/// Room to leave on the file system beyond the file itself.
const SPACE_MARGIN: u64 = 64 << 20;

/// `fioW`: writes the file sequentially until it is complete or the deadline comes; MB/s including the syncs.
pub(crate) fn write(dir: &Path, file_bytes: u64, deadline: Instant) -> Outcome {
    check_space(dir, file_bytes)?;
    let scratch = scratch_dir(dir)?;
    let path = scratch.path().join("fio.dat");
    let block = random_block();
    let mut file = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let start = Instant::now();
    let written = write_blocks(&mut file, &block, file_bytes, deadline)?;
    let sync_start = Instant::now();
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    let fsync = sync_start.elapsed();
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    super::remove_scratch(scratch);
    let mut detail = BTreeMap::new();
    detail.insert("file_mib".into(), (file_bytes >> 20) as f64);
    detail.insert("bytes".into(), written as f64);
    detail.insert("final_fsync_ms".into(), fsync.as_secs_f64() * 1e3);
    rate(written, secs, detail)
}

/// `fioR`: writes and syncs the file (within half the time from `start` to `deadline`), drops it from the page
/// cache, then reads it sequentially until its end or the deadline; MB/s of the reads.
pub(crate) fn read(dir: &Path, file_bytes: u64, start: Instant, deadline: Instant) -> Outcome {
    check_space(dir, file_bytes)?;
    let scratch = scratch_dir(dir)?;
    let path = scratch.path().join("fio.dat");
    let prepare_until = start + deadline.saturating_duration_since(start) / 2;
    let mut file = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let prepared = write_blocks(&mut file, &random_block(), file_bytes, prepare_until)?;
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    let cache_dropped = drop_cache(&file);
    drop(file);

    let mut file = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; BLOCK_BYTES];
    let read_start = Instant::now();
    let mut read = 0u64;
    while Instant::now() < deadline {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    let secs = read_start.elapsed().as_secs_f64();
    drop(file);
    super::remove_scratch(scratch);
    let mut detail = BTreeMap::new();
    detail.insert("file_mib".into(), (prepared >> 20) as f64);
    detail.insert("bytes".into(), read as f64);
    detail.insert(
        "cache_dropped".into(),
        if cache_dropped { 1.0 } else { 0.0 },
    );
    rate(read, secs, detail)
}

/// Writes `block` repeatedly up to `total` bytes or the deadline, syncing every [`SYNC_EVERY`]; bytes written.
fn write_blocks(
    file: &mut File,
    block: &[u8],
    total: u64,
    deadline: Instant,
) -> Result<u64, String> {
    let mut written = 0u64;
    let mut since_sync = 0u64;
    while written < total && Instant::now() < deadline {
        let n = block
            .len()
            .min(usize::try_from(total - written).unwrap_or(block.len()));
        file.write_all(&block[..n])
            .map_err(|e| format!("write: {e}"))?;
        written += n as u64;
        since_sync += n as u64;
        if since_sync >= SYNC_EVERY {
            file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
            since_sync = 0;
        }
    }
    Ok(written)
}

/// MB/s, or an error when nothing could be moved in time.
fn rate(bytes: u64, secs: f64, detail: BTreeMap<String, f64>) -> Outcome {
    if bytes == 0 || secs <= 0.0 {
        return Err("the time limit is too short to move one block".into());
    }
    Ok((bytes as f64 / secs / 1e6, detail))
}

/// One block of pseudo-random bytes (xorshift64*): incompressible, and cheap to make.
fn random_block() -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let mut block = Vec::with_capacity(BLOCK_BYTES);
    while block.len() < BLOCK_BYTES {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        block.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    block
}

/// Refuses to start when the file system has no room for the file (and a margin): filling a VM's disk would
/// hurt whatever runs on it.
fn check_space(dir: &Path, file_bytes: u64) -> Result<(), String> {
    #[cfg(unix)]
    {
        let s = rustix::fs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
        let available = s.f_bavail.saturating_mul(s.f_frsize);
        if available < file_bytes.saturating_add(SPACE_MARGIN) {
            return Err(format!(
                "{} has {} MiB available; the {} MiB file needs {} MiB more room",
                dir.display(),
                available >> 20,
                file_bytes >> 20,
                SPACE_MARGIN >> 20
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, file_bytes, SPACE_MARGIN);
    Ok(())
}

/// Asks the kernel to drop the file's (clean, synced) pages from the page cache; whether it accepted.
fn drop_cache(file: &File) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        match rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "posix_fadvise(DONTNEED) refused; fioR may read from the page cache");
                false
            }
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = file;
        false
    }
}
