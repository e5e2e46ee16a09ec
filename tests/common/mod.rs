//! Shared by the integration tests: the CRD and RBAC installed once, an operator per test namespace
//! (running as a ServiceAccount bound to the chart's rules, `charts/mtls-operator/files/operator-rules.yaml`), test certificates, and lookups.
#![allow(dead_code)]

pub mod endpoint;
pub mod iam;
pub mod link;
pub mod scenario;
#[allow(unused_imports)]
pub use scenario::Scenario;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use mtls_operator::api::{MtlsIdentity, RotationStatus};
use mtls_operator::controller::{self, Settings};
use mtls_operator::restart::Workload;
use mtls_operator::source::{
    FetchedSecret, SecretRef, SecretSource, SecretsManagerSource, SourceError,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::sync::{OnceCell, oneshot};
use xtask::support::{self, wait_for};

pub const TIMEOUT: Duration = Duration::from_secs(60);

static INSTALLED: OnceCell<()> = OnceCell::const_new();

/// Applies the generated CRD and the documented ClusterRole (once per test binary).
pub async fn install_crd_and_rbac() -> Result<()> {
    INSTALLED
        .get_or_try_init(|| async {
            let admin = support::admin_client().await?;
            let apply = PatchParams::apply("mtls-operator-tests").force();
            let crd: CustomResourceDefinition =
                serde_yaml::from_str(include_str!("../../crds/mtlsidentity.yaml"))?;
            let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
            crds.patch(
                "mtlsidentities.mtls-operator.io",
                &apply,
                &Patch::Apply(&crd),
            )
            .await?;
            let chart = |file| format!("charts/mtls-operator/files/{file}");
            // The operator's rules; the Annotate rules, granted only to operators that enable
            // Annotate; the leader-election rules, granted in the Lease's namespace to operators
            // that elect a leader: each as the chart grants it.
            apply_cluster_role("mtls-operator", &chart("operator-rules.yaml")).await?;
            apply_cluster_role("mtls-operator-annotate", &chart("annotate-rules.yaml")).await?;
            apply_cluster_role(
                "mtls-operator-leader-election",
                &chart("leader-election-rules.yaml"),
            )
            .await?;
            // The integrity key's Secret, granted in the operator's own namespace.
            apply_cluster_role(
                "mtls-operator-integrity-key",
                &chart("integrity-key-rules.yaml"),
            )
            .await?;
            wait_for("the CRD to be established", TIMEOUT, || async {
                let crd = crds.get("mtlsidentities.mtls-operator.io").await?;
                let established = crd
                    .status
                    .and_then(|status| status.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                ensure!(established, "not established yet");
                Ok(())
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        })
        .await?;
    Ok(())
}

/// An operator watching one namespace, as ServiceAccount `mtls-operator` bound (RoleBinding) to the
/// documented ClusterRole. Stops when dropped.
pub struct Operator {
    pub source: Arc<SecretsManagerSource>,
    pub metrics: Arc<mtls_operator::metrics::Metrics>,
    /// Fetches of `/fault-slow` ids that have started (and are being held back).
    pub slow_fetches: Arc<std::sync::atomic::AtomicU64>,
    /// What the operator's `/readyz` would say.
    pub readiness: mtls_operator::health::Readiness,
    stop: Option<oneshot::Sender<()>>,
}

impl Operator {
    /// Waits until a fetch of a `/fault-slow` id has started: the operator is inside its read,
    /// held back there, and whatever a test does now happens during it.
    pub async fn wait_slow_fetch_started(&self) -> Result<()> {
        wait_for("a slow fetch to start", TIMEOUT, || async {
            ensure!(
                self.slow_fetches.load(std::sync::atomic::Ordering::SeqCst) > 0,
                "not yet"
            );
            Ok(())
        })
        .await
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start_operator(namespace: &str) -> Result<Operator> {
    start_operator_with(namespace, Settings::default()).await
}

/// An operator with `settings` (its namespace is set to `namespace`).
pub async fn start_operator_with(namespace: &str, settings: Settings) -> Result<Operator> {
    start_operator_for(&[namespace], settings).await
}

/// Reconciles that reached a sync outcome so far (`mtls_syncs_total`, all outcomes).
pub fn syncs(operator: &Operator) -> u64 {
    operator
        .metrics
        .encode()
        .lines()
        .filter(|line| line.starts_with("mtls_syncs_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until `more` reconciles beyond `before` (a [`syncs`] count) have reached a sync outcome:
/// what a negative check ("no rollout", "one read") waits for, so that it is made after the
/// operator has acted on its own write, not before.
pub async fn wait_reconciles(operator: &Operator, before: u64, more: u64) -> Result<()> {
    wait_for(&format!("{more} more reconciles"), TIMEOUT, || async {
        let done = syncs(operator) - before;
        ensure!(done >= more, "{done} so far");
        Ok(())
    })
    .await
}

/// The value of one series of the operator's metrics (`name` with its labels, as exposed), 0 when
/// absent.
pub fn metric(operator: &Operator, series: &str) -> u64 {
    operator
        .metrics
        .encode()
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
}

/// One operator watching `namespaces`, as ServiceAccount `mtls-operator` of the first, bound to the
/// documented ClusterRole in each (RoleBindings: RBAC only there).
pub async fn start_operator_for(namespaces: &[&str], settings: Settings) -> Result<Operator> {
    start_operator_capped(
        namespaces,
        settings,
        mtls_operator::source::DEFAULT_MAX_IN_FLIGHT,
    )
    .await
}

/// Like [`start_operator_for`], with at most `max_in_flight` Secrets Manager calls at once.
pub async fn start_operator_capped(
    namespaces: &[&str],
    settings: Settings,
    max_in_flight: usize,
) -> Result<Operator> {
    let aws = support::aws_config().await;
    let source = SecretsManagerSource::new(aws.clone()).with_max_in_flight(max_in_flight);
    start_operator_on(namespaces, settings, aws, source).await
}

/// A [`endpoint::CountingEndpoint`] in front of the environment's moto.
pub async fn counting_endpoint(mode: endpoint::Mode) -> Result<endpoint::CountingEndpoint> {
    let base = support::aws_config().await;
    let moto = base.endpoint_url().context("no AWS endpoint")?.to_string();
    endpoint::CountingEndpoint::start(&moto, mode).await
}

/// Like [`start_operator_for`], every Secrets Manager call through `endpoint`.
pub async fn start_operator_through(
    endpoint: &endpoint::CountingEndpoint,
    namespaces: &[&str],
    settings: Settings,
) -> Result<Operator> {
    let aws = endpoint.aws_config(&support::aws_config().await);
    start_operator_on(
        namespaces,
        settings,
        aws.clone(),
        SecretsManagerSource::new(aws),
    )
    .await
}

/// An operator watching `namespace` behind a new counting endpoint in `mode`.
pub async fn operator_behind(
    namespace: &str,
    mode: endpoint::Mode,
    settings: Settings,
) -> Result<(Operator, endpoint::CountingEndpoint)> {
    let endpoint = counting_endpoint(mode).await?;
    let operator = start_operator_through(&endpoint, &[namespace], settings).await?;
    Ok((operator, endpoint))
}

/// Like [`start_operator_for`], with its own AWS configuration (e.g. through a
/// [`endpoint::CountingEndpoint`]) and Secrets Manager client.
pub async fn start_operator_on(
    namespaces: &[&str],
    settings: Settings,
    aws: aws_config::SdkConfig,
    source: SecretsManagerSource,
) -> Result<Operator> {
    start_operator_linked(namespaces, settings, aws, source, None).await
}

/// Like [`start_operator_on`], reaching kube-apiserver through `link` when given (a test can cut
/// the operator off the control plane).
pub async fn start_operator_linked(
    namespaces: &[&str],
    settings: Settings,
    aws: aws_config::SdkConfig,
    source: SecretsManagerSource,
    link: Option<&link::ApiLink>,
) -> Result<Operator> {
    install_crd_and_rbac().await?;
    let home = *namespaces.first().context("no namespace")?;
    for namespace in namespaces {
        bind_cluster_role_to(namespace, "mtls-operator", home).await?;
        if settings.allow_annotate {
            bind_cluster_role_to(namespace, "mtls-operator-annotate", home).await?;
        }
    }
    let client = match link {
        Some(link) => link.service_account_client(home, "mtls-operator").await?,
        None => support::service_account_client(home, "mtls-operator").await?,
    };
    let settings = Settings {
        namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        ..settings
    };
    run_in_process(client, settings, aws, source).await
}

/// One operator for the whole cluster (one controller, as the chart's default runs it), as
/// ServiceAccount `home/mtls-operator` bound cluster-wide to the documented ClusterRole, on the
/// identities labelled `selector` only (so other tests' namespaces are left alone).
pub async fn start_cluster_operator_on(
    home: &str,
    selector: &str,
    settings: Settings,
    aws: aws_config::SdkConfig,
    source: SecretsManagerSource,
) -> Result<Operator> {
    install_crd_and_rbac().await?;
    let admin = support::admin_client().await?;
    let name = format!("mtls-operator-{home}");
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "mtls-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "mtls-operator", "namespace": home}]
    }))?;
    Api::<ClusterRoleBinding>::all(admin)
        .patch(
            &name,
            &PatchParams::apply("mtls-operator-tests").force(),
            &Patch::Apply(&binding),
        )
        .await?;
    let client = support::service_account_client(home, "mtls-operator").await?;
    let settings = Settings {
        namespaces: Vec::new(),
        identity_selector: Some(selector.to_string()),
        ..settings
    };
    run_in_process(client, settings, aws, source).await
}

/// Runs the controller in this process with `client`, `settings` (the test integrity key added)
/// and `source` behind the fault-injecting wrapper. Stops when the [`Operator`] is dropped.
async fn run_in_process(
    client: kube::Client,
    settings: Settings,
    aws: aws_config::SdkConfig,
    source: SecretsManagerSource,
) -> Result<Operator> {
    let source = Arc::new(source);
    let settings = Settings {
        integrity_key: test_integrity_key().await?,
        ..settings
    }
    .with_aws_defaults(&aws)
    .await;
    let (stop, stopped) = oneshot::channel::<()>();
    let slow_fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let faulty = Arc::new(FaultInjectingSource {
        inner: source.clone(),
        slow_fetches: slow_fetches.clone(),
    });
    let metrics = Arc::new(mtls_operator::metrics::Metrics::new());
    let readiness = mtls_operator::health::Readiness::default();
    tokio::spawn(controller::run(
        client,
        faulty,
        settings,
        metrics.clone(),
        readiness.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    Ok(Operator {
        source,
        metrics,
        slow_fetches,
        readiness,
        stop: Some(stop),
    })
}

/// A folder under the environment's, removed with it (`prefix` unique per test: one binary's tests
/// run at once).
pub fn tempdir(prefix: &str) -> Result<std::path::PathBuf> {
    let dir = support::environment()
        .dir
        .join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The integrity key every in-process operator of this test run uses (as the replicas of one
/// installation share one), loaded or created by the operator's own code in `default`.
pub async fn test_integrity_key() -> Result<mtls_operator::pki::integrity::IntegrityKey> {
    static KEY: tokio::sync::OnceCell<mtls_operator::pki::integrity::IntegrityKey> =
        tokio::sync::OnceCell::const_new();
    let key = KEY
        .get_or_try_init(|| async {
            mtls_operator::controller::integrity::load_or_create(
                support::admin_client().await?,
                "default",
                "mtls-operator-integrity-tests",
            )
            .await
            .map_err(anyhow::Error::from)
        })
        .await?;
    Ok(key.clone())
}

/// ClusterRole `name` with the rules in `rules_file` (a path in the project, one of the chart's
/// `files/*-rules.yaml`), applied.
pub async fn apply_cluster_role(name: &str, rules_file: &str) -> Result<()> {
    let path = xtask::project_root().join(rules_file);
    let rules: Vec<PolicyRule> = serde_yaml::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let role = ClusterRole {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        rules: Some(rules),
        ..Default::default()
    };
    Api::<ClusterRole>::all(support::admin_client().await?)
        .patch(
            name,
            &PatchParams::apply("mtls-operator-tests").force(),
            &Patch::Apply(&role),
        )
        .await?;
    Ok(())
}

/// A kubeconfig file for the operator binary run as the chart runs it: ServiceAccount
/// `mtls-operator` of `namespace`, bound there to the chart's operator rules and its leader-election
/// rules (the Lease in the same namespace), and nothing else.
pub async fn operator_kubeconfig(namespace: &str) -> Result<std::path::PathBuf> {
    operator_kubeconfig_as(namespace, "mtls-operator").await
}

/// Like [`operator_kubeconfig`], as ServiceAccount `account` (one per replica, so that a test can
/// take a permission from one replica only).
pub async fn operator_kubeconfig_as(namespace: &str, account: &str) -> Result<std::path::PathBuf> {
    install_crd_and_rbac().await?;
    // The integrity key's Secret, made as the chart makes it (the operator may only read it).
    mtls_operator::controller::integrity::load_or_create(
        support::admin_client().await?,
        namespace,
        mtls_operator::controller::integrity::DEFAULT_SECRET_NAME,
    )
    .await?;
    for role in [
        "mtls-operator",
        "mtls-operator-leader-election",
        "mtls-operator-integrity-key",
    ] {
        bind_cluster_role_to_account(namespace, role, namespace, account).await?;
    }
    support::service_account_kubeconfig_file(namespace, account).await
}

/// The name of the RoleBinding [`operator_kubeconfig_as`] makes for `role` and `account`.
pub fn binding_name(role: &str, account: &str) -> String {
    if account == "mtls-operator" {
        role.to_string()
    } else {
        format!("{role}-{account}")
    }
}

/// Binds ClusterRole `role` in `namespace` to the test operator's ServiceAccount (of `home`).
pub async fn bind_cluster_role_to(namespace: &str, role: &str, home: &str) -> Result<()> {
    bind_cluster_role_to_account(namespace, role, home, "mtls-operator").await
}

/// Binds ClusterRole `role` in `namespace` to ServiceAccount `home/account`.
pub async fn bind_cluster_role_to_account(
    namespace: &str,
    role: &str,
    home: &str,
    account: &str,
) -> Result<()> {
    let admin = support::admin_client().await?;
    let name = binding_name(role, account);
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": home}]
    }))?;
    // Idempotent: a test may restart its operator.
    Api::<RoleBinding>::namespaced(admin, namespace)
        .patch(
            &name,
            &PatchParams::apply("mtls-operator-tests").force(),
            &Patch::Apply(&binding),
        )
        .await?;
    Ok(())
}

/// Who holds Lease `namespace/lease` now (an error while nobody does).
pub async fn lease_holder(namespace: &str, lease: &str) -> Result<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(support::admin_client().await?, namespace);
    leases
        .get(lease)
        .await?
        .spec
        .and_then(|spec| spec.holder_identity)
        .filter(|holder| !holder.is_empty())
        .context("no holder")
}

/// Replaces the operator's role in `namespace` (RoleBinding `from`, as `bind_cluster_role_to`
/// names it) with ClusterRole `to`: the chart's operator rules that `keep` keeps. For tests in which
/// the operator loses permissions part-way.
pub async fn narrow_operator_role(
    namespace: &str,
    from: &str,
    to: &str,
    keep: impl Fn(&PolicyRule) -> bool,
) -> Result<()> {
    let admin = support::admin_client().await?;
    let rules: Vec<PolicyRule> = serde_yaml::from_str(include_str!(
        "../../charts/mtls-operator/files/operator-rules.yaml"
    ))?;
    let role = ClusterRole {
        metadata: kube::api::ObjectMeta {
            name: Some(to.into()),
            ..Default::default()
        },
        rules: Some(rules.into_iter().filter(|rule| keep(rule)).collect()),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            to,
            &PatchParams::apply("mtls-operator-tests").force(),
            &Patch::Apply(&role),
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin, namespace)
        .delete(from, &Default::default())
        .await?;
    bind_cluster_role_to(namespace, to, namespace).await
}

/// Whether an RBAC rule covers the `apps` group (the workloads the operator restarts).
pub fn is_about_workloads(rule: &PolicyRule) -> bool {
    rule.api_groups
        .iter()
        .flatten()
        .any(|group| group == "apps")
}

/// `count` identities `client-N`, on secrets `{namespace}/client-N` of `ca`, each mounted by its
/// own Deployment `app-N`; returns the secret ids.
pub async fn create_identities_with_deployments(
    namespace: &str,
    ca: &TestCa,
    count: usize,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        let id = format!("{namespace}/client-{index}");
        put_source(&id, &good_secret(ca)?).await?;
        let name = format!("client-{index}");
        create_identity(namespace, &identity(&name, &id, serde_json::json!({}))?).await?;
        create_deployment(namespace, &format!("app-{index}"), Some(("volume", &name))).await?;
        ids.push(id);
    }
    Ok(ids)
}

/// For identities made by [`create_identities_with_deployments`]: waits until all are synced and
/// their Deployments rolled out, rotates every secret, and waits for the first restart. Returns the
/// workloads' generations before the rotation and the new versions, in the order of `ids`.
pub async fn start_mass_rotation(
    namespace: &str,
    ca: &TestCa,
    ids: &[String],
) -> Result<(BTreeMap<String, i64>, Vec<String>)> {
    for index in 0..ids.len() {
        wait_ready(namespace, &format!("client-{index}"), "True", "Synced").await?;
    }
    wait_all_rolled_out(namespace).await?;
    let before = generations(namespace).await?;
    let mut versions = Vec::with_capacity(ids.len());
    for id in ids {
        versions.push(put_source(id, &good_secret(ca)?).await?);
    }
    wait_for("a first restart", ROLLOUT_TIMEOUT, || async {
        ensure!(generations(namespace).await? != before, "no restart yet");
        Ok(())
    })
    .await?;
    Ok((before, versions))
}

/// [`start_mass_rotation`] with the last identity's new version held at `endpoint` (which must
/// answer reads one by one: `deny("BatchGetSecretValue")`), returning once that read is being held:
/// a fault injected next provably lands with that rotation still to do. `release_reads` lets it go.
pub async fn start_mass_rotation_holding_the_last(
    namespace: &str,
    ca: &TestCa,
    ids: &[String],
    endpoint: &endpoint::CountingEndpoint,
) -> Result<(BTreeMap<String, i64>, Vec<String>)> {
    let last = ids.len().checked_sub(1).context("no identity")?;
    wait_ready(namespace, &format!("client-{last}"), "True", "Synced").await?;
    endpoint.hold_reads_of(&ids[last]);
    let started = start_mass_rotation(namespace, ca, ids).await?;
    endpoint.wait_read_held().await?;
    Ok(started)
}

/// The end of a [`start_mass_rotation`]: each identity ends Ready, rotated to its new version, and
/// every workload rolled exactly once since `before`.
pub async fn finish_mass_rotation(
    namespace: &str,
    versions: &[String],
    before: &BTreeMap<String, i64>,
) -> Result<()> {
    for (index, version) in versions.iter().enumerate() {
        let name = format!("client-{index}");
        wait_rotation(namespace, &name, version).await?;
        wait_ready(namespace, &name, "True", "Synced").await?;
    }
    wait_all_rolled_out(namespace).await?;
    let after = generations(namespace).await?;
    for (name, generation) in before {
        ensure!(
            after.get(name) == Some(&(generation + 1)),
            "{name}: generation {generation} → {:?}, not exactly one rollout",
            after.get(name)
        );
    }
    Ok(())
}

/// Moto does not emulate AWS refusing or throttling a call: secrets whose id ends in
/// `/fault-access-denied` or `/fault-throttled` get those errors. An id `X/fault-resolves-to/Y`
/// reads secret `Y` from moto, as if Secrets Manager had resolved the id to another secret than the
/// one written (the answer then carries Y's real ARN and name). All others reach moto as they are.
struct FaultInjectingSource {
    inner: Arc<SecretsManagerSource>,
    slow_fetches: Arc<std::sync::atomic::AtomicU64>,
}

/// Ids containing this are held back this long before they reach moto (a slow Secrets Manager).
pub const SLOW: &str = "/fault-slow";
pub const SLOW_DELAY: Duration = Duration::from_secs(5);

/// The role AWS names in the injected AccessDenied message: it must never reach status or Events.
pub const INJECTED_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/mtls-operator-prod";

pub const RESOLVES_TO: &str = "/fault-resolves-to/";

impl SecretSource for FaultInjectingSource {
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
        flow: &'a str,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>> {
        let secret_id = secret.secret_id.clone();
        if secret_id.contains(SLOW) {
            self.slow_fetches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let inner = self.inner.clone();
            return Box::pin(async move {
                tokio::time::sleep(SLOW_DELAY).await;
                inner.fetch(secret, flow).await
            });
        }
        if let Some((_, elsewhere)) = secret_id.split_once(RESOLVES_TO) {
            let redirected = SecretRef {
                secret_id: elsewhere.to_string(),
                ..secret.clone()
            };
            let inner = self.inner.clone();
            return Box::pin(async move { inner.fetch(&redirected, flow).await });
        }
        if secret_id.ends_with("/fault-access-denied") {
            return Box::pin(async move {
                Err(SourceError::AccessDenied {
                    secret_id,
                    detail: format!(
                        "AccessDeniedException: User: {INJECTED_ROLE_ARN} is not authorized to \
                         perform: secretsmanager:GetSecretValue"
                    ),
                })
            });
        }
        if secret_id.ends_with("/fault-throttled") {
            return Box::pin(async move { Err(SourceError::Throttled { secret_id }) });
        }
        self.inner.fetch(secret, flow)
    }

    fn describe<'a>(
        &'a self,
        secret: &'a SecretRef,
    ) -> BoxFuture<'a, Result<mtls_operator::source::DescribedSecret, SourceError>> {
        self.inner.describe(secret)
    }

    fn list<'a>(
        &'a self,
        scope: &'a mtls_operator::source::Scope,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<mtls_operator::source::DescribedSecret>, SourceError>> {
        self.inner.list(scope, names)
    }
}

/// A test CA that issues client and server certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

#[derive(Clone)]
pub struct LeafOptions {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    /// `None`: no EKU extension at all.
    pub extended_key_usages: Option<Vec<ExtendedKeyUsagePurpose>>,
}

impl Default for LeafOptions {
    fn default() -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            common_name: "payments-client".into(),
            dns_names: vec!["payments-client.example".into()],
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(90),
            extended_key_usages: Some(vec![ExtendedKeyUsagePurpose::ClientAuth]),
        }
    }
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn leaf(&self, options: &LeafOptions) -> Result<Leaf> {
        let mut params = CertificateParams::new(options.dns_names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, options.common_name.as_str());
        params.not_before = options.not_before;
        params.not_after = options.not_after;
        if let Some(usages) = &options.extended_key_usages {
            params.extended_key_usages = usages.clone();
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    pub fn server(&self) -> Result<Leaf> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}

pub fn json_secret(certificate: &str, private_key: &str, ca: &str) -> String {
    serde_json::json!({"certificate": certificate, "private_key": private_key, "ca": ca})
        .to_string()
}

/// Creates or updates a secret in the environment's Secrets Manager; returns the new version id.
pub async fn put_source(name: &str, value: &str) -> Result<String> {
    support::environment().put_secret(name, value).await
}

/// Creates `name` with `value` in AWS account `account` of the environment's Secrets Manager, as
/// the central security account of an organisation would hold it: with credentials from assuming
/// `writer` there (moto acts in the account of the role assumed). Returns the secret's ARN.
pub async fn create_source_in_account(
    account: &str,
    writer: &str,
    name: &str,
    value: &str,
) -> Result<String> {
    let base = support::aws_config().await;
    let assumed = aws_sdk_sts::Client::new(&base)
        .assume_role()
        .role_arn(format!("arn:aws:iam::{account}:role/{writer}"))
        .role_session_name("test-writer")
        .send()
        .await?;
    let credentials = assumed
        .credentials()
        .context("AssumeRole gave no credentials")?;
    let config = aws_sdk_secretsmanager::config::Builder::from(&base)
        .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
            credentials.access_key_id(),
            credentials.secret_access_key(),
            Some(credentials.session_token().to_string()),
            None,
            "test",
        ))
        .build();
    let created = aws_sdk_secretsmanager::Client::from_conf(config)
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await?;
    created.arn.context("CreateSecret gave no ARN")
}

