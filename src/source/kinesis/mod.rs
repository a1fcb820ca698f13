//! `[source] type = "kinesis"`: a Kinesis data stream read with enhanced
//! fan-out (SubscribeToShard over HTTP/2).
//!
//! - `mod.rs` (this file): consumer registration, and the coordinator that
//!   discovers shards and starts one task per shard. The client is built by
//!   `aws/kinesis.rs`.
//! - `shards.rs`: which shards may start (parents before children).
//! - `efo.rs`: one shard's subscription: renewals, stalls, backoff, SHARD_END,
//!   the bounded per-shard buffer.
//! - `deagg.rs`: KPL aggregated records.
//! - `leased.rs`: cluster mode, where the lease worker says which shards to
//!   read and from where.
//!
//! A record's position is `{ partition: shard id, sequence: sequence number,
//! sub_sequence: index inside a KPL aggregate }`; the pipeline checkpoints the
//! last position per shard, and a restart subscribes `AFTER_SEQUENCE_NUMBER`
//! of it (or `AT_SEQUENCE_NUMBER` of an aggregate, skipping the sub-records
//! already delivered). Shards without a checkpoint start at
//! `starting_position`.

pub mod deagg;
pub mod efo;
pub mod leased;
pub mod shards;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::ConsumerStatus;
use aws_sdk_kinesis::Client;
use tokio::task::JoinSet;

use self::efo::{Outcome, ShardInfo, ShardTask, Start};
use self::leased::ShardControl;
use self::shards::ShardGraph;
use super::{Source, SourceContext, SourceMessage};
use crate::aws::{self, error_text, Backoff, ClientSettings};
use crate::config::{KinesisSourceConfig, StartingPosition};
use crate::flow::BoxFuture;
use crate::record::PartitionStatus;
use crate::state::HashRange;
use crate::state::StateStore;

pub struct KinesisSource {
    config: KinesisSourceConfig,
    leases: Option<ShardControl>,
}

impl KinesisSource {
    pub fn new(config: KinesisSourceConfig) -> Self {
        KinesisSource {
            config,
            leases: None,
        }
    }

    /// Cluster mode: reads only the shards `control` starts, until it stops
    /// them (see `leased.rs`).
    pub fn with_leases(mut self, control: ShardControl) -> Self {
        self.leases = Some(control);
        self
    }
}

impl Source for KinesisSource {
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "kinesis stream {} via enhanced fan-out consumer {:?}, from {} when no checkpoint{}",
            c.stream_name,
            c.consumer_name,
            match c.starting_position {
                StartingPosition::Latest => "latest",
                StartingPosition::TrimHorizon => "trim_horizon",
                StartingPosition::AtTimestamp => "at_timestamp",
            },
            c.endpoint_url
                .as_deref()
                .filter(|u| !u.is_empty())
                .map(|u| format!(" (endpoint {u})"))
                .unwrap_or_default()
        )
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let result = run(self.config, self.leases, &ctx).await;
            ctx.end(false).await;
            result
        })
    }
}

/// Where the consumer ARN is kept in state meta.
pub const CONSUMER_ARN_META: &str = "kinesis/consumer_arn";

