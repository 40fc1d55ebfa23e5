//! Pull mode end to end: a real agent serves its batches (`--listen`, no collector), a real collector pulls them
//! (`pull_targets` in its config file); SQL sees the same tables and identity tags as in push mode; the agent's
//! `/metrics` page is read by an independent Prometheus text parser (Python's `prometheus_client`); the collector
//! reports the target up.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    CollectorProc, agent_bin, free_port, http_get, http_request, parse_exposition, wait_until,
};
use serde_json::Value;

const MEASUREMENTS: [&str; 5] = ["cpu", "mem", "disk", "net", "system"];

const IDENTITY: [(&str, &str); 7] = [
    ("ns_id", "ns-pull"),
    ("mcis_id", "mcis-p"),
    ("vm_id", "vm-p1"),
    ("csp", "gcp"),
    ("region", "asia-northeast3"),
    ("hostname", "pull-host"),
    ("agent_id", "agent-pull"),
];

/// A child process, killed when dropped (its stderr is printed if the test failed).
struct Guard {
    child: Child,
    name: &'static str,
    stderr_log: PathBuf,
}

impl Guard {
    fn spawn(name: &'static str, command: &mut Command, stderr_log: PathBuf) -> Guard {
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Guard {
            child,
            name,
            stderr_log,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} stderr ---\n{}",
                self.name,
                std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
            );
        }
    }
}

/// A pull-mode agent (`--listen`, no collector) with the identity of [`IDENTITY`]; returns once `/health` answers.
fn start_pull_agent(listen: &str, state_dir: &Path) -> Guard {
    start_pull_agent_with_token(listen, state_dir, None)
}

/// [`start_pull_agent`], with `pull_token` (`DAMSELFLY_PULL_TOKEN`) when given.
fn start_pull_agent_with_token(listen: &str, state_dir: &Path, pull_token: Option<&str>) -> Guard {
    start_pull_agent_with(listen, state_dir, pull_token, None)
}

/// [`start_pull_agent`], with `pull_token` when given, and with the config file of `tls` (the agent serves TLS)
/// when given: then `/health` is waited for over HTTPS with its CA.
fn start_pull_agent_with(
    listen: &str,
    state_dir: &Path,
    pull_token: Option<&str>,
    tls: Option<(&Path, &Path)>,
) -> Guard {
    let mut command = Command::new(agent_bin());
    if let Some((config, _)) = tls {
        command.arg("--config").arg(config);
    }
    match pull_token {
        Some(token) => command.env("DAMSELFLY_PULL_TOKEN", token),
        None => command.env_remove("DAMSELFLY_PULL_TOKEN"),
    };
    command
        .args(["--listen", listen, "--interval", "1"])
        .arg("--state-dir")
        .arg(state_dir)
        .args([
            "--ns",
            "ns-pull",
            "--mcis",
            "mcis-p",
            "--vm",
            "vm-p1",
            "--csp",
            "gcp",
            "--region",
            "asia-northeast3",
            "--hostname",
            "pull-host",
            "--agent-id",
            "agent-pull",
        ])
        .env("RUST_LOG", "info")
        .env_remove("DAMSELFLY_COLLECTOR");
    let agent = Guard::spawn(
        "damselfly-agent (pull)",
        &mut command,
        state_dir.with_extension("agent.stderr"),
    );
    wait_until(Duration::from_secs(30), "agent /health", || match tls {
        Some((_, ca)) => common::https_ok(&format!("https://{listen}/health"), ca),
        None => http_get(&format!("http://{listen}/health")).is_ok_and(|(code, _)| code == 200),
    });
    agent
}

