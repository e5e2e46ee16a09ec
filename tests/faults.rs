//! The reconcile loop under faults and drift, on the real control plane and moto: status stays
//! truthful, nothing good is lost, no rollout is skipped or doubled.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::endpoint::Mode;
use common::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mtls_operator::api::{MtlsIdentity, VERSION_ID_ANNOTATION};
use mtls_operator::controller::Settings;
use mtls_operator::source::SecretsManagerSource;
use xtask::support::{self, wait_for};

async fn identities(namespace: &str) -> Result<Api<MtlsIdentity>> {
    Ok(Api::namespaced(support::admin_client().await?, namespace))
}

fn reads(operator: &Operator) -> u64 {
    operator.source.calls_of("GetSecretValue") + operator.source.calls_of("BatchGetSecretValue")
}

#[tokio::test]
async fn a_paused_deployment_gets_the_token_and_rolls_once_on_resume() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("paused").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "api", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let admin = support::admin_client().await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let pause = |paused: bool| serde_json::json!({"spec": {"paused": paused}});
    deployments
        .patch("api", &PatchParams::default(), &Patch::Merge(&pause(true)))
        .await?;

    let version = put_source(&id, &good_secret(&ca)?).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    let event = wait_event(&namespace, "client", "RolloutPaused").await?;
    ensure!(event.note.unwrap_or_default().contains("resumed"));
    let template_token = |deployment: &Deployment| {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("mtls-operator.io/cert.client").cloned())
    };
    let paused = deployments.get("api").await?;
    ensure!(
        template_token(&paused).as_deref() == Some(rotation.sha256_fingerprint.as_str()),
        "the paused template carries the new token"
    );
    let replica_sets: Api<ReplicaSet> = Api::namespaced(admin.clone(), &namespace);
    let count =
        || async { anyhow::Ok(replica_sets.list(&ListParams::default()).await?.items.len()) };
    ensure!(count().await? == 1, "nothing rolled while paused");

    deployments
        .patch("api", &PatchParams::default(), &Patch::Merge(&pause(false)))
        .await?;
    wait_all_rolled_out(&namespace).await?;
    ensure!(
        count().await? == 2,
        "exactly one new ReplicaSet after resuming"
    );
    Ok(())
}

#[tokio::test]
async fn a_deleted_target_is_recreated_with_one_read_and_no_rollout() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start("deleted-target").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"refreshInterval": "1h"});
    create_identity(&namespace, &identity("client", &id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "api", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    let (read, reconciled) = (reads(&operator), syncs(&operator));
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let original = secrets.get("client").await?;
    secrets.delete("client", &DeleteParams::default()).await?;
    wait_for("the Secret to be recreated", TIMEOUT, || async {
        let again = secrets.get_opt("client").await?.context("not yet")?;
        ensure!(
            again.metadata.uid != original.metadata.uid,
            "the old one still"
        );
        ensure!(again.data == original.data, "same content");
        Ok(())
    })
    .await?;
    // The reconcile that recreated it has run (its own write asks for no other).
    wait_reconciles(&operator, reconciled, 1).await?;
    ensure!(
        reads(&operator) - read == 1,
        "{} reads",
        reads(&operator) - read
    );
    ensure!(generations(&namespace).await? == before, "no rollout");
    Ok(())
}

#[tokio::test]
async fn a_renamed_target_replaces_the_old_secret_without_a_rollout() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start("renamed").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "api", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    let reconciled = syncs(&operator);
    let patch = serde_json::json!({"spec": {"target": {"secretName": "client-v2"}}});
    identities(&namespace)
        .await?
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("the new Secret, and the old one gone", TIMEOUT, || async {
        ensure!(
            get_secret(&namespace, "client-v2").await?.is_some(),
            "no new Secret"
        );
        ensure!(
            get_secret(&namespace, "client").await?.is_none(),
            "old Secret still there"
        );
        Ok(())
    })
    .await?;
    let status = identities(&namespace)
        .await?
        .get("client")
        .await?
        .status
        .unwrap_or_default();
    ensure!(status.secret_name.as_deref() == Some("client-v2"));
    // The rename's reconcile and the one the old Secret's deletion asked for have both run (the
    // new Secret's create asks for none).
    wait_reconciles(&operator, reconciled, 2).await?;
    ensure!(
        generations(&namespace).await? == before,
        "no rollout: same certificate"
    );
    Ok(())
}

