//! Limits (issue 10): an agent over `max_agent_points_per_sec` is told to retry later, with the wait and the name
//! of the limit, and what it was told to retry is not stored (so re-sending it loses nothing and doubles nothing).
#![allow(clippy::unwrap_used)]

mod common;

use common::CollectorProc;
use damselfly_proto::v1::{
    AckStatus, Field, Point, WriteBatch, field::Value, ingest_client::IngestClient,
};

fn batch(agent: &str, seq: u64, points: usize) -> WriteBatch {
    WriteBatch {
        agent_id: agent.into(),
        seq,
        points: (0..points)
            .map(|i| Point {
                measurement: "flood".into(),
                tags: vec![],
                fields: vec![Field {
                    key: "v".into(),
                    value: Some(Value::F64(i as f64)),
                }],
                time_unix_nano: 1_700_000_000_000_000_000 + (seq as i64) * 1_000_000 + i as i64,
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_its_points_per_second_is_told_to_retry_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("limits.toml");
    std::fs::write(&config, "max_agent_points_per_sec = 50\n").unwrap();
    let data = dir.path().join("data");
    let collector = tokio::task::spawn_blocking(move || {
        CollectorProc::start(&data, &["--config", config.to_str().unwrap()])
    })
    .await
    .unwrap();
    let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
    // The bucket holds 10 s of the limit (500 points): 400 pass, then 400 more do not.
    let ack = client
        .write(batch("flooder", 1, 400))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    let status = client.write(batch("flooder", 2, 400)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("max_agent_points_per_sec (50 points/s)"),
        "{status:?}"
    );
    // On the push stream: a RETRY ack with the wait.
    let stream = futures::stream::iter(vec![batch("flooder", 3, 400)]);
    let mut acks = client.push(stream).await.unwrap().into_inner();
    let ack = acks.message().await.unwrap().unwrap();
    assert_eq!(ack.status(), AckStatus::Retry, "{ack:?}");
    assert!(ack.retry_after_ms > 0, "{ack:?}");
    // Another agent is not slowed by this one.
    let ack = client
        .write(batch("quiet", 1, 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    let stored = tokio::task::spawn_blocking(move || {
        let n = collector.count("flood");
        assert!(collector.proc.terminate().success());
        n
    })
    .await
    .unwrap();
    assert_eq!(stored, 500, "only the acknowledged batches are stored");
}
