//! Persistence: turning buffered rows into Parquet files, and the index of files already in the store.
//!
//! Layout (documented for other engines in docs/STORAGE.md):
//! `data/<table>/date=YYYY-MM-DD/hour=HH/<shard>-<walseq:020>.parquet`. `walseq` is the last WAL sequence whose
//! rows the file includes: on start-up, WAL records at or below the highest `walseq` of a partition are not
//! replayed into that partition again, which makes replay idempotent even after a crash in the middle of a flush.
//! Rows are sorted by series (tags in name order) then time; zstd; dictionary-encoded tags with bloom filters;
//! delta-encoded time and integers. A float column whose values in a file are all exact decimals (`m / 10^s`)
//! is stored as a DECIMAL (`(9, s)` on INT32 when it fits, else `(18, s)` on INT64) with delta encoding and listed
//! in the `damselfly.decimal_floats`
//! key-value metadata; readers turn it back into the very same f64 values (see [`encode_floats`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, Float64Array, RecordBatch, TimestampNanosecondArray,
    new_null_array,
};
use arrow::compute::{cast, concat_batches, take_record_batch};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use chrono::{DateTime, Timelike};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::{KeyValue, ParquetMetaData, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::catalog::TableSchema;
use crate::error::{CollectorError, Result};
use crate::fsutil::{sync_dir, temp_path};
use crate::model::{TIME_COLUMN, tag_data_type};

const NANOS_PER_HOUR: i64 = 3_600_000_000_000;
pub const META_WAL_SEQ: &str = "damselfly.wal_seq";
pub const META_MIN_TIME: &str = "damselfly.min_time";
pub const META_MAX_TIME: &str = "damselfly.max_time";
/// File key-value metadata: a JSON array naming the f64 columns this file stores as DECIMAL.
pub const META_DECIMAL_FLOATS: &str = "damselfly.decimal_floats";

/// Precision of the decimals floats are stored as when every unscaled value has at most 9 digits: Parquet then
/// stores them as INT32, whose delta encoding packs 32-value miniblocks (INT64: 64), which saves ~0.6 bits per
/// value on random walks (benches/RESULTS.md).
pub const DECIMAL_PRECISION_INT32: u8 = 9;
/// Otherwise 18 digits, the most an INT64 holds.
pub const DECIMAL_PRECISION_INT64: u8 = 18;
/// Most digits after the point tried before a float column is left as f64.
const MAX_DECIMAL_SCALE: i8 = 9;
/// Largest unscaled decimal accepted: beyond 2^53 an i64 does not convert to f64 exactly, and the reader's
/// division would no longer be the correctly rounded quotient.
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;
/// zstd level: measured in benches/RESULTS.md (storage size); higher levels cost flush CPU for little gain.
const ZSTD_LEVEL: i32 = 3;
/// False-positive rate of the tag columns' bloom filters. The writer sizes them for `row_group_rows` distinct
/// values, then folds them down to the distinct values actually seen, so a 100-host column costs ~128 bytes.
const BLOOM_FPP: f64 = 0.01;

/// One Parquet file of the store.
#[derive(Debug, Clone)]
pub struct ParquetFile {
    pub path: PathBuf,
    pub table: String,
    /// Hours since the epoch of the file's partition.
    pub hour: i64,
    pub wal_seq: u64,
    pub rows: u64,
    pub min_time: i64,
    pub max_time: i64,
    pub bytes: u64,
}

/// Every Parquet file of the store, by table.
#[derive(Debug, Default, Clone)]
pub struct FileIndex {
    tables: BTreeMap<String, Vec<Arc<ParquetFile>>>,
}

impl FileIndex {
    pub fn add(&mut self, file: ParquetFile) {
        self.tables
            .entry(file.table.clone())
            .or_default()
            .push(Arc::new(file));
    }

    pub fn files(&self, table: &str) -> &[Arc<ParquetFile>] {
        self.tables.get(table).map_or(&[], Vec::as_slice)
    }

    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    pub fn file_count(&self) -> usize {
        self.tables.values().map(Vec::len).sum()
    }

    /// The highest WAL sequence persisted for (table, hour), 0 if none.
    pub fn persisted_seq(&self, table: &str, hour: i64) -> u64 {
        self.files(table)
            .iter()
            .filter(|f| f.hour == hour)
            .map(|f| f.wal_seq)
            .max()
            .unwrap_or(0)
    }

    /// The highest WAL sequence in any file.
    pub fn max_seq(&self) -> u64 {
        self.tables
            .values()
            .flatten()
            .map(|f| f.wal_seq)
            .max()
            .unwrap_or(0)
    }

    /// Removes these files of `table` (maintenance: compaction inputs, expired partitions); returns how many
    /// were indexed. Callers swap files under the state lock, so a query sees the old set or the new one.
    pub fn remove_paths(&mut self, table: &str, paths: &[PathBuf]) -> usize {
        let Some(files) = self.tables.get_mut(table) else {
            return 0;
        };
        let before = files.len();
        files.retain(|f| !paths.contains(&f.path));
        let removed = before - files.len();
        if files.is_empty() {
            self.tables.remove(table);
        }
        removed
    }
}

/// The partition hour of a timestamp.
pub fn hour_of(time_nanos: i64) -> i64 {
    time_nanos.div_euclid(NANOS_PER_HOUR)
}

/// `<tables_dir>/<table>/date=YYYY-MM-DD/hour=HH` (also used for the rollup tables' directories).
pub fn partition_dir(tables_dir: &Path, table: &str, hour: i64) -> PathBuf {
    let secs = hour * 3600;
    let (date, hh) = match DateTime::from_timestamp(secs, 0) {
        Some(dt) => (dt.format("%Y-%m-%d").to_string(), dt.hour()),
        None => ("invalid".to_string(), 0),
    };
    tables_dir
        .join(table)
        .join(format!("date={date}"))
        .join(format!("hour={hh:02}"))
}

/// Reshapes a buffer chunk to the table schema: columns in schema order, missing columns as nulls.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema() == *schema {
        return Ok(batch.clone());
    }
    let rows = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(col) if col.data_type() == field.data_type() => Ok(col.clone()),
            Some(col) => Ok(cast(col, field.data_type())?),
            None => Ok(new_null_array(field.data_type(), rows)),
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Writer settings for time-series tables, chosen per column from the *stored* Arrow schema (after
/// [`encode_floats`]): the time column, decimal-stored floats and integers are delta-encoded (sorted series make
/// their deltas small); tags are dictionary-encoded with a bloom filter (tag equality skips row groups whose
/// min/max cannot exclude the value); f64 columns that are not decimals keep dictionary encoding (falling back to
/// PLAIN): real agent floats such as CPU percentages are ratios of small counts that repeat, and measured smaller
/// that way than with BYTE_STREAM_SPLIT (benches/RESULTS.md). Page statistics and the page index are on; the sort
/// order is recorded.
pub fn writer_properties(
    schema: &SchemaRef,
    row_group_rows: usize,
    kv: Vec<KeyValue>,
) -> WriterProperties {
    let row_group_rows = row_group_rows.max(1);
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(ZSTD_LEVEL).unwrap_or_default(),
        ))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_key_value_metadata(Some(kv));
    let mut sorting = Vec::new();
    for (i, field) in schema.fields().iter().enumerate() {
        let column = ColumnPath::from(field.name().as_str());
        let delta = |b: parquet::file::properties::WriterPropertiesBuilder| {
            b.set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column.clone(), Encoding::DELTA_BINARY_PACKED)
        };
        builder = match field.data_type() {
            _ if field.name() == TIME_COLUMN => delta(builder),
            t if *t == tag_data_type() => {
                sorting.push(i);
                builder
                    .set_column_dictionary_enabled(column.clone(), true)
                    .set_column_bloom_filter_fpp(column.clone(), BLOOM_FPP)
                    .set_column_bloom_filter_max_ndv(column, row_group_rows as u64)
            }
            DataType::Decimal128(..) | DataType::Int64 | DataType::UInt64 => delta(builder),
            _ => builder,
        };
    }
    // Rows are sorted by the tags in schema (name) order, then time: recorded for engines that use it.
    if let Ok(time) = schema.index_of(TIME_COLUMN) {
        sorting.push(time);
    }
    let sorting = sorting
        .into_iter()
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: true,
        })
        .collect();
    builder.set_sorting_columns(Some(sorting)).build()
}

