//! The Damselfly agent: runs on each monitored VM, reads host metrics (cpu, mem, disk, net, system, ...) from
//! `/proc`, `/sys` and sysinfo every `interval`, and delivers them to a collector: pushed over the
//! `damselfly.v1.Ingest/Push` gRPC stream (zstd-compressed, acknowledged per batch), or served for the collector to
//! pull (`MetricsSource.Pull`).
//!
//! Data path: [`probes`] → points stamped with their collection time → [`batch::Batcher`] (identity tags once per
//! batch in `common_tags`, split at `batch_max_points`, a strictly increasing `seq` from [`seq`]) → the bounded
//! pending [`queue`], shared by every task ([`SharedQueue`]): the disk [`spool`] when there is a spool directory,
//! memory otherwise → [`push`] (re-sends until STORED/DUPLICATE, reconnects with backoff, replays the spool in
//! order after an outage; with a sharded collector it pushes to the shard that owns the agent, follows redirects,
//! fails over to the next shard and comes back) and/or the pull server.
//!
//! The `damselfly-agent` binary wraps [`run`]; the `damselfly` CLI embeds the same [`run`] in-process.

pub mod batch;
pub mod bench;
pub mod config;
pub mod control;
pub mod credentials;
pub mod probes;
pub mod push;
pub mod queue;
pub mod register;
pub mod seq;
pub mod serve;
pub mod spool;
mod stats;

#[cfg(test)]
mod fake_collector;
#[cfg(test)]
mod push_tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use damselfly_proto::v1::{Point, Tag, field};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use config::{AgentConfig, ConfigError};
pub use probes::{ProbeError, Probes};
pub use queue::{BatchQueue, SharedQueue};
pub use stats::AgentStats;

use batch::Batcher;
use push::{PushSettings, Pusher};
use queue::{MemoryQueue, enqueue, lock};
use seq::SeqAllocator;
use spool::DiskSpool;
use stats::Counters;

/// How long [`run`] keeps trying to deliver pending batches after shutdown is requested. What is still pending
/// then stays in the disk spool for the next start (or is lost with the in-memory queue).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The latest collection round, for the metrics page; `None` until the first round.
pub type LatestRound = Arc<RwLock<Option<Round>>>;

/// Why the agent could not start or stopped early. Network trouble is not an error: it is retried.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The system probes could not be set up.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The state directory could not be used.
    #[error("state directory {}: {source}", path.display())]
    State {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The spool directory could not be used (unwritable, or in use by another agent).
    #[error("spool directory {}: {source}", path.display())]
    Spool {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The `listen` address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The `listen` address.
        addr: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// An internal task panicked or stopped unexpectedly.
    #[error("agent task failed: {0}")]
    Task(String),
}

/// The identity tags of `config` as wire tags, for a batch's `common_tags`.
pub fn common_tags(config: &AgentConfig) -> Vec<Tag> {
    config
        .identity_tags()
        .into_iter()
        .map(|(key, value)| Tag {
            key: key.to_owned(),
            value,
        })
        .collect()
}

/// One collection round: the identity tags shared by all points, and the points.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// Identity tags (`ns_id` ... `agent_id`).
    pub common_tags: Vec<Tag>,
    /// The probes' points.
    pub points: Vec<Point>,
}

impl Round {
    /// One JSON object per point, `{"measurement", "time_unix_nano", "tags", "fields"}`, with the common tags merged
    /// into `tags` (a point's own tag wins, as on the wire). Non-finite floats become `null`.
    pub fn json_lines(&self) -> impl Iterator<Item = String> + '_ {
        self.points.iter().map(|p| {
            let mut tags = serde_json::Map::new();
            for t in self.common_tags.iter().chain(&p.tags) {
                tags.insert(t.key.clone(), serde_json::Value::String(t.value.clone()));
            }
            let mut fields = serde_json::Map::new();
            for f in &p.fields {
                let v = match &f.value {
                    Some(field::Value::F64(v)) => serde_json::json!(v),
                    Some(field::Value::I64(v)) => serde_json::json!(v),
                    Some(field::Value::U64(v)) => serde_json::json!(v),
                    Some(field::Value::Bool(v)) => serde_json::json!(v),
                    Some(field::Value::Str(v)) => serde_json::json!(v),
                    None => serde_json::Value::Null,
                };
                fields.insert(f.key.clone(), v);
            }
            serde_json::json!({
                "measurement": p.measurement,
                "time_unix_nano": p.time_unix_nano,
                "tags": tags,
                "fields": fields,
            })
            .to_string()
        })
    }
}

