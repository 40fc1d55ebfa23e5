//! Compaction: merging the small files of one hour partition into one file, in bounded memory and crash-safely.
//!
//! Every file is sorted by series (tags in schema order) then time, so a k-way merge of the inputs, a few
//! thousand rows at a time per input ([`SortedMerge`]), yields the partition in storage order without ever holding
//! it whole; the output is written row group by row group with the flush's writer settings
//! ([`persist::writer_properties`]).
//!
//! Crash safety: the output is written to `<name>.tmp`, fsynced and renamed to `<shard>-<walseq>-c.parquet`;
//! only then are the inputs unpublished and deleted. The output's key-value metadata lists the inputs it replaces
//! (`damselfly.compacted_from`), and [`recover`] (run at start-up before the store is indexed) deletes any input
//! that a present compacted file replaces. So a compaction killed at any point leaves either the inputs (the
//! `.tmp` is removed at start-up) or the output, never both in the index. The output's `damselfly.wal_seq` is the
//! highest of its inputs, which keeps the per-partition maximum the WAL replay relies on.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Decimal128Array, RecordBatch};
use arrow::compute::{cast, interleave_record_batch};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use arrow::row::{OwnedRow, Row, RowConverter, Rows, SortField};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::KeyValue;

use crate::catalog::{Catalog, TableSchema};
use crate::error::{CollectorError, Result};
use crate::fsutil::{sync_dir, temp_path};
use crate::model::{TIME_COLUMN, tag_data_type};
use crate::persist::{self, FileIndex, META_DECIMAL_FLOATS, ParquetFile};

/// Key-value metadata of a compacted file: a JSON array of the file names (same directory) it replaces.
pub const META_COMPACTED_FROM: &str = "damselfly.compacted_from";
/// Rows read per input at a time: with the fan-in this bounds the merge's memory.
const READ_BATCH_ROWS: usize = 2_048;
/// Rows per merged output batch handed to the writer.
const OUTPUT_BATCH_ROWS: usize = 8_192;
/// Same limit as the flush's decimal floats (see `persist::encode_floats`): an unscaled value beyond 2^53 would
/// not convert back to f64 exactly.
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;
const NANOS_PER_HOUR: i64 = 3_600_000_000_000;

/// A point where a test (or the `DAMSELFLY_FAILPOINT` environment variable of the `damselfly` binary) can stop a
/// compaction, to prove that a compaction killed there loses nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The output is complete and fsynced under its temporary name.
    BeforeRename,
    /// The output has its final name; the inputs are still there and still indexed.
    AfterRename,
}

/// What happens at a failpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAction {
    /// `std::process::abort()`: a crash, as far as the disk can tell.
    Abort,
    /// Return an error without cleaning up (unit tests, which then reopen the store as a restart would; the
    /// process must not compact that partition again before).
    Error,
}

impl Failpoint {
    /// Reads `DAMSELFLY_FAILPOINT` (`compaction-before-rename` or `compaction-after-rename`).
    pub fn from_env() -> Option<Failpoint> {
        let value = std::env::var("DAMSELFLY_FAILPOINT").ok()?;
        match value.as_str() {
            "compaction-before-rename" => Some(Failpoint::BeforeRename),
            "compaction-after-rename" => Some(Failpoint::AfterRename),
            other => {
                tracing::warn!(failpoint = other, "unknown DAMSELFLY_FAILPOINT ignored");
                None
            }
        }
    }
}

fn failpoint(armed: Option<(Failpoint, FailAction)>, here: Failpoint) -> Result<()> {
    match armed {
        Some((point, action)) if point == here => {
            tracing::error!(failpoint = ?here, "failpoint reached");
            if action == FailAction::Abort {
                std::process::abort();
            }
            Err(CollectorError::Server(format!(
                "failpoint {here:?} reached"
            )))
        }
        _ => Ok(()),
    }
}

