//! The agent's own server: one TCP port that speaks both HTTP/1.1 and gRPC (HTTP/2), for pull mode and for
//! Prometheus-style scrapers.
//!
//! * `GET /metrics` — the latest collection round in the Prometheus text exposition format 0.0.4: one family per
//!   (measurement, field), named `damselfly_<measurement>_<field>`, labelled with the point's tags and the identity
//!   tags, numeric fields only (bools as 0/1, strings skipped). Everything is a `gauge` except the cumulative
//!   counters of [`COUNTERS`]. Plus `damselfly_agent_pending_batches` and
//!   `damselfly_agent_last_round_timestamp_seconds`.
//! * `GET /health` — JSON `{status, agent_id, mode, collector, last_round_unix_nano, pending_batches, pulls,
//!   batches_served, batches_acked, last_pull_unix_nano}`.
//! * gRPC `damselfly.v1.MetricsSource/Pull` — the acknowledged pull of `ingest.proto`: every batch with a seq up to
//!   `ack_through_seq` is removed from the shared queue (the collector has it), and up to `max_batches` (default
//!   [`DEFAULT_PULL_BATCHES`]) of the following ones are returned, oldest first, within
//!   [`MAX_PULL_RESPONSE_BYTES`]. zstd both ways. In push mode the call is refused with `FAILED_PRECONDITION`: the
//!   push task owns the queue, and acknowledging from two sides would lose data.
//!
//! With `pull_token` set, Pull and `/metrics` need `authorization: Bearer <pull_token>` (gRPC `UNAUTHENTICATED`,
//! HTTP 401 otherwise): a Pull acknowledges, so whoever may pull may drop batches. `/health` stays open.
//!
//! Wiring (one call in `run`): `serve::spawn(listener, config.listen_tls()?, ServeState::from_handles(&handles,
//! &config), stop_rx)`, with
//! the listener bound on `config.listen`. The collection loop publishes each round in `handles.latest`; Pull
//! acknowledges from `handles.queue` and keeps the `pending` counters (what heartbeats report) up to date.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use damselfly_proto::v1::metrics_source_server::{MetricsSource, MetricsSourceServer};
use damselfly_proto::v1::{Point, PullRequest, PullResponse, Tag, WriteBatch, field};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Status};

use crate::config::AgentConfig;
use crate::queue::{BatchQueue, SharedQueue, lock};
use crate::stats::Counters;
use crate::{AgentHandles, LatestRound, Round};

/// Batches per Pull response when the request says 0.
pub const DEFAULT_PULL_BATCHES: usize = 64;
/// Most batches per Pull response, whatever the request asks.
pub const MAX_PULL_BATCHES: usize = 1024;
/// Most bytes (encoded, before compression) of one Pull response. At least one batch is always returned, and one
/// batch is bounded by `batch_max_points`, so this bounds a response to ~16 MiB plus one batch.
pub const MAX_PULL_RESPONSE_BYTES: usize = 16 << 20;
/// How long open connections (a collector's HTTP/2 channel, a slow scrape) may run on after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The Prometheus text format's content type.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Fields exported as Prometheus `counter`s (cumulative since boot); every other numeric field is a `gauge`.
pub const COUNTERS: &[(&str, &[&str])] = &[
    (
        "net",
        &[
            "bytes_sent",
            "bytes_recv",
            "packets_sent",
            "packets_recv",
            "err_in",
            "err_out",
            "drop_in",
            "drop_out",
        ],
    ),
    (
        "diskio",
        &[
            "reads",
            "writes",
            "read_bytes",
            "write_bytes",
            "read_time",
            "write_time",
            "io_time",
            "weighted_io_time",
            "merged_reads",
            "merged_writes",
        ],
    ),
    ("swap", &["in", "out"]),
];

/// How the agent delivers its batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeMode {
    /// The agent pushes to this collector URL; Pull is refused.
    Push {
        /// The collector's gRPC URL.
        collector: String,
    },
    /// Collectors pull with `MetricsSource.Pull`.
    Pull,
}

impl ServeMode {
    fn name(&self) -> &'static str {
        match self {
            ServeMode::Push { .. } => "push",
            ServeMode::Pull => "pull",
        }
    }
}

