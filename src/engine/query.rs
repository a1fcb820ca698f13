//! Reads of live state, for the online API (`crate::online`): a key's
//! feature vector as of an event time ([`Engine::read`]), and the vector an
//! event would get if it arrived now ([`Engine::evaluate`]), both computed
//! by the per-event path's own functions and neither changing state.
//!
//! **The same code path.** A vector is, per window spec, the value of the
//! earliest-ending live window containing the time: window
//! `max(slice_of(t), first_live_window(w))`, merged by
//! [`KeyWindows::values`], as [`Operator::add_event`] does. An evaluation
//! adds the event with [`KeyWindows::add`] first, with the arrival number
//! the next event would get, and classifies it against the watermark as the
//! per-event path would (late in every spec: the answer says so and has no
//! vector). So the evaluation of an event equals, to the bit, the vector
//! the event gets if it is processed next (`tests/engine_props.rs` checks
//! it for every aggregate).
//!
//! **Nothing changes.** What a read touches and why that changes nothing
//! the engine writes, evicts or outputs:
//!
//! * a key not in memory is read from the store into a value of its own
//!   and dropped ([`load_stored`]): no cache entry, nothing dirty, no
//!   eviction, no `store_may_have` change;
//! * a key in memory is read in place, which may build the block caches of
//!   its slices ([`KeyWindows::values`] takes `&mut`). Those caches are
//!   derived from the slices alone, are rebuilt whenever a slice changes,
//!   and are never stored, so a later event or firing reads the same
//!   values, and a checkpoint writes the same bytes;
//! * an evaluation adds its event to a copy of the window's slices
//!   ([`KeyWindows::window_copy`]) or to the value read from the store,
//!   never to the key's state;
//! * no timer, refire entry, purge, arrival number, watermark or counter
//!   is touched, and the per-spec scratch accumulators are cleared before
//!   every use.
//!
//! A read never settles a pending firing burst (that would fire and purge):
//! the pipeline only reads between events, when none is pending, and a
//! pending one would not change the values anyway, since only windows
//! before the first live one are purged.

use crate::record::{Event, FeatureNames, FeatureVector, Value};
use crate::state::hash_key;
use crate::time::Millis;

use super::cache::load_stored;
use super::operator::{KeyState, Operator};
use super::window::KeyWindows;
use super::{Engine, EngineError};

/// How a feature of a read stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureStatus {
    /// A value.
    Present,
    /// The key has live state for the feature's window spec, but the window
    /// at the time asked holds no value for it (no event in that window,
    /// none with the field, a distinct count past its bound, or the window
    /// already purged).
    Null,
    /// The key has no live state for the feature's window spec: a key never
    /// seen, or one whose windows were all purged.
    NotFound,
}

/// A key's features as of a time.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub features: FeatureVector,
    /// One per feature, in vector order.
    pub statuses: Vec<FeatureStatus>,
    /// The newest event time added to the key's state, when known: from
    /// the key's first event since its state was last read from the store
    /// (a restart, an eviction), until then `None`.
    pub last_event_time: Option<Millis>,
}

/// What [`Engine::evaluate`] answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluation {
    /// The vector the event would get, including itself.
    Features(Reading),
    /// Every window of the event is purged: processed now, it would go to
    /// the late output, without a vector.
    Late,
}

impl Reading {
    fn new(names: FeatureNames, values: Vec<Option<Value>>, found: &[bool]) -> Reading {
        let statuses = values
            .iter()
            .zip(found)
            .map(|(v, found)| match (v, found) {
                (Some(_), _) => FeatureStatus::Present,
                (None, true) => FeatureStatus::Null,
                (None, false) => FeatureStatus::NotFound,
            })
            .collect();
        Reading {
            features: FeatureVector { names, values },
            statuses,
            last_event_time: None,
        }
    }
}

