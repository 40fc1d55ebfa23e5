//! The gRPC ingest service (`damselfly.v1.Ingest`): the agents' push path into the [`Store`].
//!
//! `Push` handles the batches of one stream concurrently (so they can share a WAL group commit) but answers them in
//! arrival order, as the protocol promises. An ack is sent only once the store has answered, that is once the batch
//! is durable, known as a duplicate, rejected, or to be retried.

use std::pin::Pin;
use std::time::Duration;

use damselfly_proto::v1::ingest_server::{Ingest, IngestServer};
use damselfly_proto::v1::{Ack, AckStatus, WriteBatch};
use futures::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

use crate::agents::AgentRegistry;
use crate::store::{Store, WriteOutcome};

/// Batches of one stream being stored at once. Agents keep a handful in flight; this bounds a greedy client.
const MAX_IN_FLIGHT_PER_STREAM: usize = 64;

/// The `Ingest` service over a store.
#[derive(Debug, Clone)]
pub struct IngestService {
    store: Store,
    /// Told about every STORED or DUPLICATE batch, so a pushing agent counts as heard from.
    registry: Option<AgentRegistry>,
}

impl IngestService {
    pub fn new(store: Store) -> IngestService {
        IngestService {
            store,
            registry: None,
        }
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

/// Stores a batch and answers it; a STORED or DUPLICATE batch counts as hearing from its agent.
async fn store_batch(store: &Store, registry: Option<&AgentRegistry>, batch: WriteBatch) -> Ack {
    let seq = batch.seq;
    let agent_id = registry.map(|_| batch.agent_id.clone());
    let outcome = store.write(batch).await;
    if let (Some(registry), Some(agent_id)) = (registry, agent_id)
        && matches!(
            outcome,
            WriteOutcome::Stored { .. } | WriteOutcome::Duplicate
        )
    {
        registry.touch(&agent_id);
    }
    ack_for(seq, outcome)
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
        let store = self.store.clone();
        let registry = self.registry.clone();
        let acks = request
            .into_inner()
            .map(move |item| {
                let store = store.clone();
                let registry = registry.clone();
                async move {
                    match item {
                        Ok(batch) => Ok(store_batch(&store, registry.as_ref(), batch).await),
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
        let batch = request.into_inner();
        Ok(Response::new(
            store_batch(&self.store, self.registry.as_ref(), batch).await,
        ))
    }
}
