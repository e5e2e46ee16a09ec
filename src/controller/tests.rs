//! Fast reconcile tests against a mock API server (kube's client over `tower-test`, as
//! kube-rs/controller-rs does) and an in-memory Secrets Manager: the decision-heavy paths, each
//! asserting the method, path and body of the requests the reconcile sends. The integration tests
//! (`tests/`) show the same behaviour against a real API server.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hyper::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector;
use serde_json::{Value, json};

use kube::runtime::reflector::ObjectRef;

use super::context::{Context, Memory, Settings};
use super::error::ReconcileError;
use super::reconcile::reconcile;
use crate::api::{FIELD_MANAGER, MtlsIdentity};
use crate::lock;
use crate::metrics::Metrics;
use crate::restart::Restarter;
use crate::source::fleet::Fleet;
use crate::source::policy::SourcePolicy;
use crate::source::{FetchedSecret, SecretContent, SecretRef, SecretSource, SourceError};

const NAMESPACE: &str = "team";
const UID: &str = "0b1c2d3e-0000-4000-8000-000000000001";
const ACCOUNT: &str = "123456789012";

/// One request the reconcile sent.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query.
    path: String,
    body: Value,
    /// The Accept header: a metadata-only GET asks for `PartialObjectMetadata`.
    accept: String,
}

impl Seen {
    fn is(&self, method: &str, path_prefix: &str) -> bool {
        self.method == method && self.path.starts_with(path_prefix)
    }
}

type Route = Box<dyn Fn(&Seen) -> (StatusCode, Value) + Send + Sync>;

/// A route of a strict mock API server: `None` for a request the test did not expect.
type StrictRoute = Box<dyn Fn(&Seen) -> Option<(StatusCode, Value)> + Send + Sync>;

/// Requests a strict mock API server did not expect (answered 500, so the reconcile notices too).
type Unexpected = Arc<Mutex<Vec<Seen>>>;

/// A strict mock API server, as controller-rs's `ApiServerVerifier`: every request must be one
/// `route` expects; the test ends with [`assert_all_expected`].
fn strict_api(route: StrictRoute) -> (kube::Client, Arc<Mutex<Vec<Seen>>>, Unexpected) {
    let unexpected: Unexpected = Arc::new(Mutex::new(Vec::new()));
    let recorded = unexpected.clone();
    let (client, seen) = mock_api(Box::new(move |request| match route(request) {
        Some(answer) => answer,
        None => {
            lock(&recorded).push(request.clone());
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "unexpected request", "code": 500}),
            )
        }
    }));
    (client, seen, unexpected)
}

fn assert_all_expected(unexpected: &Unexpected) {
    let unexpected = lock(unexpected).clone();
    assert!(unexpected.is_empty(), "unexpected requests: {unexpected:?}");
}

/// A client whose API server is `route`; every request is recorded.
fn mock_api(route: Route) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let request = Seen {
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                accept: parts
                    .headers
                    .get("accept")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
            };
            let (status, answer) = route(&request);
            lock(&recorded).push(request);
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap_or_default()));
            match response {
                Ok(response) => respond.send_response(response),
                Err(_) => return,
            }
        }
    });
    (kube::Client::new(service, NAMESPACE), seen)
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

fn forbidden() -> (StatusCode, Value) {
    (
        StatusCode::FORBIDDEN,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403}),
    )
}

fn empty_list(kind: &str) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"kind": kind, "apiVersion": "apps/v1", "metadata": {}, "items": []}),
    )
}

/// Echoes a written object back, as the API server would.
fn echo(request: &Seen) -> (StatusCode, Value) {
    (StatusCode::OK, request.body.clone())
}

/// The identity as the API server returns it after a status patch.
fn patched_identity(request: &Seen) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"apiVersion": "mtls-operator.io/v1alpha1", "kind": "MtlsIdentity",
               "metadata": {"name": "client", "namespace": NAMESPACE, "uid": UID, "generation": 1},
               "spec": spec(), "status": request.body["status"].clone()}),
    )
}

