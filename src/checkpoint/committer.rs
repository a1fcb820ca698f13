//! The committer: the last stage, and the only writer of checkpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::remote::CommitHandle;
use super::PendingCommit;
use crate::flow::{ReleasedShard, Stats};
use crate::record::Position;
use crate::state::{HashRange, StateDelta, StateStore};
use crate::time::Millis;

/// What a commit tells a [`CommitTap`].
pub(crate) struct Committed<'a> {
    pub id: u64,
    pub positions: &'a [Position],
    pub acquired: &'a [(Arc<str>, HashRange)],
    pub released: &'a [ReleasedShard],
    pub marks: &'a [(Arc<str>, Millis, Millis)],
    pub next_seq: u64,
    pub last: bool,
}

/// Told of every commit right after it, on the committer's blocking task:
/// the store holds exactly that commit until the call returns (the
/// committer is the store's only writer), so what the tap reads is
/// consistent with the positions it is told. The cluster's shard exports
/// are one.
pub(crate) trait CommitTap: Send + Sync {
    fn committed(&self, store: &StateStore, commit: Committed<'_>) -> anyhow::Result<()>;
}

/// Commits checkpoints in order once every sink acknowledged them, and
/// publishes each committed id in `committed` (the engine evicts state
/// clean with respect to it) and to the remote uploader, if any. Returns
/// the id of the last commit.
pub(crate) async fn run(
    store: StateStore,
    mut pending: mpsc::Receiver<PendingCommit>,
    committed: Arc<AtomicU64>,
    remote: Option<CommitHandle>,
    tap: Option<Arc<dyn CommitTap>>,
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
        let tap2 = tap.clone();
        let (acquired, released, marks) = (barrier.acquired, barrier.released, barrier.marks);
        let (next_seq, last_barrier) = (barrier.next_seq, barrier.last);
        tokio::task::spawn_blocking(move || {
            // The uploader reads id, positions and files under this lock.
            let _uploading = lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
            store2
                .commit(id, delta, &positions)
                .with_context(|| format!("committing checkpoint {id}"))?;
            if let Some(tap) = tap2 {
                tap.committed(
                    &store2,
                    Committed {
                        id,
                        positions: &positions,
                        acquired: &acquired,
                        released: &released,
                        marks: &marks,
                        next_seq,
                        last: last_barrier,
                    },
                )
                .with_context(|| format!("after committing checkpoint {id}"))?;
            }
            anyhow::Ok(())
        })
        .await
        .context("commit task panicked")??;
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
