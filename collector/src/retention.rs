//! Retention: how long each table keeps its data, and which hour partitions have outlived it.
//!
//! A period is written like `"30d"`, `"12h"`, `"2w"` or `"forever"`. Raw measurements use `retention_default`
//! unless `[retention]` names the table; rollup tables use `retention_rollup_1m_default` /
//! `retention_rollup_1h_default` unless `[retention]` has a `"rollup_1m.<table>"` / `"rollup_1h.<table>"` key.
//! Whole hour partitions are dropped once all of their hour is older than the period: a partition is the unit the
//! store writes, indexes and deletes, so no file is ever rewritten to drop a few rows.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::CollectorConfig;
use crate::error::{CollectorError, Result};
use crate::model::check_measurement;
use crate::rollup::Resolution;

const SECS_PER_HOUR: u64 = 3_600;
const NANOS_PER_SEC: i64 = 1_000_000_000;

/// How long data is kept: a whole number of seconds (at least an hour, the partition size), or forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RetentionPeriod {
    secs: Option<u64>,
}

impl RetentionPeriod {
    pub const FOREVER: RetentionPeriod = RetentionPeriod { secs: None };

    pub const fn days(days: u64) -> RetentionPeriod {
        RetentionPeriod {
            secs: Some(days * 24 * SECS_PER_HOUR),
        }
    }

    /// Seconds kept, `None` for forever.
    pub fn secs(self) -> Option<u64> {
        self.secs
    }

    /// Parses `<n><unit>` (unit `s`, `m`, `h`, `d` or `w`) or `forever`/`none`.
    pub fn parse(text: &str) -> std::result::Result<RetentionPeriod, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("forever") || t.eq_ignore_ascii_case("none") {
            return Ok(RetentionPeriod::FOREVER);
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => SECS_PER_HOUR,
            "d" => 24 * SECS_PER_HOUR,
            "w" => 7 * 24 * SECS_PER_HOUR,
            _ => {
                return Err(format!(
                    "retention {text:?}: write a number and a unit (s, m, h, d, w), e.g. \"30d\", or \"forever\""
                ));
            }
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("retention {text:?}: {number:?} is not a whole number"))?;
        let secs = n
            .checked_mul(unit_secs)
            .filter(|s| *s <= i64::MAX as u64 / NANOS_PER_SEC as u64)
            .ok_or_else(|| format!("retention {text:?} is too long; use \"forever\""))?;
        if secs < SECS_PER_HOUR {
            return Err(format!(
                "retention {text:?} is shorter than one hour, the size of a partition"
            ));
        }
        Ok(RetentionPeriod { secs: Some(secs) })
    }

    /// Whether the hour partition `hour` (hours since the epoch) lies wholly before `now - period`.
    pub fn expired(self, hour: i64, now_nanos: i64) -> bool {
        let Some(secs) = self.secs else {
            return false;
        };
        let cutoff = now_nanos.saturating_sub(secs as i64 * NANOS_PER_SEC);
        let hour_end = hour.saturating_add(1).saturating_mul(3_600 * NANOS_PER_SEC);
        hour_end <= cutoff
    }
}

impl fmt::Display for RetentionPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.secs {
            None => f.write_str("forever"),
            Some(s) if s.is_multiple_of(7 * 24 * SECS_PER_HOUR) => {
                write!(f, "{}w", s / (7 * 24 * 3_600))
            }
            Some(s) if s.is_multiple_of(24 * SECS_PER_HOUR) => write!(f, "{}d", s / (24 * 3_600)),
            Some(s) if s.is_multiple_of(SECS_PER_HOUR) => write!(f, "{}h", s / 3_600),
            Some(s) if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            Some(s) => write!(f, "{s}s"),
        }
    }
}

impl TryFrom<String> for RetentionPeriod {
    type Error = String;

    fn try_from(value: String) -> std::result::Result<Self, Self::Error> {
        RetentionPeriod::parse(&value)
    }
}

impl From<RetentionPeriod> for String {
    fn from(value: RetentionPeriod) -> String {
        value.to_string()
    }
}

