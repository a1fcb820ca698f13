//! Cluster mode: the shards this process reads are the ones its lease
//! worker holds (see `crate::cluster`). The worker restores a shard's state,
//! then [`ShardCommand::Start`]s it here from its lease's checkpoint; it
//! [`ShardCommand::Stop`]s a shard it hands off or lost.
//!
//! Ordering is what makes a move safe, and it rides on the record channel:
//! the [`ShardChange::Acquired`] of a shard goes downstream before its first
//! record (so the engine adopts its state first), and its
//! [`ShardChange::Released`] after its last (so the barrier it makes covers
//! every record the shard delivered here). Shard order (parents before
//! children) is the worker's business: it starts a child only once its
//! parents' leases say `SHARD_END`.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_kinesis::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::efo::{Outcome, ShardTask, Start};
use super::SourceContext;
use crate::config::KinesisSourceConfig;
use crate::flow::{ReleaseReason, ReleasedShard, ShardChange};
use crate::record::{PartitionStatus, Position};
use crate::state::HashRange;
use crate::time::Millis;

/// What the lease worker tells the source.
#[derive(Debug)]
pub enum ShardCommand {
    /// Read `shard` from `start`; its state is in the store already.
    Start {
        shard: Arc<str>,
        start: Start,
        range: HashRange,
        /// The last holder's maximum event time, watermark and arrival counter.
        max_event_time: Option<Millis>,
        watermark: Option<Millis>,
        next_seq: u64,
        /// The lease's checkpoint as a position (none at a sentinel).
        resume: Option<Position>,
    },
    /// Stop reading `shard`; its release follows its last record.
    Stop { shard: Arc<str>, why: ReleaseReason },
}

/// The worker's end of the source: its commands.
pub struct ShardControl {
    pub commands: mpsc::Receiver<ShardCommand>,
}

/// What reading a shard takes besides the shard.
pub(super) struct Reader {
    pub client: Client,
    pub consumer_arn: Arc<str>,
    pub config: KinesisSourceConfig,
}

/// A shard being read.
struct Running {
    range: HashRange,
    stop: watch::Sender<bool>,
    /// Why it is stopping, once told to.
    why: Option<ReleaseReason>,
}

pub(super) async fn run(
    reader: Reader,
    ctx: &SourceContext,
    mut control: ShardControl,
) -> anyhow::Result<()> {
    let mut shutdown = ctx.shutdown.clone();
    let mut running: HashMap<Arc<str>, Running> = HashMap::new();
    let mut tasks: JoinSet<(Arc<str>, Outcome)> = JoinSet::new();
    let active = metrics::gauge!("shardflow_kinesis_active_shards");
    loop {
        tokio::select! {
            command = control.commands.recv() => match command {
                Some(ShardCommand::Start { shard, start, range, max_event_time, watermark, next_seq, resume }) => {
                    if running.contains_key(&shard) {
                        tracing::warn!(%shard, "asked to start a shard already read; ignored");
                        continue;
                    }
                    let acquired = ShardChange::Acquired {
                        shard: shard.clone(),
                        range,
                        max_event_time,
                        watermark,
                        next_seq,
                        resume,
                    };
                    if !ctx.shard(acquired).await
                        || !ctx.partitions(vec![shard.clone()], PartitionStatus::Known).await
                    {
                        break;
                    }
                    let (stop, stopped) = watch::channel(false);
                    let task = ShardTask {
                        client: reader.client.clone(),
                        consumer_arn: reader.consumer_arn.clone(),
                        shard: shard.clone(),
                        start,
                        stall_timeout: reader.config.stall_timeout.std(),
                        shard_buffer: reader.config.shard_buffer,
                        batch_size: ctx.batch_size,
                        output: ctx.output.clone(),
                        shutdown: stopped,
                    };
                    let name = shard.clone();
                    tasks.spawn(async move { (name, task.run().await) });
                    running.insert(shard, Running { range, stop, why: None });
                }
                Some(ShardCommand::Stop { shard, why }) => match running.get_mut(&shard) {
                    Some(r) => {
                        r.why.get_or_insert(why);
                        let _ = r.stop.send(true);
                    }
                    None => tracing::debug!(%shard, "asked to stop a shard not read here"),
                },
                // The worker is gone: the run is stopping.
                None => break,
            },
            joined = tasks.join_next(), if !tasks.is_empty() => match joined {
                Some(Ok((shard, outcome))) => {
                    let Some(r) = running.remove(&shard) else { continue };
                    let why = match outcome {
                        Outcome::Ended(_) => ReleaseReason::Ended,
                        Outcome::Stopped => match r.why {
                            Some(why) => why,
                            // Stopped by nobody: the pipeline is gone.
                            None => break,
                        },
                    };
                    let released = ReleasedShard { shard: shard.clone(), range: r.range, why };
                    if !ctx.shard(ShardChange::Released(released)).await {
                        break;
                    }
                }
                Some(Err(e)) => anyhow::bail!("a task reading a leased shard failed: {e}"),
                None => {}
            },
            _ = shutdown.changed() => {}
        }
        active.set(running.len() as f64);
        if *shutdown.borrow() {
            break;
        }
    }
    // The shards still read stop with the run: the last barrier covers them
    // and the worker hands them off from that commit.
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    while tasks.join_next().await.is_some() {}
    active.set(0.0);
    Ok(())
}
