//! The window operator: per (spec, key) state in a write-back cache over
//! RocksDB, event-time timers, firing and purging. When a window fires, is
//! purged or re-fires, and when a timer is due, it asks [`rules`].
//!
//! Each (spec, key) has one [`KeyState`]: its live slices, a firing cursor
//! `fired` (every window `j ≤ fired` has been handled: fired, passed while
//! empty, or purged), the next revision of each fired-but-not-purged window,
//! and one timer: the earliest window end at which something happens to it
//! (its next window with data becomes due, or its oldest slice or revision
//! is purged), or an earlier one: a timer moving later keeps its earlier
//! visit, which reschedules it. Timers live in a `BTreeMap` ordered by that
//! end, so firing is a range scan from the smallest end; a key whose timer
//! moves earlier leaves a stale entry behind that is skipped when reached
//! (lazy deletion). Each key's timer is persisted in its `windows` record,
//! from which a restore rebuilds the timer index. Without window results
//! (no sink takes them) a key's timer is when its whole state expires: the
//! per-event vectors never depended on firing, and the slices that expire
//! before that are dropped by the key's next event or that visit, so a busy
//! key is visited once per expiry horizon rather than once per slice.
//!
//! The cache holds every state touched since the last committed checkpoint.
//! An entry is evicted only when it is clean with respect to a *committed*
//! checkpoint (not dirty, and its last snapshot committed), so a read that
//! falls through to RocksDB always finds the latest value. Purged (empty)
//! states are dropped the same way, after their deletes are committed.
//! `capacity` is therefore a soft bound: state changed since the last commit
//! always stays in memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use smallvec::SmallVec;
use smol_str::SmolStr;

use crate::record::Event;
use crate::record::{Output, Value, WindowResult};
use crate::state::codec::{write_key_prefix, write_slice_key, Reader, WindowRecord, Writer};
use crate::state::{Cf, StateDelta, StateStore};

use super::aggregate::{Acc, FeatureSlot};
use super::rules;
use super::window::{Geometry, KeyWindows, Slice};
use super::EngineError;

/// The features sharing one window spec, and so one set of slices.
#[derive(Clone, Debug)]
pub struct SpecPlan {
    pub id: u16,
    pub geo: Geometry,
    pub slots: Vec<FeatureSlot>,
}

/// Counters the engine reports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub events: u64,
    pub late: u64,
    pub window_results: u64,
    pub distinct_overflows: u64,
    pub cache_loads: u64,
    pub cache_evictions: u64,
    /// Keys visited at their timer (firing, purging).
    pub timer_visits: u64,
}

struct KeyState {
    windows: KeyWindows,
    fired: i64,
    /// `(window, next revision)` of fired windows not yet purged, by window.
    revisions: VecDeque<(i64, u32)>,
    timer: Option<i64>,
    /// The timer as of the last snapshot (what the store has, or will have).
    persisted_timer: Option<i64>,
    /// `fired` as of the last snapshot.
    persisted_fired: i64,
    /// `revisions` changed since the last snapshot.
    revisions_changed: bool,
    dirty: bool,
    snapshot_id: u64,
    /// The `windows` entry exists in the store (or in a handed-out delta).
    stored: bool,
    /// The slices live in the slices column family, not inline in the
    /// `windows` record: the record grew past the inline limit. Stays so
    /// until the state empties.
    separate: bool,
}

/// By default a `windows` record holds its key's slices inline up to this
/// size ([`EngineOptions::inline_record_max`](super::EngineOptions)). An
/// inline record is rewritten whole at every checkpoint that changes the
/// key, which is one put instead of a put per changed slice and a delete
/// per purged one; past about a KiB rewriting the unchanged slices costs
/// more than those ops (long windows with many or large slices).
pub(crate) const INLINE_RECORD_MAX: usize = 1024;

/// Keys whose states are loaded into the CPU cache ahead of use
/// ([`Operator::prefetch`]): enough to overlap many misses, few enough that
/// their lines are still cached when used.
pub const PREFETCH_AHEAD: usize = 32;

