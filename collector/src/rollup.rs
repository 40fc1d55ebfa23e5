//! Rollups: per series (all tags) and per minute / per hour, the `min`, `max`, `sum`, `count` and `last` (by
//! time) of every numeric field, stored as their own Parquet tables and queryable as `rollup_1m.<table>` and
//! `rollup_1h.<table>` (separate SQL schemas, so no name can collide with a measurement's).
//!
//! A rollup table has `time` (the bucket's start), the source's tags, and for each numeric field `f` the columns
//! `f_min`, `f_max`, `f_last` (the field's type), `f_sum` (f64 for floats; the integer type for integers, null if
//! the sum overflows it) and `f_count` (i64, non-null values). Bool and string fields are not rolled up.
//!
//! Files: `rollups/<1m|1h>/<table>/date=YYYY-MM-DD/hour=HH/<shard>-<build:020>.parquet`, one per source hour
//! partition and resolution, built from the partition's persisted (flushed) files with a k-way merge (they are
//! sorted by series then time, so every group is a run and memory stays bounded). Each file records the state of
//! the source partition it was built from (`damselfly.wal_seq` = the partition's highest WAL sequence, plus
//! `damselfly.rollup.source_files` and `damselfly.rollup.source_rows`); when the partition changes (a late flush,
//! a compaction) the hour is rebuilt under a new build number and the old file is deleted. At start-up only the
//! highest build of a partition directory is kept. Rows still in the write buffer are not in any rollup yet.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringDictionaryBuilder,
    TimestampNanosecondArray, UInt64Array,
};
use arrow::datatypes::{
    Field as ArrowField, Float64Type, Int32Type, Int64Type, Schema, SchemaRef, UInt64Type,
};
use arrow::row::{OwnedRow, RowConverter, Rows, SortField};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;

use crate::catalog::{Catalog, TableSchema};
use crate::compaction::SortedMerge;
use crate::error::{CollectorError, Result};
use crate::fsutil::{sync_dir, temp_path};
use crate::model::{ColumnKind, FieldType, TIME_COLUMN, tag_data_type, time_data_type};
use crate::persist::{self, FileIndex, ParquetFile, hour_of};
use crate::store::{Store, TableSnapshot};

const META_RESOLUTION: &str = "damselfly.rollup.resolution";
const META_SOURCE_FILES: &str = "damselfly.rollup.source_files";
const META_SOURCE_ROWS: &str = "damselfly.rollup.source_rows";
/// Rows read per source file at a time, and groups written per batch.
const READ_BATCH_ROWS: usize = 2_048;
const MERGE_BATCH_ROWS: usize = 8_192;
const WRITE_BATCH_GROUPS: usize = 8_192;

/// The statistics kept per field, in column-name suffix form.
pub const STATS: [&str; 5] = ["min", "max", "sum", "count", "last"];

/// A rollup resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    /// The SQL schema its tables live in.
    pub fn schema_name(self) -> &'static str {
        match self {
            Resolution::Minute => "rollup_1m",
            Resolution::Hour => "rollup_1h",
        }
    }

    /// Its directory under `rollups/`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Resolution::Minute => "1m",
            Resolution::Hour => "1h",
        }
    }

    pub fn width_nanos(self) -> i64 {
        match self {
            Resolution::Minute => 60_000_000_000,
            Resolution::Hour => 3_600_000_000_000,
        }
    }
}

/// The state of a source hour partition a rollup was built from: when it differs from the partition's current
/// state, the rollup is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceState {
    /// Highest WAL sequence among the partition's files.
    pub wal_seq: u64,
    pub files: u64,
    pub rows: u64,
}

impl SourceState {
    pub fn of(files: &[Arc<ParquetFile>]) -> SourceState {
        SourceState {
            wal_seq: files.iter().map(|f| f.wal_seq).max().unwrap_or(0),
            files: files.len() as u64,
            rows: files.iter().map(|f| f.rows).sum(),
        }
    }
}

/// The rollup files of one resolution.
#[derive(Debug, Default, Clone)]
pub struct RollupSet {
    pub files: FileIndex,
    /// Rollup table schemas (they only grow, as the source tables do).
    pub catalog: Catalog,
    /// Per (table, hour): the current file and the source state it was built from.
    partitions: HashMap<(String, i64), (PathBuf, SourceState)>,
}

impl RollupSet {
    pub fn source_of(&self, table: &str, hour: i64) -> Option<SourceState> {
        self.partitions
            .get(&(table.to_string(), hour))
            .map(|(_, s)| *s)
    }

    /// Every (table, hour) that has a rollup file.
    pub fn partitions(&self) -> impl Iterator<Item = (&str, i64)> {
        self.partitions.keys().map(|(t, h)| (t.as_str(), *h))
    }

