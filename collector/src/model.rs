//! The data model the collector stores: tables (measurements) of tag, field and time columns, and the stateless
//! validation of incoming batches (names, sizes, timestamps) that happens before anything touches the WAL.
//!
//! Timestamps are bounded around the collector's clock ([`BatchLimits::earliest_ns`]/[`BatchLimits::latest_ns`],
//! from `max_time_skew_secs` and `max_time_age_secs`): an agent whose clock is years off would otherwise put its
//! rows into partitions nobody looks at, that retention never reaches (the future) or drops at once (the past).

use std::fmt;

use arrow::datatypes::{DataType, TimeUnit};
use damselfly_proto::columnar::{self, batch_rows, chunk_rows, column_len, column_type_name};
use damselfly_proto::v1::{Point, TableChunk, Tag, WriteBatch, field::Value};

/// Name of the timestamp column in every table.
pub const TIME_COLUMN: &str = "time";
/// Longest tag or field name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest measurement name, in bytes.
pub const MAX_MEASUREMENT_BYTES: usize = 128;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_BYTES: usize = 64 * 1024;
/// Longest string field value, in bytes.
pub const MAX_STRING_FIELD_BYTES: usize = 1024 * 1024;
/// Longest agent id, in bytes.
pub const MAX_AGENT_ID_BYTES: usize = 256;

/// The Arrow type of the `time` column: nanoseconds, UTC.
/// The wall clock in nanoseconds since the Unix epoch (0 before it, saturating far after it).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The wall clock in milliseconds since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn time_data_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The Arrow type of tag columns: dictionary-encoded strings.
pub fn tag_data_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// A field's value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    F64,
    I64,
    U64,
    Bool,
    Str,
}

impl FieldType {
    pub fn of(value: &Value) -> FieldType {
        match value {
            Value::F64(_) => FieldType::F64,
            Value::I64(_) => FieldType::I64,
            Value::U64(_) => FieldType::U64,
            Value::Bool(_) => FieldType::Bool,
            Value::Str(_) => FieldType::Str,
        }
    }

    /// The type of a validated columnar field (see `columnar::column_type_name`).
    pub fn of_column(column: &damselfly_proto::v1::FieldColumn) -> Option<FieldType> {
        Some(match column_type_name(column)? {
            "float" => FieldType::F64,
            "integer" => FieldType::I64,
            "unsigned" => FieldType::U64,
            "boolean" => FieldType::Bool,
            _ => FieldType::Str,
        })
    }

    pub fn data_type(self) -> DataType {
        match self {
            FieldType::F64 => DataType::Float64,
            FieldType::I64 => DataType::Int64,
            FieldType::U64 => DataType::UInt64,
            FieldType::Bool => DataType::Boolean,
            FieldType::Str => DataType::Utf8,
        }
    }

    pub fn from_data_type(data_type: &DataType) -> Option<FieldType> {
        Some(match data_type {
            DataType::Float64 => FieldType::F64,
            DataType::Int64 => FieldType::I64,
            DataType::UInt64 => FieldType::U64,
            DataType::Boolean => FieldType::Bool,
            DataType::Utf8 => FieldType::Str,
            _ => return None,
        })
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FieldType::F64 => "float",
            FieldType::I64 => "integer",
            FieldType::U64 => "unsigned",
            FieldType::Bool => "boolean",
            FieldType::Str => "string",
        })
    }
}

/// What a column of a table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnKind {
    Tag,
    Field(FieldType),
}

impl fmt::Display for ColumnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnKind::Tag => f.write_str("tag"),
            ColumnKind::Field(t) => write!(f, "{t} field"),
        }
    }
}

/// Why a batch was refused before it reached the WAL. The message names the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidBatch(pub String);

/// Limits applied by [`validate_batch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_points: usize,
    /// Rows before this time (ns since the epoch) are refused, with `max_time_age_secs` named as the bound.
    pub earliest_ns: i64,
    /// Rows after this time are refused, with `max_time_skew_secs` named as the bound.
    pub latest_ns: i64,
}

