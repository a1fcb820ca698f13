//! The lease worker: one task per `shardflow run` under `[cluster]` that
//! keeps the leases this process holds, takes its share, and moves shards
//! in and out of the pipeline with their state.
//!
//! Every `failover_time / 3` it lists the table (one consistent Scan),
//! renews what it holds, starts handoffs asked of it, and runs
//! [`assign::plan`]: take expired leases, adopt leases handed to it, steal
//! at most one. Every `shard_refresh_interval` it also lists the stream's
//! shards and creates the leases that are missing (conditionally: every
//! worker may try, one row results).
//!
//! A shard's life here:
//!
//! 1. **Acquire**: the lease is this worker's (taken, or released to it);
//!    its snapshot is restored into the store ([`handoff::restore`]), then
//!    the source is told to start it from the lease's checkpoint.
//! 2. **Run**: every `[checkpoint_store] every`-th commit exports the
//!    shard's range ([`ShardTap`]); the worker uploads it and checkpoints
//!    the lease with its location (the fenced write: a worker that lost the
//!    lease fails it and drops the shard).
//! 3. **Release**: a handoff asked of it, `SHARD_END`, or the end of the
//!    run stops the shard at a barrier; the export of that commit is
//!    uploaded, checkpointed and the lease released, so the next holder
//!    starts at once instead of waiting out `failover_time`.
//!
//! While the table is out of reach, held shards go on processing (their
//! checkpoints wait for it). A lease not renewed for `failover_time` less
//! one renewal interval is dropped: just before another worker may take it,
//! as two holders must never both commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::assign::{self, Observed, View};
use super::handoff::{self, ExportReason, Exported, ShardTap};
use super::lease::{Checkpoint, HashKeyRange, Lease};
use super::table::{Created, LeaseTable, Progress};
use super::{
    LeaseError, METRIC_CURRENT_LEASES, METRIC_FAILOVERS, METRIC_HANDOFF_SECONDS,
    METRIC_LOST_LEASES, METRIC_RESTORE_SECONDS, METRIC_TAKEN_LEASES,
};
use crate::aws::error_text;
use crate::config::{ClusterConfig, StartingPosition};
use crate::flow::ReleaseReason;
use crate::source::kinesis::efo::Start;
use crate::source::kinesis::leased::ShardCommand;
use crate::state::remote::RemoteStore;
use crate::state::{HashRange, StateStore};

/// What the worker needs besides its channels.
pub struct WorkerSettings {
    pub cluster: ClusterConfig,
    pub stream: String,
    pub starting_position: StartingPosition,
    pub at_timestamp: Option<crate::time::Millis>,
    pub shard_refresh: Duration,
    pub fingerprint: String,
    /// Where restores are staged (beside the state directory).
    pub work_dir: PathBuf,
}

pub struct Worker {
    pub(super) table: LeaseTable,
    pub(super) kinesis: aws_sdk_kinesis::Client,
    pub(super) remote: RemoteStore,
    pub(super) store: StateStore,
    pub(super) settings: WorkerSettings,
    pub(super) tap: Arc<ShardTap>,
    pub(super) commands: mpsc::Sender<ShardCommand>,
    pub(super) exported: mpsc::UnboundedReceiver<Exported>,
    /// The run is stopping: nothing more is taken or started.
    pub(super) stopping: bool,
    pub(super) directory: Arc<super::Directory>,
}

/// A lease this worker holds.
struct Held {
    /// The newest copy: every write conditions on it and replaces it.
    lease: Lease,
    range: HashRange,
    phase: Phase,
    renewed: Instant,
    /// When this worker asked for it, if it came by graceful handoff.
    asked: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Restoring,
    Running,
    /// Told to stop, for this reason; its release's export is awaited.
    Stopping(ReleaseReason),
}

/// A background job's result.
enum Done {
    Restored(String, anyhow::Result<handoff::Restored>),
    Uploaded(Box<Exported>, anyhow::Result<String>),
}

