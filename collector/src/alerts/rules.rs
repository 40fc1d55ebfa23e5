//! Alert rules: their TOML/JSON form, validation with messages that name the rule and the problem, and the SQL
//! that evaluates them.
//!
//! Two kinds of rule:
//!
//! * **threshold** — `expr` (one SQL aggregate, e.g. `avg(usage_user)`) over the rows of `table` in the last
//!   `window`, optionally filtered by `where`, one value per `group_by` key (e.g. per `vm_id`), compared with
//!   `op` to the `warning` and `critical` thresholds. Rules that share table, filter, window and group-by are
//!   evaluated by one query ([`QueryKey`]), so 1,000 rules over a handful of tables cost a handful of queries.
//! * **absence** — an agent the registry has not heard from (no batch, no heartbeat) for `absent_intervals` of its
//!   collection interval (or `interval`), grouped by identity tags (default `agent_id`).
//!
//! Both have a `for` duration (the condition must hold that long before the alert fires), a `recovery` value
//! (hysteresis: once firing, a level is left only when the value has crossed back past its threshold by the
//! distance between the lowest threshold and `recovery`, so a value hovering at a threshold does not flap), a
//! `repeat_interval` and the `receivers` to notify.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use serde::{Deserialize, Serialize};

/// Most tags in a `group_by`.
const MAX_GROUP_BY: usize = 16;
/// Longest window, `for` and repeat interval: what the hot data of a collector can answer sensibly.
const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);
/// Longest SQL text in `expr` or `where`.
const MAX_SQL_CHARS: usize = 4_096;

/// Why a rule (or a receiver, a silence) was refused: the message names the rule and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A field is missing, malformed or inconsistent with another.
    #[error("rule {rule:?}: {field}: {message}")]
    Invalid {
        rule: String,
        field: &'static str,
        message: String,
    },
    /// The rule's table does not exist (yet) on this collector.
    #[error(
        "rule {rule:?}: table: unknown table {table:?}; no rows of that measurement have been stored"
    )]
    UnknownTable { rule: String, table: String },
    /// The generated query does not plan: an unknown column, a type error, a non-aggregate expression.
    #[error("rule {rule:?}: the condition does not run as SQL: {message}")]
    BadSql { rule: String, message: String },
}

/// Alert severity, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// How the value compares with a threshold to count as a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Op {
    #[default]
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }

    /// `<` and `<=` are evaluated as `>`/`>=` on negated values, so the state machine knows one direction.
    fn sign(self) -> f64 {
        match self {
            Op::Gt | Op::Ge => 1.0,
            Op::Lt | Op::Le => -1.0,
        }
    }
}

/// The kind of rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    #[default]
    Threshold,
    Absence,
}

/// A rule as written in the rules file (`[[rules]]`) or posted to `POST /api/v1/alerts/rules`. Durations are
/// written `500ms`, `10s`, `5m`, `1h`, `2d`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name: 1-128 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// `threshold` (default) or `absence`.
    #[serde(default)]
    pub kind: RuleKind,
    /// Threshold rules: the measurement (table), e.g. `cpu`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub table: String,
    /// Threshold rules: one SQL aggregate over the window, e.g. `avg(usage_user)`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expr: String,
    /// Threshold rules: an SQL filter on the rows, e.g. `cpu = 'cpu-total'`.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Tags that make one alert each: `["vm_id"]`, `["ns_id", "mcis_id"]`. Threshold default: none (one alert
    /// for the whole table); absence default `["agent_id"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    /// Threshold rules: how far back the rows go. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// `>` (default), `>=`, `<` or `<=`.
    #[serde(default)]
    pub op: Op,
    /// Threshold for a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<f64>,
    /// Threshold for a critical alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<f64>,
    /// Once firing, the value must cross back past this (on the good side of the lowest threshold) to resolve.
    /// Default: the lowest threshold itself (no hysteresis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<f64>,
    /// How long the condition must hold before the alert fires. Default `0s` (at the first evaluation).
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_duration: Option<String>,
    /// A firing alert is notified again this often. Default `4h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_interval: Option<String>,
    /// Names of the receivers (`[[receivers]]` of the rules file) to notify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receivers: Vec<String>,
    /// Free text carried in notifications.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// Absence rules: how many collection intervals of silence make an agent absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absent_intervals: Option<u32>,
    /// Absence rules: the interval to count in, instead of each agent's own collection interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Absence rules: only agents whose identity tags have these values, e.g. `{ mcis_id = "web" }`.
    #[serde(default, rename = "match", skip_serializing_if = "BTreeMap::is_empty")]
    pub matchers: BTreeMap<String, String>,
    /// Absence rules: the severity of the alert. Default `critical`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
}

