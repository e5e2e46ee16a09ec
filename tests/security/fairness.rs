//! (A module of the security test binary.) Availability between namespaces under attack (#23):
//! what a tenant of `payments` can write must not cost the operator work the other namespaces pay
//! for, and what it breaks of its own is repaired or refused with a reason.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
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
    wait_all_ready(&payments, 4).await?;
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
    // The describe sweep: one call per secret, the costly mode `auto` falls back to where
    // ListSecrets is refused.
    let settings = Settings {
        sweep_interval: Duration::from_secs(10),
        sweep_mode: mtls_operator::source::fleet::SweepMode::Describe,
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
    wait_all_ready(&payments, 40).await?;
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
    // The describe sweep: one check per secret, each of which can fail.
    let settings = Settings {
        sweep_mode: mtls_operator::source::fleet::SweepMode::Describe,
        ..Settings::default()
    };
    let _operator = start_operator_through(&endpoint, &[&namespace], settings).await?;
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
    wait_all_ready(&namespace, 10).await?;
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

/// Hole 5: rotations in `payments` kept pending (its Deployments paused) reconcile every 2 s; before,
/// each such reconcile listed every Deployment, StatefulSet and DaemonSet of the namespace, full
/// objects, unpaginated (10 identities: 15 LISTs a second on the API server for as long as the
/// tenant liked). Now restarts read the watched, compacted workloads: the API server's audit log
/// records no LIST from the operator in `payments` while they are pending (at most one per kind
/// should a watch have to list again), and `billing`'s rotation and deleted Secret are handled
/// meanwhile.
#[tokio::test]
async fn pending_rotations_cost_the_api_server_no_lists() -> Result<()> {
    let payments = support::create_namespace("lists-attacker", &[]).await?;
    let billing = support::create_namespace("lists-victim", &[]).await?;
    let operator = start_operator_for(&[&payments, &billing], Settings::default()).await?;
    let ca = TestCa::new("lists CA")?;
    let admin = support::admin_client().await?;
    let mut ids = Vec::new();
    for n in 0..10 {
        let (name, id) = (format!("client-{n}"), format!("{payments}/client-{n}"));
        put_source(&id, &good_secret(&ca)?).await?;
        create_identity(&payments, &identity(&name, &id, serde_json::json!({}))?).await?;
        create_deployment(&payments, &format!("api-{n}"), Some(("volume", &name))).await?;
        ids.push(id);
    }
    let victim_source = format!("{billing}/client");
    put_source(&victim_source, &good_secret(&ca)?).await?;
    create_identity(
        &billing,
        &identity("client", &victim_source, serde_json::json!({}))?,
    )
    .await?;
    wait_all_ready(&payments, 10).await?;
    wait_ready(&billing, "client", "True", "Synced").await?;
    wait_all_rolled_out(&payments).await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &payments);
    let pause = serde_json::json!({"spec": {"paused": true}});
    for n in 0..10 {
        deployments
            .patch(
                &format!("api-{n}"),
                &PatchParams::default(),
                &Patch::Merge(&pause),
            )
            .await?;
    }

    // The attack: every rotation of `payments` stays pending, each identity reconciling every 2 s.
    for id in &ids {
        put_source(id, &good_secret(&ca)?).await?;
    }
    for n in 0..10 {
        wait_event(&payments, &format!("client-{n}"), "RolloutPaused").await?;
    }
    let lists_before = operator_workload_lists(&payments)?;
    // The count sees the operator: its watches' own first LISTs are in the audit log.
    ensure!(
        lists_before >= 3,
        "{lists_before} LISTs recorded for the operator's workload watches in {payments}"
    );
    let reconciles_before = syncs(&operator);
    // The victim: its Secret deleted and its source rotated while the attack goes on.
    let victim_secrets: Api<Secret> = Api::namespaced(admin.clone(), &billing);
    victim_secrets.delete("client", &Default::default()).await?;
    let rotated = put_source(&victim_source, &good_secret(&ca)?).await?;
    wait_secret_version("the victim's rotation", &billing, "client", &rotated).await?;
    // Fifty reconciles of pending rotations (five per attacker identity, about 10 s).
    wait_reconciles(&operator, reconciles_before, 50).await?;
    // A watch that has to list again (its resourceVersion expired) lists each kind once.
    let lists = operator_workload_lists(&payments)? - lists_before;
    ensure!(
        lists <= 3,
        "{lists} LISTs of workloads in {payments} during 50 reconciles of pending rotations"
    );
    println!("{lists} LISTs of workloads during 50 pending reconciles ({lists_before} before)");
    let token = deployments
        .get("api-0")
        .await?
        .spec
        .and_then(|spec| spec.template.metadata)
        .and_then(|metadata| metadata.annotations)
        .and_then(|annotations| annotations.get("mtls-operator.io/cert.client-0").cloned());
    ensure!(
        token.is_some(),
        "the paused template got its token from the cache"
    );
    Ok(())
}

