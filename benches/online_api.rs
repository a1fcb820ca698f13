//! The online API under load while the pipeline ingests (issue 22), all in
//! this process on 127.0.0.1: the generator (10 k keys, Zipf 1.1) at
//! `SHARDFLOW_BENCH_RATE` events/s (default 10 000) → four window features
//! → the embedded model (`config/models/fraud.toml`) → predictions in a
//! file; the API served by the same code as `run` (`serve::Api`), and a
//! load generator on 64 keep-alive connections.
//!
//! - criterion `online_api_engine/read` and `…/evaluate`: the engine
//!   thread's share of a request (`Engine::read`, `Engine::evaluate` on 10 k
//!   keys of state, no HTTP), what a request takes from ingest.
//! - criterion `online_api/get_features/{1000,5000}` and
//!   `online_api/score/{1000,5000}`: the mean latency of a request offered
//!   at that many requests/s (`iter_custom`: each iteration is one request
//!   sent on schedule, its time the request's latency).
//! - Then a report per endpoint and rate, `SHARDFLOW_BENCH_SECS` (default
//!   10) seconds each: p50/p99/p999 from every request's latency (sorted,
//!   exact), requests/s achieved, 503s, and the events/s the pipeline
//!   ingested meanwhile (above the offered rate when the generator catches
//!   up on a backlog the row before left).
//! - Then ingest throughput unthrottled (`rate = 0`): without requests,
//!   with 5 k `GET /v1/features`/s, without again, and the change against
//!   the mean of the two quiet phases.
//!
//! Latency is measured from the moment a request was due (open loop), not
//! from when a connection was free to send it, so a stall shows as the
//! queue it makes (no coordinated omission). The load generator shares
//! the cores with the pipeline and the API.
//!
//! A checkpoint every second by default (`SHARDFLOW_BENCH_CHECKPOINT`, e.g.
//! `5s` as `[pipeline]`'s default): the engine serves no request while it
//! snapshots its dirty keys, which is where the slowest requests wait.
//!
//! ```sh
//! cargo bench --bench online_api                      # release profile, as make bench
//! SHARDFLOW_BENCH_SECS=3 cargo bench --bench online_api -- --warm-up-time 1 --measurement-time 2
//! ```

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use shardflow::config::Config;
use shardflow::flow::Stats;
use shardflow::online::Online;
use shardflow::pipeline::{self, RunOptions};
use shardflow::serve::{self, Api, Part};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

const CONNECTIONS: usize = 64;
const KEYS: u64 = 10_000;
const RATES: [u64; 2] = [1_000, 5_000];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config(dir: &Path, rate: u64) -> Config {
    let checkpoint: String = env_or("SHARDFLOW_BENCH_CHECKPOINT", "1s".to_string());
    let text = format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "{checkpoint}"
progress_interval = "0"

[api]
addr = "127.0.0.1:0"
max_in_flight = 256

[source]
type = "generator"
seed = 7
rate = {rate}
keys = {KEYS}
skew = 1.1
partitions = 2
out_of_orderness = "1s"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}

[watermark]
max_out_of_orderness = "2s"
idle_timeout = "30s"
allowed_lateness = "10s"

[[features]]
name = "txn_count_1m"
agg = "count"
window = {{ type = "sliding", size = "1m", slide = "10s" }}

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = {{ type = "sliding", size = "1m", slide = "10s" }}

[[features]]
name = "amount_max_5m"
agg = "max"
field = "amount"
window = {{ type = "tumbling", size = "5m" }}

[[features]]
name = "merchants_5m"
agg = "distinct_count"
field = "merchant"
window = {{ type = "tumbling", size = "5m" }}

[inference]
backend = "embedded"
model = "{model}"

[[sinks]]
type = "file"
path = "{dir}/predictions.ndjson"
kinds = ["prediction"]
"#,
        dir = dir.display(),
        model = concat!(env!("CARGO_MANIFEST_DIR"), "/config/models/fraud.toml"),
    );
    Config::from_str_at(&text, Path::new("bench.toml"), |_| None).expect("bench config")
}

