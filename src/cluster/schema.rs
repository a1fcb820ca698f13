//! The lease table's schema, as KCL 3.x creates it
//! (`DynamoDBLeaseRefresher`, `DynamoDBLeaseSerializer`): hash key
//! `leaseKey` (S), on-demand capacity, and the global secondary index
//! `LeaseOwnerToLeaseKeyIndex` (hash `leaseOwner`, range `leaseKey`, keys
//! only) through which a worker finds its leases without a Scan.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexDescription, GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement,
    KeyType, Projection, ProjectionType, ProvisionedThroughput, ScalarAttributeType,
    TableDescription, TableStatus,
};

use super::lease::{LEASE_KEY, LEASE_OWNER};
use super::table::{CallError, LeaseTable};
use crate::aws::Backoff;

/// KCL's name for the index of leases by owner.
pub const OWNER_INDEX: &str = "LeaseOwnerToLeaseKeyIndex";

/// How long [`LeaseTable::ensure`] waits for the table and its index to
/// become ACTIVE: a new table takes seconds; an index added to a big
/// existing table, longer.
pub const ENSURE_TIMEOUT: Duration = Duration::from_secs(300);

impl LeaseTable {
    /// Makes the table usable as a lease table: creates it with KCL's schema
    /// when missing, adds the owner index KCL 3 adds to a table of KCL 2
    /// when it has none, and waits until both are ACTIVE (at most
    /// [`ENSURE_TIMEOUT`]). A table whose keys are not KCL's is refused with
    /// what is wrong: nothing could share it with a KCL application.
    pub async fn ensure(&self) -> anyhow::Result<()> {
        self.ensure_within(ENSURE_TIMEOUT).await
    }

    /// [`LeaseTable::ensure`], waiting at most `timeout`.
    pub async fn ensure_within(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        match self.describe().await? {
            None => self.create().await?,
            Some(table) => {
                check_keys(&self.name, &table)?;
                match owner_index(&table) {
                    Some(index) => check_index(&self.name, index)?,
                    None => self.add_owner_index(&table).await?,
                }
            }
        }
        self.wait_active(deadline, timeout).await
    }

    /// The table's description; `None` when it does not exist.
    async fn describe(&self) -> anyhow::Result<Option<TableDescription>> {
        let request = self.client.describe_table().table_name(&self.name);
        let missing = &["ResourceNotFoundException"];
        match self
            .call("describe", None, missing, || request.clone().send())
            .await
        {
            Ok(out) => Ok(out.table().cloned()),
            Err(CallError::Answer(DescribeTableError::ResourceNotFoundException(_))) => Ok(None),
            Err(e) => Err(self.permanent(e).into()),
        }
    }

