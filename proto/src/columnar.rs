//! Row-wise [`Point`]s to columnar [`TableChunk`]s: rows are grouped by measurement and tag names, each distinct tag
//! value tuple becomes one [`Series`], and each field becomes one packed column with a presence bitmap when some rows
//! lack it. Agents use it to send compact batches; the collector uses it to bring row-wise batches to the one shape
//! its catalog, buffer and WAL handle.

use std::collections::HashMap;

use crate::v1::{Field, FieldColumn, Point, Series, TableChunk, Tag, WriteBatch, field::Value};

/// Why points cannot be expressed as chunks: one field given two types in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixedTypes {
    pub measurement: String,
    pub field: String,
    pub first: &'static str,
    pub second: &'static str,
}

impl std::fmt::Display for MixedTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "field {:?} of measurement {:?} is sent as both {} and {} in one batch",
            self.field, self.measurement, self.first, self.second
        )
    }
}

impl std::error::Error for MixedTypes {}

/// The name of a value's type, as the collector's error messages say it.
pub fn value_type_name(value: &Value) -> &'static str {
    match value {
        Value::F64(_) => "float",
        Value::I64(_) => "integer",
        Value::U64(_) => "unsigned",
        Value::Bool(_) => "boolean",
        Value::Str(_) => "string",
    }
}

/// The type of a field column: the name of its non-empty value list, `None` if all are empty (or several are not,
/// which a valid column never has: see [`column_type_name`]'s caller in the collector's validation).
pub fn column_type_name(column: &FieldColumn) -> Option<&'static str> {
    let mut found = None;
    for (name, len) in [
        ("float", column.f64.len()),
        ("integer", column.i64.len()),
        ("unsigned", column.u64.len()),
        ("boolean", column.bool.len()),
        ("string", column.str.len()),
    ] {
        if len > 0 {
            if found.is_some() {
                return None;
            }
            found = Some(name);
        }
    }
    found
}

/// Number of values a field column carries.
pub fn column_len(column: &FieldColumn) -> usize {
    column.f64.len() + column.i64.len() + column.u64.len() + column.bool.len() + column.str.len()
}

/// Is row `row` present in a column with this presence bitmap (empty = every row)?
pub fn is_present(present: &[u8], row: usize) -> bool {
    present.is_empty()
        || present
            .get(row / 8)
            .is_some_and(|b| b & (1 << (row % 8)) != 0)
}

/// Rows of one chunk: the length of its time column.
pub fn chunk_rows(chunk: &TableChunk) -> usize {
    chunk.time_unix_nano.len()
}

/// Rows in a batch: its points plus the rows of its chunks.
pub fn batch_rows(batch: &WriteBatch) -> usize {
    batch.points.len() + batch.chunks.iter().map(chunk_rows).sum::<usize>()
}

/// The series of row `row` (0 when `series_index` is empty).
pub fn series_of(chunk: &TableChunk, row: usize) -> usize {
    chunk.series_index.get(row).map_or(0, |&i| i as usize)
}

/// The rows of a (validated) chunk as points: the series' tags over `common_tags` (a row's own tag wins), the
/// present fields, the time. The inverse of [`points_to_chunks`], for consumers that want rows.
pub fn chunk_to_points(common_tags: &[Tag], chunk: &TableChunk) -> Vec<Point> {
    chunk_rows_to_points(common_tags, chunk, |_| true)
}

