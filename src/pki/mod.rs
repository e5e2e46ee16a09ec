//! Pure certificate logic: turn the content of a Secrets Manager secret into validated Secret data
//! and certificate facts, or one specific error. No Kubernetes, no AWS, no I/O.
//!
//! Private key material never appears in an error, in `Debug` or in `Display`: errors name the field
//! and the problem only.

use std::fmt;

use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    UnixTime,
};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Secrets Manager's limit for a secret value.
pub const MAX_SECRET_BYTES: usize = 65_536;

/// JSON field names of format `Json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFields {
    pub certificate: String,
    pub private_key: String,
    pub ca: String,
}

impl Default for JsonFields {
    fn default() -> Self {
        Self {
            certificate: "certificate".into(),
            private_key: "private_key".into(),
            ca: "ca".into(),
        }
    }
}

/// A private key as found: its DER and its encoding. Debug never prints it.
pub struct PrivateKey(PrivateKeyDer<'static>);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Certificate material before validation.
#[derive(Debug)]
pub struct Material {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKey,
    /// CA certificates the chain must lead to; empty when none was given.
    pub ca: Vec<CertificateDer<'static>>,
}

/// PEM text of a private key. Debug and Display never show it; `expose` does, for the Secret only.
pub struct SecretPem(String);

impl SecretPem {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

#[derive(Debug)]
pub struct ValidatedIdentity {
    pub facts: CertificateFacts,
    /// PEM: leaf, then intermediates.
    pub tls_crt: String,
    /// PEM of the key in its original encoding.
    pub tls_key: SecretPem,
    /// PEM of the CA certificates, when known.
    pub ca_crt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex, no colons.
    pub serial_number: String,
    /// UNIX seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Lowercase hex SHA-256 of the leaf's DER, no colons.
    pub sha256_fingerprint: String,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

impl CertificateFacts {
    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }
    pub fn not_before_rfc3339(&self) -> String {
        rfc3339(self.not_before)
    }
}

/// Why material was refused. `reason()` is the fixed string status, Events and metrics share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error("the secret value is not a JSON object: {0}")]
    InvalidJson(String),
    #[error("the JSON has no field {0:?}")]
    MissingField(String),
    #[error("the JSON field {0:?} is empty")]
    EmptyField(String),
    #[error("{field}: {problem}")]
    InvalidPem { field: String, problem: String },
    #[error("the secret is binary and not UTF-8 text; store PEM or JSON text")]
    BinaryNotText,
    #[error("the secret value is {0} bytes, over Secrets Manager's 65536-byte limit")]
    TooLarge(usize),
    #[error("{0}: no certificate found")]
    MissingCertificate(String),
    #[error("{0}: no private key found")]
    MissingPrivateKey(String),
    #[error("{0}: {1} private keys found; exactly one is allowed")]
    MultipleKeys(String, usize),
    #[error(
        "{0}: the private key is encrypted; store it unencrypted (the operator has no passphrase)"
    )]
    EncryptedKey(String),
    #[error(
        "{field}: unsupported private key type ({kind}); use RSA, ECDSA P-256/P-384 or Ed25519"
    )]
    UnsupportedKey { field: String, kind: String },
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    #[error("the certificate chain does not lead to the given CA: {0}")]
    ChainInvalid(String),
    #[error("the certificate expired at {0}")]
    Expired(String),
    #[error("the certificate is not valid before {0}")]
    NotYetValid(String),
    #[error(
        "the certificate's extended key usage does not allow client authentication (clientAuth)"
    )]
    MissingClientAuth,
}

impl PkiError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "InvalidJson",
            Self::MissingField(_) => "MissingField",
            Self::EmptyField(_) => "EmptyField",
            Self::InvalidPem { .. } => "InvalidPem",
            Self::BinaryNotText => "BinaryNotText",
            Self::TooLarge(_) => "TooLarge",
            Self::MissingCertificate(_) => "MissingCertificate",
            Self::MissingPrivateKey(_) => "MissingPrivateKey",
            Self::MultipleKeys(..) => "MultipleKeys",
            Self::EncryptedKey(_) => "EncryptedKey",
            Self::UnsupportedKey { .. } => "UnsupportedKey",
            Self::KeyMismatch => "KeyMismatch",
            Self::ChainInvalid(_) => "ChainInvalid",
            Self::Expired(_) => "Expired",
            Self::NotYetValid(_) => "NotYetValid",
            Self::MissingClientAuth => "MissingClientAuth",
        }
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> PkiError {
    PkiError::InvalidPem {
        field: field.to_string(),
        problem: problem.into(),
    }
}

