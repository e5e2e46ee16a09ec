//! `mtls-operator proxy`: an egress proxy for applications that should not touch TLS at all.
//!
//! It takes plain HTTP from the application (HTTP/1.1, or HTTP/2 with prior knowledge) and forwards
//! each request over mutual TLS to one configured upstream, presenting the certificate of a mounted
//! `kubernetes.io/tls` Secret and reloading it on rotation without a restart ([`reload`]). Health and
//! metrics are on a separate admin port. See `README.md` beside this file for flags and manifests.
//!
//! - [`config`]: the upstream URL and trust roots.
//! - [`forward`]: per-request rewriting, the mTLS connector, error answers.
//! - [`reload`]: polling the Secret's files and swapping certificate generations.
//! - [`metrics`]: Prometheus metrics.

pub mod config;
pub mod forward;
pub mod metrics;
pub mod reload;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use config::Upstream;
pub use metrics::{ErrorKind, ProxyMetrics};

/// How long in-flight requests may run on after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// `mtls-operator proxy` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Where the application sends plain HTTP (HTTP/1.1, or HTTP/2 with prior knowledge).
    #[arg(long, env = "PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics. Use 0.0.0.0:PORT for kubelet probes.
    #[arg(long, env = "PROXY_ADMIN_ADDRESS", default_value = "127.0.0.1:9090")]
    pub admin_address: SocketAddr,
    /// The one upstream every request goes to: https://host[:port].
    #[arg(long, env = "PROXY_UPSTREAM")]
    pub upstream: String,
    /// PEM file of CA certificates to verify the upstream with (reloaded like the certificate);
    /// default: the system roots.
    #[arg(long, env = "PROXY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Directory holding tls.crt (leaf first, then intermediates) and tls.key: the mounted Secret.
    #[arg(long, env = "PROXY_CERT_DIR", default_value = "/etc/mtls")]
    pub cert_dir: PathBuf,
    /// How often to look for a rotated certificate.
    #[arg(long, env = "PROXY_RELOAD_INTERVAL", default_value = "2s", value_parser = crate::api::duration_flag)]
    pub reload_interval: Duration,
    /// Limit for TCP connect plus TLS handshake with the upstream.
    #[arg(long, env = "PROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = crate::api::duration_flag)]
    pub connect_timeout: Duration,
    /// Limit for a whole exchange, response body included; 0s for none (long streams).
    #[arg(long, env = "PROXY_REQUEST_TIMEOUT", default_value = "30s", value_parser = crate::api::duration_flag)]
    pub request_timeout: Duration,
    /// Address ranges never connected to, whatever the upstream's name resolves to at the time
    /// (repeated or comma-separated CIDRs). The operator passes loopback, link-local (cloud
    /// metadata) and its denied ranges, as it refuses them for a literal address in the spec.
    #[arg(
        long = "refuse-address",
        env = "PROXY_REFUSE_ADDRESSES",
        value_delimiter = ','
    )]
    pub refuse_addresses: Vec<ipnet::IpNet>,
}

/// Why the proxy could not start (or a certificate generation could not be built).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `--upstream` is not an `https://host[:port]` URL.
    #[error("invalid --upstream {detail}")]
    InvalidUpstream { detail: String },
    /// A flag value out of range.
    #[error("invalid {flag}: {detail}")]
    InvalidArgument { flag: &'static str, detail: String },
    /// No trust roots to verify the upstream with.
    #[error("no trust roots for the upstream: {detail}")]
    NoTrustRoots { detail: String },
    /// The `--upstream-ca` file does not hold usable CA certificates.
    #[error("invalid upstream CA file {path}: {detail}")]
    InvalidUpstreamCa { path: String, detail: String },
    /// The certificate files do not hold a usable certificate and matching key.
    #[error("client certificate: {0}")]
    Certificate(#[from] crate::pki::PkiError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {detail}")]
    Tls { detail: String },
    /// A listen address could not be bound.
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl ProxyError {
    /// Fixed CamelCase reason for logs and metric labels.
    pub fn reason(&self) -> crate::api::conditions::Reason {
        use crate::api::conditions::Reason;
        match self {
            ProxyError::InvalidUpstream { .. } => Reason::InvalidUpstream,
            ProxyError::InvalidArgument { .. } => Reason::InvalidArgument,
            ProxyError::NoTrustRoots { .. } => Reason::NoTrustRoots,
            ProxyError::InvalidUpstreamCa { .. } => Reason::InvalidUpstreamCa,
            ProxyError::Certificate(_) => Reason::InvalidCertificate,
            ProxyError::Tls { .. } => Reason::TlsConfig,
            ProxyError::Bind { .. } => Reason::BindFailed,
        }
    }
}

/// One certificate generation: the pooled clients that present it.
pub(crate) struct Generation {
    pub id: u64,
    pub clients: forward::Clients,
}

/// What every request and the reloader share.
pub(crate) struct Shared {
    pub upstream: Upstream,
    /// `--refuse-address`: ranges never connected to.
    pub refused: Arc<[ipnet::IpNet]>,
    pub connect_timeout: Duration,
    /// `None`: no limit.
    pub request_timeout: Option<Duration>,
    pub metrics: ProxyMetrics,
    pub provider: Arc<CryptoProvider>,
    current: RwLock<Option<Arc<Generation>>>,
    draining: AtomicBool,
}

impl Shared {
    /// The generation new requests use; `None` until a certificate loaded.
    pub(crate) fn current(&self) -> Option<Arc<Generation>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Make `generation` the one new requests use; returns the id it replaced (0: none). The old
    /// one is dropped when its last in-flight request releases it, which closes its idle connections.
    pub(crate) fn install(&self, generation: Generation) -> u64 {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current
            .replace(Arc::new(generation))
            .map_or(0, |old| old.id)
    }

    fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.current().is_some()
    }
}

/// Bind `--listen` and `--admin-address`, then [`serve`] until `shutdown` completes.
pub async fn run(
    args: ProxyArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let bind = |what: &'static str, address: SocketAddr| async move {
        TcpListener::bind(address)
            .await
            .map_err(|source| ProxyError::Bind {
                what,
                address,
                source,
            })
    };
    let listener = bind("proxy", args.listen).await?;
    let admin = bind("admin", args.admin_address).await?;
    serve(args, listener, admin, shutdown).await
}

