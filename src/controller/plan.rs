//! The status plan: from the previous status, what this reconcile found and one `now`, the new
//! status, the Events, whether restarts are due and what the metrics observe. Pure: the reconcile
//! gathers, this decides, and one place (the reconcile) writes status, Events and metrics. The
//! restart and egress phases' results fold back in here too.

use crate::api::MtlsIdentityStatus;
use crate::api::conditions::{ConditionType, Reason};
use crate::restart::RestartReport;

use super::context::{Now, Parsed};
use super::decide::{SyncFailure, Synced};
use super::status::{self, EventToEmit};

/// What the plan needs to know about the identity (parsed once per reconcile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts<'a> {
    pub generation: Option<i64>,
    pub target: &'a str,
    pub warn_before: std::time::Duration,
    /// `spec.restart.onPasswordChange`.
    pub on_password_change: bool,
}

impl<'a> Facts<'a> {
    /// What the plan needs of the identity parsed once for this reconcile.
    pub fn of(parsed: &'a Parsed) -> Self {
        Self {
            generation: parsed.generation,
            target: &parsed.target,
            warn_before: parsed.warn_before,
            on_password_change: parsed.on_password_change,
        }
    }
}

/// What the reconcile will write and say.
#[derive(Debug)]
pub struct Plan {
    pub status: MtlsIdentityStatus,
    /// Events about the identity, in the order they are published.
    pub events: Vec<EventToEmit>,
    /// The outcome as status reports it: a transient failure while a valid certificate is in
    /// place is reported as that certificate (`Ok`), with the failure in `transient`.
    pub outcome: Result<Synced, SyncFailure>,
    pub transient: Option<SyncFailure>,
    /// Whether the rotation in `status.lastRotation` still has restarts to make now.
    pub restart_due: bool,
}

impl Plan {
    /// What the metrics record for this attempt: the failure's reason, whether it showed in Ready
    /// or only in SourceReachable.
    pub fn attempt(&self) -> Result<(), Reason> {
        match (&self.transient, &self.outcome) {
            (Some(failure), _) | (None, Err(failure)) => Err(failure.reason()),
            (None, Ok(_)) => Ok(()),
        }
    }
}

/// The plan for one reconcile whose sync ended with `outcome`.
pub fn plan(
    previous: Option<&MtlsIdentityStatus>,
    facts: &Facts<'_>,
    outcome: Result<Synced, SyncFailure>,
    now: &Now,
) -> Plan {
    // No false alarms: a transient source failure (throttled, unreachable) while a valid
    // certificate is in place leaves Ready True; `SourceReachable` says what is happening.
    let (outcome, transient) = match outcome {
        Err(failure) if failure.is_transient() => {
            match super::decide::synced_from_status(
                previous,
                facts.generation,
                facts.target,
                now.unix,
            ) {
                Some(in_place) => (Ok(in_place), Some(failure)),
                None => (Err(failure), None),
            }
        }
        other => (other, None),
    };
    let mut status = status::next_status(previous, facts.generation, &outcome, &now.text);
    let reachability =
        status::source_reachable(&mut status, transient.as_ref(), outcome.is_ok(), &now.text);
    let expiring = status::expiry(
        &mut status,
        &outcome,
        now.unix,
        facts.warn_before,
        &now.text,
    );
    let mut restart_due = false;
    if let Ok(synced) = &outcome {
        status.last_rotation =
            status::rotation(previous, synced, &now.text, facts.on_password_change);
        restart_due = status.last_rotation.as_ref().is_some_and(|rotation| {
            !rotation.complete
                && rotation.sha256_fingerprint == synced.certificate.sha256_fingerprint
        });
    }
    let events = status::event_for(previous, &outcome)
        .into_iter()
        .chain(expiring)
        .chain(reachability)
        .collect();
    Plan {
        status,
        events,
        outcome,
        transient,
        restart_due,
    }
}

/// Records in the plan that the refresh request `requested` was honoured by this reconcile: in
/// status (so it is not honoured again) and in an Event saying how it ended.
pub fn honour_refresh(plan: &mut Plan, requested: String, now: &Now) {
    // What this attempt ended with, a transient failure included (Ready may stay True on it).
    let ended = plan.attempt().err().unwrap_or(Reason::Synced);
    plan.events.push(EventToEmit {
        warning: false,
        reason: Reason::RefreshHonoured,
        note: format!("refresh requested at {requested} honoured: {ended}"),
    });
    plan.status.last_refresh = Some(crate::api::RefreshStatus {
        requested,
        time: now.text.clone(),
    });
}

