//! Unit tests: parsing, header rules, error classification, and reloading on a kubelet-style
//! directory. The end-to-end behaviour over loopback is in `tests/proxy.rs`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use hyper::header::{HeaderMap, HeaderValue};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

use super::forward::{ConnectError, classify, strip_hop_by_hop};
use super::reload::{Reloader, load_pair};
use super::*;

struct Pair {
    cert: String,
    key: String,
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "test ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}

fn client(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> Pair {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("cert");
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

#[test]
fn upstream_parses_host_port_and_ip() {
    let u = Upstream::parse("https://api.partner.example").expect("plain");
    assert_eq!((u.host.as_str(), u.port), ("api.partner.example", 443));
    assert_eq!(u.authority.as_str(), "api.partner.example");
    let u = Upstream::parse("https://api.partner.example:8443/").expect("port");
    assert_eq!(u.port, 8443);
    let u = Upstream::parse("https://127.0.0.1:9443").expect("ipv4");
    assert_eq!(u.host, "127.0.0.1");
    let u = Upstream::parse("https://[::1]:9443").expect("ipv6");
    assert_eq!((u.host.as_str(), u.port), ("::1", 9443));
}

#[test]
fn upstream_refuses_what_it_would_ignore() {
    for bad in [
        "http://api.partner.example",
        "api.partner.example",
        "https://api.partner.example/v1",
        "https://api.partner.example/?a=b",
        "https://user@api.partner.example",
        "not a url",
    ] {
        let error = Upstream::parse(bad).expect_err(bad);
        assert_eq!(error.reason(), "InvalidUpstream", "{bad}");
    }
}

#[test]
fn hop_by_hop_headers_are_stripped() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("connection", "keep-alive, X-Internal-Hop"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic abc"),
        ("proxy-connection", "keep-alive"),
        ("te", "gzip"),
        ("trailer", "x-checksum"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("x-internal-hop", "1"),
        ("x-request-id", "abc"),
        ("authorization", "Bearer t"),
    ] {
        headers.append(name, HeaderValue::from_static(value));
    }
    strip_hop_by_hop(&mut headers);
    let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, ["authorization", "x-request-id"]);
}

#[test]
fn te_trailers_survives_for_grpc() {
    let mut headers = HeaderMap::new();
    headers.insert("te", HeaderValue::from_static("trailers, gzip;q=0.5"));
    strip_hop_by_hop(&mut headers);
    assert_eq!(
        headers.get("te"),
        Some(&HeaderValue::from_static("trailers"))
    );
}

#[test]
fn errors_are_classified_through_io_wrappers() {
    let connect = ConnectError::Connect(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert_eq!(classify(&connect).0, ErrorKind::Connect);
    assert_eq!(classify(&ConnectError::Timeout).0, ErrorKind::Timeout);
    let handshake = ConnectError::Tls(io::Error::other("x"));
    assert_eq!(classify(&handshake).0, ErrorKind::Tls);
    // A TLS 1.3 server rejects a client certificate after the handshake: an alert on first read.
    let alert = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
    );
    let (kind, detail) = classify(&alert);
    assert_eq!(kind, ErrorKind::Tls);
    assert!(detail.contains("CertificateRequired"), "{detail}");
    assert_eq!(
        classify(&io::Error::from(io::ErrorKind::BrokenPipe)).0,
        ErrorKind::Other
    );
}

#[test]
fn pair_loads_and_a_foreign_key_is_refused() {
    let ca = ca();
    let a = client(&ca, "a");
    let b = client(&ca, "b");
    let loaded = load_pair(a.cert.as_bytes(), a.key.as_bytes()).expect("a loads");
    assert!(loaded.not_after > chrono::Utc::now().timestamp());
    assert_eq!(loaded.sha256.len(), 64);
    assert!(!loaded.serial.is_empty());
    let error = load_pair(a.cert.as_bytes(), b.key.as_bytes())
        .err()
        .expect("mismatch refused");
    assert_eq!(error.reason(), "KeyMismatch");
    let error = load_pair(b"garbage", a.key.as_bytes())
        .err()
        .expect("garbage refused");
    assert_eq!(error.reason(), "MissingCertificate");
}

#[test]
fn proxy_error_reasons_are_fixed() {
    let error = ProxyError::Bind {
        what: "proxy",
        address: "127.0.0.1:1".parse().expect("addr"),
        source: io::Error::from(io::ErrorKind::AddrInUse),
    };
    assert_eq!(error.reason(), "BindFailed");
    assert!(error.to_string().contains("127.0.0.1:1"));
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    proxy: ProxyArgs,
}

#[test]
fn flags_have_documented_defaults() {
    let cli =
        Cli::try_parse_from(["proxy", "--upstream", "https://api.partner.example"]).expect("parse");
    let args = cli.proxy;
    assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(args.admin_address.to_string(), "127.0.0.1:9090");
    assert_eq!(args.cert_dir, PathBuf::from("/etc/mtls"));
    assert_eq!(args.reload_interval, Duration::from_secs(2));
    assert_eq!(args.connect_timeout, Duration::from_secs(5));
    assert_eq!(args.request_timeout, Duration::from_secs(30));
    assert!(args.upstream_ca.is_none());
    let cli = Cli::try_parse_from([
        "proxy",
        "--upstream=https://a.example",
        "--request-timeout=250ms",
        "--reload-interval=1m",
    ])
    .expect("parse durations");
    assert_eq!(cli.proxy.request_timeout, Duration::from_millis(250));
    assert_eq!(cli.proxy.reload_interval, Duration::from_secs(60));
}

#[test]
fn metrics_are_named_as_documented() {
    let metrics = ProxyMetrics::new();
    metrics.request(200);
    metrics.request(504);
    metrics.upstream_error(ErrorKind::Tls);
    metrics.reload(false);
    let text = metrics.encode();
    for expected in [
        "mtls_proxy_requests_total{class=\"2xx\"} 1",
        "mtls_proxy_requests_total{class=\"5xx\"} 1",
        "mtls_proxy_upstream_errors_total{kind=\"tls\"} 1",
        "mtls_proxy_upstream_errors_total{kind=\"connect\"} 0",
        "mtls_proxy_certificate_reloads_total{outcome=\"failure\"} 1",
        "mtls_proxy_certificate_last_reload_success 0",
        "mtls_proxy_certificate_expiration_timestamp_seconds 0",
        "mtls_proxy_tls_handshake_duration_seconds_bucket",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mtls-proxy-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write `pair` the way the kubelet does: a timestamped directory, `..data` renamed over atomically.
fn kubelet_write(dir: &Path, version: &str, pair: &Pair) {
    let data = dir.join(format!("..2026_11_29_10_00_00.{version}"));
    std::fs::create_dir(&data).expect("version dir");
    std::fs::write(data.join("tls.crt"), &pair.cert).expect("crt");
    std::fs::write(data.join("tls.key"), &pair.key).expect("key");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().expect("name"), &tmp).expect("tmp link");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    for file in ["tls.crt", "tls.key"] {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{file}"), &link).expect("file link");
        }
    }
}

fn shared() -> Arc<Shared> {
    Arc::new(Shared {
        upstream: Upstream::parse("https://localhost:1").expect("upstream"),
        refused: Vec::new().into(),
        connect_timeout: Duration::from_secs(1),
        request_timeout: None,
        metrics: ProxyMetrics::new(),
        provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        current: RwLock::new(None),
        draining: std::sync::atomic::AtomicBool::new(false),
    })
}

#[tokio::test]
async fn reloader_swaps_generations_and_keeps_the_old_one_on_a_bad_pair() {
    let ca = ca();
    let scratch = Scratch::new();
    let shared = shared();
    let roots = Arc::new(rustls::RootCertStore::empty());
    let mut reloader = Reloader::new(shared.clone(), scratch.0.clone(), None, Some(roots));

    // Nothing there yet: not ready, one failure reported.
    reloader.poll().await;
    assert!(shared.current().is_none());
    assert!(!shared.ready());

    kubelet_write(&scratch.0, "1", &client(&ca, "first"));
    reloader.poll().await;
    let first = shared.current().expect("first generation").id;
    assert!(shared.ready());

    // Unchanged files: no new generation.
    reloader.poll().await;
    assert_eq!(shared.current().map(|g| g.id), Some(first));

    let second = client(&ca, "second");
    kubelet_write(&scratch.0, "2", &second);
    reloader.poll().await;
    let second_id = shared.current().expect("second generation").id;
    assert!(second_id > first);

    // Certificate of one pair, key of another: refused, the second stays.
    let other = client(&ca, "other");
    let broken = Pair {
        cert: other.cert,
        key: second.key.clone(),
    };
    kubelet_write(&scratch.0, "3", &broken);
    reloader.poll().await;
    assert_eq!(shared.current().map(|g| g.id), Some(second_id));
    let text = shared.metrics.encode();
    assert!(
        text.contains("mtls_proxy_certificate_reloads_total{outcome=\"failure\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("mtls_proxy_certificate_reloads_total{outcome=\"success\"} 2"),
        "{text}"
    );
    assert!(text.contains("mtls_proxy_certificate_last_reload_success 0"));
    // Reported once, not at every poll.
    reloader.poll().await;
    assert!(
        shared
            .metrics
            .encode()
            .contains("mtls_proxy_certificate_reloads_total{outcome=\"failure\"} 2")
    );
}
