//! Alerting: rules evaluated on a schedule over the hot data, notifications, an event history and silences.
//!
//! * [`rules`] — what a rule is and how it is validated; [`eval`] — the state machine; [`notify`] — receivers.
//! * [`AlertManager`] holds the rules (from the `[alerts] rules_file` and from the API), the active alerts, the
//!   silences and the receivers. [`AlertManager::run`] evaluates every `eval_interval_ms`: threshold rules that
//!   share table, filter, window and group-by are answered by one SQL statement over the store (buffer and recent
//!   files, pruned by a `time >=` filter), absence rules read the agent registry's last-seen times.
//! * Every state change is written as a row of the `alerts` table through the normal store path (WAL, buffer,
//!   Parquet), so it is queryable by SQL and survives restarts; at start-up the active alerts are rebuilt from
//!   its newest row per (rule, group).
//! * Rules added through the API and the silences are kept in `<data_dir>/state/alerts.json`.
//!
//! HTTP: `GET /api/v1/alerts` (active alerts), `GET|POST /api/v1/alerts/rules`, `DELETE
//! /api/v1/alerts/rules/{name}`, `GET|POST /api/v1/alerts/silences`, `DELETE /api/v1/alerts/silences/{id}`,
//! `GET /api/v1/alerts/receivers` (delivery counters), `GET /api/v1/alerts/status` (evaluation timings).
//! docs/ALERTING.md is the user's guide.

pub mod eval;
pub mod notify;
pub mod rules;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::{Field, Point, Tag, WriteBatch};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agents::{AgentRegistry, rfc3339};
use crate::config::CollectorConfig;
use crate::error::{CollectorError, Result};
use crate::http::{ApiError, ApiState};
use crate::model::unix_ms_now;
use crate::query::QueryEngine;
use crate::store::{Store, WriteOutcome};
use eval::{Current, Phase};
use notify::{Delivery, Notification, Notifier, ReceiverConfig};
use rules::{CompiledRule, Rule, RuleError, RuleKind, Severity};

/// The table state changes are written to.
pub const HISTORY_TABLE: &str = "alerts";
/// Tag names of the history rows; a group tag with one of these names is left out of the row (it stays in
/// `group_key`).
const HISTORY_TAGS: [&str; 6] = [
    "rule",
    "group_key",
    "kind",
    "from_state",
    "to_state",
    "severity",
];
/// History rows that could not be stored (the store said "retry later") are kept for the next round, up to this.
const MAX_UNSTORED_ROWS: usize = 10_000;
/// At start-up, alerts are rebuilt from history rows this recent.
const RESTORE_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Most silences kept.
const MAX_SILENCES: usize = 10_000;

/// `[alerts]` of the collector's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// A TOML file of `[[rules]]` and `[[receivers]]` (docs/ALERTING.md), read at start-up. Default: none (rules
    /// only through the API, no receivers).
    pub rules_file: Option<PathBuf>,
    /// Milliseconds between two evaluations of every rule. Default 10,000; 50 to 3,600,000.
    pub eval_interval_ms: u64,
    /// Notifications waiting per receiver; more are dropped (counted). Default 1,000.
    pub queue_capacity: usize,
    /// First retry delay of a failed notification (milliseconds, doubling, randomised). Default 500.
    pub retry_initial_ms: u64,
    /// Longest retry delay (milliseconds). Default 60,000.
    pub retry_max_ms: u64,
    /// Attempts per notification before it is dropped. Default 10.
    pub max_attempts: u32,
    /// Most rules (file and API together). Default 10,000.
    pub max_rules: usize,
    /// Shared rule queries running at once in an evaluation. Default 2.
    pub query_concurrency: usize,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            rules_file: None,
            eval_interval_ms: 10_000,
            queue_capacity: 1_000,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            max_attempts: 10,
            max_rules: 10_000,
            query_concurrency: 2,
        }
    }
}

impl AlertsConfig {
    /// Checks the numbers (the rules file is read and checked by [`AlertManager::open`]).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(50..=3_600_000).contains(&self.eval_interval_ms) {
            return Err(format!(
                "alerts.eval_interval_ms ({}) must be between 50 and 3600000",
                self.eval_interval_ms
            ));
        }
        if self.queue_capacity == 0 || self.max_attempts == 0 || self.query_concurrency == 0 {
            return Err(
                "alerts.queue_capacity, alerts.max_attempts and alerts.query_concurrency must be at least 1"
                    .into(),
            );
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err(format!(
                "alerts.retry_initial_ms ({}) must be at least 1 and at most alerts.retry_max_ms ({})",
                self.retry_initial_ms, self.retry_max_ms
            ));
        }
        Ok(())
    }
}

/// The rules file: `[[receivers]]` and `[[rules]]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub receivers: Vec<ReceiverConfig>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A silence: notifications of alerts matching every matcher are not sent until `expires_at`. Matchers are
/// `rule` (the rule name) and group tags (`vm_id`, `mcis_id`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: BTreeMap<String, String>,
    pub comment: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// RFC 3339 of `expires_unix_ms`, for people.
    pub expires_at: String,
}

