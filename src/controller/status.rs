//! Pure decisions about status: conditions (Ready, SourceReachable, ExpiringSoon, Restarts), the
//! rotation record, and which Event a change deserves. No I/O.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, MtlsIdentityStatus, RotationStatus, SourceStatus};

use crate::api::conditions::{ConditionType, Reason};

use super::decide::*;

/// A condition's transition time from `now`, the reconcile's current time as RFC 3339 text (the
/// form the rest of status uses). That text is always the operator's own rendering of the current
/// time, so if it ever did not parse, the current time is the same value.
pub fn transition_time(now: &str) -> Time {
    Time(
        now.parse()
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
    )
}

/// The next status. Facts of the Secret in place are kept on failure: the Secret stays as it was.
/// `now` is used only where a condition's status changes, so repeated outcomes give equal statuses.
pub fn next_status(
    previous: Option<&MtlsIdentityStatus>,
    generation: Option<i64>,
    outcome: &Result<Synced, SyncFailure>,
    now: &str,
) -> MtlsIdentityStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let (condition_status, reason, message) = match outcome {
        Ok(synced) => {
            status.source = Some(SourceStatus {
                arn: synced.arn.clone(),
                version_id: synced.version_id.clone(),
            });
            status.certificate = Some(synced.certificate.clone());
            status.secret_name = Some(synced.secret_name.clone());
            (
                "True",
                Reason::Synced,
                format!(
                    "Secret {} holds certificate {} from version {}, valid until {}",
                    synced.secret_name,
                    synced.certificate.serial_number,
                    synced.version_id,
                    synced.certificate.not_after
                ),
            )
        }
        Err(failure) => ("False", failure.reason(), failure.to_string()),
    };
    set_condition(
        &mut status.conditions,
        Condition {
            type_: ConditionType::Ready.to_string(),
            status: condition_status.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time: transition_time(now),
            observed_generation: generation,
        },
    );
    status
}

/// Sets `SourceReachable` from the last attempt; returns a Warning Event when it turns False and a
/// Normal one when it comes back.
pub fn source_reachable(
    status: &mut MtlsIdentityStatus,
    transient: Option<&SyncFailure>,
    synced: bool,
    now: &str,
) -> Option<EventToEmit> {
    let was_unreachable = status
        .conditions
        .iter()
        .any(|c| c.type_ == ConditionType::SourceReachable && c.status == "False");
    let (condition_status, reason, message) = match transient {
        Some(failure) => (
            "False",
            failure.reason(),
            format!(
                "{failure}; the certificate in place stays valid until {} and is kept; Ready stays \
                 True until then",
                status
                    .certificate
                    .as_ref()
                    .map(|c| c.not_after.as_str())
                    .unwrap_or("its notAfter")
            ),
        ),
        None if synced => (
            "True",
            Reason::Reachable,
            "Secrets Manager answered the last check".to_string(),
        ),
        // A permanent failure: Ready says it; reachability is not the question.
        None => return None,
    };
    set_condition(
        &mut status.conditions,
        Condition {
            type_: ConditionType::SourceReachable.to_string(),
            status: condition_status.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            last_transition_time: transition_time(now),
            observed_generation: status.observed_generation,
        },
    );
    match (transient.is_some(), was_unreachable) {
        (true, false) => Some(EventToEmit {
            warning: true,
            reason: Reason::SourceUnreachable,
            note: message,
        }),
        (false, true) => Some(EventToEmit {
            warning: false,
            reason: Reason::SourceReachable,
            note: message,
        }),
        _ => None,
    }
}

/// A condition saying the Kubernetes API failed for `what`; the reconcile is retried.
pub fn api_error_condition(
    type_: ConditionType,
    what: &str,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    failed_condition(
        type_,
        Reason::KubernetesApiError,
        format!("the Kubernetes API failed: {what}"),
        generation,
        now,
    )
}

/// A condition of `type_` that is False for `reason`.
pub fn failed_condition(
    type_: ConditionType,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: "False".to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: transition_time(now),
        observed_generation: generation,
    }
}

pub fn clear_condition(conditions: &mut Vec<Condition>, type_: ConditionType) {
    conditions.retain(|c| c.type_ != type_);
}

/// Replaces the condition of the same type, keeping its transition time when its status is unchanged.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        if existing.status == condition.status {
            condition.last_transition_time = existing.last_transition_time.clone();
        }
        *existing = condition;
    } else {
        conditions.push(condition);
    }
}

