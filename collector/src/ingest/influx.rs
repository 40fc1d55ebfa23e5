//! InfluxDB line protocol over HTTP, as InfluxDB 2 and 1 take it, so Telegraf's `outputs.influxdb_v2` /
//! `outputs.influxdb` and InfluxDB client libraries work unchanged:
//!
//! * `POST /api/v2/write?org=&bucket=&precision=ns|us|ms|s` (the bucket is required; `org` is accepted and
//!   ignored);
//! * `POST /write?db=&precision=n|ns|u|us|ms|s|m|h` (v1; `rp`, `u`, `p` are accepted and ignored).
//!
//! The bucket (or db) is the namespace: every row gets the tag `ns_id` = bucket. A line may carry `ns_id` itself
//! only with the same value.
//!
//! Answers: `204` once every line is in the WAL. `400` when lines were refused: the good lines are stored all the
//! same (InfluxDB's partial write), and the body names each bad line's number and reason — v2:
//! `{"code": "invalid", "message": "partial write: ...", "line": N, "errors": [{"line": N, "message": "..."}]}`,
//! v1: `{"error": "partial write: ...", ...}`. `413` for a body (sent or decompressed) over `max_write_bytes` or
//! more lines than `max_batch_points` (Telegraf then splits its batch), `415` for a `Content-Encoding` other than
//! `gzip` or `identity`, `503` with `Retry-After` when the write buffer is full (nothing was stored: send it all
//! again).

use crate::auth::Principal;
use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use damselfly_proto::v1::{Tag, WriteBatch};
use serde::Deserialize;

use super::line_protocol::{self, LineError, ParseOptions, Precision};
use crate::http::{ApiState, retry_response};
use crate::store::WriteOutcome;

/// Bodies larger than this are parsed on the blocking pool, so a big write does not hold up an async worker.
const PARSE_INLINE_BYTES: usize = 256 << 10;
/// Refused lines listed in an error body (the count is always exact).
const MAX_REPORTED_ERRORS: usize = 100;
/// Refused lines quoted in the error message itself.
const MAX_ERRORS_IN_MESSAGE: usize = 5;

/// The line-protocol routes.
pub fn routes(max_write_bytes: usize) -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v2/write", post(write_v2))
        .route("/write", post(write_v1))
        .layer(DefaultBodyLimit::max(max_write_bytes))
}

/// Which API a request came through: it decides the error body's shape and the precision names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    V1,
    V2,
}

/// An error answer in the API's shape.
#[derive(Debug)]
struct WriteError {
    api: Api,
    status: StatusCode,
    message: String,
    errors: Vec<LineError>,
}

impl WriteError {
    fn new(api: Api, status: StatusCode, message: impl Into<String>) -> WriteError {
        WriteError {
            api,
            status,
            message: message.into(),
            errors: Vec::new(),
        }
    }
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        let mut body = match self.api {
            Api::V2 => serde_json::json!({
                "code": influx_code(self.status),
                "message": self.message,
            }),
            Api::V1 => serde_json::json!({ "error": self.message }),
        };
        if let Some(first) = self.errors.first() {
            body["line"] = first.line.into();
            body["errors"] = self
                .errors
                .iter()
                .take(MAX_REPORTED_ERRORS)
                .map(|e| serde_json::json!({ "line": e.line, "message": e.message }))
                .collect();
        }
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response()
    }
}

/// InfluxDB 2's error codes for the statuses we answer.
fn influx_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request too large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        s if s.is_server_error() => "internal error",
        _ => "invalid",
    }
}

/// The query parameters of both APIs (v2 names the namespace `bucket`, v1 `db`; the rest is ignored).
#[derive(Debug, Deserialize)]
struct WriteParams {
    bucket: Option<String>,
    db: Option<String>,
    precision: Option<String>,
}

async fn write_v2(
    State(state): State<Arc<ApiState>>,
    principal: Option<axum::Extension<Principal>>,
    params: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let principal = principal.map_or_else(Principal::anyone, |p| p.0);
    match request_params(Api::V2, params) {
        Ok((bucket, precision)) => {
            let request = Request {
                api: Api::V2,
                namespace: bucket,
                precision,
                principal,
            };
            write(state, request, &headers, body).await
        }
        Err(e) => e.into_response(),
    }
}

async fn write_v1(
    State(state): State<Arc<ApiState>>,
    principal: Option<axum::Extension<Principal>>,
    params: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let principal = principal.map_or_else(Principal::anyone, |p| p.0);
    match request_params(Api::V1, params) {
        Ok((db, precision)) => {
            let request = Request {
                api: Api::V1,
                namespace: db,
                precision,
                principal,
            };
            write(state, request, &headers, body).await
        }
        Err(e) => e.into_response(),
    }
}

/// The namespace (bucket or db) and the precision of a request.
fn request_params(
    api: Api,
    params: Result<Query<WriteParams>, QueryRejection>,
) -> Result<(String, Precision), WriteError> {
    let bad = |message: String| WriteError::new(api, StatusCode::BAD_REQUEST, message);
    let Query(params) = params.map_err(|e| bad(format!("bad query string: {}", e.body_text())))?;
    let precision = match params.precision.as_deref() {
        None | Some("") => Precision::Nanoseconds,
        Some(p) => match api {
            Api::V2 => Precision::parse_v2(p),
            Api::V1 => Precision::parse_v1(p),
        }
        .map_err(bad)?,
    };
    let (namespace, missing) = match api {
        Api::V2 => (
            params.bucket,
            "the bucket parameter is required (it becomes the ns_id tag)",
        ),
        Api::V1 => (
            params.db,
            "database is required: the db parameter is missing (it becomes the ns_id tag)",
        ),
    };
    let namespace = namespace
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad(missing.to_owned()))?;
    Ok((namespace, precision))
}

