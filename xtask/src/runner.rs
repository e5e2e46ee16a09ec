//! The suite runner behind `cargo xtask test`: build every test target once, run every test binary
//! (a failure in one never keeps the others from running), and close with one summary that names
//! every target that failed, crashed, hung or never reported.
//!
//! Cargo's own `cargo test` stops at the first failing binary unless told `--no-fail-fast`, cannot
//! bound a binary that hangs, and leaves the counting to whoever reads its output. Running the
//! binaries here makes each of those explicit.

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// One test binary that cargo built: what to run, and where cargo would run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// How the summary names it: its crate root's path in the workspace, e.g. `tests/faults.rs`.
    pub name: String,
    pub executable: PathBuf,
    /// The package's folder: cargo runs a test binary there, so this runner does too.
    pub package_dir: PathBuf,
}

/// The counts one `test result:` line of libtest reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// How one binary's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0 and a `test result:` line with no failure.
    Passed,
    /// A `test result:` line that reports failures (the failing tests by name).
    Failed { tests: Vec<String> },
    /// Killed by a signal before or after reporting (a panic that aborted, a SIGSEGV, the OOM killer).
    Crashed { signal: i32 },
    /// Still running at the deadline: killed, with everything it started.
    Hung {
        after: Duration,
        running_long: Vec<String>,
    },
    /// Ended without a `test result:` line, or its exit status contradicts the line it printed.
    NoReport { status: String },
}

/// What running one binary showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub name: String,
    pub counts: Counts,
    pub outcome: Outcome,
    pub took: Duration,
}

impl Report {
    /// A binary that could not even be started (or read): a failure like any other.
    pub fn not_run(binary: &TestBinary, error: &anyhow::Error) -> Self {
        Self {
            name: binary.name.clone(),
            counts: Counts::default(),
            outcome: Outcome::NoReport {
                status: format!("could not be run: {error:#}"),
            },
            took: Duration::ZERO,
        }
    }

    pub fn is_success(&self) -> bool {
        self.outcome == Outcome::Passed
    }

    /// How many failures this binary adds to the closing line: its failing tests, or one for a
    /// binary that ended without a trustworthy result, so a crash or hang never reads `0 failed`.
    pub fn failures(&self) -> u64 {
        match &self.outcome {
            Outcome::Passed => 0,
            _ => self.counts.failed.max(1),
        }
    }

    fn describe(&self) -> String {
        let counts = format!(
            "{} passed, {} failed, {} ignored, {:.0?}",
            self.counts.passed, self.counts.failed, self.counts.ignored, self.took
        );
        match &self.outcome {
            Outcome::Passed => format!("ok      {}: {counts}", self.name),
            Outcome::Failed { tests } => format!(
                "FAILED  {}: {counts}; failing: {}",
                self.name,
                if tests.is_empty() {
                    "(names not printed)".to_string()
                } else {
                    tests.join(", ")
                }
            ),
            Outcome::Crashed { signal } => format!(
                "CRASHED {}: killed by signal {signal} ({counts} reported before it)",
                self.name
            ),
            Outcome::Hung {
                after,
                running_long,
            } => format!(
                "HUNG    {}: still running after {after:.0?}, killed with its processes ({counts} \
                 reported before it){}",
                self.name,
                if running_long.is_empty() {
                    String::new()
                } else {
                    format!("; running long: {}", running_long.join(", "))
                }
            ),
            Outcome::NoReport { status } => format!(
                "NO RESULT {}: {status}, without a `test result:` line to match ({counts})",
                self.name
            ),
        }
    }
}

