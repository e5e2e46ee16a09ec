//! Runs the controller: the watches (identities, our Secrets, password Secrets), the triggers from
//! the version index, one controller per watched scope, and the error policy.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MtlsIdentity, StoredIdentity};
use crate::metrics::Metrics;
use crate::restart::Restarter;
use crate::source::SecretSource;
use crate::source::fleet::Fleet;

use super::context::{Context, EgressStores, Memory, Settings, identity_key};
use super::error::ReconcileError;
use super::reconcile::reconcile_stored;
use super::requeue;
use crate::fair::FairAdmission;

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
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let Shared {
        client,
        source,
        settings,
        metrics,
        restarter,
        fleet,
    } = shared;
    let identities = scoped::<StoredIdentity>(&client, &namespace);
    let secrets = scoped::<PartialObjectMeta<Secret>>(&client, &namespace);
    let (reader, writer) = reflector::store();
    let memory = Arc::new(Memory::new(
        Some(reader.clone()),
        Some(metrics.identities_remembered.clone()),
    ));
    let mut identity_config = watcher::Config::default().page_size(IDENTITY_LIST_PAGE);
    if let Some(selector) = &settings.identity_selector {
        identity_config = identity_config.labels(selector);
    }
    let forget = {
        let (memory, metrics, fleet) = (memory.clone(), metrics.clone(), fleet.clone());
        let (store, scope) = (reader.clone(), namespace.clone());
        move |event: &watcher::Event<StoredIdentity>| match event {
            watcher::Event::Delete(identity) => {
                let key = identity_key(identity);
                let namespace = identity.namespace().unwrap_or_default();
                memory.forget(&key, || {
                    fleet.unregister(&(namespace.clone(), key.name.clone()));
                    metrics.forget_identity(&namespace, &key.name);
                });
            }
            // A re-list replaced the store: identities deleted while the watch was disconnected
            // get no `Delete`, so whatever the store no longer holds is forgotten here.
            watcher::Event::InitDone => {
                let keep = |identity_namespace: &str, name: &str| {
                    scope
                        .as_ref()
                        .is_some_and(|scope| scope != identity_namespace)
                        || {
                            let mut key = ObjectRef::<StoredIdentity>::new(name);
                            key.namespace = Some(identity_namespace.to_string());
                            store.get(&key).is_some()
                        }
                };
                let (mut unregistered, mut series) = (0, 0);
                let pruned = memory.prune(|| {
                    unregistered =
                        fleet.retain_identities(|(namespace, name)| keep(namespace, name));
                    series = metrics.retain_identities(keep);
                });
                if pruned + unregistered + series > 0 {
                    info!(
                        memory = pruned,
                        index = unregistered,
                        metric_series = series,
                        "forgot identities deleted while the watch was disconnected"
                    );
                }
            }
            _ => {}
        }
    };
    let identity_changes = watcher(identities, identity_config)
        .default_backoff()
        // managedFields are most of an object's size, and `kubectl apply` keeps a whole copy of the
        // object in an annotation: neither is read here, so neither is kept in memory.
        // Tenants' own labels and annotations are not read either (the identity selector is
        // applied by the API server): only the operator's own keys are kept, so padding an
        // identity's metadata costs the operator nothing for good.
        .modify(|identity| {
            identity.managed_fields_mut().clear();
            identity.labels_mut().retain(|key, _| is_ours(key));
            identity.annotations_mut().retain(|key, _| is_ours(key));
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
            let memory = memory.clone();
            move |identity| std::future::ready(memory.spec_or_refresh_changed(identity))
        });
    // Our Secrets, metadata only and label-filtered: never every Secret in the cluster with its data.
    let owned_secrets = watcher(
        secrets.clone(),
        watcher::Config::default()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
            .page_size(SECRET_LIST_PAGE),
    )
    .default_backoff()
    .touched_objects()
    // Our own write of a Secret comes back through this watch: not a change to act on (see
    // `Memory::is_own_secret_write`). Checked for up to one event per running reconcile at once,
    // in order, so events waiting for their writes' answers wait together, not one after another.
    .map_ok({
        let memory = memory.clone();
        move |secret| {
            let (memory, own) = (memory.clone(), own_write_key(&secret));
            async move {
                let ours = match own {
                    Some((key, version)) => {
                        memory.is_own_secret_write(&key, version.as_deref()).await
                    }
                    None => false,
                };
                Ok((secret, ours))
            }
        }
    })
    .try_buffered(usize::from(settings.max_concurrent_reconciles).max(1))
    .try_filter_map(|(secret, ours)| std::future::ready(Ok((!ours).then_some(secret))));
    // Keystore password Secrets are the tenants' own, so not label-selected: every Secret that is
    // not ours (another manager's label included), metadata only. An edit reconciles the identities whose keystore names it, and they
    // render the keystore again under the new password (see `sync`).
    let password_secrets = watcher(
        secrets,
        // Small pages: a tenant can pad its Secrets' annotations (256 KiB each), and a page is
        // held whole while it is read. Nothing is kept of them after the event.
        watcher::Config::default()
            // Not ours: without the label, or with another manager's (Helm's, Argo's).
            .labels(&format!("{MANAGED_BY_LABEL}!={MANAGED_BY_VALUE}"))
            .page_size(SECRET_LIST_PAGE),
    )
    .default_backoff()
    .touched_objects();
    // With egress on, the operator's own proxy objects, metadata only and label-selected: a steady
    // reconcile compares against them instead of asking the API server (see `egress`). They trigger
    // nothing: a change is repaired at the identity's next reconcile, as before.
    let egress = settings.egress_image.as_ref().map(|_| {
        let (deployments, deployments_writer) = reflector::store();
        let (services, services_writer) = reflector::store();
        let (policies, policies_writer) = reflector::store();
        let stores = EgressStores {
            deployments,
            services,
            policies,
        };
        let streams = (
            our_objects::<Deployment>(&client, &namespace, deployments_writer),
            our_objects::<Service>(&client, &namespace, services_writer),
            our_objects::<NetworkPolicy>(&client, &namespace, policies_writer),
        );
        (stores, streams)
    });
    let (egress_objects, egress_streams) = match egress {
        Some((stores, streams)) => (Some(stores), Some(streams)),
        None => (None, None),
    };
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
    // The workloads restarts look for, kept while this scope's controller runs.
    let workload_watch = {
        let (cache, client, namespace) = (restarter.cache(), client.clone(), namespace.clone());
        tokio::spawn(async move { cache.watch(client, namespace).await })
    };
    let (trigger, triggered) = futures::channel::mpsc::unbounded();
    // The sweep asks for the identities of a changed secret (those in this scope).
    let notify_trigger = trigger.clone();
    fleet.subscribe(Arc::new(move |(identity_namespace, name)| {
        if namespace.as_ref().is_none_or(|n| n == identity_namespace) {
            let _ = notify_trigger.unbounded_send(ObjectRef::new(name).within(identity_namespace));
        }
    }));
    // Fair admission: kube-runtime's queue is first come, first served (one namespace's backlog
    // would delay every other's), so at most `--max-concurrent-reconciles` reconciles run, taken
    // from the namespaces' queues in turn. A reconcile that finds no permit is parked by key and
    // returns at once; its turn comes back through `reconcile_on`. kube-runtime thus holds the
    // running reconciles and the parked ones passing through (its slot map never shrinks, and
    // held every due identity when it ran them all at once).
    let permits = settings.max_concurrent_reconciles;
    let admission = FairAdmission::new(usize::from(permits), {
        let trigger = trigger.clone();
        move |identity| {
            let _ = trigger.unbounded_send(identity);
        }
    })
    .counted_in(metrics.reconciles_waiting.clone());
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
        memory,
        egress_objects,
    });
    // Room for the running reconciles and as many parked ones passing through, so a woken
    // identity is never held behind a running one.
    let config =
        kube::runtime::controller::Config::default().concurrency(permits.max(1).saturating_mul(2));
    let mut controller = Controller::for_stream(identity_changes, reader)
        .with_config(config)
        .owns_stream(owned_secrets)
        .watches_stream(password_secrets, named_by);
    if let Some((deployments, services, policies)) = egress_streams {
        controller = controller
            .watches_stream(deployments, |_| nothing())
            .watches_stream(services, |_| nothing())
            .watches_stream(policies, |_| nothing());
    }
    let abandoned = admission.clone();
    controller
        .reconcile_on(triggered)
        .graceful_shutdown_on(shutdown)
        .run(
            move |identity, context| admitted(identity, context, admission.clone()),
            error_policy,
            context,
        )
        .for_each(move |result| {
            match result {
                // Woken after it was deleted (or left the selector): its permit goes on.
                Err(controller::Error::ObjectNotFound(gone)) => {
                    abandoned.abandon(&admission_key(&gone.name, gone.namespace.as_deref()));
                }
                Err(error) => warn!(error = %error, "reconcile failed"),
                Ok(_) => {}
            }
            std::future::ready(())
        })
        .await;
    workload_watch.abort();
}

