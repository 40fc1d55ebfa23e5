//! Agent configuration: defaults, TOML loading and validation.
//!
//! Precedence is defaults < config file < command-line flags (or their `DAMSELFLY_*` environment variables); the
//! binary applies the flags after [`AgentConfig::load`], then calls [`AgentConfig::validate`] before anything runs.
//!
//! Modes: with `collector` set the agent pushes to it; with `listen` set it serves its batches for a collector to
//! pull (and `/metrics`); at least one of the two is required. Pending batches live in a disk spool under
//! `spool_dir` (by default `<state_dir>/spool`), or in memory when there is neither.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Identity tag keys, in the order they are put on every batch.
pub const IDENTITY_TAG_KEYS: [&str; 9] = [
    "ns_id", "mcis_id", "vm_id", "csp", "region", "zone", "hostname", "os_type", "agent_id",
];

/// Tag values are at most 64 KiB on the wire (see `ingest.proto`).
const MAX_TAG_VALUE_BYTES: usize = 64 * 1024;

/// Smallest `spool_max_bytes`: a spool smaller than a few rounds would drop data at the first hiccup.
pub const MIN_SPOOL_MAX_BYTES: u64 = 1 << 20;
/// Default `spool_max_bytes` (256 MiB: days of outage at the default interval on a typical VM).
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
/// Largest `top_n`.
pub const MAX_TOP_N: usize = 1000;

