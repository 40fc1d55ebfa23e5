//! Black-box tests of InfluxDB line protocol ingest (`POST /api/v2/write`, `POST /write`): a real InfluxDB client
//! library (the `influxdb2` crate) writing to a real collector process, gzip bodies, partial writes, and every kind
//! of malformed request, each answered with its precise status while the collector keeps serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;

use common::{CollectorProc, http_request};
use serde_json::Value as Json;

/// 2023-11-14T22:13:20Z in nanoseconds.
const T0: i64 = 1_700_000_000_000_000_000;
const SECOND: i64 = 1_000_000_000;

fn start(dir: &tempfile::TempDir, config: &str) -> CollectorProc {
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, config).unwrap();
    CollectorProc::start(
        &dir.path().join("data"),
        &["--config", path.to_str().unwrap()],
    )
}

fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Json) {
    let (code, body) = http_request("POST", url, headers, body).unwrap();
    let json = if body.is_empty() {
        Json::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{url}: {e}: {}", String::from_utf8_lossy(&body)))
    };
    (code, json)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn influxdb2_client_writes_land_exactly() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = start(&dir, "");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use influxdb2::models::DataPoint;
        let client = influxdb2::Client::new(collector.http.clone(), "my-org", "any-token");
        let mut points = Vec::new();
        for host in 0..10 {
            for step in 0..50i64 {
                points.push(
                    DataPoint::builder("cpu")
                        .tag("host", format!("host {host}"))
                        .tag("region", "eu,west=1")
                        .field("usage_user", host as f64 + step as f64 / 100.0)
                        .field("count", step)
                        .field("up", step % 2 == 0)
                        .field("note", format!("a\\b \"{step}\""))
                        .timestamp(T0 + step * SECOND)
                        .build()
                        .unwrap(),
                );
            }
        }
        client
            .write("ns-client", futures::stream::iter(points))
            .await
            .unwrap();
    });
    let rows = collector.sql(
        "SELECT count(*) AS n, count(DISTINCT host) AS hosts, sum(count) AS counts, \
         sum(CASE WHEN up THEN 1 ELSE 0 END) AS ups, min(time) AS first, max(time) AS last \
         FROM cpu WHERE ns_id = 'ns-client'",
    );
    assert_eq!(rows[0]["n"], 500);
    assert_eq!(rows[0]["hosts"], 10);
    assert_eq!(rows[0]["counts"], 10 * (0..50).sum::<i64>());
    assert_eq!(rows[0]["ups"], 250);
    let one = collector.sql(
        "SELECT host, region, usage_user, count, up, note FROM cpu \
         WHERE host = 'host 7' AND time = arrow_cast(1700000013000000000, 'Timestamp(Nanosecond, Some(\"UTC\"))')",
    );
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0]["region"], "eu,west=1");
    assert_eq!(one[0]["usage_user"], 7.13);
    assert_eq!(one[0]["count"], 13);
    assert_eq!(one[0]["up"], false);
    assert_eq!(one[0]["note"], "a\\b \"13\"");
}

