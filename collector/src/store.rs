//! The storage engine of one shard: WAL → Arrow buffer → Parquet, with deduplication of re-sent batches.
//!
//! Writes go through one writer thread that owns the WAL. It takes every write waiting in its queue as one group,
//! checks each against the dedup set and the catalog, appends the accepted ones to the WAL with a single fsync
//! (group commit), applies them to the buffer, and only then answers: an answer of "stored" means durable.
//!
//! Flushing rotates the WAL and freezes the buffer in one step on the writer thread (so a frozen buffer holds
//! exactly the records of the sealed segments), writes the frozen rows as Parquet, publishes the files and drops
//! the frozen rows in one step under the state lock (queries never see rows twice or not at all), checkpoints the
//! dedup set, and deletes the sealed segments.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use damselfly_proto::v1::WriteBatch;
use prost::Message;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::buffer::Buffer;
use crate::catalog::{Catalog, TableSchema};
use crate::config::{CollectorConfig, WalSync};
use crate::dedup::Dedup;
use crate::error::{CollectorError, Result};
use crate::model::{BatchLimits, prepare_batch};
use crate::persist::{self, FileIndex, ParquetFile, hour_of};
use crate::wal::{self, Wal};

/// The answer to one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Durable; this many points were stored.
    Stored { points: usize },
    /// This (agent, seq) was stored before; nothing was stored now.
    Duplicate,
    /// Invalid; will never be accepted. The message says why.
    Rejected(String),
    /// Not now; try again after the hint.
    Retry { message: String, after: Duration },
}

/// A copy of every batch the store makes durable, for consumers such as forwarding ([`Store::tap`]). Fed without
/// waiting: when `batches` is full the batch is skipped for this tap and its points are added to `dropped_points`.
#[derive(Debug)]
pub struct StoredTap {
    pub batches: mpsc::Receiver<Arc<WriteBatch>>,
    pub dropped_points: Arc<AtomicU64>,
}

struct TapSender {
    batches: mpsc::Sender<Arc<WriteBatch>>,
    dropped_points: Arc<AtomicU64>,
}

type Taps = Arc<Mutex<Vec<TapSender>>>;

/// Rows frozen at a WAL rotation, waiting to be written as Parquet.
#[derive(Debug)]
pub struct Frozen {
    /// Last WAL sequence included.
    pub wal_seq: u64,
    /// Segments up to this id may be deleted once these rows are persisted.
    pub sealed_segment: u64,
    pub tables: BTreeMap<String, Vec<RecordBatch>>,
    pub rows: usize,
    pub bytes: usize,
}

/// Everything the writer, the flusher and queries share.
#[derive(Debug, Default)]
pub struct State {
    pub catalog: Catalog,
    pub dedup: Dedup,
    pub active: Buffer,
    pub frozen: Vec<Arc<Frozen>>,
    pub files: FileIndex,
    /// Rollup tables' files and schemas (maintenance builds them; `rollup_1m`/`rollup_1h` query them).
    pub rollups: crate::rollup::Rollups,
    /// The newest row of every series (see [`crate::lastvalue`]).
    pub last: crate::lastvalue::LastValues,
    /// Series per namespace, for `max_series_per_namespace` (see [`crate::cardinality`]).
    pub series: crate::cardinality::SeriesCounts,
}

impl State {
    fn buffered_bytes(&self) -> usize {
        self.active.bytes() + self.frozen.iter().map(|f| f.bytes).sum::<usize>()
    }
}

/// What a query needs of one table at one moment.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    pub schema: TableSchema,
    pub files: Vec<Arc<ParquetFile>>,
    /// Buffered rows (active and frozen), not yet conformed to the schema.
    pub batches: Vec<RecordBatch>,
}

/// Counters shown on `/health`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreStats {
    pub tables: usize,
    pub buffered_rows: usize,
    pub buffered_bytes: usize,
    pub frozen_batches: usize,
    pub parquet_files: usize,
    pub agents_seen: usize,
    pub wal_replayed_records: usize,
    pub wal_truncated_bytes: u64,
    /// Why the last WAL append failed (e.g. the disk is full), while writes are answered "retry"; `None` once an
    /// append succeeds again.
    pub wal_error: Option<String>,
    /// Tables whose start-up files are still being read for the last-value cache and the series counts.
    pub tables_warming: usize,
}

enum WriterMsg {
    Write {
        batch: WriteBatch,
        /// Its encoded size: what it is expected to add to the buffer.
        bytes: usize,
        reply: oneshot::Sender<WriteOutcome>,
    },
    Rotate {
        reply: oneshot::Sender<Result<Arc<Frozen>>>,
    },
}

/// Handle to the storage engine. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shard", &self.inner.config.shard_id)
            .finish()
    }
}

struct Inner {
    config: CollectorConfig,
    state: Arc<Mutex<State>>,
    writer: mpsc::Sender<WriterMsg>,
    flush_wanted: Arc<Notify>,
    /// Serialises flushes (the periodic one, the size-triggered one and the final one).
    flush_lock: tokio::sync::Mutex<()>,
    /// Told whenever a flush has dropped persisted rows from memory: writes waiting at the hard limit re-check.
    space_freed: Notify,
    /// Bytes of writes received but not yet answered (a quarter of `max_buffer_bytes`): bounds the memory held by
    /// writes waiting for space or for the writer, however many clients send at once.
    in_progress: Semaphore,
    in_progress_limit: usize,
    /// The "retry after" hint, in milliseconds: about as long as the last flush took (see [`retry_after`]).
    retry_hint_ms: Arc<AtomicU64>,
    replayed_records: usize,
    truncated_bytes: u64,
    taps: Taps,
    /// The collector's own metrics (`/metrics`, `damselfly.metrics`).
    metrics: Arc<crate::selfmetrics::SelfMetrics>,
    /// See [`StoreStats::wal_error`]; set and cleared by the writer thread.
    wal_error: WalError,
}

