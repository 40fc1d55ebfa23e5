//! Benchmarks the agent runs on its own VM, with nothing else to install (CB-Tumblebug needed sysbench and a MySQL
//! server with a fixed root password for the same figures).
//!
//! [`run`] takes a [`BenchRequest`] and returns one [`BenchResult`] per requested [`BenchKind`], run one after the
//! other (never at once: they would measure each other). Each has its own time limit ([`BenchRequest::time_limit`],
//! 10 s by default, at most 300 s) that covers its setup too, so the overhead on the VM is bounded by
//! `kinds × time_limit`. CPU- and I/O-heavy loops run on blocking threads (`spawn_blocking`) and check the deadline
//! between small chunks of work; network ones are async with timeouts. A benchmark that fails (unreachable target,
//! full disk, ...) gives a result with `error` set and `value` NaN; the other benchmarks still run. Temporary files
//! go to a fresh directory under [`BenchRequest::work_dir`] that is removed when the benchmark ends, whatever
//! happened.
//!
//! Before anything runs, the 1-minute load average per core (`/proc/loadavg` on Linux, sysinfo elsewhere) is
//! compared with [`BenchRequest::max_load`] (0.5 by default): above it the run is refused with
//! [`BenchError::Overloaded`] unless [`BenchRequest::force`] is set, since a busy VM would report its neighbours'
//! work, not its own capacity. Where the OS has no load average (Windows) the check is skipped.
//!
//! | kind   | unit     | method | runs |
//! |--------|----------|--------|------|
//! | `cpus` | `Mops/s` | million operations per second of a fixed kernel on one thread: one operation is one step of a 64-bit integer LCG and one dependent float multiply-add on a second chain ([`cpu`]) | until the time limit |
//! | `cpum` | `Mops/s` | the same kernel on one thread per logical CPU (`available_parallelism`), operations of all threads over the wall time | until the time limit |
//! | `memR` | `MB/s`   | bytes read per second (10⁶ bytes) sweeping sequentially over a buffer of 128 MiB (a quarter of the available memory if less, at least 8 MiB), larger than the caches, in 16 KiB blocks each copied into one 16 KiB scratch block that stays in L1 (libc `memcpy`: vector loads; the stores never leave the cache) ([`mem`]) | until the time limit |
//! | `memW` | `MB/s`   | bytes written per second sweeping the same buffer with `memset` (slice `fill`) in 1 MiB blocks | until the time limit |
//! | `fioW` | `MB/s`   | bytes per second writing a new temporary file of [`BenchRequest::fio_file_bytes`] (256 MiB by default) sequentially in 1 MiB blocks of incompressible data, then `fsync`; the time includes the `fsync` ([`fio`]) | one pass, or until the time limit |
//! | `fioR` | `MB/s`   | bytes per second reading such a file sequentially in 1 MiB blocks. The file is written and `fsync`ed first (within at most half the time limit), then dropped from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` (Linux), so reads come from the device without `O_DIRECT` (whose alignment rules differ per file system and fail on tmpfs). Elsewhere, or where the file system ignores the advice, reads may be served from the cache; `detail.cache_dropped` says which | one pass, or until the time limit |
//! | `dbR`  | `tx/s`   | read-only transactions per second on an embedded [redb](https://docs.rs/redb) database of 10 000 rows of 120 bytes: each transaction does 10 point reads at random keys and one range read of 100 consecutive rows, like sysbench `oltp_read_only` ([`db`]) | until the time limit |
//! | `dbW`  | `tx/s`   | write transactions per second on the same database: 2 updates at random keys, 1 delete and 1 insert of the same key (the table keeps its size), committed durably (`fsync`), like sysbench `oltp_write_only` | until the time limit |
//! | `rtt`  | `ms`     | median TCP connect time (SYN to SYN-ACK: one network round trip plus the kernels' work) to [`BenchRequest::rtt_targets`], names resolved once beforehand, up to 20 connections per target 20 ms apart; `detail` has `p50`, `p99`, `min`, `max`, `samples` and per target `<host:port>` (its median) and `<host:port>.p99` ([`net`]) | 20 samples per target, or until the time limit |
//! | `mrtt` | `ms`     | the same towards the other VMs of the MCIS ([`BenchRequest::mrtt_peers`]): the median over all peers' samples, per peer in `detail` | the same |
//!
//! `rtt` and `mrtt` need a listening TCP port on the other side (the agent's pull port, sshd, ...): a connect is
//! enough, nothing is sent, and no raw socket (ICMP) is needed. A target that cannot be reached is counted in
//! `detail.unreachable` (and `<host:port>.unreachable` = 1); the result is an error only if no target could be
//! reached.
//!
//! The embedded database is redb rather than SQLite (`rusqlite` with `bundled`): redb is pure Rust (~45 000 lines)
//! with no dependencies of its own, so it needs no C compiler and builds in seconds, where bundled SQLite compiles
//! the ~250 000-line C amalgamation on every clean build (slow on a 2-core builder) and links over 1 MiB of code
//! into the agent. redb still has real ACID transactions, `fsync`ed commits and copy-on-write B-trees, which is
//! what a read/write transaction mix should exercise. Its figures compare VMs with each other, not with sysbench on
//! MySQL, only between VMs.

