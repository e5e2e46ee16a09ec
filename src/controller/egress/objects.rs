//! The operator-managed egress proxy of an identity with `spec.egress`: a Deployment and a Service,
//! both named after the identity and owned by it (garbage-collected with it), that mount the target
//! Secret and run `mtls-operator proxy` from the operator's own image. Built here, without I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::api::{EgressSpec, IDENTITY_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Where the proxy container mounts the Secret.
const CERT_DIR: &str = "/etc/mtls";
const PROXY_PORT: i32 = 8080;
const ADMIN_PORT: i32 = 9090;

fn labels(identity: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (IDENTITY_LABEL.to_string(), identity.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "mtls-egress".to_string(),
        ),
    ])
}

fn selector(identity: &str) -> serde_json::Value {
    serde_json::json!({
        IDENTITY_LABEL: identity,
        "app.kubernetes.io/name": "mtls-egress",
    })
}

/// The proxy Deployment: PodSecurity `restricted`, the Secret read-only, probes on the admin port.
pub fn deployment(
    identity: &str,
    namespace: &str,
    egress: &EgressSpec,
    secret: &str,
    image: &str,
    owner: &OwnerReference,
    refused: &[ipnet::IpNet],
) -> Result<Deployment, serde_json::Error> {
    let mut args = vec![
        "proxy".to_string(),
        format!("--listen=0.0.0.0:{PROXY_PORT}"),
        format!("--admin-address=0.0.0.0:{ADMIN_PORT}"),
        format!("--upstream={}", egress.upstream),
        format!("--cert-dir={CERT_DIR}"),
    ];
    if egress.verify_upstream_with_secret_ca {
        args.push(format!("--upstream-ca={CERT_DIR}/ca.crt"));
    }
    // What the upstream's name resolves to at connect time is held to the same ranges as a
    // literal address in the spec (`reach`).
    args.extend(
        refused
            .iter()
            .map(|range| format!("--refuse-address={range}")),
    );
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": identity,
            "namespace": namespace,
            "labels": labels(identity),
            "ownerReferences": [owner],
        },
        "spec": {
            "replicas": egress.replicas,
            "selector": {"matchLabels": selector(identity)},
            "template": {
                "metadata": {"labels": labels(identity)},
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": "proxy",
                        "image": image,
                        "args": args,
                        "ports": [
                            {"name": "http", "containerPort": PROXY_PORT},
                            {"name": "admin", "containerPort": ADMIN_PORT}
                        ],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "admin"}},
                        "resources": {
                            "requests": {"cpu": "20m", "memory": "32Mi"},
                            "limits": {"memory": "128Mi"}
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        },
                        "volumeMounts": [{"name": "client-tls", "mountPath": CERT_DIR, "readOnly": true}]
                    }],
                    "volumes": [{"name": "client-tls", "secret": {"secretName": secret}}]
                }
            }
        }
    }))
}

/// The Service applications call with plain HTTP: `http://<identity>.<namespace>:<port>`.
pub fn service(
    identity: &str,
    namespace: &str,
    egress: &EgressSpec,
    owner: &OwnerReference,
) -> Result<Service, serde_json::Error> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": identity,
            "namespace": namespace,
            "labels": labels(identity),
            "ownerReferences": [owner],
        },
        "spec": {
            "selector": selector(identity),
            "ports": [{"name": "http", "port": egress.port, "targetPort": "http"}]
        }
    }))
}

