//! Black-box tests of the `damselfly` command line: `damselfly sql` against a real collector in every output format,
//! its failure modes and exit codes, the help texts, and refused collector configurations.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{CollectorProc, damselfly_bin};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{AckStatus, Field, Point, Tag, WriteBatch};
use tonic::codec::CompressionEncoding;

/// 2023-11-14T22:13:20Z in nanoseconds.
const T0: i64 = 1_700_000_000_000_000_000;
const SECOND: i64 = 1_000_000_000;

/// The rows written by [`seeded_collector`], in time order: (host, v).
const ROWS: [(&str, f64); 3] = [("a", 1.5), ("b", 2.5), ("a", -3.25)];

/// A temporary directory and a collector whose store lives in `data/` below it.
struct Seeded {
    _dir: tempfile::TempDir,
    collector: CollectorProc,
}

/// Starts a collector and stores [`ROWS`] in table `m` (tag `host`, float field `v`, one second apart) through
/// the gRPC `Write` call.
fn seeded_collector() -> Seeded {
    let dir = tempfile::TempDir::new().unwrap();
    let collector = CollectorProc::start(&dir.path().join("data"), &[]);
    let points: Vec<Point> = ROWS
        .iter()
        .enumerate()
        .map(|(i, (host, v))| Point {
            measurement: "m".into(),
            tags: vec![Tag {
                key: "host".into(),
                value: (*host).into(),
            }],
            fields: vec![Field {
                key: "v".into(),
                value: Some(Value::F64(*v)),
            }],
            time_unix_nano: T0 + i as i64 * SECOND,
        })
        .collect();
    let batch = WriteBatch {
        chunks: Vec::new(),
        agent_id: "cli-test".into(),
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
            .expect("connect to the collector's gRPC port")
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd);
        client.write(batch).await.expect("Write").into_inner()
    });
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    assert_eq!(ack.points_stored, ROWS.len() as u64, "{ack:?}");
    Seeded {
        _dir: dir,
        collector,
    }
}

/// Runs `damselfly` with `args` (and `stdin`, if any); never inherits `DAMSELFLY_*` settings from the environment.
fn damselfly(args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(damselfly_bin());
    command
        .args(args)
        .env_remove("DAMSELFLY_URL")
        .env_remove("DAMSELFLY_DATA_DIR")
        .env_remove("DAMSELFLY_COLLECTOR_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = command.spawn().expect("spawn damselfly");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
        drop(pipe);
    }
    child.wait_with_output().expect("wait for damselfly")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it is wrong.
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// `damselfly sql --url <collector> <extra...>`.
fn sql(c: &CollectorProc, extra: &[&str], stdin: Option<&str>) -> Output {
    let mut args = vec!["sql", "--url", c.http.as_str()];
    args.extend_from_slice(extra);
    damselfly(&args, stdin)
}

const QUERY: &str = "SELECT host, v FROM m ORDER BY time";

// ---------------------------------------------------------------------------------------------------------------
// damselfly sql
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn sql_prints_an_aligned_table_with_a_row_count() {
    let s = seeded_collector();
    let out = sql(&s.collector, &[QUERY], None);
    assert_exit(&out, 0, "sql table");
    let text = stdout(&out);
    let expected = "\
+------+-------+
| host | v     |
+------+-------+
| a    | 1.5   |
| b    | 2.5   |
| a    | -3.25 |
+------+-------+
(3 rows)
";
    assert_eq!(text, expected);
    // Table is the default; naming it changes nothing.
    let out = sql(&s.collector, &["--format", "table", QUERY], None);
    assert_exit(&out, 0, "sql --format table");
    assert_eq!(stdout(&out), expected);

    // One row says "row"; an empty result still shows the columns.
    let out = sql(
        &s.collector,
        &["SELECT count(*) AS n, max(v) AS top FROM m"],
        None,
    );
    assert_exit(&out, 0, "sql one row");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"(1 row)"), "{text}");
    assert!(
        lines[1].contains("| n ") && lines[1].contains("| top "),
        "{text}"
    );
    assert!(
        lines[3].contains("| 3 ") && lines[3].contains("| 2.5 "),
        "{text}"
    );
    let widths: Vec<usize> = lines[..lines.len() - 1]
        .iter()
        .map(|l| l.chars().count())
        .collect();
    assert!(
        widths.windows(2).all(|w| w[0] == w[1]),
        "not aligned:\n{text}"
    );

    let out = sql(&s.collector, &["SELECT host, v FROM m WHERE v > 100"], None);
    assert_exit(&out, 0, "sql zero rows");
    let text = stdout(&out);
    assert!(text.contains("| host | v |"), "{text}");
    assert!(text.ends_with("(0 rows)\n"), "{text}");
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

