//! Fault tests (issue 10): a network partition between the agent and the collector, a full disk under the
//! collector, and agent clocks far off. Each ends by comparing what was stored with what was acknowledged.
//!
//! The partition and disk-full tests need root (network namespaces, a tmpfs mount). Without the permission they
//! print `SKIP` with the reason and return; CI and `scripts/test.sh` run as root, where they really run. Namespaces,
//! links and mounts are removed by guards, also when a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    CollectorProc, Proc, agent_bin, damselfly_bin, http_get, http_request, now_nanos, wait_until,
};

/// Runs a command (`ip`, `mount`, ...); `Err` with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A number that keeps parallel runs of this suite apart (namespace, link and address names).
fn run_id() -> u32 {
    std::process::id() % 250 + 1
}

/// Network namespaces made by a test; deleted on drop (with the veth ends inside them).
struct Namespaces(Vec<String>);

impl Namespaces {
    /// Creates `names`; `None` (after printing why) when namespaces cannot be made here (not root, no
    /// CAP_NET_ADMIN, no `ip`).
    fn create(names: &[String]) -> Option<Namespaces> {
        let mut made = Namespaces(Vec::new());
        for name in names {
            if let Err(e) = run("ip", &["netns", "add", name]) {
                eprintln!(
                    "SKIP: cannot create a network namespace (needs root and CAP_NET_ADMIN): {e}"
                );
                return None;
            }
            made.0.push(name.clone());
        }
        Some(made)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            if let Err(e) = run("ip", &["netns", "del", name]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A tmpfs of a given size, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, megabytes: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let size = format!("size={megabytes}m");
        match run(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", dir.to_str().unwrap()],
        ) {
            Ok(()) => Some(Tmpfs(dir.to_path_buf())),
            Err(e) => {
                eprintln!("SKIP: cannot mount a tmpfs (needs root): {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[self.0.to_str().unwrap()]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Starts `damselfly <args>` inside the network namespace `netns` and returns it with the gRPC address it prints
/// (the harness's `CollectorProc` talks to its HTTP port from this namespace, which cannot reach `netns`).
fn collector_in(netns: &str, data_dir: &Path, args: &[&str]) -> (Proc, String) {
    use std::io::{BufRead, BufReader};
    let log = data_dir.with_extension("collector.stderr");
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(damselfly_bin())
        .arg("collector")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn ip netns exec damselfly collector");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc::adopt(child, "damselfly collector (netns)", log);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end so the collector never blocks on a full pipe.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.trim().strip_prefix("grpc: ") {
                let _ = tx.send(v.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(grpc) => (proc, grpc),
        Err(_) => panic!("collector in {netns} did not start:\n{}", proc.stderr()),
    }
}

/// The agent's spool: its ack watermark (every batch at or below it is acknowledged) and the highest seq written
/// to its segments (see `agent/src/spool.rs` for the format).
fn spool_seqs(spool: &Path) -> (u64, u64) {
    let ack = std::fs::read_to_string(spool.join("ack"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut top = ack;
    for entry in std::fs::read_dir(spool).into_iter().flatten().flatten() {
        if entry.path().extension().is_none_or(|x| x != "seg") {
            continue;
        }
        let Ok(data) = std::fs::read(entry.path()) else {
            continue;
        };
        // `DMSFSPL1`, then records: u32 length | u32 CRC | u64 seq | payload.
        let mut at = 8;
        while at + 16 <= data.len() {
            let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let seq = u64::from_le_bytes(data[at + 8..at + 16].try_into().unwrap());
            if at + 16 + len > data.len() {
                break;
            }
            top = top.max(seq);
            at += 16 + len;
        }
    }
    (ack, top)
}

/// A counter from the agent's final stats line (`stats=AgentStats { rounds: 12, ... }`).
fn final_stat(log: &str, name: &str) -> u64 {
    log.rsplit_once(&format!("{name}: "))
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the agent's final stats:\n{log}"))
}

/// (1) Agent and collector in two network namespaces joined by a veth pair; the link is cut for several push
/// intervals while the agent collects, then restored. Every row the agent collected is stored exactly once, and
/// every batch it made was acknowledged.
#[test]
fn partition_between_agent_and_collector_loses_nothing() {
    const ID: &str = "fault-partition";
    let n = run_id();
    let (ns_c, ns_a) = (format!("dfy{n}c"), format!("dfy{n}a"));
    let Some(_namespaces) = Namespaces::create(&[ns_c.clone(), ns_a.clone()]) else {
        return;
    };
    let (veth_c, veth_a) = (format!("dfyc{n}"), format!("dfya{n}"));
    let (ip_c, ip_a) = (format!("10.231.{n}.1"), format!("10.231.{n}.2"));
    run(
        "ip",
        &[
            "link", "add", &veth_c, "netns", &ns_c, "type", "veth", "peer", "name", &veth_a,
            "netns", &ns_a,
        ],
    )
    .unwrap();
    for (ns, dev, ip) in [(&ns_c, &veth_c, &ip_c), (&ns_a, &veth_a, &ip_a)] {
        run(
            "ip",
            &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev],
        )
        .unwrap();
        run("ip", &["-n", ns, "link", "set", dev, "up"]).unwrap();
        run("ip", &["-n", ns, "link", "set", "lo", "up"]).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let state = dir.path().join("agent");
    let spool = state.join("spool");
    // Beyond loopback the collector wants auth and TLS: the agent gets a token of namespace `default`; TLS is
    // left out (`--insecure`) as the link is a veth pair between two namespaces of this test.
    let token = common::create_token(&store, "agent", &["default"]);
    let grpc_addr = format!("{ip_c}:50051");
    let (collector, grpc) = collector_in(
        &ns_c,
        &store,
        &[
            "--grpc",
            &grpc_addr,
            "--http",
            "127.0.0.1:0",
            "--auth",
            "--insecure",
            "--flush-interval",
            "3600",
        ],
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("token = \"{token}\"\n")).unwrap();
    let agent_log = dir.path().join("agent.stderr");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns_a])
        .arg(agent_bin())
        .args(["--collector", &grpc, "--interval", "1", "--agent-id", ID])
        .args([
            "--measurements",
            "cpu,system",
            "--config",
            config.to_str().unwrap(),
        ])
        .arg("--state-dir")
        .arg(&state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let agent = Proc::adopt(child, "damselfly-agent (netns)", agent_log);

    let t = std::time::Instant::now();
    wait_until(
        Duration::from_secs(30),
        "first batches acknowledged",
        || spool_seqs(&spool).0 >= 2,
    );
    eprintln!("partition: first acks after {:?}", t.elapsed());
    run("ip", &["-n", &ns_a, "link", "set", &veth_a, "down"]).unwrap();
    let (acked_at_cut, _) = spool_seqs(&spool);
    // Several intervals without a link: the agent goes on collecting into its spool.
    std::thread::sleep(Duration::from_secs(6));
    let (acked_during, written) = spool_seqs(&spool);
    assert!(
        written >= acked_during + 3,
        "the agent spooled nothing during the cut: ack {acked_during}, last seq {written} (ack at cut \
         {acked_at_cut})"
    );
    run("ip", &["-n", &ns_a, "link", "set", &veth_a, "up"]).unwrap();
    let t0 = std::time::Instant::now();
    // Everything spooled during the cut gets acknowledged (the stream resumes, or the agent notices the dead
    // stream by its ack timeout and reconnects).
    wait_until(
        Duration::from_secs(90),
        "the cut's batches acknowledged",
        || spool_seqs(&spool).0 >= written,
    );
    eprintln!(
        "partition: acknowledged after the cut at +{:?}",
        t0.elapsed()
    );
    assert!(agent.terminate().success());
    eprintln!("partition: agent stopped at +{:?}", t0.elapsed());
    let log = std::fs::read_to_string(dir.path().join("agent.stderr")).unwrap();
    let collected = final_stat(&log, "points_collected");
    assert_eq!(final_stat(&log, "pending_at_exit"), 0, "{log}");
    assert_eq!(final_stat(&log, "batches_dropped"), 0, "{log}");
    assert_eq!(final_stat(&log, "batches_rejected"), 0, "{log}");
    assert!(collector.terminate().success());
    eprintln!("partition: collector stopped at +{:?}", t0.elapsed());

    // Read what was stored with a collector on loopback (no auth needed there), on the same data.
    let collector = CollectorProc::start(&store, &[]);
    let stored: u64 = ["cpu", "system"]
        .iter()
        .map(|t| {
            collector.sql(&format!(
                "SELECT count(*) AS n FROM {t} WHERE agent_id = '{ID}'"
            ))[0]["n"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(
        stored, collected,
        "rows stored vs points the agent collected (all acknowledged)"
    );
    for r in collector.sql(&format!(
        "SELECT cpu, count(*) AS n, count(DISTINCT time) AS d FROM cpu WHERE agent_id = '{ID}' GROUP BY cpu"
    )) {
        assert_eq!(r["n"], r["d"], "a row stored twice: {r}");
    }
    eprintln!(
        "partition: {collected} points collected and stored; batches {acked_at_cut}..{written} crossed the cut"
    );
}

/// Line protocol rows for the disk-full test: `n` rows of `fill` from row `from`, each with a string that
/// compresses badly, so the WAL grows fast.
fn fill_lines(from: u64, n: u64) -> String {
    let base = now_nanos() - 3_600_000_000_000;
    (from..from + n)
        .map(|i| {
            let noise: String = (0..32)
                .map(|k| format!("{:08x}", (i * 2_654_435_761 + k * 40_503) % 0xffff_ffff))
                .collect();
            format!(
                "fill,host=h{} v={i}i,s=\"{noise}\" {}\n",
                i % 7,
                base + i as i64
            )
        })
        .collect()
}

/// POSTs line protocol; (status, body).
fn write_lines(http: &str, body: &str) -> (u16, String) {
    let (code, body) = http_request(
        "POST",
        &format!("{http}/api/v2/write?bucket=default"),
        &[("Content-Type", "text/plain")],
        body.as_bytes(),
    )
    .unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn count_fill(collector: &CollectorProc) -> u64 {
    collector.sql("SELECT count(*) AS n FROM fill")[0]["n"]
        .as_u64()
        .unwrap()
}

/// (2) The collector's data directory on a 16 MiB tmpfs, nearly filled by another file. Writes go on until the
/// disk is full: then the collector answers 503 saying so, `/health` and `/metrics` report it, and nothing it
/// acknowledged is lost. Once the other file is deleted, writes are acknowledged again; after a kill and a restart
/// every acknowledged row is there, once.
#[test]
fn full_disk_stops_acknowledging_and_loses_nothing_acknowledged() {
    const ROWS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    // The store is the mount itself, so the harness's stderr log (next to it) is not on the full disk.
    let mount = dir.path().join("disk");
    let Some(_tmpfs) = Tmpfs::mount(&mount, 16) else {
        return;
    };
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![0u8; 13 << 20]).unwrap();
    let collector = CollectorProc::start(&mount, &["--flush-interval", "3600"]);

    let mut acked = 0u64;
    let mut next = 0u64;
    let refusal = loop {
        assert!(next < 1_000_000, "the disk never filled");
        let (code, body) = write_lines(&collector.http, &fill_lines(next, ROWS));
        next += ROWS;
        match code {
            204 => acked += ROWS,
            503 => break body,
            _ => panic!("unexpected answer {code}: {body}"),
        }
    };
    assert!(acked > 0, "the disk was full before any write");
    for needle in [
        "WAL append failed",
        "No space left on device",
        "retry later",
    ] {
        assert!(
            refusal.contains(needle),
            "the 503 does not say {needle:?}: {refusal}"
        );
    }
    // It stays refused while the disk is full, and says why on /health and in /metrics.
    let (code, body) = write_lines(&collector.http, &fill_lines(next, ROWS));
    next += ROWS;
    assert_eq!(code, 503, "{body}");
    let (code, health) = http_get(&format!("{}/health", collector.http)).unwrap();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["store"]["wal_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "/health does not report the full disk: {health}"
    );
    let (_, metrics) = http_get(&format!("{}/metrics", collector.http)).unwrap();
    let wal_errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("damselfly_errors_total{kind=\"wal\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wal error counter in /metrics:\n{metrics}"));
    assert!(
        wal_errors >= 2.0,
        "damselfly_errors_total{{kind=\"wal\"}} = {wal_errors}"
    );
    assert_eq!(
        count_fill(&collector),
        acked,
        "rows stored while the disk is full"
    );

    // Space returns: writes are acknowledged again and /health no longer reports the error.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..5 {
        let (code, body) = write_lines(&collector.http, &fill_lines(next, ROWS));
        next += ROWS;
        assert_eq!(code, 204, "after space returned: {body}");
        acked += ROWS;
    }
    let (code, health) = http_get(&format!("{}/health", collector.http)).unwrap();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert!(health["store"]["wal_error"].is_null(), "{health}");
    assert_eq!(
        (code, health["status"].as_str()),
        (200, Some("ok")),
        "{health}"
    );
    assert_eq!(count_fill(&collector), acked);

    // Killed without a flush: the WAL alone brings back every acknowledged row.
    collector.proc.kill();
    let collector = CollectorProc::start(&mount, &["--flush-interval", "3600"]);
    assert_eq!(count_fill(&collector), acked, "after a kill and a restart");
    let distinct = collector.sql("SELECT count(DISTINCT v) AS n FROM fill")[0]["n"]
        .as_u64()
        .unwrap();
    assert_eq!(distinct, acked, "a row stored twice");
    // And after a clean stop (a flush to Parquet) and another start.
    assert!(collector.proc.terminate().success());
    let collector = CollectorProc::start(&mount, &[]);
    assert_eq!(count_fill(&collector), acked, "after a flush and a restart");
    eprintln!(
        "disk full: {acked} rows acknowledged and stored, {} refused",
        next - acked
    );
}

/// (3) Rows stamped far ahead of (or, with `max_time_age_secs`, far behind) the collector's clock are refused
/// with a message naming the row's time and the bound; nothing of such a write is stored; rows within the bounds
/// are.
#[test]
fn far_off_agent_clocks_are_refused_with_the_bound_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "max_time_age_secs = 2592000\n").unwrap();
    let collector = CollectorProc::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    const YEAR: i64 = 365 * 86_400 * 1_000_000_000;
    let now = now_nanos();
    let (code, body) = write_lines(
        &collector.http,
        &format!(
            "clock,host=ok v=1 {now}\nclock,host=ok v=2 {}\n",
            now + 3_600_000_000_000
        ),
    );
    assert_eq!(code, 204, "{body}");

    let ahead = now + 10 * YEAR;
    let (code, body) = write_lines(
        &collector.http,
        &format!("clock,host=good v=3 {now}\nclock,host=ahead v=4 {ahead}\n"),
    );
    assert_eq!(code, 400, "{body}");
    let year = common::rfc3339(ahead)[..4].to_string();
    for needle in [
        "nothing was stored",
        "row ",
        "max_time_skew_secs",
        "ahead",
        &year,
        &ahead.to_string(),
    ] {
        assert!(
            body.contains(needle),
            "the refusal does not say {needle:?}: {body}"
        );
    }

    let behind = now - 10 * YEAR;
    let (code, body) = write_lines(
        &collector.http,
        &format!("clock,host=behind v=5 {behind}\n"),
    );
    assert_eq!(code, 400, "{body}");
    let year = common::rfc3339(behind)[..4].to_string();
    for needle in ["max_time_age_secs", "behind", &year, &behind.to_string()] {
        assert!(
            body.contains(needle),
            "the refusal does not say {needle:?}: {body}"
        );
    }

    let rows = collector
        .sql("SELECT host, count(*) AS n, CAST(max(time) AS BIGINT) AS t FROM clock GROUP BY host");
    assert_eq!(rows.len(), 1, "only the first write is stored: {rows:?}");
    assert_eq!(rows[0]["host"], "ok");
    assert_eq!(rows[0]["n"], 2);
    let (_, metrics) = http_get(&format!("{}/metrics", collector.http)).unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("damselfly_errors_total{kind=\"ingest_rejected\"} ")
                && !l.ends_with(" 0")
        ),
        "the refusals are not counted:\n{metrics}"
    );
}
