//! `damselfly-loadgen`: simulates many agents pushing realistic metric batches to a collector over the `Push`
//! stream, and reports sustained ingest throughput (acknowledged STORED) and send-to-ack latency.
//!
//! Every simulated agent has its own agent id (`loadgen-<run>-<i>`), sequence numbers and `Push` stream with a
//! window of in-flight batches; agents share a few HTTP/2 connections. See `benches/README.md`.

#[path = "loadgen/driver.rs"]
mod driver;
#[path = "loadgen/points.rs"]
mod points;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::driver::{AgentReport, Counts, Live, Plan, new_histogram, run_agent};
use crate::points::PointGen;

/// Agents per connection when `--connections` is 0 (auto).
const AGENTS_PER_CONNECTION: usize = 16;

/// Load generator for the Damselfly collector's gRPC ingest (`damselfly.v1.Ingest/Push`).
#[derive(Debug, Parser)]
#[command(name = "damselfly-loadgen", version)]
struct Args {
    /// Collector gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    collector: String,
    /// Simulated agents, each with its own agent id and Push stream.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// HTTP/2 connections the agents' streams are spread over (0 = one per 16 agents).
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Milliseconds between batches of one agent (0 = as fast as the in-flight window allows).
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Points per batch.
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
    if args.points_per_batch == 0 {
        return Err("--points-per-batch must be at least 1".into());
    }
    if args.in_flight == 0 {
        return Err("--in-flight must be at least 1".into());
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
    let channels = connect(&args.collector, connections).await?;

    let start = Instant::now();
    let measure_start = start + Duration::from_secs(args.warmup);
    let stop = measure_start + Duration::from_secs(args.duration);
    let plan = Arc::new(Plan {
        measure_start,
        stop,
        drain_deadline: stop + Duration::from_secs(args.drain_timeout),
        interval: (args.interval_ms > 0).then(|| Duration::from_millis(args.interval_ms)),
        in_flight: args.in_flight,
    });
    let live = Arc::new(Live::default());
    eprintln!(
        "damselfly-loadgen: run {run_id}: {} agents on {connections} connection(s) to {}, {} points/batch, in-flight {}, {}, \
         warm-up {} s, measuring {} s",
        args.agents,
        args.collector,
        args.points_per_batch,
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
        let channel = channels[i % channels.len()].clone();
        tasks.spawn(run_agent(i, point_gen, channel, plan.clone(), live.clone()));
    }
    let progress =
        (!args.quiet).then(|| tokio::spawn(progress(live.clone(), start, measure_start, stop)));

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

    let summary = Summary::new(
        &args,
        &run_id,
        connections,
        (stop - measure_start).as_secs_f64(),
        &reports,
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

/// Opens `n` HTTP/2 connections to the collector.
async fn connect(url: &str, n: usize) -> Result<Vec<Channel>, String> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("bad --collector URL {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {url}: {}", error_chain(&e)))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// One line per second on stderr: stored batches and points per second over the last second.
async fn progress(live: Arc<Live>, start: Instant, measure_start: Instant, stop: Instant) {
    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let (mut last_b, mut last_p) = (0, 0);
    loop {
        let now = ticker.tick().await;
        let b = live.batches_stored.load(Ordering::Relaxed);
        let p = live.points_stored.load(Ordering::Relaxed);
        let phase = if now <= measure_start {
            "warm-up"
        } else if now <= stop {
            "measure"
        } else {
            "drain"
        };
        eprintln!(
            "[{:>4.0}s {phase:<7}] {:>8} batches/s {:>10} points/s  retry {} rejected {} stream errors {}",
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
}

impl Summary {
    fn new(
        args: &Args,
        run_id: &str,
        connections: usize,
        measured_s: f64,
        reports: &[AgentReport],
    ) -> Self {
        let mut s = Summary {
            run_id: run_id.to_owned(),
            agents: args.agents,
            connections,
            collector: args.collector.clone(),
            points_per_batch: args.points_per_batch,
            in_flight: args.in_flight,
            interval_ms: args.interval_ms,
            warmup_s: args.warmup,
            measured_s,
            total: Counts::default(),
            window: Counts::default(),
            latency: new_histogram(),
            unacked_batches: 0,
            unacked_points: 0,
            unacked_cpu_points: 0,
        };
        for r in reports {
            s.total.add(&r.total);
            s.window.add(&r.window);
            if let Err(e) = s.latency.add(&r.latency_us) {
                eprintln!("damselfly-loadgen: cannot merge a latency histogram: {e:?}");
            }
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
             \x20 in window   retry {wr}  rejected {wj}  duplicate {wd}  stream errors {we}  missed ticks {wm}\n\
             whole run (warm-up and drain included):\n\
             \x20 batches     sent {bs} (resent {br})  stored {bst}  duplicate {bd}  retry acks {ra}  rejected {rj}\n\
             \x20 points      stored {ps} (cpu {cps})  in duplicate batches {pd} (cpu {cpd})\n\
             \x20 stream errors {se}  missed ticks {mt}  unacknowledged at exit {ub} batches / {up} points (cpu {uc})",
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
            we = w.stream_errors,
            wm = w.missed_ticks,
            bs = t.batches_sent,
            br = t.batches_resent,
            bst = t.batches_stored,
            bd = t.batches_duplicate,
            ra = t.retry_acks,
            rj = t.rejected,
            ps = t.points_stored,
            cps = t.cpu_points_stored,
            pd = t.points_duplicate,
            cpd = t.cpu_points_duplicate,
            se = t.stream_errors,
            mt = t.missed_ticks,
            ub = self.unacked_batches,
            up = self.unacked_points,
            uc = self.unacked_cpu_points,
        )
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
                "stream_errors": c.stream_errors,
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