impl KeyState {
    fn new() -> KeyState {
        KeyState {
            windows: KeyWindows::default(),
            fired: i64::MIN,
            revisions: VecDeque::new(),
            timer: None,
            persisted_timer: None,
            persisted_fired: i64::MIN,
            revisions_changed: false,
            dirty: false,
            snapshot_id: 0,
            stored: false,
            separate: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.revisions.is_empty()
    }

    /// The earliest window end at which something must happen to the key.
    ///
    /// Without window results (`results` false) nothing needs to happen
    /// until the whole state expires, when its newest slice is purged:
    /// older slices are dropped on the way, by the key's next event or that
    /// visit. One visit per expiry instead of one per slice; a key that
    /// goes quiet is still purged on time.
    fn next_due(&self, geo: &Geometry, lateness: i64, results: bool) -> Option<i64> {
        let (fire, slice) = if results {
            let fire = self
                .windows
                .first_data_window_after(geo, self.fired)
                .map(|j| geo.end_of(j));
            (fire, self.windows.slices.front())
        } else {
            (None, self.windows.slices.back())
        };
        let slice = slice.map(|s| geo.purge_due_of_slice(s.idx, lateness));
        let rev = self
            .revisions
            .front()
            .map(|(j, _)| geo.purge_due_of_window(*j, lateness));
        [fire, slice, rev].into_iter().flatten().min()
    }

    /// Takes the next revision of window `j`.
    fn next_revision(&mut self, j: i64) -> u32 {
        self.revisions_changed = true;
        match self.revisions.binary_search_by_key(&j, |r| r.0) {
            Ok(p) => {
                let r = self.revisions[p].1;
                self.revisions[p].1 = rules::next_revision(r);
                r
            }
            Err(p) => {
                self.revisions.insert(p, (j, rules::next_revision(0)));
                0
            }
        }
    }

    /// Puts the key's `windows` record into `delta`: its slices inline, or
    /// the mark that they are in the slices column family (`separate`).
    fn put_record(&self, plan: &SpecPlan, key: &str, delta: &mut StateDelta) {
        let slide = plan.geo.slide;
        delta.put_with(
            Cf::Windows,
            |b| write_key_prefix(b, plan.id, key),
            |b| {
                encode_into(b, |w| {
                    let revisions = self.revisions.iter().copied();
                    WindowRecord::write_head(w, self.fired, self.timer, revisions);
                    if self.separate {
                        WindowRecord::write_separate(w);
                    } else {
                        let slices = self.windows.slices.iter().map(|s| {
                            let start = s.idx.saturating_mul(slide);
                            (start, |w: &mut Writer| s.acc.encode(w))
                        });
                        WindowRecord::write_inline(w, slices);
                    }
                })
            },
        );
    }

    /// The record just put holds what the state has now.
    fn record_put(&mut self) {
        self.persisted_timer = self.timer;
        self.persisted_fired = self.fired;
        self.revisions_changed = false;
        self.stored = true;
    }

    /// The state stored as `record`, reading its slices from the store when
    /// the record does not hold them.
    fn decode(
        plan: &SpecPlan,
        key: &str,
        record: &[u8],
        store: &StateStore,
    ) -> Result<KeyState, EngineError> {
        let corrupt = |e: crate::state::codec::CodecError| EngineError::Corrupt(e.to_string());
        let record = WindowRecord::decode(record).map_err(corrupt)?;
        let separate = record.inline.is_none();
        let stored_slices;
        let slices: Vec<(i64, &[u8])> = match record.inline {
            Some(inline) => inline,
            None => {
                stored_slices = store.load_slices(plan.id, key)?;
                stored_slices.iter().map(|(s, b)| (*s, &b[..])).collect()
            }
        };
        let mut restored = VecDeque::with_capacity(slices.len());
        for (start, bytes) in slices {
            let acc = Acc::decode(&plan.slots, &mut Reader::new(bytes)).map_err(corrupt)?;
            restored.push_back(Slice::restored(
                start.div_euclid(plan.geo.slide),
                acc,
                separate,
            ));
        }
        Ok(KeyState {
            windows: KeyWindows::from_slices(restored),
            fired: record.fired,
            revisions: record.revisions.into(),
            timer: record.timer,
            persisted_timer: record.timer,
            persisted_fired: record.fired,
            revisions_changed: false,
            dirty: false,
            snapshot_id: 0,
            stored: true,
            separate,
        })
    }
}

/// The stored state of `(spec, key)`, when the store may have one.
fn load_stored(
    store: &StateStore,
    store_may_have: bool,
    plan: &SpecPlan,
    key: &str,
) -> Result<Option<KeyState>, EngineError> {
    if !store_may_have {
        return Ok(None);
    }
    match store.load_key(plan.id, key)? {
        Some(record) => Ok(Some(KeyState::decode(plan, key, &record, store)?)),
        None => Ok(None),
    }
}

/// The cached state of `(spec, key)` in its slot, else the stored one (read
/// into the slot), else `missing()` if that gives one.
fn slot_state<'a>(
    slot: &'a mut Option<KeyState>,
    (store, store_may_have): (&StateStore, bool),
    plan: &SpecPlan,
    key: &str,
    stats: &mut EngineStats,
    missing: impl FnOnce() -> Option<KeyState>,
) -> Result<Option<&'a mut KeyState>, EngineError> {
    if slot.is_none() {
        *slot = match load_stored(store, store_may_have, plan, key)? {
            Some(st) => {
                stats.cache_loads += 1;
                Some(st)
            }
            None => missing(),
        };
    }
    Ok(slot.as_mut())
}

