//! Registration and heartbeats (`damselfly.v1.Agents`): the agent tells the collector who it is, then keeps
//! telling it that it is alive and how full its queue is.
//!
//! [`run`] registers (retrying with exponential backoff and jitter until it works: it never gives up and never
//! fails the agent), then sends a heartbeat every `heartbeat_interval_ms` of the collector's answer, with the
//! queue counters of the `status` callback and the uptime since [`run`] started. When a heartbeat answers
//! `registered = false` (the collector lost its registry, or is another collector) it registers again. A collector
//! that refuses the registration as invalid is logged as an error and asked again slowly, every
//! [`RegisterSettings::refused_retry`], in case its limits change. It returns as soon as `shutdown` completes.
//! [`run_following`] does the same with the shard the push task currently pushes to (a [`watch`] of its URL):
//! when the agent moves to another shard it registers there and sends its heartbeats there.
//!
//! Wiring it into the agent is one spawned call:
//!
//! ```ignore
//! let request = register::request(agent_id, common_tags(&config), AgentMode::Push, String::new(), config.interval);
//! tokio::spawn(register::run(config.collector.clone(), request, move || status_of(&counters), shutdown));
//! ```

use std::future::Future;
use std::time::Duration;

use damselfly_proto::v1::agents_client::AgentsClient;
use damselfly_proto::v1::{AgentMode, HeartbeatRequest, HostFacts, RegisterRequest, Tag};
use rand::RngExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// The collector refuses host-fact strings longer than this (bytes); longer ones are cut.
pub const MAX_FACT_BYTES: usize = 256;

/// The queue counters a heartbeat reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Batches waiting in the queue or spool (not yet acknowledged).
    pub pending_batches: u64,
    /// Their size in bytes.
    pub pending_bytes: u64,
    /// Batches dropped since the agent started (queue or spool full).
    pub dropped_batches: u64,
}

/// Timeouts and retry delays of [`run_with`].
#[derive(Debug, Clone)]
pub struct RegisterSettings {
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for one `Register` or `Heartbeat` call.
    pub request_timeout: Duration,
    /// First delay after a failed registration; doubles per failure (with jitter) up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest delay between registration attempts while the collector is unreachable.
    pub backoff_max: Duration,
    /// Delay before asking again after the collector refused the registration (invalid, registry full, no
    /// `Agents` service).
    pub refused_retry: Duration,
    /// Heartbeat interval when the collector's answer says 0.
    pub default_heartbeat: Duration,
    /// Bounds of the heartbeat interval the collector may ask for.
    pub min_heartbeat: Duration,
    pub max_heartbeat: Duration,
    /// The agent token sent with each call ([`crate::credentials`]).
    pub token: Option<String>,
    /// TLS for an `https://` collector ([`crate::credentials::client_tls`]).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for RegisterSettings {
    /// Connect 5 s, request 10 s, backoff 500 ms to 60 s, refused 5 min, heartbeats 10 s by default and between
    /// 100 ms and 1 h.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            refused_retry: Duration::from_secs(300),
            default_heartbeat: Duration::from_secs(10),
            min_heartbeat: Duration::from_millis(100),
            max_heartbeat: Duration::from_secs(3600),
            token: None,
            tls: None,
        }
    }
}

impl RegisterSettings {
    /// The heartbeat interval for the collector's `heartbeat_interval_ms`.
    pub fn heartbeat_interval(&self, heartbeat_interval_ms: u64) -> Duration {
        if heartbeat_interval_ms == 0 {
            return self.default_heartbeat;
        }
        Duration::from_millis(heartbeat_interval_ms).clamp(self.min_heartbeat, self.max_heartbeat)
    }
}