#[test]
fn sql_csv_prints_a_header_then_rows() {
    let s = seeded_collector();
    let out = sql(&s.collector, &["--format", "csv", QUERY], None);
    assert_exit(&out, 0, "sql csv");
    assert_eq!(stdout(&out), "host,v\na,1.5\nb,2.5\na,-3.25\n");

    // Zero rows: the header alone.
    let out = sql(
        &s.collector,
        &["--format", "csv", "SELECT host, v FROM m WHERE v > 100"],
        None,
    );
    assert_exit(&out, 0, "sql csv zero rows");
    assert_eq!(stdout(&out), "host,v\n");
}

#[test]
fn sql_json_prints_an_array_of_row_objects() {
    let s = seeded_collector();
    let out = sql(&s.collector, &["--format", "json", QUERY], None);
    assert_exit(&out, 0, "sql json");
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    let expected: Vec<serde_json::Value> = ROWS
        .iter()
        .map(|(host, v)| serde_json::json!({"host": host, "v": v}))
        .collect();
    assert_eq!(rows, serde_json::Value::Array(expected));

    // Aggregates and time columns come through with their values.
    let out = sql(
        &s.collector,
        &[
            "--format",
            "json",
            "SELECT host, count(*) AS n, sum(v) AS total, max(time) AS last FROM m GROUP BY host ORDER BY host",
        ],
        None,
    );
    assert_exit(&out, 0, "sql json aggregate");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["host"], "a");
    assert_eq!(rows[0]["n"], 2);
    assert_eq!(rows[0]["total"], -1.75);
    assert!(
        rows[0]["last"]
            .as_str()
            .is_some_and(|t| t.starts_with("2023-11-14T22:13:22")),
        "{rows:?}"
    );
    assert_eq!(rows[1]["host"], "b");
    assert_eq!(rows[1]["n"], 1);

    // An empty result is an empty array.
    let out = sql(
        &s.collector,
        &["--format", "json", "SELECT host FROM m WHERE v > 100"],
        None,
    );
    assert_exit(&out, 0, "sql json zero rows");
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(rows, serde_json::json!([]));
}

