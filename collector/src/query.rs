//! SQL over the store with DataFusion.
//!
//! Every measurement is a table in `datafusion.public` (so `SELECT * FROM cpu` works unqualified). A table is the
//! union of its Parquet files (a `ListingTable`, so DataFusion prunes row groups with the page statistics) and its
//! buffered rows (a `MemTable`), taken as one consistent snapshot when the query is planned: rows are visible as
//! soon as they are acknowledged. `information_schema` is on, so `SHOW TABLES` and `SHOW COLUMNS` work. Rollup
//! tables (see [`crate::rollup`]) are in the schemas `rollup_1m` and `rollup_1h`: `SELECT * FROM rollup_1m.cpu`.
//!
//! Queries are read-only: DDL, DML and statements such as `COPY` or `CREATE EXTERNAL TABLE` (which would read or
//! write arbitrary local files) are refused. Each query runs under a memory limit and a timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::default_table_source::{provider_as_source, source_as_provider};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Between, BinaryExpr, Distinct, DistinctOn, Expr, LogicalPlan, Operator,
    TableProviderFilterPushDown, TableScanBuilder, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext, lit};

use crate::catalog::{Catalog, TableSchema};
use crate::cluster::{Cluster, MissingShard, local_snapshot};
use crate::model::{ColumnKind, TIME_COLUMN};
use crate::persist::{ParquetFile, conform};
use crate::rollup::{self, Resolution};
use crate::sqlfn;
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
    /// Shards whose data the result may lack (sharded collectors: a peer that did not answer); empty when the
    /// result is complete.
    pub missing_shards: Vec<MissingShard>,
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
    store: Store,
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
    /// With other shards, each query gets its own context whose tables span every shard ([`ClusterSchema`]).
    cluster: Option<Cluster>,
    /// Queries answered from the last-value cache ([`QueryEngine::use_last_values`]).
    last_value_queries: Arc<std::sync::atomic::AtomicU64>,
    /// Aggregates answered partly from `rollup_1h` ([`crate::autorollup`]).
    rollup_queries: Arc<std::sync::atomic::AtomicU64>,
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
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("datafusion", "public");
        // Pruning, from coarse to fine: files by their time range (`TimeRange`, before DataFusion sees them), then
        // by footer statistics, row groups by statistics and by the tag columns' bloom filters, pages by the page
        // index, and finally rows while decoding (pushed-down filters, cheapest first), so columns a query only
        // projects are decoded for matching rows alone.
        let parquet = &mut config.options_mut().execution.parquet;
        parquet.pruning = true;
        parquet.bloom_filter_on_read = true;
        parquet.enable_page_index = true;
        parquet.pushdown_filters = true;
        parquet.reorder_filters = true;
        let ctx = SessionContext::new_with_config_rt(config.clone(), runtime.clone());
        sqlfn::register(&ctx);
        let catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| QueryError::Internal("the default catalog is missing".into()))?;
        // Rollup tables get their own schemas (`rollup_1m.cpu`), so they can never collide with a measurement.
        for resolution in Resolution::ALL {
            catalog
                .register_schema(
                    resolution.schema_name(),
                    Arc::new(RollupSchema {
                        store: store.clone(),
                        resolution,
                    }),
                )
                .map_err(QueryError::from)?;
        }
        catalog
            .register_schema(
                "public",
                Arc::new(StoreSchema {
                    store: store.clone(),
                }),
            )
            .map_err(QueryError::from)?;
        crate::selfmetrics::MetricsSchema::register(&ctx, &store);
        Ok(QueryEngine {
            ctx,
            limits,
            store,
            config,
            runtime,
            cluster: None,
            last_value_queries: Arc::default(),
            rollup_queries: Arc::default(),
        })
    }

    /// Makes queries span every shard of `cluster` (when it has other shards).
    pub fn with_cluster(mut self, cluster: Cluster) -> QueryEngine {
        // Peers' files in a bucket are `s3://` paths: read through the shard's S3 client.
        if let Some(store) = cluster.shared_store() {
            store.register_with(&self.runtime);
        }
        self.cluster = Some(cluster);
        self
    }

    /// The context a query runs in, and where its tables note the shards they could not fully read.
    fn context(&self) -> Result<(SessionContext, Option<MissingShards>), QueryError> {
        let Some(cluster) = self.cluster.as_ref().filter(|c| c.is_sharded()) else {
            return Ok((self.ctx.clone(), None));
        };
        let ctx = SessionContext::new_with_config_rt(self.config.clone(), self.runtime.clone());
        sqlfn::register(&ctx);
        let catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| QueryError::Internal("the default catalog is missing".into()))?;
        let missing = MissingShards::default();
        let names =
            std::iter::once("public").chain(Resolution::ALL.iter().map(|r| r.schema_name()));
        for name in names {
            catalog
                .register_schema(
                    name,
                    Arc::new(ClusterSchema {
                        store: self.store.clone(),
                        cluster: cluster.clone(),
                        schema: name,
                        missing: missing.clone(),
                    }),
                )
                .map_err(QueryError::from)?;
        }
        crate::selfmetrics::MetricsSchema::register(&ctx, &self.store);
        Ok((ctx, Some(missing)))
    }

    /// Plans one read-only SQL statement without running it: the types of its `$n` parameters (in order; `None`
    /// where the plan does not fix one) and the schema of its result. The PostgreSQL protocol's Describe needs both.
    pub async fn describe(
        &self,
        sql: &str,
    ) -> Result<(Vec<Option<arrow::datatypes::DataType>>, SchemaRef), QueryError> {
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let (ctx, _) = self.context()?;
        let frame = ctx.sql_with_options(sql, options).await?;
        let types = frame.logical_plan().get_parameter_types()?;
        let mut params: Vec<(usize, Option<arrow::datatypes::DataType>)> = types
            .into_iter()
            .filter_map(|(id, t)| Some((id.strip_prefix('$')?.parse().ok()?, t)))
            .collect();
        params.sort_by_key(|(n, _)| *n);
        // `$1` and `$3` without `$2`: the missing one is still a parameter, of unknown type.
        let count = params.last().map_or(0, |(n, _)| *n);
        let mut ordered = vec![None; count];
        for (n, t) in params {
            if let Some(slot) = n.checked_sub(1).and_then(|i| ordered.get_mut(i)) {
                *slot = t;
            }
        }
        Ok((ordered, Arc::new(frame.schema().as_arrow().clone())))
    }

    /// Counts a query refused or failed on behalf of a client (HTTP, the pg port) in `/metrics`, by kind.
    pub fn count_error(&self, e: &QueryError) {
        self.store
            .self_metrics()
            .error(crate::selfmetrics::ErrorKind::of_query(e));
    }

    /// Plans and runs one read-only SQL statement.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult, QueryError> {
        self.sql_with_params(sql, Vec::new()).await
    }

    /// [`QueryEngine::sql`] with values for the statement's `$1`, `$2`, ... parameters (bound as typed values, never
    /// spliced into the text).
    pub async fn sql_with_params(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<QueryResult, QueryError> {
        self.sql_scoped(sql, params, None).await
    }

    /// [`QueryEngine::sql_with_params`] for a reader limited to `namespaces` (`None`: all): every table the
    /// statement reads is filtered on `ns_id IN (namespaces)` inside the plan, before anything else sees its rows
    /// (see [`restrict_to_namespaces`]).
    pub async fn sql_scoped(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
        namespaces: Option<&BTreeSet<String>>,
    ) -> Result<QueryResult, QueryError> {
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let _timer = self.store.self_metrics().query_timer();
        let (ctx, missing) = self.context()?;
        let run = async {
            let mut frame = ctx.sql_with_options(sql, options).await?;
            if !params.is_empty() {
                frame = frame.with_param_values(params)?;
            }
            let (state, plan) = frame.into_parts();
            let plan = match namespaces {
                Some(allowed) => restrict_to_namespaces(plan, allowed)?,
                None => plan,
            };
            let plan = self.use_last_values(plan)?;
            let (plan, rollups) = crate::autorollup::use_rollups(&state, plan)?;
            self.rollup_queries
                .fetch_add(rollups as u64, std::sync::atomic::Ordering::Relaxed);
            let frame = datafusion::dataframe::DataFrame::new(state, plan);
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let batches = frame.collect().await?;
            let missing_shards = missing.map(|m| m.take()).unwrap_or_default();
            Ok::<_, DataFusionError>(QueryResult {
                schema,
                batches,
                missing_shards,
            })
        };
        let result = tokio::time::timeout(self.limits.timeout, run)
            .await
            .map_err(|_| QueryError::Timeout(self.limits.timeout))?
            .map_err(|e| match QueryError::from(e) {
                // DataFusion names the operator that ran out; say which setting it ran into.
                QueryError::ResourcesExhausted(message) => QueryError::ResourcesExhausted(format!(
                    "the query needs more memory than query_memory_bytes ({} bytes, shared by the queries \
                     running at once) allows; narrow it (a time range, fewer columns, a LIMIT) or raise \
                     query_memory_bytes. {message}",
                    self.limits.memory_bytes
                )),
                other => other,
            })?;
        if result.num_rows() > self.limits.max_result_rows {
            return Err(QueryError::TooManyRows(self.limits.max_result_rows));
        }
        Ok(result)
    }
}

