//! The push path: one bidirectional `Push` stream to the collector, with the delivery contract of `ingest.proto`.
//!
//! The collection loop puts batches into the shared queue ([`SharedQueue`], memory or disk spool) and wakes the
//! push task through a [`Notify`]. Every batch stays in the queue until its ack says STORED or DUPLICATE (or
//! REJECTED: logged, counted and dropped, since resending cannot help). Up to `max_in_flight` batches are on the
//! stream at once, oldest first; acks arrive in send order. On RETRY, a broken stream, an ack timeout or a failed
//! connection the stream is dropped and, after an exponential backoff with jitter (at least `retry_after_ms` for
//! RETRY), a new one re-sends every pending batch in seq order: after an outage the spool is replayed in order, with
//! the batches' original timestamps. That may send a batch the collector already stored (its ack was lost): the
//! collector answers DUPLICATE, so nothing is stored twice. Network errors are never fatal.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use damselfly_proto::v1::{Ack, AckStatus, WriteBatch, ingest_client::IngestClient};
use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentConfig;
use crate::queue::{SharedQueue, lock};
use crate::stats::{Counters, inc};

/// How the push task talks to the collector.
#[derive(Debug, Clone)]
pub struct PushSettings {
    /// Collector URL, `http://host:port`.
    pub collector: String,
    /// Most unacknowledged batches on the stream.
    pub max_in_flight: usize,
    /// Limit for establishing a TCP + HTTP/2 connection.
    pub connect_timeout: Duration,
    /// A stream whose oldest in-flight batch got no ack for this long is considered dead.
    pub ack_timeout: Duration,
    /// First reconnect delay; doubles per consecutive failure.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
}

