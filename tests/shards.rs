//! Sharded collectors, black-box: three (then four) `damselfly collector` processes on 127.0.0.1 sharing one store.
//!
//! * 10,000 agent ids spread evenly (each shard within ±10% of its share); adding a fourth shard (shards_file
//!   rewritten, every shard reloads it) moves about a quarter of them, all to the new shard.
//! * Simulated agents that follow the protocol (rendezvous ranking, REDIRECT, failover with the unreachable-shards
//!   metadata) under load; one shard is SIGKILLed: its agents re-home, a query through another shard names it as
//!   missing; it restarts and its agents return; in the end the rows stored equal the points acknowledged, each
//!   (agent, seq, point) once, in a query through any shard.
//! * A real `damselfly-agent` whose shard is killed keeps delivering (through another shard).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    CollectorProc, free_port, http_get, http_request, now_nanos, sql_with_headers, wait_until,
};
use damselfly_proto::v1::field::Value;
use damselfly_proto::v1::ingest_client::IngestClient;
use damselfly_proto::v1::{AckStatus, Field, Point, Tag, WriteBatch};
use tonic::transport::Channel;

struct Shard {
    id: String,
    grpc: u16,
    http: u16,
}

impl Shard {
    fn new(i: usize) -> Shard {
        Shard {
            id: format!("s{i}"),
            grpc: free_port(),
            http: free_port(),
        }
    }

    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

/// A deployment in one temporary directory: the shards file, the shared store, one data directory per shard.
struct Deployment {
    dir: tempfile::TempDir,
    shards: Vec<Shard>,
    procs: Vec<Option<CollectorProc>>,
    /// More lines for every shard's config file.
    extra_config: String,
}

impl Deployment {
    fn new(n: usize) -> Deployment {
        Deployment::with_config(n, "")
    }

    fn with_config(n: usize, extra_config: &str) -> Deployment {
        let mut d = Deployment {
            dir: tempfile::tempdir().unwrap(),
            shards: (0..n).map(Shard::new).collect(),
            procs: Vec::new(),
            extra_config: extra_config.to_string(),
        };
        d.write_shards_file();
        for i in 0..n {
            let p = d.start(i);
            d.procs.push(Some(p));
        }
        d
    }

    fn shards_file(&self) -> PathBuf {
        self.dir.path().join("shards.toml")
    }

