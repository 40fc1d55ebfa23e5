//! End-to-end tests of the push path and of [`crate::run`] against the in-process [`FakeCollector`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use damselfly_proto::v1::{Field, Point, ShardInfo, ShardMap, WriteBatch, field};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::fake_collector::FakeCollector;
use crate::push::{PushSettings, Pusher};
use crate::queue::{self, BatchQueue, MemoryQueue, SharedQueue, enqueue};
use crate::spool::DiskSpool;
use crate::stats::{AgentStats, Counters};
use crate::{AgentConfig, config};

fn settings(addr: SocketAddr) -> PushSettings {
    PushSettings {
        collector: format!("http://{addr}"),
        agent_id: "agent-test".into(),
        max_in_flight: 4,
        connect_timeout: Duration::from_secs(1),
        ack_timeout: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        shard_backoff_initial: Duration::from_millis(100),
        shard_backoff_max: Duration::from_millis(400),
        map_refresh: Duration::from_secs(60),
        token: None,
        tls: None,
    }
}

fn batches(seqs: std::ops::RangeInclusive<u64>) -> Vec<WriteBatch> {
    seqs.map(|seq| WriteBatch {
        chunks: Vec::new(),
        agent_id: "agent-test".into(),
        seq,
        common_tags: Vec::new(),
        points: vec![Point {
            measurement: "m".into(),
            tags: Vec::new(),
            fields: vec![Field {
                key: "v".into(),
                value: Some(field::Value::U64(seq)),
            }],
            time_unix_nano: 1,
        }],
    })
    .collect()
}

/// Pushes `input` through a fresh pusher over `queue`, one batch at a time as the collection loop does, waits
/// `before_close`, signals shutdown and returns the stats once everything is acknowledged.
async fn push_through(
    settings: PushSettings,
    queue: Box<dyn BatchQueue>,
    input: Vec<WriteBatch>,
    before_close: Duration,
) -> (AgentStats, SharedQueue) {
    let counters = Arc::new(Counters::default());
    let queue: SharedQueue = queue::shared(queue);
    let wake = Arc::new(Notify::new());
    let pusher = Pusher::new(
        settings,
        Arc::clone(&queue),
        Arc::clone(&wake),
        Arc::clone(&counters),
    )
    .expect("pusher");
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(pusher.run(stop_rx));
    for b in input {
        enqueue(&queue, vec![b], &counters);
        wake.notify_one();
    }
    tokio::time::sleep(before_close).await;
    stop_tx.send(true).expect("pusher listens");
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("push finished in time")
        .expect("no panic");
    (counters.snapshot(), queue)
}

/// [`push_through`] a memory queue of `cap` batches.
async fn push_all(
    settings: PushSettings,
    cap: usize,
    input: Vec<WriteBatch>,
    before_close: Duration,
) -> AgentStats {
    push_through(
        settings,
        Box::new(MemoryQueue::new(cap)),
        input,
        before_close,
    )
    .await
    .0
}

fn stored_seqs(c: &FakeCollector) -> Vec<u64> {
    c.state().stored.keys().copied().collect()
}

#[tokio::test]
async fn every_batch_stored_once_in_order_with_zstd() {
    let collector = FakeCollector::default();
    let (addr, _stop) = collector.start().await;
    let stats = push_all(settings(addr), 100, batches(1..=25), Duration::ZERO).await;
    assert_eq!(stored_seqs(&collector), (1..=25).collect::<Vec<_>>());
    let s = collector.state();
    assert_eq!(
        s.received,
        (1..=25).collect::<Vec<_>>(),
        "sent in seq order, once"
    );
    assert!(s.encodings.iter().all(|e| e == "zstd"), "{:?}", s.encodings);
    assert_eq!(
        (
            stats.batches_stored,
            stats.batches_sent,
            stats.batches_resent
        ),
        (25, 25, 0)
    );
    assert_eq!((stats.push_failures, stats.pending_at_exit), (0, 0));
}