/// A key's states, one slot per window spec (indexed by spec id). `None`:
/// not in memory, because it never existed, was purged and dropped, or was
/// evicted (then the store has it). Held inline, so an event reaches the
/// states of all its specs with one probe and no further pointer chase.
type KeyStates = SmallVec<[Option<KeyState>; 2]>;

/// foldhash: per-process seeded and several times faster than SipHash on
/// short keys; this map is hit for every event and every firing. Keys up to
/// 23 bytes are stored inline ([`SmolStr`]), so comparing the probed entry's
/// key does not chase a pointer to another cache line.
type States = HashMap<SmolStr, KeyStates, foldhash::fast::RandomState>;

/// The slots of `key`, made (all empty) if it has none in memory.
fn key_states<'a>(states: &'a mut States, key: &str, specs: usize) -> &'a mut KeyStates {
    states
        .entry(SmolStr::new(key))
        .or_insert_with(|| (0..specs).map(|_| None).collect())
}

pub struct Operator {
    pub specs: Vec<SpecPlan>,
    lateness: i64,
    /// Whether window results are produced (some sink subscribes to them).
    /// Without them the per-event vectors, purging and the late side output
    /// are unchanged, and a key is visited once per purge instead of once
    /// per window with data.
    results: bool,
    states: States,
    timers: BTreeMap<(i64, u16), Vec<Arc<str>>>,
    dirty: Vec<(u16, Arc<str>)>,
    /// Deletes of purged slices since the last snapshot.
    pending: StateDelta,
    store: StateStore,
    /// RocksDB may hold state not in the cache (after a restore or an eviction).
    store_may_have: bool,
    committed: u64,
    capacity: usize,
    /// See [`EngineOptions::inline_record_max`](super::EngineOptions).
    inline_max: usize,
    scratch: Vec<Acc>,
    /// Windows the current event updated after they were fired (step 5).
    refire: Vec<(u16, Arc<str>, i64, i64)>,
    pub stats: EngineStats,
}

fn touch(dirty: &mut Vec<(u16, Arc<str>)>, spec: u16, key: &Arc<str>, st: &mut KeyState) {
    if !st.dirty {
        st.dirty = true;
        dirty.push((spec, key.clone()));
    }
}

/// Drops the slices of `key` that are purged at watermark `w`, queueing the
/// deletes of those already stored.
fn purge_slices(
    pending: &mut StateDelta,
    plan: &SpecPlan,
    key: &str,
    st: &mut KeyState,
    w: i64,
    lateness: i64,
) {
    let geo = plan.geo;
    st.windows.purge(&geo, w, lateness, |idx| {
        pending.delete_with(Cf::Slices, |b| {
            write_slice_key(b, plan.id, key, idx.saturating_mul(geo.slide))
        });
    });
}

