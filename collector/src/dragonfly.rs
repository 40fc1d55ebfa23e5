//! The CB-Dragonfly-compatible monitoring API: `GET /dragonfly/ns/{ns}/mcis/{mcis}/vm/{vm}/metric/{metric}/info`.

use std::sync::Arc;

use axum::Router;

use crate::http::ApiState;

/// The Dragonfly-compatible routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
}
