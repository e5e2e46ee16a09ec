//! PKCS#12 keystores for Java, Kafka, JDBC and .NET clients, from the validated material: a keystore
//! (the key with the leaf, the intermediates and the CA) and a truststore (the CA certificates), both
//! under one password (p12-keystore, pure Rust).

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
};
use p12_keystore::{
    Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKey,
    PrivateKeyChain,
};

use super::ValidatedIdentity;
use super::key::{self, Detected, KeyEncoding, KeyKind};
use super::pem;

/// Which algorithms protect the keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkcs12Profile {
    /// PBES2 with AES-256-CBC and an HMAC-SHA256 MAC: Java 17+, OpenSSL 3, .NET.
    Modern,
    /// 3DES with SHA-1 and an HMAC-SHA1 MAC: old JREs and OpenSSL 1.x.
    Legacy,
}

/// The rendered files: `keystore.p12`, and `truststore.p12` when there is a CA.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs12Files {
    pub keystore: Vec<u8>,
    pub truststore: Option<Vec<u8>>,
}

impl std::fmt::Debug for Pkcs12Files {
    // Encrypted, but a private key all the same: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pkcs12Files(..)")
    }
}

/// Why a keystore could not be made (never with key material in the message).
#[derive(Debug, thiserror::Error)]
#[error("could not build the PKCS#12 keystore: {0}")]
pub struct KeystoreError(String);

#[cfg(test)]
impl KeystoreError {
    /// An error as rendering would report it (tests).
    pub(crate) fn sample() -> Self {
        Self("the key is not readable".to_string())
    }
}

/// Renders `identity` as PKCS#12 under `password`, the key entry named `alias`.
pub fn pkcs12(
    identity: &ValidatedIdentity,
    password: &str,
    alias: &str,
    profile: Pkcs12Profile,
) -> Result<Pkcs12Files, KeystoreError> {
    let failed = |what: &str| KeystoreError(what.to_string());
    let key_der = identity
        .key_der()
        .ok_or_else(|| failed("the key is not readable"))?;
    let pkcs8 = to_pkcs8(&key_der)?;
    let blocks = |pem_text: &str| -> Result<Vec<Vec<u8>>, KeystoreError> {
        pem::parse_blocks(pem_text)
            .map(|blocks| blocks.into_iter().map(|block| block.der).collect())
            .map_err(|_| failed("a certificate is not readable"))
    };
    let chain = blocks(&identity.tls_crt)?;
    let cas = match &identity.ca_crt {
        Some(ca) => blocks(ca)?,
        None => Vec::new(),
    };
    let certificate = |der: &Vec<u8>| {
        Certificate::from_der(der).map_err(|_| failed("a certificate is not X.509"))
    };
    let certificates = chain
        .iter()
        .chain(&cas)
        .map(certificate)
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKey::from_der(&pkcs8).map_err(|_| failed("the key is not PKCS#8"))?;
    // The local key id ties the key to its certificate; the leaf's fingerprint, as keytool does.
    let local_key_id = hex::decode(&identity.facts.sha256_fingerprint).unwrap_or_default();
    let mut keystore = KeyStore::new();
    keystore.add_entry(
        alias,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id, key, certificates)),
    );
    let keystore = write(&keystore, password, profile)?;
    let truststore = if cas.is_empty() {
        None
    } else {
        let mut truststore = KeyStore::new();
        for (index, ca) in cas.iter().enumerate() {
            truststore.add_entry(
                &format!("ca-{index}"),
                KeyStoreEntry::Certificate(certificate(ca)?),
            );
        }
        Some(write(&truststore, password, profile)?)
    };
    Ok(Pkcs12Files {
        keystore,
        truststore,
    })
}

fn write(
    store: &KeyStore,
    password: &str,
    profile: Pkcs12Profile,
) -> Result<Vec<u8>, KeystoreError> {
    let (encryption, mac) = match profile {
        Pkcs12Profile::Modern => (
            EncryptionAlgorithm::PbeWithHmacSha256AndAes256,
            MacAlgorithm::HmacSha256,
        ),
        Pkcs12Profile::Legacy => (
            EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc,
            MacAlgorithm::HmacSha1,
        ),
    };
    store
        .writer(password)
        .encryption_algorithm(encryption)
        .mac_algorithm(mac)
        .write()
        .map_err(|error| KeystoreError(format!("PKCS#12 encoding failed ({error})")))
}

