//! The agent registry (`damselfly.v1.Agents`): who registered, what they said about themselves, and when each was
//! last heard from.
//!
//! * `Register` validates the request and records (or updates) the agent: identity tags, host facts, mode
//!   (push/pull), `listen_addr`, collection interval, version. The answer tells the agent how often to send
//!   heartbeats (`heartbeat_interval_secs` of the config).
//! * `Heartbeat` records the agent's queue counters and uptime. An agent the registry does not know (or knows only
//!   from its batches) gets `registered = false` and registers again.
//! * A STORED or DUPLICATE batch also counts as hearing from its agent ([`AgentRegistry::touch`], called by the
//!   ingest service). An agent seen only that way is listed with the status `unregistered`.
//!
//! The status is derived when read, from `last_seen` (the latest registration, heartbeat or stored batch) and the
//! heartbeat interval: `healthy` within [`HEALTHY_INTERVALS`] intervals, `stale` within [`STALE_INTERVALS`],
//! `down` after that.
//!
//! The registry lives in memory and is saved to `<data_dir>/state/agents.json` (atomically: temp file, fsync,
//! rename) by [`AgentRegistry::run_persister`]: within [`PERSIST_REGISTRATION_DELAY`] of a registration, at most
//! every [`PERSIST_ACTIVITY_DELAY`] for heartbeats and batches, and at shutdown. A restarted collector loads it, so
//! it still lists its agents; their status then follows `last_seen`. Losing the latest changes (a crash) is
//! harmless: an agent whose registration was lost is told `registered = false` at its next heartbeat.
//!
//! Bounds, so a hostile client cannot exhaust memory: at most [`MAX_AGENTS`] agents (a registration beyond is
//! answered `RESOURCE_EXHAUSTED`; batches of unknown agents are then not tracked), at most [`MAX_IDENTITY_TAGS`]
//! identity tags of [`MAX_IDENTITY_BYTES`] in total, host-fact strings of at most [`MAX_FACT_BYTES`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use damselfly_proto::v1::agents_server::{Agents, AgentsServer};
use damselfly_proto::v1::{
    AgentMode, HeartbeatRequest, HeartbeatResponse, HostFacts, RegisterRequest, RegisterResponse,
};
use serde::{Deserialize, Serialize};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::config::CollectorConfig;
use crate::error::{CollectorError, Result};
use crate::fsutil::write_atomically;
use crate::model::{check_agent_id, check_tag};

/// Most agents the registry holds.
pub const MAX_AGENTS: usize = 100_000;
/// Most identity tags in one registration.
pub const MAX_IDENTITY_TAGS: usize = 32;
/// Most bytes of identity tag keys and values together in one registration.
pub const MAX_IDENTITY_BYTES: usize = 4096;
/// Longest host-fact string (OS name, CPU model, ...), in bytes.
pub const MAX_FACT_BYTES: usize = 256;
/// Longest `listen_addr`, in bytes.
pub const MAX_LISTEN_ADDR_BYTES: usize = 256;
/// An agent heard from within this many heartbeat intervals is `healthy`.
pub const HEALTHY_INTERVALS: u64 = 3;
/// An agent heard from within this many heartbeat intervals (and not healthy) is `stale`; later it is `down`.
pub const STALE_INTERVALS: u64 = 10;
/// A registration is saved to disk at most this long after it happened.
pub const PERSIST_REGISTRATION_DELAY: Duration = Duration::from_secs(1);
/// Heartbeats and stored batches (only `last_seen` and counters change) are saved at most this often.
pub const PERSIST_ACTIVITY_DELAY: Duration = Duration::from_secs(5);

/// Version of the `agents.json` layout.
const FILE_VERSION: u32 = 1;

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How an agent delivers its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The agent pushes (`Ingest.Push`).
    #[default]
    Push,
    /// The agent serves `MetricsSource.Pull` at its `listen_addr`; the collector pulls.
    Pull,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Push => "push",
            Mode::Pull => "pull",
        }
    }
}

/// An agent's status, derived from when it was last heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// Heard from within [`HEALTHY_INTERVALS`] heartbeat intervals.
    Healthy,
    /// Heard from within [`STALE_INTERVALS`] heartbeat intervals, not within [`HEALTHY_INTERVALS`].
    Stale,
    /// Not heard from for longer.
    Down,
    /// Known only from its stored batches: it never registered (with this collector).
    Unregistered,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Healthy => "healthy",
            AgentStatus::Stale => "stale",
            AgentStatus::Down => "down",
            AgentStatus::Unregistered => "unregistered",
        }
    }

    /// Parses `healthy`, `stale`, `down` or `unregistered`.
    pub fn parse(s: &str) -> std::result::Result<AgentStatus, String> {
        match s {
            "healthy" => Ok(AgentStatus::Healthy),
            "stale" => Ok(AgentStatus::Stale),
            "down" => Ok(AgentStatus::Down),
            "unregistered" => Ok(AgentStatus::Unregistered),
            other => Err(format!(
                "unknown status {other:?}; use healthy, stale, down or unregistered"
            )),
        }
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent told about its host (`HostFacts` of the protocol).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Facts {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub os_name: String,
    pub os_version: String,
    pub kernel_version: String,
    pub cpu_model: String,
    pub arch: String,
    pub agent_version: String,
}

impl From<HostFacts> for Facts {
    fn from(f: HostFacts) -> Facts {
        Facts {
            vcpus: f.vcpus,
            memory_bytes: f.memory_bytes,
            os_name: f.os_name,
            os_version: f.os_version,
            kernel_version: f.kernel_version,
            cpu_model: f.cpu_model,
            arch: f.arch,
            agent_version: f.agent_version,
        }
    }
}

/// What the registry keeps per agent; also the form saved in `agents.json`. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentRecord {
    pub agent_id: String,
    /// Identity tags (ns_id, mcis_id, vm_id, csp, region, zone, hostname, os_type, agent_id, ...).
    pub identity: BTreeMap<String, String>,
    pub facts: Facts,
    pub mode: Mode,
    /// Pull mode: where the agent serves `MetricsSource`. Empty in push mode.
    pub listen_addr: String,
    /// Seconds between the agent's collection rounds (0: not told).
    pub interval_secs: u64,
    /// The agent's version (`facts.agent_version`).
    pub version: String,
    /// First registration with this collector; `None` for an agent known only from its batches.
    pub first_registered_ms: Option<u64>,
    pub last_registered_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    /// Last STORED or DUPLICATE batch.
    pub last_batch_ms: Option<u64>,
    /// The latest of registration, heartbeat and batch.
    pub last_seen_ms: u64,
    /// From the last heartbeat: batches and bytes waiting in the agent, batches it dropped, its uptime.
    pub pending_batches: u64,
    pub pending_bytes: u64,
    pub dropped_batches: u64,
    pub uptime_secs: u64,
}

