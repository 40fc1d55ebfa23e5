//! Hourly rollups used automatically: an aggregate over a long time range reads whole hours from `rollup_1h`
//! (one row per series and hour) instead of every raw row, and only the rest from the raw table.
//!
//! A query qualifies when the answer is the same (up to the rounding of float sums added in another order):
//!
//! - it aggregates one measurement directly (filters allowed, no join or subquery below the aggregate);
//! - it groups by tag expressions and at most one time bucket whose boundaries fall on whole hours:
//!   `date_trunc('hour' | 'day' | 'week' | 'month' | 'quarter' | 'year', time)` or `date_bin` / `time_bucket` with a
//!   whole number of hours and an hour-aligned origin; every raw row of an hour then lands in the bucket of the
//!   hour's start, which is the rollup row's `time`;
//! - its aggregates are `min`, `max`, `count` of a numeric field and `sum`, `avg` of a float field (no DISTINCT,
//!   FILTER or ORDER BY inside);
//! - its conditions use only tags, or bound `time` by constants (`now()` included).
//!
//! The hours used are the longest run, inside the range asked, in which the rollup holds exactly the stored rows
//! ([`crate::rollup::covered_hours`]: built from the partition's current files, no buffered row in it). The plan
//! becomes an aggregate over the union of the rollup's rows for that run and the raw rows before and after it, each
//! giving per field the partial statistics (`min`, `max`, `sum`, `count`) that the new aggregate combines; a final
//! projection gives the columns their original names and types, so the rest of the plan is unchanged.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::catalog::default_table_source::{provider_as_source, source_as_provider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::error::Result as DfResult;
use datafusion::execution::SessionState;
use datafusion::functions_aggregate::expr_fn::{max, min, sum};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Between, BinaryExpr, Expr, LogicalPlan, LogicalPlanBuilder, Operator, cast, lit,
    when,
};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::prelude::and;

use crate::model::{ColumnKind, FieldType, TIME_COLUMN};
use crate::query::SnapshotTable;

const HOUR: i64 = 3_600_000_000_000;

/// The statistics a rollup keeps per field, as the column-name suffixes of [`crate::rollup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stat {
    Min,
    Max,
    Sum,
    Count,
}

impl Stat {
    fn suffix(self) -> &'static str {
        match self {
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Sum => "sum",
            Stat::Count => "count",
        }
    }
}

/// Rewrites every qualifying aggregate of `plan` (see the module doc); returns the plan and how many were.
pub fn use_rollups(state: &SessionState, plan: LogicalPlan) -> DfResult<(LogicalPlan, usize)> {
    let mut count = 0;
    let rewritten = plan.transform_up(|node| {
        let LogicalPlan::Aggregate(aggregate) = &node else {
            // Ancestors of a rewritten aggregate: its output has the same names and types, nullability aside.
            return if count > 0 {
                node.recompute_schema().map(Transformed::yes)
            } else {
                Ok(Transformed::no(node))
            };
        };
        match rewrite_aggregate(state, aggregate)? {
            Some(new) => {
                count += 1;
                Ok(Transformed::yes(new))
            }
            None => Ok(Transformed::no(node)),
        }
    })?;
    Ok((rewritten.data, count))
}