/// One compaction: these files of one partition, merged under the table's current schema.
#[derive(Debug, Clone)]
pub struct CompactionJob {
    pub table: String,
    pub hour: i64,
    /// Oldest (lowest WAL sequence) first; ties in the merge keep this order.
    pub inputs: Vec<Arc<ParquetFile>>,
    pub schema: TableSchema,
}

/// Merges the job's inputs into one file next to them and returns it (renamed, durable, not yet published).
pub fn compact(
    job: &CompactionJob,
    shard_id: &str,
    row_group_rows: usize,
    armed: Option<(Failpoint, FailAction)>,
) -> Result<ParquetFile> {
    let first = job
        .inputs
        .first()
        .ok_or_else(|| CollectorError::Server("compaction without inputs".into()))?;
    let dir = first
        .path
        .parent()
        .ok_or_else(|| CollectorError::Server("input file without a directory".into()))?
        .to_path_buf();
    let wal_seq = job.inputs.iter().map(|f| f.wal_seq).max().unwrap_or(0);
    let min_time = job.inputs.iter().map(|f| f.min_time).min().unwrap_or(0);
    let max_time = job.inputs.iter().map(|f| f.max_time).max().unwrap_or(0);
    let expected_rows: u64 = job.inputs.iter().map(|f| f.rows).sum();
    let path = output_path(&dir, shard_id, wal_seq);
    let tmp = temp_path(&path);
    let schema = job.schema.arrow_schema();
    let paths: Vec<PathBuf> = job.inputs.iter().map(|f| f.path.clone()).collect();
    let replaced: Vec<String> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let replaced = serde_json::to_string(&replaced)
        .map_err(|e| CollectorError::Server(format!("encoding the input list: {e}")))?;

    // Decimal floats stay decimals if every input stored them so; a column that turns out not to fit (an input
    // stored it as f64) makes the writer start over with that column as f64.
    let mut plan = DecimalPlan::from_inputs(&schema, &paths)?;
    let rows = loop {
        let mut kv = vec![
            KeyValue::new(persist::META_WAL_SEQ.to_string(), wal_seq.to_string()),
            KeyValue::new(persist::META_MIN_TIME.to_string(), min_time.to_string()),
            KeyValue::new(persist::META_MAX_TIME.to_string(), max_time.to_string()),
            KeyValue::new(META_COMPACTED_FROM.to_string(), replaced.clone()),
        ];
        if let Some(names) = plan.metadata()? {
            kv.push(KeyValue::new(META_DECIMAL_FLOATS.to_string(), names));
        }
        match write_merged(&paths, &schema, &plan, &tmp, row_group_rows, kv) {
            Ok(Ok(rows)) => break rows,
            Ok(Err(column)) => {
                tracing::debug!(column = %column, "a decimal float column does not fit; writing it as f64");
                plan.degrade(&column);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
    };
    if rows != expected_rows {
        let _ = std::fs::remove_file(&tmp);
        return Err(CollectorError::Parquet {
            path: tmp,
            message: format!(
                "compaction wrote {rows} rows but its inputs hold {expected_rows}; inputs kept"
            ),
        });
    }
    // A failpoint is a simulated kill: it leaves the disk exactly as a crash there would.
    failpoint(armed, Failpoint::BeforeRename)?;
    std::fs::rename(&tmp, &path).map_err(|e| CollectorError::io(&path, e))?;
    failpoint(armed, Failpoint::AfterRename)?;
    let published = sync_dir(&dir).and_then(|()| {
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| CollectorError::io(&path, e))
    });
    match published {
        Ok(bytes) => Ok(ParquetFile {
            path,
            table: job.table.clone(),
            hour: job.hour,
            wal_seq,
            rows,
            min_time,
            max_time,
            bytes,
        }),
        Err(e) => {
            // Never leave an unpublished output next to its still-indexed inputs: a later compaction would
            // write a second output listing the same inputs, and the next start-up would index both.
            if let Err(remove) = std::fs::remove_file(&path) {
                tracing::error!(file = %path.display(), error = %remove, "cannot remove the output of a failed compaction");
            }
            Err(e)
        }
    }
}

/// When a partition is compacted.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Compact a partition with at least this many files, even while its hour is open.
    pub min_files: usize,
    /// An hour is closed this long (nanoseconds) after its end; a closed hour with two or more files is compacted.
    pub closed_after_nanos: i64,
    /// Most files merged at once (the merge's fan-in); a bigger partition takes several rounds.
    pub max_files: usize,
}

