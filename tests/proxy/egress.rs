//! Operator-managed egress proxies (`spec.egress`) on the real control plane (a module of the proxy
//! test binary, one link step fewer): created only when the
//! operator is allowed to (and then with exactly the chart's extra RBAC), accepted under PodSecurity
//! `restricted`, owned by the identity and removed with it.

use crate::common::*;
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mtls_operator::api::MtlsIdentity;
use mtls_operator::controller::Settings;
use xtask::support::{self, wait_for};

/// The chart's extra egress rules as a ClusterRole, bound to the operator's ServiceAccount.
async fn grant_egress_rules(namespace: &str) -> Result<()> {
    apply_cluster_role(
        "mtls-operator-egress",
        "charts/mtls-operator/files/egress-rules.yaml",
    )
    .await?;
    let admin = support::admin_client().await?;
    let apply = PatchParams::apply("mtls-operator-tests").force();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "mtls-operator-egress", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "mtls-operator-egress"},
        "subjects": [{"kind": "ServiceAccount", "name": "mtls-operator", "namespace": namespace}]
    }))?;
    Api::<RoleBinding>::namespaced(admin, namespace)
        .patch("mtls-operator-egress", &apply, &Patch::Apply(&binding))
        .await?;
    Ok(())
}

async fn egress_condition(
    namespace: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> Result<String> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    wait_for(&format!("Egress={status} {reason}"), TIMEOUT, || async {
        let identity = identities.get(name).await?;
        let condition = identity
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Egress"))
            .context("no Egress condition")?;
        ensure!(
            condition.status == status && condition.reason == reason,
            "{condition:?}"
        );
        Ok(condition.message)
    })
    .await
}

/// Where metrics are scraped from, as the chart would configure it.
fn scrapers() -> Result<Vec<NetworkPolicyPeer>> {
    Ok(serde_json::from_value(serde_json::json!([
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]))?)
}

fn egress_identity(namespace: &str) -> Result<MtlsIdentity> {
    identity(
        "partner",
        &format!("{namespace}/partner"),
        serde_json::json!({"egress": {"upstream": "https://api.partner.example", "port": 80}}),
    )
}