/// Hole 4: `spec.source.externalId` is tenant text. Before, each distinct value made a client, a
/// role session, a batch queue and a rate lane with its own ceiling, kept for good: `payments`
/// could grow the operator's memory at will and multiply the region's call rate. Now clients and
/// sessions are capped (8 here, 256 by default) with the least recently used evicted, the rate
/// lane is per role, and every role of a region shares its ceiling. The attack: 24 identities on
/// one granted role, each with its own external id. All 24 sync (eviction breaks nobody), what is
/// kept stays at the cap, the calls stay at the region's rate, and `billing` is served meanwhile.
#[tokio::test]
async fn distinct_external_ids_keep_bounded_state_and_share_the_rate() -> Result<()> {
    const CENTRAL: &str = "111111111111";
    const CAP: usize = 8;
    const RATE: f64 = 4.0;
    let endpoint = counting_endpoint(endpoint::Mode::Pass).await?;
    let payments = support::create_namespace("extid-attacker", &[]).await?;
    let billing = support::create_namespace("extid-victim", &[]).await?;
    let ca = TestCa::new("extid CA")?;
    let central_id = format!("{payments}/client");
    create_source_in_account(CENTRAL, "security-admin", &central_id, &good_secret(&ca)?).await?;
    let aws = endpoint.aws_config(&support::aws_config().await);
    let source = SecretsManagerSource::new(aws.clone())
        .with_max_sessions(CAP)
        .with_max_calls_per_second(RATE);
    let settings = Settings {
        policy: mtls_operator::source::policy::SourcePolicy::new(Vec::new(), None, Vec::new())
            .with_allowed_roles(vec![format!(
                "arn:aws:iam::{CENTRAL}:role/mtls/{{namespace}}"
            )]),
        ..Settings::default()
    };
    let operator = start_operator_on(&[&payments, &billing], settings, aws, source).await?;
    let victim_source = format!("{billing}/client");
    put_source(&victim_source, &good_secret(&ca)?).await?;
    create_identity(
        &billing,
        &identity("client", &victim_source, serde_json::json!({}))?,
    )
    .await?;
    wait_ready(&billing, "client", "True", "Synced").await?;

    let attack_started = std::time::Instant::now();
    let role = format!("arn:aws:iam::{CENTRAL}:role/mtls/{payments}");
    for n in 0..24 {
        let spec = serde_json::json!({"source": {
            "secretId": central_id, "roleArn": role, "externalId": format!("external-{n}"),
        }});
        create_identity(
            &payments,
            &identity(&format!("client-{n}"), &central_id, spec)?,
        )
        .await?;
    }
    // The victim's Secret deleted and its source rotated while the attack goes on.
    let admin = support::admin_client().await?;
    Api::<Secret>::namespaced(admin, &billing)
        .delete("client", &Default::default())
        .await?;
    let rotated = put_source(&victim_source, &good_secret(&ca)?).await?;
    wait_all_ready(&payments, 24).await?;
    wait_secret_version("the victim's rotation", &billing, "client", &rotated).await?;
    let assumed = endpoint.sts_count("AssumeRole");
    ensure!(
        assumed >= 24,
        "one session per external id: {assumed} AssumeRole calls"
    );
    let kept = operator.source.kept();
    ensure!(
        kept.clients <= CAP && kept.role_sessions <= CAP,
        "kept at most {CAP} of each: {kept:?}"
    );
    // One lane for the role (external ids are not part of it), one for the operator's own
    // credentials.
    ensure!(kept.lanes <= 2, "one rate lane per role: {kept:?}");
    // The region's ceiling holds across the role and every external id (before: a ceiling each).
    let peak = endpoint.peak_rate(attack_started, Duration::from_secs(5));
    ensure!(
        peak <= 1.5 * RATE,
        "peak {peak:.1} Secrets Manager calls/s against a region ceiling of {RATE}/s"
    );
    println!("{assumed} AssumeRole; kept {kept:?}; peak {peak:.1} calls/s over 5 s windows");
    Ok(())
}