/// One reconcile, if its namespace's turn gives it a permit; otherwise it is parked and woken
/// (through `reconcile_on`) when its turn comes, reading the identity afresh then.
async fn admitted(
    identity: Arc<StoredIdentity>,
    context: Arc<Context>,
    admission: FairAdmission<String, ObjectRef<StoredIdentity>>,
) -> Result<Action, ReconcileError> {
    let namespace = identity.namespace();
    let key = admission_key(&identity.name_any(), namespace.as_deref());
    let Some(_permit) = admission.admit(namespace.unwrap_or_default(), key) else {
        return Ok(Action::await_change());
    };
    Box::pin(reconcile_stored(identity, context)).await
}

/// The key an identity is parked and woken by: name and namespace only (no resourceVersion or
/// uid kept while it waits).
fn admission_key(name: &str, namespace: Option<&str>) -> ObjectRef<StoredIdentity> {
    let key = ObjectRef::new(name);
    match namespace {
        Some(namespace) => key.within(namespace),
        None => key,
    }
}

/// The operator's own objects of kind `K` in the scope (label-selected), metadata only, kept in
/// `writer`'s store.
fn our_objects<K>(
    client: &kube::Client,
    namespace: &Option<String>,
    writer: reflector::store::Writer<PartialObjectMeta<K>>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let ours = watcher::Config::default()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
        .page_size(SECRET_LIST_PAGE);
    watcher(scoped::<PartialObjectMeta<K>>(client, namespace), ours)
        .default_backoff()
        // The store is read for ownership, generation and resourceVersion only (`change_token`):
        // labels and annotations, which a tenant can pad, are not kept.
        .modify(|object| {
            object.metadata.managed_fields = None;
            object.metadata.labels = None;
            object.metadata.annotations = None;
        })
        .reflect(writer)
        .touched_objects()
}

