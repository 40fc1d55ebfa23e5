//! Ingest over HTTP in the formats other tools already speak, so Telegraf, InfluxDB clients, Prometheus and
//! vmagent work unchanged:
//!
//! * [`influx`]: InfluxDB line protocol, `POST /api/v2/write` and the v1 `POST /write` ([`line_protocol`] parses it);
//! * [`remote_write`]: Prometheus remote write 1.0, `POST /api/v1/write`;
//! * [`scrape`]: the collector scrapes Prometheus exporters ([`prom_text`] parses the text exposition format).
//!
//! Every path ends in [`crate::store::Store::write_unkeyed`]: a write is answered only once it is in the WAL.

use std::sync::Arc;

use axum::Router;

use crate::http::ApiState;

pub mod influx;
pub mod line_protocol;
pub mod prom_text;
pub mod prometheus;
pub mod remote_write;
pub mod scrape;

/// The HTTP routes of every ingest format.
pub fn routes(max_write_bytes: usize) -> Router<Arc<ApiState>> {
    influx::routes(max_write_bytes).merge(remote_write::routes(max_write_bytes))
}
