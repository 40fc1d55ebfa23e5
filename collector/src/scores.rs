//! Dynamic benchmark scores: the freshest benchmark result of each VM, weighted by how busy the VM is now, and
//! per spec (csp, region, spec) the median over its VMs. `GET /api/v1/scores` (docs/BENCHMARKS.md has the
//! formula and a worked example).
//!
//! For a throughput benchmark `k` (every kind but `rtt` and `mrtt`) and a VM `v`:
//!
//! * `raw(v, k)`: the value of `v`'s newest successful `k` result;
//! * `busy(v)`: the mean `usage_percent` of `v`'s `cpu-total` rows over the last `load_window_secs`, as a fraction
//!   (unknown, counted as 0, when the VM sent none);
//! * `score(v, k) = raw(v, k) × (1 − busy(v))`: what the VM has left to give (80% busy: 20% of its throughput);
//! * `stale(v, k)`: the result is older than `fresh_secs`;
//! * per spec: `score(spec, k)` = the median of `score(v, k)` over the spec's VMs with a fresh result (all its VMs,
//!   marked stale, when none is fresh).
//!
//! Latency kinds (`rtt`, `mrtt`; lower is better) are reported raw and never weighted.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::http::{ApiError, ApiState};
use crate::query::QueryEngine;

/// One VM's score for one benchmark.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmScore {
    pub agent_id: String,
    pub vm_id: String,
    pub csp: String,
    pub region: String,
    pub spec: String,
    pub raw: f64,
    pub unit: String,
    /// Fraction of the CPU in use over the load window; `None` when the VM sent no cpu rows in it.
    pub busy: Option<f64>,
    pub score: f64,
    pub age_secs: f64,
    pub stale: bool,
}

/// One spec's score for one benchmark.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpecScore {
    pub csp: String,
    pub region: String,
    pub spec: String,
    /// VMs the score is the median of.
    pub vms: usize,
    pub score: f64,
    pub stale: bool,
}

/// Scores of one benchmark kind.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scores {
    pub kind: String,
    pub fresh_secs: u64,
    pub load_window_secs: u64,
    pub vms: Vec<VmScore>,
    pub specs: Vec<SpecScore>,
}

/// A newest successful benchmark row, as read from `bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub agent_id: String,
    pub vm_id: String,
    pub csp: String,
    pub region: String,
    pub spec: String,
    pub value: f64,
    pub unit: String,
    pub age_secs: f64,
}

fn is_latency(kind: &str) -> bool {
    matches!(kind, "rtt" | "mrtt")
}

