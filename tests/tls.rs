//! TLS (issue 10): `damselfly certs init` makes a CA and certificates; a collector with `[tls]` speaks only TLS on
//! gRPC, HTTP and the PostgreSQL port; a real agent with the CA (and a client certificate, where the collector
//! asks for one) pushes over it; plaintext clients are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{CollectorProc, Proc, agent_bin, damselfly_bin, wait_until};

fn certs_init(dir: &Path) {
    common::certs_init(dir);
    for f in [
        "ca.pem",
        "collector.pem",
        "collector-key.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    // A second run does not overwrite a deployment's keys.
    let again = Command::new(damselfly_bin())
        .args(["certs", "init", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

fn config(dir: &Path, mtls: bool) -> std::path::PathBuf {
    let certs = dir.join("certs");
    let mut text = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        certs.join("collector.pem"),
        certs.join("collector-key.pem")
    );
    if mtls {
        text.push_str(&format!("client_ca_file = {:?}\n", certs.join("ca.pem")));
    }
    let path = dir.join(if mtls { "mtls.toml" } else { "tls.toml" });
    std::fs::write(&path, text).unwrap();
    path
}

/// `curl` over HTTPS with the deployment's CA: (status, body).
fn curl(url: &str, ca: Option<&Path>, data: Option<&str>) -> (bool, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "--max-time", "10"]);
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    if let Some(d) = data {
        command.args(["--data-binary", d]);
    }
    let out = command.arg(url).output().expect("run curl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn agent(dir: &Path, name: &str, grpc: &str, client_cert: bool) -> Proc {
    let certs = dir.join("certs");
    let state = dir.join(name);
    let mut text = format!(
        "collector = {grpc:?}\ninterval = 1\nstate_dir = {:?}\nvm_id = {name:?}\ntls_ca_file = {:?}\n",
        state,
        certs.join("ca.pem")
    );
    if client_cert {
        text.push_str(&format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
            certs.join("agent.pem"),
            certs.join("agent-key.pem")
        ));
    }
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, text).unwrap();
    let stderr_log = dir.join(format!("{name}.stderr"));
    let child = Command::new(agent_bin())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .unwrap();
    Proc::adopt(child, "damselfly-agent", stderr_log)
}

fn rows_of(collector_https: &str, ca: &Path, vm: &str) -> u64 {
    let (ok, body) = curl(
        &format!("{collector_https}/api/v1/sql"),
        Some(ca),
        Some(&format!(
            "SELECT count(*) AS n FROM cpu WHERE vm_id = '{vm}'"
        )),
    );
    if !ok {
        return 0;
    }
    serde_json::from_str::<Vec<serde_json::Value>>(&body)
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r["n"].as_u64()))
        .unwrap_or(0)
}

#[test]
fn tls_on_every_port_and_mutual_tls_for_agents() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    certs_init(&certs);
    let ca = certs.join("ca.pem");

    let tls = config(dir.path(), false);
    let collector = CollectorProc::start_with_tls(
        &dir.path().join("data"),
        &["--config", tls.to_str().unwrap(), "--pg", "127.0.0.1:0"],
        &ca,
    );
    assert!(collector.grpc.starts_with("https://"), "{}", collector.grpc);
    assert!(collector.http.starts_with("https://"), "{}", collector.http);

    // HTTPS with the CA works; plain HTTP on the same port, or an unknown CA, does not.
    let (ok, body) = curl(&format!("{}/health", collector.http), Some(&ca), None);
    assert!(ok, "{body}");
    let plain = collector.http.replace("https://", "http://");
    let (ok, body) = curl(&format!("{plain}/health"), None, None);
    assert!(
        !ok || !body.contains("buffered_rows"),
        "plaintext answered: {body}"
    );
    let (ok, _) = curl(&format!("{}/health", collector.http), None, None);
    assert!(!ok, "a certificate of an unknown CA was accepted");

    // A real agent pushes over TLS (it has the CA); rows arrive.
    let with_ca = agent(dir.path(), "vm-tls", &collector.grpc, false);
    wait_until(Duration::from_secs(30), "rows over TLS", || {
        rows_of(&collector.http, &ca, "vm-tls") > 0
    });
    // An agent told to use plaintext gRPC against the TLS port gets nowhere.
    let plain_grpc = collector.grpc.replace("https://", "http://");
    let plaintext = common::start_agent(
        &plain_grpc,
        &dir.path().join("plain"),
        &["--vm", "vm-plain"],
    );

    // psql: sslmode=verify-full with the CA works; a client that does not ask for SSL is refused.
    let port = collector.pg.clone().unwrap();
    let port = port.rsplit(':').next().unwrap().to_string();
    let psql = |sslmode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=localhost port={port} user=a dbname=b sslmode={sslmode} sslrootcert={}",
                ca.display()
            ))
            .args(["-X", "-A", "-t", "-c", "SELECT 40 + 2"])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    };
    let out = psql("verify-full");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = psql("disable");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires SSL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rows_of(&collector.http, &ca, "vm-plain"), 0);
    plaintext.kill();
    with_ca.kill();
    assert!(collector.proc.terminate().success());

    // Mutual TLS: only an agent with a certificate of the CA may push.
    let mtls = config(dir.path(), true);
    let collector = CollectorProc::start_with_tls(
        &dir.path().join("data2"),
        &["--config", mtls.to_str().unwrap()],
        &ca,
    );
    let no_cert = agent(dir.path(), "vm-nocert", &collector.grpc, false);
    let with_cert = agent(dir.path(), "vm-cert", &collector.grpc, true);
    wait_until(Duration::from_secs(30), "rows over mutual TLS", || {
        rows_of(&collector.http, &ca, "vm-cert") > 0
    });
    assert_eq!(rows_of(&collector.http, &ca, "vm-nocert"), 0);
    no_cert.kill();
    with_cert.kill();
    assert!(collector.proc.terminate().success());
}

