//! Pure decisions of a reconcile: what went wrong (with one fixed reason string), what the Secret
//! should hold, what the status says, which Event to emit, and when to look again. No I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::SourceSpec;
use crate::api::{
    CA_VERSION_ID_ANNOTATION, CertificateStatus, Condition, DATA_DIGEST_ANNOTATION,
    FINGERPRINT_ANNOTATION, IDENTITY_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MtlsIdentityStatus,
    RotationStatus, SourceStatus, VERSION_ID_ANNOTATION,
};
use crate::pki::{PkiError, ValidatedIdentity};
use crate::source::id::{SecretId, parse_region, parse_secret_id};
use crate::source::policy::{Denied, SourcePolicy};
use crate::source::{SecretRef, SourceError, VersionSelector};

pub const READY: &str = "Ready";
pub const REASON_SYNCED: &str = "Synced";

/// Why an identity could not be synced. Each variant maps to one fixed reason.
#[derive(Debug, thiserror::Error)]
pub enum SyncFailure {
    /// The patterns and the precise cause stay in `denied`, for the operator's log: the tenant sees
    /// a fixed sentence, never the policy of other namespaces.
    #[error(
        "secret {secret_id} is not one that namespace {namespace} may read through the operator \
         (by default: secrets named {namespace}/... in the operator's own AWS account and region); \
         nothing was written. Use such a secret, or ask the cluster admin to allow this one"
    )]
    NotAllowed {
        secret_id: String,
        namespace: String,
        denied: Denied,
    },
    #[error(
        "Secret {secret} already exists and is not owned by this MtlsIdentity; it is left untouched. \
         Delete it or choose another spec.target.secretName"
    )]
    TargetConflict { secret: String },
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{context}: {error}")]
    Material { context: String, error: PkiError },
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

impl SyncFailure {
    /// Throttled or unreachable: worth waiting out while a valid certificate is in place.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Source(SourceError::Throttled { .. } | SourceError::Unavailable { .. })
        )
    }

    /// What only the operator's log shows: the policy's verdict, AWS's own words.
    pub fn detail(&self) -> String {
        match self {
            Self::NotAllowed { denied, .. } => denied.to_string(),
            Self::Source(error) => error.detail().to_string(),
            _ => String::new(),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAllowed { .. } => "SourceNotAllowed",
            Self::TargetConflict { .. } => "TargetConflict",
            Self::Source(error) => error.reason(),
            Self::Material { error, .. } => error.reason(),
            Self::InvalidSpec(_) => "InvalidSpec",
        }
    }
}

/// A source id that passed strict parsing and the policy, with the request that reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSecret {
    pub id: SecretId,
    pub request: SecretRef,
}

/// The identity's source ids, checked before any AWS call: parsed strictly (else `InvalidSpec`),
/// in one region (an ARN's own, which `spec.source.region` may only repeat), allowed by the policy
/// (else `SourceNotAllowed`). Returns the main secret and the separate CA secret, if any.
pub fn check_source(
    source: &SourceSpec,
    namespace: &str,
    policy: &SourcePolicy,
    default_region: Option<&str>,
) -> Result<(CheckedSecret, Option<CheckedSecret>), SyncFailure> {
    let spec_region = match &source.region {
        Some(region) => Some(
            parse_region(region).map_err(|error| SyncFailure::InvalidSpec(error.to_string()))?,
        ),
        None => None,
    };
    let check = |text: &str, version: VersionSelector| {
        let id =
            parse_secret_id(text).map_err(|error| SyncFailure::InvalidSpec(error.to_string()))?;
        let region = match (&id, spec_region) {
            (SecretId::Arn(arn), Some(region)) if arn.region != region => {
                return Err(SyncFailure::InvalidSpec(format!(
                    "spec.source.region {region} differs from the region of the ARN {text}; \
                     omit spec.source.region"
                )));
            }
            (SecretId::Arn(arn), _) => arn.region.clone(),
            (SecretId::Name(_), Some(region)) => region.to_string(),
            (SecretId::Name(_), None) => default_region
                .ok_or_else(|| {
                    SyncFailure::InvalidSpec(
                        "no region: set spec.source.region, or the operator's AWS region".into(),
                    )
                })?
                .to_string(),
        };
        policy
            .check_request(namespace, &id, &region)
            .map_err(|denied| SyncFailure::NotAllowed {
                secret_id: text.to_string(),
                namespace: namespace.to_string(),
                denied,
            })?;
        Ok(CheckedSecret {
            request: SecretRef {
                secret_id: text.to_string(),
                region,
                version,
            },
            id,
        })
    };
    let main = check(&source.secret_id, source.version())?;
    let ca = match &source.ca_secret_id {
        Some(ca_id) => Some(check(ca_id, VersionSelector::Stage("AWSCURRENT".into()))?),
        None => None,
    };
    Ok((main, ca))
}

