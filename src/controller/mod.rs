//! Reconciles MtlsIdentities: fetch, validate, write the Secret (never over a foreign one), restart
//! what uses it, then status and Events. A stack: [`runner`] runs the watches and the controller,
//! [`reconcile`] ties one identity's steps together, and each step has its file, its pure decisions
//! beside its I/O: [`sync`] with [`decide`] and [`secret`], [`status`], [`requeue`], [`rotation`],
//! [`write`], [`egress`]. What they share is in [`context`].

pub mod budget;
pub mod context;
pub mod decide;
pub mod egress;
pub mod error;
pub mod events;
pub mod integrity;
pub mod offload;
pub mod plan;
pub mod reconcile;
pub mod requeue;
pub mod rotation;
pub mod runner;
pub mod secret;
pub mod status;
pub mod sync;
#[cfg(test)]
mod tests;
pub mod write;

pub use context::{Context, Settings};
pub use error::ReconcileError;
pub use runner::run;
