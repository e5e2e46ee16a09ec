//! The fleet engine on the real control plane and moto: versions are checked by a sweep (no value
//! reads), values are read only when a version changed or a Secret needs repair, cold starts are
//! batched, and an operator restart reads nothing. Counted, not timed: calls per operation at the
//! source (the same counters `mtls_secretsmanager_calls_total` exports).

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::endpoint::Mode;
use common::*;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use mtls_operator::api::MtlsIdentity;
use mtls_operator::controller::Settings;
use mtls_operator::source::fleet::SweepMode;
use xtask::support::{self, wait_for};

const SWEEP: Duration = Duration::from_secs(2);

fn settings(mode: SweepMode) -> Settings {
    Settings {
        sweep_mode: mode,
        sweep_interval: SWEEP,
        ..Settings::default()
    }
}

/// Identities `client-0..count` on secrets `{namespace}/client-N`, refreshInterval 1h.
async fn create_fleet(namespace: &str, ca: &TestCa, count: usize) -> Result<()> {
    create_fleet_refreshing(namespace, ca, count, "1h").await
}

/// Like [`create_fleet`], with refreshInterval `refresh`.
async fn create_fleet_refreshing(
    namespace: &str,
    ca: &TestCa,
    count: usize,
    refresh: &str,
) -> Result<()> {
    futures::stream::iter(0..count)
        .map(|index| async move {
            let id = format!("{namespace}/client-{index}");
            put_source(&id, &good_secret(ca)?).await?;
            let spec = serde_json::json!({"refreshInterval": refresh});
            create_identity(namespace, &identity(&format!("client-{index}"), &id, spec)?).await
        })
        .buffer_unordered(8)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect()
}

/// Waits for `sweeps` more version checks of every secret in the index (DescribeSecret or
/// ListSecrets calls, as `mode` makes them).
async fn wait_sweeps(
    operator: &Operator,
    mode: SweepMode,
    secrets: u64,
    sweeps: u64,
) -> Result<()> {
    let (operation, per_sweep) = match mode {
        SweepMode::Describe => ("DescribeSecret", secrets),
        SweepMode::List | SweepMode::Auto => ("ListSecrets", 1),
        SweepMode::Get => return Ok(()),
    };
    let start = operator.source.calls_of(operation);
    wait_for(&format!("{sweeps} sweeps"), TIMEOUT, || async {
        let done = operator.source.calls_of(operation) - start;
        ensure!(
            done >= per_sweep * sweeps,
            "{done} {operation} calls so far"
        );
        Ok(())
    })
    .await
}

async fn sweep_mode_detects_a_rotation_without_reading_values_meanwhile(
    mode: SweepMode,
) -> Result<()> {
    const COUNT: usize = 20;
    let (namespace, operator, ca) =
        Scenario::start_with(&format!("sweep-{}", mode.as_str()), settings(mode))
            .await?
            .parts();
    create_fleet(&namespace, &ca, COUNT).await?;
    wait_all_ready(&namespace, COUNT).await?;
    let reads = || {
        operator.source.calls_of("GetSecretValue") + operator.source.calls_of("BatchGetSecretValue")
    };
    let after_sync = reads();
    // Two sweeps and no change: no value is read.
    wait_sweeps(&operator, mode, COUNT as u64, 2).await?;
    ensure!(
        reads() == after_sync,
        "{} reads without a change",
        reads() - after_sync
    );
    // A rotation is found by the sweep: one read, the new version in the Secret.
    let version = put_source(&format!("{namespace}/client-7"), &good_secret(&ca)?).await?;
    wait_for("the sweep to find the new version", TIMEOUT, || async {
        let secret = get_secret(&namespace, "client-7").await?;
        let carried = secret
            .and_then(|s| s.metadata.annotations)
            .and_then(|a| a.get(mtls_operator::api::VERSION_ID_ANNOTATION).cloned());
        ensure!(carried.as_deref() == Some(version.as_str()), "{carried:?}");
        Ok(())
    })
    .await?;
    ensure!(
        reads() - after_sync <= 2,
        "{} reads for one rotation",
        reads() - after_sync
    );
    Ok(())
}

#[tokio::test]
async fn describe_mode_detects_a_rotation_without_reading_values_meanwhile() -> Result<()> {
    sweep_mode_detects_a_rotation_without_reading_values_meanwhile(SweepMode::Describe).await
}