/// The policy again, on the canonical ARN and name Secrets Manager returned for `checked`.
pub fn check_resolved(
    checked: &CheckedSecret,
    namespace: &str,
    policy: &SourcePolicy,
    arn: &str,
    name: &str,
) -> Result<(), SyncFailure> {
    let denied = |denied| SyncFailure::NotAllowed {
        secret_id: checked.request.secret_id.clone(),
        namespace: namespace.to_string(),
        denied,
    };
    let arn = crate::source::id::parse_arn(arn)
        .map_err(|_| denied(Denied::Resolved(arn.chars().take(256).collect())))?;
    policy
        .check_resolved(namespace, &checked.id, &checked.request.region, &arn, name)
        .map_err(denied)
}

/// The facts of a successful sync, kept for status and Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub arn: String,
    pub version_id: String,
    pub certificate: CertificateStatus,
    pub not_after_unix: i64,
    pub secret_name: String,
}

pub fn certificate_status(identity: &ValidatedIdentity) -> CertificateStatus {
    let facts = &identity.facts;
    CertificateStatus {
        subject: facts.subject.clone(),
        issuer: facts.issuer.clone(),
        serial_number: facts.serial_number.clone(),
        not_before: facts.not_before_rfc3339(),
        not_after: facts.not_after_rfc3339(),
        sha256_fingerprint: facts.sha256_fingerprint.clone(),
        dns_names: facts.dns_names.clone(),
        uris: facts.uris.clone(),
    }
}

/// The Secret the identity should own, as applied with server-side apply.
pub fn desired_secret(
    name: &str,
    namespace: &str,
    identity_name: &str,
    owner: OwnerReference,
    version_id: &str,
    ca_version_id: Option<&str>,
    material: &ValidatedIdentity,
) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        "tls.crt".to_string(),
        ByteString(material.tls_crt.as_bytes().to_vec()),
    );
    data.insert(
        "tls.key".to_string(),
        ByteString(material.tls_key.expose().as_bytes().to_vec()),
    );
    if let Some(ca) = &material.ca_crt {
        data.insert("ca.crt".to_string(), ByteString(ca.as_bytes().to_vec()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                (IDENTITY_LABEL.to_string(), identity_name.to_string()),
            ])),
            annotations: Some({
                let mut annotations = BTreeMap::from([
                    (VERSION_ID_ANNOTATION.to_string(), version_id.to_string()),
                    (
                        FINGERPRINT_ANNOTATION.to_string(),
                        material.facts.sha256_fingerprint.clone(),
                    ),
                    (DATA_DIGEST_ANNOTATION.to_string(), data_digest(&data)),
                ]);
                if let Some(ca_version_id) = ca_version_id {
                    annotations.insert(
                        CA_VERSION_ID_ANNOTATION.to_string(),
                        ca_version_id.to_string(),
                    );
                }
                annotations
            }),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// SHA-256 over the Secret's data (keys in order, each key and value length-prefixed).
pub fn data_digest(data: &BTreeMap<String, ByteString>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (key, value) in data {
        for part in [key.as_bytes(), value.0.as_slice()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
    }
    hex::encode(hasher.finalize())
}

/// The source versions (main, CA) an intact Secret of ours was written from: `None` when its data
/// no longer matches the digest written with it (edited by hand) or it lacks the annotations.
pub fn carried_versions(secret: &Secret) -> Option<(String, Option<String>)> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let digest = annotations.get(DATA_DIGEST_ANNOTATION)?;
    let data = secret.data.clone().unwrap_or_default();
    if *digest != data_digest(&data) {
        return None;
    }
    Some((
        annotations.get(VERSION_ID_ANNOTATION)?.clone(),
        annotations.get(CA_VERSION_ID_ANNOTATION).cloned(),
    ))
}