#[tokio::test]
async fn egress_proxy_is_created_under_restricted_and_removed_with_its_identity() -> Result<()> {
    let namespace = support::create_namespace(
        "egress",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    grant_egress_rules(&namespace).await?;
    let settings = Settings {
        egress_image: Some("example.invalid/mtls-operator:test".into()),
        egress_admin_from: scrapers()?,
        ..Settings::default()
    };
    let _operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("egress CA")?;
    put_source(&format!("{namespace}/partner"), &good_secret(&ca)?).await?;
    create_identity(&namespace, &egress_identity(&namespace)?).await?;
    wait_ready(&namespace, "partner", "True", "Synced").await?;
    let message = egress_condition(&namespace, "partner", "True", "EgressReady").await?;
    assert!(message.contains("https://api.partner.example"), "{message}");
    assert!(
        message.contains("CNI"),
        "says NetworkPolicy needs a CNI: {message}"
    );

    let admin = support::admin_client().await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(admin.clone(), &namespace);
    let identity = Api::<MtlsIdentity>::namespaced(admin.clone(), &namespace)
        .get("partner")
        .await?;
    let deployment = deployments.get("partner").await?;
    let owner = deployment
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    assert_eq!(
        owner.first().map(|o| &o.uid),
        identity.metadata.uid.as_ref()
    );
    let service = services.get("partner").await?;
    assert_eq!(
        service.spec.and_then(|s| s.ports).map(|p| p[0].port),
        Some(80)
    );
    // Only pods of this namespace may use the proxy (and so the certificate); the admin port is
    // reachable only from the configured scrapers.
    let policy = Api::<NetworkPolicy>::namespaced(admin.clone(), &namespace)
        .get("partner")
        .await?;
    assert_eq!(
        policy
            .metadata
            .owner_references
            .unwrap_or_default()
            .first()
            .map(|o| o.uid.clone()),
        identity.metadata.uid.clone()
    );
    let spec = policy.spec.context("NetworkPolicy spec")?;
    let selected = spec
        .pod_selector
        .and_then(|s| s.match_labels)
        .unwrap_or_default();
    let pod_labels = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(
        !selected.is_empty() && selected.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the policy selects the proxy pods"
    );
    let rules = spec.ingress.unwrap_or_default();
    let proxy_rule = &rules[0];
    let peers = proxy_rule.from.clone().unwrap_or_default();
    assert_eq!(peers.len(), 1);
    assert!(peers[0].namespace_selector.is_none() && peers[0].ip_block.is_none());
    let admin_peers: Vec<_> = rules
        .iter()
        .skip(1)
        .flat_map(|r| r.from.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        admin_peers,
        scrapers()?,
        "the admin port only from the scrapers"
    );
    // Admitted under `restricted` and running (kwok): the proxy pods exist and run.
    wait_for("the proxy pods to run", ROLLOUT_TIMEOUT, || async {
        let pods = Api::<Pod>::namespaced(admin.clone(), &namespace)
            .list(&ListParams::default().labels("app.kubernetes.io/name=mtls-egress"))
            .await?;
        let running = pods
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        ensure!(running == 2, "{running} running");
        Ok(())
    })
    .await?;

    Api::<MtlsIdentity>::namespaced(admin.clone(), &namespace)
        .delete("partner", &DeleteParams::foreground())
        .await?;
    wait_for("the proxy to be garbage-collected", TIMEOUT, || async {
        ensure!(
            deployments.get_opt("partner").await?.is_none()
                && services.get_opt("partner").await?.is_none(),
            "still there"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn without_egress_enabled_the_operator_creates_nothing_and_says_why() -> Result<()> {
    let namespace = support::create_namespace("noegress", &[]).await?;
    let _operator = start_operator(&namespace).await?;
    let ca = TestCa::new("no egress CA")?;
    put_source(&format!("{namespace}/partner"), &good_secret(&ca)?).await?;
    create_identity(&namespace, &egress_identity(&namespace)?).await?;
    let message = egress_condition(&namespace, "partner", "False", "EgressDisabled").await?;
    assert!(message.contains("egress.enabled"), "{message}");
    wait_ready(&namespace, "partner", "True", "Synced").await?;
    // Nothing at all of the three kinds egress makes exists in the namespace, under any name.
    let admin = support::admin_client().await?;
    let listed = ListParams::default();
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &namespace)
        .list_metadata(&listed)
        .await?;
    let services = Api::<Service>::namespaced(admin.clone(), &namespace)
        .list_metadata(&listed)
        .await?;
    let policies = Api::<NetworkPolicy>::namespaced(admin, &namespace)
        .list_metadata(&listed)
        .await?;
    assert!(deployments.items.is_empty(), "a Deployment was created");
    assert!(services.items.is_empty(), "a Service was created");
    assert!(policies.items.is_empty(), "a NetworkPolicy was created");
    Ok(())
}

/// The attack: someone else's object already has the egress identity's name, and the attacker
/// names an identity after it, hoping the operator adopts it (and deletes it with the identity).
/// The operator leaves it untouched, writes none of the three objects, says which is in the way,
/// and deleting the identity leaves the foreign object alone.
async fn egress_refuses_a_foreign<K>(kind: &str, foreign: serde_json::Value) -> Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let namespace =
        support::create_namespace(&format!("egress-{}", kind.to_lowercase()), &[]).await?;
    grant_egress_rules(&namespace).await?;
    let admin = support::admin_client().await?;
    let foreign: K = serde_json::from_value(foreign)?;
    let objects: Api<K> = Api::namespaced(admin.clone(), &namespace);
    let created = objects.create(&Default::default(), &foreign).await?;
    let settings = Settings {
        egress_image: Some("example.invalid/mtls-operator:test".into()),
        ..Settings::default()
    };
    let _operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("takeover CA")?;
    put_source(&format!("{namespace}/partner"), &good_secret(&ca)?).await?;
    create_identity(&namespace, &egress_identity(&namespace)?).await?;
    let message = egress_condition(&namespace, "partner", "False", "EgressConflict").await?;
    assert!(message.contains(kind), "{message}");
    // Unchanged by the operator (the controller-manager writes a Deployment's status and revision
    // annotation, so not its resourceVersion): the same spec generation and labels, no owner, and
    // no field the operator's field manager ever set.
    let after = objects.get("partner").await?;
    let (was, is) = (created.meta(), after.meta());
    assert_eq!(
        (&was.generation, &was.labels),
        (&is.generation, &is.labels),
        "the foreign {kind} was modified"
    );
    assert!(is.owner_references.is_none());
    let managers: Vec<_> = is
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|entry| entry.manager.clone())
        .collect();
    assert!(
        !managers
            .iter()
            .any(|m| m == mtls_operator::api::FIELD_MANAGER),
        "the operator wrote fields of the foreign {kind}: {managers:?}"
    );
    // None of the three is written while one name is taken (so no proxy serves without its
    // NetworkPolicy, and nothing of ours stands beside a foreign object).
    let listed = ListParams::default();
    let ours = Api::<Deployment>::namespaced(admin.clone(), &namespace)
        .list_metadata(&listed)
        .await?
        .items
        .len()
        + Api::<Service>::namespaced(admin.clone(), &namespace)
            .list_metadata(&listed)
            .await?
            .items
            .len()
        + Api::<NetworkPolicy>::namespaced(admin.clone(), &namespace)
            .list_metadata(&listed)
            .await?
            .items
            .len();
    assert_eq!(ours, 1, "only the foreign {kind} exists");
    Api::<MtlsIdentity>::namespaced(admin.clone(), &namespace)
        .delete("partner", &DeleteParams::foreground())
        .await?;
    wait_for("the identity to go", TIMEOUT, || async {
        let gone = Api::<MtlsIdentity>::namespaced(admin.clone(), &namespace)
            .get_opt("partner")
            .await?
            .is_none();
        ensure!(gone, "still there");
        Ok(())
    })
    .await?;
    let still = objects.get("partner").await?;
    assert_eq!(
        still.meta().uid,
        created.meta().uid,
        "the foreign {kind} was deleted"
    );
    Ok(())
}

#[tokio::test]
async fn egress_never_takes_over_a_foreign_service() -> Result<()> {
    egress_refuses_a_foreign::<Service>(
        "Service",
        serde_json::json!({
            "metadata": {"name": "partner", "labels": {"owner": "someone-else"}},
            "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 443}]}
        }),
    )
    .await
}

#[tokio::test]
async fn egress_never_takes_over_a_foreign_deployment() -> Result<()> {
    egress_refuses_a_foreign::<Deployment>(
        "Deployment",
        serde_json::json!({
            "metadata": {"name": "partner", "labels": {"owner": "someone-else"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "theirs"}},
                "template": pod_template("theirs", None)
            }
        }),
    )
    .await
}

#[tokio::test]
async fn egress_never_takes_over_a_foreign_network_policy() -> Result<()> {
    egress_refuses_a_foreign::<NetworkPolicy>(
        "NetworkPolicy",
        serde_json::json!({
            "metadata": {"name": "partner", "labels": {"owner": "someone-else"}},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}
        }),
    )
    .await
}

