//! Prometheus remote write 1.0: `POST /api/v1/write`.

use std::sync::Arc;

use axum::Router;

use crate::http::ApiState;

/// The remote-write route.
pub fn routes(_max_write_bytes: usize) -> Router<Arc<ApiState>> {
    Router::new()
}
