//! Prometheus remote write 1.0, `POST /api/v1/write[?ns=NAME]`, so Prometheus (`remote_write`), vmagent
//! (`-remoteWrite.url`), Grafana Agent/Alloy and the like can send to the collector; and `GET
//! /api/v1/scrape/targets`, the health of the scraped exporters ([`super::scrape`]).
//!
//! The body is a `prometheus.WriteRequest` protobuf compressed with snappy's block format, sent with
//! `Content-Encoding: snappy` and `Content-Type: application/x-protobuf`. Samples are mapped to rows as
//! [`super::prometheus`] says (table = metric name, tags = labels, field `value`); `?ns=NAME` adds the tag
//! `ns_id=NAME` to every row. Exemplars, metadata and native histograms are not stored (histograms are counted in
//! the log); staleness markers are dropped.
//!
//! Answers (errors are JSON `{"error": "..."}`):
//! * `204` once every sample is in the WAL (also for a request with nothing to store);
//! * `400` for a body that is not snappy or not a `WriteRequest`, a bad `ns`, and for refused series or samples
//!   (no `__name__`, bad label names, a label given twice, timestamps before 1970, a column conflict with an
//!   existing table): the others are stored all the same and the message counts and names the refused ones. A
//!   sender does not retry a 4xx, which is right: the same data would be refused again;
//! * `413` for a body over `max_write_bytes`, as sent or once decompressed (checked before decompressing);
//! * `415` for a `Content-Encoding` other than `snappy` or a `Content-Type` other than `application/x-protobuf`
//!   (remote write 2.0's `proto=io.prometheus.write.v2.Request` included: it is not supported);
//! * `503` with `Retry-After` when the write buffer is full. More samples than `max_batch_points` are stored as
//!   several batches; a 503 in the middle means the earlier ones are stored and will be stored again when the
//!   sender re-sends the request (remote write has no idempotency key).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prost::Message;
use serde::Deserialize;

use super::prom_text::describe;
use super::prometheus::{
    METRIC_NAME_LABEL, NS_TAG, RowsBuilder, SchemaGuard, WriteFailure, is_stale_marker, map_series,
    time_ns, write_batches,
};
use crate::http::{ApiError, ApiState, retry_response};

/// Bodies larger than this (decompressed) are decoded and mapped on the blocking pool, so a big write does not
/// hold up an async worker; smaller ones inline, where handing them over would cost more than the work.
const MAP_INLINE_BYTES: usize = 256 << 10;
/// Refusals quoted in an error message (the counts are always exact).
const MAX_ERRORS_IN_MESSAGE: usize = 5;
/// Refusals kept while mapping.
const MAX_KEPT_ERRORS: usize = 100;
/// The start of snappy's framed (stream) format, which remote write does not use.
const SNAPPY_FRAMED_MAGIC: &[u8] = b"\xff\x06\x00\x00sNaPpY";

/// `prometheus.WriteRequest` of remote write 1.0. Field 3 (metadata) is skipped as unknown.
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`. Exemplars (3) are skipped; native histograms (4) are kept as raw bytes only to be
/// counted.
#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub histograms: Vec<Vec<u8>>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`: the value and its time in milliseconds since the epoch.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The remote-write route and the scrape targets' health.
pub fn routes(max_write_bytes: usize) -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/write", post(write))
        .route("/api/v1/scrape/targets", get(scrape_targets))
        .layer(DefaultBodyLimit::max(max_write_bytes))
}

/// `GET /api/v1/scrape/targets`: a JSON array sorted by URL (see [`super::scrape::ScrapeTargetHealth`]).
async fn scrape_targets(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.scrape.targets()).into_response()
}

#[derive(Debug, Deserialize)]
struct WriteParams {
    ns: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

async fn write(
    State(api): State<Arc<ApiState>>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
    params: Result<Query<WriteParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let principal = principal.map_or_else(crate::auth::Principal::anyone, |p| p.0);
    match write_inner(&api, &principal, params, &headers, body).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(status = %e.status, message = %e.message, "remote write refused");
            e.into_response()
        }
    }
}

