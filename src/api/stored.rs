//! The form in which the controller keeps every watched identity in memory.
//!
//! The controller's store holds one copy of each identity for as long as it exists, but only the
//! reconcile of that one identity reads its spec and status in full. So the store keeps metadata
//! typed (the controller's keys, generation and resourceVersion), the two names other identities'
//! work asks about (the target Secret, the keystore password Secret), and spec and status together
//! as their JSON, deflated: about 600 bytes for a synced identity, where the typed spec and status,
//! with their dozens of small allocations, took about 2.5 KB. A reconcile expands its identity
//! again, which costs microseconds.

use std::borrow::Cow;

use kube::api::ObjectMeta;
use kube::core::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Deserializer};

use super::{MtlsIdentity, MtlsIdentitySpec, MtlsIdentityStatus};

/// An `MtlsIdentity` as the controller's store keeps it: the same resource, compacted.
#[derive(Clone, Debug)]
pub struct StoredIdentity {
    pub metadata: ObjectMeta,
    /// The Secret the identity writes.
    target_secret: Box<str>,
    /// The Secret holding its keystore password, if it has a keystore.
    password_secret: Option<Box<str>>,
    /// `[spec, status]` as deflated JSON, serialized from their typed forms (so they parse back).
    deflated: Box<[u8]>,
}

/// Fast rather than small: the difference is a few bytes on an identity.
const DEFLATE_LEVEL: u8 = 1;

/// What the API server sends.
#[derive(Deserialize)]
struct Sent {
    metadata: ObjectMeta,
    spec: MtlsIdentitySpec,
    #[serde(default)]
    status: Option<MtlsIdentityStatus>,
}

impl<'de> Deserialize<'de> for StoredIdentity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Sent {
            metadata,
            spec,
            status,
        } = Sent::deserialize(deserializer)?;
        let json = serde_json::to_vec(&(&spec, &status)).map_err(serde::de::Error::custom)?;
        Ok(Self {
            target_secret: spec
                .target_secret_name(metadata.name.as_deref())
                .into_boxed_str(),
            password_secret: spec
                .pkcs12()
                .map(|pkcs12| pkcs12.password_secret_ref.name.as_str().into()),
            deflated: miniz_oxide::deflate::compress_to_vec(&json, DEFLATE_LEVEL)
                .into_boxed_slice(),
            metadata,
        })
    }
}

impl StoredIdentity {
    /// The identity with its typed spec and status, for one reconcile. It cannot fail (the bytes
    /// were deflated here from JSON of the same types); if it did, the message says why.
    pub fn expand(&self) -> Result<MtlsIdentity, String> {
        let json = miniz_oxide::inflate::decompress_to_vec(&self.deflated).map_err(|error| {
            format!(
                "the stored copy of {} did not inflate: {error}",
                self.name_any()
            )
        })?;
        let (spec, status): (MtlsIdentitySpec, Option<MtlsIdentityStatus>) =
            serde_json::from_slice(&json).map_err(|error| {
                format!(
                    "the stored copy of {} did not parse: {error}",
                    self.name_any()
                )
            })?;
        Ok(MtlsIdentity {
            metadata: self.metadata.clone(),
            spec,
            status,
        })
    }

    /// The name of the Secret holding the keystore's password, if the identity has a keystore.
    pub fn password_secret(&self) -> Option<&str> {
        self.password_secret.as_deref()
    }

    /// The name of the Secret this identity writes.
    pub fn target_secret_name(&self) -> String {
        self.target_secret.to_string()
    }
}

impl Resource for StoredIdentity {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dynamic: &()) -> Cow<'_, str> {
        MtlsIdentity::kind(dynamic)
    }
    fn group(dynamic: &()) -> Cow<'_, str> {
        MtlsIdentity::group(dynamic)
    }
    fn version(dynamic: &()) -> Cow<'_, str> {
        MtlsIdentity::version(dynamic)
    }
    fn plural(dynamic: &()) -> Cow<'_, str> {
        MtlsIdentity::plural(dynamic)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API server sends, stored and expanded again, is the identity it sent.
    #[test]
    fn expands_to_the_identity_the_server_sent() {
        let sent = serde_json::json!({
            "apiVersion": "mtls-operator.io/v1alpha1",
            "kind": "MtlsIdentity",
            "metadata": {"name": "client", "namespace": "team", "uid": "u-1", "generation": 2,
                         "resourceVersion": "42"},
            "spec": {"source": {"secretId": "team/client"}, "refreshInterval": "1h",
                     "target": {"secretName": "client-tls", "keystores": {"pkcs12": {
                         "passwordSecretRef": {"name": "keystore-password", "key": "password"}}}}},
            "status": {
                "observedGeneration": 2,
                "secretName": "client-tls",
                "conditions": [{"type": "Ready", "status": "True", "reason": "Synced",
                                "message": "Secret client-tls holds certificate 01",
                                "lastTransitionTime": "2026-11-30T03:31:33Z",
                                "observedGeneration": 2}],
                "certificate": {"subject": "CN=client", "issuer": "CN=CA", "serialNumber": "01",
                                "notBefore": "2026-11-29T00:00:00Z",
                                "notAfter": "2027-02-28T00:00:00Z",
                                "sha256Fingerprint": "ab", "dnsNames": ["client.example"]},
                "source": {"arn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x",
                           "versionId": "v1"}
            }
        });
        let typed: MtlsIdentity = serde_json::from_value(sent.clone()).unwrap();
        let stored: StoredIdentity = serde_json::from_value(sent).unwrap();
        let expanded = stored.expand().unwrap();
        assert_eq!(expanded.metadata, typed.metadata);
        assert_eq!(expanded.spec, typed.spec);
        assert_eq!(expanded.status, typed.status);
        assert!(typed.status.is_some());
        let json = serde_json::to_vec(&(&typed.spec, &typed.status)).unwrap();
        assert!(stored.deflated.len() < json.len());
        assert_eq!(stored.target_secret_name(), "client-tls");
        assert_eq!(stored.password_secret(), Some("keystore-password"));
        assert_eq!(
            kube::runtime::reflector::ObjectRef::from_obj(&stored).to_string(),
            kube::runtime::reflector::ObjectRef::from_obj(&typed).to_string()
        );
    }

    #[test]
    fn an_identity_without_status_expands_without_one() {
        let stored: StoredIdentity = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "client", "namespace": "team"},
            "spec": {"source": {"secretId": "team/client"}, "refreshInterval": "1h"}
        }))
        .unwrap();
        assert_eq!(stored.expand().unwrap().status, None);
        assert_eq!(stored.target_secret_name(), "client");
        assert_eq!(stored.password_secret(), None);
    }
}
