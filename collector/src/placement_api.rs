//! Placement over HTTP (`damselfly-control`):
//!
//! - `POST /api/v1/placement`: a Damselfly placement request (`docs/PLACEMENT.md`) → the ranked candidates per
//!   group, each criterion's normalized score, the total, and what each filter removed;
//! - `POST /tumblebug/mcisRecommendVm`: CB-Tumblebug's request body unchanged → its answer shape (a list of specs).
//!
//! Both answer over the catalog built into the binary. `400` with `{"error": ...}` for a bad request (the message
//! names the field), `413` for a body over [`MAX_PLACEMENT_BYTES`].

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use damselfly_control::{Catalog, DynamicScores, RequestError, parse_request, place, tumblebug};

use crate::http::ApiState;

/// Largest request body accepted.
pub const MAX_PLACEMENT_BYTES: usize = 1 << 20;

/// The embedded catalog, parsed once (also the UI's region coordinates).
pub(crate) fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(Catalog::embedded)
}

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/placement", post(placement))
        .route("/tumblebug/mcisRecommendVm", post(recommend_vm))
        .layer(DefaultBodyLimit::max(MAX_PLACEMENT_BYTES))
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn ok(body: Result<String, serde_json::Error>) -> Response {
    match body {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Box<Response>> {
    body.map_err(|e| {
        Box::new(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body over {MAX_PLACEMENT_BYTES} bytes"),
            )
        } else {
            error(StatusCode::BAD_REQUEST, &e.body_text())
        })
    })
}

fn bad(e: RequestError) -> Response {
    error(StatusCode::BAD_REQUEST, &e.to_string())
}

/// Query parameters of `POST /api/v1/placement`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementParams {
    /// With `"performance": "dynamic"`: the benchmark whose live scores rank performance (`cpum` by default).
    kind: Option<String>,
    /// Benchmark results older than this count as stale (default a day).
    fresh_secs: Option<u64>,
}

async fn placement(
    State(api): State<Arc<ApiState>>,
    params: Result<axum::extract::Query<PlacementParams>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = match params {
        Ok(axum::extract::Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    // Dynamic performance: the live per-spec scores (benchmarks weighted by load, docs/BENCHMARKS.md).
    let mut dynamic = DynamicScores::new();
    if req.policy.performance == damselfly_control::placement::PerformanceSource::Dynamic {
        let kind = params.kind.unwrap_or_else(|| "cpum".into());
        if !crate::bench::KINDS.contains(&kind.as_str()) || matches!(kind.as_str(), "rtt" | "mrtt")
        {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "kind {kind:?} is not a throughput benchmark (cpus, cpum, memR, memW, fioR, fioW, dbR, dbW)"
                ),
            );
        }
        match crate::scores::scores(&api.engine, &kind, params.fresh_secs.unwrap_or(86_400), 300)
            .await
        {
            Ok(scores) => {
                for s in scores.specs {
                    dynamic.insert(&s.csp, &s.region, &s.spec, s.score);
                }
            }
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        }
    }
    match place(catalog(), &req, &dynamic) {
        Ok(answer) => ok(serde_json::to_string(&answer)),
        Err(e) => bad(e),
    }
}

async fn recommend_vm(
    State(_api): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    // Tumblebug accepts an empty body (no filter, no priority: cost order).
    let plan = if body.iter().all(u8::is_ascii_whitespace) {
        tumblebug::DeploymentPlan::default()
    } else {
        match tumblebug::parse(&body) {
            Ok(p) => p,
            Err(e) => return bad(e),
        }
    };
    match tumblebug::recommend(catalog(), &plan) {
        Ok(specs) => ok(serde_json::to_string(&specs)),
        Err(e) => bad(e),
    }
}