#[test]
fn sql_reads_the_statement_from_stdin_with_a_dash() {
    let s = seeded_collector();
    let out = sql(
        &s.collector,
        &["--format", "csv", "-"],
        Some("SELECT host, v\nFROM m\nWHERE host = 'a'\nORDER BY time\n"),
    );
    assert_exit(&out, 0, "sql from stdin");
    assert_eq!(stdout(&out), "host,v\na,1.5\na,-3.25\n");

    // An empty stdin is a query error from the server, not a hang or a crash.
    let out = sql(&s.collector, &["-"], Some(""));
    assert_exit(&out, 1, "sql from empty stdin");
    let err = stderr(&out);
    assert!(
        err.starts_with("damselfly sql: 400") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn sql_query_errors_exit_1_with_the_servers_message() {
    let s = seeded_collector();

    let out = sql(&s.collector, &["SELECT * FROM no_such_table"], None);
    assert_exit(&out, 1, "unknown table");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.starts_with("damselfly sql: 400"), "{err}");
    assert!(
        err.contains("no_such_table") && err.contains("not found"),
        "{err}"
    );
    // The JSON envelope is unwrapped: the message, not {"error": ...}.
    assert!(!err.contains("{\"error\""), "{err}");

    let out = sql(&s.collector, &["--format", "json", "SELEC 1"], None);
    assert_exit(&out, 1, "syntax error");
    let err = stderr(&out);
    assert!(
        err.starts_with("damselfly sql: 400") && err.contains("SELEC"),
        "{err}"
    );

    let out = sql(&s.collector, &["DROP TABLE m"], None);
    assert_exit(&out, 1, "refused statement");
    assert!(
        stderr(&out).starts_with("damselfly sql: 400"),
        "{}",
        stderr(&out)
    );
    // ... and the table is still there.
    let out = sql(
        &s.collector,
        &["--format", "csv", "SELECT count(*) AS n FROM m"],
        None,
    );
    assert_exit(&out, 0, "count after refused DROP");
    assert_eq!(stdout(&out), "n\n3\n");
}

#[test]
fn sql_against_an_unreachable_collector_exits_1_naming_the_url() {
    // A port that was free a moment ago and has nothing listening now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);

    let out = damselfly(&["sql", "--url", &url, "--timeout", "5", "SELECT 1"], None);
    assert_exit(&out, 1, "unreachable collector");
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.starts_with("damselfly sql: "), "{err}");
    assert!(err.contains(&url), "the message should name {url}: {err}");

    // The URL may also come from the environment.
    let mut command = Command::new(damselfly_bin());
    let out = command
        .args(["sql", "--timeout", "5", "SELECT 1"])
        .env("DAMSELFLY_URL", &url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit(&out, 1, "unreachable collector from DAMSELFLY_URL");
    assert!(stderr(&out).contains(&url), "{}", stderr(&out));
}

#[test]
fn sql_usage_errors_exit_2() {
    let out = damselfly(&["sql"], None);
    assert_exit(&out, 2, "sql without a statement");
    assert!(stderr(&out).contains("<SQL>"), "{}", stderr(&out));

    let out = damselfly(&["sql", "--format", "xml", "SELECT 1"], None);
    assert_exit(&out, 2, "unknown output format");
    let err = stderr(&out);
    assert!(
        err.contains("xml") && err.contains("table") && err.contains("csv") && err.contains("json"),
        "{err}"
    );

    let out = damselfly(&["sql", "--bogus", "SELECT 1"], None);
    assert_exit(&out, 2, "unknown flag");
    assert!(stderr(&out).contains("--bogus"), "{}", stderr(&out));

    let out = damselfly(&[], None);
    assert_exit(&out, 2, "no command");

    let out = damselfly(&["frobnicate"], None);
    assert_exit(&out, 2, "unknown command");
    assert!(stderr(&out).contains("frobnicate"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------------------------
// Help
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn help_lists_the_commands_and_their_flags() {
    let out = damselfly(&["--help"], None);
    assert_exit(&out, 0, "damselfly --help");
    let text = stdout(&out);
    for word in ["up", "collector", "sql", "--help", "--version"] {
        assert!(
            text.contains(word),
            "damselfly --help should mention {word}:\n{text}"
        );
    }

    let collector_flags = [
        "--data-dir",
        "--http",
        "--grpc",
        "--config",
        "--flush-interval",
        "--wal-sync",
    ];
    let out = damselfly(&["collector", "--help"], None);
    assert_exit(&out, 0, "damselfly collector --help");
    let text = stdout(&out);
    for flag in collector_flags {
        assert!(
            text.contains(flag),
            "collector --help should list {flag}:\n{text}"
        );
    }

    let out = damselfly(&["up", "--help"], None);
    assert_exit(&out, 0, "damselfly up --help");
    let text = stdout(&out);
    for flag in collector_flags.iter().chain(&["--interval"]) {
        assert!(text.contains(flag), "up --help should list {flag}:\n{text}");
    }

    let out = damselfly(&["sql", "--help"], None);
    assert_exit(&out, 0, "damselfly sql --help");
    let text = stdout(&out);
    for word in ["--url", "--format", "--timeout", "table", "csv", "json"] {
        assert!(
            text.contains(word),
            "sql --help should mention {word}:\n{text}"
        );
    }

    let out = damselfly(&["--version"], None);
    assert_exit(&out, 0, "damselfly --version");
    assert!(stdout(&out).starts_with("damselfly "), "{}", stdout(&out));
}

// ---------------------------------------------------------------------------------------------------------------
// Refused collector configurations
// ---------------------------------------------------------------------------------------------------------------

/// Runs `damselfly collector` with a config file holding `toml` on free ports; it must exit by itself.
fn collector_with_config(toml: &str) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, toml).unwrap();
    let data = dir.path().join("data");
    let out = damselfly(
        &[
            "collector",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        None,
    );
    (out, config, dir)
}

#[test]
fn a_config_file_with_an_unknown_key_exits_2_naming_the_key() {
    let (out, config, _dir) =
        collector_with_config("max_sql_bytes = 2048\nmax_batch_pionts = 10\n");
    assert_exit(&out, 2, "unknown config key");
    let err = stderr(&out);
    assert!(
        err.contains("max_batch_pionts"),
        "the message should name the key: {err}"
    );
    assert!(
        err.contains(config.to_str().unwrap()),
        "the message should name the file: {err}"
    );
    assert!(
        !stdout(&out).contains("grpc:"),
        "the collector must not start"
    );
}

#[test]
fn invalid_collector_configurations_exit_2_naming_the_problem() {
    let cases = [
        ("max_batch_points = 0\n", "max_batch_points"),
        ("max_grpc_message_bytes = 10\n", "max_grpc_message_bytes"),
        ("flush_interval_secs = 0\n", "flush_interval_secs"),
        ("shard_id = \"a/b\"\n", "shard_id"),
        ("max_sql_bytes = \"big\"\n", "max_sql_bytes"),
        ("wal_sync = \"sometimes\"\n", "sometimes"),
        ("this is not toml\n", "collector.toml"),
    ];
    for (toml, wanted) in cases {
        let (out, _config, _dir) = collector_with_config(toml);
        assert_exit(&out, 2, toml);
        let err = stderr(&out);
        assert!(
            err.contains(wanted),
            "{toml:?}: stderr should contain {wanted:?}: {err}"
        );
    }

    // A missing config file, and a bad flag value, are refused the same way.
    let out = damselfly(
        &["collector", "--config", "/nonexistent/damselfly.toml"],
        None,
    );
    assert_exit(&out, 2, "missing config file");
    assert!(
        stderr(&out).contains("/nonexistent/damselfly.toml"),
        "{}",
        stderr(&out)
    );
    let out = damselfly(&["collector", "--grpc", "not-an-address"], None);
    assert_exit(&out, 2, "bad --grpc");
    assert!(stderr(&out).contains("not-an-address"), "{}", stderr(&out));
}
