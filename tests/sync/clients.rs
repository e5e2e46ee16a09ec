//! (A module of the sync test binary.) Outputs every client can use, proven with real clients on the real control plane and moto:
//! cert-manager's `additionalOutputFormats` (`tls-combined.pem`, `key.der`) used by OpenSSL for a
//! mutual-TLS handshake, and rotated together with `tls.crt` in one Secret write.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use xtask::support::{self, wait_for};

fn formats_spec() -> serde_json::Value {
    serde_json::json!({"target": {
        "additionalOutputFormats": [{"type": "CombinedPEM"}, {"type": "DER"}],
        "keystores": {"pkcs12": {"passwordSecretRef": {"name": "keystore-pass", "key": "password"}}}
    }})
}

/// The keystore password Secret, labelled as Helm labels what it makes (password Secrets often
/// come from a chart): another manager's label must not hide its edits from the operator.
async fn create_password_secret(namespace: &str, password: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, namespace);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "keystore-pass", "labels": {"app.kubernetes.io/managed-by": "Helm"}},
        "stringData": {"password": password}
    }))?;
    secrets.create(&Default::default(), &secret).await?;
    Ok(())
}

fn bytes(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret.data.as_ref()?.get(key).map(|value| value.0.clone())
}

fn openssl(args: &[&str]) -> Result<std::process::Output> {
    let output = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (it must be installed on the test machine)")?;
    Ok(output)
}

/// `openssl s_server` on loopback that requires a client certificate signed by `ca`, for one
/// connection; returns its port and a handle to read what it printed.
struct TlsServer {
    port: u16,
    child: std::process::Child,
    printed: Arc<Mutex<String>>,
}

