//! The form in which the controller keeps every watched identity in memory.
//!
//! The controller's store holds one copy of each identity for as long as it exists. Most of an
//! identity's size is its status (condition messages, certificate facts, the last rotation), which
//! only the reconcile of that one identity reads. So the store keeps the status as its JSON, deflated
//! (about 550 bytes for a synced identity's 1.2 KB), and parses it back when the identity is
//! reconciled. The typed status, with its dozens of small allocations, took about 1.9 KB. Metadata
//! and spec stay typed: the controller reads them across identities (siblings sharing a workload,
//! password Secrets).

use std::borrow::Cow;

use kube::api::ObjectMeta;
use kube::core::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Deserializer};

use super::{MtlsIdentity, MtlsIdentitySpec, MtlsIdentityStatus, Pkcs12Spec};

/// An `MtlsIdentity` as the controller's store keeps it: the same resource, the status compacted.
#[derive(Clone, Debug, Deserialize)]
pub struct StoredIdentity {
    pub metadata: ObjectMeta,
    pub spec: MtlsIdentitySpec,
    /// The status as deflated JSON, serialized from its typed form (so it always parses back).
    #[serde(default, deserialize_with = "compact_status")]
    status: Option<Box<[u8]>>,
}

/// Fast rather than small: the difference is a few bytes on a status.
const DEFLATE_LEVEL: u8 = 1;

fn compact_status<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Box<[u8]>>, D::Error> {
    Option::<MtlsIdentityStatus>::deserialize(deserializer)?
        .map(|status| {
            serde_json::to_vec(&status)
                .map(|json| {
                    miniz_oxide::deflate::compress_to_vec(&json, DEFLATE_LEVEL).into_boxed_slice()
                })
                .map_err(serde::de::Error::custom)
        })
        .transpose()
}

impl StoredIdentity {
    /// The identity with its typed status, for one reconcile.
    pub fn expand(&self) -> MtlsIdentity {
        let status = self.status.as_deref().and_then(|deflated| {
            // Cannot fail: the bytes were deflated here from JSON of the same type.
            let parsed = miniz_oxide::inflate::decompress_to_vec(deflated)
                .map_err(|error| error.to_string())
                .and_then(|json| serde_json::from_slice(&json).map_err(|error| error.to_string()));
            parsed
                .inspect_err(|error| {
                    tracing::warn!(identity = %self.name_any(), %error, "stored status did not parse");
                })
                .ok()
        });
        MtlsIdentity {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status,
        }
    }

    /// The PKCS#12 keystore the target Secret holds, if any.
    pub fn pkcs12(&self) -> Option<&Pkcs12Spec> {
        self.spec.pkcs12()
    }

    /// The name of the Secret this identity writes.
    pub fn target_secret_name(&self) -> String {
        self.spec.target_secret_name(self.metadata.name.as_deref())
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
                     "target": {"secretName": "client-tls"}},
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
        let expanded = stored.expand();
        assert_eq!(expanded.metadata, typed.metadata);
        assert_eq!(expanded.spec, typed.spec);
        assert_eq!(expanded.status, typed.status);
        assert!(typed.status.is_some());
        let json = serde_json::to_vec(&typed.status).unwrap();
        let kept = stored.status.as_ref().map_or(0, |status| status.len());
        assert!(
            kept > 0 && kept < json.len(),
            "{kept} bytes kept for {}",
            json.len()
        );
        assert_eq!(stored.target_secret_name(), "client-tls");
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
        assert_eq!(stored.expand().status, None);
        assert_eq!(stored.target_secret_name(), "client");
    }
}
