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
        let w = self.watermark_for(key);
        self.op.read(key, at, w, &mut values, &mut found)?;
        // Request fields come with an event only: null for a known key.
        let known = found.iter().any(|f| *f);
        for &(slot, _) in &self.request {
            found[slot] = known;
        }
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
        let w = self.watermark_for(&event.key);
        let lateness = self.lateness;
        // As `process` classifies: late when late in every spec.
        if !self.op.specs.is_empty() && self.op.specs.iter().all(|s| s.geo.is_late(t, w, lateness))
        {
            return Ok(Evaluation::Late);
        }
        let mut values = vec![None; self.names.len()];
        self.op.evaluate(event, self.next_seq, w, &mut values)?;
        self.fill_request(event, &mut values);
        // Every feature's spec holds the event, or is late for it (null).
        let found = vec![true; values.len()];
        let mut reading = Reading::new(self.names.clone(), values, &found);
        let last = self.op.states.get(&*event.key).map(|e| e.newest);
        reading.last_event_time = Some(last.unwrap_or(Millis::MIN).max(t));
        Ok(Evaluation::Features(reading))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use rand::{Rng as _, SeedableRng as _};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::config::Config;
    use crate::engine::EngineOptions;
    use crate::record::{FieldValue, Output, Position, Value};
    use crate::state::{StateDelta, StateStore};

    /// Every aggregate over three window specs, one of them long enough
    /// (30 slices) for reads through the block caches.
    fn config(lateness: i64, distinct: bool) -> Config {
        let mut text = format!(
            "[source]\ntype = \"generator\"\n[schema]\nkey = \"k\"\ntimestamp = \"t\"\n\
             fields = {{ amount = \"f64?\", merchant = \"string\" }}\nrequest_fields = [\"amount\"]\n\
             [watermark]\nmax_out_of_orderness = 10\nidle_timeout = 1000000\nallowed_lateness = {lateness}\n\
             [[sinks]]\ntype = \"stdout\"\nkinds = [\"features\", \"window\", \"late\"]\n"
        );
        let specs = [
            ("t40", "{ type = \"tumbling\", size = 40 }"),
            ("s60", "{ type = \"sliding\", size = 60, slide = 20 }"),
            ("s300", "{ type = \"sliding\", size = 300, slide = 10 }"),
        ];
        for (suffix, window) in specs {
            for agg in [
                "count", "sum", "min", "max", "mean", "first", "last", "stddev",
            ] {
                let field = if agg == "count" {
                    ""
                } else {
                    "field = \"amount\"\n"
                };
                text.push_str(&format!(
                    "[[features]]\nname = \"{agg}_{suffix}\"\nagg = \"{agg}\"\n{field}window = {window}\n"
                ));
            }
            if !distinct {
                continue;
            }
            text.push_str(&format!(
                "[[features]]\nname = \"distinct_{suffix}\"\nagg = \"distinct_count\"\nfield = \"merchant\"\nmax_distinct = 3\nwindow = {window}\n"
            ));
        }
        Config::from_str_at(&text, Path::new("test.toml"), |_| None).expect("valid")
    }

    fn event(rng: &mut ChaCha8Rng, seq: u32, clock: i64) -> Event {
        let lag = if rng.random_bool(0.1) { 400 } else { 15 };
        let t = clock - rng.random_range(0..lag);
        Event {
            position: Position::new(
                Arc::from(format!("p{}", rng.random_range(0..2))),
                seq.to_string(),
            ),
            arrival: 0,
            key: format!("k{}", rng.random_range(0..6)).into(),
            event_time: t,
            fields: vec![
                rng.random_bool(0.85)
                    .then(|| FieldValue::F64(rng.random_range(-50..50) as f64 / 4.0)),
                Some(FieldValue::Str(Arc::from(format!(
                    "m{}",
                    rng.random_range(0..5)
                )))),
            ]
            .into(),
            raw: bytes::Bytes::new(),
        }
    }

    /// A key whose windows have all fired and been purged holds no room
    /// for slices in any spec, while a key with live windows does.
    #[test]
    fn purged_keys_hold_no_room_for_slices() {
        let config = config(0, false);
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &config.state_fingerprint(), false).unwrap();
        let mut engine = Engine::with_options(&config, store, EngineOptions::default()).unwrap();
        let event = |key: &str, t: i64| Event {
            position: Position::new(Arc::from("p"), t.to_string()),
            arrival: 0,
            key: key.into(),
            event_time: t,
            fields: vec![
                Some(FieldValue::F64(1.0)),
                Some(FieldValue::Str(Arc::from("m"))),
            ]
            .into(),
            raw: bytes::Bytes::new(),
        };
        let mut out = Vec::new();
        engine.process(&event("a", 1_000), 0, &mut out).unwrap();
        // Past the purge time of every window holding 1 000 (the longest
        // ends at 1 300).
        engine.process(&event("b", 2_000), 0, &mut out).unwrap();
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Window(w) if &*w.key == "a")));
        let room = |key: &str| -> Vec<usize> {
            let entry = engine.op.states.get(key).expect("in memory");
            entry
                .slots
                .iter()
                .map(|st| st.as_ref().map_or(0, |st| st.windows.slices.capacity()))
                .collect()
        };
        assert_eq!(room("a"), vec![0, 0, 0]);
        assert_eq!(room("b"), vec![1, 1, 1]);
    }

    fn ops(delta: &StateDelta) -> Vec<(crate::state::Cf, bool, Vec<u8>, Vec<u8>)> {
        delta
            .ops
            .iter()
            .map(|op| {
                (
                    op.cf,
                    op.delete,
                    delta.key(op).to_vec(),
                    delta.value(op).to_vec(),
                )
            })
            .collect()
    }

    /// The two deltas hold the same ops; a difference is shown by op.
    /// `exact`: byte for byte; otherwise values by length only (a distinct
    /// set is written in its hash set's order, which differs between two
    /// sets of the same values).
    fn same_ops(a: &StateDelta, b: &StateDelta, exact: bool, what: &str) {
        let (mut a, mut b) = (ops(a), ops(b));
        if !exact {
            for op in a.iter_mut().chain(b.iter_mut()) {
                op.3 = op.3.len().to_le_bytes().to_vec();
            }
        }
        // Snapshots may visit the states in map order, which differs
        // between two maps: the store sorts a checkpoint's ops anyway.
        a.sort();
        b.sort();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                x == y,
                "{what}: op {i} of {}/{}: {:?} {} {:?} ({} bytes) vs {:?} {} {:?} ({} bytes)",
                a.len(),
                b.len(),
                x.0,
                x.1,
                x.2,
                x.3.len(),
                y.0,
                y.1,
                y.2,
                y.3.len()
            );
        }
        assert_eq!(a.len(), b.len(), "{what}: ops");
    }

    /// Two engines take the same input; one is also read and asked to
    /// evaluate every event before processing it, at random times, keys
    /// known and not, with a cache of one state so reads go to RocksDB.
    /// Their outputs, checkpoint deltas (byte for byte), counters and
    /// memory are the same, and each evaluation is the vector the event
    /// then gets, to the bit.
    #[test]
    fn reads_and_evaluations_change_nothing_and_evaluate_as_processing_does() {
        let mut all_late = 0;
        for seed in 0..12u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let lateness = [0, 25, 120][seed as usize % 3];
            // Distinct counts in half the runs (their bytes are compared by
            // length), exact bytes in the others.
            let distinct = seed % 2 == 1;
            let config = config(lateness, distinct);
            let options = EngineOptions {
                cache_capacity: if seed % 4 < 2 { 1 } else { 1_000 },
                window_results: seed % 4 != 3,
                ..EngineOptions::default()
            };
            let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let fp = config.state_fingerprint();
            let store_a = StateStore::open(dir_a.path(), &fp, false).unwrap();
            let store_b = StateStore::open(dir_b.path(), &fp, false).unwrap();
            let mut a = Engine::with_options(&config, store_a.clone(), options).unwrap();
            let mut b = Engine::with_options(&config, store_b.clone(), options).unwrap();
            let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
            let (mut clock, mut now, mut checkpoint) = (1_000i64, 0i64, 0u64);
            let (mut evaluated, mut late) = (0, 0);
            for seq in 0..500u32 {
                match rng.random_range(0..10) {
                    0 => {
                        now += rng.random_range(0..50);
                        a.on_tick(now, &mut out_a).unwrap();
                        b.on_tick(now, &mut out_b).unwrap();
                    }
                    1 => {
                        checkpoint += 1;
                        let (da, db) = (
                            a.snapshot(checkpoint).unwrap(),
                            b.snapshot(checkpoint).unwrap(),
                        );
                        same_ops(
                            &da,
                            &db,
                            !distinct,
                            &format!("seed {seed}: checkpoint {checkpoint}"),
                        );
                        store_a.commit(checkpoint, da, &[]).unwrap();
                        store_b.commit(checkpoint, db, &[]).unwrap();
                        a.committed(checkpoint);
                        b.committed(checkpoint);
                    }
                    _ => {
                        clock += rng.random_range(0..12);
                        now += 1;
                        let e = event(&mut rng, seq, clock);
                        for _ in 0..2 {
                            let key = format!("k{}", rng.random_range(0..8));
                            let at = clock - rng.random_range(-20..400);
                            let r = b.read(&key, at).unwrap();
                            assert_eq!(r.features.values.len(), r.statuses.len());
                        }
                        let at_event = b.read(&e.key, e.event_time).unwrap();
                        let evaluation = b.evaluate(&e).unwrap();
                        a.process(&e, now, &mut out_a).unwrap();
                        let before = out_b.len();
                        b.process(&e, now, &mut out_b).unwrap();
                        match (&evaluation, &out_b[before]) {
                            (Evaluation::Features(r), Output::Features(f)) => {
                                assert_eq!(r.features, f.features, "seed {seed}: event {seq}");
                                assert!(r.statuses.iter().all(|s| *s != FeatureStatus::NotFound));
                                evaluated += 1;
                            }
                            (Evaluation::Late, Output::Late(_)) => late += 1,
                            (e, o) => {
                                panic!("seed {seed}: event {seq}: evaluated {e:?}, processed {o:?}")
                            }
                        }
                        // Read back at the event's time after it: the vector
                        // it got, unless the watermark it moved purged its
                        // windows (then the read says NULL or NOT_FOUND).
                        let after = b.read(&e.key, e.event_time).unwrap();
                        if let (Output::Features(f), false) = (
                            &out_b[before],
                            after.statuses.contains(&FeatureStatus::NotFound),
                        ) {
                            for (i, s) in after.statuses.iter().enumerate() {
                                if *s == FeatureStatus::Present {
                                    assert_eq!(
                                        after.features.values[i], f.features.values[i],
                                        "seed {seed}: event {seq}: feature {i}"
                                    );
                                }
                            }
                        }
                        drop(at_event);
                    }
                }
            }
            a.finish(&mut out_a).unwrap();
            b.finish(&mut out_b).unwrap();
            assert_eq!(out_a, out_b, "seed {seed}");
            // Which clean states a full cache evicts follows the map's
            // order, which differs between two maps: with a cache of one,
            // two engines load and evict differently whether read or not.
            let (mut sa, mut sb) = (a.stats(), b.stats());
            if options.cache_capacity == 1 {
                (sa.cache_loads, sa.cache_evictions) = (0, 0);
                (sb.cache_loads, sb.cache_evictions) = (0, 0);
            } else {
                assert_eq!(a.memory_footprint(), b.memory_footprint(), "seed {seed}");
            }
            assert_eq!(sa, sb, "seed {seed}");
            let (da, db) = (
                a.snapshot(checkpoint + 1).unwrap(),
                b.snapshot(checkpoint + 1).unwrap(),
            );
            same_ops(
                &da,
                &db,
                !distinct,
                &format!("seed {seed}: last checkpoint"),
            );
            assert!(evaluated > 200, "seed {seed}: {evaluated} evaluated");
            all_late += late;
        }
        assert!(all_late > 20, "only {all_late} late events evaluated");
    }

    #[test]
    fn an_unknown_key_is_not_found_and_a_known_one_present() {
        let config = config(0, true);
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &config.state_fingerprint(), false).unwrap();
        let mut engine = Engine::new(&config, store).unwrap();
        assert_eq!(engine.newest_event_time(), None);
        let r = engine.read("nobody", 1_000).unwrap();
        assert!(r.statuses.iter().all(|s| *s == FeatureStatus::NotFound));
        assert!(r.features.values.iter().all(Option::is_none));
        assert_eq!(r.last_event_time, None);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut e = event(&mut rng, 0, 1_000);
        e.key = "u1".into();
        e.event_time = 1_005;
        e.fields[0] = Some(FieldValue::F64(2.5));
        let mut out = Vec::new();
        engine.process(&e, 0, &mut out).unwrap();
        assert_eq!(engine.newest_event_time(), Some(1_005));
        let r = engine.read("u1", 1_005).unwrap();
        // The request field (last) comes with an event only.
        let (request, windowed) = r.statuses.split_last().unwrap();
        assert_eq!(*request, FeatureStatus::Null, "{r:?}");
        assert!(
            windowed.iter().all(|s| *s == FeatureStatus::Present),
            "{r:?}"
        );
        assert_eq!(r.last_event_time, Some(1_005));
        let Output::Features(f) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(f.features.names.last().map(|n| &**n), Some("amount"));
        assert_eq!(f.features.values.last(), Some(&Some(Value::Float(2.5))));
        let n = r.features.values.len() - 1;
        assert_eq!(r.features.values[..n], f.features.values[..n]);
        let Evaluation::Features(scored) = engine.evaluate(&e).unwrap() else {
            panic!("not late")
        };
        assert_eq!(
            scored.features.values.last(),
            Some(&Some(Value::Float(2.5)))
        );
        // Much later in event time: the key has state, the window there
        // holds nothing.
        let r = engine.read("u1", 100_000).unwrap();
        assert!(
            r.statuses.iter().all(|s| *s == FeatureStatus::Null),
            "{r:?}"
        );
    }
}