impl AgentRecord {
    /// Whether the agent ever registered (rather than being known only from its batches).
    pub fn registered(&self) -> bool {
        self.first_registered_ms.is_some()
    }

    /// The status at `now_ms` for heartbeats every `heartbeat_interval`.
    pub fn status(&self, now_ms: u64, heartbeat_interval: Duration) -> AgentStatus {
        if !self.registered() {
            return AgentStatus::Unregistered;
        }
        let interval = u64::try_from(heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
        let age = now_ms.saturating_sub(self.last_seen_ms);
        if age <= interval.saturating_mul(HEALTHY_INTERVALS) {
            AgentStatus::Healthy
        } else if age <= interval.saturating_mul(STALE_INTERVALS) {
            AgentStatus::Stale
        } else {
            AgentStatus::Down
        }
    }

    fn seen(&mut self, now_ms: u64) {
        self.last_seen_ms = self.last_seen_ms.max(now_ms);
    }
}

/// One agent as `GET /api/v1/agents` shows it: the record, its status, and times as RFC 3339 (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub agent_id: String,
    pub status: AgentStatus,
    pub last_seen_secs_ago: u64,
    pub identity: BTreeMap<String, String>,
    pub facts: Facts,
    pub mode: Mode,
    pub listen_addr: String,
    pub interval_secs: u64,
    pub version: String,
    pub registered: bool,
    pub first_registered: Option<String>,
    pub last_registered: Option<String>,
    pub last_heartbeat: Option<String>,
    pub last_batch: Option<String>,
    pub last_seen: String,
    pub pending_batches: u64,
    pub pending_bytes: u64,
    pub dropped_batches: u64,
    pub uptime_secs: u64,
}

impl AgentInfo {
    fn new(r: &AgentRecord, now_ms: u64, heartbeat_interval: Duration) -> AgentInfo {
        AgentInfo {
            agent_id: r.agent_id.clone(),
            status: r.status(now_ms, heartbeat_interval),
            last_seen_secs_ago: now_ms.saturating_sub(r.last_seen_ms) / 1000,
            identity: r.identity.clone(),
            facts: r.facts.clone(),
            mode: r.mode,
            listen_addr: r.listen_addr.clone(),
            interval_secs: r.interval_secs,
            version: r.version.clone(),
            registered: r.registered(),
            first_registered: r.first_registered_ms.map(rfc3339),
            last_registered: r.last_registered_ms.map(rfc3339),
            last_heartbeat: r.last_heartbeat_ms.map(rfc3339),
            last_batch: r.last_batch_ms.map(rfc3339),
            last_seen: rfc3339(r.last_seen_ms),
            pending_batches: r.pending_batches,
            pending_bytes: r.pending_bytes,
            dropped_batches: r.dropped_batches,
            uptime_secs: r.uptime_secs,
        }
    }
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds); `@<ms>ms` when out of chrono's range.
pub(crate) fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("@{ms}ms"),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed; the message names the problem.
    #[error("{0}")]
    Invalid(String),
    /// The registry is full.
    #[error("the agent registry is full ({0} agents); no new agent can register")]
    Full(usize),
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        match e {
            RegistryError::Invalid(m) => Status::invalid_argument(m),
            e @ RegistryError::Full(_) => Status::resource_exhausted(e.to_string()),
        }
    }
}

/// A validated registration.
#[derive(Debug)]
struct Registration {
    agent_id: String,
    identity: BTreeMap<String, String>,
    facts: Facts,
    mode: Mode,
    listen_addr: String,
    interval_secs: u64,
}

/// Checks a `RegisterRequest`; the error names the first problem.
pub fn validate_registration(request: &RegisterRequest) -> std::result::Result<(), String> {
    check(request.clone()).map(|_| ())
}

