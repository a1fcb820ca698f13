//! The event-time engine: watermarks, tumbling and sliding windows over
//! RocksDB-backed state, per-event feature vectors, window results and the
//! late side output, with Flink's event-time rules. [`rules`] owns them:
//! when a window fires, when it is purged, when an event is late.
//!
//! Per event, in order: (1) classify it against the watermark as it was
//! before the event, (2) add it to its live windows, (3) compute its feature
//! vector, (4) advance its partition's watermark, (5) fire what the new
//! watermark allows (re-firing fired windows the event updated first).
//!
//! The online API reads live state through [`Engine::read`] and
//! [`Engine::evaluate`] (`query.rs`): the same per-event path, changing
//! nothing.
//!
//! Exactly-once state: [`Engine::snapshot`] hands out the changes since the
//! previous snapshot; the pipeline commits them with the source positions via
//! [`StateStore::commit`] and then calls [`Engine::committed`]. A new engine
//! on the same store restores the last commit: watermarks, arrival counter,
//! timers; key states are read from RocksDB on first use. Window revisions
//! continue from the stored revision of every not-yet-purged window.

mod aggregate;
mod cache;
mod ingest;
mod operator;
mod query;
mod ranges;
pub mod rules;
mod snapshot;
mod timers;
mod watermark;
mod window;

pub use cache::PREFETCH_AHEAD;
pub use operator::EngineStats;
pub use query::{Evaluation, FeatureStatus, Reading};
pub use watermark::{IdleClock, PartitionMark, PartitionStatus, Watermarks, GLOBAL};
pub use window::Geometry;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::config::{Config, DEFAULT_MAX_DISTINCT};
use crate::record::{
    Event, FeatureNames, FeatureRecord, FeatureVector, FieldValue, Key, LateRecord, Output, Value,
};
use crate::state::rocks_meta_key;
use crate::state::{Cf, HashRange, StateDelta, StateError, StateStore};
use crate::time::Millis;

use aggregate::FeatureSlot;
use operator::{Operator, SpecPlan};

/// What can go wrong in the engine. None of these is a panic: a data
/// problem the engine can represent (e.g. too many distinct values) becomes
/// a `null` value plus a warning and a metric instead.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("corrupt engine state: {0}")]
    Corrupt(String),
    #[error("engine configuration: {0}")]
    Config(String),
}

/// Tuning that is not part of the state's shape.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Soft bound on (window spec, key) states kept in memory. Entries are
    /// only evicted once clean with respect to a committed checkpoint.
    pub cache_capacity: usize,
    /// Replay: no partition is ever idle by processing time. A replay runs
    /// at its own speed, so its wall clock says nothing about the archived
    /// stream; the live run's idleness arrives with each record instead
    /// (see [`Engine::advance_to`]).
    pub event_time_only: bool,
    /// Whether window results are produced: true when a sink subscribes to
    /// `window`. Without them, per-event vectors, purging and the late side
    /// output are the same, and firing costs one visit per purged slice
    /// instead of one per window with data.
    pub window_results: bool,
    /// A key's `windows` record keeps its slices inline up to this many
    /// bytes; past it they are stored one by one. Either layout reads back
    /// whatever the limit, so it can change between runs.
    pub inline_record_max: usize,
    /// Most keys a call fires before it returns with the rest pending (see
    /// [`Engine::fire_more`]); `usize::MAX` fires everything at once.
    pub fire_chunk_keys: usize,
    /// Per-shard watermarks (a Kinesis source): a key's windows follow the
    /// watermark of the shard whose hash key range holds it, so results do
    /// not depend on which shards share a process (see `watermark.rs`).
    pub per_shard: bool,
    /// Whether accepted events become `Features` outputs: false when
    /// nothing downstream takes them (no sink subscribes to `features`
    /// and no model scores them). The event is aggregated the same.
    pub feature_records: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_capacity: 1_000_000,
            event_time_only: false,
            window_results: true,
            inline_record_max: snapshot::INLINE_RECORD_MAX,
            fire_chunk_keys: usize::MAX,
            per_shard: false,
            feature_records: true,
        }
    }
}

