//! Writes that never take over an object the operator does not own (a Secret, Deployment, Service or
//! NetworkPolicy with the same name). An absent object is created, so a foreign object created in the
//! meantime makes the create fail instead of being overwritten; an object we own is applied with its
//! `resourceVersion` as a precondition, so a replacement in the meantime makes the apply fail.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::FIELD_MANAGER;

use super::context::Context;
use super::decide::{SyncFailure, Synced};
use super::error::ReconcileError;
use super::secret::is_owned_by;
use crate::api::MtlsIdentity;
use tracing::info;

/// The metadata of `name`, if it exists: enough to decide ownership without reading a foreign
/// object's content (a foreign Secret's data never enters the operator's memory).
pub async fn metadata<K>(
    api: &Api<K>,
    name: &str,
) -> Result<Option<PartialObjectMeta<K>>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    api.get_metadata_opt(name).await
}

/// Writes `desired` (named `name`) if the object is absent or owned by `owner_uid`. `seen` is the
/// metadata read before (None: absent then). Done: with the written object's metadata, as the API
/// server answered.
pub async fn write_owned<K>(
    api: &Api<K>,
    name: &str,
    mut desired: K,
    owner_uid: &str,
    seen: Option<&ObjectMeta>,
) -> Result<Result<ObjectMeta, Conflict>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    match seen {
        None => create_returning(api, &desired).await,
        Some(seen) if !is_owned_by(seen, owner_uid) => Ok(Err(Conflict)),
        Some(seen) => {
            // A precondition: if the object was replaced since we looked, the apply fails (409)
            // and the reconcile looks again.
            desired.meta_mut().resource_version = seen.resource_version.clone();
            let written = api
                .patch(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&desired),
                )
                .await?;
            Ok(Ok(written.meta().clone()))
        }
    }
}

/// A same-named object that the identity does not own: left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

/// Creates `desired` under the operator's field manager: the created object's metadata, as the API
/// server answered, or `Conflict` when the name is taken.
pub async fn create_returning<K>(
    api: &Api<K>,
    desired: &K,
) -> Result<Result<ObjectMeta, Conflict>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match api.create(&params, desired).await {
        Ok(created) => Ok(Ok(created.meta().clone())),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Err(Conflict)),
        Err(error) => Err(error),
    }
}

/// Replaces our own Secret's content with `desired`'s, keeping what others added to its labels and
/// annotations. A full replace (not an apply) so that a key `desired` no longer has (`ca.crt`) goes,
/// under the same field manager the Secret was created with; `existing`'s `resourceVersion` is the
/// precondition.
pub async fn replace_owned_secret(
    api: &Api<Secret>,
    existing: &Secret,
    desired: Secret,
) -> Result<ObjectMeta, kube::Error> {
    let mut next = existing.clone();
    next.metadata.managed_fields = None;
    next.type_ = desired.type_;
    next.data = desired.data;
    next.string_data = None;
    for (mine, theirs) in [
        (desired.metadata.labels, &mut next.metadata.labels),
        (desired.metadata.annotations, &mut next.metadata.annotations),
    ] {
        theirs
            .get_or_insert_with(Default::default)
            .extend(mine.unwrap_or_default());
    }
    next.metadata.owner_references = desired.metadata.owner_references;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    let replaced = api.replace(&existing.name_any(), &params, &next).await?;
    Ok(replaced.metadata)
}

/// Deletes `name` only if `owner_uid` owns it, with a uid precondition so a same-named replacement
/// is never deleted.
pub async fn delete_owned<K>(api: &Api<K>, name: &str, owner_uid: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(seen) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    if !is_owned_by(&seen.metadata, owner_uid) {
        return Ok(());
    }
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: seen.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error),
    }
}

/// After `spec.target.secretName` changed and the new Secret was written: the old Secret, if ours,
/// goes (nothing else mounts what it no longer owns; workloads that mounted it by name are the
/// user's to move).
pub(super) async fn remove_renamed_target(
    identity: &MtlsIdentity,
    namespace: &str,
    target: &str,
    previous: Option<&crate::api::MtlsIdentityStatus>,
    outcome: &Result<Synced, SyncFailure>,
    context: &Context,
) -> Result<(), ReconcileError> {
    let Some(old) = previous.and_then(|status| status.secret_name.as_deref()) else {
        return Ok(());
    };
    if outcome.is_err() || old == target {
        return Ok(());
    }
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), namespace);
    delete_owned(&secrets, old, &identity.uid().unwrap_or_default()).await?;
    info!(
        namespace,
        old,
        new = target,
        "removed the previous target Secret"
    );
    Ok(())
}
