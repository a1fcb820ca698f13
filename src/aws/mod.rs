//! AWS clients: the one place an AWS SDK client is configured.
//!
//! [`sdk_config`] builds the shared [`SdkConfig`] every client starts from;
//! `kinesis.rs`, `s3.rs`, `sagemaker.rs` and `dynamodb.rs` each add what
//! their service needs on top. Everything not set here (credentials,
//! profiles, retries unless `max_attempts` is given) comes from the standard
//! AWS chain.
//!
//! - HTTP: smithy's hyper 1 client on rustls with `ring` (no aws-lc C
//!   build). Its TLS offers `h2` first by ALPN, so Kinesis' SubscribeToShard
//!   runs over HTTP/2 against AWS (which refuses it over HTTP/1.1); plain
//!   `http://` endpoints (emulators, a local `serve-model`) use HTTP/1.1.
//! - An empty `region` or `endpoint_url` counts as unset, so that a config
//!   can write `endpoint_url = "${KINESIS_ENDPOINT:-}"`.
//! - With an `endpoint_url` and no region anywhere in the chain, the region
//!   is `us-east-1`: emulators and S3-compatible servers accept any region,
//!   so the user is spared one.
//!
//! Also here: [`Backoff`], the jittered exponential backoff of the retry
//! loops around AWS calls, and [`error_text`], an AWS error in one line.

mod backoff;
pub mod dynamodb;
mod error;
pub mod kinesis;
pub mod s3;
pub mod sagemaker;

use anyhow::Context as _;
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
// smithy's types, which every SDK crate re-exports.
use aws_sdk_kinesis::config::SharedHttpClient;

pub use self::backoff::Backoff;
pub use self::error::error_text;

/// How the shared AWS configuration is built.
#[derive(Debug, Default, Clone)]
pub struct ClientSettings {
    /// Overrides the region of the AWS chain.
    pub region: Option<String>,
    /// Overrides the service endpoint (an emulator, a private endpoint).
    pub endpoint_url: Option<String>,
    /// Extra PEM certificates to trust (a private CA in front of an endpoint).
    pub extra_root_pem: Option<Vec<u8>>,
    /// Attempts per request with the SDK's standard retries (at least 1);
    /// `None` keeps the SDK's default.
    pub max_attempts: Option<u32>,
}

impl ClientSettings {
    /// The region, unless unset or empty.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref().filter(|r| !r.is_empty())
    }

    /// The endpoint URL, unless unset or empty.
    pub fn endpoint_url(&self) -> Option<&str> {
        self.endpoint_url.as_deref().filter(|u| !u.is_empty())
    }
}

/// The shared configuration clients are built from. Its region is `None`
/// only when neither the settings nor the chain name one and no endpoint is
/// set: [`require_region`] says so for the clients that need one.
pub async fn sdk_config(settings: &ClientSettings) -> anyhow::Result<SdkConfig> {
    let region = settings.region();
    let endpoint_url = settings.endpoint_url();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client(settings.extra_root_pem.as_deref())?);
    if let Some(attempts) = settings.max_attempts {
        loader = loader.retry_config(RetryConfig::standard().with_max_attempts(attempts.max(1)));
    }
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let shared = loader.load().await;
    if shared.region().is_none() && endpoint_url.is_some() {
        // Emulators accept any region; spare the user from setting one.
        return Ok(shared
            .into_builder()
            .region(Region::new("us-east-1"))
            .build());
    }
    Ok(shared)
}

/// Fails when `shared` has no region (see [`sdk_config`]).
pub fn require_region(shared: &SdkConfig) -> anyhow::Result<()> {
    if shared.region().is_none() {
        anyhow::bail!(
            "no AWS region: set `region` in the config, or AWS_REGION / a profile's region"
        );
    }
    Ok(())
}

/// smithy's hyper client with rustls over `ring`, trusting `extra_root_pem`
/// besides the system's roots when given. It speaks `http://` too.
pub fn http_client(extra_root_pem: Option<&[u8]>) -> anyhow::Result<SharedHttpClient> {
    let builder = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
    Ok(match extra_root_pem {
        Some(pem) => builder
            .tls_context(
                tls::TlsContext::builder()
                    .with_trust_store(tls::TrustStore::default().with_pem_certificate(pem))
                    .build()
                    .context("building the TLS trust store")?,
            )
            .build_https(),
        None => builder.build_https(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_strings_count_as_unset() {
        let s = ClientSettings {
            region: Some(String::new()),
            endpoint_url: Some(String::new()),
            ..ClientSettings::default()
        };
        assert_eq!((s.region(), s.endpoint_url()), (None, None));
        let s = ClientSettings {
            region: Some("eu-west-1".into()),
            endpoint_url: Some("http://127.0.0.1:1".into()),
            ..ClientSettings::default()
        };
        assert_eq!(s.region(), Some("eu-west-1"));
        assert_eq!(s.endpoint_url(), Some("http://127.0.0.1:1"));
    }

    #[tokio::test]
    async fn settings_reach_the_shared_config() {
        let sdk = sdk_config(&ClientSettings {
            region: Some("eu-west-1".into()),
            endpoint_url: Some("http://127.0.0.1:1".into()),
            extra_root_pem: None,
            max_attempts: Some(0),
        })
        .await
        .unwrap();
        assert_eq!(sdk.region().map(|r| r.as_ref()), Some("eu-west-1"));
        assert_eq!(sdk.endpoint_url(), Some("http://127.0.0.1:1"));
        assert_eq!(sdk.retry_config().map(|r| r.max_attempts()), Some(1));
        assert!(sdk.http_client().is_some());
        assert!(require_region(&sdk).is_ok());
    }
}