fn rewrite_aggregate(state: &SessionState, aggregate: &Aggregate) -> DfResult<Option<LogicalPlan>> {
    // Down to a measurement's scan through filters only.
    let mut conditions: Vec<&Expr> = Vec::new();
    let mut node = aggregate.input.as_ref();
    let scan = loop {
        match node {
            LogicalPlan::Filter(filter) => {
                conditions.extend(split_conjunction(&filter.predicate));
                node = filter.input.as_ref();
            }
            LogicalPlan::TableScan(scan) => break scan,
            _ => return Ok(None),
        }
    };
    if scan.fetch.is_some() {
        return Ok(None);
    }
    conditions.extend(scan.filters.iter());
    let Ok(provider) = source_as_provider(&scan.source) else {
        return Ok(None);
    };
    let any: &dyn std::any::Any = provider.as_ref();
    let Some(table) = any.downcast_ref::<SnapshotTable>() else {
        return Ok(None);
    };
    let Some((store, name)) = table.latest.as_ref() else {
        return Ok(None);
    };
    let tags = table.tags();
    let only_tags = |e: &Expr| {
        e.column_refs()
            .iter()
            .all(|c| tags.contains(c.name.as_str()))
    };

    // Group by tags and at most one hour-aligned time bucket.
    let simplifier = simplifier(state);
    let mut buckets = 0;
    for expr in &aggregate.group_expr {
        if matches!(expr, Expr::GroupingSet(_)) {
            return Ok(None);
        }
        if only_tags(expr) {
            continue;
        }
        if !is_hour_bucket(&simplifier, unalias(expr)) {
            return Ok(None);
        }
        buckets += 1;
    }
    if buckets > 1 {
        return Ok(None);
    }

    // Aggregates the statistics can give.
    let field_type = |name: &str| match table.column_kind(name) {
        Some(ColumnKind::Field(t)) => Some(t),
        _ => None,
    };
    let mut wanted: BTreeSet<(String, Stat)> = BTreeSet::new();
    let mut aggregates = Vec::with_capacity(aggregate.aggr_expr.len());
    for expr in &aggregate.aggr_expr {
        let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(expr) else {
            return Ok(None);
        };
        if params.distinct
            || params.filter.is_some()
            || !params.order_by.is_empty()
            || params.null_treatment.is_some()
        {
            return Ok(None);
        }
        let [Expr::Column(column)] = params.args.as_slice() else {
            return Ok(None);
        };
        let Some(kind) = field_type(&column.name) else {
            return Ok(None);
        };
        let numeric = matches!(kind, FieldType::F64 | FieldType::I64 | FieldType::U64);
        let stats: &[Stat] = match (func.name(), kind) {
            ("min", _) if numeric => &[Stat::Min],
            ("max", _) if numeric => &[Stat::Max],
            ("count", _) if numeric => &[Stat::Count],
            // Integer sums may overflow in a rollup (stored as null): floats only.
            ("sum", FieldType::F64) => &[Stat::Sum],
            ("avg", FieldType::F64) => &[Stat::Sum, Stat::Count],
            _ => return Ok(None),
        };
        for stat in stats {
            wanted.insert((column.name.clone(), *stat));
        }
        aggregates.push((func.name().to_string(), column.name.clone()));
    }

    // Conditions on tags, and constant bounds on time.
    let mut bounds = TimeBounds::default();
    for condition in &conditions {
        if only_tags(condition) {
            continue;
        }
        if !bounds.add(&simplifier, condition) {
            return Ok(None);
        }
    }
    let first_hour = bounds
        .min
        .map(|t| t.div_euclid(HOUR) + i64::from(t.rem_euclid(HOUR) != 0));
    let last_hour = bounds.max.map(|t| t.saturating_add(1).div_euclid(HOUR) - 1);
    if let (Some(a), Some(b)) = (first_hour, last_hour)
        && a > b
    {
        return Ok(None);
    }
    let Some((from, to, rollup)) = crate::rollup::covered_hours(store, name, first_hour, last_hour)
    else {
        return Ok(None);
    };
    let rollup_schema = rollup.schema.clone();
    if wanted
        .iter()
        .any(|(f, s)| rollup_schema.get(&format!("{f}_{}", s.suffix())).is_none())
    {
        return Ok(None);
    }

    // The rows: the rollup's for [from, to), the raw table's before and after.
    let (start, end) = (from.saturating_mul(HOUR), to.saturating_mul(HOUR));
    let time = || Expr::Column(Column::new_unqualified(TIME_COLUMN));
    let tag_names: Vec<&str> = tags.iter().copied().collect();
    let stat_column = |f: &str, s: Stat| format!("{f}:{}", s.suffix());
    let mut rollup_columns = vec![time()];
    let mut raw_columns = vec![time()];
    for tag in &tag_names {
        rollup_columns.push(Expr::Column(Column::new_unqualified(*tag)));
        raw_columns.push(Expr::Column(Column::new_unqualified(*tag)));
    }
    for (field, stat) in &wanted {
        let source = Expr::Column(Column::new_unqualified(format!(
            "{field}_{}",
            stat.suffix()
        )));
        rollup_columns.push(source.alias(stat_column(field, *stat)));
        let value = Expr::Column(Column::new_unqualified(field.as_str()));
        let raw = match stat {
            Stat::Count => when(value.is_not_null(), lit(1i64)).otherwise(lit(0i64))?,
            _ => value,
        };
        raw_columns.push(raw.alias(stat_column(field, *stat)));
    }
    let ts = |nanos: i64| {
        lit(ScalarValue::TimestampNanosecond(
            Some(nanos),
            Some("UTC".into()),
        ))
    };
    let all_conditions = conditions
        .iter()
        .map(|c| (*c).clone())
        .reduce(and)
        .unwrap_or(lit(true));
    let rollup_table: Arc<dyn datafusion::catalog::TableProvider> =
        Arc::new(SnapshotTable::new(rollup));
    let rollup_rows = LogicalPlanBuilder::scan(
        scan.table_name.clone(),
        provider_as_source(rollup_table),
        None,
    )?
    .filter(all_conditions.clone())?
    .filter(time().gt_eq(ts(start)).and(time().lt(ts(end))))?
    .project(rollup_columns)?;
    let raw = LogicalPlanBuilder::from(aggregate.input.as_ref().clone());
    let before = raw
        .clone()
        .filter(time().lt(ts(start)))?
        .project(raw_columns.clone())?;
    let after = raw.filter(time().gt_eq(ts(end)))?.project(raw_columns)?;
    let rows = rollup_rows
        .union(before.build()?)?
        .union(after.build()?)?
        .alias(scan.table_name.clone())?;

    // The statistics combined, then the original columns.
    let stat = |f: &str, s: Stat| Expr::Column(Column::new_unqualified(stat_column(f, s)));
    // Each distinct partial aggregate once (`avg` and `sum` of a field share the sum).
    let mut combined: Vec<Expr> = Vec::new();
    let mut position = |e: Expr| match combined.iter().position(|c| *c == e) {
        Some(i) => i,
        None => {
            combined.push(e);
            combined.len() - 1
        }
    };
    let parts: Vec<(&str, usize, usize)> = aggregates
        .iter()
        .map(|(func, field)| match func.as_str() {
            "min" => ("min", position(min(stat(field, Stat::Min))), 0),
            "max" => ("max", position(max(stat(field, Stat::Max))), 0),
            "sum" => ("sum", position(sum(stat(field, Stat::Sum))), 0),
            "count" => ("count", position(sum(stat(field, Stat::Count))), 0),
            _ => (
                "avg",
                position(sum(stat(field, Stat::Sum))),
                position(sum(stat(field, Stat::Count))),
            ),
        })
        .collect();
    let groups = aggregate.group_expr.len();
    let grouped = rows
        .aggregate(aggregate.group_expr.clone(), combined)?
        .build()?;
    let out = grouped.schema().clone();
    let column = |i: usize| {
        let (qualifier, field) = out.qualified_field(i);
        Expr::Column(Column::from((qualifier, field)))
    };
    let original = aggregate.schema.clone();
    let mut projection = Vec::with_capacity(original.fields().len());
    for i in 0..groups {
        let (qualifier, field) = original.qualified_field(i);
        projection.push(column(i).alias_qualified(qualifier.cloned(), field.name()));
    }
    for (j, (func, a, b)) in parts.into_iter().enumerate() {
        let (qualifier, field) = original.qualified_field(groups + j);
        let value = match func {
            "avg" => {
                cast(column(groups + a), DataType::Float64)
                    / cast(
                        datafusion::functions::expr_fn::nullif(column(groups + b), lit(0i64)),
                        DataType::Float64,
                    )
            }
            "count" => {
                datafusion::functions::expr_fn::coalesce(vec![column(groups + a), lit(0i64)])
            }
            _ => column(groups + a),
        };
        projection.push(
            cast(value, field.data_type().clone())
                .alias_qualified(qualifier.cloned(), field.name()),
        );
    }
    let plan = LogicalPlanBuilder::from(grouped)
        .project(projection)?
        .build()?;
    tracing::debug!(table = %name, from, to, "aggregate answered partly from rollup_1h");
    Ok(Some(plan))
}