/// Objects per page when a watch lists identities: each may be up to the API server's object size
/// limit, and a page is held whole while it is read.
const IDENTITY_LIST_PAGE: u32 = 100;
/// Objects per page when a watch lists Secrets (or the egress objects) as metadata: a tenant can
/// pad each one's annotations to 256 KiB, so a page of the default 500 could be 125 MiB.
const SECRET_LIST_PAGE: u32 = 50;

/// Whether a label or annotation key is the operator's own (`mtls-operator.io/...`).
fn is_ours(key: &str) -> bool {
    key.split_once('/').is_some_and(|(prefix, _)| {
        prefix == "mtls-operator.io" || prefix.ends_with(".mtls-operator.io")
    })
}

/// The identity that owns `secret` (a watch event of one of our Secrets) and the Secret's
/// resourceVersion, to tell our own writes from others' changes.
fn own_write_key(
    secret: &PartialObjectMeta<Secret>,
) -> Option<(ObjectRef<MtlsIdentity>, Option<String>)> {
    let owner = secret
        .owner_references()
        .iter()
        .find(|owner| owner.controller == Some(true) && owner.kind == MtlsIdentity::kind(&()))?;
    let namespace = secret.namespace().unwrap_or_default();
    Some((
        ObjectRef::new(&owner.name).within(&namespace),
        secret.resource_version(),
    ))
}

/// A watch that triggers no reconcile (kept only for its store).
fn nothing() -> std::iter::Empty<ObjectRef<StoredIdentity>> {
    std::iter::empty()
}

/// An API for `K` in the scope: one namespace, or all.
fn scoped<K>(client: &kube::Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Kubernetes API errors: retried with exponential backoff per identity (5 s doubling, up to 5 min,
/// with jitter), reset by the next reconcile that succeeds.
fn error_policy(
    identity: Arc<StoredIdentity>,
    error: &ReconcileError,
    context: Arc<Context>,
) -> Action {
    let key = identity_key(identity.as_ref());
    let attempts = context.memory.update(&key, |memory| {
        memory.api_errors = memory.api_errors.saturating_add(1);
        memory.api_errors
    });
    let backoff = requeue::api_error_backoff(attempts, rand::random::<f64>());
    warn!(
        identity = %key,
        reason = error.reason().as_str(),
        error = %error,
        attempts,
        retry_in = ?backoff,
        "reconcile error; retrying"
    );
    Action::requeue(backoff)
}
