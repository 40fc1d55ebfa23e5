//! Prometheus samples as Damselfly rows: the mapping shared by remote write ([`super::remote_write`]) and scraping
//! ([`super::scrape`]), documented for users in `docs/PROMETHEUS.md`.
//!
//! * **Table** = the metric name, with every character outside `[A-Za-z0-9_]` (the `:` of recording rules, the `.`
//!   of UTF-8 names) replaced by `_` and a leading digit prefixed with `_`; at most 128 bytes. Case is kept, so a
//!   name with capitals is quoted in SQL (`"node_memory_MemTotal_bytes"`).
//! * **Tags** = the other labels, names as they are. A label with an empty value is no label (as in Prometheus).
//!   Labels named `time` or `value` (the timestamp and the value column) become `label_time` / `label_value`
//!   (`label_` prefixed again while the name is taken).
//! * **Field** = one f64 column, `value`.
//! * **Time** = the sample's timestamp, milliseconds to nanoseconds.
//! * A namespace (`?ns=` of remote write) becomes the tag `ns_id`; a series whose own `ns_id` label says otherwise is
//!   refused.
//! * Prometheus' staleness markers (the NaN with bits `0x7ff0000000000002`) are dropped: they mean "this series
//!   ended", not a value. Every other NaN is stored as NaN.
//!
//! [`RowsBuilder`] collects mapped series and their samples into columnar [`WriteBatch`]es (tags once per series)
//! of at most `max_batch_points` rows each; [`SchemaGuard`] refuses, series by series, what the tables' existing
//! columns would make the store refuse as a whole batch; [`write_batches`] stores the batches.

use std::collections::HashMap;

use damselfly_proto::v1::{FieldColumn, Series, TableChunk, WriteBatch};

use crate::catalog::TableSchema;
use crate::model::{ColumnKind, FieldType, MAX_MEASUREMENT_BYTES, TIME_COLUMN, check_tag};
use crate::store::{Store, WriteOutcome};

/// The field holding a sample's value.
pub const VALUE_FIELD: &str = "value";
/// The tag a namespace becomes.
pub const NS_TAG: &str = "ns_id";
/// Prefix of labels renamed because their name is a column of every table (`time`, `value`).
pub const RENAMED_LABEL_PREFIX: &str = "label_";
/// The label holding the metric name in remote write.
pub const METRIC_NAME_LABEL: &str = "__name__";
/// Prometheus' staleness marker: a NaN with this exact bit pattern.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Is this value Prometheus' staleness marker (not an ordinary NaN)?
pub fn is_stale_marker(value: f64) -> bool {
    value.to_bits() == STALE_NAN_BITS
}

/// The table a metric goes to (see the module docs), or why it has none.
pub fn table_name(metric: &str) -> Result<String, String> {
    if metric.is_empty() {
        return Err("the metric name is empty".into());
    }
    let mut out = String::with_capacity(metric.len() + 1);
    if metric.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(metric.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    if out.len() > MAX_MEASUREMENT_BYTES {
        return Err(format!(
            "the metric name is {} bytes as a table name; the limit is {MAX_MEASUREMENT_BYTES}",
            out.len()
        ));
    }
    Ok(out)
}

/// A series ready to be stored: its table and its tags, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedSeries {
    pub table: String,
    pub tags: Vec<(String, String)>,
}

/// Maps a metric name and its labels (without `__name__`) to a table and tags; `ns` is the namespace of the
/// write, if any. The error says what is wrong with the series (the caller names the series).
pub fn map_series<'a>(
    metric: &str,
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ns: Option<&str>,
) -> Result<MappedSeries, String> {
    let table = table_name(metric)?;
    let mut tags: Vec<(String, String)> = Vec::new();
    let mut reserved: Vec<(&str, &str)> = Vec::new();
    for (name, value) in labels {
        if name.is_empty() {
            return Err("a label has an empty name".into());
        }
        if tags.iter().any(|(k, _)| k == name) || reserved.iter().any(|(k, _)| *k == name) {
            return Err(format!("label {name:?} appears twice"));
        }
        if value.is_empty() {
            // Prometheus treats an empty label value as an absent label.
            continue;
        }
        if name == TIME_COLUMN || name == VALUE_FIELD {
            reserved.push((name, value));
            continue;
        }
        check_tag(name, value).map_err(|m| format!("invalid label: {m}"))?;
        tags.push((name.to_owned(), value.to_owned()));
    }
    for (name, value) in reserved {
        let mut renamed = format!("{RENAMED_LABEL_PREFIX}{name}");
        while tags.iter().any(|(k, _)| *k == renamed) {
            renamed.insert_str(0, RENAMED_LABEL_PREFIX);
        }
        check_tag(&renamed, value).map_err(|m| format!("invalid label: {m}"))?;
        tags.push((renamed, value.to_owned()));
    }
    if let Some(ns) = ns {
        match tags.iter().find(|(k, _)| k == NS_TAG) {
            Some((_, v)) if v != ns => {
                return Err(format!(
                    "its label {NS_TAG}={v:?} contradicts the namespace of the write (ns={ns:?})"
                ));
            }
            Some(_) => {}
            None => tags.push((NS_TAG.to_owned(), ns.to_owned())),
        }
    }
    tags.sort_unstable();
    Ok(MappedSeries { table, tags })
}