/// Who may use the proxy (and so the identity's certificate): by default only pods in the identity's
/// namespace (a `podSelector: {}` peer without a namespace selector), or `spec.egress.allowFrom`; the
/// admin port only from `admin_from` (where the chart says metrics are scraped), else from nowhere.
pub fn network_policy(
    identity: &str,
    namespace: &str,
    egress: &EgressSpec,
    admin_from: &[NetworkPolicyPeer],
    owner: &OwnerReference,
) -> Result<NetworkPolicy, serde_json::Error> {
    let same_namespace = vec![serde_json::json!({"podSelector": {}})];
    let clients = match &egress.allow_from {
        Some(peers) => serde_json::to_value(peers)?,
        None => serde_json::Value::Array(same_namespace),
    };
    let mut ingress = vec![serde_json::json!({
        "from": clients,
        "ports": [{"protocol": "TCP", "port": PROXY_PORT}]
    })];
    if !admin_from.is_empty() {
        ingress.push(serde_json::json!({
            "from": admin_from,
            "ports": [{"protocol": "TCP", "port": ADMIN_PORT}]
        }));
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": identity,
            "namespace": namespace,
            "labels": labels(identity),
            "ownerReferences": [owner],
        },
        "spec": {
            "podSelector": {"matchLabels": selector(identity)},
            "policyTypes": ["Ingress"],
            "ingress": ingress
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(verify: bool) -> EgressSpec {
        EgressSpec {
            upstream: "https://api.partner.example".into(),
            port: 80,
            replicas: 2,
            verify_upstream_with_secret_ca: verify,
            allow_from: None,
        }
    }

    #[test]
    fn network_policy_admits_the_namespace_or_the_listed_peers_only()
    -> Result<(), serde_json::Error> {
        let built = network_policy("client", "ns", &egress(false), &[], &owner())?;
        let spec = built.spec.unwrap_or_default();
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        let rules = spec.ingress.unwrap_or_default();
        assert_eq!(rules.len(), 1, "no admin rule without admin peers");
        let peers = rules[0].from.clone().unwrap_or_default();
        assert_eq!(peers.len(), 1);
        assert!(peers[0].namespace_selector.is_none(), "same namespace only");
        assert!(peers[0].pod_selector.is_some());
        let mut listed = egress(false);
        let peer: NetworkPolicyPeer = serde_json::from_value(
            serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "payments"}}}),
        )?;
        listed.allow_from = Some(vec![peer.clone()]);
        let built = network_policy(
            "client",
            "ns",
            &listed,
            std::slice::from_ref(&peer),
            &owner(),
        )?;
        let rules = built.spec.unwrap_or_default().ingress.unwrap_or_default();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].from, Some(vec![peer.clone()]));
        assert_eq!(rules[1].from, Some(vec![peer]));
        Ok(())
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "mtls-operator.io/v1alpha1".into(),
            kind: "MtlsIdentity".into(),
            name: "client".into(),
            uid: "u1".into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    /// The proxy container's arguments.
    fn args_of(deployment: Deployment) -> Vec<String> {
        deployment
            .spec
            .and_then(|s| s.template.spec)
            .map(|s| s.containers[0].args.clone().unwrap_or_default())
            .unwrap_or_default()
    }

    #[test]
    fn deployment_is_restricted_owned_and_mounts_the_secret() -> Result<(), serde_json::Error> {
        let built = deployment(
            "client",
            "ns",
            &egress(true),
            "client-tls",
            "img:1",
            &owner(),
            &[],
        )?;
        assert_eq!(built.metadata.owner_references, Some(vec![owner()]));
        let pod = built.spec.and_then(|s| s.template.spec).unwrap_or_default();
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap_or_default();
        assert!(args.contains(&"--upstream=https://api.partner.example".to_string()));
        assert!(args.contains(&"--upstream-ca=/etc/mtls/ca.crt".to_string()));
        assert!(!args.iter().any(|a| a.starts_with("--refuse-address")));
        let security = container.security_context.clone().unwrap_or_default();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            pod.security_context.and_then(|s| s.run_as_non_root),
            Some(true)
        );
        let volume = pod.volumes.unwrap_or_default().remove(0);
        assert_eq!(
            volume.secret.and_then(|s| s.secret_name).as_deref(),
            Some("client-tls")
        );
        let plain = deployment(
            "client",
            "ns",
            &egress(false),
            "client-tls",
            "img:1",
            &owner(),
            &[],
        )?;
        let args = args_of(plain);
        assert!(!args.iter().any(|a| a.starts_with("--upstream-ca")));
        let refusing = deployment(
            "client",
            "ns",
            &egress(false),
            "client-tls",
            "img:1",
            &owner(),
            &super::super::reach::EgressReach::default().refused_ranges(),
        )?;
        let args = args_of(refusing);
        for range in ["127.0.0.0/8", "169.254.0.0/16", "fd00:ec2::254/128"] {
            assert!(
                args.contains(&format!("--refuse-address={range}")),
                "{args:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn service_selects_the_proxy_pods() -> Result<(), serde_json::Error> {
        let built = service("client", "ns", &egress(false), &owner())?;
        let spec = built.spec.unwrap_or_default();
        assert_eq!(spec.ports.unwrap_or_default()[0].port, 80);
        let selector = spec.selector.unwrap_or_default();
        assert_eq!(
            selector.get(IDENTITY_LABEL).map(String::as_str),
            Some("client")
        );
        Ok(())
    }
}