#[tokio::test]
async fn retry_ack_resends_after_retry_after() {
    let collector = FakeCollector::default();
    {
        let mut s = collector.state();
        s.retries_left = 2;
        s.retry_after_ms = 50;
    }
    let (addr, _stop) = collector.start().await;
    let started = std::time::Instant::now();
    let stats = push_all(settings(addr), 100, batches(1..=10), Duration::ZERO).await;
    // With several batches in flight, both RETRY answers may arrive on the first stream (the agent drops it at the
    // first one and may not read the second), or one on each of two streams.
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "waited retry_after_ms"
    );
    assert_eq!(stored_seqs(&collector), (1..=10).collect::<Vec<_>>());
    assert!((1..=2).contains(&stats.retry_acks), "{stats:?}");
    assert!(stats.batches_resent >= 1, "{stats:?}");
    // Batches behind a RETRY on the same stream may have been stored before the agent dropped the stream: their
    // resend is answered DUPLICATE.
    assert_eq!(
        stats.batches_stored + stats.batches_duplicate,
        10,
        "{stats:?}"
    );
    assert_eq!(collector.state().streams as u64, stats.retry_acks + 1);
}

#[tokio::test]
async fn lost_ack_is_resent_and_deduplicated() {
    let collector = FakeCollector::default();
    collector.state().drop_after = Some(5);
    let (addr, _stop) = collector.start().await;
    let stats = push_all(settings(addr), 100, batches(1..=12), Duration::ZERO).await;
    assert_eq!(
        stored_seqs(&collector),
        (1..=12).collect::<Vec<_>>(),
        "no loss"
    );
    // Seq 5 was stored but its ack lost: the resend is answered DUPLICATE.
    assert_eq!(stats.batches_duplicate, 1, "{stats:?}");
    assert_eq!(stats.push_failures, 1);
    let received = collector.state().received.clone();
    assert_eq!(
        received.iter().filter(|&&s| s == 5).count(),
        2,
        "{received:?}"
    );
    assert_eq!(stats.pending_at_exit, 0);
}

#[tokio::test]
async fn silent_collector_times_out_and_stream_is_replaced() {
    let collector = FakeCollector::default();
    collector.state().silent_streams_left = 1;
    let (addr, _stop) = collector.start().await;
    let stats = push_all(settings(addr), 100, batches(1..=6), Duration::ZERO).await;
    assert_eq!(stored_seqs(&collector), (1..=6).collect::<Vec<_>>());
    assert_eq!(stats.push_failures, 1, "ack timeout: {stats:?}");
    assert!(stats.batches_resent >= 1);
}

#[tokio::test]
async fn rejected_batch_is_dropped_not_resent() {
    let collector = FakeCollector::default();
    collector.state().reject.insert(3);
    let (addr, _stop) = collector.start().await;
    let stats = push_all(settings(addr), 100, batches(1..=5), Duration::ZERO).await;
    assert_eq!(stored_seqs(&collector), [1, 2, 4, 5]);
    assert_eq!(collector.state().received, [1, 2, 3, 4, 5]);
    assert_eq!(
        (
            stats.batches_rejected,
            stats.batches_stored,
            stats.push_failures
        ),
        (1, 4, 0)
    );
}

/// A port nobody listens on yet, reserved by a bound socket that does not listen: connections are refused until
/// `listen` turns it into the collector's listener, and no other test can be given the port meanwhile (a port
/// released and bound again could go to a parallel test's server).
fn reserved_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    (socket.local_addr().expect("addr"), socket)
}

#[tokio::test]
async fn collector_down_at_start_then_up_delivers_everything() {
    let (addr, socket) = reserved_addr();
    let collector = FakeCollector::default();
    let c = collector.clone();
    let starter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.serve(socket.listen(64).expect("listen"))
    });
    let stats = push_all(settings(addr), 100, batches(1..=8), Duration::ZERO).await;
    let _stop = starter.await.expect("starter");
    assert_eq!(stored_seqs(&collector), (1..=8).collect::<Vec<_>>());
    assert!(stats.push_failures >= 1, "{stats:?}");
    assert_eq!(stats.batches_dropped, 0);
}

#[tokio::test]
async fn outage_longer_than_the_queue_drops_oldest() {
    let (addr, socket) = reserved_addr();
    let collector = FakeCollector::default();
    let c = collector.clone();
    let starter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.serve(socket.listen(64).expect("listen"))
    });
    // All 10 batches reach the queue (bound 3) while the collector is down.
    let stats = push_all(
        settings(addr),
        3,
        batches(1..=10),
        Duration::from_millis(100),
    )
    .await;
    let _stop = starter.await.expect("starter");
    assert_eq!(stored_seqs(&collector), [8, 9, 10]);
    assert_eq!(stats.batches_dropped, 7);
}