/// The reconcile queue across namespaces (hole 2, reconciles): one operator for the whole cluster,
/// as the chart runs it by default, with one reconcile at a time. `payments` creates 100
/// identities whose reads take 300 ms each (30 s of work queued); kube-runtime's own queue is
/// first come, first served, so a `billing` identity created behind them waited for all of it.
/// Fair admission serves the namespaces in turn: between `billing`'s identity appearing and its
/// Secret being written, at most a few of `payments`' reconciles finish, while most of its
/// backlog is still waiting.
#[tokio::test]
async fn one_namespaces_reconcile_backlog_does_not_delay_anothers() -> Result<()> {
    const ATTACKERS: usize = 100;
    let endpoint = counting_endpoint(endpoint::Mode::Pass).await?;
    let home = support::create_namespace("fair-home", &[]).await?;
    let payments = support::create_namespace("fair-attacker", &[]).await?;
    let billing = support::create_namespace("fair-victim", &[]).await?;
    let shard = format!("fair-{}", std::process::id());
    let label = ("mtls-operator.io/test-shard", shard.as_str());
    let aws = endpoint.aws_config(&support::aws_config().await);
    let settings = Settings {
        max_concurrent_reconciles: 1,
        ..Settings::default()
    };
    let source = SecretsManagerSource::new(aws.clone());
    let _operator = start_cluster_operator_on(
        &home,
        &format!("{}={}", label.0, label.1),
        settings,
        aws,
        source,
    )
    .await?;
    let ca = TestCa::new("fair CA")?;
    let labelled = |name: &str, id: &str| -> Result<mtls_operator::api::MtlsIdentity> {
        let mut identity = identity(name, id, serde_json::json!({}))?;
        identity.metadata.labels = Some([(label.0.to_string(), label.1.to_string())].into());
        Ok(identity)
    };
    let victim_source = format!("{billing}/client");
    put_source(&victim_source, &good_secret(&ca)?).await?;
    // Every read of the attacker's secrets is slow: each of its reconciles holds the one permit.
    endpoint.slow_reads_of(&format!("{payments}/"), Duration::from_millis(300));
    let mut attacker_ids = Vec::new();
    for n in 0..ATTACKERS {
        let (name, id) = (format!("client-{n}"), format!("{payments}/client-{n}"));
        put_source(&id, &good_secret(&ca)?).await?;
        create_identity(&payments, &labelled(&name, &id)?).await?;
        attacker_ids.push(id);
    }
    let identities: Api<mtls_operator::api::MtlsIdentity> =
        Api::namespaced(support::admin_client().await?, &payments);
    let attacker_synced = || async {
        let list = identities.list(&Default::default()).await?;
        anyhow::Ok(
            list.items
                .iter()
                .filter(|identity| {
                    identity
                        .ready_condition()
                        .is_some_and(|ready| ready.status == "True")
                })
                .count(),
        )
    };
    // The backlog is queued and being worked through.
    wait_for("the attacker's reconciles under way", TIMEOUT, || async {
        ensure!(attacker_synced().await? >= 1, "none synced yet");
        Ok(())
    })
    .await?;
    let before = attacker_synced().await?;
    create_identity(&billing, &labelled("client", &victim_source)?).await?;
    wait_ready(&billing, "client", "True", "Synced").await?;
    let after = attacker_synced().await?;
    println!(
        "{} of the attacker's reconciles finished while the victim's waited; {after} of \
         {ATTACKERS} by then",
        after - before
    );
    ensure!(
        after - before <= 3,
        "{} of the attacker's reconciles ran before the victim's one",
        after - before
    );
    ensure!(
        after < ATTACKERS / 2,
        "the attacker's backlog was still there: {after} of {ATTACKERS} synced"
    );
    ensure!(
        !endpoint.requests_for(&attacker_ids).is_empty(),
        "the attacker's reads went through the slow endpoint"
    );
    Ok(())
}

