//! Private key handling: encoding detection, key-type classification, loading for rustls.
//!
//! A minimal DER walker is enough here: we only need the outer structure of PKCS#8, PKCS#1 and SEC1 to
//! tell the encoding and the algorithm, so errors can say "DSA" or "P-521" instead of "does not parse".

use std::fmt;
use std::sync::Arc;
use x509_parser::asn1_rs::{Any, FromDer, Oid, oid};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use rustls::sign::SigningKey;

use super::PkiError;
use super::pem;

/// How a private key is encoded; kept so `tls.key` is written in the encoding it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEncoding {
    /// PKCS#8 `PrivateKeyInfo` (PEM label `PRIVATE KEY`).
    Pkcs8,
    /// PKCS#1 `RSAPrivateKey` (PEM label `RSA PRIVATE KEY`).
    Pkcs1,
    /// SEC1 `ECPrivateKey` (PEM label `EC PRIVATE KEY`).
    Sec1,
}

impl KeyEncoding {
    /// The PEM label for this encoding.
    pub fn pem_label(self) -> &'static str {
        match self {
            KeyEncoding::Pkcs8 => "PRIVATE KEY",
            KeyEncoding::Pkcs1 => "RSA PRIVATE KEY",
            KeyEncoding::Sec1 => "EC PRIVATE KEY",
        }
    }
}

/// PEM text of a private key. Its `Debug` is redacted so it cannot leak through logs or `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(String);

impl SecretPem {
    /// The PEM text, for writing into the target Secret and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretPem {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A private key as DER in a known encoding. `Debug` shows the encoding only.
#[derive(Clone)]
pub struct PrivateKey {
    encoding: KeyEncoding,
    der: Vec<u8>,
    /// Where the key came from (`field "private_key"`, `PEM bundle`), for error messages.
    origin: String,
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.der);
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("encoding", &self.encoding)
            .field("origin", &self.origin)
            .field("der", &"<redacted>")
            .finish()
    }
}

impl PrivateKey {
    /// Wrap DER, detecting its encoding from the structure. `origin` names the source in errors.
    pub fn from_der(der: Vec<u8>, origin: &str) -> Result<Self, PkiError> {
        match detect(&der) {
            Detected::Key(encoding) => Ok(PrivateKey {
                encoding,
                der,
                origin: origin.to_owned(),
            }),
            Detected::Encrypted => Err(PkiError::EncryptedKey {
                origin: origin.to_owned(),
            }),
            Detected::NotAKey(what) => Err(PkiError::invalid_pem(origin, what)),
        }
    }

    /// The encoding the key came in.
    pub fn encoding(&self) -> KeyEncoding {
        self.encoding
    }

    /// Where the key came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// PEM in the original encoding (PKCS#8, PKCS#1 or SEC1).
    pub fn to_pem(&self) -> SecretPem {
        SecretPem(pem::encode(self.encoding.pem_label(), &self.der))
    }

    /// The key for rustls.
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        match self.encoding {
            KeyEncoding::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.der.clone())),
            KeyEncoding::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(self.der.clone())),
            KeyEncoding::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(self.der.clone())),
        }
    }

    /// Check the key type is supported and load it with the aws-lc-rs provider.
    pub(crate) fn load(&self) -> Result<(KeyKind, Arc<dyn SigningKey>), PkiError> {
        let kind = classify(self.encoding, &self.der).map_err(|p| match p {
            KeyProblem::Unsupported(detail) => PkiError::UnsupportedKey {
                origin: self.origin.clone(),
                detail,
            },
            KeyProblem::Malformed(what) => PkiError::invalid_pem(&self.origin, what),
        })?;
        let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&self.to_rustls())
            .map_err(|_| {
                PkiError::invalid_pem(
                    &self.origin,
                    format!(
                        "the {} private key is malformed and cannot be loaded",
                        kind.name()
                    ),
                )
            })?;
        Ok((kind, signing_key))
    }
}

/// The supported key types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA with the modulus size in bits.
    Rsa {
        /// Modulus size.
        bits: usize,
    },
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// Ed25519.
    Ed25519,
}

impl KeyKind {
    /// Human name, for messages.
    pub fn name(self) -> String {
        match self {
            KeyKind::Rsa { bits } => format!("RSA {bits}-bit"),
            KeyKind::EcP256 => "ECDSA P-256".to_owned(),
            KeyKind::EcP384 => "ECDSA P-384".to_owned(),
            KeyKind::Ed25519 => "Ed25519".to_owned(),
        }
    }
}

