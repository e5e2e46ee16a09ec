//! `cargo xtask demo`: the operator's main job on an embedded default. Starts a local environment,
//! runs the operator against it, stores a sample certificate in the local Secrets Manager, applies a
//! sample identity, shows it Ready with its expiry, rotates the certificate and shows the new one.
//! Everything stays up for exploring with kubectl until `cargo xtask testenv down`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::project_root;
use crate::supervisor::{self, Attachment};
use crate::testenv::Environment;

const NAMESPACE: &str = "payments";
const SECRET_ID: &str = "payments/api-client";

fn say(line: &str) {
    eprintln!("\n==> {line}");
}

/// Runs kubectl against the environment, echoing the command, and returns its stdout.
fn kubectl(environment: &Environment, args: &[&str]) -> Result<String> {
    eprintln!("$ kubectl {}", args.join(" "));
    let output = Command::new(&environment.kubectl)
        .env("KUBECONFIG", &environment.kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprint!("{stdout}");
    Ok(stdout)
}

fn kubectl_apply(environment: &Environment, manifest: &str) -> Result<()> {
    eprintln!("$ kubectl apply -f - <<EOF\n{manifest}EOF");
    let mut child = Command::new(&environment.kubectl)
        .env("KUBECONFIG", &environment.kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(std::io::stderr())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(manifest.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("kubectl apply failed with {status}");
    }
    Ok(())
}

/// Waits for the demo Deployment's rollout, then shows its ReplicaSets.
fn show_rollout(environment: &Environment) -> Result<()> {
    kubectl(
        environment,
        &[
            "rollout",
            "status",
            "-n",
            NAMESPACE,
            "deployment/payments-api",
            "--timeout=120s",
        ],
    )?;
    kubectl(environment, &["get", "replicasets", "-n", NAMESPACE])?;
    Ok(())
}

struct SampleCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl SampleCa {
    fn new() -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Partner API demo CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// A client certificate as the security team would store it: JSON with PEM values.
    fn client_secret_json(&self, days: i64) -> Result<String> {
        let mut params = CertificateParams::new(vec!["payments-client.demo".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "payments-client");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(3600)).into();
        params.not_after =
            (now + std::time::Duration::from_secs(u64::try_from(days)? * 86_400)).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(serde_json::json!({
            "certificate": cert.pem(),
            "private_key": key.serialize_pem(),
            "ca": self.issuer.pem(),
        })
        .to_string())
    }
}

/// Starts the operator binary detached, with its pid where `testenv down` finds it.
fn start_operator(environment: &Environment, binary: &Path) -> Result<()> {
    let log = fs::File::create(environment.dir.join("logs").join("operator.log"))?;
    let health_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = Command::new(binary);
    command
        .args(["run", "--health-address"])
        .arg(format!("127.0.0.1:{health_port}"))
        .envs(environment.variables())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = command.spawn().context("starting the operator")?;
    fs::write(
        environment.dir.join("pids").join("operator.pid"),
        child.id().to_string(),
    )?;
    Ok(())
}

pub fn run(progress: &dyn Fn(&str)) -> Result<()> {
    crate::install::ensure_installed(progress)?;
    say(&format!(
        "building the operator (cargo build; cold: about {}, cargo's progress below)",
        crate::install::COLD_OPERATOR_BUILD
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(project_root())
        .args(["build", "--locked", "--bin", "mtls-operator"])
        .status()?;
    if !status.success() {
        bail!("building the operator failed");
    }
    let binary = project_root()
        .join("target")
        .join("debug")
        .join("mtls-operator");

    say("starting a local control plane and Secrets Manager (cargo xtask testenv up)");
    let environment =
        supervisor::start_supervisor(&std::env::current_exe()?, Attachment::Detached, progress)?
            .environment;

    say("installing the CRD (crds/mtlsidentity.yaml) and starting the operator");
    kubectl(
        &environment,
        &[
            "apply",
            "-f",
            &project_root().join("crds").display().to_string(),
        ],
    )?;
    kubectl(
        &environment,
        &[
            "wait",
            "--for=condition=Established",
            "crd/mtlsidentities.mtls-operator.io",
            "--timeout=60s",
        ],
    )?;
    start_operator(&environment, &binary)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ca = SampleCa::new()?;
    say(&format!(
        "storing a sample client certificate in Secrets Manager as {SECRET_ID}"
    ));
    let first_version =
        runtime.block_on(environment.put_secret(SECRET_ID, &ca.client_secret_json(90)?))?;
    eprintln!("version {first_version}");

    say("applying a sample MtlsIdentity");
    kubectl(&environment, &["create", "namespace", NAMESPACE])?;
    kubectl_apply(
        &environment,
        &format!(
            "apiVersion: mtls-operator.io/v1alpha1
kind: MtlsIdentity
metadata:
  name: payments-client
  namespace: {NAMESPACE}
spec:
  source:
    secretId: {SECRET_ID}
  target:
    secretName: payments-client-tls
  refreshInterval: 10s
"
        ),
    )?;
    kubectl(
        &environment,
        &[
            "wait",
            "-n",
            NAMESPACE,
            "--for=condition=Ready",
            "mtlsid/payments-client",
            "--timeout=60s",
        ],
    )?;
    kubectl(&environment, &["get", "mtlsid", "-n", NAMESPACE])?;
    kubectl(
        &environment,
        &["get", "secret", "payments-client-tls", "-n", NAMESPACE],
    )?;

    say("a workload that mounts the Secret (kwok runs its pods on fake nodes)");
    kubectl_apply(
        &environment,
        &format!(
            "apiVersion: apps/v1
kind: Deployment
metadata:
  name: payments-api
  namespace: {NAMESPACE}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: payments-api}}}}
  template:
    metadata: {{labels: {{app: payments-api}}}}
    spec:
      containers:
      - name: api
        image: example.invalid/payments-api:1
        volumeMounts: [{{name: client-tls, mountPath: /etc/partner-tls, readOnly: true}}]
      volumes:
      - name: client-tls
        secret: {{secretName: payments-client-tls}}
"
        ),
    )?;
    show_rollout(&environment)?;

    say("rotating: a new certificate version becomes AWSCURRENT");
    let second_version =
        runtime.block_on(environment.put_secret(SECRET_ID, &ca.client_secret_json(365)?))?;
    eprintln!("version {second_version}");
    kubectl(
        &environment,
        &[
            "wait",
            "-n",
            NAMESPACE,
            &format!("--for=jsonpath={{.status.source.versionId}}={second_version}"),
            "mtlsid/payments-client",
            "--timeout=60s",
        ],
    )?;
    kubectl(
        &environment,
        &[
            "wait",
            "-n",
            NAMESPACE,
            "--for=jsonpath={.status.lastRotation.complete}=true",
            "mtlsid/payments-client",
            "--timeout=120s",
        ],
    )?;
    kubectl(&environment, &["get", "mtlsid", "-n", NAMESPACE])?;
    kubectl(
        &environment,
        &[
            "get",
            "mtlsid",
            "payments-client",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath=certificate: {.status.certificate}{\"\\n\"}lastRotation: {.status.lastRotation}{\"\\n\"}",
        ],
    )?;
    say("exactly one rolling restart of the workload that uses the Secret: a second ReplicaSet");
    show_rollout(&environment)?;

    say("the environment is still running; explore it:");
    println!("{}", environment.exports());
    eprintln!(
        "  eval \"$(cat {dir}/exports)\"   # or paste the export lines above
  kubectl describe mtlsid -n {NAMESPACE} payments-client
  kubectl get secret -n {NAMESPACE} payments-client-tls -o yaml
  kubectl get events -n {NAMESPACE}
  aws secretsmanager list-secrets      # with the AWS CLI, if installed
  less {dir}/logs/operator.log
stop everything with:
  cargo xtask testenv down --dir {dir}",
        dir = environment.dir.display()
    );
    fs::write(environment.dir.join("exports"), environment.exports())?;
    Ok(())
}
