//! The DynamoDB client (the lease table of `src/cluster/`, the `dynamodb`
//! sink) and which of its errors are worth another attempt.

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::Client;

use super::ClientSettings;

/// A DynamoDB client on the shared configuration; fails without a region.
/// `endpoint_url` points it at an emulator; `max_attempts` sets the SDK's
/// own retries, under the bounded retries `cluster::LeaseTable` and the
/// sink add around each call.
pub async fn client(settings: &ClientSettings) -> anyhow::Result<Client> {
    let shared = super::sdk_config(settings).await?;
    super::require_region(&shared)?;
    Ok(Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&shared).build(),
    ))
}

/// Error codes DynamoDB (or the SDK's classification) marks as transient:
/// throttling, server errors, a transaction in the way.
const TRANSIENT_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionConflictException",
];

/// Whether another attempt could succeed: a transient error code, or no
/// answer at all (a timeout, the connection, an unreadable response).
/// Everything else (validation, a missing table, access denied, a failed
/// condition) would fail again the same way.
pub fn is_transient<E, R>(e: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c)),
        _ => false,
    }
}

/// [`is_transient`], or any 5xx answer whatever its code: the service
/// failed, not the request.
pub fn is_retryable<E>(e: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    is_transient(e)
        || matches!(e, SdkError::ServiceError(ctx) if ctx.raw().status().is_server_error())
}