/// The facts of the last successful sync as status records them, to carry on without reading AWS:
/// only while Ready is True, for the current generation and target, and before notAfter (an expired
/// certificate is read and validated again, so it is reported as `Expired`).
pub fn synced_from_status(
    status: Option<&MtlsIdentityStatus>,
    generation: Option<i64>,
    target: &str,
    now_unix: i64,
) -> Option<Synced> {
    let status = status?;
    let ready = status.conditions.iter().find(|c| c.type_ == READY)?;
    if ready.status != "True" || status.observed_generation != generation {
        return None;
    }
    let source = status.source.as_ref()?;
    let certificate = status.certificate.as_ref()?;
    if status.secret_name.as_deref() != Some(target) {
        return None;
    }
    let not_after_unix = chrono::DateTime::parse_from_rfc3339(&certificate.not_after)
        .ok()?
        .timestamp();
    if not_after_unix <= now_unix {
        return None;
    }
    Some(Synced {
        arn: source.arn.clone(),
        version_id: source.version_id.clone(),
        certificate: certificate.clone(),
        not_after_unix,
        secret_name: target.to_string(),
    })
}

/// True when `existing` already holds everything `desired` sets, so no write is needed.
pub fn secret_up_to_date(existing: &Secret, desired: &Secret) -> bool {
    let contains = |have: &Option<BTreeMap<String, String>>,
                    want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(key, value)| have.as_ref().and_then(|have| have.get(key)) == Some(value))
    };
    existing.type_ == desired.type_
        && existing.data == desired.data
        && contains(&existing.metadata.labels, &desired.metadata.labels)
        && contains(
            &existing.metadata.annotations,
            &desired.metadata.annotations,
        )
}

/// Whether an object has `owner_uid` as its controller.
pub fn is_owned_by(metadata: &ObjectMeta, owner_uid: &str) -> bool {
    metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == owner_uid)
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
                REASON_SYNCED.to_string(),
                format!(
                    "Secret {} holds certificate {} from version {}, valid until {}",
                    synced.secret_name,
                    synced.certificate.serial_number,
                    synced.version_id,
                    synced.certificate.not_after
                ),
            )
        }
        Err(failure) => ("False", failure.reason().to_string(), failure.to_string()),
    };
    set_condition(
        &mut status.conditions,
        Condition {
            type_: READY.to_string(),
            status: condition_status.to_string(),
            reason,
            message,
            last_transition_time: now.to_string(),
            observed_generation: generation,
        },
    );
    status
}

/// Whether Secrets Manager answered the last check: False (with the reason) during a transient
/// failure while Ready stays True on the certificate in place.
pub const SOURCE_REACHABLE: &str = "SourceReachable";

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
        .any(|c| c.type_ == SOURCE_REACHABLE && c.status == "False");
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
            "Reachable",
            "Secrets Manager answered the last check".to_string(),
        ),
        // A permanent failure: Ready says it; reachability is not the question.
        None => return None,
    };
    set_condition(
        &mut status.conditions,
        Condition {
            type_: SOURCE_REACHABLE.to_string(),
            status: condition_status.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            last_transition_time: now.to_string(),
            observed_generation: status.observed_generation,
        },
    );
    match (transient.is_some(), was_unreachable) {
        (true, false) => Some(EventToEmit {
            warning: true,
            reason: "SourceUnreachable".to_string(),
            note: message,
        }),
        (false, true) => Some(EventToEmit {
            warning: false,
            reason: "SourceReachable".to_string(),
            note: message,
        }),
        _ => None,
    }
}

/// The condition that says restarts for the last rotation could not be done (Kubernetes refused).
pub const RESTARTS: &str = "Restarts";

/// A condition saying the Kubernetes API failed for `what`; the reconcile is retried.
pub fn api_error_condition(
    type_: &str,
    what: &str,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    failed_condition(
        type_,
        "KubernetesApiError",
        format!("the Kubernetes API failed: {what}"),
        generation,
        now,
    )
}

/// A condition of `type_` that is False for `reason`.
pub fn failed_condition(
    type_: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: "False".to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: now.to_string(),
        observed_generation: generation,
    }
}