fn get_json(url: &str) -> Value {
    let (code, body) = http_get(url).unwrap();
    assert_eq!(code, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
}

#[test]
fn collector_pulls_from_a_listening_agent() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let agent = start_pull_agent(&listen, &dir.path().join("agent"));
    let agent_url = format!("http://{listen}");

    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "pull_targets = [\"{agent_url}\"]\npull_interval_secs = 1\npull_timeout_secs = 5\n"
        ),
    )
    .unwrap();
    let collector = CollectorProc::start(
        &dir.path().join("store"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--flush-interval",
            "3600",
        ],
    );

    // The same tables as push mode, with the agent's identity on every row.
    wait_until(
        Duration::from_secs(60),
        "pulled rows in every measurement",
        || MEASUREMENTS.iter().all(|m| collector.count(m) >= 2),
    );
    for m in MEASUREMENTS {
        let rows = collector.sql(&format!(
            "SELECT DISTINCT ns_id, mcis_id, vm_id, csp, region, hostname, agent_id FROM {m}"
        ));
        assert_eq!(rows.len(), 1, "{m}: one identity expected, got {rows:?}");
        for (key, value) in IDENTITY {
            assert_eq!(rows[0][key], value, "{m}.{key}");
        }
    }
    let total = collector.sql("SELECT count(*) AS n FROM cpu WHERE cpu = 'cpu-total'");
    assert!(total[0]["n"].as_u64().unwrap() >= 2, "{total:?}");

    // The collector reports the target up, with what it pulled.
    wait_until(Duration::from_secs(30), "target up with batches", || {
        let targets = get_json(&format!("{}/api/v1/pull/targets", collector.http));
        targets.as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t["url"] == agent_url.as_str()
                    && t["status"] == "up"
                    && t["agent_id"] == "agent-pull"
                    && t["batches_pulled"].as_u64() >= Some(2)
                    && t["ack_through_seq"].as_u64() > Some(0)
                    && t["last_success_unix_ms"].is_u64()
                    && t["consecutive_failures"] == 0
            })
        })
    });

    // The agent forgets what the collector acknowledged: its queue stays short.
    let health = get_json(&format!("{agent_url}/health"));
    assert_eq!(health["mode"], "pull", "{health}");
    assert_eq!(health["agent_id"], "agent-pull", "{health}");
    assert!(health["last_round_unix_nano"].is_i64() || health["last_round_unix_nano"].is_u64());
    wait_until(Duration::from_secs(30), "agent queue drained", || {
        get_json(&format!("{agent_url}/health"))["pending_batches"].as_u64() <= Some(3)
    });

    // /metrics is valid Prometheus text, per an independent parser.
    let (code, text) = http_get(&format!("{agent_url}/metrics")).unwrap();
    assert_eq!(code, 200);
    let families = parse_exposition(&text);
    let idle = &families["damselfly_cpu_usage_idle"];
    assert_eq!(idle["type"], "gauge");
    let total = idle["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[1]["cpu"] == "cpu-total")
        .unwrap_or_else(|| panic!("no cpu=\"cpu-total\" sample in {idle}"));
    assert_eq!(total[1]["agent_id"], "agent-pull");
    assert_eq!(total[1]["ns_id"], "ns-pull");
    let value: f64 = total[2].as_str().unwrap().parse().unwrap();
    assert!((0.0..=100.0).contains(&value), "{value}");
    assert_eq!(families["damselfly_mem_used"]["type"], "gauge");
    // Cumulative network counters are typed as counters (the parser names a counter family without `_total`).
    assert_eq!(families["damselfly_net_bytes_recv"]["type"], "counter");

    drop(agent);
    collector.proc.terminate();
}

/// The VictoriaMetrics single-node server (Debian package `victoria-metrics`, installed by `scripts/test.sh`): its
/// scraper is vmagent's.
fn victoria_metrics_bin() -> String {
    let bin = std::env::var("DAMSELFLY_TEST_VICTORIA_METRICS")
        .unwrap_or_else(|_| "victoria-metrics".into());
    let ok = Command::new(&bin)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "cannot run {bin}: install the Debian package victoria-metrics (`bash scripts/test.sh` does), or set \
         DAMSELFLY_TEST_VICTORIA_METRICS to its binary"
    );
    bin
}

