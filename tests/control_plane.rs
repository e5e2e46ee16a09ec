//! The operator across a restart of the control plane's kube-apiserver (etcd keeps the data), in a
//! test binary of its own: cargo runs test binaries one at a time, so no other test sees the API
//! server go away.

mod common;

use anyhow::{Result, ensure};
use common::endpoint::Mode;
use common::*;
use xtask::support;

/// The tests here restart kube-apiserver: one at a time, or one would see the other's restart.
static APISERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// kube-apiserver stopped and started in the middle of a rotation of 20 identities, each used by
/// its own Deployment: every identity ends Ready with its new version, and each Deployment rolled
/// exactly once.
#[tokio::test]
async fn an_apiserver_restart_during_a_mass_rotation_loses_and_doubles_nothing() -> Result<()> {
    let _alone = APISERVER.lock().await;
    const COUNT: usize = 20;
    let namespace = support::create_namespace("apiserver-restart", &[]).await?;
    // Reads one by one (a role without BatchGetSecretValue), and the last secret's new version
    // held at the endpoint: the restart provably lands with that rotation still to do.
    let endpoint = counting_endpoint(Mode::Pass).await?;
    endpoint.deny("BatchGetSecretValue");
    let _operator = start_operator_through(&endpoint, &[&namespace], Default::default()).await?;
    let ca = TestCa::new("apiserver restart CA")?;
    let ids = create_identities_with_deployments(&namespace, &ca, COUNT).await?;
    let (before, versions) =
        start_mass_rotation_holding_the_last(&namespace, &ca, &ids, &endpoint).await?;
    support::restart_apiserver().await?;
    ensure!(
        endpoint.reads_held() >= 1,
        "the held read ended during the restart"
    );
    endpoint.release_reads();
    finish_mass_rotation(&namespace, &versions, &before).await
}

/// Identities deleted while the operator's watch is disconnected reach it only through the re-list
/// that follows (kube-runtime sends no `Delete` for them): their memory, their index entries and
/// their metric series are gone after it, and the sweep stops describing their secrets.
#[tokio::test]
async fn identities_deleted_while_the_watch_is_disconnected_are_forgotten_on_the_re_list()
-> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, DeleteParams, PostParams};
    use mtls_operator::api::MtlsIdentity;
    use std::collections::BTreeSet;

    let _alone = APISERVER.lock().await;
    const KEPT: usize = 2;
    const DELETED: usize = 3;
    let namespace = support::create_namespace("relist", &[]).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let link = link::ApiLink::start(link::apiserver_address()?).await?;
    let aws = endpoint.aws_config(&support::aws_config().await);
    let operator = start_operator_linked(
        &[&namespace],
        // Counted per DescribeSecret below: the describe sweep names each secret it checks.
        mtls_operator::controller::Settings {
            sweep_mode: mtls_operator::source::fleet::SweepMode::Describe,
            ..Default::default()
        },
        aws.clone(),
        mtls_operator::source::SecretsManagerSource::new(aws),
        Some(&link),
    )
    .await?;
    let ca = TestCa::new("relist CA")?;
    let mut ids = Vec::new();
    for index in 0..KEPT + DELETED {
        let id = format!("{namespace}/client-{index}");
        put_source(&id, &good_secret(&ca)?).await?;
        create_identity(
            &namespace,
            &identity(&format!("client-{index}"), &id, serde_json::json!({}))?,
        )
        .await?;
        ids.push(id);
    }
    wait_all_ready(&namespace, KEPT + DELETED).await?;
    let series_of = |operator: &Operator| -> BTreeSet<String> {
        operator
            .metrics
            .encode()
            .lines()
            .filter(|line| line.starts_with("mtls_identity_ready{"))
            .filter(|line| line.contains(&format!("namespace=\"{namespace}\"")))
            .filter_map(|line| Some(line.split("name=\"").nth(1)?.split('"').next()?.to_string()))
            .collect()
    };
    ensure!(
        series_of(&operator).len() == KEPT + DELETED,
        "{:?}",
        series_of(&operator)
    );
    ensure!(metric(&operator, "mtls_identities_remembered") == (KEPT + DELETED) as u64);
    ensure!(metric(&operator, "mtls_source_index_secrets") == (KEPT + DELETED) as u64);

    // Cut off, the deletions happen; the API server restarts, so the operator's watch cannot resume
    // from where it was (its resourceVersion predates the new watch cache: 410 Gone, a re-list).
    link.cut();
    let admin = support::admin_client().await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(admin.clone(), &namespace);
    for index in KEPT..KEPT + DELETED {
        identities
            .delete(&format!("client-{index}"), &DeleteParams::default())
            .await?;
    }
    // One more write, so the etcd revision the new watch cache starts at is past the deletions.
    let marker: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "marker"}}))?;
    Api::<ConfigMap>::namespaced(admin, &namespace)
        .create(&PostParams::default(), &marker)
        .await?;
    support::restart_apiserver().await?;
    link.restore();

    // The watch retries with backoff (up to 30 s a try) while cut off, and re-lists after its 410.
    support::wait_for("the deleted identities forgotten", 5 * TIMEOUT, || async {
        let series = series_of(&operator);
        let remembered = metric(&operator, "mtls_identities_remembered");
        let indexed = metric(&operator, "mtls_source_index_secrets");
        ensure!(
            series.len() == KEPT && remembered == KEPT as u64 && indexed == KEPT as u64,
            "series {series:?}, memory {remembered}, index {indexed}"
        );
        Ok(())
    })
    .await?;
    // The sweep goes on for the identities that remain, and never again for the deleted ones.
    let (kept, deleted) = ids.split_at(KEPT);
    let describes = |ids: &[String]| {
        endpoint
            .requests_for(ids)
            .iter()
            .filter(|seen| seen.operation == "DescribeSecret")
            .count()
    };
    let deleted_before = describes(deleted);
    let kept_before = describes(kept);
    support::wait_for(
        "two more sweeps of the kept identities",
        TIMEOUT,
        || async {
            let more = describes(kept) - kept_before;
            ensure!(more >= 2 * KEPT, "{more} so far");
            Ok(())
        },
    )
    .await?;
    ensure!(
        describes(deleted) == deleted_before,
        "the sweep still describes the deleted identities' secrets"
    );
    Ok(())
}
