//! When a call may go: under the in-flight cap and its scope's adaptive rate, with the scope's
//! tokens shared between value reads and version checks so that neither can starve the other;
//! counted, its outcome fed back to the rate, tried again when throttled.

use crate::lock;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};

use super::super::rate::{AdaptiveRate, Signal};
use super::batch::BATCH_STEP;
use super::{Operation, Scope, SecretsManagerSource, SourceError, classify};

/// The two kinds of call that share a scope's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Value reads (and AssumeRole, which a read waits for).
    Read,
    /// Version checks (DescribeSecret, ListSecrets): the sweep, events, siblings.
    Check,
}

/// The share of a scope's tokens version checks get while reads wait too (reads get the rest, and
/// either gets everything while the other waits for nothing). A budget reads cannot exhaust: change
/// detection keeps its pace however many reads a namespace causes, and reads still come first.
pub const CHECK_SHARE: f64 = 0.25;
/// Grants are counted over roughly this many recent tokens (older ones are halved away).
const SHARE_WINDOW: f64 = 200.0;

/// One region and role's adaptive rate and how its tokens were shared between the classes.
/// Sans-IO.
#[derive(Debug, Clone)]
pub struct Lane {
    pub rate: AdaptiveRate,
    shares: Shares,
    last_used: Instant,
}

impl Lane {
    pub fn new(calls_per_second: f64, now: Instant) -> Self {
        Self {
            rate: AdaptiveRate::new(calls_per_second, now),
            shares: Shares::default(),
            last_used: now,
        }
    }

    fn idle(&self) -> bool {
        self.shares.waiting_reads == 0 && self.shares.waiting_checks == 0
    }
}

/// What a lane is kept per: a region and the role's ARN. An external id is tenant text, so it
/// gets no rate of its own: every external id on one role shares the role's rate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LaneKey {
    region: String,
    role_arn: Option<String>,
}

impl LaneKey {
    pub fn of(scope: &Scope) -> Self {
        Self {
            region: scope.region.clone(),
            role_arn: scope.role.as_ref().map(|role| role.arn.clone()),
        }
    }
}

/// Lanes kept at most (idle ones beyond it are forgotten, the least recently used first).
const MAX_LANES: usize = 256;

/// Every lane, and each region's ceiling: however many roles a region's calls use, together they
/// stay under the configured calls per second (each role's own rate adapts below it).
#[derive(Debug, Default)]
pub struct Lanes {
    per_role: std::collections::HashMap<LaneKey, Lane>,
    per_region: std::collections::HashMap<String, (AdaptiveRate, Instant)>,
}

impl Lanes {
    fn lane(&mut self, key: &LaneKey, ceiling: f64, now: Instant) -> &mut Lane {
        if !self.per_role.contains_key(key) {
            super::bounded::make_room(&mut self.per_role, MAX_LANES, |lane| {
                lane.idle().then_some(lane.last_used)
            });
        }
        self.per_role
            .entry(key.clone())
            .or_insert_with(|| Lane::new(ceiling, now))
    }

    /// Takes a token from the lane and from its region together, or neither; `Err` says how long
    /// to wait.
    fn take(
        &mut self,
        scope: &Scope,
        class: Class,
        ceiling: f64,
        now: Instant,
    ) -> Result<(), Duration> {
        let key = LaneKey::of(scope);
        if !self.per_region.contains_key(&key.region) {
            super::bounded::make_room(&mut self.per_region, MAX_LANES, |(_, used)| Some(*used));
        }
        let region_ready = self
            .per_region
            .entry(key.region.clone())
            .or_insert_with(|| (AdaptiveRate::new(ceiling, now), now))
            .0
            .token_ready(now);
        let lane = self.lane(&key, ceiling, now);
        lane.last_used = now;
        if !lane.shares.may_go(class) {
            return Err(BATCH_STEP);
        }
        lane.rate.token_ready(now)?;
        region_ready?;
        let _ = lane.rate.try_acquire(now);
        lane.shares.granted(class);
        if let Some((region, used)) = self.per_region.get_mut(&key.region) {
            let _ = region.try_acquire(now);
            *used = now;
        }
        Ok(())
    }