/// Collects one round without any network: for `--once`, operators and tests. Blocking (about 200 ms, for the CPU
/// delta).
pub fn collect_once(config: &AgentConfig) -> Result<Round, AgentError> {
    let mut probes = Probes::with_options(config.probe_options())?;
    Ok(Round {
        common_tags: common_tags(config),
        points: probes.collect(),
    })
}

/// What the agent's tasks share. Cheap to clone.
#[derive(Clone)]
pub struct AgentHandles {
    /// The agent's id (as in every batch).
    pub agent_id: String,
    /// The pending batches (disk spool or memory).
    pub queue: SharedQueue,
    /// The latest collection round.
    pub latest: LatestRound,
    /// When [`run`] started (for uptime).
    pub started: std::time::Instant,
    /// Counters: `pending`, `pending_bytes` and `batches_dropped` are what heartbeats report.
    pub(crate) counters: Arc<Counters>,
}

impl std::fmt::Debug for AgentHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandles")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl AgentHandles {
    /// The counters so far.
    pub fn stats(&self) -> AgentStats {
        self.counters.snapshot()
    }
}

/// The state that moves between collection rounds (onto a blocking thread and back).
struct Collection {
    probes: Probes,
    batcher: Batcher,
    common_tags: Vec<Tag>,
}

impl Collection {
    /// One round: collect, publish for the metrics page, batch, queue, and make the spool durable (one fsync per
    /// round). Blocking.
    fn round(&mut self, h: &AgentHandles) {
        let points = self.probes.collect();
        h.counters.rounds.fetch_add(1, Relaxed);
        h.counters
            .points_collected
            .fetch_add(points.len() as u64, Relaxed);
        *h.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(Round {
            common_tags: self.common_tags.clone(),
            points: points.clone(),
        });
        enqueue(&h.queue, self.batcher.batches(points), &h.counters);
        if let Err(e) = lock(&h.queue).checkpoint() {
            tracing::error!(error = %e, "cannot sync the spool; the newest batches may not survive a power loss");
        }
    }
}

impl Collection {
    /// Points made outside the collection rounds (benchmark results): batched and queued like a round's.
    fn queue_extra(&mut self, h: &AgentHandles, points: Vec<Point>) {
        enqueue(&h.queue, self.batcher.batches(points), &h.counters);
        if let Err(e) = lock(&h.queue).checkpoint() {
            tracing::error!(error = %e, "cannot sync the spool; benchmark results may not survive a power loss");
        }
    }
}

/// Opens the sequence numbers and the queue (the spool when there is a spool directory). Blocking.
fn open_state(config: &AgentConfig) -> Result<(SeqAllocator, Box<dyn BatchQueue>), AgentError> {
    let mut seq = match &config.state_dir {
        Some(dir) => SeqAllocator::open(dir).map_err(|source| AgentError::State {
            path: dir.clone(),
            source,
        })?,
        None => SeqAllocator::from_clock(),
    };
    let queue: Box<dyn BatchQueue> = match config.effective_spool_dir() {
        Some(dir) => {
            let spool = DiskSpool::open(&dir, config.spool_max_bytes)
                .map_err(|source| AgentError::Spool { path: dir, source })?;
            // Never give a new batch the seq of one still in (or acknowledged from) the spool.
            seq.ensure_above(spool.last_seq());
            Box::new(spool)
        }
        None => Box::new(MemoryQueue::new(config.max_pending_batches)),
    };
    Ok((seq, queue))
}

