//! The InfluxDB line protocol, parsed straight into columnar chunks.
//!
//! ```text
//! measurement[,tag=value...] field=value[,field=value...] [timestamp]
//! ```
//!
//! The rules are InfluxDB's (<https://docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol/>):
//! measurement names escape `,` and space with a backslash; tag keys, tag values and field keys escape `,`, `=`
//! and space; string field values are double-quoted and escape `"` and `\`; a backslash before any other
//! character is itself. Field values: `1.5`, `-2e10` (float), `3i` (integer), `4u` (unsigned), `t`/`true`/
//! `false`/... (boolean), `"text"` (string). NaN and infinities are not numbers line protocol can carry. The
//! timestamp is an integer in the request's precision; without one, the line gets the request's arrival time.
//! Lines starting with `#` are comments; blank lines are skipped; `\r\n` endings are accepted.
//!
//! A bad line is reported with its (1-based) number and the reason, and the other lines are kept, as InfluxDB
//! does for partial writes. Besides syntax, a line is refused when it would make the batch fail as a whole in the
//! store: a name the data model does not allow, a field whose type differs from earlier lines of the request or
//! from the stored table, a tag that is a field of the table (or the reverse), a timestamp out of range, or a tag
//! that contradicts one the request forces (the namespace taken from the bucket).
//!
//! Speed: lines of a series already seen in the request are recognised by their raw `measurement,tags` bytes
//! (one hash lookup, no unescaping, no allocation), and field columns are matched in the order the previous line
//! used, so the common shape (many lines of the same measurements and fields) costs one pass over the bytes.

use std::borrow::Cow;
use std::collections::HashMap;

use damselfly_proto::v1::{FieldColumn, Series, TableChunk};

use crate::catalog::TableSchema;
use crate::model::{
    ColumnKind, FieldType, MAX_STRING_FIELD_BYTES, check_field_name, check_measurement, check_tag,
};

/// The unit of the timestamps of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// The v2 API's `precision`: `ns`, `us`, `ms` or `s`.
    pub fn parse_v2(text: &str) -> Result<Precision, String> {
        match text {
            "ns" => Ok(Precision::Nanoseconds),
            "us" => Ok(Precision::Microseconds),
            "ms" => Ok(Precision::Milliseconds),
            "s" => Ok(Precision::Seconds),
            other => Err(format!("precision {other:?} is not one of ns, us, ms, s")),
        }
    }

    /// The v1 API's `precision`: `n`/`ns`, `u`/`us`, `ms`, `s`, `m` or `h`.
    pub fn parse_v1(text: &str) -> Result<Precision, String> {
        match text {
            "n" | "ns" => Ok(Precision::Nanoseconds),
            "u" | "us" | "µ" => Ok(Precision::Microseconds),
            "ms" => Ok(Precision::Milliseconds),
            "s" => Ok(Precision::Seconds),
            "m" => Ok(Precision::Minutes),
            "h" => Ok(Precision::Hours),
            other => Err(format!(
                "precision {other:?} is not one of n, ns, u, us, ms, s, m, h"
            )),
        }
    }

    fn nanos(self) -> i64 {
        match self {
            Precision::Nanoseconds => 1,
            Precision::Microseconds => 1_000,
            Precision::Milliseconds => 1_000_000,
            Precision::Seconds => 1_000_000_000,
            Precision::Minutes => 60_000_000_000,
            Precision::Hours => 3_600_000_000_000,
        }
    }
}

/// How to parse one request body.
#[derive(Debug, Clone)]
pub struct ParseOptions<'a> {
    pub precision: Precision,
    /// The time of lines without a timestamp (nanoseconds since the epoch): the request's arrival.
    pub default_time_ns: i64,
    /// Longest line accepted, in bytes.
    pub max_line_bytes: usize,
    /// Tags every row gets (the namespace from the bucket): a line may repeat one with the same value, but a line
    /// that gives it another value is refused.
    pub forced_tags: &'a [(&'a str, &'a str)],
}

/// A refused line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the (decompressed) body.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// The outcome of parsing a body.
#[derive(Debug, Default)]
pub struct ParsedBody {
    /// The accepted rows, one chunk per (measurement, tag names), in order of first appearance. The forced tags
    /// are not in them: send them as the batch's common tags.
    pub chunks: Vec<TableChunk>,
    /// Accepted lines (rows).
    pub rows: usize,
    /// Refused lines, in order.
    pub errors: Vec<LineError>,
}

/// Parses a whole body. `stored_schema` is asked once per measurement for the table as stored (None for a new
/// table), so that lines conflicting with it are refused one by one rather than failing the whole write.
pub fn parse(
    body: &[u8],
    options: &ParseOptions<'_>,
    stored_schema: &mut dyn FnMut(&str) -> Option<TableSchema>,
) -> ParsedBody {
    let mut parser = Parser {
        body,
        options,
        stored_schema,
        tables: Vec::new(),
        table_by_name: HashMap::new(),
        chunks: Vec::new(),
        chunk_by_shape: HashMap::new(),
        series_by_raw_key: ahash::HashMap::default(),
        fields: Vec::new(),
        irregular_line: false,
        errors: Vec::new(),
        rows: 0,
    };
    parser.run();
    let rows = parser.rows;
    let errors = parser.errors;
    let chunks = parser
        .chunks
        .into_iter()
        .filter(|c| c.rows > 0)
        .map(ChunkBuilder::finish)
        .collect();
    ParsedBody {
        chunks,
        rows,
        errors,
    }
}