/// The last WAL append error, shared between the writer thread and `/health`.
type WalError = Arc<Mutex<Option<String>>>;

/// Locks the shared state. A poisoned lock means a panic elsewhere; the data is still consistent (every
/// mutation is a single step), so carry on rather than cascade.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens the store: indexes the Parquet files, loads the dedup checkpoint, replays the WAL, and starts the
    /// writer thread.
    pub fn open(config: &CollectorConfig) -> Result<Store> {
        Store::open_reconciled(config, |_| HashSet::new())
    }

    /// [`Store::open`], leaving out of the replay the WAL batches that `stored_elsewhere` says another shard
    /// stored (it gets every (agent id, seq) of the WAL; see [`crate::cluster`]): an agent whose shard died before
    /// acknowledging re-sends to another shard, and the copy in this WAL must not be stored a second time. Those
    /// batches still count as seen, so a late re-send here is answered DUPLICATE.
    pub fn open_reconciled(
        config: &CollectorConfig,
        stored_elsewhere: impl FnOnce(&[(String, u64)]) -> HashSet<(String, u64)>,
    ) -> Result<Store> {
        config.validate()?;
        let started = Instant::now();
        let mut state = State::default();
        // A compaction killed after its rename left inputs that its output replaces: delete them before indexing.
        crate::compaction::recover(&config.tables_dir())?;
        state.rollups = crate::rollup::scan(&config.rollups_dir())?;
        for (file, schema) in persist::scan_store(&config.tables_dir())? {
            if let Err(conflict) = state.catalog.merge_table(&file.table, &schema) {
                return Err(CollectorError::Parquet {
                    path: file.path.clone(),
                    message: conflict.to_string(),
                });
            }
            state.files.add(file);
        }
        state.last = crate::lastvalue::LastValues::new(config.last_value_cache_max_series);
        let with_files: Vec<String> = state
            .catalog
            .table_names()
            .filter(|t| !state.files.files(t).is_empty())
            .map(str::to_string)
            .collect();
        state.series = crate::cardinality::SeriesCounts::new(config.max_series_per_namespace);
        state.series.needs_warming(with_files.iter().cloned());
        state.last.needs_warming(with_files);
        state.dedup = Dedup::load(&dedup_path(config))?;
        let (wal, replay) = Wal::open(
            &config.wal_dir(),
            state.files.max_seq() + 1,
            config.wal_sync == WalSync::Fsync,
        )?;
        let replayed_records = replay.records.len();
        let mut replayed_rows = 0usize;
        let mut decoded = Vec::with_capacity(replay.records.len());
        for record in &replay.records {
            match decode_wal_batch(&record.payload) {
                Ok(batch) => decoded.push((record.seq, batch)),
                Err(e) => tracing::error!(seq = record.seq, error = %e, "WAL record skipped"),
            }
        }
        let keys: Vec<(String, u64)> = decoded
            .iter()
            .filter(|(_, b)| is_keyed(b))
            .map(|(_, b)| (b.agent_id.clone(), b.seq))
            .collect();
        let elsewhere = if keys.is_empty() {
            HashSet::new()
        } else {
            stored_elsewhere(&keys)
        };
        let mut left_out = 0usize;
        for (wal_seq, batch) in &decoded {
            let wal_seq = *wal_seq;
            if is_keyed(batch) && elsewhere.contains(&(batch.agent_id.clone(), batch.seq)) {
                state.dedup.insert(&batch.agent_id, batch.seq);
                left_out += 1;
                continue;
            }
            if let Err(conflict) = state.catalog.apply_batch(batch) {
                tracing::error!(seq = wal_seq, %conflict, "WAL record conflicts with the stored schema; skipped");
                continue;
            }
            if is_keyed(batch) {
                state.dedup.insert(&batch.agent_id, batch.seq);
            }
            state.last.observe(batch);
            state.series.observe(batch);
            let files = &state.files;
            replayed_rows += state.active.append_batch(batch, |table, time| {
                wal_seq > files.persisted_seq(table, hour_of(time))
            });
        }
        if left_out > 0 {
            tracing::info!(
                batches = left_out,
                "WAL batches another shard stored while this one was down were not replayed"
            );
        }
        tracing::info!(
            files = state.files.file_count(),
            tables = state.catalog.table_names().count(),
            wal_records = replayed_records,
            replayed_rows,
            truncated_bytes = replay.truncated_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        let state = Arc::new(Mutex::new(state));
        let flush_wanted = Arc::new(Notify::new());
        let retry_hint_ms = Arc::new(AtomicU64::new(INITIAL_RETRY_MS));
        let (tx, rx) = mpsc::channel(4096);
        let in_progress_limit = (config.max_buffer_bytes / 4).clamp(1, Semaphore::MAX_PERMITS);
        let taps: Taps = Arc::default();
        let metrics = Arc::new(crate::selfmetrics::SelfMetrics::default());
        let wal_error = WalError::default();
        let writer = Writer {
            wal_error: wal_error.clone(),
            metrics: metrics.clone(),
            taps: taps.clone(),
            wal,
            rx,
            state: state.clone(),
            flush_wanted: flush_wanted.clone(),
            flush_bytes: config.flush_buffer_bytes,
            max_bytes: config.max_buffer_bytes,
            retry_hint_ms: retry_hint_ms.clone(),
        };
        std::thread::Builder::new()
            .name(format!("damselfly-wal-{}", config.shard_id))
            .spawn(move || writer.run())
            .map_err(|e| {
                CollectorError::Server(format!("cannot start the WAL writer thread: {e}"))
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                config: config.clone(),
                state,
                writer: tx,
                flush_wanted,
                flush_lock: tokio::sync::Mutex::new(()),
                space_freed: Notify::new(),
                in_progress: Semaphore::new(in_progress_limit),
                in_progress_limit,
                retry_hint_ms,
                replayed_records,
                truncated_bytes: replay.truncated_bytes,
                taps,
                metrics,
                wal_error,
            }),
        })
    }

    pub fn config(&self) -> &CollectorConfig {
        &self.inner.config
    }

    /// The collector's own metrics, for the hooks in the data path and for `/metrics`.
    pub fn self_metrics(&self) -> &Arc<crate::selfmetrics::SelfMetrics> {
        &self.inner.metrics
    }

    /// Runs `f` under the state lock (maintenance swaps files and reads the index with it). Keep `f` short:
    /// writers and queries wait for it.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut lock(&self.inner.state))
    }

    /// Whether the WAL writer thread is running. It only stops at shutdown or after a bug (a panic); then no write
    /// can be acknowledged and `/health` reports the store as failed.
    pub fn writer_alive(&self) -> bool {
        !self.inner.writer.is_closed()
    }

    /// Validates, deduplicates, makes durable and buffers one batch.
    pub async fn write(&self, batch: WriteBatch) -> WriteOutcome {
        let limits = self.batch_limits();
        let held = in_memory_estimate(&batch);
        let batch = match prepare_batch(batch, limits) {
            Ok(batch) => batch,
            Err(invalid) => return WriteOutcome::Rejected(invalid.0),
        };
        self.write_prepared(batch, held).await
    }

    /// Makes durable and buffers one batch that has no (agent id, sequence) key, such as an HTTP write (line
    /// protocol, remote write): its sender has no way to re-send it under the same key, so it is not deduplicated.
    /// `agent_id` and `seq` are ignored (stored as empty and 0). Otherwise as [`Store::write`]: validated,
    /// acknowledged only once in the WAL.
    pub async fn write_unkeyed(&self, mut batch: WriteBatch) -> WriteOutcome {
        batch.agent_id.clear();
        batch.seq = 0;
        let limits = self.batch_limits();
        let held = in_memory_estimate(&batch);
        let batch = match crate::model::prepare_unkeyed_batch(batch, limits) {
            Ok(batch) => batch,
            Err(invalid) => return WriteOutcome::Rejected(invalid.0),
        };
        self.write_prepared(batch, held).await
    }

    /// The configured batch limits, the timestamp bounds taken around the clock now.
    fn batch_limits(&self) -> BatchLimits {
        let config = &self.inner.config;
        BatchLimits::around(
            crate::model::now_nanos(),
            config.max_batch_points,
            config.max_time_skew_secs,
            config.max_time_age_secs,
        )
    }

    /// A copy of every batch made durable from now on, through a channel of `capacity` batches (see
    /// [`StoredTap`]).
    pub fn tap(&self, capacity: usize) -> StoredTap {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped_points = Arc::new(AtomicU64::new(0));
        tap_lock(&self.inner.taps).push(TapSender {
            batches: tx,
            dropped_points: dropped_points.clone(),
        });
        StoredTap {
            batches: rx,
            dropped_points,
        }
    }

    async fn write_prepared(&self, batch: WriteBatch, held: usize) -> WriteOutcome {
        // Backpressure happens here, before the writer thread, which never waits: other writes (duplicates, or
        // anything once space is free) go on being committed meanwhile.
        let bytes = batch.encoded_len();
        let Some(_in_progress) = self.admit(held.max(bytes)) else {
            return WriteOutcome::Retry {
                message: format!(
                    "too many writes in progress (over {} bytes, a quarter of max_buffer_bytes): the write buffer \
                     is full or nearly so; retry later",
                    self.inner.in_progress_limit
                ),
                after: retry_after(&self.inner.retry_hint_ms),
            };
        };
        if let Err(retry) = self.wait_for_space(&batch, bytes).await {
            return retry;
        }
        let (reply, answer) = oneshot::channel();
        if self
            .inner
            .writer
            .send(WriterMsg::Write {
                batch,
                bytes,
                reply,
            })
            .await
            .is_err()
        {
            return shutting_down();
        }
        answer.await.unwrap_or_else(|_| shutting_down())
    }

    /// Reserves `bytes` of the in-progress budget, without waiting: a write that finds it used up is answered at
    /// once, which frees its memory instead of holding it. A batch larger than the whole budget needs all of it.
    fn admit(&self, bytes: usize) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let n = bytes
            .clamp(1, self.inner.in_progress_limit)
            .min(u32::MAX as usize) as u32;
        self.inner.in_progress.try_acquire_many(n).ok()
    }

    /// When `bytes` more would take the buffer over the hard limit (`max_buffer_bytes`; the writer applies the same
    /// rule), asks for a flush and waits up to `backpressure_wait_ms` for it to free space. A batch already stored
    /// does not wait: the writer answers it DUPLICATE.
    async fn wait_for_space(
        &self,
        batch: &WriteBatch,
        bytes: usize,
    ) -> std::result::Result<(), WriteOutcome> {
        let max = self.inner.config.max_buffer_bytes;
        let wait = self.inner.config.backpressure_wait();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a flush finishing in between is not missed.
            let freed = self.inner.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let buffered = {
                let state = lock(&self.inner.state);
                if is_keyed(batch) && state.dedup.contains(&batch.agent_id, batch.seq) {
                    return Ok(());
                }
                state.buffered_bytes()
            };
            if buffered == 0 || buffered.saturating_add(bytes) <= max {
                return Ok(());
            }
            self.inner.flush_wanted.notify_one();
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(buffer_full(
                    buffered,
                    max,
                    wait,
                    retry_after(&self.inner.retry_hint_ms),
                ));
            }
        }
    }

    /// Names of all tables (stored or buffered).
    pub fn table_names(&self) -> Vec<String> {
        lock(&self.inner.state)
            .catalog
            .table_names()
            .map(str::to_string)
            .collect()
    }

    /// A consistent view of one table: its schema, its files and its buffered rows.
    pub fn snapshot(&self, table: &str) -> Option<TableSnapshot> {
        let mut state = lock(&self.inner.state);
        let schema = state.catalog.table(table)?.clone();
        let files = state.files.files(table).to_vec();
        let mut batches = Vec::new();
        for frozen in &state.frozen {
            if let Some(b) = frozen.tables.get(table) {
                batches.extend(b.iter().cloned());
            }
        }
        if let Some(t) = state.active.table_mut(table) {
            batches.extend(t.snapshot());
        }
        Some(TableSnapshot {
            schema,
            files,
            batches,
        })
    }

    /// The last-value cache's rows of `table` (the newest row of each series, at most two per series), conformed
    /// to `schema`, without rows retention has expired; `None` when the cache cannot answer for the table (see
    /// [`crate::lastvalue::LastValues::rows`]).
    pub fn last_rows(
        &self,
        table: &str,
        schema: &arrow::datatypes::SchemaRef,
    ) -> Option<std::result::Result<Vec<RecordBatch>, String>> {
        let period = crate::retention::period_for(
            &self.inner.config,
            crate::retention::TableKind::Raw,
            table,
        );
        let now = crate::model::now_nanos();
        lock(&self.inner.state)
            .last
            .rows(table, schema, |time| period.expired(hour_of(time), now))
    }

    /// Tables whose start-up files the last-value cache or the series counts have yet to read.
    pub fn last_values_unwarmed(&self) -> Vec<String> {
        let state = lock(&self.inner.state);
        let mut tables = state.last.unwarmed();
        tables.extend(state.series.unwarmed().map(str::to_string));
        tables.sort();
        tables.dedup();
        tables
    }

    /// Hands the last-value cache and the series counts the newest row per series of `table`'s start-up files
    /// (`None`: unreadable; the series counts then leave them out).
    pub fn last_values_warmed(&self, table: &str, rows: Option<Vec<RecordBatch>>) {
        let mut state = lock(&self.inner.state);
        let tags: Vec<String> = state.catalog.table(table).map_or_else(Vec::new, |schema| {
            schema
                .columns()
                .filter(|(_, kind)| *kind == crate::model::ColumnKind::Tag)
                .map(|(name, _)| name.to_string())
                .collect()
        });
        state
            .series
            .warmed(table, rows.as_deref().unwrap_or_default(), &tags);
        state.last.warmed(table, rows);
    }

    /// Series known in `namespace` (0 when `max_series_per_namespace` is off: nothing is counted).
    pub fn namespace_series(&self, namespace: &str) -> usize {
        lock(&self.inner.state).series.series(namespace)
    }

    pub fn stats(&self) -> StoreStats {
        let state = lock(&self.inner.state);
        StoreStats {
            tables: state.catalog.table_names().count(),
            buffered_rows: state.active.rows() + state.frozen.iter().map(|f| f.rows).sum::<usize>(),
            buffered_bytes: state.buffered_bytes(),
            frozen_batches: state.frozen.len(),
            parquet_files: state.files.file_count(),
            agents_seen: state.dedup.agent_count(),
            wal_replayed_records: self.inner.replayed_records,
            wal_truncated_bytes: self.inner.truncated_bytes,
            wal_error: self
                .inner
                .wal_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            tables_warming: {
                let mut tables: HashSet<&str> = state.series.unwarmed().collect();
                let last = state.last.unwarmed();
                tables.extend(last.iter().map(String::as_str));
                tables.len()
            },
        }
    }

    /// Writes everything buffered so far to Parquet and deletes the WAL segments it came from. Returns the
    /// number of files written.
    pub async fn flush(&self) -> Result<usize> {
        let _guard = self.inner.flush_lock.lock().await;
        let started = Instant::now();
        let result = self.rotate_and_persist().await;
        self.inner.metrics.flush(started.elapsed(), result.is_ok());
        // The retry hint follows how long freeing space takes; a failing flush frees nothing for a while.
        let hint = match &result {
            Ok(_) => u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Err(_) => MAX_RETRY_MS,
        };
        self.inner.retry_hint_ms.store(hint, Ordering::Relaxed);
        result
    }

    async fn rotate_and_persist(&self) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .writer
            .send(WriterMsg::Rotate { reply })
            .await
            .map_err(|_| CollectorError::ShuttingDown)?;
        answer.await.map_err(|_| CollectorError::ShuttingDown)??;
        // Persist every frozen buffer in order; stop at the first failure (its segments must stay).
        let pending: Vec<Arc<Frozen>> = lock(&self.inner.state).frozen.clone();
        let mut written = 0;
        for frozen in pending {
            written += self.persist(frozen).await?;
        }
        Ok(written)
    }

    async fn persist(&self, frozen: Arc<Frozen>) -> Result<usize> {
        let started = Instant::now();
        let schemas: Vec<(String, TableSchema)> = {
            let state = lock(&self.inner.state);
            frozen
                .tables
                .keys()
                .filter_map(|t| state.catalog.table(t).map(|s| (t.clone(), s.clone())))
                .collect()
        };
        let config = self.inner.config.clone();
        let job = frozen.clone();
        let files = tokio::task::spawn_blocking(move || -> Result<Vec<ParquetFile>> {
            let mut files = Vec::new();
            for (table, schema) in schemas {
                let chunks = job.tables.get(&table).map_or(&[][..], Vec::as_slice);
                files.extend(persist::write_table(
                    &config.tables_dir(),
                    &config.shard_id,
                    &table,
                    &schema,
                    chunks,
                    job.wal_seq,
                    config.parquet_row_group_rows,
                )?);
            }
            Ok(files)
        })
        .await
        .map_err(|e| CollectorError::Server(format!("flush task failed: {e}")))??;
        let count = files.len();
        let dedup = {
            let mut state = lock(&self.inner.state);
            for file in files {
                state.files.add(file);
            }
            state.frozen.retain(|f| !Arc::ptr_eq(f, &frozen));
            state.dedup.clone()
        };
        self.inner.space_freed.notify_waiters();
        let config = self.inner.config.clone();
        let sealed = frozen.sealed_segment;
        tokio::task::spawn_blocking(move || -> Result<()> {
            dedup.save(&dedup_path(&config))?;
            wal::remove_segments(&config.wal_dir(), sealed)?;
            Ok(())
        })
        .await
        .map_err(|e| CollectorError::Server(format!("flush task failed: {e}")))??;
        if frozen.rows > 0 {
            tracing::info!(
                rows = frozen.rows,
                files = count,
                wal_seq = frozen.wal_seq,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "flushed buffer to Parquet"
            );
        }
        Ok(count)
    }

    /// Runs the flush schedule until `shutdown` resolves, then flushes one last time.
    pub async fn run_flusher(&self, shutdown: impl std::future::Future<Output = ()>) {
        let mut interval = tokio::time::interval(self.inner.config.flush_interval());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = self.inner.flush_wanted.notified() => {}
                _ = &mut shutdown => break,
            }
            if let Err(e) = self.flush().await {
                tracing::error!(error = %e, "flush failed; the rows stay in the buffer and the WAL and will be retried");
            }
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "final flush failed; the WAL keeps the rows for the next start");
        }
    }
}

