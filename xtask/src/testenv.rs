//! A real Kubernetes control plane and a Secrets Manager endpoint on loopback.
//!
//! etcd, kube-apiserver (TLS, client-certificate admin, RBAC, service-account tokens, PodSecurity),
//! kube-controller-manager, kube-scheduler, kwok with fake nodes, and moto's server. Every port is
//! free-picked and every file lives in the environment's own folder, so two environments can run side
//! by side. Readiness is waited on, never slept for.

use aws_sdk_secretsmanager::error::DisplayErrorContext;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};

use crate::certs;
use crate::install::Toolset;
use crate::processes::Processes;

/// What the API server's audit log (`audit.log` in the environment's folder) records: LISTs of
/// workloads and Pods, and ServiceAccounts' (the operators') GETs, creates and updates of Secrets,
/// metadata only, once each when answered. Tests count there the load a namespace puts on the API
/// server (#23 hole 5) and the requests a sync makes (#24); nothing else is written, so the log
/// stays small.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["list"]
    resources:
      - group: "apps"
        resources: ["deployments", "statefulsets", "daemonsets"]
      - group: ""
        resources: ["pods"]
  - level: Metadata
    verbs: ["get", "create", "update"]
    userGroups: ["system:serviceaccounts"]
    resources:
      - group: ""
        resources: ["secrets"]
  - level: None
"#;

/// How long any one component may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
pub const FAKE_NODES: usize = 2;
pub const REGION: &str = "us-east-1";

/// What a client needs to use a running environment; written to `env.json` in its folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub apiserver_url: String,
    pub aws_endpoint_url: String,
    pub aws_region: String,
    pub aws_access_key_id: String,
    pub aws_secret_access_key: String,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// Prometheus and promtool, for the alert and dashboard tests.
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
    /// Processes of the environment, for `down` and for the "nothing outlives it" check.
    pub pids: Vec<u32>,
}

impl Environment {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("env.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is the environment up?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save(&self) -> Result<()> {
        // Written under another name first: a reader never sees half a file.
        let partial = self.dir.join("env.json.partial");
        fs::write(&partial, serde_json::to_vec_pretty(self)?)?;
        fs::rename(partial, self.dir.join("env.json"))?;
        Ok(())
    }

    /// Shell lines that point kubectl, helm and AWS clients at this environment.
    pub fn exports(&self) -> String {
        let mut path_dirs: Vec<String> = Vec::new();
        for binary in [&self.kubectl, &self.helm] {
            if let Some(dir) = binary.parent() {
                let dir = dir.display().to_string();
                if !path_dirs.contains(&dir) {
                    path_dirs.push(dir);
                }
            }
        }
        let vars = self.variables();
        let mut out = String::new();
        for (name, value) in vars {
            out.push_str(&format!("export {name}='{value}'\n"));
        }
        out.push_str(&format!(
            "export PATH='{}':\"$PATH\"\n",
            path_dirs.join(":")
        ));
        out
    }

    /// The environment variables a process needs to use this environment.
    pub fn variables(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MTLS_TESTENV_DIR", self.dir.display().to_string()),
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
            ("AWS_ENDPOINT_URL", self.aws_endpoint_url.clone()),
            ("AWS_REGION", self.aws_region.clone()),
            ("AWS_DEFAULT_REGION", self.aws_region.clone()),
            ("AWS_ACCESS_KEY_ID", self.aws_access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.aws_secret_access_key.clone()),
        ]
    }

    /// The AWS configuration that reaches this environment's Secrets Manager (moto).
    pub async fn aws_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.aws_endpoint_url)
            .region(aws_config::Region::new(self.aws_region.clone()))
            .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
                &self.aws_access_key_id,
                &self.aws_secret_access_key,
                None,
                None,
                "testenv",
            ))
            // moto's server answers an occasional 500 under many concurrent writes: the test side
            // retries them (the operator's own client retries under its adaptive rate instead).
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(8))
            .load()
            .await
    }

    /// Creates secret `name` with `value`, or stores `value` as its new AWSCURRENT version; returns
    /// the version id.
    pub async fn put_secret(&self, name: &str, value: &str) -> Result<String> {
        let client = aws_sdk_secretsmanager::Client::new(&self.aws_config().await);
        let exists = client
            .describe_secret()
            .secret_id(name)
            .send()
            .await
            .is_ok();
        let version = if exists {
            client
                .put_secret_value()
                .secret_id(name)
                .secret_string(value)
                .send()
                .await
                .map_err(|error| {
                    anyhow::anyhow!("PutSecretValue {name}: {}", DisplayErrorContext(&error))
                })?
                .version_id
        } else {
            client
                .create_secret()
                .name(name)
                .secret_string(value)
                .send()
                .await
                .map_err(|error| {
                    anyhow::anyhow!("CreateSecret {name}: {}", DisplayErrorContext(&error))
                })?
                .version_id
        };
        version.context("Secrets Manager returned no VersionId")
    }

    pub async fn admin_client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// A new, empty, uniquely named folder for an environment.
