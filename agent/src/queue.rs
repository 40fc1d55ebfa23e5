//! The pending queue: every batch from the moment it is made until the collector acknowledges it STORED or
//! DUPLICATE (or REJECTED). Bounded; when full the oldest batch is evicted so a long outage costs old data, not
//! memory. A disk spool (a later issue) implements the same trait.

use std::collections::VecDeque;

use damselfly_proto::v1::WriteBatch;

/// Storage for not-yet-acknowledged batches, ordered by seq.
pub trait BatchQueue: Send + 'static {
    /// Adds a batch. Returns the batches evicted to stay within the bound (oldest first), for the caller to count
    /// and log.
    fn push(&mut self, batch: WriteBatch) -> Vec<WriteBatch>;
    /// The first batch with a seq greater than `seq` (a copy: the queue keeps it until [`BatchQueue::remove`]).
    fn next_after(&self, seq: u64) -> Option<WriteBatch>;
    /// Forgets the batch with this seq (acknowledged); `None` if it is not here (e.g. already evicted).
    fn remove(&mut self, seq: u64) -> Option<WriteBatch>;
    /// Number of batches held.
    fn len(&self) -> usize;
    /// Whether no batch is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An in-memory [`BatchQueue`] holding at most `capacity` batches.
#[derive(Debug)]
pub struct MemoryQueue {
    batches: VecDeque<WriteBatch>,
    capacity: usize,
}

impl MemoryQueue {
    /// `capacity` below 1 is treated as 1.
    pub fn new(capacity: usize) -> Self {
        Self {
            batches: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.batches.binary_search_by_key(&seq, |b| b.seq)
    }
}

impl BatchQueue for MemoryQueue {
    fn push(&mut self, batch: WriteBatch) -> Vec<WriteBatch> {
        // Seqs normally arrive in order, so this is an append; stay sorted regardless.
        match self.position(batch.seq) {
            Ok(i) => self.batches[i] = batch,
            Err(i) => self.batches.insert(i, batch),
        }
        let excess = self.batches.len().saturating_sub(self.capacity);
        self.batches.drain(..excess).collect()
    }

    fn next_after(&self, seq: u64) -> Option<WriteBatch> {
        let i = self.batches.partition_point(|b| b.seq <= seq);
        self.batches.get(i).cloned()
    }

    fn remove(&mut self, seq: u64) -> Option<WriteBatch> {
        // Acks come in order, so this is almost always the front.
        let i = self.position(seq).ok()?;
        self.batches.remove(i)
    }

    fn len(&self) -> usize {
        self.batches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(seq: u64) -> WriteBatch {
        WriteBatch {
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
        assert_eq!(dropped.iter().map(|b| b.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(q.len(), 3);
        assert_eq!(q.next_after(0).map(|b| b.seq), Some(2));
    }

    #[test]
    fn next_after_and_remove() {
        let mut q = MemoryQueue::new(10);
        for s in [1, 2, 5, 9] {
            q.push(b(s));
        }
        assert_eq!(q.next_after(0).map(|b| b.seq), Some(1));
        assert_eq!(q.next_after(2).map(|b| b.seq), Some(5));
        assert_eq!(q.next_after(3).map(|b| b.seq), Some(5));
        assert_eq!(q.next_after(9).map(|b| b.seq), None);
        assert_eq!(q.remove(5).map(|b| b.seq), Some(5));
        assert!(q.remove(5).is_none());
        assert_eq!(q.next_after(2).map(|b| b.seq), Some(9));
        assert_eq!(q.len(), 3);
        // An out-of-order push still keeps seq order.
        q.push(b(3));
        assert_eq!(q.next_after(2).map(|b| b.seq), Some(3));
    }
}