pub mod cpu;
pub mod db;
pub mod fio;
pub mod mem;
pub mod net;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The default time limit of each benchmark.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(10);
/// The longest time limit a request may ask for.
pub const MAX_TIME_LIMIT: Duration = Duration::from_secs(300);
/// The default size of the `fioR` / `fioW` temporary file.
pub const DEFAULT_FIO_FILE_BYTES: u64 = 256 << 20;
/// The smallest `fioR` / `fioW` file: one block.
pub const MIN_FIO_FILE_BYTES: u64 = fio::BLOCK_BYTES as u64;
/// The default load limit: refuse when the 1-minute load average per core is above it.
pub const DEFAULT_MAX_LOAD: f64 = 0.5;

/// One benchmark. Its name (`Display`, `FromStr`, serde) is the one Tumblebug uses: `cpus`, `cpum`, `memR`,
/// `memW`, `fioR`, `fioW`, `dbR`, `dbW`, `rtt`, `mrtt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BenchKind {
    /// Single-thread compute throughput, `Mops/s`.
    #[serde(rename = "cpus")]
    Cpus,
    /// All-core compute throughput, `Mops/s`.
    #[serde(rename = "cpum")]
    Cpum,
    /// Memory read bandwidth, `MB/s`.
    #[serde(rename = "memR")]
    MemR,
    /// Memory write bandwidth, `MB/s`.
    #[serde(rename = "memW")]
    MemW,
    /// File read throughput, `MB/s`.
    #[serde(rename = "fioR")]
    FioR,
    /// File write throughput, `MB/s`.
    #[serde(rename = "fioW")]
    FioW,
    /// Embedded-database read transactions, `tx/s`.
    #[serde(rename = "dbR")]
    DbR,
    /// Embedded-database write transactions, `tx/s`.
    #[serde(rename = "dbW")]
    DbW,
    /// TCP connect time to given endpoints, `ms`.
    #[serde(rename = "rtt")]
    Rtt,
    /// TCP connect time to the other VMs of the MCIS, `ms`.
    #[serde(rename = "mrtt")]
    Mrtt,
}

impl BenchKind {
    /// Every kind, in the order a full run uses.
    pub const ALL: [BenchKind; 10] = [
        BenchKind::Cpus,
        BenchKind::Cpum,
        BenchKind::MemR,
        BenchKind::MemW,
        BenchKind::FioR,
        BenchKind::FioW,
        BenchKind::DbR,
        BenchKind::DbW,
        BenchKind::Rtt,
        BenchKind::Mrtt,
    ];

