//! The SageMaker Runtime client (InvokeEndpoint, `[inference] backend =
//! "sagemaker"`).

use aws_config::retry::RetryConfig;
use aws_config::{Region, SdkConfig};
use aws_sdk_sagemakerruntime::Client;

use super::ClientSettings;

/// A SageMaker Runtime client with the SDK's retries off (the caller
/// retries, so that its breaker sees every attempt and the backoff is the
/// configured one).
///
/// It starts from `base` when given (a program embedding shardflow that
/// already holds an AWS configuration), else from the shared configuration
/// of `settings`' region. `settings`' `region` and `endpoint_url` are set on
/// the client itself, so they override `base` too, and an endpoint does not
/// bring the emulators' default region: the client's region may be `None`,
/// and the caller says what to set.
pub async fn client(settings: &ClientSettings, base: Option<&SdkConfig>) -> anyhow::Result<Client> {
    let sdk = match base {
        Some(sdk) => sdk.clone(),
        None => {
            super::sdk_config(&ClientSettings {
                endpoint_url: None,
                ..settings.clone()
            })
            .await?
        }
    };
    let mut builder =
        aws_sdk_sagemakerruntime::config::Builder::from(&sdk).retry_config(RetryConfig::disabled());
    if sdk.http_client().is_none() {
        builder = builder.http_client(super::http_client(None)?);
    }
    if let Some(region) = settings.region() {
        builder = builder.region(Region::new(region.to_owned()));
    }
    if let Some(url) = settings.endpoint_url() {
        builder = builder.endpoint_url(url);
    }
    Ok(Client::from_conf(builder.build()))
}
