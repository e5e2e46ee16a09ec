//! Prometheus metrics. Label values are bounded: namespace and name of identities, fixed reason
//! strings, fixed operation and outcome names; never error text.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicI64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::MtlsIdentityStatus;
use crate::api::conditions::{ConditionType, Outcome, Reason};

/// What `/metrics` says about one identity.
#[derive(Clone, Debug, Default, PartialEq)]
struct IdentitySeries {
    /// The certificate in the identity's Secret (Unix seconds); none before the first sync.
    not_after: Option<i64>,
    not_before: Option<i64>,
    ready: bool,
    /// The Ready condition's fixed reason while not Ready.
    not_ready_reason: Option<Box<str>>,
    source_reachable: bool,
    /// The identity's refresh interval (seconds); 0 before its first reconcile.
    refresh_seconds: u32,
}

/// Namespace and name.
type IdentityName = (Box<str>, Box<str>);

/// The per-identity series, one compact record per identity, written out at each scrape. A
/// `Family` per gauge would keep five hash tables with their own copies of the labels: about
/// 800 bytes per identity, 8 MB at 10,000 identities.
#[derive(Debug, Default)]
struct IdentityGauges {
    /// By namespace and name; ordered, so a scrape lists them in a stable order.
    series: Mutex<BTreeMap<IdentityName, IdentitySeries>>,
    /// The sweep interval in effect (seconds); 0 while none is (healthy events, `get` mode).
    sweep_interval_seconds: std::sync::atomic::AtomicU64,
}

