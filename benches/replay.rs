//! Replaying an S3 archive (issue 6): events/s for `shardflow replay` of
//! shardflow's own archive (`raw` records, gzip NDJSON objects of 100 k
//! events) from a local S3-compatible server (s3s-fs, embedded, on
//! 127.0.0.1), and where the time goes.
//!
//! Default 5 M events (about 1 GB of JSON lines, gzip);
//! `SHARDFLOW_BENCH_EVENTS` scales it. `SHARDFLOW_BENCH_CHECKPOINT` sets the
//! replay's `checkpoint_interval` (default `2s`). The archive is written once, before
//! anything is measured.
//!
//! - `replay/end_to_end`: the real thing, `replay::run` (list, 8 objects
//!   fetched at once, gunzip, split and schema decode on blocking threads,
//!   window engine over RocksDB, checkpoints), throughput in events.
//! - `replay/stages`: the same work one stage after another on one thread,
//!   each timed: download, gunzip, JSON (split + archive line + schema
//!   decode), engine, checkpoints (state delta committed to RocksDB every
//!   500 k events). Prints the breakdown; its time is their sum.
//!   No sink subscribes to window results, so the engine does not produce
//!   them; for comparison a second engine over the same events produces
//!   them (as it must when a sink takes them), timed apart and not summed.

/// As in the binary (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use shardflow::archive::layout;
use shardflow::config::{Config, S3ClientConfig};
use shardflow::decode::Decoder;
use shardflow::engine::{Engine, EngineOptions, PREFETCH_AHEAD};
use shardflow::record::{Output, OutputKind, Position, RawOutput};
use shardflow::replay::{self, ReplayArgs};
use shardflow::source::s3::{self as s3src, objects};
use shardflow::state::StateStore;
use std::io::{Read as _, Write as _};

const T0: i64 = 1_700_000_000_000;
const PER_OBJECT: usize = 100_000;
const PARTITIONS: usize = 4;
/// The stage breakdown commits a checkpoint this often (the pipeline does
/// every `checkpoint_interval`).
const CHECKPOINT_EVERY: usize = 500_000;

fn events_from_env() -> usize {
    std::env::var("SHARDFLOW_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000)
}

fn config_text(url: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
[pipeline]
checkpoint_interval = "{checkpoint}"
batch_size = 1024

[source]
type = "s3"
bucket = "bench"
prefix = "archive/"
endpoint_url = "{url}"
concurrency = 8

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}

[watermark]
max_out_of_orderness = "5s"

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

[[sinks]]
type = "file"
path = "{dir}/dead.ndjson"
kinds = ["dead_letter"]
"#,
        dir = dir.display(),
        checkpoint = std::env::var("SHARDFLOW_BENCH_CHECKPOINT").unwrap_or_else(|_| "2s".into()),
    )
}

/// The archive's records: 100 k keys, ~4 events/ms, 5 s of disorder.
fn raw_line(i: usize, out: &mut Vec<u8>) {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 29;
    let key = x % 100_000;
    let t = T0 + (i / 4) as i64 - (x >> 20) as i64 % 5_000;
    let data = format!(
        "{{\"userId\":\"u{key}\",\"timestamp\":{t},\"amount\":{}.{:02},\"merchant\":\"m{}\"}}",
        (x >> 8) % 500,
        (x >> 16) % 100,
        (x >> 24) % 1_000
    );
    let p = i % PARTITIONS;
    Output::Raw(RawOutput {
        position: Position::new(
            Arc::from(format!("shardId-{p:012}")),
            (i / PARTITIONS).to_string(),
        ),
        decoded: Some((Arc::from(format!("u{key}")), t)),
        watermark: T0 + (i / 4) as i64 - 10_000,
        data: Bytes::from(data),
    })
    .write_ndjson(out);
}

struct Setup {
    runtime: tokio::runtime::Runtime,
    url: String,
    _root: tempfile::TempDir,
    events: usize,
    json_bytes: u64,
    gzip_bytes: u64,
}