/// Percent-encodes a query-string value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn victoria_metrics_scrapes_the_agent() {
    let vm_bin = victoria_metrics_bin();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_pull_agent(&listen, &dir.path().join("agent"));

    let scrape = dir.path().join("scrape.yml");
    std::fs::write(
        &scrape,
        format!(
            "scrape_configs:\n  - job_name: damselfly\n    scrape_interval: 1s\n    static_configs:\n      - \
             targets: [\"{listen}\"]\n"
        ),
    )
    .unwrap();
    let vm_addr = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(vm_bin);
    command
        .arg(format!(
            "-storageDataPath={}",
            dir.path().join("vm").display()
        ))
        .arg(format!("-httpListenAddr={vm_addr}"))
        .arg(format!("-promscrape.config={}", scrape.display()))
        .args([
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=WARN",
        ]);
    let _vm = Guard::spawn(
        "victoria-metrics",
        &mut command,
        dir.path().join("vm.stderr"),
    );
    let vm = format!("http://{vm_addr}");

    // The scrape succeeds: target up, no error.
    wait_until(
        Duration::from_secs(60),
        "the agent scraped without error",
        || {
            let Ok((200, body)) = http_get(&format!("{vm}/api/v1/targets")) else {
                return false;
            };
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            v["data"]["activeTargets"]
                .as_array()
                .is_some_and(|t| t.len() == 1 && t[0]["health"] == "up" && t[0]["lastError"] == "")
        },
    );

    // The samples are stored with their labels and types: a gauge and a counter.
    let query = |q: &str| -> Vec<Value> {
        let (code, body) = http_get(&format!("{vm}/api/v1/query?query={}", encode(q))).unwrap();
        assert_eq!(code, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    };
    let mut idle = Vec::new();
    wait_until(
        Duration::from_secs(60),
        "damselfly_cpu_usage_idle in VictoriaMetrics",
        || {
            idle = query(r#"damselfly_cpu_usage_idle{cpu="cpu-total"}"#);
            !idle.is_empty()
        },
    );
    assert_eq!(idle.len(), 1, "{idle:?}");
    let metric = &idle[0]["metric"];
    for (key, value) in IDENTITY {
        assert_eq!(metric[key], value, "{key} in {metric}");
    }
    let value: f64 = idle[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((0.0..=100.0).contains(&value), "{value}");
    assert!(!query("damselfly_net_bytes_recv").is_empty());
    assert!(!query("damselfly_agent_last_round_timestamp_seconds").is_empty());

    // Not one line of the page was refused by the parser.
    let (_, own) = http_get(&format!("{vm}/metrics")).unwrap();
    let invalid: f64 = own
        .lines()
        .filter(|l| l.starts_with("vm_rows_invalid_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(invalid, 0.0, "VictoriaMetrics refused rows");
}

/// An agent with a `pull_token`: a Pull without it (or with another) is refused and acknowledges nothing, so a
/// stranger cannot make the agent drop its batches; `/metrics` wants it too; a collector with the token in its
/// `pull_token_file` pulls, one without it is refused and says why. An agent listening beyond loopback without a
/// pull token refuses to start unless told `--insecure`.
#[test]
fn pulling_needs_the_agents_pull_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "pull-secret-7f3a";
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_pull_agent_with_token(&listen, &dir.path().join("agent"), Some(token));
    let agent_url = format!("http://{listen}");
    wait_until(Duration::from_secs(30), "batches waiting", || {
        get_json(&format!("{agent_url}/health"))["pending_batches"].as_u64() >= Some(2)
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pull = |authorization: Option<&str>| {
        runtime.block_on(async {
            let mut client =
                damselfly_proto::v1::metrics_source_client::MetricsSourceClient::connect(
                    agent_url.clone(),
                )
                .await
                .unwrap();
            let mut request = tonic::Request::new(damselfly_proto::v1::PullRequest {
                ack_through_seq: u64::MAX,
                max_batches: 1,
            });
            if let Some(value) = authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.parse().unwrap());
            }
            client.pull(request).await
        })
    };
    for stranger in [None, Some("Bearer guess"), Some("pull-secret-7f3a")] {
        let status = pull(stranger).expect_err("a pull without the token was served");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("pull token"), "{status:?}");
    }
    let health = get_json(&format!("{agent_url}/health"));
    assert_eq!(health["batches_acked"], 0, "{health}");
    assert!(health["pending_batches"].as_u64() >= Some(2), "{health}");

    let (code, body) = http_request("GET", &format!("{agent_url}/metrics"), &[], b"").unwrap();
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("pull token"));
    let bearer = format!("Bearer {token}");
    let (code, _) = http_request(
        "GET",
        &format!("{agent_url}/metrics"),
        &[("Authorization", &bearer)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200);

    // A collector without the token: the target is down, and says why.
    let collector_config = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "pull_targets = [\"{agent_url}\"]\npull_interval_secs = 1\npull_timeout_secs = 5\n{extra}"
            ),
        )
        .unwrap();
        path
    };
    let without = collector_config("without.toml", "");
    let collector = CollectorProc::start(
        &dir.path().join("store-without"),
        &["--config", without.to_str().unwrap()],
    );
    wait_until(
        Duration::from_secs(30),
        "the target down for the token",
        || {
            let targets = get_json(&format!("{}/api/v1/pull/targets", collector.http));
            targets.as_array().is_some_and(|t| {
                t.iter().any(|t| {
                    t["status"] == "down"
                        && t["last_error"].as_str().is_some_and(|e| {
                            e.contains("Unauthenticated") && e.contains("pull token")
                        })
                })
            })
        },
    );
    assert_eq!(collector.count("cpu"), 0);
    collector.proc.terminate();

    // With the token in its pull_token_file, the collector pulls, and the agent's queue drains.
    let token_file = dir.path().join("pull.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let with = collector_config(
        "with.toml",
        &format!("pull_token_file = {:?}\n", token_file.to_str().unwrap()),
    );
    let collector = CollectorProc::start(
        &dir.path().join("store-with"),
        &["--config", with.to_str().unwrap()],
    );
    wait_until(Duration::from_secs(60), "pulled rows", || {
        collector.count("cpu") >= 2
    });
    wait_until(Duration::from_secs(30), "agent queue drained", || {
        get_json(&format!("{agent_url}/health"))["pending_batches"].as_u64() <= Some(3)
    });
    collector.proc.terminate();

    // Beyond loopback without a pull token: refused, unless --insecure.
    let check = |extra: &[&str]| {
        Command::new(agent_bin())
            .args(["--listen", "0.0.0.0:0", "--check-config"])
            .args(extra)
            .env_remove("DAMSELFLY_PULL_TOKEN")
            .env_remove("DAMSELFLY_COLLECTOR")
            .output()
            .unwrap()
    };
    let refused = check(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("pull_token") && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert!(check(&["--insecure"]).status.success());
}

