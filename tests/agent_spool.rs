//! Black-box tests of the agent's disk spool: real `damselfly collector` and `damselfly-agent` processes on
//! 127.0.0.1. A collector outage (60 s, as the issue asks) loses nothing and keeps the original timestamps; an
//! agent killed mid-outage loses nothing it had spooled; a full spool drops the oldest batches and says so.
//!
//! The collector must come back on the port the agent was given, so these tests pick a free port (outside the
//! ephemeral range, see `common::free_port`) and start collectors on it themselves; the shared harness only starts them
//! on port 0. The tests are independent processes and run concurrently (the outage test takes about 1.5 minutes).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{damselfly_bin, free_port, http_get, http_post, start_agent, wait_until};
use serde_json::Value;

const SEC: i64 = 1_000_000_000;
/// Largest allowed distance between consecutive rounds of an agent with `--interval 1`: one interval plus
/// scheduling jitter (a skipped round would show as 2 s).
const MAX_GAP: i64 = 2_500_000_000;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// A `damselfly collector` on a fixed gRPC port (and a free HTTP port), killed when dropped.
struct Collector {
    child: Option<Child>,
    http: String,
    stderr_log: PathBuf,
}

impl Collector {
    fn start(data_dir: &Path, grpc_port: u16) -> Collector {
        let stderr_log = data_dir.with_extension(format!("collector.{}.stderr", now_ns()));
        let mut child = Command::new(damselfly_bin())
            .arg("collector")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--grpc", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http", "127.0.0.1:0", "--flush-interval", "3600"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("spawn damselfly collector");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading to the end so the collector never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line.trim().strip_prefix("http: ") {
                    let _ = tx.send(v.to_owned());
                }
            }
        });
        let mut collector = Collector {
            child: Some(child),
            http: String::new(),
            stderr_log,
        };
        collector.http = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(http) => http,
            Err(_) => panic!(
                "collector on gRPC port {grpc_port} did not start:\n{}",
                collector.stderr()
            ),
        };
        wait_until(Duration::from_secs(30), "collector /health", || {
            http_get(&format!("{}/health", collector.http)).is_ok_and(|(code, _)| code == 200)
        });
        collector
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// SIGTERM (the collector flushes), and wait for the exit.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "collector did not stop within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rows of a query, or `None` if it failed (e.g. the table does not exist yet).
    fn try_sql(&self, sql: &str) -> Option<Vec<Value>> {
        let (code, body) = http_post(&format!("{}/api/v1/sql", self.http), sql.as_bytes()).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    fn sql(&self, sql: &str) -> Vec<Value> {
        self.try_sql(sql)
            .unwrap_or_else(|| panic!("query failed: {sql}"))
    }

    /// Timestamps (ns) of one cpu series of one agent, in time order.
    fn cpu_times(&self, agent_id: &str, cpu: &str) -> Vec<i64> {
        self.try_sql(&format!(
            "SELECT CAST(time AS BIGINT) AS t FROM cpu WHERE cpu = '{cpu}' AND agent_id = '{agent_id}' \
             ORDER BY t"
        ))
        .unwrap_or_default()
        .iter()
        .map(|r| r["t"].as_i64().unwrap())
        .collect()
    }

    /// Every cpu series of the agent holds each timestamp once: count(DISTINCT time) == count(*).
    fn assert_exactly_once(&self, agent_id: &str) {
        let rows = self.sql(&format!(
            "SELECT cpu, count(*) AS n, count(DISTINCT time) AS d FROM cpu WHERE agent_id = '{agent_id}' \
             GROUP BY cpu ORDER BY cpu"
        ));
        assert!(
            rows.iter().any(|r| r["cpu"] == "cpu-total"),
            "no cpu-total rows: {rows:?}"
        );
        for r in &rows {
            assert_eq!(r["n"], r["d"], "duplicate rows in series {r}");
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- collector stderr ---\n{}", self.stderr());
        }
    }
}

/// The largest distance between consecutive timestamps, and where it is.
fn max_gap(times: &[i64]) -> (i64, i64) {
    times
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or((0, 0))
}

/// Timestamps in `(from, to)`.
fn within(times: &[i64], from: i64, to: i64) -> usize {
    times.iter().filter(|&&t| t > from && t < to).count()
}

/// The spool's segment files and their total size.
fn spool_segments(spool: &Path) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return (0, 0);
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .fold((0, 0), |(n, b), e| {
            (n + 1, b + e.metadata().map(|m| m.len()).unwrap_or(0))
        })
}

