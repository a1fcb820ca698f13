//! The engine against a naive reference that materialises every window and
//! applies Flink's rules literally: random keys, timestamps, arrival orders,
//! partitions, idle periods, allowed lateness, checkpoints with a tiny
//! write-back cache (so reads fall through to RocksDB). Window results and
//! revisions, per-event vectors and the late set must all agree.

mod common;

use common::*;
use proptest::prelude::*;
use shardflow::engine::{Engine, EngineOptions};

/// Raw material for one event: partition, key, clock advance, lag behind the
/// clock, amount, merchant, and an optional tick or checkpoint after it.
type Raw = (u8, u8, i64, i64, Option<i32>, u8, u8, i64);

fn raw() -> impl Strategy<Value = Raw> {
    (
        0u8..3,
        0u8..4,
        0i64..12,
        prop_oneof![4 => 0i64..12, 1 => 0i64..90, 1 => 0i64..300],
        proptest::option::weighted(0.8, 0i32..20),
        0u8..6,
        0u8..20,
        0i64..70,
    )
}

fn steps(raws: &[Raw]) -> Vec<Step> {
    let mut clock = 0;
    let mut out = Vec::new();
    for (i, &(partition, key, advance, lag, amount, merchant, extra, tick)) in
        raws.iter().enumerate()
    {
        clock += advance;
        out.push(Step::Event(In {
            partition,
            seq: i as u32,
            key,
            time: 1_000 + clock - lag,
            amount,
            merchant,
        }));
        match extra {
            0..=1 => out.push(Step::Tick(tick)),
            2..=3 => out.push(Step::Checkpoint {
                deferred: extra == 3,
            }),
            _ => {}
        }
    }
    out
}

/// Without `window_results` (no sink subscribes to them) the engine must
/// produce the reference's per-event vectors and late set, and no window
/// result.
#[allow(clippy::too_many_arguments)]
fn check(
    steps: &[Step],
    ooo: i64,
    idle: i64,
    lateness: i64,
    features: &str,
    cache: usize,
    window_results: bool,
) {
    let config = config(ooo, idle, lateness, features);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), &config);
    let engine = Engine::with_options(
        &config,
        store.clone(),
        EngineOptions {
            cache_capacity: cache,
            window_results,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let mut driver = Driver::new(engine, store, 0);
    let mut outputs = Vec::new();
    for step in steps {
        driver.step(step, &mut outputs);
    }
    let mut reference = Reference::new(&config);
    let mut now = 0;
    run_reference(&mut reference, steps, &mut now);
    assert_eq!(driver.engine.watermark(), reference.watermark, "watermark");

    driver.engine.finish(&mut outputs).expect("finish");
    reference.finish();
    let engine_ids = by_id(&outputs);
    assert_eq!(engine_ids.len(), outputs.len(), "an id was produced twice");
    let mut expected = reference.out;
    if !window_results {
        expected.retain(|_, seen| !matches!(seen, Seen::Window(..)));
    }
    assert_same(&engine_ids, &expected);
}

/// The online API's reads between the steps: before each event, an
/// evaluation of it (which must be the vector it then gets, to the bit) and
/// reads of its key and another at other times. With them the engine must
/// still produce exactly the reference's outputs: reads change nothing.
fn check_with_reads(steps: &[Step], ooo: i64, lateness: i64, cache: usize) {
    use shardflow::engine::Evaluation;
    use shardflow::record::Output;
    let config = config(ooo, 30, lateness, ALL_FEATURES);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), &config);
    let options = EngineOptions {
        cache_capacity: cache,
        ..EngineOptions::default()
    };
    let engine = Engine::with_options(&config, store.clone(), options).expect("engine");
    let mut driver = Driver::new(engine, store, 0);
    let mut outputs = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let Step::Event(e) = step else {
            driver.step(step, &mut outputs);
            continue;
        };
        let ev = event(e);
        let evaluation = driver.engine.evaluate(&ev).expect("evaluate");
        for (key, at) in [
            (ev.key.to_string(), ev.event_time),
            (format!("k{}", i % 5), ev.event_time - 37),
        ] {
            driver.engine.read(&key, at).expect("read");
        }
        let before = outputs.len();
        driver.step(step, &mut outputs);
        match (&evaluation, &outputs[before]) {
            (Evaluation::Features(r), Output::Features(f)) => {
                assert_eq!(r.features, f.features, "event {i}")
            }
            (Evaluation::Late, Output::Late(_)) => {}
            (e, o) => panic!("event {i}: evaluated {e:?}, processed {o:?}"),
        }
    }
    let mut reference = Reference::new(&config);
    let mut now = 0;
    run_reference(&mut reference, steps, &mut now);
    driver.engine.finish(&mut outputs).expect("finish");
    reference.finish();
    assert_same(&by_id(&outputs), &reference.out);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reads_and_evaluations_change_nothing(
        raws in proptest::collection::vec(raw(), 1..70),
        ooo in prop_oneof![Just(0i64), Just(10)],
        lateness in prop_oneof![Just(0i64), Just(25), Just(70)],
        cache in prop_oneof![Just(1usize), Just(1_000)],
    ) {
        check_with_reads(&steps(&raws), ooo, lateness, cache);
    }

    #[test]
    fn matches_reference_all_aggregates(
        raws in proptest::collection::vec(raw(), 1..70),
        ooo in prop_oneof![Just(0i64), Just(10)],
        lateness in prop_oneof![Just(0i64), Just(25), Just(70)],
        cache in prop_oneof![Just(1usize), Just(1_000)],
        window_results in proptest::bool::weighted(0.75),
    ) {
        check(&steps(&raws), ooo, 30, lateness, ALL_FEATURES, cache, window_results);
    }

    /// Long windows (size/slide = 12) exercise the block caches across
    /// several blocks, with lateness longer than a window.
    #[test]
    fn matches_reference_long_sliding(
        raws in proptest::collection::vec(raw(), 1..70),
        lateness in prop_oneof![Just(0i64), Just(45)],
        window_results in proptest::bool::weighted(0.75),
    ) {
        let features = &sliding_amount_features(60, 5, &["sum", "max", "last"]);
        check(&steps(&raws), 5, 1_000_000, lateness, features, 1_000, window_results);
    }

    /// Windows long enough to hold more than `DIRECT_MERGE_MAX` (8) slices
    /// of one key, so reads go through the block caches rather than the
    /// slice-by-slice merge that covers sparse keys.
    #[test]
    fn matches_reference_dense_sliding(
        raws in proptest::collection::vec(raw(), 1..90),
        lateness in prop_oneof![Just(0i64), Just(320)],
    ) {
        let features = &sliding_amount_features(300, 10, &["sum", "first", "stddev"]);
        check(&steps(&raws), 5, 1_000_000, lateness, features, 1_000, true);
    }
}

