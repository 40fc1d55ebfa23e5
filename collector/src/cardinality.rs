//! The series-per-namespace limit (`max_series_per_namespace`): a namespace whose senders invent tag values
//! (a request id, a timestamp in a tag) would otherwise grow the store's series without bound, and with them
//! memory, file sizes and query times for every tenant.
//!
//! A series is a table plus its full tag set; its namespace is its `ns_id` tag (rows without one count under the
//! empty namespace). The writer asks [`SeriesCounts::admit`] before a batch reaches the WAL: a batch that would
//! take a namespace over the limit is refused as a whole, with a message naming the namespace, the count, the
//! limit and a series it would have added, and nothing of it is stored. Series already known never count twice.
//!
//! What is counted: every series written since start-up (the WAL replay included), plus the series in the
//! Parquet files present at start-up, read once in the background with the last-value cache's warm-up (until a
//! table is read, its file series are not counted). Series whose rows retention removes stay counted until the
//! next start. With shards, each shard counts the series it stores.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use damselfly_proto::v1::{TableChunk, Tag, WriteBatch};

use crate::model::chunk_common_tags;

/// The tag holding a row's namespace.
const NS_TAG: &str = "ns_id";

/// Known series per namespace, as hashes of (table, sorted tags).
#[derive(Debug, Default)]
pub struct SeriesCounts {
    /// 0: no limit, nothing counted.
    max_per_namespace: usize,
    namespaces: HashMap<String, HashSet<u64>>,
    /// Tables whose start-up files are not counted yet.
    unwarmed: HashSet<String>,
}

/// New series of admitted batches that are not durable yet: [`SeriesCounts::commit`] records them once the WAL
/// has the batches. The batches of one group commit collect theirs in one, so they count each other's series.
#[derive(Debug, Default)]
pub struct Pending {
    new: HashMap<String, HashSet<u64>>,
}

impl Pending {
    /// Adds another admitted batch's new series.
    pub fn merge(&mut self, other: Pending) {
        for (namespace, hashes) in other.new {
            self.new.entry(namespace).or_default().extend(hashes);
        }
    }
}

/// One series of a chunk: its namespace and identity.
struct SeriesId<'a> {
    namespace: &'a str,
    hash: u64,
}

