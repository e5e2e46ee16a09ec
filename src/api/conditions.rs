//! The operator's one vocabulary: the condition types of an identity's status, every fixed reason
//! (conditions, Events, metric labels, log fields) and the outcome labels of its metrics. Every
//! error's `reason()` returns a [`Reason`]; the README's reasons table is held against
//! [`Reason::READY_FAILURES`] by a test, so the two cannot drift apart.

/// An enum whose variants are fixed words, each with its text.
macro_rules! words {
    ($(#[$meta:meta])* $name:ident { $($(#[$variant_meta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }
    };
}

words! {
    /// The condition types of an MtlsIdentity's status.
    ConditionType {
        /// The Secret holds the source's current, validated material.
        Ready = "Ready",
        /// Secrets Manager answered the last check (False during a transient failure).
        SourceReachable = "SourceReachable",
        /// The certificate in the Secret expires within `warnBefore`.
        ExpiringSoon = "ExpiringSoon",
        /// Restarts for a rotation could not be made (present only then).
        Restarts = "Restarts",
        /// The operator-managed egress proxy (present only with `spec.egress`).
        Egress = "Egress",
    }
}

words! {
    /// Every fixed reason the operator gives: in conditions, Events, metric labels and logs.
    Reason {
        // Ready=True.
        Synced = "Synced",
        // Ready=False (the README's reasons table).
        SourceNotAllowed = "SourceNotAllowed",
        InvalidSpec = "InvalidSpec",
        SourceNotFound = "SourceNotFound",
        AccessDenied = "AccessDenied",
        Throttled = "Throttled",
        SourceUnavailable = "SourceUnavailable",
        EmptySource = "EmptySource",
        InvalidJson = "InvalidJson",
        MissingField = "MissingField",
        EmptyField = "EmptyField",
        InvalidPem = "InvalidPem",
        BinaryNotText = "BinaryNotText",
        TooLarge = "TooLarge",
        InvalidPkcs12 = "InvalidPkcs12",
        MissingCertificate = "MissingCertificate",
        MissingPrivateKey = "MissingPrivateKey",
        MultipleKeys = "MultipleKeys",
        EncryptedKey = "EncryptedKey",
        UnsupportedKey = "UnsupportedKey",
        KeyMismatch = "KeyMismatch",
        ChainInvalid = "ChainInvalid",
        Expired = "Expired",
        NotYetValid = "NotYetValid",
        MissingClientAuth = "MissingClientAuth",
        KeystorePasswordMissing = "KeystorePasswordMissing",
        KeystoreFailed = "KeystoreFailed",
        TargetConflict = "TargetConflict",
        // SourceReachable and ExpiringSoon.
        Reachable = "Reachable",
        ExpiringSoon = "ExpiringSoon",
        Valid = "Valid",
        // Restarts and Egress, and reconcile errors.
        KubernetesApiError = "KubernetesApiError",
        InvalidStatus = "InvalidStatus",
        EgressReady = "EgressReady",
        EgressWaiting = "EgressWaiting",
        EgressDisabled = "EgressDisabled",
        EgressInvalid = "EgressInvalid",
        EgressConflict = "EgressConflict",
        EgressNotAllowed = "EgressNotAllowed",
        // Events only.
        Rotated = "Rotated",
        SourceUnreachable = "SourceUnreachable",
        SourceReachable = "SourceReachable",
        RestartTriggered = "RestartTriggered",
        RestartFailed = "RestartFailed",
        RolloutPaused = "RolloutPaused",
        WorkloadNotFound = "WorkloadNotFound",
        WorkloadNotUsingSecret = "WorkloadNotUsingSecret",
        AnnotateDisabled = "AnnotateDisabled",
        RestartStalled = "RestartStalled",
        /// A refresh request (`mtls-operator.io/refresh-requested-at`) was honoured.
        RefreshHonoured = "RefreshHonoured",
        // The leader Lease (logs).
        LeaseError = "LeaseError",
        LeaseLost = "LeaseLost",
        // The egress proxy process (logs).
        InvalidUpstream = "InvalidUpstream",
        InvalidArgument = "InvalidArgument",
        NoTrustRoots = "NoTrustRoots",
        InvalidUpstreamCa = "InvalidUpstreamCa",
        InvalidCertificate = "InvalidCertificate",
        TlsConfig = "TlsConfig",
        BindFailed = "BindFailed",
    }
}

impl Reason {
    /// The reasons of `Ready=False`: each a Warning Event too, and a row of the README's table.
    pub const READY_FAILURES: &'static [Reason] = &[
        Reason::SourceNotAllowed,
        Reason::InvalidSpec,
        Reason::SourceNotFound,
        Reason::AccessDenied,
        Reason::Throttled,
        Reason::SourceUnavailable,
        Reason::EmptySource,
        Reason::InvalidJson,
        Reason::MissingField,
        Reason::EmptyField,
        Reason::InvalidPem,
        Reason::BinaryNotText,
        Reason::TooLarge,
        Reason::InvalidPkcs12,
        Reason::MissingCertificate,
        Reason::MissingPrivateKey,
        Reason::MultipleKeys,
        Reason::EncryptedKey,
        Reason::UnsupportedKey,
        Reason::KeyMismatch,
        Reason::ChainInvalid,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::MissingClientAuth,
        Reason::KeystorePasswordMissing,
        Reason::KeystoreFailed,
        Reason::TargetConflict,
    ];

    /// The Warning Events about restarts (the README's "More, about restarts").
    pub const RESTART_WARNINGS: &'static [Reason] = &[
        Reason::RolloutPaused,
        Reason::WorkloadNotFound,
        Reason::WorkloadNotUsingSecret,
        Reason::AnnotateDisabled,
        Reason::RestartStalled,
        Reason::RestartFailed,
    ];
}

