//! Black-box tests of Prometheus ingest: the collector scraping a real node_exporter (`scrape_targets`), a real
//! vmagent scraping it and remote-writing to the collector, exact remote writes built here (prost + snappy, not the
//! collector's own types), and every kind of malformed remote write, each answered with its precise 4xx while the
//! collector keeps serving. Needs `prometheus-node-exporter` and `vmagent` (Debian packages
//! `prometheus-node-exporter` and `victoria-metrics`, which has vmagent); everything listens on 127.0.0.1 only.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{CollectorProc, Proc, free_port, http_get, http_request, wait_until};
use prost::Message;
use serde_json::Value as Json;

/// 2023-11-14T22:13:20Z in milliseconds.
const T0_MS: i64 = 1_700_000_000_000;
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

// Remote write 1.0's messages, written from the spec (prometheus/prompb/types.proto, remote.proto).
#[derive(Clone, PartialEq, Message)]
struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
struct Label {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct Sample {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

fn series(labels: &[(&str, &str)], samples: &[(i64, f64)]) -> TimeSeries {
    TimeSeries {
        labels: labels
            .iter()
            .map(|(n, v)| Label {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect(),
        samples: samples
            .iter()
            .map(|&(timestamp, value)| Sample { value, timestamp })
            .collect(),
    }
}

fn snappy(data: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new().compress_vec(data).unwrap()
}

const PROTOBUF: (&str, &str) = ("Content-Type", "application/x-protobuf");
const SNAPPY: (&str, &str) = ("Content-Encoding", "snappy");

/// POSTs a body to `path` of the collector; the status and the JSON body (`Null` when empty).
fn post(
    collector: &CollectorProc,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Json) {
    let url = format!("{}{path}", collector.http);
    let (code, body) = http_request("POST", &url, headers, body).unwrap();
    let json = if body.is_empty() {
        Json::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{url}: {e}: {}", String::from_utf8_lossy(&body)))
    };
    (code, json)
}

/// A remote write as Prometheus sends it.
fn remote_write(collector: &CollectorProc, query: &str, request: &WriteRequest) -> (u16, Json) {
    post(
        collector,
        &format!("/api/v1/write{query}"),
        &[
            PROTOBUF,
            SNAPPY,
            ("X-Prometheus-Remote-Write-Version", "0.1.0"),
        ],
        &snappy(&request.encode_to_vec()),
    )
}

fn start(dir: &tempfile::TempDir, config: &str) -> CollectorProc {
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, config).unwrap();
    CollectorProc::start(
        &dir.path().join("data"),
        &["--config", path.to_str().unwrap()],
    )
}

/// A system binary the test needs, or a failure saying which package has it.
fn system_binary(name: &str, package: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install the Debian package {package} (scripts/test.sh does)",
        path.display()
    );
    path
}

fn spawn(name: &'static str, bin: &Path, args: &[String], dir: &Path) -> Proc {
    let log = dir.join(format!("{name}.stderr"));
    let child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("{name}.stdout"))).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    Proc::adopt(child, name, log)
}

/// node_exporter on a free 127.0.0.1 port, answering; its `host:port`.
fn start_node_exporter(dir: &Path) -> (Proc, String) {
    let (proc, addr) = spawn_node_exporter(dir, &[]);
    wait_until(Duration::from_secs(30), "node_exporter /metrics", || {
        http_get(&format!("http://{addr}/metrics")).is_ok_and(|(code, _)| code == 200)
    });
    (proc, addr)
}

fn spawn_node_exporter(dir: &Path, extra: &[String]) -> (Proc, String) {
    let bin = system_binary("prometheus-node-exporter", "prometheus-node-exporter");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        format!("--web.listen-address={addr}"),
        // Containers have no systemd to ask; its collector would log an error every scrape.
        "--no-collector.systemd".into(),
        "--log.level=warn".into(),
    ];
    args.extend_from_slice(extra);
    (spawn("node_exporter", &bin, &args, dir), addr)
}

