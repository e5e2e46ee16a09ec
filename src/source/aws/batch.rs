//! Batching: AWSCURRENT reads of one scope gathered into BatchGetSecretValue calls of up to 20 ids.
//! A scope's chunks are sent one after another, and each chunk is filled from the namespaces
//! waiting in turn (a [`FairQueue`] per scope). A namespace with a thousand reads queued delays
//! another namespace's read by at most one chunk, not by fifty.
//!
//! The gathering ([`Batcher`]: who joins which batch, when a batch is sent, who gets which
//! answer) knows nothing of AWS, so it is tested on its own with an in-memory fake;
//! [`SecretsManagerSource::batched`] gives it the call that answers a chunk.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::fair::FairQueue;
use crate::lock;

use super::classify::{classify_code, with_secret_id};
use super::{
    FetchedSecret, Operation, Scope, SecretContent, SecretRef, SecretsManagerSource, SourceError,
};

/// BatchGetSecretValue takes at most 20 ids.
pub(super) const BATCH_MAX: usize = 20;
/// The first read of a batch waits for others to join it: until none joined for two steps, the
/// batch is full, or the window is over.
pub(super) const BATCH_STEP: Duration = Duration::from_millis(20);
const BATCH_WINDOW: Duration = Duration::from_millis(200);

/// One scope's waiting items, per flow (the namespace each is read for), and whether a caller is
/// flushing them.
struct Queue<K, V> {
    waiting: FairQueue<String, (K, oneshot::Sender<V>)>,
    flushing: bool,
}

impl<K, V> Default for Queue<K, V> {
    fn default() -> Self {
        Self {
            waiting: FairQueue::default(),
            flushing: false,
        }
    }
}

/// Items gathered per scope into chunks of at most `max`, each answered by one call.
pub(super) struct Batcher<S, K, V> {
    queues: Mutex<HashMap<S, Queue<K, V>>>,
    max: usize,
}

impl<S: Eq + Hash + Clone, K, V> Batcher<S, K, V> {
    pub(super) fn new(max: usize) -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// Joins `scope`'s batch in `flow`'s queue and waits for `key`'s answer. The caller that opens
    /// a batch waits a moment for others, then sends every queued item with `answer` in chunks of
    /// at most `max`, each chunk taking one item per flow in turn; `answer` gives one value per
    /// key, in order. If that caller is dropped, the items still queued get `cancelled()` and the
    /// scope's next caller opens a new batch.
    pub(super) async fn join<F, Fut>(
        &self,
        scope: &S,
        flow: &str,
        key: K,
        answer: F,
        cancelled: impl FnOnce() -> V,
    ) -> V
    where
        F: Fn(Vec<K>) -> Fut,
        Fut: Future<Output = Vec<V>>,
    {
        let (reply, answered) = oneshot::channel();
        let flush = {
            let mut queues = lock(&self.queues);
            let queue = queues.entry(scope.clone()).or_default();
            queue.waiting.push(flow.to_string(), (key, reply));
            !std::mem::replace(&mut queue.flushing, true)
        };
        if flush {
            let flushing = Flushing {
                batcher: self,
                scope,
            };
            // Each chunk gets its own window to fill: during a cold start items keep arriving
            // while the previous chunk is sent, and a partial chunk sent at once would split the
            // rest.
            loop {
                self.wait_for_batch(scope).await;
                let chunk: Vec<(K, oneshot::Sender<V>)> = {
                    let mut queues = lock(&self.queues);
                    let queue = queues.entry(scope.clone()).or_default();
                    if queue.waiting.is_empty() {
                        // Nothing kept for an idle scope: the map holds only scopes being read.
                        queues.remove(scope);
                        break;
                    }
                    std::iter::from_fn(|| queue.waiting.pop().map(|(_, item)| item))
                        .take(self.max)
                        .collect()
                };
                let (keys, replies): (Vec<K>, Vec<_>) = chunk.into_iter().unzip();
                let mut answers = answer(keys).await.into_iter();
                // A reply without its answer is dropped: that caller gets `cancelled()`.
                for reply in replies {
                    if let Some(value) = answers.next() {
                        let _ = reply.send(value);
                    }
                }
            }
            std::mem::forget(flushing);
        }
        answered.await.unwrap_or_else(|_| cancelled())
    }

