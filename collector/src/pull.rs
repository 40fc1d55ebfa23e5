//! Pull mode: the collector fetches batches from agents that serve `damselfly.v1.MetricsSource` instead of pushing.
//!
//! Targets are the configured `pull_targets` (URLs `http://host:port`) plus whatever the extra source returns (the
//! agent registry's pull-mode agents), merged by URL and re-read every [`TARGET_REFRESH`]. Each target is pulled
//! every `pull_interval_secs`; the first pull of a target is delayed by a random fraction of the interval, so a
//! thousand targets do not fire at once, and at most [`PullSettings::max_concurrent`] pulls run at a time.
//!
//! One pull: `Pull{ack_through_seq, max_batches}` on the target's (reused) channel, bounded by `pull_timeout_secs`;
//! the batches are written to the [`Store`] (concurrently, answers taken in order) and `ack_through_seq` advances
//! over the prefix answered STORED, DUPLICATE or REJECTED, stopping at the first RETRY (the rest stays at the agent
//! and comes again). A full response means a backlog: pull again at once, up to [`PullSettings::max_drain_pulls`]
//! times in a row, then let the other targets have their turn. The acknowledgement reaches the agent with the next
//! pull. `ack_through_seq` lives in memory only: after a collector restart it starts at 0, the agent sends
//! everything it still holds, and dedup stores each batch once.
//!
//! [`PullHandle::targets`] reports every target's health (`GET /api/v1/pull/targets`).

use crate::model::unix_ms_now;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use damselfly_proto::v1::PullRequest;
use damselfly_proto::v1::metrics_source_client::MetricsSourceClient;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::config::CollectorConfig;
use crate::store::{Store, WriteOutcome};

/// How often the target list (configured ∪ extra) is re-read.
pub const TARGET_REFRESH: Duration = Duration::from_secs(1);
/// Largest Pull response accepted (after decompression). Agents bound theirs to 16 MiB plus one batch.
pub const MAX_PULL_RESPONSE_BYTES: usize = 64 << 20;
/// Batches of one response stored at once (they can share a WAL group commit).
const MAX_WRITES_IN_FLIGHT: usize = 64;

/// Checks a target URL: `http://host:port` or `https://host:port` (no path). Returns why it is not.
pub fn validate_target_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{url:?} {why}; expected http://host:port"));
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return bad("does not start with http:// or https://");
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) || rest.chars().any(|c| c.is_whitespace()) {
        return bad("is not just a host and port");
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return bad("has no port");
    };
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        }
    };
    if !host_ok {
        return bad("has an invalid host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("has an invalid port"),
    }
}

/// Where a target came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetOrigin {
    /// `pull_targets` in the configuration.
    Config,
    /// The extra source (the agent registry).
    Registry,
}

/// One agent to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullTarget {
    /// `http://host:port` of the agent's `MetricsSource`.
    pub url: String,
    /// The agent id expected there, when known (registry); the id in the responses is what counts.
    pub agent_id: Option<String>,
    pub origin: TargetOrigin,
}

impl PullTarget {
    /// A configured target URL.
    pub fn configured(url: &str) -> PullTarget {
        PullTarget {
            url: url.trim_end_matches('/').to_owned(),
            agent_id: None,
            origin: TargetOrigin::Config,
        }
    }

    /// A registered pull-mode agent and its `listen_addr` (`host:port`, no scheme).
    pub fn registered(agent_id: String, listen_addr: &str) -> PullTarget {
        let url = if listen_addr.contains("://") {
            listen_addr.to_owned()
        } else {
            format!("http://{listen_addr}")
        };
        PullTarget {
            url: url.trim_end_matches('/').to_owned(),
            agent_id: Some(agent_id),
            origin: TargetOrigin::Registry,
        }
    }
}

/// More targets, asked for every [`TARGET_REFRESH`] (e.g. the agent registry's pull-mode agents). Must be quick.
pub type ExtraTargets = Arc<dyn Fn() -> Vec<PullTarget> + Send + Sync>;
/// Called with the batch's agent id for every batch answered STORED or DUPLICATE (e.g. the registry's `touch`).
pub type OnBatch = Arc<dyn Fn(&str) + Send + Sync>;

/// An [`ExtraTargets`] that adds nothing.
pub fn no_extra_targets() -> ExtraTargets {
    Arc::new(Vec::new)
}