#[test]
fn v1_and_v2_endpoints_precision_gzip_and_partial_writes() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = start(&dir, "max_write_bytes = 65536\nmax_line_bytes = 1024\n");
    let v2 = |q: &str| format!("{}/api/v2/write?org=o&{q}", collector.http);
    let v1 = |q: &str| format!("{}/write?{q}", collector.http);

    // v2, seconds, gzip.
    let body = "mem,host=a used=1i,free=2.5 1700000000\nmem,host=b used=3i,free=4.5 1700000001\n";
    let (code, json) = post(
        &v2("bucket=ns1&precision=s"),
        &[("Content-Encoding", "gzip")],
        &gzip(body.as_bytes()),
    );
    assert_eq!(code, 204, "{json}");
    // v1, milliseconds.
    let (code, json) = post(
        &v1("db=ns2&precision=ms"),
        &[],
        b"mem,host=c used=5i,free=6.5 1700000002000",
    );
    assert_eq!(code, 204, "{json}");
    let rows = collector.sql("SELECT ns_id, host, used, free, time FROM mem ORDER BY host");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["ns_id"], "ns1");
    assert_eq!(rows[1]["time"], "2023-11-14T22:13:21Z");
    assert_eq!(rows[2]["ns_id"], "ns2");
    assert_eq!(rows[2]["free"], 6.5);
    assert_eq!(rows[2]["time"], "2023-11-14T22:13:22Z");

    // A partial write: good lines are kept, each bad one is named with its number and reason.
    let body = [
        "disk,path=/ used=10i 1700000000000000000",
        "disk,path=/ used=oops 1700000000000000000",
        "disk,path=/var used=11i 1700000000000000000",
        "disk,path=/x used=1.5 1700000000000000000",
        "disk,path=/y",
        "disk,path=/z used=12i 17000000000000000000000",
        "disk,path=/w used=13i,ns_id=\"x\" 1",
    ]
    .join("\n");
    let (code, json) = post(&v2("bucket=ns1"), &[], body.as_bytes());
    assert_eq!(code, 400, "{json}");
    assert_eq!(json["code"], "invalid");
    let message = json["message"].as_str().unwrap();
    assert!(
        message.starts_with("partial write: 5 of 7 lines refused, 2 stored"),
        "{message}"
    );
    assert_eq!(json["line"], 2);
    let lines: Vec<i64> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_i64().unwrap())
        .collect();
    assert_eq!(lines, vec![2, 4, 5, 6, 7], "{json}");
    let reasons: Vec<&str> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        reasons[0].contains("invalid float value \"oops\""),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("field type conflict"), "{reasons:?}");
    assert!(reasons[2].starts_with("missing fields"), "{reasons:?}");
    assert!(reasons[3].contains("out of range"), "{reasons:?}");
    assert!(reasons[4].contains("ns_id"), "{reasons:?}");
    assert_eq!(
        collector.sql("SELECT count(*) AS n, sum(used) AS s FROM disk")[0],
        serde_json::json!({"n": 2, "s": 21})
    );
    // v1 shape of the same kind of error.
    let (code, json) = post(&v1("db=ns1"), &[], b"disk,path=/ used=1.5 1");
    assert_eq!(code, 400);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("line 1: field type conflict"),
        "{json}"
    );
    // A type conflict with what is stored is per line too.
    let (code, json) = post(&v2("bucket=ns1"), &[], b"mem,host=d used=1.5 1");
    assert_eq!(code, 400);
    assert!(
        json["message"].as_str().unwrap().contains("stored")
            || json["message"].as_str().unwrap().contains("conflict"),
        "{json}"
    );
}

#[test]
fn malformed_requests_get_precise_errors_and_the_collector_keeps_serving() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = start(&dir, "max_write_bytes = 65536\nmax_line_bytes = 1024\n");
    let url = |q: &str| format!("{}/api/v2/write?{q}", collector.http);
    /// (what, url, headers, body, expected status, expected text in the message)
    type Case<'a> = (
        &'a str,
        String,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "no bucket",
            url("org=o"),
            vec![],
            b"m v=1".to_vec(),
            400,
            "bucket parameter is required",
        ),
        (
            "bad precision",
            url("bucket=b&precision=h"),
            vec![],
            b"m v=1".to_vec(),
            400,
            "precision \"h\"",
        ),
        (
            "unknown encoding",
            url("bucket=b"),
            vec![("Content-Encoding", "br")],
            b"m v=1".to_vec(),
            415,
            "Content-Encoding \"br\"",
        ),
        (
            "not gzip",
            url("bucket=b"),
            vec![("Content-Encoding", "gzip")],
            b"m v=1".to_vec(),
            400,
            "not valid gzip",
        ),
        (
            "too large",
            url("bucket=b"),
            vec![],
            vec![b'x'; 70_000],
            413,
            "max_write_bytes",
        ),
        (
            "gzip bomb",
            url("bucket=b"),
            vec![("Content-Encoding", "gzip")],
            gzip(&vec![b'#'; 1 << 20]),
            413,
            "decompresses to more than 65536",
        ),
        (
            "huge line",
            url("bucket=b"),
            vec![],
            format!("m v=\"{}\"", "y".repeat(5000)).into_bytes(),
            400,
            "max_line_bytes",
        ),
        (
            "bad escape in name",
            url("bucket=b"),
            vec![],
            b"m\\ x v=1".to_vec(),
            400,
            "measurement name",
        ),
        (
            "binary garbage",
            url("bucket=b"),
            vec![],
            vec![0xff, 0xfe, 0x00, b' ', b'=', 0x80],
            400,
            "line 1",
        ),
        (
            "bad bucket",
            url("bucket=%00"),
            vec![],
            b"m v=1".to_vec(),
            400,
            "ns_id",
        ),
    ];
    for (what, url, headers, body, status, needle) in cases {
        let (code, json) = post(&url, &headers, &body);
        assert_eq!(code, status, "{what}: {json}");
        let message = json["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {json}");
    }
    // Wrong method.
    let (code, _) = http_request("GET", &url("bucket=b"), &[], b"").unwrap();
    assert_eq!(code, 405);
    // Still serving: a good write lands.
    let (code, json) = post(&url("bucket=b"), &[], b"m v=1 1\nm v=2 2\n");
    assert_eq!(code, 204, "{json}");
    assert_eq!(collector.sql("SELECT count(*) AS n FROM m")[0]["n"], 2);
}
