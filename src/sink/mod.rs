//! Sinks: where outputs go. One file per kind.
//!
//! A sink is handed batches of the kinds it subscribes to and, at every
//! checkpoint barrier, asked to `flush`. A checkpoint is committed only after
//! every sink's flush returned `Ok`, so what a sink acknowledged survives a
//! crash and what it did not is produced again (with the same ids).

pub mod file;
pub mod kinesis;
pub mod stdout;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::SinkConfig;
use crate::record::{KindSet, Output};
use crate::source::BoxFuture;

/// A kind of sink.
pub trait Sink: Send {
    /// A line for `shardflow check`, logs and metrics labels.
    fn describe(&self) -> String;
    /// Takes outputs; may buffer them.
    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Makes everything written so far durable (or delivered). Called at each
    /// checkpoint barrier and at shutdown.
    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// What the fan-out stage sends a sink's task.
pub enum SinkMessage {
    Batch(Arc<Vec<Output>>),
    /// Flush, then answer on the channel.
    Barrier(oneshot::Sender<anyhow::Result<()>>),
}

/// Builds the configured sink.
pub fn build(config: &SinkConfig) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match config {
        SinkConfig::Stdout(_) => Box::new(stdout::StdoutSink::new()),
        SinkConfig::File(c) => Box::new(file::FileSink::open(c.clone())?),
        SinkConfig::Kinesis(c) => Box::new(kinesis::KinesisSink::new(c.clone())),
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
    while let Some(message) = input.recv().await {
        match message {
            SinkMessage::Batch(batch) => {
                let mine: Vec<&Output> =
                    batch.iter().filter(|o| kinds.contains(o.kind())).collect();
                if !mine.is_empty() {
                    sink.write(&mine).await?;
                    written.increment(mine.len() as u64);
                }
            }
            SinkMessage::Barrier(ack) => {
                let result = sink.flush().await;
                flushes.increment(1);
                let failed = result.as_ref().err().map(|e| format!("{e:#}"));
                let _ = ack.send(result);
                if let Some(e) = failed {
                    anyhow::bail!("sink {label}: {e}");
                }
            }
        }
    }
    sink.flush().await
}
