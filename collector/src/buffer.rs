//! The in-memory write buffer: rows appended per table into Arrow builders, readable at any time as Arrow record
//! batches (queries see rows as soon as they are acknowledged).
//!
//! Each table keeps sealed chunks (immutable record batches) plus open builders. A snapshot seals the open
//! builders into a new chunk, so every row is converted to Arrow once, however many queries read it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, BooleanBuilder, DictionaryArray, Float64Array, Float64Builder,
    Int32Array, Int64Array, Int64Builder, StringArray, StringBuilder, StringDictionaryBuilder,
    TimestampNanosecondArray, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field as ArrowField, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use damselfly_proto::columnar::{chunk_rows, is_present, series_of};
use damselfly_proto::v1::{FieldColumn, TableChunk, WriteBatch};

use crate::model::{FieldType, TIME_COLUMN, chunk_common_tags, tag_data_type, time_data_type};

/// Chunks with at least this many rows become record batches of their own (no per-row builder work); smaller ones
/// are appended to the table's open builders so that many tiny agent batches do not become many tiny Arrow batches.
const DIRECT_CHUNK_ROWS: usize = 256;

/// A column under construction. Shorter than the table's row count means "null for the missing rows".
enum ColumnBuilder {
    Tag(StringDictionaryBuilder<Int32Type>),
    F64(Float64Builder),
    I64(Int64Builder),
    U64(UInt64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
}

impl ColumnBuilder {
    /// Appends a tag value `count` times with one dictionary lookup (tag builders only; the tag map never holds
    /// anything else). A full dictionary (2^31 distinct values in one buffer chunk) stores nulls instead of panicking.
    fn append_tag(&mut self, value: &str, count: usize) {
        let len = self.len();
        let appended = match self {
            ColumnBuilder::Tag(b) => b.append_n(value, count).is_ok(),
            _ => false,
        };
        if !appended {
            self.pad_to(len + count);
        }
    }

    fn for_type(field_type: FieldType) -> ColumnBuilder {
        match field_type {
            FieldType::F64 => ColumnBuilder::F64(Float64Builder::new()),
            FieldType::I64 => ColumnBuilder::I64(Int64Builder::new()),
            FieldType::U64 => ColumnBuilder::U64(UInt64Builder::new()),
            FieldType::Bool => ColumnBuilder::Bool(BooleanBuilder::new()),
            FieldType::Str => ColumnBuilder::Str(StringBuilder::new()),
        }
    }

    fn len(&self) -> usize {
        use arrow::array::ArrayBuilder;
        match self {
            ColumnBuilder::Tag(b) => b.len(),
            ColumnBuilder::F64(b) => b.len(),
            ColumnBuilder::I64(b) => b.len(),
            ColumnBuilder::U64(b) => b.len(),
            ColumnBuilder::Bool(b) => b.len(),
            ColumnBuilder::Str(b) => b.len(),
        }
    }

    fn pad_to(&mut self, rows: usize) {
        let missing = rows.saturating_sub(self.len());
        if missing == 0 {
            return;
        }
        match self {
            ColumnBuilder::Tag(b) => {
                for _ in 0..missing {
                    b.append_null();
                }
            }
            ColumnBuilder::F64(b) => b.append_nulls(missing),
            ColumnBuilder::I64(b) => b.append_nulls(missing),
            ColumnBuilder::U64(b) => b.append_nulls(missing),
            ColumnBuilder::Bool(b) => b.append_nulls(missing),
            ColumnBuilder::Str(b) => {
                for _ in 0..missing {
                    b.append_null();
                }
            }
        }
    }