/// The columns of one measurement: as stored, plus what this request has added. Keeps the request consistent
/// with itself and with the store across all of the measurement's chunks.
struct TableKinds {
    kinds: HashMap<String, ColumnKind>,
}

struct ChunkBuilder {
    table: usize,
    chunk: TableChunk,
    series_by_values: HashMap<Vec<String>, u32>,
    /// Field columns, in `chunk.fields` order; `present` is grown as rows arrive.
    column_types: Vec<FieldType>,
    values: Vec<usize>,
    rows: usize,
}

impl ChunkBuilder {
    fn finish(mut self) -> TableChunk {
        let rows = self.rows;
        if self.chunk.series.len() <= 1 {
            self.chunk.series_index.clear();
        }
        // A column created by a line that then failed has no values: drop it.
        let mut keep = self.values.iter().map(|&n| n > 0);
        self.chunk.fields.retain(|_| keep.next().unwrap_or(false));
        let counts: Vec<usize> = self.values.into_iter().filter(|&n| n > 0).collect();
        for (column, count) in self.chunk.fields.iter_mut().zip(counts) {
            if count == rows {
                column.present.clear();
            } else {
                column.present.resize(rows.div_ceil(8), 0);
            }
        }
        self.chunk
    }
}

/// Where a raw series key (`measurement,tags`) goes.
#[derive(Clone, Copy)]
struct SeriesRef {
    chunk: u32,
    series: u32,
}

/// A parsed field value.
enum FieldValue<'a> {
    F64(f64),
    I64(i64),
    U64(u64),
    Bool(bool),
    Str(Cow<'a, str>),
}

impl FieldValue<'_> {
    fn field_type(&self) -> FieldType {
        match self {
            FieldValue::F64(_) => FieldType::F64,
            FieldValue::I64(_) => FieldType::I64,
            FieldValue::U64(_) => FieldType::U64,
            FieldValue::Bool(_) => FieldType::Bool,
            FieldValue::Str(_) => FieldType::Str,
        }
    }
}

/// A field of the line being parsed, before it is applied.
struct PendingField<'a> {
    key: Cow<'a, str>,
    value: FieldValue<'a>,
    /// The column it goes to, if the chunk has it already; `None` means a new column.
    column: Option<usize>,
}

struct Parser<'b, 'o, 's> {
    body: &'b [u8],
    options: &'o ParseOptions<'o>,
    stored_schema: &'s mut dyn FnMut(&str) -> Option<TableSchema>,
    tables: Vec<TableKinds>,
    table_by_name: HashMap<String, usize>,
    chunks: Vec<ChunkBuilder>,
    chunk_by_shape: HashMap<(usize, Vec<String>), usize>,
    series_by_raw_key: ahash::HashMap<&'b [u8], SeriesRef>,
    fields: Vec<PendingField<'b>>,
    /// Whether a field of the current line was not where the previous line had it (or is new): only then can a
    /// later field of the line repeat its name unnoticed by the positional match, so only then is it searched for.
    irregular_line: bool,
    errors: Vec<LineError>,
    rows: usize,
}

/// A failure inside a line: the message and where parsing stopped (to find the line's end from there).
struct Failure {
    message: String,
    at: usize,
}

fn fail<T>(at: usize, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        message: message.into(),
        at,
    })
}

impl<'b> Parser<'b, '_, '_> {
    fn run(&mut self) {
        let body = self.body;
        let mut pos = 0;
        let mut line_no = 1;
        while pos < body.len() {
            // Skip blank space at the start of a line, counting newlines.
            match body[pos] {
                b'\n' => {
                    line_no += 1;
                    pos += 1;
                    continue;
                }
                b' ' | b'\t' | b'\r' => {
                    pos += 1;
                    continue;
                }
                b'#' => {
                    pos = line_end(body, pos);
                    continue;
                }
                _ => {}
            }
            let start = pos;
            let newline = line_end(body, start);
            let result = if newline - start > self.options.max_line_bytes {
                fail(
                    newline,
                    format!(
                        "the line is {} bytes; the limit is {} (max_line_bytes)",
                        newline - start,
                        self.options.max_line_bytes
                    ),
                )
            } else {
                self.line(start)
            };
            match result {
                Ok(end) => {
                    // `end` is at the newline ending the line (or the end of the body), unless a string value
                    // spanned newlines.
                    if end != newline {
                        line_no += count_newlines(&body[start..end]);
                    }
                    pos = end;
                }
                Err(failure) => {
                    let end = line_end(body, failure.at.max(start).min(body.len()));
                    self.errors.push(LineError {
                        line: line_no,
                        message: format!("{}: {}", failure.message, quote_line(&body[start..end])),
                    });
                    line_no += count_newlines(&body[start..end]);
                    pos = end;
                }
            }
        }
    }

