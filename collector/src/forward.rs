//! Forwarding: a copy of every stored point goes to InfluxDB v2 API endpoints (`[[forward]]` in the config).
//!
//! Each destination has its own [`crate::store::Store::tap`] (a copy of every batch once it is durable in the
//! WAL), its own bounded in-memory queue and its own task, so a slow or dead destination never delays ingest nor
//! another destination:
//!
//! * **Queue.** A task moves batches from the tap into the queue at once, keeping only the chunks of measurements
//!   the filters let through (`measurements`, `exclude_measurements`). The queue holds at most `queue_points`
//!   points; when a new batch would overflow it, the *oldest* queued points are dropped (and counted), as
//!   Telegraf's metric buffer does: for monitoring, the latest values are the ones worth having once the
//!   destination is back. The queue holds shared references to the stored batches, not copies.
//! * **Writes.** The sender takes up to `batch_points` points from the front of the queue, encodes them as line
//!   protocol (nanosecond timestamps) and posts them with [`influxdb2::Client::write_line_protocol_with_precision`]
//!   to `/api/v2/write?org=..&bucket=..&precision=ns`. Whatever queued up meanwhile goes in the next write.
//! * **Retries.** Connection errors, timeouts, `5xx`, `408` and `429` are retried with exponential backoff
//!   (`retry_initial_ms` doubling up to `retry_max_secs`, each delay randomised between half and all of it so
//!   that collectors restarted together do not retry together). Any other answer outside `2xx` means the
//!   destination will never take those points (bad request, unauthorised, unknown bucket, too large): the write
//!   is dropped and counted as `rejected`, and the next one goes.
//! * **Shutdown.** When the collector stops, each destination gets `shutdown_grace_secs` to send what is queued
//!   (and what the tap still holds); what is left then is counted as dropped. The queue is in memory only, so
//!   delivery is at most once: a crash loses what was queued, and nothing is re-sent after a restart.
//! * **Counters.** [`ForwardHandle::destinations`] (`GET /api/v1/forward`) shows per destination the points
//!   forwarded, dropped (by reason), filtered out and queued, failed attempts, the last error and the last success.
//!
//! Encoding. The line protocol is written here rather than with `influxdb2::models::DataPoint`, which cannot
//! carry unsigned integers, does not escape backslashes (a tag value or string ending in `\` corrupts the line)
//! and writes NaN as `NaN`, which makes InfluxDB refuse the whole write. Here: tags sorted by key (InfluxDB's
//! advice), common tags of the batch included (a chunk's own tag of the same name wins), empty tag values left
//! out (line protocol has no empty tag), `,` `=` space and `\` escaped in names and tag values, `"` and `\` in
//! strings; floats in their shortest round-trip form, `i` integers, `u` unsigned integers, `true`/`false`. Line
//! protocol cannot carry NaN, infinities or newlines: such a field value is left out of its point (counted in
//! `skipped_values`), and a point with a newline in a tag value, or with no field left, is dropped (counted as
//! `unencodable`). See `docs/FORWARDING.md`.

use crate::model::unix_ms_now;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use damselfly_proto::columnar::{chunk_rows, is_present, series_of};
use damselfly_proto::v1::{FieldColumn, TableChunk, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::http::ApiState;
use crate::store::{Store, StoredTap};

/// Default bound of a destination's queue, in points (about 100 bytes each for agent batches: ~100 MB).
pub const DEFAULT_QUEUE_POINTS: usize = 1_000_000;
/// Default number of points in one write.
pub const DEFAULT_BATCH_POINTS: usize = 5_000;
/// Default time one write may take before it counts as failed.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// Default first retry delay.
pub const DEFAULT_RETRY_INITIAL_MS: u64 = 500;
/// Default longest retry delay.
pub const DEFAULT_RETRY_MAX_SECS: u64 = 30;
/// Default time given at shutdown to send what is queued.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 5;

/// Batches the tap of one destination may hold before the store skips batches for it. The forwarder moves them
/// into its own queue as they come, so this only fills when that task is starved of CPU.
const TAP_CAPACITY: usize = 1024;
/// After the stop signal, the tap is watched until it has been quiet this long: writes still in progress when the
/// collector began to stop are stored a moment later and should be forwarded too.
const QUIET_AFTER_STOP: Duration = Duration::from_millis(200);
/// Longest error text kept from a destination's answer (it may echo a whole batch back).
const MAX_ERROR_CHARS: usize = 500;

/// One forwarding destination: an InfluxDB v2 write API (InfluxDB 2.x, InfluxDB Cloud, or anything that takes
/// `POST /api/v2/write`, such as VictoriaMetrics).
///
/// ```toml
/// [[forward]]
/// url = "https://influx.example.com:8086"
/// org = "monitoring"
/// bucket = "damselfly"
/// token_env = "INFLUX_TOKEN"
/// exclude_measurements = ["processes"]
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// A name for logs and `GET /api/v1/forward`. Default: `forward[i]` (its place in the config).
    pub name: String,
    /// Base URL of the InfluxDB v2 API, `http://` or `https://`, without a path (the client always posts to
    /// `/api/v2/write` at the root), e.g. `http://127.0.0.1:8086`. Required.
    pub url: String,
    /// Organization name (`org=` of the write). Required by InfluxDB; VictoriaMetrics ignores it.
    pub org: String,
    /// Bucket name (`bucket=` of the write). Required.
    pub bucket: String,
    /// API token, sent as `Authorization: Token ...`. Default empty: no `Authorization` header. Not serialized.
    #[serde(skip_serializing)]
    pub token: String,
    /// Name of an environment variable holding the token, to keep it out of the config file. Exclusive with
    /// `token`. The variable must be set when the collector starts.
    pub token_env: Option<String>,
    /// Forward only these measurements (exact names). Default empty: all.
    pub measurements: Vec<String>,
    /// Never forward these measurements (exact names). Default empty.
    pub exclude_measurements: Vec<String>,
    /// Most points queued for this destination; beyond it the oldest are dropped. Default 1,000,000.
    pub queue_points: usize,
    /// Most points in one write. Default 5,000; at most `queue_points` and 1,000,000.
    pub batch_points: usize,
    /// A write that has not been answered within this many seconds fails (and is retried). Default 10.
    pub timeout_secs: u64,
    /// First retry delay, in milliseconds; it doubles at each failure of the same write. Default 500.
    pub retry_initial_ms: u64,
    /// Longest retry delay, in seconds. Default 30.
    pub retry_max_secs: u64,
    /// At shutdown, how long to go on sending what is queued; the rest is counted as dropped. Default 5, at most 60.
    pub shutdown_grace_secs: u64,
}

impl Default for ForwardConfig {
    fn default() -> ForwardConfig {
        ForwardConfig {
            name: String::new(),
            url: String::new(),
            org: String::new(),
            bucket: String::new(),
            token: String::new(),
            token_env: None,
            measurements: Vec::new(),
            exclude_measurements: Vec::new(),
            queue_points: DEFAULT_QUEUE_POINTS,
            batch_points: DEFAULT_BATCH_POINTS,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            retry_initial_ms: DEFAULT_RETRY_INITIAL_MS,
            retry_max_secs: DEFAULT_RETRY_MAX_SECS,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
        }
    }
}

/// Shows everything but the token.
impl std::fmt::Debug for ForwardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("token_env", &self.token_env)
            .field("measurements", &self.measurements)
            .field("exclude_measurements", &self.exclude_measurements)
            .field("queue_points", &self.queue_points)
            .field("batch_points", &self.batch_points)
            .field("timeout_secs", &self.timeout_secs)
            .field("retry_initial_ms", &self.retry_initial_ms)
            .field("retry_max_secs", &self.retry_max_secs)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .finish()
    }
}