/// [`chunk_to_points`] for the rows `wanted` accepts (by row number), in row order.
pub fn chunk_rows_to_points(
    common_tags: &[Tag],
    chunk: &TableChunk,
    wanted: impl Fn(usize) -> bool,
) -> Vec<Point> {
    let rows = chunk_rows(chunk);
    // Next value index per column (values are stored only for present rows).
    let mut cursors = vec![0usize; chunk.fields.len()];
    let mut out = Vec::new();
    for row in 0..rows {
        if !wanted(row) {
            // Skip the row's values: the cursors must still move past them.
            for (column, cursor) in chunk.fields.iter().zip(cursors.iter_mut()) {
                if is_present(&column.present, row) {
                    *cursor += 1;
                }
            }
            continue;
        }
        let mut tags: Vec<Tag> = common_tags
            .iter()
            .filter(|t| !chunk.tag_keys.contains(&t.key))
            .cloned()
            .collect();
        if let Some(series) = chunk.series.get(series_of(chunk, row)) {
            for (key, value) in chunk.tag_keys.iter().zip(&series.tag_values) {
                tags.push(Tag {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        let mut fields = Vec::with_capacity(chunk.fields.len());
        for (column, cursor) in chunk.fields.iter().zip(cursors.iter_mut()) {
            if !is_present(&column.present, row) {
                continue;
            }
            let i = *cursor;
            *cursor += 1;
            let value = if let Some(v) = column.f64.get(i) {
                Value::F64(*v)
            } else if let Some(v) = column.i64.get(i) {
                Value::I64(*v)
            } else if let Some(v) = column.u64.get(i) {
                Value::U64(*v)
            } else if let Some(v) = column.bool.get(i) {
                Value::Bool(*v)
            } else if let Some(v) = column.str.get(i) {
                Value::Str(v.clone())
            } else {
                continue;
            };
            fields.push(Field {
                key: column.key.clone(),
                value: Some(value),
            });
        }
        out.push(Point {
            measurement: chunk.measurement.clone(),
            tags,
            fields,
            time_unix_nano: chunk.time_unix_nano.get(row).copied().unwrap_or(0),
        });
    }
    out
}

struct ChunkBuilder {
    chunk: TableChunk,
    series: HashMap<Vec<String>, u32>,
    columns: HashMap<String, usize>,
    /// For each field column, the rows that have a value (to build the bitmap at the end).
    present_rows: Vec<Vec<u32>>,
}

impl ChunkBuilder {
    fn push(&mut self, point: &Point) -> Result<(), MixedTypes> {
        let row = self.chunk.time_unix_nano.len() as u32;
        let values: Vec<String> = point.tags.iter().map(|t| t.value.clone()).collect();
        let next = self.series.len() as u32;
        let series = *self.series.entry(values).or_insert_with_key(|values| {
            self.chunk.series.push(Series {
                tag_values: values.clone(),
            });
            next
        });
        self.chunk.series_index.push(series);
        self.chunk.time_unix_nano.push(point.time_unix_nano);
        for field in &point.fields {
            let Some(value) = &field.value else { continue };
            let index = match self.columns.get(&field.key) {
                Some(&i) => i,
                None => {
                    self.chunk.fields.push(FieldColumn {
                        key: field.key.clone(),
                        ..Default::default()
                    });
                    self.present_rows.push(Vec::new());
                    self.columns
                        .insert(field.key.clone(), self.chunk.fields.len() - 1);
                    self.chunk.fields.len() - 1
                }
            };
            let column = &mut self.chunk.fields[index];
            if let Some(existing) = column_type_name(column)
                && existing != value_type_name(value)
            {
                return Err(MixedTypes {
                    measurement: point.measurement.clone(),
                    field: field.key.clone(),
                    first: existing,
                    second: value_type_name(value),
                });
            }
            match value {
                Value::F64(v) => column.f64.push(*v),
                Value::I64(v) => column.i64.push(*v),
                Value::U64(v) => column.u64.push(*v),
                Value::Bool(v) => column.bool.push(*v),
                Value::Str(v) => column.str.push(v.clone()),
            }
            self.present_rows[index].push(row);
        }
        Ok(())
    }

    fn finish(mut self) -> TableChunk {
        let rows = self.chunk.time_unix_nano.len();
        if self.chunk.series.len() <= 1 {
            self.chunk.series_index.clear();
        }
        for (column, present) in self.chunk.fields.iter_mut().zip(self.present_rows) {
            if present.len() < rows {
                let mut bitmap = vec![0u8; rows.div_ceil(8)];
                for r in present {
                    bitmap[r as usize / 8] |= 1 << (r % 8);
                }
                column.present = bitmap;
            }
        }
        self.chunk
    }
}

/// Groups points into chunks by (measurement, tag names in the order given), in order of first appearance. A
/// field value of `None` is skipped. Fails only if one field of one measurement comes with two types.
pub fn points_to_chunks(points: &[Point]) -> Result<Vec<TableChunk>, MixedTypes> {
    let mut groups: HashMap<(&str, Vec<&str>), usize> = HashMap::new();
    let mut builders: Vec<ChunkBuilder> = Vec::new();
    for point in points {
        let key = (
            point.measurement.as_str(),
            point
                .tags
                .iter()
                .map(|t| t.key.as_str())
                .collect::<Vec<_>>(),
        );
        let index = match groups.get(&key) {
            Some(&i) => i,
            None => {
                builders.push(ChunkBuilder {
                    chunk: TableChunk {
                        measurement: point.measurement.clone(),
                        tag_keys: point.tags.iter().map(|t| t.key.clone()).collect(),
                        ..Default::default()
                    },
                    series: HashMap::new(),
                    columns: HashMap::new(),
                    present_rows: Vec::new(),
                });
                groups.insert(key, builders.len() - 1);
                builders.len() - 1
            }
        };
        builders[index].push(point)?;
    }
    Ok(builders.into_iter().map(ChunkBuilder::finish).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn point(m: &str, tags: &[(&str, &str)], fields: Vec<(&str, Value)>, t: i64) -> Point {
        Point {
            measurement: m.into(),
            tags: tags
                .iter()
                .map(|(k, v)| Tag {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            fields: fields
                .into_iter()
                .map(|(k, v)| Field {
                    key: k.into(),
                    value: Some(v),
                })
                .collect(),
            time_unix_nano: t,
        }
    }

    #[test]
    fn groups_series_and_marks_missing_values() {
        let points = vec![
            point("cpu", &[("cpu", "cpu0")], vec![("u", Value::F64(1.0))], 10),
            point("mem", &[], vec![("used", Value::U64(5))], 10),
            point(
                "cpu",
                &[("cpu", "cpu1")],
                vec![("u", Value::F64(2.0)), ("s", Value::F64(3.0))],
                10,
            ),
            point("cpu", &[("cpu", "cpu0")], vec![("u", Value::F64(4.0))], 20),
        ];
        let chunks = points_to_chunks(&points).unwrap();
        assert_eq!(chunks.len(), 2);
        let cpu = &chunks[0];
        assert_eq!(cpu.tag_keys, vec!["cpu"]);
        assert_eq!(cpu.series.len(), 2);
        assert_eq!(cpu.series_index, vec![0, 1, 0]);
        assert_eq!(cpu.time_unix_nano, vec![10, 10, 20]);
        assert_eq!(cpu.fields[0].f64, vec![1.0, 2.0, 4.0]);
        assert!(cpu.fields[0].present.is_empty());
        assert_eq!(cpu.fields[1].key, "s");
        assert_eq!(cpu.fields[1].f64, vec![3.0]);
        assert_eq!(cpu.fields[1].present, vec![0b010]);
        assert!(is_present(&cpu.fields[1].present, 1));
        assert!(!is_present(&cpu.fields[1].present, 2));
        let mem = &chunks[1];
        assert!(mem.series_index.is_empty());
        assert_eq!(mem.fields[0].u64, vec![5]);
    }

    #[test]
    fn chunks_turn_back_into_the_same_points() {
        let points = vec![
            point("cpu", &[("cpu", "cpu0")], vec![("u", Value::F64(1.0))], 10),
            point(
                "cpu",
                &[("cpu", "cpu1")],
                vec![("u", Value::F64(2.0)), ("s", Value::Str("x".into()))],
                11,
            ),
            point(
                "cpu",
                &[("cpu", "cpu0")],
                vec![("b", Value::Bool(true))],
                20,
            ),
        ];
        let chunks = points_to_chunks(&points).unwrap();
        let common = [Tag {
            key: "vm_id".into(),
            value: "vm-1".into(),
        }];
        let back = chunk_to_points(&common, &chunks[0]);
        assert_eq!(back.len(), 3);
        for (b, p) in back.iter().zip(&points) {
            assert_eq!(b.time_unix_nano, p.time_unix_nano);
            assert_eq!(b.tags[0].key, "vm_id");
            assert_eq!(&b.tags[1..], &p.tags[..]);
            let mut want = p.fields.clone();
            want.sort_by(|a, b| a.key.cmp(&b.key));
            let mut got = b.fields.clone();
            got.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(got, want);
        }
    }

    #[test]
    fn one_field_with_two_types_is_refused_by_name() {
        let points = vec![
            point("cpu", &[], vec![("u", Value::F64(1.0))], 10),
            point("cpu", &[], vec![("u", Value::I64(1))], 20),
        ];
        let err = points_to_chunks(&points).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field \"u\" of measurement \"cpu\" is sent as both float and integer in one batch"
        );
    }
}