/// Makes sure the key is visited by its next due time. A pending visit
/// that comes earlier is kept (the visit reschedules): a busy key moves its
/// due time on with every event, and an entry per move would cost a timer
/// entry, and later a visit to skip it, per event.
fn reschedule(
    timers: &mut BTreeMap<(i64, u16), Vec<Arc<str>>>,
    plan: &SpecPlan,
    (lateness, results): (i64, bool),
    key: &Arc<str>,
    st: &mut KeyState,
) {
    let due = st.next_due(&plan.geo, lateness, results);
    match (st.timer, due) {
        (Some(pending), Some(d)) if pending <= d => {}
        (_, due) => {
            st.timer = due;
            if let Some(d) = due {
                timers.entry((d, plan.id)).or_default().push(key.clone());
            }
        }
    }
}

/// Emits every feature of window `j` if it holds events: revision 0 on the
/// first firing, the next revision when `refire`.
#[allow(clippy::too_many_arguments)]
fn emit(
    plan: &SpecPlan,
    key: &Arc<str>,
    st: &mut KeyState,
    scratch: &mut Acc,
    j: i64,
    refire: bool,
    stats: &mut EngineStats,
    out: &mut Vec<Output>,
) {
    let geo = plan.geo;
    if !st.windows.window(&geo, &plan.slots, j, scratch) {
        return;
    }
    let revision = if refire { st.next_revision(j) } else { 0 };
    let (start, end) = (geo.start_of(j), geo.end_of(j));
    st.windows.values_of_merged(
        &geo,
        &plan.slots,
        j,
        scratch,
        |slot, value: Option<Value>| {
            stats.window_results += 1;
            out.push(Output::Window(WindowResult {
                key: key.clone(),
                feature: slot.name.clone(),
                window_start: start,
                window_end: end,
                value,
                revision,
            }));
        },
    );
}

/// Encodes the changes of one dirty `(spec, key)` state into `delta`.
fn snapshot_key(
    plan: &SpecPlan,
    (key, st): (&str, &mut KeyState),
    (id, inline_max): (u64, usize),
    delta: &mut StateDelta,
) {
    let spec = plan.id;
    st.dirty = false;
    st.snapshot_id = id;
    if st.is_empty() {
        // Separate slices were deleted as they were purged.
        if st.stored {
            delta.delete_with(Cf::Windows, |b| write_key_prefix(b, spec, key));
            st.stored = false;
        }
        st.separate = false;
        return;
    }
    // The record must say where the slices are when that changes.
    let mut switched = false;
    if !st.separate {
        st.put_record(plan, key, delta);
        if delta.last_value_len() <= inline_max {
            for slice in st.windows.slices.iter_mut() {
                slice.dirty = false;
            }
            st.record_put();
            return;
        }
        // Too large to rewrite at every checkpoint: from now on each slice
        // is stored on its own, starting with all of them.
        delta.pop();
        st.separate = true;
        switched = true;
        for slice in st.windows.slices.iter_mut() {
            slice.dirty = true;
        }
    }
    // Most keys change only a slice between checkpoints; rewriting their
    // record too would double the batch.
    let record_changed = switched
        || !st.stored
        || st.fired != st.persisted_fired
        || st.timer != st.persisted_timer
        || st.revisions_changed;
    for slice in st.windows.slices.iter_mut().filter(|s| s.dirty) {
        let start = slice.idx.saturating_mul(plan.geo.slide);
        delta.put_with(
            Cf::Slices,
            |b| write_slice_key(b, spec, key, start),
            |b| encode_into(b, |w| slice.acc.encode(w)),
        );
        slice.dirty = false;
        slice.stored = true;
    }
    if record_changed {
        st.put_record(plan, key, delta);
    }
    st.record_put();
}

/// Runs a [`Writer`] over the end of `buf`.
fn encode_into(buf: &mut Vec<u8>, encode: impl FnOnce(&mut Writer)) {
    let mut w = Writer {
        buf: std::mem::take(buf),
    };
    encode(&mut w);
    *buf = w.buf;
}

