//! Bounded load, on the real control plane and moto behind the project's counting endpoint
//! (`common::endpoint`): every Secrets Manager request is counted where AWS would count it, so
//! the rates asserted here include every retry. Counted, not timed: the assertions are on calls
//! seen in windows of the endpoint's own clock, never on how long something took.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::endpoint::{CountingEndpoint, Mode};
use common::*;
use futures::StreamExt;
use kube::api::{Api, ListParams};
use mtls_operator::api::MtlsIdentity;
use mtls_operator::controller::Settings;
use mtls_operator::source::fleet::SweepMode;
use xtask::support::{self, wait_for};

/// Secrets `{namespace}/client-N` (written to moto directly, not through the endpoint) and their
/// identities.
async fn create_fleet(namespace: &str, ca: &TestCa, count: usize, refresh: &str) -> Result<()> {
    futures::stream::iter(0..count)
        .map(|index| async move {
            let id = format!("{namespace}/client-{index}");
            put_source(&id, &good_secret(ca)?).await?;
            let spec = serde_json::json!({ "refreshInterval": refresh });
            create_identity(namespace, &identity(&format!("client-{index}"), &id, spec)?).await
        })
        .buffer_unordered(16)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect()
}

/// (Ready=True, Ready=False) among the namespace's identities.
async fn readiness(namespace: &str) -> Result<(usize, Vec<String>)> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    let mut ready = 0;
    let mut not_ready = Vec::new();
    for identity in identities.list(&ListParams::default()).await?.items {
        match identity.ready_condition() {
            Some(condition) if condition.status == "True" => ready += 1,
            Some(condition) => not_ready.push(format!(
                "{}: {}",
                identity.metadata.name.clone().unwrap_or_default(),
                condition.reason
            )),
            None => {}
        }
    }
    Ok((ready, not_ready))
}

/// A quota below what the fleet's sweep wants (300 secrets described every 10 s wants 30 calls/s
/// against 10 granted): every identity Ready, none flips to Ready=False while the sweep runs on
/// under the quota, and the call rate at the endpoint, throttled calls included, stays within
/// 1.5 x the quota.
#[tokio::test]
async fn a_quota_below_the_fleets_need_brings_no_flaps_and_no_storm() -> Result<()> {
    const COUNT: usize = 300;
    const QUOTA: u32 = 10;
    let namespace = support::create_namespace("load-quota", &[]).await?;
    let settings = Settings {
        sweep_mode: SweepMode::Describe,
        sweep_interval: Duration::from_secs(10),
        ..Settings::default()
    };
    let (_operator, endpoint) = operator_behind(&namespace, Mode::Quota(QUOTA), settings).await?;
    let started = Instant::now();
    let ca = TestCa::new("quota CA")?;
    create_fleet(&namespace, &ca, COUNT, "1h").await?;
    wait_for("every identity Ready", Duration::from_secs(240), || async {
        let (ready, _) = readiness(&namespace).await?;
        ensure!(ready == COUNT, "{ready} of {COUNT} Ready");
        Ok(())
    })
    .await?;
    // A whole sweep more under the quota (300 DescribeSecret), watching for flaps meanwhile.
    let described = endpoint.count(Some("DescribeSecret"));
    wait_for("a whole sweep more", Duration::from_secs(240), || async {
        let (ready, not_ready) = readiness(&namespace).await?;
        if !not_ready.is_empty() {
            // Not a condition to wait for: a flap fails the test at once.
            return Ok(Err(anyhow::anyhow!(
                "{} identities Ready=False after all were Ready: {:?}",
                not_ready.len(),
                &not_ready[..not_ready.len().min(5)]
            )));
        }
        ensure!(ready == COUNT, "{ready} of {COUNT} Ready");
        let more = endpoint.count(Some("DescribeSecret")) - described;
        ensure!(more >= COUNT, "{more} DescribeSecret since all were Ready");
        Ok(Ok(()))
    })
    .await??;
    let seen = endpoint.seen();
    let refused = seen.iter().filter(|seen| !seen.forwarded).count();
    let peak = endpoint.peak_rate(started, Duration::from_secs(5));
    println!(
        "{} calls seen, {refused} throttled; peak {peak:.1} calls/s over 5 s windows (quota {QUOTA}/s)",
        seen.len()
    );
    ensure!(
        peak <= 1.5 * f64::from(QUOTA),
        "peak {peak:.1} calls/s against a quota of {QUOTA}/s"
    );
    Ok(())
}

