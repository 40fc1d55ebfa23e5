//! The shared store in an S3 bucket, black-box: a real S3-protocol server (`moto_server`, installed by
//! `scripts/test.sh` into the test virtualenv) on 127.0.0.1 and two `damselfly collector` shards mirroring their
//! Parquet files to one bucket.
//!
//! * A query through either shard counts every row of both.
//! * Shard `a` compacts; the replaced objects leave the bucket after `delete_grace_secs`, the output stays.
//! * An independent reader (pyarrow's S3 filesystem) reads every object under the prefix: the rows written, under
//!   `shard=<id>/data/<table>/date=.../hour=.../`.
//! * Shard `b` compacts (its inputs stay in the bucket for the grace period) and is SIGKILLed: a query through `a`
//!   still counts `b`'s rows exactly once (read from the bucket) and names `b` in `x-damselfly-partial`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{CollectorProc, Proc, free_port, http_request, python_with_pyarrow, wait_until};

const BUCKET: &str = "damselfly-test";
const PREFIX: &str = "metrics";
const KEY_ID: &str = "test-key-id";
const SECRET: &str = "test-secret";

/// `moto_server` next to the test interpreter (`DAMSELFLY_TEST_PYTHON`), else on `PATH`; `None` (skip) only when
/// neither `DAMSELFLY_TEST_PYTHON` is set nor `moto_server` is on `PATH`.
fn moto_server_bin() -> Option<PathBuf> {
    if let Ok(python) = std::env::var("DAMSELFLY_TEST_PYTHON") {
        let bin = Path::new(&python)
            .parent()
            .unwrap_or(Path::new("."))
            .join("moto_server");
        assert!(
            bin.exists(),
            "{} not found: DAMSELFLY_TEST_PYTHON is {python}, whose virtualenv lacks moto[server]; run \
             `bash scripts/test.sh`, which installs it",
            bin.display()
        );
        return Some(bin);
    }
    let found = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then(|| PathBuf::from("moto_server"))
}

fn start_moto(bin: &Path, dir: &Path) -> (Proc, String) {
    let port = free_port();
    let log = dir.join("moto.stderr");
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let proc = Proc::adopt(child, "moto_server", log);
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_until(Duration::from_secs(30), "moto_server answers", || {
        http_request("GET", &format!("{endpoint}/"), &[], b"").is_ok_and(|(code, _)| code == 200)
    });
    (proc, endpoint)
}

/// The keys under `prefix`, from the server's ListObjectsV2 (moto answers unsigned requests).
fn list_keys(endpoint: &str, prefix: &str) -> Vec<String> {
    let (code, body) = http_request(
        "GET",
        &format!("{endpoint}/{BUCKET}?list-type=2&prefix={prefix}"),
        &[],
        b"",
    )
    .unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{body}");
    body.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
        .collect()
}

struct Shard {
    id: &'static str,
    grpc: u16,
    http: u16,
}

