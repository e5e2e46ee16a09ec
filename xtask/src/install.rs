//! Installs the test environment's pinned binaries into a version-keyed cache folder.
//!
//! Everything is built from the registries this project may reach: the Kubernetes components, etcd,
//! kwok and helm from the Go module proxy (the tool modules under `xtask/k8s-tools/`, whose `go.sum`
//! pins every checksum), moto from PyPI into a project-local virtualenv (`xtask/moto-requirements.txt`
//! pins every package), Prometheus and promtool from Debian's `prometheus` package (downloaded with
//! `apt-get download`, checked against its pinned SHA-256 and unpacked into the cache: nothing is
//! installed on the system). A folder is keyed by the tool's version and a hash of its build inputs, and is
//! only trusted once its `.complete` marker exists, so an interrupted build is redone, and a second run
//! does nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::project_root;

pub const KUBERNETES_VERSION: &str = "v1.36.3";
pub const ETCD_VERSION: &str = "v3.6.16";
pub const KWOK_VERSION: &str = "v0.8.0";
pub const HELM_VERSION: &str = "v3.22.0";
pub const MOTO_VERSION: &str = "5.2.5";
/// Debian 12's `prometheus` package: the Prometheus server and promtool the alert and dashboard
/// tests run (`tests/alerts.rs`).
pub const PROMETHEUS_DEB_VERSION: &str = "2.42.0+ds-5+deb12u1";
const PROMETHEUS_DEB_SHA256: &str =
    "81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55";

/// What the cold steps took on a fresh 2-core machine (BENCHMARKS.md, "Cold start"), told up front.
pub const COLD_GO_BUILDS: &str = "7½ minutes";
pub const COLD_MOTO: &str = "30 seconds";
pub const COLD_OPERATOR_BUILD: &str = "3 minutes";
pub const COLD_SUITE_BUILD: &str = "4 minutes";

/// Paths of every installed binary the environment runs.
#[derive(Debug, Clone)]
pub struct Toolset {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
    pub kwok: PathBuf,
    /// kwok's own "fast" node and pod stages at the pinned kwok version, concatenated.
    pub kwok_stages: PathBuf,
    pub helm: PathBuf,
    pub moto_server: PathBuf,
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

/// The cache folder: `MTLS_TESTENV_CACHE`, or `.cache/testenv` in the checkout (git-ignored).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("MTLS_TESTENV_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => project_root().join(".cache").join("testenv"),
    }
}

struct GoTool {
    name: &'static str,
    version: &'static str,
    /// Folder of the tool module under `xtask/k8s-tools/`.
    module: &'static str,
    /// (output binary name, Go package to build)
    binaries: &'static [(&'static str, &'static str)],
    ldflags: String,
    tags: &'static str,
}

fn kubernetes_tool() -> GoTool {
    // Stamp the version in both places `--version` reads, or the binaries report v0.0.0-master.
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or_default();
    let mut ldflags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        ldflags.push_str(&format!(
            " -X '{package}.gitVersion={KUBERNETES_VERSION}' -X '{package}.gitMajor=1' \
             -X '{package}.gitMinor={minor}' -X '{package}.gitTreeState=clean'"
        ));
    }
    GoTool {
        name: "kubernetes",
        version: KUBERNETES_VERSION,
        module: "kubernetes",
        binaries: &[
            ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
            (
                "kube-controller-manager",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
            ),
            ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
            ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
        ],
        ldflags,
        tags: "grpcnotrace",
    }
}

fn other_go_tools() -> Vec<GoTool> {
    vec![
        GoTool {
            name: "etcd",
            version: ETCD_VERSION,
            module: "etcd",
            binaries: &[("etcd", ".")],
            ldflags: "-s -w".into(),
            tags: "",
        },
        GoTool {
            name: "kwok",
            version: KWOK_VERSION,
            module: "kwok",
            binaries: &[("kwok", "sigs.k8s.io/kwok/cmd/kwok")],
            ldflags: "-s -w".into(),
            tags: "",
        },
        GoTool {
            name: "helm",
            version: HELM_VERSION,
            module: "helm",
            binaries: &[("helm", "helm.sh/helm/v3/cmd/helm")],
            ldflags: format!("-s -w -X 'helm.sh/helm/v3/internal/version.version={HELM_VERSION}'"),
            tags: "",
        },
    ]
}

fn tools_dir() -> PathBuf {
    project_root().join("xtask").join("k8s-tools")
}

/// Short hash of the inputs that decide what a folder holds.
fn input_hash(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..6])
}

fn go_tool_dir(tool: &GoTool) -> Result<PathBuf> {
    let module = tools_dir().join(tool.module);
    let go_mod = fs::read(module.join("go.mod")).context("reading go.mod of a tool module")?;
    let go_sum = fs::read(module.join("go.sum")).context("reading go.sum of a tool module")?;
    let hash = input_hash(&[
        &go_mod,
        &go_sum,
        tool.ldflags.as_bytes(),
        tool.tags.as_bytes(),
    ]);
    Ok(cache_dir().join(format!("{}-{}-{hash}", tool.name, tool.version)))
}

