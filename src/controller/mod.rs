//! Reconciles MtlsIdentities: fetch, validate, write the Secret (never over a foreign one), restart
//! what uses it, then status and Events. Each concern has its file, its pure decisions beside its
//! I/O: [`sync`] with [`decide`] and [`secret`], [`status`], [`requeue`], [`rotation`], [`egress`].
//! This module runs the controller and holds the reconcile that ties them together.

pub mod budget;
pub mod decide;
pub mod egress;
pub mod error;
pub mod events;
pub mod requeue;
pub mod rotation;
pub mod secret;
pub mod status;
pub mod sync;
#[cfg(test)]
mod tests;
pub mod write;

use crate::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{
    FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MtlsIdentity, StoredIdentity, parse_duration,
};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::restart::{RestartLimits, RestartReport, Restarter};
use crate::source::SecretSource;
use crate::source::fleet::{Fleet, SweepMode};
use crate::source::policy::SourcePolicy;
use budget::FetchBudget;
use sync::SyncStep;

pub use error::ReconcileError;
use events::publish;

/// The shortest refresh interval, whatever the spec says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// `spec.expiry.warnBefore` default: 30 days.
const DEFAULT_WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only these namespaces (one controller each, RBAC only there); all when empty.
    pub namespaces: Vec<String>,
    pub policy: SourcePolicy,
    /// The region of identities without `spec.source.region` (the operator's own).
    pub default_region: Option<String>,
    /// Caps on rolling restarts: in progress at once, per namespace, and how long one may take.
    pub restart_limits: RestartLimits,
    /// Allow `spec.restart.policy: Annotate`, which patches Pods (RBAC `pods: patch`).
    pub allow_annotate: bool,
    /// Where operator-managed egress proxies' admin port may be reached from (NetworkPolicy peers).
    pub egress_admin_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
    /// How versions are checked between reads, and how often at most.
    pub sweep_mode: SweepMode,
    pub sweep_interval: Duration,
    /// The change-event queue (EventBridge → SQS), the fast path; none: the sweep alone.
    pub events: Option<crate::source::events::EventQueue>,
    /// Reconciles running at once (per watched scope): bounds the load on the API server and AWS
    /// when thousands of identities are due together.
    pub max_concurrent_reconciles: u16,
    /// Only identities with these labels (a label selector), to shard identities over several
    /// operators or to canary a new version; all when `None`.
    pub identity_selector: Option<String>,
    /// The image of operator-managed egress proxies; `None`: `spec.egress` is not acted on.
    pub egress_image: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            policy: SourcePolicy::new(Vec::new(), None, Vec::new()),
            default_region: None,
            restart_limits: RestartLimits::default(),
            allow_annotate: false,
            egress_admin_from: Vec::new(),
            sweep_mode: SweepMode::default(),
            sweep_interval: Duration::from_secs(300),
            events: None,
            max_concurrent_reconciles: 64,
            identity_selector: None,
            egress_image: None,
        }
    }
}

impl Settings {
    /// Fills what the settings leave open from the AWS configuration: the default region (the
    /// SDK's), the operator's own account (STS GetCallerIdentity) and, when none are allowed yet,
    /// the allowed regions (the default region).
    pub async fn with_aws_defaults(mut self, aws: &aws_config::SdkConfig) -> Self {
        if self.default_region.is_none() {
            self.default_region = aws.region().map(|region| region.to_string());
        }
        let account = match self.policy.own_account() {
            Some(account) => Some(account.to_string()),
            None => crate::source::caller_account(aws).await,
        };
        let regions = if self.policy.allowed_regions().is_empty() {
            self.default_region.iter().cloned().collect()
        } else {
            self.policy.allowed_regions().to_vec()
        };
        self.policy = self.policy.with_account_and_regions(account, regions);
        self
    }
}

pub struct Context {
    pub client: kube::Client,
    /// Every identity the controller watches, for finding the siblings that share a workload.
    identities: Store<StoredIdentity>,
    /// Asks the controller to reconcile an identity now.
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<StoredIdentity>>,
    pub source: Arc<dyn SecretSource>,
    pub settings: Settings,
    /// Who publishes Events (see `publish` for why there is no long-lived Recorder).
    reporter: Reporter,
    restarter: Arc<Restarter>,
    metrics: Arc<Metrics>,
    /// The version index and its sweep, shared by every scope.
    fleet: Arc<Fleet>,
    /// Per-identity state, forgotten when the identity is deleted.
    state: Arc<IdentityState>,
}

