//! The egress proxy end to end on loopback: a plain HTTP client, the proxy, and a rustls+hyper
//! upstream that requires client certificates from a test CA. Every certificate is generated here.
//!
//! ```sh
//! cargo test --test proxy
//! ```

mod common;
#[path = "proxy/egress.rs"]
mod egress;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mtls_operator::proxy::{self, ProxyArgs};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use xtask::support::wait_for;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;

const TIMEOUT: Duration = Duration::from_secs(20);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// ---------------------------------------------------------------------------------------------
// Certificates

struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

#[derive(Clone)]
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pair {
    fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }
}

impl TestCa {
    fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone())?;
        Ok(Arc::new(roots))
    }

    fn issue(&self, params: CertificateParams) -> Result<Pair> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    fn client(&self, name: &str) -> Result<Pair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn server(&self) -> Result<Pair> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }
}

// ---------------------------------------------------------------------------------------------
// The certificate directory, laid out as the kubelet lays out a Secret volume

struct CertDir {
    path: PathBuf,
    version: usize,
}

impl CertDir {
    fn new() -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "mtls-proxy-it-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(CertDir { path, version: 0 })
    }

    /// Write a new timestamped directory and rename a new `..data` symlink over the old one, as
    /// the kubelet's atomic writer does; `tls.crt` and `tls.key` point into `..data`.
    fn write(&mut self, cert_pem: &str, key_pem: &str) -> Result<()> {
        self.version += 1;
        let name = format!(
            "..2026_11_29_10_00_{:02}.{}",
            self.version,
            1000 + self.version
        );
        let data = self.path.join(&name);
        std::fs::create_dir(&data)?;
        std::fs::write(data.join("tls.crt"), cert_pem)?;
        std::fs::write(data.join("tls.key"), key_pem)?;
        let tmp = self.path.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp)?;
        std::fs::rename(&tmp, self.path.join("..data"))?;
        for file in ["tls.crt", "tls.key"] {
            let link = self.path.join(file);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{file}"), &link)?;
            }
        }
        Ok(())
    }

    fn write_pair(&mut self, pair: &Pair) -> Result<()> {
        self.write(&pair.cert_pem, &pair.key_pem)
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: rustls requiring client certificates, hyper serving HTTP/1.1 and (by ALPN) HTTP/2

struct TestUpstream {
    addr: SocketAddr,
    /// TCP connections accepted so far.
    accepted: Arc<AtomicUsize>,
    handshake_failures: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
enum Alpn {
    Http1,
    Both,
}

impl TestUpstream {
    async fn start(client_ca: &TestCa, server: &Pair, alpn: Alpn) -> Result<Self> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(client_ca.roots()?, provider()).build()?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server.der.clone())],
                PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())?,
            )?;
        config.alpn_protocols = match alpn {
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handshake_failures = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let failures = handshake_failures.clone();
        let accepts = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                accepts.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let failures = failures.clone();
                let released = released.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| hex::encode(Sha256::digest(c.as_ref())))
                        .unwrap_or_default();
                    let service = hyper::service::service_fn(move |request| {
                        upstream_handler(peer.clone(), released.clone(), request)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(TestUpstream {
            addr,
            accepted,
            handshake_failures,
            release,
            task,
        })
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// `/never`: never answers. `/hold`: sends "first", then "second" once released. Anything else
/// echoes the request (facts in `x-*` headers, the body streamed back).
async fn upstream_handler(
    peer_sha256: String,
    released: watch::Receiver<bool>,
    request: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let mut names: Vec<String> = request
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    names.sort();
    let host = request
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let builder = Response::builder()
        .header("x-peer-sha256", peer_sha256)
        .header("x-method", request.method().as_str())
        .header(
            "x-uri",
            request
                .uri()
                .path_and_query()
                .map_or("", |p| p.as_str())
                .to_owned(),
        )
        .header("x-version", format!("{:?}", request.version()))
        .header("x-host", host)
        .header("x-header-names", names.join(","))
        .header(
            "x-custom",
            request
                .headers()
                .get("x-custom")
                .cloned()
                .unwrap_or_else(|| hyper::header::HeaderValue::from_static("")),
        );
    let body: TestBody = match request.uri().path() {
        "/never" => std::future::pending().await,
        "/hold" => {
            let stream = futures::stream::unfold(0u8, move |step| {
                let mut released = released.clone();
                async move {
                    match step {
                        0 => Some((Ok(Frame::data(Bytes::from_static(b"first\n"))), 1)),
                        1 => {
                            let _ = released.wait_for(|r| *r).await;
                            Some((Ok(Frame::data(Bytes::from_static(b"second\n"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            BodyExt::boxed(StreamBody::new(stream.map(|r: Result<_, BoxError>| r)))
        }
        _ => request
            .into_body()
            .map_err(|e| Box::new(e) as BoxError)
            .boxed(),
    };
    Ok(builder
        .body(body)
        .unwrap_or_else(|_| Response::new(empty())))
}

fn empty() -> TestBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

// ---------------------------------------------------------------------------------------------
// The proxy under test

struct RunningProxy {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), proxy::ProxyError>>,
}

impl RunningProxy {
    async fn start(args: ProxyArgs) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy::serve(args, listener, admin, async move {
            let _ = stopped.await;
        }));
        Ok(RunningProxy {
            addr,
            admin: admin_addr,
            stop: Some(stop),
            task,
        })
    }

    /// Start and wait until /readyz says a certificate is loaded.
    async fn ready(args: ProxyArgs) -> Result<Self> {
        let proxy = Self::start(args).await?;
        let admin = proxy.admin;
        wait_for("the proxy to be ready", TIMEOUT, || async move {
            let (status, body) = get_text(admin, "/readyz").await?;
            ensure!(status == StatusCode::OK, "{status} {body}");
            Ok(())
        })
        .await?;
        Ok(proxy)
    }

    async fn metrics(&self) -> Result<String> {
        Ok(get_text(self.admin, "/metrics").await?.1)
    }

    async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .with_context(|| format!("{series} not in\n{text}"))?
            .trim()
            .parse()
            .context("metric value")
    }

    fn request_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stop and wait until `serve` returned.
    async fn shutdown(mut self) -> Result<()> {
        self.request_stop();
        tokio::time::timeout(TIMEOUT, &mut self.task)
            .await
            .context("proxy did not stop")??
            .map_err(Into::into)
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn args(upstream: &str, ca: &Path, cert_dir: &Path) -> ProxyArgs {
    ProxyArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_address: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream: upstream.to_owned(),
        upstream_ca: Some(ca.to_owned()),
        cert_dir: cert_dir.to_owned(),
        reload_interval: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        refuse_addresses: Vec::new(),
    }
}

/// Everything one test needs: a CA, an upstream requiring its client certificates, a cert dir with
/// a first client certificate, and the upstream CA file the proxy verifies the server with.
struct Setup {
    ca: TestCa,
    upstream: TestUpstream,
    cert_dir: CertDir,
    client: Pair,
    ca_file: PathBuf,
}

impl Setup {
    async fn new(alpn: Alpn) -> Result<Self> {
        let ca = TestCa::new("test ca")?;
        let server = ca.server()?;
        let upstream = TestUpstream::start(&ca, &server, alpn).await?;
        let mut cert_dir = CertDir::new()?;
        let client = ca.client("first-client")?;
        cert_dir.write_pair(&client)?;
        // Outside the kubelet layout, so writes to the cert dir never touch it.
        let ca_file = cert_dir.path.with_extension("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        Ok(Setup {
            ca,
            upstream,
            cert_dir,
            client,
            ca_file,
        })
    }

    fn args(&self) -> ProxyArgs {
        args(&self.upstream.url(), &self.ca_file, &self.cert_dir.path)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

// ---------------------------------------------------------------------------------------------
// Client helpers

/// How the application talks to the proxy.
#[derive(Clone, Copy, Debug)]
enum App {
    Http1,
    /// HTTP/2 with prior knowledge, as gRPC clients do.
    H2c,
}

/// A client connection of either version.
enum AppSender {
    Http1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2c(
        hyper::client::conn::http2::SendRequest<TestBody>,
        SocketAddr,
    ),
}

impl AppSender {
    async fn connect(app: App, addr: SocketAddr) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        Ok(match app {
            App::Http1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                AppSender::Http1(sender)
            }
            App::H2c => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                AppSender::H2c(sender, addr)
            }
        })
    }

    async fn send(&mut self, mut request: Request<TestBody>) -> Result<Response<Incoming>> {
        match self {
            AppSender::Http1(sender) => {
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
            AppSender::H2c(sender, addr) => {
                // HTTP/2 carries scheme and authority in the request target.
                let path = request
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                *request.uri_mut() = format!("http://{addr}{path}").parse()?;
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
        }
    }
}

/// One request on a new connection of the given version.
async fn send_as(
    app: App,
    addr: SocketAddr,
    request: Request<TestBody>,
) -> Result<Response<Incoming>> {
    AppSender::connect(app, addr).await?.send(request).await
}

/// One request on a new HTTP/1.1 connection.
async fn send(addr: SocketAddr, request: Request<TestBody>) -> Result<Response<Incoming>> {
    send_as(App::Http1, addr, request).await
}

async fn get_text(addr: SocketAddr, path: &str) -> Result<(StatusCode, String)> {
    let request = Request::get(path).header("host", "proxy").body(empty())?;
    let response = send(addr, request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn header(response: &Response<Incoming>, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// GET /echo through the proxy; the SHA-256 of the client certificate the upstream saw.
async fn peer_seen(proxy: SocketAddr) -> Result<String> {
    peer_seen_as(App::Http1, proxy).await
}

async fn peer_seen_as(app: App, proxy: SocketAddr) -> Result<String> {
    let response = send_as(app, proxy, Request::get("/echo").body(empty())?).await?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    Ok(header(&response, "x-peer-sha256"))
}

// ---------------------------------------------------------------------------------------------
// Tests

async fn forwards_preserving_the_request(alpn: Alpn) -> Result<()> {
    let setup = Setup::new(alpn).await?;
    let proxy = RunningProxy::ready(setup.args()).await?;

    let request = Request::post("/api/v1/things?x=1&y=two%20words")
        .header("host", "app-thinks-this-is-the-host")
        .header("x-custom", "hello")
        .header("authorization", "Bearer abc")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "gzip")
        .header("trailer", "x-checksum")
        .body(full("payload"))?;
    let response = send(proxy.addr, request).await?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    assert_eq!(header(&response, "x-peer-sha256"), setup.client.sha256());
    assert_eq!(header(&response, "x-method"), "POST");
    assert_eq!(
        header(&response, "x-uri"),
        "/api/v1/things?x=1&y=two%20words"
    );
    assert_eq!(header(&response, "x-custom"), "hello");
    assert_eq!(
        header(&response, "x-host"),
        format!("localhost:{}", setup.upstream.addr.port())
    );
    let names = header(&response, "x-header-names");
    let names: Vec<&str> = names.split(',').collect();
    for kept in ["x-custom", "authorization"] {
        assert!(names.contains(&kept), "{kept} missing from {names:?}");
    }
    for dropped in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
    ] {
        assert!(!names.contains(&dropped), "{dropped} forwarded: {names:?}");
    }
    let version = header(&response, "x-version");
    let body = response.into_body().collect().await?.to_bytes();
    assert_eq!(&body[..], b"payload");
    // HTTP/1.x from the application stays HTTP/1.1 upstream, even where HTTP/2 is offered.
    assert_eq!(version, "HTTP/1.1");
    assert_eq!(
        proxy
            .metric("mtls_proxy_requests_total{class=\"2xx\"}")
            .await?,
        1.0
    );
    let handshakes = proxy
        .metric("mtls_proxy_tls_handshake_duration_seconds_count")
        .await?;
    assert!(handshakes >= 1.0, "{handshakes}");
    proxy.shutdown().await
}

#[tokio::test]
async fn forwards_over_mtls_preserving_the_request_http1_upstream() -> Result<()> {
    forwards_preserving_the_request(Alpn::Http1).await
}

#[tokio::test]
async fn forwards_over_mtls_preserving_the_request_upstream_offering_http2() -> Result<()> {
    forwards_preserving_the_request(Alpn::Both).await
}

async fn h2c_from_the_application(alpn: Alpn, expected_version: &str) -> Result<()> {
    let setup = Setup::new(alpn).await?;
    let proxy = RunningProxy::ready(setup.args()).await?;
    let request = Request::post("/h2?q=1")
        .header("x-custom", "over-h2c")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .body(full("grpc-ish"))?;
    let response = send_as(App::H2c, proxy.addr, request).await?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    assert_eq!(header(&response, "x-uri"), "/h2?q=1");
    assert_eq!(header(&response, "x-custom"), "over-h2c");
    assert_eq!(header(&response, "x-version"), expected_version);
    assert_eq!(header(&response, "x-peer-sha256"), setup.client.sha256());
    let names = header(&response, "x-header-names");
    assert!(
        names.split(',').any(|n| n == "te"),
        "TE: trailers dropped: {names}"
    );
    assert!(!names.contains("proxy-authorization"), "forwarded: {names}");
    let body = response.into_body().collect().await?.to_bytes();
    assert_eq!(&body[..], b"grpc-ish");
    proxy.shutdown().await
}

#[tokio::test]
async fn h2c_from_the_application_goes_out_as_http2() -> Result<()> {
    h2c_from_the_application(Alpn::Both, "HTTP/2.0").await
}

#[tokio::test]
async fn h2c_from_the_application_falls_back_to_an_http1_upstream() -> Result<()> {
    h2c_from_the_application(Alpn::Http1, "HTTP/1.1").await
}

#[tokio::test]
async fn upstream_refuses_a_client_without_a_certificate() -> Result<()> {
    let setup = Setup::new(Alpn::Http1).await?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(setup.ca.roots()?)
        .with_no_client_auth();
    let tcp = TcpStream::connect(setup.upstream.addr).await?;
    let server_name = ServerName::try_from("localhost")?;
    // With TLS 1.3 the client finishes its half before the server checks; the refusal then
    // arrives as an alert on the first read. Either way no HTTP exchange may succeed.
    let refused = match TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
    {
        Err(_) => true,
        Ok(tls) => {
            match hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tls)).await {
                Err(_) => true,
                Ok((mut sender, connection)) => {
                    tokio::spawn(connection);
                    sender
                        .send_request(Request::get("/echo").body(empty())?)
                        .await
                        .is_err()
                }
            }
        }
    };
    assert!(
        refused,
        "the upstream answered a client without a certificate"
    );
    let failures = setup.upstream.handshake_failures.clone();
    wait_for("the upstream to count a failed handshake", TIMEOUT, || {
        let failures = failures.clone();
        async move {
            ensure!(failures.load(Ordering::SeqCst) >= 1, "no failed handshake");
            Ok(())
        }
    })
    .await
}

#[tokio::test]
async fn streams_a_large_body_both_ways_http1() -> Result<()> {
    streams_a_large_body_both_ways(App::Http1).await
}

#[tokio::test]
async fn streams_a_large_body_both_ways_http2() -> Result<()> {
    streams_a_large_body_both_ways(App::H2c).await
}

async fn streams_a_large_body_both_ways(app: App) -> Result<()> {
    const SIZE: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let setup = Setup::new(Alpn::Both).await?;
    let proxy = RunningProxy::ready(setup.args()).await?;

    // Generated chunk by chunk, so neither side needs the whole body in memory at once.
    let chunk = |i: usize| -> Bytes {
        Bytes::from(
            (0..CHUNK)
                .map(|j| ((i * 31 + j * 7) % 251) as u8)
                .collect::<Vec<u8>>(),
        )
    };
    let mut sent = Sha256::new();
    for i in 0..SIZE / CHUNK {
        sent.update(chunk(i));
    }
    let sent = hex::encode(sent.finalize());
    let stream = futures::stream::iter(0..SIZE / CHUNK)
        .map(move |i| Ok::<_, BoxError>(Frame::data(chunk(i))));
    let request = Request::put("/upload").body(BodyExt::boxed(StreamBody::new(stream)))?;

    let response = send_as(app, proxy.addr, request).await?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    let mut body = response.into_body();
    let mut received = Sha256::new();
    let mut length = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            length += data.len();
            received.update(&data);
        }
    }
    assert_eq!(length, SIZE);
    assert_eq!(hex::encode(received.finalize()), sent);
    proxy.shutdown().await
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_with_a_reason() -> Result<()> {
    let setup = Setup::new(Alpn::Http1).await?;
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let upstream = format!("https://localhost:{}", closed.port());
    let proxy = RunningProxy::ready(args(&upstream, &setup.ca_file, &setup.cert_dir.path)).await?;

    let response = send(proxy.addr, Request::get("/echo").body(empty())?).await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(header(&response, "x-mtls-proxy-error"), "connect");
    assert_eq!(
        header(&response, "content-type"),
        "text/plain; charset=utf-8"
    );
    let body = response.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("upstream unreachable"), "{body}");
    assert_eq!(
        proxy
            .metric("mtls_proxy_upstream_errors_total{kind=\"connect\"}")
            .await?,
        1.0
    );
    assert_eq!(
        proxy
            .metric("mtls_proxy_requests_total{class=\"5xx\"}")
            .await?,
        1.0
    );
    proxy.shutdown().await
}

#[tokio::test]
async fn upstream_with_an_untrusted_certificate_is_a_502_tls() -> Result<()> {
    let setup = Setup::new(Alpn::Http1).await?;
    // Verify the upstream against a CA that did not issue its certificate.
    let stranger = TestCa::new("stranger")?;
    std::fs::write(&setup.ca_file, stranger.pem())?;
    let proxy = RunningProxy::ready(setup.args()).await?;
    let response = send(proxy.addr, Request::get("/echo").body(empty())?).await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(header(&response, "x-mtls-proxy-error"), "tls");
    let body = response.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("TLS"), "{body}");
    // The class, not TLS internals: nothing about the certificate or the verifier's verdict.
    assert_eq!(body, "mtls-proxy: TLS with the upstream failed\n");
    assert_eq!(
        proxy
            .metric("mtls_proxy_upstream_errors_total{kind=\"tls\"}")
            .await?,
        1.0
    );
    proxy.shutdown().await
}

#[tokio::test]
async fn silent_upstream_is_a_504_within_the_request_timeout() -> Result<()> {
    let setup = Setup::new(Alpn::Both).await?;
    let mut args = setup.args();
    args.request_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::ready(args).await?;

    let started = Instant::now();
    let response = send(proxy.addr, Request::get("/never").body(empty())?).await?;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(header(&response, "x-mtls-proxy-error"), "timeout");
    // Not before the timeout: the 504 is the timeout's, not an early failure.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    let body = response.into_body().collect().await?.to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("request timeout"));
    assert_eq!(
        proxy
            .metric("mtls_proxy_upstream_errors_total{kind=\"timeout\"}")
            .await?,
        1.0
    );
    proxy.shutdown().await
}

async fn rotation_without_restart(alpn: Alpn, app: App) -> Result<()> {
    let mut setup = Setup::new(alpn).await?;
    let proxy = RunningProxy::ready(setup.args()).await?;
    let first = setup.client.sha256();
    assert_eq!(peer_seen_as(app, proxy.addr).await?, first);

    // A slow response in flight across the swap, on a connection made with the first certificate.
    let held = send_as(app, proxy.addr, Request::get("/hold").body(empty())?).await?;
    ensure!(held.status() == StatusCode::OK, "{}", held.status());
    assert_eq!(header(&held, "x-peer-sha256"), first);
    let mut held = held.into_body();
    let part = held.frame().await.context("held body ended")??;
    assert_eq!(
        part.into_data().ok().as_deref(),
        Some(b"first\n".as_slice())
    );

    let second = setup.ca.client("second-client")?;
    setup.cert_dir.write_pair(&second)?;
    let expected = second.sha256();
    let addr = proxy.addr;
    wait_for("requests to use the new certificate", TIMEOUT, || {
        let expected = expected.clone();
        async move {
            let seen = peer_seen_as(app, addr).await?;
            ensure!(seen == expected, "upstream still sees {seen}");
            Ok(())
        }
    })
    .await?;
    // Every later request uses it too: the old pool is not reused.
    for _ in 0..5 {
        assert_eq!(peer_seen_as(app, proxy.addr).await?, second.sha256());
    }

    // The in-flight response completes after the swap.
    setup.upstream.release.send_replace(true);
    let mut rest = Vec::new();
    while let Some(frame) = held.frame().await {
        if let Ok(data) = frame?.into_data() {
            rest.extend_from_slice(&data);
        }
    }
    assert_eq!(rest, b"second\n");

    assert_eq!(
        proxy
            .metric("mtls_proxy_certificate_reloads_total{outcome=\"success\"}")
            .await?,
        2.0
    );
    assert_eq!(
        proxy
            .metric("mtls_proxy_certificate_reloads_total{outcome=\"failure\"}")
            .await?,
        0.0
    );
    proxy.shutdown().await
}

#[tokio::test]
async fn rotation_without_restart_http1() -> Result<()> {
    rotation_without_restart(Alpn::Both, App::Http1).await
}

#[tokio::test]
async fn rotation_without_restart_http2() -> Result<()> {
    // One multiplexed upstream connection per generation: the held stream keeps the old one open.
    rotation_without_restart(Alpn::Both, App::H2c).await
}

#[tokio::test]
async fn a_bad_new_pair_is_refused_and_the_old_certificate_kept() -> Result<()> {
    let mut setup = Setup::new(Alpn::Both).await?;
    let proxy = RunningProxy::ready(setup.args()).await?;
    let first = setup.client.sha256();
    assert_eq!(peer_seen(proxy.addr).await?, first);
    let expiry = proxy
        .metric("mtls_proxy_certificate_expiration_timestamp_seconds")
        .await?;
    assert!(expiry > 0.0);

    // A new certificate with a key that does not belong to it.
    let other = setup.ca.client("other-client")?;
    let unrelated = setup.ca.client("unrelated")?;
    setup.cert_dir.write(&other.cert_pem, &unrelated.key_pem)?;
    let admin = &proxy;
    wait_for("the reload failure to be counted", TIMEOUT, || async move {
        let failures = admin
            .metric("mtls_proxy_certificate_reloads_total{outcome=\"failure\"}")
            .await?;
        ensure!(failures == 1.0, "failures: {failures}");
        Ok(())
    })
    .await?;
    assert_eq!(
        proxy
            .metric("mtls_proxy_certificate_last_reload_success")
            .await?,
        0.0
    );
    // Still ready, still presenting the first certificate, on new connections too.
    assert_eq!(get_text(proxy.admin, "/readyz").await?.0, StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(peer_seen(proxy.addr).await?, first);
    }
    assert_eq!(
        proxy
            .metric("mtls_proxy_certificate_expiration_timestamp_seconds")
            .await?,
        expiry
    );

    // Fixing the pair recovers without a restart.
    setup.cert_dir.write_pair(&other)?;
    let expected = other.sha256();
    let addr = proxy.addr;
    wait_for("the fixed pair to be used", TIMEOUT, || {
        let expected = expected.clone();
        async move {
            ensure!(peer_seen(addr).await? == expected, "old certificate");
            Ok(())
        }
    })
    .await?;
    proxy.shutdown().await
}

#[tokio::test]
async fn not_ready_without_a_certificate() -> Result<()> {
    let setup = Setup::new(Alpn::Http1).await?;
    let empty_dir = CertDir::new()?;
    let proxy =
        RunningProxy::start(args(&setup.upstream.url(), &setup.ca_file, &empty_dir.path)).await?;
    let admin = proxy.admin;
    wait_for("the admin port", TIMEOUT, || async move {
        get_text(admin, "/healthz").await.map(|_| ())
    })
    .await?;
    let (status, body) = get_text(proxy.admin, "/readyz").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let response = send(proxy.addr, Request::get("/echo").body(empty())?).await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&response, "x-mtls-proxy-error"), "no-certificate");
    proxy.shutdown().await
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() -> Result<()> {
    let setup = Setup::new(Alpn::Both).await?;
    let mut proxy = RunningProxy::ready(setup.args()).await?;
    let held = send(proxy.addr, Request::get("/hold").body(empty())?).await?;
    let mut held = held.into_body();
    held.frame().await.context("held body ended")??;

    proxy.request_stop();
    let admin = proxy.admin;
    wait_for("/readyz to say shutting down", TIMEOUT, || async move {
        let (status, body) = get_text(admin, "/readyz").await?;
        ensure!(status == StatusCode::SERVICE_UNAVAILABLE, "{status}");
        ensure!(body.contains("shutting down"), "{body}");
        Ok(())
    })
    .await?;
    // The proxy port no longer accepts new connections.
    let addr = proxy.addr;
    wait_for("the proxy port to close", TIMEOUT, || async move {
        match send(addr, Request::get("/echo").body(empty())?).await {
            Ok(response) => bail!("still answering: {}", response.status()),
            Err(_) => Ok(()),
        }
    })
    .await?;
    ensure!(
        !proxy.task.is_finished(),
        "stopped before the request ended"
    );

    setup.upstream.release.send_replace(true);
    let mut rest = Vec::new();
    while let Some(frame) = held.frame().await {
        if let Ok(data) = frame?.into_data() {
            rest.extend_from_slice(&data);
        }
    }
    assert_eq!(rest, b"second\n");
    proxy.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Benchmark (ignored): the proxy against direct mTLS on loopback. Figures go to src/proxy/README.md.
//
//   cargo test --release --test proxy -- --ignored --nocapture bench
//
// MTLS_PROXY_BENCH_REQUESTS (default 2000) sets the sequential requests per latency run.

/// A keep-alive HTTP/1.1 connection straight to the upstream, with the client certificate.
async fn connect_direct(setup: &Setup) -> Result<AppSender> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(setup.ca.roots()?)
        .with_client_auth_cert(
            vec![CertificateDer::from(setup.client.der.clone())],
            PrivateKeyDer::from_pem_slice(setup.client.key_pem.as_bytes())?,
        )?;
    let tcp = TcpStream::connect(setup.upstream.addr).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    Ok(AppSender::Http1(sender))
}

/// One exchange, response body read to the end; returns the bytes received.
async fn exchange(sender: &mut AppSender, payload: &Bytes) -> Result<usize> {
    let request = if payload.is_empty() {
        Request::get("/echo")
            .header("host", "localhost")
            .body(empty())?
    } else {
        Request::post("/echo")
            .header("host", "localhost")
            .body(full(payload.clone()))?
    };
    let response = sender.send(request).await?;
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    Ok(response.into_body().collect().await?.to_bytes().len())
}

struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

async fn measure<F, Fut>(connect: F, payload: Bytes, requests: usize) -> Result<Figures>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<AppSender>>,
{
    // Latency: one connection, sequential requests.
    let mut sender = connect().await?;
    for _ in 0..requests / 10 {
        exchange(&mut sender, &payload).await?;
    }
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let received = exchange(&mut sender, &payload).await?;
        samples.push(started.elapsed());
        ensure!(received == payload.len(), "short body: {received}");
    }
    samples.sort_unstable();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];

    // Throughput: 16 connections for two seconds.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut sender = connect().await?;
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                exchange(&mut sender, &payload).await?;
                done += 1;
            }
            Ok::<_, anyhow::Error>(done)
        }));
    }
    let started = Instant::now();
    let mut total = 0u64;
    for task in tasks {
        total += task.await??;
    }
    let per_second = total as f64 / started.elapsed().as_secs_f64();
    Ok(Figures {
        p50,
        p99,
        per_second,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
async fn bench_proxy_against_direct_mtls() -> Result<()> {
    let requests: usize = std::env::var("MTLS_PROXY_BENCH_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let mib = Bytes::from(vec![0x5a_u8; 1024 * 1024]);
    let setup = Setup::new(Alpn::Both).await?;
    let proxy = RunningProxy::ready(setup.args()).await?;
    println!(
        "| path | payload | p50 | p99 | p50 added | requests/s (16 connections) |\n|---|---|---|---|---|---|"
    );
    for (payload, name) in [(Bytes::new(), "empty GET"), (mib, "1 MiB echoed")] {
        let direct = measure(|| connect_direct(&setup), payload.clone(), requests).await?;
        let row = |path: &str, f: &Figures| {
            let added = (f.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1e6;
            println!(
                "| {path} | {name} | {:.0} µs | {:.0} µs | {added:.0} µs | {:.0} |",
                f.p50.as_secs_f64() * 1e6,
                f.p99.as_secs_f64() * 1e6,
                f.per_second
            )
        };
        row("direct mTLS (HTTP/1.1)", &direct);
        for (app, path) in [
            (App::Http1, "app HTTP/1.1 → proxy → mTLS HTTP/1.1"),
            (App::H2c, "app h2c → proxy → mTLS HTTP/2"),
        ] {
            let addr = proxy.addr;
            let via = measure(|| AppSender::connect(app, addr), payload.clone(), requests).await?;
            row(path, &via);
        }
    }
    proxy.shutdown().await
}

/// DNS rebinding (#25): the operator refuses a literal internal address in `spec.egress.upstream`,
/// but a name is the tenant's to point anywhere. The proxy resolves at each connect and never
/// connects to a refused range: here the upstream's name is `localhost` (as a tenant's own name
/// pointed at the node, or at 169.254.169.254, would be), and with loopback refused the request is
/// a 502 that names the class, counted as `refused`, and the upstream accepts no connection. The
/// same proxy without the ranges reaches it.
#[tokio::test]
async fn a_name_that_resolves_to_a_refused_address_is_never_connected_to() -> Result<()> {
    let setup = Setup::new(Alpn::Http1).await?;
    let mut refusing = setup.args();
    refusing.refuse_addresses = vec!["127.0.0.0/8".parse()?, "::1/128".parse()?];
    let proxy = RunningProxy::ready(refusing).await?;
    for _ in 0..3 {
        let (status, body) = get_text(proxy.addr, "/metadata").await?;
        ensure!(status == StatusCode::BAD_GATEWAY, "{status}: {body}");
        ensure!(body.contains("may not reach"), "{body}");
    }
    ensure!(
        setup.upstream.accepted.load(Ordering::SeqCst) == 0,
        "the upstream was connected to"
    );
    let refused = proxy
        .metric("mtls_proxy_upstream_errors_total{kind=\"refused\"}")
        .await?;
    ensure!(refused == 3.0, "{refused} refused connects counted");
    proxy.shutdown().await?;
    // The control: the same name and upstream without the ranges.
    let proxy = RunningProxy::ready(setup.args()).await?;
    let (status, body) = get_text(proxy.addr, "/metadata").await?;
    ensure!(status == StatusCode::OK, "{status}: {body}");
    ensure!(setup.upstream.accepted.load(Ordering::SeqCst) >= 1);
    Ok(())
}
