//! Turns one round of points into `WriteBatch`es: the identity tags go once into `common_tags`, points are split at
//! `batch_max_points`, every batch gets the next sequence number, and its rows go as columnar chunks (tags once per
//! series, values packed: several times smaller on the wire and in the spool, and the collector's fast path).

use damselfly_proto::columnar::points_to_chunks;
use damselfly_proto::v1::{Point, Tag, WriteBatch};

use crate::seq::SeqAllocator;

/// Builds batches for one agent.
#[derive(Debug)]
pub struct Batcher {
    agent_id: String,
    common_tags: Vec<Tag>,
    max_points: usize,
    seq: SeqAllocator,
}

impl Batcher {
    /// `max_points` below 1 is treated as 1.
    pub fn new(
        agent_id: String,
        common_tags: Vec<Tag>,
        max_points: usize,
        seq: SeqAllocator,
    ) -> Self {
        Self {
            agent_id,
            common_tags,
            max_points: max_points.max(1),
            seq,
        }
    }

    /// Splits `points` into batches of at most `max_points`, in order, with strictly increasing seqs. No points, no
    /// batches (an empty batch would only burn a seq).
    pub fn batches(&mut self, mut points: Vec<Point>) -> Vec<WriteBatch> {
        let mut out = Vec::with_capacity(points.len().div_ceil(self.max_points));
        while !points.is_empty() {
            let rest = points.split_off(points.len().min(self.max_points));
            // Probes give every field one type, so conversion only fails on a bug; then send the points as they are.
            let (batch_points, chunks) = match points_to_chunks(&points) {
                Ok(chunks) => (Vec::new(), chunks),
                Err(e) => {
                    tracing::warn!(error = %e, "sending points row by row");
                    (points, Vec::new())
                }
            };
            out.push(WriteBatch {
                chunks,
                agent_id: self.agent_id.clone(),
                seq: self.seq.next_seq(),
                common_tags: self.common_tags.clone(),
                points: batch_points,
            });
            points = rest;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use damselfly_proto::columnar::batch_rows;

    fn pts(n: usize) -> Vec<Point> {
        (0..n)
            .map(|i| Point {
                measurement: format!("m{i}"),
                time_unix_nano: i as i64,
                ..Point::default()
            })
            .collect()
    }

    #[test]
    fn splits_at_max_points_and_keeps_order() {
        let tags = vec![Tag {
            key: "ns_id".into(),
            value: "ns".into(),
        }];
        let mut b = Batcher::new("a1".into(), tags.clone(), 3, SeqAllocator::starting_at(1));
        let batches = b.batches(pts(7));
        let sizes: Vec<usize> = batches.iter().map(batch_rows).collect();
        assert_eq!(sizes, [3, 3, 1]);
        let names: Vec<&str> = batches
            .iter()
            .flat_map(|b| &b.chunks)
            .map(|c| c.measurement.as_str())
            .collect();
        assert_eq!(names, ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]);
        assert!(
            batches
                .iter()
                .all(|b| b.agent_id == "a1" && b.common_tags == tags)
        );
        assert_eq!(batches.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2, 3]);

        // Exact multiple: no empty trailing batch; seq continues across rounds.
        let next = b.batches(pts(6));
        assert_eq!(
            next.iter()
                .map(|b| (b.seq, batch_rows(b)))
                .collect::<Vec<_>>(),
            [(4, 3), (5, 3)]
        );
        assert!(b.batches(Vec::new()).is_empty());
        assert_eq!(b.batches(pts(1))[0].seq, 6);
    }
}
