//! One simulated agent: its own `Push` stream with a window of in-flight batches, following the delivery contract
//! of `ingest.proto` (acks in order; RETRY honoured by resending after `retry_after_ms`; a broken stream resends
//! everything unacknowledged on a new stream, which the collector answers with DUPLICATE where it already stored).
//!
//! Shards, as a real agent handles them (`agent/src/push.rs`): the agent pushes to the first shard of
//! `damselfly_proto::shards::rank(agent_id, ids)` that it has not marked down, and stays there until something
//! moves it. A failed connection or stream marks that shard down for a per-shard backoff (doubling, with jitter,
//! reset by an ack from it) and the agent moves at once to the next shard, naming the shards it marked down in the
//! `damselfly-unreachable-shards` metadata of the new stream. A REDIRECT ack, or the expiry of the down mark of a
//! better-ranked shard (return home), stops new sends; once the batches in flight are acknowledged the agent
//! switches, so that a batch is never in flight on two shards at once. With one collector (no shard map) this is
//! the plain reconnect-with-backoff loop.
//!
//! Batches are not kept after sending: [`PointGen::batch`] rebuilds one from `(seq, time)` when it must be resent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use damselfly_proto::v1::{Ack, AckStatus, WriteBatch, ingest_client::IngestClient};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::points::{PointGen, batch_values, count_measurement};
use damselfly_proto::columnar::batch_rows;

/// Request metadata of a `Push` call: the ids of the shards the agent gave up on, comma-separated.
pub const UNREACHABLE_SHARDS_HEADER: &str = "damselfly-unreachable-shards";
/// A stream whose oldest in-flight batch got no ack for this long is abandoned and its batches resent.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Redirects in a row without an acknowledged batch that are followed at once; later ones wait a backoff first
/// (shards that disagree about the owner must not make the agent spin).
const MAX_REDIRECT_HOPS: u32 = 4;
/// Highest latency the histogram holds (µs); larger values are clamped.
const HIST_MAX_US: u64 = 3_600_000_000;
/// Only this many REJECTED messages, and this many stream failures, are printed (all are counted).
const MAX_REJECT_MESSAGES: u64 = 20;
const MAX_ERROR_MESSAGES: u64 = 10;

/// The schedule all agents share.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Start of the measured window (end of warm-up).
    pub measure_start: Instant,
    /// End of the measured window: no new batches after this.
    pub stop: Instant,
    /// Give up on unacknowledged batches at this time.
    pub drain_deadline: Instant,
    /// Time between batches per agent; `None` = as fast as the window allows.
    pub interval: Option<Duration>,
    /// Most unacknowledged batches per stream.
    pub in_flight: usize,
    /// First down mark of a shard (or reconnect delay with one collector); doubles per consecutive failure.
    pub backoff_initial: Duration,
    /// Longest down mark / reconnect delay.
    pub backoff_max: Duration,
    /// An instant and the same moment in Unix milliseconds, to report event times as wall-clock times.
    pub epoch: (Instant, i64),
}

impl Plan {
    fn in_window(&self, t: Instant) -> bool {
        t >= self.measure_start && t < self.stop
    }

