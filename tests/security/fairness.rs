//! (A module of the security test binary.) Availability between namespaces under attack (#23):
//! what a tenant of `payments` can write must not cost the operator work the other namespaces pay
//! for, and what it breaks of its own is repaired or refused with a reason.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use mtls_operator::api::{FINGERPRINT_ANNOTATION, VERSION_ID_ANNOTATION};
use mtls_operator::controller::Settings;
use mtls_operator::source::SecretsManagerSource;
use sha2::{Digest, Sha256};
use xtask::support::{self, wait_for};

use crate::common::*;

const PASSWORD: &str = "keystore-pass-1";

fn keystore_spec() -> serde_json::Value {
    serde_json::json!({"refreshInterval": "1s", "target": {"keystores": {"pkcs12": {
        "passwordSecretRef": {"name": "keystore-pass", "key": "password"}}}}})
}

/// `openssl pkcs12 -export` of `leaf` under `password` with `iterations` for both the encryption
/// and the MAC (OpenSSL is native: making a costly file is cheap for the attacker too).
fn openssl_pkcs12(
    dir: &std::path::Path,
    leaf: &Leaf,
    password: &str,
    iterations: u32,
) -> Result<Vec<u8>> {
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem)?;
    std::fs::write(dir.join("key.pem"), &leaf.key_pem)?;
    let out = dir.join("forged.p12");
    let iterations = iterations.to_string();
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(["pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem"])
        .args(["-iter", &iterations, "-maciter", "-passout"])
        .arg(format!("pass:{password}"))
        .arg("-out")
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (it must be installed on the test machine)")?;
    ensure!(
        output.status.success(),
        "openssl pkcs12 -export: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(std::fs::read(out)?)
}

fn keystore_bytes(secret: &Secret) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()?
        .get("keystore.p12")
        .map(|value| value.0.clone())
}

/// Whether `secret`'s keystore opens with the password and holds the certificate its fingerprint
/// annotation names (the one the operator synced).
fn holds_the_synced_certificate(secret: &Secret) -> bool {
    let Some(keystore) = keystore_bytes(secret) else {
        return false;
    };
    let Ok(material) = mtls_operator::pki::keystore::read_pkcs12(&keystore, PASSWORD) else {
        return false;
    };
    let fingerprint = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(FINGERPRINT_ANNOTATION));
    material
        .chain
        .first()
        .is_some_and(|leaf| Some(&hex::encode(Sha256::digest(leaf.as_ref()))) == fingerprint)
}

