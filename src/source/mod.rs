//! Certificate material by secret id and version, behind a trait: AWS Secrets Manager in production,
//! a fake in unit tests. One shared client per scope: a region, and the role assumed there, if any.

mod aws;
pub mod events;
pub mod fleet;
pub mod id;
pub mod index;
pub mod policy;
pub mod rate;

use std::fmt;

use futures::future::BoxFuture;

pub use crate::api::VersionSelector;
pub use aws::{
    CLUSTER_TAG, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_SESSIONS, Kept, NAMESPACE_TAG,
    SecretsManagerSource, caller_account,
};

/// Which secret, where, as whom, at which version. Built only from an id that passed
/// `id::parse_secret_id`, a region that passed the policy and a role the namespace may assume, so
/// clients are never made for unchecked regions or roles.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretRef {
    pub secret_id: String,
    pub region: String,
    /// The role the operator assumes to read it; `None`: its own credentials.
    pub role: Option<AssumedRole>,
    pub version: VersionSelector,
}

impl SecretRef {
    pub fn scope(&self) -> Scope {
        Scope {
            region: self.region.clone(),
            role: self.role.clone(),
        }
    }
}

/// An IAM role the operator assumes (STS AssumeRole, chained from its own credentials): a role of
/// another account (`spec.source.roleArn`), or the tenant role (`--tenant-role-arn`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssumedRole {
    pub arn: String,
    pub external_id: Option<String>,
    /// With per-namespace sessions on: the namespace whose session this is, passed as the session
    /// tag `kubernetes-namespace` (and named in the session name), so that IAM itself can hold the
    /// session to that namespace's secrets. One session per role and namespace.
    pub namespace: Option<String>,
}

/// Where calls go and with which credentials: one client, one rate and one batch queue per scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub region: String,
    pub role: Option<AssumedRole>,
}

impl Scope {
    /// The operator's own credentials in `region`.
    pub fn own(region: &str) -> Self {
        Self {
            region: region.to_string(),
            role: None,
        }
    }
}

/// A secret's value as stored: text or bytes. Debug never prints the value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretContent {
    Text(String),
    Binary(Vec<u8>),
}

/// The value (a private key among it) is overwritten when dropped.
impl Drop for SecretContent {
    fn drop(&mut self) {
        match self {
            Self::Text(text) => zeroize::Zeroize::zeroize(text),
            Self::Binary(bytes) => zeroize::Zeroize::zeroize(bytes),
        }
    }
}

impl SecretContent {
    /// The value as the certificate parser takes it.
    pub fn stored(&self) -> crate::pki::Stored<'_> {
        match self {
            Self::Text(text) => crate::pki::Stored::Text(text),
            Self::Binary(bytes) => crate::pki::Stored::Binary(bytes),
        }
    }
}

impl fmt::Debug for SecretContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(text) => write!(f, "Text(<{} bytes redacted>)", text.len()),
            Self::Binary(bytes) => write!(f, "Binary(<{} bytes redacted>)", bytes.len()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedSecret {
    /// The canonical ARN and name Secrets Manager returned: checked against the policy again.
    pub arn: String,
    pub name: String,
    pub version_id: String,
    pub content: SecretContent,
}

/// Why a fetch failed; each kind has a fixed reason shared by status, Events and metrics. The text
/// (shown in status and Events) is a fixed sentence: AWS's own message, which can name the role, the
/// account or a KMS key, stays in `detail`, which only the operator's log shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error(
        "secret {secret_id} (or the version asked for) was not found in Secrets Manager, or is \
         scheduled for deletion; check spec.source.secretId, versionId and region"
    )]
    NotFound { secret_id: String, detail: String },
    #[error(
        "AWS denied the operator access to secret {secret_id}; grant its role \
         secretsmanager:GetSecretValue (and kms:Decrypt for a customer-managed key) on it"
    )]
    AccessDenied { secret_id: String, detail: String },
    #[error(
        "AWS refused to let the operator assume role {role} to read secret {secret_id}; the role's \
         trust policy must allow the operator's role to call sts:AssumeRole (with the externalId, \
         if one is set)"
    )]
    RoleDenied {
        secret_id: String,
        role: String,
        detail: String,
    },
    #[error("Secrets Manager throttled the request for {secret_id}; retrying with backoff")]
    Throttled { secret_id: String },
    #[error("secret {secret_id} has neither SecretString nor SecretBinary")]
    Empty { secret_id: String },
    #[error("Secrets Manager could not be reached for secret {secret_id} ({detail}); retrying")]
    Unavailable { secret_id: String, detail: String },
}

