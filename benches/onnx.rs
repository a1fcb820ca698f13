//! Embedded ONNX models (tract) scoring through the micro-batcher, as a
//! pipeline runs them: the 100-tree GradientBoostingClassifier and the MLP
//! of tests/fixtures/onnx/, `max_batch` 1, 32 and 256 (`max_in_flight = 4`,
//! each batch one tensor on the blocking pool).
//!
//! - `onnx_throughput/{gbm,mlp}/{1,32,256}`: records per second.
//!
//! Run: `cargo bench --bench onnx` (release profile).

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/inference_support/mod.rs"]
mod support;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::*;

/// Records per measured iteration: enough for several batches of 256.
const RECORDS: usize = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn embedded(model: &str, max_batch: usize) -> shardflow::config::Config {
    config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"\nmax_batch = {max_batch}\nmax_wait = \"1ms\"\nmax_in_flight = 4",
            repo(&format!("tests/fixtures/onnx/{model}.toml"))
        ),
        "",
        default_sinks(),
    )
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("onnx_throughput");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    for model in ["gbm", "mlp"] {
        for max_batch in [1, 32, 256] {
            let cfg = embedded(model, max_batch);
            let scorer = scorer(&cfg);
            group.bench_with_input(BenchmarkId::new(model, max_batch), &max_batch, |b, _| {
                b.iter(|| {
                    // `records` has a null amount_sum_1m every 11th
                    // record: both fixtures impute it.
                    let out =
                        rt.block_on(run_batcher(scorer.clone(), &cfg, records(RECORDS, 64), 512));
                    assert_eq!(out.len(), RECORDS);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
