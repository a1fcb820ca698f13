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
//! barrier injection and the committer are in [`crate::checkpoint`]. A
//! stage is a task that knows its input and output channels and the
//! component it drives: `decode.rs`, `engine.rs`, `fanout.rs` here; the
//! micro-batcher in [`crate::inference::batcher`], the sink task in
//! [`crate::sink`]. This file creates the channels, spawns the stages and
//! drains everything on shutdown.
//!
//! # Backpressure: what bounds memory
//!
//! - Every arrow is a bounded channel of `channel_capacity` batches, each of
//!   at most `batch_size` records: a slow stage makes the one before it
//!   wait, back to the source, which stops reading (a Kinesis shard holds
//!   at most `shard_buffer` batches, an archive `concurrency` objects).
//! - A firing burst (the end of input, a watermark jump after idleness, an
//!   archived watermark) leaves the engine in chunks of `batch_size` keys,
//!   each sent, and so backpressured, before the next is made.
//! - The batcher has at most `max_in_flight` batches of `max_batch` being
//!   scored; while all are busy it takes no input.
//! - The commit queue holds `channel_capacity` checkpoints, more when a sink
//!   batches across checkpoints (the S3 archive's `max_age` over the
//!   interval, at most 1,024), so that sink's held acknowledgements fit.
//! - Time the engine waits for downstream does not count as processing
//!   time: a backpressured partition is not idle.
//! - The online API's requests wait in a channel of `[api] max_in_flight`
//!   (one more is refused with 503), each at most `request_timeout`; the
//!   engine serves at most `batch_size` keys' worth of them per turn of its
//!   loop, beside one input batch, and keeps serving them while it waits
//!   for downstream (see [`crate::online`]).
//!
//! Every command runs this one pipeline: a replay is a run whose source
//! (the archive), event-time range and extra sinks (the training export)
//! its caller passes in [`RunOptions`]; nothing here knows about replay.

mod decode;
mod engine;
mod fanout;

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::checkpoint::{self, Barriers};
use crate::config::{Config, SinkConfig};
use crate::decode::Decoder;
use crate::engine::{Engine, EngineOptions};
use crate::flow::Stats;
use crate::inference;
use crate::online;
use crate::record::{KindSet, OutputKind};
use crate::sink::stdout::StdoutClosed;
use crate::sink::{self, Sink};
use crate::source::{self, Source, SourceContext};

/// Options a run takes besides the config.
#[derive(Default)]
pub struct RunOptions {
    /// Start from empty state (wiping what the state directory holds).
    pub reset_state: bool,
    /// With a `[checkpoint_store]`: drop the local state for the newest
    /// remote checkpoint.
    pub restore_remote: bool,
    /// Print a progress line on stderr (when it is a terminal).
    pub progress: bool,
    /// AWS configuration for SageMaker, instead of the standard chain
    /// (programs that embed shardflow, and tests).
    pub aws: Option<aws_config::SdkConfig>,
    /// The source, when the caller builds it (a replay's archive, with its
    /// range and progress counters); otherwise the configured `[source]`.
    pub source: Option<Box<dyn Source>>,
    /// Sinks besides `[[sinks]]`, built by the caller (a replay's export).
    pub extra_sinks: Vec<ExtraSink>,
    /// The online API's end of the run (`[api]`): the engine stage serves
    /// its requests, and the batcher scores with its model instead of
    /// building one.
    pub online: Option<online::Link>,
}

/// A sink the caller built, and the kinds it takes.
pub struct ExtraSink {
    pub sink: Box<dyn Sink>,
    pub kinds: KindSet,
    /// Names its task in logs and errors.
    pub label: &'static str,
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
    let choice = checkpoint::remote::StateChoice {
        reset: options.reset_state,
        restore_remote: options.restore_remote,
    };
    // Under [cluster] the local state is a cache of the shards held: each
    // comes with its snapshot when acquired, so it starts empty.
    let (store, remote) = if config.cluster.is_some() {
        let store = crate::state::StateStore::open(
            &config.pipeline.state_dir,
            &config.state_fingerprint(),
            true,
        )
        .with_context(|| format!("opening state in {}", config.pipeline.state_dir.display()))?;
        (store, None)
    } else {
        checkpoint::remote::prepare(&config, choice).await?
    };
    let cluster = match &config.cluster {
        Some(_) => {
            let api = options.online.as_ref().and_then(|l| l.advertise.clone());
            let c = crate::cluster::connect(&config, store.clone(), api).await?;
            if let Some(link) = &options.online {
                let router: Arc<dyn crate::online::KeyRouter> = c.directory.clone();
                let _ = link.router.set(router);
            }
            Some(c)
        }
        None => None,
    };
    let last_checkpoint = store.committed_checkpoint()?;
    let resume_from = store.committed_positions()?;
    if last_checkpoint > 0 {
        tracing::info!(
            checkpoint = last_checkpoint,
            partitions = resume_from.len(),
            "restoring from the last checkpoint"
        );
    }

