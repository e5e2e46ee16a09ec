//! Pure decisions about the target Secret: what it should hold, whether it is intact and up to
//! date, and whether it is ours. No I/O.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{
    CA_VERSION_ID_ANNOTATION, DATA_DIGEST_ANNOTATION, FINGERPRINT_ANNOTATION, IDENTITY_LABEL,
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, OutputFormatType, VERSION_ID_ANNOTATION,
};
use crate::pki::ValidatedIdentity;
use crate::pki::keystore::{Pkcs12Files, Pkcs12Profile};

/// cert-manager's names for the extra formats.
pub const COMBINED_PEM_KEY: &str = "tls-combined.pem";
pub const KEY_DER_KEY: &str = "key.der";
/// cert-manager's names for the PKCS#12 keystores.
pub const KEYSTORE_KEY: &str = "keystore.p12";
pub const TRUSTSTORE_KEY: &str = "truststore.p12";
/// A digest of what the keystores were made from (material, password, alias, profile): PKCS#12 is
/// salted, so rendering it again gives other bytes; the keystores are re-rendered only when this
/// changes, never on a sync that changes nothing.
pub const KEYSTORE_INPUTS_ANNOTATION: &str = "mtls-operator.io/keystore-inputs-sha256";

/// What the Secret holds besides `tls.crt`, `tls.key` and `ca.crt`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    pub formats: &'a [OutputFormatType],
    pub pkcs12: Option<&'a RenderedPkcs12>,
}

/// Rendered keystores and the digest of their inputs.
#[derive(Debug, Clone)]
pub struct RenderedPkcs12 {
    pub files: Pkcs12Files,
    pub inputs: String,
}

/// The digest of a keystore's inputs. The password enters only through its own SHA-256, and the
/// result is as exposed as the keystore itself (whoever reads the annotation reads `keystore.p12`).
pub fn keystore_inputs(
    material: &ValidatedIdentity,
    password: &str,
    alias: &str,
    profile: Pkcs12Profile,
) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in [
        material.content_digest().as_bytes(),
        Sha256::digest(password.as_bytes()).as_slice(),
        alias.as_bytes(),
        format!("{profile:?}").as_bytes(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// The keystores an intact Secret of ours already holds for these inputs, to be kept as they are.
pub fn reusable_pkcs12(existing: Option<&Secret>, inputs: &str) -> Option<Pkcs12Files> {
    let existing = existing?;
    let annotations = existing.metadata.annotations.as_ref()?;
    if annotations
        .get(KEYSTORE_INPUTS_ANNOTATION)
        .map(String::as_str)
        != Some(inputs)
    {
        return None;
    }
    let data = existing.data.as_ref()?;
    // Only from an intact Secret: a keystore edited by hand is rendered again, not kept.
    if annotations.get(DATA_DIGEST_ANNOTATION) != Some(&data_digest(data)) {
        return None;
    }
    Some(Pkcs12Files {
        keystore: data.get(KEYSTORE_KEY)?.0.clone(),
        truststore: data.get(TRUSTSTORE_KEY).map(|value| value.0.clone()),
    })
}

/// `Some(inputs)` when the keystores are rendered from new `inputs` for the certificate `existing`
/// already holds (a new password, alias or profile), `None` otherwise (new certificate, first write,
/// or nothing changed).
pub fn keystore_changed_alone(
    existing: Option<&Secret>,
    material: &ValidatedIdentity,
    inputs: &str,
) -> Option<String> {
    let annotations = existing?.metadata.annotations.as_ref()?;
    let before = annotations.get(KEYSTORE_INPUTS_ANNOTATION)?;
    let same_certificate =
        annotations.get(FINGERPRINT_ANNOTATION) == Some(&material.facts.sha256_fingerprint);
    (same_certificate && before != inputs).then(|| inputs.to_string())
}

/// The source versions a Secret is written from (the certificate's, the separate CA's).
#[derive(Debug, Clone, Copy)]
pub struct SourceVersions<'a> {
    pub main: &'a str,
    pub ca: Option<&'a str>,
}

/// The Secret the identity should own, as applied with server-side apply.
pub fn desired_secret(
    name: &str,
    namespace: &str,
    identity_name: &str,
    owner: OwnerReference,
    versions: SourceVersions<'_>,
    material: &ValidatedIdentity,
    outputs: Outputs<'_>,
) -> Secret {
    let SourceVersions {
        main: version_id,
        ca: ca_version_id,
    } = versions;
    let mut data = BTreeMap::new();
    data.insert(
        "tls.crt".to_string(),
        ByteString(material.tls_crt.as_bytes().to_vec()),
    );
    data.insert(
        "tls.key".to_string(),
        ByteString(material.tls_key.expose().as_bytes().to_vec()),
    );
    if let Some(ca) = &material.ca_crt {
        data.insert("ca.crt".to_string(), ByteString(ca.as_bytes().to_vec()));
    }
    // Extra formats come from the same validated material, in the same write, under the same
    // digest: a rotation changes every one of them at once, and an edit of any is repaired.
    if let Some(pkcs12) = outputs.pkcs12 {
        data.insert(
            KEYSTORE_KEY.to_string(),
            ByteString(pkcs12.files.keystore.clone()),
        );
        if let Some(truststore) = &pkcs12.files.truststore {
            data.insert(TRUSTSTORE_KEY.to_string(), ByteString(truststore.clone()));
        }
    }
    for format in outputs.formats {
        match format {
            OutputFormatType::CombinedPem => {
                data.insert(
                    COMBINED_PEM_KEY.to_string(),
                    ByteString(material.combined_pem().into_bytes()),
                );
            }
            OutputFormatType::Der => {
                if let Some(der) = material.key_der() {
                    data.insert(KEY_DER_KEY.to_string(), ByteString(der));
                }
            }
        }
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                (IDENTITY_LABEL.to_string(), identity_name.to_string()),
            ])),
            annotations: Some({
                let mut annotations = BTreeMap::from([
                    (VERSION_ID_ANNOTATION.to_string(), version_id.to_string()),
                    (
                        FINGERPRINT_ANNOTATION.to_string(),
                        material.facts.sha256_fingerprint.clone(),
                    ),
                    (DATA_DIGEST_ANNOTATION.to_string(), data_digest(&data)),
                ]);
                if let Some(pkcs12) = outputs.pkcs12 {
                    annotations.insert(
                        KEYSTORE_INPUTS_ANNOTATION.to_string(),
                        pkcs12.inputs.clone(),
                    );
                }
                if let Some(ca_version_id) = ca_version_id {
                    annotations.insert(
                        CA_VERSION_ID_ANNOTATION.to_string(),
                        ca_version_id.to_string(),
                    );
                }
                annotations
            }),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// SHA-256 over the Secret's data (keys in order, each key and value length-prefixed).
