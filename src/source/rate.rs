//! Client-side rate limiting that adapts (AIMD), sans-IO: one bucket per region, shared by every
//! identity, the sweep and the batches. Calls take a token; the rate halves when Secrets Manager
//! throttles (or is unavailable) and grows back by a fixed step per second of calls that succeed,
//! never above the configured ceiling. So under an account quota the operator's call rate settles
//! at or below what the endpoint grants, whatever the size of the fleet.
//!
//! One congestion signal per round trip, as in TCP: a throttled answer to a call sent before the
//! last decrease says nothing new (that call left at the old rate) and is ignored; a decrease also
//! empties the bucket, so no saved-up burst follows it.

use std::time::{Duration, Instant};

/// The default ceiling, calls per second per region: well below Secrets Manager's published
/// quotas (GetSecretValue and DescribeSecret 10,000/s, BatchGetSecretValue and ListSecrets 100/s),
/// which every application of the account shares.
pub const DEFAULT_CALLS_PER_SECOND: f64 = 50.0;
/// The rate never drops below this, so a recovered endpoint is noticed.
pub const FLOOR_CALLS_PER_SECOND: f64 = 0.1;
/// Additive increase: calls per second added per second of calls that succeed.
const INCREASE_PER_SECOND: f64 = 1.0;

/// What a call's outcome says about the endpoint's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered (success, or an error about the secret itself): capacity is there.
    Answered,
    /// Throttled or unavailable: slow down.
    Congested,
}

#[derive(Debug, Clone)]
pub struct AdaptiveRate {
    ceiling: f64,
    rate: f64,
    /// Tokens available now; at most one second's worth at the current rate (and at least one).
    tokens: f64,
    refilled: Instant,
    increased: Instant,
    decreased: Option<Instant>,
}

impl AdaptiveRate {
    /// A bucket at `ceiling` calls per second, with one token: calls are paced from the start,
    /// not sent in a burst.
    pub fn new(ceiling: f64, now: Instant) -> Self {
        let ceiling = ceiling.max(FLOOR_CALLS_PER_SECOND);
        Self {
            ceiling,
            rate: ceiling,
            tokens: 1.0,
            refilled: now,
            increased: now,
            decreased: None,
        }
    }

