//! Test support for integration tests: the shared environment, clients as admin and as a
//! ServiceAccount, a Secrets Manager client, and waiting for a condition with a useful message.
//!
//! The environment is the one named by `MTLS_TESTENV_DIR` (as `cargo xtask test` sets it), or else
//! one started for this test binary and stopped when the binary exits, whether its tests pass, fail
//! or panic: components die with the thread that owns them (PR_SET_PDEATHSIG), and an `atexit`
//! handler stops them and removes the folder.

use std::future::Future;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::install;
use crate::processes::terminate;
use crate::testenv::{self, Environment};

static SHARED: OnceLock<Environment> = OnceLock::new();
/// What the atexit handler must clean up when this process started the environment itself.
static OWNED: Mutex<Option<(Vec<u32>, PathBuf)>> = Mutex::new(None);
/// Restart requests to the thread that owns the components, when this process started them.
type RestartRequest = std::sync::mpsc::Sender<Result<()>>;
static OWNED_RESTART: Mutex<Option<std::sync::mpsc::Sender<RestartRequest>>> = Mutex::new(None);

/// The environment every test in this binary shares.
pub fn environment() -> &'static Environment {
    SHARED.get_or_init(|| {
        let result = match std::env::var_os("MTLS_TESTENV_DIR") {
            Some(dir) => Environment::load(&PathBuf::from(dir)),
            None => start_owned(),
        };
        match result {
            Ok(environment) => environment,
            Err(error) => panic!("no test environment: {error:#}"),
        }
    })
}

extern "C" fn stop_owned() {
    let owned = OWNED.lock().ok().and_then(|mut owned| owned.take());
    if let Some((pids, dir)) = owned {
        for pid in pids.into_iter().rev() {
            terminate(pid, Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn start_owned() -> Result<Environment> {
    let progress = |line: &str| eprintln!("testenv: {line}");
    let tools = install::ensure_installed(&progress)?;
    let dir = testenv::new_env_dir()?;
    let (sender, receiver) = std::sync::mpsc::channel();
    let thread_dir = dir.clone();
    // The components die with this thread, so it lives as long as the process.
    std::thread::Builder::new()
        .name("testenv-owner".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = sender.send(Err(anyhow!(error)));
                    return;
                }
            };
            let started = runtime.block_on(testenv::start(&tools, &thread_dir, &progress));
            match started {
                Ok((environment, mut processes)) => {
                    if let Ok(mut owned) = OWNED.lock() {
                        *owned = Some((processes.pids(), thread_dir.clone()));
                    }
                    let (restarts, requests) = std::sync::mpsc::channel::<RestartRequest>();
                    if let Ok(mut owned) = OWNED_RESTART.lock() {
                        *owned = Some(restarts);
                    }
                    let _ = sender.send(Ok(environment));
                    // Keep the processes (and this thread) alive until the process exits; restart
                    // the API server when asked (components die with the thread that started them,
                    // so this thread starts it again).
                    for reply in requests {
                        let _ = reply.send(processes.restart(crate::supervisor::RESTARTABLE));
                    }
                    loop {
                        std::thread::park();
                    }
                }
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&thread_dir);
                    let _ = sender.send(Err(error));
                }
            }
        })?;
    let environment = receiver.recv().context("the environment thread ended")??;
    // SAFETY: registers a plain extern "C" function with no arguments.
    unsafe { libc::atexit(stop_owned) };
    Ok(environment)
}

