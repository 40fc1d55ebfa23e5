//! Benchmark runs on agents: `damselfly bench run` asks the agents of an MCIS to run benchmarks, over the
//! connection they already have (no inbound port on the VM).
//!
//! * `POST /api/v1/bench/runs` picks the live agents of a namespace and MCIS (optionally one VM) from the
//!   registry, gives the run an id and queues a [`BenchCommand`] per agent. With shards the same run is queued on
//!   every shard (each knows the agents that heartbeat to it).
//! * The next heartbeat of each agent carries its command; the agent runs the benchmarks, pushes the results as
//!   rows of the `bench` table (tags `run_id`, `kind`, `unit` and the VM's identity; fields `value`, ...) like any
//!   other batch, and reports its progress in its heartbeats. A command is delivered until the agent reports the
//!   run, and the agent runs each run id once.
//! * `GET /api/v1/bench/runs/{run_id}` shows every agent's progress (over all shards); `GET /api/v1/bench` (and
//!   SQL on `bench`) the results, so runs never overwrite each other.
//!
//! `mrtt` needs the addresses of the other VMs: the collector knows the address each agent registered from, and
//! sends every agent of the run the others' as `ip:mrtt_port`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use damselfly_proto::v1::{BenchCommand, BenchProgress, BenchState, HeartbeatRequest};
use serde::{Deserialize, Serialize};

use crate::agents::{AgentRegistry, AgentStatus, unix_ms_now};
use crate::http::{ApiError, ApiState};

/// The benchmarks an agent knows.
pub const KINDS: [&str; 10] = [
    "cpus", "cpum", "memR", "memW", "fioR", "fioW", "dbR", "dbW", "rtt", "mrtt",
];

/// Runs kept in memory (the oldest finished ones are forgotten first; results stay in the `bench` table).
const MAX_RUNS: usize = 1_000;

/// A run request (`POST /api/v1/bench/runs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Namespace (`ns_id`) of the VMs.
    pub ns: String,
    /// MCIS (`mcis_id`) of the VMs.
    pub mcis: String,
    /// One VM (`vm_id`) only.
    #[serde(default)]
    pub vm: Option<String>,
    /// Benchmarks to run; default all but `rtt` (which needs `rtt_targets`).
    #[serde(default)]
    pub only: Vec<String>,
    /// Time limit of each benchmark, seconds (1 to 300; default the agent's, 10).
    #[serde(default)]
    pub time_limit_secs: Option<u32>,
    /// Size of the fio test file, bytes (default the agent's).
    #[serde(default)]
    pub fio_file_bytes: Option<u64>,
    /// `host:port` endpoints for `rtt`.
    #[serde(default)]
    pub rtt_targets: Vec<String>,
    /// The TCP port `mrtt` connects to on the other VMs. Default 22 (SSH, open on most VMs).
    #[serde(default = "default_mrtt_port")]
    pub mrtt_port: u16,
    /// Run even on a VM above the agent's load threshold.
    #[serde(default)]
    pub force: bool,
    /// Set by the shard that received the request when it passes the run to the others.
    #[serde(default)]
    pub run_id: Option<String>,
}

fn default_mrtt_port() -> u16 {
    22
}

impl RunRequest {
    /// Checks the request and returns the benchmark names to run.
    pub fn validate(&self) -> Result<Vec<String>, String> {
        for (key, value) in [("ns", &self.ns), ("mcis", &self.mcis)] {
            if value.is_empty() || value.len() > 256 {
                return Err(format!("{key} must be 1-256 characters"));
            }
        }
        let kinds: Vec<String> = if self.only.is_empty() {
            KINDS
                .iter()
                .filter(|k| **k != "rtt" || !self.rtt_targets.is_empty())
                .map(|k| k.to_string())
                .collect()
        } else {
            self.only.clone()
        };
        for k in &kinds {
            if !KINDS.contains(&k.as_str()) {
                return Err(format!(
                    "unknown benchmark {k:?}; the benchmarks are {}",
                    KINDS.join(", ")
                ));
            }
        }
        if kinds.iter().any(|k| k == "rtt") && self.rtt_targets.is_empty() {
            return Err("rtt needs rtt_targets (host:port endpoints to measure)".into());
        }
        if let Some(t) = self.time_limit_secs
            && !(1..=300).contains(&t)
        {
            return Err(format!("time_limit_secs ({t}) must be between 1 and 300"));
        }
        for t in &self.rtt_targets {
            if t.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("rtt target {t:?} must be host:port"));
            }
        }
        if let Some(id) = &self.run_id
            && (id.is_empty()
                || id.len() > 64
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(format!(
                "run_id {id:?} must be 1-64 characters of [A-Za-z0-9-]"
            ));
        }
        Ok(kinds)
    }
}