impl Collector for IdentityGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let series = crate::lock(&self.series);
        let sweep = self
            .sweep_interval_seconds
            .load(std::sync::atomic::Ordering::Relaxed);
        // One gauge, a series per identity that has a value for it.
        let gauge = |encoder: &mut DescriptorEncoder,
                     name: &str,
                     help: &str,
                     value: fn(&IdentitySeries) -> Option<i64>|
         -> Result<(), std::fmt::Error> {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for ((namespace, identity), values) in series.iter() {
                if let Some(value) = value(values) {
                    let labels = [
                        ("namespace", namespace.as_ref()),
                        ("name", identity.as_ref()),
                    ];
                    metric.encode_family(&labels)?.encode_gauge(&value)?;
                }
            }
            Ok(())
        };
        // Named like cert-manager's where they mean the same, so its users' alerts translate.
        gauge(
            &mut encoder,
            "certificate_expiration_timestamp_seconds",
            "notAfter of the certificate in the identity's Secret (Unix seconds)",
            |values| values.not_after,
        )?;
        gauge(
            &mut encoder,
            "certificate_not_before_timestamp_seconds",
            "notBefore of the certificate in the identity's Secret (Unix seconds)",
            |values| values.not_before,
        )?;
        gauge(
            &mut encoder,
            "identity_ready",
            "1 when the identity is Ready, 0 when not",
            |values| Some(i64::from(values.ready)),
        )?;
        // Its reason is a label: one series per not-Ready identity, none while Ready.
        let mut not_ready = encoder.encode_descriptor(
            "identity_not_ready",
            "1 while the identity is not Ready, with the Ready condition's reason",
            None,
            MetricType::Gauge,
        )?;
        for ((namespace, identity), values) in series.iter() {
            if let Some(reason) = &values.not_ready_reason {
                let labels = [
                    ("namespace", namespace.as_ref()),
                    ("name", identity.as_ref()),
                    ("reason", reason.as_ref()),
                ];
                not_ready.encode_family(&labels)?.encode_gauge(&1i64)?;
            }
        }
        gauge(
            &mut encoder,
            "identity_source_reachable",
            "0 while the identity's last Secrets Manager check failed transiently (throttled, \
             unreachable), 1 otherwise",
            |values| Some(i64::from(values.source_reachable)),
        )?;
        let check_interval = |values: &IdentitySeries| {
            let refresh = u64::from(values.refresh_seconds);
            let longest = if sweep == 0 {
                refresh
            } else {
                refresh.min(sweep)
            };
            (refresh > 0).then(|| i64::try_from(longest).unwrap_or(i64::MAX))
        };
        let mut checked = encoder.encode_descriptor(
            "identity_version_check_interval_seconds",
            "Longest a new version of the identity's secret goes unseen when no change event \
             announces it: its refreshInterval, or the sweep interval when shorter while change \
             events are not healthy",
            None,
            MetricType::Gauge,
        )?;
        for ((namespace, identity), values) in series.iter() {
            if let Some(seconds) = check_interval(values) {
                let labels = [
                    ("namespace", namespace.as_ref()),
                    ("name", identity.as_ref()),
                ];
                checked.encode_family(&labels)?.encode_gauge(&seconds)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// "success" or "failure".
    pub outcome: String,
    /// "Synced", or the failure's fixed reason.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub operation: String,
    /// "success", or the error's fixed reason.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    /// Certificate times, Ready (and, while not Ready, why: "which are failing and why"), and
    /// whether the last source check got an answer, per identity.
    identities: std::sync::Arc<IdentityGauges>,
    pub syncs: Family<SyncLabels, Counter>,
    pub aws_calls: Family<CallLabels, Counter>,
    /// The adaptive client-side rate per region (calls per second).
    pub aws_rate: Family<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub rotations: Counter,
    pub restarts: Family<OutcomeLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub leader: Gauge<i64, AtomicI64>,
    /// Distinct secrets in the version index.
    pub index_size: Gauge<i64, AtomicI64>,
    /// Secrets whose version check was due at the last sweep pass: above zero for long, the sweep
    /// is behind and identities get a longer cadence than their refresh interval.
    pub sweep_backlog: Gauge<i64, AtomicI64>,
    pub sweep_duration: Histogram,
    /// Version changes the sweep or an event found.
    pub changes_detected: Counter,
    /// From a secret's change (its LastChangedDate) to its detection by the sweep or an event.
    pub detection_lag: Histogram,
    /// Change events by outcome (received, handled, unknown_secret, rejected, queue_error).
    pub events: Family<OutcomeLabels, Counter>,
    /// Reads an identity needed that its read budget put off (edits faster than the budget).
    pub reads_deferred: Counter,
    /// Identities the controller keeps per-identity memory for (backoff, read budget, ...).
    pub identities_remembered: Gauge<i64, AtomicI64>,
    /// 1 while the events queue is healthy (the sweep is then a safety net).
    pub events_healthy: Gauge<i64, AtomicI64>,
    /// Reconciles waiting for a permit (`--max-concurrent-reconciles`), or woken and not started.
    pub reconciles_waiting: Gauge<i64, AtomicI64>,
    /// `Synced` Events not published: over the budget of `--synced-event-rate`/`-burst`.
    pub synced_events_skipped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mtls");
        let metrics = Self {
            registry: Registry::default(),
            identities: Default::default(),
            syncs: Family::default(),
            aws_calls: Family::default(),
            aws_rate: Family::default(),
            rotations: Counter::default(),
            restarts: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            leader: Gauge::default(),
            index_size: Gauge::default(),
            sweep_backlog: Gauge::default(),
            sweep_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            changes_detected: Counter::default(),
            events: Family::default(),
            detection_lag: Histogram::new(exponential_buckets(0.5, 2.0, 14)),
            reads_deferred: Counter::default(),
            identities_remembered: Gauge::default(),
            events_healthy: Gauge::default(),
            reconciles_waiting: Gauge::default(),
            synced_events_skipped: Counter::default(),
        };
        registry.register_collector(Box::new(metrics.identities.clone()));
        registry.register(
            "syncs",
            "Syncs by outcome and reason",
            metrics.syncs.clone(),
        );
        registry.register(
            "secretsmanager_calls",
            "AWS Secrets Manager API calls by operation and outcome",
            metrics.aws_calls.clone(),
        );
        registry.register(
            "secretsmanager_rate_limit",
            "Calls per second the operator allows itself per region now: halves when Secrets \
             Manager throttles, grows back while calls succeed, never above --max-aws-calls-per-second",
            metrics.aws_rate.clone(),
        );
        registry.register(
            "rotations",
            "Certificates replaced by a new version",
            metrics.rotations.clone(),
        );
        registry.register(
            "restarts",
            "Workload restarts for rotations, by outcome (triggered, failed)",
            metrics.restarts.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "source_index_secrets",
            "Distinct Secrets Manager secrets the watched identities reference",
            metrics.index_size.clone(),
        );
        registry.register(
            "sweep_backlog",
            "Secrets whose version check was due when the sweep last looked (the sweep is behind while it stays above zero)",
            metrics.sweep_backlog.clone(),
        );
        registry.register(
            "sweep_duration_seconds",
            "Time one version sweep took",
            metrics.sweep_duration.clone(),
        );
        registry.register(
            "source_changes_detected",
            "Secret version changes found by the sweep or an event",
            metrics.changes_detected.clone(),
        );
        registry.register(
            "source_detection_lag_seconds",
            "From a secret's last change (Secrets Manager's LastChangedDate) to its detection",
            metrics.detection_lag.clone(),
        );
        registry.register(
            "source_events",
            "Change events from the queue, by outcome (received, handled, unknown_secret, \
             rejected, queue_error)",
            metrics.events.clone(),
        );
        registry.register(
            "source_reads_deferred",
            "Secrets Manager reads an identity needed that its read budget put off (edits of its \
             Secret or spec arriving faster than the budget allows)",
            metrics.reads_deferred.clone(),
        );
        registry.register(
            "identities_remembered",
            "Identities the controller keeps per-identity memory for: at most the identities that \
             exist (forgotten on delete and on every re-list of the watch)",
            metrics.identities_remembered.clone(),
        );
        registry.register(
            "source_events_healthy",
            "1 while the change events queue answers (messages or empty long polls): versions are \
             then swept at each identity's refreshInterval only, as a safety net; 0 while it fails \
             or is not configured (swept every --sweep-interval)",
            metrics.events_healthy.clone(),
        );
        registry.register(
            "reconciles_waiting",
            "Reconciles waiting for one of --max-concurrent-reconciles permits (parked in their \
             namespace's queue, served in turn), or woken and not started yet",
            metrics.reconciles_waiting.clone(),
        );
        registry.register(
            "synced_events_skipped",
            "Synced Events (an identity's first sync) not published because more came at once than \
             --synced-event-rate and --synced-event-burst allow; the Ready condition still says it",
            metrics.synced_events_skipped.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica reconciles: it holds the leader Lease, or runs without leader election",
            metrics.leader.clone(),
        );
        // Counters with fixed outcomes start at 0, so /metrics lists them (and rate() works) before
        // the first restart or event.
        for outcome in Outcome::RESTARTS {
            let _ = metrics.restarts.get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            });
        }
        for outcome in Outcome::EVENTS {
            let _ = metrics.events.get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            });
        }
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// Records one reconcile of an identity: the sync counter (`outcome` is `Err(reason)` on
    /// failure), its gauges from the new status, and a rotation if the status records a new one.
    pub fn record_identity(
        &self,
        namespace: &str,
        name: &str,
        previous: Option<&MtlsIdentityStatus>,
        now: &MtlsIdentityStatus,
        outcome: Result<(), Reason>,
        refresh: std::time::Duration,
    ) {
        let (sync_outcome, reason) = match outcome {
            Ok(()) => (Outcome::Success, Reason::Synced),
            Err(reason) => (Outcome::Failure, reason),
        };
        self.syncs
            .get_or_create(&SyncLabels {
                outcome: sync_outcome.to_string(),
                reason: reason.to_string(),
            })
            .inc();
        let ready = now
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Ready);
        let unix = |text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| time.timestamp())
                .ok()
        };
        let mut series = IdentitySeries {
            ready: ready.is_some_and(|c| c.status == "True"),
            not_ready_reason: ready
                .filter(|c| c.status != "True")
                .map(|c| c.reason.as_str().into()),
            source_reachable: !now
                .conditions
                .iter()
                .any(|c| c.type_ == ConditionType::SourceReachable && c.status == "False"),
            refresh_seconds: u32::try_from(refresh.as_secs()).unwrap_or(u32::MAX),
            ..IdentitySeries::default()
        };
        // The gauges describe the certificate in the Secret, which a failed sync leaves in place.
        if let Some(certificate) = &now.certificate {
            series.not_after = unix(&certificate.not_after);
            series.not_before = unix(&certificate.not_before);
        }
        self.set_identity(namespace, name, series);
        let new_rotation = now.last_rotation.as_ref().is_some_and(|rotation| {
            previous
                .and_then(|p| p.last_rotation.as_ref())
                .map(|r| &r.sha256_fingerprint)
                != Some(&rotation.sha256_fingerprint)
        });
        if new_rotation {
            self.rotations.inc();
        }
    }

    /// Removes a deleted identity's series, so `/metrics` does not grow with every identity that
    /// ever existed.
    pub fn forget_identity(&self, namespace: &str, name: &str) {
        crate::lock(&self.identities.series).remove(&(namespace.into(), name.into()));
    }

    /// Removes the series of every identity `keep` rejects (deleted while the watch was
    /// disconnected); returns how many.
    pub fn retain_identities(&self, keep: impl Fn(&str, &str) -> bool) -> usize {
        let mut series = crate::lock(&self.identities.series);
        let before = series.len();
        series.retain(|(namespace, name), _| keep(namespace, name));
        before - series.len()
    }

    fn set_identity(&self, namespace: &str, name: &str, values: IdentitySeries) {
        crate::lock(&self.identities.series).insert((namespace.into(), name.into()), values);
    }

    /// The sweep interval in effect (`None`: each identity is checked at its refresh interval) and
    /// whether change events are healthy.
    pub fn set_sweep_interval(&self, interval: Option<std::time::Duration>, events_healthy: bool) {
        self.identities.sweep_interval_seconds.store(
            interval.map_or(0, |interval| interval.as_secs().max(1)),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.events_healthy.set(i64::from(events_healthy));
    }

    /// Counts `count` workload restarts with `outcome` (triggered or failed).
    pub fn record_restarts(&self, outcome: Outcome, count: usize) {
        self.restarts
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    pub fn record_event(&self, outcome: Outcome) {
        self.events
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn record_aws_rate(&self, region: &str, rate: f64) {
        self.aws_rate
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .set(rate);
    }

    /// Lists `operation` with `outcome` at 0 until a call is counted in it.
    pub fn start_aws_call_at_zero(&self, operation: &str, outcome: &str) {
        let _ = self.aws_calls.get_or_create(&CallLabels {
            operation: operation.to_string(),
            outcome: outcome.to_string(),
        });
    }

    pub fn record_aws_call(&self, operation: &str, outcome: &str) {
        self.aws_calls
            .get_or_create(&CallLabels {
                operation: operation.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let metrics = Metrics::new();
        metrics.set_identity(
            "payments",
            "client",
            IdentitySeries {
                not_after: Some(1_900_000_000),
                ready: true,
                source_reachable: true,
                ..IdentitySeries::default()
            },
        );
        metrics.record_aws_call("GetSecretValue", "success");
        let text = metrics.encode();
        assert!(text.contains(
            "mtls_certificate_expiration_timestamp_seconds{namespace=\"payments\",name=\"client\"} 1900000000"
        ), "{text}");
        assert!(text.contains(
            "mtls_secretsmanager_calls_total{operation=\"GetSecretValue\",outcome=\"success\"} 1"
        ), "{text}");
        assert!(
            text.contains("mtls_identity_ready{namespace=\"payments\",name=\"client\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "mtls_identity_source_reachable{namespace=\"payments\",name=\"client\"} 1"
            ),
            "{text}"
        );
        // No certificate yet: no notBefore series, rather than a zero that reads as 1970.
        assert!(
            !text.contains("mtls_certificate_not_before_timestamp_seconds{"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE mtls_certificate_not_before_timestamp_seconds gauge"),
            "{text}"
        );
        assert!(text.contains("mtls_reconcile_duration_seconds_bucket"));
        assert!(text.contains("mtls_leader 0"));
    }

    #[test]
    fn a_not_ready_identity_has_one_series_with_its_current_reason() {
        let metrics = Metrics::new();
        let series = |metrics: &Metrics| -> Vec<String> {
            metrics
                .encode()
                .lines()
                .filter(|line| line.starts_with("mtls_identity_not_ready{"))
                .map(str::to_string)
                .collect()
        };
        let not_ready = |reason: Option<&str>| IdentitySeries {
            not_ready_reason: reason.map(Into::into),
            ready: reason.is_none(),
            ..IdentitySeries::default()
        };
        metrics.set_identity("ns", "a", not_ready(Some("SourceNotFound")));
        assert_eq!(
            series(&metrics),
            vec![r#"mtls_identity_not_ready{namespace="ns",name="a",reason="SourceNotFound"} 1"#]
        );
        metrics.set_identity("ns", "a", not_ready(Some("AccessDenied")));
        assert_eq!(
            series(&metrics),
            vec![r#"mtls_identity_not_ready{namespace="ns",name="a",reason="AccessDenied"} 1"#]
        );
        metrics.set_identity("ns", "a", not_ready(None));
        assert!(series(&metrics).is_empty());
        metrics.set_identity("ns", "b", not_ready(Some("Expired")));
        metrics.forget_identity("ns", "b");
        assert!(series(&metrics).is_empty());
        metrics.forget_identity("payments", "client");
        assert!(!metrics.encode().contains("name=\"client\""));
    }
}
