//! Self-monitoring: the collector's own counters, gauges and latency histograms, on `GET /metrics` in the
//! Prometheus text format (version 0.0.4) and as the SQL table `damselfly.metrics`.
//!
//! One [`SelfMetrics`] per store (so each shard of a multi-shard process counts its own work). The hooks in the
//! data path are one call each and cost a few relaxed atomic operations: no lock, no allocation, no metrics crate.
//! Gauges (buffer bytes, files, agents) are read from the store when the page or the table is asked for, so nothing
//! has to keep them up to date. Both outputs come from one list of samples ([`SelfMetrics::families`]), so the page
//! and the table always agree.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DfResult;

use crate::http::ApiState;
use crate::store::{Store, StoreStats, WriteOutcome};

/// Where a batch came in. Each has its own ingest counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Agents pushing over gRPC (`Ingest.Push`, `Ingest.Write`).
    Grpc,
    /// Batches the collector pulled from agents (`MetricsSource.Pull`).
    Pull,
    /// InfluxDB line protocol over HTTP.
    Influx,
    /// Prometheus remote write and scraped exporters.
    Prometheus,
}

impl Protocol {
    const ALL: [Protocol; 4] = [
        Protocol::Grpc,
        Protocol::Pull,
        Protocol::Influx,
        Protocol::Prometheus,
    ];

    fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Pull => "pull",
            Protocol::Influx => "influx",
            Protocol::Prometheus => "prometheus",
        }
    }
}

/// Kinds of error counted in `damselfly_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A batch refused as invalid (bad names, sizes, type conflicts).
    IngestRejected,
    /// A batch answered "retry later" (buffer full, too many writes in progress, WAL failure).
    IngestRetry,
    /// A WAL append or fsync failed.
    Wal,
    /// A flush to Parquet failed.
    Flush,
    /// A maintenance step (compaction, rollup, retention) failed.
    Maintenance,
    /// A query refused as invalid (SQL error, unknown table).
    QueryInvalid,
    /// A query over `query_timeout_secs`.
    QueryTimeout,
    /// A query over `query_memory_bytes`.
    QueryMemory,
    /// A result over `max_result_rows`.
    QueryTooLarge,
    /// A query failed for the collector's own reasons.
    QueryInternal,
    /// A request refused for its token (missing, unknown, revoked, or without the right).
    Auth,
}

impl ErrorKind {
    const ALL: [ErrorKind; 11] = [
        ErrorKind::IngestRejected,
        ErrorKind::IngestRetry,
        ErrorKind::Wal,
        ErrorKind::Flush,
        ErrorKind::Maintenance,
        ErrorKind::QueryInvalid,
        ErrorKind::QueryTimeout,
        ErrorKind::QueryMemory,
        ErrorKind::QueryTooLarge,
        ErrorKind::QueryInternal,
        ErrorKind::Auth,
    ];

    fn name(self) -> &'static str {
        match self {
            ErrorKind::IngestRejected => "ingest_rejected",
            ErrorKind::IngestRetry => "ingest_retry",
            ErrorKind::Wal => "wal",
            ErrorKind::Flush => "flush",
            ErrorKind::Maintenance => "maintenance",
            ErrorKind::QueryInvalid => "query_invalid",
            ErrorKind::QueryTimeout => "query_timeout",
            ErrorKind::QueryMemory => "query_memory",
            ErrorKind::QueryTooLarge => "query_too_large",
            ErrorKind::QueryInternal => "query_internal",
            ErrorKind::Auth => "auth",
        }
    }

    /// The kind of a failed query.
    pub fn of_query(e: &crate::query::QueryError) -> ErrorKind {
        use crate::query::QueryError;
        match e {
            QueryError::Invalid(_) => ErrorKind::QueryInvalid,
            QueryError::TooManyRows(_) => ErrorKind::QueryTooLarge,
            QueryError::ResourcesExhausted(_) => ErrorKind::QueryMemory,
            QueryError::Timeout(_) => ErrorKind::QueryTimeout,
            QueryError::Internal(_) => ErrorKind::QueryInternal,
        }
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets: from half a millisecond (an fsync on fast storage)
/// to a minute (a large compaction).
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A latency histogram with fixed buckets, cumulative like Prometheus's.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or under each bound (not yet cumulative: summed when read).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn samples(&self, name: &str, labels: &[(&'static str, String)], out: &mut Vec<Sample>) {
        let mut cumulative = 0u64;
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let mut l = labels.to_vec();
            l.push(("le", format_float(*bound)));
            out.push(Sample::new(format!("{name}_bucket"), l, cumulative as f64));
        }
        let count = self.count.load(Ordering::Relaxed);
        let mut l = labels.to_vec();
        l.push(("le", "+Inf".into()));
        out.push(Sample::new(format!("{name}_bucket"), l, count as f64));
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        out.push(Sample::new(format!("{name}_sum"), labels.to_vec(), sum));
        out.push(Sample::new(
            format!("{name}_count"),
            labels.to_vec(),
            count as f64,
        ));
    }
}

