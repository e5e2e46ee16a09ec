//! The local environment is the real thing: RBAC, PodSecurity admission, Deployments that roll,
//! Secrets Manager versions, and nothing left running after `down`.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use xtask::support::{self, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn apiserver_is_ready() -> Result<()> {
    let admin = support::admin_client().await?;
    let request = http::Request::get("/readyz").body(Vec::new())?;
    assert_eq!(admin.request_text(request).await?.trim(), "ok");
    let version = admin.apiserver_version().await?;
    assert_eq!(version.git_version, xtask::install::KUBERNETES_VERSION);
    Ok(())
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    Ok(serde_json::from_value(value)?)
}

#[tokio::test]
async fn service_account_gets_exactly_what_rbac_grants() -> Result<()> {
    let namespace = support::create_namespace("rbac", &[]).await?;
    let robot = support::service_account_client(&namespace, "robot").await?;
    let as_robot: Api<ConfigMap> = Api::namespaced(robot.clone(), &namespace);

    let denied = as_robot.list(&ListParams::default()).await;
    match denied {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => bail!("listing ConfigMaps without a Role should be forbidden, got {other:?}"),
    }

    let admin = support::admin_client().await?;
    let role: Role = from_json(serde_json::json!({
        "metadata": {"name": "read-configmaps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
    }))?;
    Api::<Role>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = from_json(serde_json::json!({
        "metadata": {"name": "robot-reads-configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}]
    }))?;
    Api::<RoleBinding>::namespaced(admin, &namespace)
        .create(&PostParams::default(), &binding)
        .await?;

    wait_for("the Role to take effect", TIMEOUT, || async {
        as_robot.list(&ListParams::default()).await?;
        Ok(())
    })
    .await?;
    // Granted list, not create.
    let config_map: ConfigMap = from_json(serde_json::json!({"metadata": {"name": "nope"}}))?;
    match as_robot.create(&PostParams::default(), &config_map).await {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
        other => bail!("creating a ConfigMap should be forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn restricted_pod_security_rejects_a_privileged_pod() -> Result<()> {
    let namespace = support::create_namespace(
        "psa",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(support::admin_client().await?, &namespace);
    let privileged: Pod = from_json(serde_json::json!({
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{
            "name": "main", "image": "example.invalid/app:1",
            "securityContext": {"privileged": true}
        }]}
    }))?;
    match pods.create(&PostParams::default(), &privileged).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            ensure!(
                status.message.contains("violates PodSecurity \"restricted"),
                "unexpected refusal: {}",
                status.message
            );
        }
        other => bail!("a privileged pod must be refused under restricted, got {other:?}"),
    }
    let compliant: Pod = from_json(serde_json::json!({
        "metadata": {"name": "compliant"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": "example.invalid/app:1",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]}
                }
            }]
        }
    }))?;
    pods.create(&PostParams::default(), &compliant).await?;
    Ok(())
}

fn ready_replicas(deployment: &Deployment) -> i32 {
    deployment
        .status
        .as_ref()
        .and_then(|status| status.ready_replicas)
        .unwrap_or(0)
}

#[tokio::test]
async fn deployments_roll_out_new_replica_sets_with_running_pods() -> Result<()> {
    let namespace = support::create_namespace("rollout", &[]).await?;
    let admin = support::admin_client().await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(admin.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(admin, &namespace);
    let deployment: Deployment = from_json(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    wait_for("2 ready replicas", TIMEOUT, || async {
        let deployment = deployments.get("web").await?;
        ensure!(
            ready_replicas(&deployment) == 2,
            "ready: {}",
            ready_replicas(&deployment)
        );
        Ok(())
    })
    .await?;

    let patch =
        serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"rolled": "1"}}}}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("the new ReplicaSet's pods to run", TIMEOUT, || async {
        let sets = replica_sets.list(&ListParams::default()).await?;
        ensure!(sets.items.len() == 2, "{} ReplicaSets", sets.items.len());
        let new_set = sets
            .items
            .iter()
            .find(|set| {
                set.spec
                    .as_ref()
                    .and_then(|spec| spec.template.as_ref())
                    .and_then(|template| template.metadata.as_ref())
                    .and_then(|metadata| metadata.annotations.as_ref())
                    .is_some_and(|annotations| annotations.contains_key("rolled"))
            })
            .context("no ReplicaSet with the new template")?;
        let hash = new_set
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get("pod-template-hash"))
            .context("no pod-template-hash")?;
        let running = pods
            .list(&ListParams::default().labels(&format!("pod-template-hash={hash}")))
            .await?
            .items
            .into_iter()
            .filter(|pod| {
                pod.status
                    .as_ref()
                    .and_then(|status| status.phase.as_deref())
                    == Some("Running")
            })
            .count();
        ensure!(running == 2, "{running} of the new pods running");
        let deployment = deployments.get("web").await?;
        let updated = deployment
            .status
            .as_ref()
            .and_then(|status| status.updated_replicas)
            .unwrap_or(0);
        ensure!(
            updated == 2 && ready_replicas(&deployment) == 2,
            "rollout not complete"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn secrets_manager_returns_versions_through_the_aws_sdk() -> Result<()> {
    let client = support::secrets_manager().await;
    let name = format!("testenv/versions-{}", std::process::id());
    let created = client
        .create_secret()
        .name(&name)
        .secret_string("first")
        .send()
        .await?;
    let first_version = created.version_id().context("no VersionId")?.to_string();
    let put = client
        .put_secret_value()
        .secret_id(&name)
        .secret_string("second")
        .send()
        .await?;
    let second_version = put.version_id().context("no VersionId")?.to_string();
    assert_ne!(first_version, second_version);

    let current = client
        .get_secret_value()
        .secret_id(&name)
        .version_stage("AWSCURRENT")
        .send()
        .await?;
    assert_eq!(current.secret_string(), Some("second"));
    assert_eq!(current.version_id(), Some(second_version.as_str()));
    let previous = client
        .get_secret_value()
        .secret_id(&name)
        .version_id(&first_version)
        .send()
        .await?;
    assert_eq!(previous.secret_string(), Some("first"));
    Ok(())
}

/// A second, separate environment (side by side with the shared one): up, used, down, and then no
/// process of it is left.
#[test]
fn down_leaves_nothing_running() -> Result<()> {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_xtask"));
    let progress = |line: &str| eprintln!("{line}");
    let supervisor = xtask::supervisor::start_supervisor(
        exe,
        xtask::supervisor::Attachment::Detached,
        &progress,
    )?;
    let environment = supervisor.environment.clone();
    assert_ne!(environment.dir, support::environment().dir);
    assert_ne!(
        environment.apiserver_url,
        support::environment().apiserver_url
    );
    let output = std::process::Command::new(&environment.kubectl)
        .env("KUBECONFIG", &environment.kubeconfig)
        .args(["get", "nodes", "-o", "name"])
        .output()?;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        xtask::testenv::FAKE_NODES
    );
    let supervisor_pid = supervisor.pid();

    let status = std::process::Command::new(exe)
        .args(["testenv", "down", "--dir"])
        .arg(&environment.dir)
        .status()?;
    assert!(status.success());
    let mut pids = environment.pids.clone();
    pids.push(supervisor_pid);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.contains(") Z ")),
            "process {pid} of the environment outlived `down`"
        );
    }
    assert!(!environment.dir.exists(), "`down` left its folder");
    drop(supervisor);
    Ok(())
}
