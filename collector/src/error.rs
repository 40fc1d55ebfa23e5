//! The collector's error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the collector, by kind.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("WAL error: {0}")]
    Wal(String),
    #[error("Parquet error on {path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("Arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("query error: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Server(String),
    #[error("the collector is shutting down")]
    ShuttingDown,
}

impl CollectorError {
    /// Wraps an I/O error with the path it happened on, so messages say where.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CollectorError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = CollectorError> = std::result::Result<T, E>;

/// An error with its sources, each once ("error sending request: client error (Connect): connection refused"
/// rather than the first part alone): what logs and API answers about a peer or a destination show.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `text`, followed by each error of the chain from `source` on that it does not already say.
pub fn with_causes(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
