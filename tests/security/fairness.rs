//! (A module of the security test binary.) Availability between namespaces under attack (#23):
//! what a tenant of `payments` can write must not cost the operator work the other namespaces pay
//! for, and what it breaks of its own is repaired or refused with a reason.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use mtls_operator::api::{FINGERPRINT_ANNOTATION, VERSION_ID_ANNOTATION};
use mtls_operator::controller::Settings;
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
    wait_for("the victim's rotation", TIMEOUT, || async {
        let secret = get_secret(&billing, "client")
            .await?
            .context("no victim Secret")?;
        let version = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(VERSION_ID_ANNOTATION));
        ensure!(version == Some(&rotated), "still at {version:?}");
        Ok(())
    })
    .await?;
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
