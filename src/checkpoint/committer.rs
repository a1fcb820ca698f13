//! The committer: the last stage, and the only writer of checkpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::remote::CommitHandle;
use super::PendingCommit;
use crate::flow::Stats;
use crate::state::{StateDelta, StateStore};

/// Commits checkpoints in order once every sink acknowledged them, and
/// publishes each committed id in `committed` (the engine evicts state
/// clean with respect to it) and to the remote uploader, if any. Returns
/// the id of the last commit.
pub(crate) async fn run(
    store: StateStore,
    mut pending: mpsc::Receiver<PendingCommit>,
    committed: Arc<AtomicU64>,
    remote: Option<CommitHandle>,
    stats: Arc<Stats>,
) -> anyhow::Result<u64> {
    let durations = metrics::histogram!("shardflow_checkpoint_duration_seconds");
    let commits = metrics::counter!("shardflow_checkpoints_total");
    let mut last = store.committed_checkpoint()?;
    while let Some((barrier, acks)) = pending.recv().await {
        let started = Instant::now();
        for ack in acks {
            match ack.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(e.context(format!(
                        "checkpoint {} not committed: a sink failed",
                        barrier.id
                    )))
                }
                Err(_) => anyhow::bail!("checkpoint {} not committed: a sink stopped", barrier.id),
            }
        }
        let delta = barrier.delta.unwrap_or_else(StateDelta::empty);
        let store2 = store.clone();
        let positions = barrier.positions;
        let id = barrier.id;
        let lock = remote.as_ref().map(CommitHandle::lock);
        tokio::task::spawn_blocking(move || {
            // The uploader reads id, positions and files under this lock.
            let _uploading = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
            store2.commit(id, delta, &positions)
        })
        .await
        .context("commit task panicked")?
        .with_context(|| format!("committing checkpoint {id}"))?;
        last = id;
        committed.store(id, Ordering::Release);
        if let Some(r) = &remote {
            r.committed(id);
        }
        commits.increment(1);
        durations.record(started.elapsed().as_secs_f64());
        stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(checkpoint = id, "checkpoint committed");
        if barrier.last {
            break;
        }
    }
    Ok(last)
}
