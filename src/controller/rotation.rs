//! Restarts after a rotation: which workloads, when (sibling identities that share a workload are
//! waited for, so it rolls once), and the Events that say what happened.
//!
//! Coalescing is decided from state, not from a timer: a workload that mounts the Secrets of
//! several identities is restarted once each sibling's Secret holds the version the version index
//! expects for its source (confirmed by a sweep after this rotation began, asked for at once, so a
//! sibling rotated at the same time is seen; no AWS call is made here), or after [`COALESCE_LIMIT`]. The restart tokens of all of
//! them go into that one patch, read from the Secrets as they are then; a sibling that syncs later
//! finds its token already in place and restarts nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::warn;

use crate::api::{
    FINGERPRINT_ANNOTATION, MtlsIdentity, RestartPolicy, RotationStatus, StoredIdentity,
    VERSION_ID_ANNOTATION,
};
use crate::restart::{RestartReport, RestartRequest, Workload};

use crate::api::conditions::Reason;

use super::context::{Context, identity_key};
use super::decide;
use super::error::ReconcileError;
use super::status;

/// How often a rotation waiting for its siblings looks again.
pub const COALESCE_POLL: Duration = Duration::from_secs(2);
/// The longest a rotation waits for siblings to sync before restarting a shared workload anyway
/// (a sibling that is throttled, backing off, or failing): long enough for a slow read, short
/// enough that a stuck sibling does not hold a rotation back.
pub const COALESCE_LIMIT: Duration = Duration::from_secs(60);

/// Where a sibling identity stands, for a restart of a workload it shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sibling {
    /// Its Secret holds what it should (or nothing will change soon); its token is the
    /// certificate fingerprint the Secret carries, if any.
    Settled(Option<String>),
    /// Its Secret does not yet hold the version its source has: a restart now would roll again
    /// once it syncs.
    Syncing,
}

/// A sibling's state from the version the index expects for its source, the version it last
/// refused (bad material: it will not sync), and its Secret's annotations (`None`: no Secret).
pub fn sibling(
    expected: Option<&str>,
    refused: Option<&str>,
    secret_annotations: Option<&BTreeMap<String, String>>,
) -> Sibling {
    let carried = secret_annotations.and_then(|a| a.get(VERSION_ID_ANNOTATION));
    let fingerprint = secret_annotations
        .and_then(|a| a.get(FINGERPRINT_ANNOTATION))
        .cloned();
    match expected {
        None => Sibling::Settled(fingerprint),
        Some(expected) if carried.is_some_and(|carried| carried == expected) => {
            Sibling::Settled(fingerprint)
        }
        Some(expected) if refused == Some(expected) => Sibling::Settled(fingerprint),
        Some(_) => Sibling::Syncing,
    }
}

/// Whether to restart now: when every sibling is settled, or the wait reached [`COALESCE_LIMIT`].
pub fn restart_now(siblings: &[Sibling], waited: Duration) -> bool {
    waited >= COALESCE_LIMIT || siblings.iter().all(|s| matches!(s, Sibling::Settled(_)))
}