    fn queued(&self, scope: &S) -> usize {
        lock(&self.queues)
            .get(scope)
            .map_or(0, |queue| queue.waiting.len())
    }

    /// Waits until `scope`'s queue holds a full batch, nobody joined for two steps, or the window
    /// is over.
    async fn wait_for_batch(&self, scope: &S) {
        let opened = std::time::Instant::now();
        let mut queued = self.queued(scope);
        let mut quiet = 0;
        while queued < self.max && opened.elapsed() < BATCH_WINDOW {
            tokio::time::sleep(BATCH_STEP).await;
            let now_queued = self.queued(scope);
            // Two quiet steps in a row: nobody else is coming.
            if now_queued == queued {
                quiet += 1;
                if quiet >= 2 {
                    break;
                }
            } else {
                quiet = 0;
            }
            queued = now_queued;
        }
    }
}

/// The flushing caller's claim on a scope: if it is dropped mid-flush, the queue is emptied (its
/// callers' channels close) and released, so nobody waits for a flush that no one is doing.
struct Flushing<'a, S: Eq + Hash, K, V> {
    batcher: &'a Batcher<S, K, V>,
    scope: &'a S,
}

impl<S: Eq + Hash, K, V> Drop for Flushing<'_, S, K, V> {
    fn drop(&mut self) {
        lock(&self.batcher.queues).remove(self.scope);
    }
}

impl SecretsManagerSource {
    pub(super) fn batch_refused(&self, scope: &Scope) -> bool {
        lock(&self.batch_refused).contains(scope)
    }

    /// An AWSCURRENT read for namespace `flow`, gathered with the scope's other AWSCURRENT reads
    /// into BatchGetSecretValue calls.
    pub(super) async fn batched(
        &self,
        secret: &SecretRef,
        flow: &str,
    ) -> Result<FetchedSecret, SourceError> {
        let scope = secret.scope();
        self.batches
            .join(
                &scope,
                flow,
                secret.clone(),
                |chunk| self.send_batch(&scope, chunk),
                || {
                    Err(SourceError::Unavailable {
                        secret_id: secret.secret_id.clone(),
                        detail: "the batched read was cancelled".into(),
                    })
                },
            )
            .await
    }

    /// One chunk's answers, in its order: one BatchGetSecretValue, or reads one by one where a
    /// batch is pointless (one id) or refused.
    async fn send_batch(
        &self,
        scope: &Scope,
        chunk: Vec<SecretRef>,
    ) -> Vec<Result<FetchedSecret, SourceError>> {
        if chunk.len() == 1 || self.batch_refused(scope) {
            return self.get_each(&chunk).await;
        }
        let ids: Vec<String> = chunk.iter().map(|s| s.secret_id.clone()).collect();
        let subject = ids.join(",");
        let result = match self.client(scope, &subject).await {
            Ok(client) => {
                let request = client
                    .batch_get_secret_value()
                    .set_secret_id_list(Some(ids.clone()));
                self.call(scope, Operation::BatchGet, &subject, || {
                    request.clone().send()
                })
                .await
            }
            Err(error) => Err(error),
        };
        let output = match result {
            Ok(output) => output,
            Err(failure) => {
                if matches!(failure, SourceError::AccessDenied { .. }) {
                    // The role lacks secretsmanager:BatchGetSecretValue: one by one from now on.
                    tracing::warn!(
                        region = scope.region,
                        role = scope.role.as_ref().map(|role| role.arn.as_str()),
                        "BatchGetSecretValue refused; reading secrets one by one (grant \
                         secretsmanager:BatchGetSecretValue to batch)"
                    );
                    lock(&self.batch_refused).insert(scope.clone());
                }
                if whole_batch_failure_may_be_one_ids(&failure) {
                    // A chunk mixes namespaces: one tenant's id must not fail the others' reads.
                    return self.get_each(&chunk).await;
                }
                return chunk
                    .iter()
                    .map(|secret| Err(with_secret_id(&failure, &secret.secret_id)))
                    .collect();
            }
        };
        let values = output.secret_values();
        let errors = output.errors();
        let mut answers: Vec<Option<Result<FetchedSecret, SourceError>>> = chunk
            .iter()
            .map(|secret| {
                let id = secret.secret_id.as_str();
                let answered = values.iter().find(|value| {
                    value.name() == Some(id)
                        || value.arn() == Some(id)
                        || value.arn().is_some_and(|arn| {
                            arn.strip_prefix(id)
                                .is_some_and(|rest| rest.len() == 7 && rest.starts_with('-'))
                        })
                });
                if let Some(value) = answered {
                    Some(fetched_from_batch(id, value))
                } else {
                    errors
                        .iter()
                        .find(|e| e.secret_id() == Some(id))
                        .map(|error| {
                            Err(classify_code(
                                id,
                                error.error_code().unwrap_or_default(),
                                error.message().unwrap_or_default(),
                            ))
                        })
                }
            })
            .collect();
        // Not in the answer (an id form the batch did not echo): read those alone, together.
        let unanswered: Vec<SecretRef> = chunk
            .iter()
            .zip(&answers)
            .filter(|(_, answer)| answer.is_none())
            .map(|(secret, _)| secret.clone())
            .collect();
        let mut alone = self.get_each(&unanswered).await.into_iter();
        for answer in &mut answers {
            if answer.is_none() {
                *answer = alone.next();
            }
        }
        chunk
            .iter()
            .zip(answers)
            .map(|(secret, answer)| {
                answer.unwrap_or_else(|| {
                    Err(SourceError::Unavailable {
                        secret_id: secret.secret_id.clone(),
                        detail: "the read alone gave no answer".into(),
                    })
                })
            })
            .collect()
    }