pub fn identity(
    name: &str,
    secret_id: &str,
    extra_spec: serde_json::Value,
) -> Result<MtlsIdentity> {
    let mut spec = serde_json::json!({
        "source": {"secretId": secret_id},
        "refreshInterval": "5s"
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (key, value) in extra {
            spec.insert(key.clone(), value.clone());
        }
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "mtls-operator.io/v1alpha1",
        "kind": "MtlsIdentity",
        "metadata": {"name": name},
        "spec": spec
    }))?)
}

pub async fn create_identity(namespace: &str, identity: &MtlsIdentity) -> Result<()> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    identities.create(&PostParams::default(), identity).await?;
    Ok(())
}

/// An SQS queue for change events, `{namespace}-changes` on moto: its client and URL.
pub async fn create_events_queue(namespace: &str) -> Result<(aws_sdk_sqs::Client, String)> {
    let sqs = aws_sdk_sqs::Client::new(&support::aws_config().await);
    let url = sqs
        .create_queue()
        .queue_name(format!("{namespace}-changes"))
        .send()
        .await?
        .queue_url
        .unwrap_or_default();
    Ok((sqs, url))
}

/// Waits until identities `client-0..count` in `namespace` are Ready (Synced).
pub async fn wait_all_ready(namespace: &str, count: usize) -> Result<()> {
    for index in 0..count {
        wait_ready(namespace, &format!("client-{index}"), "True", "Synced").await?;
    }
    Ok(())
}

