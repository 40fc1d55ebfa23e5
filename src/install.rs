//! `damselfly agent install --ssh user@host[:port]`: installs the agent on a VM over SSH, starts it, and waits for
//! its first heartbeat at the collector.
//!
//! It drives the system's OpenSSH client (`ssh`), so keys, agents and `~/.ssh/config` work as operators expect.
//! Host keys are always checked: against `--known-hosts` (default `~/.ssh/known_hosts`), or, with
//! `--trust-on-first-use`, a host not yet in that file is added (OpenSSH `accept-new`); a key that *changed* is
//! refused either way. Every step has a name; a failure says which step failed, the command's own error, and what
//! to do about it.
//!
//! Steps: `connect` → `inspect` (OS, architecture, systemd) → `copy` (binary and config) → `check-config` (the
//! agent validates its config on the VM) → `start` (a systemd unit, or without systemd a plain background start
//! with a pid file and a log) → `heartbeat` (polls the collector's `GET /api/v1/agents`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use damselfly_agent::AgentConfig;

/// Where and how to install.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    /// `user@host` or `user@host:port`.
    pub target: String,
    /// Private key for `ssh -i`.
    pub identity: Option<PathBuf>,
    /// Known-hosts file; default the user's.
    pub known_hosts: Option<PathBuf>,
    /// Add an unknown host key to `known_hosts` (never accept a changed one).
    pub trust_on_first_use: bool,
    /// The agent binary to copy (built for the VM's OS and architecture).
    pub agent_binary: PathBuf,
    /// The agent's configuration, as it will run on the VM.
    pub config: AgentConfig,
    /// Directory on the VM: `bin/damselfly-agent`, `agent.toml`, `state/`, and without systemd `agent.log`, `agent.pid`.
    pub install_dir: String,
    /// Collector HTTP API to watch for the heartbeat; `None` skips the `heartbeat` step.
    pub collector_http: Option<String>,
    /// How long to wait for the heartbeat.
    pub wait: Duration,
    /// Never use systemd even when the VM has it.
    pub no_systemd: bool,
}

/// Which step failed and why.
#[derive(Debug, thiserror::Error)]
#[error("install failed at step `{step}`: {message}")]
pub struct InstallError {
    pub step: &'static str,
    pub message: String,
}

fn fail(step: &'static str, message: impl Into<String>) -> InstallError {
    InstallError {
        step,
        message: message.into(),
    }
}

/// What a successful install did.
#[derive(Debug, Clone)]
pub struct InstallReport {
    pub agent_id: String,
    pub host: String,
    pub service: &'static str,
    pub heartbeat_after: Option<Duration>,
}

struct Ssh {
    user_host: String,
    port: Option<u16>,
    options: Vec<String>,
}

impl Ssh {
    fn new(plan: &InstallPlan) -> Result<Ssh, InstallError> {
        let (user_host, port) = split_target(&plan.target).map_err(|m| fail("connect", m))?;
        let known_hosts = match &plan.known_hosts {
            Some(p) => p.clone(),
            None => default_known_hosts().map_err(|m| fail("connect", m))?,
        };
        let mut options = vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            format!(
                "StrictHostKeyChecking={}",
                if plan.trust_on_first_use {
                    "accept-new"
                } else {
                    "yes"
                }
            ),
            "-o".into(),
            format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ];
        if let Some(key) = &plan.identity {
            options.push("-i".into());
            options.push(key.display().to_string());
            options.push("-o".into());
            options.push("IdentitiesOnly=yes".into());
        }
        Ok(Ssh {
            user_host,
            port,
            options,
        })
    }

    /// Runs `script` with `sh -c` on the VM, feeding `stdin`; returns stdout, or the step's error with stderr.
    fn run(
        &self,
        step: &'static str,
        script: &str,
        stdin: Option<&Path>,
    ) -> Result<String, InstallError> {
        let mut cmd = Command::new("ssh");
        cmd.args(&self.options);
        if let Some(port) = self.port {
            cmd.args(["-p", &port.to_string()]);
        }
        cmd.arg(&self.user_host)
            .arg(format!("sh -c {}", shell_quote(script)));
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        match stdin {
            Some(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| fail(step, format!("cannot read {}: {e}", path.display())))?;
                cmd.stdin(file);
            }
            None => {
                cmd.stdin(Stdio::null());
            }
        }
        let output = cmd.output().map_err(|e| {
            fail(
                step,
                format!("cannot run the OpenSSH client `ssh`: {e} (install openssh-client)"),
            )
        })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        Err(fail(
            step,
            explain_ssh_failure(output.status.code(), &stderr, &self.user_host),
        ))
    }
}