#[derive(Debug, Default)]
struct IngestCounters {
    batches: AtomicU64,
    points: AtomicU64,
    duplicates: AtomicU64,
}

/// Maintenance phases timed separately.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Compaction,
    Rollup,
    Retention,
}

/// The collector's own metrics. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct SelfMetrics {
    started: Instant,
    ingest: [IngestCounters; Protocol::ALL.len()],
    errors: [AtomicU64; ErrorKind::ALL.len()],
    wal_sync: Histogram,
    flush: Histogram,
    maintenance: [Histogram; 3],
    queries: Histogram,
}

impl Default for SelfMetrics {
    fn default() -> Self {
        SelfMetrics {
            started: Instant::now(),
            ingest: Default::default(),
            errors: Default::default(),
            wal_sync: Histogram::default(),
            flush: Histogram::default(),
            maintenance: Default::default(),
            queries: Histogram::default(),
        }
    }
}

/// One sample: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Sample {
    fn new(name: String, labels: Vec<(&'static str, String)>, value: f64) -> Sample {
        Sample {
            name,
            labels,
            value,
        }
    }

    /// The labels as Prometheus writes them, without braces: `protocol="grpc",le="0.5"`.
    fn label_text(&self) -> String {
        let mut s = String::new();
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let escaped = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(s, "{k}=\"{escaped}\"");
        }
        s
    }
}

/// A metric family: its name, help text, type and samples.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: &'static str,
    pub samples: Vec<Sample>,
}

