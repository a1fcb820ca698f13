//! What travels between the stages of a run.
//!
//! A run is a chain of stages, each a task (or a thread of its own, for those
//! that block) reading from the one before it and writing to the one after
//! it. This module holds what those stages hand each other, so that a stage
//! imports its input and output types from here, never from a neighbour or
//! from the wiring in `pipeline.rs`. It is a leaf: it depends only on
//! [`crate::record`] and on [`StateDelta`].
//!
//! ```text
//! source ─SourceMessage─▶ decode ─Message<Decoded>─▶ engine ─Message<Output>─▶ [inference]
//!                         + barriers                 + state delta                  │
//!                                                                   Message<Output> │
//!                                                                                   ▼
//!               RocksDB ◀── committer ◀─(Barrier, acks)─ fan-out ─SinkMessage─▶ sink tasks
//! ```
//!
//! The two ends speak their own types (a source's `SourceMessage`, a sink's
//! `SinkMessage`); everything in between is a [`Message`]. Besides the
//! messages, the stages share [`Stats`], the counters they add to, and
//! [`BoxFuture`], the future their traits' methods return.
//!
//! # Backpressure
//!
//! Every arrow is a bounded channel of batches: a [`Message::Batch`] holds
//! many records and takes one slot. A slow stage makes the one before it wait
//! (up to the source, which stops reading), and nothing buffers without bound.
//!
//! # Checkpoint barriers
//!
//! A [`Barrier`] travels in the same channels, behind the records it covers.
//! What it carries, what each stage does with it, when its checkpoint is
//! committed and what a crash replays is the checkpoint protocol, stated in
//! [`crate::checkpoint`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::record::{DeadLetter, Event, OutputKind, PartitionStatus, Position};
use crate::state::{HashRange, StateDelta};
use crate::time::Millis;

/// A boxed, sendable future: what the methods of the stages' traits
/// (sources, models, sinks) return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A checkpoint barrier and what it collects on its way to the committer.
#[derive(Default)]
pub struct Barrier {
    pub id: u64,
    /// Last position passed on per partition, before this barrier.
    pub positions: Vec<Position>,
    /// The input ended: the engine advances event time to +∞ before snapshotting.
    pub end_of_input: bool,
    /// Nothing follows this barrier.
    pub last: bool,
    /// The engine's changes since the previous barrier.
    pub delta: Option<StateDelta>,
    /// Shards whose last record came before this barrier (cluster mode):
    /// the engine forgets their state once it is in `delta`, and the
    /// commit hands it to the next holder.
    pub released: Vec<ReleasedShard>,
    /// Shards acquired since the previous barrier (cluster mode): from this
    /// barrier on, `positions` holds theirs as of their lease's checkpoint.
    pub acquired: Vec<(Arc<str>, HashRange)>,
    /// The engine's per-partition maximum event times and watermarks, and
    /// its arrival counter, at the barrier, set with `delta` (what a shard's
    /// snapshot carries besides its range).
    pub marks: Vec<(Arc<str>, Millis, Millis)>,
    pub next_seq: u64,
}

/// A shard this worker starts or stops holding, in the record stream
/// (cluster mode; see `crate::cluster`).
#[derive(Clone, Debug)]
pub enum ShardChange {
    /// The shard's state was ingested into the store: the engine adopts the
    /// range (its timers, the partition's watermark mark, an arrival
    /// counter at least the old holder's) before the shard's first record.
    Acquired {
        shard: Arc<str>,
        range: HashRange,
        max_event_time: Option<Millis>,
        /// The shard's watermark at the snapshot (per-shard mode).
        watermark: Option<Millis>,
        next_seq: u64,
        /// Where the shard resumes (the lease's checkpoint), for the
        /// barriers' positions; `None` at a sentinel (`TRIM_HORIZON`, ...).
        resume: Option<Position>,
    },
    /// The shard's last record was passed on.
    Released(ReleasedShard),
}

/// A shard that stopped here, and why.
#[derive(Clone, Debug)]
pub struct ReleasedShard {
    pub shard: Arc<str>,
    pub range: HashRange,
    pub why: ReleaseReason,
}

/// Why a shard stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// Another worker asked for it (graceful handoff).
    Handoff,
    /// SHARD_END: every record was read; its children follow.
    Ended,
    /// The lease was lost (taken after this worker failed to renew it):
    /// its state here is stale and is dropped, not handed on.
    Lost,
}

/// What flows between stages.
pub enum Message<T> {
    Batch(Vec<T>),
    Barrier(Barrier),
}

/// A decoded record, or why it could not be.
pub enum Decoded {
    Event(Event),
    /// A record the decoder refused (it is archived as `raw` too).
    Dead(Box<DeadLetter>),
    /// Input a source could not split into records (no `raw` to archive).
    Unreadable(Box<DeadLetter>),
    /// Replay: the live run's watermark before the next record.
    Advance(Millis),
    /// A source's word on a partition, for the watermark.
    Partition(Arc<str>, PartitionStatus),
    /// The hash key ranges of partitions, for per-shard watermarks.
    Ranges(Vec<(Arc<str>, HashRange)>),
    /// Cluster mode: a shard acquired (a release travels in the barrier).
    Shard(ShardChange),
}

/// Counters for the progress line, readiness and tests.
#[derive(Default)]
pub struct Stats {
    pub records_in: AtomicU64,
    pub events: AtomicU64,
    pub dead_letters: AtomicU64,
    pub outputs: [AtomicU64; 7],
    pub checkpoints: AtomicU64,
    /// Replay: events outside `--from`/`--to`, skipped.
    pub out_of_range: AtomicU64,
    pub watermark: AtomicI64,
    pub ready: AtomicBool,
}

impl Stats {
    pub fn output_count(&self, kind: OutputKind) -> u64 {
        self.outputs[kind as usize].load(Ordering::Relaxed)
    }
}
