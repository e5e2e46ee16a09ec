//! MtlsIdentity → validated kubernetes.io/tls Secret, on the real control plane and moto, with the
//! operator running as a ServiceAccount bound to the documented ClusterRole.

mod common;
// Rotation and client interop run in this binary too: one link step each fewer.
#[path = "sync/clients.rs"]
mod clients;
#[path = "sync/rotation.rs"]
mod rotation;

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mtls_operator::api::{FINGERPRINT_ANNOTATION, MtlsIdentity, VERSION_ID_ANNOTATION};
use rcgen::ExtendedKeyUsagePurpose;
use sha2::{Digest, Sha256};
use xtask::support::{self, wait_for};

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A rustls server that requires a client certificate from `ca_pem`, and a rustls client that
/// presents `tls.crt`/`tls.key`: returns the SHA-256 of the client certificate the server saw.
async fn mutual_tls_handshake(
    ca: &TestCa,
    tls_crt: &str,
    tls_key: &str,
    ca_crt: &str,
) -> Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_crt.as_bytes()) {
        roots.add(cert?)?;
    }
    let roots = Arc::new(roots);
    let server_leaf = ca.server()?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()?;
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server_leaf.der.clone())],
            PrivateKeyDer::from_pem_slice(server_leaf.key_pem.as_bytes())?,
        )?;
    let client_chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(tls_crt.as_bytes()).collect::<Result<_, _>>()?;
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            client_chain,
            PrivateKeyDer::from_pem_slice(tls_key.as_bytes())?,
        )?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let mut tls = acceptor.accept(stream).await?;
        let seen = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| sha256_hex(cert.as_ref()))
            .context("no client certificate")?;
        let mut buffer = [0u8; 4];
        tls.read_exact(&mut buffer).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        Ok::<_, anyhow::Error>(seen)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let stream = tokio::net::TcpStream::connect(address).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, stream)
        .await?;
    tls.write_all(b"ping").await?;
    let mut reply = [0u8; 4];
    tls.read_exact(&mut reply).await?;
    ensure!(&reply == b"pong", "unexpected reply");
    server.await?
}