    /// Appends the values of `column` for `rows` (value index per row, `None` = null). The catalog has already
    /// checked the type; a mismatch here is a bug, and the values are stored as nulls rather than taking the
    /// collector down. Returns the bytes added.
    fn append_column(&mut self, column: &FieldColumn, rows: &[Option<usize>]) -> usize {
        match self {
            ColumnBuilder::F64(b) if !column.f64.is_empty() => {
                rows.iter()
                    .for_each(|r| b.append_option(r.map(|i| column.f64[i])));
                rows.len() * 8
            }
            ColumnBuilder::I64(b) if !column.i64.is_empty() => {
                rows.iter()
                    .for_each(|r| b.append_option(r.map(|i| column.i64[i])));
                rows.len() * 8
            }
            ColumnBuilder::U64(b) if !column.u64.is_empty() => {
                rows.iter()
                    .for_each(|r| b.append_option(r.map(|i| column.u64[i])));
                rows.len() * 8
            }
            ColumnBuilder::Bool(b) if !column.bool.is_empty() => {
                rows.iter()
                    .for_each(|r| b.append_option(r.map(|i| column.bool[i])));
                rows.len()
            }
            ColumnBuilder::Str(b) if !column.str.is_empty() => {
                let mut bytes = 0;
                for r in rows {
                    match r {
                        Some(i) => {
                            bytes += column.str[*i].len() + 4;
                            b.append_value(&column.str[*i]);
                        }
                        None => b.append_null(),
                    }
                }
                bytes
            }
            builder => {
                tracing::error!(
                    field = %column.key,
                    "field values do not match their column type; storing nulls"
                );
                let len = builder.len();
                builder.pad_to(len + rows.len());
                0
            }
        }
    }

    fn finish(&mut self) -> (arrow::datatypes::DataType, ArrayRef) {
        match self {
            ColumnBuilder::Tag(b) => (tag_data_type(), Arc::new(b.finish())),
            ColumnBuilder::F64(b) => (arrow::datatypes::DataType::Float64, Arc::new(b.finish())),
            ColumnBuilder::I64(b) => (arrow::datatypes::DataType::Int64, Arc::new(b.finish())),
            ColumnBuilder::U64(b) => (arrow::datatypes::DataType::UInt64, Arc::new(b.finish())),
            ColumnBuilder::Bool(b) => (arrow::datatypes::DataType::Boolean, Arc::new(b.finish())),
            ColumnBuilder::Str(b) => (arrow::datatypes::DataType::Utf8, Arc::new(b.finish())),
        }
    }
}

/// One table's buffered rows.
#[derive(Default)]
pub struct TableBuffer {
    sealed: Vec<RecordBatch>,
    time: Vec<i64>,
    tags: BTreeMap<String, ColumnBuilder>,
    fields: BTreeMap<String, ColumnBuilder>,
    rows: usize,
    bytes: usize,
    min_time: Option<i64>,
    max_time: Option<i64>,
}

impl std::fmt::Debug for TableBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableBuffer")
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl TableBuffer {
    /// Rows in this table's buffer (sealed and open).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// (min, max) timestamp of the buffered rows.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        Some((self.min_time?, self.max_time?))
    }

    fn open_rows(&self) -> usize {
        self.time.len()
    }

    /// Seals the open builders into a chunk and returns all chunks. Chunks may have different columns; callers
    /// conform them to the table schema.
    pub fn snapshot(&mut self) -> Vec<RecordBatch> {
        if self.open_rows() > 0 {
            let rows = self.open_rows();
            let mut fields = vec![ArrowField::new(TIME_COLUMN, time_data_type(), false)];
            let time =
                TimestampNanosecondArray::from(std::mem::take(&mut self.time)).with_timezone("UTC");
            let mut columns: Vec<ArrayRef> = vec![Arc::new(time)];
            for (name, builder) in self.tags.iter_mut().chain(self.fields.iter_mut()) {
                builder.pad_to(rows);
                let (data_type, array) = builder.finish();
                fields.push(ArrowField::new(name, data_type, true));
                columns.push(array);
            }
            self.tags.clear();
            self.fields.clear();
            match RecordBatch::try_new(Arc::new(Schema::new(fields)), columns) {
                Ok(batch) => self.sealed.push(batch),
                Err(e) => tracing::error!(error = %e, "cannot seal buffer chunk; this is a bug"),
            }
        }
        self.sealed.clone()
    }
}

