//! The last-value cache: the newest row of every series (a table's full tag set), kept in memory so that "latest
//! value per series" queries do not scan files.
//!
//! The writer feeds it every batch it makes durable (and the WAL replay every replayed batch), in the same step as
//! the write buffer, so it is never behind an acknowledged write. Rows that were already in Parquet files when the
//! collector started are not in the WAL: for each table that had files, the query engine reads the newest row per
//! series from them once, in the background, at start-up ([`crate::query::QueryEngine::warm_last_values`]); until
//! that is done the table's cache is not used. Out-of-order rows never replace a newer one.
//!
//! A table whose series outnumber `last_value_cache_max_series` stops being cached (its queries scan, as without a
//! cache), which bounds the memory. Rows whose hour partition retention has expired are left out when read, as
//! retention removes them from the files.
//!
//! The query engine answers `SELECT DISTINCT ON (<tags>) ... ORDER BY <tags>, time DESC` from it (see
//! [`crate::query`]): the newest row per group of series is the newest of those series' newest rows.

use std::collections::{HashMap, HashSet};

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{SchemaRef, TimestampNanosecondType};
use damselfly_proto::columnar::{chunk_rows, chunk_rows_to_points, points_to_chunks, series_of};
use damselfly_proto::v1::{Point, TableChunk, Tag, WriteBatch};

use crate::model::TIME_COLUMN;
use crate::persist::conform;

/// The newest row of each series, per table.
#[derive(Debug)]
pub struct LastValues {
    max_series: usize,
    tables: HashMap<String, TableLast>,
    /// Tables that had files at start-up and whose newest file rows are not read yet.
    unwarmed: HashSet<String>,
}

#[derive(Debug, Default)]
struct TableLast {
    /// Series key (its sorted tags) → its newest row written since start-up.
    series: HashMap<String, Point>,
    /// The newest row per series of the files present at start-up (read once, see the module doc).
    from_files: Vec<RecordBatch>,
    /// More series than the cache may hold: not cached.
    overflow: bool,
}

impl Default for LastValues {
    fn default() -> Self {
        LastValues::new(0)
    }
}

impl LastValues {
    /// A cache holding at most `max_series` series per table (0: no cache at all).
    pub fn new(max_series: usize) -> LastValues {
        LastValues {
            max_series,
            tables: HashMap::new(),
            unwarmed: HashSet::new(),
        }
    }

    /// Whether the cache is on.
    pub fn enabled(&self) -> bool {
        self.max_series > 0
    }

    /// Marks tables whose files must be read before their cache is complete.
    pub fn needs_warming(&mut self, tables: impl IntoIterator<Item = String>) {
        if self.enabled() {
            self.unwarmed.extend(tables);
        }
    }

    /// Tables still waiting for [`LastValues::warmed`].
    pub fn unwarmed(&self) -> Vec<String> {
        let mut names: Vec<String> = self.unwarmed.iter().cloned().collect();
        names.sort();
        names
    }

    /// Records the newest row per series of `table`'s start-up files (and possibly newer rows: only the newest per
    /// series counts when read), completing its cache. `None`: they could not be read; the table stays uncached.
    pub fn warmed(&mut self, table: &str, rows: Option<Vec<RecordBatch>>) {
        if !self.unwarmed.remove(table) {
            return;
        }
        let entry = self.tables.entry(table.to_string()).or_default();
        match rows {
            Some(batches)
                if batches.iter().map(RecordBatch::num_rows).sum::<usize>() <= self.max_series =>
            {
                entry.from_files = batches;
            }
            _ => entry.overflow = true,
        }
        self.check_size(table);
    }

    /// Takes in the rows of one durable batch (normalized: rows in chunks).
    pub fn observe(&mut self, batch: &WriteBatch) {
        if !self.enabled() {
            return;
        }
        for chunk in &batch.chunks {
            self.observe_chunk(chunk, &batch.common_tags);
        }
    }