    /// The name: `cpus`, `cpum`, `memR`, ...
    pub fn name(self) -> &'static str {
        match self {
            BenchKind::Cpus => "cpus",
            BenchKind::Cpum => "cpum",
            BenchKind::MemR => "memR",
            BenchKind::MemW => "memW",
            BenchKind::FioR => "fioR",
            BenchKind::FioW => "fioW",
            BenchKind::DbR => "dbR",
            BenchKind::DbW => "dbW",
            BenchKind::Rtt => "rtt",
            BenchKind::Mrtt => "mrtt",
        }
    }

    /// The unit of the result's `value`.
    pub fn unit(self) -> &'static str {
        match self {
            BenchKind::Cpus | BenchKind::Cpum => "Mops/s",
            BenchKind::MemR | BenchKind::MemW | BenchKind::FioR | BenchKind::FioW => "MB/s",
            BenchKind::DbR | BenchKind::DbW => "tx/s",
            BenchKind::Rtt | BenchKind::Mrtt => "ms",
        }
    }

    /// Whether it writes temporary files under [`BenchRequest::work_dir`].
    fn uses_work_dir(self) -> bool {
        matches!(
            self,
            BenchKind::FioR | BenchKind::FioW | BenchKind::DbR | BenchKind::DbW
        )
    }
}

impl fmt::Display for BenchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`BenchKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown benchmark {0:?} (known: cpus, cpum, memR, memW, fioR, fioW, dbR, dbW, rtt, mrtt)")]
pub struct UnknownBenchKind(pub String);

impl FromStr for BenchKind {
    type Err = UnknownBenchKind;

    /// Exact names only (`memR`, not `memr`: they are keys in the `bench` table), around spaces (`--only "cpus, memR"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        BenchKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownBenchKind(s.to_owned()))
    }
}

/// What to run, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchRequest {
    /// The benchmarks, run in this order (a repeated kind runs once).
    pub kinds: Vec<BenchKind>,
    /// The time limit of each benchmark, setup included: more than 0, at most [`MAX_TIME_LIMIT`]. In serde, as
    /// `time_limit_secs` (a number of seconds).
    #[serde(rename = "time_limit_secs", with = "secs_f64")]
    pub time_limit: Duration,
    /// Size of the `fioR` / `fioW` temporary file, at least [`MIN_FIO_FILE_BYTES`]; there must be room for it.
    pub fio_file_bytes: u64,
    /// Where the temporary files of `fio*` and `db*` go (an existing directory on the disk to measure).
    pub work_dir: PathBuf,
    /// `host:port` endpoints for `rtt`.
    pub rtt_targets: Vec<String>,
    /// `host:port` of the other VMs of the MCIS for `mrtt`.
    pub mrtt_peers: Vec<String>,
    /// Run even when the VM is above [`BenchRequest::max_load`].
    pub force: bool,
    /// Refuse (unless forced) when the 1-minute load average per core is above this.
    pub max_load: f64,
}

impl Default for BenchRequest {
    /// Every benchmark but `rtt` and `mrtt` (they need targets), 10 s each, a 256 MiB file in the system's
    /// temporary directory, load limit 0.5.
    fn default() -> Self {
        BenchRequest {
            kinds: BenchKind::ALL
                .into_iter()
                .filter(|k| !matches!(k, BenchKind::Rtt | BenchKind::Mrtt))
                .collect(),
            time_limit: DEFAULT_TIME_LIMIT,
            fio_file_bytes: DEFAULT_FIO_FILE_BYTES,
            work_dir: std::env::temp_dir(),
            rtt_targets: Vec::new(),
            mrtt_peers: Vec::new(),
            force: false,
            max_load: DEFAULT_MAX_LOAD,
        }
    }
}

/// The outcome of one benchmark.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    /// Which benchmark.
    pub kind: BenchKind,
    /// The figure, in `unit`; NaN when `error` is set (`null` in JSON).
    pub value: f64,
    /// The unit of `value` (see the module documentation): `Mops/s`, `MB/s`, `tx/s` or `ms`.
    pub unit: &'static str,
    /// How long it ran, setup and cleanup included. In JSON as `elapsed_ms`.
    #[serde(rename = "elapsed_ms", serialize_with = "ser_millis")]
    pub elapsed: Duration,
    /// Supporting figures, e.g. `p99` and per-peer medians of `rtt`, `threads` of `cpum`, `bytes` of `fioW`.
    pub detail: BTreeMap<String, f64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl BenchResult {
    /// A successful result.
    fn ok(kind: BenchKind, value: f64, detail: BTreeMap<String, f64>) -> Self {
        BenchResult {
            kind,
            value,
            unit: kind.unit(),
            elapsed: Duration::ZERO,
            detail,
            error: None,
        }
    }

    /// A failed result: NaN and the reason.
    fn failed(kind: BenchKind, error: impl fmt::Display) -> Self {
        BenchResult {
            kind,
            value: f64::NAN,
            unit: kind.unit(),
            elapsed: Duration::ZERO,
            detail: BTreeMap::new(),
            error: Some(error.to_string()),
        }
    }
}