/// How the restart phase went.
#[derive(Debug)]
pub enum Restarts {
    Done(RestartReport),
    /// The identity's status holds what the operator cannot have written: wait for a fix.
    InvalidStatus(String),
    /// The Kubernetes API failed; retried.
    ApiFailed,
}

/// Folds the restart phase into the plan; returns whether restarts are still pending.
pub fn fold_restarts(plan: &mut Plan, restarts: &Restarts, now: &Now) -> bool {
    let generation = plan.status.observed_generation;
    let conditions = &mut plan.status.conditions;
    let report = match restarts {
        Restarts::Done(report) => {
            status::clear_condition(conditions, ConditionType::Restarts);
            Some(report)
        }
        Restarts::InvalidStatus(problem) => {
            status::set_condition(
                conditions,
                status::failed_condition(
                    ConditionType::Restarts,
                    Reason::InvalidStatus,
                    format!("{problem}; restarts wait until it is corrected"),
                    generation,
                    &now.text,
                ),
            );
            None
        }
        Restarts::ApiFailed => {
            status::set_condition(
                conditions,
                status::api_error_condition(
                    ConditionType::Restarts,
                    "could not list or patch the workloads that use the Secret; retrying",
                    generation,
                    &now.text,
                ),
            );
            None
        }
    };
    let Some(rotation) = plan.status.last_rotation.as_mut() else {
        return false;
    };
    match report {
        Some(report) => {
            for workload in report.done.iter().map(ToString::to_string) {
                if !rotation.restarted_workloads.contains(&workload) {
                    rotation.restarted_workloads.push(workload);
                }
            }
            rotation.restarted_workloads.sort();
            rotation.complete = report.complete();
        }
        None => rotation.complete = false,
    }
    !rotation.complete
}

/// Folds what the egress phase found into the planned status's `Egress` condition.
pub fn fold_egress(planned: &mut MtlsIdentityStatus, egress: super::egress::Egress, now: &Now) {
    use super::egress::Egress;
    let generation = planned.observed_generation;
    match egress {
        Egress::None => {}
        Egress::Removed => status::clear_condition(&mut planned.conditions, ConditionType::Egress),
        Egress::Condition {
            status: condition_status,
            reason,
            message,
        } => status::set_condition(
            &mut planned.conditions,
            crate::api::Condition {
                type_: ConditionType::Egress.to_string(),
                status: condition_status.to_string(),
                reason: reason.to_string(),
                message,
                last_transition_time: status::transition_time(&now.text),
                observed_generation: generation,
            },
        ),
    }
}