    /// Reads one by one, all at once (each still admitted by the scope's rate and in-flight
    /// limit): one slow or held read does not hold back the others of its chunk.
    async fn get_each(&self, secrets: &[SecretRef]) -> Vec<Result<FetchedSecret, SourceError>> {
        futures::future::join_all(secrets.iter().map(|secret| self.get(secret))).await
    }
}

/// A failure of the whole BatchGetSecretValue call that one id of the chunk may have caused (a
/// denial or a refused id): worth reading each alone. Throttling, an unreachable endpoint and a
/// refused role are the scope's, the same for every id: reading alone would only multiply calls.
fn whole_batch_failure_may_be_one_ids(failure: &SourceError) -> bool {
    matches!(
        failure,
        SourceError::AccessDenied { .. } | SourceError::NotFound { .. }
    )
}

/// One secret's value as BatchGetSecretValue gave it.
fn fetched_from_batch(
    id: &str,
    value: &aws_sdk_secretsmanager::types::SecretValueEntry,
) -> Result<FetchedSecret, SourceError> {
    let content = match (value.secret_string(), value.secret_binary()) {
        (Some(text), _) => SecretContent::Text(text.to_string()),
        (None, Some(blob)) => SecretContent::Binary(blob.as_ref().to_vec()),
        (None, None) => {
            return Err(SourceError::Empty {
                secret_id: id.to_string(),
            });
        }
    };
    match (value.arn(), value.name(), value.version_id()) {
        (Some(arn), Some(name), Some(version_id)) => Ok(FetchedSecret {
            arn: arn.to_string(),
            name: name.to_string(),
            version_id: version_id.to_string(),
            content,
        }),
        _ => Err(SourceError::Unavailable {
            secret_id: id.to_string(),
            detail: "BatchGetSecretValue answered without an ARN, Name or VersionId".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-memory fake: records each chunk it is asked for and answers every key.
    async fn answer_all(chunks: &Mutex<Vec<Vec<String>>>, chunk: Vec<String>) -> Vec<String> {
        lock(chunks).push(chunk.clone());
        tokio::task::yield_now().await;
        chunk
            .into_iter()
            .map(|key| format!("value of {key}"))
            .collect()
    }

    fn cancelled() -> String {
        "cancelled".to_string()
    }

    #[tokio::test]
    async fn reads_arriving_together_go_in_chunks_of_at_most_max_and_each_gets_its_own_answer() {
        let batcher = Batcher::<&str, String, String>::new(BATCH_MAX);
        let chunks = Mutex::new(Vec::new());
        let keys: Vec<String> = (0..45).map(|n| format!("ns/secret-{n}")).collect();
        let answers = futures::future::join_all(keys.iter().map(|key| {
            batcher.join(
                &"eu-west-1",
                "ns",
                key.clone(),
                |chunk| answer_all(&chunks, chunk),
                cancelled,
            )
        }))
        .await;
        let sizes: Vec<usize> = lock(&chunks).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![20, 20, 5]);
        for (key, answer) in keys.iter().zip(&answers) {
            assert_eq!(answer, &format!("value of {key}"));
        }
        assert_eq!(batcher.queued(&"eu-west-1"), 0);
    }

    #[tokio::test]
    async fn scopes_are_batched_apart() {
        let batcher = Batcher::<&str, String, String>::new(BATCH_MAX);
        let chunks = Mutex::new(Vec::new());
        let reads = [("eu-west-1", "a"), ("us-east-1", "b"), ("eu-west-1", "c")];
        let answers = futures::future::join_all(reads.iter().map(|(scope, key)| {
            batcher.join(
                scope,
                "ns",
                key.to_string(),
                |chunk| answer_all(&chunks, chunk),
                cancelled,
            )
        }))
        .await;
        assert_eq!(answers, ["value of a", "value of b", "value of c"]);
        let mut chunks = lock(&chunks).clone();
        chunks.sort();
        assert_eq!(
            chunks,
            vec![
                vec!["a".to_string(), "c".to_string()],
                vec!["b".to_string()]
            ]
        );
        assert!(
            lock(&batcher.queues).is_empty(),
            "a scope with nothing to read keeps no queue"
        );
    }

    #[tokio::test]
    async fn a_key_the_answer_leaves_out_is_cancelled_not_stranded() {
        let batcher = Batcher::<&str, String, String>::new(BATCH_MAX);
        let answers = futures::future::join_all(["a", "b"].iter().map(|key| {
            batcher.join(
                &"eu-west-1",
                "ns",
                key.to_string(),
                |chunk: Vec<String>| async move { vec![format!("value of {}", chunk[0])] },
                cancelled,
            )
        }))
        .await;
        assert_eq!(answers, ["value of a", "cancelled"]);
    }

    #[tokio::test]
    async fn a_dropped_flusher_does_not_strand_the_reads_queued_behind_it() {
        let batcher = Batcher::<&str, String, String>::new(BATCH_MAX);
        let mut flusher = Box::pin(batcher.join(
            &"eu-west-1",
            "ns",
            "a".to_string(),
            |_chunk: Vec<String>| futures::future::pending::<Vec<String>>(),
            cancelled,
        ));
        assert!(futures::poll!(flusher.as_mut()).is_pending());
        let mut queued = Box::pin(batcher.join(
            &"eu-west-1",
            "ns",
            "b".to_string(),
            |chunk: Vec<String>| async move { chunk },
            cancelled,
        ));
        assert!(
            futures::poll!(queued.as_mut()).is_pending(),
            "it waits for the flusher"
        );
        drop(flusher);
        // Answered at once, not left waiting for a flush (or read) that no one is doing.
        assert_eq!(
            futures::poll!(queued.as_mut()),
            std::task::Poll::Ready("cancelled".to_string())
        );
        let chunks = Mutex::new(Vec::new());
        let next = batcher
            .join(
                &"eu-west-1",
                "ns",
                "c".to_string(),
                |chunk| answer_all(&chunks, chunk),
                cancelled,
            )
            .await;
        assert_eq!(next, "value of c", "the next read opens a new batch");
        assert_eq!(*lock(&chunks), vec![vec!["c".to_string()]]);
    }

    #[tokio::test]
    async fn each_chunk_takes_the_waiting_namespaces_in_turn() {
        let batcher = Batcher::<&str, String, String>::new(BATCH_MAX);
        let chunks = Mutex::new(Vec::new());
        // 60 reads of one namespace queued before one of another.
        let mut reads: Vec<(&str, String)> = (0..60)
            .map(|n| ("payments", format!("payments/secret-{n}")))
            .collect();
        reads.push(("billing", "billing/client".to_string()));
        let answers = futures::future::join_all(reads.iter().map(|(flow, key)| {
            batcher.join(
                &"eu-west-1",
                flow,
                key.clone(),
                |chunk| answer_all(&chunks, chunk),
                cancelled,
            )
        }))
        .await;
        assert!(answers.iter().all(|answer| answer.starts_with("value of")));
        let chunks = lock(&chunks).clone();
        assert_eq!(chunks.len(), 4, "61 reads, 20 per chunk");
        assert!(
            chunks[0].contains(&"billing/client".to_string()),
            "the other namespace's read is in the first chunk, not behind 60: {:?}",
            chunks[0]
        );
    }
}
