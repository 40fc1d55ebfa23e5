//! Errors of the catalog and of placement requests.

use thiserror::Error;

/// A catalog file that cannot be loaded.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CatalogError {
    #[error("{file}: {message}")]
    Io { file: String, message: String },
    #[error("{file}: {message}")]
    Csv { file: String, message: String },
    #[error(
        "{file}: unrecognised header ({header}...): expected a Tumblebug spec, location or latency file, \
         region coordinates, or a Damselfly catalog (csp,region,spec,...)"
    )]
    UnknownHeader { file: String, header: String },
}

/// A placement request that cannot be answered. The messages name the field at fault.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RequestError {
    /// The body is not valid JSON for the request (unknown field, wrong type, ...): serde's message with the line
    /// and column.
    #[error("invalid request: {0}")]
    Parse(String),
    #[error("{field}: min {min} is greater than max {max}")]
    ImpossibleBounds { field: String, min: f64, max: f64 },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{field}: unknown cloud {name:?} (not in the catalog)")]
    UnknownCloud { field: String, name: String },
    #[error("{field}: unknown region {name:?} (not in the catalog)")]
    UnknownRegion { field: String, name: String },
    #[error("policy.weights: {0}")]
    Weights(String),
}
