//! Damselfly control: where to place the VMs of an MCIS, and why.
//!
//! - [`catalog`] loads VM specs, region coordinates and the inter-region latency map from CB-Tumblebug's own files
//!   as they are (spec CSVs of v0.8.0, v0.11.0 and HEAD, `cloudlocation.csv`, region coordinates derived from
//!   `cloudinfo.yaml`, `cloudlatencymap.csv`) and from Damselfly's catalog CSV, which adds vCPUs and memory. Each
//!   file is recognised by its header. Values a file lacks are unknown (`None`), never zero.
//! - [`placement`] ranks the catalog's specs for each sub-group of an MCIS: filters (clouds, regions, vCPU and
//!   memory bounds, price, OS, distance, latency, performance) and then a weighted sum of normalized criteria (cost,
//!   performance — static catalog score or dynamic scores supplied by the caller —, location, latency, spread). The
//!   answer carries every criterion's score, the total and what each filter removed. Formulas: `docs/PLACEMENT.md`.
//! - [`tumblebug`] answers Tumblebug's `mcisRecommendVm` request body unchanged, with Tumblebug's ranking rules
//!   when one priority is given and the weighted combination when several are.
//!
//! No async runtime and no query engine: the library is plain functions over an in-memory catalog.

pub mod catalog;
pub mod error;
pub mod placement;
pub mod tumblebug;

pub use catalog::{Catalog, FileKind, LatencyMap, Region, Spec};
pub use error::{CatalogError, RequestError};
pub use placement::{DynamicScores, PlacementAnswer, PlacementRequest, parse_request, place};