fn moto_dir() -> Result<PathBuf> {
    let requirements = fs::read(moto_requirements()).context("reading moto-requirements.txt")?;
    let hash = input_hash(&[&requirements]);
    Ok(cache_dir().join(format!("moto-{MOTO_VERSION}-{hash}")))
}

fn moto_requirements() -> PathBuf {
    project_root().join("xtask").join("moto-requirements.txt")
}

fn is_complete(dir: &Path) -> bool {
    dir.join(".complete").exists()
}

fn mark_complete(dir: &Path) -> Result<()> {
    fs::write(dir.join(".complete"), b"").context("writing the .complete marker")
}

/// A fresh, empty folder for a build (removes what an interrupted build left).
fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing stale {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Prints `still WHAT (elapsed)` every [`HEARTBEAT`] until dropped, so a long cold step (a Go build,
/// pip) is never silent for long.
struct Heartbeat {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

impl Heartbeat {
    fn start(what: String) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(HEARTBEAT)
            {
                eprintln!("xtask: still {what} ({}s)", started.elapsed().as_secs());
            }
        });
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn build_go_tool(tool: &GoTool, dir: &Path, progress: &dyn Fn(&str)) -> Result<()> {
    let names: Vec<&str> = tool.binaries.iter().map(|(name, _)| *name).collect();
    progress(&format!(
        "building {} {} ({}) from the Go module proxy; a cold build takes minutes",
        tool.name,
        tool.version,
        names.join(", ")
    ));
    fresh_dir(dir)?;
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    let started = std::time::Instant::now();
    for (name, package) in tool.binaries {
        let mut command = Command::new("go");
        command
            .current_dir(tools_dir().join(tool.module))
            .env("CGO_ENABLED", "0")
            // go.sum is committed: refuse to change it, and check every module against it.
            .env("GOFLAGS", "-mod=readonly -buildvcs=false")
            .args(["build", "-trimpath", "-ldflags", &tool.ldflags]);
        if !tool.tags.is_empty() {
            command.args(["-tags", tool.tags]);
        }
        command.arg("-o").arg(bin.join(name)).arg(package);
        let _heartbeat = Heartbeat::start(format!("building {name} with go build"));
        run(&mut command)?;
    }
    mark_complete(dir)?;
    progress(&format!("built {} in {:.0?}", tool.name, started.elapsed()));
    Ok(())
}

fn install_moto(dir: &Path, progress: &dyn Fn(&str)) -> Result<()> {
    progress(&format!(
        "installing moto[server] {MOTO_VERSION} into a virtualenv (pinned by xtask/moto-requirements.txt)"
    ));
    fresh_dir(dir)?;
    let _heartbeat = Heartbeat::start("installing moto with pip".into());
    let venv = dir.join("venv");
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin").join("pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "-r",
        ])
        .arg(moto_requirements()))?;
    mark_complete(dir)
}

fn prometheus_dir() -> PathBuf {
    let hash = input_hash(&[PROMETHEUS_DEB_SHA256.as_bytes()]);
    cache_dir().join(format!("prometheus-{PROMETHEUS_DEB_VERSION}-{hash}"))
}

/// Downloads Debian's `prometheus` package at the pinned version (refreshing the package lists
/// once if apt does not know it yet), checks its SHA-256, and unpacks its two binaries into `dir`.
fn install_prometheus(dir: &Path, progress: &dyn Fn(&str)) -> Result<()> {
    progress(&format!(
        "downloading Prometheus and promtool (Debian package prometheus {PROMETHEUS_DEB_VERSION})"
    ));
    fresh_dir(dir)?;
    let download = || {
        Command::new("apt-get")
            .current_dir(dir)
            .args(["download", &format!("prometheus={PROMETHEUS_DEB_VERSION}")])
            .status()
    };
    if !download().is_ok_and(|status| status.success()) {
        progress("apt-get does not have it yet: apt-get update, then again");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        if !download()?.success() {
            bail!(
                "apt-get download prometheus={PROMETHEUS_DEB_VERSION} failed: is Debian's \
                 archive reachable, and does it still carry that version?"
            );
        }
    }
    let deb = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .context("apt-get download left no .deb")?;
    let digest = hex::encode(Sha256::digest(fs::read(&deb)?));
    if digest != PROMETHEUS_DEB_SHA256 {
        bail!(
            "{} has SHA-256 {digest}, not the pinned {PROMETHEUS_DEB_SHA256}",
            deb.display()
        );
    }
    let unpacked = dir.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    for name in ["prometheus", "promtool"] {
        fs::rename(unpacked.join("usr/bin").join(name), bin.join(name))
            .with_context(|| format!("{name} is not in the package"))?;
    }
    fs::remove_dir_all(&unpacked)?;
    fs::remove_file(&deb)?;
    mark_complete(dir)
}