/// Stops kube-apiserver and starts it again (etcd keeps the data), then waits until it is ready:
/// a control-plane restart in the middle of whatever a test is doing. Every test binary runs alone,
/// so only the calling binary's tests see it.
pub async fn restart_apiserver() -> Result<()> {
    let environment = environment();
    let owned = OWNED_RESTART.lock().ok().and_then(|owned| owned.clone());
    match owned {
        Some(restarts) => {
            let (reply, replied) = std::sync::mpsc::channel();
            restarts
                .send(reply)
                .context("the environment thread ended")?;
            tokio::task::spawn_blocking(move || replied.recv())
                .await?
                .context("the environment thread ended")??;
        }
        None => {
            let read = |path: PathBuf| -> Result<i32> {
                Ok(std::fs::read_to_string(path)?.trim().parse()?)
            };
            let pid_file = environment
                .dir
                .join("pids")
                .join(format!("{}.pid", crate::supervisor::RESTARTABLE));
            let before = read(pid_file.clone())?;
            let supervisor = read(environment.dir.join(crate::supervisor::SUPERVISOR_PID))?;
            // SAFETY: plain kill(2) on the environment's supervisor.
            if unsafe { libc::kill(supervisor, libc::SIGUSR1) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            wait_for("kube-apiserver restarted", Duration::from_secs(60), || {
                let now = read(pid_file.clone());
                async move {
                    anyhow::ensure!(now? != before, "not yet");
                    Ok(())
                }
            })
            .await?;
        }
    }
    wait_for(
        "kube-apiserver ready again",
        Duration::from_secs(120),
        || async {
            let admin = admin_client().await?;
            let request = http::Request::get("/readyz").body(Vec::new())?;
            let text = admin.request_text(request).await?;
            anyhow::ensure!(text.trim() == "ok", "{text}");
            Ok(())
        },
    )
    .await
}

/// A client with the admin's client certificate (system:masters).
pub async fn admin_client() -> Result<kube::Client> {
    environment().admin_client().await
}

/// A client that acts as ServiceAccount `namespace/name` (created if missing), with a token from the
/// TokenRequest API: it gets exactly what RBAC grants that ServiceAccount.
pub async fn service_account_client(namespace: &str, name: &str) -> Result<kube::Client> {
    let kubeconfig = service_account_kubeconfig(namespace, name).await?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A kubeconfig file (in the environment's folder) that acts as ServiceAccount `namespace/name`,
/// for a process started by a test: it gets exactly what RBAC grants that ServiceAccount.
pub async fn service_account_kubeconfig_file(
    namespace: &str,
    name: &str,
) -> Result<std::path::PathBuf> {
    let kubeconfig = service_account_kubeconfig(namespace, name).await?;
    let folder = environment().kubeconfig.with_file_name("service-accounts");
    std::fs::create_dir_all(&folder)?;
    let path = folder.join(format!("{namespace}-{name}.json"));
    std::fs::write(&path, serde_json::to_string(&kubeconfig)?)?;
    Ok(path)
}

async fn service_account_kubeconfig(
    namespace: &str,
    name: &str,
) -> Result<kube::config::Kubeconfig> {
    let admin = admin_client().await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, namespace);
    if accounts.get_opt(name).await?.is_none() {
        let account: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace}
        }))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600 * 4),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|status| status.token)
        .context("TokenRequest answered without a token")?;
    let mut kubeconfig = kube::config::Kubeconfig::read_from(&environment().kubeconfig)?;
    for named in &mut kubeconfig.auth_infos {
        named.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        });
    }
    Ok(kubeconfig)
}

/// The AWS configuration that reaches the environment's Secrets Manager (moto).
pub async fn aws_config() -> aws_config::SdkConfig {
    environment().aws_config().await
}

pub async fn secrets_manager() -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(&aws_config().await)
}

/// Creates a namespace with a unique name that starts with `prefix`, with optional labels.
pub async fn create_namespace(prefix: &str, labels: &[(&str, &str)]) -> Result<String> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let name = format!(
        "{prefix}-{}-{count}-{:x}",
        std::process::id(),
        nanos & 0xffff
    );
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(key, value)| (key.to_string(), serde_json::Value::from(*value)))
        .collect();
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}
    }))?;
    let namespaces: Api<Namespace> = Api::all(admin_client().await?);
    namespaces
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(name)
}

/// Runs the environment's kubectl (as admin) with `args`.
pub fn kubectl(args: &[&str]) -> Result<Output> {
    let environment = environment();
    std::process::Command::new(&environment.kubectl)
        .env("KUBECONFIG", &environment.kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")
}

/// Polls `check` until it returns `Ok`, or fails after `timeout` with what was being waited for
/// and the last reason `check` gave. `check` says "not yet" by returning an error that explains why.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(error) if started.elapsed() >= timeout => {
                return Err(error.context(format!(
                    "timed out after {timeout:?} waiting for {what}; last seen"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The last `lines` lines of the log at `path`, or why there is none: for failure messages of
/// tests that run processes of their own.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    crate::processes::log_tail(path, lines)
}