    /// Parses and applies one line starting at `start`; returns the position of its ending newline (or the end).
    fn line(&mut self, start: usize) -> Result<usize, Failure> {
        let body = self.body;
        let key_end = series_key_end(body, start)?;
        let series = match self.series_by_raw_key.get(&body[start..key_end]) {
            Some(&s) => s,
            None => {
                let s = self.new_series(start, key_end)?;
                self.series_by_raw_key.insert(&body[start..key_end], s);
                s
            }
        };
        let mut pos = key_end;
        while pos < body.len() && body[pos] == b' ' {
            pos += 1;
        }
        self.fields.clear();
        self.irregular_line = false;
        pos = self.parse_fields(pos, series.chunk as usize)?;
        // Optional timestamp.
        while pos < body.len() && body[pos] == b' ' {
            pos += 1;
        }
        let time = if pos < body.len() && body[pos] != b'\n' && body[pos] != b'\r' {
            let (t, next) = self.timestamp(pos)?;
            pos = next;
            t
        } else {
            self.options.default_time_ns
        };
        while pos < body.len() && matches!(body[pos], b' ' | b'\r' | b'\t') {
            pos += 1;
        }
        if pos < body.len() && body[pos] != b'\n' {
            return fail(pos, "unexpected text after the timestamp");
        }
        self.apply(series, time)?;
        Ok(pos)
    }

    /// The slow path for a series not seen before in this request: unescape and check the measurement and tags,
    /// then find or make its chunk and series.
    fn new_series(&mut self, start: usize, end: usize) -> Result<SeriesRef, Failure> {
        let body = self.body;
        let raw = &body[start..end];
        let (measurement_raw, mut rest) = split_unescaped(raw, b",");
        let measurement = unescape(measurement_raw).map_err(|m| Failure {
            message: format!("measurement {m}"),
            at: start,
        })?;
        if measurement.is_empty() {
            return fail(start, "missing measurement");
        }
        check_measurement(&measurement).map_err(|m| Failure {
            message: m,
            at: start,
        })?;
        let mut tags: Vec<(Cow<'b, str>, Cow<'b, str>)> = Vec::new();
        while let Some(after_comma) = rest {
            let (pair, next) = split_unescaped(after_comma, b",");
            rest = next;
            let (key_raw, value_raw) = match split_unescaped(pair, b"=") {
                (k, Some(v)) => (k, v),
                (_, None) => return fail(start, "a tag has no '=' (expected key=value)"),
            };
            let key = unescape(key_raw).map_err(|m| Failure {
                message: format!("tag key {m}"),
                at: start,
            })?;
            let value = unescape(value_raw).map_err(|m| Failure {
                message: format!("tag value {m}"),
                at: start,
            })?;
            if key.is_empty() {
                return fail(start, "a tag key is empty");
            }
            if value.is_empty() {
                return fail(start, format!("tag {key:?} has an empty value"));
            }
            check_tag(&key, &value).map_err(|m| Failure {
                message: m,
                at: start,
            })?;
            if tags.iter().any(|(k, _)| *k == key) {
                return fail(start, format!("tag {key:?} appears twice"));
            }
            tags.push((key, value));
        }
        // A forced tag (the namespace) may be repeated with the same value; it is dropped from the line's tags,
        // since the batch carries it for every row.
        for (forced_key, forced_value) in self.options.forced_tags {
            if let Some(i) = tags.iter().position(|(k, _)| k == forced_key) {
                if tags[i].1 != *forced_value {
                    return fail(
                        start,
                        format!(
                            "tag {forced_key}={:?} contradicts the request's {forced_key}={forced_value:?} \
                             (from the bucket or db)",
                            tags[i].1
                        ),
                    );
                }
                tags.remove(i);
            }
        }
        tags.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let table = self.table(&measurement);
        for (key, _) in &tags {
            if let Some(ColumnKind::Field(t)) = self.tables[table].kinds.get(key.as_ref()) {
                return fail(
                    start,
                    format!(
                        "tag {key:?} is {} field of table {measurement:?}",
                        article(*t)
                    ),
                );
            }
        }
        let keys: Vec<String> = tags.iter().map(|(k, _)| k.to_string()).collect();
        let chunk = match self.chunk_by_shape.get(&(table, keys.clone())) {
            Some(&c) => c,
            None => {
                for key in &keys {
                    self.tables[table]
                        .kinds
                        .insert(key.clone(), ColumnKind::Tag);
                }
                self.chunks.push(ChunkBuilder {
                    table,
                    chunk: TableChunk {
                        measurement: measurement.into_owned(),
                        tag_keys: keys.clone(),
                        ..Default::default()
                    },
                    series_by_values: HashMap::new(),
                    column_types: Vec::new(),
                    values: Vec::new(),
                    rows: 0,
                });
                self.chunk_by_shape
                    .insert((table, keys), self.chunks.len() - 1);
                self.chunks.len() - 1
            }
        };
        let values: Vec<String> = tags.into_iter().map(|(_, v)| v.into_owned()).collect();
        let builder = &mut self.chunks[chunk];
        let next = builder.chunk.series.len() as u32;
        let series = *builder
            .series_by_values
            .entry(values)
            .or_insert_with_key(|values| {
                builder.chunk.series.push(Series {
                    tag_values: values.clone(),
                });
                next
            });
        Ok(SeriesRef {
            chunk: chunk as u32,
            series,
        })
    }

    fn table(&mut self, measurement: &str) -> usize {
        if let Some(&t) = self.table_by_name.get(measurement) {
            return t;
        }
        let kinds = (self.stored_schema)(measurement)
            .map(|schema| {
                schema
                    .columns()
                    .map(|(name, kind)| (name.to_owned(), kind))
                    .collect()
            })
            .unwrap_or_default();
        self.tables.push(TableKinds { kinds });
        self.table_by_name
            .insert(measurement.to_owned(), self.tables.len() - 1);
        self.tables.len() - 1
    }

