//! Restarts exactly the workloads that use a rotated Secret.
//!
//! The token written to a pod template is the certificate's fingerprint, under a key per identity, so
//! replaying a patch is a no-op and each rotation gives one rolling restart. A global cap bounds the
//! rollouts in progress: a mass rotation becomes a queue, not a storm. Decisions are in [`decide`].

pub mod cache;
pub mod decide;

use crate::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::Resource;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{NamespaceResourceScope, Selector};
use serde::de::DeserializeOwned;

use crate::api::{FIELD_MANAGER, RestartPolicy, RestartSpec, WorkloadKind};
use decide::RestartDecision;

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// What restarts need of a Deployment, StatefulSet or DaemonSet: one implementation per kind, and
/// everything else (get, list, patch, the restart decisions) written once over [`Workload`].
pub trait WorkloadResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: WorkloadKind;
    fn template(&self) -> Option<&PodTemplateSpec>;
    fn selector(&self) -> Option<&LabelSelector>;
    /// Whether a rollout is still in progress (the controller has not caught up, or not every
    /// replica runs the current template and is ready).
    fn rollout_in_progress(&self) -> bool;
    fn paused(&self) -> bool {
        false
    }
}

impl WorkloadResource for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
    fn selector(&self) -> Option<&LabelSelector> {
        self.spec.as_ref().map(|s| &s.selector)
    }
    fn rollout_in_progress(&self) -> bool {
        let want = self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        self.status.as_ref().is_none_or(|s| {
            s.observed_generation < self.metadata.generation
                || s.updated_replicas.unwrap_or(0) < want
                || s.ready_replicas.unwrap_or(0) < want
                || s.replicas.unwrap_or(0) > want
        })
    }
    fn paused(&self) -> bool {
        self.spec.as_ref().and_then(|s| s.paused) == Some(true)
    }
}

impl WorkloadResource for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
    fn selector(&self) -> Option<&LabelSelector> {
        self.spec.as_ref().map(|s| &s.selector)
    }
    fn rollout_in_progress(&self) -> bool {
        let want = self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        self.status.as_ref().is_none_or(|s| {
            s.observed_generation < self.metadata.generation
                || s.current_revision != s.update_revision
                || s.ready_replicas.unwrap_or(0) < want
        })
    }
}

impl WorkloadResource for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
    fn selector(&self) -> Option<&LabelSelector> {
        self.spec.as_ref().map(|s| &s.selector)
    }
    fn rollout_in_progress(&self) -> bool {
        self.status.as_ref().is_none_or(|s| {
            s.observed_generation < self.metadata.generation
                || s.updated_number_scheduled.unwrap_or(0) < s.desired_number_scheduled
                || s.number_ready < s.desired_number_scheduled
        })
    }
}

/// A workload of any of the three kinds, as restarts see it.
#[derive(Debug, Clone)]
pub struct Workload {
    kind: WorkloadKind,
    metadata: ObjectMeta,
    template: Option<PodTemplateSpec>,
    selector: Option<LabelSelector>,
    paused: bool,
    rollout_in_progress: bool,
}

impl<K: WorkloadResource> From<K> for Workload {
    fn from(resource: K) -> Self {
        Self {
            kind: K::KIND,
            template: resource.template().cloned(),
            selector: resource.selector().cloned(),
            paused: resource.paused(),
            rollout_in_progress: resource.rollout_in_progress(),
            metadata: resource.meta().clone(),
        }
    }
}

impl Workload {
    pub fn kind(&self) -> WorkloadKind {
        self.kind
    }

    pub fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    pub fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    pub fn reference(&self) -> WorkloadRef {
        WorkloadRef {
            kind: self.kind,
            name: self.name(),
        }
    }

    /// `Kind/name`, as status and Events show it.
    pub fn display(&self) -> String {
        self.reference().to_string()
    }

