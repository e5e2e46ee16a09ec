//! Certificate material by secret id and version, behind a trait: AWS Secrets Manager in production,
//! a fake in unit tests. One shared client per region.

mod aws;
pub mod policy;

use std::fmt;

use futures::future::BoxFuture;

pub use crate::api::VersionSelector;
pub use aws::SecretsManagerSource;

/// Which secret, where, at which version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretRef {
    pub secret_id: String,
    pub region: Option<String>,
    pub version: VersionSelector,
}

/// A secret's value as stored: text or bytes. Debug never prints the value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretContent {
    Text(String),
    Binary(Vec<u8>),
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
    pub arn: String,
    pub version_id: String,
    pub content: SecretContent,
}

/// Why a fetch failed; each kind has a fixed reason shared by status, Events and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("secret {secret_id} was not found in Secrets Manager ({detail})")]
    NotFound { secret_id: String, detail: String },
    #[error("access to secret {secret_id} was denied ({detail}); check the operator's IAM policy")]
    AccessDenied { secret_id: String, detail: String },
    #[error("Secrets Manager throttled the request for {secret_id}; retrying with backoff")]
    Throttled { secret_id: String },
    #[error("secret {secret_id} has neither SecretString nor SecretBinary")]
    Empty { secret_id: String },
    #[error("Secrets Manager request for {secret_id} failed: {detail}")]
    Unavailable { secret_id: String, detail: String },
}

impl SourceError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "SourceNotFound",
            Self::AccessDenied { .. } => "AccessDenied",
            Self::Throttled { .. } => "Throttled",
            Self::Empty { .. } => "EmptySource",
            Self::Unavailable { .. } => "SourceUnavailable",
        }
    }
}

/// Fetches certificate material. Implementations share clients and may cache.
pub trait SecretSource: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>>;
}
