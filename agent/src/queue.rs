//! The pending queue: every batch from the moment it is made until the collector is done with it (STORED,
//! DUPLICATE or REJECTED). Bounded; when full the oldest batches are evicted so a long outage costs old data, not
//! memory or disk. Two implementations: [`MemoryQueue`] (no state directory) and the disk spool
//! ([`crate::spool::DiskSpool`]), which survives restarts.
//!
//! The queue is shared ([`SharedQueue`]) by the collection loop (which pushes each round's batches), the push task
//! (which sends from [`BatchQueue::next_after`] and forgets with [`BatchQueue::remove`]) and the pull server (which
//! answers `MetricsSource.Pull` from [`BatchQueue::next_after`] and forgets with [`BatchQueue::ack_through`]).
//! Hold the lock briefly: take it per call, never across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use damselfly_proto::v1::WriteBatch;
use prost::Message;

use crate::stats::Counters;

/// The queue as the agent's tasks share it. Lock it with [`lock`].
pub type SharedQueue = Arc<Mutex<Box<dyn BatchQueue>>>;

/// Wraps a queue for sharing.
pub fn shared(queue: Box<dyn BatchQueue>) -> SharedQueue {
    Arc::new(Mutex::new(queue))
}

/// Locks the shared queue. A task that panicked while holding the lock leaves the queue consistent (every method
/// either completes or changes nothing that matters), so a poisoned lock is used as is.
pub fn lock(queue: &SharedQueue) -> MutexGuard<'_, Box<dyn BatchQueue>> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a [`BatchQueue::push`] had to evict to stay within its bound: never delivered, lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Batches evicted.
    pub batches: u64,
    /// Points in them.
    pub points: u64,
    /// Lowest evicted seq (0 if none).
    pub first_seq: u64,
    /// Highest evicted seq (0 if none).
    pub last_seq: u64,
}

impl Dropped {
    /// Whether nothing was evicted.
    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }

    /// Counts one evicted batch.
    pub fn add(&mut self, seq: u64, points: u64) {
        self.first_seq = if self.batches == 0 {
            seq
        } else {
            self.first_seq.min(seq)
        };
        self.last_seq = self.last_seq.max(seq);
        self.batches += 1;
        self.points += points;
    }

    /// Adds up two reports.
    pub fn merge(&mut self, other: Dropped) {
        if other.is_empty() {
            return;
        }
        self.first_seq = if self.batches == 0 {
            other.first_seq
        } else {
            self.first_seq.min(other.first_seq)
        };
        self.last_seq = self.last_seq.max(other.last_seq);
        self.batches += other.batches;
        self.points += other.points;
    }
}

/// Storage for not-yet-acknowledged batches, ordered by seq.
pub trait BatchQueue: Send + 'static {
    /// Adds a batch. Returns what was evicted to stay within the bound (the oldest batches), for the caller to
    /// count and log. Seqs must arrive in increasing order (the [`crate::seq::SeqAllocator`] guarantees it).
    fn push(&mut self, batch: WriteBatch) -> Dropped;
    /// The first batch with a seq greater than `seq` (a copy: the queue keeps it until [`BatchQueue::remove`]).
    fn next_after(&self, seq: u64) -> Option<WriteBatch>;
    /// Forgets the batch with this seq and returns it; `None` if it is not here (e.g. already evicted). The spool
    /// reads the batch back from disk for this: when the batch itself is not needed, [`BatchQueue::discard`] is
    /// cheaper.
    fn remove(&mut self, seq: u64) -> Option<WriteBatch>;
    /// Forgets the batch with this seq (the collector is done with it); false if it is not here.
    fn discard(&mut self, seq: u64) -> bool {
        self.remove(seq).is_some()
    }
    /// Forgets every batch with a seq at or below `seq` (the pull protocol's `ack_through_seq`); returns how many.
    fn ack_through(&mut self, seq: u64) -> u64 {
        let mut n = 0;
        while let Some(b) = self.next_after(0) {
            if b.seq > seq || !self.discard(b.seq) {
                break;
            }
            n += 1;
        }
        n
    }
    /// Number of batches held.
    fn len(&self) -> usize;
    /// Whether no batch is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes held (encoded batches; for the spool, its files).
    fn bytes(&self) -> u64;
    /// Batches evicted since the queue was opened.
    fn dropped(&self) -> u64;
    /// Whether what is held survives a restart.
    fn durable(&self) -> bool {
        false
    }
    /// Makes what was pushed durable and applies removals to storage. A no-op for memory; the spool fsyncs here
    /// (see `spool.rs`). Blocking: call it from a blocking thread.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An in-memory [`BatchQueue`] holding at most `capacity` batches.
#[derive(Debug)]
pub struct MemoryQueue {
    batches: VecDeque<WriteBatch>,
    capacity: usize,
    bytes: u64,
    dropped: u64,
}

