//! Benchmark runs asked by the collector: commands arrive with heartbeat answers ([`BenchControl::deliver`]),
//! [`run_commands`] runs them one at a time ([`crate::bench`]), their results become rows of the `bench` table
//! (pushed like any other batch), and their progress goes back with the next heartbeats ([`BenchControl::report`]).
//!
//! Rows: measurement `bench`; tags `run_id`, `kind`, `unit` (and `spec` when the agent's config names it, plus the
//! identity tags every batch carries); fields `value` (absent when the benchmark failed), `elapsed_ms`, `vcpus`,
//! `memory_bytes`, `error` (the reason, when it failed) and one `detail_<name>` per detail the benchmark reports
//! (e.g. `detail_p99` for `rtt`, one per peer for `mrtt`).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::{BenchCommand, BenchProgress, BenchState, Field, Point, Tag};
use tokio::sync::mpsc;

use crate::bench::{BenchKind, BenchRequest, BenchResult};

/// How long a finished run's final state is still reported (heartbeats may fail meanwhile).
const REPORT_FINISHED_FOR: Duration = Duration::from_secs(600);
/// Run ids remembered so a command delivered again is not run again.
const MAX_SEEN_RUNS: usize = 10_000;

/// Where a benchmark's temporary files go, its default limits, and the tags of its rows.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Directory for temporary files (fio, the embedded database).
    pub work_dir: PathBuf,
    /// Each benchmark's time limit when the command says 0.
    pub default_time_limit: Duration,
    /// fio file size when the command says 0.
    pub default_fio_bytes: u64,
    /// A run is refused above this 1-minute load average per core, unless forced.
    pub max_load: f64,
    /// The VM's spec (instance type), tagged on every row when set.
    pub spec: String,
}

#[derive(Debug, Default)]
struct State {
    progress: BTreeMap<String, (BenchProgress, Option<Instant>)>,
    seen: HashSet<String>,
}

/// Shared between the heartbeat task (which delivers commands and reports progress) and [`run_commands`].
#[derive(Debug)]
pub struct BenchControl {
    state: Mutex<State>,
    commands: mpsc::UnboundedSender<BenchCommand>,
}

