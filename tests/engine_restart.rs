//! Restart equivalence and bounded state.
//!
//! A stream is processed with checkpoints; at random points the process
//! "crashes" (engine and store dropped, uncommitted work lost), RocksDB is
//! reopened, and the stream resumes from the committed position. The union
//! of all outputs, deduplicated by id, must equal an uninterrupted run, and
//! an id seen twice must carry the same content (no double counting).

mod common;

use std::collections::{BTreeSet, HashSet};

use common::*;
use proptest::prelude::*;
use shardflow::config::Config;
use shardflow::engine::{Engine, EngineOptions, Geometry};
use shardflow::record::Output;

type Raw = (u8, u8, i64, i64, Option<i32>, u8, u8);

fn raw() -> impl Strategy<Value = Raw> {
    (
        0u8..3,
        0u8..5,
        0i64..10,
        prop_oneof![4 => 0i64..12, 1 => 0i64..80, 1 => 0i64..300],
        proptest::option::weighted(0.8, 0i32..20),
        0u8..6,
        0u8..10,
    )
}

fn steps(raws: &[Raw]) -> Vec<Step> {
    let mut clock = 0;
    let mut out = Vec::new();
    for (i, &(partition, key, advance, lag, amount, merchant, extra)) in raws.iter().enumerate() {
        clock += advance;
        out.push(Step::Event(In {
            partition,
            seq: i as u32,
            key,
            time: 1_000 + clock - lag,
            amount,
            merchant,
        }));
        if extra < 3 {
            out.push(Step::Checkpoint {
                deferred: extra == 2,
            });
        }
    }
    out
}

/// Index just after the step that produced `position`, or 0.
fn resume_index(steps: &[Step], positions: &[shardflow::record::Position]) -> usize {
    let Some(p) = positions.first() else { return 0 };
    steps
        .iter()
        .position(|s| matches!(s, Step::Event(e) if event(e).position == *p))
        .map_or(0, |i| i + 1)
}

/// The outputs of all `steps` in one run, finished, on fresh state.
fn uninterrupted(config: &Config, options: EngineOptions, steps: &[Step]) -> Vec<Output> {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config);
    let engine = Engine::with_options(config, store.clone(), options).unwrap();
    let mut run = Driver::new(engine, store, 0);
    let mut out = Vec::new();
    for s in steps {
        run.step(s, &mut out);
    }
    run.engine.finish(&mut out).unwrap();
    out
}

/// `inline_max` is the inline record limit of the first run; each restart
/// uses the next of `inline_max`, 0 (every key's slices stored one by one)
/// and the default, so records written under one limit are read and
/// rewritten under another.
fn run_with_crashes(
    steps: &[Step],
    crashes: &BTreeSet<usize>,
    lateness: i64,
    (cache, inline_max): (usize, usize),
) {
    let config = config(10, 1_000_000_000, lateness, ALL_FEATURES);
    let limits = [inline_max, 0, EngineOptions::default().inline_record_max];
    let options = |restarts: usize| EngineOptions {
        cache_capacity: cache,
        inline_record_max: limits[restarts % limits.len()],
        ..EngineOptions::default()
    };

    let expected = uninterrupted(&config, options(0), steps);

    let dir_b = tempfile::tempdir().unwrap();
    let mut outputs: Vec<Output> = Vec::new();
    let mut i = 0;
    let mut crashes = crashes.iter().copied().peekable();
    let mut restarts = 0;
    loop {
        let store = open(dir_b.path(), &config);
        let positions = store.committed_positions().unwrap();
        if restarts > 0 {
            i = resume_index(steps, &positions);
        }
        // Processing time does not affect results here (no idleness), but
        // keep it increasing across restarts like a real clock.
        let engine = Engine::with_options(&config, store.clone(), options(restarts)).unwrap();
        let mut b = Driver::new(engine, store, 0);
        let mut crashed = false;
        while i < steps.len() {
            b.step(&steps[i], &mut outputs);
            i += 1;
            if crashes.next_if(|&c| c < i).is_some() {
                crashed = true;
                break;
            }
        }
        if !crashed {
            b.engine.finish(&mut outputs).unwrap();
            break;
        }
        restarts += 1;
        drop(b); // the crash: uncommitted state and deltas are gone
    }

    let expected = by_id(&expected);
    let got = by_id(&outputs); // panics if an id repeats with other content
    assert_same(&got, &expected);
}

