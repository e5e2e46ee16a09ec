//! Lifecycles of an environment.
//!
//! - `start_supervisor` starts a supervisor process that owns the components, detached (its own
//!   session, for `testenv up`) or attached (for `cargo xtask test`), and waits until the environment
//!   is ready. The components die with the supervisor.
//! - `down` stops the supervisor by PID, waits for it and its components to be gone, and removes the
//!   folder. Nothing outlives it.
//! - `supervise` is the supervisor itself: it starts the components, writes `env.json`, and stops
//!   everything on SIGTERM/SIGINT, or when its standard input closes (`--watch-stdin`: the parent that
//!   started it has gone, for whatever reason).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::install::Toolset;
use crate::processes::{self, Processes, is_running, log_tail};
use crate::testenv::{self, Environment};

pub const SUPERVISOR_PID: &str = "supervisor.pid";
/// The component SIGUSR1 restarts.
pub const RESTARTABLE: &str = "kube-apiserver";
const UP_TIMEOUT: Duration = Duration::from_secs(300);

/// How the supervisor relates to the process that starts it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// Its own session, outliving us: `testenv up`, stopped by `testenv down`.
    Detached,
    /// Stops when we exit, however we exit: its standard input is a pipe we hold.
    Attached,
}

/// A started supervisor: the environment it runs and, when attached, the handle that keeps it alive.
pub struct Supervisor {
    pub environment: Environment,
    child: std::process::Child,
}

impl Supervisor {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops an attached supervisor (closing its standard input) and waits for it to clean up.
    pub fn stop(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the environment's supervisor exited with {status}");
        }
        Ok(())
    }
}

/// Starts a supervisor (`xtask`, the binary at `xtask_exe`) in a new folder and waits for the
/// environment to be ready.
pub fn start_supervisor(
    xtask_exe: &Path,
    attachment: Attachment,
    progress: &dyn Fn(&str),
) -> Result<Supervisor> {
    let dir = testenv::new_env_dir()?;
    let log = fs::File::create(dir.join("supervisor.log"))?;
    let mut command = Command::new(xtask_exe);
    command
        .args(["testenv", "supervise", "--dir"])
        .arg(&dir)
        .stdout(log.try_clone()?)
        .stderr(log);
    match attachment {
        Attachment::Detached => {
            command.stdin(Stdio::null());
            // SAFETY: setsid is async-signal-safe; it detaches the supervisor from our session.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Attachment::Attached => {
            command.arg("--watch-stdin").stdin(Stdio::piped());
        }
    }
    let mut child = command.spawn().context("starting the supervisor")?;
    progress(&format!("environment folder {}", dir.display()));
    let started = Instant::now();
    loop {
        if let Ok(environment) = Environment::load(&dir) {
            return Ok(Supervisor { environment, child });
        }
        if let Some(status) = child.try_wait()? {
            let log = log_tail(&dir.join("supervisor.log"), 40);
            down(&dir)?;
            bail!("the environment failed to start ({status}):\n{log}");
        }
        if started.elapsed() > UP_TIMEOUT {
            let log = log_tail(&dir.join("supervisor.log"), 40);
            down(&dir)?;
            bail!("the environment was not ready within {UP_TIMEOUT:?}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the supervisor in this process until told to stop.
pub fn supervise(tools: &Toolset, dir: &Path, watch_stdin: bool) -> Result<()> {
    fs::write(dir.join(SUPERVISOR_PID), std::process::id().to_string())?;
    // One thread: the components die with the thread that spawned them, which must be this one.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let progress = |line: &str| eprintln!("testenv: {line}");
        // On failure the folder stays: the starter reads the logs from it, then removes it.
        let (_environment, mut processes) = testenv::start(tools, dir, &progress).await?;
        wait_for_stop(&mut processes, watch_stdin).await;
        eprintln!("testenv: stopping");
        processes.stop();
        Ok::<_, anyhow::Error>(())
    })?;
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

async fn wait_for_stop(processes: &mut Processes, watch_stdin: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut restart)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        return;
    };
    let stdin_closed = async {
        if watch_stdin {
            let mut buffer = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            use tokio::io::AsyncReadExt;
            while matches!(stdin.read(&mut buffer).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut health = tokio::time::interval(Duration::from_secs(2));
    tokio::pin!(stdin_closed);
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = &mut stdin_closed => return,
            // SIGUSR1: restart kube-apiserver (`support::restart_apiserver`, for the fault tests).
            _ = restart.recv() => {
                eprintln!("testenv: restarting {RESTARTABLE}");
                if let Err(error) = processes.restart(RESTARTABLE) {
                    eprintln!("testenv: {error:#}");
                }
            }
            _ = health.tick() => {
                // A component that dies is reported in the supervisor log; the environment stays
                // up so that its logs can be read.
                if let Err(error) = processes.check_alive() {
                    eprintln!("testenv: {error:#}");
                }
            }
        }
    }
}

/// Stops the environment in `dir` and removes the folder.
pub fn down(dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("no environment at {}", dir.display());
    }
    // Read every pid first: the supervisor removes the folder when it stops.
    let others: Vec<u32> = fs::read_dir(dir.join("pids"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| read_pid(&entry.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if let Ok(pid) = read_pid(&dir.join(SUPERVISOR_PID)) {
        processes::terminate(pid, Duration::from_secs(30));
    }
    // Whatever the supervisor did not own (the demo's operator), or that survived it (a supervisor
    // killed with SIGKILL takes its children along through PR_SET_PDEATHSIG; this is a second line).
    for pid in others {
        if is_running(pid) {
            processes::terminate(pid, Duration::from_secs(5));
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

fn read_pid(path: &Path) -> Result<u32> {
    Ok(fs::read_to_string(path)?.trim().parse()?)
}

/// The environment folder named by `--dir` or `MTLS_TESTENV_DIR`.
pub fn dir_from(arg: Option<PathBuf>) -> Result<PathBuf> {
    arg.or_else(|| std::env::var_os("MTLS_TESTENV_DIR").map(PathBuf::from))
        .context("which environment? pass --dir or set MTLS_TESTENV_DIR (printed by `up`)")
}