impl TlsServer {
    /// `www`: answer an HTTP GET with a status page (for clients that send a request).
    fn start(dir: &Path, ca: &TestCa, www: bool) -> Result<Self> {
        let server = ca.server()?;
        std::fs::write(dir.join("server.crt"), &server.cert_pem)?;
        std::fs::write(dir.join("server.key"), &server.key_pem)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new("openssl")
            .current_dir(dir)
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
            .args([
                "-cert",
                "server.crt",
                "-key",
                "server.key",
                "-CAfile",
                "ca.pem",
            ])
            .args(["-Verify", "1", "-verify_return_error", "-naccept", "1"])
            .args(if www { &["-www"][..] } else { &[][..] })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting openssl s_server")?;
        let printed = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (printed, ready_tx) = (printed.clone(), ready_tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if line.contains("ACCEPT") {
                        let _ = ready_tx.send(());
                    }
                    if let Ok(mut printed) = printed.lock() {
                        printed.push_str(&line);
                        printed.push('\n');
                    }
                }
            });
        }
        // s_server prints ACCEPT once it listens.
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("openssl s_server did not start listening")?;
        Ok(Self {
            port,
            child,
            printed,
        })
    }

    fn printed(&self) -> String {
        self.printed.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn combined_pem_and_der_serve_openssl_and_rotate_with_tls_crt_in_one_write() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start("formats").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    create_password_secret(&namespace, "formats-pass").await?;
    create_identity(&namespace, &identity("client", &id, formats_spec())?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    let secret = get_secret(&namespace, "client")
        .await?
        .context("no Secret")?;
    let (tls_crt, tls_key) = (
        secret_data(&secret, "tls.crt").context("tls.crt")?,
        secret_data(&secret, "tls.key").context("tls.key")?,
    );
    let combined = secret_data(&secret, "tls-combined.pem").context("tls-combined.pem")?;
    ensure!(
        combined == format!("{tls_key}{tls_crt}"),
        "cert-manager's layout: key, then chain"
    );

    let dir = tempdir("formats")?;
    std::fs::write(dir.join("tls-combined.pem"), &combined)?;
    std::fs::write(dir.join("tls.key"), &tls_key)?;
    std::fs::write(
        dir.join("key.der"),
        bytes(&secret, "key.der").context("key.der")?,
    )?;
    // OpenSSL reads key.der as the same key as tls.key.
    let public = |args: &[&str]| -> Result<Vec<u8>> {
        let output = openssl(args)?;
        ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output.stdout)
    };
    let der_in = dir.join("key.der");
    let pem_in = dir.join("tls.key");
    ensure!(
        public(&[
            "pkey",
            "-inform",
            "DER",
            "-in",
            &der_in.to_string_lossy(),
            "-pubout"
        ])? == public(&["pkey", "-in", &pem_in.to_string_lossy(), "-pubout"])?,
        "key.der is not tls.key"
    );

    // A real mutual-TLS handshake: s_client with tls-combined.pem against a server that requires a
    // client certificate signed by the CA.
    let server = TlsServer::start(&dir, &ca, false)?;
    let client = Command::new("openssl")
        .current_dir(&dir)
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", server.port),
        ])
        .args([
            "-cert",
            "tls-combined.pem",
            "-CAfile",
            "ca.pem",
            "-verify_return_error",
        ])
        .args(["-brief"])
        .stdin(Stdio::null())
        .output()?;
    let client_said = String::from_utf8_lossy(&client.stderr).into_owned()
        + &String::from_utf8_lossy(&client.stdout);
    ensure!(
        client.status.success() && client_said.contains("CONNECTION ESTABLISHED"),
        "s_client: {client_said}"
    );
    wait_for(
        "the server to report the client certificate",
        TIMEOUT,
        || {
            let printed = server.printed();
            async move {
                ensure!(
                    printed.contains("payments-client"),
                    "s_server said: {printed}"
                );
                Ok(())
            }
        },
    )
    .await?;
    drop(server);

    // A rotation: tls.crt, tls-combined.pem and keystore.p12 change in the same write; no state in
    // between.
    create_deployment(&namespace, "app", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    /// resourceVersion, tls.crt, tls.key, tls-combined.pem, keystore.p12.
    type State = (
        String,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
    );
    let states = Arc::new(Mutex::new(Vec::<State>::new()));
    let watching = tokio::spawn({
        let states = states.clone();
        let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
        async move {
            let config = watcher::Config::default().fields("metadata.name=client");
            let mut stream = watcher(secrets, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(Ok(secret)) = stream.next().await {
                let version = secret.metadata.resource_version.clone().unwrap_or_default();
                if let Ok(mut states) = states.lock() {
                    states.push((
                        version,
                        bytes(&secret, "tls.crt"),
                        bytes(&secret, "tls.key"),
                        bytes(&secret, "tls-combined.pem"),
                        bytes(&secret, "keystore.p12"),
                    ));
                }
            }
        }
    });
    // The watch has seen the Secret as it is before the rotation starts.
    wait_for("the watch to start", TIMEOUT, || {
        let seen = states.lock().map(|s| s.len()).unwrap_or(0);
        async move {
            ensure!(seen > 0, "not yet");
            Ok(())
        }
    })
    .await?;
    let version = put_source(&id, &good_secret(&ca)?).await?;
    wait_rotation(&namespace, "client", &version).await?;
    let rotated = get_secret(&namespace, "client")
        .await?
        .context("no Secret")?;
    let rotated_version = rotated
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    wait_for("the watch to see the rotated Secret", TIMEOUT, || {
        let seen = states
            .lock()
            .map(|s| s.iter().any(|(v, ..)| *v == rotated_version))
            .unwrap_or(false);
        async move {
            ensure!(seen, "not yet");
            Ok(())
        }
    })
    .await?;
    watching.abort();
    let states = states.lock().map(|s| s.clone()).unwrap_or_default();
    for (version, crt, key, combined, _) in &states {
        let (Some(crt), Some(key), Some(combined)) = (crt, key, combined) else {
            bail!("resourceVersion {version} lacks an output");
        };
        ensure!(
            *combined == [key.as_slice(), crt.as_slice()].concat(),
            "resourceVersion {version}: tls-combined.pem does not match tls.crt"
        );
    }
    let distinct: std::collections::BTreeSet<&Option<Vec<u8>>> =
        states.iter().map(|(_, crt, ..)| crt).collect();
    ensure!(distinct.len() == 2, "{} certificate states", distinct.len());
    // The keystore changed in the same write as tls.crt, and only then: it is never rendered again
    // while the certificate stays the same.
    let pairs: std::collections::BTreeSet<_> = states
        .iter()
        .map(|(_, crt, _, _, p12)| (crt, p12))
        .collect();
    ensure!(
        pairs.len() == 2,
        "{} (tls.crt, keystore.p12) states",
        pairs.len()
    );
    ensure!(
        bytes(&rotated, "tls.crt").as_deref() != Some(tls_crt.as_bytes()),
        "not rotated"
    );
    wait_all_rolled_out(&namespace).await?;
    let after = generations(&namespace).await?;
    ensure!(
        after.get("Deployment/app") == before.get("Deployment/app").map(|g| g + 1).as_ref(),
        "not exactly one rollout: {before:?} → {after:?}"
    );

    // A hand edit of any key is repaired: each in turn, the rest of the Secret as it was (the
    // keystores are rendered again, with a new salt, so for them only that they are no longer the
    // edit), and no rollout for the same certificate.
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let keys: Vec<String> = rotated
        .data
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    ensure!(keys.len() >= 6, "outputs: {keys:?}");
    let reconciled = syncs(&operator);
    for key in &keys {
        let patch = serde_json::json!({"data": {key: k8s_openapi::ByteString(b"edited".to_vec())}});
        secrets
            .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        wait_for(
            &format!("the edit of {key} to be repaired"),
            TIMEOUT,
            || async {
                let now = secrets.get("client").await?;
                for other in &keys {
                    let value = bytes(&now, other);
                    ensure!(
                        value.as_deref() != Some(b"edited".as_slice()),
                        "{other} still edited"
                    );
                    if !other.ends_with(".p12") {
                        ensure!(value == bytes(&rotated, other), "{other} differs");
                    }
                }
                Ok(())
            },
        )
        .await?;
    }
    // Each repair's reconcile has run (its own write asks for no other).
    wait_reconciles(&operator, reconciled, keys.len() as u64).await?;
    ensure!(
        generations(&namespace).await? == after,
        "a repair rolled a workload"
    );
    Ok(())
}

/// A Java client: loads `keystore.p12` and `truststore.p12` (type PKCS12, as Java's default since
/// 9), completes mutual TLS with hostname verification, sends a GET and prints the status line.
const JAVA_CLIENT: &str = r#"
import java.io.*;
import java.security.KeyStore;
import javax.net.ssl.*;

public class MtlsClient {
    public static void main(String[] args) throws Exception {
        char[] password = args[4].toCharArray();
        KeyStore keys = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(args[2])) { keys.load(in, password); }
        KeyStore trust = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(args[3])) { trust.load(in, password); }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keys, password);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        try (SSLSocket socket = (SSLSocket) context.getSocketFactory().createSocket(args[0], Integer.parseInt(args[1]))) {
            SSLParameters parameters = socket.getSSLParameters();
            parameters.setEndpointIdentificationAlgorithm("HTTPS");
            socket.setSSLParameters(parameters);
            socket.startHandshake();
            OutputStream out = socket.getOutputStream();
            out.write("GET / HTTP/1.0\r\n\r\n".getBytes());
            out.flush();
            BufferedReader reader = new BufferedReader(new InputStreamReader(socket.getInputStream()));
            System.out.println(reader.readLine());
        }
    }
}
"#;

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{command:?} failed: {said}");
    Ok(said)
}