#[tokio::test]
async fn json_identity_becomes_a_tls_secret_that_completes_mutual_tls() -> Result<()> {
    // The CA's name is asserted below: the preamble by hand.
    let namespace = support::create_namespace("sync", &[]).await?;
    let _operator = start_operator(&namespace).await?;
    let ca = TestCa::new("partner CA")?;
    let leaf = ca.leaf(&LeafOptions::default())?;
    let secret_id = format!("{namespace}/api-client");
    let version = put_source(
        &secret_id,
        &json_secret(&leaf.cert_pem, &leaf.key_pem, &ca.pem()),
    )
    .await?;

    create_identity(
        &namespace,
        &identity("payments", &secret_id, serde_json::json!({}))?,
    )
    .await?;
    let synced = wait_ready(&namespace, "payments", "True", "Synced").await?;

    let status = synced.status.clone().context("no status")?;
    let certificate = status.certificate.context("no certificate facts")?;
    assert_eq!(certificate.sha256_fingerprint, sha256_hex(&leaf.der));
    assert_eq!(certificate.subject, "CN=payments-client");
    assert_eq!(certificate.issuer, "CN=partner CA");
    assert_eq!(
        certificate.dns_names,
        vec!["payments-client.example".to_string()]
    );
    assert!(!certificate.serial_number.is_empty());
    assert!(certificate.not_after.ends_with('Z'));
    let source = status.source.context("no source facts")?;
    assert_eq!(source.version_id, version);
    assert!(
        source.arn.starts_with("arn:aws:secretsmanager:"),
        "{}",
        source.arn
    );
    assert_eq!(status.secret_name.as_deref(), Some("payments"));
    assert_eq!(status.observed_generation, synced.metadata.generation);

    let secret = get_secret(&namespace, "payments")
        .await?
        .context("no Secret")?;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("mtls-operator")
    );
    assert_eq!(
        labels.get("mtls-operator.io/identity").map(String::as_str),
        Some("payments")
    );
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get(VERSION_ID_ANNOTATION), Some(&version));
    assert_eq!(
        annotations.get(FINGERPRINT_ANNOTATION),
        Some(&sha256_hex(&leaf.der))
    );
    let owner = secret
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default()
        .into_iter()
        .next()
        .context("no ownerReference")?;
    assert_eq!(owner.kind, "MtlsIdentity");
    assert_eq!(owner.controller, Some(true));
    assert_eq!(Some(owner.uid), synced.metadata.uid.clone());
    assert_eq!(
        secret
            .metadata
            .managed_fields
            .clone()
            .unwrap_or_default()
            .iter()
            .filter(|f| f.manager.as_deref() == Some("mtls-operator"))
            .count(),
        1,
        "written under the one field manager"
    );

    let tls_crt = secret_data(&secret, "tls.crt").context("no tls.crt")?;
    let tls_key = secret_data(&secret, "tls.key").context("no tls.key")?;
    let ca_crt = secret_data(&secret, "ca.crt").context("no ca.crt")?;
    let seen = mutual_tls_handshake(&ca, &tls_crt, &tls_key, &ca_crt).await?;
    assert_eq!(
        seen, certificate.sha256_fingerprint,
        "the server saw the synced certificate"
    );

    let event = wait_event(&namespace, "payments", "Synced").await?;
    assert_eq!(event.type_.as_deref(), Some("Normal"));

    // Deleting the identity garbage-collects its Secret (ownerReference).
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, &namespace);
    identities
        .delete("payments", &DeleteParams::foreground())
        .await?;
    wait_for("the Secret to be garbage-collected", TIMEOUT, || async {
        ensure!(
            get_secret(&namespace, "payments").await?.is_none(),
            "Secret still there"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn pem_bundle_with_separate_ca_secret_and_custom_target() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("pem").await?.parts();
    let leaf = ca.leaf(&LeafOptions::default())?;
    let bundle_id = format!("{namespace}/bundle");
    let ca_id = format!("{namespace}/ca");
    put_source(&bundle_id, &format!("{}{}", leaf.key_pem, leaf.cert_pem)).await?;
    put_source(&ca_id, &ca.pem()).await?;
    let spec = serde_json::json!({
        "source": {"secretId": bundle_id, "format": "Pem", "caSecretId": ca_id},
        "target": {"secretName": "client-tls"}
    });
    create_identity(&namespace, &identity("bundle", &bundle_id, spec)?).await?;
    wait_ready(&namespace, "bundle", "True", "Synced").await?;
    let secret = get_secret(&namespace, "client-tls")
        .await?
        .context("no Secret")?;
    assert_eq!(
        secret_data(&secret, "ca.crt").as_deref(),
        Some(ca.pem().as_str())
    );
    let tls_crt = secret_data(&secret, "tls.crt").context("no tls.crt")?;
    assert!(tls_crt.contains("BEGIN CERTIFICATE"));
    Ok(())
}

#[tokio::test]
async fn api_server_rejects_an_inconsistent_manifest_with_a_readable_message() -> Result<()> {
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("cel", &[]).await?;
    let manifest = format!(
        "apiVersion: mtls-operator.io/v1alpha1
kind: MtlsIdentity
metadata: {{name: both, namespace: {namespace}}}
spec:
  source:
    secretId: {namespace}/x
    versionStage: AWSCURRENT
    versionId: 0123456789abcdef0123456789abcdef
"
    );
    let path = std::env::temp_dir().join(format!("{namespace}.yaml"));
    std::fs::write(&path, manifest)?;
    let output = support::kubectl(&["apply", "-f", &path.display().to_string()])?;
    let _ = std::fs::remove_file(&path);
    assert!(!output.status.success(), "kubectl apply should fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("set versionStage or versionId, not both"),
        "unreadable refusal: {stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn manual_edits_are_reverted_and_foreign_secrets_are_never_touched() -> Result<()> {
    let scenario = Scenario::start("owner").await?;
    let namespace = scenario.namespace.clone();
    let (leaf, _) = scenario
        .synced("edited", "client", serde_json::json!({}))
        .await?;
    let secret_id = scenario.id("client");
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let edit = serde_json::json!({"stringData": {"tls.crt": "tampered"}});
    secrets
        .patch("edited", &PatchParams::default(), &Patch::Merge(&edit))
        .await?;
    wait_for("the edit to be reverted", TIMEOUT, || async {
        let secret = get_secret(&namespace, "edited")
            .await?
            .context("no Secret")?;
        ensure!(
            secret_data(&secret, "tls.crt").as_deref() == Some(leaf.cert_pem.as_str()),
            "tls.crt not restored yet"
        );
        Ok(())
    })
    .await?;

    // A same-named Secret that is not ours: TargetConflict, and it stays exactly as it was.
    let foreign: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "foreign"},
        "stringData": {"owner": "someone else"}
    }))?;
    let foreign = secrets.create(&PostParams::default(), &foreign).await?;
    create_identity(
        &namespace,
        &identity("foreign", &secret_id, serde_json::json!({}))?,
    )
    .await?;
    let conflicted = wait_ready(&namespace, "foreign", "False", "TargetConflict").await?;
    let message = conflicted
        .ready_condition()
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("not owned"), "{message}");
    wait_event(&namespace, "foreign", "TargetConflict").await?;
    let after = secrets.get("foreign").await?;
    assert_eq!(
        after.metadata.resource_version,
        foreign.metadata.resource_version
    );
    Ok(())
}