impl ForwardConfig {
    /// Says what is wrong with this destination, if anything.
    pub fn validate(&self) -> Result<(), String> {
        validate_url(&self.url)?;
        if self.org.trim().is_empty() {
            return Err(format!(
                "org is required for {} (the InfluxDB organization; any name for VictoriaMetrics)",
                self.url
            ));
        }
        if self.bucket.trim().is_empty() {
            return Err(format!("bucket is required for {}", self.url));
        }
        if let Some(var) = &self.token_env {
            if !self.token.is_empty() {
                return Err("token and token_env are both set: give one".into());
            }
            if var.is_empty() {
                return Err("token_env is empty: name an environment variable".into());
            }
            if std::env::var_os(var).is_none() {
                return Err(format!(
                    "token_env: the environment variable {var:?} is not set"
                ));
            }
        }
        for (list, names) in [
            ("measurements", &self.measurements),
            ("exclude_measurements", &self.exclude_measurements),
        ] {
            if let Some(i) = names.iter().position(|n| n.is_empty()) {
                return Err(format!("{list}[{i}] is empty"));
            }
        }
        if let Some(both) = self
            .measurements
            .iter()
            .find(|m| self.exclude_measurements.contains(m))
        {
            return Err(format!(
                "measurement {both:?} is in both measurements and exclude_measurements"
            ));
        }
        if !(1..=1_000_000).contains(&self.batch_points) {
            return Err(format!(
                "batch_points ({}) must be between 1 and 1000000",
                self.batch_points
            ));
        }
        if self.queue_points < self.batch_points {
            return Err(format!(
                "queue_points ({}) must be at least batch_points ({})",
                self.queue_points, self.batch_points
            ));
        }
        if !(1..=3_600).contains(&self.timeout_secs) {
            return Err(format!(
                "timeout_secs ({}) must be between 1 and 3600",
                self.timeout_secs
            ));
        }
        if !(1..=60_000).contains(&self.retry_initial_ms) {
            return Err(format!(
                "retry_initial_ms ({}) must be between 1 and 60000",
                self.retry_initial_ms
            ));
        }
        if !(1..=3_600).contains(&self.retry_max_secs)
            || self.retry_max_secs * 1_000 < self.retry_initial_ms
        {
            return Err(format!(
                "retry_max_secs ({}) must be between 1 and 3600 and at least retry_initial_ms ({} ms)",
                self.retry_max_secs, self.retry_initial_ms
            ));
        }
        if self.shutdown_grace_secs > 60 {
            return Err(format!(
                "shutdown_grace_secs ({}) must be at most 60",
                self.shutdown_grace_secs
            ));
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The token to send: `token`, or the value of `token_env`.
    fn resolve_token(&self) -> Result<String, String> {
        match &self.token_env {
            None => Ok(self.token.clone()),
            Some(var) => std::env::var(var).map_err(|e| format!("token_env {var:?}: {e}")),
        }
    }
}

/// The URL must be one the influxdb2 client uses as given: it replaces the path with `/api/v2/write`, so a path
/// (an InfluxDB behind a reverse proxy at `/influx`) would be silently ignored; refuse it instead.
fn validate_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("url is required (e.g. \"http://127.0.0.1:8086\")".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "url {url:?}: the scheme must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("url {url:?} has no host"));
    }
    if !matches!(parsed.path(), "" | "/") {
        return Err(format!(
            "url {url:?}: a path ({:?}) is not supported: writes always go to /api/v2/write at the root",
            parsed.path()
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "url {url:?}: no query or fragment (org and bucket have their own keys)"
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "url {url:?}: no user or password in the URL (use token or token_env)"
        ));
    }
    Ok(())
}

/// Which measurements go to a destination.
#[derive(Debug, Clone, Default)]
struct Filter {
    /// Empty: all.
    include: HashSet<String>,
    exclude: HashSet<String>,
}

impl Filter {
    fn new(config: &ForwardConfig) -> Filter {
        Filter {
            include: config.measurements.iter().cloned().collect(),
            exclude: config.exclude_measurements.iter().cloned().collect(),
        }
    }

