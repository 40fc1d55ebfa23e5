//! End-to-end tests of the push path and of [`crate::run`] against the in-process [`FakeCollector`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use damselfly_proto::v1::{Field, Point, WriteBatch, field};
use tokio::sync::{Notify, watch};

use crate::fake_collector::FakeCollector;
use crate::push::{PushSettings, Pusher};
use crate::queue::{self, BatchQueue, MemoryQueue, SharedQueue, enqueue};
use crate::spool::DiskSpool;
use crate::stats::{AgentStats, Counters};
use crate::{AgentConfig, config};

fn settings(addr: SocketAddr) -> PushSettings {
    PushSettings {
        collector: format!("http://{addr}"),
        max_in_flight: 4,
        connect_timeout: Duration::from_secs(1),
        ack_timeout: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
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
