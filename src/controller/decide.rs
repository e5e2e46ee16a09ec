//! Pure decisions about a sync: what went wrong (with one fixed reason string), whether the source
//! ids are allowed, and what status says of the last good sync. No I/O.

use crate::api::SourceSpec;
use crate::api::{CertificateStatus, MtlsIdentityStatus};
use crate::pki::{PkiError, ValidatedIdentity};
use crate::source::id::{RoleArn, SecretId, parse_region, parse_role_arn, parse_secret_id};
use crate::source::policy::{Denied, SourcePolicy};
use crate::source::{AssumedRole, SecretRef, SourceError, VersionSelector};

use crate::api::conditions::{ConditionType, Reason};

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
        "role {role} is not one that namespace {namespace} may have the operator assume (roles are \
         granted per namespace by the cluster admin, with --allowed-role); nothing was called or \
         written"
    )]
    RoleNotAllowed {
        role: String,
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
    #[error(
        "the PKCS#12 password is missing: Secret {secret} has no non-empty key {key:?}; the Secret \
         in place is kept. Create it, or fix the passwordSecretRef that names it"
    )]
    KeystorePasswordMissing { secret: String, key: String },
    #[error("{0}")]
    Keystore(#[from] crate::pki::keystore::KeystoreError),
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
            Self::NotAllowed { denied, .. } | Self::RoleNotAllowed { denied, .. } => {
                denied.to_string()
            }
            Self::Source(error) => error.detail().to_string(),
            _ => String::new(),
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Self::NotAllowed { .. } | Self::RoleNotAllowed { .. } => Reason::SourceNotAllowed,
            Self::TargetConflict { .. } => Reason::TargetConflict,
            Self::Source(error) => error.reason(),
            Self::Material { error, .. } => error.reason(),
            Self::InvalidSpec(_) => Reason::InvalidSpec,
            Self::KeystorePasswordMissing { .. } => Reason::KeystorePasswordMissing,
            Self::Keystore(_) => Reason::KeystoreFailed,
        }
    }
}

/// A source id that passed strict parsing and the policy, with the request that reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSecret {
    pub id: SecretId,
    /// The role read through, as parsed and allowed (its account is where names resolve).
    pub role: Option<RoleArn>,
    pub request: SecretRef,
}

/// The identity's source ids, checked before any AWS call: parsed strictly (else `InvalidSpec`),
/// in one region (an ARN's own, which `spec.source.region` may only repeat), through a role the
/// namespace may assume, if any, allowed by the policy (else `SourceNotAllowed`). Returns the main
/// secret and the separate CA secret, if any.
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
    // With per-namespace sessions on, every session is this namespace's (tagged with it).
    let tenant_session = policy.tenant_role().map(|_| namespace.to_string());
    let role = match &source.role_arn {
        Some(text) => {
            let arn = parse_role_arn(text)
                .map_err(|error| SyncFailure::InvalidSpec(error.to_string()))?;
            policy
                .check_role(namespace, &arn)
                .map_err(|denied| SyncFailure::RoleNotAllowed {
                    role: text.clone(),
                    namespace: namespace.to_string(),
                    denied,
                })?;
            Some((
                arn,
                AssumedRole {
                    arn: text.clone(),
                    external_id: source.external_id.clone(),
                    namespace: tenant_session.clone(),
                },
            ))
        }
        None => None,
    };
    let role_arn = role.as_ref().map(|(arn, _)| arn);
    // As whom the calls go: the identity's own role, else the namespace's session of the tenant
    // role (names still resolve in the operator's account: the tenant role must be one of it),
    // else the operator's credentials.
    let assumed = role
        .as_ref()
        .map(|(_, assumed)| assumed.clone())
        .or_else(|| {
            policy.tenant_role().map(|tenant_role| AssumedRole {
                arn: tenant_role.to_string(),
                external_id: None,
                namespace: tenant_session.clone(),
            })
        });
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
            .check_request(namespace, &id, &region, role_arn)
            .map_err(|denied| SyncFailure::NotAllowed {
                secret_id: text.to_string(),
                namespace: namespace.to_string(),
                denied,
            })?;
        Ok(CheckedSecret {
            request: SecretRef {
                secret_id: text.to_string(),
                region,
                role: assumed.clone(),
                version,
            },
            role: role_arn.cloned(),
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
        .check_resolved(
            namespace,
            &checked.id,
            &checked.request.region,
            checked.role.as_ref(),
            &arn,
            name,
        )
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
    /// The keystores were rendered again for the same certificate (a new password, alias or
    /// profile): the digest of their new inputs.
    pub keystore_changed: Option<String>,
}

pub fn certificate_status(identity: &ValidatedIdentity) -> CertificateStatus {
    facts_status(&identity.facts)
}

/// A certificate's facts as status (and `mtls-operator check`) show them.
pub fn facts_status(facts: &crate::pki::CertificateFacts) -> CertificateStatus {
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
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Ready)?;
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
        keystore_changed: None,
    })
}

