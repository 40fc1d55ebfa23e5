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
    let out = Command::new(damselfly_bin())
        .args(["certs", "init", "--host", "localhost,127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