    pub fn get(&self, scope: &Scope) -> Option<&Lane> {
        self.per_role.get(&LaneKey::of(scope))
    }

    /// Lanes kept (one per region and role).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.per_role.len()
    }
}

/// Calls waiting and recent grants, per class.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shares {
    waiting_reads: u64,
    waiting_checks: u64,
    granted_reads: f64,
    granted_checks: f64,
}

impl Shares {
    pub fn wait(&mut self, class: Class) {
        match class {
            Class::Read => self.waiting_reads += 1,
            Class::Check => self.waiting_checks += 1,
        }
    }

    pub fn stop_waiting(&mut self, class: Class) {
        match class {
            Class::Read => self.waiting_reads = self.waiting_reads.saturating_sub(1),
            Class::Check => self.waiting_checks = self.waiting_checks.saturating_sub(1),
        }
    }

    /// Whether a call of `class` may take the next token: yes while the other class waits for
    /// nothing; else only the class below its share (checks at [`CHECK_SHARE`]) goes.
    pub fn may_go(&self, class: Class) -> bool {
        let total = self.granted_reads + self.granted_checks;
        let checks_behind = self.granted_checks < CHECK_SHARE * total
            // With nothing granted yet, reads go first.
            && total > 0.0;
        match class {
            Class::Read => self.waiting_checks == 0 || !checks_behind,
            Class::Check => self.waiting_reads == 0 || checks_behind,
        }
    }

    pub fn granted(&mut self, class: Class) {
        match class {
            Class::Read => self.granted_reads += 1.0,
            Class::Check => self.granted_checks += 1.0,
        }
        if self.granted_reads + self.granted_checks > SHARE_WINDOW {
            self.granted_reads /= 2.0;
            self.granted_checks /= 2.0;
        }
    }
}