/// Secrets Manager in memory: one secret, `team/client`, its value fixed.
struct FixedSource {
    value: String,
    version: String,
    fetches: AtomicU32,
}

impl SecretSource for FixedSource {
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
        _flow: &'a str,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(FetchedSecret {
                arn: format!(
                    "arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:{}-AbCdEf",
                    secret.secret_id
                ),
                name: secret.secret_id.clone(),
                version_id: self.version.clone(),
                content: SecretContent::Text(self.value.clone()),
            })
        })
    }
}

/// A CA and a client certificate signed by it, as the JSON a team stores in Secrets Manager.
fn material() -> String {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let build = || -> Result<String, rcgen::Error> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "mock CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let mut leaf = CertificateParams::new(vec!["client.example".to_string()])?;
        leaf.distinguished_name.push(DnType::CommonName, "client");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &issuer)?;
        Ok(json!({"certificate": cert.pem(), "private_key": key.serialize_pem(), "ca": issuer.pem()})
            .to_string())
    };
    build().unwrap_or_default()
}

fn identity(spec: Value, status: Option<Value>) -> Arc<MtlsIdentity> {
    let mut object = json!({
        "apiVersion": "mtls-operator.io/v1alpha1",
        "kind": "MtlsIdentity",
        "metadata": {"name": "client", "namespace": NAMESPACE, "uid": UID, "generation": 1},
        "spec": spec,
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    Arc::new(serde_json::from_value(object).unwrap_or_else(|error| panic!("identity: {error}")))
}

fn spec() -> Value {
    json!({"source": {"secretId": "team/client"}, "refreshInterval": "1h"})
}

/// A status that describes an earlier version (v1, another certificate), synced and Ready.
fn synced_status() -> Value {
    json!({
        "observedGeneration": 1,
        "secretName": "client",
        "source": {"arn": format!("arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:team/client-AbCdEf"), "versionId": "v1"},
        "certificate": {"subject": "CN=client", "issuer": "CN=mock CA", "serialNumber": "01",
            "sha256Fingerprint": "00".repeat(32), "notBefore": "2026-01-01T00:00:00Z",
            "notAfter": "2099-01-01T00:00:00Z", "dnsNames": []},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
    })
}

fn context(client: kube::Client, source: Arc<FixedSource>, egress: bool) -> Arc<Context> {
    let settings = Settings {
        namespaces: vec![NAMESPACE.to_string()],
        policy: SourcePolicy::new(
            Vec::new(),
            Some(ACCOUNT.to_string()),
            vec!["us-east-1".to_string()],
        ),
        default_region: Some("us-east-1".to_string()),
        egress_image: egress.then(|| "example.invalid/mtls-operator:test".to_string()),
        ..Settings::default()
    };
    let source: Arc<dyn SecretSource> = source;
    Arc::new(Context {
        restarter: Arc::new(Restarter::new(
            client.clone(),
            settings.restart_limits,
            false,
        )),
        fleet: Arc::new(Fleet::new(
            source.clone(),
            settings.sweep_mode,
            settings.sweep_interval,
            None,
        )),
        client,
        identities: reflector::store().0,
        trigger: futures::channel::mpsc::unbounded().0,
        source,
        settings,
        reporter: Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: None,
        },
        metrics: Arc::new(Metrics::new()),
        memory: Arc::new(Memory::new(None, None)),
        egress_objects: None,
    })
}

fn source() -> Arc<FixedSource> {
    Arc::new(FixedSource {
        value: material(),
        version: "v2".to_string(),
        fetches: AtomicU32::new(0),
    })
}

const SECRET: &str = "/api/v1/namespaces/team/secrets/client";
const STATUS: &str = "/apis/mtls-operator.io/v1alpha1/namespaces/team/mtlsidentities/client/status";

fn condition<'a>(status_patch: &'a Value, type_: &str) -> Option<&'a Value> {
    status_patch["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// A 403 on listing workloads after the Secret was written: the status still says what was
/// written (Ready True, the new version) and why restarts wait (`Restarts` False
/// `KubernetesApiError`), and the reconcile fails so that it is retried with backoff.
#[tokio::test]
async fn a_refused_workload_list_after_the_write_still_writes_a_truthful_status() {
    let (client, seen) = mock_api(Box::new(|request| {
        if request.is("GET", SECRET) {
            not_found()
        } else if request.is("POST", "/api/v1/namespaces/team/secrets") {
            echo(request)
        } else if request.is("GET", "/apis/apps/v1/namespaces/team/") {
            forbidden()
        } else if request.is("PATCH", STATUS) {
            patched_identity(request)
        } else if request.is("POST", "/apis/events.k8s.io/") {
            echo(request)
        } else {
            not_found()
        }
    }));
    let source = source();
    let result = reconcile(
        identity(spec(), Some(synced_status())),
        context(client, source.clone(), false),
    )
    .await;
    // The 403 itself, returned once status was written, so the reconcile is retried.
    match &result {
        Err(ReconcileError::Kube(kube::Error::Api(status))) => assert_eq!(status.code, 403),
        other => panic!("expected the 403 to be returned: {other:?}"),
    }
    let seen = lock(&seen).clone();
    let created = seen
        .iter()
        .find(|r| r.is("POST", "/api/v1/namespaces/team/secrets"))
        .expect("the Secret was created");
    assert_eq!(created.body["metadata"]["annotations"][VERSION_ID], "v2");
    let status = seen
        .iter()
        .find(|r| r.is("PATCH", STATUS))
        .expect("status was written");
    let ready = condition(&status.body, "Ready").expect("Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Synced"))
    );
    assert_eq!(status.body["status"]["source"]["versionId"], "v2");
    let restarts = condition(&status.body, "Restarts").expect("Restarts");
    assert_eq!(
        (&restarts["status"], &restarts["reason"]),
        (&json!("False"), &json!("KubernetesApiError"))
    );
    assert_eq!(status.body["status"]["lastRotation"]["complete"], false);
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
}