impl QueryEngine {
    /// Aggregates answered partly from `rollup_1h` so far ([`crate::autorollup`]).
    pub fn rollup_queries(&self) -> u64 {
        self.rollup_queries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queries answered from the last-value cache so far.
    pub fn last_value_queries(&self) -> u64 {
        self.last_value_queries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Answers `DISTINCT ON (<tags>) ... ORDER BY <tags>, time DESC` from the last-value cache
    /// ([`crate::lastvalue`]) where that gives the same rows: the `ON` expressions use only tags, and every `WHERE`
    /// condition either uses only tags (the same for all rows of a series) or is a lower bound on `time` (the
    /// newest row of a series passes it whenever any row does). Then the newest row per `ON` group is the newest of
    /// its series' newest rows, so the table's scan is replaced by the cached rows and the plan is otherwise kept.
    fn use_last_values(&self, plan: LogicalPlan) -> DfResult<LogicalPlan> {
        let rewritten = plan.transform_down(|node| {
            let LogicalPlan::Distinct(Distinct::On(on)) = &node else {
                return Ok(Transformed::no(node));
            };
            let Some(input) = cached_input(on)? else {
                return Ok(Transformed::no(node));
            };
            let node = LogicalPlan::Distinct(Distinct::On(DistinctOn::try_new(
                on.on_expr.clone(),
                on.select_expr.clone(),
                on.sort_expr.clone(),
                Arc::new(input),
            )?));
            self.last_value_queries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Transformed::yes(node))
        })?;
        Ok(rewritten.data)
    }

    /// Reads, for each table that had files at start-up, the newest row of each series from them, so the
    /// last-value cache can answer for it ([`crate::lastvalue`]). Run once, in the background, after opening.
    pub async fn warm_last_values(&self) {
        for table in self.store.last_values_unwarmed() {
            let started = std::time::Instant::now();
            let rows = match self.newest_per_series(&table).await {
                Ok(rows) => Some(rows),
                Err(e) => {
                    tracing::warn!(%table, error = %e, "cannot read the newest rows for the last-value cache; \
                        latest-value queries on this table scan its files");
                    None
                }
            };
            let series = rows
                .as_ref()
                .map(|r| r.iter().map(RecordBatch::num_rows).sum::<usize>());
            self.store.last_values_warmed(&table, rows);
            tracing::debug!(%table, ?series, elapsed_ms = started.elapsed().as_millis() as u64, "last-value cache warmed");
        }
    }

    async fn newest_per_series(&self, table: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let schema = self
            .store
            .snapshot(table)
            .map(|s| s.schema)
            .ok_or_else(|| QueryError::Invalid(format!("no table {table:?}")))?;
        let tags: Vec<String> = schema
            .columns()
            .filter(|(_, kind)| *kind == ColumnKind::Tag)
            .map(|(name, _)| quote_ident(name))
            .collect();
        let table = quote_ident(table);
        let sql = if tags.is_empty() {
            format!("SELECT * FROM {table} ORDER BY time DESC LIMIT 1")
        } else {
            let tags = tags.join(", ");
            format!("SELECT DISTINCT ON ({tags}) * FROM {table} ORDER BY {tags}, time DESC")
        };
        // The table is not warm yet, so this is not itself answered from the cache.
        Ok(self.sql(&sql).await?.batches)
    }
}

/// Filters every table `plan` reads on `ns_id IN (allowed)`, right above its scan, so rows of other namespaces
/// (and rows without one) never reach the rest of the plan. A table without `ns_id` gives no rows. Tables that are
/// not the store's (the collector's own) are refused, except `information_schema`'s (names, not rows).
fn restrict_to_namespaces(plan: LogicalPlan, allowed: &BTreeSet<String>) -> DfResult<LogicalPlan> {
    let list: Vec<Expr> = allowed.iter().map(|ns| lit(ns.as_str())).collect();
    let rewritten = plan.transform_up(|node| {
        let LogicalPlan::TableScan(scan) = &node else {
            return Ok(Transformed::no(node));
        };
        if scan.table_name.schema() == Some("information_schema") {
            return Ok(Transformed::no(node));
        }
        let provider = source_as_provider(&scan.source).ok();
        let table = provider.as_ref().and_then(|p| {
            let any: &dyn std::any::Any = p.as_ref();
            any.downcast_ref::<SnapshotTable>()
        });
        let Some(table) = table else {
            return Err(DataFusionError::Plan(format!(
                "a token limited to namespaces may not read {}",
                scan.table_name
            )));
        };
        let condition = if table.column_kind(crate::auth::NS_TAG) == Some(ColumnKind::Tag) {
            Expr::Column(datafusion::common::Column::new(
                Some(scan.table_name.clone()),
                crate::auth::NS_TAG,
            ))
            .in_list(list.clone(), false)
        } else {
            lit(false)
        };
        let filtered = datafusion::logical_expr::LogicalPlanBuilder::from(node)
            .filter(condition)?
            .build()?;
        Ok(Transformed::yes(filtered))
    })?;
    Ok(rewritten.data)
}

/// An identifier quoted for SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The input of a `DISTINCT ON` with the table scan replaced by the last-value cache's rows, when that gives the
/// same answer (see [`QueryEngine::use_last_values`]); `None` otherwise.
fn cached_input(on: &DistinctOn) -> DfResult<Option<LogicalPlan>> {
    // ORDER BY <the ON expressions>, time DESC: the newest row of each group.
    let Some(sort) = &on.sort_expr else {
        return Ok(None);
    };
    let newest_first = sort.len() == on.on_expr.len() + 1
        && sort
            .last()
            .is_some_and(|s| !s.asc && matches!(&s.expr, Expr::Column(c) if c.name == TIME_COLUMN));
    if !newest_first {
        return Ok(None);
    }
    // Down to the table through filters and aliases only.
    let mut conditions = Vec::new();
    let mut node = on.input.as_ref();
    let scan = loop {
        match node {
            LogicalPlan::Filter(filter) => {
                conditions.extend(split_conjunction(&filter.predicate));
                node = filter.input.as_ref();
            }
            LogicalPlan::SubqueryAlias(alias) => node = alias.input.as_ref(),
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
    let Some((store, name)) = &table.latest else {
        return Ok(None);
    };
    let tags = table.tags();
    let only_tags = |e: &Expr| {
        e.column_refs()
            .iter()
            .all(|c| tags.contains(c.name.as_str()))
    };
    if !on.on_expr.iter().all(only_tags)
        || !conditions
            .iter()
            .all(|c| only_tags(c) || is_time_lower_bound(c))
    {
        return Ok(None);
    }
    let schema = table.schema();
    let rows = match store.last_rows(name, &schema) {
        None => return Ok(None),
        Some(Ok(rows)) => rows,
        Some(Err(e)) => {
            tracing::error!(table = %name, error = %e, "last-value cache rows unusable; scanning instead (a bug)");
            return Ok(None);
        }
    };
    let cached: Arc<dyn TableProvider> = Arc::new(MemTable::try_new(schema, vec![rows])?);
    let replaced = TableScanBuilder::new(scan.table_name.clone(), provider_as_source(cached))
        .with_projection(scan.projection.clone())
        .with_filters(scan.filters.clone())
        .with_fetch(scan.fetch)
        .build()?;
    let input = on.input.as_ref().clone().transform_up(|n| match n {
        LogicalPlan::TableScan(_) => Ok(Transformed::yes(LogicalPlan::TableScan(replaced.clone()))),
        other => Ok(Transformed::no(other)),
    })?;
    Ok(Some(input.data))
}

/// `time > x`, `time >= x`, `x < time` or `x <= time` with `x` free of columns.
fn is_time_lower_bound(expr: &Expr) -> bool {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
        return false;
    };
    let (column, bound) = match op {
        Operator::Gt | Operator::GtEq => (left.as_ref(), right.as_ref()),
        Operator::Lt | Operator::LtEq => (right.as_ref(), left.as_ref()),
        _ => return false,
    };
    is_time(column) && bound.column_refs().is_empty()
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
        Ok(self.store.snapshot(name).map(|snapshot| {
            Arc::new(SnapshotTable::measurement(&self.store, name, snapshot))
                as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.store.snapshot(name).is_some()
    }
}

/// `datafusion.rollup_1m` / `datafusion.rollup_1h`: the rollup tables of one resolution (files only).
#[derive(Debug)]
struct RollupSchema {
    store: Store,
    resolution: Resolution,
}

#[async_trait]
impl SchemaProvider for RollupSchema {
    fn table_names(&self) -> Vec<String> {
        rollup::table_names(&self.store, self.resolution)
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(rollup::snapshot(&self.store, self.resolution, name)
            .map(|snapshot| Arc::new(SnapshotTable::new(snapshot)) as Arc<dyn TableProvider>))
    }

    fn table_exist(&self, name: &str) -> bool {
        rollup::snapshot(&self.store, self.resolution, name).is_some()
    }
}

/// The shards a query could not fully read, noted by its tables while it is planned.
#[derive(Debug, Clone, Default)]
struct MissingShards(Arc<std::sync::Mutex<BTreeMap<String, String>>>);

impl MissingShards {
    fn note(&self, missing: Vec<MissingShard>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for m in missing {
            map.entry(m.shard).or_insert(m.reason);
        }
    }

    fn take(&self) -> Vec<MissingShard> {
        let map = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        map.into_iter()
            .map(|(shard, reason)| MissingShard { shard, reason })
            .collect()
    }
}

/// One schema (`public`, `rollup_1m`, `rollup_1h`) over every shard: a table is this shard's snapshot plus each
/// peer's (files and buffered rows, asked for when the query is planned; see [`crate::cluster`]).
#[derive(Debug)]
struct ClusterSchema {
    store: Store,
    cluster: Cluster,
    schema: &'static str,
    missing: MissingShards,
}

#[async_trait]
impl SchemaProvider for ClusterSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = match self.schema {
            "public" => self.store.table_names().into_iter().collect(),
            _ => Resolution::ALL
                .into_iter()
                .filter(|r| r.schema_name() == self.schema)
                .flat_map(|r| rollup::table_names(&self.store, r))
                .collect(),
        };
        names.extend(self.cluster.peer_table_names(self.schema));
        names.into_iter().collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let local = local_snapshot(&self.store, self.schema, name);
        // Other shards are only asked about names a table can have.
        if crate::model::check_measurement(name).is_err() {
            return Ok(local
                .map(|snapshot| Arc::new(SnapshotTable::new(snapshot)) as Arc<dyn TableProvider>));
        }
        let (peers, missing) = self.cluster.peer_tables(self.schema, name).await;
        self.missing.note(missing);
        if local.is_none() && peers.is_empty() {
            return Ok(None);
        }
        let mut catalog = Catalog::default();
        let mut files = Vec::new();
        let mut batches = Vec::new();
        if let Some(local) = local {
            merge_schema(&mut catalog, name, &local.schema)?;
            files.extend(local.files);
            batches.extend(local.batches);
        }
        for peer in peers {
            merge_schema(&mut catalog, name, &peer.schema)?;
            files.extend(peer.files);
            batches.extend(peer.batches);
        }
        let schema = catalog.table(name).cloned().unwrap_or_default();
        Ok(Some(Arc::new(SnapshotTable::new(TableSnapshot {
            schema,
            files,
            batches,
        }))))
    }

    fn table_exist(&self, name: &str) -> bool {
        local_snapshot(&self.store, self.schema, name).is_some()
            || self.cluster.peer_table_names(self.schema).contains(name)
    }
}

fn merge_schema(catalog: &mut Catalog, table: &str, schema: &TableSchema) -> DfResult<()> {
    catalog.merge_table(table, schema).map_err(|conflict| {
        DataFusionError::Plan(format!(
            "the shards disagree about table {table:?}: {conflict}"
        ))
    })
}

/// One table at one moment: its files plus its buffered rows.
#[derive(Debug)]
pub(crate) struct SnapshotTable {
    schema: SchemaRef,
    snapshot: TableSnapshot,
    /// The store and name of a measurement of an unsharded collector, whose last-value cache and rollups may
    /// answer for it ([`QueryEngine::use_last_values`], [`crate::autorollup`]).
    pub(crate) latest: Option<(Store, String)>,
}

impl SnapshotTable {
    pub(crate) fn new(snapshot: TableSnapshot) -> SnapshotTable {
        SnapshotTable {
            schema: snapshot.schema.arrow_schema(),
            snapshot,
            latest: None,
        }
    }

    /// A measurement whose last-value cache may answer latest-value queries.
    fn measurement(store: &Store, name: &str, snapshot: TableSnapshot) -> SnapshotTable {
        SnapshotTable {
            latest: Some((store.clone(), name.to_string())),
            ..SnapshotTable::new(snapshot)
        }
    }

    pub(crate) fn column_kind(&self, name: &str) -> Option<ColumnKind> {
        self.snapshot.schema.get(name)
    }

    pub(crate) fn tags(&self) -> BTreeSet<&str> {
        self.snapshot
            .schema
            .columns()
            .filter(|(_, kind)| *kind == ColumnKind::Tag)
            .map(|(name, _)| name)
            .collect()
    }

    /// One listing table per object store the files are in (local files, a shared bucket): DataFusion reads all
    /// paths of a listing table through the store of its first.
    fn files_tables(&self, state: &dyn Session, range: TimeRange) -> DfResult<Vec<ListingTable>> {
        // Files whose time range cannot match are not even opened.
        let files: Vec<&ParquetFile> = self
            .snapshot
            .files
            .iter()
            .map(|f| f.as_ref())
            .filter(|f| range.overlaps(f.min_time, f.max_time))
            .collect();
        let mut by_store: BTreeMap<String, Vec<ListingTableUrl>> = BTreeMap::new();
        for url in files.iter().map(|f| {
            let path = f.path.to_str().ok_or_else(|| {
                DataFusionError::Internal(format!("{} is not valid UTF-8", f.path.display()))
            })?;
            ListingTableUrl::parse(path)
        }) {
            let url = url?;
            by_store
                .entry(url.object_store().as_str().to_string())
                .or_default()
                .push(url);
        }
        by_store
            .into_values()
            .map(|urls| {
                let format =
                    ParquetFormat::default().with_options(state.table_options().parquet.clone());
                let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
                let config = ListingTableConfig::new_with_multi_paths(urls)
                    .with_listing_options(options)
                    .with_schema(self.schema.clone());
                ListingTable::try_new(config)
            })
            .collect()
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
        for files in self.files_tables(state, TimeRange::from_filters(filters))? {
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

    use crate::config::{CollectorConfig, WalSync};
    use crate::store::WriteOutcome;
    use arrow::array::{AsArray, StringArray};
    use arrow::datatypes::{DataType, Float64Type};
    use damselfly_proto::v1::{Field, Point, Tag, WriteBatch, field::Value};

    const HOUR: i64 = 3_600_000_000_000;
    const MINUTE: i64 = 60_000_000_000;
    /// An hour boundary (2023-11-14T22:00:00Z).
    const T0: i64 = 1_700_000_000 / 3600 * 3600 * 1_000_000_000;

    fn limits() -> QueryLimits {
        QueryLimits {
            timeout: Duration::from_secs(30),
            memory_bytes: 256 << 20,
            max_result_rows: 100_000,
        }
    }

    fn open_store(dir: &std::path::Path, row_group_rows: usize) -> Store {
        Store::open(&CollectorConfig {
            data_dir: dir.to_path_buf(),
            wal_sync: WalSync::None,
            parquet_row_group_rows: row_group_rows,
            ..CollectorConfig::default()
        })
        .expect("open store")
    }

    async fn write(store: &Store, batch: WriteBatch) {
        let outcome = store.write(batch).await;
        assert!(
            matches!(outcome, WriteOutcome::Stored { .. }),
            "{outcome:?}"
        );
    }

    fn f64_point(time: i64, fields: &[(&str, f64)]) -> Point {
        Point {
            measurement: "cpu".into(),
            tags: vec![],
            fields: fields
                .iter()
                .map(|(k, v)| Field {
                    key: (*k).into(),
                    value: Some(Value::F64(*v)),
                })
                .collect(),
            time_unix_nano: time,
        }
    }

    /// Every line of the plan column of an `EXPLAIN [ANALYZE]` result.
    fn plan_text(result: &QueryResult) -> String {
        let mut text = String::new();
        for batch in &result.batches {
            let column = batch.column(batch.num_columns() - 1);
            let plans = column
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("plan column is Utf8");
            for plan in plans.iter().flatten() {
                text.push_str(plan);
                text.push('\n');
            }
        }
        text
    }

    /// `(total, matched)` of a pruning metric in an `EXPLAIN ANALYZE` plan: `name=T total → M matched`.
    fn pruning(plan: &str, name: &str) -> (usize, usize) {
        let start = plan
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("no {name} in\n{plan}"))
            + name.len()
            + 1;
        let words: Vec<&str> = plan[start..].split_whitespace().take(4).collect();
        let number = |w: &str| {
            w.trim_end_matches(',')
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{name}: {words:?}"))
        };
        assert_eq!((words[1], words[2]), ("total", "→"), "{name}: {words:?}");
        (number(words[0]), number(words[3]))
    }

    /// 3 hours x 20 agents x one row every 5 s, 1024-row row groups (15 per hourly file). Agent `aNN` runs on host
    /// `h{7*NN mod 20}`, so a row group (rows sorted by agent_id, hostname, time) holds host names far apart: their
    /// min/max cannot exclude a host that only the bloom filter knows is absent.
    #[tokio::test]
    async fn time_range_and_tag_equality_prune_files_row_groups_with_stats_and_bloom_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path(), 1024);
        for agent in 0..20u64 {
            let mut points = Vec::new();
            for hour in 0..3 {
                for step in 0..720 {
                    let t = T0 + hour * HOUR + step * MINUTE / 12;
                    points.push(f64_point(t, &[("usage_user", step as f64 + 0.25)]));
                }
            }
            write(
                &store,
                WriteBatch {
                    agent_id: format!("a{agent:02}"),
                    seq: 1,
                    common_tags: vec![
                        Tag {
                            key: "agent_id".into(),
                            value: format!("a{agent:02}"),
                        },
                        Tag {
                            key: "hostname".into(),
                            value: format!("h{:02}", agent * 7 % 20),
                        },
                    ],
                    points,
                    ..Default::default()
                },
            )
            .await;
        }
        assert_eq!(store.flush().await.expect("flush"), 3, "one file per hour");
        let engine = QueryEngine::new(store, limits()).expect("engine");

        // h03 is agent a09: rows 6480..7199 of each hour's file, in row groups 6 and 7 of 15. By min/max, row groups
        // 0, 2, 4, 6 and 7 may hold h03; the bloom filters rule out 0, 2 and 4.
        let from = T0 + HOUR;
        let to = T0 + 2 * HOUR;
        let filter = format!(
            "hostname = 'h03' AND time >= to_timestamp_nanos({from}) AND time < to_timestamp_nanos({to})"
        );
        let result = engine
            .sql(&format!(
                "SELECT count(*) AS n, sum(usage_user) AS s FROM cpu WHERE {filter}"
            ))
            .await
            .expect("query");
        let batch = &result.batches[0];
        assert_eq!(
            batch
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0),
            720
        );
        // 0.25 + 1.25 + ... + 719.25, exact in binary: the decimal-stored floats read back exactly.
        assert_eq!(
            batch.column(1).as_primitive::<Float64Type>().value(0),
            259_020.0
        );

        let plan = plan_text(
            &engine
                .sql(&format!(
                    "EXPLAIN ANALYZE SELECT count(*) FROM cpu WHERE {filter}"
                ))
                .await
                .expect("explain analyze"),
        );
        // Partitions: only the hour=23 file is handed to the scan (the time range skips the other two unopened).
        assert_eq!(plan.matches(".parquet").count(), 1, "{plan}");
        assert!(plan.contains("/date=2023-11-14/hour=23/"), "{plan}");
        // Row groups: min/max statistics of hostname rule 10 out, the bloom filters 3 of the other 5.
        assert_eq!(
            pruning(&plan, "row_groups_pruned_statistics"),
            (15, 5),
            "{plan}"
        );
        assert_eq!(
            pruning(&plan, "row_groups_pruned_bloom_filter"),
            (5, 2),
            "{plan}"
        );

        // A host that does not exist: the footers' statistics rule out every file; not one data page is read.
        let plan = plan_text(
            &engine
                .sql("EXPLAIN ANALYZE SELECT count(*) FROM cpu WHERE hostname = 'h99'")
                .await
                .expect("explain analyze"),
        );
        assert_eq!(plan.matches(".parquet").count(), 3, "{plan}");
        assert_eq!(
            pruning(&plan, "files_ranges_pruned_statistics"),
            (3, 0),
            "{plan}"
        );
        assert!(plan.contains("bytes_scanned=0,"), "{plan}");

        // A time range alone: one of three files, all of its row groups.
        let plan = plan_text(
            &engine
                .sql(&format!(
                    "EXPLAIN ANALYZE SELECT count(*) FROM cpu WHERE time >= to_timestamp_nanos({to})"
                ))
                .await
                .expect("explain analyze"),
        );
        assert_eq!(plan.matches(".parquet").count(), 1, "{plan}");
        assert!(plan.contains("/hour=00/"), "{plan}");
    }