/// Why a run did not start. A benchmark that fails once started is an `error` in its [`BenchResult`] instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BenchError {
    /// The VM is busier than [`BenchRequest::max_load`] and the request is not forced.
    #[error(
        "the 1-minute load average per core is {load:.2}, above the limit {limit:.2}: not benchmarking a busy VM (force to run anyway)"
    )]
    Overloaded {
        /// The 1-minute load average divided by the number of logical CPUs.
        load: f64,
        /// [`BenchRequest::max_load`].
        limit: f64,
    },
    /// The request cannot be run as it is.
    #[error("invalid benchmark request: {0}")]
    InvalidRequest(String),
}

/// Runs the requested benchmarks one after the other and returns their results in the requested order.
///
/// Fails without running anything when the request is invalid ([`BenchError::InvalidRequest`]) or the VM is too
/// busy ([`BenchError::Overloaded`]); otherwise every requested benchmark has a result, failed ones with `error`.
pub async fn run(request: &BenchRequest) -> Result<Vec<BenchResult>, BenchError> {
    let kinds = validate(request)?;
    if let Some(load) = load_per_core() {
        check_load(load, request.max_load, request.force)?;
    } else {
        tracing::debug!("no load average on this system; not checking the load");
    }
    let mut results = Vec::with_capacity(kinds.len());
    for kind in kinds {
        tracing::info!(bench = %kind, limit_ms = request.time_limit.as_millis() as u64, "benchmark starting");
        let result = run_one(kind, request).await;
        match &result.error {
            None => tracing::info!(
                bench = %kind,
                value = result.value,
                unit = result.unit,
                elapsed_ms = result.elapsed.as_millis() as u64,
                "benchmark done"
            ),
            Some(e) => tracing::warn!(bench = %kind, error = %e, "benchmark failed"),
        }
        results.push(result);
    }
    Ok(results)
}

/// One benchmark with its deadline; always a result.
async fn run_one(kind: BenchKind, request: &BenchRequest) -> BenchResult {
    let start = Instant::now();
    let deadline = start + request.time_limit;
    let outcome = match kind {
        BenchKind::Cpus => blocking(move || cpu::single(deadline)).await,
        BenchKind::Cpum => blocking(move || cpu::multi(deadline)).await,
        BenchKind::MemR => blocking(move || mem::read(start, deadline)).await,
        BenchKind::MemW => blocking(move || mem::write(start, deadline)).await,
        BenchKind::FioR => {
            let (dir, bytes) = (request.work_dir.clone(), request.fio_file_bytes);
            blocking(move || fio::read(&dir, bytes, start, deadline)).await
        }
        BenchKind::FioW => {
            let (dir, bytes) = (request.work_dir.clone(), request.fio_file_bytes);
            blocking(move || fio::write(&dir, bytes, deadline)).await
        }
        BenchKind::DbR => {
            let dir = request.work_dir.clone();
            blocking(move || db::read(&dir, deadline)).await
        }
        BenchKind::DbW => {
            let dir = request.work_dir.clone();
            blocking(move || db::write(&dir, deadline)).await
        }
        BenchKind::Rtt => net::rtt(&request.rtt_targets, deadline).await,
        BenchKind::Mrtt => net::rtt(&request.mrtt_peers, deadline).await,
    };
    let mut result = match outcome {
        Ok((value, detail)) => BenchResult::ok(kind, value, detail),
        Err(e) => BenchResult::failed(kind, e),
    };
    result.elapsed = start.elapsed();
    result
}