/// [`writer_properties`] for a file whose rows are all known (`stored`, after [`encode_floats`]): also drops the
/// bloom filters that cannot help (see [`without_useless_blooms`]) and dictionary-encodes the integer and decimal
/// columns where that is estimated smaller than delta (see [`dictionary_wins`]).
pub fn file_properties(
    stored: &RecordBatch,
    row_group_rows: usize,
    kv: Vec<KeyValue>,
) -> WriterProperties {
    let props = without_useless_blooms(
        writer_properties(&stored.schema(), row_group_rows, kv),
        stored,
    );
    let mut builder = None;
    for (field, column) in stored.schema().fields().iter().zip(stored.columns()) {
        if field.name() != TIME_COLUMN && dictionary_wins(column.as_ref()) {
            // Delta stays the fallback should the dictionary outgrow its page limit.
            let b = builder
                .take()
                .unwrap_or_else(|| props.clone().into_builder());
            builder = Some(
                b.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), true),
            );
        }
    }
    builder.map_or(props, |b| b.build())
}

/// Whether a dictionary (index bits per value plus the distinct values) is estimated smaller than
/// DELTA_BINARY_PACKED (per miniblock, the bits of its largest delta above the block's smallest) for an integer or
/// decimal column. Delta wins on counters and random walks; a dictionary on values that repeat but jump, such as
/// memory sizes in bytes (multiples of 4096, whose deltas carry 12 zero bits). Measured in benches/RESULTS.md.
fn dictionary_wins(column: &dyn Array) -> bool {
    let (values, miniblock): (Vec<i64>, usize) = match column.data_type() {
        DataType::Int64 => (
            column
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .flatten()
                .collect(),
            64,
        ),
        DataType::UInt64 => (
            column
                .as_primitive::<arrow::datatypes::UInt64Type>()
                .iter()
                .flatten()
                .map(|v| v as i64)
                .collect(),
            64,
        ),
        DataType::Decimal128(precision, _) => (
            column
                .as_primitive::<arrow::datatypes::Decimal128Type>()
                .iter()
                .flatten()
                .map(|v| v as i64)
                .collect(),
            // Parquet stores precision <= 9 as INT32, whose miniblocks hold 32 values.
            if *precision <= DECIMAL_PRECISION_INT32 {
                32
            } else {
                64
            },
        ),
        _ => return false,
    };
    if values.len() < 2 {
        return false;
    }
    let deltas: Vec<i64> = values.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    let bits = |v: u64| u64::from(64 - v.leading_zeros());
    let mut delta_bits = 0u64;
    for block in deltas.chunks(miniblock * 4) {
        let min = block.iter().copied().min().unwrap_or(0);
        for mini in block.chunks(miniblock) {
            let max = mini.iter().copied().max().unwrap_or(0);
            delta_bits += miniblock as u64 * bits(max.wrapping_sub(min) as u64);
        }
        delta_bits += 48; // the block's min delta and bit widths
    }
    // Counting distinct values stops as soon as the dictionary page alone would cost more.
    let mut distinct = std::collections::HashSet::new();
    for v in &values {
        distinct.insert(*v);
        if distinct.len() as u64 * 64 >= delta_bits {
            return false;
        }
    }
    let index_bits = bits(distinct.len().saturating_sub(1) as u64).max(1);
    values.len() as u64 * index_bits + distinct.len() as u64 * 64 < delta_bits
}