fn check_size(len: usize) -> Result<(), PkiError> {
    if len > MAX_SECRET_BYTES {
        return Err(PkiError::TooLarge(len));
    }
    Ok(())
}

/// SecretBinary: usable when it is UTF-8 text (PEM or JSON).
pub fn decode_binary(bytes: &[u8]) -> Result<&str, PkiError> {
    check_size(bytes.len())?;
    std::str::from_utf8(bytes).map_err(|_| PkiError::BinaryNotText)
}

/// A PEM block, as much as validation needs.
struct Block {
    tag: String,
    der: Vec<u8>,
    encrypted_header: bool,
}

/// Parses every PEM block in `text`. Key blocks never put their content into an error.
fn pem_blocks(field: &str, text: &str) -> Result<Vec<Block>, PkiError> {
    let looks_like_key = text.contains("PRIVATE KEY-----");
    let blocks = pem::parse_many(text).map_err(|error| {
        if looks_like_key {
            invalid(field, "malformed PEM (bad framing, header or base64)")
        } else {
            invalid(field, format!("malformed PEM: {error}"))
        }
    })?;
    Ok(blocks
        .into_iter()
        .map(|block| Block {
            tag: block.tag().to_string(),
            encrypted_header: block
                .headers()
                .get("Proc-Type")
                .is_some_and(|value| value.contains("ENCRYPTED")),
            der: block.into_contents(),
        })
        .collect())
}

fn parse_certificate(field: &str, der: Vec<u8>) -> Result<CertificateDer<'static>, PkiError> {
    X509Certificate::from_der(&der)
        .map_err(|_| invalid(field, "DER does not parse as an X.509 certificate"))?;
    Ok(CertificateDer::from(der))
}

/// Algorithm of a PKCS#8 key, from its AlgorithmIdentifier, to tell an unsupported type apart from
/// a corrupt key without ever printing the key.
fn pkcs8_algorithm(der: &[u8]) -> Option<String> {
    use der_parser::ber::BerObjectContent;
    let (_, object) = der_parser::parse_der(der).ok()?;
    let items = object.as_sequence().ok()?;
    let algorithm = items.get(1)?.as_sequence().ok()?;
    let oid = algorithm.first()?.as_oid().ok()?.to_id_string();
    let parameter = match algorithm.get(1).map(|p| &p.content) {
        Some(BerObjectContent::OID(curve)) => Some(curve.to_id_string()),
        _ => None,
    };
    Some(match (oid.as_str(), parameter.as_deref()) {
        ("1.2.840.113549.1.1.1", _) => "RSA".into(),
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "ECDSA P-256".into(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "ECDSA P-384".into(),
        ("1.2.840.10045.2.1", Some(curve)) => format!("ECDSA curve {curve}"),
        ("1.3.101.112", _) => "Ed25519".into(),
        ("1.2.840.10040.4.1", _) => "DSA".into(),
        (other, _) => format!("algorithm {other}"),
    })
}

fn supported_pkcs8(kind: &str) -> bool {
    matches!(kind, "RSA" | "ECDSA P-256" | "ECDSA P-384" | "Ed25519")
}

/// A key block by its PEM tag, or `None` when the block is not a key.
fn key_from_block(field: &str, block: &Block) -> Option<Result<PrivateKey, PkiError>> {
    let unsupported = |kind: &str| PkiError::UnsupportedKey {
        field: field.to_string(),
        kind: kind.to_string(),
    };
    if block.encrypted_header || block.tag == "ENCRYPTED PRIVATE KEY" {
        return Some(Err(PkiError::EncryptedKey(field.to_string())));
    }
    let der = block.der.clone();
    Some(match block.tag.as_str() {
        "PRIVATE KEY" => pkcs8_key(field, der),
        "RSA PRIVATE KEY" => Ok(PrivateKey(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(
            der,
        )))),
        "EC PRIVATE KEY" => Ok(PrivateKey(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(
            der,
        )))),
        "DSA PRIVATE KEY" => Err(unsupported("DSA")),
        "OPENSSH PRIVATE KEY" => Err(unsupported("OpenSSH format")),
        tag if tag.ends_with("PRIVATE KEY") => Err(unsupported(tag)),
        _ => return None,
    })
}