/// Restarts the workloads that use the target Secret for this rotation, per `spec.restart`.
pub(super) async fn restart_workloads(
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
    let rotated_at = chrono::DateTime::parse_from_rfc3339(&rotation.time)
        .map(|time| time.timestamp())
        .map_err(|_| {
            ReconcileError::InvalidStatus(format!(
                "status.lastRotation.time {:?} is not an RFC 3339 time",
                rotation.time
            ))
        })?;
    let affected = context
        .restarter
        .affected(namespace, &spec, target)
        .await
        .map_err(|crate::restart::RestartError::Kube(error)| ReconcileError::Kube(error))?;
    let workloads = affected.workloads;
    let siblings: Vec<Arc<StoredIdentity>> = context
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
    // Each sibling's token is what its Secret holds now: the workload mounts exactly that.
    let mut tokens_by_secret: BTreeMap<String, (String, String)> = BTreeMap::new();
    if !siblings.is_empty() {
        let (waited, first_look) = coalescing_since(context, identity, rotation);
        let sources: Vec<_> = siblings
            .iter()
            .map(|sibling| sibling_source(sibling, namespace, context))
            .collect();
        // A sibling rotated at the same time may not have been swept yet: the sweep checks its
        // version next (batched with whatever else is due), and until it has, the sibling counts as
        // syncing. The restart phase itself makes no Secrets Manager call.
        let since = Instant::now()
            .checked_sub(waited)
            .unwrap_or_else(Instant::now);
        if first_look {
            context.fleet.sweep_soon(sources.iter().flatten());
        }
        let secrets: Api<Secret> = Api::namespaced(context.client.clone(), namespace);
        let mut states = Vec::with_capacity(siblings.len());
        for (sibling, source) in siblings.iter().zip(&sources) {
            let secret_name = sibling.target_secret_name();
            let annotations = secrets
                .get_metadata_opt(&secret_name)
                .await?
                .and_then(|meta| meta.metadata.annotations);
            let expected = source
                .as_ref()
                .and_then(|secret| context.fleet.expected_version(secret));
            let refused = context
                .memory
                .read(&identity_key(sibling.as_ref()), |memory| {
                    memory.known_bad.clone()
                });
            let unconfirmed = source
                .as_ref()
                .is_some_and(|secret| !context.fleet.confirmed_since(secret, since));
            let state = if unconfirmed {
                Sibling::Syncing
            } else {
                self::sibling(
                    expected.as_deref(),
                    refused.as_deref(),
                    annotations.as_ref(),
                )
            };
            if let Sibling::Settled(Some(fingerprint)) = &state {
                tokens_by_secret.insert(
                    secret_name,
                    (
                        crate::restart::decide::token_key(&sibling.name_any()),
                        fingerprint.clone(),
                    ),
                );
            }
            states.push(state);
        }
        let syncing = || {
            siblings
                .iter()
                .zip(&states)
                .filter(|(_, state)| **state == Sibling::Syncing)
                .map(|(sibling, _)| sibling)
        };
        if !restart_now(&states, waited) {
            if first_look {
                for sibling in syncing() {
                    let _ = context
                        .trigger
                        .unbounded_send(ObjectRef::from_obj(sibling.as_ref()));
                }
            }
            return Ok(RestartReport {
                pending: workloads.iter().map(Workload::reference).collect(),
                missing: affected.missing,
                not_using: affected.not_using,
                ..RestartReport::default()
            });
        }
        let late: Vec<String> = syncing().map(|sibling| sibling.name_any()).collect();
        if !late.is_empty() {
            warn!(
                identity = %identity.name_any(),
                namespace,
                siblings = ?late,
                "siblings sharing a workload did not sync within the coalescing limit: restarting \
                 without them (they restart it again when they sync)"
            );
        }
    }
    let sibling_tokens = |workload: &Workload| {
        tokens_by_secret
            .iter()
            .filter(|(secret, _)| workload.uses_secret(secret))
            .map(|(_, token)| token.clone())
            .collect()
    };
    let identity_name = identity.name_any();
    let request = RestartRequest {
        namespace,
        identity_name: &identity_name,
        policy: spec.policy,
        token: rotation
            .restart_token
            .as_deref()
            .unwrap_or(&rotation.sha256_fingerprint),
        rotated_at_unix: rotated_at,
    };
    let mut report = context
        .restarter
        .apply(&request, &workloads, &sibling_tokens)
        .await
        .map_err(ReconcileError::Kube)?;
    report.missing = affected.missing;
    report.not_using = affected.not_using;
    Ok(report)
}

/// How long this rotation has waited for its siblings, and whether this is its first look.
fn coalescing_since(
    context: &Context,
    identity: &MtlsIdentity,
    rotation: &crate::api::RotationStatus,
) -> (Duration, bool) {
    context.memory.update(&identity_key(identity), |memory| {
        match memory.coalescing.as_deref() {
            Some((fingerprint, since)) if *fingerprint == rotation.sha256_fingerprint => {
                (since.elapsed(), false)
            }
            _ => {
                memory.coalescing = Some(Box::new((
                    rotation.sha256_fingerprint.clone(),
                    Instant::now(),
                )));
                (Duration::ZERO, true)
            }
        }
    })
}

/// A sibling's certificate source, if its spec is valid and allowed (else it never syncs).
fn sibling_source(
    sibling: &StoredIdentity,
    namespace: &str,
    context: &Context,
) -> Option<crate::source::SecretRef> {
    decide::check_source(
        &sibling.expand().ok()?.spec.source,
        namespace,
        &context.settings.policy,
        context.settings.default_region.as_deref(),
    )
    .ok()
    .map(|(main, _)| main.request)
}