/// What kind of table a retention applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Raw,
    Rollup(Resolution),
}

/// The `[retention]` key of a table: its name, or `rollup_1m.<name>` / `rollup_1h.<name>`.
pub fn retention_key(kind: TableKind, table: &str) -> String {
    match kind {
        TableKind::Raw => table.to_string(),
        TableKind::Rollup(res) => format!("{}.{table}", res.schema_name()),
    }
}

/// The retention of one table under `config`.
pub fn period_for(config: &CollectorConfig, kind: TableKind, table: &str) -> RetentionPeriod {
    if let Some(p) = config.retention.get(&retention_key(kind, table)) {
        return *p;
    }
    match kind {
        TableKind::Raw => config.retention_default,
        TableKind::Rollup(Resolution::Minute) => config.retention_rollup_1m_default,
        TableKind::Rollup(Resolution::Hour) => config.retention_rollup_1h_default,
    }
}

/// Checks the `[retention]` keys: measurement names, optionally prefixed by a rollup schema.
pub fn validate_keys(config: &CollectorConfig) -> Result<()> {
    for key in config.retention.keys() {
        let table = Resolution::ALL
            .iter()
            .find_map(|r| key.strip_prefix(&format!("{}.", r.schema_name())))
            .unwrap_or(key);
        check_measurement(table).map_err(|m| {
            CollectorError::Config(format!(
                "[retention] key {key:?}: {m} (keys are table names, or rollup_1m.<table> / rollup_1h.<table>)"
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_print() {
        assert_eq!(RetentionPeriod::parse("30d"), Ok(RetentionPeriod::days(30)));
        assert_eq!(
            RetentionPeriod::parse("2w").map(RetentionPeriod::secs),
            Ok(Some(14 * 86_400))
        );
        assert_eq!(
            RetentionPeriod::parse("90m").map(RetentionPeriod::secs),
            Ok(Some(5_400))
        );
        assert_eq!(
            RetentionPeriod::parse("forever"),
            Ok(RetentionPeriod::FOREVER)
        );
        for bad in ["", "30", "d", "1.5d", "-1d", "30 days", "59m", "0h"] {
            assert!(RetentionPeriod::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RetentionPeriod::parse("99999999999999999w").is_err());
        for text in ["30d", "2w", "12h", "90m", "forever"] {
            let p = RetentionPeriod::parse(text).expect(text);
            assert_eq!(p.to_string(), text);
        }
    }

    #[test]
    fn a_partition_expires_when_its_whole_hour_is_older_than_the_period() {
        let hour_ns = 3_600 * NANOS_PER_SEC;
        let day = RetentionPeriod::days(1);
        let now = 1_000 * hour_ns + 1;
        // Hour 975 ends at 976h, which is 24h + 1ns before now: expired. Hour 976 ends exactly 24h before now
        // minus 1ns: not all of it is older than the limit yet.
        assert!(day.expired(975, now));
        assert!(!day.expired(976, now));
        assert!(!RetentionPeriod::FOREVER.expired(0, now));
    }

    #[test]
    fn overrides_win_over_defaults() {
        let mut config = CollectorConfig::default();
        config
            .retention
            .insert("cpu".into(), RetentionPeriod::days(7));
        config
            .retention
            .insert("rollup_1h.cpu".into(), RetentionPeriod::FOREVER);
        assert_eq!(
            period_for(&config, TableKind::Raw, "cpu"),
            RetentionPeriod::days(7)
        );
        assert_eq!(
            period_for(&config, TableKind::Raw, "mem"),
            config.retention_default
        );
        assert_eq!(
            period_for(&config, TableKind::Rollup(Resolution::Hour), "cpu"),
            RetentionPeriod::FOREVER
        );
        assert_eq!(
            period_for(&config, TableKind::Rollup(Resolution::Minute), "cpu"),
            config.retention_rollup_1m_default
        );
        assert!(validate_keys(&config).is_ok());
        config
            .retention
            .insert("rollup_1m./etc".into(), RetentionPeriod::FOREVER);
        assert!(validate_keys(&config).is_err());
    }
}
