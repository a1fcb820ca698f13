//! The checkpoint protocol: state exactly-once, output at-least-once with
//! ids a reader deduplicates by. This module doc is where the protocol and
//! its invariants are stated; the README and [`crate::flow`] link here.
//!
//! This module owns both ends: barrier injection (the decode stage's
//! [`Barriers`]: the ticker, the ids, the [`positions`] passed on) and the
//! [`committer`]. What a barrier meets in between is each stage's own code,
//! bound by the rules below.
//!
//! # What a barrier carries
//!
//! Every `checkpoint_interval` the decode stage sends a [`Barrier`] with the
//! next id (the last committed checkpoint + 1 after a restart) and the
//! position of the last record of every partition it passed on
//! ([`Barrier::positions`], sorted by partition). The barrier travels in the
//! same bounded channels as the records, behind those it covers, so every
//! stage meets it after all of them. The ticker is polled before input, so a
//! backlog still checkpoints every `checkpoint_interval`.
//!
//! 1. The engine puts in [`Barrier::delta`] its state changes since the
//!    previous barrier and its watermarks (per-partition marks, the output
//!    sequence), first advancing event time to +∞ and firing everything
//!    when [`Barrier::end_of_input`] is set.
//! 2. The inference stage closes its open batch and passes the barrier only
//!    once every batch before it was emitted (scored, fallen back or dead
//!    lettered). Shadow answers are not waited for: they are best effort.
//! 3. The fan-out sends every sink the barrier with a channel for its
//!    acknowledgement, and hands the barrier and those acknowledgements
//!    ([`PendingCommit`]) to the committer, in barrier order.
//!
//! # When a checkpoint is committed
//!
//! A sink acknowledges a checkpoint once every output before its barrier is
//! durable (the default [`Sink::checkpoint`](crate::sink::Sink::checkpoint)
//! flushes; the file sink `fsync`s, the Kinesis sink waits until every
//! record was accepted). The committer takes checkpoints in barrier order,
//! waits until every sink acknowledged one, then writes its delta (state and
//! watermarks), its positions and its id in one synced RocksDB `WriteBatch`
//! ([`StateStore::commit`](crate::state::StateStore::commit), which refuses
//! an id not above the committed one). State and positions are therefore
//! committed together, and only once the sinks hold every output made
//! before them. A sink that fails, or stops without acknowledging, fails
//! the run: that checkpoint and every later one stay uncommitted. Each
//! commit is then published to the engine, which may evict state clean with
//! respect to a committed checkpoint.
//!
//! A sink that batches across checkpoints (the S3 archive: one object spans
//! several) holds their acknowledgements until the object is uploaded. The
//! commit queue holds as many checkpoints as such a sink may leave open
//! (`max_age / checkpoint_interval + 2`, at least `channel_capacity`, at
//! most 1024: [`SinkContext::max_open_checkpoints`](crate::sink::SinkContext));
//! a sink reaching that bound closes its object early.
//!
//! # The last barrier
//!
//! When the input ends (exhausted, or stopped on shutdown) the decode stage
//! sends a barrier with [`Barrier::last`] set (and `end_of_input` when the
//! input was exhausted) and stops. Nothing follows it: the fan-out and the
//! committer stop after it, every sink must acknowledge it at once (the
//! archive closes its object), and the run ends once it is committed.
//!
//! # What a crash replays
//!
//! A restart reads the last commit: the engine's state and watermarks, and
//! the positions, after which each source resumes its partitions. Barrier
//! ids go on from the committed one. Everything after the commit is read and
//! processed again, and produces the same outputs with the same ids: an
//! output's id is made from its input (an event's position; a window
//! result's feature, key, window end and revision), never from the run that
//! made it, and archive objects are named by state epoch and checkpoint, so
//! a restart rewrites the same objects. Output is therefore at-least-once
//! and deduplicable; state is exactly-once. Late events and dead letters
//! need no queue of their own: they come from input after the commit and
//! are produced again like every other output.

mod committer;
mod positions;
pub mod remote;

use std::time::Duration;

use tokio::sync::oneshot;

pub(crate) use committer::run as committer_stage;
pub(crate) use committer::{CommitTap, Committed};
use positions::LastPositions;

use crate::flow::Barrier;
use crate::record::Position;

/// A barrier on its way to the committer, with one acknowledgement per sink.
pub(crate) type PendingCommit = (Barrier, Vec<oneshot::Receiver<anyhow::Result<()>>>);

/// Barrier injection: the decode stage's side of the protocol, the next
/// barrier's id and the positions it will carry.
pub(crate) struct Barriers {
    next_id: u64,
    positions: LastPositions,
    /// Shards acquired since the last barrier.
    acquired: Vec<(std::sync::Arc<str>, crate::state::HashRange)>,
}

impl Barriers {
    /// After the last committed checkpoint: its id and positions.
    pub(crate) fn new(last_committed: u64, resume_from: Vec<Position>) -> Self {
        Barriers {
            next_id: last_committed + 1,
            positions: LastPositions::new(resume_from),
            acquired: Vec::new(),
        }
    }

    /// The ticker that sends a barrier every `interval`, the first one
    /// `interval` from now. The decode stage polls it before its input.
    pub(crate) fn ticker(interval: Duration) -> tokio::time::Interval {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    }

    /// A shard acquired: its position is the lease's checkpoint from now
    /// on (none at a sentinel), whatever an earlier holding left here.
    pub(crate) fn resume_at(
        &mut self,
        shard: &std::sync::Arc<str>,
        range: crate::state::HashRange,
        at: Option<Position>,
    ) {
        self.positions.reset(shard, at);
        self.acquired.push((shard.clone(), range));
    }

    /// Notes the positions of a batch passed on.
    pub(crate) fn passed_on<'a>(&mut self, batch: impl DoubleEndedIterator<Item = &'a Position>) {
        self.positions.note(batch);
    }

    /// The next barrier, after everything passed on; `end`: the input ended
    /// (`Some(true)` when exhausted), and it is the last.
    pub(crate) fn next(&mut self, end: Option<bool>) -> Barrier {
        let id = self.next_id;
        self.next_id += 1;
        Barrier {
            id,
            positions: self.positions.sorted(),
            end_of_input: end == Some(true),
            last: end.is_some(),
            delta: None,
            released: Vec::new(),
            acquired: std::mem::take(&mut self.acquired),
            marks: Vec::new(),
            next_seq: 0,
        }
    }
}
