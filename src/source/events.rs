//! The fast path of change detection: an SQS queue fed by an EventBridge rule on Secrets Manager's
//! events. Each message names a secret; the fleet checks that secret's version now (DescribeSecret)
//! and reconciles exactly its identities when it changed. Messages are hints, never trusted for the
//! version: duplicates and reordering are harmless. Malformed or unknown messages are counted and
//! deleted; an unreachable queue is logged and retried while the sweep carries on. Every answer of
//! the queue (messages or an empty long poll) keeps it healthy for a minute, and while it is healthy
//! the sweep checks each secret at its identities' refresh interval only ([`Fleet::events_answered`]);
//! a failed receive tightens the sweep back at once ([`Fleet::events_failed`]).

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::error::ProvideErrorMetadata;
use tracing::{info, warn};

use super::fleet::Fleet;
use crate::api::conditions::Outcome;

/// The queue to consume.
#[derive(Clone, Debug)]
pub struct EventQueue {
    pub url: String,
    pub client: aws_sdk_sqs::Client,
}

/// Why a message was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not JSON")]
    NotJson,
    #[error("not a Secrets Manager event")]
    NotSecretsManager,
    #[error("names no secret")]
    NoSecret,
    #[error("names more than {MAX_SECRETS_PER_EVENT} secrets (a Secrets Manager event names one)")]
    TooManySecrets,
}

/// The most secrets one message may name: each one costs a version check, and a Secrets Manager
/// event names one (its `resources` hold that secret's ARN).
pub const MAX_SECRETS_PER_EVENT: usize = 10;

/// The secrets (names or ARNs) a queue message is about. Accepts the EventBridge envelope of
/// Secrets Manager's own events (`detail.name`, `detail.secretId`, `detail.arn`), of CloudTrail API
/// calls (`detail.requestParameters.secretId`, `detail.responseElements.arn`), and its `resources`.
pub fn secrets_in(body: &str) -> Result<Vec<String>, Rejected> {
    let event: serde_json::Value = serde_json::from_str(body).map_err(|_| Rejected::NotJson)?;
    if event.get("source").and_then(|s| s.as_str()) != Some("aws.secretsmanager") {
        return Err(Rejected::NotSecretsManager);
    }
    let detail = event.get("detail");
    let text = |value: Option<&serde_json::Value>| {
        value
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 2048)
            .map(str::to_string)
    };
    let mut secrets: Vec<String> = [
        text(detail.and_then(|d| d.get("name"))),
        text(detail.and_then(|d| d.get("secretId"))),
        text(detail.and_then(|d| d.get("arn"))),
        text(detail.and_then(|d| d.pointer("/requestParameters/secretId"))),
        text(detail.and_then(|d| d.pointer("/responseElements/arn"))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Some(resources) = event.get("resources").and_then(|r| r.as_array()) {
        if resources.len() > MAX_SECRETS_PER_EVENT {
            return Err(Rejected::TooManySecrets);
        }
        secrets.extend(resources.iter().filter_map(|r| text(Some(r))));
    }
    secrets.sort();
    secrets.dedup();
    if secrets.is_empty() {
        return Err(Rejected::NoSecret);
    }
    Ok(secrets)
}

/// Long-polls the queue until `shutdown`, handing each named secret to the fleet.
pub async fn run(
    fleet: Arc<Fleet>,
    queue: EventQueue,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let count = |outcome: Outcome| {
        if let Some(metrics) = &metrics {
            metrics.record_event(outcome);
        }
    };
    let mut failing = false;
    let mut backoff = Duration::from_secs(1);
    info!(queue = %queue.url, "consuming change events");
    loop {
        let received = tokio::select! {
            _ = &mut shutdown => return,
            received = queue
                .client
                .receive_message()
                .queue_url(&queue.url)
                .max_number_of_messages(10)
                .wait_time_seconds(20)
                .send() => received,
        };
        let output = match received {
            Ok(output) => {
                fleet.events_answered(std::time::Instant::now());
                output
            }
            Err(error) => {
                fleet.events_failed();
                count(Outcome::QueueError);
                if !failing {
                    warn!(
                        queue = %queue.url,
                        code = error.code().unwrap_or("unreachable"),
                        "cannot receive change events; the sweep carries on, retrying"
                    );
                }
                failing = true;
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(backoff) => {},
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if failing {
            info!(queue = %queue.url, "receiving change events again");
            failing = false;
        }
        backoff = Duration::from_secs(1);
        for message in output.messages() {
            count(Outcome::Received);
            match secrets_in(message.body().unwrap_or_default()) {
                Ok(secrets) => {
                    let mut matched = 0;
                    for secret in &secrets {
                        matched += fleet.changed(secret).await;
                    }
                    count(if matched > 0 {
                        Outcome::Handled
                    } else {
                        Outcome::UnknownSecret
                    });
                }
                Err(rejected) => {
                    count(Outcome::Rejected);
                    warn!(reason = %rejected, "dropping a change event");
                }
            }
            // Handled, unknown or malformed: never redelivered, never blocking the queue.
            if let Some(handle) = message.receipt_handle()
                && let Err(error) = queue
                    .client
                    .delete_message()
                    .queue_url(&queue.url)
                    .receipt_handle(handle)
                    .send()
                    .await
            {
                warn!(
                    code = error.code().unwrap_or("unreachable"),
                    "cannot delete a handled event"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_secret_from_each_event_shape() {
        let native = r#"{"source":"aws.secretsmanager","detail-type":"Secret Label Updated",
            "detail":{"name":"payments/api","labelUpdated":"AWSCURRENT","versionId":"v2"}}"#;
        assert_eq!(secrets_in(native), Ok(vec!["payments/api".to_string()]));
        let cloudtrail = r#"{"source":"aws.secretsmanager","detail-type":"AWS API Call via CloudTrail",
            "detail":{"eventName":"PutSecretValue","requestParameters":{"secretId":"payments/api"},
            "responseElements":{"arn":"arn:aws:secretsmanager:eu-west-1:1:secret:payments/api-AbCdEf"}}}"#;
        assert_eq!(
            secrets_in(cloudtrail).map(|s| s.len()),
            Ok(2),
            "name and ARN, both matched against the index"
        );
        let resources = r#"{"source":"aws.secretsmanager","resources":["arn:x"],"detail":{}}"#;
        assert_eq!(secrets_in(resources), Ok(vec!["arn:x".to_string()]));
        assert_eq!(secrets_in("{not json"), Err(Rejected::NotJson));
        // A message naming a thousand secrets would cost a thousand checks: refused whole.
        let many: Vec<String> = (0..1000).map(|n| format!("arn:{n}")).collect();
        let flood = serde_json::json!({"source": "aws.secretsmanager", "resources": many});
        assert_eq!(
            secrets_in(&flood.to_string()),
            Err(Rejected::TooManySecrets)
        );
        let ten: Vec<String> = (0..10).map(|n| format!("arn:{n}")).collect();
        let fine = serde_json::json!({"source": "aws.secretsmanager", "resources": ten});
        assert_eq!(secrets_in(&fine.to_string()).map(|s| s.len()), Ok(10));
        assert_eq!(
            secrets_in(r#"{"source":"aws.ec2","detail":{"name":"x"}}"#),
            Err(Rejected::NotSecretsManager)
        );
        assert_eq!(
            secrets_in(r#"{"source":"aws.secretsmanager","detail":{}}"#),
            Err(Rejected::NoSecret)
        );
    }
}