/// A sink subscribing to window results appears (`first_on` false) or goes
/// away (`first_on` true) at a restart after step `restart_at`. Per-event
/// vectors and late events are those of an uninterrupted run with results
/// on. Every window result produced equals that run's. After results come
/// on at restored watermark `w0`, every window due later (end − 1 > w0)
/// gets exactly that run's results and revisions; those due earlier came
/// due while nobody subscribed.
fn run_with_results_switched(steps: &[Step], restart_at: usize, lateness: i64, first_on: bool) {
    let config = config(10, 1_000_000_000, lateness, ALL_FEATURES);
    let options = |window_results| EngineOptions {
        cache_capacity: 1,
        window_results,
        ..EngineOptions::default()
    };

    let expected = uninterrupted(&config, options(true), steps);

    let dir_b = tempfile::tempdir().unwrap();
    let mut outputs: Vec<Output> = Vec::new();
    let store = open(dir_b.path(), &config);
    let engine = Engine::with_options(&config, store.clone(), options(first_on)).unwrap();
    let mut b = Driver::new(engine, store, 0);
    for s in &steps[..restart_at.min(steps.len())] {
        b.step(s, &mut outputs);
    }
    drop(b);
    let store = open(dir_b.path(), &config);
    let i = resume_index(steps, &store.committed_positions().unwrap());
    let engine = Engine::with_options(&config, store.clone(), options(!first_on)).unwrap();
    let w0 = engine.watermark();
    let mut b = Driver::new(engine, store, 0);
    for s in &steps[i..] {
        b.step(s, &mut outputs);
    }
    b.engine.finish(&mut outputs).unwrap();

    let mut expected = by_id(&expected);
    let got = by_id(&outputs);
    for (id, seen) in &got {
        if let Seen::Window(..) = seen {
            let e = expected.get(id);
            assert!(
                e.is_some_and(|e| e.approx_eq(seen)) || (!first_on && window_due_by(seen, w0)),
                "{id}: {seen:?}, uninterrupted {e:?}"
            );
        }
    }
    expected.retain(|_, seen| match seen {
        Seen::Window(..) => !first_on && !window_due_by(seen, w0),
        _ => true,
    });
    let mut got = got;
    got.retain(|id, seen| !matches!(seen, Seen::Window(..)) || expected.contains_key(id));
    assert_same(&got, &expected);
}

fn window_due_by(seen: &Seen, w: i64) -> bool {
    matches!(seen, Seen::Window(_, end, _) if end - 1 <= w)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn window_results_can_be_switched_at_a_restart(
        raws in proptest::collection::vec(raw(), 1..60),
        restart_at in 0usize..90,
        lateness in prop_oneof![Just(0i64), Just(30)],
        first_on in any::<bool>(),
    ) {
        run_with_results_switched(&steps(&raws), restart_at, lateness, first_on);
    }

    #[test]
    fn restarts_are_invisible_after_deduplication(
        raws in proptest::collection::vec(raw(), 1..60),
        crash_points in proptest::collection::btree_set(0usize..90, 0..4),
        lateness in prop_oneof![Just(0i64), Just(30)],
        cache in prop_oneof![Just(1usize), Just(10_000)],
        // 0: no record inline; 400: records switch layout as keys grow.
        inline_max in prop_oneof![Just(0usize), Just(400), Just(1024)],
    ) {
        run_with_crashes(&steps(&raws), &crash_points, lateness, (cache, inline_max));
    }
}

#[test]
fn fingerprint_mismatch_is_refused_unless_reset() {
    let dir = tempfile::tempdir().unwrap();
    let a = config(10, 1000, 0, ALL_FEATURES);
    let b = config(10, 1000, 0, &ALL_FEATURES.replace("size = 40", "size = 80"));
    drop(open(dir.path(), &a));
    let err = shardflow::state::StateStore::open(dir.path(), &b.state_fingerprint(), false)
        .err()
        .expect("mismatch refused");
    assert!(err.to_string().contains("--reset-state"), "{err}");
    let store = shardflow::state::StateStore::open(dir.path(), &b.state_fingerprint(), true)
        .expect("reset");
    assert_eq!(store.committed_checkpoint().unwrap(), 0);
}

/// A long run over many keys with periodic commits: at every checkpoint the
/// store holds exactly the slices of windows that are not purged yet, one
/// window entry and one timer per key that still has slices, and nothing at
/// all once the input ends.
#[test]
fn purged_windows_leave_no_state() {
    purged_state_is_bounded(true, EngineOptions::default().inline_record_max);
}

/// The same with every key's slices stored one by one (the layout of keys
/// whose slices are too large to keep inline in their window record).
#[test]
fn purged_windows_leave_no_state_with_slices_stored_apart() {
    purged_state_is_bounded(true, 0);
}