    /// Floats stored as decimals, and floats that are not decimals, read back bit for bit through SQL.
    #[tokio::test]
    async fn decimal_stored_floats_read_back_bit_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path(), 1024);
        let values: Vec<(f64, f64, f64)> = (0..500)
            .map(|i| {
                let i = f64::from(i);
                // Two decimals; integers as floats; a ratio that is no short decimal.
                (i * 0.37 - 50.0, (i * 1.01).round() * 1e6, i / 7.0)
            })
            .map(|(a, b, c)| (((a * 100.0).round()) / 100.0, b, c))
            .collect();
        let points = values
            .iter()
            .enumerate()
            .map(|(i, (a, b, c))| {
                f64_point(
                    T0 + i as i64 * MINUTE / 10,
                    &[("two_decimals", *a), ("integers", *b), ("ratio", *c)],
                )
            })
            .collect();
        write(
            &store,
            WriteBatch {
                agent_id: "a".into(),
                seq: 1,
                points,
                ..Default::default()
            },
        )
        .await;
        store.flush().await.expect("flush");
        let file = &store.snapshot("cpu").expect("cpu").files[0];
        let reader = parquet::file::reader::SerializedFileReader::new(
            std::fs::File::open(&file.path).expect("open"),
        )
        .expect("reader");
        use parquet::file::reader::FileReader;
        let kv = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .expect("kv")
            .iter()
            .find(|kv| kv.key == crate::persist::META_DECIMAL_FLOATS)
            .and_then(|kv| kv.value.clone());
        assert_eq!(kv.as_deref(), Some(r#"["integers","two_decimals"]"#));

        let engine = QueryEngine::new(store, limits()).expect("engine");
        let result = engine
            .sql("SELECT two_decimals, integers, ratio FROM cpu ORDER BY time")
            .await
            .expect("query");
        assert_eq!(result.schema.field(0).data_type(), &DataType::Float64);
        let mut i = 0;
        for batch in &result.batches {
            let cols: Vec<_> = (0..3)
                .map(|c| batch.column(c).as_primitive::<Float64Type>())
                .collect();
            for row in 0..batch.num_rows() {
                let (a, b, c) = values[i];
                for (col, want) in cols.iter().zip([a, b, c]) {
                    assert_eq!(col.value(row).to_bits(), want.to_bits(), "row {i}");
                }
                i += 1;
            }
        }
        assert_eq!(i, values.len());
        // Filters on a decimal-stored column compare as floats.
        let result = engine
            .sql("SELECT count(*) FROM cpu WHERE two_decimals > 100.5 AND two_decimals <= 120.01")
            .await
            .expect("query");
        let want = values
            .iter()
            .filter(|(a, _, _)| *a > 100.5 && *a <= 120.01)
            .count();
        assert_eq!(
            result.batches[0]
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0) as usize,
            want
        );
    }
}