/// The watermark state stored with every checkpoint.
#[derive(Serialize, Deserialize)]
struct EngineMeta {
    watermark: Millis,
    next_seq: u64,
    partitions: Vec<PartitionMark>,
    /// Whether the state was written with window results on; absent in
    /// state written before they could be off.
    #[serde(default = "on")]
    window_results: bool,
}

fn on() -> bool {
    true
}

pub struct Engine {
    op: Operator,
    wm: Watermarks,
    names: FeatureNames,
    lateness: Millis,
    /// Arrival order, for first/last ties; checkpointed so a replay after a
    /// restore numbers events as the original run did.
    next_seq: u64,
    fire_chunk_keys: usize,
    /// Keys due at the current watermark are left to fire (see
    /// [`Engine::fire_more`]).
    firing: bool,
    /// The timer domains with keys left to fire.
    pending_domains: Vec<u32>,
    /// Scratch for [`Engine::fire`]'s list of domains.
    fire_todo: Vec<u32>,
    /// The newest event time processed (after a restore, the newest of the
    /// restored partitions), the online API's default `at`.
    newest: Millis,
    /// Per-shard mode: keys seen on a shard whose hash range does not hold
    /// their MD5 (see [`Engine::misrouted`]); at most [`MISROUTED_REMEMBERED`].
    misrouted: std::collections::HashSet<Key>,
    /// `[schema] request_fields`: (vector slot, event field index).
    request: Vec<(usize, usize)>,
    /// See [`EngineOptions::feature_records`].
    feature_records: bool,
}

/// How many misrouted keys are told apart; past it, every record of a new
/// one counts.
const MISROUTED_REMEMBERED: usize = 100_000;

/// Keys whose records arrived on a shard that does not own their hash.
pub const METRIC_MISROUTED_KEYS: &str = "shardflow_cluster_misrouted_keys_total";

/// Groups features by window geometry (features sharing one share slices).
fn plan(config: &Config) -> Result<Vec<SpecPlan>, EngineError> {
    let mut specs: Vec<SpecPlan> = Vec::new();
    for (index, f) in config.features.iter().enumerate() {
        let w = f.window.get_ref();
        let geo = Geometry::new(w.size_millis(), w.slide_millis());
        if w.size_millis() <= 0 || w.size_millis() % geo.slide != 0 {
            return Err(EngineError::Config(format!(
                "feature {:?}: window size must be a positive multiple of slide",
                f.name.get_ref()
            )));
        }
        let field = match &f.field {
            None => None,
            Some(name) => Some(config.schema.field_index(name.get_ref()).ok_or_else(|| {
                EngineError::Config(format!(
                    "feature {:?}: unknown field {:?}",
                    f.name.get_ref(),
                    name.get_ref()
                ))
            })?),
        };
        let slot = FeatureSlot {
            index,
            name: SmolStr::new(f.name.get_ref()),
            agg: f.agg,
            field,
            max_distinct: f.max_distinct.unwrap_or(DEFAULT_MAX_DISTINCT),
        };
        match specs.iter_mut().find(|s| s.geo == geo) {
            Some(s) => s.slots.push(slot),
            None => {
                let id = u16::try_from(specs.len())
                    .map_err(|_| EngineError::Config("too many distinct window specs".into()))?;
                specs.push(SpecPlan {
                    id,
                    geo,
                    slots: vec![slot],
                });
            }
        }
    }
    Ok(specs)
}

impl Engine {
    /// Builds the operator from config and restores the store's last commit.
    pub fn new(config: &Config, store: StateStore) -> Result<Engine, EngineError> {
        Engine::with_options(config, store, EngineOptions::default())
    }