impl PushSettings {
    /// Settings for pushing to `collector` with the agent config's limits and the default timeouts (connect 5 s,
    /// ack 30 s, backoff 100 ms to 30 s).
    pub fn new(collector: String, config: &AgentConfig) -> Self {
        Self {
            collector,
            max_in_flight: config.max_in_flight,
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Exponential backoff with "equal jitter": the delay is uniformly random in [d/2, d], where d doubles per
/// failure up to the maximum, so many agents that lost the same collector do not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Why a stream ended.
#[derive(Debug)]
enum SessionEnd {
    /// Input closed and every batch acknowledged: the push task is done.
    Drained,
    /// The collector asked to resend later.
    Retry { after: Duration, message: String },
    /// Connection, stream or protocol failure.
    Failed(String),
}

/// What the push task waits on besides the network: new batches, and the end of collection.
struct Input {
    /// Notified by the collection loop after it put batches into the queue.
    wake: Arc<Notify>,
    /// Becomes true when the agent shuts down (no more batches will come).
    stop: watch::Receiver<bool>,
    /// The stop signal was seen: deliver what is left, then return.
    closing: bool,
}

impl Input {
    /// Completes when a batch may have arrived or shutdown began. When closing, only new batches wake it (there
    /// are none after shutdown), so callers check `closing` before waiting on nothing.
    async fn changed(&mut self) {
        tokio::select! {
            () = self.wake.notified() => {}
            r = self.stop.changed(), if !self.closing => {
                if r.is_err() || *self.stop.borrow() {
                    self.closing = true;
                }
            }
        }
    }
}

/// Sends the shared queue's batches to the collector until shutdown and everything is acknowledged.
pub struct Pusher {
    endpoint: Endpoint,
    settings: PushSettings,
    queue: SharedQueue,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
    backoff: Backoff,
    /// Highest seq ever written to a stream: a send at or below it is a resend.
    max_sent: u64,
}

impl Pusher {
    /// `wake` is notified by whoever pushes into `queue`. Fails only on a malformed collector URL.
    pub(crate) fn new(
        settings: PushSettings,
        queue: SharedQueue,
        wake: Arc<Notify>,
        counters: Arc<Counters>,
    ) -> Result<Self, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(settings.collector.clone())?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            // HTTP/2 pings notice a silently dead peer (VM migrated, NAT dropped) on an otherwise idle stream.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        let backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
        Ok(Self {
            endpoint,
            settings,
            queue,
            wake,
            counters,
            backoff,
            max_sent: 0,
        })
    }

    fn pending(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Runs until `stop` turns true (or its sender is dropped) and the queue is empty. Cancel it (abort the task)
    /// to give up on pending batches: they stay in the queue (and in the spool, for the next start).
    pub(crate) async fn run(mut self, stop: watch::Receiver<bool>) {
        let closing = *stop.borrow();
        let mut input = Input {
            wake: Arc::clone(&self.wake),
            stop,
            closing,
        };
        loop {
            // Connect only when there is something to send: an idle agent keeps no retry loop spinning.
            while self.pending() == 0 {
                if input.closing {
                    return;
                }
                input.changed().await;
            }
            match self.session(&mut input).await {
                SessionEnd::Drained => return,
                SessionEnd::Retry { after, message } => {
                    let delay = after.max(self.backoff.next_delay());
                    tracing::info!(reason = %message, ?delay, pending = self.pending(), "collector asked to retry");
                    self.pause(delay, &mut input).await;
                }
                SessionEnd::Failed(reason) => {
                    inc(&self.counters.push_failures);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        collector = %self.settings.collector,
                        %reason,
                        retry_in = ?delay,
                        pending = self.pending(),
                        "push to collector failed"
                    );
                    self.pause(delay, &mut input).await;
                }
            }
        }
    }

    /// One connection and stream, until it fails or everything is delivered and the input is closed.
    async fn session(&mut self, input: &mut Input) -> SessionEnd {
        let endpoint = self.endpoint.clone();
        let connect = async move { endpoint.connect().await };
        tokio::pin!(connect);
        let channel: Channel = loop {
            tokio::select! {
                r = &mut connect => match r {
                    Ok(c) => break c,
                    Err(e) => return SessionEnd::Failed(format!("cannot connect: {}", error_chain(&e))),
                },
                () = input.changed() => {}
            }
        };
        let mut client = IngestClient::new(channel)
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd);

        // The request stream: batches written to `tx` go up the stream. Its capacity equals the in-flight limit, and
        // everything in it counts as in flight, so `try_send` never finds it full.
        let cap = self.settings.max_in_flight.max(1);
        let (tx, rx) = mpsc::channel::<WriteBatch>(cap);
        let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(cap);
        // Highest seq sent on this stream; a new stream starts again from the oldest pending batch.
        let mut cursor = 0u64;
        if let Err(reason) = self.fill(&tx, &mut in_flight, &mut cursor) {
            return SessionEnd::Failed(reason);
        }
        let call = client.push(ReceiverStream::new(rx));
        tokio::pin!(call);
        let mut acks = loop {
            tokio::select! {
                r = &mut call => match r {
                    Ok(response) => break response.into_inner(),
                    Err(status) => return SessionEnd::Failed(format!("cannot open stream: {}", status_text(&status))),
                },
                () = input.changed() => {}
            }
        };
        tracing::debug!(collector = %self.settings.collector, "push stream open");

        let mut last_ack = Instant::now();
        loop {
            if let Err(reason) = self.fill(&tx, &mut in_flight, &mut cursor) {
                return SessionEnd::Failed(reason);
            }
            if input.closing && in_flight.is_empty() && self.pending() == 0 {
                return SessionEnd::Drained;
            }
            // The clock runs from the later of "oldest batch sent" and "last ack": a slow but moving collector is
            // fine, a stuck one is abandoned.
            let deadline = in_flight
                .front()
                .map_or(last_ack, |(_, sent)| (*sent).max(last_ack))
                + self.settings.ack_timeout;
            tokio::select! {
                () = input.changed() => {}
                m = acks.next() => match m {
                    Some(Ok(ack)) => {
                        last_ack = Instant::now();
                        if let Some(end) = self.on_ack(ack, &mut in_flight) {
                            return end;
                        }
                    }
                    Some(Err(status)) => return SessionEnd::Failed(format!("stream error: {}", status_text(&status))),
                    None => return SessionEnd::Failed("collector closed the stream".to_owned()),
                },
                () = tokio::time::sleep_until(deadline), if !in_flight.is_empty() => {
                    return SessionEnd::Failed(format!(
                        "no ack within {:?} for seq {}",
                        self.settings.ack_timeout,
                        in_flight.front().map_or(0, |(s, _)| *s)
                    ));
                }
            }
        }
    }

    /// Puts pending batches on the stream up to the in-flight limit.
    fn fill(
        &mut self,
        tx: &mpsc::Sender<WriteBatch>,
        in_flight: &mut VecDeque<(u64, Instant)>,
        cursor: &mut u64,
    ) -> Result<(), String> {
        while in_flight.len() < self.settings.max_in_flight.max(1) {
            // Lock per batch: the collection loop and the spool's fsync must not wait for the whole fill.
            let Some(batch) = lock(&self.queue).next_after(*cursor) else {
                break;
            };
            let seq = batch.seq;
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => break,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err("request stream closed".to_owned());
                }
            }
            in_flight.push_back((seq, Instant::now()));
            *cursor = seq;
            inc(&self.counters.batches_sent);
            if seq <= self.max_sent {
                inc(&self.counters.batches_resent);
            }
            self.max_sent = self.max_sent.max(seq);
        }
        Ok(())
    }

    /// Applies one ack; `Some` ends the stream.
    fn on_ack(&mut self, ack: Ack, in_flight: &mut VecDeque<(u64, Instant)>) -> Option<SessionEnd> {
        let Some((expected, _)) = in_flight.pop_front() else {
            return Some(SessionEnd::Failed(format!(
                "ack for seq {} with nothing in flight",
                ack.seq
            )));
        };
        if ack.seq != expected {
            // The contract says acks come in send order; resync by resending everything unacknowledged.
            return Some(SessionEnd::Failed(format!(
                "ack for seq {} but seq {expected} was next",
                ack.seq
            )));
        }
        match AckStatus::try_from(ack.status) {
            Ok(AckStatus::Stored) => {
                inc(&self.counters.batches_stored);
                self.acknowledged(ack.seq);
            }
            Ok(AckStatus::Duplicate) => {
                inc(&self.counters.batches_duplicate);
                self.acknowledged(ack.seq);
            }
            Ok(AckStatus::Rejected) => {
                inc(&self.counters.batches_rejected);
                tracing::warn!(seq = ack.seq, reason = %ack.message, "collector rejected batch; dropping it");
                self.acknowledged(ack.seq);
            }
            Ok(AckStatus::Retry) => {
                inc(&self.counters.retry_acks);
                return Some(SessionEnd::Retry {
                    after: Duration::from_millis(ack.retry_after_ms),
                    message: format!("seq {}: {}", ack.seq, ack.message),
                });
            }
            Ok(AckStatus::Unspecified | AckStatus::Redirect) | Err(_) => {
                return Some(SessionEnd::Failed(format!(
                    "ack for seq {} has unknown status {}",
                    ack.seq, ack.status
                )));
            }
        }
        None
    }

    /// The collector is done with `seq`: forget it, and count the link as healthy again.
    fn acknowledged(&mut self, seq: u64) {
        {
            let mut q = lock(&self.queue);
            q.discard(seq);
            self.counters.set_pending(q.len(), q.bytes());
        }
        self.backoff.reset();
    }

    /// Waits `delay` before the next attempt. Shutdown cuts it short once, so the agent makes one more attempt to
    /// deliver within its flush time instead of sleeping through it.
    async fn pause(&mut self, delay: Duration, input: &mut Input) {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let was_closing = input.closing;
            tokio::select! {
                () = &mut sleep => return,
                () = input.changed() => {
                    if input.closing && !was_closing {
                        return;
                    }
                }
            }
        }
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

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut nominal = Duration::from_millis(100);
        for _ in 0..15 {
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(30));
        }
        assert_eq!(nominal, Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
