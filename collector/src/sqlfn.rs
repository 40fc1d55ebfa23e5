//! Time-series SQL functions registered on every query's `SessionContext` ([`register`]).
//!
//! - `time_bucket(width, ts [, origin])`: an alias of DataFusion's `date_bin` (TimescaleDB's argument order,
//!   `(bucket_width, ts)`, is `date_bin`'s `(stride, source)`).
//! - `first(value, time)` / `last(value, time)`: the value at the smallest / largest `time` of the group.
//! - `derivative(value, time)` and `rate(value, time)`: per-second change over the group, `rate` for counters
//!   (resets handled as in Prometheus, never negative).
//!
//! Shared rules: rows whose value or time is NULL are skipped (wide tables hold one column per field, and a row
//! that lacks a field must not hide the field's real first or last value); a group with no remaining row gives
//! NULL. `time` is any timestamp type. The exact definitions, with worked examples, are in `docs/SQL.md`.

use std::mem::size_of_val;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type, TimeUnit};
use datafusion::common::utils::SingleRowListArrayBuilder;
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result as DfResult;
use datafusion::functions::datetime::date_bin;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// Registers the time-series functions on `ctx`.
pub fn register(ctx: &SessionContext) {
    // Re-registering `date_bin` with an alias makes `time_bucket` the very same function (same planning,
    // same simplifications); the result column is still named `date_bin(...)` unless the query renames it.
    ctx.register_udf(date_bin().as_ref().clone().with_aliases(["time_bucket"]));
    for which in [Pick::First, Pick::Last] {
        ctx.register_udaf(AggregateUDF::from(FirstLast::new(which)));
    }
    for kind in [Change::Derivative, Change::Rate] {
        ctx.register_udaf(AggregateUDF::from(PerSecond::new(kind)));
    }
}

/// The state's time type: nanoseconds since the epoch, whatever the input's unit.
const STATE_TIME: DataType = DataType::Timestamp(TimeUnit::Nanosecond, None);

fn check_time(name: &str, arg_types: &[DataType]) -> DfResult<()> {
    match arg_types {
        [_, DataType::Timestamp(..)] => Ok(()),
        [_, other] => plan_err!("{name}(value, time): time must be a timestamp, not {other}"),
        _ => plan_err!("{name} takes two arguments: {name}(value, time)"),
    }
}

/// `times` as nanoseconds since the epoch (the array is a timestamp of any unit; the zone does not change the
/// instant, so it is kept and only the unit converted).
fn time_nanos(times: &ArrayRef) -> DfResult<ArrayRef> {
    match times.data_type() {
        DataType::Timestamp(TimeUnit::Nanosecond, _) => Ok(Arc::clone(times)),
        DataType::Timestamp(_, tz) => Ok(cast(
            times,
            &DataType::Timestamp(TimeUnit::Nanosecond, tz.clone()),
        )?),
        other => exec_err!("time must be a timestamp, not {other}"),
    }
}

/// Which end of the group `first` / `last` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pick {
    First,
    Last,
}

impl Pick {
    /// Whether a row at `new` replaces the one kept at `kept`. Ties: `first` keeps the row seen first, `last` takes
    /// the row seen last (as `first_value` / `last_value` over a stable sort would).
    fn replaces(self, new: i64, kept: i64) -> bool {
        match self {
            Pick::First => new < kept,
            Pick::Last => new >= kept,
        }
    }
}

/// `first(value, time)` / `last(value, time)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct FirstLast {
    which: Pick,
    signature: Signature,
}