/// The compactions due now: per table and partition, its oldest `max_files` files. `skip(table, hour)` leaves a
/// partition alone (one about to expire, one that failed in this pass).
pub fn plan(
    files: &FileIndex,
    catalog: &Catalog,
    policy: &CompactionPolicy,
    now_nanos: i64,
    skip: impl Fn(&str, i64) -> bool,
) -> Vec<CompactionJob> {
    let mut jobs = Vec::new();
    for table in files.table_names() {
        let Some(schema) = catalog.table(table) else {
            continue;
        };
        let mut partitions: BTreeMap<i64, Vec<Arc<ParquetFile>>> = BTreeMap::new();
        for file in files.files(table) {
            partitions.entry(file.hour).or_default().push(file.clone());
        }
        for (hour, mut inputs) in partitions {
            let closed = hour
                .saturating_add(1)
                .saturating_mul(NANOS_PER_HOUR)
                .saturating_add(policy.closed_after_nanos)
                <= now_nanos;
            let due = inputs.len() >= policy.min_files.max(2) || (closed && inputs.len() >= 2);
            if !due || skip(table, hour) {
                continue;
            }
            inputs.sort_by(|a, b| a.wal_seq.cmp(&b.wal_seq).then_with(|| a.path.cmp(&b.path)));
            inputs.truncate(policy.max_files.max(2));
            jobs.push(CompactionJob {
                table: table.to_string(),
                hour,
                inputs,
                schema: schema.clone(),
            });
        }
    }
    jobs
}

/// Start-up recovery, before the store is indexed: deletes every file that a present compacted file says it
/// replaces (a compaction that was killed after its rename). Returns how many files were deleted.
pub fn recover(tables_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    if !tables_dir.exists() {
        return Ok(0);
    }
    let mut stack = vec![tables_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut dir_changed = false;
        for entry in std::fs::read_dir(&dir).map_err(|e| CollectorError::io(&dir, e))? {
            let entry = entry.map_err(|e| CollectorError::io(&dir, e))?;
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_compacted_name(&name) {
                continue;
            }
            let replaced = match replaced_files(&path) {
                Ok(r) => r,
                Err(e) => {
                    // Indexing the store reads this file again and reports it properly.
                    tracing::warn!(file = %path.display(), error = %e, "cannot read a compacted file's input list");
                    continue;
                }
            };
            for input in replaced {
                // Only plain file names of this directory, never the file itself.
                if input == name
                    || input.contains('/')
                    || input.contains('\\')
                    || !input.ends_with(".parquet")
                {
                    continue;
                }
                let input_path = dir.join(&input);
                if input_path.exists() {
                    tracing::info!(
                        file = %input_path.display(),
                        replaced_by = %name,
                        "removing a file that an interrupted compaction already replaced"
                    );
                    std::fs::remove_file(&input_path)
                        .map_err(|e| CollectorError::io(&input_path, e))?;
                    removed += 1;
                    dir_changed = true;
                }
            }
        }
        if dir_changed {
            sync_dir(&dir)?;
        }
    }
    Ok(removed)
}

