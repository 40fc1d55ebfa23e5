//! Tokens (issue 10): with `--auth`, nothing is written or read without a valid token; a token of namespace A can
//! neither write nor read B, over HTTP, gRPC and the PostgreSQL port; revoked tokens stop working at once; the
//! `damselfly tokens` CLI manages them; a collector refuses to listen beyond loopback with auth off.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{CollectorProc, create_token, damselfly_bin, http_request, wait_until};
use damselfly_proto::v1::{
    AckStatus, Field, Point, Tag, WriteBatch, field::Value, ingest_client::IngestClient,
};

fn tokens_cli(data_dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(damselfly_bin())
        .arg("tokens")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run damselfly tokens");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn call(method: &str, url: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "text/plain")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    let (code, body) = http_request(method, url, &headers, body.as_bytes()).expect("HTTP");
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The namespaces of the `cpu` rows the token may see, sorted (or the error).
fn namespaces_seen(http: &str, token: Option<&str>) -> Result<Vec<String>, (u16, String)> {
    let (code, body) = call(
        "POST",
        &format!("{http}/api/v1/sql"),
        token,
        "SELECT DISTINCT ns_id FROM cpu ORDER BY ns_id",
    );
    if code != 200 {
        return Err((code, body));
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    Ok(rows
        .iter()
        .map(|r| r["ns_id"].as_str().unwrap_or("<null>").to_string())
        .collect())
}

fn psql(pg: &str, password: &str, sql: &str) -> (bool, String) {
    let port = pg.rsplit(':').next().unwrap();
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-U",
            "analyst",
            "-d",
            "metrics",
        ])
        .args(["-X", "-A", "-t", "-w", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn cpu(host: &str, ns: Option<&str>, time: i64) -> Point {
    let mut tags = vec![Tag {
        key: "host".into(),
        value: host.into(),
    }];
    if let Some(ns) = ns {
        tags.push(Tag {
            key: "ns_id".into(),
            value: ns.into(),
        });
    }
    Point {
        measurement: "cpu".into(),
        tags,
        fields: vec![Field {
            key: "usage".into(),
            value: Some(Value::F64(1.0)),
        }],
        time_unix_nano: time,
    }
}

fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_namespaces_apart_on_every_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent_a = create_token(&data, "agent", &["a"]);
    let reader_a = create_token(&data, "read", &["a"]);
    let reader_all = create_token(&data, "read", &[]);
    let writer_b = create_token(&data, "write", &["b"]);
    let admin = create_token(&data, "admin", &[]);
    let (ok, listing) = tokens_cli(&data, &["list"]);
    assert!(ok, "{listing}");
    assert_eq!(listing.lines().count(), 6, "{listing}");
    for secret in [&agent_a, &reader_a, &admin] {
        let secret = secret.rsplit('_').next().unwrap();
        assert!(!listing.contains(secret), "a secret is listed");
        let file = std::fs::read_to_string(data.join("tokens.json")).unwrap();
        assert!(!file.contains(secret), "a secret is stored");
    }

    let start_data = data.clone();
    let collector = tokio::task::spawn_blocking(move || {
        CollectorProc::start(&start_data, &["--auth", "--pg", "127.0.0.1:0"])
    })
    .await
    .unwrap();
    let http = collector.http.clone();
    let t0 = 1_700_000_000_000_000_000i64;

    // HTTP writes: no token, a bad one, another namespace, a reader: refused, and nothing stored.
    let write = |bucket: &str, token: Option<&str>, line: &str| {
        call(
            "POST",
            &format!("{http}/api/v2/write?bucket={bucket}"),
            token,
            line,
        )
    };
    let line = |host: &str, i: i64| format!("cpu,host={host} usage=1 {}", t0 + i);
    assert_eq!(write("b", None, &line("x", 0)).0, 401);
    assert_eq!(write("b", Some("dfy_nope"), &line("x", 0)).0, 401);
    let (code, body) = write("a", Some(&writer_b), &line("x", 0));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("may not write namespace"), "{body}");
    assert!(body.contains("forbidden"), "{body}");
    assert_eq!(write("b", Some(&reader_all), &line("x", 0)).0, 403);
    let (code, body) = write("b", Some(&writer_b), &line("hb", 1));
    assert_eq!(code, 204, "{body}");

    // gRPC: the agent token's namespace is set on rows without one; rows claiming another are refused.
    let mut client = IngestClient::connect(collector.grpc.clone()).await.unwrap();
    let batch = |seq: u64, points: Vec<Point>| WriteBatch {
        agent_id: "agent-a".into(),
        seq,
        points,
        ..Default::default()
    };
    let status = client
        .write(authorized(batch(1, vec![cpu("ha", None, t0 + 2)]), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let ack = client
        .write(authorized(
            batch(2, vec![cpu("ha", None, t0 + 3)]),
            Some(&agent_a),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.status(), AckStatus::Stored, "{ack:?}");
    let status = client
        .write(authorized(
            batch(3, vec![cpu("ha", Some("b"), t0 + 4)]),
            Some(&agent_a),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("\"b\""), "{status:?}");
    // On the push stream a refused batch is acked REJECTED and the stream goes on.
    let stream = futures::stream::iter(vec![
        batch(4, vec![cpu("ha", Some("b"), t0 + 5)]),
        batch(5, vec![cpu("ha", Some("a"), t0 + 6)]),
    ]);
    let mut acks = client
        .push(authorized(stream, Some(&agent_a)))
        .await
        .unwrap()
        .into_inner();
    let first = acks.message().await.unwrap().unwrap();
    let second = acks.message().await.unwrap().unwrap();
    assert_eq!(first.status(), AckStatus::Rejected, "{first:?}");
    assert_eq!(second.status(), AckStatus::Stored, "{second:?}");

    // Reads: each token sees its namespaces only, inside the query.
    let http2 = http.clone();
    let (reader_a2, reader_all2, admin2) = (reader_a.clone(), reader_all.clone(), admin.clone());
    let data2 = data.clone();
    let pg = collector.pg.clone().expect("pg address");
    tokio::task::spawn_blocking(move || {
        let http = http2;
        assert_eq!(namespaces_seen(&http, None).unwrap_err().0, 401);
        assert_eq!(namespaces_seen(&http, Some(&reader_a2)).unwrap(), ["a"]);
        assert_eq!(
            namespaces_seen(&http, Some(&reader_all2)).unwrap(),
            ["a", "b"]
        );
        // Even asked for b's rows by name, or through a subquery or a join, a reader of a gets none.
        for sql in [
            "SELECT count(*) AS n FROM cpu WHERE ns_id = 'b'",
            "SELECT count(*) AS n FROM (SELECT * FROM cpu) t WHERE ns_id = 'b'",
            "SELECT count(*) AS n FROM cpu x JOIN cpu y ON x.host = y.host WHERE y.ns_id = 'b'",
        ] {
            let (code, body) = call("POST", &format!("{http}/api/v1/sql"), Some(&reader_a2), sql);
            assert_eq!(code, 200, "{sql}: {body}");
            assert!(body.contains("\"n\":0"), "{sql}: {body}");
        }
        // Endpoints that span namespaces need an unlimited token; admin endpoints an admin.
        let (code, _) = call(
            "GET",
            &format!("{http}/api/v1/agents"),
            Some(&reader_a2),
            "",
        );
        assert_eq!(code, 403);
        assert_eq!(
            call(
                "GET",
                &format!("{http}/api/v1/agents"),
                Some(&reader_all2),
                ""
            )
            .0,
            200
        );
        assert_eq!(
            call(
                "POST",
                &format!("{http}/api/v1/admin/flush"),
                Some(&reader_all2),
                ""
            )
            .0,
            403
        );
        assert_eq!(
            call(
                "POST",
                &format!("{http}/api/v1/admin/flush"),
                Some(&admin2),
                ""
            )
            .0,
            200
        );
        // /health stays open (load balancers), and says nothing about the data's namespaces.
        assert_eq!(call("GET", &format!("{http}/health"), None, "").0, 200);

        // The PostgreSQL port: the password is the token.
        let (ok, out) = psql(&pg, &reader_a2, "SELECT DISTINCT ns_id FROM cpu");
        assert!(ok, "{out}");
        assert_eq!(out.trim(), "a");
        let (ok, out) = psql(&pg, "wrong", "SELECT 1");
        assert!(!ok);
        assert!(out.contains("password authentication failed"), "{out}");

        // Revoked: refused from the next request on (the collector re-reads the file).
        let id = reader_all2.split('_').nth(1).unwrap().to_string();
        let (ok, out) = tokens_cli(&data2, &["revoke", &id]);
        assert!(ok, "{out}");
        wait_until(Duration::from_secs(10), "the revocation to apply", || {
            namespaces_seen(&http, Some(&reader_all2)).is_err_and(|(code, _)| code == 401)
        });

        // Expiring: works until its time, then is refused saying so.
        let (ok, out) = tokens_cli(
            &data2,
            &["create", "--quiet", "--role", "read", "--expires-in", "4s"],
        );
        assert!(ok, "{out}");
        let expiring = out.trim().to_string();
        assert!(namespaces_seen(&http, Some(&expiring)).is_ok());
        let (ok, listing) = tokens_cli(&data2, &["list"]);
        assert!(ok && listing.contains("EXPIRES"), "{listing}");
        let mut refusal = String::new();
        wait_until(
            Duration::from_secs(15),
            "the token to expire",
            || match namespaces_seen(&http, Some(&expiring)) {
                Err((401, body)) => {
                    refusal = body;
                    true
                }
                _ => false,
            },
        );
        assert!(refusal.contains("expired at"), "{refusal}");
        let (ok, out) = tokens_cli(
            &data2,
            &["create", "--role", "read", "--expires-in", "soon"],
        );
        assert!(
            !ok && out.contains("--expires-in: \"soon\" is not a duration"),
            "{out}"
        );
    })
    .await
    .unwrap();
    assert!(collector.proc.terminate().success());
}

#[test]
fn up_with_auth_gives_its_agent_a_token_and_refuses_exposed_ports_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_token(&data, "admin", &[]);
    let up = CollectorProc::start_up(&data, &["--auth", "--interval", "1"]);
    // The in-process agent got an agent token of its namespace and its rows arrive.
    wait_until(Duration::from_secs(30), "the local agent's rows", || {
        namespaces_seen(&up.http, Some(&admin)).is_ok_and(|ns| ns == ["default"])
    });
    assert!(namespaces_seen(&up.http, None).is_err());
    assert!(up.proc.terminate().success());

    // Beyond loopback with auth off: refused before anything listens, with the way out named.
    let out = Command::new(damselfly_bin())
        .args(["collector", "--http", "0.0.0.0:0", "--grpc", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("exposed"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 with auth and TLS off"),
        "{err}"
    );
    assert!(err.contains("--insecure"), "{err}");
}