#[tokio::test]
async fn run_pushes_rounds_with_identity_and_flushes_on_shutdown() {
    let collector = FakeCollector::default();
    let (addr, _stop) = collector.start().await;
    let state_dir = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig {
        collector: Some(format!("http://{addr}")),
        interval: 1,
        ns_id: "ns1".into(),
        mcis_id: "mcis1".into(),
        vm_id: "vm1".into(),
        csp: "aws".into(),
        region: "ap-northeast-2".into(),
        zone: "ap-northeast-2a".into(),
        batch_max_points: 7,
        state_dir: Some(state_dir.path().to_owned()),
        ..AgentConfig::default()
    };
    let agent_id = config.effective_agent_id();
    let stats = crate::run(config, tokio::time::sleep(Duration::from_millis(1800)))
        .await
        .expect("run");
    assert!(stats.rounds >= 2, "{stats:?}");
    assert_eq!(stats.pending_at_exit, 0, "flushed: {stats:?}");
    assert_eq!(stats.pending_bytes_at_exit, 0, "spool emptied: {stats:?}");
    assert_eq!(stats.batches_stored, stats.batches_created);

    let s = collector.state();
    let seqs: Vec<u64> = s.stored.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=stats.batches_created).collect::<Vec<_>>(),
        "fresh state dir starts at 1"
    );
    let mut measurements = std::collections::BTreeSet::new();
    for b in s.stored.values() {
        assert_eq!(b.agent_id, agent_id);
        let rows = damselfly_proto::columnar::batch_rows(b);
        assert!(rows > 0 && rows <= 7);
        let keys: Vec<&str> = b.common_tags.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, config::IDENTITY_TAG_KEYS);
        assert!(
            b.common_tags
                .iter()
                .any(|t| t.key == "region" && t.value == "ap-northeast-2")
        );
        measurements.extend(b.chunks.iter().map(|c| c.measurement.clone()));
    }
    for m in crate::probes::MEASUREMENTS {
        assert!(measurements.contains(m), "{m} missing: {measurements:?}");
    }
}

#[tokio::test]
async fn run_with_collector_down_returns_after_bounded_flush() {
    let (addr, _socket) = reserved_addr();
    let config = AgentConfig {
        collector: Some(format!("http://{addr}")),
        interval: 1,
        ..AgentConfig::default()
    };
    let started = std::time::Instant::now();
    let stats = crate::run(config, tokio::time::sleep(Duration::from_millis(300)))
        .await
        .expect("run");
    let took = started.elapsed();
    assert!(
        took < crate::FLUSH_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
    assert!(stats.rounds >= 1);
    assert!(stats.pending_at_exit >= 1, "{stats:?}");
    assert_eq!(stats.batches_stored, 0);
}

#[tokio::test]
async fn spool_absorbs_an_outage_and_replays_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = DiskSpool::open(dir.path(), 1 << 20).expect("spool");
    let (addr, socket) = reserved_addr();
    let collector = FakeCollector::default();
    let c = collector.clone();
    let starter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.serve(socket.listen(64).expect("listen"))
    });
    let (stats, _) = push_through(
        settings(addr),
        Box::new(spool),
        batches(1..=30),
        Duration::from_millis(100),
    )
    .await;
    let _stop = starter.await.expect("starter");
    assert_eq!(stored_seqs(&collector), (1..=30).collect::<Vec<_>>());
    let received = collector.state().received.clone();
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "replayed in seq order, each once: {received:?}"
    );
    assert_eq!(
        collector.state().stored[&7],
        batches(7..=7)[0],
        "sent as spooled"
    );
    assert_eq!((stats.batches_dropped, stats.pending_at_exit), (0, 0));
    assert!(stats.push_failures >= 1);
}

