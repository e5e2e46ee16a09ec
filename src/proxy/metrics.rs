//! The proxy's Prometheus metrics. Every label value comes from a fixed set, and the per-request
//! counters are resolved once at start so the hot path is a few atomic increments.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why an upstream exchange failed, as a bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// DNS or TCP connect failed.
    Connect,
    /// The TLS handshake failed or the upstream rejected our certificate.
    Tls,
    /// Connect or request timeout.
    Timeout,
    /// The upstream's name resolved only to addresses the proxy may not reach (`--refuse-address`).
    Refused,
    /// Anything else (the connection broke mid-exchange, a malformed response, ...).
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Timeout,
        ErrorKind::Refused,
        ErrorKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Refused => "refused",
            ErrorKind::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Cheap to clone: every metric is a handle onto shared atomics.
#[derive(Clone)]
pub struct ProxyMetrics {
    registry: std::sync::Arc<Registry>,
    requests: [Counter; 5],
    upstream_errors: [Counter; 5],
    reload_success: Counter,
    reload_failure: Counter,
    pub(crate) last_reload_success: Gauge<i64, AtomicI64>,
    pub(crate) certificate_not_after: Gauge<i64, AtomicI64>,
    pub(crate) handshake_duration: Histogram,
    pub(crate) response_duration: Histogram,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mtls_proxy");

        let requests_family = Family::<ClassLabels, Counter>::default();
        let requests = CLASSES.map(|class| {
            requests_family
                .get_or_create(&ClassLabels { class })
                .clone()
        });
        registry.register(
            "requests",
            "Requests answered, by status class (proxy-generated 502/504 included)",
            requests_family,
        );

        let errors_family = Family::<KindLabels, Counter>::default();
        let upstream_errors = ErrorKind::ALL.map(|kind| {
            errors_family
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .clone()
        });
        registry.register(
            "upstream_errors",
            "Failed upstream exchanges by kind (connect, tls, timeout, other)",
            errors_family,
        );

        let reloads = Family::<OutcomeLabels, Counter>::default();
        let reload_success = reloads
            .get_or_create(&OutcomeLabels { outcome: "success" })
            .clone();
        let reload_failure = reloads
            .get_or_create(&OutcomeLabels { outcome: "failure" })
            .clone();
        registry.register(
            "certificate_reloads",
            "Attempts to load changed certificate files, by outcome; a failure keeps the previous certificate",
            reloads,
        );

        let last_reload_success = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_last_reload_success",
            "1 when the files on disk are the certificate in use, 0 when the last change was refused",
            last_reload_success.clone(),
        );

        let certificate_not_after = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "notAfter of the client certificate in use (Unix seconds); 0 before one is loaded",
            certificate_not_after.clone(),
        );

        let handshake_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "tls_handshake_duration_seconds",
            "Duration of successful TLS handshakes with the upstream",
            handshake_duration.clone(),
        );

        let response_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "response_headers_duration_seconds",
            "Time from receiving a request to sending the response headers (connect included)",
            response_duration.clone(),
        );

        ProxyMetrics {
            registry: std::sync::Arc::new(registry),
            requests,
            upstream_errors,
            reload_success,
            reload_failure,
            last_reload_success,
            certificate_not_after,
            handshake_duration,
            response_duration,
        }
    }

    /// Count one answered request by the class of `status`.
    pub(crate) fn request(&self, status: u16) {
        let index = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[index].inc();
    }

    pub(crate) fn upstream_error(&self, kind: ErrorKind) {
        let index = match kind {
            ErrorKind::Connect => 0,
            ErrorKind::Tls => 1,
            ErrorKind::Timeout => 2,
            ErrorKind::Refused => 3,
            ErrorKind::Other => 4,
        };
        self.upstream_errors[index].inc();
    }

    pub(crate) fn reload(&self, success: bool) {
        if success {
            self.reload_success.inc();
        } else {
            self.reload_failure.inc();
        }
        self.last_reload_success.set(i64::from(success));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