/// The test binaries in the JSON messages of `cargo test --no-run --message-format=json`: every
/// artifact built with the test profile that has an executable, named by its crate root relative to
/// `workspace`, in that order.
pub fn test_binaries(cargo_messages: &str, workspace: &Path) -> Vec<TestBinary> {
    let mut binaries = Vec::new();
    for line in cargo_messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let package = message["manifest_path"]
            .as_str()
            .map(Path::new)
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let source = Path::new(message["target"]["src_path"].as_str().unwrap_or(executable));
        let name = source.strip_prefix(workspace).unwrap_or(source);
        binaries.push(TestBinary {
            name: name.display().to_string(),
            executable: PathBuf::from(executable),
            package_dir: package,
        });
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    binaries.dedup_by(|a, b| a.executable == b.executable);
    binaries
}

/// The counts in a libtest `test result:` line, if `line` is one.
pub fn parse_result_line(line: &str) -> Option<Counts> {
    let counts = line.strip_prefix("test result: ")?;
    let number = |word: &str| {
        counts
            .split(';')
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Counts {
        passed: number(" passed"),
        failed: number(" failed"),
        ignored: number(" ignored"),
    })
}

/// What a binary's output says, read line by line as it comes.
#[derive(Debug, Default)]
struct Transcript {
    result: Option<Counts>,
    failed_tests: Vec<String>,
    running_long: Vec<String>,
}

impl Transcript {
    fn read(&mut self, line: &str) {
        if let Some(counts) = parse_result_line(line) {
            let sum = self.result.unwrap_or_default();
            self.result = Some(Counts {
                passed: sum.passed + counts.passed,
                failed: sum.failed + counts.failed,
                ignored: sum.ignored + counts.ignored,
            });
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failed_tests.push(name.to_string());
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" has been running for over "))
            .map(|(name, _)| name)
        {
            self.running_long.push(name.to_string());
        }
    }

    fn outcome(self, ended: Ended, took: Duration) -> (Counts, Outcome) {
        let counts = self.result.unwrap_or_default();
        let outcome = match ended {
            Ended::TimedOut => Outcome::Hung {
                after: took,
                running_long: self.running_long,
            },
            Ended::Exited(status) => match (status.signal(), self.result) {
                (Some(signal), _) => Outcome::Crashed { signal },
                (None, Some(counts)) if counts.failed > 0 || !self.failed_tests.is_empty() => {
                    Outcome::Failed {
                        tests: self.failed_tests,
                    }
                }
                (None, Some(_)) if status.success() => Outcome::Passed,
                (None, _) => Outcome::NoReport {
                    status: status.to_string(),
                },
            },
        };
        (counts, outcome)
    }
}

enum Ended {
    Exited(ExitStatus),
    TimedOut,
}

/// Runs one test binary in its package's folder with `args` and `env`, passing its output through,
/// and kills it with every process it started (its own process group) if it runs past `deadline`.
pub fn run_binary(
    binary: &TestBinary,
    args: &[String],
    env: &[(String, String)],
    deadline: Duration,
) -> Result<Report> {
    let started = Instant::now();
    let mut command = Command::new(&binary.executable);
    command
        .args(args)
        .current_dir(&binary.package_dir)
        .env("CARGO_MANIFEST_DIR", &binary.package_dir)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its own group, so a hang is ended with everything it spawned (operators, proxies).
        .process_group(0);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.executable.display()))?;
    let pid = child.id() as libc::pid_t;

    // Lines arrive on a thread, so the deadline is kept even when the binary prints nothing.
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take().context("the test binary's stdout")?;
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let mut transcript = Transcript::default();
    let mut show = |line: String| {
        println!("{line}");
        transcript.read(&line);
    };
    let ended = loop {
        let left = deadline.saturating_sub(started.elapsed());
        match received.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => show(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ended::Exited(child.wait()?),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Exited while something it started still holds its stdout: that goes, and the
                // binary's own last lines are read.
                if let Some(status) = child.try_wait()? {
                    kill_group(pid);
                    while let Ok(line) = received.recv_timeout(Duration::from_secs(2)) {
                        show(line);
                    }
                    break Ended::Exited(status);
                }
                if left.is_zero() {
                    kill_group(pid);
                    break Ended::TimedOut;
                }
            }
        }
    };
    // Whatever it left behind in its group goes too: a test binary's servers never outlive it.
    kill_group(pid);
    let _ = child.wait();
    // Not joined: a process that left the group could hold the pipe open for ever.
    drop(reader);
    let took = started.elapsed();
    let (counts, outcome) = transcript.outcome(ended, took);
    Ok(Report {
        name: binary.name.clone(),
        counts,
        outcome,
        took,
    })
}