impl Operator {
    pub fn new(
        specs: Vec<SpecPlan>,
        lateness: i64,
        results: bool,
        store: StateStore,
        (capacity, inline_max): (usize, usize),
    ) -> Result<Operator, EngineError> {
        let mut timers: BTreeMap<(i64, u16), Vec<Arc<str>>> = BTreeMap::new();
        for (due, spec, key) in store.load_timers()? {
            if usize::from(spec) >= specs.len() {
                return Err(EngineError::Corrupt(format!(
                    "timer for unknown window spec {spec}"
                )));
            }
            timers.entry((due, spec)).or_default().push(Arc::from(key));
        }
        let store_may_have = store.has_key_state()?;
        Ok(Operator {
            states: States::default(),
            scratch: specs.iter().map(|s| Acc::empty(&s.slots)).collect(),
            specs,
            lateness,
            results,
            timers,
            dirty: Vec::new(),
            pending: StateDelta::empty(),
            store,
            store_may_have,
            committed: 0,
            capacity: capacity.max(1),
            inline_max,
            refire: Vec::new(),
            stats: EngineStats::default(),
        })
    }

    /// Steps 2 and 3 for an event that is not late: adds it to its slice in
    /// every spec where one of its windows is live, and writes the feature
    /// values of the earliest-ending live window into `values`.
    pub fn add_event(
        &mut self,
        event: &Event,
        seq: u64,
        w_before: i64,
        values: &mut [Option<Value>],
    ) -> Result<(), EngineError> {
        let t = event.event_time;
        let Operator {
            specs,
            states,
            timers,
            dirty,
            scratch,
            refire,
            stats,
            lateness,
            results,
            pending,
            store,
            store_may_have,
            ..
        } = self;
        // One hash lookup per event for all specs: the map is the engine's
        // largest structure and its probe is usually a cache miss.
        let slots = key_states(states, &event.key, specs.len());
        for (si, plan) in specs.iter().enumerate() {
            let geo = plan.geo;
            if geo.is_late(t, w_before, *lateness) {
                continue;
            }
            let Some(st) = slot_state(
                &mut slots[si],
                (store, *store_may_have),
                plan,
                &event.key,
                stats,
                || Some(KeyState::new()),
            )?
            else {
                continue; // never: a missing state is created
            };
            let live = geo.first_live_window(w_before, *lateness);
            // Windows before `live` are purged, so all were handled when the
            // watermark passed them (firing never comes after purging, see
            // `rules`).
            st.fired = st.fired.max(live.saturating_sub(1));
            // Without window results the key's timer waits for its whole
            // state to expire; older slices go here. (With them, every
            // purge was due at a timer already visited: nothing to do.)
            purge_slices(pending, plan, &event.key, st, w_before, *lateness);
            let s = geo.slice_of(t);
            let outcome = st.windows.add(&geo, &plan.slots, s, event, seq);
            if outcome.distinct_overflowed {
                stats.distinct_overflows += 1;
                if stats.distinct_overflows.is_power_of_two() {
                    tracing::warn!(
                        key = &*event.key,
                        overflows = stats.distinct_overflows,
                        "a distinct_count slice exceeded max_distinct; windows containing it report null"
                    );
                }
            }
            touch(dirty, plan.id, &event.key, st);
            let j = s.max(live);
            st.windows
                .values(&geo, &plan.slots, j, &mut scratch[si], |slot, v| {
                    if let Some(dst) = values.get_mut(slot.index) {
                        *dst = v;
                    }
                });
            let again = rules::refired(s..=geo.last_window_of_slice(s), live, st.fired);
            if *results && !again.is_empty() {
                refire.push((plan.id, event.key.clone(), *again.start(), *again.end()));
            }
            reschedule(timers, plan, (*lateness, *results), &event.key, st);
        }
        Ok(())
    }