#[cfg(test)]
mod last_value_tests {
    use super::*;
    use crate::config::{CollectorConfig, WalSync};
    use damselfly_proto::v1::{Field, Point, Tag, field::Value};

    const SECOND: i64 = 1_000_000_000;

    fn config(dir: &std::path::Path) -> CollectorConfig {
        CollectorConfig {
            data_dir: dir.to_path_buf(),
            wal_sync: WalSync::None,
            ..CollectorConfig::default()
        }
    }

    fn engine(store: &Store) -> QueryEngine {
        let limits = QueryLimits {
            timeout: Duration::from_secs(30),
            memory_bytes: 256 << 20,
            max_result_rows: 100_000,
        };
        QueryEngine::new(store.clone(), limits).expect("engine")
    }

    /// Host `h`, core `c`: `usage` at `time`; the `idle` field only on even seconds (a sparse column).
    fn point(h: usize, c: usize, time: i64, usage: f64) -> Point {
        let mut fields = vec![Field {
            key: "usage".into(),
            value: Some(Value::F64(usage)),
        }];
        if (time / SECOND) % 2 == 0 {
            fields.push(Field {
                key: "idle".into(),
                value: Some(Value::I64(100 - usage as i64)),
            });
        }
        Point {
            measurement: "cpu".into(),
            tags: vec![
                Tag {
                    key: "host".into(),
                    value: format!("h{h}"),
                },
                Tag {
                    key: "core".into(),
                    value: format!("c{c}"),
                },
            ],
            fields,
            time_unix_nano: time,
        }
    }

