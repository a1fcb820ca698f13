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

/// Per-shard watermarks: the hash space split into `shards` shards, each key
/// on the shard its MD5 falls in (partition key = entity key), each shard
/// `lags[s]` ms behind in event time. The engine, fed all shards in one
/// interleaving, with checkpoints and a tiny cache, must produce exactly what
/// the reference produces for each shard alone: a key's windows, lateness and
/// vectors depend on its own shard's records, never on the other shards'
/// pace or on which shards share the process.
fn check_per_shard(raws: &[Raw], lags: &[i64], ooo: i64, lateness: i64, cache: usize) {
    use shardflow::state::{hash_key, HashRange};
    use std::sync::Arc;
    let shards = lags.len() as u128;
    let width = u128::MAX / shards;
    let ranges: Vec<HashRange> = (0..shards)
        .map(|i| HashRange {
            start: i * width,
            end: if i + 1 == shards {
                u128::MAX
            } else {
                (i + 1) * width - 1
            },
        })
        .collect();
    let shard_of = |key: u8| {
        let h = hash_key(&format!("k{key}"));
        ranges
            .iter()
            .position(|r| r.contains(&h))
            .expect("ranges cover the hash space") as u8
    };
    let events: Vec<In> = steps(raws)
        .into_iter()
        .filter_map(|s| match s {
            Step::Event(mut e) => {
                e.partition = shard_of(e.key);
                e.time -= lags[usize::from(e.partition)];
                Some(e)
            }
            _ => None,
        })
        .collect();
    let mut all = Vec::new();
    for (i, e) in events.iter().enumerate() {
        all.push(Step::Event(e.clone()));
        if i % 7 == 3 {
            all.push(Step::Checkpoint {
                deferred: i % 2 == 0,
            });
        }
    }

    let config = config(ooo, 3_600_000, lateness, ALL_FEATURES);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), &config);
    let mut engine = Engine::with_options(
        &config,
        store.clone(),
        EngineOptions {
            cache_capacity: cache,
            per_shard: true,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let mut outputs = Vec::new();
    let announced: Vec<(Arc<str>, HashRange)> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| (Arc::from(format!("p{i}")), *r))
        .collect();
    engine
        .partition_ranges(&announced, &mut outputs)
        .expect("ranges");
    let mut driver = Driver::new(engine, store, 0);
    for step in &all {
        driver.step(step, &mut outputs);
    }
    driver.engine.finish(&mut outputs).expect("finish");

    let mut expected = std::collections::BTreeMap::new();
    for s in 0..lags.len() as u8 {
        let alone: Vec<Step> = events
            .iter()
            .filter(|e| e.partition == s)
            .map(|e| Step::Event(e.clone()))
            .collect();
        let mut reference = Reference::new(&config);
        run_reference(&mut reference, &alone, &mut 0);
        reference.finish();
        expected.extend(reference.out);
    }
    let engine_ids = by_id(&outputs);
    assert_eq!(engine_ids.len(), outputs.len(), "an id was produced twice");
    assert_same(&engine_ids, &expected);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn per_shard_watermarks_make_each_shard_independent(
        raws in proptest::collection::vec(raw(), 1..80),
        lags in proptest::collection::vec(prop_oneof![Just(0i64), 0i64..400], 2..4),
        ooo in prop_oneof![Just(0i64), Just(10)],
        lateness in prop_oneof![Just(0i64), Just(25)],
        cache in prop_oneof![Just(1usize), Just(1_000)],
    ) {
        check_per_shard(&raws, &lags, ooo, lateness, cache);
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

/// A shard split under per-shard watermarks: the children start from the
/// parent's watermark (an event behind it is late in a child too, as it
/// would have been in the parent), and the parent's keys' windows, opened
/// in the parent, fire at the child's watermark that holds their hash.
#[test]
fn per_shard_children_start_from_their_parent_and_take_its_keys() {
    use shardflow::engine::PartitionStatus;
    use shardflow::record::Output;
    use shardflow::state::{hash_key, HashRange};
    use std::sync::Arc;
    let features = "[[features]]\nname = \"count_t100\"\nagg = \"count\"\nwindow = { type = \"tumbling\", size = 100 }\n";
    let config = config(0, 3_600_000, 0, features);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), &config);
    let mut engine = Engine::with_options(
        &config,
        store,
        EngineOptions {
            per_shard: true,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let mid = u128::MAX / 2;
    let (low, high) = (
        HashRange { start: 0, end: mid },
        HashRange {
            start: mid + 1,
            end: u128::MAX,
        },
    );
    // A key on each side of the split.
    let key_in = |r: HashRange| {
        (0u8..=255)
            .find(|k| r.contains(&hash_key(&format!("k{k}"))))
            .unwrap()
    };
    let (a, b) = (key_in(low), key_in(high));
    let (parent, left, right): (Arc<str>, Arc<str>, Arc<str>) =
        ("p0".into(), "p1".into(), "p2".into());
    let mut out = Vec::new();
    engine
        .partition_ranges(&[(parent.clone(), HashRange::ALL)], &mut out)
        .unwrap();
    let ev = |partition: u8, seq: u32, key: u8, time: i64| {
        event(&In {
            partition,
            seq,
            key,
            time,
            amount: None,
            merchant: 0,
        })
    };
    engine.process(&ev(0, 0, a, 150), 0, &mut out).unwrap();
    assert_eq!(engine.watermark_for(&format!("k{a}")), 149);
    // The split: children known with their ranges, then the parent ends.
    engine
        .partition_ranges(&[(left.clone(), low), (right.clone(), high)], &mut out)
        .unwrap();
    engine
        .partition_status(&parent, PartitionStatus::Finished, 0, &mut out)
        .unwrap();
    assert_eq!(
        engine.watermark_for(&format!("k{a}")),
        149,
        "the child holding a starts at the parent's"
    );
    assert_eq!(
        engine.watermark_for(&format!("k{b}")),
        149,
        "so does the other child"
    );
    let (la, lb) = (1 + (a as u32), 100 + (b as u32));
    engine.process(&ev(1, la, a, 120), 0, &mut out).unwrap();
    engine.process(&ev(1, la + 1, a, 90), 0, &mut out).unwrap();
    engine.process(&ev(2, lb, b, 50), 0, &mut out).unwrap();
    let late: Vec<i64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Late(l) => Some(l.event_time),
            _ => None,
        })
        .collect();
    assert_eq!(
        late,
        vec![90, 50],
        "behind the inherited watermark: late in both children"
    );
    assert!(
        !out.iter().any(|o| matches!(o, Output::Window(_))),
        "nothing due yet: {out:?}"
    );
    // The left child moves on: a's window [100, 200), opened in the parent, fires there.
    engine.process(&ev(1, la + 2, a, 260), 0, &mut out).unwrap();
    let fired: Vec<(i64, Option<f64>)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Window(w) if *w.key == *format!("k{a}") => {
                Some((w.window_start, w.value.map(|v| v.as_f64())))
            }
            _ => None,
        })
        .collect();
    assert_eq!(fired, vec![(100, Some(2.0))]);
    assert_eq!(
        engine.watermark_for(&format!("k{b}")),
        149,
        "the right child did not move"
    );
    // Every key so far came on the shard that owns its hash (the parent's
    // range overlapping its announced children's included).
    assert_eq!(engine.misrouted_keys(), 0);
    // b on the left child, twice, and a on the right one: two keys.
    engine.process(&ev(1, la + 3, b, 300), 0, &mut out).unwrap();
    engine.process(&ev(1, la + 4, b, 301), 0, &mut out).unwrap();
    assert_eq!(engine.misrouted_keys(), 1);
    engine.process(&ev(2, lb + 1, a, 302), 0, &mut out).unwrap();
    assert_eq!(engine.misrouted_keys(), 2);
}
