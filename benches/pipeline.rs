//! The whole pipeline per core (issue 24): `pipeline::run`, the code
//! `shardflow run` runs (file source → decode → window engine over RocksDB
//! → file sink → committer, a checkpoint every 10 s, on a 2-worker tokio
//! runtime with the Prometheus recorder installed, as the binary does).
//!
//! Workload (written once, before anything is measured): 1 M NDJSON events
//! (`SHARDFLOW_BENCH_EVENTS` scales it), 100 k integer keys drawn
//! uniformly, event time advancing 1 ms per event with up to 5 s of
//! disorder (`max_out_of_orderness = "5s"`: nothing is late), `amount`
//! uniform in [0, 1000); count + sum + max of `amount` per key.
//!
//! - `pipeline/tumbling_1m`, `pipeline/sliding_1m_10s`: window results to
//!   an NDJSON file (no sink takes per-event vectors);
//! - `pipeline/features_tumbling_1m`, `pipeline/features_sliding_1h_10s`:
//!   per-event feature vectors to an NDJSON file (no window results).
//!
//! Criterion times each run on the wall clock (events/s). Each run also
//! reads the process's CPU clock (every thread: tokio workers, the engine
//! and sink threads, RocksDB's) and its peak resident set (VmHWM, reset
//! before each run), and prints them; a table of medians per job follows
//! criterion's output. CPU-seconds per million events is the figure that
//! holds on a noisy machine: on 2 shared cores the wall clock measures the
//! neighbours too.
//!
//! Run: `cargo bench --bench pipeline` (release profile; one job:
//! `cargo bench --bench pipeline -- tumbling_1m`).

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/cpu.rs"]
mod cpu;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use shardflow::config::Config;
use shardflow::flow::Stats;
use shardflow::pipeline::{self, RunOptions};

const T0: i64 = 1_700_000_000_000;
const KEYS: u64 = 100_000;

/// The run's event count: `SHARDFLOW_BENCH_EVENTS`, else 1 M when
/// criterion runs for real (`--bench` without `--test`) and a few thousand
/// in test mode (`cargo test --benches`, a debug build).
fn events_from_env() -> usize {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    std::env::var("SHARDFLOW_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 1_000_000 } else { 2_000 })
}

/// The workload as NDJSON lines: `{"userId":K,"ts":T,"amount":A}`.
fn write_workload(path: &Path, n: usize) {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).expect("workload file"));
    for i in 0..n {
        let key = next() % KEYS;
        let t = T0 + i as i64 - (next() % 5_000) as i64;
        // Uniform in [0, 1000) with two decimals.
        let cents = next() % 100_000;
        writeln!(
            w,
            "{{\"userId\":{key},\"ts\":{t},\"amount\":{}.{:02}}}",
            cents / 100,
            cents % 100
        )
        .expect("writing the workload");
    }
    w.flush().expect("writing the workload");
}

struct Job {
    name: &'static str,
    window: &'static str,
    kinds: &'static str,
}

fn jobs() -> [Job; 4] {
    let tumbling = r#"{ type = "tumbling", size = "1m" }"#;
    [
        Job {
            name: "tumbling_1m",
            window: tumbling,
            kinds: "window",
        },
        Job {
            name: "sliding_1m_10s",
            window: r#"{ type = "sliding", size = "1m", slide = "10s" }"#,
            kinds: "window",
        },
        Job {
            name: "features_tumbling_1m",
            window: tumbling,
            kinds: "features",
        },
        Job {
            name: "features_sliding_1h_10s",
            window: r#"{ type = "sliding", size = "1h", slide = "10s" }"#,
            kinds: "features",
        },
    ]
}

fn config_text(job: &Job, input: &Path, dir: &Path) -> String {
    let features: String = [
        ("count", None),
        ("sum", Some("amount")),
        ("max", Some("amount")),
    ]
    .iter()
    .map(|(agg, field)| {
        format!(
            "[[features]]\nname = \"amount_{agg}\"\nagg = \"{agg}\"\n{}window = {}\n\n",
            field
                .map(|f| format!("field = \"{f}\"\n"))
                .unwrap_or_default(),
            job.window
        )
    })
    .collect();
    format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "10s"

[source]
type = "file"
path = "{input}"

[schema]
key = "userId"
timestamp = "ts"
fields = {{ amount = "f64" }}

[watermark]
max_out_of_orderness = "5s"

{features}
[[sinks]]
type = "file"
path = "{dir}/out.ndjson"
kinds = ["{kinds}"]
"#,
        dir = dir.display(),
        input = input.display(),
        kinds = job.kinds,
    )
}

/// Peak resident set since the last reset (Linux; 0 where unknown).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Makes the next [`peak_rss_bytes`] start from the current resident set.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One run's figures.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    /// `cpu` split: user and system time.
    user: Duration,
    system: Duration,
    peak_rss: u64,
}

