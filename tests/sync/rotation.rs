//! (A module of the sync test binary.) Rotation on the real control plane (controller-manager, scheduler, kwok): the Secret is updated and
//! exactly the workloads that use it roll, once per rotation, never on resync or operator restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::common::*;
use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use mtls_operator::api::{MtlsIdentity, VERSION_ID_ANNOTATION};
use mtls_operator::controller::Settings;
use mtls_operator::restart::{RestartLimits, Workload};
use xtask::support::{self, wait_for};

#[tokio::test]
async fn rotation_restarts_exactly_the_workloads_that_use_the_secret_once() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start("rotate").await?.parts();
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"target": {"secretName": "client-tls"}});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;

    create_deployment(&namespace, "uses-volume", Some(("volume", "client-tls"))).await?;
    create_stateful_set(&namespace, "uses-env", Some(("env", "client-tls"))).await?;
    create_daemon_set(
        &namespace,
        "uses-projected",
        Some(("projected", "client-tls")),
    )
    .await?;
    create_deployment(&namespace, "unrelated", Some(("volume", "other-secret"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;

    let version = put_source(&secret_id, &good_secret(&ca)?).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    assert_eq!(
        rotation.restarted_workloads,
        vec![
            "DaemonSet/uses-projected",
            "Deployment/uses-volume",
            "StatefulSet/uses-env"
        ]
    );
    let secret = get_secret(&namespace, "client-tls")
        .await?
        .context("no Secret")?;
    assert_eq!(
        secret
            .metadata
            .annotations
            .unwrap_or_default()
            .get(VERSION_ID_ANNOTATION),
        Some(&version)
    );
    wait_all_rolled_out(&namespace).await?;
    let after = generations(&namespace).await?;
    for (name, generation) in &before {
        let expected = if name.contains("unrelated") {
            *generation
        } else {
            generation + 1
        };
        assert_eq!(after.get(name), Some(&expected), "{name}: rollouts");
    }
    // The Deployment's new ReplicaSet runs the new template.
    let admin = support::admin_client().await?;
    let sets = Api::<ReplicaSet>::namespaced(admin.clone(), &namespace)
        .list(&ListParams::default().labels("app=uses-volume"))
        .await?;
    assert_eq!(sets.items.len(), 2, "one new ReplicaSet");
    let running = Api::<Pod>::namespaced(admin, &namespace)
        .list(&ListParams::default().labels("app=uses-volume"))
        .await?
        .items
        .into_iter()
        .filter(|pod| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("mtls-operator.io/cert.client"))
                == Some(&rotation.sha256_fingerprint)
                && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .count();
    assert_eq!(running, 1, "the new pod runs with the new token");
    wait_event(&namespace, "client", "Rotated").await?;
    wait_event(&namespace, "client", "RestartTriggered").await?;
    wait_event(&namespace, "uses-volume", "RestartTriggered").await?;

    // At a glance: `kubectl get -o wide` shows the secret, its version and the rotation; `kubectl
    // describe` tells the story: conditions, certificate, last rotation, recent Events.
    let kubectl = |args: &[&str]| -> Result<String> {
        let output = support::kubectl(args)?;
        ensure!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };
    let wide = kubectl(&["get", "mtlsid", "client", "-n", &namespace, "-o", "wide"])?;
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header
            == [
                "NAME", "READY", "REASON", "EXPIRES", "AGE", "SECRET", "VERSION", "ROTATED",
                "TARGET"
            ],
        "{wide}"
    );
    ensure!(
        wide.contains(&secret_id) && wide.contains(&version) && wide.contains("client-tls"),
        "{wide}"
    );
    let narrow = kubectl(&["get", "mtlsid", "client", "-n", &namespace])?;
    ensure!(
        !narrow.contains(&version),
        "the version is for -o wide: {narrow}"
    );
    let story = kubectl(&["describe", "mtlsid", "client", "-n", &namespace])?;
    for expected in [
        "Conditions:",
        "sha256Fingerprint:",
        "Last Rotation:",
        "Restarted Workloads:",
        "Events:",
        "Rotated",
        "RestartTriggered",
    ] {
        ensure!(
            story.contains(expected),
            "describe lacks {expected:?}: {story}"
        );
    }
    // One Event per change: the Secret write that triggers a reconcile at once must not make the
    // operator judge the change again against a status it already replaced.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(
        support::admin_client().await?,
        &namespace,
    )
    .list(&ListParams::default())
    .await?
    .items;
    for reason in ["Synced", "Rotated"] {
        let count = events
            .iter()
            .filter(|event| {
                event.reason.as_deref() == Some(reason)
                    && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("client")
            })
            .count();
        ensure!(count == 1, "{count} {reason} Events about the identity");
    }

    // Restart the operator, and make it reconcile (a spec change); then re-apply unchanged.
    drop(operator);
    let operator = start_operator(&namespace).await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &namespace);
    let patch = serde_json::json!({"spec": {"refreshInterval": "6s"}});
    let changed = identities
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("the restarted operator to reconcile", TIMEOUT, || async {
        let identity = identities.get("client").await?;
        ensure!(
            identity.status.and_then(|s| s.observed_generation) == changed.metadata.generation,
            "not reconciled yet"
        );
        Ok(())
    })
    .await?;
    identities
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    // Let the restarted operator reconcile a few more times (its 6 s schedule) before judging.
    let synced = syncs(&operator);
    wait_for("two more reconciles", TIMEOUT, || async {
        ensure!(
            syncs(&operator) >= synced + 2,
            "{} so far",
            syncs(&operator) - synced
        );
        Ok(())
    })
    .await?;
    assert_eq!(
        generations(&namespace).await?,
        after,
        "no rollout after an operator restart"
    );
    Ok(())
}