/// Milliseconds since the epoch as the store's nanoseconds, or why not (before 1970, or past 2262).
pub fn time_ns(ms: i64) -> Result<i64, String> {
    if ms < 0 {
        return Err(format!("timestamp {ms} ms is before 1970-01-01T00:00:00Z"));
    }
    ms.checked_mul(1_000_000)
        .ok_or_else(|| format!("timestamp {ms} ms is past the year 2262"))
}

/// Gives a table as stored (None for a new table).
type SchemaLookup<'s> = dyn FnMut(&str) -> Option<TableSchema> + 's;

/// Checks series against the columns their tables already have, so that a conflict costs one series, not the
/// whole write: `value` must be (or become) an f64 field, each tag a tag. Each table's schema is read once.
pub struct SchemaGuard<'s> {
    /// The table as stored (None for a new table); asked once per table.
    lookup: Box<SchemaLookup<'s>>,
    tables: HashMap<String, Option<TableSchema>>,
}

impl<'s> SchemaGuard<'s> {
    /// Checks against the store's catalog.
    pub fn new(store: &'s Store) -> SchemaGuard<'s> {
        SchemaGuard::with_lookup(|table| store.with_state(|s| s.catalog.table(table).cloned()))
    }

    /// Checks against the tables `lookup` gives (the fuzz targets use an in-memory catalog).
    pub fn with_lookup(lookup: impl FnMut(&str) -> Option<TableSchema> + 's) -> SchemaGuard<'s> {
        SchemaGuard {
            lookup: Box::new(lookup),
            tables: HashMap::new(),
        }
    }

    pub fn check(&mut self, series: &MappedSeries) -> Result<(), String> {
        let lookup = &mut self.lookup;
        let schema = self
            .tables
            .entry(series.table.clone())
            .or_insert_with(|| lookup(&series.table));
        let Some(schema) = schema else {
            return Ok(());
        };
        match schema.get(VALUE_FIELD) {
            None | Some(ColumnKind::Field(FieldType::F64)) => {}
            Some(kind) => {
                return Err(format!(
                    "table {:?} already has {VALUE_FIELD:?} as a {kind}; Prometheus values are float fields",
                    series.table
                ));
            }
        }
        for (name, _) in &series.tags {
            match schema.get(name) {
                None | Some(ColumnKind::Tag) => {}
                Some(kind) => {
                    return Err(format!(
                        "table {:?} already has {name:?} as a {kind}; a label is a tag",
                        series.table
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One chunk being filled: its rows' series, times and values.
struct ChunkAcc {
    chunk: TableChunk,
    values: Vec<f64>,
}

/// Collects series and their samples into [`WriteBatch`]es of at most `max_rows` rows, one chunk per table and
/// tag-name set, tags once per series.
pub struct RowsBuilder {
    max_rows: usize,
    done: Vec<WriteBatch>,
    chunks: Vec<ChunkAcc>,
    /// (table, tag names) → index in `chunks` for the batch being filled.
    groups: HashMap<(String, Vec<String>), usize>,
    /// Rows in the batch being filled.
    in_batch: usize,
    total_rows: usize,
}

impl RowsBuilder {
    pub fn new(max_rows: usize) -> RowsBuilder {
        RowsBuilder {
            max_rows: max_rows.max(1),
            done: Vec::new(),
            chunks: Vec::new(),
            groups: HashMap::new(),
            in_batch: 0,
            total_rows: 0,
        }
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.total_rows
    }

    /// Adds one series' samples (`(time_ns, value)`); a series longer than what is left of the batch continues in
    /// the next one.
    pub fn push_series(&mut self, series: MappedSeries, samples: &[(i64, f64)]) {
        let mut rest = samples;
        let mut series = Some(series);
        while !rest.is_empty() {
            if self.in_batch == self.max_rows {
                self.seal();
            }
            let n = rest.len().min(self.max_rows - self.in_batch);
            let (now, later) = rest.split_at(n);
            // The last part takes the series' strings; earlier parts (other batches) get copies.
            let part = if later.is_empty() {
                series.take()
            } else {
                series.clone()
            };
            if let Some(part) = part {
                self.push_part(part, now);
            }
            rest = later;
        }
    }

    fn push_part(&mut self, series: MappedSeries, samples: &[(i64, f64)]) {
        let (names, values): (Vec<String>, Vec<String>) = series.tags.into_iter().unzip();
        let key = (series.table, names);
        let index = match self.groups.get(&key) {
            Some(&i) => i,
            None => {
                self.chunks.push(ChunkAcc {
                    chunk: TableChunk {
                        measurement: key.0.clone(),
                        tag_keys: key.1.clone(),
                        ..Default::default()
                    },
                    values: Vec::new(),
                });
                self.groups.insert(key, self.chunks.len() - 1);
                self.chunks.len() - 1
            }
        };
        let acc = &mut self.chunks[index];
        let local = u32::try_from(acc.chunk.series.len()).unwrap_or(u32::MAX);
        acc.chunk.series.push(Series { tag_values: values });
        for &(t, v) in samples {
            acc.chunk.series_index.push(local);
            acc.chunk.time_unix_nano.push(t);
            acc.values.push(v);
        }
        self.in_batch += samples.len();
        self.total_rows += samples.len();
    }

    fn seal(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let chunks = self
            .chunks
            .drain(..)
            .map(|mut acc| {
                acc.chunk.fields = vec![FieldColumn {
                    key: VALUE_FIELD.to_owned(),
                    f64: acc.values,
                    ..Default::default()
                }];
                acc.chunk
            })
            .collect();
        self.done.push(WriteBatch {
            chunks,
            ..Default::default()
        });
        self.groups.clear();
        self.in_batch = 0;
    }

    /// The batches, each of at most `max_rows` rows (none when nothing was added).
    pub fn finish(mut self) -> Vec<WriteBatch> {
        self.seal();
        self.done
    }
}

/// Why [`write_batches`] did not store everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFailure {
    /// The store refused a batch as invalid; the others were stored. `stored` rows are in.
    Rejected { message: String, stored: usize },
    /// The store is full: the batches from this one on were not stored (`stored` rows before were).
    Retry {
        message: String,
        after: std::time::Duration,
        stored: usize,
    },
}

/// Stores `batches` one after another. Rows stored are counted; a refused batch does not stop the others, a
/// "retry later" does (the sender will send everything again).
pub async fn write_batches(store: &Store, batches: Vec<WriteBatch>) -> Result<usize, WriteFailure> {
    let mut stored = 0;
    let mut rejected: Option<String> = None;
    for batch in batches {
        let outcome = store.write_unkeyed(batch).await;
        let protocol = crate::selfmetrics::Protocol::Prometheus;
        store.self_metrics().record_write(protocol, &outcome);
        match outcome {
            WriteOutcome::Stored { points } => stored += points,
            WriteOutcome::Duplicate => {}
            WriteOutcome::Rejected(message) => {
                rejected.get_or_insert(message);
            }
            WriteOutcome::Retry { message, after } => {
                return Err(WriteFailure::Retry {
                    message,
                    after,
                    stored,
                });
            }
        }
    }
    match rejected {
        Some(message) => Err(WriteFailure::Rejected { message, stored }),
        None => Ok(stored),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn table_names_are_sql_friendly() {
        assert_eq!(
            table_name("node_cpu_seconds_total").unwrap(),
            "node_cpu_seconds_total"
        );
        assert_eq!(
            table_name("node_memory_MemTotal_bytes").unwrap(),
            "node_memory_MemTotal_bytes"
        );
        assert_eq!(
            table_name("job:http_requests:rate5m").unwrap(),
            "job_http_requests_rate5m"
        );
        assert_eq!(
            table_name("http.server.duration").unwrap(),
            "http_server_duration"
        );
        assert_eq!(table_name("5xx").unwrap(), "_5xx");
        assert_eq!(table_name("größe").unwrap(), "gr__e");
        assert!(table_name("").unwrap_err().contains("empty"));
        assert!(table_name(&"a".repeat(129)).unwrap_err().contains("128"));
        for name in ["a", "_", ":", "é", "0", "a-b.c"] {
            crate::model::check_measurement(&table_name(name).unwrap()).unwrap();
        }
    }

    #[test]
    fn labels_become_sorted_tags_with_reserved_names_renamed() {
        let s = map_series(
            "up",
            [
                ("job", "node"),
                ("value", "v"),
                ("instance", "h:9100"),
                ("time", "t"),
                ("empty", ""),
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.table, "up");
        assert_eq!(
            s.tags,
            tags(&[
                ("instance", "h:9100"),
                ("job", "node"),
                ("label_time", "t"),
                ("label_value", "v")
            ])
        );
        let s = map_series("up", [("value", "a"), ("label_value", "b")], None).unwrap();
        assert_eq!(
            s.tags,
            tags(&[("label_label_value", "a"), ("label_value", "b")])
        );
    }

    #[test]
    fn namespace_is_a_tag_and_must_agree() {
        let s = map_series("up", [("job", "x")], Some("ns1")).unwrap();
        assert_eq!(s.tags, tags(&[("job", "x"), ("ns_id", "ns1")]));
        let s = map_series("up", [("ns_id", "ns1")], Some("ns1")).unwrap();
        assert_eq!(s.tags, tags(&[("ns_id", "ns1")]));
        let e = map_series("up", [("ns_id", "other")], Some("ns1")).unwrap_err();
        assert!(e.contains("contradicts"), "{e}");
        let s = map_series("up", [("ns_id", "own")], None).unwrap();
        assert_eq!(s.tags, tags(&[("ns_id", "own")]));
    }

    #[test]
    fn bad_labels_are_refused_with_reasons() {
        let e = map_series("up", [("", "x")], None).unwrap_err();
        assert!(e.contains("empty name"), "{e}");
        let e = map_series("up", [("a", "1"), ("a", "2")], None).unwrap_err();
        assert!(e.contains("\"a\" appears twice"), "{e}");
        let e = map_series("up", [("value", "1"), ("value", "2")], None).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
        let e = map_series("up", [("a\nb", "1")], None).unwrap_err();
        assert!(e.contains("control characters"), "{e}");
        let long = "x".repeat(300);
        let e = map_series("up", [(long.as_str(), "1")], None).unwrap_err();
        assert!(e.contains("256"), "{e}");
        let e = map_series("", [("a", "1")], None).unwrap_err();
        assert!(e.contains("metric name is empty"), "{e}");
    }

    #[test]
    fn stale_markers_and_times() {
        assert!(is_stale_marker(f64::from_bits(STALE_NAN_BITS)));
        assert!(!is_stale_marker(f64::NAN));
        assert_eq!(
            time_ns(1_700_000_000_123).unwrap(),
            1_700_000_000_123_000_000
        );
        assert!(time_ns(-1).unwrap_err().contains("before 1970"));
        assert!(time_ns(i64::MAX / 1000).unwrap_err().contains("2262"));
    }

    fn open_store(dir: &std::path::Path) -> Store {
        Store::open(&crate::config::CollectorConfig {
            data_dir: dir.to_path_buf(),
            wal_sync: crate::config::WalSync::None,
            max_batch_points: 10,
            ..crate::config::CollectorConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn conflicts_with_existing_columns_cost_one_series_and_batches_are_stored() {
        use damselfly_proto::v1::{Field, Point, Tag, field::Value};
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        // Another ingest path made `mode` a field of `mixed` and `value` a string field of `texty`.
        let point = |table: &str, field: &str, value: Value| Point {
            measurement: table.into(),
            tags: vec![Tag {
                key: "host".into(),
                value: "h".into(),
            }],
            fields: vec![Field {
                key: field.into(),
                value: Some(value),
            }],
            time_unix_nano: 1,
        };
        let outcome = store
            .write_unkeyed(WriteBatch {
                points: vec![
                    point("mixed", "mode", Value::I64(1)),
                    point("texty", "value", Value::Str("x".into())),
                ],
                ..Default::default()
            })
            .await;
        assert!(
            matches!(outcome, WriteOutcome::Stored { .. }),
            "{outcome:?}"
        );

        let mut guard = SchemaGuard::new(&store);
        let e = guard
            .check(&map_series("mixed", [("mode", "idle")], None).unwrap())
            .unwrap_err();
        assert!(
            e.contains("table \"mixed\" already has \"mode\" as a"),
            "{e}"
        );
        let e = guard
            .check(&map_series("texty", [("a", "b")], None).unwrap())
            .unwrap_err();
        assert!(e.contains("Prometheus values are float fields"), "{e}");
        let e = guard
            .check(&map_series("texty", [("host", "h")], None).unwrap())
            .unwrap_err();
        assert!(e.contains("\"value\""), "{e}");
        // Existing tags and new tables are fine.
        let ok = map_series("mixed", [("host", "h2")], None).unwrap();
        guard.check(&ok).unwrap();
        let fresh = map_series("fresh", [("x", "1")], None).unwrap();
        guard.check(&fresh).unwrap();

        // 25 rows with max_batch_points = 10: three batches, all stored.
        let mut builder = RowsBuilder::new(store.config().max_batch_points);
        let samples: Vec<(i64, f64)> = (0..20).map(|i| (i * 1_000_000, i as f64)).collect();
        builder.push_series(fresh, &samples);
        builder.push_series(ok, &samples[..5]);
        let batches = builder.finish();
        assert_eq!(batches.len(), 3);
        assert_eq!(write_batches(&store, batches).await, Ok(25));
        let rows = |table: &str| {
            store
                .snapshot(table)
                .map_or(0, |s| s.batches.iter().map(|b| b.num_rows()).sum::<usize>())
        };
        assert_eq!(rows("fresh"), 20);
        assert_eq!(rows("mixed"), 6);

        // A batch the store refuses does not stop the others; the count says what went in.
        let mut builder = RowsBuilder::new(10);
        builder.push_series(
            map_series("mixed", [("mode", "x")], None).unwrap(),
            &[(5, 1.0)],
        );
        let mut batches = builder.finish();
        let mut builder = RowsBuilder::new(10);
        builder.push_series(
            map_series("fresh", [("x", "2")], None).unwrap(),
            &[(5, 1.0)],
        );
        batches.extend(builder.finish());
        match write_batches(&store, batches).await {
            Err(WriteFailure::Rejected { message, stored }) => {
                assert_eq!(stored, 1);
                assert!(message.contains("mode"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rows_are_split_into_batches_of_at_most_max_rows() {
        let mut b = RowsBuilder::new(3);
        let a = map_series("m", [("x", "1")], None).unwrap();
        let c = map_series("m", [("x", "2")], None).unwrap();
        let other = map_series("n", [], None).unwrap();
        b.push_series(a, &[(1, 1.0), (2, 2.0)]);
        b.push_series(c, &[(3, 3.0), (4, 4.0), (5, 5.0)]);
        b.push_series(other, &[(6, 6.0)]);
        assert_eq!(b.rows(), 6);
        let batches = b.finish();
        assert_eq!(batches.len(), 2);
        let limits = crate::model::BatchLimits::points(3);
        let mut seen = Vec::new();
        for batch in batches {
            assert_eq!(damselfly_proto::columnar::batch_rows(&batch), 3);
            let batch = crate::model::prepare_unkeyed_batch(batch, limits).unwrap();
            for chunk in &batch.chunks {
                for (row, t) in chunk.time_unix_nano.iter().enumerate() {
                    let series = &chunk.series[damselfly_proto::columnar::series_of(chunk, row)];
                    seen.push((
                        chunk.measurement.clone(),
                        series.tag_values.clone(),
                        *t,
                        chunk.fields[0].f64[row],
                    ));
                }
            }
        }
        seen.sort_by_key(|r| r.2);
        let want: Vec<(String, Vec<String>, i64, f64)> = vec![
            ("m".into(), vec!["1".into()], 1, 1.0),
            ("m".into(), vec!["1".into()], 2, 2.0),
            ("m".into(), vec!["2".into()], 3, 3.0),
            ("m".into(), vec!["2".into()], 4, 4.0),
            ("m".into(), vec!["2".into()], 5, 5.0),
            ("n".into(), vec![], 6, 6.0),
        ];
        assert_eq!(seen, want);
        assert!(RowsBuilder::new(10).finish().is_empty());
    }
}
