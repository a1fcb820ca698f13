//! The S3 client: smithy's hyper client on rustls with `ring` (no aws-lc C
//! build), credentials and region from the standard AWS chain, and the
//! config's `endpoint_url`, `region` and `force_path_style` as overrides.

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::config::S3ClientConfig;

/// Builds a client. An empty `endpoint_url` or `region` counts as unset, so
/// that a config can write `endpoint_url = "${S3_ENDPOINT:-}"`.
pub async fn client(settings: &S3ClientConfig) -> anyhow::Result<Client> {
    let region = settings.region.as_deref().filter(|r| !r.is_empty());
    let endpoint_url = settings.endpoint_url.as_deref().filter(|u| !u.is_empty());
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)));
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let shared = loader.load().await;
    let mut config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(settings.force_path_style.unwrap_or(endpoint_url.is_some()));
    if shared.region().is_none() {
        if endpoint_url.is_some() {
            // S3-compatible servers accept any region; spare the user one.
            config = config.region(Region::new("us-east-1"));
        } else {
            anyhow::bail!(
                "no AWS region: set `region` in the config, or AWS_REGION / a profile's region"
            );
        }
    }
    Ok(Client::from_conf(config.build()))
}

/// An SDK error with its service code and message, for logs and errors.
pub fn error_text<E, R>(e: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    match e.as_service_error() {
        Some(s) => format!(
            "{}: {}",
            s.code().unwrap_or("error"),
            s.message().unwrap_or("(no message)")
        ),
        None => format!("{}", aws_sdk_s3::error::DisplayErrorContext(e)),
    }
}
