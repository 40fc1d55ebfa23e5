//! End to end: a real agent pushes to a real collector over gRPC; SQL over HTTP sees every measurement with the
//! agent's tags; a collector killed without a flush loses nothing acknowledged; the Parquet files it writes are
//! readable by an independent reader (pyarrow).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{CollectorProc, parquet_files, python_with_pyarrow, start_agent, wait_until};
use serde_json::Value;

const MEASUREMENTS: [&str; 5] = ["cpu", "mem", "disk", "net", "system"];

const IDENTITY: [(&str, &str); 6] = [
    ("ns_id", "ns-e2e"),
    ("mcis_id", "mcis-7"),
    ("vm_id", "vm-42"),
    ("csp", "aws"),
    ("region", "ap-northeast-2"),
    ("hostname", "e2e-host"),
];

fn agent_flags() -> Vec<&'static str> {
    vec![
        "--ns",
        "ns-e2e",
        "--mcis",
        "mcis-7",
        "--vm",
        "vm-42",
        "--csp",
        "aws",
        "--region",
        "ap-northeast-2",
        "--hostname",
        "e2e-host",
        "--agent-id",
        "agent-e2e",
    ]
}

fn wait_for_rows(collector: &CollectorProc, min_rounds: u64) {
    wait_until(Duration::from_secs(60), "rows in every measurement", || {
        MEASUREMENTS
            .iter()
            .all(|m| collector.count(m) >= min_rounds)
    });
}