/// Without window results a key is visited when its whole state expires,
/// and slices that expire before are dropped by its next event or that
/// visit: a key with no live slice is still gone at once, and an expired
/// slice lingers at most one horizon (out-of-orderness + size + slide).
#[test]
fn purged_windows_leave_no_state_without_window_results() {
    purged_state_is_bounded(false, EngineOptions::default().inline_record_max);
    purged_state_is_bounded(false, 0);
}

fn purged_state_is_bounded(window_results: bool, inline_record_max: usize) {
    let ooo = 50;
    let config = config(
        ooo,
        1_000_000_000,
        0,
        r#"
[[features]]
name = "count_t100"
agg = "count"
window = { type = "tumbling", size = 100 }

[[features]]
name = "sum_s200"
agg = "sum"
field = "amount"
window = { type = "sliding", size = 200, slide = 50 }

[[features]]
name = "max_s200"
agg = "max"
field = "amount"
window = { type = "sliding", size = 200, slide = 50 }
"#,
    );
    let geos = [Geometry::new(100, 100), Geometry::new(200, 50)];
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &config);
    let engine = Engine::with_options(
        &config,
        store.clone(),
        EngineOptions {
            cache_capacity: 500,
            window_results,
            inline_record_max,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let mut d = Driver::new(engine, store.clone(), 0);
    let mut out = Vec::new();
    let mut accepted: Vec<(i64, u32)> = Vec::new(); // (time, key) of accepted events
    let keys = 2_000u32;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..20_000u32 {
        // Keys drift through time, so old keys go quiet and must be purged.
        let key = (i / 4 + (next() % 50) as u32) % keys;
        let time = 10_000 + i64::from(i) - (next() % 40) as i64;
        let e = In {
            partition: 0,
            seq: i,
            key: 0,
            time,
            amount: Some((next() % 100) as i32),
            merchant: 0,
        };
        let mut ev = event(&e);
        ev.key = format!("k{key}").into();
        d.now += 1;
        d.last_position = vec![ev.position.clone()];
        let before = out.len();
        d.engine.process(&ev, d.now, &mut out).unwrap();
        if matches!(out[before], Output::Features(_)) {
            accepted.push((time, key));
        }
        if i % 1_000 == 999 {
            d.step(&Step::Checkpoint { deferred: false }, &mut out);
            let w = d.engine.watermark();
            let mut live_slices = HashSet::new();
            let mut live_keys = HashSet::new();
            // Slices that may still linger without window results.
            let mut recent_slices = HashSet::new();
            for &(t, k) in &accepted {
                for (spec, g) in geos.iter().enumerate() {
                    let s = g.slice_of(t);
                    if !g.is_late(t, w, 0) {
                        live_slices.insert((spec, k, s));
                        live_keys.insert((spec, k));
                    }
                    if !g.is_late(t, w - (ooo + g.size + g.slide), 0) {
                        recent_slices.insert((spec, k, s));
                    }
                }
            }
            let counts = store.key_counts().unwrap();
            if window_results {
                assert_eq!(
                    counts.slices,
                    live_slices.len(),
                    "slices after {i} events (W = {w})"
                );
            } else {
                let stored: HashSet<(usize, u32, i64)> = store
                    .stored_slices()
                    .unwrap()
                    .into_iter()
                    .map(|(spec, key, start)| {
                        let spec = usize::from(spec);
                        (spec, key[1..].parse().unwrap(), geos[spec].slice_of(start))
                    })
                    .collect();
                assert!(
                    live_slices.iter().all(|s| stored.contains(s)),
                    "a live slice is missing after {i} events (W = {w})"
                );
                let stale: Vec<_> = stored
                    .iter()
                    .filter(|s| !recent_slices.contains(s) || !live_keys.contains(&(s.0, s.1)))
                    .collect();
                assert!(
                    stale.is_empty(),
                    "expired slices kept too long after {i} events (W = {w}): {stale:?}"
                );
            }
            assert_eq!(
                counts.windows,
                live_keys.len(),
                "window entries after {i} events"
            );
            assert_eq!(counts.timers, live_keys.len(), "timers after {i} events");
            assert!(counts.slices < 2_000, "state must stay bounded: {counts:?}");
            let (cached, timers) = d.engine.memory_footprint();
            assert!(
                cached <= live_keys.len() + 500,
                "cache {cached} for {} live states",
                live_keys.len()
            );
            assert!(
                timers <= 4 * live_keys.len() + 100,
                "timer entries {timers}"
            );
        }
    }
    d.engine.finish(&mut out).unwrap();
    d.step(&Step::Checkpoint { deferred: false }, &mut out);
    let counts = store.key_counts().unwrap();
    assert_eq!(
        (counts.slices, counts.windows, counts.timers),
        (0, 0, 0),
        "{counts:?}"
    );
    assert_eq!(d.engine.memory_footprint(), (0, 0));
}
