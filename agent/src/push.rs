//! The push path: one bidirectional `Push` stream at a time to a collector shard, with the delivery contract of
//! `ingest.proto`.
//!
//! The collection loop puts batches into the shared queue ([`SharedQueue`], memory or disk spool) and wakes the
//! push task through a [`Notify`]. Every batch stays in the queue until its ack says STORED or DUPLICATE (or
//! REJECTED: logged, counted and dropped, since resending cannot help). Up to `max_in_flight` batches are on the
//! stream at once, oldest first; acks arrive in send order. Every new stream re-sends every pending batch in seq
//! order: after an outage the spool is replayed in order, with the batches' original timestamps. That may send a
//! batch the collector already stored (its ack was lost): the collector answers DUPLICATE, so nothing is stored
//! twice. Network errors are never fatal.
//!
//! Shards. The configured `collector` URL is a seed: the first stream goes there, and the agent asks the shard it
//! is connected to for the shard map (`Shards.GetShardMap`) on the first connection, every `map_refresh` (60 s) and
//! after a redirect to a shard the map does not list; when that fails it keeps the last map (or the seed alone).
//! * With at most one shard in the map (or a collector without `Shards`) the agent behaves as a single-collector
//!   agent: it pushes to the seed; on RETRY, a broken stream, an ack timeout or a failed connection it drops the
//!   stream and reconnects after an exponential backoff with jitter (at least `retry_after_ms` for RETRY).
//! * With several shards it pushes to the first shard of `damselfly_proto::shards::rank(agent_id, ids)` that is
//!   not marked down, and stays there until something moves it. A shard whose connection or stream fails (connect
//!   error, broken stream, ack timeout) is marked down for a per-shard backoff (`shard_backoff_initial` doubling
//!   to `shard_backoff_max`, with jitter; reset once the shard answers an ack) and the agent moves at once to the
//!   next shard that is not down; only when every shard is down does it wait, until the earliest mark expires. The
//!   ids of the shards marked down go with every stream in the `damselfly-unreachable-shards` metadata, so that a
//!   fallback shard accepts the agent while its owner is down.
//! * A REDIRECT ack (this shard does not own the agent) stops new sends on the stream; the agent waits for the acks
//!   of the batches already in flight there (STORED, DUPLICATE and REJECTED ones leave the queue; REDIRECT and
//!   RETRY ones stay pending), then ends the stream and connects to the shard the redirect names. A batch is thus
//!   never in flight on two shards at once. After more than [`MAX_REDIRECT_HOPS`] redirects in a row without a
//!   stored batch the agent backs off before following the next one (shards that disagree must not make it spin).
//! * Return home: while the agent is on a fallback, the moment the down mark of a better-ranked shard expires it
//!   ends the stream the same graceful way and tries that shard again.
//! * A RETRY ack keeps the agent on its shard, after the backoff as above.
//!
//! Each change of shard is counted (`shard_switches`) and logged with its reason, and the shard's URL is published
//! on a [`watch`] channel ([`Pusher::target`]) so that registration and heartbeats follow it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use damselfly_proto::v1::shards_client::ShardsClient;
use damselfly_proto::v1::{
    Ack, AckStatus, ShardMap, ShardMapRequest, WriteBatch, ingest_client::IngestClient,
};
use rand::RngExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentConfig;
use crate::queue::{SharedQueue, lock};
use crate::stats::{Counters, inc};

/// Request metadata of the `Push` call: the ids of the shards the agent could not reach, comma separated.
pub const UNREACHABLE_SHARDS_HEADER: &str = "damselfly-unreachable-shards";

/// Redirects in a row (without a stored batch in between) that the agent follows at once; after that it backs off
/// before each one.
pub const MAX_REDIRECT_HOPS: u32 = 4;

