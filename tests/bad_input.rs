//! Black-box tests of how the collector treats bad input: invalid batches, duplicates, type conflicts, oversized
//! and garbage gRPC traffic, and every kind of bad HTTP request. Each test runs its own collector process on a fresh
//! temporary directory and talks to it over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{CollectorProc, http_get, http_post, http_request};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{Ack, AckStatus, Field, Point, Tag, WriteBatch};
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// 2023-11-14T22:13:20Z in nanoseconds.
const T0: i64 = 1_700_000_000_000_000_000;
const SECOND: i64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// A fresh temporary directory with the store in `data/` below it (so the harness's stderr log, written next to
/// the data directory, stays inside the temporary directory too).
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::TempDir::new().unwrap(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a collector config file and returns its path.
    fn config(&self, toml: &str) -> PathBuf {
        let path = self.path("collector.toml");
        std::fs::write(&path, toml).unwrap();
        path
    }

    /// Starts a collector; `config` is the TOML text of a config file, if any.
    fn start(&self, config: Option<&str>) -> CollectorProc {
        match config {
            Some(toml) => {
                let path = self.config(toml);
                CollectorProc::start(&self.data_dir(), &["--config", path.to_str().unwrap()])
            }
            None => CollectorProc::start(&self.data_dir(), &[]),
        }
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag {
        key: key.into(),
        value: value.into(),
    }
}

fn field(key: &str, value: Value) -> Field {
    Field {
        key: key.into(),
        value: Some(value),
    }
}

fn point(measurement: &str, tags: &[(&str, &str)], fields: Vec<Field>, time: i64) -> Point {
    Point {
        measurement: measurement.into(),
        tags: tags.iter().map(|(k, v)| tag(k, v)).collect(),
        fields,
        time_unix_nano: time,
    }
}

/// One point of `measurement` with tag host=`host` and float field `v`.
fn simple_point(measurement: &str, host: &str, v: f64, time: i64) -> Point {
    point(
        measurement,
        &[("host", host)],
        vec![field("v", Value::F64(v))],
        time,
    )
}

fn batch(agent_id: &str, seq: u64, points: Vec<Point>) -> WriteBatch {
    WriteBatch {
        chunks: Vec::new(),
        agent_id: agent_id.into(),
        seq,
        common_tags: vec![],
        points,
    }
}

/// A gRPC client that compresses with zstd both ways, as agents do.
async fn client(url: &str) -> IngestClient<Channel> {
    IngestClient::connect(url.to_owned())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
}

/// A gRPC client that sends uncompressed messages.
async fn plain_client(url: &str) -> IngestClient<Channel> {
    IngestClient::connect(url.to_owned())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn write(client: &mut IngestClient<Channel>, batch: WriteBatch) -> Ack {
    client
        .write(batch)
        .await
        .unwrap_or_else(|s| panic!("Write RPC failed: {s:?}"))
        .into_inner()
}

/// Writes a batch that must be stored; returns the ack.
async fn write_stored(client: &mut IngestClient<Channel>, batch: WriteBatch) -> Ack {
    let points = batch.points.len() as u64;
    let ack = write(client, batch).await;
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    assert_eq!(ack.points_stored, points, "{ack:?}");
    ack
}

/// Asserts that `ack` is a rejection of `seq` whose message contains every one of `wanted`.
fn assert_rejected(ack: &Ack, seq: u64, wanted: &[&str], case: &str) {
    assert_eq!(ack.status(), AckStatus::Rejected, "{case}: {ack:?}");
    assert_eq!(
        ack.seq, seq,
        "{case}: the ack must carry the batch's seq: {ack:?}"
    );
    assert_eq!(ack.points_stored, 0, "{case}: {ack:?}");
    for w in wanted {
        assert!(
            ack.message.contains(w),
            "{case}: rejection message {:?} should contain {w:?}",
            ack.message
        );
    }
}

/// Names of the tables the collector knows, sorted.
fn tables(c: &CollectorProc) -> Vec<String> {
    c.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name")
        .iter()
        .map(|r| r["table_name"].as_str().unwrap().to_owned())
        .collect()
}

/// `/health` as JSON; panics unless it answers 200.
fn health(c: &CollectorProc) -> serde_json::Value {
    let (code, body) = http_get(&format!("{}/health", c.http)).expect("GET /health");
    assert_eq!(code, 200, "/health: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is not JSON: {e}: {body}"))
}

/// POSTs SQL to `/api/v1/sql` (with an optional query string) and returns (status, body).
fn post_sql(c: &CollectorProc, query: &str, body: &[u8]) -> (u16, String) {
    http_post(&format!("{}/api/v1/sql{query}", c.http), body).expect("POST /api/v1/sql")
}

/// Asserts an HTTP error answer: the status and a JSON body `{"error": "..."}` whose message contains every one
/// of `wanted`. Returns the message.
fn assert_api_error(code: u16, body: &str, want_code: u16, wanted: &[&str], case: &str) -> String {
    assert_eq!(code, want_code, "{case}: {body}");
    let json: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{case}: error body is not JSON ({e}): {body}"));
    let message = json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: no \"error\" string in {body}"))
        .to_owned();
    for w in wanted {
        assert!(
            message.contains(w),
            "{case}: error {message:?} should contain {w:?}"
        );
    }
    message
}