words! {
    /// The `outcome` label of the operator's counters.
    Outcome {
        Success = "success",
        Failure = "failure",
        /// Restarts.
        Triggered = "triggered",
        Failed = "failed",
        /// Change events from the queue.
        Received = "received",
        Handled = "handled",
        UnknownSecret = "unknown_secret",
        Rejected = "rejected",
        QueueError = "queue_error",
    }
}

impl Outcome {
    pub const RESTARTS: &'static [Outcome] = &[Outcome::Triggered, Outcome::Failed];
    pub const EVENTS: &'static [Outcome] = &[
        Outcome::Received,
        Outcome::Handled,
        Outcome::UnknownSecret,
        Outcome::Rejected,
        Outcome::QueueError,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The reasons in the first column of the README's reasons table (each in backticks).
    fn readme_table_reasons() -> BTreeSet<String> {
        let readme = include_str!("../../README.md");
        let table = readme
            .split("| reason | meaning | what to do |")
            .nth(1)
            .unwrap_or_default();
        table
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .filter_map(|line| line.split('|').nth(1))
            .flat_map(|cell| {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_exactly_the_ready_failures() {
        let documented = readme_table_reasons();
        let known: BTreeSet<String> = Reason::READY_FAILURES
            .iter()
            .map(|reason| reason.to_string())
            .collect();
        assert!(
            !documented.is_empty(),
            "the README's reasons table was not found"
        );
        assert_eq!(documented, known, "README table vs Reason::READY_FAILURES");
    }

    #[test]
    fn the_readme_names_every_restart_warning() {
        let readme = include_str!("../../README.md");
        for reason in Reason::RESTART_WARNINGS {
            assert!(readme.contains(&format!("`{reason}`")), "{reason}");
        }
    }

    #[test]
    fn every_word_is_spelled_once() {
        let texts: BTreeSet<&str> = Reason::ALL.iter().map(|reason| reason.as_str()).collect();
        assert_eq!(texts.len(), Reason::ALL.len());
        for reason in Reason::ALL {
            assert_eq!(
                format!("{reason:?}"),
                reason.as_str(),
                "a reason is its variant's name"
            );
        }
    }
}