    async fn create(&self) -> anyhow::Result<()> {
        let request = self
            .client
            .create_table()
            .table_name(&self.name)
            .set_key_schema(Some(vec![key(LEASE_KEY, KeyType::Hash)]))
            .set_attribute_definitions(Some(vec![attribute(LEASE_KEY), attribute(LEASE_OWNER)]))
            .billing_mode(BillingMode::PayPerRequest)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(OWNER_INDEX)
                    .set_key_schema(Some(index_keys()))
                    .projection(keys_only())
                    .build()
                    .context("building the owner index")?,
            );
        let exists = &["ResourceInUseException"];
        match self
            .call("create table", None, exists, || request.clone().send())
            .await
        {
            // Another worker created it first; its schema is checked on the
            // next start like any existing table's.
            Ok(_) | Err(CallError::Answer(CreateTableError::ResourceInUseException(_))) => Ok(()),
            Err(e) => Err(self.permanent(e).into()),
        }
    }

    async fn add_owner_index(&self, table: &TableDescription) -> anyhow::Result<()> {
        // An index of a provisioned table needs capacity; KCL gives it the
        // table's.
        let on_demand = table
            .billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .is_some_and(|m| *m == BillingMode::PayPerRequest);
        let throughput = match table.provisioned_throughput() {
            Some(t) if !on_demand => Some(
                ProvisionedThroughput::builder()
                    .read_capacity_units(t.read_capacity_units().unwrap_or(1).max(1))
                    .write_capacity_units(t.write_capacity_units().unwrap_or(1).max(1))
                    .build()
                    .context("building the owner index's capacity")?,
            ),
            _ => None,
        };
        let index = CreateGlobalSecondaryIndexAction::builder()
            .index_name(OWNER_INDEX)
            .set_key_schema(Some(index_keys()))
            .projection(keys_only())
            .set_provisioned_throughput(throughput)
            .build()
            .context("building the owner index")?;
        let request = self
            .client
            .update_table()
            .table_name(&self.name)
            .set_attribute_definitions(Some(vec![attribute(LEASE_KEY), attribute(LEASE_OWNER)]))
            .global_secondary_index_updates(
                GlobalSecondaryIndexUpdate::builder().create(index).build(),
            );
        tracing::info!(table = %self.name, "adding the index {OWNER_INDEX} to the lease table");
        let Err(e) = self
            .call("add index", None, &[], || request.clone().send())
            .await
        else {
            return Ok(());
        };
        // Another worker may have added it first.
        match self.describe().await? {
            Some(table) if owner_index(&table).is_some() => Ok(()),
            _ => Err(self.permanent(e).into()),
        }
    }

    /// Polls until the table and its owner index are ACTIVE.
    async fn wait_active(&self, deadline: Instant, timeout: Duration) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let table = self
                .describe()
                .await?
                .with_context(|| format!("lease table {}: gone while waiting for it", self.name))?;
            let status = table.table_status();
            let index = owner_index(&table).and_then(|i| i.index_status());
            if status == Some(&TableStatus::Active) && index == Some(&IndexStatus::Active) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "lease table {}: not ACTIVE after {timeout:?} (table {}, index {OWNER_INDEX} {})",
                    self.name,
                    status.map_or("unknown", |s| s.as_str()),
                    index.map_or("missing", |s| s.as_str()),
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(backoff.next_delay().min(left)).await;
        }
    }
}

fn owner_index(table: &TableDescription) -> Option<&GlobalSecondaryIndexDescription> {
    table
        .global_secondary_indexes()
        .iter()
        .find(|i| i.index_name() == Some(OWNER_INDEX))
}

/// The table's keys must be KCL's: `leaseKey` (S) as hash key, no range key.
fn check_keys(name: &str, table: &TableDescription) -> anyhow::Result<()> {
    let keys = describe_keys(table.key_schema(), table.attribute_definitions());
    let want = format!("{LEASE_KEY} (HASH, S)");
    if keys != want {
        bail!(
            "table {name} is not a lease table: its key is {keys}, a KCL lease table's is {want} \
             alone; name another table, or delete this one"
        );
    }
    Ok(())
}

/// An existing owner index must be KCL's, or lookups by owner would be wrong.
fn check_index(name: &str, index: &GlobalSecondaryIndexDescription) -> anyhow::Result<()> {
    let got: Vec<_> = index
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type().clone()))
        .collect();
    let want = [(LEASE_OWNER, KeyType::Hash), (LEASE_KEY, KeyType::Range)];
    if got != want {
        let got: Vec<_> = got
            .iter()
            .map(|(a, t)| format!("{a} ({})", t.as_str()))
            .collect();
        bail!(
            "lease table {name}: index {OWNER_INDEX} has the key {}, KCL's has {LEASE_OWNER} \
             (HASH), {LEASE_KEY} (RANGE)",
            got.join(", ")
        );
    }
    Ok(())
}

/// `attr (HASH, S), attr (RANGE, N)`: the key as a message shows it.
fn describe_keys(keys: &[KeySchemaElement], attributes: &[AttributeDefinition]) -> String {
    let described: Vec<_> = keys
        .iter()
        .map(|k| {
            let name = k.attribute_name();
            let kind = attributes
                .iter()
                .find(|a| a.attribute_name() == name)
                .map_or("?", |a| a.attribute_type().as_str());
            format!("{name} ({}, {kind})", k.key_type().as_str())
        })
        .collect();
    described.join(", ")
}

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .expect("name and key type are set")
}

fn attribute(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("name and type are set")
}

fn index_keys() -> Vec<KeySchemaElement> {
    vec![
        key(LEASE_OWNER, KeyType::Hash),
        key(LEASE_KEY, KeyType::Range),
    ]
}

fn keys_only() -> Projection {
    Projection::builder()
        .projection_type(ProjectionType::KeysOnly)
        .build()
}