    use crate::testutil::store_points as write;

    /// Rows written at `base + offset` seconds, in a scrambled order (late rows included).
    fn points(base: i64, round: i64) -> Vec<Point> {
        let mut out = Vec::new();
        for h in 0..3 {
            for c in 0..2 {
                for k in [3i64, 0, 2, 1] {
                    let t = base + (round * 10 + k) * SECOND + (h * 2 + c) as i64 * 1_000;
                    out.push(point(h, c, t, (round * 10 + k) as f64 + h as f64));
                }
            }
        }
        out
    }

    async fn text(engine: &QueryEngine, sql: &str) -> String {
        let result = engine.sql(sql).await.expect("query");
        arrow::util::pretty::pretty_format_batches(&result.batches)
            .expect("format")
            .to_string()
    }

    /// The same question asked so that the cache cannot answer (a condition on a field), for comparison.
    const LATEST: &str = "SELECT DISTINCT ON (host) * FROM cpu ORDER BY host, time DESC";
    const LATEST_SCAN: &str = "SELECT DISTINCT ON (host) * FROM cpu WHERE usage IS NULL OR usage IS NOT NULL \
                               ORDER BY host, time DESC";

    #[tokio::test]
    async fn latest_per_series_comes_from_the_cache_and_equals_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = (crate::model::now_nanos() / SECOND - 3_600) * SECOND;
        {
            let store = Store::open(&config(dir.path())).expect("open");
            write(&store, 1, points(base, 0)).await;
            write(&store, 2, points(base, 1)).await;
            store.flush().await.expect("flush");
            // Late rows of an older round after the flush: they must not replace newer ones.
            write(&store, 3, points(base, 0)).await;
            let engine = engine(&store);
            assert_eq!(
                text(&engine, LATEST).await,
                text(&engine, LATEST_SCAN).await
            );
            assert_eq!(engine.last_value_queries(), 1);
        }
        // Restarted: the newest rows are in files (round 1) and the WAL (round 0 again).
        let store = Store::open(&config(dir.path())).expect("reopen");
        let engine = engine(&store);
        assert_eq!(store.last_values_unwarmed(), vec!["cpu".to_string()]);
        let before = text(&engine, LATEST_SCAN).await;
        assert_eq!(text(&engine, LATEST).await, before);
        assert_eq!(engine.last_value_queries(), 0, "used before it was warm");
        engine.warm_last_values().await;
        assert!(store.last_values_unwarmed().is_empty());
        assert_eq!(text(&engine, LATEST).await, before);
        assert_eq!(engine.last_value_queries(), 1);
        assert!(before.contains("| 13.0  |"), "{before}");

