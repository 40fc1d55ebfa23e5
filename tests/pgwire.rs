//! Black-box tests of the PostgreSQL wire protocol (`--pg`): the real `psql` client (`-c`, `\dt`, `\d cpu`) and a
//! real driver (`tokio-postgres`: prepared statements with parameters, typed rows in binary format, SQLSTATEs),
//! many clients at once, and malformed messages on a raw socket, each answered with an error while the server
//! keeps serving everyone else.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{CollectorProc, http_post, pg_connect};
use tokio_postgres::error::SqlState;

/// 2023-11-14T22:13:20Z in nanoseconds.
const T0: i64 = 1_700_000_000_000_000_000;

fn start(dir: &tempfile::TempDir) -> (CollectorProc, u16) {
    let collector = CollectorProc::start(&dir.path().join("data"), &["--pg", "127.0.0.1:0"]);
    let pg = collector
        .pg
        .clone()
        .expect("the collector printed its pg: line");
    let port = pg.rsplit(':').next().unwrap().parse().unwrap();
    let body = format!(
        "cpu,host=a usage=1.5,n=3i,ok=true {}\n\
         cpu,host=b usage=2.5,n=4i,ok=false {}\n\
         cpu,host=a usage=0.5,n=5i,ok=true {}\n\
         mem,host=a used=10u {T0}\n",
        T0 + 123_456_789,
        T0 + 1_000_000_000,
        T0 + 2_000_000_000,
    );
    let (code, text) = http_post(
        &format!("{}/api/v2/write?bucket=ns1", collector.http),
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 204, "{text}");
    (collector, port)
}

