//! The controller's one error type: Kubernetes API failures and impossible input, each with the
//! fixed reason string that status conditions, Events and metrics share.

use crate::api::conditions::Reason;

/// Errors talking to Kubernetes; the reconcile is retried.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("MtlsIdentity has no namespace")]
    NoNamespace,
    #[error("MtlsIdentity has no uid")]
    NoUid,
    /// The identity's status holds what the operator cannot have written (edited by hand).
    #[error("{0}")]
    InvalidStatus(String),
}

impl ReconcileError {
    pub fn reason(&self) -> Reason {
        match self {
            Self::Kube(_) => Reason::KubernetesApiError,
            Self::NoNamespace | Self::NoUid => Reason::InvalidSpec,
            Self::InvalidStatus(_) => Reason::InvalidStatus,
        }
    }
}
