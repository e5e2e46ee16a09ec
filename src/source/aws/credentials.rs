//! Clients and credentials: one Secrets Manager client per scope (region and role), role sessions
//! assumed once and renewed before they expire, and the operator's own account.

use crate::lock;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::Credentials;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata;

use super::{AssumedRole, Operation, Scope, SecretsManagerSource, SourceError};

/// An assumed role's credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// The session name CloudTrail shows in the role's account for the operator's reads.
const ROLE_SESSION_NAME: &str = "mtls-operator";
/// The session tag that names the namespace a per-namespace session reads for; IAM policies match
/// it as `${aws:PrincipalTag/kubernetes-namespace}` (examples/tenant-role.permissions.json).
pub const NAMESPACE_TAG: &str = "kubernetes-namespace";
/// The session tag that names the cluster (`--cluster-name`), when one is set.
pub const CLUSTER_TAG: &str = "kubernetes-cluster";
/// STS takes session names of at most this many characters.
const SESSION_NAME_MAX: usize = 64;

/// The session name for `role`: `mtls-operator`, or `mtls-<namespace>` for a namespace's session
/// (cut to STS's 64 characters; the tag, not the name, is what IAM matches).
pub(super) fn session_name(role: &AssumedRole) -> String {
    match &role.namespace {
        None => ROLE_SESSION_NAME.to_string(),
        Some(namespace) => format!("mtls-{namespace}")
            .chars()
            .take(SESSION_NAME_MAX)
            .collect(),
    }
}

/// A refused AssumeRole is answered from memory for this long: every identity on the role gets the
/// refusal without a call, so one misconfigured role costs one STS call per minute, not one per
/// reconcile.
const DENIAL_REMEMBERED_FOR: Duration = Duration::from_secs(60);

/// A role's credentials while they last, or its last refusal; behind an async lock, so one
/// AssumeRole serves every identity that needs the role at that moment.
pub(super) type RoleSlot = Arc<tokio::sync::Mutex<RoleState>>;

/// Clients and role sessions kept at most by default; beyond it the least recently used one not in
/// use is dropped (and made again if it is needed again). External ids are tenant text: without a
/// bound, each distinct one would keep a client and a session for good.
pub const DEFAULT_MAX_SESSIONS: usize = 256;

/// A scope's client, the access key it was built for (`None`: the operator's own credentials),
/// and when it was last handed out.
pub(super) type CachedClient = (Client, Option<String>, Instant);

#[derive(Debug, Default)]
pub(super) struct RoleState {
    credentials: Option<Credentials>,
    /// AWS's words for the last refusal (for the log) and when it came.
    denied: Option<(String, Instant)>,
}

impl SecretsManagerSource {
    /// The client for `scope`: the operator's own credentials, or the scope's role's (assumed
    /// first when they are missing or about to expire; a refusal is `RoleDenied` about `subject`).
    /// Callers pass only regions and roles the source policy allowed, so the cache is bounded by
    /// the operator's configuration, not by what tenants write.
    pub(super) async fn client(&self, scope: &Scope, subject: &str) -> Result<Client, SourceError> {
        let credentials = match &scope.role {
            Some(role) => Some(self.role_credentials(scope, role, subject).await?),
            None => None,
        };
        let built_for = credentials
            .as_ref()
            .map(|credentials| credentials.access_key_id().to_string());
        let mut clients = lock(&self.clients);
        if let Some((client, key, used)) = clients.get_mut(scope)
            && *key == built_for
        {
            *used = Instant::now();
            return Ok(client.clone());
        }
        // No SDK retries: every attempt goes through `call`, under the adaptive rate.
        let mut config = aws_sdk_secretsmanager::config::Builder::from(&self.base)
            .region(aws_config::Region::new(scope.region.clone()))
            .retry_config(aws_sdk_secretsmanager::config::retry::RetryConfig::disabled());
        if let Some(credentials) = credentials {
            config = config.credentials_provider(credentials);
        }
        let client = Client::from_conf(config.build());
        if !clients.contains_key(scope) {
            // A client is shared by clones: dropping the cache's copy never breaks a call.
            super::bounded::make_room(&mut clients, self.max_sessions, |(_, _, used)| Some(*used));
        }
        clients.insert(scope.clone(), (client.clone(), built_for, Instant::now()));
        Ok(client)
    }

    /// `role`'s credentials: cached until shortly before they expire, then one AssumeRole (with the
    /// operator's own credentials, under `scope`'s rate) for every identity waiting on them.
    pub(super) async fn role_credentials(
        &self,
        scope: &Scope,
        role: &AssumedRole,
        subject: &str,
    ) -> Result<Credentials, SourceError> {
        let slot = {
            let mut roles = lock(&self.roles);
            if !roles.contains_key(role) {
                // A slot someone else holds is in use (an AssumeRole or its waiters): kept.
                super::bounded::make_room(&mut roles, self.max_sessions, |(slot, used)| {
                    (Arc::strong_count(slot) == 1).then_some(*used)
                });
            }
            let (slot, used) = roles
                .entry(role.clone())
                .or_insert_with(|| (RoleSlot::default(), Instant::now()));
            *used = Instant::now();
            slot.clone()
        };
        let credentials = self.credentials_in(&slot, scope, role, subject).await;
        // A burst of roles in use at once may have grown the map past its cap: once this one is
        // released, what is no longer in use goes, least recently used first.
        drop(slot);
        super::bounded::trim(&mut lock(&self.roles), self.max_sessions, |(slot, used)| {
            (Arc::strong_count(slot) == 1).then_some(*used)
        });
        credentials
    }

