//! Forwarding to a real InfluxDB v2 write endpoint: VictoriaMetrics (`victoria-metrics`, the Debian package),
//! started by the test on 127.0.0.1, takes `POST /api/v2/write`. Known points go into a real collector over gRPC;
//! they are read back through VictoriaMetrics' export API and compared value by value and timestamp by timestamp
//! (VictoriaMetrics names a field `measurement_field`, keeps tags as labels, stores milliseconds, turns booleans
//! into 1/0 and, in 1.79, string fields into 0). The collector's `GET /api/v1/forward` must count exactly what was
//! forwarded and filtered. A destination that is down (not started yet, then stopped) costs retries, never
//! ingest, and gets the points once it is up.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{CollectorProc, Proc, free_port, http_get, wait_until};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{
    AckStatus, Field, FieldColumn, Point, Series, TableChunk, Tag, WriteBatch,
};
use serde_json::Value as Json;

const VM_BIN: &str = "victoria-metrics";

/// Labels of one series (`__name__` included) → its (timestamp ms, value) samples, sorted by time.
type Samples = BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>>;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Starts VictoriaMetrics on `127.0.0.1:port` with its data in `dir`; returns once `/health` answers.
fn start_vm(dir: &Path, port: u16) -> Proc {
    let log = dir.with_extension(format!("vm.{}.stderr", now_ns()));
    let child = Command::new(VM_BIN)
        .arg(format!("-storageDataPath={}", dir.display()))
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg("-retentionPeriod=100y")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {VM_BIN} (apt-get install victoria-metrics): {e}")
        });
    let vm = Proc::adopt(child, "victoria-metrics", log);
    wait_until(Duration::from_secs(20), "VictoriaMetrics /health", || {
        http_get(&format!("http://127.0.0.1:{port}/health")).is_ok_and(|(code, _)| code == 200)
    });
    vm
}