/// Drops the bloom filter of tag columns holding at most one distinct value in this file: min/max statistics
/// already answer equality exactly there, and single-valued identity tags (`ns_id`, `csp`, ...) are common in
/// small files, where the filters' bytes show (3.6 % of real agent data, benches/RESULTS.md).
fn without_useless_blooms(props: WriterProperties, batch: &RecordBatch) -> WriterProperties {
    let mut builder = None;
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if *field.data_type() != tag_data_type() {
            continue;
        }
        let Some(dict) = column
            .as_dictionary_opt::<arrow::datatypes::Int32Type>()
            .and_then(|d| d.downcast_dict::<arrow::array::StringArray>())
        else {
            continue;
        };
        let mut values = dict.into_iter().flatten();
        let single = match values.next() {
            Some(first) => values.all(|v| v == first),
            None => true,
        };
        if single {
            let b = builder
                .take()
                .unwrap_or_else(|| props.clone().into_builder());
            builder = Some(
                b.set_column_bloom_filter_enabled(ColumnPath::from(field.name().as_str()), false),
            );
        }
    }
    builder.map_or(props, |b| b.build())
}

/// Stores float columns as decimals where that is lossless: when every non-null value of a Float64 column is
/// exactly `m / 10^s` for some `s <= MAX_DECIMAL_SCALE` and `|m| <= 2^53`, the column becomes
/// `Decimal128(9, s)` (Parquet: DECIMAL on INT32) or, for larger values, `Decimal128(18, s)` (on INT64), which
/// delta-encodes to a few bits per value where the float's
/// bytes look random to zstd. The check runs the very cast kernel readers use (`arrow::compute::cast`, which
/// DataFusion's schema adapter and [`conform`] call), and compares bits, so reading the column back as Float64
/// gives every value bit for bit (-0.0, NaN and infinities keep a column f64). Returns the stored batch and the
/// names of the converted columns.
pub fn encode_floats(batch: &RecordBatch) -> Result<(RecordBatch, Vec<String>)> {
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut converted = Vec::new();
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let decimal = match column.as_primitive_opt::<Float64Type>() {
            Some(values) => as_decimal(values)?,
            None => None,
        };
        match decimal {
            Some(decimal) => {
                fields.push(Arc::new(Field::new(
                    field.name(),
                    decimal.data_type().clone(),
                    field.is_nullable(),
                )));
                columns.push(Arc::new(decimal) as ArrayRef);
                converted.push(field.name().clone());
            }
            None => {
                fields.push(field.clone());
                columns.push(column.clone());
            }
        }
    }
    if converted.is_empty() {
        return Ok((batch.clone(), converted));
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    Ok((RecordBatch::try_new(schema, columns)?, converted))
}

