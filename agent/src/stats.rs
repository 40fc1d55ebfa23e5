//! Counters shared by the agent's tasks (collection loop, push task, and the pull server and heartbeats, which
//! report `pending`, `pending_bytes` and `batches_dropped`), and their snapshot [`AgentStats`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What an agent did, returned by [`crate::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentStats {
    /// Collection rounds completed.
    pub rounds: u64,
    /// Points collected.
    pub points_collected: u64,
    /// Batches made (each with a new seq).
    pub batches_created: u64,
    /// Batches written to a stream, resends included.
    pub batches_sent: u64,
    /// Sends of a batch that had been sent before (after a RETRY or a broken stream).
    pub batches_resent: u64,
    /// Batches acknowledged STORED.
    pub batches_stored: u64,
    /// Batches acknowledged DUPLICATE (stored by an earlier send).
    pub batches_duplicate: u64,
    /// Batches acknowledged REJECTED and dropped.
    pub batches_rejected: u64,
    /// Batches evicted from a full pending queue or disk spool, never delivered.
    pub batches_dropped: u64,
    /// RETRY acknowledgements received.
    pub retry_acks: u64,
    /// Connection attempts or streams that failed.
    pub push_failures: u64,
    /// REDIRECT acknowledgements received (the shard does not own this agent; nothing stored).
    pub redirect_acks: u64,
    /// Changes of the collector shard pushed to (redirect, failover, return home, new shard map).
    pub shard_switches: u64,
    /// Batches still unacknowledged when the agent stopped: kept in the disk spool for the next start, or lost
    /// with the in-memory queue.
    pub pending_at_exit: u64,
    /// Their size in bytes.
    pub pending_bytes_at_exit: u64,
}

/// Live counters; see [`AgentStats`] for their meaning.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) rounds: AtomicU64,
    pub(crate) points_collected: AtomicU64,
    pub(crate) batches_created: AtomicU64,
    pub(crate) batches_sent: AtomicU64,
    pub(crate) batches_resent: AtomicU64,
    pub(crate) batches_stored: AtomicU64,
    pub(crate) batches_duplicate: AtomicU64,
    pub(crate) batches_rejected: AtomicU64,
    pub(crate) batches_dropped: AtomicU64,
    pub(crate) retry_acks: AtomicU64,
    pub(crate) push_failures: AtomicU64,
    pub(crate) redirect_acks: AtomicU64,
    pub(crate) shard_switches: AtomicU64,
    /// Gauge: batches in the pending queue or spool.
    pub(crate) pending: AtomicU64,
    /// Gauge: their bytes.
    pub(crate) pending_bytes: AtomicU64,
}

/// `counter += 1`.
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Counters {
    /// Sets the pending gauges.
    pub(crate) fn set_pending(&self, batches: usize, bytes: u64) {
        self.pending.store(batches as u64, Relaxed);
        self.pending_bytes.store(bytes, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> AgentStats {
        AgentStats {
            rounds: self.rounds.load(Relaxed),
            points_collected: self.points_collected.load(Relaxed),
            batches_created: self.batches_created.load(Relaxed),
            batches_sent: self.batches_sent.load(Relaxed),
            batches_resent: self.batches_resent.load(Relaxed),
            batches_stored: self.batches_stored.load(Relaxed),
            batches_duplicate: self.batches_duplicate.load(Relaxed),
            batches_rejected: self.batches_rejected.load(Relaxed),
            batches_dropped: self.batches_dropped.load(Relaxed),
            retry_acks: self.retry_acks.load(Relaxed),
            push_failures: self.push_failures.load(Relaxed),
            redirect_acks: self.redirect_acks.load(Relaxed),
            shard_switches: self.shard_switches.load(Relaxed),
            pending_at_exit: self.pending.load(Relaxed),
            pending_bytes_at_exit: self.pending_bytes.load(Relaxed),
        }
    }
}
