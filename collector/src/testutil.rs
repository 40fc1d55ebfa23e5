//! Helpers shared by the crate's unit tests.

use damselfly_proto::v1::{Point, WriteBatch};

use crate::store::{Store, WriteOutcome};

/// Stores `points` as batch `seq` of agent "a" and checks that they were stored.
pub async fn store_points(store: &Store, seq: u64, points: Vec<Point>) {
    let outcome = store
        .write(WriteBatch {
            agent_id: "a".into(),
            seq,
            points,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(outcome, WriteOutcome::Stored { .. }),
        "{outcome:?}"
    );
}
