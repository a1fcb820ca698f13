//! The DynamoDB client (the lease table of `src/cluster/`).

use aws_sdk_dynamodb::Client;

use super::ClientSettings;

/// A DynamoDB client on the shared configuration; fails without a region.
/// `endpoint_url` points it at an emulator; `max_attempts` sets the SDK's
/// own retries, under the bounded retries `cluster::LeaseTable` adds around
/// each lease operation.
pub async fn client(settings: &ClientSettings) -> anyhow::Result<Client> {
    let shared = super::sdk_config(settings).await?;
    super::require_region(&shared)?;
    Ok(Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&shared).build(),
    ))
}