/// Pull activity, shown on `/health`.
#[derive(Debug, Default)]
struct PullCounters {
    pulls: AtomicU64,
    batches_served: AtomicU64,
    batches_acked: AtomicU64,
    last_pull_unix_nano: AtomicU64,
}

/// What the server shares with the rest of the agent. Cheap to clone.
#[derive(Clone)]
pub struct ServeState {
    /// The agent's id (as in every batch).
    pub agent_id: String,
    /// Push or pull.
    pub mode: ServeMode,
    /// The latest collection round, for `/metrics`; `None` until the first round.
    pub latest: LatestRound,
    /// The pending queue: Pull reads and acknowledges it; `/health` reports its length. `None`: Pull is refused.
    pub queue: Option<SharedQueue>,
    pulls: Arc<PullCounters>,
    /// The agent's counters: Pull keeps `pending`/`pending_bytes` current and counts `batches_sent`.
    counters: Option<Arc<Counters>>,
    /// What Pull and `/metrics` callers must present (`pull_token`); `None`: anyone may.
    pull_token: Option<Arc<str>>,
}

impl std::fmt::Debug for ServeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeState")
            .field("agent_id", &self.agent_id)
            .field("mode", &self.mode)
            .field("queue", &self.queue.is_some())
            .field("pull_token", &self.pull_token.is_some())
            .finish_non_exhaustive()
    }
}

impl ServeState {
    /// A state with no round yet.
    pub fn new(agent_id: String, mode: ServeMode, queue: Option<SharedQueue>) -> ServeState {
        ServeState {
            agent_id,
            mode,
            latest: Arc::default(),
            queue,
            pulls: Arc::default(),
            counters: None,
            pull_token: None,
        }
    }

    /// The same, with Pull and `/metrics` needing `token`.
    pub fn with_pull_token(self, token: Option<&str>) -> ServeState {
        ServeState {
            pull_token: token.map(|t| Arc::from(t.trim())),
            ..self
        }
    }

    /// Whether a caller whose `authorization` value is this may pull and read `/metrics`.
    fn authorized(&self, authorization: Option<&str>) -> bool {
        self.pull_token
            .as_deref()
            .is_none_or(|token| damselfly_proto::auth::bearer_matches(authorization, token))
    }

    /// The state of a running agent: its id, queue, latest round and counters; push mode when `collector` is set
    /// (Pull is then refused), pull mode otherwise.
    pub fn from_handles(handles: &AgentHandles, config: &AgentConfig) -> ServeState {
        let mode = match &config.collector {
            Some(collector) => ServeMode::Push {
                collector: collector.clone(),
            },
            None => ServeMode::Pull,
        };
        ServeState {
            agent_id: handles.agent_id.clone(),
            mode,
            latest: Arc::clone(&handles.latest),
            queue: Some(Arc::clone(&handles.queue)),
            pulls: Arc::default(),
            counters: Some(Arc::clone(&handles.counters)),
            pull_token: None,
        }
        .with_pull_token(config.pull_token.as_deref())
    }

    /// Publishes a collection round for `/metrics` (replacing the previous one).
    pub fn set_latest(&self, round: Round) {
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(round);
    }

    fn pending(&self) -> Option<usize> {
        self.queue.as_ref().map(|q| lock(q).len())
    }
}

fn unix_nano_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Spawns [`serve`] until `stop` turns true (or its sender is dropped); a server failure is logged.
pub fn spawn(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: ServeState,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let addr = listener.local_addr().ok();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let served = match tls {
            Some(acceptor) => match damselfly_proto::tls::TlsListener::new(listener, acceptor) {
                Ok(listener) => serve_on(listener, state, stopped).await,
                Err(e) => Err(e),
            },
            None => serve(listener, state, stopped).await,
        };
        match served {
            Ok(()) => tracing::debug!(?addr, "agent server stopped"),
            Err(e) => tracing::error!(?addr, error = %e, "agent server failed"),
        }
    })
}

/// Serves HTTP (`/metrics`, `/health`) and gRPC (`MetricsSource`) on `listener` until `shutdown` completes, then
/// stops accepting and gives open connections [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    state: ServeState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        // Small gRPC frames must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    serve_on(listener, state, shutdown).await
}