/// The whole buffer: one [`TableBuffer`] per table.
#[derive(Debug, Default)]
pub struct Buffer {
    tables: BTreeMap<String, TableBuffer>,
    rows: usize,
    bytes: usize,
}

impl Buffer {
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn table_mut(&mut self, name: &str) -> Option<&mut TableBuffer> {
        self.tables.get_mut(name)
    }

    pub fn tables_mut(&mut self) -> impl Iterator<Item = (&String, &mut TableBuffer)> {
        self.tables.iter_mut()
    }

    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// Appends every row of a validated, normalized batch (rows in chunks, see `model::normalize`) whose (table,
    /// time) passes `keep` (used by WAL replay to skip rows already in Parquet). Returns the number of rows appended.
    pub fn append_batch(&mut self, batch: &WriteBatch, keep: impl Fn(&str, i64) -> bool) -> usize {
        if !batch.points.is_empty() {
            tracing::error!(
                points = batch.points.len(),
                "batch reached the buffer without being normalized; its points are skipped (this is a bug)"
            );
        }
        let mut appended = 0;
        for chunk in &batch.chunks {
            let all = chunk_rows(chunk);
            let kept: Vec<usize> = (0..all)
                .filter(|&r| keep(&chunk.measurement, chunk.time_unix_nano[r]))
                .collect();
            if kept.is_empty() {
                continue;
            }
            let rows = (kept.len() < all).then_some(kept.as_slice());
            let table = match self.tables.get_mut(&chunk.measurement) {
                Some(t) => t,
                None => self.tables.entry(chunk.measurement.clone()).or_default(),
            };
            let before = table.bytes;
            let added = if kept.len() >= DIRECT_CHUNK_ROWS {
                table.append_chunk_as_batch(chunk, &batch.common_tags, rows)
            } else {
                table.append_chunk_rows(chunk, &batch.common_tags, &kept);
                kept.len()
            };
            for &r in &kept {
                let t = chunk.time_unix_nano[r];
                table.min_time = Some(table.min_time.map_or(t, |m| m.min(t)));
                table.max_time = Some(table.max_time.map_or(t, |m| m.max(t)));
            }
            self.rows += added;
            self.bytes += table.bytes - before;
            appended += added;
        }
        appended
    }
}

/// For each of `rows` (chunk row numbers), the index of its value in `column`'s value list, or `None` (null).
fn value_indices(column: &FieldColumn, rows: &[usize]) -> Vec<Option<usize>> {
    if column.present.is_empty() {
        return rows.iter().map(|&r| Some(r)).collect();
    }
    let mut out = Vec::with_capacity(rows.len());
    let mut next_value = 0usize;
    let mut wanted = rows.iter().peekable();
    let last = rows.last().copied().unwrap_or(0);
    for r in 0..=last {
        let present = is_present(&column.present, r);
        if wanted.peek() == Some(&&r) {
            wanted.next();
            out.push(present.then_some(next_value));
        }
        if present {
            next_value += 1;
        }
    }
    out
}

/// A dictionary tag column for `rows` of a chunk: `keys[i]` indexes `values`.
fn tag_array(values: Vec<&str>, keys: Vec<i32>) -> Result<ArrayRef, arrow::error::ArrowError> {
    let dict = DictionaryArray::<Int32Type>::try_new(
        Int32Array::from(keys),
        Arc::new(StringArray::from(values)),
    )?;
    Ok(Arc::new(dict))
}

