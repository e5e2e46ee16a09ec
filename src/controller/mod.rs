//! Reconciles MtlsIdentities: fetch, validate, then write the Secret with server-side apply under one
//! field manager, then status and Events. The decisions live in [`decide`]; this module does the I/O.

pub mod decide;
pub mod egress;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::RestartPolicy;
use crate::api::{
    FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MtlsIdentity, SourceFormat, parse_duration,
};
use crate::metrics::{IdentityLabels, Metrics, OutcomeLabels, SyncLabels};
use crate::pki;
use crate::restart::{RestartReport, RestartRequest, Restarter};
use crate::source::policy::SourcePolicy;
use crate::source::{FetchedSecret, SecretContent, SecretRef, SecretSource, VersionSelector};
use decide::{SyncFailure, Synced};

/// How long a rotation waits for sibling identities (sharing a workload) to sync before restarting.
const ROTATION_SETTLE: Duration = Duration::from_secs(3);
/// `spec.expiry.warnBefore` default: 30 days.
const DEFAULT_WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Errors talking to Kubernetes; the reconcile is retried.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("MtlsIdentity has no namespace")]
    NoNamespace,
}

impl ReconcileError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesApiError",
            Self::NoNamespace => "InvalidSpec",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch one namespace; all when `None`.
    pub namespace: Option<String>,
    pub policy: SourcePolicy,
    /// Cap on rolling restarts in progress at once, across all identities.
    pub max_rollouts: usize,
    /// Only identities with these labels (a label selector), to shard identities over several
    /// operators or to canary a new version; all when `None`.
    pub identity_selector: Option<String>,
    /// The image of operator-managed egress proxies; `None`: `spec.egress` is not acted on.
    pub egress_image: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            policy: SourcePolicy::default(),
            max_rollouts: 10,
            identity_selector: None,
            egress_image: None,
        }
    }
}

pub struct Context {
    pub client: kube::Client,
    /// Every identity the controller watches, for finding the siblings that share a workload.
    identities: Store<MtlsIdentity>,
    /// Asks the controller to reconcile an identity now.
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<MtlsIdentity>>,
    pub source: Arc<dyn SecretSource>,
    pub settings: Settings,
    recorder: Recorder,
    restarter: Restarter,
    metrics: Arc<Metrics>,
    /// Consecutive source failures per identity, for backoff; forgotten on success.
    failures: Mutex<HashMap<ObjectRef<MtlsIdentity>, u32>>,
}

impl Context {
    fn new(
        client: kube::Client,
        source: Arc<dyn SecretSource>,
        settings: Settings,
        identities: Store<MtlsIdentity>,
        trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<MtlsIdentity>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            restarter: Restarter::new(client.clone(), settings.max_rollouts),
            identities,
            trigger,
            metrics,
            client,
            source,
            settings,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn count_failure(&self, key: &ObjectRef<MtlsIdentity>, failed: bool) -> u32 {
        let mut failures = match self.failures.lock() {
            Ok(failures) => failures,
            Err(poisoned) => poisoned.into_inner(),
        };
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

/// Runs the controller until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    source: Arc<dyn SecretSource>,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (identities, secrets): (Api<MtlsIdentity>, Api<PartialObjectMeta<Secret>>) =
        match &settings.namespace {
            Some(namespace) => (
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client.clone(), namespace),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let (reader, writer) = reflector::store();
    // Only spec changes (generation) trigger a sync: our own status writes must not, or every
    // status write would cost another Secrets Manager call.
    let mut identity_config = watcher::Config::default();
    if let Some(selector) = &settings.identity_selector {
        identity_config = identity_config.labels(selector);
    }
    let identity_changes = watcher(identities, identity_config)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    // Our Secrets, metadata only and label-filtered: never every Secret in the cluster with its data.
    let owned_secrets = watcher(
        secrets,
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")),
    )
    .default_backoff()
    .touched_objects();
    let (trigger, triggered) = futures::channel::mpsc::unbounded();
    let context = Arc::new(Context::new(
        client,
        source,
        settings,
        reader.clone(),
        trigger,
        metrics,
    ));
    info!(
        namespace = context.settings.namespace.as_deref().unwrap_or("(all)"),
        policy = ?context.settings.policy.patterns(),
        "controller starting"
    );
    Controller::for_stream(identity_changes, reader)
        .owns_stream(owned_secrets)
        .reconcile_on(triggered)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(error = %error, "reconcile failed");
            }
        })
        .await;
    info!("controller stopped");
}

