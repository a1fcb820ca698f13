//! A shard's state on its way between workers: exported at a commit by
//! the old holder ([`ShardTap`]), uploaded as a snapshot to the checkpoint
//! store, named in the lease with the checkpoint it matches, restored by
//! the next holder ([`restore`]).
//!
//! The pair (lease checkpoint, snapshot) is written in one conditional
//! lease write, after the snapshot is complete in S3, so whoever takes the
//! lease next finds a position and the state of exactly that position. A
//! holder exports at every `every`-th commit (its failover point: a
//! successor after a crash resumes there), when it releases a shard (the
//! handoff point) and at its last commit (a clean stop).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::lease::{Checkpoint, Lease};
use crate::checkpoint::{CommitTap, Committed};
use crate::flow::ReleaseReason;
use crate::record::Position;
use crate::state::remote::RemoteStore;
use crate::state::{HashRange, StateStore};
use crate::time::Millis;

/// The description a snapshot carries (its `meta.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotMeta {
    pub shard: String,
    pub worker: String,
    /// The exporting worker's commit.
    pub commit: u64,
    /// The state fingerprint: a worker of another configuration refuses it.
    pub fingerprint: String,
    /// The shard's maximum event time, and the worker's arrival counter.
    pub max_event_time: Option<Millis>,
    /// The shard's own watermark (per-shard mode).
    #[serde(default)]
    pub watermark: Option<Millis>,
    pub next_seq: u64,
}

/// Why a shard was exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportReason {
    /// The failover point of a shard still held.
    Periodic,
    /// The shard was released at this commit.
    Released(ReleaseReason),
    /// The run's last commit: every shard still held is handed off.
    Shutdown,
}

/// A shard's state written to local files at a commit, for the worker to
/// upload (no files when a lost shard was only dropped).
#[derive(Debug)]
pub struct Exported {
    pub shard: Arc<str>,
    pub why: ExportReason,
    /// The position the files hold the state of; `None` when no record of
    /// the shard passed since it was acquired (the lease's checkpoint holds).
    pub checkpoint: Option<Checkpoint>,
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub meta: SnapshotMeta,
}

/// The commit hook that exports shards (see the module doc).
pub struct ShardTap {
    state: Mutex<TapState>,
    every: u64,
    dir: PathBuf,
    worker: String,
    fingerprint: String,
    tx: mpsc::UnboundedSender<Exported>,
}

#[derive(Default)]
struct TapState {
    held: BTreeMap<Arc<str>, HashRange>,
    commits: u64,
    /// Shards whose last export is still being uploaded: a periodic export
    /// skips them rather than queue behind a slow store.
    uploading: HashSet<Arc<str>>,
    /// The position each held shard's lease is checkpointed at: a periodic
    /// export of a shard that read nothing since is skipped (an idle shard
    /// costs no upload and no lease write).
    checkpointed: HashMap<Arc<str>, Checkpoint>,
}

impl ShardTap {
    pub fn new(
        every: u32,
        dir: PathBuf,
        worker: String,
        fingerprint: String,
        tx: mpsc::UnboundedSender<Exported>,
    ) -> ShardTap {
        ShardTap {
            state: Mutex::default(),
            every: u64::from(every.max(1)),
            dir,
            worker,
            fingerprint,
            tx,
        }
    }

    /// The worker finished with an export of `shard`.
    pub fn uploaded(&self, shard: &str) {
        self.lock().uploading.remove(shard);
    }

