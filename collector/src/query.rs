//! SQL over the store with DataFusion.
//!
//! Every measurement is a table in `datafusion.public` (so `SELECT * FROM cpu` works unqualified). A table is the
//! union of its Parquet files (a `ListingTable`, so DataFusion prunes row groups with the page statistics) and its
//! buffered rows (a `MemTable`), taken as one consistent snapshot when the query is planned: rows are visible as
//! soon as they are acknowledged. `information_schema` is on, so `SHOW TABLES` and `SHOW COLUMNS` work.
//!
//! Queries are read-only: DDL, DML and statements such as `COPY` or `CREATE EXTERNAL TABLE` (which would read or
//! write arbitrary local files) are refused. Each query runs under a memory limit and a timeout.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{
    Between, BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

use crate::model::TIME_COLUMN;
use crate::persist::{ParquetFile, conform};
use crate::store::{Store, TableSnapshot};

/// Why a query failed, classified so the HTTP layer can pick a status code.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL is wrong: syntax, unknown table or column, type mismatch, a refused statement.
    #[error("{0}")]
    Invalid(String),
    /// The query needs more memory than a query may use.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// The query did not finish within the timeout.
    #[error(
        "query did not finish within {0:?}; narrow it (a time range, a LIMIT) or raise query_timeout_secs"
    )]
    Timeout(Duration),
    /// The result has more rows than one response may carry.
    #[error("the result has more than {0} rows; add a LIMIT or aggregate")]
    TooManyRows(usize),
    /// Something failed inside the collector (I/O, a corrupt file).
    #[error("{0}")]
    Internal(String),
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_)
            | DataFusionError::Configuration(_) => QueryError::Invalid(e.to_string()),
            DataFusionError::ResourcesExhausted(_) => QueryError::ResourcesExhausted(e.to_string()),
            // Arrow compute errors on user expressions (division by zero, a bad cast) are the query's fault.
            DataFusionError::ArrowError(..) | DataFusionError::Execution(_) => {
                QueryError::Invalid(e.to_string())
            }
            _ => QueryError::Internal(e.to_string()),
        }
    }
}

/// Limits applied to every query.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub timeout: Duration,
    pub memory_bytes: usize,
    pub max_result_rows: usize,
}

/// The result of one query.
#[derive(Debug)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Runs SQL against a [`Store`]. Cheap to clone; one per server.
#[derive(Clone)]
pub struct QueryEngine {
    ctx: SessionContext,
    limits: QueryLimits,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("limits", &self.limits)
            .finish()
    }
}

impl QueryEngine {
    pub fn new(store: Store, limits: QueryLimits) -> Result<QueryEngine, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .build_arc()
            .map_err(QueryError::from)?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("datafusion", "public");
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| QueryError::Internal("the default catalog is missing".into()))?;
        catalog
            .register_schema("public", Arc::new(StoreSchema { store }))
            .map_err(QueryError::from)?;
        Ok(QueryEngine { ctx, limits })
    }

    /// Plans and runs one read-only SQL statement.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let run = async {
            let frame = self.ctx.sql_with_options(sql, options).await?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let batches = frame.collect().await?;
            Ok::<_, DataFusionError>(QueryResult { schema, batches })
        };
        let result = tokio::time::timeout(self.limits.timeout, run)
            .await
            .map_err(|_| QueryError::Timeout(self.limits.timeout))??;
        if result.num_rows() > self.limits.max_result_rows {
            return Err(QueryError::TooManyRows(self.limits.max_result_rows));
        }
        Ok(result)
    }
}

/// `datafusion.public`: one table per measurement, looked up in the store at planning time.
#[derive(Debug)]
struct StoreSchema {
    store: Store,
}

#[async_trait]
impl SchemaProvider for StoreSchema {
    fn table_names(&self) -> Vec<String> {
        self.store.table_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self
            .store
            .snapshot(name)
            .map(|snapshot| Arc::new(SnapshotTable::new(snapshot)) as Arc<dyn TableProvider>))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.store.snapshot(name).is_some()
    }
}

/// One table at one moment: its files plus its buffered rows.
#[derive(Debug)]
struct SnapshotTable {
    schema: SchemaRef,
    snapshot: TableSnapshot,
}

impl SnapshotTable {
    fn new(snapshot: TableSnapshot) -> SnapshotTable {
        SnapshotTable {
            schema: snapshot.schema.arrow_schema(),
            snapshot,
        }
    }

    fn files_table(&self, state: &dyn Session, range: TimeRange) -> DfResult<Option<ListingTable>> {
        // Files whose time range cannot match are not even opened.
        let files: Vec<&ParquetFile> = self
            .snapshot
            .files
            .iter()
            .map(|f| f.as_ref())
            .filter(|f| range.overlaps(f.min_time, f.max_time))
            .collect();
        if files.is_empty() {
            return Ok(None);
        }
        let urls = files
            .iter()
            .map(|f| {
                let path = f.path.to_str().ok_or_else(|| {
                    DataFusionError::Internal(format!("{} is not valid UTF-8", f.path.display()))
                })?;
                ListingTableUrl::parse(path)
            })
            .collect::<DfResult<Vec<_>>>()?;
        let format = ParquetFormat::default().with_options(state.table_options().parquet.clone());
        let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(self.schema.clone());
        ListingTable::try_new(config).map(Some)
    }