/// The key as PKCS#8, which PKCS#12 requires: PKCS#1 and SEC1 keys are converted by aws-lc-rs.
fn to_pkcs8(der: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    let failed = |what: &str| KeystoreError(what.to_string());
    let encoding = match key::detect(der) {
        Detected::Key(encoding) => encoding,
        _ => return Err(failed("the key is not a private key")),
    };
    match encoding {
        KeyEncoding::Pkcs8 => Ok(der.to_vec()),
        KeyEncoding::Pkcs1 => aws_lc_rs::rsa::KeyPair::from_der(der)
            .ok()
            .and_then(|key| key.as_der().ok())
            .map(|pkcs8| pkcs8.as_ref().to_vec())
            .ok_or_else(|| failed("the RSA key could not be converted to PKCS#8")),
        KeyEncoding::Sec1 => {
            let algorithm = match key::classify(KeyEncoding::Sec1, der) {
                Ok(KeyKind::EcP256) => &ECDSA_P256_SHA256_ASN1_SIGNING,
                Ok(KeyKind::EcP384) => &ECDSA_P384_SHA384_ASN1_SIGNING,
                _ => return Err(failed("the EC key's curve is not supported")),
            };
            EcdsaKeyPair::from_private_key_der(algorithm, der)
                .ok()
                .and_then(|key| key.to_pkcs8v1().ok())
                .map(|pkcs8| pkcs8.as_ref().to_vec())
                .ok_or_else(|| failed("the EC key could not be converted to PKCS#8"))
        }
    }
}

/// The most key-derivation iterations a PKCS#12 file the operator opens may ask for, per
/// derivation (the MAC's, each PBES1/PBKDF2 encryption's): .NET's limit. A file asking for more
/// would pin a CPU for seconds per open; the operator's own keystores use far fewer.
pub const MAX_PKCS12_ITERATIONS: u64 = 600_000;

/// scrypt (1.3.6.1.4.1.11591.4.11) as a PBES2 key-derivation function: its cost is memory (up to a
/// gibibyte by the parameters), so it is refused outright; no PKCS#12 tool writes it by default.
const SCRYPT_OID: &[u8] = &[0x2B, 0x06, 0x01, 0x04, 0x01, 0xDA, 0x47, 0x04, 0x0B];

/// What a PKCS#12 file would cost to open, read off its DER before any KDF runs: every iteration
/// count it declares outside its encrypted parts (a salt followed by a count, as in MacData,
/// PKCS#12 PBE parameters and PBKDF2 parameters) is at most [`MAX_PKCS12_ITERATIONS`], and no
/// scrypt. Counts inside encrypted parts (a key bag inside an encrypted SafeContents) are bounded
/// at 1,000,000 by p12-keystore when it gets there.
pub fn check_pkcs12_cost(bytes: &[u8]) -> Result<(), String> {
    check_cost(bytes, MAX_PKCS12_ITERATIONS)
}

fn check_cost(bytes: &[u8], max_iterations: u64) -> Result<(), String> {
    let mut walk = CostWalk {
        nodes: 0,
        max_iterations,
    };
    walk.walk(bytes, 0).map_err(|refusal| match refusal {
        Refusal::Costly(why) | Refusal::Malformed(why) => why.to_string(),
    })
}

/// Why the walk stopped: the file asks for too much work, or it is not DER.
enum Refusal {
    Costly(&'static str),
    Malformed(&'static str),
}

struct CostWalk {
    nodes: usize,
    max_iterations: u64,
}

/// One DER element: its tag byte and value.
struct Element<'a> {
    tag: u8,
    value: &'a [u8],
}

const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const CONSTRUCTED: u8 = 0x20;

impl CostWalk {
    fn walk(&mut self, mut der: &[u8], depth: usize) -> Result<(), Refusal> {
        if depth > 24 {
            return Err(Refusal::Malformed(
                "is nested too deeply to be a PKCS#12 file",
            ));
        }
        let mut previous_tag = None;
        while !der.is_empty() {
            self.nodes += 1;
            if self.nodes > 20_000 {
                return Err(Refusal::Malformed(
                    "has too many elements to be a PKCS#12 file",
                ));
            }
            let (element, rest) =
                next_element(der).ok_or(Refusal::Malformed("is not DER-encoded PKCS#12"))?;
            der = rest;
            if element.tag == TAG_INTEGER && previous_tag == Some(TAG_OCTET_STRING) {
                let iterations = unsigned(element.value);
                if iterations > self.max_iterations {
                    return Err(Refusal::Costly(
                        "asks for more key-derivation iterations than the operator opens \
                            (at most 600000 per derivation)",
                    ));
                }
            }
            if element.tag == TAG_OID && element.value == SCRYPT_OID {
                return Err(Refusal::Costly(
                    "uses scrypt, which the operator does not open (use PBKDF2)",
                ));
            }
            if element.tag & CONSTRUCTED != 0 {
                self.walk(element.value, depth + 1)?;
            } else if element.tag == TAG_OCTET_STRING && looks_like_der(element.value) {
                // Content wrapped in an OCTET STRING (the AuthenticatedSafe, SafeContents) is DER
                // too, and is walked; a salt, a digest or ciphertext is not, and is skipped. Random
                // bytes can parse as DER at the first level by chance: inside such content only a
                // cost counts, never a malformed element (that was opaque data after all).
                if let Err(Refusal::Costly(why)) = self.walk(element.value, depth + 1) {
                    return Err(Refusal::Costly(why));
                }
            }
            previous_tag = Some(element.tag);
        }
        Ok(())
    }
}

/// Whether `bytes` parse as a sequence of DER elements that fill them exactly.
fn looks_like_der(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match next_element(bytes) {
            Some((_, rest)) => bytes = rest,
            None => return false,
        }
    }
    true
}

