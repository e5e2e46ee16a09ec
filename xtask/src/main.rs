//! `cargo xtask <task>`: see `cargo xtask help`.

// Nothing a user or a server controls may panic the process: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::supervisor::{self, Attachment};
use xtask::{install, runner};

const HELP: &str = "\
cargo xtask <task>

  demo                  a local environment, the operator, a sample identity synced and rotated;
                        left running for kubectl (stop with `cargo xtask testenv down`)
  test [ARGS]           the full test suite: installs what it needs, starts a local environment,
                        runs `cargo test --workspace ARGS` against it, stops it
  bench                 the fleet and proxy benchmarks (release build) on a fresh local
                        environment; prints each figure next to its target (BENCHMARKS.md)
  testenv install       build/install the pinned binaries into the cache (.cache/testenv)
  testenv up            start a local environment in the background; prints `export` lines:
                          eval \"$(cargo xtask testenv up)\"
  testenv down [--dir D]
                        stop the environment (default: $MTLS_TESTENV_DIR) and remove its folder
";

fn progress(line: &str) {
    eprintln!("xtask: {line}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["test", rest @ ..] => test(rest),
        ["bench"] => bench(),
        ["demo"] => {
            xtask::demo::run(&progress)?;
            Ok(ExitCode::SUCCESS)
        }
        ["testenv", "install"] => {
            install::ensure_installed(&progress)?;
            progress("all binaries installed");
            Ok(ExitCode::SUCCESS)
        }
        ["testenv", "up"] => {
            install::ensure_installed(&progress)?;
            let started = supervisor::start_supervisor(
                &std::env::current_exe()?,
                Attachment::Detached,
                &progress,
            )?;
            print!("{}", started.environment.exports());
            progress("stop it with: cargo xtask testenv down");
            Ok(ExitCode::SUCCESS)
        }
        ["testenv", "down", rest @ ..] => {
            let dir = supervisor::dir_from(dir_flag(rest)?)?;
            supervisor::down(&dir)?;
            progress(&format!("stopped and removed {}", dir.display()));
            Ok(ExitCode::SUCCESS)
        }
        ["testenv", "supervise", rest @ ..] => {
            let dir = dir_flag(rest)?.context("supervise needs --dir")?;
            let tools = install::ensure_installed(&progress)?;
            supervisor::supervise(&tools, &dir, rest.contains(&"--watch-stdin"))?;
            Ok(ExitCode::SUCCESS)
        }
        [] | ["help"] | ["--help"] | ["-h"] => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("unknown task {args:?}\n{HELP}"),
    }
}

fn dir_flag(args: &[&str]) -> Result<Option<PathBuf>> {
    match args.iter().position(|arg| *arg == "--dir") {
        Some(index) => Ok(Some(PathBuf::from(
            args.get(index + 1).context("--dir needs a folder")?,
        ))),
        None => Ok(None),
    }
}

/// The benchmarks: the release binary, one environment, each benchmark target with `--ignored`.
fn bench() -> Result<ExitCode> {
    install::ensure_installed(&progress)?;
    progress(
        "benchmark: cargo build --release --bin mtls-operator (every benchmark runs it as its own process)",
    );
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(xtask::project_root())
        .args(["build", "--release", "--locked", "--bin", "mtls-operator"])
        .status()
        .context("building the release binary")?;
    if !built.success() {
        return Ok(ExitCode::FAILURE);
    }
    let supervisor =
        supervisor::start_supervisor(&std::env::current_exe()?, Attachment::Attached, &progress)?;
    let mut status = None;
    for (test, filter) in [("bench", None), ("proxy", Some("bench"))] {
        progress(&format!(
            "benchmark: cargo test --release --test {test} (builds first)"
        ));
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(xtask::project_root())
            .args(["test", "--release", "--locked", "--test", test, "--"])
            .args(filter)
            .args(["--ignored", "--nocapture", "--test-threads=1"]);
        for (name, value) in supervisor.environment.variables() {
            cargo.env(name, value);
        }
        let ran = cargo.status().context("running the benchmark")?;
        if !ran.success() {
            status = Some(ran);
            break;
        }
    }
    supervisor.stop()?;
    Ok(match status {
        Some(_) => ExitCode::FAILURE,
        None => ExitCode::SUCCESS,
    })
}

/// The README's test command: everything the suite needs, every test binary built and run against
/// one environment, and a closing summary that names every binary that did not pass.
///
/// `ARGS` are `cargo test`'s: those before `--` choose what to build (`--test faults`), those after
/// go to every test binary (a name filter, `--nocapture`).
fn test(args: &[&str]) -> Result<ExitCode> {
    let (build_args, binary_args) = match args.iter().position(|arg| *arg == "--") {
        Some(index) => (&args[..index], &args[index + 1..]),
        None => (args, &[][..]),
    };
    install::ensure_installed(&progress)?;
    let deadline = binary_deadline()?;
    // Attached: the environment stops when this process ends, even if it is killed. Started
    // before the build, which replaces this very executable (the suite's tests use the xtask
    // binary), so that it is started from the file that is running.
    let supervisor =
        supervisor::start_supervisor(&std::env::current_exe()?, Attachment::Attached, &progress)?;
    progress(&format!(
        "cargo test --no-run builds the suite first (cold: about {}, cargo's progress below)",
        install::COLD_SUITE_BUILD
    ));
    let root = xtask::project_root();
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["test", "--workspace", "--locked", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .args(build_args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    let binaries = runner::test_binaries(&String::from_utf8_lossy(&built.stdout), &root);
    if !built.status.success() {
        supervisor.stop()?;
        let (summary, _) = runner::summary(&[], true);
        print!("{summary}");
        return Ok(ExitCode::FAILURE);
    }
    let environment: Vec<(String, String)> = supervisor
        .environment
        .variables()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let binary_args: Vec<String> = binary_args.iter().map(|arg| arg.to_string()).collect();
    progress(&format!(
        "running {} test binaries one after another (about 10 minutes warm), each bounded by {:.0?}",
        binaries.len(),
        deadline
    ));
    let started = std::time::Instant::now();
    let mut reports = Vec::new();
    for binary in &binaries {
        progress(&format!("running {}", binary.name));
        let report = runner::run_binary(binary, &binary_args, &environment, deadline)
            .unwrap_or_else(|error| runner::Report::not_run(binary, &error));
        reports.push(report);
    }
    supervisor.stop()?;
    eprintln!("xtask: the suite took {:.0?}", started.elapsed());
    let (summary, success) = runner::summary(&reports, false);
    print!("{summary}");
    Ok(if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How long one test binary may run before it counts as hung: `MTLS_TEST_BINARY_TIMEOUT` seconds,
/// by default well above the slowest binary's time on CI (BENCHMARKS.md).
fn binary_deadline() -> Result<std::time::Duration> {
    let seconds = match std::env::var("MTLS_TEST_BINARY_TIMEOUT") {
        Ok(value) => value
            .parse::<u64>()
            .with_context(|| format!("MTLS_TEST_BINARY_TIMEOUT={value:?} is not whole seconds"))?,
        Err(_) => 20 * 60,
    };
    Ok(std::time::Duration::from_secs(seconds))
}
