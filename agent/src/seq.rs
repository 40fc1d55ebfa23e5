//! Batch sequence numbers: strictly increasing per agent, never reused, never 0.
//!
//! The collector stores a batch at most once per `(agent_id, seq)` and answers DUPLICATE for a seq it has seen, so a
//! restarted agent that counted from 1 again would have its fresh data silently dropped as duplicates. Two modes:
//!
//! * with a state directory, the high-water mark is persisted in `<state_dir>/seq` in blocks of [`RESERVE_BLOCK`]
//!   (one small fsynced write per block, not per batch); after a restart numbering resumes above the last reserved
//!   block, skipping at most one block. A fresh directory starts at 1.
//! * without one, numbering starts at the current Unix time in microseconds, which a restarted agent cannot have
//!   reached unless it sent more than a million batches per second or the clock stepped back.
//!
//! The disk spool keeps batches (with their seqs) across restarts; [`SeqAllocator::ensure_above`] moves numbering
//! above every seq it holds, so a restarted agent never gives a new batch the seq of one still waiting in the spool
//! (the state file already guarantees that; this also covers a spool without a state file, a clock that stepped
//! back, or a lost state write).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Sequence numbers reserved per write of the state file.
pub const RESERVE_BLOCK: u64 = 1024;

/// Hands out sequence numbers.
#[derive(Debug)]
pub struct SeqAllocator {
    next: u64,
    /// Numbers below this are covered by the state file (unused with no state file).
    reserved_until: u64,
    file: Option<PathBuf>,
}

impl SeqAllocator {
    /// A volatile allocator starting at `first` (at least 1); nothing is persisted.
    pub fn starting_at(first: u64) -> Self {
        Self {
            next: first.max(1),
            reserved_until: u64::MAX,
            file: None,
        }
    }

    /// A volatile allocator starting at the wall clock in microseconds (see the module docs).
    pub fn from_clock() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1);
        Self::starting_at(micros)
    }

    /// An allocator persisted in `<dir>/seq`; creates the directory and reserves the first block now, so an
    /// unwritable directory fails at start-up rather than later.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("seq");
        let next = match std::fs::read_to_string(&file) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a sequence number ({e}): {:?}",
                        file.display(),
                        text.trim()
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e),
        };
        let mut alloc = Self {
            next: next.max(1),
            reserved_until: next.max(1),
            file: Some(file),
        };
        alloc.reserve()?;
        Ok(alloc)
    }

    /// The next sequence number. A failed state write is logged and numbering continues in memory: losing the
    /// reservation only matters after a restart, and stopping collection would lose data for certain.
    pub fn next_seq(&mut self) -> u64 {
        if self.next >= self.reserved_until
            && let Err(e) = self.reserve()
        {
            tracing::error!(error = %e, "cannot persist the batch sequence number; a restart may reuse numbers");
            // Do not retry on every batch; try again after another block.
            self.reserved_until = self.next.saturating_add(RESERVE_BLOCK);
        }
        let seq = self.next;
        self.next += 1;
        seq
    }

    /// Makes every later seq greater than `seq` (e.g. the highest seq in the disk spool). Persists a new
    /// reservation when numbering jumps past the current one; a failed write is logged as in [`Self::next_seq`].
    pub fn ensure_above(&mut self, seq: u64) {
        if self.next > seq {
            return;
        }
        self.next = seq.saturating_add(1);
        if self.next >= self.reserved_until
            && let Err(e) = self.reserve()
        {
            tracing::error!(error = %e, "cannot persist the batch sequence number; a restart may reuse numbers");
            self.reserved_until = self.next.saturating_add(RESERVE_BLOCK);
        }
    }

    /// Persists `next + RESERVE_BLOCK` (write to a temporary file, fsync, rename) before handing out that block.
    fn reserve(&mut self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let until = self.next.saturating_add(RESERVE_BLOCK);
        let tmp = file.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{until}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, file)?;
        self.reserved_until = until;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_from_start() {
        let mut s = SeqAllocator::starting_at(0);
        let v: Vec<u64> = (0..5).map(|_| s.next_seq()).collect();
        assert_eq!(v, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn clock_start_is_large() {
        let a = SeqAllocator::from_clock().next_seq();
        assert!(a > 1_600_000_000_000_000, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(SeqAllocator::from_clock().next_seq() > a);
    }

    #[test]
    fn persisted_seq_never_reused_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = SeqAllocator::open(dir.path()).expect("open");
        assert_eq!(a.next_seq(), 1);
        let mut last = 1;
        for _ in 0..(RESERVE_BLOCK + 10) {
            let s = a.next_seq();
            assert!(s > last);
            last = s;
        }
        drop(a);
        let mut b = SeqAllocator::open(dir.path()).expect("reopen");
        let first = b.next_seq();
        assert!(first > last, "{first} <= {last}");
        assert!(first <= last + RESERVE_BLOCK + 1);
    }

    #[test]
    fn ensure_above_skips_past_spooled_seqs_and_persists() {
        let mut v = SeqAllocator::starting_at(5);
        v.ensure_above(3);
        assert_eq!(v.next_seq(), 5);
        v.ensure_above(100);
        assert_eq!(v.next_seq(), 101);

        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = SeqAllocator::open(dir.path()).expect("open");
        a.ensure_above(10 * RESERVE_BLOCK);
        assert_eq!(a.next_seq(), 10 * RESERVE_BLOCK + 1);
        drop(a);
        let mut b = SeqAllocator::open(dir.path()).expect("reopen");
        assert!(b.next_seq() > 10 * RESERVE_BLOCK + 1);
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("seq"), "garbage").expect("write");
        let err = SeqAllocator::open(dir.path()).expect_err("must fail");
        assert!(err.to_string().contains("not a sequence number"), "{err}");
    }
}