#[tokio::test]
async fn bad_rotation_changes_nothing_and_the_next_good_one_restarts_once() -> Result<()> {
    let scenario = Scenario::start("badrot").await?;
    let (namespace, ca) = (scenario.namespace.as_str(), &scenario.ca);
    let secret_id = scenario.id("client");
    scenario
        .synced("client", "client", serde_json::json!({}))
        .await?;
    create_deployment(namespace, "app", Some(("volume", "client"))).await?;
    wait_all_rolled_out(namespace).await?;
    let before = generations(namespace).await?;
    let secret_before = get_secret(namespace, "client")
        .await?
        .context("no Secret")?;

    let good = ca.leaf(&LeafOptions::default())?;
    let other = ca.leaf(&LeafOptions::default())?;
    put_source(
        &secret_id,
        &json_secret(&good.cert_pem, &other.key_pem, &ca.pem()),
    )
    .await?;
    wait_ready(namespace, "client", "False", "KeyMismatch").await?;
    let secret_after = get_secret(namespace, "client")
        .await?
        .context("no Secret")?;
    assert_eq!(secret_after.data, secret_before.data);
    assert_eq!(
        generations(namespace).await?,
        before,
        "no rollout for a bad version"
    );

    let version = put_source(&secret_id, &good_secret(ca)?).await?;
    wait_rotation(namespace, "client", &version).await?;
    wait_all_rolled_out(namespace).await?;
    let after = generations(namespace).await?;
    assert_eq!(
        after.get("Deployment/app").copied(),
        before.get("Deployment/app").map(|g| g + 1)
    );
    Ok(())
}

#[tokio::test]
async fn two_identities_rotated_together_restart_their_shared_deployment_once() -> Result<()> {
    let scenario = Scenario::start("pair").await?;
    let (namespace, ca) = (scenario.namespace.as_str(), &scenario.ca);
    let (first_id, second_id) = (scenario.id("first"), scenario.id("second"));
    scenario
        .synced("first", "first", serde_json::json!({}))
        .await?;
    scenario
        .synced("second", "second", serde_json::json!({}))
        .await?;
    create_deployment_mounting(namespace, "both", &["first", "second"]).await?;
    wait_all_rolled_out(namespace).await?;
    let before = generations(namespace).await?;

    let first_version = put_source(&first_id, &good_secret(ca)?).await?;
    let second_version = put_source(&second_id, &good_secret(ca)?).await?;
    wait_rotation(namespace, "first", &first_version).await?;
    wait_rotation(namespace, "second", &second_version).await?;
    wait_all_rolled_out(namespace).await?;
    let after = generations(namespace).await?;
    assert_eq!(
        after.get("Deployment/both").copied(),
        before.get("Deployment/both").map(|g| g + 1),
        "one rollout"
    );
    Ok(())
}

