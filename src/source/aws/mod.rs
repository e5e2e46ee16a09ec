//! AWS Secrets Manager through the real SDK. The endpoint, region and credentials come from the
//! standard AWS configuration (`AWS_ENDPOINT_URL`, IRSA, Pod Identity, ...): there is no test-only
//! path; tests point the endpoint at moto.

//!
//! One concern per file: this one holds the source itself (its state, its settings, the
//! [`SecretSource`] implementation and the mapping of responses); [`admission`] decides when a
//! call may go (in-flight cap, adaptive rate, reads and checks sharing the rate, counting, retry);
//! [`single_flight`] coalesces identical reads; [`batch`] gathers AWSCURRENT reads into
//! BatchGetSecretValue; [`credentials`] holds the clients and the role sessions; [`classify`] maps
//! AWS errors to fixed reasons.

pub(crate) mod admission;
mod batch;
mod bounded;
mod classify;
mod credentials;
mod single_flight;

pub use credentials::{CLUSTER_TAG, DEFAULT_MAX_SESSIONS, NAMESPACE_TAG, caller_account};

use crate::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::metrics::Metrics;

use super::rate;
use super::{
    AssumedRole, DescribedSecret, FetchedSecret, Scope, SecretContent, SecretRef, SecretSource,
    SourceError, VersionSelector,
};
use batch::Batcher;
use classify::classify;
use credentials::RoleSlot;
use single_flight::SingleFlight;

/// The AWS operations the operator calls: one value names the call in metrics, sets its priority
/// and is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Get,
    BatchGet,
    Describe,
    List,
    AssumeRole,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Self::Get,
        Self::BatchGet,
        Self::Describe,
        Self::List,
        Self::AssumeRole,
    ];

    /// The name AWS gives it (and the metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GetSecretValue",
            Self::BatchGet => "BatchGetSecretValue",
            Self::Describe => "DescribeSecret",
            Self::List => "ListSecrets",
            Self::AssumeRole => "AssumeRole",
        }
    }

    /// Which share of its scope's rate it draws on: value reads (and AssumeRole, which a read
    /// waits for), or version checks.
    pub const fn class(self) -> admission::Class {
        match self {
            Self::Get | Self::BatchGet | Self::AssumeRole => admission::Class::Read,
            Self::Describe | Self::List => admission::Class::Check,
        }
    }
}

pub struct SecretsManagerSource {
    base: aws_config::SdkConfig,
    metrics: Option<Arc<Metrics>>,
    /// One client per scope (region and role), shared by every identity (connection pool), with
    /// the access key of the role credentials it was built with.
    clients: Mutex<HashMap<Scope, credentials::CachedClient>>,
    /// STS with the operator's own credentials (web identity, Pod Identity, ...): AssumeRole.
    sts: aws_sdk_sts::Client,
    /// Each assumed role's current credentials.
    roles: Mutex<HashMap<AssumedRole, (RoleSlot, std::time::Instant)>>,
    calls: AtomicU64,
    calls_by_operation: Mutex<HashMap<&'static str, u64>>,
    /// Single flight: reads in progress, with the callers waiting for the same answer.
    single_flight: SingleFlight<SecretRef, Result<FetchedSecret, SourceError>>,
    /// AWSCURRENT reads waiting for a BatchGetSecretValue, per scope.
    batches: Batcher<Scope, SecretRef, Result<FetchedSecret, SourceError>>,
    /// Scopes whose credentials may not call BatchGetSecretValue: read one by one there.
    batch_refused: Mutex<HashSet<Scope>>,
    /// Calls in flight at once, across every identity, the sweep and the batches.
    in_flight_cap: Arc<tokio::sync::Semaphore>,
    in_flight_now: Arc<AtomicU64>,
    in_flight_peak: Arc<AtomicU64>,
    /// Per scope (region and credentials), shared by every call: the adaptive rate (AIMD) and how
    /// its tokens were shared between reads and version checks.
    lanes: Mutex<admission::Lanes>,
    max_calls_per_second: f64,
    /// Clients and role sessions kept at most (each bounded separately).
    max_sessions: usize,
    /// The `kubernetes-cluster` session tag of per-namespace sessions (`--cluster-name`).
    cluster_name: Option<String>,
}

/// What [`SecretsManagerSource::kept`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub clients: usize,
    pub role_sessions: usize,
    pub lanes: usize,
}

/// The default cap on Secrets Manager calls in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

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
            single_flight: SingleFlight::new(),
            batches: Batcher::new(batch::BATCH_MAX),
            batch_refused: Mutex::new(HashSet::new()),
            in_flight_cap: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            in_flight_now: Arc::new(AtomicU64::new(0)),
            in_flight_peak: Arc::new(AtomicU64::new(0)),
            lanes: Mutex::new(admission::Lanes::default()),
            max_calls_per_second: rate::DEFAULT_CALLS_PER_SECOND,
            max_sessions: credentials::DEFAULT_MAX_SESSIONS,
            cluster_name: None,
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

    /// At most `max` clients and at most `max` role sessions kept (at least 1 each; default 256).
    pub fn with_max_sessions(self, max: usize) -> Self {
        Self {
            max_sessions: max.max(1),
            ..self
        }
    }

    /// Per-namespace sessions carry `cluster` as their `kubernetes-cluster` session tag.
    pub fn with_cluster_name(self, cluster: Option<String>) -> Self {
        Self {
            cluster_name: cluster,
            ..self
        }
    }

    /// Clients, role sessions and rate lanes (per region and role) kept right now: what tenant
    /// text (external ids, role names a pattern allows) could grow, and the caps bound.
    pub fn kept(&self) -> Kept {
        Kept {
            clients: lock(&self.clients).len(),
            role_sessions: lock(&self.roles).len(),
            lanes: lock(&self.lanes).len(),
        }
    }

    /// The current adaptive rate of the operator's own credentials in `region` (calls per
    /// second), if it made any call.
    pub fn rate_of(&self, region: &str) -> Option<f64> {
        lock(&self.lanes)
            .get(&Scope::own(region))
            .map(|lane| lane.rate.rate())
    }

    /// Counts every call in `mtls_secretsmanager_calls_total`.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        // Every operation and outcome from 0: a counter series born at its first failure hides
        // that failure from rate() and from alerts on it.
        let outcomes: Vec<&str> = std::iter::once("success")
            .chain(SourceError::REASONS.iter().map(|reason| reason.as_str()))
            .collect();
        for operation in Operation::ALL {
            for outcome in &outcomes {
                metrics.start_aws_call_at_zero(operation.as_str(), outcome);
            }
        }
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Secrets Manager API calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
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
            .call(&scope, Operation::Get, &secret.secret_id, || {
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

impl SecretSource for SecretsManagerSource {
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
        flow: &'a str,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>> {
        self.read(secret, flow).boxed()
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
                .call(&scope, Operation::Describe, &secret.secret_id, || {
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
                    .call(scope, Operation::List, &subject, || request.clone().send())
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