/// Each bad source gets its own reason and Warning Event; none writes a Secret; the operator goes on.
#[tokio::test]
async fn bad_sources_get_specific_reasons() -> Result<()> {
    let (namespace, _operator, ca) = Scenario::start("bad").await?.parts();
    let other_ca = TestCa::new("other CA")?;
    let good = ca.leaf(&LeafOptions::default())?;
    let other = ca.leaf(&LeafOptions::default())?;
    let now = time::OffsetDateTime::now_utc();
    let expired = ca.leaf(&LeafOptions {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
        ..LeafOptions::default()
    })?;
    let future = ca.leaf(&LeafOptions {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(30),
        ..LeafOptions::default()
    })?;
    let server_only = ca.leaf(&LeafOptions {
        extended_key_usages: Some(vec![ExtendedKeyUsagePurpose::ServerAuth]),
        ..LeafOptions::default()
    })?;
    let key_body: String = good
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();

    let cases: Vec<(&str, String, &str)> = vec![
        ("not-json", "certificate: nope".to_string(), "InvalidJson"),
        (
            "missing-field",
            serde_json::json!({"certificate": good.cert_pem}).to_string(),
            "MissingField",
        ),
        (
            "empty-field",
            json_secret(&good.cert_pem, "  ", &ca.pem()),
            "EmptyField",
        ),
        (
            "invalid-pem",
            json_secret(
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                &good.key_pem,
                &ca.pem(),
            ),
            "InvalidPem",
        ),
        (
            "key-mismatch",
            json_secret(&good.cert_pem, &other.key_pem, &ca.pem()),
            "KeyMismatch",
        ),
        (
            "wrong-ca",
            json_secret(&good.cert_pem, &good.key_pem, &other_ca.pem()),
            "ChainInvalid",
        ),
        (
            "expired",
            json_secret(&expired.cert_pem, &expired.key_pem, &ca.pem()),
            "Expired",
        ),
        (
            "not-yet-valid",
            json_secret(&future.cert_pem, &future.key_pem, &ca.pem()),
            "NotYetValid",
        ),
        (
            "server-only",
            json_secret(&server_only.cert_pem, &server_only.key_pem, &ca.pem()),
            "MissingClientAuth",
        ),
        (
            "encrypted-key",
            json_secret(
                &good.cert_pem,
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
                &ca.pem(),
            ),
            "EncryptedKey",
        ),
    ];
    for (name, value, _) in &cases {
        put_source(&format!("{namespace}/{name}"), value).await?;
        create_identity(
            &namespace,
            &identity(name, &format!("{namespace}/{name}"), serde_json::json!({}))?,
        )
        .await?;
    }
    // Missing in Secrets Manager, and outside the namespace's prefix.
    create_identity(
        &namespace,
        &identity(
            "absent",
            &format!("{namespace}/absent"),
            serde_json::json!({}),
        )?,
    )
    .await?;
    put_source(
        "someone-else/key",
        &json_secret(&good.cert_pem, &good.key_pem, &ca.pem()),
    )
    .await
    .ok();
    create_identity(
        &namespace,
        &identity("not-allowed", "someone-else/key", serde_json::json!({}))?,
    )
    .await?;

    // Format Pem: a bundle without a key, without a certificate, with two keys, with a DSA key.
    let dsa = "-----BEGIN DSA PRIVATE KEY-----\nMIIBuwIBAAKBgQC7\n-----END DSA PRIVATE KEY-----\n";
    let pem_cases: Vec<(&str, String, &str)> = vec![
        ("pem-no-key", good.cert_pem.clone(), "MissingPrivateKey"),
        ("pem-no-cert", good.key_pem.clone(), "MissingCertificate"),
        ("pem-two-keys", format!("{}{}{}", good.cert_pem, good.key_pem, other.key_pem), "MultipleKeys"),
        ("pem-dsa", format!("{}{dsa}", good.cert_pem), "UnsupportedKey"),
        (
            "pem-truncated",
            "-----BEGIN CERTIFICATE-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END CERTIFICATE-----\n".to_string(),
            "InvalidPem",
        ),
    ];
    for (name, value, _) in &pem_cases {
        let id = format!("{namespace}/{name}");
        put_source(&id, value).await?;
        let spec = serde_json::json!({"source": {"secretId": id, "format": "Pem"}});
        create_identity(&namespace, &identity(name, &id, spec)?).await?;
    }

    // AWS refusing or throttling (injected in front of moto, which emulates neither).
    for name in ["fault-access-denied", "fault-throttled"] {
        create_identity(
            &namespace,
            &identity(name, &format!("{namespace}/{name}"), serde_json::json!({}))?,
        )
        .await?;
    }

    let mut expected: Vec<(String, &str)> = cases
        .iter()
        .chain(pem_cases.iter())
        .map(|(n, _, r)| (n.to_string(), *r))
        .collect();
    expected.push(("fault-access-denied".into(), "AccessDenied"));
    expected.push(("fault-throttled".into(), "Throttled"));
    expected.push(("absent".into(), "SourceNotFound"));
    expected.push(("not-allowed".into(), "SourceNotAllowed"));
    for (name, reason) in &expected {
        let identity = wait_ready(&namespace, name, "False", reason).await?;
        let message = identity
            .ready_condition()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(!message.is_empty(), "{name}: empty message");
        assert!(
            !message.contains(&key_body[..40]),
            "{name}: key material in the message"
        );
        let event = wait_event(&namespace, name, reason).await?;
        assert_eq!(event.type_.as_deref(), Some("Warning"), "{name}");
        let note = event.note.unwrap_or_default();
        assert!(
            !note.contains(&key_body[..40]),
            "{name}: key material in the Event"
        );
        if get_secret(&namespace, name).await?.is_some() {
            bail!("{name}: a Secret was written from bad input");
        }
    }
    // `mtls-operator check` on the same secrets, before anyone would create an identity: the same
    // reasons (the policy and the injected AWS faults are the operator's, not the material's).
    let checkable = expected
        .iter()
        .filter(|(name, _)| !name.starts_with("fault-") && name != "not-allowed");
    for (name, reason) in checkable {
        let format = if name.starts_with("pem-") {
            "pem"
        } else {
            "json"
        };
        let id = format!("{namespace}/{name}");
        let (ok, report) = check(&["--secret-id", &id, "--format", format])?;
        ensure!(!ok, "{name}: check passed bad material: {report}");
        ensure!(report["reason"] == *reason, "{name}: {report}");
        ensure!(
            !report.to_string().contains(&key_body[..40]),
            "{name}: key material in the report"
        );
    }
    Ok(())
}