/// One agent's part of a run, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentRun {
    pub agent_id: String,
    pub vm_id: String,
    /// `queued` (not yet picked up), `running`, `done`, `refused` or `failed`.
    pub state: String,
    pub message: String,
    pub done: u32,
    pub total: u32,
    /// The shard the agent reports to (filled in when runs are merged over shards).
    #[serde(default)]
    pub shard: String,
}

#[derive(Debug)]
struct Run {
    created_ms: u64,
    agents: BTreeMap<String, AgentRun>,
}

#[derive(Debug, Default)]
struct Inner {
    runs: HashMap<String, Run>,
    /// Commands not yet acknowledged, by agent.
    pending: HashMap<String, Vec<BenchCommand>>,
    /// The address each agent registered from (for `mrtt`).
    addresses: HashMap<String, IpAddr>,
    /// Re-benchmark runs of stale specs ([`crate::scores`]) not yet known to be finished.
    refreshes: Vec<String>,
}

/// Benchmark runs and the commands waiting for their agents. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BenchRuns {
    inner: Arc<Mutex<Inner>>,
}

fn state_name(state: i32) -> &'static str {
    match BenchState::try_from(state) {
        Ok(BenchState::Running) => "running",
        Ok(BenchState::Done) => "done",
        Ok(BenchState::Refused) => "refused",
        Ok(BenchState::Failed) => "failed",
        _ => "queued",
    }
}

impl BenchRuns {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the address an agent registered from.
    pub fn note_address(&self, agent_id: &str, ip: IpAddr) {
        self.lock().addresses.insert(agent_id.to_string(), ip);
    }

    /// Queues `request` for the matching live agents of `registry`; returns the run id and this shard's agents.
    pub fn start(
        &self,
        registry: &AgentRegistry,
        request: &RunRequest,
        kinds: &[String],
    ) -> (String, Vec<AgentRun>) {
        let run_id = request.run_id.clone().unwrap_or_else(new_run_id);
        let agents: Vec<(String, String)> = registry
            .list(None)
            .into_iter()
            .filter(|a| a.status != AgentStatus::Down && a.registered)
            .filter(|a| {
                a.identity.get("ns_id") == Some(&request.ns)
                    && a.identity.get("mcis_id") == Some(&request.mcis)
            })
            .map(|a| {
                let vm = a.identity.get("vm_id").cloned().unwrap_or_default();
                (a.agent_id, vm)
            })
            .collect();
        let mut inner = self.lock();
        // mrtt: every VM of the MCIS (not only the chosen one) is a peer.
        let addresses: Vec<(String, IpAddr)> = agents
            .iter()
            .filter_map(|(id, _)| inner.addresses.get(id).map(|ip| (id.clone(), *ip)))
            .collect();
        let mut run = Run {
            created_ms: unix_ms_now(),
            agents: BTreeMap::new(),
        };
        for (agent_id, vm) in agents
            .iter()
            .filter(|(_, vm)| request.vm.as_ref().is_none_or(|v| v == vm))
        {
            let command = BenchCommand {
                run_id: run_id.clone(),
                kinds: kinds.to_vec(),
                time_limit_secs: request.time_limit_secs.unwrap_or(0),
                fio_file_bytes: request.fio_file_bytes.unwrap_or(0),
                rtt_targets: request.rtt_targets.clone(),
                mrtt_peers: addresses
                    .iter()
                    .filter(|(id, _)| id != agent_id)
                    .map(|(_, ip)| std::net::SocketAddr::new(*ip, request.mrtt_port).to_string())
                    .collect(),
                force: request.force,
            };
            inner
                .pending
                .entry(agent_id.clone())
                .or_default()
                .push(command);
            run.agents.insert(
                agent_id.clone(),
                AgentRun {
                    agent_id: agent_id.clone(),
                    vm_id: vm.clone(),
                    state: "queued".into(),
                    message: String::new(),
                    done: 0,
                    total: kinds.len() as u32,
                    shard: String::new(),
                },
            );
        }
        let list = run.agents.values().cloned().collect();
        if !run.agents.is_empty() {
            inner.runs.insert(run_id.clone(), run);
            if inner.runs.len() > MAX_RUNS
                && let Some(oldest) = inner
                    .runs
                    .iter()
                    .min_by_key(|(_, r)| r.created_ms)
                    .map(|(id, _)| id.clone())
            {
                inner.runs.remove(&oldest);
            }
        }
        (run_id, list)
    }

