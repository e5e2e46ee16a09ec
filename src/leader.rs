//! High availability: several replicas, one leader, elected over a `coordination.k8s.io` Lease
//! (kube-lease-manager). Only the leader runs the controller, so only the leader writes. A leader
//! that loses the lease drops the controller at once (no further writes) and returns an error, so the
//! process exits and comes back as a standby; a standby takes over within the lease duration.

use std::sync::Arc;
use std::time::Duration;

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tracing::{info, warn};

use crate::api::FIELD_MANAGER;
use crate::controller::{self, Settings};
use crate::metrics::Metrics;
use crate::source::SecretSource;

#[derive(Debug, Clone)]
pub struct LeaderSettings {
    pub lease_name: String,
    pub namespace: String,
    /// This replica's name in the Lease (the Pod name).
    pub identity: String,
    pub duration: Duration,
    /// On shutdown, how long in-flight reconciles may finish, the Lease still held, before it is
    /// released.
    pub drain: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot use Lease {namespace}/{name}: {detail}")]
    Lease {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("lost the leader Lease; stopping so that a standby takes over")]
    Lost,
}

impl LeaderError {
    pub fn reason(&self) -> crate::api::conditions::Reason {
        use crate::api::conditions::Reason;
        match self {
            Self::Lease { .. } => Reason::LeaseError,
            Self::Lost => Reason::LeaseLost,
        }
    }
}

/// Waits for the lease, then runs the controller while holding it, until `shutdown` or until the
/// lease is lost.
pub async fn run_as_leader(
    client: kube::Client,
    source: Arc<dyn SecretSource>,
    settings: Settings,
    metrics: Arc<Metrics>,
    leader: LeaderSettings,
    readiness: crate::health::Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), LeaderError> {
    let lease_error = |detail: String| LeaderError::Lease {
        namespace: leader.namespace.clone(),
        name: leader.lease_name.clone(),
        detail,
    };
    let duration = leader.duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), &leader.lease_name)
        .with_namespace(&leader.namespace)
        .with_identity(&leader.identity)
        .with_duration(duration)
        // Renew at half the duration: a renewal that a busy API server or a starved process delays
        // by several seconds still lands before expiry (at a third, an 8 s lease was lost under
        // the suite's load, and a leader that loses its Lease exits).
        .with_grace((duration / 2).max(1))
        // One field manager per replica: kube-lease-manager takes a free Lease with a server-side
        // apply of `holderIdentity`, and only distinct managers make the second replica's apply
        // a conflict. With one manager for all, two replicas starting together both "acquired" it
        // (seen in the HA test: both reconciled for a lease duration).
        .with_field_manager(format!("{FIELD_MANAGER}-{}", leader.identity))
        .build()
        .await
        .map_err(|error| lease_error(error.to_string()))?;
    let (mut is_leader, lease_task) = watch_fenced(manager);
    tokio::pin!(shutdown);
    // A standby is ready: it serves, and takes over when the leader goes.
    readiness.set(true);

    info!(identity = %leader.identity, lease = %leader.lease_name, "waiting for the leader Lease");
    loop {
        if *is_leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => {
                drop(is_leader);
                let _ = lease_task.await;
                return Ok(());
            }
            changed = is_leader.changed() => {
                if changed.is_err() {
                    return Err(lease_error("the lease manager stopped".into()));
                }
            }
        }
    }
    info!(identity = %leader.identity, "acquired the leader Lease; reconciling");
    metrics.leader.set(1);

    let outcome = {
        let lost = async {
            loop {
                if is_leader.changed().await.is_err() || !*is_leader.borrow_and_update() {
                    return;
                }
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let controller = controller::run(
            client,
            source,
            settings,
            metrics.clone(),
            readiness,
            async {
                let _ = stopped.await;
            },
        );
        tokio::pin!(controller);
        tokio::select! {
            _ = &mut controller => Ok(()),
            // Another operator may hold the Lease now: dropping the controller future cancels every
            // reconcile in flight, so nothing is written after this. Each step is safe to cut
            // (server-side apply, restart tokens): the new leader finishes what was begun.
            _ = lost => {
                warn!(identity = %leader.identity, "lost the leader Lease");
                Err(LeaderError::Lost)
            }
            // Shutdown: in-flight reconciles finish while the Lease is still held (so no other
            // operator writes meanwhile), for at most `drain`; then the Lease is released.
            _ = &mut shutdown => {
                let _ = stop.send(());
                let drain = leader.drain;
                if tokio::time::timeout(drain, &mut controller).await.is_err() {
                    warn!(?drain, "in-flight reconciles did not finish within the drain bound");
                }
                Ok(())
            }
        }
    };
    metrics.leader.set(0);
    // Closing the channel makes the lease manager release the Lease, so a standby need not wait
    // for it to expire.
    drop(is_leader);
    let _ = lease_task.await;
    outcome
}

/// Drives the lease manager and reports whether this replica leads, fenced: kube-lease-manager's
/// own `watch` logs an API error and retries while still reporting the last state, so a leader
/// whose renewals are refused or unanswered would go on writing after its Lease expired and
/// another replica took it. Here an error while leading reports `false` at once: the replica stops
/// writing before anyone else can hold the Lease. When the receiver is dropped, the Lease is
/// released (if still ours) and the task ends.
fn watch_fenced(
    manager: LeaseManager,
) -> (
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, receiver) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut leading = false;
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                biased;
                () = sender.closed() => {
                    if let Err(error) = manager.release().await {
                        warn!(%error, "could not release the leader Lease; it expires by itself");
                    }
                    return;
                }
                changed = manager.changed() => match changed {
                    Ok(is_holder) => {
                        leading = is_holder;
                        backoff = Duration::from_millis(500);
                        let _ = sender.send(is_holder);
                    }
                    Err(error) if leading => {
                        warn!(%error, "cannot renew the leader Lease; stepping down before it can expire");
                        leading = false;
                        let _ = sender.send(false);
                    }
                    Err(error) => {
                        warn!(%error, "cannot read the leader Lease; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    });
    (receiver, task)
}