pub(crate) enum KeyProblem {
    Unsupported(String),
    Malformed(&'static str),
}

pub(crate) enum Detected {
    Key(KeyEncoding),
    Encrypted,
    NotAKey(&'static str),
}

// DER tags we look at.
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const CONTEXT_0: u8 = 0xa0;

// Algorithm and curve OIDs (DER content bytes, written in dotted form).
const OID_RSA: &[u8] = &oid!(raw 1.2.840.113549.1.1.1);
const OID_RSA_PSS: &[u8] = &oid!(raw 1.2.840.113549.1.1.10);
const OID_EC_PUBLIC_KEY: &[u8] = &oid!(raw 1.2.840.10045.2.1);
const OID_P256: &[u8] = &oid!(raw 1.2.840.10045.3.1.7);
const OID_P384: &[u8] = &oid!(raw 1.3.132.0.34);
const OID_P521: &[u8] = &oid!(raw 1.3.132.0.35);
const OID_SECP256K1: &[u8] = &oid!(raw 1.3.132.0.10);
const OID_ED25519: &[u8] = &oid!(raw 1.3.101.112);
const OID_ED448: &[u8] = &oid!(raw 1.3.101.113);
const OID_X25519: &[u8] = &oid!(raw 1.3.101.110);
const OID_X448: &[u8] = &oid!(raw 1.3.101.111);
const OID_DSA: &[u8] = &oid!(raw 1.2.840.10040.4.1);
const OID_DH: &[u8] = &oid!(raw 1.2.840.113549.1.3.1);

/// Read one DER TLV (asn1-rs, strict DER): returns (identifier octet, content, rest). Multi-byte
/// tags never occur in the structures read here, so they are refused.
pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (rest, any) = Any::from_der(input).ok()?;
    let number = u8::try_from(any.header.tag().0)
        .ok()
        .filter(|n| *n < 0x1f)?;
    let identifier =
        ((any.header.class() as u8) << 6) | (u8::from(any.header.is_constructed()) << 5) | number;
    Some((identifier, any.data, rest))
}

/// Read a TLV that must have `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match read_tlv(input)? {
        (t, content, rest) if t == tag => Some((content, rest)),
        _ => None,
    }
}

/// Tell the encoding of an unlabelled private key (base64 DER in JSON, or a mislabelled PEM block).
pub(crate) fn detect(der: &[u8]) -> Detected {
    const NOT_A_KEY: &str = "DER does not parse as a private key (expected PKCS#8, PKCS#1 or SEC1)";
    let Some((outer, trailing)) = expect(der, SEQUENCE) else {
        return Detected::NotAKey(NOT_A_KEY);
    };
    if !trailing.is_empty() {
        return Detected::NotAKey("trailing data after the private key DER");
    }
    let Some((tag1, _, rest)) = read_tlv(outer) else {
        return Detected::NotAKey(NOT_A_KEY);
    };
    let second = read_tlv(rest).map(|(t, _, _)| t);
    match (tag1, second) {
        // PrivateKeyInfo ::= SEQUENCE { version, AlgorithmIdentifier, OCTET STRING, ... }
        (INTEGER, Some(SEQUENCE)) => Detected::Key(KeyEncoding::Pkcs8),
        // RSAPrivateKey ::= SEQUENCE { version, modulus, ... } (also the legacy DSA layout)
        (INTEGER, Some(INTEGER)) => Detected::Key(KeyEncoding::Pkcs1),
        // ECPrivateKey ::= SEQUENCE { version(1), OCTET STRING, [0] params, [1] publicKey }
        (INTEGER, Some(OCTET_STRING)) => Detected::Key(KeyEncoding::Sec1),
        // EncryptedPrivateKeyInfo ::= SEQUENCE { AlgorithmIdentifier, OCTET STRING }
        (SEQUENCE, Some(OCTET_STRING)) => Detected::Encrypted,
        _ => Detected::NotAKey(NOT_A_KEY),
    }
}

/// Find the key type, rejecting the ones the TLS stack (or the brief) does not support.
pub(crate) fn classify(encoding: KeyEncoding, der: &[u8]) -> Result<KeyKind, KeyProblem> {
    let (outer, _) =
        expect(der, SEQUENCE).ok_or(KeyProblem::Malformed("private key DER is not a SEQUENCE"))?;
    match encoding {
        KeyEncoding::Pkcs8 => classify_pkcs8(outer),
        KeyEncoding::Pkcs1 => classify_pkcs1(outer),
        KeyEncoding::Sec1 => classify_sec1(outer),
    }
}