/// The expression under any aliases.
fn unalias(mut expr: &Expr) -> &Expr {
    while let Expr::Alias(alias) = expr {
        expr = alias.expr.as_ref();
    }
    expr
}

fn simplifier(state: &SessionState) -> ExprSimplifier {
    ExprSimplifier::new(
        SimplifyContext::builder()
            .with_config_options(Arc::clone(state.config_options()))
            .with_query_execution_start_time(state.execution_props().query_execution_start_time)
            .build(),
    )
}

/// A column-free expression as a UTC nanosecond timestamp, folded to a constant.
fn constant_time(simplifier: &ExprSimplifier, expr: &Expr) -> Option<i64> {
    if !expr.column_refs().is_empty() {
        return None;
    }
    let utc = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    match simplifier.simplify(cast(expr.clone(), utc)).ok()? {
        Expr::Literal(ScalarValue::TimestampNanosecond(Some(v), _), _) => Some(v),
        _ => None,
    }
}

fn is_time(expr: &Expr) -> bool {
    matches!(expr, Expr::Column(c) if c.name == TIME_COLUMN)
}

/// Inclusive bounds on `time` in nanoseconds (`None`: unbounded).
#[derive(Debug, Default)]
struct TimeBounds {
    min: Option<i64>,
    max: Option<i64>,
}

