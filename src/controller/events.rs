//! Events: published with a Recorder per Event (see [`publish`]); which Event a change deserves is
//! decided in [`super::status::event_for`].

use std::sync::Mutex;
use std::time::Instant;

use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

use super::context::Context;
use super::status;

/// Publishes one Event about `reference`; a failure is logged, never fatal to the reconcile.
pub(super) async fn publish(
    context: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    event: status::EventToEmit,
) {
    let event = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.to_string(),
        note: Some(event.note),
        action: "Sync".to_string(),
        secondary: None,
    };
    // A Recorder per Event: a long-lived one caches every Event it published for six minutes (to
    // aggregate repeats into series) in a table that never shrinks, which at 10,000 identities was
    // the operator's largest allocation (heap profile in BENCHMARKS.md). Repeats are already
    // decided away (`decide`: an Event per transition), so nothing is lost.
    let recorder = Recorder::new(context.client.clone(), context.reporter.clone());
    if let Err(error) = recorder.publish(&event, reference).await {
        warn!(error = %error, "could not publish an Event");
    }
}

/// How many `Synced` Events (an identity's first sync, or a Secret written again without a
/// rotation) may be published: a token bucket shared by the whole operator, like the kubelet's
/// `--event-qps`/`--event-burst`. A fleet's first sync would otherwise post one Event per identity at
/// once: at 10,000 identities that was a third of the API server's work (BENCHMARKS.md, W1). The
/// status says the same (Ready, reason `Synced`), so nothing is lost but the copy; `Rotated` and
/// Warning Events are never held back.
pub struct SyncedEventBudget {
    per_second: f64,
    burst: f64,
    /// Tokens left, and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

/// The defaults: a burst of 100, then 10 per second.
pub const SYNCED_EVENT_RATE: f64 = 10.0;
pub const SYNCED_EVENT_BURST: u32 = 100;

impl SyncedEventBudget {
    pub fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst);
        Self {
            per_second: per_second.max(0.0),
            burst,
            bucket: Mutex::new((burst, now)),
        }
    }

    /// Takes one Event from the budget; false when it is spent.
    pub fn take(&self, now: Instant) -> bool {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, counted) = *bucket;
        let refilled = (tokens
            + now.saturating_duration_since(counted).as_secs_f64() * self.per_second)
            .min(self.burst);
        if refilled >= 1.0 {
            *bucket = (refilled - 1.0, now);
            true
        } else {
            *bucket = (refilled, now);
            false
        }
    }
}

impl Default for SyncedEventBudget {
    fn default() -> Self {
        Self::new(SYNCED_EVENT_RATE, SYNCED_EVENT_BURST, Instant::now())
    }
}

impl std::fmt::Debug for SyncedEventBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncedEventBudget")
            .field("per_second", &self.per_second)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_allowed_then_the_rate() {
        let start = Instant::now();
        let budget = SyncedEventBudget::new(2.0, 3, start);
        let taken = (0..10).filter(|_| budget.take(start)).count();
        assert_eq!(taken, 3, "the burst");
        assert!(
            !budget.take(start + Duration::from_millis(400)),
            "0.8 of a token"
        );
        assert!(
            budget.take(start + Duration::from_millis(500)),
            "one token after 0.5 s at 2/s"
        );
        let later = start + Duration::from_secs(60);
        let taken = (0..10).filter(|_| budget.take(later)).count();
        assert_eq!(taken, 3, "refilled to the burst, never beyond");
    }

    #[test]
    fn a_zero_rate_allows_the_burst_alone() {
        let start = Instant::now();
        let budget = SyncedEventBudget::new(0.0, 2, start);
        let later = start + Duration::from_secs(3600);
        let taken = (0..5).filter(|_| budget.take(later)).count();
        assert_eq!(taken, 2);
    }
}