async fn write_inner(
    api: &Arc<ApiState>,
    principal: &crate::auth::Principal,
    params: Result<Query<WriteParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limit = api.store.config().max_write_bytes;
    let Query(params) = params.map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("bad query string: {}", e.body_text()),
        )
    })?;
    let ns = params.ns.map(check_namespace).transpose()?;
    check_content_encoding(headers)?;
    check_content_type(headers)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes (max_write_bytes)"),
            )
        } else {
            error(
                e.status(),
                format!("cannot read the body: {}", e.body_text()),
            )
        }
    })?;
    let raw = decompress(&body, limit)?;
    drop(body);
    let inline = raw.len() <= MAP_INLINE_BYTES;
    let store = api.store.clone();
    let map = move || -> Result<Mapped, ApiError> {
        let max_rows = store.config().max_batch_points;
        decode_request(raw, ns.as_deref(), max_rows, SchemaGuard::new(&store))
    };
    let mapped = if inline {
        map()?
    } else {
        tokio::task::spawn_blocking(map).await.map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error (a bug): decoding failed: {e}"),
            )
        })??
    };
    if mapped.histograms > 0 {
        tracing::debug!(
            histograms = mapped.histograms,
            "remote write: native histograms are not stored"
        );
    }
    let Mapped {
        mut batches,
        rows,
        refused_samples,
        errors,
        ..
    } = mapped;
    // Rows of namespaces the token may not write refuse the whole request, before anything is stored.
    for batch in &mut batches {
        crate::auth::scope_batch(principal, batch)
            .map_err(|e| error(StatusCode::FORBIDDEN, e.to_string()))?;
    }
    let stored = if rows == 0 {
        0
    } else {
        match write_batches(&api.store, batches).await {
            Ok(stored) => stored,
            Err(WriteFailure::Retry {
                message,
                after,
                stored,
            }) => {
                let message = if stored > 0 {
                    format!(
                        "{message} ({stored} of {rows} samples were stored before; a re-send stores them again)"
                    )
                } else {
                    message
                };
                return Ok(retry_response(&message, after));
            }
            Err(WriteFailure::Rejected { message, stored }) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the store refused samples: {message}; {stored} of {} samples stored",
                        rows + refused_samples
                    ),
                ));
            }
        }
    };
    if errors.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut message = format!(
        "partial write: {} of {} samples refused, {stored} stored",
        refused_samples,
        rows + refused_samples,
    );
    for e in errors.iter().take(MAX_ERRORS_IN_MESSAGE) {
        message.push_str("; ");
        message.push_str(e);
    }
    if errors.len() > MAX_ERRORS_IN_MESSAGE {
        message.push_str("; ...");
    }
    tracing::info!(%message, "remote write partly refused");
    Err(error(StatusCode::BAD_REQUEST, message))
}

/// `?ns=`: becomes the `ns_id` tag of every row.
fn check_namespace(ns: String) -> Result<String, ApiError> {
    let bad = |why: String| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the ns parameter cannot be the {NS_TAG} tag: {why}"),
        )
    };
    if ns.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if ns.chars().any(char::is_control) {
        return Err(bad("it contains control characters".into()));
    }
    crate::model::check_tag(NS_TAG, &ns).map_err(bad)?;
    Ok(ns)
}

/// A header as trimmed lowercase text.
fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<String>, ApiError> {
    match headers.get(&name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_ascii_lowercase()))
            .map_err(|_| {
                error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("the {name} header is not ASCII"),
                )
            }),
    }
}

