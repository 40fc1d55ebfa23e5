//! `damselfly agent install --ssh` against a real OpenSSH server (Debian's `openssh-server`, installed by
//! `scripts/test.sh`) started on a 127.0.0.1 high port with throw-away keys. The "VM" is this machine; the install
//! directory is a temporary one and, with no systemd here, the agent starts as a plain background process.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{CollectorProc, Proc, agent_bin, damselfly_bin, wait_until};

struct Sshd {
    _proc: Proc,
    port: u16,
    client_key: PathBuf,
    host_public: String,
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client) must be installed: run scripts/test.sh");
    assert!(status.success());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sshd(dir: &Path) -> Sshd {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "/usr/sbin/sshd missing: run the suite with scripts/test.sh (installs openssh-server)"
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("host_key");
    let client_key = dir.join("client_key");
    keygen(&host_key);
    keygen(&client_key);
    let authorized = dir.join("authorized_keys");
    std::fs::copy(client_key.with_extension("pub"), &authorized).unwrap();
    let port = free_port();
    let config = dir.join("sshd_config");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nUsePAM no\n\
             StrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowUsers {user}\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let log = dir.join("sshd.log");
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let proc = Proc::adopt(child, "sshd", log);
    wait_until(Duration::from_secs(10), "sshd listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let host_public = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
    Sshd {
        _proc: proc,
        port,
        client_key,
        host_public: host_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

fn install(
    sshd: &Sshd,
    known_hosts: &Path,
    install_dir: &Path,
    collector: &CollectorProc,
    extra: &[&str],
) -> Output {
    Command::new(damselfly_bin())
        .args(["agent", "install", "--ssh"])
        .arg(format!("{}@127.0.0.1:{}", user(), sshd.port))
        .arg("--identity")
        .arg(&sshd.client_key)
        .arg("--known-hosts")
        .arg(known_hosts)
        .arg("--agent-binary")
        .arg(agent_bin())
        .arg("--install-dir")
        .arg(install_dir)
        .args([
            "--collector",
            &collector.grpc,
            "--collector-http",
            &collector.http,
        ])
        .args([
            "--interval",
            "1",
            "--ns",
            "ns-ssh",
            "--vm",
            "vm-ssh",
            "--no-systemd",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn stop_installed_agent(install_dir: &Path) {
    if let Ok(pid) = std::fs::read_to_string(install_dir.join("agent.pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
}

#[test]
fn installs_over_ssh_checks_host_keys_and_names_failing_steps() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(dir.path());
    let collector = CollectorProc::start(&dir.path().join("store"), &[]);
    let install_dir = dir.path().join("vm");

    // 1. Unknown host key, no trust-on-first-use: refused at `connect`, with advice.
    let empty_known = dir.path().join("known_hosts_empty");
    std::fs::write(&empty_known, "").unwrap();
    let out = install(
        &sshd,
        &empty_known,
        &install_dir,
        &collector,
        &["--wait", "5"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse an unknown host key");
    assert!(
        stderr.contains("step `connect`") && stderr.contains("--trust-on-first-use"),
        "{stderr}"
    );
    assert!(!install_dir.join("bin").exists(), "nothing copied");

    // 2. A recorded key that does not match: refused, even with trust-on-first-use.
    let wrong = dir.path().join("wrong_key");
    keygen(&wrong);
    let wrong_pub = std::fs::read_to_string(wrong.with_extension("pub")).unwrap();
    let wrong_known = dir.path().join("known_hosts_wrong");
    let wrong_line = wrong_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(
        &wrong_known,
        format!("[127.0.0.1]:{} {wrong_line}\n", sshd.port),
    )
    .unwrap();
    let out = install(
        &sshd,
        &wrong_known,
        &install_dir,
        &collector,
        &["--wait", "5", "--trust-on-first-use"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse a changed host key");
    assert!(
        stderr.contains("step `connect`") && stderr.contains("CHANGED"),
        "{stderr}"
    );

    // 3. The right key: copied, configured, started, and its heartbeat reaches the collector.
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", sshd.port, sshd.host_public),
    )
    .unwrap();
    let out = install(&sshd, &known, &install_dir, &collector, &["--wait", "30"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "install failed:\n{stdout}\n{stderr}");
    for step in [
        "connect",
        "inspect",
        "copy",
        "check-config",
        "start",
        "heartbeat",
    ] {
        assert!(stdout.contains(step), "step {step} not reported: {stdout}");
    }
    assert!(install_dir.join("bin/damselfly-agent").exists());
    let config = std::fs::read_to_string(install_dir.join("agent.toml")).unwrap();
    assert!(config.contains("ns-ssh"), "{config}");
    wait_until(
        Duration::from_secs(30),
        "rows from the installed agent",
        || collector.count("cpu") > 0,
    );
    let rows = collector.sql("SELECT DISTINCT ns_id, vm_id FROM cpu");
    assert_eq!(
        rows,
        vec![serde_json::json!({"ns_id": "ns-ssh", "vm_id": "vm-ssh"})]
    );
    stop_installed_agent(&install_dir);

    // 4. Trust on first use: an empty known-hosts file learns the key.
    let tofu_known = dir.path().join("known_hosts_tofu");
    std::fs::write(&tofu_known, "").unwrap();
    let out = install(
        &sshd,
        &tofu_known,
        &install_dir,
        &collector,
        &["--wait", "30", "--trust-on-first-use"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let learned = std::fs::read_to_string(&tofu_known).unwrap();
    assert!(
        learned.contains(sshd.host_public.split_whitespace().nth(1).unwrap()),
        "{learned}"
    );
    stop_installed_agent(&install_dir);
}

#[test]
fn an_agent_that_cannot_reach_the_collector_fails_at_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(dir.path());
    let collector = CollectorProc::start(&dir.path().join("store"), &[]);
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", sshd.port, sshd.host_public),
    )
    .unwrap();
    let install_dir = dir.path().join("vm");
    // The agent is told a gRPC port where nothing listens; the heartbeat is watched on the real collector.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = Command::new(damselfly_bin())
        .args(["agent", "install", "--ssh"])
        .arg(format!("{}@127.0.0.1:{}", user(), sshd.port))
        .arg("--identity")
        .arg(&sshd.client_key)
        .arg("--known-hosts")
        .arg(&known)
        .arg("--agent-binary")
        .arg(agent_bin())
        .arg("--install-dir")
        .arg(&install_dir)
        .args([
            "--collector",
            &closed,
            "--collector-http",
            &collector.http,
            "--wait",
            "3",
            "--no-systemd",
        ])
        .output()
        .unwrap();
    stop_installed_agent(&install_dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("step `heartbeat`") && stderr.contains("cannot reach the collector"),
        "{stderr}"
    );
}
