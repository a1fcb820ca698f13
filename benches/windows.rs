//! Window engine throughput (issue 3). Workload: events over keys
//! (default 1 M over 100 k; `SHARDFLOW_BENCH_EVENTS` scales it, keys are a
//! tenth), 5 s out-of-orderness, count + sum + max, RocksDB state with a
//! checkpoint (snapshot + synced commit) every 250 k events.
//!
//! - `ingest/*`: the watermark is held back by a second partition that
//!   never advances, so nothing fires. `hashmap_floor` is the same loop with
//!   a plain `HashMap` and no windows.
//! - `emission/*`: after an untimed ingest, `finish()` fires every window
//!   (throughput in window results).
//! - `end_to_end/*`: one partition, the watermark follows the events, windows
//!   fire as it passes them.
//! - Each routine hands its engine, store and outputs back to criterion,
//!   which drops them untimed: tearing down 100 k keys of state and a
//!   RocksDB directory is not ingest.
//! - Then a table of where ingest time goes (engine work per event,
//!   snapshot encoding, RocksDB commit), since the pipeline runs the commit
//!   on another thread than the engine.

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, SamplingMode, Throughput};
use shardflow::config::Config;
use shardflow::engine::Engine;
use shardflow::record::{
    Event, FeatureNames, FeatureRecord, FeatureVector, FieldValue, Output, Position,
};
use shardflow::state::StateStore;

const T0: i64 = 1_700_000_000_000;
const CHECKPOINT_EVERY: usize = 250_000;

fn events_from_env() -> usize {
    std::env::var("SHARDFLOW_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn config(window: &str) -> Config {
    let features: String = [
        ("count", None),
        ("sum", Some("amount")),
        ("max", Some("amount")),
    ]
    .iter()
    .map(|(agg, field)| {
        format!(
            "[[features]]\nname = \"{agg}\"\nagg = \"{agg}\"\n{}window = {window}\n\n",
            field
                .map(|f| format!("field = \"{f}\"\n"))
                .unwrap_or_default()
        )
    })
    .collect();
    let text = format!(
        r#"
[source]
type = "generator"
[schema]
key = "userId"
timestamp = "ts"
fields = {{ amount = "f64" }}
[watermark]
max_out_of_orderness = "5s"
idle_timeout = "1d"
allowed_lateness = "0s"
{features}
[[sinks]]
type = "stdout"
kinds = ["features", "window"]
"#
    );
    Config::from_str_at(&text, Path::new("bench.toml"), |_| None).expect("bench config")
}

/// `n` events over `n / 10` keys, 10 k events per second of event time,
/// up to 5 s out of order, on partition `p0`.
fn events(n: usize) -> Vec<Event> {
    let keys = (n / 10).max(1) as u64;
    let partition: Arc<str> = Arc::from("p0");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    (0..n)
        .map(|i| {
            let key = next() % keys;
            let jitter = (next() % 5_000) as i64;
            Event {
                position: Position::new(partition.clone(), i.to_string()),
                arrival: 0,
                key: format!("user-{key}").into(),
                event_time: T0 + (i as i64) / 10 - jitter,
                fields: vec![Some(FieldValue::F64((next() % 10_000) as f64 / 100.0))].into(),
                raw: Default::default(),
            }
        })
        .collect()
}

struct Run {
    _dir: tempfile::TempDir,
    store: StateStore,
    engine: Engine,
    checkpoint: u64,
}

fn fresh(config: &Config, hold_watermark: bool) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StateStore::open(dir.path(), &config.state_fingerprint(), false).expect("store");
    let mut engine = Engine::new(config, store.clone()).expect("engine");
    if hold_watermark {
        // A partition that stays at the beginning of time holds W back.
        let hold = Event {
            position: Position::new(Arc::from("hold"), "0"),
            arrival: 0,
            key: "hold".into(),
            event_time: T0 - 3_600_000,
            fields: vec![Some(FieldValue::F64(0.0))].into(),
            raw: Default::default(),
        };
        engine.process(&hold, 0, &mut Vec::new()).expect("hold");
    }
    Run {
        _dir: dir,
        store,
        engine,
        checkpoint: 0,
    }
}

/// Processes all events with periodic checkpoints; returns results fired.
fn ingest(run: &mut Run, events: &[Event]) -> usize {
    let mut out = Vec::with_capacity(4096);
    let mut results = 0;
    for (i, e) in events.iter().enumerate() {
        run.engine.process(e, 0, &mut out).expect("process");
        if out.len() >= 4096 {
            results += out
                .iter()
                .filter(|o| matches!(o, Output::Window(_)))
                .count();
            out.clear();
        }
        if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 {
            checkpoint(run, e);
        }
    }
    results
        + out
            .iter()
            .filter(|o| matches!(o, Output::Window(_)))
            .count()
}

fn checkpoint(run: &mut Run, last: &Event) {
    run.checkpoint += 1;
    let delta = run.engine.snapshot(run.checkpoint).expect("snapshot");
    run.store
        .commit(run.checkpoint, delta, std::slice::from_ref(&last.position))
        .expect("commit");
    run.engine.committed(run.checkpoint);
}