const VERSION_ID: &str = crate::api::VERSION_ID_ANNOTATION;

/// A Secret of the same name that the identity does not own: never read, never written, no AWS
/// call; the status says `TargetConflict`.
#[tokio::test]
async fn a_foreign_target_secret_is_refused_without_a_read_or_a_write() {
    // Reconciled before (a status): the metadata look refuses it before any read. New (no
    // status): the create comes first and is refused (409), and only then the metadata look;
    // one read of the source at most, never a write over it, and its content never read.
    for status in [Some(synced_status()), None] {
        let new = status.is_none();
        let (client, seen) = mock_api(Box::new(|request| {
            if request.is("GET", SECRET) {
                (
                    StatusCode::OK,
                    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": {"name": "client", "namespace": NAMESPACE}}),
                )
            } else if request.method == "POST"
                && request.path.starts_with("/api/v1/namespaces/team/secrets")
            {
                (
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "AlreadyExists", "code": 409}),
                )
            } else if request.is("PATCH", STATUS) {
                patched_identity(request)
            } else if request.is("POST", "/apis/events.k8s.io/") {
                echo(request)
            } else {
                not_found()
            }
        }));
        let source = source();
        let result = reconcile(
            identity(spec(), status),
            context(client, source.clone(), false),
        )
        .await;
        assert!(result.is_ok(), "{result:?}");
        let seen = lock(&seen).clone();
        let secret_writes: Vec<_> = seen
            .iter()
            .filter(|r| r.path.starts_with("/api/v1/namespaces/team/secrets") && r.method != "GET")
            .collect();
        let refused_create = |r: &&Seen| r.method == "POST";
        assert!(
            if new {
                secret_writes.len() == 1 && secret_writes.iter().all(refused_create)
            } else {
                secret_writes.is_empty()
            },
            "new: {new}; wrote a Secret it does not own: {seen:?}"
        );
        assert!(
            seen.iter()
                .filter(|r| r.is("GET", SECRET))
                .all(|r| r.accept.contains("PartialObjectMetadata")),
            "read a foreign Secret's content: {seen:?}"
        );
        assert_eq!(
            source.fetches.load(Ordering::SeqCst),
            u32::from(new),
            "new: {new}; reads of AWS for a conflict"
        );
        let status = seen
            .iter()
            .find(|r| r.is("PATCH", STATUS))
            .expect("status was written");
        let ready = condition(&status.body, "Ready").expect("Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("TargetConflict"))
        );
    }
}