/// a) The collector is down for 60 s while the agent collects every second; when it is back on the same port,
/// every round of the outage is there, exactly once, with its original (collection) timestamp.
#[test]
fn collector_outage_of_60_s_loses_nothing_and_keeps_original_timestamps() {
    const ID: &str = "spool-outage";
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let state = dir.path().join("agent");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let collector = Collector::start(&store, port);
    let agent = start_agent(
        &url,
        &state,
        &["--agent-id", ID, "--measurements", "cpu,system"],
    );
    wait_until(Duration::from_secs(60), "first rounds stored", || {
        collector.cpu_times(ID, "cpu-total").len() >= 3
    });

    collector.stop();
    let down_at = now_ns();
    std::thread::sleep(Duration::from_secs(60));
    let (segments, bytes) = spool_segments(&state.join("spool"));
    assert!(
        segments >= 1 && bytes > 0,
        "the outage is in the disk spool"
    );
    let up_at = now_ns();
    let collector = Collector::start(&store, port);
    // The agent's reconnect backoff is at most 30 s; then the spool is replayed before the new rounds.
    wait_until(
        Duration::from_secs(90),
        "the outage replayed and new rounds stored",
        || {
            collector
                .cpu_times(ID, "cpu-total")
                .last()
                .is_some_and(|&t| t > up_at + 2 * SEC)
        },
    );
    let replayed_at = now_ns();
    assert!(agent.terminate().success());

    collector.assert_exactly_once(ID);
    let times = collector.cpu_times(ID, "cpu-total");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "duplicate times");
    let (gap, at) = max_gap(&times);
    assert!(
        gap <= MAX_GAP,
        "a gap of {:.2} s after {at} (outage {down_at}..{up_at})",
        gap as f64 / 1e9
    );
    // Original timestamps: one row per second of the outage, inside it, not at the time of the replay.
    let outage_rounds = (up_at - down_at) / SEC;
    let during = within(&times, down_at, up_at) as i64;
    assert!(
        during >= outage_rounds - 2,
        "{during} rows inside the {outage_rounds} s outage"
    );
    assert!(
        within(&times, up_at, replayed_at) as i64 <= (replayed_at - up_at) / SEC + 2,
        "rows were stamped at replay time"
    );
    eprintln!(
        "outage: {during} rows in {outage_rounds} s, max gap {:.2} s, replayed {:.1} s after restart",
        gap as f64 / 1e9,
        (replayed_at - up_at) as f64 / 1e9
    );
    // Everything delivered: the agent left no segment behind.
    assert_eq!(spool_segments(&state.join("spool")).0, 0);
}

/// b) An agent SIGKILLed during an outage and restarted on the same state directory delivers what it had
/// spooled before the kill, once the collector is back; no duplicates.
#[test]
fn agent_killed_mid_outage_loses_nothing_it_spooled() {
    const ID: &str = "spool-kill";
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let state = dir.path().join("agent");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let flags = ["--agent-id", ID, "--measurements", "cpu,system"];
    let collector = Collector::start(&store, port);
    let agent = start_agent(&url, &state, &flags);
    wait_until(Duration::from_secs(60), "first rounds stored", || {
        collector.cpu_times(ID, "cpu-total").len() >= 2
    });

    collector.stop();
    let down_at = now_ns();
    std::thread::sleep(Duration::from_secs(8));
    let killed_at = now_ns();
    agent.kill();
    let agent = start_agent(&url, &state, &flags);
    std::thread::sleep(Duration::from_secs(3));
    let up_at = now_ns();
    let collector = Collector::start(&store, port);
    wait_until(
        Duration::from_secs(60),
        "spooled rounds replayed and new rounds stored",
        || {
            collector
                .cpu_times(ID, "cpu-total")
                .last()
                .is_some_and(|&t| t > up_at + 2 * SEC)
        },
    );
    assert!(agent.terminate().success());

    collector.assert_exactly_once(ID);
    let times = collector.cpu_times(ID, "cpu-total");
    let before_kill: Vec<i64> = times.iter().copied().filter(|&t| t < killed_at).collect();
    // The killed agent's outage rounds (its last may have been cut mid-write).
    let spooled = within(&before_kill, down_at, killed_at) as i64;
    let expected = (killed_at - down_at) / SEC;
    assert!(
        spooled >= expected - 2,
        "{spooled} of ~{expected} rounds spooled before the kill arrived"
    );
    let (gap, at) = max_gap(&before_kill);
    assert!(
        gap <= MAX_GAP,
        "a gap of {:.2} s after {at} before the kill",
        gap as f64 / 1e9
    );
    eprintln!("kill: {spooled} of ~{expected} outage rounds of the killed agent delivered");
    // The restarted agent continued where the killed one stopped (start-up takes a moment).
    let (gap, at) = max_gap(&times);
    assert!(
        gap <= MAX_GAP + 2 * SEC,
        "a gap of {:.2} s after {at}",
        gap as f64 / 1e9
    );
}