/// What the controller remembers per identity (bounded by the identities that exist).
#[derive(Default)]
pub struct IdentityState {
    /// Consecutive source failures, for backoff; forgotten on success.
    failures: Mutex<HashMap<ObjectRef<MtlsIdentity>, u32>>,
    /// Secrets Manager reads, rate-limited per identity.
    budget: Mutex<FetchBudget<ObjectRef<MtlsIdentity>>>,
    /// The source version last read and refused (bad material): not read again until it changes.
    known_bad: Mutex<HashMap<ObjectRef<MtlsIdentity>, String>>,
    /// Consecutive Kubernetes API errors, for the error policy's backoff.
    api_errors: Mutex<HashMap<ObjectRef<MtlsIdentity>, u32>>,
    /// A rotation waiting for sibling identities that share a workload: its fingerprint and since
    /// when (see `rotation`).
    coalescing: Mutex<HashMap<ObjectRef<MtlsIdentity>, (String, std::time::Instant)>>,
    /// The resourceVersion our last status write gave each identity, until the watch delivers it:
    /// a reconcile of an older copy (our own Secret write can trigger one at once) would judge
    /// against a status we already replaced, and write it and its Events twice.
    written: Mutex<HashMap<ObjectRef<MtlsIdentity>, u64>>,
    /// The generation each identity (by uid) was last reconciled for, to let only spec changes
    /// through (see `generation_changed`).
    generations: Mutex<HashMap<Box<str>, i64>>,
}

impl IdentityState {
    /// Forgets a deleted identity: its backoff, its read budget, its generation and its metric
    /// series.
    fn forget(&self, identity: &StoredIdentity, metrics: &Metrics, fleet: &Fleet) {
        let key = identity_key(identity);
        let namespace = identity.namespace().unwrap_or_default();
        lock(&self.failures).remove(&key);
        lock(&self.budget).forget(&key);
        lock(&self.known_bad).remove(&key);
        lock(&self.api_errors).remove(&key);
        lock(&self.coalescing).remove(&key);
        lock(&self.written).remove(&key);
        if let Some(uid) = identity.metadata.uid.as_deref() {
            lock(&self.generations).remove(uid);
        }
        fleet.unregister(&(namespace.clone(), identity.name_any()));
        metrics.forget_identity(&namespace, &identity.name_any());
    }

    /// Whether `seen` (the resourceVersion of the copy about to be reconciled) is older than our last
    /// status write; forgets the write once the watch has caught up with it. resourceVersions are
    /// etcd revisions, compared only when both are numbers.
    fn is_stale(&self, key: &ObjectRef<MtlsIdentity>, seen: Option<&str>) -> bool {
        let mut written = lock(&self.written);
        let Some(ours) = written.get(key).copied() else {
            return false;
        };
        match seen.and_then(|seen| seen.parse::<u64>().ok()) {
            Some(seen) if seen < ours => true,
            _ => {
                written.remove(key);
                false
            }
        }
    }

    fn record_written(&self, key: &ObjectRef<MtlsIdentity>, resource_version: Option<&str>) {
        if let Some(version) = resource_version.and_then(|version| version.parse::<u64>().ok()) {
            lock(&self.written).insert(key.clone(), version);
        }
    }

    /// Whether `identity` comes with a generation (a spec) not seen before: our own status writes
    /// must not trigger a sync, or every status write would cost another Secrets Manager call. Like
    /// kube's `predicates::generation` filter, which keeps three strings per identity for it; this
    /// keeps the uid, and forgets it when the identity is deleted. A new uid (the identity deleted
    /// and created again) is a change; an object without generation always passes.
    fn generation_changed(&self, identity: &StoredIdentity) -> bool {
        let (Some(uid), Some(generation)) = (
            identity.metadata.uid.as_deref(),
            identity.metadata.generation,
        ) else {
            return true;
        };
        let mut generations = lock(&self.generations);
        match generations.get_mut(uid) {
            Some(seen) => std::mem::replace(seen, generation) != generation,
            None => {
                generations.insert(uid.into(), generation);
                true
            }
        }
    }