    /// Publishes a (re)built file; returns the path of the file it replaces, if any.
    fn publish(&mut self, built: BuiltRollup) -> Option<PathBuf> {
        let key = (built.file.table.clone(), built.file.hour);
        if let Err(conflict) = self.catalog.merge_table(&built.file.table, &built.schema) {
            // Rollup columns derive from the source's, whose types never change; report rather than panic.
            tracing::error!(%conflict, "rollup schema conflict");
        }
        let path = built.file.path.clone();
        let old = self.partitions.insert(key, (path, built.source));
        let old_path = old.map(|(p, _)| p);
        if let Some(old) = &old_path {
            self.files
                .remove_paths(&built.file.table, std::slice::from_ref(old));
        }
        self.files.add(built.file);
        old_path
    }

    /// Drops a partition from the index; returns its files.
    pub fn remove_partition(&mut self, table: &str, hour: i64) -> Vec<PathBuf> {
        match self.partitions.remove(&(table.to_string(), hour)) {
            Some((path, _)) => {
                self.files.remove_paths(table, std::slice::from_ref(&path));
                vec![path]
            }
            None => Vec::new(),
        }
    }
}

/// Both resolutions, kept in the store's state next to the raw files.
#[derive(Debug, Default, Clone)]
pub struct Rollups {
    pub minute: RollupSet,
    pub hour: RollupSet,
    /// The next build number; builds only grow, so the newest file of a partition directory is the highest.
    pub next_build: u64,
}

impl Rollups {
    pub fn set(&self, res: Resolution) -> &RollupSet {
        match res {
            Resolution::Minute => &self.minute,
            Resolution::Hour => &self.hour,
        }
    }

    pub fn set_mut(&mut self, res: Resolution) -> &mut RollupSet {
        match res {
            Resolution::Minute => &mut self.minute,
            Resolution::Hour => &mut self.hour,
        }
    }

    /// Whether these resolutions of (table, hour) were built from `source`.
    pub fn is_current(
        &self,
        table: &str,
        hour: i64,
        source: SourceState,
        resolutions: &[Resolution],
    ) -> bool {
        resolutions
            .iter()
            .all(|r| self.set(*r).source_of(table, hour) == Some(source))
    }

    /// Publishes rebuilt files; returns the files they replace (to delete once no query can read them).
    pub fn publish(&mut self, built: Vec<BuiltRollup>) -> Vec<PathBuf> {
        built
            .into_iter()
            .filter_map(|b| self.set_mut(b.resolution).publish(b))
            .collect()
    }
}

/// Columns of a rollup table: the source's tags and five statistics per numeric field. `None` if the source has
/// no numeric field.
pub fn rollup_schema(source: &TableSchema) -> Option<TableSchema> {
    let tags: Vec<&str> = source
        .columns()
        .filter(|(_, k)| *k == ColumnKind::Tag)
        .map(|(n, _)| n)
        .collect();
    let mut fields = vec![ArrowField::new(TIME_COLUMN, time_data_type(), false)];
    for tag in &tags {
        fields.push(ArrowField::new(*tag, tag_data_type(), true));
    }
    let mut numeric = 0;
    for (name, kind) in source.columns() {
        let ColumnKind::Field(t @ (FieldType::F64 | FieldType::I64 | FieldType::U64)) = kind else {
            continue;
        };
        let names: Vec<String> = STATS.iter().map(|s| format!("{name}_{s}")).collect();
        if let Some(clash) = names.iter().find(|n| tags.contains(&n.as_str())) {
            tracing::warn!(field = name, tag = %clash, "a rollup column would have a tag's name; field not rolled up");
            continue;
        }
        for (stat, column) in STATS.iter().zip(names) {
            fields.push(ArrowField::new(
                column,
                stat_type(t, stat).data_type(),
                true,
            ));
        }
        numeric += 1;
    }
    if numeric == 0 {
        return None;
    }
    TableSchema::from_arrow(&Schema::new(fields)).ok()
}

fn stat_type(field: FieldType, stat: &str) -> FieldType {
    match stat {
        "count" => FieldType::I64,
        _ => field,
    }
}

/// A rollup of one source hour partition at both resolutions.
#[derive(Debug, Clone)]
pub struct RollupJob {
    pub table: String,
    pub hour: i64,
    /// The partition's files, oldest first.
    pub files: Vec<PathBuf>,
    /// The source table's schema.
    pub schema: TableSchema,
    pub source: SourceState,
    /// The resolutions to build (those whose retention has not already passed for this hour).
    pub resolutions: Vec<Resolution>,
}