    /// `shard`'s lease now stands at `checkpoint`, with a snapshot of it.
    pub fn checkpointed(&self, shard: &Arc<str>, checkpoint: &Checkpoint) {
        let mut st = self.lock();
        if st.held.contains_key(shard) {
            st.checkpointed.insert(shard.clone(), checkpoint.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn export(
        &self,
        store: &StateStore,
        c: &Committed<'_>,
        shard: &Arc<str>,
        range: HashRange,
        why: ExportReason,
    ) -> anyhow::Result<()> {
        let checkpoint = match why {
            ExportReason::Released(ReleaseReason::Ended) => Some(Checkpoint::ShardEnd),
            _ => c
                .positions
                .iter()
                .find(|p| p.partition == *shard)
                .map(checkpoint_of),
        };
        if why == ExportReason::Periodic
            && (checkpoint.is_none() || self.lock().checkpointed.get(shard) == checkpoint.as_ref())
        {
            return Ok(());
        }
        let dir = self.dir.join(&**shard).join(c.id.to_string());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let files = store
            .export_range(range, &dir)
            .with_context(|| format!("exporting shard {shard}"))?;
        let meta = SnapshotMeta {
            shard: shard.to_string(),
            worker: self.worker.clone(),
            commit: c.id,
            fingerprint: self.fingerprint.clone(),
            max_event_time: c
                .marks
                .iter()
                .find(|(p, _, _)| p == shard)
                .map(|(_, m, _)| *m)
                .filter(|m| *m != Millis::MIN),
            watermark: c
                .marks
                .iter()
                .find(|(p, _, _)| p == shard)
                .map(|(_, _, w)| *w)
                .filter(|w| *w != Millis::MIN),
            next_seq: c.next_seq,
        };
        self.lock().uploading.insert(shard.clone());
        let _ = self.tx.send(Exported {
            shard: shard.clone(),
            why,
            checkpoint,
            dir,
            files,
            meta,
        });
        Ok(())
    }
}

impl CommitTap for ShardTap {
    fn committed(&self, store: &StateStore, c: Committed<'_>) -> anyhow::Result<()> {
        let (held, due) = {
            let mut st = self.lock();
            for (shard, range) in c.acquired {
                st.held.insert(shard.clone(), *range);
                st.checkpointed.remove(shard);
            }
            for r in c.released {
                st.held.remove(&r.shard);
                st.checkpointed.remove(&r.shard);
            }
            st.commits += 1;
            let due = c.last || st.commits.is_multiple_of(self.every);
            let held: Vec<(Arc<str>, HashRange, bool)> = st
                .held
                .iter()
                .map(|(s, r)| (s.clone(), *r, st.uploading.contains(s)))
                .collect();
            (held, due)
        };
        for r in c.released {
            if r.why != ReleaseReason::Lost {
                self.export(store, &c, &r.shard, r.range, ExportReason::Released(r.why))?;
            } else {
                let _ = self.tx.send(Exported {
                    shard: r.shard.clone(),
                    why: ExportReason::Released(ReleaseReason::Lost),
                    checkpoint: None,
                    dir: PathBuf::new(),
                    files: Vec::new(),
                    meta: SnapshotMeta::default(),
                });
            }
            // No record of the shard comes here any more: its range is the
            // next holder's.
            store
                .delete_range(r.range)
                .with_context(|| format!("dropping shard {}'s state", r.shard))?;
        }
        if due {
            for (shard, range, busy) in held {
                if c.last {
                    self.export(store, &c, &shard, range, ExportReason::Shutdown)?;
                } else if !busy {
                    self.export(store, &c, &shard, range, ExportReason::Periodic)?;
                }
            }
        }
        Ok(())
    }
}

/// The lease checkpoint a committed position stands for. A position inside
/// a KPL aggregate keeps its sub-record; a plain record is sub-record 0,
/// which a resume `Inside` it skips the same way.
pub fn checkpoint_of(p: &Position) -> Checkpoint {
    Checkpoint::Sequence {
        seq: p.sequence.to_string(),
        sub: p.sub_sequence.unwrap_or(0),
    }
}

/// The position a lease checkpoint stands for (none at a sentinel).
pub fn position_of(shard: &Arc<str>, c: &Checkpoint) -> Option<Position> {
    match c {
        Checkpoint::Sequence { seq, sub } => Some(Position {
            partition: shard.clone(),
            sequence: seq.as_str().into(),
            sub_sequence: Some(*sub),
            resume_offset: None,
        }),
        _ => None,
    }
}

/// Where a snapshot of `shard` exported at `commit` by `worker` goes,
/// relative to the checkpoint store's prefix.
pub fn snapshot_dir(shard: &str, worker: &str, commit: u64) -> String {
    format!("shards/{shard}/{worker}-{commit:020}")
}

/// What a restore found.
#[derive(Debug, Default)]
pub struct Restored {
    pub max_event_time: Option<Millis>,
    pub watermark: Option<Millis>,
    pub next_seq: u64,
    pub bytes: u64,
}

/// Puts `lease`'s state into `store`: its own snapshot, or for a child
/// shard that has none yet, its parents' snapshots restricted to its hash
/// range (a split takes part of one parent, a merge all of two). The range
/// is emptied first: whatever an earlier holding here left is stale.
pub async fn restore(
    remote: &RemoteStore,
    store: &StateStore,
    lease: &Lease,
    range: HashRange,
    parents: &[Lease],
    work: &Path,
    fingerprint: &str,
) -> anyhow::Result<Restored> {
    let s2 = store.clone();
    tokio::task::spawn_blocking(move || s2.delete_range(range))
        .await
        .context("delete task panicked")??;
    if work.exists() {
        tokio::fs::remove_dir_all(work).await.ok();
    }
    let mut restored = Restored {
        max_event_time: lease.watermark,
        ..Restored::default()
    };
    if let Some(rel) = lease.snapshot.as_deref() {
        let (files, meta) = fetch(remote, rel, &work.join("own"), fingerprint).await?;
        let s2 = store.clone();
        tokio::task::spawn_blocking(move || s2.ingest_range(&files))
            .await
            .context("ingest task panicked")??;
        restored.max_event_time = meta.max_event_time.or(lease.watermark);
        restored.watermark = meta.watermark;
        restored.next_seq = meta.next_seq;
    } else if !parents.is_empty() {
        // A scratch store takes each parent whole; only the child's range
        // of it reaches the real store, which may hold a sibling's keys.
        let scratch_dir = work.join("parents");
        let scratch = StateStore::open(&scratch_dir, fingerprint, true)
            .context("opening a scratch state for the parents' snapshots")?;
        for (i, parent) in parents.iter().enumerate() {
            let Some(rel) = parent.snapshot.as_deref() else {
                continue;
            };
            let (files, meta) =
                fetch(remote, rel, &work.join(format!("parent-{i}")), fingerprint).await?;
            let sc = scratch.clone();
            tokio::task::spawn_blocking(move || sc.ingest_range(&files))
                .await
                .context("ingest task panicked")??;
            // A child starts from its parents' watermark.
            restored.max_event_time = restored.max_event_time.max(meta.max_event_time);
            restored.watermark = restored.watermark.max(meta.watermark);
            restored.next_seq = restored.next_seq.max(meta.next_seq);
        }
        let out = work.join("child");
        let (sc, s2) = (scratch.clone(), store.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let files = sc.export_range(range, &out)?;
            s2.ingest_range(&files)?;
            Ok(())
        })
        .await
        .context("ingest task panicked")??;
        drop(scratch);
    }
    tokio::fs::remove_dir_all(work).await.ok();
    Ok(restored)
}

/// Downloads the snapshot at `rel` into `dest`, checking its fingerprint.
async fn fetch(
    remote: &RemoteStore,
    rel: &str,
    dest: &Path,
    fingerprint: &str,
) -> anyhow::Result<(Vec<PathBuf>, SnapshotMeta)> {
    let (files, meta) = remote
        .get_snapshot(rel, dest)
        .await
        .with_context(|| format!("downloading the shard snapshot {rel}"))?;
    let meta: SnapshotMeta = serde_json::from_slice(&meta)
        .with_context(|| format!("reading the shard snapshot {rel}'s meta.json"))?;
    anyhow::ensure!(
        meta.fingerprint == fingerprint,
        "the shard snapshot {rel} was written by a worker of another state configuration \
         (fingerprint {} here, {} there): every worker of a cluster must run the same features",
        fingerprint,
        meta.fingerprint
    );
    Ok((files, meta))
}