#[tokio::test]
async fn pkcs12_keystores_serve_java_and_openssl_in_both_profiles() -> Result<()> {
    const PASSWORD: &str = "changeit-123";
    let (namespace, _operator, ca) = Scenario::start("keystores").await?.parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    let admin = support::admin_client().await?;
    let secrets: Api<Secret> = Api::namespaced(admin, &namespace);
    let password: Secret = serde_json::from_value(serde_json::json!({
        // Made by Helm, as password Secrets often are: another manager's label must not hide its
        // edits (below) from the operator.
        "metadata": {"name": "keystore-pass", "labels": {"app.kubernetes.io/managed-by": "Helm"}},
        "stringData": {"password": PASSWORD}
    }))?;
    secrets.create(&Default::default(), &password).await?;
    for (name, profile) in [("modern", "Modern"), ("legacy", "Legacy")] {
        // An hour between checks: only the password Secret's edit can make it render again.
        // Legacy's clients read the password once at start: they are restarted when it changes.
        let spec = serde_json::json!({"refreshInterval": "1h", "target": {"keystores": {"pkcs12": {
            "passwordSecretRef": {"name": "keystore-pass", "key": "password"}, "profile": profile
        }}}, "restart": {"onPasswordChange": profile == "Legacy"}});
        create_identity(&namespace, &identity(name, &id, spec)?).await?;
    }

    let dir = tempdir("keystores")?;
    std::fs::write(dir.join("MtlsClient.java"), JAVA_CLIENT)?;
    run(Command::new("javac")
        .current_dir(&dir)
        .arg("MtlsClient.java"))?;
    for name in ["modern", "legacy"] {
        wait_ready(&namespace, name, "True", "Synced").await?;
        let secret = get_secret(&namespace, name).await?.context("no Secret")?;
        let keystore = dir.join(format!("{name}-keystore.p12"));
        let truststore = dir.join(format!("{name}-truststore.p12"));
        std::fs::write(
            &keystore,
            bytes(&secret, "keystore.p12").context("keystore.p12")?,
        )?;
        std::fs::write(
            &truststore,
            bytes(&secret, "truststore.p12").context("truststore.p12")?,
        )?;
        let (keystore, truststore) = (
            keystore.to_string_lossy().into_owned(),
            truststore.to_string_lossy().into_owned(),
        );
        // OpenSSL 3 reads it (Legacy's 3DES is still in its default provider).
        run(Command::new("openssl")
            .args(["pkcs12", "-info", "-noout", "-in", &keystore])
            .args(["-passin", &format!("pass:{PASSWORD}")]))?;
        // keytool shows the alias (the identity's name) and the chain, leaf to CA.
        let listed = run(Command::new("keytool")
            .args(["-list", "-v", "-storetype", "PKCS12"])
            .args(["-keystore", &keystore, "-storepass", PASSWORD]))?;
        ensure!(listed.contains(&format!("Alias name: {name}")), "{listed}");
        ensure!(listed.contains("PrivateKeyEntry"), "{listed}");
        ensure!(listed.contains("Certificate chain length: 2"), "{listed}");
        // Java completes mutual TLS with them against a server that requires a client certificate.
        let server = TlsServer::start(&dir, &ca, true)?;
        let answer = run(Command::new("java")
            .current_dir(&dir)
            .args([
                "-cp",
                ".",
                "MtlsClient",
                "localhost",
                &server.port.to_string(),
            ])
            .args([&keystore, &truststore, PASSWORD]))?;
        ensure!(answer.contains("200"), "{name}: Java got {answer}");
        drop(server);
    }

    // A new password in the password Secret: its edit reconciles the identity, which renders the
    // keystores again under it (one read), with the same certificate and no rollout.
    create_deployment_mounting(&namespace, "java-app", &["modern"]).await?;
    create_deployment_mounting(&namespace, "old-java-app", &["legacy"]).await?;
    wait_all_rolled_out(&namespace).await?;
    let generations_before = generations(&namespace).await?;
    let before = get_secret(&namespace, "modern")
        .await?
        .context("no Secret")?;
    const NEW_PASSWORD: &str = "rotated-456";
    let new_password = serde_json::json!({"stringData": {"password": NEW_PASSWORD}});
    secrets
        .patch(
            "keystore-pass",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&new_password),
        )
        .await?;
    let keystore = dir.join("rotated-keystore.p12");
    let rerendered = wait_for("keystore.p12 under the new password", TIMEOUT, || async {
        let secret = get_secret(&namespace, "modern")
            .await?
            .context("no Secret")?;
        std::fs::write(
            &keystore,
            bytes(&secret, "keystore.p12").context("keystore.p12")?,
        )?;
        run(Command::new("openssl")
            .args(["pkcs12", "-info", "-noout", "-in"])
            .arg(&keystore)
            .args(["-passin", &format!("pass:{NEW_PASSWORD}")]))?;
        Ok(secret)
    })
    .await?;
    ensure!(
        secret_data(&rerendered, "tls.crt") == secret_data(&before, "tls.crt"),
        "the certificate is the same"
    );
    // Legacy (onPasswordChange) restarts its workload once, for the same certificate.
    let rotation = wait_for(
        "the legacy identity's password rotation",
        TIMEOUT,
        || async {
            let identity = Api::<mtls_operator::api::MtlsIdentity>::namespaced(
                support::admin_client().await?,
                &namespace,
            )
            .get("legacy")
            .await?;
            let rotation = identity
                .status
                .and_then(|status| status.last_rotation)
                .context("no rotation")?;
            ensure!(
                rotation.restart_token.is_some() && rotation.complete,
                "{rotation:?}"
            );
            Ok(rotation)
        },
    )
    .await?;
    ensure!(
        rotation.restarted_workloads == ["Deployment/old-java-app"],
        "{rotation:?}"
    );
    wait_all_rolled_out(&namespace).await?;
    let generations_after = generations(&namespace).await?;
    ensure!(
        generations_after.get("Deployment/java-app")
            == generations_before.get("Deployment/java-app"),
        "without onPasswordChange a password change rolls nothing: {generations_before:?} -> {generations_after:?}"
    );
    ensure!(
        generations_after.get("Deployment/old-java-app").copied()
            == generations_before
                .get("Deployment/old-java-app")
                .map(|g| g + 1),
        "with onPasswordChange it rolls once: {generations_before:?} -> {generations_after:?}"
    );

    // A missing password: KeystorePasswordMissing, and the keystore in place stays.
    let before = get_secret(&namespace, "modern")
        .await?
        .context("no Secret")?;
    let identities: Api<mtls_operator::api::MtlsIdentity> =
        Api::namespaced(support::admin_client().await?, &namespace);
    let patch = serde_json::json!({"spec": {"target": {"keystores": {"pkcs12": {
        "passwordSecretRef": {"name": "no-such-secret", "key": "password"}
    }}}}});
    identities
        .patch(
            "modern",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    wait_ready(&namespace, "modern", "False", "KeystorePasswordMissing").await?;
    let after = get_secret(&namespace, "modern")
        .await?
        .context("no Secret")?;
    ensure!(
        bytes(&after, "keystore.p12") == bytes(&before, "keystore.p12"),
        "the keystore in place changed"
    );
    Ok(())
}

