//! `damselfly.v1.Metrics/Subscribe`: new rows as they are stored, for schedulers that react to metrics without
//! polling SQL. Each subscription is a [`Store::tap`] (fed after the WAL commit, never waited on: a slow subscriber
//! misses batches, counted in `dropped_points`), filtered by measurement and exact tag values.

use std::pin::Pin;

use damselfly_proto::columnar::chunk_to_points;
use damselfly_proto::v1::metrics_server::{Metrics, MetricsServer};
use damselfly_proto::v1::{Point, SubscribeRequest, SubscribeResponse};
use futures::Stream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::store::Store;

/// Batches buffered per subscription before it starts missing some.
const SUBSCRIPTION_BUFFER: usize = 1024;
/// Most measurement names and tags in one filter.
const MAX_FILTER_TERMS: usize = 1024;

/// The `Metrics` service over a store.
#[derive(Debug, Clone)]
pub struct MetricsService {
    store: Store,
}

impl MetricsService {
    pub fn new(store: Store) -> MetricsService {
        MetricsService { store }
    }

    pub fn into_server(self) -> MetricsServer<MetricsService> {
        MetricsServer::new(self)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
    }
}

/// Whether a row passes the filter.
fn matches(point: &Point, request: &SubscribeRequest) -> bool {
    (request.measurements.is_empty() || request.measurements.contains(&point.measurement))
        && request.tags.iter().all(|want| {
            point
                .tags
                .iter()
                .any(|t| t.key == want.key && t.value == want.value)
        })
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Metrics for MetricsService {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let filter = request.into_inner();
        if filter.measurements.len() + filter.tags.len() > MAX_FILTER_TERMS {
            return Err(Status::invalid_argument(format!(
                "a filter has at most {MAX_FILTER_TERMS} measurements and tags"
            )));
        }
        let mut tap = self.store.tap(SUBSCRIPTION_BUFFER);
        let stream = async_stream_of(move |tx| async move {
            while let Some(batch) = tap.batches.recv().await {
                let points: Vec<Point> = batch
                    .chunks
                    .iter()
                    .filter(|c| {
                        filter.measurements.is_empty()
                            || filter.measurements.contains(&c.measurement)
                    })
                    .flat_map(|c| chunk_to_points(&batch.common_tags, c))
                    .filter(|p| matches(p, &filter))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let response = SubscribeResponse {
                    points,
                    dropped_points: tap
                        .dropped_points
                        .load(std::sync::atomic::Ordering::Relaxed),
                };
                if tx.send(Ok(response)).await.is_err() {
                    // The subscriber went away.
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel (the task ends when the receiver is dropped).
fn async_stream_of<F, Fut>(body: F) -> SubscribeStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SubscribeResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::Tag;

    #[test]
    fn filters_by_measurement_and_every_tag() {
        let p = Point {
            measurement: "cpu".into(),
            tags: vec![
                Tag {
                    key: "ns_id".into(),
                    value: "ns1".into(),
                },
                Tag {
                    key: "vm_id".into(),
                    value: "vm-1".into(),
                },
            ],
            ..Point::default()
        };
        let f = |m: &[&str], tags: &[(&str, &str)]| SubscribeRequest {
            measurements: m.iter().map(|s| s.to_string()).collect(),
            tags: tags
                .iter()
                .map(|(k, v)| Tag {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
        };
        assert!(matches(&p, &f(&[], &[])));
        assert!(matches(&p, &f(&["cpu"], &[("ns_id", "ns1")])));
        assert!(!matches(&p, &f(&["mem"], &[])));
        assert!(!matches(
            &p,
            &f(&[], &[("ns_id", "ns1"), ("vm_id", "vm-2")])
        ));
    }
}
