//! Sources: where raw records come from.
//!
//! A source reads its partitions from the positions of the last committed
//! checkpoint (or from its configured start), hands records over in batches
//! through a bounded channel and so waits whenever the pipeline is behind.
//! One file per kind.

pub mod file;
pub mod generator;
pub mod kinesis;
pub mod s3;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::SourceConfig;
use crate::flow::BoxFuture;
use crate::record::{DeadLetter, Event, PartitionStatus, Position, RawRecord};
use crate::time::Millis;

/// What a source sends downstream.
#[derive(Debug)]
pub enum SourceMessage {
    Batch(Vec<RawRecord>),
    /// Records the source decoded itself, with the pipeline's schema, where
    /// it had just parsed them: the archive source does, on the threads
    /// that read its objects, so an archive line is parsed once.
    Decoded(Vec<DecodedRecord>),
    /// A partition's status for the watermark (see
    /// [`crate::engine::Watermarks`]): sent before the partition's first
    /// record (`Known`, then `Reading`), whenever the source stops or starts
    /// being able to read it, and `Finished` after its last record (and
    /// after any children are `Known`).
    Partitions(Vec<Arc<str>>, PartitionStatus),
    /// Input the source could not even split into records (a corrupt
    /// archive object): a dead letter with the reason, no record.
    Bad(DeadLetter),
    /// Partitions (Kinesis shards) are `Known`, with their hash key ranges:
    /// under per-shard watermarks a shard's watermark governs its keys. One
    /// message, as `Partitions`: a source announcing shards waits for one
    /// slot of the pipeline's channel, not two.
    Ranges(Vec<(Arc<str>, crate::state::HashRange)>),
    /// Cluster mode: a shard acquired (before its first record) or
    /// released (after its last).
    Shard(crate::flow::ShardChange),
    /// The source will send nothing more. `exhausted` is true when a bounded
    /// input was read to its end (so event time may advance to +∞), false
    /// when the source was asked to stop.
    End {
        exhausted: bool,
    },
}

/// A record a source decoded: the event, or the dead letter saying why
/// there is none.
#[derive(Debug)]
pub struct DecodedRecord {
    /// As [`RawRecord::replay_watermark`].
    pub replay_watermark: Option<Millis>,
    pub event: Result<Event, Box<DeadLetter>>,
}

impl DecodedRecord {
    pub fn position(&self) -> &Position {
        match &self.event {
            Ok(e) => &e.position,
            Err(d) => &d.position,
        }
    }
}

/// The handles every source runs with.
pub struct SourceContext {
    pub output: mpsc::Sender<SourceMessage>,
    /// Becomes true when the pipeline is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Positions of the last committed checkpoint, one per partition.
    pub resume_from: Vec<Position>,
    /// Most records per batch.
    pub batch_size: usize,
    /// Where a source keeps what must outlive a run but is not part of a
    /// checkpoint (the Kinesis consumer ARN). `None` when running without
    /// state (tests of a source alone).
    pub state: Option<crate::state::StateStore>,
}

impl SourceContext {
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sends a batch; false if the pipeline is gone.
    pub async fn send(&self, batch: Vec<RawRecord>) -> bool {
        batch.is_empty() || self.output.send(SourceMessage::Batch(batch)).await.is_ok()
    }

    /// Says where partitions stand for the watermark, in one message
    /// (however many shards a stream has); false if the pipeline is gone.
    pub async fn partitions(&self, partitions: Vec<Arc<str>>, status: PartitionStatus) -> bool {
        partitions.is_empty()
            || self
                .output
                .send(SourceMessage::Partitions(partitions, status))
                .await
                .is_ok()
    }

    /// Sends the closing message; never fails (the receiver may be gone).
    pub async fn end(&self, exhausted: bool) {
        let _ = self.output.send(SourceMessage::End { exhausted }).await;
    }

    /// Says a shard was acquired or released; false if the pipeline is gone.
    pub async fn shard(&self, change: crate::flow::ShardChange) -> bool {
        self.output.send(SourceMessage::Shard(change)).await.is_ok()
    }

    pub fn resume_position(&self, partition: &str) -> Option<&Position> {
        self.resume_from.iter().find(|p| &*p.partition == partition)
    }
}

/// A kind of source.
pub trait Source: Send {
    /// A line for `shardflow check` and the start-up log.
    fn describe(&self) -> String;
    /// Reads until the input ends or shutdown is signalled, then sends
    /// [`SourceMessage::End`]. An error is fatal to the pipeline.
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>>;
    /// Whether the source replays a recorded run: its records carry the
    /// watermark that run had ([`RawRecord::replay_watermark`]), which the
    /// engine follows, and its partitions are never idle by wall clock.
    fn replays_watermarks(&self) -> bool {
        false
    }
    /// Only events in this range are wanted (an archive's `from`/`to`):
    /// the pipeline leaves the others out and counts them.
    fn event_time_range(&self) -> Option<EventTimeRange> {
        None
    }
}

/// `[from, to)` on event time, each end optional.
pub type EventTimeRange = (Option<Millis>, Option<Millis>);

/// Builds the configured source.
pub fn build(config: &crate::config::Config) -> anyhow::Result<Box<dyn Source>> {
    Ok(match config.source() {
        SourceConfig::S3(c) => Box::new(s3::S3Source::new(
            c.clone(),
            &config.schema,
            None,
            None,
            Default::default(),
        )),
        SourceConfig::File(c) => Box::new(file::FileSource::new(c.clone())),
        SourceConfig::Generator(c) => {
            Box::new(generator::GeneratorSource::new(c.clone(), &config.schema))
        }
        SourceConfig::Kinesis(c) => Box::new(kinesis::KinesisSource::new(c.clone())),
    })
}