    pub fn managed_by_operator(&self) -> bool {
        self.metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(crate::api::MANAGED_BY_LABEL))
            .is_some_and(|value| value == crate::api::MANAGED_BY_VALUE)
    }

    pub fn uses_secret(&self, secret: &str) -> bool {
        self.template
            .as_ref()
            .and_then(|template| template.spec.as_ref())
            .is_some_and(|spec| decide::pod_uses_secret(spec, secret))
    }

    pub fn template_annotations(&self) -> Option<&BTreeMap<String, String>> {
        self.template
            .as_ref()
            .and_then(|template| template.metadata.as_ref())
            .and_then(|metadata| metadata.annotations.as_ref())
    }

    /// Whether `pod` belongs to this workload: its controller is the StatefulSet or DaemonSet itself,
    /// or, for a Deployment, one of its ReplicaSets (named `<deployment>-<pod-template-hash>`).
    pub fn owns_pod(&self, pod: &Pod) -> bool {
        let Some(controller) = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true))
        else {
            return false;
        };
        match self.kind {
            WorkloadKind::Deployment => {
                let hash = pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|labels| labels.get("pod-template-hash"));
                controller.kind == "ReplicaSet"
                    && hash.is_some_and(|hash| controller.name == format!("{}-{hash}", self.name()))
            }
            WorkloadKind::StatefulSet | WorkloadKind::DaemonSet => {
                Some(&controller.uid) == self.metadata.uid.as_ref()
            }
        }
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn rollout_in_progress(&self) -> bool {
        self.rollout_in_progress
    }

    /// Only what restarts read, for the cache: identity and age, the operator's own labels and
    /// annotations (on the workload and its pod template), the Secrets the pod template uses
    /// (volumes, env, envFrom) and the selector. The rest of a workload (images, probes, most of its
    /// metadata) is most of its size.
    pub fn compacted(self) -> Self {
        use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Volume};
        let ours = |map: Option<BTreeMap<String, String>>| {
            map.map(|map| {
                map.into_iter()
                    .filter(|(key, _)| key.starts_with(decide::TOKEN_PREFIX))
                    .collect::<BTreeMap<_, _>>()
            })
            .filter(|map| !map.is_empty())
        };
        let metadata = ObjectMeta {
            name: self.metadata.name,
            namespace: self.metadata.namespace,
            uid: self.metadata.uid,
            generation: self.metadata.generation,
            creation_timestamp: self.metadata.creation_timestamp,
            labels: self.metadata.labels.map(|labels| {
                labels
                    .into_iter()
                    .filter(|(key, _)| key == crate::api::MANAGED_BY_LABEL)
                    .collect()
            }),
            annotations: ours(self.metadata.annotations),
            ..ObjectMeta::default()
        };
        let secret_use = |container: Container| Container {
            name: container.name,
            env: container.env.map(|env| {
                env.into_iter()
                    .filter(|var| {
                        var.value_from
                            .as_ref()
                            .is_some_and(|from| from.secret_key_ref.is_some())
                    })
                    .map(|var| EnvVar { value: None, ..var })
                    .collect()
            }),
            env_from: container.env_from.map(|from| {
                from.into_iter()
                    .filter(|from| from.secret_ref.is_some())
                    .collect()
            }),
            ..Container::default()
        };
        let template = self.template.map(|template| PodTemplateSpec {
            metadata: template.metadata.map(|metadata| ObjectMeta {
                annotations: ours(metadata.annotations),
                ..ObjectMeta::default()
            }),
            spec: template.spec.map(|spec| PodSpec {
                volumes: spec.volumes.map(|volumes| {
                    volumes
                        .into_iter()
                        .filter(|volume| volume.secret.is_some() || volume.projected.is_some())
                        .map(|volume| Volume {
                            name: volume.name,
                            secret: volume.secret,
                            projected: volume.projected,
                            ..Volume::default()
                        })
                        .collect()
                }),
                containers: spec.containers.into_iter().map(secret_use).collect(),
                init_containers: spec
                    .init_containers
                    .map(|containers| containers.into_iter().map(secret_use).collect()),
                ..PodSpec::default()
            }),
        });
        Self {
            metadata,
            template,
            ..self
        }
    }
}

