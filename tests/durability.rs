//! Crash safety and overload, black-box: the real `damselfly collector` binary under load from simulated agents.
//!
//! * SIGKILL at random moments (during writes and flushes), restart on the same data directory, agents re-send
//!   everything unacknowledged with the same (agent_id, seq): every acknowledged point is stored exactly once and
//!   nothing else appears, in SQL and in the Parquet files after a final flush.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{CollectorProc, http_post, parquet_files, python_with_pyarrow};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{Ack, AckStatus, Field, Point, Tag, WriteBatch};
use tonic::codec::CompressionEncoding;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// splitmix64: a tiny seeded generator, so a failing run can be replayed with the same kill schedule.
struct Rng(u64);

impl Rng {
    fn from_env(var: &str) -> (Rng, u64) {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        (Rng(seed), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Simulated agents

/// The measurement the agents write.
const TABLE: &str = "dur";
const POINTS_PER_BATCH: u64 = 25;
/// 2023-11-14T23:00:00Z minus one second: the points cross an hour boundary, so flushes write two partitions.
const T0: i64 = 1_700_002_800_000_000_000 - 1_000_000_000;

/// Every point's unique id: which agent, which batch, which point of the batch. Every other column is derived from
/// it, so a row that was stored wrongly (or made up) is caught, not only a missing or doubled one.
fn point_id(agent: u64, seq: u64, index: u64) -> u64 {
    agent * 1_000_000_000_000 + seq * 1_000 + index
}

fn agent_name(agent: u64) -> String {
    format!("dur-agent-{agent}")
}

fn value_of(id: u64) -> f64 {
    (id % 1_000_003) as f64 * 0.25
}

fn note_of(id: u64) -> String {
    format!("n{}", id % 7919)
}

// `..Default::default()` keeps this building whichever optional encodings the batch grows.
#[allow(clippy::needless_update)]
fn make_batch(agent: u64, seq: u64) -> WriteBatch {
    let points = (0..POINTS_PER_BATCH)
        .map(|i| {
            let id = point_id(agent, seq, i);
            Point {
                measurement: TABLE.into(),
                tags: vec![Tag {
                    key: "slot".into(),
                    value: format!("s{i}"),
                }],
                fields: vec![
                    Field {
                        key: "id".into(),
                        value: Some(Value::U64(id)),
                    },
                    Field {
                        key: "seq".into(),
                        value: Some(Value::U64(seq)),
                    },
                    Field {
                        key: "value".into(),
                        value: Some(Value::F64(value_of(id))),
                    },
                    Field {
                        key: "note".into(),
                        value: Some(Value::Str(note_of(id))),
                    },
                ],
                // One millisecond per batch: a run of a few thousand batches crosses the hour boundary.
                time_unix_nano: T0 + seq as i64 * 1_000_000 + i as i64,
            }
        })
        .collect();
    WriteBatch {
        agent_id: agent_name(agent),
        seq,
        common_tags: vec![Tag {
            key: "agent".into(),
            value: agent_name(agent),
        }],
        points,
        ..WriteBatch::default()
    }
}

/// What the agents and the test's control thread share.
struct Shared {
    /// The collector's gRPC URL; it changes at every restart (ephemeral port).
    url: RwLock<String>,
    /// While set, agents make new batches; once cleared they only deliver what they hold.
    generate: AtomicBool,
    /// Points acknowledged (STORED or DUPLICATE), over all agents.
    acked_points: AtomicU64,
    /// A protocol violation seen by an agent: the test fails with it.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn url(&self) -> String {
        self.url.read().unwrap().clone()
    }

    fn fail(&self, message: String) {
        self.failure.lock().unwrap().get_or_insert(message);
    }

    fn check(&self) {
        if let Some(f) = self.failure.lock().unwrap().as_ref() {
            panic!("an agent saw a protocol violation: {f}");
        }
    }
}

/// One simulated agent: its unacknowledged batches (re-sent with the same seq after any failure) and what was
/// acknowledged.
struct Agent {
    id: u64,
    next_seq: u64,
    pending: BTreeMap<u64, WriteBatch>,
    acked: BTreeSet<u64>,
    stored_acks: u64,
    duplicate_acks: u64,
    retry_acks: u64,
    sessions: u64,
}

impl Agent {
    fn new(id: u64) -> Agent {
        Agent {
            id,
            next_seq: 1,
            pending: BTreeMap::new(),
            acked: BTreeSet::new(),
            stored_acks: 0,
            duplicate_acks: 0,
            retry_acks: 0,
            sessions: 0,
        }
    }

    /// The next batch to send after `after` (a pending one first, else a new one while generating).
    fn next_batch(&mut self, shared: &Shared, after: Option<u64>) -> Option<WriteBatch> {
        let from = after.map_or(0, |s| s + 1);
        if let Some((_, b)) = self.pending.range(from..).next() {
            return Some(b.clone());
        }
        if !shared.generate.load(Ordering::SeqCst) {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch = make_batch(self.id, seq);
        self.pending.insert(seq, batch.clone());
        Some(batch)
    }

    fn done(&self, shared: &Shared) -> bool {
        self.pending.is_empty() && !shared.generate.load(Ordering::SeqCst)
    }

    /// Handles one ack. `Err` is a protocol violation; `Ok(Some(d))` asks to back off for `d` and reconnect.
    fn on_ack(&mut self, shared: &Shared, ack: &Ack) -> Result<Option<Duration>, String> {
        let known = self.pending.contains_key(&ack.seq);
        match ack.status() {
            AckStatus::Stored | AckStatus::Duplicate if known => {
                if ack.status() == AckStatus::Stored {
                    if ack.points_stored != POINTS_PER_BATCH {
                        return Err(format!("{}: STORED with wrong count: {ack:?}", self.id));
                    }
                    self.stored_acks += 1;
                } else {
                    self.duplicate_acks += 1;
                }
                self.pending.remove(&ack.seq);
                self.acked.insert(ack.seq);
                shared
                    .acked_points
                    .fetch_add(POINTS_PER_BATCH, Ordering::SeqCst);
                Ok(None)
            }
            // A second ack for a batch acknowledged before (two calls of it were in flight): fine if DUPLICATE.
            AckStatus::Duplicate if self.acked.contains(&ack.seq) => {
                self.duplicate_acks += 1;
                Ok(None)
            }
            AckStatus::Retry => {
                self.retry_acks += 1;
                Ok(Some(Duration::from_millis(
                    ack.retry_after_ms.clamp(10, 1000),
                )))
            }
            _ => Err(format!("agent {}: unexpected ack {ack:?}", self.id)),
        }
    }
}

async fn connect(url: &str) -> Option<IngestClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(Duration::from_secs(2));
    let channel = tokio::time::timeout(Duration::from_secs(3), endpoint.connect())
        .await
        .ok()?
        .ok()?;
    Some(
        IngestClient::new(channel)
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd),
    )
}

const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_PAUSE: Duration = Duration::from_millis(30);

/// A pushing agent: one stream, up to `in_flight` batches outstanding, acks in order; any failure ends the
/// session and the next one re-sends every pending batch in seq order (as `damselfly-agent` does).
async fn run_push_agent(shared: Arc<Shared>, mut agent: Agent, in_flight: usize) -> Agent {
    while !agent.done(&shared) {
        match push_session(&shared, &mut agent, in_flight).await {
            Ok(pause) => tokio::time::sleep(pause).await,
            Err(violation) => {
                shared.fail(violation);
                break;
            }
        }
    }
    agent
}

async fn push_session(
    shared: &Shared,
    agent: &mut Agent,
    max_in_flight: usize,
) -> Result<Duration, String> {
    let Some(mut client) = connect(&shared.url()).await else {
        return Ok(RECONNECT_PAUSE);
    };
    agent.sessions += 1;
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteBatch>(max_in_flight + 1);
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    // Queue the first batches before opening the stream: tonic's `push` resolves once the response headers arrive.
    while in_flight.len() < max_in_flight {
        let Some(b) = agent.next_batch(shared, in_flight.back().copied()) else {
            break;
        };
        in_flight.push_back(b.seq);
        let _ = tx.try_send(b);
    }
    if in_flight.is_empty() {
        return Ok(Duration::ZERO);
    }
    let mut acks =
        match tokio::time::timeout(ACK_TIMEOUT, client.push(ReceiverStream::new(rx))).await {
            Ok(Ok(r)) => r.into_inner(),
            _ => return Ok(RECONNECT_PAUSE),
        };
    loop {
        while in_flight.len() < max_in_flight {
            let Some(b) = agent.next_batch(shared, in_flight.back().copied()) else {
                break;
            };
            in_flight.push_back(b.seq);
            if tx.send(b).await.is_err() {
                return Ok(RECONNECT_PAUSE);
            }
        }
        let Some(&expected) = in_flight.front() else {
            return Ok(Duration::ZERO);
        };
        let ack = match tokio::time::timeout(ACK_TIMEOUT, acks.message()).await {
            Ok(Ok(Some(ack))) => ack,
            // Stream broken (collector killed), ended or silent: a new session re-sends what is pending.
            _ => return Ok(RECONNECT_PAUSE),
        };
        if ack.seq != expected {
            return Err(format!(
                "agent {}: ack for seq {} while {expected} was the oldest in flight",
                agent.id, ack.seq
            ));
        }
        in_flight.pop_front();
        if let Some(pause) = agent.on_ack(shared, &ack)? {
            return Ok(pause);
        }
    }
}

/// A unary agent: `Write` calls, up to `in_flight` at once (so acks may come back out of order).
async fn run_unary_agent(shared: Arc<Shared>, mut agent: Agent, in_flight: usize) -> Agent {
    while !agent.done(&shared) {
        match unary_session(&shared, &mut agent, in_flight).await {
            Ok(pause) => tokio::time::sleep(pause).await,
            Err(violation) => {
                shared.fail(violation);
                break;
            }
        }
    }
    agent
}

async fn unary_session(
    shared: &Shared,
    agent: &mut Agent,
    max_in_flight: usize,
) -> Result<Duration, String> {
    let Some(client) = connect(&shared.url()).await else {
        return Ok(RECONNECT_PAUSE);
    };
    agent.sessions += 1;
    let mut calls = tokio::task::JoinSet::new();
    let mut in_flight: BTreeSet<u64> = BTreeSet::new();
    let mut broken: Option<Duration> = None;
    loop {
        while broken.is_none() && in_flight.len() < max_in_flight {
            // The lowest pending seq not in flight (pending ones first), else a new batch.
            let mut after = None;
            let batch = loop {
                match agent.next_batch(shared, after) {
                    Some(b) if in_flight.contains(&b.seq) => after = Some(b.seq),
                    other => break other,
                }
            };
            let Some(batch) = batch else { break };
            in_flight.insert(batch.seq);
            let mut client = client.clone();
            calls.spawn(async move {
                let seq = batch.seq;
                let answer = tokio::time::timeout(ACK_TIMEOUT, client.write(batch)).await;
                (seq, answer)
            });
        }
        let Some(joined) = calls.join_next().await else {
            return Ok(broken.unwrap_or(Duration::ZERO));
        };
        let (seq, answer) = joined.map_err(|e| format!("write task failed: {e}"))?;
        in_flight.remove(&seq);
        match answer {
            Ok(Ok(response)) => {
                let ack = response.into_inner();
                if ack.seq != seq {
                    return Err(format!(
                        "agent {}: Write of seq {seq} answered {ack:?}",
                        agent.id
                    ));
                }
                if let Some(pause) = agent.on_ack(shared, &ack)? {
                    broken.get_or_insert(pause);
                }
            }
            // Transport failure (collector killed) or timeout: finish the other calls, then reconnect.
            _ => {
                broken.get_or_insert(RECONNECT_PAUSE);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Checks

/// Runs SQL and returns the CSV lines after the header.
fn sql_csv(collector: &CollectorProc, sql: &str) -> Vec<String> {
    let (code, body) = http_post(
        &format!("{}/api/v1/sql?format=csv", collector.http),
        sql.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 200, "{sql}: {body}");
    body.lines().skip(1).map(str::to_owned).collect()
}

/// (rows, distinct ids) stored so far.
fn stored_counts(collector: &CollectorProc) -> (u64, u64) {
    let rows = collector.sql(&format!(
        "SELECT count(*) AS n, count(DISTINCT id) AS d FROM {TABLE}"
    ));
    (
        rows[0]["n"].as_u64().unwrap(),
        rows[0]["d"].as_u64().unwrap(),
    )
}

/// Every stored row is a point some agent sent, intact; returns the ids in order.
fn stored_ids_checked(collector: &CollectorProc) -> Vec<u64> {
    let lines = sql_csv(
        collector,
        &format!("SELECT id, agent, slot, seq, value, note, time FROM {TABLE} ORDER BY id"),
    );
    let mut ids = Vec::with_capacity(lines.len());
    for line in lines {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), 7, "{line}");
        let id: u64 = cols[0].parse().unwrap();
        let (agent, seq, index) = (
            id / 1_000_000_000_000,
            id / 1_000 % 1_000_000_000,
            id % 1_000,
        );
        assert_eq!(cols[1], agent_name(agent), "agent of {line}");
        assert_eq!(cols[2], format!("s{index}"), "slot of {line}");
        assert_eq!(cols[3], seq.to_string(), "seq of {line}");
        assert_eq!(
            cols[4].parse::<f64>().unwrap(),
            value_of(id),
            "value of {line}"
        );
        assert_eq!(cols[5], note_of(id), "note of {line}");
        assert!(!cols[6].is_empty(), "time of {line}");
        ids.push(id);
    }
    ids
}

/// Ids of every point the agents had acknowledged.
fn acked_ids(agents: &[Agent]) -> Vec<u64> {
    let mut ids: Vec<u64> = agents
        .iter()
        .flat_map(|a| {
            a.acked
                .iter()
                .flat_map(move |&seq| (0..POINTS_PER_BATCH).map(move |i| point_id(a.id, seq, i)))
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Compares two sorted id lists; names a few ids that differ.
fn assert_same_ids(what: &str, got: &[u64], expected: &[u64]) {
    if got == expected {
        return;
    }
    let dupes: Vec<u64> = got
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .take(10)
        .collect();
    let got_set: BTreeSet<u64> = got.iter().copied().collect();
    let expected_set: BTreeSet<u64> = expected.iter().copied().collect();
    let missing: Vec<u64> = expected_set
        .difference(&got_set)
        .take(10)
        .copied()
        .collect();
    let extra: Vec<u64> = got_set
        .difference(&expected_set)
        .take(10)
        .copied()
        .collect();
    panic!(
        "{what}: {} rows, {} acknowledged points; duplicated {dupes:?}, missing {missing:?}, never acknowledged \
         {extra:?}",
        got.len(),
        expected.len()
    );
}

/// `*.tmp` files in the store: a Parquet write that the kill interrupted.
fn tmp_files(data_dir: &Path) -> usize {
    fn walk(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    usize::from(p.extension().is_some_and(|x| x == "tmp"))
                }
            })
            .sum()
    }
    walk(&data_dir.join("data"))
}

fn write_config(path: &Path, toml: &str) -> String {
    std::fs::write(path, toml).unwrap();
    path.to_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

const KILLS: usize = 5;

#[test]
fn sigkill_under_load_loses_nothing_acknowledged_and_stores_it_exactly_once() {
    let (mut rng, seed) = Rng::from_env("DAMSELFLY_DURABILITY_SEED");
    println!(
        "durability seed {seed} (re-run the same kill schedule with DAMSELFLY_DURABILITY_SEED={seed})"
    );
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("store");
    // Flush every second and at 256 KiB: kills land during Parquet writes too. WAL policy: the default (fsync).
    let config = write_config(
        &scratch.path().join("collector.toml"),
        "flush_buffer_bytes = 262144\n",
    );
    let flags = ["--config", config.as_str(), "--flush-interval", "1"];
    let mut collector = CollectorProc::start(&data_dir, &flags);

    let shared = Arc::new(Shared {
        url: RwLock::new(collector.grpc.clone()),
        generate: AtomicBool::new(true),
        acked_points: AtomicU64::new(0),
        failure: Mutex::new(None),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Two pushing agents (8 batches in flight, like damselfly-agent) and two unary ones (4 concurrent calls).
    let handles: Vec<tokio::task::JoinHandle<Agent>> = (0..4u64)
        .map(|id| {
            let shared = shared.clone();
            if id < 2 {
                rt.spawn(run_push_agent(shared, Agent::new(id), 8))
            } else {
                rt.spawn(run_unary_agent(shared, Agent::new(id), 4))
            }
        })
        .collect();

    let started = Instant::now();
    let mut interrupted_parquet_writes = 0;
    for kill in 1..=KILLS {
        let delay = rng.millis(300, 2500);
        std::thread::sleep(delay);
        shared.check();
        let acked_before = shared.acked_points.load(Ordering::SeqCst);
        collector.proc.kill();
        let tmp = tmp_files(&data_dir);
        interrupted_parquet_writes += usize::from(tmp > 0);
        println!(
            "kill {kill}/{KILLS} after {delay:?}: {acked_before} points acknowledged so far, {tmp} Parquet \
             writes cut short"
        );
        // Agents find nobody for a moment.
        std::thread::sleep(rng.millis(0, 300));
        collector = CollectorProc::start(&data_dir, &flags);
        *shared.url.write().unwrap() = collector.grpc.clone();
        let (rows, distinct) = stored_counts(&collector);
        assert_eq!(
            rows, distinct,
            "after restart {kill}: a point is stored twice"
        );
        assert!(
            rows >= acked_before,
            "after restart {kill}: {rows} rows stored, but {acked_before} points were acknowledged before the kill"
        );
    }

    // Let the restarted collector take load, then deliver everything still pending.
    std::thread::sleep(rng.millis(300, 1000));
    shared.generate.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handles.iter().all(|h| h.is_finished()) {
        shared.check();
        assert!(
            Instant::now() < deadline,
            "agents did not deliver their pending batches within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    shared.check();
    let agents: Vec<Agent> = handles
        .into_iter()
        .map(|h| rt.block_on(h).unwrap())
        .collect();
    for a in &agents {
        println!(
            "agent {}: {} batches acknowledged ({} STORED, {} DUPLICATE), {} RETRY, {} connections",
            a.id,
            a.acked.len(),
            a.stored_acks,
            a.duplicate_acks,
            a.retry_acks,
            a.sessions
        );
        assert!(a.pending.is_empty());
    }
    let expected = acked_ids(&agents);
    println!(
        "{} points acknowledged in {:?}; {interrupted_parquet_writes} of {KILLS} kills cut a Parquet write short",
        expected.len(),
        started.elapsed()
    );
    assert!(
        expected.len() as u64 > 1000 * POINTS_PER_BATCH,
        "the load was too light to mean anything: {} points",
        expected.len()
    );

    // SQL over files and buffer: every acknowledged point exactly once, intact, and nothing else.
    let stored = stored_ids_checked(&collector);
    assert_same_ids("SQL before the final flush", &stored, &expected);

    // A clean stop flushes everything to Parquet; an independent reader sees the same points, once each.
    let status = collector.proc.terminate();
    assert!(status.success(), "collector exit: {status:?}");
    assert_eq!(tmp_files(&data_dir), 0);
    let files = parquet_files(&data_dir);
    assert!(!files.is_empty());
    let listing = scratch.path().join("parquet-ids.txt");
    let script = format!(
        "import sys, pyarrow.parquet as pq\n\
         ids = []\n\
         for path in sys.argv[2:]:\n\
         \x20   if '/{TABLE}/' in path:\n\
         \x20       ids.extend(pq.read_table(path, columns=['id']).column('id').to_pylist())\n\
         ids.sort()\n\
         open(sys.argv[1], 'w').write('\\n'.join(map(str, ids)))\n"
    );
    let out = std::process::Command::new(python_with_pyarrow())
        .arg("-c")
        .arg(&script)
        .arg(&listing)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let in_parquet: Vec<u64> = std::fs::read_to_string(&listing)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_same_ids(
        "Parquet files after the final flush",
        &in_parquet,
        &expected,
    );

    // And a restart over the flushed store replays nothing twice.
    let collector = CollectorProc::start(&data_dir, &flags);
    let (rows, distinct) = stored_counts(&collector);
    assert_eq!(
        (rows, distinct),
        (expected.len() as u64, expected.len() as u64)
    );
}
