//! Turning the raw secret value (JSON or a PEM bundle) into [`Material`].
//!
//! Parsing is syntax only (PEM, base64, DER, JSON shape, which blocks are keys); whether the material is
//! *acceptable* is decided by [`super::validate`].

use std::borrow::Cow;

use rustls::pki_types::CertificateDer;
use serde_json::Value;

use super::key::PrivateKey;
use super::pem::{self, Block};
use super::{JsonFields, MAX_SECRET_SIZE, Material, PkiError};

const BUNDLE: &str = "PEM bundle";
const CA_BUNDLE: &str = "CA bundle";

/// Parse the `Json` format. See the module docs of [`super`] for the accepted shapes.
pub fn parse_json(text: &str, fields: &JsonFields) -> Result<Material, PkiError> {
    check_size(text.len(), "the secret value")?;
    let text = strip_bom(text);
    let value: Value = serde_json::from_str(text).map_err(|e| json_error(&e, text))?;
    let Value::Object(object) = value else {
        return Err(PkiError::InvalidJson {
            detail: format!(
                "the secret value is a JSON {}, expected an object with fields \"{}\" and \"{}\"",
                json_kind(&value),
                fields.certificate,
                fields.private_key
            ),
        });
    };

    let cert_text = required_field(&object, &fields.certificate)?;
    let key_text = required_field(&object, &fields.private_key)?;
    let ca_text = optional_field(&object, &fields.ca)?;

    let cert_origin = field_origin(&fields.certificate);
    let chain = parse_certificates(cert_text, &cert_origin)?;
    if chain.is_empty() {
        return Err(PkiError::MissingCertificate {
            origin: cert_origin,
        });
    }
    let key = parse_key_value(key_text, &field_origin(&fields.private_key))?;
    let ca = match ca_text {
        Some(text) => parse_ca(text, &field_origin(&fields.ca))?,
        None => Vec::new(),
    };
    Ok(Material { chain, key, ca })
}

/// Parse the `Pem` format: one bundle with the leaf first, intermediates, and exactly one key;
/// `ca` is optional CA PEM text kept elsewhere.
pub fn parse_pem_bundle(text: &str, ca: Option<&str>) -> Result<Material, PkiError> {
    check_size(text.len(), "the secret value")?;
    if let Some(ca) = ca {
        check_size(ca.len(), "the CA value")?;
    }
    let text = pem::normalize(strip_bom(text));
    let text = pem_or_base64_pem(&text, BUNDLE)?;
    let blocks = pem::parse_blocks(&text).map_err(|p| PkiError::invalid_pem(BUNDLE, p.0))?;
    if blocks.is_empty() {
        return Err(PkiError::invalid_pem(BUNDLE, "no PEM block"));
    }
    let chain = certificates_from_blocks(&blocks, BUNDLE)?;
    if chain.is_empty() {
        return Err(PkiError::MissingCertificate {
            origin: BUNDLE.to_owned(),
        });
    }
    let key = key_from_blocks(&blocks, BUNDLE)?;
    let ca = match ca {
        Some(text) if !text.trim().is_empty() => parse_ca(text, CA_BUNDLE)?,
        _ => Vec::new(),
    };
    Ok(Material { chain, key, ca })
}

/// SecretBinary is only accepted when it is text; the caller then parses it like SecretString.
pub fn decode_binary(bytes: &[u8]) -> Result<&str, PkiError> {
    check_size(bytes.len(), "the binary secret value")?;
    std::str::from_utf8(bytes).map_err(|_| PkiError::BinaryNotText)
}

fn check_size(size: usize, what: &str) -> Result<(), PkiError> {
    if size > MAX_SECRET_SIZE {
        return Err(PkiError::TooLarge {
            what: what.to_owned(),
            size,
            limit: MAX_SECRET_SIZE,
        });
    }
    Ok(())
}

/// Editors on some platforms save a UTF-8 byte-order mark, which JSON and PEM parsers reject.
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

fn field_origin(name: &str) -> String {
    format!("field \"{name}\"")
}