impl BatchLimits {
    /// Only a point count; timestamps from 1970 to the year 2262 pass.
    pub const fn points(max_points: usize) -> BatchLimits {
        BatchLimits {
            max_points,
            earliest_ns: 0,
            latest_ns: i64::MAX,
        }
    }

    /// `max_points` and the clock bounds around `now_ns`: at most `max_skew_secs` ahead, at most `max_age_secs`
    /// behind (0 turns a bound off).
    pub fn around(now_ns: i64, max_points: usize, max_skew_secs: u64, max_age_secs: u64) -> Self {
        let span = |secs: u64| {
            i64::try_from(secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000_000)
        };
        BatchLimits {
            max_points,
            earliest_ns: if max_age_secs == 0 {
                0
            } else {
                now_ns.saturating_sub(span(max_age_secs)).max(0)
            },
            latest_ns: if max_skew_secs == 0 {
                i64::MAX
            } else {
                now_ns.saturating_add(span(max_skew_secs))
            },
        }
    }

    /// Why `t` is out of bounds, if it is: the row's time, the bound and the setting, so an operator can tell a
    /// wrong agent clock from a wrong setting.
    fn check_time(&self, t: i64) -> Result<(), String> {
        if t < 0 {
            return Err(format!("timestamp {t} is before 1970-01-01T00:00:00Z"));
        }
        if t > self.latest_ns {
            return Err(format!(
                "timestamp {} ({t}) is after {}, the latest the collector accepts (its clock plus \
                 max_time_skew_secs): is the sender's clock ahead?",
                rfc3339(t),
                rfc3339(self.latest_ns)
            ));
        }
        if t < self.earliest_ns {
            return Err(format!(
                "timestamp {} ({t}) is before {}, the earliest the collector accepts (its clock minus \
                 max_time_age_secs): is the sender's clock behind?",
                rfc3339(t),
                rfc3339(self.earliest_ns)
            ));
        }
        Ok(())
    }
}

/// `2036-11-26T05:51:31.5Z` for nanoseconds since the epoch.
fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Checks everything about a batch that does not depend on stored state. On success the batch can be written to
/// the WAL and applied to the buffer without further checks other than the schema (see the catalog).
pub fn validate_batch(batch: &WriteBatch, limits: BatchLimits) -> Result<(), InvalidBatch> {
    check_agent_id(&batch.agent_id).map_err(InvalidBatch)?;
    if batch.seq == 0 {
        return Err(InvalidBatch("seq must be at least 1".into()));
    }
    validate_content(batch, limits)
}

/// [`prepare_batch`] for a batch without an (agent id, seq) key (see `Store::write_unkeyed`).
pub fn prepare_unkeyed_batch(
    mut batch: WriteBatch,
    limits: BatchLimits,
) -> Result<WriteBatch, InvalidBatch> {
    validate_content(&batch, limits)?;
    normalize(&mut batch)?;
    Ok(batch)
}

/// Everything [`validate_batch`] checks but the key.
fn validate_content(batch: &WriteBatch, limits: BatchLimits) -> Result<(), InvalidBatch> {
    let rows = batch_rows(batch);
    if rows == 0 {
        return Err(InvalidBatch("batch has no points".into()));
    }
    if rows > limits.max_points {
        return Err(InvalidBatch(format!(
            "batch has {rows} points; the limit is {}",
            limits.max_points
        )));
    }
    for (i, tag) in batch.common_tags.iter().enumerate() {
        check_tag(&tag.key, &tag.value)
            .map_err(|m| InvalidBatch(format!("common tag {i}: {m}")))?;
    }
    for (i, tag) in batch.common_tags.iter().enumerate() {
        if batch.common_tags[..i].iter().any(|t| t.key == tag.key) {
            return Err(InvalidBatch(format!(
                "common tag {:?} appears twice",
                tag.key
            )));
        }
    }
    for (i, point) in batch.points.iter().enumerate() {
        validate_point(point, &limits).map_err(|m| {
            InvalidBatch(format!(
                "point {i} (measurement {:?}): {m}",
                truncate(&point.measurement, 64)
            ))
        })?;
        // A common tag must not collide with a field name of the point.
        for tag in &batch.common_tags {
            if point.fields.iter().any(|f| f.key == tag.key) {
                return Err(InvalidBatch(format!(
                    "point {i} (measurement {:?}): {:?} is both a common tag and a field",
                    point.measurement, tag.key
                )));
            }
        }
    }
    for (i, chunk) in batch.chunks.iter().enumerate() {
        validate_chunk(chunk, &batch.common_tags, &limits).map_err(|m| {
            InvalidBatch(format!(
                "chunk {i} (measurement {:?}): {m}",
                truncate(&chunk.measurement, 64)
            ))
        })?;
    }
    Ok(())
}