impl Worker {
    /// Runs until `shutdown`, then until every lease is handed off (or
    /// `handoff_timeout` passed). Fails only when the table cannot be set
    /// up; later DynamoDB trouble is retried.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut finished: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let me = self.table.worker().to_owned();
        let cfg = self.settings.cluster.clone();
        let failover = cfg.failover_time.std();
        // A lease not renewed this long is dropped here: one renewal
        // interval before another worker may take it (it sees expiry at
        // `failover_time` after it saw the last renewal), so the two never
        // process the shard at once while the table is out of reach.
        let give_up = failover.saturating_sub(cfg.renew_interval());
        let mut tick = tokio::time::interval(cfg.renew_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held: BTreeMap<String, Held> = BTreeMap::new();
        let mut observed = Observed::default();
        let mut steal: Option<(String, Instant)> = None;
        // Lost shards whose release has not passed the pipeline yet: not
        // taken again before (the release would drop the new state).
        let mut draining: HashSet<String> = HashSet::new();
        let mut jobs: JoinSet<Done> = JoinSet::new();
        let mut last_discovery: Option<Instant> = None;
        // The lease keys of the last listing: discovery creates only others.
        let mut listed: HashSet<String> = HashSet::new();
        let mut finished_at: Option<Instant> = None;
        let current = metrics::gauge!(METRIC_CURRENT_LEASES);
        let taken = metrics::counter!(METRIC_TAKEN_LEASES);
        let lost = metrics::counter!(METRIC_LOST_LEASES);
        let failovers = metrics::counter!(METRIC_FAILOVERS);
        tracing::info!(worker = %me, table = self.table.name(), "cluster worker started");
        loop {
            let stopping = *shutdown.borrow();
            self.stopping = stopping;
            if *finished.borrow() {
                // The last commit is done: its exports are all queued.
                let since = *finished_at.get_or_insert_with(Instant::now);
                while let Ok(export) = self.exported.try_recv() {
                    self.upload(&held, &mut jobs, &mut draining, export, &me)
                        .await;
                }
                if jobs.is_empty() || since.elapsed() > cfg.handoff_timeout.std() {
                    // What is left never passed the pipeline: its lease's
                    // checkpoint and snapshot still hold.
                    for (key, h) in std::mem::take(&mut held) {
                        match self.table.release(&h.lease).await {
                            Ok(_) => tracing::info!(shard = %key, "lease released unchanged"),
                            Err(e) => {
                                tracing::warn!(shard = %key, error = %e, "releasing the lease failed; it expires")
                            }
                        }
                    }
                    break;
                }
            }
            tokio::select! {
                _ = tick.tick() => {
                    if !stopping && last_discovery.is_none_or(|t| t.elapsed() >= self.settings.shard_refresh) {
                        last_discovery = Some(Instant::now());
                        if let Err(e) = self.discover(&listed).await {
                            tracing::warn!(error = %format!("{e:#}"), "shard discovery failed; retrying at the next refresh");
                        }
                    }
                    // Renew first, all at once: the rest of the tick may
                    // take a while, and one slow write must not let the
                    // other leases expire behind it.
                    let keys: Vec<String> = held.keys().cloned().collect();
                    // A renewal counts from when it was sent: the others
                    // judge expiry from the write, which is after it.
                    let sent = Instant::now();
                    let renewals = futures_util::future::join_all(
                        keys.iter().map(|k| self.table.renew(&held[k].lease)),
                    )
                    .await;
                    for (key, renewal) in keys.into_iter().zip(renewals) {
                        let h = held.get_mut(&key).expect("listed");
                        match renewal {
                            Ok(lease) => {
                                h.lease = lease;
                                h.renewed = sent;
                            }
                            Err(LeaseError::Lost { .. }) => {
                                lost.increment(1);
                                tracing::warn!(shard = %key, "lease lost (taken by another worker): dropping the shard");
                                self.drop_shard(&mut held, &mut draining, &key).await;
                                continue;
                            }
                            Err(e) => {
                                if h.renewed.elapsed() >= give_up {
                                    lost.increment(1);
                                    tracing::error!(shard = %key, error = %e, "lease not renewed for failover_time minus a renewal interval: dropping the shard before another worker may take it");
                                    self.drop_shard(&mut held, &mut draining, &key).await;
                                } else {
                                    tracing::warn!(shard = %key, error = %e, "lease renewal failed; retrying");
                                }
                                continue;
                            }
                        }
                        let h = held.get_mut(&key).expect("listed");
                        // Another worker asked for it: hand it off at the next barrier.
                        if h.phase == Phase::Running
                            && h.lease.checkpoint_owner.as_deref() == Some(&me)
                            && h.lease.owner.as_deref() != Some(&me)
                        {
                            tracing::info!(shard = %key, to = ?h.lease.owner, "graceful handoff asked: stopping the shard");
                            h.phase = Phase::Stopping(ReleaseReason::Handoff);
                            self.directory.serving(&key, false);
                            let _ = self.commands.send(ShardCommand::Stop { shard: Arc::from(key.as_str()), why: ReleaseReason::Handoff }).await;
                        }
                    }
                    if stopping {
                        continue;
                    }
                    let leases = match self.table.list().await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(error = %e, "listing the lease table failed; retrying at the next renewal");
                            continue;
                        }
                    };
                    let now = Instant::now();
                    observed.note(&leases, now);
                    listed = leases.iter().map(|l| l.lease_key.clone()).collect();
                    let serving: HashSet<String> = held
                        .iter()
                        .filter(|(_, h)| h.phase == Phase::Running)
                        .map(|(k, _)| k.clone())
                        .collect();
                    self.directory.listed(&leases, &serving);
                    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
                    // A steal completed at this listing: its lease is adopted below.
                    let mut handed: Option<(String, Instant)> = None;
                    if let Some((key, since)) = &steal {
                        match by_key.get(key.as_str()) {
                            Some(l) if l.actual_owner() == Some(&me) => handed = steal.take(),
                            Some(l) if l.owner.as_deref() == Some(&me) && since.elapsed() >= cfg.handoff_timeout.std() => {
                                // The holder did not hand it over in time: force it.
                                tracing::warn!(shard = %key, holder = ?l.checkpoint_owner, "graceful handoff timed out: taking the lease");
                                if let Ok(lease) = self.table.take(l).await {
                                    taken.increment(1);
                                    self.acquire(&mut held, &mut jobs, lease, &leases);
                                }
                                steal = None;
                            }
                            Some(l) if l.owner.as_deref() == Some(&me) => {}
                            // Cancelled, taken by another, or gone.
                            _ => steal = None,
                        }
                    }
                    let mut holding: HashSet<String> = held.keys().cloned().collect();
                    holding.extend(draining.iter().cloned());
                    let plan = assign::plan(&leases, &View {
                        me: &me,
                        held: &holding,
                        observed: &observed,
                        now,
                        failover_time: failover,
                        steal_pending: steal.is_some(),
                    });
                    for key in &plan.adopt {
                        let l = by_key[key.as_str()];
                        // Renewing confirms it and gives a fresh copy.
                        match self.table.renew(l).await {
                            Ok(lease) => {
                                tracing::info!(shard = %key, "lease handed to this worker");
                                self.acquire(&mut held, &mut jobs, lease, &leases);
                                if let (Some((stolen, since)), Some(h)) = (&handed, held.get_mut(key)) {
                                    if stolen == key {
                                        h.asked = Some(*since);
                                    }
                                }
                            }
                            Err(e) => tracing::debug!(shard = %key, error = %e, "a lease handed here moved on"),
                        }
                    }
                    for key in &plan.take {
                        let l = by_key[key.as_str()];
                        match self.table.take(l).await {
                            Ok(lease) => {
                                taken.increment(1);
                                if l.actual_owner().is_some() {
                                    failovers.increment(1);
                                }
                                tracing::info!(shard = %key, from = ?l.actual_owner(), "took an expired lease");
                                self.acquire(&mut held, &mut jobs, lease, &leases);
                            }
                            Err(LeaseError::Lost { .. }) => {}
                            Err(e) => tracing::warn!(shard = %key, error = %e, "taking a lease failed"),
                        }
                    }
                    if let Some(key) = plan.steal {
                        let l = by_key[key.as_str()];
                        match self.table.request_handoff(l, &me).await {
                            Ok(_) => {
                                tracing::info!(shard = %key, from = ?l.actual_owner(), target = plan.target, "asked for a graceful handoff");
                                steal = Some((key, Instant::now()));
                            }
                            Err(e) => tracing::debug!(shard = %key, error = %e, "handoff request refused"),
                        }
                    }
                }
                Some(export) = self.exported.recv() => {
                    self.upload(&held, &mut jobs, &mut draining, export, &me).await;
                }
                Some(done) = jobs.join_next(), if !jobs.is_empty() => match done {
                    Ok(Done::Restored(key, result)) => self.restored(&mut held, key, result).await,
                    Ok(Done::Uploaded(export, result)) => self.uploaded(&mut held, &mut draining, *export, result).await,
                    Err(e) => anyhow::bail!("a cluster job panicked: {e}"),
                },
                _ = shutdown.changed(), if !stopping => {
                    tracing::info!(held = held.len(), "clean stop: handing every lease off at the last commit");
                }
                _ = finished.changed(), if !*finished.borrow() => {}
            }
            current.set(held.len() as f64);
        }
        current.set(0.0);
        Ok(())
    }

    /// Uploads an export in the background (or notes a lost shard's).
    async fn upload(
        &self,
        held: &BTreeMap<String, Held>,
        jobs: &mut JoinSet<Done>,
        draining: &mut HashSet<String>,
        export: Exported,
        me: &str,
    ) {
        let key = export.shard.to_string();
        if export.why == ExportReason::Released(ReleaseReason::Lost) {
            draining.remove(&key);
            self.tap.uploaded(&key);
            return;
        }
        if !held.contains_key(&key) {
            // Dropped meanwhile (lost): nothing to hand on.
            self.tap.uploaded(&key);
            remove_dir(&export.dir).await;
            return;
        }
        let remote = self.remote.clone();
        let rel = handoff::snapshot_dir(&key, me, export.meta.commit);
        jobs.spawn(async move {
            let meta = serde_json::to_vec(&export.meta).expect("serialisable");
            let result = remote
                .put_snapshot(&rel, &export.files, &meta)
                .await
                .map(|_| rel)
                .map_err(anyhow::Error::from);
            Done::Uploaded(Box::new(export), result)
        });
    }

    /// A lease became this worker's: restore its state in the background.
    fn acquire(
        &self,
        held: &mut BTreeMap<String, Held>,
        jobs: &mut JoinSet<Done>,
        lease: Lease,
        listing: &[Lease],
    ) {
        let key = lease.lease_key.clone();
        let Some(HashKeyRange { start, end }) = lease.hash_key_range else {
            tracing::error!(shard = %key, "the lease has no hash key range; it cannot be served (created by another tool?)");
            return;
        };
        let range = HashRange { start, end };
        let parents: Vec<Lease> = if lease.snapshot.is_none() {
            lease
                .parent_shard_ids
                .iter()
                .filter_map(|p| listing.iter().find(|l| &l.lease_key == p).cloned())
                .collect()
        } else {
            Vec::new()
        };
        let (remote, store) = (self.remote.clone(), self.store.clone());
        let work = self.settings.work_dir.join(format!("restore-{key}"));
        let fingerprint = self.settings.fingerprint.clone();
        let l2 = lease.clone();
        jobs.spawn(async move {
            let started = Instant::now();
            let r =
                handoff::restore(&remote, &store, &l2, range, &parents, &work, &fingerprint).await;
            if r.is_ok() {
                metrics::histogram!(METRIC_RESTORE_SECONDS).record(started.elapsed().as_secs_f64());
            }
            Done::Restored(l2.lease_key.clone(), r)
        });
        held.insert(
            key,
            Held {
                lease,
                range,
                phase: Phase::Restoring,
                renewed: Instant::now(),
                asked: None,
            },
        );
    }

    async fn restored(
        &self,
        held: &mut BTreeMap<String, Held>,
        key: String,
        result: anyhow::Result<handoff::Restored>,
    ) {
        let Some(h) = held.get_mut(&key) else { return };
        if self.stopping {
            let h = held.remove(&key).expect("present");
            if let Err(e) = self.table.release(&h.lease).await {
                tracing::warn!(shard = %key, error = %e, "releasing the lease failed; it expires");
            }
            return;
        }
        match result {
            Ok(r) => {
                let shard: Arc<str> = Arc::from(key.as_str());
                let start = self.start_of(&h.lease);
                tracing::info!(shard = %key, checkpoint = %h.lease.checkpoint, ?start, "shard state restored; reading it");
                if let Some(asked) = h.asked.take() {
                    metrics::histogram!(METRIC_HANDOFF_SECONDS)
                        .record(asked.elapsed().as_secs_f64());
                }
                h.phase = Phase::Running;
                self.directory.serving(&key, true);
                let resume = handoff::position_of(&shard, &h.lease.checkpoint);
                let _ = self
                    .commands
                    .send(ShardCommand::Start {
                        shard,
                        start,
                        range: h.range,
                        max_event_time: r.max_event_time,
                        watermark: r.watermark,
                        next_seq: r.next_seq,
                        resume,
                    })
                    .await;
            }
            Err(e) => {
                tracing::error!(shard = %key, error = %format!("{e:#}"), "restoring the shard's state failed; releasing the lease");
                let h = held.remove(&key).expect("present");
                if let Err(e) = self.table.release(&h.lease).await {
                    tracing::warn!(shard = %key, error = %e, "releasing the lease failed; it expires");
                }
            }
        }
    }

    /// Where reading a lease's shard starts.
    fn start_of(&self, lease: &Lease) -> Start {
        match &lease.checkpoint {
            Checkpoint::Sequence { seq, sub } => Start::Inside {
                sequence: seq.clone(),
                skip_through: *sub,
            },
            Checkpoint::TrimHorizon => Start::TrimHorizon,
            Checkpoint::Latest if lease.parent_shard_ids.is_empty() => Start::Latest,
            // A child's first record follows its parents' last: none may be
            // skipped, whatever the stream's starting position says.
            Checkpoint::Latest | Checkpoint::AtTimestamp if !lease.parent_shard_ids.is_empty() => {
                Start::TrimHorizon
            }
            Checkpoint::AtTimestamp => match self.settings.at_timestamp {
                Some(t) => Start::AtTimestamp(t),
                None => Start::TrimHorizon,
            },
            Checkpoint::Latest => Start::Latest,
            Checkpoint::ShardEnd => Start::TrimHorizon,
        }
    }

    /// An export was uploaded (or failed): checkpoint the lease with it,
    /// and release the lease if the shard stopped here.
    async fn uploaded(
        &self,
        held: &mut BTreeMap<String, Held>,
        draining: &mut HashSet<String>,
        export: Exported,
        result: anyhow::Result<String>,
    ) {
        let key = export.shard.to_string();
        self.tap.uploaded(&key);
        remove_dir(&export.dir).await;
        let releasing = !matches!(export.why, ExportReason::Periodic);
        let Some(h) = held.get_mut(&key) else { return };
        match result {
            Ok(rel) => {
                let checkpoint = export
                    .checkpoint
                    .clone()
                    .unwrap_or_else(|| h.lease.checkpoint.clone());
                let previous = h.lease.snapshot.clone();
                let progress = Progress {
                    snapshot: Some(rel.clone()),
                    watermark: export.meta.max_event_time,
                };
                let sent = Instant::now();
                match self
                    .table
                    .checkpoint(&h.lease, &checkpoint, &progress)
                    .await
                {
                    Ok(lease) => {
                        h.lease = lease;
                        h.renewed = sent;
                        if !releasing {
                            self.tap.checkpointed(&export.shard, &checkpoint);
                        }
                        if let Some(old) = previous.filter(|o| *o != rel) {
                            let remote = self.remote.clone();
                            tokio::spawn(async move {
                                if let Err(e) = remote.delete_snapshot(&old).await {
                                    tracing::debug!(snapshot = %old, error = %e, "deleting a replaced shard snapshot failed");
                                }
                            });
                        }
                    }
                    Err(e) if !e.is_lost() => {
                        // The table is out of reach: the lease keeps its last
                        // checkpoint and snapshot; the next export tries again
                        // (renewals decide whether the shard stays).
                        tracing::warn!(shard = %key, error = %e, "checkpointing the lease failed; it keeps its last checkpoint");
                        let remote = self.remote.clone();
                        tokio::spawn(async move { remote.delete_snapshot(&rel).await.ok() });
                    }
                    Err(e) => {
                        // The fence: this worker may not write for the shard.
                        tracing::warn!(shard = %key, error = %e, "checkpointing the lease failed: the lease moved; dropping the shard");
                        let remote = self.remote.clone();
                        tokio::spawn(async move { remote.delete_snapshot(&rel).await.ok() });
                        if !releasing {
                            metrics::counter!(METRIC_LOST_LEASES).increment(1);
                            self.drop_shard(held, draining, &key).await;
                        } else {
                            held.remove(&key);
                        }
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(shard = %key, error = %format!("{e:#}"), "uploading the shard snapshot failed; the lease keeps its last checkpoint");
            }
        }
        if releasing {
            self.directory.serving(&key, false);
            let h = held.remove(&key).expect("present");
            match self.table.release(&h.lease).await {
                Ok(l) => {
                    tracing::info!(shard = %key, to = ?l.owner, checkpoint = %h.lease.checkpoint, why = ?export.why, "lease released")
                }
                Err(e) => {
                    tracing::warn!(shard = %key, error = %e, "releasing the lease failed; it expires")
                }
            }
        }
    }

    /// Stops a shard whose lease this worker lost; its state is dropped at
    /// the barrier its release makes.
    async fn drop_shard(
        &self,
        held: &mut BTreeMap<String, Held>,
        draining: &mut HashSet<String>,
        key: &str,
    ) {
        let Some(h) = held.remove(key) else { return };
        if h.phase != Phase::Restoring {
            draining.insert(key.to_owned());
            let _ = self
                .commands
                .send(ShardCommand::Stop {
                    shard: Arc::from(key),
                    why: ReleaseReason::Lost,
                })
                .await;
        }
    }

    /// Creates the leases of shards that have none (every worker may, the
    /// condition makes one row), with their parents and hash ranges. Shards
    /// whose lease the last listing showed cost no write.
    async fn discover(&self, listed: &HashSet<String>) -> anyhow::Result<()> {
        let mut token: Option<String> = None;
        let initial = match self.settings.starting_position {
            StartingPosition::Latest => Checkpoint::Latest,
            StartingPosition::TrimHorizon => Checkpoint::TrimHorizon,
            StartingPosition::AtTimestamp => Checkpoint::AtTimestamp,
        };
        let mut created = 0;
        for _ in 0..1_000 {
            let request = match &token {
                Some(t) => self.kinesis.list_shards().next_token(t),
                None => self
                    .kinesis
                    .list_shards()
                    .stream_name(&self.settings.stream),
            };
            let out = request
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("ListShards: {}", error_text(&e)))?;
            for s in out.shards.unwrap_or_default() {
                if listed.contains(&s.shard_id) {
                    continue;
                }
                let range = s
                    .hash_key_range
                    .as_ref()
                    .context("a shard without a hash key range")?;
                let mut lease = Lease::new(&s.shard_id, initial.clone());
                lease.parent_shard_ids = s
                    .parent_shard_id
                    .iter()
                    .chain(s.adjacent_parent_shard_id.iter())
                    .cloned()
                    .collect();
                lease.hash_key_range = Some(HashKeyRange {
                    start: range
                        .starting_hash_key
                        .parse()
                        .context("starting hash key")?,
                    end: range.ending_hash_key.parse().context("ending hash key")?,
                });
                if self.table.create_if_absent(&lease).await? == Created::Created {
                    created += 1;
                }
            }
            token = out.next_token;
            if token.is_none() {
                break;
            }
        }
        if created > 0 {
            tracing::info!(created, "created the leases of new shards");
        }
        Ok(())
    }
}

async fn remove_dir(dir: &std::path::Path) {
    if !dir.as_os_str().is_empty() {
        tokio::fs::remove_dir_all(dir).await.ok();
    }
}