/// Every Deployment, StatefulSet and DaemonSet in `namespace`.
pub async fn list_workloads(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<Workload>, kube::Error> {
    async fn list<K: WorkloadResource>(
        client: &kube::Client,
        namespace: &str,
    ) -> Result<Vec<Workload>, kube::Error> {
        let items = Api::<K>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
            .items;
        Ok(items.into_iter().map(Workload::from).collect())
    }
    let mut all = list::<Deployment>(client, namespace).await?;
    all.extend(list::<StatefulSet>(client, namespace).await?);
    all.extend(list::<DaemonSet>(client, namespace).await?);
    Ok(all)
}

/// A workload by kind and name, as restart reports name it; shown as `Kind/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    pub name: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}/{}", self.kind, self.name)
    }
}

impl WorkloadRef {
    /// The kind as the API names it (`Deployment`, ...).
    pub fn kind_name(&self) -> String {
        format!("{:?}", self.kind)
    }
}

/// `a, b, c` of the references' `Kind/name`.
pub fn joined(workloads: &[WorkloadRef]) -> String {
    workloads
        .iter()
        .map(WorkloadRef::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refused patch as the tenant may see it (status, Events): the HTTP code and the API's fixed
/// reason word, never the API server's own text (which can name admission webhooks, policies or
/// other objects); that goes to the operator's log.
pub fn refusal(workload: &WorkloadRef, error: &kube::Error) -> String {
    tracing::warn!(workload = %workload, error = %error, "restart patch refused");
    match error {
        // The reason only when it is one of the API's CamelCase words (a webhook may put text
        // there).
        kube::Error::Api(status) => {
            let word = &status.reason;
            let is_word = !word.is_empty()
                && word.len() <= 40
                && word.chars().all(|c| c.is_ascii_alphanumeric());
            format!(
                "the API server refused the patch (HTTP {}, {})",
                status.code,
                if is_word {
                    word.as_str()
                } else {
                    "no reason given"
                }
            )
        }
        _ => "the API server could not be reached".to_string(),
    }
}

/// What happened to the workloads for one rotation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestartReport {
    /// Restarted (or, for `Annotate`, whose pods were annotated) now or earlier for this token.
    pub done: Vec<WorkloadRef>,
    /// Restarted by this call.
    pub triggered: Vec<WorkloadRef>,
    /// Waiting for a free rollout slot.
    pub pending: Vec<WorkloadRef>,
    /// Paused Deployments: their template carries the new token, which rolls out on resume.
    pub paused: Vec<WorkloadRef>,
    /// Named in `spec.restart.workloads` but absent.
    pub missing: Vec<WorkloadRef>,
    /// (workload, reason) for patches the API refused.
    pub failed: Vec<(WorkloadRef, String)>,
    /// Named in `spec.restart.workloads` but not using the Secret (and `force` not set).
    pub not_using: Vec<WorkloadRef>,
    /// Not handled because `Annotate` is not enabled on this operator.
    pub annotate_disabled: Vec<WorkloadRef>,
    /// Rollouts (any identity's, in this namespace) past the deadline: their slot was released.
    pub stalled: Vec<WorkloadRef>,
}

impl RestartReport {
    pub fn complete(&self) -> bool {
        self.pending.is_empty() && self.failed.is_empty()
    }
}

/// Bounds on rolling restarts, so a mass rotation is a queue and no namespace can hold the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartLimits {
    /// Rollouts in progress at once, across all namespaces.
    pub max_rollouts: usize,
    /// Rollouts in progress at once in one namespace: its fair share.
    pub max_per_namespace: usize,
    /// A rollout still in progress after this long gives its slot back (`RestartStalled`).
    pub deadline: Duration,
}

impl Default for RestartLimits {
    fn default() -> Self {
        Self {
            max_rollouts: 10,
            max_per_namespace: 3,
            deadline: Duration::from_secs(600),
        }
    }
}

/// The workloads one rotation concerns.
#[derive(Debug, Default)]
pub struct Affected {
    pub workloads: Vec<Workload>,
    /// Listed in `spec.restart.workloads` but absent.
    pub missing: Vec<WorkloadRef>,
    /// Listed, present, but not using the Secret (not restarted unless `force`).
    pub not_using: Vec<WorkloadRef>,
}

type WorkloadKey = (String, WorkloadKind, String);

/// How busy the rollout slots are, as seen by one namespace.
#[derive(Debug, Default)]
struct Slots {
    total: usize,
    in_namespace: usize,
    stalled: Vec<WorkloadRef>,
}

