//! Wires the stages from config and runs them until the input ends or a
//! shutdown is asked for.
//!
//! ```text
//! source ─▶ decode ─▶ engine ─▶ [inference] ─▶ fan-out ─▶ sink tasks
//!   (records)  │ + barriers                         │ acks
//!              └───────────────────────────────────▶ committer ─▶ RocksDB
//! ```
//!
//! What travels on these arrows (batches, checkpoint barriers, the state
//! delta a barrier collects) is in [`crate::flow`]; the checkpoint protocol,
//! barrier injection and the committer are in [`crate::checkpoint`]. This
//! file creates the channels, builds and spawns the stages (decode, engine,
//! fan-out; inference and sinks from their modules) and drains everything
//! on shutdown.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::checkpoint::{self, Barriers, PendingCommit};
use crate::config::Config;
use crate::decode::Decoder;
use crate::engine::{Engine, EngineOptions, PREFETCH_AHEAD};
use crate::flow::{Decoded, Message};
// Re-exported only for tests/inference_backpressure.rs, which imports
// `pipeline::Stats` and is being edited elsewhere; drop once it imports
// `shardflow::flow::Stats`.
pub use crate::flow::Stats;
use crate::inference;
use crate::record::{KindSet, Output, OutputKind, RawOutput};
use crate::sink::stdout::StdoutClosed;
use crate::sink::{self, SinkMessage};
use crate::source::{self, DecodedRecord, SourceContext, SourceMessage};
use crate::state::StateStore;
use crate::telemetry::StageClock;
use crate::time::{now_millis, Millis};

/// Options a run takes besides the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Wipe state whose fingerprint does not match instead of refusing to start.
    pub reset_state: bool,
    /// Print a progress line on stderr (when it is a terminal).
    pub progress: bool,
    /// AWS configuration for SageMaker, instead of the standard chain
    /// (programs that embed shardflow, and tests).
    pub aws: Option<aws_config::SdkConfig>,
    /// Set by `shardflow replay`: the source is an archive, partitions are
    /// never idle by wall clock, and each archived record brings the
    /// watermark the live run had (see `Engine::advance_to`).
    pub replay: bool,
    /// `--from`, `--to` and progress counters for an S3 source.
    pub archive: source::ArchiveOptions,
    /// `--export FILE`: training rows (see `replay::export`).
    pub export: Option<crate::replay::export::ExportOptions>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub records_in: u64,
    pub dead_letters: u64,
    pub checkpoints: u64,
    pub last_checkpoint: u64,
}