/// Everything an agent needs to know. Every key is optional in the file; unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Collector gRPC endpoint for push mode, `http://host:port`. Default: none (no push; then `listen` is
    /// required). `https://` needs `tls_ca_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// Address of the agent's own server (pull mode: `MetricsSource.Pull` for collectors; also `/metrics` and
    /// `/health`), e.g. `0.0.0.0:9100`. Default: none (no server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `host:port` the collector should pull from, sent when registering. Default: `listen` (set this when the
    /// agent listens on `0.0.0.0` or sits behind NAT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// Seconds between collection rounds. Default 10, at least 1.
    pub interval: u64,
    /// Namespace id (Cloud-Barista `ns`). Default `"default"`.
    pub ns_id: String,
    /// MCIS id. Default `"default"`.
    pub mcis_id: String,
    /// VM id inside the MCIS. Default: empty, which means "use `hostname`".
    pub vm_id: String,
    /// Cloud service provider, e.g. `aws`. Default empty (unknown).
    pub csp: String,
    /// Cloud region. Default empty (unknown).
    pub region: String,
    /// Cloud zone. Default empty (unknown).
    pub zone: String,
    /// Host name tag. Default: the OS host name.
    pub hostname: String,
    /// OS type tag. Default: `std::env::consts::OS` (`linux`, `windows`, `macos`, ...).
    pub os_type: String,
    /// Stable agent id, sent with every batch and as the `agent_id` tag. Default: derived from `hostname`, `ns_id`,
    /// `mcis_id` and `vm_id` (see [`AgentConfig::effective_agent_id`]), so it survives restarts but changes when one
    /// of those changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Directory for the agent's durable state (the batch sequence number, and the spool by default). Default:
    /// none, in which case sequence numbers start from the wall clock so a restarted agent never reuses one (see
    /// `seq.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Directory of the disk spool that keeps unacknowledged batches across outages and restarts (see `spool.rs`).
    /// Default: `<state_dir>/spool` when `state_dir` is set; otherwise none, and batches wait in memory
    /// (`max_pending_batches`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    /// Most bytes the spool may take on disk; when full the oldest batches are dropped (counted and logged).
    /// Default 256 MiB, at least 1 MiB.
    pub spool_max_bytes: u64,
    /// Measurements to collect. Default: every one the agent knows (`probes::ALL_MEASUREMENTS`).
    pub measurements: Vec<String>,
    /// `procstat_top`: how many processes to report by CPU and by memory. Default 5, at most 1000; 0 reports none.
    pub top_n: usize,
    /// Seconds between heartbeats to the collector (the collector's answer to registration may override it).
    /// Default 10, 1..=3600.
    pub heartbeat_secs: u64,
    /// Most points in one `WriteBatch`; a round with more points is split. Default 5000.
    pub batch_max_points: usize,
    /// Most batches sent on the stream and not yet acknowledged. Default 8.
    pub max_in_flight: usize,
    /// Most batches kept in memory until acknowledged, when there is no spool; when full the oldest is dropped
    /// (and counted). Default 1000 (at the default interval that is ~2.7 hours of a collector outage).
    pub max_pending_batches: usize,
    /// The VM's spec (instance type, e.g. `t3.large`), tagged `spec` on benchmark rows so scores can be kept per
    /// (csp, region, spec). Default empty (unknown).
    pub spec: String,
    /// A benchmark run the collector asks for is refused when the 1-minute load average per core, in percent, is
    /// above this, unless the run is forced. Default 50 (a load average of half the cores).
    pub bench_max_load_percent: u32,
    /// The agent token for a collector with `auth` on (`damselfly tokens create --role agent --ns <ns_id>`), sent
    /// as `authorization: Bearer <token>` on every gRPC call. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM CA certificate the collector's TLS certificate must be signed by; required for an `https://`
    /// collector (e.g. `ca.pem` from `damselfly certs init`). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for a collector that asks agents for one (mutual TLS). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Pull mode: the token a collector must send (`authorization: Bearer <token>`, the collector's
    /// `pull_token_file`) to pull this agent's batches, which acknowledges and so removes them, or to read its
    /// `/metrics`. Default: none (anyone who reaches `listen` may).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_token: Option<String>,
    /// Allow `listen` on an address other hosts can reach without `pull_token` (refused otherwise; a warning at
    /// start). Default false.
    pub insecure: bool,
    /// Pull mode over TLS: the PEM certificate chain and key `listen` serves with (HTTP and gRPC); collectors pull
    /// from `https://` with `pull_ca_file`. Default: none (plaintext).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_tls_key_file: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            collector: None,
            listen: None,
            advertise_addr: None,
            interval: 10,
            ns_id: "default".to_owned(),
            mcis_id: "default".to_owned(),
            vm_id: String::new(),
            csp: String::new(),
            region: String::new(),
            zone: String::new(),
            hostname: os_hostname(),
            os_type: std::env::consts::OS.to_owned(),
            agent_id: None,
            state_dir: None,
            spool_dir: None,
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            measurements: crate::probes::ALL_MEASUREMENTS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
            top_n: crate::probes::DEFAULT_TOP_N,
            heartbeat_secs: 10,
            batch_max_points: 5000,
            max_in_flight: 8,
            max_pending_batches: 1000,
            spec: String::new(),
            bench_max_load_percent: 50,
            token: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            pull_token: None,
            insecure: false,
            listen_tls_cert_file: None,
            listen_tls_key_file: None,
        }
    }
}

