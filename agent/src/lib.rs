//! The Damselfly agent: runs on each monitored VM, reads host metrics (cpu, mem, disk, net, system) with sysinfo
//! and `/proc` every `interval`, and pushes them to a collector shard over the `damselfly.v1.Ingest/Push` gRPC
//! stream (zstd-compressed, acknowledged per batch).
//!
//! Data path: [`probes`] → points stamped with their collection time → [`batch::Batcher`] (identity tags once per
//! batch in `common_tags`, split at `batch_max_points`, a strictly increasing `seq` from [`seq`]) → the bounded
//! pending [`queue`] → [`push`] (re-sends until STORED/DUPLICATE, reconnects with backoff). The queue is a trait so
//! the disk spool of a later issue replaces the in-memory one without touching the rest.
//!
//! The `damselfly-agent` binary wraps [`run`]; the `damselfly` CLI embeds the same [`run`] in-process.

pub mod batch;
pub mod config;
pub mod probes;
pub mod push;
pub mod queue;
pub mod seq;
mod stats;

#[cfg(test)]
mod fake_collector;
#[cfg(test)]
mod push_tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use damselfly_proto::v1::{Point, Tag, field};
use tokio::sync::mpsc;

pub use config::{AgentConfig, ConfigError};
pub use probes::{ProbeError, Probes};
pub use stats::AgentStats;

use batch::Batcher;
use push::{PushSettings, Pusher};
use queue::MemoryQueue;
use seq::SeqAllocator;
use stats::Counters;

/// How long [`run`] keeps trying to deliver pending batches after shutdown is requested.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
    let mut probes = Probes::new()?;
    Ok(Round {
        common_tags: common_tags(config),
        points: probes.collect(),
    })
}

/// Runs the agent: collects every `config.interval` and pushes to `config.collector` until `shutdown` completes,
/// then tries for at most [`FLUSH_TIMEOUT`] to deliver what is still pending and returns the counters.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<AgentStats, AgentError> {
    config.validate()?;
    let agent_id = config.effective_agent_id();
    let seq = match &config.state_dir {
        Some(dir) => SeqAllocator::open(dir).map_err(|source| AgentError::State {
            path: dir.clone(),
            source,
        })?,
        None => SeqAllocator::from_clock(),
    };
    let mut batcher = Batcher::new(
        agent_id.clone(),
        common_tags(&config),
        config.batch_max_points,
        seq,
    );
    let counters = Arc::new(Counters::default());
    let pusher = Pusher::new(
        PushSettings::from_config(&config),
        MemoryQueue::new(config.max_pending_batches),
        Arc::clone(&counters),
    )
    .map_err(|e| ConfigError::Invalid {
        key: "collector",
        reason: e.to_string(),
    })?;

    // Probe set-up reads /proc and sleeps for nothing, but keep it off the async threads all the same.
    let mut probes = Some(blocking(Probes::new).await??);
    // A few rounds of slack; the push task drains this channel continuously.
    let (tx, rx) = mpsc::channel(64);
    let mut push_task = tokio::spawn(pusher.run(rx));
    tracing::info!(
        %agent_id,
        collector = %config.collector,
        interval_s = config.interval,
        "agent started"
    );

    let mut ticker = tokio::time::interval(Duration::from_secs(config.interval));
    // After a stall (suspended VM), resume the rhythm instead of firing a burst of catch-up rounds.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = &mut push_task => {
                return Err(AgentError::Task(format!("push task stopped: {}", join_text(r.err()))));
            }
            _ = ticker.tick() => {
                let Some(mut p) = probes.take() else { break };
                let (p, points) = blocking(move || {
                    let points = p.collect();
                    (p, points)
                })
                .await?;
                probes = Some(p);
                counters.rounds.fetch_add(1, Relaxed);
                counters.points_collected.fetch_add(points.len() as u64, Relaxed);
                for batch in batcher.batches(points) {
                    counters.batches_created.fetch_add(1, Relaxed);
                    if tx.send(batch).await.is_err() {
                        return Err(AgentError::Task("push task stopped".to_owned()));
                    }
                }
            }
        }
    }

    // Closing the channel tells the push task to finish once everything is acknowledged.
    drop(tx);
    tracing::info!(
        pending = counters.pending.load(Relaxed),
        "shutting down; flushing pending batches"
    );
    if tokio::time::timeout(FLUSH_TIMEOUT, &mut push_task)
        .await
        .is_err()
    {
        push_task.abort();
        let _ = push_task.await;
        tracing::warn!(
            pending = counters.pending.load(Relaxed),
            "could not deliver every pending batch within {FLUSH_TIMEOUT:?}; they are lost"
        );
    }
    let stats = counters.snapshot();
    tracing::info!(?stats, "agent stopped");
    Ok(stats)
}

/// Runs blocking work (probes) on tokio's blocking pool.
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