    /// Starts loading the states of `keys` (the next few events' keys)
    /// into the CPU cache. Each lookup is independent of the others, so
    /// their cache misses overlap instead of stalling the events one by one.
    pub fn prefetch<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if let Some(slots) = self.states.get(key) {
                for st in slots.iter().flatten() {
                    st.windows.prefetch();
                }
            }
        }
    }

    /// Step 5, first half: re-fires the fired windows the last event updated.
    pub fn refire(&mut self, out: &mut Vec<Output>) {
        let Operator {
            specs,
            states,
            timers,
            dirty,
            scratch,
            refire,
            stats,
            lateness,
            results,
            ..
        } = self;
        for (spec, key, lo, hi) in refire.drain(..) {
            let si = usize::from(spec);
            let plan = &specs[si];
            let Some(st) = states.get_mut(&*key).and_then(|s| s[si].as_mut()) else {
                continue;
            };
            for j in lo..=hi {
                emit(plan, &key, st, &mut scratch[si], j, true, stats, out);
            }
            touch(dirty, spec, &key, st);
            reschedule(timers, plan, (*lateness, *results), &key, st);
        }
    }

    /// Step 5, second half: visits the keys whose timer is due at `w`, at
    /// most `max_keys` of them. Returns true when due keys remain (the
    /// caller hands `out` on and calls again), so that a burst (the end of
    /// input, a watermark jump after idleness) becomes bounded chunks.
    pub fn fire(
        &mut self,
        w: i64,
        max_keys: usize,
        out: &mut Vec<Output>,
    ) -> Result<bool, EngineError> {
        let mut budget = max_keys.max(1);
        while let Some(entry) = self.timers.first_entry() {
            let (due, spec) = *entry.key();
            if !rules::due(due, w) {
                break;
            }
            if budget == 0 {
                return Ok(true);
            }
            let mut keys = entry.remove();
            let rest = (keys.len() > budget).then(|| keys.split_off(budget));
            budget -= keys.len();
            for chunk in keys.chunks(PREFETCH_AHEAD) {
                self.prefetch(chunk.iter().map(|k| &**k));
                for key in chunk {
                    self.visit(usize::from(spec), key, due, w, out)?;
                }
            }
            if let Some(mut rest) = rest {
                // Visits reschedule later than `due`, but keep whatever
                // landed here behind the keys still waiting.
                let slot = self.timers.entry((due, spec)).or_default();
                rest.append(slot);
                *slot = rest;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn visit(
        &mut self,
        si: usize,
        key: &Arc<str>,
        due: i64,
        w: i64,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        let Operator {
            specs,
            states,
            timers,
            dirty,
            scratch,
            stats,
            lateness,
            results,
            pending,
            store,
            store_may_have,
            ..
        } = self;
        let plan = &specs[si];
        let geo = plan.geo;
        // One hash lookup: every firing visits a key, usually a cache miss.
        let slots = if *store_may_have {
            key_states(states, key, specs.len())
        } else {
            match states.get_mut(&**key) {
                Some(slots) => slots,
                None => return Ok(()), // a stale entry of a dropped state
            }
        };
        let Some(st) = slot_state(
            &mut slots[si],
            (store, *store_may_have),
            plan,
            key,
            stats,
            || None,
        )?
        else {
            return Ok(());
        };
        if st.timer != Some(due) {
            return Ok(()); // a stale entry: the key's timer moved
        }
        st.timer = None; // this visit is spent
        stats.timer_visits += 1;
        let last_due = geo.last_due_window(w);
        if *results {
            while let Some(j) = st
                .windows
                .first_data_window_after(&geo, st.fired)
                .filter(|&j| j <= last_due)
            {
                emit(plan, key, st, &mut scratch[si], j, false, stats, out);
                if !rules::purged(geo.end_of(j), *lateness, w) {
                    st.revisions.push_back((j, rules::next_revision(0)));
                    st.revisions_changed = true;
                }
                st.fired = j;
            }
        }
        st.fired = st.fired.max(last_due);
        purge_slices(pending, plan, key, st, w, *lateness);
        while let Some((j, _)) = st.revisions.front() {
            if !rules::purged(geo.end_of(*j), *lateness, w) {
                break;
            }
            st.revisions.pop_front();
            st.revisions_changed = true;
        }
        touch(dirty, plan.id, key, st);
        reschedule(timers, plan, (*lateness, *results), key, st);
        Ok(())
    }

    /// Window results were off when the restored state was written and are
    /// on now. Timers then only waited for purges: every stored key gets
    /// the timer of its next window with data. Windows that came due while
    /// results were off count as handled; results start with the windows
    /// that come due from now on.
    pub fn start_window_results(&mut self, w: i64) -> Result<(), EngineError> {
        let keys: Vec<(u16, Arc<str>)> = self
            .timers
            .iter()
            .flat_map(|(&(_, spec), keys)| keys.iter().map(move |k| (spec, k.clone())))
            .collect();
        for (spec, key) in keys {
            let si = usize::from(spec);
            let plan = &self.specs[si];
            let slots = key_states(&mut self.states, &key, self.specs.len());
            let Some(st) = slot_state(
                &mut slots[si],
                (&self.store, self.store_may_have),
                plan,
                &key,
                &mut self.stats,
                || None,
            )?
            else {
                continue;
            };
            st.fired = st.fired.max(plan.geo.last_due_window(w));
            touch(&mut self.dirty, spec, &key, st);
            reschedule(
                &mut self.timers,
                plan,
                (self.lateness, self.results),
                &key,
                st,
            );
        }
        Ok(())
    }

    /// Encodes every change since the previous snapshot.
    pub fn snapshot(&mut self, id: u64) -> StateDelta {
        // Drained, not taken: the list regrows to the same length by the
        // next checkpoint, and growing it again would copy it each time.
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut delta = std::mem::take(&mut self.pending);
        // About one slice per dirty key, with its key and value.
        delta.reserve(dirty.len(), 64);
        // When the dirty (spec, key) states are at least half as many as
        // the keys in memory (the usual case between two checkpoints of a
        // busy stream), one pass over the map in memory order beats a hash
        // lookup, usually a cache miss, per dirty state.
        if dirty.len().saturating_mul(2) >= self.states.len() {
            for (key, slots) in &mut self.states {
                for (plan, slot) in self.specs.iter().zip(slots.iter_mut()) {
                    if let Some(st) = slot.as_mut().filter(|st| st.dirty) {
                        snapshot_key(plan, (key, st), (id, self.inline_max), &mut delta);
                    }
                }
            }
        } else {
            for (spec, key) in dirty.drain(..) {
                let si = usize::from(spec);
                let slot = self.states.get_mut(&*key).and_then(|s| s[si].as_mut());
                if let Some(st) = slot.filter(|st| st.dirty) {
                    snapshot_key(
                        &self.specs[si],
                        (&key, st),
                        (id, self.inline_max),
                        &mut delta,
                    );
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
        delta
    }

    /// Checkpoint `id` is durable: drop purged states and, above capacity,
    /// clean ones.
    pub fn committed(&mut self, id: u64) {
        self.committed = self.committed.max(id);
        let committed = self.committed;
        let clean = |st: &KeyState| !st.dirty && st.snapshot_id <= committed;
        let mut len = 0;
        self.states.retain(|_, slots| {
            for slot in slots.iter_mut() {
                if slot.as_ref().is_some_and(|st| st.is_empty() && clean(st)) {
                    *slot = None;
                }
            }
            let held = slots.iter().flatten().count();
            len += held;
            held > 0
        });
        if len <= self.capacity {
            return;
        }
        let before = len;
        self.states.retain(|_, slots| {
            for slot in slots.iter_mut() {
                if len > self.capacity && slot.as_ref().is_some_and(clean) {
                    *slot = None;
                    len -= 1;
                }
            }
            slots.iter().any(Option::is_some)
        });
        if len < before {
            // Evicted states now live only in RocksDB: misses must read it.
            self.stats.cache_evictions += (before - len) as u64;
            self.store_may_have = true;
        }
    }

    /// Whether window results are produced.
    pub fn window_results(&self) -> bool {
        self.results
    }

    /// Number of (spec, key) states in memory.
    pub fn cached_states(&self) -> usize {
        self.states
            .values()
            .map(|s| s.iter().flatten().count())
            .sum()
    }

    /// Number of timer entries in memory (including stale ones).
    pub fn timer_entries(&self) -> usize {
        self.timers.values().map(Vec::len).sum()
    }
}
