//! The data model the collector stores: tables (measurements) of tag, field and time columns, and the stateless
//! validation of incoming batches (names, sizes, timestamps) that happens before anything touches the WAL.

use std::fmt;

use arrow::datatypes::{DataType, TimeUnit};
use damselfly_proto::v1::{Point, WriteBatch, field::Value};

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
}

/// Checks everything about a batch that does not depend on stored state. On success the batch can be written to
/// the WAL and applied to the buffer without further checks other than the schema (see the catalog).
pub fn validate_batch(batch: &WriteBatch, limits: BatchLimits) -> Result<(), InvalidBatch> {
    check_agent_id(&batch.agent_id).map_err(InvalidBatch)?;
    if batch.seq == 0 {
        return Err(InvalidBatch("seq must be at least 1".into()));
    }
    if batch.points.is_empty() {
        return Err(InvalidBatch("batch has no points".into()));
    }
    if batch.points.len() > limits.max_points {
        return Err(InvalidBatch(format!(
            "batch has {} points; the limit is {}",
            batch.points.len(),
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
        validate_point(point).map_err(|m| {
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
    Ok(())
}

fn validate_point(point: &Point) -> Result<(), String> {
    check_measurement(&point.measurement)?;
    if point.fields.is_empty() {
        return Err("no fields".into());
    }
    if point.time_unix_nano < 0 {
        return Err(format!(
            "timestamp {} is before 1970-01-01T00:00:00Z",
            point.time_unix_nano
        ));
    }
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
            agent_id: "a1".into(),
            seq: 1,
            common_tags: vec![],
            points,
        }
    }

    const LIMITS: BatchLimits = BatchLimits { max_points: 10 };

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
}