    /// `t` in Unix milliseconds.
    pub fn unix_ms(&self, t: Instant) -> i64 {
        let (base, base_ms) = self.epoch;
        let d = if t >= base {
            i64::try_from((t - base).as_millis()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from((base - t).as_millis()).unwrap_or(i64::MAX)
        };
        base_ms.saturating_add(d)
    }
}

/// One shard the agents may push to (the only collector when there is no shard map).
#[derive(Debug)]
pub struct Shard {
    pub id: String,
    pub grpc_url: String,
    /// One client per HTTP/2 connection; agent `i` uses `clients[i % len]`.
    pub clients: Vec<IngestClient<Channel>>,
}

/// The shards, in shard-map order.
#[derive(Debug)]
pub struct Cluster {
    pub shards: Vec<Shard>,
    /// The shards came from a shard map: send the unreachable metadata, follow redirects.
    pub sharded: bool,
}

impl Cluster {
    fn index_of(&self, id: &str, grpc_url: &str) -> Option<usize> {
        self.shards
            .iter()
            .position(|s| s.id == id)
            .or_else(|| self.shards.iter().position(|s| s.grpc_url == grpc_url))
    }
}

/// Stored totals of one shard, for the progress line and the summary.
#[derive(Debug, Default)]
pub struct ShardLive {
    pub batches_stored: AtomicU64,
    pub points_stored: AtomicU64,
}

/// Live totals over all agents, for the progress line, and the shared latency histogram (one per agent would
/// take ~190 KB each: 2 GB at 10,000 agents).
#[derive(Debug)]
pub struct Live {
    pub batches_stored: AtomicU64,
    pub points_stored: AtomicU64,
    pub retry_acks: AtomicU64,
    pub rejected: AtomicU64,
    pub stream_errors: AtomicU64,
    pub redirects: AtomicU64,
    pub shards: Vec<ShardLive>,
    pub latency_us: Mutex<Histogram<u64>>,
}

impl Live {
    pub fn new(shards: usize) -> Self {
        Self {
            batches_stored: AtomicU64::new(0),
            points_stored: AtomicU64::new(0),
            retry_acks: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            stream_errors: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            shards: (0..shards).map(|_| ShardLive::default()).collect(),
            latency_us: Mutex::new(new_histogram()),
        }
    }
}

/// Event counts; kept once for the whole run and once for the measured window.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Batches put on a stream, resends included.
    pub batches_sent: u64,
    /// Of those, resends (after RETRY, a broken stream or a redirect).
    pub batches_resent: u64,
    pub batches_stored: u64,
    /// Points acknowledged STORED (the ack's `points_stored`).
    pub points_stored: u64,
    /// `cpu` points in batches acknowledged STORED.
    pub cpu_points_stored: u64,
    /// Field values in batches acknowledged STORED.
    pub values_stored: u64,
    pub batches_duplicate: u64,
    /// Points in batches acknowledged DUPLICATE (stored earlier, ack lost).
    pub points_duplicate: u64,
    pub cpu_points_duplicate: u64,
    pub retry_acks: u64,
    pub rejected: u64,
    /// REDIRECT acks (the batch goes to the named shard).
    pub redirects: u64,
    /// Broken streams: transport/status errors, failed connections, the server closing the stream, ack timeouts,
    /// protocol violations.
    pub stream_errors: u64,
    /// Changes of the shard an agent pushes to (failover, redirect, return home).
    pub shard_switches: u64,
    /// Interval ticks dropped because the window stayed full (the requested rate was not reached).
    pub missed_ticks: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.batches_sent += o.batches_sent;
        self.batches_resent += o.batches_resent;
        self.batches_stored += o.batches_stored;
        self.points_stored += o.points_stored;
        self.cpu_points_stored += o.cpu_points_stored;
        self.values_stored += o.values_stored;
        self.batches_duplicate += o.batches_duplicate;
        self.points_duplicate += o.points_duplicate;
        self.cpu_points_duplicate += o.cpu_points_duplicate;
        self.retry_acks += o.retry_acks;
        self.rejected += o.rejected;
        self.redirects += o.redirects;
        self.stream_errors += o.stream_errors;
        self.shard_switches += o.shard_switches;
        self.missed_ticks += o.missed_ticks;
    }
}

/// What one agent did.
#[derive(Debug)]
pub struct AgentReport {
    pub total: Counts,
    pub window: Counts,
    /// Batches never acknowledged (still in flight or waiting for a resend at the drain deadline).
    pub unacked_batches: u64,
    pub unacked_points: u64,
    pub unacked_cpu_points: u64,
    /// Index of the agent's own shard (first of its ranking).
    pub home: usize,
    /// When a stream to the home shard failed for the first time (Unix ms).
    pub home_failed_ms: Option<i64>,
    /// After that, when a batch was first acknowledged by another shard (Unix ms).
    pub rehomed_ms: Option<i64>,
    /// After that, when a batch was first acknowledged by the home shard again (Unix ms).
    pub returned_ms: Option<i64>,
}

/// A new latency histogram (1 µs .. 1 h, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
}

/// A batch that was sent, or must be (re)sent.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    time_unix_nano: i64,
    points: u64,
    /// Field values in the batch (a point carries several).
    values: u64,
    cpu_points: u64,
    /// When it was last put on a stream.
    sent: Instant,
    /// Sent at least once before.
    resend: bool,
}

/// Why a stream ended.
enum StreamEnd {
    /// Nothing left to send, or the drain deadline passed.
    Done,
    /// Broken: mark the shard down, resend everything in flight on a new stream.
    Failed(String),
    /// Ended on purpose with nothing in flight (redirect, return home): continue on this shard.
    Moved(usize),
}

/// Why a stream stops taking new batches before it ends.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// A REDIRECT ack named this shard.
    Redirect(usize),
    /// The down mark of this better-ranked shard expired.
    Home(usize),
}

impl Leave {
    fn target(self) -> usize {
        match self {
            Leave::Redirect(s) | Leave::Home(s) => s,
        }
    }
}

/// Per-shard state of one agent.
#[derive(Debug, Clone, Copy)]
struct ShardMark {
    /// Marked down until then.
    down_until: Option<Instant>,
    /// Length of the next down mark.
    next_mark: Duration,
}

