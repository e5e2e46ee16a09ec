//! When a call may go: under the in-flight cap and its scope's adaptive rate, value reads before
//! version checks; counted, its outcome fed back to the rate, tried again when throttled.

use crate::lock;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};

use super::super::rate::{AdaptiveRate, Signal};
use super::batch::BATCH_STEP;
use super::{Operation, Scope, SecretsManagerSource, SourceError, classify};

/// Counts a read as waiting until dropped (also when its future is dropped).
pub(super) struct Waiting(pub(super) Arc<AtomicU64>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Attempts per call when Secrets Manager throttles; each one waits for the (halved) rate. The
/// SDK's own retries are off, so every attempt is under the rate and counted.
const ATTEMPTS: u32 = 2;

/// One call's place under the in-flight cap; counts it while held.
pub(super) struct InFlight {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    now: Arc<AtomicU64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SecretsManagerSource {
    /// Waits for the scope's next token; returns when it was taken (the call's send time). A
    /// version check (`urgent` false) waits while any value read is waiting.
    pub(super) async fn take_token(&self, scope: &Scope, urgent: bool) -> Instant {
        loop {
            if !urgent && self.reads_waiting.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(BATCH_STEP).await;
                continue;
            }
            let now = Instant::now();
            let wait = lock(&self.rates)
                .entry(scope.clone())
                .or_insert_with(|| AdaptiveRate::new(self.max_calls_per_second, now))
                .try_acquire(now);
            match wait {
                Ok(()) => return now,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    pub(super) fn feed_back(&self, scope: &Scope, signal: Signal, sent: Instant) {
        let rate = {
            let mut rates = lock(&self.rates);
            let Some(bucket) = rates.get_mut(scope) else {
                return;
            };
            bucket.observe(signal, sent, Instant::now());
            bucket.rate()
        };
        // The gauge is per region: the operator's own credentials' rate.
        if let Some(metrics) = &self.metrics
            && scope.role.is_none()
        {
            metrics.record_aws_rate(&scope.region, rate);
        }
    }

    /// One AWS call: under the in-flight cap and the scope's rate, counted, its outcome fed back
    /// to the rate; tried again (under the rate) when throttled.
    pub(super) async fn call<T, E, R, F, Fut>(
        &self,
        scope: &Scope,
        operation: Operation,
        subject: &str,
        send: F,
    ) -> Result<T, SourceError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        // AssumeRole comes before a read that waits for the role's credentials.
        let urgent = operation.is_urgent();
        let mut attempt = 1;
        loop {
            let waiting = urgent.then(|| {
                self.reads_waiting.fetch_add(1, Ordering::Relaxed);
                Waiting(self.reads_waiting.clone())
            });
            if !urgent {
                // Not even a place in flight while reads wait for one.
                while self.reads_waiting.load(Ordering::Relaxed) > 0 {
                    tokio::time::sleep(BATCH_STEP).await;
                }
            }
            // The scope's token first, then a place in flight: a call waiting for a throttled
            // role's or region's rate must not hold a place the other scopes' calls need.
            self.take_token(scope, urgent).await;
            let held = self.in_flight().await;
            let sent = Instant::now();
            drop(waiting);
            let result = send().await.map_err(|error| classify(subject, &error));
            drop(held);
            self.count(
                operation,
                match &result {
                    Ok(_) => "success",
                    Err(error) => error.reason().as_str(),
                },
            );
            let congested = matches!(
                result,
                Err(SourceError::Throttled { .. } | SourceError::Unavailable { .. })
            );
            self.feed_back(
                scope,
                if congested {
                    Signal::Congested
                } else {
                    Signal::Answered
                },
                sent,
            );
            match result {
                Err(SourceError::Throttled { .. }) if attempt < ATTEMPTS => attempt += 1,
                other => return other,
            }
        }
    }

    /// The most calls that were in flight at once so far.
    pub fn peak_in_flight(&self) -> u64 {
        self.in_flight_peak.load(Ordering::Relaxed)
    }

    /// Waits for a place under the cap; the call is in flight until the guard drops.
    pub(super) async fn in_flight(&self) -> InFlight {
        let permit = self.in_flight_cap.clone().acquire_owned().await.ok();
        let now = self.in_flight_now.fetch_add(1, Ordering::Relaxed) + 1;
        self.in_flight_peak.fetch_max(now, Ordering::Relaxed);
        InFlight {
            _permit: permit,
            now: self.in_flight_now.clone(),
        }
    }

    /// Calls made so far of one operation (`GetSecretValue`, `BatchGetSecretValue`, ...).
    pub fn calls_of(&self, operation: &str) -> u64 {
        lock(&self.calls_by_operation)
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn count(&self, operation: Operation, outcome: &str) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        *lock(&self.calls_by_operation)
            .entry(operation.as_str())
            .or_insert(0) += 1;
        if let Some(metrics) = &self.metrics {
            metrics.record_aws_call(operation.as_str(), outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

    type Sent = Result<&'static str, SdkError<GetSecretValueError, ()>>;

    async fn answered() -> Sent {
        Ok("answered")
    }

    #[tokio::test]
    async fn a_call_waiting_for_its_scopes_rate_holds_no_place_in_flight() {
        let config = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        // One place in flight; one call per five seconds per scope.
        let source = SecretsManagerSource::new(config)
            .with_max_in_flight(1)
            .with_max_calls_per_second(0.2);
        let (slow, other) = (Scope::own("eu-west-1"), Scope::own("us-east-1"));
        let first = source.call(&slow, Operation::Get, "a", answered).await;
        assert_eq!(first.ok(), Some("answered"), "spends the scope's token");
        let mut waiting = std::pin::pin!(source.call(&slow, Operation::Get, "b", answered));
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "waits for its scope's next token"
        );
        // Another scope's call goes at once: the waiting one holds no place in flight.
        let other_call = std::pin::pin!(source.call(&other, Operation::Get, "c", answered));
        match futures::poll!(other_call) {
            std::task::Poll::Ready(Ok(answer)) => assert_eq!(answer, "answered"),
            std::task::Poll::Ready(Err(error)) => panic!("failed: {error}"),
            std::task::Poll::Pending => panic!("blocked behind the throttled scope's call"),
        }
    }
}
