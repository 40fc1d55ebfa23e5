//! The background maintenance task: every `maintenance_interval_secs` one pass runs compaction, then rollups,
//! then retention, one partition at a time (the heavy work on the blocking pool), and logs what it did and how
//! long each phase took. `POST /api/v1/admin/maintenance` runs a pass at once.
//!
//! Files leave the index at once (compaction swaps inputs for output, retention drops partitions, a rollup rebuild
//! replaces its file) but leave the disk only after `query_timeout_secs` plus a second: a query planned just
//! before the swap may still be reading them, and no query runs longer than the timeout. So a running query never
//! fails because maintenance deleted a file under it. Whatever is still waiting at shutdown is deleted once the
//! HTTP server has stopped; after a crash, start-up recovery deletes replaced compaction inputs and superseded
//! rollup builds, and expired partitions are simply dropped again by the next pass.

use crate::model::now_nanos;
use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::compaction::{self, CompactionPolicy, FailAction, Failpoint};
use crate::config::CollectorConfig;
use crate::retention::{TableKind, period_for};
use crate::rollup::{self, Resolution};
use crate::store::Store;

/// Most compaction rounds in one pass (a round compacts every due partition once; a partition with more files
/// than the fan-in needs several).
const MAX_COMPACTION_ROUNDS: usize = 64;

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    /// Compactions done, and how many input files they merged.
    pub compactions: usize,
    pub files_compacted: usize,
    /// Source hour partitions whose rollups were (re)built.
    pub rollups_built: usize,
    /// Hour partitions dropped by retention (raw and rollup tables).
    pub partitions_dropped: usize,
    /// Files deleted from disk in this pass (replaced or expired earlier and no longer readable by a query).
    pub files_deleted: usize,
    pub compaction_ms: u64,
    pub rollup_ms: u64,
    pub retention_ms: u64,
    /// One message per failed step; the rest of the pass went on.
    pub errors: Vec<String>,
}

/// A file to delete once no query can be reading it.
#[derive(Debug)]
struct Deferred {
    due: Instant,
    path: PathBuf,
    /// Also remove its (hour, then date) directories if that leaves them empty (retention).
    prune_dirs: bool,
}

/// Handle to the maintenance task. Cheap to clone.
#[derive(Clone)]
pub struct Maintenance {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("interval", &self.inner.config.maintenance_interval_secs)
            .finish()
    }
}

struct Inner {
    store: Store,
    config: CollectorConfig,
    /// One pass at a time (the schedule and the admin endpoint).
    pass_lock: tokio::sync::Mutex<()>,
    deferred: Mutex<Vec<Deferred>>,
    grace: Duration,
    failpoint: Option<(Failpoint, FailAction)>,
    stopping: AtomicBool,
}

impl Maintenance {
    pub fn new(store: Store) -> Maintenance {
        Maintenance::build(store, None, None)
    }

    /// Arms a failpoint (see [`Failpoint::from_env`]); `action` says whether the process aborts there.
    pub fn with_failpoint(self, failpoint: Option<Failpoint>, action: FailAction) -> Maintenance {
        let grace = self.inner.grace;
        Maintenance::build(
            self.inner.store.clone(),
            failpoint.map(|f| (f, action)),
            Some(grace),
        )
    }

    /// Changes how long replaced files stay on disk (tests use zero).
    pub fn with_deletion_grace(self, grace: Duration) -> Maintenance {
        Maintenance::build(self.inner.store.clone(), self.inner.failpoint, Some(grace))
    }

    fn build(
        store: Store,
        failpoint: Option<(Failpoint, FailAction)>,
        grace: Option<Duration>,
    ) -> Maintenance {
        let config = store.config().clone();
        let grace = grace.unwrap_or_else(|| {
            Duration::from_secs(config.query_timeout_secs) + Duration::from_secs(1)
        });
        Maintenance {
            inner: Arc::new(Inner {
                store,
                config,
                pass_lock: tokio::sync::Mutex::new(()),
                deferred: Mutex::new(Vec::new()),
                grace,
                failpoint,
                stopping: AtomicBool::new(false),
            }),
        }
    }