fn error_policy(
    identity: Arc<MtlsIdentity>,
    error: &ReconcileError,
    _context: Arc<Context>,
) -> Action {
    warn!(
        identity = %ObjectRef::from_obj(identity.as_ref()),
        reason = error.reason(),
        error = %error,
        "reconcile error; retrying"
    );
    Action::requeue(Duration::from_secs(10))
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

async fn reconcile_inner(
    identity: Arc<MtlsIdentity>,
    context: &Context,
) -> Result<Action, ReconcileError> {
    let namespace = identity.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = identity.name_any();
    let key = ObjectRef::from_obj(identity.as_ref());
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
    let target = identity.target_secret_name();

    let outcome = sync(&identity, &namespace, &target, &secrets, context).await?;

    let previous = identity.status.as_ref();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut status = decide::next_status(previous, identity.metadata.generation, &outcome, &now);
    let warn_before = identity
        .spec
        .expiry
        .as_ref()
        .and_then(|expiry| expiry.warn_before.as_deref())
        .and_then(parse_duration)
        .unwrap_or(DEFAULT_WARN_BEFORE);
    let expiring_event = decide::expiry(
        &mut status,
        &outcome,
        chrono::Utc::now().timestamp(),
        warn_before,
        &now,
    );
    let mut restarts_pending = false;
    if let Ok(synced) = &outcome {
        status.last_rotation = decide::rotation(previous, synced, &now);
        if let Some(rotation) = status.last_rotation.as_mut()
            && !rotation.complete
            && rotation.sha256_fingerprint == synced.certificate.sha256_fingerprint
        {
            let report =
                restart_workloads(&identity, &namespace, &target, rotation, context).await?;
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
            publish_restart_events(context, &identity, &namespace, &report).await;
        }
    }
    reconcile_egress(&identity, &namespace, &mut status, &now, context).await?;
    record_metrics(
        &context.metrics,
        &namespace,
        &name,
        previous,
        &status,
        &outcome,
    );
    if previous != Some(&status) {
        let identities: Api<MtlsIdentity> = Api::namespaced(context.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": status });
        identities
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for event in decide::event_for(previous, &outcome)
        .into_iter()
        .chain(expiring_event)
    {
        publish(context, &identity.object_ref(&()), event).await;
    }
    match &outcome {
        Ok(synced) => info!(
            identity = %key,
            version_id = %synced.version_id,
            fingerprint = %synced.certificate.sha256_fingerprint,
            "synced"
        ),
        Err(failure) => {
            warn!(identity = %key, reason = failure.reason(), message = %failure, "sync failed")
        }
    }
    if restarts_pending {
        // Waiting for siblings to settle, for a rollout slot, or to retry a refused patch.
        return Ok(Action::requeue(ROTATION_SETTLE));
    }

    let refresh =
        parse_duration(&identity.spec.refresh_interval).unwrap_or(Duration::from_secs(3600));
    let failures = context.count_failure(&key, outcome.is_err());
    Ok(Action::requeue(decide::requeue_after(
        refresh,
        &outcome,
        failures,
        rand::random::<f64>(),
    )))
}

/// Creates (or removes) the operator-managed egress proxy of `spec.egress`, and says how it went in
/// the `Egress` condition.
async fn reconcile_egress(
    identity: &MtlsIdentity,
    namespace: &str,
    status: &mut crate::api::MtlsIdentityStatus,
    now: &str,
    context: &Context,
) -> Result<(), ReconcileError> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    let name = identity.name_any();
    let uid = identity.uid().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(context.client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(context.client.clone(), namespace);
    let Some(spec) = &identity.spec.egress else {
        if status
            .conditions
            .iter()
            .any(|c| c.type_ == egress::EGRESS_CONDITION)
        {
            // `spec.egress` was removed: remove what it made (only if it is ours).
            if let Some(made) = deployments.get_opt(&name).await?
                && decide::is_owned_by(&made.metadata, &uid)
            {
                deployments.delete(&name, &Default::default()).await?;
            }
            if let Some(made) = services.get_opt(&name).await?
                && decide::is_owned_by(&made.metadata, &uid)
            {
                services.delete(&name, &Default::default()).await?;
            }
            status
                .conditions
                .retain(|c| c.type_ != egress::EGRESS_CONDITION);
        }
        return Ok(());
    };
    let (condition_status, reason, message) = match (&context.settings.egress_image, &status.secret_name) {
        (None, _) => (
            "False",
            "EgressDisabled",
            "this operator runs without --enable-egress (chart value egress.enabled=true, which also \
             grants the RBAC it needs): no proxy Deployment or Service is created"
                .to_string(),
        ),
        (Some(_), None) => (
            "False",
            "EgressWaiting",
            "waiting for the first good certificate before starting the proxy".to_string(),
        ),
        (Some(image), Some(secret)) => {
            let Some(owner) = identity.controller_owner_ref(&()) else {
                return Ok(());
            };
            let apply = PatchParams::apply(FIELD_MANAGER).force();
            let built = egress::deployment(&name, namespace, spec, secret, image, &owner)
                .and_then(|d| Ok((d, egress::service(&name, namespace, spec, &owner)?)));
            match built {
                Ok((deployment, service)) => {
                    deployments.patch(&name, &apply, &Patch::Apply(&deployment)).await?;
                    services.patch(&name, &apply, &Patch::Apply(&service)).await?;
                    (
                        "True",
                        "EgressReady",
                        format!(
                            "Deployment and Service {name} forward http://{name}.{namespace}:{} to {} \
                             with this identity's certificate",
                            spec.port, spec.upstream
                        ),
                    )
                }
                Err(error) => ("False", "EgressInvalid", format!("cannot build the proxy: {error}")),
            }
        }
    };
    decide::set_condition(
        &mut status.conditions,
        crate::api::Condition {
            type_: egress::EGRESS_CONDITION.to_string(),
            status: condition_status.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time: now.to_string(),
            observed_generation: identity.metadata.generation,
        },
    );
    Ok(())
}

/// Updates the per-identity gauges and the sync counters from the new status and outcome.
fn record_metrics(
    metrics: &Metrics,
    namespace: &str,
    name: &str,
    previous: Option<&crate::api::MtlsIdentityStatus>,
    status: &crate::api::MtlsIdentityStatus,
    outcome: &Result<Synced, SyncFailure>,
) {
    let labels = IdentityLabels {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let (sync_outcome, reason) = match outcome {
        Ok(_) => ("success", decide::REASON_SYNCED),
        Err(failure) => ("failure", failure.reason()),
    };
    metrics
        .syncs
        .get_or_create(&SyncLabels {
            outcome: sync_outcome.to_string(),
            reason: reason.to_string(),
        })
        .inc();
    metrics
        .identity_ready
        .get_or_create(&labels)
        .set(i64::from(outcome.is_ok()));
    // The gauges describe the certificate in the Secret, which a failed sync leaves in place.
    if let Some(certificate) = &status.certificate {
        let unix = |text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| time.timestamp())
                .ok()
        };
        if let Some(not_after) = unix(&certificate.not_after) {
            metrics
                .certificate_not_after
                .get_or_create(&labels)
                .set(not_after);
        }
        if let Some(not_before) = unix(&certificate.not_before) {
            metrics
                .certificate_not_before
                .get_or_create(&labels)
                .set(not_before);
        }
    }
    let new_rotation = status.last_rotation.as_ref().is_some_and(|rotation| {
        previous
            .and_then(|p| p.last_rotation.as_ref())
            .map(|r| &r.sha256_fingerprint)
            != Some(&rotation.sha256_fingerprint)
    });
    if new_rotation {
        metrics.rotations.inc();
    }
}

/// Restarts the workloads that use the target Secret for this rotation, per `spec.restart`.
async fn restart_workloads(
    identity: &MtlsIdentity,
    namespace: &str,
    target: &str,
    rotation: &crate::api::RotationStatus,
    context: &Context,
) -> Result<RestartReport, ReconcileError> {
    let spec = identity.spec.restart.clone().unwrap_or_default();
    if spec.policy == RestartPolicy::None {
        return Ok(RestartReport::default());
    }
    let (workloads, missing) = context
        .restarter
        .affected(namespace, &spec, target)
        .await
        .map_err(|crate::restart::RestartError::Kube(error)| ReconcileError::Kube(error))?;
    let rotated_at = chrono::DateTime::parse_from_rfc3339(&rotation.time)
        .map(|time| time.timestamp())
        .unwrap_or_else(|_| chrono::Utc::now().timestamp());
    let siblings: Vec<Arc<MtlsIdentity>> = context
        .identities
        .state()
        .into_iter()
        .filter(|other| {
            other.namespace().as_deref() == Some(namespace) && other.uid() != identity.uid()
        })
        .filter(|other| {
            let secret = other.target_secret_name();
            workloads
                .iter()
                .any(|workload| workload.uses_secret(&secret))
        })
        .collect();
    // Identities rotated together should restart a shared workload once: right after a rotation,
    // ask the siblings to look at their sources now, and wait a moment for them to sync.
    if chrono::Utc::now().timestamp() - rotated_at < ROTATION_SETTLE.as_secs() as i64
        && !siblings.is_empty()
    {
        for sibling in &siblings {
            let _ = context
                .trigger
                .unbounded_send(ObjectRef::from_obj(sibling.as_ref()));
        }
        return Ok(RestartReport {
            pending: workloads.iter().map(|w| w.display()).collect(),
            ..RestartReport::default()
        });
    }
    let sibling_tokens = |workload: &crate::restart::Workload| {
        siblings
            .iter()
            .filter(|sibling| workload.uses_secret(&sibling.target_secret_name()))
            .filter_map(|sibling| {
                let fingerprint = sibling
                    .status
                    .as_ref()?
                    .certificate
                    .as_ref()?
                    .sha256_fingerprint
                    .clone();
                Some((
                    crate::restart::decide::token_key(&sibling.name_any()),
                    fingerprint,
                ))
            })
            .collect()
    };
    let identity_name = identity.name_any();
    let request = RestartRequest {
        namespace,
        identity_name: &identity_name,
        policy: spec.policy,
        token: &rotation.sha256_fingerprint,
        rotated_at_unix: rotated_at,
    };
    let mut report = context
        .restarter
        .apply(&request, &workloads, &sibling_tokens)
        .await;
    report.missing = missing;
    Ok(report)
}

async fn publish_restart_events(
    context: &Context,
    identity: &MtlsIdentity,
    namespace: &str,
    report: &RestartReport,
) {
    let identity_ref = identity.object_ref(&());
    let warn = |reason: &str, note: String| decide::EventToEmit {
        warning: true,
        reason: reason.to_string(),
        note,
    };
    if !report.triggered.is_empty() {
        let event = decide::EventToEmit {
            warning: false,
            reason: "RestartTriggered".to_string(),
            note: format!(
                "restarted for the new certificate: {}",
                report.triggered.join(", ")
            ),
        };
        publish(context, &identity_ref, event).await;
        for workload in &report.triggered {
            if let Some((kind, name)) = workload.split_once('/') {
                let (api_version, kind) = (String::from("apps/v1"), kind.to_string());
                let reference = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some(api_version),
                    kind: Some(kind),
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                };
                let event = decide::EventToEmit {
                    warning: false,
                    reason: "RestartTriggered".to_string(),
                    note: format!(
                        "restarted by MtlsIdentity {} for its new certificate",
                        identity.name_any()
                    ),
                };
                publish(context, &reference, event).await;
            }
        }
    }
    for (workload, error) in &report.failed {
        publish(
            context,
            &identity_ref,
            warn("RestartFailed", format!("{workload}: {error}")),
        )
        .await;
    }
    if !report.paused.is_empty() {
        let note = format!(
            "paused, not restarted: {}; resume them to roll out the new certificate",
            report.paused.join(", ")
        );
        publish(context, &identity_ref, warn("RolloutPaused", note)).await;
    }
    if !report.missing.is_empty() {
        let note = format!(
            "listed in spec.restart.workloads but not found: {}",
            report.missing.join(", ")
        );
        publish(context, &identity_ref, warn("WorkloadNotFound", note)).await;
    }
}

async fn publish(
    context: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    event: decide::EventToEmit,
) {
    let event = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason,
        note: Some(event.note),
        action: "Sync".to_string(),
        secondary: None,
    };
    if let Err(error) = context.recorder.publish(&event, reference).await {
        warn!(error = %error, "could not publish an Event");
    }
}