/// Every call throttled for a while: the call rate at the endpoint (every attempt counted) does
/// not rise above the healthy rate, Ready stays True (the Secrets in place are valid) while
/// `SourceReachable` says what is happening, and everything recovers when the throttling stops.
#[tokio::test]
async fn sustained_throttling_never_raises_the_call_rate() -> Result<()> {
    a_faulty_endpoint_never_raises_the_call_rate(Mode::Throttle, "load-throttled").await
}

/// The same with Secrets Manager down (every call answered 503) for over a minute.
#[tokio::test]
async fn an_outage_never_raises_the_call_rate() -> Result<()> {
    a_faulty_endpoint_never_raises_the_call_rate(Mode::Unavailable, "load-outage").await
}

async fn a_faulty_endpoint_never_raises_the_call_rate(fault: Mode, prefix: &str) -> Result<()> {
    const COUNT: usize = 10;
    const WINDOW: Duration = Duration::from_secs(40);
    let namespace = support::create_namespace(prefix, &[]).await?;
    let settings = Settings {
        sweep_mode: SweepMode::Get,
        ..Settings::default()
    };
    let (_operator, endpoint) = operator_behind(&namespace, Mode::Pass, settings).await?;
    let ca = TestCa::new("throttled CA")?;
    create_fleet(&namespace, &ca, COUNT, "10s").await?;
    wait_for("every identity Ready", TIMEOUT, || async {
        let (ready, _) = readiness(&namespace).await?;
        ensure!(ready == COUNT, "{ready} of {COUNT} Ready");
        Ok(())
    })
    .await?;
    let in_window = |from: Instant, length: Duration| {
        endpoint
            .seen()
            .iter()
            .filter(|seen| seen.at >= from && seen.at < from + length)
            .count()
    };
    // The healthy rate: one window of refreshes.
    let healthy_from = Instant::now();
    tokio::time::sleep(WINDOW).await; // a measurement window, not a condition
    let healthy = in_window(healthy_from, WINDOW);
    ensure!(healthy > 0, "no call in a healthy window");

    let secrets_before = secret_versions(&namespace).await?;
    endpoint.set_mode(fault);
    let throttled_from = Instant::now();
    // The rate collapses at once, so identities find out one by one, slowly: that is the point.
    wait_for("SourceReachable=False", TIMEOUT, || async {
        let unreachable = source_reachable_false(&namespace).await?;
        ensure!(unreachable > 0, "none unreachable yet");
        Ok(())
    })
    .await?;
    // Two windows, the first of which includes finding the rate (a few quick halvings).
    tokio::time::sleep((WINDOW * 2).saturating_sub(throttled_from.elapsed())).await; // the window
    let throttled = in_window(throttled_from, WINDOW * 2);
    let (ready, not_ready) = readiness(&namespace).await?;
    println!("healthy: {healthy} calls in {WINDOW:?}; throttled: {throttled} in twice that");
    ensure!(
        throttled <= healthy * 2,
        "{throttled} calls in two throttled windows against {healthy} in one healthy"
    );
    ensure!(
        ready == COUNT && not_ready.is_empty(),
        "Ready flipped under {fault:?}: {not_ready:?}"
    );
    ensure!(
        secret_versions(&namespace).await? == secrets_before,
        "a Secret changed under {fault:?}"
    );

    endpoint.set_mode(Mode::Pass);
    wait_for(
        "SourceReachable=True again",
        Duration::from_secs(120),
        || async {
            let unreachable = source_reachable_false(&namespace).await?;
            ensure!(unreachable == 0, "{unreachable} still unreachable");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// Each Secret's resourceVersion, by name.
async fn secret_versions(namespace: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(support::admin_client().await?, namespace);
    Ok(secrets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|secret| {
            (
                secret.metadata.name.unwrap_or_default(),
                secret.metadata.resource_version.unwrap_or_default(),
            )
        })
        .collect())
}

/// Identities whose `SourceReachable` condition is False.
async fn source_reachable_false(namespace: &str) -> Result<usize> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    Ok(identities
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|identity| {
            identity
                .status
                .as_ref()
                .and_then(|status| {
                    status
                        .conditions
                        .iter()
                        .find(|condition| condition.type_ == "SourceReachable")
                })
                .is_some_and(|condition| condition.status == "False")
        })
        .count())
}

