//! The HTTP API: health and SQL.
//!
//! * `GET /health` — `200` with the store's counters as JSON.
//! * `GET /` — the web UI ([`crate::ui`]); `GET /metrics` — the collector's own metrics in Prometheus text format
//!   ([`crate::selfmetrics`]).
//! * `GET /api/v1/agents` — the agent registry: a JSON array of agents sorted by `agent_id` (see
//!   [`crate::agents::AgentInfo`]), each with its `status` and `last_seen_secs_ago`; `?status=healthy|stale|down|
//!   unregistered` keeps only those (another value is a `400`). With shards it covers every shard's registry (each
//!   agent as the shard that heard from it last, named in `shard`; a shard that does not answer is named in the
//!   partial-result headers); `?scope=local` is this shard's registry alone.
//! * `GET /api/v1/pull/targets` — the pull scheduler's targets: a JSON array sorted by `url` (see
//!   [`crate::pull::TargetHealth`]: `status` `unknown|up|down`, `last_success_unix_ms`, `last_error`,
//!   `consecutive_failures`, batches and points pulled, `ack_through_seq`); `[]` when nothing is pulled.
//! * `POST /api/v1/admin/flush` — writes the buffer to Parquet now: `{"files": n}`.
//! * `POST /api/v1/admin/maintenance` — runs a maintenance pass (compaction, rollups, retention) now and returns
//!   its report ([`crate::maintenance::PassReport`]).
//! * `POST /api/v2/write`, `POST /write` — InfluxDB line protocol ([`crate::ingest::influx`]); `POST
//!   /api/v1/write` — Prometheus remote write, `GET /api/v1/scrape/targets` — scrape health
//!   ([`crate::ingest::remote_write`]); `GET /api/v1/forward` — forwarding counters ([`crate::forward`]);
//!   `GET /dragonfly/ns/{ns}/mcis/{mcis}/vm/{vm}/metric/{metric}/info` — CB-Dragonfly's API ([`crate::dragonfly`]).
//! * `POST /api/v1/sql` — the body is one SQL statement (UTF-8 text). `?format=json` (default: an array of row
//!   objects, nulls explicit), `csv` (with a header row) or `arrow` (an Arrow IPC stream, for clients that want
//!   types). Errors are JSON `{"error": "..."}`; the status codes are listed on [`status_of`] (plus `400` for bad
//!   parameters or an empty or non-UTF-8 body and `413` for a body over `max_sql_bytes`). With shards, a result
//!   that may lack a shard's data (it did not answer) carries [`PARTIAL_HEADER`] (the shard ids) and
//!   [`PARTIAL_REASON_HEADER`]; `?complete=true` turns that into a `503`.
//! * `GET /api/v1/shards`, `POST /api/v1/shards/assign`, `POST /api/v1/shards/reload` — the shard map
//!   ([`crate::cluster`]).

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;

use crate::agents::{AgentRegistry, AgentStatus};
use crate::query::{QueryEngine, QueryError, QueryResult};
use crate::store::{Store, WriteOutcome};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
    pub engine: QueryEngine,
    pub registry: AgentRegistry,
    /// Health of the pull targets (an empty handle when the collector pulls nothing).
    pub pull: crate::pull::PullHandle,
    /// The maintenance task (compaction, rollups, retention), for the admin endpoints.
    pub maintenance: crate::maintenance::Maintenance,
    /// Forwarding to InfluxDB v2 endpoints (an empty handle when nothing is forwarded).
    pub forward: crate::forward::ForwardHandle,
    /// Scraping of Prometheus exporters (an empty handle when nothing is scraped).
    pub scrape: crate::ingest::scrape::ScrapeHandle,
    /// The shard map and the peers (a map of one when the collector is not sharded).
    pub cluster: crate::cluster::Cluster,
    /// Benchmark runs asked of agents.
    pub bench: crate::bench::BenchRuns,
    /// Alert rules, active alerts, silences and receivers.
    pub alerts: crate::alerts::AlertManager,
    /// The tokens requests must carry; `None` when auth is off.
    pub tokens: Option<crate::auth::Tokens>,
}

