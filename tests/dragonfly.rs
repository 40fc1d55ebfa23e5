//! The CB-Dragonfly-compatible monitoring API against a real collector: known samples for two VMs that share a
//! `vm_id` but not a namespace go in over gRPC; `GET /dragonfly/ns/{ns}/mcis/{mcis}/vm/{vm}/metric/{metric}/info`
//! must give each VM its own numbers, per bucket and criteria exactly, with every label on its own value, for all
//! six metrics, from the buffer and again from Parquet; bad requests get a 4xx naming what is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{CollectorProc, http_get, http_post, rfc3339};
use damselfly_proto::v1::field::Value as FieldValue;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{AckStatus, Field, Point, Tag, WriteBatch};
use serde_json::Value;
use tonic::codec::CompressionEncoding;

const SECOND: i64 = 1_000_000_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// Samples per VM, one every 10 s: 3 minutes.
const SAMPLES: i64 = 18;
const NAMESPACES: [&str; 2] = ["ns-a", "ns-b"];

/// The agent's cpu fields in Dragonfly's column order, with the column each becomes.
const CPU_FIELDS: [(&str, &str); 11] = [
    ("usage_percent", "cpu_utilization"),
    ("usage_system", "cpu_system"),
    ("usage_idle", "cpu_idle"),
    ("usage_iowait", "cpu_iowait"),
    ("usage_irq", "cpu_hintr"),
    ("usage_softirq", "cpu_sintr"),
    ("usage_user", "cpu_user"),
    ("usage_nice", "cpu_nice"),
    ("usage_steal", "cpu_steal"),
    ("usage_guest", "cpu_guest"),
    ("usage_guest_nice", "cpu_guest_nice"),
];

const MEM_FIELDS: [(&str, &str); 7] = [
    ("used_percent", "mem_utilization"),
    ("total", "mem_total"),
    ("used", "mem_used"),
    ("free", "mem_free"),
    ("shared", "mem_shared"),
    ("buffered", "mem_buffers"),
    ("cached", "mem_cached"),
];

/// The first sample: a minute boundary three minutes ago, so every sample is in the past and inside every window.
fn base_time() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    now / MINUTE * MINUTE - 3 * MINUTE
}

/// A gauge value: exact in binary (halves), distinct per VM (`vm` 0 or 1) and per field (`k`), varying within a
/// minute so min, max, avg and last differ. Sums of these are exact, so averages are exact too.
fn gauge(vm: usize, k: usize, i: i64) -> f64 {
    ((i * 7) % 11) as f64 * 0.5 + 100.0 * k as f64 + 5_000.0 * vm as f64
}

/// Bytes received during step `i` (from sample i-1 to i) by eth0 of VM `vm`: 1000, 2000 or 3000 (×2 for ns-b), so
/// the rate is 100, 200 or 300 B/s.
fn recv_step(vm: usize, i: i64) -> i64 {
    (i % 3 + 1) * 1_000 * (vm as i64 + 1)
}

fn tag(key: &str, value: &str) -> Tag {
    Tag {
        key: key.into(),
        value: value.into(),
    }
}

fn point(
    measurement: &str,
    tags: &[(&str, &str)],
    fields: Vec<(&str, FieldValue)>,
    t: i64,
) -> Point {
    Point {
        measurement: measurement.into(),
        tags: tags.iter().map(|(k, v)| tag(k, v)).collect(),
        fields: fields
            .into_iter()
            .map(|(k, v)| Field {
                key: k.into(),
                value: Some(v),
            })
            .collect(),
        time_unix_nano: t,
    }
}

