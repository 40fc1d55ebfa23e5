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

/// Line protocol for namespace (bucket) `ns`: one row of `table` per host. Returns the status and the message.
fn write_hosts(http: &str, ns: &str, table: &str, hosts: std::ops::Range<usize>) -> (u16, String) {
    let body: String = hosts
        .map(|h| format!("{table},host=h{h} v=1 1700000000000000000\n"))
        .collect();
    let (status, body) = common::http_post(
        &format!("{http}/api/v2/write?bucket={ns}&precision=ns"),
        body.as_bytes(),
    )
    .unwrap();
    // Errors come as InfluxDB's JSON: the message, unescaped.
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    (status, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_over_its_series_limit_is_refused_and_the_count_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("limits.toml");
    std::fs::write(&config, "max_series_per_namespace = 10\n").unwrap();
    let data = dir.path().join("data");
    let config = config.to_str().unwrap().to_string();
    let collector = CollectorProc::start(&data, &["--config", &config]);

    assert_eq!(write_hosts(&collector.http, "a", "cpu", 0..8).0, 204);
    // 8 known + 3 new = 11: the whole request is refused, naming the namespace, the count and the limit.
    let (status, body) = write_hosts(&collector.http, "a", "cpu", 5..11);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("namespace \"a\" has 8 series and this batch adds 3 new ones")
            && body.contains("limit of 10 series per namespace (max_series_per_namespace)"),
        "{body}"
    );
    // Known series always pass; up to the limit new ones too; another table's rows are other series.
    assert_eq!(write_hosts(&collector.http, "a", "cpu", 0..8).0, 204);
    assert_eq!(write_hosts(&collector.http, "a", "cpu", 8..10).0, 204);
    let (status, body) = write_hosts(&collector.http, "a", "mem", 0..1);
    assert_eq!(status, 400, "{body}");
    // Another namespace has a count of its own.
    assert_eq!(write_hosts(&collector.http, "b", "cpu", 0..10).0, 204);

    // gRPC: a REJECTED ack with the same message, and nothing of the batch stored.
    let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
    let mut grpc = batch("agent-a", 1, 1);
    grpc.common_tags = vec![damselfly_proto::v1::Tag {
        key: "ns_id".into(),
        value: "a".into(),
    }];
    let ack = client.write(grpc.clone()).await.unwrap().into_inner();
    assert_eq!(ack.status(), AckStatus::Rejected, "{ack:?}");
    assert!(ack.message.contains("max_series_per_namespace"), "{ack:?}");

    // After a restart the series in files still count: once the start-up read is done, a new one is refused.
    let collector = tokio::task::spawn_blocking(move || {
        // Rows, not series: a wrote h0-h7 twice, then h8-h9; b h0-h9.
        assert_eq!(collector.count("cpu"), 28);
        assert_eq!(collector.count("flood"), 0);
        assert!(collector.proc.terminate().success());
        assert!(
            !common::parquet_files(&data).is_empty(),
            "rows are in files"
        );
        let collector = CollectorProc::start(&data, &["--config", &config]);
        common::wait_until(
            std::time::Duration::from_secs(30),
            "the start-up files read",
            || {
                let (_, health) = common::http_get(&format!("{}/health", collector.http)).unwrap();
                health.contains("\"tables_warming\":0")
            },
        );
        collector
    })
    .await
    .unwrap();
    let (status, body) = write_hosts(&collector.http, "a", "cpu", 10..11);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("namespace \"a\" has 10 series"), "{body}");
    assert_eq!(write_hosts(&collector.http, "a", "cpu", 0..10).0, 204);
    assert_eq!(write_hosts(&collector.http, "c", "cpu", 0..1).0, 204);
    tokio::task::spawn_blocking(move || assert!(collector.proc.terminate().success()))
        .await
        .unwrap();
}