/// Sets the `ExpiringSoon` condition from the certificate now in the Secret (after a failed sync the
/// previous condition stays, as the Secret does). Returns a Warning Event when it turns True; it is
/// cleared when a newer certificate arrives. Ready is not affected.
pub fn expiry(
    status: &mut MtlsIdentityStatus,
    outcome: &Result<Synced, SyncFailure>,
    now_unix: i64,
    warn_before: Duration,
    now: &str,
) -> Option<EventToEmit> {
    let Ok(synced) = outcome else { return None };
    let remaining = synced.not_after_unix.saturating_sub(now_unix);
    let expiring = remaining <= i64::try_from(warn_before.as_secs()).unwrap_or(i64::MAX);
    let was_expiring = status
        .conditions
        .iter()
        .any(|c| c.type_ == ConditionType::ExpiringSoon && c.status == "True");
    let (condition_status, reason, message) = if expiring {
        (
            "True",
            Reason::ExpiringSoon,
            format!(
                "certificate {} expires at {} ({} days left) and Secrets Manager has no newer version",
                synced.certificate.serial_number,
                synced.certificate.not_after,
                remaining / 86_400
            ),
        )
    } else {
        (
            "False",
            Reason::Valid,
            format!("certificate valid until {}", synced.certificate.not_after),
        )
    };
    set_condition(
        &mut status.conditions,
        Condition {
            type_: ConditionType::ExpiringSoon.to_string(),
            status: condition_status.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            last_transition_time: transition_time(now),
            observed_generation: status.observed_generation,
        },
    );
    (expiring && !was_expiring).then_some(EventToEmit {
        warning: true,
        reason: Reason::ExpiringSoon,
        note: message,
    })
}

/// The rotation to act on: a new one when the certificate in the Secret changed from one that was
/// already synced (never on first sync), else the previous one (so an interrupted rotation is finished
/// after an operator restart, and a finished one is not repeated).
pub fn rotation(
    previous: Option<&MtlsIdentityStatus>,
    synced: &Synced,
    now: &str,
    on_password_change: bool,
) -> Option<RotationStatus> {
    let previous = previous?;
    let before = previous.certificate.as_ref()?;
    let fingerprint = &synced.certificate.sha256_fingerprint;
    let new = |restart_token: Option<String>| RotationStatus {
        from_version_id: previous
            .source
            .as_ref()
            .map(|source| source.version_id.clone())
            .unwrap_or_default(),
        to_version_id: synced.version_id.clone(),
        sha256_fingerprint: fingerprint.clone(),
        time: now.to_string(),
        restarted_workloads: Vec::new(),
        complete: false,
        restart_token,
    };
    if before.sha256_fingerprint != *fingerprint {
        return Some(new(None));
    }
    // The same certificate in new keystores: a rotation of its own only when asked for, with a
    // token of its own (the fingerprint is already on the pod templates).
    if on_password_change && let Some(inputs) = &synced.keystore_changed {
        let short: String = inputs.chars().take(16).collect();
        return Some(new(Some(format!("{fingerprint}.{short}"))));
    }
    previous.last_rotation.clone()
}

/// An Event to emit: only on a change (new version or certificate, or a new failure reason), so a
/// failure that persists across reconciles, or an operator restart, does not repeat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventToEmit {
    pub warning: bool,
    pub reason: Reason,
    pub note: String,
}