/// Timing and bounds of the scheduler.
#[derive(Debug, Clone)]
pub struct PullSettings {
    /// Between two pulls of one target.
    pub interval: Duration,
    /// Bound of one Pull call (connecting included).
    pub timeout: Duration,
    /// Pulls running at once, over all targets.
    pub max_concurrent: usize,
    /// `max_batches` of each request.
    pub max_batches: u32,
    /// Most back-to-back pulls of one target while its responses come back full.
    pub max_drain_pulls: usize,
    /// The `authorization` value of every Pull (`pull_token_file`), for agents with a `pull_token`.
    pub token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// TLS for `https://` targets: the agents' pull ports are verified against `pull_ca_file`.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl PullSettings {
    /// The configured interval and timeout; 64 concurrent pulls of 64 batches, at most 32 back to back.
    pub fn from_config(config: &CollectorConfig) -> PullSettings {
        PullSettings {
            interval: Duration::from_secs(config.pull_interval_secs.max(1)),
            timeout: Duration::from_secs(config.pull_timeout_secs.max(1)),
            max_concurrent: 64,
            max_batches: 64,
            max_drain_pulls: 32,
            // Checked (readable, a token; a CA) when the collector started.
            token: config.pull_token().ok().flatten(),
            tls: config.pull_tls().ok().flatten(),
        }
    }
}

/// The health of one target, as `GET /api/v1/pull/targets` shows it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetHealth {
    pub url: String,
    pub origin: TargetOrigin,
    /// The id the agent answered with (or the registry's, before the first answer).
    pub agent_id: Option<String>,
    /// `unknown` (not pulled yet), `up` (the last pull succeeded) or `down` (it failed).
    pub status: &'static str,
    pub last_attempt_unix_ms: Option<u64>,
    pub last_success_unix_ms: Option<u64>,
    /// The last failure's message (kept after a later success; `status` says whether it still applies).
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u64>,
    pub consecutive_failures: u64,
    /// Successful Pull calls.
    pub pulls: u64,
    /// Batches answered STORED and their points.
    pub batches_pulled: u64,
    pub points_pulled: u64,
    /// Batches the collector had already (DUPLICATE) or refused (REJECTED: dropped, see the log).
    pub batches_duplicate: u64,
    pub batches_rejected: u64,
    /// Batches answered RETRY (the store was busy; they stay at the agent).
    pub batches_retried: u64,
    /// What the next pull acknowledges.
    pub ack_through_seq: u64,
    /// Wall time of the last pull slot (all its back-to-back pulls).
    pub last_duration_ms: Option<u64>,
}

impl TargetHealth {
    fn new(target: &PullTarget) -> TargetHealth {
        TargetHealth {
            url: target.url.clone(),
            origin: target.origin,
            agent_id: target.agent_id.clone(),
            status: "unknown",
            last_attempt_unix_ms: None,
            last_success_unix_ms: None,
            last_error: None,
            last_error_unix_ms: None,
            consecutive_failures: 0,
            pulls: 0,
            batches_pulled: 0,
            points_pulled: 0,
            batches_duplicate: 0,
            batches_rejected: 0,
            batches_retried: 0,
            ack_through_seq: 0,
            last_duration_ms: None,
        }
    }
}

/// Read access to the targets' health, for the HTTP API. Cheap to clone; an unused handle lists nothing.
#[derive(Debug, Clone, Default)]
pub struct PullHandle {
    health: Arc<Mutex<BTreeMap<String, TargetHealth>>>,
}

impl PullHandle {
    /// Every target, sorted by URL.
    pub fn targets(&self) -> Vec<TargetHealth> {
        self.lock().values().cloned().collect()
    }

    /// One target by URL.
    pub fn target(&self, url: &str) -> Option<TargetHealth> {
        self.lock().get(url).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, TargetHealth>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, url: &str, f: impl FnOnce(&mut TargetHealth)) {
        if let Some(h) = self.lock().get_mut(url) {
            f(h);
        }
    }
}

/// The scheduler's own view of a target.
struct Target {
    spec: PullTarget,
    client: Option<MetricsSourceClient<Channel>>,
    ack_through: u64,
    /// The agent id of the last response.
    agent_id: Option<String>,
    next_due: Instant,
    in_flight: bool,
    /// No longer listed: forget it when its pull ends.
    removed: bool,
}

/// What one pull slot hands back to the scheduler.
struct SlotResult {
    url: String,
    ack_through: u64,
    agent_id: Option<String>,
    /// The channel failed: make a new one next time.
    failed: bool,
    /// The store said RETRY: not before this.
    retry_after: Option<Duration>,
    /// Responses still came back full after `max_drain_pulls`: come back at once.
    backlog: bool,
}