/// serde_json's syntax messages carry only a position; data errors could quote values, so they are
/// replaced by a generic text.
fn json_error(e: &serde_json::Error, text: &str) -> PkiError {
    use serde_json::error::Category;
    let mut detail = match e.classify() {
        Category::Syntax | Category::Eof => e.to_string(),
        Category::Data | Category::Io => "the secret value is not a valid JSON object".to_owned(),
    };
    if detail.contains("control character") {
        detail.push_str(" (newlines inside JSON strings must be written as \\n)");
    }
    if pem::looks_like_pem(text) && text.trim_start().starts_with("-----") {
        detail.push_str(" (the value looks like PEM; use format Pem for a PEM bundle)");
    }
    PkiError::InvalidJson { detail }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn required_field<'a>(
    object: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<&'a str, PkiError> {
    match object.get(name) {
        None => Err(PkiError::MissingField {
            field: name.to_owned(),
        }),
        Some(Value::String(s)) if s.trim().is_empty() => Err(PkiError::EmptyField {
            field: name.to_owned(),
        }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(PkiError::InvalidJson {
            detail: format!(
                "field \"{name}\" is a {}, expected a string",
                json_kind(other)
            ),
        }),
    }
}

/// The CA field may be absent, null or empty: all mean "no CA".
fn optional_field<'a>(
    object: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, PkiError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(PkiError::InvalidJson {
            detail: format!(
                "field \"{name}\" is a {}, expected a string",
                json_kind(other)
            ),
        }),
    }
}

/// A value without PEM armour may be base64 of PEM text (a common way to store files); return the PEM.
fn pem_or_base64_pem<'t>(text: &'t str, origin: &str) -> Result<Cow<'t, str>, PkiError> {
    if pem::looks_like_pem(text) {
        return Ok(Cow::Borrowed(text));
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes =
        pem::decode_base64(&compact).map_err(|_| PkiError::invalid_pem(origin, "no PEM block"))?;
    match String::from_utf8(bytes) {
        Ok(decoded) if pem::looks_like_pem(&decoded) => Ok(Cow::Owned(decoded)),
        _ => Err(PkiError::invalid_pem(origin, "no PEM block")),
    }
}

/// Certificates from PEM text, base64 of PEM text, or base64 of (concatenated) DER certificates.
fn parse_certificates(text: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let text = pem::normalize(text);
    if pem::looks_like_pem(&text) {
        let blocks = pem::parse_blocks(&text).map_err(|p| PkiError::invalid_pem(origin, p.0))?;
        return certificates_from_blocks(&blocks, origin);
    }
    let der = decode_unarmoured(&text, origin)?;
    if der.starts_with(b"-----BEGIN") {
        let decoded = std::str::from_utf8(&der).map_err(|_| {
            PkiError::invalid_pem(origin, "base64 value decodes to invalid PEM text")
        })?;
        let blocks = pem::parse_blocks(decoded).map_err(|p| PkiError::invalid_pem(origin, p.0))?;
        return certificates_from_blocks(&blocks, origin);
    }
    certificates_from_der(&der, origin)
}

/// CA certificates: like [`parse_certificates`], but a CA value without any certificate is an error
/// rather than "no CA", because the person clearly meant to give one.
fn parse_ca(text: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let ca = parse_certificates(text, origin)?;
    if ca.is_empty() {
        return Err(PkiError::invalid_pem(origin, "no CERTIFICATE block"));
    }
    Ok(ca)
}

/// Base64 (any whitespace, padding optional) that is not PEM.
fn decode_unarmoured(text: &str, origin: &str) -> Result<Vec<u8>, PkiError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    pem::decode_base64(&compact).map_err(|what| {
        PkiError::invalid_pem(
            origin,
            format!("no PEM block, and not base64 DER either: {what}"),
        )
    })
}

