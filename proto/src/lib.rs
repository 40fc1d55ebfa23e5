//! The Damselfly wire protocol, package `damselfly.v1`: the types agents and collectors exchange, generated from
//! `damselfly/v1/ingest.proto` (read that file for the delivery contract), plus [`columnar`], the one conversion from
//! row-wise points to the columnar chunks that both ends use, and [`shards`], the rendezvous hashing that tells
//! agents and shards alike which shard owns an agent; [`auth`], how both ends check bearer tokens; [`tls`], the TLS listener both serve behind.

/// Generated code for `damselfly.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("damselfly.v1");
}

pub mod auth;
pub mod columnar;
pub mod shards;
pub mod tls;