/// [`serve`] on any listener (plain TCP, or TLS sessions from [`damselfly_proto::tls::TlsListener`]).
async fn serve_on<L>(
    listener: L,
    state: ServeState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop_rx.await;
        })
        .into_future();
    let mut server = std::pin::pin!(server);
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        r = &mut server => return r,
        () = &mut shutdown => {}
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(
                "connections still open {SHUTDOWN_GRACE:?} after shutdown; closing them"
            );
            Ok(())
        }
    }
}

/// The router behind [`serve`]: HTTP routes, the gRPC service, and a JSON 404 for anything else.
pub fn router(state: ServeState) -> Router {
    let grpc = MetricsSourceServer::new(PullService {
        state: state.clone(),
    })
    .accept_compressed(CompressionEncoding::Zstd)
    .send_compressed(CompressionEncoding::Zstd)
    .max_decoding_message_size(64 << 10)
    .max_encoding_message_size(2 * MAX_PULL_RESPONSE_BYTES);
    let grpc_path = format!(
        "/{}/{{*rest}}",
        damselfly_proto::v1::metrics_source_server::SERVICE_NAME
    );
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(state)
        .route_service(&grpc_path, grpc)
        .fallback(not_found)
}

async fn not_found() -> Response {
    let body = serde_json::json!({ "error": "no such endpoint; try GET /metrics or GET /health" });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<ServeState>, headers: header::HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !state.authorized(authorization) {
        let body = serde_json::json!({
            "error": "this agent's /metrics needs its pull token: send `Authorization: Bearer <pull_token>`"
        });
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(body),
        )
            .into_response();
    }
    let pending = state.pending();
    let (mut text, last_round) = {
        let latest = state.latest.read().unwrap_or_else(|p| p.into_inner());
        (
            render_metrics(latest.as_ref()),
            latest.as_ref().and_then(last_round_unix_nano),
        )
    };
    if let Some(pending) = pending {
        family_header(
            &mut text,
            "damselfly_agent_pending_batches",
            "Batches waiting for the collector's acknowledgement",
            "gauge",
        );
        let _ = writeln!(text, "damselfly_agent_pending_batches {pending}");
    }
    if let Some(t) = last_round {
        family_header(
            &mut text,
            "damselfly_agent_last_round_timestamp_seconds",
            "Collection time of the points above (Unix seconds)",
            "gauge",
        );
        let _ = writeln!(
            text,
            "damselfly_agent_last_round_timestamp_seconds {}",
            format_f64(t as f64 / 1e9)
        );
    }
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], text).into_response()
}

async fn health(State(state): State<ServeState>) -> Response {
    let last_round = state
        .latest
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(last_round_unix_nano);
    let last_pull = state.pulls.last_pull_unix_nano.load(Relaxed);
    let body = serde_json::json!({
        "status": "ok",
        "agent_id": state.agent_id,
        "mode": state.mode.name(),
        "collector": match &state.mode {
            ServeMode::Push { collector } => Some(collector.as_str()),
            ServeMode::Pull => None,
        },
        "last_round_unix_nano": last_round,
        "pending_batches": state.pending(),
        "pulls": state.pulls.pulls.load(Relaxed),
        "batches_served": state.pulls.batches_served.load(Relaxed),
        "batches_acked": state.pulls.batches_acked.load(Relaxed),
        "last_pull_unix_nano": (last_pull > 0).then_some(last_pull),
    });
    axum::Json(body).into_response()
}

/// The newest point time of a round.
fn last_round_unix_nano(round: &Round) -> Option<i64> {
    round.points.iter().map(|p| p.time_unix_nano).max()
}

// ---------------------------------------------------------------------------------------------------------------
// Pull

/// `damselfly.v1.MetricsSource` over the shared queue.
#[derive(Debug, Clone)]
pub struct PullService {
    state: ServeState,
}

/// What one Pull did to the queue.
#[derive(Debug, Default, PartialEq)]
pub struct PullOutcome {
    /// Batches removed because the collector acknowledged them.
    pub acked: usize,
    /// The batches to send, oldest first.
    pub batches: Vec<WriteBatch>,
}

