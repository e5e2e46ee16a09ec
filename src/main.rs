//! `mtls-operator run | crd | check | refresh | proxy`, and `--version`.

// Nothing a user or a server controls may panic the process: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mtls_operator::api::duration_flag;
use mtls_operator::controller::{self, Settings};
use mtls_operator::health::Readiness;
use mtls_operator::leader::{self, LeaderSettings};
use mtls_operator::metrics::Metrics;
use mtls_operator::restart::RestartLimits;
use mtls_operator::source::SecretsManagerSource;
use mtls_operator::source::fleet::SweepMode;
use mtls_operator::source::policy::SourcePolicy;
use tracing::{error, info, warn};

/// How long releasing the leader Lease may take after the drain, at most.
const LEASE_RELEASE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(name = "mtls-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print the MtlsIdentity CustomResourceDefinition as YAML.
    Crd,
    /// Check certificate material with the operator's own rules before storing or rotating it:
    /// from files or from Secrets Manager (read only). Exit 0: it would sync; 1: it would not.
    Check(Box<mtls_operator::check::CheckArgs>),
    /// Ask the operator to check an identity's source now and read it where needed (after fixing
    /// an IAM policy, a KMS grant or a bad version): sets its refresh-requested-at annotation.
    Refresh(Box<mtls_operator::refresh::RefreshArgs>),
    /// Egress mTLS proxy: plain HTTP in, mutual TLS to one upstream with the mounted certificate,
    /// reloaded on rotation without a restart (as a sidecar, or operator-managed via spec.egress).
    Proxy(Box<mtls_operator::proxy::ProxyArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only these namespaces, comma-separated or repeated (default: all namespaces). The
    /// operator then needs RBAC only in them.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Secrets Manager secrets a namespace may read: globs with a `{namespace}` placeholder,
    /// comma-separated or repeated. Default `{namespace}/*`. Name patterns apply to the operator's
    /// own account only; `arn:` patterns (matched against the whole ARN) allow other accounts.
    #[arg(
        long = "allowed-source",
        env = "ALLOWED_SOURCES",
        value_delimiter = ','
    )]
    allowed_sources: Vec<String>,
    /// IAM roles a namespace may have the operator assume (`spec.source.roleArn`) to read secrets
    /// of another account: ARN globs with a `{namespace}` placeholder, repeated or comma-separated
    /// (split only before `arn:`, since role names may contain commas), e.g.
    /// `arn:aws:iam::111122223333:role/mtls/{namespace}`. Default: none.
    #[arg(long = "allowed-role", env = "ALLOWED_ROLES")]
    allowed_roles: Vec<String>,
    /// Regions identities may read from, comma-separated (default: the operator's own region).
    #[arg(
        long = "allowed-region",
        env = "ALLOWED_REGIONS",
        value_delimiter = ','
    )]
    allowed_regions: Vec<String>,
    /// The operator's own AWS account (default: STS GetCallerIdentity).
    #[arg(long, env = "AWS_ACCOUNT_ID")]
    aws_account_id: Option<String>,
    /// Per-namespace sessions: every read for namespace N goes through a session of this role (of
    /// the operator's account) assumed with the session tag `kubernetes-namespace=N`, and a
    /// `spec.source.roleArn` is assumed with the same tags, so that IAM policies using
    /// `${aws:PrincipalTag/kubernetes-namespace}` hold each namespace to its own secrets
    /// (examples/tenant-role.*.json). Default: the operator's own credentials.
    #[arg(long, env = "TENANT_ROLE_ARN")]
    tenant_role_arn: Option<String>,
    /// This cluster's name, sent as the session tag `kubernetes-cluster` of per-namespace sessions.
    #[arg(long, env = "CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Role sessions and clients kept at most (least recently used dropped beyond it). With
    /// --tenant-role-arn there is one per namespace with identities: keep it at least that many.
    #[arg(long, env = "MAX_ROLE_SESSIONS", default_value_t = mtls_operator::source::DEFAULT_MAX_SESSIONS)]
    max_role_sessions: usize,
    /// Most rolling restarts in progress at once, across all identities: a mass rotation queues.
    #[arg(long, env = "MAX_ROLLOUTS", default_value_t = 10)]
    max_rollouts: usize,
    /// Most rolling restarts in progress at once in one namespace (its fair share of the above).
    #[arg(long, env = "MAX_ROLLOUTS_PER_NAMESPACE", default_value_t = 3)]
    max_rollouts_per_namespace: usize,
    /// A rollout not finished after this long gives its slot back (Event RestartStalled).
    #[arg(long, env = "ROLLOUT_DEADLINE", default_value = "10m", value_parser = duration_flag)]
    rollout_deadline: Duration,
    /// Allow `spec.restart.policy: Annotate`, which patches Pods (needs RBAC pods: list, patch; the
    /// chart's restart.annotate.enabled grants it).
    #[arg(long, env = "ENABLE_ANNOTATE")]
    enable_annotate: bool,
    /// Where operator-managed egress proxies' admin (metrics) port may be reached from: a JSON array
    /// of NetworkPolicy peers. Default: nowhere.
    #[arg(long, env = "EGRESS_ADMIN_FROM")]
    egress_admin_from: Option<String>,
    /// Let `spec.egress.allowFrom` name peers in other namespaces (a `namespaceSelector` other than
    /// the identity's own namespace). Default: refused (`EgressNotAllowed`).
    #[arg(long, env = "EGRESS_ALLOW_PEERS_OUTSIDE_NAMESPACE")]
    egress_allow_peers_outside_namespace: bool,
    /// Let `spec.egress.allowFrom` name `ipBlock` peers. Default: refused.
    #[arg(long, env = "EGRESS_ALLOW_IP_BLOCKS")]
    egress_allow_ip_blocks: bool,
    /// Let `spec.egress.upstream` be on loopback, link-local (cloud metadata), or an in-cluster name
    /// (`*.svc`, `*.cluster.local`, a name without a dot, `localhost`). Default: refused.
    #[arg(long, env = "EGRESS_ALLOW_INTERNAL_UPSTREAMS")]
    egress_allow_internal_upstreams: bool,
    /// Address ranges no `spec.egress.upstream` may be in, e.g. the cluster's service, pod and node
    /// CIDRs; comma-separated or repeated.
    #[arg(
        long = "egress-denied-upstream-cidr",
        env = "EGRESS_DENIED_UPSTREAM_CIDRS",
        value_delimiter = ','
    )]
    egress_denied_upstream_cidrs: Vec<String>,
    /// How secret versions are checked between reads: `describe` (DescribeSecret per distinct
    /// secret), `list` (ListSecrets pages: fewest calls, needs ListSecrets on *), `get` (no sweep:
    /// values are read again at each identity's refreshInterval).
    #[arg(long, env = "SWEEP_MODE", value_enum, default_value_t = SweepMode::Auto)]
    sweep_mode: SweepMode,
    /// How often the sweep checks each secret's version at most (an identity's shorter
    /// refreshInterval wins for its secret).
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "5m", value_parser = duration_flag)]
    sweep_interval: Duration,
    /// SQS queue URL fed by an EventBridge rule on Secrets Manager events: rotations are seen in
    /// seconds (needs sqs:ReceiveMessage and sqs:DeleteMessage on it). None: the sweep alone.
    #[arg(long, env = "EVENTS_QUEUE_URL")]
    events_queue_url: Option<String>,
    /// Reconciles running at once: bounds the load on the API server and AWS when many
    /// identities are due together.
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = 64)]
    max_concurrent_reconciles: u16,
    /// Synced Events (an identity's first sync) published per second once the burst is spent;
    /// the rest are counted in mtls_synced_events_skipped_total. Rotated and Warning Events are
    /// never held back.
    #[arg(long, env = "SYNCED_EVENT_RATE", default_value_t = controller::events::SYNCED_EVENT_RATE)]
    synced_event_rate: f64,
    /// Synced Events published at once before --synced-event-rate applies.
    #[arg(long, env = "SYNCED_EVENT_BURST", default_value_t = controller::events::SYNCED_EVENT_BURST)]
    synced_event_burst: u32,
    /// Secrets Manager calls in flight at once (reads, batches, sweeps), for the whole operator.
    #[arg(long, env = "MAX_AWS_IN_FLIGHT", default_value_t = mtls_operator::source::DEFAULT_MAX_IN_FLIGHT)]
    max_aws_in_flight: usize,
    /// Secrets Manager calls per second per region at most (the ceiling of the adaptive rate,
    /// which halves on throttling and grows back while calls succeed).
    #[arg(long, env = "MAX_AWS_CALLS_PER_SECOND", default_value_t = mtls_operator::source::rate::DEFAULT_CALLS_PER_SECOND)]
    max_aws_calls_per_second: f64,
    /// Only MtlsIdentities matching this label selector (shard identities over several operators).
    #[arg(long, env = "IDENTITY_SELECTOR")]
    identity_selector: Option<String>,
    /// Act on `spec.egress`: create operator-managed egress proxies (needs RBAC on Deployments and
    /// Services; the chart's `egress.enabled` grants it).
    #[arg(long, env = "ENABLE_EGRESS")]
    enable_egress: bool,
    /// Image of the egress proxies: the operator's own (the chart sets it).
    #[arg(
        long,
        env = "PROXY_IMAGE",
        default_value = "ghcr.io/mtls-operator/mtls-operator:0.1.0"
    )]
    proxy_image: String,
    /// Address of /healthz and /readyz.
    #[arg(long, env = "HEALTH_ADDRESS", default_value = "0.0.0.0:8081")]
    health_address: SocketAddr,
    /// Address of /metrics (Prometheus text format).
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: SocketAddr,
    /// Reconcile only while holding a coordination.k8s.io Lease (for several replicas).
    #[arg(long, env = "LEADER_ELECTION")]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "mtls-operator")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// The Secret, in the operator's own namespace (`--lease-namespace`), that holds the key of the
    /// integrity tags on the Secrets it writes; created with a random key when absent.
    #[arg(long, env = "INTEGRITY_KEY_SECRET", default_value = controller::integrity::DEFAULT_SECRET_NAME)]
    integrity_key_secret: String,
    /// How long a leader's claim lasts without renewal (a Go-style duration, whole seconds).
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = duration_flag)]
    lease_duration: Duration,
    /// After SIGTERM, how long in-flight reconciles may take to finish before the process exits
    /// anyway (queued work is left to the successor). Keep it below the pod's
    /// terminationGracePeriodSeconds (30 s in the chart).
    #[arg(long, env = "SHUTDOWN_DRAIN", default_value = "10s", value_parser = duration_flag)]
    shutdown_drain: Duration,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match mtls_operator::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("cannot render the CRD: {error}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Check(args) => exit_code(run_once(mtls_operator::check::run(*args))),
        Command::Refresh(args) => exit_code(match run_once(mtls_operator::refresh::run(*args)) {
            Some(Ok(succeeded)) => Some(succeeded),
            Some(Err(error)) => {
                eprintln!("{error:#}");
                Some(false)
            }
            None => None,
        }),
        Command::Proxy(args) => {
            mtls_operator::telemetry::init();
            block_on("proxy", async move {
                mtls_operator::proxy::run(*args, shutdown_signal())
                    .await
                    .map_err(|error| anyhow::anyhow!("{}: {error}", error.reason()))
            })
        }
        Command::Run(args) => {
            mtls_operator::memory::tune();
            mtls_operator::telemetry::init();
            block_on("operator", run(*args))
        }
    }
}

