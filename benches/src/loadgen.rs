//! `damselfly-loadgen`: simulates many agents pushing realistic metric batches to a collector over the `Push`
//! stream, and reports sustained ingest throughput (acknowledged STORED) and send-to-ack latency.
//!
//! Every simulated agent has its own agent id (`loadgen-<run>-<i>`), sequence numbers and `Push` stream with a
//! window of in-flight batches; agents share a few HTTP/2 connections. With `--shards-from` the agents are
//! shard-aware like a real agent: each pushes to its rendezvous owner and fails over, follows redirects and
//! returns home on its own. See `benches/README.md`.

#[path = "loadgen/driver.rs"]
mod driver;
#[path = "loadgen/points.rs"]
mod points;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use damselfly_proto::v1::ShardMapRequest;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::shards_client::ShardsClient;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::driver::{AgentReport, Cluster, Counts, Live, Plan, Shard, run_agent};
use crate::points::PointGen;

/// Agents per connection when `--connections` is 0 (auto).
const AGENTS_PER_CONNECTION: usize = 16;
/// Largest ack message accepted. Acks are tiny; this only bounds a misbehaving server.
const MAX_DECODING_BYTES: usize = 4 << 20;
/// Reconnect delays with a single collector (no shard map): 100 ms doubling to 5 s.
const SINGLE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Load generator for the Damselfly collector's gRPC ingest (`damselfly.v1.Ingest/Push`).
#[derive(Debug, Parser)]
#[command(name = "damselfly-loadgen", version)]
struct Args {
    /// Collector gRPC URL (ignored with --shards-from).
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    collector: String,
    /// gRPC URL of any collector shard: fetch the shard map there (`Shards.GetShardMap`) and push like a
    /// shard-aware agent (rendezvous owner, failover with the unreachable-shards metadata, redirects).
    #[arg(long, value_name = "URL")]
    shards_from: Option<String>,
    /// Milliseconds a failed shard is first marked down (doubles per consecutive failure, with jitter).
    #[arg(long, default_value_t = 1_000)]
    shard_backoff_initial_ms: u64,
    /// Longest down mark of a shard, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    shard_backoff_max_ms: u64,
    /// Simulated agents, each with its own agent id and Push stream.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// HTTP/2 connections the agents' streams are spread over, per shard (0 = one per 16 agents).
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Milliseconds between batches of one agent (0 = as fast as the in-flight window allows).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Points per batch (0 = one collection round of the simulated VM, 10-24 points, as a real agent sends).
    #[arg(long, default_value_t = 200)]
    points_per_batch: usize,
    /// Unacknowledged batches per agent stream.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Seconds of load before measuring starts (excluded from rates and latencies).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// After the run, wait at most this many seconds for outstanding acks.
    #[arg(long, default_value_t = 15)]
    drain_timeout: u64,
    /// Run id in agent ids (`loadgen-<run>-<i>`); default: random. Reusing one makes the collector answer DUPLICATE.
    #[arg(long)]
    run_id: Option<String>,
    /// Send columnar chunks (`WriteBatch.chunks`, the native fast encoding) instead of one `Point` per row.
    #[arg(long)]
    columnar: bool,
    /// Tokio worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the summary as one JSON line on stdout (the human-readable summary goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress line every second.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("damselfly-loadgen: {e}");
        return ExitCode::from(2);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("damselfly-loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("damselfly-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &Args) -> Result<(), String> {
    if args.agents == 0 {
        return Err("--agents must be at least 1".into());
    }
    if args.in_flight == 0 {
        return Err("--in-flight must be at least 1".into());
    }
    if args.shard_backoff_initial_ms == 0
        || args.shard_backoff_max_ms < args.shard_backoff_initial_ms
    {
        return Err(
            "--shard-backoff-initial-ms must be at least 1 and at most --shard-backoff-max-ms"
                .into(),
        );
    }
    if args.duration == 0 {
        return Err("--duration must be at least 1".into());
    }
    if let Some(id) = &args.run_id
        && (id.is_empty() || id.len() > 64 || id.chars().any(char::is_control))
    {
        return Err("--run-id must be 1-64 bytes without control characters".into());
    }
    Ok(())
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
    let connections = match args.connections {
        0 => args.agents.div_ceil(AGENTS_PER_CONNECTION),
        n => n.min(args.agents),
    };
    let cluster = Arc::new(match &args.shards_from {
        Some(url) => shard_cluster(url, connections).await?,
        None => Cluster {
            shards: vec![Shard {
                id: "collector".to_owned(),
                grpc_url: args.collector.clone(),
                clients: connect(&args.collector, connections).await?,
            }],
            sharded: false,
        },
    });
    let (backoff_initial, backoff_max) = if cluster.sharded {
        (
            Duration::from_millis(args.shard_backoff_initial_ms),
            Duration::from_millis(args.shard_backoff_max_ms),
        )
    } else {
        SINGLE_BACKOFF
    };

    let start = Instant::now();
    let measure_start = start + Duration::from_secs(args.warmup);
    let stop = measure_start + Duration::from_secs(args.duration);
    let plan = Arc::new(Plan {
        measure_start,
        stop,
        drain_deadline: stop + Duration::from_secs(args.drain_timeout),
        interval: (args.interval_ms > 0).then(|| Duration::from_millis(args.interval_ms)),
        in_flight: args.in_flight,
        backoff_initial,
        backoff_max,
        epoch: (start, unix_ms_now()),
    });
    let live = Arc::new(Live::new(cluster.shards.len()));
    eprintln!(
        "damselfly-loadgen: run {run_id}: {} agents on {connections} connection(s) per shard to {}, {} points/batch, \
         in-flight {}, {}, warm-up {} s, measuring {} s",
        args.agents,
        target_text(&cluster),
        match args.points_per_batch {
            0 => "one round (10-24)".to_owned(),
            n => n.to_string(),
        },
        args.in_flight,
        match args.interval_ms {
            0 => "no interval (closed loop)".to_owned(),
            ms => format!("one batch per {ms} ms per agent"),
        },
        args.warmup,
        args.duration,
    );

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.agents {
        let point_gen = PointGen::new(&run_id, i, args.points_per_batch).columnar(args.columnar);
        tasks.spawn(run_agent(
            i,
            point_gen,
            cluster.clone(),
            plan.clone(),
            live.clone(),
        ));
    }
    let progress = (!args.quiet).then(|| {
        tokio::spawn(progress(
            live.clone(),
            cluster.clone(),
            start,
            measure_start,
            stop,
        ))
    });

    let mut reports = Vec::with_capacity(args.agents);
    let mut panics = 0usize;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(report) => reports.push(report),
            Err(e) => {
                panics += 1;
                eprintln!("damselfly-loadgen: an agent task failed: {e}");
            }
        }
    }
    if let Some(p) = progress {
        p.abort();
    }

    let latency = match live.latency_us.lock() {
        Ok(h) => h.clone(),
        Err(e) => e.into_inner().clone(),
    };
    let summary = Summary::new(
        &args,
        &run_id,
        connections,
        (stop - measure_start).as_secs_f64(),
        &reports,
        latency,
        &cluster,
        &live,
    );
    if args.json {
        eprintln!("{}", summary.text());
        println!("{}", summary.json());
    } else {
        println!("{}", summary.text());
    }
    if summary.total.points_stored == 0 {
        eprintln!("damselfly-loadgen: FAILED: no point was acknowledged STORED");
        return Ok(ExitCode::from(1));
    }
    if panics > 0 {
        return Ok(ExitCode::from(1));
    }
    if summary.total.rejected > 0 {
        eprintln!(
            "damselfly-loadgen: FAILED: {} batches were REJECTED (a generator bug)",
            summary.total.rejected
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

fn endpoint(url: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("bad collector URL {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10)))
}

fn ingest_client(channel: Channel) -> IngestClient<Channel> {
    IngestClient::new(channel)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_DECODING_BYTES)
}

/// Opens `n` HTTP/2 connections to the collector (now: an unreachable collector is a bad flag).
async fn connect(url: &str, n: usize) -> Result<Vec<IngestClient<Channel>>, String> {
    let endpoint = endpoint(url)?;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {url}: {}", error_chain(&e)))?;
        clients.push(ingest_client(channel));
    }
    Ok(clients)
}

/// Fetches the shard map from `url` and prepares `n` lazy connections per shard: a shard that is down now (or
/// later) only fails the streams that try it, and its connections come back by themselves when it does.
async fn shard_cluster(url: &str, n: usize) -> Result<Cluster, String> {
    let channel = endpoint(url)?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {}", error_chain(&e)))?;
    let map = ShardsClient::new(channel)
        .get_shard_map(ShardMapRequest {})
        .await
        .map_err(|s| format!("GetShardMap on {url}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if map.shards.is_empty() {
        return Err(format!("the shard map from {url} lists no shard"));
    }
    let mut shards = Vec::with_capacity(map.shards.len());
    for info in map.shards {
        let endpoint = endpoint(&info.grpc_url)?;
        let clients = (0..n)
            .map(|_| ingest_client(endpoint.connect_lazy()))
            .collect();
        shards.push(Shard {
            id: info.id,
            grpc_url: info.grpc_url,
            clients,
        });
    }
    Ok(Cluster {
        shards,
        sharded: true,
    })
}

fn target_text(cluster: &Cluster) -> String {
    if !cluster.sharded {
        return cluster
            .shards
            .first()
            .map_or_else(String::new, |s| s.grpc_url.clone());
    }
    let list: Vec<String> = cluster
        .shards
        .iter()
        .map(|s| format!("{}={}", s.id, s.grpc_url))
        .collect();
    format!("{} shards ({})", cluster.shards.len(), list.join(", "))
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One line per second on stderr: stored batches and points per second over the last second (and per shard).
async fn progress(
    live: Arc<Live>,
    cluster: Arc<Cluster>,
    start: Instant,
    measure_start: Instant,
    stop: Instant,
) {
    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let (mut last_b, mut last_p) = (0, 0);
    let mut last_shard = vec![0u64; live.shards.len()];
    loop {
        let now = ticker.tick().await;
        let b = live.batches_stored.load(Ordering::Relaxed);
        let p = live.points_stored.load(Ordering::Relaxed);
        let mut per_shard = String::new();
        if cluster.sharded {
            for (i, (s, last)) in live.shards.iter().zip(&mut last_shard).enumerate() {
                let v = s.points_stored.load(Ordering::Relaxed);
                let id = cluster.shards.get(i).map_or("?", |s| s.id.as_str());
                per_shard.push_str(&format!(" {id} {}", v - *last));
                *last = v;
            }
            per_shard.push_str(&format!(
                " | redirects {}",
                live.redirects.load(Ordering::Relaxed)
            ));
        }
        let phase = if now <= measure_start {
            "warm-up"
        } else if now <= stop {
            "measure"
        } else {
            "drain"
        };
        eprintln!(
            "[{:>4.0}s {phase:<7}] {:>8} batches/s {:>10} points/s  retry {} rejected {} stream errors {}{per_shard}",
            (now - start).as_secs_f64(),
            b - last_b,
            p - last_p,
            live.retry_acks.load(Ordering::Relaxed),
            live.rejected.load(Ordering::Relaxed),
            live.stream_errors.load(Ordering::Relaxed),
        );
        (last_b, last_p) = (b, p);
    }
}

/// Merged results of all agents.
struct Summary {
    run_id: String,
    agents: usize,
    connections: usize,
    collector: String,
    points_per_batch: usize,
    in_flight: usize,
    interval_ms: u64,
    warmup_s: u64,
    measured_s: f64,
    total: Counts,
    window: Counts,
    latency: Histogram<u64>,
    unacked_batches: u64,
    unacked_points: u64,
    unacked_cpu_points: u64,
    /// Per shard (one entry without a shard map).
    shards: Vec<ShardSummary>,
    sharded: bool,
}

/// What one shard got.
struct ShardSummary {
    id: String,
    grpc_url: String,
    /// Agents that rank it first.
    agents_home: u64,
    batches_stored: u64,
    points_stored: u64,
    /// Its agents whose stream to it failed at least once.
    lost_home: u64,
    /// Of those, the agents that then had a batch acknowledged by another shard.
    rehomed: u64,
    /// Of those, the agents that then had a batch acknowledged by it again.
    returned: u64,
    /// First failure of a stream of one of its agents to it (Unix ms).
    first_failure_ms: Option<i64>,
    /// The last of its agents to be re-homed / to return: when (Unix ms).
    last_rehomed_ms: Option<i64>,
    last_returned_ms: Option<i64>,
    /// Longest time one agent took from its own failure to an ack elsewhere, ms.
    max_agent_rehome_ms: i64,
}

impl ShardSummary {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "grpc_url": self.grpc_url,
            "agents_home": self.agents_home,
            "batches_stored": self.batches_stored,
            "points_stored": self.points_stored,
            "lost_home": self.lost_home,
            "rehomed": self.rehomed,
            "returned": self.returned,
            "first_failure_unix_ms": self.first_failure_ms,
            "last_rehomed_unix_ms": self.last_rehomed_ms,
            "last_returned_unix_ms": self.last_returned_ms,
            "rehome_ms": self.rehome_ms(),
            "max_agent_rehome_ms": self.max_agent_rehome_ms,
        })
    }

    /// From the first failure to the moment the last of its agents was re-homed.
    fn rehome_ms(&self) -> Option<i64> {
        Some(self.last_rehomed_ms? - self.first_failure_ms?)
    }
}