/// The first element of `der` and what follows it; `None` when it is not definite-length DER with
/// a one-byte tag (PKCS#12 uses no other).
fn next_element(der: &[u8]) -> Option<(Element<'_>, &[u8])> {
    let (&tag, rest) = der.split_first()?;
    if tag & 0x1F == 0x1F {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = match first {
        0..=0x7F => (usize::from(first), rest),
        0x81..=0x84 => {
            let count = usize::from(first & 0x7F);
            if rest.len() < count {
                return None;
            }
            let (bytes, rest) = rest.split_at(count);
            let length = bytes
                .iter()
                .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
            (length, rest)
        }
        // Indefinite (BER) or absurd lengths.
        _ => return None,
    };
    if rest.len() < length {
        return None;
    }
    let (value, rest) = rest.split_at(length);
    Some((Element { tag, value }, rest))
}

/// A DER INTEGER's value as an unsigned count; negative or wider than 64 bits reads as the
/// largest count (refused as too many).
fn unsigned(value: &[u8]) -> u64 {
    let trimmed: &[u8] = match value {
        [0, rest @ ..] => rest,
        [first, ..] if first & 0x80 != 0 => return u64::MAX,
        other => other,
    };
    if trimmed.len() > 8 {
        return u64::MAX;
    }
    trimmed
        .iter()
        .fold(0u64, |count, &byte| (count << 8) | u64::from(byte))
}

/// A PKCS#12 source stored as SecretString: `{"pkcs12": "<base64 of the .p12>", "password": "..."}`.
/// The password in the JSON wins over `password_ref` (from `spec.source.passwordSecretRef`); one of
/// them must be there.
pub fn read_pkcs12_json(
    text: &str,
    password_ref: Option<&str>,
) -> Result<super::Material, super::PkiError> {
    use super::PkiError;
    use base64::Engine;
    let invalid_json = |detail: &str| PkiError::InvalidJson {
        detail: detail.to_string(),
    };
    let value: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|_| {
            invalid_json(
                "a Pkcs12 source stored as text must be a JSON object with fields \"pkcs12\" (the \
                 file in base64) and \"password\"; store the file itself as SecretBinary otherwise",
            )
        })?;
    let field = |name: &str| match value.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text.as_str())),
        Some(_) => Err(invalid_json(&format!("field \"{name}\" must be a string"))),
    };
    let encoded = field("pkcs12")?.ok_or_else(|| PkiError::MissingField {
        field: "pkcs12".into(),
    })?;
    let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| PkiError::InvalidPkcs12 {
            detail: "in field \"pkcs12\" is not valid base64".into(),
        })?;
    let password = field("password")?
        .or(password_ref)
        .ok_or_else(|| PkiError::InvalidPkcs12 {
            detail: "has no password: set field \"password\" or spec.source.passwordSecretRef"
                .into(),
        })?;
    read_pkcs12(&bytes, password)
}