fn setup() -> Setup {
    std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench-secret");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single("bench", "bench-secret"));
    let service = builder.build();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = AutoBuilder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let events = events_from_env();
    let started = Instant::now();
    let (json_bytes, gzip_bytes) = runtime.block_on(async {
        let client = client(&url).await;
        client.create_bucket().bucket("bench").send().await.unwrap();
        let (mut json, mut gz_total) = (0u64, 0u64);
        let mut line = Vec::with_capacity(512);
        for (n, start) in (0..events).step_by(PER_OBJECT).enumerate() {
            let end = (start + PER_OBJECT).min(events);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            for i in start..end {
                line.clear();
                raw_line(i, &mut line);
                json += line.len() as u64;
                gz.write_all(&line).unwrap();
            }
            let body = gz.finish().unwrap();
            gz_total += body.len() as u64;
            let key = format!(
                "archive/{}{}",
                layout::hour_path(T0 + start as i64 / 4),
                layout::object_name(1, n as u64 + 1, 0)
            );
            client
                .put_object()
                .bucket("bench")
                .key(key)
                .body(body.into())
                .send()
                .await
                .unwrap();
        }
        (json, gz_total)
    });
    eprintln!(
        "archive: {events} events, {:.0} MB of JSON lines, {:.0} MB gzip, written in {:.1}s",
        json_bytes as f64 / 1e6,
        gzip_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Setup {
        runtime,
        url,
        _root: root,
        events,
        json_bytes,
        gzip_bytes,
    }
}

async fn client(url: &str) -> aws_sdk_s3::Client {
    shardflow::aws::s3::client(&S3ClientConfig {
        endpoint_url: Some(url.into()),
        region: None,
        force_path_style: None,
        max_attempts: 3,
    })
    .await
    .unwrap()
}

fn load(text: &str, dir: &std::path::Path) -> Config {
    let path = dir.join("bench.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// A replay's engine and its store, committing every [`CHECKPOINT_EVERY`].
struct Replayed {
    engine: Engine,
    store: StateStore,
    checkpoint: u64,
}

impl Replayed {
    fn new(config: &Config, dir: &std::path::Path, window_results: bool) -> Replayed {
        let store = StateStore::open(dir, &config.state_fingerprint(), false).unwrap();
        let engine = Engine::with_options(
            config,
            store.clone(),
            EngineOptions {
                event_time_only: true,
                window_results,
                ..EngineOptions::default()
            },
        )
        .unwrap();
        Replayed {
            engine,
            store,
            checkpoint: 0,
        }
    }

    fn process(
        &mut self,
        events: &[(Option<i64>, shardflow::record::Event)],
        out: &mut Vec<Output>,
    ) {
        // As the pipeline's engine stage does.
        for chunk in events.chunks(PREFETCH_AHEAD) {
            self.engine.prefetch(chunk.iter().map(|(_, e)| &*e.key));
            for (w, e) in chunk {
                if let Some(w) = w {
                    self.engine.advance_to(*w, out).unwrap();
                }
                self.engine.process(e, 0, out).unwrap();
                if out.len() >= 4096 {
                    out.clear();
                }
            }
        }
    }

    fn checkpoint(&mut self) {
        self.checkpoint += 1;
        let delta = self.engine.snapshot(self.checkpoint).unwrap();
        self.store.commit(self.checkpoint, delta, &[]).unwrap();
        self.engine.committed(self.checkpoint);
    }
}

/// One pass, stage after stage per object, each stage timed: the five
/// stages, then engine and checkpoints of the engine with window results.
fn stages(s: &Setup) -> [Duration; 7] {
    let dir = tempfile::tempdir().unwrap();
    let config = load(&config_text(&s.url, dir.path()), dir.path());
    let window_results = config.subscribed_kinds().contains(OutputKind::Window);
    let mut replayed = Replayed::new(&config, &dir.path().join("state"), window_results);
    let mut with_results = Replayed::new(&config, &dir.path().join("state-windows"), true);
    let decoder = Decoder::new(&config.schema);
    let mut times = [Duration::ZERO; 7];
    let mut since_checkpoint = 0;
    let client = s.runtime.block_on(client(&s.url));
    let keys: Vec<String> = s.runtime.block_on(async {
        let out = client
            .list_objects_v2()
            .bucket("bench")
            .prefix("archive/")
            .send()
            .await
            .unwrap();
        let mut keys: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect();
        keys.sort_by_key(|k| layout::parse_key("archive/", k).written);
        keys
    });
    let mut out = Vec::with_capacity(4096);
    let mut interner = s3src::Interner::default();
    for key in keys {
        let t = Instant::now();
        let body = s.runtime.block_on(async {
            let o = client
                .get_object()
                .bucket("bench")
                .key(&key)
                .send()
                .await
                .unwrap();
            o.body.collect().await.unwrap().into_bytes()
        });
        times[0] += t.elapsed();
        let t = Instant::now();
        let mut plain = Vec::with_capacity(body.len() * 6);
        flate2::read::MultiGzDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .unwrap();
        times[1] += t.elapsed();
        let t = Instant::now();
        let mut events = Vec::with_capacity(PER_OBJECT);
        let mut split = objects::Splitter::new(&plain[..], objects::Layout::Lines);
        while let Some(objects::Item::Record(_, line)) = split.next_item().unwrap() {
            let r = s3src::archived_event(line, &mut interner, 0, &decoder)
                .unwrap()
                .unwrap();
            events.push((r.replay_watermark, r.event.unwrap()));
        }
        times[2] += t.elapsed();
        let t = Instant::now();
        replayed.process(&events, &mut out);
        times[3] += t.elapsed();
        let t = Instant::now();
        with_results.process(&events, &mut out);
        times[5] += t.elapsed();
        since_checkpoint += events.len();
        if since_checkpoint >= CHECKPOINT_EVERY {
            since_checkpoint = 0;
            let t = Instant::now();
            replayed.checkpoint();
            times[4] += t.elapsed();
            let t = Instant::now();
            with_results.checkpoint();
            times[6] += t.elapsed();
        }
    }
    let t = Instant::now();
    replayed.engine.finish(&mut out).unwrap();
    times[3] += t.elapsed();
    out.clear();
    let t = Instant::now();
    with_results.engine.finish(&mut out).unwrap();
    times[5] += t.elapsed();
    eprintln!(
        "timer visits per event: {:.2} (window results on: {:.2})",
        replayed.engine.stats().timer_visits as f64 / s.events as f64,
        with_results.engine.stats().timer_visits as f64 / s.events as f64
    );
    times
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("replay");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(s.events as u64));
    group.bench_function("end_to_end", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let config = load(&config_text(&s.url, dir.path()), dir.path());
                let prepared = replay::prepare(&config).unwrap();
                let (_stop, rx) = tokio::sync::watch::channel(false);
                let summary = s
                    .runtime
                    .block_on(replay::run(prepared, ReplayArgs::default(), rx))
                    .unwrap();
                assert_eq!(summary.events as usize, s.events);
                eprintln!(
                    "end to end: {} events in {:.2}s = {:.0} events/s ({:.0} MB/s of JSON)",
                    summary.events,
                    summary.seconds,
                    summary.events as f64 / summary.seconds,
                    s.json_bytes as f64 / 1e6 / summary.seconds
                );
                total += Duration::from_secs_f64(summary.seconds);
            }
            total
        })
    });
    group.bench_function("stages", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = stages(&s);
                let sum: Duration = t[..5].iter().sum();
                let names = [
                    "download",
                    "gunzip",
                    "JSON (split, archive line, decode)",
                    "engine",
                    "checkpoints (every 500 k events)",
                    "not summed: engine, window results on",
                    "not summed: its checkpoints",
                ];
                eprintln!(
                    "one thread, stage by stage ({:.0} MB gzip → {:.0} MB JSON):",
                    s.gzip_bytes as f64 / 1e6,
                    s.json_bytes as f64 / 1e6
                );
                for (name, d) in names.iter().zip(t) {
                    eprintln!(
                        "  {name:<40} {:>7.2}s {:>5.1}%  {:>10.0} events/s",
                        d.as_secs_f64(),
                        100.0 * d.as_secs_f64() / sum.as_secs_f64(),
                        s.events as f64 / d.as_secs_f64()
                    );
                }
                total += sum;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
