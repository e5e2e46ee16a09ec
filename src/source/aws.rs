//! AWS Secrets Manager through the real SDK. The endpoint, region and credentials come from the
//! standard AWS configuration (`AWS_ENDPOINT_URL`, IRSA, Pod Identity, ...): there is no test-only
//! path; tests point the endpoint at moto.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::metrics::Metrics;

use super::{FetchedSecret, SecretContent, SecretRef, SecretSource, SourceError, VersionSelector};

pub struct SecretsManagerSource {
    base: aws_config::SdkConfig,
    metrics: Option<Arc<Metrics>>,
    /// One client per region, shared by every identity (connection pool, credentials cache).
    clients: Mutex<HashMap<String, Client>>,
    calls: AtomicU64,
}

impl SecretsManagerSource {
    pub fn new(base: aws_config::SdkConfig) -> Self {
        Self {
            base,
            clients: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// Counts every call in `mtls_secretsmanager_calls_total`.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Secrets Manager API calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The operator's default region (`AWS_REGION`, profile, IMDS), if any.
    pub fn default_region(&self) -> Option<String> {
        self.base.region().map(|region| region.to_string())
    }

    /// The client for `region`. Callers pass only regions the source policy allowed, so the cache
    /// is bounded by the operator's configuration, not by what tenants write.
    fn client(&self, region: &str) -> Client {
        let mut clients = match self.clients.lock() {
            Ok(clients) => clients,
            Err(poisoned) => poisoned.into_inner(),
        };
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_secretsmanager::config::Builder::from(&self.base)
                    .region(aws_config::Region::new(region.to_string()));
                Client::from_conf(config.build())
            })
            .clone()
    }

    async fn get(&self, secret: &SecretRef) -> Result<FetchedSecret, SourceError> {
        let client = self.client(&secret.region);
        let mut request = client.get_secret_value().secret_id(&secret.secret_id);
        // Always name the stage: moto (moto#9451) and caches can lag behind a moved AWSCURRENT when
        // it is left implicit; on AWS the explicit stage is the same request.
        request = match &secret.version {
            VersionSelector::Stage(stage) => request.version_stage(stage),
            VersionSelector::Id(id) => request.version_id(id),
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = request
            .send()
            .await
            .map_err(|error| classify(&secret.secret_id, &error));
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "success",
                Err(error) => error.reason(),
            };
            metrics.record_aws_call("GetSecretValue", outcome);
        }
        let output = result?;
        let content = match (output.secret_string, output.secret_binary) {
            (Some(text), _) => SecretContent::Text(text),
            (None, Some(blob)) => SecretContent::Binary(blob.into_inner()),
            (None, None) => {
                return Err(SourceError::Empty {
                    secret_id: secret.secret_id.clone(),
                });
            }
        };
        Ok(FetchedSecret {
            arn: output.arn.unwrap_or_default(),
            name: output.name.unwrap_or_default(),
            version_id: output.version_id.unwrap_or_default(),
            content,
        })
    }
}

/// The account of the operator's own credentials (STS GetCallerIdentity), or `None` when STS cannot
/// say; the source policy then allows ARN ids only through explicit `arn:` patterns.
pub async fn caller_account(config: &aws_config::SdkConfig) -> Option<String> {
    let sts = aws_sdk_sts::Client::new(config);
    match sts.get_caller_identity().send().await {
        Ok(identity) => identity.account,
        Err(error) => {
            tracing::warn!(
                code = error.code().unwrap_or_default(),
                "STS GetCallerIdentity failed: the operator's own account is unknown; ARN ids need \
                 an arn: pattern in --allowed-source (or set --aws-account-id)"
            );
            None
        }
    }
}

impl SecretSource for SecretsManagerSource {
    fn fetch<'a>(
        &'a self,
        secret: &'a SecretRef,
    ) -> BoxFuture<'a, Result<FetchedSecret, SourceError>> {
        self.get(secret).boxed()
    }
}

/// Maps an SDK error to a reason by its error code, never by its text.
fn classify<E, R>(secret_id: &str, error: &SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let secret_id = secret_id.to_string();
    let code = error.code().unwrap_or_default();
    let detail = match error.message() {
        Some(message) => format!("{code}: {message}"),
        None => code.to_string(),
    };
    match code {
        "ResourceNotFoundException" => SourceError::NotFound { secret_id, detail },
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "DecryptionFailure" => SourceError::AccessDenied { secret_id, detail },
        "ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded" => {
            SourceError::Throttled { secret_id }
        }
        // A secret scheduled for deletion, or a version that does not exist.
        "InvalidRequestException" | "InvalidParameterException" => {
            SourceError::NotFound { secret_id, detail }
        }
        _ => {
            let detail = match error {
                SdkError::ConstructionFailure(_) => {
                    "the request could not be built (are AWS credentials and region configured?)"
                        .to_string()
                }
                SdkError::TimeoutError(_) => "timed out".to_string(),
                SdkError::DispatchFailure(failure) => {
                    if failure.is_timeout() {
                        "timed out connecting".to_string()
                    } else {
                        "could not reach the endpoint".to_string()
                    }
                }
                SdkError::ResponseError(_) => "unreadable response".to_string(),
                // The code only: AWS's message can name the role or the account.
                _ if code.is_empty() => "unknown error".to_string(),
                _ => code.to_string(),
            };
            SourceError::Unavailable { secret_id, detail }
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_secretsmanager::error::{ErrorMetadata, SdkError};
    use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

    use super::classify;

    fn service_error(code: &str) -> SdkError<GetSecretValueError, ()> {
        let metadata = ErrorMetadata::builder()
            .code(code)
            .message("from AWS")
            .build();
        SdkError::service_error(GetSecretValueError::generic(metadata), ())
    }

    #[test]
    fn error_codes_map_to_fixed_reasons() {
        let cases = [
            ("ResourceNotFoundException", "SourceNotFound"),
            ("InvalidRequestException", "SourceNotFound"),
            ("AccessDeniedException", "AccessDenied"),
            ("DecryptionFailure", "AccessDenied"),
            ("UnrecognizedClientException", "AccessDenied"),
            ("ThrottlingException", "Throttled"),
            ("InternalServiceError", "SourceUnavailable"),
        ];
        for (code, reason) in cases {
            let error = classify("ns/x", &service_error(code));
            assert_eq!(error.reason(), reason, "{code}");
            assert!(error.to_string().contains("ns/x"), "{error}");
            assert!(!error.to_string().contains("from AWS"), "{error}");
        }
    }

    #[test]
    fn transport_failures_are_unavailable_with_a_plain_detail() {
        let timeout: SdkError<GetSecretValueError, ()> = SdkError::timeout_error("slow");
        let error = classify("ns/x", &timeout);
        assert_eq!(error.reason(), "SourceUnavailable");
        assert!(error.to_string().contains("timed out"), "{error}");
        let unbuilt: SdkError<GetSecretValueError, ()> =
            SdkError::construction_failure("no region");
        assert!(
            classify("ns/x", &unbuilt)
                .to_string()
                .contains("credentials and region")
        );
    }
}
