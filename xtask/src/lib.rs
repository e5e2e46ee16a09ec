//! The project's own tasks, and the local test environment they share with the test suite.
//!
//! - [`install`]: pinned, version-stamped binaries in a version-keyed cache folder.
//! - [`testenv`]: a real control plane and Secrets Manager endpoint on loopback.
//! - [`supervisor`]: `up`/`down` lifecycles of an environment.
//! - [`demo`]: `cargo xtask demo`, the operator's main job on a local environment.
//! - [`runner`]: `cargo xtask test`'s runner: every test binary run, every failure reported.
//! - [`support`]: what integration tests use: clients, ServiceAccount identities, waiting.

// Nothing a user or a server controls may panic the process: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod certs;
pub mod demo;
pub mod install;
mod processes;
pub mod runner;
pub mod supervisor;
pub mod support;
pub mod testenv;

use std::path::PathBuf;

/// The checkout this crate was built from.
pub fn project_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map(PathBuf::from).unwrap_or(xtask)
}
