//! Pure restart decisions: which workloads use a Secret, the content token on a pod template, and
//! whether a workload needs a restart for the current certificate. No I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use sha2::{Digest, Sha256};

/// Annotation prefix of restart tokens on pod templates (and, for `Annotate`, on Pods).
pub const TOKEN_PREFIX: &str = "mtls-operator.io/";
/// Opt-out: a workload annotated `mtls-operator.io/restart: "false"` is never restarted.
pub const OPT_OUT_ANNOTATION: &str = "mtls-operator.io/restart";

/// Whether a pod spec uses Secret `name`: a secret volume, a projected volume source,
/// `env[].valueFrom.secretKeyRef` or `envFrom[].secretRef`, in any container or init container.
pub fn pod_uses_secret(spec: &PodSpec, name: &str) -> bool {
    let in_volumes = spec.volumes.iter().flatten().any(|volume| {
        volume
            .secret
            .as_ref()
            .is_some_and(|secret| secret.secret_name.as_deref() == Some(name))
            || volume.projected.as_ref().is_some_and(|projected| {
                projected.sources.iter().flatten().any(|source| {
                    source
                        .secret
                        .as_ref()
                        .is_some_and(|secret| secret.name.as_str() == name)
                })
            })
    });
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let in_env = containers.clone().any(|container| {
        container.env.iter().flatten().any(|env| {
            env.value_from
                .as_ref()
                .and_then(|from| from.secret_key_ref.as_ref())
                .is_some_and(|key| key.name.as_str() == name)
        }) || container.env_from.iter().flatten().any(|from| {
            from.secret_ref
                .as_ref()
                .is_some_and(|secret| secret.name.as_str() == name)
        })
    });
    in_volumes || in_env
}

/// The annotation key that carries one identity's token: readable, and within the 63-character
/// limit of an annotation name (long identity names are shortened and made unique by a hash).
pub fn token_key(identity_name: &str) -> String {
    const MAX_NAME: usize = 63;
    let name = format!("cert.{identity_name}");
    if name.len() <= MAX_NAME {
        return format!("{TOKEN_PREFIX}{name}");
    }
    let hash = hex::encode(&Sha256::digest(identity_name.as_bytes())[..4]);
    let keep = MAX_NAME - hash.len() - 1;
    let mut short: String = name.chars().take(keep).collect();
    while short.ends_with(['-', '.']) {
        short.pop();
    }
    format!("{TOKEN_PREFIX}{short}-{hash}")
}

/// What to do with one workload for the identity's current certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartDecision {
    /// The template already carries this token: restarted for it before (or a replay).
    UpToDate,
    /// The workload opted out with `mtls-operator.io/restart: "false"`.
    OptedOut,
    /// No token and no rotation since the workload was made: it started with the current Secret.
    NotNeeded,
    /// Patch the token: one rolling restart.
    Restart,
}

/// Decides for one workload. `rotated_since_created`: the identity rotated after the workload was
/// created (a workload made after the rotation mounted the new Secret from the start).
pub fn decide(
    workload_annotations: Option<&BTreeMap<String, String>>,
    template_annotations: Option<&BTreeMap<String, String>>,
    key: &str,
    token: &str,
    rotated_since_created: bool,
) -> RestartDecision {
    if workload_annotations
        .and_then(|annotations| annotations.get(OPT_OUT_ANNOTATION))
        .is_some_and(|value| value == "false")
    {
        return RestartDecision::OptedOut;
    }
    match template_annotations.and_then(|annotations| annotations.get(key)) {
        Some(current) if current == token => RestartDecision::UpToDate,
        Some(_) => RestartDecision::Restart,
        None if rotated_since_created => RestartDecision::Restart,
        None => RestartDecision::NotNeeded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, EnvFromSource, EnvVar, EnvVarSource, ProjectedVolumeSource, SecretEnvSource,
        SecretKeySelector, SecretProjection, SecretVolumeSource, Volume, VolumeProjection,
    };

    fn container() -> Container {
        Container {
            name: "app".into(),
            ..Default::default()
        }
    }

    #[test]
    fn finds_every_way_a_pod_uses_a_secret() {
        let volume = PodSpec {
            volumes: Some(vec![Volume {
                name: "tls".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some("tls".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            containers: vec![container()],
            ..Default::default()
        };
        let projected = PodSpec {
            volumes: Some(vec![Volume {
                name: "all".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        secret: Some(SecretProjection {
                            name: "tls".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            containers: vec![container()],
            ..Default::default()
        };
        let env = PodSpec {
            init_containers: Some(vec![Container {
                env: Some(vec![EnvVar {
                    name: "KEY".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "tls".into(),
                            key: "tls.key".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..container()
            }]),
            containers: vec![container()],
            ..Default::default()
        };
        let env_from = PodSpec {
            containers: vec![Container {
                env_from: Some(vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: "tls".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..container()
            }],
            ..Default::default()
        };
        for spec in [&volume, &projected, &env, &env_from] {
            assert!(pod_uses_secret(spec, "tls"));
            assert!(!pod_uses_secret(spec, "other"));
        }
        assert!(!pod_uses_secret(&PodSpec::default(), "tls"));
    }

    #[test]
    fn token_keys_are_valid_annotation_names() {
        assert_eq!(token_key("payments"), "mtls-operator.io/cert.payments");
        let long = "a".repeat(200);
        let key = token_key(&long);
        let name = key.trim_start_matches(TOKEN_PREFIX);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(token_key(&long), token_key(&"a".repeat(201)));
    }

    #[test]
    fn restarts_exactly_once_per_token() {
        let key = token_key("id");
        let with = |value: &str| BTreeMap::from([(key.clone(), value.to_string())]);
        assert_eq!(
            decide(None, Some(&with("t1")), &key, "t1", true),
            RestartDecision::UpToDate
        );
        assert_eq!(
            decide(None, Some(&with("t0")), &key, "t1", false),
            RestartDecision::Restart
        );
        assert_eq!(
            decide(None, None, &key, "t1", true),
            RestartDecision::Restart
        );
        assert_eq!(
            decide(None, None, &key, "t1", false),
            RestartDecision::NotNeeded
        );
        let opted_out = BTreeMap::from([(OPT_OUT_ANNOTATION.to_string(), "false".to_string())]);
        assert_eq!(
            decide(Some(&opted_out), Some(&with("t0")), &key, "t1", true),
            RestartDecision::OptedOut
        );
    }
}