/// A rollup file written and renamed, not yet published.
#[derive(Debug, Clone)]
pub struct BuiltRollup {
    pub resolution: Resolution,
    pub file: ParquetFile,
    pub schema: TableSchema,
    pub source: SourceState,
}

/// The rollups due: every source partition of a table with numeric fields whose rollups are missing or stale.
/// `wanted(resolution, table, hour)` is false where that rollup would be expired already (else the pass would
/// build it and drop it again, forever); `skip(table, hour)` leaves a partition alone.
pub fn plan(
    files: &FileIndex,
    catalog: &Catalog,
    rollups: &Rollups,
    wanted: impl Fn(Resolution, &str, i64) -> bool,
    skip: impl Fn(&str, i64) -> bool,
) -> Vec<RollupJob> {
    let mut jobs = Vec::new();
    for table in files.table_names() {
        let Some(schema) = catalog.table(table) else {
            continue;
        };
        if rollup_schema(schema).is_none() {
            continue;
        }
        let mut partitions: BTreeMap<i64, Vec<Arc<ParquetFile>>> = BTreeMap::new();
        for file in files.files(table) {
            partitions.entry(file.hour).or_default().push(file.clone());
        }
        for (hour, mut inputs) in partitions {
            let source = SourceState::of(&inputs);
            let resolutions: Vec<Resolution> = Resolution::ALL
                .into_iter()
                .filter(|r| wanted(*r, table, hour))
                .collect();
            if resolutions.is_empty()
                || rollups.is_current(table, hour, source, &resolutions)
                || skip(table, hour)
            {
                continue;
            }
            inputs.sort_by(|a, b| a.wal_seq.cmp(&b.wal_seq).then_with(|| a.path.cmp(&b.path)));
            jobs.push(RollupJob {
                table: table.to_string(),
                hour,
                files: inputs.iter().map(|f| f.path.clone()).collect(),
                schema: schema.clone(),
                source,
                resolutions,
            });
        }
    }
    jobs
}

