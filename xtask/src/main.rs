//! `cargo xtask <task>`: see `cargo xtask help`.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::install;
use xtask::supervisor::{self, Attachment};

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

/// The README's test command: everything the suite needs, then the suite, then cleanup.
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

fn test(cargo_args: &[&str]) -> Result<ExitCode> {
    install::ensure_installed(&progress)?;
    // Attached: the environment stops when this process ends, even if it is killed.
    let supervisor =
        supervisor::start_supervisor(&std::env::current_exe()?, Attachment::Attached, &progress)?;
    progress(&format!(
        "cargo test builds the suite first (cold: about {}, cargo's progress below), then runs it \
         (about 20 minutes)",
        install::COLD_SUITE_BUILD
    ));
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(xtask::project_root())
        .args(["test", "--workspace", "--locked"])
        .args(cargo_args);
    for (name, value) in supervisor.environment.variables() {
        cargo.env(name, value);
    }
    // Pass the output through, and count what the test binaries report, for one closing line.
    let started = std::time::Instant::now();
    let mut child = cargo
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(counts) = line.strip_prefix("test result: ") {
                let number = |word: &str| {
                    counts
                        .split(';')
                        .find_map(|part| part.trim().strip_suffix(word))
                        .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                passed += number(" passed");
                failed += number(" failed");
            }
        }
    }
    let status = child.wait()?;
    supervisor.stop()?;
    eprintln!("xtask: the suite took {:.0?}", started.elapsed());
    println!("tests: {passed} passed, {failed} failed");
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