/// Every sample of the `fwd_*` metrics VictoriaMetrics holds, after making recent writes searchable.
fn export(port: u16) -> Samples {
    let base = format!("http://127.0.0.1:{port}");
    let (code, body) = http_get(&format!("{base}/internal/force_flush")).unwrap();
    assert_eq!(code, 200, "force_flush: {body}");
    // match[]={__name__=~"fwd_.+"}
    let (code, body) = http_get(&format!(
        "{base}/api/v1/export?match%5B%5D=%7B__name__%3D~%22fwd_.%2B%22%7D"
    ))
    .unwrap();
    assert_eq!(code, 200, "export: {body}");
    let mut samples = Samples::new();
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let row: Json = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let labels = row["metric"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let values = row["values"].as_array().unwrap();
        let times = row["timestamps"].as_array().unwrap();
        assert_eq!(values.len(), times.len(), "{line}");
        let series: &mut Vec<(i64, f64)> = samples.entry(labels).or_default();
        for (t, v) in times.iter().zip(values) {
            series.push((t.as_i64().unwrap(), v.as_f64().unwrap()));
        }
        series.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    samples
}

/// Waits until VictoriaMetrics holds exactly `expected` (flushes are asynchronous there).
fn wait_for_export(port: u16, expected: &Samples) {
    let mut last = Samples::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        last = export(port);
        if &last == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let show = |s: &Samples| {
        s.iter()
            .map(|(k, v)| format!("  {k:?}: {v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    panic!(
        "VictoriaMetrics does not hold what was forwarded.\nexpected:\n{}\ngot:\n{}",
        show(expected),
        show(&last)
    );
}

/// `GET /api/v1/forward`: the only destination.
fn forward_status(collector: &CollectorProc) -> Json {
    let (code, body) = http_get(&format!("{}/api/v1/forward", collector.http)).unwrap();
    assert_eq!(code, 200, "{body}");
    let all: Vec<Json> = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(all.len(), 1, "{body}");
    all.into_iter().next().unwrap()
}

fn write_config(dir: &Path, port: u16, extra: &str) -> String {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "[[forward]]\nname = \"vm\"\nurl = \"http://127.0.0.1:{port}\"\norg = \"damselfly\"\n\
             bucket = \"test\"\nmeasurements = [\"fwd_cpu\", \"fwd_mem\"]\n{extra}"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn tag(k: &str, v: &str) -> Tag {
    Tag {
        key: k.into(),
        value: v.into(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Test data: what goes into the collector and what VictoriaMetrics should then hold.
struct Data {
    batches: Vec<WriteBatch>,
    expected: Samples,
    /// Points of the forwarded measurements, and of the filtered one.
    forwarded: u64,
    filtered: u64,
}

/// Batches of round `round` (sequence numbers and timestamps differ per round): `fwd_cpu` columnar with two
/// series, a tag value full of line protocol's special characters and a field absent in one row; `fwd_mem`
/// row-wise with unsigned, float and string fields; `fwd_secret`, which the filter keeps back. Timestamps are
/// whole milliseconds: VictoriaMetrics stores milliseconds.
fn data(round: u64, base_ms: i64) -> Data {
    let t = |i: i64| (base_ms + round as i64 * 10_000 + i * 1_000) * 1_000_000;
    let ms = |i: i64| base_ms + round as i64 * 10_000 + i * 1_000;
    let odd_path = "C:\\dir with space,x=y\\";
    let cpu = TableChunk {
        measurement: "fwd_cpu".into(),
        tag_keys: vec!["cpu".into(), "path".into()],
        series: vec![
            Series {
                tag_values: vec!["cpu0".into(), odd_path.into()],
            },
            Series {
                tag_values: vec!["cpu1".into(), "/".into()],
            },
        ],
        series_index: vec![0, 1, 0, 1, 0, 1],
        time_unix_nano: vec![t(0), t(0), t(1), t(1), t(2), t(2)],
        fields: vec![
            FieldColumn {
                key: "usage_user".into(),
                f64: vec![0.1, 99.5, 12.345678, 0.0, -3.25, 1e-7],
                ..Default::default()
            },
            FieldColumn {
                // Absent at row 3 (cpu1, t1).
                key: "usage_system".into(),
                f64: vec![1.5, 2.5, 3.5, 5.5, 6.5],
                present: vec![0b0011_0111],
                ..Default::default()
            },
            FieldColumn {
                key: "count".into(),
                i64: vec![-42, 7, 1_000_000_007, 0, 123_456_789_012, -1],
                ..Default::default()
            },
            FieldColumn {
                key: "up".into(),
                bool: vec![true, false, true, true, false, true],
                ..Default::default()
            },
        ],
    };
    let secret = TableChunk {
        measurement: "fwd_secret".into(),
        tag_keys: vec![],
        series: vec![],
        series_index: vec![],
        time_unix_nano: vec![t(0), t(1), t(2), t(3)],
        fields: vec![FieldColumn {
            key: "v".into(),
            f64: vec![1.0, 2.0, 3.0, 4.0],
            ..Default::default()
        }],
    };
    let mem = |i: i64, used: u64, free: f64| Point {
        measurement: "fwd_mem".into(),
        tags: vec![tag("vm_id", "vm-own")],
        fields: vec![
            Field {
                key: "used".into(),
                value: Some(Value::U64(used)),
            },
            Field {
                key: "free_percent".into(),
                value: Some(Value::F64(free)),
            },
            Field {
                key: "note".into(),
                value: Some(Value::Str(format!("round {round} \"quoted\" \\"))),
            },
        ],
        time_unix_nano: t(i),
    };
    let common = vec![tag("ns_id", "ns-fwd"), tag("vm_id", "vm-1")];
    let batches = vec![
        WriteBatch {
            agent_id: "agent-fwd".into(),
            seq: round * 2 + 1,
            common_tags: common.clone(),
            points: vec![],
            chunks: vec![cpu, secret],
        },
        WriteBatch {
            agent_id: "agent-fwd".into(),
            seq: round * 2 + 2,
            common_tags: common,
            points: vec![
                mem(0, 8_589_934_592, 50.0),
                mem(1, 4_294_967_296, 62.5),
                mem(2, 17_179_869_184, 0.75),
            ],
            chunks: vec![],
        },
    ];

    let mut expected = Samples::new();
    let mut put = |name: &str, tags: &[(&str, &str)], samples: Vec<(i64, f64)>| {
        let mut l = labels(tags);
        l.insert("__name__".into(), name.into());
        expected.entry(l).or_default().extend(samples);
    };
    let cpu0 = [
        ("ns_id", "ns-fwd"),
        ("vm_id", "vm-1"),
        ("cpu", "cpu0"),
        ("path", odd_path),
    ];
    let cpu1 = [
        ("ns_id", "ns-fwd"),
        ("vm_id", "vm-1"),
        ("cpu", "cpu1"),
        ("path", "/"),
    ];
    put(
        "fwd_cpu_usage_user",
        &cpu0,
        vec![(ms(0), 0.1), (ms(1), 12.345678), (ms(2), -3.25)],
    );
    put(
        "fwd_cpu_usage_user",
        &cpu1,
        vec![(ms(0), 99.5), (ms(1), 0.0), (ms(2), 1e-7)],
    );
    put(
        "fwd_cpu_usage_system",
        &cpu0,
        vec![(ms(0), 1.5), (ms(1), 3.5), (ms(2), 5.5)],
    );
    put(
        "fwd_cpu_usage_system",
        &cpu1,
        vec![(ms(0), 2.5), (ms(2), 6.5)],
    );
    put(
        "fwd_cpu_count",
        &cpu0,
        vec![
            (ms(0), -42.0),
            (ms(1), 1_000_000_007.0),
            (ms(2), 123_456_789_012.0),
        ],
    );
    put(
        "fwd_cpu_count",
        &cpu1,
        vec![(ms(0), 7.0), (ms(1), 0.0), (ms(2), -1.0)],
    );
    put(
        "fwd_cpu_up",
        &cpu0,
        vec![(ms(0), 1.0), (ms(1), 1.0), (ms(2), 0.0)],
    );
    put(
        "fwd_cpu_up",
        &cpu1,
        vec![(ms(0), 0.0), (ms(1), 1.0), (ms(2), 1.0)],
    );
    // The point's own vm_id wins over the batch's.
    let mem_tags = [("ns_id", "ns-fwd"), ("vm_id", "vm-own")];
    put(
        "fwd_mem_used",
        &mem_tags,
        vec![
            (ms(0), 8_589_934_592.0),
            (ms(1), 4_294_967_296.0),
            (ms(2), 17_179_869_184.0),
        ],
    );
    put(
        "fwd_mem_free_percent",
        &mem_tags,
        vec![(ms(0), 50.0), (ms(1), 62.5), (ms(2), 0.75)],
    );
    // VictoriaMetrics 1.79 keeps a string field as the number 0 (the lines were accepted whole); the text itself
    // is checked against a fake InfluxDB in collector/src/forward.rs's unit tests.
    put(
        "fwd_mem_note",
        &mem_tags,
        vec![(ms(0), 0.0), (ms(1), 0.0), (ms(2), 0.0)],
    );
    Data {
        batches,
        expected,
        forwarded: 6 + 3,
        filtered: 4,
    }
}

fn merge(into: &mut Samples, more: Samples) {
    for (k, v) in more {
        let series = into.entry(k).or_default();
        series.extend(v);
        series.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
}

fn write_batches(collector: &CollectorProc, batches: &[WriteBatch]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
        for batch in batches {
            let ack = client.write(batch.clone()).await.unwrap().into_inner();
            assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
        }
    });
}

/// An hour ago, in whole seconds: recent enough for every retention, old enough to be in no one's future.
fn base_ms() -> i64 {
    (now_ns() / 1_000_000_000 - 3_600) * 1_000
}

#[test]
fn forwards_exact_points_to_victoria_metrics_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _vm = start_vm(&dir.path().join("vm"), port);
    let config = write_config(dir.path(), port, "");
    let collector = CollectorProc::start(&dir.path().join("store"), &["--config", &config]);

    let status = forward_status(&collector);
    assert_eq!(status["name"], "vm");
    assert_eq!(status["status"], "idle");
    assert_eq!(status["forwarded_points"], 0);

    let data = data(0, base_ms());
    write_batches(&collector, &data.batches);
    wait_until(Duration::from_secs(20), "points forwarded", || {
        forward_status(&collector)["forwarded_points"] == data.forwarded
    });
    wait_for_export(port, &data.expected);

    let status = forward_status(&collector);
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["forwarded_points"], data.forwarded, "{status}");
    assert_eq!(status["filtered_points"], data.filtered, "{status}");
    assert_eq!(status["dropped_points"], 0, "{status}");
    assert_eq!(status["skipped_values"], 0, "{status}");
    assert_eq!(status["queued_points"], 0, "{status}");
    assert_eq!(status["failed_attempts"], 0, "{status}");
    assert!(status["last_success_unix_ms"].as_u64().unwrap() > 0);
    // The filtered measurement is stored, just not forwarded.
    assert_eq!(collector.count("fwd_secret"), 4);

    // A clean stop sends nothing more and loses nothing.
    let exit = collector.proc.terminate();
    assert!(exit.success(), "{exit:?}");
    wait_for_export(port, &data.expected);
}

#[test]
fn destination_down_costs_retries_not_ingest_and_gets_the_points_once_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let vm_dir = dir.path().join("vm");
    let config = write_config(
        dir.path(),
        port,
        "retry_initial_ms = 100\nretry_max_secs = 1\ntimeout_secs = 2\n",
    );
    let collector = CollectorProc::start(&dir.path().join("store"), &["--config", &config]);
    let base = base_ms();

    // Not started yet: writes are stored and acknowledged; the forwarder retries.
    let first = data(0, base);
    write_batches(&collector, &first.batches);
    wait_until(Duration::from_secs(10), "failed attempts", || {
        let s = forward_status(&collector);
        s["failed_attempts"].as_u64().unwrap() >= 3 && s["status"] == "retrying"
    });
    let status = forward_status(&collector);
    assert_eq!(status["queued_points"], first.forwarded, "{status}");
    assert_eq!(status["forwarded_points"], 0, "{status}");
    assert_eq!(status["dropped_points"], 0, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("onnect")),
        "{status}"
    );
    let second = data(1, base);
    write_batches(&collector, &second.batches);
    assert_eq!(collector.count("fwd_cpu"), 12);
    assert_eq!(collector.count("fwd_mem"), 6);

    // Up: the queue is delivered.
    let vm = start_vm(&vm_dir, port);
    let mut expected = first.expected;
    merge(&mut expected, second.expected);
    wait_until(Duration::from_secs(15), "the queue forwarded", || {
        forward_status(&collector)["forwarded_points"] == first.forwarded * 2
    });
    wait_for_export(port, &expected);
    let status = forward_status(&collector);
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    assert_eq!(status["dropped_points"], 0, "{status}");

    // Stopped: more retries, ingest goes on; back up (same data): everything is there.
    vm.terminate();
    let before = forward_status(&collector)["failed_attempts"]
        .as_u64()
        .unwrap();
    let third = data(2, base);
    write_batches(&collector, &third.batches);
    wait_until(Duration::from_secs(10), "retries while stopped", || {
        forward_status(&collector)["failed_attempts"]
            .as_u64()
            .unwrap()
            >= before + 2
    });
    assert_eq!(collector.count("fwd_cpu"), 18);
    let _vm = start_vm(&vm_dir, port);
    merge(&mut expected, third.expected);
    wait_until(Duration::from_secs(15), "the queue forwarded again", || {
        forward_status(&collector)["forwarded_points"] == first.forwarded * 3
    });
    wait_for_export(port, &expected);
    let status = forward_status(&collector);
    assert_eq!(status["dropped_points"], 0, "{status}");
    assert_eq!(status["filtered_points"], first.filtered * 3, "{status}");
    assert_eq!(status["queued_points"], 0, "{status}");
}
