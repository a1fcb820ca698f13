//! The `dynamodb` sink (issue 22) against the embedded DynamoDB emulator
//! the tests use (dynoxide: SQLite in memory, on 127.0.0.1), so the numbers
//! are shardflow's cost plus the emulator's, not a network's or DynamoDB's.
//!
//! One iteration is one checkpoint: 10,000 feature outputs over 1,000 keys
//! handed to the sink, then the barrier's flush, which writes the newest
//! output of each key (1,000 items).
//!
//! - `dynamodb_sink/conditional`: conditional `PutItem`s, 16 in flight,
//!   each newer than the stored item (all written);
//! - `dynamodb_sink/conditional_older`: the same puts with older event
//!   times (a replay): every condition fails, nothing is written;
//! - `dynamodb_sink/batch`: `BatchWriteItem`s of 25, 16 in flight.
//!
//! Throughput is in items per second. Afterwards each mode prints its
//! write requests per 1,000 events, from the sink's own counts, beside what
//! writing every event would cost.
//!
//! Run: `cargo bench --bench dynamodb_sink` (release profile);
//! `SHARDFLOW_BENCH_EVENTS` and `SHARDFLOW_BENCH_KEYS` change the shape,
//! `SHARDFLOW_BENCH_CONCURRENCY` the requests in flight (default 16).

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/dynamo/mod.rs"]
mod dynamo;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{KeyType, ScalarAttributeType};
use criterion::{criterion_group, Criterion, Throughput};
use shardflow::config::{DynamoDbSinkConfig, WriteMode};
use shardflow::record::{FeatureRecord, FeatureVector, Output, OutputKind, Value};
use shardflow::sink::dynamodb::{DynamoDbSink, DynamoDbSinkStats};
use shardflow::sink::Sink;

const T0: i64 = 1_700_000_000_000;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The outputs of one checkpoint: `events` over `keys` keys, event times
/// from `t0`, with four features each (count, sum, max, a missing one).
fn outputs(events: usize, keys: usize, t0: i64) -> Vec<Output> {
    let names: Vec<Arc<str>> = [
        "txn_count_1m",
        "amount_sum_1m",
        "amount_max_5m",
        "merchants_5m",
    ]
    .map(Arc::from)
    .into();
    let names: Arc<[Arc<str>]> = names.into();
    (0..events)
        .map(|i| {
            Output::Features(FeatureRecord {
                id: format!("shardId-000000000000/{}", t0 + i as i64),
                key: format!("user-{}", (i * 7919) % keys).into(),
                event_time: t0 + i as i64,
                features: FeatureVector {
                    names: names.clone(),
                    values: vec![
                        Some(Value::Int((i / keys) as i64 + 1)),
                        Some(Value::Float(i as f64 * 1.25)),
                        Some(Value::Float(99.5)),
                        None,
                    ],
                },
                arrival: 0,
            })
        })
        .collect()
}

fn sink_config(endpoint: &str, table: &str, write_mode: WriteMode) -> DynamoDbSinkConfig {
    let concurrency = knob("SHARDFLOW_BENCH_CONCURRENCY", 16).clamp(1, 256);
    DynamoDbSinkConfig {
        table: table.into(),
        key_attribute: "userId".into(),
        kinds: vec![OutputKind::Features],
        write_mode,
        concurrency,
        max_attempts: 3,
        request_timeout: shardflow::time::Duration::from_millis(10_000),
        max_buffered_keys: 100_000,
        endpoint_url: Some(endpoint.into()),
        region: None,
    }
}

/// Writes one checkpoint's outputs and flushes; the time of both.
async fn checkpoint(sink: &mut DynamoDbSink, outputs: &[Output], id: u64) -> Duration {
    let refs: Vec<&Output> = outputs.iter().collect();
    let started = Instant::now();
    sink.write(&refs).await.expect("write");
    sink.checkpoint(id, false).await.expect("checkpoint");
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let events = knob("SHARDFLOW_BENCH_EVENTS", 10_000);
    let keys = knob("SHARDFLOW_BENCH_KEYS", 1_000).clamp(1, events.max(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(dynamo::DynamoServer::start());
    let modes = [
        ("conditional", WriteMode::Conditional, false),
        ("conditional_older", WriteMode::Conditional, true),
        ("batch", WriteMode::Batch, false),
    ];
    let mut group = c.benchmark_group("dynamodb_sink");
    group.throughput(Throughput::Elements(keys as u64));
    group.sample_size(10);
    let mut report = Vec::new();
    for (name, mode, older) in modes {
        let table = format!("features-{name}");
        let mut sink = rt.block_on(async {
            let keys = &[("userId", KeyType::Hash, ScalarAttributeType::S)];
            server.create_table(&table, keys).await;
            DynamoDbSink::connect(sink_config(&server.url(), &table, mode))
                .await
                .expect("the sink connects")
        });
        // Far newer than anything `older` writes: those puts all fail.
        if older {
            rt.block_on(checkpoint(&mut sink, &outputs(events, keys, T0 * 2), 1));
        }
        let mut round: i64 = 1;
        let mut next_time = move || {
            round += 1;
            if older {
                T0 - round * events as i64
            } else {
                T0 + round * events as i64
            }
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = outputs(events, keys, next_time());
                    total += rt.block_on(checkpoint(&mut sink, &batch, 2));
                }
                total
            })
        });
        // One more checkpoint, counted.
        let before = sink.stats();
        let batch = outputs(events, keys, next_time());
        let took = rt.block_on(checkpoint(&mut sink, &batch, 3));
        report.push((name, mode, diff(sink.stats(), before), took));
    }
    group.finish();
    let per_1000 = |n: u64| n as f64 * 1000.0 / events as f64;
    for (name, mode, s, took) in report {
        let uncoalesced = match mode {
            WriteMode::Conditional => events as f64,
            WriteMode::Batch => events.div_ceil(25) as f64,
        };
        println!(
            "[dynamodb_sink] {name}: {events} events over {keys} keys per checkpoint -> {} items written, {} stale, {} write requests ({:.1} per 1,000 events; {:.1} without coalescing), {} retries, {:.0} items/s in this checkpoint",
            s.items,
            s.stale,
            s.requests,
            per_1000(s.requests),
            uncoalesced * 1000.0 / events as f64,
            s.retries,
            (s.items + s.stale) as f64 / took.as_secs_f64(),
        );
    }
}

fn diff(after: DynamoDbSinkStats, before: DynamoDbSinkStats) -> DynamoDbSinkStats {
    DynamoDbSinkStats {
        items: after.items - before.items,
        requests: after.requests - before.requests,
        stale: after.stale - before.stale,
        retries: after.retries - before.retries,
        coalesced: after.coalesced - before.coalesced,
        skipped: after.skipped - before.skipped,
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