/// The floor: the same per-event work without windows or state store.
fn hashmap_floor(events: &[Event], names: &FeatureNames) -> usize {
    let mut map: HashMap<shardflow::record::Key, (i64, f64, f64)> = HashMap::new();
    let mut out = Vec::with_capacity(4096);
    let mut n = 0;
    for e in events {
        let v = e.fields[0]
            .as_ref()
            .and_then(FieldValue::as_f64)
            .unwrap_or(0.0);
        let a = map
            .entry(e.key.clone())
            .or_insert((0, 0.0, f64::NEG_INFINITY));
        a.0 += 1;
        a.1 += v;
        a.2 = a.2.max(v);
        out.push(Output::Features(FeatureRecord {
            id: e.position.to_string(),
            key: e.key.clone(),
            event_time: e.event_time,
            features: FeatureVector {
                names: names.clone(),
                values: vec![
                    Some(shardflow::record::Value::Int(a.0)),
                    Some(shardflow::record::Value::Float(a.1)),
                    Some(shardflow::record::Value::Float(a.2)),
                ],
            },
            arrival: 0,
        }));
        if out.len() >= 4096 {
            n += out.len();
            out.clear();
        }
    }
    n + out.len()
}

fn windows() -> Vec<(&'static str, &'static str)> {
    vec![
        ("tumbling_1m", r#"{ type = "tumbling", size = "1m" }"#),
        (
            "sliding_x6",
            r#"{ type = "sliding", size = "1m", slide = "10s" }"#,
        ),
        (
            "sliding_x60",
            r#"{ type = "sliding", size = "10m", slide = "10s" }"#,
        ),
        (
            "sliding_x360",
            r#"{ type = "sliding", size = "1h", slide = "10s" }"#,
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let n = events_from_env();
    let evs = events(n);

    let mut g = c.benchmark_group("ingest");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(n as u64));
    let names: FeatureNames = ["count", "sum", "max"]
        .iter()
        .map(|n| Arc::from(*n))
        .collect();
    g.bench_function("hashmap_floor", |b| {
        b.iter(|| black_box(hashmap_floor(&evs, &names)))
    });
    for (name, window) in windows() {
        let cfg = config(window);
        g.bench_function(name, |b| {
            b.iter_batched(
                || fresh(&cfg, true),
                |mut run| {
                    black_box(ingest(&mut run, &evs));
                    run
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    // Emission: a smaller input (100 events per key) so that a 1 h window's
    // ~370 results per key stay affordable; throughput is in results.
    let emission_events = events((n / 10).max(10)).into_iter().map(|mut e| {
        e.key = format!(
            "user-{}",
            e.position.sequence.parse::<u64>().unwrap_or(0) % 1_000
        )
        .into();
        e
    });
    let emission_events: Vec<Event> = emission_events.collect();
    let mut g = c.benchmark_group("emission");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for (name, window) in windows() {
        let cfg = config(window);
        let mut probe = fresh(&cfg, true);
        ingest(&mut probe, &emission_events);
        let mut out = Vec::new();
        probe.engine.finish(&mut out).expect("finish");
        let results = out
            .iter()
            .filter(|o| matches!(o, Output::Window(_)))
            .count();
        println!(
            "emission/{name}: {results} window results from {} events",
            emission_events.len()
        );
        g.throughput(Throughput::Elements(results as u64));
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut run = fresh(&cfg, true);
                    ingest(&mut run, &emission_events);
                    (run, Vec::with_capacity(results + 16))
                },
                |(mut run, mut out)| {
                    run.engine.finish(&mut out).expect("finish");
                    black_box(out.len());
                    (run, out)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("end_to_end");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(n as u64));
    for (name, window) in [windows()[0], windows()[3]] {
        let cfg = config(window);
        let mut probe = fresh(&cfg, false);
        let results = ingest(&mut probe, &evs);
        println!("end_to_end/{name}: {results} window results from {n} events while streaming");
        g.bench_function(name, |b| {
            b.iter_batched(
                || fresh(&cfg, false),
                |mut run| {
                    black_box(ingest(&mut run, &evs));
                    run
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Where ingest time goes, per window spec, in one run: the engine's own
/// work per event (`process`), encoding the state changes at each
/// checkpoint (`snapshot`, also on the engine's task in the pipeline) and
/// writing them to RocksDB (`commit`, on the pipeline's committer thread).
fn breakdown() {
    let n = events_from_env();
    let evs = events(n);
    println!("\ningest breakdown, {n} events, checkpoint every {CHECKPOINT_EVERY}:");
    println!(
        "{:>14} {:>10} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "window", "process", "snapshot", "commit", "total", "ops", "engine ev/s"
    );
    for (name, window) in windows() {
        let cfg = config(window);
        let mut run = fresh(&cfg, true);
        let mut out = Vec::with_capacity(4096);
        let (mut process, mut snapshot, mut commit) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut ops = 0;
        for chunk in evs.chunks(CHECKPOINT_EVERY) {
            let started = Instant::now();
            for e in chunk {
                run.engine.process(e, 0, &mut out).expect("process");
                if out.len() >= 4096 {
                    out.clear();
                }
            }
            process += started.elapsed();
            run.checkpoint += 1;
            let started = Instant::now();
            let delta = run.engine.snapshot(run.checkpoint).expect("snapshot");
            snapshot += started.elapsed();
            ops += delta.len();
            let started = Instant::now();
            let last = chunk.last().map(|e| e.position.clone());
            run.store
                .commit(run.checkpoint, delta, last.as_slice())
                .expect("commit");
            run.engine.committed(run.checkpoint);
            commit += started.elapsed();
        }
        let engine = process + snapshot;
        println!(
            "{name:>14} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms {ops:>12} {:>14.0}",
            process.as_secs_f64() * 1e3,
            snapshot.as_secs_f64() * 1e3,
            commit.as_secs_f64() * 1e3,
            (engine + commit).as_secs_f64() * 1e3,
            n as f64 / engine.as_secs_f64()
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    if std::env::args().all(|a| a != "--list") {
        breakdown();
    }
    Criterion::default().configure_from_args().final_summary();
}
