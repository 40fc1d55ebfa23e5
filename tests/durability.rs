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

// ---------------------------------------------------------------------------------------------------------------
// Backpressure: a flood beyond the hard limit

const FLOOD_TABLE: &str = "flood";
const FLOOD_POINTS: u64 = 2_000;
/// The collector's hard limit in the flood test.
const FLOOD_MAX_BUFFER: u64 = 32 << 20;

fn flood_id(flooder: u64, seq: u64, index: u64) -> u64 {
    flooder * 1_000_000_000 + seq * 10_000 + index
}

/// A fat batch: a high-cardinality tag (dictionary growth) and a ~100-byte string per row.
#[allow(clippy::needless_update)]
fn flood_batch(flooder: u64, seq: u64) -> WriteBatch {
    let points = (0..FLOOD_POINTS)
        .map(|i| {
            let id = flood_id(flooder, seq, i);
            Point {
                measurement: FLOOD_TABLE.into(),
                tags: vec![Tag {
                    key: "series".into(),
                    value: format!("series-{}", (seq * FLOOD_POINTS + i) % 50_000),
                }],
                fields: vec![
                    Field {
                        key: "id".into(),
                        value: Some(Value::U64(id)),
                    },
                    Field {
                        key: "value".into(),
                        value: Some(Value::F64(id as f64 / 3.0)),
                    },
                    Field {
                        key: "payload".into(),
                        value: Some(Value::Str(format!("{id:016x}").repeat(6))),
                    },
                ],
                time_unix_nano: T0 + seq as i64 * 1_000_000 + i as i64,
            }
        })
        .collect();
    WriteBatch {
        agent_id: format!("flooder-{flooder}"),
        seq,
        common_tags: vec![Tag {
            key: "flooder".into(),
            value: format!("f{flooder}"),
        }],
        points,
        ..WriteBatch::default()
    }
}

/// What one flooder got through.
#[derive(Debug, Default)]
struct Flooded {
    flooder: u64,
    acked_batches: u64,
    acked_points: u64,
    id_sum: u128,
    retries: u64,
    /// A unary RETRY came as UNAVAILABLE with a google.rpc.RetryInfo and the retry metadata.
    retry_info_seen: bool,
}

impl Flooded {
    fn acked(&mut self, seq: u64) {
        self.acked_batches += 1;
        self.acked_points += FLOOD_POINTS;
        self.id_sum += (0..FLOOD_POINTS)
            .map(|i| u128::from(flood_id(self.flooder, seq, i)))
            .sum::<u128>();
    }
}

/// `google.rpc.Status` and `google.rpc.RetryInfo`, decoded independently of the collector's own definitions.
#[derive(Clone, PartialEq, prost::Message)]
struct GoogleRpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<GoogleAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GoogleAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GoogleRetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<GoogleDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GoogleDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The retry delay a unary `Write` refusal carries, checked in all three places it is given.
fn retry_delay_of(status: &tonic::Status) -> Duration {
    use prost::Message;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("retry later"),
        "{}",
        status.message()
    );
    let details = GoogleRpcStatus::decode(status.details()).expect("google.rpc.Status details");
    assert_eq!(details.code, tonic::Code::Unavailable as i32);
    let info = details
        .details
        .iter()
        .find(|d| d.type_url == "type.googleapis.com/google.rpc.RetryInfo")
        .expect("a RetryInfo detail");
    let delay = GoogleRetryInfo::decode(info.value.as_slice())
        .expect("RetryInfo")
        .retry_delay
        .expect("retry_delay");
    let delay = Duration::new(delay.seconds as u64, delay.nanos as u32);
    let ms = |key: &str| -> u64 {
        status
            .metadata()
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(ms("retry-after-ms"), delay.as_millis() as u64);
    assert_eq!(ms("grpc-retry-pushback-ms"), delay.as_millis() as u64);
    assert!(delay >= Duration::from_millis(100), "{delay:?}");
    delay
}