impl TableBuffer {
    /// Row by row into the open builders: for small chunks.
    fn append_chunk_rows(
        &mut self,
        chunk: &TableChunk,
        common_tags: &[damselfly_proto::v1::Tag],
        rows: &[usize],
    ) {
        let base = self.time.len();
        let mut bytes = 8 * rows.len();
        for tag in chunk_common_tags(chunk, common_tags) {
            let builder = self.tag_builder(&tag.key, base);
            builder.append_tag(&tag.value, rows.len());
            bytes += 4 * rows.len();
        }
        for (j, key) in chunk.tag_keys.iter().enumerate() {
            let builder = self.tag_builder(key, base);
            // Rows of one series usually come together: one lookup per run.
            let mut start = 0;
            while start < rows.len() {
                let series = series_of(chunk, rows[start]);
                let mut end = start + 1;
                while end < rows.len() && series_of(chunk, rows[end]) == series {
                    end += 1;
                }
                builder.append_tag(&chunk.series[series].tag_values[j], end - start);
                start = end;
            }
            bytes += 4 * rows.len();
        }
        for column in &chunk.fields {
            let Some(field_type) = FieldType::of_column(column) else {
                continue;
            };
            let builder = match self.fields.get_mut(&column.key) {
                Some(b) => b,
                None => self
                    .fields
                    .entry(column.key.clone())
                    .or_insert_with(|| ColumnBuilder::for_type(field_type)),
            };
            builder.pad_to(base);
            bytes += builder.append_column(column, &value_indices(column, rows));
        }
        self.time
            .extend(rows.iter().map(|&r| chunk.time_unix_nano[r]));
        self.rows += rows.len();
        self.bytes += bytes;
    }

    fn tag_builder(&mut self, key: &str, base: usize) -> &mut ColumnBuilder {
        // One String allocation per tag per chunk, not per row.
        let builder = self
            .tags
            .entry(key.to_string())
            .or_insert_with(|| ColumnBuilder::Tag(StringDictionaryBuilder::new()));
        builder.pad_to(base);
        builder
    }

    /// A large chunk becomes a record batch of its own: its value lists are copied into Arrow arrays once, with no
    /// per-row builder work. `rows` = `None` means every row. Returns the rows added.
    fn append_chunk_as_batch(
        &mut self,
        chunk: &TableChunk,
        common_tags: &[damselfly_proto::v1::Tag],
        rows: Option<&[usize]>,
    ) -> usize {
        match chunk_to_batch(chunk, common_tags, rows) {
            Ok(batch) => {
                let n = batch.num_rows();
                self.bytes += batch.get_array_memory_size();
                self.rows += n;
                self.sealed.push(batch);
                n
            }
            Err(e) => {
                // Validation guarantees consistent lengths; a failure here is a bug. Keep serving.
                tracing::error!(error = %e, table = %chunk.measurement, "cannot convert chunk; rows skipped (this is a bug)");
                0
            }
        }
    }
}