    fn observe_chunk(&mut self, chunk: &TableChunk, common_tags: &[Tag]) {
        let table = match self.tables.get_mut(&chunk.measurement) {
            Some(t) => t,
            None => self.tables.entry(chunk.measurement.clone()).or_default(),
        };
        if table.overflow {
            return;
        }
        // The newest row of each of the chunk's series (the later row on a tie, as a later write would).
        let mut newest: HashMap<usize, usize> = HashMap::new();
        for row in 0..chunk_rows(chunk) {
            let time = chunk.time_unix_nano[row];
            newest
                .entry(series_of(chunk, row))
                .and_modify(|r| {
                    if time >= chunk.time_unix_nano[*r] {
                        *r = row;
                    }
                })
                .or_insert(row);
        }
        let mut wanted: HashMap<usize, String> = HashMap::new();
        for (series, row) in newest {
            let key = series_key(chunk, common_tags, series);
            let newer = table
                .series
                .get(&key)
                .is_none_or(|p| chunk.time_unix_nano[row] >= p.time_unix_nano);
            if newer {
                wanted.insert(row, key);
            }
        }
        if wanted.is_empty() {
            return;
        }
        let points = chunk_rows_to_points(common_tags, chunk, |row| wanted.contains_key(&row));
        let mut rows: Vec<usize> = wanted.keys().copied().collect();
        rows.sort_unstable();
        for (row, point) in rows.into_iter().zip(points) {
            if let Some(key) = wanted.remove(&row) {
                table.series.insert(key, point);
            }
        }
        let name = chunk.measurement.clone();
        self.check_size(&name);
    }

    fn check_size(&mut self, table: &str) {
        let Some(t) = self.tables.get_mut(table) else {
            return;
        };
        if !t.overflow && t.series.len() > self.max_series {
            tracing::warn!(
                table,
                max_series = self.max_series,
                "more series than last_value_cache_max_series: latest-value queries on this table scan its files"
            );
            t.overflow = true;
        }
        if t.overflow {
            t.series = HashMap::new();
            t.from_files = Vec::new();
        }
    }

    /// The cached rows of `table` conformed to `schema`, leaving out rows `expired` says retention has removed; at
    /// most two rows per series (one from the start-up files, one written since), so the caller still picks the
    /// newest. `None` when the table's cache is incomplete (warming up, too many series, or the cache is off).
    pub fn rows(
        &self,
        table: &str,
        schema: &SchemaRef,
        expired: impl Fn(i64) -> bool,
    ) -> Option<Result<Vec<RecordBatch>, String>> {
        if !self.enabled() || self.unwarmed.contains(table) {
            return None;
        }
        let Some(t) = self.tables.get(table) else {
            // Known to the catalog but never written since start-up, and no files then: no rows.
            return Some(Ok(Vec::new()));
        };
        if t.overflow {
            return None;
        }
        Some(materialize(t, schema, expired))
    }
}

fn materialize(
    table: &TableLast,
    schema: &SchemaRef,
    expired: impl Fn(i64) -> bool,
) -> Result<Vec<RecordBatch>, String> {
    let points: Vec<Point> = table
        .series
        .values()
        .filter(|p| !expired(p.time_unix_nano))
        .cloned()
        .collect();
    let chunks = points_to_chunks(&points).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(chunks.len() + table.from_files.len());
    for chunk in &chunks {
        let batch = crate::buffer::chunk_to_batch(chunk, &[], None).map_err(|e| e.to_string())?;
        out.push(conform(&batch, schema).map_err(|e| e.to_string())?);
    }
    for batch in &table.from_files {
        let batch = conform(batch, schema).map_err(|e| e.to_string())?;
        let keep: BooleanArray = batch
            .column_by_name(TIME_COLUMN)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
            .ok_or_else(|| format!("the cached rows have no {TIME_COLUMN} column"))?
            .iter()
            .map(|t| Some(t.is_some_and(|t| !expired(t))))
            .collect();
        out.push(filter_record_batch(&batch, &keep).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// A series' identity: its sorted tags, length-prefixed, so no tag value (whatever bytes it holds) can make two
/// tag sets look alike.
fn series_key(chunk: &TableChunk, common_tags: &[Tag], series: usize) -> String {
    let mut key = String::new();
    for (k, v) in crate::cardinality::series_tags(chunk, common_tags, series) {
        for part in [k, v] {
            key.push_str(&part.len().to_string());
            key.push(':');
            key.push_str(part);
        }
    }
    key
}
