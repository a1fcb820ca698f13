//! Remote checkpoints: the state made to survive the machine.
//!
//! With a `[checkpoint_store]`, committed checkpoints are also copied to S3
//! ([`RemoteStore`]), and a run that finds no local state starts from the
//! newest remote one. The local protocol (the module doc of
//! [`crate::checkpoint`]) is unchanged: a remote checkpoint is a copy of a
//! committed local one, so it holds state and positions that agree.
//!
//! # Uploads, off the hot path
//!
//! The committer publishes every committed id on a watch channel and goes
//! on; it never waits for S3. One uploader task, once a checkpoint at least
//! `every` ids after the last uploaded one is committed, asks RocksDB for a
//! checkpoint of the live state (a directory of hard links to its immutable
//! files, [`StateStore::create_checkpoint`], which names the committed id it
//! holds), uploads what is new, then applies `retain`. While an upload runs,
//! commits go on; the next upload takes the newest commit, and the ones in
//! between are skipped (`shardflow_remote_checkpoints_skipped_total`, and a
//! log line). So memory and disk stay bounded: one staging directory, of
//! links, at a time. A failing upload is retried with backoff, its error
//! logged and counted; local checkpoints never wait for it.
//!
//! A clean stop uploads the final checkpoint before the run returns, so the
//! next start, on any machine, resumes exactly where this one stopped.
//!
//! # Restore, at start
//!
//! [`prepare`] decides what state a run starts from:
//!
//! - no local state (the directory missing or empty): the newest complete
//!   remote checkpoint is downloaded into `state_dir`; a damaged one is
//!   skipped for the one before, with a warning; a store with checkpoints
//!   none of which is usable is an error, never a silent fresh start. A
//!   store without any checkpoint yet is a first start: fresh state.
//! - local state older than the newest remote checkpoint (its committed id
//!   is lower): refused, naming `--restore-remote` (take the remote one) and
//!   `--reset-state` (start over).
//! - `--restore-remote`: the local state is removed, the remote one taken.
//! - `--reset-state`: fresh state, whose checkpoint ids continue after the
//!   newest remote one, so that its checkpoints are the newest from then on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::aws::Backoff;
use crate::config::{CheckpointStoreConfig, Config};
use crate::state::remote::RemoteStore;
use crate::state::{StateDelta, StateStore};

/// What the command line says about local and remote state.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateChoice {
    /// `--reset-state`: start from empty state.
    pub reset: bool,
    /// `--restore-remote`: drop the local state for the newest remote one.
    pub restore_remote: bool,
}

/// The remote store of a run, ready to upload to.
pub struct Remote {
    store: RemoteStore,
    every: u64,
    retain: usize,
    staging: PathBuf,
    fingerprint: String,
    /// When the newest remote checkpoint was made (epoch ms; 0: none yet).
    newest_at: u64,
}

/// Opens the run's state: local, restored from the remote store, or fresh
/// (see the module doc), and the remote store to upload to, if any.
pub async fn prepare(
    config: &Config,
    choice: StateChoice,
) -> anyhow::Result<(StateStore, Option<Remote>)> {
    let dir = &config.pipeline.state_dir;
    let fingerprint = config.state_fingerprint();
    let open = |reset: bool| {
        StateStore::open(dir, &fingerprint, reset)
            .with_context(|| format!("opening state in {}", dir.display()))
    };
    let Some(store_config) = &config.checkpoint_store else {
        anyhow::ensure!(
            !choice.restore_remote,
            "--restore-remote needs a [checkpoint_store] in the config"
        );
        return Ok((open(choice.reset)?, None));
    };
    let store_config = store_config.get_ref();
    let remote = connect(store_config).await?;
    remote.check().await?;
    let newest = remote.newest_manifest().await?;
    let remote_id = newest.as_ref().map_or(0, |m| m.checkpoint_id);

    if choice.restore_remote && !choice.reset && dir.exists() {
        tracing::info!(dir = %dir.display(), "--restore-remote: removing the local state");
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the local state in {}", dir.display()))?;
    }
    let local_empty = is_empty_dir(dir)?;
    let state = if choice.reset {
        let state = open(true)?;
        if remote_id > 0 {
            // Ids go on after the remote's, so this state's checkpoints
            // are the newest in the store from its first one.
            state.commit(remote_id, StateDelta::empty(), &[])?;
            tracing::info!(
                store = remote.label(),
                after = remote_id,
                "fresh state: checkpoint ids continue after the newest remote checkpoint"
            );
        }
        state
    } else if local_empty && newest.is_some() {
        let report = remote
            .restore_newest(dir, &fingerprint)
            .await
            .with_context(|| format!("restoring the state into {}", dir.display()))?;
        for (id, reason) in &report.skipped {
            tracing::warn!(store = remote.label(), checkpoint = id, reason = %reason, "remote checkpoint unusable; took an older one");
        }
        tracing::info!(
            store = remote.label(),
            checkpoint = report.manifest.checkpoint_id,
            bytes = report.bytes,
            seconds = report.duration.as_secs_f64(),
            "state restored from the remote checkpoint"
        );
        open(false)?
    } else {
        if local_empty {
            tracing::info!(
                store = remote.label(),
                "no remote checkpoint yet: starting with fresh state"
            );
        }
        let state = open(false)?;
        let local_id = state.committed_checkpoint()?;
        if local_id < remote_id {
            anyhow::bail!(
                "the local state in {} is at checkpoint {local_id}, older than the newest remote checkpoint {remote_id} in {}: pass --restore-remote to take the remote one, or --reset-state to start over",
                dir.display(),
                remote.label()
            );
        }
        state
    };
    let CheckpointStoreConfig::S3(c) = store_config;
    Ok((
        state,
        Some(Remote {
            store: remote,
            every: u64::from(c.every.max(1)),
            retain: c.retain.max(1) as usize,
            staging: staging_dir(dir),
            fingerprint,
            newest_at: newest.as_ref().map_or(0, |m| m.created_at),
        }),
    ))
}