    fn allows(&self, measurement: &str) -> bool {
        (self.include.is_empty() || self.include.contains(measurement))
            && !self.exclude.contains(measurement)
    }
}

/// Counters of one destination. Monotonic except `in_flight_points` and `consecutive_failures`.
#[derive(Debug, Default)]
struct Counters {
    forwarded_points: AtomicU64,
    writes: AtomicU64,
    filtered_points: AtomicU64,
    skipped_values: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_rejected: AtomicU64,
    dropped_unencodable: AtomicU64,
    dropped_shutdown: AtomicU64,
    failed_attempts: AtomicU64,
    consecutive_failures: AtomicU64,
    rejected_writes: AtomicU64,
    in_flight_points: AtomicU64,
}

/// When things last went right or wrong.
#[derive(Debug, Default, Clone)]
struct Health {
    last_success_unix_ms: Option<u64>,
    last_error: Option<String>,
    last_error_unix_ms: Option<u64>,
}

/// What the forwarder of one destination and the API share.
#[derive(Debug)]
struct Shared {
    name: String,
    config: ForwardConfig,
    filter: Filter,
    counters: Counters,
    /// Points the store skipped because the tap was full (all measurements: the filter never saw them).
    tap_dropped: Arc<AtomicU64>,
    health: Mutex<Health>,
    queue: Mutex<Queue>,
    /// Points were queued, or the tap is drained at shutdown.
    wake: Notify,
    /// Set once the tap is drained after the stop signal: the queue will get nothing more.
    drained: AtomicBool,
    /// Set at the stop signal: everything must be done by then.
    deadline: OnceLock<Instant>,
    /// Why this destination cannot run (its client could not be built), if so.
    disabled: Option<String>,
}

impl Shared {
    fn new(index: usize, config: &ForwardConfig, tap_dropped: Arc<AtomicU64>) -> Shared {
        let name = if config.name.is_empty() {
            format!("forward[{index}]")
        } else {
            config.name.clone()
        };
        Shared {
            name,
            config: config.clone(),
            filter: Filter::new(config),
            counters: Counters::default(),
            tap_dropped,
            health: Mutex::default(),
            queue: Mutex::default(),
            wake: Notify::new(),
            drained: AtomicBool::new(false),
            deadline: OnceLock::new(),
            disabled: None,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Time left before the shutdown deadline; `None` while the collector runs.
    fn time_left(&self) -> Option<Duration> {
        self.deadline
            .get()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    fn status(&self) -> DestinationStatus {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let dropped = DroppedPoints {
            queue_full: get(&c.dropped_queue_full),
            tap_full: get(&self.tap_dropped),
            rejected: get(&c.dropped_rejected),
            unencodable: get(&c.dropped_unencodable),
            shutdown: get(&c.dropped_shutdown),
        };
        let queued = self.queue().points as u64 + get(&c.in_flight_points);
        let consecutive_failures = get(&c.consecutive_failures);
        let health = self.health().clone();
        let status = if self.disabled.is_some() {
            "disabled"
        } else if consecutive_failures > 0 {
            "retrying"
        } else if health.last_error_unix_ms > health.last_success_unix_ms {
            // Not retrying, yet the last write failed: it was refused.
            "rejected"
        } else if health.last_success_unix_ms.is_some() {
            "ok"
        } else {
            "idle"
        };
        DestinationStatus {
            name: self.name.clone(),
            url: self.config.url.clone(),
            org: self.config.org.clone(),
            bucket: self.config.bucket.clone(),
            status,
            forwarded_points: get(&c.forwarded_points),
            writes: get(&c.writes),
            dropped_points: dropped.total(),
            dropped,
            filtered_points: get(&c.filtered_points),
            skipped_values: get(&c.skipped_values),
            queued_points: queued,
            queue_points: self.config.queue_points as u64,
            failed_attempts: get(&c.failed_attempts),
            consecutive_failures,
            rejected_writes: get(&c.rejected_writes),
            last_success_unix_ms: health.last_success_unix_ms,
            last_error: self.disabled.clone().or(health.last_error),
            last_error_unix_ms: health.last_error_unix_ms,
        }
    }
}

/// Points a destination will never get, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedPoints {
    /// The queue was full: the oldest queued points made room for new ones.
    pub queue_full: u64,
    /// The store skipped whole batches because this destination's tap was full (counted before filtering).
    pub tap_full: u64,
    /// The destination refused the write for good (a `4xx` other than `408` and `429`), or the destination is
    /// `disabled`.
    pub rejected: u64,
    /// Line protocol cannot carry the point (a newline in a tag value, or no field it can carry).
    pub unencodable: u64,
    /// Still queued when the shutdown grace period ended.
    pub shutdown: u64,
}

impl DroppedPoints {
    pub fn total(&self) -> u64 {
        self.queue_full + self.tap_full + self.rejected + self.unencodable + self.shutdown
    }
}

/// One destination as `GET /api/v1/forward` shows it. Counters count since the collector started; times are Unix
/// milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationStatus {
    pub name: String,
    pub url: String,
    pub org: String,
    pub bucket: String,
    /// `idle` (nothing sent yet), `ok` (the last write went through), `retrying` (the last attempt failed and
    /// will be retried), `rejected` (the destination refused the last write: see `last_error`) or `disabled` (the
    /// client could not be set up: see `last_error`).
    pub status: &'static str,
    /// Points the destination accepted.
    pub forwarded_points: u64,
    /// Successful writes (requests).
    pub writes: u64,
    /// Points dropped, all reasons (the sum of `dropped`).
    pub dropped_points: u64,
    pub dropped: DroppedPoints,
    /// Points left out by the measurement filters (not dropped: not wanted).
    pub filtered_points: u64,
    /// Field values left out of their point because line protocol cannot carry them (NaN, infinities, strings
    /// with a newline).
    pub skipped_values: u64,
    /// Points waiting, including those of the write in progress.
    pub queued_points: u64,
    /// The queue's bound.
    pub queue_points: u64,
    /// Write attempts that failed and were (or will be) retried.
    pub failed_attempts: u64,
    /// Failed attempts since the last success.
    pub consecutive_failures: u64,
    /// Writes the destination refused for good (their points are in `dropped.rejected`).
    pub rejected_writes: u64,
    pub last_success_unix_ms: Option<u64>,
    /// The last failure (kept after a later success; `status` says whether it still applies).
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u64>,
}

/// Rows of one chunk of a stored batch.
#[derive(Debug, Clone)]
struct Slice {
    batch: Arc<WriteBatch>,
    chunk: usize,
    rows: Range<usize>,
}

/// One stored batch in the queue: the chunks the filters let through, and how far the sender got.
#[derive(Debug)]
struct Entry {
    batch: Arc<WriteBatch>,
    /// Indices of the chunks to send, in order.
    chunks: Vec<usize>,
    /// Position in `chunks` of the first chunk with rows left.
    next: usize,
    /// First row of `chunks[next]` not yet taken.
    row: usize,
    /// Rows left.
    points: usize,
}

impl Entry {
    /// Takes up to `max` rows from the front; into `out` if given, else they are dropped. Returns how many.
    fn take(&mut self, max: usize, mut out: Option<&mut Vec<Slice>>) -> usize {
        let mut taken = 0;
        while taken < max && self.next < self.chunks.len() {
            let chunk = self.chunks[self.next];
            let rows = chunk_rows(&self.batch.chunks[chunk]);
            let n = (rows - self.row).min(max - taken);
            if let Some(out) = out.as_deref_mut() {
                out.push(Slice {
                    batch: self.batch.clone(),
                    chunk,
                    rows: self.row..self.row + n,
                });
            }
            taken += n;
            self.row += n;
            if self.row == rows {
                self.next += 1;
                self.row = 0;
            }
        }
        self.points -= taken;
        taken
    }
}

/// A destination's queue, bounded in points.
#[derive(Debug, Default)]
struct Queue {
    entries: VecDeque<Entry>,
    points: usize,
}

impl Queue {
    /// Appends a batch, first dropping the oldest points beyond `bound`. Returns the points dropped.
    fn push(&mut self, mut entry: Entry, bound: usize) -> usize {
        let mut dropped = 0;
        // A batch larger than the whole queue keeps its newest rows.
        if entry.points > bound {
            dropped += entry.take(entry.points - bound, None);
        }
        while self.points + entry.points > bound {
            let excess = self.points + entry.points - bound;
            let Some(front) = self.entries.front_mut() else {
                break;
            };
            let n = front.take(excess, None);
            self.points -= n;
            dropped += n;
            if front.points == 0 {
                self.entries.pop_front();
            }
        }
        self.points += entry.points;
        if entry.points > 0 {
            self.entries.push_back(entry);
        }
        dropped
    }

    /// Takes up to `max` points from the front.
    fn take(&mut self, max: usize) -> (Vec<Slice>, usize) {
        let mut slices = Vec::new();
        let mut taken = 0;
        while taken < max {
            let Some(front) = self.entries.front_mut() else {
                break;
            };
            taken += front.take(max - taken, Some(&mut slices));
            if front.points == 0 {
                self.entries.pop_front();
            }
        }
        self.points -= taken;
        (slices, taken)
    }

