//! Child processes of an environment: started with a log file and a pid file each, killed by the
//! kernel if their parent dies (PR_SET_PDEATHSIG), stopped in reverse order.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Processes {
    dir: PathBuf,
    children: Vec<(String, Child)>,
    /// How each component was started, to start it again (`restart`).
    recipes: HashMap<String, Recipe>,
}

/// A command's program, arguments, environment and folder: what `Command` cannot clone.
struct Recipe {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
}

impl Recipe {
    fn of(command: &Command) -> Self {
        Self {
            program: command.get_program().to_owned(),
            args: command.get_args().map(ToOwned::to_owned).collect(),
            envs: command
                .get_envs()
                .map(|(name, value)| (name.to_owned(), value.map(ToOwned::to_owned)))
                .collect(),
            current_dir: command.get_current_dir().map(Path::to_path_buf),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (name, value) in &self.envs {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        command
    }
}

impl Processes {
    pub fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("logs"))?;
        fs::create_dir_all(dir.join("pids"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            children: Vec::new(),
            recipes: HashMap::new(),
        })
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Starts `command` as `name`. The child dies with the thread that spawned it, so spawn from a
    /// thread that lives as long as the environment should.
    pub fn spawn(&mut self, name: &str, command: Command) -> Result<()> {
        let log = fs::File::create(self.log_path(name))?;
        self.recipes.insert(name.to_string(), Recipe::of(&command));
        let child = self.start(name, command, log)?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Stops component `name` (SIGTERM, then SIGKILL after a grace period) and starts it again as
    /// it was started, in its place in the stop order, its log continued: a restart of one
    /// component (the fault tests restart kube-apiserver; etcd keeps the data).
    pub fn restart(&mut self, name: &str) -> Result<()> {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no component {name}"))?;
        let (_, mut child) = self.children.remove(index);
        terminate(child.id(), Duration::from_secs(10));
        let _ = child.wait();
        let command = self
            .recipes
            .get(name)
            .with_context(|| format!("no recipe for {name}"))?
            .command();
        let log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.log_path(name))?;
        let child = self.start(name, command, log)?;
        self.children.insert(index, (name.to_string(), child));
        Ok(())
    }

    fn start(&self, name: &str, mut command: Command, log: fs::File) -> Result<Child> {
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: a Ctrl-C in the terminal reaches the supervisor, which stops
            // the components in order, instead of reaching everything at once.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        fs::write(
            self.dir.join("pids").join(format!("{name}.pid")),
            child.id().to_string(),
        )?;
        Ok(child)
    }

    /// Fails, with the end of its log, if any component has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let log = log_tail(&self.dir.join("logs").join(format!("{name}.log")), 30);
                bail!("{name} exited ({status}); the end of its log:\n{log}");
            }
        }
        Ok(())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, child)| child.id()).collect()
    }

    /// SIGTERM in reverse start order, SIGKILL whatever is still running after a grace period.
    pub fn stop(&mut self) {
        while let Some((_, mut child)) = self.children.pop() {
            terminate(child.id(), Duration::from_secs(10));
            let _ = child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn is_running(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // A zombie still answers kill(0); read its state so a dead-but-unreaped child counts as gone.
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat"))
        && let Some(state) = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
        && state == "Z"
    {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Sends SIGTERM, waits up to `grace` for the process to go, then sends SIGKILL.
pub fn terminate(pid: u32, grace: Duration) {
    let Ok(raw) = i32::try_from(pid) else { return };
    // SAFETY: plain kill(2) on a pid we started.
    unsafe { libc::kill(raw, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while is_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_running(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(raw, libc::SIGKILL) };
    }
}

pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(no log at {}: {error})", path.display()),
    }
}