/// Folds an egress failure (the Kubernetes API) into the plan.
pub fn fold_egress_failure(plan: &mut Plan, now: &Now) {
    let generation = plan.status.observed_generation;
    status::set_condition(
        &mut plan.status.conditions,
        status::api_error_condition(
            ConditionType::Egress,
            "could not read or write the egress proxy's objects; retrying",
            generation,
            &now.text,
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Condition;
    use crate::controller::decide::fixtures::*;
    use crate::source::SourceError;
    use std::time::Duration;

    const DAY: i64 = 86_400;

    fn now() -> Now {
        Now::at(1_800_000_000)
    }

    fn facts() -> Facts<'static> {
        Facts {
            generation: Some(1),
            target: "x",
            warn_before: Duration::from_secs(30 * DAY as u64),
            on_password_change: false,
        }
    }

    fn condition(status: &MtlsIdentityStatus, type_: ConditionType) -> Option<&Condition> {
        status.conditions.iter().find(|c| c.type_ == type_)
    }

    fn ready(plan: &Plan) -> (String, String) {
        condition(&plan.status, ConditionType::Ready)
            .map(|c| (c.status.clone(), c.reason.clone()))
            .unwrap_or_default()
    }

    fn reasons(plan: &Plan) -> Vec<Reason> {
        plan.events.iter().map(|event| event.reason).collect()
    }

    /// A status synced from `version` with certificate `fingerprint`, valid for a year.
    fn synced_previous(version: &str, fingerprint: &str) -> MtlsIdentityStatus {
        plan(None, &facts(), Ok(synced(version, fingerprint)), &now()).status
    }

    /// A honoured refresh is echoed in status (so it is not honoured twice) and in one Normal Event
    /// that says how the attempt ended, a transient failure included; nothing else changes.
    #[test]
    fn a_honoured_refresh_is_recorded_in_status_and_one_event() {
        let previous = synced_previous("v1", "f1");
        let mut honoured = plan(Some(&previous), &facts(), Ok(synced("v1", "f1")), &now());
        let unchanged = honoured.status.clone();
        honour_refresh(&mut honoured, "2026-12-03T18:00:00.123Z".into(), &now());
        let recorded = honoured.status.last_refresh.clone().unwrap();
        assert_eq!(recorded.requested, "2026-12-03T18:00:00.123Z");
        assert_eq!(recorded.time, now().text);
        assert_eq!(
            MtlsIdentityStatus {
                last_refresh: None,
                ..honoured.status.clone()
            },
            unchanged
        );
        assert_eq!(reasons(&honoured), vec![Reason::RefreshHonoured]);
        assert!(!honoured.events[0].warning);
        assert!(honoured.events[0].note.ends_with("honoured: Synced"));

        let mut transient = plan(Some(&previous), &facts(), Err(throttled()), &now());
        honour_refresh(&mut transient, "t".into(), &now());
        let note = &transient.events.last().unwrap().note;
        assert!(note.ends_with("honoured: Throttled"), "{note}");
    }

    fn throttled() -> SyncFailure {
        SyncFailure::Source(SourceError::Throttled {
            secret_id: "team/client".into(),
        })
    }

    /// One failure of each kind the sync reports.
    fn every_failure() -> Vec<SyncFailure> {
        use crate::source::policy::Denied;
        let id = || "team/client".to_string();
        let mut failures = vec![
            SyncFailure::NotAllowed {
                secret_id: id(),
                namespace: "team".into(),
                denied: Denied::Name(id()),
            },
            SyncFailure::RoleNotAllowed {
                role: "arn:aws:iam::1:role/r".into(),
                namespace: "team".into(),
                denied: Denied::Name("r".into()),
            },
            SyncFailure::TargetConflict {
                secret: "team/client".into(),
            },
            SyncFailure::InvalidSpec("x".into()),
            SyncFailure::KeystorePasswordMissing {
                secret: "team/pw".into(),
                key: "password".into(),
            },
            SyncFailure::Keystore(crate::pki::keystore::KeystoreError::sample()),
            SyncFailure::Source(SourceError::NotFound {
                secret_id: id(),
                detail: String::new(),
            }),
            denied(),
            SyncFailure::Source(SourceError::Throttled { secret_id: id() }),
            SyncFailure::Source(SourceError::Empty { secret_id: id() }),
            SyncFailure::Source(SourceError::Unavailable {
                secret_id: id(),
                detail: String::new(),
            }),
        ];
        failures.extend(crate::pki::PkiError::samples().into_iter().map(|error| {
            SyncFailure::Material {
                context: "version v2".into(),
                error,
            }
        }));
        failures
    }

    /// Every Ready=False reason (the list is checked to be complete) goes into the condition and
    /// one Warning Event with that reason, and a repeat of the same failure emits nothing and
    /// writes nothing.
    #[test]
    fn every_failure_reason_is_reported_once() {
        let covered: std::collections::BTreeSet<Reason> =
            every_failure().iter().map(SyncFailure::reason).collect();
        let all: std::collections::BTreeSet<Reason> =
            Reason::READY_FAILURES.iter().copied().collect();
        assert_eq!(covered, all, "a failure of every Ready=False reason");
        for (index, failure) in every_failure().into_iter().enumerate() {
            let reason = failure.reason();
            let first = plan(None, &facts(), Err(failure), &now());
            assert_eq!(
                ready(&first),
                ("False".into(), reason.to_string()),
                "{reason}"
            );
            assert_eq!(reasons(&first), vec![reason], "{reason}");
            assert!(first.events[0].warning);
            assert_eq!(first.attempt(), Err(reason));
            let repeat = every_failure()
                .into_iter()
                .nth(index)
                .expect("the same failure");
            let again = plan(Some(&first.status), &facts(), Err(repeat), &now());
            assert!(
                again.events.is_empty(),
                "{reason} repeated: {:?}",
                again.events
            );
            assert_eq!(again.status, first.status, "{reason}: nothing to write");
        }
    }

    /// A transient failure with a valid certificate in place: Ready stays True, SourceReachable
    /// turns False with one Warning, the metrics see the failure; recovery says so once.
    #[test]
    fn a_transient_failure_with_a_valid_secret_in_place_is_no_false_alarm() {
        let previous = synced_previous("v1", "f1");
        let failing = plan(Some(&previous), &facts(), Err(throttled()), &now());
        assert_eq!(ready(&failing), ("True".into(), "Synced".into()));
        let reachable = condition(&failing.status, ConditionType::SourceReachable);
        assert_eq!(reachable.map(|c| c.status.as_str()), Some("False"));
        assert_eq!(reasons(&failing), vec![Reason::SourceUnreachable]);
        assert_eq!(failing.attempt(), Err(Reason::Throttled));
        assert!(failing.transient.is_some() && failing.outcome.is_ok());
        let still = plan(Some(&failing.status), &facts(), Err(throttled()), &now());
        assert!(still.events.is_empty(), "{:?}", still.events);
        let back = plan(
            Some(&failing.status),
            &facts(),
            Ok(synced("v1", "f1")),
            &now(),
        );
        assert_eq!(reasons(&back), vec![Reason::SourceReachable]);
        assert_eq!(back.attempt(), Ok(()));
    }

    /// Without a valid certificate in place (first sync, another generation, another target) a
    /// transient failure is what Ready says.
    #[test]
    fn a_transient_failure_without_a_usable_secret_shows_in_ready() {
        let cases: [(&str, Option<MtlsIdentityStatus>, Facts<'static>); 3] = [
            ("first sync", None, facts()),
            (
                "spec changed",
                Some(synced_previous("v1", "f1")),
                Facts {
                    generation: Some(2),
                    ..facts()
                },
            ),
            (
                "renamed target",
                Some(synced_previous("v1", "f1")),
                Facts {
                    target: "renamed",
                    ..facts()
                },
            ),
        ];
        for (case, previous, facts) in cases {
            let planned = plan(previous.as_ref(), &facts, Err(throttled()), &now());
            assert_eq!(
                ready(&planned),
                ("False".into(), "Throttled".into()),
                "{case}"
            );
            assert!(planned.transient.is_none(), "{case}");
        }
    }

    /// A new certificate is a rotation with restarts due, and Rotated; the same certificate again
    /// (a stale copy, a second look) is neither news nor a second rotation.
    #[test]
    fn a_new_certificate_is_one_rotation() {
        let previous = synced_previous("v1", "f1");
        assert!(
            previous.last_rotation.is_none(),
            "a first sync is no rotation"
        );
        let rotated = plan(Some(&previous), &facts(), Ok(synced("v2", "f2")), &now());
        assert_eq!(reasons(&rotated), vec![Reason::Rotated]);
        assert!(rotated.restart_due);
        let rotation = rotated.status.last_rotation.clone().expect("a rotation");
        assert_eq!(
            (
                rotation.from_version_id.as_str(),
                rotation.to_version_id.as_str()
            ),
            ("v1", "v2")
        );
        // Restarts done: the next look at the same version changes nothing.
        let mut done = rotated;
        let deployment = |name: &str| crate::restart::WorkloadRef {
            kind: crate::api::WorkloadKind::Deployment,
            name: name.into(),
        };
        let report = RestartReport {
            done: vec![deployment("b"), deployment("a")],
            ..RestartReport::default()
        };
        assert!(!fold_restarts(&mut done, &Restarts::Done(report), &now()));
        let again = plan(Some(&done.status), &facts(), Ok(synced("v2", "f2")), &now());
        assert!(!again.restart_due);
        assert!(again.events.is_empty(), "{:?}", again.events);
        assert_eq!(
            again.status.last_rotation.map(|r| r.restarted_workloads),
            Some(vec!["Deployment/a".to_string(), "Deployment/b".to_string()])
        );
    }

    /// Only the keystore's password changed: no rotation, unless `onPasswordChange` asks for one,
    /// and then with a token of its own.
    #[test]
    fn a_password_only_change_rotates_only_when_asked() {
        let previous = synced_previous("v1", "f1");
        let mut keystore_only = synced("v1", "f1");
        keystore_only.keystore_changed = Some("abcdef0123456789abcdef".into());
        let quiet = plan(Some(&previous), &facts(), Ok(keystore_only.clone()), &now());
        assert!(!quiet.restart_due && quiet.status.last_rotation.is_none());
        let asked = Facts {
            on_password_change: true,
            ..facts()
        };
        let rotated = plan(Some(&previous), &asked, Ok(keystore_only), &now());
        assert!(rotated.restart_due);
        let token = rotated.status.last_rotation.and_then(|r| r.restart_token);
        assert_eq!(token.as_deref(), Some("f1.abcdef0123456789"));
    }

    /// Restarts that could not be made keep the rotation open, with a `Restarts` condition that
    /// says why; a later success clears it.
    #[test]
    fn failed_restarts_keep_the_rotation_open_and_say_why() {
        let previous = synced_previous("v1", "f1");
        for (restarts, reason) in [
            (Restarts::ApiFailed, Reason::KubernetesApiError),
            (
                Restarts::InvalidStatus("bad time".into()),
                Reason::InvalidStatus,
            ),
        ] {
            let mut planned = plan(Some(&previous), &facts(), Ok(synced("v2", "f2")), &now());
            assert!(fold_restarts(&mut planned, &restarts, &now()), "{reason}");
            let restarts = condition(&planned.status, ConditionType::Restarts).cloned();
            assert_eq!(
                restarts.map(|c| (c.status, c.reason)),
                Some(("False".into(), reason.to_string()))
            );
            let report = RestartReport {
                pending: vec![crate::restart::WorkloadRef {
                    kind: crate::api::WorkloadKind::Deployment,
                    name: "a".into(),
                }],
                ..RestartReport::default()
            };
            assert!(
                fold_restarts(&mut planned, &Restarts::Done(report), &now()),
                "a slot is still to come"
            );
            assert!(condition(&planned.status, ConditionType::Restarts).is_none());
        }
    }

    /// What the egress phase found becomes the `Egress` condition, and goes with `spec.egress`.
    #[test]
    fn the_egress_result_is_folded_into_its_condition() {
        use crate::controller::egress::Egress;
        let mut planned = plan(None, &facts(), Ok(synced("v1", "f1")), &now());
        let ready = Egress::Condition {
            status: "True",
            reason: Reason::EgressReady,
            message: "ready".into(),
        };
        fold_egress(&mut planned.status, ready, &now());
        let egress = condition(&planned.status, ConditionType::Egress).cloned();
        assert_eq!(
            egress.map(|c| (c.status, c.reason)),
            Some(("True".into(), "EgressReady".into()))
        );
        fold_egress(&mut planned.status, Egress::None, &now());
        assert!(
            condition(&planned.status, ConditionType::Egress).is_some(),
            "nothing to say"
        );
        fold_egress(&mut planned.status, Egress::Removed, &now());
        assert!(condition(&planned.status, ConditionType::Egress).is_none());
    }

    /// An egress failure is an `Egress` condition; the Ready condition is untouched.
    #[test]
    fn an_egress_failure_is_its_own_condition() {
        let mut planned = plan(None, &facts(), Ok(synced("v1", "f1")), &now());
        fold_egress_failure(&mut planned, &now());
        let egress = condition(&planned.status, ConditionType::Egress).cloned();
        assert_eq!(
            egress.map(|c| c.reason),
            Some("KubernetesApiError".to_string())
        );
        assert_eq!(ready(&planned).0, "True");
    }

    /// A certificate inside `warnBefore` sets ExpiringSoon with one Warning; Ready stays True.
    #[test]
    fn an_expiring_certificate_warns_once() {
        let mut expiring = synced("v1", "f1");
        expiring.not_after_unix = now().unix + 10 * DAY;
        let first = plan(None, &facts(), Ok(expiring.clone()), &now());
        assert_eq!(reasons(&first), vec![Reason::Synced, Reason::ExpiringSoon]);
        let again = plan(Some(&first.status), &facts(), Ok(expiring), &now());
        assert!(again.events.is_empty(), "{:?}", again.events);
    }
}