/// A greedy pushing client: keeps 16 batches in flight on one stream and re-sends a RETRY'd batch on the same
/// stream 20 ms later (ignoring the hint: it is the worst case, not an agent).
async fn push_flooder(flooder: u64, url: String, flooding: Arc<AtomicBool>) -> Flooded {
    let mut out = Flooded {
        flooder,
        ..Flooded::default()
    };
    let mut client = connect(&url).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteBatch>(64);
    let mut in_flight: VecDeque<WriteBatch> = VecDeque::new();
    let mut again: VecDeque<WriteBatch> = VecDeque::new();
    let mut next_seq = 1;
    let first = flood_batch(flooder, next_seq);
    next_seq += 1;
    in_flight.push_back(first.clone());
    tx.send(first).await.unwrap();
    let mut acks = client
        .push(ReceiverStream::new(rx))
        .await
        .expect("Push")
        .into_inner();
    loop {
        while in_flight.len() < 16 {
            let batch = match again.pop_front() {
                Some(b) => b,
                None if flooding.load(Ordering::SeqCst) => {
                    next_seq += 1;
                    flood_batch(flooder, next_seq - 1)
                }
                None => break,
            };
            in_flight.push_back(batch.clone());
            tx.send(batch).await.unwrap();
        }
        let Some(sent) = in_flight.pop_front() else {
            return out;
        };
        let ack = tokio::time::timeout(Duration::from_secs(60), acks.message())
            .await
            .expect("an ack within 60 s")
            .expect("ack stream")
            .expect("one ack per batch");
        assert_eq!(ack.seq, sent.seq);
        match ack.status() {
            AckStatus::Stored | AckStatus::Duplicate => out.acked(ack.seq),
            AckStatus::Retry => {
                assert!(ack.retry_after_ms >= 100, "{ack:?}");
                assert!(ack.message.contains("retry later"), "{ack:?}");
                out.retries += 1;
                again.push_back(sent);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => panic!("flooder {flooder}: {ack:?}"),
        }
    }
}

/// A greedy unary client: 8 `Write` calls at once; a refused one is re-sent 20 ms later.
async fn unary_flooder(flooder: u64, url: String, flooding: Arc<AtomicBool>) -> Flooded {
    let mut out = Flooded {
        flooder,
        ..Flooded::default()
    };
    let client = connect(&url).await.expect("connect");
    let mut calls = tokio::task::JoinSet::new();
    let mut again: VecDeque<WriteBatch> = VecDeque::new();
    let mut next_seq = 1;
    loop {
        while calls.len() < 8 {
            let batch = match again.pop_front() {
                Some(b) => b,
                None if flooding.load(Ordering::SeqCst) => {
                    next_seq += 1;
                    flood_batch(flooder, next_seq - 1)
                }
                None => break,
            };
            let mut client = client.clone();
            calls.spawn(async move {
                let answer =
                    tokio::time::timeout(Duration::from_secs(60), client.write(batch.clone()))
                        .await
                        .expect("an answer within 60 s");
                (batch, answer)
            });
        }
        let Some(joined) = calls.join_next().await else {
            return out;
        };
        let (batch, answer) = joined.unwrap();
        match answer {
            Ok(ack) => {
                let ack = ack.into_inner();
                assert!(
                    matches!(ack.status(), AckStatus::Stored | AckStatus::Duplicate),
                    "{ack:?}"
                );
                out.acked(batch.seq);
            }
            Err(status) => {
                retry_delay_of(&status);
                out.retry_info_seen = true;
                out.retries += 1;
                again.push_back(batch);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The collector's resident set size, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the collector's resident memory must stay under in the flood (hard limit 32 MiB): about 40 MiB idle, plus
/// the full buffer, the same rows frozen and being written (with the flush's sorted copy and Parquet pages), writes
/// in progress (a quarter of the limit), queries, and the allocator's slack. Without the limits it grows with the
/// data: the flood pushes several hundred MiB through.
const FLOOD_RSS_BOUND: u64 = 320 << 20;

#[test]
fn a_flood_beyond_the_hard_limit_gets_retry_while_memory_stays_bounded_and_queries_answer() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("store");
    // Flush only at the hard limit (32 MiB), no timed flush: while the full buffer is written as Parquet, writes
    // wait up to 500 ms for space, then are told to retry.
    let config = write_config(
        &scratch.path().join("collector.toml"),
        &format!(
            "max_buffer_bytes = {FLOOD_MAX_BUFFER}\nflush_buffer_bytes = {FLOOD_MAX_BUFFER}\n\
             backpressure_wait_ms = 500\nquery_memory_bytes = 67108864\n"
        ),
    );
    let collector = CollectorProc::start(
        &data_dir,
        &[
            "--config",
            &config,
            "--flush-interval",
            "3600",
            "--wal-sync",
            "none",
        ],
    );
    let pid = collector.proc.child.id();
    let idle_rss = rss_bytes(pid).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let flooding = Arc::new(AtomicBool::new(true));
    // Three greedy push streams and three greedy unary clients.
    let flooders: Vec<tokio::task::JoinHandle<Flooded>> = (0..6u64)
        .map(|f| {
            let url = collector.grpc.clone();
            if f < 3 {
                rt.spawn(push_flooder(f, url, flooding.clone()))
            } else {
                rt.spawn(unary_flooder(f, url, flooding.clone()))
            }
        })
        .collect();

    common::wait_until(Duration::from_secs(30), "the first flood rows", || {
        collector.count(FLOOD_TABLE) > 0
    });
    // Watch memory and keep querying while the flood runs.
    let started = Instant::now();
    let mut max_rss = idle_rss;
    let mut queries = 0;
    let mut last_query = Instant::now() - Duration::from_secs(1);
    let mut max_buffered_rows = 0;
    let mut stored_rows = 0;
    // At least 15 s, and until several times what a full buffer holds has gone through (at most 60 s).
    while started.elapsed() < Duration::from_secs(15)
        || (stored_rows < 3 * max_buffered_rows && started.elapsed() < Duration::from_secs(60))
    {
        let rss = rss_bytes(pid).unwrap();
        max_rss = max_rss.max(rss);
        assert!(
            rss < FLOOD_RSS_BOUND,
            "collector RSS {} MiB after {:?} of flood; the bound is {} MiB",
            rss >> 20,
            started.elapsed(),
            FLOOD_RSS_BOUND >> 20
        );
        if last_query.elapsed() >= Duration::from_millis(500) {
            last_query = Instant::now();
            let rows = collector.sql(&format!(
                "SELECT flooder, count(*) AS n, max(value) AS v FROM {FLOOD_TABLE} GROUP BY flooder"
            ));
            assert!(rows.len() <= 6, "{rows:?}");
            stored_rows = rows.iter().map(|r| r["n"].as_u64().unwrap()).sum::<u64>();
            queries += 1;
            let (code, health) = common::http_get(&format!("{}/health", collector.http)).unwrap();
            assert_eq!(code, 200, "{health}");
            let health: serde_json::Value = serde_json::from_str(&health).unwrap();
            max_buffered_rows =
                max_buffered_rows.max(health["store"]["buffered_rows"].as_u64().unwrap());
            println!(
                "{:>5.1} s: rss {:>4} MiB, buffered {:>3} MiB ({} rows), query {} ms",
                started.elapsed().as_secs_f64(),
                rss >> 20,
                health["store"]["buffered_bytes"].as_u64().unwrap() >> 20,
                health["store"]["buffered_rows"],
                last_query.elapsed().as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stop making new batches; the flooders deliver what was refused.
    flooding.store(false, Ordering::SeqCst);
    let flooded: Vec<Flooded> = flooders
        .into_iter()
        .map(|h| rt.block_on(h).unwrap())
        .collect();
    max_rss = max_rss.max(rss_bytes(pid).unwrap());
    let acked_points: u64 = flooded.iter().map(|f| f.acked_points).sum();
    let push_retries: u64 = flooded[..3].iter().map(|f| f.retries).sum();
    let unary_retries: u64 = flooded[3..].iter().map(|f| f.retries).sum();
    println!(
        "flood: RSS idle {} MiB, max {} MiB (bound {} MiB); {acked_points} points acknowledged; {push_retries} RETRY \
         acks on push streams, {unary_retries} UNAVAILABLE on unary writes; {queries} queries answered",
        idle_rss >> 20,
        max_rss >> 20,
        FLOOD_RSS_BOUND >> 20
    );
    assert!(
        push_retries > 0 && unary_retries > 0,
        "the flood never reached the hard limit: {flooded:?}"
    );
    assert!(flooded[3..].iter().any(|f| f.retry_info_seen));
    assert!(queries >= 3, "{queries} queries answered during the flood");
    // Far more went through than the buffer holds, so the bound above is the limits' doing.
    assert!(
        acked_points >= 3 * max_buffered_rows,
        "only {acked_points} points acknowledged; the buffer held up to {max_buffered_rows} rows"
    );

    // Everything acknowledged is stored, once.
    let lines = sql_csv(
        &collector,
        &format!(
            "SELECT flooder, count(*) AS n, count(DISTINCT id) AS d, sum(id) AS s FROM {FLOOD_TABLE} \
             GROUP BY flooder ORDER BY flooder"
        ),
    );
    let stored: Vec<(String, u64, u64, u128)> = lines
        .iter()
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                c[0].to_owned(),
                c[1].parse().unwrap(),
                c[2].parse().unwrap(),
                c[3].parse().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, u64, u128)> = flooded
        .iter()
        .map(|f| {
            (
                format!("f{}", f.flooder),
                f.acked_points,
                f.acked_points,
                f.id_sum,
            )
        })
        .collect();
    assert_eq!(
        stored, expected,
        "(flooder, rows, distinct ids, sum of ids)"
    );
    let (code, health) = common::http_get(&format!("{}/health", collector.http)).unwrap();
    assert_eq!(code, 200, "{health}");
}

// ---------------------------------------------------------------------------------------------------------------
// Runaway queries

/// Runs SQL; returns the status and the `error` text (empty on success).
fn sql_status(collector: &CollectorProc, sql: &str) -> (u16, String) {
    let (code, body) =
        http_post(&format!("{}/api/v1/sql", collector.http), sql.as_bytes()).unwrap();
    if code == 200 {
        return (code, String::new());
    }
    let error: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{sql}: {e}: {body}"));
    (code, error["error"].as_str().unwrap().to_owned())
}

#[test]
fn runaway_queries_are_stopped_with_an_error_naming_the_limit_and_the_collector_keeps_serving() {
    let scratch = tempfile::tempdir().unwrap();
    let config = write_config(
        &scratch.path().join("collector.toml"),
        "query_timeout_secs = 2\nquery_memory_bytes = 16777216\n",
    );
    let collector = CollectorProc::start(&scratch.path().join("store"), &["--config", &config]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared {
        url: RwLock::new(collector.grpc.clone()),
        generate: AtomicBool::new(true),
        acked_points: AtomicU64::new(0),
        failure: Mutex::new(None),
    });
    // An agent keeps writing throughout: ingest must not stall behind the runaway queries.
    let agent = rt.spawn(run_push_agent(shared.clone(), Agent::new(0), 4));
    common::wait_until(Duration::from_secs(30), "first rows", || {
        collector.count(TABLE) > 0
    });

    // 10^10 rows of cross join: stopped by the timeout.
    let (code, error) = sql_status(
        &collector,
        "SELECT count(*) FROM range(100000) a CROSS JOIN range(100000) b",
    );
    assert_eq!(code, 504, "{error}");
    assert!(
        error.contains("did not finish within 2s") && error.contains("query_timeout_secs"),
        "{error}"
    );

    // A hash join whose build side (20 million rows) cannot spill: stopped by the memory pool.
    let (code, error) = sql_status(
        &collector,
        "SELECT count(*) FROM range(20000000) a JOIN range(20000000) b ON a.value = b.value",
    );
    assert_eq!(code, 503, "{error}");
    assert!(
        error.contains("needs more memory than query_memory_bytes (16777216 bytes"),
        "{error}"
    );
    assert!(error.contains("Resources exhausted"), "{error}");

    // Bad SQL stays a 400 of its own.
    let (code, error) = sql_status(&collector, "SELEC 1");
    assert_eq!(code, 400, "{error}");

    // The collector still serves: health, queries, and the agent's writes all went through.
    let (code, health) = common::http_get(&format!("{}/health", collector.http)).unwrap();
    assert_eq!(code, 200, "{health}");
    let acked_before = shared.acked_points.load(Ordering::SeqCst);
    common::wait_until(Duration::from_secs(30), "more writes acknowledged", || {
        shared.acked_points.load(Ordering::SeqCst) > acked_before
    });
    shared.generate.store(false, Ordering::SeqCst);
    let agent = rt.block_on(agent).unwrap();
    shared.check();
    let (rows, distinct) = stored_counts(&collector);
    assert_eq!(
        (rows, distinct),
        (
            agent.acked.len() as u64 * POINTS_PER_BATCH,
            agent.acked.len() as u64 * POINTS_PER_BATCH
        )
    );
}