    /// Empties the queue; returns the points it held.
    fn clear(&mut self) -> usize {
        self.entries.clear();
        std::mem::take(&mut self.points)
    }
}

/// The queue entry of a stored batch (the chunks the filter lets through), and the points filtered out.
fn entry_for(batch: Arc<WriteBatch>, filter: &Filter) -> (Entry, usize) {
    let mut chunks = Vec::new();
    let mut points = 0;
    let mut filtered = 0;
    for (i, chunk) in batch.chunks.iter().enumerate() {
        let rows = chunk_rows(chunk);
        if rows == 0 {
            continue;
        }
        if filter.allows(&chunk.measurement) {
            chunks.push(i);
            points += rows;
        } else {
            filtered += rows;
        }
    }
    // `points` (row-wise) is always empty here: the store turns points into chunks before the WAL.
    let entry = Entry {
        batch,
        chunks,
        next: 0,
        row: 0,
        points,
    };
    (entry, filtered)
}

/// What encoding a set of slices gave besides the body.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Encoded {
    /// Lines written.
    points: usize,
    /// Points left out (see [`DroppedPoints::unencodable`]).
    unencodable: usize,
    /// Field values left out.
    skipped_values: usize,
}

/// A field column's values, by type.
#[derive(Debug, Clone, Copy)]
enum Values<'a> {
    F64(&'a [f64]),
    I64(&'a [i64]),
    U64(&'a [u64]),
    Bool(&'a [bool]),
    Str(&'a [String]),
    Empty,
}

impl<'a> Values<'a> {
    fn of(column: &'a FieldColumn) -> Values<'a> {
        if !column.f64.is_empty() {
            Values::F64(&column.f64)
        } else if !column.i64.is_empty() {
            Values::I64(&column.i64)
        } else if !column.u64.is_empty() {
            Values::U64(&column.u64)
        } else if !column.bool.is_empty() {
            Values::Bool(&column.bool)
        } else if !column.str.is_empty() {
            Values::Str(&column.str)
        } else {
            Values::Empty
        }
    }
}

/// Values present in rows `0..row` of a column with this presence bitmap: the index of row `row`'s value.
fn values_before(present: &[u8], row: usize) -> usize {
    if present.is_empty() {
        return row;
    }
    let full = (row / 8).min(present.len());
    let mut n: usize = present[..full]
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum();
    if let Some(&partial) = present.get(row / 8)
        && !row.is_multiple_of(8)
    {
        n += (partial & ((1u8 << (row % 8)) - 1)).count_ones() as usize;
    }
    n
}

fn has_newline(text: &str) -> bool {
    text.bytes().any(|b| b == b'\n' || b == b'\r')
}

/// Appends `text` escaping `special` and the backslash (InfluxDB reads `\\` as one backslash; a lone one before
/// an ordinary character would also be read as itself, but escaping it always is never ambiguous).
fn escape_into(out: &mut Vec<u8>, text: &str, special: &[u8]) {
    for &b in text.as_bytes() {
        if b == b'\\' || special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Escapes of a measurement name.
const MEASUREMENT_SPECIAL: &[u8] = b", ";
/// Escapes of tag keys, tag values and field keys.
const KEY_SPECIAL: &[u8] = b",= ";
/// Escapes of string field values (inside double quotes).
const STRING_SPECIAL: &[u8] = b"\"";

fn escaped(text: &str, special: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    escape_into(&mut out, text, special);
    out
}

/// Floats as their shortest decimal that reads back to the same value; exponent form for very large and very
/// small magnitudes, which `Display` would spell out digit by digit.
fn write_f64(out: &mut Vec<u8>, v: f64) {
    let magnitude = v.abs();
    // Writing to a Vec cannot fail.
    let _ = if magnitude == 0.0 || (1e-5..1e16).contains(&magnitude) {
        write!(out, "{v}")
    } else {
        write!(out, "{v:e}")
    };
}

/// Where a tag's value comes from.
#[derive(Debug, Clone, Copy)]
enum TagSource<'a> {
    Common(&'a str),
    Series(usize),
}

/// Appends one line of line protocol per row of the slice to `out`.
fn encode_slice(slice: &Slice, out: &mut Vec<u8>, counts: &mut Encoded) {
    let batch = &slice.batch;
    let Some(chunk) = batch.chunks.get(slice.chunk) else {
        return;
    };
    encode_rows(batch, chunk, slice.rows.clone(), out, counts);
}

fn encode_rows(
    batch: &WriteBatch,
    chunk: &TableChunk,
    rows: Range<usize>,
    out: &mut Vec<u8>,
    counts: &mut Encoded,
) {
    let measurement = escaped(&chunk.measurement, MEASUREMENT_SPECIAL);
    // Tags sorted by key, as InfluxDB advises; a chunk's own tag overrides a common tag of the same name.
    let mut tags: Vec<(&str, TagSource<'_>)> =
        crate::model::chunk_common_tags(chunk, &batch.common_tags)
            .map(|t| (t.key.as_str(), TagSource::Common(t.value.as_str())))
            .chain(
                chunk
                    .tag_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (k.as_str(), TagSource::Series(i))),
            )
            .collect();
    tags.sort_by(|a, b| a.0.cmp(b.0));
    let tag_keys: Vec<Vec<u8>> = tags.iter().map(|(k, _)| escaped(k, KEY_SPECIAL)).collect();
    let mut columns: Vec<(Vec<u8>, &FieldColumn, Values<'_>, usize)> = chunk
        .fields
        .iter()
        .map(|c| {
            (
                escaped(&c.key, KEY_SPECIAL),
                c,
                Values::of(c),
                values_before(&c.present, rows.start),
            )
        })
        .collect();
    for row in rows {
        let Some(&time) = chunk.time_unix_nano.get(row) else {
            break;
        };
        let start = out.len();
        out.extend_from_slice(&measurement);
        let series = chunk.series.get(series_of(chunk, row));
        let mut encodable = true;
        for ((_, source), key) in tags.iter().zip(&tag_keys) {
            let value = match *source {
                TagSource::Common(v) => v,
                TagSource::Series(i) => series
                    .and_then(|s| s.tag_values.get(i))
                    .map_or("", String::as_str),
            };
            // Line protocol has no empty tag value: a missing tag means the same to InfluxDB.
            if value.is_empty() {
                continue;
            }
            if has_newline(value) {
                encodable = false;
                break;
            }
            out.push(b',');
            out.extend_from_slice(key);
            out.push(b'=');
            escape_into(out, value, KEY_SPECIAL);
        }
        // Every column's cursor moves past this row's value even when the point is not written.
        let mut fields = 0;
        for (key, column, values, next) in &mut columns {
            if !is_present(&column.present, row) {
                continue;
            }
            let index = *next;
            *next += 1;
            if !encodable {
                continue;
            }
            let value_start = out.len();
            out.push(if fields == 0 { b' ' } else { b',' });
            out.extend_from_slice(key);
            out.push(b'=');
            let written = match *values {
                Values::F64(v) => v.get(index).is_some_and(|&v| {
                    v.is_finite() && {
                        write_f64(out, v);
                        true
                    }
                }),
                Values::I64(v) => v.get(index).is_some_and(|v| write!(out, "{v}i").is_ok()),
                Values::U64(v) => v.get(index).is_some_and(|v| write!(out, "{v}u").is_ok()),
                Values::Bool(v) => v.get(index).is_some_and(|&v| {
                    out.extend_from_slice(if v { b"true" } else { b"false" });
                    true
                }),
                Values::Str(v) => v.get(index).is_some_and(|v| {
                    !has_newline(v) && {
                        out.push(b'"');
                        escape_into(out, v, STRING_SPECIAL);
                        out.push(b'"');
                        true
                    }
                }),
                Values::Empty => false,
            };
            if written {
                fields += 1;
            } else {
                out.truncate(value_start);
                counts.skipped_values += 1;
            }
        }
        if !encodable || fields == 0 {
            out.truncate(start);
            counts.unencodable += 1;
            continue;
        }
        let _ = writeln!(out, " {time}");
        counts.points += 1;
    }
}

/// Line protocol for the slices.
fn encode(slices: &[Slice]) -> (Vec<u8>, Encoded) {
    let mut out = Vec::new();
    let mut counts = Encoded::default();
    for slice in slices {
        encode_slice(slice, &mut out, &mut counts);
    }
    (out, counts)
}

/// How a write attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Accepted,
    /// Worth trying again.
    Retry(String),
    /// The destination will never take it.
    Rejected(String),
}

fn truncate_text(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Sorts an answer: `2xx` accepted; `408`, `429` and `5xx` retried; any other `4xx` rejected for good. Anything
/// else (a redirect loop, an odd status) is retried: it may be a proxy in trouble.
fn classify(result: Result<(), influxdb2::RequestError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Accepted,
        Err(influxdb2::RequestError::Http { status, text }) => {
            let code = status.as_u16();
            let message = format!("HTTP {code}: {}", truncate_text(&text));
            match code {
                200..=299 => Outcome::Accepted,
                408 | 429 => Outcome::Retry(message),
                400..=499 => Outcome::Rejected(message),
                _ => Outcome::Retry(message),
            }
        }
        Err(e) => Outcome::Retry(error_chain(&e)),
    }
}

/// [`crate::error::error_chain`], shortened for the counters page.
fn error_chain(e: &dyn std::error::Error) -> String {
    truncate_text(&crate::error::error_chain(e))
}

/// The delay before retry number `attempt` (1-based): `initial * 2^(attempt-1)` capped at `max`, then a random
/// point between half of it and all of it.
pub(crate) fn backoff(attempt: u64, initial: Duration, max: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30) as u32;
    let full = initial.saturating_mul(1u32 << exponent).min(max);
    let half = full / 2;
    let spread = u64::try_from((full - half).as_micros()).unwrap_or(u64::MAX);
    let jitter = if spread == 0 {
        0
    } else {
        random_u64() % (spread + 1)
    };
    half + Duration::from_micros(jitter)
}

/// A random number without a dependency: std's hasher keys are random per process and differ per `RandomState`.
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// What the API shows of forwarding (`GET /api/v1/forward`). Cheap to clone.
#[derive(Clone, Default)]
pub struct ForwardHandle {
    destinations: Arc<Vec<Arc<Shared>>>,
}

impl std::fmt::Debug for ForwardHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.destinations.iter().map(|d| &d.name))
            .finish()
    }
}

impl ForwardHandle {
    /// Every destination, in config order.
    pub fn destinations(&self) -> Vec<DestinationStatus> {
        self.destinations.iter().map(|d| d.status()).collect()
    }
}

/// `GET /api/v1/forward`: one object per destination ([`DestinationStatus`]), in config order; `[]` when nothing
/// is forwarded. Merge into the API router.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/api/v1/forward", get(forward_status))
}

async fn forward_status(State(api): State<Arc<ApiState>>) -> axum::Json<Vec<DestinationStatus>> {
    axum::Json(api.forward.destinations())
}

/// One destination ready to run.
struct Destination {
    shared: Arc<Shared>,
    client: Option<influxdb2::Client>,
    tap: StoredTap,
}

/// The forwarding tasks, one per destination.
pub struct Forwarders {
    destinations: Vec<Destination>,
    handle: ForwardHandle,
}

impl std::fmt::Debug for Forwarders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarders")
            .field("destinations", &self.handle)
            .finish()
    }
}

impl Forwarders {
    /// Sets up one forwarder per destination, each fed by a [`crate::store::Store::tap`] opened now, so that
    /// every batch stored from now on is seen. No destination, no tap: the store copies nothing.
    pub fn new(destinations: &[ForwardConfig], store: &Store) -> Forwarders {
        Forwarders::with_taps(
            destinations
                .iter()
                .map(|config| (config.clone(), store.tap(TAP_CAPACITY)))
                .collect(),
        )
    }

