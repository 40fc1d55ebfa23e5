//! The Prometheus text exposition format (version 0.0.4, what exporters serve on `/metrics`).
//!
//! [`parse`] turns a page into [`Sample`]s: one per sample line, with its metric name, labels (in the order
//! written), value and optional timestamp (milliseconds). It never fails as a whole and never panics: a bad line
//! is skipped and counted with its line number and reason ([`Parsed::errors`]), so one broken series does not cost
//! the rest of the page. What it takes, as Prometheus does:
//!
//! * `# HELP name text` and `# TYPE name counter|gauge|histogram|summary|untyped` (a `TYPE` with another type is
//!   an error; both are otherwise informational: histograms and summaries are just their `_bucket`, `_sum`,
//!   `_count` and quantile lines); any other `#` line is a comment;
//! * `name{label="value",...} value [timestamp]`, with whitespace (spaces, tabs) around tokens, an optional
//!   trailing comma in the label set, label values escaped with `\\`, `\"` and `\n` (another escaped character is
//!   kept as written, backslash included);
//! * values as Go's `ParseFloat` reads them in practice: decimals, exponents, `NaN`, `+Inf`, `-Inf`, `Inf`;
//! * timestamps as integer milliseconds since the epoch;
//! * `\n` or `\r\n` line ends, blank lines.
//!
//! Refused: metric or label names outside `[a-zA-Z_:][a-zA-Z0-9_:]*` (labels without `:`), a label given twice,
//! unterminated strings, trailing garbage, invalid UTF-8, and a series (name, labels and timestamp) repeated in
//! one page: the first occurrence is kept.

use std::collections::HashSet;
use std::fmt;

/// Errors kept with their message (the count in [`Parsed::error_count`] is always exact).
pub const MAX_KEPT_ERRORS: usize = 100;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Labels in the order written (no `__name__`).
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the epoch, when the line gives one.
    pub timestamp_ms: Option<i64>,
}

/// Why a line was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// What a page held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub samples: Vec<Sample>,
    /// The first [`MAX_KEPT_ERRORS`] skipped lines.
    pub errors: Vec<LineError>,
    /// Every skipped line, duplicates included.
    pub error_count: usize,
}

impl Parsed {
    fn error(&mut self, line: usize, message: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_KEPT_ERRORS {
            self.errors.push(LineError { line, message });
        }
    }
}

/// Parses a whole page. See the module docs.
pub fn parse(text: &[u8]) -> Parsed {
    let mut parsed = Parsed::default();
    // Series already seen on this page, as `name \0 k \0 v \0 ... \x01 timestamp`.
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = match std::str::from_utf8(raw) {
            Ok(line) => line,
            Err(e) => {
                parsed.error(number, format!("not valid UTF-8: {e}"));
                continue;
            }
        };
        let line = line.trim_start_matches([' ', '\t']);
        if line.trim_end_matches([' ', '\t']).is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if let Err(message) = check_comment(comment) {
                parsed.error(number, message);
            }
            continue;
        }
        match parse_sample(line) {
            Ok(sample) => {
                let key = series_key(&sample);
                if seen.insert(key) {
                    parsed.samples.push(sample);
                } else {
                    parsed.error(
                        number,
                        format!(
                            "duplicate sample for series {} (the first one is kept)",
                            describe(&sample.name, &sample.labels)
                        ),
                    );
                }
            }
            Err(message) => parsed.error(number, message),
        }
    }
    parsed
}

/// `name{k="v",...}` for messages, cut to a readable length.
pub fn describe(name: &str, labels: &[(String, String)]) -> String {
    let mut out = String::from(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(&format!("{v:?}"));
        }
        out.push('}');
    }
    truncate(out, 200)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn series_key(sample: &Sample) -> Vec<u8> {
    let mut labels: Vec<&(String, String)> = sample.labels.iter().collect();
    labels.sort();
    let mut key = Vec::with_capacity(64);
    key.extend_from_slice(sample.name.as_bytes());
    for (k, v) in labels {
        key.push(0);
        key.extend_from_slice(k.as_bytes());
        key.push(0);
        key.extend_from_slice(v.as_bytes());
    }
    key.push(1);
    if let Some(ts) = sample.timestamp_ms {
        key.extend_from_slice(&ts.to_le_bytes());
    }
    key
}

