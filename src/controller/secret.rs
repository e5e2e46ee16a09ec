//! Pure decisions about the target Secret: what it should hold, whether it is intact and up to
//! date, and whether it is ours. No I/O.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{
    CA_VERSION_ID_ANNOTATION, FINGERPRINT_ANNOTATION, IDENTITY_LABEL, INTEGRITY_ANNOTATION,
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, OutputFormatType, VERSION_ID_ANNOTATION,
};
use crate::pki::ValidatedIdentity;
use crate::pki::integrity::IntegrityKey;
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
pub const KEYSTORE_INPUTS_ANNOTATION: &str = "mtls-operator.io/keystore-inputs-hmac-sha256";
/// The keyed tag of the keystore password the keystores were written under: a new password is seen
/// by comparing tags, never by trying to open `keystore.p12` (a KDF on bytes a tenant can write).
pub const KEYSTORE_PASSWORD_ANNOTATION: &str = "mtls-operator.io/keystore-password-hmac-sha256";

/// The annotations the integrity tag covers besides the data: what the Secret says it was made
/// from. A tenant who edits any of them makes the Secret look edited, not newer.
const TAGGED_ANNOTATIONS: [&str; 5] = [
    VERSION_ID_ANNOTATION,
    CA_VERSION_ID_ANNOTATION,
    FINGERPRINT_ANNOTATION,
    KEYSTORE_INPUTS_ANNOTATION,
    KEYSTORE_PASSWORD_ANNOTATION,
];

/// What the Secret holds besides `tls.crt`, `tls.key` and `ca.crt`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    pub formats: &'a [OutputFormatType],
    pub pkcs12: Option<&'a RenderedPkcs12>,
}

/// Rendered keystores, the tag of their inputs and the tag of their password.
#[derive(Debug, Clone)]
pub struct RenderedPkcs12 {
    pub files: Pkcs12Files,
    pub inputs: String,
    pub password: String,
}

/// The keyed tag of a keystore's inputs (material, password, alias, profile).
pub fn keystore_inputs(
    key: &IntegrityKey,
    material: &ValidatedIdentity,
    password: &str,
    alias: &str,
    profile: Pkcs12Profile,
) -> String {
    key.tag(
        "keystore-inputs",
        &[
            material.content_digest().as_bytes(),
            password.as_bytes(),
            alias.as_bytes(),
            format!("{profile:?}").as_bytes(),
        ],
    )
}

/// The keyed tag of the keystore password of the identity `uid`.
pub fn keystore_password_tag(key: &IntegrityKey, uid: &str, password: &str) -> String {
    key.tag(PASSWORD_PURPOSE, &[uid.as_bytes(), password.as_bytes()])
}

/// What the keystore password tag is made for (also what it is checked against).
const PASSWORD_PURPOSE: &str = "keystore-password";
/// What the Secret's integrity tag is made for.
const SECRET_PURPOSE: &str = "secret";

/// Whether an intact Secret's keystores were written under `password` (their password tag says
/// so); `false` when the tag is absent or another password's.
pub fn keystore_password_unchanged(
    key: &IntegrityKey,
    existing: &Secret,
    uid: &str,
    password: &str,
) -> bool {
    existing
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(KEYSTORE_PASSWORD_ANNOTATION))
        .is_some_and(|tag| {
            key.verify(
                PASSWORD_PURPOSE,
                &[uid.as_bytes(), password.as_bytes()],
                tag,
            )
        })
}