/// Waits until the identity's Ready condition has `status` and `reason`; returns the identity.
pub async fn wait_ready(
    namespace: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> Result<MtlsIdentity> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    wait_for(
        &format!("{namespace}/{name} Ready={status} reason={reason}"),
        TIMEOUT,
        || async {
            let identity = identities.get(name).await?;
            let ready = identity
                .ready_condition()
                .context("no Ready condition yet")?;
            ensure!(
                ready.status == status && ready.reason == reason,
                "Ready={} reason={} message={}",
                ready.status,
                ready.reason,
                ready.message
            );
            Ok(identity)
        },
    )
    .await
}

/// Waits for an events.k8s.io Event about `name` with `reason`.
pub async fn wait_event(namespace: &str, name: &str, reason: &str) -> Result<Event> {
    let events: Api<Event> = Api::namespaced(support::admin_client().await?, namespace);
    wait_for(
        &format!("an Event {reason} about {name}"),
        TIMEOUT,
        || async {
            events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|event| {
                    event.reason.as_deref() == Some(reason)
                        && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .context("no such Event yet")
        },
    )
    .await
}

pub async fn get_secret(namespace: &str, name: &str) -> Result<Option<Secret>> {
    let secrets: Api<Secret> = Api::namespaced(support::admin_client().await?, namespace);
    Ok(secrets.get_opt(name).await?)
}

pub fn secret_data(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|value| String::from_utf8_lossy(&value.0).into_owned())
}

