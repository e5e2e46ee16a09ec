//! AWS Secrets Manager through the real SDK. The endpoint, region and credentials come from the
//! standard AWS configuration (`AWS_ENDPOINT_URL`, IRSA, Pod Identity, ...): there is no test-only
//! path; tests point the endpoint at moto.

use crate::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::Credentials;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::metrics::Metrics;
use std::time::Instant;

use super::rate::{self, AdaptiveRate, Signal};

use super::{
    AssumedRole, DescribedSecret, FetchedSecret, Scope, SecretContent, SecretRef, SecretSource,
    SourceError, VersionSelector,
};

type Reply = tokio::sync::oneshot::Sender<Result<FetchedSecret, SourceError>>;
/// Reads waiting for a batch, and whether a caller is flushing them.
type BatchQueue = (Vec<(SecretRef, Reply)>, bool);

/// BatchGetSecretValue takes at most 20 ids.
const BATCH_MAX: usize = 20;
/// The first read of a batch waits for others to join it: until none joined for one step, the
/// batch is full, or the window is over.
const BATCH_STEP: std::time::Duration = std::time::Duration::from_millis(20);
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

/// An assumed role's credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// The session name CloudTrail shows in the role's account for the operator's reads.
const ROLE_SESSION_NAME: &str = "mtls-operator";

/// A role's credentials while they last; behind an async lock, so one AssumeRole serves every
/// identity that needs the role at that moment.
type RoleSlot = Arc<tokio::sync::Mutex<Option<Credentials>>>;

pub struct SecretsManagerSource {
    base: aws_config::SdkConfig,
    metrics: Option<Arc<Metrics>>,
    /// One client per scope (region and role), shared by every identity (connection pool), with
    /// the access key of the role credentials it was built with.
    clients: Mutex<HashMap<Scope, (Client, Option<String>)>>,
    /// STS with the operator's own credentials (web identity, Pod Identity, ...): AssumeRole.
    sts: aws_sdk_sts::Client,
    /// Each assumed role's current credentials.
    roles: Mutex<HashMap<AssumedRole, RoleSlot>>,
    calls: AtomicU64,
    calls_by_operation: Mutex<HashMap<&'static str, u64>>,
    /// Single flight: reads in progress, with the callers waiting for the same answer.
    in_flight: Mutex<HashMap<SecretRef, Vec<Reply>>>,
    /// AWSCURRENT reads waiting for a BatchGetSecretValue, per scope; `true` while one caller
    /// is flushing that scope's queue.
    batches: Mutex<HashMap<Scope, BatchQueue>>,
    /// Scopes whose credentials may not call BatchGetSecretValue: read one by one there.
    batch_refused: Mutex<HashSet<Scope>>,
    /// Calls in flight at once, across every identity, the sweep and the batches.
    in_flight_cap: Arc<tokio::sync::Semaphore>,
    in_flight_now: Arc<AtomicU64>,
    in_flight_peak: Arc<AtomicU64>,
    /// The adaptive rate per scope (AIMD): per region and credentials, shared by every call.
    rates: Mutex<HashMap<Scope, AdaptiveRate>>,
    max_calls_per_second: f64,
    /// Value reads waiting for their turn: version checks (the sweep) yield to them, so under a
    /// quota identities that need their material are not starved by checks of those that have it.
    reads_waiting: Arc<AtomicU64>,
}