/// A stage's downstream neighbour is gone: it failed (and says why itself).
#[derive(Debug, thiserror::Error)]
#[error("{0} stopped early")]
struct DownstreamGone(&'static str);

/// Runs the pipeline until the input ends or `shutdown` becomes true, then
/// drains, commits a final checkpoint and returns.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> anyhow::Result<RunSummary> {
    let store = StateStore::open(
        &config.pipeline.state_dir,
        &config.state_fingerprint(),
        options.reset_state,
    )
    .with_context(|| format!("opening state in {}", config.pipeline.state_dir.display()))?;
    let last_checkpoint = store.committed_checkpoint()?;
    let resume_from = store.committed_positions()?;
    if last_checkpoint > 0 {
        tracing::info!(
            checkpoint = last_checkpoint,
            partitions = resume_from.len(),
            "restoring from the last checkpoint"
        );
    }

    if matches!(config.source(), crate::config::SourceConfig::S3(_)) && !options.replay {
        anyhow::bail!("an s3 source (an archive) is read by `shardflow replay`, not `run`");
    }
    let epoch = store.created_at()?;

    let model = inference::build_with(&config, options.aws.clone())?;
    if let Some(m) = &model {
        m.ready().await.context("preparing the model")?;
    }
    let src = source::build_with(&config, &options.archive)?;
    tracing::info!(source = %src.describe(), "starting");
    let cap = config.pipeline.channel_capacity;
    let mut tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)> = Vec::new();

    // A sink that batches across checkpoints (the S3 archive) holds their
    // acknowledgements; the commit queue must have room for them.
    let interval_ms = config.pipeline.checkpoint_interval.millis().max(1);
    let commit_cap = config
        .sinks
        .iter()
        .filter_map(|s| match s.get_ref() {
            crate::config::SinkConfig::S3(c) => {
                Some((c.max_age.millis() / interval_ms + 2).clamp(0, 1024) as usize)
            }
            _ => None,
        })
        .fold(cap, usize::max);
    let sink_ctx = sink::SinkContext {
        next_checkpoint: last_checkpoint + 1,
        epoch,
        max_open_checkpoints: commit_cap,
    };

    // Sinks first, so that a sink that cannot open fails before any input is read.
    let mut sink_inputs = Vec::new();
    let mut subscribed = config.subscribed_kinds();
    for (i, sink_config) in config.sinks.iter().enumerate() {
        let sink_config = sink_config.get_ref();
        let built = sink::build(sink_config, sink_ctx)?;
        let label = format!("{}#{i}", sink_config.type_name());
        tracing::info!(sink = %built.describe(), kinds = ?sink_config.kinds(), "sink ready");
        let (tx, rx) = mpsc::channel(cap);
        sink_inputs.push(tx);
        let blocks = built.blocks();
        let task = sink::run_sink(built, sink_config.kind_set(), label, rx);
        tasks.push((
            "sink",
            if blocks {
                on_own_thread("shardflow-sink", task)
            } else {
                tokio::spawn(task)
            },
        ));
    }
    if let Some(export) = &options.export {
        let built = crate::replay::export::ExportSink::create(export, &config)?;
        let kinds = built.kinds();
        for k in OutputKind::ALL {
            if kinds.contains(k) {
                subscribed.insert(k);
            }
        }
        tracing::info!(sink = %sink::Sink::describe(&built), "export ready");
        let (tx, rx) = mpsc::channel(cap);
        sink_inputs.push(tx);
        tasks.push((
            "export",
            on_own_thread(
                "shardflow-export",
                sink::run_sink(Box::new(built), kinds, "export".into(), rx),
            ),
        ));
    }

    let window_results = subscribed.contains(OutputKind::Window);
    if !window_results && !config.features.is_empty() {
        tracing::info!("no sink takes window results: windows only feed feature vectors");
    }
    let engine = Engine::with_options(
        &config,
        store.clone(),
        EngineOptions {
            cache_capacity: config.pipeline.state_cache_entries,
            event_time_only: options.replay,
            window_results,
            fire_chunk_keys: config.pipeline.batch_size.max(1),
            ..EngineOptions::default()
        },
    )
    .context("restoring the window engine")?;

    let (source_tx, source_rx) = mpsc::channel(cap);
    let ctx = SourceContext {
        output: source_tx,
        shutdown: shutdown.clone(),
        resume_from: resume_from.clone(),
        batch_size: config.pipeline.batch_size,
        state: Some(store.clone()),
    };
    tasks.push(("source", tokio::spawn(src.run(ctx))));

    let (decoded_tx, decoded_rx) = mpsc::channel(cap);
    let decoder = Decoder::new(&config.schema);
    let interval = config.pipeline.checkpoint_interval.std();
    let range = options
        .replay
        .then_some((options.archive.from, options.archive.to));
    tasks.push((
        "decode",
        tokio::spawn(decode_stage(
            decoder,
            DecodeSettings {
                interval,
                barriers: Barriers::new(last_checkpoint, resume_from),
                range,
            },
            source_rx,
            decoded_tx,
            stats.clone(),
        )),
    ));

    let (engine_tx, engine_rx) = mpsc::channel(cap);
    let committed = Arc::new(AtomicU64::new(last_checkpoint));
    tasks.push((
        "engine",
        // RocksDB reads on cache misses block: not on the runtime's workers.
        on_own_thread(
            "shardflow-engine",
            engine_stage(
                engine,
                subscribed.contains(OutputKind::Raw),
                committed.clone(),
                decoded_rx,
                engine_tx,
                stats.clone(),
            ),
        ),
    ));

    let fanout_rx = match model {
        Some(model) => {
            let (tx, rx) = mpsc::channel(cap);
            let keep_features = subscribed.contains(OutputKind::Features);
            let inf = config.inference.clone();
            tasks.push((
                "inference",
                tokio::spawn(crate::inference::batcher::run(
                    model,
                    inf,
                    keep_features,
                    engine_rx,
                    tx,
                )),
            ));
            rx
        }
        None => engine_rx,
    };

    let (commit_tx, commit_rx) = mpsc::channel(commit_cap);
    tasks.push((
        "fan-out",
        tokio::spawn(fanout_stage(
            fanout_rx,
            sink_inputs,
            subscribed,
            commit_tx,
            stats.clone(),
        )),
    ));
    let committer = tokio::spawn(checkpoint::committer_stage(
        store,
        commit_rx,
        committed,
        stats.clone(),
    ));

    stats.ready.store(true, Ordering::Relaxed);
    let progress = (options.progress && std::io::stderr().is_terminal())
        .then(|| config.pipeline.progress_interval.std())
        .filter(|d| !d.is_zero())
        .map(|every| tokio::spawn(progress_task(stats.clone(), every)));

    let committed = committer.await.context("committer task panicked")?;
    stats.ready.store(false, Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
    }
    let mut first_error = committed.as_ref().err().map(|e| anyhow::anyhow!("{e:#}"));
    for (name, task) in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if e.is::<DownstreamGone>() {
                    // A consequence of the failure that stopped that stage,
                    // which is reported on its own.
                    tracing::debug!(stage = name, error = %e, "stage stopped");
                } else if e.chain().any(|c| c.is::<StdoutClosed>()) {
                    tracing::info!(stage = name, "{e}");
                } else {
                    tracing::error!(stage = name, error = %format!("{e:#}"), "stage failed");
                }
                first_error.get_or_insert(e.context(format!("{name} stage")));
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("{name} stage panicked: {e}"));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let last = committed?;
    Ok(RunSummary {
        records_in: stats.records_in.load(Ordering::Relaxed),
        dead_letters: stats.dead_letters.load(Ordering::Relaxed),
        checkpoints: stats.checkpoints.load(Ordering::Relaxed),
        last_checkpoint: last,
    })
}