/// c) A spool at its bound (1 MiB, the minimum) drops the oldest batches, counts them and logs the points lost;
/// it never takes more than the bound on disk, and what it kept is delivered later.
#[test]
fn full_spool_drops_the_oldest_and_counts_them() {
    const ID: &str = "spool-bound";
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let state = dir.path().join("agent");
    let spool = state.join("spool");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // One point per batch and a 60 KB identity tag make every batch ~60 KB: the 1 MiB spool holds ~17 of them,
    // a few rounds.
    const BATCH_BYTES: u64 = 60_000;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "spool_max_bytes = 1048576\nbatch_max_points = 1\nmeasurements = [\"cpu\", \"mem\", \"system\"]\n\
             region = \"{}\"\n",
            "r".repeat(BATCH_BYTES as usize)
        ),
    )
    .unwrap();
    let flags = ["--config", config.to_str().unwrap(), "--agent-id", ID];

    // No collector yet: everything goes to the spool.
    let started_at = now_ns();
    let agent = start_agent(&url, &state, &flags);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let (_, bytes) = spool_segments(&spool);
        assert!(bytes <= 1 << 20, "spool files take {bytes} bytes");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until(Duration::from_secs(30), "a drop warning", || {
        agent.stderr().contains("points are lost")
    });
    assert!(agent.terminate().success());
    // Everything the first agent collected is older than this.
    let stopped_at = now_ns();
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("agent.") && name.ends_with(".stderr")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    // The final stats line: `stats=AgentStats { ..., batches_dropped: 23, ... }`.
    let stat = |name: &str| -> u64 {
        log.rsplit_once(&format!("{name}: "))
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the agent's final stats:\n{log}"))
    };
    let dropped = stat("batches_dropped");
    let spooled = stat("pending_at_exit");
    assert!(dropped > 0, "batches_dropped = 0:\n{log}");
    assert!(spooled > 0, "pending_at_exit = 0:\n{log}");
    assert!(log.contains("stay in the spool"), "{log}");
    let (_, bytes) = spool_segments(&spool);
    assert!(bytes > 0 && bytes <= 1 << 20, "{bytes}");

    // The collector comes up and the agent restarts: what the spool kept is delivered, the oldest are gone.
    let collector = Collector::start(&store, port);
    let restarted_at = now_ns();
    // A larger bound now, so the new rounds pushed while the old ones are replayed cannot evict them.
    let agent = start_agent(
        &url,
        &state,
        &[&flags[..], &["--spool-max-bytes", "16777216"]].concat(),
    );
    wait_until(Duration::from_secs(60), "spool replayed", || {
        collector
            .cpu_times(ID, "cpu-total")
            .last()
            .is_some_and(|&t| t > restarted_at + SEC)
    });
    assert!(agent.terminate().success());
    let kept: Vec<i64> = ["cpu", "mem", "system"]
        .iter()
        .flat_map(|m| {
            collector
                .sql(&format!(
                    "SELECT CAST(time AS BIGINT) AS t FROM {m} WHERE agent_id = '{ID}' AND \
                     CAST(time AS BIGINT) < {stopped_at}"
                ))
                .into_iter()
                .map(|r| r["t"].as_i64().unwrap())
        })
        .collect();
    if kept.len() as u64 != spooled {
        let logs: String = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".stderr"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect::<String>()
            .lines()
            .filter(|l| !l.contains("push to collector failed"))
            .map(|l| l.chars().take(400).collect::<String>() + "\n")
            .collect();
        panic!(
            "{} of the {spooled} spooled batches delivered:\n{logs}",
            kept.len()
        );
    }
    assert!(
        kept.len() as u64 * BATCH_BYTES <= 1 << 20,
        "{} batches of {BATCH_BYTES} bytes cannot have fit in 1 MiB",
        kept.len()
    );
    let oldest = kept.iter().min().copied().unwrap();
    assert!(
        oldest > started_at + 2 * SEC,
        "the oldest rounds were kept: oldest row at +{:.1} s",
        (oldest - started_at) as f64 / 1e9
    );
    eprintln!(
        "bound: {dropped} batches dropped, {} kept, oldest kept from +{:.1} s",
        kept.len(),
        (oldest - started_at) as f64 / 1e9
    );
    collector.assert_exactly_once(ID);
}
