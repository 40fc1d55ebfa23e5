//! Every benchmark with a short time limit: unit, positive value, limit respected; the request checks and the
//! load refusal; rtt against local listeners.

use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::*;

/// Each benchmark's limit in these tests.
const LIMIT: Duration = Duration::from_millis(200);
/// What a benchmark may take past its limit: the last chunk of work, a final fsync, a loaded test machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A forced request for `kinds` with the test limit and a 4 MiB file in `dir`.
fn request(kinds: &[BenchKind], dir: &std::path::Path) -> BenchRequest {
    BenchRequest {
        kinds: kinds.to_vec(),
        time_limit: LIMIT,
        fio_file_bytes: 4 << 20,
        work_dir: dir.to_owned(),
        force: true,
        ..BenchRequest::default()
    }
}

/// Runs one benchmark and checks what every successful result must have.
async fn run_ok(kind: BenchKind, req: &BenchRequest) -> BenchResult {
    let started = Instant::now();
    let results = run(req).await.expect("the run starts");
    let took = started.elapsed();
    assert_eq!(results.len(), 1);
    let r = results.into_iter().next().expect("one result");
    assert_eq!(r.kind, kind);
    assert_eq!(r.error, None, "{kind} failed");
    assert_eq!(r.unit, kind.unit());
    assert!(
        r.value.is_finite() && r.value > 0.0,
        "{kind}: value {}",
        r.value
    );
    assert!(
        took <= req.time_limit + SLACK,
        "{kind} took {took:?} with a limit of {:?}",
        req.time_limit
    );
    assert!(r.elapsed <= took);
    r
}

/// Nothing is left in the work directory.
fn assert_clean(dir: &tempfile::TempDir) {
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the work dir")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn cpus_single_thread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let r = run_ok(BenchKind::Cpus, &request(&[BenchKind::Cpus], dir.path())).await;
    assert_eq!(r.unit, "Mops/s");
    assert_eq!(r.detail.get("threads"), Some(&1.0));
}

#[tokio::test]
async fn cpum_all_cores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let r = run_ok(BenchKind::Cpum, &request(&[BenchKind::Cpum], dir.path())).await;
    assert_eq!(r.unit, "Mops/s");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(r.detail.get("threads"), Some(&(cores as f64)));
}

#[tokio::test]
async fn mem_read_and_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    for kind in [BenchKind::MemR, BenchKind::MemW] {
        let r = run_ok(kind, &request(&[kind], dir.path())).await;
        assert_eq!(r.unit, "MB/s");
        assert!(r.detail["bytes"] > 0.0);
    }
}

#[tokio::test]
async fn fio_write_then_read_cleans_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let w = run_ok(BenchKind::FioW, &request(&[BenchKind::FioW], dir.path())).await;
    assert_eq!(w.unit, "MB/s");
    assert!(w.detail["bytes"] > 0.0 && w.detail["bytes"] <= (4 << 20) as f64);
    assert_clean(&dir);
    let r = run_ok(BenchKind::FioR, &request(&[BenchKind::FioR], dir.path())).await;
    assert_eq!(r.unit, "MB/s");
    assert!(r.detail.contains_key("cache_dropped"));
    assert_clean(&dir);
}

#[tokio::test]
async fn fio_refuses_a_file_larger_than_the_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut req = request(&[BenchKind::FioW], dir.path());
    req.fio_file_bytes = u64::MAX / 2;
    let results = run(&req).await.expect("the run starts");
    let error = results[0].error.as_deref().expect("an error result");
    assert!(error.contains("room"), "{error}");
    assert!(results[0].value.is_nan());
    assert_clean(&dir);
}

#[tokio::test]
async fn db_read_and_write_transactions() {
    let dir = tempfile::tempdir().expect("temp dir");
    for kind in [BenchKind::DbR, BenchKind::DbW] {
        let r = run_ok(kind, &request(&[kind], dir.path())).await;
        assert_eq!(r.unit, "tx/s");
        assert!(r.detail["transactions"] >= 1.0);
        assert!(r.detail["p99_ms"] >= r.detail["p50_ms"]);
        assert_clean(&dir);
    }
}