/// The keystores an intact Secret of ours already holds for these inputs, to be kept as they are.
pub fn reusable_pkcs12(
    key: &IntegrityKey,
    existing: Option<&Secret>,
    inputs: &str,
) -> Option<Pkcs12Files> {
    let existing = existing?;
    let annotations = existing.metadata.annotations.as_ref()?;
    if annotations
        .get(KEYSTORE_INPUTS_ANNOTATION)
        .map(String::as_str)
        != Some(inputs)
    {
        return None;
    }
    // Only from an intact Secret: a keystore edited by hand is rendered again, not kept.
    if !is_intact(key, existing) {
        return None;
    }
    let data = existing.data.as_ref()?;
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
#[allow(clippy::too_many_arguments)]
pub fn desired_secret(
    key: &IntegrityKey,
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
                ]);
                if let Some(pkcs12) = outputs.pkcs12 {
                    annotations.insert(
                        KEYSTORE_INPUTS_ANNOTATION.to_string(),
                        pkcs12.inputs.clone(),
                    );
                    annotations.insert(
                        KEYSTORE_PASSWORD_ANNOTATION.to_string(),
                        pkcs12.password.clone(),
                    );
                }
                if let Some(ca_version_id) = ca_version_id {
                    annotations.insert(
                        CA_VERSION_ID_ANNOTATION.to_string(),
                        ca_version_id.to_string(),
                    );
                }
                let tag = integrity_tag(key, namespace, name, &data, &annotations);
                annotations.insert(INTEGRITY_ANNOTATION.to_string(), tag);
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

/// The keyed tag over the Secret's place (namespace, name), its data (keys in order) and the
/// annotations that say what it was made from ([`TAGGED_ANNOTATIONS`], absent ones as absent).
pub fn integrity_tag(
    key: &IntegrityKey,
    namespace: &str,
    name: &str,
    data: &BTreeMap<String, ByteString>,
    annotations: &BTreeMap<String, String>,
) -> String {
    key.tag(
        SECRET_PURPOSE,
        &integrity_parts(namespace, name, data, annotations)
            .iter()
            .map(Vec::as_slice)
            .collect::<Vec<_>>(),
    )
}

fn integrity_parts(
    namespace: &str,
    name: &str,
    data: &BTreeMap<String, ByteString>,
    annotations: &BTreeMap<String, String>,
) -> Vec<Vec<u8>> {
    let mut parts = vec![namespace.as_bytes().to_vec(), name.as_bytes().to_vec()];
    for (data_key, value) in data {
        parts.push(data_key.as_bytes().to_vec());
        parts.push(value.0.clone());
    }
    parts.push(b"--annotations--".to_vec());
    for annotation in TAGGED_ANNOTATIONS {
        match annotations.get(annotation) {
            Some(value) => {
                parts.push(annotation.as_bytes().to_vec());
                parts.push(value.as_bytes().to_vec());
            }
            None => parts.push(Vec::new()),
        }
    }
    parts
}

/// Whether `secret` is as the operator wrote it: its integrity tag matches its name, data and
/// tagged annotations. A hand edit of any of them (or a Secret written before the tag existed)
/// is not intact, and is repaired.
pub fn is_intact(key: &IntegrityKey, secret: &Secret) -> bool {
    let Some(annotations) = secret.metadata.annotations.as_ref() else {
        return false;
    };
    let Some(tag) = annotations.get(INTEGRITY_ANNOTATION) else {
        return false;
    };
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let parts = integrity_parts(
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default(),
        data,
        annotations,
    );
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    key.verify(SECRET_PURPOSE, &parts, tag)
}