fn certificates_from_blocks(
    blocks: &[Block],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut certs = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        if block.label == "CERTIFICATE" || block.label == "X509 CERTIFICATE" {
            check_certificate_der(&block.der).map_err(|what| {
                PkiError::invalid_pem(origin, format!("block {} ({}): {what}", i + 1, block.label))
            })?;
            certs.push(CertificateDer::from(block.der.clone()));
        }
    }
    Ok(certs)
}

/// One or more DER certificates back to back.
fn certificates_from_der(
    der: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut certs = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        match x509_parser::parse_x509_certificate(rest) {
            Ok((next, _)) => {
                let used = rest.len() - next.len();
                certs.push(CertificateDer::from(rest[..used].to_vec()));
                rest = next;
            }
            Err(_) if certs.is_empty() => {
                return Err(PkiError::invalid_pem(
                    origin,
                    "base64 value: DER does not parse as an X.509 certificate",
                ));
            }
            Err(_) => {
                return Err(PkiError::invalid_pem(
                    origin,
                    format!(
                        "base64 value: data after certificate {} does not parse as an X.509 certificate",
                        certs.len()
                    ),
                ));
            }
        }
    }
    Ok(certs)
}

fn check_certificate_der(der: &[u8]) -> Result<(), &'static str> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], _)) => Ok(()),
        Ok(_) => Err("trailing data after the certificate DER"),
        Err(_) => Err("DER does not parse as an X.509 certificate"),
    }
}

/// The private key value of the JSON format: PEM, base64 of PEM, or base64 of DER.
fn parse_key_value(text: &str, origin: &str) -> Result<PrivateKey, PkiError> {
    let text = pem::normalize(text);
    if pem::looks_like_pem(&text) {
        let blocks = pem::parse_blocks(&text).map_err(|p| PkiError::invalid_pem(origin, p.0))?;
        return key_from_blocks(&blocks, origin);
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let der = pem::decode_base64(&compact).map_err(|what| {
        PkiError::invalid_pem(
            origin,
            format!("no PEM block, and not base64 DER either: {what}"),
        )
    })?;
    if der.starts_with(b"-----BEGIN") {
        let decoded = std::str::from_utf8(&der).map_err(|_| {
            PkiError::invalid_pem(origin, "base64 value decodes to invalid PEM text")
        })?;
        let blocks = pem::parse_blocks(decoded).map_err(|p| PkiError::invalid_pem(origin, p.0))?;
        return key_from_blocks(&blocks, origin);
    }
    PrivateKey::from_der(der, origin)
}

/// Exactly one private-key block; encrypted and foreign formats get their own errors.
fn key_from_blocks(blocks: &[Block], origin: &str) -> Result<PrivateKey, PkiError> {
    let keys: Vec<&Block> = blocks
        .iter()
        .filter(|b| b.label.ends_with("PRIVATE KEY"))
        .collect();
    let block = match keys.as_slice() {
        [] => {
            return Err(PkiError::MissingPrivateKey {
                origin: origin.to_owned(),
            });
        }
        [one] => *one,
        many => {
            return Err(PkiError::MultipleKeys {
                origin: origin.to_owned(),
                count: many.len(),
            });
        }
    };
    if block.encrypted_header || block.label == "ENCRYPTED PRIVATE KEY" {
        return Err(PkiError::EncryptedKey {
            origin: origin.to_owned(),
        });
    }
    match block.label.as_str() {
        // The DER decides the encoding; some tools put PKCS#1 under a PKCS#8 label and vice versa.
        "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" => {
            PrivateKey::from_der(block.der.clone(), origin)
        }
        "DSA PRIVATE KEY" => Err(PkiError::UnsupportedKey {
            origin: origin.to_owned(),
            detail: "DSA".to_owned(),
        }),
        "OPENSSH PRIVATE KEY" => Err(PkiError::UnsupportedKey {
            origin: origin.to_owned(),
            detail: "OpenSSH key format (convert to PKCS#8 with `ssh-keygen -p -m PKCS8`)"
                .to_owned(),
        }),
        other => Err(PkiError::UnsupportedKey {
            origin: origin.to_owned(),
            detail: format!("PEM block \"{other}\""),
        }),
    }
}