/// Roughly what a decoded batch occupies in memory: its encoded size plus, for row-wise points, their allocations
/// (a `Point` with its tag and field vectors and their strings takes several times its wire size).
fn in_memory_estimate(batch: &WriteBatch) -> usize {
    const PER_POINT: usize = 96;
    const PER_TAG_OR_FIELD: usize = 80;
    batch.encoded_len()
        + batch
            .points
            .iter()
            .map(|p| PER_POINT + (p.tags.len() + p.fields.len()) * PER_TAG_OR_FIELD)
            .sum::<usize>()
}

/// Bounds of the "retry after" hint (milliseconds), and its value before the first flush.
const MIN_RETRY_MS: u64 = 250;
const MAX_RETRY_MS: u64 = 10_000;
const INITIAL_RETRY_MS: u64 = 1_000;

/// When a write refused for lack of buffer space should come back: about one flush from now.
fn retry_after(hint_ms: &AtomicU64) -> Duration {
    Duration::from_millis(
        hint_ms
            .load(Ordering::Relaxed)
            .clamp(MIN_RETRY_MS, MAX_RETRY_MS),
    )
}

fn buffer_full(buffered: usize, max: usize, waited: Duration, after: Duration) -> WriteOutcome {
    WriteOutcome::Retry {
        message: format!(
            "write buffer is full ({buffered} bytes buffered, max_buffer_bytes {max}; waited {} ms for a flush to \
             free space); retry later",
            waited.as_millis()
        ),
        after,
    }
}