    pub fn with_options(
        config: &Config,
        store: StateStore,
        options: EngineOptions,
    ) -> Result<Engine, EngineError> {
        let specs = plan(config)?;
        let names: FeatureNames = config.vector_names().into();
        let request = config
            .schema
            .request_fields
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let field = config.schema.field_index(name).ok_or_else(|| {
                    EngineError::Config(format!("request field {name:?} is not a schema field"))
                })?;
                Ok((config.features.len() + i, field))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let wc = &config.watermark;
        let idle_timeout = if options.event_time_only {
            Millis::MAX
        } else {
            wc.idle_timeout.millis()
        };
        let mut wm = Watermarks::new(wc.max_out_of_orderness.millis(), idle_timeout);
        if options.per_shard {
            wm = wm.per_shard();
        }
        let mut next_seq = 0;
        let mut stored_results = options.window_results;
        if let Some(bytes) = store.get(Cf::Meta, rocks_meta_key())? {
            let meta: EngineMeta = serde_json::from_slice(&bytes)
                .map_err(|e| EngineError::Corrupt(format!("engine meta: {e}")))?;
            wm.restore(meta.watermark, meta.partitions);
            next_seq = meta.next_seq;
            stored_results = meta.window_results;
        }
        let lateness = wc.allowed_lateness.millis();
        let mut op = Operator::new(
            specs,
            lateness,
            options.window_results,
            store,
            (options.cache_capacity, options.inline_record_max),
        )?;
        if wm.is_per_shard() {
            op.set_domains(wm.domains());
        }
        if options.window_results && !stored_results {
            tracing::info!("a sink now subscribes to window results: scheduling every stored key");
            op.start_window_results(wm.current())?;
        }
        let newest = wm
            .partitions()
            .iter()
            .map(|p| p.max_event_time)
            .max()
            .unwrap_or(Millis::MIN);
        Ok(Engine {
            op,
            wm,
            names,
            lateness,
            next_seq,
            fire_chunk_keys: options.fire_chunk_keys,
            firing: false,
            pending_domains: Vec::new(),
            fire_todo: Vec::new(),
            newest,
            misrouted: Default::default(),
            request,
            feature_records: options.feature_records,
        })
    }

    pub fn feature_names(&self) -> FeatureNames {
        self.names.clone()
    }

    pub fn watermark(&self) -> Millis {
        self.wm.current()
    }

    pub fn stats(&self) -> EngineStats {
        self.op.stats
    }

    /// (window spec, key) states in memory and timer entries, for tests and gauges.
    pub fn memory_footprint(&self) -> (usize, usize) {
        (self.op.cached_states(), self.op.timer_entries())
    }