/// The consumer ARN for this run: the one kept in state meta when it still
/// names an ACTIVE consumer of this stream with this name (one
/// `DescribeStreamConsumer` by ARN, which also notices a stream that was
/// deleted and re-created under the same name), else the consumer found or
/// registered by name, which is then kept for the next run.
async fn resolve_consumer(
    client: &Client,
    stream_arn: &str,
    name: &str,
    state: Option<&StateStore>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<String>> {
    let stored = match state {
        Some(store) => store.source_meta(CONSUMER_ARN_META)?,
        None => None,
    };
    if let Some(arn) = &stored {
        if !arn.starts_with(&format!("{stream_arn}/consumer/{name}:")) {
            tracing::warn!(stored = %arn, stream = stream_arn, consumer = name,
                "the consumer ARN in state belongs to another stream or consumer name; looking the consumer up by name");
        } else {
            match client
                .describe_stream_consumer()
                .consumer_arn(arn)
                .send()
                .await
            {
                Ok(out)
                    if out
                        .consumer_description
                        .as_ref()
                        .is_some_and(|d| d.consumer_status == ConsumerStatus::Active) =>
                {
                    tracing::info!(consumer = name, arn = %arn, "reusing the enhanced fan-out consumer kept in state");
                    return Ok(Some(arn.clone()));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(arn = %arn, error = %error_text(&e),
                        "the consumer kept in state is not usable; looking it up by name")
                }
            }
        }
    }
    let found = ensure_consumer(client, stream_arn, name, shutdown).await?;
    if let (Some(store), Some(arn)) = (state, &found) {
        if stored.as_ref() != Some(arn) {
            store.put_source_meta(CONSUMER_ARN_META, arn)?;
        }
    }
    Ok(found)
}

/// Finds the consumer or registers it, then waits until it is ACTIVE.
/// Returns `None` when the run is stopped meanwhile.
pub async fn ensure_consumer(
    client: &Client,
    stream_arn: &str,
    name: &str,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<String>> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut registered = false;
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        match client
            .describe_stream_consumer()
            .stream_arn(stream_arn)
            .consumer_name(name)
            .send()
            .await
        {
            Ok(out) => {
                let d = out
                    .consumer_description
                    .context("DescribeStreamConsumer answered without a description")?;
                if d.consumer_status == ConsumerStatus::Active {
                    tracing::info!(consumer = name, arn = %d.consumer_arn, "enhanced fan-out consumer is active");
                    return Ok(Some(d.consumer_arn));
                }
                tracing::info!(consumer = name, status = %d.consumer_status, "waiting for the consumer to become ACTIVE");
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") && !registered => {
                match client
                    .register_stream_consumer()
                    .stream_arn(stream_arn)
                    .consumer_name(name)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::info!(consumer = name, "registered the enhanced fan-out consumer");
                        registered = true;
                        continue;
                    }
                    // Another instance registers it at the same moment.
                    Err(e) if e.code() == Some("ResourceInUseException") => {}
                    Err(e) => {
                        return Err(anyhow::anyhow!(
                            "RegisterStreamConsumer {name:?}: {}",
                            error_text(&e)
                        ))
                    }
                }
            }
            Err(e) => {
                let retryable = !matches!(
                    e.code(),
                    Some("AccessDeniedException" | "InvalidArgumentException")
                );
                if !retryable {
                    return Err(anyhow::anyhow!(
                        "DescribeStreamConsumer {name:?}: {}",
                        error_text(&e)
                    ));
                }
                tracing::warn!(consumer = name, error = %error_text(&e), "DescribeStreamConsumer failed; retrying");
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the consumer {name:?} did not become ACTIVE within 5 minutes");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

/// Every shard of the stream with its parents (ListShards, paginated).
/// By name: emulators do not all take the ARN.
pub async fn list_shards(client: &Client, stream: &str) -> anyhow::Result<Vec<ShardInfo>> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // NextToken and the stream cannot be given together.
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let out = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("ListShards: {}", error_text(&e)))?;
        for s in out.shards.unwrap_or_default() {
            let parents = s
                .parent_shard_id
                .into_iter()
                .chain(s.adjacent_parent_shard_id)
                .collect();
            let range = s
                .hash_key_range
                .as_ref()
                .and_then(|r| HashRange::parse(&r.starting_hash_key, &r.ending_hash_key).ok());
            shards.push(ShardInfo {
                id: s.shard_id,
                parents,
                range,
            });
        }
        token = out.next_token;
        if token.is_none() {
            return Ok(shards);
        }
    }
}

/// Says new shards are known, with their hash key ranges (a shard's
/// watermark governs the keys of its range); false if the pipeline is gone.
async fn announce(ctx: &SourceContext, shards: Vec<ShardInfo>) -> bool {
    let (ranged, bare): (Vec<ShardInfo>, Vec<ShardInfo>) =
        shards.into_iter().partition(|s| s.range.is_some());
    let ranges: Vec<(Arc<str>, HashRange)> = ranged
        .iter()
        .filter_map(|s| s.range.map(|r| (Arc::from(s.id.as_str()), r)))
        .collect();
    let names = bare.into_iter().map(|s| Arc::from(s.id.as_str())).collect();
    (ranges.is_empty() || ctx.output.send(SourceMessage::Ranges(ranges)).await.is_ok())
        && ctx.partitions(names, PartitionStatus::Known).await
}