/// What this host is ([`crate::probes::host_facts`]) as the wire's `HostFacts`, strings cut to
/// [`MAX_FACT_BYTES`]. Blocking but quick (reads a few `/proc` files).
pub fn host_facts() -> HostFacts {
    let f = crate::probes::host_facts();
    let mut facts = HostFacts {
        vcpus: f.vcpus,
        memory_bytes: f.memory_bytes,
        os_name: f.os_name,
        os_version: f.os_version,
        kernel_version: f.kernel_version,
        cpu_model: f.cpu_model,
        arch: f.arch,
        agent_version: f.agent_version,
    };
    for s in [
        &mut facts.os_name,
        &mut facts.os_version,
        &mut facts.kernel_version,
        &mut facts.cpu_model,
        &mut facts.arch,
        &mut facts.agent_version,
    ] {
        truncate(s, MAX_FACT_BYTES);
    }
    facts
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A registration with this host's facts ([`host_facts`]). `identity` is the agent's identity tags (as in its
/// batches' `common_tags`); `listen_addr` is required in pull mode (`host:port` as the collector reaches it) and
/// empty in push mode.
pub fn request(
    agent_id: String,
    identity: Vec<Tag>,
    mode: AgentMode,
    listen_addr: String,
    interval_secs: u64,
) -> RegisterRequest {
    RegisterRequest {
        agent_id,
        identity,
        facts: Some(host_facts()),
        mode: mode as i32,
        listen_addr,
        interval_secs,
    }
}

/// Registers with the collector at `collector_url` (`http://host:port`, its gRPC address) and sends heartbeats
/// until `shutdown` completes. Never fails: network trouble and refusals are logged and retried.
pub async fn run(
    collector_url: String,
    request: RegisterRequest,
    status: impl Fn() -> AgentStatus + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send,
) {
    run_with(
        RegisterSettings::default(),
        collector_url,
        request,
        status,
        shutdown,
    )
    .await;
}

/// [`run`] with explicit timeouts and delays.
pub async fn run_with(
    settings: RegisterSettings,
    collector_url: String,
    request: RegisterRequest,
    status: impl Fn() -> AgentStatus + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send,
) {
    // A sender that is gone leaves the receiver on its last value: one collector for good.
    let (_, collector) = watch::channel(collector_url);
    run_following(settings, collector, request, status, shutdown).await;
}

/// [`run_with`] for a sharded collector: registers with the shard whose gRPC URL `collector` holds (the one the
/// push task pushes to) and, whenever it changes, registers with the new one and sends the heartbeats there.
pub async fn run_following(
    settings: RegisterSettings,
    collector: watch::Receiver<String>,
    request: RegisterRequest,
    status: impl Fn() -> AgentStatus + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send,
) {
    run_following_with(settings, collector, request, status, None, shutdown).await;
}

/// [`run_following`] that also carries benchmark runs: the heartbeats report `control`'s progress and hand it the
/// commands of the answers.
pub async fn run_following_with(
    settings: RegisterSettings,
    mut collector: watch::Receiver<String>,
    request: RegisterRequest,
    status: impl Fn() -> AgentStatus + Send + Sync + 'static,
    control: Option<std::sync::Arc<crate::control::BenchControl>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let started = Instant::now();
    let beat = async {
        loop {
            let url = collector.borrow_and_update().clone();
            let changed = async {
                if collector.changed().await.is_err() {
                    // No sender (one collector for good, or the push task is gone): stay where we are.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = register_and_beat(&settings, url, &request, &status, control.as_deref(), started) => {}
                () = changed => {}
            }
        }
    };
    tokio::select! {
        biased;
        () = shutdown => {}
        () = beat => {}
    }
}

/// Exponential backoff with "equal jitter": uniformly random in [d/2, d], d doubling per failure up to the maximum,
/// so agents that lost the same collector do not come back in lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Whether a refusal will not go away by asking again soon.
fn refused(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::Unimplemented
            | Code::PermissionDenied
            | Code::Unauthenticated
    )
}

/// Never returns; [`run_following`] drops it on shutdown or when the agent moves to another shard. `started` is
/// when the agent started (for the uptime).
async fn register_and_beat(
    settings: &RegisterSettings,
    collector_url: String,
    request: &RegisterRequest,
    status: &impl Fn() -> AgentStatus,
    control: Option<&crate::control::BenchControl>,
    started: Instant,
) {
    let agent_id = request.agent_id.clone();
    let endpoint = Endpoint::from_shared(collector_url.clone()).and_then(|e| {
        match settings
            .tls
            .as_ref()
            .filter(|_| collector_url.starts_with("https://"))
        {
            Some(tls) => e.tls_config(tls.clone()),
            None => Ok(e),
        }
    });
    let endpoint = match endpoint {
        Ok(e) => e
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .tcp_nodelay(true),
        Err(e) => {
            tracing::error!(collector = %collector_url, error = %e, "invalid collector URL; the agent will not register");
            return std::future::pending().await;
        }
    };
    // A lazy channel connects on first use and reconnects after failures by itself.
    let mut client: AgentsClient<Channel> = AgentsClient::new(endpoint.connect_lazy());
    let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
    loop {
        let mut attempt = 0u64;
        let interval = loop {
            attempt += 1;
            let token = settings.token.as_deref();
            let call = crate::credentials::authorized(request.clone(), token);
            let delay = match client.register(call).await {
                Ok(response) => {
                    backoff.reset();
                    break settings.heartbeat_interval(response.into_inner().heartbeat_interval_ms);
                }
                Err(s) if refused(s.code()) => {
                    let delay = settings.refused_retry;
                    if s.code() == Code::InvalidArgument {
                        tracing::error!(%agent_id, collector = %collector_url, reason = s.message(), retry_in = ?delay,
                            "the collector refused this agent's registration as invalid; fix the agent's configuration");
                    } else {
                        tracing::warn!(%agent_id, collector = %collector_url, code = ?s.code(), reason = s.message(),
                            retry_in = ?delay, "the collector refused this agent's registration");
                    }
                    delay
                }
                Err(s) => {
                    let delay = backoff.next_delay();
                    // The push path already says when the collector is unreachable; do not repeat it every time.
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(%agent_id, collector = %collector_url, code = ?s.code(), reason = s.message(),
                            attempt, retry_in = ?delay, "cannot register with the collector");
                    } else {
                        tracing::debug!(%agent_id, code = ?s.code(), reason = s.message(), attempt, retry_in = ?delay,
                            "cannot register with the collector");
                    }
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        };
        tracing::info!(%agent_id, collector = %collector_url, heartbeat_interval = ?interval, "registered with the collector");

        let mut failures = 0u64;
        let mut next = Instant::now() + interval;
        loop {
            tokio::time::sleep_until(next).await;
            // After a stall (suspended VM), resume the rhythm instead of sending a burst.
            next = (next + interval).max(Instant::now());
            let s = status();
            let heartbeat = HeartbeatRequest {
                agent_id: agent_id.clone(),
                pending_batches: s.pending_batches,
                pending_bytes: s.pending_bytes,
                dropped_batches: s.dropped_batches,
                uptime_secs: started.elapsed().as_secs(),
                bench: control.map(|c| c.report()).unwrap_or_default(),
            };
            let heartbeat = crate::credentials::authorized(heartbeat, settings.token.as_deref());
            match client.heartbeat(heartbeat).await {
                Ok(response) if response.get_ref().registered => {
                    if let Some(control) = control {
                        control.deliver(response.into_inner().bench);
                    }
                    if failures > 0 {
                        tracing::info!(%agent_id, failures, "heartbeats reach the collector again");
                    }
                    failures = 0;
                }
                Ok(_) => {
                    tracing::info!(%agent_id, "the collector does not know this agent; registering again");
                    break;
                }
                Err(s) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(%agent_id, collector = %collector_url, code = ?s.code(), reason = s.message(),
                            "heartbeat failed; still trying");
                    } else {
                        tracing::debug!(%agent_id, code = ?s.code(), reason = s.message(), failures, "heartbeat failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use damselfly_proto::v1::agents_server::{Agents, AgentsServer};
    use damselfly_proto::v1::{HeartbeatResponse, RegisterResponse};
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use super::*;

    /// A scripted `Agents` server: the n-th register call answers `registers[n]` (then Ok), the n-th heartbeat
    /// `heartbeats[n]` (then registered = true).
    #[derive(Default)]
    struct Script {
        registers: Vec<Result<(), Code>>,
        heartbeats: Vec<bool>,
        register_calls: Vec<RegisterRequest>,
        heartbeat_calls: Vec<HeartbeatRequest>,
        /// Each call, in order: 'R' or 'H'.
        order: String,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Script>>);

    #[tonic::async_trait]
    impl Agents for Fake {
        async fn register(
            &self,
            request: Request<RegisterRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            let mut s = self.0.lock().unwrap();
            let n = s.register_calls.len();
            s.register_calls.push(request.into_inner());
            s.order.push('R');
            match s.registers.get(n).copied().unwrap_or(Ok(())) {
                Ok(()) => Ok(Response::new(RegisterResponse {
                    heartbeat_interval_ms: 20,
                })),
                Err(code) => Err(Status::new(code, "scripted failure")),
            }
        }

        async fn heartbeat(
            &self,
            request: Request<HeartbeatRequest>,
        ) -> Result<Response<HeartbeatResponse>, Status> {
            let mut s = self.0.lock().unwrap();
            let n = s.heartbeat_calls.len();
            s.heartbeat_calls.push(request.into_inner());
            s.order.push('H');
            let registered = s.heartbeats.get(n).copied().unwrap_or(true);
            Ok(Response::new(HeartbeatResponse {
                registered,
                ..HeartbeatResponse::default()
            }))
        }
    }

    async fn serve(fake: Fake) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentsServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn fast() -> RegisterSettings {
        RegisterSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            refused_retry: Duration::from_millis(30),
            min_heartbeat: Duration::from_millis(20),
            ..RegisterSettings::default()
        }
    }

    fn sample_request() -> RegisterRequest {
        request(
            "agent-1".into(),
            vec![Tag {
                key: "csp".into(),
                value: "aws".into(),
            }],
            AgentMode::Push,
            String::new(),
            10,
        )
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn registers_beats_and_registers_again() {
        let fake = Fake::default();
        {
            let mut s = fake.0.lock().unwrap();
            s.registers = vec![Err(Code::InvalidArgument), Err(Code::Unavailable), Ok(())];
            s.heartbeats = vec![true, true, false];
        }
        let url = serve(fake.clone()).await;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(
            fast(),
            url,
            sample_request(),
            || AgentStatus {
                pending_batches: 7,
                pending_bytes: 7000,
                dropped_batches: 2,
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        wait_for("a re-registration and two more heartbeats", || {
            let s = fake.0.lock().unwrap();
            s.register_calls.len() >= 4 && s.heartbeat_calls.len() >= 5
        })
        .await;
        let stopped = Instant::now();
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("run returns promptly on shutdown")
            .unwrap();
        assert!(stopped.elapsed() < Duration::from_millis(500));

        let s = fake.0.lock().unwrap();
        // Refused, unavailable, accepted; three heartbeats, the third says "unknown"; registered again.
        assert!(s.order.starts_with("RRRHHHRHH"), "{}", s.order);
        let r = &s.register_calls[0];
        assert_eq!(r.agent_id, "agent-1");
        assert_eq!(r.mode, AgentMode::Push as i32);
        assert_eq!(r.identity[0].value, "aws");
        let facts = r.facts.as_ref().unwrap();
        assert_eq!(facts.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(facts.vcpus >= 1, "{facts:?}");
        assert!(!facts.arch.is_empty(), "{facts:?}");
        let h = &s.heartbeat_calls[0];
        assert_eq!(h.agent_id, "agent-1");
        assert_eq!(
            (h.pending_batches, h.pending_bytes, h.dropped_batches),
            (7, 7000, 2)
        );
        assert!(h.uptime_secs < 10);
    }

    /// When the push task moves to another shard, registration and heartbeats move with it.
    #[tokio::test]
    async fn follows_the_shard_the_agent_pushes_to() {
        let (first, second) = (Fake::default(), Fake::default());
        let first_url = serve(first.clone()).await;
        let second_url = serve(second.clone()).await;
        let (url_tx, url_rx) = watch::channel(first_url);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run_following(
            fast(),
            url_rx,
            sample_request(),
            AgentStatus::default,
            async {
                let _ = stop_rx.await;
            },
        ));
        wait_for("heartbeats to the first shard", || {
            first.0.lock().unwrap().heartbeat_calls.len() >= 2
        })
        .await;
        url_tx.send(second_url).unwrap();
        wait_for("heartbeats to the second shard", || {
            second.0.lock().unwrap().heartbeat_calls.len() >= 2
        })
        .await;
        let beats_before = first.0.lock().unwrap().heartbeat_calls.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            first.0.lock().unwrap().heartbeat_calls.len(),
            beats_before,
            "the first shard hears no more"
        );
        assert!(second.0.lock().unwrap().order.starts_with("RH"));
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("run returns promptly on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn keeps_trying_an_unreachable_collector_and_stops_promptly() {
        // A port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(
            fast(),
            format!("http://127.0.0.1:{port}"),
            sample_request(),
            AgentStatus::default,
            async {
                let _ = stop_rx.await;
            },
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "it never gives up");
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("run returns promptly on shutdown")
            .unwrap();
    }

    #[test]
    fn heartbeat_interval_is_bounded() {
        let s = RegisterSettings::default();
        assert_eq!(s.heartbeat_interval(0), Duration::from_secs(10));
        assert_eq!(s.heartbeat_interval(1), Duration::from_millis(100));
        assert_eq!(s.heartbeat_interval(2_000), Duration::from_secs(2));
        assert_eq!(s.heartbeat_interval(u64::MAX), Duration::from_secs(3600));
        let mut long = "é".repeat(200);
        truncate(&mut long, MAX_FACT_BYTES);
        assert_eq!(long.len(), MAX_FACT_BYTES);
    }
}
