//! `shardflow replay`: an archive through the same pipeline as live.
//!
//! The config is the live one with `[replay.source]` (an S3 archive) for
//! `[source]` and `[[replay.sinks]]` (when given) for `[[sinks]]`; schema,
//! watermarks, features and model are unchanged, so the results are those
//! the live run computed. State goes to a fresh temporary directory,
//! removed afterwards, or to `--state-dir` (kept, e.g. to start a live run
//! from the replayed state), which must not hold a checkpoint yet.
//!
//! - `export.rs`: `--export FILE` training rows.
//! - `parquet.rs`: the same rows as a Parquet file.
//! - `progress.rs`: the progress bar (or plain line).

pub mod export;
pub mod parquet;
pub mod progress;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::{Config, SinkConfig, SourceConfig};
use crate::flow::Stats;
use crate::pipeline::{self, ExtraSink, RunOptions};
use crate::source::s3::{ArchiveProgress, S3Source};
use crate::state::StateStore;
use crate::time::Millis;

/// What the command line asks of a replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayArgs {
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    /// Keep state here instead of a temporary directory.
    pub state_dir: Option<PathBuf>,
    /// Wipe `state_dir` first.
    pub reset_state: bool,
    pub export: Option<PathBuf>,
    /// Show progress on stderr.
    pub progress: bool,
}

/// How a replay went.
#[derive(Debug, Clone)]
pub struct ReplaySummary {
    pub objects: u64,
    pub bytes: u64,
    pub records: u64,
    pub events: u64,
    pub dead_letters: u64,
    pub bad_objects: u64,
    pub duplicates: u64,
    pub out_of_range: u64,
    pub seconds: f64,
}

/// Checks a replay can run: an archive to read, and no S3 sink writing
/// into the prefix being read.
pub fn prepare(config: &Config) -> anyhow::Result<Config> {
    let replay = config.for_replay().map_err(anyhow::Error::msg)?;
    let SourceConfig::S3(src) = replay.source() else {
        unreachable!("for_replay checks the source");
    };
    for sink in &replay.sinks {
        if let SinkConfig::S3(s) = sink.get_ref() {
            if s.bucket == src.bucket
                && (s.prefix.starts_with(&src.prefix) || src.prefix.starts_with(&s.prefix))
            {
                anyhow::bail!(
                    "the replay would write into the archive it reads (s3://{}/{}): give [[replay.sinks]] without that s3 sink",
                    s.bucket,
                    s.prefix
                );
            }
        }
    }
    Ok(replay)
}

/// Runs a replay of `config` (already through [`prepare`]) until the
/// archive is read or `shutdown` turns true.
pub async fn run(
    mut config: Config,
    args: ReplayArgs,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<ReplaySummary> {
    let SourceConfig::S3(src) = config.source().clone() else {
        anyhow::bail!("nothing to replay: the source is not s3");
    };
    let from = args.from.or(src.from_millis().map_err(anyhow::Error::msg)?);
    let to = args.to.or(src.to_millis().map_err(anyhow::Error::msg)?);
    if let (Some(f), Some(t)) = (from, to) {
        anyhow::ensure!(f < t, "--from must be before --to");
    }
    let temporary = args.state_dir.is_none();
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "shardflow-replay-{}-{}",
            std::process::id(),
            crate::time::now_nanos()
        )),
    };
    {
        let store = StateStore::open(&dir, &config.state_fingerprint(), args.reset_state)
            .with_context(|| format!("opening replay state in {}", dir.display()))?;
        let committed = store.committed_checkpoint()?;
        anyhow::ensure!(
            committed == 0,
            "{} already holds replayed state (checkpoint {committed}); a replay starts from empty state: pass --reset-state to wipe it, or another --state-dir",
            dir.display()
        );
    }
    config.pipeline.state_dir = dir.clone();
    let progress = Arc::new(ArchiveProgress::default());
    let stats = Arc::new(Stats::default());
    let source = S3Source::new(src, &config.schema, from, to, progress.clone());
    let mut extra_sinks = Vec::new();
    if let Some(path) = args.export.clone() {
        let export = export::ExportSink::create(&export::ExportOptions { path }, &config)?;
        extra_sinks.push(ExtraSink {
            kinds: export.kinds(),
            sink: Box::new(export),
            label: "export",
        });
    }
    let options = RunOptions {
        source: Some(Box::new(source)),
        extra_sinks,
        ..RunOptions::default()
    };
    let display = args.progress.then(|| {
        progress::spawn(
            progress.clone(),
            stats.clone(),
            config.pipeline.progress_interval.std(),
        )
    });
    let started = Instant::now();
    let result = pipeline::run(config, options, shutdown, stats.clone()).await;
    if let Some(d) = display {
        d.finish().await;
    }
    if temporary {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the replay's temporary state");
        }
    }
    result?;
    let p = &progress;
    Ok(ReplaySummary {
        objects: p.objects_done.load(Ordering::Relaxed),
        bytes: p.bytes_done.load(Ordering::Relaxed),
        records: p.records.load(Ordering::Relaxed),
        events: stats.events.load(Ordering::Relaxed),
        dead_letters: stats.dead_letters.load(Ordering::Relaxed),
        bad_objects: p.bad_objects.load(Ordering::Relaxed),
        duplicates: p.duplicates.load(Ordering::Relaxed),
        out_of_range: stats.out_of_range.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}
