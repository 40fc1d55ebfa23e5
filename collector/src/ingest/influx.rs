//! InfluxDB line protocol over HTTP: `POST /api/v2/write` and the v1 `POST /write`.

use std::sync::Arc;

use axum::Router;

use crate::http::ApiState;

/// The line-protocol routes.
pub fn routes(_max_write_bytes: usize) -> Router<Arc<ApiState>> {
    Router::new()
}