/// Thresholds normalised to "greater is worse" (values of `<` rules are negated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Levels {
    pub warning: Option<f64>,
    pub critical: Option<f64>,
    /// Whether reaching the threshold exactly counts (`>=`, `<=`).
    pub inclusive: bool,
    /// How far past a level's threshold the value must come back to leave it (0: no hysteresis).
    pub band: f64,
    /// `1` or `-1`: multiplies raw values into this normalised direction.
    pub sign: f64,
}

impl Levels {
    fn beyond(&self, v: f64, threshold: f64) -> bool {
        if self.inclusive {
            v >= threshold
        } else {
            v > threshold
        }
    }

    fn threshold(&self, severity: Severity) -> Option<f64> {
        match severity {
            Severity::Warning => self.warning,
            Severity::Critical => self.critical,
        }
    }

    /// The severity a (normalised) value reaches with no alert active.
    pub fn raw(&self, v: f64) -> Option<Severity> {
        [Severity::Critical, Severity::Warning]
            .into_iter()
            .find(|s| self.threshold(*s).is_some_and(|t| self.beyond(v, t)))
    }

    /// The severity of an alert firing at `current` after seeing value `v`: up at once to whatever `v` reaches;
    /// down (or resolved, `None`) only past the hysteresis band of each level it leaves.
    pub fn held(&self, current: Severity, v: f64) -> Option<Severity> {
        let raw = self.raw(v);
        if raw >= Some(current) {
            return raw;
        }
        [Severity::Critical, Severity::Warning]
            .into_iter()
            .filter(|s| *s <= current)
            .find(|s| {
                self.threshold(*s)
                    .is_some_and(|t| self.beyond(v, t - self.band))
            })
    }

    /// The raw threshold (in the rule's own direction) of a severity, for messages.
    pub fn shown_threshold(&self, severity: Severity) -> Option<f64> {
        self.threshold(severity).map(|t| t * self.sign)
    }
}

/// What a threshold rule's query is shared by: rules with equal keys are evaluated by one SQL statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryKey {
    pub table: String,
    pub filter: Option<String>,
    pub window_ms: u64,
    pub group_by: Vec<String>,
}

impl QueryKey {
    /// One statement computing every expression of `exprs` (as `e0`, `e1`, ... cast to DOUBLE) per group over the
    /// rows since `since_ns`. The time filter lets DataFusion skip files (their time range) and row groups.
    pub fn sql(&self, exprs: &[&str], since_ns: i64) -> String {
        let mut select: Vec<String> = self.group_by.iter().map(|g| quote_ident(g)).collect();
        for (i, e) in exprs.iter().enumerate() {
            select.push(format!("CAST(({e}) AS DOUBLE) AS \"e{i}\""));
        }
        let mut sql = format!(
            "SELECT {} FROM {} WHERE time >= to_timestamp_nanos({since_ns})",
            select.join(", "),
            quote_ident(&self.table)
        );
        if let Some(filter) = &self.filter {
            sql.push_str(&format!(" AND ({filter})"));
        }
        if !self.group_by.is_empty() {
            let groups: Vec<String> = self.group_by.iter().map(|g| quote_ident(g)).collect();
            sql.push_str(" GROUP BY ");
            sql.push_str(&groups.join(", "));
        }
        sql
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A validated rule with its durations parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRule {
    pub rule: Rule,
    pub levels: Levels,
    pub for_duration: Duration,
    pub repeat_interval: Duration,
    /// Threshold rules: what the query is shared by.
    pub query: Option<QueryKey>,
    /// Absence rules: intervals of silence, and a fixed interval if the rule sets one.
    pub absent_intervals: u32,
    pub absent_interval: Option<Duration>,
    /// The tags of a group, in order (absence default applied).
    pub group_by: Vec<String>,
}

/// Parses a duration: a whole number and a unit, `ms`, `s`, `m`, `h` or `d` (`500ms`, `10s`, `5m`, `1h`, `2d`).
/// Retention periods (`crate::retention`) and the Dragonfly API's ranges have their own, coarser syntax (hours and
/// up; minutes and up); alerting needs sub-second values for fast evaluation.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "{text:?} is not a duration; write a whole number and a unit: ms, s, m, h or d (e.g. 500ms, 10s, 5m, 1h)"
        )
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return Err(invalid());
    }
    let n: u64 = digits.parse().map_err(|_| invalid())?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(invalid()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(invalid)
}

