//! `cpus` and `cpum`: million operations per second of a fixed kernel, on one thread and on every logical CPU.
//!
//! One operation is one step of a 64-bit integer linear congruential generator (multiply, add) and one float
//! multiply-add on a second, dependent chain fed by the integer one. Both chains are serial, so the figure follows
//! the core's clock and its integer/float latencies, not its memory. No `mul_add`: without FMA in the target it is
//! a slow libm call.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use super::Outcome;

/// Operations between two looks at the clock: short enough to stop close to the deadline even in a debug build
/// (about a millisecond there), long enough for the clock not to count.
const CHUNK_OPS: u64 = 100_000;

/// `cpus`: the kernel on this thread until the deadline.
pub(crate) fn single(deadline: Instant) -> Outcome {
    let start = Instant::now();
    let ops = spin(deadline);
    let secs = start.elapsed().as_secs_f64();
    let mut detail = BTreeMap::new();
    detail.insert("threads".into(), 1.0);
    detail.insert("ops".into(), ops as f64);
    Ok((mops(ops, secs)?, detail))
}

/// `cpum`: the kernel on one thread per logical CPU until the deadline; all their operations over the wall time.
pub(crate) fn multi(deadline: Instant) -> Outcome {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    let per_thread: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || spin(deadline)))
            .collect();
        // A panicking kernel thread (it cannot, short of a bug) counts as no work rather than tearing down the run.
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let ops: u64 = per_thread.iter().sum();
    let mut detail = BTreeMap::new();
    detail.insert("threads".into(), threads as f64);
    detail.insert("ops".into(), ops as f64);
    detail.insert("per_thread".into(), mops(ops, secs)? / threads as f64);
    Ok((mops(ops, secs)?, detail))
}

/// Runs the kernel in chunks until the deadline; the number of operations done.
fn spin(deadline: Instant) -> u64 {
    let (mut x, mut f) = (0x9E37_79B9_7F4A_7C15_u64, 1.0_f64);
    let mut ops = 0;
    while Instant::now() < deadline {
        for _ in 0..CHUNK_OPS {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // Stays in [0, 2): no overflow, no denormals, so every step costs the same.
            f = f * 0.999_999 + (x >> 44) as f64 * 1e-9;
        }
        // Keep the chains alive: without it the optimizer could drop the loop.
        (x, f) = black_box((x, f));
        ops += CHUNK_OPS;
    }
    ops
}

/// Operations over seconds, in millions per second.
fn mops(ops: u64, secs: f64) -> Result<f64, String> {
    if ops == 0 || secs <= 0.0 {
        return Err("the time limit is too short for one chunk of work".into());
    }
    Ok(ops as f64 / secs / 1e6)
}
