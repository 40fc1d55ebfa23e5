//! `Metrics.Subscribe`, black-box: a scheduler subscribes to a real collector with a filter and receives exactly the
//! matching rows of the batches stored after it subscribed, as they are stored.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::CollectorProc;
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::metrics_client::MetricsClient;
use damselfly_proto::v1::{AckStatus, Field, Point, SubscribeRequest, Tag, WriteBatch};

fn tag(k: &str, v: &str) -> Tag {
    Tag {
        key: k.into(),
        value: v.into(),
    }
}

fn batch(vm: &str, seq: u64, usage: f64) -> WriteBatch {
    WriteBatch {
        agent_id: format!("agent-{vm}"),
        seq,
        common_tags: vec![tag("ns_id", "ns1"), tag("vm_id", vm)],
        points: vec![
            Point {
                measurement: "cpu".into(),
                tags: vec![tag("cpu", "cpu-total")],
                fields: vec![Field {
                    key: "usage_percent".into(),
                    value: Some(Value::F64(usage)),
                }],
                time_unix_nano: 1_700_000_000_000_000_000 + seq as i64,
            },
            Point {
                measurement: "mem".into(),
                tags: vec![],
                fields: vec![Field {
                    key: "used".into(),
                    value: Some(Value::U64(42)),
                }],
                time_unix_nano: 1_700_000_000_000_000_000 + seq as i64,
            },
        ],
        chunks: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_the_matching_rows_as_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let collector = tokio::task::spawn_blocking(move || CollectorProc::start(&data, &[]))
        .await
        .unwrap();
    let mut metrics = MetricsClient::connect(collector.grpc.clone())
        .await
        .unwrap();
    let mut stream = metrics
        .subscribe(SubscribeRequest {
            measurements: vec!["cpu".into()],
            tags: vec![tag("vm_id", "vm-1")],
        })
        .await
        .unwrap()
        .into_inner();
    let mut ingest = IngestClient::connect(collector.grpc.clone()).await.unwrap();
    for (vm, seq, usage) in [("vm-2", 1, 10.0), ("vm-1", 1, 80.5), ("vm-1", 2, 81.5)] {
        let ack = ingest
            .write(batch(vm, seq, usage))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.status, AckStatus::Stored as i32);
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(message.dropped_points, 0);
        got.extend(message.points);
    }
    assert_eq!(got.len(), 2, "{got:?}");
    for (p, want) in got.iter().zip([80.5, 81.5]) {
        assert_eq!(p.measurement, "cpu");
        assert!(p.tags.contains(&tag("vm_id", "vm-1")), "{p:?}");
        assert!(p.tags.contains(&tag("cpu", "cpu-total")), "{p:?}");
        assert_eq!(p.fields[0].value, Some(Value::F64(want)));
    }
    // Nothing else arrives (vm-2 and mem rows were filtered out).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .is_err()
    );
    drop(collector);
}