/// The column as `Decimal128(9 or 18, s)` if that round-trips exactly through the Decimal -> Float64 cast.
fn as_decimal(values: &Float64Array) -> Result<Option<Decimal128Array>> {
    let Some(scale) = decimal_scale(values) else {
        return Ok(None);
    };
    let pow = 10f64.powi(i32::from(scale));
    let largest = (0..values.len())
        .filter(|i| values.is_valid(*i))
        .map(|i| (values.value(i) * pow).round().abs())
        .fold(0.0, f64::max);
    let precision = if largest < 1e9 {
        DECIMAL_PRECISION_INT32
    } else {
        DECIMAL_PRECISION_INT64
    };
    // Null slots hold whatever the builder left there; `as` saturates, so no value can panic here.
    let decimal = values
        .unary::<_, arrow::datatypes::Decimal128Type>(|v| (v * pow).round() as i128)
        .with_precision_and_scale(precision, scale)?;
    let back = cast(&decimal, &DataType::Float64)?;
    let back = back.as_primitive::<Float64Type>();
    let exact = (0..values.len())
        .all(|i| values.is_null(i) || values.value(i).to_bits() == back.value(i).to_bits());
    if !exact {
        // The scalar search below mirrors the kernel, so this should not happen; if a future kernel rounds
        // differently, the column simply stays f64.
        tracing::debug!(scale, "decimal candidate did not round-trip; keeping f64");
        return Ok(None);
    }
    Ok(Some(decimal))
}

/// The smallest scale `s` at which every non-null value is `m / 10^s` (computed as the cast kernel does:
/// `(m as f64) / 10^s`), or `None` (no non-null value, or one that is not such a decimal). If a value is a
/// decimal at scale `s` it is one at every larger scale (`10m / 10^(s+1)` is the same quotient), so one pass that
/// only ever raises the scale finds it.
fn decimal_scale(values: &Float64Array) -> Option<i8> {
    let mut scale = 0i8;
    let mut pow = 1.0f64;
    let mut seen = false;
    for (i, &v) in values.values().iter().enumerate() {
        if values.is_null(i) {
            continue;
        }
        if !v.is_finite() {
            return None;
        }
        seen = true;
        loop {
            let m = (v * pow).round();
            if m.abs() <= MAX_EXACT_INT && ((m as i64) as f64 / pow).to_bits() == v.to_bits() {
                break;
            }
            if scale == MAX_DECIMAL_SCALE {
                return None;
            }
            scale += 1;
            pow *= 10.0;
        }
    }
    seen.then_some(scale)
}

/// The table schema of a stored file: columns listed in `damselfly.decimal_floats` are f64 columns.
fn table_schema_of_file(schema: &Schema, decimal_floats: &[String]) -> Schema {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Decimal128(..) if decimal_floats.contains(f.name()) => {
                Arc::new(Field::new(f.name(), DataType::Float64, f.is_nullable()))
            }
            _ => f.clone(),
        })
        .collect();
    Schema::new(fields)
}