fn shutting_down() -> WriteOutcome {
    WriteOutcome::Retry {
        message: "the collector is shutting down".into(),
        after: Duration::from_secs(1),
    }
}

fn dedup_path(config: &CollectorConfig) -> std::path::PathBuf {
    config.state_dir().join("dedup.json")
}

/// The WAL writer thread.
struct Writer {
    wal: Wal,
    rx: mpsc::Receiver<WriterMsg>,
    state: Arc<Mutex<State>>,
    flush_wanted: Arc<Notify>,
    flush_bytes: usize,
    max_bytes: usize,
    retry_hint_ms: Arc<AtomicU64>,
    taps: Taps,
    metrics: Arc<crate::selfmetrics::SelfMetrics>,
    wal_error: WalError,
}

/// Whether a batch carries an (agent id, seq) key: unkeyed batches ([`Store::write_unkeyed`]) are never
/// deduplicated.
/// A WAL record's payload as the batch it holds, normalized (records written before chunks existed hold points:
/// they are brought to today's shape). Checked again as on the way in, but for the limits that applied then
/// (size, clock): a record that passes its CRC yet breaks the buffer's invariants (a series index out of range,
/// say) is refused here rather than crashing every start-up (found by the `wal_segment` fuzz target).
pub fn decode_wal_batch(payload: &[u8]) -> std::result::Result<WriteBatch, String> {
    let batch = WriteBatch::decode(payload)
        .map_err(|e| format!("the record passed its CRC but does not decode: {e}"))?;
    crate::model::prepare_unkeyed_batch(batch, crate::model::BatchLimits::points(usize::MAX))
        .map_err(|e| format!("the record holds an invalid batch: {e}"))
}

