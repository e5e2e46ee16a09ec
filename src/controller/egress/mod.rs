//! The operator-managed egress proxy of an identity with `spec.egress` (a Deployment, a Service and a
//! NetworkPolicy, see [`objects`]): written only if absent or already ours, removed with
//! `spec.egress`, and reported in the `Egress` condition.

pub mod objects;
pub mod reach;

use kube::api::Api;
use kube::{Resource, ResourceExt};

use crate::api::conditions::{ConditionType, Reason};

use super::context::{Context, EgressApplied, change_token, identity_key};
use super::error::ReconcileError;
use super::secret;
use super::write;
use crate::api::MtlsIdentity;

/// What the egress phase found, for the plan to fold into the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// No `spec.egress`, and nothing of it left: the status says nothing about egress.
    None,
    /// `spec.egress` was removed and what it made is gone: the `Egress` condition goes too.
    Removed,
    /// The `Egress` condition to set: its status, reason and message.
    Condition {
        status: &'static str,
        reason: Reason,
        message: String,
    },
}

/// Creates (or removes) the operator-managed egress proxy of `spec.egress`: a Deployment, a Service
/// and a NetworkPolicy, each only if absent or already ours; says how it went, for the `Egress`
/// condition. `status` is the planned status (the Secret it names, the conditions it has).
pub(super) async fn reconcile_egress(
    identity: &MtlsIdentity,
    namespace: &str,
    status: &crate::api::MtlsIdentityStatus,
    context: &Context,
) -> Result<Egress, ReconcileError> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let name = identity.name_any();
    let uid = identity.uid().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(context.client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(context.client.clone(), namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(context.client.clone(), namespace);
    let Some(spec) = &identity.spec.egress else {
        if status
            .conditions
            .iter()
            .any(|c| c.type_ == ConditionType::Egress)
        {
            // `spec.egress` was removed: remove what it made (only what is ours).
            write::delete_owned(&deployments, &name, &uid).await?;
            write::delete_owned(&services, &name, &uid).await?;
            write::delete_owned(&policies, &name, &uid).await?;
            context
                .memory
                .update(&identity_key(identity), |memory| memory.egress = None);
            return Ok(Egress::Removed);
        }
        return Ok(Egress::None);
    };
    let (condition_status, reason, message) = match (&context.settings.egress_image, &status.secret_name) {
        (None, _) => (
            "False",
            Reason::EgressDisabled,
            "this operator runs without --enable-egress (chart value egress.enabled=true, which also \
             grants the RBAC it needs): no proxy Deployment or Service is created"
                .to_string(),
        ),
        (Some(_), None) => (
            "False",
            Reason::EgressWaiting,
            "waiting for the first good certificate before starting the proxy".to_string(),
        ),
        // Reaching further than the admin allows: nothing is written (what an allowed spec made
        // before stays as it was).
        (Some(_), Some(_)) if let Some(why) = reach::refusal(spec, namespace, &context.settings.egress_reach) => (
            "False",
            Reason::EgressNotAllowed,
            format!("{why}; the proxy's objects are left as they were"),
        ),
        (Some(image), Some(secret)) => {
            let Some(owner) = identity.controller_owner_ref(&()) else {
                return Ok(Egress::None);
            };
            let refused = context.settings.egress_reach.refused_ranges();
            let built = objects::deployment(&name, namespace, spec, secret, image, &owner, &refused).and_then(
                |deployment| {
                    let service = objects::service(&name, namespace, spec, &owner)?;
                    let policy = objects::network_policy(
                        &name,
                        namespace,
                        spec,
                        &context.settings.egress_admin_from,
                        &owner,
                    )?;
                    Ok((deployment, service, policy))
                },
            );
            match built {
                Ok((deployment, service, policy)) => {
                    let key = identity_key(identity);
                    let desired = digest(&[
                        serde_json::to_value(&policy).unwrap_or_default(),
                        serde_json::to_value(&deployment).unwrap_or_default(),
                        serde_json::to_value(&service).unwrap_or_default(),
                    ]);
                    // Steady: the three objects are as this operator last wrote them (the watch's
                    // stores say so): no API call at all.
                    let seen = context
                        .egress_objects
                        .as_ref()
                        .and_then(|stores| stores.tokens(namespace, &name, &uid));
                    let steady = seen.is_some_and(|seen| {
                        context.memory.read(&key, |memory| {
                            memory.egress.as_ref().is_some_and(|applied| {
                                applied.desired == desired && applied.tokens == seen
                            })
                        })
                    });
                    let mut conflicts = Vec::new();
                    if !steady {
                        // Nothing is written while any of the three names is taken by a foreign
                        // object; then the NetworkPolicy first, so the proxy never serves without
                        // it.
                        for (foreign, kind) in [
                            (is_foreign(&policies, &name, &uid).await?, "NetworkPolicy"),
                            (is_foreign(&deployments, &name, &uid).await?, "Deployment"),
                            (is_foreign(&services, &name, &uid).await?, "Service"),
                        ] {
                            if foreign {
                                conflicts.push(kind);
                            }
                        }
                        let mut tokens = Vec::new();
                        if conflicts.is_empty() {
                            let written = [
                                guarded(&policies, &name, policy, &uid, "NetworkPolicy").await?,
                                guarded(&deployments, &name, deployment, &uid, "Deployment").await?,
                                guarded(&services, &name, service, &uid, "Service").await?,
                            ];
                            for result in written {
                                match result {
                                    Ok(token) => tokens.push(token),
                                    Err(kind) => conflicts.push(kind),
                                }
                            }
                        }
                        let applied = <[String; 3]>::try_from(tokens)
                            .ok()
                            .filter(|_| conflicts.is_empty())
                            .map(|tokens| Box::new(EgressApplied { desired, tokens }));
                        context.memory.update(&key, |memory| memory.egress = applied);
                    }
                    if conflicts.is_empty() {
                        (
                            "True",
                            Reason::EgressReady,
                            format!(
                                "Deployment and Service {name} forward http://{name}.{namespace}:{} to \
                                 {} with this identity's certificate; NetworkPolicy {name} admits {} \
                                 (enforced only by a CNI that implements NetworkPolicy)",
                                spec.port,
                                spec.upstream,
                                if spec.allow_from.is_some() {
                                    "the peers in spec.egress.allowFrom"
                                } else {
                                    "only pods in this namespace"
                                }
                            ),
                        )
                    } else {
                        (
                            "False",
                            Reason::EgressConflict,
                            format!(
                                "{} {name} already exist(s) and not owned by this MtlsIdentity: left \
                                 untouched, no proxy started. Delete them or rename the identity",
                                conflicts.join(", ")
                            ),
                        )
                    }
                }
                Err(error) => ("False", Reason::EgressInvalid, format!("cannot build the proxy: {error}")),
            }
        }
    };
    Ok(Egress::Condition {
        status: condition_status,
        reason,
        message,
    })
}

/// A digest of the desired objects: equal digests, equal objects (within this process).
fn digest(objects: &[serde_json::Value]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for object in objects {
        object.to_string().hash(&mut hasher);
    }
    hasher.finish()
}

/// Whether `name` exists and is not owned by `owner_uid` (metadata only).
async fn is_foreign<K>(api: &Api<K>, name: &str, owner_uid: &str) -> Result<bool, ReconcileError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(write::metadata(api, name)
        .await?
        .is_some_and(|seen| !secret::is_owned_by(&seen.metadata, owner_uid)))
}

/// Writes one egress object if absent or ours: its change token as written, or `Err(kind)` when a
/// foreign one is in the way.
async fn guarded<K>(
    api: &Api<K>,
    name: &str,
    desired: K,
    owner_uid: &str,
    kind: &'static str,
) -> Result<Result<String, &'static str>, ReconcileError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    // Controllers update a Deployment's status often: a precondition that lost a race is retried
    // with fresh metadata a few times before the reconcile is.
    let mut attempt = 0;
    loop {
        let seen = write::metadata(api, name).await?;
        let result = write::write_owned(
            api,
            name,
            desired.clone(),
            owner_uid,
            seen.as_ref().map(|seen| &seen.metadata),
        )
        .await;
        match result {
            Ok(written) => {
                return Ok(written
                    .map(|meta| change_token(&meta))
                    .map_err(|write::Conflict| kind));
            }
            Err(kube::Error::Api(status)) if status.code == 409 && attempt < 3 => attempt += 1,
            Err(error) => return Err(error.into()),
        }
    }
}
