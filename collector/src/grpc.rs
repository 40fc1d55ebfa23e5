//! The gRPC ingest service (`damselfly.v1.Ingest`): the agents' push path into the [`Store`].
//!
//! `Push` handles the batches of one stream concurrently (so they can share a WAL group commit) but answers them in
//! arrival order, as the protocol promises. An ack is sent only once the store has answered, that is once the batch
//! is durable, known as a duplicate, rejected, or to be retried.
//!
//! "Retry later" (the write buffer is full, the WAL cannot be written, the collector is stopping): on `Push` it is an
//! ack `RETRY` with `retry_after_ms`, since the stream goes on. On the unary `Write` it is the gRPC status
//! `UNAVAILABLE`, the code gRPC defines for "transient, retry with backoff" and the one OTLP exporters treat as
//! throttling, with the hint three ways: a `google.rpc.RetryInfo` in the status details (what OTLP clients read),
//! `grpc-retry-pushback-ms` (what gRPC's built-in retry policies read) and `retry-after-ms`. An error status, not an
//! OK carrying RETRY, so a client that only checks the status cannot take a refused batch for a stored one.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use damselfly_proto::v1::ingest_server::{Ingest, IngestServer};
use damselfly_proto::v1::{Ack, AckStatus, WriteBatch};
use futures::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::agents::AgentRegistry;
use crate::cluster::{Cluster, unreachable_from};
use crate::store::{Store, WriteOutcome};

/// Batches of one stream being stored at once. Agents keep a handful in flight; this bounds a greedy client.
const MAX_IN_FLIGHT_PER_STREAM: usize = 64;

/// The `Ingest` service over a store.
#[derive(Debug, Clone)]
pub struct IngestService {
    store: Store,
    /// Told about every STORED or DUPLICATE batch, so a pushing agent counts as heard from.
    registry: Option<AgentRegistry>,
    /// With other shards: batches of agents another shard owns are answered REDIRECT.
    cluster: Option<Cluster>,
    /// Points per second per agent (`max_agent_points_per_sec`).
    rates: Arc<crate::ratelimit::AgentRates>,
}

impl IngestService {
    pub fn new(store: Store) -> IngestService {
        let rates = Arc::new(crate::ratelimit::AgentRates::new(
            store.config().max_agent_points_per_sec,
        ));
        IngestService {
            store,
            registry: None,
            cluster: None,
            rates,
        }
    }

    /// Answers REDIRECT to batches of agents that another live shard of `cluster` owns.
    pub fn with_cluster(mut self, cluster: Cluster) -> IngestService {
        self.cluster = Some(cluster);
        self
    }

    /// Notes each stored (or duplicate) batch's agent in `registry`.
    pub fn with_registry(mut self, registry: AgentRegistry) -> IngestService {
        self.registry = Some(registry);
        self
    }

    /// The tonic service: zstd both ways, messages bounded by `max_message_bytes` (after decompression).
    pub fn into_server(self, max_message_bytes: usize) -> IngestServer<IngestService> {
        IngestServer::new(self)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(max_message_bytes)
    }
}

/// The acknowledgement for one store outcome.
pub fn ack_for(seq: u64, outcome: WriteOutcome) -> Ack {
    match outcome {
        WriteOutcome::Stored { points } => Ack {
            seq,
            status: AckStatus::Stored as i32,
            points_stored: points as u64,
            ..Ack::default()
        },
        WriteOutcome::Duplicate => Ack {
            seq,
            status: AckStatus::Duplicate as i32,
            ..Ack::default()
        },
        WriteOutcome::Rejected(message) => Ack {
            seq,
            status: AckStatus::Rejected as i32,
            message,
            ..Ack::default()
        },
        WriteOutcome::Retry { message, after } => Ack {
            seq,
            status: AckStatus::Retry as i32,
            message,
            retry_after_ms: duration_ms(after),
            ..Ack::default()
        },
    }
}

/// The unary `Write`'s answer to "retry later": `UNAVAILABLE` with the retry hint in the status details
/// (`google.rpc.RetryInfo`) and in the trailers (`grpc-retry-pushback-ms`, `retry-after-ms`).
pub fn retry_status(message: &str, after: Duration) -> Status {
    let delay = ProtoDuration {
        seconds: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(after.subsec_nanos()).unwrap_or(0),
    };
    let details = RpcStatus {
        code: Code::Unavailable as i32,
        message: message.to_owned(),
        details: vec![ProtoAny {
            type_url: RETRY_INFO_TYPE_URL.to_owned(),
            value: RetryInfo {
                retry_delay: Some(delay),
            }
            .encode_to_vec(),
        }],
    };
    let mut status =
        Status::with_details(Code::Unavailable, message, details.encode_to_vec().into());
    let ms = MetadataValue::from(duration_ms(after));
    status
        .metadata_mut()
        .insert("grpc-retry-pushback-ms", ms.clone());
    status.metadata_mut().insert("retry-after-ms", ms);
    status
}

