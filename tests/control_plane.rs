//! The operator across a restart of the control plane's kube-apiserver (etcd keeps the data), in a
//! test binary of its own: cargo runs test binaries one at a time, so no other test sees the API
//! server go away.

mod common;

use anyhow::Result;
use common::*;
use xtask::support::{self, wait_for};

/// kube-apiserver stopped and started in the middle of a rotation of 20 identities, each used by
/// its own Deployment: every identity ends Ready with its new version, and each Deployment rolled
/// exactly once.
#[tokio::test]
async fn an_apiserver_restart_during_a_mass_rotation_loses_and_doubles_nothing() -> Result<()> {
    const COUNT: usize = 20;
    let namespace = support::create_namespace("apiserver-restart", &[]).await?;
    let _operator = start_operator(&namespace).await?;
    let ca = TestCa::new("apiserver restart CA")?;
    let ids = create_identities_with_deployments(&namespace, &ca, COUNT).await?;
    for index in 0..COUNT {
        wait_ready(&namespace, &format!("client-{index}"), "True", "Synced").await?;
    }
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;

    let mut versions = Vec::new();
    for id in &ids {
        versions.push(put_source(id, &good_secret(&ca)?).await?);
    }
    wait_for("a first restart", ROLLOUT_TIMEOUT, || async {
        anyhow::ensure!(generations(&namespace).await? != before, "no restart yet");
        Ok(())
    })
    .await?;
    support::restart_apiserver().await?;

    for (index, version) in versions.iter().enumerate() {
        let name = format!("client-{index}");
        wait_rotation(&namespace, &name, version).await?;
        wait_ready(&namespace, &name, "True", "Synced").await?;
    }
    wait_all_rolled_out(&namespace).await?;
    let after = generations(&namespace).await?;
    for (name, generation) in &before {
        anyhow::ensure!(
            after.get(name) == Some(&(generation + 1)),
            "{name}: generation {generation} → {:?}, not exactly one rollout",
            after.get(name)
        );
    }
    Ok(())
}