/// The body as sent, decompressed when it is gzip, bounded by `limit` either way.
fn decode_body(
    api: Api,
    headers: &HeaderMap,
    body: Bytes,
    limit: usize,
) -> Result<Bytes, WriteError> {
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => "identity".to_owned(),
        Some(v) => v
            .to_str()
            .map_err(|_| {
                WriteError::new(
                    api,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "the Content-Encoding header is not ASCII",
                )
            })?
            .trim()
            .to_ascii_lowercase(),
    };
    match encoding.as_str() {
        "identity" | "" => Ok(body),
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
            let mut reader =
                flate2::read::MultiGzDecoder::new(body.as_ref()).take(limit as u64 + 1);
            reader.read_to_end(&mut out).map_err(|e| {
                WriteError::new(
                    api,
                    StatusCode::BAD_REQUEST,
                    format!("the body is not valid gzip: {e}"),
                )
            })?;
            if out.len() > limit {
                return Err(WriteError::new(
                    api,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body decompresses to more than {limit} bytes (max_write_bytes)"),
                ));
            }
            Ok(Bytes::from(out))
        }
        other => Err(WriteError::new(
            api,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other:?} is not supported; send gzip or identity"),
        )),
    }
}

/// What a write request is, once its parameters are read.
struct Request {
    api: Api,
    namespace: String,
    precision: Precision,
    principal: Principal,
}

async fn write(
    state: Arc<ApiState>,
    request: Request,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Request {
        api,
        namespace,
        precision,
        principal,
    } = request;
    // The namespace is the request's (bucket or db): a token limited to others may not write it.
    if let Err(e) = principal.check_write(Some(&namespace)) {
        return WriteError::new(api, StatusCode::FORBIDDEN, e.to_string()).into_response();
    }
    match write_inner(&state, api, namespace, precision, headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn write_inner(
    state: &Arc<ApiState>,
    api: Api,
    namespace: String,
    precision: Precision,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WriteError> {
    let config = state.store.config();
    let limit = config.max_write_bytes;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            WriteError::new(
                api,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes (max_write_bytes)"),
            )
        } else {
            WriteError::new(
                api,
                e.status(),
                format!("cannot read the body: {}", e.body_text()),
            )
        }
    })?;
    crate::model::check_tag("ns_id", &namespace)
        .and_then(|()| {
            if namespace.chars().any(char::is_control) {
                Err("it contains control characters".to_owned())
            } else {
                Ok(())
            }
        })
        .map_err(|m| {
            WriteError::new(
                api,
                StatusCode::BAD_REQUEST,
                format!("the bucket/db cannot be the ns_id tag: {m}"),
            )
        })?;
    let body = decode_body(api, headers, body, limit)?;
    let received_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    let max_line_bytes = config.max_line_bytes;
    let parse_inline = body.len() <= PARSE_INLINE_BYTES;
    let store = state.store.clone();
    let parse = move || {
        let forced = [("ns_id", namespace.as_str())];
        let options = ParseOptions {
            precision,
            default_time_ns: received_ns,
            max_line_bytes,
            forced_tags: &forced,
        };
        let parsed = line_protocol::parse(&body, &options, &mut |table| {
            store.with_state(|s| s.catalog.table(table).cloned())
        });
        (parsed, namespace)
    };
    let (parsed, namespace) = if parse_inline {
        parse()
    } else {
        tokio::task::spawn_blocking(parse).await.map_err(|e| {
            WriteError::new(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error (a bug): parsing failed: {e}"),
            )
        })?
    };
    if parsed.rows > config.max_batch_points {
        return Err(WriteError::new(
            api,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body has {} lines; the limit is {} per request (max_batch_points): split it",
                parsed.rows, config.max_batch_points
            ),
        ));
    }
    let total_lines = parsed.rows + parsed.errors.len();
    if parsed.rows > 0 {
        let batch = WriteBatch {
            common_tags: vec![Tag {
                key: "ns_id".into(),
                value: namespace,
            }],
            chunks: parsed.chunks,
            ..Default::default()
        };
        let outcome = state.store.write_unkeyed(batch).await;
        let protocol = crate::selfmetrics::Protocol::Influx;
        state.store.self_metrics().record_write(protocol, &outcome);
        match outcome {
            WriteOutcome::Stored { .. } | WriteOutcome::Duplicate => {}
            WriteOutcome::Rejected(message) => {
                return Err(WriteError::new(
                    api,
                    StatusCode::BAD_REQUEST,
                    format!("nothing was stored: {message}"),
                ));
            }
            WriteOutcome::Retry { message, after } => {
                return Ok(retry_response(&message, after));
            }
        }
    }
    if parsed.errors.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut message = format!(
        "partial write: {} of {total_lines} lines refused, {} stored",
        parsed.errors.len(),
        parsed.rows
    );
    for e in parsed.errors.iter().take(MAX_ERRORS_IN_MESSAGE) {
        message.push_str("; ");
        message.push_str(&e.to_string());
    }
    if parsed.errors.len() > MAX_ERRORS_IN_MESSAGE {
        message.push_str("; ...");
    }
    Err(WriteError {
        api,
        status: StatusCode::BAD_REQUEST,
        message,
        errors: parsed.errors,
    })
}