/// `type_url` of `google.rpc.RetryInfo` in a `google.protobuf.Any`.
pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// `google.rpc.Status`, the payload of the `grpc-status-details-bin` trailer. Only the fields used here are
/// declared: these few messages are not worth a dependency on the googleapis crates.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.RetryInfo`: when the client should retry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// The REDIRECT ack for a batch of an agent that `owner` owns. Nothing was stored.
fn redirect_ack(seq: u64, cluster: &Cluster, owner: &crate::cluster::ShardEndpoint) -> Ack {
    Ack {
        seq,
        status: AckStatus::Redirect as i32,
        message: format!(
            "this is shard {}; agents of this id belong to shard {} ({})",
            cluster.self_id(),
            owner.id,
            owner.grpc_url
        ),
        redirect: Some(cluster.shard_info(owner)),
        ..Ack::default()
    }
}

/// Where a batch goes: `Some(ack)` when another shard owns its agent.
fn route(cluster: Option<&Cluster>, batch: &WriteBatch, unreachable: &[String]) -> Option<Ack> {
    let cluster = cluster?;
    let unreachable: Vec<&str> = unreachable.iter().map(String::as_str).collect();
    let owner = cluster.owner_of(&batch.agent_id, &unreachable)?;
    Some(redirect_ack(batch.seq, cluster, &owner))
}

/// Who sent a request (put there by [`crate::auth::grpc_interceptor`]; everyone when auth is off).
fn principal_of<T>(request: &Request<T>) -> crate::auth::Principal {
    request
        .extensions()
        .get::<crate::auth::Principal>()
        .cloned()
        .unwrap_or_else(crate::auth::Principal::anyone)
}

/// Stores a batch; a STORED or DUPLICATE batch counts as hearing from its agent.
async fn store_batch(
    store: &Store,
    registry: Option<&AgentRegistry>,
    rates: &crate::ratelimit::AgentRates,
    batch: WriteBatch,
) -> WriteOutcome {
    let agent_id = registry.map(|_| batch.agent_id.clone());
    let points = damselfly_proto::columnar::batch_rows(&batch);
    let outcome = match rates.admit(&batch.agent_id, points) {
        Ok(()) => store.write(batch).await,
        Err(after) => WriteOutcome::Retry {
            message: format!(
                "agent {:?} is over max_agent_points_per_sec ({} points/s): this batch of {points} points can \
                 be sent again after {after:?}",
                batch.agent_id,
                rates.per_sec()
            ),
            after,
        },
    };
    store
        .self_metrics()
        .record_write(crate::selfmetrics::Protocol::Grpc, &outcome);
    if let (Some(registry), Some(agent_id)) = (registry, agent_id)
        && matches!(
            outcome,
            WriteOutcome::Stored { .. } | WriteOutcome::Duplicate
        )
    {
        registry.touch(&agent_id);
    }
    outcome
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type PushStream = AckStream;

    async fn push(
        &self,
        request: Request<Streaming<WriteBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let peer = request.remote_addr();
        let principal = Arc::new(principal_of(&request));
        let store = self.store.clone();
        let registry = self.registry.clone();
        let rates = self.rates.clone();
        let cluster = self.cluster.clone();
        let unreachable = Arc::new(unreachable_from(request.metadata()));
        let acks = request
            .into_inner()
            .map(move |item| {
                let store = store.clone();
                let registry = registry.clone();
                let rates = rates.clone();
                let cluster = cluster.clone();
                let unreachable = unreachable.clone();
                let principal = principal.clone();
                async move {
                    match item {
                        Ok(mut batch) => {
                            if let Some(ack) = route(cluster.as_ref(), &batch, &unreachable) {
                                return Ok(ack);
                            }
                            if let Err(e) = crate::auth::scope_batch(&principal, &mut batch) {
                                return Ok(ack_for(
                                    batch.seq,
                                    WriteOutcome::Rejected(e.to_string()),
                                ));
                            }
                            let seq = batch.seq;
                            Ok(ack_for(
                                seq,
                                store_batch(&store, registry.as_ref(), &rates, batch).await,
                            ))
                        }
                        Err(status) => {
                            // A message that does not decode or is too large ends the stream with that status; the
                            // batches before it were answered already.
                            tracing::warn!(?peer, %status, "push stream failed");
                            Err(status)
                        }
                    }
                }
            })
            .buffered(MAX_IN_FLIGHT_PER_STREAM);
        Ok(Response::new(Box::pin(acks)))
    }

    async fn write(&self, request: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
        let unreachable = unreachable_from(request.metadata());
        let principal = principal_of(&request);
        let mut batch = request.into_inner();
        if let Some(ack) = route(self.cluster.as_ref(), &batch, &unreachable) {
            return Ok(Response::new(ack));
        }
        crate::auth::scope_batch(&principal, &mut batch)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let seq = batch.seq;
        match store_batch(&self.store, self.registry.as_ref(), &self.rates, batch).await {
            WriteOutcome::Retry { message, after } => Err(retry_status(&message, after)),
            outcome => Ok(Response::new(ack_for(seq, outcome))),
        }
    }
}
