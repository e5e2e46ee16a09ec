//! Forwarding one request: rewrite it for the upstream, send it over a pooled mTLS connection, and
//! stream the answer back; or answer 502/503/504 with a short plain-text reason.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::Scheme;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::metrics::{ErrorKind, ProxyMetrics};
use super::{ProxyError, Shared};

/// How long an idle pooled upstream connection is kept: below the usual 60 s of servers and load
/// balancers, so we rarely reuse a connection the other side is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Marks responses the proxy wrote itself (value: the error kind), so an application can tell
/// them from the upstream's own 502s.
pub const ERROR_HEADER: &str = "x-mtls-proxy-error";

type BoxError = Box<dyn StdError + Send + Sync>;

pub(crate) type UpstreamClient = Client<Connector, Incoming>;

/// The pooled clients of one certificate generation: the application's HTTP version is kept, so
/// HTTP/1.x requests go out on HTTP/1.1 connections (the faster path, see README) and HTTP/2
/// requests (gRPC, say) on HTTP/2 when the upstream offers it by ALPN.
pub(crate) struct Clients {
    pub http1: UpstreamClient,
    pub http2: UpstreamClient,
}

/// Build the clients of one generation. Their rustls configs (and so their session resumption
/// caches) belong to this generation only: a resumed session would otherwise keep presenting the
/// old identity after a rotation.
pub(crate) fn clients_for(
    shared: &Shared,
    roots: Arc<RootCertStore>,
    cert: Arc<CertifiedKey>,
) -> Result<Clients, ProxyError> {
    let resolver: Arc<dyn ResolvesClientCert> = Arc::new(FixedClientCert(cert));
    let client = |alpn: Vec<Vec<u8>>| -> Result<UpstreamClient, ProxyError> {
        let mut config = ClientConfig::builder_with_provider(shared.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Tls {
                detail: e.to_string(),
            })?
            .with_root_certificates(roots.clone())
            .with_client_cert_resolver(resolver.clone());
        config.alpn_protocols = alpn;
        let connector = Connector {
            inner: Arc::new(ConnectorInner {
                tls: TlsConnector::from(Arc::new(config)),
                upstream: shared.upstream.clone(),
                refused: shared.refused.clone(),
                connect_timeout: shared.connect_timeout,
                metrics: shared.metrics.clone(),
            }),
        };
        Ok(Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector))
    };
    Ok(Clients {
        http1: client(vec![b"http/1.1".to_vec()])?,
        http2: client(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
    })
}

/// Always presents the generation's certificate; rustls picks a signature scheme the key supports.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Connects every request to the configured upstream, whatever the URI says.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    tls: TlsConnector,
    upstream: super::config::Upstream,
    /// Address ranges never connected to, whatever the name resolves to now.
    refused: Arc<[ipnet::IpNet]>,
    connect_timeout: Duration,
    metrics: ProxyMetrics,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _destination: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.connect().await })
    }
}

impl ConnectorInner {
    /// TCP then TLS, both within one connect timeout.
    async fn connect(&self) -> Result<UpstreamIo, ConnectError> {
        let deadline = Instant::now() + self.connect_timeout;
        let upstream = &self.upstream;
        // Resolved here, at each connect, and held to the refused ranges: a name the operator
        // allowed can still be made (by whoever serves its DNS) to point at the node, the cloud's
        // metadata endpoint or the cluster.
        let resolved = tokio::time::timeout_at(
            deadline,
            tokio::net::lookup_host((upstream.host.as_str(), upstream.port)),
        )
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Connect)?;
        let allowed: Vec<std::net::SocketAddr> = resolved
            .filter(|address| !is_refused(&self.refused, address.ip()))
            .collect();
        if allowed.is_empty() {
            return Err(ConnectError::Refused);
        }
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(allowed.as_slice()))
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(ConnectError::Connect)?;
        // Requests are small writes that should leave at once.
        let _ = tcp.set_nodelay(true);
        let started = Instant::now();
        let tls = tokio::time::timeout_at(
            deadline,
            self.tls.connect(upstream.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Tls)?;
        self.metrics
            .handshake_duration
            .observe(started.elapsed().as_secs_f64());
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        Ok(UpstreamIo {
            io: TokioIo::new(tls),
            h2,
        })
    }
}

/// Whether `address` (an IPv4-mapped IPv6 address read as the IPv4 one) is in a refused range.
pub(crate) fn is_refused(refused: &[ipnet::IpNet], address: std::net::IpAddr) -> bool {
    let address = super::config::unmapped(address);
    refused.iter().any(|range| range.contains(&address))
}

/// Why a new upstream connection failed.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Connect(io::Error),
    Tls(io::Error),
    Timeout,
    /// Every address the name resolved to is refused.
    Refused,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Connect(e) => write!(f, "connect failed: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Refused => {
                f.write_str("the upstream resolved only to addresses this proxy may not reach")
            }
        }
    }
}

impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ConnectError::Connect(e) | ConnectError::Tls(e) => Some(e),
            ConnectError::Timeout | ConnectError::Refused => None,
        }
    }
}