impl BenchControl {
    /// A control and the receiving end of its commands (for [`run_commands`]).
    pub fn new() -> (Arc<BenchControl>, mpsc::UnboundedReceiver<BenchCommand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(BenchControl {
                state: Mutex::default(),
                commands: tx,
            }),
            rx,
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the commands of a heartbeat answer: each run id is started once (a command is delivered again until
    /// a heartbeat reports it).
    pub fn deliver(&self, commands: Vec<BenchCommand>) {
        let mut state = self.lock();
        for command in commands {
            if !state.seen.insert(command.run_id.clone()) {
                continue;
            }
            if state.seen.len() > MAX_SEEN_RUNS {
                state.seen.clear();
                state.seen.insert(command.run_id.clone());
            }
            let progress = BenchProgress {
                run_id: command.run_id.clone(),
                state: BenchState::Running as i32,
                message: "queued".into(),
                done: 0,
                total: command.kinds.len() as u32,
            };
            state
                .progress
                .insert(command.run_id.clone(), (progress, None));
            if self.commands.send(command).is_err() {
                tracing::warn!("benchmark runner is gone; the command is dropped");
            }
        }
    }

    fn set(&self, progress: BenchProgress) {
        let finished = BenchState::try_from(progress.state)
            .is_ok_and(|s| !matches!(s, BenchState::Running | BenchState::Unspecified));
        self.lock().progress.insert(
            progress.run_id.clone(),
            (progress, finished.then(Instant::now)),
        );
    }

    /// The runs to report with the next heartbeat: running ones, and finished ones for a while.
    pub fn report(&self) -> Vec<BenchProgress> {
        let mut state = self.lock();
        state
            .progress
            .retain(|_, (_, done)| done.is_none_or(|t| t.elapsed() < REPORT_FINISHED_FOR));
        state.progress.values().map(|(p, _)| p.clone()).collect()
    }
}

/// Runs the commands `control` receives, one run at a time, and sends each run's rows to `rows` (the agent turns
/// them into batches). Returns when the command channel closes.
pub async fn run_commands(
    control: Arc<BenchControl>,
    mut commands: mpsc::UnboundedReceiver<BenchCommand>,
    settings: BenchSettings,
    rows: mpsc::UnboundedSender<Vec<Point>>,
) {
    while let Some(command) = commands.recv().await {
        let run_id = command.run_id.clone();
        let mut progress = BenchProgress {
            run_id: run_id.clone(),
            state: BenchState::Running as i32,
            message: String::new(),
            done: 0,
            total: command.kinds.len() as u32,
        };
        let kinds: Result<Vec<BenchKind>, String> = command
            .kinds
            .iter()
            .map(|k| {
                k.parse::<BenchKind>()
                    .map_err(|_| format!("unknown benchmark {k:?}"))
            })
            .collect();
        let kinds = match kinds {
            Ok(k) => k,
            Err(e) => {
                progress.state = BenchState::Refused as i32;
                progress.message = e;
                control.set(progress);
                continue;
            }
        };
        tracing::info!(%run_id, kinds = ?command.kinds, "benchmark run started");
        let (vcpus, memory_bytes) = host_size();
        let mut all_rows = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            progress.message = format!("running {kind}");
            control.set(progress.clone());
            let request = BenchRequest {
                kinds: vec![*kind],
                time_limit: if command.time_limit_secs == 0 {
                    settings.default_time_limit
                } else {
                    Duration::from_secs(u64::from(command.time_limit_secs))
                },
                fio_file_bytes: if command.fio_file_bytes == 0 {
                    settings.default_fio_bytes
                } else {
                    command.fio_file_bytes
                },
                work_dir: settings.work_dir.clone(),
                rtt_targets: command.rtt_targets.clone(),
                mrtt_peers: command.mrtt_peers.clone(),
                // The load check is for the VM as found: later benchmarks must not be refused because of the
                // load the earlier ones caused.
                force: command.force || i > 0,
                max_load: settings.max_load,
            };
            match crate::bench::run(&request).await {
                Ok(results) => {
                    for r in results {
                        all_rows.push(row(&run_id, &r, &settings.spec, vcpus, memory_bytes));
                    }
                }
                Err(e) => {
                    progress.state = if i == 0 {
                        BenchState::Refused as i32
                    } else {
                        BenchState::Failed as i32
                    };
                    progress.message = e.to_string();
                    break;
                }
            }
            progress.done = i as u32 + 1;
        }
        if !all_rows.is_empty() && rows.send(all_rows).is_err() {
            progress.state = BenchState::Failed as i32;
            progress.message = "the agent is stopping; the results were not queued".into();
        }
        if progress.state == BenchState::Running as i32 {
            progress.state = BenchState::Done as i32;
            progress.message = String::new();
        }
        tracing::info!(%run_id, state = ?BenchState::try_from(progress.state), message = %progress.message, "benchmark run finished");
        control.set(progress);
    }
}

fn host_size() -> (u64, u64) {
    let facts = crate::probes::host_facts();
    (u64::from(facts.vcpus), facts.memory_bytes)
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn tag(key: &str, value: &str) -> Tag {
    Tag {
        key: key.into(),
        value: value.into(),
    }
}

fn field(key: &str, value: Value) -> Field {
    Field {
        key: key.into(),
        value: Some(value),
    }
}

/// One result as a row of `bench`.
fn row(run_id: &str, r: &BenchResult, spec: &str, vcpus: u64, memory_bytes: u64) -> Point {
    let mut tags = vec![
        tag("run_id", run_id),
        tag("kind", &r.kind.to_string()),
        tag("unit", r.unit),
    ];
    if !spec.is_empty() {
        tags.push(tag("spec", spec));
    }
    let mut fields = vec![
        field("elapsed_ms", Value::F64(r.elapsed.as_secs_f64() * 1000.0)),
        field("vcpus", Value::U64(vcpus)),
        field("memory_bytes", Value::U64(memory_bytes)),
    ];
    match &r.error {
        Some(e) => fields.push(field("error", Value::Str(e.clone()))),
        None => fields.push(field("value", Value::F64(r.value))),
    }
    for (name, value) in &r.detail {
        // Field names are free text, but keep them tidy: peers are `host:port`.
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if value.is_finite() {
            fields.push(field(&format!("detail_{name}"), Value::F64(*value)));
        }
    }
    Point {
        measurement: "bench".into(),
        tags,
        fields,
        time_unix_nano: now_nanos(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(run_id: &str) -> BenchCommand {
        BenchCommand {
            run_id: run_id.into(),
            kinds: vec!["cpus".into()],
            ..BenchCommand::default()
        }
    }

    #[test]
    fn a_run_id_is_started_once_and_reported_until_it_ages() {
        let (control, mut rx) = BenchControl::new();
        control.deliver(vec![command("r1")]);
        control.deliver(vec![command("r1"), command("r2")]);
        let mut got = Vec::new();
        while let Ok(c) = rx.try_recv() {
            got.push(c.run_id);
        }
        assert_eq!(got, ["r1", "r2"]);
        let report = control.report();
        assert_eq!(report.len(), 2);
        assert!(report.iter().all(|p| p.state == BenchState::Running as i32));
        control.set(BenchProgress {
            run_id: "r1".into(),
            state: BenchState::Done as i32,
            ..BenchProgress::default()
        });
        assert_eq!(
            control.report().len(),
            2,
            "a finished run is still reported"
        );
    }
}