/// What a sync gathered before deciding whether to read a value: the index's view of its secrets,
/// and the keystore's state against the password Secret (read once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gathered {
    /// A source the version check found deleted or scheduled for deletion.
    pub gone: Option<String>,
    /// A source's version differs from what the Secret carries, or is too old to trust (see
    /// `fleet::needs_read`), or there is no intact Secret.
    pub version_changed: bool,
    pub keystore: Keystore,
}

/// The PKCS#12 keystore, as far as the decision goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keystore {
    /// No keystore asked for.
    None,
    /// The password Secret or its key is absent; `carried`: a keystore is in the Secret now.
    PasswordMissing { carried: bool },
    /// Asked for, none carried yet (it is rendered with the next write).
    ToRender,
    /// The carried keystore was written under this password (its keyed tag says so).
    SamePassword,
    /// The password changed: the keystore is rendered again (one read, no rollout).
    PasswordChanged,
}

/// What the sync does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Refused, with the reason the user must see; the Secret in place stays.
    Refuse(Refusal),
    /// Nothing to read: the Secret and status stand.
    Unchanged,
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Deleted in Secrets Manager (whatever a read would still return).
    Gone(String),
    /// The keystore password is missing (`KeystorePasswordMissing`).
    PasswordMissing,
}

/// The ordered chain of checks that decides whether a value is read, as cert-manager's policy
/// chain does over its gathered input: the first that has something to say decides.
pub fn read_step(gathered: &Gathered) -> Step {
    type Check = fn(&Gathered) -> Option<Step>;
    const CHAIN: &[(&str, Check)] = &[
        // A keystore in place whose password is gone: say so, keep the Secret.
        ("password missing for the keystore in place", |g| {
            (g.keystore == Keystore::PasswordMissing { carried: true })
                .then_some(Step::Refuse(Refusal::PasswordMissing))
        }),
        ("deleted in Secrets Manager", |g| {
            g.gone.clone().map(|id| Step::Refuse(Refusal::Gone(id)))
        }),
        ("nothing changed", |g| {
            (!g.version_changed && g.keystore != Keystore::PasswordChanged)
                .then_some(Step::Unchanged)
        }),
        // A read is needed, but the keystore could not be rendered: no AWS call for nothing.
        ("password missing for the keystore to write", |g| {
            matches!(g.keystore, Keystore::PasswordMissing { .. })
                .then_some(Step::Refuse(Refusal::PasswordMissing))
        }),
    ];
    CHAIN
        .iter()
        .find_map(|(_, check)| check(gathered))
        .unwrap_or(Step::Read)
}

