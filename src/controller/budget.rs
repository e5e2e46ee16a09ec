//! Per-identity budget of Secrets Manager reads, so that edits of an identity's Secret or annotations
//! (each of which triggers a reconcile) cannot drive AWS calls at the edit rate. A token bucket: a
//! burst of [`BURST`] reads, then one more every `min(refreshInterval, REFILL_CAP)`, which is never
//! slower than the identity's own schedule.

use std::time::{Duration, Instant};

pub const BURST: f64 = 5.0;
pub const REFILL_CAP: Duration = Duration::from_secs(10);

/// One identity's bucket (kept in its `IdentityMemory`).
#[derive(Debug, Clone, Copy)]
pub struct FetchBudget {
    tokens: f64,
    updated: Instant,
}

impl FetchBudget {
    /// A full bucket: the first reads of a new identity are never put off.
    pub fn full(now: Instant) -> Self {
        Self {
            tokens: BURST,
            updated: now,
        }
    }

    /// Takes one read at `now`: `None` when allowed, else how long until one is.
    pub fn take(&mut self, refresh_interval: Duration, now: Instant) -> Option<Duration> {
        let period = refresh_interval.clamp(Duration::from_secs(1), REFILL_CAP);
        let elapsed = now.saturating_duration_since(self.updated);
        self.tokens = (self.tokens + elapsed.as_secs_f64() / period.as_secs_f64()).min(BURST);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(period.mul_f64(1.0 - self.tokens))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_period() {
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut budget = FetchBudget::full(start);
        for _ in 0..5 {
            assert_eq!(budget.take(hour, start), None);
        }
        let wait = budget.take(hour, start);
        assert!(
            wait.is_some_and(|w| w <= REFILL_CAP && w > Duration::ZERO),
            "{wait:?}"
        );
        // After one period, one more read.
        let later = start + REFILL_CAP;
        assert_eq!(budget.take(hour, later), None);
        assert!(budget.take(hour, later).is_some());
        // A fast schedule refills as fast as it polls.
        let second = Duration::from_secs(1);
        let mut fast = FetchBudget::full(start);
        for tick in 1..20 {
            assert_eq!(fast.take(second, start + second * tick), None);
        }
    }
}