// Workloads and rotations.

pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);

/// A pod template that uses Secret `secret` in one of the ways the operator must find.
pub fn pod_template(app: &str, secret: Option<(&str, &str)>) -> serde_json::Value {
    let mut spec =
        serde_json::json!({"containers": [{"name": "app", "image": "example.invalid/app:1"}]});
    match secret {
        Some(("volume", name)) => {
            spec["volumes"] = serde_json::json!([{"name": "tls", "secret": {"secretName": name}}]);
        }
        Some(("projected", name)) => {
            spec["volumes"] = serde_json::json!([{"name": "tls", "projected": {"sources": [{"secret": {"name": name}}]}}]);
        }
        Some(("env", name)) => {
            spec["containers"][0]["envFrom"] = serde_json::json!([{"secretRef": {"name": name}}]);
        }
        _ => {}
    }
    serde_json::json!({"metadata": {"labels": {"app": app}}, "spec": spec})
}

pub async fn create_deployment(
    namespace: &str,
    name: &str,
    secret: Option<(&str, &str)>,
) -> Result<()> {
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": pod_template(name, secret)}
    }))?;
    Api::<Deployment>::namespaced(support::admin_client().await?, namespace)
        .create(&PostParams::default(), &deployment)
        .await?;
    Ok(())
}