impl Silence {
    fn matches(&self, rule: &str, labels: &[(String, String)]) -> bool {
        self.matchers.iter().all(|(k, v)| {
            if k == "rule" {
                rule == v
            } else {
                labels.iter().any(|(lk, lv)| lk == k && lv == v)
            }
        })
    }
}

/// `POST /api/v1/alerts/silences`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceRequest {
    matchers: BTreeMap<String, String>,
    /// How long from now, e.g. `2h`.
    duration: String,
    #[serde(default)]
    comment: String,
}

/// What is saved in `state/alerts.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    rules: Vec<Rule>,
    silences: Vec<Silence>,
}

/// One active alert, as `GET /api/v1/alerts` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveAlert {
    pub rule: String,
    pub group: BTreeMap<String, String>,
    pub group_key: String,
    pub state: Phase,
    pub severity: Severity,
    /// The latest value (for absence rules: seconds since the agent was last heard from).
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// When it entered its state (RFC 3339).
    pub since: String,
    pub silenced: bool,
    pub summary: String,
    pub receivers: Vec<String>,
}

/// A rule as `GET /api/v1/alerts/rules` shows it.
#[derive(Debug, Clone, Serialize)]
struct RuleView {
    #[serde(flatten)]
    rule: Rule,
    /// `file` or `api`.
    source: &'static str,
    /// The last evaluation's error (a query that failed), if any.
    last_error: Option<String>,
    last_eval_unix_ms: Option<u64>,
    active: usize,
}

/// Evaluation timings (`GET /api/v1/alerts/status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvalStats {
    pub rounds: u64,
    pub rules: usize,
    /// SQL statements the last round ran (rules sharing a query count once).
    pub queries_last_round: usize,
    pub last_round_ms: f64,
    pub max_round_ms: f64,
    pub mean_round_ms: f64,
    pub active_alerts: usize,
    pub history_rows_written: u64,
    pub history_rows_unstored: usize,
}

#[derive(Debug)]
struct AlertEntry {
    labels: Vec<(String, String)>,
    current: Current,
    value: Option<f64>,
    threshold: Option<f64>,
    /// The severity receivers were last told of (`None`: not told, e.g. pending or silenced).
    notified: Option<Severity>,
    last_notified_ms: u64,
}