    /// Parses `key=value[,key=value...]` into `self.fields`, checking each against the chunk's columns.
    fn parse_fields(&mut self, mut pos: usize, chunk: usize) -> Result<usize, Failure> {
        let body = self.body;
        if pos >= body.len() || matches!(body[pos], b'\n' | b'\r') {
            return fail(pos, "missing fields");
        }
        loop {
            // Key, up to an unescaped '='.
            let key_start = pos;
            let mut escaped = false;
            while pos < body.len() {
                match body[pos] {
                    b'=' => break,
                    b'\\' => {
                        escaped = true;
                        pos += 2;
                    }
                    b' ' | b',' | b'\n' => {
                        return fail(
                            pos,
                            format!(
                                "field {:?} has no '=' (expected key=value)",
                                String::from_utf8_lossy(&body[key_start..pos])
                            ),
                        );
                    }
                    _ => pos += 1,
                }
            }
            if pos >= body.len() {
                return fail(pos, "missing field value (the line ends after a field key)");
            }
            let key_raw = &body[key_start..pos];
            if key_raw.is_empty() {
                return fail(pos, "a field key is empty");
            }
            let key: Cow<'b, str> = if escaped {
                unescape(key_raw).map_err(|m| Failure {
                    message: format!("field key {m}"),
                    at: pos,
                })?
            } else {
                Cow::Borrowed(std::str::from_utf8(key_raw).map_err(|_| Failure {
                    message: "field key is not valid UTF-8".into(),
                    at: pos,
                })?)
            };
            pos += 1; // '='
            let (value, next) = self.field_value(pos, &key)?;
            pos = next;
            let column = self.check_field(chunk, &key, &value, pos)?;
            if column != Some(self.fields.len()) {
                self.irregular_line = true;
            }
            self.fields.push(PendingField { key, value, column });
            match body.get(pos) {
                Some(b',') => pos += 1,
                _ => return Ok(pos),
            }
        }
    }

    fn field_value(&self, start: usize, key: &str) -> Result<(FieldValue<'b>, usize), Failure> {
        let body = self.body;
        if start >= body.len() || matches!(body[start], b' ' | b',' | b'\n' | b'\r') {
            return fail(start, format!("field {key:?} has no value"));
        }
        if body[start] == b'"' {
            return self.string_value(start + 1, key);
        }
        let mut end = start;
        while end < body.len() && !matches!(body[end], b' ' | b',' | b'\n' | b'\r') {
            end += 1;
        }
        let text = &body[start..end];
        let bad = |what: &str| -> Result<(FieldValue<'b>, usize), Failure> {
            fail(
                start,
                format!(
                    "field {key:?} has an invalid {what} value {:?}",
                    String::from_utf8_lossy(&text[..text.len().min(64)])
                ),
            )
        };
        let value = match text {
            b"t" | b"T" | b"true" | b"True" | b"TRUE" => FieldValue::Bool(true),
            b"f" | b"F" | b"false" | b"False" | b"FALSE" => FieldValue::Bool(false),
            [digits @ .., b'i'] => match parse_i64(digits) {
                Some(v) => FieldValue::I64(v),
                None => return bad("integer"),
            },
            [digits @ .., b'u'] => match parse_u64(digits) {
                Some(v) => FieldValue::U64(v),
                None => return bad("unsigned integer"),
            },
            _ => match parse_f64(text) {
                Some(v) => FieldValue::F64(v),
                None => return bad("float"),
            },
        };
        Ok((value, end))
    }

    /// A double-quoted string starting after the opening quote; it may span newlines.
    fn string_value(&self, start: usize, key: &str) -> Result<(FieldValue<'b>, usize), Failure> {
        let body = self.body;
        let mut pos = start;
        let mut escaped = false;
        loop {
            match memchr::memchr2(b'"', b'\\', &body[pos..]) {
                None => {
                    return fail(
                        body.len(),
                        format!("string field {key:?} has no closing quote"),
                    );
                }
                Some(i) => {
                    pos += i;
                    if body[pos] == b'\\' {
                        escaped = true;
                        pos += 2;
                        if pos > body.len() {
                            return fail(
                                body.len(),
                                format!("string field {key:?} has no closing quote"),
                            );
                        }
                    } else {
                        break;
                    }
                }
            }
        }
        let raw = &body[start..pos];
        if raw.len() > MAX_STRING_FIELD_BYTES {
            return fail(
                pos,
                format!(
                    "string field {key:?} is {} bytes; the limit is {MAX_STRING_FIELD_BYTES}",
                    raw.len()
                ),
            );
        }
        let text = std::str::from_utf8(raw).map_err(|_| Failure {
            message: format!("string field {key:?} is not valid UTF-8"),
            at: pos,
        })?;
        let value = if escaped {
            let mut out = String::with_capacity(text.len());
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '\\'
                    && let Some(&next) = chars.peek()
                    && (next == '"' || next == '\\')
                {
                    out.push(next);
                    chars.next();
                } else {
                    out.push(c);
                }
            }
            Cow::Owned(out)
        } else {
            Cow::Borrowed(text)
        };
        Ok((FieldValue::Str(value), pos + 1))
    }

    /// Finds the field's column in the chunk (trying the same position as the line before first) and checks its
    /// type against the chunk, the rest of the request and the stored table.
    fn check_field(
        &self,
        chunk: usize,
        key: &str,
        value: &FieldValue<'_>,
        at: usize,
    ) -> Result<Option<usize>, Failure> {
        let builder = &self.chunks[chunk];
        let fields = &builder.chunk.fields;
        let guess = self.fields.len();
        let column = if fields.get(guess).is_some_and(|c| c.key == key) {
            Some(guess)
        } else {
            fields.iter().position(|c| c.key == key)
        };
        let wanted = value.field_type();
        // Fields at their positional column so far each took a different column, the one at their own index: a
        // name can only repeat when some field was elsewhere.
        if (self.irregular_line || column != Some(guess))
            && self.fields.iter().any(|f| f.key == key)
        {
            return fail(at, format!("field {key:?} appears twice"));
        }
        match column {
            Some(i) => {
                let have = builder.column_types[i];
                if have != wanted {
                    return fail(
                        at,
                        format!(
                            "field type conflict: {key:?} is {} here but {} in table {:?}",
                            article(wanted),
                            article(have),
                            builder.chunk.measurement
                        ),
                    );
                }
                Ok(Some(i))
            }
            None => {
                check_field_name(key).map_err(|m| Failure { message: m, at })?;
                match self.tables[builder.table].kinds.get(key) {
                    Some(ColumnKind::Tag) => fail(
                        at,
                        format!(
                            "field {key:?} is a tag of table {:?}",
                            builder.chunk.measurement
                        ),
                    ),
                    Some(ColumnKind::Field(have)) if *have != wanted => fail(
                        at,
                        format!(
                            "field type conflict: {key:?} is {} here but {} in table {:?}",
                            article(wanted),
                            article(*have),
                            builder.chunk.measurement
                        ),
                    ),
                    _ if self.options.forced_tags.iter().any(|(k, _)| *k == key) => fail(
                        at,
                        format!("field {key:?} has the name of the request's tag {key:?}"),
                    ),
                    _ => Ok(None),
                }
            }
        }
    }

    fn timestamp(&self, start: usize) -> Result<(i64, usize), Failure> {
        let body = self.body;
        let mut end = start;
        while end < body.len() && !matches!(body[end], b' ' | b'\n' | b'\r' | b'\t') {
            end += 1;
        }
        let text = &body[start..end];
        let Some(t) = parse_i64(text) else {
            let digits = text.strip_prefix(b"-").unwrap_or(text);
            if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
                return fail(
                    start,
                    format!(
                        "timestamp {} is out of range",
                        String::from_utf8_lossy(&text[..text.len().min(64)])
                    ),
                );
            }
            return fail(
                start,
                format!(
                    "invalid timestamp {:?} (expected an integer)",
                    String::from_utf8_lossy(&text[..text.len().min(64)])
                ),
            );
        };
        let Some(ns) = t.checked_mul(self.options.precision.nanos()) else {
            return fail(
                start,
                format!("timestamp {t} is out of range for its precision"),
            );
        };
        if ns < 0 {
            return fail(
                start,
                format!("timestamp {t} is before 1970-01-01T00:00:00Z"),
            );
        }
        Ok((ns, end))
    }

    /// Appends the parsed line (`self.fields`) as a row of its chunk. Everything was checked before, so this only
    /// fails for a line whose fields are all missing.
    fn apply(&mut self, series: SeriesRef, time: i64) -> Result<(), Failure> {
        let chunk = series.chunk as usize;
        let table = self.chunks[chunk].table;
        let fields = std::mem::take(&mut self.fields);
        let builder = &mut self.chunks[chunk];
        let row = builder.rows;
        for field in &fields {
            let index = match field.column {
                Some(i) => i,
                None => {
                    // Two new fields of one line can't be the same column: duplicates were refused.
                    let t = field.value.field_type();
                    builder.chunk.fields.push(FieldColumn {
                        key: field.key.to_string(),
                        ..Default::default()
                    });
                    builder.column_types.push(t);
                    builder.values.push(0);
                    self.tables[table]
                        .kinds
                        .insert(field.key.to_string(), ColumnKind::Field(t));
                    builder.chunk.fields.len() - 1
                }
            };
            let column = &mut builder.chunk.fields[index];
            match &field.value {
                FieldValue::F64(v) => column.f64.push(*v),
                FieldValue::I64(v) => column.i64.push(*v),
                FieldValue::U64(v) => column.u64.push(*v),
                FieldValue::Bool(v) => column.bool.push(*v),
                FieldValue::Str(v) => column.str.push(v.to_string()),
            }
            let byte = row / 8;
            if column.present.len() <= byte {
                column.present.resize(byte + 1, 0);
            }
            column.present[byte] |= 1 << (row % 8);
            builder.values[index] += 1;
        }
        builder.chunk.series_index.push(series.series);
        builder.chunk.time_unix_nano.push(time);
        builder.rows += 1;
        self.rows += 1;
        self.fields = fields;
        Ok(())
    }
}