struct Bench {
    runtime: tokio::runtime::Runtime,
    _root: tempfile::TempDir,
    input: PathBuf,
    events: usize,
}

impl Bench {
    fn new() -> Bench {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // As `shardflow run` with its default --metrics-addr: the counters
        // and histograms the stages update are live.
        let _ = shardflow::telemetry::install_metrics();
        let root = tempfile::tempdir().expect("tempdir");
        let input = root.path().join("events.ndjson");
        let events = events_from_env();
        let started = Instant::now();
        write_workload(&input, events);
        eprintln!(
            "workload: {events} events, {:.0} MB of NDJSON, written in {:.1}s",
            std::fs::metadata(&input).map_or(0, |m| m.len()) as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        Bench {
            runtime,
            _root: root,
            input,
            events,
        }
    }

    /// One run of `job` from empty state; the state and output are removed
    /// afterwards, untimed.
    fn run(&self, job: &Job) -> Sample {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bench.toml");
        std::fs::write(&path, config_text(job, &self.input, dir.path())).expect("config");
        let config = Config::load(&path).expect("bench config");
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        reset_peak_rss();
        let cpu0 = cpu::process_cpu_ns();
        let (user0, system0) = cpu::process_user_system_ns();
        let started = Instant::now();
        let summary = self
            .runtime
            .block_on(pipeline::run(
                config,
                RunOptions::default(),
                shutdown,
                Arc::new(Stats::default()),
            ))
            .expect("pipeline run");
        let wall = started.elapsed();
        let cpu = Duration::from_nanos(cpu::process_cpu_ns() - cpu0);
        let (user1, system1) = cpu::process_user_system_ns();
        let user = Duration::from_nanos(user1.saturating_sub(user0));
        let system = Duration::from_nanos(system1.saturating_sub(system0));
        let peak_rss = peak_rss_bytes();
        assert_eq!(summary.records_in as usize, self.events);
        assert_eq!(summary.dead_letters, 0);
        let out = std::fs::metadata(dir.path().join("out.ndjson")).map_or(0, |m| m.len());
        let s = Sample {
            wall,
            cpu,
            user,
            system,
            peak_rss,
        };
        eprintln!(
            "{}: {} events in {:.2}s = {:.0} events/s; {:.2} CPU-s per 1 M events (user {:.2}, system {:.2}; {:.2} cores busy); peak RSS {} MiB; {:.0} MB written",
            job.name,
            self.events,
            wall.as_secs_f64(),
            self.events as f64 / wall.as_secs_f64(),
            per_million(cpu, self.events),
            per_million(user, self.events),
            per_million(system, self.events),
            cpu.as_secs_f64() / wall.as_secs_f64(),
            peak_rss >> 20,
            out as f64 / 1e6
        );
        s
    }
}

fn per_million(d: Duration, events: usize) -> f64 {
    d.as_secs_f64() * 1e6 / events as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

type Samples = Arc<Mutex<Vec<(&'static str, Sample)>>>;

fn bench_with(c: &mut Criterion, samples: &Samples) {
    let b = Bench::new();
    let mut g = c.benchmark_group("pipeline");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(b.events as u64));
    for job in jobs() {
        g.bench_function(job.name, |bencher| {
            bencher.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let s = b.run(&job);
                    samples.lock().unwrap().push((job.name, s));
                    total += s.wall;
                }
                total
            })
        });
    }
    g.finish();
    let samples = samples.lock().unwrap();
    if samples.is_empty() {
        return;
    }
    println!(
        "\npipeline, {} events, medians over every run (warm-up included):",
        b.events
    );
    println!(
        "{:>24} {:>5} {:>12} {:>16} {:>8} {:>8} {:>14}",
        "job", "runs", "events/s", "CPU-s per 1 M", "user", "system", "peak RSS MiB"
    );
    for job in jobs() {
        let mine: Vec<Sample> = samples
            .iter()
            .filter(|(n, _)| *n == job.name)
            .map(|(_, s)| *s)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let per_1m = |f: fn(&Sample) -> Duration| {
            median(mine.iter().map(|s| per_million(f(s), b.events)).collect())
        };
        println!(
            "{:>24} {:>5} {:>12.0} {:>16.3} {:>8.3} {:>8.3} {:>14.0}",
            job.name,
            mine.len(),
            median(
                mine.iter()
                    .map(|s| b.events as f64 / s.wall.as_secs_f64())
                    .collect()
            ),
            per_1m(|s| s.cpu),
            per_1m(|s| s.user),
            per_1m(|s| s.system),
            median(mine.iter().map(|s| (s.peak_rss >> 20) as f64).collect()),
        );
    }
}

fn bench(c: &mut Criterion) {
    let samples = Samples::default();
    bench_with(c, &samples);
}

criterion_group!(benches, bench);

fn main() {
    // Listing writes no workload.
    if std::env::args().any(|a| a == "--list") {
        for job in jobs() {
            println!("pipeline/{}: benchmark", job.name);
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
