//! When to look again: refreshes spread over the interval by a per-identity phase, backoff per
//! failure reason, and backoff after Kubernetes API errors. No I/O.

use std::time::Duration;

use crate::source::SourceError;

use super::decide::*;

/// Backoff after consecutive Kubernetes API errors: 5 s doubling up to 5 min, plus up to 10 %.
pub fn api_error_backoff(attempts: u32, jitter_fraction: f64) -> Duration {
    let exponent = attempts.saturating_sub(1).min(10);
    let base = Duration::from_secs(5)
        .saturating_mul(1u32 << exponent)
        .min(Duration::from_secs(300));
    base + base.mul_f64(jitter_fraction.clamp(0.0, 1.0) * 0.1)
}

/// An identity's phase in its refresh interval, in [0, 1), from a hash of its uid: stable across
/// restarts and leader changes, different between identities.
pub fn refresh_phase(uid: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(uid.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The next refresh of a healthy identity: at its own phase of the interval, at least half an
/// interval from now (so between 0.5 and 1.5 intervals), so identities created or restarted together
/// spread over the whole interval instead of refreshing in waves.
pub fn next_refresh(refresh: Duration, phase: f64, now_unix_ms: u64) -> Duration {
    let period = u64::try_from(refresh.as_millis())
        .unwrap_or(u64::MAX)
        .max(2);
    let offset = (phase.clamp(0.0, 1.0) * period as f64) as u64 % period;
    let position = (now_unix_ms % period + period - offset) % period;
    let mut wait = period - position;
    if wait < period / 2 {
        wait += period;
    }
    Duration::from_millis(wait)
}

/// When to look again. Healthy: at the refresh interval with up to 10% jitter, so a fleet created
/// together does not poll together. Throttled or unavailable: exponential backoff from 5s. Not
/// found or denied: a person must act first, so 5 s doubling up to 5 minutes (or the refresh
/// interval, if longer, up to 5 minutes), whatever the refresh interval: a `refreshInterval: 1s`
/// on a missing secret does not retry every second. Bad material: at the refresh interval.
pub fn requeue_after(
    refresh_interval: Duration,
    outcome: &Result<Synced, SyncFailure>,
    consecutive_failures: u32,
    jitter_fraction: f64,
) -> Duration {
    let jitter = |base: Duration| base + base.mul_f64(jitter_fraction.clamp(0.0, 1.0) * 0.1);
    let backoff = |cap: Duration| {
        let exponent = consecutive_failures.saturating_sub(1).min(16);
        Duration::from_secs(5)
            .saturating_mul(1u32 << exponent)
            .min(cap)
    };
    let slow = refresh_interval.min(Duration::from_secs(300));
    match outcome {
        Ok(_) => jitter(refresh_interval),
        Err(SyncFailure::Source(SourceError::Throttled { .. })) => {
            jitter(backoff(Duration::from_secs(900)))
        }
        Err(SyncFailure::Source(SourceError::Unavailable { .. })) => {
            jitter(backoff(slow.max(Duration::from_secs(5))))
        }
        Err(SyncFailure::Source(_)) => jitter(backoff(Duration::from_secs(300)).max(slow)),
        Err(_) => jitter(refresh_interval),
    }
}

/// What the next look at an identity depends on, besides the outcome.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// The identity's refresh interval.
    pub refresh: Duration,
    /// How often its version is checked: the refresh interval, or the sweep's when shorter.
    pub cadence: Duration,
    /// Its phase within the interval ([`refresh_phase`]).
    pub phase: f64,
    pub now_unix_ms: u64,
}

/// When to look again after a sync: healthy, at the identity's own phase of the interval (not in
/// waves); failed, per [`requeue_after`]; but a transient failure with a valid Secret in place
/// (`valid_in_place`) never sooner than the identity's own check cadence, so that under an outage
/// or a quota retries never outpace healthy operation.
pub fn after_sync(
    schedule: &Schedule,
    attempted: &Result<Synced, SyncFailure>,
    valid_in_place: bool,
    consecutive_failures: u32,
    jitter_fraction: f64,
) -> Duration {
    match attempted {
        Ok(_) => next_refresh(schedule.refresh, schedule.phase, schedule.now_unix_ms),
        Err(_) => {
            let backoff = requeue_after(
                schedule.refresh,
                attempted,
                consecutive_failures,
                jitter_fraction,
            );
            if valid_in_place {
                backoff.max(next_refresh(
                    schedule.cadence,
                    schedule.phase,
                    schedule.now_unix_ms,
                ))
            } else {
                backoff
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::decide::fixtures::*;

    #[test]
    fn requeue_backs_off_per_reason() {
        let hour = Duration::from_secs(3600);
        let ok = requeue_after(hour, &Ok(synced("v", "f")), 0, 0.0);
        assert_eq!(ok, hour);
        assert_eq!(
            requeue_after(hour, &Ok(synced("v", "f")), 0, 1.0),
            hour + hour / 10
        );

        let throttled = |n| {
            requeue_after(
                hour,
                &Err(SyncFailure::Source(SourceError::Throttled {
                    secret_id: "x".into(),
                })),
                n,
                0.0,
            )
        };
        assert_eq!(throttled(1), Duration::from_secs(5));
        assert_eq!(throttled(2), Duration::from_secs(10));
        assert_eq!(throttled(4), Duration::from_secs(40));
        assert_eq!(throttled(30), Duration::from_secs(900), "capped");

        assert_eq!(
            requeue_after(hour, &Err(denied()), 3, 0.0),
            Duration::from_secs(300)
        );
        // A short refresh interval does not make a person's fix come sooner: 5 s doubling.
        let second = Duration::from_secs(1);
        let retries: Vec<u64> = (1..=8)
            .map(|n| requeue_after(second, &Err(denied()), n, 0.0).as_secs())
            .collect();
        assert_eq!(retries, [5, 10, 20, 40, 80, 160, 300, 300]);
        let conflict = Err(SyncFailure::TargetConflict {
            secret: "ns/x".into(),
        });
        assert_eq!(requeue_after(hour, &conflict, 1, 0.0), hour);
    }

    #[test]
    fn refreshes_spread_over_the_interval() {
        let refresh = Duration::from_secs(120);
        let now = 1_900_000_000_000u64;
        let mut buckets = [0usize; 10];
        for index in 0..10_000 {
            let phase = refresh_phase(&format!("6f1c2a9e-uid-{index}"));
            let wait = next_refresh(refresh, phase, now);
            assert!(
                wait >= refresh / 2 && wait < refresh + refresh / 2,
                "{wait:?}"
            );
            let at = (now + wait.as_millis() as u64) % 120_000;
            buckets[(at / 12_000) as usize] += 1;
        }
        for (bucket, count) in buckets.iter().enumerate() {
            assert!(
                (800..=1200).contains(count),
                "bucket {bucket}: {count} of 10,000"
            );
        }
        // Stable: the same identity lands on the same slot, whenever it last synced.
        let phase = refresh_phase("uid-a");
        let slot =
            |now: u64| (now + next_refresh(refresh, phase, now).as_millis() as u64) % 120_000;
        assert_eq!(slot(now), slot(now + 7_000));
    }

    #[test]
    fn api_errors_back_off_exponentially() {
        assert_eq!(api_error_backoff(1, 0.0), Duration::from_secs(5));
        assert_eq!(api_error_backoff(2, 0.0), Duration::from_secs(10));
        assert_eq!(api_error_backoff(7, 0.0), Duration::from_secs(300));
        assert_eq!(api_error_backoff(70, 0.0), Duration::from_secs(300));
        assert!(api_error_backoff(3, 1.0) <= Duration::from_secs(22));
    }

    #[test]
    fn a_transient_failure_with_a_valid_secret_waits_for_the_cadence() {
        let throttled = Err(SyncFailure::Source(SourceError::Throttled {
            secret_id: "ns/x".into(),
        }));
        let schedule = Schedule {
            refresh: Duration::from_secs(3600),
            cadence: Duration::from_secs(300),
            phase: 0.5,
            now_unix_ms: 0,
        };
        // First failure: backoff alone would retry after about 5 s.
        let alone = after_sync(&schedule, &throttled, false, 1, 0.0);
        assert!(alone < Duration::from_secs(10), "{alone:?}");
        // With a valid Secret in place: not before its next check (phase 0.5 of 300 s).
        let in_place = after_sync(&schedule, &throttled, true, 1, 0.0);
        assert_eq!(in_place, Duration::from_secs(150));
        // Healthy: at its own phase of the refresh interval.
        let healthy = after_sync(&schedule, &Ok(synced("v1", "fp")), false, 0, 0.0);
        assert_eq!(healthy, Duration::from_secs(1800));
    }
}
