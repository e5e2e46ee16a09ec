//! Batching: AWSCURRENT reads of one scope gathered into BatchGetSecretValue calls of up to 20 ids.

use crate::lock;

use super::classify::{classify_code, with_secret_id};
use super::{
    FetchedSecret, Operation, Reply, Scope, SecretContent, SecretRef, SecretsManagerSource,
    SourceError,
};

/// Reads waiting for a batch, and whether a caller is flushing them.
pub(super) type BatchQueue = (Vec<(SecretRef, Reply)>, bool);

/// BatchGetSecretValue takes at most 20 ids.
const BATCH_MAX: usize = 20;
/// The first read of a batch waits for others to join it: until none joined for one step, the
/// batch is full, or the window is over.
pub(super) const BATCH_STEP: std::time::Duration = std::time::Duration::from_millis(20);
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

impl SecretsManagerSource {
    pub(super) fn batch_refused(&self, scope: &Scope) -> bool {
        lock(&self.batch_refused).contains(scope)
    }

    /// Joins the scope's batch; the caller that opened it waits a moment for others, then sends
    /// every queued read in BatchGetSecretValue calls of up to 20.
    pub(super) async fn batched(&self, secret: &SecretRef) -> Result<FetchedSecret, SourceError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let scope = secret.scope();
        let flush = {
            let mut batches = lock(&self.batches);
            let (queue, flushing) = batches.entry(scope.clone()).or_default();
            queue.push((secret.clone(), reply));
            !std::mem::replace(flushing, true)
        };
        if flush {
            // Each chunk gets its own window to fill: during a cold start reads keep arriving while
            // the previous chunk is sent, and a partial chunk sent at once would split the rest.
            loop {
                self.wait_for_batch(&scope).await;
                let chunk: Vec<(SecretRef, Reply)> = {
                    let mut batches = lock(&self.batches);
                    let (queue, flushing) = batches.entry(scope.clone()).or_default();
                    if queue.is_empty() {
                        *flushing = false;
                        break;
                    }
                    let take = queue.len().min(BATCH_MAX);
                    queue.drain(..take).collect()
                };
                self.send_batch(&scope, chunk).await;
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(SourceError::Unavailable {
                secret_id: secret.secret_id.clone(),
                detail: "the batched read was cancelled".into(),
            })
        })
    }

    /// Waits until `scope`'s queue holds a full batch, nobody joined for two steps, or the window
    /// is over.
    pub(super) async fn wait_for_batch(&self, scope: &Scope) {
        let opened = std::time::Instant::now();
        let queued_now = || {
            lock(&self.batches)
                .get(scope)
                .map_or(0, |(queue, _)| queue.len())
        };
        let mut queued = queued_now();
        let mut quiet = 0;
        while queued < BATCH_MAX && opened.elapsed() < BATCH_WINDOW {
            tokio::time::sleep(BATCH_STEP).await;
            let now_queued = queued_now();
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

    pub(super) async fn send_batch(&self, scope: &Scope, chunk: Vec<(SecretRef, Reply)>) {
        if chunk.len() == 1 || self.batch_refused(scope) {
            for (secret, reply) in chunk {
                let _ = reply.send(self.get(&secret).await);
            }
            return;
        }
        let ids: Vec<String> = chunk.iter().map(|(s, _)| s.secret_id.clone()).collect();
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
                for (secret, reply) in chunk {
                    let answer = match &failure {
                        SourceError::AccessDenied { .. } => self.get(&secret).await,
                        other => Err(with_secret_id(other, &secret.secret_id)),
                    };
                    let _ = reply.send(answer);
                }
                return;
            }
        };
        let values = output.secret_values();
        let errors = output.errors();
        for (secret, reply) in chunk {
            let id = secret.secret_id.as_str();
            let answered = values.iter().find(|value| {
                value.name() == Some(id)
                    || value.arn() == Some(id)
                    || value.arn().is_some_and(|arn| {
                        arn.strip_prefix(id)
                            .is_some_and(|rest| rest.len() == 7 && rest.starts_with('-'))
                    })
            });
            let answer = if let Some(value) = answered {
                let content = match (value.secret_string(), value.secret_binary()) {
                    (Some(text), _) => Ok(SecretContent::Text(text.to_string())),
                    (None, Some(blob)) => Ok(SecretContent::Binary(blob.as_ref().to_vec())),
                    (None, None) => Err(SourceError::Empty {
                        secret_id: id.to_string(),
                    }),
                };
                match (content, value.arn(), value.name(), value.version_id()) {
                    (Ok(content), Some(arn), Some(name), Some(version_id)) => Ok(FetchedSecret {
                        arn: arn.to_string(),
                        name: name.to_string(),
                        version_id: version_id.to_string(),
                        content,
                    }),
                    (Err(error), ..) => Err(error),
                    _ => Err(SourceError::Unavailable {
                        secret_id: id.to_string(),
                        detail: "BatchGetSecretValue answered without an ARN, Name or VersionId"
                            .into(),
                    }),
                }
            } else if let Some(error) = errors.iter().find(|e| e.secret_id() == Some(id)) {
                Err(classify_code(
                    id,
                    error.error_code().unwrap_or_default(),
                    error.message().unwrap_or_default(),
                ))
            } else {
                // Not in the answer (an id form the batch did not echo): read it alone.
                self.get(&secret).await
            };
            let _ = reply.send(answer);
        }
    }
}