        // Newer rows written since: in the buffer and the cache.
        write(&store, 4, points(base, 2)).await;
        let after = text(&engine, LATEST_SCAN).await;
        assert_ne!(after, before);
        assert_eq!(text(&engine, LATEST).await, after);

        // Conditions on tags and lower bounds on time are answered from the cache, and agree with a scan.
        let since = "to_timestamp_nanos(0) + INTERVAL '1 second'";
        for (cached, scan) in [
            (
                "SELECT DISTINCT ON (host, core) host, core, usage, time FROM cpu WHERE host <> 'h1' \
                 ORDER BY host, core, time DESC",
                "SELECT DISTINCT ON (host, core) host, core, usage, time FROM cpu WHERE host <> 'h1' \
                 AND usage > -1 ORDER BY host, core, time DESC",
            ),
            (
                &format!(
                    "SELECT DISTINCT ON (c.core) c.core, c.idle FROM cpu AS c WHERE c.time >= {since} \
                     ORDER BY c.core, c.time DESC"
                ),
                &format!(
                    "SELECT DISTINCT ON (c.core) c.core, c.idle FROM cpu AS c WHERE c.time >= {since} \
                     AND c.usage > -1 ORDER BY c.core, c.time DESC"
                ),
            ),
        ] {
            let hits = engine.last_value_queries();
            assert_eq!(
                text(&engine, cached).await,
                text(&engine, scan).await,
                "{cached}"
            );
            assert_eq!(engine.last_value_queries(), hits + 1, "{cached}");
        }
        // An upper bound on time, a field in ON, or oldest-first order: not from the cache.
        for sql in [
            "SELECT DISTINCT ON (host) * FROM cpu WHERE time < now() ORDER BY host, time DESC",
            "SELECT DISTINCT ON (usage) * FROM cpu ORDER BY usage, time DESC",
            "SELECT DISTINCT ON (host) * FROM cpu ORDER BY host, time",
        ] {
            let hits = engine.last_value_queries();
            engine.sql(sql).await.expect(sql);
            assert_eq!(engine.last_value_queries(), hits, "{sql}");
        }
    }

    #[tokio::test]
    async fn a_table_with_too_many_series_is_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&CollectorConfig {
            last_value_cache_max_series: 5,
            ..config(dir.path())
        })
        .expect("open");
        let base = (crate::model::now_nanos() / SECOND - 60) * SECOND;
        write(&store, 1, points(base, 0)).await;
        let engine = engine(&store);
        assert_eq!(
            text(&engine, LATEST).await,
            text(&engine, LATEST_SCAN).await
        );
        assert_eq!(engine.last_value_queries(), 0);
    }
}
