//! `mtls-operator run | crd`, and `--version`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use mtls_operator::controller::{self, Settings};
use mtls_operator::source::SecretsManagerSource;
use mtls_operator::source::policy::SourcePolicy;
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "mtls-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Print the MtlsIdentity CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Secrets Manager secrets a namespace may read: globs with a `{namespace}` placeholder,
    /// comma-separated or repeated. Default `{namespace}/*`; `*` allows every secret.
    #[arg(
        long = "allowed-source",
        env = "ALLOWED_SOURCES",
        value_delimiter = ','
    )]
    allowed_sources: Vec<String>,
    /// Most rolling restarts in progress at once, across all identities: a mass rotation queues.
    #[arg(long, env = "MAX_ROLLOUTS", default_value_t = 10)]
    max_rollouts: usize,
    /// Address of /healthz and /readyz.
    #[arg(long, env = "HEALTH_ADDRESS", default_value = "0.0.0.0:8081")]
    health_address: SocketAddr,
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
        Command::Run(args) => {
            mtls_operator::telemetry::init();
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
            match runtime.block_on(run(args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(error) => {
                    error!(error = format!("{error:#}"), "operator failed");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let source = Arc::new(SecretsManagerSource::new(aws));
    let settings = Settings {
        namespace: args.namespace,
        policy: SourcePolicy::from_patterns(args.allowed_sources),
        max_rollouts: args.max_rollouts,
    };
    let ready = Arc::new(AtomicBool::new(false));
    let health = tokio::spawn(serve_health(args.health_address, ready.clone()));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        "mtls-operator starting"
    );
    ready.store(true, Ordering::Relaxed);
    controller::run(client, source, settings, shutdown_signal()).await;
    health.abort();
    Ok(())
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

async fn serve_health(address: SocketAddr, ready: Arc<AtomicBool>) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            if let Err(error) = axum::serve(listener, app).await {
                error!(%error, "health server stopped");
            }
        }
        Err(error) => error!(%error, %address, "cannot listen for health checks"),
    }
}
