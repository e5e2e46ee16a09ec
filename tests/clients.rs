//! Outputs every client can use, proven with real clients on the real control plane and moto:
//! cert-manager's `additionalOutputFormats` (`tls-combined.pem`, `key.der`) used by OpenSSL for a
//! mutual-TLS handshake, and rotated together with `tls.crt` in one Secret write.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use xtask::support::{self, wait_for};

fn formats_spec() -> serde_json::Value {
    serde_json::json!({"target": {"additionalOutputFormats": [{"type": "CombinedPEM"}, {"type": "DER"}]}})
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
    fn start(dir: &Path, ca: &TestCa) -> Result<Self> {
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
    let namespace = support::create_namespace("formats", &[]).await?;
    let _operator = start_operator(&namespace).await?;
    let ca = TestCa::new("formats CA")?;
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
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
    let server = TlsServer::start(&dir, &ca)?;
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

    // A rotation: tls.crt and tls-combined.pem change in the same write; no state in between.
    create_deployment(&namespace, "app", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    let states = Arc::new(Mutex::new(Vec::<(
        String,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
    )>::new()));
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
    for (version, crt, key, combined) in &states {
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
    Ok(())
}

/// A folder under the environment's, removed with it.
fn tempdir(prefix: &str) -> Result<std::path::PathBuf> {
    let dir = support::environment()
        .dir
        .join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