pub fn new_env_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("mtls-testenv-{}-{nanos:x}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET for plain-HTTP health endpoints (etcd, moto): status code and body.
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` until it returns `Ok(true)`, failing fast if a component dies meanwhile.
async fn wait_ready<F, Fut>(what: &str, processes: &mut Processes, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    let mut last_error = String::from("not ready yet");
    loop {
        processes.check_alive()?;
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = format!("{error:#}"),
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("{what} was not ready within {READY_TIMEOUT:?}: {last_error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kubeconfig_yaml(server: &str, pki: &certs::ControlPlanePki) -> String {
    use base64::Engine;
    let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context: {{cluster: testenv, user: admin, namespace: default}}
current-context: testenv
",
        ca = encode(&pki.ca_cert_pem),
        cert = encode(&pki.admin_cert_pem),
        key = encode(&pki.admin_key_pem),
    )
}

/// An unauthenticated client for a component's own HTTPS health endpoint (self-signed serving
/// certificate, so verification is off: this only asks "are you up?").
fn health_client(port: u16) -> Result<kube::Client> {
    let mut config = kube::Config::new(format!("https://127.0.0.1:{port}").parse()?);
    config.accept_invalid_certs = true;
    Ok(kube::Client::try_from(config)?)
}

async fn healthy(client: &kube::Client, path: &str) -> Result<bool> {
    let request = http::Request::get(path).body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(text.trim() == "ok")
}

fn fake_node(index: usize) -> Result<Node> {
    let name = format!("kwok-node-{index}");
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok"
            }
        },
        // kwok runs no containers, so capacity is only a number: room for every pod the whole
        // suite creates (it keeps its namespaces), and for a long-lived `testenv up` beyond that.
        // At 110 a day of development filled both nodes and new pods stayed Pending.
        "status": {
            "allocatable": {"cpu": "256", "memory": "2Ti", "pods": "1000"},
            "capacity": {"cpu": "256", "memory": "2Ti", "pods": "1000"}
        }
    }))?)
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

/// Starts every component in `dir` and waits until all are ready. The processes die with the thread
/// that called this (PR_SET_PDEATHSIG), and are stopped when the returned `Processes` is dropped.
pub async fn start(
    tools: &Toolset,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<(Environment, Processes)> {
    let started = Instant::now();
    let mut processes = Processes::new(dir)?;
    let pki = certs::generate(&dir.join("pki"))?;

    let etcd_port = free_port()?;
    let etcd_peer_port = free_port()?;
    let apiserver_port = free_port()?;
    let controller_manager_port = free_port()?;
    let scheduler_port = free_port()?;
    let kwok_port = free_port()?;
    let moto_port = free_port()?;

    progress("starting etcd and moto");
    let mut etcd = Command::new(&tools.etcd);
    let etcd_client = format!("http://127.0.0.1:{etcd_port}");
    let etcd_peer = format!("http://127.0.0.1:{etcd_peer_port}");
    etcd.arg("--name=testenv")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={etcd_client}"))
        .arg(format!("--advertise-client-urls={etcd_client}"))
        .arg(format!("--listen-peer-urls={etcd_peer}"))
        .arg(format!("--initial-advertise-peer-urls={etcd_peer}"))
        .arg(format!("--initial-cluster=testenv={etcd_peer}"))
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    processes.spawn("etcd", etcd)?;

    // moto's server through a launcher that finds secrets by name in O(1) (moto scans them all),
    // run by the virtualenv's own Python: see xtask/moto_server.py.
    let mut moto = Command::new(tools.moto_server.with_file_name("python3"));
    moto.arg(crate::project_root().join("xtask").join("moto_server.py"))
        .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]);
    processes.spawn("moto", moto)?;

    wait_ready("etcd", &mut processes, || async {
        let (status, body) = http_get(etcd_port, "/health")?;
        Ok(status == 200 && body.contains("true"))
    })
    .await?;

    progress("starting kube-apiserver");
    let sa_key = pki.service_account_key.display().to_string();
    let audit_policy = dir.join("audit-policy.yaml");
    fs::write(&audit_policy, AUDIT_POLICY)?;
    let mut apiserver = Command::new(&tools.kube_apiserver);
    apiserver
        .arg(format!("--etcd-servers={etcd_client}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={apiserver_port}"))
        .arg(format!("--cert-dir={}", dir.join("apiserver").display()))
        .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.serving_key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
        .arg("--authorization-mode=Node,RBAC")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}",
            pki.service_account_public_key.display()
        ))
        .arg(format!("--service-account-signing-key-file={sa_key}"))
        .arg("--allow-privileged=true")
        .arg(format!("--audit-policy-file={}", audit_policy.display()))
        .arg(format!(
            "--audit-log-path={}",
            dir.join("audit.log").display()
        ))
        .arg("--audit-log-format=json")
        .arg("--v=0");
    processes.spawn("kube-apiserver", apiserver)?;

    let kubeconfig = dir.join("kubeconfig");
    let apiserver_url = format!("https://127.0.0.1:{apiserver_port}");
    fs::write(&kubeconfig, kubeconfig_yaml(&apiserver_url, &pki))?;
    let kubeconfig_arg = kubeconfig.display().to_string();

    let environment = Environment {
        dir: dir.to_path_buf(),
        kubeconfig: kubeconfig.clone(),
        apiserver_url,
        aws_endpoint_url: format!("http://127.0.0.1:{moto_port}"),
        aws_region: REGION.to_string(),
        aws_access_key_id: "testing".to_string(),
        aws_secret_access_key: "testing".to_string(),
        kubectl: tools.kubectl.clone(),
        helm: tools.helm.clone(),
        prometheus: tools.prometheus.clone(),
        promtool: tools.promtool.clone(),
        pids: Vec::new(),
    };
    let admin = environment.admin_client().await?;
    wait_ready("kube-apiserver /readyz", &mut processes, || {
        let admin = admin.clone();
        async move { healthy(&admin, "/readyz").await }
    })
    .await?;

    progress("starting kube-controller-manager, kube-scheduler and kwok");
    let mut controller_manager = Command::new(&tools.kube_controller_manager);
    controller_manager
        .arg(format!("--kubeconfig={kubeconfig_arg}"))
        .arg(format!("--authentication-kubeconfig={kubeconfig_arg}"))
        .arg(format!("--authorization-kubeconfig={kubeconfig_arg}"))
        .arg("--leader-elect=false")
        .arg(format!("--root-ca-file={}", pki.ca_cert.display()))
        .arg(format!("--service-account-private-key-file={sa_key}"))
        .arg("--use-service-account-credentials=false")
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={controller_manager_port}"))
        .arg(format!(
            "--cert-dir={}",
            dir.join("controller-manager").display()
        ));
    processes.spawn("kube-controller-manager", controller_manager)?;

    let mut scheduler = Command::new(&tools.kube_scheduler);
    scheduler
        .arg(format!("--kubeconfig={kubeconfig_arg}"))
        .arg(format!("--authentication-kubeconfig={kubeconfig_arg}"))
        .arg(format!("--authorization-kubeconfig={kubeconfig_arg}"))
        .arg("--leader-elect=false")
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={scheduler_port}"))
        .arg(format!("--cert-dir={}", dir.join("scheduler").display()));
    processes.spawn("kube-scheduler", scheduler)?;

    let mut kwok = Command::new(&tools.kwok);
    kwok.arg(format!("--kubeconfig={kubeconfig_arg}"))
        .arg("--manage-all-nodes=true")
        .arg(format!("--config={}", tools.kwok_stages.display()))
        .arg(format!("--server-address=127.0.0.1:{kwok_port}"));
    processes.spawn("kwok", kwok)?;

    let nodes: Api<Node> = Api::all(admin.clone());
    for index in 0..FAKE_NODES {
        nodes
            .create(&PostParams::default(), &fake_node(index)?)
            .await?;
    }

    let controller_manager_health = health_client(controller_manager_port)?;
    wait_ready("kube-controller-manager /healthz", &mut processes, || {
        let client = controller_manager_health.clone();
        async move { healthy(&client, "/healthz").await }
    })
    .await?;
    let scheduler_health = health_client(scheduler_port)?;
    wait_ready("kube-scheduler /readyz", &mut processes, || {
        let client = scheduler_health.clone();
        async move { healthy(&client, "/readyz").await }
    })
    .await?;
    // The controller manager really works once it has made the default ServiceAccount.
    let service_accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    wait_ready("the default ServiceAccount", &mut processes, || {
        let service_accounts = service_accounts.clone();
        async move { Ok(service_accounts.get_opt("default").await?.is_some()) }
    })
    .await?;
    wait_ready("kwok's fake nodes Ready", &mut processes, || {
        let nodes = nodes.clone();
        async move {
            let list = nodes.list(&Default::default()).await?;
            Ok(list.items.iter().filter(|node| node_ready(node)).count() >= FAKE_NODES)
        }
    })
    .await?;
    wait_ready("moto", &mut processes, || async {
        let (status, _) = http_get(moto_port, "/moto-api/")?;
        Ok(status == 200)
    })
    .await?;

    let environment = Environment {
        pids: processes.pids(),
        ..environment
    };
    environment.save()?;
    progress(&format!("environment ready in {:.1?}", started.elapsed()));
    Ok((environment, processes))
}