#[tokio::test]
async fn annotate_policy_annotates_pods_without_a_rollout() -> Result<()> {
    let namespace = support::create_namespace("annotate", &[]).await?;
    let settings = Settings {
        allow_annotate: true,
        ..Settings::default()
    };
    let _operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("annotate CA")?;
    let secret_id = format!("{namespace}/client");
    put_source(&secret_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"restart": {"policy": "Annotate"}});
    create_identity(&namespace, &identity("client", &secret_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "reloader", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;

    let version = put_source(&secret_id, &good_secret(&ca)?).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    let pods = Api::<Pod>::namespaced(support::admin_client().await?, &namespace)
        .list(&ListParams::default().labels("app=reloader"))
        .await?;
    assert!(!pods.items.is_empty());
    for pod in pods.items {
        assert_eq!(
            pod.metadata
                .annotations
                .unwrap_or_default()
                .get("mtls-operator.io/cert.client"),
            Some(&rotation.sha256_fingerprint)
        );
    }
    assert_eq!(
        generations(&namespace).await?,
        before,
        "no rollout with Annotate"
    );
    let sets = Api::<ReplicaSet>::namespaced(support::admin_client().await?, &namespace)
        .list(&ListParams::default())
        .await?;
    assert_eq!(sets.items.len(), 1, "no new ReplicaSet");
    Ok(())
}

#[tokio::test]
async fn expiring_certificate_sets_expiring_soon_and_warns() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("expiry").await?.parts();
    let now = time::OffsetDateTime::now_utc();
    let leaf = ca.leaf(&LeafOptions {
        not_after: now + time::Duration::days(10),
        ..LeafOptions::default()
    })?;
    let secret_id = format!("{namespace}/client");
    put_source(
        &secret_id,
        &json_secret(&leaf.cert_pem, &leaf.key_pem, &ca.pem()),
    )
    .await?;
    create_identity(
        &namespace,
        &identity("client", &secret_id, serde_json::json!({}))?,
    )
    .await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &namespace);
    wait_for("ExpiringSoon=True", TIMEOUT, || async {
        let identity = identities.get("client").await?;
        let status = identity.status.context("no status")?;
        let expiring = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ExpiringSoon")
            .context("no ExpiringSoon")?;
        ensure!(expiring.status == "True", "{expiring:?}");
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .context("no Ready")?;
        ensure!(ready.status == "True", "Ready stays True: {ready:?}");
        Ok(())
    })
    .await?;
    let event = wait_event(&namespace, "client", "ExpiringSoon").await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    Ok(())
}

/// Fifty identities rotated at once, each used by its own Deployment, with the cap at 5: never more
/// than 5 rollouts in progress, and all 50 done at the end.
#[tokio::test]
async fn mass_rotation_queues_behind_the_rollout_cap() -> Result<()> {
    const COUNT: usize = 50;
    const CAP: usize = 5;
    let namespace = support::create_namespace("mass", &[]).await?;
    let settings = Settings {
        restart_limits: RestartLimits {
            max_rollouts: CAP,
            max_per_namespace: CAP,
            ..RestartLimits::default()
        },
        ..Settings::default()
    };
    let _operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("mass CA")?;
    for index in 0..COUNT {
        let id = format!("{namespace}/client-{index}");
        put_source(&id, &good_secret(&ca)?).await?;
        let spec = serde_json::json!({"refreshInterval": "5s"});
        create_identity(
            &namespace,
            &identity(&format!("client-{index}"), &id, spec)?,
        )
        .await?;
        create_deployment(
            &namespace,
            &format!("app-{index}"),
            Some(("volume", &format!("client-{index}"))),
        )
        .await?;
    }
    for index in 0..COUNT {
        wait_ready(&namespace, &format!("client-{index}"), "True", "Synced").await?;
    }
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;

    // Watch every Deployment change and record the most rollouts in progress at any moment.
    let peak = Arc::new(Mutex::new(0usize));
    let watch_peak = peak.clone();
    let watch_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors_seen = watch_errors.clone();
    let deployments: Api<Deployment> = Api::namespaced(support::admin_client().await?, &namespace);
    let watching = tokio::spawn(async move {
        let mut state: HashMap<String, bool> = HashMap::new();
        let mut stream = watcher(deployments, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        // A watch error (the watcher resumes by itself) is counted, not a silent end of watching.
        while let Some(event) = stream.next().await {
            let Ok(deployment) = event else {
                watch_errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                continue;
            };
            let workload = Workload::from(deployment);
            state.insert(workload.display(), workload.rollout_in_progress());
            let busy = state.values().filter(|busy| **busy).count();
            if let Ok(mut peak) = watch_peak.lock() {
                *peak = (*peak).max(busy);
            }
        }
    });

    let mut versions = Vec::new();
    for index in 0..COUNT {
        versions
            .push(put_source(&format!("{namespace}/client-{index}"), &good_secret(&ca)?).await?);
    }
    for (index, version) in versions.iter().enumerate() {
        wait_rotation(&namespace, &format!("client-{index}"), version).await?;
    }
    wait_all_rolled_out(&namespace).await?;
    watching.abort();
    let after = generations(&namespace).await?;
    for (name, generation) in &before {
        assert_eq!(after.get(name), Some(&(generation + 1)), "{name}");
    }
    let peak = *peak.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert!(
        peak <= CAP,
        "{peak} rollouts in progress at once; the cap is {CAP}"
    );
    assert!(peak >= 1, "the watch saw the rollouts");
    let errors = errors_seen.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        errors, 0,
        "the watch had errors: the peak may have been missed"
    );
    Ok(())
}