/// A pipeline running in this process with the API served.
struct Running {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<pipeline::RunSummary>>,
    server: serve::Server,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(rate: u64) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), rate);
        let (online, link) = Online::new(&config, None).unwrap();
        let site = serve::router([Part::Api(Api::new(online))]);
        let server = serve::serve("127.0.0.1:0".parse().unwrap(), site)
            .await
            .unwrap();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = watch::channel(false);
        let options = RunOptions {
            online: Some(link),
            ..RunOptions::default()
        };
        let task = tokio::spawn(pipeline::run(config, options, stopped, stats.clone()));
        let running = Running {
            addr: server.addr(),
            stats,
            stop,
            task,
            server,
            _dir: dir,
        };
        // Warm: keys in state, the first checkpoints behind.
        let started = Instant::now();
        while running.events() < 20_000.min(rate.max(1) * 2)
            && started.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        running
    }

    fn events(&self) -> u64 {
        self.stats.events.load(Ordering::Relaxed)
    }

    /// Events/s ingested while `f` runs.
    async fn ingest_during<T>(&self, f: impl std::future::Future<Output = T>) -> (T, f64) {
        let (n, t) = (self.events(), Instant::now());
        let out = f.await;
        let rate = (self.events() - n) as f64 / t.elapsed().as_secs_f64();
        (out, rate)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let summary = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the pipeline stops within 60 s")
            .unwrap()
            .unwrap();
        assert!(summary.records_in > 0);
        self.server.stop().await.unwrap();
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(tcp),
        }
    }

    /// Sends a request and reads the answer; its status.
    async fn request(&mut self, head: &str, body: &str) -> u16 {
        let request = format!(
            "{head} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).await.unwrap();
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).await.unwrap();
        status
    }
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Features,
    Score,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Features => "get_features",
            Endpoint::Score => "score",
        }
    }

    /// The `i`-th request: one of the generator's keys, spread uniformly
    /// (so cold keys are read as often as hot ones), and for scores a
    /// transaction at the current time.
    fn request(self, i: u64) -> (String, String) {
        let key = i.wrapping_mul(2_654_435_761) % KEYS;
        match self {
            Endpoint::Features => (format!("GET /v1/features/u{key}"), String::new()),
            Endpoint::Score => (
                "POST /v1/score".to_string(),
                format!(
                    "{{\"userId\":\"u{key}\",\"timestamp\":{},\"amount\":{}.5,\"merchant\":\"m{}\"}}",
                    shardflow::time::now_millis(),
                    i % 500,
                    i % 40
                ),
            ),
        }
    }
}

/// What a load run measured.
#[derive(Default)]
struct Load {
    /// Milliseconds from when each request was due to its answer.
    latencies: Vec<f64>,
    busy: u64,
    elapsed: Duration,
}

/// Offers `n` requests at `rate`/s on [`CONNECTIONS`] connections, open loop.
async fn load(addr: SocketAddr, endpoint: Endpoint, rate: u64, n: u64) -> Load {
    let next = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (next, busy, latencies) = (next.clone(), busy.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let (head, body) = endpoint.request(i);
                    match conn.request(&head, &body).await {
                        200 => {}
                        503 => {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("{head}: HTTP {other}"),
                    }
                    mine.push(due.elapsed().as_secs_f64() * 1e3);
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    Load {
        latencies,
        busy: busy.load(Ordering::Relaxed) as u64,
        elapsed: started.elapsed(),
    }
}

fn percentiles(mut latencies: Vec<f64>) -> (f64, f64, f64, f64) {
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.99), q(0.999), *latencies.last().unwrap())
}

/// The engine thread's share of a request: `Engine::read` and
/// `Engine::evaluate` on an engine holding the bench's features for
/// [`KEYS`] keys (20 events each, over 10 minutes of event time), without
/// HTTP. What a request costs ingest is about this much engine time.
fn engine_side(c: &mut Criterion) {
    use shardflow::decode::Decoder;
    use shardflow::engine::Engine;
    use shardflow::record::Position;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 0);
    let store = shardflow::state::StateStore::open(
        &dir.path().join("state"),
        &config.state_fingerprint(),
        false,
    )
    .unwrap();
    let mut engine = Engine::new(&config, store).unwrap();
    let decoder = Decoder::new(&config.schema);
    let t0 = 1_700_000_000_000i64;
    let event = |i: u64, t: i64| {
        let text = format!(
            r#"{{"userId":"u{}","timestamp":{t},"amount":{}.25,"merchant":"m{}"}}"#,
            i.wrapping_mul(2_654_435_761) % KEYS,
            i % 300,
            i % 40
        );
        decoder
            .decode_str(Position::new("p".into(), i.to_string()), 0, &text)
            .unwrap()
    };
    let n = KEYS * 20;
    let mut out = Vec::new();
    for i in 0..n {
        engine
            .process(&event(i, t0 + (i as i64) * 600_000 / n as i64), 0, &mut out)
            .unwrap();
        out.clear();
    }
    let now = t0 + 600_000;
    let mut group = c.benchmark_group("online_api_engine");
    let mut i = 0u64;
    group.bench_function("read", |b| {
        b.iter(|| {
            i += 1;
            engine.read(&format!("u{}", i % KEYS), now).unwrap()
        })
    });
    let scored = event(7, now);
    group.bench_function("evaluate", |b| b.iter(|| engine.evaluate(&scored).unwrap()));
    group.finish();
}

