//! The operator across a restart of the control plane's kube-apiserver (etcd keeps the data), in a
//! test binary of its own: cargo runs test binaries one at a time, so no other test sees the API
//! server go away.

mod common;

use anyhow::{Result, ensure};
use common::endpoint::Mode;
use common::*;
use xtask::support;

/// kube-apiserver stopped and started in the middle of a rotation of 20 identities, each used by
/// its own Deployment: every identity ends Ready with its new version, and each Deployment rolled
/// exactly once.
#[tokio::test]
async fn an_apiserver_restart_during_a_mass_rotation_loses_and_doubles_nothing() -> Result<()> {
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