/// Runs a one-shot command on a single-threaded runtime; `None` if none could be started.
fn run_once<T>(future: impl std::future::Future<Output = T>) -> Option<T> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime.block_on(future)),
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            None
        }
    }
}

/// A one-shot command's exit: 0 when it succeeded.
fn exit_code(succeeded: Option<bool>) -> std::process::ExitCode {
    match succeeded {
        Some(true) => std::process::ExitCode::SUCCESS,
        _ => std::process::ExitCode::FAILURE,
    }
}

/// Runs `future` on a multi-threaded runtime; logs the error it ends with.
fn block_on(
    what: &str,
    future: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!(error = format!("{error:#}"), "{what} stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let trimming = tokio::spawn(mtls_operator::memory::trim_periodically());
    let result = run_operator(args).await;
    trimming.abort();
    result
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    // The source policy, checked before anything else. The account and regions the flags leave
    // open come from the AWS configuration (`with_aws_defaults` below).
    let tenant_role = args.tenant_role_arn.clone().filter(|arn| !arn.is_empty());
    let tenant_role_arn = tenant_role
        .as_deref()
        .map(|arn| {
            mtls_operator::source::id::parse_role_arn(arn)
                .map_err(|error| anyhow::anyhow!("--tenant-role-arn {arn:?}: {error}"))
        })
        .transpose()?;
    let policy = SourcePolicy::new(
        args.allowed_sources.clone(),
        args.aws_account_id.clone(),
        args.allowed_regions.clone(),
    )
    .with_allowed_roles(
        args.allowed_roles
            .iter()
            .flat_map(|value| mtls_operator::source::policy::split_role_patterns(value))
            .collect(),
    )
    .with_tenant_role(tenant_role);
    // A pattern that lets one namespace match another's names.
    let ambiguous = policy.ambiguous_patterns();
    if !ambiguous.is_empty() {
        anyhow::bail!(
            "--allowed-source/--allowed-role patterns {ambiguous:?}: {{namespace}} must stand next to \
             a character no namespace name holds (such as `/`), or at an end: with `{{namespace}}-*`, \
             namespace team-a also matches team-a-b's names. Use e.g. `{{namespace}}/*`"
        );
    }
    let cluster_name = args.cluster_name.clone().filter(|name| !name.is_empty());
    if let Some(name) = &cluster_name
        && !is_session_tag_value(name)
    {
        anyhow::bail!(
            "--cluster-name {name:?} is not an STS session tag value (at most 256 letters, digits, \
             spaces and _.:/=+-@)"
        );
    }
    let client = kube::Client::try_default().await?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let metrics = Arc::new(Metrics::new());
    let source = Arc::new(
        SecretsManagerSource::new(aws.clone())
            .with_metrics(metrics.clone())
            .with_max_in_flight(args.max_aws_in_flight)
            .with_max_calls_per_second(args.max_aws_calls_per_second)
            .with_max_sessions(args.max_role_sessions)
            .with_cluster_name(cluster_name.clone()),
    );
    let rollout_deadline = args.rollout_deadline;
    let egress_admin_from = match args.egress_admin_from.as_deref() {
        None | Some("") => Vec::new(),
        Some(json) => serde_json::from_str(json).map_err(|error| {
            anyhow::anyhow!(
                "--egress-admin-from is not a JSON array of NetworkPolicy peers: {error}"
            )
        })?,
    };
    let sweep_interval = Some(args.sweep_interval)
        .filter(|interval| interval.as_secs() >= 1)
        .ok_or_else(|| anyhow::anyhow!("--sweep-interval must be at least 1s"))?;
    let events = args
        .events_queue_url
        .filter(|url| !url.is_empty())
        .map(|url| mtls_operator::source::events::EventQueue {
            url,
            client: aws_sdk_sqs::Client::new(&aws),
        });
    let settings = Settings {
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        events,
        sweep_mode: args.sweep_mode,
        sweep_interval,
        namespaces: args
            .namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        policy,
        default_region: None,
        restart_limits: RestartLimits {
            max_rollouts: args.max_rollouts,
            max_per_namespace: args.max_rollouts_per_namespace,
            deadline: rollout_deadline,
        },
        allow_annotate: args.enable_annotate,
        egress_admin_from,
        egress_reach: mtls_operator::controller::egress::reach::EgressReach {
            peers_outside_namespace: args.egress_allow_peers_outside_namespace,
            ip_block_peers: args.egress_allow_ip_blocks,
            internal_upstreams: args.egress_allow_internal_upstreams,
            denied_upstream_ranges: args
                .egress_denied_upstream_cidrs
                .iter()
                .filter(|cidr| !cidr.is_empty())
                .map(|cidr| {
                    cidr.parse().map_err(|_| {
                        anyhow::anyhow!("--egress-denied-upstream-cidr {cidr:?} is not a CIDR")
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        },
        identity_selector: args.identity_selector,
        egress_image: args.enable_egress.then_some(args.proxy_image),
        // Fatal when it cannot be had: without it every restart would re-read every identity,
        // and a tenant's edits could not be told from the operator's writes.
        integrity_key: controller::integrity::load_or_create(
            client.clone(),
            &args.lease_namespace,
            &args.integrity_key_secret,
        )
        .await?,
        synced_events: std::sync::Arc::new(controller::events::SyncedEventBudget::new(
            args.synced_event_rate,
            args.synced_event_burst,
            std::time::Instant::now(),
        )),
    }
    .with_aws_defaults(&aws)
    .await;
    if let Some(bad) = settings
        .policy
        .allowed_regions()
        .iter()
        .find(|region| !mtls_operator::source::id::is_valid_region(region))
    {
        anyhow::bail!("--allowed-region {bad:?} is not a region name");
    }
    // Names resolve in the account of the credentials used: a tenant role of another account
    // would make the policy's "own account" checks about the wrong account.
    if let (Some(role), Some(own)) = (&tenant_role_arn, settings.policy.own_account())
        && role.account != own
    {
        anyhow::bail!(
            "--tenant-role-arn {role} is a role of account {}, not of the operator's account {own}",
            role.account
        );
    }
    let readiness = Readiness::default();
    // Bound before anything else runs, and fatal when they cannot be: an operator without its
    // health or metrics endpoint would look dead to its platform, or silently unobserved.
    let health_listener = listen(args.health_address, "health").await?;
    let metrics_listener = listen(args.metrics_address, "metrics").await?;
    let health = tokio::spawn(serve_health(health_listener, readiness.clone()));
    let metrics_server = tokio::spawn(serve_metrics(metrics_listener, metrics.clone()));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        "mtls-operator starting"
    );
    // SIGTERM: in-flight reconciles get `--shutdown-drain` to finish (controller graceful
    // shutdown); after that the process exits whatever is still queued, which the successor
    // picks up from the cluster's state.
    let signal = futures::FutureExt::shared(Box::pin(shutdown_signal()));
    let drain = args.shutdown_drain;
    // Not ready from the signal on: in-flight work drains, nothing new is wanted.
    tokio::spawn({
        let (signal, readiness) = (signal.clone(), readiness.clone());
        async move {
            signal.await;
            readiness.set(false);
        }
    });
    // With a Lease, a moment more than the drain to release it (a standby then need not wait for
    // it to expire).
    let exit_after = if args.leader_election {
        drain + LEASE_RELEASE
    } else {
        drain
    };
    let bounded = {
        let signal = signal.clone();
        async move {
            signal.await;
            tokio::time::sleep(exit_after).await;
            warn!(
                ?drain,
                "in-flight work did not finish within the drain bound; exiting"
            );
        }
    };
    let leader = if args.leader_election {
        let lease_duration = Some(args.lease_duration)
            .filter(|duration| duration.as_secs() >= 2)
            .ok_or_else(|| anyhow::anyhow!("--lease-duration must be at least 2s"))?;
        let identity = args
            .identity
            .unwrap_or_else(|| format!("mtls-operator-{}", std::process::id()));
        Some(LeaderSettings {
            lease_name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            duration: lease_duration,
            drain,
        })
    } else {
        None
    };
    let work = async {
        match leader {
            Some(leader) => {
                leader::run_as_leader(client, source, settings, metrics, leader, readiness, signal)
                    .await
            }
            None => {
                // The one replica reconciles: it leads (the chart's no-leader alert reads this).
                metrics.leader.set(1);
                controller::run(client, source, settings, metrics.clone(), readiness, signal).await;
                metrics.leader.set(0);
                Ok(())
            }
        }
    };
    let result = tokio::select! {
        result = work => result,
        () = bounded => Ok(()),
    };
    health.abort();
    metrics_server.abort();
    result.map_err(Into::into)
}

/// Whether `value` is a valid STS session tag value (at most 256 of letters, digits, spaces and
/// `_.:/=+-@`).
fn is_session_tag_value(value: &str) -> bool {
    value.chars().count() <= 256
        && value
            .chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("shutdown requested");
}

/// Binds `address` (port 0: any free port) and logs the address it got, so that whoever started
/// the process (a test, a person) can find it.
async fn listen(address: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {address} for {what}: {error}"))?;
    let bound = listener.local_addr()?;
    info!(address = %bound, what, "listening");
    Ok(listener)
}

async fn serve(listener: tokio::net::TcpListener, app: axum::Router, what: &str) {
    if let Err(error) = axum::serve(listener, app).await {
        error!(%error, what, "server stopped");
    }
}

async fn serve_health(listener: tokio::net::TcpListener, readiness: Readiness) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    serve(listener, app, "health").await;
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    metrics.encode(),
                )
            }
        }),
    );
    serve(listener, app, "metrics").await;
}