/// How the push task talks to the collector.
#[derive(Debug, Clone)]
pub struct PushSettings {
    /// Collector URL, `http://host:port`: the only collector, or the seed shard of a sharded collector.
    pub collector: String,
    /// The agent's id, which ranks the shards (the same as in its batches).
    pub agent_id: String,
    /// Most unacknowledged batches on the stream.
    pub max_in_flight: usize,
    /// Limit for establishing a TCP + HTTP/2 connection (and for a shard map request).
    pub connect_timeout: Duration,
    /// A stream whose oldest in-flight batch got no ack for this long is considered dead.
    pub ack_timeout: Duration,
    /// First reconnect delay (single collector, RETRY); doubles per consecutive failure.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long a shard that failed is first marked down; doubles per consecutive failure of that shard.
    pub shard_backoff_initial: Duration,
    /// Longest down mark.
    pub shard_backoff_max: Duration,
    /// How often the shard map is fetched again.
    pub map_refresh: Duration,
    /// The agent token sent with each call ([`crate::credentials`]).
    pub token: Option<String>,
    /// TLS for `https://` shards ([`crate::credentials::client_tls`]).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl PushSettings {
    /// Settings for pushing to `collector` with the agent config's id and limits and the default timeouts (connect
    /// 5 s, ack 30 s, backoff 100 ms to 30 s, shard down marks 1 s to 30 s, shard map every 60 s).
    pub fn new(collector: String, config: &AgentConfig) -> Self {
        Self {
            collector,
            agent_id: config.effective_agent_id(),
            max_in_flight: config.max_in_flight,
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            shard_backoff_initial: Duration::from_secs(1),
            shard_backoff_max: Duration::from_secs(30),
            map_refresh: Duration::from_secs(60),
            token: config.token.clone(),
            // Checked when the config was validated; a file gone since fails the connection, which is logged.
            tls: crate::credentials::client_tls(config).ok().flatten(),
        }
    }
}

/// Exponential backoff with "equal jitter": the delay is uniformly random in [d/2, d], where d doubles per
/// failure up to the maximum, so many agents that lost the same collector do not reconnect in lockstep.
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

/// Where a stream goes: a shard of the map (with its id) or the seed URL (no id until the map names it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    id: Option<String>,
    url: String,
}

impl Target {
    /// The shard id, or the URL for the seed.
    fn label(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.url)
    }
}

/// A shard's failures: it is down until `down_until`; `backoff` sets the next mark's length.
#[derive(Debug)]
struct Health {
    backoff: Backoff,
    /// `Some` from a failure until the shard answers an ack again; in the past once the mark expired.
    down_until: Option<Instant>,
}

/// What the agent knows about the collector's shards.
#[derive(Debug, Default)]
struct ShardView {
    /// Shard id → gRPC URL: the last shard map, plus shards named by redirects since.
    known: BTreeMap<String, String>,
    /// The last map's version.
    version: u64,
    /// Failures by shard id.
    health: HashMap<String, Health>,
    /// When the map was last asked for over a live connection; `None`: never.
    fetched_at: Option<Instant>,
    /// A redirect named a shard the map does not list: ask again at the next connection.
    stale: bool,
}

impl ShardView {
    /// Whether the agent chooses among shards; otherwise it talks to the seed as to a single collector.
    fn sharded(&self) -> bool {
        self.known.len() >= 2
    }

    fn is_down(&self, id: &str, now: Instant) -> bool {
        self.health
            .get(id)
            .and_then(|h| h.down_until)
            .is_some_and(|t| t > now)
    }