    /// Same with taps given (tests feed them by hand).
    fn with_taps(destinations: Vec<(ForwardConfig, StoredTap)>) -> Forwarders {
        let destinations: Vec<Destination> = destinations
            .into_iter()
            .enumerate()
            .map(|(i, (config, tap))| {
                let mut shared = Shared::new(i, &config, tap.dropped_points.clone());
                let client = match build_client(&config) {
                    Ok(client) => Some(client),
                    Err(reason) => {
                        tracing::error!(destination = %shared.name, url = %config.url, "forwarding disabled: {reason}");
                        shared.disabled = Some(reason);
                        None
                    }
                };
                Destination {
                    shared: Arc::new(shared),
                    client,
                    tap,
                }
            })
            .collect();
        let handle = ForwardHandle {
            destinations: Arc::new(destinations.iter().map(|d| d.shared.clone()).collect()),
        };
        Forwarders {
            destinations,
            handle,
        }
    }

    pub fn handle(&self) -> ForwardHandle {
        self.handle.clone()
    }

    /// Forwards until `shutdown` completes, then for at most each destination's `shutdown_grace_secs` more.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        if self.destinations.is_empty() {
            shutdown.await;
            return;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut shared = Vec::new();
        for destination in self.destinations {
            shared.push(destination.shared.clone());
            tracing::info!(
                destination = %destination.shared.name,
                url = %destination.shared.config.url,
                bucket = %destination.shared.config.bucket,
                "forwarding stored points"
            );
            tasks.push(tokio::spawn(run_destination(destination, stop_rx.clone())));
        }
        shutdown.await;
        let now = Instant::now();
        for s in &shared {
            let _ = s.deadline.set(now + s.config.shutdown_grace());
        }
        let _ = stop_tx.send(true);
        for (task, s) in tasks.into_iter().zip(&shared) {
            if let Err(e) = task.await {
                tracing::error!(destination = %s.name, error = %e, "the forwarding task failed");
            }
        }
    }
}

fn build_client(config: &ForwardConfig) -> Result<influxdb2::Client, String> {
    // Client::new panics on a URL it cannot parse; validate() has refused those, but check again rather than
    // trust that every caller validated.
    validate_url(&config.url)?;
    let token = config.resolve_token()?;
    influxdb2::ClientBuilder::new(config.url.clone(), config.org.clone(), token)
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {}", error_chain(&e)))
}