/// Values the tests of the decision modules share.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn synced(version: &str, fingerprint: &str) -> Synced {
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
            keystore_changed: None,
        }
    }

    pub fn denied() -> SyncFailure {
        SyncFailure::Source(SourceError::AccessDenied {
            secret_id: "ns/x".into(),
            detail: "AccessDeniedException".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn source(secret_id: &str, region: Option<&str>, ca: Option<&str>) -> SourceSpec {
        SourceSpec {
            secret_id: secret_id.into(),
            region: region.map(String::from),
            version_stage: None,
            version_id: None,
            format: crate::api::SourceFormat::Pem,
            fields: None,
            ca_secret_id: ca.map(String::from),
            role_arn: None,
            external_id: None,
            password_secret_ref: None,
        }
    }

    #[test]
    fn with_a_tenant_role_every_call_is_in_the_namespaces_own_session() {
        const TENANT: &str = "arn:aws:iam::123456789012:role/mtls-tenant-reader";
        const CENTRAL: &str = "arn:aws:iam::111122223333:role/mtls/payments";
        let policy = SourcePolicy::new(
            vec![],
            Some("123456789012".into()),
            vec!["eu-west-1".into()],
        )
        .with_allowed_roles(vec![
            "arn:aws:iam::111122223333:role/mtls/{namespace}".into(),
        ]);
        let session = |policy: &SourcePolicy, spec: &SourceSpec| {
            let (main, ca) = check_source(spec, "payments", policy, Some("eu-west-1"))
                .map_err(|failure| failure.to_string())?;
            Ok::<_, String>((main.request.role, ca.and_then(|ca| ca.request.role)))
        };
        let own = source("payments/x", None, Some("payments/ca"));
        let mut central = source("payments/x", None, None);
        central.role_arn = Some(CENTRAL.into());
        // Off: the operator's own credentials, or the identity's role untagged.
        assert_eq!(session(&policy, &own), Ok((None, None)));
        let (role, _) = session(&policy, &central).expect("allowed role");
        assert_eq!(role.map(|role| role.namespace), Some(None));
        // On: the tenant role's session of this namespace, for the CA as for the certificate, and
        // the identity's own role tagged the same way.
        let tagged = policy.clone().with_tenant_role(Some(TENANT.into()));
        let expected = AssumedRole {
            arn: TENANT.into(),
            external_id: None,
            namespace: Some("payments".into()),
        };
        assert_eq!(
            session(&tagged, &own),
            Ok((Some(expected.clone()), Some(expected)))
        );
        let (role, _) = session(&tagged, &central).expect("allowed role");
        let role = role.expect("a role");
        assert_eq!(
            (role.arn.as_str(), role.namespace.as_deref()),
            (CENTRAL, Some("payments"))
        );
        // The first wall still decides first: another namespace's name is refused before any call.
        assert!(session(&tagged, &source("billing/x", None, None)).is_err());
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
            Some(Reason::InvalidSpec)
        );
        assert_eq!(
            reason(&source("payments/x", Some("us-east-1"), None)),
            Some(Reason::SourceNotAllowed)
        );
        assert_eq!(
            reason(&source("payments/x", Some("../../x"), None)),
            Some(Reason::InvalidSpec)
        );
        assert_eq!(
            reason(&source("payments/x", None, Some("billing/ca"))),
            Some(Reason::SourceNotAllowed)
        );
        assert_eq!(
            reason(&source(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:payments/x:billing/y",
                None,
                None
            )),
            Some(Reason::InvalidSpec)
        );
        let no_region = check_source(&source("payments/x", None, None), "payments", &policy, None);
        assert_eq!(
            no_region.err().map(|f| f.reason()),
            Some(Reason::InvalidSpec)
        );
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
            SyncFailure::KeystorePasswordMissing {
                secret: "a/b".into(),
                key: "password".into(),
            }
            .reason(),
        ];
        assert_eq!(
            reasons,
            [
                "SourceNotAllowed",
                "TargetConflict",
                "AccessDenied",
                "InvalidSpec",
                "KeystorePasswordMissing"
            ]
        );
    }

    /// The read chain, one row per branch.
    #[test]
    fn the_read_chain_decides_in_order() {
        let gathered = |gone: Option<&str>, version_changed: bool, keystore: Keystore| Gathered {
            gone: gone.map(str::to_string),
            version_changed,
            keystore,
        };
        let missing = |carried| Keystore::PasswordMissing { carried };
        let rows = [
            (
                "steady",
                gathered(None, false, Keystore::None),
                Step::Unchanged,
            ),
            (
                "a new version",
                gathered(None, true, Keystore::None),
                Step::Read,
            ),
            (
                "a keystore that opens",
                gathered(None, false, Keystore::SamePassword),
                Step::Unchanged,
            ),
            (
                "a new password",
                gathered(None, false, Keystore::PasswordChanged),
                Step::Read,
            ),
            (
                "a keystore to render",
                gathered(None, true, Keystore::ToRender),
                Step::Read,
            ),
            (
                "deleted, even with a new version",
                gathered(Some("ns/x"), true, Keystore::None),
                Step::Refuse(Refusal::Gone("ns/x".into())),
            ),
            (
                "the password of the keystore in place is gone",
                gathered(Some("ns/x"), false, missing(true)),
                Step::Refuse(Refusal::PasswordMissing),
            ),
            (
                "no password, but nothing to write",
                gathered(None, false, missing(false)),
                Step::Unchanged,
            ),
            (
                "no password for the keystore to write: no read",
                gathered(None, true, missing(false)),
                Step::Refuse(Refusal::PasswordMissing),
            ),
        ];
        for (case, input, expected) in rows {
            assert_eq!(read_step(&input), expected, "{case}");
        }
    }
}