/// Pulls every target on its schedule until stopped. See the module docs.
pub struct PullScheduler {
    store: Store,
    settings: PullSettings,
    config_targets: Vec<PullTarget>,
    extra: ExtraTargets,
    on_batch: Option<OnBatch>,
    handle: PullHandle,
}

impl std::fmt::Debug for PullScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullScheduler")
            .field("settings", &self.settings)
            .field("config_targets", &self.config_targets)
            .finish_non_exhaustive()
    }
}

impl PullScheduler {
    /// A scheduler writing to `store`, pulling `config_targets` (URLs) and whatever `extra` lists, with the
    /// interval and timeout of the store's configuration.
    pub fn new(store: Store, config_targets: &[String], extra: ExtraTargets) -> PullScheduler {
        let settings = PullSettings::from_config(store.config());
        PullScheduler {
            store,
            settings,
            config_targets: config_targets
                .iter()
                .map(|u| PullTarget::configured(u))
                .collect(),
            extra,
            on_batch: None,
            handle: PullHandle::default(),
        }
    }

    /// Replaces the settings.
    pub fn with_settings(mut self, settings: PullSettings) -> PullScheduler {
        self.settings = settings;
        self
    }

    /// Calls `f(agent_id)` for every pulled batch answered STORED or DUPLICATE.
    pub fn on_batch(mut self, f: OnBatch) -> PullScheduler {
        self.on_batch = Some(f);
        self
    }

    /// The health view; keep it before [`PullScheduler::run`] consumes the scheduler.
    pub fn handle(&self) -> PullHandle {
        self.handle.clone()
    }

    /// Pulls until `shutdown` completes. Pulls in progress are then abandoned: what they stored is durable, and
    /// the batches whose acknowledgement did not reach the agent are sent again to the next collector (dedup).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut targets: HashMap<String, Target> = HashMap::new();
        let mut jobs: JoinSet<SlotResult> = JoinSet::new();
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent.max(1)));
        let jitter = std::collections::hash_map::RandomState::new();
        let mut next_refresh = Instant::now();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let now = Instant::now();
            if now >= next_refresh {
                self.refresh(&mut targets, now, &jitter);
                next_refresh = now + TARGET_REFRESH;
            }
            for t in targets.values_mut() {
                if !t.in_flight && t.next_due <= now {
                    t.in_flight = true;
                    jobs.spawn(self.slot(t, Arc::clone(&permits)));
                }
            }
            let wake = targets
                .values()
                .filter(|t| !t.in_flight)
                .map(|t| t.next_due)
                .fold(next_refresh, Instant::min);
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    match done {
                        Ok(r) => self.finish(&mut targets, r),
                        // Only on abort; a panic is caught inside the slot.
                        Err(e) => tracing::error!(error = %e, "pull task failed"),
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        jobs.shutdown().await;
        tracing::info!("pull scheduler stopped");
    }

    /// Merges the configured and extra targets into `targets` (new ones get a random first due time within one
    /// interval; unlisted ones are dropped) and into the health view.
    fn refresh(
        &self,
        targets: &mut HashMap<String, Target>,
        now: Instant,
        jitter: &std::collections::hash_map::RandomState,
    ) {
        let mut wanted: BTreeMap<String, PullTarget> = BTreeMap::new();
        for t in self.config_targets.iter().cloned().chain((self.extra)()) {
            match wanted.get_mut(&t.url) {
                // Listed twice (configured and registered): keep the configured one, learn the agent id.
                Some(existing) => {
                    if existing.agent_id.is_none() {
                        existing.agent_id = t.agent_id;
                    }
                }
                None => {
                    wanted.insert(t.url.clone(), t);
                }
            }
        }
        let mut health = self.handle.lock();
        for (url, t) in targets.iter_mut() {
            if !wanted.contains_key(url) {
                t.removed = true;
            }
        }
        targets.retain(|url, t| {
            let keep = !t.removed || t.in_flight;
            if !keep {
                health.remove(url);
                tracing::info!(%url, "no longer a pull target");
            }
            keep
        });
        let interval_ms = u64::try_from(self.settings.interval.as_millis()).unwrap_or(u64::MAX);
        for (url, spec) in wanted {
            match targets.get_mut(&url) {
                Some(t) => {
                    t.removed = false;
                    t.spec = spec;
                }
                None => {
                    let delay = Duration::from_millis(jitter.hash_one(&url) % interval_ms.max(1));
                    tracing::info!(%url, origin = ?spec.origin, first_pull_in = ?delay, "new pull target");
                    health
                        .entry(url.clone())
                        .or_insert_with(|| TargetHealth::new(&spec));
                    targets.insert(
                        url,
                        Target {
                            spec,
                            client: None,
                            ack_through: 0,
                            agent_id: None,
                            next_due: now + delay,
                            in_flight: false,
                            removed: false,
                        },
                    );
                }
            }
        }
    }

    /// Takes back a target after its slot and schedules the next one.
    fn finish(&self, targets: &mut HashMap<String, Target>, r: SlotResult) {
        let Some(t) = targets.get_mut(&r.url) else {
            return;
        };
        t.in_flight = false;
        t.ack_through = r.ack_through;
        t.agent_id = r.agent_id;
        if r.failed {
            t.client = None;
        }
        if t.removed {
            targets.remove(&r.url);
            self.handle.lock().remove(&r.url);
            return;
        }
        let now = Instant::now();
        t.next_due = if r.backlog {
            now
        } else {
            // Keep the target's phase (set by the initial jitter) rather than drift by the pull's duration.
            let mut due = t.next_due + self.settings.interval;
            if due <= now {
                due = now + self.settings.interval;
            }
            due
        };
        if let Some(after) = r.retry_after {
            t.next_due = t.next_due.max(now + after);
        }
    }

    /// The future of one pull slot for `t`: waits for a permit, pulls (draining a backlog), records health.
    fn slot(
        &self,
        t: &mut Target,
        permits: Arc<Semaphore>,
    ) -> impl Future<Output = SlotResult> + Send + 'static {
        let url = t.spec.url.clone();
        let client = match &t.client {
            Some(c) => Ok(c.clone()),
            None => connect(&url, &self.settings),
        };
        if let Ok(c) = &client {
            t.client = Some(c.clone());
        }
        let job = Slot {
            url: url.clone(),
            store: self.store.clone(),
            settings: self.settings.clone(),
            handle: self.handle.clone(),
            on_batch: self.on_batch.clone(),
            ack_through: t.ack_through,
            agent_id: t.agent_id.clone(),
        };
        let fallback = (t.ack_through, t.agent_id.clone());
        async move {
            let _permit = permits.acquire_owned().await;
            match AssertUnwindSafe(job.run(client)).catch_unwind().await {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(%url, "pull panicked (a bug)");
                    SlotResult {
                        url,
                        ack_through: fallback.0,
                        agent_id: fallback.1,
                        failed: true,
                        retry_after: None,
                        backlog: false,
                    }
                }
            }
        }
    }
}