/// Serve on listeners the caller bound (tests bind port 0). `args.listen` and
/// `args.admin_address` are ignored. Returns once `shutdown` completed and in-flight requests
/// finished (or [`SHUTDOWN_GRACE`] passed).
pub async fn serve(
    args: ProxyArgs,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let upstream = Upstream::parse(&args.upstream)?;
    if args.reload_interval.is_zero() {
        return Err(ProxyError::InvalidArgument {
            flag: "--reload-interval",
            detail: "must be more than 0s".to_owned(),
        });
    }
    if args.connect_timeout.is_zero() {
        return Err(ProxyError::InvalidArgument {
            flag: "--connect-timeout",
            detail: "must be more than 0s".to_owned(),
        });
    }
    let system_roots = match args.upstream_ca {
        Some(_) => None,
        None => Some(config::system_roots()?),
    };
    let shared = Arc::new(Shared {
        upstream,
        refused: args.refuse_addresses.clone().into(),
        connect_timeout: args.connect_timeout,
        request_timeout: (!args.request_timeout.is_zero()).then_some(args.request_timeout),
        metrics: ProxyMetrics::new(),
        provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        current: RwLock::new(None),
        draining: AtomicBool::new(false),
    });

    // `stop` ends accepting; `done` ends the admin server and the reloader once requests drained,
    // so /readyz can say "shutting down" meanwhile.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(false);
    let mut reloader = reload::Reloader::new(
        shared.clone(),
        args.cert_dir.clone(),
        args.upstream_ca.clone(),
        system_roots,
    );
    // Load before accepting, so a proxy with valid files is ready at once.
    reloader.poll().await;
    let reloads = tokio::spawn(reloader.run(args.reload_interval, done_rx.clone()));
    let admin_address = local(&admin);
    let admin_task = tokio::spawn(serve_admin(admin, shared.clone(), done_rx));
    info!(
        listen = %local(&listener),
        admin = %admin_address,
        upstream = %shared.upstream.authority,
        cert_dir = %args.cert_dir.display(),
        "egress proxy started"
    );

    let shared_for_stop = shared.clone();
    tokio::spawn(async move {
        shutdown.await;
        shared_for_stop.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
    });

    serve_proxy(listener, shared.clone(), stop_rx).await;
    let _ = done_tx.send(true);
    // Wait so the admin port is free when this returns.
    let _ = admin_task.await;
    let _ = reloads.await;
    info!("egress proxy stopped");
    Ok(())
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string())
}

async fn serve_proxy(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let service = service_fn(move |request| forward::handle(shared.clone(), request));
                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            debug!(%peer, %error, "application connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    info!(
        connections = graceful.count(),
        "shutting down; letting in-flight requests finish"
    );
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("in-flight requests did not finish within the shutdown grace period");
    }
}

async fn serve_admin(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let service = service_fn(move |request| admin(shared.clone(), request));
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                }
                Err(error) => {
                    warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn admin(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/healthz" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_owned(),
        ),
        "/readyz" if shared.ready() => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ready\n".to_owned(),
        ),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            if shared.draining.load(Ordering::Relaxed) {
                "shutting down\n".to_owned()
            } else {
                "no client certificate loaded\n".to_owned()
            },
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