impl Summary {
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, all distinct inputs"
    )]
    fn new(
        args: &Args,
        run_id: &str,
        connections: usize,
        measured_s: f64,
        reports: &[AgentReport],
        latency: Histogram<u64>,
        cluster: &Cluster,
        live: &Live,
    ) -> Self {
        let mut shards: Vec<ShardSummary> = cluster
            .shards
            .iter()
            .zip(&live.shards)
            .map(|(s, l)| ShardSummary {
                id: s.id.clone(),
                grpc_url: s.grpc_url.clone(),
                agents_home: 0,
                batches_stored: l.batches_stored.load(Ordering::Relaxed),
                points_stored: l.points_stored.load(Ordering::Relaxed),
                lost_home: 0,
                rehomed: 0,
                returned: 0,
                first_failure_ms: None,
                last_rehomed_ms: None,
                last_returned_ms: None,
                max_agent_rehome_ms: 0,
            })
            .collect();
        for r in reports {
            let Some(s) = shards.get_mut(r.home) else {
                continue;
            };
            s.agents_home += 1;
            if let Some(failed) = r.home_failed_ms {
                s.lost_home += 1;
                s.first_failure_ms = Some(s.first_failure_ms.map_or(failed, |t| t.min(failed)));
            }
            if let Some(t) = r.rehomed_ms {
                s.rehomed += 1;
                s.last_rehomed_ms = Some(s.last_rehomed_ms.map_or(t, |x| x.max(t)));
                if let Some(failed) = r.home_failed_ms {
                    s.max_agent_rehome_ms = s.max_agent_rehome_ms.max(t - failed);
                }
            }
            if let Some(t) = r.returned_ms {
                s.returned += 1;
                s.last_returned_ms = Some(s.last_returned_ms.map_or(t, |x| x.max(t)));
            }
        }
        let mut s = Summary {
            run_id: run_id.to_owned(),
            agents: args.agents,
            connections,
            collector: target_text(cluster),
            points_per_batch: args.points_per_batch,
            in_flight: args.in_flight,
            interval_ms: args.interval_ms,
            warmup_s: args.warmup,
            measured_s,
            total: Counts::default(),
            window: Counts::default(),
            latency,
            unacked_batches: 0,
            unacked_points: 0,
            unacked_cpu_points: 0,
            shards,
            sharded: cluster.sharded,
        };
        for r in reports {
            s.total.add(&r.total);
            s.window.add(&r.window);
            s.unacked_batches += r.unacked_batches;
            s.unacked_points += r.unacked_points;
            s.unacked_cpu_points += r.unacked_cpu_points;
        }
        s
    }

    fn batches_per_sec(&self) -> f64 {
        self.window.batches_stored as f64 / self.measured_s
    }

    fn points_per_sec(&self) -> f64 {
        self.window.points_stored as f64 / self.measured_s
    }

    fn values_per_sec(&self) -> f64 {
        self.window.values_stored as f64 / self.measured_s
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(q)
        }
    }

    fn text(&self) -> String {
        let (t, w) = (&self.total, &self.window);
        let interval = match self.interval_ms {
            0 => "closed loop".to_owned(),
            ms => format!("interval {ms} ms"),
        };
        format!(
            "== damselfly-loadgen run {run}: {agents} agents / {conns} connection(s) -> {url}, {ppb} points/batch, \
             in-flight {inf}, {interval}\n\
             measured {secs:.1} s (after {warm} s warm-up):\n\
             \x20 throughput  {bps:>12.1} batches/s  {pps:>14.1} points/s  {vps:>14.1} values/s (acknowledged STORED)\n\
             \x20 ack latency µs  p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}  (mean {mean:.0}, {n} acks)\n\
             \x20 in window   retry {wr}  rejected {wj}  duplicate {wd}  redirects {wx}  stream errors {we}  missed ticks {wm}\n\
             whole run (warm-up and drain included):\n\
             \x20 batches     sent {bs} (resent {br})  stored {bst}  duplicate {bd}  retry acks {ra}  rejected {rj}  redirects {rx}\n\
             \x20 points      stored {ps} (cpu {cps})  in duplicate batches {pd} (cpu {cpd})\n\
             \x20 stream errors {se}  shard switches {sw}  missed ticks {mt}  unacknowledged at exit {ub} batches / {up} points (cpu {uc}){shards}",
            run = self.run_id,
            agents = self.agents,
            conns = self.connections,
            url = self.collector,
            ppb = self.points_per_batch,
            inf = self.in_flight,
            secs = self.measured_s,
            warm = self.warmup_s,
            bps = self.batches_per_sec(),
            pps = self.points_per_sec(),
            vps = self.values_per_sec(),
            p50 = self.quantile(0.5),
            p90 = self.quantile(0.9),
            p99 = self.quantile(0.99),
            p999 = self.quantile(0.999),
            max = self.latency.max(),
            mean = self.latency.mean(),
            n = self.latency.len(),
            wr = w.retry_acks,
            wj = w.rejected,
            wd = w.batches_duplicate,
            wx = w.redirects,
            we = w.stream_errors,
            wm = w.missed_ticks,
            bs = t.batches_sent,
            br = t.batches_resent,
            bst = t.batches_stored,
            bd = t.batches_duplicate,
            ra = t.retry_acks,
            rj = t.rejected,
            rx = t.redirects,
            ps = t.points_stored,
            cps = t.cpu_points_stored,
            pd = t.points_duplicate,
            cpd = t.cpu_points_duplicate,
            se = t.stream_errors,
            sw = t.shard_switches,
            mt = t.missed_ticks,
            ub = self.unacked_batches,
            up = self.unacked_points,
            uc = self.unacked_cpu_points,
            shards = self.shards_text(),
        )
    }

    /// Per shard: agents, what it stored, and the failover of its agents when they lost it.
    fn shards_text(&self) -> String {
        if !self.sharded {
            return String::new();
        }
        let mut text = String::from(
            "\nper shard (acknowledged STORED by it; failover of the agents that rank it first):",
        );
        for s in &self.shards {
            text.push_str(&format!(
                "\n  {} {}: {} agents, {} batches / {} points stored",
                s.id, s.grpc_url, s.agents_home, s.batches_stored, s.points_stored
            ));
            if s.lost_home > 0 {
                let secs = |ms: Option<i64>| {
                    ms.map_or("-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
                };
                text.push_str(&format!(
                    "\n    lost it: {} agents; re-homed: {} (all {} after the first failure, one agent at most {:.1} s); \
                     back home: {}",
                    s.lost_home,
                    s.rehomed,
                    secs(s.rehome_ms()),
                    s.max_agent_rehome_ms as f64 / 1000.0,
                    s.returned,
                ));
            }
        }
        text
    }

    fn json(&self) -> String {
        let counts = |c: &Counts| {
            serde_json::json!({
                "batches_sent": c.batches_sent,
                "batches_resent": c.batches_resent,
                "batches_stored": c.batches_stored,
                "points_stored": c.points_stored,
                "cpu_points_stored": c.cpu_points_stored,
                "values_stored": c.values_stored,
                "batches_duplicate": c.batches_duplicate,
                "points_duplicate": c.points_duplicate,
                "cpu_points_duplicate": c.cpu_points_duplicate,
                "retry_acks": c.retry_acks,
                "rejected": c.rejected,
                "redirects": c.redirects,
                "stream_errors": c.stream_errors,
                "shard_switches": c.shard_switches,
                "missed_ticks": c.missed_ticks,
            })
        };
        let mut total = counts(&self.total);
        if let Some(o) = total.as_object_mut() {
            o.insert("unacked_batches".into(), self.unacked_batches.into());
            o.insert("unacked_points".into(), self.unacked_points.into());
            o.insert("unacked_cpu_points".into(), self.unacked_cpu_points.into());
        }
        serde_json::json!({
            "run_id": self.run_id,
            "collector": self.collector,
            "agents": self.agents,
            "connections": self.connections,
            "points_per_batch": self.points_per_batch,
            "in_flight": self.in_flight,
            "interval_ms": self.interval_ms,
            "warmup_s": self.warmup_s,
            "measured_s": self.measured_s,
            "batches_per_sec": self.batches_per_sec(),
            "points_per_sec": self.points_per_sec(),
            "values_per_sec": self.values_per_sec(),
            "latency_us": {
                "p50": self.quantile(0.5),
                "p90": self.quantile(0.9),
                "p99": self.quantile(0.99),
                "p999": self.quantile(0.999),
                "max": self.latency.max(),
                "mean": self.latency.mean(),
                "count": self.latency.len(),
            },
            "window": counts(&self.window),
            "total": total,
            "sharded": self.sharded,
            "shards": self.shards.iter().map(ShardSummary::json).collect::<Vec<_>>(),
        })
        .to_string()
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
