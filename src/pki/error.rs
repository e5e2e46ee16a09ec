//! Errors of the certificate pipeline.
//!
//! Every variant names *where* the problem is (a JSON field, the PEM bundle, the CA text) and *what* is
//! wrong, never the content: these strings end up in status conditions, Events and logs, and the private
//! key must appear only in the target Secret.

use crate::api::conditions::Reason;

/// Why certificate material was rejected. Each variant maps to one fixed [`PkiError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    /// The value is larger than Secrets Manager allows, so it cannot be a genuine secret value.
    #[error("{what} is {size} bytes, over the {limit}-byte limit of a Secrets Manager secret")]
    TooLarge {
        /// Which input was too large.
        what: String,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// SecretBinary that is not UTF-8 text (for example a DER or PKCS#12 file).
    #[error(
        "the binary secret value is not UTF-8 text (a DER or PKCS#12 file?); store the PEM text or JSON instead"
    )]
    BinaryNotText,

    /// A PKCS#12 source that does not open with its password, or holds no key with a certificate.
    #[error("the PKCS#12 file {detail}")]
    InvalidPkcs12 {
        /// What is wrong (never content).
        detail: String,
    },

    /// Not JSON, not a JSON object, or a field of the wrong JSON type.
    #[error("invalid JSON: {detail}")]
    InvalidJson {
        /// What is wrong (position or field name; never content).
        detail: String,
    },

    /// A required JSON field is absent.
    #[error("JSON field \"{field}\" is missing")]
    MissingField {
        /// The JSON field name.
        field: String,
    },

    /// A JSON field is present but empty or whitespace.
    #[error("JSON field \"{field}\" is empty")]
    EmptyField {
        /// The JSON field name.
        field: String,
    },

    /// PEM, base64 or DER that does not parse.
    #[error("invalid PEM in {origin}: {detail}")]
    InvalidPem {
        /// Where: `field "certificate"`, `PEM bundle`, ...
        origin: String,
        /// What is wrong.
        detail: String,
    },

    /// No certificate where the leaf was expected.
    #[error("no certificate in {origin}")]
    MissingCertificate {
        /// Where the certificate was expected.
        origin: String,
    },

    /// No private key where one was expected.
    #[error("no private key in {origin}")]
    MissingPrivateKey {
        /// Where the key was expected.
        origin: String,
    },

    /// More than one private key, so which one belongs to the leaf is ambiguous.
    #[error("{count} private keys in {origin}; exactly one is allowed")]
    MultipleKeys {
        /// Where the keys were found.
        origin: String,
        /// How many.
        count: usize,
    },

    /// A passphrase-protected key; the operator has no passphrase.
    #[error("the private key in {origin} is encrypted; store it unencrypted")]
    EncryptedKey {
        /// Where the key was found.
        origin: String,
    },

    /// A key type the TLS stack cannot use.
    #[error(
        "unsupported private key in {origin}: {detail} (supported: RSA 2048-8192 bits, ECDSA P-256/P-384, Ed25519)"
    )]
    UnsupportedKey {
        /// Where the key was found.
        origin: String,
        /// Which kind of key it is.
        detail: String,
    },

    /// The private key belongs to another certificate.
    #[error(
        "the private key does not match the public key of the leaf certificate (subject \"{subject}\")"
    )]
    KeyMismatch {
        /// Subject of the leaf certificate, to tell the person which certificate was meant.
        subject: String,
    },

    /// The chain does not verify to the CA (or the chain in the certificate field is not a chain).
    #[error("certificate chain is invalid: {detail}")]
    ChainInvalid {
        /// Why, briefly.
        detail: String,
    },

    /// A certificate is not valid yet.
    #[error("{which} is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// Which certificate, e.g. `leaf certificate "CN=a"`.
        which: String,
        /// notBefore in RFC 3339.
        not_before: String,
        /// The time of the check in RFC 3339.
        now: String,
    },

    /// A certificate has expired.
    #[error("{which} expired at {not_after} (now {now})")]
    Expired {
        /// Which certificate, e.g. `leaf certificate "CN=a"`.
        which: String,
        /// notAfter in RFC 3339.
        not_after: String,
        /// The time of the check in RFC 3339.
        now: String,
    },

    /// The leaf has an Extended Key Usage extension that does not allow client authentication.
    #[error(
        "the leaf certificate's Extended Key Usage does not include clientAuth (it has: {present}); the external API would reject it"
    )]
    MissingClientAuth {
        /// The key purposes the leaf does have.
        present: String,
    },
}