impl SourceError {
    /// AWS's own words, for the operator's log only.
    pub fn detail(&self) -> &str {
        match self {
            Self::NotFound { detail, .. }
            | Self::AccessDenied { detail, .. }
            | Self::RoleDenied { detail, .. }
            | Self::Unavailable { detail, .. } => detail,
            Self::Throttled { .. } | Self::Empty { .. } => "",
        }
    }

    /// Every reason [`Self::reason`] gives.
    pub const REASONS: [crate::api::conditions::Reason; 5] = {
        use crate::api::conditions::Reason;
        [
            Reason::SourceNotFound,
            Reason::AccessDenied,
            Reason::Throttled,
            Reason::EmptySource,
            Reason::SourceUnavailable,
        ]
    };

    pub fn reason(&self) -> crate::api::conditions::Reason {
        use crate::api::conditions::Reason;
        match self {
            Self::NotFound { .. } => Reason::SourceNotFound,
            Self::AccessDenied { .. } | Self::RoleDenied { .. } => Reason::AccessDenied,
            Self::Throttled { .. } => Reason::Throttled,
            Self::Empty { .. } => Reason::EmptySource,
            Self::Unavailable { .. } => Reason::SourceUnavailable,
        }
    }
}

/// What DescribeSecret or ListSecrets says about a secret, without its value.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DescribedSecret {
    pub arn: String,
    pub name: String,
    /// Version id → its staging labels.
    pub versions: Vec<(String, Vec<String>)>,
    /// When the secret last changed (Unix seconds), for the detection lag.
    pub last_changed_unix: Option<i64>,
}

impl DescribedSecret {
    /// The version that carries `stage`, if any.
    pub fn version_with_stage(&self, stage: &str) -> Option<&str> {
        self.versions
            .iter()
            .find(|(_, stages)| stages.iter().any(|s| s == stage))
            .map(|(version, _)| version.as_str())
    }
}

/// Fetches certificate material, and tells versions without reading values (for the sweep).
/// Implementations share clients, batch and coalesce concurrent reads.
pub trait SecretSource: Send + Sync + 'static {
    /// A value read for namespace `flow` (the tenant it is read for): where reads wait in line
    /// (batches), each namespace waits in its own queue and the queues are served in turn.
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
        flow: &'a str,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>>;

    /// DescribeSecret: the secret's versions and stages, no value, no KMS decrypt.
    fn describe<'a>(
        &'a self,
        secret: &'a SecretRef,
    ) -> BoxFuture<'a, Result<DescribedSecret, SourceError>> {
        Box::pin(async move {
            Err(SourceError::Unavailable {
                secret_id: secret.secret_id.clone(),
                detail: "this source cannot describe secrets".into(),
            })
        })
    }

    /// ListSecrets in `scope`: every secret (`names` empty) or those whose name starts with one
    /// of `names` (at most 10), with their versions and stages.
    fn list<'a>(
        &'a self,
        scope: &'a Scope,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<DescribedSecret>, SourceError>> {
        let _ = names;
        Box::pin(async move {
            Err(SourceError::Unavailable {
                secret_id: format!("(list in {})", scope.region),
                detail: "this source cannot list secrets".into(),
            })
        })
    }
}