/// Validates a batch and brings it to the one shape the WAL, the catalog and the buffer handle: every row in
/// `chunks`, none in `points`.
pub fn prepare_batch(
    mut batch: WriteBatch,
    limits: BatchLimits,
) -> Result<WriteBatch, InvalidBatch> {
    validate_batch(&batch, limits)?;
    normalize(&mut batch)?;
    Ok(batch)
}

/// Moves a (validated) batch's points into columnar chunks. Batches in the WAL from before chunks existed go through
/// this on replay too.
pub fn normalize(batch: &mut WriteBatch) -> Result<(), InvalidBatch> {
    if batch.points.is_empty() {
        return Ok(());
    }
    let chunks =
        columnar::points_to_chunks(&batch.points).map_err(|e| InvalidBatch(e.to_string()))?;
    batch.points.clear();
    batch.chunks.extend(chunks);
    Ok(())
}

/// The tags of a chunk's rows: the batch's common tags not overridden by the chunk's own, then the chunk's.
pub fn chunk_common_tags<'a>(
    chunk: &'a TableChunk,
    common_tags: &'a [Tag],
) -> impl Iterator<Item = &'a Tag> + 'a {
    common_tags
        .iter()
        .filter(move |c| !chunk.tag_keys.contains(&c.key))
}

fn validate_chunk(
    chunk: &TableChunk,
    common_tags: &[Tag],
    limits: &BatchLimits,
) -> Result<(), String> {
    check_measurement(&chunk.measurement)?;
    let rows = chunk_rows(chunk);
    if rows == 0 {
        return Err("no rows (time_unix_nano is empty)".into());
    }
    if chunk.fields.is_empty() {
        return Err("no field columns".into());
    }
    for (i, key) in chunk.tag_keys.iter().enumerate() {
        check_name("tag", key)?;
        if chunk.tag_keys[..i].contains(key) {
            return Err(format!("tag {key:?} appears twice"));
        }
    }
    for (i, series) in chunk.series.iter().enumerate() {
        if series.tag_values.len() != chunk.tag_keys.len() {
            return Err(format!(
                "series {i} has {} tag values for {} tag names",
                series.tag_values.len(),
                chunk.tag_keys.len()
            ));
        }
        for (key, value) in chunk.tag_keys.iter().zip(&series.tag_values) {
            check_tag(key, value)?;
        }
    }
    if chunk.series.is_empty() && !chunk.tag_keys.is_empty() {
        return Err("tag names are given but no series".into());
    }
    if chunk.series_index.is_empty() {
        if chunk.series.len() > 1 {
            return Err(format!(
                "series_index is empty but there are {} series",
                chunk.series.len()
            ));
        }
    } else {
        if chunk.series_index.len() != rows {
            return Err(format!(
                "series_index has {} entries for {rows} rows",
                chunk.series_index.len()
            ));
        }
        let series = chunk.series.len();
        if let Some((row, index)) = chunk
            .series_index
            .iter()
            .enumerate()
            .find(|(_, i)| **i as usize >= series)
        {
            return Err(format!(
                "row {row} refers to series {index} but there are {series}"
            ));
        }
    }
    for (row, &t) in chunk.time_unix_nano.iter().enumerate() {
        limits
            .check_time(t)
            .map_err(|m| format!("row {row}: {m}"))?;
    }
    for (i, column) in chunk.fields.iter().enumerate() {
        let key = &column.key;
        check_name("field", key)?;
        if chunk.fields[..i].iter().any(|f| &f.key == key) {
            return Err(format!("field {key:?} appears twice"));
        }
        if chunk.tag_keys.contains(key) {
            return Err(format!("{key:?} is both a tag and a field"));
        }
        if common_tags.iter().any(|t| &t.key == key) {
            return Err(format!("{key:?} is both a common tag and a field"));
        }
        if column_type_name(column).is_none() {
            return Err(format!(
                "field {key:?} must have values in exactly one of f64, i64, u64, bool, str"
            ));
        }
        let values = column_len(column);
        if column.present.is_empty() {
            if values != rows {
                return Err(format!(
                    "field {key:?} has {values} values for {rows} rows and no presence bitmap"
                ));
            }
        } else {
            if column.present.len() != rows.div_ceil(8) {
                return Err(format!(
                    "field {key:?} presence bitmap has {} bytes; {rows} rows need {}",
                    column.present.len(),
                    rows.div_ceil(8)
                ));
            }
            let mut set = column
                .present
                .iter()
                .map(|b| b.count_ones() as usize)
                .sum::<usize>();
            if !rows.is_multiple_of(8) {
                let last = column.present[rows / 8];
                set -= (last >> (rows % 8)).count_ones() as usize;
            }
            if set != values {
                return Err(format!(
                    "field {key:?} has {values} values but its presence bitmap marks {set} rows"
                ));
            }
        }
        if let Some(s) = column.str.iter().find(|s| s.len() > MAX_STRING_FIELD_BYTES) {
            return Err(format!(
                "string field {key:?} has a value of {} bytes; the limit is {MAX_STRING_FIELD_BYTES}",
                s.len()
            ));
        }
    }
    Ok(())
}

