//! The Damselfly wire protocol, package `damselfly.v1`: the types agents and collectors exchange, generated from
//! `damselfly/v1/ingest.proto` (read that file for the delivery contract). Nothing else lives here.

#![allow(clippy::all, missing_docs)]

/// Generated code for `damselfly.v1`.
pub mod v1 {
    tonic::include_proto!("damselfly.v1");
}