/// Why a configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrongly typed value.
    #[error("cannot parse config file {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the offending key and line).
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid config: `{key}` {reason}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl AgentConfig {
    /// Reads a TOML config file; keys it does not set keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text (no validation beyond types and key names).
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The effective configuration as TOML, with derived defaults filled in (for `--check-config`).
    pub fn to_toml(&self) -> String {
        let mut effective = self.clone();
        effective.vm_id = self.effective_vm_id().to_owned();
        effective.agent_id = Some(self.effective_agent_id());
        effective.spool_dir = self.effective_spool_dir();
        effective.advertise_addr = self.effective_advertise_addr();
        // Serializing plain strings, integers and paths cannot fail; fall back to Debug rather than panic.
        toml::to_string_pretty(&effective)
            .unwrap_or_else(|e| format!("# cannot render config: {e}\n# {effective:?}\n"))
    }

    /// Checks ranges and values; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.collector.is_none() && self.listen.is_none() {
            return Err(ConfigError::Invalid {
                key: "collector",
                reason: "and `listen` are both unset: nothing to do: set `collector` (push mode) or `listen` \
                         (pull mode)"
                    .to_owned(),
            });
        }
        self.validate_settings()
    }

    /// Everything [`AgentConfig::validate`] checks except that a mode is set: for `--once`, which needs none.
    pub fn validate_settings(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });

        if let Some(collector) = &self.collector {
            match collector.split_once("://") {
                Some(("http", rest)) if !rest.is_empty() => {}
                Some(("https", rest)) if !rest.is_empty() => {
                    if self.tls_ca_file.is_none() {
                        return invalid(
                            "collector",
                            format!(
                                "is {collector:?}: an https:// collector needs `tls_ca_file` (the CA that signed its \
                                 certificate)"
                            ),
                        );
                    }
                }
                _ => {
                    return invalid(
                        "collector",
                        format!("must be a URL like http://127.0.0.1:4317, got {collector:?}"),
                    );
                }
            }
            if tonic::transport::Endpoint::from_shared(collector.clone()).is_err() {
                return invalid("collector", format!("is not a valid URL: {collector:?}"));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return invalid(
                "tls_cert_file",
                "and tls_key_file go together (the client certificate and its key)".to_owned(),
            );
        }
        if let Err(reason) = crate::credentials::client_tls(self) {
            return invalid("tls_ca_file", reason);
        }
        if let Some(token) = &self.token
            && crate::credentials::bearer(token).is_none()
        {
            return invalid(
                "token",
                "is not a token (printable ASCII, no spaces: as `damselfly tokens create` prints it)".to_owned(),
            );
        }
        if self.listen_tls_cert_file.is_some() != self.listen_tls_key_file.is_some() {
            return invalid(
                "listen_tls_cert_file",
                "and listen_tls_key_file go together (the pull port's certificate and its key)"
                    .to_owned(),
            );
        }
        if self.listen_tls_cert_file.is_some() && self.listen.is_none() {
            return invalid(
                "listen_tls_cert_file",
                "is only used in pull mode: set `listen` too (or remove it)".to_owned(),
            );
        }
        if let Err(reason) = self.listen_tls() {
            return invalid("listen_tls_cert_file", reason);
        }
        if let Some(token) = &self.pull_token {
            if self.listen.is_none() {
                return invalid(
                    "pull_token",
                    "is only used in pull mode: set `listen` too (or remove it)".to_owned(),
                );
            }
            if crate::credentials::bearer(token).is_none() {
                return invalid(
                    "pull_token",
                    "is not a token (printable ASCII, no spaces)".to_owned(),
                );
            }
        }
        if let Some(addr) = &self.advertise_addr {
            if self.listen.is_none() {
                return invalid(
                    "advertise_addr",
                    "is only used in pull mode: set `listen` too (or remove it)".to_owned(),
                );
            }
            let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok
                || addr.chars().any(|c| c.is_whitespace() || c.is_control())
                || addr.contains("://")
            {
                return invalid(
                    "advertise_addr",
                    format!(
                        "must be host:port as the collector reaches this agent, e.g. 10.0.0.7:9100, got {addr:?}"
                    ),
                );
            }
        }
        if let Some(listen) = self.listen
            && !listen.ip().is_loopback()
            && self.pull_token.is_none()
            && !self.insecure
        {
            return invalid(
                "listen",
                format!(
                    "is {listen}, which other hosts can reach, and `pull_token` is unset: anyone there could pull \
                     this agent's batches (acknowledging, so dropping, them) and read its metrics. Set `pull_token` \
                     (the collector sends it from its `pull_token_file`), listen on 127.0.0.1, or accept the risk \
                     with `insecure = true` / --insecure"
                ),
            );
        }
        if let Some(dir) = &self.spool_dir
            && dir.as_os_str().is_empty()
        {
            return invalid(
                "spool_dir",
                "must not be empty (leave it out for the default)".to_owned(),
            );
        }
        if self.spool_max_bytes < MIN_SPOOL_MAX_BYTES {
            return invalid(
                "spool_max_bytes",
                format!(
                    "must be at least {MIN_SPOOL_MAX_BYTES} (1 MiB), got {}",
                    self.spool_max_bytes
                ),
            );
        }
        if self.measurements.is_empty() {
            return invalid(
                "measurements",
                format!(
                    "must name at least one measurement (known: {})",
                    crate::probes::ALL_MEASUREMENTS.join(", ")
                ),
            );
        }
        if let Err(reason) = crate::probes::validate_measurements(&self.measurements) {
            return invalid("measurements", reason);
        }
        if self.top_n > MAX_TOP_N {
            return invalid(
                "top_n",
                format!("must be at most {MAX_TOP_N}, got {}", self.top_n),
            );
        }
        if !(1..=3600).contains(&self.heartbeat_secs) {
            return invalid(
                "heartbeat_secs",
                format!("must be 1..=3600, got {}", self.heartbeat_secs),
            );
        }
        if self.interval < 1 {
            return invalid(
                "interval",
                format!("must be at least 1 second, got {}", self.interval),
            );
        }
        if self.interval > 86_400 {
            return invalid(
                "interval",
                format!(
                    "must be at most 86400 seconds (one day), got {}",
                    self.interval
                ),
            );
        }
        if self.batch_max_points < 1 {
            return invalid("batch_max_points", "must be at least 1, got 0".to_owned());
        }
        if self.max_in_flight < 1 {
            return invalid("max_in_flight", "must be at least 1, got 0".to_owned());
        }
        if self.max_pending_batches < 1 {
            return invalid(
                "max_pending_batches",
                "must be at least 1, got 0".to_owned(),
            );
        }
        if self.hostname.is_empty() {
            return invalid(
                "hostname",
                "must not be empty (the OS host name could not be read: set it)".to_owned(),
            );
        }
        if let Some(id) = &self.agent_id
            && (id.is_empty() || id.len() > 256)
        {
            return invalid(
                "agent_id",
                format!("must be 1..=256 bytes, got {} bytes", id.len()),
            );
        }
        for (key, value) in self.identity_tags_raw() {
            if value.len() > MAX_TAG_VALUE_BYTES {
                return invalid(
                    key,
                    format!(
                        "is {} bytes, at most {MAX_TAG_VALUE_BYTES} allowed",
                        value.len()
                    ),
                );
            }
            if value.chars().any(char::is_control) {
                return invalid(
                    key,
                    format!("must not contain control characters, got {value:?}"),
                );
            }
        }
        if let Some(dir) = &self.state_dir
            && dir.as_os_str().is_empty()
        {
            return invalid(
                "state_dir",
                "must not be empty (leave it out to keep no state)".to_owned(),
            );
        }
        Ok(())
    }

    /// `spool_dir`, or `<state_dir>/spool`; `None` means the in-memory queue.
    pub fn effective_spool_dir(&self) -> Option<PathBuf> {
        self.spool_dir
            .clone()
            .or_else(|| self.state_dir.as_ref().map(|d| d.join("spool")))
    }

    /// `advertise_addr`, or `listen` as text; `None` when not in pull mode.
    pub fn effective_advertise_addr(&self) -> Option<String> {
        self.advertise_addr
            .clone()
            .or_else(|| self.listen.map(|a| a.to_string()))
    }

    /// The pull port's TLS acceptor, from `listen_tls_cert_file` and `listen_tls_key_file`; `None` without them.
    /// The error names the file that cannot be read or used.
    pub fn listen_tls(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        let (Some(cert), Some(key)) = (&self.listen_tls_cert_file, &self.listen_tls_key_file)
        else {
            return Ok(None);
        };
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let config = damselfly_proto::tls::server_config(
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
        )?;
        Ok(Some(tokio_rustls::TlsAcceptor::from(config)))
    }

    /// The probes' options from `measurements` and `top_n`.
    pub fn probe_options(&self) -> crate::probes::ProbeOptions {
        crate::probes::ProbeOptions {
            measurements: self
                .measurements
                .iter()
                .cloned()
                .collect::<BTreeSet<String>>(),
            top_n: self.top_n,
        }
    }

    /// `vm_id`, or the host name when it is not set.
    pub fn effective_vm_id(&self) -> &str {
        if self.vm_id.is_empty() {
            &self.hostname
        } else {
            &self.vm_id
        }
    }

    /// The configured `agent_id`, or one derived from `hostname`, `ns_id`, `mcis_id` and the effective `vm_id`: a
    /// UUID-shaped hex string of a fixed 128-bit FNV-1a hash, identical on every run and every platform.
    pub fn effective_agent_id(&self) -> String {
        if let Some(id) = &self.agent_id {
            return id.clone();
        }
        let mut key = Vec::new();
        for part in [
            self.hostname.as_str(),
            &self.ns_id,
            &self.mcis_id,
            self.effective_vm_id(),
        ] {
            // Length prefixes keep ("ab","c") and ("a","bc") apart.
            key.extend_from_slice(&(part.len() as u64).to_le_bytes());
            key.extend_from_slice(part.as_bytes());
        }
        let h = fnv1a_128(&key);
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (h >> 96) as u32,
            (h >> 80) as u16,
            (h >> 64) as u16,
            (h >> 48) as u16,
            h & 0xffff_ffff_ffff
        )
    }

    /// The nine identity tags (`ns_id`, ..., `agent_id`) with their effective values, in [`IDENTITY_TAG_KEYS`] order.
    pub fn identity_tags(&self) -> Vec<(&'static str, String)> {
        let mut tags: Vec<(&'static str, String)> = self
            .identity_tags_raw()
            .map(|(k, v)| (k, v.to_owned()))
            .collect();
        tags.push(("agent_id", self.effective_agent_id()));
        tags
    }

    /// The identity tags except `agent_id`, borrowed.
    fn identity_tags_raw(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("ns_id", self.ns_id.as_str()),
            ("mcis_id", self.mcis_id.as_str()),
            ("vm_id", self.effective_vm_id()),
            ("csp", self.csp.as_str()),
            ("region", self.region.as_str()),
            ("zone", self.zone.as_str()),
            ("hostname", self.hostname.as_str()),
            ("os_type", self.os_type.as_str()),
        ]
        .into_iter()
    }
}