/// A `group_by` or `match` tag name: SQL-friendly, as tag names are.
fn check_tag_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a tag name (a letter or '_', then letters, digits or '_')"
        ))
    }
}

/// Parses `text` as exactly one SQL expression (nothing after it), so an `expr` or `where` cannot change the shape
/// of the statement it is put in.
fn check_sql_expr(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("is empty".into());
    }
    if text.chars().count() > MAX_SQL_CHARS {
        return Err(format!("is longer than {MAX_SQL_CHARS} characters"));
    }
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(text)
        .map_err(|e| format!("{text:?} is not valid SQL: {e}"))?;
    parser
        .parse_expr()
        .map_err(|e| format!("{text:?} is not an SQL expression: {e}"))?;
    let rest = parser.peek_token();
    if rest.token != datafusion::sql::sqlparser::tokenizer::Token::EOF {
        return Err(format!(
            "{text:?} must be one SQL expression; unexpected {} after it",
            rest.token
        ));
    }
    Ok(())
}

impl Rule {
    fn invalid(&self, field: &'static str, message: impl Into<String>) -> RuleError {
        RuleError::Invalid {
            rule: self.name.clone(),
            field,
            message: message.into(),
        }
    }

    fn duration(
        &self,
        field: &'static str,
        text: Option<&str>,
        default: Duration,
    ) -> Result<Duration, RuleError> {
        let Some(text) = text else {
            return Ok(default);
        };
        let d = parse_duration(text).map_err(|m| self.invalid(field, m))?;
        if d > MAX_DURATION {
            return Err(self.invalid(field, format!("{text:?} is longer than 7d")));
        }
        Ok(d)
    }