/// Writes one table's buffered chunks as Parquet, one file per hour partition. Files appear atomically
/// (temp name, fsync, rename, fsync dir).
pub fn write_table(
    tables_dir: &Path,
    shard_id: &str,
    table: &str,
    table_schema: &TableSchema,
    chunks: &[RecordBatch],
    wal_seq: u64,
    row_group_rows: usize,
) -> Result<Vec<ParquetFile>> {
    let schema = table_schema.arrow_schema();
    let conformed = chunks
        .iter()
        .map(|c| conform(c, &schema))
        .collect::<Result<Vec<_>>>()?;
    let all = concat_batches(&schema, &conformed)?;
    if all.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let sorted = sort_for_storage(&all)?;
    let times = time_column(&sorted)?;
    let mut parts = Vec::new();
    let mut start = 0usize;
    while start < sorted.num_rows() {
        let hour = hour_of(times.value(start));
        let mut end = start + 1;
        while end < sorted.num_rows() && hour_of(times.value(end)) == hour {
            end += 1;
        }
        parts.push((hour, sorted.slice(start, end - start)));
        start = end;
    }
    // Hour partitions are independent files: encode them on several threads (a flush after a backlog or of
    // late data spans several hours), at most one per core, in partition order.
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(parts.len());
    let write = |(hour, part): &(i64, RecordBatch)| {
        write_file(
            tables_dir,
            shard_id,
            table,
            *hour,
            part,
            wal_seq,
            row_group_rows,
        )
    };
    if threads <= 1 {
        return parts.iter().map(write).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<ParquetFile>>> = (0..parts.len()).map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(part) = parts.get(i) else { break };
                    let result = write(part);
                    done.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(CollectorError::Wal(
                    "internal error: a partition was not written".into(),
                ))
            })
        })
        .collect()
}

fn time_column(batch: &RecordBatch) -> Result<&TimestampNanosecondArray> {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .ok_or_else(|| CollectorError::Wal("first column is not the nanosecond time column".into()))
}

/// Sorts by (hour, tags in schema order, time) so each hour is contiguous and, within it, rows are ordered by
/// series then time: runs of one series compress and prune well.
fn sort_for_storage(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    let times = time_column(batch)?.values();
    let n = batch.num_rows();
    let mut tag_columns = Vec::new();
    let mut tag_fields = Vec::new();
    for (i, field) in schema.fields().iter().enumerate() {
        if *field.data_type() == tag_data_type() {
            tag_columns.push(batch.column(i).clone());
            tag_fields.push(SortField::new(field.data_type().clone()));
        }
    }
    // Rank the series instead of comparing every row's tags: the tags are turned into comparable rows once, each
    // distinct series is found by hashing, and only the distinct ones (thousands, not millions) are sorted. The rows
    // are then sorted by plain integers (hour, series rank, time): the same order as comparing the tags row by row.
    let series_rank: Vec<u32> = if tag_columns.is_empty() {
        vec![0; n]
    } else {
        let converter = RowConverter::new(tag_fields)?;
        let rows = converter.convert_columns(&tag_columns)?;
        let mut ids = ahash::AHashMap::with_capacity(1024);
        let mut distinct = Vec::new();
        let series_of_row: Vec<u32> = (0..n)
            .map(|i| {
                let row = rows.row(i);
                *ids.entry(row).or_insert_with(|| {
                    distinct.push(row);
                    (distinct.len() - 1) as u32
                })
            })
            .collect();
        let mut order: Vec<u32> = (0..distinct.len() as u32).collect();
        order.sort_unstable_by(|a, b| distinct[*a as usize].cmp(&distinct[*b as usize]));
        let mut rank = vec![0u32; distinct.len()];
        for (r, d) in order.iter().enumerate() {
            rank[*d as usize] = r as u32;
        }
        series_of_row.iter().map(|d| rank[*d as usize]).collect()
    };
    let mut keys: Vec<(i64, u32, i64, u32)> = (0..n)
        .map(|i| (hour_of(times[i]), series_rank[i], times[i], i as u32))
        .collect();
    keys.sort_unstable();
    let indices = arrow::array::UInt32Array::from_iter_values(keys.iter().map(|k| k.3));
    Ok(take_record_batch(batch, &indices)?)
}