#[tokio::test]
async fn rtt_to_a_listener_and_to_a_closed_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let open = listener.local_addr().expect("addr").to_string();
    let mut req = request(&[BenchKind::Rtt], dir.path());
    req.rtt_targets = vec![open.clone()];
    let r = run_ok(BenchKind::Rtt, &req).await;
    assert_eq!(r.unit, "ms");
    assert!(r.detail["p99"] >= r.value);
    assert!(r.detail.contains_key(&open));

    // A port that was just free: nothing listens there.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    req.rtt_targets = vec![closed.clone()];
    let results = run(&req).await.expect("the run starts");
    let r = &results[0];
    assert!(r.value.is_nan());
    let error = r.error.as_deref().expect("an error result");
    assert!(error.contains(&closed), "{error}");
    assert!(r.elapsed <= LIMIT + SLACK);
}

#[tokio::test]
async fn mrtt_reports_every_peer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let peers: Vec<String> = [&a, &b]
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let mut req = request(&[BenchKind::Mrtt], dir.path());
    req.mrtt_peers = peers.clone();
    let r = run_ok(BenchKind::Mrtt, &req).await;
    for p in &peers {
        assert!(r.detail[p.as_str()] > 0.0, "{p}: {:?}", r.detail);
    }
    assert_eq!(r.detail["unreachable"], 0.0);
}

#[tokio::test]
async fn overload_is_refused_unless_forced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut req = request(&[BenchKind::Cpus], dir.path());
    req.max_load = 0.0;
    req.force = false;
    // A machine running this test has some load; the pure check below covers an idle one.
    if load_per_core().is_some_and(|l| l > 0.0) {
        match run(&req).await {
            Err(BenchError::Overloaded { load, limit }) => {
                assert!(load > 0.0);
                assert_eq!(limit, 0.0);
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
    }
    req.force = true;
    let results = run(&req).await.expect("forced runs");
    assert_eq!(results[0].error, None);

    assert!(matches!(
        check_load(0.8, 0.5, false),
        Err(BenchError::Overloaded { .. })
    ));
    assert_eq!(check_load(0.8, 0.5, true), Ok(()));
    assert_eq!(check_load(0.2, 0.5, false), Ok(()));
}

#[test]
fn kind_names_round_trip() {
    for kind in BenchKind::ALL {
        assert_eq!(kind.to_string().parse::<BenchKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).expect("serialize");
        assert_eq!(json, format!("\"{kind}\""));
        assert_eq!(
            serde_json::from_str::<BenchKind>(&json).expect("deserialize"),
            kind
        );
    }
    let names: Vec<String> = BenchKind::ALL.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        names,
        [
            "cpus", "cpum", "memR", "memW", "fioR", "fioW", "dbR", "dbW", "rtt", "mrtt"
        ]
    );
    assert_eq!(" memR".parse::<BenchKind>(), Ok(BenchKind::MemR));
    assert!("memr".parse::<BenchKind>().is_err());
    assert!("".parse::<BenchKind>().is_err());
}