/// The Events a restart report deserves: on the identity, and a `RestartTriggered` on each
/// workload restarted. Pure; the reconcile publishes them with the rest.
pub(super) fn restart_events(
    identity: &MtlsIdentity,
    namespace: &str,
    report: &RestartReport,
) -> Vec<(ObjectReference, status::EventToEmit)> {
    let identity_ref = identity.object_ref(&());
    let mut events = Vec::new();
    let warn = |reason: Reason, note: String| status::EventToEmit {
        warning: true,
        reason,
        note,
    };
    if !report.triggered.is_empty() {
        let event = status::EventToEmit {
            warning: false,
            reason: Reason::RestartTriggered,
            note: format!(
                "restarted for the new certificate: {}",
                crate::restart::joined(&report.triggered)
            ),
        };
        events.push((identity_ref.clone(), event));
        for workload in &report.triggered {
            {
                let reference = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some("apps/v1".to_string()),
                    kind: Some(workload.kind_name()),
                    name: Some(workload.name.clone()),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                };
                let event = status::EventToEmit {
                    warning: false,
                    reason: Reason::RestartTriggered,
                    note: format!(
                        "restarted by MtlsIdentity {} for its new certificate",
                        identity.name_any()
                    ),
                };
                events.push((reference, event));
            }
        }
    }
    for (workload, error) in &report.failed {
        events.push((
            identity_ref.clone(),
            warn(Reason::RestartFailed, format!("{workload}: {error}")),
        ));
    }
    if !report.paused.is_empty() {
        let note = format!(
            "paused: {}; the new certificate's token is in the pod template and rolls out when \
             the Deployment is resumed",
            crate::restart::joined(&report.paused)
        );
        events.push((identity_ref.clone(), warn(Reason::RolloutPaused, note)));
    }
    if !report.missing.is_empty() {
        let note = format!(
            "listed in spec.restart.workloads but not found: {}",
            crate::restart::joined(&report.missing)
        );
        events.push((identity_ref.clone(), warn(Reason::WorkloadNotFound, note)));
    }
    if !report.not_using.is_empty() {
        let note = format!(
            "listed in spec.restart.workloads but their pod template does not use Secret {}, so they \
             were not restarted: {} (set spec.restart.force: true to restart them anyway)",
            identity.target_secret_name(),
            crate::restart::joined(&report.not_using)
        );
        events.push((
            identity_ref.clone(),
            warn(Reason::WorkloadNotUsingSecret, note),
        ));
    }
    if !report.annotate_disabled.is_empty() {
        let note = format!(
            "restart policy Annotate is not enabled on this operator (chart value \
             restart.annotate.enabled, which grants pods: patch); not annotated: {}",
            crate::restart::joined(&report.annotate_disabled)
        );
        events.push((identity_ref.clone(), warn(Reason::AnnotateDisabled, note)));
    }
    for workload in &report.stalled {
        warn!(namespace, workload = %workload, "rollout past the deadline: its slot is released");
        let note = format!(
            "{workload} has not finished rolling out within the operator's rollout deadline; its \
             restart slot was released so other rotations can proceed. Check why its pods do not \
             become ready"
        );
        events.push((identity_ref.clone(), warn(Reason::RestartStalled, note)));
    }
    events
}