async fn run(
    config: KinesisSourceConfig,
    leases: Option<ShardControl>,
    ctx: &SourceContext,
) -> anyhow::Result<()> {
    let mut shutdown = ctx.shutdown.clone();
    let client = aws::kinesis::client(&ClientSettings {
        region: config.region.clone(),
        endpoint_url: config.endpoint_url.clone(),
        extra_root_pem: None,
        max_attempts: None,
    })
    .await?;
    let summary = client
        .describe_stream_summary()
        .stream_name(&config.stream_name)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "DescribeStreamSummary {:?}: {}",
                config.stream_name,
                error_text(&e)
            )
        })?;
    let stream_arn = summary
        .stream_description_summary
        .map(|s| s.stream_arn)
        .context("DescribeStreamSummary answered without the stream")?;
    let Some(consumer_arn) = resolve_consumer(
        &client,
        &stream_arn,
        &config.consumer_name,
        ctx.state.as_ref(),
        &mut shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let consumer_arn: Arc<str> = Arc::from(consumer_arn);

    let fresh_start = match config.starting_position {
        StartingPosition::Latest => Start::Latest,
        StartingPosition::TrimHorizon => Start::TrimHorizon,
        StartingPosition::AtTimestamp => Start::AtTimestamp(
            config
                .timestamp_millis()
                .map_err(anyhow::Error::msg)?
                .context("at_timestamp without timestamp")?,
        ),
    };
    if let Some(control) = leases {
        return leased::run(
            leased::Reader {
                client,
                consumer_arn,
                config,
            },
            ctx,
            control,
        )
        .await;
    }
    let mut graph = ShardGraph::default();
    let mut tasks: JoinSet<(String, Outcome)> = JoinSet::new();
    let mut names: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut refresh = tokio::time::interval(config.shard_refresh_interval.std());
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let active = metrics::gauge!("shardflow_kinesis_active_shards");

    let spawn = |graph: &mut ShardGraph,
                 tasks: &mut JoinSet<(String, Outcome)>,
                 names: &mut HashMap<tokio::task::Id, String>| {
        for (shard, after_parent) in graph.take_ready() {
            // A shard a checkpoint knows resumes right after it. A child whose
            // parent was read to its end here starts at its first record
            // (TRIM_HORIZON), whatever starting_position says: none of its
            // records was seen yet, and LATEST would lose some.
            let start = match ctx.resume_position(&shard) {
                Some(p) => Start::from_checkpoint(p),
                None if after_parent => Start::TrimHorizon,
                None => fresh_start.clone(),
            };
            let task = ShardTask {
                client: client.clone(),
                consumer_arn: consumer_arn.clone(),
                shard: Arc::from(shard.as_str()),
                start,
                stall_timeout: config.stall_timeout.std(),
                shard_buffer: config.shard_buffer,
                batch_size: ctx.batch_size,
                output: ctx.output.clone(),
                shutdown: ctx.shutdown.clone(),
            };
            let name = shard.clone();
            let handle = tasks.spawn(async move { (name, task.run().await) });
            names.insert(handle.id(), shard);
        }
    };

    loop {
        tokio::select! {
            _ = refresh.tick() => {
                match list_shards(&client, &config.stream_name).await {
                    Ok(list) => {
                        // Every shard listed holds the watermark from now on,
                        // before its subscription (or its parents) lets it
                        // deliver anything.
                        let new: Vec<ShardInfo> = list
                            .into_iter()
                            .filter(|s| graph.add(&s.id, s.parents.clone()))
                            .collect();
                        if !announce(ctx, new).await {
                            return Ok(());
                        }
                    }
                    // Transient: the running shards go on; the next tick retries.
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "shard refresh failed; retrying at the next interval"),
                }
            }
            joined = tasks.join_next_with_id(), if !tasks.is_empty() => {
                match joined {
                    Some(Ok((id, (shard, Outcome::Ended(children))))) => {
                        names.remove(&id);
                        graph.finish(&shard);
                        // Children hold the watermark before their parent
                        // stops holding it.
                        let new: Vec<ShardInfo> = children
                            .into_iter()
                            .filter(|c| graph.add(&c.id, c.parents.clone()))
                            .collect();
                        if !announce(ctx, new).await
                            || !ctx
                                .partitions(vec![Arc::from(shard.as_str())], PartitionStatus::Finished)
                                .await
                        {
                            return Ok(());
                        }
                    }
                    Some(Ok((id, (_, Outcome::Stopped)))) => {
                        names.remove(&id);
                        if !*shutdown.borrow() {
                            // The pipeline is gone.
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        let shard = names.remove(&e.id()).unwrap_or_default();
                        anyhow::bail!("the task reading shard {shard} failed: {e}");
                    }
                    None => {}
                }
            }
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        spawn(&mut graph, &mut tasks, &mut names);
        active.set(graph.running() as f64);
        let waiting = graph.waiting();
        if !waiting.is_empty() {
            tracing::debug!(?waiting, "shards waiting for their parents");
        }
    }

    // Stop: the tasks see the shutdown signal and return.
    while tasks.join_next().await.is_some() {}
    if config.deregister_on_exit {
        match client
            .deregister_stream_consumer()
            .consumer_arn(&*consumer_arn)
            .send()
            .await
        {
            Ok(_) => tracing::info!(consumer = %config.consumer_name, "deregistered the consumer"),
            Err(e) => {
                tracing::warn!(error = %error_text(&e), "DeregisterStreamConsumer failed")
            }
        }
    }
    Ok(())
}
