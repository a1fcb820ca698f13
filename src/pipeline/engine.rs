//! The engine stage: events through the window engine into feature
//! records, window results and late events, on a thread of its own (a
//! cache miss reads RocksDB); the state delta each barrier collects; the
//! online API's requests, answered between events.
//!
//! Fairness: each turn of the loop handles the tick, or one input message
//! (a batch of at most `batch_size` records with the firing it causes, or
//! a barrier), or a request when nothing else is ready; then it answers
//! queued requests worth at most `query_budget` keys. Inside a batch,
//! between every [`PREFETCH_AHEAD`] events, it answers queued requests
//! worth at most as many keys, so a request waits for a few dozen events
//! rather than a whole batch. While it waits for downstream to take its
//! outputs, it answers requests as they come. Under a backlog of input,
//! requests still get answered within every batch; under a flood of
//! requests, input and barriers still get a turn after every budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::engine::{Engine, PREFETCH_AHEAD};
use crate::flow::{Decoded, Message, ShardChange, Stats};
use crate::online::Inbox;
use crate::record::{Output, RawOutput};
use crate::telemetry::StageClock;
use crate::time::{now_millis, Millis};

/// Processing time for the engine's idle clocks: the wall clock less the
/// time the engine stage spent waiting for downstream. While the pipeline
/// backpressures, no record can arrive, so that time must not make a
/// partition idle (its records are waiting behind the stall).
#[derive(Default)]
struct ProcessingClock {
    stalled: Duration,
}

impl ProcessingClock {
    fn now(&self) -> Millis {
        now_millis() - self.stalled.as_millis() as Millis
    }

    /// Sends `message` downstream, counting the wait as stalled time.
    /// While downstream makes it wait, the online API's requests are
    /// answered (`serving`: the inbox, the engine, the budget per request
    /// batch): the state is between two events then, and a slow sink or
    /// model must not make reads wait for it.
    async fn send<T>(
        &mut self,
        output: &mpsc::Sender<Message<T>>,
        message: Message<T>,
        serving: Option<(&mut Inbox, &mut Engine, usize)>,
    ) -> Result<(), mpsc::error::SendError<Message<T>>> {
        let started = Instant::now();
        let sent = match serving {
            None => output.send(message).await,
            Some((inbox, engine, budget)) => loop {
                // The engine stage is the channel's only sender, so a
                // reservation given up for a request loses no place.
                let query = tokio::select! {
                    biased;
                    permit = output.reserve() => break match permit {
                        Ok(permit) => {
                            permit.send(message);
                            Ok(())
                        }
                        Err(_) => Err(mpsc::error::SendError(message)),
                    },
                    query = inbox.next() => query,
                };
                inbox.serve(engine, Some(query), budget);
            },
        };
        self.stalled += started.elapsed();
        sent
    }
}

/// What the engine stage does besides processing events.
pub(super) struct EngineSettings {
    /// Emit each input record as a `raw` output.
    pub emit_raw: bool,
    /// Keys' worth of online requests answered per turn of the loop.
    pub query_budget: usize,
}

