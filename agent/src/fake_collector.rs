//! A scriptable in-process `Ingest` server on 127.0.0.1 for the push tests: it stores batches with the collector's
//! dedup rule and can answer RETRY, reject, drop a stream after storing (a lost ack) or stay silent. As a shard it
//! also serves `Shards.GetShardMap`, answers REDIRECT for agents it does not own (leaving out the shards named in
//! the `damselfly-unreachable-shards` metadata) and can play dead.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use damselfly_proto::v1::ingest_server::{Ingest, IngestServer};
use damselfly_proto::v1::shards_server::{Shards, ShardsServer};
use damselfly_proto::v1::{Ack, AckStatus, ShardInfo, ShardMap, ShardMapRequest, WriteBatch};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

/// What the server saw and what it will do next.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Every seq received, resends included, in arrival order.
    pub(crate) received: Vec<u64>,
    /// Stored batches by seq (each stored once).
    pub(crate) stored: BTreeMap<u64, WriteBatch>,
    /// `grpc-encoding` of each stream's requests.
    pub(crate) encodings: Vec<String>,
    /// Streams opened.
    pub(crate) streams: usize,
    /// Answer RETRY to this many batches (retry_after_ms = `retry_after_ms`).
    pub(crate) retries_left: usize,
    pub(crate) retry_after_ms: u64,
    /// Seqs to answer REJECTED.
    pub(crate) reject: BTreeSet<u64>,
    /// Once, when a stream has received this many batches, store the last one and then fail the stream
    /// without acknowledging it.
    pub(crate) drop_after: Option<usize>,
    /// This many streams get no acks at all.
    pub(crate) silent_streams_left: usize,
    /// The answer to `GetShardMap`; `None`: `Unimplemented`, as from a collector without shards.
    pub(crate) shard_map: Option<ShardMap>,
    /// This shard's id, when it is one.
    pub(crate) self_id: String,
    /// The shards this one believes in when it decides who owns an agent; empty: it owns every agent.
    pub(crate) cluster: Vec<ShardInfo>,
    /// Seqs answered REDIRECT to `redirect_to` whatever the owner.
    pub(crate) redirect_seqs: BTreeSet<u64>,
    pub(crate) redirect_to: Option<ShardInfo>,
    /// Playing dead: new streams and map requests fail with UNAVAILABLE, open streams fail at their next batch.
    pub(crate) down: bool,
    /// The `damselfly-unreachable-shards` metadata of each stream ("" without it).
    pub(crate) unreachable: Vec<String>,
}

/// Shared handle to the server's state.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeCollector {
    state: Arc<Mutex<State>>,
}

impl FakeCollector {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked while holding the lock already failed the test; carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves on `listener` until the returned sender is dropped or fired.
    pub(crate) fn serve(&self, listener: TcpListener) -> oneshot::Sender<()> {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = IngestServer::new(self.clone())
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd);
        let shards = ShardsServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(shards)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        stop_tx
    }

    /// Binds 127.0.0.1:0 and serves; returns the address and the stop handle.
    pub(crate) async fn start(&self) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, self.serve(listener))
    }

    /// The shard that should take `agent_id`'s batches instead of this one, if any.
    fn redirect_for(
        s: &State,
        seq: u64,
        agent_id: &str,
        unreachable: &[String],
    ) -> Option<ShardInfo> {
        if s.redirect_seqs.contains(&seq) {
            return s.redirect_to.clone();
        }
        let candidates = s
            .cluster
            .iter()
            .map(|i| i.id.as_str())
            .filter(|id| !unreachable.iter().any(|u| u == id));
        let owner = damselfly_proto::shards::owner(agent_id, candidates)?;
        if owner == s.self_id {
            return None;
        }
        s.cluster.iter().find(|i| i.id == owner).cloned()
    }

    /// Applies the dedup rule and the script to one batch; `None` = fail the stream now.
    fn handle(&self, batch: WriteBatch, n_on_stream: usize, unreachable: &[String]) -> Option<Ack> {
        let mut s = self.state();
        s.received.push(batch.seq);
        let seq = batch.seq;
        if s.down {
            return None;
        }
        if s.retries_left > 0 {
            s.retries_left -= 1;
            return Some(Ack {
                seq,
                status: AckStatus::Retry as i32,
                message: "busy".into(),
                retry_after_ms: s.retry_after_ms,
                ..Ack::default()
            });
        }
        if let Some(owner) = Self::redirect_for(&s, seq, &batch.agent_id, unreachable) {
            return Some(Ack {
                seq,
                status: AckStatus::Redirect as i32,
                redirect: Some(owner),
                ..Ack::default()
            });
        }
        if s.reject.contains(&seq) {
            return Some(Ack {
                seq,
                status: AckStatus::Rejected as i32,
                message: "bad batch".into(),
                ..Ack::default()
            });
        }
        if s.stored.contains_key(&seq) {
            return Some(Ack {
                seq,
                status: AckStatus::Duplicate as i32,
                ..Ack::default()
            });
        }
        let points = damselfly_proto::columnar::batch_rows(&batch) as u64;
        s.stored.insert(seq, batch);
        if s.drop_after == Some(n_on_stream) {
            s.drop_after = None;
            return None;
        }
        Some(Ack {
            seq,
            status: AckStatus::Stored as i32,
            points_stored: points,
            ..Ack::default()
        })
    }
}

#[tonic::async_trait]
impl Ingest for FakeCollector {
    type PushStream = ReceiverStream<Result<Ack, Status>>;

    async fn push(
        &self,
        request: Request<Streaming<WriteBatch>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let encoding = request
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .to_owned();
        let unreachable_header = request
            .metadata()
            .get("damselfly-unreachable-shards")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let unreachable: Vec<String> = unreachable_header
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let silent = {
            let mut s = self.state();
            if s.down {
                return Err(Status::unavailable("fake shard is down"));
            }
            s.streams += 1;
            s.encodings.push(encoding);
            s.unreachable.push(unreachable_header);
            let silent = s.silent_streams_left > 0;
            s.silent_streams_left = s.silent_streams_left.saturating_sub(1);
            silent
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(Ok(batch)) = inbound.next().await {
                n += 1;
                if silent {
                    this.state().received.push(batch.seq);
                    continue;
                }
                match this.handle(batch, n, &unreachable) {
                    Some(ack) => {
                        if tx.send(Ok(ack)).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        let _ = tx
                            .send(Err(Status::unavailable("fake collector drops the stream")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write(&self, request: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
        self.handle(request.into_inner(), 0, &[])
            .map(Response::new)
            .ok_or_else(|| Status::unavailable("dropped"))
    }
}

#[tonic::async_trait]
impl Shards for FakeCollector {
    async fn get_shard_map(
        &self,
        _request: Request<ShardMapRequest>,
    ) -> Result<Response<ShardMap>, Status> {
        let s = self.state();
        if s.down {
            return Err(Status::unavailable("fake shard is down"));
        }
        s.shard_map
            .clone()
            .map(Response::new)
            .ok_or_else(|| Status::unimplemented("no shards here"))
    }
}
