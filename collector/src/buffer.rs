//! The in-memory write buffer: rows appended per table into Arrow builders, readable at any time as Arrow record
//! batches (queries see rows as soon as they are acknowledged).
//!
//! Each table keeps sealed chunks (immutable record batches) plus open builders. A snapshot seals the open
//! builders into a new chunk, so every row is converted to Arrow once, however many queries read it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, StringDictionaryBuilder,
    TimestampNanosecondArray, UInt64Builder,
};
use arrow::datatypes::{Field as ArrowField, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use damselfly_proto::v1::{WriteBatch, field::Value};

use crate::model::{TIME_COLUMN, tag_data_type, time_data_type};

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
    fn for_value(value: &Value) -> ColumnBuilder {
        match value {
            Value::F64(_) => ColumnBuilder::F64(Float64Builder::new()),
            Value::I64(_) => ColumnBuilder::I64(Int64Builder::new()),
            Value::U64(_) => ColumnBuilder::U64(UInt64Builder::new()),
            Value::Bool(_) => ColumnBuilder::Bool(BooleanBuilder::new()),
            Value::Str(_) => ColumnBuilder::Str(StringBuilder::new()),
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

    /// Appends a field value. The catalog has already checked the type; a mismatch here is a bug, and the value is
    /// stored as null rather than taking the collector down.
    fn append_value(&mut self, value: &Value) {
        match (self, value) {
            (ColumnBuilder::F64(b), Value::F64(v)) => b.append_value(*v),
            (ColumnBuilder::I64(b), Value::I64(v)) => b.append_value(*v),
            (ColumnBuilder::U64(b), Value::U64(v)) => b.append_value(*v),
            (ColumnBuilder::Bool(b), Value::Bool(v)) => b.append_value(*v),
            (ColumnBuilder::Str(b), Value::Str(v)) => b.append_value(v),
            (builder, value) => {
                tracing::error!(
                    ?value,
                    "field value does not match its column type; storing null"
                );
                let len = builder.len();
                builder.pad_to(len + 1);
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

    /// Appends every point of a validated batch whose table passes `keep` (used by WAL replay to skip tables
    /// whose rows are already in Parquet). Returns the number of rows appended.
    pub fn append_batch(&mut self, batch: &WriteBatch, keep: impl Fn(&str, i64) -> bool) -> usize {
        let mut appended = 0;
        for point in &batch.points {
            if !keep(&point.measurement, point.time_unix_nano) {
                continue;
            }
            let table = match self.tables.get_mut(&point.measurement) {
                Some(t) => t,
                None => self.tables.entry(point.measurement.clone()).or_default(),
            };
            let row = table.time.len();
            let mut bytes = 8;
            let point_tags = point.tags.iter();
            // Common tags first, then the point's own: a point tag with the same key wins (validation rejects
            // duplicates within each list).
            for tag in batch
                .common_tags
                .iter()
                .filter(|c| !point.tags.iter().any(|t| t.key == c.key))
                .chain(point_tags)
            {
                let builder = match table.tags.get_mut(&tag.key) {
                    Some(b) => b,
                    None => table
                        .tags
                        .entry(tag.key.clone())
                        .or_insert_with(|| ColumnBuilder::Tag(StringDictionaryBuilder::new())),
                };
                builder.pad_to(row);
                if let ColumnBuilder::Tag(b) = builder {
                    b.append_value(&tag.value);
                }
                bytes += 4;
            }
            for field in &point.fields {
                let Some(value) = &field.value else { continue };
                let builder = match table.fields.get_mut(&field.key) {
                    Some(b) => b,
                    None => table
                        .fields
                        .entry(field.key.clone())
                        .or_insert_with(|| ColumnBuilder::for_value(value)),
                };
                builder.pad_to(row);
                builder.append_value(value);
                bytes += match value {
                    Value::Str(s) => s.len() + 4,
                    Value::Bool(_) => 1,
                    _ => 8,
                };
            }
            table.time.push(point.time_unix_nano);
            table.rows += 1;
            table.bytes += bytes;
            table.min_time = Some(
                table
                    .min_time
                    .map_or(point.time_unix_nano, |m| m.min(point.time_unix_nano)),
            );
            table.max_time = Some(
                table
                    .max_time
                    .map_or(point.time_unix_nano, |m| m.max(point.time_unix_nano)),
            );
            self.rows += 1;
            self.bytes += bytes;
            appended += 1;
        }
        appended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Float64Type;
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
        let batch = WriteBatch {
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
}