/// What a benchmark returns: its value and detail, or why it failed.
pub(crate) type Outcome = Result<(f64, BTreeMap<String, f64>), String>;

/// Runs a CPU- or I/O-heavy benchmark on the blocking pool so the agent's runtime keeps serving.
async fn blocking(f: impl FnOnce() -> Outcome + Send + 'static) -> Outcome {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("benchmark thread failed: {e}")))
}

/// The kinds to run (in order, each once), or why the request cannot run.
fn validate(request: &BenchRequest) -> Result<Vec<BenchKind>, BenchError> {
    let invalid = |m: String| Err(BenchError::InvalidRequest(m));
    let mut kinds = Vec::with_capacity(request.kinds.len());
    for &k in &request.kinds {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        return invalid("no benchmark requested".into());
    }
    if request.time_limit.is_zero() || request.time_limit > MAX_TIME_LIMIT {
        return invalid(format!(
            "time limit {:?} is outside (0 s, {} s]",
            request.time_limit,
            MAX_TIME_LIMIT.as_secs()
        ));
    }
    if request.max_load.is_nan() || request.max_load < 0.0 {
        return invalid(format!(
            "max_load {} must be a number >= 0",
            request.max_load
        ));
    }
    if (kinds.contains(&BenchKind::FioR) || kinds.contains(&BenchKind::FioW))
        && request.fio_file_bytes < MIN_FIO_FILE_BYTES
    {
        return invalid(format!(
            "fio file size {} bytes is below the minimum {MIN_FIO_FILE_BYTES}",
            request.fio_file_bytes
        ));
    }
    if kinds.iter().any(|k| k.uses_work_dir()) && !request.work_dir.is_dir() {
        return invalid(format!(
            "work directory {} is not a directory",
            request.work_dir.display()
        ));
    }
    for (kind, targets, what) in [
        (BenchKind::Rtt, &request.rtt_targets, "rtt targets"),
        (BenchKind::Mrtt, &request.mrtt_peers, "mrtt peers"),
    ] {
        if !kinds.contains(&kind) {
            continue;
        }
        if targets.is_empty() {
            return invalid(format!("{kind} needs {what} (host:port)"));
        }
        if let Some(bad) = targets.iter().find(|t| !net::is_host_port(t)) {
            return invalid(format!("{what}: {bad:?} is not host:port"));
        }
    }
    Ok(kinds)
}

/// Refuses a busy VM unless forced.
fn check_load(load_per_core: f64, limit: f64, force: bool) -> Result<(), BenchError> {
    if load_per_core > limit {
        if force {
            tracing::warn!(
                load = load_per_core,
                limit,
                "VM above the load limit; benchmarking anyway (forced)"
            );
        } else {
            return Err(BenchError::Overloaded {
                load: load_per_core,
                limit,
            });
        }
    }
    Ok(())
}

/// The 1-minute load average divided by the number of logical CPUs; `None` where the OS has none (Windows).
pub fn load_per_core() -> Option<f64> {
    // sysinfo reads /proc/loadavg on Linux and getloadavg elsewhere.
    let load = sysinfo::System::load_average().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(load.one / cores as f64)
}

/// A fresh directory for a benchmark's files under `dir`, removed when dropped.
pub(crate) fn scratch_dir(dir: &std::path::Path) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix("damselfly-bench-")
        .tempdir_in(dir)
        .map_err(|e| {
            format!(
                "cannot create a temporary directory in {}: {e}",
                dir.display()
            )
        })
}

/// Removes a benchmark's directory now, logging (not failing on) what could not be removed.
pub(crate) fn remove_scratch(dir: tempfile::TempDir) {
    let path = dir.path().to_owned();
    if let Err(e) = dir.close() {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a benchmark's temporary directory");
    }
}

/// The p-th quantile (0.0..=1.0) of sorted samples, nearest rank; NaN when empty.
pub(crate) fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Serde helpers for a [`Duration`] as a number of seconds.
mod secs_f64 {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }
}

/// A [`Duration`] as fractional milliseconds.
fn ser_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests;