/// One sliding feature per aggregate over `amount`, named `{agg}_s{size}`.
fn sliding_amount_features(size: i64, slide: i64, aggs: &[&str]) -> String {
    aggs.iter()
        .map(|agg| {
            format!(
                "\n[[features]]\nname = \"{agg}_s{size}\"\nagg = \"{agg}\"\nfield = \"amount\"\nwindow = {{ type = \"sliding\", size = {size}, slide = {slide} }}\n"
            )
        })
        .collect()
}

#[test]
fn late_events_carry_the_watermark_and_refire_revisions() {
    let config = config(
        0,
        1_000_000,
        20,
        r#"
[[features]]
name = "c"
agg = "count"
window = { type = "tumbling", size = 10 }
"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &config);
    let mut engine = Engine::new(&config, store).unwrap();
    let mut out = Vec::new();
    let ev = |seq, time| {
        event(&In {
            partition: 0,
            seq,
            key: 1,
            time,
            amount: None,
            merchant: 0,
        })
    };
    engine.process(&ev(0, 5), 0, &mut out).unwrap(); // W = 4
    engine.process(&ev(1, 10), 0, &mut out).unwrap(); // W = 9: [0,10) fires rev 0
    engine.process(&ev(2, 7), 0, &mut out).unwrap(); // allowed late: rev 1 with count 2
    engine.process(&ev(3, 40), 0, &mut out).unwrap(); // W = 39: [0,10) purged (9 + 20 ≤ 39)
    engine.process(&ev(4, 8), 0, &mut out).unwrap(); // late
    let ids: Vec<String> = out.iter().map(|o| o.id()).collect();
    assert_eq!(
        ids,
        [
            "p0/0",
            "p0/1",
            "c/k1/10/0",
            "p0/2",
            "c/k1/10/1",
            "p0/3",
            "c/k1/20/0",
            "p0/4"
        ],
        "{out:#?}"
    );
    match &out[4] {
        shardflow::record::Output::Window(w) => {
            assert_eq!(w.value, Some(shardflow::record::Value::Int(2)))
        }
        o => panic!("{o:?}"),
    }
    match &out[7] {
        shardflow::record::Output::Late(l) => assert_eq!(l.watermark, 39),
        o => panic!("{o:?}"),
    }
}

/// The generator must produce the cases the properties are about: late
/// events, re-fired windows (revision ≥ 1), distinct-count overflows (null)
/// and watermark advances caused by idleness alone.
#[test]
fn scenarios_cover_the_interesting_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let config = config(10, 30, 25, ALL_FEATURES);
    let mut runner = TestRunner::deterministic();
    let strategy = proptest::collection::vec(raw(), 1..70);
    let (mut late, mut revised, mut nulls, mut idle_advances) = (0, 0, 0, 0);
    for _ in 0..48 {
        let raws = strategy.new_tree(&mut runner).expect("sample").current();
        let steps = steps(&raws);
        let mut reference = Reference::new(&config);
        let mut now = 0;
        for step in &steps {
            let before = reference.watermark;
            run_reference(&mut reference, std::slice::from_ref(step), &mut now);
            if matches!(step, Step::Tick(_)) && reference.watermark > before {
                idle_advances += 1;
            }
        }
        reference.finish();
        for (id, seen) in &reference.out {
            match seen {
                Seen::Late(_) => late += 1,
                Seen::Window(..) if !id.ends_with("/0") => revised += 1,
                Seen::Window(_, _, None) if id.starts_with("distinct") => nulls += 1,
                _ => {}
            }
        }
    }
    assert!(late > 10, "late events: {late}");
    assert!(revised > 10, "re-fired windows: {revised}");
    assert!(nulls > 0, "distinct overflows: {nulls}");
    assert!(idle_advances > 0, "idleness never advanced the watermark");
    eprintln!(
        "late {late}, revised {revised}, distinct nulls {nulls}, idle advances {idle_advances}"
    );
}