/// A lazily connecting client: zstd both ways, bounded responses, connecting bounded by the timeout (calls are
/// bounded by the caller).
fn connect(url: &str, settings: &PullSettings) -> Result<MetricsSourceClient<Channel>, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("invalid target URL {url:?}: {e}"))?;
    if url.starts_with("https://") {
        let tls = settings.tls.clone().ok_or_else(|| {
            format!("{url}: an https:// target needs pull_ca_file (the CA of the agents' pull certificates)")
        })?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("{url}: {}", crate::error::error_chain(&e)))?;
    }
    let endpoint = endpoint
        .connect_timeout(settings.timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(settings.timeout);
    Ok(MetricsSourceClient::new(endpoint.connect_lazy())
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_PULL_RESPONSE_BYTES))
}

/// A gRPC status as text, with its transport cause (tonic puts "connection refused" and the like in the source).
fn status_text(status: &tonic::Status) -> String {
    crate::error::with_causes(
        format!("{:?}: {}", status.code(), status.message()),
        std::error::Error::source(status),
    )
}

/// One pull slot's work.
struct Slot {
    url: String,
    store: Store,
    settings: PullSettings,
    handle: PullHandle,
    on_batch: Option<OnBatch>,
    ack_through: u64,
    agent_id: Option<String>,
}

/// Counts of one slot, added to the health at its end.
#[derive(Default)]
struct Tally {
    pulls: u64,
    stored: u64,
    points: u64,
    duplicate: u64,
    rejected: u64,
    retried: u64,
}

