//! Timers and firing. This module owns the in-memory timer index, the
//! visits at due timers (fire, then purge), re-firing after an event, the
//! chunking of a firing burst, and switching window results on. When a
//! timer is due and what a visit fires or purges is decided by [`rules`].
//!
//! Each (spec, key) has one timer: the earliest window end at which
//! something happens to it (its next window with data becomes due, or its
//! oldest slice or revision is purged), or an earlier one, because a timer
//! moving later keeps its earlier visit, which reschedules it. Timers live
//! in a `BTreeMap` ordered by that end, so firing is a range scan from the
//! smallest end. A key whose timer moves earlier leaves a stale entry
//! behind, which is skipped when reached (lazy deletion). Each key's timer
//! is persisted in its `windows` record, and a restore rebuilds the index
//! from those records ([`restore`]).
//!
//! Without window results (no sink takes them), a key's timer is when its
//! whole state expires. The per-event vectors never depended on firing, and
//! the slices that expire before that are dropped by the key's next event
//! or by that visit. So a busy key is visited once per expiry horizon
//! rather than once per slice.
//!
//! The invariants:
//!
//! * **No missed visit.** A key's `timer` is never later than its next due
//!   time, and a key with `timer = Some(at)` has an entry at `(at, spec)` in
//!   the index, whether its state is in memory or was evicted. A visit acts
//!   only when the entry matches the key's `timer`, and it then spends it.
//! * **Fire before purge.** A visit fires the due windows with data before
//!   it purges, so with `allowed_lateness = 0` a window still fires at the
//!   watermark that purges it.
//! * **Re-fires first.** The fired windows an event updated are emitted
//!   ([`Operator::refire`]) before anything that the event's watermark
//!   advance makes due ([`Operator::fire`]); the engine calls them in that
//!   order.
//! * **Bounded bursts.** [`Operator::fire`] visits at most `max_keys` keys a
//!   call. The due keys it leaves stay at the front of their entry, ahead of
//!   any keys that visits rescheduled to the same instant.

use std::collections::{BTreeMap, VecDeque};

use crate::record::{Key, Output, Value, WindowResult};
use crate::state::codec::write_slice_key;
use crate::state::{Cf, StateDelta, StateStore};

use super::aggregate::Acc;
use super::cache::{key_states, slot_state, touch, PREFETCH_AHEAD};
use super::operator::{
    EngineStats, KeyEntry, KeyRef, KeyState, Lookup, Operator, SpecPlan, Timers,
};
use super::rules;
use super::watermark::GLOBAL;
use super::window::Geometry;
use super::EngineError;

/// The index of the timers stored in `store`'s records, for `specs` specs.
pub(super) fn restore(store: &StateStore, specs: usize) -> Result<Timers, EngineError> {
    let mut timers: Timers = BTreeMap::new();
    for (due, spec, key) in store.load_timers()? {
        if usize::from(spec) >= specs {
            return Err(EngineError::Corrupt(format!(
                "timer for unknown window spec {spec}"
            )));
        }
        // Domains are assigned once the shards' ranges are known.
        timers
            .entry((GLOBAL, due, spec))
            .or_default()
            .push_back(Key::from(key));
    }
    Ok(timers)
}

impl KeyState {
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
        // Called after every event and visit: three options compared in
        // place, not through an iterator over them.
        let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, None) => a,
            (None, b) => b,
        };
        min(min(fire, slice), rev)
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
}

/// Drops the slices of `key` that are purged at watermark `w`, queueing the
/// deletes of those already stored.
pub(super) fn purge_slices(
    pending: &mut StateDelta,
    plan: &SpecPlan,
    (hash, key): KeyRef<'_>,
    st: &mut KeyState,
    w: i64,
    lateness: i64,
) {
    let geo = plan.geo;
    st.windows.purge(&geo, w, lateness, |idx| {
        pending.delete_with(Cf::Slices, |b| {
            write_slice_key(b, hash, plan.id, key, idx.saturating_mul(geo.slide))
        });
    });
}