    /// Starts loading the state of the next events' keys into the CPU
    /// cache; call it with the keys of the next [`PREFETCH_AHEAD`] events
    /// before processing them. Results do not depend on it, only speed: a
    /// key's state is usually a cache miss, and misses of keys looked up
    /// together overlap.
    pub fn prefetch<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        self.op.prefetch(keys);
    }

    /// Fires at most one chunk of what the watermarks allow, in the timer
    /// domains that may have something due: those left pending, those whose
    /// shard watermark moved, and the pipeline's. The rest waits for
    /// [`Engine::fire_more`].
    fn fire(&mut self, out: &mut Vec<Output>) -> Result<(), EngineError> {
        self.fire_also(None, out)
    }

    /// [`Engine::fire`], also in `domain`: an event's key may have a timer
    /// due at once (its window is due already) in a domain whose watermark
    /// did not move.
    fn fire_also(&mut self, domain: Option<u32>, out: &mut Vec<Output>) -> Result<(), EngineError> {
        // Called per event, and usually nothing is due: with no burst
        // pending and no partition's watermark moved, only `domain` and the
        // pipeline's can have a timer due, and their first timers tell.
        if self.pending_domains.is_empty() && !self.wm.any_changed() {
            let quiet = |d: u32| {
                self.op
                    .first_timer(d)
                    .is_none_or(|(_, due, _)| !rules::due(due, self.wm.of(d)))
            };
            if quiet(GLOBAL) && domain.is_none_or(quiet) {
                self.firing = false;
                return Ok(());
            }
        }
        // The lists keep their allocations.
        let mut todo = std::mem::take(&mut self.fire_todo);
        todo.clear();
        todo.append(&mut self.pending_domains);
        if let Some(d) = domain {
            if !todo.contains(&d) {
                todo.push(d);
            }
        }
        self.wm.drain_changed(|d| {
            if !todo.contains(&d) {
                todo.push(d);
            }
        });
        if !todo.contains(&GLOBAL) {
            todo.push(GLOBAL);
        }
        let mut budget = self.fire_chunk_keys.max(1);
        let mut result = Ok(());
        for &d in &todo {
            if budget == 0 {
                self.pending_domains.push(d);
                continue;
            }
            let w = self.wm.of(d);
            match self.op.fire(d, w, &mut budget, out) {
                Ok(true) => self.pending_domains.push(d),
                Ok(false) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.firing = !self.pending_domains.is_empty();
        self.fire_todo = todo;
        result
    }

    /// The watermark `key`'s windows follow: its shard's in per-shard mode,
    /// else the pipeline's.
    pub fn watermark_for(&self, key: &str) -> Millis {
        if self.wm.is_per_shard() {
            self.wm.of(self.op.domain_of_key(key))
        } else {
            self.wm.current()
        }
    }

    /// Per-shard mode: the open shards' ranges changed; timers follow.
    fn domains_changed(&mut self) {
        if self.wm.is_per_shard() {
            let moved = self.op.set_domains(self.wm.domains());
            tracing::debug!(moved, "timer domains updated");
        }
    }

    /// Per-shard mode: the hash key ranges of partitions (Kinesis shards),
    /// said by the source when it lists them.
    pub fn partition_ranges(
        &mut self,
        ranges: &[(Arc<str>, HashRange)],
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.settle(out)?;
        if !self.wm.is_per_shard() {
            return Ok(());
        }
        for (p, r) in ranges {
            self.wm.set_range(p, *r);
        }
        self.domains_changed();
        self.fire(out)
    }

    /// Whether windows the watermark allows are still to fire: the caller
    /// hands on what it has and calls [`Engine::fire_more`] until this is
    /// false, before anything else goes into the engine.
    pub fn firing(&self) -> bool {
        self.firing
    }

    /// The next chunk of a firing burst (`fire_chunk_keys` keys). Returns
    /// whether more remain.
    pub fn fire_more(&mut self, out: &mut Vec<Output>) -> Result<bool, EngineError> {
        if self.firing {
            self.fire(out)?;
        }
        Ok(self.firing)
    }

    /// Finishes a burst left pending, so that an event never overtakes the
    /// firing its predecessor caused (the pipeline drains it chunk by chunk
    /// before; this only guards other callers).
    fn settle(&mut self, out: &mut Vec<Output>) -> Result<(), EngineError> {
        while self.fire_more(out)? {}
        Ok(())
    }

    /// The five steps for one event (see the module docs). Appends exactly
    /// one `Features` (unless [`EngineOptions::feature_records`] is off) or
    /// `Late` output, then any window results.
    pub fn process(
        &mut self,
        event: &Event,
        now: Millis,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.settle(out)?;
        let domain = if self.wm.is_per_shard() {
            self.op.domain_of_key(&event.key)
        } else {
            GLOBAL
        };
        let w_before = self.wm.of(domain);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.op.stats.events += 1;
        let t = event.event_time;
        self.newest = self.newest.max(t);
        // Rule 3 of `rules`: late when late in every spec.
        let late = !self.op.specs.is_empty()
            && self
                .op
                .specs
                .iter()
                .all(|s| s.geo.is_late(t, w_before, self.lateness));
        if late {
            self.op.stats.late += 1;
            out.push(Output::Late(LateRecord {
                id: event.position.id(),
                key: event.key.clone(),
                event_time: t,
                watermark: w_before,
                raw: event.raw.clone(),
            }));
        } else if !self.feature_records {
            // Aggregated, no vector: nothing downstream takes it.
            self.op.add_event(event, seq, (w_before, domain), &mut [])?;
        } else {
            let mut values = vec![None; self.names.len()];
            self.op
                .add_event(event, seq, (w_before, domain), &mut values)?;
            self.fill_request(event, &mut values);
            out.push(Output::Features(FeatureRecord {
                id: event.position.id(),
                key: event.key.clone(),
                event_time: t,
                features: FeatureVector {
                    names: self.names.clone(),
                    values,
                },
                arrival: event.arrival,
            }));
        }
        self.wm.observe(&event.position.partition, t, now);
        // A stateless pipeline (the re-keyer itself) keeps no key state.
        if let Some((own, range)) = self.wm.last_range().filter(|_| !self.op.specs.is_empty()) {
            // Disjoint open ranges make `domain == own` the common, cheap
            // answer; a parent and its announced children overlap, hence
            // the exact test before counting.
            if own != domain && !range.contains(&crate::state::hash_key(&event.key)) {
                self.misrouted(event, range);
            }
        }
        self.op.refire(out);
        self.fire_also(Some(domain), out)
    }

    /// A key arrived on a shard whose hash range does not hold its MD5: the
    /// stream's partition key is not the entity key. Its state then lives
    /// in another shard's range, so its windows follow that shard's
    /// watermark and, under `[cluster]`, move with that shard: results
    /// depend on the assignment. Counted, and told once, with the fix.
    fn misrouted(&mut self, event: &Event, range: crate::state::HashRange) {
        let full = self.misrouted.len() >= MISROUTED_REMEMBERED;
        if !full && !self.misrouted.insert(event.key.clone()) {
            return;
        }
        self.op.stats.misrouted_keys += 1;
        if self.op.stats.misrouted_keys == 1 {
            tracing::warn!(
                key = &*event.key,
                shard = &*event.position.partition,
                shard_hash_range = %format_args!("{}..={}", range.start, range.end),
                "a key arrived on a shard that does not own its hash: the stream's partition key \
                 is not the entity key, so this key's state is not the shard's (results depend on \
                 which worker reads which shard). Re-key the stream (README: \"Partition key = \
                 entity key\"); shardflow_cluster_misrouted_keys_total counts such keys"
            );
        }
    }

    /// Writes the event's own request fields into their slots of `values`.
    fn fill_request(&self, event: &Event, values: &mut [Option<Value>]) {
        for &(slot, field) in &self.request {
            values[slot] = match event.fields.get(field) {
                Some(Some(FieldValue::I64(v))) => Some(Value::Int(*v)),
                Some(Some(FieldValue::F64(v))) => Some(Value::Float(*v)),
                _ => None,
            };
        }
    }

    /// Keys seen on a shard that does not own their hash (per-shard mode).
    pub fn misrouted_keys(&self) -> u64 {
        self.op.stats.misrouted_keys
    }

    /// A source's word on one of its partitions (known, reading, finished;
    /// see [`PartitionStatus`]); fires what the watermark then allows.
    pub fn partition_status(
        &mut self,
        partition: &Arc<str>,
        status: PartitionStatus,
        now: Millis,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.settle(out)?;
        self.wm.status(partition, status, now);
        if status == PartitionStatus::Finished {
            // A finished shard's keys follow its children from now on.
            self.domains_changed();
        }
        self.fire(out)
    }

    /// Processing time passed: idle partitions stop holding the watermark
    /// back; fires what the watermark now allows.
    pub fn on_tick(&mut self, now: Millis, out: &mut Vec<Output>) -> Result<(), EngineError> {
        self.settle(out)?;
        self.wm.tick(now);
        self.fire(out)
    }

    /// Replay: the live run's watermark was `w` before the next record (it
    /// may have moved on because partitions went idle). Moves there, never
    /// backwards, and fires what that allows, as the live run did between
    /// the previous record and the next.
    pub fn advance_to(&mut self, w: Millis, out: &mut Vec<Output>) -> Result<(), EngineError> {
        self.settle(out)?;
        let before = self.wm.current();
        let w = self.wm.advance_to(w);
        if w == before {
            return Ok(());
        }
        self.fire(out)
    }

    /// End of a bounded input: watermark +∞, every window with unfired
    /// changes fires, and all state is purged.
    pub fn finish(&mut self, out: &mut Vec<Output>) -> Result<(), EngineError> {
        self.settle(out)?;
        self.wm.finish();
        self.fire(out)
    }

    /// The state changes since the previous snapshot plus the watermarks, to
    /// be committed by the pipeline (in snapshot order) once the sinks have
    /// acknowledged everything before this barrier.
    pub fn snapshot(&mut self, checkpoint_id: u64) -> Result<StateDelta, EngineError> {
        let mut delta = self.op.snapshot(checkpoint_id);
        let meta = EngineMeta {
            watermark: self.wm.current(),
            next_seq: self.next_seq,
            partitions: self.wm.partitions().to_vec(),
            window_results: self.op.window_results(),
        };
        let bytes = serde_json::to_vec(&meta)
            .map_err(|e| EngineError::Corrupt(format!("engine meta: {e}")))?;
        delta.put(Cf::Meta, rocks_meta_key(), &bytes);
        let s = self.op.stats;
        metrics::counter!("shardflow_engine_events_total").absolute(s.events);
        metrics::counter!("shardflow_engine_late_events_total").absolute(s.late);
        metrics::counter!("shardflow_engine_window_results_total").absolute(s.window_results);
        metrics::counter!("shardflow_engine_timer_visits_total").absolute(s.timer_visits);
        metrics::counter!("shardflow_distinct_overflow_total").absolute(s.distinct_overflows);
        metrics::counter!(METRIC_MISROUTED_KEYS).absolute(s.misrouted_keys);
        metrics::gauge!("shardflow_engine_cached_states").set(self.op.cached_states() as f64);
        Ok(delta)
    }

    /// Cluster mode: `shard`'s state was ingested into the store. Adopts
    /// its range (timers, store reads), its partition at the maximum event
    /// time the last holder reached, and numbers arrivals after the last
    /// holder's. Returns the number of timers adopted.
    pub fn adopt_shard(
        &mut self,
        shard: &Arc<str>,
        range: HashRange,
        (max_event_time, watermark): (Option<Millis>, Option<Millis>),
        next_seq: u64,
    ) -> Result<usize, EngineError> {
        self.wm.adopt(shard, range, max_event_time, watermark);
        self.next_seq = self.next_seq.max(next_seq);
        // The online API's default `at`, as after a restore: a shard handed
        // over with no new record yet is still read as of its newest event.
        if let Some(t) = max_event_time {
            self.newest = self.newest.max(t);
        }
        self.domains_changed();
        self.op.adopt_range(range)
    }

    /// Cluster mode: `shard` was released at the snapshot just taken.
    /// Forgets its range and its partition. Returns the keys forgotten.
    pub fn forget_shard(&mut self, shard: &Arc<str>, range: HashRange) -> usize {
        self.wm.forget(shard);
        let keys = self.op.forget_range(range);
        self.domains_changed();
        keys
    }

    /// Each partition's maximum event time and its own watermark (per-shard
    /// mode; the pipeline watermark otherwise).
    pub fn partition_marks(&self) -> Vec<(Arc<str>, Millis, Millis)> {
        let per_shard = self.wm.is_per_shard();
        self.wm
            .partitions()
            .iter()
            .map(|p| {
                let own = if per_shard { p.own } else { self.wm.current() };
                (p.name.clone(), p.max_event_time, own)
            })
            .collect()
    }

    /// The arrival counter: the next event's number.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checkpoint `checkpoint_id` is durably committed: clean cache entries
    /// may now be evicted.
    pub fn committed(&mut self, checkpoint_id: u64) {
        self.op.committed(checkpoint_id);
    }
}

/// The pipeline moves the engine into its task and deltas and the store
/// across tasks.
const _: () = {
    const fn send<T: Send>() {}
    const fn send_sync<T: Send + Sync>() {}
    send::<Engine>();
    send::<StateDelta>();
    send_sync::<StateStore>();
};