impl Slot {
    async fn run(mut self, client: Result<MetricsSourceClient<Channel>, String>) -> SlotResult {
        let started = Instant::now();
        self.handle.update(&self.url, |h| {
            h.last_attempt_unix_ms = Some(unix_ms_now());
        });
        let mut tally = Tally::default();
        let mut retry_after = None;
        let mut backlog = false;
        let outcome = match client {
            Err(e) => Err(e),
            Ok(mut client) => {
                self.pull_loop(&mut client, &mut tally, &mut retry_after, &mut backlog)
                    .await
            }
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now_ms = unix_ms_now();
        let failed = outcome.is_err();
        if let Err(e) = &outcome {
            tracing::warn!(url = %self.url, error = %e, "pull failed");
        }
        self.handle.update(&self.url, |h| {
            h.pulls += tally.pulls;
            h.batches_pulled += tally.stored;
            h.points_pulled += tally.points;
            h.batches_duplicate += tally.duplicate;
            h.batches_rejected += tally.rejected;
            h.batches_retried += tally.retried;
            h.ack_through_seq = self.ack_through;
            if self.agent_id.is_some() {
                h.agent_id.clone_from(&self.agent_id);
            }
            h.last_duration_ms = Some(elapsed_ms);
            match &outcome {
                Ok(()) => {
                    h.status = "up";
                    h.last_success_unix_ms = Some(now_ms);
                    h.consecutive_failures = 0;
                }
                Err(e) => {
                    h.status = "down";
                    h.last_error = Some(e.clone());
                    h.last_error_unix_ms = Some(now_ms);
                    h.consecutive_failures += 1;
                }
            }
        });
        SlotResult {
            url: self.url,
            ack_through: self.ack_through,
            agent_id: self.agent_id,
            failed,
            retry_after,
            backlog,
        }
    }

    /// Pulls until a response is not full (or the store says RETRY, or `max_drain_pulls` is reached).
    async fn pull_loop(
        &mut self,
        client: &mut MetricsSourceClient<Channel>,
        tally: &mut Tally,
        retry_after: &mut Option<Duration>,
        backlog: &mut bool,
    ) -> Result<(), String> {
        let max_batches = self.settings.max_batches.max(1);
        for round in 1..=self.settings.max_drain_pulls.max(1) {
            let mut request = tonic::Request::new(PullRequest {
                ack_through_seq: self.ack_through,
                max_batches,
            });
            if let Some(token) = &self.settings.token {
                request
                    .metadata_mut()
                    .insert("authorization", token.clone());
            }
            let response =
                match tokio::time::timeout(self.settings.timeout, client.pull(request)).await {
                    Err(_) => {
                        return Err(format!(
                            "no answer within {:?} (pull_timeout_secs)",
                            self.settings.timeout
                        ));
                    }
                    Ok(Err(status)) => return Err(status_text(&status)),
                    Ok(Ok(r)) => r.into_inner(),
                };
            tally.pulls += 1;
            if let Some(previous) = &self.agent_id
                && *previous != response.agent_id
            {
                // Another agent answers at this address now (IP reuse, reinstall). The seqs are its own: start over.
                tracing::warn!(url = %self.url, %previous, now = %response.agent_id, "a different agent answers at this pull target");
                self.ack_through = 0;
            }
            self.agent_id = Some(response.agent_id);
            let full = response.batches.len() >= max_batches as usize;
            let store = &self.store;
            let answers: Vec<(u64, String, WriteOutcome)> = futures::stream::iter(response.batches)
                .map(|batch| async move {
                    let seq = batch.seq;
                    let agent_id = batch.agent_id.clone();
                    let outcome = store.write(batch).await;
                    store
                        .self_metrics()
                        .record_write(crate::selfmetrics::Protocol::Pull, &outcome);
                    (seq, agent_id, outcome)
                })
                .buffered(MAX_WRITES_IN_FLIGHT)
                .collect()
                .await;
            let mut advance = true;
            for (seq, agent_id, outcome) in answers {
                match outcome {
                    WriteOutcome::Stored { points } => {
                        tally.stored += 1;
                        tally.points += points as u64;
                        if let Some(f) = &self.on_batch {
                            f(&agent_id);
                        }
                    }
                    WriteOutcome::Duplicate => {
                        tally.duplicate += 1;
                        if let Some(f) = &self.on_batch {
                            f(&agent_id);
                        }
                    }
                    WriteOutcome::Rejected(message) => {
                        tally.rejected += 1;
                        tracing::warn!(url = %self.url, %agent_id, seq, %message, "pulled batch rejected; dropped");
                    }
                    WriteOutcome::Retry { message, after } => {
                        tally.retried += 1;
                        if advance {
                            tracing::info!(url = %self.url, %agent_id, seq, %message, "store busy; the rest stays at the agent");
                            *retry_after = Some(after);
                        }
                        advance = false;
                    }
                }
                // Only over a prefix without RETRY: the acknowledgement means "everything up to here".
                if advance && seq > self.ack_through {
                    self.ack_through = seq;
                }
            }
            if !advance || !full {
                return Ok(());
            }
            if round == self.settings.max_drain_pulls.max(1) {
                *backlog = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use damselfly_proto::v1::metrics_source_server::{MetricsSource, MetricsSourceServer};
    use damselfly_proto::v1::{Field, Point, PullResponse, Tag, WriteBatch, field};
    use std::collections::BTreeSet;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;

    /// An agent's side of Pull over a seq-ordered map, with the agent's rule (forget ≤ ack, send the next ones).
    #[derive(Clone, Default)]
    struct FakeAgent {
        state: Arc<Mutex<AgentState>>,
    }

    #[derive(Default)]
    struct AgentState {
        agent_id: String,
        held: BTreeMap<u64, WriteBatch>,
        /// `ack_through_seq` of every request.
        acks: Vec<u64>,
        /// Answer with an error this many times.
        fail_left: usize,
        /// Sleep this long before answering.
        delay: Duration,
    }

    impl FakeAgent {
        fn new(agent_id: &str, seqs: impl IntoIterator<Item = u64>) -> FakeAgent {
            let a = FakeAgent::default();
            {
                let mut s = a.lock();
                s.agent_id = agent_id.into();
                for seq in seqs {
                    s.held.insert(seq, batch(agent_id, seq));
                }
            }
            a
        }

        fn lock(&self) -> MutexGuard<'_, AgentState> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        async fn start(&self) -> (String, tokio::sync::oneshot::Sender<()>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let svc = MetricsSourceServer::new(self.clone())
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Zstd);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = rx.await;
                    }),
            );
            (format!("http://{addr}"), tx)
        }
    }

    #[tonic::async_trait]
    impl MetricsSource for FakeAgent {
        async fn pull(
            &self,
            request: tonic::Request<PullRequest>,
        ) -> Result<tonic::Response<PullResponse>, tonic::Status> {
            let req = request.into_inner();
            let delay = self.lock().delay;
            tokio::time::sleep(delay).await;
            let mut s = self.lock();
            s.acks.push(req.ack_through_seq);
            if s.fail_left > 0 {
                s.fail_left -= 1;
                return Err(tonic::Status::unavailable("scripted failure"));
            }
            s.held.retain(|&seq, _| seq > req.ack_through_seq);
            let max = if req.max_batches == 0 {
                64
            } else {
                req.max_batches as usize
            };
            Ok(tonic::Response::new(PullResponse {
                agent_id: s.agent_id.clone(),
                batches: s.held.values().take(max).cloned().collect(),
            }))
        }
    }

    fn batch(agent_id: &str, seq: u64) -> WriteBatch {
        WriteBatch {
            chunks: Vec::new(),
            agent_id: agent_id.into(),
            seq,
            common_tags: vec![Tag {
                key: "agent_id".into(),
                value: agent_id.into(),
            }],
            points: vec![Point {
                measurement: "mem".into(),
                tags: vec![],
                fields: vec![Field {
                    key: "used".into(),
                    value: Some(field::Value::U64(seq)),
                }],
                time_unix_nano: 1_700_000_000_000_000_000 + seq as i64,
            }],
        }
    }

    fn open_store(dir: &std::path::Path) -> Store {
        let config = CollectorConfig {
            data_dir: dir.to_path_buf(),
            wal_sync: crate::config::WalSync::None,
            ..CollectorConfig::default()
        };
        Store::open(&config).unwrap()
    }

    fn settings(max_batches: u32) -> PullSettings {
        PullSettings {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(2),
            max_concurrent: 4,
            max_batches,
            max_drain_pulls: 32,
            token: None,
            tls: None,
        }
    }

    fn rows(store: &Store, table: &str) -> usize {
        store
            .snapshot(table)
            .map_or(0, |s| s.batches.iter().map(|b| b.num_rows()).sum())
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn run(scheduler: PullScheduler) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(scheduler.run(async move {
            let _ = rx.await;
        }));
        tx
    }

    #[test]
    fn target_urls() {
        for ok in [
            "http://10.0.0.5:9464",
            "http://host-a.example:1/",
            "http://[::1]:7070",
            "https://h:1",
        ] {
            assert!(validate_target_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.5:9464",
            "ftp://h:1",
            "http://h",
            "http://h:0",
            "http://h:99999",
            "http://h:1/path",
            "http://:1",
            "http://[zz]:1",
            "http://u@h:1",
        ] {
            assert!(validate_target_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            PullTarget::registered("a".into(), "10.0.0.1:7070").url,
            "http://10.0.0.1:7070"
        );
        let config = CollectorConfig {
            pull_targets: vec!["tcp://x:1".into()],
            ..CollectorConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("pull_targets"), "{err}");
    }

    #[tokio::test]
    async fn drains_backlog_and_acknowledges() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let agent = FakeAgent::new("agent-1", 1..=100);
        let (url, _stop_agent) = agent.start().await;
        let touched = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::clone(&touched);
        let scheduler = PullScheduler::new(
            store.clone(),
            std::slice::from_ref(&url),
            no_extra_targets(),
        )
        .with_settings(settings(10))
        .on_batch(Arc::new(move |id: &str| {
            seen.lock().unwrap().insert(id.to_owned());
        }));
        let handle = scheduler.handle();
        let stop = run(scheduler);
        wait_for("100 rows", || rows(&store, "mem") == 100).await;
        // The next pull acknowledges everything; the agent then holds nothing.
        wait_for("agent emptied", || agent.lock().held.is_empty()).await;
        wait_for("health", || {
            handle
                .target(&url)
                .is_some_and(|h| h.ack_through_seq == 100)
        })
        .await;
        let h = handle.target(&url).unwrap();
        assert_eq!(h.status, "up");
        assert_eq!(h.agent_id.as_deref(), Some("agent-1"));
        assert_eq!((h.batches_pulled, h.points_pulled), (100, 100));
        assert_eq!(h.consecutive_failures, 0);
        assert!(h.last_success_unix_ms.is_some());
        // The first slot drained the backlog back to back: 11 pulls (10 full ones and an empty one).
        let acks = agent.lock().acks.clone();
        assert_eq!(
            &acks[..11],
            &[0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
            "{acks:?}"
        );
        assert_eq!(
            *touched.lock().unwrap(),
            BTreeSet::from(["agent-1".to_owned()])
        );
        // New batches arrive on the next interval.
        agent.lock().held.insert(101, batch("agent-1", 101));
        wait_for("101 rows", || rows(&store, "mem") == 101).await;
        drop(stop);
    }

    #[tokio::test]
    async fn failures_are_reported_and_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        // Nobody listens on this port yet.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://{addr}");
        let scheduler = PullScheduler::new(
            store.clone(),
            std::slice::from_ref(&url),
            no_extra_targets(),
        )
        .with_settings(settings(10));
        let handle = scheduler.handle();
        assert_eq!(handle.targets().len(), 0);
        let stop = run(scheduler);
        wait_for("two failures", || {
            handle
                .target(&url)
                .is_some_and(|h| h.consecutive_failures >= 2)
        })
        .await;
        let h = handle.target(&url).unwrap();
        assert_eq!(h.status, "down");
        let err = h.last_error.clone().unwrap();
        assert!(
            err.to_lowercase().contains("refused") || err.contains("connect"),
            "{err}"
        );

        // The agent comes up on that port, fails once more, then answers.
        let agent = FakeAgent::new("agent-2", 1..=3);
        agent.lock().fail_left = 1;
        let listener = TcpListener::bind(addr).await.unwrap();
        let svc = MetricsSourceServer::new(agent.clone())
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        wait_for("3 rows", || rows(&store, "mem") == 3).await;
        wait_for("up", || {
            handle.target(&url).is_some_and(|h| h.status == "up")
        })
        .await;
        let h = handle.target(&url).unwrap();
        assert_eq!(h.consecutive_failures, 0);
        assert!(h.last_error.unwrap().contains("scripted failure"));
        drop(stop);
    }

    #[tokio::test]
    async fn timeouts_extra_targets_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let slow = FakeAgent::new("slow", 1..=2);
        slow.lock().delay = Duration::from_secs(30);
        let (slow_url, _s1) = slow.start().await;
        let fine = FakeAgent::new("fine", 1..=5);
        let (fine_url, _s2) = fine.start().await;
        let listed = Arc::new(Mutex::new(vec![PullTarget::registered(
            "fine".into(),
            fine_url.trim_start_matches("http://"),
        )]));
        let extra_list = Arc::clone(&listed);
        let scheduler = PullScheduler::new(
            store.clone(),
            std::slice::from_ref(&slow_url),
            Arc::new(move || extra_list.lock().unwrap().clone()),
        )
        .with_settings(PullSettings {
            timeout: Duration::from_millis(300),
            ..settings(10)
        });
        let handle = scheduler.handle();
        let stop = run(scheduler);
        wait_for("slow times out", || {
            handle.target(&slow_url).is_some_and(|h| h.status == "down")
        })
        .await;
        let h = handle.target(&slow_url).unwrap();
        let err = h.last_error.unwrap();
        assert!(err.contains("no answer within 300ms"), "{err}");
        assert_eq!(h.origin, TargetOrigin::Config);
        wait_for("5 rows", || rows(&store, "mem") == 5).await;
        let f = handle.target(&fine_url).unwrap();
        assert_eq!(f.origin, TargetOrigin::Registry);
        assert_eq!(f.agent_id.as_deref(), Some("fine"));
        // The registry forgets it: it leaves the health view.
        listed.lock().unwrap().clear();
        wait_for("removed", || handle.target(&fine_url).is_none()).await;
        assert_eq!(handle.targets().len(), 1);
        drop(stop);
    }

    #[tokio::test]
    async fn rejected_batches_are_acknowledged_and_restart_resends() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let agent = FakeAgent::new("agent-3", 1..=4);
        // seq 2 is invalid (a point without fields): REJECTED, acknowledged, never sent again.
        agent.lock().held.get_mut(&2).unwrap().points[0]
            .fields
            .clear();
        let (url, _stop_agent) = agent.start().await;
        let scheduler = PullScheduler::new(
            store.clone(),
            std::slice::from_ref(&url),
            no_extra_targets(),
        )
        .with_settings(settings(64));
        let handle = scheduler.handle();
        let stop = run(scheduler);
        wait_for("acked through 4", || agent.lock().acks.contains(&4)).await;
        assert_eq!(rows(&store, "mem"), 3);
        let h = handle.target(&url).unwrap();
        assert_eq!((h.batches_pulled, h.batches_rejected), (3, 1));
        drop(stop);

        // A restarted collector starts from ack 0: the agent resends what it holds, dedup answers DUPLICATE.
        for seq in 5..=6 {
            agent.lock().held.insert(seq, batch("agent-3", seq));
        }
        agent.lock().held.insert(3, batch("agent-3", 3));
        let scheduler = PullScheduler::new(
            store.clone(),
            std::slice::from_ref(&url),
            no_extra_targets(),
        )
        .with_settings(settings(64));
        let handle = scheduler.handle();
        let stop = run(scheduler);
        wait_for("acked through 6", || agent.lock().acks.contains(&6)).await;
        assert_eq!(rows(&store, "mem"), 5);
        let h = handle.target(&url).unwrap();
        assert_eq!((h.batches_pulled, h.batches_duplicate), (2, 1));
        drop(stop);
    }

    #[tokio::test]
    async fn store_retry_stops_the_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        // Any buffered row puts this store over its limit: it answers RETRY until a flush.
        let store = Store::open(&CollectorConfig {
            data_dir: dir.path().to_path_buf(),
            wal_sync: crate::config::WalSync::None,
            max_buffer_bytes: 1,
            flush_buffer_bytes: 1,
            ..CollectorConfig::default()
        })
        .unwrap();
        assert_eq!(
            store.write(batch("agent-4", 1)).await,
            WriteOutcome::Stored { points: 1 }
        );
        let agent = FakeAgent::new("agent-4", 1..=3);
        let (url, _stop_agent) = agent.start().await;
        let mut client = connect(&url, &settings(64)).unwrap();
        let mut slot = Slot {
            url: url.clone(),
            store: store.clone(),
            settings: settings(64),
            handle: PullHandle::default(),
            on_batch: None,
            ack_through: 0,
            agent_id: None,
        };
        let mut tally = Tally::default();
        let (mut retry, mut backlog) = (None, false);
        slot.pull_loop(&mut client, &mut tally, &mut retry, &mut backlog)
            .await
            .unwrap();
        // seq 1 is a duplicate (acknowledged), 2 and 3 are refused for now: the acknowledgement stops at 1.
        assert_eq!(slot.ack_through, 1);
        assert_eq!((tally.duplicate, tally.retried, tally.stored), (1, 2, 0));
        // The store's hint (from its last flush's duration, 0.25 to 10 s) is passed on.
        assert!(
            retry.is_some_and(|d| d >= Duration::from_millis(250) && d <= Duration::from_secs(10)),
            "{retry:?}"
        );
        assert!(!backlog);

        // Each flush makes room for (at least) one more group commit.
        for _ in 0..5 {
            store.flush().await.unwrap();
            let (mut retry, mut backlog) = (None, false);
            slot.pull_loop(&mut client, &mut tally, &mut retry, &mut backlog)
                .await
                .unwrap();
            if slot.ack_through == 3 {
                break;
            }
        }
        assert_eq!(slot.ack_through, 3);
        assert_eq!(tally.stored, 2);
        assert_eq!(agent.lock().acks[..2], [0, 1]);
        // The agent forgets batches when the next pull acknowledges them.
        assert!(!agent.lock().held.contains_key(&1));
    }
}