/// A Deployment whose pod template mounts every Secret in `secrets` (a volume each).
pub async fn create_deployment_mounting(
    namespace: &str,
    name: &str,
    secrets: &[&str],
) -> Result<()> {
    let volumes: Vec<serde_json::Value> = secrets
        .iter()
        .map(|secret| serde_json::json!({"name": secret, "secret": {"secretName": secret}}))
        .collect();
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}],
                     "volumes": volumes}
        }}
    }))?;
    Api::<Deployment>::namespaced(support::admin_client().await?, namespace)
        .create(&PostParams::default(), &deployment)
        .await?;
    Ok(())
}

pub async fn create_stateful_set(
    namespace: &str,
    name: &str,
    secret: Option<(&str, &str)>,
) -> Result<()> {
    let set: StatefulSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"replicas": 1, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                 "template": pod_template(name, secret)}
    }))?;
    Api::<StatefulSet>::namespaced(support::admin_client().await?, namespace)
        .create(&PostParams::default(), &set)
        .await?;
    Ok(())
}

pub async fn create_daemon_set(
    namespace: &str,
    name: &str,
    secret: Option<(&str, &str)>,
) -> Result<()> {
    let set: DaemonSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": pod_template(name, secret)}
    }))?;
    Api::<DaemonSet>::namespaced(support::admin_client().await?, namespace)
        .create(&PostParams::default(), &set)
        .await?;
    Ok(())
}