    /// Checks everything that can be checked without data (names, SQL syntax, thresholds, durations, receivers)
    /// and returns the rule ready to evaluate. `receivers` are the names of the configured receivers.
    pub fn compile(&self, receivers: &HashSet<String>) -> Result<CompiledRule, RuleError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(self.invalid("name", "must be 1-128 characters of [A-Za-z0-9_.-]"));
        }
        for r in &self.receivers {
            if !receivers.contains(r) {
                let mut known: Vec<&String> = receivers.iter().collect();
                known.sort();
                return Err(self.invalid(
                    "receivers",
                    format!("unknown receiver {r:?}; the configured receivers are {known:?}"),
                ));
            }
        }
        if self.group_by.len() > MAX_GROUP_BY {
            return Err(self.invalid("group_by", format!("at most {MAX_GROUP_BY} tags")));
        }
        for (i, g) in self.group_by.iter().enumerate() {
            check_tag_name(g).map_err(|m| self.invalid("group_by", m))?;
            if self.group_by[..i].contains(g) {
                return Err(self.invalid("group_by", format!("{g:?} appears twice")));
            }
        }
        let for_duration = self.duration("for", self.for_duration.as_deref(), Duration::ZERO)?;
        let repeat_interval = self.duration(
            "repeat_interval",
            self.repeat_interval.as_deref(),
            Duration::from_secs(4 * 3600),
        )?;
        if repeat_interval < Duration::from_secs(1) {
            return Err(self.invalid("repeat_interval", "must be at least 1s"));
        }
        match self.kind {
            RuleKind::Threshold => self.compile_threshold(for_duration, repeat_interval),
            RuleKind::Absence => self.compile_absence(for_duration, repeat_interval),
        }
    }

    fn compile_threshold(
        &self,
        for_duration: Duration,
        repeat_interval: Duration,
    ) -> Result<CompiledRule, RuleError> {
        if self.table.is_empty() {
            return Err(self.invalid("table", "missing: name the measurement, e.g. \"cpu\""));
        }
        crate::model::check_measurement(&self.table).map_err(|m| self.invalid("table", m))?;
        if self.expr.trim().is_empty() {
            return Err(self.invalid(
                "expr",
                "missing: give one SQL aggregate, e.g. \"avg(usage_user)\"",
            ));
        }
        check_sql_expr(&self.expr).map_err(|m| self.invalid("expr", m))?;
        if let Some(filter) = &self.filter {
            check_sql_expr(filter).map_err(|m| self.invalid("where", m))?;
        }
        for (field, set) in [
            ("absent_intervals", self.absent_intervals.is_some()),
            ("interval", self.interval.is_some()),
            ("match", !self.matchers.is_empty()),
            ("severity", self.severity.is_some()),
        ] {
            if set {
                return Err(self.invalid(
                    field,
                    "only absence rules take it (a threshold rule's severity comes from warning/critical)",
                ));
            }
        }
        let window = self.duration("window", self.window.as_deref(), Duration::from_secs(300))?;
        if window < Duration::from_millis(100) {
            return Err(self.invalid("window", "must be at least 100ms"));
        }
        if self.warning.is_none() && self.critical.is_none() {
            return Err(self.invalid(
                "warning",
                "missing threshold: set warning, critical or both",
            ));
        }
        for (field, v) in [
            ("warning", self.warning),
            ("critical", self.critical),
            ("recovery", self.recovery),
        ] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(self.invalid(field, "must be a finite number"));
            }
        }
        let sign = self.op.sign();
        let (warning, critical) = (
            self.warning.map(|v| v * sign),
            self.critical.map(|v| v * sign),
        );
        if let (Some(w), Some(c)) = (warning, critical)
            && c < w
        {
            return Err(self.invalid(
                "critical",
                format!(
                    "with op {:?} the critical threshold must be at or beyond the warning one ({} vs {})",
                    self.op.as_str(),
                    c * sign,
                    w * sign
                ),
            ));
        }
        let lowest = warning.or(critical).unwrap_or_default();
        let band = match self.recovery {
            None => 0.0,
            Some(r) => {
                let band = lowest - r * sign;
                if band < 0.0 {
                    return Err(self.invalid(
                        "recovery",
                        format!(
                            "with op {:?} the recovery value must be on the good side of the lowest threshold ({})",
                            self.op.as_str(),
                            lowest * sign
                        ),
                    ));
                }
                band
            }
        };
        let query = QueryKey {
            table: self.table.clone(),
            filter: self.filter.as_ref().map(|f| f.trim().to_owned()),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            group_by: self.group_by.clone(),
        };
        Ok(CompiledRule {
            rule: self.clone(),
            levels: Levels {
                warning,
                critical,
                inclusive: matches!(self.op, Op::Ge | Op::Le),
                band,
                sign,
            },
            for_duration,
            repeat_interval,
            query: Some(query),
            absent_intervals: 0,
            absent_interval: None,
            group_by: self.group_by.clone(),
        })
    }

    fn compile_absence(
        &self,
        for_duration: Duration,
        repeat_interval: Duration,
    ) -> Result<CompiledRule, RuleError> {
        for (field, set) in [
            ("table", !self.table.is_empty()),
            ("expr", !self.expr.is_empty()),
            ("where", self.filter.is_some()),
            ("window", self.window.is_some()),
            ("warning", self.warning.is_some()),
            ("critical", self.critical.is_some()),
            ("recovery", self.recovery.is_some()),
        ] {
            if set {
                return Err(self.invalid(
                    field,
                    "an absence rule does not take it (it watches when agents were last heard from)",
                ));
            }
        }
        if self.op != Op::Gt {
            return Err(self.invalid("op", "an absence rule does not take it"));
        }
        let intervals = match self.absent_intervals {
            None => {
                return Err(self.invalid(
                    "absent_intervals",
                    "missing: how many collection intervals of silence make an agent absent (e.g. 3)",
                ));
            }
            Some(0) => return Err(self.invalid("absent_intervals", "must be at least 1")),
            Some(n) => n,
        };
        let interval = match &self.interval {
            None => None,
            Some(text) => {
                let d = self.duration("interval", Some(text), Duration::ZERO)?;
                if d < Duration::from_millis(100) {
                    return Err(self.invalid("interval", "must be at least 100ms"));
                }
                Some(d)
            }
        };
        for key in self.matchers.keys() {
            check_tag_name(key).map_err(|m| self.invalid("match", m))?;
        }
        let severity = self.severity.unwrap_or(Severity::Critical);
        // The value is how long the agent has been silent, in seconds; its threshold is computed per agent (its
        // interval times `absent_intervals`), so the levels only carry which severity fires.
        let (warning, critical) = match severity {
            Severity::Warning => (Some(0.0), None),
            Severity::Critical => (None, Some(0.0)),
        };
        let group_by = if self.group_by.is_empty() {
            vec!["agent_id".to_owned()]
        } else {
            self.group_by.clone()
        };
        Ok(CompiledRule {
            rule: self.clone(),
            levels: Levels {
                warning,
                critical,
                inclusive: false,
                band: 0.0,
                sign: 1.0,
            },
            for_duration,
            repeat_interval,
            query: None,
            absent_intervals: intervals,
            absent_interval: interval,
            group_by,
        })
    }
}