pub fn clear_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Backoff after consecutive Kubernetes API errors: 5 s doubling up to 5 min, plus up to 10 %.
pub fn api_error_backoff(attempts: u32, jitter_fraction: f64) -> Duration {
    let exponent = attempts.saturating_sub(1).min(10);
    let base = Duration::from_secs(5)
        .saturating_mul(1u32 << exponent)
        .min(Duration::from_secs(300));
    base + base.mul_f64(jitter_fraction.clamp(0.0, 1.0) * 0.1)
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

pub const EXPIRING_SOON: &str = "ExpiringSoon";

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
        .any(|c| c.type_ == EXPIRING_SOON && c.status == "True");
    let (condition_status, reason, message) = if expiring {
        (
            "True",
            EXPIRING_SOON,
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
            "Valid",
            format!("certificate valid until {}", synced.certificate.not_after),
        )
    };
    set_condition(
        &mut status.conditions,
        Condition {
            type_: EXPIRING_SOON.to_string(),
            status: condition_status.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            last_transition_time: now.to_string(),
            observed_generation: status.observed_generation,
        },
    );
    (expiring && !was_expiring).then(|| EventToEmit {
        warning: true,
        reason: EXPIRING_SOON.to_string(),
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
) -> Option<RotationStatus> {
    let previous = previous?;
    let before = previous.certificate.as_ref()?;
    if before.sha256_fingerprint != synced.certificate.sha256_fingerprint {
        return Some(RotationStatus {
            from_version_id: previous
                .source
                .as_ref()
                .map(|source| source.version_id.clone())
                .unwrap_or_default(),
            to_version_id: synced.version_id.clone(),
            sha256_fingerprint: synced.certificate.sha256_fingerprint.clone(),
            time: now.to_string(),
            restarted_workloads: Vec::new(),
            complete: false,
        });
    }
    previous.last_rotation.clone()
}

/// An Event to emit: only on a change (new version or certificate, or a new failure reason), so a
/// failure that persists across reconciles, or an operator restart, does not repeat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventToEmit {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

pub fn event_for(
    previous: Option<&MtlsIdentityStatus>,
    outcome: &Result<Synced, SyncFailure>,
) -> Option<EventToEmit> {
    let previous_ready =
        previous.and_then(|status| status.conditions.iter().find(|c| c.type_ == READY));
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
                reason: if rotated { "Rotated" } else { REASON_SYNCED }.to_string(),
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
                reason: failure.reason().to_string(),
                note: failure.to_string(),
            })
        }
    }
}

