//! The Kinesis client (the Kinesis source's SubscribeToShard and control
//! calls, the Kinesis sink's PutRecords).

use aws_sdk_kinesis::Client;

use super::ClientSettings;

/// A Kinesis client on the shared configuration; fails without a region.
pub async fn client(settings: &ClientSettings) -> anyhow::Result<Client> {
    let shared = super::sdk_config(settings).await?;
    super::require_region(&shared)?;
    Ok(Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&shared).build(),
    ))
}