struct Agent {
    id: usize,
    points: PointGen,
    plan: Arc<Plan>,
    live: Arc<Live>,
    cluster: Arc<Cluster>,
    /// Shard indices, most preferred first.
    ranking: Vec<usize>,
    /// The shard pushed to now.
    current: usize,
    marks: Vec<ShardMark>,
    /// Redirects followed since the last acknowledged batch.
    redirect_hops: u32,
    /// Set by a REDIRECT ack or a return home: no new sends, switch once the window is empty.
    leave: Option<Leave>,
    home_failed: Option<Instant>,
    rehomed: Option<Instant>,
    returned: Option<Instant>,
    next_seq: u64,
    /// End of the last new batch's time span: the next one starts after it.
    next_time: i64,
    /// Batches to resend, lowest seq first.
    resend: BTreeMap<u64, Pending>,
    in_flight: VecDeque<Pending>,
    /// No sending before this (RETRY).
    paused_until: Option<Instant>,
    stopping: bool,
    /// New batches the interval allows now (unbounded when there is no interval).
    tokens: usize,
    total: Counts,
    window: Counts,
}

/// Runs agent `id` until its batches are all acknowledged after `plan.stop`, or the drain deadline passes.
pub async fn run_agent(
    id: usize,
    points: PointGen,
    cluster: Arc<Cluster>,
    plan: Arc<Plan>,
    live: Arc<Live>,
) -> AgentReport {
    let ranking: Vec<usize> = {
        let ids = cluster.shards.iter().map(|s| s.id.as_str());
        damselfly_proto::shards::rank(points.agent_id(), ids)
            .into_iter()
            .filter_map(|r| cluster.shards.iter().position(|s| s.id == r))
            .collect()
    };
    let home = ranking.first().copied().unwrap_or(0);
    let mut agent = Agent {
        id,
        points,
        live,
        marks: vec![
            ShardMark {
                down_until: None,
                next_mark: plan.backoff_initial,
            };
            cluster.shards.len()
        ],
        cluster,
        ranking,
        current: home,
        redirect_hops: 0,
        leave: None,
        home_failed: None,
        rehomed: None,
        returned: None,
        next_seq: 1,
        next_time: 0,
        resend: BTreeMap::new(),
        in_flight: VecDeque::with_capacity(plan.in_flight),
        paused_until: None,
        stopping: false,
        // With an interval, the first batch goes at the agent's first (staggered) tick.
        tokens: if plan.interval.is_some() {
            0
        } else {
            usize::MAX
        },
        total: Counts::default(),
        window: Counts::default(),
        plan,
    };
    agent.run().await;
    let unacked = agent.resend.values().chain(agent.in_flight.iter());
    let (mut b, mut p, mut c) = (0, 0, 0);
    for x in unacked {
        b += 1;
        p += x.points;
        c += x.cpu_points;
    }
    let ms = |t: Option<Instant>| t.map(|t| agent.plan.unix_ms(t));
    AgentReport {
        total: agent.total,
        window: agent.window,
        unacked_batches: b,
        unacked_points: p,
        unacked_cpu_points: c,
        home,
        home_failed_ms: ms(agent.home_failed),
        rehomed_ms: ms(agent.rehomed),
        returned_ms: ms(agent.returned),
    }
}

impl Agent {
    fn home(&self) -> usize {
        self.ranking.first().copied().unwrap_or(0)
    }

    fn is_down(&self, shard: usize, now: Instant) -> bool {
        self.marks[shard].down_until.is_some_and(|t| t > now)
    }

    /// Position of `shard` in the agent's ranking (shards outside it rank last).
    fn rank_of(&self, shard: usize) -> usize {
        self.ranking
            .iter()
            .position(|&s| s == shard)
            .unwrap_or(self.ranking.len())
    }

    /// The shard to push to now: the current one unless it is down, else the best-ranked one not down.
    fn pick(&self, now: Instant) -> Option<usize> {
        if !self.is_down(self.current, now) {
            return Some(self.current);
        }
        self.ranking
            .iter()
            .copied()
            .find(|&s| !self.is_down(s, now))
    }

    /// Marks `shard` down for its next backoff (with jitter: [d/2, d], so agents do not come back in lockstep).
    fn mark_down(&mut self, shard: usize, now: Instant) {
        let mark = &mut self.marks[shard];
        let d = mark.next_mark;
        mark.next_mark = (d * 2).min(self.plan.backoff_max);
        let jittered = d / 2 + (d / 2).mul_f64(rand::random::<f64>());
        mark.down_until = Some(now + jittered);
    }

