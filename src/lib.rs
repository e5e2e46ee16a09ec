//! mtls-operator: keeps workloads' mTLS client certificates in sync with AWS Secrets Manager.
//!
//! - [`api`]: the `MtlsIdentity` custom resource.
//! - [`pki`]: pure certificate logic: parse, validate, fingerprint, render Secret data.
//! - [`source`]: Secrets Manager behind a trait, and the tenancy policy.
//! - [`controller`]: reconcile, with pure decisions apart from the I/O.

// Nothing a user or a server controls may panic the process: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod check;
pub mod controller;
pub mod fair;
pub mod health;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod refresh;
pub mod restart;
pub mod source;
pub mod telemetry;

/// Locks a mutex, using its data even if a panicking thread poisoned it: every mutex here guards
/// plain maps and counters that stay consistent between statements.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