    fn deferred(&self) -> MutexGuard<'_, Vec<Deferred>> {
        self.inner
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the schedule until `shutdown` resolves; a pass in progress then stops after its current step.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let period = Duration::from_secs(self.inner.config.maintenance_interval_secs);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = &mut shutdown => break,
            }
            // In its own task: a pass is never dropped half-way (see `run_pass`).
            let this = self.clone();
            let mut pass = tokio::spawn(async move { this.pass().await });
            tokio::select! {
                _ = &mut pass => {}
                _ = &mut shutdown => {
                    self.inner.stopping.store(true, Ordering::SeqCst);
                    let _ = pass.await;
                    break;
                }
            }
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    /// Runs one pass now (after the one in progress, if any) and reports what it did. The pass runs in its own
    /// task, so it completes even if the caller goes away: a compaction dropped between its rename and its
    /// publication would leave an unindexed output next to its inputs.
    pub async fn run_pass(&self) -> PassReport {
        let this = self.clone();
        match tokio::spawn(async move { this.pass().await }).await {
            Ok(report) => report,
            Err(e) => PassReport {
                errors: vec![format!("the maintenance pass failed: {e}")],
                ..PassReport::default()
            },
        }
    }

    /// Deletes every file waiting for deletion, due or not. For shutdown, once no query runs any more.
    pub fn purge_all(&self) -> usize {
        self.purge(true)
    }

    fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Hands a pass's phase durations and error count to the self-metrics.
    fn record_pass(&self, report: &PassReport) {
        use crate::selfmetrics::{ErrorKind, Phase};
        let metrics = self.inner.store.self_metrics();
        for (phase, ms) in [
            (Phase::Compaction, report.compaction_ms),
            (Phase::Rollup, report.rollup_ms),
            (Phase::Retention, report.retention_ms),
        ] {
            metrics.maintenance(phase, Duration::from_millis(ms));
        }
        for _ in &report.errors {
            metrics.error(ErrorKind::Maintenance);
        }
    }

    async fn pass(&self) -> PassReport {
        let _guard = self.inner.pass_lock.lock().await;
        let started = Instant::now();
        let mut report = PassReport {
            files_deleted: self.purge(false),
            ..PassReport::default()
        };
        let now = now_nanos();
        let mut failed: HashSet<(String, i64)> = HashSet::new();

        let phase = Instant::now();
        self.compact(now, &mut failed, &mut report).await;
        report.compaction_ms = phase.elapsed().as_millis() as u64;

        let phase = Instant::now();
        if self.inner.config.rollups {
            self.roll_up(now, &failed, &mut report).await;
        }
        report.rollup_ms = phase.elapsed().as_millis() as u64;

        let phase = Instant::now();
        if !self.stopping() {
            self.expire(now, &mut report);
        }
        report.retention_ms = phase.elapsed().as_millis() as u64;
        self.record_pass(&report);

        tracing::info!(
            compactions = report.compactions,
            files_compacted = report.files_compacted,
            rollups_built = report.rollups_built,
            partitions_dropped = report.partitions_dropped,
            files_deleted = report.files_deleted,
            errors = report.errors.len(),
            compaction_ms = report.compaction_ms,
            rollup_ms = report.rollup_ms,
            retention_ms = report.retention_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "maintenance pass"
        );
        report
    }

    async fn compact(
        &self,
        now: i64,
        failed: &mut HashSet<(String, i64)>,
        report: &mut PassReport,
    ) {
        let config = &self.inner.config;
        let policy = CompactionPolicy {
            min_files: config.compaction_min_files,
            closed_after_nanos: i64::try_from(config.compaction_closed_after_secs)
                .unwrap_or(i64::MAX / 1_000_000_000)
                .saturating_mul(1_000_000_000),
            max_files: config.compaction_max_files,
        };
        for _ in 0..MAX_COMPACTION_ROUNDS {
            if self.stopping() {
                return;
            }
            // Partitions about to expire are not worth rewriting.
            let jobs = self.inner.store.with_state(|s| {
                compaction::plan(&s.files, &s.catalog, &policy, now, |table, hour| {
                    failed.contains(&(table.to_string(), hour))
                        || period_for(config, TableKind::Raw, table).expired(hour, now)
                })
            });
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                if self.stopping() {
                    return;
                }
                let started = Instant::now();
                let shard = config.shard_id.clone();
                let row_group_rows = config.parquet_row_group_rows;
                let failpoint = self.inner.failpoint;
                let work = job.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    compaction::compact(&work, &shard, row_group_rows, failpoint)
                })
                .await;
                let inputs: Vec<PathBuf> = job.inputs.iter().map(|f| f.path.clone()).collect();
                match outcome {
                    Ok(Ok(output)) => {
                        let (rows, bytes) = (output.rows, output.bytes);
                        let bytes_before: u64 = job.inputs.iter().map(|f| f.bytes).sum();
                        let path = output.path.clone();
                        // One step under the state lock: a query sees the inputs or the output, never both.
                        let removed = self.inner.store.with_state(|s| {
                            let removed = s.files.remove_paths(&job.table, &inputs);
                            s.files.add(output);
                            removed
                        });
                        if removed != inputs.len() {
                            tracing::error!(table = %job.table, removed, inputs = inputs.len(), "compaction inputs changed while merging");
                        }
                        self.defer(inputs.iter().cloned(), false);
                        report.compactions += 1;
                        report.files_compacted += inputs.len();
                        tracing::info!(
                            table = %job.table,
                            partition = %partition_name(job.hour),
                            files = inputs.len(),
                            rows,
                            bytes_before,
                            bytes_after = bytes,
                            output = %path.display(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "compacted partition"
                        );
                    }
                    outcome => {
                        let message = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => format!("compaction task failed: {e}"),
                            Ok(Ok(_)) => String::new(),
                        };
                        tracing::error!(table = %job.table, partition = %partition_name(job.hour), error = %message, "compaction failed; the files stay as they are");
                        report.errors.push(format!(
                            "compaction of {} {}: {message}",
                            job.table,
                            partition_name(job.hour)
                        ));
                        failed.insert((job.table.clone(), job.hour));
                    }
                }
            }
        }
    }

    async fn roll_up(&self, now: i64, failed: &HashSet<(String, i64)>, report: &mut PassReport) {
        let config = &self.inner.config;
        let root = config.rollups_dir();
        let jobs = self.inner.store.with_state(|s| {
            rollup::plan(
                &s.files,
                &s.catalog,
                &s.rollups,
                |res, table, hour| {
                    !period_for(config, TableKind::Rollup(res), table).expired(hour, now)
                },
                |table, hour| failed.contains(&(table.to_string(), hour)),
            )
        });
        for job in jobs {
            if self.stopping() {
                return;
            }
            let started = Instant::now();
            let build = self.inner.store.with_state(|s| {
                let b = s.rollups.next_build;
                s.rollups.next_build += 1;
                b
            });
            let (work, root, shard) = (job.clone(), root.clone(), config.shard_id.clone());
            let row_group_rows = config.parquet_row_group_rows;
            let outcome = tokio::task::spawn_blocking(move || {
                rollup::build(&work, &root, &shard, build, row_group_rows)
            })
            .await;
            match outcome {
                Ok(Ok(built)) => {
                    let rows: Vec<u64> = built.iter().map(|b| b.file.rows).collect();
                    let replaced = self.inner.store.with_state(|s| s.rollups.publish(built));
                    self.defer(replaced, false);
                    report.rollups_built += 1;
                    tracing::debug!(
                        table = %job.table,
                        partition = %partition_name(job.hour),
                        source_rows = job.source.rows,
                        rollup_rows = ?rows,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "rolled up partition"
                    );
                }
                outcome => {
                    let message = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => format!("rollup task failed: {e}"),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::error!(table = %job.table, partition = %partition_name(job.hour), error = %message, "rollup failed; retried next pass");
                    report.errors.push(format!(
                        "rollup of {} {}: {message}",
                        job.table,
                        partition_name(job.hour)
                    ));
                }
            }
        }
    }

    fn expire(&self, now: i64, report: &mut PassReport) {
        let config = &self.inner.config;
        // (kind, table, hour, files, rows) dropped, decided and unpublished in one step.
        let dropped = self.inner.store.with_state(|s| {
            let mut dropped = Vec::new();
            let tables: Vec<String> = s.files.table_names().map(str::to_string).collect();
            for table in tables {
                let period = period_for(config, TableKind::Raw, &table);
                let mut hours: Vec<i64> = s
                    .files
                    .files(&table)
                    .iter()
                    .map(|f| f.hour)
                    .filter(|h| period.expired(*h, now))
                    .collect();
                hours.sort_unstable();
                hours.dedup();
                for hour in hours {
                    let files: Vec<(PathBuf, u64)> = s
                        .files
                        .files(&table)
                        .iter()
                        .filter(|f| f.hour == hour)
                        .map(|f| (f.path.clone(), f.rows))
                        .collect();
                    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
                    s.files.remove_paths(&table, &paths);
                    let rows = files.iter().map(|(_, r)| r).sum::<u64>();
                    dropped.push((TableKind::Raw, table.clone(), hour, paths, rows));
                }
            }
            for res in Resolution::ALL {
                let expired: Vec<(String, i64)> = s
                    .rollups
                    .set(res)
                    .partitions()
                    .filter(|(t, h)| period_for(config, TableKind::Rollup(res), t).expired(*h, now))
                    .map(|(t, h)| (t.to_string(), h))
                    .collect();
                for (table, hour) in expired {
                    let paths = s.rollups.set_mut(res).remove_partition(&table, hour);
                    dropped.push((TableKind::Rollup(res), table, hour, paths, 0));
                }
            }
            dropped
        });
        for (kind, table, hour, paths, rows) in dropped {
            let name = match kind {
                TableKind::Raw => table.clone(),
                TableKind::Rollup(res) => format!("{}.{table}", res.schema_name()),
            };
            tracing::info!(
                table = %name,
                partition = %partition_name(hour),
                files = paths.len(),
                rows,
                retention = %period_for(config, kind, &table),
                "retention dropped partition"
            );
            report.partitions_dropped += 1;
            self.defer(paths, true);
        }
    }

    fn defer(&self, paths: impl IntoIterator<Item = PathBuf>, prune_dirs: bool) {
        let due = Instant::now() + self.inner.grace;
        self.deferred()
            .extend(paths.into_iter().map(|path| Deferred {
                due,
                path,
                prune_dirs,
            }));
        if self.inner.grace.is_zero() {
            self.purge(false);
        }
    }

    /// Deletes the deferred files that are due (or all of them).
    fn purge(&self, all: bool) -> usize {
        let now = Instant::now();
        let due: Vec<Deferred> = {
            let mut deferred = self.deferred();
            let (due, keep) = std::mem::take(&mut *deferred)
                .into_iter()
                .partition(|d| all || d.due <= now);
            *deferred = keep;
            due
        };
        let mut deleted = 0;
        for d in due {
            match std::fs::remove_file(&d.path) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %d.path.display(), error = %e, "cannot delete a replaced file; start-up will");
                }
            }
            if d.prune_dirs {
                // Hour, then date directory; `remove_dir` refuses a directory that is not empty.
                let mut dir = d.path.parent();
                for _ in 0..2 {
                    let Some(path) = dir else { break };
                    if std::fs::remove_dir(path).is_err() {
                        break;
                    }
                    dir = path.parent();
                }
            }
        }
        deleted
    }
}