    /// Known shard ids in preference order for `agent_id`.
    fn ranking<'a>(&'a self, agent_id: &str) -> Vec<&'a str> {
        damselfly_proto::shards::rank(agent_id, self.known.keys().map(String::as_str))
    }

    fn target(&self, id: &str) -> Option<Target> {
        self.known.get(id).map(|url| Target {
            id: Some(id.to_owned()),
            url: url.clone(),
        })
    }

    /// The first shard in the ranking that is not down.
    fn pick(&self, agent_id: &str, now: Instant) -> Option<Target> {
        self.ranking(agent_id)
            .into_iter()
            .find(|id| !self.is_down(id, now))
            .and_then(|id| self.target(id))
    }

    /// The shards ranked before `id` (all of them if `id` is not ranked).
    fn better_than<'a>(&'a self, agent_id: &str, id: &str) -> Vec<&'a str> {
        self.ranking(agent_id)
            .into_iter()
            .take_while(|s| *s != id)
            .collect()
    }

    /// Whether a shard ranked before `id` had a down mark that has expired: time to try it again.
    fn home_due(&self, agent_id: &str, id: &str, now: Instant) -> bool {
        self.better_than(agent_id, id).into_iter().any(|s| {
            self.health
                .get(s)
                .and_then(|h| h.down_until)
                .is_some_and(|t| t <= now)
        })
    }

    /// When the first down mark of a shard ranked before `id` expires.
    fn home_at(&self, agent_id: &str, id: &str, now: Instant) -> Option<Instant> {
        self.better_than(agent_id, id)
            .into_iter()
            .filter_map(|s| self.health.get(s).and_then(|h| h.down_until))
            .filter(|t| *t > now)
            .min()
    }

    /// When the first down mark of a known shard expires.
    fn earliest_expiry(&self, now: Instant) -> Option<Instant> {
        self.known
            .keys()
            .filter_map(|s| self.health.get(s).and_then(|h| h.down_until))
            .filter(|t| *t > now)
            .min()
    }

    /// Ids of the known shards marked down, except `except`, in the agent's preference order.
    fn down_ids(&self, agent_id: &str, except: Option<&str>, now: Instant) -> Vec<String> {
        self.ranking(agent_id)
            .into_iter()
            .filter(|s| Some(*s) != except && self.is_down(s, now))
            .map(str::to_owned)
            .collect()
    }

    /// Marks `id` down for its next backoff; returns the length of the mark.
    fn mark_down(&mut self, id: &str, settings: &PushSettings, now: Instant) -> Duration {
        let h = self.health.entry(id.to_owned()).or_insert_with(|| Health {
            backoff: Backoff::new(settings.shard_backoff_initial, settings.shard_backoff_max),
            down_until: None,
        });
        let d = h.backoff.next_delay();
        h.down_until = Some(now + d);
        d
    }

    /// `id` answered an ack: it is up, and its next failure starts the backoff again.
    fn answered(&mut self, id: &str) {
        if let Some(h) = self.health.get_mut(id) {
            h.down_until = None;
            h.backoff.reset();
        }
    }

    /// Lifts every down mark (the backoffs stay): one more round over the shards at shutdown.
    fn lift_marks(&mut self) {
        for h in self.health.values_mut() {
            h.down_until = None;
        }
    }

    /// Whether the map should be asked for on a connection made now.
    fn due(&self, now: Instant, refresh: Duration) -> bool {
        self.stale || self.fetched_at.is_none_or(|t| now >= t + refresh)
    }

    /// Takes the answer of a map request; a failure keeps the last map.
    fn fetched(&mut self, result: Result<ShardMap, String>, from: &Target, now: Instant) {
        self.fetched_at = Some(now);
        self.stale = false;
        let map = match result {
            Ok(map) => map,
            Err(reason) => {
                tracing::debug!(shard = from.label(), %reason, known = self.known.len(), "no shard map; keeping the last one");
                return;
            }
        };
        // Only usable entries: an id to rank and a URL to connect to.
        let known: BTreeMap<String, String> = map
            .shards
            .into_iter()
            .filter(|s| !s.id.is_empty() && !s.grpc_url.is_empty())
            .map(|s| (s.id, s.grpc_url))
            .collect();
        if known != self.known || map.version != self.version {
            tracing::info!(
                from = from.label(),
                self_id = %map.self_id,
                version = map.version,
                shards = ?known.keys().collect::<Vec<_>>(),
                "shard map"
            );
        }
        self.known = known;
        self.version = map.version;
    }
}

/// What the session learned from a new shard map about the shard it is connected to.
enum Verdict {
    /// Stay.
    Keep,
    /// Stay: the map names this URL as the shard to use (the seed gets its id).
    Adopt(Target),
    /// Go to the shard the ranking says.
    Leave,
}