#[derive(Debug, Default)]
struct RuleSet {
    /// By name.
    rules: BTreeMap<String, (Arc<CompiledRule>, &'static str)>,
}

#[derive(Debug, Default)]
struct RuleStatus {
    last_error: Option<String>,
    last_eval_ms: Option<u64>,
}

struct Inner {
    config: AlertsConfig,
    store: Store,
    engine: QueryEngine,
    registry: AgentRegistry,
    notifier: Notifier,
    state_path: PathBuf,
    rules: Mutex<Arc<RuleSet>>,
    /// rule → group key → alert.
    alerts: Mutex<HashMap<String, HashMap<String, AlertEntry>>>,
    statuses: Mutex<HashMap<String, RuleStatus>>,
    silences: Mutex<Vec<Silence>>,
    stats: Mutex<EvalStats>,
    unstored: Mutex<Vec<Point>>,
    /// Serialises saves of `alerts.json`.
    save_lock: Mutex<()>,
    stop: watch::Sender<bool>,
}

/// The alerting engine. Cheap to clone.
#[derive(Clone)]
pub struct AlertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AlertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertManager")
            .field("rules", &lock(&self.inner.rules).rules.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl AlertManager {
    /// Reads the rules file (a bad one is a configuration error naming the rule and field) and the saved API
    /// rules and silences, and starts the receivers' tasks. Needs a Tokio runtime.
    pub fn open(
        config: &CollectorConfig,
        store: Store,
        engine: QueryEngine,
        registry: AgentRegistry,
    ) -> Result<AlertManager> {
        let alerts = config.alerts.clone();
        let file = match &alerts.rules_file {
            None => RulesFile::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| CollectorError::io(path, e))?;
                toml::from_str::<RulesFile>(&text).map_err(|e| {
                    CollectorError::Config(format!("alerts.rules_file {}: {e}", path.display()))
                })?
            }
        };
        let bad = |e: RuleError| {
            CollectorError::Config(format!(
                "alerts.rules_file {}: {e}",
                alerts
                    .rules_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ))
        };
        let mut names = HashSet::new();
        for r in &file.receivers {
            r.validate().map_err(bad)?;
            if !names.insert(r.name.clone()) {
                return Err(bad(RuleError::Invalid {
                    rule: format!("receiver {}", r.name),
                    field: "name",
                    message: "appears twice".into(),
                }));
            }
        }
        let mut set = RuleSet::default();
        for rule in &file.rules {
            let compiled = rule.compile(&names).map_err(bad)?;
            if set.rules.contains_key(&rule.name) {
                return Err(bad(RuleError::Invalid {
                    rule: rule.name.clone(),
                    field: "name",
                    message: "two rules have this name".into(),
                }));
            }
            set.rules
                .insert(rule.name.clone(), (Arc::new(compiled), "file"));
        }
        let state_path = config.state_dir().join("alerts.json");
        let saved = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice::<SavedState>(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %state_path.display(), error = %e,
                    "cannot read the saved alert rules and silences; starting without them");
                SavedState::default()
            }),
            Err(_) => SavedState::default(),
        };
        for rule in saved.rules {
            if set.rules.contains_key(&rule.name) {
                tracing::warn!(rule = %rule.name, "a saved API rule has the name of a rules-file rule; the file's wins");
                continue;
            }
            match rule.compile(&names) {
                Ok(c) => {
                    set.rules.insert(rule.name.clone(), (Arc::new(c), "api"));
                }
                Err(e) => tracing::error!("a saved alert rule no longer validates, left out: {e}"),
            }
        }
        if set.rules.len() > alerts.max_rules {
            return Err(CollectorError::Config(format!(
                "{} alert rules; alerts.max_rules is {}",
                set.rules.len(),
                alerts.max_rules
            )));
        }
        let (stop, stop_rx) = watch::channel(false);
        let notifier = Notifier::start(
            &file.receivers,
            Delivery {
                queue_capacity: alerts.queue_capacity,
                retry_initial: Duration::from_millis(alerts.retry_initial_ms),
                retry_max: Duration::from_millis(alerts.retry_max_ms),
                max_attempts: alerts.max_attempts,
            },
            stop_rx,
        );
        tracing::info!(
            rules = set.rules.len(),
            receivers = file.receivers.len(),
            "alerting configured"
        );
        Ok(AlertManager {
            inner: Arc::new(Inner {
                config: alerts,
                store,
                engine,
                registry,
                notifier,
                state_path,
                rules: Mutex::new(Arc::new(set)),
                alerts: Mutex::new(HashMap::new()),
                statuses: Mutex::new(HashMap::new()),
                silences: Mutex::new(saved.silences),
                stats: Mutex::new(EvalStats::default()),
                unstored: Mutex::new(Vec::new()),
                save_lock: Mutex::new(()),
                stop,
            }),
        })
    }

    /// Rebuilds the active alerts from the history, then evaluates every `eval_interval_ms` until `shutdown`.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {
                let _ = self.inner.stop.send(true);
                return;
            }
            () = self.restore() => {}
        }
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.inner.config.eval_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.evaluate() => {}
            }
        }
        // Receivers stop with what they hold (delivery is at most once).
        let _ = self.inner.stop.send(true);
    }

    /// Active alerts from the newest history row of each (rule, group) that says pending or firing.
    async fn restore(&self) {
        let since = crate::model::now_nanos()
            .saturating_sub(i64::try_from(RESTORE_WINDOW.as_nanos()).unwrap_or(i64::MAX));
        let sql = format!(
            "SELECT rule, group_key, last_value(to_state ORDER BY time) AS state, \
             last_value(severity ORDER BY time) AS severity, last_value(value ORDER BY time) AS value, \
             CAST(max(time) AS BIGINT) AS t, last_value(silenced ORDER BY time) AS silenced FROM {HISTORY_TABLE} WHERE time >= to_timestamp_nanos({since}) \
             GROUP BY rule, group_key"
        );
        if !self
            .inner
            .store
            .table_names()
            .iter()
            .any(|t| t == HISTORY_TABLE)
        {
            return;
        }
        let result = match self.inner.engine.sql(&sql).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the alerts history; active alerts start empty");
                return;
            }
        };
        let rules = self.rules();
        let mut alerts = lock(&self.inner.alerts);
        let mut restored = 0;
        for batch in &result.batches {
            let text = |i: usize| {
                arrow::compute::cast(batch.column(i), &arrow::datatypes::DataType::Utf8)
                    .ok()
                    .and_then(|a| {
                        a.as_any()
                            .downcast_ref::<arrow::array::StringArray>()
                            .cloned()
                    })
            };
            let (Some(rule), Some(key), Some(state), Some(severity)) =
                (text(0), text(1), text(2), text(3))
            else {
                continue;
            };
            let value = batch
                .column(4)
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .cloned();
            let t = batch
                .column(5)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .cloned();
            let silenced = batch
                .column(6)
                .as_any()
                .downcast_ref::<arrow::array::BooleanArray>()
                .cloned();
            for row in 0..batch.num_rows() {
                use arrow::array::Array;
                let phase = match state.value(row) {
                    "pending" => Phase::Pending,
                    "firing" => Phase::Firing,
                    _ => continue,
                };
                let severity = match severity.value(row) {
                    "critical" => Severity::Critical,
                    _ => Severity::Warning,
                };
                let rule_name = rule.value(row);
                let Some((compiled, _)) = rules.rules.get(rule_name) else {
                    continue;
                };
                let since_ms = t
                    .as_ref()
                    .filter(|t| !t.is_null(row))
                    .map_or(0, |t| u64::try_from(t.value(row) / 1_000_000).unwrap_or(0));
                let key = key.value(row).to_owned();
                let labels = rules::parse_group_key(&key);
                let value = value
                    .as_ref()
                    .filter(|v| !v.is_null(row))
                    .map(|v| v.value(row));
                alerts.entry(rule_name.to_owned()).or_default().insert(
                    key,
                    AlertEntry {
                        labels,
                        current: Current {
                            phase,
                            severity,
                            since_ms,
                        },
                        value,
                        threshold: compiled.levels.shown_threshold(severity),
                        // Receivers were told before the restart (unless a silence held it back, then they are
                        // told now if the silence is gone); the repeat interval runs from then.
                        notified: (phase == Phase::Firing
                            && !silenced
                                .as_ref()
                                .is_some_and(|s| !s.is_null(row) && s.value(row)))
                        .then_some(severity),
                        last_notified_ms: since_ms,
                    },
                );
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::info!(
                alerts = restored,
                "active alerts restored from the alerts history"
            );
        }
    }

    fn rules(&self) -> Arc<RuleSet> {
        lock(&self.inner.rules).clone()
    }

    /// One evaluation of every rule.
    pub async fn evaluate(&self) {
        let started = Instant::now();
        let now_ms = unix_ms_now();
        let now_ns = i64::try_from(now_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        let rules = self.rules();

        // Threshold rules grouped by shared query; each distinct expression computed once.
        let mut queries: BTreeMap<rules::QueryKey, (Vec<String>, Vec<Arc<CompiledRule>>)> =
            BTreeMap::new();
        for (compiled, _) in rules.rules.values() {
            if let Some(key) = &compiled.query {
                let (exprs, members) = queries.entry(key.clone()).or_default();
                let expr = compiled.rule.expr.trim().to_owned();
                if !exprs.contains(&expr) {
                    exprs.push(expr);
                }
                members.push(compiled.clone());
            }
        }
        let query_count = queries.len();
        let engine = &self.inner.engine;
        let results: Vec<_> = futures::stream::iter(queries)
            .map(|(key, (exprs, members))| async move {
                let since = now_ns.saturating_sub(
                    i64::try_from(key.window_ms)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1_000_000),
                );
                let refs: Vec<&str> = exprs.iter().map(String::as_str).collect();
                let sql = key.sql(&refs, since);
                let rows = match engine.sql(&sql).await {
                    Ok(r) => eval::read_rows(&r.batches, &key.group_by, exprs.len()),
                    Err(e) => Err(e.to_string()),
                };
                (exprs, members, rows)
            })
            .buffer_unordered(self.inner.config.query_concurrency)
            .collect()
            .await;

        // Per rule: its groups' observations, or why they could not be read.
        let mut observed: HashMap<String, std::result::Result<Vec<Observation>, String>> =
            HashMap::new();
        for (exprs, members, rows) in results {
            for rule in members {
                let outcome = match &rows {
                    Err(e) => Err(e.clone()),
                    Ok(rows) => {
                        let i = exprs
                            .iter()
                            .position(|e| *e == rule.rule.expr.trim())
                            .unwrap_or(0);
                        Ok(rows
                            .iter()
                            .filter_map(|(key, values)| {
                                let v = values.get(i).copied().flatten()?;
                                let labels = rule
                                    .group_by
                                    .iter()
                                    .cloned()
                                    .zip(key.iter().cloned())
                                    .collect();
                                Some(Observation {
                                    labels,
                                    normalised: v * rule.levels.sign,
                                    shown: v,
                                    threshold: None,
                                })
                            })
                            .collect())
                    }
                };
                observed.insert(rule.rule.name.clone(), outcome);
            }
        }
        let absence: Vec<&Arc<CompiledRule>> = rules
            .rules
            .values()
            .map(|(c, _)| c)
            .filter(|c| c.rule.kind == RuleKind::Absence)
            .collect();
        if !absence.is_empty() {
            let agents = self.inner.registry.records();
            let heartbeat = self.inner.registry.heartbeat_interval();
            for rule in absence {
                observed.insert(
                    rule.rule.name.clone(),
                    Ok(absent_groups(rule, &agents, heartbeat, now_ms)),
                );
            }
        }

        // The state machine, under the lock, without awaiting.
        let mut history = Vec::new();
        let mut outbox: Vec<(Vec<String>, Notification)> = Vec::new();
        let active;
        {
            let silences: Vec<Silence> = {
                let mut s = lock(&self.inner.silences);
                s.retain(|s| s.expires_unix_ms > now_ms);
                s.clone()
            };
            let mut statuses = lock(&self.inner.statuses);
            let mut alerts = lock(&self.inner.alerts);
            alerts.retain(|rule, _| rules.rules.contains_key(rule));
            for (name, (rule, _)) in &rules.rules {
                let status = statuses.entry(name.clone()).or_default();
                status.last_eval_ms = Some(now_ms);
                let groups = match observed.remove(name) {
                    Some(Ok(groups)) => groups,
                    Some(Err(e)) => {
                        if status.last_error.as_deref() != Some(e.as_str()) {
                            tracing::warn!(rule = %name, "alert rule evaluation failed: {e}");
                        }
                        status.last_error = Some(e);
                        continue;
                    }
                    None => continue,
                };
                status.last_error = None;
                let entries = alerts.entry(name.clone()).or_default();
                let mut seen = HashSet::new();
                for Observation {
                    labels,
                    normalised,
                    shown,
                    threshold,
                } in groups
                {
                    let key = rules::group_key(&labels);
                    seen.insert(key.clone());
                    let entry = entries.get(&key);
                    let (next, change) = eval::step(
                        &rule.levels,
                        ms_of(rule.for_duration),
                        entry.map(|e| e.current),
                        Some(normalised),
                        now_ms,
                    );
                    let previous = entries.remove(&key);
                    let mut updated = next.map(|current| AlertEntry {
                        labels: labels.clone(),
                        current,
                        value: Some(shown),
                        threshold: threshold
                            .or_else(|| rule.levels.shown_threshold(current.severity)),
                        notified: previous.as_ref().and_then(|p| p.notified),
                        last_notified_ms: previous.as_ref().map_or(0, |p| p.last_notified_ms),
                    });
                    self.after_step(
                        rule,
                        &key,
                        &labels,
                        change,
                        previous.as_ref(),
                        updated.as_mut(),
                        Some(shown),
                        threshold,
                        now_ms,
                        &silences,
                        &mut history,
                        &mut outbox,
                    );
                    if let Some(u) = updated {
                        entries.insert(key, u);
                    }
                }
                // Groups with no data in this round.
                let gone: Vec<String> = entries
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    let Some(previous) = entries.remove(&key) else {
                        continue;
                    };
                    let (next, change) = eval::step(
                        &rule.levels,
                        ms_of(rule.for_duration),
                        Some(previous.current),
                        None,
                        now_ms,
                    );
                    let labels = previous.labels.clone();
                    let mut updated = next.map(|current| AlertEntry {
                        labels: labels.clone(),
                        current,
                        value: None,
                        threshold: previous.threshold,
                        notified: previous.notified,
                        last_notified_ms: previous.last_notified_ms,
                    });
                    self.after_step(
                        rule,
                        &key,
                        &labels,
                        change,
                        Some(&previous),
                        updated.as_mut(),
                        None,
                        previous.threshold,
                        now_ms,
                        &silences,
                        &mut history,
                        &mut outbox,
                    );
                    if let Some(u) = updated {
                        entries.insert(key, u);
                    }
                }
            }
            alerts.retain(|_, entries| !entries.is_empty());
            active = alerts.values().map(HashMap::len).sum();
        }

        for (receivers, notification) in outbox {
            for r in receivers {
                self.inner.notifier.send(&r, notification.clone());
            }
        }
        let written = self.write_history(history).await;

        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        let mut stats = lock(&self.inner.stats);
        stats.rounds += 1;
        stats.rules = rules.rules.len();
        stats.queries_last_round = query_count;
        stats.last_round_ms = elapsed;
        stats.max_round_ms = stats.max_round_ms.max(elapsed);
        stats.mean_round_ms += (elapsed - stats.mean_round_ms) / stats.rounds as f64;
        stats.active_alerts = active;
        stats.history_rows_written += written;
        stats.history_rows_unstored = lock(&self.inner.unstored).len();
    }

    /// After one [`eval::step`]: the history row of a change, and the notification it (or the repeat interval)
    /// calls for unless silenced.
    #[allow(clippy::too_many_arguments)]
    fn after_step(
        &self,
        rule: &CompiledRule,
        key: &str,
        labels: &[(String, String)],
        change: Option<eval::Change>,
        previous: Option<&AlertEntry>,
        updated: Option<&mut AlertEntry>,
        value: Option<f64>,
        threshold: Option<f64>,
        now_ms: u64,
        silences: &[Silence],
        history: &mut Vec<Point>,
        outbox: &mut Vec<(Vec<String>, Notification)>,
    ) {
        let silenced = silences.iter().any(|s| s.matches(&rule.rule.name, labels));
        if let Some(change) = change {
            let in_state_ms = previous.map_or(0, |p| now_ms.saturating_sub(p.current.since_ms));
            history.push(history_row(
                rule,
                key,
                labels,
                &change,
                value,
                threshold,
                (in_state_ms, now_ms),
                silenced,
            ));
        }
        let notification =
            |status: &str,
             severity: Severity,
             starts_ms: u64,
             repeat: bool,
             previous_severity: Option<Severity>| Notification {
                status: status.to_owned(),
                rule: rule.rule.name.clone(),
                severity: severity.as_str().to_owned(),
                previous_severity: previous_severity.map(|s| s.as_str().to_owned()),
                group: labels.iter().cloned().collect(),
                group_key: key.to_owned(),
                value,
                threshold: threshold.or_else(|| rule.levels.shown_threshold(severity)),
                condition: match rule.rule.kind {
                    RuleKind::Threshold => rule.rule.expr.trim().to_owned(),
                    RuleKind::Absence => "silent_secs".to_owned(),
                },
                op: rule.rule.op.as_str().to_owned(),
                summary: rule.rule.summary.clone(),
                starts_at: rfc3339(starts_ms),
                at: rfc3339(now_ms),
                repeat,
            };
        match updated {
            Some(alert) if alert.current.phase == Phase::Firing => {
                let severity = alert.current.severity;
                let due = alert.notified != Some(severity)
                    || now_ms.saturating_sub(alert.last_notified_ms) >= ms_of(rule.repeat_interval);
                if due && !silenced {
                    let repeat = alert.notified == Some(severity);
                    outbox.push((
                        rule.rule.receivers.clone(),
                        notification(
                            "firing",
                            severity,
                            alert.current.since_ms,
                            repeat,
                            alert.notified.filter(|s| *s != severity),
                        ),
                    ));
                    alert.notified = Some(severity);
                    alert.last_notified_ms = now_ms;
                }
            }
            Some(_) => {}
            None => {
                // Resolved (or a pending alert gone): tell the receivers that were told it fired.
                if let Some(p) = previous
                    && let Some(severity) = p.notified
                    && !silenced
                {
                    outbox.push((
                        rule.rule.receivers.clone(),
                        notification("resolved", severity, p.current.since_ms, false, None),
                    ));
                }
            }
        }
    }

    /// Stores history rows (and those a previous round could not store); returns how many were stored.
    async fn write_history(&self, rows: Vec<Point>) -> u64 {
        let mut points = std::mem::take(&mut *lock(&self.inner.unstored));
        points.extend(rows);
        if points.is_empty() {
            return 0;
        }
        let n = points.len() as u64;
        let batch = WriteBatch {
            points,
            ..WriteBatch::default()
        };
        match self.inner.store.write_unkeyed(batch.clone()).await {
            WriteOutcome::Stored { .. } | WriteOutcome::Duplicate => n,
            WriteOutcome::Retry { message, .. } => {
                let mut unstored = lock(&self.inner.unstored);
                let mut points = batch.points;
                let excess = points.len().saturating_sub(MAX_UNSTORED_ROWS);
                points.drain(..excess);
                *unstored = points;
                tracing::warn!("alert history rows not stored yet, retried next round: {message}");
                0
            }
            WriteOutcome::Rejected(message) => {
                tracing::error!("alert history rows rejected by the store: {message}");
                0
            }
        }
    }

    /// The active alerts, by rule then group.
    pub fn active(&self) -> Vec<ActiveAlert> {
        let now_ms = unix_ms_now();
        let rules = self.rules();
        let silences = lock(&self.inner.silences).clone();
        let alerts = lock(&self.inner.alerts);
        let mut out: Vec<ActiveAlert> = alerts
            .iter()
            .flat_map(|(rule, entries)| {
                let compiled = rules.rules.get(rule).map(|(c, _)| c.clone());
                let silences = &silences;
                entries.iter().map(move |(key, e)| ActiveAlert {
                    rule: rule.clone(),
                    group: e.labels.iter().cloned().collect(),
                    group_key: key.clone(),
                    state: e.current.phase,
                    severity: e.current.severity,
                    value: e.value,
                    threshold: e.threshold,
                    since: rfc3339(e.current.since_ms),
                    silenced: silences
                        .iter()
                        .any(|s| s.expires_unix_ms > now_ms && s.matches(rule, &e.labels)),
                    summary: compiled
                        .as_ref()
                        .map(|c| c.rule.summary.clone())
                        .unwrap_or_default(),
                    receivers: compiled
                        .as_ref()
                        .map(|c| c.rule.receivers.clone())
                        .unwrap_or_default(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.rule, &a.group_key).cmp(&(&b.rule, &b.group_key)));
        out
    }

    /// Evaluation timings and counts.
    pub fn stats(&self) -> EvalStats {
        lock(&self.inner.stats).clone()
    }

    /// Adds (or replaces) an API rule after checking it fully, including planning its query against the store:
    /// an unknown table, column or function is refused here rather than failing at every evaluation.
    pub async fn add_rule(&self, rule: Rule) -> std::result::Result<(), AddRuleError> {
        let compiled = rule
            .compile(&self.inner.notifier.names())
            .map_err(AddRuleError::Invalid)?;
        if let Some(key) = &compiled.query {
            let probe = format!("SELECT 1 FROM \"{}\" LIMIT 0", key.table);
            if self.inner.engine.describe(&probe).await.is_err() {
                return Err(AddRuleError::Invalid(RuleError::UnknownTable {
                    rule: rule.name.clone(),
                    table: key.table.clone(),
                }));
            }
            let sql = key.sql(&[rule.expr.trim()], 0);
            if let Err(e) = self.inner.engine.describe(&sql).await {
                return Err(AddRuleError::Invalid(RuleError::BadSql {
                    rule: rule.name.clone(),
                    message: e.to_string(),
                }));
            }
        }
        {
            let mut guard = lock(&self.inner.rules);
            if let Some((_, "file")) = guard.rules.get(&rule.name) {
                return Err(AddRuleError::Conflict(format!(
                    "rule {:?} is defined in the rules file; change it there",
                    rule.name
                )));
            }
            if !guard.rules.contains_key(&rule.name)
                && guard.rules.len() >= self.inner.config.max_rules
            {
                return Err(AddRuleError::Conflict(format!(
                    "there are already {} rules (alerts.max_rules)",
                    guard.rules.len()
                )));
            }
            let mut set = RuleSet {
                rules: guard.rules.clone(),
            };
            set.rules
                .insert(rule.name.clone(), (Arc::new(compiled), "api"));
            *guard = Arc::new(set);
        }
        // A changed rule starts its alerts afresh.
        lock(&self.inner.alerts).remove(&rule.name);
        self.save().await;
        Ok(())
    }

    /// Removes an API rule and its active alerts.
    pub async fn delete_rule(&self, name: &str) -> std::result::Result<(), AddRuleError> {
        {
            let mut guard = lock(&self.inner.rules);
            match guard.rules.get(name) {
                None => {
                    return Err(AddRuleError::NotFound(format!("no rule named {name:?}")));
                }
                Some((_, "file")) => {
                    return Err(AddRuleError::Conflict(format!(
                        "rule {name:?} is defined in the rules file; remove it there"
                    )));
                }
                Some(_) => {}
            }
            let mut set = RuleSet {
                rules: guard.rules.clone(),
            };
            set.rules.remove(name);
            *guard = Arc::new(set);
        }
        lock(&self.inner.alerts).remove(name);
        lock(&self.inner.statuses).remove(name);
        self.save().await;
        Ok(())
    }

    fn rule_views(&self) -> Vec<RuleView> {
        let rules = self.rules();
        let statuses = lock(&self.inner.statuses);
        let alerts = lock(&self.inner.alerts);
        rules
            .rules
            .iter()
            .map(|(name, (c, source))| {
                let status = statuses.get(name);
                RuleView {
                    rule: c.rule.clone(),
                    source,
                    last_error: status.and_then(|s| s.last_error.clone()),
                    last_eval_unix_ms: status.and_then(|s| s.last_eval_ms),
                    active: alerts.get(name).map_or(0, HashMap::len),
                }
            })
            .collect()
    }

    fn add_silence(&self, request: SilenceRequest) -> std::result::Result<Silence, String> {
        if request.matchers.is_empty() {
            return Err(
                "matchers: a silence needs at least one matcher (rule or a group tag)".into(),
            );
        }
        for (k, v) in &request.matchers {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(format!("matchers: {k:?} is not a valid matcher"));
            }
        }
        let duration =
            rules::parse_duration(&request.duration).map_err(|e| format!("duration: {e}"))?;
        if duration.is_zero() || duration > Duration::from_secs(366 * 86_400) {
            return Err("duration: must be more than 0 and at most 366d".into());
        }
        let now = unix_ms_now();
        let expires = now.saturating_add(ms_of(duration));
        let silence = Silence {
            id: format!("s{now}-{:04x}", lock(&self.inner.silences).len() % 0xffff),
            matchers: request.matchers,
            comment: request.comment,
            created_unix_ms: now,
            expires_unix_ms: expires,
            expires_at: rfc3339(expires),
        };
        let mut silences = lock(&self.inner.silences);
        silences.retain(|s| s.expires_unix_ms > now);
        if silences.len() >= MAX_SILENCES {
            return Err(format!("there are already {MAX_SILENCES} silences"));
        }
        silences.push(silence.clone());
        Ok(silence)
    }

    /// Saves the API rules and the silences (temporary file, fsync, rename).
    async fn save(&self) {
        let manager = self.clone();
        let result = tokio::task::spawn_blocking(move || manager.save_blocking()).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the alert rules and silences"),
            Err(e) => tracing::error!(error = %e, "saving the alert rules and silences failed"),
        }
    }

    fn save_blocking(&self) -> Result<()> {
        let _one = lock(&self.inner.save_lock);
        let state = SavedState {
            rules: self
                .rules()
                .rules
                .values()
                .filter(|(_, source)| *source == "api")
                .map(|(c, _)| c.rule.clone())
                .collect(),
            silences: lock(&self.inner.silences).clone(),
        };
        let path = &self.inner.state_path;
        let bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| CollectorError::Server(format!("cannot encode alert state: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CollectorError::io(dir, e))?;
        }
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| CollectorError::io(&tmp, e))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| CollectorError::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| CollectorError::io(path, e))
    }
}

