//! Embedded ONNX models (tract) against the same model behind `serve-model`
//! over HTTP (issue 23): the 100-tree GradientBoostingClassifier
//! (`gbm.onnx`: skl2onnx TreeEnsembleClassifier, 100 trees of depth 3) and
//! the MLP (`mlp.onnx`: 4 → 16 → 8 → 1, MatMul/Add/Relu/Sigmoid) of
//! tests/fixtures/onnx/, at `max_batch` 1, 32 and 256.
//!
//! The unit is **records per CPU-second** (records/s per core): criterion
//! runs with a measurement that reads the process's CPU clock
//! (`CLOCK_PROCESS_CPUTIME_ID`: every thread, the tokio workers, the
//! blocking pool and, for HTTP, the in-process server) instead of the wall
//! clock, which on a shared 2-core machine measures the neighbours too.
//! Records are made before each timed iteration (`iter_batched`), so their
//! construction is not counted.
//!
//! - `onnx/tract/{gbm,mlp}/{1,32,256}`: the model alone,
//!   `EmbeddedModel::score_batch` on the calling thread (input tensor,
//!   tract's plan, one JSON prediction per row);
//! - `onnx/embedded/…`: through the micro-batcher as a pipeline runs it
//!   (`max_in_flight = 4`, `max_wait = 1ms`, each batch one tensor on the
//!   blocking pool);
//! - `onnx/http/…`: the same batcher with `backend = "sagemaker"` (AWS SDK,
//!   SigV4, JSON `{"instances": …}`) against `serve-model`'s router serving
//!   the same `.onnx` on 127.0.0.1, in this process: the CPU counted is the
//!   client's and the server's.
//!
//! After criterion, a report (not in `--test` or `--list` mode) splits the
//! HTTP path's CPU into client and server (the server runs on its own
//! runtime, threads named `model-server`, read from /proc/self/task) and
//! measures the wall-clock latency of one batch at a time (p50, p99):
//! `Model::predict` called directly, one call in flight.
//! `SHARDFLOW_BENCH_NO_REPORT=1` skips it.
//!
//! Run: `RUST_LIB_BACKTRACE=0 cargo bench --bench onnx` (release profile;
//! add `-- --warm-up-time 1 --measurement-time 5` for a short run). With
//! error backtraces on (`RUST_BACKTRACE=1` and no `RUST_LIB_BACKTRACE=0`)
//! the tree model is 2.5× slower: tract makes an error per tree per row.

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/cpu.rs"]
mod cpu;
#[path = "../tests/inference_support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpu::{process_cpu_ns, threads_cpu_ns, ProcessCpu};
use criterion::{criterion_group, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use shardflow::config::Config;
use shardflow::inference::{self, Scorer};
use shardflow::record::{FeatureRecord, FeatureVector};
use support::*;

const MODELS: [&str; 2] = ["gbm", "mlp"];
const BATCHES: [usize; 3] = [1, 32, 256];
/// Name of the in-process model server's threads (at most 15 bytes).
const SERVER_THREAD: &str = "model-server";

/// Set when criterion runs for real (`--bench` without `--test`): in test
/// mode (`cargo test --benches`, a debug build where tract is some 1000×
/// slower) every routine runs once over a few records.
static BENCHMARKING: AtomicBool = AtomicBool::new(false);

/// Records per timed iteration: at least two batches of 256; fewer for
/// the tree model (tract 0.23 scores it at about 0.5 ms per row, see the
/// README) and for one HTTP request per record.
fn records_per_iteration(model: &str, max_batch: usize, http: bool) -> usize {
    if !BENCHMARKING.load(Ordering::Relaxed) {
        64
    } else if model == "gbm" {
        512
    } else if http && max_batch == 1 {
        1024
    } else {
        4096
    }
}

// ---- setup ------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn fixture(model: &str) -> String {
    repo(&format!("tests/fixtures/onnx/{model}.toml"))
}

fn batcher_settings(max_batch: usize) -> String {
    format!("max_batch = {max_batch}\nmax_wait = \"1ms\"\nmax_in_flight = 4")
}

fn embedded(model: &str, max_batch: usize) -> Config {
    config(
        &format!(
            "backend = \"embedded\"\nmodel = \"{}\"\n{}",
            fixture(model),
            batcher_settings(max_batch)
        ),
        "",
        default_sinks(),
    )
}

fn http(url: &str, max_batch: usize) -> Config {
    config(
        &sagemaker(url, &batcher_settings(max_batch)),
        "",
        default_sinks(),
    )
}

/// `serve-model`'s router for `model`, on 127.0.0.1 in its own runtime
/// (threads named [`SERVER_THREAD`]), as `shardflow serve-model` serves it.
struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    // Dropped last: the runtime the server runs on.
    _rt: tokio::runtime::Runtime,
}

