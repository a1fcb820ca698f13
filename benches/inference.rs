//! Micro-batching against a model server that adds 2 ms per request
//! (serve-model's router behind the tests' fault-injection layer, on
//! 127.0.0.1, called through the AWS SDK exactly as SageMaker is).
//!
//! - `inference_throughput/per_record` vs `…/batch_32`: records per second
//!   with `max_batch = 1` and `max_batch = 32`, both with `max_in_flight = 4`.
//! - After the criterion groups, a latency report: events offered at 1 k/s
//!   and 10 k/s, time from entering the batcher to leaving it (p50, p99),
//!   per-record vs batched.
//!
//! Run: `make bench` or
//! `cargo bench --bench inference` (release profile).

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/inference_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use shardflow::flow::{Barrier, Message};
use shardflow::inference::batcher;
use shardflow::record::Output;
use support::*;
use tokio::sync::mpsc;

const DELAY: Duration = Duration::from_millis(2);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn embedded() -> shardflow::config::Config {
    config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"",
            repo("config/models/fraud.toml")
        ),
        "",
        default_sinks(),
    )
}

fn remote(url: &str, max_batch: usize, max_wait: &str) -> shardflow::config::Config {
    config(
        &sagemaker(
            url,
            &format!("max_batch = {max_batch}\nmax_wait = \"{max_wait}\"\nmax_in_flight = 4"),
        ),
        "",
        default_sinks(),
    )
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(FaultServer::start(&embedded()));
    server.delay(DELAY);
    let n = 512;
    let mut group = c.benchmark_group("inference_throughput");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (label, max_batch) in [("per_record", 1), ("batch_32", 32)] {
        let cfg = remote(&server.url, max_batch, "5ms");
        let scorer = scorer(&cfg);
        group.bench_with_input(BenchmarkId::new(label, n), &n, |b, &n| {
            b.iter(|| {
                let out = rt.block_on(run_batcher(scorer.clone(), &cfg, records(n, 97), 256));
                assert_eq!(out.len(), n);
            })
        });
    }
    group.finish();
    drop(server);
}

/// Offers `rate` events/s for `secs` and returns the p50 and p99 time each
/// spent in the batcher (closing its batch, the model call, in-order emission).
async fn latency(
    scorer: Arc<shardflow::inference::Scorer>,
    cfg: &shardflow::config::Config,
    rate: u64,
    secs: u64,
) -> (f64, f64, f64) {
    let total = (rate * secs) as usize;
    let (in_tx, in_rx) = mpsc::channel(1024);
    let (out_tx, mut out_rx) = mpsc::channel(1024);
    let task = tokio::spawn(batcher::run(
        scorer,
        cfg.inference.clone(),
        false,
        in_rx,
        out_tx,
    ));
    let sent: Arc<Vec<std::sync::OnceLock<Instant>>> =
        Arc::new((0..total).map(|_| std::sync::OnceLock::new()).collect());
    let sent2 = sent.clone();
    let feeder = tokio::spawn(async move {
        let input = records(total, 997);
        let per_ms = (rate / 1000).max(1) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(1000 * per_ms as u64 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut it = input.into_iter().enumerate().peekable();
        while it.peek().is_some() {
            tick.tick().await;
            let now = Instant::now();
            let batch: Vec<Output> = it
                .by_ref()
                .take(per_ms)
                .map(|(i, r)| {
                    let _ = sent2[i].set(now);
                    Output::Features(r)
                })
                .collect();
            if in_tx.send(Message::Batch(batch)).await.is_err() {
                return;
            }
        }
        let _ = in_tx
            .send(Message::Barrier(Barrier {
                id: 1,
                positions: Vec::new(),
                end_of_input: true,
                last: true,
                ..Barrier::default()
            }))
            .await;
    });
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(total);
    while let Some(m) = out_rx.recv().await {
        match m {
            Message::Batch(b) => {
                let now = Instant::now();
                for o in b {
                    if let Output::Prediction(p) = o {
                        let i: usize = p.features.id[2..].parse().unwrap();
                        latencies.push((now - *sent[i].get().unwrap()).as_secs_f64() * 1e3);
                    }
                }
            }
            Message::Barrier(b) if b.last => break,
            Message::Barrier(_) => {}
        }
    }
    let achieved = latencies.len() as f64 / started.elapsed().as_secs_f64();
    feeder.await.unwrap();
    drop(out_rx);
    task.await.unwrap().unwrap();
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    (q(0.5), q(0.99), achieved)
}

fn latency_report() {
    let rt = runtime();
    let server = rt.block_on(FaultServer::start(&embedded()));
    server.delay(DELAY);
    println!(
        "\nadded latency (server adds {} ms per request, max_in_flight = 4):",
        DELAY.as_millis()
    );
    println!(
        "{:>10} {:>22} {:>10} {:>10} {:>12}",
        "offered/s", "mode", "p50 ms", "p99 ms", "achieved/s"
    );
    for rate in [1_000u64, 10_000] {
        for (label, max_batch, wait) in [
            ("per-record", 1, "1ms"),
            ("max_batch=32 wait=5ms", 32, "5ms"),
        ] {
            let cfg = remote(&server.url, max_batch, wait);
            let scorer = scorer(&cfg);
            // Per-record at 10 k/s cannot keep up (4 in flight / 2 ms = 2 k/s):
            // offer one second only, or the backlog dominates.
            let secs = if max_batch == 1 && rate > 2_000 { 1 } else { 3 };
            let (p50, p99, achieved) = rt.block_on(latency(scorer, &cfg, rate, secs));
            println!("{rate:>10} {label:>22} {p50:>10.2} {p99:>10.2} {achieved:>12.0}");
        }
    }
}

criterion_group!(benches, throughput);

fn main() {
    benches();
    latency_report();
    Criterion::default().configure_from_args().final_summary();
}