fn check(request: RegisterRequest) -> std::result::Result<Registration, String> {
    check_agent_id(&request.agent_id)?;
    if request.identity.len() > MAX_IDENTITY_TAGS {
        return Err(format!(
            "identity has {} tags; the limit is {MAX_IDENTITY_TAGS}",
            request.identity.len()
        ));
    }
    let mut identity = BTreeMap::new();
    let mut bytes = 0usize;
    for (i, tag) in request.identity.into_iter().enumerate() {
        check_tag(&tag.key, &tag.value).map_err(|m| format!("identity tag {i}: {m}"))?;
        bytes += tag.key.len() + tag.value.len();
        if bytes > MAX_IDENTITY_BYTES {
            return Err(format!(
                "identity tags are more than {MAX_IDENTITY_BYTES} bytes in total (keys and values), at tag {i} ({:?})",
                tag.key
            ));
        }
        if identity.contains_key(&tag.key) {
            return Err(format!("identity tag {:?} appears twice", tag.key));
        }
        identity.insert(tag.key, tag.value);
    }
    let facts = Facts::from(request.facts.unwrap_or_default());
    for (name, value) in [
        ("os_name", &facts.os_name),
        ("os_version", &facts.os_version),
        ("kernel_version", &facts.kernel_version),
        ("cpu_model", &facts.cpu_model),
        ("arch", &facts.arch),
        ("agent_version", &facts.agent_version),
    ] {
        if value.len() > MAX_FACT_BYTES {
            return Err(format!(
                "facts.{name} is {} bytes; the limit is {MAX_FACT_BYTES}",
                value.len()
            ));
        }
    }
    let mode = match AgentMode::try_from(request.mode) {
        Ok(AgentMode::Unspecified | AgentMode::Push) => Mode::Push,
        Ok(AgentMode::Pull) => Mode::Pull,
        Err(_) => {
            return Err(format!(
                "mode {} is not a known AgentMode; use AGENT_MODE_PUSH (1) or AGENT_MODE_PULL (2)",
                request.mode
            ));
        }
    };
    if request.listen_addr.is_empty() {
        if mode == Mode::Pull {
            return Err(
                "listen_addr is required in pull mode: the host:port where the agent serves MetricsSource"
                    .into(),
            );
        }
    } else {
        check_listen_addr(&request.listen_addr)?;
    }
    Ok(Registration {
        agent_id: request.agent_id,
        identity,
        facts,
        mode,
        listen_addr: request.listen_addr,
        interval_secs: request.interval_secs,
    })
}