async fn run_destination(destination: Destination, stop: watch::Receiver<bool>) {
    let Destination {
        shared,
        client,
        mut tap,
    } = destination;
    match client {
        Some(client) => {
            tokio::join!(
                drain(&shared, &mut tap, stop.clone()),
                send(&shared, &client, stop)
            );
        }
        None => {
            // Nothing can be sent: everything counts as rejected at once rather than waiting in a queue.
            let mut stop = stop;
            loop {
                tokio::select! {
                    batch = tap.batches.recv() => match batch {
                        Some(batch) => drop_batch(&shared, batch, &shared.counters.dropped_rejected),
                        None => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
    }
    // Stored after the sender gave up, or while the deadline passed: counted, not sent.
    while let Ok(batch) = tap.batches.try_recv() {
        drop_batch(&shared, batch, &shared.counters.dropped_shutdown);
    }
    let dropped = shared.queue().clear();
    Shared::add(&shared.counters.dropped_shutdown, dropped);
    let status = shared.status();
    tracing::info!(
        destination = %shared.name,
        forwarded = status.forwarded_points,
        dropped = status.dropped_points,
        "forwarding stopped"
    );
}

/// Counts a batch that will not be sent: its points pass the filter into `reason`.
fn drop_batch(shared: &Shared, batch: Arc<WriteBatch>, reason: &AtomicU64) {
    let (entry, filtered) = entry_for(batch, &shared.filter);
    Shared::add(&shared.counters.filtered_points, filtered);
    Shared::add(reason, entry.points);
}

/// Moves batches from the tap into the queue until the stop signal, then until the tap has been quiet for
/// [`QUIET_AFTER_STOP`] (or the deadline).
async fn drain(shared: &Shared, tap: &mut StoredTap, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            batch = tap.batches.recv() => match batch {
                Some(batch) => enqueue(shared, batch),
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    loop {
        let wait = shared
            .time_left()
            .map_or(QUIET_AFTER_STOP, |left| left.min(QUIET_AFTER_STOP));
        // A zero timeout still takes a ready batch: without this check a steady stream would keep us here.
        if wait.is_zero() {
            break;
        }
        match tokio::time::timeout(wait, tap.batches.recv()).await {
            Ok(Some(batch)) => enqueue(shared, batch),
            Ok(None) | Err(_) => break,
        }
    }
    shared.drained.store(true, Ordering::Release);
    shared.wake.notify_one();
}

fn enqueue(shared: &Shared, batch: Arc<WriteBatch>) {
    let (entry, filtered) = entry_for(batch, &shared.filter);
    Shared::add(&shared.counters.filtered_points, filtered);
    if entry.points == 0 {
        return;
    }
    let dropped = shared.queue().push(entry, shared.config.queue_points);
    if dropped > 0 {
        Shared::add(&shared.counters.dropped_queue_full, dropped);
        tracing::debug!(destination = %shared.name, dropped, "forward queue full: dropped the oldest points");
    }
    shared.wake.notify_one();
}

/// Sends the queue, write by write, until the tap is drained and the queue empty after the stop signal, or the
/// shutdown deadline passes.
async fn send(shared: &Shared, client: &influxdb2::Client, mut stop: watch::Receiver<bool>) {
    let config = &shared.config;
    loop {
        if shared.time_left() == Some(Duration::ZERO) {
            return;
        }
        let (slices, taken) = {
            let mut queue = shared.queue();
            let taken = queue.take(config.batch_points);
            // In flight from here, so that `queued_points` never misses them.
            Shared::add(&shared.counters.in_flight_points, taken.1);
            taken
        };
        if taken == 0 {
            if shared.drained.load(Ordering::Acquire) && shared.queue().points == 0 {
                return;
            }
            shared.wake.notified().await;
            continue;
        }
        let (body, counts) = encode(&slices);
        drop(slices);
        Shared::add(&shared.counters.dropped_unencodable, counts.unencodable);
        Shared::add(&shared.counters.skipped_values, counts.skipped_values);
        if counts.points > 0 {
            deliver(
                shared,
                client,
                bytes::Bytes::from(body),
                counts.points,
                &mut stop,
            )
            .await;
        }
        shared
            .counters
            .in_flight_points
            .fetch_sub(taken as u64, Ordering::Relaxed);
    }
}

/// Writes one body, retrying until the destination takes or refuses it, or the shutdown deadline passes.
async fn deliver(
    shared: &Shared,
    client: &influxdb2::Client,
    body: bytes::Bytes,
    points: usize,
    stop: &mut watch::Receiver<bool>,
) {
    let config = &shared.config;
    let initial = Duration::from_millis(config.retry_initial_ms);
    let max_delay = Duration::from_secs(config.retry_max_secs);
    let mut attempt: u64 = 0;
    loop {
        let left = shared.time_left();
        if left == Some(Duration::ZERO) {
            Shared::add(&shared.counters.dropped_shutdown, points);
            break;
        }
        let timeout = left.map_or(config.timeout(), |l| l.min(config.timeout()));
        let write = client.write_line_protocol_with_precision(
            &config.org,
            &config.bucket,
            body.clone(),
            influxdb2::api::write::TimestampPrecision::Nanoseconds,
        );
        let outcome = match tokio::time::timeout(timeout, write).await {
            Ok(result) => classify(result),
            Err(_) => Outcome::Retry(format!("no answer within {} ms", timeout.as_millis())),
        };
        match outcome {
            Outcome::Accepted => {
                Shared::add(&shared.counters.forwarded_points, points);
                Shared::add(&shared.counters.writes, 1);
                let failures = shared
                    .counters
                    .consecutive_failures
                    .swap(0, Ordering::Relaxed);
                shared.health().last_success_unix_ms = Some(unix_ms_now());
                if failures > 0 {
                    tracing::info!(destination = %shared.name, failures, "forwarding works again");
                }
                break;
            }
            Outcome::Rejected(message) => {
                Shared::add(&shared.counters.dropped_rejected, points);
                Shared::add(&shared.counters.rejected_writes, 1);
                // The destination answered: nothing is pending a retry.
                shared
                    .counters
                    .consecutive_failures
                    .store(0, Ordering::Relaxed);
                tracing::warn!(destination = %shared.name, points, "the destination refused a write; its points are dropped: {message}");
                record_error(shared, message);
                break;
            }
            Outcome::Retry(message) => {
                attempt += 1;
                Shared::add(&shared.counters.failed_attempts, 1);
                let failures = shared
                    .counters
                    .consecutive_failures
                    .fetch_add(1, Ordering::Relaxed);
                let delay = backoff(attempt, initial, max_delay);
                if failures == 0 {
                    tracing::warn!(destination = %shared.name, "forwarding failed, retrying with backoff: {message}");
                } else {
                    tracing::debug!(destination = %shared.name, attempt, ?delay, "forwarding failed again: {message}");
                }
                record_error(shared, message);
                let delay = shared.time_left().map_or(delay, |l| l.min(delay));
                if *stop.borrow() {
                    tokio::time::sleep(delay).await;
                } else {
                    // At the stop signal, try again at once: the grace period is short.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
            }
        }
    }
}

fn record_error(shared: &Shared, message: String) {
    let mut health = shared.health();
    health.last_error = Some(message);
    health.last_error_unix_ms = Some(unix_ms_now());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use damselfly_proto::v1::{Series, Tag};

    fn tag(k: &str, v: &str) -> Tag {
        Tag {
            key: k.into(),
            value: v.into(),
        }
    }

    fn column(key: &str) -> FieldColumn {
        FieldColumn {
            key: key.into(),
            ..Default::default()
        }
    }

    fn chunk(measurement: &str, rows: usize) -> TableChunk {
        TableChunk {
            measurement: measurement.into(),
            time_unix_nano: (0..rows as i64).map(|i| 1_000 + i).collect(),
            fields: vec![FieldColumn {
                f64: (0..rows).map(|i| i as f64).collect(),
                ..column("v")
            }],
            ..Default::default()
        }
    }

    fn batch(chunks: Vec<TableChunk>) -> Arc<WriteBatch> {
        Arc::new(WriteBatch {
            chunks,
            ..Default::default()
        })
    }

    fn lines(b: &WriteBatch) -> (String, Encoded) {
        let mut out = Vec::new();
        let mut counts = Encoded::default();
        for c in &b.chunks {
            encode_rows(b, c, 0..chunk_rows(c), &mut out, &mut counts);
        }
        (String::from_utf8(out).unwrap(), counts)
    }

    fn config(url: &str) -> ForwardConfig {
        ForwardConfig {
            url: url.into(),
            org: "o".into(),
            bucket: "b".into(),
            ..ForwardConfig::default()
        }
    }

    #[test]
    fn forward_config_defaults_and_validation_messages() {
        let parsed: ForwardConfig =
            toml::from_str("url = \"http://127.0.0.1:8086\"\norg = \"o\"\nbucket = \"b\"").unwrap();
        assert_eq!(parsed, config("http://127.0.0.1:8086"));
        assert_eq!(parsed.validate(), Ok(()));
        assert!(toml::from_str::<ForwardConfig>("urll = \"x\"").is_err());

        let check = |f: &dyn Fn(&mut ForwardConfig), want: &str| {
            let mut c = config("http://127.0.0.1:8086");
            f(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        };
        check(&|c| c.url.clear(), "url is required");
        check(
            &|c| c.url = "ftp://h".into(),
            "scheme must be http or https",
        );
        check(
            &|c| c.url = "localhost:8086".into(),
            "scheme must be http or https",
        );
        check(&|c| c.url = "not a url".into(), "url \"not a url\"");
        check(
            &|c| c.url = "http://h:8086/influx".into(),
            "a path (\"/influx\") is not supported",
        );
        check(&|c| c.url = "http://h/?org=x".into(), "no query");
        check(&|c| c.url = "http://u:p@h/".into(), "no user or password");
        check(&|c| c.org.clear(), "org is required");
        check(&|c| c.bucket = " ".into(), "bucket is required");
        check(
            &|c| {
                c.token = "t".into();
                c.token_env = Some("PATH".into());
            },
            "both set",
        );
        check(
            &|c| c.token_env = Some("DAMSELFLY_TEST_SURELY_UNSET_VARIABLE".into()),
            "\"DAMSELFLY_TEST_SURELY_UNSET_VARIABLE\" is not set",
        );
        check(
            &|c| c.measurements = vec!["".into()],
            "measurements[0] is empty",
        );
        check(
            &|c| {
                c.measurements = vec!["cpu".into()];
                c.exclude_measurements = vec!["cpu".into()];
            },
            "\"cpu\" is in both",
        );
        check(&|c| c.batch_points = 0, "batch_points (0)");
        check(
            &|c| c.queue_points = 10,
            "queue_points (10) must be at least batch_points (5000)",
        );
        check(&|c| c.timeout_secs = 0, "timeout_secs (0)");
        check(&|c| c.retry_initial_ms = 0, "retry_initial_ms (0)");
        check(&|c| c.retry_max_secs = 0, "retry_max_secs (0)");
        check(&|c| c.shutdown_grace_secs = 61, "shutdown_grace_secs (61)");
        let mut c = config("https://h");
        c.token = "secret".into();
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn forward_encoding_escapes_types_tags_and_absent_values() {
        let b = WriteBatch {
            common_tags: vec![
                tag("vm_id", "vm 1"),
                tag("cpu", "overridden"),
                tag("empty", ""),
            ],
            chunks: vec![TableChunk {
                measurement: "cpu".into(),
                tag_keys: vec!["cpu".into(), "path".into()],
                series: vec![
                    Series {
                        tag_values: vec!["cpu0".into(), "C:\\x\\".into()],
                    },
                    Series {
                        tag_values: vec!["a,b=c d".into(), "".into()],
                    },
                ],
                series_index: vec![0, 1, 0],
                time_unix_nano: vec![10, 20, 30],
                fields: vec![
                    FieldColumn {
                        f64: vec![0.1, -2.5e300],
                        present: vec![0b101],
                        ..column("f")
                    },
                    FieldColumn {
                        i64: vec![-3, 4, i64::MIN],
                        ..column("i k")
                    },
                    FieldColumn {
                        u64: vec![u64::MAX],
                        present: vec![0b010],
                        ..column("u")
                    },
                    FieldColumn {
                        bool: vec![true, false, true],
                        ..column("b")
                    },
                    FieldColumn {
                        str: vec!["say \"hi\" \\".into(), "x".into(), "".into()],
                        ..column("s")
                    },
                ],
            }],
            ..Default::default()
        };
        let (text, counts) = lines(&b);
        assert_eq!(
            text,
            "cpu,cpu=cpu0,path=C:\\\\x\\\\,vm_id=vm\\ 1 f=0.1,i\\ k=-3i,b=true,s=\"say \\\"hi\\\" \\\\\" 10\n\
             cpu,cpu=a\\,b\\=c\\ d,vm_id=vm\\ 1 i\\ k=4i,u=18446744073709551615u,b=false,s=\"x\" 20\n\
             cpu,cpu=cpu0,path=C:\\\\x\\\\,vm_id=vm\\ 1 f=-2.5e300,i\\ k=-9223372036854775808i,b=true,s=\"\" 30\n"
        );
        assert_eq!(
            counts,
            Encoded {
                points: 3,
                unencodable: 0,
                skipped_values: 0
            }
        );
        // A slice starting mid-chunk finds each column's values by its presence bitmap.
        let mut out = Vec::new();
        let mut counts = Encoded::default();
        encode_rows(&b, &b.chunks[0], 1..3, &mut out, &mut counts);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with(&text[text.find("cpu,cpu=a").unwrap()..])
        );

        // Where the influxdb2 crate's DataPoint is right (no backslash, no unsigned), it writes the same line.
        use influxdb2::models::{DataPoint, WriteDataPoint};
        let simple = WriteBatch {
            chunks: vec![TableChunk {
                measurement: "mem".into(),
                tag_keys: vec!["host".into(), "a".into()],
                series: vec![Series {
                    tag_values: vec!["h 1".into(), "x,y".into()],
                }],
                time_unix_nano: vec![1_700_000_000_000_000_000],
                fields: vec![
                    FieldColumn {
                        f64: vec![12.25],
                        ..column("used")
                    },
                    FieldColumn {
                        i64: vec![7],
                        ..column("n")
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut reference = Vec::new();
        DataPoint::builder("mem")
            .tag("host", "h 1")
            .tag("a", "x,y")
            .field("used", 12.25)
            .field("n", 7_i64)
            .timestamp(1_700_000_000_000_000_000)
            .build()
            .unwrap()
            .write_data_point_to(&mut reference)
            .unwrap();
        // DataPoint sorts fields by name; ours keep the column order. Compare as sets of fields.
        let ours = lines(&simple).0;
        let sorted = |line: &str| {
            let parts: Vec<&str> = line.trim_end().split(' ').collect();
            let mut fields: Vec<&str> = parts[parts.len() - 2].split(',').collect();
            fields.sort_unstable();
            (
                parts[..parts.len() - 2].join(" "),
                fields.join(","),
                parts[parts.len() - 1].to_owned(),
            )
        };
        assert_eq!(
            sorted(&ours),
            sorted(&String::from_utf8(reference).unwrap())
        );
    }

    #[test]
    fn forward_encoding_leaves_out_what_line_protocol_cannot_carry() {
        let b = WriteBatch {
            chunks: vec![TableChunk {
                measurement: "m".into(),
                tag_keys: vec!["t".into()],
                series: vec![
                    Series {
                        tag_values: vec!["ok".into()],
                    },
                    Series {
                        tag_values: vec!["two\nlines".into()],
                    },
                ],
                series_index: vec![0, 0, 1, 0],
                time_unix_nano: vec![1, 2, 3, 4],
                fields: vec![
                    FieldColumn {
                        f64: vec![f64::NAN, 1.5, 2.5, f64::INFINITY],
                        ..column("f")
                    },
                    FieldColumn {
                        str: vec!["a\nb".into(), "fine".into()],
                        present: vec![0b0101],
                        ..column("s")
                    },
                ],
            }],
            ..Default::default()
        };
        let (text, counts) = lines(&b);
        // Row 1: NaN and a string with a newline: no field left. Row 3: a tag with a newline. Row 4: infinity.
        assert_eq!(text, "m,t=ok f=1.5 2\n");
        assert_eq!(
            counts,
            Encoded {
                points: 1,
                unencodable: 3,
                skipped_values: 3
            }
        );
    }

    #[test]
    fn forward_floats_read_back_exactly() {
        for v in [
            0.0,
            -0.0,
            0.1,
            1.0 / 3.0,
            1e-300,
            5e-324,
            f64::MAX,
            -1e16,
            123456.789,
            1e15,
        ] {
            let mut out = Vec::new();
            write_f64(&mut out, v);
            let text = String::from_utf8(out).unwrap();
            assert!(!text.ends_with('i') && !text.ends_with('u'));
            assert_eq!(
                text.parse::<f64>().unwrap().to_bits(),
                v.to_bits(),
                "{text}"
            );
        }
    }

    #[test]
    fn forward_queue_drops_the_oldest_points_and_keeps_order() {
        let filter = Filter::default();
        let mut queue = Queue::default();
        let push = |q: &mut Queue, b: Arc<WriteBatch>| q.push(entry_for(b, &filter).0, 10);
        assert_eq!(
            push(&mut queue, batch(vec![chunk("a", 4), chunk("b", 3)])),
            0
        );
        assert_eq!(push(&mut queue, batch(vec![chunk("c", 2)])), 0);
        assert_eq!(queue.points, 9);
        // 4 more: the 3 oldest go (from a).
        assert_eq!(push(&mut queue, batch(vec![chunk("d", 4)])), 3);
        assert_eq!(queue.points, 10);
        let (slices, n) = queue.take(3);
        assert_eq!(n, 3);
        let got: Vec<(String, Range<usize>)> = slices
            .iter()
            .map(|s| (s.batch.chunks[s.chunk].measurement.clone(), s.rows.clone()))
            .collect();
        assert_eq!(got, vec![("a".into(), 3..4), ("b".into(), 0..2)]);
        // A batch bigger than the queue keeps its newest rows only.
        assert_eq!(push(&mut queue, batch(vec![chunk("e", 12)])), 7 + 2);
        let (slices, n) = queue.take(100);
        assert_eq!(n, 10);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].rows, 2..12);
        assert_eq!(queue.points, 0);
        assert!(queue.entries.is_empty());
    }

    #[test]
    fn forward_filters_measurements() {
        let mut c = config("http://h");
        c.measurements = vec!["cpu".into(), "mem".into()];
        c.exclude_measurements = vec!["disk".into()];
        let f = Filter::new(&c);
        assert!(f.allows("cpu") && f.allows("mem") && !f.allows("net") && !f.allows("disk"));
        c.measurements.clear();
        let f = Filter::new(&c);
        assert!(f.allows("net") && !f.allows("disk"));
        let (entry, filtered) = entry_for(batch(vec![chunk("disk", 5), chunk("cpu", 2)]), &f);
        assert_eq!(
            (entry.points, filtered, entry.chunks.clone()),
            (2, 5, vec![1])
        );
    }

    #[test]
    fn forward_backoff_doubles_with_jitter_and_caps() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (60, 1000),
        ] {
            let d = backoff(attempt, initial, max);
            let full = Duration::from_millis(full);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn forward_values_before_counts_presence_bits() {
        assert_eq!(values_before(&[], 5), 5);
        assert_eq!(values_before(&[0b1011_0101, 0b1], 0), 0);
        assert_eq!(values_before(&[0b1011_0101, 0b1], 3), 2);
        assert_eq!(values_before(&[0b1011_0101, 0b1], 8), 5);
        assert_eq!(values_before(&[0b1011_0101, 0b1], 9), 6);
    }

    /// A fake InfluxDB: answers the statuses of `script` in turn (then 204), keeping the bodies of accepted writes.
    struct FakeInflux {
        url: String,
        accepted: Arc<Mutex<Vec<String>>>,
        requests: Arc<AtomicU64>,
    }

    async fn fake_influx(script: Vec<u16>) -> FakeInflux {
        use axum::http::StatusCode;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let app = Router::new().route(
            "/api/v2/write",
            axum::routing::post({
                let accepted = accepted.clone();
                let requests = requests.clone();
                move |query: axum::extract::RawQuery, body: String| {
                    let accepted = accepted.clone();
                    let script = script.clone();
                    requests.fetch_add(1, Ordering::SeqCst);
                    async move {
                        assert_eq!(query.0.as_deref(), Some("bucket=b&org=o&precision=ns"));
                        let status = script.lock().unwrap().pop_front().unwrap_or(204);
                        if status == 204 {
                            accepted.lock().unwrap().push(body);
                        }
                        (StatusCode::from_u16(status).unwrap(), "scripted answer")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeInflux {
            url,
            accepted,
            requests,
        }
    }

    struct Running {
        tx: tokio::sync::mpsc::Sender<Arc<WriteBatch>>,
        handle: ForwardHandle,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(config: ForwardConfig) -> Running {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let tap = StoredTap {
            batches: rx,
            dropped_points: Arc::new(AtomicU64::new(0)),
        };
        let forwarders = Forwarders::with_taps(vec![(config, tap)]);
        let handle = forwarders.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(forwarders.run(async move {
            let _ = stopped.await;
        }));
        Running {
            tx,
            handle,
            stop,
            task,
        }
    }

    async fn wait_for(
        handle: &ForwardHandle,
        what: &str,
        done: impl Fn(&DestinationStatus) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = handle.destinations().remove(0);
            if done(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fast(url: &str) -> ForwardConfig {
        ForwardConfig {
            retry_initial_ms: 20,
            retry_max_secs: 1,
            timeout_secs: 2,
            shutdown_grace_secs: 1,
            ..config(url)
        }
    }

    #[tokio::test]
    async fn forward_retries_server_errors_and_drops_rejected_writes() {
        let influx = fake_influx(vec![503, 500, 429, 400]).await;
        let running = start(fast(&influx.url));
        running.tx.send(batch(vec![chunk("cpu", 3)])).await.unwrap();
        wait_for(&running.handle, "a rejected write", |s| {
            s.rejected_writes == 1
        })
        .await;
        let status = running.handle.destinations().remove(0);
        assert_eq!(status.failed_attempts, 3);
        assert_eq!(
            (status.status, status.consecutive_failures),
            ("rejected", 0)
        );
        assert_eq!(status.dropped.rejected, 3);
        assert_eq!(status.forwarded_points, 0);
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap()
                .starts_with("HTTP 400: scripted answer"),
            "{status:?}"
        );
        assert_eq!(influx.requests.load(Ordering::SeqCst), 4);

        running.tx.send(batch(vec![chunk("cpu", 2)])).await.unwrap();
        wait_for(&running.handle, "a forwarded write", |s| {
            s.forwarded_points == 2
        })
        .await;
        let status = running.handle.destinations().remove(0);
        assert_eq!(
            (
                status.status,
                status.consecutive_failures,
                status.queued_points
            ),
            ("ok", 0, 0)
        );
        assert_eq!(
            *influx.accepted.lock().unwrap(),
            vec!["cpu v=0 1000\ncpu v=1 1001\n".to_owned()]
        );
        running.stop.send(()).unwrap();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn forward_batches_by_batch_points_and_filters() {
        let influx = fake_influx(vec![]).await;
        let mut c = fast(&influx.url);
        c.batch_points = 4;
        c.queue_points = 100;
        c.exclude_measurements = vec!["secret".into()];
        let running = start(c);
        running
            .tx
            .send(batch(vec![
                chunk("cpu", 6),
                chunk("secret", 5),
                chunk("mem", 3),
            ]))
            .await
            .unwrap();
        wait_for(&running.handle, "9 points", |s| s.forwarded_points == 9).await;
        let status = running.handle.destinations().remove(0);
        assert_eq!(
            (status.filtered_points, status.writes, status.dropped_points),
            (5, 3, 0)
        );
        let bodies = influx.accepted.lock().unwrap().clone();
        assert_eq!(
            bodies.iter().map(|b| b.lines().count()).collect::<Vec<_>>(),
            vec![4, 4, 1]
        );
        assert!(bodies.iter().all(|b| !b.contains("secret")));
        running.stop.send(()).unwrap();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn forward_sends_the_queue_at_shutdown_or_counts_it_dropped() {
        // Destination down: a queue of 5 keeps the newest 5 of 7 points; the grace period runs out and what is
        // queued is counted as dropped at shutdown.
        let unused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}", unused.local_addr().unwrap());
        drop(unused);
        let mut c = fast(&dead);
        c.queue_points = 5;
        c.batch_points = 5;
        let running = start(c);
        running.tx.send(batch(vec![chunk("cpu", 7)])).await.unwrap();
        wait_for(&running.handle, "failed attempts", |s| {
            s.failed_attempts >= 2
        })
        .await;
        let status = running.handle.destinations().remove(0);
        assert_eq!(
            (
                status.status,
                status.queued_points,
                status.dropped.queue_full
            ),
            ("retrying", 5, 2)
        );
        assert!(
            status.last_error.as_deref().unwrap().contains("onnect"),
            "{status:?}"
        );
        let started = Instant::now();
        running.stop.send(()).unwrap();
        // Sent after the stop signal but before the tap went quiet: counted too.
        running.tx.send(batch(vec![chunk("cpu", 2)])).await.unwrap();
        running.task.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let status = running.handle.destinations().remove(0);
        assert_eq!(
            (
                status.dropped.shutdown,
                status.dropped_points,
                status.queued_points,
                status.forwarded_points
            ),
            (7, 9, 0, 0)
        );

        // Destination up: what is queued at the stop signal is sent.
        let influx = fake_influx(vec![503]).await;
        let running = start(fast(&influx.url));
        running.tx.send(batch(vec![chunk("cpu", 3)])).await.unwrap();
        running.stop.send(()).unwrap();
        running.task.await.unwrap();
        let status = running.handle.destinations().remove(0);
        assert_eq!((status.forwarded_points, status.dropped_points), (3, 0));
    }
}