/// The API router. `max_sql_bytes` bounds the request body.
pub fn router(state: ApiState, max_sql_bytes: usize) -> Router {
    let max_write_bytes = state.store.config().max_write_bytes;
    let state = Arc::new(state);
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/sql", post(sql))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/pull/targets", get(pull_targets))
        .route("/api/v1/admin/flush", post(admin_flush))
        .route("/api/v1/admin/maintenance", post(admin_maintenance))
        .merge(crate::dragonfly::routes())
        .merge(crate::forward::routes())
        .merge(crate::cluster::routes())
        .merge(crate::bench::routes())
        .merge(crate::scores::routes())
        .merge(crate::alerts::routes())
        .merge(crate::selfmetrics::routes())
        .merge(crate::ui::routes())
        .layer(DefaultBodyLimit::max(max_sql_bytes))
        // Write bodies are larger than SQL text: the ingest routes set their own limit.
        .merge(crate::ingest::routes(max_write_bytes))
        // Placement requests set their own limit too.
        .merge(crate::placement_api::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        // Before any handler: who is asking, and may they (see crate::auth).
        .layer(axum::middleware::from_fn_with_state(state, authorize))
        // A bug must cost one request a 500, not the server.
        .layer(CatchPanicLayer::custom(|_| {
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (a bug): the request panicked",
            )
        }))
}

/// Checks the request's token (when auth is on) and hands the handlers its [`Principal`] as an extension.
async fn authorize(
    State(api): State<Arc<ApiState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use crate::auth::{AuthError, Principal};
    let principal = match &api.tokens {
        None => Principal::anyone(),
        Some(tokens) => {
            let path = request.uri().path().to_string();
            let Some(need) = crate::auth::need_for(request.method().as_str(), &path) else {
                return next.run(request).await;
            };
            let token = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::auth::token_from_authorization);
            let checked = token
                .ok_or(AuthError::Missing)
                .and_then(|t| tokens.authenticate(&t))
                .and_then(|p| p.allows(need).map(|()| p))
                .and_then(|p| {
                    if p.namespaces.is_some() && !crate::auth::open_to_limited(&path) {
                        Err(AuthError::Forbidden(format!(
                            "token {} is limited to namespaces; {path} shows data of every namespace and needs \
                             an unlimited token",
                            p.token_id
                        )))
                    } else {
                        Ok(p)
                    }
                });
            match checked {
                Ok(p) => p,
                Err(e) => {
                    let status = match &e {
                        AuthError::Missing | AuthError::Unknown | AuthError::Expired { .. } => {
                            StatusCode::UNAUTHORIZED
                        }
                        AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
                        AuthError::Invalid(_) | AuthError::File { .. } => {
                            tracing::error!(error = %e, "cannot check a token");
                            StatusCode::INTERNAL_SERVER_ERROR
                        }
                    };
                    api.store
                        .self_metrics()
                        .error(crate::selfmetrics::ErrorKind::Auth);
                    let mut response = error_response(status, &e.to_string());
                    if status == StatusCode::UNAUTHORIZED {
                        response.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            header::HeaderValue::from_static("Bearer realm=\"damselfly\""),
                        );
                    }
                    return response;
                }
            }
        }
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The principal the auth layer put on a request (everyone may do everything when auth is off).
pub fn principal_of(extensions: &axum::http::Extensions) -> crate::auth::Principal {
    extensions
        .get::<crate::auth::Principal>()
        .cloned()
        .unwrap_or_else(crate::auth::Principal::anyone)
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, &self.message)
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The HTTP answer to a write the store cannot take now ([`WriteOutcome::Retry`]): `503 Service Unavailable`, a
/// `Retry-After` header in whole seconds (rounded up: HTTP has no finer unit) and `{"error": message}`. 503 rather
/// than 429 because the collector as a whole is out of buffer space, not this client over a quota; Prometheus
/// remote-write senders, OTLP/HTTP exporters and Telegraf's InfluxDB outputs all retry a 503 and honour
/// `Retry-After`. For HTTP ingest endpoints (see [`write_outcome_response`]).
pub fn retry_response(message: &str, after: std::time::Duration) -> Response {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
    response
}

/// The HTTP answer to a write outcome, for HTTP ingest endpoints: `204 No Content` once stored (or already stored:
/// a duplicate is a success to the sender), `400` with the reason when rejected, [`retry_response`] for retry.
pub fn write_outcome_response(outcome: WriteOutcome) -> Response {
    match outcome {
        WriteOutcome::Stored { .. } | WriteOutcome::Duplicate => {
            StatusCode::NO_CONTENT.into_response()
        }
        WriteOutcome::Rejected(message) => error_response(StatusCode::BAD_REQUEST, &message),
        WriteOutcome::Retry { message, after } => retry_response(&message, after),
    }
}