fn is_keyed(batch: &WriteBatch) -> bool {
    batch.seq != 0
}

fn tap_lock(taps: &Mutex<Vec<TapSender>>) -> MutexGuard<'_, Vec<TapSender>> {
    taps.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most writes taken into one group commit.
const MAX_GROUP: usize = 1024;

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut group = Vec::new();
            let mut control = None;
            match first {
                WriterMsg::Write {
                    batch,
                    bytes,
                    reply,
                } => group.push((batch, bytes, reply)),
                rotate @ WriterMsg::Rotate { .. } => control = Some(rotate),
            }
            while control.is_none() && group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(WriterMsg::Write {
                        batch,
                        bytes,
                        reply,
                    }) => group.push((batch, bytes, reply)),
                    Ok(rotate @ WriterMsg::Rotate { .. }) => control = Some(rotate),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            if let Some(WriterMsg::Rotate { reply }) = control {
                let _ = reply.send(self.rotate());
            }
        }
        tracing::debug!("WAL writer stopped");
    }

    /// Hands a copy of each durable batch to every tap, never waiting; closed taps are removed.
    fn feed_taps<'a>(&self, batches: impl Iterator<Item = &'a WriteBatch>) {
        let mut taps = tap_lock(&self.taps);
        if taps.is_empty() {
            return;
        }
        for batch in batches {
            let shared = Arc::new(batch.clone());
            taps.retain(|tap| match tap.batches.try_send(shared.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let points = damselfly_proto::columnar::batch_rows(batch) as u64;
                    tap.dropped_points.fetch_add(points, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }

    fn commit(&mut self, group: Vec<(WriteBatch, usize, oneshot::Sender<WriteOutcome>)>) {
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; group.len()];
        let mut accepted = Vec::new();
        let mut new_series = crate::cardinality::Pending::default();
        {
            let state = lock(&self.state);
            // The hard limit, batch by batch: writes that waited in `Store::write` may all have seen free space at
            // once. An empty buffer takes any one batch, so a batch larger than the limit is not refused forever.
            // Over the limit the answer is immediate: this thread never waits.
            let mut projected = state.buffered_bytes();
            let mut over_limit = false;
            let mut overlay = HashMap::new();
            let mut seen: HashSet<(&str, u64)> = HashSet::new();
            for (i, (batch, bytes, _)) in group.iter().enumerate() {
                if is_keyed(batch)
                    && (state.dedup.contains(&batch.agent_id, batch.seq)
                        || seen.contains(&(batch.agent_id.as_str(), batch.seq)))
                {
                    outcomes[i] = Some(WriteOutcome::Duplicate);
                } else if projected > 0 && projected.saturating_add(*bytes) > self.max_bytes {
                    over_limit = true;
                    outcomes[i] = Some(buffer_full(
                        projected,
                        self.max_bytes,
                        Duration::ZERO,
                        retry_after(&self.retry_hint_ms),
                    ));
                } else {
                    // Series before schema: a batch refused for its series must not leave columns in `overlay`.
                    let admitted = match state.series.admit(batch, &new_series) {
                        Ok(admitted) => admitted,
                        Err(message) => {
                            outcomes[i] = Some(WriteOutcome::Rejected(message));
                            continue;
                        }
                    };
                    if let Err(conflict) = state.catalog.check_batch(batch, &mut overlay) {
                        outcomes[i] = Some(WriteOutcome::Rejected(conflict.to_string()));
                        continue;
                    }
                    new_series.merge(admitted);
                    seen.insert((batch.agent_id.as_str(), batch.seq));
                    accepted.push(i);
                    projected = projected.saturating_add(*bytes);
                }
            }
            if over_limit {
                self.flush_wanted.notify_one();
            }
        }
        if !accepted.is_empty() {
            let payloads: Vec<Vec<u8>> = accepted
                .iter()
                .map(|&i| group[i].0.encode_to_vec())
                .collect();
            let started = Instant::now();
            let appended = self.wal.append(&payloads);
            self.metrics.wal_sync(started.elapsed());
            *self.wal_error.lock().unwrap_or_else(|p| p.into_inner()) = appended
                .as_ref()
                .err()
                .map(|e| format!("WAL append failed: {}", crate::error::error_chain(e)));
            match appended {
                Ok(_) => {
                    let mut state = lock(&self.state);
                    state.series.commit(new_series);
                    for &i in &accepted {
                        let batch = &group[i].0;
                        if let Err(conflict) = state.catalog.apply_batch(batch) {
                            // check_batch passed, so this cannot happen; log rather than panic.
                            tracing::error!(%conflict, "schema changed between check and apply");
                        }
                        if is_keyed(batch) {
                            state.dedup.insert(&batch.agent_id, batch.seq);
                        }
                        let points = state.active.append_batch(batch, |_, _| true);
                        state.last.observe(batch);
                        outcomes[i] = Some(WriteOutcome::Stored { points });
                    }
                    if state.active.bytes() >= self.flush_bytes {
                        self.flush_wanted.notify_one();
                    }
                    drop(state);
                    self.feed_taps(accepted.iter().map(|&i| &group[i].0));
                }
                Err(e) => {
                    self.metrics.error(crate::selfmetrics::ErrorKind::Wal);
                    tracing::error!(error = %e, "WAL append failed; answering retry");
                    // Nothing of the group stayed in the WAL (see `Wal::append`), so nothing was acknowledged.
                    for &i in &accepted {
                        outcomes[i] = Some(WriteOutcome::Retry {
                            message: format!(
                                "WAL append failed, nothing was stored: {}; retry later",
                                crate::error::error_chain(&e)
                            ),
                            after: Duration::from_secs(5),
                        });
                    }
                }
            }
        }
        for ((_, _, reply), outcome) in group.into_iter().zip(outcomes) {
            let outcome = outcome
                .unwrap_or_else(|| WriteOutcome::Rejected("internal error: no outcome".into()));
            let _ = reply.send(outcome);
        }
    }

    fn rotate(&mut self) -> Result<Arc<Frozen>> {
        let sealed_segment = self.wal.rotate()?;
        let wal_seq = self.wal.next_seq() - 1;
        let mut state = lock(&self.state);
        let mut old = std::mem::take(&mut state.active);
        let rows = old.rows();
        let tables: BTreeMap<String, Vec<RecordBatch>> = old
            .tables_mut()
            .map(|(name, table)| (name.clone(), table.snapshot()))
            .collect();
        // What the frozen rows really occupy (the buffer's running figure is an estimate), so the hard limit
        // counts them honestly while they wait for Parquet.
        let bytes = old.bytes().max(
            tables
                .values()
                .flatten()
                .map(RecordBatch::get_array_memory_size)
                .sum(),
        );
        let frozen = Arc::new(Frozen {
            wal_seq,
            sealed_segment,
            tables,
            rows,
            bytes,
        });
        state.frozen.push(frozen.clone());
        Ok(frozen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::{Field, Point, Tag, field::Value};

    fn config(dir: &std::path::Path) -> CollectorConfig {
        CollectorConfig {
            data_dir: dir.to_path_buf(),
            ..CollectorConfig::default()
        }
    }

    fn batch(seq: u64, value: Value) -> WriteBatch {
        WriteBatch {
            chunks: Vec::new(),
            agent_id: "agent-1".into(),
            seq,
            common_tags: vec![Tag {
                key: "vm_id".into(),
                value: "vm1".into(),
            }],
            points: vec![Point {
                measurement: "cpu".into(),
                tags: vec![Tag {
                    key: "cpu".into(),
                    value: "cpu-total".into(),
                }],
                fields: vec![Field {
                    key: "usage_user".into(),
                    value: Some(value),
                }],
                time_unix_nano: 1_700_000_000_000_000_000 + seq as i64,
            }],
        }
    }

    fn buffered_rows(store: &Store) -> usize {
        store
            .snapshot("cpu")
            .map_or(0, |s| s.batches.iter().map(|b| b.num_rows()).sum())
    }

    fn file_rows(store: &Store) -> u64 {
        store
            .snapshot("cpu")
            .map_or(0, |s| s.files.iter().map(|f| f.rows).sum())
    }

    #[tokio::test]
    async fn stores_once_rejects_conflicts_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(&config(dir.path())).expect("open");
            assert_eq!(
                store.write(batch(1, Value::F64(1.0))).await,
                WriteOutcome::Stored { points: 1 }
            );
            assert_eq!(
                store.write(batch(1, Value::F64(1.0))).await,
                WriteOutcome::Duplicate
            );
            match store.write(batch(2, Value::I64(1))).await {
                WriteOutcome::Rejected(m) => assert!(m.contains("usage_user"), "{m}"),
                other => panic!("expected a rejection, got {other:?}"),
            }
            assert_eq!(
                store.write(batch(3, Value::F64(3.0))).await,
                WriteOutcome::Stored { points: 1 }
            );
            assert_eq!(buffered_rows(&store), 2);
            // Dropped without a flush: the WAL must bring the rows back.
        }
        {
            let store = Store::open(&config(dir.path())).expect("reopen");
            assert_eq!(buffered_rows(&store), 2);
            assert_eq!(
                store.write(batch(3, Value::F64(3.0))).await,
                WriteOutcome::Duplicate
            );
            assert_eq!(store.flush().await.expect("flush"), 1);
            assert_eq!(buffered_rows(&store), 0);
            assert_eq!(file_rows(&store), 2);
            assert_eq!(
                store.write(batch(4, Value::F64(4.0))).await,
                WriteOutcome::Stored { points: 1 }
            );
        }
        {
            // Files plus the WAL tail; nothing twice, dedup survives the WAL deletion via the checkpoint.
            let store = Store::open(&config(dir.path())).expect("reopen again");
            assert_eq!(file_rows(&store), 2);
            assert_eq!(buffered_rows(&store), 1);
            assert_eq!(
                store.write(batch(1, Value::F64(1.0))).await,
                WriteOutcome::Duplicate
            );
        }
    }

    #[tokio::test]
    async fn a_crash_between_parquet_and_wal_deletion_does_not_duplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        {
            let store = Store::open(&cfg).expect("open");
            store.write(batch(1, Value::F64(1.0))).await;
            store.write(batch(2, Value::F64(2.0))).await;
            // Keep a copy of the WAL, flush (which deletes it), then put it back: as if the process died after
            // the Parquet rename but before the segment deletion.
            let saved: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(cfg.wal_dir())
                .expect("wal dir")
                .map(|e| {
                    let p = e.expect("entry").path();
                    let bytes = std::fs::read(&p).expect("read");
                    (p, bytes)
                })
                .collect();
            store.flush().await.expect("flush");
            for (p, bytes) in saved {
                std::fs::write(p, bytes).expect("restore");
            }
        }
        let store = Store::open(&cfg).expect("reopen");
        assert_eq!(file_rows(&store), 2);
        assert_eq!(
            buffered_rows(&store),
            0,
            "replay must skip rows already in Parquet"
        );
    }

    /// A batch of one point whose string field holds `text_bytes` bytes.
    fn big_batch(seq: u64, text_bytes: usize) -> WriteBatch {
        let mut b = batch(seq, Value::Str("x".repeat(text_bytes)));
        b.points[0].fields[0].key = "text".into();
        b
    }

    fn small_buffer(dir: &std::path::Path, wait_ms: u64) -> CollectorConfig {
        CollectorConfig {
            max_buffer_bytes: 16 * 1024,
            flush_buffer_bytes: 16 * 1024,
            backpressure_wait_ms: wait_ms,
            ..config(dir)
        }
    }

    #[tokio::test]
    async fn at_the_hard_limit_a_write_waits_for_a_flush_then_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&small_buffer(dir.path(), 30_000)).expect("open");
        assert_eq!(
            store.write(big_batch(1, 10_000)).await,
            WriteOutcome::Stored { points: 1 }
        );
        // 10 KB more would pass the 16 KiB limit: the write waits for space instead of failing...
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.write(big_batch(2, 10_000)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the write must wait for a flush");
        // ...and goes through once a flush has freed the space.
        store.flush().await.expect("flush");
        assert_eq!(
            waiting.await.expect("join"),
            WriteOutcome::Stored { points: 1 }
        );
        assert_eq!(file_rows(&store), 1);
    }

    #[tokio::test]
    async fn at_the_hard_limit_a_write_is_answered_retry_after_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&small_buffer(dir.path(), 200)).expect("open");
        assert_eq!(
            store.write(big_batch(1, 10_000)).await,
            WriteOutcome::Stored { points: 1 }
        );
        let started = Instant::now();
        match store.write(big_batch(2, 10_000)).await {
            WriteOutcome::Retry { message, after } => {
                assert!(message.contains("max_buffer_bytes"), "{message}");
                assert!(after >= Duration::from_millis(MIN_RETRY_MS), "{after:?}");
            }
            other => panic!("expected retry, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
        // A batch stored before is a duplicate whatever the buffer holds: no waiting, no retry.
        assert_eq!(
            store.write(big_batch(1, 10_000)).await,
            WriteOutcome::Duplicate
        );
        // The refused batch was not half-stored: after a flush it is stored, once.
        store.flush().await.expect("flush");
        assert_eq!(
            store.write(big_batch(2, 10_000)).await,
            WriteOutcome::Stored { points: 1 }
        );
        assert_eq!(buffered_rows(&store), 1);
    }

    #[tokio::test]
    async fn writes_beyond_the_in_progress_budget_are_answered_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&small_buffer(dir.path(), 30_000)).expect("open");
        store.write(big_batch(1, 10_000)).await;
        // This one waits for space, holding the whole in-progress budget (a quarter of 16 KiB)...
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.write(big_batch(2, 10_000)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // ...so the next is not held in memory too: it is told to retry at once.
        match store.write(big_batch(3, 10_000)).await {
            WriteOutcome::Retry { message, .. } => {
                assert!(message.contains("in progress"), "{message}")
            }
            other => panic!("expected retry, got {other:?}"),
        }
        store.flush().await.expect("flush");
        assert_eq!(
            waiting.await.expect("join"),
            WriteOutcome::Stored { points: 1 }
        );
    }

    #[tokio::test]
    async fn invalid_batches_are_rejected_before_the_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path())).expect("open");
        let mut b = batch(1, Value::F64(1.0));
        b.points[0].measurement = "../etc".into();
        match store.write(b).await {
            WriteOutcome::Rejected(m) => assert!(m.contains("measurement name"), "{m}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert!(store.table_names().is_empty());
    }
}