fn write_file(
    tables_dir: &Path,
    shard_id: &str,
    table: &str,
    hour: i64,
    batch: &RecordBatch,
    wal_seq: u64,
    row_group_rows: usize,
) -> Result<ParquetFile> {
    let dir = partition_dir(tables_dir, table, hour);
    std::fs::create_dir_all(&dir).map_err(|e| CollectorError::io(&dir, e))?;
    let path = dir.join(format!("{shard_id}-{wal_seq:020}.parquet"));
    let tmp = temp_path(&path);
    let times = time_column(batch)?;
    let (min_time, max_time) = times
        .values()
        .iter()
        .fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
    let (stored, decimal_floats) = encode_floats(batch)?;
    let mut kv = vec![
        KeyValue::new(META_WAL_SEQ.to_string(), wal_seq.to_string()),
        KeyValue::new(META_MIN_TIME.to_string(), min_time.to_string()),
        KeyValue::new(META_MAX_TIME.to_string(), max_time.to_string()),
    ];
    if !decimal_floats.is_empty() {
        let names =
            serde_json::to_string(&decimal_floats).map_err(|e| CollectorError::Parquet {
                path: tmp.clone(),
                message: format!("encoding {META_DECIMAL_FLOATS}: {e}"),
            })?;
        kv.push(KeyValue::new(META_DECIMAL_FLOATS.to_string(), names));
    }
    let props = file_properties(&stored, row_group_rows, kv);
    let parquet_err = |e: parquet::errors::ParquetError| CollectorError::Parquet {
        path: tmp.clone(),
        message: e.to_string(),
    };
    let file = File::create(&tmp).map_err(|e| CollectorError::io(&tmp, e))?;
    let mut writer =
        ArrowWriter::try_new(file, stored.schema(), Some(props)).map_err(parquet_err)?;
    writer.write(&stored).map_err(parquet_err)?;
    let file = writer.into_inner().map_err(parquet_err)?;
    file.sync_all().map_err(|e| CollectorError::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| CollectorError::io(&path, e))?;
    sync_dir(&dir)?;
    let bytes = std::fs::metadata(&path)
        .map_err(|e| CollectorError::io(&path, e))?
        .len();
    Ok(ParquetFile {
        path,
        table: table.to_string(),
        hour,
        wal_seq,
        rows: batch.num_rows() as u64,
        min_time,
        max_time,
        bytes,
    })
}

/// Reads one file's footer: its table schema and index entry.
pub fn read_file_meta(path: &Path, table: &str) -> Result<(ParquetFile, TableSchema)> {
    let parquet_err = |e: parquet::errors::ParquetError| CollectorError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(|e| CollectorError::io(path, e))?;
    let bytes = file
        .metadata()
        .map_err(|e| CollectorError::io(path, e))?
        .len();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    file_meta_from_footer(path, table, bytes, builder.metadata(), builder.schema())
}

/// The index entry and table schema of a file whose footer was read elsewhere (e.g. from an object store):
/// `path` is what the entry will name, `bytes` the file's size.
pub fn file_meta_from_footer(
    path: &Path,
    table: &str,
    bytes: u64,
    metadata: &ParquetMetaData,
    arrow_schema: &Schema,
) -> Result<(ParquetFile, TableSchema)> {
    let meta = metadata.file_metadata();
    let kv_str = |key: &str| -> Option<&str> {
        meta.key_value_metadata()?
            .iter()
            .find(|kv| kv.key == key)?
            .value
            .as_deref()
    };
    let kv = |key: &str| -> Option<i64> { kv_str(key)?.parse().ok() };
    let decimal_floats: Vec<String> = match kv_str(META_DECIMAL_FLOATS) {
        Some(json) => serde_json::from_str(json).map_err(|e| CollectorError::Parquet {
            path: path.to_path_buf(),
            message: format!("bad {META_DECIMAL_FLOATS} metadata: {e}"),
        })?,
        None => Vec::new(),
    };
    let schema = TableSchema::from_arrow(&table_schema_of_file(arrow_schema, &decimal_floats))
        .map_err(|m| CollectorError::Parquet {
            path: path.to_path_buf(),
            message: m,
        })?;
    let missing = |what: &str| CollectorError::Parquet {
        path: path.to_path_buf(),
        message: format!("missing {what} metadata; not a Damselfly file"),
    };
    let wal_seq = kv(META_WAL_SEQ).ok_or_else(|| missing(META_WAL_SEQ))?;
    let min_time = kv(META_MIN_TIME).ok_or_else(|| missing(META_MIN_TIME))?;
    let max_time = kv(META_MAX_TIME).ok_or_else(|| missing(META_MAX_TIME))?;
    Ok((
        ParquetFile {
            path: path.to_path_buf(),
            table: table.to_string(),
            hour: hour_of(min_time),
            wal_seq: wal_seq.max(0) as u64,
            rows: meta.num_rows().max(0) as u64,
            min_time,
            max_time,
            bytes,
        },
        schema,
    ))
}