/// Runs the window engine: feature records, window results and late events,
/// plus the state delta each barrier carries to the committer, and the
/// online API's requests. A firing burst leaves in chunks of
/// `fire_chunk_keys` keys, each sent (and so backpressured) before the next
/// is made.
pub(super) async fn engine_stage(
    mut engine: Engine,
    settings: EngineSettings,
    committed: Arc<AtomicU64>,
    (mut input, mut queries): (mpsc::Receiver<Message<Decoded>>, Option<Inbox>),
    output: mpsc::Sender<Message<Output>>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let (emit_raw, budget) = (settings.emit_raw, settings.query_budget);
    let events = metrics::counter!("shardflow_events_total");
    let watermark = metrics::gauge!("shardflow_watermark_ms");
    // Processing time drives idleness; a few ticks a second are plenty.
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clock = ProcessingClock::default();
    let clock_out = StageClock::new("engine");
    let mut seen_commit = 0;
    loop {
        let mut out = Vec::new();
        let mut barrier = None;
        let mut query = None;
        let next_query = async {
            match queries.as_mut() {
                Some(q) => q.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // The ticker first: under a backlog input is always ready, and
            // eviction and idleness must still run on time.
            biased;
            _ = ticker.tick() => {
                let c = committed.load(Ordering::Acquire);
                if c > seen_commit {
                    engine.committed(c);
                    seen_commit = c;
                }
                engine.on_tick(clock.now(), &mut out)?;
            }
            message = input.recv() => match message {
                Some(Message::Batch(batch)) => {
                    let arrival = batch.iter().find_map(|d| match d {
                        Decoded::Event(e) => Some(e.arrival),
                        _ => None,
                    });
                    let mut items = Unprocessed { batch, at: 0 };
                    loop {
                        let n = process_batch(&mut engine, &mut items, (emit_raw, queries.as_mut()), clock.now(), &mut out)?;
                        events.increment(n);
                        stats.events.fetch_add(n, Ordering::Relaxed);
                        if items.rest().is_empty() {
                            clock_out.left(arrival);
                            break;
                        }
                        // A burst stopped the batch: hand it on before the next event.
                        if !hand_on(&mut engine, &mut clock, (&output, queries.as_mut(), budget), std::mem::take(&mut out)).await? {
                            return Ok(());
                        }
                    }
                }
                Some(Message::Barrier(mut b)) => {
                    if b.end_of_input {
                        engine.finish(&mut out)?;
                        if !hand_on(&mut engine, &mut clock, (&output, queries.as_mut(), budget), std::mem::take(&mut out)).await? {
                            return Ok(());
                        }
                    }
                    b.delta = Some(engine.snapshot(b.id)?);
                    b.marks = engine.partition_marks();
                    b.next_seq = engine.next_seq();
                    for r in &b.released {
                        let keys = engine.forget_shard(&r.shard, r.range);
                        tracing::info!(shard = %r.shard, keys, why = ?r.why, "shard released: its state leaves the engine");
                    }
                    barrier = Some(b);
                }
                None => return Ok(()),
            },
            // Last: an idle input leaves the engine to the requests; a busy
            // one still lets them in after each batch (below).
            q = next_query => query = Some(q),
        }
        let wm = engine.watermark();
        stats.watermark.store(wm, Ordering::Relaxed);
        watermark.set(wm as f64);
        if !hand_on(
            &mut engine,
            &mut clock,
            (&output, queries.as_mut(), budget),
            out,
        )
        .await?
        {
            return Ok(());
        }
        if let Some(b) = barrier {
            let serving = queries.as_mut().map(|q| (q, &mut engine, budget));
            if clock
                .send(&output, Message::Barrier(b), serving)
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        if let Some(inbox) = queries.as_mut() {
            inbox.serve(&mut engine, query, budget);
        }
    }
}

/// Sends `out` downstream, then the rest of a pending firing burst chunk
/// by chunk. False when downstream is gone.
async fn hand_on(
    engine: &mut Engine,
    clock: &mut ProcessingClock,
    (output, mut queries, budget): (&mpsc::Sender<Message<Output>>, Option<&mut Inbox>, usize),
    mut out: Vec<Output>,
) -> anyhow::Result<bool> {
    loop {
        let serving = queries.as_deref_mut().map(|q| (q, &mut *engine, budget));
        if !out.is_empty()
            && clock
                .send(output, Message::Batch(out), serving)
                .await
                .is_err()
        {
            return Ok(false);
        }
        if !engine.firing() {
            return Ok(true);
        }
        out = Vec::new();
        engine.fire_more(&mut out)?;
    }
}

/// A batch the engine works through in place: an event is read where it
/// lies, not moved out of the batch first (an event is a few hundred bytes;
/// taking each out of a `vec::IntoIter` and out of its `Decoded` copied it
/// three times). The batch drops what it holds when it is done.
struct Unprocessed {
    batch: Vec<Decoded>,
    /// The items before it are processed.
    at: usize,
}

impl Unprocessed {
    fn rest(&self) -> &[Decoded] {
        &self.batch[self.at..]
    }
}

/// Runs a batch through the engine into `out`, until it is consumed or an
/// item leaves a firing burst pending (the caller hands `out` on, drains
/// the burst and calls again with the rest). Returns how many events it
/// processed.
fn process_batch(
    engine: &mut Engine,
    items: &mut Unprocessed,
    (emit_raw, mut queries): (bool, Option<&mut Inbox>),
    now: Millis,
    out: &mut Vec<Output>,
) -> anyhow::Result<u64> {
    let mut events = 0;
    out.reserve(items.rest().len());
    while !items.rest().is_empty() {
        let ahead = items.rest();
        let ahead = &ahead[..ahead.len().min(PREFETCH_AHEAD)];
        engine.prefetch(ahead.iter().filter_map(|d| match d {
            Decoded::Event(e) => Some(&*e.key),
            _ => None,
        }));
        for _ in 0..PREFETCH_AHEAD {
            let Some(d) = items.batch.get_mut(items.at) else {
                break;
            };
            items.at += 1;
            match d {
                Decoded::Event(e) => {
                    events += 1;
                    if emit_raw {
                        out.push(Output::Raw(RawOutput {
                            position: e.position.clone(),
                            // Its own copy: a `Key` here would make every
                            // output 8 bytes larger, for archives alone.
                            decoded: Some((Arc::from(&*e.key), e.event_time)),
                            watermark: engine.watermark(),
                            data: e.raw.clone(),
                        }));
                    }
                    engine.process(e, now, out)?;
                }
                // A dead letter goes on as an output, so it is taken out;
                // its processed slot keeps a placeholder no one reads.
                Decoded::Dead(_) | Decoded::Unreadable(_) => {
                    match std::mem::replace(d, Decoded::Advance(Millis::MIN)) {
                        Decoded::Dead(d) => {
                            if emit_raw {
                                out.push(Output::Raw(RawOutput {
                                    position: d.position.clone(),
                                    decoded: None,
                                    watermark: engine.watermark(),
                                    data: d.raw.clone(),
                                }));
                            }
                            out.push(Output::DeadLetter(d));
                        }
                        Decoded::Unreadable(d) => out.push(Output::DeadLetter(d)),
                        _ => unreachable!("matched above"),
                    }
                }
                Decoded::Advance(w) => engine.advance_to(*w, out)?,
                Decoded::Partition(name, status) => {
                    engine.partition_status(name, *status, now, out)?
                }
                Decoded::Shard(ShardChange::Acquired {
                    shard,
                    range,
                    max_event_time,
                    watermark,
                    next_seq,
                    ..
                }) => {
                    let timers = engine.adopt_shard(
                        shard,
                        *range,
                        (*max_event_time, *watermark),
                        *next_seq,
                    )?;
                    tracing::info!(%shard, timers, "shard acquired: the engine adopted its state");
                }
                Decoded::Ranges(ranges) => engine.partition_ranges(ranges, out)?,
                // Releases travel in barriers.
                Decoded::Shard(ShardChange::Released(_)) => {}
            }
            if engine.firing() {
                return Ok(events);
            }
        }
        // Between two prefetched runs of events (no firing pending): a
        // request waits for at most this many events, not a whole batch.
        if let Some(inbox) = queries.as_deref_mut() {
            inbox.serve(engine, None, PREFETCH_AHEAD);
        }
    }
    Ok(events)
}