fn validate_point(point: &Point, limits: &BatchLimits) -> Result<(), String> {
    check_measurement(&point.measurement)?;
    if point.fields.is_empty() {
        return Err("no fields".into());
    }
    limits.check_time(point.time_unix_nano)?;
    for (i, tag) in point.tags.iter().enumerate() {
        check_tag(&tag.key, &tag.value)?;
        if point.tags[..i].iter().any(|t| t.key == tag.key) {
            return Err(format!("tag {:?} appears twice", tag.key));
        }
    }
    for (i, field) in point.fields.iter().enumerate() {
        check_name("field", &field.key)?;
        let Some(value) = &field.value else {
            return Err(format!("field {:?} has no value", field.key));
        };
        if let Value::Str(s) = value
            && s.len() > MAX_STRING_FIELD_BYTES
        {
            return Err(format!(
                "string field {:?} is {} bytes; the limit is {MAX_STRING_FIELD_BYTES}",
                field.key,
                s.len()
            ));
        }
        if point.fields[..i].iter().any(|f| f.key == field.key) {
            return Err(format!("field {:?} appears twice", field.key));
        }
        if point.tags.iter().any(|t| t.key == field.key) {
            return Err(format!("{:?} is both a tag and a field", field.key));
        }
    }
    Ok(())
}

/// Measurement names become table names and directory names: a portable, SQL-friendly alphabet.
pub fn check_measurement(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("measurement name is empty".into());
    }
    if name.len() > MAX_MEASUREMENT_BYTES {
        return Err(format!(
            "measurement name is {} bytes; the limit is {MAX_MEASUREMENT_BYTES}",
            name.len()
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "measurement name {:?} must start with a letter or '_' and contain only [A-Za-z0-9_.-]",
            truncate(name, 64)
        ));
    }
    Ok(())
}

/// An agent id (batches, registrations, heartbeats): 1..=[`MAX_AGENT_ID_BYTES`] bytes without control characters.
pub fn check_agent_id(agent_id: &str) -> Result<(), String> {
    if agent_id.is_empty() {
        return Err("agent_id is empty".into());
    }
    if agent_id.len() > MAX_AGENT_ID_BYTES || has_control_chars(agent_id) {
        return Err(format!(
            "agent_id must be 1-{MAX_AGENT_ID_BYTES} bytes without control characters"
        ));
    }
    Ok(())
}

