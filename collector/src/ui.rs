//! The built-in web UI: a single page (plain HTML, CSS and JavaScript, no build step, no CDN) embedded in the
//! binary, so it works on a collector with no Internet access.
//!
//! * `GET /` and `GET /ui`, `/ui/` — the page (`collector/ui/index.html`); its views (fleet, VM, MCIS map, SQL,
//!   alerts, health) are chosen by the URL fragment (`#/fleet`, `#/vm/<agent id>`, ...), so one document serves
//!   them all and a reload keeps the view.
//! * `GET /ui/<asset>` — the script, the style sheet and the world outline; another name is a `404`.
//! * `GET /api/v1/regions` — the cloud regions with coordinates the map draws (Tumblebug's, from the catalog
//!   embedded in `damselfly-control`): `[{"csp","region","display","latitude","longitude"}]`.
//!
//! The page reads everything else through the public API (`/api/v1/agents`, `POST /api/v1/sql`,
//! `POST /api/v1/placement`, `/health`, `/metrics`, `/api/v1/alerts`): the UI has no data path of its own.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::{ApiError, ApiState};

/// An embedded file: its name under `/ui/`, its content type and its bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: &str = include_str!("../ui/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../ui/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../ui/app.css"),
    },
    Asset {
        name: "world.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../ui/world.js"),
    },
];

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(index))
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{name}", get(asset))
        .route("/api/v1/regions", get(regions))
}

/// The page. `no-cache`: the binary may be upgraded under the same URL, so a browser must revalidate.
async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let asset = ASSETS
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no UI asset {name:?}; the UI is at / (assets: {})",
                ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
            ),
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        asset.body,
    )
        .into_response())
}

/// `GET /api/v1/regions`: every region of the embedded catalog that has coordinates.
async fn regions() -> Response {
    let regions: Vec<&damselfly_control::Region> = crate::placement_api::catalog()
        .regions
        .iter()
        .filter(|r| r.latitude.is_some() && r.longitude.is_some())
        .collect();
    axum::Json(regions).into_response()
}