/// The file names a compacted file replaces (its `damselfly.compacted_from` metadata).
pub fn replaced_files(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).map_err(|e| CollectorError::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| CollectorError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let json = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == META_COMPACTED_FROM))
        .and_then(|kv| kv.value.clone());
    match json {
        None => Ok(Vec::new()),
        Some(json) => serde_json::from_str(&json).map_err(|e| CollectorError::Parquet {
            path: path.to_path_buf(),
            message: format!("bad {META_COMPACTED_FROM} metadata: {e}"),
        }),
    }
}

/// `<shard>-<walseq:020>-c.parquet`, or `-c2`, `-c3`... if that name is taken (it cannot be by design: a later
/// file of the partition always has a higher sequence; this is a safety net).
fn output_path(dir: &Path, shard_id: &str, wal_seq: u64) -> PathBuf {
    let mut n = 1u32;
    loop {
        let suffix = if n == 1 {
            "c".to_string()
        } else {
            format!("c{n}")
        };
        let path = dir.join(format!("{shard_id}-{wal_seq:020}-{suffix}.parquet"));
        if !path.exists() {
            return path;
        }
        n += 1;
    }
}

/// Whether a file name is a compaction output (`...-c.parquet`, `...-c<n>.parquet`).
pub fn is_compacted_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".parquet") else {
        return false;
    };
    match stem.rsplit_once('-') {
        Some((_, tail)) => tail
            .strip_prefix('c')
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit())),
        None => false,
    }
}

