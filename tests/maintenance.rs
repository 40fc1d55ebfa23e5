//! Maintenance, black-box: the real `damselfly collector` binary compacts, rolls up and expires partitions.
//!
//! * A compaction killed mid-way (the collector aborts at a failpoint, `DAMSELFLY_FAILPOINT`, just before or just
//!   after renaming its output) loses nothing and duplicates nothing: after a restart every row is there exactly
//!   once over SQL, the next compaction completes, and pyarrow reads every file (sorted by series then time).
//! * `POST /api/v1/admin/maintenance` builds `rollup_1m` / `rollup_1h` tables that SQL sees, and drops the
//!   partitions older than the table's retention.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{CollectorProc, Proc, damselfly_bin, http_post, parquet_files, python_with_pyarrow};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{AckStatus, Field, Point, Tag, WriteBatch};
use serde_json::{Value as Json, json};

const SEC: i64 = 1_000_000_000;
const HOUR: i64 = 3_600 * SEC;

/// The start of the hour `hours_ago` hours before now, in nanoseconds.
fn hour_start(hours_ago: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    (now / HOUR - hours_ago) * HOUR
}

/// Starts `damselfly collector` on `data_dir` with `config` (TOML) and, if given, `DAMSELFLY_FAILPOINT`. Like
/// `CollectorProc::start`, which cannot set an environment variable for the child.
fn start(data_dir: &Path, config: &str, failpoint: Option<&str>) -> CollectorProc {
    std::fs::create_dir_all(data_dir).unwrap();
    let config_path = data_dir.with_extension("toml");
    std::fs::write(&config_path, config).unwrap();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let stderr_log = data_dir.with_extension(format!("{stamp}.stderr"));
    let mut command = Command::new(damselfly_bin());
    command
        .arg("collector")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--config")
        .arg(&config_path)
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env_remove("DAMSELFLY_FAILPOINT")
        // The failpoint aborts: a core dump, if the system writes one, lands in the temporary directory.
        .current_dir(data_dir.parent().unwrap_or(data_dir))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap());
    if let Some(point) = failpoint {
        command.env("DAMSELFLY_FAILPOINT", point);
    }
    let mut child = command.spawn().expect("spawn damselfly collector");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc::adopt(child, "damselfly", stderr_log);
    // Keep draining stdout (the collector prints more), handing over the two endpoint lines.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut grpc, mut http) = (None, None);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.trim().strip_prefix("grpc: ") {
                grpc = Some(v.to_owned());
            }
            if let Some(v) = line.trim().strip_prefix("http: ") {
                http = Some(v.to_owned());
            }
            if let (Some(g), Some(h)) = (&grpc, &http) {
                let _ = tx.send((g.clone(), h.clone()));
                grpc = None;
            }
        }
    });
    let Ok((grpc, http)) = rx.recv_timeout(Duration::from_secs(60)) else {
        panic!(
            "the collector did not print its endpoints:\n{}",
            proc.stderr()
        );
    };
    let collector = CollectorProc {
        proc,
        grpc,
        http,
        pg: None,
        data_dir: data_dir.to_path_buf(),
    };
    common::wait_until(Duration::from_secs(30), "collector /health", || {
        common::http_get(&format!("{}/health", collector.http)).is_ok_and(|(c, _)| c == 200)
    });
    collector
}