/// Restart planning: of two Deployments, only the one that mounts the Secret is patched, once,
/// with the identity's token (the new certificate's fingerprint) in its pod template.
#[tokio::test]
async fn a_rotation_patches_only_the_workload_that_mounts_the_secret() {
    let deployment = |name: &str, secret: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": name, "namespace": NAMESPACE, "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                   "metadata": {"labels": {"app": name}},
                   "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}],
                            "volumes": [{"name": "tls", "secret": {"secretName": secret}}]}}}})
    };
    let deployments = json!({"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {},
        "items": [deployment("uses-it", "client"), deployment("other", "something-else")]});
    let (client, seen) = mock_api(Box::new(move |request| {
        if request.is("GET", SECRET) {
            not_found()
        } else if request.is("POST", "/api/v1/namespaces/team/secrets") {
            echo(request)
        } else if request.is("GET", "/apis/apps/v1/namespaces/team/deployments/uses-it") {
            // Read afresh before it is patched.
            (StatusCode::OK, deployment("uses-it", "client"))
        } else if request.is("GET", "/apis/apps/v1/namespaces/team/deployments") {
            (StatusCode::OK, deployments.clone())
        } else if request.is("GET", "/apis/apps/v1/namespaces/team/statefulsets") {
            empty_list("StatefulSetList")
        } else if request.is("GET", "/apis/apps/v1/namespaces/team/daemonsets") {
            empty_list("DaemonSetList")
        } else if request.is("PATCH", "/apis/apps/v1/namespaces/team/deployments/uses-it") {
            (StatusCode::OK, deployment("uses-it", "client"))
        } else if request.is("PATCH", STATUS) {
            patched_identity(request)
        } else if request.is("POST", "/apis/events.k8s.io/") {
            echo(request)
        } else {
            not_found()
        }
    }));
    let result = reconcile(
        identity(spec(), Some(synced_status())),
        context(client, source(), false),
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    let seen = lock(&seen).clone();
    let patches: Vec<&Seen> = seen
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/apis/apps/"))
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert!(
        patches[0]
            .path
            .starts_with("/apis/apps/v1/namespaces/team/deployments/uses-it")
    );
    let status = seen
        .iter()
        .find(|r| r.is("PATCH", STATUS))
        .expect("status was written");
    let fingerprint = status.body["status"]["certificate"]["sha256Fingerprint"].clone();
    let tokens = &patches[0].body["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        tokens[crate::restart::decide::token_key("client")],
        fingerprint,
        "{tokens}"
    );
    assert_eq!(status.body["status"]["lastRotation"]["complete"], true);
}