/// Builds both resolutions of one partition under build number `build`: written, fsynced and renamed.
pub fn build(
    job: &RollupJob,
    root: &Path,
    shard_id: &str,
    build: u64,
    row_group_rows: usize,
) -> Result<Vec<BuiltRollup>> {
    let Some(out_schema) = rollup_schema(&job.schema) else {
        return Ok(Vec::new());
    };
    let source_schema = job.schema.arrow_schema();
    let mut merge = SortedMerge::open(
        &job.files,
        source_schema.clone(),
        READ_BATCH_ROWS,
        MERGE_BATCH_ROWS,
    )?;
    let tag_columns: Vec<usize> = source_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| *f.data_type() == tag_data_type())
        .map(|(i, _)| i)
        .collect();
    let tag_converter = if tag_columns.is_empty() {
        None
    } else {
        Some(RowConverter::new(
            tag_columns
                .iter()
                .map(|&i| SortField::new(source_schema.field(i).data_type().clone()))
                .collect(),
        )?)
    };
    let mut aggregators = job
        .resolutions
        .iter()
        .map(|&res| {
            Aggregator::create(
                res,
                job,
                &out_schema,
                &source_schema,
                &tag_columns,
                root,
                shard_id,
                build,
                row_group_rows,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let time_index = source_schema
        .index_of(TIME_COLUMN)
        .map_err(|e| CollectorError::Server(format!("rollup source schema: {e}")))?;
    let outcome = (|| -> Result<()> {
        while let Some(batch) = merge.next_batch()? {
            let times = batch
                .column(time_index)
                .as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>()
                .ok_or_else(|| CollectorError::Server("time column is not nanoseconds".into()))?
                .clone();
            let tag_rows = match &tag_converter {
                Some(c) => Some(
                    c.convert_columns(
                        &tag_columns
                            .iter()
                            .map(|&i| batch.column(i).clone())
                            .collect::<Vec<_>>(),
                    )?,
                ),
                None => None,
            };
            for agg in &mut aggregators {
                agg.feed(&batch, &times, tag_rows.as_ref())?;
            }
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        for agg in &aggregators {
            let _ = std::fs::remove_file(&agg.tmp);
        }
        return Err(e);
    }
    let mut built = Vec::new();
    let mut pending = aggregators.into_iter();
    for agg in pending.by_ref() {
        let tmp = agg.tmp.clone();
        match agg.finish(job, &out_schema) {
            Ok(b) => built.push(b),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                for rest in pending {
                    let _ = std::fs::remove_file(&rest.tmp);
                }
                for b in &built {
                    let _ = std::fs::remove_file(temp_path(&b.file.path));
                }
                return Err(e);
            }
        }
    }
    // Every output is complete and fsynced: rename them (a crash in between leaves one resolution at its old
    // build, which the next pass sees as stale and rebuilds).
    for b in &built {
        let tmp = temp_path(&b.file.path);
        std::fs::rename(&tmp, &b.file.path).map_err(|e| CollectorError::io(&b.file.path, e))?;
        if let Some(dir) = b.file.path.parent() {
            sync_dir(dir)?;
        }
    }
    Ok(built)
}

/// Running statistics of one field in one group.
#[derive(Debug, Clone, Copy)]
enum Acc {
    F64 {
        min: f64,
        max: f64,
        sum: f64,
        count: i64,
        last: f64,
    },
    I64 {
        min: i64,
        max: i64,
        sum: i128,
        count: i64,
        last: i64,
    },
    U64 {
        min: u64,
        max: u64,
        sum: i128,
        count: i64,
        last: u64,
    },
}

impl Acc {
    fn new(t: FieldType) -> Acc {
        match t {
            FieldType::I64 => Acc::I64 {
                min: i64::MAX,
                max: i64::MIN,
                sum: 0,
                count: 0,
                last: 0,
            },
            FieldType::U64 => Acc::U64 {
                min: u64::MAX,
                max: 0,
                sum: 0,
                count: 0,
                last: 0,
            },
            _ => Acc::F64 {
                min: f64::NAN,
                max: f64::NAN,
                sum: 0.0,
                count: 0,
                last: 0.0,
            },
        }
    }

    fn count(&self) -> i64 {
        match self {
            Acc::F64 { count, .. } | Acc::I64 { count, .. } | Acc::U64 { count, .. } => *count,
        }
    }
}

/// A field column of the source batch, typed.
enum Values<'a> {
    F64(&'a Float64Array),
    I64(&'a Int64Array),
    U64(&'a UInt64Array),
}

impl Values<'_> {
    /// Rows arrive in time order within a series, so `last` is simply the latest non-null value seen.
    fn update(&self, acc: &mut Acc, row: usize) {
        match (self, acc) {
            (
                Values::F64(a),
                Acc::F64 {
                    min,
                    max,
                    sum,
                    count,
                    last,
                },
            ) if a.is_valid(row) => {
                let v = a.value(row);
                // f64::min/max skip NaN, and NaN seeds make the first value win.
                *min = min.min(v);
                *max = max.max(v);
                *sum += v;
                *count += 1;
                *last = v;
            }
            (
                Values::I64(a),
                Acc::I64 {
                    min,
                    max,
                    sum,
                    count,
                    last,
                },
            ) if a.is_valid(row) => {
                let v = a.value(row);
                *min = (*min).min(v);
                *max = (*max).max(v);
                *sum += i128::from(v);
                *count += 1;
                *last = v;
            }
            (
                Values::U64(a),
                Acc::U64 {
                    min,
                    max,
                    sum,
                    count,
                    last,
                },
            ) if a.is_valid(row) => {
                let v = a.value(row);
                *min = (*min).min(v);
                *max = (*max).max(v);
                *sum += i128::from(v);
                *count += 1;
                *last = v;
            }
            _ => {}
        }
    }
}

/// One group (series, bucket) being aggregated.
#[derive(Debug)]
struct Group {
    key: Option<OwnedRow>,
    bucket: i64,
    tags: Vec<Option<String>>,
    accs: Vec<Acc>,
}

/// Where an output column comes from.
#[derive(Debug, Clone, Copy)]
enum OutColumn {
    Time,
    Tag(usize),
    Stat { field: usize, stat: usize },
}

/// Streams the groups of one resolution into its file.
struct Aggregator {
    resolution: Resolution,
    width: i64,
    out: SchemaRef,
    columns: Vec<OutColumn>,
    /// Source column indices of the tags (in group `tags` order) and of the rolled-up fields.
    tag_columns: Vec<usize>,
    fields: Vec<(usize, FieldType)>,
    current: Option<Group>,
    done: Vec<Group>,
    writer: ArrowWriter<File>,
    path: PathBuf,
    tmp: PathBuf,
    rows: u64,
    min_time: i64,
    max_time: i64,
}

impl Aggregator {
    #[allow(clippy::too_many_arguments)]
    fn create(
        resolution: Resolution,
        job: &RollupJob,
        out_schema: &TableSchema,
        source: &SchemaRef,
        tag_columns: &[usize],
        root: &Path,
        shard_id: &str,
        build: u64,
        row_group_rows: usize,
    ) -> Result<Aggregator> {
        let out = out_schema.arrow_schema();
        let mut fields: Vec<(usize, FieldType)> = Vec::new();
        let mut columns = Vec::with_capacity(out.fields().len());
        for f in out.fields() {
            let name = f.name().as_str();
            if name == TIME_COLUMN {
                columns.push(OutColumn::Time);
                continue;
            }
            if let Some(t) = tag_columns
                .iter()
                .position(|&i| source.field(i).name() == name)
            {
                columns.push(OutColumn::Tag(t));
                continue;
            }
            // `<field>_<stat>`: the stat is the part after the last underscore.
            let (field_name, stat) = name
                .rsplit_once('_')
                .and_then(|(f, s)| STATS.iter().position(|x| *x == s).map(|s| (f, s)))
                .ok_or_else(|| {
                    CollectorError::Server(format!("unexpected rollup column {name}"))
                })?;
            let src = source
                .index_of(field_name)
                .map_err(|e| CollectorError::Server(format!("rollup column {name}: {e}")))?;
            let t = FieldType::from_data_type(source.field(src).data_type()).ok_or_else(|| {
                CollectorError::Server(format!("rollup column {name}: not numeric"))
            })?;
            let field = match fields.iter().position(|(i, _)| *i == src) {
                Some(p) => p,
                None => {
                    fields.push((src, t));
                    fields.len() - 1
                }
            };
            columns.push(OutColumn::Stat { field, stat });
        }
        let dir = persist::partition_dir(&root.join(resolution.dir_name()), &job.table, job.hour);
        std::fs::create_dir_all(&dir).map_err(|e| CollectorError::io(&dir, e))?;
        let path = dir.join(format!("{shard_id}-{build:020}.parquet"));
        let tmp = temp_path(&path);
        let kv = vec![
            KeyValue::new(
                persist::META_WAL_SEQ.to_string(),
                job.source.wal_seq.to_string(),
            ),
            KeyValue::new(
                META_RESOLUTION.to_string(),
                resolution.dir_name().to_string(),
            ),
            KeyValue::new(META_SOURCE_FILES.to_string(), job.source.files.to_string()),
            KeyValue::new(META_SOURCE_ROWS.to_string(), job.source.rows.to_string()),
        ];
        let props = persist::writer_properties(&out, row_group_rows, kv);
        let file = File::create(&tmp).map_err(|e| CollectorError::io(&tmp, e))?;
        let writer = ArrowWriter::try_new(file, out.clone(), Some(props)).map_err(|e| {
            CollectorError::Parquet {
                path: tmp.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(Aggregator {
            resolution,
            width: resolution.width_nanos(),
            out,
            columns,
            tag_columns: tag_columns.to_vec(),
            fields,
            current: None,
            done: Vec::new(),
            writer,
            path,
            tmp,
            rows: 0,
            min_time: i64::MAX,
            max_time: i64::MIN,
        })
    }

    fn feed(
        &mut self,
        batch: &RecordBatch,
        times: &TimestampNanosecondArray,
        tag_rows: Option<&Rows>,
    ) -> Result<()> {
        let values: Vec<Values<'_>> = self
            .fields
            .iter()
            .map(|(i, t)| {
                let c = batch.column(*i);
                let v = match t {
                    FieldType::F64 => c.as_primitive_opt::<Float64Type>().map(Values::F64),
                    FieldType::I64 => c.as_primitive_opt::<Int64Type>().map(Values::I64),
                    FieldType::U64 => c.as_primitive_opt::<UInt64Type>().map(Values::U64),
                    _ => None,
                };
                v.ok_or_else(|| {
                    CollectorError::Server(format!("column {i} has an unexpected type"))
                })
            })
            .collect::<Result<_>>()?;
        for row in 0..batch.num_rows() {
            let bucket = times.value(row).div_euclid(self.width) * self.width;
            let same = self.current.as_ref().is_some_and(|g| {
                g.bucket == bucket
                    && match (&g.key, tag_rows) {
                        (Some(k), Some(rows)) => k.row() == rows.row(row),
                        _ => true,
                    }
            });
            if !same {
                let group = Group {
                    key: tag_rows.map(|r| r.row(row).owned()),
                    bucket,
                    tags: self
                        .tag_columns
                        .iter()
                        .map(|&i| tag_value(batch.column(i), row))
                        .collect(),
                    accs: self.fields.iter().map(|(_, t)| Acc::new(*t)).collect(),
                };
                if let Some(done) = self.current.replace(group) {
                    self.done.push(done);
                    if self.done.len() >= WRITE_BATCH_GROUPS {
                        self.write_done()?;
                    }
                }
            }
            if let Some(group) = &mut self.current {
                for (acc, v) in group.accs.iter_mut().zip(&values) {
                    v.update(acc, row);
                }
            }
        }
        Ok(())
    }

    /// Writes the finished groups as one batch.
    fn write_done(&mut self) -> Result<()> {
        if self.done.is_empty() {
            return Ok(());
        }
        let groups = std::mem::take(&mut self.done);
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            let array: ArrayRef = match *column {
                OutColumn::Time => Arc::new(
                    TimestampNanosecondArray::from_iter_values(groups.iter().map(|g| g.bucket))
                        .with_timezone("UTC"),
                ),
                OutColumn::Tag(t) => {
                    let mut b = StringDictionaryBuilder::<Int32Type>::new();
                    for g in &groups {
                        match &g.tags[t] {
                            Some(v) => {
                                b.append(v)?;
                            }
                            None => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                OutColumn::Stat { field, stat } => stat_array(&groups, field, STATS[stat]),
            };
            columns.push(array);
        }
        for g in &groups {
            self.min_time = self.min_time.min(g.bucket);
            self.max_time = self.max_time.max(g.bucket);
        }
        self.rows += groups.len() as u64;
        let batch = RecordBatch::try_new(self.out.clone(), columns)?;
        self.writer
            .write(&batch)
            .map_err(|e| CollectorError::Parquet {
                path: self.tmp.clone(),
                message: e.to_string(),
            })
    }

    fn finish(mut self, job: &RollupJob, schema: &TableSchema) -> Result<BuiltRollup> {
        if let Some(g) = self.current.take() {
            self.done.push(g);
        }
        self.write_done()?;
        if self.rows == 0 {
            // Nothing to roll up (cannot happen for a non-empty partition): an empty, valid file.
            self.min_time = job.hour * Resolution::Hour.width_nanos();
            self.max_time = self.min_time;
        }
        self.writer.append_key_value_metadata(KeyValue::new(
            persist::META_MIN_TIME.to_string(),
            self.min_time.to_string(),
        ));
        self.writer.append_key_value_metadata(KeyValue::new(
            persist::META_MAX_TIME.to_string(),
            self.max_time.to_string(),
        ));
        let parquet_err = |e: parquet::errors::ParquetError| CollectorError::Parquet {
            path: self.tmp.clone(),
            message: e.to_string(),
        };
        let file = self.writer.into_inner().map_err(parquet_err)?;
        file.sync_all()
            .map_err(|e| CollectorError::io(&self.tmp, e))?;
        let bytes = file
            .metadata()
            .map_err(|e| CollectorError::io(&self.tmp, e))?
            .len();
        Ok(BuiltRollup {
            resolution: self.resolution,
            file: ParquetFile {
                path: self.path,
                table: job.table.clone(),
                hour: job.hour,
                wal_seq: job.source.wal_seq,
                rows: self.rows,
                min_time: self.min_time,
                max_time: self.max_time,
                bytes,
            },
            schema: schema.clone(),
            source: job.source,
        })
    }
}

fn tag_value(column: &ArrayRef, row: usize) -> Option<String> {
    if column.is_null(row) {
        return None;
    }
    let dict = column.as_dictionary_opt::<Int32Type>()?;
    let key = usize::try_from(dict.keys().value(row)).ok()?;
    let values = dict.values().as_string_opt::<i32>()?;
    (key < values.len() && values.is_valid(key)).then(|| values.value(key).to_string())
}

/// One statistic of one field over the groups, as an array of the rollup column's type.
fn stat_array(groups: &[Group], field: usize, stat: &str) -> ArrayRef {
    let accs = groups.iter().map(|g| g.accs[field]);
    match (groups.first().map(|g| g.accs[field]), stat) {
        (_, "count") => Arc::new(Int64Array::from_iter_values(accs.map(|a| a.count()))),
        (Some(Acc::I64 { .. }), _) => Arc::new(Int64Array::from_iter(accs.map(|a| match a {
            Acc::I64 {
                min,
                max,
                sum,
                count,
                last,
            } if count > 0 => match stat {
                "min" => Some(min),
                "max" => Some(max),
                "sum" => i64::try_from(sum).ok(),
                _ => Some(last),
            },
            _ => None,
        }))),
        (Some(Acc::U64 { .. }), _) => Arc::new(UInt64Array::from_iter(accs.map(|a| match a {
            Acc::U64 {
                min,
                max,
                sum,
                count,
                last,
            } if count > 0 => match stat {
                "min" => Some(min),
                "max" => Some(max),
                "sum" => u64::try_from(sum).ok(),
                _ => Some(last),
            },
            _ => None,
        }))),
        _ => Arc::new(Float64Array::from_iter(accs.map(|a| match a {
            Acc::F64 {
                min,
                max,
                sum,
                count,
                last,
            } if count > 0 => match stat {
                "min" => Some(min),
                "max" => Some(max),
                "sum" => Some(sum),
                _ => Some(last),
            },
            _ => None,
        }))),
    }
}

/// Start-up: indexes the rollup files under `root`, removing leftovers (`*.tmp`) and builds superseded by a
/// newer one in the same partition directory (a rebuild whose old file was not deleted yet).
pub fn scan(root: &Path) -> Result<Rollups> {
    let mut rollups = Rollups::default();
    for res in Resolution::ALL {
        let base = root.join(res.dir_name());
        if !base.exists() {
            continue;
        }
        for table_entry in std::fs::read_dir(&base).map_err(|e| CollectorError::io(&base, e))? {
            let table_entry = table_entry.map_err(|e| CollectorError::io(&base, e))?;
            let Some(table) = table_entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let mut stack = vec![table_entry.path()];
            while let Some(dir) = stack.pop() {
                if !dir.is_dir() {
                    continue;
                }
                let mut builds: Vec<(u64, PathBuf)> = Vec::new();
                for entry in std::fs::read_dir(&dir).map_err(|e| CollectorError::io(&dir, e))? {
                    let entry = entry.map_err(|e| CollectorError::io(&dir, e))?;
                    let path = entry.path();
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if path.is_dir() {
                        stack.push(path);
                    } else if name.ends_with(".tmp") {
                        tracing::info!(file = %path.display(), "removing leftover of an interrupted rollup");
                        std::fs::remove_file(&path).map_err(|e| CollectorError::io(&path, e))?;
                    } else if let Some(build) = build_number(&name) {
                        builds.push((build, path));
                    }
                }
                builds.sort();
                let Some((newest, path)) = builds.pop() else {
                    continue;
                };
                for (_, old) in builds {
                    tracing::info!(file = %old.display(), "removing a superseded rollup build");
                    std::fs::remove_file(&old).map_err(|e| CollectorError::io(&old, e))?;
                }
                rollups.next_build = rollups.next_build.max(newest + 1);
                let (file, schema, source) = read_rollup_meta(&path, &table)?;
                let set = rollups.set_mut(res);
                set.publish(BuiltRollup {
                    resolution: res,
                    file,
                    schema,
                    source,
                });
            }
        }
    }
    rollups.next_build = rollups.next_build.max(1);
    Ok(rollups)
}

/// `<shard>-<build:020>.parquet` → build.
fn build_number(name: &str) -> Option<u64> {
    name.strip_suffix(".parquet")?
        .rsplit_once('-')?
        .1
        .parse()
        .ok()
}

fn read_rollup_meta(path: &Path, table: &str) -> Result<(ParquetFile, TableSchema, SourceState)> {
    let parquet_err = |message: String| CollectorError::Parquet {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| CollectorError::io(path, e))?;
    let bytes = file
        .metadata()
        .map_err(|e| CollectorError::io(path, e))?
        .len();
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(e.to_string()))?;
    let schema = TableSchema::from_arrow(builder.schema()).map_err(parquet_err)?;
    let meta = builder.metadata().file_metadata();
    let kv = |key: &str| -> Result<i64> {
        meta.key_value_metadata()
            .and_then(|kv| kv.iter().find(|kv| kv.key == key))
            .and_then(|kv| kv.value.as_deref())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| parquet_err(format!("missing {key} metadata; not a Damselfly rollup")))
    };
    let min_time = kv(persist::META_MIN_TIME)?;
    let source = SourceState {
        wal_seq: kv(persist::META_WAL_SEQ)?.max(0) as u64,
        files: kv(META_SOURCE_FILES)?.max(0) as u64,
        rows: kv(META_SOURCE_ROWS)?.max(0) as u64,
    };
    Ok((
        ParquetFile {
            path: path.to_path_buf(),
            table: table.to_string(),
            hour: hour_of(min_time),
            wal_seq: source.wal_seq,
            rows: meta.num_rows().max(0) as u64,
            min_time,
            max_time: kv(persist::META_MAX_TIME)?,
            bytes,
        },
        schema,
        source,
    ))
}

/// Names of the rollup tables of one resolution.
pub fn table_names(store: &Store, res: Resolution) -> Vec<String> {
    store.with_state(|s| {
        s.rollups
            .set(res)
            .catalog
            .table_names()
            .map(str::to_string)
            .collect()
    })
}

/// A consistent view of one rollup table (files only: rollups cover persisted data).
pub fn snapshot(store: &Store, res: Resolution, table: &str) -> Option<TableSnapshot> {
    store.with_state(|s| {
        let set = s.rollups.set(res);
        let schema = set.catalog.table(table)?.clone();
        Some(TableSnapshot {
            schema,
            files: set.files.files(table).to_vec(),
            batches: Vec::new(),
        })
    })
}

/// The hourly rollup of `table` for the longest run of whole hours within `[first_hour, last_hour]` (inclusive;
/// `None` = unbounded) in which the rollup holds exactly the stored rows: each hour's rollup was built from the
/// partition's current files (or the hour has neither files nor rollup), and no buffered row falls in it. Returns
/// the run `[from, to)` (hours since the epoch) and a snapshot of the rollup files of those hours; `None` when no
/// such run holds a rollup file. Taken in one step, under the store's lock.
pub fn covered_hours(
    store: &Store,
    table: &str,
    first_hour: Option<i64>,
    last_hour: Option<i64>,
) -> Option<(i64, i64, TableSnapshot)> {
    store.with_state(|s| {
        // Hours holding buffered rows (active or frozen) are never covered.
        let buffered = buffered_hours(s, table);
        let set = s.rollups.set(Resolution::Hour);
        let schema = set.catalog.table(table)?.clone();
        let mut raw: BTreeMap<i64, Vec<Arc<ParquetFile>>> = BTreeMap::new();
        for f in s.files.files(table) {
            raw.entry(f.hour).or_default().push(f.clone());
        }
        let rolled: BTreeMap<i64, Arc<ParquetFile>> = set
            .files
            .files(table)
            .iter()
            .map(|f| (f.hour, f.clone()))
            .collect();
        let lo = first_hour.or_else(|| raw.keys().chain(rolled.keys()).min().copied())?;
        let hi = last_hour.or_else(|| raw.keys().chain(rolled.keys()).max().copied())?;
        let covered = |hour: i64| {
            if buffered.is_some_and(|(a, b)| a <= hour && hour <= b) {
                return false;
            }
            let files = raw.get(&hour).map_or(&[][..], Vec::as_slice);
            match set.source_of(table, hour) {
                Some(source) => source == SourceState::of(files),
                None => files.is_empty(),
            }
        };
        // The longest run with at least one rollup file (bounded by the files' hours, not by the range asked).
        let hours: Vec<i64> = raw
            .keys()
            .chain(rolled.keys())
            .copied()
            .filter(|h| (lo..=hi).contains(h))
            .collect::<std::collections::BTreeSet<i64>>()
            .into_iter()
            .collect();
        let mut best: Option<(i64, i64, usize)> = None;
        let mut run: Option<(i64, i64, usize)> = None;
        let mut prev: Option<i64> = None;
        for hour in hours {
            // Buffered rows in the hours since the previous data hour end the run too.
            let gap_buffered =
                prev.is_some_and(|p| buffered.is_some_and(|(a, b)| a < hour && b > p));
            prev = Some(hour);
            if gap_buffered {
                run = None;
            }
            if !covered(hour) {
                run = None;
                continue;
            }
            // Hours between two data hours hold nothing: they keep a run going.
            let r = run.get_or_insert((hour, hour, 0));
            r.1 = hour;
            if rolled.contains_key(&hour) {
                r.2 += 1;
            }
            if r.2 > 0 && best.is_none_or(|b| r.1 - r.0 > b.1 - b.0) {
                best = Some(*r);
            }
        }
        let (from, last, _) = best?;
        // Stretch the run over the empty hours next to it, up to the range asked or the next data hour.
        let prev_data = raw
            .keys()
            .chain(rolled.keys())
            .copied()
            .chain(buffered.map(|(_, b)| b))
            .filter(|h| *h < from)
            .max();
        let next_data = raw
            .keys()
            .chain(rolled.keys())
            .copied()
            .chain(buffered.map(|(a, _)| a))
            .filter(|h| *h > last)
            .min();
        let from = match (first_hour, prev_data) {
            (Some(f), Some(p)) => f.max(p + 1),
            (Some(f), None) => f,
            (None, _) => from,
        };
        let to = match (last_hour, next_data) {
            (Some(l), Some(n)) => l.min(n - 1),
            (Some(l), None) => l,
            (None, _) => last,
        } + 1;
        let files = rolled.range(from..to).map(|(_, f)| f.clone()).collect();
        Some((
            from,
            to,
            TableSnapshot {
                schema,
                files,
                batches: Vec::new(),
            },
        ))
    })
}

/// The first and last hour of `table`'s buffered rows (active and frozen), if any.
fn buffered_hours(state: &mut crate::store::State, table: &str) -> Option<(i64, i64)> {
    let mut range: Option<(i64, i64)> = state
        .active
        .table_mut(table)
        .and_then(|t| t.time_range())
        .map(|(a, b)| (hour_of(a), hour_of(b)));
    for frozen in &state.frozen {
        for batch in frozen.tables.get(table).into_iter().flatten() {
            let Some(times) = batch
                .column_by_name(TIME_COLUMN)
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>())
            else {
                continue;
            };
            if let (Some(a), Some(b)) = (arrow::compute::min(times), arrow::compute::max(times)) {
                let (a, b) = (hour_of(a), hour_of(b));
                range = Some(range.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
            }
        }
    }
    range
}