/// "a float", "an integer": for messages.
fn article(t: FieldType) -> String {
    match t {
        FieldType::I64 | FieldType::U64 => format!("an {t}"),
        _ => format!("a {t}"),
    }
}

/// The end of the series key (measurement and tags): the first unescaped space. A line without one has no fields.
fn series_key_end(body: &[u8], start: usize) -> Result<usize, Failure> {
    let mut pos = start;
    loop {
        match memchr::memchr3(b' ', b'\\', b'\n', &body[pos..]) {
            None => return fail(body.len(), "missing fields"),
            Some(i) => {
                pos += i;
                match body[pos] {
                    b'\\' => pos += 2,
                    b'\n' => return fail(pos, "missing fields"),
                    _ => return Ok(pos),
                }
                if pos >= body.len() {
                    return fail(body.len(), "missing fields");
                }
            }
        }
    }
}

/// The position of the newline ending the line that contains `pos`, or the body's end.
fn line_end(body: &[u8], pos: usize) -> usize {
    memchr::memchr(b'\n', &body[pos..]).map_or(body.len(), |i| pos + i)
}

fn count_newlines(bytes: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', bytes).count()
}

/// Splits at the first unescaped byte of `separators`: (before, Some(after)) or (all, None).
fn split_unescaped<'a>(bytes: &'a [u8], separators: &[u8]) -> (&'a [u8], Option<&'a [u8]>) {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if separators.contains(&bytes[i]) {
            return (&bytes[..i], Some(&bytes[i + 1..]));
        }
        i += 1;
    }
    (bytes, None)
}