/// Why a stream ended.
#[derive(Debug)]
enum SessionEnd {
    /// Input closed and every batch acknowledged: the push task is done.
    Drained,
    /// The collector asked to resend later.
    Retry { after: Duration, message: String },
    /// Connection, stream or protocol failure.
    Failed(String),
    /// Ended on purpose once nothing was in flight any more (redirect, return home, shard map).
    Switch { reason: &'static str },
}

/// What one ack means for the stream.
enum AckOutcome {
    /// Carry on.
    Next,
    /// This shard does not own the agent; this one does.
    Redirect(Target),
    /// End the stream.
    End(SessionEnd),
}

/// A shard map request running beside a stream.
type MapFetch = Pin<Box<dyn Future<Output = Result<ShardMap, String>> + Send>>;

/// Asks `channel`'s shard for the shard map, within `timeout`.
async fn fetch_map(
    channel: Channel,
    timeout: Duration,
    token: Option<String>,
) -> Result<ShardMap, String> {
    let mut client = ShardsClient::new(channel);
    let request = crate::credentials::authorized(ShardMapRequest {}, token.as_deref());
    match tokio::time::timeout(timeout, client.get_shard_map(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status_text(&status)),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// What the push task waits on besides the network: new batches, and the end of collection.
struct Input {
    /// Notified by the collection loop after it put batches into the queue.
    wake: Arc<Notify>,
    /// Becomes true when the agent shuts down (no more batches will come).
    stop: watch::Receiver<bool>,
    /// The stop signal was seen: deliver what is left, then return.
    closing: bool,
}

impl Input {
    /// Completes when a batch may have arrived or shutdown began. When closing, only new batches wake it (there
    /// are none after shutdown), so callers check `closing` before waiting on nothing.
    async fn changed(&mut self) {
        tokio::select! {
            () = self.wake.notified() => {}
            r = self.stop.changed(), if !self.closing => {
                if r.is_err() || *self.stop.borrow() {
                    self.closing = true;
                }
            }
        }
    }
}

/// A gRPC endpoint for `url` with the push path's connection options.
fn endpoint(url: &str, settings: &PushSettings) -> Result<Endpoint, tonic::transport::Error> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?;
    if let Some(tls) = settings
        .tls
        .as_ref()
        .filter(|_| url.starts_with("https://"))
    {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    Ok(endpoint
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        // HTTP/2 pings notice a silently dead peer (VM migrated, NAT dropped) on an otherwise idle stream.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10)))
}

/// Sends the shared queue's batches to the collector until shutdown and everything is acknowledged.
pub struct Pusher {
    settings: PushSettings,
    queue: SharedQueue,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
    /// Reconnect delays for a single collector and after RETRY.
    backoff: Backoff,
    /// Highest seq ever written to a stream: a send at or below it is a resend.
    max_sent: u64,
    shards: ShardView,
    /// The shard (or seed) of the last stream.
    current: Option<Target>,
    /// Whether the next stream may go to `current` again (false after it failed or was left).
    keep_current: bool,
    /// Where a redirect sent the agent: the next stream goes there.
    redirect_to: Option<Target>,
    /// Redirects followed since the last stored batch.
    redirect_hops: u32,
    /// Why the agent leaves `current`, for the log.
    why: &'static str,
    /// The URL of the shard the agent pushes to, for registration and heartbeats.
    target_tx: watch::Sender<String>,
}

impl Pusher {
    /// `wake` is notified by whoever pushes into `queue`. Fails only on a malformed collector URL.
    pub(crate) fn new(
        settings: PushSettings,
        queue: SharedQueue,
        wake: Arc<Notify>,
        counters: Arc<Counters>,
    ) -> Result<Self, tonic::transport::Error> {
        // Check the seed now: a typo must stop the agent at start, not become an endless retry.
        endpoint(&settings.collector, &settings)?;
        let backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
        let (target_tx, _) = watch::channel(settings.collector.clone());
        Ok(Self {
            settings,
            queue,
            wake,
            counters,
            backoff,
            max_sent: 0,
            shards: ShardView::default(),
            current: None,
            keep_current: true,
            redirect_to: None,
            redirect_hops: 0,
            why: "failover",
            target_tx,
        })
    }

    /// The gRPC URL of the shard the agent pushes to (the seed until it knows better); changes when it switches.
    pub(crate) fn target(&self) -> watch::Receiver<String> {
        self.target_tx.subscribe()
    }

    fn pending(&self) -> usize {
        lock(&self.queue).len()
    }

    fn seed(&self) -> Target {
        Target {
            id: None,
            url: self.settings.collector.clone(),
        }
    }

    /// Where the next stream goes; `None` when every shard is down.
    fn choose(&mut self, now: Instant) -> Option<Target> {
        if let Some(t) = self.redirect_to.take() {
            self.why = "redirect";
            return Some(t);
        }
        let agent_id = self.settings.agent_id.as_str();
        if !self.shards.sharded() {
            // A single collector: the seed (or the shard a redirect named, until it fails).
            return match &self.current {
                Some(c) if self.keep_current => Some(c.clone()),
                _ => Some(self.seed()),
            };
        }
        if self.keep_current
            && let Some(c) = &self.current
            && let Some(id) = &c.id
            && self.shards.known.get(id) == Some(&c.url)
            && !self.shards.is_down(id, now)
        {
            if !self.shards.home_due(agent_id, id, now) {
                return Some(c.clone());
            }
            self.why = "return home";
        }
        self.shards.pick(agent_id, now)
    }

    /// Makes `target` the current shard: counts, logs and publishes a change.
    fn switch_to(&mut self, target: Target) {
        if let Some(from) = &self.current
            && from.url != target.url
        {
            inc(&self.counters.shard_switches);
            tracing::info!(
                from = from.label(),
                to = target.label(),
                url = %target.url,
                reason = self.why,
                pending = self.pending(),
                "switching collector shard"
            );
        }
        self.target_tx.send_if_modified(|url| {
            let changed = *url != target.url;
            if changed {
                url.clone_from(&target.url);
            }
            changed
        });
        self.current = Some(target);
        self.keep_current = true;
    }

    /// Runs until `stop` turns true (or its sender is dropped) and the queue is empty. Cancel it (abort the task)
    /// to give up on pending batches: they stay in the queue (and in the spool, for the next start).
    pub(crate) async fn run(mut self, stop: watch::Receiver<bool>) {
        let closing = *stop.borrow();
        let mut input = Input {
            wake: Arc::clone(&self.wake),
            stop,
            closing,
        };
        loop {
            // Connect only when there is something to send: an idle agent keeps no retry loop spinning.
            while self.pending() == 0 {
                if input.closing {
                    return;
                }
                input.changed().await;
            }
            let now = Instant::now();
            let Some(target) = self.choose(now) else {
                // Every shard is down: the queue (or spool) keeps the batches until the first one may be back.
                let delay = self
                    .shards
                    .earliest_expiry(now)
                    .map_or(self.settings.shard_backoff_initial, |t| t - now);
                tracing::warn!(retry_in = ?delay, pending = self.pending(), "every collector shard is down");
                if self.pause(delay, &mut input).await {
                    self.shards.lift_marks();
                }
                continue;
            };
            self.switch_to(target);
            match self.session(&mut input).await {
                SessionEnd::Drained => return,
                SessionEnd::Retry { after, message } => {
                    let delay = after.max(self.backoff.next_delay());
                    tracing::info!(reason = %message, ?delay, pending = self.pending(), "collector asked to retry");
                    self.pause(delay, &mut input).await;
                }
                SessionEnd::Failed(reason) => {
                    inc(&self.counters.push_failures);
                    self.keep_current = false;
                    self.why = "failover";
                    let shard = self.current.as_ref().and_then(|c| c.id.clone());
                    match shard {
                        Some(id) if self.shards.sharded() => {
                            // No sleep: the next shard in the ranking takes over at once.
                            let down_for =
                                self.shards.mark_down(&id, &self.settings, Instant::now());
                            tracing::warn!(
                                shard = %id,
                                %reason,
                                ?down_for,
                                pending = self.pending(),
                                "push to collector shard failed; trying the next one"
                            );
                        }
                        _ => {
                            let delay = self.backoff.next_delay();
                            tracing::warn!(
                                collector = self.current.as_ref().map_or("", |c| c.url.as_str()),
                                %reason,
                                retry_in = ?delay,
                                pending = self.pending(),
                                "push to collector failed"
                            );
                            self.pause(delay, &mut input).await;
                        }
                    }
                }
                SessionEnd::Switch { reason } => {
                    self.keep_current = false;
                    self.why = reason;
                    if self.redirect_to.is_some() {
                        self.redirect_hops += 1;
                        if self.redirect_hops > MAX_REDIRECT_HOPS {
                            // Shards that disagree about the owner must not make the agent spin.
                            let delay = self.backoff.next_delay();
                            tracing::warn!(
                                hops = self.redirect_hops,
                                retry_in = ?delay,
                                "redirected again and again; slowing down"
                            );
                            self.pause(delay, &mut input).await;
                        }
                    }
                }
            }
        }
    }

    /// Asks the shard behind `channel` for the map if it is due, and says whether the agent stays on `target`.
    async fn refresh_map(&mut self, channel: &Channel, target: &Target) -> Verdict {
        if !self.shards.due(Instant::now(), self.settings.map_refresh) {
            return Verdict::Keep;
        }
        let result = fetch_map(
            channel.clone(),
            self.settings.connect_timeout,
            self.settings.token.clone(),
        )
        .await;
        self.shards.fetched(result, target, Instant::now());
        self.verdict(target)
    }

    /// Whether the map lets the agent stay on `target`.
    fn verdict(&self, target: &Target) -> Verdict {
        if !self.shards.sharded() {
            return Verdict::Keep;
        }
        if let Some(id) = &target.id
            && self.shards.known.get(id) == Some(&target.url)
        {
            return Verdict::Keep;
        }
        // The seed, or a shard the map no longer lists: go by the ranking.
        match self.shards.pick(&self.settings.agent_id, Instant::now()) {
            Some(p) if p.url == target.url => Verdict::Adopt(p),
            _ => Verdict::Leave,
        }
    }

    /// The unreachable-shards metadata for a stream to `target`, if any shard is down.
    fn unreachable_header(&self, target: &Target) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        let down = self.shards.down_ids(
            &self.settings.agent_id,
            target.id.as_deref(),
            Instant::now(),
        );
        if down.is_empty() {
            return None;
        }
        // Ids come from the network; one that is not a valid header value leaves the header out rather than fail.
        MetadataValue::try_from(down.join(",")).ok()
    }

    /// One connection and stream to the current shard, until it fails, is left or everything is delivered and the
    /// input is closed.
    async fn session(&mut self, input: &mut Input) -> SessionEnd {
        let mut target = self.current.clone().unwrap_or_else(|| self.seed());
        let endpoint = match endpoint(&target.url, &self.settings) {
            Ok(e) => e,
            Err(e) => return SessionEnd::Failed(format!("invalid URL {}: {e}", target.url)),
        };
        let connect = async move { endpoint.connect().await };
        tokio::pin!(connect);
        let channel: Channel = loop {
            tokio::select! {
                r = &mut connect => match r {
                    Ok(c) => break c,
                    Err(e) => return SessionEnd::Failed(format!("cannot connect: {}", error_chain(&e))),
                },
                () = input.changed() => {}
            }
        };
        match self.refresh_map(&channel, &target).await {
            Verdict::Keep => {}
            Verdict::Adopt(t) => {
                target = t.clone();
                self.current = Some(t);
            }
            // Nothing sent yet: leave at once.
            Verdict::Leave => {
                return SessionEnd::Switch {
                    reason: "shard map",
                };
            }
        }
        let mut client = IngestClient::new(channel.clone())
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd);

        // The request stream: batches written to `tx` go up the stream. Its capacity equals the in-flight limit, and
        // everything in it counts as in flight, so `try_send` never finds it full.
        let cap = self.settings.max_in_flight.max(1);
        let (tx, rx) = mpsc::channel::<WriteBatch>(cap);
        let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(cap);
        // Highest seq sent on this stream; a new stream starts again from the oldest pending batch.
        let mut cursor = 0u64;
        if let Err(reason) = self.fill(&tx, &mut in_flight, &mut cursor) {
            return SessionEnd::Failed(reason);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        crate::credentials::authorize(&mut request, self.settings.token.as_deref());
        if let Some(down) = self.unreachable_header(&target) {
            request
                .metadata_mut()
                .insert(UNREACHABLE_SHARDS_HEADER, down);
        }
        let call = client.push(request);
        tokio::pin!(call);
        let mut acks = loop {
            tokio::select! {
                r = &mut call => match r {
                    Ok(response) => break response.into_inner(),
                    Err(status) => return SessionEnd::Failed(format!("cannot open stream: {}", status_text(&status))),
                },
                () = input.changed() => {}
            }
        };
        tracing::debug!(collector = %target.url, shard = target.label(), "push stream open");

        // On a fallback shard: when the better shard's down mark expires, go back to it.
        let home_at = match &target.id {
            Some(id) if self.shards.sharded() => {
                self.shards
                    .home_at(&self.settings.agent_id, id, Instant::now())
            }
            _ => None,
        };
        // Dropping the sender ends the request stream: the shard acks what it has and closes.
        let mut tx = Some(tx);
        // Set when the agent decided to leave: no new sends, and the stream ends once nothing is in flight.
        let mut leaving: Option<&'static str> = None;
        let mut map_fetch: Option<MapFetch> = None;
        let mut last_ack = Instant::now();
        loop {
            if leaving.is_none()
                && let Some(tx) = &tx
                && let Err(reason) = self.fill(tx, &mut in_flight, &mut cursor)
            {
                return SessionEnd::Failed(reason);
            }
            if let Some(reason) = leaving {
                if in_flight.is_empty() {
                    return SessionEnd::Switch { reason };
                }
            } else if input.closing && in_flight.is_empty() && self.pending() == 0 {
                return SessionEnd::Drained;
            }
            // The clock runs from the later of "oldest batch sent" and "last ack": a slow but moving collector is
            // fine, a stuck one is abandoned.
            let deadline = in_flight
                .front()
                .map_or(last_ack, |(_, sent)| (*sent).max(last_ack))
                + self.settings.ack_timeout;
            let refresh_at = self
                .shards
                .fetched_at
                .map_or_else(Instant::now, |t| t + self.settings.map_refresh);
            tokio::select! {
                () = input.changed() => {}
                m = acks.next() => match m {
                    Some(Ok(ack)) => {
                        last_ack = Instant::now();
                        match self.on_ack(ack, &mut in_flight, &target) {
                            AckOutcome::Next => {}
                            AckOutcome::Redirect(to) => {
                                if leaving.is_none() {
                                    tracing::info!(
                                        shard = target.label(),
                                        to = to.label(),
                                        in_flight = in_flight.len(),
                                        "redirected; waiting for the acks in flight"
                                    );
                                    self.redirect_to = Some(to);
                                    leaving = Some("redirect");
                                    tx = None;
                                }
                            }
                            // Leaving anyway: a batch the shard could not take now just stays pending.
                            AckOutcome::End(SessionEnd::Retry { .. }) if leaving.is_some() => {}
                            AckOutcome::End(end) => return end,
                        }
                    }
                    Some(Err(status)) => return SessionEnd::Failed(format!("stream error: {}", status_text(&status))),
                    None => {
                        // The shard closed the stream we closed: the stream is gone, what got no ack is resent.
                        if let Some(reason) = leaving {
                            return SessionEnd::Switch { reason };
                        }
                        return SessionEnd::Failed("collector closed the stream".to_owned());
                    }
                },
                () = tokio::time::sleep_until(deadline), if !in_flight.is_empty() => {
                    return SessionEnd::Failed(format!(
                        "no ack within {:?} for seq {}",
                        self.settings.ack_timeout,
                        in_flight.front().map_or(0, |(s, _)| *s)
                    ));
                }
                () = tokio::time::sleep_until(home_at.unwrap_or(deadline)), if home_at.is_some() && leaving.is_none() => {
                    tracing::info!(shard = target.label(), "a better shard may be back; leaving this one");
                    leaving = Some("return home");
                    tx = None;
                }
                () = tokio::time::sleep_until(refresh_at), if map_fetch.is_none() && leaving.is_none() => {
                    map_fetch = Some(Box::pin(fetch_map(channel.clone(), self.settings.connect_timeout, self.settings.token.clone())));
                }
                r = async {
                    match map_fetch.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    map_fetch = None;
                    self.shards.fetched(r, &target, Instant::now());
                    match self.verdict(&target) {
                        Verdict::Keep => {}
                        Verdict::Adopt(t) => {
                            target = t.clone();
                            self.current = Some(t);
                        }
                        Verdict::Leave => {
                            if leaving.is_none() {
                                leaving = Some("shard map");
                                tx = None;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Puts pending batches on the stream up to the in-flight limit.
    fn fill(
        &mut self,
        tx: &mpsc::Sender<WriteBatch>,
        in_flight: &mut VecDeque<(u64, Instant)>,
        cursor: &mut u64,
    ) -> Result<(), String> {
        while in_flight.len() < self.settings.max_in_flight.max(1) {
            // Lock per batch: the collection loop and the spool's fsync must not wait for the whole fill.
            let Some(batch) = lock(&self.queue).next_after(*cursor) else {
                break;
            };
            let seq = batch.seq;
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => break,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err("request stream closed".to_owned());
                }
            }
            in_flight.push_back((seq, Instant::now()));
            *cursor = seq;
            inc(&self.counters.batches_sent);
            if seq <= self.max_sent {
                inc(&self.counters.batches_resent);
            }
            self.max_sent = self.max_sent.max(seq);
        }
        Ok(())
    }

    /// Applies one ack from `target`'s stream.
    fn on_ack(
        &mut self,
        ack: Ack,
        in_flight: &mut VecDeque<(u64, Instant)>,
        target: &Target,
    ) -> AckOutcome {
        let Some((expected, _)) = in_flight.pop_front() else {
            return AckOutcome::End(SessionEnd::Failed(format!(
                "ack for seq {} with nothing in flight",
                ack.seq
            )));
        };
        if ack.seq != expected {
            // The contract says acks come in send order; resync by resending everything unacknowledged.
            return AckOutcome::End(SessionEnd::Failed(format!(
                "ack for seq {} but seq {expected} was next",
                ack.seq
            )));
        }
        // The shard answers: whatever it says, it is up.
        if let Some(id) = &target.id {
            self.shards.answered(id);
        }
        match AckStatus::try_from(ack.status) {
            Ok(AckStatus::Stored) => {
                inc(&self.counters.batches_stored);
                self.acknowledged(ack.seq);
            }
            Ok(AckStatus::Duplicate) => {
                inc(&self.counters.batches_duplicate);
                self.acknowledged(ack.seq);
            }
            Ok(AckStatus::Rejected) => {
                inc(&self.counters.batches_rejected);
                tracing::warn!(seq = ack.seq, reason = %ack.message, "collector rejected batch; dropping it");
                self.acknowledged(ack.seq);
            }
            Ok(AckStatus::Retry) => {
                inc(&self.counters.retry_acks);
                return AckOutcome::End(SessionEnd::Retry {
                    after: Duration::from_millis(ack.retry_after_ms),
                    message: format!("seq {}: {}", ack.seq, ack.message),
                });
            }
            Ok(AckStatus::Redirect) => {
                inc(&self.counters.redirect_acks);
                // Nothing was stored: the batch stays pending for the owner.
                let Some(info) = ack
                    .redirect
                    .filter(|s| !s.id.is_empty() && !s.grpc_url.is_empty())
                else {
                    return AckOutcome::End(SessionEnd::Failed(format!(
                        "redirect for seq {} names no shard",
                        ack.seq
                    )));
                };
                if self.shards.known.get(&info.id) != Some(&info.grpc_url) {
                    // A shard the map does not know (or knows elsewhere): use it, and ask for the map again.
                    self.shards.stale = true;
                    self.shards
                        .known
                        .insert(info.id.clone(), info.grpc_url.clone());
                }
                return AckOutcome::Redirect(Target {
                    id: Some(info.id),
                    url: info.grpc_url,
                });
            }
            Ok(AckStatus::Unspecified) | Err(_) => {
                return AckOutcome::End(SessionEnd::Failed(format!(
                    "ack for seq {} has unknown status {}",
                    ack.seq, ack.status
                )));
            }
        }
        AckOutcome::Next
    }

    /// The collector is done with `seq`: forget it, and count the link as healthy again.
    fn acknowledged(&mut self, seq: u64) {
        {
            let mut q = lock(&self.queue);
            q.discard(seq);
            self.counters.set_pending(q.len(), q.bytes());
        }
        self.backoff.reset();
        self.redirect_hops = 0;
    }

    /// Waits `delay` before the next attempt. Shutdown cuts it short once, so the agent makes one more attempt to
    /// deliver within its flush time instead of sleeping through it; returns whether it did.
    async fn pause(&mut self, delay: Duration, input: &mut Input) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let was_closing = input.closing;
            tokio::select! {
                () = &mut sleep => return false,
                () = input.changed() => {
                    if input.closing && !was_closing {
                        return true;
                    }
                }
            }
        }
    }
}

/// An error with its sources ("transport error: tcp connect error: Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut nominal = Duration::from_millis(100);
        for _ in 0..15 {
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(30));
        }
        assert_eq!(nominal, Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