/// Makes sure the key is visited by its next due time. A pending visit
/// that comes earlier is kept (the visit reschedules): a busy key moves its
/// due time on with every event, and an entry per move would cost a timer
/// entry, and later a visit to skip it, per event.
pub(super) fn reschedule(
    timers: &mut Timers,
    domain: u32,
    plan: &SpecPlan,
    (lateness, results): (i64, bool),
    key: &Key,
    st: &mut KeyState,
) {
    let due = st.next_due(&plan.geo, lateness, results);
    match (st.timer, due) {
        (Some(pending), Some(d)) if pending <= d => {}
        (_, due) => {
            st.timer = due;
            if let Some(d) = due {
                timers
                    .entry((domain, d, plan.id))
                    .or_default()
                    .push_back(key.clone());
            }
        }
    }
}

/// Emits every feature of window `j` if it holds events: revision 0 on the
/// first firing, the next revision when `refire`.
#[allow(clippy::too_many_arguments)]
fn emit(
    plan: &SpecPlan,
    key: &Key,
    st: &mut KeyState,
    scratch: &mut Acc,
    j: i64,
    refire: bool,
    stats: &mut EngineStats,
    out: &mut Vec<Output>,
) {
    let geo = plan.geo;
    let Some(at) = st.windows.merge(&geo, &plan.slots, j, scratch) else {
        return;
    };
    let revision = if refire { st.next_revision(j) } else { 0 };
    let (start, end) = (geo.start_of(j), geo.end_of(j));
    st.windows.values_of_merged(
        &geo,
        &plan.slots,
        j,
        st.windows.merged(at, scratch),
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

impl Operator {
    /// Step 5, first half: re-fires the fired windows the last event updated.
    pub(super) fn refire(&mut self, out: &mut Vec<Output>) {
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
            domains,
            ..
        } = self;
        for (spec, key, lo, hi) in refire.drain(..) {
            let si = usize::from(spec);
            let plan = &specs[si];
            let Some(entry) = states.get_mut(&*key) else {
                continue;
            };
            let domain = domains.of(&entry.hash);
            let Some(st) = entry.slots[si].as_mut() else {
                continue;
            };
            for j in lo..=hi {
                emit(plan, &key, st, &mut scratch[si], j, true, stats, out);
            }
            touch(dirty, spec, &key, st);
            reschedule(timers, domain, plan, (*lateness, *results), &key, st);
        }
    }

    /// Step 5, second half: visits the keys whose timer is due at `w`, at
    /// most `max_keys` of them. Returns true when due keys remain (the
    /// caller hands `out` on and calls again), so that a burst (the end of
    /// input, a watermark jump after idleness) becomes bounded chunks.
    pub(super) fn fire(
        &mut self,
        domain: u32,
        w: i64,
        budget: &mut usize,
        out: &mut Vec<Output>,
    ) -> Result<bool, EngineError> {
        while let Some((d, due, spec)) = self.first_timer(domain) {
            if !rules::due(due, w) {
                break;
            }
            if *budget == 0 {
                return Ok(true);
            }
            let mut chunk = std::mem::take(&mut self.visiting);
            chunk.clear();
            let more = match self.timers.get_mut(&(d, due, spec)) {
                Some(keys) => {
                    let n = keys.len().min(*budget);
                    chunk.extend(keys.drain(..n));
                    if keys.is_empty() {
                        self.timers.remove(&(d, due, spec));
                        false
                    } else {
                        true
                    }
                }
                None => false,
            };
            *budget -= chunk.len();
            let before = out.len();
            if self.results {
                // A visit usually fires one window, a result per feature,
                // but a sliding window's last visits fire all its windows
                // at once: room for what the last chunk's visits gave,
                // reserved at once rather than doubled (and copied) a few
                // times over.
                let slots = self.specs[usize::from(spec)].slots.len();
                out.reserve(chunk.len() * self.results_per_visit.max(slots));
            }
            for keys in chunk.chunks(PREFETCH_AHEAD) {
                self.prefetch(keys.iter().map(|k| &**k));
                for key in keys {
                    self.visit(usize::from(spec), key, due, w, out)?;
                }
            }
            self.results_per_visit = (out.len() - before).div_ceil(chunk.len().max(1));
            self.visiting = chunk;
            if more {
                // Visits reschedule later than `due`; whatever landed here
                // meanwhile queued behind the keys still waiting.
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The earliest timer entry of `domain`. Called after every event, and
    /// usually nothing is due: when `domain` is the smallest one present
    /// (always, outside per-shard mode) the map's first entry answers
    /// without a search.
    pub(super) fn first_timer(&self, domain: u32) -> Option<(u32, i64, u16)> {
        let (&first, _) = self.timers.first_key_value()?;
        match first.0.cmp(&domain) {
            std::cmp::Ordering::Equal => Some(first),
            std::cmp::Ordering::Greater => None,
            std::cmp::Ordering::Less => self
                .timers
                .range((domain, i64::MIN, 0)..)
                .next()
                .map(|(&k, _)| k)
                .filter(|k| k.0 == domain),
        }
    }

    fn visit(
        &mut self,
        si: usize,
        key: &Key,
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
            domains,
            ..
        } = self;
        let plan = &specs[si];
        let geo = plan.geo;
        // One hash lookup: every firing visits a key, usually a cache miss.
        let KeyEntry { hash, slots, .. } = if *store_may_have {
            key_states(states, key, specs.len())
        } else {
            match states.get_mut(&Lookup(key)) {
                Some(entry) => entry,
                None => return Ok(()), // a stale entry of a dropped state
            }
        };
        let Some(st) = slot_state(
            &mut slots[si],
            (store, *store_may_have),
            plan,
            (hash, key),
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
        purge_slices(pending, plan, (hash, key), st, w, *lateness);
        while let Some((j, _)) = st.revisions.front() {
            if !rules::purged(geo.end_of(*j), *lateness, w) {
                break;
            }
            st.revisions.pop_front();
            st.revisions_changed = true;
        }
        touch(dirty, plan.id, key, st);
        reschedule(
            timers,
            domains.of(hash),
            plan,
            (*lateness, *results),
            key,
            st,
        );
        // Emptied: the room its slices took goes back to the allocator now,
        // for the next key's slices, rather than waiting in the key's state
        // for its next window (most keys are sparse) or the next commit, while
        // new keys take fresh pages.
        if st.windows.slices.is_empty() {
            st.windows.release();
        }
        Ok(())
    }

    /// Window results were off when the restored state was written and are
    /// on now. Timers then only waited for purges: every stored key gets
    /// the timer of its next window with data. Windows that came due while
    /// results were off count as handled; results start with the windows
    /// that come due from now on.
    pub(super) fn start_window_results(&mut self, w: i64) -> Result<(), EngineError> {
        let keys: Vec<(u16, Key)> = self
            .timers
            .iter()
            .flat_map(|(&(_, _, spec), keys)| keys.iter().map(move |k| (spec, k.clone())))
            .collect();
        for (spec, key) in keys {
            let si = usize::from(spec);
            let plan = &self.specs[si];
            let KeyEntry { hash, slots, .. } = key_states(&mut self.states, &key, self.specs.len());
            let Some(st) = slot_state(
                &mut slots[si],
                (&self.store, self.store_may_have),
                plan,
                (hash, &key),
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
                self.domains.of(hash),
                plan,
                (self.lateness, self.results),
                &key,
                st,
            );
        }
        Ok(())
    }

    /// Number of timer entries in memory (including stale ones).
    pub(super) fn timer_entries(&self) -> usize {
        self.timers.values().map(VecDeque::len).sum()
    }
}