/// Prometheus prints floats plainly; integers without a fraction.
fn format_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl SelfMetrics {
    /// Counts one write's outcome for `protocol`.
    pub fn record_write(&self, protocol: Protocol, outcome: &WriteOutcome) {
        let c = &self.ingest[protocol as usize];
        match outcome {
            WriteOutcome::Stored { points } => {
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.points.fetch_add(*points as u64, Ordering::Relaxed);
            }
            WriteOutcome::Duplicate => {
                c.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            WriteOutcome::Rejected(_) => self.error(ErrorKind::IngestRejected),
            WriteOutcome::Retry { .. } => self.error(ErrorKind::IngestRetry),
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One WAL group commit (append and, with `wal_sync = "fsync"`, `fdatasync`) took `d`.
    pub fn wal_sync(&self, d: Duration) {
        self.wal_sync.observe(d);
    }

    /// A flush to Parquet took `d` (`ok`: it succeeded).
    pub fn flush(&self, d: Duration, ok: bool) {
        self.flush.observe(d);
        if !ok {
            self.error(ErrorKind::Flush);
        }
    }

    /// A maintenance phase took `d`.
    pub fn maintenance(&self, phase: Phase, d: Duration) {
        self.maintenance[phase as usize].observe(d);
    }

    /// Times a query from now until the guard is dropped (a one-line hook that also covers early returns).
    pub fn query_timer(self: &Arc<Self>) -> QueryTimer {
        QueryTimer {
            metrics: self.clone(),
            started: Instant::now(),
        }
    }

    /// Every family, with the store's gauges read now.
    pub fn families(&self, stats: &StoreStats, agents: &[(&'static str, usize)]) -> Vec<Family> {
        let mut out = Vec::new();
        let counter = |name, help, samples| Family {
            name,
            help,
            kind: "counter",
            samples,
        };
        let gauge = |name, help, samples| Family {
            name,
            help,
            kind: "gauge",
            samples,
        };
        let per_protocol = |name: &str, pick: fn(&IngestCounters) -> &AtomicU64| {
            Protocol::ALL
                .iter()
                .map(|p| {
                    Sample::new(
                        name.to_string(),
                        vec![("protocol", p.name().to_string())],
                        pick(&self.ingest[*p as usize]).load(Ordering::Relaxed) as f64,
                    )
                })
                .collect::<Vec<_>>()
        };
        out.push(counter(
            "damselfly_ingest_batches_total",
            "Batches stored (durable in the WAL), by protocol.",
            per_protocol("damselfly_ingest_batches_total", |c| &c.batches),
        ));
        out.push(counter(
            "damselfly_ingest_points_total",
            "Points (rows) stored, by protocol.",
            per_protocol("damselfly_ingest_points_total", |c| &c.points),
        ));
        out.push(counter(
            "damselfly_ingest_duplicate_batches_total",
            "Batches answered DUPLICATE (stored before), by protocol.",
            per_protocol("damselfly_ingest_duplicate_batches_total", |c| {
                &c.duplicates
            }),
        ));
        out.push(counter(
            "damselfly_errors_total",
            "Errors, by kind.",
            ErrorKind::ALL
                .iter()
                .map(|k| {
                    Sample::new(
                        "damselfly_errors_total".into(),
                        vec![("kind", k.name().to_string())],
                        self.errors[*k as usize].load(Ordering::Relaxed) as f64,
                    )
                })
                .collect(),
        ));
        let histogram = |name: &'static str, help, h: &Histogram, labels: &[_]| {
            let mut samples = Vec::new();
            h.samples(name, labels, &mut samples);
            Family {
                name,
                help,
                kind: "histogram",
                samples,
            }
        };
        out.push(histogram(
            "damselfly_wal_sync_seconds",
            "Duration of one WAL group commit: append, then fdatasync when wal_sync = \"fsync\".",
            &self.wal_sync,
            &[],
        ));
        out.push(histogram(
            "damselfly_flush_seconds",
            "Duration of one flush of the buffer to Parquet.",
            &self.flush,
            &[],
        ));
        let mut phases = Vec::new();
        for (phase, name) in [
            (Phase::Compaction, "compaction"),
            (Phase::Rollup, "rollup"),
            (Phase::Retention, "retention"),
        ] {
            self.maintenance[phase as usize].samples(
                "damselfly_maintenance_seconds",
                &[("phase", name.to_string())],
                &mut phases,
            );
        }
        out.push(Family {
            name: "damselfly_maintenance_seconds",
            help: "Duration of each maintenance phase of a pass (compaction, rollup, retention).",
            kind: "histogram",
            samples: phases,
        });
        out.push(histogram(
            "damselfly_query_seconds",
            "Duration of SQL queries, failed ones included: HTTP, PostgreSQL protocol and the collector's own \
             (alert rules, scores, the Dragonfly API).",
            &self.queries,
            &[],
        ));
        for (name, help, value) in [
            (
                "damselfly_buffer_bytes",
                "Bytes of rows in memory not yet in Parquet (active and frozen).",
                stats.buffered_bytes as f64,
            ),
            (
                "damselfly_buffer_rows",
                "Rows in memory not yet in Parquet.",
                stats.buffered_rows as f64,
            ),
            (
                "damselfly_parquet_files",
                "Parquet files of the measurement tables.",
                stats.parquet_files as f64,
            ),
            (
                "damselfly_tables",
                "Measurement tables.",
                stats.tables as f64,
            ),
            (
                "damselfly_uptime_seconds",
                "Seconds since the store was opened.",
                self.started.elapsed().as_secs_f64(),
            ),
        ] {
            let samples = vec![Sample::new(name.to_string(), vec![], value)];
            out.push(gauge(name, help, samples));
        }
        out.push(gauge(
            "damselfly_agents",
            "Agents in the registry, by status.",
            agents
                .iter()
                .map(|(status, n)| {
                    Sample::new(
                        "damselfly_agents".into(),
                        vec![("status", (*status).to_string())],
                        *n as f64,
                    )
                })
                .collect(),
        ));
        out
    }
}

/// Records a query's duration when dropped ([`SelfMetrics::query_timer`]).
#[derive(Debug)]
pub struct QueryTimer {
    metrics: Arc<SelfMetrics>,
    started: Instant,
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        self.metrics.queries.observe(self.started.elapsed());
    }
}

/// The Prometheus text format (0.0.4) of `families`.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for s in &f.samples {
            let labels = s.label_text();
            let value = format_float(s.value);
            if labels.is_empty() {
                let _ = writeln!(out, "{} {value}", s.name);
            } else {
                let _ = writeln!(out, "{}{{{labels}}} {value}", s.name);
            }
        }
    }
    out
}

/// Agents by status, for the `damselfly_agents` gauge.
fn agent_counts(api: &ApiState) -> Vec<(&'static str, usize)> {
    let mut counts = [
        ("healthy", 0),
        ("stale", 0),
        ("down", 0),
        ("unregistered", 0),
    ];
    for agent in api.registry.list(None) {
        let status = serde_json::to_value(agent.status).unwrap_or_default();
        if let Some(slot) = counts.iter_mut().find(|(name, _)| status == *name) {
            slot.1 += 1;
        }
    }
    counts.to_vec()
}

