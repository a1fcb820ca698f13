//! Sinks: where outputs go. One file per kind.
//!
//! A sink is handed batches of the kinds it subscribes to and, at every
//! checkpoint barrier, asked to `flush`. A checkpoint is committed only after
//! every sink's flush returned `Ok`, so what a sink acknowledged survives a
//! crash and what it did not is produced again (with the same ids).

pub mod dynamodb;
pub mod file;
pub mod kinesis;
pub mod s3;
pub mod stdout;

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::SinkConfig;
use crate::flow::BoxFuture;
use crate::record::{KindSet, Output};

/// A kind of sink.
pub trait Sink: Send {
    /// A line for `shardflow check`, logs and metrics labels.
    fn describe(&self) -> String;
    /// Takes outputs; may buffer them.
    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Makes everything written so far durable (or delivered). Called at
    /// shutdown, and at each checkpoint barrier by the default `checkpoint`.
    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Whether its work blocks the thread it runs on (disk writes, fsync,
    /// compression): such a sink runs on a thread of its own, off the
    /// async runtime that serves the sources' network streams.
    fn blocks(&self) -> bool {
        false
    }
    /// Checkpoint barrier `id` arrived (`last`: nothing follows it). Returns
    /// the newest checkpoint all of whose outputs are durable: `id` after a
    /// flush (the default), or an older one for a sink that batches across
    /// checkpoints (the S3 archive); its later checkpoints are acknowledged
    /// when a later call reports them durable. At the `last` barrier it
    /// must return `id`.
    fn checkpoint(&mut self, id: u64, _last: bool) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move {
            self.flush().await?;
            Ok(id)
        })
    }
}

/// What the fan-out stage sends a sink's task.
pub enum SinkMessage {
    Batch(Arc<Vec<Output>>),
    /// A checkpoint barrier: answer on `ack` once its outputs are durable.
    Barrier {
        id: u64,
        last: bool,
        ack: oneshot::Sender<anyhow::Result<()>>,
    },
}

/// What a sink knows about the run it is part of.
#[derive(Clone, Copy, Debug)]
pub struct SinkContext {
    /// The id the next checkpoint barrier will carry.
    pub next_checkpoint: u64,
    /// When the pipeline's state was created (epoch ms): names archive
    /// objects apart from an earlier state's.
    pub epoch: u64,
    /// Most checkpoints a sink may leave unacknowledged: the pipeline's
    /// commit queue holds no more.
    pub max_open_checkpoints: usize,
}

impl Default for SinkContext {
    fn default() -> Self {
        SinkContext {
            next_checkpoint: 1,
            epoch: 0,
            max_open_checkpoints: 16,
        }
    }
}

/// Builds the configured sink. Async: a sink that checks its destination
/// at start (the DynamoDB table) fails here, before any input is read.
pub async fn build(config: &SinkConfig, ctx: SinkContext) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match config {
        SinkConfig::Stdout(_) => Box::new(stdout::StdoutSink::new()),
        SinkConfig::File(c) => Box::new(file::FileSink::open(c.clone())?),
        SinkConfig::Kinesis(c) => Box::new(kinesis::KinesisSink::new(c.clone())),
        SinkConfig::S3(c) => Box::new(s3::S3Sink::new(c.clone(), ctx)),
        SinkConfig::Dynamodb(c) => Box::new(dynamodb::DynamoDbSink::connect(c.clone()).await?),
    })
}

/// A sink's task: filters by kind, writes, flushes on barriers. Returns
/// when its input closes, after a last flush.
pub async fn run_sink(
    mut sink: Box<dyn Sink>,
    kinds: KindSet,
    label: String,
    mut input: mpsc::Receiver<SinkMessage>,
) -> anyhow::Result<()> {
    let written = metrics::counter!("shardflow_sink_records_total", "sink" => label.clone());
    let flushes = metrics::counter!("shardflow_sink_flushes_total", "sink" => label.clone());
    let stage = crate::telemetry::StageClock::new("sink");
    // Acknowledgements a sink has not yet reported durable, oldest first.
    let mut held: VecDeque<(u64, oneshot::Sender<anyhow::Result<()>>)> = VecDeque::new();
    while let Some(message) = input.recv().await {
        match message {
            SinkMessage::Batch(batch) => {
                let mine: Vec<&Output> =
                    batch.iter().filter(|o| kinds.contains(o.kind())).collect();
                if !mine.is_empty() {
                    sink.write(&mine).await?;
                    written.increment(mine.len() as u64);
                    stage.left(mine.iter().find_map(|o| o.arrival()));
                }
            }
            SinkMessage::Barrier { id, last, ack } => {
                held.push_back((id, ack));
                let result = sink.checkpoint(id, last).await;
                flushes.increment(1);
                match result {
                    Ok(durable) => {
                        while held.front().is_some_and(|(i, _)| *i <= durable) {
                            let (_, ack) = held.pop_front().expect("checked");
                            let _ = ack.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        for (_, ack) in held.drain(..) {
                            let _ = ack.send(Err(anyhow::anyhow!("sink {label}: {e}")));
                        }
                        anyhow::bail!("sink {label}: {e}");
                    }
                }
            }
        }
    }
    sink.flush().await?;
    // Input closed without a last barrier (the pipeline is failing):
    // nothing left is acknowledged as durable, the checkpoints stay uncommitted.
    drop(held);
    Ok(())
}
