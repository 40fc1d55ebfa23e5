//! The Prometheus text exposition format (what exporters serve on `/metrics`).