/// `# HELP`, `# TYPE` or a plain comment (what follows the `#`).
fn check_comment(comment: &str) -> Result<(), String> {
    let mut words = comment.split([' ', '\t']).filter(|w| !w.is_empty());
    let keyword = match words.next() {
        Some(k @ ("HELP" | "TYPE")) => k,
        _ => return Ok(()),
    };
    let Some(name) = words.next() else {
        return Err(format!("# {keyword} without a metric name"));
    };
    if !is_metric_name(name) {
        return Err(format!("# {keyword}: invalid metric name {name:?}"));
    }
    if keyword == "TYPE" {
        match words.next() {
            Some("counter" | "gauge" | "histogram" | "summary" | "untyped") => {}
            Some(other) => {
                return Err(format!(
                    "# TYPE {name}: unknown type {other:?} (counter, gauge, histogram, summary or untyped)"
                ));
            }
            None => return Err(format!("# TYPE {name} without a type")),
        }
    }
    Ok(())
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A cursor over one line.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Skips spaces and tabs; says whether there were any.
    fn skip_blanks(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.pos += 1;
        }
        self.pos > start
    }

    /// The longest run of name characters (`:` too when `colon`), which must be a valid name.
    fn name(&mut self, colon: bool, what: &str) -> Result<&'a str, String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            let ok = c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
            if !ok || (self.pos == start && c.is_ascii_digit()) {
                break;
            }
            self.pos += 1;
        }
        if self.pos == start {
            return Err(match self.peek() {
                Some(c) => format!("expected a {what} at column {}, found {c:?}", self.pos + 1),
                None => format!("expected a {what} at the end of the line"),
            });
        }
        Ok(&self.s[start..self.pos])
    }

    /// A whitespace-free token (value or timestamp).
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ' ' && c != '\t') {
            self.bump();
        }
        &self.s[start..self.pos]
    }

    /// A double-quoted label value after its opening quote, unescaped.
    fn quoted(&mut self) -> Result<String, String> {
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return Err("unterminated label value (missing '\"')".into()),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('\\') => out.push('\\'),
                    Some('"') => out.push('"'),
                    Some('n') => out.push('\n'),
                    // Prometheus keeps other escapes as written.
                    Some(other) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => return Err("unterminated label value (ends in '\\')".into()),
                },
                Some(c) => out.push(c),
            }
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let mut cur = Cursor { s: line, pos: 0 };
    let name = cur.name(true, "metric name")?.to_owned();
    let mut separated = cur.skip_blanks();
    let mut labels: Vec<(String, String)> = Vec::new();
    if cur.peek() == Some('{') {
        cur.bump();
        loop {
            cur.skip_blanks();
            if cur.peek() == Some('}') {
                cur.bump();
                break;
            }
            let label = cur.name(false, "label name")?.to_owned();
            cur.skip_blanks();
            if cur.bump() != Some('=') {
                return Err(format!("expected '=' after label name {label:?}"));
            }
            cur.skip_blanks();
            if cur.bump() != Some('"') {
                return Err(format!(
                    "expected '\"' to open the value of label {label:?}"
                ));
            }
            let value = cur.quoted()?;
            if labels.iter().any(|(k, _)| *k == label) {
                return Err(format!("label {label:?} appears twice"));
            }
            labels.push((label, value));
            cur.skip_blanks();
            match cur.bump() {
                Some(',') => {}
                Some('}') => break,
                Some(c) => {
                    return Err(format!(
                        "expected ',' or '}}' after a label value, found {c:?}"
                    ));
                }
                None => return Err("unterminated label set (missing '}')".into()),
            }
        }
        separated = cur.skip_blanks();
    }
    if !separated {
        return Err(match cur.peek() {
            None => format!("metric {name:?} has no value"),
            Some(c) => format!("unexpected {c:?} after the metric name or labels"),
        });
    }
    let value_text = cur.token();
    if value_text.is_empty() {
        return Err(format!("metric {name:?} has no value"));
    }
    let value = parse_value(value_text)?;
    cur.skip_blanks();
    let timestamp_ms = match cur.token() {
        "" => None,
        t => Some(
            t.parse::<i64>()
                .map_err(|_| format!("invalid timestamp {t:?} (integer milliseconds expected)"))?,
        ),
    };
    cur.skip_blanks();
    if let Some(c) = cur.peek() {
        return Err(format!(
            "unexpected {c:?} after the {}",
            if timestamp_ms.is_some() {
                "timestamp"
            } else {
                "value"
            }
        ));
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// A sample value as Prometheus writes them; Rust's float syntax is a close superset of what Go prints (it also
/// takes `inf`, `infinity` and `nan` in any case).
fn parse_value(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .map_err(|_| format!("invalid value {text:?} (a number, NaN, +Inf or -Inf expected)"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn node_exporter_style_page() {
        let page = b"# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.\n\
# TYPE node_cpu_seconds_total counter\n\
node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 1234.5\n\
node_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 12\n\
# HELP node_memory_MemTotal_bytes Memory information field MemTotal_bytes.\n\
# TYPE node_memory_MemTotal_bytes gauge\n\
node_memory_MemTotal_bytes 8.253181952e+09\n\
\n\
# a plain comment\n\
up 1 1700000000000\n";
        let parsed = parse(page);
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(parsed.samples.len(), 4);
        assert_eq!(
            parsed.samples[0],
            Sample {
                name: "node_cpu_seconds_total".into(),
                labels: labels(&[("cpu", "0"), ("mode", "idle")]),
                value: 1234.5,
                timestamp_ms: None,
            }
        );
        assert_eq!(parsed.samples[2].name, "node_memory_MemTotal_bytes");
        assert_eq!(parsed.samples[2].value, 8_253_181_952.0);
        assert!(parsed.samples[2].labels.is_empty());
        assert_eq!(parsed.samples[3].timestamp_ms, Some(1_700_000_000_000));
    }

    #[test]
    fn histograms_and_summaries_are_their_lines() {
        let page = b"# TYPE rpc_duration_seconds histogram\n\
rpc_duration_seconds_bucket{le=\"0.1\"} 3\n\
rpc_duration_seconds_bucket{le=\"+Inf\"} 5\n\
rpc_duration_seconds_sum 1.5\n\
rpc_duration_seconds_count 5\n\
# TYPE gc summary\n\
gc{quantile=\"0.5\"} 0.01\n\
gc_sum 3\n\
gc_count 10\n";
        let parsed = parse(page);
        assert_eq!(parsed.error_count, 0, "{:?}", parsed.errors);
        let names: Vec<&str> = parsed.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "rpc_duration_seconds_bucket",
                "rpc_duration_seconds_bucket",
                "rpc_duration_seconds_sum",
                "rpc_duration_seconds_count",
                "gc",
                "gc_sum",
                "gc_count"
            ]
        );
        assert_eq!(parsed.samples[1].labels, labels(&[("le", "+Inf")]));
    }

    #[test]
    fn escapes_specials_whitespace_and_trailing_comma() {
        let page = "a{path=\"C:\\\\dir\\\\x\",msg=\"say \\\"hi\\\"\\nbye\",odd=\"\\t\",} NaN\n\
b +Inf\n\
c\t-Inf\t 42 \r\n\
d { x = \"1\" } 1e-3\n\
e 0x1p3\n\
f{μ=\"1\"} 1\n\
g{x=\"ünïcødé\"} -0.5\n";
        let parsed = parse(page.as_bytes());
        let a = &parsed.samples[0];
        assert_eq!(
            a.labels,
            labels(&[
                ("path", "C:\\dir\\x"),
                ("msg", "say \"hi\"\nbye"),
                ("odd", "\\t")
            ])
        );
        assert!(a.value.is_nan());
        assert_eq!(parsed.samples[1].value, f64::INFINITY);
        assert_eq!(parsed.samples[2].value, f64::NEG_INFINITY);
        assert_eq!(parsed.samples[2].timestamp_ms, Some(42));
        assert_eq!(parsed.samples[3].labels, labels(&[("x", "1")]));
        assert_eq!(parsed.samples[3].value, 0.001);
        assert_eq!(parsed.samples[4].labels, labels(&[("x", "ünïcødé")]));
        // Hex floats and non-ASCII label names are not the text format.
        assert_eq!(parsed.error_count, 2, "{:?}", parsed.errors);
        assert_eq!(parsed.errors[0].line, 5);
        assert_eq!(parsed.errors[1].line, 6);
    }

    #[test]
    fn bad_lines_are_counted_with_reasons_and_the_rest_is_kept() {
        let cases: &[(&str, &str)] = &[
            ("9abc 1", "expected a metric name"),
            ("abc", "has no value"),
            ("abc ", "has no value"),
            ("abc{x=\"1\"}", "has no value"),
            ("abc one", "invalid value \"one\""),
            ("abc 1 2 3", "unexpected '3' after the timestamp"),
            ("abc 1 1.5", "invalid timestamp \"1.5\""),
            ("abc{x=\"1\",x=\"2\"} 1", "label \"x\" appears twice"),
            ("abc{x=\"1} 1", "unterminated label value"),
            ("abc{x=\"1\" 1", "expected ',' or '}'"),
            (
                "abc{x=1} 1",
                "expected '\"' to open the value of label \"x\"",
            ),
            ("abc{x} 1", "expected '=' after label name \"x\""),
            ("abc{x=\"1\"", "unterminated label set"),
            ("abc{x:y=\"1\"} 1", "expected '=' after label name \"x\""),
            ("abc{=\"1\"} 1", "expected a label name"),
            ("abc{x=\"\\", "ends in '\\'"),
            (
                "abc{x=\"1\"}2",
                "unexpected '2' after the metric name or labels",
            ),
            ("# TYPE abc histo", "unknown type \"histo\""),
            ("# TYPE abc", "without a type"),
            ("# HELP", "without a metric name"),
            ("# HELP 1abc x", "invalid metric name"),
        ];
        for (line, want) in cases {
            let text = format!("good 1\n{line}\nalso_good{{a=\"b\"}} 2\n");
            let parsed = parse(text.as_bytes());
            assert_eq!(parsed.samples.len(), 2, "{line}: {:?}", parsed.samples);
            assert_eq!(parsed.error_count, 1, "{line}");
            assert_eq!(parsed.errors[0].line, 2, "{line}");
            assert!(
                parsed.errors[0].message.contains(want),
                "{line}: {:?} lacks {want:?}",
                parsed.errors[0].message
            );
        }
    }

    #[test]
    fn duplicates_keep_the_first_and_invalid_utf8_is_a_line_error() {
        let mut page =
            b"x{a=\"1\",b=\"2\"} 1\nx{b=\"2\",a=\"1\"} 2\nx{a=\"1\",b=\"2\"} 3 100\n".to_vec();
        page.extend_from_slice(b"y{a=\"\xff\"} 1\n");
        let parsed = parse(&page);
        assert_eq!(parsed.samples.len(), 2);
        assert_eq!(parsed.samples[0].value, 1.0);
        assert_eq!(parsed.samples[1].timestamp_ms, Some(100));
        assert_eq!(parsed.error_count, 2);
        assert!(parsed.errors[0].message.contains("duplicate sample"));
        assert!(parsed.errors[1].message.contains("UTF-8"));
    }

    #[test]
    fn errors_kept_are_bounded_but_counted() {
        let page = "bad\n".repeat(MAX_KEPT_ERRORS + 50);
        let parsed = parse(page.as_bytes());
        assert_eq!(parsed.error_count, MAX_KEPT_ERRORS + 50);
        assert_eq!(parsed.errors.len(), MAX_KEPT_ERRORS);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of tricky pages, and pseudo-random bytes.
        let tricky = "a{b=\"\\\\\\\"\",c=\"ü\"} 1 2\n# TYPE a gauge\nx{} NaN\n\u{feff}y 1\n";
        for end in 0..=tricky.len() {
            let _ = parse(&tricky.as_bytes()[..end]);
        }
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"ab_:{}=\",\\ \t\n#+-.0123456789eEInfNa\xc3\xbc\xff";
        for _ in 0..2_000 {
            let mut page = Vec::new();
            for _ in 0..64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                page.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let parsed = parse(&page);
            assert!(parsed.errors.len() <= parsed.error_count);
        }
    }
}