impl TimeBounds {
    /// Narrows by one condition; false if it is not a constant bound on `time`.
    fn add(&mut self, simplifier: &ExprSimplifier, condition: &Expr) -> bool {
        match condition {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (op, bound) = if is_time(left) {
                    (*op, right.as_ref())
                } else if is_time(right) {
                    let Some(swapped) = op.swap() else {
                        return false;
                    };
                    (swapped, left.as_ref())
                } else {
                    return false;
                };
                let Some(v) = constant_time(simplifier, bound) else {
                    return false;
                };
                match op {
                    Operator::Gt => self.at_least(v.saturating_add(1)),
                    Operator::GtEq => self.at_least(v),
                    Operator::Lt => self.at_most(v.saturating_sub(1)),
                    Operator::LtEq => self.at_most(v),
                    Operator::Eq => {
                        self.at_least(v);
                        self.at_most(v);
                    }
                    _ => return false,
                }
                true
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) if is_time(expr) => {
                let (Some(a), Some(b)) = (
                    constant_time(simplifier, low),
                    constant_time(simplifier, high),
                ) else {
                    return false;
                };
                self.at_least(a);
                self.at_most(b);
                true
            }
            _ => false,
        }
    }

    fn at_least(&mut self, v: i64) {
        self.min = Some(self.min.map_or(v, |m| m.max(v)));
    }

    fn at_most(&mut self, v: i64) {
        self.max = Some(self.max.map_or(v, |m| m.min(v)));
    }
}

