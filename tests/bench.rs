//! Benchmarks (ignored by the suite; figures go to BENCHMARKS.md). `cargo xtask bench` runs them on a
//! fresh local environment with a release build and prints each figure next to its target; by hand:
//!
//! ```sh
//! eval "$(cargo xtask testenv up)"
//! cargo test --release --test bench -- --ignored --nocapture --test-threads=1
//! cargo xtask testenv down
//! ```
//!
//! `MTLS_BENCH_IDENTITIES` sets the fleet size (default 1000). The operator is the release binary,
//! run as its own process; its Secrets Manager is moto behind the counting endpoint
//! (`common::endpoint`), so calls are counted where AWS would bill them, every retry included.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::endpoint::{CountingEndpoint, Mode};
use common::*;
use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use mtls_operator::api::MtlsIdentity;
use xtask::support::{self, wait_for};

fn fleet_size() -> usize {
    std::env::var("MTLS_BENCH_IDENTITIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

fn ready_count(identities: &[MtlsIdentity]) -> usize {
    identities
        .iter()
        .filter(|i| i.ready_condition().is_some_and(|c| c.status == "True"))
        .count()
}

/// Waits until all `count` identities are Ready (at most an hour from `started`), counted from a
/// watch: listing 10,000 or 50,000 identities every few seconds would cost the shared API server
/// more than the operator's own writes.
async fn wait_all_ready_by_watch(
    identities: &Api<MtlsIdentity>,
    count: usize,
    started: Instant,
) -> Result<()> {
    use kube::runtime::WatchStreamExt;
    let (store, writer) = kube::runtime::reflector::store::<MtlsIdentity>();
    let watch = kube::runtime::watcher(identities.clone(), Default::default())
        .reflect(writer)
        .for_each(|_| std::future::ready(()));
    let watching = tokio::spawn(watch);
    let waited = async {
        loop {
            let ready = store
                .state()
                .iter()
                .filter(|i| i.ready_condition().is_some_and(|c| c.status == "True"))
                .count();
            if ready == count {
                return anyhow::Ok(());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(3600),
                "{ready} of {count} Ready"
            );
            tokio::time::sleep(Duration::from_secs(1)).await; // a poll of local memory
        }
    }
    .await;
    watching.abort();
    waited
}

/// Value reads counted at the endpoint.
fn reads(endpoint: &CountingEndpoint) -> usize {
    endpoint.count(Some("GetSecretValue")) + endpoint.count(Some("BatchGetSecretValue"))
}

/// The release binary watching `namespace`, its Secrets Manager behind `endpoint`; `extra` flags.
fn spawn_operator(
    namespace: &str,
    endpoint: &CountingEndpoint,
    kubeconfig: &std::path::Path,
    extra: &[String],
) -> Result<std::process::Child> {
    let binary = release_binary()?;
    Ok(endpoint
        .operator_command(&binary, namespace, kubeconfig)
        .args(extra)
        .spawn()?)
}

/// SIGTERM, then wait for the exit.
fn stop_operator(mut child: std::process::Child) -> Result<()> {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

/// Secrets `{namespace}/client-0..count` holding `value`, created on moto directly (not timed,
/// not counted), `concurrency` at a time.
async fn create_sources(
    namespace: &str,
    count: usize,
    value: &str,
    concurrency: usize,
) -> Result<()> {
    let sm = support::secrets_manager().await;
    futures::stream::iter(0..count)
        .map(|index| {
            let sm = sm.clone();
            let name = format!("{namespace}/client-{index}");
            async move {
                sm.create_secret()
                    .name(name)
                    .secret_string(value)
                    .send()
                    .await
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            let context = aws_sdk_secretsmanager::error::DisplayErrorContext(&error);
            anyhow::anyhow!("creating the sources: {context}")
        })?;
    Ok(())
}

/// Identities `client-0..count` on the secrets of [`create_sources`], with `refresh`.
async fn create_identities(
    identities: &Api<MtlsIdentity>,
    namespace: &str,
    count: usize,
    refresh: &str,
) -> Result<()> {
    create_identities_sharing(identities, namespace, count, refresh, 1).await
}

/// Like [`create_identities`], `per_secret` identities on each source (`client-N` reads
/// `client-{N / per_secret}`).
async fn create_identities_sharing(
    identities: &Api<MtlsIdentity>,
    namespace: &str,
    count: usize,
    refresh: &str,
    per_secret: usize,
) -> Result<()> {
    let per_secret = per_secret.max(1);
    futures::stream::iter(0..count)
        .map(|index| async move {
            let spec = serde_json::json!({ "refreshInterval": refresh });
            let object = identity(
                &format!("client-{index}"),
                &format!("{namespace}/client-{}", index / per_secret),
                spec,
            )?;
            identities.create(&PostParams::default(), &object).await?;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    Ok(())
}

/// Waits (up to 30 minutes) until all `count` identities are Ready.
async fn wait_fleet_ready(identities: &Api<MtlsIdentity>, count: usize) -> Result<()> {
    wait_for(
        "every identity Ready",
        Duration::from_secs(1800),
        || async {
            let ready = ready_count(&identities.list(&ListParams::default()).await?.items);
            ensure!(ready == count, "{ready} of {count} Ready");
            Ok(())
        },
    )
    .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

/// W1 (cold fleet to Ready, and its reads), W2 (calls per identity per refresh cycle, describe and
/// list modes), W3 (rotation latency with events) and the cost of an operator restart, on one fleet.
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn fleet_cold_start_steady_cost_rotation_latency_and_restart() -> Result<()> {
    let count = fleet_size();
    let refresh = Duration::from_secs(30);
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("bench", &[]).await?;
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let ca = TestCa::new("bench CA")?;
    let value = good_secret(&ca)?;
    // Sources and the event queue first (not timed).
    create_sources(&namespace, count, &value, 16).await?;
    let (sqs, url) = create_events_queue(&namespace).await?;
    let base = support::aws_config().await;
    let endpoint =
        CountingEndpoint::start(base.endpoint_url().unwrap_or_default(), Mode::Pass).await?;
    let flags = |mode: &str| -> Vec<String> {
        let interval = format!("{}s", refresh.as_secs());
        [
            "--sweep-mode",
            mode,
            "--sweep-interval",
            &interval,
            "--events-queue-url",
            &url,
        ]
        .map(|flag| flag.to_string())
        .to_vec()
    };
    let operator = spawn_operator(&namespace, &endpoint, &kubeconfig, &flags("describe"))?;
    // W1: create every identity, then wait until all are Ready.
    let client = support::admin_client().await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    create_identities(
        &identities,
        &namespace,
        count,
        &format!("{}s", refresh.as_secs()),
    )
    .await?;
    let created = started.elapsed();
    wait_fleet_ready(&identities, count).await?;
    let all_ready = started.elapsed();
    println!(
        "W1: {count} identities created in {created:.1?}, all Ready after {all_ready:.1?} \
          (target <= 10 s); {} reads = {:.3} per identity (target <= 0.1): {} BatchGetSecretValue, \
         {} GetSecretValue; {} Secrets Manager calls in all",
        reads(&endpoint),
        reads(&endpoint) as f64 / count as f64,
        endpoint.count(Some("BatchGetSecretValue")),
        endpoint.count(Some("GetSecretValue")),
        endpoint.count(None),
    );

    // W2 (describe): every call over two refresh cycles of an unchanged fleet.
    let steady = |endpoint: &CountingEndpoint| {
        (
            endpoint.count(None),
            reads(endpoint),
            endpoint.count(Some("DescribeSecret")),
        )
    };
    let window = refresh * 2;
    let (calls, reads_before, described) = steady(&endpoint);
    // Measuring a rate over a fixed window, not waiting for a condition.
    tokio::time::sleep(window).await;
    let (calls_after, reads_after, described_after) = steady(&endpoint);
    let cycles = window.as_secs_f64() / refresh.as_secs_f64();
    println!(
        "W2 describe: {} calls in {window:?} = {:.3} per identity per refresh cycle ({} DescribeSecret \
         = {:.2} per secret per sweep, target <= 1; {} value reads, target 0)",
        calls_after - calls,
        (calls_after - calls) as f64 / count as f64 / cycles,
        described_after - described,
        (described_after - described) as f64 / count as f64 / cycles,
        reads_after - reads_before,
    );

    // W3: 50 rotations announced by events; PutSecretValue to the Secret carrying the version.
    let mut latencies = Vec::new();
    for round in 0..50 {
        let name = format!("{namespace}/client-{}", round % count);
        let rotated_at = Instant::now();
        let version = put_source(&name, &good_secret(&ca)?).await?;
        let event = serde_json::json!({
            "source": "aws.secretsmanager",
            "detail-type": "Secret Label Updated",
            "detail": {"name": name, "labelUpdated": "AWSCURRENT", "versionId": version}
        });
        sqs.send_message()
            .queue_url(&url)
            .message_body(event.to_string())
            .send()
            .await?;
        let target = format!("client-{}", round % count);
        wait_for("the rotated Secret", Duration::from_secs(300), || async {
            let secret = get_secret(&namespace, &target).await?;
            let annotations = secret
                .and_then(|s| s.metadata.annotations)
                .unwrap_or_default();
            ensure!(
                annotations.get(mtls_operator::api::VERSION_ID_ANNOTATION) == Some(&version),
                "not yet"
            );
            Ok(())
        })
        .await?;
        latencies.push(rotated_at.elapsed());
    }
    latencies.sort();
    println!(
        "W3 events: 50 rotations, PutSecretValue to Secret updated: p50 {:.2?}, p99 {:.2?}, max {:.2?} (target p99 <= 2 s)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );

    // Restart: a new operator (empty index) in list mode; what it costs to confirm the fleet.
    stop_operator(operator)?;
    let (calls, reads_before, listed_before) = (
        endpoint.count(None),
        reads(&endpoint),
        endpoint.count(Some("ListSecrets")),
    );
    let restarted = spawn_operator(&namespace, &endpoint, &kubeconfig, &flags("list"))?;
    tokio::time::sleep(window).await; // a measurement window, not a condition
    let (calls_after, reads_after, _) = steady(&endpoint);
    let listed = endpoint.count(Some("ListSecrets")) - listed_before;
    println!(
        "Restart + W2 list: {} value reads after the restart (target <= 0.05 per identity: {:.3}); \
         {} calls in {window:?} = {:.3} per identity per refresh cycle (target <= 0.05), {listed} ListSecrets",
        reads_after - reads_before,
        (reads_after - reads_before) as f64 / count as f64,
        calls_after - calls,
        (calls_after - calls) as f64 / count as f64 / cycles,
    );
    let ready = ready_count(&identities.list(&ListParams::default()).await?.items);
    ensure!(ready == count, "{ready} of {count} still Ready");
    stop_operator(restarted)?;
    Ok(())
}

/// Every Secrets Manager call over `window` (`intervals` refresh intervals), by operation, and the
/// calls per identity per refresh interval: a measurement window, not a wait for a condition.
async fn calls_per_identity_per_interval(
    endpoint: &CountingEndpoint,
    window: Duration,
    intervals: u32,
    identities: usize,
) -> (f64, std::collections::BTreeMap<String, usize>) {
    let before = endpoint.seen().len();
    tokio::time::sleep(window).await;
    let seen = endpoint.seen();
    let mut by_operation = std::collections::BTreeMap::<String, usize>::new();
    for call in &seen[before.min(seen.len())..] {
        *by_operation.entry(call.operation.clone()).or_default() += 1;
    }
    let calls: usize = by_operation.values().sum();
    let per = calls as f64 / identities as f64 / f64::from(intervals);
    (per, by_operation)
}

/// W2 at the shipped defaults (`auto` sweep every 5 min, refreshInterval 1h: 12 sweeps per refresh
/// interval), their ratio scaled to `MTLS_BENCH_W2_SWEEP_SECONDS` (default 10 s) and 12 times that:
/// every Secrets Manager call over two refresh intervals (simulated hours) of an unchanged fleet in
/// an account that also holds `MTLS_BENCH_W2_UNRELATED` (default 500) other secrets, without events
/// and with a healthy events queue. Calls per identity per refresh interval are calls per identity
/// per hour at the defaults.
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn w2_calls_per_identity_per_hour_at_the_defaults() -> Result<()> {
    let count = fleet_size();
    let sweep = Duration::from_secs(env_or("MTLS_BENCH_W2_SWEEP_SECONDS", 10));
    let refresh = sweep * 12;
    let unrelated: usize = env_or("MTLS_BENCH_W2_UNRELATED", 500);
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("bench-w2", &[]).await?;
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let ca = TestCa::new("bench W2 CA")?;
    let value = good_secret(&ca)?;
    create_sources(&namespace, count, &value, 16).await?;
    // Other teams' secrets in the same account: a listing filtered by prefix never pages them.
    let others = format!("{namespace}-other");
    create_sources(&others, unrelated, "{}", 16).await?;
    let endpoint = CountingEndpoint::start(
        support::aws_config()
            .await
            .endpoint_url()
            .unwrap_or_default(),
        Mode::Pass,
    )
    .await?;
    let interval = format!("{}s", sweep.as_secs());
    let operator = spawn_operator(
        &namespace,
        &endpoint,
        &kubeconfig,
        &["--sweep-interval".to_string(), interval.clone()],
    )?;
    let client = support::admin_client().await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &namespace);
    create_identities(
        &identities,
        &namespace,
        count,
        &format!("{}s", refresh.as_secs()),
    )
    .await?;
    wait_fleet_ready(&identities, count).await?;
    let window = refresh * 2;
    // From one sweep interval after Ready: the cold start's reads are over.
    tokio::time::sleep(sweep).await;
    let (without_events, by_operation) =
        calls_per_identity_per_interval(&endpoint, window, 2, count).await;
    println!(
        "W2 defaults, auto, no events: {without_events:.3} calls per identity per hour (target <= \
         0.15; ESO 1.0 hourly, 12 at 5-minute freshness): {by_operation:?} over {window:?}"
    );
    stop_operator(operator)?;

    let (sqs, url) = create_events_queue(&namespace).await?;
    let restarted = spawn_operator(
        &namespace,
        &endpoint,
        &kubeconfig,
        &[
            "--sweep-interval".to_string(),
            interval,
            "--events-queue-url".to_string(),
            url.clone(),
        ],
    )?;
    // The restart confirms the fleet with one sweep (nothing read); then the queue is healthy
    // (its first empty long poll answers within 20 s) and the sweep is a safety net.
    tokio::time::sleep(sweep + Duration::from_secs(20)).await;
    let (with_events, by_operation) =
        calls_per_identity_per_interval(&endpoint, window, 2, count).await;
    println!(
        "W2 defaults, auto, healthy events: {with_events:.3} calls per identity per hour (target \
         <= 0.02): {by_operation:?} over {window:?}"
    );
    let monthly = |per_identity_hour: f64, identities: f64| {
        per_identity_hour * identities * 730.0 * 0.05 / 10_000.0
    };
    println!(
        "W2 monthly API cost: no events ${:.2} (1,000) ${:.2} (10,000); events ${:.2} ${:.2}; \
         ESO hourly ${:.2} ${:.2}",
        monthly(without_events, 1000.0),
        monthly(without_events, 10_000.0),
        monthly(with_events, 1000.0),
        monthly(with_events, 10_000.0),
        monthly(1.0, 1000.0),
        monthly(1.0, 10_000.0),
    );
    stop_operator(restarted)?;
    sqs.delete_queue().queue_url(&url).send().await?;
    Ok(())
}

/// Resident memory of process `pid`, in MiB (Linux /proc).
/// CPU seconds used so far by the operator (`pid`) and by each process of the test environment,
/// named by its program (etcd, kube-apiserver, moto, ...).
fn cpu_by_process(pid: u32) -> Vec<(String, f64)> {
    let mut pids = vec![pid];
    pids.extend(support::environment().pids.iter().copied());
    pids.into_iter()
        .filter_map(|pid| {
            let command = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
            let name = command
                .split('\0')
                .take(2)
                .map(|part| part.rsplit('/').next().unwrap_or(part))
                .find(|part| !part.starts_with("python"))
                .unwrap_or("?")
                .to_string();
            Some((format!("{name}[{pid}]"), cpu_seconds(pid).ok()?))
        })
        .collect()
}

/// CPU seconds each process used between two readings.
fn cpu_delta(before: &[(String, f64)], after: &[(String, f64)]) -> String {
    after
        .iter()
        .map(|(name, seconds)| {
            let start = before
                .iter()
                .find(|(other, _)| other == name)
                .map_or(0.0, |(_, seconds)| *seconds);
            format!("{name}: {:.1} s", seconds - start)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn rss_mib(pid: u32) -> Result<f64> {
    proc_status_mib(pid, "VmRSS")
}

/// A `/proc/PID/status` memory line in MiB: `VmRSS`, or its parts `RssAnon` (heap, stacks) and
/// `RssFile` (the binary's pages read from disk).
fn proc_status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// RSS with its anonymous and file-backed parts, for the report.
fn rss_parts(pid: u32) -> Result<String> {
    Ok(format!(
        "anon {:.1} + file {:.1} MiB",
        proc_status_mib(pid, "RssAnon")?,
        proc_status_mib(pid, "RssFile")?
    ))
}

/// The release binary `cargo xtask bench` builds.
/// The release binary, or `MTLS_BENCH_BINARY` (e.g. a build with debug info, for a heap profile),
/// which must exist.
fn release_binary() -> Result<std::path::PathBuf> {
    let binary: std::path::PathBuf = match std::env::var_os("MTLS_BENCH_BINARY") {
        Some(binary) => binary.into(),
        None => std::env::var("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| xtask::project_root().join("target"))
            .join("release")
            .join("mtls-operator"),
    };
    ensure!(
        binary.exists(),
        "{} missing: cargo build --release",
        binary.display()
    );
    Ok(binary)
}

/// W4: the operator's RSS, as its own process (the release binary), with a fleet of identities,
/// then with thousands of unrelated large Secrets in the same namespace (which it must not cache).
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn memory_with_a_large_fleet_and_unrelated_secrets() -> Result<()> {
    let count: usize = std::env::var("MTLS_BENCH_W4_IDENTITIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let unrelated: usize = std::env::var("MTLS_BENCH_W4_UNRELATED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    // moto looks secrets up by scanning them all, so 50,000 distinct secrets take it hours to
    // create and serve: at that scale identities share sources (the per-identity state is what is
    // measured; the per-secret state is the difference at 10,000 with and without sharing).
    let per_secret: usize = env_or("MTLS_BENCH_W4_IDENTITIES_PER_SECRET", 1).max(1);
    let binary = release_binary()?;
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("bench-w4", &[]).await?;
    let ca = TestCa::new("w4 CA")?;
    let value = good_secret(&ca)?;
    create_sources(&namespace, count.div_ceil(per_secret), &value, 32).await?;

    // MTLS_BENCH_W4_HEAPTRACK=DIR runs the operator under heaptrack, which writes its heap profile
    // into DIR (read it with heaptrack_print; the RSS figures are then heaptrack's wrapper's).
    let command = match std::env::var("MTLS_BENCH_W4_HEAPTRACK") {
        Ok(directory) => {
            let mut command = std::process::Command::new("heaptrack");
            command.current_dir(directory).arg(&binary);
            command
        }
        Err(_) => std::process::Command::new(&binary),
    };
    let mut child = operator_on_free_ports(command, &namespace)?
        .args(["--sweep-interval", "5m"])
        .spawn()?;
    let pid = child.id();
    let result = async {
        tokio::time::sleep(Duration::from_secs(2)).await; // a baseline after start-up, not a condition
        let idle = rss_mib(pid)?;
        let idle_parts = rss_parts(pid)?;
        let client = support::admin_client().await?;
        let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &namespace);
        let started = Instant::now();
        create_identities_sharing(&identities, &namespace, count, "1h", per_secret).await?;
        wait_all_ready_by_watch(&identities, count, started).await?;
        let synced = started.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await; // right after the cold sync
        let after_sync = rss_mib(pid)?;
        // The steady state: once the operator has returned what the cold sync freed (it trims its
        // heap every `memory::TRIM_INTERVAL`).
        tokio::time::sleep(mtls_operator::memory::TRIM_INTERVAL).await;
        let with_fleet = rss_mib(pid)?;
        let fleet_parts = rss_parts(pid)?;
        let peak = proc_status_mib(pid, "VmHWM")?;

        // Unrelated 48 KiB Secrets (not the operator's: no label), in the watched namespace.
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(client.clone(), &namespace);
        let blob = "x".repeat(48 * 1024);
        create_secrets(&secrets, unrelated, 16, |index| {
            serde_json::json!({
                "metadata": {"name": format!("unrelated-{index}")},
                "stringData": {"blob": blob}
            })
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(10)).await; // settle before sampling
        let with_unrelated = rss_mib(pid)?;
        println!(
            "W4: RSS {idle:.1} MiB idle ({idle_parts}); {with_fleet:.1} MiB with {count} identities Ready \
             on {} secrets \
             ({fleet_parts}; synced in {synced:.1?}; {:.2} MiB per 1,000; target <= 64 MiB at 10,000; \
             {after_sync:.1} MiB 5 s after the cold sync, peak {peak:.1} MiB); {with_unrelated:.1} MiB \
             after {unrelated} unrelated 48 KiB Secrets (target: flat)",
            count.div_ceil(per_secret),
            (with_fleet - idle) / (count as f64 / 1000.0),
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// W6: the operator's RSS when a tenant pads what it may write (#23 hole 3): Secrets of its own
/// (not the operator's) with 250 KiB of annotations each, and identities whose annotations are
/// padded as much, all there before the operator starts (a start or a takeover lists them all).
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn memory_with_padded_tenant_metadata() -> Result<()> {
    let padded_secrets: usize = env_or("MTLS_BENCH_W6_SECRETS", 300);
    let count: usize = env_or("MTLS_BENCH_W6_IDENTITIES", 100);
    let binary = release_binary()?;
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("bench-w6", &[]).await?;
    let ca = TestCa::new("w6 CA")?;
    create_sources(&namespace, count, &good_secret(&ca)?, 16).await?;
    let client = support::admin_client().await?;
    // Just under the API server's 256 KiB limit on an object's annotations.
    let pad = "x".repeat(250 * 1024);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &namespace);
    create_secrets(&secrets, padded_secrets, 8, |index| {
        serde_json::json!({
            "metadata": {"name": format!("padded-{index}"), "annotations": {"pad": pad}},
            "stringData": {"password": "not the operator's"}
        })
    })
    .await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &namespace);
    futures::stream::iter(0..count)
        .map(|index| {
            let (identities, pad, namespace) = (identities.clone(), pad.clone(), namespace.clone());
            async move {
                let mut object = identity(
                    &format!("client-{index}"),
                    &format!("{namespace}/client-{index}"),
                    serde_json::json!({}),
                )?;
                object.metadata.annotations =
                    Some(std::collections::BTreeMap::from([("pad".to_string(), pad)]));
                identities.create(&PostParams::default(), &object).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut child =
        operator_on_free_ports(std::process::Command::new(&binary), &namespace)?.spawn()?;
    let pid = child.id();
    let result = async {
        let started = Instant::now();
        wait_for("every padded identity Ready", Duration::from_secs(600), || async {
            let ready = ready_count(&identities.list(&ListParams::default()).await?.items);
            ensure!(ready == count, "{ready} of {count} Ready");
            Ok(())
        })
        .await?;
        let synced = started.elapsed();
        let peak = proc_status_mib(pid, "VmHWM")?;
        tokio::time::sleep(mtls_operator::memory::TRIM_INTERVAL).await;
        let steady = rss_mib(pid)?;
        println!(
            "W6: {count} identities and {padded_secrets} Secrets, each with 250 KiB of annotations, \
             there before the start: peak {peak:.1} MiB during the start (target: under the chart's \
             256 MiB limit, far), {steady:.1} MiB steady ({}; synced in {synced:.1?})",
            rss_parts(pid)?
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `command` (the release binary, or a wrapper that runs it) as `run --namespace NAMESPACE` on the
/// test environment, its servers on free loopback ports, logging nothing.
fn operator_on_free_ports(
    command: std::process::Command,
    namespace: &str,
) -> Result<std::process::Command> {
    operator_with_health_on(command, namespace, free_port()?)
}

/// A free loopback port (free when asked: the operator binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Like [`operator_on_free_ports`], its health server on `health_port`.
fn operator_with_health_on(
    mut command: std::process::Command,
    namespace: &str,
    health_port: u16,
) -> Result<std::process::Command> {
    command
        .args(["run", "--namespace", namespace])
        .args(["--metrics-address", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--health-address", &format!("127.0.0.1:{health_port}")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (name, value) in support::environment().variables() {
        command.env(name, value);
    }
    Ok(command)
}

/// `count` Secrets made by `secret(index)`, created `concurrency` at a time.
async fn create_secrets(
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    count: usize,
    concurrency: usize,
    secret: impl Fn(usize) -> serde_json::Value,
) -> Result<()> {
    futures::stream::iter(0..count)
        .map(|index| {
            let made = serde_json::from_value(secret(index));
            async move {
                let secret: k8s_openapi::api::core::v1::Secret = made?;
                secrets.create(&PostParams::default(), &secret).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Bounded load (#14): the release binary as its own process, its Secrets Manager behind the
/// counting endpoint granting only `MTLS_BENCH_LOAD_QUOTA` calls per second (default 20) to a
/// fleet of `MTLS_BENCH_LOAD_IDENTITIES` (default 2,000) whose naive polling would need more
/// (describe sweep every `MTLS_BENCH_LOAD_REFRESH_SECONDS`, default 60). All Ready, then
/// `MTLS_BENCH_LOAD_OBSERVE_SECONDS` (default 300) watching for Ready=False; calls counted at the
/// endpoint, throttled ones included. Then a second process started cold on the whole fleet and sent
/// SIGTERM with its reconciles queued: how long it takes to exit.
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn bounded_load_under_a_quota() -> Result<()> {
    let count: usize = env_or("MTLS_BENCH_LOAD_IDENTITIES", 2000);
    let quota: u32 = env_or("MTLS_BENCH_LOAD_QUOTA", 20);
    let refresh: u64 = env_or("MTLS_BENCH_LOAD_REFRESH_SECONDS", 60);
    let observe: u64 = env_or("MTLS_BENCH_LOAD_OBSERVE_SECONDS", 300);
    let mode: String = env_or("MTLS_BENCH_LOAD_SWEEP_MODE", "describe".to_string());
    install_crd_and_rbac().await?;
    let namespace = support::create_namespace("bench-load", &[]).await?;
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let ca = TestCa::new("load CA")?;
    let value = good_secret(&ca)?;
    create_sources(&namespace, count, &value, 32).await?;
    let base = support::aws_config().await;
    let moto = base.endpoint_url().unwrap_or_default().to_string();
    let endpoint = CountingEndpoint::start(&moto, Mode::Quota(quota)).await?;

    let spawn = || {
        let interval = format!("{refresh}s");
        let flags = ["--sweep-mode", &mode, "--sweep-interval", &interval];
        spawn_operator(
            &namespace,
            &endpoint,
            &kubeconfig,
            &flags.map(|flag| flag.to_string()),
        )
    };
    // Created before the operator starts, the cold start is timed apart from the API server's
    // pace of creating 10,000 objects (W1's cold start); otherwise the two overlap.
    let precreate: bool = env_or("MTLS_BENCH_LOAD_PRECREATE", false);
    let client = support::admin_client().await?;
    let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &namespace);
    if precreate {
        let created = Instant::now();
        create_identities(&identities, &namespace, count, &format!("{refresh}s")).await?;
        println!(
            "LOAD: {count} identities created in {:.1?} before the operator started",
            created.elapsed()
        );
    }
    let api_before = apiserver_requests(&client).await?;
    let mut child = spawn()?;
    let pid = child.id();
    let cpu_before = cpu_by_process(pid);
    let result = async {
        let started = Instant::now();
        if !precreate {
            create_identities(&identities, &namespace, count, &format!("{refresh}s")).await?;
            println!(
                "LOAD: {count} identities created in {:.1?}",
                started.elapsed()
            );
        }
        wait_all_ready_by_watch(&identities, count, started).await?;
        let synced = started.elapsed();
        let api_after = apiserver_requests(&client).await?;
        println!(
            "LOAD: CPU used to Ready in {:.0} s on {} cores: {} (this bench's own process is \
             not counted)",
            started.elapsed().as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |cores| cores.get()),
            cpu_delta(&cpu_before, &cpu_by_process(pid))
        );
        println!(
            "LOAD: API server requests to Ready by verb and resource (the bench's own included): {}",
            request_delta(&api_before, &api_after)
        );
        let calls_to_ready = endpoint.count(None);
        let mut to_ready = std::collections::BTreeMap::<String, usize>::new();
        for call in endpoint.seen() {
            *to_ready.entry(call.operation).or_default() += 1;
        }
        println!("LOAD: calls to Ready by operation: {to_ready:?}");
        let observed_from = Instant::now();
        let mut most_not_ready = 0;
        while observed_from.elapsed() < Duration::from_secs(observe) {
            let listed = identities.list(&ListParams::default()).await?.items;
            most_not_ready = most_not_ready.max(count - ready_count(&listed));
            tokio::time::sleep(Duration::from_secs(10)).await; // a sampling period, not a condition
        }
        let seen = endpoint.seen();
        let in_observation = seen.iter().filter(|s| s.at >= observed_from).count();
        let throttled = seen.iter().filter(|s| !s.forwarded).count();
        let peak = endpoint.peak_rate(started, Duration::from_secs(10));
        let rss = rss_mib(pid)?;
        println!(
            "LOAD: {count} identities, quota {quota} calls/s, {mode} sweep every {refresh} s \
             (naive need {:.1} calls/s): all Ready after {synced:.1?} ({calls_to_ready} calls); \
             then {observe} s observed: at most {most_not_ready} not Ready (target 0); peak \
             {peak:.1} calls/s over 10 s windows (target <= {:.0}), {:.1} calls/s on average; \
             {throttled} of {} calls throttled; RSS {rss:.1} MiB",
            count as f64 / refresh as f64,
            1.5 * f64::from(quota),
            in_observation as f64 / observe as f64,
            seen.len(),
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result?;

    // SIGTERM with the whole fleet queued: a fresh process lists every identity at once.
    let mut cold = spawn()?;
    let cold_pid = cold.id();
    let calls_before = endpoint.count(None);
    wait_for(
        "the new process to start calling",
        Duration::from_secs(60),
        || async {
            ensure!(endpoint.count(None) > calls_before, "no call yet");
            Ok(())
        },
    )
    .await?;
    let signalled = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &cold_pid.to_string()])
        .status()?;
    let exited = loop {
        if cold.try_wait()?.is_some() {
            break signalled.elapsed();
        }
        if signalled.elapsed() > Duration::from_secs(60) {
            let _ = cold.kill();
            let _ = cold.wait();
            anyhow::bail!("still running 60 s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "LOAD: SIGTERM to a process starting on {count} identities: exited after {exited:.1?} \
         (bound: --shutdown-drain 10 s, terminationGracePeriodSeconds 30 s)"
    );
    Ok(())
}

/// The API server's own request counters (`apiserver_request_total`), summed by verb and
/// resource: what a run cost the control plane, counted where it is served.
async fn apiserver_requests(
    client: &kube::Client,
) -> Result<std::collections::BTreeMap<String, f64>> {
    let request = hyper::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let key = format!("{} {}", label("verb"), label("resource"));
        *counts.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(counts)
}

/// The counters that grew between two readings, largest first.
fn request_delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> String {
    let mut grown: Vec<(String, f64)> = after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, grown)| *grown >= 1.0)
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1));
    grown
        .iter()
        .map(|(key, grown)| format!("{key}: {grown:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Milliseconds one `GET /healthz` on `port` took to be answered (an error if it was not).
fn healthz_ms(port: u16) -> Result<f64> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// CPU time (user and system) process `pid` has used so far, in seconds (`/proc/PID/stat`,
/// clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state field.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// What one W7 phase measured.
struct Phase {
    attack: &'static str,
    /// Median and worst time from a rotation to the victim's Secret holding it.
    detection: (Duration, Duration),
    rotations: usize,
    repair: Duration,
    cpu_percent: f64,
    rss_max: f64,
    healthz_worst_ms: f64,
    calls_per_second: f64,
}

/// One W7 phase: while `attack` goes on (already started), the victim's Secret is deleted, then
/// its source rotated again and again for at least `least` (three times at least), each timed
/// until the operator has acted; meanwhile `/healthz` and RSS are sampled every 200 ms; CPU and
/// Secrets Manager calls are taken over the whole phase.
async fn measure_phase(
    attack: &'static str,
    pid: u32,
    health_port: u16,
    endpoint: &CountingEndpoint,
    victim: &str,
    ca: &TestCa,
    least: Duration,
) -> Result<Phase> {
    let started = Instant::now();
    let (cpu_before, calls_before) = (cpu_seconds(pid)?, endpoint.count(None));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::task::spawn_blocking(move || {
            let (mut worst, mut rss, mut failures) = (0.0_f64, 0.0_f64, 0);
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                match healthz_ms(health_port) {
                    Ok(ms) => worst = worst.max(ms),
                    Err(_) => failures += 1,
                }
                rss = rss.max(rss_mib(pid).unwrap_or_default());
                std::thread::sleep(Duration::from_millis(200));
            }
            (worst, rss, failures)
        })
    };
    let client = support::admin_client().await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, victim);
    let deleted_at = Instant::now();
    secrets.delete("client", &Default::default()).await?;
    wait_for("the victim's Secret recreated", TIMEOUT, || async {
        ensure!(get_secret(victim, "client").await?.is_some(), "absent");
        Ok(())
    })
    .await?;
    let repair = deleted_at.elapsed();
    // Rotations one after another until the phase has lasted `least` (three at least): where a
    // rotation falls in the victim's 10 s cadence decides most of its detection time.
    let id = format!("{victim}/client");
    let mut detections = Vec::new();
    while detections.len() < 3 || started.elapsed() < least {
        let rotated_at = Instant::now();
        let version = put_source(&id, &good_secret(ca)?).await?;
        wait_secret_version("the victim's rotation", victim, "client", &version).await?;
        detections.push(rotated_at.elapsed());
    }
    detections.sort();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (healthz_worst_ms, rss_max, failures) = sampler.await?;
    ensure!(
        failures == 0,
        "{failures} health checks went unanswered during {attack}"
    );
    let wall = started.elapsed().as_secs_f64();
    let phase = Phase {
        attack,
        detection: (
            percentile(&detections, 0.5),
            detections.last().copied().unwrap_or_default(),
        ),
        rotations: detections.len(),
        repair,
        cpu_percent: 100.0 * (cpu_seconds(pid)? - cpu_before) / wall,
        rss_max,
        healthz_worst_ms,
        calls_per_second: (endpoint.count(None) - calls_before) as f64 / wall,
    };
    println!(
        "W7 | {:<46} | detected median {:>6.1?} worst {:>6.1?} of {} | recreated {:>6.1?} | CPU {:>5.1} % | RSS ≤ {:>5.1} MiB | /healthz worst {:>6.1} ms | {:>5.1} calls/s",
        phase.attack,
        phase.detection.0,
        phase.detection.1,
        phase.rotations,
        phase.repair,
        phase.cpu_percent,
        phase.rss_max,
        phase.healthz_worst_ms,
        phase.calls_per_second
    );
    Ok(phase)
}

/// Deletes every MtlsIdentity in `namespace`: the attack from there stops.
async fn stop_attack(namespace: &str) -> Result<()> {
    let client = support::admin_client().await?;
    Api::<MtlsIdentity>::namespaced(client, namespace)
        .delete_collection(&Default::default(), &ListParams::default())
        .await?;
    Ok(())
}

/// W7 (#23): the attacks of one namespace on the others, side by side in one run. One operator
/// (the release binary, its own process) serves a victim namespace and one namespace per attack,
/// at 10 Secrets Manager calls a second; the victim's identity refreshes every 10 s. Each phase
/// times the victim's rotation being synced and its deleted Secret recreated, and takes the
/// operator's CPU, peak RSS, worst `/healthz` answer and calls per second, first with no attack,
/// then with each attack alone: forged keystores with a million KDF rounds re-forged every second
/// (hole 1), 60 secrets checked every second (hole 2), 10 rotations held pending by paused
/// Deployments (hole 5), and 10 secrets whose reads are all refused (holes 6 and 7).
/// `cargo xtask test --test bench -- --ignored attacks_side_by_side --nocapture`
/// (`MTLS_BENCH_W7_SECONDS`, each phase's least length, default 60).
#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn attacks_side_by_side() -> Result<()> {
    let least = Duration::from_secs(env_or("MTLS_BENCH_W7_SECONDS", 60));
    let binary = release_binary()?;
    install_crd_and_rbac().await?;
    let endpoint = counting_endpoint(Mode::Pass).await?;
    let victim = support::create_namespace("w7-victim", &[]).await?;
    let kdf = support::create_namespace("w7-kdf", &[]).await?;
    let sweep = support::create_namespace("w7-sweep", &[]).await?;
    let pending = support::create_namespace("w7-pending", &[]).await?;
    let denied = support::create_namespace("w7-denied", &[]).await?;
    let ca = TestCa::new("w7 CA")?;
    let client = support::admin_client().await?;
    put_source(&format!("{victim}/client"), &good_secret(&ca)?).await?;
    create_identity(
        &victim,
        &identity(
            "client",
            &format!("{victim}/client"),
            serde_json::json!({"refreshInterval": "10s"}),
        )?,
    )
    .await?;
    let namespaces = [&victim, &kdf, &sweep, &pending, &denied]
        .map(|namespace| namespace.as_str())
        .join(",");
    let health_port = free_port()?;
    let mut command = operator_with_health_on(
        std::process::Command::new(&binary),
        &namespaces,
        health_port,
    )?;
    command
        .env("AWS_ENDPOINT_URL", &endpoint.url)
        .env("MAX_AWS_CALLS_PER_SECOND", "10")
        .env("SWEEP_INTERVAL", "10s");
    let mut child = command.spawn()?;
    let pid = child.id();
    let result = async {
        wait_ready(&victim, "client", "True", "Synced").await?;
        let mut phases = vec![
            measure_phase("none", pid, health_port, &endpoint, &victim, &ca, least).await?,
        ];

        // Hole 1: keystores the tenant re-forges every second with a million KDF rounds.
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &kdf);
        let password: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "keystore-pass"}, "stringData": {"password": "pass-w7"}
        }))?;
        secrets.create(&PostParams::default(), &password).await?;
        let keystores = serde_json::json!({"refreshInterval": "1s", "target": {"keystores": {
            "pkcs12": {"passwordSecretRef": {"name": "keystore-pass", "key": "password"}}}}});
        put_source(&format!("{kdf}/client"), &good_secret(&ca)?).await?;
        for n in 0..4 {
            create_identity(&kdf, &identity(&format!("client-{n}"), &format!("{kdf}/client"), keystores.clone())?).await?;
        }
        wait_all_ready(&kdf, 4).await?;
        let dir = tempdir("w7-kdf")?;
        let forged = openssl_pkcs12(&dir, &TestCa::new("attacker")?.leaf(&LeafOptions::default())?, "pass-w7", 1_000_000)?;
        let forging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let forger = {
            let (forging, secrets) = (forging.clone(), secrets.clone());
            tokio::spawn(async move {
                while forging.load(std::sync::atomic::Ordering::Relaxed) {
                    for n in 0..4 {
                        let patch = serde_json::json!({"data": {"keystore.p12": k8s_openapi::ByteString(forged.clone())}});
                        let _ = secrets
                            .patch(&format!("client-{n}"), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                            .await;
                    }
                    // The attacker's pace, not a wait for a condition.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        phases.push(measure_phase("hole 1: 4 keystores re-forged every second", pid, health_port, &endpoint, &victim, &ca, least).await?);
        forging.store(false, std::sync::atomic::Ordering::Relaxed);
        forger.await?;
        stop_attack(&kdf).await?;

        // Hole 2: more version checks than the rate grants (60 secrets every second, 10 calls/s).
        create_sources(&sweep, 60, &good_secret(&ca)?, 16).await?;
        let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &sweep);
        create_identities(&identities, &sweep, 60, "1s").await?;
        wait_for("the sweep attacker's identities Ready", Duration::from_secs(300), || async {
            let ready = ready_count(&identities.list(&ListParams::default()).await?.items);
            ensure!(ready == 60, "{ready} of 60");
            Ok(())
        })
        .await?;
        phases.push(measure_phase("hole 2: 60 secrets checked every second", pid, health_port, &endpoint, &victim, &ca, least).await?);
        stop_attack(&sweep).await?;

        // Hole 5: rotations held pending by paused Deployments (each reconciling every 2 s).
        create_sources(&pending, 10, &good_secret(&ca)?, 16).await?;
        let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &pending);
        create_identities(&identities, &pending, 10, "1h").await?;
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &pending);
        for n in 0..10 {
            wait_ready(&pending, &format!("client-{n}"), "True", "Synced").await?;
            create_deployment(&pending, &format!("api-{n}"), Some(("volume", &format!("client-{n}")))).await?;
        }
        wait_all_rolled_out(&pending).await?;
        for n in 0..10 {
            let pause = serde_json::json!({"spec": {"paused": true}});
            deployments.patch(&format!("api-{n}"), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&pause)).await?;
        }
        for n in 0..10 {
            put_source(&format!("{pending}/client-{n}"), &good_secret(&ca)?).await?;
        }
        for n in 0..10 {
            wait_event(&pending, &format!("client-{n}"), "RolloutPaused").await?;
        }
        phases.push(measure_phase("hole 5: 10 rotations held pending", pid, health_port, &endpoint, &victim, &ca, least).await?);
        stop_attack(&pending).await?;

        // Holes 6 and 7: every read of 10 secrets refused (a KMS key or resource policy), rotated.
        create_sources(&denied, 10, &good_secret(&ca)?, 16).await?;
        let identities: Api<MtlsIdentity> = Api::namespaced(client.clone(), &denied);
        create_identities(&identities, &denied, 10, "10s").await?;
        wait_all_ready(&denied, 10).await?;
        for n in 0..10 {
            let id = format!("{denied}/client-{n}");
            endpoint.refuse_reads_of(&id);
            put_source(&id, &good_secret(&ca)?).await?;
        }
        phases.push(measure_phase("holes 6, 7: 10 secrets whose reads are refused", pid, health_port, &endpoint, &victim, &ca, least).await?);
        stop_attack(&denied).await?;
        let baseline = &phases[0];
        for phase in &phases[1..] {
            println!(
                "W7 | {:<46} | median detection ×{:.2}, CPU {:+.1} points, calls/s ×{:.2} against no attack",
                phase.attack,
                phase.detection.0.as_secs_f64() / baseline.detection.0.as_secs_f64().max(0.001),
                phase.cpu_percent - baseline.cpu_percent,
                phase.calls_per_second / baseline.calls_per_second.max(0.001),
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}