fn column_types(collector: &CollectorProc, table: &str) -> Vec<(String, String)> {
    collector
        .sql(&format!(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{table}' \
             ORDER BY ordinal_position"
        ))
        .into_iter()
        .map(|r| {
            (
                r["column_name"].as_str().unwrap().to_owned(),
                r["data_type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn agent_to_collector_to_sql_has_every_measurement_with_identity_tags() {
    let dir = tempfile::tempdir().unwrap();
    let collector = CollectorProc::start(&dir.path().join("store"), &["--flush-interval", "3600"]);
    let agent = start_agent(&collector.grpc, &dir.path().join("agent"), &agent_flags());
    wait_for_rows(&collector, 2);

    let tables: BTreeSet<String> = collector
        .sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        .into_iter()
        .map(|r| r["table_name"].as_str().unwrap().to_owned())
        .collect();
    for m in MEASUREMENTS {
        assert!(tables.contains(m), "{m} missing from {tables:?}");
    }

    for m in MEASUREMENTS {
        // Every row carries the agent's identity, exactly as configured.
        let rows = collector.sql(&format!(
            "SELECT DISTINCT ns_id, mcis_id, vm_id, csp, region, hostname, agent_id FROM {m}"
        ));
        assert_eq!(rows.len(), 1, "{m}: one identity expected, got {rows:?}");
        for (key, value) in IDENTITY {
            assert_eq!(rows[0][key], value, "{m}.{key}");
        }
        assert_eq!(rows[0]["agent_id"], "agent-e2e");
        let nulls = collector.sql(&format!(
            "SELECT count(*) AS n FROM {m} WHERE ns_id IS NULL OR time IS NULL"
        ));
        assert_eq!(nulls[0]["n"], 0, "{m}: rows without identity or time");

        let types = column_types(&collector, m);
        assert_eq!(types[0].0, "time", "{m}: time comes first");
        assert!(
            types[0].1.starts_with("Timestamp(ns"),
            "{m}: time is {}",
            types[0].1
        );
    }

    // cpu: one row per core and one for the total, Telegraf field names.
    let cpus: BTreeSet<String> = collector
        .sql("SELECT DISTINCT cpu FROM cpu")
        .into_iter()
        .map(|r| r["cpu"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        cpus.contains("cpu-total") && cpus.contains("cpu0"),
        "{cpus:?}"
    );
    let cpu_columns: BTreeSet<String> = column_types(&collector, "cpu")
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    for field in ["usage_user", "usage_system", "usage_idle"] {
        assert!(
            cpu_columns.contains(field),
            "cpu.{field} missing: {cpu_columns:?}"
        );
    }
    let total = collector.sql(
        "SELECT usage_user, usage_system, usage_idle FROM cpu WHERE cpu = 'cpu-total' ORDER BY time DESC LIMIT 1",
    );
    for f in ["usage_user", "usage_system", "usage_idle"] {
        let v = total[0][f].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "cpu-total {f} = {v}");
    }

    // Per-mount disks, per-interface counters, load and uptime.
    assert!(
        !collector
            .sql("SELECT DISTINCT path FROM disk WHERE path IS NOT NULL")
            .is_empty()
    );
    let lo =
        collector.sql("SELECT bytes_recv FROM net WHERE interface = 'lo' ORDER BY time LIMIT 1");
    assert!(
        lo.is_empty() || lo[0]["bytes_recv"].is_u64(),
        "net counters are unsigned: {lo:?}"
    );
    let system = collector.sql("SELECT load1, uptime FROM system ORDER BY time DESC LIMIT 1");
    assert!(system[0]["uptime"].as_u64().unwrap() > 0, "{system:?}");
    let mem = collector.sql("SELECT total, used_percent FROM mem LIMIT 1");
    assert!(mem[0]["total"].as_u64().unwrap() > 0, "{mem:?}");

    // Timestamps are collection times: recent, and distinct rounds have distinct times.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let times = collector.sql(
        "SELECT CAST(min(time) AS BIGINT) AS lo, CAST(max(time) AS BIGINT) AS hi, count(DISTINCT time) AS n \
         FROM cpu WHERE cpu = 'cpu-total'",
    );
    let (lo, hi) = (
        times[0]["lo"].as_i64().unwrap(),
        times[0]["hi"].as_i64().unwrap(),
    );
    assert!(
        hi <= now_ns && now_ns - lo < 120_000_000_000,
        "times {lo}..{hi} vs now {now_ns}"
    );
    assert!(times[0]["n"].as_u64().unwrap() >= 2);

    assert!(agent.terminate().success());
    assert!(collector.proc.terminate().success());
}

/// Counts per measurement, as a stable fingerprint of the store's content.
fn counts(collector: &CollectorProc) -> Vec<u64> {
    MEASUREMENTS.iter().map(|m| collector.count(m)).collect()
}

#[test]
fn killed_collector_replays_its_wal_and_flushes_readable_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let collector = CollectorProc::start(&store, &["--flush-interval", "3600"]);
    let agent = start_agent(&collector.grpc, &dir.path().join("agent"), &agent_flags());
    wait_for_rows(&collector, 3);
    // Stop the agent cleanly: everything it sent was acknowledged, so the counts are final.
    assert!(agent.terminate().success());
    let before = counts(&collector);
    let cpu_before =
        collector.sql("SELECT cpu, CAST(time AS BIGINT) AS t, usage_idle FROM cpu ORDER BY cpu, t");

    // SIGKILL: no flush. Nothing is in Parquet yet; everything is only in the WAL.
    collector.proc.kill();
    assert!(
        parquet_files(&store).is_empty(),
        "no flush happened, yet: {:?}",
        parquet_files(&store)
    );

    let collector = CollectorProc::start(&store, &["--flush-interval", "3600"]);
    assert_eq!(
        counts(&collector),
        before,
        "WAL replay restores every acknowledged row"
    );
    let cpu_after =
        collector.sql("SELECT cpu, CAST(time AS BIGINT) AS t, usage_idle FROM cpu ORDER BY cpu, t");
    assert_eq!(cpu_after, cpu_before, "same rows, same values");
    let health: Value = serde_json::from_str(
        &common::http_get(&format!("{}/health", collector.http))
            .unwrap()
            .1,
    )
    .unwrap();
    assert!(
        health["store"]["wal_replayed_records"].as_u64().unwrap() > 0,
        "{health}"
    );

    // SIGTERM flushes to Parquet; restarting from files (WAL segments gone) gives the same rows, once.
    assert!(collector.proc.terminate().success());
    let files = parquet_files(&store);
    assert!(files.len() >= MEASUREMENTS.len(), "{files:?}");
    let wal_bytes: u64 = std::fs::read_dir(store.join("wal"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        wal_bytes < 64,
        "flushed WAL segments are removed (left: {wal_bytes} bytes)"
    );
    let collector = CollectorProc::start(&store, &["--flush-interval", "3600"]);
    assert_eq!(
        counts(&collector),
        before,
        "after flush + restart: no loss, no duplicates"
    );
    // Time filters prune files by their time range, and never drop a matching row.
    let in_range = collector.sql(
        "SELECT count(*) AS n FROM cpu WHERE time >= now() - interval '1 day' AND time <= now() + interval '1 day'",
    );
    assert_eq!(in_range[0]["n"].as_u64(), Some(before[0]));
    let out_of_range =
        collector.sql("SELECT count(*) AS n FROM cpu WHERE time < '2000-01-01T00:00:00Z'");
    assert_eq!(out_of_range[0]["n"], 0);
    assert!(collector.proc.terminate().success());

    // An independent reader: pyarrow reads every file; its row counts and columns agree with SQL.
    let python = python_with_pyarrow();
    let script = r#"
import json, sys, pyarrow.parquet as pq
out = {}
for path in sys.argv[1:]:
    f = pq.ParquetFile(path)
    table = f.read()
    name = path.split('/data/')[-1].split('/')[0]
    md = f.metadata
    codecs = {md.row_group(i).column(j).compression for i in range(md.num_row_groups) for j in range(md.num_columns)}
    entry = out.setdefault(name, {'rows': 0, 'codecs': [], 'columns': table.column_names, 'time_type': str(table.schema.field('time').type)})
    entry['rows'] += table.num_rows
    entry['codecs'] = sorted(set(entry['codecs']) | codecs)
    if name == 'cpu':
        t = table.column('time').cast('int64').to_pylist()
        # Sorted by series (tags in name order; one agent here, so `cpu` decides) then time.
        keys = list(zip(table.column('cpu').to_pylist(), t))
        entry['sorted'] = entry.get('sorted', True) and keys == sorted(keys)
        # A float column whose values are all short decimals is stored as DECIMAL (docs/STORAGE.md): pyarrow gives
        # exact decimal.Decimal values, and float() of one is the stored f64, bit for bit.
        idle = [None if v is None else float(v) for v in table.column('usage_idle').to_pylist()]
        rows = zip(table.column('cpu').to_pylist(), t, idle)
        entry.setdefault('cpu_rows', []).extend([list(r) for r in rows])
print(json.dumps(out))
"#;
    let output = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Value = serde_json::from_slice(&output.stdout).unwrap();
    for (m, n) in MEASUREMENTS.iter().zip(&before) {
        let entry = &read[*m];
        assert_eq!(
            entry["rows"].as_u64(),
            Some(*n),
            "{m}: pyarrow rows vs SQL count; {read}"
        );
        assert_eq!(entry["codecs"], serde_json::json!(["ZSTD"]), "{m}");
        assert_eq!(entry["time_type"], "timestamp[ns, tz=UTC]", "{m}");
        let columns: Vec<&str> = entry["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(columns[0], "time");
        for (key, _) in IDENTITY {
            assert!(
                columns.contains(&key),
                "{m}: {key} missing from {columns:?}"
            );
        }
    }
    assert_eq!(
        read["cpu"]["sorted"], true,
        "cpu rows sorted by series then time in every file"
    );
    // Value for value, the files hold what SQL showed before the crash.
    let mut from_files: Vec<(String, i64, f64)> = read["cpu"]["cpu_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_i64().unwrap(),
                r[2].as_f64().unwrap(),
            )
        })
        .collect();
    from_files.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let from_sql: Vec<(String, i64, f64)> = cpu_before
        .iter()
        .map(|r| {
            (
                r["cpu"].as_str().unwrap().to_owned(),
                r["t"].as_i64().unwrap(),
                r["usage_idle"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(from_files, from_sql);
}

#[test]
fn up_runs_collector_and_local_agent() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let up = CollectorProc::start_up(&store, &["--interval", "1"]);
    wait_for_rows(&up, 2);
    // The local agent is tagged with this machine's host name and the default namespace.
    let rows = up.sql("SELECT DISTINCT ns_id, hostname FROM cpu");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["ns_id"], "default");
    assert!(!rows[0]["hostname"].as_str().unwrap().is_empty());
    let n = up.count("cpu");
    // Ctrl-C / SIGTERM: the agent delivers, the collector flushes to Parquet, the process exits 0.
    assert!(up.proc.terminate().success());
    assert!(
        !parquet_files(&store).is_empty(),
        "shutdown flushes to Parquet"
    );
    let again = CollectorProc::start(&store, &[]);
    assert!(again.count("cpu") >= n);
    assert!(again.proc.terminate().success());
}

fn point(
    measurement: &str,
    host: &str,
    time: i64,
    fields: Vec<damselfly_proto::v1::Field>,
) -> damselfly_proto::v1::Point {
    damselfly_proto::v1::Point {
        measurement: measurement.into(),
        tags: vec![damselfly_proto::v1::Tag {
            key: "host".into(),
            value: host.into(),
        }],
        fields,
        time_unix_nano: time,
    }
}

fn f64_field(key: &str, v: f64) -> damselfly_proto::v1::Field {
    damselfly_proto::v1::Field {
        key: key.into(),
        value: Some(damselfly_proto::v1::field::Value::F64(v)),
    }
}

/// A column added after some rows reached Parquet: files and buffer are read together under the merged schema, and
/// the older rows read the new column as null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_grows_across_parquet_files_and_buffer() {
    use damselfly_proto::v1::{AckStatus, WriteBatch, ingest_client::IngestClient};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let collector = tokio::task::spawn_blocking(move || {
        CollectorProc::start(&store, &["--flush-interval", "1"])
    })
    .await
    .unwrap();
    let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
    let t0 = 1_700_000_000_000_000_000i64;
    let first = WriteBatch {
        chunks: Vec::new(),
        agent_id: "schema-test".into(),
        seq: 1,
        common_tags: vec![],
        points: vec![point("evolve", "a", t0, vec![f64_field("x", 1.0)])],
    };
    let ack = client.write(first).await.unwrap().into_inner();
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    let data_dir = collector.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(
            Duration::from_secs(20),
            "the first row in a Parquet file",
            || {
                parquet_files(&data_dir)
                    .iter()
                    .any(|p| p.to_string_lossy().contains("/evolve/"))
            },
        )
    })
    .await
    .unwrap();

    // A new tag and a new field; this row stays in the buffer (no flush is awaited).
    let mut second = point(
        "evolve",
        "b",
        t0 + 1,
        vec![f64_field("x", 2.0), f64_field("y", 20.0)],
    );
    second.tags.push(damselfly_proto::v1::Tag {
        key: "rack".into(),
        value: "r1".into(),
    });
    let ack = client
        .write(WriteBatch {
            chunks: Vec::new(),
            agent_id: "schema-test".into(),
            seq: 2,
            common_tags: vec![],
            points: vec![second],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");

    let rows = tokio::task::spawn_blocking(move || {
        let rows = collector.sql("SELECT host, rack, x, y FROM evolve ORDER BY time");
        assert!(collector.proc.terminate().success());
        rows
    })
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"host": "a", "rack": null, "x": 1.0, "y": null}),
            serde_json::json!({"host": "b", "rack": "r1", "x": 2.0, "y": 20.0}),
        ]
    );
}
