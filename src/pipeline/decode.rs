//! The decode stage: a source's records into events (or dead letters),
//! checkpoint barriers injected every `checkpoint_interval`, the range
//! filter, archived watermarks interleaved with the events they precede.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::checkpoint::Barriers;
use crate::decode::Decoder;
use crate::flow::{Decoded, Message, ShardChange, Stats};
use crate::record::{DeadLetter, Event, PartitionStatus, RawRecord};
use crate::source::{DecodedRecord, EventTimeRange, SourceMessage};
use crate::telemetry::StageClock;
use crate::time::Millis;

/// How the decode stage places barriers and which events it lets through.
pub(super) struct DecodeSettings {
    /// Time between checkpoint barriers.
    pub interval: Duration,
    /// Barrier injection, from the last committed checkpoint.
    pub barriers: Barriers,
    /// Only events in this event-time range reach the engine (replay's
    /// `--from`/`--to`); the others are counted in `Stats::out_of_range`.
    pub range: Option<EventTimeRange>,
}

/// Decodes records and injects barriers.
pub(super) async fn decode_stage(
    decoder: Decoder,
    settings: DecodeSettings,
    mut input: mpsc::Receiver<SourceMessage>,
    output: mpsc::Sender<Message<Decoded>>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let DecodeSettings {
        interval,
        barriers,
        range,
    } = settings;
    let mut state = DecodeState {
        barriers,
        replayed_watermark: None,
        range,
        stats,
        records_in: metrics::counter!("shardflow_records_in_total"),
        dead: metrics::counter!("shardflow_dead_letters_total", "stage" => "decode"),
    };
    let decoded = StageClock::new("decode");
    let mut ticker = Barriers::ticker(interval);
    loop {
        let sent = tokio::select! {
            // The ticker first: under a backlog input is always ready, and
            // barriers must still go out every `checkpoint_interval`.
            biased;
            _ = ticker.tick() => {
                let b = state.barriers.next(None);
                output.send(Message::Barrier(b)).await
            }
            message = input.recv() => match message {
                Some(SourceMessage::Batch(raw)) => {
                    let arrival = raw.first().map(|r| r.arrival);
                    let batch = state.decode_and_pass_on(&decoder, raw);
                    decoded.left(arrival);
                    output.send(Message::Batch(batch)).await
                }
                Some(SourceMessage::Decoded(batch)) => {
                    output.send(Message::Batch(state.pass_on(batch))).await
                }
                Some(SourceMessage::Bad(d)) => {
                    state.count(0, 1);
                    output.send(Message::Batch(vec![Decoded::Unreadable(Box::new(d))])).await
                }
                Some(SourceMessage::End { exhausted }) => {
                    let b = state.barriers.next(Some(exhausted));
                    let _ = output.send(Message::Barrier(b)).await;
                    return Ok(());
                }
                Some(SourceMessage::Shard(ShardChange::Released(released))) => {
                    // At once: the shard's next holder waits for this commit.
                    let mut b = state.barriers.next(None);
                    b.released.push(released);
                    output.send(Message::Barrier(b)).await
                }
                Some(SourceMessage::Shard(acquired)) => {
                    if let ShardChange::Acquired { shard, range, resume, .. } = &acquired {
                        state.barriers.resume_at(shard, *range, resume.clone());
                    }
                    output.send(Message::Batch(vec![Decoded::Shard(acquired)])).await
                }
                Some(SourceMessage::Ranges(ranges)) => {
                    let known = ranges
                        .iter()
                        .map(|(n, _)| Decoded::Partition(n.clone(), PartitionStatus::Known));
                    let batch = std::iter::once(Decoded::Ranges(ranges.clone())).chain(known).collect();
                    output.send(Message::Batch(batch)).await
                }
                Some(SourceMessage::Partitions(names, status)) => {
                    let batch = names.into_iter().map(|n| Decoded::Partition(n, status)).collect();
                    output.send(Message::Batch(batch)).await
                }
                None => anyhow::bail!("the source stopped without ending its input"),
            },
        };
        if sent.is_err() {
            return Ok(());
        }
    }
}

/// What the decode stage keeps between batches: the last positions passed
/// on (for its barriers), the last archived watermark passed on, the range
/// filter and its counters.
struct DecodeState {
    /// The barriers' ids and the last position passed on, per partition.
    barriers: Barriers,
    /// The last archived watermark passed on (records a source replays
    /// carry the watermark the recorded run had, see
    /// [`RawRecord::replay_watermark`](crate::record::RawRecord)). `None`
    /// before the first archived record: that one is passed on even at
    /// −∞, so the engine follows the archive's watermark from the start.
    replayed_watermark: Option<Millis>,
    range: Option<EventTimeRange>,
    stats: Arc<Stats>,
    records_in: metrics::Counter,
    dead: metrics::Counter,
}

impl DecodeState {
    /// The batch for the engine: positions noted, archived watermarks
    /// interleaved, events outside the range left out, counted.
    fn pass_on(&mut self, batch: Vec<DecodedRecord>) -> Vec<Decoded> {
        self.barriers
            .passed_on(batch.iter().map(DecodedRecord::position));
        self.hand_on(batch, |r| r.replay_watermark, |r| r.event)
    }

    /// [`pass_on`](Self::pass_on) of a source's raw records, each decoded
    /// straight into the batch handed on rather than into a batch of its
    /// own first.
    fn decode_and_pass_on(&mut self, decoder: &Decoder, batch: Vec<RawRecord>) -> Vec<Decoded> {
        self.barriers.passed_on(batch.iter().map(|r| &r.position));
        self.hand_on(batch, |r| r.replay_watermark, |raw| decoder.decode(raw))
    }

    /// The batch handed on of records whose positions were noted: each
    /// event (when in range) or dead letter, after the archived watermark
    /// before it when that moved on. An item's event is pushed as `event`
    /// gives it and taken back when out of range: an event is a few
    /// hundred bytes, each copy of it lands in memory not yet in the cache,
    /// and passing it on in a tuple per record copied it three times more.
    fn hand_on<T>(
        &mut self,
        batch: Vec<T>,
        replay_watermark: impl Fn(&T) -> Option<Millis>,
        mut event: impl FnMut(T) -> Result<Event, Box<DeadLetter>>,
    ) -> Vec<Decoded> {
        let n = batch.len() as u64;
        let mut dead = 0;
        let mut out = Vec::with_capacity(batch.len());
        for item in batch {
            if let Some(w) = replay_watermark(&item) {
                if self.replayed_watermark.is_none_or(|r| w > r) {
                    self.replayed_watermark = Some(w);
                    out.push(Decoded::Advance(w));
                }
            }
            out.push(match event(item) {
                Ok(event) => Decoded::Event(event),
                Err(d) => {
                    dead += 1;
                    Decoded::Dead(d)
                }
            });
            if let Some(Decoded::Event(e)) = out.last() {
                if !self.in_range(e.event_time) {
                    out.pop();
                }
            }
        }
        self.count(n, dead);
        out
    }

    /// Whether an event at `t` is in the range (counted when not).
    fn in_range(&self, t: Millis) -> bool {
        let Some((from, to)) = self.range else {
            return true;
        };
        if from.is_some_and(|f| t < f) || to.is_some_and(|to| t >= to) {
            self.stats.out_of_range.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn count(&self, records: u64, dead: u64) {
        self.records_in.increment(records);
        self.stats.records_in.fetch_add(records, Ordering::Relaxed);
        if dead > 0 {
            self.dead.increment(dead);
            self.stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
        }
    }
}