/// Every sample of VM `vm` (namespace `NAMESPACES[vm]`, mcis-1, vm-1), as the agent would write them.
fn vm_points(vm: usize, base: i64) -> Vec<Point> {
    let mut points = Vec::new();
    let mut recv = 0i64;
    for i in 0..SAMPLES {
        let t = base + i * 10 * SECOND;
        if i > 0 {
            recv += recv_step(vm, i);
        }
        let cpu = CPU_FIELDS
            .iter()
            .enumerate()
            .map(|(k, (field, _))| (*field, FieldValue::F64(gauge(vm, k, i))))
            .collect();
        points.push(point("cpu", &[("cpu", "cpu-total")], cpu, t));
        // A core's row: must never reach the answer.
        points.push(point(
            "cpu",
            &[("cpu", "cpu0")],
            vec![("usage_percent", FieldValue::F64(-1.0))],
            t,
        ));
        for (core, mhz) in [("cpu0", 2_000), ("cpu1", 3_000)] {
            let v = FieldValue::U64((mhz + 2 * i + 1_000 * vm as i64) as u64);
            points.push(point(
                "cpufreq",
                &[("cpu", core)],
                vec![("cur_freq_mhz", v)],
                t,
            ));
        }
        let mem = MEM_FIELDS
            .iter()
            .enumerate()
            .map(|(k, (field, _))| {
                let v = gauge(vm, k, i);
                // Percent as f64, sizes as u64 (whole numbers here), like the agent.
                let v = if k == 0 {
                    FieldValue::F64(v)
                } else {
                    FieldValue::U64((v * 2.0) as u64)
                };
                (*field, v)
            })
            .collect();
        points.push(point("mem", &[], mem, t));
        // Two file systems of 2000 bytes, `/` also bind-mounted; used grows 20 per sample on each.
        let used = (500 + 20 * i + 100 * vm as i64) as u64;
        for (path, device) in [("/", "vda1"), ("/mnt/bind", "vda1"), ("/data", "vdb")] {
            let fields = vec![
                ("total", FieldValue::U64(2_000)),
                ("used", FieldValue::U64(used)),
                ("free", FieldValue::U64(2_000 - used)),
            ];
            points.push(point(
                "disk",
                &[("path", path), ("device", device)],
                fields,
                t,
            ));
        }
        // vda reads 1 KiB/s and writes 4 KiB/s, vdb reads 2 KiB/s; vda1 (a partition) repeats vda's I/O.
        for (name, read_kib, write_kib, reads) in
            [("vda", 1, 4, 5), ("vda1", 1, 4, 5), ("vdb", 2, 0, 5)]
        {
            let k = (vm as i64 + 1) * i;
            let fields = vec![
                (
                    "read_bytes",
                    FieldValue::U64((read_kib * 10 * 1024 * k) as u64),
                ),
                (
                    "write_bytes",
                    FieldValue::U64((write_kib * 10 * 1024 * k) as u64),
                ),
                ("reads", FieldValue::U64((reads * 10 * k) as u64)),
                ("writes", FieldValue::U64((10 * k) as u64)),
            ];
            points.push(point("diskio", &[("name", name)], fields, t));
        }
        // eth0 carries the traffic; lo and docker0 count it again and must be left out.
        for interface in ["eth0", "lo", "docker0"] {
            let fields = vec![
                ("bytes_recv", FieldValue::U64(recv as u64)),
                ("bytes_sent", FieldValue::U64((500 * i) as u64)),
                ("packets_recv", FieldValue::U64((10 * i) as u64)),
                ("packets_sent", FieldValue::U64((20 * i) as u64)),
            ];
            points.push(point("net", &[("interface", interface)], fields, t));
        }
    }
    let identity = [
        ("ns_id", NAMESPACES[vm]),
        ("mcis_id", "mcis-1"),
        ("vm_id", "vm-1"),
    ];
    for p in &mut points {
        p.tags.extend(identity.iter().map(|(k, v)| tag(k, v)));
    }
    points
}

fn ingest(collector: &CollectorProc, points: Vec<Point>) {
    let n = points.len() as u64;
    let batch = WriteBatch {
        chunks: Vec::new(),
        agent_id: "dragonfly-test".into(),
        seq: 1,
        common_tags: vec![],
        points,
    };
    let url = collector.grpc.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ack = runtime.block_on(async move {
        let mut client = IngestClient::connect(url)
            .await
            .unwrap()
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd);
        client.write(batch).await.unwrap().into_inner()
    });
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    assert_eq!(ack.points_stored, n, "{ack:?}");
}

/// `GET` the API; the status and the body as raw text and JSON.
fn info(
    collector: &CollectorProc,
    ns: &str,
    vm: &str,
    metric: &str,
    query: &str,
) -> (u16, String, Value) {
    let url = format!(
        "{}/dragonfly/ns/{ns}/mcis/mcis-1/vm/{vm}/metric/{metric}/info?{query}",
        collector.http
    );
    let (code, body) = http_get(&url).unwrap();
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"));
    (code, body, json)
}

