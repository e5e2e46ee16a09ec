//! One reconcile of one identity: sync the Secret, decide the status, restart what uses it, run
//! the egress proxy, write status and Events, and say when to come back.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::conditions::{ConditionType, Outcome};
use crate::api::{MtlsIdentity, StoredIdentity, parse_duration};
use crate::restart::RestartReport;
use crate::source::fleet::SweepMode;

use super::context::{Context, DEFAULT_WARN_BEFORE, MIN_REFRESH, identity_key};
use super::error::ReconcileError;
use super::events::publish;
use super::sync::{self, SyncStep};
use super::{decide, egress, requeue, rotation, status, write};

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

async fn reconcile_inner(
    identity: Arc<MtlsIdentity>,
    context: &Context,
) -> Result<Action, ReconcileError> {
    let namespace = identity.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = identity.name_any();
    let key = identity_key(identity.as_ref());
    if context
        .memory
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
                    status::clear_condition(&mut status.conditions, ConditionType::Restarts);
                    report
                }
                Err(error) => {
                    let condition = match &error {
                        ReconcileError::InvalidStatus(problem) => status::failed_condition(
                            ConditionType::Restarts,
                            error.reason(),
                            format!("{problem}; restarts wait until it is corrected"),
                            identity.metadata.generation,
                            &now,
                        ),
                        _ => status::api_error_condition(
                            ConditionType::Restarts,
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
            context
                .metrics
                .record_restarts(Outcome::Triggered, report.triggered.len());
            context
                .metrics
                .record_restarts(Outcome::Failed, report.failed.len());
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
                ConditionType::Egress,
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
            .memory
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
            reason = failure.reason().as_str(),
            message = %failure,
            detail = %failure.detail(),
            "sync failed"
        ),
    }
    if restarts_pending {
        // Waiting for siblings to settle, for a rollout slot, or to retry a refused patch.
        return Ok(Action::requeue(rotation::COALESCE_POLL));
    }

    context.memory.update(&key, |memory| memory.api_errors = 0);
    // Backoff follows what really happened, also when Ready did not change.
    let valid_in_place = transient.is_some();
    let attempted = match transient {
        Some(failure) => Err(failure),
        None => outcome,
    };
    if let Err(failure) = &attempted
        && failure.is_transient()
    {
        warn!(identity = %key, reason = failure.reason().as_str(), detail = %failure.detail(), "source unreachable; the Secret in place stays");
    }
    let failures = context
        .memory
        .count_source_failure(&key, attempted.is_err());
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