pub fn event_for(
    previous: Option<&MtlsIdentityStatus>,
    outcome: &Result<Synced, SyncFailure>,
) -> Option<EventToEmit> {
    let previous_ready = previous.and_then(|status| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Ready)
    });
    match outcome {
        Ok(synced) => {
            let same_content = previous.is_some_and(|status| {
                status.source.as_ref().map(|s| s.version_id.as_str()) == Some(&synced.version_id)
                    && status
                        .certificate
                        .as_ref()
                        .map(|c| c.sha256_fingerprint.as_str())
                        == Some(&synced.certificate.sha256_fingerprint)
            });
            let was_ready = previous_ready.is_some_and(|c| c.status == "True");
            let rotated = previous
                .and_then(|status| status.certificate.as_ref())
                .is_some_and(|c| c.sha256_fingerprint != synced.certificate.sha256_fingerprint);
            (!(same_content && was_ready)).then(|| EventToEmit {
                warning: false,
                reason: if rotated {
                    Reason::Rotated
                } else {
                    Reason::Synced
                },
                note: format!(
                    "Secret {} written from version {} (certificate {}, expires {})",
                    synced.secret_name,
                    synced.version_id,
                    synced.certificate.serial_number,
                    synced.certificate.not_after
                ),
            })
        }
        Err(failure) => {
            let same_failure =
                previous_ready.is_some_and(|c| c.status == "False" && c.reason == failure.reason());
            (!same_failure).then(|| EventToEmit {
                warning: true,
                reason: failure.reason(),
                note: failure.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::decide::fixtures::*;

    #[test]
    fn status_is_deterministic_and_keeps_transition_time() {
        let outcome = Ok(synced("v1", "f1"));
        let first = next_status(None, Some(1), &outcome, "2026-01-01T00:00:00Z");
        let again = next_status(Some(&first), Some(1), &outcome, "2026-01-02T00:00:00Z");
        assert_eq!(
            first, again,
            "same outcome, same status: no write, no new reconcile"
        );
        assert_eq!(first.conditions[0].status, "True");
        assert_eq!(first.conditions[0].reason, "Synced");

        let failed = next_status(
            Some(&first),
            Some(1),
            &Err(denied()),
            "2026-01-03T00:00:00Z",
        );
        let ready = &failed.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "AccessDenied")
        );
        assert_eq!(
            ready.last_transition_time,
            transition_time("2026-01-03T00:00:00Z")
        );
        assert_eq!(
            serde_json::to_value(&ready.last_transition_time).ok(),
            Some(serde_json::json!("2026-01-03T00:00:00Z"))
        );
        // The Secret stays, and so do the facts that describe it.
        assert_eq!(failed.source, first.source);
        assert_eq!(failed.certificate, first.certificate);
    }

    #[test]
    fn events_only_on_change() {
        let first = next_status(None, Some(1), &Ok(synced("v1", "f1")), "t");
        assert!(
            event_for(None, &Ok(synced("v1", "f1"))).is_some(),
            "first sync"
        );
        assert!(
            event_for(Some(&first), &Ok(synced("v1", "f1"))).is_none(),
            "resync"
        );
        let rotated = event_for(Some(&first), &Ok(synced("v2", "f2"))).map(|e| e.reason);
        assert_eq!(rotated, Some(Reason::Rotated));

        let failed = next_status(Some(&first), Some(1), &Err(denied()), "t");
        let warning = event_for(Some(&first), &Err(denied())).filter(|e| e.warning);
        assert_eq!(warning.map(|e| e.reason), Some(Reason::AccessDenied));
        assert!(
            event_for(Some(&failed), &Err(denied())).is_none(),
            "same failure again"
        );
        let recovered = event_for(Some(&failed), &Ok(synced("v1", "f1")));
        assert!(recovered.is_some_and(|e| !e.warning), "recovery is news");
    }

    #[test]
    fn expiring_soon_warns_once_and_clears_on_a_newer_certificate() {
        let day = 86_400;
        let month = Duration::from_secs(30 * day as u64);
        let soon = Synced {
            not_after_unix: 1_000 * day + 10 * day,
            ..synced("v1", "f1")
        };
        let mut status = next_status(None, Some(1), &Ok(soon.clone()), "t");
        let event = expiry(&mut status, &Ok(soon.clone()), 1_000 * day, month, "t");
        assert_eq!(event.map(|e| e.reason), Some(Reason::ExpiringSoon));
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "ExpiringSoon" && c.status == "True")
        );
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
        assert!(
            expiry(&mut status, &Ok(soon), 1_000 * day, month, "t").is_none(),
            "once"
        );

        let renewed = Synced {
            not_after_unix: 1_000 * day + 365 * day,
            ..synced("v2", "f2")
        };
        assert!(expiry(&mut status, &Ok(renewed), 1_000 * day, month, "t").is_none());
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "ExpiringSoon" && c.status == "False")
        );
    }

    #[test]
    fn rotation_is_recorded_only_when_the_certificate_changes() {
        let first = next_status(None, Some(1), &Ok(synced("v1", "f1")), "t0");
        assert!(
            rotation(None, &synced("v1", "f1"), "t0", false).is_none(),
            "first sync"
        );
        assert!(
            rotation(Some(&first), &synced("v1", "f1"), "t1", false).is_none(),
            "resync"
        );
        let rotated = rotation(Some(&first), &synced("v2", "f2"), "t2", false);
        let rotated = rotated.as_ref();
        assert_eq!(rotated.map(|r| r.from_version_id.as_str()), Some("v1"));
        assert_eq!(rotated.map(|r| r.to_version_id.as_str()), Some("v2"));
        assert_eq!(rotated.map(|r| r.complete), Some(false));
        let mut after = next_status(Some(&first), Some(1), &Ok(synced("v2", "f2")), "t2");
        after.last_rotation = rotated.cloned();
        // Replayed (operator restart): the same rotation, not a new one.
        assert_eq!(
            rotation(Some(&after), &synced("v2", "f2"), "t3", false).as_ref(),
            rotated
        );
    }

    #[test]
    fn new_keystores_for_the_same_certificate_rotate_only_when_asked() {
        let first = next_status(None, Some(1), &Ok(synced("v1", "f1")), "t0");
        let new_password = Synced {
            keystore_changed: Some("0123456789abcdef0123".into()),
            ..synced("v1", "f1")
        };
        assert!(
            rotation(Some(&first), &new_password, "t1", false).is_none(),
            "by default the keystores change without a rollout"
        );
        let rotated = rotation(Some(&first), &new_password, "t1", true);
        let rotated = rotated.as_ref();
        assert_eq!(
            rotated.and_then(|r| r.restart_token.as_deref()),
            Some("f1.0123456789abcdef"),
            "a token of its own: the fingerprint is on the templates already"
        );
        assert_eq!(rotated.map(|r| r.complete), Some(false));
        // A new certificate's rotation carries the fingerprint as its token, as always.
        let certificate = rotation(Some(&first), &synced("v2", "f2"), "t2", true);
        assert_eq!(certificate.and_then(|r| r.restart_token), None);
    }
}