/// One identity's rotation, as restarts need it.
#[derive(Debug, Clone, Copy)]
pub struct RestartRequest<'a> {
    pub namespace: &'a str,
    pub identity_name: &'a str,
    pub policy: RestartPolicy,
    /// The new certificate's fingerprint.
    pub token: &'a str,
    /// When the rotation was written (UNIX seconds).
    pub rotated_at_unix: i64,
}

/// Shared by every reconcile: the cap on rollouts in progress and the rollouts this process started.
pub struct Restarter {
    client: kube::Client,
    limits: RestartLimits,
    allow_annotate: bool,
    /// Rollouts this process started, with when.
    in_flight: Mutex<HashMap<WorkloadKey, Instant>>,
    /// Reconciles run concurrently: counting the rollouts in progress and starting one must be one
    /// step, or several reconciles could each see a free slot.
    start_lock: tokio::sync::Mutex<()>,
    /// The served namespaces' workloads, kept by watches (`cache`).
    cache: std::sync::Arc<cache::WorkloadCache>,
}

impl Restarter {
    pub fn new(client: kube::Client, limits: RestartLimits, allow_annotate: bool) -> Self {
        Self {
            client,
            limits: RestartLimits {
                max_rollouts: limits.max_rollouts.max(1),
                max_per_namespace: limits.max_per_namespace.max(1),
                deadline: limits.deadline,
            },
            allow_annotate,
            in_flight: Mutex::new(HashMap::new()),
            start_lock: tokio::sync::Mutex::new(()),
            cache: std::sync::Arc::default(),
        }
    }

    /// The workload cache, for the controller to keep with its scope's watches.
    pub fn cache(&self) -> std::sync::Arc<cache::WorkloadCache> {
        self.cache.clone()
    }

    async fn get(
        &self,
        namespace: &str,
        kind: WorkloadKind,
        name: &str,
    ) -> Result<Option<Workload>, kube::Error> {
        async fn get<K: WorkloadResource>(
            client: &kube::Client,
            namespace: &str,
            name: &str,
        ) -> Result<Option<Workload>, kube::Error> {
            let api = Api::<K>::namespaced(client.clone(), namespace);
            Ok(api.get_opt(name).await?.map(Workload::from))
        }
        match kind {
            WorkloadKind::Deployment => get::<Deployment>(&self.client, namespace, name).await,
            WorkloadKind::StatefulSet => get::<StatefulSet>(&self.client, namespace, name).await,
            WorkloadKind::DaemonSet => get::<DaemonSet>(&self.client, namespace, name).await,
        }
    }

    /// The workloads a rotation concerns: the listed ones, or every Deployment, StatefulSet and
    /// DaemonSet in the namespace whose pod template uses `secret`. Also returns listed-but-missing.
    pub async fn affected(
        &self,
        namespace: &str,
        spec: &RestartSpec,
        secret: &str,
    ) -> Result<Affected, RestartError> {
        if !spec.workloads.is_empty() {
            let mut affected = Affected::default();
            for reference in &spec.workloads {
                match self.get(namespace, reference.kind, &reference.name).await? {
                    // A tenant names a workload, but the identity may only restart what uses its
                    // Secret: anything else in the namespace is not its to restart.
                    Some(workload) if !spec.force && !workload.uses_secret(secret) => {
                        affected.not_using.push(workload.reference());
                    }
                    Some(workload) => affected.workloads.push(workload),
                    None => affected.missing.push(WorkloadRef {
                        kind: reference.kind,
                        name: reference.name.clone(),
                    }),
                }
            }
            return Ok(affected);
        }
        // From the watches' cache when it covers the namespace: a pending rotation is reconciled
        // every few seconds, and listing every workload each time is the namespace's to pay, not
        // the API server's. What is patched is read afresh first (`apply`).
        let mut all = match self.cache.workloads_in(namespace) {
            Some(cached) => cached,
            None => list_workloads(&self.client, namespace).await?,
        };
        // The operator's own egress proxies reload their certificate: never restart them.
        all.retain(|workload| workload.uses_secret(secret) && !workload.managed_by_operator());
        Ok(Affected {
            workloads: all,
            ..Affected::default()
        })
    }