/// The gRPC/HTTP endpoint URL as a `host:port` for raw sockets.
fn host_port(url: &str) -> &str {
    url.strip_prefix("http://").unwrap().trim_end_matches('/')
}

/// Writes `bytes` on a fresh TCP connection to `addr`, then reads whatever comes back until the peer closes (or a
/// few seconds pass). Returns what was read.
fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The peer may close as soon as it sees junk; a failed write is fine.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

fn file_names_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------------------------
// gRPC: invalid batches
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_rejected_with_a_reason_and_not_stored() {
    let scratch = Scratch::new();
    let c = scratch.start(Some("max_batch_points = 3\n"));
    let mut grpc = client(&c.grpc).await;

    let mut no_value = simple_point("no_value", "a", 1.0, T0);
    no_value.fields[0].value = None;
    let mut common_vs_field = batch(
        "agent-x",
        15,
        vec![simple_point("common_vs_field", "a", 1.0, T0)],
    );
    common_vs_field.common_tags = vec![tag("v", "x")];
    let mut dup_common = batch(
        "agent-x",
        16,
        vec![simple_point("dup_common", "a", 1.0, T0)],
    );
    dup_common.common_tags = vec![tag("vm", "1"), tag("vm", "2")];
    let mut common_time = batch(
        "agent-x",
        17,
        vec![simple_point("common_time", "a", 1.0, T0)],
    );
    common_time.common_tags = vec![tag("time", "x")];

    // (case, batch, expected substrings of the rejection message)
    let cases: Vec<(&str, WriteBatch, Vec<&str>)> = vec![
        (
            "measurement with a space and '!'",
            batch("agent-x", 1, vec![simple_point("bad name!", "a", 1.0, T0)]),
            vec!["bad name!", "must start with a letter"],
        ),
        (
            "empty measurement",
            batch("agent-x", 2, vec![simple_point("", "a", 1.0, T0)]),
            vec!["measurement name is empty"],
        ),
        (
            "measurement with a path separator",
            batch("agent-x", 3, vec![simple_point("../escape", "a", 1.0, T0)]),
            vec!["../escape", "must start with a letter"],
        ),
        (
            "measurement over 128 bytes",
            batch(
                "agent-x",
                4,
                vec![simple_point(&"m".repeat(129), "a", 1.0, T0)],
            ),
            vec!["129 bytes", "limit is 128"],
        ),
        (
            "seq 0",
            batch("agent-x", 0, vec![simple_point("seq_zero", "a", 1.0, T0)]),
            vec!["seq must be at least 1"],
        ),
        (
            "empty agent_id",
            batch("", 5, vec![simple_point("no_agent", "a", 1.0, T0)]),
            vec!["agent_id is empty"],
        ),
        (
            "agent_id with a control character",
            batch("agent\nx", 6, vec![simple_point("ctl_agent", "a", 1.0, T0)]),
            vec!["agent_id", "control characters"],
        ),
        (
            "point without fields",
            batch(
                "agent-x",
                7,
                vec![point("no_fields", &[("host", "a")], vec![], T0)],
            ),
            vec!["no_fields", "no fields"],
        ),
        (
            "field without a value",
            batch("agent-x", 8, vec![no_value]),
            vec!["\"v\"", "has no value"],
        ),
        (
            "tag key \"time\"",
            batch(
                "agent-x",
                9,
                vec![point(
                    "tag_time",
                    &[("time", "x")],
                    vec![field("v", Value::F64(1.0))],
                    T0,
                )],
            ),
            vec!["tag name \"time\" is reserved"],
        ),
        (
            "field key \"time\"",
            batch(
                "agent-x",
                10,
                vec![point(
                    "field_time",
                    &[],
                    vec![field("time", Value::I64(1))],
                    T0,
                )],
            ),
            vec!["field name \"time\" is reserved"],
        ),
        (
            "negative timestamp",
            batch(
                "agent-x",
                11,
                vec![simple_point("negative_time", "a", 1.0, -SECOND)],
            ),
            vec!["-1000000000", "before 1970"],
        ),
        (
            "more points than max_batch_points",
            batch(
                "agent-x",
                12,
                (0..4)
                    .map(|i| simple_point("too_many", "a", 1.0, T0 + i * SECOND))
                    .collect(),
            ),
            vec!["4 points", "limit is 3"],
        ),
        ("no points", batch("agent-x", 13, vec![]), vec!["no points"]),
        (
            "tag and field with the same name",
            batch(
                "agent-x",
                14,
                vec![point(
                    "tag_is_field",
                    &[("v", "x")],
                    vec![field("v", Value::F64(1.0))],
                    T0,
                )],
            ),
            vec!["\"v\"", "both a tag and a field"],
        ),
        (
            "common tag that is also a field",
            common_vs_field,
            vec!["\"v\"", "both a common tag and a field"],
        ),
        (
            "common tag given twice",
            dup_common,
            vec!["\"vm\"", "appears twice"],
        ),
        (
            "common tag \"time\"",
            common_time,
            vec!["\"time\" is reserved"],
        ),
        (
            "tag given twice in one point",
            batch(
                "agent-x",
                18,
                vec![point(
                    "dup_tag",
                    &[("host", "a"), ("host", "b")],
                    vec![field("v", Value::F64(1.0))],
                    T0,
                )],
            ),
            vec!["\"host\"", "appears twice"],
        ),
        (
            "field given twice in one point",
            batch(
                "agent-x",
                19,
                vec![point(
                    "dup_field",
                    &[],
                    vec![field("v", Value::F64(1.0)), field("v", Value::F64(2.0))],
                    T0,
                )],
            ),
            vec!["\"v\"", "appears twice"],
        ),
        (
            "empty tag key",
            batch(
                "agent-x",
                20,
                vec![point(
                    "empty_tag_key",
                    &[("", "x")],
                    vec![field("v", Value::F64(1.0))],
                    T0,
                )],
            ),
            vec!["tag name is empty"],
        ),
        (
            "tag value over 64 KiB",
            batch(
                "agent-x",
                21,
                vec![point(
                    "long_tag",
                    &[("host", &"h".repeat(64 * 1024 + 1))],
                    vec![field("v", Value::F64(1.0))],
                    T0,
                )],
            ),
            vec!["65537 bytes", "limit is 65536"],
        ),
        (
            "one bad point among good ones",
            batch(
                "agent-x",
                22,
                vec![
                    simple_point("good_then_bad", "a", 1.0, T0),
                    simple_point("good_then_bad", "a", 2.0, -1),
                ],
            ),
            vec!["point 1", "before 1970"],
        ),
    ];

    for (case, b, wanted) in cases {
        let seq = b.seq;
        let ack = write(&mut grpc, b).await;
        assert_rejected(&ack, seq, &wanted, case);
    }

    // Nothing of any of them was stored: no table, no buffered row, no agent recorded.
    assert_eq!(
        tables(&c),
        Vec::<String>::new(),
        "rejected batches must create no table"
    );
    let h = health(&c);
    assert_eq!(h["store"]["tables"], 0, "{h}");
    assert_eq!(h["store"]["buffered_rows"], 0, "{h}");
    assert_eq!(h["store"]["agents_seen"], 0, "{h}");

    // A rejected batch does not use up its (agent, seq): the corrected batch with the same seq is stored, not
    // answered as a duplicate.
    write_stored(
        &mut grpc,
        batch(
            "agent-x",
            11,
            vec![simple_point("negative_time", "a", 1.0, T0)],
        ),
    )
    .await;
    write_stored(
        &mut grpc,
        batch(
            "agent-x",
            12,
            (0..3)
                .map(|i| simple_point("too_many", "a", 1.0, T0 + i * SECOND))
                .collect(),
        ),
    )
    .await;
    assert_eq!(tables(&c), ["negative_time", "too_many"]);
    assert_eq!(c.count("negative_time"), 1);
    assert_eq!(c.count("too_many"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_conflicts_are_rejected_naming_the_column_and_both_types() {
    let scratch = Scratch::new();
    let c = scratch.start(None);
    let mut grpc = client(&c.grpc).await;

    write_stored(
        &mut grpc,
        batch("agent-t", 1, vec![simple_point("m", "a", 1.5, T0)]),
    )
    .await;

    // Same field, now a string.
    let ack = write(
        &mut grpc,
        batch(
            "agent-t",
            2,
            vec![point(
                "m",
                &[("host", "a")],
                vec![field("v", Value::Str("oops".into()))],
                T0 + SECOND,
            )],
        ),
    )
    .await;
    assert_rejected(
        &ack,
        2,
        &["\"v\"", "\"m\"", "float", "string"],
        "float then string",
    );

    // Same field, now an integer.
    let ack = write(
        &mut grpc,
        batch(
            "agent-t",
            3,
            vec![point(
                "m",
                &[("host", "a")],
                vec![field("v", Value::I64(7))],
                T0 + SECOND,
            )],
        ),
    )
    .await;
    assert_rejected(
        &ack,
        3,
        &["\"v\"", "float", "integer"],
        "float then integer",
    );

    // A tag sent as a field.
    let ack = write(
        &mut grpc,
        batch(
            "agent-t",
            4,
            vec![point(
                "m",
                &[],
                vec![field("host", Value::Str("a".into()))],
                T0 + SECOND,
            )],
        ),
    )
    .await;
    assert_rejected(
        &ack,
        4,
        &["\"host\"", "tag", "string field"],
        "tag then field",
    );

    // A field sent as a tag.
    let ack = write(
        &mut grpc,
        batch(
            "agent-t",
            5,
            vec![point(
                "m",
                &[("v", "x")],
                vec![field("w", Value::F64(1.0))],
                T0 + SECOND,
            )],
        ),
    )
    .await;
    assert_rejected(&ack, 5, &["\"v\"", "float field", "tag"], "field then tag");

    // Two points of one batch that disagree with each other (new column): the whole batch is refused, including
    // its good point for another table (a batch is all or nothing).
    let ack = write(
        &mut grpc,
        batch(
            "agent-t",
            6,
            vec![
                simple_point("other", "a", 1.0, T0),
                point(
                    "m",
                    &[],
                    vec![field("fresh", Value::Bool(true))],
                    T0 + SECOND,
                ),
                point(
                    "m",
                    &[],
                    vec![field("fresh", Value::U64(1))],
                    T0 + 2 * SECOND,
                ),
            ],
        ),
    )
    .await;
    assert_rejected(
        &ack,
        6,
        &["\"fresh\"", "boolean", "unsigned"],
        "conflict within one batch",
    );

    // The earlier data is intact, and no column or table appeared from the rejected batches.
    let rows = c.sql("SELECT host, v FROM m");
    assert_eq!(rows, vec![serde_json::json!({"host": "a", "v": 1.5})]);
    let columns: Vec<String> = c
        .sql("SELECT column_name FROM information_schema.columns WHERE table_name = 'm' ORDER BY column_name")
        .iter()
        .map(|r| r["column_name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(columns, ["host", "time", "v"]);
    assert_eq!(tables(&c), ["m"]);

    // The column still takes floats, and a rejected seq can be reused.
    write_stored(
        &mut grpc,
        batch("agent-t", 2, vec![simple_point("m", "b", 2.5, T0 + SECOND)]),
    )
    .await;
    assert_eq!(c.count("m"), 2);
}

// ---------------------------------------------------------------------------------------------------------------
// gRPC: duplicates
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_batch_is_acknowledged_as_duplicate_and_stored_once() {
    let scratch = Scratch::new();
    let c = scratch.start(None);
    let mut grpc = client(&c.grpc).await;

    let points: Vec<Point> = (0..3)
        .map(|i| simple_point("m", "a", i as f64, T0 + i * SECOND))
        .collect();
    let first = write(&mut grpc, batch("agent-d", 1, points.clone())).await;
    assert_eq!(first.status(), AckStatus::Stored, "{first:?}");
    assert_eq!((first.seq, first.points_stored), (1, 3), "{first:?}");

    let second = write(&mut grpc, batch("agent-d", 1, points.clone())).await;
    assert_eq!(second.status(), AckStatus::Duplicate, "{second:?}");
    assert_eq!((second.seq, second.points_stored), (1, 0), "{second:?}");
    assert!(second.message.is_empty(), "{second:?}");

    // Same content under another seq from a fresh connection is a new batch; duplicate detection is by (agent,
    // seq), and does not depend on the connection.
    let mut other = client(&c.grpc).await;
    let again = write(&mut other, batch("agent-d", 1, points.clone())).await;
    assert_eq!(again.status(), AckStatus::Duplicate, "{again:?}");
    assert_eq!(c.count("m"), 3, "the duplicate must not be stored");

    // The same seq from another agent is not a duplicate.
    write_stored(&mut other, batch("agent-e", 1, points)).await;
    assert_eq!(c.count("m"), 6);
    assert_eq!(health(&c)["store"]["agents_seen"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_stream_acks_every_batch_in_order_including_duplicates_and_rejections() {
    let scratch = Scratch::new();
    let c = scratch.start(None);
    let mut grpc = client(&c.grpc).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<WriteBatch>(16);
    let seqs = [1u64, 2, 3, 2, 4, 5];
    for seq in seqs {
        let mut p = simple_point("m", "a", seq as f64, T0 + seq as i64 * SECOND);
        if seq == 4 {
            p.measurement = "bad name!".into();
        }
        tx.send(batch("agent-p", seq, vec![p])).await.unwrap();
    }
    let mut acks = grpc
        .push(ReceiverStream::new(rx))
        .await
        .expect("Push")
        .into_inner();
    let mut got = Vec::new();
    for _ in seqs {
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .expect("an ack within 10 s")
            .expect("ack stream")
            .expect("one ack per batch");
        got.push((ack.seq, ack.status(), ack.points_stored));
        if ack.status() == AckStatus::Rejected {
            assert!(ack.message.contains("bad name!"), "{ack:?}");
        }
    }
    assert_eq!(
        got,
        vec![
            (1, AckStatus::Stored, 1),
            (2, AckStatus::Stored, 1),
            (3, AckStatus::Stored, 1),
            (2, AckStatus::Duplicate, 0),
            (4, AckStatus::Rejected, 0),
            (5, AckStatus::Stored, 1),
        ]
    );
    // Closing our side ends the ack stream cleanly.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .expect("stream end within 10 s");
    assert!(matches!(end, Ok(None)), "{end:?}");

    let values: Vec<f64> = c
        .sql("SELECT v FROM m ORDER BY time")
        .iter()
        .map(|r| r["v"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [1.0, 2.0, 3.0, 5.0]);
}

// ---------------------------------------------------------------------------------------------------------------
// gRPC: oversized and garbage traffic
// ---------------------------------------------------------------------------------------------------------------

/// A batch whose encoded size is well over 64 KiB, but which zstd compresses to almost nothing.
fn big_batch(agent: &str, seq: u64) -> WriteBatch {
    batch(
        agent,
        seq,
        vec![point(
            "big",
            &[("host", "a")],
            vec![field("s", Value::Str("x".repeat(100 * 1024)))],
            T0,
        )],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_and_the_collector_keeps_serving() {
    let scratch = Scratch::new();
    let c = scratch.start(Some("max_grpc_message_bytes = 65536\n"));

    // Compressed: small on the wire, over the limit once decompressed.
    let mut zstd = client(&c.grpc).await;
    let status = zstd
        .write(big_batch("agent-o", 1))
        .await
        .expect_err("a 100 KiB message over a 64 KiB limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("65536"),
        "the status should name the limit: {status:?}"
    );

    // Uncompressed: over the limit as sent.
    let mut plain = plain_client(&c.grpc).await;
    let status = plain
        .write(big_batch("agent-o", 2))
        .await
        .expect_err("a 100 KiB message over a 64 KiB limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("65536"),
        "the status should name the limit: {status:?}"
    );

    // On a push stream: the batch before the big one is acknowledged, then the stream ends with the error.
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteBatch>(4);
    tx.send(batch("agent-o", 3, vec![simple_point("m", "a", 1.0, T0)]))
        .await
        .unwrap();
    let mut acks = zstd
        .push(ReceiverStream::new(rx))
        .await
        .expect("Push")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .expect("ack within 10 s")
        .expect("ack")
        .expect("one ack");
    assert_eq!(
        (first.seq, first.status()),
        (3, AckStatus::Stored),
        "{first:?}"
    );
    tx.send(big_batch("agent-o", 4)).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), acks.message())
        .await
        .expect("stream end within 10 s");
    let status = end.expect_err("the stream must end with an error status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("65536"), "{status:?}");
    drop(tx);

    // Nothing of the big batches was stored; the collector still takes writes, on new and old channels.
    assert_eq!(tables(&c), ["m"]);
    let mut fresh = client(&c.grpc).await;
    write_stored(
        &mut fresh,
        batch("agent-o", 5, vec![simple_point("m", "a", 2.0, T0 + SECOND)]),
    )
    .await;
    write_stored(
        &mut zstd,
        batch(
            "agent-o",
            6,
            vec![simple_point("m", "a", 3.0, T0 + 2 * SECOND)],
        ),
    )
    .await;
    // Just under the limit is fine.
    let mut near = big_batch("agent-o", 7);
    near.points[0].fields[0].value = Some(Value::Str("x".repeat(60 * 1024)));
    write_stored(&mut zstd, near).await;
    assert_eq!(c.count("m"), 3);
    assert_eq!(c.count("big"), 1);
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_does_not_hurt_the_collector() {
    let scratch = Scratch::new();
    let c = scratch.start(None);
    let addr = host_port(&c.grpc).to_owned();

    // Plain junk, an HTTP/1 request, a truncated HTTP/2 preface, a valid preface followed by junk frames, and a
    // connection closed without a byte.
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let preface_then_junk = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &junk].concat();
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("junk", junk.clone()),
        ("http/1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("truncated preface", b"PRI * HTTP/2.0\r\n".to_vec()),
        ("preface then junk", preface_then_junk),
        ("nothing", Vec::new()),
    ];
    let (raw_tx, raw_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (name, bytes) in inputs {
            raw_exchange(&addr, &bytes);
            let _ = raw_tx.send(name);
        }
    });
    tokio::task::spawn_blocking(move || {
        for _ in 0..5 {
            raw_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("raw exchange finished");
        }
    })
    .await
    .unwrap();

    let mut grpc = client(&c.grpc).await;
    write_stored(
        &mut grpc,
        batch("agent-g", 1, vec![simple_point("m", "a", 1.0, T0)]),
    )
    .await;
    assert_eq!(c.count("m"), 1);
    health(&c);
}

/// A tonic codec that sends raw bytes as the request message (so a test can send what no generated client
/// would) and decodes the answer as an [`Ack`].
#[derive(Debug, Default, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Ack;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Ack;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Ack>, tonic::Status> {
        use prost::Message;
        Ack::decode(src).map(Some).map_err(|e| {
            tonic::Status::internal(format!("test client: cannot decode the Ack: {e}"))
        })
    }
}

/// Calls `Ingest/Write` with `payload` as the (uncompressed) request message.
async fn write_raw(url: &str, payload: Vec<u8>) -> Result<Ack, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/damselfly.v1.Ingest/Write");
    grpc.unary(tonic::Request::new(payload), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_refused_and_the_collector_keeps_serving() {
    use prost::Message;
    let scratch = Scratch::new();
    let c = scratch.start(None);

    // (case, payload): agent_id (field 1) with bytes that are not UTF-8; a length prefix running past the end;
    // a measurement (Point field 1, inside field 4) that is not UTF-8; an invalid wire type; pure junk.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "agent_id not UTF-8",
            vec![0x0a, 0x02, 0xff, 0xfe, 0x10, 0x01],
        ),
        ("truncated length", vec![0x0a, 0x10, b'a']),
        (
            "measurement not UTF-8",
            vec![
                0x0a, 0x01, b'a', 0x10, 0x01, 0x22, 0x04, 0x0a, 0x02, 0xc3, 0x28,
            ],
        ),
        ("invalid wire type", vec![0x0f, 0x01]),
        (
            "junk",
            (0..200u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
                .collect(),
        ),
    ];
    for (case, payload) in cases {
        let status = write_raw(&c.grpc, payload).await.expect_err(case);
        assert!(
            matches!(status.code(), Code::Internal | Code::InvalidArgument),
            "{case}: {status:?}"
        );
        assert!(status.message().contains("decode"), "{case}: {status:?}");
    }
    assert_eq!(tables(&c), Vec::<String>::new());

    // Unknown fields (a newer client) are skipped, not refused.
    let mut payload = batch("agent-raw", 1, vec![simple_point("m", "a", 1.0, T0)]).encode_to_vec();
    payload.extend_from_slice(&[0x78, 0x2a]); // field 15, varint 42
    let ack = write_raw(&c.grpc, payload)
        .await
        .expect("unknown fields are fine");
    assert_eq!((ack.seq, ack.status()), (1, AckStatus::Stored), "{ack:?}");

    let mut grpc = client(&c.grpc).await;
    write_stored(
        &mut grpc,
        batch(
            "agent-raw",
            2,
            vec![simple_point("m", "a", 2.0, T0 + SECOND)],
        ),
    )
    .await;
    assert_eq!(c.count("m"), 2);
    health(&c);
}

/// Sequence numbers are uint64 and only 0 is invalid: the largest one must be handled like any other (stored, or
/// rejected with a reason), must not stop the collector from taking further writes, and must survive a restart
/// (the WAL replay re-reads it).
///
/// Fails today (debug/test builds): `SeqSet::insert` in collector/src/dedup.rs computes `seq + 1`, which overflows
/// for `u64::MAX` and panics the WAL writer thread after the WAL append; every later write is answered RETRY "the
/// collector is shutting down" while `/health` still says ok, and the next start panics replaying that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_sequence_number_does_not_break_ingest() {
    let scratch = Scratch::new();
    let c = scratch.start(None);
    let mut grpc = client(&c.grpc).await;

    let ack = write(
        &mut grpc,
        batch("agent-max", u64::MAX, vec![simple_point("m", "a", 1.0, T0)]),
    )
    .await;
    assert_eq!(ack.seq, u64::MAX, "{ack:?}");
    assert!(
        matches!(ack.status(), AckStatus::Stored | AckStatus::Rejected),
        "seq u64::MAX must be stored or rejected, got {ack:?}"
    );
    let stored = ack.status() == AckStatus::Stored;
    if stored {
        let again = write(
            &mut grpc,
            batch("agent-max", u64::MAX, vec![simple_point("m", "a", 1.0, T0)]),
        )
        .await;
        assert_eq!(again.status(), AckStatus::Duplicate, "{again:?}");
    }

    // Ingest still works for everyone.
    write_stored(
        &mut grpc,
        batch(
            "agent-other",
            1,
            vec![simple_point("m", "b", 2.0, T0 + SECOND)],
        ),
    )
    .await;
    health(&c);

    // A restart replays the WAL (no flush happened: the default interval is 60 s).
    drop(grpc);
    let status = c.proc.terminate();
    assert!(status.success(), "collector exit status {status:?}");
    let c = scratch.start(None);
    assert_eq!(c.count("m"), if stored { 2 } else { 1 });
    let mut grpc = client(&c.grpc).await;
    if stored {
        let again = write(
            &mut grpc,
            batch("agent-max", u64::MAX, vec![simple_point("m", "a", 1.0, T0)]),
        )
        .await;
        assert_eq!(
            again.status(),
            AckStatus::Duplicate,
            "after restart: {again:?}"
        );
    }
    write_stored(
        &mut grpc,
        batch(
            "agent-other",
            2,
            vec![simple_point("m", "b", 3.0, T0 + 2 * SECOND)],
        ),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------------------------

/// Starts a collector with `max_sql_bytes = 1024` and one stored row in table `m`.
async fn http_collector(scratch: &Scratch) -> CollectorProc {
    let c = scratch.start(Some("max_sql_bytes = 1024\n"));
    let mut grpc = client(&c.grpc).await;
    write_stored(
        &mut grpc,
        batch("agent-h", 1, vec![simple_point("m", "a", 1.5, T0)]),
    )
    .await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_requests_are_400_with_a_json_reason() {
    let scratch = Scratch::new();
    let c = http_collector(&scratch).await;

    let (code, body) = post_sql(&c, "", b"SELEC * FROM m");
    let message = assert_api_error(code, &body, 400, &["SELEC"], "syntax error");
    assert!(
        message.to_lowercase().contains("sql"),
        "the parser's message is passed on: {message}"
    );

    let (code, body) = post_sql(&c, "", b"SELECT * FROM m WHERE");
    assert_api_error(code, &body, 400, &[], "truncated statement");

    let (code, body) = post_sql(&c, "", b"SELECT * FROM no_such_table");
    assert_api_error(
        code,
        &body,
        400,
        &["no_such_table", "not found"],
        "unknown table",
    );

    let (code, body) = post_sql(&c, "", b"SELECT no_such_column FROM m");
    assert_api_error(code, &body, 400, &["no_such_column"], "unknown column");

    let (code, body) = post_sql(&c, "", b"SELECT 1; SELECT 2");
    assert_api_error(code, &body, 400, &[], "two statements");

    let (code, body) = post_sql(&c, "?format=xml", b"SELECT 1");
    assert_api_error(
        code,
        &body,
        400,
        &["xml", "json", "csv", "arrow"],
        "unknown format",
    );

    let (code, body) = post_sql(&c, "?format=", b"SELECT 1");
    assert_api_error(code, &body, 400, &["json", "csv", "arrow"], "empty format");

    let (code, body) = post_sql(&c, "", b"");
    assert_api_error(code, &body, 400, &["empty"], "empty body");

    let (code, body) = post_sql(&c, "", b" \n\t ");
    assert_api_error(code, &body, 400, &["empty"], "blank body");

    let (code, body) = post_sql(&c, "", b"SELECT '\xff\xfe'");
    assert_api_error(code, &body, 400, &["UTF-8"], "invalid UTF-8");

    // Every format still works after all of that.
    for format in ["json", "csv", "arrow"] {
        let (code, body) = post_sql(&c, &format!("?format={format}"), b"SELECT v FROM m");
        assert_eq!(code, 200, "{format}: {body}");
    }
    assert_eq!(
        c.sql("SELECT v FROM m"),
        vec![serde_json::json!({"v": 1.5})]
    );
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_max_sql_bytes_is_413_naming_the_limit() {
    let scratch = Scratch::new();
    let c = http_collector(&scratch).await;

    // 4 KiB of valid SQL (a long comment-free IN list).
    let mut sql = String::from("SELECT v FROM m WHERE v IN (1.5");
    while sql.len() < 4096 {
        sql.push_str(", 0.0");
    }
    sql.push(')');
    let (code, body) = post_sql(&c, "", sql.as_bytes());
    assert_api_error(
        code,
        &body,
        413,
        &["1024"],
        "4 KiB of SQL over a 1 KiB limit",
    );

    // At the limit is fine.
    let mut sql = String::from("SELECT v FROM m WHERE v IN (1.5");
    while sql.len() < 1024 - 6 {
        sql.push_str(", 0.0");
    }
    sql.push(')');
    assert!(sql.len() <= 1024);
    let (code, body) = post_sql(&c, "", sql.as_bytes());
    assert_eq!(code, 200, "{} bytes of SQL: {body}", sql.len());
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_unknown_paths_are_refused() {
    let scratch = Scratch::new();
    let c = http_collector(&scratch).await;

    let (code, body) = http_get(&format!("{}/api/v1/sql", c.http)).unwrap();
    assert_eq!(code, 405, "GET /api/v1/sql: {body}");
    assert!(
        body.contains("\"error\"") && body.contains("POST /api/v1/sql"),
        "405 is a JSON error: {body}"
    );
    let (code, body) = http_request("PUT", &format!("{}/api/v1/sql", c.http), &[], b"SELECT 1")
        .map(|(c, b)| (c, String::from_utf8_lossy(&b).into_owned()))
        .unwrap();
    assert_eq!(code, 405, "PUT /api/v1/sql: {body}");
    let (code, body) = http_post(&format!("{}/health", c.http), b"").unwrap();
    assert_eq!(code, 405, "POST /health: {body}");

    for path in ["/nope", "/api/v1/sq", "/api/v2/sql", "/health/x"] {
        let (code, body) = http_get(&format!("{}{path}", c.http)).unwrap();
        assert_api_error(code, &body, 404, &["/health", "/api/v1/sql"], path);
    }
    let (code, body) = http_post(&format!("{}/nope", c.http), b"SELECT 1").unwrap();
    assert_api_error(code, &body, 404, &[], "POST /nope");
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_write_or_read_files_are_refused() {
    let scratch = Scratch::new();
    let c = http_collector(&scratch).await;
    let copy_csv = scratch.path("copied.csv");
    let copy_parquet = scratch.path("copied.parquet");
    let view_dir = scratch.path("external");
    std::fs::create_dir(&view_dir).unwrap();
    std::fs::write(view_dir.join("secret.csv"), "a,b\n1,2\n").unwrap();

    let statements = [
        format!("COPY (SELECT 1 AS x) TO '{}'", copy_csv.display()),
        format!("COPY m TO '{}' STORED AS PARQUET", copy_parquet.display()),
        format!(
            "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{}'",
            copy_csv.display()
        ),
        format!(
            "CREATE EXTERNAL TABLE ext STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true')",
            view_dir.join("secret.csv").display()
        ),
        "CREATE TABLE t AS SELECT 1 AS x".to_owned(),
        "CREATE VIEW mv AS SELECT * FROM m".to_owned(),
        format!("INSERT INTO m (time, host, v) VALUES (to_timestamp_nanos({T0}), 'z', 9.5)"),
        "INSERT INTO m SELECT * FROM m".to_owned(),
        "DELETE FROM m".to_owned(),
        "UPDATE m SET v = 0".to_owned(),
        "DROP TABLE m".to_owned(),
        "SET datafusion.execution.batch_size = 1".to_owned(),
        "RESET datafusion.execution.batch_size".to_owned(),
        "PREPARE p AS SELECT 1".to_owned(),
        "EXPLAIN ANALYZE INSERT INTO m SELECT * FROM m".to_owned(),
        // Files cannot be read as tables either.
        format!("SELECT * FROM '{}'", view_dir.join("secret.csv").display()),
        format!(
            "SELECT * FROM 'file://{}'",
            view_dir.join("secret.csv").display()
        ),
        format!(
            "SELECT * FROM read_csv('{}')",
            view_dir.join("secret.csv").display()
        ),
    ];
    for sql in &statements {
        let (code, body) = post_sql(&c, "", sql.as_bytes());
        assert_api_error(code, &body, 400, &[], sql);
    }
    assert!(
        !copy_csv.exists(),
        "COPY must not create {}",
        copy_csv.display()
    );
    assert!(
        !copy_parquet.exists(),
        "COPY must not create {}",
        copy_parquet.display()
    );
    assert_eq!(
        file_names_under(scratch.dir.path())
            .iter()
            .filter(|n| n.starts_with("copied"))
            .count(),
        0
    );

    // The data and the catalog are unchanged.
    assert_eq!(
        c.sql("SELECT host, v FROM m"),
        vec![serde_json::json!({"host": "a", "v": 1.5})]
    );
    assert_eq!(tables(&c), ["m"]);
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_does_not_hurt_the_server() {
    let scratch = Scratch::new();
    let c = http_collector(&scratch).await;
    let addr = host_port(&c.http).to_owned();

    let inputs: Vec<&[u8]> = vec![
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"POST /api/v1/sql HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\nSELECT 1",
        b"POST /api/v1/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nSELECT 1",
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Broken\r\n\r\n",
        b"",
    ];
    let answers = tokio::task::spawn_blocking(move || {
        inputs
            .into_iter()
            .map(|bytes| {
                (
                    String::from_utf8_lossy(bytes).into_owned(),
                    raw_exchange(&addr, bytes),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (input, answer) in answers {
        let text = String::from_utf8_lossy(&answer);
        // Either a 4xx answer or a closed connection; never a 2xx or 5xx.
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.0 4"),
            "{input:?} got {text:?}"
        );
    }
    let (code, _) = http_get(&format!("{}/health", c.http)).unwrap();
    assert_eq!(code, 200);
    assert_eq!(c.count("m"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_over_the_row_or_memory_limit_are_refused_naming_the_limit() {
    let scratch = Scratch::new();
    let c = scratch.start(Some(
        "max_result_rows = 1000\nquery_memory_bytes = 1048576\n",
    ));

    let (code, body) = post_sql(&c, "", b"SELECT * FROM generate_series(1, 5000)");
    assert_api_error(code, &body, 413, &["1000", "LIMIT"], "too many result rows");
    let (code, body) = post_sql(&c, "", b"SELECT * FROM generate_series(1, 1000)");
    assert_eq!(code, 200, "exactly max_result_rows: {body}");

    let (code, body) = post_sql(
        &c,
        "",
        b"SELECT value % 1000 AS k, array_agg(value) FROM generate_series(1, 3000000) GROUP BY k",
    );
    assert_api_error(
        code,
        &body,
        503,
        &["Resources exhausted"],
        "query over the memory limit",
    );

    assert_eq!(
        c.sql("SELECT 1 AS one"),
        vec![serde_json::json!({"one": 1})]
    );
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_the_timeout_is_504_and_cut_short() {
    let scratch = Scratch::new();
    let c = scratch.start(Some("query_timeout_secs = 1\n"));

    let started = std::time::Instant::now();
    let (code, body) = post_sql(
        &c,
        "",
        b"SELECT count(*) FROM generate_series(1, 10000000000)",
    );
    assert_api_error(
        code,
        &body,
        504,
        &["1s", "query_timeout_secs"],
        "slow query",
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the timeout must cut the query short: {:?}",
        started.elapsed()
    );
    assert_eq!(
        c.sql("SELECT 1 AS one"),
        vec![serde_json::json!({"one": 1})]
    );
    health(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_max_sql_bytes_is_413_too() {
    let scratch = Scratch::new();
    let c = http_collector(&scratch).await;
    let addr = host_port(&c.http).to_owned();
    let mut request = b"POST /api/v1/sql HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        request.extend_from_slice(b"400\r\n");
        request.extend(std::iter::repeat_n(b' ', 1024));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = tokio::task::spawn_blocking(move || raw_exchange(&addr, &request))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    assert_api_error(413, body, 413, &["1024"], "chunked body");
    health(&c);
}

/// Names the model allows but SQL, Parquet or the file system might trip on, and extreme values, are stored and
/// read back exactly, before and after a flush to Parquet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_but_valid_names_and_values_are_stored_exactly() {
    let scratch = Scratch::new();
    // The year-2262 row needs the clock-skew bound off (tests/faults.rs tests the bound).
    let c = scratch.start(Some("flush_interval_secs = 1\nmax_time_skew_secs = 0\n"));
    let mut grpc = client(&c.grpc).await;
    let fields = |n: f64| {
        vec![
            field("f.g", Value::F64(n)),
            field("s p", Value::Str("str \"quoted\" ✓,\n".into())),
            field("u", Value::U64(u64::MAX)),
            field("i", Value::I64(i64::MIN)),
            field("b", Value::Bool(false)),
        ]
    };
    let first = point(
        "Cpu.Load-1",
        &[
            ("a.b", "x"),
            ("with space", "y"),
            ("ünï", "z"),
            ("quote\"d", ""),
        ],
        fields(1.0),
        0,
    );
    let last = point("Cpu.Load-1", &[("a.b", "x2")], fields(-2.0), i64::MAX);
    write_stored(&mut grpc, batch("odd", 1, vec![first, last])).await;

    let expected = serde_json::json!([
        {
            "time": "1970-01-01T00:00:00Z", "a.b": "x", "with space": "y", "ünï": "z", "quote\"d": "",
            "f.g": 1.0, "s p": "str \"quoted\" ✓,\n", "u": u64::MAX, "i": i64::MIN, "b": false
        },
        {
            "time": "2262-04-11T23:47:16.854775807Z", "a.b": "x2", "with space": null, "ünï": null, "quote\"d": null,
            "f.g": -2.0, "s p": "str \"quoted\" ✓,\n", "u": u64::MAX, "i": i64::MIN, "b": false
        }
    ]);
    let query = "SELECT * FROM \"Cpu.Load-1\" ORDER BY time";
    assert_eq!(serde_json::Value::Array(c.sql(query)), expected, "buffered");

    common::wait_until(Duration::from_secs(10), "the flush to Parquet", || {
        let h = health(&c);
        h["store"]["buffered_rows"] == 0 && h["store"]["parquet_files"] == 2
    });
    assert_eq!(
        serde_json::Value::Array(c.sql(query)),
        expected,
        "from Parquet"
    );
    let files = common::parquet_files(&scratch.data_dir());
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.starts_with(scratch.data_dir().join("data").join("Cpu.Load-1"))),
        "{files:?}"
    );
}
