//! The integrity key's Secret in the operator's own namespace: read at start, created with a new
//! random key by the first replica that finds none. Tenants have no access to that namespace, so
//! they cannot read the key, and cannot make an edited Secret of theirs look as the operator wrote
//! it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::api::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::pki::integrity::{IntegrityKey, ShortKey};

/// The Secret's default name, and the key in its data.
pub const DEFAULT_SECRET_NAME: &str = "mtls-operator-integrity";
const DATA_KEY: &str = "key";

#[derive(Debug, thiserror::Error)]
pub enum IntegrityKeyError {
    #[error("reading or creating the integrity key Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("the integrity key Secret {namespace}/{name} has no usable data.{DATA_KEY}: {source}")]
    Unusable {
        namespace: String,
        name: String,
        source: ShortKey,
    },
}

/// The key in Secret `namespace/name`, created (immutable, 32 random bytes) if there is none. Two
/// replicas starting together agree: the one whose create loses reads the winner's.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<IntegrityKey, IntegrityKeyError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let api_error = |source| IntegrityKeyError::Api {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    };
    let stored = match secrets.get_opt(name).await.map_err(api_error)? {
        Some(secret) => secret,
        None => {
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    labels: Some(BTreeMap::from([(
                        MANAGED_BY_LABEL.to_string(),
                        MANAGED_BY_VALUE.to_string(),
                    )])),
                    ..Default::default()
                },
                immutable: Some(true),
                data: Some(BTreeMap::from([(
                    DATA_KEY.to_string(),
                    ByteString(IntegrityKey::generate().to_vec()),
                )])),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &new).await {
                Ok(created) => {
                    tracing::info!(namespace, name, "created the integrity key Secret");
                    created
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    secrets.get(name).await.map_err(api_error)?
                }
                Err(error) => return Err(api_error(error)),
            }
        }
    };
    let bytes = stored
        .data
        .as_ref()
        .and_then(|data| data.get(DATA_KEY))
        .map(|value| value.0.as_slice())
        .unwrap_or_default();
    IntegrityKey::from_bytes(bytes).map_err(|source| IntegrityKeyError::Unusable {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    })
}
