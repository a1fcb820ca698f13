//! Shards shared by several `shardflow run` processes through a lease table
//! in DynamoDB, in the format of the Kinesis Client Library 3.x, so the
//! table reads the same to KCL's tools (and a KCL application's table to
//! shardflow).
//!
//! # The lease model
//!
//! One row per shard ([`Lease`], keyed by the shard id). A worker *holds* a
//! lease when it is the row's [`Lease::actual_owner`]: `leaseOwner`, or
//! `checkpointOwner` while a graceful handoff is pending. Holding is proved
//! by the `leaseCounter`: the holder bumps it on every renewal and
//! checkpoint, every change of owner bumps it, and another worker that sees
//! it stand still for longer than the lease duration may take the lease.
//! No clock is compared between machines; only the counter a worker read
//! and what it still finds in the table.
//!
//! # Every write is conditional
//!
//! A write states what it read, and DynamoDB applies it only if the row
//! still says so; otherwise it fails with [`LeaseError::Lost`] ("the lease
//! moved") and changes nothing. What each condition fences:
//!
//! | operation | condition | what it prevents |
//! |---|---|---|
//! | [`LeaseTable::create_if_absent`] | no row with the key | two workers discovering a shard create its lease once; a second create is [`Created::AlreadyExists`] |
//! | [`LeaseTable::renew`] | counter as read, and held by me | renewing a lease someone took meanwhile (the take bumped the counter) |
//! | [`LeaseTable::take`] | counter as read | two takers of one expired lease both winning: the first bumps the counter, the second's condition fails |
//! | [`LeaseTable::checkpoint`] | counter as read, and held by me | a worker that lost the lease writing a checkpoint over the new holder's: the fencing that keeps one writer of a shard's position and state |
//! | [`LeaseTable::request_handoff`] | owner as read, no handoff pending | handing off a lease that changed hands, or two handoffs at once |
//! | [`LeaseTable::release`] | owner fields as read | releasing (or evicting) a lease that changed hands since it was read |
//! | [`LeaseTable::delete`] | counter as read | deleting a lease someone holds and renews |
//!
//! The checkpoint's condition is stricter than KCL's (the counter only,
//! its renewer and checkpointer sharing one copy of the lease): the holder
//! is checked too, which costs nothing and keeps the fence if a caller's
//! copy goes wrong. The counter keeps out a worker that lost the lease and
//! took it back since, whose copy predates the loss. A worker therefore
//! serialises its renewals and checkpoints of one lease through one copy,
//! the lease each write returns.
//!
//! A write whose answer was lost (a timeout, a dropped connection) is sent
//! again, and then finds its own earlier write in the row. When the row a
//! failed condition returns is what the write would have made, the write
//! counts as done, as KCL's renewal does. Throttling and other transient
//! failures are retried within [`Retry`]'s bounds; then the operation fails
//! with [`LeaseError::Failed`], naming the table.
//!
//! # Graceful handoff
//!
//! [`LeaseTable::request_handoff`] sets `leaseOwner` to the new worker and
//! `checkpointOwner` to the old one, who goes on holding the lease: it
//! renews, finishes what it has in flight, writes its last checkpoint and
//! [`LeaseTable::release`]s the lease, which removes `checkpointOwner` and
//! so hands the lease to `leaseOwner`. If the old owner dies first, the
//! counter stops and the new worker takes the lease like any expired one.

pub mod assign;
mod directory;
mod error;
mod expr;
pub mod handoff;
pub mod lease;
mod schema;
mod table;
mod worker;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::aws::ClientSettings;
use crate::config::{CheckpointStoreConfig, Config, SourceConfig};
use crate::source::kinesis::leased::ShardControl;
use crate::state::remote::RemoteStore;
use crate::state::StateStore;

pub use self::directory::Directory;
pub use self::error::LeaseError;
pub use self::lease::{Checkpoint, HashKeyRange, Lease};
pub use self::schema::{ENSURE_TIMEOUT, OWNER_INDEX};
pub use self::table::{Created, LeaseTable, Progress, Retry};
pub use self::worker::{Worker, WorkerSettings};

/// Leases this worker holds now (a gauge; KCL's `CurrentLeases`).
pub const METRIC_CURRENT_LEASES: &str = "shardflow_cluster_current_leases";
/// Leases this worker took (KCL's `TakenLeases`).
pub const METRIC_TAKEN_LEASES: &str = "shardflow_cluster_taken_leases_total";
/// Leases this worker lost (KCL's `LostLeases`).
pub const METRIC_LOST_LEASES: &str = "shardflow_cluster_lost_leases_total";
/// Expired leases taken from another worker (it died, or stopped renewing).
pub const METRIC_FAILOVERS: &str = "shardflow_cluster_failovers_total";
/// A graceful handoff as its thief sees it: asked → the shard read here.
pub const METRIC_HANDOFF_SECONDS: &str = "shardflow_cluster_handoff_seconds";
/// A shard's state restored (snapshot or parents) before it is read.
pub const METRIC_RESTORE_SECONDS: &str = "shardflow_cluster_restore_seconds";