/// A tag: its name (see [`MAX_NAME_BYTES`]) and a value of at most [`MAX_TAG_VALUE_BYTES`].
pub fn check_tag(key: &str, value: &str) -> Result<(), String> {
    check_name("tag", key)?;
    if value.len() > MAX_TAG_VALUE_BYTES {
        return Err(format!(
            "tag {:?} value is {} bytes; the limit is {MAX_TAG_VALUE_BYTES}",
            key,
            value.len()
        ));
    }
    Ok(())
}

/// A field name: see [`MAX_NAME_BYTES`]; no control characters; not `time`.
pub fn check_field_name(name: &str) -> Result<(), String> {
    check_name("field", name)
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{what} name is {} bytes; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if has_control_chars(name) {
        return Err(format!(
            "{what} name {:?} contains control characters",
            truncate(name, 64)
        ));
    }
    if name == TIME_COLUMN {
        return Err(format!(
            "{what} name \"time\" is reserved for the timestamp"
        ));
    }
    Ok(())
}

fn has_control_chars(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::{Field, Tag};

    fn point(measurement: &str) -> Point {
        Point {
            measurement: measurement.into(),
            tags: vec![Tag {
                key: "cpu".into(),
                value: "cpu0".into(),
            }],
            fields: vec![Field {
                key: "usage_user".into(),
                value: Some(Value::F64(1.5)),
            }],
            time_unix_nano: 1_700_000_000_000_000_000,
        }
    }

    fn batch(points: Vec<Point>) -> WriteBatch {
        WriteBatch {
            chunks: Vec::new(),
            agent_id: "a1".into(),
            seq: 1,
            common_tags: vec![],
            points,
        }
    }

    const LIMITS: BatchLimits = BatchLimits::points(10);

    #[test]
    fn timestamps_outside_the_clock_bounds_name_the_bound() {
        const HOUR: i64 = 3_600_000_000_000;
        let now = 1_700_000_000_000_000_000;
        let limits = BatchLimits::around(now, 10, 7 * 24 * 3600, 30 * 24 * 3600);
        let at = |t: i64| {
            let mut p = point("cpu");
            p.time_unix_nano = t;
            validate_batch(&batch(vec![point("cpu"), p]), limits)
        };
        assert_eq!(at(now + 7 * 24 * HOUR), Ok(()));
        assert_eq!(at(now - 30 * 24 * HOUR), Ok(()));
        let ahead = at(now + 7 * 24 * HOUR + 1).expect_err("ahead").0;
        assert!(
            ahead.starts_with(
                "point 1 (measurement \"cpu\"): timestamp 2023-11-21T22:13:20.000000001Z"
            ),
            "{ahead}"
        );
        assert!(
            ahead.contains("max_time_skew_secs") && ahead.contains("2023-11-21T22:13:20Z"),
            "{ahead}"
        );
        let behind = at(now - 30 * 24 * HOUR - 1).expect_err("behind").0;
        assert!(
            behind.contains("max_time_age_secs")
                && behind.contains("2023-10-15T22:13:19.999999999Z"),
            "{behind}"
        );
        // 0 turns a bound off.
        let open = BatchLimits::around(now, 10, 0, 0);
        assert_eq!(
            validate_batch(
                &batch(vec![Point {
                    time_unix_nano: i64::MAX,
                    ..point("cpu")
                }]),
                open
            ),
            Ok(())
        );
    }

    #[test]
    fn accepts_a_good_batch() {
        assert_eq!(validate_batch(&batch(vec![point("cpu")]), LIMITS), Ok(()));
    }

    #[test]
    fn names_the_problem() {
        let cases: Vec<(WriteBatch, &str)> = vec![
            (batch(vec![point("")]), "measurement name is empty"),
            (batch(vec![point("a/b")]), "must start with a letter"),
            (batch(vec![]), "no points"),
            (
                batch((0..11).map(|_| point("cpu")).collect()),
                "the limit is 10",
            ),
            (
                WriteBatch {
                    chunks: Vec::new(),
                    seq: 0,
                    ..batch(vec![point("cpu")])
                },
                "seq must be at least 1",
            ),
        ];
        for (b, want) in cases {
            let err = validate_batch(&b, LIMITS).expect_err(want);
            assert!(err.0.contains(want), "{err} should contain {want}");
        }
        let mut p = point("cpu");
        p.fields.push(p.fields[0].clone());
        let err = validate_batch(&batch(vec![p]), LIMITS).expect_err("dup field");
        assert!(err.0.contains("appears twice"), "{err}");
        let mut p = point("cpu");
        p.time_unix_nano = -1;
        let err = validate_batch(&batch(vec![p]), LIMITS).expect_err("negative time");
        assert!(err.0.contains("before 1970"), "{err}");
        let mut p = point("cpu");
        p.fields[0].key = "time".into();
        let err = validate_batch(&batch(vec![p]), LIMITS).expect_err("reserved");
        assert!(err.0.contains("reserved"), "{err}");
    }

    #[test]
    fn chunks_are_checked_column_by_column() {
        use damselfly_proto::v1::{FieldColumn, Series, TableChunk};
        let good = || TableChunk {
            measurement: "cpu".into(),
            tag_keys: vec!["cpu".into()],
            series: vec![Series {
                tag_values: vec!["cpu0".into()],
            }],
            series_index: vec![],
            time_unix_nano: vec![1, 2, 3],
            fields: vec![FieldColumn {
                key: "u".into(),
                f64: vec![1.0, 2.0],
                present: vec![0b101],
                ..Default::default()
            }],
        };
        let with = |chunk: TableChunk| WriteBatch {
            chunks: vec![chunk],
            ..batch(vec![])
        };
        assert_eq!(validate_batch(&with(good()), LIMITS), Ok(()));
        let cases: Vec<(TableChunk, &str)> = vec![
            (
                TableChunk {
                    series_index: vec![0, 1, 0],
                    ..good()
                },
                "row 1 refers to series 1 but there are 1",
            ),
            (
                TableChunk {
                    series_index: vec![0],
                    ..good()
                },
                "series_index has 1 entries for 3 rows",
            ),
            (
                TableChunk {
                    time_unix_nano: vec![1, -5, 3],
                    ..good()
                },
                "row 1: timestamp -5 is before 1970",
            ),
            (
                TableChunk {
                    series: vec![Series { tag_values: vec![] }],
                    ..good()
                },
                "series 0 has 0 tag values for 1 tag names",
            ),
            (
                TableChunk {
                    fields: vec![FieldColumn {
                        key: "u".into(),
                        f64: vec![1.0],
                        i64: vec![1],
                        ..Default::default()
                    }],
                    ..good()
                },
                "exactly one of f64",
            ),
            (
                TableChunk {
                    fields: vec![FieldColumn {
                        key: "u".into(),
                        f64: vec![1.0, 2.0],
                        present: vec![0b111],
                        ..Default::default()
                    }],
                    ..good()
                },
                "has 2 values but its presence bitmap marks 3 rows",
            ),
            (
                TableChunk {
                    fields: vec![FieldColumn {
                        key: "u".into(),
                        f64: vec![1.0, 2.0],
                        ..Default::default()
                    }],
                    ..good()
                },
                "has 2 values for 3 rows",
            ),
            (
                TableChunk {
                    fields: vec![FieldColumn {
                        key: "cpu".into(),
                        f64: vec![1.0, 2.0, 3.0],
                        ..Default::default()
                    }],
                    ..good()
                },
                "is both a tag and a field",
            ),
        ];
        for (chunk, want) in cases {
            let err = validate_batch(&with(chunk), LIMITS).expect_err(want);
            assert!(err.0.contains(want), "{err} should contain {want}");
            assert!(err.0.starts_with("chunk 0 (measurement \"cpu\")"), "{err}");
        }
        let too_many = TableChunk {
            time_unix_nano: vec![1; 11],
            fields: vec![FieldColumn {
                key: "u".into(),
                f64: vec![1.0; 11],
                ..Default::default()
            }],
            ..good()
        };
        let err = validate_batch(&with(too_many), LIMITS).expect_err("limit");
        assert!(err.0.contains("11 points; the limit is 10"), "{err}");
    }
}