#[tokio::test]
async fn list_mode_detects_a_rotation_without_reading_values_meanwhile() -> Result<()> {
    sweep_mode_detects_a_rotation_without_reading_values_meanwhile(SweepMode::List).await
}

#[tokio::test]
async fn auto_mode_detects_a_rotation_without_reading_values_meanwhile() -> Result<()> {
    sweep_mode_detects_a_rotation_without_reading_values_meanwhile(SweepMode::Auto).await
}

/// `auto`, the default: the due secrets of a namespace are checked with one ListSecrets filtered by
/// the namespace's prefix, whatever else the account holds (moto holds every other test's
/// secrets); where ListSecrets is refused, the sweep describes from then on, after one refused
/// call, and still detects rotations.
#[tokio::test]
async fn auto_mode_lists_by_prefix_and_describes_for_good_once_listing_is_refused() -> Result<()> {
    const COUNT: usize = 20;
    let namespace = support::create_namespace("sweep-auto", &[]).await?;
    let (operator, endpoint) =
        operator_behind(&namespace, Mode::Pass, settings(SweepMode::Auto)).await?;
    let ca = TestCa::new("auto CA")?;
    create_fleet(&namespace, &ca, COUNT).await?;
    wait_all_ready(&namespace, COUNT).await?;
    let counts = || {
        (
            endpoint.count(Some("ListSecrets")),
            endpoint.count(Some("DescribeSecret")),
        )
    };
    // Three sweeps once the fleet is aligned (a listing confirms every secret at once).
    wait_sweeps(&operator, SweepMode::Auto, COUNT as u64, 2).await?;
    let (listed, described) = counts();
    wait_sweeps(&operator, SweepMode::Auto, COUNT as u64, 3).await?;
    let (listed_after, described_after) = counts();
    let calls = (listed_after - listed) + (described_after - described);
    let per_identity_per_sweep = calls as f64 / (3 * COUNT) as f64;
    println!(
        "auto: {} ListSecrets, {} DescribeSecret in 3 sweeps of {COUNT}: {per_identity_per_sweep:.3} \
         calls per identity per sweep",
        listed_after - listed,
        described_after - described
    );
    ensure!(
        per_identity_per_sweep <= 0.1,
        "{calls} calls in 3 sweeps of {COUNT} secrets (describe: {})",
        3 * COUNT
    );
    let prefix = format!("{namespace}/");
    ensure!(
        endpoint
            .seen()
            .iter()
            .filter(|seen| seen.operation == "ListSecrets")
            .all(|seen| seen.body.contains(&prefix)),
        "every listing is filtered by the namespace's prefix"
    );

    // The role may not list: one refused ListSecrets, then DescribeSecret per secret for good.
    endpoint.deny("ListSecrets");
    let (listed, described) = counts();
    wait_for("two describe sweeps", TIMEOUT, || async {
        let more = endpoint.count(Some("DescribeSecret")) - described;
        ensure!(more >= 2 * COUNT, "{more} DescribeSecret so far");
        Ok(())
    })
    .await?;
    let refused = endpoint.count(Some("ListSecrets")) - listed;
    ensure!(
        refused == 1,
        "{refused} ListSecrets after the first refusal: it must be remembered"
    );
    let version = put_source(&format!("{namespace}/client-3"), &good_secret(&ca)?).await?;
    wait_secret_version(
        "the rotation found by describing",
        &namespace,
        "client-3",
        &version,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn get_mode_reads_at_the_refresh_interval_only() -> Result<()> {
    let (namespace, operator, ca) = Scenario::start_with("sweep-get", settings(SweepMode::Get))
        .await?
        .parts();
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"refreshInterval": "3s"});
    create_identity(&namespace, &identity("client", &id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    let version = put_source(&id, &good_secret(&ca)?).await?;
    let rotated = wait_rotation(&namespace, "client", &version).await?;
    ensure!(rotated.to_version_id == version);
    ensure!(
        operator.source.calls_of("DescribeSecret") == 0,
        "no sweep in get mode"
    );
    ensure!(
        operator.source.calls_of("ListSecrets") == 0,
        "no sweep in get mode"
    );
    Ok(())
}

#[tokio::test]
async fn a_cold_start_is_batched_and_one_refusal_stays_with_its_identity() -> Result<()> {
    const COUNT: usize = 45;
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("batch", &[]).await?;
    let ca = TestCa::new("batch CA")?;
    // The identities exist before the operator starts: its first list sees all of them at once.
    create_fleet(&namespace, &ca, COUNT).await?;
    // One more secret that exists, but that the endpoint refuses to this role, as a resource
    // policy would: inside a batch answer it is one `Errors[]` entry beside the others' values.
    let refused = format!("{namespace}/refused");
    put_source(&refused, &good_secret(&ca)?).await?;
    create_identity(
        &namespace,
        &identity("refused", &refused, serde_json::json!({}))?,
    )
    .await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    endpoint.refuse_reads_of(&refused);
    let _operator =
        start_operator_through(&endpoint, &[&namespace], settings(SweepMode::Describe)).await?;
    wait_all_ready(&namespace, COUNT).await?;
    wait_ready(&namespace, "refused", "False", "AccessDenied").await?;
    ensure!(
        endpoint.refused_in_batches() >= 1,
        "the refusal never came inside a batch answer"
    );
    let batches = endpoint.count(Some("BatchGetSecretValue"));
    let singles = endpoint.count(Some("GetSecretValue"));
    // Batched: 46 single reads would be 46 calls. 3 when all arrive in one window; under the
    // suite's parallel load arrivals spread, so the bound leaves room (at most 0.2 per identity).
    ensure!(
        batches + singles <= 10,
        "{batches} BatchGetSecretValue + {singles} GetSecretValue calls for {COUNT} identities"
    );
    ensure!(
        batches >= 3,
        "46 reads need at least 3 batches of 20: {batches}"
    );
    Ok(())
}

#[tokio::test]
async fn own_writes_and_restarts_read_nothing_and_a_manual_edit_is_repaired_with_one_read()
-> Result<()> {
    const COUNT: usize = 30;
    let (namespace, operator, ca) =
        Scenario::start_with("own-writes", settings(SweepMode::Describe))
            .await?
            .parts();
    create_fleet(&namespace, &ca, COUNT).await?;
    wait_all_ready(&namespace, COUNT).await?;
    let reads = |operator: &Operator| {
        operator.source.calls_of("GetSecretValue") + operator.source.calls_of("BatchGetSecretValue")
    };
    // Our own Secret and status writes are done; two sweeps later nothing more was read.
    let synced = reads(&operator);
    wait_sweeps(&operator, SweepMode::Describe, COUNT as u64, 2).await?;
    ensure!(reads(&operator) == synced, "reads after the sync settled");

    // A manual edit of tls.crt: seen by its digest, repaired with one read.
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, &namespace);
    let original = secrets.get("client-3").await?;
    let reconciled = syncs(&operator);
    let patch = serde_json::json!({"data": {"tls.crt": ByteString(b"tampered".to_vec())}});
    secrets
        .patch("client-3", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("the edit to be reverted", TIMEOUT, || async {
        let now = secrets.get("client-3").await?;
        ensure!(
            secret_data(&now, "tls.crt") == secret_data(&original, "tls.crt"),
            "not yet"
        );
        Ok(())
    })
    .await?;
    // The repair's reconcile has run (its own write asks for none: see the test below).
    wait_reconciles(&operator, reconciled, 1).await?;
    ensure!(
        reads(&operator) - synced == 1,
        "{} reads to repair",
        reads(&operator) - synced
    );

    // An operator restart (a new process, an empty index): zero reads, zero rollouts.
    create_deployment(&namespace, "api", Some(("volume", "client-0"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;
    drop(operator);
    let restarted = start_operator_with(&namespace, settings(SweepMode::Describe)).await?;
    // Every identity reconciled once after the restart, and two sweeps confirmed every version.
    wait_reconciles(&restarted, 0, COUNT as u64).await?;
    wait_sweeps(&restarted, SweepMode::Describe, COUNT as u64, 1).await?;
    wait_sweeps(&restarted, SweepMode::Describe, COUNT as u64, 1).await?;
    ensure!(
        reads(&restarted) == 0,
        "{} reads after a restart",
        reads(&restarted)
    );
    ensure!(
        generations(&namespace).await? == before,
        "no rollout after a restart"
    );
    Ok(())
}

/// A new identity costs one request on its Secret: the create. The create's own watch event does
/// not reconcile the identity again: that reconcile read the Secret back, two GETs per identity on
/// a cold start (BENCHMARKS.md, W1). An edit by anyone else still reconciles (the test above).
#[tokio::test]
async fn a_cold_start_writes_each_secret_once_and_reads_none_back() -> Result<()> {
    const COUNT: usize = 20;
    let (namespace, operator, ca) =
        Scenario::start_with("read-back", settings(SweepMode::Describe))
            .await?
            .parts();
    create_fleet(&namespace, &ca, COUNT).await?;
    wait_all_ready(&namespace, COUNT).await?;
    // A reconcile the Secrets' watch events asked for would come within a second (half a second
    // when it found its identity's copy older than the status just written); two sweeps take four.
    wait_sweeps(&operator, SweepMode::Describe, COUNT as u64, 2).await?;
    for index in 0..COUNT {
        let name = format!("client-{index}");
        let requests = operator_secret_requests(&namespace, &name)?;
        ensure!(
            requests == [("create".to_string(), 201)],
            "{name}: {requests:?}"
        );
    }
    ensure!(
        syncs(&operator) == COUNT as u64,
        "{} reconciles for {COUNT} new identities",
        syncs(&operator)
    );
    Ok(())
}

#[tokio::test]
async fn identities_sharing_one_secret_cost_one_check() -> Result<()> {
    const COUNT: usize = 10;
    let (namespace, operator, ca) =
        Scenario::start_with("shared-secret", settings(SweepMode::Describe))
            .await?
            .parts();
    let id = format!("{namespace}/shared");
    put_source(&id, &good_secret(&ca)?).await?;
    for index in 0..COUNT {
        let spec = serde_json::json!({"refreshInterval": "1h"});
        create_identity(
            &namespace,
            &identity(&format!("client-{index}"), &id, spec)?,
        )
        .await?;
    }
    wait_all_ready(&namespace, COUNT).await?;
    let described = operator.source.calls_of("DescribeSecret");
    wait_sweeps(&operator, SweepMode::Describe, 1, 3).await?;
    let per_sweep = (operator.source.calls_of("DescribeSecret") - described) as f64 / 3.0;
    ensure!(
        per_sweep <= 1.5,
        "{per_sweep} DescribeSecret per sweep for one shared secret"
    );
    Ok(())
}

/// The value of `mtls_source_events_total{outcome=...}` in the operator's metrics.
fn events(operator: &Operator, outcome: &str) -> u64 {
    metric(
        operator,
        &format!("mtls_source_events_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A Secrets Manager event as EventBridge delivers it to an SQS target.
fn label_updated(name: &str, version: &str) -> String {
    serde_json::json!({
        "version": "0",
        "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": "Secret Label Updated",
        "source": "aws.secretsmanager",
        "account": "123456789012",
        "time": "2026-11-29T12:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": {"name": name, "labelUpdated": "AWSCURRENT", "versionId": version}
    })
    .to_string()
}

#[tokio::test]
async fn events_deliver_rotations_and_the_sweep_carries_on_without_the_queue() -> Result<()> {
    let namespace = support::create_namespace("events", &[]).await?;
    let sqs = aws_sdk_sqs::Client::new(&support::aws_config().await);
    let queue_name = format!("{namespace}-changes");
    let create_queue = || async {
        let created = sqs.create_queue().queue_name(&queue_name).send().await?;
        anyhow::Ok(created.queue_url.unwrap_or_default())
    };
    let url = create_queue().await?;
    let send = |body: String| {
        let (sqs, url) = (sqs.clone(), url.clone());
        async move {
            sqs.send_message()
                .queue_url(url)
                .message_body(body)
                .send()
                .await?;
            anyhow::Ok(())
        }
    };
    // The sweep is as good as off (1h) for `events-client`, refreshInterval 1h: only an event can
    // deliver its rotation. `swept` has refreshInterval 3s: the sweep checks it every 3 s.
    let settings = Settings {
        sweep_mode: SweepMode::Describe,
        sweep_interval: Duration::from_secs(3600),
        events: Some(mtls_operator::source::events::EventQueue {
            url: url.clone(),
            client: sqs.clone(),
        }),
        ..Settings::default()
    };
    let operator = start_operator_with(&namespace, settings).await?;
    let ca = TestCa::new("events CA")?;
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"refreshInterval": "1h"});
    create_identity(&namespace, &identity("client", &id, spec)?).await?;
    let swept_id = format!("{namespace}/swept");
    put_source(&swept_id, &good_secret(&ca)?).await?;
    let spec = serde_json::json!({"refreshInterval": "3s"});
    create_identity(&namespace, &identity("swept", &swept_id, spec)?).await?;
    wait_ready(&namespace, "client", "True", "Synced").await?;
    wait_ready(&namespace, "swept", "True", "Synced").await?;
    create_deployment(&namespace, "api", Some(("volume", "client"))).await?;
    wait_all_rolled_out(&namespace).await?;
    let before = generations(&namespace).await?;

    // A rotation, announced by an event: the Secret follows, one rollout.
    let version = put_source(&id, &good_secret(&ca)?).await?;
    send(label_updated(&id, &version)).await?;
    let rotation = wait_rotation(&namespace, "client", &version).await?;
    ensure!(rotation.restarted_workloads == vec!["Deployment/api".to_string()]);
    let rolled = generations(&namespace).await?;
    ensure!(
        rolled["Deployment/api"] == before["Deployment/api"] + 1,
        "one rollout"
    );

    // A malformed message, an unknown secret and a duplicate: counted, deleted, nothing changes.
    let handled = events(&operator, "handled");
    send("{this is not json".to_string()).await?;
    send(label_updated(
        &format!("{namespace}/nobody-uses-this"),
        "v9",
    ))
    .await?;
    send(label_updated(&id, &version)).await?;
    wait_for("the three messages to be counted", TIMEOUT, || async {
        ensure!(
            events(&operator, "rejected") >= 1
                && events(&operator, "unknown_secret") >= 1
                && events(&operator, "handled") > handled,
            "not yet"
        );
        Ok(())
    })
    .await?;
    ensure!(
        generations(&namespace).await? == rolled,
        "no rollout from them"
    );
    // Deleted, not merely received: a message received and left to time out is in flight
    // (NotVisible) and would come back.
    // Counted comes before deleted, so this waits; a message never deleted fails it either way.
    use aws_sdk_sqs::types::QueueAttributeName;
    wait_for("every message deleted", TIMEOUT, || async {
        let messages = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await?;
        let count = |name: &QueueAttributeName| {
            messages
                .attributes()
                .and_then(|a| a.get(name))
                .cloned()
                .unwrap_or_default()
        };
        let (visible, in_flight) = (
            count(&QueueAttributeName::ApproximateNumberOfMessages),
            count(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        );
        ensure!(
            visible == "0" && in_flight == "0",
            "{visible} left, {in_flight} in flight"
        );
        Ok(())
    })
    .await?;

    // The queue disappears: the operator says so and keeps working on the sweep.
    sqs.delete_queue().queue_url(&url).send().await?;
    wait_for("the queue errors to be counted", TIMEOUT, || async {
        ensure!(events(&operator, "queue_error") >= 1, "not yet");
        Ok(())
    })
    .await?;
    let swept_version = put_source(&swept_id, &good_secret(&ca)?).await?;
    wait_rotation(&namespace, "swept", &swept_version).await?;

    // It comes back: events work again.
    ensure!(create_queue().await? == url, "the same queue URL");
    let again = put_source(&id, &good_secret(&ca)?).await?;
    send(label_updated(&id, &again)).await?;
    wait_rotation(&namespace, "client", &again).await?;
    Ok(())
}

/// Waits until the operator's `mtls_source_events_healthy` says `healthy`.
async fn wait_events_healthy(operator: &Operator, healthy: bool) -> Result<()> {
    wait_for(&format!("events healthy = {healthy}"), TIMEOUT, || async {
        let now = metric(operator, "mtls_source_events_healthy") == 1;
        ensure!(now == healthy, "not yet");
        Ok(())
    })
    .await
}

/// Every Secrets Manager call per identity per refresh interval, over `intervals` refresh intervals
/// from the next listing on: a measurement window, not a wait for a condition (what is counted is
/// what happens in it).
async fn calls_per_identity_per_refresh(
    endpoint: &common::endpoint::CountingEndpoint,
    identities: usize,
    refresh: Duration,
    intervals: u32,
) -> Result<f64> {
    let from = endpoint.count(Some("ListSecrets"));
    wait_for("a listing", TIMEOUT, || async {
        ensure!(endpoint.count(Some("ListSecrets")) > from, "none yet");
        Ok(())
    })
    .await?;
    let before = endpoint.count(None);
    tokio::time::sleep(refresh * intervals).await;
    let calls = endpoint.count(None) - before;
    Ok(calls as f64 / identities as f64 / f64::from(intervals))
}

/// The shipped defaults' ratio (refreshInterval 1h, sweep 5 min: 12 sweeps per refresh interval),
/// scaled down to 12 s and 1 s: what 100 identities in one namespace cost in `auto` mode per refresh
/// interval, every Secrets Manager call counted at the endpoint, without events (the 5-minute
/// freshness) and with a healthy events queue (the sweep a safety net at the refresh interval).
#[tokio::test]
async fn auto_mode_at_the_default_ratio_costs_a_listing_per_sweep_and_one_per_refresh_with_events()
-> Result<()> {
    const COUNT: usize = 100;
    /// The simulated hour: the identities' refresh interval.
    const REFRESH: Duration = Duration::from_secs(12);
    const HOURS: u32 = 2;
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("auto-cost", &[]).await?;
    let ca = TestCa::new("auto cost CA")?;
    create_fleet_refreshing(&namespace, &ca, COUNT, "12s").await?;
    let scaled = |events| Settings {
        sweep_mode: SweepMode::Auto,
        sweep_interval: Duration::from_secs(1),
        events,
        ..Settings::default()
    };
    let (operator, endpoint) = operator_behind(&namespace, Mode::Pass, scaled(None)).await?;
    wait_all_ready(&namespace, COUNT).await?;
    let without_events = calls_per_identity_per_refresh(&endpoint, COUNT, REFRESH, HOURS).await?;
    drop(operator);

    let (sqs, url) = create_events_queue(&namespace).await?;
    // A message about a secret nobody uses: the queue answers at once, and is healthy.
    sqs.send_message()
        .queue_url(&url)
        .message_body(label_updated(&format!("{namespace}/nobody"), "v1"))
        .send()
        .await?;
    let events = mtls_operator::source::events::EventQueue {
        url: url.clone(),
        client: sqs.clone(),
    };
    let (operator, endpoint) =
        operator_behind(&namespace, Mode::Pass, scaled(Some(events))).await?;
    wait_events_healthy(&operator, true).await?;
    let with_events = calls_per_identity_per_refresh(&endpoint, COUNT, REFRESH, HOURS).await?;
    sqs.delete_queue().queue_url(&url).send().await?;
    println!(
        "auto, {COUNT} identities at the default ratio: {without_events:.3} calls per identity per \
         refresh interval without events, {with_events:.3} with a healthy queue (External Secrets \
         Operator: 1 at its hourly default, 12 at 5-minute freshness)"
    );
    // One listing page per sweep: 12 per refresh interval for 100 identities.
    ensure!(
        without_events <= 0.15,
        "{without_events:.3} calls per identity per refresh interval without events"
    );
    // One listing per refresh interval.
    ensure!(
        with_events <= 0.02,
        "{with_events:.3} calls per identity per refresh interval with events"
    );
    Ok(())
}

/// While the events queue answers, a secret is swept at its identity's refreshInterval (a safety
/// net for lost events), not every sweep interval; once the queue fails, every sweep interval
/// again, at once. Counted at the endpoint: DescribeSecret calls per secret.
#[tokio::test]
async fn healthy_events_stretch_the_sweep_and_a_failed_queue_tightens_it() -> Result<()> {
    let namespace = support::create_namespace("events-stretch", &[]).await?;
    let (sqs, url) = create_events_queue(&namespace).await?;
    let settings = Settings {
        events: Some(mtls_operator::source::events::EventQueue {
            url: url.clone(),
            client: sqs.clone(),
        }),
        ..settings(SweepMode::Describe)
    };
    let (operator, endpoint) = operator_behind(&namespace, Mode::Pass, settings).await?;
    let ca = TestCa::new("stretch CA")?;
    // `quiet` (refreshInterval 1h) is checked every sweep interval (2 s) unless events stretch
    // it; `pulse` (refreshInterval 2s) every 2 s whatever the events do: the test's clock.
    let quiet = format!("{namespace}/quiet");
    let pulse = format!("{namespace}/pulse");
    for (name, id, refresh) in [("quiet", &quiet, "1h"), ("pulse", &pulse, "2s")] {
        put_source(id, &good_secret(&ca)?).await?;
        let spec = serde_json::json!({"refreshInterval": refresh});
        create_identity(&namespace, &identity(name, id, spec)?).await?;
        wait_ready(&namespace, name, "True", "Synced").await?;
    }
    let describes = |id: &String| {
        endpoint
            .requests_for(std::slice::from_ref(id))
            .iter()
            .filter(|seen| seen.operation == "DescribeSecret")
            .count()
    };
    let check_interval = |name: &str| {
        metric(
            &operator,
            &format!(
                "mtls_identity_version_check_interval_seconds{{namespace=\"{namespace}\",name=\"{name}\"}}"
            ),
        )
    };
    let wait_checks = |id: &String, more: usize| {
        let from = describes(id);
        let id = id.clone();
        async move {
            wait_for(&format!("{more} more checks of {id}"), TIMEOUT, || async {
                let done = describes(&id) - from;
                ensure!(done >= more, "{done} so far");
                Ok(())
            })
            .await
        }
    };
    wait_checks(&quiet, 1).await?;

    // An answer from the queue (a message about a secret nobody uses) makes it healthy.
    sqs.send_message()
        .queue_url(&url)
        .message_body(label_updated(&format!("{namespace}/nobody"), "v1"))
        .send()
        .await?;
    wait_events_healthy(&operator, true).await?;
    // Two of pulse's sweeps: the second began after every sweep that began before the queue was
    // healthy had ended, so no check of quiet is still on its way.
    wait_checks(&pulse, 2).await?;
    let quiet_before = describes(&quiet);
    wait_checks(&pulse, 3).await?;
    let quiet_checks = describes(&quiet) - quiet_before;
    println!("healthy events: {quiet_checks} checks of quiet in 3 sweeps of pulse");
    ensure!(
        quiet_checks == 0,
        "quiet was checked {quiet_checks} times in 3 sweep intervals while events were healthy"
    );
    ensure!(
        check_interval("quiet") == 3600 && check_interval("pulse") == 2,
        "check intervals: quiet {}, pulse {}",
        check_interval("quiet"),
        check_interval("pulse")
    );

    // The queue fails: quiet is checked every sweep interval again.
    sqs.delete_queue().queue_url(&url).send().await?;
    wait_events_healthy(&operator, false).await?;
    wait_checks(&quiet, 2).await?;
    ensure!(
        check_interval("quiet") == 2,
        "quiet's check interval is the sweep's again: {}",
        check_interval("quiet")
    );
    Ok(())
}

#[tokio::test]
async fn secrets_manager_calls_in_flight_stay_under_the_cap() -> Result<()> {
    const COUNT: usize = 30;
    const CAP: usize = 3;
    let namespace = support::create_namespace("in-flight", &[]).await?;
    let ca = TestCa::new("in-flight CA")?;
    // Pinned version ids: each identity reads with its own GetSecretValue (no batching), so
    // without a cap they would all be in flight together.
    for index in 0..COUNT {
        let id = format!("{namespace}/client-{index}");
        let version = put_source(&id, &good_secret(&ca)?).await?;
        let spec = serde_json::json!({
            "refreshInterval": "1h",
            "source": {"secretId": id, "versionId": version}
        });
        create_identity(
            &namespace,
            &identity(&format!("client-{index}"), &id, spec)?,
        )
        .await?;
    }
    // Every read held at the endpoint until released: the reads that reach it hold their places in
    // flight, so the cap is exercised by construction, not by timing.
    let endpoint = counting_endpoint(Mode::Pass).await?;
    for index in 0..COUNT {
        endpoint.hold_reads_of(&format!("{namespace}/client-{index}"));
    }
    let base = support::aws_config().await;
    let aws = endpoint.aws_config(&base);
    let source =
        mtls_operator::source::SecretsManagerSource::new(aws.clone()).with_max_in_flight(CAP);
    let operator =
        start_operator_on(&[&namespace], settings(SweepMode::Describe), aws, source).await?;
    wait_for("the cap's worth of reads held", TIMEOUT, || async {
        ensure!(
            endpoint.reads_held() >= CAP,
            "{} held",
            endpoint.reads_held()
        );
        Ok(())
    })
    .await?;
    // Held, the cap's worth reached the endpoint and no more: one more would be over the cap.
    ensure!(
        endpoint.reads_held() == CAP && endpoint.count(Some("GetSecretValue")) == CAP,
        "{} reads reached the endpoint with {CAP} places in flight",
        endpoint.count(Some("GetSecretValue"))
    );
    endpoint.release_reads();
    wait_all_ready(&namespace, COUNT).await?;
    let peak = operator.source.peak_in_flight();
    ensure!(
        peak == CAP as u64,
        "{peak} calls in flight at once; the cap is {CAP}"
    );
    ensure!(operator.source.calls_of("GetSecretValue") >= COUNT as u64);
    Ok(())
}

/// The refresh requests made so far of `name`'s identity: the value status says was honoured.
async fn honoured_refresh(namespace: &str, name: &str) -> Result<Option<String>> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    Ok(identities
        .get(name)
        .await?
        .status
        .and_then(|status| status.last_refresh)
        .map(|refresh| refresh.requested))
}

/// #26: after the cause of an `AccessDenied` is fixed, `mtls-operator refresh --wait` has the
/// identity synced at once with one read, not at its next retry (5 minutes away at
/// `refreshInterval: 1h`), and says how it ended; status and an Event record the request.
#[tokio::test]
async fn a_refresh_after_fixing_access_denied_syncs_at_once_with_one_read() -> Result<()> {
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("refresh-denied", &[]).await?;
    let ca = TestCa::new("refresh CA")?;
    let id = format!("{namespace}/client");
    put_source(&id, &good_secret(&ca)?).await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    endpoint.refuse_reads_of(&id);
    let _operator =
        start_operator_through(&endpoint, &[&namespace], settings(SweepMode::Describe)).await?;
    let spec = serde_json::json!({"refreshInterval": "1h"});
    create_identity(&namespace, &identity("client", &id, spec)?).await?;
    wait_ready(&namespace, "client", "False", "AccessDenied").await?;

    // The resource policy is fixed; the identity's next retry is minutes away.
    endpoint.allow_reads();
    let reads =
        || endpoint.count(Some("GetSecretValue")) + endpoint.count(Some("BatchGetSecretValue"));
    let before = reads();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mtls-operator"))
        .args(["refresh", "-n", &namespace, "client", "--wait"])
        .env("KUBECONFIG", &support::environment().kubeconfig)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "refresh --wait failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(stdout.contains("honoured; Ready=True Synced"), "{stdout}");
    wait_ready(&namespace, "client", "True", "Synced").await?;
    ensure!(
        reads() == before + 1,
        "{} reads for one refresh",
        reads() - before
    );
    let requested = honoured_refresh(&namespace, "client").await?;
    ensure!(
        requested.is_some_and(|requested| stdout.contains(&requested)),
        "status does not echo the request the CLI made: {stdout}"
    );
    wait_event(&namespace, "client", "RefreshHonoured").await?;
    Ok(())
}

/// #26: refresh requests cannot amplify. A hundred, each a new value, made as fast as the API
/// server takes them, are honoured once at once and once more (for the latest) when the first's
/// 10 s are over: one version check each, and one read, of the version rotated behind the
/// operator's back (no events, the sweep an hour away: only the refresh can find it).
#[tokio::test]
async fn a_hundred_refresh_requests_in_a_second_cost_one_read() -> Result<()> {
    let settings = Settings {
        sweep_mode: SweepMode::Describe,
        sweep_interval: Duration::from_secs(3600),
        ..Settings::default()
    };
    let scenario = Scenario::start_with("refresh-storm", settings).await?;
    scenario.put_good("client").await?;
    let spec = serde_json::json!({"refreshInterval": "1h"});
    create_identity(
        &scenario.namespace,
        &identity("client", &scenario.id("client"), spec)?,
    )
    .await?;
    wait_ready(&scenario.namespace, "client", "True", "Synced").await?;
    let (_, rotated) = scenario.put_good("client").await?;

    let source = &scenario.operator.source;
    let reads = || source.calls_of("GetSecretValue") + source.calls_of("BatchGetSecretValue");
    let (reads_before, checks_before) = (reads(), source.calls_of("DescribeSecret"));
    let identities: Api<MtlsIdentity> =
        Api::namespaced(support::admin_client().await?, &scenario.namespace);
    let started = std::time::Instant::now();
    for request in 0..100 {
        let patch = serde_json::json!({"metadata": {"annotations": {
            mtls_operator::api::REFRESH_ANNOTATION: format!("request-{request}")
        }}});
        identities
            .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let requesting = started.elapsed();
    wait_for("the last request honoured", TIMEOUT, || async {
        let honoured = honoured_refresh(&scenario.namespace, "client").await?;
        ensure!(
            honoured.as_deref() == Some("request-99"),
            "honoured: {honoured:?}"
        );
        Ok(())
    })
    .await?;
    let synced = wait_ready(&scenario.namespace, "client", "True", "Synced").await?;
    let version = synced.status.and_then(|status| status.source);
    ensure!(
        version.is_some_and(|source| source.version_id == rotated),
        "the rotated version was not synced"
    );
    ensure!(
        reads() - reads_before == 1,
        "{} reads for 100 requests",
        reads() - reads_before
    );
    // One honoured request per 10 s of requesting, and the one that ends it.
    let honoured_at_most = requesting.as_secs() / 10 + 2;
    let checks = source.calls_of("DescribeSecret") - checks_before;
    ensure!(
        checks <= honoured_at_most,
        "{checks} version checks for 100 requests made in {requesting:?}"
    );
    Ok(())
}