/// Runs a stage that blocks its thread (RocksDB reads, file writes and
/// fsync, compression) on a thread of its own, with a single-threaded
/// runtime for its channels and timers, so that it never stalls the
/// workers that serve the Kinesis HTTP/2 streams and the inference calls.
fn on_own_thread<F>(name: &'static str, stage: F) -> JoinHandle<anyhow::Result<()>>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (done_tx, done_rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a stage's runtime")
                .and_then(|rt| rt.block_on(stage));
            let _ = done_tx.send(result);
        });
    tokio::spawn(async move {
        spawned.with_context(|| format!("starting thread {name}"))?;
        done_rx
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("thread {name} panicked")))
    })
}

/// How the decode stage places barriers and which events it lets through.
struct DecodeSettings {
    /// Time between checkpoint barriers.
    interval: Duration,
    /// Barrier injection, from the last committed checkpoint.
    barriers: Barriers,
    /// Replay only: `--from`/`--to` on event time.
    range: Option<EventTimeRange>,
}

/// `[from, to)` on event time, each end optional.
type EventTimeRange = (Option<Millis>, Option<Millis>);

/// Decodes records and injects barriers.
async fn decode_stage(
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
                    let batch = raw
                        .into_iter()
                        .map(|raw| DecodedRecord {
                            replay_watermark: raw.replay_watermark,
                            event: decoder.decode(raw),
                        })
                        .collect();
                    let batch = state.pass_on(batch);
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
/// on (for its barriers), the replay's last archived watermark, the replay's
/// range filter and its counters.
struct DecodeState {
    /// The barriers' ids and the last position passed on, per partition.
    barriers: Barriers,
    /// Replay: the last live-run watermark passed on.
    /// `None` before the first archived record: that one is passed on even
    /// at −∞, so the engine follows the archive's watermark from the start.
    replayed_watermark: Option<Millis>,
    range: Option<EventTimeRange>,
    stats: Arc<Stats>,
    records_in: metrics::Counter,
    dead: metrics::Counter,
}

impl DecodeState {
    /// The batch for the engine: positions noted, replay watermarks
    /// interleaved, events outside the replay's range left out, counted.
    fn pass_on(&mut self, batch: Vec<DecodedRecord>) -> Vec<Decoded> {
        self.barriers
            .passed_on(batch.iter().map(DecodedRecord::position));
        let records = batch.len() as u64;
        let mut dead = 0;
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            if let Some(w) = r.replay_watermark.filter(|_| self.range.is_some()) {
                if self.replayed_watermark.is_none_or(|r| w > r) {
                    self.replayed_watermark = Some(w);
                    out.push(Decoded::Advance(w));
                }
            }
            match r.event {
                Ok(event) => {
                    if let Some((from, to)) = self.range {
                        let t = event.event_time;
                        if from.is_some_and(|f| t < f) || to.is_some_and(|to| t >= to) {
                            self.stats.out_of_range.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    out.push(Decoded::Event(event))
                }
                Err(d) => {
                    dead += 1;
                    out.push(Decoded::Dead(d));
                }
            }
        }
        self.count(records, dead);
        out
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
    async fn send<T>(
        &mut self,
        output: &mpsc::Sender<Message<T>>,
        message: Message<T>,
    ) -> Result<(), mpsc::error::SendError<Message<T>>> {
        let started = Instant::now();
        let sent = output.send(message).await;
        self.stalled += started.elapsed();
        sent
    }
}

/// Runs the window engine: feature records, window results and late events,
/// plus the state delta each barrier carries to the committer. A firing
/// burst leaves in chunks of `fire_chunk_keys` keys, each sent (and so
/// backpressured) before the next is made.
async fn engine_stage(
    mut engine: Engine,
    emit_raw: bool,
    committed: Arc<AtomicU64>,
    mut input: mpsc::Receiver<Message<Decoded>>,
    output: mpsc::Sender<Message<Output>>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
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
                    let mut items = batch.into_iter();
                    loop {
                        let n = process_batch(&mut engine, &mut items, emit_raw, clock.now(), &mut out)?;
                        events.increment(n);
                        stats.events.fetch_add(n, Ordering::Relaxed);
                        if items.as_slice().is_empty() {
                            clock_out.left(arrival);
                            break;
                        }
                        // A burst stopped the batch: hand it on before the next event.
                        if !hand_on(&mut engine, &mut clock, &output, std::mem::take(&mut out)).await? {
                            return Ok(());
                        }
                    }
                }
                Some(Message::Barrier(mut b)) => {
                    if b.end_of_input {
                        engine.finish(&mut out)?;
                        if !hand_on(&mut engine, &mut clock, &output, std::mem::take(&mut out)).await? {
                            return Ok(());
                        }
                    }
                    b.delta = Some(engine.snapshot(b.id)?);
                    barrier = Some(b);
                }
                None => return Ok(()),
            },
        }
        let wm = engine.watermark();
        stats.watermark.store(wm, Ordering::Relaxed);
        watermark.set(wm as f64);
        if !hand_on(&mut engine, &mut clock, &output, out).await? {
            return Ok(());
        }
        if let Some(b) = barrier {
            if clock.send(&output, Message::Barrier(b)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Sends `out` downstream, then the rest of a pending firing burst chunk
/// by chunk. False when downstream is gone.
async fn hand_on(
    engine: &mut Engine,
    clock: &mut ProcessingClock,
    output: &mpsc::Sender<Message<Output>>,
    mut out: Vec<Output>,
) -> anyhow::Result<bool> {
    loop {
        if !out.is_empty() && clock.send(output, Message::Batch(out)).await.is_err() {
            return Ok(false);
        }
        if !engine.firing() {
            return Ok(true);
        }
        out = Vec::new();
        engine.fire_more(&mut out)?;
    }
}

/// Runs a batch through the engine into `out`, until it is consumed or an
/// item leaves a firing burst pending (the caller hands `out` on, drains
/// the burst and calls again with the rest). Returns how many events it
/// processed.
fn process_batch(
    engine: &mut Engine,
    items: &mut std::vec::IntoIter<Decoded>,
    emit_raw: bool,
    now: Millis,
    out: &mut Vec<Output>,
) -> anyhow::Result<u64> {
    let mut events = 0;
    out.reserve(items.len());
    while !items.as_slice().is_empty() {
        let ahead = items.as_slice();
        let ahead = &ahead[..ahead.len().min(PREFETCH_AHEAD)];
        engine.prefetch(ahead.iter().filter_map(|d| match d {
            Decoded::Event(e) => Some(&*e.key),
            _ => None,
        }));
        for _ in 0..PREFETCH_AHEAD {
            let Some(d) = items.next() else { break };
            match d {
                Decoded::Event(e) => {
                    events += 1;
                    if emit_raw {
                        out.push(Output::Raw(RawOutput {
                            position: e.position.clone(),
                            event_time: Some(e.event_time),
                            watermark: engine.watermark(),
                            data: e.raw.clone(),
                        }));
                    }
                    engine.process(&e, now, out)?;
                }
                Decoded::Dead(d) => {
                    if emit_raw {
                        out.push(Output::Raw(RawOutput {
                            position: d.position.clone(),
                            event_time: None,
                            watermark: engine.watermark(),
                            data: d.raw.clone(),
                        }));
                    }
                    out.push(Output::DeadLetter(*d));
                }
                Decoded::Unreadable(d) => out.push(Output::DeadLetter(*d)),
                Decoded::Advance(w) => engine.advance_to(w, out)?,
                Decoded::Partition(name, status) => {
                    engine.partition_status(&name, status, now, out)?
                }
            }
            if engine.firing() {
                return Ok(events);
            }
        }
    }
    Ok(events)
}

/// Hands outputs to the sinks that subscribe to them and barriers to all.
async fn fanout_stage(
    mut input: mpsc::Receiver<Message<Output>>,
    sinks: Vec<mpsc::Sender<SinkMessage>>,
    subscribed: KindSet,
    commits: mpsc::Sender<PendingCommit>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let counters: Vec<metrics::Counter> = OutputKind::ALL
        .iter()
        .map(|k| metrics::counter!("shardflow_outputs_total", "kind" => k.as_str()))
        .collect();
    let mut unsubscribed_reported = 0u64;
    while let Some(message) = input.recv().await {
        match message {
            Message::Batch(batch) => {
                if batch.is_empty() {
                    continue;
                }
                for o in &batch {
                    let kind = o.kind();
                    counters[kind as usize].increment(1);
                    stats.outputs[kind as usize].fetch_add(1, Ordering::Relaxed);
                    // Nothing is dropped silently: a dead letter or late event
                    // that no sink takes is at least logged (the first 100,
                    // then every 10,000th) and always counted.
                    if matches!(kind, OutputKind::DeadLetter | OutputKind::Late)
                        && !subscribed.contains(kind)
                    {
                        unsubscribed_reported += 1;
                        if unsubscribed_reported <= 100
                            || unsubscribed_reported.is_multiple_of(10_000)
                        {
                            tracing::warn!(kind = %kind, id = %o.id(), record = %o.to_ndjson().trim_end(), "no sink subscribes to this kind");
                        }
                    }
                }
                let batch = Arc::new(batch);
                for s in &sinks {
                    if s.send(SinkMessage::Batch(batch.clone())).await.is_err() {
                        return Err(DownstreamGone("a sink").into());
                    }
                }
            }
            Message::Barrier(b) => {
                let mut acks = Vec::with_capacity(sinks.len());
                for s in &sinks {
                    let (tx, rx) = oneshot::channel();
                    let message = SinkMessage::Barrier {
                        id: b.id,
                        last: b.last,
                        ack: tx,
                    };
                    if s.send(message).await.is_err() {
                        return Err(DownstreamGone("a sink").into());
                    }
                    acks.push(rx);
                }
                let last = b.last;
                if commits.send((b, acks)).await.is_err() {
                    return Err(DownstreamGone("the committer").into());
                }
                if last {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// A progress line on stderr every `every`.
async fn progress_task(stats: Arc<Stats>, every: Duration) {
    let started = Instant::now();
    let mut last = (0u64, Instant::now());
    loop {
        tokio::time::sleep(every).await;
        let n = stats.records_in.load(Ordering::Relaxed);
        let rate = (n - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-3);
        last = (n, Instant::now());
        eprintln!(
            "[{:>5.0}s] in {n} ({rate:.0}/s) · dead letters {} · predictions {} · windows {} · late {} · checkpoints {}",
            started.elapsed().as_secs_f64(),
            stats.dead_letters.load(Ordering::Relaxed),
            stats.output_count(OutputKind::Prediction),
            stats.output_count(OutputKind::Window),
            stats.output_count(OutputKind::Late),
            stats.checkpoints.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage that blocks its thread does not block the runtime: here it
    /// waits, blocking, for what a task on the (single-threaded) runtime
    /// sends, which only arrives if the stage is not on that thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blocking_stage_leaves_the_runtime_free() {
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let stage = on_own_thread("test-stage", async move {
            let got = rx.recv_timeout(Duration::from_secs(20))?;
            anyhow::ensure!(got == 7);
            Ok(())
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(7).unwrap();
        });
        stage.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stage_that_panics_is_an_error() {
        let stage = on_own_thread("test-panic", async {
            let empty = std::hint::black_box(Vec::<u32>::new());
            anyhow::ensure!(empty[0] == 1); // out of bounds: panics
            Ok(())
        });
        let e = stage.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
    }
}