    async fn run(&mut self) {
        // Spread the agents' ticks over one interval so they do not send in lockstep.
        let mut ticker = self.plan.interval.map(|d| {
            let offset = d.mul_f64((self.id as f64 * 0.618_033_988_75).fract());
            let mut t = tokio::time::interval_at(Instant::now() + offset, d);
            t.set_missed_tick_behavior(MissedTickBehavior::Skip);
            t
        });
        loop {
            let now = Instant::now();
            if self.finished() || now >= self.plan.drain_deadline {
                return;
            }
            let Some(target) = self.pick(now) else {
                // Every shard is down: wait for the first mark to expire.
                let wake = self
                    .marks
                    .iter()
                    .filter_map(|m| m.down_until)
                    .min()
                    .unwrap_or(now)
                    .min(self.plan.drain_deadline);
                tokio::time::sleep_until(wake).await;
                continue;
            };
            if target != self.current {
                self.current = target;
                self.count(now, |c| c.shard_switches += 1);
            }
            match self.stream(target, &mut ticker).await {
                StreamEnd::Done => return,
                StreamEnd::Failed(reason) => {
                    let now = Instant::now();
                    self.count(now, |c| c.stream_errors += 1);
                    let n = self.live.stream_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if n <= MAX_ERROR_MESSAGES {
                        let shard = &self.cluster.shards[target];
                        eprintln!(
                            "agent {}: stream to {} ({}) failed: {reason}",
                            self.points.agent_id(),
                            shard.id,
                            shard.grpc_url
                        );
                        if n == MAX_ERROR_MESSAGES {
                            eprintln!("(further stream failures are only counted)");
                        }
                    }
                    // Everything unacknowledged goes out again on the next stream.
                    for p in self.in_flight.drain(..) {
                        self.resend.insert(p.seq, p);
                    }
                    self.leave = None;
                    if target == self.home() && self.home_failed.is_none() {
                        self.home_failed = Some(now);
                    }
                    self.mark_down(target, now);
                }
                StreamEnd::Moved(next) => {
                    let now = Instant::now();
                    self.marks[next].down_until = None;
                    if next != self.current {
                        self.current = next;
                        self.count(now, |c| c.shard_switches += 1);
                    }
                    if self.redirect_hops > MAX_REDIRECT_HOPS {
                        let wake = (now + self.plan.backoff_initial).min(self.plan.drain_deadline);
                        tokio::time::sleep_until(wake).await;
                    }
                }
            }
        }
    }

    /// Generation is over and every batch is acknowledged.
    fn finished(&self) -> bool {
        self.stopping && self.resend.is_empty() && self.in_flight.is_empty()
    }

    /// The ids of the shards marked down now, comma-separated.
    fn unreachable(&self, now: Instant) -> String {
        let mut ids = Vec::new();
        for (i, s) in self.cluster.shards.iter().enumerate() {
            if self.is_down(i, now) {
                ids.push(s.id.as_str());
            }
        }
        ids.join(",")
    }

    /// When the agent should try a better-ranked shard than `shard` again: the earliest expiry of their marks.
    fn return_home_at(&self, shard: usize) -> Option<(Instant, usize)> {
        let pos = self.rank_of(shard);
        self.ranking[..pos.min(self.ranking.len())]
            .iter()
            .filter_map(|&s| self.marks[s].down_until.map(|t| (t, s)))
            .min()
    }