impl Operator {
    /// The values of `key` at event time `at`, watermark `w`, into `values`;
    /// `found[i]`: the key has live state for feature `i`'s spec.
    fn read(
        &mut self,
        key: &str,
        at: Millis,
        w: Millis,
        values: &mut [Option<Value>],
        found: &mut [bool],
    ) -> Result<(), EngineError> {
        let Operator {
            specs,
            states,
            store,
            store_may_have,
            scratch,
            lateness,
            ..
        } = self;
        let mut entry = states.get_mut(key);
        let hash = entry.as_ref().map_or_else(|| hash_key(key), |e| e.hash);
        for (si, plan) in specs.iter().enumerate() {
            let mut stored;
            let st: &mut KeyState = match entry.as_mut().and_then(|e| e.slots[si].as_mut()) {
                Some(st) => st,
                None => match load_stored(store, *store_may_have, plan, (&hash, key))? {
                    Some(st) => {
                        stored = st;
                        &mut stored
                    }
                    None => continue,
                },
            };
            if st.windows.is_empty() {
                continue;
            }
            for slot in &plan.slots {
                found[slot.index] = true;
            }
            let geo = plan.geo;
            if geo.is_late(at, w, *lateness) {
                continue;
            }
            let j = geo.slice_of(at).max(geo.first_live_window(w, *lateness));
            st.windows
                .values(&geo, &plan.slots, j, &mut scratch[si], |slot, v| {
                    values[slot.index] = v;
                });
        }
        Ok(())
    }

    /// The values `event` would get at watermark `w` with arrival number
    /// `seq`, into `values`.
    fn evaluate(
        &mut self,
        event: &Event,
        seq: u64,
        w: Millis,
        values: &mut [Option<Value>],
    ) -> Result<(), EngineError> {
        let Operator {
            specs,
            states,
            store,
            store_may_have,
            scratch,
            lateness,
            ..
        } = self;
        let t = event.event_time;
        let key = &*event.key;
        let entry = states.get(key);
        let hash = entry.map_or_else(|| hash_key(key), |e| e.hash);
        for (si, plan) in specs.iter().enumerate() {
            let geo = plan.geo;
            if geo.is_late(t, w, *lateness) {
                continue;
            }
            let s = geo.slice_of(t);
            let j = s.max(geo.first_live_window(w, *lateness));
            let mut windows = match entry.and_then(|e| e.slots[si].as_ref()) {
                Some(st) => st.windows.window_copy(&geo, j),
                None => match load_stored(store, *store_may_have, plan, (&hash, key))? {
                    Some(st) => st.windows,
                    None => KeyWindows::default(),
                },
            };
            windows.add(&geo, &plan.slots, s, event, seq);
            windows.values(&geo, &plan.slots, j, &mut scratch[si], |slot, v| {
                values[slot.index] = v;
            });
        }
        Ok(())
    }
}

impl Engine {
    /// The newest event time the engine has processed (after a restore:
    /// the newest its checkpoint's partitions had seen), `None` before any.
    pub fn newest_event_time(&self) -> Option<Millis> {
        (self.newest != Millis::MIN).then_some(self.newest)
    }

    /// `key`'s feature vector as of event time `at`, from live state, as the
    /// per-event path computes it for an event at `at` (without adding
    /// one): see the module docs. Changes no state.
    pub fn read(&mut self, key: &str, at: Millis) -> Result<Reading, EngineError> {
        let n = self.names.len();
        let (mut values, mut found) = (vec![None; n], vec![false; n]);
        let w = self.wm.current();
        self.op.read(key, at, w, &mut values, &mut found)?;
        let mut reading = Reading::new(self.names.clone(), values, &found);
        reading.last_event_time = self
            .op
            .states
            .get(key)
            .map(|e| e.newest)
            .filter(|&t| t != Millis::MIN);
        Ok(reading)
    }

    /// The feature vector `event` would get if it were processed now,
    /// including itself, without adding it: see the module docs. Its
    /// position is not used (it moves no watermark).
    pub fn evaluate(&mut self, event: &Event) -> Result<Evaluation, EngineError> {
        let t = event.event_time;
        let w = self.wm.current();
        let lateness = self.lateness;
        // As `process` classifies: late when late in every spec.
        if !self.op.specs.is_empty() && self.op.specs.iter().all(|s| s.geo.is_late(t, w, lateness))
        {
            return Ok(Evaluation::Late);
        }
        let mut values = vec![None; self.names.len()];
        self.op.evaluate(event, self.next_seq, w, &mut values)?;
        // Every feature's spec holds the event, or is late for it (null).
        let found = vec![true; values.len()];
        let mut reading = Reading::new(self.names.clone(), values, &found);
        let last = self.op.states.get(&*event.key).map(|e| e.newest);
        reading.last_event_time = Some(last.unwrap_or(Millis::MIN).max(t));
        Ok(Evaluation::Features(reading))
    }
}
