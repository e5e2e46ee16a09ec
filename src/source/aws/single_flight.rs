//! Single flight: a read of a secret that is already being read waits for that read's answer.
//!
//! The coalescing itself ([`SingleFlight`]) knows nothing of AWS, so it is tested on its own with
//! an in-memory fake; [`SecretsManagerSource::read`] puts it in front of the batched or single
//! read.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::lock;

use super::{FetchedSecret, SecretRef, SecretsManagerSource, SourceError, VersionSelector};

/// Work in progress per key, with the callers waiting for its answer.
pub(super) struct SingleFlight<K, V> {
    in_flight: Mutex<HashMap<K, Vec<oneshot::Sender<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub(super) fn new() -> Self {
        Self {
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// `work`'s answer for `key`: done by the first caller, shared with every caller that asks
    /// while it runs. If the first caller is dropped before it answers, its waiters get
    /// `cancelled()` at once and the next caller starts afresh: nobody waits for a read that no
    /// one is doing.
    pub(super) async fn run<F: Future<Output = V>>(
        &self,
        key: &K,
        work: impl FnOnce() -> F,
        cancelled: impl FnOnce() -> V,
    ) -> V {
        let waiting = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get_mut(key) {
                Some(waiters) => {
                    let (reply, answer) = oneshot::channel();
                    waiters.push(reply);
                    Some(answer)
                }
                None => {
                    in_flight.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(answer) = waiting {
            return answer.await.unwrap_or_else(|_| cancelled());
        }
        let leading = Leading { flight: self, key };
        let value = work().await;
        for waiter in leading.finish() {
            let _ = waiter.send(value.clone());
        }
        value
    }

    #[cfg(test)]
    fn in_progress(&self) -> usize {
        lock(&self.in_flight).len()
    }
}

/// The first caller's claim on a key: released when it answers, or when it is dropped (its
/// waiters' channels close with it).
struct Leading<'a, K: Eq + Hash, V> {
    flight: &'a SingleFlight<K, V>,
    key: &'a K,
}

impl<K: Eq + Hash, V> Leading<'_, K, V> {
    fn finish(self) -> Vec<oneshot::Sender<V>> {
        let waiters = lock(&self.flight.in_flight)
            .remove(self.key)
            .unwrap_or_default();
        std::mem::forget(self);
        waiters
    }
}

impl<K: Eq + Hash, V> Drop for Leading<'_, K, V> {
    fn drop(&mut self) {
        lock(&self.flight.in_flight).remove(self.key);
    }
}

impl SecretsManagerSource {
    /// A read for namespace `flow`, coalesced with identical reads in progress (single flight:
    /// the first caller's flow queues it), batched when it asks for AWSCURRENT.
    pub(super) async fn read(
        &self,
        secret: &SecretRef,
        flow: &str,
    ) -> Result<FetchedSecret, SourceError> {
        self.single_flight
            .run(
                secret,
                || async {
                    let batchable = secret.version == VersionSelector::Stage("AWSCURRENT".into())
                        && !self.batch_refused(&secret.scope());
                    if batchable {
                        self.batched(secret, flow).await
                    } else {
                        self.get(secret).await
                    }
                },
                || {
                    Err(SourceError::Unavailable {
                        secret_id: secret.secret_id.clone(),
                        detail: "the shared read was cancelled".into(),
                    })
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The in-memory fake: counts the work done per call and answers what it was asked.
    async fn counted(calls: &AtomicUsize, key: &str) -> String {
        calls.fetch_add(1, Ordering::SeqCst);
        // Let every other caller arrive while the work is in progress.
        tokio::task::yield_now().await;
        format!("value of {key}")
    }

    #[tokio::test]
    async fn concurrent_reads_of_one_key_do_the_work_once_and_share_the_answer() {
        let flight = SingleFlight::<String, String>::new();
        let calls = AtomicUsize::new(0);
        let key = "payments/client".to_string();
        let answers = futures::future::join_all(
            (0..10).map(|_| flight.run(&key, || counted(&calls, &key), || "cancelled".to_string())),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            answers
                .iter()
                .all(|answer| answer == "value of payments/client")
        );
        assert_eq!(
            flight.in_progress(),
            0,
            "the key is released after the answer"
        );
    }

    #[tokio::test]
    async fn distinct_keys_are_not_coalesced() {
        let flight = SingleFlight::<String, String>::new();
        let calls = AtomicUsize::new(0);
        let keys: Vec<String> = (0..5).map(|n| format!("ns/secret-{n}")).collect();
        let answers = futures::future::join_all(
            keys.iter()
                .map(|key| flight.run(key, || counted(&calls, key), || "cancelled".to_string())),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(answers[3], "value of ns/secret-3");
    }

    #[tokio::test]
    async fn a_read_after_the_answer_does_the_work_again() {
        let flight = SingleFlight::<String, String>::new();
        let calls = AtomicUsize::new(0);
        let key = "ns/secret".to_string();
        for _ in 0..3 {
            flight
                .run(&key, || counted(&calls, &key), || "cancelled".to_string())
                .await;
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "single flight is not a cache"
        );
    }

    #[tokio::test]
    async fn a_dropped_first_caller_does_not_strand_its_waiters() {
        let flight = SingleFlight::<String, String>::new();
        let key = "ns/secret".to_string();
        let mut leader = Box::pin(flight.run(&key, futures::future::pending::<String>, || {
            "cancelled".to_string()
        }));
        assert!(futures::poll!(leader.as_mut()).is_pending());
        let mut waiter = Box::pin(flight.run(
            &key,
            || async { "the waiter did the work".to_string() },
            || "cancelled".to_string(),
        ));
        assert!(
            futures::poll!(waiter.as_mut()).is_pending(),
            "it waits for the leader"
        );
        drop(leader);
        // Answered at once, not left waiting for a flush (or read) that no one is doing.
        assert_eq!(
            futures::poll!(waiter.as_mut()),
            std::task::Poll::Ready("cancelled".to_string())
        );
        assert_eq!(flight.in_progress(), 0);
        let calls = AtomicUsize::new(0);
        let next = flight
            .run(&key, || counted(&calls, &key), || "cancelled".to_string())
            .await;
        assert_eq!(next, "value of ns/secret", "the next caller starts afresh");
    }
}