/// Reads queued per namespace: `payments` starts 200 reads at once (200 new identities, reconciled
/// together), each BatchGetSecretValue holding its ids taking a second. One scope's chunks go one
/// after another, 20 ids each: first come, first served, a `billing` read queued behind them
/// waited for all ten chunks. Each chunk now takes the waiting namespaces in turn, so `billing`'s
/// read goes in the next chunk to be sent.
#[tokio::test]
async fn one_namespaces_read_burst_does_not_delay_anothers_read() -> Result<()> {
    const ATTACKERS: usize = 200;
    let endpoint = counting_endpoint(endpoint::Mode::Pass).await?;
    let payments = support::create_namespace("reads-attacker", &[]).await?;
    let billing = support::create_namespace("reads-victim", &[]).await?;
    let settings = Settings {
        // Every attacker reconcile reads at once: the queue is in the batches, not the permits.
        max_concurrent_reconciles: 250,
        ..Settings::default()
    };
    let _operator = start_operator_through(&endpoint, &[&payments, &billing], settings).await?;
    let ca = TestCa::new("reads CA")?;
    let victim_source = format!("{billing}/client");
    put_source(&victim_source, &good_secret(&ca)?).await?;
    let mut attacker_ids = Vec::new();
    for n in 0..ATTACKERS {
        let id = format!("{payments}/client-{n}");
        put_source(&id, &good_secret(&ca)?).await?;
        attacker_ids.push(id);
    }
    endpoint.slow_reads_of(&format!("{payments}/"), Duration::from_secs(1));
    let identities: Api<mtls_operator::api::MtlsIdentity> =
        Api::namespaced(support::admin_client().await?, &payments);
    futures::future::try_join_all(attacker_ids.iter().enumerate().map(|(n, id)| {
        let identities = identities.clone();
        async move {
            let object = identity(&format!("client-{n}"), id, serde_json::json!({}))?;
            identities.create(&Default::default(), &object).await?;
            anyhow::Ok(())
        }
    }))
    .await?;
    let attacker_batches = |seen: &[endpoint::Seen]| {
        seen.iter()
            .filter(|seen| seen.operation == "BatchGetSecretValue" && seen.body.contains(&payments))
            .count()
    };
    // The burst is queued: its first chunk has gone out.
    wait_for("the attacker's first chunk", TIMEOUT, || async {
        ensure!(attacker_batches(&endpoint.seen()) >= 1, "none yet");
        Ok(())
    })
    .await?;
    let victim_created = std::time::Instant::now();
    create_identity(
        &billing,
        &identity("client", &victim_source, serde_json::json!({}))?,
    )
    .await?;
    wait_ready(&billing, "client", "True", "Synced").await?;
    let since: Vec<endpoint::Seen> = endpoint
        .seen()
        .into_iter()
        .filter(|seen| seen.at > victim_created)
        .collect();
    let victims_read = since
        .iter()
        .position(|seen| is_read(seen) && seen.body.contains(&victim_source))
        .context("the victim's read reached the endpoint")?;
    let ahead = attacker_batches(&since[..victims_read]);
    println!(
        "{ahead} of the attacker's chunks were sent between the victim's identity and its read"
    );
    // The chunk in flight when the victim's read joined, and at most one being filled.
    ensure!(
        ahead <= 2,
        "{ahead} of the attacker's chunks went before the victim's read"
    );
    let later = attacker_batches(&endpoint.seen()[..]);
    ensure!(
        later < ATTACKERS / 20,
        "the attacker's burst was still being read: {later} chunks so far"
    );
    Ok(())
}

/// Reconciles waiting for a permit are parked by key and woken when their turn comes; one that is
/// deleted while parked is woken for nothing (kube-runtime finds no such identity): its permit
/// must pass on, or every deleted parked identity would take a permit away for good and, with one
/// permit, the rest of the fleet would never sync. Here the one permit is held by a slow read
/// while five identities park behind it; three of them are deleted before their turn.
#[tokio::test]
async fn identities_deleted_while_waiting_for_their_turn_pass_it_on() -> Result<()> {
    const PARKED: usize = 5;
    const DELETED: usize = 3;
    let namespace = support::create_namespace("parked", &[]).await?;
    let settings = Settings {
        max_concurrent_reconciles: 1,
        ..Settings::default()
    };
    let operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("parked CA")?;
    let holder_id = format!("{namespace}{SLOW}");
    put_source(&holder_id, &good_secret(&ca)?).await?;
    create_identity(
        &namespace,
        &identity("holder", &holder_id, serde_json::json!({}))?,
    )
    .await?;
    operator.wait_slow_fetch_started().await?;
    for n in 0..PARKED {
        let id = format!("{namespace}/client-{n}");
        put_source(&id, &good_secret(&ca)?).await?;
        create_identity(
            &namespace,
            &identity(&format!("client-{n}"), &id, serde_json::json!({}))?,
        )
        .await?;
    }
    wait_for(
        "every new identity parked behind the holder",
        TIMEOUT,
        || async {
            let waiting = metric(&operator, "mtls_reconciles_waiting").unwrap_or_default();
            ensure!(waiting == PARKED as f64, "{waiting} waiting");
            Ok(())
        },
    )
    .await?;
    let identities: Api<mtls_operator::api::MtlsIdentity> =
        Api::namespaced(support::admin_client().await?, &namespace);
    for n in 0..DELETED {
        identities
            .delete(&format!("client-{n}"), &Default::default())
            .await?;
    }
    let holder = identities.get("holder").await?;
    ensure!(
        holder
            .ready_condition()
            .is_none_or(|ready| ready.status != "True"),
        "the holder finished before the deletions: they were not made while parked"
    );
    wait_ready(&namespace, "holder", "True", "Synced").await?;
    for n in DELETED..PARKED {
        wait_ready(&namespace, &format!("client-{n}"), "True", "Synced").await?;
    }
    wait_for("nothing left waiting", TIMEOUT, || async {
        let waiting = metric(&operator, "mtls_reconciles_waiting").unwrap_or_default();
        ensure!(waiting == 0.0, "{waiting} waiting");
        Ok(())
    })
    .await?;
    Ok(())
}
