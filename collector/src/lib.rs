//! The Damselfly collector: one shard of the ingest and query side.
//!
//! Where it sits in the data path: agents push batches over gRPC ([`grpc`]); the [`store`] validates them, makes
//! them durable in the write-ahead log ([`wal`]), keeps them in an Arrow [`buffer`] that queries see at once, and
//! flushes them to Parquet files ([`persist`]) partitioned by table and hour. [`query`] answers SQL with DataFusion
//! over files and buffer together, served over HTTP ([`http`]). [`maintenance`] compacts partitions ([`compaction`]),
//! builds 1-minute and 1-hour [`rollup`]s and applies [`retention`] in the background. [`server::Collector`] runs
//! all of it; [`cluster`] makes
//! several collectors one sharded deployment.

pub mod agents;
pub mod alerts;
pub mod auth;
pub mod autorollup;
pub mod bench;
pub mod buffer;
pub mod cardinality;
pub mod catalog;
pub mod cluster;
pub mod compaction;
pub mod config;
pub mod dedup;
pub mod dragonfly;
pub mod error;
pub mod forward;
pub mod fsutil;
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod lastvalue;
pub mod maintenance;
pub mod model;
pub mod persist;
pub mod pgwire;
pub mod placement_api;
pub mod pull;
pub mod query;
pub mod ratelimit;
pub mod retention;
pub mod rollup;
pub mod scores;
pub mod selfmetrics;
pub mod server;
pub mod shared_store;
pub mod sqlfn;
pub mod store;
pub mod subscribe;
pub mod tls;
pub mod ui;
pub mod wal;

#[cfg(test)]
pub(crate) mod testutil;

pub use config::CollectorConfig;
pub use error::{CollectorError, Result};
pub use query::{QueryEngine, QueryError, QueryResult};
pub use server::Collector;
pub use store::{Store, WriteOutcome};