#[tokio::test]
async fn rejected_and_stored_batches_leave_the_spool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let collector = FakeCollector::default();
    collector.state().reject.insert(2);
    let (addr, _stop) = collector.start().await;
    let spool = DiskSpool::open(dir.path(), 1 << 20).expect("spool");
    let (stats, queue) = push_through(
        settings(addr),
        Box::new(spool),
        batches(1..=4),
        Duration::ZERO,
    )
    .await;
    assert_eq!((stats.batches_stored, stats.batches_rejected), (3, 1));
    {
        let mut q = queue::lock(&queue);
        assert!(q.is_empty());
        // The acknowledgements reach the disk at the checkpoint (the agent makes one per round and at exit).
        q.checkpoint().expect("checkpoint");
        assert_eq!(q.bytes(), 0);
    }
    drop(queue);
    let spool = DiskSpool::open(dir.path(), 1 << 20).expect("reopen");
    assert!(spool.is_empty());
    assert_eq!(spool.last_seq(), 4);
}

/// A spool-backed agent whose collector is down keeps its batches across a restart and delivers them, with their
/// original timestamps and seqs, once the collector is up; the restarted agent numbers above them.
#[tokio::test]
async fn run_keeps_undelivered_batches_in_the_spool_across_restarts() {
    let (addr, socket) = reserved_addr();
    let state_dir = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig {
        collector: Some(format!("http://{addr}")),
        interval: 1,
        state_dir: Some(state_dir.path().to_owned()),
        measurements: vec!["mem".into(), "system".into()],
        ..AgentConfig::default()
    };
    let first = crate::run(
        config.clone(),
        tokio::time::sleep(Duration::from_millis(1500)),
    )
    .await
    .expect("first run");
    assert!(first.rounds >= 2, "{first:?}");
    assert_eq!(first.batches_stored, 0);
    assert_eq!(first.pending_at_exit, first.batches_created, "{first:?}");
    assert!(first.pending_bytes_at_exit > 0);
    let spooled = {
        let s = DiskSpool::open(&state_dir.path().join("spool"), 1 << 20).expect("spool");
        let mut v = Vec::new();
        let mut cursor = 0;
        while let Some(b) = s.next_after(cursor) {
            cursor = b.seq;
            v.push(b);
        }
        v
    };
    assert_eq!(spooled.len() as u64, first.batches_created);

    let collector = FakeCollector::default();
    let _stop = collector.serve(socket.listen(64).expect("listen"));
    let second = crate::run(config, tokio::time::sleep(Duration::from_millis(1200)))
        .await
        .expect("second run");
    assert_eq!(second.pending_at_exit, 0, "{second:?}");
    let s = collector.state();
    for b in &spooled {
        assert_eq!(
            s.stored.get(&b.seq),
            Some(b),
            "spooled seq {} delivered as collected",
            b.seq
        );
    }
    assert_eq!(
        s.stored.len() as u64,
        first.batches_created + second.batches_created
    );
    let first_new = s
        .stored
        .keys()
        .find(|k| !spooled.iter().any(|b| b.seq == **k))
        .copied()
        .expect("new batches");
    assert!(first_new > spooled.last().expect("spooled").seq);
    assert!(
        s.received.windows(2).all(|w| w[0] < w[1]),
        "old batches first, in order: {:?}",
        s.received
    );
}

/// With `listen` and no collector there is no push: rounds accumulate in the spool for a collector to pull.
#[tokio::test]
async fn pull_only_run_keeps_rounds_in_the_spool() {
    let state_dir = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        interval: 1,
        state_dir: Some(state_dir.path().to_owned()),
        measurements: vec!["mem".into()],
        ..AgentConfig::default()
    };
    let stats = crate::run(config, tokio::time::sleep(Duration::from_millis(1200)))
        .await
        .expect("run");
    assert!(stats.rounds >= 2, "{stats:?}");
    assert_eq!(stats.batches_sent, 0);
    assert_eq!(stats.pending_at_exit, stats.batches_created);
    let s = DiskSpool::open(&state_dir.path().join("spool"), 1 << 20).expect("spool");
    assert_eq!(s.len() as u64, stats.batches_created);
}

// ---------------------------------------------------------------------------------------------------------------
// Sharded collectors.