/// Counts a call as waiting for its scope's token until dropped (also when its future is dropped).
struct Waiting<'a> {
    source: &'a SecretsManagerSource,
    scope: &'a Scope,
    class: Class,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(lane) = lock(&self.source.lanes)
            .per_role
            .get_mut(&LaneKey::of(self.scope))
        {
            lane.shares.stop_waiting(self.class);
        }
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
    /// Waits for the scope's next token that `class` may take (see [`Shares::may_go`]); returns
    /// when it was taken (the call's send time).
    pub(super) async fn take_token(&self, scope: &Scope, class: Class) -> Instant {
        let ceiling = self.max_calls_per_second;
        lock(&self.lanes)
            .lane(&LaneKey::of(scope), ceiling, Instant::now())
            .shares
            .wait(class);
        let _waiting = Waiting {
            source: self,
            scope,
            class,
        };
        loop {
            let now = Instant::now();
            let wait = lock(&self.lanes).take(scope, class, ceiling, now);
            match wait {
                Ok(()) => return now,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    pub(super) fn feed_back(&self, scope: &Scope, signal: Signal, sent: Instant) {
        let rate = {
            let mut lanes = lock(&self.lanes);
            let Some(lane) = lanes.per_role.get_mut(&LaneKey::of(scope)) else {
                return;
            };
            lane.rate.observe(signal, sent, Instant::now());
            lane.rate.rate()
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
        let class = operation.class();
        let mut attempt = 1;
        loop {
            // The scope's token first, then a place in flight: a call waiting for a throttled
            // role's or region's rate must not hold a place the other scopes' calls need.
            self.take_token(scope, class).await;
            let held = self.in_flight().await;
            let sent = Instant::now();
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

    /// Hands out `tokens` one at a time to whichever class may go (reads first when both may),
    /// with both classes always waiting; returns (reads, checks) granted.
    fn share_out(shares: &mut Shares, tokens: usize) -> (usize, usize) {
        let (mut reads, mut checks) = (0, 0);
        for _ in 0..tokens {
            let class = if shares.may_go(Class::Read) {
                reads += 1;
                Class::Read
            } else {
                assert!(shares.may_go(Class::Check), "one class may always go");
                checks += 1;
                Class::Check
            };
            shares.granted(class);
        }
        (reads, checks)
    }

    #[test]
    fn checks_keep_their_share_however_many_reads_wait() {
        let mut shares = Shares::default();
        for _ in 0..10_000 {
            shares.wait(Class::Read);
        }
        shares.wait(Class::Check);
        let (reads, checks) = share_out(&mut shares, 1_000);
        assert_eq!(reads + checks, 1_000);
        assert!(
            (249..=251).contains(&checks),
            "checks got {checks} of 1,000 tokens, not a quarter"
        );
        // And the other way round: a sweep of many checks never holds reads back to a trickle.
        let mut shares = Shares::default();
        shares.wait(Class::Read);
        for _ in 0..10_000 {
            shares.wait(Class::Check);
        }
        let (reads, _) = share_out(&mut shares, 1_000);
        assert!(reads >= 749, "reads got {reads} of 1,000 tokens");
    }

    #[test]
    fn a_class_alone_takes_every_token() {
        let mut shares = Shares::default();
        shares.wait(Class::Check);
        for _ in 0..100 {
            assert!(shares.may_go(Class::Check), "no read waits: checks go");
            shares.granted(Class::Check);
        }
        shares.stop_waiting(Class::Check);
        shares.wait(Class::Read);
        assert!(
            shares.may_go(Class::Read),
            "checks far ahead, but none waits"
        );
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

    fn role_scope(region: &str, arn: &str, external_id: Option<&str>) -> Scope {
        Scope {
            region: region.into(),
            role: Some(super::super::AssumedRole {
                arn: arn.into(),
                external_id: external_id.map(str::to_string),
                namespace: None,
            }),
        }
    }

    #[test]
    fn external_ids_on_one_role_share_its_rate_and_roles_share_their_regions_ceiling() {
        let now = Instant::now();
        let mut lanes = Lanes::default();
        // A ceiling of one call per second, so each bucket starts with one token.
        let tenant_a = role_scope("eu-west-1", "arn:aws:iam::1:role/r", Some("a"));
        let tenant_b = role_scope("eu-west-1", "arn:aws:iam::1:role/r", Some("b"));
        assert!(lanes.take(&tenant_a, Class::Read, 1.0, now).is_ok());
        assert!(
            lanes.take(&tenant_b, Class::Read, 1.0, now).is_err(),
            "another external id on the same role gets no token of its own"
        );
        assert_eq!(
            lanes.len(),
            1,
            "one lane for the role, whatever the external ids"
        );
        let other_role = role_scope("eu-west-1", "arn:aws:iam::2:role/r", None);
        assert!(
            lanes.take(&other_role, Class::Read, 1.0, now).is_err(),
            "another role in the region is under the region's ceiling"
        );
        let other_region = role_scope("us-east-1", "arn:aws:iam::2:role/r", None);
        assert!(lanes.take(&other_region, Class::Read, 1.0, now).is_ok());
        let later = now + Duration::from_secs(1);
        assert!(lanes.take(&other_role, Class::Read, 1.0, later).is_ok());
    }

    #[test]
    fn idle_lanes_beyond_the_cap_are_forgotten() {
        let now = Instant::now();
        let mut lanes = Lanes::default();
        for role in 0..MAX_LANES + 50 {
            let scope = role_scope("eu-west-1", &format!("arn:aws:iam::1:role/r{role}"), None);
            let _ = lanes.take(
                &scope,
                Class::Read,
                50.0,
                now + Duration::from_secs(role as u64),
            );
        }
        assert_eq!(lanes.len(), MAX_LANES);
        let newest = role_scope(
            "eu-west-1",
            &format!("arn:aws:iam::1:role/r{}", MAX_LANES + 49),
            None,
        );
        assert!(lanes.get(&newest).is_some(), "the most recent lane is kept");
        let oldest = role_scope("eu-west-1", "arn:aws:iam::1:role/r0", None);
        assert!(
            lanes.get(&oldest).is_none(),
            "the least recently used lane went"
        );
    }
}