fn pkcs8_key(field: &str, der: Vec<u8>) -> Result<PrivateKey, PkiError> {
    match pkcs8_algorithm(&der) {
        Some(kind) if supported_pkcs8(&kind) => Ok(PrivateKey(PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(der),
        ))),
        Some(kind) => Err(PkiError::UnsupportedKey {
            field: field.to_string(),
            kind,
        }),
        None => Err(invalid(field, "DER does not parse as a PKCS#8 private key")),
    }
}

/// A JSON value that holds certificates: PEM, or base64 of one DER certificate.
fn certificates_from_value(
    field: &str,
    value: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    if !value.contains("-----BEGIN") {
        let der = decode_base64(field, value)?;
        return Ok(vec![parse_certificate(field, der)?]);
    }
    let mut certificates = Vec::new();
    for block in pem_blocks(field, value)? {
        if block.tag == "CERTIFICATE" {
            certificates.push(parse_certificate(field, block.der)?);
        }
    }
    if certificates.is_empty() {
        return Err(PkiError::MissingCertificate(field.to_string()));
    }
    Ok(certificates)
}

/// A JSON value that holds one key: PEM, or base64 of DER (PKCS#8, else PKCS#1 or SEC1 by shape).
fn key_from_value(field: &str, value: &str) -> Result<PrivateKey, PkiError> {
    if !value.contains("-----BEGIN") {
        let der = decode_base64(field, value)?;
        if pkcs8_algorithm(&der).is_some() {
            return pkcs8_key(field, der);
        }
        // Not PKCS#8: let the crypto provider tell PKCS#1 from SEC1.
        for candidate in [
            PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der.clone())),
            PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der.clone())),
        ] {
            if rustls::crypto::aws_lc_rs::sign::any_supported_type(&candidate).is_ok() {
                return Ok(PrivateKey(candidate));
            }
        }
        return Err(invalid(field, "base64 value is not a DER private key"));
    }
    let mut keys = Vec::new();
    for block in pem_blocks(field, value)? {
        if let Some(key) = key_from_block(field, &block) {
            keys.push(key?);
        }
    }
    match keys.len() {
        0 => Err(PkiError::MissingPrivateKey(field.to_string())),
        1 => Ok(keys.remove(0)),
        n => Err(PkiError::MultipleKeys(field.to_string(), n)),
    }
}

fn decode_base64(field: &str, value: &str) -> Result<Vec<u8>, PkiError> {
    use base64::Engine;
    let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| {
            invalid(
                field,
                "neither PEM nor valid base64 DER (truncated or corrupt base64)",
            )
        })
}

/// Format `Json`: a JSON object whose fields hold PEM (or base64 DER) values.
pub fn parse_json(text: &str, fields: &JsonFields) -> Result<Material, PkiError> {
    check_size(text.len())?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|error| {
        PkiError::InvalidJson(format!("line {}, column {}", error.line(), error.column()))
    })?;
    let object = value
        .as_object()
        .ok_or_else(|| PkiError::InvalidJson("the value is not an object".into()))?;
    let field = |name: &str, required: bool| -> Result<Option<&str>, PkiError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) if required => {
                Err(PkiError::MissingField(name.to_string()))
            }
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(text)) if text.trim().is_empty() => {
                if required {
                    Err(PkiError::EmptyField(name.to_string()))
                } else {
                    Ok(None)
                }
            }
            Some(serde_json::Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(PkiError::InvalidJson(format!(
                "field {name:?} is not a string"
            ))),
        }
    };
    let certificate = field(&fields.certificate, true)?.unwrap_or_default();
    let key = field(&fields.private_key, true)?.unwrap_or_default();
    let ca = field(&fields.ca, false)?;
    Ok(Material {
        chain: certificates_from_value(&fields.certificate, certificate)?,
        key: key_from_value(&fields.private_key, key)?,
        ca: match ca {
            Some(ca) => certificates_from_value(&fields.ca, ca)?,
            None => Vec::new(),
        },
    })
}

