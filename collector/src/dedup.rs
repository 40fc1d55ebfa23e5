//! Which (agent id, sequence) pairs are already stored, so a re-sent batch is stored once.
//!
//! Per agent we keep the stored sequence numbers as a set of disjoint ranges (agents send in order, so this is
//! a handful of ranges), bounded to [`MAX_RANGES`]: when older ranges are dropped, everything at or below them
//! counts as seen (`floor`). The set is checkpointed next to the Parquet files at each flush, and the WAL replay
//! re-adds whatever came after, so it survives restarts.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CollectorError, Result};
use crate::fsutil::write_atomically;

/// Ranges kept per agent before the oldest are folded into the floor.
pub const MAX_RANGES: usize = 256;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct SeqSet {
    /// Every seq <= floor is considered stored.
    floor: u64,
    /// start -> end (inclusive), disjoint, not adjacent, all above `floor`.
    ranges: BTreeMap<u64, u64>,
}

impl SeqSet {
    fn contains(&self, seq: u64) -> bool {
        if seq <= self.floor {
            return true;
        }
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, end)| seq <= *end)
    }

    fn insert(&mut self, seq: u64) {
        if self.contains(seq) {
            return;
        }
        let mut start = seq;
        let mut end = seq;
        // Merge with the range ending right below.
        if let Some((&s, &e)) = self.ranges.range(..seq).next_back()
            && e.checked_add(1) == Some(seq)
        {
            start = s;
            self.ranges.remove(&s);
        }
        // Merge with the range starting right above.
        if let Some(e) = seq
            .checked_add(1)
            .and_then(|above| self.ranges.remove(&above))
        {
            end = e;
        }
        if start == self.floor.saturating_add(1) {
            self.floor = end;
        } else {
            self.ranges.insert(start, end);
        }
        while self.ranges.len() > MAX_RANGES {
            if let Some((_, e)) = self.ranges.pop_first() {
                self.floor = e;
            }
        }
        // The floor may now touch the next range.
        while let Some((&s, &e)) = self.ranges.first_key_value() {
            if s <= self.floor.saturating_add(1) {
                self.floor = self.floor.max(e);
                self.ranges.remove(&s);
            } else {
                break;
            }
        }
    }
}

/// The stored (agent, seq) pairs of this collector.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dedup {
    agents: HashMap<String, SeqSet>,
}

impl Dedup {
    pub fn contains(&self, agent_id: &str, seq: u64) -> bool {
        self.agents.get(agent_id).is_some_and(|s| s.contains(seq))
    }

    pub fn insert(&mut self, agent_id: &str, seq: u64) {
        match self.agents.get_mut(agent_id) {
            Some(set) => set.insert(seq),
            None => {
                let mut set = SeqSet::default();
                set.insert(seq);
                self.agents.insert(agent_id.to_string(), set);
            }
        }
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// Loads a checkpoint; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Dedup> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                CollectorError::Wal(format!(
                    "dedup checkpoint {} is unreadable: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Dedup::default()),
            Err(e) => Err(CollectorError::io(path, e)),
        }
    }

    /// Writes a checkpoint atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self)
            .map_err(|e| CollectorError::Wal(format!("cannot encode dedup checkpoint: {e}")))?;
        write_atomically(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_sequences_collapse_into_the_floor() {
        let mut d = Dedup::default();
        for seq in 1..=1000 {
            assert!(!d.contains("a", seq));
            d.insert("a", seq);
            assert!(d.contains("a", seq));
        }
        assert_eq!(d.agents["a"].floor, 1000);
        assert!(d.agents["a"].ranges.is_empty());
        assert!(!d.contains("a", 1001));
        assert!(!d.contains("b", 1));
    }

    #[test]
    fn gaps_stay_open_until_filled() {
        let mut d = Dedup::default();
        d.insert("a", 1);
        d.insert("a", 3);
        d.insert("a", 5);
        assert!(!d.contains("a", 2) && !d.contains("a", 4));
        d.insert("a", 2);
        assert!(d.contains("a", 2) && d.contains("a", 3));
        assert_eq!(d.agents["a"].floor, 3);
        d.insert("a", 4);
        assert_eq!(d.agents["a"].floor, 5);
    }

    #[test]
    fn extreme_sequence_numbers_do_not_overflow() {
        let mut d = Dedup::default();
        d.insert("a", u64::MAX);
        d.insert("a", u64::MAX - 1);
        d.insert("a", 1);
        assert!(d.contains("a", u64::MAX) && d.contains("a", u64::MAX - 1) && d.contains("a", 1));
        assert!(!d.contains("a", 2));
        for seq in 2..=3 {
            d.insert("a", seq);
        }
        assert_eq!(d.agents["a"].floor, 3);
    }

    #[test]
    fn range_count_is_bounded() {
        let mut d = Dedup::default();
        for seq in (2..10_000).step_by(2) {
            d.insert("a", seq);
        }
        assert!(d.agents["a"].ranges.len() <= MAX_RANGES);
        assert!(d.contains("a", 9_998));
        assert!(!d.contains("a", 9_999));
    }

    #[test]
    fn checkpoint_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dedup.json");
        let mut d = Dedup::default();
        d.insert("a", 1);
        d.insert("a", 7);
        d.save(&path).expect("save");
        assert_eq!(Dedup::load(&path).expect("load"), d);
        assert_eq!(
            Dedup::load(&dir.path().join("missing")).expect("empty"),
            Dedup::default()
        );
    }
}