    /// Takes one Secrets Manager read from the identity's budget; `Some(wait)` when it has none.
    fn take_fetch(&self, key: &ObjectRef<MtlsIdentity>, refresh: Duration) -> Option<Duration> {
        lock(&self.budget).take(key, refresh, std::time::Instant::now())
    }
}

/// The key of the per-identity state: namespace and name. (An `ObjectRef` made from an object
/// also carries its uid and resourceVersion: two more strings in every map, for every identity.)
pub(crate) fn identity_key(identity: &impl Resource) -> ObjectRef<MtlsIdentity> {
    let key = ObjectRef::new(&identity.name_any());
    match identity.namespace() {
        Some(namespace) => key.within(&namespace),
        None => key,
    }
}

impl Context {
    fn count_failure(&self, key: &ObjectRef<MtlsIdentity>, failed: bool) -> u32 {
        let mut failures = lock(&self.state.failures);
        if failed {
            let count = failures.entry(key.clone()).or_insert(0);
            *count = count.saturating_add(1);
            *count
        } else {
            failures.remove(key);
            0
        }
    }
}

/// Runs the controller until `shutdown` completes: one controller for the whole cluster, or one per
/// watched namespace (so the operator needs RBAC only in those), sharing the restart caps.
pub async fn run(
    client: kube::Client,
    source: Arc<dyn SecretSource>,
    settings: Settings,
    metrics: Arc<Metrics>,
    readiness: crate::health::Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    info!(
        namespaces = ?settings.namespaces,
        policy = ?settings.policy.patterns(),
        allowed_regions = ?settings.policy.allowed_regions(),
        own_account = settings.policy.own_account().unwrap_or("(unknown)"),
        "controller starting"
    );
    let restarter = Arc::new(Restarter::new(
        client.clone(),
        settings.restart_limits,
        settings.allow_annotate,
    ));
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let fleet = Arc::new(Fleet::new(
        source.clone(),
        settings.sweep_mode,
        settings.sweep_interval,
        Some(metrics.clone()),
    ));
    info!(
        mode = settings.sweep_mode.as_str(),
        interval = ?settings.sweep_interval,
        "version sweep"
    );
    let sweep = tokio::spawn(fleet.clone().run_sweep(shutdown.clone()));
    let events = settings.events.clone().map(|queue| {
        tokio::spawn(crate::source::events::run(
            fleet.clone(),
            queue,
            Some(metrics.clone()),
            shutdown.clone(),
        ))
    });
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let shared = Shared {
        client,
        source,
        settings,
        metrics,
        restarter,
        fleet,
    };
    // Ready once every scope's identities have been listed.
    let synced = readiness.after(scopes.len());
    let controllers = scopes
        .into_iter()
        .map(|namespace| run_scope(shared.clone(), namespace, synced.clone(), shutdown.clone()));
    futures::future::join_all(controllers).await;
    sweep.abort();
    if let Some(events) = events {
        events.abort();
    }
    info!("controller stopped");
}

/// What every scope's controller shares.
#[derive(Clone)]
struct Shared {
    client: kube::Client,
    source: Arc<dyn SecretSource>,
    settings: Settings,
    metrics: Arc<Metrics>,
    restarter: Arc<Restarter>,
    fleet: Arc<Fleet>,
}