/// The source versions (main, CA) an intact Secret of ours was written from: `None` when it is
/// not intact (edited by hand) or lacks the annotations.
pub fn carried_versions(key: &IntegrityKey, secret: &Secret) -> Option<(String, Option<String>)> {
    if !is_intact(key, secret) {
        return None;
    }
    let annotations = secret.metadata.annotations.as_ref()?;
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

    /// An intact Secret as `desired_secret` tags it: these data and annotations, tagged.
    fn tagged(
        key: &IntegrityKey,
        data: BTreeMap<String, ByteString>,
        mut annotations: BTreeMap<String, String>,
    ) -> Secret {
        let tag = integrity_tag(key, "payments", "client-tls", &data, &annotations);
        annotations.insert(INTEGRITY_ANNOTATION.to_string(), tag);
        Secret {
            metadata: ObjectMeta {
                name: Some("client-tls".into()),
                namespace: Some("payments".into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }

    #[test]
    fn keystores_are_kept_only_from_an_intact_secret_with_the_same_inputs() {
        let key = IntegrityKey::for_tests();
        let data = BTreeMap::from([
            (KEYSTORE_KEY.to_string(), ByteString(b"p12".to_vec())),
            (TRUSTSTORE_KEY.to_string(), ByteString(b"trust".to_vec())),
        ]);
        let annotations =
            BTreeMap::from([(KEYSTORE_INPUTS_ANNOTATION.to_string(), "inputs".to_string())]);
        let intact = tagged(&key, data.clone(), annotations.clone());
        let kept = reusable_pkcs12(&key, Some(&intact), "inputs").expect("kept");
        assert_eq!(kept.keystore, b"p12");
        assert_eq!(kept.truststore.as_deref(), Some(b"trust".as_slice()));
        // Other inputs (a rotation, a new password): rendered again.
        assert!(reusable_pkcs12(&key, Some(&intact), "other").is_none());
        // Edited by hand: rendered again.
        let mut edited = intact.clone();
        if let Some(data) = edited.data.as_mut() {
            data.insert(KEYSTORE_KEY.to_string(), ByteString(b"tampered".to_vec()));
        }
        assert!(reusable_pkcs12(&key, Some(&edited), "inputs").is_none());
        assert!(reusable_pkcs12(&key, None, "inputs").is_none());
    }

    #[test]
    fn a_tenant_cannot_make_an_edited_secret_look_intact() {
        let key = IntegrityKey::for_tests();
        let data = BTreeMap::from([("tls.crt".to_string(), ByteString(b"cert".to_vec()))]);
        let annotations = BTreeMap::from([
            (VERSION_ID_ANNOTATION.to_string(), "v1".to_string()),
            (
                KEYSTORE_PASSWORD_ANNOTATION.to_string(),
                "pw-tag".to_string(),
            ),
        ]);
        let intact = tagged(&key, data.clone(), annotations.clone());
        assert!(is_intact(&key, &intact));
        assert_eq!(
            carried_versions(&key, &intact),
            Some(("v1".to_string(), None))
        );
        // The attacker's best forgeries: the edited data with the old tag, with a plain SHA-256 of
        // the data (the old scheme), with a tag of another key; and each tagged annotation changed.
        let mut forged_data = data.clone();
        forged_data.insert("tls.crt".into(), ByteString(b"attacker's".to_vec()));
        let mut with_old_tag = intact.clone();
        with_old_tag.data = Some(forged_data.clone());
        let other_key = IntegrityKey::from_bytes(&[9u8; 32]).expect("key");
        let with_other_key = tagged(&other_key, forged_data.clone(), annotations.clone());
        use sha2::{Digest, Sha256};
        let mut plain = intact.clone();
        plain.data = Some(forged_data);
        if let Some(annotations) = plain.metadata.annotations.as_mut() {
            annotations.insert(
                INTEGRITY_ANNOTATION.into(),
                hex::encode(Sha256::digest(b"tls.crtattacker's")),
            );
        }
        for forged in [&with_old_tag, &with_other_key, &plain] {
            assert!(!is_intact(&key, forged));
            assert_eq!(carried_versions(&key, forged), None);
        }
        for annotation in TAGGED_ANNOTATIONS {
            let mut edited = intact.clone();
            if let Some(annotations) = edited.metadata.annotations.as_mut() {
                annotations.insert(annotation.to_string(), "edited".to_string());
            }
            assert!(!is_intact(&key, &edited), "{annotation}");
        }
        // Copied whole under another name: not intact there.
        let mut moved = intact.clone();
        moved.metadata.name = Some("other-tls".into());
        assert!(!is_intact(&key, &moved));
        let mut untagged = intact;
        untagged.metadata.annotations = None;
        assert!(!is_intact(&key, &untagged));
    }

    #[test]
    fn a_password_change_is_seen_from_the_tags_alone() {
        let key = IntegrityKey::for_tests();
        let annotations = BTreeMap::from([(
            KEYSTORE_PASSWORD_ANNOTATION.to_string(),
            keystore_password_tag(&key, "uid-1", "old"),
        )]);
        let secret = tagged(&key, BTreeMap::new(), annotations);
        assert!(keystore_password_unchanged(&key, &secret, "uid-1", "old"));
        assert!(!keystore_password_unchanged(&key, &secret, "uid-1", "new"));
        assert!(
            !keystore_password_unchanged(&key, &secret, "uid-2", "old"),
            "another identity"
        );
        assert!(!keystore_password_unchanged(
            &key,
            &Secret::default(),
            "uid-1",
            "old"
        ));
    }
}
