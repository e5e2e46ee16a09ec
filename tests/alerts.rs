//! The chart's alerts and dashboard on a real Prometheus (#26): promtool checks the PrometheusRule
//! as the chart renders it and unit-tests each alert on series (it fires when it should and stays
//! silent on a healthy fleet); a live Prometheus scraping the real operator binary, with a
//! healthy, an expiring and a failing identity, evaluates every dashboard panel's queries as
//! Grafana would send them, and each returns what the panel is meant to show.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::{Value, json};
use xtask::support::{self, wait_for};

fn chart() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("charts")
        .join("mtls-operator")
        .display()
        .to_string()
}

/// A fresh folder for one test's files.
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = support::environment()
        .dir
        .join("alerts")
        .join(format!("{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The PrometheusRule the chart renders with the rule enabled, as a Prometheus rule file (its
/// `spec`: the groups).
fn rendered_rules(dir: &Path) -> Result<PathBuf> {
    let environment = support::environment();
    let output = Command::new(&environment.helm)
        .env("HELM_CACHE_HOME", environment.dir.join("helm-cache"))
        .env("HELM_CONFIG_HOME", environment.dir.join("helm-config"))
        .env("HELM_DATA_HOME", environment.dir.join("helm-data"))
        .args(["template", "x", &chart(), "--kube-version", "1.31.0"])
        .args(["--set", "metrics.prometheusRule.enabled=true"])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .output()?;
    ensure!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rule: serde_yaml::Value = serde_yaml::from_slice(&output.stdout)?;
    let spec = rule.get("spec").context("the PrometheusRule has no spec")?;
    let path = dir.join("rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(spec)?)?;
    Ok(path)
}

fn promtool(args: &[&str], dir: &Path) -> Result<String> {
    let output = Command::new(&support::environment().promtool)
        .current_dir(dir)
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "promtool {}: {text}",
        args.join(" ")
    );
    Ok(text)
}

/// An alert expected at `eval_time`: its labels beyond the rule's own, and its summary.
fn firing(eval_time: &str, alert: &str, alerts: Vec<(Value, &str)>) -> Value {
    json!({
        "eval_time": eval_time,
        "alertname": alert,
        "exp_alerts": alerts.into_iter().map(|(labels, summary)| json!({
            "exp_labels": labels,
            "exp_annotations": {"summary": summary},
        })).collect::<Vec<_>>(),
    })
}

fn silent(eval_time: &str, alert: &str) -> Value {
    firing(eval_time, alert, Vec::new())
}

const ALERTS: [&str; 5] = [
    "MtlsCertificateExpiringSoon",
    "MtlsIdentityNotReady",
    "MtlsSourceUnreachable",
    "MtlsOperatorNoLeader",
    "MtlsRestartsFailing",
];

/// `promtool check rules` on the rendered rule, then `promtool test rules`: each alert fires on
/// the series that should page (after its `for`, not before), and none fires on a healthy fleet.
#[test]
fn the_charts_alerts_fire_when_they_should_and_stay_silent_on_a_healthy_fleet() -> Result<()> {
    let dir = scratch("rules")?;
    let rules = rendered_rules(&dir)?;
    let checked = promtool(&["check", "rules", "rules.yaml"], &dir)?;
    ensure!(checked.contains("SUCCESS: 5 rules found"), "{checked}");

    let series = |name: &str, labels: &str, values: &str| json!({"series": format!("{name}{{{labels}}}"), "values": values});
    let expiry = "mtls_certificate_expiration_timestamp_seconds";
    let warning = |name: &str| json!({"severity": "warning", "namespace": "team", "name": name});
    let failing = json!({
        "interval": "1m",
        "input_series": [
            // Expires 3 days after the start: within expiringWithin (168h).
            series(expiry, r#"namespace="team",name="expiring""#, "259200x60"),
            series(expiry, r#"namespace="team",name="healthy""#, "31536000x60"),
            series("mtls_identity_ready", r#"namespace="team",name="failing""#, "0x60"),
            series("mtls_identity_ready", r#"namespace="team",name="healthy""#, "1x60"),
            series("mtls_identity_source_reachable", r#"namespace="team",name="unreachable""#, "0x60"),
            series("mtls_identity_source_reachable", r#"namespace="team",name="healthy""#, "1x60"),
            // Two replicas, neither holding the Lease.
            series("mtls_leader", r#"pod="a""#, "0x60"),
            series("mtls_leader", r#"pod="b""#, "0x60"),
            // One failed restart at minute 3.
            series("mtls_restarts_total", r#"outcome="failed""#, "0x2 1x57"),
            series("mtls_restarts_total", r#"outcome="triggered""#, "0+1x60"),
        ],
        "alert_rule_test": [
            silent("9m", "MtlsCertificateExpiringSoon"),
            firing("11m", "MtlsCertificateExpiringSoon",
                vec![(warning("expiring"), "mTLS client certificate team/expiring expires soon")]),
            silent("14m", "MtlsIdentityNotReady"),
            firing("16m", "MtlsIdentityNotReady",
                vec![(warning("failing"), "MtlsIdentity team/failing is not Ready (kubectl describe mtlsid)")]),
            silent("29m", "MtlsSourceUnreachable"),
            firing("31m", "MtlsSourceUnreachable", vec![(warning("unreachable"),
                "Secrets Manager has not answered for MtlsIdentity team/unreachable (throttled or \
                 unreachable); its Secret is kept")]),
            silent("4m", "MtlsOperatorNoLeader"),
            firing("6m", "MtlsOperatorNoLeader", vec![(json!({"severity": "critical"}),
                "no mtls-operator replica is reconciling: rotations and repairs have stopped")]),
            silent("2m", "MtlsRestartsFailing"),
            firing("10m", "MtlsRestartsFailing", vec![(json!({"severity": "warning", "outcome": "failed"}),
                "mtls-operator could not restart workloads after a rotation")]),
            // 15 minutes after the failure, increase() no longer sees it.
            silent("40m", "MtlsRestartsFailing"),
        ],
    });
    // The operator gone: no mtls_leader series at all is no leader too.
    let gone = json!({
        "interval": "1m",
        "input_series": [series("mtls_identity_ready", r#"namespace="team",name="healthy""#, "1x20")],
        "alert_rule_test": [
            silent("4m", "MtlsOperatorNoLeader"),
            firing("6m", "MtlsOperatorNoLeader", vec![(json!({"severity": "critical"}),
                "no mtls-operator replica is reconciling: rotations and repairs have stopped")]),
        ],
    });
    // A healthy fleet for two hours: one leader, restarts that succeed, certificates far from
    // expiry. Nothing fires.
    let healthy = json!({
        "interval": "1m",
        "input_series": [
            series(expiry, r#"namespace="team",name="a""#, "31536000x120"),
            series(expiry, r#"namespace="team",name="b""#, "15552000x120"),
            series("mtls_identity_ready", r#"namespace="team",name="a""#, "1x120"),
            series("mtls_identity_ready", r#"namespace="team",name="b""#, "1x120"),
            series("mtls_identity_source_reachable", r#"namespace="team",name="a""#, "1x120"),
            series("mtls_identity_source_reachable", r#"namespace="team",name="b""#, "1x120"),
            series("mtls_leader", r#"pod="a""#, "1x120"),
            series("mtls_leader", r#"pod="b""#, "0x120"),
            series("mtls_restarts_total", r#"outcome="failed""#, "0x120"),
            series("mtls_restarts_total", r#"outcome="triggered""#, "0+1x120"),
        ],
        "alert_rule_test": ALERTS
            .iter()
            .flat_map(|alert| ["30m", "2h"].map(|at| silent(at, alert)))
            .collect::<Vec<_>>(),
    });
    let tests = json!({
        "rule_files": [rules.file_name().and_then(|name| name.to_str())],
        "evaluation_interval": "1m",
        "tests": [failing, gone, healthy],
    });
    std::fs::write(dir.join("alerts-test.yaml"), serde_yaml::to_string(&tests)?)?;
    let tested = promtool(&["test", "rules", "alerts-test.yaml"], &dir)?;
    ensure!(tested.contains("SUCCESS"), "{tested}");
    Ok(())
}

/// A child process killed when dropped: nothing outlives the test.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A URL query component, percent-encoded.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// `GET path` on the loopback port; the body, parsed as JSON.
async fn get_json(port: u16, path: &str) -> Result<Value> {
    let response = http_get(port, path).await?;
    let (_, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(serde_json::from_str(body)?)
}

/// An instant query's result vector: each series' labels and value.
async fn query(port: u16, expr: &str) -> Result<Vec<(serde_json::Map<String, Value>, f64)>> {
    let answer = get_json(port, &format!("/api/v1/query?query={}", encode(expr))).await?;
    ensure!(answer["status"] == "success", "{expr}: {answer}");
    let result = &answer["data"]["result"];
    let series = result.as_array().context("not a vector")?;
    series
        .iter()
        .map(|series| {
            let labels = series["metric"].as_object().cloned().unwrap_or_default();
            let value = series["value"][1]
                .as_str()
                .context("no value")?
                .parse::<f64>()?;
            Ok((labels, value))
        })
        .collect()
}

/// The panels' queries as Grafana sends them: `$namespace` (a multi-value variable, here one
/// namespace) as its regex, `$__rate_interval` as Grafana computes it for a 1 s scrape on a
/// dashboard spanning 6 hours (`max($__interval + scrape, 4 × scrape)` with a 1 minute
/// `$__interval`: the whole test fits in it), `$__range` as a 5 minute range.
fn as_grafana_sends(expr: &str, namespace: &str) -> String {
    expr.replace("$namespace", namespace)
        .replace("$__rate_interval", "61s")
        .replace("$__range", "5m")
}

/// What one panel query must return on the test fleet.
enum Expect {
    /// One series with this value.
    Value(f64),
    /// One series with this value once rounded (increase() extrapolates to the window's edges).
    About(f64),
    /// One series per value of `label`, exactly these.
    Labels(&'static str, &'static [&'static str]),
    /// At least one series, every value finite.
    Some,
    /// Nothing: the fleet has nothing this panel shows (the reason says why).
    Nothing(&'static str),
}

fn expectation(kind: &str, title: &str, index: usize) -> Result<Expect> {
    use Expect::*;
    Ok(match (title, index) {
        ("Source unreachable", 0) if kind == "table" => Nothing("every source answers"),
        ("Identities", 0) => Value(3.0),
        ("Ready", 0) => Value(2.0),
        ("Not Ready", 0) => Value(1.0),
        ("Source unreachable", 0) => Value(0.0),
        ("Expired", 0) => Value(0.0),
        ("Expiring within 7d", 0) => Value(1.0),
        ("Expiring within 30d", 0) => Value(1.0),
        ("Leader", 0) | ("Leader per replica", 0) => Labels("pod", &["mtls-operator-0"]),
        ("Certificates by time to expiry", _) => Labels("name", &["expiring", "healthy"]),
        ("Shortest time to expiry", 0) => Some,
        ("Identities not Ready", 0) => Labels("name", &["failing"]),
        ("Not Ready by reason", 0) => Labels("reason", &["SourceNotFound"]),
        ("Not Ready and unreachable over time", 0) => Labels("reason", &["SourceNotFound"]),
        ("Not Ready and unreachable over time", 1) => Nothing("every source answers"),
        ("Syncs by outcome and reason", 0) => Labels("reason", &["SourceNotFound", "Synced"]),
        ("Rotations", 0) | ("Rotations in range", 0) => About(1.0),
        ("Workload restarts", 0) | ("Restarts in range", 0) => {
            Labels("outcome", &["failed", "triggered"])
        }
        ("Calls by operation and outcome", 0) | ("Calls per hour by operation", 0) => Some,
        // Every failure outcome, listed at 0 from the start (a series born at its first failure
        // would hide that failure from rate()); the failing identity's absent secret is seen by a
        // version check or inside a batch answer, neither a failed call.
        ("Failed calls by outcome", 0) => Labels(
            "outcome",
            &[
                "AccessDenied",
                "EmptySource",
                "SourceNotFound",
                "SourceUnavailable",
                "Throttled",
            ],
        ),
        // The test environment's region (xtask's testenv::REGION).
        ("Adaptive rate limit per region", 0) => Labels("region", &["us-east-1"]),
        ("Calls per identity per hour", 0) | ("Monthly cost at this rate", 0) => Some,
        ("Change events healthy", 0) => Value(0.0),
        // refreshInterval 1h, but the 2 s sweep checks sooner while no events queue is healthy.
        ("Longest check interval", 0) => Value(2.0),
        ("Reconcile latency", _) | ("Reconciles per second", 0) => Some,
        ("Sweep duration", _) => Some,
        ("Detection lag", _) => Some,
        ("Changes detected and change events", 0) => About(1.0),
        ("Changes detected and change events", 1) => Labels(
            "outcome",
            &[
                "handled",
                "queue_error",
                "received",
                "rejected",
                "unknown_secret",
            ],
        ),
        ("Secrets in the source index", 0) => Some,
        _ => bail!("no expectation for panel {title:?} query {index}: add one"),
    })
}

fn check(
    title: &str,
    expr: &str,
    expect: &Expect,
    result: &[(serde_json::Map<String, Value>, f64)],
) -> Result<()> {
    let shown = || format!("panel {title:?}, {expr}: {result:?}");
    match expect {
        Expect::Value(value) => ensure!(
            result.len() == 1 && result[0].1 == *value,
            "expected {value}: {}",
            shown()
        ),
        Expect::About(value) => ensure!(
            result.len() == 1 && result[0].1.round() == *value,
            "expected about {value}: {}",
            shown()
        ),
        Expect::Labels(label, values) => {
            let got: BTreeSet<&str> = result
                .iter()
                .map(|(labels, _)| labels.get(*label).and_then(Value::as_str).unwrap_or(""))
                .collect();
            let want: BTreeSet<&str> = values.iter().copied().collect();
            ensure!(got == want, "expected {label} {want:?}: {}", shown());
        }
        Expect::Some => ensure!(
            !result.is_empty() && result.iter().all(|(_, value)| value.is_finite()),
            "expected series: {}",
            shown()
        ),
        Expect::Nothing(why) => ensure!(result.is_empty(), "expected none ({why}): {}", shown()),
    }
    Ok(())
}

/// The dashboard on a live Prometheus: the operator binary runs with a healthy identity (rotated
/// once, so rotations and detection show), one whose certificate expires in 5 days, and one whose
/// source does not exist; Prometheus scrapes it every second. Every panel's query, as Grafana sends
/// it, returns what the panel is meant to show, and the namespace variable lists the namespace.
#[tokio::test]
async fn every_dashboard_panel_shows_its_series_on_a_live_prometheus() -> Result<()> {
    let namespace = support::create_namespace("dashboard", &[]).await?;
    let kubeconfig = operator_kubeconfig(&namespace).await?;
    let ca = TestCa::new("dashboard CA")?;
    let healthy = format!("{namespace}/healthy");
    put_source(&healthy, &good_secret(&ca)?).await?;
    let soon = ca.leaf(&LeafOptions {
        not_after: time::OffsetDateTime::now_utc() + time::Duration::days(5),
        ..LeafOptions::default()
    })?;
    let expiring = format!("{namespace}/expiring");
    put_source(
        &expiring,
        &json_secret(&soon.cert_pem, &soon.key_pem, &ca.pem()),
    )
    .await?;
    let environment = support::environment();
    let metrics_port = free_port()?;
    let _operator = Child(
        Command::new(env!("CARGO_BIN_EXE_mtls-operator"))
            .args(["run", "--namespace", &namespace, "--sweep-interval", "2s"])
            .args(["--leader-election", "--lease-namespace", &namespace])
            .arg(format!("--metrics-address=127.0.0.1:{metrics_port}"))
            .arg("--health-address=127.0.0.1:0")
            .envs(environment.variables())
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", &namespace)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let dir = scratch("prometheus")?;
    let prometheus_port = free_port()?;
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "mtls-operator",
            "static_configs": [{
                "targets": [format!("127.0.0.1:{metrics_port}")],
                // What the chart's ServiceMonitor relabels from the pod.
                "labels": {"pod": "mtls-operator-0"},
            }],
        }],
    });
    std::fs::write(dir.join("prometheus.yaml"), serde_yaml::to_string(&config)?)?;
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let _prometheus = Child(
        Command::new(&environment.prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yaml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );

    // Everything the fleet does happens while Prometheus watches: rate() needs the counters'
    // values from before.
    wait_for("Prometheus to scrape the operator", TIMEOUT, || async {
        let up = query(
            prometheus_port,
            "count_over_time(up{job=\"mtls-operator\"}[1m]) >= 3 and up == 1",
        )
        .await?;
        ensure!(!up.is_empty(), "not scraped yet");
        Ok(())
    })
    .await?;
    for (name, id) in [
        ("healthy", healthy.clone()),
        ("expiring", expiring),
        ("failing", format!("{namespace}/absent")),
    ] {
        let spec = json!({"refreshInterval": "1h"});
        create_identity(&namespace, &identity(name, &id, spec)?).await?;
    }

    wait_ready(&namespace, "healthy", "True", "Synced").await?;
    wait_ready(&namespace, "expiring", "True", "Synced").await?;
    wait_ready(&namespace, "failing", "False", "SourceNotFound").await?;
    // A rotation, seen by the sweep: rotations and detection lag have something to show.
    put_source(&healthy, &good_secret(&ca)?).await?;
    wait_event(&namespace, "healthy", "Rotated").await?;
    let scraped = format!(
        "sum(mtls_rotations_total) >= 1 and on() count(mtls_identity_ready{{namespace=\"{namespace}\"}}) == 3"
    );
    wait_for("Prometheus to have scraped the fleet", TIMEOUT, || async {
        let result = query(prometheus_port, &scraped).await?;
        ensure!(!result.is_empty(), "not yet");
        Ok(())
    })
    .await?;

    let dashboard: Value = serde_json::from_str(include_str!(
        "../charts/mtls-operator/dashboards/mtls-operator.json"
    ))?;
    let (mut checked, mut wrong) = (0, Vec::new());
    for panel in dashboard["panels"].as_array().context("no panels")? {
        let title = panel["title"].as_str().unwrap_or_default();
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        for (index, target) in targets.iter().enumerate() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            let sent = as_grafana_sends(expr, &namespace);
            let kind = panel["type"].as_str().unwrap_or_default();
            let expect = expectation(kind, title, index)?;
            let result = query(prometheus_port, &sent).await?;
            if let Err(error) = check(title, &sent, &expect, &result) {
                wrong.push(error.to_string());
            }
            checked += 1;
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} panel queries wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    ensure!(checked >= 40, "only {checked} panel queries");
    // The namespace variable: label_values(mtls_identity_ready, namespace), as Grafana asks it.
    let values = get_json(
        prometheus_port,
        &format!(
            "/api/v1/label/namespace/values?match[]={}",
            encode("mtls_identity_ready")
        ),
    )
    .await?;
    let listed = values["data"].as_array().context("no label values")?;
    ensure!(
        listed.iter().any(|value| value == namespace.as_str()),
        "the namespace variable does not list {namespace}: {values}"
    );
    Ok(())
}