impl FirstLast {
    fn new(which: Pick) -> FirstLast {
        FirstLast {
            which,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for FirstLast {
    fn name(&self) -> &str {
        match self.which {
            Pick::First => "first",
            Pick::Last => "last",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        check_time(self.name(), arg_types)?;
        Ok(arg_types[0].clone())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format_state_name(args.name, "value"),
                args.return_type().clone(),
                true,
            )),
            Arc::new(Field::new(
                format_state_name(args.name, "time"),
                STATE_TIME,
                true,
            )),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(FirstLastAccumulator {
            which: self.which,
            value: ScalarValue::try_from(args.return_type())?,
            time: None,
        }))
    }
}

#[derive(Debug)]
struct FirstLastAccumulator {
    which: Pick,
    /// The kept value; NULL (of the value's type) until a row is kept.
    value: ScalarValue,
    time: Option<i64>,
}

impl FirstLastAccumulator {
    /// Keeps the best row of `values`/`times` if it beats the kept one. Input rows and partial states (value, time)
    /// have the same shape, so this serves both.
    fn take(&mut self, values: &ArrayRef, times: &ArrayRef) -> DfResult<()> {
        let times = time_nanos(times)?;
        let times = times.as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        let mut best: Option<(usize, i64)> = None;
        for i in 0..values.len() {
            if values.is_null(i) || times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            if best.is_none_or(|(_, kept)| self.which.replaces(t, kept)) {
                best = Some((i, t));
            }
        }
        if let Some((i, t)) = best
            && self.time.is_none_or(|kept| self.which.replaces(t, kept))
        {
            self.value = ScalarValue::try_from_array(values, i)?;
            self.time = Some(t);
        }
        Ok(())
    }
}

impl Accumulator for FirstLastAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        match values {
            [v, t] => self.take(v, t),
            _ => exec_err!("first/last take two arguments"),
        }
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![
            self.value.clone(),
            ScalarValue::TimestampNanosecond(self.time, None),
        ])
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(self.value.clone())
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.value.size() - size_of_val(&self.value)
    }
}

/// What `derivative` / `rate` compute from the group's points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Change {
    Derivative,
    Rate,
}

/// `derivative(value, time)` / `rate(value, time)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PerSecond {
    kind: Change,
    signature: Signature,
}