/// A burst (every key's window due at once, here at the end of input)
/// leaves in chunks of `fire_chunk_keys` keys, and the chunks together are
/// exactly what firing everything at once gives, in the same order.
#[test]
fn firing_bursts_leave_in_bounded_chunks_with_the_same_results() {
    use shardflow::engine::EngineOptions;
    let config = config(
        0,
        1_000_000,
        0,
        r#"
[[features]]
name = "c"
agg = "count"
window = { type = "tumbling", size = 100 }

[[features]]
name = "s"
agg = "sum"
field = "amount"
window = { type = "sliding", size = 100, slide = 50 }
"#,
    );
    let keys = 5_000u32;
    let run = |chunk: usize| {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), &config);
        let options = EngineOptions {
            fire_chunk_keys: chunk,
            ..EngineOptions::default()
        };
        let mut engine = Engine::with_options(&config, store, options).unwrap();
        let mut chunks: Vec<Vec<String>> = Vec::new();
        let mut out = Vec::new();
        for k in 0..keys {
            let e = event(&In {
                partition: 0,
                seq: k,
                key: (k % 251) as u8,
                time: i64::from(k % 90),
                amount: Some(1),
                merchant: 0,
            });
            engine.process(&e, 0, &mut out).unwrap();
            while engine.firing() {
                chunks.push(out.drain(..).map(|o| o.id()).collect());
                engine.fire_more(&mut out).unwrap();
            }
        }
        chunks.push(out.drain(..).map(|o| o.id()).collect());
        engine.finish(&mut out).unwrap();
        loop {
            chunks.push(out.drain(..).map(|o| o.id()).collect());
            if !engine.fire_more(&mut out).unwrap() {
                chunks.push(out.drain(..).map(|o| o.id()).collect());
                break;
            }
        }
        chunks.retain(|c| !c.is_empty());
        chunks
    };
    let whole = run(usize::MAX);
    let chunked = run(10);
    let flat = |c: &Vec<Vec<String>>| c.iter().flatten().cloned().collect::<Vec<_>>();
    assert_eq!(flat(&chunked), flat(&whole));
    let windows = |c: &Vec<String>| c.iter().filter(|id| !id.starts_with("p0/")).count();
    let largest_whole = whole.iter().map(windows).max().unwrap();
    let largest_chunk = chunked.iter().map(windows).max().unwrap();
    // 251 keys, 2 specs, ≤ 3 windows of a key due at the end: one chunk of
    // 10 keys holds at most 30 window results.
    assert!(largest_whole > 500, "the burst is a burst: {largest_whole}");
    assert!(
        largest_chunk <= 30,
        "a chunk held {largest_chunk} window results"
    );
}