/// Fake shards on 127.0.0.1, each knowing all the others: ids `s1`, `s2`, ... in the preference order of
/// "agent-test" (`ids[0]` owns it). A shard is down (connections refused) until [`Cluster::up`].
struct Cluster {
    /// Shard ids, the owner of "agent-test" first.
    ids: Vec<String>,
    infos: Vec<ShardInfo>,
    shards: BTreeMap<String, FakeCollector>,
    /// Bound but not listening yet.
    sockets: BTreeMap<String, tokio::net::TcpSocket>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Cluster {
    fn new(n: usize) -> Self {
        let names: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
        let ids: Vec<String> =
            damselfly_proto::shards::rank("agent-test", names.iter().map(String::as_str))
                .into_iter()
                .map(str::to_owned)
                .collect();
        let mut infos = Vec::new();
        let mut sockets = BTreeMap::new();
        for id in &names {
            let (addr, socket) = reserved_addr();
            infos.push(ShardInfo {
                id: id.clone(),
                grpc_url: format!("http://{addr}"),
                http_url: String::new(),
                live: true,
            });
            sockets.insert(id.clone(), socket);
        }
        let shards = names
            .iter()
            .map(|id| {
                let fake = FakeCollector::default();
                {
                    let mut s = fake.state();
                    s.self_id = id.clone();
                    s.cluster = infos.clone();
                    s.shard_map = Some(ShardMap {
                        self_id: id.clone(),
                        shards: infos.clone(),
                        version: 1,
                    });
                }
                (id.clone(), fake)
            })
            .collect();
        Self {
            ids,
            infos,
            shards,
            sockets,
            stops: Vec::new(),
        }
    }

    /// The shard that is `rank`-th choice of "agent-test" (0 = owner).
    fn fake(&self, rank: usize) -> &FakeCollector {
        &self.shards[&self.ids[rank]]
    }

    fn info(&self, rank: usize) -> ShardInfo {
        self.infos
            .iter()
            .find(|i| i.id == self.ids[rank])
            .cloned()
            .expect("shard")
    }

    /// Push settings seeded with the `rank`-th choice.
    fn settings(&self, rank: usize) -> PushSettings {
        let url = self.info(rank).grpc_url;
        PushSettings {
            collector: url,
            ..settings("127.0.0.1:1".parse().expect("addr"))
        }
    }

    /// Starts serving the `rank`-th choice.
    fn up(&mut self, rank: usize) {
        let id = self.ids[rank].clone();
        let socket = self.sockets.remove(&id).expect("not up yet");
        let stop = self.shards[&id].serve(socket.listen(64).expect("listen"));
        self.stops.push(stop);
    }

    /// Every stored seq, over all shards, sorted (a seq stored on two shards appears twice).
    fn stored_everywhere(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.shards.values().flat_map(stored_seqs).collect();
        all.sort_unstable();
        all
    }
}

/// A running push task fed by the test.
struct Running {
    queue: SharedQueue,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    fn start(settings: PushSettings) -> Self {
        let counters = Arc::new(Counters::default());
        let queue: SharedQueue = queue::shared(Box::new(MemoryQueue::new(1000)));
        let wake = Arc::new(Notify::new());
        let pusher = Pusher::new(
            settings,
            Arc::clone(&queue),
            Arc::clone(&wake),
            Arc::clone(&counters),
        )
        .expect("pusher");
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(pusher.run(stop_rx));
        Self {
            queue,
            wake,
            counters,
            stop,
            task,
        }
    }

    fn send(&self, seqs: std::ops::RangeInclusive<u64>) {
        for b in batches(seqs) {
            enqueue(&self.queue, vec![b], &self.counters);
            self.wake.notify_one();
        }
    }