/// The Pull protocol on a queue: forgets every batch with `seq <= ack_through_seq`, then returns up to
/// `max_batches` of the following ones, oldest first, stopping before `max_bytes` (encoded) would be exceeded
/// (at least one batch is returned if any is held).
pub fn pull_from_queue(
    queue: &mut dyn BatchQueue,
    ack_through_seq: u64,
    max_batches: usize,
    max_bytes: usize,
) -> PullOutcome {
    let mut out = PullOutcome {
        acked: usize::try_from(queue.ack_through(ack_through_seq)).unwrap_or(usize::MAX),
        batches: Vec::new(),
    };
    let mut after = ack_through_seq;
    let mut bytes = 0usize;
    while out.batches.len() < max_batches {
        let Some(b) = queue.next_after(after) else {
            break;
        };
        let len = b.encoded_len();
        if !out.batches.is_empty() && bytes.saturating_add(len) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(len);
        after = b.seq;
        out.batches.push(b);
    }
    out
}

#[tonic::async_trait]
impl MetricsSource for PullService {
    async fn pull(
        &self,
        request: Request<PullRequest>,
    ) -> Result<tonic::Response<PullResponse>, Status> {
        let state = &self.state;
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !state.authorized(authorization) {
            return Err(Status::unauthenticated(
                "this agent's Pull needs its pull token: send `authorization: Bearer <pull_token>` (the \
                 collector's pull_token_file)",
            ));
        }
        if let ServeMode::Push { collector } = &state.mode {
            return Err(Status::failed_precondition(format!(
                "this agent pushes to {collector}; it does not serve Pull"
            )));
        }
        let Some(queue) = state.queue.clone() else {
            return Err(Status::failed_precondition(
                "this agent has no batch queue to serve",
            ));
        };
        let req = request.into_inner();
        let max_batches = match req.max_batches {
            0 => DEFAULT_PULL_BATCHES,
            n => (n as usize).min(MAX_PULL_BATCHES),
        };
        // The queue may be a disk spool: keep its I/O off the async threads.
        let counters = state.counters.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut q = lock(&queue);
            let outcome = pull_from_queue(
                &mut **q,
                req.ack_through_seq,
                max_batches,
                MAX_PULL_RESPONSE_BYTES,
            );
            if let Some(c) = counters {
                c.set_pending(q.len(), q.bytes());
                c.batches_sent
                    .fetch_add(outcome.batches.len() as u64, Relaxed);
            }
            outcome
        })
        .await
        .map_err(|e| Status::internal(format!("pull task failed: {e}")))?;
        let c = &state.pulls;
        c.pulls.fetch_add(1, Relaxed);
        c.batches_acked.fetch_add(outcome.acked as u64, Relaxed);
        c.batches_served
            .fetch_add(outcome.batches.len() as u64, Relaxed);
        c.last_pull_unix_nano.store(unix_nano_now(), Relaxed);
        tracing::debug!(
            ack_through_seq = req.ack_through_seq,
            acked = outcome.acked,
            served = outcome.batches.len(),
            "pull"
        );
        Ok(tonic::Response::new(PullResponse {
            agent_id: state.agent_id.clone(),
            batches: outcome.batches,
        }))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Prometheus text exposition

struct Family {
    help: String,
    kind: &'static str,
    samples: Vec<String>,
}

/// Whether `measurement.field` is a cumulative counter (see [`COUNTERS`]).
pub fn is_counter(measurement: &str, field: &str) -> bool {
    COUNTERS
        .iter()
        .any(|(m, fields)| *m == measurement && fields.contains(&field))
}

/// Renders a round in the Prometheus text format 0.0.4 (see the module docs). An absent round renders as nothing.
pub fn render_metrics(round: Option<&Round>) -> String {
    let mut out = String::new();
    let Some(round) = round else {
        return out;
    };
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    for point in &round.points {
        let labels = label_text(&round.common_tags, point);
        for f in &point.fields {
            let value = match &f.value {
                Some(field::Value::F64(v)) => format_f64(*v),
                Some(field::Value::I64(v)) => v.to_string(),
                Some(field::Value::U64(v)) => v.to_string(),
                Some(field::Value::Bool(v)) => u8::from(*v).to_string(),
                Some(field::Value::Str(_)) | None => continue,
            };
            let name = metric_name(&point.measurement, &f.key);
            let series = format!("{name}{labels}");
            // A scraper rejects a series twice in one exposition; keep the first.
            if !seen.insert(series.clone()) {
                continue;
            }
            let family = families.entry(name).or_insert_with(|| Family {
                help: format!("{}.{}", point.measurement, f.key),
                kind: if is_counter(&point.measurement, &f.key) {
                    "counter"
                } else {
                    "gauge"
                },
                samples: Vec::new(),
            });
            family.samples.push(format!("{series} {value}"));
        }
    }
    for (name, family) in &families {
        family_header(&mut out, name, &family.help, family.kind);
        for s in &family.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
    out
}

fn family_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `damselfly_<measurement>_<field>`, every character outside `[a-zA-Z0-9_:]` replaced by `_`.
pub fn metric_name(measurement: &str, field: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("damselfly_{}_{}", clean(measurement), clean(field))
}

/// A label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with the reserved `__`.
pub fn label_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    if name.starts_with("__") {
        name.insert_str(0, "tag");
    }
    name
}