    fn write_shards_file(&self) {
        let mut text = String::new();
        for s in &self.shards {
            text.push_str(&format!(
                "[[shards]]\nid = \"{}\"\ngrpc_url = \"http://127.0.0.1:{}\"\nhttp_url = \"http://127.0.0.1:{}\"\n\n",
                s.id, s.grpc, s.http
            ));
        }
        // Written next to it and renamed: a shard never reads half a file.
        let tmp = self.dir.path().join("shards.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.shards_file()).unwrap();
    }

    fn start(&self, i: usize) -> CollectorProc {
        let s = &self.shards[i];
        let data = self.dir.path().join(&s.id);
        let shared = self.dir.path().join("shared");
        let file = self.shards_file();
        // Two files of an hour are enough for a compaction (`POST /api/v1/admin/maintenance`).
        let config = self.dir.path().join("collector.toml");
        std::fs::write(
            &config,
            format!("compaction_min_files = 2\n{}", self.extra_config),
        )
        .unwrap();
        CollectorProc::start_at(
            &data,
            &format!("127.0.0.1:{}", s.grpc),
            &format!("127.0.0.1:{}", s.http),
            &[
                "--shard-id",
                &s.id,
                "--shards-file",
                file.to_str().unwrap(),
                "--shared-dir",
                shared.to_str().unwrap(),
                "--flush-interval",
                "3600",
                "--config",
                config.to_str().unwrap(),
            ],
        )
    }

    fn add_shard(&mut self) {
        self.shards.push(Shard::new(self.shards.len()));
        self.write_shards_file();
        let p = self.start(self.shards.len() - 1);
        self.procs.push(Some(p));
    }

    /// Waits until shard `via` lists `n` shards, `live` of them live.
    fn wait_for_map(&self, via: usize, n: usize, live: usize) {
        wait_until(Duration::from_secs(20), "the shard map", || {
            let Ok((200, body)) =
                http_get(&format!("{}/api/v1/shards", self.shards[via].http_url()))
            else {
                return false;
            };
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let shards = v["shards"].as_array().unwrap();
            shards.len() == n && shards.iter().filter(|s| s["live"] == true).count() == live
        });
    }
}

/// `POST <url>` with an empty body: (status, body text).
fn post_empty(url: &str) -> (u16, String) {
    let (code, body) = http_request("POST", url, &[], b"").unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn assign(http: &str, ids: &[String]) -> HashMap<String, String> {
    let body = serde_json::json!({ "agent_ids": ids }).to_string();
    let (code, body) = http_request(
        "POST",
        &format!("{http}/api/v1/shards/assign"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["owners"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn agents_spread_evenly_and_a_new_shard_takes_only_its_share() {
    let mut d = Deployment::new(3);
    d.wait_for_map(0, 3, 3);
    let ids: Vec<String> = (0..10_000).map(|i| format!("vm-{i:05}.agent")).collect();
    let before = assign(&d.shards[1].http_url(), &ids);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in before.values() {
        *counts.entry(owner).or_default() += 1;
    }
    let share = ids.len() as f64 / 3.0;
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (shard, n) in &counts {
        assert!(
            (*n as f64 - share).abs() <= share * 0.10,
            "shard {shard} got {n} of 10000 agents, not within 10% of {share:.0}: {counts:?}"
        );
    }

    // A batch sent to a shard that does not own its agent is redirected to the owner, and not stored; the same
    // batch with the owner named unreachable is stored there.
    let agent = "redirect-probe";
    let owner = damselfly_proto::shards::owner(agent, ["s0", "s1", "s2"]).unwrap();
    let other = ["s0", "s1", "s2"]
        .into_iter()
        .find(|s| *s != owner)
        .unwrap();
    let other_grpc = format!(
        "http://127.0.0.1:{}",
        d.shards[other[1..].parse::<usize>().unwrap()].grpc
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (redirect, stored) = rt.block_on(async {
        let mut c = client(&other_grpc).await.unwrap();
        let redirect = c.write(batch(agent, 1)).await.unwrap().into_inner();
        let mut request = tonic::Request::new(batch(agent, 1));
        request
            .metadata_mut()
            .insert("damselfly-unreachable-shards", owner.parse().unwrap());
        let stored = c.write(request).await.unwrap().into_inner();
        (redirect, stored)
    });
    assert_eq!(redirect.status, AckStatus::Redirect as i32, "{redirect:?}");
    let info = redirect.redirect.unwrap();
    assert_eq!(info.id, owner);
    assert_eq!(
        info.grpc_url,
        format!(
            "http://127.0.0.1:{}",
            d.shards[owner[1..].parse::<usize>().unwrap()].grpc
        )
    );
    assert_eq!(stored.status, AckStatus::Stored as i32, "{stored:?}");

    // A fourth shard: the file is rewritten, every shard reloads it on its own.
    d.add_shard();
    for via in 0..4 {
        d.wait_for_map(via, 4, 4);
    }
    let after = assign(&d.shards[0].http_url(), &ids);
    let moved: Vec<&String> = ids.iter().filter(|id| before[*id] != after[*id]).collect();
    for id in &moved {
        assert_eq!(
            after[*id], "s3",
            "{id} moved from {} to {}",
            before[*id], after[*id]
        );
    }
    let expected = ids.len() as f64 / 4.0;
    assert!(
        (moved.len() as f64 - expected).abs() <= expected * 0.10,
        "{} of 10000 agents moved; expected about {expected:.0}",
        moved.len()
    );
    // Every shard answers the same.
    assert_eq!(assign(&d.shards[3].http_url(), &ids), after);

    // A reload without a change says so; a broken file is refused and the map kept.
    let (code, body) = post_empty(&format!("{}/api/v1/shards/reload", d.shards[2].http_url()));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"changed\":false"));
    std::fs::write(d.shards_file(), "[[shards]]\nid = \"s0\"\n").unwrap();
    let (code, body) = post_empty(&format!("{}/api/v1/shards/reload", d.shards[2].http_url()));
    assert_eq!(code, 400);
    assert!(body.contains("shards_file"), "{body}");
    d.wait_for_map(2, 4, 4);
}

// ---------------------------------------------------------------------------------------------------------------
// Simulated agents that follow the shard protocol with unary writes.

const TABLE: &str = "shardload";
const POINTS_PER_BATCH: u64 = 10;

#[derive(Default)]
struct Tally {
    /// (agent, seq) of every acknowledged batch (STORED or DUPLICATE).
    acked: HashSet<(String, u64)>,
    /// Shards that acknowledged each agent's batches, in order of first acknowledgement after each switch.
    homes: HashMap<String, Vec<(Instant, String)>>,
    redirects: u64,
    failovers: u64,
}

fn batch(agent: &str, seq: u64) -> WriteBatch {
    let base = now_nanos();
    WriteBatch {
        agent_id: agent.to_string(),
        seq,
        common_tags: vec![Tag {
            key: "agent".into(),
            value: agent.to_string(),
        }],
        points: (0..POINTS_PER_BATCH)
            .map(|i| Point {
                measurement: TABLE.into(),
                tags: vec![],
                fields: vec![
                    Field {
                        key: "seq".into(),
                        value: Some(Value::U64(seq)),
                    },
                    Field {
                        key: "i".into(),
                        value: Some(Value::U64(i)),
                    },
                ],
                time_unix_nano: base + i as i64,
            })
            .collect(),
        chunks: vec![],
    }
}

async fn client(url: &str) -> Option<IngestClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(5));
    endpoint.connect().await.ok().map(IngestClient::new)
}

/// One simulated agent: sends batch after batch until `stop`, following redirects and failing over.
async fn run_agent(
    agent: String,
    shards: Arc<Vec<(String, String)>>,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let ids: Vec<&str> = shards.iter().map(|(id, _)| id.as_str()).collect();
    let ranking: Vec<String> = damselfly_proto::shards::rank(&agent, ids.iter().copied())
        .into_iter()
        .map(str::to_string)
        .collect();
    let url_of = |id: &str| shards.iter().find(|(i, _)| i == id).map(|(_, u)| u.clone());
    let mut down: HashMap<String, Instant> = HashMap::new();
    let mut clients: HashMap<String, IngestClient<Channel>> = HashMap::new();
    let mut redirect_to: Option<String> = None;
    let mut current: Option<String> = None;
    let mut seq = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        down.retain(|_, until| *until > now);
        let target = match redirect_to.take() {
            Some(t) => t,
            None => match ranking.iter().find(|s| !down.contains_key(*s)) {
                Some(t) => t.clone(),
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if !clients.contains_key(&target) {
            match client(&url_of(&target).unwrap()).await {
                Some(c) => {
                    clients.insert(target.clone(), c);
                }
                None => {
                    down.insert(target.clone(), Instant::now() + Duration::from_secs(1));
                    tally.lock().unwrap().failovers += 1;
                    continue;
                }
            }
        }
        let mut request = tonic::Request::new(batch(&agent, seq));
        let unreachable: Vec<&str> = down.keys().map(String::as_str).collect();
        if !unreachable.is_empty() {
            request.metadata_mut().insert(
                "damselfly-unreachable-shards",
                unreachable.join(",").parse().unwrap(),
            );
        }
        let c = clients.get_mut(&target).unwrap();
        match c.write(request).await {
            Ok(response) => {
                let ack = response.into_inner();
                match AckStatus::try_from(ack.status) {
                    Ok(AckStatus::Stored | AckStatus::Duplicate) => {
                        {
                            let mut t = tally.lock().unwrap();
                            t.acked.insert((agent.clone(), seq));
                            if current.as_deref() != Some(target.as_str()) {
                                t.homes
                                    .entry(agent.clone())
                                    .or_default()
                                    .push((Instant::now(), target.clone()));
                                current = Some(target.clone());
                            }
                        }
                        seq += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(AckStatus::Redirect) => {
                        tally.lock().unwrap().redirects += 1;
                        redirect_to = Some(ack.redirect.unwrap().id);
                    }
                    other => panic!(
                        "{agent} seq {seq}: unexpected ack {other:?}: {}",
                        ack.message
                    ),
                }
            }
            // UNAVAILABLE with a retry hint is "retry later" from a live shard; anything else is a dead one.
            Err(status) if status.metadata().get("retry-after-ms").is_some() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => {
                // The batch's fate there is unknown: it goes to the next shard with the same seq.
                clients.remove(&target);
                down.insert(target.clone(), Instant::now() + Duration::from_secs(1));
                tally.lock().unwrap().failovers += 1;
            }
        }
    }
}

fn counts_via(http: &str) -> (u64, u64, String) {
    let (code, partial, body) = sql_with_headers(
        http,
        &format!(
            "SELECT count(*) AS n, count(DISTINCT concat(agent, '/', CAST(seq AS VARCHAR), '/', CAST(i AS VARCHAR))) AS d FROM {TABLE}"
        ),
    );
    assert_eq!(code, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    (
        rows[0]["n"].as_u64().unwrap(),
        rows[0]["d"].as_u64().unwrap(),
        partial,
    )
}

#[test]
fn a_killed_shard_loses_nothing_and_its_agents_come_back() {
    let mut d = Deployment::new(3);
    for via in 0..3 {
        d.wait_for_map(via, 3, 3);
    }
    let shards: Arc<Vec<(String, String)>> = Arc::new(
        d.shards
            .iter()
            .map(|s| (s.id.clone(), format!("http://127.0.0.1:{}", s.grpc)))
            .collect(),
    );
    let agents: Vec<String> = (0..24).map(|i| format!("sim-{i:02}")).collect();
    let victim = "s1";
    let victims: Vec<&String> = agents
        .iter()
        .filter(|a| damselfly_proto::shards::owner(a, ["s0", "s1", "s2"]) == Some(victim))
        .collect();
    assert!(
        !victims.is_empty(),
        "no simulated agent belongs to {victim}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let runner = {
        let (stop, tally, agents, shards) =
            (stop.clone(), tally.clone(), agents.clone(), shards.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tasks: Vec<_> = agents
                    .into_iter()
                    .map(|a| {
                        tokio::spawn(run_agent(a, shards.clone(), stop.clone(), tally.clone()))
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
        })
    };

    std::thread::sleep(Duration::from_secs(3));
    // Every agent is at home: the first shard that acknowledged it is its owner.
    {
        let t = tally.lock().unwrap();
        for a in &agents {
            let owner = damselfly_proto::shards::owner(a, ["s0", "s1", "s2"]).unwrap();
            let homes = t
                .homes
                .get(a)
                .unwrap_or_else(|| panic!("{a} has no acknowledged batch"));
            assert_eq!(
                homes[0].1, owner,
                "{a} first stored on {} rather than its owner",
                homes[0].1
            );
        }
    }
    // A flush on the victim first, so that some of its rows are in the shared store when it dies.
    let (code, _) = post_empty(&format!("{}/api/v1/admin/flush", d.shards[1].http_url()));
    assert_eq!(code, 200);
    // A second file and a compaction: the victim dies with the compaction's inputs still beside its output (they
    // stay query_timeout_secs + 1 s), which a reader of its directory must count once.
    std::thread::sleep(Duration::from_millis(300));
    for path in ["/api/v1/admin/flush", "/api/v1/admin/maintenance"] {
        let (code, body) = post_empty(&format!("{}{path}", d.shards[1].http_url()));
        assert_eq!(code, 200, "{path}: {body}");
    }
    let compacted = parquet_under(&d.dir.path().join("shared/shard=s1/data").join(TABLE))
        .iter()
        .filter(|p| p.to_string_lossy().contains("-c"))
        .count();
    assert_eq!(compacted, 1, "the victim compacted its two files");
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    d.procs[1].take().unwrap().proc.kill();

    // Its agents re-home to their second choice.
    wait_until(
        Duration::from_secs(15),
        "the victim's agents to re-home",
        || {
            let t = tally.lock().unwrap();
            victims.iter().all(|a| {
                t.homes[*a]
                    .iter()
                    .any(|(at, shard)| *at > killed_at && shard != victim)
            })
        },
    );
    // A query through a live shard names the missing one.
    let (n, distinct, partial) = counts_via(&d.shards[0].http_url());
    assert_eq!(
        n, distinct,
        "with {victim} down, its files are read once each"
    );
    assert_eq!(
        partial, victim,
        "the result must say that {victim} is missing"
    );

    // The victim comes back (same data directory, same ports): its agents return home.
    std::thread::sleep(Duration::from_secs(1));
    let back_at = Instant::now();
    d.procs[1] = Some(d.start(1));
    wait_until(
        Duration::from_secs(20),
        "the victim's agents to return",
        || {
            let t = tally.lock().unwrap();
            victims.iter().all(|a| {
                t.homes[*a]
                    .iter()
                    .any(|(at, shard)| *at > back_at && shard == victim)
            })
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    runner.join().unwrap();

    // What the restarted shard left out of its replay because a peer had stored it (often 0: the window between
    // its WAL commit and its ack is short).
    for line in d.procs[1].as_ref().unwrap().proc.stderr().lines() {
        if line.contains("not replayed") || line.contains("store opened") {
            eprintln!("victim after restart: {line}");
        }
    }
    let t = tally.lock().unwrap();
    let acked_points = t.acked.len() as u64 * POINTS_PER_BATCH;
    eprintln!(
        "acknowledged {} batches ({acked_points} points), {} redirects, {} failovers",
        t.acked.len(),
        t.redirects,
        t.failovers
    );
    // Every acknowledged point exactly once, whichever shard is asked; and again after every shard flushed.
    for round in 0..2 {
        for via in 0..3 {
            let (n, distinct, partial) = counts_via(&d.shards[via].http_url());
            assert_eq!(partial, "", "round {round}: no shard is missing now");
            assert_eq!(
                distinct,
                n,
                "round {round} via s{via}: {} rows stored twice",
                n - distinct
            );
            assert_eq!(
                n, acked_points,
                "round {round} via s{via}: stored {n}, acknowledged {acked_points}"
            );
        }
        for s in &d.shards {
            let (code, _) = post_empty(&format!("{}/api/v1/admin/flush", s.http_url()));
            assert_eq!(code, 200);
        }
    }
    // An independent reader (pyarrow's dataset API, hive partitioning) over the table's files in the shared store
    // (`shard=*/data/<table>/`, as docs/SHARDING.md tells other engines) sees every acknowledged point once, with
    // the shard as a partition column. (The compaction's inputs are gone: the restarted victim removed them.)
    let shared = d.dir.path().join("shared");
    let python = common::python_with_pyarrow();
    let script = r#"
import json, sys, pyarrow.dataset as ds
import glob
files = sorted(glob.glob(sys.argv[1] + "/shard=*/data/" + sys.argv[2] + "/**/*.parquet", recursive=True))
t = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=sys.argv[1]).to_table()
keys = set(zip(t.column("agent").to_pylist(), t.column("seq").to_pylist(), t.column("i").to_pylist()))
print(json.dumps({"rows": t.num_rows, "distinct": len(keys), "shards": sorted(set(t.column("shard").to_pylist()))}))
"#;
    let output = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(shared.to_str().unwrap())
        .arg(TABLE)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(v["rows"], acked_points, "{v}");
    assert_eq!(v["distinct"], acked_points, "{v}");
    assert_eq!(v["shards"], serde_json::json!(["s0", "s1", "s2"]), "{v}");

    // Files carry the shard id in their path, under the one shared store.
    for s in &d.shards {
        let dir = shared
            .join(format!("shard={}", s.id))
            .join("data")
            .join(TABLE);
        let files = parquet_under(&dir);
        assert!(!files.is_empty(), "{} has no files", dir.display());
        for f in files {
            let name = f.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                name.starts_with(&format!("{}-", s.id)),
                "{name} in {}",
                dir.display()
            );
        }
    }
}

fn parquet_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out
}

/// `damselfly up --shards 3`: three shards and the local agent in one process; every shard answers for the whole
/// deployment.
#[test]
fn up_with_three_shards_serves_the_local_agent_through_every_shard() {
    up_with_shards(3, false);
}

/// The same with auth: the shards share the tokens file and send each other the token `up` made for them.
#[test]
fn up_with_shards_and_auth_serves_the_local_agent_through_every_shard() {
    up_with_shards(2, true);
}

fn up_with_shards(n: u16, auth: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let reader = auth.then(|| common::create_token(&data, "read", &[]));
    let (grpc, http) = (free_port(), free_port());
    let log = dir.path().join("up.stderr");
    let child = std::process::Command::new(common::damselfly_bin())
        .args(["up", "--shards", &n.to_string(), "--interval", "1"])
        .args(auth.then_some("--auth"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--grpc",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("127.0.0.1:{http}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _up = common::Proc::adopt(child, "damselfly up --shards", log);
    let urls: Vec<String> = (0..n)
        .map(|i| format!("http://127.0.0.1:{}", http + i))
        .collect();
    // (0, why) while `up` is not listening yet.
    let bearer = reader.as_ref().map(|t| format!("Bearer {t}"));
    let call = |method: &str, url: &str, body: &str| {
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        match http_request(method, url, &headers, body.as_bytes()) {
            Ok((code, body)) => (code, String::from_utf8_lossy(&body).into_owned()),
            Err(e) => (0, e.to_string()),
        }
    };
    for url in &urls {
        wait_until(Duration::from_secs(60), "every shard's map", || {
            let (code, body) = call("GET", &format!("{url}/api/v1/shards"), "");
            code == 200 && body.matches("\"live\":true").count() == usize::from(n)
        });
    }
    let host = sysinfo_hostname();
    for url in &urls {
        wait_until(
            Duration::from_secs(30),
            "the local agent's rows through every shard",
            || {
                let (code, body) = call(
                    "POST",
                    &format!("{url}/api/v1/sql"),
                    "SELECT DISTINCT hostname FROM cpu",
                );
                code == 200 && body.contains(&format!("\"{host}\""))
            },
        );
    }
}

fn sysinfo_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

fn agent_seen(http: &str, agent: &str, within_secs: u64) -> bool {
    let Ok((200, body)) = http_get(&format!("{http}/api/v1/agents")) else {
        return false;
    };
    let agents: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    agents.iter().any(|a| {
        a["agent_id"] == agent
            && a["last_seen_secs_ago"]
                .as_u64()
                .is_some_and(|s| s <= within_secs)
    })
}

fn rows_since(http: &str, agent: &str, since_nanos: i64) -> u64 {
    let (code, _, body) = sql_with_headers(
        http,
        &format!(
            "SELECT count(*) AS n FROM cpu WHERE agent_id = '{agent}' AND time > to_timestamp_nanos({since_nanos})"
        ),
    );
    if code != 200 {
        return 0;
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    rows[0]["n"].as_u64().unwrap_or(0)
}

/// A real `damselfly-agent` seeded with a shard that does not own it: it is redirected to its owner; when the
/// owner is SIGKILLed it keeps delivering through its second choice; when the owner is back it returns.
#[test]
fn a_real_agent_follows_redirects_fails_over_and_returns() {
    let mut d = Deployment::new(3);
    for via in 0..3 {
        d.wait_for_map(via, 3, 3);
    }
    let ids = ["s0", "s1", "s2"];
    // An id whose owner is not s0, the seed, so the first thing it meets is a redirect.
    let agent = (0..)
        .map(|i| format!("real-agent-{i}"))
        .find(|a| damselfly_proto::shards::owner(a, ids) != Some("s0"))
        .unwrap();
    let ranking = damselfly_proto::shards::rank(&agent, ids);
    let index = |id: &str| id[1..].parse::<usize>().unwrap();
    let (owner, second) = (index(ranking[0]), index(ranking[1]));
    let state = d.dir.path().join("agent-state");
    let _agent = common::start_agent(
        &format!("http://127.0.0.1:{}", d.shards[0].grpc),
        &state,
        &["--agent-id", &agent],
    );
    let owner_http = d.shards[owner].http_url();
    let second_http = d.shards[second].http_url();
    wait_until(Duration::from_secs(30), "the agent at its owner", || {
        agent_seen(&owner_http, &agent, 1) && rows_since(&d.shards[0].http_url(), &agent, 0) > 0
    });

    d.procs[owner].take().unwrap().proc.kill();
    let killed = now_nanos();
    wait_until(
        Duration::from_secs(30),
        "the agent's rows through its second choice",
        || agent_seen(&second_http, &agent, 1) && rows_since(&second_http, &agent, killed) > 0,
    );

    // The fleet list of any shard shows the agent once, at the shard that hears from it now.
    let (code, body) = http_get(&format!("{second_http}/api/v1/agents")).unwrap();
    assert_eq!(code, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let entries: Vec<&serde_json::Value> = list.iter().filter(|a| a["agent_id"] == agent).collect();
    assert_eq!(entries.len(), 1, "{body}");
    assert_eq!(entries[0]["shard"], ranking[1], "{body}");

    d.procs[owner] = Some(d.start(owner));
    let back = now_nanos();
    // Heartbeats and batches go to the shard the agent pushes to: the restarted owner hears from it again.
    wait_until(
        Duration::from_secs(60),
        "the agent back at its owner",
        || agent_seen(&owner_http, &agent, 0) && rows_since(&owner_http, &agent, back) > 0,
    );
}

/// `method url` with a bearer token: (status, body text).
fn with_token(method: &str, url: &str, token: &str, body: &str) -> (u16, String) {
    let bearer = format!("Bearer {token}");
    let (code, body) = http_request(
        method,
        url,
        &[("Authorization", &bearer), ("Content-Type", "text/plain")],
        body.as_bytes(),
    )
    .unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn shards_with_auth_reach_each_other_with_the_peer_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let create = |role: &str| {
        let out = std::process::Command::new(common::damselfly_bin())
            .args([
                "tokens",
                "create",
                "--quiet",
                "--role",
                role,
                "--tokens-file",
            ])
            .arg(&tokens)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let peer = create("admin");
    let writer = create("write");
    let peer_file = dir.path().join("peer.token");
    std::fs::write(&peer_file, &peer).unwrap();
    let auth = format!(
        "auth = true\ntokens_file = {:?}\n",
        tokens.to_str().unwrap()
    );

    // Without a peer token a shard refuses to start, saying what it needs.
    let refused = dir.path().join("refused.toml");
    std::fs::write(&refused, &auth).unwrap();
    let out = std::process::Command::new(common::damselfly_bin())
        .args(["collector", "--data-dir"])
        .arg(dir.path().join("refused"))
        .args(["--shard-id", "s0", "--shards-file"])
        .arg(dir.path().join("any-shards.toml"))
        .arg("--config")
        .arg(&refused)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("peer_token_file"), "{stderr}");

    let d = Deployment::with_config(
        2,
        &format!(
            "{auth}peer_token_file = {:?}\n",
            peer_file.to_str().unwrap()
        ),
    );
    // Each shard sees the other live: its probes pass the peer's auth.
    for s in &d.shards {
        wait_until(Duration::from_secs(20), "both shards live", || {
            let (code, body) = with_token(
                "GET",
                &format!("{}/api/v1/shards", s.http_url()),
                &writer,
                "",
            );
            code == 200 && body.matches("\"live\":true").count() == 2
        });
    }
    // A row buffered on each shard; a query through either sees both (the other's buffer comes over HTTP).
    for s in &d.shards {
        let (code, body) = with_token(
            "POST",
            &format!("{}/api/v2/write?bucket=a", s.http_url()),
            &writer,
            &format!("authed,shard={} v=1", s.id),
        );
        assert_eq!(code, 204, "{body}");
    }
    for s in &d.shards {
        let (code, body) = with_token(
            "POST",
            &format!("{}/api/v1/sql", s.http_url()),
            &writer,
            "SELECT count(*) AS n FROM authed",
        );
        assert_eq!(code, 200, "{body}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(rows[0]["n"], 2, "through {}: {body}", s.id);
    }
}