impl SeriesCounts {
    /// Counts limited to `max_per_namespace` series per namespace (0: off).
    pub fn new(max_per_namespace: usize) -> SeriesCounts {
        SeriesCounts {
            max_per_namespace,
            ..SeriesCounts::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_per_namespace > 0
    }

    /// Series known in `namespace`.
    pub fn series(&self, namespace: &str) -> usize {
        self.namespaces.get(namespace).map_or(0, HashSet::len)
    }

    /// Marks tables whose start-up files must be read (see [`SeriesCounts::warmed`]).
    pub fn needs_warming(&mut self, tables: impl IntoIterator<Item = String>) {
        if self.enabled() {
            self.unwarmed.extend(tables);
        }
    }

    /// Tables waiting for [`SeriesCounts::warmed`].
    pub fn unwarmed(&self) -> impl Iterator<Item = &str> {
        self.unwarmed.iter().map(String::as_str)
    }

    /// Counts the series of `table`'s start-up files: `rows` holds at least one row per series, `tags` names the
    /// table's tag columns. Never refuses: these series are stored already.
    pub fn warmed(&mut self, table: &str, rows: &[RecordBatch], tags: &[String]) {
        if !self.unwarmed.remove(table) {
            return;
        }
        for batch in rows {
            let columns: Vec<(&str, &dyn Array)> = tags
                .iter()
                .filter_map(|name| Some((name.as_str(), batch.column_by_name(name)?.as_ref())))
                .collect();
            let mut row_tags: Vec<(&str, String)> = Vec::with_capacity(columns.len());
            for row in 0..batch.num_rows() {
                row_tags.clear();
                for (name, column) in &columns {
                    if let Some(value) = string_at(*column, row) {
                        row_tags.push((name, value));
                    }
                }
                row_tags.sort_unstable();
                let namespace = row_tags
                    .iter()
                    .find(|(k, _)| *k == NS_TAG)
                    .map_or("", |(_, v)| v.as_str());
                let hash = series_hash(table, row_tags.iter().map(|(k, v)| (*k, v.as_str())));
                self.insert(namespace, hash);
            }
        }
    }

    /// The series `batch` (validated and normalized) would add to those known and those of `pending` (batches
    /// admitted earlier in the same group commit), or why it is refused: a namespace would go over the limit.
    pub fn admit(&self, batch: &WriteBatch, pending: &Pending) -> Result<Pending, String> {
        let mut admitted = Pending::default();
        if !self.enabled() {
            return Ok(admitted);
        }
        let mut first_new: HashMap<&str, (&TableChunk, usize)> = HashMap::new();
        for chunk in &batch.chunks {
            for index in 0..chunk.series.len().max(1) {
                let id = series_id(chunk, &batch.common_tags, index);
                let known = self
                    .namespaces
                    .get(id.namespace)
                    .is_some_and(|s| s.contains(&id.hash))
                    || pending
                        .new
                        .get(id.namespace)
                        .is_some_and(|s| s.contains(&id.hash));
                if !known {
                    first_new.entry(id.namespace).or_insert((chunk, index));
                    match admitted.new.get_mut(id.namespace) {
                        Some(set) => {
                            set.insert(id.hash);
                        }
                        None => {
                            admitted
                                .new
                                .insert(id.namespace.to_string(), HashSet::from([id.hash]));
                        }
                    }
                }
            }
        }
        for (namespace, added) in &admitted.new {
            let count = self.series(namespace) + pending.new.get(namespace).map_or(0, HashSet::len);
            if count + added.len() > self.max_per_namespace {
                let example = first_new
                    .get(namespace.as_str())
                    .map(|(chunk, index)| describe_series(chunk, &batch.common_tags, *index))
                    .unwrap_or_default();
                return Err(format!(
                    "namespace {} has {count} series and this batch adds {} new ones: over the limit of {} \
                     series per namespace (max_series_per_namespace); nothing of the batch was stored. A new \
                     series: {example}. Tags whose values never repeat (ids, times) make a series per row: make \
                     them fields",
                    describe_namespace(namespace),
                    added.len(),
                    self.max_per_namespace,
                ));
            }
        }
        Ok(admitted)
    }

    /// Records the series of admitted batches that are now durable.
    pub fn commit(&mut self, pending: Pending) {
        for (namespace, hashes) in pending.new {
            self.namespaces.entry(namespace).or_default().extend(hashes);
        }
    }

    /// Counts the series of a batch that is stored already (WAL replay). Never refuses.
    pub fn observe(&mut self, batch: &WriteBatch) {
        if !self.enabled() {
            return;
        }
        for chunk in &batch.chunks {
            for index in 0..chunk.series.len().max(1) {
                let id = series_id(chunk, &batch.common_tags, index);
                let namespace = id.namespace.to_string();
                self.insert(&namespace, id.hash);
            }
        }
    }

    fn insert(&mut self, namespace: &str, hash: u64) {
        match self.namespaces.get_mut(namespace) {
            Some(set) => {
                set.insert(hash);
            }
            None => {
                self.namespaces
                    .entry(namespace.to_string())
                    .or_default()
                    .insert(hash);
            }
        }
    }
}

/// The tags of series `index` of a chunk (common tags the chunk does not override, then its own), sorted by key.
/// A chunk without series has one series of common tags only.
pub fn series_tags<'a>(
    chunk: &'a TableChunk,
    common_tags: &'a [Tag],
    index: usize,
) -> Vec<(&'a str, &'a str)> {
    let mut tags: Vec<(&str, &str)> = chunk_common_tags(chunk, common_tags)
        .map(|t| (t.key.as_str(), t.value.as_str()))
        .collect();
    if let Some(series) = chunk.series.get(index) {
        tags.extend(
            chunk
                .tag_keys
                .iter()
                .map(String::as_str)
                .zip(series.tag_values.iter().map(String::as_str)),
        );
    }
    tags.sort_unstable();
    tags
}

fn series_id<'a>(chunk: &'a TableChunk, common_tags: &'a [Tag], index: usize) -> SeriesId<'a> {
    let tags = series_tags(chunk, common_tags, index);
    let namespace = tags
        .iter()
        .find(|(k, _)| *k == NS_TAG)
        .map_or("", |(_, v)| *v);
    SeriesId {
        namespace,
        hash: series_hash(&chunk.measurement, tags.into_iter()),
    }
}

/// A stable hash of a table and its sorted tags; lengths are hashed too, so no tag value can make two tag sets
/// alike. 64 bits: a collision among a million series has a chance of about 3 in 100 million, and would only
/// leave one series uncounted.
fn series_hash<'a>(table: &str, tags: impl Iterator<Item = (&'a str, &'a str)>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    table.hash(&mut hasher);
    for (key, value) in tags {
        key.hash(&mut hasher);
        value.hash(&mut hasher);
    }
    hasher.finish()
}