async fn run_scope(
    shared: Shared,
    namespace: Option<String>,
    synced: crate::health::Synced,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let Shared {
        client,
        source,
        settings,
        metrics,
        restarter,
        fleet,
    } = shared;
    let (identities, secrets): (Api<StoredIdentity>, Api<PartialObjectMeta<Secret>>) =
        match &namespace {
            Some(namespace) => (
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client.clone(), namespace),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let (reader, writer) = reflector::store();
    let state = Arc::new(IdentityState::default());
    let mut identity_config = watcher::Config::default();
    if let Some(selector) = &settings.identity_selector {
        identity_config = identity_config.labels(selector);
    }
    let forget = {
        let (state, metrics, fleet) = (state.clone(), metrics.clone(), fleet.clone());
        move |event: &watcher::Event<StoredIdentity>| {
            if let watcher::Event::Delete(identity) = event {
                state.forget(identity, &metrics, &fleet);
            }
        }
    };
    let identity_changes = watcher(identities, identity_config)
        .default_backoff()
        // managedFields are most of an object's size, and `kubectl apply` keeps a whole copy of the
        // object in an annotation: neither is read here, so neither is kept in memory.
        .modify(|identity| {
            identity.managed_fields_mut().clear();
            identity
                .annotations_mut()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
        })
        .reflect(writer)
        // The first complete listing makes this scope ready (`/readyz`). Not the store's
        // `wait_until_ready`: it wakes only its latest waiter, which is the controller's.
        .inspect_ok({
            let mut synced = Some(synced);
            move |event| {
                if matches!(event, watcher::Event::InitDone)
                    && let Some(synced) = synced.take()
                {
                    synced.done();
                }
            }
        })
        .inspect_ok(forget)
        .applied_objects()
        .try_filter({
            let state = state.clone();
            move |identity| std::future::ready(state.generation_changed(identity))
        });
    // Our Secrets, metadata only and label-filtered: never every Secret in the cluster with its data.
    let owned_secrets = watcher(
        secrets.clone(),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")),
    )
    .default_backoff()
    .touched_objects();
    // Keystore password Secrets are the tenants' own, so not label-selected: every Secret that is
    // not ours, metadata only. An edit reconciles the identities whose keystore names it, and they
    // render the keystore again under the new password (see `sync`).
    let password_secrets = watcher(
        secrets,
        watcher::Config::default().labels(&format!("!{MANAGED_BY_LABEL}")),
    )
    .default_backoff()
    .touched_objects();
    let named_by = {
        let identities = reader.clone();
        move |secret: PartialObjectMeta<Secret>| {
            let (secret_namespace, secret_name) = (secret.namespace(), secret.name_any());
            identities
                .state()
                .into_iter()
                .filter(|identity| {
                    identity.namespace() == secret_namespace
                        && identity.password_secret() == Some(secret_name.as_str())
                })
                .map(|identity| ObjectRef::from_obj(identity.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let (trigger, triggered) = futures::channel::mpsc::unbounded();
    // The sweep asks for the identities of a changed secret (those in this scope).
    let notify_trigger = trigger.clone();
    fleet.subscribe(Arc::new(move |(identity_namespace, name)| {
        if namespace.as_ref().is_none_or(|n| n == identity_namespace) {
            let _ = notify_trigger.unbounded_send(ObjectRef::new(name).within(identity_namespace));
        }
    }));
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let context = Arc::new(Context {
        reporter,
        client,
        identities: reader.clone(),
        trigger,
        source,
        settings,
        restarter,
        metrics,
        fleet,
        state,
    });
    let config = kube::runtime::controller::Config::default()
        .concurrency(context.settings.max_concurrent_reconciles.max(1));
    Controller::for_stream(identity_changes, reader)
        .with_config(config)
        .owns_stream(owned_secrets)
        .watches_stream(password_secrets, named_by)
        .reconcile_on(triggered)
        .graceful_shutdown_on(shutdown)
        .run(reconcile_stored, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(error = %error, "reconcile failed");
            }
        })
        .await;
}

/// Kubernetes API errors: retried with exponential backoff per identity (5 s doubling, up to 5 min,
/// with jitter), reset by the next reconcile that succeeds.
fn error_policy(
    identity: Arc<StoredIdentity>,
    error: &ReconcileError,
    context: Arc<Context>,
) -> Action {
    let key = identity_key(identity.as_ref());
    let attempts = {
        let mut errors = lock(&context.state.api_errors);
        let count = errors.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let backoff = requeue::api_error_backoff(attempts, rand::random::<f64>());
    warn!(
        identity = %key,
        reason = error.reason(),
        error = %error,
        attempts,
        retry_in = ?backoff,
        "reconcile error; retrying"
    );
    Action::requeue(backoff)
}

/// The controller's entry point: the identity as the store keeps it, its status parsed back for
/// this one reconcile.
async fn reconcile_stored(
    identity: Arc<StoredIdentity>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let identity = identity.expand().map_err(ReconcileError::InvalidStatus)?;
    reconcile(Arc::new(identity), context).await
}

async fn reconcile(
    identity: Arc<MtlsIdentity>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(identity, &context).await;
    context
        .metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// How soon a reconcile of a copy older than our last status write is tried again: the watch
/// delivers the write within milliseconds.
const STALE_RETRY: Duration = Duration::from_millis(500);

async fn reconcile_inner(
    identity: Arc<MtlsIdentity>,
    context: &Context,
) -> Result<Action, ReconcileError> {
    let namespace = identity.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = identity.name_any();
    let key = identity_key(identity.as_ref());
    if context
        .state
        .is_stale(&key, identity.resource_version().as_deref())
    {
        return Ok(Action::requeue(STALE_RETRY));
    }
    let target = identity.target_secret_name();
    // The CRD's 1s floor, enforced here too (an identity written before the rule, or a lax server).
    let refresh = parse_duration(&identity.spec.refresh_interval)
        .unwrap_or(Duration::from_secs(3600))
        .max(MIN_REFRESH);

    let outcome = match sync::sync(&identity, &namespace, &target, refresh, context).await? {
        SyncStep::Done(outcome) => *outcome,
        SyncStep::Wait(wait) => {
            context.metrics.reads_deferred.inc();
            return Ok(Action::requeue(wait));
        }
        // Nothing read: carry on from the status (restarts still pending, expiry, egress), or, if
        // the identity is failing on a version already refused, wait for a change.
        SyncStep::Unchanged(carried) => match carried {
            Some(synced) => Ok(*synced),
            None => {
                return Ok(Action::requeue(
                    refresh + refresh.mul_f64(rand::random::<f64>() * 0.1),
                ));
            }
        },
    };

    let previous = identity.status.as_ref();
    // No false alarms: a transient source failure (throttled, unreachable) while a valid
    // certificate is in place leaves Ready True; `SourceReachable` says what is happening.
    let (outcome, transient) = match outcome {
        Err(failure) if failure.is_transient() => match decide::synced_from_status(
            previous,
            identity.metadata.generation,
            &target,
            chrono::Utc::now().timestamp(),
        ) {
            Some(in_place) => (Ok(in_place), Some(failure)),
            None => (Err(failure), None),
        },
        other => (other, None),
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut status = status::next_status(previous, identity.metadata.generation, &outcome, &now);
    let reachability_event =
        status::source_reachable(&mut status, transient.as_ref(), outcome.is_ok(), &now);
    let warn_before = identity
        .spec
        .expiry
        .as_ref()
        .and_then(|expiry| expiry.warn_before.as_deref())
        .and_then(parse_duration)
        .unwrap_or(DEFAULT_WARN_BEFORE);
    let expiring_event = status::expiry(
        &mut status,
        &outcome,
        chrono::Utc::now().timestamp(),
        warn_before,
        &now,
    );
    let mut restarts_pending = false;
    // A Kubernetes error after the Secret was written: returned once the status says so.
    let mut after_status: Option<ReconcileError> = None;
    if let Ok(synced) = &outcome {
        let on_password_change = identity
            .spec
            .restart
            .as_ref()
            .is_some_and(|restart| restart.on_password_change);
        status.last_rotation = status::rotation(previous, synced, &now, on_password_change);
        if let Some(rotation) = status.last_rotation.as_mut()
            && !rotation.complete
            && rotation.sha256_fingerprint == synced.certificate.sha256_fingerprint
        {
            // A failure here comes after the Secret was written: it is recorded in status (a
            // `Restarts` condition) and retried, never allowed to skip the status write.
            let report = match rotation::restart_workloads(
                &identity, &namespace, &target, rotation, context,
            )
            .await
            {
                Ok(report) => {
                    status::clear_condition(&mut status.conditions, status::RESTARTS);
                    report
                }
                Err(error) => {
                    let condition = match &error {
                        ReconcileError::InvalidStatus(problem) => status::failed_condition(
                            status::RESTARTS,
                            error.reason(),
                            format!("{problem}; restarts wait until it is corrected"),
                            identity.metadata.generation,
                            &now,
                        ),
                        _ => status::api_error_condition(
                            status::RESTARTS,
                            "could not list or patch the workloads that use the Secret; \
                                 retrying",
                            identity.metadata.generation,
                            &now,
                        ),
                    };
                    status::set_condition(&mut status.conditions, condition);
                    after_status.get_or_insert(error);
                    RestartReport {
                        pending: vec!["(workloads)".to_string()],
                        ..RestartReport::default()
                    }
                }
            };
            for workload in &report.done {
                if !rotation.restarted_workloads.contains(workload) {
                    rotation.restarted_workloads.push(workload.clone());
                }
            }
            rotation.restarted_workloads.sort();
            rotation.complete = report.complete();
            let restarts = |outcome: &str, count: usize| {
                context
                    .metrics
                    .restarts
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.to_string(),
                    })
                    .inc_by(count as u64);
            };
            restarts("triggered", report.triggered.len());
            restarts("failed", report.failed.len());
            restarts_pending = !rotation.complete;
            rotation::publish_restart_events(context, &identity, &namespace, &report).await;
        }
    }
    if let Err(error) =
        egress::reconcile_egress(&identity, &namespace, &mut status, &now, context).await
    {
        status::set_condition(
            &mut status.conditions,
            status::api_error_condition(
                egress::EGRESS_CONDITION,
                "could not read or write the egress proxy's objects; retrying",
                identity.metadata.generation,
                &now,
            ),
        );
        after_status.get_or_insert(error);
    }
    let attempt = match (&transient, &outcome) {
        (Some(failure), _) | (None, Err(failure)) => Err(failure.reason()),
        (None, Ok(_)) => Ok(()),
    };
    context
        .metrics
        .record_identity(&namespace, &name, previous, &status, attempt);
    if previous != Some(&status) {
        let identities: Api<MtlsIdentity> = Api::namespaced(context.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": status });
        let written = identities
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        context
            .state
            .record_written(&key, written.resource_version().as_deref());
    }
    for event in status::event_for(previous, &outcome)
        .into_iter()
        .chain(expiring_event)
        .chain(reachability_event)
    {
        publish(context, &identity.object_ref(&()), event).await;
    }
    if let Err(error) =
        write::remove_renamed_target(&identity, &namespace, &target, previous, &outcome, context)
            .await
    {
        after_status.get_or_insert(error);
    }
    if let Some(error) = after_status {
        return Err(error);
    }
    match &outcome {
        Ok(synced) => info!(
            identity = %key,
            version_id = %synced.version_id,
            fingerprint = %synced.certificate.sha256_fingerprint,
            "synced"
        ),
        // The detail (AWS's own words, the policy's verdict) goes to the operator's log only.
        Err(failure) => warn!(
            identity = %key,
            reason = failure.reason(),
            message = %failure,
            detail = %failure.detail(),
            "sync failed"
        ),
    }
    if restarts_pending {
        // Waiting for siblings to settle, for a rollout slot, or to retry a refused patch.
        return Ok(Action::requeue(rotation::COALESCE_POLL));
    }

    lock(&context.state.api_errors).remove(&key);
    // Backoff follows what really happened, also when Ready did not change.
    let valid_in_place = transient.is_some();
    let attempted = match transient {
        Some(failure) => Err(failure),
        None => outcome,
    };
    if let Err(failure) = &attempted
        && failure.is_transient()
    {
        warn!(identity = %key, reason = failure.reason(), detail = %failure.detail(), "source unreachable; the Secret in place stays");
    }
    let failures = context.count_failure(&key, attempted.is_err());
    let schedule = requeue::Schedule {
        refresh,
        cadence: match context.settings.sweep_mode {
            SweepMode::Get => refresh,
            _ => refresh.min(context.settings.sweep_interval),
        },
        phase: requeue::refresh_phase(identity.uid().as_deref().unwrap_or(&name)),
        now_unix_ms: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
    };
    Ok(Action::requeue(requeue::after_sync(
        &schedule,
        &attempted,
        valid_in_place,
        failures,
        rand::random::<f64>(),
    )))
}