    /// Rollouts this process started that are still in progress, in all and in `namespace`. Finished
    /// ones are forgotten; ones past the deadline too, reported as stalled, so a workload that never
    /// becomes ready cannot hold a slot forever.
    async fn slots(&self, namespace: &str) -> Slots {
        let entries: Vec<(WorkloadKey, Instant)> = lock(&self.in_flight)
            .iter()
            .map(|(key, started)| (key.clone(), *started))
            .collect();
        let mut slots = Slots::default();
        for (key, started) in entries {
            let (workload_namespace, kind, name) = &key;
            let running = match self.get(workload_namespace, *kind, name).await {
                Ok(Some(workload)) => workload.rollout_in_progress(),
                Ok(None) => false,
                // Unknown: count it, so the cap errs on the side of fewer rollouts.
                Err(_) => true,
            };
            let overdue = started.elapsed() >= self.limits.deadline;
            if !running || overdue {
                lock(&self.in_flight).remove(&key);
                if running && workload_namespace == namespace {
                    slots.stalled.push(WorkloadRef {
                        kind: *kind,
                        name: name.clone(),
                    });
                }
                continue;
            }
            slots.total += 1;
            if workload_namespace == namespace {
                slots.in_namespace += 1;
            }
        }
        slots
    }

    /// Applies the request's policy for its token to `workloads`. `sibling_tokens(w)` gives the
    /// current tokens of the other identities whose Secrets `w` uses: they go into the same patch, so
    /// identities rotated together restart a workload once.
    pub async fn apply(
        &self,
        request: &RestartRequest<'_>,
        workloads: &[Workload],
        sibling_tokens: &(dyn Fn(&Workload) -> BTreeMap<String, String> + Sync),
    ) -> Result<RestartReport, kube::Error> {
        let RestartRequest {
            namespace,
            identity_name,
            policy,
            token,
            rotated_at_unix,
        } = *request;
        let key = decide::token_key(identity_name);
        let mut report = RestartReport::default();
        for workload in workloads {
            // A workload created after the rotation mounted the new Secret from its start.
            let rotated_since_created = workload
                .metadata()
                .creation_timestamp
                .as_ref()
                .is_none_or(|created| created.0.as_second() <= rotated_at_unix);
            let name = workload.reference();
            match policy {
                RestartPolicy::None => {}
                RestartPolicy::Rollout => {
                    let decision = decide::decide(
                        workload.metadata().annotations.as_ref(),
                        workload.template_annotations(),
                        &key,
                        token,
                        rotated_since_created,
                    );
                    match decision {
                        RestartDecision::UpToDate => report.done.push(name),
                        RestartDecision::OptedOut | RestartDecision::NotNeeded => {}
                        RestartDecision::Restart => {
                            // Paused: the token goes into the template now (no slot: nothing
                            // rolls yet), so the rollout happens when it is resumed, as Reloader
                            // does. Otherwise a rollout slot is needed first.
                            let paused = workload.paused();
                            let _slot = if paused {
                                None
                            } else {
                                let slot = self.start_lock.lock().await;
                                let slots = self.slots(namespace).await;
                                report.stalled.extend(slots.stalled);
                                if slots.total >= self.limits.max_rollouts
                                    || slots.in_namespace >= self.limits.max_per_namespace
                                {
                                    report.pending.push(name);
                                    continue;
                                }
                                Some(slot)
                            };
                            // An error fails the restart phase, as a failed listing would
                            // (status: KubernetesApiError).
                            let fresh = self.still_to_restart(
                                namespace,
                                workload,
                                &key,
                                token,
                                rotated_since_created,
                            );
                            let Some(current) = fresh.await? else {
                                report.done.push(name);
                                continue;
                            };
                            let mut tokens = sibling_tokens(&current);
                            tokens.insert(key.clone(), token.to_string());
                            let patched = if paused {
                                self.patch_template_untracked(namespace, &current, &tokens)
                                    .await
                            } else {
                                self.patch_template(namespace, &current, &tokens).await
                            };
                            match patched {
                                Ok(()) => {
                                    if paused {
                                        report.paused.push(name.clone());
                                    } else {
                                        report.triggered.push(name.clone());
                                    }
                                    report.done.push(name);
                                }
                                Err(error) => {
                                    let said = refusal(&name, &error);
                                    report.failed.push((name, said))
                                }
                            }
                        }
                    }
                }
                RestartPolicy::Annotate if !self.allow_annotate => {
                    report.annotate_disabled.push(name);
                }
                RestartPolicy::Annotate => {
                    match self.annotate_pods(namespace, workload, &key, token).await {
                        Ok(changed) => {
                            if changed {
                                report.triggered.push(name.clone());
                            }
                            report.done.push(name);
                        }
                        Err(error) => {
                            let said = refusal(&name, &error);
                            report.failed.push((name, said))
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// `workload` as the API server has it now, if it still needs this restart: the cache can lag
    /// behind the operator's own last patch, and a decision on it alone would restart (and report)
    /// a workload twice. `None`: deleted meanwhile, or no longer to restart (already carrying the
    /// token, or opted out). One GET per restart actually made, never per pending workload.
    async fn still_to_restart(
        &self,
        namespace: &str,
        workload: &Workload,
        key: &str,
        token: &str,
        rotated_since_created: bool,
    ) -> Result<Option<Workload>, kube::Error> {
        let current = self
            .get(namespace, workload.kind(), &workload.name())
            .await?;
        Ok(current.filter(|current| {
            decide::decide(
                current.metadata().annotations.as_ref(),
                current.template_annotations(),
                key,
                token,
                rotated_since_created,
            ) == RestartDecision::Restart
        }))
    }

    async fn patch_template(
        &self,
        namespace: &str,
        workload: &Workload,
        tokens: &BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        self.patch_template_untracked(namespace, workload, tokens)
            .await?;
        lock(&self.in_flight).insert(
            (namespace.to_string(), workload.kind(), workload.name()),
            Instant::now(),
        );
        Ok(())
    }

    /// The token patch alone, without holding a rollout slot.
    async fn patch_template_untracked(
        &self,
        namespace: &str,
        workload: &Workload,
        tokens: &BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        let patch = serde_json::json!({
            "spec": {"template": {"metadata": {"annotations": tokens}}}
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        async fn merge_patch<K: WorkloadResource>(
            client: &kube::Client,
            namespace: &str,
            name: &str,
            params: &PatchParams,
            patch: &serde_json::Value,
        ) -> Result<(), kube::Error> {
            Api::<K>::namespaced(client.clone(), namespace)
                .patch(name, params, &Patch::Merge(patch))
                .await?;
            Ok(())
        }
        let (client, name) = (&self.client, workload.name());
        match workload.kind() {
            WorkloadKind::Deployment => {
                merge_patch::<Deployment>(client, namespace, &name, &params, &patch).await
            }
            WorkloadKind::StatefulSet => {
                merge_patch::<StatefulSet>(client, namespace, &name, &params, &patch).await
            }
            WorkloadKind::DaemonSet => {
                merge_patch::<DaemonSet>(client, namespace, &name, &params, &patch).await
            }
        }
    }

    /// `Annotate`: the running Pods get the token (the kubelet then refreshes mounted Secret volumes
    /// promptly); no restart. Returns whether any Pod changed.
    async fn annotate_pods(
        &self,
        namespace: &str,
        workload: &Workload,
        key: &str,
        token: &str,
    ) -> Result<bool, kube::Error> {
        // The workload's whole selector (matchExpressions too); an empty or unreadable one selects
        // nothing here, never every Pod in the namespace.
        let Some(selector) = workload
            .selector
            .clone()
            .and_then(|selector| Selector::try_from(selector).ok())
            .filter(|selector| !selector.selects_all())
        else {
            return Ok(false);
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {key: token}}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let mut changed = false;
        for pod in pods
            .list(&ListParams::default().labels_from(&selector))
            .await?
            .items
            .into_iter()
            // Only the workload's own Pods, even if another workload's Pods match its labels.
            .filter(|pod| workload.owns_pod(pod))
        {
            let current = pod.metadata.annotations.as_ref().and_then(|a| a.get(key));
            if current.map(String::as_str) == Some(token) {
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            pods.patch(&name, &params, &Patch::Merge(&patch)).await?;
            changed = true;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_code_and_reason_word_never_the_servers_text() {
        let workload = WorkloadRef {
            kind: WorkloadKind::Deployment,
            name: "api".into(),
        };
        let status = |reason: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code: 403,
                reason: reason.into(),
                message:
                    "admission webhook \"policy.internal.example\" denied: team billing-admins"
                        .into(),
                ..Default::default()
            }))
        };
        let said = refusal(&workload, &status("Forbidden"));
        assert_eq!(
            said,
            "the API server refused the patch (HTTP 403, Forbidden)"
        );
        let said = refusal(&workload, &status("denied by team billing-admins"));
        assert_eq!(
            said,
            "the API server refused the patch (HTTP 403, no reason given)"
        );
        assert!(!said.contains("webhook"));
    }
}

#[cfg(test)]
mod compaction_tests {
    use super::*;

    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "api", "namespace": "team", "uid": "u-1", "generation": 3,
                "labels": {"app": "api", crate::api::MANAGED_BY_LABEL: "someone"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(10_000),
                    decide::OPT_OUT_ANNOTATION: "false"
                }
            },
            "spec": {
                "replicas": 2,
                "paused": true,
                "selector": {"matchLabels": {"app": "api"}},
                "template": {
                    "metadata": {
                        "labels": {"app": "api"},
                        "annotations": {"mtls-operator.io/cert.client": "t1", "other": "y".repeat(5_000)}
                    },
                    "spec": {
                        "volumes": [
                            {"name": "tls", "secret": {"secretName": "client-tls"}},
                            {"name": "both", "projected": {"sources": [{"secret": {"name": "projected-tls"}}]}},
                            {"name": "scratch", "emptyDir": {}}
                        ],
                        "initContainers": [{"name": "init", "image": "init:1",
                            "envFrom": [{"secretRef": {"name": "init-env"}}, {"configMapRef": {"name": "cm"}}]}],
                        "containers": [{"name": "app", "image": "app:1", "args": ["z".repeat(5_000)],
                            "env": [
                                {"name": "PLAIN", "value": "v"},
                                {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "env-tls", "key": "tls.key"}}}
                            ]}]
                    }
                }
            },
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 2}
        }))
        .unwrap_or_default()
    }

    #[test]
    fn the_cache_keeps_what_restarts_read_and_drops_the_rest() {
        let whole = Workload::from(deployment());
        let compact = whole.clone().compacted();
        for secret in [
            "client-tls",
            "projected-tls",
            "init-env",
            "env-tls",
            "cm",
            "other",
        ] {
            assert_eq!(
                compact.uses_secret(secret),
                whole.uses_secret(secret),
                "uses {secret}"
            );
        }
        assert!(
            compact.uses_secret("env-tls"),
            "the fixture is read as meant"
        );
        assert_eq!(
            compact
                .template_annotations()
                .and_then(|a| a.get("mtls-operator.io/cert.client")),
            Some(&"t1".to_string())
        );
        let key = decide::token_key("client");
        assert_eq!(
            decide::decide(
                compact.metadata().annotations.as_ref(),
                compact.template_annotations(),
                &key,
                "t2",
                true
            ),
            decide::decide(
                whole.metadata().annotations.as_ref(),
                whole.template_annotations(),
                &key,
                "t2",
                true
            ),
            "the opt-out annotation is kept"
        );
        assert_eq!(
            (compact.paused(), compact.rollout_in_progress()),
            (whole.paused(), whole.rollout_in_progress())
        );
        assert_eq!(compact.managed_by_operator(), whole.managed_by_operator());
        assert_eq!(compact.selector, whole.selector);
        assert_eq!(compact.metadata().uid, whole.metadata().uid);
        let size = |workload: &Workload| {
            serde_json::to_string(&(&workload.metadata, &workload.template))
                .map(|text| text.len())
                .unwrap_or_default()
        };
        assert!(
            size(&compact) * 20 < size(&whole),
            "compacted {} bytes of {}",
            size(&compact),
            size(&whole)
        );
    }
}