/// A metric's value on the exporter's own page (a series without labels).
fn exporter_value(addr: &str, metric: &str) -> f64 {
    let (_, page) = http_get(&format!("http://{addr}/metrics")).unwrap();
    let line = page
        .lines()
        .find(|l| l.split_whitespace().next() == Some(metric))
        .unwrap_or_else(|| panic!("{metric} is not on node_exporter's page"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Rows of a query, or none while the table does not exist yet.
fn try_sql(collector: &CollectorProc, sql: &str) -> Vec<Json> {
    let (code, body) =
        common::http_post(&format!("{}/api/v1/sql", collector.http), sql.as_bytes()).unwrap();
    if code != 200 {
        return Vec::new();
    }
    serde_json::from_str(&body).unwrap()
}

fn columns(collector: &CollectorProc, table: &str) -> Vec<String> {
    collector
        .sql(&format!(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND \
             table_name = '{table}' ORDER BY column_name"
        ))
        .iter()
        .map(|r| r["column_name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_collector_scrapes_node_exporter() {
    let dir = tempfile::TempDir::new().unwrap();
    let (_exporter, addr) = start_node_exporter(dir.path());
    // A second target where nothing listens: it must show as down, with `up` = 0.
    let dead = format!("127.0.0.1:{}", free_port());
    let collector = start(
        &dir,
        &format!(
            "scrape_targets = [\"http://{addr}/metrics\", \"http://{dead}/metrics\"]\n\
             pull_interval_secs = 1\npull_timeout_secs = 5\n"
        ),
    );
    wait_until(
        Duration::from_secs(30),
        "node_cpu_seconds_total rows",
        || collector.count("node_cpu_seconds_total") > 0,
    );
    let rows = collector.sql(
        "SELECT cpu, mode, instance, job, value FROM node_cpu_seconds_total ORDER BY time DESC LIMIT 100",
    );
    for row in &rows {
        assert_eq!(row["instance"], addr.as_str(), "{row}");
        assert_eq!(row["job"], "scrape", "{row}");
        assert!(!row["cpu"].as_str().unwrap().is_empty(), "{row}");
        assert!(row["value"].as_f64().unwrap() >= 0.0, "{row}");
    }
    assert!(
        rows.iter().any(|r| r["mode"] == "idle") && rows.iter().any(|r| r["mode"] == "user"),
        "{rows:?}"
    );
    assert_eq!(
        columns(&collector, "node_cpu_seconds_total"),
        ["cpu", "instance", "job", "mode", "time", "value"]
    );
    // A constant: what the exporter serves is what is stored (mixed case: the table name is quoted).
    let mem_total = exporter_value(&addr, "node_memory_MemTotal_bytes");
    let stored = collector.sql(
        "SELECT value, instance FROM \"node_memory_MemTotal_bytes\" ORDER BY time DESC LIMIT 1",
    );
    assert_eq!(stored[0]["value"].as_f64().unwrap(), mem_total);
    assert_eq!(stored[0]["instance"], addr.as_str());
    // Summaries (and histograms) stay their lines: a `quantile` (`le`) tag on the family's table, `_sum` and
    // `_count` tables of their own (the Go runtime metrics of the exporter itself).
    let buckets =
        collector.sql("SELECT count(*) AS n FROM go_gc_duration_seconds WHERE quantile = '1'");
    assert!(buckets[0]["n"].as_u64().unwrap() > 0);
    assert!(collector.count("go_gc_duration_seconds_count") > 0);

    // `up` for both targets; the dead one's health names the failure.
    wait_until(
        Duration::from_secs(30),
        "up = 0 for the dead target",
        || {
            !try_sql(
                &collector,
                &format!("SELECT value FROM up WHERE instance = '{dead}' AND value = 0"),
            )
            .is_empty()
        },
    );
    let up = collector.sql(&format!(
        "SELECT min(value) AS lo, max(value) AS hi FROM up WHERE instance = '{addr}' AND job = 'scrape'"
    ));
    assert_eq!(
        (up[0]["lo"].as_f64(), up[0]["hi"].as_f64()),
        (Some(1.0), Some(1.0))
    );
    assert!(collector.count("scrape_duration_seconds") > 0);
    let scraped = collector.sql(&format!(
        "SELECT max(value) AS n FROM scrape_samples_scraped WHERE instance = '{addr}'"
    ));
    assert!(scraped[0]["n"].as_f64().unwrap() > 100.0, "{scraped:?}");

    let (code, body) = http_get(&format!("{}/api/v1/scrape/targets", collector.http)).unwrap();
    assert_eq!(code, 200, "{body}");
    let targets: Vec<Json> = serde_json::from_str(&body).unwrap();
    assert_eq!(targets.len(), 2, "{body}");
    let live = targets
        .iter()
        .find(|t| t["instance"] == addr.as_str())
        .unwrap();
    assert_eq!(live["status"], "up", "{live}");
    assert_eq!(live["job"], "scrape");
    assert_eq!(live["consecutive_failures"], 0);
    assert!(live["samples_scraped"].as_u64().unwrap() > 100, "{live}");
    assert!(live["last_success_unix_ms"].as_u64().is_some(), "{live}");
    let down = targets
        .iter()
        .find(|t| t["instance"] == dead.as_str())
        .unwrap();
    assert_eq!(down["status"], "down", "{down}");
    assert!(
        down["consecutive_failures"].as_u64().unwrap() >= 1,
        "{down}"
    );
    let error = down["last_error"].as_str().unwrap();
    assert!(error.to_lowercase().contains("connect"), "{error}");

    // Scraped every second: the counters advance.
    let before = collector.count("node_cpu_seconds_total");
    wait_until(Duration::from_secs(20), "more scrapes", || {
        collector.count("node_cpu_seconds_total") >= before * 2
    });
}

#[test]
fn vmagent_remote_writes_node_exporter_samples() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = start(&dir, "");
    let (_exporter, addr) = start_node_exporter(dir.path());
    let vmagent = system_binary("vmagent", "victoria-metrics");
    let scrape_config = dir.path().join("scrape.yml");
    std::fs::write(
        &scrape_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: [\"{addr}\"]\n"
        ),
    )
    .unwrap();
    let tmp = dir.path().join("vmagent-data");
    let _vmagent = spawn(
        "vmagent",
        &vmagent,
        &[
            format!("-promscrape.config={}", scrape_config.display()),
            format!("-remoteWrite.url={}/api/v1/write?ns=vm", collector.http),
            format!("-remoteWrite.tmpDataPath={}", tmp.display()),
            format!("-httpListenAddr=127.0.0.1:{}", free_port()),
            "-remoteWrite.flushInterval=1s".into(),
            "-loggerLevel=WARN".into(),
        ],
        dir.path(),
    );
    wait_until(Duration::from_secs(60), "vmagent's samples", || {
        !try_sql(
            &collector,
            "SELECT 1 FROM node_cpu_seconds_total WHERE job = 'node' LIMIT 1",
        )
        .is_empty()
    });
    // Exactly the labels Prometheus would store, as tags, plus the namespace of the URL.
    assert_eq!(
        columns(&collector, "node_cpu_seconds_total"),
        ["cpu", "instance", "job", "mode", "ns_id", "time", "value"]
    );
    let rows = collector.sql("SELECT DISTINCT instance, job, ns_id FROM node_cpu_seconds_total");
    assert_eq!(
        rows,
        [serde_json::json!({"instance": addr, "job": "node", "ns_id": "vm"})]
    );
    let modes = collector.sql(
        "SELECT DISTINCT mode FROM node_cpu_seconds_total WHERE mode IN ('idle', 'system', 'user') ORDER BY mode",
    );
    assert_eq!(modes.len(), 3, "{modes:?}");
    wait_until(Duration::from_secs(30), "MemTotal and up", || {
        !try_sql(
            &collector,
            "SELECT 1 FROM \"node_memory_MemTotal_bytes\" LIMIT 1",
        )
        .is_empty()
            && !try_sql(&collector, "SELECT 1 FROM up LIMIT 1").is_empty()
    });
    let mem_total = exporter_value(&addr, "node_memory_MemTotal_bytes");
    let stored =
        collector.sql("SELECT DISTINCT instance, job, ns_id FROM \"node_memory_MemTotal_bytes\"");
    assert_eq!(
        stored,
        [serde_json::json!({"instance": addr, "job": "node", "ns_id": "vm"})]
    );
    // vmagent 1.79 carries values through VictoriaMetrics' decimal encoding (mantissa times a power of ten), which
    // can change the last digit (25276502016 arrives as 25276502016.000004); what it sends is stored bit for bit
    // (see remote_write_stores_exactly_what_was_sent).
    let values = collector.sql("SELECT DISTINCT value FROM \"node_memory_MemTotal_bytes\"");
    for row in &values {
        let value = row["value"].as_f64().unwrap();
        assert!(
            (value - mem_total).abs() <= mem_total * 1e-12,
            "{value} vs node_exporter's {mem_total}"
        );
    }
    // vmagent's own `up` series for the target.
    let up = collector.sql("SELECT DISTINCT value, job FROM up WHERE instance IS NOT NULL");
    assert_eq!(up, [serde_json::json!({"value": 1.0, "job": "node"})]);
    // Nothing vmagent sent was refused (it logs refused requests at WARN/ERROR).
    let log = std::fs::read_to_string(dir.path().join("vmagent.stderr")).unwrap();
    assert!(
        !log.contains("unexpected status code"),
        "vmagent saw errors:\n{log}"
    );
}

#[test]
fn remote_write_stores_exactly_what_was_sent() {
    let dir = tempfile::TempDir::new().unwrap();
    // A small max_batch_points: the 250-sample series is stored as three batches.
    let collector = start(&dir, "max_batch_points = 100\n");
    let steps: Vec<(i64, f64)> = (0..250)
        .map(|i| (T0_MS + i * 1000, i as f64 * 0.5))
        .collect();
    let request = WriteRequest {
        timeseries: vec![
            series(
                &[
                    ("__name__", "http_requests_total"),
                    ("job", "api"),
                    ("instance", "10.0.0.1:8080"),
                    ("code", "200"),
                ],
                &steps,
            ),
            series(
                &[
                    ("__name__", "http_requests_total"),
                    ("job", "api"),
                    ("instance", "10.0.0.1:8080"),
                    ("code", "500"),
                    // Reserved names are renamed; an empty value is no label.
                    ("value", "v"),
                    ("time", "t"),
                    ("empty", ""),
                ],
                &[
                    (T0_MS, 1.0),
                    (T0_MS + 1000, f64::NAN),
                    (T0_MS + 2000, f64::from_bits(STALE_NAN)),
                    (T0_MS + 3000, f64::INFINITY),
                ],
            ),
            series(
                &[("__name__", "job:errors:rate5m"), ("job", "api")],
                &[(T0_MS, 0.25), (T0_MS + 60_000, 0.125)],
            ),
            // A metric without labels and a sample at the epoch.
            series(&[("__name__", "lonely")], &[(0, -1.5)]),
            // Values that do not survive a trip through decimal text or a power of ten.
            series(
                &[("__name__", "awkward")],
                &[
                    (T0_MS, 0.1 + 0.2),
                    (T0_MS + 1, 25_276_502_016.0),
                    (T0_MS + 2, f64::MIN_POSITIVE),
                    (T0_MS + 3, -f64::MAX),
                    (T0_MS + 4, 1.0 / 3.0),
                ],
            ),
        ],
    };
    let (code, body) = remote_write(&collector, "?ns=team-a", &request);
    assert_eq!(code, 204, "{body}");

    let rows = collector.sql(
        "SELECT code, count(*) AS n, sum(value) AS total, min(time) AS first, max(time) AS last \
         FROM http_requests_total WHERE code = '200' GROUP BY code",
    );
    assert_eq!(rows[0]["n"], 250);
    assert_eq!(
        rows[0]["total"].as_f64().unwrap(),
        (0..250).sum::<i64>() as f64 * 0.5
    );
    assert_eq!(rows[0]["first"], "2023-11-14T22:13:20Z");
    assert_eq!(rows[0]["last"], "2023-11-14T22:17:29Z");
    assert_eq!(
        columns(&collector, "http_requests_total"),
        [
            "code",
            "instance",
            "job",
            "label_time",
            "label_value",
            "ns_id",
            "time",
            "value"
        ]
    );
    // The stale marker is dropped, NaN and +Inf are kept (CSV shows them; JSON cannot).
    let (code, csv) = common::http_post(
        &format!("{}/api/v1/sql?format=csv", collector.http),
        b"SELECT value, label_value, label_time, ns_id, instance FROM http_requests_total \
          WHERE code = '500' ORDER BY time",
    )
    .unwrap();
    assert_eq!(code, 200, "{csv}");
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            "value,label_value,label_time,ns_id,instance",
            "1.0,v,t,team-a,10.0.0.1:8080",
            "NaN,v,t,team-a,10.0.0.1:8080",
            "inf,v,t,team-a,10.0.0.1:8080",
        ]
    );
    let rate = collector.sql("SELECT value, job, ns_id FROM job_errors_rate5m ORDER BY time");
    assert_eq!(
        rate,
        [
            serde_json::json!({"value": 0.25, "job": "api", "ns_id": "team-a"}),
            serde_json::json!({"value": 0.125, "job": "api", "ns_id": "team-a"}),
        ]
    );
    let lonely = collector.sql("SELECT value, ns_id, time FROM lonely");
    assert_eq!(
        lonely,
        [serde_json::json!({"value": -1.5, "ns_id": "team-a", "time": "1970-01-01T00:00:00Z"})]
    );

    // Bit for bit, through the Arrow IPC format (JSON and CSV print decimal text).
    let (code, arrow) = http_request(
        "POST",
        &format!("{}/api/v1/sql?format=arrow", collector.http),
        &[],
        b"SELECT value FROM awkward ORDER BY time",
    )
    .unwrap();
    assert_eq!(code, 200);
    let reader = arrow::ipc::reader::StreamReader::try_new(arrow.as_slice(), None).unwrap();
    let mut values = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        values.extend(column.values().iter().map(|v| v.to_bits()));
    }
    let want = [
        0.1 + 0.2,
        25_276_502_016.0,
        f64::MIN_POSITIVE,
        -f64::MAX,
        1.0 / 3.0,
    ];
    assert_eq!(values, want.map(f64::to_bits));

    // Without ?ns there is no ns_id; an empty request stores nothing and is fine.
    let (code, body) = remote_write(
        &collector,
        "",
        &WriteRequest {
            timeseries: vec![series(&[("__name__", "no_ns")], &[(T0_MS, 7.0)])],
        },
    );
    assert_eq!(code, 204, "{body}");
    assert_eq!(columns(&collector, "no_ns"), ["time", "value"]);
    let (code, body) = remote_write(&collector, "", &WriteRequest::default());
    assert_eq!(code, 204, "{body}");
}

/// Expects `status` and an `{"error": ...}` containing `want`.
#[track_caller]
fn expect_error(answer: (u16, Json), status: u16, want: &str) {
    let (code, body) = answer;
    assert_eq!(code, status, "{body}");
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"));
    assert!(message.contains(want), "{message:?} lacks {want:?}");
}

#[test]
fn malformed_remote_writes_get_precise_errors() {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = start(&dir, "max_write_bytes = 65536\n");
    let good = WriteRequest {
        timeseries: vec![series(&[("__name__", "good"), ("k", "v")], &[(T0_MS, 1.0)])],
    };
    let good_body = snappy(&good.encode_to_vec());
    let write =
        |headers: &[(&str, &str)], body: &[u8]| post(&collector, "/api/v1/write", headers, body);

    // Not protobuf (snappy all right): a length running past the end, an end-group tag, a wrong wire type.
    for garbage in [
        &b"\x0a\xff\xff\xff\x0f"[..],
        b"this is not a protobuf",
        b"\x08\x01",
    ] {
        expect_error(
            write(&[PROTOBUF, SNAPPY], &snappy(garbage)),
            400,
            "not a remote-write 1.0 WriteRequest protobuf",
        );
    }
    // Not UTF-8 in a label value.
    let mut bad_utf8 = good.clone();
    bad_utf8.timeseries[0].labels[1].value = "\u{fffd}".into();
    let mut bytes = bad_utf8.encode_to_vec();
    let at = bytes
        .windows(3)
        .position(|w| w == "\u{fffd}".as_bytes())
        .unwrap();
    bytes[at..at + 3].copy_from_slice(b"\xff\xfe\xfd");
    expect_error(write(&[PROTOBUF, SNAPPY], &snappy(&bytes)), 400, "UTF-8");
    // Content-Encoding and Content-Type.
    expect_error(
        write(&[PROTOBUF, ("Content-Encoding", "gzip")], &good_body),
        415,
        "Content-Encoding \"gzip\" is not supported",
    );
    expect_error(write(&[PROTOBUF], &good_body), 415, "snappy is required");
    expect_error(
        write(&[("Content-Type", "application/json"), SNAPPY], &good_body),
        415,
        "application/json",
    );
    expect_error(
        write(
            &[
                (
                    "Content-Type",
                    "application/x-protobuf;proto=io.prometheus.write.v2.Request",
                ),
                SNAPPY,
            ],
            &good_body,
        ),
        415,
        "remote write 1.0",
    );
    // Not snappy: raw protobuf, the framed format, nothing at all.
    expect_error(write(&[PROTOBUF, SNAPPY], &[0xff; 40]), 400, "snappy");
    let mut framed = b"\xff\x06\x00\x00sNaPpY".to_vec();
    framed.extend_from_slice(&good_body);
    expect_error(write(&[PROTOBUF, SNAPPY], &framed), 400, "framed");
    expect_error(write(&[PROTOBUF, SNAPPY], b""), 400, "snappy");
    // Too large as sent, and once decompressed (announced in the header: refused before decompressing).
    let big = WriteRequest {
        timeseries: (0..2_000)
            .map(|i| {
                series(
                    &[("__name__", &format!("m{i}x{}", "y".repeat(40)))],
                    &[(T0_MS, i as f64)],
                )
            })
            .collect(),
    };
    let big_raw = big.encode_to_vec();
    assert!(big_raw.len() > 65_536);
    expect_error(write(&[PROTOBUF, SNAPPY], &big_raw), 413, "max_write_bytes");
    let zeros = snappy(&vec![0u8; 1 << 20]);
    assert!(zeros.len() < 65_536);
    expect_error(
        write(&[PROTOBUF, SNAPPY], &zeros),
        413,
        "decompresses to 1048576 bytes",
    );
    // Bad ns.
    expect_error(
        post(
            &collector,
            "/api/v1/write?ns=a%07b",
            &[PROTOBUF, SNAPPY],
            &good_body,
        ),
        400,
        "control characters",
    );
    expect_error(
        post(
            &collector,
            "/api/v1/write?ns=",
            &[PROTOBUF, SNAPPY],
            &good_body,
        ),
        400,
        "empty",
    );
    // Bad series: each refused with its reason, the good series of the same request stored.
    let bad_series: &[(&[(&str, &str)], &str)] = &[
        (&[("job", "x")], "no __name__ label"),
        (
            &[("__name__", "a"), ("__name__", "b")],
            "\"__name__\" appears twice",
        ),
        (&[("__name__", "m"), ("", "x")], "empty name"),
        (&[("__name__", "m"), ("a\u{1}b", "x")], "control characters"),
        (
            &[("__name__", "m"), ("k", "1"), ("k", "2")],
            "\"k\" appears twice",
        ),
        (&[("__name__", "")], "metric name is empty"),
    ];
    for (labels, want) in bad_series {
        let request = WriteRequest {
            timeseries: vec![
                series(labels, &[(T0_MS, 1.0), (T0_MS + 1, 2.0)]),
                series(
                    &[("__name__", "partial_ok"), ("case", want)],
                    &[(T0_MS, 3.0)],
                ),
            ],
        };
        expect_error(remote_write(&collector, "", &request), 400, want);
        let (_, body) = remote_write(&collector, "", &request);
        let message = body["error"].as_str().unwrap();
        assert!(
            message.starts_with("partial write: 2 of 3 samples refused, 1 stored"),
            "{message}"
        );
    }
    assert_eq!(collector.count("partial_ok"), 2 * bad_series.len() as u64);
    // A timestamp before 1970 costs that sample only; ns_id contradicting ?ns costs the series.
    let request = WriteRequest {
        timeseries: vec![
            series(&[("__name__", "early")], &[(-5, 1.0), (T0_MS, 2.0)]),
            series(&[("__name__", "other_ns"), ("ns_id", "b")], &[(T0_MS, 2.0)]),
        ],
    };
    let answer = remote_write(&collector, "?ns=a", &request);
    expect_error(answer.clone(), 400, "timestamp -5 ms is before 1970");
    expect_error(answer, 400, "contradicts the namespace");
    assert_eq!(collector.count("early"), 1);
    assert_eq!(collector.count("other_ns"), 0);
    // Wrong method.
    let (code, _) =
        http_request("GET", &format!("{}/api/v1/write", collector.http), &[], b"").unwrap();
    assert_eq!(code, 405);

    // Still serving, and a good write still works.
    expect_error(
        post(
            &collector,
            "/api/v1/write",
            &[PROTOBUF, SNAPPY],
            &snappy(b"\x0a\x05"),
        ),
        400,
        "WriteRequest",
    );
    let (code, body) = write(&[PROTOBUF, SNAPPY], &good_body);
    assert_eq!(code, 204, "{body}");
    let rows = collector.sql("SELECT k, value FROM good");
    assert_eq!(rows, [serde_json::json!({"k": "v", "value": 1.0})]);
    let (code, _) = http_get(&format!("{}/health", collector.http)).unwrap();
    assert_eq!(code, 200);
}

/// node_exporter serving HTTPS with a certificate of `damselfly certs init`: scraped over TLS by a collector that
/// trusts the deployment's CA (`scrape_ca_file`); a collector that does not trust it marks the target down and
/// says why.
#[test]
fn the_collector_scrapes_an_https_exporter() {
    let dir = tempfile::TempDir::new().unwrap();
    let certs = dir.path().join("certs");
    common::certs_init(&certs);
    let ca = certs.join("ca.pem");
    let web_config = dir.path().join("web.yml");
    std::fs::write(
        &web_config,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            certs.join("collector.pem").display(),
            certs.join("collector-key.pem").display()
        ),
    )
    .unwrap();
    let (_exporter, addr) = spawn_node_exporter(
        dir.path(),
        &[format!("--web.config.file={}", web_config.display())],
    );
    wait_until(Duration::from_secs(30), "node_exporter over HTTPS", || {
        common::https_ok(&format!("https://{addr}/metrics"), &ca)
    });

    let target = format!("scrape_targets = [\"https://{addr}/metrics\"]\npull_interval_secs = 1\n");
    let trusting = start(
        &dir,
        &format!("{target}scrape_ca_file = {:?}\n", ca.to_str().unwrap()),
    );
    wait_until(
        Duration::from_secs(30),
        "node_cpu_seconds_total rows over HTTPS",
        || trusting.count("node_cpu_seconds_total") > 0,
    );
    let rows = trusting.sql("SELECT DISTINCT instance FROM node_cpu_seconds_total");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["instance"], addr.as_str());

    let other = tempfile::TempDir::new().unwrap();
    let untrusting = start(&other, &target);
    wait_until(
        Duration::from_secs(30),
        "the target down for an unknown issuer",
        || {
            let Ok((200, body)) = http_get(&format!("{}/api/v1/scrape/targets", untrusting.http))
            else {
                return false;
            };
            let targets: Vec<Json> = serde_json::from_str(&body).unwrap();
            targets.iter().any(|t| {
                t["status"] == "down"
                    && t["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("UnknownIssuer"))
            })
        },
    );
    assert_eq!(untrusting.count("node_cpu_seconds_total"), 0);
}