fn ok(collector: &CollectorProc, ns: &str, metric: &str, query: &str) -> (String, Value) {
    let (code, body, json) = info(collector, ns, "vm-1", metric, query);
    assert_eq!(code, 200, "{metric}?{query}: {body}");
    (body, json)
}

/// The expected answer for samples `(time, value)` (None: no value at that time): per bucket, in time order.
fn expected(
    samples: &[(i64, Option<f64>)],
    period: i64,
    criteria: &str,
) -> Vec<(String, Option<f64>)> {
    let mut buckets: BTreeMap<i64, Vec<(i64, Option<f64>)>> = BTreeMap::new();
    for &(t, v) in samples {
        buckets
            .entry(t.div_euclid(period) * period)
            .or_default()
            .push((t, v));
    }
    buckets
        .into_iter()
        .map(|(start, rows)| {
            let values: Vec<f64> = rows.iter().filter_map(|(_, v)| *v).collect();
            let value = match criteria {
                "min" => values.iter().copied().reduce(f64::min),
                "max" => values.iter().copied().reduce(f64::max),
                "avg" => {
                    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
                }
                "last" => rows.iter().max_by_key(|(t, _)| *t).and_then(|(_, v)| *v),
                other => panic!("criteria {other}"),
            };
            (rfc3339(start), value.map(through_json))
        })
        .collect()
}

/// `v` as this test reads it back from a JSON body. serde_json's default float parser (no `float_roundtrip`
/// feature here) may be an ulp off; the server writes the shortest representation that round-trips, so an exact
/// f64 gives exactly the same text, and that text parses to the same value on both sides.
fn through_json(v: f64) -> f64 {
    serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap()
}