/// `mtls-operator check ARGS --output json` as its own process, with the environment's AWS
/// settings: whether it exited 0, and its report.
fn check(args: &[&str]) -> Result<(bool, serde_json::Value)> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mtls-operator"));
    command.arg("check").args(args).args(["--output", "json"]);
    for (name, value) in support::environment().variables() {
        command.env(name, value);
    }
    let output = command.output()?;
    let report = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "check {args:?} printed no JSON report: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((output.status.success(), report))
}

/// `mtls-operator check` on good material, from each kind of file and from Secrets Manager: exit 0
/// and the certificate's facts (the same fingerprint the operator would put in status).
#[tokio::test]
async fn check_reports_the_facts_of_good_material_from_files_and_secrets_manager() -> Result<()> {
    let ca = TestCa::new("check CA")?;
    let leaf = ca.leaf(&LeafOptions::default())?;
    let fingerprint = hex::encode(Sha256::digest(&leaf.der));
    let dir = support::environment()
        .dir
        .join(format!("check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = |name: &str, content: &str| -> Result<String> {
        let path = dir.join(name);
        std::fs::write(&path, content)?;
        Ok(path.display().to_string())
    };
    let cert = file("cert.pem", &leaf.cert_pem)?;
    let key = file("key.pem", &leaf.key_pem)?;
    let ca_file = file("ca.pem", &ca.pem())?;
    let bundle = file("bundle.pem", &format!("{}{}", leaf.cert_pem, leaf.key_pem))?;
    let secret_value = json_secret(&leaf.cert_pem, &leaf.key_pem, &ca.pem());
    let json = file("secret.json", &secret_value)?;
    let namespace = support::create_namespace("check", &[]).await?;
    let id = format!("{namespace}/client");
    let version = put_source(&id, &secret_value).await?;
    // A .p12 as a partner would send it (OpenSSL's defaults), with its password in a file, and
    // the same in the JSON form a Pkcs12 source may hold.
    let password = file("p12-password", "from-the-partner")?;
    let exported = std::process::Command::new("openssl")
        .current_dir(&dir)
        .args(["pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem"])
        .args(["-certfile", "ca.pem", "-passout", "file:p12-password"])
        .args(["-out", "client.p12"])
        .output()?;
    ensure!(
        exported.status.success(),
        "openssl pkcs12 -export: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let p12 = dir.join("client.p12").display().to_string();
    let p12_json = file(
        "p12.json",
        &serde_json::json!({
            "pkcs12": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, std::fs::read(&p12)?),
            "password": "from-the-partner",
        })
        .to_string(),
    )?;
    let inputs: [Vec<&str>; 6] = [
        vec!["--cert", &cert, "--key", &key, "--ca", &ca_file],
        vec!["--bundle", &bundle, "--ca", &ca_file],
        vec!["--json", &json],
        vec!["--pkcs12", &p12, "--password-file", &password],
        vec!["--pkcs12", &p12_json],
        vec!["--secret-id", &id],
    ];
    for args in inputs {
        let (ok, report) = check(&args)?;
        ensure!(ok && report["ok"] == true, "{args:?}: {report}");
        let facts = &report["certificate"];
        ensure!(
            facts["sha256Fingerprint"] == fingerprint.as_str(),
            "{report}"
        );
        ensure!(
            facts["dnsNames"][0] == "payments-client.example",
            "{report}"
        );
        ensure!(facts["extendedKeyUsage"][0] == "clientAuth", "{report}");
        ensure!(facts["ca"].as_array().map(Vec::len) == Some(1), "{report}");
        ensure!(
            facts["key"].as_str().is_some_and(|k| !k.is_empty()),
            "{report}"
        );
    }
    let (_, report) = check(&["--secret-id", &id])?;
    ensure!(
        report["source"]["versionId"] == version.as_str(),
        "{report}"
    );
    // For people: the facts and the verdict in text.
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_mtls-operator"))
        .args(["check", "--cert", &cert, "--key", &key])
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(text.contains(&format!("sha256:{fingerprint}")), "{text}");
    ensure!(text.contains("OK: the operator would sync"), "{text}");
    // A key that is not the certificate's: exit 1 with the operator's reason.
    let other = file("other-key.pem", &ca.leaf(&LeafOptions::default())?.key_pem)?;
    let (ok, report) = check(&["--cert", &cert, "--key", &other])?;
    ensure!(!ok && report["reason"] == "KeyMismatch", "{report}");
    ensure!(
        report["certificate"]["sha256Fingerprint"] == fingerprint.as_str(),
        "{report}"
    );
    Ok(())
}

/// `check --cert K --key C` with the two files swapped is refused with the reason the operator
/// gives an identity whose source is the JSON built from those same two files (as the README's
/// quickstart builds it); before, the files were read as one PEM bundle and the pair passed.
#[tokio::test]
async fn check_holds_each_file_to_its_role_as_the_operator_does() -> Result<()> {
    let scenario = Scenario::start("check-roles").await?;
    let leaf = scenario.ca.leaf(&LeafOptions::default())?;
    let dir = tempdir("check-roles")?;
    let file = |name: &str, content: &str| -> Result<String> {
        let path = dir.join(name);
        std::fs::write(&path, content)?;
        Ok(path.display().to_string())
    };
    let cert = file("client.crt", &leaf.cert_pem)?;
    let key = file("client.key", &leaf.key_pem)?;
    let ca = file("ca.crt", &scenario.ca.pem())?;
    let (ok, _) = check(&["--cert", &cert, "--key", &key, "--ca", &ca])?;
    ensure!(ok, "the files in their roles pass");
    // What the quickstart's jq stores from the swapped files, synced by the operator.
    put_source(
        &scenario.id("swapped"),
        &json_secret(&leaf.key_pem, &leaf.cert_pem, &scenario.ca.pem()),
    )
    .await?;
    scenario
        .create("swapped", "swapped", serde_json::json!({}))
        .await?;
    let identities: Api<MtlsIdentity> =
        Api::namespaced(support::admin_client().await?, &scenario.namespace);
    let refused = wait_for(
        "the operator to refuse the swapped JSON",
        TIMEOUT,
        || async {
            let identity = identities.get("swapped").await?;
            let ready = identity
                .ready_condition()
                .filter(|ready| ready.status == "False")
                .context("not refused yet")?;
            anyhow::Ok(ready.reason.as_str().to_string())
        },
    )
    .await?;
    for swapped in [
        vec!["--cert", &key, "--key", &cert, "--ca", &ca],
        vec!["--cert", &key, "--key", &cert],
    ] {
        let (ok, report) = check(&swapped)?;
        ensure!(!ok && report["ok"] == false, "{swapped:?}: {report}");
        ensure!(
            report["reason"] == refused.as_str(),
            "{swapped:?}: check says {}, the operator {refused}",
            report["reason"]
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_good_identity_whose_source_turns_bad_keeps_the_last_good_secret() -> Result<()> {
    let scenario = Scenario::start("keep").await?;
    let (namespace, ca) = (scenario.namespace.as_str(), &scenario.ca);
    let (good, good_version) = scenario
        .synced("keep", "client", serde_json::json!({}))
        .await?;
    let other = ca.leaf(&LeafOptions::default())?;
    let secret_id = scenario.id("client");
    let before = get_secret(namespace, "keep").await?.context("no Secret")?;

    // A new version whose key does not match its certificate.
    put_source(
        &secret_id,
        &json_secret(&good.cert_pem, &other.key_pem, &ca.pem()),
    )
    .await?;
    let failed = wait_ready(namespace, "keep", "False", "KeyMismatch").await?;
    let after = get_secret(namespace, "keep")
        .await?
        .context("the Secret was deleted")?;
    assert_eq!(after.data, before.data, "the last good Secret must stay");
    assert_eq!(
        after
            .metadata
            .annotations
            .unwrap_or_default()
            .get(VERSION_ID_ANNOTATION),
        Some(&good_version)
    );
    // Status still describes the certificate in the Secret.
    let status = failed.status.context("no status")?;
    assert_eq!(status.source.map(|s| s.version_id), Some(good_version));

    // A good version again: synced.
    let fixed = ca.leaf(&LeafOptions::default())?;
    let fixed_version = put_source(
        &secret_id,
        &json_secret(&fixed.cert_pem, &fixed.key_pem, &ca.pem()),
    )
    .await?;
    let synced = wait_ready(namespace, "keep", "True", "Synced").await?;
    assert_eq!(
        synced.status.and_then(|s| s.source).map(|s| s.version_id),
        Some(fixed_version)
    );
    Ok(())
}

/// A fleet's first sync publishes its `Synced` Events within `--synced-event-burst` and
/// `--synced-event-rate` (one per identity at once was a third of the API server's work at 10,000
/// identities, BENCHMARKS.md W1). The rest are counted in a metric, every identity still says
/// `Synced` in its status, and Warning and `Rotated` Events are never held back.
#[tokio::test]
async fn synced_events_beyond_the_budget_are_counted_and_warnings_and_rotations_still_published()
-> Result<()> {
    use mtls_operator::controller::events::SyncedEventBudget;
    let settings = mtls_operator::controller::Settings {
        synced_events: Arc::new(SyncedEventBudget::new(0.0, 3, std::time::Instant::now())),
        ..Default::default()
    };
    let scenario = Scenario::start_with("event-budget", settings).await?;
    let namespace = scenario.namespace.clone();
    let names: Vec<String> = (0..8).map(|i| format!("client-{i}")).collect();
    for name in &names {
        scenario.put_good(name).await?;
        create_identity(
            &namespace,
            &identity(name, &scenario.id(name), serde_json::json!({}))?,
        )
        .await?;
    }
    for name in &names {
        wait_ready(&namespace, name, "True", "Synced").await?;
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(support::admin_client().await?, &namespace);
    let published = |reason: &'static str| {
        let events = events.clone();
        async move {
            anyhow::Ok(
                events
                    .list(&Default::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|event| event.reason.as_deref() == Some(reason))
                    .count(),
            )
        }
    };
    let skipped = "mtls_synced_events_skipped_total";
    wait_for("the burst published, the rest counted", TIMEOUT, || async {
        let (synced, held) = (
            published("Synced").await?,
            metric(&scenario.operator, skipped),
        );
        ensure!(
            synced == 3 && held == 5,
            "{synced} Synced Events, {held} skipped"
        );
        Ok(())
    })
    .await?;

    // The budget is spent: a failure still gets its Warning, a rotation its Event.
    let now = time::OffsetDateTime::now_utc();
    let expired = scenario.ca.leaf(&LeafOptions {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
        ..LeafOptions::default()
    })?;
    let expired_id = scenario.id("expired");
    put_source(
        &expired_id,
        &json_secret(&expired.cert_pem, &expired.key_pem, &scenario.ca.pem()),
    )
    .await?;
    create_identity(
        &namespace,
        &identity("expired", &expired_id, serde_json::json!({}))?,
    )
    .await?;
    wait_ready(&namespace, "expired", "False", "Expired").await?;
    wait_event(&namespace, "expired", "Expired").await?;
    let (_, version) = scenario.put_good(&names[0]).await?;
    wait_rotation(&namespace, &names[0], &version).await?;
    wait_event(&namespace, &names[0], "Rotated").await?;
    ensure!(
        published("Synced").await? == 3,
        "more Synced Events than the burst"
    );
    Ok(())
}