impl PerSecond {
    fn new(kind: Change) -> PerSecond {
        PerSecond {
            kind,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for PerSecond {
    fn name(&self) -> &str {
        match self.kind {
            Change::Derivative => "derivative",
            Change::Rate => "rate",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        check_time(self.name(), arg_types)?;
        if !arg_types[0].is_numeric() {
            return plan_err!(
                "{}(value, time): value must be numeric, not {}",
                self.name(),
                arg_types[0]
            );
        }
        Ok(DataType::Float64)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        let list = |part: &str, item: DataType| {
            Arc::new(Field::new_list(
                format_state_name(args.name, part),
                Field::new_list_field(item, true),
                true,
            ))
        };
        Ok(vec![
            list("times", DataType::Int64),
            list("values", DataType::Float64),
        ])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(PerSecondAccumulator {
            kind: self.kind,
            points: Vec::new(),
        }))
    }
}

/// Keeps every (time, value) point of the group: a rate needs them in time order, and rows arrive in any order.
#[derive(Debug)]
struct PerSecondAccumulator {
    kind: Change,
    /// (nanoseconds since the epoch, value), in the order seen.
    points: Vec<(i64, f64)>,
}

impl PerSecondAccumulator {
    fn extend(&mut self, times: &Int64Array, values: &Float64Array) {
        let rows = (0..times.len()).filter(|&i| !times.is_null(i) && !values.is_null(i));
        self.points
            .extend(rows.map(|i| (times.value(i), values.value(i))));
    }
}

impl Accumulator for PerSecondAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let [v, t] = values else {
            return exec_err!("derivative/rate take two arguments");
        };
        let times = cast(&time_nanos(t)?, &DataType::Int64)?;
        let v = cast(v, &DataType::Float64)?;
        self.extend(
            times.as_primitive::<Int64Type>(),
            v.as_primitive::<Float64Type>(),
        );
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let [times, values] = states else {
            return exec_err!("derivative/rate state has two columns");
        };
        let (times, values) = (times.as_list::<i32>(), values.as_list::<i32>());
        for row in 0..times.len() {
            if times.is_null(row) || values.is_null(row) {
                continue;
            }
            let (t, v) = (times.value(row), values.value(row));
            self.extend(
                t.as_primitive::<Int64Type>(),
                v.as_primitive::<Float64Type>(),
            );
        }
        Ok(())
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        let times: Int64Array = self.points.iter().map(|p| Some(p.0)).collect();
        let values: Float64Array = self.points.iter().map(|p| Some(p.1)).collect();
        let list = |array: ArrayRef| {
            SingleRowListArrayBuilder::new(array)
                .with_nullable(true)
                .build_list_scalar()
        };
        Ok(vec![list(Arc::new(times)), list(Arc::new(values))])
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        // Stable: points at the same time stay in the order seen.
        self.points.sort_by_key(|p| p.0);
        Ok(ScalarValue::Float64(per_second(self.kind, &self.points)))
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.points.capacity() * size_of_val(&(0i64, 0f64))
    }
}

/// The change per second over `points` (sorted by time); `None` with fewer than two points or no time between the
/// first and the last.
fn per_second(kind: Change, points: &[(i64, f64)]) -> Option<f64> {
    let (&(t0, v0), &(t1, v1)) = (points.first()?, points.last()?);
    if t1 <= t0 {
        return None;
    }
    let seconds = (t1 - t0) as f64 / 1e9;
    let change = match kind {
        Change::Derivative => v1 - v0,
        Change::Rate => {
            // Prometheus: a drop is a counter reset, after which the counter counted up from zero to the new value.
            let increase: f64 = points
                .windows(2)
                .map(|w| {
                    let (prev, cur) = (w[0].1, w[1].1);
                    if cur < prev { cur } else { cur - prev }
                })
                .sum();
            // Only negative counter values can make it negative; `if` (not `max`) keeps a NaN visible.
            if increase < 0.0 { 0.0 } else { increase }
        }
    };
    Some(change / seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, StringArray, TimestampNanosecondArray, UInt64Array};
    use arrow::datatypes::Schema;
    use arrow::record_batch::RecordBatch;
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;

    const S: i64 = 1_000_000_000;
    /// 2023-11-14T22:00:00Z.
    const T0: i64 = 1_699_999_200 * S;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("series", DataType::Utf8, false),
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ),
            Field::new("f", DataType::Float64, true),
            Field::new("i", DataType::Int64, true),
            Field::new("u", DataType::UInt64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("b", DataType::Boolean, true),
        ]))
    }

    type Row = (
        &'static str,
        i64,
        Option<f64>,
        Option<i64>,
        Option<u64>,
        Option<&'static str>,
        Option<bool>,
    );

    fn batch(rows: &[Row]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(rows.iter().map(|r| Some(r.0)).collect::<StringArray>()),
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.1))
                        .collect::<TimestampNanosecondArray>()
                        .with_timezone("UTC"),
                ),
                Arc::new(rows.iter().map(|r| r.2).collect::<Float64Array>()),
                Arc::new(rows.iter().map(|r| r.3).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|r| r.4).collect::<UInt64Array>()),
                Arc::new(rows.iter().map(|r| r.5).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| r.6).collect::<BooleanArray>()),
            ],
        )
        .expect("batch")
    }

    /// Table `m` in two partitions, rows out of time order, so partial states are merged:
    /// - `a`: a counter 100, 150, 30 (a reset), 90 at T0 + 0, 10, 20, 40 s, and a row at T0 - 10 s with only NULLs;
    /// - `b`: one point; `c`: only NULL values; `d`: two rows at the same time (a tie).
    fn context() -> SessionContext {
        let one = batch(&[
            (
                "a",
                T0 + 20 * S,
                Some(30.0),
                Some(30),
                Some(30),
                Some("x30"),
                Some(false),
            ),
            ("a", T0 - 10 * S, None, None, None, None, None),
            (
                "a",
                T0 + 10 * S,
                Some(150.0),
                Some(150),
                Some(150),
                Some("x150"),
                Some(true),
            ),
            (
                "d",
                T0 + 5 * S,
                Some(1.0),
                Some(1),
                Some(1),
                Some("d1"),
                Some(true),
            ),
            (
                "d",
                T0 + 5 * S,
                Some(2.0),
                Some(2),
                Some(2),
                Some("d2"),
                Some(false),
            ),
        ]);
        let two = batch(&[
            (
                "a",
                T0 + 40 * S,
                Some(90.0),
                Some(90),
                Some(90),
                Some("x90"),
                Some(true),
            ),
            (
                "a",
                T0,
                Some(100.0),
                Some(100),
                Some(100),
                Some("x100"),
                Some(false),
            ),
            (
                "b",
                T0 + 7 * S,
                Some(5.5),
                Some(5),
                Some(5),
                Some("b5"),
                Some(true),
            ),
            ("c", T0 + 3 * S, None, None, None, None, None),
        ]);
        let ctx = SessionContext::new();
        register(&ctx);
        let table = MemTable::try_new(schema(), vec![vec![one], vec![two]]).expect("memtable");
        ctx.register_table("m", Arc::new(table)).expect("register");
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pretty_format_batches(&batches).expect("format").to_string()
    }

    fn table(lines: &[&str]) -> String {
        lines.join("\n")
    }

    #[tokio::test]
    async fn first_and_last_pick_the_value_at_the_smallest_and_largest_time() {
        let ctx = context();
        let got = run(
            &ctx,
            "SELECT series, first(f, time) AS ff, last(f, time) AS lf, first(i, time) AS fi, last(i, time) AS li, \
             first(u, time) AS fu, last(u, time) AS lu, first(s, time) AS fs, last(s, time) AS ls, \
             first(b, time) AS fb, last(b, time) AS lb FROM m GROUP BY series ORDER BY series",
        )
        .await;
        // a: the all-NULL row at T0 - 10 s is skipped. c: no value, NULL. d: a tie, first seen / last seen.
        let want = table(&[
            "+--------+-------+------+-----+----+-----+----+------+-----+-------+-------+",
            "| series | ff    | lf   | fi  | li | fu  | lu | fs   | ls  | fb    | lb    |",
            "+--------+-------+------+-----+----+-----+----+------+-----+-------+-------+",
            "| a      | 100.0 | 90.0 | 100 | 90 | 100 | 90 | x100 | x90 | false | true  |",
            "| b      | 5.5   | 5.5  | 5   | 5  | 5   | 5  | b5   | b5  | true  | true  |",
            "| c      |       |      |     |    |     |    |      |     |       |       |",
            "| d      | 1.0   | 2.0  | 1   | 2  | 1   | 2  | d1   | d2  | true  | false |",
            "+--------+-------+------+-----+----+-----+----+------+-----+-------+-------+",
        ]);
        assert_eq!(got, want, "\n{got}");
        // Also without GROUP BY (a single accumulator rather than one per group), and on an empty input.
        let got = run(
            &ctx,
            "SELECT first(f, time) AS f, last(s, time) AS s FROM m",
        )
        .await;
        let want = table(&[
            "+-------+-----+",
            "| f     | s   |",
            "+-------+-----+",
            "| 100.0 | x90 |",
            "+-------+-----+",
        ]);
        assert_eq!(got, want, "\n{got}");
        let got = run(
            &ctx,
            "SELECT first(f, time) AS f, last(b, time) AS b FROM m WHERE series = 'none'",
        )
        .await;
        let want = table(&[
            "+---+---+",
            "| f | b |",
            "+---+---+",
            "|   |   |",
            "+---+---+",
        ]);
        assert_eq!(got, want, "\n{got}");
    }

    #[tokio::test]
    async fn rate_handles_counter_resets_and_derivative_is_the_plain_slope() {
        let ctx = context();
        // a: increase = (150-100) + 30 (reset: counted up from 0) + (90-30) = 140 over 40 s = 3.5/s;
        // derivative = (90-100)/40 = -0.25/s. b (one point), c (no value) and d (no time between): NULL.
        let got = run(
            &ctx,
            "SELECT series, rate(f, time) AS rf, derivative(f, time) AS df, rate(i, time) AS ri, \
             rate(u, time) AS ru FROM m GROUP BY series ORDER BY series",
        )
        .await;
        let want = table(&[
            "+--------+-----+-------+-----+-----+",
            "| series | rf  | df    | ri  | ru  |",
            "+--------+-----+-------+-----+-----+",
            "| a      | 3.5 | -0.25 | 3.5 | 3.5 |",
            "| b      |     |       |     |     |",
            "| c      |     |       |     |     |",
            "| d      |     |       |     |     |",
            "+--------+-----+-------+-----+-----+",
        ]);
        assert_eq!(got, want, "\n{got}");
        // Empty input: one row of NULLs.
        let got = run(
            &ctx,
            "SELECT rate(f, time) AS r, derivative(f, time) AS d FROM m WHERE f > 1000",
        )
        .await;
        let want = table(&[
            "+---+---+",
            "| r | d |",
            "+---+---+",
            "|   |   |",
            "+---+---+",
        ]);
        assert_eq!(got, want, "\n{got}");
        // Without a reset the two agree.
        let got = run(
            &ctx,
            "SELECT rate(f, time) AS r, derivative(f, time) AS d FROM m WHERE series = 'a' AND time < to_timestamp(1699999215)",
        )
        .await;
        let want = table(&[
            "+-----+-----+",
            "| r   | d   |",
            "+-----+-----+",
            "| 5.0 | 5.0 |",
            "+-----+-----+",
        ]);
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn negative_counter_values_never_make_rate_negative() {
        let points = [(0, -5.0), (S, -10.0), (2 * S, -20.0)];
        assert_eq!(per_second(Change::Rate, &points), Some(0.0));
        assert_eq!(per_second(Change::Derivative, &points), Some(-7.5));
        assert_eq!(per_second(Change::Rate, &[]), None);
    }

    #[tokio::test]
    async fn time_bucket_is_date_bin() {
        let ctx = context();
        let got = run(
            &ctx,
            "SELECT time_bucket(INTERVAL '20 seconds', time) AS bucket, first(f, time) AS first, \
             last(f, time) AS last, rate(f, time) AS rate FROM m WHERE series = 'a' GROUP BY bucket ORDER BY bucket",
        )
        .await;
        let want = table(&[
            "+----------------------+-------+-------+------+",
            "| bucket               | first | last  | rate |",
            "+----------------------+-------+-------+------+",
            "| 2023-11-14T21:59:40Z |       |       |      |",
            "| 2023-11-14T22:00:00Z | 100.0 | 150.0 | 5.0  |",
            "| 2023-11-14T22:00:20Z | 30.0  | 30.0  |      |",
            "| 2023-11-14T22:00:40Z | 90.0  | 90.0  |      |",
            "+----------------------+-------+-------+------+",
        ]);
        assert_eq!(got, want, "\n{got}");
        // With an origin (buckets start at :05 and :35), the same as date_bin's.
        let got = run(
            &ctx,
            "SELECT time_bucket(INTERVAL '30 seconds', time, TIMESTAMP '2023-11-14T22:00:05Z') AS tb, \
             date_bin(INTERVAL '30 seconds', time, TIMESTAMP '2023-11-14T22:00:05Z') AS db \
             FROM m WHERE series = 'a' AND f IS NOT NULL ORDER BY time",
        )
        .await;
        let want = table(&[
            "+----------------------+----------------------+",
            "| tb                   | db                   |",
            "+----------------------+----------------------+",
            "| 2023-11-14T21:59:35Z | 2023-11-14T21:59:35Z |",
            "| 2023-11-14T22:00:05Z | 2023-11-14T22:00:05Z |",
            "| 2023-11-14T22:00:05Z | 2023-11-14T22:00:05Z |",
            "| 2023-11-14T22:00:35Z | 2023-11-14T22:00:35Z |",
            "+----------------------+----------------------+",
        ]);
        assert_eq!(got, want, "\n{got}");
    }

    #[tokio::test]
    async fn bad_arguments_are_plan_errors() {
        let ctx = context();
        for (sql, message) in [
            ("SELECT rate(s, time) FROM m", "value must be numeric"),
            ("SELECT first(f, i) FROM m", "time must be a timestamp"),
            ("SELECT last(f) FROM m", "last"),
        ] {
            let err = match ctx.sql(sql).await {
                Ok(frame) => frame.collect().await.err(),
                Err(e) => Some(e),
            };
            let err = err
                .unwrap_or_else(|| panic!("{sql} should fail"))
                .to_string();
            assert!(err.contains(message), "{sql}: {err}");
        }
    }

    #[tokio::test]
    async fn now_relative_ranges_work() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as i64;
        let rows: Vec<Row> = [-600, -240, -60]
            .iter()
            .map(|ago| ("a", now + ago * S, Some(1.0), None, None, None, None))
            .collect();
        let ctx = SessionContext::new();
        register(&ctx);
        let table = MemTable::try_new(schema(), vec![vec![batch(&rows)]]).expect("memtable");
        ctx.register_table("m", Arc::new(table)).expect("register");
        let got = run(
            &ctx,
            "SELECT count(*) AS n FROM m WHERE time > now() - INTERVAL '5 minutes'",
        )
        .await;
        let want = table_text(2);
        assert_eq!(got, want, "\n{got}");
    }

    /// Through the collector's engine: a counter on a real store, its first minute in a Parquet file and its second
    /// still in the buffer, bucketed by minute.
    #[tokio::test]
    async fn query_engine_serves_the_functions_over_files_and_buffer() {
        use crate::config::{CollectorConfig, WalSync};
        use crate::query::{QueryEngine, QueryLimits};
        use crate::store::{Store, WriteOutcome};
        use damselfly_proto::v1::{Field as PbField, Point, Tag, WriteBatch, field::Value};

        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&CollectorConfig {
            data_dir: dir.path().to_path_buf(),
            wal_sync: WalSync::None,
            ..CollectorConfig::default()
        })
        .expect("open store");
        let batch = |seq: u64, points: &[(i64, u64)]| WriteBatch {
            agent_id: "a1".into(),
            seq,
            common_tags: vec![Tag {
                key: "host".into(),
                value: "h1".into(),
            }],
            points: points
                .iter()
                .map(|&(secs, bytes)| Point {
                    measurement: "net".into(),
                    tags: vec![],
                    fields: vec![PbField {
                        key: "bytes".into(),
                        value: Some(Value::U64(bytes)),
                    }],
                    time_unix_nano: T0 + secs * S,
                })
                .collect(),
            ..Default::default()
        };
        // Minute 0: 1000, 1600, 400 (a reset), 1000 at 0, 10, 20, 40 s. Minute 1: 1300, 1900 at 60, 70 s.
        let outcome = store
            .write(batch(1, &[(0, 1000), (10, 1600), (20, 400), (40, 1000)]))
            .await;
        assert!(
            matches!(outcome, WriteOutcome::Stored { .. }),
            "{outcome:?}"
        );
        assert_eq!(store.flush().await.expect("flush"), 1);
        let outcome = store.write(batch(2, &[(60, 1300), (70, 1900)])).await;
        assert!(
            matches!(outcome, WriteOutcome::Stored { .. }),
            "{outcome:?}"
        );

        let engine = QueryEngine::new(
            store,
            QueryLimits {
                timeout: std::time::Duration::from_secs(30),
                memory_bytes: 256 << 20,
                max_result_rows: 1000,
            },
        )
        .expect("engine");
        let result = engine
            .sql(
                "SELECT host, time_bucket(INTERVAL '1 minute', time) AS minute, first(bytes, time) AS first, \
                 last(bytes, time) AS last, rate(bytes, time) AS rate, derivative(bytes, time) AS derivative \
                 FROM net GROUP BY host, minute ORDER BY host, minute",
            )
            .await
            .expect("query");
        let got = pretty_format_batches(&result.batches)
            .expect("format")
            .to_string();
        // Minute 0: increase 600 + 400 + 600 = 1600 over 40 s; minute 1: 600 over 10 s.
        let want = table(&[
            "+------+----------------------+-------+------+------+------------+",
            "| host | minute               | first | last | rate | derivative |",
            "+------+----------------------+-------+------+------+------------+",
            "| h1   | 2023-11-14T22:00:00Z | 1000  | 1000 | 40.0 | 0.0        |",
            "| h1   | 2023-11-14T22:01:00Z | 1300  | 1900 | 60.0 | 60.0       |",
            "+------+----------------------+-------+------+------+------------+",
        ]);
        assert_eq!(got, want, "\n{got}");

        // The whole series: (600 + 400 + 600 + 300 + 600) / 70 s.
        let result = engine
            .sql(
                "SELECT first(bytes, time) AS f, last(bytes, time) AS l, round(rate(bytes, time), 2) AS r \
                 FROM net WHERE host = 'h1'",
            )
            .await
            .expect("query");
        let got = pretty_format_batches(&result.batches)
            .expect("format")
            .to_string();
        let want = table(&[
            "+------+------+-------+",
            "| f    | l    | r     |",
            "+------+------+-------+",
            "| 1000 | 1900 | 35.71 |",
            "+------+------+-------+",
        ]);
        assert_eq!(got, want, "\n{got}");

        // A now()-relative range is folded to a constant before planning, so the file (from 2023) is not opened.
        let result = engine
            .sql("EXPLAIN ANALYZE SELECT count(*) FROM net WHERE time > now() - INTERVAL '5 minutes'")
            .await
            .expect("explain");
        let plan = pretty_format_batches(&result.batches)
            .expect("format")
            .to_string();
        assert!(!plan.contains(".parquet"), "{plan}");
        // (A range that covers it does open it: the check above can fail.)
        let result = engine
            .sql("EXPLAIN ANALYZE SELECT count(*) FROM net WHERE time > now() - INTERVAL '100000 days'")
            .await
            .expect("explain");
        let plan = pretty_format_batches(&result.batches)
            .expect("format")
            .to_string();
        assert!(plan.contains(".parquet"), "{plan}");
    }

    fn table_text(n: i64) -> String {
        table(&["+---+", "| n |", "+---+", &format!("| {n} |"), "+---+"])
    }
}