/// spec.egress with a same-named Deployment that is not the identity's: nothing is written over
/// it, and the `Egress` condition says `EgressConflict`.
#[tokio::test]
async fn an_egress_name_taken_by_a_foreign_deployment_is_a_conflict_not_a_takeover() {
    let (client, seen) = mock_api(Box::new(|request| {
        if request.is("GET", SECRET) {
            not_found()
        } else if request.is("POST", "/api/v1/namespaces/team/secrets") {
            echo(request)
        } else if request.is("GET", "/apis/apps/v1/namespaces/team/deployments/client") {
            (
                StatusCode::OK,
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                       "metadata": {"name": "client", "namespace": NAMESPACE}}),
            )
        } else if request.is("PATCH", STATUS) {
            patched_identity(request)
        } else if request.is("POST", "/apis/events.k8s.io/") {
            echo(request)
        } else {
            not_found()
        }
    }));
    let spec = json!({"source": {"secretId": "team/client"}, "refreshInterval": "1h",
                      "egress": {"upstream": "https://api.partner.example:443"}});
    let result = reconcile(identity(spec, None), context(client, source(), true)).await;
    assert!(result.is_ok(), "{result:?}");
    let seen = lock(&seen).clone();
    assert!(
        !seen
            .iter()
            .any(|r| r.path.contains("/deployments/client") && r.method != "GET"),
        "wrote over a foreign Deployment: {seen:?}"
    );
    let status = seen
        .iter()
        .find(|r| r.is("PATCH", STATUS))
        .expect("status was written");
    let egress = condition(&status.body, "Egress").expect("Egress");
    assert_eq!(
        (&egress["status"], &egress["reason"]),
        (&json!("False"), &json!("EgressConflict"))
    );
}

/// A copy of the identity older than our last status write is not reconciled (it would judge the
/// change again and write its status and Events twice); once the watch has caught up, it is.
#[test]
fn a_copy_older_than_our_last_status_write_waits_for_the_watch() {
    let memory = Memory::new(None, None);
    let key = ObjectRef::<MtlsIdentity>::new("client").within("team");
    assert!(!memory.is_stale(&key, Some("10")), "nothing written yet");
    memory.record_written(&key, Some("12"));
    assert!(memory.is_stale(&key, Some("11")));
    assert!(memory.is_stale(&key, Some("11")), "still behind");
    assert!(!memory.is_stale(&key, Some("12")), "caught up");
    assert!(
        !memory.is_stale(&key, Some("11")),
        "forgotten once caught up"
    );
    memory.record_written(&key, Some("20"));
    assert!(
        !memory.is_stale(&key, Some("not-a-number")),
        "not comparable: go ahead"
    );
}

fn stored(name: &str, uid: &str, generation: i64) -> crate::api::StoredIdentity {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "team", "uid": uid,
                     "generation": generation},
        "spec": {"source": {"secretId": "team/client"}, "refreshInterval": "1h"}
    }))
    .unwrap()
}

/// Only a new generation (a spec change) or a new uid passes the filter in front of the
/// controller; our own status writes (same generation) do not, and a deleted identity is forgotten.
#[test]
fn only_spec_changes_pass_the_generation_filter() {
    let memory = Memory::new(None, None);
    assert!(
        memory.spec_or_refresh_changed(&stored("client", "u1", 1)),
        "first sight"
    );
    assert!(
        !memory.spec_or_refresh_changed(&stored("client", "u1", 1)),
        "a status write"
    );
    assert!(
        memory.spec_or_refresh_changed(&stored("client", "u1", 2)),
        "a spec change"
    );
    assert!(!memory.spec_or_refresh_changed(&stored("client", "u1", 2)));
    assert!(
        memory.spec_or_refresh_changed(&stored("client", "u2", 2)),
        "deleted and created again"
    );
    memory.forget(&ObjectRef::new("client").within("team"), || {});
    assert!(
        memory.spec_or_refresh_changed(&stored("client", "u2", 2)),
        "forgotten on deletion"
    );
}