    /// Signals shutdown and waits for everything to be acknowledged.
    async fn finish(self) -> AgentStats {
        self.stop.send(true).expect("pusher listens");
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("push finished in time")
            .expect("no panic");
        self.counters.snapshot()
    }
}

/// Polls `done` every 10 ms for at most 5 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The seed's map is stale (it lists itself and the third shard, not the owner), so the agent pushes to the
/// seed, which redirects it to the owner (a shard the agent did not know): nothing is stored on the seed, the agent stops sending
/// there at the first REDIRECT, and the owner stores every batch once, in order.
#[tokio::test]
async fn redirect_to_owner_stores_every_batch_once() {
    let mut cluster = Cluster::new(3);
    {
        let mut s = cluster.fake(1).state();
        if let Some(map) = s.shard_map.as_mut() {
            let owner = cluster.ids[0].clone();
            map.shards.retain(|i| i.id != owner);
        }
    }
    for rank in 0..3 {
        cluster.up(rank);
    }
    let run = Running::start(cluster.settings(1));
    run.send(1..=20);
    wait_for("the owner to store everything", || {
        stored_seqs(cluster.fake(0)).len() == 20
    })
    .await;
    let stats = run.finish().await;

    assert_eq!(stored_seqs(cluster.fake(0)), (1..=20).collect::<Vec<_>>());
    assert_eq!(
        cluster.stored_everywhere(),
        (1..=20).collect::<Vec<_>>(),
        "stored exactly once"
    );
    let seed = cluster.fake(1).state();
    assert!(seed.stored.is_empty());
    assert!(
        !seed.received.is_empty() && seed.received.len() <= 4,
        "no new sends after the first REDIRECT: {:?}",
        seed.received
    );
    let owner_received = cluster.fake(0).state().received.clone();
    assert!(
        owner_received.windows(2).all(|w| w[0] < w[1]),
        "owner got each batch once, in order: {owner_received:?}"
    );
    assert!(cluster.fake(2).state().received.is_empty());
    assert!(stats.redirect_acks >= 1, "{stats:?}");
    assert_eq!(stats.shard_switches, 1, "{stats:?}");
    assert_eq!((stats.batches_stored, stats.push_failures), (20, 0));
}

/// After a REDIRECT the batches already in flight on that stream are waited for: those stored there leave the
/// queue and are not resent; only the redirected one goes to the owner, before the rest, in seq order.
#[tokio::test]
async fn redirect_waits_for_the_acks_in_flight() {
    let mut cluster = Cluster::new(2);
    {
        // An old-style collector: no shard map, owns the agent, but redirects seq 2.
        let owner = cluster.info(0);
        let mut s = cluster.fake(1).state();
        s.shard_map = None;
        s.cluster.clear();
        s.redirect_seqs.insert(2);
        s.redirect_to = Some(owner);
    }
    cluster.up(0);
    cluster.up(1);
    // Everything is queued before the push task first runs: seqs 1-4 go out together on the first stream.
    let run = Running::start(cluster.settings(1));
    run.send(1..=10);
    let stats = run.finish().await;

    // The ack of seq 1 frees room for seq 5 before the REDIRECT of seq 2 arrives; nothing is sent after it.
    let first = cluster.fake(1).state();
    let k = first.received.len() as u64;
    assert!((4..=5).contains(&k), "{:?}", first.received);
    assert_eq!(first.received, (1..=k).collect::<Vec<_>>());
    let stored_first: Vec<u64> = first.stored.keys().copied().collect();
    assert_eq!(
        stored_first,
        (1..=k).filter(|s| *s != 2).collect::<Vec<_>>(),
        "acks in flight after the REDIRECT were waited for"
    );
    let owner = cluster.fake(0).state();
    let mut expected = vec![2];
    expected.extend(k + 1..=10);
    assert_eq!(
        owner.received, expected,
        "only the redirected batch is resent"
    );
    assert_eq!(
        (
            stats.batches_stored,
            stats.batches_resent,
            stats.redirect_acks
        ),
        (10, 1, 1)
    );
    assert_eq!(stats.shard_switches, 1);
}

/// The owner refuses connections: the agent marks it down and moves at once to its second choice, telling it in
/// the metadata, which then accepts the agent.
#[tokio::test]
async fn owner_down_fails_over_to_second_choice() {
    let mut cluster = Cluster::new(3);
    cluster.up(1);
    cluster.up(2);
    let settings = PushSettings {
        // Long enough that the agent does not try the owner again during the test.
        shard_backoff_initial: Duration::from_secs(10),
        shard_backoff_max: Duration::from_secs(10),
        ..cluster.settings(2)
    };
    let started = std::time::Instant::now();
    let run = Running::start(settings);
    run.send(1..=10);
    wait_for("the second choice to store everything", || {
        stored_seqs(cluster.fake(1)).len() == 10
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no sleep on failover"
    );
    let stats = run.finish().await;

    assert_eq!(cluster.stored_everywhere(), (1..=10).collect::<Vec<_>>());
    let second = cluster.fake(1).state();
    assert_eq!(second.streams, 1, "{:?}", second.unreachable);
    assert_eq!(second.unreachable, [cluster.ids[0].clone()]);
    assert!(cluster.fake(2).state().stored.is_empty());
    assert_eq!(stats.push_failures, 1, "{stats:?}");
    assert_eq!(stats.redirect_acks, 0, "{stats:?}");
    // Seed (third choice) → owner (shard map) → second choice (failover).
    assert_eq!(stats.shard_switches, 2, "{stats:?}");
}

/// The owner is down at first, so the agent pushes to its second choice; once the owner is back and its down
/// mark expires the agent leaves the fallback and pushes to the owner again. No batch is stored twice.
#[tokio::test]
async fn owner_back_agent_returns_home() {
    let mut cluster = Cluster::new(2);
    cluster.up(1);
    let run = Running::start(cluster.settings(1));
    run.send(1..=5);
    wait_for("the fallback to store the first batches", || {
        stored_seqs(cluster.fake(1)).len() == 5
    })
    .await;
    assert_eq!(
        cluster.fake(1).state().unreachable[0],
        cluster.ids[0],
        "told the fallback that the owner is down"
    );
    cluster.up(0);
    // Keep the stream to the fallback busy: the agent leaves it when the owner's down mark (at most 400 ms)
    // expires, after the acks in flight.
    for seq in 6..=40 {
        run.send(seq..=seq);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_for("everything to be stored", || {
        cluster.stored_everywhere().len() == 40
    })
    .await;
    let stats = run.finish().await;

    let on_fallback = stored_seqs(cluster.fake(1));
    let k = on_fallback.len() as u64;
    assert_eq!(on_fallback, (1..=k).collect::<Vec<_>>());
    assert!((5..40).contains(&k), "{k}");
    assert_eq!(
        stored_seqs(cluster.fake(0)),
        (k + 1..=40).collect::<Vec<_>>(),
        "back home"
    );
    assert_eq!(
        cluster.stored_everywhere(),
        (1..=40).collect::<Vec<_>>(),
        "each stored once"
    );
    assert!(stats.push_failures >= 1, "{stats:?}");
    // Seed (the fallback) → owner (shard map) → fallback (failover) → ... → owner (return home).
    assert!(stats.shard_switches >= 3, "{stats:?}");
    assert_eq!(stats.pending_at_exit, 0);
}

/// Every shard fails: the agent keeps the batches (waiting between rounds over the shards) and delivers each of
/// them exactly once when the shards are back.
#[tokio::test]
async fn all_shards_down_then_back_loses_nothing() {
    let mut cluster = Cluster::new(2);
    cluster.up(0);
    cluster.up(1);
    let run = Running::start(cluster.settings(0));
    run.send(1..=5);
    wait_for("the owner to store the first batches", || {
        stored_seqs(cluster.fake(0)).len() == 5
    })
    .await;
    for rank in 0..2 {
        cluster.fake(rank).state().down = true;
    }
    run.send(6..=15);
    wait_for("both shards to be tried", || {
        run.counters.snapshot().push_failures >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cluster.stored_everywhere(), (1..=5).collect::<Vec<_>>());
    let failures = run.counters.snapshot().push_failures;
    assert!(
        failures < 30,
        "waits while every shard is down: {failures} failures"
    );
    for rank in 0..2 {
        cluster.fake(rank).state().down = false;
    }
    wait_for("everything to be stored", || {
        cluster.stored_everywhere().len() == 15
    })
    .await;
    let stats = run.finish().await;

    assert_eq!(cluster.stored_everywhere(), (1..=15).collect::<Vec<_>>());
    assert_eq!(
        (
            stats.batches_stored,
            stats.batches_dropped,
            stats.pending_at_exit
        ),
        (15, 0, 0)
    );
}

/// A collector without `Shards` (or a map of one shard) is pushed to as a single collector: the seed, with no
/// unreachable-shards metadata and no switch.
#[tokio::test]
async fn single_shard_map_keeps_the_seed() {
    let collector = FakeCollector::default();
    collector.state().shard_map = Some(ShardMap {
        self_id: "only".into(),
        shards: vec![ShardInfo {
            id: "only".into(),
            // Unreachable on purpose: with one shard the agent keeps the URL it was given.
            grpc_url: "http://127.0.0.1:1".into(),
            http_url: String::new(),
            live: true,
        }],
        version: 1,
    });
    let (addr, _stop) = collector.start().await;
    let stats = push_all(settings(addr), 100, batches(1..=5), Duration::ZERO).await;
    assert_eq!(stored_seqs(&collector), [1, 2, 3, 4, 5]);
    assert_eq!(collector.state().unreachable, [""]);
    assert_eq!((stats.shard_switches, stats.push_failures), (0, 0));
}