#[test]
fn invalid_requests_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ok = request(&[BenchKind::Cpus], dir.path());
    assert!(validate(&ok).is_ok());
    let cases: Vec<(&str, BenchRequest)> = vec![
        (
            "no kinds",
            BenchRequest {
                kinds: vec![],
                ..ok.clone()
            },
        ),
        (
            "zero limit",
            BenchRequest {
                time_limit: Duration::ZERO,
                ..ok.clone()
            },
        ),
        (
            "limit over 300 s",
            BenchRequest {
                time_limit: Duration::from_secs(301),
                ..ok.clone()
            },
        ),
        (
            "NaN max_load",
            BenchRequest {
                max_load: f64::NAN,
                ..ok.clone()
            },
        ),
        (
            "rtt without targets",
            BenchRequest {
                kinds: vec![BenchKind::Rtt],
                ..ok.clone()
            },
        ),
        (
            "mrtt peer without port",
            BenchRequest {
                kinds: vec![BenchKind::Mrtt],
                mrtt_peers: vec!["10.0.0.1".into()],
                ..ok.clone()
            },
        ),
        (
            "tiny fio file",
            BenchRequest {
                kinds: vec![BenchKind::FioW],
                fio_file_bytes: 1000,
                ..ok.clone()
            },
        ),
        (
            "missing work dir",
            BenchRequest {
                kinds: vec![BenchKind::DbW],
                work_dir: dir.path().join("absent"),
                ..ok.clone()
            },
        ),
    ];
    for (what, req) in cases {
        assert!(
            matches!(validate(&req), Err(BenchError::InvalidRequest(_))),
            "{what}"
        );
    }
    // A repeated kind runs once, in the first position.
    let twice = BenchRequest {
        kinds: vec![BenchKind::MemW, BenchKind::Cpus, BenchKind::MemW],
        ..ok
    };
    assert_eq!(
        validate(&twice).ok(),
        Some(vec![BenchKind::MemW, BenchKind::Cpus])
    );
}

#[test]
fn request_serde_uses_seconds_and_names() {
    let req: BenchRequest = serde_json::from_str(
        r#"{"kinds": ["cpus", "fioR"], "time_limit_secs": 2.5, "force": true}"#,
    )
    .expect("deserialize");
    assert_eq!(req.kinds, vec![BenchKind::Cpus, BenchKind::FioR]);
    assert_eq!(req.time_limit, Duration::from_millis(2500));
    assert_eq!(req.fio_file_bytes, DEFAULT_FIO_FILE_BYTES);
    assert!(serde_json::from_str::<BenchRequest>(r#"{"kinds": ["cpux"]}"#).is_err());
    assert!(serde_json::from_str::<BenchRequest>(r#"{"unknown": 1}"#).is_err());
}

#[test]
fn result_json_has_unit_and_null_for_nan() {
    let r = BenchResult::failed(BenchKind::Rtt, "unreachable: x");
    let json = serde_json::to_value(&r).expect("serialize");
    assert_eq!(json["kind"], "rtt");
    assert_eq!(json["unit"], "ms");
    assert!(json["value"].is_null());
    assert_eq!(json["error"], "unreachable: x");
    assert!(json["elapsed_ms"].is_number());
}

#[test]
fn quantiles_by_nearest_rank() {
    let v = [1.0, 2.0, 3.0, 4.0];
    assert_eq!(quantile(&v, 0.5), 2.0);
    assert_eq!(quantile(&v, 0.99), 4.0);
    assert_eq!(quantile(&v, 0.0), 1.0);
    assert!(quantile(&[], 0.5).is_nan());
}

#[tokio::test]
async fn a_tiny_limit_ends_quickly_with_a_value_or_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kinds: Vec<BenchKind> = BenchKind::ALL
        .into_iter()
        .filter(|k| !matches!(k, BenchKind::Rtt | BenchKind::Mrtt))
        .collect();
    let mut req = request(&kinds, dir.path());
    req.time_limit = Duration::from_millis(1);
    let started = Instant::now();
    let results = run(&req).await.expect("the run starts");
    assert_eq!(results.len(), kinds.len());
    for r in &results {
        // Setup that outlives the limit (the database load, the memory fill) is an error, never a hang.
        assert!(
            r.error.is_some() || r.value > 0.0,
            "{}: {:?} {:?}",
            r.kind,
            r.value,
            r.error
        );
        assert!(r.elapsed <= SLACK, "{} took {:?}", r.kind, r.elapsed);
    }
    assert!(started.elapsed() <= SLACK * 2);
    assert_clean(&dir);
}