/// A label value with `\`, `"` and newline escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `{k="v",...}` from the common tags and the point's tags (a point's own tag wins), sorted by name; empty when
/// there is no tag. Empty values are left out (to Prometheus an empty label is an absent one).
fn label_text(common: &[Tag], point: &Point) -> String {
    let mut labels: BTreeMap<String, &str> = BTreeMap::new();
    for t in common.iter().chain(&point.tags) {
        labels.insert(label_name(&t.key), &t.value);
    }
    labels.retain(|_, v| !v.is_empty());
    if labels.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
    out
}

/// A sample value: `NaN`, `+Inf`, `-Inf`, or the shortest decimal that reads back as the same `f64`.
pub fn format_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        // Debug is shortest round-trip and switches to exponent notation for very large or small values.
        format!("{v:?}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::queue::MemoryQueue;
    use damselfly_proto::v1::Field;
    use damselfly_proto::v1::metrics_source_client::MetricsSourceClient;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn tag(k: &str, v: &str) -> Tag {
        Tag {
            key: k.into(),
            value: v.into(),
        }
    }

    fn f(k: &str, v: field::Value) -> Field {
        Field {
            key: k.into(),
            value: Some(v),
        }
    }

    fn point(m: &str, tags: &[(&str, &str)], fields: Vec<Field>) -> Point {
        Point {
            measurement: m.into(),
            tags: tags.iter().map(|(k, v)| tag(k, v)).collect(),
            fields,
            time_unix_nano: 1_700_000_000_000_000_000,
        }
    }

    fn round() -> Round {
        Round {
            common_tags: vec![
                tag("agent_id", "a1"),
                tag("ns_id", "ns\"1\\\nx"),
                tag("csp", ""),
            ],
            points: vec![
                point(
                    "cpu",
                    &[("cpu", "cpu-total")],
                    vec![
                        f("usage_idle", field::Value::F64(97.5)),
                        f("usage_steal", field::Value::F64(f64::NAN)),
                        f("usage_guest", field::Value::F64(f64::INFINITY)),
                        f("usage_nice", field::Value::F64(f64::NEG_INFINITY)),
                    ],
                ),
                point(
                    "cpu",
                    &[("cpu", "cpu0")],
                    vec![f("usage_idle", field::Value::F64(1e-7))],
                ),
                point(
                    "net",
                    &[("interface", "eth0"), ("agent_id", "own")],
                    vec![
                        f("bytes_recv", field::Value::U64(u64::MAX)),
                        f("up", field::Value::Bool(true)),
                        f("name", field::Value::Str("eth0".into())),
                    ],
                ),
                point(
                    "my-meas.x",
                    &[("9 bad-key", "v"), ("__name__", "n")],
                    vec![f("field.with-dots", field::Value::I64(-3))],
                ),
            ],
        }
    }

    #[test]
    fn exposition_format() {
        let text = render_metrics(Some(&round()));
        let lines: Vec<&str> = text.lines().collect();
        // Escaped label values: backslash, quote, newline.
        let idle = lines
            .iter()
            .find(|l| l.starts_with("damselfly_cpu_usage_idle{") && l.contains("cpu-total"))
            .unwrap();
        assert_eq!(
            *idle,
            r#"damselfly_cpu_usage_idle{agent_id="a1",cpu="cpu-total",ns_id="ns\"1\\\nx"} 97.5"#
        );
        assert!(text.contains(
            r#"damselfly_cpu_usage_idle{agent_id="a1",cpu="cpu0",ns_id="ns\"1\\\nx"} 1e-7"#
        ));
        // Non-finite values per the spec.
        assert!(text.contains("damselfly_cpu_usage_steal{") && text.contains("} NaN\n"));
        assert!(text.contains("} +Inf\n") && text.contains("} -Inf\n"));
        // Counters vs gauges, one TYPE line per family, before its samples.
        assert!(text.contains("# TYPE damselfly_net_bytes_recv counter\n"));
        assert!(text.contains("# TYPE damselfly_cpu_usage_idle gauge\n"));
        assert!(text.contains("# TYPE damselfly_net_up gauge\n"));
        assert_eq!(text.matches("# TYPE damselfly_cpu_usage_idle ").count(), 1);
        let type_at = text.find("# TYPE damselfly_cpu_usage_idle").unwrap();
        let first_sample = text.find("damselfly_cpu_usage_idle{").unwrap();
        assert!(type_at < first_sample);
        // Integers exactly, bools as 0/1, strings skipped; the point's own tag wins over the common one.
        assert!(text.contains(&format!(
            r#"damselfly_net_bytes_recv{{agent_id="own",interface="eth0",ns_id="ns\"1\\\nx"}} {}"#,
            u64::MAX
        )));
        assert!(
            text.contains(
                r#"damselfly_net_up{agent_id="own",interface="eth0",ns_id="ns\"1\\\nx"} 1"#
            )
        );
        assert!(!text.contains("damselfly_net_name"));
        // Names sanitised; reserved and invalid label names renamed.
        assert!(text.contains(
            r#"damselfly_my_meas_x_field_with_dots{_9_bad_key="v",agent_id="a1",ns_id="ns\"1\\\nx",tag__name__="n"} -3"#
        ));
        assert!(text.ends_with('\n'));
        // Empty label values are left out.
        assert!(!text.contains("csp="));
        assert_eq!(render_metrics(None), "");
    }

    #[test]
    fn duplicate_series_are_dropped() {
        let mut r = round();
        r.points.push(r.points[0].clone());
        let text = render_metrics(Some(&r));
        assert_eq!(
            text.matches("damselfly_cpu_usage_idle{agent_id=\"a1\",cpu=\"cpu-total\"")
                .count(),
            1
        );
    }

    #[test]
    fn number_format() {
        assert_eq!(format_f64(0.0), "0.0");
        assert_eq!(format_f64(12.25), "12.25");
        assert_eq!(format_f64(1e300), "1e300");
        assert_eq!(format_f64(-2.5e-10), "-2.5e-10");
        assert_eq!(format_f64(f64::NAN), "NaN");
        assert_eq!(label_name(""), "_");
        assert_eq!(label_name("a.b"), "a_b");
        assert!(is_counter("swap", "in") && !is_counter("mem", "used"));
    }

    fn batch(seq: u64) -> WriteBatch {
        WriteBatch {
            chunks: Vec::new(),
            agent_id: "a1".into(),
            seq,
            common_tags: vec![tag("agent_id", "a1")],
            points: vec![point("mem", &[], vec![f("used", field::Value::U64(seq))])],
        }
    }

    fn seqs(batches: &[WriteBatch]) -> Vec<u64> {
        batches.iter().map(|b| b.seq).collect()
    }

    #[test]
    fn ack_protocol_on_a_queue() {
        let mut q = MemoryQueue::new(100);
        for s in 1..=10 {
            q.push(batch(s));
        }
        // First pull: nothing acknowledged, the oldest max_batches.
        let o = pull_from_queue(&mut q, 0, 4, usize::MAX);
        assert_eq!((o.acked, seqs(&o.batches)), (0, vec![1, 2, 3, 4]));
        // Ack through 3 removes 1..=3 and sends from 4.
        let o = pull_from_queue(&mut q, 3, 4, usize::MAX);
        assert_eq!((o.acked, seqs(&o.batches)), (3, vec![4, 5, 6, 7]));
        assert_eq!(q.len(), 7);
        // A collector that lost track (restart) sends 0: everything still held comes again.
        let o = pull_from_queue(&mut q, 0, 100, usize::MAX);
        assert_eq!((o.acked, seqs(&o.batches)), (0, (4..=10).collect()));
        // The byte bound stops early but always returns at least one batch.
        let one = batch(4).encoded_len();
        let o = pull_from_queue(&mut q, 0, 100, one * 2);
        assert_eq!(seqs(&o.batches), vec![4, 5]);
        let o = pull_from_queue(&mut q, 0, 100, 1);
        assert_eq!(seqs(&o.batches), vec![4]);
        // Ack past everything empties the queue.
        let o = pull_from_queue(&mut q, 10, 100, usize::MAX);
        assert_eq!((o.acked, o.batches.len()), (7, 0));
        assert!(q.is_empty());
        // Gaps (evicted batches) are fine: ack removes what is held up to it.
        for s in [20, 22, 25] {
            q.push(batch(s));
        }
        let o = pull_from_queue(&mut q, 23, 100, usize::MAX);
        assert_eq!((o.acked, seqs(&o.batches)), (2, vec![25]));
    }

    fn shared(capacity: usize, seqs: std::ops::RangeInclusive<u64>) -> SharedQueue {
        let mut q = MemoryQueue::new(capacity);
        for s in seqs {
            q.push(batch(s));
        }
        Arc::new(Mutex::new(Box::new(q)))
    }

    async fn start(state: ServeState) -> (String, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, state, async move {
            let _ = rx.await;
        }));
        (addr.to_string(), tx)
    }

    async fn client(addr: &str) -> MetricsSourceClient<tonic::transport::Channel> {
        MetricsSourceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd)
    }

    async fn http_get(addr: &str, path: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn pull_over_grpc_acks_and_limits() {
        let queue = shared(100, 1..=100);
        let state = ServeState::new("a1".into(), ServeMode::Pull, Some(queue.clone()));
        let (addr, _stop) = start(state).await;
        let mut c = client(&addr).await;
        let r = c
            .pull(PullRequest {
                ack_through_seq: 0,
                max_batches: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.agent_id, "a1");
        assert_eq!(seqs(&r.batches), (1..=64).collect::<Vec<_>>());
        assert_eq!(r.batches[0], batch(1));
        let r = c
            .pull(PullRequest {
                ack_through_seq: 64,
                max_batches: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(seqs(&r.batches), (65..=74).collect::<Vec<_>>());
        assert_eq!(lock(&queue).len(), 36);
        // Lost track: ack 0 resends what is held, nothing removed.
        let r = c
            .pull(PullRequest {
                ack_through_seq: 0,
                max_batches: 3,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(seqs(&r.batches), vec![65, 66, 67]);
        let r = c
            .pull(PullRequest {
                ack_through_seq: 100,
                max_batches: 3,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.batches.is_empty());
        assert!(lock(&queue).is_empty());
    }

    #[tokio::test]
    async fn push_mode_refuses_pull() {
        let state = ServeState::new(
            "a1".into(),
            ServeMode::Push {
                collector: "http://c:4317".into(),
            },
            Some(shared(10, 1..=3)),
        );
        let (addr, _stop) = start(state).await;
        let err = client(&addr)
            .await
            .pull(PullRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("http://c:4317"), "{err}");
    }

    #[tokio::test]
    async fn http_endpoints_share_the_port() {
        let state = ServeState::new("a1".into(), ServeMode::Pull, Some(shared(10, 1..=3)));
        let (addr, stop) = start(state.clone()).await;
        let (head, body) = http_get(&addr, "/health").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(h["agent_id"], "a1");
        assert_eq!(h["mode"], "pull");
        assert_eq!(h["pending_batches"], 3);
        assert!(h["last_round_unix_nano"].is_null());

        state.set_latest(round());
        let (head, body) = http_get(&addr, "/metrics").await;
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(body.contains("damselfly_cpu_usage_idle{"), "{body}");
        assert!(
            body.contains("damselfly_agent_pending_batches 3\n"),
            "{body}"
        );
        assert!(body.contains("damselfly_agent_last_round_timestamp_seconds 1700000000.0\n"));
        let (_, body) = http_get(&addr, "/health").await;
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(h["last_round_unix_nano"], 1_700_000_000_000_000_000_i64);

        let (head, _) = http_get(&addr, "/nope").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");

        // gRPC on the same port still works, and shutdown ends the server even with the channel open.
        let mut c = client(&addr).await;
        assert_eq!(
            c.pull(PullRequest::default())
                .await
                .unwrap()
                .into_inner()
                .batches
                .len(),
            3
        );
        drop(stop);
        tokio::time::sleep(SHUTDOWN_GRACE + Duration::from_millis(500)).await;
        assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    }
}