fn post_json(collector: &CollectorProc, path: &str) -> Json {
    let (code, body) = http_post(&format!("{}{path}", collector.http), b"").expect(path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn point(measurement: &str, host: &str, time: i64, v: f64) -> Point {
    Point {
        measurement: measurement.into(),
        tags: vec![Tag {
            key: "host".into(),
            value: host.into(),
        }],
        fields: vec![Field {
            key: "v".into(),
            value: Some(Value::F64(v)),
        }],
        time_unix_nano: time,
    }
}

/// What the test wrote: per table, (host, time) → value.
type Expected = BTreeMap<String, BTreeMap<(String, i64), f64>>;

/// Writes `rounds` batches over gRPC, flushing after each, so every (table, hour) partition gets `rounds` files.
async fn ingest_in_rounds(collector: &CollectorProc, hours: &[i64], rounds: i64) -> Expected {
    let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
    let mut expected = Expected::new();
    for round in 0..rounds {
        let mut points = Vec::new();
        for table in ["cpu", "mem"] {
            for &hour in hours {
                for host in ["h1", "h2", "h3"] {
                    // Times interleave across rounds, so the merge really has to interleave files.
                    for k in 0..4 {
                        let time = hour + (k * rounds + round) * SEC;
                        let v = (round * 100 + k) as f64 / 4.0;
                        points.push(point(table, host, time, v));
                        expected
                            .entry(table.to_string())
                            .or_default()
                            .insert((host.to_string(), time), v);
                    }
                }
            }
        }
        let batch = WriteBatch {
            agent_id: "maint-test".into(),
            seq: round as u64 + 1,
            points,
            ..WriteBatch::default()
        };
        let ack = client.write(batch).await.unwrap().into_inner();
        assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
        let flushed = post_json(collector, "/api/v1/admin/flush");
        assert_eq!(
            flushed["files"],
            json!(2 * hours.len()),
            "one file per partition"
        );
    }
    expected
}

/// Every row of every table over SQL, exactly as written, once.
fn assert_rows_exactly_once(collector: &CollectorProc, expected: &Expected, context: &str) {
    for (table, rows) in expected {
        let got = collector.sql(&format!(
            "SELECT host, CAST(time AS BIGINT) AS t, v FROM {table} ORDER BY host, time"
        ));
        let got: Vec<(String, i64, f64)> = got
            .iter()
            .map(|r| {
                (
                    r["host"].as_str().unwrap().to_owned(),
                    r["t"].as_i64().unwrap(),
                    r["v"].as_f64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, i64, f64)> = rows
            .iter()
            .map(|((host, t), v)| (host.clone(), *t, *v))
            .collect();
        assert_eq!(got.len(), want.len(), "{context}: {table} row count");
        assert_eq!(got, want, "{context}: {table} rows");
    }
}

/// Waits for the process to exit by itself (the failpoint aborts it) and returns its status.
fn wait_for_exit(collector: &mut CollectorProc, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = collector.proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the collector did not abort at the failpoint:\n{}",
            collector.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files under `dir` whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// pyarrow reads every Parquet file of the store: rows per table directory, and each file sorted by (tags, time).
fn pyarrow_rows_per_table(data_dir: &Path, root: &str) -> BTreeMap<String, u64> {
    let python = python_with_pyarrow();
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
rows = {}
for path in sys.argv[2:]:
    t = pq.read_table(path)
    table = path[len(sys.argv[1]):].lstrip("/").split("/")[0]
    rows[table] = rows.get(table, 0) + t.num_rows
    tags = [f.name for f in t.schema if pa.types.is_dictionary(f.type)]
    cols = [t.column(n).to_pylist() for n in tags + ["time"]]
    keys = [tuple((v is not None, v) for v in row) for row in zip(*cols)]
    if keys != sorted(keys):
        sys.exit(f"{path}: not sorted by series then time")
print(json.dumps(rows))
"#;
    let base = data_dir.join(root);
    let files: Vec<PathBuf> = files_ending(&base, ".parquet");
    assert!(
        !files.is_empty(),
        "no Parquet files under {}",
        base.display()
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&base)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const CONFIG: &str = "\
flush_interval_secs = 3600
maintenance_interval_secs = 86400
compaction_min_files = 2
query_timeout_secs = 5
";

async fn a_killed_compaction_loses_nothing(failpoint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("store");
    let hours = [hour_start(3), hour_start(2)];
    let mut collector = start(&data_dir, CONFIG, Some(failpoint));
    let expected = ingest_in_rounds(&collector, &hours, 5).await;
    assert_rows_exactly_once(&collector, &expected, "before compaction");
    let before = parquet_files(&data_dir);
    assert_eq!(before.len(), 2 * 2 * 5, "{before:?}");

    // The first compaction hits the failpoint and the process aborts: the request gets no answer.
    let answer = http_post(&format!("{}/api/v1/admin/maintenance", collector.http), b"");
    assert!(
        answer.as_ref().is_err() || answer.as_ref().is_ok_and(|(code, _)| *code != 200),
        "{failpoint}: maintenance answered {answer:?}"
    );
    let status = wait_for_exit(&mut collector, Duration::from_secs(60));
    assert!(!status.success(), "{failpoint}: {status:?}");
    let stderr = collector.proc.stderr();
    assert!(stderr.contains("failpoint reached"), "{stderr}");
    let compacted = files_ending(&data_dir.join("data"), "-c.parquet");
    let temporary = files_ending(&data_dir.join("data"), ".tmp");
    match failpoint {
        // The output has its final name, and its 5 inputs are still there.
        "compaction-after-rename" => {
            assert_eq!((compacted.len(), temporary.len()), (1, 0), "{compacted:?}");
            assert_eq!(parquet_files(&data_dir).len(), 2 * 2 * 5 + 1);
        }
        _ => {
            assert_eq!((compacted.len(), temporary.len()), (0, 1), "{temporary:?}");
            assert_eq!(parquet_files(&data_dir).len(), 2 * 2 * 5);
        }
    }
    drop(collector);

    // Restart without the failpoint: start-up recovery leaves one copy of every row.
    let collector = start(&data_dir, CONFIG, None);
    assert_rows_exactly_once(&collector, &expected, "after the restart");
    assert!(files_ending(&data_dir.join("data"), ".tmp").is_empty());
    let after_restart = parquet_files(&data_dir).len();
    match failpoint {
        "compaction-after-rename" => assert_eq!(after_restart, 2 * 2 * 5 - 5 + 1),
        _ => assert_eq!(after_restart, 2 * 2 * 5),
    }

    // Now every partition compacts, and the rollups cover every row.
    let report = post_json(&collector, "/api/v1/admin/maintenance");
    assert_eq!(report["errors"], json!([]), "{report}");
    assert_eq!(report["rollups_built"], json!(4), "{report}");
    assert_rows_exactly_once(&collector, &expected, "after compaction");
    for table in ["cpu", "mem"] {
        let rolled = collector.sql(&format!(
            "SELECT sum(v_count) AS n, sum(v_sum) AS s FROM rollup_1h.{table}"
        ));
        let rows = &expected[table];
        assert_eq!(rolled[0]["n"], json!(rows.len()), "{table}");
        let sum: f64 = rows.values().sum();
        assert!(
            (rolled[0]["s"].as_f64().unwrap() - sum).abs() < 1e-6,
            "{table}"
        );
    }

    // A clean stop deletes the replaced inputs; pyarrow then reads one sorted file per partition.
    let status = collector.proc.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        parquet_files(&data_dir).len(),
        2 * 2,
        "one file per partition"
    );
    let rows = pyarrow_rows_per_table(&data_dir, "data");
    for (table, want) in &expected {
        assert_eq!(rows.get(table), Some(&(want.len() as u64)), "{table}");
    }
    pyarrow_rows_per_table(&data_dir, "rollups/1m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_killed_after_its_rename_loses_nothing() {
    a_killed_compaction_loses_nothing("compaction-after-rename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_killed_before_its_rename_loses_nothing() {
    a_killed_compaction_loses_nothing("compaction-before-rename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_are_tables_and_retention_drops_old_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("store");
    let config = format!("{CONFIG}\n[retention]\ncpu = \"2d\"\n\"rollup_1m.cpu\" = \"2d\"\n");
    let collector = start(&data_dir, &config, None);
    let old = hour_start(24 * 4);
    let recent = hour_start(1);
    let expected = ingest_in_rounds(&collector, &[old, recent], 2).await;
    let report = post_json(&collector, "/api/v1/admin/maintenance");
    assert_eq!(report["errors"], json!([]), "{report}");
    // cpu's old hour is dropped (mem keeps the 30-day default); both were compacted and rolled up first.
    assert_eq!(report["partitions_dropped"], json!(1), "{report}");

    let cpu_rows = expected["cpu"].keys().filter(|(_, t)| *t >= recent).count();
    assert_eq!(collector.count("cpu"), cpu_rows as u64);
    assert_eq!(collector.count("mem"), expected["mem"].len() as u64);
    // The hourly rollup still covers the dropped hour; the 1-minute one (2 days) was never built for it.
    let hourly = collector.sql(
        "SELECT CAST(time AS BIGINT) AS t, sum(v_count) AS n FROM rollup_1h.cpu GROUP BY time ORDER BY time",
    );
    assert_eq!(
        hourly,
        vec![json!({"t": old, "n": 24}), json!({"t": recent, "n": 24})]
    );
    let minutely = collector
        .sql("SELECT DISTINCT host FROM rollup_1m.cpu WHERE time < now() - INTERVAL '1 day'");
    assert_eq!(minutely, Vec::<Json>::new());
    // Rollup tables sit in their own schemas.
    let schemas = collector.sql(
        "SELECT DISTINCT table_schema FROM information_schema.tables WHERE table_name = 'cpu' ORDER BY 1",
    );
    assert_eq!(
        schemas,
        vec![
            json!({"table_schema": "public"}),
            json!({"table_schema": "rollup_1h"}),
            json!({"table_schema": "rollup_1m"}),
        ]
    );
    // Per series and minute: 4 points of a host fall in [hour, hour + 8 s), one minute bucket.
    let minute = collector.sql(&format!(
        "SELECT host, v_min, v_max, v_count, v_last FROM rollup_1m.cpu WHERE CAST(time AS BIGINT) = {recent} \
         ORDER BY host"
    ));
    assert_eq!(minute.len(), 3, "{minute:?}");
    let h1: Vec<f64> = expected["cpu"]
        .iter()
        .filter(|((h, t), _)| h == "h1" && *t >= recent)
        .map(|(_, v)| *v)
        .collect();
    let last = expected["cpu"]
        .iter()
        .filter(|((h, t), _)| h == "h1" && *t >= recent)
        .max_by_key(|((_, t), _)| *t)
        .map(|(_, v)| *v)
        .unwrap();
    assert_eq!(minute[0]["v_count"], json!(h1.len()));
    assert_eq!(
        minute[0]["v_min"],
        json!(h1.iter().cloned().fold(f64::INFINITY, f64::min))
    );
    assert_eq!(
        minute[0]["v_max"],
        json!(h1.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
    );
    assert_eq!(minute[0]["v_last"], json!(last));
    // A clean stop deletes what maintenance replaced or dropped: cpu keeps one (compacted) partition, whose
    // rows pyarrow reads; the old hour's directories are gone.
    let status = collector.proc.terminate();
    assert!(status.success(), "{status:?}");
    let cpu_files = files_ending(&data_dir.join("data/cpu"), ".parquet");
    assert_eq!(cpu_files.len(), 1, "{cpu_files:?}");
    let cpu_dates = std::fs::read_dir(data_dir.join("data/cpu"))
        .unwrap()
        .count();
    assert_eq!(cpu_dates, 1, "the old date directory should be removed");
    let rows = pyarrow_rows_per_table(&data_dir, "data");
    assert_eq!(rows.get("cpu"), Some(&(cpu_rows as u64)));
    assert_eq!(rows.get("mem"), Some(&(expected["mem"].len() as u64)));
}