#[tokio::test]
async fn a_source_deleted_in_secrets_manager_keeps_the_last_good_secret() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("source-deleted").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    let good = get_secret(&namespace, "client").await?.context("Secret")?;
    // Scheduled for deletion (the default 30-day recovery window).
    support::secrets_manager()
        .await
        .delete_secret()
        .secret_id(&id)
        .send()
        .await?;
    wait_ready(&namespace, "client", "False", "SourceNotFound").await?;
    wait_event(&namespace, "client", "SourceNotFound").await?;
    let kept = get_secret(&namespace, "client")
        .await?
        .context("Secret kept")?;
    ensure!(kept.data == good.data, "the last good Secret stays");
    Ok(())
}

#[tokio::test]
async fn status_stays_truthful_when_restarts_fail_after_the_write() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("truthful").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "api", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;

    // The operator loses its permissions on workloads (a 403 on list), keeping the rest.
    narrow_operator_role(
        &namespace,
        "mtls-operator",
        "mtls-operator-no-workloads",
        |rule| !is_about_workloads(rule),
    )
    .await?;

    let version = put_source(&id, &good_secret(&ca)?).await?;
    let identities = identities(&namespace).await?;
    wait_for(
        "status: the new version, restarts failing",
        TIMEOUT,
        || async {
            let identity = identities.get("client").await?;
            let status = identity.status.clone().unwrap_or_default();
            let ready = identity.ready_condition().context("Ready")?;
            ensure!(ready.status == "True", "Ready {ready:?}");
            ensure!(
                status.source.as_ref().map(|s| s.version_id.as_str()) == Some(version.as_str()),
                "status still describes the old version"
            );
            let restarts = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Restarts")
                .context("no Restarts condition")?;
            ensure!(
                restarts.status == "False" && restarts.reason == "KubernetesApiError",
                "{restarts:?}"
            );
            ensure!(
                status.last_rotation.as_ref().is_some_and(|r| !r.complete),
                "rotation not complete"
            );
            Ok(())
        },
    )
    .await?;
    let secret = get_secret(&namespace, "client").await?.context("Secret")?;
    let carried = secret
        .metadata
        .annotations
        .and_then(|a| a.get(VERSION_ID_ANNOTATION).cloned());
    ensure!(
        carried.as_deref() == Some(version.as_str()),
        "the Secret was written"
    );

    // Permissions back: the rollout happens (once) and the condition goes.
    bind_cluster_role_to(&namespace, "mtls-operator", &namespace).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    ensure!(rotation.restarted_workloads == vec!["Deployment/api".to_string()]);
    wait_for(
        "the Restarts condition to clear",
        ROLLOUT_TIMEOUT,
        || async {
            let status = identities.get("client").await?.status.unwrap_or_default();
            ensure!(
                !status.conditions.iter().any(|c| c.type_ == "Restarts"),
                "still there"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_transient_outage_raises_no_false_alarm() -> Result<()> {
    let namespace = support::create_namespace("outage", &[]).await?;
    let settings = mtls_operator::controller::Settings {
        sweep_mode: mtls_operator::source::fleet::SweepMode::Get,
        ..Default::default()
    };
    // The outage is the endpoint's: every Secrets Manager request answered 503, counted there.
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let operator = start_operator_through(&endpoint, &[&namespace], settings).await?;
    let ca = TestCa::new("outage CA")?;
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"refreshInterval": "2s"});
    create_identity(&namespace, &identity("client", &id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    let secret = get_secret(&namespace, "client").await?.context("Secret")?;
    let identities = identities(&namespace).await?;
    let reachable = |status: &str| {
        let identities = identities.clone();
        let status = status.to_string();
        async move {
            wait_for(&format!("SourceReachable={status}"), TIMEOUT, || async {
                let identity = identities.get("client").await?;
                let ready = identity.ready_condition().context("Ready")?.clone();
                // Throughout: Ready stays True.
                ensure!(ready.status == "True", "Ready turned {ready:?}");
                let condition = identity
                    .status
                    .unwrap_or_default()
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "SourceReachable")
                    .context("no SourceReachable")?;
                ensure!(condition.status == status, "{condition:?}");
                Ok(condition)
            })
            .await
        }
    };
    reachable("True").await?;
    let outage_starts = endpoint.seen().len();
    endpoint.set_mode(Mode::Unavailable);
    let down = reachable("False").await?;
    ensure!(down.reason == "SourceUnavailable", "{down:?}");
    wait_event(&namespace, "client", "SourceUnreachable").await?;
    // Two more failed checks: Ready stays True, no second Warning, nothing reached moto, and each
    // check really went out (the endpoint answered it).
    let failed_checks = || {
        metric(
            &operator,
            "mtls_syncs_total{outcome=\"failure\",reason=\"SourceUnavailable\"}",
        )
    };
    let before = failed_checks();
    wait_for("two more failed checks", TIMEOUT, || async {
        ensure!(
            failed_checks() >= before + 2,
            "{} so far",
            failed_checks() - before
        );
        Ok(())
    })
    .await?;
    let identity = identities.get("client").await?;
    ensure!(
        identity
            .ready_condition()
            .is_some_and(|c| c.status == "True"),
        "Ready turned False"
    );
    let during: Vec<_> = endpoint.seen().split_off(outage_starts);
    ensure!(
        during.len() >= 3,
        "{} requests reached the endpoint for three failed checks",
        during.len()
    );
    ensure!(
        during.iter().all(|seen| !seen.forwarded),
        "a request reached moto during the outage: {during:?}"
    );
    endpoint.set_mode(Mode::Pass);
    reachable("True").await?;
    wait_event(&namespace, "client", "SourceReachable").await?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(support::admin_client().await?, &namespace);
    let warnings = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SourceUnreachable"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum::<i32>();
    ensure!(warnings == 1, "{warnings} SourceUnreachable Events");
    let after = get_secret(&namespace, "client").await?.context("Secret")?;
    ensure!(
        after.metadata.resource_version == secret.metadata.resource_version,
        "Secret unchanged"
    );
    Ok(())
}

/// Restart once, deterministically: two identities rotated together share a Deployment, and the
/// second one's read is held back 10 s at a fault-injecting endpoint in front of moto (longer than
/// any fixed settle timer). The first waits until the second's Secret holds its new version, then
/// restarts the Deployment once with both tokens; the second finds its token in place.
#[tokio::test]
async fn a_slow_sibling_still_restarts_the_shared_deployment_once() -> Result<()> {
    let namespace = support::create_namespace("slowpair", &[]).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    // Reads one by one (a role without BatchGetSecretValue): the slow read holds back no other.
    endpoint.deny("BatchGetSecretValue");
    let _operator = start_operator_through(&endpoint, &[&namespace], Settings::default()).await?;
    let ca = TestCa::new("slow pair CA")?;
    let (first_id, second_id) = (format!("{namespace}/first"), format!("{namespace}/second"));
    put_source(&first_id, &good_secret(&ca)?).await?;
    put_source(&second_id, &good_secret(&ca)?).await?;
    for (name, id) in [("first", &first_id), ("second", &second_id)] {
        create_identity(&namespace, &identity(name, id, serde_json::json!({}))?).await?;
        wait_ready(&namespace, name, "True", "Synced").await?;
    }
    create_deployment_mounting(&namespace, "both", &["first", "second"]).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;

    endpoint.slow_reads_of(&second_id, Duration::from_secs(10));
    let first_version = put_source(&first_id, &good_secret(&ca)?).await?;
    let second_version = put_source(&second_id, &good_secret(&ca)?).await?;
    wait_rotation(&namespace, "first", &first_version).await?;
    wait_rotation(&namespace, "second", &second_version).await?;
    wait_all_rolled_out(&namespace).await?;
    let after = generations(&namespace).await?;
    ensure!(
        after.get("Deployment/both").copied() == before.get("Deployment/both").map(|g| g + 1),
        "one rollout: {before:?} → {after:?}"
    );
    // Both tokens went into that one rollout.
    let template = Api::<Deployment>::namespaced(support::admin_client().await?, &namespace)
        .get("both")
        .await?
        .spec
        .and_then(|spec| spec.template.metadata)
        .and_then(|metadata| metadata.annotations)
        .unwrap_or_default();
    for name in ["first", "second"] {
        let fingerprint = identities(&namespace)
            .await?
            .get(name)
            .await?
            .status
            .and_then(|status| status.certificate)
            .map(|certificate| certificate.sha256_fingerprint)
            .context("no certificate in status")?;
        ensure!(
            template.values().any(|token| *token == fingerprint),
            "{name}'s token {fingerprint} missing from {template:?}"
        );
    }
    Ok(())
}

/// A rotation time the operator cannot have written (status edited by hand) is an error with a
/// reason, not "now": restarts wait, the `Restarts` condition says why, nothing rolls; once the time
/// is corrected, the rotation completes.
#[tokio::test]
async fn an_unreadable_rotation_time_is_an_error_not_now() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("badtime").await?.parts();
    let id = format!("{namespace}/client");
    let version = put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    let synced = wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "app", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    let fingerprint = synced
        .status
        .and_then(|status| status.certificate)
        .map(|certificate| certificate.sha256_fingerprint)
        .context("no certificate")?;
    let api = identities(&namespace).await?;
    let rotation = |time: &str| {
        serde_json::json!({"status": {"lastRotation": {
            "fromVersionId": "older", "toVersionId": version, "sha256Fingerprint": fingerprint,
            "time": time, "complete": false
        }}})
    };
    api.patch_status(
        "client",
        &PatchParams::default(),
        &Patch::Merge(rotation("yesterday")),
    )
    .await?;
    let restarts = |api: Api<MtlsIdentity>| async move {
        let identity = api.get("client").await?;
        let status = identity.status.context("no status")?;
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Restarts")
            .cloned();
        Ok::<_, anyhow::Error>((condition, status.last_rotation))
    };
    wait_for("Restarts=False InvalidStatus", TIMEOUT, || async {
        let (condition, _) = restarts(api.clone()).await?;
        let condition = condition.context("no Restarts condition")?;
        ensure!(
            condition.status == "False" && condition.reason == "InvalidStatus",
            "{condition:?}"
        );
        ensure!(condition.message.contains("yesterday"), "{condition:?}");
        Ok(())
    })
    .await?;
    ensure!(
        generations(&namespace).await? == before,
        "nothing rolls on an unreadable time"
    );

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    api.patch_status(
        "client",
        &PatchParams::default(),
        &Patch::Merge(rotation(&now)),
    )
    .await?;
    wait_for("the corrected rotation to complete", TIMEOUT, || async {
        let (condition, rotation) = restarts(api.clone()).await?;
        ensure!(condition.is_none(), "{condition:?}");
        ensure!(rotation.is_some_and(|r| r.complete), "not complete");
        Ok(())
    })
    .await?;
    let after = generations(&namespace).await?;
    ensure!(
        after.get("Deployment/app").copied() == before.get("Deployment/app").map(|g| g + 1),
        "one rollout once the time is readable: {before:?} → {after:?}"
    );
    Ok(())
}

/// `/readyz` is real: not ready while the identities cannot be listed (here: RBAC not yet granted,
/// as in a namespace whose RoleBinding is still being created), ready once they are.
#[tokio::test]
async fn readiness_waits_until_the_identities_are_listed() -> Result<()> {
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("readyz", &[]).await?;
    let client = support::service_account_client(&namespace, "mtls-operator").await?;
    let aws = support::aws_config().await;
    let settings = Settings {
        namespaces: vec![namespace.clone()],
        ..Settings::default()
    }
    .with_aws_defaults(&aws)
    .await;
    let readiness = mtls_operator::health::Readiness::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(mtls_operator::controller::run(
        client,
        std::sync::Arc::new(SecretsManagerSource::new(aws)),
        settings,
        std::sync::Arc::new(mtls_operator::metrics::Metrics::new()),
        readiness.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    // Over a window in which a permitted list would long have finished, it never says ready.
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(5) {
        ensure!(!readiness.is_ready(), "ready without being able to list");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bind_cluster_role_to(&namespace, "mtls-operator", &namespace).await?;
    wait_for(
        "ready once the identities can be listed",
        TIMEOUT,
        || async {
            ensure!(readiness.is_ready(), "not ready");
            Ok(())
        },
    )
    .await?;
    let _ = stop.send(());
    running.await?;
    Ok(())
}

/// SIGTERM to the leader (this package's binary, `--leader-election`) in the middle of a rotation of
/// 20 identities, each used by its own Deployment: the leader drains while it holds the Lease, exits
/// within the drain bound, and releases the Lease; a successor finishes the rotation. Every
/// Deployment rolls exactly once.
#[tokio::test]
async fn sigterm_to_the_leader_during_a_mass_rotation_rolls_each_workload_once() -> Result<()> {
    const COUNT: usize = 20;
    let namespace = support::create_namespace("leader-drain", &[]).await?;
    install_crd_and_rbac().await?;
    let ca = TestCa::new("leader drain CA")?;
    let ids = create_identities_with_deployments(&namespace, &ca, COUNT).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    // Reads one by one (a role without BatchGetSecretValue), and the last secret's new version
    // held at the endpoint: the signal provably lands with that identity's rotation still queued.
    endpoint.deny("BatchGetSecretValue");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mtls-operator"));
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let leader = |name: &str| {
        let mut command = endpoint.operator_command(binary, &namespace, &kubeconfig);
        command
            .args(["--leader-election", "--lease-name", "drain-test"])
            .args(["--lease-namespace", &namespace, "--lease-duration", "6s"])
            .args(["--identity", name]);
        command
    };
    let mut first = leader("first").spawn()?;
    let result = async {
        // SIGTERM once a first Deployment has been restarted and the held read is waiting.
        let (before, versions) =
            start_mass_rotation_holding_the_last(&namespace, &ca, &ids, &endpoint).await?;
        let rolled_at_signal = generations(&namespace)
            .await?
            .iter()
            .filter(|(name, generation)| before.get(*name) != Some(*generation))
            .count();
        ensure!(
            rolled_at_signal < COUNT,
            "every workload rolled before the signal: nothing was pending"
        );
        std::process::Command::new("kill")
            .args(["-TERM", &first.id().to_string()])
            .status()?;
        let signalled = std::time::Instant::now();
        // It must end by itself (the wait is a hang guard; the time is a figure for BENCHMARKS.md).
        let status = wait_for("the leader to exit by itself", Duration::from_secs(180), || {
            let status = first.try_wait();
            async move { status?.context("still running") }
        })
        .await?;
        let exit_time = signalled.elapsed();
        println!(
            "{rolled_at_signal} of {COUNT} restarted at SIGTERM; exited {status} after {exit_time:.1?}"
        );
        ensure!(status.success(), "SIGTERM ended the leader with {status}");
        let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
            support::admin_client().await?,
            &namespace,
        )
        .get("drain-test")
        .await?;
        ensure!(
            lease.spec.and_then(|spec| spec.holder_identity).is_none(),
            "the Lease was not released"
        );

        // The held rotation was still to do when the leader went: the successor's to finish.
        let last = get_secret(&namespace, &format!("client-{}", COUNT - 1))
            .await?
            .context("no Secret")?;
        let carried = last
            .metadata
            .annotations
            .and_then(|a| a.get(VERSION_ID_ANNOTATION).cloned());
        ensure!(
            carried.as_ref() != versions.last(),
            "the held rotation finished before the leader exited"
        );
        endpoint.release_reads();
        let mut second = leader("second").spawn()?;
        let finished = finish_mass_rotation(&namespace, &versions, &before).await;
        let _ = second.kill();
        let _ = second.wait();
        finished
    }
    .await;
    let _ = first.kill();
    let _ = first.wait();
    result
}

/// A conflicting writer (another field manager forcing `tls.crt` every second for 30 s): the
/// operator keeps putting its certificate back, each repair one read within the identity's read
/// budget (5 at once, then one per refresh interval), so the fight never turns into a hot loop on
/// Secrets Manager; nothing rolls (the content it restores is the one the workload already has).
#[tokio::test]
async fn a_conflicting_writer_loses_without_a_hot_loop() -> Result<()> {
    use k8s_openapi::ByteString;
    const EDITS: u32 = 30;
    let (namespace, operator, ca) = Scenario::start("conflict").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    create_deployment(&namespace, "app", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let original = secret_data(&secrets.get("client").await?, "tls.crt").context("no tls.crt")?;

    // Count the operator's wins: each time tls.crt turns back into the original.
    let wins = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let watching = tokio::spawn({
        let (secrets, wins, original) = (secrets.clone(), wins.clone(), original.clone());
        async move {
            use futures::StreamExt;
            use kube::runtime::{WatchStreamExt, watcher};
            let config = watcher::Config::default().fields("metadata.name=client");
            let mut stream = watcher(secrets, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            let mut tampered = false;
            while let Some(event) = stream.next().await {
                let Ok(secret) = event else { continue };
                let restored = secret_data(&secret, "tls.crt").as_deref() == Some(&original);
                if tampered && restored {
                    wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tampered = !restored;
            }
        }
    });
    let reads_before = reads(&operator);
    let deferred_before = metric(&operator, "mtls_source_reads_deferred_total");
    let intruder = PatchParams::apply("intruder").force();
    for edit in 0..EDITS {
        let patch = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "client"},
            "data": {"tls.crt": ByteString(format!("intruder {edit}").into_bytes())}
        });
        secrets
            .patch("client", &intruder, &Patch::Apply(&patch))
            .await?;
        // The intruder's own pace, not a wait for a condition.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let reads_during = reads(&operator) - reads_before;
    wait_for(
        "the operator's certificate back in place",
        TIMEOUT,
        || async {
            let now = secrets.get("client").await?;
            ensure!(
                secret_data(&now, "tls.crt").as_deref() == Some(&original),
                "not yet"
            );
            Ok(())
        },
    )
    .await?;
    let won = wins.load(std::sync::atomic::Ordering::SeqCst);
    watching.abort();
    println!("{EDITS} edits in {EDITS} s: {won} repairs seen, {reads_during} reads");
    // The budget (5 at once, then one per refresh interval) engaged, by its own count, and the
    // fight cost fewer reads than edits: no read per edit, whatever the machine's pace.
    let deferred = metric(&operator, "mtls_source_reads_deferred_total") - deferred_before;
    ensure!(
        deferred >= 1,
        "{reads_during} reads for {EDITS} edits and none put off: the budget never engaged"
    );
    ensure!(
        reads_during < u64::from(EDITS),
        "{reads_during} reads for {EDITS} edits: a hot loop"
    );
    ensure!(won >= 5, "only {won} repairs while the writer was active");
    ensure!(
        generations(&namespace).await? == before,
        "a repair rolled the workload"
    );
    Ok(())
}

/// A new identity's Secret is created without being looked for first (#24: one API request fewer
/// per identity on a cold start). When the create finds a Secret after all, because an earlier sync
/// wrote it and could not write the status (here the role lost `mtlsidentities/status`; in life the
/// operator stopped between the two writes), the same reconcile adopts its own Secret: the identity,
/// which still has no status, is not stuck on a create that keeps finding it.
#[tokio::test]
async fn a_new_identity_creates_its_secret_at_once_and_adopts_one_written_without_status()
-> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("no-status").await?.parts();
    let without_status = |rule: &k8s_openapi::api::rbac::v1::PolicyRule| {
        !rule
            .resources
            .iter()
            .flatten()
            .any(|r| r == "mtlsidentities/status")
    };
    narrow_operator_role(
        &namespace,
        "mtls-operator",
        "mtls-operator-no-status",
        without_status,
    )
    .await?;
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    // Written, then the status write refused; the retry (after the error backoff) creates again,
    // is told the name is taken, and looks: its own Secret.
    wait_for(
        "a create that finds the Secret, then a look at it",
        TIMEOUT,
        || async {
            let requests = operator_secret_requests(&namespace, "client")?;
            let refused = requests
                .iter()
                .position(|request| *request == ("create".to_string(), 409))
                .context(format!("no refused create yet: {requests:?}"))?;
            ensure!(
                requests[refused + 1..]
                    .iter()
                    .any(|(verb, _)| verb == "get"),
                "no look after the refused create: {requests:?}"
            );
            Ok(())
        },
    )
    .await?;
    let requests = operator_secret_requests(&namespace, "client")?;
    ensure!(
        requests.first() == Some(&("create".to_string(), 201)),
        "the first request on the new identity's Secret was not its create: {requests:?}"
    );
    let stored = identities(&namespace).await?.get("client").await?;
    ensure!(
        stored.status.is_none(),
        "a status was written without the permission"
    );

    narrow_operator_role(
        &namespace,
        "mtls-operator-no-status",
        "mtls-operator",
        |_| true,
    )
    .await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    Ok(())
}

/// The operator SIGKILLed after writing a Secret but before restarting its workloads and before
/// its status says so (here its role may write Secrets but neither list workloads nor write
/// status, so it stops exactly there): the successor finds the Secret ahead of the status, and
/// restarts the Deployment exactly once.
#[tokio::test]
async fn sigkill_between_the_secret_write_and_the_restart_rolls_once() -> Result<()> {
    let namespace = support::create_namespace("sigkill", &[]).await?;
    install_crd_and_rbac().await?;
    bind_cluster_role_to(&namespace, "mtls-operator", &namespace).await?;
    let ca = TestCa::new("sigkill CA")?;
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_identity(&namespace, &identity("client", &id, serde_json::json!({}))?).await?;
    create_deployment(&namespace, "app", Some(("volume", "client"))).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mtls-operator"));
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let operator = || endpoint.operator_command(binary, &namespace, &kubeconfig);
    let mut first = operator().spawn()?;
    let result = async {
        wait_ready(&namespace, "client", "True", "Synced").await?;
        wait_all_rolled_out(&namespace).await?;
        let before = generations(&namespace).await?;

        // The role loses workloads and status: the next rotation stops after the Secret write.
        narrow_operator_role(
            &namespace,
            "mtls-operator",
            "mtls-operator-secrets-only",
            |rule| {
                !is_about_workloads(rule)
                    && !rule
                        .resources
                        .iter()
                        .flatten()
                        .any(|r| r == "mtlsidentities/status")
            },
        )
        .await?;

        let version = put_source(&id, &good_secret(&ca)?).await?;
        wait_secret_version(
            "the Secret written from the new version",
            &namespace,
            "client",
            &version,
        )
        .await?;
        let identity = identities(&namespace).await?.get("client").await?;
        ensure!(
            identity
                .status
                .and_then(|s| s.source)
                .is_some_and(|s| s.version_id != version),
            "the status already describes the new version"
        );
        ensure!(
            generations(&namespace).await? == before,
            "restarted before the kill"
        );
        first.kill()?; // SIGKILL
        first.wait()?;

        // Permissions back; the successor finishes the rotation.
        narrow_operator_role(
            &namespace,
            "mtls-operator-secrets-only",
            "mtls-operator",
            |_| true,
        )
        .await?;
        let mut second = operator().spawn()?;
        let finished = async {
            wait_rotation(&namespace, "client", &version).await?;
            wait_all_rolled_out(&namespace).await?;
            let after = generations(&namespace).await?;
            ensure!(
                after.get("Deployment/app") == before.get("Deployment/app").map(|g| g + 1).as_ref(),
                "not exactly one rollout: {before:?} → {after:?}"
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let _ = second.kill();
        let _ = second.wait();
        finished
    }
    .await;
    let _ = first.kill();
    let _ = first.wait();
    result
}

/// The operator binary as a child process, SIGKILLed when dropped (a test that fails leaves none).
struct KilledOnDrop(std::process::Child);

impl KilledOnDrop {
    /// SIGKILL, no goodbye, and the exit reaped.
    fn kill(&mut self) -> Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Seeded chaos: identities, each used by its own Deployment, rotate twice while the operator (this
/// package's binary, as its own process) is SIGKILLed and started again at moments the seed picks.
/// After each rotation every Secret holds the newest version and every Deployment rolled exactly
/// once for it. Counts only. A failure replays with the printed `MTLS_CHAOS_SEED`.
#[tokio::test]
async fn seeded_sigkills_during_rotations_lose_and_double_nothing() -> Result<()> {
    use rand::{Rng, SeedableRng};
    const COUNT: usize = 12;
    const ROTATIONS: usize = 2;
    const KILLS_PER_ROTATION: usize = 3;
    let seed: u64 = match std::env::var("MTLS_CHAOS_SEED") {
        Ok(seed) => seed.parse().context("MTLS_CHAOS_SEED is not a number")?,
        Err(_) => rand::random(),
    };
    println!("chaos: seed {seed} (replay with MTLS_CHAOS_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let namespace = support::create_namespace("chaos", &[]).await?;
    let ca = TestCa::new("chaos CA")?;
    let ids = create_identities_with_deployments(&namespace, &ca, COUNT).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mtls-operator"));
    let spawn = || -> Result<KilledOnDrop> {
        Ok(KilledOnDrop(
            endpoint
                .operator_command(binary, &namespace, &kubeconfig)
                .args(["--sweep-interval", "1s"])
                .spawn()?,
        ))
    };
    let mut operator = spawn()?;
    wait_all_ready(&namespace, COUNT).await?;
    wait_all_rolled_out(&namespace).await?;
    for rotation in 1..=ROTATIONS {
        let before = generations(&namespace).await?;
        let mut versions = Vec::with_capacity(COUNT);
        for id in &ids {
            versions.push(put_source(id, &good_secret(&ca)?).await?);
        }
        let mut rolled_at_kills = Vec::new();
        for _ in 0..KILLS_PER_ROTATION {
            // A moment the seed picks (fault injection, not a wait for a condition).
            let moment = Duration::from_millis(rng.random_range(0..=2500));
            tokio::time::sleep(moment).await;
            operator.kill()?;
            let rolled = generations(&namespace)
                .await?
                .iter()
                .filter(|(name, generation)| before.get(*name) != Some(*generation))
                .count();
            rolled_at_kills.push(rolled);
            let away = Duration::from_millis(rng.random_range(0..=1000));
            tokio::time::sleep(away).await;
            operator = spawn()?;
        }
        println!(
            "chaos: rotation {rotation}: workloads restarted at each SIGKILL {rolled_at_kills:?} of {COUNT}"
        );
        finish_mass_rotation(&namespace, &versions, &before).await?;
    }
    drop(operator);
    Ok(())
}

/// Fencing: two replicas (this package's binary, each its own ServiceAccount), and mid-rotation the
/// leader's renewals are refused (its leader-election RoleBinding removed; everything else it may
/// still do) while the other replica waits to take over. The old leader must stop before the new
/// one holds the Lease, so it writes nothing after the new one starts; the rotation then finishes
/// with every workload rolled exactly once.
#[tokio::test]
async fn a_leader_whose_renewals_fail_stops_before_the_other_takes_over() -> Result<()> {
    const COUNT: usize = 8;
    let namespace = support::create_namespace("fencing", &[]).await?;
    let ca = TestCa::new("fencing CA")?;
    let ids = create_identities_with_deployments(&namespace, &ca, COUNT).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    // Reads one by one, and the last secret's new version held: the Lease is lost mid-rotation.
    endpoint.deny("BatchGetSecretValue");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mtls-operator"));
    let (namespace_ref, endpoint_ref) = (&namespace, &endpoint);
    let replica = |name: &'static str| async move {
        let (namespace, endpoint) = (namespace_ref, endpoint_ref);
        let kubeconfig = operator_kubeconfig_as(namespace, name).await?;
        let mut command = endpoint.operator_command(binary, namespace, &kubeconfig);
        command
            .args(["--leader-election", "--lease-name", "fencing"])
            .args(["--lease-namespace", namespace, "--lease-duration", "6s"])
            .args(["--identity", name]);
        anyhow::Ok(KilledOnDrop(command.spawn()?))
    };
    let mut first = replica("replica-a").await?;
    let leader = wait_for("a leader", TIMEOUT, || lease_holder(&namespace, "fencing")).await?;
    ensure!(
        leader == "replica-a",
        "{leader} leads before the other started"
    );
    let mut second = replica("replica-b").await?;
    let (before, versions) =
        start_mass_rotation_holding_the_last(&namespace, &ca, &ids, &endpoint).await?;

    // The leader's renewals are refused from now on.
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(
        support::admin_client().await?,
        &namespace,
    )
    .delete(
        &binding_name("mtls-operator-leader-election", "replica-a"),
        &DeleteParams::default(),
    )
    .await?;
    // Order, polled: whenever replica-b holds the Lease, replica-a has already exited.
    let fenced = wait_for(
        "replica-b to hold the Lease",
        Duration::from_secs(120),
        || {
            let exited = first.0.try_wait();
            async {
                let exited = exited?.is_some();
                let holder = lease_holder(&namespace, "fencing").await?;
                if holder == "replica-b" {
                    return Ok(exited);
                }
                anyhow::bail!("holder {holder}, replica-a exited: {exited}")
            }
        },
    )
    .await?;
    ensure!(
        fenced,
        "replica-b holds the Lease while replica-a still runs: both could write"
    );
    endpoint.release_reads();
    let finished = finish_mass_rotation(&namespace, &versions, &before).await;
    second.kill()?;
    finished
}