/// Converts (some rows of) a validated chunk to a record batch: time, tags (dictionary-encoded), fields.
pub(crate) fn chunk_to_batch(
    chunk: &TableChunk,
    common_tags: &[damselfly_proto::v1::Tag],
    rows: Option<&[usize]>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let all: Vec<usize>;
    let row_list: &[usize] = match rows {
        Some(r) => r,
        None => {
            all = (0..chunk_rows(chunk)).collect();
            &all
        }
    };
    let n = row_list.len();
    let mut fields = vec![ArrowField::new(TIME_COLUMN, time_data_type(), false)];
    let times: Vec<i64> = match rows {
        None => chunk.time_unix_nano.clone(),
        Some(r) => r.iter().map(|&i| chunk.time_unix_nano[i]).collect(),
    };
    let mut columns: Vec<ArrayRef> = vec![Arc::new(
        TimestampNanosecondArray::from(times).with_timezone("UTC"),
    )];
    for tag in chunk_common_tags(chunk, common_tags) {
        fields.push(ArrowField::new(&tag.key, tag_data_type(), true));
        columns.push(tag_array(vec![tag.value.as_str()], vec![0; n])?);
    }
    let keys: Vec<i32> = row_list
        .iter()
        .map(|&r| series_of(chunk, r) as i32)
        .collect();
    for (j, key) in chunk.tag_keys.iter().enumerate() {
        let values = chunk
            .series
            .iter()
            .map(|s| s.tag_values[j].as_str())
            .collect();
        fields.push(ArrowField::new(key, tag_data_type(), true));
        columns.push(tag_array(values, keys.clone())?);
    }
    for column in &chunk.fields {
        let Some(field_type) = FieldType::of_column(column) else {
            continue;
        };
        let dense = column.present.is_empty() && rows.is_none();
        let indices = if dense {
            Vec::new()
        } else {
            value_indices(column, row_list)
        };
        let array: ArrayRef = match field_type {
            FieldType::F64 if dense => Arc::new(Float64Array::from(column.f64.clone())),
            FieldType::I64 if dense => Arc::new(Int64Array::from(column.i64.clone())),
            FieldType::U64 if dense => Arc::new(UInt64Array::from(column.u64.clone())),
            FieldType::F64 => Arc::new(Float64Array::from_iter(
                indices.iter().map(|i| i.map(|i| column.f64[i])),
            )),
            FieldType::I64 => Arc::new(Int64Array::from_iter(
                indices.iter().map(|i| i.map(|i| column.i64[i])),
            )),
            FieldType::U64 => Arc::new(UInt64Array::from_iter(
                indices.iter().map(|i| i.map(|i| column.u64[i])),
            )),
            FieldType::Bool if dense => Arc::new(BooleanArray::from(column.bool.clone())),
            FieldType::Bool => Arc::new(BooleanArray::from_iter(
                indices.iter().map(|i| i.map(|i| column.bool[i])),
            )),
            FieldType::Str if dense => Arc::new(StringArray::from_iter_values(&column.str)),
            FieldType::Str => Arc::new(StringArray::from_iter(
                indices.iter().map(|i| i.map(|i| column.str[i].as_str())),
            )),
        };
        let data_type: DataType = field_type.data_type();
        fields.push(ArrowField::new(&column.key, data_type, true));
        columns.push(array);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Float64Type;
    use damselfly_proto::v1::field::Value;
    use damselfly_proto::v1::{Field, Point, Tag};

    fn point(measurement: &str, tag: (&str, &str), field: (&str, Value), t: i64) -> Point {
        Point {
            measurement: measurement.into(),
            tags: vec![Tag {
                key: tag.0.into(),
                value: tag.1.into(),
            }],
            fields: vec![Field {
                key: field.0.into(),
                value: Some(field.1),
            }],
            time_unix_nano: t,
        }
    }

    #[test]
    fn sparse_columns_are_null_padded_and_chunks_accumulate() {
        let mut buffer = Buffer::default();
        let mut batch = WriteBatch {
            chunks: Vec::new(),
            agent_id: "a".into(),
            seq: 1,
            common_tags: vec![Tag {
                key: "host".into(),
                value: "h1".into(),
            }],
            points: vec![
                point("cpu", ("cpu", "cpu0"), ("usage_user", Value::F64(1.0)), 10),
                point(
                    "cpu",
                    ("cpu", "cpu1"),
                    ("usage_system", Value::F64(2.0)),
                    10,
                ),
                point("mem", ("host", "override"), ("used", Value::U64(5)), 10),
            ],
        };
        crate::model::normalize(&mut batch).expect("normalize");
        assert_eq!(buffer.append_batch(&batch, |_, _| true), 3);
        let cpu = buffer.table_mut("cpu").expect("cpu").snapshot();
        assert_eq!(cpu.len(), 1);
        let chunk = &cpu[0];
        assert_eq!(chunk.num_rows(), 2);
        let user = chunk.column_by_name("usage_user").expect("usage_user");
        assert!(user.is_valid(0) && user.is_null(1));
        let system = chunk.column_by_name("usage_system").expect("usage_system");
        assert_eq!(system.as_primitive::<Float64Type>().value(1), 2.0);
        // The point's own tag overrides the common one.
        let mem = buffer.table_mut("mem").expect("mem").snapshot();
        let host = mem[0].column_by_name("host").expect("host");
        let host = arrow::compute::cast(host, &arrow::datatypes::DataType::Utf8).expect("cast");
        assert_eq!(host.as_string::<i32>().value(0), "override");
        // A second write lands in a second chunk; the first is reused, not rebuilt.
        buffer.append_batch(&batch, |m, _| m == "cpu");
        let cpu = buffer.table_mut("cpu").expect("cpu").snapshot();
        assert_eq!(cpu.len(), 2);
        assert_eq!(buffer.rows(), 5);
    }

    /// A large chunk with a sparse field, filtered by `keep` the way WAL replay does.
    #[test]
    fn large_chunks_become_batches_with_nulls_and_filtered_rows() {
        let rows = DIRECT_CHUNK_ROWS * 2;
        let mut present = vec![0u8; rows.div_ceil(8)];
        let mut sparse = Vec::new();
        for r in (0..rows).step_by(3) {
            present[r / 8] |= 1 << (r % 8);
            sparse.push(r as i64);
        }
        let chunk = TableChunk {
            measurement: "cpu".into(),
            tag_keys: vec!["cpu".into()],
            series: vec![
                damselfly_proto::v1::Series {
                    tag_values: vec!["cpu0".into()],
                },
                damselfly_proto::v1::Series {
                    tag_values: vec!["cpu1".into()],
                },
            ],
            series_index: (0..rows as u32).map(|r| r % 2).collect(),
            time_unix_nano: (0..rows as i64).collect(),
            fields: vec![
                FieldColumn {
                    key: "u".into(),
                    f64: (0..rows).map(|r| r as f64).collect(),
                    ..Default::default()
                },
                FieldColumn {
                    key: "n".into(),
                    i64: sparse,
                    present,
                    ..Default::default()
                },
            ],
        };
        let batch = WriteBatch {
            agent_id: "a".into(),
            seq: 1,
            common_tags: vec![Tag {
                key: "host".into(),
                value: "h".into(),
            }],
            points: vec![],
            chunks: vec![chunk],
        };
        let mut buffer = Buffer::default();
        // Keep the second half only (as if the first half were already in Parquet).
        let half = (rows / 2) as i64;
        assert_eq!(buffer.append_batch(&batch, |_, t| t >= half), rows / 2);
        let chunks = buffer.table_mut("cpu").expect("cpu").snapshot();
        assert_eq!(chunks.len(), 1);
        let b = &chunks[0];
        assert_eq!(b.num_rows(), rows / 2);
        let u = b
            .column_by_name("u")
            .expect("u")
            .as_primitive::<Float64Type>();
        let n = b
            .column_by_name("n")
            .expect("n")
            .as_primitive::<arrow::datatypes::Int64Type>();
        let cpu = arrow::compute::cast(b.column_by_name("cpu").expect("cpu"), &DataType::Utf8)
            .expect("cast");
        let host = arrow::compute::cast(b.column_by_name("host").expect("host"), &DataType::Utf8)
            .expect("cast");
        for i in 0..b.num_rows() {
            let r = rows / 2 + i;
            assert_eq!(u.value(i), r as f64);
            assert_eq!(n.is_valid(i), r.is_multiple_of(3), "row {r}");
            if r.is_multiple_of(3) {
                assert_eq!(n.value(i), r as i64);
            }
            assert_eq!(cpu.as_string::<i32>().value(i), format!("cpu{}", r % 2));
            assert_eq!(host.as_string::<i32>().value(i), "h");
        }
        // The same chunk small enough for the builders gives the same values.
        let mut small = batch.clone();
        small.chunks[0].time_unix_nano.truncate(10);
        small.chunks[0].series_index.truncate(10);
        small.chunks[0].fields[0].f64.truncate(10);
        small.chunks[0].fields[1].present.truncate(2);
        small.chunks[0].fields[1].present[1] &= 0b11;
        small.chunks[0].fields[1].i64.truncate(4);
        let mut buffer = Buffer::default();
        assert_eq!(buffer.append_batch(&small, |_, _| true), 10);
        let b = &buffer.table_mut("cpu").expect("cpu").snapshot()[0];
        let n = b
            .column_by_name("n")
            .expect("n")
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(
            (0..10).map(|i| n.is_valid(i)).collect::<Vec<_>>(),
            (0..10).map(|r| r % 3 == 0).collect::<Vec<_>>()
        );
        assert_eq!(n.value(9), 9);
    }
}
