//! Pure certificate logic: raw secret value in, validated `kubernetes.io/tls` Secret data and
//! certificate facts out, or a [`PkiError`] with a fixed [`PkiError::reason`].
//!
//! No Kubernetes, no AWS, no I/O, no clocks (time is a parameter), so every rule is unit-testable.
//!
//! Accepted input:
//! * `Json` format ([`parse_json`]): an object whose certificate / private key / CA fields hold PEM
//!   text, base64 of PEM text, or base64 of DER (certificates may be several DER certificates back to
//!   back; keys PKCS#8, PKCS#1 or SEC1). PEM stored with literal `\n` escapes is accepted.
//! * `Pem` format ([`parse_pem_bundle`]): one bundle with the leaf (first `CERTIFICATE` block),
//!   intermediates and exactly one private key, in any order; CA text optionally from elsewhere.
//! * SecretBinary ([`decode_binary`]): only when it is UTF-8 text, then parsed as above.
//!
//! Private key bytes never reach an error, `Debug` or `Display`: errors name the field and the problem.

mod error;
pub mod integrity;
mod key;
pub mod keystore;
mod parse;
mod pem;
mod validate;

#[cfg(test)]
mod tests;

pub use error::PkiError;
pub use key::{KeyEncoding, KeyKind, PrivateKey, SecretPem};
pub use parse::{decode_binary, parse_json, parse_pem_bundle};
pub use validate::{certificate_facts, certified_key, validate};

use std::fmt;

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// Secrets Manager's limit on a secret value; anything larger cannot have come from there.
pub const MAX_SECRET_SIZE: usize = 65536;

/// JSON field names of the `Json` format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFields {
    /// Leaf certificate, optionally followed by intermediates.
    pub certificate: String,
    /// The private key of the leaf.
    pub private_key: String,
    /// CA certificates (optional field).
    pub ca: String,
}

impl Default for JsonFields {
    fn default() -> Self {
        JsonFields {
            certificate: "certificate".to_owned(),
            private_key: "private_key".to_owned(),
            ca: "ca".to_owned(),
        }
    }
}

/// A secret value as stored: SecretString or SecretBinary.
#[derive(Clone, Copy)]
pub enum Stored<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

impl<'a> Stored<'a> {
    /// The value as text: SecretString as it is, SecretBinary when it is UTF-8 text.
    pub fn text(self) -> Result<&'a str, PkiError> {
        match self {
            Stored::Text(text) => Ok(text),
            Stored::Binary(bytes) => decode_binary(bytes),
        }
    }
}

/// How a stored value holds the material (`spec.source.format` and what goes with it).
#[derive(Clone, Copy)]
pub enum StoredFormat<'a> {
    Json(&'a JsonFields),
    /// A PEM bundle, with the CA text from a separate secret or file, if any.
    Pem {
        ca: Option<&'a str>,
    },
    /// A PKCS#12 file (SecretBinary) or its JSON form (SecretString), with the password from
    /// elsewhere, if any.
    Pkcs12 {
        password: Option<&'a str>,
    },
}

/// Parses a stored value into material, exactly as the operator does for every format.
pub fn read_material(stored: Stored<'_>, format: StoredFormat<'_>) -> Result<Material, PkiError> {
    match format {
        StoredFormat::Json(fields) => parse_json(stored.text()?, fields),
        StoredFormat::Pem { ca } => parse_pem_bundle(stored.text()?, ca),
        StoredFormat::Pkcs12 { password } => match (stored, password) {
            (Stored::Binary(bytes), Some(password)) => keystore::read_pkcs12(bytes, password),
            (Stored::Binary(_), None) => Err(PkiError::InvalidPkcs12 {
                detail: "is stored as SecretBinary without a password: set \
                         spec.source.passwordSecretRef"
                    .into(),
            }),
            (Stored::Text(text), password) => keystore::read_pkcs12_json(text, password),
        },
    }
}

/// Certificate material after parsing and before validation.
#[derive(Clone)]
pub struct Material {
    /// Leaf first, then intermediates, as DER.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the leaf.
    pub key: PrivateKey,
    /// CA certificates to verify the chain against; empty when none were given.
    pub ca: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("chain_len", &self.chain.len())
            .field("key", &self.key)
            .field("ca_len", &self.ca.len())
            .finish()
    }
}

/// Material that passed every check, rendered as the target Secret's data plus facts for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedIdentity {
    /// Facts about the leaf certificate.
    pub facts: CertificateFacts,
    /// `tls.crt`: PEM of the leaf then the intermediates (not the CA).
    pub tls_crt: String,
    /// `tls.key`: PEM of the key in its original encoding.
    pub tls_key: SecretPem,
    /// `ca.crt`: PEM of the CA certificates, when given.
    pub ca_crt: Option<String>,
}

impl ValidatedIdentity {
    /// The private key as DER, in the encoding `tls.key` holds (cert-manager's `key.der`).
    /// `None` only if `tls.key` were not the PEM this crate wrote.
    pub fn key_der(&self) -> Option<Vec<u8>> {
        let blocks = pem::parse_blocks(self.tls_key.expose()).ok()?;
        blocks.into_iter().next().map(|block| block.der)
    }

    /// cert-manager's `tls-combined.pem`: the private key, then the certificate chain (`tls.key`
    /// followed by `tls.crt`), for HAProxy, curl and clients that take one file.
    pub fn combined_pem(&self) -> String {
        format!("{}{}", self.tls_key.expose(), self.tls_crt)
    }

    /// Lower-case hex SHA-256 over all Secret data, to tell whether a Secret already holds exactly this
    /// content (a CA-only change alters it while the leaf fingerprint stays the same). A digest, so it
    /// is safe to store in annotations.
    pub fn content_digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, value) in [
            ("tls.crt", Some(self.tls_crt.as_str())),
            ("tls.key", Some(self.tls_key.expose())),
            ("ca.crt", self.ca_crt.as_deref()),
        ] {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            if let Some(value) = value {
                hasher.update((value.len() as u64).to_be_bytes());
                hasher.update(value.as_bytes());
            }
            hasher.update([0]);
        }
        hex::encode(hasher.finalize())
    }
}

/// Facts about the leaf certificate, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Subject DN as x509-parser prints it, e.g. `CN=client, O=Example`.
    pub subject: String,
    /// Issuer DN, same form.
    pub issuer: String,
    /// Serial number, lower-case hex without colons (OpenSSL's digits).
    pub serial_number: String,
    /// notBefore, UNIX seconds.
    pub not_before: i64,
    /// notAfter, UNIX seconds.
    pub not_after: i64,
    /// Lower-case hex SHA-256 of the leaf DER, without colons.
    pub sha256_fingerprint: String,
    /// DNS names from subjectAltName.
    pub dns_names: Vec<String>,
    /// URIs from subjectAltName (SPIFFE IDs and the like).
    pub uris: Vec<String>,
}

impl CertificateFacts {
    /// notAfter as RFC 3339, e.g. `2027-01-01T00:00:00Z`.
    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }

    /// notBefore as RFC 3339.
    pub fn not_before_rfc3339(&self) -> String {
        rfc3339(self.not_before)
    }
}

/// UNIX seconds as RFC 3339 UTC with a `Z`; falls back to the number for out-of-range times.
pub(crate) fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}