/// Removes the escapes of a name or tag value: a backslash before `,`, `=`, space or backslash stands for that
/// character; before anything else it is kept.
fn unescape(bytes: &[u8]) -> Result<Cow<'_, str>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not valid UTF-8".to_owned())?;
    if !text.contains('\\') {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next) = chars.peek()
            && matches!(next, ',' | '=' | ' ' | '\\')
        {
            out.push(next);
            chars.next();
        } else {
            out.push(c);
        }
    }
    Ok(Cow::Owned(out))
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    let digits = digits.strip_prefix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let magnitude = parse_u64(digits)?;
    if negative {
        if magnitude == 1u64 << 63 {
            Some(i64::MIN)
        } else {
            i64::try_from(magnitude).ok().map(|v| -v)
        }
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Powers of ten that f64 holds exactly.
const EXACT_POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Plain decimals (`-12.34`: at most 15 digits, no exponent), the common case, without the general algorithm:
/// the digits as an integer and the power of ten are both exact in f64, so one division rounds correctly
/// (Clinger's fast path). Anything else returns None and goes the general way.
fn parse_simple_decimal(text: &[u8]) -> Option<f64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let mut mantissa: u64 = 0;
    let mut count = 0;
    let mut fraction_digits = None;
    for (i, &b) in digits.iter().enumerate() {
        match b {
            b'0'..=b'9' => {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                count += 1;
                if count > 15 {
                    return None;
                }
            }
            b'.' if fraction_digits.is_none() => fraction_digits = Some(digits.len() - i - 1),
            _ => return None,
        }
    }
    if count == 0 {
        return None;
    }
    let value = mantissa as f64 / EXACT_POWERS_OF_TEN[fraction_digits.unwrap_or(0)];
    Some(if negative { -value } else { value })
}

/// A finite float in decimal notation (`1`, `-1.5`, `.5`, `1e-3`); `NaN`, `inf` and hex are refused.
fn parse_f64(text: &[u8]) -> Option<f64> {
    if let Some(v) = parse_simple_decimal(text) {
        return Some(v);
    }
    if text.is_empty()
        || !text
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return None;
    }
    let v: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
    v.is_finite().then_some(v)
}