/// Turns OpenSSH's exit status and message into advice.
fn explain_ssh_failure(code: Option<i32>, stderr: &str, host: &str) -> String {
    let lower = stderr.to_ascii_lowercase();
    let hint = if lower.contains("host key verification failed")
        || lower.contains("no matching host key")
    {
        if lower.contains("changed") || lower.contains("remote host identification has changed") {
            " — the host key CHANGED since it was recorded: verify the VM's key out of band before touching \
             known_hosts"
        } else {
            " — the host key is not in the known-hosts file: verify it (e.g. `ssh-keyscan -p PORT HOST` compared with \
             the VM's console) and add it, or pass --trust-on-first-use"
        }
    } else if lower.contains("permission denied") {
        " — authentication failed: check the user and --identity key (the VM must have its public key in \
         authorized_keys)"
    } else if lower.contains("connection refused")
        || lower.contains("timed out")
        || lower.contains("no route")
    {
        " — the SSH server is not reachable: check the host, the port and firewalls"
    } else {
        ""
    };
    let status = code.map_or_else(
        || "killed by a signal".to_owned(),
        |c| format!("exit status {c}"),
    );
    if stderr.is_empty() {
        format!("ssh to {host} failed ({status}){hint}")
    } else {
        format!("ssh to {host} failed ({status}): {stderr}{hint}")
    }
}

fn split_target(target: &str) -> Result<(String, Option<u16>), String> {
    let (user, host_port) = target
        .split_once('@')
        .ok_or_else(|| format!("--ssh {target:?} must be user@host or user@host:port"))?;
    if user.is_empty() || host_port.is_empty() {
        return Err(format!(
            "--ssh {target:?} must be user@host or user@host:port"
        ));
    }
    match host_port.rsplit_once(':') {
        // An IPv6 address without a port, like [::1], has colons but ends with ']'.
        Some((host, port)) if !host_port.ends_with(']') => {
            let port: u16 = port.parse().map_err(|_| {
                format!("--ssh {target:?}: port {port:?} is not a number from 1 to 65535")
            })?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok((format!("{user}@{host}"), Some(port)))
        }
        _ => Ok((
            format!(
                "{user}@{}",
                host_port.trim_start_matches('[').trim_end_matches(']')
            ),
            None,
        )),
    }
}

fn default_known_hosts() -> Result<PathBuf, String> {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".ssh").join("known_hosts"))
        .ok_or_else(|| "HOME is not set: pass --known-hosts".to_owned())
}

/// Single-quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The systemd unit for the agent.
pub fn systemd_unit(install_dir: &str) -> String {
    format!(
        "[Unit]\n\
         Description=Damselfly agent (host metrics for the Damselfly collector)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\n\
         [Service]\n\
         ExecStart={install_dir}/bin/damselfly-agent --config {install_dir}/agent.toml\n\
         Restart=always\n\
         RestartSec=5\n\
         # SIGTERM lets the agent deliver what it holds; the rest stays in its disk spool.\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=15\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// Runs the whole installation, printing each step as it goes.
pub fn install(
    plan: &InstallPlan,
    progress: &mut dyn FnMut(&str),
) -> Result<InstallReport, InstallError> {
    plan.config.validate().map_err(|e| {
        fail(
            "prepare",
            format!("the agent configuration is invalid: {e}"),
        )
    })?;
    if !plan.agent_binary.is_file() {
        return Err(fail(
            "prepare",
            format!(
                "agent binary {} not found (build it with `cargo build --release -p damselfly-agent`, or pass \
                 --agent-binary)",
                plan.agent_binary.display()
            ),
        ));
    }
    if !plan.install_dir.starts_with('/') || plan.install_dir.contains(['\'', '\n']) {
        return Err(fail(
            "prepare",
            format!(
                "--install-dir {:?} must be an absolute path without quotes",
                plan.install_dir
            ),
        ));
    }
    let agent_id = plan.config.effective_agent_id();
    let dir = &plan.install_dir;
    let ssh = Ssh::new(plan)?;

    progress("connect");
    ssh.run("connect", "true", None)?;

    progress("inspect");
    let facts = ssh.run(
        "inspect",
        "uname -s; uname -m; if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then echo \
         systemd; else echo plain; fi",
        None,
    )?;
    let mut lines = facts.lines();
    let (os, arch, init) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or("plain"),
    );
    let local_arch = std::env::consts::ARCH;
    if !os.eq_ignore_ascii_case(std::env::consts::OS) || arch != local_arch {
        return Err(fail(
            "inspect",
            format!(
                "the VM runs {os} on {arch}, the agent binary is for {} on {local_arch}: build one for the VM \
                 (cargo build --release --target ...) and pass --agent-binary",
                std::env::consts::OS
            ),
        ));
    }
    let use_systemd = init == "systemd" && !plan.no_systemd;

    progress("copy");
    let config_file = tempfile_with(&plan.config_toml_for_vm())
        .map_err(|e| fail("copy", format!("cannot write a temporary config file: {e}")))?;
    let qdir = shell_quote(dir);
    ssh.run(
        "copy",
        &format!(
            "set -e; mkdir -p {qdir}/bin {qdir}/state; cat > {qdir}/bin/damselfly-agent.new; chmod 755 \
             {qdir}/bin/damselfly-agent.new; mv -f {qdir}/bin/damselfly-agent.new {qdir}/bin/damselfly-agent"
        ),
        Some(&plan.agent_binary),
    )?;
    ssh.run(
        "copy",
        &format!("set -e; umask 077; cat > {qdir}/agent.toml.new; mv -f {qdir}/agent.toml.new {qdir}/agent.toml"),
        Some(config_file.path()),
    )?;

    progress("check-config");
    ssh.run(
        "check-config",
        &format!("{qdir}/bin/damselfly-agent --config {qdir}/agent.toml --check-config >/dev/null"),
        None,
    )?;

    progress("start");
    let service = if use_systemd {
        let unit = tempfile_with(&systemd_unit(dir))
            .map_err(|e| fail("start", format!("cannot write a temporary unit file: {e}")))?;
        ssh.run(
            "start",
            "set -e; cat > /etc/systemd/system/damselfly-agent.service; systemctl daemon-reload; systemctl enable \
             damselfly-agent >/dev/null 2>&1; systemctl restart damselfly-agent",
            Some(unit.path()),
        )?;
        "systemd unit damselfly-agent.service"
    } else {
        // No systemd (containers, minimal images): stop a previous copy, start in the background, keep a pid file.
        ssh.run(
            "start",
            &format!(
                "set -e; cd {qdir}; if [ -f agent.pid ] && kill -0 \"$(cat agent.pid)\" 2>/dev/null; then kill \
                 \"$(cat agent.pid)\"; sleep 1; fi; nohup ./bin/damselfly-agent --config agent.toml >> agent.log \
                 2>&1 < /dev/null & echo $! > agent.pid; sleep 1; kill -0 \"$(cat agent.pid)\" || {{ tail -n 20 \
                 agent.log >&2; exit 1; }}"
            ),
            None,
        )?;
        "background process (no systemd; pid in agent.pid, log in agent.log)"
    };

    let heartbeat_after = match &plan.collector_http {
        None => None,
        Some(url) => {
            progress("heartbeat");
            Some(wait_for_heartbeat(url, &agent_id, plan.wait)?)
        }
    };
    Ok(InstallReport {
        agent_id,
        host: ssh.user_host,
        service,
        heartbeat_after,
    })
}

impl InstallPlan {
    /// The config as the VM runs it: the state (sequence numbers, spool) lives under the install directory.
    fn config_toml_for_vm(&self) -> String {
        let mut config = self.config.clone();
        if config.state_dir.is_none() {
            config.state_dir = Some(PathBuf::from(format!("{}/state", self.install_dir)));
        }
        config.to_toml()
    }
}

fn tempfile_with(content: &str) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(content.as_bytes())?;
    file.flush()?;
    Ok(file)
}

