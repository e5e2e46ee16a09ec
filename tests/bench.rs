//! Benchmarks (ignored by the suite; figures go to BENCHMARKS.md). Run one environment and then:
//!
//! ```sh
//! eval "$(cargo xtask testenv up)"
//! cargo test --release --test bench -- --ignored --nocapture --test-threads=1
//! cargo xtask testenv down
//! ```
//!
//! `MTLS_BENCH_IDENTITIES` sets the fleet size (default 1000).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::*;
use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use mtls_operator::api::MtlsIdentity;
use mtls_operator::controller::{self, Settings};
use mtls_operator::metrics::Metrics;
use mtls_operator::source::SecretsManagerSource;
use tokio::sync::oneshot;
use xtask::support::{self, wait_for};

fn fleet_size() -> usize {
    std::env::var("MTLS_BENCH_IDENTITIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

fn ready_count(identities: &[MtlsIdentity]) -> usize {
    identities
        .iter()
        .filter(|i| i.ready_condition().is_some_and(|c| c.status == "True"))
        .count()
}

/// W1 (cold fleet to Ready), W2 (Secrets Manager calls per identity per refresh cycle) and W3
/// (rotation latency: new AWSCURRENT to Secret updated), on one fleet.
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn fleet_sync_polling_cost_and_rotation_latency() -> Result<()> {
    let count = fleet_size();
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("bench", &[]).await?;
    let ca = TestCa::new("bench CA")?;
    let value = good_secret(&ca)?;
    // Sources first (not timed): the fleet's material exists before the identities.
    let sm = support::secrets_manager().await;
    futures::stream::iter(0..count)
        .map(|index| {
            let sm = sm.clone();
            let name = format!("{namespace}/client-{index}");
            let value = value.clone();
            async move {
                sm.create_secret()
                    .name(name)
                    .secret_string(value)
                    .send()
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let refresh = Duration::from_secs(60);
    let client = support::admin_client().await?;
    let aws = support::aws_config().await;
    let source = Arc::new(SecretsManagerSource::new(aws.clone()));
    let (stop, stopped) = oneshot::channel::<()>();
    let settings = Settings {
        namespaces: vec![namespace.clone()],
        ..Settings::default()
    }
    .with_aws_defaults(&aws)
    .await;
    tokio::spawn(controller::run(
        client.clone(),
        source.clone(),
        settings,
        Arc::new(Metrics::new()),
        async {
            let _ = stopped.await;
        },
    ));

    // W1: create every identity, then wait until all are Ready.
    let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|index| {
            let identities = identities.clone();
            let namespace = namespace.clone();
            async move {
                let spec =
                    serde_json::json!({"refreshInterval": format!("{}s", refresh.as_secs())});
                let object = identity(
                    &format!("client-{index}"),
                    &format!("{namespace}/client-{index}"),
                    spec,
                )?;
                identities.create(&PostParams::default(), &object).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let created = started.elapsed();
    wait_for(
        "every identity Ready",
        Duration::from_secs(1800),
        || async {
            let ready = ready_count(&identities.list(&ListParams::default()).await?.items);
            ensure!(ready == count, "{ready} of {count} Ready");
            Ok(())
        },
    )
    .await?;
    let all_ready = started.elapsed();
    println!(
        "W1: {count} identities created in {created:.1?}, all Ready after {all_ready:.1?} ({:.0} identities/s)",
        count as f64 / all_ready.as_secs_f64()
    );

    // W2: calls over two refresh cycles of a steady fleet.
    let calls_before = source.calls();
    let window = refresh * 2;
    tokio::time::sleep(window).await; // measuring a rate over a fixed window, not waiting for a condition
    let calls = source.calls() - calls_before;
    let cycles = window.as_secs_f64() / refresh.as_secs_f64();
    println!(
        "W2: {calls} GetSecretValue calls in {window:?} = {:.3} calls per identity per refresh cycle",
        calls as f64 / count as f64 / cycles
    );

    // W3: rotate one identity; time from PutSecretValue to the Secret carrying the new version.
    let target = format!("{namespace}/client-0");
    let rotated_at = Instant::now();
    let version = put_source(&target, &good_secret(&ca)?).await?;
    wait_for("the rotated Secret", Duration::from_secs(300), || async {
        let secret = get_secret(&namespace, "client-0").await?;
        let annotations = secret
            .and_then(|s| s.metadata.annotations)
            .unwrap_or_default();
        ensure!(
            annotations.get(mtls_operator::api::VERSION_ID_ANNOTATION) == Some(&version),
            "not yet"
        );
        Ok(())
    })
    .await?;
    println!(
        "W3: rotation to Secret updated in {:.1?} (refreshInterval {refresh:?}: detection is polling)",
        rotated_at.elapsed()
    );
    let _ = stop.send(());
    Ok(())
}
