//! The operator across a restart of the control plane's kube-apiserver (etcd keeps the data), in a
//! test binary of its own: cargo runs test binaries one at a time, so no other test sees the API
//! server go away.

mod common;

use anyhow::Result;
use common::*;
use xtask::support;

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
    let (before, versions) = start_mass_rotation(&namespace, &ca, &ids).await?;
    support::restart_apiserver().await?;
    finish_mass_rotation(&namespace, &versions, &before).await
}