fn check_content_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    match header_text(headers, header::CONTENT_ENCODING)?.as_deref() {
        Some("snappy") => Ok(()),
        None => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding: snappy is required (remote write bodies are snappy-compressed protobuf)",
        )),
        Some(other) => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Encoding {other:?} is not supported; remote write bodies are snappy-compressed (Content-Encoding: snappy)"
            ),
        )),
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = header_text(headers, header::CONTENT_TYPE)? else {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type: application/x-protobuf is required",
        ));
    };
    let mut parts = value.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default();
    if media != "application/x-protobuf" {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {media:?} is not supported; send application/x-protobuf"),
        ));
    }
    for param in parts {
        if let Some(proto) = param.strip_prefix("proto=") {
            let proto = proto.trim_matches('"');
            if proto != "prometheus.writerequest" {
                return Err(error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "proto={proto:?} is not supported: this endpoint takes remote write 1.0 \
                         (prometheus.WriteRequest); configure the sender for it (Prometheus: \
                         protobuf_message: prometheus.WriteRequest)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Snappy block format, bounded by `limit` before anything is allocated.
/// Decompresses a body (snappy's block format), refusing one that would exceed `limit` bytes before allocating.
pub fn decompress(body: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    if body.starts_with(SNAPPY_FRAMED_MAGIC) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the body is in snappy's framed (stream) format; remote write uses the block format",
        ));
    }
    let len = match snap::raw::decompress_len(body) {
        Ok(len) => len,
        // The header claims more than snappy itself allows (4 GiB): too large rather than malformed.
        Err(snap::Error::TooBig { given, .. }) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body claims to decompress to {given} bytes, more than {limit} (max_write_bytes)"
                ),
            ));
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("the body is not snappy-compressed (block format): {e}"),
            ));
        }
    };
    if len > limit {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body decompresses to {len} bytes, more than {limit} (max_write_bytes)"),
        ));
    }
    let mut out = vec![0; len];
    let n = snap::raw::Decoder::new()
        .decompress(body, &mut out)
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid snappy (block format): {e}"),
            )
        })?;
    out.truncate(n);
    Ok(out)
}

/// Decodes a decompressed body as a `WriteRequest` and maps it to batches of at most `max_rows` rows, refusing
/// series by series what `guard` says the stored tables would refuse.
pub fn decode_request(
    raw: Vec<u8>,
    ns: Option<&str>,
    max_rows: usize,
    guard: SchemaGuard<'_>,
) -> Result<Mapped, ApiError> {
    let request = WriteRequest::decode(raw.as_slice()).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a remote-write 1.0 WriteRequest protobuf: {e}"),
        )
    })?;
    drop(raw);
    Ok(map_request(request, ns, max_rows, guard))
}

/// A decoded request as batches, with what was refused.
#[derive(Debug)]
pub struct Mapped {
    pub batches: Vec<damselfly_proto::v1::WriteBatch>,
    /// Samples in `batches`.
    pub rows: usize,
    /// Samples refused (those of refused series included).
    pub refused_samples: usize,
    /// Why, series by series (the first [`MAX_KEPT_ERRORS`]).
    pub errors: Vec<String>,
    /// Native histograms ignored.
    pub histograms: usize,
}

fn map_request(
    request: WriteRequest,
    ns: Option<&str>,
    max_rows: usize,
    mut guard: SchemaGuard<'_>,
) -> Mapped {
    let mut builder = RowsBuilder::new(max_rows);
    let mut refused_samples = 0;
    let mut errors: Vec<String> = Vec::new();
    let mut histograms = 0;
    let mut samples: Vec<(i64, f64)> = Vec::new();
    let refuse = |errors: &mut Vec<String>, message: String| {
        if errors.len() < MAX_KEPT_ERRORS {
            errors.push(message);
        }
    };
    for ts in request.timeseries {
        histograms += ts.histograms.len();
        let live = ts
            .samples
            .iter()
            .filter(|s| !is_stale_marker(s.value))
            .count();
        let series = series_name(&ts.labels).and_then(|name| {
            let labels = ts
                .labels
                .iter()
                .filter(|l| l.name != METRIC_NAME_LABEL)
                .map(|l| (l.name.as_str(), l.value.as_str()));
            let series = map_series(name, labels, ns)?;
            guard.check(&series)?;
            Ok(series)
        });
        let series = match series {
            Ok(series) => series,
            Err(message) => {
                refused_samples += live;
                refuse(
                    &mut errors,
                    format!("series {}: {message}", describe_labels(&ts.labels)),
                );
                continue;
            }
        };
        samples.clear();
        for s in &ts.samples {
            if is_stale_marker(s.value) {
                continue;
            }
            match time_ns(s.timestamp) {
                Ok(t) => samples.push((t, s.value)),
                Err(message) => {
                    refused_samples += 1;
                    refuse(
                        &mut errors,
                        format!("series {}: {message}", describe_labels(&ts.labels)),
                    );
                }
            }
        }
        builder.push_series(series, &samples);
    }
    let rows = builder.rows();
    Mapped {
        batches: builder.finish(),
        rows,
        refused_samples,
        errors,
        histograms,
    }
}