/// `host:port` (a name, an IPv4 address or a bracketed IPv6 address; port 1-65535), without scheme or path.
fn check_listen_addr(addr: &str) -> std::result::Result<(), String> {
    if addr.len() > MAX_LISTEN_ADDR_BYTES {
        return Err(format!(
            "listen_addr is {} bytes; the limit is {MAX_LISTEN_ADDR_BYTES}",
            addr.len()
        ));
    }
    let shown = addr.escape_debug();
    let well_formed = addr.rsplit_once(':').is_some_and(|(host, port)| {
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if !well_formed {
        return Err(format!(
            "listen_addr \"{shown}\" must be host:port without a scheme (e.g. 10.0.0.5:7070 or [::1]:7070)"
        ));
    }
    Ok(())
}

/// What changed since the registry was last saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    Clean,
    /// Only `last_seen` and counters (heartbeats, batches).
    Activity,
    /// A registration (an agent added or changed).
    Registration,
}

#[derive(Debug)]
struct State {
    agents: HashMap<String, AgentRecord>,
    max_agents: usize,
    dirty: Dirty,
    /// When the registry became dirty, and when it was last saved.
    dirty_since: Option<Instant>,
    last_saved: Option<Instant>,
    /// A full registry is logged once, not per batch.
    full_logged: bool,
}

impl State {
    fn mark(&mut self, dirty: Dirty) {
        if self.dirty == Dirty::Clean {
            self.dirty_since = Some(Instant::now());
        }
        self.dirty = self.dirty.max(dirty);
    }
}

struct Inner {
    state: Mutex<State>,
    /// Where the registry is saved; `None` keeps it in memory only.
    path: Option<PathBuf>,
    heartbeat_interval: Duration,
    /// Serialises saves, so an older snapshot never overwrites a newer one.
    save_lock: Mutex<()>,
}

/// The agent registry. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct AgentRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for AgentRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentRegistry")
            .field("agents", &self.len())
            .field("path", &self.inner.path)
            .field("heartbeat_interval", &self.inner.heartbeat_interval)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The file the registry of a collector is saved in: `<data_dir>/state/agents.json`.
pub fn registry_path(config: &CollectorConfig) -> PathBuf {
    config.state_dir().join("agents.json")
}

#[derive(Serialize, Deserialize)]
struct RegistryFile {
    version: u32,
    agents: Vec<AgentRecord>,
}

impl AgentRegistry {
    /// An empty registry kept in memory only.
    pub fn in_memory(heartbeat_interval: Duration) -> AgentRegistry {
        Self::with_records(None, heartbeat_interval, Vec::new())
    }

    /// The registry of a collector: loads `<data_dir>/state/agents.json` if it exists. A file that cannot be read
    /// is logged and set aside as `agents.json.bad` (the registry is soft state: agents register again), so this
    /// only fails when that rename fails.
    pub fn open(config: &CollectorConfig) -> Result<AgentRegistry> {
        Self::open_path(registry_path(config), config.heartbeat_interval())
    }

    /// Like [`AgentRegistry::open`], with an explicit file.
    pub fn open_path(path: PathBuf, heartbeat_interval: Duration) -> Result<AgentRegistry> {
        let records = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<RegistryFile>(&bytes) {
                Ok(file) if file.version == FILE_VERSION => file.agents,
                Ok(file) => {
                    Self::set_aside(&path, &format!("unknown version {}", file.version))?;
                    Vec::new()
                }
                Err(e) => {
                    Self::set_aside(&path, &e.to_string())?;
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(CollectorError::io(&path, e)),
        };
        tracing::info!(agents = records.len(), path = %path.display(), "agent registry loaded");
        Ok(Self::with_records(Some(path), heartbeat_interval, records))
    }

    fn set_aside(path: &Path, why: &str) -> Result<()> {
        let mut bad = path.as_os_str().to_owned();
        bad.push(".bad");
        let bad = PathBuf::from(bad);
        tracing::error!(path = %path.display(), error = why, moved_to = %bad.display(),
            "cannot read the agent registry; starting with an empty one (agents register again)");
        std::fs::rename(path, &bad).map_err(|e| CollectorError::io(path, e))
    }

    fn with_records(
        path: Option<PathBuf>,
        heartbeat_interval: Duration,
        records: Vec<AgentRecord>,
    ) -> AgentRegistry {
        let agents: HashMap<String, AgentRecord> = records
            .into_iter()
            .filter(|r| check_agent_id(&r.agent_id).is_ok())
            .take(MAX_AGENTS)
            .map(|r| (r.agent_id.clone(), r))
            .collect();
        AgentRegistry {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    agents,
                    max_agents: MAX_AGENTS,
                    dirty: Dirty::Clean,
                    dirty_since: None,
                    last_saved: None,
                    full_logged: false,
                }),
                path,
                heartbeat_interval: heartbeat_interval.max(Duration::from_millis(1)),
                save_lock: Mutex::new(()),
            }),
        }
    }

    /// Changes the most agents the registry holds (default [`MAX_AGENTS`]); for tests and small deployments.
    pub fn set_max_agents(&self, max: usize) {
        lock(&self.inner.state).max_agents = max;
    }

    /// The heartbeat interval agents are told.
    pub fn heartbeat_interval(&self) -> Duration {
        self.inner.heartbeat_interval
    }

    /// Number of agents (registered or seen only from batches).
    pub fn len(&self) -> usize {
        lock(&self.inner.state).agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers (or re-registers) an agent now.
    pub fn register(
        &self,
        request: RegisterRequest,
    ) -> std::result::Result<RegisterResponse, RegistryError> {
        self.register_at(request, unix_ms_now())
    }

    /// Registers (or re-registers) an agent at `now_ms` (Unix milliseconds).
    pub fn register_at(
        &self,
        request: RegisterRequest,
        now_ms: u64,
    ) -> std::result::Result<RegisterResponse, RegistryError> {
        let reg = check(request).map_err(RegistryError::Invalid)?;
        let mut state = lock(&self.inner.state);
        let known = state.agents.contains_key(&reg.agent_id);
        if !known && state.agents.len() >= state.max_agents {
            return Err(RegistryError::Full(state.max_agents));
        }
        let record = state
            .agents
            .entry(reg.agent_id.clone())
            .or_insert_with(|| AgentRecord {
                agent_id: reg.agent_id.clone(),
                ..AgentRecord::default()
            });
        let first = !record.registered();
        record.version.clone_from(&reg.facts.agent_version);
        record.identity = reg.identity;
        record.facts = reg.facts;
        record.mode = reg.mode;
        record.listen_addr = reg.listen_addr;
        record.interval_secs = reg.interval_secs;
        record.first_registered_ms.get_or_insert(now_ms);
        record.last_registered_ms = Some(now_ms);
        record.seen(now_ms);
        tracing::info!(
            agent_id = %record.agent_id,
            mode = record.mode.as_str(),
            listen_addr = %record.listen_addr,
            version = %record.version,
            first,
            "agent registered"
        );
        state.mark(Dirty::Registration);
        Ok(RegisterResponse {
            heartbeat_interval_ms: u64::try_from(self.inner.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// Records a heartbeat now. `Ok(false)`: the agent is not registered and should register.
    pub fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> std::result::Result<bool, RegistryError> {
        self.heartbeat_at(request, unix_ms_now())
    }

    /// Records a heartbeat at `now_ms`. `Ok(false)`: the agent is not registered and should register.
    pub fn heartbeat_at(
        &self,
        request: &HeartbeatRequest,
        now_ms: u64,
    ) -> std::result::Result<bool, RegistryError> {
        check_agent_id(&request.agent_id).map_err(RegistryError::Invalid)?;
        let mut state = lock(&self.inner.state);
        let Some(record) = state
            .agents
            .get_mut(&request.agent_id)
            .filter(|r| r.registered())
        else {
            return Ok(false);
        };
        record.last_heartbeat_ms = Some(now_ms);
        record.seen(now_ms);
        record.pending_batches = request.pending_batches;
        record.pending_bytes = request.pending_bytes;
        record.dropped_batches = request.dropped_batches;
        record.uptime_secs = request.uptime_secs;
        state.mark(Dirty::Activity);
        Ok(true)
    }

    /// Notes that a batch of `agent_id` was stored (or was a duplicate) now.
    pub fn touch(&self, agent_id: &str) {
        self.touch_at(agent_id, unix_ms_now());
    }

    /// Notes that a batch of `agent_id` was stored at `now_ms`. An unknown agent is added as `unregistered`, unless
    /// the registry is full (then it is not tracked).
    pub fn touch_at(&self, agent_id: &str, now_ms: u64) {
        let mut state = lock(&self.inner.state);
        if let Some(record) = state.agents.get_mut(agent_id) {
            record.last_batch_ms = Some(now_ms);
            record.seen(now_ms);
        } else {
            if check_agent_id(agent_id).is_err() {
                return;
            }
            if state.agents.len() >= state.max_agents {
                if !state.full_logged {
                    state.full_logged = true;
                    tracing::warn!(
                        max_agents = state.max_agents,
                        agent_id,
                        "the agent registry is full; agents seen only from their batches are not tracked"
                    );
                }
                return;
            }
            state.agents.insert(
                agent_id.to_owned(),
                AgentRecord {
                    agent_id: agent_id.to_owned(),
                    last_batch_ms: Some(now_ms),
                    last_seen_ms: now_ms,
                    ..AgentRecord::default()
                },
            );
        }
        state.mark(Dirty::Activity);
    }

    /// Every agent as of now, sorted by agent id; only those with `status` if given.
    pub fn list(&self, status: Option<AgentStatus>) -> Vec<AgentInfo> {
        self.list_at(unix_ms_now(), status)
    }

    /// Every agent as of `now_ms`, sorted by agent id; only those with `status` if given.
    pub fn list_at(&self, now_ms: u64, status: Option<AgentStatus>) -> Vec<AgentInfo> {
        let interval = self.inner.heartbeat_interval;
        let state = lock(&self.inner.state);
        let mut out: Vec<AgentInfo> = state
            .agents
            .values()
            .filter(|r| status.is_none_or(|s| r.status(now_ms, interval) == s))
            .map(|r| AgentInfo::new(r, now_ms, interval))
            .collect();
        drop(state);
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    /// Every agent's record (in no order): what alerting's absence rules read last-seen times from.
    pub fn records(&self) -> Vec<AgentRecord> {
        lock(&self.inner.state).agents.values().cloned().collect()
    }

    /// One agent as of now.
    pub fn get(&self, agent_id: &str) -> Option<AgentInfo> {
        let now_ms = unix_ms_now();
        let state = lock(&self.inner.state);
        state
            .agents
            .get(agent_id)
            .map(|r| AgentInfo::new(r, now_ms, self.inner.heartbeat_interval))
    }

    /// The registered pull-mode agents and their `listen_addr`, sorted by agent id (whatever their status: the
    /// pull scheduler decides what to do with silent ones).
    pub fn pull_targets(&self) -> Vec<(String, String)> {
        let state = lock(&self.inner.state);
        let mut out: Vec<(String, String)> = state
            .agents
            .values()
            .filter(|r| r.registered() && r.mode == Mode::Pull && !r.listen_addr.is_empty())
            .map(|r| (r.agent_id.clone(), r.listen_addr.clone()))
            .collect();
        drop(state);
        out.sort();
        out
    }

    /// Saves the registry now if anything changed since the last save (blocking: file I/O and fsync). Returns
    /// whether it wrote. A registry without a file never writes.
    pub fn save(&self) -> Result<bool> {
        let Some(path) = &self.inner.path else {
            return Ok(false);
        };
        let _one_at_a_time = lock(&self.inner.save_lock);
        let (mut records, was) = {
            let mut state = lock(&self.inner.state);
            if state.dirty == Dirty::Clean {
                return Ok(false);
            }
            let was = state.dirty;
            state.dirty = Dirty::Clean;
            state.dirty_since = None;
            state.last_saved = Some(Instant::now());
            (state.agents.values().cloned().collect::<Vec<_>>(), was)
        };
        records.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        let file = RegistryFile {
            version: FILE_VERSION,
            agents: records,
        };
        let result = serde_json::to_vec(&file)
            .map_err(|e| CollectorError::Server(format!("cannot encode the agent registry: {e}")))
            .and_then(|bytes| write_atomically(path, &bytes));
        if let Err(e) = result {
            // Try again at the next chance.
            lock(&self.inner.state).mark(was);
            return Err(e);
        }
        Ok(true)
    }

    /// Whether a save is due at `now`: a registration waited [`PERSIST_REGISTRATION_DELAY`], or activity waited
    /// [`PERSIST_ACTIVITY_DELAY`] since the last save.
    fn save_due(&self, now: Instant) -> bool {
        let state = lock(&self.inner.state);
        let waited = |since: Option<Instant>, d: Duration| {
            since.is_none_or(|t| now.saturating_duration_since(t) >= d)
        };
        match state.dirty {
            Dirty::Clean => false,
            Dirty::Registration => waited(state.dirty_since, PERSIST_REGISTRATION_DELAY),
            Dirty::Activity => waited(state.last_saved, PERSIST_ACTIVITY_DELAY),
        }
    }

    /// [`AgentRegistry::save`] on the blocking pool, logging failures.
    pub async fn persist(&self) {
        let registry = self.clone();
        match tokio::task::spawn_blocking(move || registry.save()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the agent registry; will retry"),
            Err(e) => tracing::error!(error = %e, "the agent registry save task failed"),
        }
    }

    /// Saves the registry when due (see the module docs) until `shutdown` completes, then once more.
    pub async fn run_persister(&self, shutdown: impl Future<Output = ()>) {
        if self.inner.path.is_none() {
            shutdown.await;
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    if self.save_due(Instant::now()) {
                        self.persist().await;
                    }
                }
            }
        }
        self.persist().await;
    }
}

/// The tonic `Agents` service over a registry.
#[derive(Debug, Clone)]
pub struct AgentsService {
    registry: AgentRegistry,
    /// Benchmark commands to hand out with heartbeats.
    bench: crate::bench::BenchRuns,
}

impl AgentsService {
    pub fn new(registry: AgentRegistry) -> AgentsService {
        AgentsService {
            registry,
            bench: crate::bench::BenchRuns::default(),
        }
    }

    /// Hands out `bench`'s commands with the heartbeats and notes where agents register from.
    pub fn with_bench(mut self, bench: crate::bench::BenchRuns) -> AgentsService {
        self.bench = bench;
        self
    }

    /// The tonic service (zstd accepted and sent; the default 4 MiB message limit is ample for a registration).
    pub fn into_server(self) -> AgentsServer<AgentsService> {
        AgentsServer::new(self)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
    }
}

#[tonic::async_trait]
impl Agents for AgentsService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> std::result::Result<Response<RegisterResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let agent_id = request.agent_id.clone();
        match self.registry.register(request) {
            Ok(response) => {
                if let Some(peer) = peer {
                    self.bench.note_address(&agent_id, peer.ip());
                }
                Ok(Response::new(response))
            }
            Err(e) => {
                tracing::warn!(?peer, agent_id = %agent_id.escape_debug(), error = %e, "registration refused");
                Err(e.into())
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        let registered = self.registry.heartbeat(request.get_ref())?;
        let bench = if registered {
            self.bench.on_heartbeat(request.get_ref())
        } else {
            Vec::new()
        };
        Ok(Response::new(HeartbeatResponse { registered, bench }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::v1::Tag;

    const INTERVAL: Duration = Duration::from_secs(10);
    const T0: u64 = 1_700_000_000_000;

    fn tag(key: &str, value: &str) -> Tag {
        Tag {
            key: key.into(),
            value: value.into(),
        }
    }

    fn push_request(agent_id: &str) -> RegisterRequest {
        RegisterRequest {
            agent_id: agent_id.into(),
            identity: vec![
                tag("ns_id", "ns1"),
                tag("mcis_id", "mcis1"),
                tag("vm_id", "vm1"),
                tag("csp", "aws"),
                tag("region", "us-east-1"),
                tag("hostname", "host1"),
            ],
            facts: Some(HostFacts {
                vcpus: 4,
                memory_bytes: 8 << 30,
                os_name: "Ubuntu".into(),
                os_version: "24.04".into(),
                kernel_version: "6.8.0".into(),
                cpu_model: "Xeon".into(),
                arch: "x86_64".into(),
                agent_version: "0.1.0".into(),
            }),
            mode: AgentMode::Push as i32,
            listen_addr: String::new(),
            interval_secs: 10,
        }
    }

    fn pull_request(agent_id: &str, addr: &str) -> RegisterRequest {
        RegisterRequest {
            mode: AgentMode::Pull as i32,
            listen_addr: addr.into(),
            ..push_request(agent_id)
        }
    }

    fn heartbeat(agent_id: &str) -> HeartbeatRequest {
        HeartbeatRequest {
            agent_id: agent_id.into(),
            pending_batches: 3,
            pending_bytes: 4096,
            dropped_batches: 1,
            uptime_secs: 77,
            ..HeartbeatRequest::default()
        }
    }

    fn status_at(r: &AgentRegistry, id: &str, now: u64) -> AgentStatus {
        r.list_at(now, None)
            .into_iter()
            .find(|a| a.agent_id == id)
            .expect("listed")
            .status
    }

    #[test]
    fn status_follows_last_seen() {
        let r = AgentRegistry::in_memory(INTERVAL);
        let response = r.register_at(push_request("a1"), T0).expect("register");
        assert_eq!(response.heartbeat_interval_ms, 10_000);
        assert_eq!(status_at(&r, "a1", T0), AgentStatus::Healthy);
        assert_eq!(status_at(&r, "a1", T0 + 30_000), AgentStatus::Healthy);
        assert_eq!(status_at(&r, "a1", T0 + 30_001), AgentStatus::Stale);
        assert_eq!(status_at(&r, "a1", T0 + 100_000), AgentStatus::Stale);
        assert_eq!(status_at(&r, "a1", T0 + 100_001), AgentStatus::Down);
        // A heartbeat brings it back.
        assert!(r.heartbeat_at(&heartbeat("a1"), T0 + 200_000).expect("hb"));
        assert_eq!(status_at(&r, "a1", T0 + 200_000), AgentStatus::Healthy);
        assert_eq!(status_at(&r, "a1", T0 + 240_000), AgentStatus::Stale);
        // So does a stored batch.
        r.touch_at("a1", T0 + 240_000);
        assert_eq!(status_at(&r, "a1", T0 + 240_000), AgentStatus::Healthy);
        // A clock that went back does not make last_seen older, nor the age negative.
        r.touch_at("a1", T0);
        let info = &r.list_at(T0, None)[0];
        assert_eq!(info.last_seen_secs_ago, 0);
        assert_eq!(info.status, AgentStatus::Healthy);
        assert_eq!(r.list_at(T0 + 250_000, None)[0].last_seen_secs_ago, 10);
    }

    #[test]
    fn records_every_field_and_filters() {
        let r = AgentRegistry::in_memory(INTERVAL);
        r.register_at(pull_request("b-pull", "10.0.0.5:7070"), T0)
            .expect("register pull");
        r.register_at(push_request("a-push"), T0).expect("push");
        assert!(
            r.heartbeat_at(&heartbeat("a-push"), T0 + 50_000)
                .expect("hb")
        );
        r.touch_at("c-batch-only", T0 + 50_000);

        let now = T0 + 60_000;
        let all = r.list_at(now, None);
        let ids: Vec<&str> = all.iter().map(|a| a.agent_id.as_str()).collect();
        assert_eq!(ids, ["a-push", "b-pull", "c-batch-only"]);
        let a = &all[0];
        assert_eq!(a.status, AgentStatus::Healthy);
        assert_eq!(a.mode, Mode::Push);
        assert_eq!(a.identity["csp"], "aws");
        assert_eq!(a.facts.vcpus, 4);
        assert_eq!(a.version, "0.1.0");
        assert_eq!(a.interval_secs, 10);
        assert_eq!(
            (
                a.pending_batches,
                a.pending_bytes,
                a.dropped_batches,
                a.uptime_secs
            ),
            (3, 4096, 1, 77)
        );
        assert_eq!(a.last_seen_secs_ago, 10);
        assert_eq!(
            a.first_registered.as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(
            a.last_heartbeat.as_deref(),
            Some("2023-11-14T22:14:10.000Z")
        );
        assert_eq!(a.last_seen, "2023-11-14T22:14:10.000Z");
        assert!(a.registered);
        let b = &all[1];
        assert_eq!(b.status, AgentStatus::Stale);
        assert_eq!(
            (b.mode, b.listen_addr.as_str()),
            (Mode::Pull, "10.0.0.5:7070")
        );
        assert_eq!(b.last_heartbeat, None);
        let c = &all[2];
        assert_eq!(c.status, AgentStatus::Unregistered);
        assert!(!c.registered);
        assert_eq!(c.last_batch.as_deref(), Some("2023-11-14T22:14:10.000Z"));

        let stale = r.list_at(now, Some(AgentStatus::Stale));
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].agent_id, "b-pull");
        assert_eq!(r.list_at(now, Some(AgentStatus::Down)).len(), 0);
        assert_eq!(
            r.pull_targets(),
            vec![("b-pull".to_owned(), "10.0.0.5:7070".to_owned())]
        );

        // The JSON the API serves.
        let json = serde_json::to_value(&all[1]).expect("json");
        assert_eq!(json["status"], "stale");
        assert_eq!(json["mode"], "pull");
        assert_eq!(json["last_seen_secs_ago"], 60);
        assert_eq!(json["identity"]["region"], "us-east-1");
        assert!(json["last_heartbeat"].is_null());

        // Re-registration updates the record and keeps the first registration time.
        r.register_at(push_request("b-pull"), T0 + 70_000)
            .expect("re-register");
        let b = r.get("b-pull").expect("b");
        assert_eq!(b.mode, Mode::Push);
        assert_eq!(
            b.first_registered.as_deref(),
            Some("2023-11-14T22:13:20.000Z")
        );
        assert_eq!(
            b.last_registered.as_deref(),
            Some("2023-11-14T22:14:30.000Z")
        );
        assert!(r.pull_targets().is_empty());
    }

    #[test]
    fn heartbeat_of_an_unknown_agent_asks_it_to_register() {
        let r = AgentRegistry::in_memory(INTERVAL);
        assert!(!r.heartbeat_at(&heartbeat("nobody"), T0).expect("hb"));
        assert!(r.is_empty(), "a heartbeat does not add an agent");
        // Known only from batches: still not registered.
        r.touch_at("batcher", T0);
        assert!(!r.heartbeat_at(&heartbeat("batcher"), T0).expect("hb"));
        r.register_at(push_request("batcher"), T0 + 1)
            .expect("register");
        assert!(r.heartbeat_at(&heartbeat("batcher"), T0 + 2).expect("hb"));
        let err = r
            .heartbeat_at(&heartbeat(""), T0)
            .expect_err("empty agent id");
        assert_eq!(err, RegistryError::Invalid("agent_id is empty".into()));
    }

    #[test]
    fn validation_names_the_problem() {
        let many: Vec<Tag> = (0..MAX_IDENTITY_TAGS + 1)
            .map(|i| tag(&format!("k{i}"), "v"))
            .collect();
        let cases: Vec<(RegisterRequest, &str)> = vec![
            (push_request(""), "agent_id is empty"),
            (push_request("a\nb"), "without control characters"),
            (
                push_request(&"x".repeat(300)),
                "agent_id must be 1-256 bytes",
            ),
            (
                pull_request("p", ""),
                "listen_addr is required in pull mode",
            ),
            (
                pull_request("p", "http://10.0.0.5:7070"),
                "must be host:port without a scheme",
            ),
            (pull_request("p", "10.0.0.5"), "must be host:port"),
            (pull_request("p", "10.0.0.5:0"), "must be host:port"),
            (pull_request("p", "10.0.0.5:99999"), "must be host:port"),
            (pull_request("p", ":7070"), "must be host:port"),
            (
                pull_request("p", &format!("{}:1", "h".repeat(300))),
                "listen_addr is 302 bytes; the limit is 256",
            ),
            (
                RegisterRequest {
                    identity: many,
                    ..push_request("a")
                },
                "identity has 33 tags; the limit is 32",
            ),
            (
                RegisterRequest {
                    identity: vec![tag("big", &"v".repeat(5000))],
                    ..push_request("a")
                },
                "identity tags are more than 4096 bytes in total",
            ),
            (
                RegisterRequest {
                    identity: vec![tag("", "v")],
                    ..push_request("a")
                },
                "identity tag 0: tag name is empty",
            ),
            (
                RegisterRequest {
                    identity: vec![tag("csp", "a"), tag("csp", "b")],
                    ..push_request("a")
                },
                "identity tag \"csp\" appears twice",
            ),
            (
                RegisterRequest {
                    mode: 7,
                    ..push_request("a")
                },
                "mode 7 is not a known AgentMode",
            ),
            (
                RegisterRequest {
                    facts: Some(HostFacts {
                        cpu_model: "c".repeat(300),
                        ..HostFacts::default()
                    }),
                    ..push_request("a")
                },
                "facts.cpu_model is 300 bytes; the limit is 256",
            ),
        ];
        let r = AgentRegistry::in_memory(INTERVAL);
        for (request, want) in cases {
            let shown = format!("{request:?}");
            match r.register_at(request, T0) {
                Err(RegistryError::Invalid(m)) => {
                    assert!(m.contains(want), "{m:?} should contain {want:?}");
                }
                other => panic!("{shown}: expected Invalid({want}), got {other:?}"),
            }
        }
        assert!(r.is_empty());
        for ok in ["10.0.0.5:7070", "vm-1.example.com:1", "[::1]:7070"] {
            r.register_at(pull_request("p", ok), T0)
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // Unspecified mode means push; a push agent may still tell its address.
        r.register_at(
            RegisterRequest {
                mode: 0,
                facts: None,
                identity: vec![],
                ..push_request("legacy")
            },
            T0,
        )
        .expect("minimal registration");
        assert_eq!(r.get("legacy").expect("legacy").mode, Mode::Push);
        let status: Status = RegistryError::Invalid("x".into()).into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn registry_is_bounded() {
        let r = AgentRegistry::in_memory(INTERVAL);
        r.set_max_agents(2);
        r.register_at(push_request("a"), T0).expect("a");
        r.touch_at("b", T0);
        let err = r.register_at(push_request("c"), T0).expect_err("full");
        assert_eq!(err, RegistryError::Full(2));
        let status: Status = err.into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        // Known agents still re-register, and a batch-only agent can become registered.
        r.register_at(push_request("a"), T0 + 1).expect("a again");
        r.register_at(push_request("b"), T0 + 1).expect("b");
        // Batches of unknown agents are not tracked once full.
        r.touch_at("d", T0);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn persistence_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join("agents.json");
        let r = AgentRegistry::open_path(path.clone(), INTERVAL).expect("open");
        assert!(!r.save().expect("save"), "nothing to save");
        r.register_at(pull_request("p", "10.1.2.3:9000"), T0)
            .expect("p");
        r.register_at(push_request("q"), T0).expect("q");
        assert!(r.heartbeat_at(&heartbeat("q"), T0 + 5_000).expect("hb"));
        r.touch_at("only-batches", T0 + 6_000);
        assert!(r.save().expect("save"));
        assert!(!r.save().expect("save"), "saved already");

        let again = AgentRegistry::open_path(path.clone(), INTERVAL).expect("reopen");
        let now = T0 + 200_000;
        assert_eq!(again.list_at(now, None), r.list_at(now, None));
        assert_eq!(
            again.pull_targets(),
            vec![("p".to_owned(), "10.1.2.3:9000".to_owned())]
        );
        // Status follows last_seen after a restart; a heartbeat is accepted without re-registering.
        assert_eq!(status_at(&again, "q", now), AgentStatus::Down);
        assert!(again.heartbeat_at(&heartbeat("q"), now).expect("hb"));
        assert_eq!(status_at(&again, "q", now), AgentStatus::Healthy);
        assert!(!std::fs::exists(crate::fsutil::temp_path(&path)).expect("exists"));

        // A damaged file is set aside, not fatal.
        std::fs::write(&path, b"{not json").expect("write");
        let fresh = AgentRegistry::open_path(path.clone(), INTERVAL).expect("damaged");
        assert!(fresh.is_empty());
        assert!(path.with_file_name("agents.json.bad").exists());
    }

    #[test]
    fn saves_are_debounced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = AgentRegistry::open_path(dir.path().join("agents.json"), INTERVAL).expect("open");
        let now = Instant::now();
        assert!(!r.save_due(now));
        r.register_at(push_request("a"), T0).expect("a");
        assert!(!r.save_due(now), "a registration waits a little");
        assert!(r.save_due(now + PERSIST_REGISTRATION_DELAY + Duration::from_millis(10)));
        assert!(r.save().expect("save"));
        let saved = Instant::now();
        assert!(r.heartbeat_at(&heartbeat("a"), T0 + 1).expect("hb"));
        assert!(!r.save_due(saved + Duration::from_secs(1)));
        assert!(r.save_due(saved + PERSIST_ACTIVITY_DELAY + Duration::from_millis(10)));
    }

    #[tokio::test]
    async fn persister_saves_at_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agents.json");
        let r = AgentRegistry::open_path(path.clone(), INTERVAL).expect("open");
        r.register_at(push_request("a"), T0).expect("a");
        r.run_persister(async {}).await;
        let again = AgentRegistry::open_path(path, INTERVAL).expect("reopen");
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn heartbeat_interval_is_validated() {
        let config = CollectorConfig {
            heartbeat_interval_secs: 0,
            ..CollectorConfig::default()
        };
        let err = config.validate().expect_err("zero interval");
        assert!(err.to_string().contains("heartbeat_interval_secs"), "{err}");
        assert_eq!(CollectorConfig::default().heartbeat_interval_secs, 10);
    }
}