/// `psql` with unaligned, tuples-only output; any user and database name is accepted.
fn psql(port: u16, command: &str) -> String {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-U", "analyst", "-d", "anything", "-X", "-A", "-t", "-c", command,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql -c {command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn psql_queries_lists_tables_and_describes_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_collector, port) = start(&dir);

    let out = psql(
        port,
        "SELECT host, usage, n, ok, time FROM cpu ORDER BY time",
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "a|1.5|3|t|2023-11-14 22:13:20.123456+00",
            "b|2.5|4|f|2023-11-14 22:13:21+00",
            "a|0.5|5|t|2023-11-14 22:13:22+00",
        ]
    );
    // UInt64 is numeric.
    assert_eq!(psql(port, "SELECT used FROM mem").trim(), "10");

    let tables = psql(port, "\\dt");
    assert_eq!(
        tables.lines().collect::<Vec<_>>(),
        ["public|cpu|table|damselfly", "public|mem|table|damselfly"]
    );
    assert_eq!(psql(port, "\\dt c*").trim(), "public|cpu|table|damselfly");

    let described = psql(port, "\\d cpu");
    let columns: Vec<&str> = described.lines().collect();
    for expected in [
        "time|timestamp with time zone||not null|",
        "host|text|||",
        "usage|double precision|||",
        "n|bigint|||",
        "ok|boolean|||",
    ] {
        assert!(columns.contains(&expected), "{expected:?} in {described}");
    }

    // An error is reported on stderr with a non-zero exit; psql itself is fine afterwards.
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-X",
            "-c",
            "SELEC 1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ERROR"));
    assert_eq!(psql(port, "SELECT count(*) FROM cpu").trim(), "3");
    // Several statements in one query string; SHOW of a session parameter.
    assert_eq!(
        psql(port, "SELECT 1; SELECT count(*) FROM mem;")
            .lines()
            .collect::<Vec<_>>(),
        ["1", "1"]
    );
    assert_eq!(psql(port, "SHOW TimeZone").trim(), "UTC");
    assert!(psql(port, "SELECT pg_catalog.version()").starts_with("PostgreSQL 16.0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn driver_prepared_statements_return_typed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (_collector, port) = tokio::task::block_in_place(|| start(&dir));
    let client = pg_connect(port).await;

    let statement = client
        .prepare("SELECT time, host, usage, n, ok FROM cpu WHERE usage > $1 ORDER BY time")
        .await
        .unwrap();
    let rows = client.query(&statement, &[&1.0f64]).await.unwrap();
    assert_eq!(rows.len(), 2);
    let time: SystemTime = rows[0].get("time");
    assert_eq!(
        time,
        SystemTime::UNIX_EPOCH + Duration::from_nanos(T0 as u64 + 123_456_000)
    );
    assert_eq!(rows[0].get::<_, String>("host"), "a");
    assert_eq!(rows[0].get::<_, f64>("usage"), 1.5);
    assert_eq!(rows[0].get::<_, i64>("n"), 3);
    assert!(rows[0].get::<_, bool>("ok"));
    assert_eq!(rows[1].get::<_, f64>("usage"), 2.5);
    // The same statement again with another value.
    let rows = client.query(&statement, &[&2.0f64]).await.unwrap();
    assert_eq!(rows.len(), 1);

    // Text, integer and timestamp parameters.
    let rows = client
        .query(
            "SELECT count(*) AS c FROM cpu WHERE host = $1 AND n >= $2 AND time >= $3",
            &[
                &"a",
                &4i64,
                &(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>("c"), 1);
    let rows = client.query("SELECT used FROM mem", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);

    // A portal read in pieces (Execute with a row limit, PortalSuspended in between).
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    let portal = tx
        .bind("SELECT n FROM cpu WHERE n >= $1 ORDER BY n", &[&3i64])
        .await
        .unwrap();
    let mut pieces = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 2).await.unwrap();
        if rows.is_empty() {
            break;
        }
        pieces.push(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>());
    }
    assert_eq!(pieces, [vec![3, 4], vec![5]]);
    tx.commit().await.unwrap();

    // Housekeeping statements drivers send are accepted.
    client
        .batch_execute("SET application_name = 'test'")
        .await
        .unwrap();
    let rows = client.simple_query("SELECT 1 AS one").await.unwrap();
    let values: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_carry_sqlstates_and_connections_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (_collector, port) = tokio::task::block_in_place(|| start(&dir));
    let first = pg_connect(port).await;
    let second = pg_connect(port).await;

    let code = |e: tokio_postgres::Error| e.code().cloned();
    let err = first.query("SELEC 1", &[]).await.unwrap_err();
    assert_eq!(code(err), Some(SqlState::SYNTAX_ERROR));
    let err = first.query("SELECT * FROM nope", &[]).await.unwrap_err();
    assert_eq!(code(err), Some(SqlState::UNDEFINED_TABLE));
    let err = first
        .simple_query("SELECT nosuch FROM cpu")
        .await
        .unwrap_err();
    assert_eq!(code(err), Some(SqlState::UNDEFINED_COLUMN));
    let err = first.simple_query("DROP TABLE cpu").await.unwrap_err();
    assert!(err.code().is_some(), "{err}");

    // Both connections still answer.
    let rows = first.query("SELECT count(*) FROM cpu", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3);
    let rows = second.query("SELECT count(*) FROM cpu", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3);

    // Many clients at once.
    let mut tasks = Vec::new();
    for i in 0..24i64 {
        tasks.push(tokio::spawn(async move {
            let client = pg_connect(port).await;
            let rows = client
                .query("SELECT count(*) FROM cpu WHERE n >= $1", &[&(3 + i % 3)])
                .await
                .unwrap();
            rows[0].get::<_, i64>(0)
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), 3 - (i as i64 % 3));
    }
}

/// Sends `bytes`, returns what the server answers before it closes the connection.
fn raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    answer
}

fn startup() -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend(b"user\0x\0\0");
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_get_an_error_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (_collector, port) = tokio::task::block_in_place(|| start(&dir));
    let bystander = pg_connect(port).await;

    let (garbage, oversized, unknown, truncated) = tokio::task::spawn_blocking(move || {
        // Not PostgreSQL at all.
        let garbage = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        // A query message claiming 2 GiB.
        let mut oversized = startup();
        oversized.extend(b"Q");
        oversized.extend(i32::MAX.to_be_bytes());
        let oversized = raw(port, &oversized);
        // A message type that does not exist.
        let mut unknown = startup();
        unknown.extend(b"@");
        unknown.extend(4i32.to_be_bytes());
        let unknown = raw(port, &unknown);
        // A Bind whose counts run past its end.
        let mut truncated = startup();
        truncated.extend(b"B");
        truncated.extend(8i32.to_be_bytes());
        truncated.extend(b"\0\0\x7f\x7f");
        truncated.extend(b"S");
        truncated.extend(4i32.to_be_bytes());
        let truncated = raw(port, &truncated);
        (garbage, oversized, unknown, truncated)
    })
    .await
    .unwrap();
    let has_error = |answer: &[u8], sqlstate: &str| {
        let text = String::from_utf8_lossy(answer);
        answer.contains(&b'E') && text.contains(&format!("C{sqlstate}\0"))
    };
    assert!(has_error(&garbage, "08P01"), "{garbage:?}");
    assert!(has_error(&oversized, "54000"), "{oversized:?}");
    assert!(has_error(&unknown, "08P01"), "{unknown:?}");
    assert!(has_error(&truncated, "08P01"), "{truncated:?}");

    let rows = bystander
        .query("SELECT count(*) FROM cpu", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3);
    let fresh = pg_connect(port).await;
    let rows = fresh.query("SELECT count(*) FROM mem", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_over_the_timeout_is_cancelled_with_57014() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "query_timeout_secs = 1\n").unwrap();
    let collector = tokio::task::block_in_place(|| {
        CollectorProc::start(
            &dir.path().join("data"),
            &["--pg", "127.0.0.1:0", "--config", config.to_str().unwrap()],
        )
    });
    let port: u16 = collector
        .pg
        .as_deref()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let client = pg_connect(port).await;
    let err = client
        .query("SELECT count(*) FROM generate_series(1, 100000000000)", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    // The connection goes on.
    let rows = client.query("SELECT 1::BIGINT", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1);
}

#[test]
fn damselfly_up_serves_the_pg_port() {
    let dir = tempfile::tempdir().unwrap();
    let up = CollectorProc::start_up(&dir.path().join("data"), &["--pg", "127.0.0.1:0"]);
    let port: u16 = up
        .pg
        .as_deref()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("damselfly up printed its pg: line");
    assert_eq!(psql(port, "SELECT 40 + 2").trim(), "42");
    // The in-process agent's first batch arrives within a few seconds; then its tables are listed.
    common::wait_until(Duration::from_secs(30), "the agent's cpu table", || {
        psql(port, "\\dt").contains("|cpu|table|")
    });
}