    /// Takes an agent's progress from its heartbeat and returns the commands to deliver with the answer.
    pub fn on_heartbeat(&self, request: &HeartbeatRequest) -> Vec<BenchCommand> {
        let mut inner = self.lock();
        for progress in &request.bench {
            if let Some(run) = inner.runs.get_mut(&progress.run_id)
                && let Some(agent) = run.agents.get_mut(&request.agent_id)
            {
                apply(agent, progress);
            }
        }
        let reported: Vec<&str> = request.bench.iter().map(|p| p.run_id.as_str()).collect();
        let Some(pending) = inner.pending.get_mut(&request.agent_id) else {
            return Vec::new();
        };
        pending.retain(|c| !reported.contains(&c.run_id.as_str()));
        let out = pending.clone();
        if pending.is_empty() {
            inner.pending.remove(&request.agent_id);
        }
        out
    }

    /// Notes a re-benchmark run of a stale spec.
    pub fn note_refresh(&self, run_id: &str) {
        self.lock().refreshes.push(run_id.to_string());
    }

    /// Re-benchmark runs not finished yet.
    pub fn unfinished_refreshes(&self) -> usize {
        let ids = std::mem::take(&mut self.lock().refreshes);
        let unfinished: Vec<String> = ids.into_iter().filter(|id| !self.finished(id)).collect();
        let n = unfinished.len();
        self.lock().refreshes.extend(unfinished);
        n
    }

    /// Whether every agent of the run has finished it (an unknown run counts as finished).
    pub fn finished(&self, run_id: &str) -> bool {
        self.status(run_id).is_none_or(|agents| {
            agents
                .iter()
                .all(|a| matches!(a.state.as_str(), "done" | "refused" | "failed"))
        })
    }

    /// This shard's view of a run.
    pub fn status(&self, run_id: &str) -> Option<Vec<AgentRun>> {
        self.lock()
            .runs
            .get(run_id)
            .map(|r| r.agents.values().cloned().collect())
    }
}

fn apply(agent: &mut AgentRun, p: &BenchProgress) {
    agent.state = state_name(p.state).to_string();
    agent.message.clone_from(&p.message);
    agent.done = p.done;
    agent.total = p.total;
}

