//! The collector's own metrics: `GET /metrics` read by the Prometheus project's parser (`prometheus_client`, an
//! independent reader of the text format) counts exactly the writes, duplicates, rejections, queries, flushes and
//! maintenance passes a test makes over real sockets, and `damselfly.metrics` in SQL holds the same samples.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{CollectorProc, http_get, http_post, now_nanos, parse_exposition};
use damselfly_proto::v1::field::Value as FieldValue;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{AckStatus, Field, Point, WriteBatch};
use serde_json::Value;

/// Every sample of `/metrics` as parsed by `prometheus_client`: `name{k="v",...}` (labels sorted) → value.
fn scrape(collector: &CollectorProc) -> BTreeMap<String, f64> {
    let (code, text) = http_get(&format!("{}/metrics", collector.http)).unwrap();
    assert_eq!(code, 200, "{text}");
    let mut out = BTreeMap::new();
    for family in parse_exposition(&text).values() {
        for sample in family["samples"].as_array().unwrap() {
            let labels = sample[1].as_object().unwrap();
            let mut keys: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.as_str().unwrap()))
                .collect();
            keys.sort();
            let name = if keys.is_empty() {
                sample[0].as_str().unwrap().to_string()
            } else {
                format!("{}{{{}}}", sample[0].as_str().unwrap(), keys.join(","))
            };
            let value: f64 = sample[2].as_str().unwrap().parse().unwrap();
            assert!(out.insert(name.clone(), value).is_none(), "{name} twice");
        }
    }
    out
}

fn get(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing from /metrics: {:?}", samples.keys()))
}

fn point(host: &str, value: f64) -> Point {
    Point {
        measurement: "load".into(),
        tags: vec![damselfly_proto::v1::Tag {
            key: "host".into(),
            value: host.into(),
        }],
        fields: vec![Field {
            key: "value".into(),
            value: Some(FieldValue::F64(value)),
        }],
        time_unix_nano: now_nanos(),
    }
}

#[test]
fn metrics_count_what_the_collector_did_and_sql_agrees() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = CollectorProc::start(
        &dir.path().join("data"),
        &["--flush-interval", "3600", "--pg", "127.0.0.1:0"],
    );
    let before = scrape(&collector);
    assert_eq!(
        get(
            &before,
            "damselfly_ingest_points_total{protocol=\"influx\"}"
        ),
        0.0
    );

    // Line protocol: two requests, five points.
    for body in [
        "m,h=a v=1\nm,h=b v=2\nm,h=c v=3\n",
        "m,h=a v=4\nm,h=b v=5\n",
    ] {
        let (code, text) = http_post(
            &format!("{}/api/v2/write?bucket=b", collector.http),
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(code, 204, "{text}");
    }
    // gRPC: a batch of four points, the same batch again (a duplicate), and an invalid one (a point without fields).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
        let batch = WriteBatch {
            agent_id: "agent-1".into(),
            seq: 1,
            points: (0..4).map(|i| point("h", f64::from(i))).collect(),
            ..WriteBatch::default()
        };
        let ack = client.write(batch.clone()).await.unwrap().into_inner();
        assert_eq!(ack.status, AckStatus::Stored as i32);
        let ack = client.write(batch).await.unwrap().into_inner();
        assert_eq!(ack.status, AckStatus::Duplicate as i32);
        let mut bad = point("h", 0.0);
        bad.fields.clear();
        let ack = client
            .write(WriteBatch {
                agent_id: "agent-1".into(),
                seq: 2,
                points: vec![bad],
                ..WriteBatch::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.status, AckStatus::Rejected as i32);
        // A bad query over the PostgreSQL port counts like one over HTTP.
        let port = collector
            .pg
            .as_deref()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        let pg = common::pg_connect(port).await;
        let err = pg
            .simple_query("SELECT * FROM no_such_table")
            .await
            .unwrap_err();
        let message = err.as_db_error().map(|e| e.message().to_string());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("no_such_table")),
            "{err:?}"
        );
    });
    // Two good queries and a bad one.
    assert_eq!(collector.count("m"), 5);
    assert_eq!(collector.count("load"), 4);
    let (code, _) = http_post(
        &format!("{}/api/v1/sql", collector.http),
        b"SELECT * FROM no_such_table",
    )
    .unwrap();
    assert_eq!(code, 400);
    // A flush and a maintenance pass.
    let (code, text) = http_post(&format!("{}/api/v1/admin/flush", collector.http), b"").unwrap();
    assert_eq!(code, 200, "{text}");
    let (code, text) =
        http_post(&format!("{}/api/v1/admin/maintenance", collector.http), b"").unwrap();
    assert_eq!(code, 200, "{text}");

    let after = scrape(&collector);
    let delta = |name: &str| get(&after, name) - before.get(name).copied().unwrap_or(0.0);
    assert_eq!(
        delta("damselfly_ingest_batches_total{protocol=\"influx\"}"),
        2.0
    );
    assert_eq!(
        delta("damselfly_ingest_points_total{protocol=\"influx\"}"),
        5.0
    );
    assert_eq!(
        delta("damselfly_ingest_batches_total{protocol=\"grpc\"}"),
        1.0
    );
    assert_eq!(
        delta("damselfly_ingest_points_total{protocol=\"grpc\"}"),
        4.0
    );
    assert_eq!(
        delta("damselfly_ingest_duplicate_batches_total{protocol=\"grpc\"}"),
        1.0
    );
    assert_eq!(
        delta("damselfly_errors_total{kind=\"ingest_rejected\"}"),
        1.0
    );
    // One over HTTP, one over the pg port.
    assert_eq!(delta("damselfly_errors_total{kind=\"query_invalid\"}"), 2.0);
    assert_eq!(delta("damselfly_errors_total{kind=\"flush\"}"), 0.0);
    // Four queries: the two counts and the two bad ones.
    assert_eq!(delta("damselfly_query_seconds_count"), 4.0);
    // Three WAL group commits at most (the writes may share one), at least one.
    let commits = delta("damselfly_wal_sync_seconds_count");
    assert!((1.0..=3.0).contains(&commits), "{commits}");
    assert_eq!(
        get(&after, "damselfly_wal_sync_seconds_bucket{le=\"+Inf\"}"),
        get(&after, "damselfly_wal_sync_seconds_count")
    );
    assert!(delta("damselfly_flush_seconds_count") >= 1.0);
    assert_eq!(
        delta("damselfly_maintenance_seconds_count{phase=\"compaction\"}"),
        1.0
    );
    // The flush wrote the rows out: nothing buffered, files on disk, two tables.
    assert_eq!(get(&after, "damselfly_buffer_bytes"), 0.0);
    assert!(get(&after, "damselfly_parquet_files") >= 2.0);
    assert_eq!(get(&after, "damselfly_tables"), 2.0);
    assert_eq!(
        get(&after, "damselfly_agents{status=\"unregistered\"}"),
        1.0
    );

    // The SQL table: the same counters (they do not move between the scrape and the query).
    let rows = collector.sql(
        "SELECT metric, labels, value FROM damselfly.metrics \
         WHERE metric IN ('damselfly_ingest_points_total', 'damselfly_errors_total', 'damselfly_tables') \
         ORDER BY metric, labels",
    );
    assert!(rows.len() > 10, "{rows:?}");
    for row in &rows {
        let labels = row["labels"].as_str().unwrap();
        let name = if labels.is_empty() {
            row["metric"].as_str().unwrap().to_string()
        } else {
            format!("{}{{{labels}}}", row["metric"].as_str().unwrap())
        };
        assert_eq!(row["value"], Value::from(get(&after, &name)), "{name}");
    }
}