/// Waits until Secret `name`'s keystore is no longer `forged` but the operator's own again.
async fn wait_repaired(namespace: &str, name: &str, forged: &[u8]) -> Result<()> {
    wait_for(
        &format!("{namespace}/{name}'s forged keystore repaired"),
        TIMEOUT,
        || async {
            let secret = get_secret(namespace, name).await?.context("no Secret")?;
            ensure!(
                keystore_bytes(&secret).as_deref() != Some(forged),
                "still forged"
            );
            ensure!(
                holds_the_synced_certificate(&secret),
                "not the synced certificate"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn a_forged_costly_keystore_is_repaired_unopened_and_other_namespaces_rotate() -> Result<()> {
    let payments = support::create_namespace("kdf-attacker", &[]).await?;
    let billing = support::create_namespace("kdf-victim", &[]).await?;
    let _operator = start_operator_for(&[&payments, &billing], Settings::default()).await?;
    let ca = TestCa::new("kdf CA")?;
    let admin = support::admin_client().await?;
    let attacker_secrets: Api<Secret> = Api::namespaced(admin.clone(), &payments);
    let password: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "keystore-pass"}, "stringData": {"password": PASSWORD}
    }))?;
    attacker_secrets
        .create(&Default::default(), &password)
        .await?;
    // Four identities of the attacker with keystores, at the fastest refresh allowed; one victim.
    let attacker_source = format!("{payments}/client");
    put_source(&attacker_source, &good_secret(&ca)?).await?;
    for n in 0..4 {
        let name = format!("client-{n}");
        create_identity(
            &payments,
            &identity(&name, &attacker_source, keystore_spec())?,
        )
        .await?;
    }
    let victim_source = format!("{billing}/client");
    put_source(&victim_source, &good_secret(&ca)?).await?;
    create_identity(
        &billing,
        &identity("client", &victim_source, serde_json::json!({}))?,
    )
    .await?;
    for n in 0..4 {
        wait_ready(&payments, &format!("client-{n}"), "True", "Synced").await?;
    }
    wait_ready(&billing, "client", "True", "Synced").await?;

    // The attack: each keystore replaced by one that opens with the real password but holds the
    // attacker's certificate, with a million KDF iterations for the MAC and the encryption (what
    // p12-keystore would still open: seconds of CPU per open), the operator's annotations kept.
    let dir = tempdir("kdf-attack")?;
    let attacker_leaf = TestCa::new("attacker CA")?.leaf(&LeafOptions::default())?;
    let forged = openssl_pkcs12(&dir, &attacker_leaf, PASSWORD, 1_000_000)?;
    ensure!(
        mtls_operator::pki::keystore::check_pkcs12_cost(&forged).is_err(),
        "the forged keystore must be one the operator would refuse to open as a source"
    );
    for n in 0..4 {
        let patch = serde_json::json!({"data": {"keystore.p12": ByteString(forged.clone())}});
        attacker_secrets
            .patch(
                &format!("client-{n}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    // A rotation in the victim's namespace is detected and synced while the attack goes on.
    let rotated = put_source(&victim_source, &good_secret(&ca)?).await?;
    wait_secret_version("the victim's rotation", &billing, "client", &rotated).await?;
    // Every forged keystore is repaired: the operator's own again, with the synced certificate.
    for n in 0..4 {
        wait_repaired(&payments, &format!("client-{n}"), &forged).await?;
    }
    // A cheap forgery that opens with the password but holds another certificate (before, never
    // repaired: it "opened") is repaired too.
    let cheap = openssl_pkcs12(&dir, &attacker_leaf, PASSWORD, 2048)?;
    let patch = serde_json::json!({"data": {"keystore.p12": ByteString(cheap.clone())}});
    attacker_secrets
        .patch("client-0", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_repaired(&payments, "client-0", &cheap).await?;
    wait_ready(&payments, "client-0", "True", "Synced").await?;
    Ok(())
}

#[tokio::test]
async fn a_pkcs12_source_asking_for_too_many_iterations_is_refused_unopened() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("kdf-source").await?.parts();
    let dir = tempdir("kdf-source")?;
    let leaf = ca.leaf(&LeafOptions::default())?;
    let costly = openssl_pkcs12(&dir, &leaf, "source-pass", 700_000)?;
    let id = format!("{namespace}/costly");
    let value = serde_json::json!({
        "pkcs12": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &costly),
        "password": "source-pass",
    });
    put_source(&id, &value.to_string()).await?;
    create_identity(
        &namespace,
        &identity(
            "costly",
            &id,
            serde_json::json!({"source": {"secretId": id, "format": "Pkcs12"}}),
        )?,
    )
    .await?;
    let status = wait_ready(&namespace, "costly", "False", "InvalidPkcs12").await?;
    let message = format!("{status:?}");
    ensure!(message.contains("600000"), "the bound is named: {message}");
    ensure!(
        get_secret(&namespace, "costly").await?.is_none(),
        "nothing written"
    );
    // The same file at a sane count syncs.
    let sane = openssl_pkcs12(&dir, &leaf, "source-pass", 10_000)?;
    let value = serde_json::json!({
        "pkcs12": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &sane),
        "password": "source-pass",
    });
    put_source(&id, &value.to_string()).await?;
    wait_ready(&namespace, "costly", "True", "Synced").await?;
    Ok(())
}

/// The value of gauge or counter `name` (without labels) in the operator's metrics.
fn metric(operator: &Operator, name: &str) -> Option<f64> {
    operator.metrics.encode().lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

/// Whether a request seen at the endpoint reads a value.
fn is_read(seen: &endpoint::Seen) -> bool {
    matches!(
        seen.operation.as_str(),
        "GetSecretValue" | "BatchGetSecretValue"
    )
}

/// Hole 2: a namespace asks for more version checks than the rate grants (40 secrets checked every
/// second, against 4 calls a second). Before, the sweep fell behind, the "unconfirmed for two
/// intervals" fallback read the attacker's values, reads went strictly before checks, and no other
/// namespace's rotation was detected any more. Now the sweep is only behind (and says so), it
/// causes no read, and the victim's check keeps its turn.
#[tokio::test]
async fn a_namespace_whose_checks_outrun_the_rate_neither_reads_nor_delays_others() -> Result<()> {
    let endpoint = counting_endpoint(endpoint::Mode::Pass).await?;
    let payments = support::create_namespace("sweep-attacker", &[]).await?;
    let billing = support::create_namespace("sweep-victim", &[]).await?;
    let aws = endpoint.aws_config(&support::aws_config().await);
    let source = SecretsManagerSource::new(aws.clone()).with_max_calls_per_second(4.0);
    let settings = Settings {
        sweep_interval: Duration::from_secs(10),
        ..Settings::default()
    };
    let operator = start_operator_on(&[&payments, &billing], settings, aws, source).await?;
    let ca = TestCa::new("sweep CA")?;
    let mut attacker_ids = Vec::new();
    for n in 0..40 {
        let id = format!("{payments}/client-{n}");
        put_source(&id, &good_secret(&ca)?).await?;
        let fast = serde_json::json!({"refreshInterval": "1s"});
        create_identity(&payments, &identity(&format!("client-{n}"), &id, fast)?).await?;
        attacker_ids.push(id);
    }
    let victim_source = format!("{billing}/client");
    put_source(&victim_source, &good_secret(&ca)?).await?;
    let hourly = serde_json::json!({"refreshInterval": "1h"});
    create_identity(&billing, &identity("client", &victim_source, hourly)?).await?;
    for n in 0..40 {
        wait_ready(&payments, &format!("client-{n}"), "True", "Synced").await?;
    }
    wait_ready(&billing, "client", "True", "Synced").await?;
    let synced = std::time::Instant::now();

    // The victim's secret rotates while the attacker's checks are ten times what the rate grants.
    let rotated = put_source(&victim_source, &good_secret(&ca)?).await?;
    wait_secret_version("the victim's rotation", &billing, "client", &rotated).await?;
    let backlog = metric(&operator, "mtls_sweep_backlog").unwrap_or_default();
    ensure!(backlog > 0.0, "the sweep is behind and says so: {backlog}");
    let attacker_reads = endpoint
        .requests_for(&attacker_ids)
        .iter()
        .filter(|seen| seen.at > synced && is_read(seen))
        .count();
    ensure!(
        attacker_reads == 0,
        "{attacker_reads} reads of unchanged secrets: a sweep that is behind turned into reads"
    );
    let checks = endpoint
        .requests_for(&attacker_ids)
        .iter()
        .filter(|seen| seen.at > synced && seen.operation == "DescribeSecret")
        .count();
    ensure!(checks > 0, "the attacker's secrets are still checked");
    Ok(())
}

/// The source version Secret `name` was written from.
async fn secret_version(namespace: &str, name: &str) -> Result<Option<String>> {
    let secret = get_secret(namespace, name).await?.context("no Secret")?;
    Ok(secret
        .metadata
        .annotations
        .and_then(|mut annotations| annotations.remove(VERSION_ID_ANNOTATION)))
}

/// Counts Secrets Manager calls at the endpoint over `window`.
async fn calls_during(endpoint: &endpoint::CountingEndpoint, window: Duration) -> usize {
    let before = endpoint.count(None);
    // A measurement window, not a wait for a condition: the rate over it is what is asserted.
    tokio::time::sleep(window).await;
    endpoint.count(None) - before
}

/// Hole 6: every read refused by KMS, then every call denied (a role missing its permissions). The
/// call rate stays at the healthy fleet's (before: 27 times it, a tight loop of DescribeSecret),
/// nothing is lost, and everything syncs again once the role is fixed.
#[tokio::test]
async fn persistent_denials_cost_no_more_calls_than_a_healthy_fleet() -> Result<()> {
    let endpoint = counting_endpoint(endpoint::Mode::Pass).await?;
    let namespace = support::create_namespace("denied-loop", &[]).await?;
    let _operator = start_operator_through(&endpoint, &[&namespace], Settings::default()).await?;
    let ca = TestCa::new("denied-loop CA")?;
    let every_ten_seconds = serde_json::json!({"refreshInterval": "10s"});
    let mut ids = Vec::new();
    for n in 0..10 {
        let id = format!("{namespace}/client-{n}");
        put_source(&id, &good_secret(&ca)?).await?;
        create_identity(
            &namespace,
            &identity(&format!("client-{n}"), &id, every_ten_seconds.clone())?,
        )
        .await?;
        ids.push(id);
    }
    for n in 0..10 {
        wait_ready(&namespace, &format!("client-{n}"), "True", "Synced").await?;
    }
    let window = Duration::from_secs(30);
    let healthy = calls_during(&endpoint, window).await;
    // What a healthy fleet costs by construction: one check per secret per 10 s (the measured
    // figure depends on where the window falls in the identities' phases).
    let cadence_bound = ids.len() * 3 + 5;
    ensure!(
        healthy <= cadence_bound,
        "{healthy} calls healthy in {window:?}"
    );

    // KMS refuses the reads (DecryptionFailure) while checks work, and every secret rotates: each
    // identity's read fails and is retried at its cadence, doubling, not in a loop.
    let mut synced_versions = Vec::new();
    for n in 0..10 {
        synced_versions.push(
            secret_version(&namespace, &format!("client-{n}"))
                .await?
                .context("synced")?,
        );
    }
    for operation in ["GetSecretValue", "BatchGetSecretValue"] {
        endpoint.deny_with(operation, "DecryptionFailure");
    }
    let rotated_at = std::time::Instant::now();
    for id in &ids {
        put_source(id, &good_secret(&ca)?).await?;
    }
    let kms = calls_during(&endpoint, window).await;
    let since_rotation = |id: &String, read: bool| {
        endpoint
            .requests_for(std::slice::from_ref(id))
            .iter()
            .filter(|seen| seen.at > rotated_at && is_read(seen) == read)
            .count()
    };
    let kms_reads: usize = ids.iter().map(|id| since_rotation(id, true)).sum();
    let kms_checks: usize = ids.iter().map(|id| since_rotation(id, false)).sum();
    ensure!(
        kms_reads > 0,
        "the rotations were seen and their reads refused"
    );
    // Checks keep the healthy pace; each identity's refused read is retried at its cadence,
    // doubling (after 10 s, 10 s, 20 s, ...: at most 3 in 30 s, plus one for phase), not in a loop.
    ensure!(
        kms_checks <= cadence_bound,
        "{kms_checks} version checks while KMS refused the reads, against {healthy} healthy"
    );
    for id in &ids {
        let reads = since_rotation(id, true);
        ensure!(reads <= 4, "{id}: {reads} refused reads in {window:?}");
    }
    // Nothing lost: each identity says AccessDenied, and its last good Secret stays in place.
    for (n, before) in synced_versions.iter().enumerate() {
        let name = format!("client-{n}");
        wait_ready(&namespace, &name, "False", "AccessDenied").await?;
        ensure!(
            secret_version(&namespace, &name).await?.as_ref() == Some(before),
            "{name}'s last good Secret was kept"
        );
    }

    // Every call denied: the role lost its permissions.
    for operation in ["DescribeSecret", "GetSecretValue", "BatchGetSecretValue"] {
        endpoint.deny(operation);
    }
    let denied = calls_during(&endpoint, window).await;
    ensure!(
        // One more per identity: its failing read's retry may fall into the window too.
        denied <= cadence_bound + ids.len(),
        "{denied} calls in {window:?} while denied, against {healthy} healthy"
    );

    // The role is fixed: every identity syncs its secret's current version once its backed-off
    // check comes round (at most a few minutes of backoff, well inside the wait).
    endpoint.allow_all();
    for (n, id) in ids.iter().enumerate() {
        let name = format!("client-{n}");
        let current = put_source(id, &good_secret(&ca)?).await?;
        wait_for(
            &format!("{name} synced after the fix"),
            3 * TIMEOUT,
            || async {
                let version = secret_version(&namespace, &name).await?;
                ensure!(version.as_ref() == Some(&current), "still at {version:?}");
                Ok(())
            },
        )
        .await?;
    }
    println!(
        "calls in {window:?}: healthy {healthy}, KMS refusing reads {kms} ({kms_checks} checks, \
         {kms_reads} reads), all denied {denied}"
    );
    Ok(())
}