/// The restart Events worth publishing, and the digest of their warnings to remember: every Event
/// of a restart that happened, and the warnings (paused, missing, failing...) only when they differ
/// from those last published for this rotation (`last`). A rotation whose restarts stay pending is
/// reconciled every few seconds: without this it would publish the same warnings every time.
pub(super) fn unrepeated_restart_events(
    rotation: &RotationStatus,
    events: Vec<(ObjectReference, status::EventToEmit)>,
    last: u64,
) -> (Vec<(ObjectReference, status::EventToEmit)>, u64) {
    use std::hash::{Hash, Hasher};
    let mut warnings = events.iter().filter(|(_, event)| event.warning).peekable();
    if warnings.peek().is_none() {
        return (events, 0);
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    rotation.to_version_id.hash(&mut hasher);
    rotation.sha256_fingerprint.hash(&mut hasher);
    rotation.restart_token.hash(&mut hasher);
    for (reference, event) in warnings {
        reference.kind.hash(&mut hasher);
        reference.name.hash(&mut hasher);
        event.reason.hash(&mut hasher);
        event.note.hash(&mut hasher);
    }
    // 0 stands for "no warnings".
    let digest = hasher.finish().max(1);
    if digest == last {
        let fresh = events.into_iter().filter(|(_, event)| !event.warning);
        return (fresh.collect(), digest);
    }
    (events, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation_to(version: &str) -> RotationStatus {
        RotationStatus {
            from_version_id: "v1".into(),
            to_version_id: version.into(),
            sha256_fingerprint: format!("fingerprint of {version}"),
            time: "2026-12-03T00:00:00Z".into(),
            restarted_workloads: Vec::new(),
            complete: false,
            restart_token: None,
        }
    }

    fn event(warning: bool, reason: Reason, note: &str) -> (ObjectReference, status::EventToEmit) {
        let event = status::EventToEmit {
            warning,
            reason,
            note: note.into(),
        };
        (ObjectReference::default(), event)
    }

    #[test]
    fn a_pending_rotation_publishes_its_warnings_once_and_again_only_when_they_change() {
        let rotation = rotation_to("v2");
        let paused = || vec![event(true, Reason::RolloutPaused, "paused: Deployment/api")];
        let (first, digest) = unrepeated_restart_events(&rotation, paused(), 0);
        assert_eq!(first.len(), 1);
        assert_ne!(digest, 0);
        let (again, same) = unrepeated_restart_events(&rotation, paused(), digest);
        assert!(
            again.is_empty(),
            "the same warning for the same rotation is not repeated"
        );
        assert_eq!(same, digest);
        let changed = vec![
            event(true, Reason::RolloutPaused, "paused: Deployment/api"),
            event(true, Reason::WorkloadNotFound, "not found: Deployment/web"),
        ];
        let (news, other) = unrepeated_restart_events(&rotation, changed, digest);
        assert_eq!(
            news.len(),
            2,
            "a changed set of warnings is published whole"
        );
        assert_ne!(other, digest);
        let (next_rotation, _) = unrepeated_restart_events(&rotation_to("v3"), paused(), digest);
        assert_eq!(next_rotation.len(), 1, "a new rotation says it again");
    }

    #[test]
    fn restarts_that_happened_are_always_published_and_no_warning_forgets_the_digest() {
        let rotation = rotation_to("v2");
        let warning = vec![event(true, Reason::RolloutPaused, "paused: Deployment/api")];
        let (_, digest) = unrepeated_restart_events(&rotation, warning.clone(), 0);
        let mut mixed = warning.clone();
        mixed.push(event(
            false,
            Reason::RestartTriggered,
            "restarted: Deployment/web",
        ));
        let (published, _) = unrepeated_restart_events(&rotation, mixed, digest);
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].1.reason, Reason::RestartTriggered);
        let triggered = vec![event(false, Reason::RestartTriggered, "restarted")];
        let (published, cleared) = unrepeated_restart_events(&rotation, triggered, digest);
        assert_eq!((published.len(), cleared), (1, 0));
        let (back, _) = unrepeated_restart_events(&rotation, warning, cleared);
        assert_eq!(
            back.len(),
            1,
            "a warning that comes back after clearing is published"
        );
    }

    fn annotations(version: &str, fingerprint: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (VERSION_ID_ANNOTATION.to_string(), version.to_string()),
            (FINGERPRINT_ANNOTATION.to_string(), fingerprint.to_string()),
        ])
    }

    #[test]
    fn a_sibling_whose_secret_holds_the_expected_version_is_settled_with_its_fingerprint() {
        let secret = annotations("v2", "fp2");
        assert_eq!(
            sibling(Some("v2"), None, Some(&secret)),
            Sibling::Settled(Some("fp2".into()))
        );
    }

    #[test]
    fn a_sibling_behind_its_source_is_syncing_until_it_catches_up() {
        let secret = annotations("v1", "fp1");
        assert_eq!(sibling(Some("v2"), None, Some(&secret)), Sibling::Syncing);
        assert_eq!(sibling(Some("v2"), None, None), Sibling::Syncing);
    }

    #[test]
    fn a_sibling_that_refused_the_new_version_will_not_sync_and_is_not_waited_for() {
        let secret = annotations("v1", "fp1");
        assert_eq!(
            sibling(Some("v2"), Some("v2"), Some(&secret)),
            Sibling::Settled(Some("fp1".into()))
        );
        // An older refusal does not excuse a newer version.
        assert_eq!(
            sibling(Some("v3"), Some("v2"), Some(&secret)),
            Sibling::Syncing
        );
    }

    #[test]
    fn an_unknown_expectation_is_not_waited_for() {
        assert_eq!(sibling(None, None, None), Sibling::Settled(None));
    }

    #[test]
    fn restarts_wait_for_every_sibling_up_to_the_limit() {
        let settled = Sibling::Settled(Some("fp".into()));
        assert!(restart_now(&[], Duration::ZERO));
        assert!(restart_now(std::slice::from_ref(&settled), Duration::ZERO));
        let mixed = [settled, Sibling::Syncing];
        assert!(!restart_now(&mixed, Duration::from_secs(10)));
        assert!(restart_now(&mixed, COALESCE_LIMIT));
    }
}