fn start_shard(dir: &Path, me: &Shard, all: &[Shard], endpoint: &str) -> CollectorProc {
    let shards = all
        .iter()
        .map(|s| {
            format!(
                "{{ id = \"{}\", grpc_url = \"http://127.0.0.1:{}\", http_url = \"http://127.0.0.1:{}\" }}",
                s.id, s.grpc, s.http
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    // Short grace periods so the test sees deletions; automatic passes compact (2 files suffice) but build no
    // rollups (the bucket then holds exactly the raw rows the reader counts).
    let config = format!(
        "shard_id = \"{id}\"\nshards = [{shards}]\nshard_probe_interval_ms = 200\nflush_interval_secs = 3600\n\
         query_timeout_secs = 3\nrollups = false\ncompaction_min_files = 2\nmaintenance_interval_secs = {maint}\n\n\
         [shared_store]\nurl = \"s3://{BUCKET}/{PREFIX}\"\nendpoint = \"{endpoint}\"\nallow_http = true\n\
         access_key_id = \"{KEY_ID}\"\nsecret_access_key = \"{SECRET}\"\ndelete_grace_secs = 3\n\
         mirror_interval_ms = 200\n",
        id = me.id,
        // `a` compacts by itself; `b` only when asked.
        maint = if me.id == "a" { 1 } else { 3600 },
    );
    let path = dir.join(format!("{}.toml", me.id));
    std::fs::write(&path, config).unwrap();
    CollectorProc::start_at(
        &dir.join(me.id),
        &format!("127.0.0.1:{}", me.grpc),
        &format!("127.0.0.1:{}", me.http),
        &["--config", path.to_str().unwrap()],
    )
}

/// Writes `n` rows of `cpu` through the line protocol, all in one hour partition two hours ago.
fn write_rows(shard: &CollectorProc, host: &str, n: usize) {
    let hour = common::now_nanos() / 3_600_000_000_000 - 2;
    let base = hour * 3_600_000_000_000 + 60_000_000_000;
    let body: String = (0..n)
        .map(|i| {
            format!(
                "cpu,host={host} usage={}.5,i={i}i {}\n",
                i % 100,
                base + i as i64 * 1_000_000
            )
        })
        .collect();
    let (code, answer) = http_request(
        "POST",
        &format!("{}/api/v2/write?bucket=ns&precision=ns", shard.http),
        &[],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&answer));
}

fn flush(shard: &CollectorProc) {
    let (code, body) = http_request(
        "POST",
        &format!("{}/api/v1/admin/flush", shard.http),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

/// `SELECT count(*)` through a shard: (status, rows, the `x-damselfly-partial` header).
fn count_via(shard: &CollectorProc) -> (u16, u64, String) {
    let sql = "SELECT count(*) AS n FROM cpu";
    let (code, partial, body) = common::sql_with_headers(&shard.http, sql);
    assert_eq!(code, 200, "{sql}: {body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    (code, rows[0]["n"].as_u64().unwrap(), partial)
}

#[test]
fn shards_share_an_s3_bucket_and_a_dead_shards_rows_are_read_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = moto_server_bin() else {
        eprintln!(
            "skipping: moto_server not found (set DAMSELFLY_TEST_PYTHON or run `bash scripts/test.sh`)"
        );
        return;
    };
    let python = python_with_pyarrow();
    let (_moto, endpoint) = start_moto(&moto, dir.path());
    let (code, body) = http_request("PUT", &format!("{endpoint}/{BUCKET}"), &[], b"").unwrap();
    assert_eq!(
        code,
        200,
        "create bucket: {}",
        String::from_utf8_lossy(&body)
    );

    let shards = [
        Shard {
            id: "a",
            grpc: free_port(),
            http: free_port(),
        },
        Shard {
            id: "b",
            grpc: free_port(),
            http: free_port(),
        },
    ];
    let a = start_shard(dir.path(), &shards[0], &shards, &endpoint);
    let b = start_shard(dir.path(), &shards[1], &shards, &endpoint);

    // Two files per shard in one hour partition.
    write_rows(&a, "a1", 300);
    flush(&a);
    write_rows(&a, "a2", 200);
    flush(&a);
    write_rows(&b, "b1", 250);
    flush(&b);
    write_rows(&b, "b2", 150);
    flush(&b);
    let total = 900;

    // (a) Each shard counts every row; the peer's files are read from the bucket. (A shard learns which tables a
    // peer has from its probes, every 200 ms.)
    for shard in [&a, &b] {
        wait_until(
            Duration::from_secs(10),
            &format!("{total} rows through {}", shard.http),
            || count_via(shard).1 == total,
        );
        let (_, n, partial) = count_via(shard);
        assert_eq!(n, total, "count through {}", shard.http);
        assert!(partial.is_empty(), "{partial}");
    }

    // `a` compacts by itself; its two inputs leave the bucket after the grace periods, the output stays.
    let a_data = format!("{PREFIX}/shard=a/data/cpu/");
    wait_until(
        Duration::from_secs(30),
        "a's compacted file alone in the bucket",
        || {
            let keys = list_keys(&endpoint, &a_data);
            keys.len() == 1 && keys[0].ends_with("-c.parquet")
        },
    );
    assert_eq!(count_via(&b).1, total, "after a's compaction");

    // (c) An independent reader: pyarrow's S3 filesystem reads every object under the prefix.
    let script = r#"
import json, sys
import pyarrow.fs as fs, pyarrow.parquet as pq
endpoint, bucket, prefix, key, secret = sys.argv[1:6]
s3 = fs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=key, secret_key=secret, region="us-east-1")
out = {"rows": 0, "keys": []}
for info in s3.get_file_info(fs.FileSelector(f"{bucket}/{prefix}", recursive=True)):
    if info.type != fs.FileType.File:
        continue
    with s3.open_input_file(info.path) as f:
        table = pq.read_table(f)
    out["rows"] += table.num_rows
    out["keys"].append(info.path)
print(json.dumps(out))
"#;
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args([
            endpoint.trim_start_matches("http://"),
            BUCKET,
            PREFIX,
            KEY_ID,
            SECRET,
        ])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(read["rows"].as_u64(), Some(total), "{read}");
    let keys: Vec<&str> = read["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys.len(),
        3,
        "a's compacted file and b's two files: {keys:?}"
    );
    for key in &keys {
        let rest = key
            .strip_prefix(&format!("{BUCKET}/{PREFIX}/shard="))
            .unwrap_or_else(|| panic!("{key}"));
        let parts: Vec<&str> = rest.split('/').collect();
        assert!(
            parts.len() == 6
                && ["a", "b"].contains(&parts[0])
                && parts[1] == "data"
                && parts[2] == "cpu"
                && parts[3].starts_with("date=")
                && parts[4].starts_with("hour=")
                && parts[5].starts_with(&format!("{}-", parts[0]))
                && parts[5].ends_with(".parquet"),
            "{key}"
        );
    }

    // (b) `b` compacts (its inputs stay in the bucket: a query planned before may read them), then dies.
    let (code, body) = http_request(
        "POST",
        &format!("{}/api/v1/admin/maintenance", b.http),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let b_data = format!("{PREFIX}/shard=b/data/cpu/");
    wait_until(
        Duration::from_secs(30),
        "b's compacted file uploaded",
        || {
            list_keys(&endpoint, &b_data)
                .iter()
                .any(|k| k.ends_with("-c.parquet"))
        },
    );
    assert_eq!(
        list_keys(&endpoint, &b_data).len(),
        3,
        "b's inputs are still in the bucket"
    );
    b.proc.kill();
    let (_, n, partial) = count_via(&a);
    assert_eq!(
        n, total,
        "b's flushed rows, read from the bucket, counted once"
    );
    assert!(
        partial.split(',').any(|s| s.trim() == "b"),
        "x-damselfly-partial names b: {partial:?}"
    );
    assert!(a.proc.terminate().success());
}