/// The answer's `(time, value of column)` pairs, from the object rows.
fn column(json: &Value, name: &str) -> Vec<(String, Option<f64>)> {
    json["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["time"].as_str().unwrap().to_owned(), row[name].as_f64()))
        .collect()
}

/// A column's expected value at sample `i`.
type PerSample<'a> = Box<dyn Fn(i64) -> f64 + 'a>;

const PERIODS: [(&str, i64, &str); 3] = [("m", MINUTE, "10m"), ("h", HOUR, "2h"), ("d", DAY, "2d")];
const CRITERIA: [&str; 4] = ["min", "max", "avg", "last"];

/// Every answer of every metric that this test checks, keyed by request, for comparing before and after a flush.
fn check_everything(collector: &CollectorProc, base: i64) -> BTreeMap<String, String> {
    let mut answers = BTreeMap::new();
    let times: Vec<i64> = (0..SAMPLES).map(|i| base + i * 10 * SECOND).collect();
    for (vm, ns) in NAMESPACES.iter().enumerate() {
        for (period, period_ns, duration) in PERIODS {
            for criteria in CRITERIA {
                let query = format!(
                    "periodType={period}&statisticsCriteria={criteria}&duration={duration}"
                );
                let at = |metric: &str| format!("{ns} {metric}?{query}");

                // cpu: every column carries its own field's numbers (each field has its own offset).
                let (body, cpu) = ok(collector, ns, "cpu", &query);
                for (k, (_, name)) in CPU_FIELDS.iter().enumerate() {
                    let samples: Vec<_> = times
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (*t, Some(gauge(vm, k, i as i64))))
                        .collect();
                    assert_eq!(
                        column(&cpu, name),
                        expected(&samples, period_ns, criteria),
                        "{} {name}",
                        at("cpu")
                    );
                }
                answers.insert(at("cpu"), body);

                // cpufreq: the mean over both cores.
                let (body, freq) = ok(collector, ns, "cpufreq", &query);
                let samples: Vec<_> = times
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (*t, Some((2_500 + 2 * i as i64 + 1_000 * vm as i64) as f64)))
                    .collect();
                assert_eq!(
                    column(&freq, "cpu_speed"),
                    expected(&samples, period_ns, criteria),
                    "{}",
                    at("cpufreq")
                );
                answers.insert(at("cpufreq"), body);

                // memory (asked for by the agent's table name, `mem`).
                let (body, mem) = ok(collector, ns, "mem", &query);
                assert_eq!(mem["name"], "memory");
                for (k, (_, name)) in MEM_FIELDS.iter().enumerate() {
                    let samples: Vec<_> = times
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            let v = gauge(vm, k, i as i64);
                            (*t, Some(if k == 0 { v } else { (v * 2.0).trunc() }))
                        })
                        .collect();
                    assert_eq!(
                        column(&mem, name),
                        expected(&samples, period_ns, criteria),
                        "{} {name}",
                        at("mem")
                    );
                }
                answers.insert(at("mem"), body);

                // network: eth0's rates only; the first sample has no predecessor, so no rate.
                let (body, net) = ok(collector, ns, "network", &query);
                let rate = |f: &dyn Fn(i64) -> f64| -> Vec<(i64, Option<f64>)> {
                    times
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (*t, (i > 0).then(|| f(i as i64))))
                        .collect()
                };
                let checks: [(&str, PerSample<'_>); 4] = [
                    ("bytes_in", Box::new(|i| recv_step(vm, i) as f64 / 10.0)),
                    ("bytes_out", Box::new(|_| 50.0)),
                    ("pkts_in", Box::new(|_| 1.0)),
                    ("pkts_out", Box::new(|_| 2.0)),
                ];
                for (name, f) in &checks {
                    assert_eq!(
                        column(&net, name),
                        expected(&rate(f), period_ns, criteria),
                        "{} {name}",
                        at("net")
                    );
                }
                answers.insert(at("network"), body);

                // diskio: whole disks only (vda + vdb), KiB/s and ops/s.
                let (body, diskio) = ok(collector, ns, "diskio", &query);
                let scale = (vm + 1) as f64;
                let io_checks = [
                    ("kb_read", 3.0 * scale),
                    ("kb_written", 4.0 * scale),
                    ("ops_read", 10.0 * scale),
                    ("ops_write", 2.0 * scale),
                ];
                for (name, per_second) in io_checks {
                    assert_eq!(
                        column(&diskio, name),
                        expected(&rate(&|_| per_second), period_ns, criteria),
                        "{} {name}",
                        at("diskio")
                    );
                }
                answers.insert(at("diskio"), body);

                // disk: space over distinct devices (the bind mount counted once) plus the I/O rates.
                let (body, disk) = ok(collector, ns, "disk", &query);
                let used = |i: i64| 2.0 * (500 + 20 * i + 100 * vm as i64) as f64;
                let space: [(&str, PerSample<'_>); 4] = [
                    (
                        "disk_utilization",
                        Box::new(move |i| 100.0 * used(i) / 4_000.0),
                    ),
                    ("disk_total", Box::new(|_| 4_000.0)),
                    ("disk_used", Box::new(used)),
                    ("disk_free", Box::new(move |i| 4_000.0 - used(i))),
                ];
                for (name, f) in &space {
                    let samples: Vec<_> = times
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (*t, Some(f(i as i64))))
                        .collect();
                    assert_eq!(
                        column(&disk, name),
                        expected(&samples, period_ns, criteria),
                        "{} {name}",
                        at("disk")
                    );
                }
                assert_eq!(
                    column(&disk, "kb_read"),
                    column(&diskio, "kb_read"),
                    "{}",
                    at("disk")
                );
                answers.insert(at("disk"), body);
            }
        }
    }
    answers
}

