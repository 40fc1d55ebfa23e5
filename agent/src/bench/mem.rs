//! `memR` and `memW`: single-thread sequential memory bandwidth in MB/s (10⁶ bytes per second) over a buffer
//! larger than the caches.
//!
//! Both use libc's `memcpy` / `memset` (through `copy_from_slice` and `fill` on bytes), which are vectorised in
//! every build, so a debug build of the agent measures the memory too, not its own unoptimised loop. Reads copy
//! each 16 KiB block of the buffer into one 16 KiB scratch block: its stores stay in L1, the loads stream from
//! memory.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use super::Outcome;

/// The buffer: larger than any last-level cache a single core sees.
const BUFFER_BYTES: u64 = 128 << 20;
/// The smallest buffer, when memory is short.
const MIN_BUFFER_BYTES: u64 = 8 << 20;
/// `memR`'s block: fits L1 with room to spare.
const READ_BLOCK: usize = 16 << 10;
/// `memW`'s block, and how much either does between two looks at the clock.
const WRITE_BLOCK: usize = 1 << 20;

/// `memR`: sequential reads until the deadline.
pub(crate) fn read(start: Instant, deadline: Instant) -> Outcome {
    let buf = buffer(0x5A, start, deadline)?;
    let mut scratch = vec![0u8; READ_BLOCK];
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut passes = 0u64;
    'sweep: loop {
        for chunk in buf.chunks(WRITE_BLOCK) {
            if Instant::now() >= deadline {
                break 'sweep;
            }
            for block in chunk.chunks_exact(READ_BLOCK) {
                scratch.copy_from_slice(block);
                // The copy has an observer, so it cannot be optimised away.
                black_box(&mut scratch);
            }
            bytes += chunk.len() as u64;
        }
        passes += 1;
    }
    finish(bytes, passes, buf.len(), start)
}

/// `memW`: sequential writes (`memset`) until the deadline.
pub(crate) fn write(start: Instant, deadline: Instant) -> Outcome {
    let mut buf = buffer(0, start, deadline)?;
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut passes = 0u64;
    let mut byte = 0u8;
    'sweep: loop {
        // A different byte each pass: every pass really writes.
        byte = byte.wrapping_add(1);
        for chunk in buf.chunks_mut(WRITE_BLOCK) {
            if Instant::now() >= deadline {
                break 'sweep;
            }
            chunk.fill(byte);
            black_box(&mut *chunk);
            bytes += chunk.len() as u64;
        }
        passes += 1;
    }
    finish(bytes, passes, buf.len(), start)
}

/// The buffer: [`BUFFER_BYTES`], or a quarter of the available memory if that is less, a whole number of write
/// blocks, filled with `byte` before the clock starts, so the sweeps hit real pages (not the kernel's shared zero
/// page) and do not pay for faulting them in. Filling stops at half the time from `start` to `deadline`: with a
/// very short limit the buffer is what could be filled (`detail.buffer_mib` says how much).
fn buffer(byte: u8, start: Instant, deadline: Instant) -> Result<Vec<u8>, String> {
    // Unknown available memory (0) leaves the buffer at its full size.
    let available = match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            sys.available_memory()
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the available memory");
            0
        }
    };
    let mut bytes = BUFFER_BYTES;
    if available > 0 {
        bytes = bytes.min(available / 4);
    }
    if bytes < MIN_BUFFER_BYTES {
        return Err(format!(
            "only {} MiB of memory available; need at least {} MiB",
            available >> 20,
            (MIN_BUFFER_BYTES * 4) >> 20
        ));
    }
    let bytes = usize::try_from(bytes - bytes % WRITE_BLOCK as u64)
        .map_err(|_| "buffer size does not fit this platform".to_string())?;
    let fill_until = start + deadline.saturating_duration_since(start) / 2;
    let mut buf = vec![0u8; bytes];
    let mut filled = 0;
    for chunk in buf.chunks_mut(WRITE_BLOCK) {
        if Instant::now() >= fill_until {
            break;
        }
        chunk.fill(byte);
        filled += chunk.len();
    }
    if filled == 0 {
        // Also keeps the sweeps from spinning over an empty buffer.
        return Err("the time limit is too short to fill the buffer".into());
    }
    buf.truncate(filled);
    Ok(buf)
}

/// MB/s from the bytes moved since `start`.
fn finish(bytes: u64, passes: u64, buffer: usize, start: Instant) -> Outcome {
    let secs = start.elapsed().as_secs_f64();
    if bytes == 0 || secs <= 0.0 {
        return Err("the time limit is too short to sweep one block".into());
    }
    let mut detail = BTreeMap::new();
    detail.insert("buffer_mib".into(), (buffer >> 20) as f64);
    detail.insert("bytes".into(), bytes as f64);
    detail.insert("passes".into(), passes as f64);
    Ok((bytes as f64 / secs / 1e6, detail))
}