/// Walks the store, removes leftovers of interrupted writes (`*.tmp`), and indexes every Parquet file.
pub fn scan_store(tables_dir: &Path) -> Result<Vec<(ParquetFile, TableSchema)>> {
    let mut out = Vec::new();
    if !tables_dir.exists() {
        return Ok(out);
    }
    for table_entry in
        std::fs::read_dir(tables_dir).map_err(|e| CollectorError::io(tables_dir, e))?
    {
        let table_entry = table_entry.map_err(|e| CollectorError::io(tables_dir, e))?;
        let Some(table) = table_entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !table_entry.path().is_dir() {
            continue;
        }
        let mut stack = vec![table_entry.path()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| CollectorError::io(&dir, e))? {
                let entry = entry.map_err(|e| CollectorError::io(&dir, e))?;
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if path.is_dir() {
                    stack.push(path);
                } else if name.ends_with(".tmp") {
                    tracing::info!(file = %path.display(), "removing leftover of an interrupted write");
                    std::fs::remove_file(&path).map_err(|e| CollectorError::io(&path, e))?;
                } else if name.ends_with(".parquet") {
                    out.push(read_file_meta(&path, &table)?);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;
    use crate::catalog::Catalog;
    use damselfly_proto::v1::{Field, Point, Tag, WriteBatch, field::Value};

    #[test]
    fn writes_sorted_hour_partitions_and_reads_them_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hour0 = 1_700_000_000i64 / 3600 * 3600 * 1_000_000_000;
        let mut points = Vec::new();
        for (host, t) in [
            ("b", hour0 + 5),
            ("a", hour0 + 9),
            ("a", hour0 + 1),
            ("a", hour0 + NANOS_PER_HOUR),
        ] {
            points.push(Point {
                measurement: "cpu".into(),
                tags: vec![Tag {
                    key: "host".into(),
                    value: host.into(),
                }],
                fields: vec![Field {
                    key: "v".into(),
                    value: Some(Value::F64(1.0)),
                }],
                time_unix_nano: t,
            });
        }
        let mut batch = WriteBatch {
            chunks: Vec::new(),
            agent_id: "x".into(),
            seq: 1,
            common_tags: vec![],
            points,
        };
        crate::model::normalize(&mut batch).expect("normalize");
        let mut catalog = Catalog::default();
        catalog
            .check_batch(&batch, &mut Default::default())
            .expect("schema");
        catalog
            .add_column("cpu", "host", crate::model::ColumnKind::Tag)
            .expect("host");
        catalog
            .add_column(
                "cpu",
                "v",
                crate::model::ColumnKind::Field(crate::model::FieldType::F64),
            )
            .expect("v");
        let mut buffer = Buffer::default();
        buffer.append_batch(&batch, |_, _| true);
        let chunks = buffer.table_mut("cpu").expect("cpu").snapshot();
        let schema = catalog.table("cpu").expect("cpu");
        let files = write_table(dir.path(), "s0", "cpu", schema, &chunks, 42, 1024).expect("write");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].rows, 3);
        assert!(
            files[0]
                .path
                .to_string_lossy()
                .contains("/cpu/date=2023-11-14/hour=22/s0-")
        );
        let scanned = scan_store(dir.path()).expect("scan");
        assert_eq!(scanned.len(), 2);
        let (meta, table_schema) = read_file_meta(&files[0].path, "cpu").expect("meta");
        assert_eq!(meta.wal_seq, 42);
        assert_eq!(meta.min_time, hour0 + 1);
        assert!(table_schema.get("host").is_some());
        // Sorted by series then time.
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0].path).expect("open"))
                .expect("reader")
                .build()
                .expect("build");
        let batches: Vec<_> = reader.collect::<std::result::Result<_, _>>().expect("read");
        let times = time_column(&batches[0]).expect("time");
        assert_eq!(
            times.values().to_vec(),
            vec![hour0 + 1, hour0 + 9, hour0 + 5]
        );
    }

    fn floats(values: &[Option<f64>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
            "v",
            DataType::Float64,
            true,
        )]));
        let column = Arc::new(Float64Array::from(values.to_vec())) as ArrayRef;
        RecordBatch::try_new(schema, vec![column]).expect("batch")
    }

    fn stored_type(values: &[Option<f64>]) -> DataType {
        let (stored, _) = encode_floats(&floats(values)).expect("encode");
        stored.schema().field(0).data_type().clone()
    }

    #[test]
    fn floats_become_decimals_only_when_exact() {
        assert_eq!(
            stored_type(&[Some(94.82), None, Some(-0.07), Some(100.0)]),
            DataType::Decimal128(9, 2)
        );
        assert_eq!(
            stored_type(&[Some(3.0), Some(-7e12)]),
            DataType::Decimal128(18, 0)
        );
        assert_eq!(
            stored_type(&[Some(3.0), Some(-999_999_999.0)]),
            DataType::Decimal128(9, 0)
        );
        assert_eq!(
            stored_type(&[Some(0.1), Some(0.000_000_001)]),
            DataType::Decimal128(9, 9)
        );
        assert_eq!(
            stored_type(&[Some(1.5), Some(0.000_000_001)]),
            DataType::Decimal128(18, 9)
        );
        // Not short decimals, or not representable as one: the column stays f64.
        for values in [
            vec![Some(1.0 / 3.0)],
            vec![Some(1.0), Some(f64::NAN)],
            vec![Some(f64::INFINITY)],
            vec![Some(-0.0), Some(1.5)],
            vec![Some(1e-10)],
            vec![Some(2f64.powi(60))],
            vec![None, None],
        ] {
            assert_eq!(stored_type(&values), DataType::Float64, "{values:?}");
        }
        // Every value comes back bit for bit through the cast readers use.
        let values: Vec<Option<f64>> = (-5000..5000)
            .map(|i| (i % 17 != 0).then(|| f64::from(i) / 100.0))
            .collect();
        let (stored, names) = encode_floats(&floats(&values)).expect("encode");
        assert_eq!(names, vec!["v".to_string()]);
        let back = cast(stored.column(0), &DataType::Float64).expect("cast");
        let back = back.as_primitive::<Float64Type>();
        for (i, want) in values.iter().enumerate() {
            match want {
                Some(v) => assert_eq!(back.value(i).to_bits(), v.to_bits(), "{v}"),
                None => assert!(back.is_null(i)),
            }
        }
    }

    #[test]
    fn dictionary_only_where_it_is_estimated_smaller_than_delta() {
        use arrow::array::{Int64Array as I64, UInt64Array as U64};
        // A counter: small, varied deltas.
        let counter = U64::from_iter_values((0..4096u64).map(|i| i * 1000 + (i * 7919) % 613));
        assert!(!dictionary_wins(&counter));
        // Memory in bytes: a few values that repeat, far apart, multiples of 4096.
        let memory = I64::from_iter_values(
            (0..4096i64).map(|i| (1 << 30) + ((i * 7919) % 13) * 4096 * 1000),
        );
        assert!(dictionary_wins(&memory));
        // Too short to matter, or not an integer column.
        assert!(!dictionary_wins(&I64::from(vec![5])));
        assert!(!dictionary_wins(&Float64Array::from(vec![1.0, 1.0, 1.0])));
    }

    /// Delta encoding wraps around: extreme integers (u64 above i64::MAX, i64::MIN next to i64::MAX) survive.
    #[test]
    fn delta_encoded_integers_round_trip_at_the_extremes() {
        use arrow::array::{Int64Array as I64, UInt64Array as U64};
        let schema = Arc::new(Schema::new(vec![
            arrow::datatypes::Field::new("i", DataType::Int64, true),
            arrow::datatypes::Field::new("u", DataType::UInt64, true),
        ]));
        let i = I64::from(vec![
            Some(i64::MIN),
            Some(i64::MAX),
            None,
            Some(0),
            Some(i64::MIN),
        ]);
        let u = U64::from(vec![
            Some(u64::MAX),
            Some(0),
            Some(1 << 63),
            None,
            Some(u64::MAX),
        ]);
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(i), Arc::new(u)]).expect("batch");
        let mut out = Vec::new();
        let props = writer_properties(&schema, 1024, Vec::new());
        let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props)).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let read: Vec<RecordBatch> =
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(out))
                .expect("reader")
                .build()
                .expect("build")
                .collect::<std::result::Result<_, _>>()
                .expect("read");
        assert_eq!(read, vec![batch]);
    }

    #[test]
    fn decimal_stored_floats_are_f64_columns_of_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut catalog = Catalog::default();
        catalog
            .add_column(
                "m",
                "v",
                crate::model::ColumnKind::Field(crate::model::FieldType::F64),
            )
            .expect("v");
        let schema = catalog.table("m").expect("m");
        let time = TimestampNanosecondArray::from(vec![1_000, 2_000]).with_timezone("UTC");
        let chunk = RecordBatch::try_new(
            schema.arrow_schema(),
            vec![
                Arc::new(time) as ArrayRef,
                Arc::new(Float64Array::from(vec![1.25, 2.5])) as ArrayRef,
            ],
        )
        .expect("chunk");
        let files = write_table(dir.path(), "s0", "m", schema, &[chunk], 1, 1024).expect("write");
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0].path).expect("open"))
                .expect("reader");
        assert_eq!(
            builder.schema().field(1).data_type(),
            &DataType::Decimal128(9, 2)
        );
        let (_, table_schema) = read_file_meta(&files[0].path, "m").expect("meta");
        assert_eq!(
            table_schema.get("v"),
            Some(crate::model::ColumnKind::Field(
                crate::model::FieldType::F64
            ))
        );
    }
}