/// Every workload in the namespace, by `Kind/name` (the operator's own generic listing).
pub async fn workloads(namespace: &str) -> Result<BTreeMap<String, Workload>> {
    let admin = support::admin_client().await?;
    Ok(mtls_operator::restart::list_workloads(&admin, namespace)
        .await?
        .into_iter()
        .map(|workload| (workload.display(), workload))
        .collect())
}

/// Each workload's generation: every pod-template change (a rollout) adds one.
pub async fn generations(namespace: &str) -> Result<BTreeMap<String, i64>> {
    Ok(workloads(namespace)
        .await?
        .into_iter()
        .map(|(name, w)| (name, w.metadata().generation.unwrap_or(0)))
        .collect())
}

pub async fn wait_all_rolled_out(namespace: &str) -> Result<()> {
    wait_for("every workload rolled out", ROLLOUT_TIMEOUT, || async {
        let busy: Vec<String> = workloads(namespace)
            .await?
            .into_iter()
            .filter(|(_, w)| w.rollout_in_progress())
            .map(|(name, _)| name)
            .collect();
        ensure!(busy.is_empty(), "still rolling: {busy:?}");
        Ok(())
    })
    .await
}

pub async fn wait_rotation(namespace: &str, name: &str, version: &str) -> Result<RotationStatus> {
    let identities: Api<MtlsIdentity> = Api::namespaced(support::admin_client().await?, namespace);
    wait_for(
        &format!("{name} to finish rotating to {version}"),
        ROLLOUT_TIMEOUT,
        || async {
            let identity = identities.get(name).await?;
            let rotation = identity
                .status
                .and_then(|s| s.last_rotation)
                .context("no rotation yet")?;
            ensure!(
                rotation.to_version_id == version && rotation.complete,
                "rotation {rotation:?}"
            );
            Ok(rotation)
        },
    )
    .await
}

