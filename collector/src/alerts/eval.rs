//! The alert state machine and what one evaluation reads.
//!
//! Per (rule, group): inactive → pending (the condition holds; waiting out `for`) → firing (warning or critical)
//! → resolved (back to inactive). [`step`] is the whole machine, a pure function of the rule's [`Levels`], the
//! alert's current phase and the new value, so it is unit-tested on its own. A pending alert whose condition
//! stops holding goes back to inactive (no hysteresis: it never fired); a firing alert escalates at once and
//! leaves a level only past the rule's hysteresis band ([`Levels::held`]); a firing alert whose group has no data
//! in the window any more resolves ("no data": absence rules are the tool for silence).

use arrow::array::{Array, Float64Array, StringArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use super::rules::{Levels, Severity};

/// The phase of an active alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Firing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
        }
    }
}

/// An active alert's phase, severity and since when it is in that phase (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Current {
    pub phase: Phase,
    pub severity: Severity,
    pub since_ms: u64,
}

/// A state change, as recorded in the `alerts` table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    /// `inactive`, `pending` or `firing`.
    pub from: &'static str,
    /// `pending`, `firing`, `inactive` (a pending alert whose condition went away) or `resolved`.
    pub to: &'static str,
    pub severity: Severity,
    pub previous_severity: Option<Severity>,
}

/// One evaluation of one alert: its next phase (`None`: inactive) and the change, if any. `value` is normalised
/// (see [`Levels`]); `None` means the group has no data.
pub fn step(
    levels: &Levels,
    for_ms: u64,
    current: Option<Current>,
    value: Option<f64>,
    now_ms: u64,
) -> (Option<Current>, Option<Change>) {
    let change = |from, to, severity, previous_severity| {
        Some(Change {
            from,
            to,
            severity,
            previous_severity,
        })
    };
    match current {
        None => {
            let Some(severity) = value.and_then(|v| levels.raw(v)) else {
                return (None, None);
            };
            let phase = if for_ms == 0 {
                Phase::Firing
            } else {
                Phase::Pending
            };
            (
                Some(Current {
                    phase,
                    severity,
                    since_ms: now_ms,
                }),
                change("inactive", phase.as_str(), severity, None),
            )
        }
        Some(c) if c.phase == Phase::Pending => match value.and_then(|v| levels.raw(v)) {
            None => (None, change("pending", "inactive", c.severity, None)),
            Some(severity) if now_ms.saturating_sub(c.since_ms) >= for_ms => (
                Some(Current {
                    phase: Phase::Firing,
                    severity,
                    since_ms: now_ms,
                }),
                change("pending", "firing", severity, None),
            ),
            Some(severity) => (Some(Current { severity, ..c }), None),
        },
        Some(c) => match value.and_then(|v| levels.held(c.severity, v)) {
            None => (None, change("firing", "resolved", c.severity, None)),
            Some(severity) if severity != c.severity => (
                Some(Current { severity, ..c }),
                change("firing", "firing", severity, Some(c.severity)),
            ),
            Some(_) => (Some(c), None),
        },
    }
}

/// One group of a shared query's answer: its tag values and each expression's value.
pub type GroupRow = (Vec<String>, Vec<Option<f64>>);

/// The rows of a shared query: per row, the group's tag values (in `group_by` order; a null tag is `""`) and each
/// expression's value (`e0`, `e1`, ...; `None` for null or NaN).
pub fn read_rows(
    batches: &[RecordBatch],
    group_by: &[String],
    exprs: usize,
) -> Result<Vec<GroupRow>, String> {
    let mut out = Vec::new();
    for batch in batches {
        let mut tags = Vec::with_capacity(group_by.len());
        for (i, name) in group_by.iter().enumerate() {
            let column = arrow::compute::cast(batch.column(i), &DataType::Utf8)
                .map_err(|e| format!("group tag {name:?}: {e}"))?;
            let strings = column
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| format!("group tag {name:?} is not text"))?
                .clone();
            tags.push(strings);
        }
        let mut values = Vec::with_capacity(exprs);
        for i in 0..exprs {
            let column = batch.column(group_by.len() + i);
            let floats = column
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| format!("expression e{i} is not a DOUBLE"))?
                .clone();
            values.push(floats);
        }
        for row in 0..batch.num_rows() {
            let key = tags
                .iter()
                .map(|t| {
                    if t.is_null(row) {
                        String::new()
                    } else {
                        t.value(row).to_owned()
                    }
                })
                .collect();
            let vals = values
                .iter()
                .map(|v| (!v.is_null(row) && !v.value(row).is_nan()).then(|| v.value(row)))
                .collect();
            out.push((key, vals));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(band: f64) -> Levels {
        Levels {
            warning: Some(80.0),
            critical: Some(90.0),
            inclusive: false,
            band,
            sign: 1.0,
        }
    }

    /// Runs `values` (one per second) through the machine; returns the changes as `from>to:severity`.
    fn run(levels: &Levels, for_ms: u64, values: &[Option<f64>]) -> Vec<String> {
        let mut current = None;
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let (next, change) = step(levels, for_ms, current, *v, i as u64 * 1000);
            current = next;
            if let Some(c) = change {
                out.push(format!("{}>{}:{}", c.from, c.to, c.severity.as_str()));
            }
        }
        out
    }

    #[test]
    fn alert_fires_warning_then_critical_then_resolves() {
        let changes = run(
            &levels(5.0),
            0,
            &[Some(10.0), Some(85.0), Some(95.0), Some(95.0), Some(50.0)],
        );
        assert_eq!(
            changes,
            [
                "inactive>firing:warning",
                "firing>firing:critical",
                "firing>resolved:critical"
            ]
        );
    }

    #[test]
    fn alert_waits_out_for_and_a_short_spike_never_fires() {
        let spike = run(&levels(0.0), 2000, &[Some(95.0), Some(50.0), Some(50.0)]);
        assert_eq!(
            spike,
            ["inactive>pending:critical", "pending>inactive:critical"]
        );
        let held = run(
            &levels(0.0),
            2000,
            &[Some(95.0), Some(95.0), Some(85.0), Some(85.0)],
        );
        assert_eq!(
            held,
            ["inactive>pending:critical", "pending>firing:warning"]
        );
    }

    #[test]
    fn alert_hovering_at_the_threshold_does_not_flap() {
        let hover: Vec<Option<f64>> = (0..40)
            .map(|i| Some(if i % 2 == 0 { 81.0 } else { 79.0 }))
            .collect();
        assert_eq!(run(&levels(10.0), 0, &hover), ["inactive>firing:warning"]);
        // Without a band it would flap every round: the band is what stops it.
        assert_eq!(run(&levels(0.0), 0, &hover).len(), 40);
    }

    #[test]
    fn alert_without_data_resolves() {
        let changes = run(&levels(0.0), 0, &[Some(85.0), None, None]);
        assert_eq!(
            changes,
            ["inactive>firing:warning", "firing>resolved:warning"]
        );
    }
}