/// Everything up to and including the Secret write. `Ok(Err(..))`: the sync failed for a reason the
/// user must see (status, Event); `Err(..)`: the Kubernetes API failed and the reconcile is retried.
async fn sync(
    identity: &MtlsIdentity,
    namespace: &str,
    target: &str,
    secrets: &Api<Secret>,
    context: &Context,
) -> Result<Result<Synced, SyncFailure>, ReconcileError> {
    let source = &identity.spec.source;
    for secret_id in std::iter::once(&source.secret_id).chain(source.ca_secret_id.iter()) {
        if !context.settings.policy.allows(namespace, secret_id) {
            return Ok(Err(SyncFailure::NotAllowed {
                secret_id: secret_id.clone(),
                namespace: namespace.to_string(),
                allowed: context.settings.policy.patterns().join(", "),
            }));
        }
    }
    if parse_duration(&identity.spec.refresh_interval).is_none() {
        return Ok(Err(SyncFailure::InvalidSpec(format!(
            "refreshInterval {:?} is not a duration such as 1h or 30s",
            identity.spec.refresh_interval
        ))));
    }

    let existing = secrets.get_opt(target).await?;
    let owner_uid = identity.uid().unwrap_or_default();
    if let Some(existing) = &existing
        && !decide::is_owned_by(&existing.metadata, &owner_uid)
    {
        return Ok(Err(SyncFailure::TargetConflict {
            secret: format!("{namespace}/{target}"),
        }));
    }

    let fetched = match fetch_material(identity, context).await {
        Ok(fetched) => fetched,
        Err(failure) => return Ok(Err(failure)),
    };
    let (main, material) = fetched;
    let now = chrono::Utc::now().timestamp();
    let validated = match pki::validate(&material, now) {
        Ok(validated) => validated,
        Err(error) => {
            return Ok(Err(SyncFailure::Material {
                context: format!("version {} of {}", main.version_id, source.secret_id),
                error,
            }));
        }
    };

    let Some(owner) = identity.controller_owner_ref(&()) else {
        return Ok(Err(SyncFailure::InvalidSpec(
            "the MtlsIdentity has no uid yet".to_string(),
        )));
    };
    let desired = decide::desired_secret(
        target,
        namespace,
        &identity.name_any(),
        owner,
        &main.version_id,
        &validated,
    );
    let up_to_date = existing
        .as_ref()
        .is_some_and(|existing| decide::secret_up_to_date(existing, &desired));
    if !up_to_date {
        secrets
            .patch(
                target,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await?;
    }
    Ok(Ok(Synced {
        arn: main.arn,
        version_id: main.version_id,
        certificate: decide::certificate_status(&validated),
        not_after_unix: validated.facts.not_after,
        secret_name: target.to_string(),
    }))
}

/// Fetches the source (and the separate CA secret, if any) and parses it into material.
async fn fetch_material(
    identity: &MtlsIdentity,
    context: &Context,
) -> Result<(FetchedSecret, pki::Material), SyncFailure> {
    let source = &identity.spec.source;
    let main = context
        .source
        .fetch(&SecretRef {
            secret_id: source.secret_id.clone(),
            region: source.region.clone(),
            version: source.version(),
        })
        .await?;
    let material_error =
        |error: pki::PkiError, of: &FetchedSecret, id: &str| SyncFailure::Material {
            context: format!("version {} of {id}", of.version_id),
            error,
        };
    let text =
        content_text(&main.content).map_err(|e| material_error(e, &main, &source.secret_id))?;
    let material = match source.format {
        SourceFormat::Json => {
            let fields = source.fields.clone().unwrap_or_default();
            let fields = pki::JsonFields {
                certificate: fields.certificate,
                private_key: fields.private_key,
                ca: fields.ca,
            };
            pki::parse_json(text, &fields)
        }
        SourceFormat::Pem => {
            let ca = match &source.ca_secret_id {
                Some(ca_id) => {
                    let ca = context
                        .source
                        .fetch(&SecretRef {
                            secret_id: ca_id.clone(),
                            region: source.region.clone(),
                            version: VersionSelector::Stage("AWSCURRENT".to_string()),
                        })
                        .await?;
                    let text = content_text(&ca.content)
                        .map_err(|e| material_error(e, &ca, ca_id))?
                        .to_string();
                    Some(text)
                }
                None => None,
            };
            pki::parse_pem_bundle(text, ca.as_deref())
        }
    }
    .map_err(|error| material_error(error, &main, &source.secret_id))?;
    Ok((main, material))
}

fn content_text(content: &SecretContent) -> Result<&str, pki::PkiError> {
    match content {
        SecretContent::Text(text) => Ok(text),
        SecretContent::Binary(bytes) => pki::decode_binary(bytes),
    }
}
