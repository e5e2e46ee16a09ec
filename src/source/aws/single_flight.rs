//! Single flight: a read of a secret that is already being read waits for that read's answer.

use crate::lock;

use super::{FetchedSecret, SecretRef, SecretsManagerSource, SourceError, VersionSelector};

impl SecretsManagerSource {
    /// A read, coalesced with identical reads in progress (single flight), batched when it asks
    /// for AWSCURRENT.
    pub(super) async fn read(&self, secret: &SecretRef) -> Result<FetchedSecret, SourceError> {
        let waiting = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get_mut(secret) {
                Some(waiters) => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    waiters.push(reply);
                    Some(answer)
                }
                None => {
                    in_flight.insert(secret.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(answer) = waiting {
            return answer.await.unwrap_or_else(|_| {
                Err(SourceError::Unavailable {
                    secret_id: secret.secret_id.clone(),
                    detail: "the shared read was cancelled".into(),
                })
            });
        }
        let batchable = secret.version == VersionSelector::Stage("AWSCURRENT".into())
            && !self.batch_refused(&secret.scope());
        let result = if batchable {
            self.batched(secret).await
        } else {
            self.get(secret).await
        };
        let waiters = lock(&self.in_flight).remove(secret).unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        result
    }
}