/// Reads a PKCS#12 file (a `.p12` a partner sent, an ACM export, stored as SecretBinary) into the
/// same material as the other formats: the key, its certificate chain (leaf first) and, as the CA,
/// the self-signed certificates at the end of the chain.
pub fn read_pkcs12(bytes: &[u8], password: &str) -> Result<super::Material, super::PkiError> {
    use super::PkiError;
    let invalid = |detail: &str| PkiError::InvalidPkcs12 {
        detail: detail.to_string(),
    };
    // Before any KDF runs: a file that would pin a CPU for seconds is refused unopened.
    check_pkcs12_cost(bytes).map_err(|detail| invalid(&detail))?;
    let store = KeyStore::from_pkcs12(bytes, password, p12_keystore::Pkcs12ImportPolicy::Relaxed)
        .map_err(|_| invalid("does not open with the given password, or is not PKCS#12"))?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or_else(|| invalid("holds no private key with its certificate"))?;
    let key = super::PrivateKey::from_der(chain.key().as_der().to_vec(), "the PKCS#12 key")?;
    let (mut leaf_and_intermediates, mut ca) = (Vec::new(), Vec::new());
    for (index, certificate) in chain.certs().iter().enumerate() {
        let der = rustls::pki_types::CertificateDer::from(certificate.as_der().to_vec());
        // A self-signed certificate after the leaf is a root: the CA, not part of tls.crt.
        if index > 0 && certificate.subject() == certificate.issuer() {
            ca.push(der);
        } else {
            leaf_and_intermediates.push(der);
        }
    }
    if leaf_and_intermediates.is_empty() {
        return Err(invalid("holds a key without its certificate"));
    }
    Ok(super::Material {
        chain: leaf_and_intermediates,
        key,
        ca,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keystore holding one certificate, written with these iteration counts.
    fn keystore(mac_iterations: u32, encryption_iterations: u32) -> Vec<u8> {
        let certificate = rcgen::generate_simple_self_signed(vec!["cost.test".into()])
            .expect("certificate")
            .cert;
        let mut store = KeyStore::new();
        store.add_entry(
            "ca",
            KeyStoreEntry::Certificate(Certificate::from_der(certificate.der()).expect("X.509")),
        );
        store
            .writer("pw")
            .mac_iterations(mac_iterations)
            .encryption_iterations(encryption_iterations)
            .write()
            .expect("written")
    }

    #[test]
    fn the_cost_is_read_off_the_mac_and_the_encryption_before_any_kdf() {
        let cheap = keystore(1000, 1000);
        assert!(check_cost(&cheap, 1000).is_ok());
        let mac = keystore(3000, 1000);
        assert!(check_cost(&mac, 2999).is_err(), "the MAC's count is found");
        assert!(check_cost(&mac, 3000).is_ok());
        let encryption = keystore(1000, 4000);
        let refused = check_cost(&encryption, 3999).expect_err("the PBKDF2 count is found");
        assert!(refused.contains("600000"), "{refused}");
        assert!(check_cost(&encryption, 4000).is_ok());
        // The real bound lets every keystore the operator writes through.
        assert!(check_pkcs12_cost(&cheap).is_ok());
    }

    #[test]
    fn what_is_not_pkcs12_der_is_refused_without_a_panic() {
        for bytes in [
            &b""[..],
            b"\x30",
            b"\x30\x80\x00\x00",
            b"\x30\x84\xff\xff\xff\xff",
            b"not a keystore",
        ] {
            let _ = check_pkcs12_cost(bytes);
        }
        assert!(check_pkcs12_cost(b"\x30\x03\x02\x01").is_err(), "truncated");
        // Nested a thousand deep.
        let mut deep = Vec::new();
        for _ in 0..1000 {
            deep.splice(0..0, [0x30, 0x80]);
        }
        assert!(check_pkcs12_cost(&deep).is_err());
    }

    /// Salts, digests and ciphertext are random: one that happens to parse as DER at its first
    /// level must not make a good file look malformed (seen once in CI: a keystore refused as
    /// "not DER" by chance).
    #[test]
    fn random_bytes_inside_an_octet_string_never_refuse_a_good_file() {
        // SEQUENCE { OCTET STRING { 30 02 05 07 } }: a SEQUENCE by its first level, malformed in.
        assert!(check_pkcs12_cost(&[0x30, 0x06, 0x04, 0x04, 0x30, 0x02, 0x05, 0x07]).is_ok());
        for _ in 0..200 {
            assert!(check_cost(&keystore(1000, 1000), 1000).is_ok());
        }
    }

    #[test]
    fn integers_read_as_counts() {
        assert_eq!(unsigned(&[0x09, 0x27, 0xc0]), 600_000);
        assert_eq!(unsigned(&[0x00, 0x80]), 128);
        assert_eq!(unsigned(&[0x80]), u64::MAX, "negative");
        assert_eq!(unsigned(&[1; 9]), u64::MAX, "wider than 64 bits");
    }
}