/// `date_trunc(<hour or coarser>, time)`, or `date_bin` / `time_bucket` of whole hours with an hour-aligned
/// origin: buckets whose boundaries are hour boundaries.
fn is_hour_bucket(simplifier: &ExprSimplifier, expr: &Expr) -> bool {
    let Expr::ScalarFunction(f) = expr else {
        return false;
    };
    let constant = |e: &Expr| {
        if !e.column_refs().is_empty() {
            return None;
        }
        match simplifier.simplify(e.clone()).ok()? {
            Expr::Literal(v, _) => Some(v),
            _ => None,
        }
    };
    match (f.func.name(), f.args.as_slice()) {
        ("date_trunc", [unit, source]) if is_time(source) => matches!(
            constant(unit),
            Some(ScalarValue::Utf8(Some(u)) | ScalarValue::Utf8View(Some(u)) | ScalarValue::LargeUtf8(Some(u)))
                if ["hour", "day", "week", "month", "quarter", "year"].contains(&u.to_ascii_lowercase().as_str())
        ),
        ("date_bin", [stride, source, rest @ ..]) if is_time(source) && rest.len() <= 1 => {
            let whole_hours = match constant(stride) {
                Some(ScalarValue::IntervalMonthDayNano(Some(v))) => {
                    v.months == 0
                        && i64::from(v.days)
                            .checked_mul(24 * HOUR)
                            .and_then(|d| d.checked_add(v.nanoseconds))
                            .is_some_and(|n| n > 0 && n % HOUR == 0)
                }
                Some(ScalarValue::IntervalDayTime(Some(v))) => {
                    let ms = i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds);
                    ms > 0 && ms % 3_600_000 == 0
                }
                _ => false,
            };
            let aligned_origin = rest
                .first()
                .is_none_or(|o| constant_time(simplifier, o).is_some_and(|t| t % HOUR == 0));
            whole_hours && aligned_origin
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use damselfly_proto::v1::{Field, Point, Tag, field::Value};

    use crate::config::{CollectorConfig, WalSync};
    use crate::maintenance::Maintenance;
    use crate::query::{QueryEngine, QueryLimits};
    use crate::store::Store;

    const MINUTE: i64 = 60_000_000_000;
    const HOUR: i64 = 60 * MINUTE;

    fn point(host: usize, time: i64, usage: f64, n: i64) -> Point {
        Point {
            measurement: "cpu".into(),
            tags: vec![Tag {
                key: "host".into(),
                value: format!("h{host}"),
            }],
            fields: vec![
                Field {
                    key: "usage".into(),
                    value: Some(Value::F64(usage)),
                },
                Field {
                    key: "n".into(),
                    value: Some(Value::I64(n)),
                },
            ],
            time_unix_nano: time,
        }
    }

    use crate::testutil::store_points as write;

    async fn text(engine: &QueryEngine, sql: &str) -> String {
        let result = engine
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        arrow::util::pretty::pretty_format_batches(&result.batches)
            .expect("format")
            .to_string()
    }

    fn ts(nanos: i64) -> String {
        format!("to_timestamp_nanos({nanos})")
    }

    /// Asks `sql` (which must contain `WHERE`) and the same with a field condition that keeps every row but stops
    /// the rewrite; the answers must be equal, and `rewritten` says whether the first used the rollup.
    async fn check(engine: &QueryEngine, sql: &str, rewritten: bool) -> String {
        let before = engine.rollup_queries();
        let answer = text(engine, sql).await;
        assert_eq!(
            engine.rollup_queries() - before,
            u64::from(rewritten),
            "rewritten? {sql}"
        );
        let scan = sql.replacen("WHERE", "WHERE usage > -1000 AND", 1);
        assert_eq!(answer, text(engine, &scan).await, "{sql}");
        assert_eq!(engine.rollup_queries() - before, u64::from(rewritten));
        answer
    }

    #[tokio::test]
    async fn long_range_aggregates_read_whole_hours_from_the_rollup_with_the_same_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CollectorConfig {
            data_dir: dir.path().to_path_buf(),
            wal_sync: WalSync::None,
            ..CollectorConfig::default()
        };
        let store = Store::open(&config).expect("open");
        let base = (crate::model::now_nanos() / HOUR - 8) * HOUR;
        // 3 hosts, every 5 minutes for 6 hours; values exact in binary, so sums do not depend on their order.
        let mut points = Vec::new();
        for i in 0..72i64 {
            for h in 0..3 {
                let usage = ((i * 7 + h as i64 * 13) % 40) as f64 * 0.5;
                points.push(point(
                    h,
                    base + i * 5 * MINUTE + h as i64 * 1_000,
                    usage,
                    i - 30,
                ));
            }
        }
        write(&store, 1, points).await;
        store.flush().await.expect("flush");
        Maintenance::new(store.clone())
            .with_deletion_grace(Duration::ZERO)
            .run_pass()
            .await;
        let engine = QueryEngine::new(
            store.clone(),
            QueryLimits {
                timeout: Duration::from_secs(30),
                memory_bytes: 256 << 20,
                max_result_rows: 100_000,
            },
        )
        .expect("engine");
        let (from, to) = (ts(base + 30 * MINUTE), ts(base + 5 * HOUR + 20 * MINUTE));
        let hourly = format!(
            "SELECT date_trunc('hour', time) AS hour, host, avg(usage) AS mean, min(usage), max(n), count(n), \
             sum(usage) FROM cpu WHERE time >= {from} AND time < {to} GROUP BY 1, 2 ORDER BY 1, 2"
        );
        let answer = check(&engine, &hourly, true).await;
        assert_eq!(answer.lines().count(), 6 * 3 + 4, "{answer}");
        for sql in [
            format!(
                "SELECT time_bucket(INTERVAL '2 hours', time) AS b, max(usage) FROM cpu WHERE host = 'h1' \
                 AND time BETWEEN {from} AND {to} GROUP BY b ORDER BY b"
            ),
            "SELECT host, count(usage), min(n) FROM cpu WHERE host <> 'h0' GROUP BY host ORDER BY host"
                .to_string(),
            format!("SELECT max(usage) FROM cpu WHERE time > {from}"),
        ] {
            check(&engine, &sql, true).await;
        }
        // Not qualifying: minute buckets, an integer sum, count(*), an hour bucket with an odd origin.
        for sql in [
            format!(
                "SELECT date_trunc('minute', time) AS m, max(usage) FROM cpu WHERE time >= {from} GROUP BY m \
                 ORDER BY m"
            ),
            "SELECT host, sum(n) FROM cpu WHERE host = 'h2' GROUP BY host".to_string(),
            "SELECT count(*) FROM cpu WHERE host = 'h2'".to_string(),
            format!(
                "SELECT date_bin(INTERVAL '1 hour', time, {}) AS b, max(usage) FROM cpu WHERE host = 'h2' \
                 GROUP BY b ORDER BY b",
                ts(base + MINUTE)
            ),
        ] {
            check(&engine, &sql, false).await;
        }

        // A late row into a rolled-up hour: that hour is read raw until maintenance rebuilds it.
        write(
            &store,
            2,
            vec![point(1, base + 2 * HOUR + 7 * MINUTE, 99.5, 500)],
        )
        .await;
        let late = check(&engine, &hourly, true).await;
        assert_ne!(late, answer);
        assert!(late.contains("| 500 "), "{late}");
        store.flush().await.expect("flush");
        check(&engine, &hourly, true).await;
        Maintenance::new(store.clone())
            .with_deletion_grace(Duration::ZERO)
            .run_pass()
            .await;
        assert_eq!(check(&engine, &hourly, true).await, late);
    }
}