async fn connect(config: &CheckpointStoreConfig) -> anyhow::Result<RemoteStore> {
    let CheckpointStoreConfig::S3(c) = config;
    let client = crate::aws::s3::client(&c.client())
        .await
        .with_context(|| format!("checkpoint store {}", config.describe()))?;
    Ok(RemoteStore::new(client, &c.bucket, &c.prefix))
}

/// True when `dir` is missing or holds nothing.
fn is_empty_dir(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Where checkpoints wait for their upload: beside the state directory, so
/// RocksDB can hard-link its files there (on one file system) and never
/// meets a directory of ours among its own.
fn staging_dir(state_dir: &Path) -> PathBuf {
    let name = state_dir
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    state_dir.with_file_name(format!("{name}.upload"))
}

/// The running uploader; [`Uploader::finish`] uploads the final checkpoint.
pub struct Uploader {
    handle: CommitHandle,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The committer's side of the uploader: it publishes each commit, and
/// commits under [`CommitHandle::lock`], which the uploader also takes to
/// read the committed id and positions and make the RocksDB checkpoint, so
/// the three always belong to one commit.
#[derive(Clone)]
pub struct CommitHandle {
    committed: Arc<watch::Sender<Committed>>,
    lock: Arc<Mutex<()>>,
}

/// What the committer publishes: the last committed id, and whether it is
/// the run's last (to be uploaded whatever `every` says).
#[derive(Debug, Clone, Copy, Default)]
struct Committed {
    id: u64,
    last: bool,
}

impl Remote {
    /// Starts the uploader over `state`, whose committed id is `committed`.
    pub fn spawn(self, state: StateStore, committed: u64) -> Uploader {
        let (tx, rx) = watch::channel(Committed {
            id: committed,
            last: false,
        });
        let handle = CommitHandle {
            committed: Arc::new(tx),
            lock: Arc::new(Mutex::new(())),
        };
        let task = tokio::spawn(upload_loop(self, state, handle.lock.clone(), committed, rx));
        Uploader { handle, task }
    }
}

impl CommitHandle {
    /// Held while a commit is written.
    pub fn lock(&self) -> Arc<Mutex<()>> {
        self.lock.clone()
    }

    /// Says that checkpoint `id` is committed (never waits).
    pub fn committed(&self, id: u64) {
        self.committed.send_modify(|c| c.id = c.id.max(id));
    }
}

impl Uploader {
    pub fn handle(&self) -> CommitHandle {
        self.handle.clone()
    }

    /// Uploads the run's last committed checkpoint, `id`, then stops; an
    /// error when that upload failed for good (the state is committed
    /// locally all the same).
    pub async fn finish(self, id: u64) -> anyhow::Result<()> {
        self.handle.committed.send_modify(|c| {
            c.id = c.id.max(id);
            c.last = true;
        });
        drop(self.handle);
        self.task
            .await
            .context("the remote checkpoint uploader panicked")?
    }
}

/// Attempts at the final upload before a clean stop gives up on it.
const FINAL_ATTEMPTS: u32 = 5;

async fn upload_loop(
    remote: Remote,
    state: StateStore,
    lock: Arc<Mutex<()>>,
    mut uploaded: u64,
    mut committed: watch::Receiver<Committed>,
) -> anyhow::Result<()> {
    let age = metrics::gauge!("shardflow_remote_checkpoint_age_seconds");
    let mut newest_at = remote.newest_at;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let skipped = metrics::counter!("shardflow_remote_checkpoints_skipped_total");
    let failures = metrics::counter!("shardflow_remote_checkpoint_failures_total");
    let written = metrics::counter!("shardflow_remote_checkpoints_total");
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut final_attempts = 0;
    loop {
        // Wait for a commit worth uploading, or the end of the run.
        let target = loop {
            let c = *committed.borrow_and_update();
            if c.id >= uploaded.saturating_add(remote.every) || (c.last && c.id > uploaded) {
                break Some(c);
            }
            if c.last {
                break None;
            }
            tokio::select! {
                changed = committed.changed() => if changed.is_err() { break None },
                _ = tick.tick() => if newest_at > 0 {
                    let now = crate::time::now_millis().max(0) as u64;
                    age.set(now.saturating_sub(newest_at) as f64 / 1000.0);
                },
            }
        };
        let Some(target) = target else { return Ok(()) };
        match upload_once(&remote, &state, &lock).await {
            Ok((id, files, bytes)) => {
                backoff.reset();
                let missed = (id - uploaded) / remote.every;
                if missed > 1 && uploaded > 0 {
                    skipped.increment(missed - 1);
                    tracing::info!(
                        store = remote.store.label(),
                        checkpoint = id,
                        skipped = missed - 1,
                        "remote checkpoints fell behind local ones: skipped ahead"
                    );
                }
                uploaded = id;
                newest_at = crate::time::now_millis().max(0) as u64;
                written.increment(1);
                tracing::debug!(
                    store = remote.store.label(),
                    checkpoint = id,
                    files,
                    bytes,
                    "remote checkpoint written"
                );
                if let Err(e) = remote.store.retain(remote.retain).await {
                    tracing::warn!(store = remote.store.label(), error = %e, "could not delete old remote checkpoints");
                }
            }
            Err(e) => {
                failures.increment(1);
                let delay = backoff.next_delay();
                tracing::warn!(store = remote.store.label(), checkpoint = target.id, error = %format!("{e:#}"), retry_in = ?delay, "remote checkpoint failed; local checkpoints go on");
                if target.last {
                    final_attempts += 1;
                    if final_attempts >= FINAL_ATTEMPTS {
                        return Err(e.context(format!(
                            "the final checkpoint {} is committed locally but not in {}: a start on another machine would resume from an older one",
                            target.id,
                            remote.store.label()
                        )));
                    }
                    tokio::time::sleep(delay).await;
                } else {
                    // A stop does not wait out a long backoff: its final
                    // upload starts over with short ones.
                    let stopping = async {
                        while !committed.borrow().last {
                            if committed.changed().await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopping => backoff.reset(),
                    }
                }
            }
        }
    }
}

/// Makes a RocksDB checkpoint of the committed state and uploads it;
/// returns its id and the files and bytes uploaded.
async fn upload_once(
    remote: &Remote,
    state: &StateStore,
    lock: &Arc<Mutex<()>>,
) -> anyhow::Result<(u64, usize, u64)> {
    let staging = remote.staging.clone();
    let (state2, lock) = (state.clone(), lock.clone());
    let (dir, id, positions) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("clearing {}", staging.display()))?;
        }
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let dir = staging.join("checkpoint");
        let _commit = lock.lock().unwrap_or_else(|p| p.into_inner());
        let id = state2.committed_checkpoint()?;
        let positions = state2.committed_positions()?;
        state2.create_checkpoint(&dir)?;
        Ok((dir, id, positions))
    })
    .await
    .context("checkpoint task panicked")??;
    let meta = serde_json::json!({
        "positions": positions,
        "state_created_at": state.created_at()?,
    });
    let result = remote
        .store
        .upload(&dir, id, &remote.fingerprint, meta)
        .await;
    let _ = std::fs::remove_dir_all(&remote.staging);
    let report = result.map_err(anyhow::Error::new)?;
    Ok((id, report.files_uploaded, report.bytes_uploaded))
}