/// Writes the merge of `inputs` to `tmp`. `Ok(Err(column))` means a planned decimal column did not fit.
fn write_merged(
    inputs: &[PathBuf],
    schema: &SchemaRef,
    plan: &DecimalPlan,
    tmp: &Path,
    row_group_rows: usize,
    kv: Vec<KeyValue>,
) -> Result<std::result::Result<u64, String>> {
    let stored_schema = plan.stored_schema(schema);
    let props = persist::writer_properties(&stored_schema, row_group_rows, kv);
    let parquet_err = |e: parquet::errors::ParquetError| CollectorError::Parquet {
        path: tmp.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::create(tmp).map_err(|e| CollectorError::io(tmp, e))?;
    let mut writer =
        ArrowWriter::try_new(file, stored_schema.clone(), Some(props)).map_err(parquet_err)?;
    let mut merge = SortedMerge::open(inputs, schema.clone(), READ_BATCH_ROWS, OUTPUT_BATCH_ROWS)?;
    let mut rows = 0u64;
    while let Some(batch) = merge.next_batch()? {
        let stored = match plan.apply(&batch, &stored_schema)? {
            Ok(stored) => stored,
            Err(column) => return Ok(Err(column)),
        };
        rows += stored.num_rows() as u64;
        writer.write(&stored).map_err(parquet_err)?;
    }
    let file = writer.into_inner().map_err(parquet_err)?;
    file.sync_all().map_err(|e| CollectorError::io(tmp, e))?;
    Ok(Ok(rows))
}

/// Which f64 columns the output stores as decimals, at which precision (9: INT32, 18: INT64) and scale.
#[derive(Debug, Default)]
struct DecimalPlan {
    columns: Vec<PlannedDecimal>,
}

#[derive(Debug, Clone)]
struct PlannedDecimal {
    name: String,
    precision: u8,
    scale: i8,
}

impl DecimalPlan {
    /// A column is planned as a decimal if some input stores it so and no input holds it as f64 with values
    /// (all-null f64 columns do not count: the flush leaves a column without values as f64). The scale is the
    /// largest of the inputs' (a decimal at scale s is one at any larger scale); the precision is 9 (INT32) if
    /// every such input used 9, else 18. Each batch is checked anyway (see [`DecimalPlan::apply`]).
    fn from_inputs(schema: &SchemaRef, inputs: &[PathBuf]) -> Result<DecimalPlan> {
        let mut plan = DecimalPlan::default();
        let mut has_f64_values: Vec<String> = Vec::new();
        for path in inputs {
            let file = File::open(path).map_err(|e| CollectorError::io(path, e))?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
                CollectorError::Parquet {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for field in builder.schema().fields() {
                let is_float = schema
                    .field_with_name(field.name())
                    .is_ok_and(|f| *f.data_type() == DataType::Float64);
                if !is_float {
                    continue;
                }
                match field.data_type() {
                    DataType::Decimal128(precision, scale) => {
                        let precision = if *precision <= persist::DECIMAL_PRECISION_INT32 {
                            persist::DECIMAL_PRECISION_INT32
                        } else {
                            persist::DECIMAL_PRECISION_INT64
                        };
                        match plan.columns.iter_mut().find(|c| c.name == *field.name()) {
                            Some(c) => {
                                c.scale = c.scale.max(*scale);
                                c.precision = c.precision.max(precision);
                            }
                            None => plan.columns.push(PlannedDecimal {
                                name: field.name().clone(),
                                precision,
                                scale: *scale,
                            }),
                        }
                    }
                    DataType::Float64 if !all_null(builder.metadata(), field.name()) => {
                        has_f64_values.push(field.name().clone());
                    }
                    _ => {}
                }
            }
        }
        plan.columns.retain(|c| !has_f64_values.contains(&c.name));
        Ok(plan)
    }

    /// A column that did not fit: a precision-9 column is widened to 18; an 18 one is written as f64.
    fn degrade(&mut self, name: &str) {
        if let Some(c) = self.columns.iter_mut().find(|c| c.name == name)
            && c.precision < persist::DECIMAL_PRECISION_INT64
        {
            c.precision = persist::DECIMAL_PRECISION_INT64;
            return;
        }
        self.columns.retain(|c| c.name != name);
    }

    fn planned(&self, name: &str) -> Option<&PlannedDecimal> {
        self.columns.iter().find(|c| c.name == name)
    }

    fn metadata(&self) -> Result<Option<String>> {
        if self.columns.is_empty() {
            return Ok(None);
        }
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        serde_json::to_string(&names)
            .map(Some)
            .map_err(|e| CollectorError::Server(format!("encoding {META_DECIMAL_FLOATS}: {e}")))
    }

    fn stored_schema(&self, schema: &SchemaRef) -> SchemaRef {
        let fields: Vec<_> = schema
            .fields()
            .iter()
            .map(|f| match self.planned(f.name()) {
                Some(c) => Arc::new(Field::new(
                    f.name(),
                    DataType::Decimal128(c.precision, c.scale),
                    f.is_nullable(),
                )),
                None => f.clone(),
            })
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// The batch with the planned columns as decimals, each checked to fit its precision and to read back bit
    /// for bit through the cast readers use; `Err(column)` names the first that does not.
    fn apply(
        &self,
        batch: &RecordBatch,
        stored_schema: &SchemaRef,
    ) -> Result<std::result::Result<RecordBatch, String>> {
        if self.columns.is_empty() {
            return Ok(Ok(batch.clone()));
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            let Some(planned) = self.planned(field.name()) else {
                columns.push(column.clone());
                continue;
            };
            let Some(values) = column.as_primitive_opt::<Float64Type>() else {
                return Ok(Err(field.name().clone()));
            };
            let pow = 10f64.powi(i32::from(planned.scale));
            let limit = if planned.precision <= persist::DECIMAL_PRECISION_INT32 {
                999_999_999.0
            } else {
                MAX_EXACT_INT
            };
            let fits = (0..values.len()).all(|i| {
                values.is_null(i) || {
                    let v = values.value(i);
                    v.is_finite() && (v * pow).round().abs() <= limit
                }
            });
            if !fits {
                return Ok(Err(field.name().clone()));
            }
            let decimal: Decimal128Array = values
                .unary::<_, arrow::datatypes::Decimal128Type>(|v| (v * pow).round() as i128)
                .with_precision_and_scale(planned.precision, planned.scale)?;
            let back = cast(&decimal, &DataType::Float64)?;
            let back = back.as_primitive::<Float64Type>();
            let exact = (0..values.len())
                .all(|i| values.is_null(i) || values.value(i).to_bits() == back.value(i).to_bits());
            if !exact {
                return Ok(Err(field.name().clone()));
            }
            columns.push(Arc::new(decimal));
        }
        Ok(Ok(RecordBatch::try_new(stored_schema.clone(), columns)?))
    }
}

/// Whether the footer's statistics say every value of this top-level column is null (no statistics: not known,
/// so `false`).
fn all_null(meta: &parquet::file::metadata::ParquetMetaData, column: &str) -> bool {
    let Some(index) = meta
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.path().parts() == [column.to_string()])
    else {
        return false;
    };
    meta.row_groups().iter().all(|rg| {
        rg.column(index)
            .statistics()
            .and_then(|s| s.null_count_opt())
            .is_some_and(|nulls| nulls == rg.num_rows() as u64)
    })
}

/// A k-way merge of Parquet files that are each sorted by (tags in schema order, time), read a few thousand rows
/// at a time per file and conformed to `schema` (columns a file lacks read as null, which does not disturb its
/// order: a constant column). Equal keys keep the order of `inputs`. An input found out of order is an error, so
/// nothing built on the merge (compaction, rollups) can silently produce wrong results.
pub struct SortedMerge {
    keys: KeySpec,
    cursors: Vec<Cursor>,
    output_rows: usize,
}

/// How rows are compared: the merge schema and a row converter over (tags..., time).
struct KeySpec {
    schema: SchemaRef,
    converter: RowConverter,
    key_columns: Vec<usize>,
}

struct Cursor {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    /// Current batch and its sort keys; `None` once the file is exhausted.
    current: Option<(RecordBatch, Rows)>,
    pos: usize,
    /// The last key of the previous batch, to check order across batch boundaries.
    last: Option<OwnedRow>,
}

impl std::fmt::Debug for SortedMerge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SortedMerge")
            .field("inputs", &self.cursors.len())
            .finish()
    }
}

