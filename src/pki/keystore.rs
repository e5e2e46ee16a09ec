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

/// Whether `keystore` (a `keystore.p12` the operator wrote) opens with `password`: false once the
/// password Secret holds another password, so the keystore is rendered again.
pub fn opens_with(keystore: &[u8], password: &str) -> bool {
    KeyStore::from_pkcs12(
        keystore,
        password,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .is_ok()
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
