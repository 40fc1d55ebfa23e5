//! Points per second per agent (`max_agent_points_per_sec`): a token bucket per agent id that refills at the
//! limit and holds ten seconds of it (an agent sends a round every interval, so a round's batches pass at once).
//! A batch over the limit is answered "retry later" (gRPC `UNAVAILABLE` or a RETRY ack, with the wait), never
//! refused: the agent keeps it in its spool and sends it again, so nothing is lost, only slowed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds of the limit a bucket holds.
const BURST_SECS: f64 = 10.0;

/// The buckets of every agent. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AgentRates {
    /// Points per second per agent; 0 = no limit.
    per_sec: u64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// May go below zero: a batch larger than the bucket passes when the bucket is full, and the debt is paid
    /// back before the next one.
    tokens: f64,
    updated: Instant,
}

impl AgentRates {
    pub fn new(per_sec: u64) -> AgentRates {
        AgentRates {
            per_sec,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `points` from `agent_id`'s bucket, or says how long to wait (and leaves the bucket as it was).
    pub fn admit(&self, agent_id: &str, points: usize) -> Result<(), Duration> {
        self.admit_at(agent_id, points, Instant::now())
    }

    fn admit_at(&self, agent_id: &str, points: usize, now: Instant) -> Result<(), Duration> {
        if self.per_sec == 0 || points == 0 {
            return Ok(());
        }
        let rate = self.per_sec as f64;
        let capacity = rate * BURST_SECS;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(agent_id.to_string()).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.updated = now;
        let needed = (points as f64).min(capacity);
        if bucket.tokens >= needed {
            bucket.tokens -= points as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - bucket.tokens) / rate))
        }
    }

    pub fn per_sec(&self) -> u64 {
        self.per_sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_ten_seconds_and_refills_at_the_limit() {
        let rates = AgentRates::new(100);
        let t0 = Instant::now();
        assert!(rates.admit_at("a", 600, t0).is_ok());
        assert!(rates.admit_at("a", 400, t0).is_ok());
        // Empty: 50 points need half a second.
        let wait = rates.admit_at("a", 50, t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(
            rates
                .admit_at("a", 50, t0 + Duration::from_millis(500))
                .is_ok()
        );
        // Another agent has its own bucket.
        assert!(rates.admit_at("b", 1000, t0).is_ok());
        // A batch larger than the bucket passes when it is full, then the debt is paid back.
        let t1 = t0 + Duration::from_secs(60);
        assert!(rates.admit_at("c", 5000, t1).is_ok());
        let wait = rates.admit_at("c", 1, t1).expect_err("in debt");
        assert!(wait >= Duration::from_secs(40), "{wait:?}");
        assert!(AgentRates::new(0).admit("x", usize::MAX).is_ok());
    }
}