/// An identity's phase in its refresh interval, in [0, 1), from a hash of its uid: stable across
/// restarts and leader changes, different between identities.
pub fn refresh_phase(uid: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(uid.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The next refresh of a healthy identity: at its own phase of the interval, at least half an
/// interval from now (so between 0.5 and 1.5 intervals), so identities created or restarted together
/// spread over the whole interval instead of refreshing in waves.
pub fn next_refresh(refresh: Duration, phase: f64, now_unix_ms: u64) -> Duration {
    let period = u64::try_from(refresh.as_millis())
        .unwrap_or(u64::MAX)
        .max(2);
    let offset = (phase.clamp(0.0, 1.0) * period as f64) as u64 % period;
    let position = (now_unix_ms % period + period - offset) % period;
    let mut wait = period - position;
    if wait < period / 2 {
        wait += period;
    }
    Duration::from_millis(wait)
}

/// When to look again. Healthy: at the refresh interval with up to 10% jitter, so a fleet created
/// together does not poll together. Throttled or unavailable: exponential backoff from 5s. Not
/// found or denied: slowly, as a person must act first. Bad material: at the refresh interval.
pub fn requeue_after(
    refresh_interval: Duration,
    outcome: &Result<Synced, SyncFailure>,
    consecutive_failures: u32,
    jitter_fraction: f64,
) -> Duration {
    let jitter = |base: Duration| base + base.mul_f64(jitter_fraction.clamp(0.0, 1.0) * 0.1);
    let backoff = |cap: Duration| {
        let exponent = consecutive_failures.saturating_sub(1).min(16);
        Duration::from_secs(5)
            .saturating_mul(1u32 << exponent)
            .min(cap)
    };
    let slow = refresh_interval.min(Duration::from_secs(300));
    match outcome {
        Ok(_) => jitter(refresh_interval),
        Err(SyncFailure::Source(SourceError::Throttled { .. })) => {
            jitter(backoff(Duration::from_secs(900)))
        }
        Err(SyncFailure::Source(SourceError::Unavailable { .. })) => {
            jitter(backoff(slow.max(Duration::from_secs(5))))
        }
        Err(SyncFailure::Source(_)) => jitter(slow),
        Err(_) => jitter(refresh_interval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced(version: &str, fingerprint: &str) -> Synced {
        Synced {
            arn: "arn:aws:secretsmanager:us-east-1:1:secret:ns/x-AbCdEf".into(),
            version_id: version.into(),
            certificate: CertificateStatus {
                serial_number: "01".into(),
                sha256_fingerprint: fingerprint.into(),
                not_after: "2030-01-01T00:00:00Z".into(),
                ..Default::default()
            },
            not_after_unix: 1_893_456_000,
            secret_name: "x".into(),
        }
    }

    fn denied() -> SyncFailure {
        SyncFailure::Source(SourceError::AccessDenied {
            secret_id: "ns/x".into(),
            detail: "AccessDeniedException".into(),
        })
    }

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
        assert_eq!(ready.last_transition_time, "2026-01-03T00:00:00Z");
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
        assert_eq!(rotated.as_deref(), Some("Rotated"));

        let failed = next_status(Some(&first), Some(1), &Err(denied()), "t");
        let warning = event_for(Some(&first), &Err(denied())).filter(|e| e.warning);
        assert_eq!(warning.map(|e| e.reason).as_deref(), Some("AccessDenied"));
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
        assert_eq!(event.map(|e| e.reason).as_deref(), Some("ExpiringSoon"));
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
            rotation(None, &synced("v1", "f1"), "t0").is_none(),
            "first sync"
        );
        assert!(
            rotation(Some(&first), &synced("v1", "f1"), "t1").is_none(),
            "resync"
        );
        let rotated = rotation(Some(&first), &synced("v2", "f2"), "t2");
        let rotated = rotated.as_ref();
        assert_eq!(rotated.map(|r| r.from_version_id.as_str()), Some("v1"));
        assert_eq!(rotated.map(|r| r.to_version_id.as_str()), Some("v2"));
        assert_eq!(rotated.map(|r| r.complete), Some(false));
        let mut after = next_status(Some(&first), Some(1), &Ok(synced("v2", "f2")), "t2");
        after.last_rotation = rotated.cloned();
        // Replayed (operator restart): the same rotation, not a new one.
        assert_eq!(
            rotation(Some(&after), &synced("v2", "f2"), "t3").as_ref(),
            rotated
        );
    }

    #[test]
    fn requeue_backs_off_per_reason() {
        let hour = Duration::from_secs(3600);
        let ok = requeue_after(hour, &Ok(synced("v", "f")), 0, 0.0);
        assert_eq!(ok, hour);
        assert_eq!(
            requeue_after(hour, &Ok(synced("v", "f")), 0, 1.0),
            hour + hour / 10
        );

        let throttled = |n| {
            requeue_after(
                hour,
                &Err(SyncFailure::Source(SourceError::Throttled {
                    secret_id: "x".into(),
                })),
                n,
                0.0,
            )
        };
        assert_eq!(throttled(1), Duration::from_secs(5));
        assert_eq!(throttled(2), Duration::from_secs(10));
        assert_eq!(throttled(4), Duration::from_secs(40));
        assert_eq!(throttled(30), Duration::from_secs(900), "capped");

        assert_eq!(
            requeue_after(hour, &Err(denied()), 3, 0.0),
            Duration::from_secs(300)
        );
        let short = Duration::from_secs(10);
        assert_eq!(requeue_after(short, &Err(denied()), 3, 0.0), short);
        let conflict = Err(SyncFailure::TargetConflict {
            secret: "ns/x".into(),
        });
        assert_eq!(requeue_after(hour, &conflict, 1, 0.0), hour);
    }

    #[test]
    fn ownership_needs_the_controller_reference_with_our_uid() {
        let with_owner = |uid: &str, controller: Option<bool>| Secret {
            metadata: ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    uid: uid.into(),
                    controller,
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(is_owned_by(&with_owner("u1", Some(true)).metadata, "u1"));
        assert!(!is_owned_by(&with_owner("u2", Some(true)).metadata, "u1"));
        assert!(!is_owned_by(&with_owner("u1", None).metadata, "u1"));
        assert!(!is_owned_by(&Secret::default().metadata, "u1"));
    }

    fn source(secret_id: &str, region: Option<&str>, ca: Option<&str>) -> SourceSpec {
        SourceSpec {
            secret_id: secret_id.into(),
            region: region.map(String::from),
            version_stage: None,
            version_id: None,
            format: crate::api::SourceFormat::Pem,
            fields: None,
            ca_secret_id: ca.map(String::from),
        }
    }

    #[test]
    fn refreshes_spread_over_the_interval() {
        let refresh = Duration::from_secs(120);
        let now = 1_900_000_000_000u64;
        let mut buckets = [0usize; 10];
        for index in 0..10_000 {
            let phase = refresh_phase(&format!("6f1c2a9e-uid-{index}"));
            let wait = next_refresh(refresh, phase, now);
            assert!(
                wait >= refresh / 2 && wait < refresh + refresh / 2,
                "{wait:?}"
            );
            let at = (now + wait.as_millis() as u64) % 120_000;
            buckets[(at / 12_000) as usize] += 1;
        }
        for (bucket, count) in buckets.iter().enumerate() {
            assert!(
                (800..=1200).contains(count),
                "bucket {bucket}: {count} of 10,000"
            );
        }
        // Stable: the same identity lands on the same slot, whenever it last synced.
        let phase = refresh_phase("uid-a");
        let slot =
            |now: u64| (now + next_refresh(refresh, phase, now).as_millis() as u64) % 120_000;
        assert_eq!(slot(now), slot(now + 7_000));
    }

    #[test]
    fn api_errors_back_off_exponentially() {
        assert_eq!(api_error_backoff(1, 0.0), Duration::from_secs(5));
        assert_eq!(api_error_backoff(2, 0.0), Duration::from_secs(10));
        assert_eq!(api_error_backoff(7, 0.0), Duration::from_secs(300));
        assert_eq!(api_error_backoff(70, 0.0), Duration::from_secs(300));
        assert!(api_error_backoff(3, 1.0) <= Duration::from_secs(22));
    }

    #[test]
    fn source_ids_are_checked_before_any_call() {
        let policy = SourcePolicy::new(
            vec![],
            Some("123456789012".into()),
            vec!["eu-west-1".into(), "eu-central-1".into()],
        );
        let check = |spec: &SourceSpec| check_source(spec, "payments", &policy, Some("eu-west-1"));
        let Ok((main, None)) = check(&source("payments/x", None, None)) else {
            panic!("a name under the namespace in the default region is allowed");
        };
        assert_eq!(main.request.region, "eu-west-1");
        let Ok((main, _)) = check(&source("payments/x", Some("eu-central-1"), None)) else {
            panic!("an allowed region");
        };
        assert_eq!(main.request.region, "eu-central-1");
        let reason = |spec: &SourceSpec| check(spec).err().map(|failure| failure.reason());
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/x-AbCdEf";
        assert_eq!(reason(&source(arn, None, None)), None);
        assert_eq!(reason(&source(arn, Some("eu-west-1"), None)), None);
        assert_eq!(
            reason(&source(arn, Some("eu-central-1"), None)),
            Some("InvalidSpec")
        );
        assert_eq!(
            reason(&source("payments/x", Some("us-east-1"), None)),
            Some("SourceNotAllowed")
        );
        assert_eq!(
            reason(&source("payments/x", Some("../../x"), None)),
            Some("InvalidSpec")
        );
        assert_eq!(
            reason(&source("payments/x", None, Some("billing/ca"))),
            Some("SourceNotAllowed")
        );
        assert_eq!(
            reason(&source(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/x:billing/y",
                None,
                None
            )),
            Some("InvalidSpec")
        );
        let no_region = check_source(&source("payments/x", None, None), "payments", &policy, None);
        assert_eq!(no_region.err().map(|f| f.reason()), Some("InvalidSpec"));
        // The refusal names neither the patterns nor other namespaces.
        let refused = check(&source("billing/x", None, None))
            .err()
            .map(|f| f.to_string());
        assert!(refused.is_some_and(|text| !text.contains('*') && !text.contains("allowed:")));
    }

    #[test]
    fn failure_reasons_are_fixed_strings() {
        let reasons = [
            SyncFailure::NotAllowed {
                secret_id: "a".into(),
                namespace: "b".into(),
                denied: Denied::Name("a".into()),
            }
            .reason(),
            SyncFailure::TargetConflict { secret: "x".into() }.reason(),
            denied().reason(),
            SyncFailure::InvalidSpec("x".into()).reason(),
        ];
        assert_eq!(
            reasons,
            [
                "SourceNotAllowed",
                "TargetConflict",
                "AccessDenied",
                "InvalidSpec"
            ]
        );
    }
}