/// A TLS connection to the upstream, telling hyper-util whether ALPN chose HTTP/2.
pub(crate) struct UpstreamIo {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1), plus the
/// `Proxy-*` family that is meant for this proxy and must not reach the partner.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, those the `Connection` header names, and `Proxy-*`.
/// `TE: trailers` survives: it is end-to-end in meaning and gRPC servers require it.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let wants_trailers = headers.get_all(header::TE).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    });
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // Most requests carry no Proxy-* header; look before allocating.
    if headers
        .keys()
        .any(|name| name.as_str().starts_with("proxy-"))
    {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy {
            headers.remove(name);
        }
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The body the application receives: the upstream's, under the request deadline, or our own text.
pub(crate) enum ProxyBody {
    Upstream(UpstreamBody),
    Text(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Text(body) => Pin::new(body).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(body) => body.inner.is_end_stream(),
            ProxyBody::Text(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(body) => body.inner.size_hint(),
            ProxyBody::Text(body) => body.size_hint(),
        }
    }
}

/// The upstream's response body, streamed frame by frame; cut off when the request deadline passes.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    deadline: Option<Pin<Box<Sleep>>>,
    /// For counting a failure; taken when counted, so a broken stream counts once.
    shared: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct BodyTimeout;

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request timeout passed while streaming the response body")
    }
}

impl StdError for BodyTimeout {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            if let Some(shared) = this.shared.take() {
                shared.metrics.upstream_error(ErrorKind::Timeout);
            }
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                // The application sees its connection cut; we count it.
                if let Some(shared) = this.shared.take() {
                    shared.metrics.upstream_error(classify(&error).0);
                }
                Poll::Ready(Some(Err(Box::new(error))))
            }
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            other => other.map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The application-facing service: forward, then count the answer.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let response = forward(&shared, request).await;
    shared.metrics.request(response.status().as_u16());
    shared
        .metrics
        .response_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(response)
}

async fn forward(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<ProxyBody> {
    let Some(generation) = shared.current() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-certificate",
            "no client certificate loaded yet",
        );
    };
    if request.method() == Method::CONNECT {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "connect-method",
            "CONNECT is not supported: send plain HTTP requests, the proxy adds TLS",
        );
    }
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(shared.upstream.authority.clone())
        .path_and_query(path)
        .build()
    {
        Ok(uri) => uri,
        Err(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "bad-target",
                "the request target cannot be forwarded",
            );
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    // hyper sets Host (HTTP/1.1) or :authority (HTTP/2) from the upstream URI.
    parts.headers.remove(header::HOST);
    let client = if parts.version == Version::HTTP_2 {
        &generation.clients.http2
    } else {
        &generation.clients.http1
    };
    // The connection's version is settled by ALPN; hyper refuses an HTTP/2 request on HTTP/1.1.
    parts.version = Version::HTTP_11;

    let deadline = shared.request_timeout.map(|t| Instant::now() + t);
    let sent = client.request(Request::from_parts(parts, body));
    let result = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, sent).await {
            Ok(result) => result,
            Err(_) => {
                shared.metrics.upstream_error(ErrorKind::Timeout);
                tracing::warn!(
                    upstream = %shared.upstream.authority,
                    kind = "timeout",
                    "upstream did not answer within the request timeout"
                );
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorKind::Timeout.as_str(),
                    "upstream did not answer within the request timeout",
                );
            }
        },
        None => sent.await,
    };
    // Release this generation's client now so a replaced pool can close while bodies stream.
    drop(generation);

    match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.version = Version::HTTP_11;
            let body = UpstreamBody {
                inner: body,
                deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                shared: Some(shared.clone()),
            };
            Response::from_parts(parts, ProxyBody::Upstream(body))
        }
        Err(error) => {
            let (kind, detail) = classify(&error);
            shared.metrics.upstream_error(kind);
            tracing::warn!(
                upstream = %shared.upstream.authority,
                kind = kind.as_str(),
                error = %detail,
                "upstream request failed"
            );
            let (status, reason) = match kind {
                ErrorKind::Connect => (StatusCode::BAD_GATEWAY, "upstream unreachable"),
                ErrorKind::Tls => (StatusCode::BAD_GATEWAY, "TLS with the upstream failed"),
                ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out"),
                ErrorKind::Refused => (
                    StatusCode::BAD_GATEWAY,
                    "the upstream's address is one this proxy may not reach",
                ),
                ErrorKind::Other => (StatusCode::BAD_GATEWAY, "upstream request failed"),
            };
            // The class only: the detail (certificate names, TLS alerts, addresses) is in the log.
            text(status, kind.as_str(), reason)
        }
    }
}

/// A response the proxy writes itself: `mtls-proxy: <reason>` as plain text.
fn text(status: StatusCode, code: &'static str, reason: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Text(Full::new(Bytes::from(format!(
        "mtls-proxy: {reason}\n"
    )))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
    response
}

/// Sort an upstream failure into a metric kind, with the most specific message in its chain.
/// rustls errors hide inside `io::Error`s, whose `source()` skips the wrapped error itself.
pub(crate) fn classify(error: &(dyn StdError + 'static)) -> (ErrorKind, String) {
    let mut current = Some(error);
    let mut kind = ErrorKind::Other;
    let mut detail = error.to_string();
    while let Some(e) = current {
        if let Some(connect) = e.downcast_ref::<ConnectError>() {
            let kind = match connect {
                ConnectError::Connect(_) => ErrorKind::Connect,
                ConnectError::Tls(_) => ErrorKind::Tls,
                ConnectError::Timeout => ErrorKind::Timeout,
                ConnectError::Refused => ErrorKind::Refused,
            };
            return (kind, connect.to_string());
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return (ErrorKind::Tls, tls.to_string());
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return (ErrorKind::Tls, tls.to_string());
            }
            if io.kind() == io::ErrorKind::TimedOut {
                kind = ErrorKind::Timeout;
            }
            detail = io.to_string();
        }
        current = e.source();
    }
    (kind, detail)
}