/// Why the API refused a rule change.
#[derive(Debug, thiserror::Error)]
pub enum AddRuleError {
    #[error("{0}")]
    Invalid(RuleError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

impl From<AddRuleError> for ApiError {
    fn from(e: AddRuleError) -> ApiError {
        let status = match &e {
            AddRuleError::Invalid(_) => StatusCode::BAD_REQUEST,
            AddRuleError::Conflict(_) => StatusCode::CONFLICT,
            AddRuleError::NotFound(_) => StatusCode::NOT_FOUND,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

/// One group's value in one evaluation.
#[derive(Debug)]
struct Observation {
    labels: Vec<(String, String)>,
    /// In the "greater is worse" direction of [`rules::Levels`].
    normalised: f64,
    /// As the rule's expression gave it (absence: seconds of silence), for people.
    shown: f64,
    /// The threshold shown with it when it is not the rule's own (absence: the agent's limit in seconds).
    threshold: Option<f64>,
}

/// The groups of an absence rule: per group of agents (by identity tags; `agent_id` by default) the shortest
/// silence (normalised: seconds beyond the limit). Every agent the
/// registry knows counts, registered or seen only from its batches.
fn absent_groups(
    rule: &CompiledRule,
    agents: &[crate::agents::AgentRecord],
    heartbeat: Duration,
    now_ms: u64,
) -> Vec<Observation> {
    let mut groups: BTreeMap<Vec<(String, String)>, (f64, f64, f64)> = BTreeMap::new();
    for agent in agents {
        let tag = |k: &str| {
            if k == "agent_id" {
                Some(agent.agent_id.clone())
            } else {
                agent.identity.get(k).cloned()
            }
        };
        if !rule
            .rule
            .matchers
            .iter()
            .all(|(k, v)| tag(k).as_deref() == Some(v.as_str()))
        {
            continue;
        }
        let interval = rule.absent_interval.unwrap_or_else(|| {
            if agent.interval_secs > 0 {
                Duration::from_secs(agent.interval_secs)
            } else {
                heartbeat
            }
        });
        let limit = interval.as_secs_f64() * f64::from(rule.absent_intervals);
        let silent = now_ms.saturating_sub(agent.last_seen_ms) as f64 / 1000.0;
        let labels: Vec<(String, String)> = rule
            .group_by
            .iter()
            .map(|k| (k.clone(), tag(k).unwrap_or_default()))
            .collect();
        let entry = groups
            .entry(labels)
            .or_insert((f64::INFINITY, f64::INFINITY, limit));
        // The group is absent only if every agent in it is: keep its least silent agent.
        if silent - limit < entry.0 {
            *entry = (silent - limit, silent, limit);
        }
    }
    groups
        .into_iter()
        .map(|(labels, (over, silent, limit))| Observation {
            labels,
            normalised: over,
            shown: silent,
            threshold: Some(limit),
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn history_row(
    rule: &CompiledRule,
    key: &str,
    labels: &[(String, String)],
    change: &eval::Change,
    value: Option<f64>,
    threshold: Option<f64>,
    (in_state_ms, now_ms): (u64, u64),
    silenced: bool,
) -> Point {
    let kind = match rule.rule.kind {
        RuleKind::Threshold => "threshold",
        RuleKind::Absence => "absence",
    };
    let mut tags = vec![
        ("rule", rule.rule.name.clone()),
        ("group_key", key.to_owned()),
        ("kind", kind.to_owned()),
        ("from_state", change.from.to_owned()),
        ("to_state", change.to.to_owned()),
        ("severity", change.severity.as_str().to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| Tag {
        key: k.to_owned(),
        value: v,
    })
    .collect::<Vec<_>>();
    for (k, v) in labels {
        if !HISTORY_TAGS.contains(&k.as_str()) && !v.is_empty() {
            tags.push(Tag {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    let mut fields = vec![
        Field {
            key: "in_state_secs".into(),
            value: Some(Value::F64(in_state_ms as f64 / 1000.0)),
        },
        // Whether a silence held the notification back: a restart must not take a silenced alert for one the
        // receivers know of.
        Field {
            key: "silenced".into(),
            value: Some(Value::Bool(silenced)),
        },
    ];
    if let Some(v) = value.filter(|v| v.is_finite()) {
        fields.push(Field {
            key: "value".into(),
            value: Some(Value::F64(v)),
        });
    }
    if let Some(t) = threshold
        .or_else(|| rule.levels.shown_threshold(change.severity))
        .filter(|t| t.is_finite())
    {
        fields.push(Field {
            key: "threshold".into(),
            value: Some(Value::F64(t)),
        });
    }
    Point {
        measurement: HISTORY_TABLE.into(),
        tags,
        fields,
        time_unix_nano: i64::try_from(now_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000),
    }
}

/// The routes of alerting, merged into the API router.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/alerts/rules", get(list_rules).post(post_rule))
        .route("/api/v1/alerts/rules/{name}", delete(delete_rule))
        .route(
            "/api/v1/alerts/silences",
            get(list_silences).post(post_silence),
        )
        .route("/api/v1/alerts/silences/{id}", delete(delete_silence))
        .route("/api/v1/alerts/receivers", get(list_receivers))
        .route("/api/v1/alerts/status", get(status))
}

/// A JSON request body, or a `400` saying what it should have been and why it is not.
fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> std::result::Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("the body is not {what}: {e}"),
    })
}

async fn list_alerts(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.alerts.active()).into_response()
}

async fn list_rules(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.alerts.rule_views()).into_response()
}

async fn post_rule(
    State(api): State<Arc<ApiState>>,
    body: Bytes,
) -> std::result::Result<Response, ApiError> {
    let rule: Rule = json_body(&body, "a rule (JSON)")?;
    let name = rule.name.clone();
    api.alerts.add_rule(rule).await?;
    let view = api
        .alerts
        .rule_views()
        .into_iter()
        .find(|r| r.rule.name == name);
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn delete_rule(
    State(api): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> std::result::Result<Response, ApiError> {
    api.alerts.delete_rule(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_silences(State(api): State<Arc<ApiState>>) -> Response {
    let now = unix_ms_now();
    let silences: Vec<Silence> = lock(&api.alerts.inner.silences)
        .iter()
        .filter(|s| s.expires_unix_ms > now)
        .cloned()
        .collect();
    axum::Json(silences).into_response()
}

async fn post_silence(
    State(api): State<Arc<ApiState>>,
    body: Bytes,
) -> std::result::Result<Response, ApiError> {
    let request: SilenceRequest = json_body(&body, "a silence (JSON with matchers, duration)")?;
    let silence = api
        .alerts
        .add_silence(request)
        .map_err(|message| ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
        })?;
    api.alerts.save().await;
    Ok((StatusCode::CREATED, axum::Json(silence)).into_response())
}

async fn delete_silence(
    State(api): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let removed = {
        let mut silences = lock(&api.alerts.inner.silences);
        let before = silences.len();
        silences.retain(|s| s.id != id);
        before != silences.len()
    };
    if !removed {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no silence with id {id:?}"),
        });
    }
    api.alerts.save().await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_receivers(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.alerts.inner.notifier.status()).into_response()
}

async fn status(State(api): State<Arc<ApiState>>) -> Response {
    axum::Json(api.alerts.stats()).into_response()
}