/// Runs the agent until `shutdown` completes: collects every `config.interval` into the shared queue and, in push
/// mode (`collector` set), pushes it to the collector. At shutdown it stops collecting, tries for at most
/// [`FLUSH_TIMEOUT`] to deliver what is pending, and returns the counters; undelivered batches stay in the spool.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<AgentStats, AgentError> {
    config.validate()?;
    let agent_id = config.effective_agent_id();
    let started = std::time::Instant::now();
    let cfg = config.clone();
    let (seq, queue) = blocking(move || open_state(&cfg)).await??;
    let handles = AgentHandles {
        agent_id: agent_id.clone(),
        queue: queue::shared(queue),
        latest: LatestRound::default(),
        started,
        counters: Arc::new(Counters::default()),
    };
    let (pending, pending_bytes, durable) = {
        let q = lock(&handles.queue);
        (q.len(), q.bytes(), q.durable())
    };
    handles.counters.set_pending(pending, pending_bytes);

    // Probe set-up reads /proc; keep it off the async threads.
    let options = config.probe_options();
    let probes = blocking(move || Probes::with_options(options)).await??;
    let mut collection = Some(Collection {
        probes,
        batcher: Batcher::new(
            agent_id.clone(),
            common_tags(&config),
            config.batch_max_points,
            seq,
        ),
        common_tags: common_tags(&config),
    });

    // Every task stops when this turns true.
    let (stop_tx, stop_rx) = watch::channel(false);
    // The collection loop wakes the push task after each round.
    let wake = Arc::new(Notify::new());

    // Push mode: one task sends the queue to the collector. Registration and heartbeats follow the shard it
    // pushes to (`push_target`).
    let mut push_target: Option<watch::Receiver<String>> = None;
    let mut push_task: Option<JoinHandle<()>> = match &config.collector {
        Some(url) => {
            let pusher = Pusher::new(
                PushSettings::new(url.clone(), &config),
                Arc::clone(&handles.queue),
                Arc::clone(&wake),
                Arc::clone(&handles.counters),
            )
            .map_err(|e| ConfigError::Invalid {
                key: "collector",
                reason: e.to_string(),
            })?;
            push_target = Some(pusher.target());
            Some(tokio::spawn(pusher.run(stop_rx.clone())))
        }
        None => None,
    };

    // More tasks plug in here, each spawned with `handles.clone()` and `stop_rx.clone()` (return when it turns
    // true) and pushed onto `side_tasks`, which shutdown awaits for at most FLUSH_TIMEOUT:
    // * `listen` set: serve.rs on `config.listen`: the /metrics page from `handles.latest`, and without a
    //   `collector` (pull mode) `MetricsSource.Pull` over `handles.queue` (with a collector the push task owns the
    //   queue); pull-mode registration advertises `config.effective_advertise_addr()`;
    // * `collector` set: register.rs (registration, then heartbeats every `config.heartbeat_secs` reporting
    //   `handles.counters` pending / pending_bytes / batches_dropped and the uptime since `handles.started`), to
    //   the shard the push task pushes to.
    let mut side_tasks: Vec<JoinHandle<()>> = Vec::new();
    if let Some(addr) = config.listen {
        if !addr.ip().is_loopback() && config.pull_token.is_none() {
            tracing::warn!(
                %addr,
                "insecure: listening beyond loopback without a pull token: anyone who reaches this port can pull \
                 (and so drop) this agent's batches and read its metrics"
            );
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Listen { addr, source })?;
        side_tasks.push(serve::spawn(
            listener,
            config.listen_tls().map_err(|reason| ConfigError::Invalid {
                key: "listen_tls_cert_file",
                reason,
            })?,
            serve::ServeState::from_handles(&handles, &config),
            stop_rx.clone(),
        ));
    }
    // Benchmark runs asked by the collector (push mode): commands come with heartbeat answers, results go into
    // the queue as `bench` rows through the collection loop (which owns the batcher and its sequence numbers).
    let (bench_rows_tx, mut bench_rows) = tokio::sync::mpsc::unbounded_channel::<Vec<Point>>();
    let mut bench_control = None;
    if push_target.is_some() {
        let (control, commands) = control::BenchControl::new();
        let settings = control::BenchSettings {
            work_dir: config.state_dir.clone().unwrap_or_else(std::env::temp_dir),
            default_time_limit: Duration::from_secs(10),
            default_fio_bytes: 256 << 20,
            max_load: f64::from(config.bench_max_load_percent) / 100.0,
            spec: config.spec.clone(),
        };
        let mut stop = stop_rx.clone();
        let runner = control::run_commands(Arc::clone(&control), commands, settings, bench_rows_tx);
        side_tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = runner => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }));
        bench_control = Some(control);
    }
    if let Some(target) = push_target {
        let request = register::request(
            agent_id.clone(),
            common_tags(&config),
            damselfly_proto::v1::AgentMode::Push,
            String::new(),
            config.interval,
        );
        let counters = Arc::clone(&handles.counters);
        let status = move || register::AgentStatus {
            pending_batches: counters.pending.load(Relaxed),
            pending_bytes: counters.pending_bytes.load(Relaxed),
            dropped_batches: counters.batches_dropped.load(Relaxed),
        };
        let mut stop = stop_rx.clone();
        side_tasks.push(tokio::spawn(register::run_following_with(
            register::RegisterSettings {
                token: config.token.clone(),
                tls: credentials::client_tls(&config).ok().flatten(),
                ..register::RegisterSettings::default()
            },
            target,
            request,
            status,
            bench_control,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }

    let mode = if config.collector.is_some() {
        "push"
    } else {
        "pull"
    };
    tracing::info!(
        %agent_id,
        mode,
        collector = config.collector.as_deref().unwrap_or("-"),
        listen = %config.listen.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        spool = %config
            .effective_spool_dir()
            .map_or_else(|| "memory".to_owned(), |d| d.display().to_string()),
        pending,
        interval_s = config.interval,
        "agent started"
    );

    let mut ticker = tokio::time::interval(Duration::from_secs(config.interval));
    // After a stall (suspended VM), resume the rhythm instead of firing a burst of catch-up rounds.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    loop {
        let push_done = async {
            match push_task.as_mut() {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = push_done => {
                return Err(AgentError::Task(format!("push task stopped: {}", join_text(r.err()))));
            }
            _ = ticker.tick() => {
                let Some(mut c) = collection.take() else { break };
                let h = handles.clone();
                collection = Some(blocking(move || {
                    c.round(&h);
                    c
                })
                .await?);
                wake.notify_one();
            }
            Some(points) = bench_rows.recv() => {
                let Some(mut c) = collection.take() else { break };
                let h = handles.clone();
                collection = Some(blocking(move || {
                    c.queue_extra(&h, points);
                    c
                })
                .await?);
                wake.notify_one();
            }
        }
    }

    // Stop collecting (done: the loop is left), tell every task, and give the push task FLUSH_TIMEOUT to deliver.
    let _ = stop_tx.send(true);
    tracing::info!(
        pending = handles.counters.pending.load(Relaxed),
        "shutting down; delivering pending batches"
    );
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    for mut task in push_task.into_iter().chain(side_tasks) {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
    let queue = Arc::clone(&handles.queue);
    let (pending, pending_bytes) = blocking(move || {
        let mut q = lock(&queue);
        if let Err(e) = q.checkpoint() {
            tracing::error!(error = %e, "cannot sync the spool at shutdown");
        }
        (q.len(), q.bytes())
    })
    .await?;
    handles.counters.set_pending(pending, pending_bytes);
    if pending > 0 && durable {
        tracing::info!(
            pending,
            pending_bytes,
            "{pending} undelivered batches stay in the spool; they are delivered after the next start"
        );
    } else if pending > 0 && config.collector.is_none() {
        // Pull mode: the agent cannot deliver by itself; these waited for the collector's next pull.
        tracing::warn!(
            pending,
            "{pending} batches were not pulled by a collector before shutdown; without a spool they are lost"
        );
    } else if pending > 0 {
        tracing::warn!(
            pending,
            "could not deliver {pending} pending batches within {FLUSH_TIMEOUT:?}; without a spool they are lost"
        );
    }
    let stats = handles.counters.snapshot();
    tracing::info!(?stats, "agent stopped");
    Ok(stats)
}

/// Runs blocking work (probes, spool I/O) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(join_text(Some(e))))
}

fn join_text(e: Option<tokio::task::JoinError>) -> String {
    match e {
        Some(e) if e.is_panic() => "panicked".to_owned(),
        Some(e) => e.to_string(),
        None => "returned early".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_round_json_has_identity_tags() {
        let config = AgentConfig {
            ns_id: "ns1".into(),
            csp: "aws".into(),
            ..AgentConfig::default()
        };
        let round = collect_once(&config).expect("collect");
        let only = AgentConfig {
            measurements: vec!["mem".into(), "system".into()],
            ..config.clone()
        };
        let some = collect_once(&only).expect("collect");
        assert!(
            some.points
                .iter()
                .all(|p| p.measurement == "mem" || p.measurement == "system"),
            "only the configured measurements"
        );
        let lines: Vec<serde_json::Value> = round
            .json_lines()
            .map(|l| serde_json::from_str(&l).expect("valid json"))
            .collect();
        assert_eq!(lines.len(), round.points.len());
        for l in &lines {
            for key in config::IDENTITY_TAG_KEYS {
                assert!(l["tags"][key].is_string(), "{key} missing in {l}");
            }
            assert_eq!(l["tags"]["ns_id"], "ns1");
            assert!(l["fields"].as_object().is_some_and(|f| !f.is_empty()));
        }
        assert!(
            lines
                .iter()
                .any(|l| l["measurement"] == "cpu" && l["tags"]["cpu"] == "cpu-total")
        );
    }
}