#[test]
fn dragonfly_monitoring_api_answers_from_sql_per_vm_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let collector = CollectorProc::start(&dir.path().join("store"), &["--flush-interval", "3600"]);
    let base = base_time();
    let mut points = vm_points(0, base);
    points.extend(vm_points(1, base));
    ingest(&collector, points);

    // Every metric, period and criteria, for both VMs: exact numbers from the buffer ...
    let from_buffer = check_everything(&collector, base);
    // ... and the same bytes once the rows are in Parquet files.
    let (code, body) = http_post(&format!("{}/api/v1/admin/flush", collector.http), b"").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!common::parquet_files(&collector.data_dir).is_empty());
    let from_files = check_everything(&collector, base);
    assert_eq!(from_buffer, from_files);

    // The shape: name, the VM's three ids, columns in Dragonfly's order, rows as objects keyed in that order.
    let (body, cpu) = ok(
        &collector,
        "ns-a",
        "cpu",
        "periodType=m&statisticsCriteria=last&duration=10m",
    );
    let columns: Vec<&str> = std::iter::once("time")
        .chain(CPU_FIELDS.iter().map(|(_, c)| *c))
        .collect();
    assert_eq!(cpu["name"], "cpu");
    assert_eq!(
        cpu["tags"],
        serde_json::json!({"nsId": "ns-a", "mcisId": "mcis-1", "vmId": "vm-1"})
    );
    assert_eq!(cpu["columns"], serde_json::json!(columns));
    assert!(
        body.starts_with(r#"{"name":"cpu","tags":{"nsId":"ns-a","mcisId":"mcis-1","vmId":"vm-1"},"columns":["time","cpu_utilization","cpu_system","#),
        "{body}"
    );
    let first_row = body
        .find(r#""values":[{"time":""#)
        .expect("rows are objects");
    let keys_in_order: Vec<usize> = columns
        .iter()
        .map(|c| body[first_row..].find(&format!("\"{c}\":")).unwrap())
        .collect();
    assert!(keys_in_order.is_sorted(), "keys follow columns: {body}");
    assert_eq!(
        cpu["values"].as_array().unwrap().len(),
        3,
        "three minutes of samples"
    );

    // format=series: InfluxDB 1.x arrays, each exactly as long as `columns` and equal to the object form.
    let (_, series) = ok(
        &collector,
        "ns-a",
        "cpu",
        "periodType=m&statisticsCriteria=last&duration=10m&format=series",
    );
    assert_eq!(series["columns"], cpu["columns"]);
    for (array, object) in series["values"]
        .as_array()
        .unwrap()
        .iter()
        .zip(cpu["values"].as_array().unwrap())
    {
        let array = array.as_array().unwrap();
        assert_eq!(array.len(), columns.len());
        for (c, v) in columns.iter().zip(array) {
            assert_eq!(&object[*c], v, "{c}");
        }
    }

    // Defaults: periodType=m, statisticsCriteria=avg, duration 1h.
    let (_, defaults) = ok(&collector, "ns-b", "cpu", "");
    let (_, explicit) = ok(
        &collector,
        "ns-b",
        "cpu",
        "periodType=m&statisticsCriteria=avg&duration=1h",
    );
    assert_eq!(defaults, explicit);

    // Errors: JSON {"error": ...}, 404 for what does not exist, 400 naming the parameter and the allowed values.
    // (path after /dragonfly/, status, what the message must say)
    let cases: [(&str, u16, &[&str]); 9] = [
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-1/metric/gpu/info",
            404,
            &[
                "unknown metric \"gpu\"",
                "cpu, cpufreq, memory (or mem), disk, diskio, network (or net)",
            ],
        ),
        (
            "ns/ns-c/mcis/mcis-1/vm/vm-1/metric/cpu/info",
            404,
            &["no cpu data", "ns \"ns-c\""],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-2/metric/net/info",
            404,
            &["no network data"],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-1/metric/cpu/info?periodType=w",
            400,
            &[
                "periodType \"w\"",
                "m (1-minute buckets), h (1 hour) or d (1 day)",
            ],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-1/metric/cpu/info?statisticsCriteria=mean",
            400,
            &["statisticsCriteria \"mean\"", "min, max, avg or last"],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-1/metric/cpu/info?duration=10",
            400,
            &["duration \"10\"", "m, h or d"],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-1/metric/cpu/info?duration=400d&periodType=d",
            400,
            &["duration \"400d\"", "366d"],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm-1/metric/cpu/info?duration=30d",
            400,
            &["43200 buckets", "10080"],
        ),
        (
            "ns/ns-a/mcis/mcis-1/vm/vm%27%20OR%20%271%27%3D%271/metric/cpu/info",
            400,
            &["vm \"vm' OR '1'='1\" is not a valid id"],
        ),
    ];
    for (path, status, needles) in cases {
        let (code, body) = http_get(&format!("{}/dragonfly/{path}", collector.http)).unwrap();
        assert_eq!(code, status, "{path}: {body}");
        let json: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        let message = json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {body}"));
        for needle in needles {
            assert!(
                message.contains(needle),
                "{path}: {message:?} lacks {needle:?}"
            );
        }
    }
}