/// The OS host name, or `localhost` when it cannot be read (validation then still passes; operators can override).
fn os_hostname() -> String {
    sysinfo::System::host_name()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// 128-bit FNV-1a: tiny, dependency-free and specified, so derived ids never change with a toolchain update.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults plus a collector: the smallest valid push configuration.
    fn push() -> AgentConfig {
        AgentConfig {
            collector: Some("http://127.0.0.1:4317".into()),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn defaults_need_a_mode_and_are_otherwise_valid() {
        let c = AgentConfig::default();
        assert_eq!(c.collector, None);
        assert_eq!(c.interval, 10);
        assert_eq!(c.os_type, std::env::consts::OS);
        assert!(!c.hostname.is_empty());
        assert_eq!(c.spool_max_bytes, 256 << 20);
        assert_eq!((c.top_n, c.heartbeat_secs), (5, 10));
        assert_eq!(c.measurements, crate::probes::ALL_MEASUREMENTS);
        let msg = c.validate().expect_err("no mode").to_string();
        assert!(
            msg.contains("nothing to do: set `collector` (push mode) or `listen` (pull mode)"),
            "{msg}"
        );
        push().validate().expect("push mode validates");
        let pull = AgentConfig {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..AgentConfig::default()
        };
        pull.validate().expect("pull mode validates");
        assert_eq!(
            pull.effective_advertise_addr().as_deref(),
            Some("127.0.0.1:0")
        );
        assert_eq!(push().effective_advertise_addr(), None);
    }

    #[test]
    fn spool_dir_defaults_under_state_dir() {
        assert_eq!(push().effective_spool_dir(), None);
        let c = AgentConfig {
            state_dir: Some("/var/lib/a".into()),
            ..push()
        };
        assert_eq!(
            c.effective_spool_dir(),
            Some(PathBuf::from("/var/lib/a/spool"))
        );
        let c = AgentConfig {
            spool_dir: Some("/spool".into()),
            ..c
        };
        assert_eq!(c.effective_spool_dir(), Some(PathBuf::from("/spool")));
        // --check-config shows the effective directory, and it reads back the same.
        let back = AgentConfig::from_toml(&c.to_toml()).expect("re-parse");
        assert_eq!(back.effective_spool_dir(), Some(PathBuf::from("/spool")));
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = AgentConfig::from_toml("").expect("parse");
        assert_eq!(c, AgentConfig::default());
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = AgentConfig::from_toml("interval = 5\ncolector = \"http://x:1\"\n")
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("colector"), "{msg}");
    }

    #[test]
    fn wrong_type_is_rejected() {
        let err = AgentConfig::from_toml("interval = \"ten\"").expect_err("must fail");
        assert!(err.to_string().contains("interval"), "{err}");
        let err = AgentConfig::from_toml("listen = \"not an address\"").expect_err("must fail");
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_key() {
        let cases: [(&str, &str); 21] = [
            ("interval = 0", "interval"),
            ("interval = 100000", "interval"),
            ("collector = \"127.0.0.1:4317\"", "collector"),
            ("collector = \"https://c:4317\"", "collector"),
            ("batch_max_points = 0", "batch_max_points"),
            ("max_in_flight = 0", "max_in_flight"),
            ("max_pending_batches = 0", "max_pending_batches"),
            ("agent_id = \"\"", "agent_id"),
            ("spool_max_bytes = 1048575", "spool_max_bytes"),
            ("spool_dir = \"\"", "spool_dir"),
            ("measurements = []", "measurements"),
            ("measurements = [\"cpu\", \"gpu\"]", "measurements"),
            ("top_n = 1001", "top_n"),
            ("heartbeat_secs = 0", "heartbeat_secs"),
            ("heartbeat_secs = 3601", "heartbeat_secs"),
            ("advertise_addr = \"10.0.0.1:9100\"", "advertise_addr"),
            (
                "listen = \"0.0.0.0:9100\"\nadvertise_addr = \"10.0.0.1\"",
                "advertise_addr",
            ),
            (
                "listen = \"0.0.0.0:9100\"\nadvertise_addr = \"http://10.0.0.1:9100\"",
                "advertise_addr",
            ),
            (
                "listen = \"127.0.0.1:9\"\nlisten_tls_cert_file = \"/c.pem\"",
                "listen_tls_cert_file",
            ),
            (
                "listen = \"127.0.0.1:9\"\nlisten_tls_cert_file = \"/nonexistent/c.pem\"\nlisten_tls_key_file = \"/nonexistent/k.pem\"",
                "listen_tls_cert_file",
            ),
            ("listen = \"10.0.0.1:9100\"", "listen"),
        ];
        for (text, key) in cases {
            // A push configuration, unless the case sets `collector` itself.
            let full = if text.starts_with("collector") {
                text.to_owned()
            } else {
                format!("collector = \"http://c:1\"\n{text}")
            };
            let c = AgentConfig::from_toml(&full).expect("parses");
            match c.validate() {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{text}: {reason}")
                }
                other => panic!("{text}: expected Invalid({key}), got {other:?}"),
            }
        }
        let c = AgentConfig {
            region: "a\nb".into(),
            ..push()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { key: "region", .. })
        ));
        let msg = AgentConfig {
            interval: 0,
            ..push()
        }
        .validate()
        .expect_err("invalid")
        .to_string();
        assert!(
            msg.contains("`interval`") && msg.contains("at least 1"),
            "{msg}"
        );
        let msg = AgentConfig {
            measurements: vec!["gpu".into()],
            ..push()
        }
        .validate()
        .expect_err("invalid")
        .to_string();
        assert!(
            msg.contains("`measurements`") && msg.contains("gpu"),
            "{msg}"
        );
        // A subset is fine, and becomes the probes' options.
        let c = AgentConfig {
            measurements: vec!["mem".into(), "cpu".into()],
            top_n: 3,
            ..push()
        };
        c.validate().expect("valid");
        let o = c.probe_options();
        assert_eq!(o.measurements.iter().collect::<Vec<_>>(), ["cpu", "mem"]);
        assert_eq!(o.top_n, 3);
    }

    #[test]
    fn agent_id_is_stable_and_depends_on_identity() {
        let a = AgentConfig {
            hostname: "h1".into(),
            ..AgentConfig::default()
        };
        let id = a.effective_agent_id();
        assert_eq!(id, a.clone().effective_agent_id());
        assert_eq!(id.len(), 36, "{id}");
        let b = AgentConfig {
            vm_id: "vm-2".into(),
            ..a.clone()
        };
        assert_ne!(id, b.effective_agent_id());
        let fixed = AgentConfig {
            agent_id: Some("me".into()),
            ..a
        };
        assert_eq!(fixed.effective_agent_id(), "me");
    }

    #[test]
    fn identity_tags_cover_every_key() {
        let c = AgentConfig {
            hostname: "h".into(),
            ..AgentConfig::default()
        };
        let keys: Vec<&str> = c.identity_tags().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, IDENTITY_TAG_KEYS);
        // vm_id falls back to the host name.
        assert!(c.identity_tags().contains(&("vm_id", "h".to_owned())));
    }

    #[test]
    fn effective_toml_round_trips() {
        let c = AgentConfig {
            csp: "aws".into(),
            listen: Some("0.0.0.0:9100".parse().expect("addr")),
            pull_token: Some("pull-secret".into()),
            measurements: vec!["cpu".into()],
            ..push()
        };
        let text = c.to_toml();
        let back = AgentConfig::from_toml(&text).expect("re-parse");
        back.validate().expect("valid");
        assert_eq!(back.csp, "aws");
        assert_eq!(back.agent_id, Some(c.effective_agent_id()));
        assert_eq!(back.collector, c.collector);
        assert_eq!(back.listen, c.listen);
        assert_eq!(back.advertise_addr.as_deref(), Some("0.0.0.0:9100"));
        assert_eq!(back.measurements, ["cpu"]);
    }

    #[test]
    fn example_file_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
        let c = AgentConfig::load(&path).expect("example loads");
        c.validate().expect("example validates");
        assert_eq!(c.collector.as_deref(), Some("http://127.0.0.1:4317"));
        // Its values are the defaults (plus the collector it sets).
        assert_eq!(c, push());
        // Every key is documented in the example, set or commented out.
        let text = std::fs::read_to_string(&path).expect("read");
        let full = AgentConfig {
            agent_id: Some("x".into()),
            state_dir: Some("/x".into()),
            spool_dir: Some("/x/spool".into()),
            listen: Some("0.0.0.0:9100".parse().expect("addr")),
            advertise_addr: Some("10.0.0.7:9100".into()),
            pull_token: Some("x".into()),
            ..push()
        };
        let table: toml::Table =
            toml::from_str(&toml::to_string(&full).expect("ser")).expect("table");
        assert_eq!(
            table.len(),
            26,
            "a new key? document it in agent.example.toml"
        );
        for key in table.keys() {
            assert!(
                text.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} = "))),
                "{key} missing from agent.example.toml"
            );
        }
        // The commented-out examples are valid too: uncommenting every `# key = value` line still validates.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if table.keys().any(|k| rest.starts_with(&format!("{k} = "))) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all = AgentConfig::from_toml(&uncommented).expect("uncommented example parses");
        all.validate().expect("uncommented example validates");
        assert!(all.listen.is_some() && all.spool_dir.is_some());
    }
}
