//! Benchmarks on agents, black-box: a collector and two real `damselfly-agent` processes (same MCIS, same spec);
//! `damselfly bench run` asks them through the collector (over their heartbeats: no port on the "VMs"), follows
//! their progress, and prints the results; both VMs' rows land in the `bench` table with units, the run id and the
//! spec, so neither overwrites the other.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{CollectorProc, http_get, http_post, start_agent, wait_until};

#[test]
fn bench_run_reaches_every_agent_and_keeps_every_result() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "heartbeat_interval_secs = 1\n").unwrap();
    let collector = CollectorProc::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    // mrtt connects to the other VMs at this port (both "VMs" are 127.0.0.1 here).
    let peer_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mrtt_port = peer_port.local_addr().unwrap().port().to_string();
    let mut agents = Vec::new();
    for vm in ["vm-1", "vm-2"] {
        let state = dir.path().join(vm);
        std::fs::create_dir_all(&state).unwrap();
        let agent_config = state.join("agent.toml");
        std::fs::write(
            &agent_config,
            "spec = \"t3.small\"\nbench_max_load_percent = 100000\n",
        )
        .unwrap();
        agents.push(start_agent(
            &collector.grpc,
            &state,
            &[
                "--config",
                agent_config.to_str().unwrap(),
                "--ns",
                "ns1",
                "--mcis",
                "web",
                "--vm",
                vm,
                "--hostname",
                vm,
            ],
        ));
    }
    wait_until(Duration::from_secs(30), "both agents registered", || {
        let (code, body) = http_get(&format!("{}/api/v1/agents", collector.http)).unwrap();
        code == 200 && body.contains("\"vm-1\"") && body.contains("\"vm-2\"")
    });

    // A bad request is refused with a precise message.
    let (code, body) = http_post(
        &format!("{}/api/v1/bench/runs", collector.http),
        br#"{"ns":"ns1","mcis":"web","only":["gpu"]}"#,
    )
    .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown benchmark \\\"gpu\\\""), "{body}");
    let (code, body) = http_post(
        &format!("{}/api/v1/bench/runs", collector.http),
        br#"{"ns":"ns1","mcis":"nope"}"#,
    )
    .unwrap();
    assert_eq!(code, 404, "{body}");

    let output = std::process::Command::new(common::damselfly_bin())
        .args([
            "bench",
            "run",
            "--url",
            &collector.http,
            "--ns",
            "ns1",
            "--mcis",
            "web",
            "--only",
            "cpus,cpum,memR,memW,fioR,fioW,dbR,dbW,rtt,mrtt",
            "--rtt",
            &format!("127.0.0.1:{mrtt_port}"),
            "--time-limit",
            "1",
            "--fio-bytes",
            "4194304",
            "--mrtt-port",
            &mrtt_port,
            "--wait",
            "120",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("on 2 VM(s)"), "{stdout}");
    assert!(stdout.contains("(20 rows)"), "{stdout}");
    let run_id = stdout
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();

    // Every result is a row: run id, VM identity, spec, unit; both VMs of the same spec kept.
    let rows = collector.sql(&format!(
        "SELECT vm_id, spec, kind, unit, value, vcpus, memory_bytes FROM bench WHERE run_id = '{run_id}' ORDER BY vm_id, kind"
    ));
    assert_eq!(rows.len(), 20, "{rows:?}");
    for row in &rows {
        assert_eq!(row["spec"], "t3.small", "{row}");
        assert!(!row["unit"].as_str().unwrap().is_empty(), "{row}");
        assert!(row["value"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["vcpus"].as_u64().unwrap() >= 1, "{row}");
    }
    for vm in ["vm-1", "vm-2"] {
        let kinds: Vec<&str> = rows
            .iter()
            .filter(|r| r["vm_id"] == vm)
            .map(|r| r["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "cpum", "cpus", "dbR", "dbW", "fioR", "fioW", "memR", "memW", "mrtt", "rtt"
            ],
            "{vm}: {rows:?}"
        );
    }
    // The HTTP API shows the same run.
    let (code, body) = http_get(&format!("{}/api/v1/bench?run={run_id}", collector.http)).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .len(),
        20
    );
    let (code, body) = http_get(&format!("{}/api/v1/bench/runs/{run_id}", collector.http)).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"finished\":true"), "{body}");

    // A second run does not replace the first.
    let output = std::process::Command::new(common::damselfly_bin())
        .args([
            "bench",
            "run",
            "--url",
            &collector.http,
            "--ns",
            "ns1",
            "--mcis",
            "web",
            "--vm",
            "vm-2",
            "--only",
            "cpus",
            "--time-limit",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows = collector.sql("SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM bench");
    assert_eq!(rows[0]["n"], 21, "{rows:?}");
    assert_eq!(rows[0]["runs"], 2, "{rows:?}");

    // Re-benchmarking stale specs (fresh_secs 0: every result is stale): one VM of t3.small, at most one run at once.
    let refresh = |body: &str| {
        let (code, text) = http_post(
            &format!("{}/api/v1/scores/refresh", collector.http),
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(code, 200, "{text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let first = refresh(r#"{"kind":"cpus","fresh_secs":0,"max_concurrent":1,"time_limit_secs":1}"#);
    assert_eq!(first["started"].as_array().unwrap().len(), 1, "{first}");
    let second = refresh(r#"{"kind":"cpus","fresh_secs":0,"max_concurrent":1}"#);
    assert!(second["started"].as_array().unwrap().is_empty(), "{second}");
    assert!(
        second["waiting"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_concurrent"),
        "{second}"
    );
    let run_id = first["started"][0]["run_id"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(60), "the refresh run's row", || {
        collector.sql(&format!(
            "SELECT count(*) AS n FROM bench WHERE run_id = '{run_id}'"
        ))[0]["n"]
            == 1
    });
    drop(peer_port);
}

fn write_lp(collector: &CollectorProc, body: &str) {
    let (code, text) = common::http_request(
        "POST",
        &format!("{}/api/v2/write?bucket=ns1", collector.http),
        &[("Content-Type", "text/plain")],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&text));
}

fn first_choice(collector: &CollectorProc) -> String {
    let request = br#"{"groups":[{"name":"g","regions":["aws/ap-northeast-2"],"specs":["m5.xlarge","c5.xlarge"]}],
        "policy":{"weights":{"performance":1},"performance":"dynamic"},"limit":2}"#;
    let (code, body) = common::http_request(
        "POST",
        &format!("{}/api/v1/placement?kind=cpum", collector.http),
        &[("Content-Type", "application/json")],
        request,
    )
    .unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["groups"][0]["ranking"][0]["spec"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Dynamic scores follow the live load, and a placement that ranks by them changes when a VM gets busy.
#[test]
fn loading_a_vm_lowers_its_specs_score_and_changes_the_placement() {
    let dir = tempfile::tempdir().unwrap();
    let collector = CollectorProc::start(&dir.path().join("data"), &[]);
    // Two VMs benchmarked: m5.xlarge 1000 Mops/s, c5.xlarge 800 Mops/s; both 10% busy.
    write_lp(
        &collector,
        "bench,agent_id=a1,vm_id=vm-a,csp=aws,region=ap-northeast-2,spec=m5.xlarge,kind=cpum,unit=Mops/s,run_id=r1 value=1000\n\
         bench,agent_id=a2,vm_id=vm-b,csp=aws,region=ap-northeast-2,spec=c5.xlarge,kind=cpum,unit=Mops/s,run_id=r1 value=800\n\
         cpu,agent_id=a1,cpu=cpu-total usage_percent=10\n\
         cpu,agent_id=a2,cpu=cpu-total usage_percent=10\n",
    );
    let score = |spec: &str| {
        let (code, body) =
            http_get(&format!("{}/api/v1/scores?kind=cpum", collector.http)).unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["specs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["spec"] == spec)
            .unwrap_or_else(|| panic!("{spec} in {body}"))["score"]
            .as_f64()
            .unwrap()
    };
    assert!((score("m5.xlarge") - 900.0).abs() < 1e-6);
    assert!((score("c5.xlarge") - 720.0).abs() < 1e-6);
    assert_eq!(first_choice(&collector), "m5.xlarge");

    // The m5.xlarge VM gets 90% busy (mean over the window: (10 + 90 + 90) / 3 = 63.3%).
    write_lp(
        &collector,
        "cpu,agent_id=a1,cpu=cpu-total usage_percent=90\ncpu,agent_id=a1,cpu=cpu-total usage_percent=90\n",
    );
    let loaded = score("m5.xlarge");
    assert!(
        (loaded - 1000.0 * (1.0 - 190.0 / 300.0)).abs() < 1e-6,
        "{loaded}"
    );
    assert!(loaded < score("c5.xlarge"));
    assert_eq!(first_choice(&collector), "c5.xlarge");

    // Bad requests name the problem.
    let (code, body) = http_get(&format!("{}/api/v1/scores?kind=gpu", collector.http)).unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("unknown benchmark \\\"gpu\\\""), "{body}");
}