fn classify_pkcs8(outer: &[u8]) -> Result<KeyKind, KeyProblem> {
    const MALFORMED: KeyProblem = KeyProblem::Malformed("malformed PKCS#8 private key");
    let (_version, rest) = expect(outer, INTEGER).ok_or(MALFORMED)?;
    let (alg_id, rest) = expect(rest, SEQUENCE).ok_or(MALFORMED)?;
    let (private_key, _) = expect(rest, OCTET_STRING).ok_or(MALFORMED)?;
    let (alg, params) = expect(alg_id, OID).ok_or(MALFORMED)?;
    match alg {
        OID_RSA => {
            let (inner, _) = expect(private_key, SEQUENCE).ok_or(MALFORMED)?;
            classify_pkcs1(inner)
        }
        OID_EC_PUBLIC_KEY => match read_tlv(params) {
            Some((OID, curve, _)) => curve_kind(curve),
            Some((SEQUENCE, _, _)) => Err(KeyProblem::Unsupported(
                "EC key with explicit curve parameters".to_owned(),
            )),
            _ => {
                // No named curve in the wrapper; the inner SEC1 key may still carry it.
                let (inner, _) = expect(private_key, SEQUENCE).ok_or(MALFORMED)?;
                classify_sec1(inner)
            }
        },
        OID_ED25519 => Ok(KeyKind::Ed25519),
        other => Err(KeyProblem::Unsupported(algorithm_name(other))),
    }
}

fn classify_pkcs1(outer: &[u8]) -> Result<KeyKind, KeyProblem> {
    const MALFORMED: KeyProblem = KeyProblem::Malformed("malformed PKCS#1 RSA private key");
    let mut integers = Vec::new();
    let mut rest = outer;
    while !rest.is_empty() {
        let (tag, content, next) = read_tlv(rest).ok_or(MALFORMED)?;
        if tag == INTEGER {
            integers.push(content);
        }
        rest = next;
    }
    match integers.len() {
        // version, p, q, g, y, x: the OpenSSL "DSA PRIVATE KEY" layout.
        6 => Err(KeyProblem::Unsupported("DSA".to_owned())),
        n if n >= 9 => {
            let modulus = integers.get(1).ok_or(MALFORMED)?;
            let bits = integer_bits(modulus);
            if (2048..=8192).contains(&bits) {
                Ok(KeyKind::Rsa { bits })
            } else {
                Err(KeyProblem::Unsupported(format!("RSA {bits}-bit")))
            }
        }
        _ => Err(MALFORMED),
    }
}

fn classify_sec1(outer: &[u8]) -> Result<KeyKind, KeyProblem> {
    const MALFORMED: KeyProblem = KeyProblem::Malformed("malformed SEC1 EC private key");
    let (_version, rest) = expect(outer, INTEGER).ok_or(MALFORMED)?;
    let (private_key, mut rest) = expect(rest, OCTET_STRING).ok_or(MALFORMED)?;
    while !rest.is_empty() {
        let (tag, content, next) = read_tlv(rest).ok_or(MALFORMED)?;
        if tag == CONTEXT_0 {
            return match read_tlv(content) {
                Some((OID, curve, _)) => curve_kind(curve),
                _ => Err(KeyProblem::Unsupported(
                    "EC key with explicit curve parameters".to_owned(),
                )),
            };
        }
        rest = next;
    }
    // No parameters: the scalar length tells the curve (the public key check catches look-alikes).
    match private_key.len() {
        32 => Ok(KeyKind::EcP256),
        48 => Ok(KeyKind::EcP384),
        65 | 66 => Err(KeyProblem::Unsupported("EC curve P-521".to_owned())),
        _ => Err(KeyProblem::Unsupported(
            "EC key without curve parameters of unknown size".to_owned(),
        )),
    }
}

fn curve_kind(curve: &[u8]) -> Result<KeyKind, KeyProblem> {
    match curve {
        OID_P256 => Ok(KeyKind::EcP256),
        OID_P384 => Ok(KeyKind::EcP384),
        OID_P521 => Err(KeyProblem::Unsupported("EC curve P-521".to_owned())),
        OID_SECP256K1 => Err(KeyProblem::Unsupported("EC curve secp256k1".to_owned())),
        other => Err(KeyProblem::Unsupported(format!(
            "EC curve {}",
            oid_to_string(other)
        ))),
    }
}

fn algorithm_name(oid: &[u8]) -> String {
    match oid {
        OID_DSA => "DSA".to_owned(),
        OID_RSA_PSS => "RSA-PSS (RSASSA-PSS key)".to_owned(),
        OID_ED448 => "Ed448".to_owned(),
        OID_X25519 => "X25519 (key agreement only)".to_owned(),
        OID_X448 => "X448 (key agreement only)".to_owned(),
        OID_DH => "Diffie-Hellman".to_owned(),
        other => format!("algorithm {}", oid_to_string(other)),
    }
}

/// Bit length of a DER INTEGER's magnitude.
fn integer_bits(content: &[u8]) -> usize {
    let trimmed = match content.iter().position(|&b| b != 0) {
        Some(i) => &content[i..],
        None => return 0,
    };
    match trimmed.first() {
        Some(&first) => trimmed.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// Dotted form of an OID, for messages about unknown algorithms.
pub(crate) fn oid_to_string(oid: &[u8]) -> String {
    Oid::new(std::borrow::Cow::Borrowed(oid)).to_id_string()
}
