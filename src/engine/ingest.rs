//! Building the [`Operator`] (its timer index restored from the store) and
//! its per-event path: an event into the slices of every spec where one of
//! its windows is live, and its feature vector.

use crate::record::{Event, Value};
use crate::state::{StateDelta, StateStore};

use super::aggregate::Acc;
use super::cache::{key_states, slot_state, touch};
use super::operator::{EngineStats, KeyEntry, KeyState, Operator, SpecPlan, States};
use super::rules;
use super::timers::{purge_slices, reschedule};
use super::EngineError;

impl Operator {
    pub(super) fn new(
        specs: Vec<SpecPlan>,
        lateness: i64,
        results: bool,
        store: StateStore,
        (capacity, inline_max): (usize, usize),
    ) -> Result<Operator, EngineError> {
        let timers = super::timers::restore(&store, specs.len())?;
        let store_may_have = store.has_key_state()?;
        Ok(Operator {
            states: States::default(),
            scratch: specs.iter().map(|s| Acc::empty(&s.slots)).collect(),
            specs,
            lateness,
            results,
            timers,
            domains: Default::default(),
            dirty: Vec::new(),
            pending: StateDelta::empty(),
            store,
            store_may_have,
            committed: 0,
            capacity: capacity.max(1),
            inline_max,
            refire: Vec::new(),
            visiting: Vec::new(),
            results_per_visit: 0,
            stats: EngineStats::default(),
        })
    }

    /// Steps 2 and 3 for an event that is not late: adds it to its slice in
    /// every spec where one of its windows is live, and writes the feature
    /// values of the earliest-ending live window into `values` (none when
    /// it is empty: no vector is wanted).
    pub(super) fn add_event(
        &mut self,
        event: &Event,
        seq: u64,
        (w_before, domain): (i64, u32),
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
        // largest structure and its probe is usually a cache miss. The MD5
        // hash of stored keys comes with the entry (made once per key).
        let KeyEntry {
            hash,
            slots,
            newest,
        } = key_states(states, &event.key, specs.len());
        *newest = (*newest).max(t);
        for (si, plan) in specs.iter().enumerate() {
            let geo = plan.geo;
            if geo.is_late(t, w_before, *lateness) {
                continue;
            }
            let Some(st) = slot_state(
                &mut slots[si],
                (store, *store_may_have),
                plan,
                (hash, &event.key),
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
            purge_slices(pending, plan, (hash, &event.key), st, w_before, *lateness);
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
            if !values.is_empty() {
                st.windows
                    .values(&geo, &plan.slots, j, &mut scratch[si], |slot, v| {
                        if let Some(dst) = values.get_mut(slot.index) {
                            *dst = v;
                        }
                    });
            }
            let again = rules::refired(s..=geo.last_window_of_slice(s), live, st.fired);
            if *results && !again.is_empty() {
                refire.push((plan.id, event.key.clone(), *again.start(), *again.end()));
            }
            reschedule(timers, domain, plan, (*lateness, *results), &event.key, st);
        }
        Ok(())
    }
}