fn new_run_id() -> String {
    // Time, then randomness (std's hasher keys are random per process): unique without a dependency.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_ms_now());
    format!("r{}-{:08x}", unix_ms_now(), h.finish() as u32)
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP

/// `POST /api/v1/bench/runs`, `GET /api/v1/bench/runs/{run_id}`, `GET /api/v1/bench`.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/bench/runs", post(start_run))
        .route("/api/v1/bench/runs/{run_id}", get(run_status))
        .route("/api/v1/bench", get(results))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeParams {
    /// `local`: this shard only (how shards ask each other).
    scope: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

async fn start_run(
    State(api): State<Arc<ApiState>>,
    Query(params): Query<ScopeParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut request: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not a valid run request: {e}")))?;
    let kinds = request.validate().map_err(bad)?;
    let local_only = params.scope.as_deref() == Some("local");
    let (run_id, mut agents) = api.bench.start(&api.registry, &request, &kinds);
    for a in &mut agents {
        a.shard = api.cluster.self_id().to_string();
    }
    let mut missing = Vec::new();
    if !local_only && api.cluster.is_sharded() {
        request.run_id = Some(run_id.clone());
        let body = serde_json::to_vec(&request).unwrap_or_default();
        let (answers, lost) = api
            .cluster
            .post_to_peers("/api/v1/bench/runs?scope=local", body)
            .await;
        missing = lost;
        for (shard, body) in answers {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(list) = v.get("agents").cloned()
                && let Ok(list) = serde_json::from_value::<Vec<AgentRun>>(list)
            {
                agents.extend(list.into_iter().map(|mut a| {
                    a.shard.clone_from(&shard);
                    a
                }));
            }
        }
    }
    if agents.is_empty() && !local_only {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no live registered agent with ns_id {:?} and mcis_id {:?}{}",
                request.ns,
                request.mcis,
                request
                    .vm
                    .as_ref()
                    .map(|v| format!(" and vm_id {v:?}"))
                    .unwrap_or_default()
            ),
        });
    }
    let body = serde_json::json!({
        "run_id": run_id,
        "kinds": kinds,
        "agents": agents,
        "missing_shards": missing,
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn run_status(
    State(api): State<Arc<ApiState>>,
    Path(run_id): Path<String>,
    Query(params): Query<ScopeParams>,
) -> Result<Response, ApiError> {
    let local_only = params.scope.as_deref() == Some("local");
    let mut agents: Vec<AgentRun> = api.bench.status(&run_id).unwrap_or_default();
    for a in &mut agents {
        a.shard = api.cluster.self_id().to_string();
    }
    let mut missing = Vec::new();
    if !local_only && api.cluster.is_sharded() {
        let (answers, lost) = api
            .cluster
            .get_from_peers(&format!("/api/v1/bench/runs/{run_id}?scope=local"))
            .await;
        missing = lost;
        for (shard, body) in answers {
            if let Ok(list) = serde_json::from_slice::<Vec<AgentRun>>(&body) {
                agents.extend(list.into_iter().map(|mut a| {
                    a.shard.clone_from(&shard);
                    a
                }));
            }
        }
    }
    if local_only {
        return Ok(axum::Json(agents).into_response());
    }
    if agents.is_empty() {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no run {run_id:?} on any shard"),
        });
    }
    let finished = agents
        .iter()
        .all(|a| matches!(a.state.as_str(), "done" | "refused" | "failed"));
    let body = serde_json::json!({
        "run_id": run_id,
        "finished": finished,
        "agents": agents,
        "missing_shards": missing,
    });
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultParams {
    run: Option<String>,
}

async fn results(
    State(api): State<Arc<ApiState>>,
    Query(params): Query<ResultParams>,
) -> Result<Response, ApiError> {
    let mut sql = "SELECT * FROM bench".to_string();
    if let Some(run) = &params.run {
        if run.is_empty() || !run.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad(format!("run {run:?} is not a run id")));
        }
        sql.push_str(&format!(" WHERE run_id = '{run}'"));
    }
    sql.push_str(" ORDER BY time, agent_id, kind");
    let result = match api.engine.sql(&sql).await {
        Ok(r) => r,
        // No run has reported yet: no table.
        Err(crate::QueryError::Invalid(m)) if m.contains("bench") && m.contains("not found") => {
            return Ok(axum::Json(Vec::<serde_json::Value>::new()).into_response());
        }
        Err(e) => {
            return Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: e.to_string(),
            });
        }
    };
    let bytes = crate::http::encode(&result, crate::http::Format::Json).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: e.to_string(),
    })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<Vec<String>, String> {
        serde_json::from_str::<RunRequest>(json)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn run_requests_are_checked() {
        let all = request(r#"{"ns":"n","mcis":"m"}"#).expect("valid");
        assert_eq!(all.len(), 9, "all but rtt: {all:?}");
        assert_eq!(
            request(r#"{"ns":"n","mcis":"m","only":["cpus","memR"]}"#).expect("valid"),
            ["cpus", "memR"]
        );
        let e = request(r#"{"ns":"n","mcis":"m","only":["gpu"]}"#).expect_err("unknown");
        assert!(e.contains("unknown benchmark \"gpu\""), "{e}");
        let e = request(r#"{"ns":"n","mcis":"m","only":["rtt"]}"#).expect_err("no target");
        assert!(e.contains("rtt needs rtt_targets"), "{e}");
        let e = request(r#"{"ns":"n","mcis":"m","time_limit_secs":0}"#).expect_err("limit");
        assert!(e.contains("time_limit_secs"), "{e}");
        let e = request(r#"{"ns":"n","mcis":"m","colour":1}"#).expect_err("field");
        assert!(e.contains("colour"), "{e}");
        let e = request(r#"{"ns":"","mcis":"m"}"#).expect_err("ns");
        assert!(e.contains("ns must"), "{e}");
    }

    #[test]
    fn commands_are_delivered_until_reported() {
        let runs = BenchRuns::default();
        let mut inner = runs.lock();
        inner.pending.insert(
            "a".into(),
            vec![BenchCommand {
                run_id: "r1".into(),
                ..BenchCommand::default()
            }],
        );
        drop(inner);
        let beat = |bench: Vec<BenchProgress>| HeartbeatRequest {
            agent_id: "a".into(),
            bench,
            ..HeartbeatRequest::default()
        };
        assert_eq!(runs.on_heartbeat(&beat(vec![])).len(), 1);
        assert_eq!(
            runs.on_heartbeat(&beat(vec![])).len(),
            1,
            "again until reported"
        );
        let progress = BenchProgress {
            run_id: "r1".into(),
            state: BenchState::Running as i32,
            ..BenchProgress::default()
        };
        assert!(runs.on_heartbeat(&beat(vec![progress])).is_empty());
    }
}