impl KeySpec {
    /// Loads the cursor's next non-empty batch, or marks it exhausted.
    fn load(&self, cursor: &mut Cursor) -> Result<()> {
        if let Some((_, rows)) = &cursor.current
            && rows.num_rows() > 0
        {
            cursor.last = Some(rows.row(rows.num_rows() - 1).owned());
        }
        cursor.current = None;
        cursor.pos = 0;
        for batch in cursor.reader.by_ref() {
            let batch = batch.map_err(|e| CollectorError::Parquet {
                path: cursor.path.clone(),
                message: e.to_string(),
            })?;
            if batch.num_rows() == 0 {
                continue;
            }
            let batch = persist::conform(&batch, &self.schema)?;
            let keys: Vec<ArrayRef> = self
                .key_columns
                .iter()
                .map(|&i| batch.column(i).clone())
                .collect();
            let rows = self.converter.convert_columns(&keys)?;
            if cursor
                .last
                .as_ref()
                .is_some_and(|last| rows.row(0) < last.row())
            {
                return Err(out_of_order(&cursor.path));
            }
            cursor.current = Some((batch, rows));
            return Ok(());
        }
        Ok(())
    }
}

impl SortedMerge {
    /// Opens every input (its footer and first batch). `read_rows` rows are read per input at a time;
    /// [`SortedMerge::next_batch`] returns up to `output_rows` rows.
    pub fn open(
        inputs: &[PathBuf],
        schema: SchemaRef,
        read_rows: usize,
        output_rows: usize,
    ) -> Result<SortedMerge> {
        let mut key_columns: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| *f.data_type() == tag_data_type())
            .map(|(i, _)| i)
            .collect();
        let time = schema
            .index_of(TIME_COLUMN)
            .map_err(|e| CollectorError::Server(format!("merge schema: {e}")))?;
        key_columns.push(time);
        let converter = RowConverter::new(
            key_columns
                .iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )?;
        let keys = KeySpec {
            schema,
            converter,
            key_columns,
        };
        let mut cursors = Vec::with_capacity(inputs.len());
        for path in inputs {
            let file = File::open(path).map_err(|e| CollectorError::io(path, e))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(read_rows.max(1)).build())
                .map_err(|e| CollectorError::Parquet {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let mut cursor = Cursor {
                path: path.clone(),
                reader,
                current: None,
                pos: 0,
                last: None,
            };
            keys.load(&mut cursor)?;
            cursors.push(cursor);
        }
        Ok(SortedMerge {
            keys,
            cursors,
            output_rows: output_rows.max(1),
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.keys.schema
    }

    fn current_key(&self, i: usize) -> Option<Row<'_>> {
        let cursor = &self.cursors[i];
        cursor
            .current
            .as_ref()
            .map(|(_, rows)| rows.row(cursor.pos))
    }

    /// The input with the smallest current key and the runner-up (ties: the lower input index first).
    fn smallest_two(&self) -> Option<(usize, Option<usize>)> {
        let mut best: Option<(usize, Row<'_>)> = None;
        let mut second: Option<(usize, Row<'_>)> = None;
        for i in 0..self.cursors.len() {
            let Some(key) = self.current_key(i) else {
                continue;
            };
            match &best {
                None => best = Some((i, key)),
                Some((_, b)) if key < *b => second = best.replace((i, key)),
                Some(_) => {
                    if second.as_ref().is_none_or(|(_, s)| key < *s) {
                        second = Some((i, key));
                    }
                }
            }
        }
        best.map(|(b, _)| (b, second.map(|(s, _)| s)))
    }

    /// The next merged batch of up to `output_rows` rows, `None` when every input is exhausted.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        // The batches output rows come from, and (batch, row) per output row.
        let mut sources: Vec<RecordBatch> = Vec::new();
        let mut source_of: Vec<Option<usize>> = vec![None; self.cursors.len()];
        let mut indices: Vec<(usize, usize)> = Vec::with_capacity(self.output_rows);
        while indices.len() < self.output_rows {
            let Some((b, second)) = self.smallest_two() else {
                break;
            };
            let source = match source_of[b] {
                Some(s) => s,
                None => {
                    let Some((batch, _)) = &self.cursors[b].current else {
                        break;
                    };
                    sources.push(batch.clone());
                    source_of[b] = Some(sources.len() - 1);
                    sources.len() - 1
                }
            };
            // Emit the run of `b` that sorts before the runner-up's current key.
            loop {
                let (pos, end, stop) = {
                    let cursor = &self.cursors[b];
                    let Some((_, rows)) = &cursor.current else {
                        break;
                    };
                    indices.push((source, cursor.pos));
                    let pos = cursor.pos + 1;
                    let end = pos == rows.num_rows();
                    if !end && rows.row(pos) < rows.row(pos - 1) {
                        return Err(out_of_order(&cursor.path));
                    }
                    let stop = end
                        || indices.len() == self.output_rows
                        || second.is_some_and(|s| {
                            self.current_key(s).is_some_and(|theirs| {
                                let mine = rows.row(pos);
                                mine > theirs || (mine == theirs && b > s)
                            })
                        });
                    (pos, end, stop)
                };
                self.cursors[b].pos = pos;
                if end {
                    self.keys.load(&mut self.cursors[b])?;
                    source_of[b] = None;
                }
                if stop {
                    break;
                }
            }
        }
        if indices.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&RecordBatch> = sources.iter().collect();
        Ok(Some(interleave_record_batch(&refs, &indices)?))
    }
}

fn out_of_order(path: &Path) -> CollectorError {
    CollectorError::Parquet {
        path: path.to_path_buf(),
        message: "rows are not sorted by series then time; cannot merge this file".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringDictionaryBuilder, TimestampNanosecondArray};
    use arrow::datatypes::Int32Type;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(TIME_COLUMN, crate::model::time_data_type(), false),
            Field::new("host", tag_data_type(), true),
            Field::new("v", DataType::Float64, true),
        ]))
    }

    /// Writes rows (host, time, v) as they are given (the caller decides whether they are sorted).
    fn write(dir: &Path, name: &str, rows: &[(&str, i64, f64)]) -> PathBuf {
        let mut hosts = StringDictionaryBuilder::<Int32Type>::new();
        for (h, _, _) in rows {
            hosts.append_value(h);
        }
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(
                    TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(hosts.finish()),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .expect("batch");
        let path = dir.join(name);
        let mut writer = ArrowWriter::try_new(File::create(&path).expect("create"), schema(), None)
            .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        path
    }

    fn merged(
        inputs: &[PathBuf],
        read_rows: usize,
        output_rows: usize,
    ) -> Result<Vec<(String, i64, f64)>> {
        let mut merge = SortedMerge::open(inputs, schema(), read_rows, output_rows)?;
        let mut out = Vec::new();
        while let Some(batch) = merge.next_batch()? {
            assert!(batch.num_rows() <= output_rows);
            let times = batch
                .column(0)
                .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
            let hosts = batch.column(1).as_dictionary::<Int32Type>();
            let names = hosts.values().as_string::<i32>();
            let v = batch.column(2).as_primitive::<Float64Type>();
            for i in 0..batch.num_rows() {
                let host = names.value(hosts.keys().value(i) as usize).to_string();
                out.push((host, times.value(i), v.value(i)));
            }
        }
        Ok(out)
    }

    #[test]
    fn merge_interleaves_runs_keeps_input_order_on_ties_and_refuses_unsorted_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write(
            dir.path(),
            "a.parquet",
            &[("a", 1, 1.0), ("a", 4, 1.0), ("b", 2, 1.0), ("c", 9, 1.0)],
        );
        let b = write(
            dir.path(),
            "b.parquet",
            &[("a", 2, 2.0), ("a", 4, 2.0), ("b", 1, 2.0)],
        );
        let c = write(dir.path(), "c.parquet", &[("a", 3, 3.0), ("c", 0, 3.0)]);
        let inputs = [a, b, c];
        let expected = vec![
            ("a".to_string(), 1, 1.0),
            ("a".to_string(), 2, 2.0),
            ("a".to_string(), 3, 3.0),
            // Equal keys: the earlier input first.
            ("a".to_string(), 4, 1.0),
            ("a".to_string(), 4, 2.0),
            ("b".to_string(), 1, 2.0),
            ("b".to_string(), 2, 1.0),
            ("c".to_string(), 0, 3.0),
            ("c".to_string(), 9, 1.0),
        ];
        // Small reads and outputs exercise batch boundaries; the answer never changes.
        for (read_rows, output_rows) in [(1, 1), (1, 4), (2, 3), (1_000, 1_000)] {
            assert_eq!(
                merged(&inputs, read_rows, output_rows).expect("merge"),
                expected,
                "read {read_rows}, output {output_rows}"
            );
        }
        let unsorted = write(dir.path(), "u.parquet", &[("a", 5, 0.0), ("a", 3, 0.0)]);
        for read_rows in [1, 10] {
            let err =
                merged(std::slice::from_ref(&unsorted), read_rows, 10).expect_err("unsorted input");
            assert!(err.to_string().contains("not sorted"), "{err}");
        }
    }

    #[test]
    fn compacted_names_are_recognised() {
        assert!(is_compacted_name("s0-00000000000000000042-c.parquet"));
        assert!(is_compacted_name("s0-00000000000000000042-c2.parquet"));
        assert!(!is_compacted_name("s0-00000000000000000042.parquet"));
        assert!(!is_compacted_name("s0-00000000000000000042-c.parquet.tmp"));
        assert!(!is_compacted_name("s0-abc-cx.parquet"));
    }
}