/// SIGTERM while a cold sync is queued behind a throttled endpoint: the operator process (this package's own
/// binary) exits within the pod's grace period (30 s in the chart; `--shutdown-drain` 10 s by
/// default), and the next operator completes the sync from the cluster's state.
#[tokio::test]
async fn sigterm_during_a_cold_sync_exits_within_the_grace_period() -> Result<()> {
    const COUNT: usize = 200;
    const HANG_GUARD: Duration = Duration::from_secs(180);
    let namespace = support::create_namespace("load-sigterm", &[]).await?;
    install_crd_and_rbac().await?;
    bind_cluster_role_to(&namespace, "mtls-operator", &namespace).await?;
    let ca = TestCa::new("sigterm CA")?;
    create_fleet(&namespace, &ca, COUNT, "1h").await?;
    let base = support::aws_config().await;
    let moto = base.endpoint_url().context("no AWS endpoint")?.to_string();
    // Every call throttled: the reconciles of the cold sync are in flight, waiting for the
    // collapsed rate, when the signal comes (the worst backlog for a prompt exit).
    let endpoint = CountingEndpoint::start(&moto, Mode::Throttle).await?;
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let mut child = endpoint
        .operator_command(
            std::path::Path::new(env!("CARGO_BIN_EXE_mtls-operator")),
            &namespace,
            &kubeconfig,
        )
        .args(["--sweep-mode", "get"])
        .spawn()?;
    wait_for("the operator to start reading", TIMEOUT, || async {
        ensure!(endpoint.count(None) > 0, "no call yet");
        Ok(())
    })
    .await?;
    let (ready_at_signal, _) = readiness(&namespace).await?;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let signalled = Instant::now();
    // It must end by itself: the wait is a hang guard, not a bound (the exit time is a figure for
    // BENCHMARKS.md; the pod's grace period is 30 s).
    let exited = wait_for("the operator to exit by itself", HANG_GUARD, || {
        let status = child.try_wait();
        async move {
            match status? {
                Some(status) => Ok(status),
                None => anyhow::bail!("still running"),
            }
        }
    })
    .await;
    let exit_time = signalled.elapsed();
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = exited?;
    println!(
        "{ready_at_signal} of {COUNT} Ready at SIGTERM; exited {status} after {exit_time:.1?}"
    );
    ensure!(status.success(), "SIGTERM ended the operator with {status}");
    ensure!(ready_at_signal < COUNT, "the sync was not in progress");
    // The successor (unthrottled) completes the sync.
    let _operator = start_operator_with(&namespace, Settings::default()).await?;
    wait_for("every identity Ready", Duration::from_secs(120), || async {
        let (ready, _) = readiness(&namespace).await?;
        ensure!(ready == COUNT, "{ready} of {COUNT} Ready");
        Ok(())
    })
    .await?;
    Ok(())
}