/// Waits until Secret `name` in `namespace` carries source version `version` (`what` says which
/// Secret, for the failure message).
pub async fn wait_secret_version(
    what: &str,
    namespace: &str,
    name: &str,
    version: &str,
) -> Result<()> {
    wait_for(what, TIMEOUT, || async {
        let secret = get_secret(namespace, name).await?.context("no Secret")?;
        let carried = secret
            .metadata
            .annotations
            .and_then(|a| a.get(mtls_operator::api::VERSION_ID_ANNOTATION).cloned());
        ensure!(carried.as_deref() == Some(version), "still at {carried:?}");
        Ok(())
    })
    .await
}

pub fn good_secret(ca: &TestCa) -> Result<String> {
    let leaf = ca.leaf(&LeafOptions::default())?;
    Ok(json_secret(&leaf.cert_pem, &leaf.key_pem, &ca.pem()))
}

/// LIST requests for Deployments, StatefulSets, DaemonSets or Pods in `namespace` made by a
/// ServiceAccount named `mtls-operator` (any namespace's), as the API server's audit log records
/// them (the test environment audits exactly these, `xtask/src/testenv.rs`): the load a namespace's
/// pending rotations put on the API server, counted where the API server counts it.
pub fn operator_workload_lists(namespace: &str) -> Result<usize> {
    Ok(audit_events()?
        .into_iter()
        .filter(|event| {
            event["verb"] == "list"
                && event["objectRef"]["namespace"] == namespace
                && event["user"]["username"]
                    .as_str()
                    .is_some_and(|user| user.ends_with(":mtls-operator"))
        })
        .count())
}