    /// The credentials `slot` holds for `role` if they are fresh, else the remembered refusal, else
    /// one AssumeRole (its answer kept in the slot).
    async fn credentials_in(
        &self,
        slot: &RoleSlot,
        scope: &Scope,
        role: &AssumedRole,
        subject: &str,
    ) -> Result<Credentials, SourceError> {
        let mut current = slot.lock().await;
        let fresh = |credentials: &Credentials| {
            credentials
                .expiry()
                .is_some_and(|expiry| expiry > SystemTime::now() + RENEW_BEFORE)
        };
        if let Some(credentials) = current.credentials.as_ref().filter(|c| fresh(c)) {
            return Ok(credentials.clone());
        }
        if let Some((detail, at)) = &current.denied
            && at.elapsed() < DENIAL_REMEMBERED_FOR
        {
            // About this caller's secret, not the one whose call was refused.
            return Err(SourceError::RoleDenied {
                secret_id: subject.to_string(),
                role: role.arn.clone(),
                detail: detail.clone(),
            });
        }
        let request = self
            .sts
            .assume_role()
            .role_arn(&role.arn)
            .role_session_name(session_name(role))
            .set_external_id(role.external_id.clone())
            .set_tags(self.session_tags(role));
        let own = Scope::own(&scope.region);
        let output = self
            .call(&own, Operation::AssumeRole, subject, || {
                request.clone().send()
            })
            .await
            .map_err(|error| match error {
                SourceError::AccessDenied { secret_id, detail } => SourceError::RoleDenied {
                    secret_id,
                    role: role.arn.clone(),
                    detail,
                },
                other => other,
            });
        let output = match output {
            Ok(output) => output,
            Err(error) => {
                if let SourceError::RoleDenied { detail, .. } = &error {
                    current.denied = Some((detail.clone(), Instant::now()));
                }
                return Err(error);
            }
        };
        let assumed = output
            .credentials()
            .ok_or_else(|| SourceError::Unavailable {
                secret_id: subject.to_string(),
                detail: "AssumeRole answered without credentials".into(),
            })?;
        let expiry = SystemTime::try_from(*assumed.expiration()).ok();
        let credentials = Credentials::new(
            assumed.access_key_id(),
            assumed.secret_access_key(),
            Some(assumed.session_token().to_string()),
            expiry,
            "AssumeRole",
        );
        current.credentials = Some(credentials.clone());
        current.denied = None;
        Ok(credentials)
    }
}

impl SecretsManagerSource {
    /// The session tags of `role`'s session: the namespace and the cluster for a namespace's
    /// session; none otherwise (a role whose trust policy does not allow `sts:TagSession` keeps
    /// working without per-namespace sessions).
    fn session_tags(&self, role: &AssumedRole) -> Option<Vec<aws_sdk_sts::types::Tag>> {
        let namespace = role.namespace.as_ref()?;
        let tag = |key: &str, value: &str| {
            aws_sdk_sts::types::Tag::builder()
                .key(key)
                .value(value)
                .build()
                .ok()
        };
        Some(
            std::iter::once(tag(NAMESPACE_TAG, namespace))
                .chain(
                    self.cluster_name
                        .as_deref()
                        .map(|cluster| tag(CLUSTER_TAG, cluster)),
                )
                .flatten()
                .collect(),
        )
    }
}

/// The account of the operator's own credentials (STS GetCallerIdentity), or `None` when STS cannot
/// say; the source policy then allows ARN ids only through explicit `arn:` patterns.
pub async fn caller_account(config: &aws_config::SdkConfig) -> Option<String> {
    let sts = aws_sdk_sts::Client::new(config);
    match sts.get_caller_identity().send().await {
        Ok(identity) => identity.account,
        Err(error) => {
            tracing::warn!(
                code = error.code().unwrap_or_default(),
                "STS GetCallerIdentity failed: the operator's own account is unknown; ARN ids need \
                 an arn: pattern in --allowed-source (or set --aws-account-id)"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(namespace: Option<&str>) -> AssumedRole {
        AssumedRole {
            arn: "arn:aws:iam::123456789012:role/mtls-tenant-reader".into(),
            external_id: None,
            namespace: namespace.map(str::to_string),
        }
    }

    fn tags(source: &SecretsManagerSource, role: &AssumedRole) -> Option<Vec<(String, String)>> {
        source.session_tags(role).map(|tags| {
            tags.iter()
                .map(|tag| (tag.key().to_string(), tag.value().to_string()))
                .collect()
        })
    }

    #[test]
    fn a_namespaces_session_is_tagged_and_named_after_it_and_no_other_is() {
        let config = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let plain = SecretsManagerSource::new(config.clone());
        let named = SecretsManagerSource::new(config).with_cluster_name(Some("prod-eu".into()));
        // A cross-account role without per-namespace sessions: no tags (its trust policy need
        // not allow sts:TagSession), the operator's session name.
        assert_eq!(tags(&named, &role(None)), None);
        assert_eq!(session_name(&role(None)), "mtls-operator");
        let payments = role(Some("payments"));
        assert_eq!(
            tags(&plain, &payments),
            Some(vec![(NAMESPACE_TAG.into(), "payments".into())])
        );
        assert_eq!(
            tags(&named, &payments),
            Some(vec![
                (NAMESPACE_TAG.into(), "payments".into()),
                (CLUSTER_TAG.into(), "prod-eu".into()),
            ])
        );
        assert_eq!(session_name(&payments), "mtls-payments");
        // STS takes at most 64 characters; a 63-character namespace is cut, its tag is not.
        let long = "n".repeat(63);
        assert_eq!(session_name(&role(Some(&long))).len(), 64);
        assert_eq!(
            tags(&plain, &role(Some(&long))),
            Some(vec![(NAMESPACE_TAG.into(), long.clone())])
        );
    }
}