impl MemoryQueue {
    /// `capacity` below 1 is treated as 1.
    pub fn new(capacity: usize) -> Self {
        Self {
            batches: VecDeque::new(),
            capacity: capacity.max(1),
            bytes: 0,
            dropped: 0,
        }
    }

    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.batches.binary_search_by_key(&seq, |b| b.seq)
    }

    fn forget(&mut self, batch: &WriteBatch) {
        self.bytes = self.bytes.saturating_sub(batch.encoded_len() as u64);
    }
}

impl BatchQueue for MemoryQueue {
    fn push(&mut self, batch: WriteBatch) -> Dropped {
        self.bytes += batch.encoded_len() as u64;
        // Seqs normally arrive in order, so this is an append; stay sorted regardless.
        match self.position(batch.seq) {
            Ok(i) => {
                let old = std::mem::replace(&mut self.batches[i], batch);
                self.forget(&old);
            }
            Err(i) => self.batches.insert(i, batch),
        }
        let excess = self.batches.len().saturating_sub(self.capacity);
        let mut dropped = Dropped::default();
        for b in self.batches.drain(..excess).collect::<Vec<_>>() {
            self.forget(&b);
            dropped.add(b.seq, damselfly_proto::columnar::batch_rows(&b) as u64);
        }
        self.dropped += dropped.batches;
        dropped
    }

    fn next_after(&self, seq: u64) -> Option<WriteBatch> {
        let i = self.batches.partition_point(|b| b.seq <= seq);
        self.batches.get(i).cloned()
    }

    fn remove(&mut self, seq: u64) -> Option<WriteBatch> {
        // Acks come in order, so this is almost always the front.
        let i = self.position(seq).ok()?;
        let b = self.batches.remove(i)?;
        self.forget(&b);
        Some(b)
    }

    fn ack_through(&mut self, seq: u64) -> u64 {
        let n = self.batches.partition_point(|b| b.seq <= seq);
        for b in self.batches.drain(..n).collect::<Vec<_>>() {
            self.forget(&b);
        }
        n as u64
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Pushes one round's batches into the shared queue, counts them, updates the pending gauges, and counts and logs
/// what the bound evicted (a warning naming how many points were lost).
pub(crate) fn enqueue(queue: &SharedQueue, batches: Vec<WriteBatch>, counters: &Counters) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut dropped = Dropped::default();
    let durable = {
        let mut q = lock(queue);
        for b in batches {
            counters.batches_created.fetch_add(1, Relaxed);
            dropped.merge(q.push(b));
        }
        counters.set_pending(q.len(), q.bytes());
        q.durable()
    };
    if !dropped.is_empty() {
        let total = counters.batches_dropped.fetch_add(dropped.batches, Relaxed) + dropped.batches;
        tracing::warn!(
            batches = dropped.batches,
            points = dropped.points,
            first_seq = dropped.first_seq,
            last_seq = dropped.last_seq,
            total_dropped = total,
            "{} full: dropped the {} oldest batches; {} points are lost",
            if durable {
                "disk spool (spool_max_bytes)"
            } else {
                "pending queue (max_pending_batches)"
            },
            dropped.batches,
            dropped.points
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(seq: u64) -> WriteBatch {
        WriteBatch {
            chunks: Vec::new(),
            agent_id: "a".into(),
            seq,
            ..WriteBatch::default()
        }
    }

    #[test]
    fn bound_drops_oldest() {
        let mut q = MemoryQueue::new(3);
        for s in 1..=3 {
            assert!(q.push(b(s)).is_empty());
        }
        let dropped = q.push(b(4));
        assert_eq!(
            (dropped.batches, dropped.first_seq, dropped.last_seq),
            (1, 1, 1)
        );
        assert_eq!(q.len(), 3);
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.next_after(0).map(|b| b.seq), Some(2));
    }

    #[test]
    fn next_after_and_remove() {
        let mut q = MemoryQueue::new(10);
        for s in [1, 2, 5, 9] {
            q.push(b(s));
        }
        assert!(q.bytes() > 0);
        assert_eq!(q.next_after(0).map(|b| b.seq), Some(1));
        assert_eq!(q.next_after(2).map(|b| b.seq), Some(5));
        assert_eq!(q.next_after(3).map(|b| b.seq), Some(5));
        assert_eq!(q.next_after(9).map(|b| b.seq), None);
        assert_eq!(q.remove(5).map(|b| b.seq), Some(5));
        assert!(!q.discard(5));
        assert_eq!(q.next_after(2).map(|b| b.seq), Some(9));
        assert_eq!(q.len(), 3);
        // An out-of-order push still keeps seq order.
        q.push(b(3));
        assert_eq!(q.next_after(2).map(|b| b.seq), Some(3));
        assert_eq!(q.ack_through(3), 3);
        assert_eq!(q.next_after(0).map(|b| b.seq), Some(9));
        assert!(q.discard(9));
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn dropped_merges() {
        let mut d = Dropped::default();
        d.merge(Dropped::default());
        assert!(d.is_empty());
        d.add(7, 2);
        let mut e = Dropped::default();
        e.add(3, 1);
        e.add(4, 1);
        d.merge(e);
        assert_eq!(
            d,
            Dropped {
                batches: 3,
                points: 4,
                first_seq: 3,
                last_seq: 7
            }
        );
    }
}