/// The start of a bad line for its error message.
fn quote_line(line: &[u8]) -> String {
    const MAX: usize = 120;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() <= MAX {
        format!("{:?}", String::from_utf8_lossy(line))
    } else {
        format!("{:?}...", String::from_utf8_lossy(&line[..MAX]))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use damselfly_proto::columnar::is_present;

    const NOW: i64 = 1_700_000_000_000_000_000;

    fn options() -> ParseOptions<'static> {
        ParseOptions {
            precision: Precision::Nanoseconds,
            default_time_ns: NOW,
            max_line_bytes: 1024,
            forced_tags: &[],
        }
    }

    fn parse_str(text: &str) -> ParsedBody {
        parse(text.as_bytes(), &options(), &mut |_| None)
    }

    fn column<'a>(chunk: &'a TableChunk, key: &str) -> &'a FieldColumn {
        chunk.fields.iter().find(|c| c.key == key).unwrap()
    }

    #[test]
    fn parses_types_tags_and_timestamps() {
        let parsed = parse_str(
            "cpu,host=a,region=eu usage=1.5,count=3i,big=18446744073709551615u,ok=t,note=\"hi\" 10\n\
             cpu,region=eu,host=a usage=2,count=-4i,big=0u,ok=FALSE,note=\"x\" 20\n\
             cpu,host=b,region=eu usage=-1e-3,count=5i,big=1u,ok=false,note=\"\"\n",
        );
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(parsed.rows, 3);
        assert_eq!(parsed.chunks.len(), 1);
        let c = &parsed.chunks[0];
        assert_eq!(c.measurement, "cpu");
        assert_eq!(c.tag_keys, vec!["host", "region"]);
        // Tag order in the line does not matter: lines 1 and 2 are one series.
        assert_eq!(c.series.len(), 2);
        assert_eq!(c.series_index, vec![0, 0, 1]);
        assert_eq!(c.time_unix_nano, vec![10, 20, NOW]);
        assert_eq!(column(c, "usage").f64, vec![1.5, 2.0, -0.001]);
        assert_eq!(column(c, "count").i64, vec![3, -4, 5]);
        assert_eq!(column(c, "big").u64, vec![u64::MAX, 0, 1]);
        assert_eq!(column(c, "ok").bool, vec![true, false, false]);
        assert_eq!(column(c, "note").str, vec!["hi", "x", ""]);
        assert!(c.fields.iter().all(|f| f.present.is_empty()));
    }

    #[test]
    fn escapes_follow_influxdb() {
        let parsed = parse_str(
            "diskio,path=C:\\\\Program\\ Files,dev\\,ice=a\\=b read\\ bytes=1i,msg=\"say \\\"hi\\\" \\\\ \\n\" 1\n\
             other,t=a\\b f=1 2",
        );
        assert_eq!(parsed.errors, vec![]);
        let c = &parsed.chunks[0];
        assert_eq!(c.measurement, "diskio");
        assert_eq!(c.tag_keys, vec!["dev,ice", "path"]);
        assert_eq!(c.series[0].tag_values, vec!["a=b", "C:\\Program Files"]);
        assert_eq!(column(c, "read bytes").i64, vec![1]);
        assert_eq!(column(c, "msg").str, vec!["say \"hi\" \\ \\n"]);
        // A backslash before another character is itself.
        assert_eq!(parsed.chunks[1].series[0].tag_values, vec!["a\\b"]);
    }

    #[test]
    fn measurement_names_follow_the_data_model() {
        // "disk io" has a space: the data model refuses it (table names are a portable alphabet).
        let parsed = parse_str("disk\\ io f=1 1");
        assert_eq!(parsed.errors.len(), 1);
        assert!(parsed.errors[0].message.contains("measurement name"));
    }

    #[test]
    fn string_values_may_span_lines_and_comments_are_skipped() {
        let parsed = parse_str(
            "# a comment\n\nlog msg=\"two\nlines\" 1\r\nlog msg=\"x\" 2\nlog msg=\"y\",bad 3\n",
        );
        assert_eq!(parsed.rows, 2);
        assert_eq!(
            column(&parsed.chunks[0], "msg").str,
            vec!["two\nlines", "x"]
        );
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].line, 6, "{:?}", parsed.errors);
    }

    #[test]
    fn bad_lines_are_reported_and_good_lines_kept() {
        let text = [
            "cpu v=1 1",       // 1 ok
            "cpu",             // 2 missing fields
            "cpu v= 1",        // 3 no value
            "cpu v=1i 2",      // 4 type conflict with line 1
            "cpu v=abc 3",     // 5 bad float
            "cpu v=NaN 3",     // 6 NaN refused
            "cpu v=1 12x",     // 7 bad timestamp
            "cpu v=1 1 extra", // 8 trailing text
            "cpu,host= v=1 1", // 9 empty tag value
            "cpu,host v=1 1",  // 10 tag without '='
            "cpu v=\"open 1",  // 11 unterminated string: swallows the rest
        ];
        let parsed = parse_str(&text.join("\n"));
        assert_eq!(parsed.rows, 1);
        let lines: Vec<usize> = parsed.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let messages: Vec<&str> = parsed.errors.iter().map(|e| e.message.as_str()).collect();
        assert!(messages[0].starts_with("missing fields"), "{messages:?}");
        assert!(messages[1].contains("has no value"), "{messages:?}");
        assert!(messages[2].contains("field type conflict"), "{messages:?}");
        assert!(messages[3].contains("invalid float"), "{messages:?}");
        assert!(messages[4].contains("invalid float"), "{messages:?}");
        assert!(messages[5].contains("invalid timestamp"), "{messages:?}");
        assert!(messages[6].contains("after the timestamp"), "{messages:?}");
        assert!(messages[7].contains("empty value"), "{messages:?}");
        assert!(messages[8].contains("no '='"), "{messages:?}");
        assert!(messages[9].contains("no closing quote"), "{messages:?}");
    }

    #[test]
    fn simple_decimals_parse_exactly_as_the_general_path() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = (x % 15 + 1) as usize;
            let mut text = format!("{}", x % 10u64.pow(digits as u32));
            let point = (x >> 40) as usize % (text.len() + 1);
            text.insert(point, '.');
            if x & 1 == 1 {
                text.insert(0, '-');
            }
            let expected: Option<f64> = text.parse().ok();
            assert_eq!(parse_f64(text.as_bytes()), expected, "{text}");
            if let Some(fast) = parse_simple_decimal(text.as_bytes()) {
                assert_eq!(fast.to_bits(), expected.unwrap().to_bits(), "{text}");
            }
        }
        for text in ["58.13", "0.1", "-0.0", "100", "1.", ".5", "123456789012345"] {
            let fast = parse_simple_decimal(text.as_bytes()).unwrap();
            assert_eq!(
                fast.to_bits(),
                text.parse::<f64>().unwrap().to_bits(),
                "{text}"
            );
        }
        for text in ["1e5", "1234567890123456", ".", "-", "1.2.3", "--1"] {
            assert!(parse_simple_decimal(text.as_bytes()).is_none(), "{text}");
        }
    }

    #[test]
    fn integers_are_range_checked() {
        let parsed = parse_str(
            "m a=9223372036854775807i,b=-9223372036854775808i 1\nm a=9223372036854775808i 2\nm c=-1u 3\nm c=18446744073709551616u 4",
        );
        assert_eq!(parsed.rows, 1);
        assert_eq!(column(&parsed.chunks[0], "b").i64, vec![i64::MIN]);
        assert_eq!(parsed.errors.len(), 3);
        assert!(parsed.errors[0].message.contains("invalid integer"));
        assert!(parsed.errors[1].message.contains("invalid unsigned"));
    }

    #[test]
    fn precision_scales_and_range_is_checked() {
        let mut o = options();
        o.precision = Precision::Seconds;
        let parsed = parse(
            b"m v=1 1700000000\nm v=1 9300000000000\nm v=1 -1",
            &o,
            &mut |_| None,
        );
        assert_eq!(
            parsed.chunks[0].time_unix_nano,
            vec![1_700_000_000_000_000_000]
        );
        assert_eq!(parsed.errors.len(), 2);
        assert!(parsed.errors[0].message.contains("out of range"));
        assert!(parsed.errors[1].message.contains("before 1970"));
        assert_eq!(Precision::parse_v1("u").unwrap(), Precision::Microseconds);
        assert!(Precision::parse_v2("m").is_err());
    }

    #[test]
    fn missing_fields_leave_presence_bitmaps() {
        let parsed = parse_str("m a=1,b=2 1\nm b=3 2\nm a=4 3\nm c=1i,a=5 4");
        assert_eq!(parsed.errors, vec![]);
        let c = &parsed.chunks[0];
        assert_eq!(column(c, "a").f64, vec![1.0, 4.0, 5.0]);
        let a = &column(c, "a").present;
        assert!(is_present(a, 0) && !is_present(a, 1) && is_present(a, 2) && is_present(a, 3));
        assert_eq!(column(c, "b").f64, vec![2.0, 3.0]);
        assert_eq!(column(c, "c").i64, vec![1]);
        assert_eq!(column(c, "c").present.len(), 1);
    }

    #[test]
    fn conflicts_with_the_stored_schema_refuse_the_line() {
        let mut catalog = crate::catalog::Catalog::default();
        catalog.add_column("cpu", "host", ColumnKind::Tag).unwrap();
        catalog
            .add_column("cpu", "v", ColumnKind::Field(FieldType::I64))
            .unwrap();
        let mut lookup = |name: &str| catalog.table(name).cloned();
        let parsed = parse(
            b"cpu v=1.5 1\ncpu host=1i 1\ncpu,v=x w=1 1\ncpu v=2i 1\nmem v=1.5 1",
            &options(),
            &mut lookup,
        );
        assert_eq!(parsed.rows, 2);
        let messages: Vec<String> = parsed.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(parsed.errors.len(), 3, "{messages:?}");
        assert!(messages[0].contains("line 1: field type conflict"));
        assert!(messages[1].contains("line 2: field \"host\" is a tag"));
        assert!(messages[2].contains("line 3: tag \"v\" is an integer field"));
    }

    #[test]
    fn a_tag_and_a_field_of_one_name_across_chunks_are_refused() {
        let parsed = parse_str("m,a=x v=1 1\nm a=2 1\nm v=1,b=1 1\nm,b=y v=1 1");
        let lines: Vec<usize> = parsed.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 4], "{:?}", parsed.errors);
    }

    #[test]
    fn forced_tags_are_checked_and_removed() {
        let mut o = options();
        o.forced_tags = &[("ns_id", "ns1")];
        let parsed = parse(
            b"m,ns_id=ns1,h=a v=1 1\nm,ns_id=ns2 v=1 1\nm ns_id=1 1\nm,h=a v=2 2",
            &o,
            &mut |_| None,
        );
        assert_eq!(parsed.rows, 2);
        assert_eq!(parsed.chunks.len(), 1);
        assert_eq!(parsed.chunks[0].tag_keys, vec!["h"]);
        assert_eq!(parsed.errors.len(), 2);
        assert!(parsed.errors[0].message.contains("contradicts"));
    }

    #[test]
    fn long_lines_and_duplicates_are_refused() {
        let long = format!(
            "m v=\"{}\" 1\nm v=\"ok\" 2\nm w=1,w=2 3\nm,a=1,a=2 v=1 4",
            "x".repeat(2000)
        );
        let parsed = parse_str(&long);
        let messages: Vec<String> = parsed.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(parsed.rows, 1, "{messages:?}");
        assert!(
            messages[0].starts_with("line 1: the line is 2008 bytes"),
            "{messages:?}"
        );
        assert!(
            messages[1].starts_with("line 3: field \"w\" appears twice"),
            "{messages:?}"
        );
        assert!(
            messages[2].starts_with("line 4: tag \"a\" appears twice"),
            "{messages:?}"
        );
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let inputs: [&[u8]; 12] = [
            b"\\",
            b"m\\",
            b"m,\\",
            b"m f=\"\\",
            b"m f=1\\",
            b"m f=",
            b",",
            b"=",
            b" \n\n \r\n#",
            b"m,a=\xff f=1",
            b"m f=\"\xff\"",
            b"m\xff f=1",
        ];
        for input in inputs {
            let parsed = parse(input, &options(), &mut |_| None);
            assert_eq!(parsed.rows, 0, "{input:?}");
        }
        // Arbitrary bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b"m,=\\ \"\n1i.tf"[(x % 12) as usize]
                })
                .collect();
            let _ = parse(&bytes, &options(), &mut |_| None);
        }
    }
}