impl PkiError {
    /// Fixed reason for status conditions, Events and metric labels.
    pub fn reason(&self) -> Reason {
        match self {
            PkiError::TooLarge { .. } => Reason::TooLarge,
            PkiError::BinaryNotText => Reason::BinaryNotText,
            PkiError::InvalidPkcs12 { .. } => Reason::InvalidPkcs12,
            PkiError::InvalidJson { .. } => Reason::InvalidJson,
            PkiError::MissingField { .. } => Reason::MissingField,
            PkiError::EmptyField { .. } => Reason::EmptyField,
            PkiError::InvalidPem { .. } => Reason::InvalidPem,
            PkiError::MissingCertificate { .. } => Reason::MissingCertificate,
            PkiError::MissingPrivateKey { .. } => Reason::MissingPrivateKey,
            PkiError::MultipleKeys { .. } => Reason::MultipleKeys,
            PkiError::EncryptedKey { .. } => Reason::EncryptedKey,
            PkiError::UnsupportedKey { .. } => Reason::UnsupportedKey,
            PkiError::KeyMismatch { .. } => Reason::KeyMismatch,
            PkiError::ChainInvalid { .. } => Reason::ChainInvalid,
            PkiError::NotYetValid { .. } => Reason::NotYetValid,
            PkiError::Expired { .. } => Reason::Expired,
            PkiError::MissingClientAuth { .. } => Reason::MissingClientAuth,
        }
    }

    /// Every reason this module can produce, for metrics pre-registration and docs.
    pub const REASONS: &'static [Reason] = &[
        Reason::TooLarge,
        Reason::BinaryNotText,
        Reason::InvalidPkcs12,
        Reason::InvalidJson,
        Reason::MissingField,
        Reason::EmptyField,
        Reason::InvalidPem,
        Reason::MissingCertificate,
        Reason::MissingPrivateKey,
        Reason::MultipleKeys,
        Reason::EncryptedKey,
        Reason::UnsupportedKey,
        Reason::KeyMismatch,
        Reason::ChainInvalid,
        Reason::NotYetValid,
        Reason::Expired,
        Reason::MissingClientAuth,
    ];

    /// One error of each variant, in the order of [`PkiError::REASONS`] (tests).
    #[cfg(test)]
    pub(crate) fn samples() -> Vec<PkiError> {
        vec![
            PkiError::TooLarge {
                what: "x".into(),
                size: 1,
                limit: 0,
            },
            PkiError::BinaryNotText,
            PkiError::InvalidPkcs12 { detail: "x".into() },
            PkiError::InvalidJson { detail: "x".into() },
            PkiError::MissingField { field: "x".into() },
            PkiError::EmptyField { field: "x".into() },
            PkiError::InvalidPem {
                origin: "x".into(),
                detail: "x".into(),
            },
            PkiError::MissingCertificate { origin: "x".into() },
            PkiError::MissingPrivateKey { origin: "x".into() },
            PkiError::MultipleKeys {
                origin: "x".into(),
                count: 2,
            },
            PkiError::EncryptedKey { origin: "x".into() },
            PkiError::UnsupportedKey {
                origin: "x".into(),
                detail: "x".into(),
            },
            PkiError::KeyMismatch {
                subject: "x".into(),
            },
            PkiError::ChainInvalid { detail: "x".into() },
            PkiError::NotYetValid {
                which: "x".into(),
                not_before: "x".into(),
                now: "x".into(),
            },
            PkiError::Expired {
                which: "x".into(),
                not_after: "x".into(),
                now: "x".into(),
            },
            PkiError::MissingClientAuth {
                present: "x".into(),
            },
        ]
    }

    pub(crate) fn invalid_pem(origin: &str, detail: impl Into<String>) -> Self {
        PkiError::InvalidPem {
            origin: origin.to_owned(),
            detail: detail.into(),
        }
    }
}