fn kill_group(pid: libc::pid_t) {
    // SAFETY: kill(2) with a negative pid signals the process group the child leads; no memory.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// The closing summary: one line per binary, the failures again at the end where a reader looks,
/// and the `tests: N passed, N failed` line last. `build_failed` counts as one failure.
pub fn summary(reports: &[Report], build_failed: bool) -> (String, bool) {
    let mut text = String::from("xtask: test binaries:\n");
    for report in reports {
        text.push_str(&format!("  {}\n", report.describe()));
    }
    let failing: Vec<&Report> = reports.iter().filter(|r| !r.is_success()).collect();
    if build_failed {
        text.push_str("xtask: the suite did not build: no test ran (cargo's errors above)\n");
    }
    if !failing.is_empty() {
        text.push_str(&format!(
            "xtask: {} of {} test binaries did not pass:\n",
            failing.len(),
            reports.len()
        ));
        for report in &failing {
            text.push_str(&format!("  {}\n", report.describe()));
        }
    }
    let passed: u64 = reports.iter().map(|r| r.counts.passed).sum();
    let failed: u64 = reports.iter().map(Report::failures).sum::<u64>() + u64::from(build_failed);
    text.push_str(&format!("tests: {passed} passed, {failed} failed\n"));
    let success = !build_failed && failing.is_empty() && !reports.is_empty();
    (text, success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_counted() {
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 3 passed; 2 failed; 1 ignored; 0 measured; 4 filtered out; \
                 finished in 0.01s"
            ),
            Some(Counts {
                passed: 3,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(parse_result_line("test a ... ok"), None);
    }

    #[test]
    fn cargo_messages_name_each_test_binary_once() {
        let messages = [
            r#"{"reason":"compiler-artifact","manifest_path":"/p/Cargo.toml","target":{"src_path":"/p/src/lib.rs"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/p/Cargo.toml","target":{"src_path":"/p/tests/sync.rs"},"profile":{"test":true},"executable":"/t/sync-1"}"#,
            r#"{"reason":"compiler-artifact","manifest_path":"/p/x/Cargo.toml","target":{"src_path":"/p/x/src/lib.rs"},"profile":{"test":true},"executable":"/t/x-2"}"#,
            r#"{"reason":"build-finished","success":true}"#,
            "not json",
        ]
        .join("\n");
        let binaries = test_binaries(&messages, Path::new("/p"));
        let names: Vec<&str> = binaries.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["tests/sync.rs", "x/src/lib.rs"]);
        assert_eq!(binaries[1].package_dir, PathBuf::from("/p/x"));
    }

    #[test]
    fn a_crash_or_hang_never_reads_zero_failed() {
        let report = |outcome| Report {
            name: "tests/t.rs".into(),
            counts: Counts {
                passed: 4,
                ..Counts::default()
            },
            outcome,
            took: Duration::from_secs(1),
        };
        let reports = [
            report(Outcome::Passed),
            report(Outcome::Crashed { signal: 9 }),
            report(Outcome::NoReport {
                status: "exit status: 0".into(),
            }),
        ];
        let (text, success) = summary(&reports, false);
        assert!(!success);
        assert!(text.ends_with("tests: 12 passed, 2 failed\n"), "{text}");
        let (text, success) = summary(&[], true);
        assert!(!success);
        assert!(text.ends_with("tests: 0 passed, 1 failed\n"), "{text}");
        assert!(!summary(&[], false).1, "no binary at all is no success");
    }

    /// Real processes standing in for test binaries: shell scripts that print what libtest prints.
    mod processes {
        use super::*;
        use std::os::unix::fs::PermissionsExt;

        fn scratch(test: &str) -> PathBuf {
            let dir =
                std::env::temp_dir().join(format!("xtask-runner-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }

        fn script(dir: &Path, name: &str, body: &str) -> TestBinary {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            TestBinary {
                name: format!("tests/{name}.rs"),
                executable: path,
                package_dir: dir.to_path_buf(),
            }
        }

        const OK: &str = "echo 'test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s'";

        fn run_all(binaries: &[TestBinary], deadline: Duration) -> Vec<Report> {
            binaries
                .iter()
                .map(|binary| run_binary(binary, &[], &[], deadline).unwrap())
                .collect()
        }

        #[test]
        fn a_failing_binary_in_the_middle_is_named_and_the_rest_still_run() {
            let dir = scratch("middle");
            let binaries = [
                script(&dir, "first", &format!("touch ran-first\n{OK}")),
                script(
                    &dir,
                    "middle",
                    "touch ran-middle\necho 'test rotates ... FAILED'\necho 'test syncs ... ok'\n\
                     echo 'test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s'\n\
                     exit 101",
                ),
                script(&dir, "last", &format!("touch ran-last\n{OK}")),
            ];
            let reports = run_all(&binaries, Duration::from_secs(60));
            for name in ["first", "middle", "last"] {
                assert!(
                    dir.join(format!("ran-{name}")).exists(),
                    "{name} did not run"
                );
            }
            assert_eq!(
                reports[1].outcome,
                Outcome::Failed {
                    tests: vec!["rotates".into()]
                }
            );
            let (text, success) = summary(&reports, false);
            assert!(!success);
            assert!(
                text.contains("did not pass:\n  FAILED  tests/middle.rs: 1 passed, 1 failed"),
                "{text}"
            );
            assert!(text.ends_with("tests: 5 passed, 1 failed\n"), "{text}");
        }

        #[test]
        fn a_crash_a_silent_exit_and_a_contradicting_status_are_failures() {
            let dir = scratch("crash");
            let binaries = [
                script(&dir, "crash", &format!("{OK}\nkill -s SEGV $$")),
                script(&dir, "silent", "exit 0"),
                script(&dir, "contradicts", &format!("{OK}\nexit 3")),
            ];
            let reports = run_all(&binaries, Duration::from_secs(60));
            assert_eq!(reports[0].outcome, Outcome::Crashed { signal: 11 });
            assert!(matches!(reports[1].outcome, Outcome::NoReport { .. }));
            assert!(matches!(reports[2].outcome, Outcome::NoReport { .. }));
            let (text, success) = summary(&reports, false);
            assert!(!success);
            assert!(text.ends_with("tests: 4 passed, 3 failed\n"), "{text}");
        }

        #[test]
        fn a_hung_binary_is_killed_with_what_it_started() {
            let dir = scratch("hang");
            let binary = script(
                &dir,
                "hang",
                "echo 'test rotation_survives has been running for over 60 seconds'\n\
                 sleep 600 &\necho $! > child.pid\nwait",
            );
            let report = run_binary(&binary, &[], &[], Duration::from_secs(2)).unwrap();
            let Outcome::Hung { running_long, .. } = &report.outcome else {
                panic!("not reported as hung: {report:?}");
            };
            assert_eq!(running_long, &["rotation_survives".to_string()]);
            let child: u32 = std::fs::read_to_string(dir.join("child.pid"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // Gone, or a zombie waiting for a reaper: either way no longer running. SIGKILL is
            // delivered asynchronously, so this waits (bounded) for the kernel to act on it.
            let running = || {
                let state =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let alive = state
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'));
                alive.then_some(state)
            };
            let asked = Instant::now();
            while running().is_some() && asked.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(running(), None, "the hung binary's child survived");
            assert!(
                summary(&[report], false)
                    .0
                    .contains("HUNG    tests/hang.rs")
            );
        }
    }
}