/// A new refresh request passes the filter once; the same request seen again (our status write
/// honouring it) does not, and removing the annotation is no request. The limit then holds one
/// honoured request per identity per 10 s.
#[test]
fn a_refresh_request_passes_the_filter_once_and_is_honoured_once_per_interval() {
    let memory = Memory::new(None, None);
    let requested = |value: Option<&str>| {
        let mut identity = stored("client", "u1", 1);
        if let Some(value) = value {
            identity.metadata.annotations = Some(
                [(
                    crate::api::REFRESH_ANNOTATION.to_string(),
                    value.to_string(),
                )]
                .into_iter()
                .collect(),
            );
        }
        identity
    };
    assert!(
        memory.spec_or_refresh_changed(&requested(None)),
        "first sight"
    );
    assert!(
        memory.spec_or_refresh_changed(&requested(Some("t1"))),
        "a request"
    );
    assert!(
        !memory.spec_or_refresh_changed(&requested(Some("t1"))),
        "seen"
    );
    assert!(
        memory.spec_or_refresh_changed(&requested(Some("t2"))),
        "a new one"
    );
    assert!(!memory.spec_or_refresh_changed(&requested(None)), "removed");

    let key = ObjectRef::new("client").within("team");
    let now = std::time::Instant::now();
    assert_eq!(memory.refresh_wait(&key, now), None, "never honoured");
    memory.refresh_honoured(&key, now);
    let wait = memory.refresh_wait(&key, now + std::time::Duration::from_secs(3));
    assert_eq!(wait, Some(std::time::Duration::from_secs(7)));
    assert_eq!(
        memory.refresh_wait(&key, now + std::time::Duration::from_secs(10)),
        None
    );
}

/// Memory is bounded by the watch's store: an identity the store does not hold gets none (a late
/// reconcile of a deleted identity cannot bring it back), and a re-list that drops identities
/// prunes theirs, with the gauge following.
#[test]
fn memory_follows_the_store_and_is_pruned_on_a_re_list() {
    use kube::runtime::watcher::Event;
    let (store, mut writer) = reflector::store();
    let gauge =
        prometheus_client::metrics::gauge::Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let memory = Memory::new(Some(store), Some(gauge.clone()));
    let key = |name: &str| ObjectRef::<MtlsIdentity>::new(name).within("team");
    writer.apply_watcher_event(&Event::Init);
    for name in ["a", "b", "c"] {
        writer.apply_watcher_event(&Event::InitApply(stored(name, name, 1)));
    }
    writer.apply_watcher_event(&Event::InitDone);
    for name in ["a", "b", "c", "deleted"] {
        memory.count_source_failure(&key(name), true);
    }
    assert_eq!(
        memory.len(),
        3,
        "none for an identity the store does not hold"
    );
    assert_eq!(
        memory.count_source_failure(&key("a"), true),
        2,
        "remembered"
    );
    assert_eq!(gauge.get(), 3);
    // A re-list while "b" and "c" were deleted: no Delete events, only the new listing.
    writer.apply_watcher_event(&Event::Init);
    writer.apply_watcher_event(&Event::InitApply(stored("a", "a", 1)));
    writer.apply_watcher_event(&Event::InitDone);
    let mut also = false;
    assert_eq!(memory.prune(|| also = true), 2);
    assert!(also, "what is kept elsewhere is pruned with it");
    assert_eq!(
        memory.if_present(&key("b"), || ()),
        None,
        "b is gone: nothing recorded for it"
    );
    assert_eq!(memory.if_present(&key("a"), || 1), Some(1));
    assert_eq!(memory.len(), 1);
    assert_eq!(gauge.get(), 1);
    assert_eq!(
        memory.count_source_failure(&key("a"), true),
        3,
        "the survivor keeps its memory"
    );
}