/// Polls `GET /api/v1/agents` until `agent_id` is listed as healthy.
fn wait_for_heartbeat(url: &str, agent_id: &str, wait: Duration) -> Result<Duration, InstallError> {
    let started = Instant::now();
    let endpoint = format!("{}/api/v1/agents", url.trim_end_matches('/'));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("heartbeat", format!("cannot start a runtime: {e}")))?;
    let client = crate::api_client(Duration::from_secs(5)).map_err(|e| fail("heartbeat", e))?;
    let mut last = String::from("no answer yet");
    while started.elapsed() < wait {
        let answer = runtime.block_on(async {
            let response = client
                .get(&endpoint)
                .send()
                .await
                .map_err(|e| damselfly_collector::error::error_chain(&e))?;
            let status = response.status();
            let body = response.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("{status}: {body}"));
            }
            serde_json::from_str::<serde_json::Value>(&body).map_err(|e| format!("not JSON: {e}"))
        });
        match answer {
            Ok(agents) => {
                let entry = agents
                    .as_array()
                    .and_then(|list| list.iter().find(|a| a["agent_id"] == agent_id));
                match entry {
                    Some(a) if a["status"] == "healthy" => return Ok(started.elapsed()),
                    Some(a) => last = format!("agent listed with status {}", a["status"]),
                    None => last = "agent not registered yet".to_owned(),
                }
            }
            Err(e) => last = format!("{endpoint}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(fail(
        "heartbeat",
        format!(
            "no heartbeat from agent {agent_id} within {wait:?} ({last}); the agent runs but cannot reach the \
             collector: check `collector` in its config, the network path and the collector's gRPC port (agent log: \
             journalctl -u damselfly-agent, or agent.log in the install directory)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            split_target("root@10.0.0.5").ok(),
            Some(("root@10.0.0.5".into(), None))
        );
        assert_eq!(
            split_target("ops@vm1:2222").ok(),
            Some(("ops@vm1".into(), Some(2222)))
        );
        assert_eq!(
            split_target("ops@[::1]:22").ok(),
            Some(("ops@::1".into(), Some(22)))
        );
        assert_eq!(
            split_target("ops@[::1]").ok(),
            Some(("ops@::1".into(), None))
        );
        assert!(split_target("vm1").is_err());
        assert!(split_target("@vm1").is_err());
        assert!(split_target("ops@vm1:99999").is_err());
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn host_key_failures_get_advice() {
        let m = explain_ssh_failure(Some(255), "Host key verification failed.", "root@h");
        assert!(m.contains("--trust-on-first-use"), "{m}");
        let m = explain_ssh_failure(
            Some(255),
            "root@h: Permission denied (publickey).",
            "root@h",
        );
        assert!(m.contains("authorized_keys"), "{m}");
    }
}