/// Format `Pem`: one bundle with the leaf (the first certificate), intermediates and one key; `ca`
/// is the PEM of a separate CA secret, if any.
pub fn parse_pem_bundle(text: &str, ca: Option<&str>) -> Result<Material, PkiError> {
    const FIELD: &str = "PEM bundle";
    check_size(text.len())?;
    let mut chain = Vec::new();
    let mut keys = Vec::new();
    for block in pem_blocks(FIELD, text)? {
        if block.tag == "CERTIFICATE" {
            chain.push(parse_certificate(FIELD, block.der)?);
        } else if let Some(key) = key_from_block(FIELD, &block) {
            keys.push(key?);
        }
    }
    if chain.is_empty() {
        return Err(PkiError::MissingCertificate(FIELD.into()));
    }
    let key = match keys.len() {
        0 => return Err(PkiError::MissingPrivateKey(FIELD.into())),
        1 => keys.remove(0),
        n => return Err(PkiError::MultipleKeys(FIELD.into(), n)),
    };
    let ca = match ca {
        Some(ca) => {
            check_size(ca.len())?;
            certificates_from_value("CA secret", ca)?
        }
        None => Vec::new(),
    };
    Ok(Material { chain, key, ca })
}

fn pem_text(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Validates before any write: the key matches the leaf, the validity window covers `now_unix`, an
/// Extended Key Usage allows clientAuth, and the chain leads to the CA when one is given.
pub fn validate(material: &Material, now_unix: i64) -> Result<ValidatedIdentity, PkiError> {
    let leaf_der = material
        .chain
        .first()
        .ok_or_else(|| PkiError::MissingCertificate("certificate".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der.as_ref())
        .map_err(|_| invalid("certificate", "DER does not parse as an X.509 certificate"))?;

    let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&material.key.0)
        .map_err(|_| PkiError::UnsupportedKey {
            field: "private key".into(),
            kind: "not loadable as RSA, ECDSA P-256/P-384 or Ed25519".into(),
        })?;
    let certified = rustls::sign::CertifiedKey::new(material.chain.clone(), signing_key);
    certified.keys_match().map_err(|_| PkiError::KeyMismatch)?;

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    if now_unix < not_before {
        return Err(PkiError::NotYetValid(rfc3339(not_before)));
    }
    if now_unix > not_after {
        return Err(PkiError::Expired(rfc3339(not_after)));
    }
    if let Ok(Some(eku)) = leaf.extended_key_usage()
        && !eku.value.client_auth
        && !eku.value.any
    {
        return Err(PkiError::MissingClientAuth);
    }

    if !material.ca.is_empty() {
        verify_chain(material, now_unix)?;
    }

    let mut dns_names = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push(dns.to_string()),
                GeneralName::URI(uri) => uris.push(uri.to_string()),
                _ => {}
            }
        }
    }
    let facts = CertificateFacts {
        subject: leaf.subject().to_string(),
        issuer: leaf.issuer().to_string(),
        serial_number: hex::encode(leaf.raw_serial()),
        not_before,
        not_after,
        sha256_fingerprint: hex::encode(Sha256::digest(leaf_der.as_ref())),
        dns_names,
        uris,
    };
    let tls_crt = material
        .chain
        .iter()
        .map(|cert| pem_text("CERTIFICATE", cert.as_ref()))
        .collect::<String>();
    let ca_crt = (!material.ca.is_empty()).then(|| {
        material
            .ca
            .iter()
            .map(|cert| pem_text("CERTIFICATE", cert.as_ref()))
            .collect::<String>()
    });
    let (tag, der) = match &material.key.0 {
        PrivateKeyDer::Pkcs1(key) => ("RSA PRIVATE KEY", key.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(key) => ("EC PRIVATE KEY", key.secret_sec1_der()),
        PrivateKeyDer::Pkcs8(key) => ("PRIVATE KEY", key.secret_pkcs8_der()),
        _ => {
            return Err(PkiError::UnsupportedKey {
                field: "private key".into(),
                kind: "unknown encoding".into(),
            });
        }
    };
    Ok(ValidatedIdentity {
        facts,
        tls_crt,
        tls_key: SecretPem(pem_text(tag, der)),
        ca_crt,
    })
}

fn verify_chain(material: &Material, now_unix: i64) -> Result<(), PkiError> {
    let anchors: Vec<_> = material
        .ca
        .iter()
        .map(|cert| {
            webpki::anchor_from_trusted_cert(cert)
                .map(|anchor| anchor.to_owned())
                .map_err(|error| PkiError::ChainInvalid(format!("the CA is not usable: {error:?}")))
        })
        .collect::<Result<_, _>>()?;
    let leaf = webpki::EndEntityCert::try_from(&material.chain[0])
        .map_err(|error| PkiError::ChainInvalid(format!("the leaf is not usable: {error:?}")))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now_unix).unwrap_or_default(),
    ));
    leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        &material.chain[1..],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|error| PkiError::ChainInvalid(format!("{error:?}")))?;
    Ok(())
}