/// `GET /metrics`.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new().route("/metrics", get(metrics_page))
}

async fn metrics_page(State(api): State<Arc<ApiState>>) -> Response {
    let families = api
        .store
        .self_metrics()
        .families(&api.store.stats(), &agent_counts(&api));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&families),
    )
        .into_response()
}

/// The schema of `damselfly.metrics`: one row per sample of `/metrics`.
fn table_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
        Field::new("shard", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]))
}

/// The `damselfly` SQL schema: `damselfly.metrics`, the samples of `/metrics` as of the query's planning (gauges
/// and cumulative counters; the agent gauge is left out, the registry being the HTTP layer's).
#[derive(Debug)]
pub struct MetricsSchema {
    store: Store,
}

impl MetricsSchema {
    /// Registers the schema in `ctx`'s default catalog (a no-op if the catalog is missing).
    pub fn register(ctx: &datafusion::prelude::SessionContext, store: &Store) {
        if let Some(catalog) = ctx.catalog("datafusion") {
            let _ = catalog.register_schema(
                "damselfly",
                Arc::new(MetricsSchema {
                    store: store.clone(),
                }),
            );
        }
    }

    fn batch(&self) -> DfResult<RecordBatch> {
        let families = self.store.self_metrics().families(&self.store.stats(), &[]);
        let samples: Vec<&Sample> = families.iter().flat_map(|f| &f.samples).collect();
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let shard = &self.store.config().shard_id;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampNanosecondArray::from(vec![now; samples.len()]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec![shard.as_str(); samples.len()])),
            Arc::new(StringArray::from_iter_values(
                samples.iter().map(|s| s.name.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                samples.iter().map(|s| s.label_text()),
            )),
            Arc::new(Float64Array::from_iter_values(
                samples.iter().map(|s| s.value),
            )),
        ];
        Ok(RecordBatch::try_new(table_schema(), columns)?)
    }
}

#[async_trait]
impl SchemaProvider for MetricsSchema {
    fn table_names(&self) -> Vec<String> {
        vec!["metrics".into()]
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if name != "metrics" {
            return Ok(None);
        }
        let table = MemTable::try_new(table_schema(), vec![vec![self.batch()?]])?;
        Ok(Some(Arc::new(table)))
    }

    fn table_exist(&self, name: &str) -> bool {
        name == "metrics"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_in_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(120));
        let mut out = Vec::new();
        h.samples("x", &[], &mut out);
        let value = |le: &str| {
            out.iter()
                .find(|s| s.labels.iter().any(|(k, v)| *k == "le" && v == le))
                .map(|s| s.value)
        };
        assert_eq!(value("0.0005"), Some(1.0));
        assert_eq!(value("0.01"), Some(1.0));
        assert_eq!(value("0.025"), Some(2.0));
        assert_eq!(value("60"), Some(2.0));
        assert_eq!(value("+Inf"), Some(3.0));
        let sum = out.iter().find(|s| s.name == "x_sum").map(|s| s.value);
        assert!((sum.unwrap_or(0.0) - 120.0203).abs() < 1e-9, "{sum:?}");
    }

    #[test]
    fn writes_count_by_protocol_and_errors_by_kind() {
        let m = SelfMetrics::default();
        m.record_write(Protocol::Influx, &WriteOutcome::Stored { points: 7 });
        m.record_write(Protocol::Influx, &WriteOutcome::Stored { points: 3 });
        m.record_write(Protocol::Grpc, &WriteOutcome::Duplicate);
        m.record_write(Protocol::Grpc, &WriteOutcome::Rejected("bad".into()));
        let text = render(&m.families(&StoreStats::default(), &[("healthy", 2)]));
        assert!(text.contains("damselfly_ingest_points_total{protocol=\"influx\"} 10\n"));
        assert!(text.contains("damselfly_ingest_batches_total{protocol=\"influx\"} 2\n"));
        assert!(text.contains("damselfly_ingest_batches_total{protocol=\"grpc\"} 0\n"));
        assert!(text.contains("damselfly_ingest_duplicate_batches_total{protocol=\"grpc\"} 1\n"));
        assert!(text.contains("damselfly_errors_total{kind=\"ingest_rejected\"} 1\n"));
        assert!(text.contains("damselfly_agents{status=\"healthy\"} 2\n"));
        assert!(text.contains("# TYPE damselfly_wal_sync_seconds histogram\n"));
    }
}