    let epoch = store.created_at()?;

    let (queries, model) = match options.online {
        Some(link) => (Some(link.inbox), link.scorer),
        None => (None, inference::build_with(&config, options.aws.clone())?),
    };
    if let Some(m) = &model {
        m.ready().await.context("preparing the model")?;
    }
    // A Kinesis stream's shards partition its keys (partition key = entity
    // key): each shard's watermark governs the windows of its keys.
    let per_shard = options.source.is_none()
        && matches!(config.source(), crate::config::SourceConfig::Kinesis(_));
    let (src, tap, worker) = match (options.source, cluster) {
        (Some(s), _) => (s, None, None),
        (None, Some(c)) => {
            let crate::config::SourceConfig::Kinesis(k) = config.source() else {
                anyhow::bail!("[cluster] needs a kinesis source");
            };
            let src: Box<dyn Source> =
                Box::new(source::kinesis::KinesisSource::new(k.clone()).with_leases(c.control));
            let tap: Arc<dyn checkpoint::CommitTap> = c.tap;
            (src, Some(tap), Some(c.worker))
        }
        (None, None) => (source::build(&config)?, None, None),
    };
    // A source that replays a recorded run brings that run's watermarks:
    // processing time must not make its partitions idle.
    let event_time_only = src.replays_watermarks();
    let event_time_range = src.event_time_range();
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
            SinkConfig::S3(c) => {
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
        let built = sink::build(sink_config, sink_ctx).await?;
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
    for extra in options.extra_sinks {
        for k in OutputKind::ALL {
            if extra.kinds.contains(k) {
                subscribed.insert(k);
            }
        }
        tracing::info!(sink = %extra.sink.describe(), "sink ready");
        let (tx, rx) = mpsc::channel(cap);
        sink_inputs.push(tx);
        let blocks = extra.sink.blocks();
        let task = sink::run_sink(extra.sink, extra.kinds, extra.label.into(), rx);
        tasks.push((
            extra.label,
            if blocks {
                on_own_thread("shardflow-sink", task)
            } else {
                tokio::spawn(task)
            },
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
            event_time_only,
            window_results,
            fire_chunk_keys: config.pipeline.batch_size.max(1),
            per_shard,
            // A model scores the vectors even when no sink takes them.
            feature_records: subscribed.contains(OutputKind::Features) || model.is_some(),
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
    tasks.push((
        "decode",
        tokio::spawn(decode::decode_stage(
            decoder,
            decode::DecodeSettings {
                interval,
                barriers: Barriers::new(last_checkpoint, resume_from),
                range: event_time_range,
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
            engine::engine_stage(
                engine,
                engine::EngineSettings {
                    emit_raw: subscribed.contains(OutputKind::Raw),
                    query_budget: config.pipeline.batch_size.max(1),
                },
                committed.clone(),
                (decoded_rx, queries),
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
        tokio::spawn(fanout::fanout_stage(
            fanout_rx,
            sink_inputs,
            subscribed,
            commit_tx,
            stats.clone(),
        )),
    ));
    let uploader = remote.map(|r| r.spawn(store.clone(), last_checkpoint));
    let committer = tokio::spawn(checkpoint::committer_stage(
        store,
        commit_rx,
        committed,
        uploader.as_ref().map(|u| u.handle()),
        tap,
        stats.clone(),
    ));
    let (finished_tx, finished_rx) = watch::channel(false);
    let worker = worker.map(|w| tokio::spawn(w.run(shutdown.clone(), finished_rx)));

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
        if let Some(w) = worker {
            // Its leases expire: a failed run hands nothing off.
            w.abort();
        }
        return Err(e);
    }
    let last = committed?;
    if let Some(w) = worker {
        let _ = finished_tx.send(true);
        w.await.context("cluster worker panicked")??;
    }
    if let Some(u) = uploader {
        u.finish(last).await?;
    }
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