/// Status codes for query failures: `400` for the query's own faults, `413` when the result is too large, `503`
/// when the query needs more memory than it may have, `504` on timeout, `500` for the collector's faults.
pub fn status_of(e: &QueryError) -> StatusCode {
    match e {
        QueryError::Invalid(_) => StatusCode::BAD_REQUEST,
        QueryError::TooManyRows(_) => StatusCode::PAYLOAD_TOO_LARGE,
        QueryError::ResourcesExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
        QueryError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        ApiError {
            status: status_of(&e),
            message: e.to_string(),
        }
    }
}

async fn health(State(api): State<Arc<ApiState>>) -> Response {
    let stats = api.store.stats();
    let alive = api.store.writer_alive();
    // Writes cannot be acknowledged while the writer is down (failed) or the WAL refuses appends, e.g. on a full
    // disk (degraded: it recovers by itself once an append succeeds). Either way a load balancer should look
    // elsewhere, so both answer 503.
    let problem = if !alive {
        Some((
            "failed",
            "the WAL writer has stopped: no write can be acknowledged; see the collector's log"
                .to_string(),
        ))
    } else {
        stats.wal_error.as_ref().map(|e| {
            (
                "degraded",
                format!(
                    "writes are answered 'retry later' until the WAL accepts appends again: {e}"
                ),
            )
        })
    };
    let mut body = serde_json::json!({
        "status": problem.as_ref().map_or("ok", |(status, _)| *status),
        "shard": api.store.config().shard_id,
        "version": env!("CARGO_PKG_VERSION"),
        "store": stats,
    });
    let Some((_, error)) = problem else {
        return axum::Json(body).into_response();
    };
    body["error"] = error.into();
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "method not allowed: use GET /health, GET /api/v1/agents or POST /api/v1/sql"
            .into(),
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint; try GET /health, GET /api/v1/agents or POST /api/v1/sql".into(),
    }
}

/// `POST /api/v1/admin/flush`: writes the buffer to Parquet now; `{"files": n}`.
async fn admin_flush(State(api): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let files = api.store.flush().await.map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("flush failed: {e}"),
    })?;
    Ok(axum::Json(serde_json::json!({ "files": files })).into_response())
}

/// `POST /api/v1/admin/maintenance`: runs a maintenance pass (compaction, rollups, retention) now and returns
/// its report (`errors` lists the steps that failed; the pass goes on past them).
async fn admin_maintenance(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.maintenance.run_pass().await).into_response()
}

async fn pull_targets(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.pull.targets()).into_response()
}

#[derive(Debug, Deserialize)]
struct AgentsParams {
    status: Option<String>,
    /// `all` (default): every shard's agents; `local`: this shard's registry only.
    scope: Option<String>,
}

async fn agents(
    State(api): State<Arc<ApiState>>,
    params: Result<Query<AgentsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let status = params
        .status
        .as_deref()
        .map(AgentStatus::parse)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let scope = params.scope.as_deref().unwrap_or("all");
    if !matches!(scope, "all" | "local") {
        return Err(ApiError::bad_request(format!(
            "unknown scope {scope:?}; use all or local"
        )));
    }
    if scope == "local" || !api.cluster.is_sharded() {
        return Ok(axum::Json(api.registry.list(status)).into_response());
    }
    // Every shard's registry: an agent that moved is known to several; the one that heard from it last wins, and
    // only then is the status filter applied (an old shard still lists a moved agent as down).
    let local = api.registry.list(None);
    let (answers, mut missing) = api
        .cluster
        .get_from_peers("/api/v1/agents?scope=local")
        .await;
    let mut merged: std::collections::BTreeMap<String, serde_json::Value> =
        std::collections::BTreeMap::new();
    let mut add = |shard: &str, mut agent: serde_json::Value| {
        let Some(id) = agent["agent_id"].as_str().map(str::to_string) else {
            return;
        };
        agent["shard"] = shard.into();
        let age = |a: &serde_json::Value| a["last_seen_secs_ago"].as_u64().unwrap_or(u64::MAX);
        match merged.get(&id) {
            Some(known) if age(known) <= age(&agent) => {}
            _ => {
                merged.insert(id, agent);
            }
        }
    };
    let local = serde_json::to_value(&local)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    for agent in local {
        add(api.cluster.self_id(), agent);
    }
    for (shard, body) in answers {
        match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
            Ok(list) => list.into_iter().for_each(|a| add(&shard, a)),
            Err(e) => missing.push(crate::cluster::MissingShard {
                shard,
                reason: format!("sent an unreadable agent list: {e}"),
            }),
        }
    }
    let wanted = status.map(|s| serde_json::to_value(s).unwrap_or_default());
    let list: Vec<serde_json::Value> = merged
        .into_values()
        .filter(|a| wanted.as_ref().is_none_or(|w| a["status"] == *w))
        .collect();
    let mut response = axum::Json(list).into_response();
    mark_partial(&mut response, &missing);
    Ok(response)
}