fn criterion_means(c: &mut Criterion, rt: &tokio::runtime::Runtime, running: &Running) {
    let mut group = c.benchmark_group("online_api");
    group.sample_size(10);
    for endpoint in [Endpoint::Features, Endpoint::Score] {
        for rate in RATES {
            group.bench_function(BenchmarkId::new(endpoint.name(), rate), |b| {
                b.iter_custom(|iters| {
                    let run = rt.block_on(load(running.addr, endpoint, rate, iters));
                    Duration::from_secs_f64(run.latencies.iter().sum::<f64>() / 1e3)
                })
            });
        }
    }
    group.finish();
}

fn report(rt: &tokio::runtime::Runtime, running: &Running, ingest_rate: u64, secs: u64) {
    println!(
        "\nonline API while the pipeline ingests (offered {ingest_rate} events/s), {secs} s per row, latency in ms from when a request was due:"
    );
    println!(
        "{:>14} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>6} {:>12}",
        "endpoint", "req/s", "p50", "p99", "p999", "max", "achieved/s", "503s", "events/s"
    );
    for endpoint in [Endpoint::Features, Endpoint::Score] {
        for rate in RATES {
            let (run, ingested) =
                rt.block_on(running.ingest_during(load(running.addr, endpoint, rate, rate * secs)));
            let achieved = run.latencies.len() as f64 / run.elapsed.as_secs_f64();
            let (p50, p99, p999, max) = percentiles(run.latencies);
            println!(
                "{:>14} {rate:>8} {p50:>9.3} {p99:>9.3} {p999:>9.3} {max:>9.3} {achieved:>11.0} {:>6} {ingested:>12.0}",
                endpoint.name(),
                run.busy,
            );
        }
    }
}

/// Ingest throughput with the generator unthrottled: without requests,
/// with 5 k `GET /v1/features`/s, and without again (the two quiet phases
/// bracket the loaded one, so a drift of the machine shows).
fn unthrottled(rt: &tokio::runtime::Runtime, secs: u64) {
    let running = rt.block_on(Running::start(0));
    let quiet = || {
        rt.block_on(
            running.ingest_during(async { tokio::time::sleep(Duration::from_secs(secs)).await }),
        )
        .1
    };
    let before = quiet();
    let (run, loaded) = rt.block_on(running.ingest_during(load(
        running.addr,
        Endpoint::Features,
        5_000,
        5_000 * secs,
    )));
    let after = quiet();
    let achieved = run.latencies.len() as f64 / run.elapsed.as_secs_f64();
    let (p50, p99, p999, _) = percentiles(run.latencies);
    let base = (before + after) / 2.0;
    println!(
        "\ningest unthrottled (generator rate = 0), {secs} s each: {before:.0} events/s without requests, {loaded:.0} with 5000 GET/s offered ({achieved:.0}/s achieved; p50 {p50:.3} ms, p99 {p99:.3} ms, p999 {p999:.3} ms, {} 503s), {after:.0} without again: {:+.1}% against the mean of the two",
        run.busy,
        (loaded / base - 1.0) * 100.0
    );
    rt.block_on(running.stop());
}

fn main() {
    if cfg!(debug_assertions) {
        println!(
            "note: built in the dev profile (unoptimized code, the HTTP stack included): the numbers are indicative only"
        );
    }
    let rt = runtime();
    let ingest_rate = env_or("SHARDFLOW_BENCH_RATE", 10_000u64);
    let secs = env_or("SHARDFLOW_BENCH_SECS", 10u64);
    let mut c = Criterion::default().configure_from_args();
    engine_side(&mut c);
    let running = rt.block_on(Running::start(ingest_rate));
    criterion_means(&mut c, &rt, &running);
    report(&rt, &running, ingest_rate, secs);
    rt.block_on(running.stop());
    unthrottled(&rt, secs);
    c.final_summary();
}