/// A tag column's value at `row` as text (tags are strings, possibly dictionary-encoded); `None` when null.
fn string_at(column: &dyn Array, row: usize) -> Option<String> {
    if column.is_null(row) {
        return None;
    }
    match column.data_type() {
        DataType::Utf8 => Some(column.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Some(column.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Some(column.as_string_view().value(row).to_string()),
        DataType::Dictionary(_, _) => {
            let cast = arrow::compute::cast(&column.slice(row, 1), &DataType::Utf8).ok()?;
            let strings = cast.as_string::<i32>();
            (!strings.is_null(0)).then(|| strings.value(0).to_string())
        }
        _ => None,
    }
}

fn describe_namespace(namespace: &str) -> String {
    if namespace.is_empty() {
        "(rows without ns_id)".to_string()
    } else {
        format!("{namespace:?}")
    }
}

fn describe_series(chunk: &TableChunk, common_tags: &[Tag], index: usize) -> String {
    let tags: Vec<String> = series_tags(chunk, common_tags, index)
        .into_iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    format!("{}{{{}}}", chunk.measurement, tags.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::Series;

    fn batch(ns: &str, table: &str, hosts: &[&str]) -> WriteBatch {
        WriteBatch {
            common_tags: vec![Tag {
                key: NS_TAG.into(),
                value: ns.into(),
            }],
            chunks: vec![TableChunk {
                measurement: table.into(),
                tag_keys: vec!["host".into()],
                series: hosts
                    .iter()
                    .map(|h| Series {
                        tag_values: vec![h.to_string()],
                    })
                    .collect(),
                series_index: (0..hosts.len() as u32).collect(),
                time_unix_nano: vec![1; hosts.len()],
                fields: Vec::new(),
            }],
            ..Default::default()
        }
    }

    fn write(counts: &mut SeriesCounts, batch: &WriteBatch) -> Result<(), String> {
        let admitted = counts.admit(batch, &Pending::default())?;
        counts.commit(admitted);
        Ok(())
    }

    #[test]
    fn a_namespace_is_limited_and_known_series_always_pass() {
        let mut counts = SeriesCounts::new(3);
        write(&mut counts, &batch("a", "cpu", &["h1", "h2"])).expect("2 of 3");
        // Known series again, plus one new: 3 of 3.
        write(&mut counts, &batch("a", "cpu", &["h1", "h2", "h3"])).expect("3 of 3");
        let e = write(&mut counts, &batch("a", "cpu", &["h1", "h4"])).expect_err("4 of 3");
        assert!(
            e.contains("namespace \"a\" has 3 series and this batch adds 1 new ones"),
            "{e}"
        );
        assert!(e.contains("max_series_per_namespace"), "{e}");
        assert!(e.contains("cpu{host=\"h4\", ns_id=\"a\"}"), "{e}");
        assert_eq!(counts.series("a"), 3);
        // Known series still pass; another table is another series; other namespaces have their own count.
        write(&mut counts, &batch("a", "cpu", &["h3", "h1"])).expect("known");
        assert!(write(&mut counts, &batch("a", "mem", &["h1"])).is_err());
        write(&mut counts, &batch("b", "cpu", &["h4", "h5", "h6"])).expect("b has its own");
        assert_eq!(counts.series("b"), 3);
    }

    #[test]
    fn batches_of_one_group_count_each_other() {
        let counts = SeriesCounts::new(2);
        let mut pending = Pending::default();
        let first = counts
            .admit(&batch("a", "cpu", &["h1", "h2"]), &pending)
            .expect("first");
        pending.merge(first);
        let again = counts
            .admit(&batch("a", "cpu", &["h2", "h1"]), &pending)
            .expect("same series");
        assert!(again.new.is_empty());
        assert!(counts.admit(&batch("a", "cpu", &["h3"]), &pending).is_err());
        // Not durable yet: nothing counted.
        assert_eq!(counts.series("a"), 0);
    }

    #[test]
    fn replay_and_start_up_files_count_without_refusing() {
        let mut counts = SeriesCounts::new(1);
        counts.observe(&batch("a", "cpu", &["h1", "h2"]));
        assert_eq!(counts.series("a"), 2);

        counts.needs_warming(["cpu".to_string()]);
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("host", DataType::Utf8, true),
            arrow::datatypes::Field::new("ns_id", DataType::Utf8, true),
            arrow::datatypes::Field::new("usage", DataType::Float64, true),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                std::sync::Arc::new(arrow::array::StringArray::from(vec!["h1", "h3"])),
                std::sync::Arc::new(arrow::array::StringArray::from(vec![Some("a"), None])),
                std::sync::Arc::new(arrow::array::Float64Array::from(vec![1.0, 2.0])),
            ],
        )
        .expect("rows");
        counts.warmed("cpu", &[rows], &["host".into(), "ns_id".into()]);
        // h1 of a is the same series as written (same hash from either side); h3 has no namespace.
        assert_eq!(counts.series("a"), 2);
        assert_eq!(counts.series(""), 1);
        assert_eq!(counts.unwarmed().count(), 0);
    }

    #[test]
    fn off_counts_nothing() {
        let mut counts = SeriesCounts::new(0);
        write(&mut counts, &batch("a", "cpu", &["h1", "h2"])).expect("no limit");
        counts.observe(&batch("a", "cpu", &["h3"]));
        assert_eq!(counts.series("a"), 0);
    }
}