/// Counts a read as waiting until dropped (also when its future is dropped).
struct Waiting(Arc<AtomicU64>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Attempts per call when Secrets Manager throttles; each one waits for the (halved) rate. The
/// SDK's own retries are off, so every attempt is under the rate and counted.
const ATTEMPTS: u32 = 2;

/// The default cap on Secrets Manager calls in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

/// One call's place under the in-flight cap; counts it while held.
struct InFlight {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    now: Arc<AtomicU64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SecretsManagerSource {
    pub fn new(base: aws_config::SdkConfig) -> Self {
        // No SDK retries: every attempt goes through `call`, under the adaptive rate.
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::config::Builder::from(&base)
                .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
                .build(),
        );
        Self {
            base,
            sts,
            roles: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            calls_by_operation: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            batches: Mutex::new(HashMap::new()),
            batch_refused: Mutex::new(HashSet::new()),
            in_flight_cap: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            in_flight_now: Arc::new(AtomicU64::new(0)),
            in_flight_peak: Arc::new(AtomicU64::new(0)),
            rates: Mutex::new(HashMap::new()),
            max_calls_per_second: rate::DEFAULT_CALLS_PER_SECOND,
            reads_waiting: Arc::new(AtomicU64::new(0)),
            metrics: None,
        }
    }

    /// At most `max` calls in flight at once (at least 1).
    pub fn with_max_in_flight(self, max: usize) -> Self {
        Self {
            in_flight_cap: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            ..self
        }
    }

    /// At most `calls_per_second` calls per second per region; lower while Secrets Manager
    /// throttles.
    pub fn with_max_calls_per_second(self, calls_per_second: f64) -> Self {
        Self {
            max_calls_per_second: calls_per_second,
            ..self
        }
    }

    /// The current adaptive rate of the operator's own credentials in `region` (calls per
    /// second), if it made any call.
    pub fn rate_of(&self, region: &str) -> Option<f64> {
        lock(&self.rates)
            .get(&Scope::own(region))
            .map(AdaptiveRate::rate)
    }

    /// Waits for the scope's next token; returns when it was taken (the call's send time). A
    /// version check (`urgent` false) waits while any value read is waiting.
    async fn take_token(&self, scope: &Scope, urgent: bool) -> Instant {
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

    fn feed_back(&self, scope: &Scope, signal: Signal, sent: Instant) {
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
    async fn call<T, E, R, F, Fut>(
        &self,
        scope: &Scope,
        operation: &'static str,
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
        let urgent = matches!(
            operation,
            "GetSecretValue" | "BatchGetSecretValue" | "AssumeRole"
        );
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
            let held = self.in_flight().await;
            let sent = self.take_token(scope, urgent).await;
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
    async fn in_flight(&self) -> InFlight {
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

    fn count(&self, operation: &'static str, outcome: &str) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        *lock(&self.calls_by_operation).entry(operation).or_insert(0) += 1;
        if let Some(metrics) = &self.metrics {
            metrics.record_aws_call(operation, outcome);
        }
    }

    /// A read, coalesced with identical reads in progress (single flight), batched when it asks
    /// for AWSCURRENT.
    async fn read(&self, secret: &SecretRef) -> Result<FetchedSecret, SourceError> {
        let waiting = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get_mut(secret) {
                Some(waiters) => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    waiters.push(reply);
                    Some(answer)
                }
                None => {
                    in_flight.insert(secret.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(answer) = waiting {
            return answer.await.unwrap_or_else(|_| {
                Err(SourceError::Unavailable {
                    secret_id: secret.secret_id.clone(),
                    detail: "the shared read was cancelled".into(),
                })
            });
        }
        let batchable = secret.version == VersionSelector::Stage("AWSCURRENT".into())
            && !self.batch_refused(&secret.scope());
        let result = if batchable {
            self.batched(secret).await
        } else {
            self.get(secret).await
        };
        let waiters = lock(&self.in_flight).remove(secret).unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        result
    }

    fn batch_refused(&self, scope: &Scope) -> bool {
        lock(&self.batch_refused).contains(scope)
    }

    /// Joins the scope's batch; the caller that opened it waits a moment for others, then sends
    /// every queued read in BatchGetSecretValue calls of up to 20.
    async fn batched(&self, secret: &SecretRef) -> Result<FetchedSecret, SourceError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let scope = secret.scope();
        let flush = {
            let mut batches = lock(&self.batches);
            let (queue, flushing) = batches.entry(scope.clone()).or_default();
            queue.push((secret.clone(), reply));
            !std::mem::replace(flushing, true)
        };
        if flush {
            // Each chunk gets its own window to fill: during a cold start reads keep arriving while
            // the previous chunk is sent, and a partial chunk sent at once would split the rest.
            loop {
                self.wait_for_batch(&scope).await;
                let chunk: Vec<(SecretRef, Reply)> = {
                    let mut batches = lock(&self.batches);
                    let (queue, flushing) = batches.entry(scope.clone()).or_default();
                    if queue.is_empty() {
                        *flushing = false;
                        break;
                    }
                    let take = queue.len().min(BATCH_MAX);
                    queue.drain(..take).collect()
                };
                self.send_batch(&scope, chunk).await;
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(SourceError::Unavailable {
                secret_id: secret.secret_id.clone(),
                detail: "the batched read was cancelled".into(),
            })
        })
    }

    /// Waits until `scope`'s queue holds a full batch, nobody joined for two steps, or the window
    /// is over.
    async fn wait_for_batch(&self, scope: &Scope) {
        let opened = std::time::Instant::now();
        let queued_now = || {
            lock(&self.batches)
                .get(scope)
                .map_or(0, |(queue, _)| queue.len())
        };
        let mut queued = queued_now();
        let mut quiet = 0;
        while queued < BATCH_MAX && opened.elapsed() < BATCH_WINDOW {
            tokio::time::sleep(BATCH_STEP).await;
            let now_queued = queued_now();
            // Two quiet steps in a row: nobody else is coming.
            if now_queued == queued {
                quiet += 1;
                if quiet >= 2 {
                    break;
                }
            } else {
                quiet = 0;
            }
            queued = now_queued;
        }
    }

    async fn send_batch(&self, scope: &Scope, chunk: Vec<(SecretRef, Reply)>) {
        if chunk.len() == 1 || self.batch_refused(scope) {
            for (secret, reply) in chunk {
                let _ = reply.send(self.get(&secret).await);
            }
            return;
        }
        let ids: Vec<String> = chunk.iter().map(|(s, _)| s.secret_id.clone()).collect();
        let subject = ids.join(",");
        let result = match self.client(scope, &subject).await {
            Ok(client) => {
                let request = client
                    .batch_get_secret_value()
                    .set_secret_id_list(Some(ids.clone()));
                self.call(scope, "BatchGetSecretValue", &subject, || {
                    request.clone().send()
                })
                .await
            }
            Err(error) => Err(error),
        };
        let output = match result {
            Ok(output) => output,
            Err(failure) => {
                if matches!(failure, SourceError::AccessDenied { .. }) {
                    // The role lacks secretsmanager:BatchGetSecretValue: one by one from now on.
                    tracing::warn!(
                        region = scope.region,
                        role = scope.role.as_ref().map(|role| role.arn.as_str()),
                        "BatchGetSecretValue refused; reading secrets one by one (grant \
                         secretsmanager:BatchGetSecretValue to batch)"
                    );
                    lock(&self.batch_refused).insert(scope.clone());
                }
                for (secret, reply) in chunk {
                    let answer = match &failure {
                        SourceError::AccessDenied { .. } => self.get(&secret).await,
                        other => Err(with_secret_id(other, &secret.secret_id)),
                    };
                    let _ = reply.send(answer);
                }
                return;
            }
        };
        let values = output.secret_values();
        let errors = output.errors();
        for (secret, reply) in chunk {
            let id = secret.secret_id.as_str();
            let answered = values.iter().find(|value| {
                value.name() == Some(id)
                    || value.arn() == Some(id)
                    || value.arn().is_some_and(|arn| {
                        arn.strip_prefix(id)
                            .is_some_and(|rest| rest.len() == 7 && rest.starts_with('-'))
                    })
            });
            let answer = if let Some(value) = answered {
                let content = match (value.secret_string(), value.secret_binary()) {
                    (Some(text), _) => Ok(SecretContent::Text(text.to_string())),
                    (None, Some(blob)) => Ok(SecretContent::Binary(blob.as_ref().to_vec())),
                    (None, None) => Err(SourceError::Empty {
                        secret_id: id.to_string(),
                    }),
                };
                match (content, value.arn(), value.name(), value.version_id()) {
                    (Ok(content), Some(arn), Some(name), Some(version_id)) => Ok(FetchedSecret {
                        arn: arn.to_string(),
                        name: name.to_string(),
                        version_id: version_id.to_string(),
                        content,
                    }),
                    (Err(error), ..) => Err(error),
                    _ => Err(SourceError::Unavailable {
                        secret_id: id.to_string(),
                        detail: "BatchGetSecretValue answered without an ARN, Name or VersionId"
                            .into(),
                    }),
                }
            } else if let Some(error) = errors.iter().find(|e| e.secret_id() == Some(id)) {
                Err(classify_code(
                    id,
                    error.error_code().unwrap_or_default(),
                    error.message().unwrap_or_default(),
                ))
            } else {
                // Not in the answer (an id form the batch did not echo): read it alone.
                self.get(&secret).await
            };
            let _ = reply.send(answer);
        }
    }

    /// Counts every call in `mtls_secretsmanager_calls_total`.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Secrets Manager API calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The client for `scope`: the operator's own credentials, or the scope's role's (assumed
    /// first when they are missing or about to expire; a refusal is `RoleDenied` about `subject`).
    /// Callers pass only regions and roles the source policy allowed, so the cache is bounded by
    /// the operator's configuration, not by what tenants write.
    async fn client(&self, scope: &Scope, subject: &str) -> Result<Client, SourceError> {
        let credentials = match &scope.role {
            Some(role) => Some(self.role_credentials(scope, role, subject).await?),
            None => None,
        };
        let built_for = credentials
            .as_ref()
            .map(|credentials| credentials.access_key_id().to_string());
        let mut clients = lock(&self.clients);
        if let Some((client, key)) = clients.get(scope)
            && *key == built_for
        {
            return Ok(client.clone());
        }
        // No SDK retries: every attempt goes through `call`, under the adaptive rate.
        let mut config = aws_sdk_secretsmanager::config::Builder::from(&self.base)
            .region(aws_config::Region::new(scope.region.clone()))
            .retry_config(aws_sdk_secretsmanager::config::retry::RetryConfig::disabled());
        if let Some(credentials) = credentials {
            config = config.credentials_provider(credentials);
        }
        let client = Client::from_conf(config.build());
        clients.insert(scope.clone(), (client.clone(), built_for));
        Ok(client)
    }

    /// `role`'s credentials: cached until shortly before they expire, then one AssumeRole (with the
    /// operator's own credentials, under `scope`'s rate) for every identity waiting on them.
    async fn role_credentials(
        &self,
        scope: &Scope,
        role: &AssumedRole,
        subject: &str,
    ) -> Result<Credentials, SourceError> {
        let slot = lock(&self.roles).entry(role.clone()).or_default().clone();
        let mut current = slot.lock().await;
        let fresh = |credentials: &Credentials| {
            credentials
                .expiry()
                .is_some_and(|expiry| expiry > SystemTime::now() + RENEW_BEFORE)
        };
        if let Some(credentials) = current.as_ref().filter(|c| fresh(c)) {
            return Ok(credentials.clone());
        }
        let request = self
            .sts
            .assume_role()
            .role_arn(&role.arn)
            .role_session_name(ROLE_SESSION_NAME)
            .set_external_id(role.external_id.clone());
        let own = Scope::own(&scope.region);
        let output = self
            .call(&own, "AssumeRole", subject, || request.clone().send())
            .await
            .map_err(|error| match error {
                SourceError::AccessDenied { secret_id, detail } => SourceError::RoleDenied {
                    secret_id,
                    role: role.arn.clone(),
                    detail,
                },
                other => other,
            })?;
        let assumed = output
            .credentials()
            .ok_or_else(|| SourceError::Unavailable {
                secret_id: subject.to_string(),
                detail: "AssumeRole answered without credentials".into(),
            })?;
        let expiry = SystemTime::try_from(*assumed.expiration()).ok();
        let credentials = Credentials::new(
            assumed.access_key_id(),
            assumed.secret_access_key(),
            Some(assumed.session_token().to_string()),
            expiry,
            "AssumeRole",
        );
        *current = Some(credentials.clone());
        Ok(credentials)
    }

    async fn get(&self, secret: &SecretRef) -> Result<FetchedSecret, SourceError> {
        let scope = secret.scope();
        let client = self.client(&scope, &secret.secret_id).await?;
        let mut request = client.get_secret_value().secret_id(&secret.secret_id);
        // Always name the stage: moto (moto#9451) and caches can lag behind a moved AWSCURRENT when
        // it is left implicit; on AWS the explicit stage is the same request.
        request = match &secret.version {
            VersionSelector::Stage(stage) => request.version_stage(stage),
            VersionSelector::Id(id) => request.version_id(id),
        };
        let output = self
            .call(&scope, "GetSecretValue", &secret.secret_id, || {
                request.clone().send()
            })
            .await?;
        let content = match (output.secret_string, output.secret_binary) {
            (Some(text), _) => SecretContent::Text(text),
            (None, Some(blob)) => SecretContent::Binary(blob.into_inner()),
            (None, None) => {
                return Err(SourceError::Empty {
                    secret_id: secret.secret_id.clone(),
                });
            }
        };
        // A value without its version id or ARN cannot be tracked or checked: refuse it.
        let incomplete = |field: &str| SourceError::Unavailable {
            secret_id: secret.secret_id.clone(),
            detail: format!("GetSecretValue answered without {field}"),
        };
        Ok(FetchedSecret {
            arn: output.arn.ok_or_else(|| incomplete("an ARN"))?,
            name: output.name.ok_or_else(|| incomplete("a Name"))?,
            version_id: output.version_id.ok_or_else(|| incomplete("a VersionId"))?,
            content,
        })
    }
}

/// The account of the operator's own credentials (STS GetCallerIdentity), or `None` when STS cannot
/// say; the source policy then allows ARN ids only through explicit `arn:` patterns.
pub async fn caller_account(config: &aws_config::SdkConfig) -> Option<String> {
    let sts = aws_sdk_sts::Client::new(config);
    match sts.get_caller_identity().send().await {
        Ok(identity) => identity.account,
        Err(error) => {
            tracing::warn!(
                code = error.code().unwrap_or_default(),
                "STS GetCallerIdentity failed: the operator's own account is unknown; ARN ids need \
                 an arn: pattern in --allowed-source (or set --aws-account-id)"
            );
            None
        }
    }
}

impl SecretSource for SecretsManagerSource {
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>> {
        self.read(secret).boxed()
    }

    fn describe<'a>(
        &'a self,
        secret: &'a SecretRef,
    ) -> BoxFuture<'a, Result<DescribedSecret, SourceError>> {
        async move {
            let scope = secret.scope();
            let request = self
                .client(&scope, &secret.secret_id)
                .await?
                .describe_secret()
                .secret_id(&secret.secret_id);
            let output = self
                .call(&scope, "DescribeSecret", &secret.secret_id, || {
                    request.clone().send()
                })
                .await?;
            // Scheduled for deletion: as good as gone for new reads.
            if output.deleted_date().is_some() {
                return Err(SourceError::NotFound {
                    secret_id: secret.secret_id.clone(),
                    detail: "scheduled for deletion".into(),
                });
            }
            Ok(DescribedSecret {
                arn: output.arn().unwrap_or_default().to_string(),
                name: output.name().unwrap_or_default().to_string(),
                versions: output
                    .version_ids_to_stages()
                    .map(|map| map.iter().map(|(v, s)| (v.clone(), s.clone())).collect())
                    .unwrap_or_default(),
                last_changed_unix: output.last_changed_date().map(|date| date.secs()),
            })
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        scope: &'a Scope,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<DescribedSecret>, SourceError>> {
        async move {
            use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
            let subject = format!("(list in {})", scope.region);
            let client = self.client(scope, &subject).await?;
            let mut found = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut request = client.list_secrets().max_results(100);
                if !names.is_empty() {
                    request = request.filters(
                        Filter::builder()
                            .key(FilterNameStringType::Name)
                            .set_values(Some(names.to_vec()))
                            .build(),
                    );
                }
                let request = request.set_next_token(token.take());
                let output = self
                    .call(scope, "ListSecrets", &subject, || request.clone().send())
                    .await?;
                for entry in output.secret_list() {
                    if entry.deleted_date().is_some() {
                        continue;
                    }
                    found.push(DescribedSecret {
                        arn: entry.arn().unwrap_or_default().to_string(),
                        name: entry.name().unwrap_or_default().to_string(),
                        versions: entry
                            .secret_versions_to_stages()
                            .map(|map| map.iter().map(|(v, s)| (v.clone(), s.clone())).collect())
                            .unwrap_or_default(),
                        last_changed_unix: entry.last_changed_date().map(|date| date.secs()),
                    });
                }
                match output.next_token() {
                    Some(next) if !next.is_empty() => token = Some(next.to_string()),
                    _ => break,
                }
            }
            Ok(found)
        }
        .boxed()
    }
}

/// The same failure, about another secret of the batch.
fn with_secret_id(error: &SourceError, secret_id: &str) -> SourceError {
    let secret_id = secret_id.to_string();
    match error {
        SourceError::NotFound { detail, .. } => SourceError::NotFound {
            secret_id,
            detail: detail.clone(),
        },
        SourceError::AccessDenied { detail, .. } => SourceError::AccessDenied {
            secret_id,
            detail: detail.clone(),
        },
        SourceError::RoleDenied { role, detail, .. } => SourceError::RoleDenied {
            secret_id,
            role: role.clone(),
            detail: detail.clone(),
        },
        SourceError::Throttled { .. } => SourceError::Throttled { secret_id },
        SourceError::Empty { .. } => SourceError::Empty { secret_id },
        SourceError::Unavailable { detail, .. } => SourceError::Unavailable {
            secret_id,
            detail: detail.clone(),
        },
    }
}

/// Maps an SDK error to a reason by its error code, never by its text.
fn classify<E, R>(secret_id: &str, error: &SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = error.code().unwrap_or_default();
    let classified = classify_code(secret_id, code, error.message().unwrap_or_default());
    match classified {
        SourceError::Unavailable { secret_id, .. } => {
            let detail = match error {
                SdkError::ConstructionFailure(_) => {
                    "the request could not be built (are AWS credentials and region configured?)"
                        .to_string()
                }
                SdkError::TimeoutError(_) => "timed out".to_string(),
                SdkError::DispatchFailure(failure) => {
                    if failure.is_timeout() {
                        "timed out connecting".to_string()
                    } else {
                        "could not reach the endpoint".to_string()
                    }
                }
                SdkError::ResponseError(_) => "unreadable response".to_string(),
                // The code only: AWS's message can name the role or the account.
                _ if code.is_empty() => "unknown error".to_string(),
                _ => code.to_string(),
            };
            SourceError::Unavailable { secret_id, detail }
        }
        other => other,
    }
}

/// Maps an AWS error code (of a call, or of one secret in a batch) to a reason. `message` is AWS's
/// text: kept as the log-only detail.
fn classify_code(secret_id: &str, code: &str, message: &str) -> SourceError {
    let secret_id = secret_id.to_string();
    let detail = if message.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {message}")
    };
    match code {
        "ResourceNotFoundException" => SourceError::NotFound { secret_id, detail },
        // STS (AssumeRole) answers `AccessDenied`, `InvalidClientTokenId`, `RegionDisabledException`.
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "RegionDisabledException"
        | "DecryptionFailure" => SourceError::AccessDenied { secret_id, detail },
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => SourceError::Throttled { secret_id },
        // A secret scheduled for deletion, or a version that does not exist.
        "InvalidRequestException" | "InvalidParameterException" => {
            SourceError::NotFound { secret_id, detail }
        }
        _ => SourceError::Unavailable {
            secret_id,
            detail: code.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_secretsmanager::error::{ErrorMetadata, SdkError};
    use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

    use super::classify;

    fn service_error(code: &str) -> SdkError<GetSecretValueError, ()> {
        let metadata = ErrorMetadata::builder()
            .code(code)
            .message("from AWS")
            .build();
        SdkError::service_error(GetSecretValueError::generic(metadata), ())
    }

    #[test]
    fn error_codes_map_to_fixed_reasons() {
        let cases = [
            ("ResourceNotFoundException", "SourceNotFound"),
            ("InvalidRequestException", "SourceNotFound"),
            ("AccessDeniedException", "AccessDenied"),
            ("DecryptionFailure", "AccessDenied"),
            ("UnrecognizedClientException", "AccessDenied"),
            ("ThrottlingException", "Throttled"),
            ("InternalServiceError", "SourceUnavailable"),
        ];
        for (code, reason) in cases {
            let error = classify("ns/x", &service_error(code));
            assert_eq!(error.reason(), reason, "{code}");
            assert!(error.to_string().contains("ns/x"), "{error}");
            assert!(!error.to_string().contains("from AWS"), "{error}");
        }
    }

    #[test]
    fn transport_failures_are_unavailable_with_a_plain_detail() {
        let timeout: SdkError<GetSecretValueError, ()> = SdkError::timeout_error("slow");
        let error = classify("ns/x", &timeout);
        assert_eq!(error.reason(), "SourceUnavailable");
        assert!(error.to_string().contains("timed out"), "{error}");
        let unbuilt: SdkError<GetSecretValueError, ()> =
            SdkError::construction_failure("no region");
        assert!(
            classify("ns/x", &unbuilt)
                .to_string()
                .contains("credentials and region")
        );
    }
}