    fn buffer_table(&self) -> DfResult<Option<MemTable>> {
        if self.snapshot.batches.is_empty() {
            return Ok(None);
        }
        let batches = self
            .snapshot
            .batches
            .iter()
            .map(|b| conform(b, &self.schema).map_err(|e| DataFusionError::External(Box::new(e))))
            .collect::<DfResult<Vec<_>>>()?;
        MemTable::try_new(self.schema.clone(), vec![batches]).map(Some)
    }
}

#[async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Inexact: the Parquet scan prunes with them, DataFusion still applies them to every row.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::with_capacity(2);
        if let Some(files) = self.files_table(state, TimeRange::from_filters(filters))? {
            inputs.push(files.scan(state, projection, filters, limit).await?);
        }
        if let Some(buffer) = self.buffer_table()? {
            inputs.push(buffer.scan(state, projection, filters, limit).await?);
        }
        if inputs.is_empty() {
            // A table whose columns are known but which holds no rows (every row was rejected after the schema
            // grew, or the files were removed by hand): an empty in-memory table.
            let empty = MemTable::try_new(self.schema.clone(), vec![vec![]])?;
            inputs.push(empty.scan(state, projection, filters, limit).await?);
        }
        UnionExec::try_new(inputs)
    }
}

/// Inclusive bounds on `time` (nanoseconds) implied by a query's filters; `None` = unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TimeRange {
    min: Option<i64>,
    max: Option<i64>,
}

impl TimeRange {
    /// The conjunction of every `time <op> literal` and `time BETWEEN a AND b` among the (AND-ed) filters. Anything
    /// else is ignored: the bounds only ever skip files that cannot match.
    fn from_filters(filters: &[Expr]) -> TimeRange {
        let mut range = TimeRange::default();
        for filter in filters {
            range.narrow(filter);
        }
        range
    }

    fn narrow(&mut self, expr: &Expr) {
        match expr {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                if *op == Operator::And {
                    self.narrow(left);
                    self.narrow(right);
                    return;
                }
                let (op, value) = match (
                    is_time(left),
                    timestamp_nanos(right),
                    is_time(right),
                    timestamp_nanos(left),
                ) {
                    (true, Some(v), _, _) => (*op, v),
                    // `literal < time` is `time > literal`.
                    (_, _, true, Some(v)) => match op.swap() {
                        Some(op) => (op, v),
                        None => return,
                    },
                    _ => return,
                };
                match op {
                    Operator::Eq => {
                        self.at_least(value);
                        self.at_most(value);
                    }
                    Operator::Gt => self.at_least(value.saturating_add(1)),
                    Operator::GtEq => self.at_least(value),
                    Operator::Lt => self.at_most(value.saturating_sub(1)),
                    Operator::LtEq => self.at_most(value),
                    _ => {}
                }
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) if is_time(expr) => {
                if let (Some(lo), Some(hi)) = (timestamp_nanos(low), timestamp_nanos(high)) {
                    self.at_least(lo);
                    self.at_most(hi);
                }
            }
            _ => {}
        }
    }

    fn at_least(&mut self, v: i64) {
        self.min = Some(self.min.map_or(v, |m| m.max(v)));
    }

    fn at_most(&mut self, v: i64) {
        self.max = Some(self.max.map_or(v, |m| m.min(v)));
    }

    fn overlaps(&self, min_time: i64, max_time: i64) -> bool {
        self.min.is_none_or(|lo| max_time >= lo) && self.max.is_none_or(|hi| min_time <= hi)
    }
}

fn is_time(expr: &Expr) -> bool {
    matches!(expr, Expr::Column(c) if c.name == TIME_COLUMN)
}

/// A timestamp literal in nanoseconds (the optimizer has already folded casts of constants into literals).
fn timestamp_nanos(expr: &Expr) -> Option<i64> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    match value {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    fn ts(v: i64) -> Expr {
        Expr::Literal(
            ScalarValue::TimestampNanosecond(Some(v), Some("UTC".into())),
            None,
        )
    }

    #[test]
    fn time_bounds_come_from_comparisons_and_between() {
        let r = TimeRange::from_filters(&[col("time").gt_eq(ts(100)), col("time").lt(ts(200))]);
        assert_eq!((r.min, r.max), (Some(100), Some(199)));
        let r = TimeRange::from_filters(&[ts(100).lt(col("time")).and(col("host").eq(lit("a")))]);
        assert_eq!((r.min, r.max), (Some(101), None));
        let r = TimeRange::from_filters(&[col("time").between(ts(5), ts(9))]);
        assert_eq!((r.min, r.max), (Some(5), Some(9)));
        // An OR, a negation or another column gives no bound.
        let r = TimeRange::from_filters(&[
            col("time").gt(ts(1)).or(col("x").eq(lit(1))),
            col("x").gt(lit(3)),
        ]);
        assert_eq!(r, TimeRange::default());
    }

    #[test]
    fn overlap_is_inclusive() {
        let r = TimeRange {
            min: Some(10),
            max: Some(20),
        };
        assert!(r.overlaps(20, 30) && r.overlaps(0, 10) && r.overlaps(12, 13));
        assert!(!r.overlaps(21, 30) && !r.overlaps(0, 9));
        assert!(TimeRange::default().overlaps(i64::MIN, i64::MAX));
    }
}