/// spec.egress whose three objects are as the operator last wrote them (the watch's stores say so):
/// the reconcile makes no API call for them at all; once someone changes one (a new generation),
/// the next reconcile writes again.
#[tokio::test]
async fn steady_egress_objects_cost_no_api_call() {
    use crate::api::MtlsIdentityStatus;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::core::PartialObjectMeta;
    use kube::runtime::watcher::Event;

    let egress_paths = ["/deployments/", "/services/", "/networkpolicies/"];
    let (client, seen, unexpected) = strict_api(Box::new(move |request| {
        let collections = [
            "/apis/apps/v1/namespaces/team/deployments",
            "/api/v1/namespaces/team/services",
            "/apis/networking.k8s.io/v1/namespaces/team/networkpolicies",
        ];
        let collection = collections.iter().find(|c| request.path.starts_with(*c))?;
        let named = request.path.starts_with(&format!("{collection}/client"));
        match request.method.as_str() {
            // The ownership checks find nothing yet (the first pass), or what was created.
            "GET" if named => Some(not_found()),
            "POST" if !named => {
                // Created: the answer carries a resourceVersion, and a generation for the kinds
                // that track one.
                let mut created = request.body.clone();
                created["metadata"]["resourceVersion"] = json!("7");
                if !request.path.contains("/services") {
                    created["metadata"]["generation"] = json!(1);
                }
                Some((StatusCode::CREATED, created))
            }
            _ => None,
        }
    }));
    let mut context = context(client, source(), true);
    let (deployments, mut deployment_writer) = reflector::store::<PartialObjectMeta<Deployment>>();
    let (services, mut service_writer) = reflector::store::<PartialObjectMeta<Service>>();
    let (policies, mut policy_writer) = reflector::store::<PartialObjectMeta<NetworkPolicy>>();
    Arc::get_mut(&mut context)
        .expect("the only reference")
        .egress_objects = Some(super::context::EgressStores {
        deployments,
        services,
        policies,
    });
    let spec = json!({"source": {"secretId": "team/client"}, "refreshInterval": "1h",
                      "egress": {"upstream": "https://api.partner.example:443"}});
    let identity = identity(spec, None);
    let mut status = MtlsIdentityStatus {
        secret_name: Some("client".to_string()),
        ..Default::default()
    };
    let egress_condition = |status: &MtlsIdentityStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "Egress")
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let ready = Some(("True".to_string(), "EgressReady".to_string()));
    // The egress result as the plan folds it into the status.
    let fold = |status: &mut MtlsIdentityStatus, egress| {
        super::plan::fold_egress(status, egress, &super::context::Now::at(1_800_000_000));
    };

    let first_pass = super::egress::reconcile_egress(&identity, NAMESPACE, &status, &context)
        .await
        .expect("first pass");
    fold(&mut status, first_pass);
    assert_eq!(egress_condition(&status), ready);
    let first: Vec<Seen> = lock(&seen).drain(..).collect();
    let created: Vec<&Seen> = first.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(created.len(), 3, "{first:?}");
    // The watch delivers what was created.
    let stored = |path: &str| -> Value {
        let mut object = created
            .iter()
            .find(|r| r.path.contains(path))
            .map(|r| r.body.clone())
            .unwrap_or_default();
        object["metadata"]["resourceVersion"] = json!("7");
        if path != "/services" {
            object["metadata"]["generation"] = json!(1);
        }
        object
    };
    fn apply<K: serde::de::DeserializeOwned>(object: Value) -> Event<K> {
        Event::Apply(serde_json::from_value(object).expect("metadata"))
    }
    deployment_writer.apply_watcher_event(&apply(stored("/deployments")));
    service_writer.apply_watcher_event(&apply(stored("/services")));
    policy_writer.apply_watcher_event(&apply(stored("/networkpolicies")));

    let steady_pass = super::egress::reconcile_egress(&identity, NAMESPACE, &status, &context)
        .await
        .expect("steady pass");
    fold(&mut status, steady_pass);
    assert_eq!(egress_condition(&status), ready);
    let steady: Vec<Seen> = lock(&seen).drain(..).collect();
    assert!(steady.is_empty(), "a steady reconcile asked: {steady:?}");

    // Someone edits the Deployment's spec: a new generation, and the next pass looks and writes.
    let mut edited = stored("/deployments");
    edited["metadata"]["generation"] = json!(2);
    deployment_writer.apply_watcher_event(&apply(edited));
    let repair_pass = super::egress::reconcile_egress(&identity, NAMESPACE, &status, &context)
        .await
        .expect("repair pass");
    fold(&mut status, repair_pass);
    let repair: Vec<Seen> = lock(&seen).drain(..).collect();
    assert!(
        repair
            .iter()
            .any(|r| egress_paths.iter().any(|p| r.path.contains(p))),
        "the edited Deployment was not looked at: {repair:?}"
    );
    assert_all_expected(&unexpected);
}