/// A `.p12` as a partner sends it (made by OpenSSL 3, with the CA inside), stored as SecretBinary:
/// the identity with `format: Pkcs12` syncs it into `tls.crt`/`tls.key`/`ca.crt`.
#[tokio::test]
async fn a_pkcs12_stored_as_secret_binary_syncs_into_tls_crt_and_tls_key() -> Result<()> {
    const PASSWORD: &str = "from-the-partner";
    let (namespace, _operator, ca) = Scenario::start("p12source").await?.parts();
    let leaf = ca.leaf(&LeafOptions::default())?;
    let dir = tempdir("p12source")?;
    std::fs::write(dir.join("leaf.pem"), &leaf.cert_pem)?;
    std::fs::write(dir.join("key.pem"), &leaf.key_pem)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    run(Command::new("openssl")
        .current_dir(&dir)
        .args(["pkcs12", "-export"])
        .args([
            "-inkey",
            "key.pem",
            "-in",
            "leaf.pem",
            "-certfile",
            "ca.pem",
        ])
        .args([
            "-passout",
            &format!("pass:{PASSWORD}"),
            "-out",
            "partner.p12",
        ]))?;
    let p12 = std::fs::read(dir.join("partner.p12"))?;
    let id = format!("{namespace}/partner-p12");
    support::secrets_manager()
        .await
        .create_secret()
        .name(&id)
        .secret_binary(aws_sdk_secretsmanager::primitives::Blob::new(p12.clone()))
        .send()
        .await?;
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let password: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p12-pass"}, "stringData": {"password": PASSWORD}
    }))?;
    secrets.create(&Default::default(), &password).await?;
    let spec = serde_json::json!({"source": {"secretId": id, "format": "Pkcs12",
        "passwordSecretRef": {"name": "p12-pass", "key": "password"}}});
    create_identity(&namespace, &identity("partner", &id, spec)?).await?;
    wait_ready(&namespace, "partner", "True", "Synced").await?;
    let secret = get_secret(&namespace, "partner")
        .await?
        .context("no Secret")?;
    ensure!(
        secret_data(&secret, "tls.crt").as_deref() == Some(leaf.cert_pem.as_str()),
        "tls.crt is not the leaf of the .p12"
    );
    ensure!(
        secret_data(&secret, "ca.crt").as_deref() == Some(ca.pem().as_str()),
        "ca.crt is not the CA of the .p12"
    );

    // The same file as SecretString JSON with its password inside: no passwordSecretRef needed.
    use base64::Engine;
    let json_id = format!("{namespace}/partner-p12-json");
    let encoded = base64::engine::general_purpose::STANDARD.encode(&p12);
    put_source(
        &json_id,
        &serde_json::json!({"pkcs12": encoded, "password": PASSWORD}).to_string(),
    )
    .await?;
    let spec = serde_json::json!({"source": {"secretId": json_id, "format": "Pkcs12"}});
    create_identity(&namespace, &identity("partner-json", &json_id, spec)?).await?;
    wait_ready(&namespace, "partner-json", "True", "Synced").await?;
    let secret = get_secret(&namespace, "partner-json")
        .await?
        .context("no Secret")?;
    ensure!(
        secret_data(&secret, "tls.crt").as_deref() == Some(leaf.cert_pem.as_str()),
        "tls.crt is not the leaf of the .p12 in the JSON"
    );
    // Without any password: a clear InvalidPkcs12, nothing written.
    let bare_id = format!("{namespace}/partner-p12-bare");
    put_source(
        &bare_id,
        &serde_json::json!({"pkcs12": encoded}).to_string(),
    )
    .await?;
    let spec = serde_json::json!({"source": {"secretId": bare_id, "format": "Pkcs12"}});
    create_identity(&namespace, &identity("partner-bare", &bare_id, spec)?).await?;
    let refused = wait_ready(&namespace, "partner-bare", "False", "InvalidPkcs12").await?;
    let message = refused.ready_condition().context("Ready")?.message.clone();
    ensure!(message.contains("no password"), "{message}");
    ensure!(
        get_secret(&namespace, "partner-bare").await?.is_none(),
        "nothing written"
    );
    Ok(())
}
