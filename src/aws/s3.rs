//! The S3 client (the archive sink, the S3 source).

use aws_sdk_s3::Client;

use super::ClientSettings;
use crate::config::S3ClientConfig;

/// An S3 client on the shared configuration with the SDK's retries at
/// `max_attempts`; fails without a region. Path-style addressing
/// (`endpoint/bucket/key`, which S3-compatible servers expect) is on when
/// `force_path_style` says so, else whenever `endpoint_url` is set.
pub async fn client(settings: &S3ClientConfig) -> anyhow::Result<Client> {
    let common = ClientSettings {
        region: settings.region.clone(),
        endpoint_url: settings.endpoint_url.clone(),
        extra_root_pem: None,
        max_attempts: Some(settings.max_attempts),
    };
    let shared = super::sdk_config(&common).await?;
    super::require_region(&shared)?;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(
            settings
                .force_path_style
                .unwrap_or(common.endpoint_url().is_some()),
        )
        .build();
    Ok(Client::from_conf(config))
}
