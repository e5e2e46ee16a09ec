//! One reconcile of one identity: sync the Secret, decide the status, restart what uses it, run
//! the egress proxy, write status and Events, and say when to come back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::conditions::{Outcome, Reason};
use crate::api::{FIELD_MANAGER, MtlsIdentity, StoredIdentity};
use crate::source::fleet::SweepMode;

use super::context::{Context, Now, Parsed};
use super::decide::{SyncFailure, Synced};
use super::error::ReconcileError;
use super::events::publish;
use super::status::EventToEmit;
use super::sync::{self, SyncStep};
use super::{egress, plan, requeue, rotation, write};

/// The controller's entry point: the identity as the store keeps it, its status parsed back for
/// this one reconcile.
pub(super) async fn reconcile_stored(
    identity: Arc<StoredIdentity>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let identity = identity.expand().map_err(ReconcileError::InvalidStatus)?;
    reconcile(Arc::new(identity), context).await
}

pub(super) async fn reconcile(
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

/// One reconcile: gather (the sync), plan (pure), act on the plan (restarts, egress), apply
/// (metrics, status, Events), and say when to come back.
async fn reconcile_inner(
    identity: Arc<MtlsIdentity>,
    context: &Context,
) -> Result<Action, ReconcileError> {
    let parsed = Parsed::new(&identity)?;
    if context
        .memory
        .is_stale(&parsed.key, identity.resource_version().as_deref())
    {
        return Ok(Action::requeue(STALE_RETRY));
    }
    let now = Now::read();
    // A refresh request (the annotation) is honoured now, or waits for the one honoured last.
    let refresh = identity.pending_refresh();
    let refresh_wait = refresh
        .as_ref()
        .and_then(|_| context.memory.refresh_wait(&parsed.key, now.instant));
    let honour = refresh.filter(|_| refresh_wait.is_none());
    let outcome = match gather(&identity, &parsed, &now, honour.is_some(), context).await? {
        Gathered::Outcome(outcome) => *outcome,
        Gathered::ComeBack(after) => {
            return Ok(Action::requeue(
                refresh_wait.map_or(after, |wait| wait.min(after)),
            ));
        }
    };
    let previous = identity.status.as_ref();
    let mut plan = plan::plan(previous, &plan::Facts::of(&parsed), outcome, &now);
    if let Some(requested) = honour {
        context.memory.refresh_honoured(&parsed.key, now.instant);
        info!(identity = %parsed.key, requested = %requested, "refresh request honoured");
        plan::honour_refresh(&mut plan, requested, &now);
    }
    // Kubernetes errors after the Secret was written: returned once the status says so.
    let mut late = LateError::default();
    let restarts = restart_phase(&identity, &parsed, &mut plan, &now, &mut late, context).await;
    egress_phase(&identity, &parsed, &mut plan, &now, &mut late, context).await;
    apply(&identity, &parsed, &mut plan, restarts.events, context).await?;
    let renamed = write::remove_renamed_target(
        &identity,
        &parsed.namespace,
        &parsed.target,
        previous,
        &plan.outcome,
        context,
    );
    late.keep(renamed.await);
    late.into_result()?;
    log_outcome(&parsed, &plan);
    let next = if restarts.pending {
        // Waiting for siblings to settle, for a rollout slot, or to retry a refused patch.
        rotation::COALESCE_POLL
    } else {
        schedule(&parsed, plan, &now, context)
    };
    // A refresh request that came too soon after the last is honoured once that one's interval ends.
    Ok(Action::requeue(
        refresh_wait.map_or(next, |wait| wait.min(next)),
    ))
}

/// What the gathering phase gives the plan: an outcome to plan on, or when to come back.
enum Gathered {
    Outcome(Box<Result<Synced, SyncFailure>>),
    ComeBack(Duration),
}

/// The sync, read as what the plan needs: a fresh outcome, the one the status holds (nothing read:
/// restarts still pending, expiry, egress carry on from it), or a time to come back (reads
/// deferred, or a version already refused that only a change can cure).
async fn gather(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    now: &Now,
    refresh: bool,
    context: &Context,
) -> Result<Gathered, ReconcileError> {
    Ok(
        match sync::sync(identity, parsed, now, refresh, context).await? {
            SyncStep::Done(outcome) => Gathered::Outcome(outcome),
            SyncStep::Unchanged(Some(synced)) => Gathered::Outcome(Box::new(Ok(*synced))),
            SyncStep::Wait(wait) => {
                context.metrics.reads_deferred.inc();
                Gathered::ComeBack(wait)
            }
            SyncStep::Unchanged(None) => {
                let refresh = parsed.refresh_or_default();
                Gathered::ComeBack(refresh + refresh.mul_f64(rand::random::<f64>() * 0.1))
            }
        },
    )
}

/// The first Kubernetes error met after the Secret was written: the status write must not be
/// skipped for it, so it is kept and returned after.
#[derive(Default)]
struct LateError(Option<ReconcileError>);

impl LateError {
    fn keep(&mut self, result: Result<(), ReconcileError>) {
        if let Err(error) = result {
            self.0.get_or_insert(error);
        }
    }

    fn into_result(self) -> Result<(), ReconcileError> {
        self.0.map_or(Ok(()), Err)
    }
}

/// What the restart phase leaves to do: whether restarts are still pending, and the Events to
/// publish on the workloads.
struct RestartsActed {
    pending: bool,
    events: Vec<(ObjectReference, EventToEmit)>,
}

/// The restarts a rotation still owes, folded into the plan. A failure comes after the Secret was
/// written: it is recorded in status (a `Restarts` condition) and returned after the status
/// write, never allowed to skip it.
async fn restart_phase(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    plan: &mut plan::Plan,
    now: &Now,
    late: &mut LateError,
    context: &Context,
) -> RestartsActed {
    let rotation = match &plan.status.last_rotation {
        Some(rotation) if plan.restart_due => rotation.clone(),
        _ => {
            return RestartsActed {
                pending: false,
                events: Vec::new(),
            };
        }
    };
    let restarts = match rotation::restart_workloads(
        identity,
        &parsed.namespace,
        &parsed.target,
        &rotation,
        context,
    )
    .await
    {
        Ok(report) => plan::Restarts::Done(report),
        Err(ReconcileError::InvalidStatus(problem)) => {
            late.keep(Err(ReconcileError::InvalidStatus(problem.clone())));
            plan::Restarts::InvalidStatus(problem)
        }
        Err(error) => {
            late.keep(Err(error));
            plan::Restarts::ApiFailed
        }
    };
    let pending = plan::fold_restarts(plan, &restarts, now);
    let events = match &restarts {
        plan::Restarts::Done(report) => {
            context
                .metrics
                .record_restarts(Outcome::Triggered, report.triggered.len());
            context
                .metrics
                .record_restarts(Outcome::Failed, report.failed.len());
            let events = rotation::restart_events(identity, &parsed.namespace, report);
            context.memory.update(&parsed.key, |memory| {
                let (events, digest) =
                    rotation::unrepeated_restart_events(&rotation, events, memory.restart_warnings);
                memory.restart_warnings = digest;
                events
            })
        }
        _ => Vec::new(),
    };
    RestartsActed { pending, events }
}

/// The egress proxy's objects made as the plan's status says, the result folded into it.
async fn egress_phase(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    plan: &mut plan::Plan,
    now: &Now,
    late: &mut LateError,
    context: &Context,
) {
    match egress::reconcile_egress(identity, &parsed.namespace, &plan.status, context).await {
        Ok(egress) => plan::fold_egress(&mut plan.status, egress, now),
        Err(error) => {
            plan::fold_egress_failure(plan, now);
            late.keep(Err(error));
        }
    }
}

/// The one place that writes what the plan decided: metrics, the status (only if it changed),
/// then the Events.
async fn apply(
    identity: &MtlsIdentity,
    parsed: &Parsed,
    plan: &mut plan::Plan,
    restart_events: Vec<(ObjectReference, EventToEmit)>,
    context: &Context,
) -> Result<(), ReconcileError> {
    let previous = identity.status.as_ref();
    context.memory.if_present(&parsed.key, || {
        context.metrics.record_identity(
            &parsed.namespace,
            &parsed.name,
            previous,
            &plan.status,
            plan.attempt(),
            parsed.refresh_or_default(),
        )
    });
    if previous != Some(&plan.status) {
        let identities: Api<MtlsIdentity> =
            Api::namespaced(context.client.clone(), &parsed.namespace);
        let patch = serde_json::json!({ "status": plan.status });
        let written = identities
            .patch_status(&parsed.name, &status_params(), &Patch::Merge(&patch))
            .await?;
        context
            .memory
            .record_written(&parsed.key, written.resource_version().as_deref());
    }
    let identity_ref = identity.object_ref(&());
    for event in plan.events.drain(..) {
        let held_back = !event.warning
            && event.reason == Reason::Synced
            && !context.settings.synced_events.take(Instant::now());
        if held_back {
            context.metrics.synced_events_skipped.inc();
            continue;
        }
        publish(context, &identity_ref, event).await;
    }
    for (reference, event) in restart_events {
        publish(context, &reference, event).await;
    }
    Ok(())
}

/// Status writes under the operator's name (`managedFields` says who wrote the status).
fn status_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

fn log_outcome(parsed: &Parsed, plan: &plan::Plan) {
    let key = &parsed.key;
    match &plan.outcome {
        Ok(synced) => info!(
            identity = %key,
            version_id = %synced.version_id,
            fingerprint = %synced.certificate.sha256_fingerprint,
            "synced"
        ),
        // The detail (AWS's own words, the policy's verdict) goes to the operator's log only.
        Err(failure) => warn!(
            identity = %key,
            reason = failure.reason().as_str(),
            message = %failure,
            detail = %failure.detail(),
            "sync failed"
        ),
    }
    if let Some(failure) = &plan.transient {
        warn!(identity = %key, reason = failure.reason().as_str(), detail = %failure.detail(), "source unreachable; the Secret in place stays");
    }
}

/// When to look again: backoff follows what really happened (also when Ready did not change),
/// else the refresh schedule.
fn schedule(parsed: &Parsed, plan: plan::Plan, now: &Now, context: &Context) -> Duration {
    context
        .memory
        .update(&parsed.key, |memory| memory.api_errors = 0);
    let refresh = parsed.refresh_or_default();
    let valid_in_place = plan.transient.is_some();
    let attempted = match plan.transient {
        Some(failure) => Err(failure),
        None => plan.outcome,
    };
    let failures = context
        .memory
        .count_source_failure(&parsed.key, attempted.is_err());
    let schedule = requeue::Schedule {
        refresh,
        cadence: match context.settings.sweep_mode {
            SweepMode::Get => refresh,
            _ => refresh.min(context.settings.sweep_interval),
        },
        phase: requeue::refresh_phase(&parsed.uid),
        now_unix_ms: now.unix_ms,
    };
    requeue::after_sync(
        &schedule,
        &attempted,
        valid_in_place,
        failures,
        rand::random::<f64>(),
    )
}