/// Output formats of `/api/v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "arrow" => Ok(Format::Arrow),
            other => Err(format!("unknown format {other:?}; use json, csv or arrow")),
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

#[derive(Debug, Deserialize)]
struct SqlParams {
    format: Option<String>,
    /// `true`: answer 503 instead of a partial result when a shard does not answer.
    complete: Option<bool>,
}

async fn sql(
    State(api): State<Arc<ApiState>>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
    params: Result<Query<SqlParams>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let format = match params.format.as_deref() {
        None => Format::Json,
        Some(f) => Format::parse(f).map_err(ApiError::bad_request)?,
    };
    let body = body.map_err(|e| {
        let message = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the SQL text is larger than the limit of {} bytes",
                api.store.config().max_sql_bytes
            )
        } else {
            format!("cannot read the request body: {}", e.body_text())
        };
        ApiError {
            status: e.status(),
            message,
        }
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("the SQL text is not valid UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send one SQL statement",
        ));
    }
    let namespaces = principal.and_then(|p| p.0.namespaces);
    let result = api
        .engine
        .sql_scoped(text, Vec::new(), namespaces.as_ref())
        .await
        .inspect_err(|e| api.engine.count_error(e))?;
    if params.complete.unwrap_or(false) && !result.missing_shards.is_empty() {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the result would be partial (complete=true): {}",
                missing_text(&result.missing_shards)
            ),
        });
    }
    let bytes = encode(&result, format).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("cannot encode the result as {format:?}: {e}"),
    })?;
    let mut response = (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from(bytes),
    )
        .into_response();
    mark_partial(&mut response, &result.missing_shards);
    Ok(response)
}

/// Marks an answer that may lack some shards' data with [`PARTIAL_HEADER`] and [`PARTIAL_REASON_HEADER`]: headers,
/// so that every format (JSON array, CSV, Arrow) keeps its shape.
fn mark_partial(response: &mut Response, missing: &[crate::cluster::MissingShard]) {
    if missing.is_empty() {
        return;
    }
    let ids: Vec<&str> = missing.iter().map(|m| m.shard.as_str()).collect();
    let headers = response.headers_mut();
    for (name, value) in [
        (PARTIAL_HEADER, ids.join(",")),
        (PARTIAL_REASON_HEADER, missing_text(missing)),
    ] {
        let ascii: String = value
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = header::HeaderValue::from_str(&ascii) {
            headers.insert(name, v);
        }
    }
}

/// Response header of a partial SQL result (sharded collectors): the ids of the shards it may lack, comma-separated.
pub const PARTIAL_HEADER: &str = "x-damselfly-partial";
/// Response header of a partial SQL result: why each shard is missing.
pub const PARTIAL_REASON_HEADER: &str = "x-damselfly-partial-reason";

fn missing_text(missing: &[crate::cluster::MissingShard]) -> String {
    missing
        .iter()
        .map(|m| format!("shard {} {}", m.shard, m.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Serialises a query result.
pub fn encode(result: &QueryResult, format: Format) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let batches: Vec<&RecordBatch> = result.batches.iter().collect();
    let mut out = Vec::new();
    match format {
        Format::Json => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut out);
            writer.write_batches(&batches)?;
            writer.finish()?;
            drop(writer);
            // The writer emits nothing at all for zero rows; an empty result is still a JSON array.
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            out.push(b'\n');
        }
        Format::Csv => {
            // Zero rows still get the header, so a client always learns the columns.
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if batches.is_empty() {
                writer.write(&RecordBatch::new_empty(result.schema.clone()))?;
            }
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Arrow => {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &result.schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_is_503_with_retry_after_rounded_up_to_seconds() {
        let response = write_outcome_response(WriteOutcome::Retry {
            message: "write buffer is full".into(),
            after: Duration::from_millis(1_200),
        });
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let short = retry_response("busy", Duration::from_millis(250));
        assert_eq!(short.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            write_outcome_response(WriteOutcome::Duplicate).status(),
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            write_outcome_response(WriteOutcome::Rejected("bad".into())).status(),
            StatusCode::BAD_REQUEST
        );
    }
}
