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

/// cert-manager's names for the extra formats.
pub const COMBINED_PEM_KEY: &str = "tls-combined.pem";
pub const KEY_DER_KEY: &str = "key.der";

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
    formats: &[OutputFormatType],
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
    for format in formats {
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
}