pub fn data_digest(data: &BTreeMap<String, ByteString>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (key, value) in data {
        for part in [key.as_bytes(), value.0.as_slice()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
    }
    hex::encode(hasher.finalize())
}

/// The source versions (main, CA) an intact Secret of ours was written from: `None` when its data
/// no longer matches the digest written with it (edited by hand) or it lacks the annotations.
pub fn carried_versions(secret: &Secret) -> Option<(String, Option<String>)> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let digest = annotations.get(DATA_DIGEST_ANNOTATION)?;
    let data = secret.data.clone().unwrap_or_default();
    if *digest != data_digest(&data) {
        return None;
    }
    Some((
        annotations.get(VERSION_ID_ANNOTATION)?.clone(),
        annotations.get(CA_VERSION_ID_ANNOTATION).cloned(),
    ))
}

/// True when `existing` already holds everything `desired` sets, so no write is needed.
pub fn secret_up_to_date(existing: &Secret, desired: &Secret) -> bool {
    let contains = |have: &Option<BTreeMap<String, String>>,
                    want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(key, value)| have.as_ref().and_then(|have| have.get(key)) == Some(value))
    };
    existing.type_ == desired.type_
        && existing.data == desired.data
        && contains(&existing.metadata.labels, &desired.metadata.labels)
        && contains(
            &existing.metadata.annotations,
            &desired.metadata.annotations,
        )
}

/// Whether an object has `owner_uid` as its controller.
pub fn is_owned_by(metadata: &ObjectMeta, owner_uid: &str) -> bool {
    metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == owner_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_needs_the_controller_reference_with_our_uid() {
        let with_owner = |uid: &str, controller: Option<bool>| Secret {
            metadata: ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    uid: uid.into(),
                    controller,
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(is_owned_by(&with_owner("u1", Some(true)).metadata, "u1"));
        assert!(!is_owned_by(&with_owner("u2", Some(true)).metadata, "u1"));
        assert!(!is_owned_by(&with_owner("u1", None).metadata, "u1"));
        assert!(!is_owned_by(&Secret::default().metadata, "u1"));
    }

    #[test]
    fn keystores_are_kept_only_from_an_intact_secret_with_the_same_inputs() {
        let data = BTreeMap::from([
            (KEYSTORE_KEY.to_string(), ByteString(b"p12".to_vec())),
            (TRUSTSTORE_KEY.to_string(), ByteString(b"trust".to_vec())),
        ]);
        let secret = |data: BTreeMap<String, ByteString>, digest: String| Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([
                    (KEYSTORE_INPUTS_ANNOTATION.to_string(), "inputs".to_string()),
                    (DATA_DIGEST_ANNOTATION.to_string(), digest),
                ])),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        let intact = secret(data.clone(), data_digest(&data));
        let kept = reusable_pkcs12(Some(&intact), "inputs").expect("kept");
        assert_eq!(kept.keystore, b"p12");
        assert_eq!(kept.truststore.as_deref(), Some(b"trust".as_slice()));
        // Other inputs (a rotation, a new password): rendered again.
        assert!(reusable_pkcs12(Some(&intact), "other").is_none());
        // Edited by hand: rendered again.
        let mut edited = data.clone();
        edited.insert(KEYSTORE_KEY.to_string(), ByteString(b"tampered".to_vec()));
        assert!(reusable_pkcs12(Some(&secret(edited, data_digest(&data))), "inputs").is_none());
        assert!(reusable_pkcs12(None, "inputs").is_none());
    }
}
