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
            "cpus,memW,fioR,dbW,mrtt",
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
    assert!(stdout.contains("(10 rows)"), "{stdout}");
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
    assert_eq!(rows.len(), 10, "{rows:?}");
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
            ["cpus", "dbW", "fioR", "memW", "mrtt"],
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
        10
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
    assert_eq!(rows[0]["n"], 11, "{rows:?}");
    assert_eq!(rows[0]["runs"], 2, "{rows:?}");
    drop(peer_port);
}