/// #25: a tenant cannot widen its proxy's reach. Opening it to every namespace or to an address
/// range, or pointing it at the cloud metadata endpoint or at the API server's in-cluster name, is
/// refused (`EgressNotAllowed`, the field named) and nothing is written; an allowed proxy edited
/// into one of these keeps the NetworkPolicy and Deployment it had.
#[tokio::test]
async fn a_tenant_cannot_open_its_proxy_to_other_namespaces_or_aim_it_inside_the_cluster()
-> Result<()> {
    let namespace = support::create_namespace("egress-reach", &[]).await?;
    grant_egress_rules(&namespace).await?;
    let settings = Settings {
        egress_image: Some("example.invalid/mtls-operator:test".into()),
        ..Settings::default()
    };
    let _operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("egress reach CA")?;
    let source = format!("{namespace}/partner");
    put_source(&source, &good_secret(&ca)?).await?;
    let admin = support::admin_client().await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let attacks = [
        (
            "everyone",
            serde_json::json!({"upstream": "https://api.partner.example",
                "allowFrom": [{"namespaceSelector": {}}]}),
            "allowFrom[0]",
        ),
        (
            "internet",
            serde_json::json!({"upstream": "https://api.partner.example",
                "allowFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
            "allowFrom[0]",
        ),
        (
            "metadata",
            serde_json::json!({"upstream": "https://169.254.169.254"}),
            "upstream",
        ),
        (
            "apiserver",
            serde_json::json!({"upstream": "https://kubernetes.default.svc"}),
            "upstream",
        ),
    ];
    for (name, egress, _) in &attacks {
        let spec = serde_json::json!({"egress": egress});
        create_identity(&namespace, &identity(name, &source, spec)?).await?;
    }
    for (name, _, field) in &attacks {
        let message = egress_condition(&namespace, name, "False", "EgressNotAllowed").await?;
        ensure!(
            message.contains(&format!("spec.egress.{field}")),
            "{name}: {message}"
        );
        ensure!(
            policies.get_opt(name).await?.is_none() && deployments.get_opt(name).await?.is_none(),
            "{name}: objects were written"
        );
    }

    // Allowed first, then edited into an attack: the proxy keeps what it had.
    create_identity(&namespace, &egress_identity(&namespace)?).await?;
    egress_condition(&namespace, "partner", "True", "EgressReady").await?;
    let before = policies.get("partner").await?;
    let widen = serde_json::json!({"spec": {"egress": {"upstream": "https://169.254.169.254",
        "allowFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}}});
    Api::<MtlsIdentity>::namespaced(admin.clone(), &namespace)
        .patch("partner", &PatchParams::default(), &Patch::Merge(&widen))
        .await?;
    egress_condition(&namespace, "partner", "False", "EgressNotAllowed").await?;
    let after = policies.get("partner").await?;
    ensure!(
        after.spec == before.spec,
        "the NetworkPolicy changed: {:?}",
        after.spec
    );
    let args = deployments
        .get("partner")
        .await?
        .spec
        .and_then(|spec| spec.template.spec)
        .and_then(|pod| pod.containers.into_iter().next())
        .and_then(|container| container.args)
        .unwrap_or_default();
    ensure!(
        args.contains(&"--upstream=https://api.partner.example".to_string()),
        "the proxy's upstream changed: {args:?}"
    );
    Ok(())
}
