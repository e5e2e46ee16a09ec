//! AWS errors as fixed reasons: by error code, never by message text.

use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};

use super::SourceError;

/// The same failure, about another secret of the batch.
pub(super) fn with_secret_id(error: &SourceError, secret_id: &str) -> SourceError {
    let secret_id = secret_id.to_string();
    match error {
        SourceError::NotFound { detail, .. } => SourceError::NotFound {
            secret_id,
            detail: detail.clone(),
        },
        SourceError::AccessDenied { detail, .. } => SourceError::AccessDenied {
            secret_id,
            detail: detail.clone(),
        },
        SourceError::RoleDenied { role, detail, .. } => SourceError::RoleDenied {
            secret_id,
            role: role.clone(),
            detail: detail.clone(),
        },
        SourceError::Throttled { .. } => SourceError::Throttled { secret_id },
        SourceError::Empty { .. } => SourceError::Empty { secret_id },
        SourceError::Unavailable { detail, .. } => SourceError::Unavailable {
            secret_id,
            detail: detail.clone(),
        },
    }
}

/// Maps an SDK error to a reason by its error code, never by its text.
pub(super) fn classify<E, R>(secret_id: &str, error: &SdkError<E, R>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = error.code().unwrap_or_default();
    let classified = classify_code(secret_id, code, error.message().unwrap_or_default());
    match classified {
        SourceError::Unavailable { secret_id, .. } => {
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
        other => other,
    }
}

/// Maps an AWS error code (of a call, or of one secret in a batch) to a reason. `message` is AWS's
/// text: kept as the log-only detail.
pub(super) fn classify_code(secret_id: &str, code: &str, message: &str) -> SourceError {
    let secret_id = secret_id.to_string();
    let detail = if message.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {message}")
    };
    match code {
        "ResourceNotFoundException" => SourceError::NotFound { secret_id, detail },
        // STS (AssumeRole) answers `AccessDenied`, `InvalidClientTokenId`, `RegionDisabledException`.
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "RegionDisabledException"
        | "DecryptionFailure" => SourceError::AccessDenied { secret_id, detail },
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => SourceError::Throttled { secret_id },
        // A secret scheduled for deletion, or a version that does not exist.
        "InvalidRequestException" | "InvalidParameterException" => {
            SourceError::NotFound { secret_id, detail }
        }
        _ => SourceError::Unavailable {
            secret_id,
            detail: code.to_string(),
        },
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