/// The scores of `kind` from the newest rows per VM and each VM's busy fraction (pure: the formula).
pub fn compute(
    kind: &str,
    rows: &[BenchRow],
    busy: &BTreeMap<String, f64>,
    fresh_secs: u64,
    load_window_secs: u64,
) -> Scores {
    let vms: Vec<VmScore> = rows
        .iter()
        .map(|r| {
            let b = busy.get(&r.agent_id).copied().map(|b| b.clamp(0.0, 1.0));
            let score = if is_latency(kind) {
                r.value
            } else {
                r.value * (1.0 - b.unwrap_or(0.0))
            };
            VmScore {
                agent_id: r.agent_id.clone(),
                vm_id: r.vm_id.clone(),
                csp: r.csp.clone(),
                region: r.region.clone(),
                spec: r.spec.clone(),
                raw: r.value,
                unit: r.unit.clone(),
                busy: b,
                score,
                age_secs: r.age_secs,
                stale: r.age_secs > fresh_secs as f64,
            }
        })
        .collect();
    let mut groups: BTreeMap<(String, String, String), Vec<&VmScore>> = BTreeMap::new();
    for v in &vms {
        groups
            .entry((v.csp.clone(), v.region.clone(), v.spec.clone()))
            .or_default()
            .push(v);
    }
    let specs = groups
        .into_iter()
        .map(|((csp, region, spec), members)| {
            let fresh: Vec<f64> = members
                .iter()
                .filter(|v| !v.stale)
                .map(|v| v.score)
                .collect();
            let (values, stale) = if fresh.is_empty() {
                (members.iter().map(|v| v.score).collect(), true)
            } else {
                (fresh, false)
            };
            SpecScore {
                csp,
                region,
                spec,
                vms: values.len(),
                score: median(values),
                stale,
            }
        })
        .collect();
    Scores {
        kind: kind.to_string(),
        fresh_secs,
        load_window_secs,
        vms,
        specs,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Reads the newest successful `kind` row of every VM and the VMs' busy fractions, and computes the scores.
pub async fn scores(
    engine: &QueryEngine,
    kind: &str,
    fresh_secs: u64,
    load_window_secs: u64,
) -> Result<Scores, String> {
    let rows = json_rows(
        engine,
        &format!(
            "SELECT *, date_part('epoch', now()) - date_part('epoch', time) AS age_secs FROM bench \
             WHERE kind = '{kind}' AND value IS NOT NULL ORDER BY time DESC"
        ),
    )
    .await?;
    let mut newest: BTreeMap<String, BenchRow> = BTreeMap::new();
    for r in rows {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let agent_id = s("agent_id");
        if newest.contains_key(&agent_id) {
            continue;
        }
        let age_secs = r
            .get("age_secs")
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::INFINITY);
        newest.insert(
            agent_id.clone(),
            BenchRow {
                agent_id,
                vm_id: s("vm_id"),
                csp: s("csp"),
                region: s("region"),
                spec: s("spec"),
                value: r.get("value").and_then(|v| v.as_f64()).unwrap_or(0.0),
                unit: s("unit"),
                age_secs,
            },
        );
    }
    let busy_rows = json_rows(
        engine,
        &format!(
            "SELECT agent_id, avg(usage_percent) / 100.0 AS busy FROM cpu WHERE cpu = 'cpu-total' \
             AND time > now() - INTERVAL '{load_window_secs} seconds' GROUP BY agent_id"
        ),
    )
    .await
    .unwrap_or_default();
    let busy: BTreeMap<String, f64> = busy_rows
        .iter()
        .filter_map(|r| {
            Some((
                r.get("agent_id")?.as_str()?.to_string(),
                r.get("busy")?.as_f64()?,
            ))
        })
        .collect();
    let rows: Vec<BenchRow> = newest.into_values().collect();
    Ok(compute(kind, &rows, &busy, fresh_secs, load_window_secs))
}

/// Runs SQL and returns the rows as JSON objects; a missing table is no rows.
async fn json_rows(
    engine: &QueryEngine,
    sql: &str,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, String> {
    let result = match engine.sql(sql).await {
        Ok(r) => r,
        Err(crate::QueryError::Invalid(m)) if m.contains("not found") => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let bytes =
        crate::http::encode(&result, crate::http::Format::Json).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreParams {
    /// Benchmark kind; default `cpum`.
    kind: Option<String>,
    /// Results older than this are stale. Default 86,400 (a day).
    fresh_secs: Option<u64>,
    /// Window of the load average. Default 300.
    load_window_secs: Option<u64>,
}

/// `GET /api/v1/scores`, `POST /api/v1/scores/refresh`.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/scores", get(get_scores))
        .route("/api/v1/scores/refresh", axum::routing::post(refresh))
}

/// `POST /api/v1/scores/refresh`: re-benchmark stale specs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    /// Benchmark kind; default `cpum`.
    #[serde(default)]
    kind: Option<String>,
    /// Results older than this are stale. Default 86,400.
    #[serde(default)]
    fresh_secs: Option<u64>,
    /// Most refresh runs unfinished at once (this call's and earlier ones'). Default 2, 1 to 100.
    #[serde(default)]
    max_concurrent: Option<usize>,
    /// Time limit of the benchmark, seconds. Default the agent's.
    #[serde(default)]
    time_limit_secs: Option<u32>,
}

async fn refresh(
    State(api): State<Arc<ApiState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let bad = |message: String| ApiError {
        status: StatusCode::BAD_REQUEST,
        message,
    };
    let request: RefreshRequest = if body.is_empty() {
        serde_json::from_str("{}").map_err(|e| bad(e.to_string()))?
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad refresh request: {e}")))?
    };
    let kind = request.kind.unwrap_or_else(|| "cpum".into());
    if !crate::bench::KINDS.contains(&kind.as_str()) {
        return Err(bad(format!("unknown benchmark {kind:?}")));
    }
    let max = request.max_concurrent.unwrap_or(2);
    if !(1..=100).contains(&max) {
        return Err(bad(format!(
            "max_concurrent ({max}) must be between 1 and 100"
        )));
    }
    let fresh = request.fresh_secs.unwrap_or(86_400);
    let scores = scores(&api.engine, &kind, fresh, 300)
        .await
        .map_err(|message| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        })?;
    let running = api.bench.unfinished_refreshes();
    let live = api.registry.list(None);
    let mut started = Vec::new();
    let mut waiting = Vec::new();
    for spec in scores.specs.iter().filter(|s| s.stale) {
        // One live VM of the spec is enough: the spec's score is the median over its VMs.
        let candidate = scores
            .vms
            .iter()
            .filter(|v| {
                (v.csp.as_str(), v.region.as_str(), v.spec.as_str())
                    == (spec.csp.as_str(), spec.region.as_str(), spec.spec.as_str())
            })
            .find_map(|v| {
                live.iter().find(|a| {
                    a.agent_id == v.agent_id && a.status != crate::agents::AgentStatus::Down
                })
            });
        let Some(agent) = candidate else {
            waiting.push(
                serde_json::json!({"spec": spec.spec, "csp": spec.csp, "region": spec.region,
                "reason": "no live VM of this spec reports to this shard"}),
            );
            continue;
        };
        if running + started.len() >= max {
            waiting.push(
                serde_json::json!({"spec": spec.spec, "csp": spec.csp, "region": spec.region,
                "reason": format!("{max} refresh runs are already unfinished (max_concurrent)")}),
            );
            continue;
        }
        let id = |k: &str| agent.identity.get(k).cloned().unwrap_or_default();
        let run = crate::bench::RunRequest {
            ns: id("ns_id"),
            mcis: id("mcis_id"),
            vm: Some(id("vm_id")),
            only: vec![kind.clone()],
            time_limit_secs: request.time_limit_secs,
            fio_file_bytes: None,
            rtt_targets: Vec::new(),
            mrtt_port: 22,
            force: false,
            run_id: None,
        };
        let kinds = run.validate().map_err(bad)?;
        let (run_id, agents) = api.bench.start(&api.registry, &run, &kinds);
        if agents.is_empty() {
            continue;
        }
        api.bench.note_refresh(&run_id);
        started.push(
            serde_json::json!({"spec": spec.spec, "csp": spec.csp, "region": spec.region,
            "vm_id": id("vm_id"), "run_id": run_id}),
        );
    }
    Ok(axum::Json(serde_json::json!({
        "kind": kind,
        "stale_specs": scores.specs.iter().filter(|s| s.stale).count(),
        "started": started,
        "waiting": waiting,
    }))
    .into_response())
}

async fn get_scores(
    State(api): State<Arc<ApiState>>,
    params: Result<Query<ScoreParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("bad query string: {}", e.body_text()),
    })?;
    let kind = params.kind.unwrap_or_else(|| "cpum".into());
    if !crate::bench::KINDS.contains(&kind.as_str()) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "unknown benchmark {kind:?}; the benchmarks are {}",
                crate::bench::KINDS.join(", ")
            ),
        });
    }
    let fresh = params.fresh_secs.unwrap_or(86_400);
    let window = params.load_window_secs.unwrap_or(300).clamp(10, 86_400);
    let scores = scores(&api.engine, &kind, fresh, window)
        .await
        .map_err(|message| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        })?;
    Ok(axum::Json(scores).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(agent: &str, spec: &str, value: f64, age: f64) -> BenchRow {
        BenchRow {
            agent_id: agent.into(),
            vm_id: agent.into(),
            csp: "aws".into(),
            region: "ap-northeast-2".into(),
            spec: spec.into(),
            value,
            unit: "Mops/s".into(),
            age_secs: age,
        }
    }

    #[test]
    fn the_documented_worked_example() {
        // docs/BENCHMARKS.md: three VMs of t3.large (one 80% busy, one idle, one stale), one of c5.large.
        let rows = [
            row("a", "t3.large", 1000.0, 60.0),
            row("b", "t3.large", 900.0, 120.0),
            row("c", "t3.large", 1100.0, 200_000.0),
            row("d", "c5.large", 1500.0, 30.0),
        ];
        let busy: BTreeMap<String, f64> = [
            ("a".to_string(), 0.8),
            ("b".to_string(), 0.0),
            ("d".to_string(), 0.5),
        ]
        .into();
        let s = compute("cpum", &rows, &busy, 86_400, 300);
        let vm = |id: &str| s.vms.iter().find(|v| v.agent_id == id).expect("vm");
        assert!((vm("a").score - 200.0).abs() < 1e-9);
        assert!((vm("b").score - 900.0).abs() < 1e-9);
        assert!(vm("c").stale && vm("c").busy.is_none());
        let spec = |name: &str| s.specs.iter().find(|v| v.spec == name).expect("spec");
        // Median of the fresh ones (200, 900): 550; the stale VM is left out.
        assert_eq!(
            (
                spec("t3.large").score,
                spec("t3.large").vms,
                spec("t3.large").stale
            ),
            (550.0, 2, false)
        );
        assert_eq!(
            (spec("c5.large").score, spec("c5.large").stale),
            (750.0, false)
        );
        // Loading a VM lowers its spec's score.
        let loaded: BTreeMap<String, f64> = [
            ("a".to_string(), 0.8),
            ("b".to_string(), 0.9),
            ("d".to_string(), 0.5),
        ]
        .into();
        let s2 = compute("cpum", &rows, &loaded, 86_400, 300);
        let t3 = s2
            .specs
            .iter()
            .find(|v| v.spec == "t3.large")
            .expect("spec");
        assert!(t3.score < 550.0, "{t3:?}");
    }

    #[test]
    fn latency_is_not_weighted_and_all_stale_is_marked() {
        let rows = [row("a", "t3.large", 2.5, 1e9)];
        let busy: BTreeMap<String, f64> = [("a".to_string(), 0.9)].into();
        let s = compute("rtt", &rows, &busy, 60, 300);
        assert_eq!(s.vms[0].score, 2.5);
        assert!(s.specs[0].stale);
    }
}