/// `damselfly sql` against `url`, with `DAMSELFLY_CA_FILE` = `ca` when given: (success, stdout + stderr).
fn cli_sql(url: &str, ca: Option<&Path>, sql: &str) -> (bool, String) {
    let mut command = Command::new(damselfly_bin());
    command
        .args(["sql", "--format", "csv", "--url", url, sql])
        .env_remove("DAMSELFLY_CA_FILE");
    if let Some(ca) = ca {
        command.env("DAMSELFLY_CA_FILE", ca);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Two shards with `[tls]`: they reach each other over HTTPS only when they trust the deployment's CA
/// (`peer_ca_file`); then a real agent pushes through them over TLS, a query through either shard sees the rows of
/// both, and the CLI reaches them with `DAMSELFLY_CA_FILE`.
#[test]
fn shards_talk_to_each_other_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    certs_init(&certs);
    let ca = certs.join("ca.pem");
    let ports: Vec<(u16, u16)> = (0..2)
        .map(|_| (common::free_port(), common::free_port()))
        .collect();
    let shards_file = dir.path().join("shards.toml");
    let mut text = String::new();
    for (i, (grpc, http)) in ports.iter().enumerate() {
        text.push_str(&format!(
            "[[shards]]\nid = \"s{i}\"\ngrpc_url = \"https://127.0.0.1:{grpc}\"\nhttp_url = \"https://127.0.0.1:{http}\"\n\n"
        ));
    }
    std::fs::write(&shards_file, text).unwrap();
    let start = |config: &Path, run: &str| -> Vec<CollectorProc> {
        ports
            .iter()
            .enumerate()
            .map(|(i, (grpc, http))| {
                CollectorProc::start_at_with_tls(
                    &dir.path().join(format!("{run}-s{i}")),
                    &format!("127.0.0.1:{grpc}"),
                    &format!("127.0.0.1:{http}"),
                    &[
                        "--shard-id",
                        &format!("s{i}"),
                        "--shards-file",
                        shards_file.to_str().unwrap(),
                        "--shared-dir",
                        dir.path().join(format!("{run}-shared")).to_str().unwrap(),
                        "--config",
                        config.to_str().unwrap(),
                    ],
                    &ca,
                )
            })
            .collect()
    };
    let shards_of = |via: &CollectorProc| -> Vec<serde_json::Value> {
        let (ok, body) = curl(&format!("{}/api/v1/shards", via.http), Some(&ca), None);
        if !ok {
            return Vec::new();
        }
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["shards"].as_array().cloned())
            .unwrap_or_default()
    };

    // Without the CA, a shard's calls to the other fail certificate verification: it sees its peer as down and
    // says why.
    let untrusting = config(dir.path(), false);
    let procs = start(&untrusting, "untrusting");
    wait_until(
        Duration::from_secs(20),
        "s0 sees s1 down for an unknown issuer",
        || {
            shards_of(&procs[0]).iter().any(|s| {
                s["id"] == "s1"
                    && s["live"] == false
                    && s["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("UnknownIssuer"))
            })
        },
    );
    for p in procs {
        assert!(p.proc.terminate().success());
    }

    let trusting = dir.path().join("trusting.toml");
    std::fs::write(
        &trusting,
        format!(
            "{}peer_ca_file = {:?}\n",
            std::fs::read_to_string(&untrusting).unwrap(),
            ca
        ),
    )
    .unwrap();
    let procs = start(&trusting, "trusting");
    for p in &procs {
        wait_until(Duration::from_secs(20), "both shards live", || {
            let shards = shards_of(p);
            shards.len() == 2 && shards.iter().all(|s| s["live"] == true)
        });
    }
    // A row buffered on each shard; a query through either sees both (the other's buffer comes over HTTPS).
    for (i, p) in procs.iter().enumerate() {
        let (ok, body) = curl(
            &format!("{}/api/v2/write?bucket=a", p.http),
            Some(&ca),
            Some(&format!("tlsrows,shard=s{i} v=1")),
        );
        assert!(ok, "{body}");
    }
    for p in &procs {
        let (ok, body) = cli_sql(&p.http, Some(&ca), "SELECT count(*) AS n FROM tlsrows");
        assert!(ok, "{body}");
        assert_eq!(body.lines().nth(1), Some("2"), "through {}: {body}", p.http);
    }
    // The CLI without the CA refuses the private certificate, and says so.
    let (ok, body) = cli_sql(&procs[0].http, None, "SELECT 1");
    assert!(!ok, "{body}");
    assert!(body.contains("UnknownIssuer"), "{body}");

    // A real agent that reaches s0 is sent to its owner, over TLS, and its rows arrive.
    let agent = agent(dir.path(), "vm-sharded", &procs[0].grpc, false);
    wait_until(Duration::from_secs(30), "the agent's rows", || {
        rows_of(&procs[1].http, &ca, "vm-sharded") > 0
    });
    agent.kill();
    for p in procs {
        assert!(p.proc.terminate().success());
    }
}