/// An agent whose pull port serves TLS (`listen_tls_cert_file`): a collector with `pull_ca_file` pulls from its
/// `https://` URL (with the pull token); one that tries plaintext on that port gets nothing.
#[test]
fn pulling_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    common::certs_init(&certs);
    let ca = certs.join("ca.pem");
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "listen_tls_cert_file = {:?}\nlisten_tls_key_file = {:?}\n",
            certs.join("collector.pem").to_str().unwrap(),
            certs.join("collector-key.pem").to_str().unwrap()
        ),
    )
    .unwrap();
    let token = "pull-over-tls";
    let listen = format!("127.0.0.1:{}", free_port());
    let _agent = start_pull_agent_with(
        &listen,
        &dir.path().join("agent"),
        Some(token),
        Some((&agent_config, &ca)),
    );
    let token_file = dir.path().join("pull.token");
    std::fs::write(&token_file, token).unwrap();

    let start = |name: &str, url: &str| {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "pull_targets = [\"{url}\"]\npull_interval_secs = 1\npull_timeout_secs = 5\n\
                 pull_token_file = {:?}\npull_ca_file = {:?}\n",
                token_file.to_str().unwrap(),
                ca.to_str().unwrap()
            ),
        )
        .unwrap();
        CollectorProc::start(
            &dir.path().join(name),
            &["--config", config.to_str().unwrap()],
        )
    };
    let plain = start("plain", &format!("http://{listen}"));
    wait_until(Duration::from_secs(30), "plaintext pulls failing", || {
        let targets = get_json(&format!("{}/api/v1/pull/targets", plain.http));
        targets.as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["status"] == "down" && t["consecutive_failures"].as_u64() >= Some(2))
        })
    });
    assert_eq!(plain.count("cpu"), 0);
    plain.proc.terminate();

    let secure = start("secure", &format!("https://{listen}"));
    wait_until(Duration::from_secs(60), "rows pulled over TLS", || {
        secure.count("cpu") >= 2
    });
    let rows = secure.sql("SELECT DISTINCT agent_id FROM cpu");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["agent_id"], "agent-pull");
    secure.proc.terminate();
}