impl Server {
    fn start(model: &str) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(SERVER_THREAD)
            // No blocking thread exits while we count the server's CPU
            // (serve-model scores with block_in_place).
            .thread_keep_alive(Duration::from_secs(3600))
            .enable_all()
            .build()
            .unwrap();
        let cfg = embedded(model, 32);
        let loaded = inference::load_embedded(&cfg, cfg.inference.model.as_ref().unwrap())
            .expect("model loads");
        let router =
            shardflow::serve::model::router(loaded, inference::feature_names(&cfg), "AllTraffic")
                .expect("router");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let url = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(shardflow::serve::serve_on(listener, router, async move {
                let _ = stopped.await;
            }));
            url
        });
        Server {
            url,
            stop: Some(stop),
            _rt: rt,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn ready_scorer(rt: &tokio::runtime::Runtime, cfg: &Config) -> Arc<Scorer> {
    let s = scorer(cfg);
    rt.block_on(s.ready()).expect("scorer ready");
    s
}

fn check(out: &[shardflow::record::Output], n: usize) {
    let (predictions, dead) = split(out);
    assert!(
        dead.is_empty(),
        "dead letters: {:?}",
        &dead[..dead.len().min(3)]
    );
    assert_eq!(predictions.len(), n);
}

// ---- criterion --------------------------------------------------------------

fn throughput(c: &mut Criterion<ProcessCpu>) {
    let rt = runtime();
    let mut group = c.benchmark_group("onnx");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);

    // The model alone, on this thread.
    for model in MODELS {
        let cfg = embedded(model, 1);
        let loaded = inference::load_embedded(&cfg, cfg.inference.model.as_ref().unwrap()).unwrap();
        for max_batch in BATCHES {
            let n = records_per_iteration(model, max_batch, false);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("tract/{model}"), max_batch),
                &max_batch,
                |b, &max_batch| {
                    b.iter_batched(
                        || records(n, 64),
                        |records| {
                            let rows: Vec<&FeatureVector> =
                                records.iter().map(|r| &r.features).collect();
                            let mut scored = 0;
                            for batch in rows.chunks(max_batch) {
                                scored += loaded.score_batch(batch).unwrap().len();
                            }
                            assert_eq!(scored, n);
                        },
                        BatchSize::PerIteration,
                    )
                },
            );
        }
    }

    // Through the batcher: embedded, then over HTTP.
    for model in MODELS {
        let server = Server::start(model);
        for (backend, is_http) in [("embedded", false), ("http", true)] {
            for max_batch in BATCHES {
                let cfg = if is_http {
                    http(&server.url, max_batch)
                } else {
                    embedded(model, max_batch)
                };
                let scorer = ready_scorer(&rt, &cfg);
                let n = records_per_iteration(model, max_batch, is_http);
                group.throughput(Throughput::Elements(n as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{backend}/{model}"), max_batch),
                    &max_batch,
                    |b, _| {
                        b.iter_batched(
                            || records(n, 64),
                            |records| {
                                let out =
                                    rt.block_on(run_batcher(scorer.clone(), &cfg, records, 512));
                                check(&out, n);
                                out
                            },
                            BatchSize::PerIteration,
                        )
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ProcessCpu);
    targets = throughput
}

// ---- report -----------------------------------------------------------------

/// Batcher runs summed: records, wall ns, process CPU ns, and the CPU ns
/// of the server's threads (`None` where /proc cannot tell).
#[derive(Default)]
struct Runs {
    records: usize,
    wall_ns: u64,
    cpu_ns: u64,
    server_cpu_ns: Option<u64>,
}

impl Runs {
    fn wall_rate(&self) -> f64 {
        self.records as f64 / (self.wall_ns as f64 / 1e9)
    }
    fn cpu_rate(&self) -> f64 {
        self.records as f64 / (self.cpu_ns as f64 / 1e9)
    }
    /// Records per CPU-second of the client (all but the server's threads)
    /// and of the server.
    fn split(&self) -> Option<(f64, f64)> {
        let s = self.server_cpu_ns.filter(|s| *s > 0 && *s < self.cpu_ns)?;
        let n = self.records as f64;
        Some((n / ((self.cpu_ns - s) as f64 / 1e9), n / (s as f64 / 1e9)))
    }
}

/// Runs of `n` records through the batcher, one untimed first, then
/// timed ones for at least 1 s of wall time (at least 3 runs).
fn batcher_runs(
    rt: &tokio::runtime::Runtime,
    scorer: &Arc<Scorer>,
    cfg: &Config,
    n: usize,
) -> Runs {
    check(
        &rt.block_on(run_batcher(scorer.clone(), cfg, records(n, 64), 512)),
        n,
    );
    let mut total = Runs {
        server_cpu_ns: Some(0),
        ..Runs::default()
    };
    let mut runs = 0;
    while runs < 3 || total.wall_ns < 1_000_000_000 {
        let input = records(n, 64);
        let server0 = threads_cpu_ns(SERVER_THREAD);
        let cpu0 = process_cpu_ns();
        let t0 = Instant::now();
        let out = rt.block_on(run_batcher(scorer.clone(), cfg, input, 512));
        let wall = t0.elapsed().as_nanos() as u64;
        let cpu = process_cpu_ns() - cpu0;
        let server = match (server0, threads_cpu_ns(SERVER_THREAD)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        check(&out, n);
        total.records += n;
        total.wall_ns += wall;
        total.cpu_ns += cpu;
        total.server_cpu_ns = total.server_cpu_ns.zip(server).map(|(a, b)| a + b);
        runs += 1;
    }
    total
}

/// Wall-clock time of one `predict` of `max_batch` rows, one call at a
/// time, for about 2 s (10 to 2000 calls): (p50, p99) in µs, CPU µs per
/// call (all threads) and the number of calls.
fn batch_latency(
    rt: &tokio::runtime::Runtime,
    scorer: &Arc<Scorer>,
    max_batch: usize,
) -> (f64, f64, f64, usize) {
    let input: Vec<FeatureRecord> = records(max_batch, 64);
    let rows: Vec<&FeatureVector> = input.iter().map(|r| &r.features).collect();
    let model = scorer.primary.model().clone();
    rt.block_on(async {
        for _ in 0..5 {
            model.predict(&rows).await.unwrap();
        }
        let mut took = Vec::new();
        let cpu0 = process_cpu_ns();
        let start = Instant::now();
        while took.len() < 10 || (took.len() < 2000 && start.elapsed() < Duration::from_secs(2)) {
            let t = Instant::now();
            let p = model.predict(&rows).await.unwrap();
            took.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(p.predictions.len(), max_batch);
        }
        let cpu = (process_cpu_ns() - cpu0) as f64 / 1e3 / took.len() as f64;
        took.sort_by(f64::total_cmp);
        let q = |p: f64| took[((took.len() - 1) as f64 * p) as usize];
        (q(0.5), q(0.99), cpu, took.len())
    })
}

fn report() {
    let rt = runtime();
    println!(
        "\nonnx report. Throughput: batcher runs for >= 1 s (max_in_flight = 4), rec/CPU-s over \
         every thread of the process (http: client + in-process server, then each alone). \
         Latency: one predict() of one batch at a time, wall clock, ~2 s per cell."
    );
    println!(
        "{:<4} {:>5} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5}/h",
        "",
        "batch",
        "emb r/Cs",
        "emb r/s",
        "p50 µs",
        "p99 µs",
        "CPU µs",
        "http r/Cs",
        "client",
        "server",
        "http r/s",
        "p50 µs",
        "p99 µs",
        "CPU µs",
        "calls e"
    );
    for model in MODELS {
        let server = Server::start(model);
        for max_batch in BATCHES {
            let e_cfg = embedded(model, max_batch);
            let e = ready_scorer(&rt, &e_cfg);
            let e_run = batcher_runs(
                &rt,
                &e,
                &e_cfg,
                records_per_iteration(model, max_batch, false),
            );
            let (e50, e99, ecpu, ecalls) = batch_latency(&rt, &e, max_batch);

            let h_cfg = http(&server.url, max_batch);
            let h = ready_scorer(&rt, &h_cfg);
            let h_run = batcher_runs(
                &rt,
                &h,
                &h_cfg,
                records_per_iteration(model, max_batch, true),
            );
            let (h50, h99, hcpu, calls) = batch_latency(&rt, &h, max_batch);
            let (client, server_side) = match h_run.split() {
                Some((c, s)) => (format!("{c:.0}"), format!("{s:.0}")),
                None => ("?".into(), "?".into()),
            };
            println!(
                "{model:<4} {max_batch:>5} | {:>8.0} {:>8.0} {e50:>8.1} {e99:>8.1} {ecpu:>8.1} | {:>8.0} {client:>8} {server_side:>8} {:>8.0} {h50:>8.1} {h99:>8.1} {hcpu:>8.1} {ecalls:>5}/{calls}",
                e_run.cpu_rate(),
                e_run.wall_rate(),
                h_run.cpu_rate(),
                h_run.wall_rate()
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking =
        args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");
    BENCHMARKING.store(benchmarking, Ordering::Relaxed);
    if benchmarking
        && std::backtrace::Backtrace::capture().status()
            == std::backtrace::BacktraceStatus::Captured
    {
        // tract 0.23's tree ensemble makes an anyhow error for every tree
        // of every row (a leaf read as an invalid comparison); with
        // backtraces on, each captures one: the gbm figures drop 2.5×.
        eprintln!(
            "note: RUST_BACKTRACE/RUST_LIB_BACKTRACE turn on error backtraces; the gbm figures \
             are then ~2.5x lower than a default run (set RUST_LIB_BACKTRACE=0)"
        );
    }
    benches();
    if benchmarking && std::env::var_os("SHARDFLOW_BENCH_NO_REPORT").is_none() {
        report();
    }
    Criterion::default().configure_from_args().final_summary();
}