/// `openssl pkcs12 -export` of `leaf` under `password` with `iterations` for both the encryption
/// and the MAC (OpenSSL is native: making a costly file is cheap for the attacker too).
pub fn openssl_pkcs12(
    dir: &std::path::Path,
    leaf: &Leaf,
    password: &str,
    iterations: u32,
) -> Result<Vec<u8>> {
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem)?;
    std::fs::write(dir.join("key.pem"), &leaf.key_pem)?;
    let out = dir.join("forged.p12");
    let iterations = iterations.to_string();
    let output = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(["pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem"])
        .args(["-iter", &iterations, "-maciter", "-passout"])
        .arg(format!("pass:{password}"))
        .arg("-out")
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running openssl (it must be installed on the test machine)")?;
    ensure!(
        output.status.success(),
        "openssl pkcs12 -export: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(std::fs::read(out)?)
}

/// `GET path` from a server on a loopback port, HTTP/1.0: the whole response, headers included.
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// The requests the operators (ServiceAccounts) made on Secret `namespace/name`, in the order the
/// API server answered them, from its audit log: `(verb, status code)`.
pub fn operator_secret_requests(namespace: &str, name: &str) -> Result<Vec<(String, u64)>> {
    Ok(audit_events()?
        .into_iter()
        .filter(|event| {
            event["objectRef"]["resource"] == "secrets"
                && event["objectRef"]["namespace"] == namespace
                && event["objectRef"]["name"] == name
                && event["user"]["username"]
                    .as_str()
                    .is_some_and(|user| user.ends_with(":mtls-operator"))
        })
        .map(|event| {
            (
                event["verb"].as_str().unwrap_or_default().to_string(),
                event["responseStatus"]["code"].as_u64().unwrap_or_default(),
            )
        })
        .collect())
}

/// Every event in the API server's audit log so far, in the order they were written.
fn audit_events() -> Result<Vec<serde_json::Value>> {
    let path = support::environment().dir.join("audit.log");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the API server's audit log {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .collect())
}