/// The `__name__` label's value.
fn series_name(labels: &[Label]) -> Result<&str, String> {
    let mut names = labels.iter().filter(|l| l.name == METRIC_NAME_LABEL);
    let first = names
        .next()
        .ok_or_else(|| format!("no {METRIC_NAME_LABEL} label (the metric name)"))?;
    if names.next().is_some() {
        return Err(format!("label {METRIC_NAME_LABEL:?} appears twice"));
    }
    Ok(&first.value)
}

/// A series for messages: `name{k="v",...}`.
fn describe_labels(labels: &[Label]) -> String {
    let name = labels
        .iter()
        .find(|l| l.name == METRIC_NAME_LABEL)
        .map_or("", |l| l.value.as_str());
    let rest: Vec<(String, String)> = labels
        .iter()
        .filter(|l| l.name != METRIC_NAME_LABEL)
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect();
    describe(name, &rest)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn content_headers_are_checked_precisely() {
        assert!(check_content_encoding(&headers(&[("content-encoding", "snappy")])).is_ok());
        assert!(check_content_encoding(&headers(&[("content-encoding", " Snappy ")])).is_ok());
        let e = check_content_encoding(&headers(&[])).unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(e.message.contains("snappy is required"), "{}", e.message);
        let e = check_content_encoding(&headers(&[("content-encoding", "gzip")])).unwrap_err();
        assert!(e.message.contains("\"gzip\""), "{}", e.message);

        for ok in [
            "application/x-protobuf",
            "application/x-protobuf; proto=prometheus.WriteRequest",
            "Application/X-Protobuf;proto=\"prometheus.WriteRequest\"",
        ] {
            let h = headers(&[("content-type", ok)]);
            assert!(check_content_type(&h).is_ok(), "{ok}");
        }
        let e = check_content_type(&headers(&[])).unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let e = check_content_type(&headers(&[("content-type", "text/plain")])).unwrap_err();
        assert!(e.message.contains("\"text/plain\""), "{}", e.message);
        let e = check_content_type(&headers(&[(
            "content-type",
            "application/x-protobuf;proto=io.prometheus.write.v2.Request",
        )]))
        .unwrap_err();
        assert!(e.message.contains("remote write 1.0"), "{}", e.message);
    }

    #[test]
    fn decompression_is_bounded_before_allocating() {
        let raw = vec![7u8; 10_000];
        let compressed = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        assert_eq!(decompress(&compressed, 10_000).unwrap(), raw);
        let e = decompress(&compressed, 9_999).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("10000 bytes"), "{}", e.message);
        // Headers claiming 3.75 GiB and 4 GiB in five bytes: refused without allocating them.
        for header in [
            [0x80, 0x80, 0x80, 0x80, 0x0f],
            [0x80, 0x80, 0x80, 0x80, 0x10],
        ] {
            let e = decompress(&header, 1 << 20).unwrap_err();
            assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", e.message);
        }
        let e = decompress(b"", 100).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = decompress(b"\x0ahello", 100).unwrap_err();
        assert!(e.message.contains("not valid snappy"), "{}", e.message);
        let mut framed = SNAPPY_FRAMED_MAGIC.to_vec();
        framed.extend_from_slice(b"rest");
        let e = decompress(&framed, 100).unwrap_err();
        assert!(e.message.contains("framed"), "{}", e.message);
        let e = decompress(&[0xff; 12], 100).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn namespaces_are_checked() {
        assert_eq!(check_namespace("ns-1".into()).unwrap(), "ns-1");
        assert!(check_namespace(String::new()).is_err());
        assert!(check_namespace("a\u{7}b".into()).is_err());
        assert!(check_namespace("x".repeat(70_000)).is_err());
    }

    #[test]
    fn series_names_and_descriptions() {
        let label = |n: &str, v: &str| Label {
            name: n.into(),
            value: v.into(),
        };
        let labels = vec![label("__name__", "up"), label("job", "x")];
        assert_eq!(series_name(&labels).unwrap(), "up");
        assert_eq!(describe_labels(&labels), "up{job=\"x\"}");
        assert!(
            series_name(&[label("job", "x")])
                .unwrap_err()
                .contains("no __name__")
        );
        let twice = vec![label("__name__", "a"), label("__name__", "b")];
        assert!(series_name(&twice).unwrap_err().contains("twice"));
    }
}
