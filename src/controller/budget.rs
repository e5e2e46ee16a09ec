//! Per-identity budget of Secrets Manager reads, so that edits of an identity's Secret or annotations
//! (each of which triggers a reconcile) cannot drive AWS calls at the edit rate. A token bucket: a
//! burst of [`BURST`] reads, then one more every `min(refreshInterval, REFILL_CAP)`, which is never
//! slower than the identity's own schedule.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

pub const BURST: f64 = 5.0;
pub const REFILL_CAP: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct FetchBudget<K> {
    buckets: HashMap<K, Bucket>,
}

impl<K> Default for FetchBudget<K> {
    fn default() -> Self {
        Self {
            buckets: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> FetchBudget<K> {
    /// Takes one read for `key` at `now`: `None` when allowed, else how long until one is.
    pub fn take(&mut self, key: &K, refresh_interval: Duration, now: Instant) -> Option<Duration> {
        let period = refresh_interval.clamp(Duration::from_secs(1), REFILL_CAP);
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: BURST,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() / period.as_secs_f64()).min(BURST);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            None
        } else {
            Some(period.mul_f64(1.0 - bucket.tokens))
        }
    }

    /// Forgets a deleted identity.
    pub fn forget(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_period() {
        let mut budget = FetchBudget::default();
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(budget.take(&"a", hour, start), None);
        }
        let wait = budget.take(&"a", hour, start);
        assert!(
            wait.is_some_and(|w| w <= REFILL_CAP && w > Duration::ZERO),
            "{wait:?}"
        );
        // Another identity has its own bucket.
        assert_eq!(budget.take(&"b", hour, start), None);
        // After one period, one more read.
        let later = start + REFILL_CAP;
        assert_eq!(budget.take(&"a", hour, later), None);
        assert!(budget.take(&"a", hour, later).is_some());
        // A fast schedule refills as fast as it polls.
        let second = Duration::from_secs(1);
        for tick in 1..20 {
            assert_eq!(budget.take(&"c", second, start + second * tick), None);
        }
        budget.forget(&"a");
        assert_eq!(budget.len(), 2);
    }
}