/// `date=YYYY-MM-DD/hour=HH` of an hour since the epoch, for logs.
fn partition_name(hour: i64) -> String {
    match chrono::DateTime::from_timestamp(hour.saturating_mul(3_600), 0) {
        Some(t) => t.format("date=%Y-%m-%d/hour=%H").to_string(),
        None => format!("hour {hour}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Format, encode};
    use crate::query::QueryEngine;
    use crate::retention::RetentionPeriod;
    use crate::store::WriteOutcome;
    use arrow::datatypes::DataType;
    use damselfly_proto::v1::{Field, Point, Tag, WriteBatch, field::Value};
    use serde_json::{Value as Json, json};

    const SEC: i64 = 1_000_000_000;
    const HOUR: i64 = 3_600 * SEC;

    /// The start of the hour `hours_ago` hours before now.
    fn hour_start(hours_ago: i64) -> i64 {
        (now_nanos() / HOUR - hours_ago) * HOUR
    }

    fn config(dir: &std::path::Path) -> CollectorConfig {
        CollectorConfig {
            data_dir: dir.to_path_buf(),
            compaction_min_files: 2,
            ..CollectorConfig::default()
        }
    }

    fn point(measurement: &str, tags: &[(&str, &str)], fields: &[(&str, Value)], t: i64) -> Point {
        Point {
            measurement: measurement.into(),
            tags: tags
                .iter()
                .map(|(k, v)| Tag {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            fields: fields
                .iter()
                .map(|(k, v)| Field {
                    key: (*k).into(),
                    value: Some(v.clone()),
                })
                .collect(),
            time_unix_nano: t,
        }
    }

    fn cpu(host: &str, t: i64, v: f64) -> Point {
        point("cpu", &[("host", host)], &[("v", Value::F64(v))], t)
    }

    struct Harness {
        store: Store,
        engine: QueryEngine,
        maintenance: Maintenance,
        seq: u64,
    }

    impl Harness {
        fn open(config: &CollectorConfig) -> Harness {
            let store = Store::open(config).expect("open store");
            let engine = QueryEngine::new(store.clone(), config.query_limits()).expect("engine");
            let maintenance = Maintenance::new(store.clone()).with_deletion_grace(Duration::ZERO);
            Harness {
                store,
                engine,
                maintenance,
                seq: 1_000,
            }
        }

        /// Writes the points as one batch and flushes them into (at most one per partition) new files.
        async fn flush(&mut self, points: Vec<Point>) {
            self.seq += 1;
            let batch = WriteBatch {
                agent_id: "test".into(),
                seq: self.seq,
                points,
                ..WriteBatch::default()
            };
            match self.store.write(batch).await {
                WriteOutcome::Stored { .. } => {}
                other => panic!("write failed: {other:?}"),
            }
            self.store.flush().await.expect("flush");
        }

        async fn sql(&self, sql: &str) -> Vec<Json> {
            let result = self
                .engine
                .sql(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let bytes = encode(&result, Format::Json).expect("encode");
            serde_json::from_slice(&bytes).expect("json")
        }

        fn files(&self, table: &str) -> Vec<Arc<crate::persist::ParquetFile>> {
            self.store.with_state(|s| s.files.files(table).to_vec())
        }
    }

    /// Parquet files on disk under `dir` (recursively).
    fn files_on_disk(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet" || x == "tmp") {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    fn read_file(path: &std::path::Path) -> Vec<arrow::record_batch::RecordBatch> {
        let file = std::fs::File::open(path).expect("open");
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("reader")
            .build()
            .expect("build")
            .collect::<std::result::Result<_, _>>()
            .expect("read")
    }

    /// The Arrow type a file stores a column as.
    fn stored_type(path: &std::path::Path, column: &str) -> DataType {
        let file = std::fs::File::open(path).expect("open");
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("reader");
        builder
            .schema()
            .field_with_name(column)
            .expect("column")
            .data_type()
            .clone()
    }

    fn kv(path: &std::path::Path, key: &str) -> Option<String> {
        let file = std::fs::File::open(path).expect("open");
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("reader");
        builder
            .metadata()
            .file_metadata()
            .key_value_metadata()?
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .clone()
    }

    #[tokio::test]
    async fn compaction_merges_a_partition_in_series_then_time_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::open(&config(dir.path()));
        let t = hour_start(3);
        h.flush(vec![
            cpu("b", t + 10 * SEC, 1.5),
            cpu("a", t + 20 * SEC, 2.25),
            cpu("a", t, 0.5),
        ])
        .await;
        h.flush(vec![cpu("a", t + 5 * SEC, 0.1), cpu("c", t + SEC, 7.0)])
            .await;
        // The schema grows: a new tag and a new integer field, null in the older files.
        h.flush(vec![point(
            "cpu",
            &[("host", "a"), ("zone", "z1")],
            &[("v", Value::F64(3.3)), ("n", Value::I64(-7))],
            t + 7 * SEC,
        )])
        .await;
        let inputs = h.files("cpu");
        assert_eq!(inputs.len(), 3);
        let max_seq = inputs.iter().map(|f| f.wal_seq).max().expect("seq");

        let report = h.maintenance.run_pass().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!((report.compactions, report.files_compacted), (1, 3));
        let files = h.files("cpu");
        assert_eq!(files.len(), 1);
        let out = &files[0];
        assert_eq!((out.rows, out.wal_seq), (6, max_seq));
        assert!(compaction::is_compacted_name(
            &out.path.file_name().expect("name").to_string_lossy()
        ));
        // Only the output is left in the partition (deletion grace is zero here).
        assert_eq!(
            files_on_disk(&dir.path().join("data")),
            vec![out.path.clone()]
        );
        let replaced: Vec<String> =
            serde_json::from_str(&kv(&out.path, compaction::META_COMPACTED_FROM).expect("list"))
                .expect("json");
        assert_eq!(replaced.len(), 3);
        assert_eq!(
            kv(&out.path, crate::persist::META_WAL_SEQ),
            Some(max_seq.to_string())
        );
        // Every input stored `v` as small decimals, so the output does too: INT32, at the largest scale.
        assert_eq!(
            kv(&out.path, crate::persist::META_DECIMAL_FLOATS).as_deref(),
            Some("[\"v\"]")
        );
        assert_eq!(stored_type(&out.path, "v"), DataType::Decimal128(9, 2));

        // Storage order: host, zone (tags in schema order, nulls first), then time.
        let batches = read_file(&out.path);
        let schema = h.store.snapshot("cpu").expect("cpu").schema.arrow_schema();
        let merged = arrow::compute::concat_batches(
            &schema,
            &batches
                .iter()
                .map(|b| crate::persist::conform(b, &schema).expect("conform"))
                .collect::<Vec<_>>(),
        )
        .expect("concat");
        let rows = h
            .sql("SELECT host, zone, CAST(time AS BIGINT) AS t, v, n FROM cpu")
            .await;
        assert_eq!(rows.len(), 6);
        let order: Vec<(String, Option<String>, i64)> = (0..merged.num_rows())
            .map(|i| {
                let s = |name: &str| {
                    let c = merged.column_by_name(name).expect(name);
                    if c.is_null(i) {
                        None
                    } else {
                        Some(arrow::util::display::array_value_to_string(c, i).expect("display"))
                    }
                };
                let time = merged
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::TimestampNanosecondArray>()
                    .expect("time")
                    .value(i);
                (s("host").expect("host"), s("zone"), (time - t) / SEC)
            })
            .collect();
        let expected: Vec<(String, Option<String>, i64)> = vec![
            ("a".into(), None, 0),
            ("a".into(), None, 5),
            ("a".into(), None, 20),
            ("a".into(), Some("z1".into()), 7),
            ("b".into(), None, 10),
            ("c".into(), None, 1),
        ];
        assert_eq!(order, expected);
        // Values read back exactly, through SQL, including the decimal-stored floats.
        let sum = h
            .sql("SELECT sum(v) AS v, sum(n) AS n, count(*) AS c FROM cpu")
            .await;
        assert_eq!(sum[0]["c"], json!(6));
        assert_eq!(sum[0]["n"], json!(-7));
        let v = sum[0]["v"].as_f64().expect("v");
        assert!(
            (v - (1.5 + 2.25 + 0.5 + 0.1 + 7.0 + 3.3)).abs() < 1e-9,
            "{v}"
        );
        let exact = h
            .sql("SELECT v FROM cpu WHERE host = 'a' AND zone IS NULL ORDER BY time")
            .await;
        assert_eq!(
            exact,
            vec![json!({"v": 0.5}), json!({"v": 0.1}), json!({"v": 2.25})]
        );
    }

    #[tokio::test]
    async fn floats_that_are_not_decimals_everywhere_are_compacted_as_f64_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::open(&config(dir.path()));
        let t = hour_start(2);
        let third = 1.0 / 3.0;
        h.flush(vec![cpu("a", t, 0.25)]).await;
        h.flush(vec![cpu("a", t + SEC, third), cpu("b", t, -0.0)])
            .await;
        h.flush(vec![cpu("a", t + 2 * SEC, 1e300)]).await;
        let report = h.maintenance.run_pass().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let files = h.files("cpu");
        assert_eq!(files.len(), 1);
        assert_eq!(
            kv(&files[0].path, crate::persist::META_DECIMAL_FLOATS),
            None
        );
        let rows = h.sql("SELECT host, v FROM cpu ORDER BY host, time").await;
        let values: Vec<u64> = rows
            .iter()
            .map(|r| r["v"].as_f64().expect("v").to_bits())
            .collect();
        assert_eq!(
            values,
            vec![
                0.25f64.to_bits(),
                third.to_bits(),
                1e300f64.to_bits(),
                (-0.0f64).to_bits()
            ]
        );
    }

    #[tokio::test]
    async fn decimals_widen_to_int64_when_the_common_scale_outgrows_int32() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::open(&config(dir.path()));
        let t = hour_start(2);
        h.flush(vec![cpu("a", t, 9_999_999.99)]).await;
        h.flush(vec![cpu("a", t + SEC, 0.001)]).await;
        let inputs = h.files("cpu");
        assert_eq!(
            stored_type(&inputs[0].path, "v"),
            DataType::Decimal128(9, 2)
        );
        assert_eq!(
            stored_type(&inputs[1].path, "v"),
            DataType::Decimal128(9, 3)
        );
        let report = h.maintenance.run_pass().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let files = h.files("cpu");
        assert_eq!(files.len(), 1);
        // 9,999,999.990 has 10 digits at scale 3: INT64.
        assert_eq!(
            stored_type(&files[0].path, "v"),
            DataType::Decimal128(18, 3)
        );
        let rows = h.sql("SELECT v FROM cpu ORDER BY time").await;
        assert_eq!(rows, vec![json!({"v": 9_999_999.99}), json!({"v": 0.001})]);
    }

    #[tokio::test]
    async fn a_big_partition_is_compacted_in_rounds_of_max_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.compaction_max_files = 3;
        let mut h = Harness::open(&cfg);
        let t = hour_start(2);
        for i in 0..7 {
            h.flush(vec![
                cpu("a", t + i * SEC, i as f64),
                cpu("b", t + i * SEC, -(i as f64)),
            ])
            .await;
        }
        let report = h.maintenance.run_pass().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // 7 files, 3 at a time: 7 → 5 → 3 → 1.
        assert_eq!(report.compactions, 3);
        assert_eq!(h.files("cpu").len(), 1);
        let rows = h
            .sql("SELECT count(*) AS c, count(DISTINCT (host, time)) AS d FROM cpu")
            .await;
        assert_eq!(rows[0], json!({"c": 14, "d": 14}));
    }

    #[tokio::test]
    async fn an_open_hour_waits_for_min_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.compaction_min_files = 3;
        let mut h = Harness::open(&cfg);
        let t = hour_start(0);
        h.flush(vec![cpu("a", t, 1.0)]).await;
        h.flush(vec![cpu("a", t + 1, 1.0)]).await;
        assert_eq!(h.maintenance.run_pass().await.compactions, 0);
        h.flush(vec![cpu("a", t + 2, 1.0)]).await;
        assert_eq!(h.maintenance.run_pass().await.compactions, 1);
        assert_eq!(h.files("cpu").len(), 1);
    }

    #[tokio::test]
    async fn rollups_hold_min_max_sum_count_last_per_series_and_bucket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::open(&config(dir.path()));
        let t = hour_start(3);
        let p = |host: &str, secs: i64, v: f64, n: Option<i64>, u: u64| {
            let mut fields = vec![("v", Value::F64(v)), ("u", Value::U64(u))];
            if let Some(n) = n {
                fields.push(("n", Value::I64(n)));
            }
            point("cpu", &[("host", host)], &fields, t + secs * SEC)
        };
        // Out of time order across flushes: `last` is by time, not by arrival.
        h.flush(vec![
            p("a", 0, 1.0, Some(10), 5),
            p("a", 20, 3.0, Some(7), 7),
        ])
        .await;
        h.flush(vec![
            p("a", 10, 5.0, Some(-4), 6),
            p("a", 70, 2.0, Some(1), 8),
            p("b", 30, 4.0, None, 9),
        ])
        .await;
        let report = h.maintenance.run_pass().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.rollups_built, 1);

        let minute = h
            .sql(
                "SELECT host, CAST(time AS BIGINT) AS t, v_min, v_max, v_sum, v_count, v_last, n_min, n_max, \
                 n_sum, n_count, n_last, u_min, u_max, u_sum, u_count, u_last FROM rollup_1m.cpu ORDER BY host, time",
            )
            .await;
        let t_ = |secs: i64| json!(t + secs * SEC);
        assert_eq!(
            minute,
            vec![
                json!({"host": "a", "t": t_(0), "v_min": 1.0, "v_max": 5.0, "v_sum": 9.0, "v_count": 3, "v_last": 3.0,
                       "n_min": -4, "n_max": 10, "n_sum": 13, "n_count": 3, "n_last": 7,
                       "u_min": 5, "u_max": 7, "u_sum": 18, "u_count": 3, "u_last": 7}),
                json!({"host": "a", "t": t_(60), "v_min": 2.0, "v_max": 2.0, "v_sum": 2.0, "v_count": 1, "v_last": 2.0,
                       "n_min": 1, "n_max": 1, "n_sum": 1, "n_count": 1, "n_last": 1,
                       "u_min": 8, "u_max": 8, "u_sum": 8, "u_count": 1, "u_last": 8}),
                json!({"host": "b", "t": t_(0), "v_min": 4.0, "v_max": 4.0, "v_sum": 4.0, "v_count": 1, "v_last": 4.0,
                       "n_min": null, "n_max": null, "n_sum": null, "n_count": 0, "n_last": null,
                       "u_min": 9, "u_max": 9, "u_sum": 9, "u_count": 1, "u_last": 9}),
            ]
        );
        let hour = h
            .sql(
                "SELECT host, CAST(time AS BIGINT) AS t, v_min, v_max, v_sum, v_count, v_last, n_sum, n_last, \
                 u_sum FROM rollup_1h.cpu ORDER BY host",
            )
            .await;
        assert_eq!(
            hour,
            vec![
                json!({"host": "a", "t": t_(0), "v_min": 1.0, "v_max": 5.0, "v_sum": 11.0, "v_count": 4,
                       "v_last": 2.0, "n_sum": 14, "n_last": 1, "u_sum": 26}),
                json!({"host": "b", "t": t_(0), "v_min": 4.0, "v_max": 4.0, "v_sum": 4.0, "v_count": 1,
                       "v_last": 4.0, "n_sum": null, "n_last": null, "u_sum": 9}),
            ]
        );
        // Rollup tables are listed in their own schemas, apart from the measurements.
        let tables = h
            .sql(
                "SELECT table_schema, table_name FROM information_schema.tables \
                 WHERE table_name = 'cpu' ORDER BY table_schema",
            )
            .await;
        assert_eq!(
            tables,
            vec![
                json!({"table_schema": "public", "table_name": "cpu"}),
                json!({"table_schema": "rollup_1h", "table_name": "cpu"}),
                json!({"table_schema": "rollup_1m", "table_name": "cpu"}),
            ]
        );
        // Nothing changed: the next pass rebuilds nothing.
        assert_eq!(h.maintenance.run_pass().await.rollups_built, 0);
    }

    #[tokio::test]
    async fn late_data_rebuilds_the_hours_rollup_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let t = hour_start(4);
        {
            let mut h = Harness::open(&cfg);
            h.flush(vec![cpu("a", t, 1.0), cpu("a", t + 30 * SEC, 2.0)])
                .await;
            assert_eq!(h.maintenance.run_pass().await.rollups_built, 1);
            let before = h.sql("SELECT v_max, v_count FROM rollup_1m.cpu").await;
            assert_eq!(before, vec![json!({"v_max": 2.0, "v_count": 2})]);

            // A late point for that hour arrives (an agent's spool replayed, say).
            h.flush(vec![cpu("a", t + 45 * SEC, 9.5)]).await;
            let report = h.maintenance.run_pass().await;
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(report.rollups_built, 1);
            let after = h
                .sql("SELECT v_max, v_count, v_last, v_sum FROM rollup_1m.cpu")
                .await;
            assert_eq!(
                after,
                vec![json!({"v_max": 9.5, "v_count": 3, "v_last": 9.5, "v_sum": 12.5})]
            );
            let hour = h.sql("SELECT v_count FROM rollup_1h.cpu").await;
            assert_eq!(hour, vec![json!({"v_count": 3})]);
            // The replaced builds are gone: one file per resolution.
            assert_eq!(files_on_disk(&dir.path().join("rollups/1m")).len(), 1);
            assert_eq!(files_on_disk(&dir.path().join("rollups/1h")).len(), 1);
        }
        // After a restart the rollups are indexed again, known to be current, and still queryable.
        let h = Harness::open(&cfg);
        assert_eq!(h.maintenance.run_pass().await.rollups_built, 0);
        let after = h.sql("SELECT v_count FROM rollup_1m.cpu").await;
        assert_eq!(after, vec![json!({"v_count": 3})]);
    }

    #[tokio::test]
    async fn retention_drops_whole_old_partitions_per_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.retention_default = RetentionPeriod::days(1);
        cfg.retention_rollup_1m_default = RetentionPeriod::days(2);
        cfg.retention.insert("mem".into(), RetentionPeriod::FOREVER);
        let mut h = Harness::open(&cfg);
        let old = hour_start(72);
        let recent = hour_start(1);
        let mem = |t: i64| point("mem", &[("host", "a")], &[("used", Value::U64(1))], t);
        h.flush(vec![
            cpu("a", old, 1.0),
            cpu("a", recent, 2.0),
            mem(old),
            mem(recent),
        ])
        .await;
        let old_dir = h
            .files("cpu")
            .iter()
            .find(|f| f.min_time == old)
            .and_then(|f| f.path.parent().map(std::path::Path::to_path_buf))
            .expect("old partition");

        let report = h.maintenance.run_pass().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // cpu's old hour. Rollups whose own retention has passed (1-minute ones of the old hour) are not built.
        assert_eq!(report.partitions_dropped, 1);
        let cpu = h.sql("SELECT v FROM cpu").await;
        assert_eq!(cpu, vec![json!({"v": 2.0})]);
        assert_eq!(
            h.sql("SELECT count(*) AS c FROM mem").await,
            vec![json!({"c": 2})]
        );
        assert!(!old_dir.exists(), "{} should be gone", old_dir.display());
        // The 1-hour rollups (kept 730 days) still cover the dropped hour; the 1-minute ones (2 days) do not.
        let hourly = h.sql("SELECT v_sum FROM rollup_1h.cpu ORDER BY time").await;
        assert_eq!(hourly, vec![json!({"v_sum": 1.0}), json!({"v_sum": 2.0})]);
        let minutely = h.sql("SELECT v_sum FROM rollup_1m.cpu ORDER BY time").await;
        assert_eq!(minutely, vec![json!({"v_sum": 2.0})]);
        // The next pass neither rebuilds the dropped hour's rollups nor finds anything to drop.
        let again = h.maintenance.run_pass().await;
        assert_eq!((again.rollups_built, again.partitions_dropped), (0, 0));
    }

    #[tokio::test]
    async fn a_compaction_killed_after_its_rename_is_finished_at_start_up() {
        for point in [Failpoint::AfterRename, Failpoint::BeforeRename] {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = config(dir.path());
            let t = hour_start(2);
            {
                let mut h = Harness::open(&cfg);
                h.maintenance = h
                    .maintenance
                    .clone()
                    .with_failpoint(Some(point), FailAction::Error);
                for i in 0..4 {
                    h.flush(vec![
                        cpu("a", t + i * SEC, i as f64),
                        cpu("b", t + i * SEC, 1.0),
                    ])
                    .await;
                }
                let report = h.maintenance.run_pass().await;
                assert_eq!(report.compactions, 0, "{point:?}");
                assert_eq!(report.errors.len(), 1, "{point:?}: {:?}", report.errors);
                let on_disk = files_on_disk(&dir.path().join("data"));
                // The inputs and the output (renamed, or still under its temporary name) are all there: the
                // error path deliberately does not clean up, as a crash would not.
                assert_eq!(on_disk.len(), 4 + 1, "{point:?}: {on_disk:?}");
            }
            let h = Harness::open(&cfg);
            let on_disk = files_on_disk(&dir.path().join("data"));
            match point {
                Failpoint::AfterRename => {
                    assert_eq!(on_disk.len(), 1, "{on_disk:?}");
                    assert_eq!(h.files("cpu").len(), 1);
                }
                Failpoint::BeforeRename => {
                    assert_eq!(on_disk.len(), 4, "{on_disk:?}");
                    assert!(
                        on_disk
                            .iter()
                            .all(|p| p.extension().is_some_and(|e| e == "parquet"))
                    );
                }
            }
            let rows = h
                .sql("SELECT count(*) AS c, count(DISTINCT (host, time)) AS d FROM cpu")
                .await;
            assert_eq!(rows[0], json!({"c": 8, "d": 8}), "{point:?}");
            // And the partition ends up compacted (at start-up already, or now).
            let expected = usize::from(point == Failpoint::BeforeRename);
            assert_eq!(h.maintenance.run_pass().await.compactions, expected);
            assert_eq!(h.files("cpu").len(), 1);
            assert_eq!(
                h.sql("SELECT count(*) AS c FROM cpu").await[0],
                json!({"c": 8})
            );
        }
    }

    #[tokio::test]
    async fn replaced_files_stay_on_disk_for_running_queries_until_the_grace_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.query_timeout_secs = 3_600;
        let store = Store::open(&cfg).expect("open");
        let maintenance = Maintenance::new(store.clone());
        let t = hour_start(2);
        for seq in 1..=2 {
            let batch = WriteBatch {
                agent_id: "x".into(),
                seq,
                points: vec![cpu("a", t + seq as i64, 1.0)],
                ..WriteBatch::default()
            };
            assert!(matches!(
                store.write(batch).await,
                WriteOutcome::Stored { .. }
            ));
            store.flush().await.expect("flush");
        }
        // A query planned before the compaction holds these files.
        let snapshot = store.snapshot("cpu").expect("cpu");
        assert_eq!(maintenance.run_pass().await.compactions, 1);
        assert!(snapshot.files.iter().all(|f| f.path.exists()));
        assert_eq!(store.snapshot("cpu").expect("cpu").files.len(), 1);
        // Shutdown: nothing can read them any more.
        assert_eq!(maintenance.purge_all(), 2);
        assert!(snapshot.files.iter().all(|f| !f.path.exists()));
    }

    #[test]
    fn maintenance_keys_parse_from_toml_and_are_validated() {
        let config: CollectorConfig = toml::from_str(
            "maintenance_interval_secs = 60\nretention_default = \"7d\"\n\
             [retention]\ncpu = \"12h\"\n\"rollup_1h.cpu\" = \"forever\"\n",
        )
        .expect("parse");
        assert!(config.validate().is_ok());
        assert_eq!(config.retention_default, RetentionPeriod::days(7));
        assert_eq!(config.retention["rollup_1h.cpu"], RetentionPeriod::FOREVER);
        let err = toml::from_str::<CollectorConfig>("retention_default = \"30 days\"")
            .expect_err("bad period");
        assert!(err.to_string().contains("30 days"), "{err}");
        let bad = CollectorConfig {
            compaction_min_files: 1,
            ..CollectorConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