    /// One `Push` stream to `shard`, until it breaks, the agent moves or the agent is done.
    async fn stream(&mut self, shard: usize, ticker: &mut Option<Interval>) -> StreamEnd {
        let cap = self.plan.in_flight.max(1);
        let (tx, rx) = mpsc::channel::<WriteBatch>(cap);
        self.leave = None;
        // Put the first batches on the stream before opening it: a server may wait for the first message.
        if let Err(reason) = self.fill(&tx) {
            return StreamEnd::Failed(reason);
        }
        let clients = &self.cluster.shards[shard].clients;
        let mut client = clients[self.id % clients.len()].clone();
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if self.cluster.sharded {
            let down = self.unreachable(Instant::now());
            if !down.is_empty()
                && let Ok(v) = MetadataValue::try_from(down.as_str())
            {
                request.metadata_mut().insert(UNREACHABLE_SHARDS_HEADER, v);
            }
        }
        let call = client.push(request);
        let deadline = self.plan.drain_deadline;
        let mut acks = tokio::select! {
            r = call => match r {
                Ok(response) => response.into_inner(),
                Err(status) => return StreamEnd::Failed(format!("cannot open stream: {}", status_text(&status))),
            },
            () = tokio::time::sleep_until(deadline) => return StreamEnd::Done,
        };
        let home_at = self.return_home_at(shard);
        let mut last_ack = Instant::now();
        // One timer for the drain deadline, the end of the run, the end of a RETRY pause, the ack timeout and the
        // return home.
        let timer = tokio::time::sleep_until(deadline);
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            if self.leave.is_none()
                && let Some((t, s)) = home_at
                && now >= t
            {
                self.leave = Some(Leave::Home(s));
            }
            // `fill` also notices the end of the run and of a pause.
            if let Err(reason) = self.fill(&tx) {
                return StreamEnd::Failed(reason);
            }
            if self.finished() {
                return StreamEnd::Done;
            }
            if let Some(leave) = self.leave
                && self.in_flight.is_empty()
            {
                return StreamEnd::Moved(leave.target());
            }
            if now >= deadline {
                return StreamEnd::Done;
            }
            let ack_deadline = self
                .in_flight
                .front()
                .map(|p| p.sent.max(last_ack) + ACK_TIMEOUT);
            if let Some(t) = ack_deadline
                && now >= t
            {
                return StreamEnd::Failed(format!(
                    "no ack within {ACK_TIMEOUT:?} for seq {}",
                    self.in_flight.front().map_or(0, |p| p.seq)
                ));
            }
            let mut wake = deadline;
            if !self.stopping {
                wake = wake.min(self.plan.stop);
            }
            let home = home_at.filter(|_| self.leave.is_none()).map(|(t, _)| t);
            for t in [self.paused_until, ack_deadline, home]
                .into_iter()
                .flatten()
            {
                wake = wake.min(t);
            }
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                biased;
                m = acks.next() => match m {
                    Some(Ok(ack)) => {
                        last_ack = Instant::now();
                        if let Err(reason) = self.on_ack(shard, ack, last_ack) {
                            return StreamEnd::Failed(reason);
                        }
                    }
                    Some(Err(status)) => return StreamEnd::Failed(format!("stream error: {}", status_text(&status))),
                    None => return StreamEnd::Failed("collector closed the stream".to_owned()),
                },
                () = tick(ticker), if !self.stopping => self.on_tick(),
                () = &mut timer => {}
            }
        }
    }

    fn on_tick(&mut self) {
        let cap = self.plan.in_flight.max(1);
        if self.tokens >= cap {
            self.count(Instant::now(), |c| c.missed_ticks += 1);
        } else {
            self.tokens += 1;
        }
    }

    /// Puts batches on the stream up to the window: resends first, then new batches if the schedule allows.
    /// Nothing while the agent is leaving the shard.
    fn fill(&mut self, tx: &mpsc::Sender<WriteBatch>) -> Result<(), String> {
        let now = Instant::now();
        if self.stopping || now >= self.plan.stop {
            self.stopping = true;
        }
        if self.leave.is_some() || self.paused_until.is_some_and(|t| t > now) {
            return Ok(());
        }
        self.paused_until = None;
        while self.in_flight.len() < self.plan.in_flight.max(1) {
            let (mut pending, batch) = if let Some((_, p)) = self.resend.pop_first() {
                let batch = self.points.batch(p.seq, p.time_unix_nano);
                (Pending { resend: true, ..p }, batch)
            } else if !self.stopping && self.tokens > 0 {
                self.tokens = self.tokens.saturating_sub(1);
                let seq = self.next_seq;
                self.next_seq += 1;
                let time = now_unix_nano().max(self.next_time);
                self.next_time = time.saturating_add(self.points.batch_time_span_ns());
                let batch = self.points.batch(seq, time);
                let p = Pending {
                    seq,
                    time_unix_nano: time,
                    points: batch_rows(&batch) as u64,
                    values: batch_values(&batch) as u64,
                    cpu_points: count_measurement(&batch, "cpu") as u64,
                    sent: now,
                    resend: false,
                };
                (p, batch)
            } else {
                break;
            };
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(e) => {
                    // The channel's capacity equals the window, so it is only ever closed, never full.
                    self.resend.insert(pending.seq, pending);
                    return Err(match e {
                        mpsc::error::TrySendError::Full(_) => "request stream full".to_owned(),
                        mpsc::error::TrySendError::Closed(_) => "request stream closed".to_owned(),
                    });
                }
            }
            pending.sent = Instant::now();
            let resend = pending.resend;
            self.count(pending.sent, |c| {
                c.batches_sent += 1;
                c.batches_resent += u64::from(resend);
            });
            self.in_flight.push_back(pending);
        }
        Ok(())
    }

    /// Notes an acknowledged batch (STORED or DUPLICATE) from `shard`: resets its backoff, tracks re-homing.
    fn acknowledged(&mut self, shard: usize, now: Instant) {
        self.marks[shard].next_mark = self.plan.backoff_initial;
        self.redirect_hops = 0;
        if self.home_failed.is_some() {
            if shard != self.home() {
                self.rehomed.get_or_insert(now);
            } else if self.rehomed.is_some() {
                self.returned.get_or_insert(now);
            }
        }
    }

    /// Applies one ack from `shard`. An error breaks the stream (its batches are resent).
    fn on_ack(&mut self, shard: usize, ack: Ack, now: Instant) -> Result<(), String> {
        let Some(p) = self.in_flight.pop_front() else {
            return Err(format!("ack for seq {} with nothing in flight", ack.seq));
        };
        if ack.seq != p.seq {
            self.in_flight.push_front(p);
            return Err(format!(
                "ack for seq {} but seq {} was next",
                ack.seq, p.seq
            ));
        }
        let latency_us =
            u64::try_from(now.saturating_duration_since(p.sent).as_micros()).unwrap_or(u64::MAX);
        match AckStatus::try_from(ack.status) {
            Ok(AckStatus::Stored) => {
                self.record_latency(now, latency_us);
                self.acknowledged(shard, now);
                self.count(now, |c| {
                    c.batches_stored += 1;
                    c.points_stored += ack.points_stored;
                    c.cpu_points_stored += p.cpu_points;
                    c.values_stored += p.values;
                });
                self.live.batches_stored.fetch_add(1, Ordering::Relaxed);
                self.live
                    .points_stored
                    .fetch_add(ack.points_stored, Ordering::Relaxed);
                if let Some(s) = self.live.shards.get(shard) {
                    s.batches_stored.fetch_add(1, Ordering::Relaxed);
                    s.points_stored
                        .fetch_add(ack.points_stored, Ordering::Relaxed);
                }
                if ack.points_stored != p.points && self.total.batches_stored <= 1 {
                    eprintln!(
                        "agent {}: seq {} acknowledged {} points stored, {} were sent",
                        self.points.agent_id(),
                        p.seq,
                        ack.points_stored,
                        p.points
                    );
                }
            }
            Ok(AckStatus::Duplicate) => {
                self.record_latency(now, latency_us);
                self.acknowledged(shard, now);
                self.count(now, |c| {
                    c.batches_duplicate += 1;
                    c.points_duplicate += p.points;
                    c.cpu_points_duplicate += p.cpu_points;
                });
            }
            Ok(AckStatus::Rejected) => {
                self.count(now, |c| c.rejected += 1);
                let n = self.live.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                if n <= MAX_REJECT_MESSAGES {
                    eprintln!(
                        "BUG: collector REJECTED batch seq {} of {}: {}",
                        p.seq,
                        self.points.agent_id(),
                        ack.message
                    );
                }
            }
            Ok(AckStatus::Retry) => {
                self.count(now, |c| c.retry_acks += 1);
                self.live.retry_acks.fetch_add(1, Ordering::Relaxed);
                let wake = now + Duration::from_millis(ack.retry_after_ms.max(1));
                self.paused_until = Some(self.paused_until.map_or(wake, |t| t.max(wake)));
                self.resend.insert(p.seq, p);
            }
            Ok(AckStatus::Redirect) if self.cluster.sharded => {
                self.count(now, |c| c.redirects += 1);
                self.live.redirects.fetch_add(1, Ordering::Relaxed);
                // Nothing was stored: the batch goes to the owner once the rest of the window is acknowledged.
                self.resend.insert(p.seq, p);
                if self.leave.is_none() {
                    let info = ack.redirect.unwrap_or_default();
                    let Some(to) = self.cluster.index_of(&info.id, &info.grpc_url) else {
                        return Err(format!(
                            "redirect to shard {:?} ({}), which is not in the shard map",
                            info.id, info.grpc_url
                        ));
                    };
                    self.redirect_hops += 1;
                    self.leave = Some(Leave::Redirect(to));
                }
            }
            Ok(AckStatus::Unspecified | AckStatus::Redirect) | Err(_) => {
                self.in_flight.push_front(p);
                return Err(format!(
                    "ack for seq {} has unknown status {}",
                    ack.seq, ack.status
                ));
            }
        }
        Ok(())
    }

    fn record_latency(&mut self, now: Instant, us: u64) {
        if self.plan.in_window(now)
            && let Ok(mut h) = self.live.latency_us.lock()
        {
            h.saturating_record(us.clamp(1, HIST_MAX_US));
        }
    }

    /// Applies `f` to the run totals, and to the window counts if `at` is inside the measured window.
    fn count(&mut self, at: Instant, f: impl Fn(&mut Counts)) {
        f(&mut self.total);
        if self.plan.in_window(at) {
            f(&mut self.window);
        }
    }
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn now_unix_nano() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    //! The driver against an in-process fake collector that answers RETRY, breaks streams after storing a batch
    //! (so its resend is a DUPLICATE) and checks the protocol (seqs, acks in order).

    use std::collections::HashMap;
    use std::pin::Pin;
    use std::sync::Mutex;

    use damselfly_proto::v1::ingest_server::{Ingest, IngestServer};
    use futures::Stream;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::codec::CompressionEncoding;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    #[derive(Default)]
    struct FakeState {
        /// Per agent: stored seqs (with point counts), and seqs already answered RETRY once.
        stored: HashMap<String, BTreeMap<u64, usize>>,
        retried: HashMap<String, Vec<u64>>,
        /// Streams opened per agent.
        streams: HashMap<String, u32>,
        duplicates: u64,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

    #[tonic::async_trait]
    impl Ingest for Fake {
        type PushStream = AckStream;

        async fn push(
            &self,
            request: Request<Streaming<WriteBatch>>,
        ) -> Result<Response<AckStream>, Status> {
            let mut input = request.into_inner();
            let state = self.0.clone();
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                let mut on_stream = 0u32;
                while let Some(Ok(batch)) = input.next().await {
                    on_stream += 1;
                    let (ack, break_after) = {
                        let mut st = state.lock().expect("fake state lock");
                        if on_stream == 1 {
                            *st.streams.entry(batch.agent_id.clone()).or_default() += 1;
                        }
                        let first_stream = st.streams[&batch.agent_id] == 1;
                        let retried = st.retried.entry(batch.agent_id.clone()).or_default();
                        if batch.seq % 7 == 0 && !retried.contains(&batch.seq) {
                            retried.push(batch.seq);
                            let ack = Ack {
                                seq: batch.seq,
                                status: AckStatus::Retry as i32,
                                retry_after_ms: 30,
                                ..Ack::default()
                            };
                            (ack, false)
                        } else {
                            let stored = st.stored.entry(batch.agent_id.clone()).or_default();
                            let n = batch.points.len();
                            let new = stored.insert(batch.seq, n).is_none();
                            let ack = if new {
                                Ack {
                                    seq: batch.seq,
                                    status: AckStatus::Stored as i32,
                                    points_stored: n as u64,
                                    ..Ack::default()
                                }
                            } else {
                                st.duplicates += 1;
                                Ack {
                                    seq: batch.seq,
                                    status: AckStatus::Duplicate as i32,
                                    ..Ack::default()
                                }
                            };
                            // The first stream of every agent breaks right after storing its 10th batch.
                            (ack, first_stream && on_stream == 10)
                        }
                    };
                    if break_after {
                        let _ = tx
                            .send(Err(Status::unavailable("fake collector drops the stream")))
                            .await;
                        return;
                    }
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn write(&self, _request: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
            Err(Status::unimplemented("not used"))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retry_broken_streams_and_duplicates_are_handled() {
        let fake = Fake::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = IngestServer::new(fake.clone())
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd);
        let serve = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");

        let now = Instant::now();
        let plan = Arc::new(Plan {
            measure_start: now,
            stop: now + Duration::from_millis(800),
            drain_deadline: now + Duration::from_secs(10),
            interval: None,
            in_flight: 4,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            epoch: (now, 0),
        });
        let live = Arc::new(Live::new(1));
        let cluster = Arc::new(Cluster {
            shards: vec![Shard {
                id: "collector".to_owned(),
                grpc_url: format!("http://{addr}"),
                clients: vec![IngestClient::new(channel)],
            }],
            sharded: false,
        });
        let agents = 3;
        let mut tasks = Vec::new();
        for i in 0..agents {
            let points = PointGen::new("test", i, 25);
            tasks.push(tokio::spawn(run_agent(
                i,
                points,
                cluster.clone(),
                plan.clone(),
                live.clone(),
            )));
        }
        let mut total = Counts::default();
        for t in tasks {
            let r = t.await.expect("agent task");
            assert_eq!(r.unacked_batches, 0);
            total.add(&r.total);
        }
        serve.abort();
        assert!(!live.latency_us.lock().expect("histogram lock").is_empty());

        let st = fake.0.lock().expect("fake state lock");
        assert_eq!(st.stored.len(), agents);
        let mut stored_batches = 0;
        for (agent, seqs) in &st.stored {
            // Every seq from 1 up to the last one was stored exactly once, none lost.
            let last = *seqs.keys().next_back().expect("something stored");
            assert!(last > 20, "{agent}: only {last} batches");
            assert_eq!(seqs.len() as u64, last, "{agent}: gaps in {seqs:?}");
            assert!(seqs.values().all(|&n| n == 25));
            stored_batches += seqs.len() as u64;
        }
        assert_eq!(
            total.batches_stored + total.batches_duplicate,
            stored_batches
        );
        assert_eq!(total.points_stored, total.batches_stored * 25);
        assert_eq!(total.batches_duplicate, st.duplicates);
        assert!(total.batches_duplicate >= agents as u64, "{total:?}");
        assert!(
            total.retry_acks > 0 && total.stream_errors >= agents as u64,
            "{total:?}"
        );
        assert!(total.batches_resent > 0 && total.rejected == 0, "{total:?}");
        assert_eq!(
            live.batches_stored.load(Ordering::Relaxed),
            total.batches_stored
        );
    }

    /// A fake shard for the sharded test: stores into the state all shards share; `redirect_to` answers REDIRECT
    /// there for the first batches of every agent (seq <= 3), as a shard that does not own them would.
    #[derive(Clone)]
    struct FakeShard {
        id: &'static str,
        stored: Arc<Mutex<SharedStore>>,
        redirect_to: Option<damselfly_proto::v1::ShardInfo>,
    }

    #[derive(Default)]
    struct SharedStore {
        /// (agent, seq) -> shard ids that stored it (must be exactly one).
        stored: HashMap<(String, u64), Vec<&'static str>>,
        /// The unreachable-shards metadata of every stream, by shard.
        unreachable: Vec<(&'static str, String)>,
    }

    #[tonic::async_trait]
    impl Ingest for FakeShard {
        type PushStream = AckStream;

        async fn push(
            &self,
            request: Request<Streaming<WriteBatch>>,
        ) -> Result<Response<AckStream>, Status> {
            let unreachable = request
                .metadata()
                .get(UNREACHABLE_SHARDS_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            self.stored
                .lock()
                .expect("store lock")
                .unreachable
                .push((self.id, unreachable));
            let mut input = request.into_inner();
            let this = self.clone();
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                while let Some(Ok(batch)) = input.next().await {
                    let ack = match &this.redirect_to {
                        Some(to) if batch.seq <= 3 => Ack {
                            seq: batch.seq,
                            status: AckStatus::Redirect as i32,
                            redirect: Some(to.clone()),
                            ..Ack::default()
                        },
                        _ => {
                            let mut st = this.stored.lock().expect("store lock");
                            let by = st
                                .stored
                                .entry((batch.agent_id.clone(), batch.seq))
                                .or_default();
                            let new = by.is_empty();
                            by.push(this.id);
                            Ack {
                                seq: batch.seq,
                                status: if new {
                                    AckStatus::Stored
                                } else {
                                    AckStatus::Duplicate
                                } as i32,
                                points_stored: if new { batch.points.len() as u64 } else { 0 },
                                ..Ack::default()
                            }
                        }
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn write(&self, _request: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
            Err(Status::unimplemented("not used"))
        }
    }

    async fn serve_fake(shard: FakeShard) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let handle = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(IngestServer::new(shard))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        (url, handle)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sharded_agents_fail_over_and_follow_redirects() {
        let store = Arc::new(Mutex::new(SharedStore::default()));
        let (b_url, b) = serve_fake(FakeShard {
            id: "b",
            stored: store.clone(),
            redirect_to: None,
        })
        .await;
        let b_info = damselfly_proto::v1::ShardInfo {
            id: "b".to_owned(),
            grpc_url: b_url.clone(),
            ..Default::default()
        };
        let (a_url, a) = serve_fake(FakeShard {
            id: "a",
            stored: store.clone(),
            redirect_to: Some(b_info),
        })
        .await;
        // Shard "c" is down: a port nothing listens on.
        let c_url = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            format!("http://{}", l.local_addr().expect("local addr"))
        };
        let shard = |id: &str, url: &str| Shard {
            id: id.to_owned(),
            grpc_url: url.to_owned(),
            clients: vec![IngestClient::new(
                tonic::transport::Endpoint::from_shared(url.to_owned())
                    .expect("url")
                    .connect_lazy(),
            )],
        };
        let cluster = Arc::new(Cluster {
            shards: vec![shard("a", &a_url), shard("b", &b_url), shard("c", &c_url)],
            sharded: true,
        });
        let now = Instant::now();
        let plan = Arc::new(Plan {
            measure_start: now,
            stop: now + Duration::from_millis(600),
            drain_deadline: now + Duration::from_secs(10),
            interval: Some(Duration::from_millis(50)),
            in_flight: 4,
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(5),
            epoch: (now, 0),
        });
        let live = Arc::new(Live::new(3));
        let mut tasks = Vec::new();
        for i in 0..24 {
            let points = PointGen::new("shards", i, 0);
            tasks.push(tokio::spawn(run_agent(
                i,
                points,
                cluster.clone(),
                plan.clone(),
                live.clone(),
            )));
        }
        let mut total = Counts::default();
        let mut homes = [0usize; 3];
        for t in tasks {
            let r = t.await.expect("agent task");
            assert_eq!(r.unacked_batches, 0);
            total.add(&r.total);
            homes[r.home] += 1;
            if r.home == 2 {
                // Homed on the dead shard: failed there, then stored elsewhere.
                assert!(
                    r.home_failed_ms.is_some() && r.rehomed_ms.is_some(),
                    "{r:?}"
                );
            }
        }
        a.abort();
        b.abort();
        assert!(homes.iter().all(|&n| n > 0), "{homes:?}");

        let st = store.lock().expect("store lock");
        // Every batch stored exactly once, on a live shard; a stored nothing below seq 4.
        assert!(
            st.stored.values().all(|by| by.len() == 1),
            "stored twice somewhere"
        );
        assert_eq!(st.stored.len() as u64, total.batches_stored);
        assert_eq!(total.batches_duplicate, 0);
        assert!(
            st.stored
                .iter()
                .all(|((_, seq), by)| *seq > 3 || by[0] == "b")
        );
        // Agents homed on a were redirected to b; those homed on c told their fallback that c is down.
        assert!(total.redirects >= homes[0] as u64, "{total:?}");
        assert!(total.stream_errors >= homes[2] as u64, "{total:?}");
        assert!(
            st.unreachable.iter().any(|(_, u)| u == "c"),
            "{:?}",
            st.unreachable
        );
        assert!(st.unreachable.iter().all(|(_, u)| u.is_empty() || u == "c"));
    }
}