/// Concatenates kwok's own stage files at the pinned version (read from the Go module cache, where
/// building kwok put them) into one `--config` file.
fn write_kwok_stages(kwok_dir: &Path) -> Result<PathBuf> {
    let stages_file = kwok_dir.join("stages.yaml");
    if stages_file.exists() {
        return Ok(stages_file);
    }
    let output = Command::new("go")
        .current_dir(tools_dir().join("kwok"))
        .env("GOFLAGS", "-mod=readonly")
        .args(["list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"])
        .output()
        .context("locating kwok's module source")?;
    if !output.status.success() {
        bail!(
            "go list -m sigs.k8s.io/kwok failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let module = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let stage = module.join("kustomize").join("stage");
    let files = [
        stage.join("node/fast/node-initialize.yaml"),
        stage.join("node/heartbeat/node-heartbeat.yaml"),
        stage.join("pod/fast/pod-ready.yaml"),
        stage.join("pod/fast/pod-complete.yaml"),
        stage.join("pod/fast/pod-delete.yaml"),
    ];
    let mut stages = String::new();
    for file in &files {
        let text = fs::read_to_string(file)
            .with_context(|| format!("reading kwok stage {}", file.display()))?;
        stages.push_str("---\n");
        stages.push_str(&text);
        if !text.ends_with('\n') {
            stages.push('\n');
        }
    }
    fs::write(&stages_file, stages)?;
    Ok(stages_file)
}

/// Holds an exclusive lock on the cache folder, so two test binaries or shells never build at once.
struct CacheLock(fs::File);

impl CacheLock {
    fn acquire() -> Result<Self> {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(cache_dir())?;
        let file = fs::File::create(cache_dir().join(".lock"))?;
        // SAFETY: flock on a file descriptor we own; released when the file closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            bail!(
                "locking the cache folder: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(file))
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking the descriptor we locked.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Builds or installs whatever is missing from the cache, then returns the paths.
pub fn ensure_installed(progress: &dyn Fn(&str)) -> Result<Toolset> {
    let _lock = CacheLock::acquire()?;
    let kubernetes = kubernetes_tool();
    let mut go_tools = vec![kubernetes];
    go_tools.extend(other_go_tools());
    let missing: Vec<&str> = go_tools
        .iter()
        .filter(|tool| go_tool_dir(tool).map_or(true, |dir| !is_complete(&dir)))
        .map(|tool| tool.name)
        .collect();
    if !missing.is_empty() {
        progress(&format!(
            "first run: building {} from source into {} (measured cold on 2 cores: about {COLD_GO_BUILDS} \
             in all, then moto from PyPI, about {COLD_MOTO}); later runs reuse them and start in seconds",
            missing.join(", "),
            cache_dir().display()
        ));
    }
    for tool in &go_tools {
        let dir = go_tool_dir(tool)?;
        if !is_complete(&dir) {
            build_go_tool(tool, &dir, progress)?;
        }
    }
    let moto = moto_dir()?;
    if !is_complete(&moto) {
        install_moto(&moto, progress)?;
    }
    let prometheus = prometheus_dir();
    if !is_complete(&prometheus) {
        install_prometheus(&prometheus, progress)?;
    }
    let toolset = installed_toolset()?;
    Ok(toolset)
}

fn installed_toolset() -> Result<Toolset> {
    let kubernetes = go_tool_dir(&kubernetes_tool())?.join("bin");
    let others = other_go_tools();
    let bin_of = |name: &str| -> Result<PathBuf> {
        let tool = others
            .iter()
            .find(|tool| tool.name == name)
            .context("unknown tool")?;
        Ok(go_tool_dir(tool)?.join("bin").join(name))
    };
    let kwok = bin_of("kwok")?;
    let kwok_dir = kwok
        .parent()
        .and_then(Path::parent)
        .context("kwok folder")?
        .to_path_buf();
    let toolset = Toolset {
        etcd: bin_of("etcd")?,
        kube_apiserver: kubernetes.join("kube-apiserver"),
        kube_controller_manager: kubernetes.join("kube-controller-manager"),
        kube_scheduler: kubernetes.join("kube-scheduler"),
        kubectl: kubernetes.join("kubectl"),
        kwok_stages: write_kwok_stages(&kwok_dir)?,
        kwok,
        helm: bin_of("helm")?,
        moto_server: moto_dir()?.join("venv").join("bin").join("moto_server"),
        prometheus: prometheus_dir().join("bin").join("prometheus"),
        promtool: prometheus_dir().join("bin").join("promtool"),
    };
    for binary in [
        &toolset.etcd,
        &toolset.kube_apiserver,
        &toolset.kubectl,
        &toolset.kwok,
        &toolset.helm,
        &toolset.moto_server,
        &toolset.prometheus,
        &toolset.promtool,
    ] {
        if !binary.exists() {
            bail!(
                "{} is missing: run `cargo xtask testenv install`",
                binary.display()
            );
        }
    }
    Ok(toolset)
}