/// A cluster run's parts: the worker task, the commit hook that exports
/// shards, and the source's end of the worker's commands.
pub struct Cluster {
    pub worker: Worker,
    /// Where the online API's keys are answered.
    pub directory: Arc<Directory>,
    pub tap: Arc<handoff::ShardTap>,
    pub control: ShardControl,
}

/// This process's worker id: the configured one, or the host name and a
/// random suffix (a restarted process is a new worker: its old leases
/// expire or were handed off, never silently reused).
pub fn worker_id(configured: Option<&str>) -> String {
    if let Some(id) = configured {
        return id.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "shardflow".into());
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}-{}", &suffix[suffix.len() - 8..])
}

/// Connects to the lease table (created or checked), the stream and the
/// checkpoint store, for a run under `[cluster]` on `store`.
/// `api`: this worker's online API as the others reach it, written in the
/// leases it holds.
pub async fn connect(
    config: &Config,
    store: StateStore,
    api: Option<String>,
) -> anyhow::Result<Cluster> {
    let cluster = config
        .cluster
        .as_ref()
        .context("no [cluster]")?
        .get_ref()
        .clone();
    let SourceConfig::Kinesis(source) = config.source() else {
        anyhow::bail!("[cluster] needs a kinesis source");
    };
    let Some(store_config) = config.checkpoint_store.as_ref().map(|s| s.get_ref()) else {
        anyhow::bail!("[cluster] needs a [checkpoint_store]");
    };
    let CheckpointStoreConfig::S3(s3) = store_config;
    let worker = worker_id(cluster.worker_id.as_deref());
    // One SDK attempt per table attempt: a renewal's retries must end
    // within a renewal interval (the SDK's own would stretch a blip into
    // an expired lease), so the table's are the only ones, sized by it.
    let dynamodb = crate::aws::dynamodb::client(&ClientSettings {
        region: cluster.region.clone().or_else(|| source.region.clone()),
        endpoint_url: cluster.endpoint_url.clone(),
        extra_root_pem: None,
        max_attempts: Some(1),
    })
    .await
    .context("the lease table's DynamoDB client")?;
    let renew = cluster.renew_interval();
    let mut table = LeaseTable::new(dynamodb, &cluster.lease_table, &worker).with_retry(Retry {
        attempts: 3,
        base: std::time::Duration::from_millis(50),
        cap: (renew / 8).max(std::time::Duration::from_millis(100)),
        attempt_timeout: (renew / 4).max(std::time::Duration::from_secs(1)),
    });
    if let Some(api) = api {
        table = table.with_address(api);
    }
    let directory = Arc::new(Directory::new(&worker));
    table.ensure().await?;
    let kinesis = crate::aws::kinesis::client(&ClientSettings {
        region: source.region.clone(),
        endpoint_url: source.endpoint_url.clone(),
        extra_root_pem: None,
        max_attempts: None,
    })
    .await?;
    let s3_client = crate::aws::s3::client(&s3.client())
        .await
        .with_context(|| format!("checkpoint store {}", store_config.describe()))?;
    let remote = RemoteStore::new(s3_client, &s3.bucket, &s3.prefix);
    remote.check().await?;

    let state_dir = &config.pipeline.state_dir;
    let mut work_dir = state_dir.clone().into_os_string();
    work_dir.push(".shards");
    let work_dir = std::path::PathBuf::from(work_dir);
    if work_dir.exists() {
        std::fs::remove_dir_all(&work_dir)
            .with_context(|| format!("clearing {}", work_dir.display()))?;
    }
    let fingerprint = config.state_fingerprint();
    let (export_tx, export_rx) = mpsc::unbounded_channel();
    let tap = Arc::new(handoff::ShardTap::new(
        s3.every,
        work_dir.join("out"),
        worker.clone(),
        fingerprint.clone(),
        export_tx,
    ));
    // A command per shard move: a few per shard at most are in flight.
    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let at_timestamp = source.timestamp_millis().map_err(anyhow::Error::msg)?;
    Ok(Cluster {
        worker: Worker {
            table,
            kinesis,
            remote,
            store,
            settings: WorkerSettings {
                cluster,
                stream: source.stream_name.clone(),
                starting_position: source.starting_position,
                at_timestamp,
                shard_refresh: source.shard_refresh_interval.std(),
                fingerprint,
                work_dir,
            },
            tap: tap.clone(),
            commands: commands_tx,
            exported: export_rx,
            stopping: false,
            directory: directory.clone(),
        },
        directory,
        tap,
        control: ShardControl {
            commands: commands_rx,
        },
    })
}