    /// The current rate, calls per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn burst(&self) -> f64 {
        self.rate.max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst());
        self.refilled = now;
    }

    /// Takes a token, or says how long to wait before asking again.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        self.token_ready(now)?;
        self.tokens -= 1.0;
        Ok(())
    }

    /// Whether a token is there now (without taking it), or how long until one is: for a call
    /// that must take tokens from two buckets at once, or from neither.
    pub fn token_ready(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.rate).max(Duration::from_millis(1)))
        }
    }

    /// Feeds back the outcome of a call sent at `sent` (when its token was taken).
    pub fn observe(&mut self, signal: Signal, sent: Instant, now: Instant) {
        self.refill(now);
        match signal {
            Signal::Answered => {
                let elapsed = now.saturating_duration_since(self.increased).as_secs_f64();
                self.rate = (self.rate + elapsed * INCREASE_PER_SECOND).min(self.ceiling);
                self.increased = now;
            }
            Signal::Congested => {
                if self.decreased.is_some_and(|at| sent < at) {
                    return;
                }
                self.rate = (self.rate / 2.0).max(FLOOR_CALLS_PER_SECOND);
                self.tokens = 0.0;
                self.decreased = Some(now);
                self.increased = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a bucket against an endpoint that grants `quota` calls per fixed one-second window,
    /// with callers always waiting to call; returns (calls sent, calls throttled) per second.
    fn simulate(ceiling: f64, quota: u32, seconds: u32) -> Vec<(u32, u32)> {
        let start = Instant::now();
        let mut bucket = AdaptiveRate::new(ceiling, start);
        let mut now = start;
        let mut per_second = vec![(0, 0); seconds as usize];
        let end = start + Duration::from_secs(u64::from(seconds));
        while now < end {
            match bucket.try_acquire(now) {
                Ok(()) => {
                    let second = now.duration_since(start).as_secs() as usize;
                    let (sent, throttled) = &mut per_second[second];
                    *sent += 1;
                    let signal = if *sent > quota {
                        *throttled += 1;
                        Signal::Congested
                    } else {
                        Signal::Answered
                    };
                    bucket.observe(signal, now, now);
                }
                Err(wait) => now += wait,
            }
        }
        per_second
    }

    #[test]
    fn under_a_quota_the_rate_settles_at_or_below_what_is_granted() {
        let seconds = simulate(50.0, 10, 120);
        // From the first second on (no discovery burst), every second stays within 1.5 x the
        // quota, and on average below it.
        for (index, (sent, _)) in seconds.iter().enumerate() {
            assert!(*sent <= 15, "second {index}: {sent} calls");
        }
        let settled = &seconds[10..];
        let sent: u32 = settled.iter().map(|(sent, _)| sent).sum();
        let throttled: u32 = settled.iter().map(|(_, throttled)| throttled).sum();
        let average = f64::from(sent) / settled.len() as f64;
        assert!(average <= 10.5, "average {average}");
        assert!(average >= 5.0, "the quota is used, not starved: {average}");
        assert!(throttled * 10 <= sent, "{throttled} of {sent} throttled");
    }

    #[test]
    fn without_throttling_the_ceiling_holds() {
        let seconds = simulate(20.0, u32::MAX, 30);
        for (sent, throttled) in &seconds[1..] {
            assert!(*sent <= 21, "{sent}");
            assert_eq!(*throttled, 0);
        }
    }

    #[test]
    fn sustained_congestion_drops_to_the_floor_and_recovery_climbs_back() {
        let start = Instant::now();
        let mut bucket = AdaptiveRate::new(50.0, start);
        for second in 0..20 {
            let at = start + Duration::from_secs(second);
            bucket.observe(Signal::Congested, at, at);
        }
        assert_eq!(bucket.rate(), FLOOR_CALLS_PER_SECOND);
        // Calls sent before a decrease, throttled after it, are the same signal: one halving.
        let mut burst = AdaptiveRate::new(40.0, start);
        let answered = start + Duration::from_millis(100);
        for _ in 0..10 {
            burst.observe(Signal::Congested, start, answered);
        }
        assert_eq!(burst.rate(), 20.0);
        // A call sent after the decrease and throttled again halves it again.
        let later = answered + Duration::from_millis(50);
        burst.observe(Signal::Congested, later, later);
        assert_eq!(burst.rate(), 10.0);
        // Recovery is additive: 1 call/s per second since the last decrease (at 19 s), capped at
        // the ceiling.
        let recovered = start + Duration::from_secs(30);
        let at = start + Duration::from_secs(20);
        bucket.observe(Signal::Answered, at, at);
        assert!((bucket.rate() - 1.1).abs() < 0.01, "{}", bucket.rate());
        bucket.observe(Signal::Answered, recovered, recovered);
        assert!((bucket.rate() - 11.1).abs() < 0.01, "{}", bucket.rate());
        let much_later = recovered + Duration::from_secs(600);
        bucket.observe(Signal::Answered, much_later, much_later);
        assert_eq!(bucket.rate(), 50.0);
    }

    #[test]
    fn a_slow_rate_makes_callers_wait_in_proportion() {
        let start = Instant::now();
        let mut bucket = AdaptiveRate::new(2.0, start);
        assert!(bucket.try_acquire(start).is_ok());
        let wait = bucket.try_acquire(start).err();
        assert_eq!(wait, Some(Duration::from_millis(500)));
        // Idle for a while: at most a second's worth is saved up.
        let idle = start + Duration::from_secs(10);
        assert!(bucket.try_acquire(idle).is_ok());
        assert!(bucket.try_acquire(idle).is_ok());
        assert!(bucket.try_acquire(idle).is_err());
    }
}