/// The key of one alert of a rule: its group's tag values, `tag=value` joined by `,` in `group_by` order (`,`, `=`
/// and `\` escaped with `\`). Empty for a rule without `group_by`.
pub fn group_key(labels: &[(String, String)]) -> String {
    let escape = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if matches!(c, ',' | '=' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    labels
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The labels back from a [`group_key`] (for alerts restored from the `alerts` table).
pub fn parse_group_key(key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut k, mut v, mut in_value, mut escaped) = (String::new(), String::new(), false, false);
    for c in key.chars() {
        let target = if in_value { &mut v } else { &mut k };
        if escaped {
            target.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '=' && !in_value {
            in_value = true;
        } else if c == ',' {
            out.push((std::mem::take(&mut k), std::mem::take(&mut v)));
            in_value = false;
        } else {
            target.push(c);
        }
    }
    if !k.is_empty() || in_value {
        out.push((k, v));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(toml_text: &str) -> Rule {
        toml::from_str(toml_text).unwrap()
    }

    fn receivers() -> HashSet<String> {
        ["hook".to_owned()].into_iter().collect()
    }

    #[test]
    fn alert_durations_parse_and_bad_ones_are_named() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "m", "-5m", "5 m", "5min", "1.5s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("not a duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn alert_rule_errors_name_the_field() {
        let cases = [
            (
                "name = \"a\"\nexpr = \"avg(x)\"\nwarning = 1.0",
                "table: missing",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nwarning = 1.0",
                "expr: missing",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"",
                "missing threshold",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x) FROM y\"\nwarning = 1.0",
                "must be one SQL expression",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(\"\nwarning = 1.0",
                "expr: ",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 1.0\nwindow = \"5 minutes\"",
                "window: \"5 minutes\" is not a duration",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 1.0\nfor = \"x\"",
                "for: ",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 9.0\ncritical = 5.0",
                "critical: with op \">\"",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 9.0\nrecovery = 10.0",
                "recovery: ",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 9.0\nreceivers = [\"nope\"]",
                "unknown receiver \"nope\"",
            ),
            (
                "name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 9.0\ngroup_by = [\"vm id\"]",
                "group_by: ",
            ),
            (
                "name = \"a b\"\ntable = \"cpu\"\nexpr = \"avg(x)\"\nwarning = 9.0",
                "name: ",
            ),
            (
                "name = \"a\"\nkind = \"absence\"",
                "absent_intervals: missing",
            ),
            (
                "name = \"a\"\nkind = \"absence\"\nabsent_intervals = 3\ntable = \"cpu\"",
                "table: an absence rule",
            ),
        ];
        for (text, want) in cases {
            let err = rule(text).compile(&receivers()).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err} lacks {want:?}");
            assert!(err.starts_with("rule \"a"), "{err}");
        }
    }

    #[test]
    fn alert_levels_escalate_at_once_and_leave_past_the_band() {
        let r = rule(
            "name = \"cpu\"\ntable = \"cpu\"\nexpr = \"avg(usage_user)\"\nwarning = 80.0\ncritical = 90.0\nrecovery = 70.0",
        )
        .compile(&receivers())
        .unwrap();
        let l = r.levels;
        assert_eq!(l.raw(85.0), Some(Severity::Warning));
        assert_eq!(l.raw(95.0), Some(Severity::Critical));
        assert_eq!(l.raw(80.0), None);
        assert_eq!(l.held(Severity::Warning, 95.0), Some(Severity::Critical));
        // Critical is left only below 90 - 10.
        assert_eq!(l.held(Severity::Critical, 85.0), Some(Severity::Critical));
        assert_eq!(l.held(Severity::Critical, 79.0), Some(Severity::Warning));
        assert_eq!(l.held(Severity::Warning, 71.0), Some(Severity::Warning));
        assert_eq!(l.held(Severity::Warning, 70.0), None);
    }

    #[test]
    fn alert_less_than_rules_mirror() {
        let r = rule(
            "name = \"disk\"\ntable = \"disk\"\nexpr = \"min(free)\"\nop = \"<\"\nwarning = 20.0\ncritical = 10.0\nrecovery = 25.0",
        )
        .compile(&receivers())
        .unwrap();
        let l = r.levels;
        let n = |v: f64| v * l.sign;
        assert_eq!(l.raw(n(15.0)), Some(Severity::Warning));
        assert_eq!(l.raw(n(5.0)), Some(Severity::Critical));
        assert_eq!(l.held(Severity::Warning, n(22.0)), Some(Severity::Warning));
        assert_eq!(l.held(Severity::Warning, n(26.0)), None);
        assert_eq!(l.shown_threshold(Severity::Critical), Some(10.0));
    }

    #[test]
    fn alert_rules_sharing_table_window_and_groups_share_a_query() {
        let a = rule("name = \"a\"\ntable = \"cpu\"\nexpr = \"avg(usage_user)\"\nwarning = 1.0\ngroup_by = [\"vm_id\"]\nwindow = \"1m\"")
            .compile(&receivers())
            .unwrap();
        let b = rule("name = \"b\"\ntable = \"cpu\"\nexpr = \"max(usage_system)\"\ncritical = 1.0\ngroup_by = [\"vm_id\"]\nwindow = \"60s\"")
            .compile(&receivers())
            .unwrap();
        assert_eq!(a.query, b.query);
        let sql = a
            .query
            .unwrap()
            .sql(&["avg(usage_user)", "max(usage_system)"], 42);
        assert_eq!(
            sql,
            "SELECT \"vm_id\", CAST((avg(usage_user)) AS DOUBLE) AS \"e0\", CAST((max(usage_system)) AS DOUBLE) AS \"e1\" \
             FROM \"cpu\" WHERE time >= to_timestamp_nanos(42) GROUP BY \"vm_id\""
        );
    }

    #[test]
    fn alert_group_keys_round_trip() {
        let labels = vec![
            ("vm_id".to_owned(), "a,b=c\\d".to_owned()),
            ("mcis_id".to_owned(), String::new()),
        ];
        let key = group_key(&labels);
        assert_eq!(parse_group_key(&key), labels);
        assert!(parse_group_key("").is_empty());
    }
}
